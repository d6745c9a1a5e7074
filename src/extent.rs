//! A thread-safe allocator of index ranges, shared by the frame allocator
//! (frames of a `PhysMem`) and the slot allocator (slots of a window).
//!
//! Single units are the common case and stay O(1): a freed unit goes on a
//! LIFO list and the next single allocation takes it back (hot in cache, and
//! for slots, still reserved). Runs come from a set of coalesced free extents
//! kept twice: by start (to merge neighbours) and by `(len, start)` (best fit
//! in O(log n)). Freed singles are merged into the extents lazily, only when a
//! run cannot be found otherwise or the counters are read: the "lazy
//! coalescing" that keeps the single-unit path cheap.

use std::collections::{BTreeMap, BTreeSet};

use crate::sync::{lock, AtomicUsize, Mutex, Ordering};

/// Counters of a range allocator (frames of a `PhysMem`, slots of a window).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExtentStats {
    /// Units managed.
    pub total: usize,
    /// Units free now.
    pub free: usize,
    /// The longest run of adjacent free units (after coalescing).
    pub largest_free_run: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// Free extents by start: `start -> len`.
    by_start: BTreeMap<usize, usize>,
    /// The same extents by `(len, start)`, for best fit.
    by_len: BTreeSet<(usize, usize)>,
    /// Freed single units not yet merged into `by_start`.
    singles: Vec<usize>,
}

/// A thread-safe allocator of units `0..total`.
#[derive(Debug)]
pub(crate) struct Extents {
    total: usize,
    free: AtomicUsize,
    inner: Mutex<Inner>,
}

impl Extents {
    /// All of `0..total` free.
    pub(crate) fn new(total: usize) -> Self {
        let mut inner = Inner::default();
        if total > 0 {
            inner.insert(0, total);
        }
        Extents { total, free: AtomicUsize::new(total), inner: Mutex::new(inner) }
    }

    /// Take `n` adjacent units; `None` if no run of `n` is free.
    pub(crate) fn alloc(&self, n: usize) -> Option<usize> {
        if n == 0 || n > self.total {
            return None;
        }
        let mut g = lock(&self.inner);
        let start = if n == 1 { g.take_one() } else { g.take_run(n) }?;
        // Relaxed: the counter is informational; the lock orders the data.
        self.free.fetch_sub(n, Ordering::Relaxed);
        Some(start)
    }

    /// Take up to `max` units, not necessarily adjacent, pushing them on `out`.
    /// Returns how many were taken. One lock round trip for the whole batch.
    pub(crate) fn alloc_batch(&self, max: usize, out: &mut Vec<usize>) -> usize {
        let mut g = lock(&self.inner);
        let mut got = 0;
        while got < max {
            match g.take_one() {
                Some(u) => {
                    out.push(u);
                    got += 1;
                }
                None => break,
            }
        }
        self.free.fetch_sub(got, Ordering::Relaxed);
        got
    }

    /// Give back `n` adjacent units starting at `start`.
    pub(crate) fn free(&self, start: usize, n: usize) {
        debug_assert!(n > 0 && start + n <= self.total, "free({start}, {n}) outside 0..{}", self.total);
        let mut g = lock(&self.inner);
        if n == 1 {
            g.singles.push(start);
        } else {
            g.insert(start, n);
        }
        self.free.fetch_add(n, Ordering::Relaxed);
    }

    /// Give back single units, in one lock round trip.
    pub(crate) fn free_batch(&self, units: impl IntoIterator<Item = usize>) {
        let mut g = lock(&self.inner);
        let before = g.singles.len();
        g.singles.extend(units);
        let n = g.singles.len() - before;
        self.free.fetch_add(n, Ordering::Relaxed);
    }

    /// Take the one unit `unit`, if it is free (tests reach frames far from
    /// where the allocator would hand them out: the top of a huge memory).
    #[cfg(test)]
    pub(crate) fn take_at(&self, unit: usize) -> bool {
        let mut g = lock(&self.inner);
        g.coalesce();
        let Some((&start, &len)) = g.by_start.range(..=unit).next_back() else { return false };
        if unit >= start + len {
            return false;
        }
        g.remove(start, len);
        if unit > start {
            g.insert_raw(start, unit - start);
        }
        if unit + 1 < start + len {
            g.insert_raw(unit + 1, start + len - unit - 1);
        }
        self.free.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Units free now (a relaxed reading).
    pub(crate) fn free_count(&self) -> usize {
        self.free.load(Ordering::Relaxed)
    }

    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Counters, after merging pending singles.
    pub(crate) fn stats(&self) -> ExtentStats {
        let mut g = lock(&self.inner);
        g.coalesce();
        ExtentStats {
            total: self.total,
            free: self.free.load(Ordering::Relaxed),
            largest_free_run: g.by_len.last().map_or(0, |&(len, _)| len),
        }
    }
}

impl Inner {
    fn take_one(&mut self) -> Option<usize> {
        if let Some(u) = self.singles.pop() {
            return Some(u);
        }
        // Carve from the smallest extent, keeping large runs whole.
        let &(len, start) = self.by_len.first()?;
        self.remove(start, len);
        if len > 1 {
            self.insert_raw(start + 1, len - 1);
        }
        Some(start)
    }

    fn take_run(&mut self, n: usize) -> Option<usize> {
        let found = self.best_fit(n).or_else(|| {
            if self.singles.is_empty() {
                None
            } else {
                self.coalesce();
                self.best_fit(n)
            }
        });
        let (len, start) = found?;
        self.remove(start, len);
        if len > n {
            self.insert_raw(start + n, len - n);
        }
        Some(start)
    }

    fn best_fit(&self, n: usize) -> Option<(usize, usize)> {
        self.by_len.range((n, 0)..).next().copied()
    }

    /// Merge every pending single into the extents.
    fn coalesce(&mut self) {
        let mut singles = std::mem::take(&mut self.singles);
        singles.sort_unstable();
        // Merge adjacent singles first so a long run of freed pages costs one
        // insert instead of one per page.
        let mut i = 0;
        while i < singles.len() {
            let start = singles[i];
            let mut len = 1;
            while i + len < singles.len() && singles[i + len] == start + len {
                len += 1;
            }
            self.insert(start, len);
            i += len;
        }
        singles.clear();
        self.singles = singles;
    }

    /// Insert a free extent, merging with its neighbours.
    fn insert(&mut self, mut start: usize, mut len: usize) {
        if let Some((&pstart, &plen)) = self.by_start.range(..start).next_back() {
            assert!(pstart + plen <= start, "double free of units {start}..{}", start + len);
            if pstart + plen == start {
                self.remove(pstart, plen);
                start = pstart;
                len += plen;
            }
        }
        if let Some((&nstart, &nlen)) = self.by_start.range(start..).next() {
            assert!(start + len <= nstart, "double free of units {start}..{}", start + len);
            if start + len == nstart {
                self.remove(nstart, nlen);
                len += nlen;
            }
        }
        self.insert_raw(start, len);
    }

    fn insert_raw(&mut self, start: usize, len: usize) {
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn remove(&mut self, start: usize, len: usize) {
        self.by_start.remove(&start);
        self.by_len.remove(&(len, start));
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn singles_and_runs() {
        let e = Extents::new(10);
        let a = e.alloc(1).unwrap();
        let r = e.alloc(4).unwrap();
        assert_eq!(e.free_count(), 5);
        assert!(a < r || a >= r + 4);
        e.free(a, 1);
        e.free(r, 4);
        assert_eq!(e.stats(), ExtentStats { total: 10, free: 10, largest_free_run: 10 });
    }

    #[test]
    fn run_after_fragmentation_needs_coalescing() {
        let e = Extents::new(64);
        let all: Vec<usize> = (0..64).map(|_| e.alloc(1).unwrap()).collect();
        assert_eq!(e.alloc(1), None);
        // Free every other unit: no run of 2 can exist.
        for &u in all.iter().step_by(2) {
            e.free(u, 1);
        }
        assert_eq!(e.alloc(2), None);
        assert_eq!(e.stats().largest_free_run, 1);
        for &u in all.iter().skip(1).step_by(2) {
            e.free(u, 1);
        }
        // Singles are merged lazily: the run request finds the whole range.
        assert_eq!(e.alloc(64), Some(0));
    }

    #[test]
    fn exhaustion_and_bad_sizes() {
        let e = Extents::new(4);
        assert_eq!(e.alloc(0), None);
        assert_eq!(e.alloc(5), None);
        assert_eq!(e.alloc(4), Some(0));
        assert_eq!(e.alloc(1), None);
    }

    #[test]
    fn batch_round_trip() {
        let e = Extents::new(100);
        let mut v = Vec::new();
        assert_eq!(e.alloc_batch(32, &mut v), 32);
        assert_eq!(e.free_count(), 68);
        e.free_batch(v.drain(..));
        assert_eq!(e.stats().largest_free_run, 100);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught_when_merged() {
        let e = Extents::new(8);
        let r = e.alloc(4).unwrap();
        e.free(r, 4);
        e.free(r, 4);
    }
}
