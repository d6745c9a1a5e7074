//! The hit paths: a frame already cached is served without a system call,
//! by one of three ways, cheapest first: a *pin* in the calling thread's
//! row (no shared line written), the *hint* (one CAS on the entry, no
//! lock), or the *map* (under the shard's read lock: the fallback and the
//! authority).
//!
//! # The race that matters: the hitter's half
//!
//! A lookup that finds an entry while another thread evicts it must never
//! return an address that is, or is about to be, unmapped or remapped
//! (the evictor's half is `miss.rs`, 2-4).
//!
//! 1. A hit takes its reference (CAS `refs + 1`) *inside* the map's read
//!    lock for the key's shard, and only on an entry the map points at.
//!
//! # The lock-free hit
//!
//! Every publication starts a new generation of the slot (`state.rs`, 5).
//!
//! 6. After a successful insert, the publisher records the hint `(slot,
//!    generation)` in the frame's bucket of the hint table (`hint.rs`):
//!    buckets in proportion to the window's slots, never to the memory's
//!    frames, two hints a bucket, each tagged with high bits of its frame
//!    number. A hint is only ever a true statement about the past:
//!    "generation g of slot s was published for a frame of this bucket and
//!    tag", for this very frame when the table is *exact* (a memory of no
//!    more frames than buckets, and always under loom). It may be stale or
//!    name a bucket-mate; it never names a generation that was not
//!    published.
//! 7. A hit through the hint CASes the state from a value that carries that
//!    generation and is not `DEAD` to one more reference. If it succeeds,
//!    generation g is still live, and the kill of `miss.rs`, 2 can no
//!    longer succeed while the reference is held. The entry's key, written
//!    before g was published (so seen after the CAS, see below), then says
//!    whether g maps this frame: if not (a bucket-mate), the reference is
//!    given back and the lookup goes to the map. If the generation moved on
//!    or the entry is dead, the CAS is not attempted and the lookup goes to
//!    the map. A mapping is `UNPUBLISHED` from its first store until its
//!    insert succeeded, and hint readers refuse that state: a mapping that
//!    loses the insert race (and is then unmapped with a plain store)
//!    cannot be reached through a hint, not even through a stale one whose
//!    generation has wrapped round to its own (`state.rs`, 8).
//!    Acquire on that CAS pairs with the Release store that published the
//!    generation (every later change of the word within a generation is a
//!    read-modify-write, continuing its release sequence: `state.rs`, 5),
//!    so the key and address read after it are the ones published.
//!
//! The loom model `sfbuf_hit_vs_eviction` checks 1-8 with `max_excess = 0`
//! and fails when the evictor kills without re-checking the count
//! (`EvictNoRecheck`); `sfbuf_stale_hint` fails with the generation check
//! switched off (`HintUnchecked`).
//!
//! # Pins: hits that write no shared line
//!
//! Even the lock-free hit writes the entry's state word, and so does its
//! release: two cores hitting the same frames pass that line back and forth.
//! A hit on a cached entry that nobody holds (listed on the LRU, count zero)
//! instead counts its reference in the calling thread's row of *pins* (one
//! count per slot per row). The first threads to hold a statistics stripe
//! of their own (`counter.rs`) each own a row and write it alone, with a
//! plain load and store: such a hit and its release make no locked
//! instruction (two locked adds and a SeqCst fence cost about an lwbuf hit
//! on some hosts). Other threads add in a shared row (read-modify-writes,
//! rows shared by stripe); a thread that gives back a pin counted in a row
//! it does not own subtracts in its shared row. The pins on a slot are the
//! wrapping sum of every row (64-bit counts, so no row wraps round):
//!
//! 9. The hitter reads the state (same generation, live, listed, count zero,
//!    not `REVOKED`), sets `PINNED` if it is not set yet (a CAS: one shared
//!    write per entry until an evictor next finds it unused), adds its pin,
//!    issues the light barrier, and reads the state again; if the
//!    generation or any of `DEAD`, `UNPUBLISHED`, `REVOKED`, `PINNED`
//!    changed, it gives the pin back (a full release, `handle.rs`, 11) and
//!    takes the ordinary path. The invariant: while a pin may be out,
//!    `PINNED` is set. (The evictor's half is `miss.rs`, 10; releases are
//!    `handle.rs`, 11-12.)
//!
//! A sum read while pins come and go is no snapshot: a pin given back in a
//! shared row may be seen without its take in its owner's row. Where it
//! matters the reader has issued a barrier that the take could not have
//! missed, so its sum is never too low:
//!
//! - the evictor's heavy barrier after `REVOKED`: a pin taken before it is
//!   seen; one taken after it sees `REVOKED` and backs off in its taker's
//!   own row. (After a second chance a later hitter may set `PINNED` again
//!   and keep a pin taken after the barrier; whoever gives it back read a
//!   state written after this evictor's clearing CAS, which came after its
//!   sum, so that give-back cannot be in the sum either.)
//! - a SeqCst fence after a release (`handle.rs`, 11): of racing last
//!   releases, the one latest in the fences' order sees every take that
//!   happened before the others' releases; a sum too low there only lists
//!   an entry that has pins, and the evictor counts again before it kills.
//!
//! Other readers (statistics, the count of evictable entries) take the sum
//! as a hint.
//!
//! The loom model `sfbuf_pinned_reset` races a second-chance look that
//! clears `PINNED` between a hitter's two reads, and fails when the
//! re-check ignores `PINNED` (`PinRecheckNoPinned`); `sfbuf_foreign_unpin`
//! gives a pin back on another thread while its owner pins again, and
//! fails when the giver writes the owner's row (`ForeignUnpinPlain`);
//! `sfbuf_pin_row_handover` hands a row from an exited owner to the next
//! thread, which continues it with a load and a store, and fails when the
//! row is claimed with Relaxed (`ClaimRelaxed`; `counter.rs`); the other
//! pin models are listed in `handle.rs`.

use std::ptr::NonNull;

use super::entry::Entry;
use super::hint::Hint;
use super::state::Snapshot;
use super::{SfBuf, SfPool};
use crate::kva::{Hold, MapKey};
use crate::sync::barrier;
use crate::sync::{AtomicU64, Ordering};

/// Rows of pin counts a thread may own: the first threads to hold a
/// statistics stripe of their own (`counter.rs`) write their row alone.
#[cfg(not(loom))]
pub(super) const PIN_STRIPES: usize = 8;
/// Under loom two (the models check the protocol, not the spreading), as
/// many as statistics stripes: the first two threads to pin own one each,
/// and a row given back is handed to the next thread that pins.
#[cfg(loom)]
pub(super) const PIN_STRIPES: usize = 2;
/// Every row: `PIN_STRIPES` owned rows, then as many shared ones.
pub(super) const PIN_ROWS: usize = 2 * PIN_STRIPES;

/// Counts in a row of pins for `slots` slots: whole 128-byte blocks (a
/// line and its prefetched neighbour), so that rows written by different
/// threads share no line.
#[inline(always)]
pub(super) const fn pin_row_len(slots: usize) -> usize {
    slots.next_multiple_of(16)
}

/// The calling thread's rows of pins (9, 11): the row it alone writes, if
/// it has one, and the shared row it adds to with read-modify-writes
/// (its pins when it owns no row; the pins of other rows it gives back).
#[derive(Clone, Copy)]
pub(super) struct PinRows {
    pub(super) own: Option<usize>,
    pub(super) shared: usize,
}

impl PinRows {
    /// The rows of a thread of statistics stripe `s` (its own if `alone`).
    #[inline(always)]
    fn of((s, alone): (usize, bool)) -> PinRows {
        PinRows { own: (alone && s < PIN_STRIPES).then_some(s), shared: shared_row(s) }
    }
}

/// The shared row of a thread of statistics stripe `stripe`.
#[inline]
fn shared_row(stripe: usize) -> usize {
    PIN_STRIPES + stripe % PIN_STRIPES
}

impl SfPool {
    /// See [`PinRows`]. A thread owns row `s` while it holds statistics
    /// stripe `s < PIN_STRIPES` alone (it gives it back when it exits, and
    /// the next holder continues the row: `counter.rs`).
    #[inline]
    pub(super) fn pin_rows(&self) -> PinRows {
        PinRows::of(super::counter::thread_stripe())
    }
}

impl SfPool {
    /// A hit, if `key` is cached: pinned, else through the hint, else
    /// through the map.
    #[inline(always)]
    pub(super) fn try_cached<'a>(&'a self, key: MapKey, hold: Hold<'a>) -> Option<SfBuf<'a>> {
        self.try_cached_at(key, self.kva.granule_index(key), hold)
    }

    /// [`try_cached`](Self::try_cached) with `key`'s granule number
    /// (`None`: not a granule key, which only the map can find).
    #[inline(always)]
    pub(super) fn try_cached_at<'a>(&'a self, key: MapKey, index: Option<usize>, hold: Hold<'a>) -> Option<SfBuf<'a>> {
        if let Some(index) = index {
            if let Some(b) = self.try_pin(key, index, hold) {
                return Some(b);
            }
        }
        let (slot, addr) = index.and_then(|i| self.try_hint(key, i)).or_else(|| self.try_hit(key))?;
        self.counters.hits.inc();
        Some(self.handle(key, hold, slot, addr))
    }

    /// The pinned hit (9): on a cached entry nobody holds, count the
    /// reference in this thread's row of pins, writing no line another core
    /// writes.
    #[inline(always)]
    fn try_pin<'a>(&'a self, key: MapKey, index: usize, hold: Hold<'a>) -> Option<SfBuf<'a>> {
        let Hint { slot, gen } = self.hint.get(index)?;
        let e = &self.entries[slot as usize];
        // Acquire: pairs with the Release store that published this
        // generation (7): the key and address read below are its own.
        let mut s = e.state.load(Ordering::Acquire);
        if !s.is_pinnable(gen) {
            return None;
        }
        // A bucket-mate's entry (6): pass it by before writing to it. Only a
        // filter: the check after the pin decides.
        #[cfg(not(loom))]
        if e.key() != key {
            return None;
        }
        if !s.is_pinned() {
            // The first pin since the entry was last found unused: say so,
            // once.
            s = e.state.mark_pinned(s)?;
        }
        // The thread's stripe, once: its rows of pins and its cell of the
        // hit counter below.
        let stripe = super::counter::thread_stripe();
        let rows = PinRows::of(stripe);
        let row = rows.own.unwrap_or(rows.shared);
        let cell = self.pin_cell(row, slot as usize);
        if rows.own.is_some() {
            // This thread writes its own row alone: a load and a store, no
            // locked instruction. (Counts are 64-bit and summed wrapping:
            // no row can wrap round within any program's life.)
            cell.store(cell.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        } else {
            cell.fetch_add(1, Ordering::Relaxed);
        }
        let pin = row as u32;
        // Against the evictor's REVOKED store + heavy barrier + read of the
        // pins: either it sees our pin, or we see REVOKED below.
        barrier::light();
        let now = e.state.load(Ordering::Relaxed);
        // While PINNED is set, every look sums the pins, so a pin is safe
        // under any PINNED, even one a later hitter set again.
        if !s.pin_holds(now) {
            // A full release, not just the decrement: an evictor may have
            // counted this pin and taken the entry off the LRU meanwhile.
            // Fenced fully: `PINNED` may be clear with this pin out, and
            // then no evictor recounts behind the heavy barrier
            // (`handle.rs`, 12).
            self.unpin_fenced(slot, pin);
            return None;
        }
        // Another frame of the hint's bucket, or a wrapped generation (7-8),
        // as in `try_hint`.
        #[cfg(not(loom))]
        if e.key() != key {
            self.unpin_fenced(slot, pin);
            return None;
        }
        if !now.is_referenced() {
            // Once per trip of the clock hand: a second chance for a frame
            // used through pins.
            e.state.mark_referenced();
        }
        self.counters.hits.add_in(stripe, 1);
        let addr = self.kva.addr_in(key, self.addr_of(e), hold[0].pfn().0);
        Some(SfBuf { pool: self, hold, slot, addr, pin })
    }

    /// Row `row`'s count of pins on `slot`. Rows are padded to whole
    /// pairs of cache lines, so that no two rows share a line.
    #[inline(always)]
    pub(super) fn pin_cell(&self, row: usize, slot: usize) -> &AtomicU64 {
        debug_assert_eq!(self.pin_stride, pin_row_len(self.entries.len()));
        &self.pins[row * self.pin_stride + slot]
    }

    /// The pinned references on `slot`, with Acquire (see `unpin`): the
    /// sum of every row, wrapping (a shared row holds the pins of other
    /// rows given back by threads that do not own them, so alone it may
    /// be "negative").
    pub(super) fn pinned(&self, slot: usize) -> u64 {
        (0..PIN_ROWS).fold(0u64, |a, r| a.wrapping_add(self.pin_cell(r, slot).load(Ordering::Acquire)))
    }

    /// The lock-free hit (6-8): take a reference on the generation the
    /// frame's hint names, if it is still live.
    #[inline]
    fn try_hint(&self, key: MapKey, index: usize) -> Option<(u32, NonNull<u8>)> {
        // Under loom the key check below is skipped.
        #[cfg(loom)]
        let _ = key;
        let Hint { slot, gen } = self.hint.get(index)?;
        let e = &self.entries[slot as usize];
        let unchecked = crate::sync::mutant!(HintUnchecked);
        // The first CAS guesses the usual state of a cached entry instead of
        // loading it: a load followed by a CAS costs two coherence misses
        // when the line was last written by another core (a shared copy,
        // then the upgrade), one CAS costs one. A wrong guess fails and
        // returns the real state.
        let live = |s: Snapshot| (unchecked || s.gen() == gen) && s.is_published();
        let (was_unused, _) = e.state.take_ref(Snapshot::cached_guess(gen), live)?;
        if was_unused {
            self.counters.used.inc();
        }
        // The generation is live, but it may map another frame of the
        // hint's bucket (7), or have wrapped (8). Under loom the table is
        // exact and no generation wraps, so the models skip the check (two
        // atomic loads, each a scheduling point).
        #[cfg(not(loom))]
        if e.key() != key {
            self.release(slot);
            return None;
        }
        Some((slot, self.addr_of(e)))
    }

    /// Record that generation `state` of `slot` maps `key` (6; granule keys
    /// only, by granule number). A bucket-mate's hint is kept if it still
    /// names a live generation (see `Hints::set`).
    pub(super) fn set_hint(&self, key: MapKey, slot: u32, state: Snapshot) {
        let Some(granule) = self.kva.granule_index(key) else { return };
        self.hint.set(granule, slot, state.gen(), |h| {
            self.entries[h.slot as usize].state.load(Ordering::Relaxed).is_live_gen(h.gen)
        });
    }

    /// Look `key` up and take a reference, under the shard's read lock (1);
    /// refresh the frame's hint.
    pub(super) fn try_hit(&self, key: MapKey) -> Option<(u32, NonNull<u8>)> {
        let (slot, state) = self.map.get_with(&key, |&slot| {
            let e = &self.entries[slot as usize];
            let (was_unused, state) = e.bump();
            if was_unused {
                self.counters.used.inc();
            }
            (slot, state)
        })?;
        self.set_hint(key, slot, state);
        Some((slot, self.addr_of(&self.entries[slot as usize])))
    }

    pub(super) fn addr_of(&self, e: &Entry) -> NonNull<u8> {
        NonNull::new(e.addr.load(Ordering::Relaxed)).expect("published entry has an address")
    }
}
