//! The entry's state word: its reference count, its flags and the
//! generation of its slot, as a type. `Snapshot` is one value of the
//! word with named predicates and constructors; `AtomicState` is the
//! word itself, and every change of it is a named transition that goes
//! through one compare-and-swap helper (`AtomicState::update`) and says
//! which memory orderings it uses and why. No other file reads a bit of the
//! word by hand.
//!
//! Layout, low bits first: the count of references held through the
//! entry's own count (`REFS_BITS` bits), the flags, then the generation in
//! the high half (the form a hint stores, see `hint.rs`).
//!
//! # Generations
//!
//! 5. Every publication of an entry starts a new *generation* of its slot
//!    (the high half of the word: `AtomicState::start_mapped`,
//!    `AtomicState::start_revived`); a killed or free entry stays `DEAD`
//!    until its slot is published again, with the next generation. Within
//!    a generation every change of the word is a read-modify-write, so the
//!    Release store that started it heads a release sequence that every
//!    later Acquire read of the word synchronizes with (`hit.rs`, 7).
//! 8. Generations are 32 bits; a reader would have to stall through 2^32
//!    reuses of one slot to see a wrapped one. The key check of `hit.rs`,
//!    7 covers that too.

use crate::sync::{AtomicU64, Ordering};

/// Bits of the entry's own reference count.
const REFS_BITS: u32 = 26;
const REFS: u64 = (1 << REFS_BITS) - 1;
/// Pins may be out (set by a hitter before its first pin): only then does
/// an evictor pay for revoking them (`hit.rs`, 9).
const PINNED: u64 = 1 << REFS_BITS;
/// No new pins: an evictor is counting them (`miss.rs`, 10).
const REVOKED: u64 = PINNED << 1;
/// Used since the clock hand last passed: one more round on the LRU.
const REFERENCED: u64 = REVOKED << 1;
/// On the inactive LRU (or being looked at by an evictor that popped it).
const ON_LRU: u64 = REFERENCED << 1;
/// Killed by an evictor (out of the map, about to be unmapped), or free.
const DEAD: u64 = ON_LRU << 1;
/// Written but not yet in the map: a miss that may still lose the insert
/// race (and then unmap it), or a revival. Hint readers refuse it.
const UNPUBLISHED: u64 = DEAD << 1;
/// The slot's generation: one more at every publication (5).
const GEN_SHIFT: u32 = 32;
const GEN: u64 = !((1 << GEN_SHIFT) - 1);
const _: () = assert!(UNPUBLISHED < 1 << GEN_SHIFT, "the flags fit below the generation");

/// One value of an entry's state word.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub(super) struct Snapshot(u64);

// === impl Snapshot ===

impl Snapshot {
    /// A free slot that was never published: generation 0, `DEAD`.
    pub(super) const FREE: Snapshot = Snapshot(DEAD);

    /// The state a lock-free hit guesses for a cached entry of generation
    /// `gen` (listed, used since the clock hand passed, nobody holding it):
    /// tried as the first CAS's expected value (see `hit.rs`).
    #[inline(always)]
    pub(super) fn cached_guess(gen: u64) -> Snapshot {
        debug_assert_eq!(gen & !GEN, 0, "a generation lives in the high half");
        Snapshot(gen | ON_LRU | REFERENCED)
    }

    /// References held through the entry's own count (pins not included).
    #[inline(always)]
    pub(super) fn ref_count(self) -> u64 {
        self.0 & REFS
    }

    /// The generation, in place (the high half, low half zero): the form a
    /// hint stores.
    #[inline(always)]
    pub(super) fn gen(self) -> u64 {
        self.0 & GEN
    }

    /// Killed or free: out of the map.
    #[inline(always)]
    pub(super) fn is_dead(self) -> bool {
        self.0 & DEAD != 0
    }

    /// Live and in the map (neither `DEAD` nor `UNPUBLISHED`): what a hint
    /// reader may take a reference on.
    #[inline(always)]
    pub(super) fn is_published(self) -> bool {
        self.0 & (DEAD | UNPUBLISHED) == 0
    }

    /// Generation `gen` is still the live one (a hint naming it is current).
    #[inline(always)]
    pub(super) fn is_live_gen(self, gen: u64) -> bool {
        self.gen() == gen && !self.is_dead()
    }

    /// Listed on the LRU (or popped by an evictor looking at it).
    #[inline(always)]
    pub(super) fn is_listed(self) -> bool {
        self.0 & ON_LRU != 0
    }

    /// Used since the clock hand last passed.
    #[inline(always)]
    pub(super) fn is_referenced(self) -> bool {
        self.0 & REFERENCED != 0
    }

    /// Pins may be out.
    #[inline(always)]
    pub(super) fn is_pinned(self) -> bool {
        self.0 & PINNED != 0
    }

    /// No new pins may be taken.
    #[inline(always)]
    pub(super) fn is_revoked(self) -> bool {
        self.0 & REVOKED != 0
    }

    /// Live, listed, with no reference in its own count: what an evictor
    /// may kill once it has counted no pins.
    #[inline(always)]
    pub(super) fn is_cached_unused(self) -> bool {
        self.0 & (REFS | ON_LRU | DEAD) == ON_LRU
    }

    /// Live, off the LRU, with no reference in its own count: what a last
    /// release (or an evictor's second count) lists again (`handle.rs`, 11).
    #[inline(always)]
    fn is_unlisted_unused(self) -> bool {
        self.0 & (REFS | DEAD | ON_LRU) == 0
    }

    /// A pinned hit of generation `gen` may start here (`hit.rs`, 9): the
    /// generation is the hint's, the entry is published, listed, held by no
    /// count, and its pins are not revoked.
    #[inline(always)]
    pub(super) fn is_pinnable(self, gen: u64) -> bool {
        self.gen() == gen && self.0 & (REFS | DEAD | UNPUBLISHED | REVOKED | ON_LRU) == ON_LRU
    }

    /// The pinned hit's re-check (`hit.rs`, 9): whether `now`, read after
    /// the pin and the light barrier, is still the generation, liveness and
    /// pin protocol state of `self`, read before. `PINNED` too: a look that
    /// found the entry unused (its sum missed the pin) may have cleared
    /// `REVOKED` again, but then it cleared `PINNED` with it.
    #[inline(always)]
    pub(super) fn pin_holds(self, now: Snapshot) -> bool {
        let mut same = GEN | DEAD | UNPUBLISHED | REVOKED | PINNED;
        if crate::sync::mutant!(PinRecheckNoPinned) {
            same &= !PINNED;
        }
        if crate::sync::mutant!(PinRecheckNoRevoked) {
            same &= !REVOKED;
        }
        now.0 & same == self.0 & same
    }

    /// With `PINNED` set.
    #[inline(always)]
    pub(super) fn pinned(self) -> Snapshot {
        Snapshot(self.0 | PINNED)
    }

    /// With one more reference in its own count, `REFERENCED` set. Panics
    /// on a count that would carry into the flags.
    #[inline(always)]
    fn plus_ref(self) -> Snapshot {
        // As std's Arc: a count this high means leaked handles, and
        // carrying into the flags would corrupt the entry.
        assert!(self.ref_count() < REFS, "sf_buf: reference count overflow (leaked handles)");
        Snapshot((self.0 + 1) | REFERENCED)
    }

    /// With one reference less in its own count.
    #[inline(always)]
    fn minus_ref(self) -> Snapshot {
        debug_assert!(self.ref_count() != 0 && !self.is_dead(), "sf_buf: release of unreferenced entry");
        Snapshot(self.0 - 1)
    }

    /// Off the LRU and not recently used: an entry found in use.
    #[inline(always)]
    fn unlisted(self) -> Snapshot {
        Snapshot(self.0 & !(ON_LRU | REFERENCED))
    }

    /// With `ON_LRU` set.
    #[inline(always)]
    fn listed(self) -> Snapshot {
        Snapshot(self.0 | ON_LRU)
    }

    /// A second chance: still listed, no longer recently used, and pins may
    /// be taken again (`PINNED` and `REVOKED` cleared: `miss.rs`, 10).
    #[inline(always)]
    fn second_chance(self) -> Snapshot {
        Snapshot(self.0 & !(REFERENCED | REVOKED | PINNED))
    }

    /// With `REVOKED` set.
    #[inline(always)]
    fn revoked(self) -> Snapshot {
        Snapshot(self.0 | REVOKED)
    }

    /// The state of a free slot whose last generation was that of `self`.
    #[inline(always)]
    pub(super) fn killed(self) -> Snapshot {
        Snapshot(self.gen() | DEAD)
    }

    /// The state that publishes the next generation after `self`, with
    /// `flags`.
    #[inline(always)]
    fn next_gen(self, flags: u64) -> Snapshot {
        Snapshot(self.gen().wrapping_add(1 << GEN_SHIFT) | flags)
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("gen", &(self.0 >> GEN_SHIFT))
            .field("refs", &self.ref_count())
            .field("pinned", &self.is_pinned())
            .field("revoked", &self.is_revoked())
            .field("referenced", &self.is_referenced())
            .field("listed", &self.is_listed())
            .field("dead", &self.is_dead())
            .field("unpublished", &(self.0 & UNPUBLISHED != 0))
            .finish()
    }
}

// === transitions ===

/// What a transition decides from the state it sees.
pub(super) enum Step<R> {
    /// Leave the word as it is; the transition's outcome is `R`.
    Stop(R),
    /// Write this state; if the word still holds what was seen, the outcome
    /// is `R`, else decide again from what it holds now.
    Set(Snapshot, R),
    /// Write this state as one step of a longer transition: if it holds,
    /// run the transition's `after_step` and decide again from it; else
    /// decide again from what the word holds now.
    Then(Snapshot),
}

/// Which compare-and-swap a transition uses, with its success ordering
/// (every failure is `Relaxed`: a failed CAS only reads the word, and the
/// decision taken from it is checked again by the next CAS).
#[derive(Clone, Copy)]
enum Cas {
    /// May fail spuriously: for transitions that retry anyway.
    Weak(Ordering),
    /// Fails only when the word moved: for transitions that act between
    /// attempts (an evictor's look) or try once (a pin's mark).
    Strong(Ordering),
}

/// What an evictor's look decided (`miss.rs`, 2 and 10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Look {
    /// Killed: `DEAD`, the caller removes it from the map under the same
    /// shard lock and unmaps it.
    Evict,
    /// Used since the last pass: left listed, `REFERENCED` (and the pin
    /// flags) cleared.
    SecondChance,
    /// Held through its own count, with no pin out: taken off the LRU;
    /// its last release lists it again.
    InUse,
    /// Held through pins (or through its count with `PINNED` set): taken
    /// off the LRU; the caller issues the heavy barrier and counts the pins
    /// again (`handle.rs`, 11-12).
    Unlisted,
}

/// An entry's state word.
#[repr(transparent)]
pub(super) struct AtomicState(AtomicU64);

// === impl AtomicState ===

impl AtomicState {
    /// A free slot, never published.
    pub(super) fn new() -> AtomicState {
        AtomicState(AtomicU64::new(Snapshot::FREE.0))
    }

    #[inline(always)]
    pub(super) fn load(&self, order: Ordering) -> Snapshot {
        Snapshot(self.0.load(order))
    }

    /// The one compare-and-swap on the word.
    #[inline(always)]
    fn cas(&self, cur: Snapshot, new: Snapshot, how: Cas) -> Result<(), Snapshot> {
        let r = match how {
            Cas::Weak(ok) => self.0.compare_exchange_weak(cur.0, new.0, ok, Ordering::Relaxed),
            Cas::Strong(ok) => self.0.compare_exchange(cur.0, new.0, ok, Ordering::Relaxed),
        };
        r.map(|_| ()).map_err(Snapshot)
    }

    /// The one CAS loop: from `cur` (a load, or a guess), let `decide` pick
    /// the next state until a CAS of it succeeds or `decide` stops.
    #[inline(always)]
    fn update<R>(&self, cur: Snapshot, how: Cas, decide: impl FnMut(Snapshot) -> Step<R>) -> R {
        self.update_in_steps(cur, how, decide, || ())
    }

    /// [`update`](Self::update), for a transition in steps: after each
    /// [`Step::Then`] that took effect, `after_step` runs before the next
    /// decision.
    #[inline(always)]
    fn update_in_steps<R>(
        &self,
        mut cur: Snapshot,
        how: Cas,
        mut decide: impl FnMut(Snapshot) -> Step<R>,
        mut after_step: impl FnMut(),
    ) -> R {
        loop {
            match decide(cur) {
                Step::Stop(r) => return r,
                Step::Set(new, r) => match self.cas(cur, new, how) {
                    Ok(()) => return r,
                    Err(now) => cur = now,
                },
                Step::Then(new) => match self.cas(cur, new, how) {
                    Ok(()) => {
                        after_step();
                        cur = new;
                    }
                    Err(now) => cur = now,
                },
            }
        }
    }

    /// Take a reference if `live` accepts the state, trying `cur` first (a
    /// guess, or a load). `None` if `live` refuses what it sees; else
    /// whether the entry's count was zero before, and the new state.
    ///
    /// Acquire: pairs with the Release of the last counted release and
    /// with the one that published the generation (5; `hit.rs`, 7). (A
    /// pinned holder's release writes only its pin row: the pool orders
    /// mappings, not page contents; handing bytes from one holder to the
    /// next takes the callers' own synchronization, as with the direct
    /// map.)
    #[inline(always)]
    pub(super) fn take_ref(&self, cur: Snapshot, live: impl Fn(Snapshot) -> bool) -> Option<(bool, Snapshot)> {
        self.update(cur, Cas::Weak(Ordering::Acquire), |s| {
            if !live(s) {
                return Step::Stop(None);
            }
            let new = s.plus_ref();
            Step::Set(new, Some((s.ref_count() == 0, new)))
        })
    }

    /// Give back a reference of the entry's own count; returns the new
    /// state.
    ///
    /// AcqRel: Release orders this holder's accesses before the evictor's
    /// kill (which acquires the state); Acquire orders it after an
    /// evictor's flag change (the wake-up argument in `wait.rs`).
    #[inline]
    pub(super) fn release(&self) -> Snapshot {
        self.update(self.load(Ordering::Relaxed), Cas::Weak(Ordering::AcqRel), |s| {
            let new = s.minus_ref();
            Step::Set(new, new)
        })
    }

    /// Set `PINNED` if the word still holds `seen`: one try (`hit.rs`, 9:
    /// an evictor that sees no `PINNED` kills with a plain CAS, which this
    /// one then loses, or wins against). Returns the new state.
    ///
    /// Acquire: as [`take_ref`](Self::take_ref), this is the pinned hit's
    /// read of the generation it will use.
    #[inline(always)]
    pub(super) fn mark_pinned(&self, seen: Snapshot) -> Option<Snapshot> {
        let new = seen.pinned();
        self.cas(seen, new, Cas::Strong(Ordering::Acquire)).ok().map(|()| new)
    }

    /// Set `REFERENCED` (a pinned hit's once-per-pass mark for the clock).
    ///
    /// Relaxed: it only steers the clock (a look that misses it gives no
    /// second chance); whether an entry may be killed is decided by its
    /// count and its pins, not by this flag.
    #[inline(always)]
    pub(super) fn mark_referenced(&self) {
        self.0.fetch_or(REFERENCED, Ordering::Relaxed);
    }

    /// An evictor's look at an entry it popped off the LRU, under the
    /// shard's write lock (`miss.rs`, 2 and 10). An entry nobody holds
    /// through its own count may still be held through pins: with `PINNED`
    /// set, the look sets `REVOKED` (no new pins) and runs `revoke` (the
    /// heavy barrier) once it holds, then asks `pinned` whether any pin is
    /// out.
    ///
    /// AcqRel on every step: the kill acquires what the last holder
    /// released; the flag changes release to the next release's CAS.
    pub(super) fn look(&self, revoke: impl FnMut(), mut pinned: impl FnMut() -> bool) -> Look {
        let decide = |s: Snapshot| {
            if crate::sync::mutant!(EvictNoRecheck) {
                return Step::Set(s.killed(), Look::Evict);
            }
            if s.ref_count() != 0 {
                // In use: off the LRU; its last release puts it back. With
                // `PINNED` a pin may be out too, and its release reads the
                // state behind the light barrier only: `Unlisted`, so the
                // evictor counts the pins again behind the heavy one
                // (`handle.rs`, 12).
                let seen = if s.is_pinned() { Look::Unlisted } else { Look::InUse };
                return Step::Set(s.unlisted(), seen);
            }
            // With no PINNED, no pin was taken since the entry was last
            // found unused, and none can be without changing the state: no
            // barrier, no count.
            if s.is_pinned() {
                if !s.is_revoked() {
                    return Step::Then(s.revoked());
                }
                if pinned() {
                    // Held through pins: off the LRU as an entry in use is
                    // (REVOKED stays until a look finds it unused); the last
                    // pinned release puts it back.
                    return Step::Set(s.unlisted(), Look::Unlisted);
                }
            }
            if s.is_referenced() {
                // Unused, and pins may be taken again.
                Step::Set(s.second_chance(), Look::SecondChance)
            } else {
                Step::Set(s.killed(), Look::Evict)
            }
        };
        self.update_in_steps(self.load(Ordering::Relaxed), Cas::Strong(Ordering::AcqRel), decide, revoke)
    }

    /// Set `ON_LRU` on a live, unlisted entry that no count holds, whatever
    /// its generation (an evictor's second count found no pin: `handle.rs`,
    /// 11). Whether this call listed it (then the caller pushes it).
    ///
    /// AcqRel: as [`look`](Self::look).
    pub(super) fn relist_unused(&self) -> bool {
        self.update(self.load(Ordering::Relaxed), Cas::Weak(Ordering::AcqRel), |s| {
            if s.is_unlisted_unused() {
                Step::Set(s.listed(), true)
            } else {
                Step::Stop(false)
            }
        })
    }

    /// Set `ON_LRU` on a live, unlisted entry that no count holds, if it is
    /// still of `seen`'s generation (a last release: `handle.rs`, 11).
    /// Whether this call listed it (then the caller pushes it).
    ///
    /// AcqRel: as [`look`](Self::look).
    pub(super) fn list_unused_of(&self, seen: Snapshot) -> bool {
        self.update(self.load(Ordering::Relaxed), Cas::Weak(Ordering::AcqRel), |s| {
            if s.gen() == seen.gen() && s.is_unlisted_unused() {
                Step::Set(s.listed(), true)
            } else {
                Step::Stop(false)
            }
        })
    }

    /// Start the next generation of a free slot for a new mapping, held by
    /// its mapper (one reference, `REFERENCED`, `UNPUBLISHED`); returns it.
    ///
    /// Release: a hint reader's Acquire CAS on this generation sees the
    /// fields written before (`hit.rs`, 7). For map readers, the insert's
    /// write lock releases them.
    pub(super) fn start_mapped(&self) -> Snapshot {
        self.start(1 | REFERENCED | UNPUBLISHED)
    }

    /// Start the next generation of a killed entry whose unmap failed,
    /// listed and unreferenced, `UNPUBLISHED` (`miss.rs`); returns it. Hints
    /// of the old generation stay stale: the map finds it again.
    ///
    /// Release: as [`start_mapped`](Self::start_mapped).
    pub(super) fn start_revived(&self) -> Snapshot {
        self.start(ON_LRU | UNPUBLISHED)
    }

    #[inline]
    fn start(&self, flags: u64) -> Snapshot {
        // Relaxed load: the slot is free or dead, so its word is ours alone
        // (`entry.rs`); no other thread writes it until it is published.
        let new = self.load(Ordering::Relaxed).next_gen(flags);
        self.0.store(new.0, Ordering::Release);
        new
    }

    /// The generation started is in the map: hint readers may take it from
    /// now on.
    ///
    /// Release (a read-modify-write, so map readers' references taken
    /// since the insert are kept): as [`start_mapped`](Self::start_mapped),
    /// for hint readers.
    pub(super) fn publish(&self) {
        self.0.fetch_and(!UNPUBLISHED, Ordering::Release);
    }

    /// The generation `started` lost its insert (it was never published):
    /// free the slot again.
    ///
    /// Relaxed: no reader can have taken it (hint readers refuse
    /// `UNPUBLISHED`, map readers never found it); the slot goes back to
    /// the allocator, whose lock orders its next user after this store.
    pub(super) fn abandon(&self, started: Snapshot) {
        self.0.store(started.killed().0, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_generation_lives_from_its_start_to_its_kill() {
        let a = AtomicState::new();
        assert!(a.load(Ordering::Relaxed).is_dead());
        let s = a.start_mapped();
        assert_eq!((s.gen(), s.ref_count(), s.is_published()), (1 << GEN_SHIFT, 1, false));
        a.publish();
        let s = a.load(Ordering::Relaxed);
        assert!(s.is_published() && s.is_live_gen(1 << GEN_SHIFT) && s.is_referenced());
        assert_eq!(a.release().ref_count(), 0);
        assert!(a.list_unused_of(s) && !a.list_unused_of(s), "listed once");
        assert!(a.load(Ordering::Relaxed).is_cached_unused());
        // Referenced: a second chance; then the kill.
        assert_eq!(a.look(|| (), || false), Look::SecondChance);
        assert_eq!(a.look(|| (), || false), Look::Evict);
        let dead = a.load(Ordering::Relaxed);
        assert!(dead.is_dead() && dead.gen() == 1 << GEN_SHIFT && !dead.is_live_gen(dead.gen()));
        let next = a.start_revived();
        assert_eq!(next.gen(), 2 << GEN_SHIFT);
        a.abandon(next);
        assert!(a.load(Ordering::Relaxed).is_dead());
    }

    #[test]
    fn a_pinned_entry_is_revoked_and_counted_once() {
        let a = AtomicState::new();
        let s = a.start_mapped();
        a.publish();
        a.release();
        assert!(a.list_unused_of(s));
        let seen = a.load(Ordering::Relaxed);
        assert!(seen.is_pinnable(seen.gen()));
        let pinned = a.mark_pinned(seen).expect("the word did not move");
        assert!(a.mark_pinned(seen).is_none(), "one try, from what was seen");
        let mut barriers = 0;
        assert_eq!(a.look(|| barriers += 1, || true), Look::Unlisted);
        assert_eq!(barriers, 1);
        let now = a.load(Ordering::Relaxed);
        assert!(now.is_revoked() && !now.is_listed() && !pinned.pin_holds(now));
        assert!(a.relist_unused());
        // Already revoked: no second barrier; no pin now, unreferenced: kill.
        assert_eq!(a.look(|| barriers += 1, || false), Look::Evict);
        assert_eq!(barriers, 1);
    }

    #[test]
    fn the_count_never_carries_into_the_flags() {
        let full = Snapshot(REFS);
        assert!(std::panic::catch_unwind(|| full.plus_ref()).is_err());
        assert_eq!(Snapshot(0).plus_ref().ref_count(), 1);
    }
}
