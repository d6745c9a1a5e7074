//! One CPU's lwbuf cache (`lwbuf_pcpu`): the owner's state and the mailbox
//! other CPUs post to. Its entries are indexed by `index.rs`.
//!
//! [`Local`] is the owner's: `frame -> {slot, refcnt}`, the clock of
//! entries whose count is zero (still mapped, so the next alloc is a hit),
//! and the slots this CPU took from the shared allocator. It sits behind a mutex that
//! only its owner takes in the common case (uncontended: one CAS, no shared
//! cache line); the mutex exists so that a CPU whose thread is idle or gone
//! can be drained and trimmed on its behalf. [`Pcpu::mailbox`] is the shared
//! part: decref messages from other CPUs.

use std::collections::VecDeque;
use std::ptr::NonNull;

use crate::cpu::Mailbox;
use crate::cpu::Owned;
use crate::error::Error;
pub(crate) use crate::kva::MapKey as Key;
use crate::kva::{KvaSpace, Mapping, SlotRun};

use super::index::{Entries, NOT_INDEXED, QUEUED, REFERENCED};
use crate::phys::Pfn;
use crate::sync::{env, AtomicU64};

// Replacement is a clock over release order (second chance): an entry joins
// the back of the queue when its count first drops to zero; a hit does not
// move it (so a hit and its release touch nothing but the entry and the
// cache's own fields), and a release of an entry still queued only marks it
// referenced. The eviction hand pops the front, drops used entries
// from the queue, sends a marked one to the back with its mark cleared, and
// evicts the first unmarked unused one. Without re-use this is exactly LRU;
// with it, an entry used since it was queued gets one more trip round.
// A release of the entry at the back of the queue (nothing released since
// it was queued) marks nothing: it has the most recent place already.
// Otherwise the pages of a granule read in turn (G releases of its entry)
// would mark it, and with few entries cached the hand would spare it and
// evict the granule mapped after it, which then maps again at its next
// page (`benches/granule.rs` showed two maps per granule at
// `max_excess(1)`).

/// No key: what `Local::newest` holds before anything is queued.
const NO_KEY: Key = Key { pfn: usize::MAX, pages: 0 };

/// Counters kept by the owner (under the cache lock).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) foreign: u64,
    pub(crate) applied: u64,
    pub(crate) evictions: u64,
    pub(crate) evicted_pages: u64,
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
    /// The key last put at the back of `clock` (`NO_KEY` before any): a
    /// queued entry with this key is the newest on the queue, known
    /// without reading the queue on the release path.
    newest: Key,
    /// `newest`'s index (see `Entries::index_of`): a release that knows
    /// its entry's index compares it instead of the key.
    newest_index: usize,
    /// Entries with a count of zero.
    unused: usize,
    /// Unmapped single granules this CPU holds for its next misses.
    free_slots: Vec<SlotRun>,
    /// The mailbox's spare vector, swapped in at each drain.
    spare: Vec<Key>,
    /// The error of the last unmap the MMU refused during the current miss,
    /// so that a miss that found nothing it could evict reports it rather
    /// than a full window.
    unmap_error: Option<Error>,
    pub(crate) counters: Counters,
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
    /// CPU `cpu`'s cache, for a window whose granule is `1 << shift` frames.
    pub(crate) fn new(cpu: usize, shift: u32) -> Self {
        Pcpu { local: Owned::new(Local::new(cpu, shift)), mailbox: Mailbox::default(), sent: AtomicU64::new(0) }
    }
}

impl Local {
    fn new(cpu: usize, shift: u32) -> Self {
        Local {
            cpu,
            map: Entries::new(shift),
            clock: VecDeque::new(),
            newest: NO_KEY,
            newest_index: NOT_INDEXED,
            unused: 0,
            free_slots: Vec::new(),
            spare: Vec::new(),
            unmap_error: None,
            counters: Counters::default(),
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

    /// Slots held unmapped (whole granules).
    pub(crate) fn free_slot_count(&self) -> usize {
        self.free_slots.iter().map(|r| r.len).sum()
    }

    /// The frames mapped here with their first slot, the slots they hold
    /// and their counts (for checks).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (Key, crate::mmu::Slot, usize, u32)> + '_ {
        self.map.iter().map(|(k, m, refs)| (k, m.slot(), m.slots(), refs))
    }

    /// Apply every message in the mailbox, then enforce the excess limit.
    #[cold]
    pub(crate) fn drain(&mut self, mailbox: &Mailbox<Key>, kva: &KvaSpace, max_excess: usize) {
        let mut msgs = std::mem::take(&mut self.spare);
        mailbox.take_all(&mut msgs);
        for key in msgs.drain(..) {
            self.counters.applied += 1;
            self.decref(key);
        }
        self.spare = msgs;
        self.trim(kva, max_excess);
    }

    /// Find or create the entry for `key`, take a reference, and return its
    /// address. A hit makes no system call and no allocation, and touches
    /// only the index (where the entry lives). `index` is `key`'s place in
    /// the index ([`index_of`](Self::index_of)), which the caller may know
    /// without computing the key.
    #[inline(always)]
    pub(crate) fn acquire(
        &mut self,
        kva: &KvaSpace,
        index: usize,
        key: impl Fn() -> Key,
    ) -> std::result::Result<NonNull<u8>, Miss> {
        if let Some(e) = self.map.at_mut(index, &key) {
            e.refs = e.refs.checked_add(1).expect("lwbuf: entry reference count overflow");
            let (addr, first) = (e.addr.expect("a present entry has an address"), e.refs == 1);
            if first {
                self.unused -= 1;
            }
            self.counters.hits += 1;
            return Ok(addr);
        }
        self.acquire_miss(kva, key())
    }

    /// Where `key`'s entry is (or would be) in this CPU's index: handles
    /// keep it for their release.
    #[inline]
    pub(crate) fn index_of(&self, key: Key) -> usize {
        self.map.index_of(key)
    }

    /// Counted (an alloc, a miss) only when it succeeds: an attempt that
    /// finds no room is retried after reclaiming other CPUs' caches, and
    /// one call must count once.
    #[cold]
    #[inline(never)]
    fn acquire_miss(&mut self, kva: &KvaSpace, key: Key) -> std::result::Result<NonNull<u8>, Miss> {
        let mapping = self.map_new(kva, key)?;
        self.counters.misses += 1;
        let addr = mapping.addr();
        self.map.insert(key, mapping, 1, 0);
        self.counters.peak_mapped = self.counters.peak_mapped.max(self.map.len() as u64);
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
                let refused = self.unmap_error.take().or_else(|| kva.take_purge_error());
                return Err(Miss::NoRoom(refused.unwrap_or(full)));
            };
            match kva.map(run, Pfn(key.pfn), key.pages) {
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
        if pages <= kva.granule() {
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

    /// Keep an unmapped claim: single granules stay here, runs go back to
    /// the window.
    fn put_slots(&mut self, kva: &KvaSpace, run: SlotRun) {
        if run.len == kva.granule() {
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
        self.decref_at(self.map.index_of(key), || key);
    }

    /// [`decref`](Self::decref) of the entry at `index` (`key`'s, called
    /// only for a run or when the entry joins the clock), then the excess
    /// limit: a release on the entry's own CPU.
    #[inline(always)]
    pub(crate) fn release(&mut self, kva: &KvaSpace, max_excess: usize, index: usize, key: impl Fn() -> Key) {
        self.decref_at(index, key);
        if self.unused > max_excess {
            self.trim_cold(kva, max_excess);
        }
    }

    /// The common release, or nothing: on a per-frame entry (`index` from
    /// the table) with more than one reference, or with one on an entry
    /// still on the clock (a cached entry hit again) while the unused
    /// entries stay within `max_excess`, drop the reference as `release`
    /// would and return true; in every other case change nothing and
    /// return false (the caller then takes `release`).
    #[inline(always)]
    pub(crate) fn release_fast(&mut self, index: usize, max_excess: usize) -> bool {
        let (unused, newest) = (self.unused, self.newest_index);
        if index == NOT_INDEXED || unused >= max_excess {
            return false;
        }
        let Some(e) = self.map.at_mut(index, || unreachable!("a table index")) else { return false };
        match e.refs {
            0 => false,
            1 if !e.queued() => false,
            1 => {
                e.refs = 0;
                if index != newest {
                    // Used again since others were released: spare it once.
                    e.set(REFERENCED, true);
                }
                self.unused = unused + 1;
                true
            }
            _ => {
                e.refs -= 1;
                true
            }
        }
    }

    /// The work of `decref` and `release`.
    #[inline(always)]
    fn decref_at(&mut self, index: usize, key: impl Fn() -> Key) {
        let e = match self.map.at_mut(index, &key) {
            Some(e) if e.refs > 0 => e,
            _ => self.no_reference(key()),
        };
        e.refs -= 1;
        if e.refs != 0 {
            return;
        }
        if !e.queued() {
            e.set(QUEUED, true);
            self.queue_new(key());
        } else if if index == NOT_INDEXED { key() != self.newest } else { index != self.newest_index } {
            // Used again since others were released: spare it once.
            e.set(REFERENCED, true);
        }
        self.unused += 1;
    }

    /// [`queue`](Self::queue) for a release: out of the hit path (an
    /// entry joins the queue once, then stays until the clock hand passes).
    #[cold]
    #[inline(never)]
    fn queue_new(&mut self, key: Key) {
        self.queue(key);
    }

    /// Put `key` at the back of the clock queue.
    #[inline]
    fn queue(&mut self, key: Key) {
        self.clock.push_back(key);
        self.newest = key;
        self.newest_index = self.map.index_of(key);
    }

    #[cold]
    #[inline(never)]
    fn no_reference(&self, key: Key) -> ! {
        panic!("lwbuf: decref of {key:?} on CPU {}, which holds no reference on it", self.cpu)
    }

    /// [`trim`](Self::trim), out of the release path.
    #[cold]
    #[inline(never)]
    fn trim_cold(&mut self, kva: &KvaSpace, max_excess: usize) {
        self.trim(kva, max_excess);
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
                self.queue(key);
            } else {
                break key;
            }
        };
        let mapping = self.map.remove(key).expect("the picked entry is mapped");
        self.unused -= 1;
        // SAFETY: the entry's count is zero, so no handle holds it, and it is
        // out of the map, so no lookup can find it: nothing can reach the
        // address while it is unmapped (or, under lazy reclaim, replaced).
        match unsafe { kva.retire(mapping) } {
            Ok(run) => {
                self.counters.evictions += 1;
                self.counters.evicted_pages += key.pages as u64;
                self.put_slots(kva, run);
                true
            }
            Err((err, mapping)) => {
                // Still mapped: put it back at the recent end, so the next
                // eviction tries another one first.
                self.map.insert(key, mapping, 0, QUEUED);
                self.unused += 1;
                self.queue(key);
                self.counters.unmap_errors += 1;
                self.unmap_error = Some(err);
                false
            }
        }
    }

    /// The error of the last unmap the MMU refused, if any; clears it.
    pub(crate) fn take_unmap_error(&mut self) -> Option<Error> {
        self.unmap_error.take()
    }

    /// Evict every unused entry; every single free granule this CPU holds then
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
        self.newest = NO_KEY;
        self.newest_index = NOT_INDEXED;
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
