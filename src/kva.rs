//! The kernel-virtual-address space of one window: the [`Mmu`] plus its slot
//! allocator. The one place where slots are taken, mapped, unmapped and given
//! back, shared by the lwbuf caches and the sf_buf pool.
//!
//! The types carry the rule the kernels learnt the hard way (DragonFly's
//! resident-count drift, Linux's `kunmap_atomic` race): a slot goes back to a
//! free list only after no handle and no lookup can reach its mapping. A
//! `SlotRun` is a claim on slots nobody refers to; `KvaSpace::map` consumes
//! it into a `Mapping`; the only ways back to a `SlotRun` are
//! `KvaSpace::unmap`, which removes the mapping first, and
//! `KvaSpace::retire`, which under lazy reclaim leaves the old pages entered
//! (a *stale* claim) for the next `map` of the slots to replace in place.
//!
//! Lazy reclaim ([`Reclaim::Lazy`], the default) is how Linux's kmap and
//! vmalloc avoid a TLB flush per release: an evicted mapping stays in the
//! page tables, unreachable, until its slots are reused, and then one
//! `mmap(MAP_FIXED)` maps the new frames straight over it (one system call
//! where unmap-then-map makes two). Stale claims the caches give back wait
//! in a list; they are reused first, and removed in a batch (one call per
//! contiguous range) when the window needs clean slots for a longer run,
//! when the mapping budget or the kernel's `vm.max_map_count` says no room,
//! or when the cache goes away. [`Reclaim::Strict`] removes every evicted
//! mapping at once: nothing released stays readable in the window.
//!
//! A stale claim is in one place at a time, as any claim: the list, a
//! CPU's free slots (lwbuf), the miss that took it to map over it, or the
//! batch removal that took the whole list. The loom models
//! `sfbuf_lazy_replace_vs_reader` and `sfbuf_purge_vs_stale_take` fail when
//! a taken claim stays listed (`StaleTakeKeeps`: a second miss maps over a
//! live handle's slots) and when a removal copies the list instead of
//! taking it (`PurgeSnapshot`: it removes a claim a miss took meanwhile).

use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::extent::Extents;
use crate::mmu::{Mmu, MmuStats, Slot};
use crate::phys::{Page, Pfn};
use crate::sync::{lock, AtomicUsize, Mutex, Ordering};

/// What happens to the mapping of an entry the cache evicts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reclaim {
    /// Leave it entered until its slots are reused (then one `mmap` maps
    /// the new frames over it in place) or removed in a batch: half the
    /// system calls of a miss that evicts, and no TLB flush of its own.
    /// The old frames stay readable at the slots' addresses until then
    /// (no handle or lookup can reach them).
    #[default]
    Lazy,
    /// Remove it at once, as the eviction happens: for stores that keep
    /// pages unmapped except while in use (with `max_excess(0)`, a released
    /// page is unmapped by the release itself).
    Strict,
}

/// What a cached mapping maps: `pages` contiguous frames from `pfn`. The key
/// of both caches. With a mapping granule of G frames, a page (or a run that
/// lies inside one granule) is keyed by its whole granule: `pfn` a multiple
/// of G and `pages` G (fewer for the last granule of the memory); a run that
/// crosses granules by the granules it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct MapKey {
    pub(crate) pfn: usize,
    pub(crate) pages: usize,
}

/// The frames a mapping handle holds: borrowed from the caller for the
/// handle's life, so taking a mapping makes no atomic operation on the
/// pages (a `Page` clone is a locked add on a line other CPUs share). One
/// page, or a run.
pub(crate) type Hold<'a> = &'a [Page];

/// A claim on `len` adjacent free slots. Not `Clone`: it must be mapped or
/// given back.
#[derive(Debug)]
#[must_use = "a SlotRun must be mapped or given back"]
pub(crate) struct SlotRun {
    pub(crate) start: usize,
    pub(crate) len: usize,
    /// Frames still entered from `start` by an evicted mapping (0: clean).
    /// Nothing refers to them; the next `map` replaces them in place.
    pub(crate) stale: usize,
}

/// Slots with frames entered in them. Not `Clone`: it must be unmapped.
#[derive(Debug)]
#[must_use = "a Mapping must be unmapped before its slots are reused"]
pub(crate) struct Mapping {
    run: SlotRun,
    /// Frames entered from the run's first slot (at most `run.len`: a run is
    /// a whole number of granules, the last granule of memory may be short).
    pages: usize,
    addr: NonNull<u8>,
}

// SAFETY: a Mapping is a record (slots, frame, address); it is only
// dereferenced by handles that borrow the cache owning it.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Whether an error means "no room for another mapping": the budget, or
    /// the kernel's `ENOMEM` at the `vm.max_map_count` wall. Evicting a
    /// cached mapping and retrying is the cure for both.
    pub(crate) fn no_room(e: &Error) -> bool {
        matches!(e, Error::MapLimit { .. }) || e.errno() == Some(libc::ENOMEM)
    }

    pub(crate) fn addr(&self) -> NonNull<u8> {
        self.addr
    }
    pub(crate) fn slot(&self) -> Slot {
        Slot(self.run.start)
    }
    /// Slots the mapping holds (a whole number of granules).
    pub(crate) fn slots(&self) -> usize {
        self.run.len
    }
}

/// One window's address space: the MMU, who owns which slot, and the
/// budget of live mappings that keeps the process below `vm.max_map_count`.
#[derive(Debug)]
pub(crate) struct KvaSpace {
    mmu: Arc<dyn Mmu>,
    slots: Extents,
    /// Live mappings (enter calls not yet removed): each is at least one VMA.
    live: AtomicUsize,
    /// Calls that gave slots back (a hint that slots moved; see `gives`).
    gives: AtomicUsize,
    budget: usize,
    reclaim: Reclaim,
    /// Stale claims given back (lazy reclaim), reused before clean slots
    /// and removed in batches; `stale_slots` counts their slots.
    stale: Mutex<Vec<SlotRun>>,
    stale_slots: AtomicUsize,
    /// Removes of stale mappings the MMU refused (they stay listed), and
    /// the last refusal, for a miss that found no room to report.
    purge_failures: AtomicUsize,
    purge_error: Mutex<Option<Error>>,
    /// log2 of the mapping granule in frames: the slot allocator hands out
    /// whole granules, and a page is mapped with its granule.
    shift: u32,
    /// Frames of the memory (the last granule may be short).
    frames: usize,
    /// The MMU's slot size, read once: every handle's `kva()` needs it, and
    /// asking the `dyn Mmu` costs two indirect calls.
    slot_size: usize,
    /// log2 of `slot_size` (frames are a power of two in size).
    slot_shift: u32,
    /// The memory the MMU maps, held here so that checking a page's memory
    /// on every `alloc` makes no indirect call.
    phys: crate::phys::PhysMem,
    /// Whether the MMU maps writable, read once for every handle's view.
    writable: bool,
}

/// The default budget of live mappings for one window: what
/// `/proc/sys/vm/max_map_count` allows, less headroom for the rest of the
/// process (an eighth, at least 1024), halved because a single-page mapping
/// inside a `PROT_NONE` reservation splits it and so costs up to two VMAs.
/// 28,669 with the default limit of 65,530.
/// Under Miri (which isolates the program from the file system) the limit
/// is the kernel's default.
pub fn default_map_budget() -> usize {
    #[cfg(not(miri))]
    let max = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(65_530);
    #[cfg(miri)]
    let max: usize = 65_530;
    let headroom = (max / 8).max(1024);
    (max.saturating_sub(headroom) / 2).max(1)
}

/// [`KvaSpace::granule_index`] for a granule of `1 << shift` frames (the
/// per-CPU indexes use it too, so both agree on where a key lives).
#[inline]
pub(crate) fn granule_index(shift: u32, key: MapKey) -> Option<usize> {
    if shift == 0 {
        return (key.pages <= 1).then_some(key.pfn);
    }
    let g = 1usize << shift;
    (key.pfn & (g - 1) == 0 && key.pages <= g).then_some(key.pfn >> shift)
}

impl KvaSpace {
    /// The slot allocator of `mmu`'s window. [`Error::WindowClaimed`] if
    /// another allocator has it (two would hand out the same slots) or
    /// frames are entered in it by hand; the claim ends when this drops.
    ///
    /// `granule`: the frames mapped, cached and evicted as one unit (a power
    /// of two, at most the window's slots; on huge-page memory a multiple of
    /// the frames in a huge page). `None`: the memory's smallest granule (1
    /// frame, or one huge page). [`Error::Config`] names a bad one.
    pub(crate) fn new(
        mmu: Arc<dyn Mmu>,
        budget: Option<usize>,
        granule: Option<usize>,
        reclaim: Reclaim,
    ) -> Result<Self> {
        let phys = mmu.phys().clone();
        let min = phys.min_granule();
        let granule = granule.unwrap_or(min);
        check_granule(granule, min, mmu.capacity())?;
        // Before the claim: an error after it would leave the window claimed.
        let slot_size = mmu.slot_size();
        if !slot_size.is_power_of_two() {
            return Err(Error::config("frame_size", format!("{slot_size}-byte slots: not a power of two")));
        }
        mmu.claim()?;
        let shift = granule.trailing_zeros();
        let slots = Extents::new(mmu.capacity() >> shift);
        let budget = budget.unwrap_or_else(default_map_budget);
        let writable = mmu.writable();
        let frames = phys.frames();
        Ok(KvaSpace {
            mmu,
            slots,
            live: AtomicUsize::new(0),
            gives: AtomicUsize::new(0),
            budget,
            reclaim,
            stale: Mutex::new(Vec::new()),
            stale_slots: AtomicUsize::new(0),
            purge_failures: AtomicUsize::new(0),
            purge_error: Mutex::new(None),
            shift,
            frames,
            slot_size,
            slot_shift: slot_size.trailing_zeros(),
            phys,
            writable,
        })
    }

    /// A view of `len` mapped bytes at `addr`, read-only when the MMU maps
    /// read-only.
    ///
    /// # Safety
    /// As [`Kaddr::new`]'s: `addr..addr + len` stays mapped (readable, and
    /// writable if the MMU maps writable) for `'a`.
    #[inline]
    pub(crate) unsafe fn view<'a>(&self, addr: NonNull<u8>, len: usize) -> crate::kaddr::Kaddr<'a> {
        // SAFETY: the caller's contract; the access follows the MMU's.
        unsafe { crate::kaddr::Kaddr::with_access(addr, len, self.writable) }
    }

    /// The mapping granule, in frames (and slots).
    #[inline]
    pub(crate) fn granule(&self) -> usize {
        1 << self.shift
    }

    /// Slots a mapping of `pages` frames takes: whole granules.
    #[inline]
    pub(crate) fn slots_for(&self, pages: usize) -> usize {
        let g = self.granule();
        pages.div_ceil(g) * g
    }

    /// The key under which `n` contiguous frames from `first` are mapped:
    /// the granules they lie in (one granule: the key the per-frame indexes
    /// hold), cut at the end of the memory. With a granule of 1 frame, the
    /// frames themselves.
    #[inline]
    pub(crate) fn key_of(&self, first: usize, n: usize) -> MapKey {
        debug_assert!(n >= 1 && first + n <= self.frames, "frames {first}+{n} of {}", self.frames);
        if self.shift == 0 {
            // The hit path's case: no rounding, and the frames lie inside
            // the memory (pages of it), so nothing to cut.
            return MapKey { pfn: first, pages: n };
        }
        let g = self.granule();
        let base = first & !(g - 1);
        let end = if first + n <= base + g { base + g } else { (first + n).div_ceil(g) * g };
        MapKey { pfn: base, pages: end.min(self.frames) - base }
    }

    /// Whether `key` is one granule (the keys the per-frame indexes hold),
    /// and its granule number.
    #[inline]
    pub(crate) fn granule_index(&self, key: MapKey) -> Option<usize> {
        granule_index(self.shift, key)
    }

    /// log2 of the granule.
    #[inline]
    pub(crate) fn granule_shift(&self) -> u32 {
        self.shift
    }

    /// The address of frame `pfn` inside a mapping of `key` at `addr`.
    /// No branch: frames are a power of two in size, so the offset is a
    /// shift (0 for a granule of one frame, or a granule's first page).
    #[inline]
    pub(crate) fn addr_in(&self, key: MapKey, addr: NonNull<u8>, pfn: usize) -> NonNull<u8> {
        debug_assert!(pfn >= key.pfn && pfn < key.pfn + key.pages);
        debug_assert_eq!(1 << self.slot_shift, self.slot_size);
        // SAFETY: `pfn` is one of the key's frames, so the offset stays
        // inside the mapping that starts at `addr`.
        unsafe { addr.add((pfn - key.pfn) << self.slot_shift) }
    }

    /// The index of the granule holding frame `pfn` (a frame of the
    /// memory): [`page_granule`](Self::page_granule)'s second half.
    #[inline(always)]
    pub(crate) fn page_index(&self, pfn: usize) -> usize {
        pfn >> self.shift
    }

    /// The address of frame `pfn` inside the mapping at `addr` of the
    /// granule holding it: [`addr_in`](Self::addr_in) for a granule key.
    #[inline(always)]
    pub(crate) fn frame_in_granule(&self, addr: NonNull<u8>, pfn: usize) -> NonNull<u8> {
        // SAFETY: `pfn`'s place in its granule is below the granule's
        // frames that lie in the memory, all mapped from `addr`.
        unsafe { addr.add((pfn & ((1 << self.shift) - 1)) << self.slot_shift) }
    }

    /// The key of the granule holding frame `pfn` (a frame of the memory)
    /// and its index: [`key_of`](Self::key_of)`(pfn, 1)` and
    /// [`granule_index`](Self::granule_index) of it, for the single-page
    /// hit path, without a branch (with a granule of one frame the mask
    /// keeps every bit and the cut at the memory's end leaves one page).
    #[inline(always)]
    pub(crate) fn page_granule(&self, pfn: usize) -> (MapKey, usize) {
        debug_assert!(pfn < self.frames);
        let base = (pfn >> self.shift) << self.shift;
        let key = MapKey { pfn: base, pages: (self.frames - base).min(1 << self.shift) };
        debug_assert_eq!(key, self.key_of(pfn, 1));
        debug_assert_eq!(Some(self.page_index(pfn)), self.granule_index(key));
        (key, self.page_index(pfn))
    }

    /// Live mappings now, and the budget.
    pub(crate) fn live_mappings(&self) -> (usize, usize) {
        (self.live.load(Ordering::Relaxed), self.budget)
    }

    /// How the send engines fault in what they send from this space
    /// (`kaddr::Prefaulter`): the mappings are whole granules, at
    /// addresses aligned to the fault block when a granule is at least one
    /// ([`Window`](crate::Window) aligns its base so). Under an `Mmu` whose
    /// slots are not so aligned, a block may straddle two mappings and a
    /// page be left for the kernel to fault in: slower, never wrong.
    pub(crate) fn prefault_plan(&self) -> crate::kaddr::PrefaultPlan {
        let phys = &self.phys;
        crate::kaddr::PrefaultPlan::new(phys.frame_size(), phys.min_granule(), self.granule())
    }

    /// The memory the window maps.
    pub(crate) fn phys(&self) -> &crate::phys::PhysMem {
        &self.phys
    }

    pub(crate) fn mmu(&self) -> &Arc<dyn Mmu> {
        &self.mmu
    }

    /// Slots the caches can use: whole granules.
    pub(crate) fn capacity(&self) -> usize {
        self.slots.total() << self.shift
    }

    /// Slots free for a new mapping: clean ones and stale ones.
    pub(crate) fn free_slots(&self) -> usize {
        let stale = if self.lazy() { self.stale_slots.load(Ordering::Relaxed) } else { 0 };
        (self.slots.free_count() << self.shift) + stale
    }

    /// The last refusal of a batch remove, if one happened since the last
    /// call: a miss that found no room reports it rather than a full
    /// window (the room is there, behind the refused remove).
    pub(crate) fn take_purge_error(&self) -> Option<Error> {
        if !self.lazy() || self.purge_failures.load(Ordering::Relaxed) == 0 {
            return None;
        }
        lock(&self.purge_error).take()
    }

    /// Batch removes of stale mappings the MMU refused so far.
    pub(crate) fn purge_failures(&self) -> u64 {
        self.purge_failures.load(Ordering::Relaxed) as u64
    }

    /// Whether evicted mappings may be left entered (stale claims exist
    /// only then: under strict reclaim none of the stale-list work runs).
    #[inline]
    fn lazy(&self) -> bool {
        self.reclaim == Reclaim::Lazy
    }

    /// What evicted mappings become.
    pub(crate) fn reclaim(&self) -> Reclaim {
        self.reclaim
    }

    #[inline]
    pub(crate) fn slot_size(&self) -> usize {
        self.slot_size
    }

    pub(crate) fn mmu_stats(&self) -> MmuStats {
        self.mmu.stats()
    }

    /// Check that `page` is a frame of the memory this window maps.
    #[inline]
    pub(crate) fn check_page(&self, page: &Page) -> Result<()> {
        if page.is_of(&self.phys) {
            Ok(())
        } else {
            Err(Error::ForeignPage)
        }
    }

    /// The key and hold for a run of pages whose frames must be contiguous
    /// frames of this window's memory.
    pub(crate) fn run_key<'a>(&self, pages: &'a [Page]) -> Result<(MapKey, Hold<'a>)> {
        let first = pages.first().ok_or_else(|| Error::config("pages", "a run needs at least one page"))?;
        // Every page of this memory, and each frame the one after the last.
        if !Page::is_run_of(pages, &self.phys) {
            // Which page, for the error: a second pass, only on failure.
            let pfn0 = first.pfn().0;
            for (n, p) in pages.iter().enumerate() {
                self.check_page(p)?;
                if p.pfn().0 != pfn0.wrapping_add(n) {
                    return Err(Error::config("pages", format!("frame {} breaks the run at index {n}", p.pfn().0)));
                }
            }
        }
        let key = self.key_of(first.pfn().0, pages.len());
        if self.slots_for(key.pages) > self.capacity() {
            return Err(Error::WindowFull { requested: self.slots_for(key.pages), capacity: self.capacity() });
        }
        Ok((key, pages))
    }

    /// Claim adjacent free slots for a mapping of `pages` frames (whole
    /// granules).
    ///
    /// A stale claim of the right length is taken first (its old pages are
    /// replaced in place by `map`); then clean slots; if there are none and
    /// stale claims wait, they are removed in a batch and clean slots tried
    /// again.
    pub(crate) fn take(&self, pages: usize) -> Option<SlotRun> {
        let units = pages.div_ceil(self.granule());
        let len = units << self.shift;
        if let Some(run) = self.take_stale(len) {
            return Some(run);
        }
        if let Some(u) = self.slots.alloc(units) {
            return Some(SlotRun { start: u << self.shift, len, stale: 0 });
        }
        if self.purge() > 0 {
            return self.slots.alloc(units).map(|u| SlotRun { start: u << self.shift, len, stale: 0 });
        }
        None
    }

    /// A stale claim of exactly `len` slots, if one waits.
    fn take_stale(&self, len: usize) -> Option<SlotRun> {
        // Relaxed: a hint that saves the lock when the list is empty.
        if !self.lazy() || self.stale_slots.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut stale = lock(&self.stale);
        let i = stale.iter().rposition(|r| r.len == len)?;
        if crate::sync::mutant!(StaleTakeKeeps) {
            return Some(SlotRun { ..stale[i] });
        }
        let run = stale.swap_remove(i);
        self.stale_slots.fetch_sub(run.len, Ordering::Relaxed);
        Some(run)
    }

    /// Claim up to `max` single granules in one lock round trip: stale
    /// ones first, then clean ones.
    pub(crate) fn take_batch(&self, max: usize, out: &mut Vec<SlotRun>) -> usize {
        let mut n = 0;
        if self.lazy() && self.stale_slots.load(Ordering::Relaxed) != 0 {
            let mut stale = lock(&self.stale);
            let g = self.granule();
            let mut i = stale.len();
            while i > 0 && n < max {
                i -= 1;
                if stale[i].len == g {
                    let run = stale.swap_remove(i);
                    self.stale_slots.fetch_sub(run.len, Ordering::Relaxed);
                    out.push(run);
                    n += 1;
                }
            }
        }
        if n < max {
            let mut raw = Vec::with_capacity(max - n);
            n += self.slots.alloc_batch(max - n, &mut raw);
            out.extend(raw.into_iter().map(|u| SlotRun { start: u << self.shift, len: self.granule(), stale: 0 }));
        }
        if n == 0 && self.purge() > 0 {
            return self.take_batch(max, out);
        }
        n
    }

    /// Give back a claim nobody refers to: clean slots go to the allocator,
    /// a stale claim waits for reuse or the next batch removal.
    pub(crate) fn give(&self, run: SlotRun) {
        if run.stale > 0 {
            self.stale_slots.fetch_add(run.len, Ordering::Relaxed);
            lock(&self.stale).push(run);
        } else {
            self.slots.free(run.start >> self.shift, run.len >> self.shift);
        }
        self.gives.fetch_add(1, Ordering::Relaxed);
    }

    /// Give back single granules in one lock round trip (per kind).
    pub(crate) fn give_batch(&self, runs: impl IntoIterator<Item = SlotRun>) {
        let mut n = 0;
        let mut stale = Vec::new();
        self.slots.free_batch(runs.into_iter().filter_map(|r| {
            debug_assert_eq!(r.len, self.granule());
            n += 1;
            if r.stale > 0 {
                stale.push(r);
                None
            } else {
                Some(r.start >> self.shift)
            }
        }));
        if !stale.is_empty() {
            self.stale_slots.fetch_add(stale.len() << self.shift, Ordering::Relaxed);
            lock(&self.stale).append(&mut stale);
        }
        if n > 0 {
            self.gives.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Remove every stale claim waiting in the list, one MMU call per
    /// contiguous range of fully entered claims, and free their slots.
    /// Returns the slots freed. A claim whose removal fails goes back to
    /// the list (still entered, still unreachable).
    pub(crate) fn purge(&self) -> usize {
        if !self.lazy() {
            return 0;
        }
        let snapshot = crate::sync::mutant!(PurgeSnapshot);
        let mut runs = if snapshot {
            lock(&self.stale).iter().map(|r| SlotRun { ..*r }).collect()
        } else {
            std::mem::take(&mut *lock(&self.stale))
        };
        if runs.is_empty() {
            return 0;
        }
        runs.sort_unstable_by_key(|r| r.start);
        let mut freed = 0;
        let mut failed = Vec::new();
        let mut i = 0;
        while i < runs.len() {
            // Coalesce neighbours whose every slot is entered: one remove.
            let mut j = i + 1;
            let mut end = runs[i].start + runs[i].stale;
            while j < runs.len() && runs[j - 1].stale == runs[j - 1].len && runs[j].start == end {
                end = runs[j].start + runs[j].stale;
                j += 1;
            }
            let start = runs[i].start;
            // SAFETY: stale claims are unreachable: their entries were
            // evicted (count zero, out of every lookup) before they were
            // retired, and a claim is in one place at a time (this list).
            match unsafe { self.mmu.remove(Slot(start), end - start) } {
                Ok(()) => {
                    for r in &runs[i..j] {
                        self.live.fetch_sub(1, Ordering::Relaxed);
                        self.stale_slots.fetch_sub(r.len, Ordering::Relaxed);
                        self.slots.free(r.start >> self.shift, r.len >> self.shift);
                        freed += r.len;
                    }
                }
                Err(e) => {
                    self.purge_failures.fetch_add(1, Ordering::Relaxed);
                    *lock(&self.purge_error) = Some(e);
                    failed.extend(runs[i..j].iter().map(|r| SlotRun { ..*r }));
                }
            }
            i = j;
        }
        if snapshot {
            // The mutant unlists what it removed only now.
            lock(&self.stale).retain(|r| !runs.iter().any(|d| d.start == r.start));
        }
        if !failed.is_empty() {
            lock(&self.stale).append(&mut failed);
        }
        if freed > 0 {
            self.gives.fetch_add(1, Ordering::Relaxed);
        }
        freed
    }

    /// How many times slots were given back so far: a miss that found the
    /// window full compares it across its reclaim pass to tell whether
    /// slots moved meanwhile. Relaxed: a hint, never a proof.
    pub(crate) fn gives(&self) -> usize {
        self.gives.load(Ordering::Relaxed)
    }

    /// Enter `pages` contiguous frames from `pfn` (at most `run.len`) into
    /// the claimed slots: one MMU call. On failure the claim comes back with the error.
    /// [`Error::MapLimit`] if the budget of live mappings is used up (evict
    /// a cached mapping and retry).
    ///
    /// A stale claim is mapped over in place (one call); its old mapping
    /// already counts against the budget.
    pub(crate) fn map(&self, run: SlotRun, pfn: Pfn, pages: usize) -> std::result::Result<Mapping, (Error, SlotRun)> {
        debug_assert!(pages >= 1 && pages <= run.len);
        if run.stale > 0 {
            return self.map_over(run, pfn, pages);
        }
        // Relaxed: a counter; the budget is a soft limit checked per call.
        if self.live.fetch_add(1, Ordering::Relaxed) >= self.budget {
            self.live.fetch_sub(1, Ordering::Relaxed);
            // Stale mappings count too: removing them may make room.
            if self.purge() == 0 {
                return Err((Error::MapLimit { budget: self.budget }, run));
            }
            if self.live.fetch_add(1, Ordering::Relaxed) >= self.budget {
                self.live.fetch_sub(1, Ordering::Relaxed);
                return Err((Error::MapLimit { budget: self.budget }, run));
            }
        }
        // SAFETY: `run` is a claim on free slots: nothing is entered there and
        // nothing refers to them (the SlotRun protocol of this module).
        match unsafe { self.mmu.enter(Slot(run.start), pfn, pages) } {
            Ok(addr) => Ok(Mapping { run, pages, addr }),
            Err(e) => {
                self.live.fetch_sub(1, Ordering::Relaxed);
                // At the kernel's wall, stale mappings are what to give up
                // first: remove them and try once more.
                if e.errno() == Some(libc::ENOMEM) && self.purge() > 0 {
                    return self.map(run, pfn, pages);
                }
                Err((e, run))
            }
        }
    }

    /// Map over a stale claim in place: one MMU call, no change of the
    /// live count (one mapping replaces another). On failure the claim
    /// comes back clean or still stale, as the MMU left its slots.
    fn map_over(&self, mut run: SlotRun, pfn: Pfn, pages: usize) -> std::result::Result<Mapping, (Error, SlotRun)> {
        // SAFETY: a stale claim is unreachable (see `purge`), and its slots
        // beyond `stale` are empty: the claim is ours alone.
        match unsafe { self.mmu.replace(Slot(run.start), pfn, pages, run.stale) } {
            Ok(addr) => {
                run.stale = 0;
                Ok(Mapping { run, pages, addr })
            }
            Err(e) => {
                if self.mmu.translate(Slot(run.start)).is_none() {
                    run.stale = 0;
                    self.live.fetch_sub(1, Ordering::Relaxed);
                }
                if e.errno() != Some(libc::ENOMEM) {
                    return Err((e, run));
                }
                // At the `vm.max_map_count` wall even an exact replace can
                // fail (it needs a new VMA before the old one goes): remove
                // the old mapping (`munmap` still works there), then the
                // other stale ones, and map into the clean slots.
                if run.stale > 0 {
                    // SAFETY: as above: the stale claim is ours alone.
                    match unsafe { self.mmu.remove(Slot(run.start), run.stale) } {
                        Ok(()) => {
                            run.stale = 0;
                            self.live.fetch_sub(1, Ordering::Relaxed);
                        }
                        Err(_) => return Err((e, run)),
                    }
                }
                self.purge();
                self.map(run, pfn, pages)
            }
        }
    }

    /// Give up a mapping nobody can reach any more (an evicted entry): under
    /// lazy reclaim its slots come back as a stale claim with no system
    /// call; under strict reclaim it is removed first, as
    /// [`unmap`](Self::unmap).
    ///
    /// # Safety
    /// As for [`unmap`](Self::unmap).
    pub(crate) unsafe fn retire(&self, m: Mapping) -> std::result::Result<SlotRun, (Error, Mapping)> {
        match self.reclaim {
            Reclaim::Lazy => Ok(SlotRun { stale: m.pages, ..m.run }),
            // SAFETY: the caller's contract.
            Reclaim::Strict => unsafe { self.unmap(m) },
        }
    }

    /// Remove a mapping; its slots come back as a claim, to reuse or give
    /// back. On failure the mapping is handed back intact.
    ///
    /// # Safety
    /// No handle may still reach the mapping's address: its reference count
    /// is zero and no lookup can find it any more.
    pub(crate) unsafe fn unmap(&self, m: Mapping) -> std::result::Result<SlotRun, (Error, Mapping)> {
        // SAFETY: the caller guarantees nothing accesses the slots.
        match unsafe { self.mmu.remove(Slot(m.run.start), m.pages) } {
            Ok(()) => {
                self.live.fetch_sub(1, Ordering::Relaxed);
                Ok(m.run)
            }
            Err(e) => Err((e, m)),
        }
    }
}

/// [`Error::Config`] unless `granule` is a power of two, a multiple of
/// `min` (the memory's huge page, in frames) and at most `slots`.
fn check_granule(granule: usize, min: usize, slots: usize) -> Result<()> {
    if !granule.is_power_of_two() {
        return Err(Error::config("granule", format!("{granule} frames is not a power of two")));
    }
    if granule % min != 0 {
        return Err(Error::config(
            "granule",
            format!("{granule} frames does not cover whole huge pages of the memory ({min} frames each)"),
        ));
    }
    if granule > slots {
        return Err(Error::config("granule", format!("{granule} frames is larger than the window ({slots} slots)")));
    }
    Ok(())
}

impl Drop for KvaSpace {
    fn drop(&mut self) {
        // The caches gave back every claim: remove the stale ones.
        self.purge();
        // The cache that owned this allocator has removed what it could (a
        // mapping whose remove failed stays entered, and then the window
        // refuses a new claim: its slot would be handed out while mapped).
        self.mmu.unclaim();
    }
}
