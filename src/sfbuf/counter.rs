//! Striped counters: the sf_buf pool's statistics, which threads on
//! different cores bump without sharing a cache line, and without a locked
//! instruction.
//!
//! Each thread claims a stripe of its own the first time it counts (one of
//! [`STRIPES`], from a global bitmap) and gives it back when it exits. The
//! owner of a stripe is its only writer, so an increment is a plain load and
//! store (a `lock`-prefixed add costs ~20 cycles even on a line the core
//! owns; these counters sit on the sf_buf hit path, three per hit). Threads
//! beyond [`STRIPES`] at once share one more cell and add atomically (for
//! their whole life: a thread looks for a stripe once).
//! Readers sum the cells; a stripe handed from an exited thread to a new
//! one keeps its count, so sums never lose an increment: the exiting thread
//! clears its bit with Release, the next claim is an AcqRel CAS, so the new
//! owner's first load of a cell reads the last owner's final store. The
//! sf_buf pool's rows of pins (`hit.rs`, 9) change hands with the stripes.
//!
//! The loom model `sfbuf_pin_row_handover` hands a stripe and its row of
//! pins from an exited thread to the next, and fails with the claim made
//! Relaxed (`ClaimRelaxed`). Under loom there are two stripes, only
//! threads that pin claim one, and a thread gives its stripe back by
//! calling `exit_thread` last, instead of from a thread-local destructor
//! (see `Keep`). A give-back made Relaxed is not caught there: every write
//! of a row is followed by a SeqCst fence under loom (the pin's light
//! barrier, the unpin's fence), and a fence releases what precedes it to
//! any Acquire that reads a later store, Relaxed or not. Outside loom the
//! light barrier may be only a compiler barrier, and the counters' plain
//! stores have no fence at all: there the Release is what hands them on.

use crate::sync::{AtomicU64, CachePadded, Ordering};

#[cfg(not(loom))]
const STRIPES: usize = 64;
/// Under loom two, as many as the sf_buf pool's rows of pins (`hit.rs`):
/// the first two threads of an execution to pin own one each, and the
/// models hand stripes on through the code below. The counters themselves
/// do not use them under loom: every add is a read-modify-write on the
/// shared cell (the counters are not what the models check, and a load
/// and a store per count would multiply the interleavings of every
/// model), so only threads that pin claim a stripe.
#[cfg(loom)]
const STRIPES: usize = 2;

/// The cell of threads without a stripe of their own.
const SHARED: usize = STRIPES;

mod claim {
    use std::cell::Cell;

    use super::{SHARED, STRIPES};
    use crate::sync::{AtomicU64, Ordering};

    /// Stripes claimed by live threads, one bit each.
    #[cfg(not(loom))]
    static CLAIMED: AtomicU64 = AtomicU64::new(0);
    // Under loom a static atomic is made afresh for every execution (see
    // `init`).
    #[cfg(loom)]
    crate::sync::lazy_static! {
        static ref CLAIMED: AtomicU64 = AtomicU64::new(0);
    }
    const _: () = assert!(STRIPES >= 1 && STRIPES <= 64, "CLAIMED is one 64-bit word");
    /// The bits of `CLAIMED` that name stripes (every bit outside loom).
    const ALL: u64 = u64::MAX >> (64 - STRIPES);

    const UNCLAIMED: usize = usize::MAX;

    #[cfg(not(loom))]
    thread_local! {
        /// This thread's stripe, `SHARED`, or `UNCLAIMED` before its first
        /// count. No destructor, so reading it is a plain thread-local
        /// access, even from other thread-local destructors.
        static MINE: Cell<usize> = const { Cell::new(UNCLAIMED) };
        /// Gives the stripe back when the thread exits.
        static KEEP: Keep = const { Keep };
    }
    // Loom's thread-locals take no `const` initializer.
    #[cfg(loom)]
    crate::sync::thread_local! {
        static MINE: Cell<usize> = Cell::new(UNCLAIMED);
        static KEEP: Keep = Keep;
    }

    struct Keep;

    /// Under loom `Keep` has no destructor, and the models give a stripe
    /// back by calling `give_back` last in a thread (`exit_thread`): loom
    /// takes every thread-local of an exiting thread before it drops any
    /// (so `MINE` would be gone), does so only after the thread's joiner
    /// may have gone on, and drops the thread-locals of a failed execution
    /// outside the model, where no loom atomic may be touched.
    #[cfg(not(loom))]
    impl Drop for Keep {
        fn drop(&mut self) {
            give_back();
        }
    }

    /// Give the calling thread's stripe back, if it holds one; from then on
    /// it shares. Run by the thread's destructor of `KEEP` as it exits.
    pub(super) fn give_back() {
        let _ = MINE.try_with(|m| {
            let s = m.replace(SHARED);
            if s < STRIPES {
                // Release: the next owner's claim (AcqRel) sees every
                // count this thread stored.
                CLAIMED.fetch_and(!(1 << s), Ordering::Release);
            }
        });
    }

    /// This thread's cell, and whether the thread owns it alone.
    #[inline]
    pub(super) fn stripe() -> (usize, bool) {
        match MINE.try_with(Cell::get) {
            Ok(s) if s < STRIPES => (s, true),
            Ok(UNCLAIMED) => first(),
            _ => (SHARED, false),
        }
    }

    #[cold]
    fn first() -> (usize, bool) {
        // Register the destructor first: a stripe is only claimed by a
        // thread that will give it back. A thread already past its
        // destructors (KEEP gone) shares.
        if KEEP.try_with(|_| ()).is_err() {
            let _ = MINE.try_with(|m| m.set(SHARED));
            return (SHARED, false);
        }
        // AcqRel on success: the Acquire half pairs with the last owner's
        // Release give-back, so this thread continues the stripe (and its
        // row of pins) from every count that owner stored.
        let success = if crate::sync::mutant!(ClaimRelaxed) { Ordering::Relaxed } else { Ordering::AcqRel };
        let mut claimed = CLAIMED.load(Ordering::Relaxed);
        let s = loop {
            let free = !claimed & ALL;
            if free == 0 {
                break SHARED;
            }
            let s = free.trailing_zeros() as usize;
            match CLAIMED.compare_exchange_weak(claimed, claimed | 1 << s, success, Ordering::Relaxed) {
                Ok(_) => break s,
                Err(now) => claimed = now,
            }
        };
        let _ = MINE.try_with(|m| m.set(s));
        (s, s < STRIPES)
    }

    /// Under loom: make this execution's `CLAIMED` now, on the thread
    /// building a pool, before it spawns the threads that claim. (Loom's
    /// lazy static synchronizes every reader with its initializer, an edge
    /// the real static does not have; made by the builder, the edge adds
    /// nothing a spawned thread does not already see.)
    #[cfg(loom)]
    pub(super) fn init() {
        let _: &AtomicU64 = &CLAIMED;
    }
}

/// The calling thread's stripe: its own (below `STRIPES`) while it holds
/// one, else the shared index, and whether it is the thread's alone. Also
/// used to give out other per-thread state (the sf_buf pool's pin rows).
#[inline]
pub(super) fn thread_stripe() -> (usize, bool) {
    claim::stripe()
}

/// Under loom: what a thread's exit does outside loom, where the
/// thread-local destructor runs it: give the thread's stripe (and with it
/// its row of pins) back, for the next thread to claim.
#[cfg(loom)]
pub(crate) fn exit_thread() {
    claim::give_back();
}

/// Under loom: see `claim::init`. Called by the pool's builder.
#[cfg(loom)]
pub(super) fn init() {
    claim::init();
}

/// A counter whose increments go to the calling thread's own cache line;
/// reading sums them.
#[derive(Debug)]
pub(super) struct Striped {
    /// `STRIPES` exclusive cells, then the shared one.
    cells: Box<[CachePadded<AtomicU64>]>,
}

impl Default for Striped {
    fn default() -> Self {
        Striped { cells: (0..=STRIPES).map(|_| CachePadded::new(AtomicU64::new(0))).collect() }
    }
}

impl Striped {
    /// Add `n` (wrapping: `sub` adds the two's complement). On the sf_buf
    /// hit path: inlined whole.
    #[inline(always)]
    pub(super) fn add(&self, n: u64) {
        #[cfg(not(loom))]
        let stripe = claim::stripe();
        // Under loom the counters always share (see `STRIPES`).
        #[cfg(loom)]
        let stripe = (SHARED, false);
        self.add_in(stripe, n);
    }

    /// [`add`](Self::add) by a thread that already looked up its stripe
    /// (`thread_stripe`).
    #[inline(always)]
    pub(super) fn add_in(&self, stripe: (usize, bool), n: u64) {
        // Under loom the counters always share (see `STRIPES`).
        #[cfg(loom)]
        let stripe = {
            let _ = stripe;
            (SHARED, false)
        };
        let (s, mine) = stripe;
        let c = &self.cells[s];
        // Relaxed: statistics only. An exclusive cell has one writer, this
        // thread, so a load and a store lose nothing.
        if mine {
            c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        } else {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    #[inline(always)]
    pub(super) fn inc(&self) {
        self.add(1);
    }

    #[inline]
    pub(super) fn sub(&self, n: u64) {
        self.add(n.wrapping_neg());
    }

    pub(super) fn get(&self) -> u64 {
        self.cells.iter().fold(0u64, |a, c| a.wrapping_add(c.load(Ordering::Relaxed)))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// More threads than stripes, each counting while others come and go:
    /// the sum is exact (the threads beyond the stripes share a cell; an
    /// exited thread's stripe keeps its count for the next owner).
    #[test]
    fn exact_sum_with_more_threads_than_stripes() {
        // Under Miri (about 100x slower) fewer counts per thread; still
        // more threads than stripes, and the rounds still hand stripes on.
        let per_thread: u64 = if cfg!(miri) { 20 } else { 20_000 };
        let c = Arc::new(Striped::default());
        for round in 0..3 {
            let hs: Vec<_> = (0..STRIPES + 8)
                .map(|i| {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        for _ in 0..per_thread + i as u64 {
                            c.inc();
                        }
                        c.sub(i as u64);
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            assert_eq!(c.get(), (round + 1) * per_thread * (STRIPES as u64 + 8), "round {round}");
        }
    }
}
