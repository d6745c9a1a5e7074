//! One CPU's entries, indexed like a page table: `frame -> {address, count,
//! clock flags}` for single pages in a two-level per-frame table whose
//! leaves hold the entries themselves, runs in a hash map, and the mappings
//! in a slab touched only to map or unmap. The policy that uses it (the
//! clock, the excess limit, slots) is in `pcpu.rs`.

use std::fmt;
use std::ptr::NonNull;

use crate::hash::WordMap;
use crate::kva::{MapKey as Key, Mapping};

/// What a hit and its release touch of a mapped frame (or run) on one CPU:
/// 16 bytes, kept in the per-frame index itself (four to a cache line), so
/// a hit reads no other per-frame state.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    /// The mapping's address; `None` for an empty place in a leaf.
    pub(crate) addr: Option<NonNull<u8>>,
    pub(crate) refs: u32,
    /// The slab index of the entry's [`Cold`] part, and two flags.
    tag: u32,
}

// SAFETY: `addr` is a record of where the mapping is, as in `Mapping`; it
// is only dereferenced by handles that borrow the cache owning the entry.
unsafe impl Send for Entry {}
// SAFETY: as above; `&Entry` gives only copies of the record.
unsafe impl Sync for Entry {}

/// On the clock queue. Every unused entry is (`refs == 0` implies queued);
/// used ones may be, until the clock hand passes them.
pub(crate) const QUEUED: u32 = 1 << 31;
/// Released again since the clock hand last saw it: spared once.
pub(crate) const REFERENCED: u32 = 1 << 30;
/// The slab index bits of `Entry::tag`.
const SLAB: u32 = REFERENCED - 1;

impl Entry {
    const EMPTY: Entry = Entry { addr: None, refs: 0, tag: 0 };

    pub(crate) fn queued(&self) -> bool {
        self.tag & QUEUED != 0
    }

    pub(crate) fn referenced(&self) -> bool {
        self.tag & REFERENCED != 0
    }

    pub(crate) fn set(&mut self, flag: u32, on: bool) {
        if on {
            self.tag |= flag;
        } else {
            self.tag &= !flag;
        }
    }
}

/// The rest of an entry, touched only when it is mapped or unmapped.
#[derive(Debug)]
struct Cold {
    key: Key,
    mapping: Mapping,
}

/// The index of an entry that is not in the per-frame table (a run).
pub(crate) const NOT_INDEXED: usize = usize::MAX;

/// Frames per leaf of [`Entries`]' per-frame index (4 KiB of entries).
const LEAF: usize = 256;

/// One CPU's entries, found like page-table entries: for a single page,
/// its frame number indexes a two-level table whose leaves hold the
/// [`Entry`] itself (two loads, no hashing); runs are in a hash map. The
/// mapping itself waits in a slab for the unmap. The table costs 16 bytes
/// per frame in leaves of 4 KiB (and a count), each made when the CPU maps a frame of its
/// 256-frame range and freed when the last such entry goes, so memory
/// follows what the CPU has mapped now, not what it ever mapped.
pub(crate) struct Entries {
    /// log2 of the mapping granule: granule keys are indexed by
    /// `pfn >> shift`.
    shift: u32,
    slab: Vec<Option<Cold>>,
    /// Free slab indexes.
    free: Vec<u32>,
    /// `pfn / LEAF` -> leaf.
    leaves: Vec<Option<Box<Leaf>>>,
    runs: WordMap<Key, Entry>,
    len: usize,
}

/// The entries of 256 consecutive frames.
struct Leaf {
    entries: [Entry; LEAF],
    /// Entries present (`addr` set).
    live: u32,
}

impl fmt::Debug for Entries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entries")
            .field("len", &self.len)
            .field("slab", &self.slab.len())
            .field("leaves", &self.leaves.iter().flatten().count())
            .field("runs", &self.runs.len())
            .finish()
    }
}

impl Entries {
    /// No entries; keys of one granule of `1 << shift` frames go to the
    /// per-frame table, others to the hash map.
    pub(crate) fn new(shift: u32) -> Self {
        Entries { shift, slab: Vec::new(), free: Vec::new(), leaves: Vec::new(), runs: WordMap::default(), len: 0 }
    }

    /// The table index of a granule key (see `KvaSpace::granule_index`).
    #[inline]
    fn table_index(&self, key: Key) -> Option<usize> {
        crate::kva::granule_index(self.shift, key)
    }

    /// Where `key`'s entry is (or would be): its place in the per-frame
    /// table, or [`NOT_INDEXED`] for a run kept in the hash map. Handles
    /// keep it, so that a release finds its entry without the key.
    #[inline]
    pub(crate) fn index_of(&self, key: Key) -> usize {
        self.table_index(key).unwrap_or(NOT_INDEXED)
    }

    /// The entry at `index` (from [`index_of`](Self::index_of)), or
    /// `key`'s when the index is [`NOT_INDEXED`]. `key` is called only
    /// then.
    #[inline(always)]
    pub(crate) fn at_mut(&mut self, index: usize, key: impl FnOnce() -> Key) -> Option<&mut Entry> {
        if index == NOT_INDEXED {
            return self.run_mut(key());
        }
        let leaf = self.leaves.get_mut(index / LEAF)?.as_deref_mut()?;
        Some(&mut leaf.entries[index % LEAF]).filter(|e| e.addr.is_some())
    }

    /// A run's entry: out of line, so that the hash lookup stays out of the
    /// single-page hit path.
    #[inline(never)]
    fn run_mut(&mut self, key: Key) -> Option<&mut Entry> {
        self.runs.get_mut(&key)
    }

    /// `key`'s entry.
    #[inline]
    pub(crate) fn get_mut(&mut self, key: Key) -> Option<&mut Entry> {
        self.at_mut(self.index_of(key), || key)
    }

    pub(crate) fn get(&self, key: Key) -> Option<&Entry> {
        if let Some(i) = self.table_index(key) {
            let leaf = self.leaves.get(i / LEAF)?.as_deref()?;
            Some(&leaf.entries[i % LEAF]).filter(|e| e.addr.is_some())
        } else {
            self.runs.get(&key)
        }
    }

    /// Add `key` (not present), mapped by `mapping`, with `refs` and `tag`'s
    /// flags.
    pub(crate) fn insert(&mut self, key: Key, mapping: Mapping, refs: u32, flags: u32) {
        let addr = Some(mapping.addr());
        let cold = Some(Cold { key, mapping });
        let i = match self.free.pop() {
            Some(i) => {
                self.slab[i as usize] = cold;
                i
            }
            None => {
                let i = u32::try_from(self.slab.len())
                    .ok()
                    .filter(|&i| i <= SLAB)
                    .expect("lwbuf: more than 2^30 entries on one CPU");
                self.slab.push(cold);
                i
            }
        };
        let e = Entry { addr, refs, tag: i | (flags & !SLAB) };
        if let Some(i) = self.table_index(key) {
            let at = i / LEAF;
            if self.leaves.len() <= at {
                self.leaves.resize_with(at + 1, || None);
            }
            let leaf = self.leaves[at].get_or_insert_with(|| Box::new(Leaf { entries: [Entry::EMPTY; LEAF], live: 0 }));
            let place = &mut leaf.entries[i % LEAF];
            debug_assert!(place.addr.is_none(), "{key:?} inserted twice");
            *place = e;
            leaf.live += 1;
        } else {
            self.runs.insert(key, e);
        }
        self.len += 1;
    }

    /// Take `key`'s entry out; returns its mapping.
    pub(crate) fn remove(&mut self, key: Key) -> Option<Mapping> {
        let e = if let Some(i) = self.table_index(key) {
            let at = i / LEAF;
            let leaf = self.leaves.get_mut(at)?.as_deref_mut()?;
            let e = std::mem::replace(&mut leaf.entries[i % LEAF], Entry::EMPTY);
            e.addr?;
            leaf.live -= 1;
            if leaf.live == 0 {
                self.leaves[at] = None;
            }
            e
        } else {
            self.runs.remove(&key)?
        };
        self.len -= 1;
        let i = e.tag & SLAB;
        self.free.push(i);
        self.slab[i as usize].take().map(|c| c.mapping)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Every entry: key, mapping and count.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Key, &Mapping, u32)> + '_ {
        self.slab.iter().flatten().map(|c| (c.key, &c.mapping, self.get(c.key).map_or(0, |e| e.refs)))
    }

    /// Take every entry out (and free the index); returns the mappings.
    pub(crate) fn drain(&mut self) -> Vec<Mapping> {
        let all = self.slab.drain(..).flatten().map(|c| c.mapping).collect();
        self.free.clear();
        self.leaves.clear();
        self.runs.clear();
        self.len = 0;
        all
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::kva::KvaSpace;
    use crate::phys::Pfn;
    use crate::{ModelMmu, PhysMem};
    use std::sync::Arc;

    /// The per-frame index across leaves, runs beside single pages, slab
    /// reuse, and leaves freed when their last entry goes.
    #[test]
    fn entries_index_and_leaves() {
        let mem = PhysMem::builder().frames(4 * LEAF).backing(crate::Backing::Heap).build().unwrap();
        let kva =
            KvaSpace::new(Arc::new(ModelMmu::new(&mem, 64).unwrap()), None, None, crate::kva::Reclaim::Strict).unwrap();
        let mut es = Entries::new(0);
        let single = |pfn| Key { pfn, pages: 1 };
        let map = |kva: &KvaSpace, key: Key| {
            let run = kva.take(key.pages).unwrap();
            kva.map(run, Pfn(key.pfn), key.pages).map_err(|(e, _)| e).unwrap()
        };
        let free = |kva: &KvaSpace, m: Mapping| {
            // SAFETY: the test made this mapping and nothing refers to it.
            kva.give(unsafe { kva.unmap(m) }.map_err(|(e, _)| e).unwrap());
        };
        let keys = [single(0), single(LEAF - 1), single(LEAF), single(3 * LEAF + 5), Key { pfn: 0, pages: 4 }];
        let mut addrs = Vec::new();
        for (n, &k) in keys.iter().enumerate() {
            let m = map(&kva, k);
            addrs.push(m.addr());
            es.insert(k, m, n as u32, if n % 2 == 0 { QUEUED } else { REFERENCED });
        }
        assert_eq!(es.len(), keys.len());
        for (n, k) in keys.iter().enumerate() {
            let e = *es.get_mut(*k).unwrap();
            assert_eq!(
                (e.addr, e.refs, e.queued(), e.referenced()),
                (Some(addrs[n]), n as u32, n % 2 == 0, n % 2 == 1)
            );
        }
        assert!(es.get_mut(single(1)).is_none());
        assert!(es.get_mut(single(100 * LEAF)).is_none(), "beyond the table");
        assert!(es.get_mut(Key { pfn: 0, pages: 2 }).is_none(), "runs are keyed by length");
        assert_eq!(es.leaves.iter().flatten().count(), 3);
        let e = es.get_mut(single(LEAF)).unwrap();
        e.set(QUEUED, true);
        e.set(REFERENCED, false);
        e.refs = 9;
        let seen: Vec<(Key, u32)> = es.iter().map(|(k, _, r)| (k, r)).collect();
        assert!(seen.contains(&(single(LEAF), 9)) && seen.len() == keys.len());

        // Leaf 0 holds two frames: it stays until both are gone.
        free(&kva, es.remove(single(0)).unwrap());
        assert_eq!(es.leaves.iter().flatten().count(), 3);
        assert!(es.remove(single(0)).is_none(), "removed once");
        free(&kva, es.remove(single(LEAF - 1)).unwrap());
        assert_eq!(es.leaves.iter().flatten().count(), 2, "an empty leaf is freed");
        // A freed slab index is reused.
        let slab = es.slab.len();
        es.insert(single(7), map(&kva, single(7)), 0, 0);
        assert_eq!(es.slab.len(), slab);
        assert_eq!(es.get_mut(single(7)).unwrap().refs, 0);
        assert_eq!(es.get_mut(Key { pfn: 0, pages: 4 }).unwrap().addr, Some(addrs[4]));
        assert_eq!(es.iter().count(), 4);
        for m in es.drain() {
            free(&kva, m);
        }
        assert_eq!((es.len(), es.leaves.len(), es.iter().count()), (0, 0, 0));
        assert!(format!("{es:?}").len() < 200, "Debug stays short");
    }

    /// With a granule of 4 frames the table is indexed by granule number:
    /// the 256 granules of 1021 frames (the last one short) share one leaf,
    /// and a run crossing granules (keyed by the two it covers) goes to the
    /// map.
    #[test]
    fn granule_keys_index_by_granule_number() {
        let g = 4;
        let frames = LEAF * g - 3;
        let mem = PhysMem::builder().frames(frames).backing(crate::Backing::Heap).build().unwrap();
        let kva =
            KvaSpace::new(Arc::new(ModelMmu::new(&mem, 5 * g).unwrap()), None, Some(g), crate::kva::Reclaim::Strict)
                .unwrap();
        let mut es = Entries::new(kva.granule_shift());
        let keys = [kva.key_of(1, 1), kva.key_of(5 * g + 3, 1), kva.key_of(frames - 1, 1), kva.key_of(g - 2, 3)];
        assert_eq!(keys[2], Key { pfn: (LEAF - 1) * g, pages: 1 }, "the last granule is short");
        assert_eq!(keys[3], Key { pfn: 0, pages: 2 * g }, "a crossing run is keyed by the granules it covers");
        for k in keys {
            let run = kva.take(k.pages).unwrap();
            es.insert(k, kva.map(run, Pfn(k.pfn), k.pages).map_err(|(e, _)| e).unwrap(), 0, 0);
        }
        assert_eq!(es.leaves.len(), 1, "256 granules, one leaf");
        assert!(keys.iter().all(|&k| es.get(k).is_some()));
        assert!(es.get(kva.key_of(g, 1)).is_none(), "another granule of the leaf");
        for m in es.drain() {
            // SAFETY: the test made these mappings and nothing refers to them.
            kva.give(unsafe { kva.unmap(m) }.map_err(|(e, _)| e).unwrap());
        }
    }
}
