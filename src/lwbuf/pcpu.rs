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

/// A mapped frame (or run) on one CPU: a hit and its release touch one
/// line of per-frame state.
#[derive(Debug)]
struct Entry {
    key: Key,
    mapping: Mapping,
    refs: u32,
    /// On the clock queue. Every unused entry is (`refs == 0` implies
    /// `queued`); used ones may be, until the clock hand passes them.
    queued: bool,
    /// Released again since the clock hand last saw it: spared once.
    referenced: bool,
}

/// Frames per leaf of [`Entries`]' per-frame index (a 4 KiB leaf).
const LEAF: usize = 1024;

/// One CPU's entries: a slab, found by frame number through a two-level
/// table (single pages: two loads and no hashing, like a page table) or by
/// key in a hash map (runs). A handle keeps its home entry's slab index, so
/// its release finds the entry with no lookup at all. The table costs 4
/// bytes per frame in 4 KiB leaves, each made when the CPU maps a frame of
/// its 1024-frame range and freed when the last such entry goes, so memory
/// follows what the CPU has mapped now, not what it ever mapped.
#[derive(Default)]
struct Entries {
    slab: Vec<Option<Entry>>,
    /// Free slab indexes.
    free: Vec<u32>,
    /// `pfn / LEAF` -> leaf.
    leaves: Vec<Option<Box<Leaf>>>,
    runs: WordMap<Key, u32>,
    len: usize,
}

/// Slab indexes of 1024 consecutive frames.
struct Leaf {
    /// `slab index + 1` per frame, or 0 for none.
    idx: [u32; LEAF],
    /// Non-zero elements of `idx`.
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
    /// The slab index of `key`'s entry.
    #[inline]
    fn find(&self, key: Key) -> Option<u32> {
        if key.pages == 1 {
            let leaf = self.leaves.get(key.pfn / LEAF)?.as_deref()?;
            leaf.idx[key.pfn % LEAF].checked_sub(1)
        } else {
            self.runs.get(&key).copied()
        }
    }

    /// The entry at slab index `i`; panics if there is none.
    #[inline]
    fn at(&mut self, i: u32) -> &mut Entry {
        self.slab[i as usize].as_mut().expect("lwbuf: slab index of a removed entry")
    }

    #[inline]
    fn get_mut(&mut self, key: Key) -> Option<&mut Entry> {
        let i = self.find(key)?;
        Some(self.at(i))
    }

    /// Add `e` (whose key is not present); returns its slab index.
    fn insert(&mut self, e: Entry) -> u32 {
        let key = e.key;
        let i = match self.free.pop() {
            Some(i) => {
                self.slab[i as usize] = Some(e);
                i
            }
            None => {
                // Below u32::MAX: leaves store `i + 1`.
                let i = u32::try_from(self.slab.len())
                    .ok()
                    .filter(|&i| i < u32::MAX)
                    .expect("lwbuf: more than 2^32 - 1 entries on one CPU");
                self.slab.push(Some(e));
                i
            }
        };
        if key.pages == 1 {
            let at = key.pfn / LEAF;
            if self.leaves.len() <= at {
                self.leaves.resize_with(at + 1, || None);
            }
            let leaf = self.leaves[at].get_or_insert_with(|| Box::new(Leaf { idx: [0; LEAF], live: 0 }));
            debug_assert_eq!(leaf.idx[key.pfn % LEAF], 0, "{key:?} inserted twice");
            leaf.idx[key.pfn % LEAF] = i + 1;
            leaf.live += 1;
        } else {
            self.runs.insert(key, i);
        }
        self.len += 1;
        i
    }

    /// Take `key`'s entry out.
    fn remove(&mut self, key: Key) -> Option<Entry> {
        let i = if key.pages == 1 {
            let at = key.pfn / LEAF;
            let leaf = self.leaves.get_mut(at)?.as_deref_mut()?;
            let i = std::mem::take(&mut leaf.idx[key.pfn % LEAF]).checked_sub(1)?;
            leaf.live -= 1;
            if leaf.live == 0 {
                self.leaves[at] = None;
            }
            i
        } else {
            self.runs.remove(&key)?
        };
        self.len -= 1;
        self.free.push(i);
        self.slab[i as usize].take()
    }

    fn len(&self) -> usize {
        self.len
    }

    fn iter(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.slab.iter().flatten()
    }

    /// Take every entry out (and free the index).
    fn drain(&mut self) -> Vec<Entry> {
        let all = self.slab.drain(..).flatten().collect();
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
        self.map.iter().map(|e| (e.key, e.mapping.slot(), e.refs))
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
    /// address and slab index (for [`decref_at`](Self::decref_at)). A hit
    /// makes no system call and no allocation, and touches only the index
    /// and the entry.
    #[inline]
    pub(crate) fn acquire(&mut self, kva: &KvaSpace, key: Key) -> std::result::Result<(NonNull<u8>, u32), Miss> {
        if let Some(i) = self.map.find(key) {
            let e = self.map.at(i);
            e.refs = e.refs.checked_add(1).expect("lwbuf: entry reference count overflow");
            let addr = e.mapping.addr();
            if e.refs == 1 {
                self.unused -= 1;
            }
            self.c.hits += 1;
            return Ok((addr, i));
        }
        self.acquire_miss(kva, key)
    }

    /// Counted (an alloc, a miss) only when it succeeds: an attempt that
    /// finds no room is retried after reclaiming other CPUs' caches, and
    /// one call must count once.
    #[cold]
    fn acquire_miss(&mut self, kva: &KvaSpace, key: Key) -> std::result::Result<(NonNull<u8>, u32), Miss> {
        let mapping = self.map_new(kva, key)?;
        self.c.misses += 1;
        let addr = mapping.addr();
        let i = self.map.insert(Entry { key, mapping, refs: 1, queued: false, referenced: false });
        self.c.peak_mapped = self.c.peak_mapped.max(self.map.len() as u64);
        Ok((addr, i))
    }

    /// The address of the entry for `key`, which the caller holds a
    /// reference on.
    pub(crate) fn addr_of(&mut self, key: Key) -> NonNull<u8> {
        let i = self.map.find(key).expect("lwbuf: address of an entry this CPU does not hold");
        self.map.at(i).mapping.addr()
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
    /// mapped, on the clock. The caller trims afterwards.
    #[inline]
    pub(crate) fn decref(&mut self, key: Key) {
        match self.map.find(key) {
            Some(i) => self.decref_at(i, key),
            None => self.no_reference(key),
        }
    }

    /// [`decref`](Self::decref) of the entry at slab index `i`, which the
    /// caller got from [`acquire`](Self::acquire) for `key` and holds a
    /// reference on (checked: a mismatch panics, it never touches another
    /// entry's count).
    #[inline]
    pub(crate) fn decref_at(&mut self, i: u32, key: Key) {
        let e = match self.map.slab.get_mut(i as usize) {
            Some(Some(e)) if e.key == key && e.refs > 0 => e,
            _ => self.no_reference(key),
        };
        e.refs -= 1;
        if e.refs == 0 {
            self.unused += 1;
            if e.queued {
                e.referenced = true;
            } else {
                e.queued = true;
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
                e.queued = false;
            } else if e.referenced {
                e.referenced = false;
                self.clock.push_back(key);
            } else {
                break key;
            }
        };
        let e = self.map.remove(key).expect("the picked entry is mapped");
        self.unused -= 1;
        // SAFETY: the entry's count is zero, so no handle holds it, and it is
        // out of the map, so no lookup can find it: nothing can reach the
        // address while it is unmapped.
        match unsafe { kva.unmap(e.mapping) } {
            Ok(run) => {
                self.c.evictions += 1;
                self.put_slots(kva, run);
                true
            }
            Err((err, mapping)) => {
                // Still mapped: put it back at the recent end, so the next
                // eviction tries another one first.
                self.map.insert(Entry { key, mapping, refs: 0, queued: true, referenced: false });
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

    /// Evict every unused entry and give every free slot back to the
    /// window. Returns the number of slots given back.
    pub(crate) fn shrink(&mut self, kva: &KvaSpace) -> usize {
        let before = kva.free_slots();
        while self.evict_one(kva) {}
        kva.give_batch(self.free_slots.drain(..));
        kva.free_slots().saturating_sub(before)
    }

    /// Unmap everything, used or not (the system is going away and no handle
    /// can exist: they borrow it).
    pub(crate) fn teardown(&mut self, kva: &KvaSpace) {
        for e in self.map.drain() {
            // SAFETY: the system is being dropped; handles borrow it, so
            // none is alive and nothing can reach the address.
            if let Ok(run) = unsafe { kva.unmap(e.mapping) } {
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
        let kva = KvaSpace::new(Arc::new(ModelMmu::new(&mem, 64).unwrap()), None);
        let mut es = Entries::default();
        let single = |pfn| Key { pfn, pages: 1 };
        let entry = |kva: &KvaSpace, key: Key| {
            let run = kva.take(key.pages).unwrap();
            let mapping = kva.map(run, Pfn(key.pfn)).map_err(|(e, _)| e).unwrap();
            Entry { key, mapping, refs: 0, queued: false, referenced: false }
        };
        let keys = [single(0), single(LEAF - 1), single(LEAF), single(3 * LEAF + 5), Key { pfn: 0, pages: 4 }];
        let idx: Vec<u32> = keys.iter().map(|&k| es.insert(entry(&kva, k))).collect();
        assert_eq!(es.len(), keys.len());
        for (k, i) in keys.iter().zip(&idx) {
            assert_eq!(es.find(*k), Some(*i), "{k:?}");
            assert_eq!(es.at(*i).key, *k);
        }
        assert_eq!(es.find(single(1)), None);
        assert_eq!(es.find(single(100 * LEAF)), None, "beyond the table");
        assert_eq!(es.find(Key { pfn: 0, pages: 2 }), None, "runs are keyed by length");
        assert_eq!(es.leaves.iter().flatten().count(), 3);

        let free = |kva: &KvaSpace, e: Entry| {
            // SAFETY: the test made this mapping and nothing refers to it.
            kva.give(unsafe { kva.unmap(e.mapping) }.map_err(|(e, _)| e).unwrap());
        };
        // Leaf 0 holds two frames: it stays until both are gone.
        free(&kva, es.remove(single(0)).unwrap());
        assert_eq!(es.leaves.iter().flatten().count(), 3);
        assert!(es.remove(single(0)).is_none(), "removed once");
        free(&kva, es.remove(single(LEAF - 1)).unwrap());
        assert_eq!(es.leaves.iter().flatten().count(), 2, "an empty leaf is freed");
        // A freed slab index is reused.
        let again = es.insert(entry(&kva, single(7)));
        assert!(idx[..2].contains(&again));
        assert_eq!(es.find(single(7)), Some(again));
        assert_eq!(es.find(Key { pfn: 0, pages: 4 }), Some(idx[4]));
        assert_eq!(es.iter().count(), 4);
        for e in es.drain() {
            free(&kva, e);
        }
        assert_eq!((es.len(), es.leaves.len(), es.iter().count()), (0, 0, 0));
        assert!(format!("{es:?}").len() < 200, "Debug stays short");
    }
}
