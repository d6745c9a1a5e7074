//! One CPU's lwbuf cache (`lwbuf_pcpu`): the owner's state and the mailbox
//! other CPUs post to.
//!
//! [`Local`] is the owner's: `frame -> {slot, refcnt}`, the clock of
//! entries whose count is zero (still mapped, so the next alloc is a hit),
//! and the slots this CPU took from the shared allocator. It sits behind a mutex that
//! only its owner takes in the common case (uncontended: one CAS, no shared
//! cache line); the mutex exists so that a CPU whose thread is idle or gone
//! can be drained and trimmed on its behalf. [`Pcpu::mailbox`] is the shared
//! part: decref messages from other CPUs.

use std::collections::VecDeque;
use std::fmt;
use std::ptr::NonNull;

use crate::cpu::Mailbox;
use crate::cpu::Owned;
use crate::error::Error;
use crate::hash::WordMap;
pub(crate) use crate::kva::MapKey as Key;
use crate::kva::{KvaSpace, Mapping, SlotRun};
use crate::phys::Pfn;
use crate::sync::{env, AtomicU64};

// Replacement is a clock over release order (second chance): an entry joins
// the back of the queue when its count first drops to zero; a hit does not
// move it (so a hit and its release touch nothing but the entry), and a
// release of an entry still queued only marks it referenced. The eviction
// hand pops the front, drops used entries from the queue, sends a marked one
// to the back with its mark cleared, and evicts the first unmarked unused
// one. Without re-use this is exactly LRU; with it, an entry used since it
// was queued gets one more trip round.

/// What a hit and its release touch of a mapped frame (or run) on one CPU:
/// 16 bytes, kept in the per-frame index itself (four to a cache line), so
/// a hit reads no other per-frame state.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// The mapping's address; `None` for an empty place in a leaf.
    addr: Option<NonNull<u8>>,
    refs: u32,
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
const QUEUED: u32 = 1 << 31;
/// Released again since the clock hand last saw it: spared once.
const REFERENCED: u32 = 1 << 30;
/// The slab index bits of `Entry::tag`.
const SLAB: u32 = REFERENCED - 1;

impl Entry {
    const EMPTY: Entry = Entry { addr: None, refs: 0, tag: 0 };

    fn queued(&self) -> bool {
        self.tag & QUEUED != 0
    }

    fn referenced(&self) -> bool {
        self.tag & REFERENCED != 0
    }

    fn set(&mut self, flag: u32, on: bool) {
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

/// Frames per leaf of [`Entries`]' per-frame index (4 KiB of entries).
const LEAF: usize = 256;

/// One CPU's entries, found like page-table entries: for a single page,
/// its frame number indexes a two-level table whose leaves hold the
/// [`Entry`] itself (two loads, no hashing); runs are in a hash map. The
/// mapping itself waits in a slab for the unmap. The table costs 16 bytes
/// per frame in leaves of 4 KiB (and a count), each made when the CPU maps a frame of its
/// 256-frame range and freed when the last such entry goes, so memory
/// follows what the CPU has mapped now, not what it ever mapped.
#[derive(Default)]
struct Entries {
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
    /// `key`'s entry.
    #[inline]
    fn get_mut(&mut self, key: Key) -> Option<&mut Entry> {
        if key.pages == 1 {
            let leaf = self.leaves.get_mut(key.pfn / LEAF)?.as_deref_mut()?;
            Some(&mut leaf.entries[key.pfn % LEAF]).filter(|e| e.addr.is_some())
        } else {
            self.runs.get_mut(&key)
        }
    }

    fn get(&self, key: Key) -> Option<&Entry> {
        if key.pages == 1 {
            let leaf = self.leaves.get(key.pfn / LEAF)?.as_deref()?;
            Some(&leaf.entries[key.pfn % LEAF]).filter(|e| e.addr.is_some())
        } else {
            self.runs.get(&key)
        }
    }

    /// Add `key` (not present), mapped by `mapping`, with `refs` and `tag`'s
    /// flags.
    fn insert(&mut self, key: Key, mapping: Mapping, refs: u32, flags: u32) {
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
        if key.pages == 1 {
            let at = key.pfn / LEAF;
            if self.leaves.len() <= at {
                self.leaves.resize_with(at + 1, || None);
            }
            let leaf = self.leaves[at].get_or_insert_with(|| Box::new(Leaf { entries: [Entry::EMPTY; LEAF], live: 0 }));
            let place = &mut leaf.entries[key.pfn % LEAF];
            debug_assert!(place.addr.is_none(), "{key:?} inserted twice");
            *place = e;
            leaf.live += 1;
        } else {
            self.runs.insert(key, e);
        }
        self.len += 1;
    }

    /// Take `key`'s entry out; returns its mapping.
    fn remove(&mut self, key: Key) -> Option<Mapping> {
        let e = if key.pages == 1 {
            let at = key.pfn / LEAF;
            let leaf = self.leaves.get_mut(at)?.as_deref_mut()?;
            let e = std::mem::replace(&mut leaf.entries[key.pfn % LEAF], Entry::EMPTY);
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

    fn len(&self) -> usize {
        self.len
    }

    /// Every entry: key, mapping and count.
    fn iter(&self) -> impl Iterator<Item = (Key, &Mapping, u32)> + '_ {
        self.slab.iter().flatten().map(|c| (c.key, &c.mapping, self.get(c.key).map_or(0, |e| e.refs)))
    }

    /// Take every entry out (and free the index); returns the mappings.
    fn drain(&mut self) -> Vec<Mapping> {
        let all = self.slab.drain(..).flatten().map(|c| c.mapping).collect();
        self.free.clear();
        self.leaves.clear();
        self.runs.clear();
        self.len = 0;
        all
    }
}

/// Counters kept by the owner (under the cache lock).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) foreign: u64,
    pub(crate) applied: u64,
    pub(crate) evictions: u64,
    pub(crate) peak_mapped: u64,
    pub(crate) unmap_errors: u64,
}

/// Why a lookup could not produce a mapping.
#[derive(Debug)]
pub(crate) enum Miss {
    /// No free slot, or no room under the mapping budget, and nothing of
    /// this CPU's to evict; other CPUs may have some to give back. The error
    /// says which ([`Error::WindowFull`] or [`Error::MapLimit`]/`ENOMEM`).
    NoRoom(Error),
    /// The MMU refused for another reason.
    Failed(Error),
}

/// The owner's half of a CPU's cache.
#[derive(Debug)]
pub(crate) struct Local {
    pub(crate) cpu: usize,
    map: Entries,
    /// The clock queue, oldest release first.
    clock: VecDeque<Key>,
    /// Entries with a count of zero.
    unused: usize,
    /// Unmapped single slots this CPU holds for its next misses.
    free_slots: Vec<SlotRun>,
    /// The mailbox's spare vector, swapped in at each drain.
    spare: Vec<Key>,
    /// The error of the last unmap the MMU refused during the current miss,
    /// so that a miss that found nothing it could evict reports it rather
    /// than a full window.
    unmap_error: Option<Error>,
    pub(crate) c: Counters,
}

/// One CPU: its cache and its mailbox, each on its own cache lines.
#[derive(Debug)]
pub(crate) struct Pcpu {
    pub(crate) local: Owned<Local>,
    pub(crate) mailbox: Mailbox<Key>,
    /// Decref messages sent by threads bound to this CPU.
    pub(crate) sent: AtomicU64,
}

impl Pcpu {
    pub(crate) fn new(cpu: usize) -> Self {
        Pcpu { local: Owned::new(Local::new(cpu)), mailbox: Mailbox::default(), sent: AtomicU64::new(0) }
    }
}

impl Local {
    fn new(cpu: usize) -> Self {
        Local {
            cpu,
            map: Entries::default(),
            clock: VecDeque::new(),
            unused: 0,
            free_slots: Vec::new(),
            spare: Vec::new(),
            unmap_error: None,
            c: Counters::default(),
        }
    }

    /// Entries mapped now (in use or cached).
    pub(crate) fn mapped(&self) -> usize {
        self.map.len()
    }

    /// Entries mapped and unused now.
    pub(crate) fn cached(&self) -> usize {
        self.unused
    }

    /// Single slots held unmapped.
    pub(crate) fn free_slot_count(&self) -> usize {
        self.free_slots.len()
    }

    /// The frames mapped here with their slots and counts (for checks).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (Key, crate::mmu::Slot, u32)> + '_ {
        self.map.iter().map(|(k, m, refs)| (k, m.slot(), refs))
    }

    /// Apply every message in the mailbox, then enforce the excess limit.
    #[cold]
    pub(crate) fn drain(&mut self, mailbox: &Mailbox<Key>, kva: &KvaSpace, max_excess: usize) {
        let mut msgs = std::mem::take(&mut self.spare);
        mailbox.take_all(&mut msgs);
        for key in msgs.drain(..) {
            self.c.applied += 1;
            self.decref(key);
        }
        self.spare = msgs;
        self.trim(kva, max_excess);
    }

    /// Find or create the entry for `key`, take a reference, and return its
    /// address. A hit makes no system call and no allocation, and touches
    /// only the index (where the entry lives).
    #[inline]
    pub(crate) fn acquire(&mut self, kva: &KvaSpace, key: Key) -> std::result::Result<NonNull<u8>, Miss> {
        if let Some(e) = self.map.get_mut(key) {
            e.refs = e.refs.checked_add(1).expect("lwbuf: entry reference count overflow");
            let (addr, first) = (e.addr.expect("a present entry has an address"), e.refs == 1);
            if first {
                self.unused -= 1;
            }
            self.c.hits += 1;
            return Ok(addr);
        }
        self.acquire_miss(kva, key)
    }

    /// Counted (an alloc, a miss) only when it succeeds: an attempt that
    /// finds no room is retried after reclaiming other CPUs' caches, and
    /// one call must count once.
    #[cold]
    fn acquire_miss(&mut self, kva: &KvaSpace, key: Key) -> std::result::Result<NonNull<u8>, Miss> {
        let mapping = self.map_new(kva, key)?;
        self.c.misses += 1;
        let addr = mapping.addr();
        self.map.insert(key, mapping, 1, 0);
        self.c.peak_mapped = self.c.peak_mapped.max(self.map.len() as u64);
        Ok(addr)
    }

    /// The address of the entry for `key`, which the caller holds a
    /// reference on.
    pub(crate) fn addr_of(&mut self, key: Key) -> NonNull<u8> {
        self.map.get(key).and_then(|e| e.addr).expect("lwbuf: address of an entry this CPU does not hold")
    }

    /// Map `key` into fresh slots: from this CPU's free slots, the shared
    /// allocator, or by evicting this CPU's least recently used entry. When
    /// the kernel refuses the mapping for lack of room (`ENOMEM`: the
    /// `vm.max_map_count` wall), evict a cached entry and try again.
    fn map_new(&mut self, kva: &KvaSpace, key: Key) -> std::result::Result<Mapping, Miss> {
        self.unmap_error = None;
        loop {
            let Some(run) = self.take_slots(kva, key.pages) else {
                // Every cached entry is in use, or the MMU refused to unmap
                // the one we tried: say which.
                let full = Error::WindowFull { requested: key.pages, capacity: kva.capacity() };
                return Err(Miss::NoRoom(self.unmap_error.take().unwrap_or(full)));
            };
            match kva.map(run, Pfn(key.pfn)) {
                Ok(m) => return Ok(m),
                Err((e, run)) => {
                    self.put_slots(kva, run);
                    if Mapping::no_room(&e) {
                        if self.evict_one(kva) {
                            continue;
                        }
                        return Err(Miss::NoRoom(e));
                    }
                    return Err(Miss::Failed(e));
                }
            }
        }
    }

    fn take_slots(&mut self, kva: &KvaSpace, pages: usize) -> Option<SlotRun> {
        if pages == 1 {
            loop {
                if let Some(s) = self.free_slots.pop() {
                    return Some(s);
                }
                if kva.take_batch(env::SLOT_BATCH, &mut self.free_slots) > 0 {
                    continue;
                }
                if !self.evict_one(kva) {
                    return None;
                }
            }
        }
        loop {
            if let Some(run) = kva.take(pages) {
                return Some(run);
            }
            // Our free singles may be what the run needs.
            if !self.free_slots.is_empty() {
                kva.give_batch(self.free_slots.drain(..));
                continue;
            }
            if !self.evict_one(kva) {
                return None;
            }
        }
    }

    /// Keep an unmapped claim: singles stay here, runs go back to the window.
    fn put_slots(&mut self, kva: &KvaSpace, run: SlotRun) {
        if run.len == 1 {
            self.free_slots.push(run);
            if self.free_slots.len() > 2 * env::SLOT_BATCH {
                let surplus = self.free_slots.len() - env::SLOT_BATCH;
                kva.give_batch(self.free_slots.drain(..surplus));
            }
        } else {
            kva.give(run);
        }
    }

    /// Drop one reference of the entry for `key`; at zero the entry stays
    /// mapped, on the clock. The caller trims afterwards. Panics if this CPU
    /// holds no reference on `key`.
    #[inline]
    pub(crate) fn decref(&mut self, key: Key) {
        let e = match self.map.get_mut(key) {
            Some(e) if e.refs > 0 => e,
            _ => self.no_reference(key),
        };
        e.refs -= 1;
        if e.refs == 0 {
            let queued = e.queued();
            e.set(if queued { REFERENCED } else { QUEUED }, true);
            self.unused += 1;
            if !queued {
                self.clock.push_back(key);
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn no_reference(&self, key: Key) -> ! {
        panic!("lwbuf: decref of {key:?} on CPU {}, which holds no reference on it", self.cpu)
    }

    /// Evict unused entries beyond `max_excess`, oldest first.
    #[inline]
    pub(crate) fn trim(&mut self, kva: &KvaSpace, max_excess: usize) {
        while self.unused > max_excess {
            if !self.evict_one(kva) {
                break;
            }
        }
    }

    /// Unmap the entry the clock hand picks and keep its slots. Returns
    /// false when there is none or the MMU refused (the entry then stays
    /// cached and mapped, and the failure is counted).
    fn evict_one(&mut self, kva: &KvaSpace) -> bool {
        let key = loop {
            let Some(key) = self.clock.pop_front() else { return false };
            let e = self.map.get_mut(key).expect("a queued entry is mapped");
            if e.refs > 0 {
                // In use: off the queue until its count drops to zero.
                e.set(QUEUED, false);
            } else if e.referenced() {
                e.set(REFERENCED, false);
                self.clock.push_back(key);
            } else {
                break key;
            }
        };
        let mapping = self.map.remove(key).expect("the picked entry is mapped");
        self.unused -= 1;
        // SAFETY: the entry's count is zero, so no handle holds it, and it is
        // out of the map, so no lookup can find it: nothing can reach the
        // address while it is unmapped.
        match unsafe { kva.unmap(mapping) } {
            Ok(run) => {
                self.c.evictions += 1;
                self.put_slots(kva, run);
                true
            }
            Err((err, mapping)) => {
                // Still mapped: put it back at the recent end, so the next
                // eviction tries another one first.
                self.map.insert(key, mapping, 0, QUEUED);
                self.unused += 1;
                self.clock.push_back(key);
                self.c.unmap_errors += 1;
                self.unmap_error = Some(err);
                false
            }
        }
    }

    /// The error of the last unmap the MMU refused, if any; clears it.
    pub(crate) fn take_unmap_error(&mut self) -> Option<Error> {
        self.unmap_error.take()
    }

    /// Evict every unused entry; every single free slot this CPU holds then
    /// goes to `freed` (runs go back to the window as they are evicted).
    pub(crate) fn shrink_into(&mut self, kva: &KvaSpace, freed: &mut Vec<SlotRun>) {
        while self.evict_one(kva) {}
        freed.append(&mut self.free_slots);
    }

    /// Keep `slot` (unmapped, claimed) for this CPU's next miss.
    pub(crate) fn keep_slot(&mut self, kva: &KvaSpace, slot: SlotRun) {
        self.put_slots(kva, slot);
    }

    /// Unmap everything, used or not (the system is going away and no handle
    /// can exist: they borrow it).
    pub(crate) fn teardown(&mut self, kva: &KvaSpace) {
        for mapping in self.map.drain() {
            // SAFETY: the system is being dropped; handles borrow it, so
            // none is alive and nothing can reach the address.
            if let Ok(run) = unsafe { kva.unmap(mapping) } {
                kva.give(run);
            }
            // Otherwise still mapped: the window unmaps everything when
            // dropped.
        }
        self.clock.clear();
        self.unused = 0;
        kva.give_batch(self.free_slots.drain(..));
    }
}

impl Miss {
    /// The error the caller sees.
    pub(crate) fn into_error(self) -> Error {
        match self {
            Miss::NoRoom(e) | Miss::Failed(e) => e,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::{ModelMmu, PhysMem};
    use std::sync::Arc;

    /// The per-frame index across leaves, runs beside single pages, slab
    /// reuse, and leaves freed when their last entry goes.
    #[test]
    fn entries_index_and_leaves() {
        let mem = PhysMem::builder().frames(4 * LEAF).backing(crate::Backing::Heap).build().unwrap();
        let kva = KvaSpace::new(Arc::new(ModelMmu::new(&mem, 64).unwrap()), None).unwrap();
        let mut es = Entries::default();
        let single = |pfn| Key { pfn, pages: 1 };
        let map = |kva: &KvaSpace, key: Key| {
            let run = kva.take(key.pages).unwrap();
            kva.map(run, Pfn(key.pfn)).map_err(|(e, _)| e).unwrap()
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
}
