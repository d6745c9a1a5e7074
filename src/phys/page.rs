//! [`Page`]: the `vm_page` stand-in, a reference-counted hold on one frame.

use std::fmt;
use std::ptr::NonNull;

use super::{Pfn, PhysMem};
use crate::error::Result;
use crate::kaddr::Kaddr;
use crate::sync::{fence, AtomicUsize, Ordering};

struct PageInner {
    /// Holds on the frame. The std `Arc` protocol: increment `Relaxed`,
    /// decrement `Release`, `Acquire` fence before the frame is freed.
    refs: AtomicUsize,
    mem: PhysMem,
    pfn: Pfn,
    /// Loom-only instrumentation: holders read it when they touch the
    /// frame, the last holder writes it before freeing.
    #[cfg(loom)]
    probe: crate::sync::UnsafeCell<()>,
}

/// A hold on one frame of a [`PhysMem`] (the kernel's wired `vm_page`).
///
/// Cloning is a hold (one relaxed atomic increment, no system call); the
/// frame returns to the allocator when the last clone is dropped, on
/// whichever thread that happens. A `Page` does not map anything: map it
/// with an lwbuf cache or the sf_buf pool, or read it through the direct map.
pub struct Page {
    inner: NonNull<PageInner>,
    /// `inner.pfn`, kept beside the pointer: mapping caches key on it, and
    /// reading it here saves them a dependent load on the hit path.
    pfn: Pfn,
    /// `inner.mem.id()`, kept beside the pointer for the same reason: a
    /// cache checks that a page is of its memory without a dependent load.
    mem_id: usize,
}

// SAFETY: `PageInner` is only shared through atomics and immutable fields
// (`PhysMem` is Send + Sync); the last holder frees it after an Acquire fence.
unsafe impl Send for Page {}
// SAFETY: as above; `&Page` only reads immutable fields or bumps the count.
unsafe impl Sync for Page {}

const MAX_REFS: usize = isize::MAX as usize;

impl Page {
    pub(crate) fn new(mem: PhysMem, pfn: Pfn) -> Page {
        let mem_id = mem.id();
        let inner = Box::new(PageInner {
            refs: AtomicUsize::new(1),
            mem,
            pfn,
            #[cfg(loom)]
            probe: crate::sync::UnsafeCell::new(()),
        });
        Page { inner: NonNull::from(Box::leak(inner)), pfn, mem_id }
    }

    fn inner(&self) -> &PageInner {
        // SAFETY: `inner` stays allocated while any `Page` (this one) holds it.
        unsafe { self.inner.as_ref() }
    }

    /// The frame number.
    #[inline]
    pub fn pfn(&self) -> Pfn {
        self.pfn
    }

    /// Whether the page is a frame of `mem` (no dependent load).
    #[inline]
    pub(crate) fn is_of(&self, mem: &PhysMem) -> bool {
        self.mem_id == mem.id()
    }

    /// Whether `pages` are frames of `mem` whose numbers follow one another
    /// from the first's. One pass with no branch per page (a huge-page run
    /// is 512 pages, checked at every mapping of it): the differences are
    /// or-ed together and tested once.
    pub(crate) fn is_run_of(pages: &[Page], mem: &PhysMem) -> bool {
        let Some(first) = pages.first() else { return false };
        let (id, pfn0) = (mem.id(), first.pfn.0);
        let off = pages.iter().zip(pfn0..).fold(0usize, |acc, (p, want)| acc | (p.mem_id ^ id) | (p.pfn.0 ^ want));
        // `pfn0..` cannot wrap: frame numbers index a memory.
        off == 0
    }

    /// The memory this frame belongs to.
    #[inline]
    pub fn phys(&self) -> &PhysMem {
        &self.inner().mem
    }

    /// Holds on this frame now (a racy reading, for tests and stats).
    pub fn hold_count(&self) -> usize {
        self.inner().refs.load(Ordering::Relaxed)
    }

    /// Byte offset of the frame in the memfd.
    pub fn offset(&self) -> u64 {
        (self.pfn().0 * self.phys().frame_size()) as u64
    }

    /// The frame's bytes through the direct map; [`crate::Error::NoDirectMap`]
    /// if the `PhysMem` has none. No system call.
    pub fn direct(&self) -> Result<Kaddr<'_>> {
        #[cfg(loom)]
        self.inner().probe.with(|_| ());
        self.phys().direct_view(self.pfn(), 1)
    }
}

impl Clone for Page {
    fn clone(&self) -> Page {
        // Relaxed: a new hold can only be made from an existing one, which
        // already keeps the frame alive; no data is published by it.
        let old = self.inner().refs.fetch_add(1, Ordering::Relaxed);
        if old > MAX_REFS {
            // As std's Arc: a count this high means leaked clones; wrapping
            // would free a frame still in use.
            std::process::abort();
        }
        Page { inner: self.inner, pfn: self.pfn, mem_id: self.mem_id }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // Release: everything this holder did with the frame happens before
        // the frame is freed by whoever drops the last hold.
        let relaxed = crate::sync::mutant!(PageRelaxed);
        let order = if relaxed { Ordering::Relaxed } else { Ordering::Release };
        if self.inner().refs.fetch_sub(1, order) != 1 {
            return;
        }
        // Acquire: pairs with the Release decrements of the other holders.
        if !relaxed {
            fence(Ordering::Acquire);
        }
        // Under loom, the teardown writes what every holder read (see
        // `probe`), so a missing happens-before edge is a reported race.
        #[cfg(loom)]
        self.inner().probe.with_mut(|_| ());
        // SAFETY: this was the last hold: no other `Page` points at `inner`,
        // and it was allocated by `Box` in `Page::new`.
        let inner = unsafe { Box::from_raw(self.inner.as_ptr()) };
        inner.mem.free_frame(inner.pfn);
    }
}

/// How many pages at the start of `run` (at most `max`, at least 1 unless
/// `run` is empty) have frames that follow the first one's: the part of
/// `run` that one mapping of adjacent slots can cover.
pub(crate) fn contiguous_prefix(run: &[Page], max: usize) -> usize {
    let Some(first) = run.first() else { return 0 };
    let pfn0 = first.pfn().0;
    run.iter().take(max.max(1)).enumerate().take_while(|(i, p)| p.pfn().0 == pfn0.wrapping_add(*i)).count()
}

impl PartialEq for Page {
    /// Same frame of the same memory.
    fn eq(&self, other: &Page) -> bool {
        self.pfn() == other.pfn() && self.phys().same_as(other.phys())
    }
}
impl Eq for Page {}

impl fmt::Debug for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Page").field("pfn", &self.pfn().0).field("holds", &self.hold_count()).finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::phys::Backing;

    #[test]
    fn prefix_stops_at_gaps_and_max() {
        let mem = PhysMem::builder().frames(16).backing(Backing::Heap).build().expect("phys");
        let run = mem.alloc_run(6).expect("run");
        assert_eq!(contiguous_prefix(&run, 16), 6);
        assert_eq!(contiguous_prefix(&run, 4), 4);
        assert_eq!(contiguous_prefix(&run, 1), 1);
        assert_eq!(contiguous_prefix(&run, 0), 1);
        assert_eq!(contiguous_prefix(&[], 4), 0);
        let gap = vec![run[0].clone(), run[1].clone(), run[3].clone()];
        assert_eq!(contiguous_prefix(&gap, 16), 2);
    }

    #[test]
    fn a_run_is_contiguous_frames_of_one_memory() {
        let mem = PhysMem::builder().frames(16).backing(Backing::Heap).build().expect("phys");
        let other = PhysMem::builder().frames(16).backing(Backing::Heap).build().expect("phys");
        let run = mem.alloc_run(6).expect("run");
        assert!(Page::is_run_of(&run, &mem));
        assert!(Page::is_run_of(&run[2..3], &mem));
        assert!(!Page::is_run_of(&[], &mem));
        assert!(!Page::is_run_of(&run, &other));
        // A gap, a repeat, the wrong order, and a page of another memory
        // in the middle: each breaks the run wherever it is.
        let swapped = vec![run[0].clone(), run[2].clone(), run[1].clone()];
        assert!(!Page::is_run_of(&swapped, &mem));
        let repeat = vec![run[4].clone(), run[4].clone()];
        assert!(!Page::is_run_of(&repeat, &mem));
        let foreign = other.alloc_run(6).expect("run");
        let mut mixed: Vec<Page> = run.clone();
        mixed[5] = foreign[5].clone();
        assert!(!Page::is_run_of(&mixed, &mem));
        assert!(!Page::is_run_of(&run[..5].iter().chain(&run[1..2]).cloned().collect::<Vec<_>>(), &mem));
    }
}
