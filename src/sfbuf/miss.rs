//! The miss and the eviction: mapping a frame anew into free slots, taking
//! slots from cached unused entries in clock order when none are free, and
//! trimming the inactive LRU to `max_excess`.
//!
//! # The race that matters: the evictor's half
//!
//! A lookup that finds an entry while another thread evicts it must never
//! return an address that is, or is about to be, unmapped or remapped. The
//! hitter takes its reference inside the map's read lock (`hit.rs`, 1);
//! then:
//!
//! 2. An eviction kills an entry (CAS `refs == 0` to `DEAD`) and removes it
//!    from the map *in one step under the same shard's write lock*
//!    (`remove_if`). So a hit either bumped the count first (the kill's CAS
//!    then fails and the entry lives) or runs after the removal (it misses
//!    and maps the frame anew elsewhere). It can never bump a dead entry.
//! 3. The unmap happens after the removal, outside any lock: by then no
//!    lookup can find the entry and its count is zero, so no handle holds
//!    its address. Its slots go back to the allocator only after the unmap
//!    returns (the `SlotRun`/`Mapping` types of `kva` enforce that order).
//! 4. A new mapping is fully written (mapping, address, count 1) before it
//!    is inserted into the map under the write lock, which publishes it.
//!
//! # The evictor and pins
//!
//! 10. An evictor that finds an entry with a count of zero and no `PINNED`
//!     judges it as before: no pin can be out (taking one first changes the
//!     state, which fails the evictor's CAS; `hit.rs`, 9). With `PINNED`,
//!     it sets `REVOKED` (no new pins), issues the heavy barrier
//!     (`membarrier`: the pair of `src/cpu/owned.rs`) and sums the pins.
//!     Either it sees a hitter's pin, or that hitter's second read sees
//!     `REVOKED` and it backs off: no pin is missed, so an entry is killed
//!     only with no reference of either kind. A pinned entry is taken off
//!     the LRU as an entry in use is, and counted again after a second
//!     heavy barrier, as is an entry in use through its count with
//!     `PINNED` set (`handle.rs`, 11-12);
//!     `REVOKED` and `PINNED` are cleared when a look finds it unused
//!     (second chance), so a cold entry's eviction costs no `membarrier`.
//!
//! The loom model `sfbuf_hit_vs_eviction` fails when the evictor kills
//! without re-checking the count (`EvictNoRecheck`, against 2), and
//! `sfbuf_pin_vs_eviction` when it ignores pins (`PinUnchecked`, 10).
//!
//! # When a look may give up
//!
//! 13. An evictor pops the entry it looks at off the LRU, so while it looks
//!     every other evictor sees a shorter LRU (an empty one, if that entry
//!     was the only one), and it may push the entry back (a second chance,
//!     or a relisted pinned entry). A trim stops on what it sees, so the
//!     evictor that hid an entry from it must not leave that entry cached
//!     over the cap; and a miss must not report no room while an unused
//!     entry is listed. `evict_one` stops after a number of looks (against
//!     entries that keep being used), taken from a relaxed and possibly
//!     stale read of the LRU's length; when they run out, it goes on with
//!     a fresh number as long as an unused entry (listed, no reference of
//!     either kind) is left. Each further look pops a real entry and the
//!     look ends at an empty LRU, so nothing spins on another thread. So
//!     `evict_one` returns nothing only at an empty LRU (every listed
//!     entry is being looked at by other evictors, each of which then owns
//!     the entry it hid: evicted for itself, or given up under this same
//!     rule) or with no unused entry listed (nothing cached to trim). A
//!     miss then reports no room; a trim stops. An entry it gave a second
//!     chance is evicted by the same call, which leaves the LRU as short
//!     as a trim that ran during its look saw it.
//!
//! The unit test `a_miss_looks_again_when_its_looks_run_short` stages a
//! stale length. Every pin model checks at its end that at most
//! `max_excess` unused entries are cached; `sfbuf_stale_pin_reuse`, where
//! a miss races a pinned hit and a trim, fails with the old exit
//! (`LooksRunShort`).

use std::ptr::NonNull;

use super::entry::Entry;
use super::state::Look;
use super::SfPool;
use crate::error::Result;
use crate::kva::{MapKey, Mapping, SlotRun};
use crate::phys::Pfn;
use crate::sync::barrier;
use crate::sync::{lock, Ordering};

/// What the evictor decided about an LRU entry.
enum Verdict {
    Evict,
    SecondChance,
    InUse,
    /// Taken off the LRU as in use, then found unused: back on it.
    Relist,
}

// === the miss ===

impl SfPool {
    /// One attempt at a miss: `Ok(None)` when there is no room now (the
    /// caller may wait), `Err` for a failure that waiting will not cure.
    pub(super) fn try_miss(&self, key: MapKey) -> Result<Option<(u32, NonNull<u8>)>> {
        // Someone may have mapped it since we looked.
        if let Some(v) = self.try_hit(key) {
            self.counters.hits.inc();
            return Ok(Some(v));
        }
        let Some(run) = self.take_slots(key.pages)? else { return Ok(None) };
        let m = match self.kva.map(run, Pfn(key.pfn), key.pages) {
            Ok(m) => m,
            Err((e, run)) => {
                self.give_slots(run);
                if Mapping::no_room(&e) {
                    // Budget or kernel wall: evict a cached mapping and let
                    // the caller retry; with none left, report it.
                    if let Some(run) = self.evict_one()? {
                        self.give_slots(run);
                        return self.try_miss(key);
                    }
                    return Err(e);
                }
                return Err(e);
            }
        };
        let slot = m.slot().0 as u32;
        let e = &self.entries[slot as usize];
        let addr = m.addr();
        // Written before the generation starts (4; `hit.rs`, 7).
        e.pfn.store(key.pfn, Ordering::Relaxed);
        e.pages.store(key.pages, Ordering::Relaxed);
        e.addr.store(addr.as_ptr(), Ordering::Relaxed);
        // SAFETY: the slot was free (ours from `take_slots`), so no other
        // thread can reach this entry until we publish it below.
        e.mapping.with_mut(|p| unsafe { *p = Some(m) });
        let live = e.state.start_mapped();
        match self.map.insert_or_with(key, slot, |&other| {
            if self.entries[other as usize].bump().0 {
                self.counters.used.inc();
            }
            other
        }) {
            None => {
                // In the map: hint readers may take it from now on.
                e.state.publish();
                self.set_hint(key, slot, live);
                self.counters.misses.inc();
                self.counters.grows.inc();
                self.counters.used.inc();
                // The stripes are read one by one while other threads move
                // them, so the sum can be off by the operations in flight,
                // below zero included (it wraps): never record that.
                let used = self.counters.used.get();
                if used <= self.entries.len() as u64 {
                    self.peak.fetch_max(used, Ordering::Relaxed);
                }
                Ok(Some((slot, addr)))
            }
            Some(other) => {
                // Lost the race to map this frame: use theirs, undo ours.
                self.counters.lost_races.inc();
                self.counters.hits.inc();
                e.state.abandon(live);
                // SAFETY: never published, so ours alone.
                let m = e.mapping.with_mut(|p| unsafe { (*p).take() }).expect("just stored");
                self.unmap_and_free(m);
                Ok(Some((other, self.addr_of(&self.entries[other as usize]))))
            }
        }
    }

    /// Adjacent free slots for `pages` frames (whole granules): free ones,
    /// or by evicting cached entries. `Ok(None)`: nothing left to evict;
    /// `Err`: an unmap failed.
    fn take_slots(&self, pages: usize) -> Result<Option<SlotRun>> {
        let n = self.kva.slots_for(pages);
        loop {
            if let Some(run) = self.kva.take(pages) {
                return Ok(Some(run));
            }
            let Some(freed) = self.evict_one()? else {
                // Room may be there behind a batch remove the MMU refused.
                return match self.kva.take_purge_error() {
                    Some(e) => Err(e),
                    None => Ok(None),
                };
            };
            if freed.len == n {
                return Ok(Some(freed));
            }
            self.give_slots(freed);
        }
    }

    pub(super) fn give_slots(&self, run: SlotRun) {
        self.kva.give(run);
        self.waitq.wake();
    }

    fn unmap_and_free(&self, m: Mapping) {
        // SAFETY: callers pass a mapping no handle or lookup can reach.
        match unsafe { self.kva.unmap(m) } {
            Ok(run) => self.give_slots(run),
            Err((_, m)) => {
                // Keep the slots out of circulation rather than reuse a slot
                // that is still mapped; the next trim tries again.
                self.counters.unmap_errors.inc();
                lock(&self.stale).push(m);
            }
        }
    }
}

// === the eviction ===

impl SfPool {
    /// Evict one cached unused entry (clock order: entries used since the
    /// last pass get a second chance). Returns its slots, unmapped;
    /// `Ok(None)` if the LRU is empty or holds no unused entry (13); `Err`
    /// if the MMU refused the unmap (the entry then stays cached, and the
    /// failure is counted).
    pub(super) fn evict_one(&self) -> Result<Option<SlotRun>> {
        let looks = || 2 * self.lru_len.load(Ordering::Relaxed) + 2;
        let mut budget = looks();
        loop {
            if budget == 0 {
                // Out of looks: go on while an unused entry is listed (13).
                if crate::sync::mutant!(LooksRunShort) || self.evictable() == 0 {
                    return Ok(None);
                }
                budget = looks();
            }
            budget -= 1;
            let slot = {
                let mut l = lock(&self.lru);
                let s = l.pop_front();
                self.lru_len.store(l.len(), Ordering::Relaxed);
                match s {
                    Some(s) => s,
                    None => return Ok(None),
                }
            };
            let e = &self.entries[slot];
            let key = e.key();
            let mut verdict = Verdict::InUse;
            let removed = self.map.remove_if(&key, |&s| {
                debug_assert_eq!(s as usize, slot, "map and entry disagree");
                verdict = self.judge(slot, e);
                matches!(verdict, Verdict::Evict)
            });
            match verdict {
                Verdict::Evict => {
                    debug_assert!(removed);
                    // SAFETY: the entry is dead and out of the map (one step
                    // under the shard lock, 2), so nobody else can reach it.
                    let m = e.mapping.with_mut(|p| unsafe { (*p).take() }).expect("live entry has a mapping");
                    // SAFETY: no handle holds it (count was 0) and no lookup
                    // can find it (removed): 3. Under lazy reclaim the old
                    // pages stay entered until the slots are mapped over.
                    match unsafe { self.kva.retire(m) } {
                        Ok(run) => {
                            // The state stays DEAD (with the generation that
                            // died) until the slot is published again.
                            self.counters.evictions.inc();
                            self.counters.evicted_pages.add(key.pages as u64);
                            return Ok(Some(run));
                        }
                        Err((err, m)) => {
                            self.counters.unmap_errors.inc();
                            self.revive(slot, key, m);
                            return Err(err);
                        }
                    }
                }
                Verdict::SecondChance | Verdict::Relist => self.push_lru(slot),
                Verdict::InUse => {}
            }
        }
    }

    /// A killed entry whose unmap failed: still mapped, bring it back as a
    /// cached entry, published as a new one is (state, then insert: 4).
    fn revive(&self, slot: usize, key: MapKey, m: Mapping) {
        let e = &self.entries[slot];
        // SAFETY: dead and unreachable, ours alone.
        e.mapping.with_mut(|p| unsafe { *p = Some(m) });
        let back = e.state.start_revived();
        if self.map.insert_or_with(key, slot as u32, |_| ()).is_none() {
            e.state.publish();
            self.push_lru(slot);
        } else {
            // A miss mapped the frame again meanwhile: this entry must not
            // shadow it (on the LRU it would be judged under the other
            // entry's key).
            e.state.abandon(back);
            // SAFETY: never republished, still ours alone.
            let m = e.mapping.with_mut(|p| unsafe { (*p).take() }).expect("just stored");
            lock(&self.stale).push(m);
        }
    }

    /// Decide an LRU entry's fate under its shard's write lock (2, 10). An
    /// entry nobody holds through its own count may still be held through
    /// pins: stop new pins (REVOKED), make every thread's pin visible
    /// (heavy barrier, against the light one in `try_pin`), and count them.
    fn judge(&self, slot: usize, e: &Entry) -> Verdict {
        let pinned = || !crate::sync::mutant!(PinUnchecked) && self.pinned(slot) != 0;
        match e.state.look(barrier::heavy, pinned) {
            Look::Evict => Verdict::Evict,
            Look::SecondChance => Verdict::SecondChance,
            Look::InUse => Verdict::InUse,
            Look::Unlisted => self.after_unlisting(slot, e),
        }
    }

    /// The evictor's half of the race with a last pinned release (see
    /// `after_release`; `handle.rs`, 11-12): having taken the entry off the
    /// LRU, issue the heavy barrier, and if the pins are gone meanwhile, put
    /// it back (unless that release did).
    fn after_unlisting(&self, slot: usize, e: &Entry) -> Verdict {
        // Heavy: a pinned release's barrier is the light one (`handle.rs`,
        // 12).
        if !crate::sync::mutant!(UnlistLight) {
            barrier::heavy();
        }
        if crate::sync::mutant!(UnlistNoRecount) || self.pinned(slot) != 0 {
            return Verdict::InUse;
        }
        if e.state.relist_unused() {
            Verdict::Relist
        } else {
            Verdict::InUse
        }
    }

    pub(super) fn push_lru(&self, slot: usize) {
        let mut l = lock(&self.lru);
        l.push_back(slot);
        self.lru_len.store(l.len(), Ordering::Relaxed);
    }

    /// Evict until the LRU (an upper bound on unused entries) is within
    /// `max_excess`.
    pub(super) fn trim(&self) {
        self.retry_stale();
        while self.lru_len.load(Ordering::Relaxed) > self.max_excess() {
            match self.evict_one() {
                Ok(Some(run)) => self.give_slots(run),
                Ok(None) => {
                    // Only in-use entries were left to look at: re-check the
                    // length and stop if nothing moved.
                    if self.lru_len.load(Ordering::Relaxed) > self.max_excess() && self.evictable() == 0 {
                        break;
                    }
                }
                // The MMU refused an unmap (counted; the entry stays cached):
                // retrying now would spin if it keeps refusing. The next
                // trim tries again.
                Err(_) => break,
            }
        }
    }

    /// Try again to unmap the mappings whose unmap failed before.
    fn retry_stale(&self) {
        let stale = {
            let mut g = lock(&self.stale);
            if g.is_empty() {
                return;
            }
            std::mem::take(&mut *g)
        };
        for m in stale {
            // SAFETY: stale mappings are out of the map and held by no
            // handle: nothing can reach them.
            match unsafe { self.kva.unmap(m) } {
                Ok(run) => self.give_slots(run),
                Err((_, m)) => {
                    self.counters.unmap_errors.inc();
                    lock(&self.stale).push(m);
                }
            }
        }
    }

    /// Unused entries on the LRU now: a scan, for the rare exits of `trim`
    /// and of `evict_one` (13). Behind the heavy barrier, so that the pins
    /// it reads include those of every pinned release that read the LRU's
    /// length behind only the light barrier (`handle.rs`, 12): such a
    /// release saw the LRU within its cap and trimmed nothing, and a scan
    /// that still saw its pin would stop with the LRU over the cap.
    fn evictable(&self) -> usize {
        barrier::heavy();
        self.entries
            .iter()
            .enumerate()
            .filter(|(slot, e)| e.state.load(Ordering::Relaxed).is_cached_unused() && self.pinned(*slot) == 0)
            .count()
    }
}
