//! [`CpuMask`]: a set of CPU ids with atomic words, inline up to 256 CPUs.

use std::fmt;

use crate::sync::{AtomicPtr, AtomicU64, Ordering};

/// CPUs a mask holds without a heap allocation.
pub const INLINE_CPUS: usize = 256;
const INLINE_WORDS: usize = INLINE_CPUS / 64;

enum Words {
    Inline([AtomicU64; INLINE_WORDS]),
    Heap(Box<[AtomicU64]>),
}

/// A set of CPU ids, sized for a given CPU count. Every word is atomic, so a
/// mask may be read and extended through a shared reference (an lwbuf handle
/// used from several CPUs at once). Up to 256 CPUs it lives inline (no heap
/// allocation); beyond that it takes one.
pub struct CpuMask {
    words: Words,
    nwords: usize,
}

impl CpuMask {
    /// An empty mask for CPUs `0..ncpus`.
    pub fn new(ncpus: usize) -> Self {
        let nwords = ncpus.div_ceil(64).max(1);
        let words = if nwords <= INLINE_WORDS {
            Words::Inline(std::array::from_fn(|_| AtomicU64::new(0)))
        } else {
            Words::Heap((0..nwords).map(|_| AtomicU64::new(0)).collect())
        };
        CpuMask { words, nwords }
    }

    /// A mask holding only `cpu`. Panics if `cpu` is beyond the capacity.
    #[inline]
    pub fn single(ncpus: usize, cpu: usize) -> Self {
        let nwords = ncpus.div_ceil(64).max(1);
        assert!(cpu / 64 < nwords, "CPU {cpu} does not fit a mask for {ncpus} CPUs");
        // The bit is set as the words are made, not with `insert`: every
        // `alloc` builds one of these, and an uncontended atomic
        // read-modify-write measured ~11 ns on the 2-vCPU test VM (a plain
        // store ~1 ns).
        let (at, bit) = (cpu / 64, 1u64 << (cpu % 64));
        let words = if nwords <= INLINE_WORDS {
            let w = |i: usize| AtomicU64::new(if i == at { bit } else { 0 });
            Words::Inline([w(0), w(1), w(2), w(3)])
        } else {
            Words::Heap((0..nwords).map(|i| AtomicU64::new(if i == at { bit } else { 0 })).collect())
        };
        CpuMask { words, nwords }
    }

    #[inline]
    fn words(&self) -> &[AtomicU64] {
        match &self.words {
            Words::Inline(w) => &w[..self.nwords],
            Words::Heap(w) => w,
        }
    }

    /// CPU ids the mask can hold.
    pub fn capacity(&self) -> usize {
        self.nwords * 64
    }

    /// Add `cpu`; returns whether it was already there. Panics if `cpu` is
    /// beyond the capacity (callers check the CPU id first).
    #[inline]
    pub fn insert(&self, cpu: usize) -> bool {
        // Relaxed: the mask records membership; the entries it names are
        // protected by their CPU's lock, which orders everything else.
        self.words()[cpu / 64].fetch_or(1 << (cpu % 64), Ordering::Relaxed) & (1 << (cpu % 64)) != 0
    }

    /// Remove `cpu`; returns whether it was there.
    #[inline]
    pub fn remove(&self, cpu: usize) -> bool {
        self.words()[cpu / 64].fetch_and(!(1 << (cpu % 64)), Ordering::Relaxed) & (1 << (cpu % 64)) != 0
    }

    /// Whether `cpu` is in the mask (false beyond the capacity).
    #[inline]
    pub fn contains(&self, cpu: usize) -> bool {
        self.words().get(cpu / 64).is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (cpu % 64)) != 0)
    }

    /// Whether the mask holds `cpu` and nothing else.
    #[inline]
    pub fn is_only(&self, cpu: usize) -> bool {
        let (at, bit) = (cpu / 64, 1u64 << (cpu % 64));
        at < self.nwords
            && self.words().iter().enumerate().all(|(i, w)| w.load(Ordering::Relaxed) == if i == at { bit } else { 0 })
    }

    /// Number of CPUs in the mask.
    pub fn count(&self) -> usize {
        self.words().iter().map(|w| w.load(Ordering::Relaxed).count_ones() as usize).sum()
    }

    /// Whether the mask is empty.
    pub fn is_empty(&self) -> bool {
        self.words().iter().all(|w| w.load(Ordering::Relaxed) == 0)
    }

    /// The CPUs in the mask, in increasing order (a snapshot per word).
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words().iter().enumerate().flat_map(|(i, w)| {
            let mut bits = w.load(Ordering::Relaxed);
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(i * 64 + b)
            })
        })
    }
}

impl Clone for CpuMask {
    /// A snapshot: each word read once (relaxed).
    fn clone(&self) -> Self {
        let m = CpuMask::new(self.nwords * 64);
        for (d, w) in m.words().iter().zip(self.words()) {
            d.store(w.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        m
    }
}

impl fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// The CPUs other than its home on which an lwbuf handle holds an entry.
/// CPU ids below 64 live in one word; a mask for the rest is allocated the
/// first time a handle is used on such a CPU. A fresh handle carries two
/// zero words instead of a whole [`CpuMask`], and its release checks "used
/// nowhere else" with two loads.
pub(crate) struct Others {
    low: AtomicU64,
    /// Null, or a leaked `Box<CpuMask>` for `ncpus` CPUs (only ids >= 64
    /// are set in it), freed by [`free`](Self::free).
    high: AtomicPtr<CpuMask>,
}

impl Others {
    /// No CPU.
    pub(crate) fn new() -> Self {
        Others { low: AtomicU64::new(0), high: AtomicPtr::new(std::ptr::null_mut()) }
    }

    /// Whether no CPU is in the set.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.low.load(Ordering::Relaxed) == 0 && self.high().is_none()
    }

    #[inline]
    fn high(&self) -> Option<&CpuMask> {
        // Acquire: pairs with the release of the CAS that published the
        // mask, so its words are initialized when read.
        let p = self.high.load(Ordering::Acquire);
        // SAFETY: a non-null `high` points to a CpuMask leaked by `insert`
        // and freed only by `free`, which has `&mut self`: it outlives the
        // borrow of `self`.
        unsafe { p.as_ref() }
    }

    /// Whether `cpu` is in the set.
    #[inline]
    pub(crate) fn contains(&self, cpu: usize) -> bool {
        if cpu < 64 {
            self.low.load(Ordering::Relaxed) & (1 << cpu) != 0
        } else {
            self.high().is_some_and(|m| m.contains(cpu))
        }
    }

    /// Add `cpu` (`< ncpus`). Relaxed, as [`CpuMask::insert`]: the entries
    /// the set names are protected by their CPU's lock.
    pub(crate) fn insert(&self, cpu: usize, ncpus: usize) {
        if cpu < 64 {
            self.low.fetch_or(1 << cpu, Ordering::Relaxed);
            return;
        }
        let m = match self.high() {
            Some(m) => m,
            None => {
                let fresh = Box::into_raw(Box::new(CpuMask::new(ncpus)));
                match self.high.compare_exchange(std::ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
                    // SAFETY: just published; freed only by `free`.
                    Ok(_) => unsafe { &*fresh },
                    Err(theirs) => {
                        // SAFETY: `fresh` was never shared: the CAS failed.
                        drop(unsafe { Box::from_raw(fresh) });
                        // SAFETY: another insert published `theirs`; freed
                        // only by `free`.
                        unsafe { &*theirs }
                    }
                }
            }
        };
        m.insert(cpu);
    }

    /// The CPUs in the set, in increasing order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        let mut low = self.low.load(Ordering::Relaxed);
        let low = std::iter::from_fn(move || {
            (low != 0).then(|| {
                let b = low.trailing_zeros() as usize;
                low &= low - 1;
                b
            })
        });
        low.chain(self.high().into_iter().flat_map(|m| m.iter()))
    }
}

impl Others {
    /// Free the mask of ids >= 64, if any. Not a `Drop`: a handle released
    /// at home, used nowhere else, has none, and without drop glue of its
    /// own the handle's `drop` inlines whole into its caller. The handle
    /// calls this on every release that finds the set non-empty; a handle
    /// leaked with `mem::forget` leaks the mask with it.
    pub(crate) fn free(&mut self) {
        // A swap, not `get_mut` (loom's atomics have none); `&mut self`
        // means no one else can store, and a second call finds null.
        let p = self.high.swap(std::ptr::null_mut(), Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: leaked by `insert` and owned by this set alone.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn single_holds_exactly_its_cpu() {
        for (n, cpu) in [(1, 0), (64, 63), (65, 64), (256, 255), (257, 256), (4096, 4095)] {
            let m = CpuMask::single(n, cpu);
            assert_eq!(m.iter().collect::<Vec<_>>(), [cpu]);
            assert!(m.insert(cpu), "already there");
            assert_eq!(m.count(), 1);
            let copy = m.clone();
            copy.insert(cpu ^ 1);
            assert_eq!(m.count(), 1, "a clone is a snapshot");
            assert_eq!(copy.iter().collect::<Vec<_>>(), [cpu.min(cpu ^ 1), cpu.max(cpu ^ 1)]);
            assert!(m.is_only(cpu));
            assert!(!m.is_only(cpu ^ 1));
            if cpu > 0 {
                m.insert(0);
                assert!(!m.is_only(cpu));
            }
        }
    }

    #[test]
    fn set_ops_inline_and_heap() {
        for n in [1, 64, 65, 256, 257, 1024] {
            let m = CpuMask::new(n);
            assert!(m.is_empty());
            assert!(!m.insert(0));
            assert!(m.insert(0));
            assert_eq!(m.insert(n - 1), n == 1, "CPU n-1 is CPU 0 when n == 1");
            assert!(m.contains(n - 1));
            assert!(!m.contains(n + 1000));
            assert_eq!(m.count(), if n == 1 { 1 } else { 2 });
            assert_eq!(m.iter().collect::<Vec<_>>(), if n == 1 { vec![0] } else { vec![0, n - 1] });
            assert!(m.remove(0));
            assert!(!m.remove(0));
        }
    }

    #[test]
    fn others_low_and_high() {
        for n in [1, 64, 65, 256, 300] {
            let mut o = Others::new();
            assert!(o.is_empty());
            let want: Vec<usize> = [0, 5, 63, 64, 200, 299].into_iter().filter(|&c| c < n).collect();
            for &c in want.iter().rev() {
                assert!(!o.contains(c));
                o.insert(c, n);
                o.insert(c, n);
                assert!(o.contains(c));
            }
            assert_eq!(o.is_empty(), want.is_empty());
            assert_eq!(o.iter().collect::<Vec<_>>(), want);
            assert!(!o.contains(n - 1) || want.contains(&(n - 1)));
            o.free();
            assert_eq!(o.iter().collect::<Vec<_>>(), want.iter().copied().filter(|&c| c < 64).collect::<Vec<_>>());
            o.free();
        }
    }
}
