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
//! one keeps its count, so sums never lose an increment.

use crate::sync::{AtomicU64, CachePadded, Ordering};

#[cfg(not(loom))]
const STRIPES: usize = 64;
/// Under loom no stripe is exclusive: every add is a read-modify-write on
/// the shared cell (the counters are not what the models check).
#[cfg(loom)]
const STRIPES: usize = 0;

/// The cell of threads without a stripe of their own.
const SHARED: usize = STRIPES;

#[cfg(not(loom))]
mod claim {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::{SHARED, STRIPES};

    /// Stripes claimed by live threads, one bit each.
    static CLAIMED: AtomicU64 = AtomicU64::new(0);
    const _: () = assert!(STRIPES == 64, "CLAIMED is one 64-bit word");

    const UNCLAIMED: usize = usize::MAX;

    thread_local! {
        /// This thread's stripe, `SHARED`, or `UNCLAIMED` before its first
        /// count. No destructor, so reading it is a plain thread-local
        /// access, even from other thread-local destructors.
        static MINE: Cell<usize> = const { Cell::new(UNCLAIMED) };
        /// Gives the stripe back when the thread exits.
        static KEEP: Keep = const { Keep };
    }

    struct Keep;

    impl Drop for Keep {
        fn drop(&mut self) {
            let _ = MINE.try_with(|m| {
                let s = m.replace(SHARED);
                if s < STRIPES {
                    // Release: the next owner's claim (AcqRel) sees every
                    // count this thread stored.
                    CLAIMED.fetch_and(!(1 << s), Ordering::Release);
                }
            });
        }
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
        let mut claimed = CLAIMED.load(Ordering::Relaxed);
        let s = loop {
            let free = !claimed;
            if free == 0 {
                break SHARED;
            }
            let s = free.trailing_zeros() as usize;
            match CLAIMED.compare_exchange_weak(claimed, claimed | 1 << s, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break s,
                Err(now) => claimed = now,
            }
        };
        let _ = MINE.try_with(|m| m.set(s));
        (s, s < STRIPES)
    }
}

#[cfg(loom)]
mod claim {
    #[inline]
    pub(super) fn stripe() -> (usize, bool) {
        (super::SHARED, false)
    }
}

/// The calling thread's stripe: its own (below 64) while it holds one, else
/// the shared index, and whether it is the thread's alone. Also used to
/// give out other per-thread state (the sf_buf pool's pin rows).
#[cfg_attr(loom, allow(dead_code))]
#[inline]
pub(super) fn thread_stripe() -> (usize, bool) {
    claim::stripe()
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
        let (s, mine) = claim::stripe();
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
