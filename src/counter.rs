//! Striped counters: statistics that threads on different cores bump
//! without sharing a cache line.

use crate::sync::{thread_local, AtomicU64, CachePadded, Ordering};

#[cfg(not(loom))]
const STRIPES: usize = 16;
/// Under loom one stripe: the counters are not what the models check.
#[cfg(loom)]
const STRIPES: usize = 1;

fn stripe() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        #[allow(clippy::modulo_one)] // one stripe under loom
        static STRIPE: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % STRIPES;
    }
    STRIPE.try_with(|s| *s).unwrap_or(0)
}

/// A counter whose increments go to one of several cache lines, chosen per
/// thread; reading sums them.
#[derive(Debug)]
pub(crate) struct Striped {
    cells: Box<[CachePadded<AtomicU64>]>,
}

impl Default for Striped {
    fn default() -> Self {
        Striped { cells: (0..STRIPES).map(|_| CachePadded::new(AtomicU64::new(0))).collect() }
    }
}

impl Striped {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        // Relaxed: statistics only.
        self.cells[stripe()].fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    #[inline]
    pub(crate) fn sub(&self, n: u64) {
        self.cells[stripe()].fetch_sub(n, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.cells.iter().fold(0u64, |a, c| a.wrapping_add(c.load(Ordering::Relaxed)))
    }
}
