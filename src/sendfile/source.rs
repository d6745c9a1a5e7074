//! Where the mapping-based send paths get their addresses: the [`MapSource`]
//! seam, the direct map, and per-request window mappings.

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kva::{KvaSpace, Mapping};
use crate::mmu::{Mmu, MmuStats, Window};
use crate::phys::{contiguous_prefix, Page, PhysMem};
use crate::sync::{AtomicU64, Ordering};

/// A mapping of one or more contiguous frames, as a [`MapSource`] hands it
/// out: an address and a length that stay valid until the handle is dropped.
///
/// The send paths only hand the addresses to the kernel (`writev`,
/// `sendmsg`), which validates them itself; they never form Rust references
/// to the bytes.
pub trait Mapped {
    /// The address of the first byte of the first frame mapped.
    fn as_ptr(&self) -> *const u8;

    /// Bytes mapped from there: a whole number of frames, at least one.
    fn len(&self) -> usize;

    /// Never true for a valid mapping; here for clippy's sake.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Something that maps pages for the send paths: the direct map, a window
/// mapped per request, the sf_buf pool and the lwbuf caches.
///
/// `map` gets a run of pages whose frames are contiguous (one
/// [`FileRun`](super::FileRun)) and maps a prefix of it, at least one page:
/// the whole run where it can (one `mmap` for a window), a single page where
/// it maps one page at a time. The send engine calls it again for the rest.
/// Dropping the handle releases the mapping; the engine drops each handle as
/// soon as the kernel no longer needs its addresses (right after the
/// `writev` that covered it, or after a `MSG_ZEROCOPY` completion).
///
/// Errors: [`Error::WindowFull`], [`Error::MapLimit`] and
/// [`Error::WouldBlock`] mean "nothing free now": the engine sends what it
/// has mapped, releases it, and asks again; once it holds nothing, it asks
/// [`map_idle`](Self::map_idle), which may wait for room. Any other error
/// ends the send.
pub trait MapSource {
    /// The handle of one mapping; it may borrow the source.
    type Mapping<'s>: Mapped
    where
        Self: 's;

    /// Map a prefix (at least one page) of `run`, a non-empty slice of pages
    /// with contiguous frames. The mapping may borrow the pages (the cache
    /// handles do, instead of taking a reference count on each).
    fn map<'s>(&'s self, run: &'s [Page]) -> Result<Self::Mapping<'s>>;

    /// As [`map`](Self::map), asked when `map` found nothing free and the
    /// caller holds no mapping of this source: a source that can wait for
    /// room (a pool whose slots other requests hold) waits here, where
    /// waiting cannot deadlock. `map` itself must not wait. Default: `map`.
    fn map_idle<'s>(&'s self, run: &'s [Page]) -> Result<Self::Mapping<'s>> {
        self.map(run)
    }

    /// For a source that caches mappings by their frames (first frame and
    /// length), the grid its mappings of a run lie on: the send engine then
    /// asks for whole chunks of `grid` pages of a run of contiguous frames,
    /// counted from the run's first page (the last chunk may be shorter),
    /// and sends the part of each it needs, so that requests for different
    /// ranges of a file map, and find, the same chunks. Such a source must
    /// map every chunk whole (the engine fails the send otherwise). `None`
    /// (the default): the engine asks for just the pages it sends.
    fn run_grid(&self) -> Option<usize> {
        None
    }

    /// Counters of the MMU underneath, if the source maps through one.
    fn mmu_stats(&self) -> Option<MmuStats> {
        None
    }

    /// Whether (and how) the send engine faults in the pages it sends from
    /// this source from user mode before each send ([`Kaddr::prefault`](crate::Kaddr::prefault)):
    /// a plan for the crate's sources whose mappings come and go (a window
    /// slot just mapped has no page-table entries, and a fault inside the
    /// kernel's copy waits behind other threads' `mmap`s). The engine then
    /// reads the mappings' words itself, so it must trust their addresses:
    /// only the crate's own sources can answer (the types cannot be named
    /// elsewhere), and every other implementation keeps the default, none.
    #[doc(hidden)]
    fn prefault(&self, _: private::Token) -> Option<private::Plan> {
        None
    }
}

/// What keeps [`MapSource::prefault`] the crate's own.
pub(crate) mod private {
    /// Only the crate can name (and so pass or accept) this.
    #[derive(Clone, Copy, Debug)]
    pub struct Token;

    /// How to prefault a source's mappings (`kaddr::Prefaulter`).
    #[derive(Clone, Copy, Debug)]
    pub struct Plan(pub(crate) crate::kaddr::PrefaultPlan);
}

/// `MapSource` is implemented for references too, so a borrowed source can
/// be handed to [`send_mapped`](super::send_mapped) and [`ZeroCopy`](super::ZeroCopy) alike.
impl<T: MapSource> MapSource for &T {
    type Mapping<'s>
        = T::Mapping<'s>
    where
        Self: 's;

    fn map<'s>(&'s self, run: &'s [Page]) -> Result<Self::Mapping<'s>> {
        (**self).map(run)
    }

    fn map_idle<'s>(&'s self, run: &'s [Page]) -> Result<Self::Mapping<'s>> {
        (**self).map_idle(run)
    }

    fn run_grid(&self) -> Option<usize> {
        (**self).run_grid()
    }

    fn mmu_stats(&self) -> Option<MmuStats> {
        (**self).mmu_stats()
    }

    fn prefault(&self, t: private::Token) -> Option<private::Plan> {
        (**self).prefault(t)
    }
}

// === DirectMapSource ===

/// The direct map (the whole memory mapped once): no system call per map,
/// the physical limit of the mapping-based paths. Needs a `PhysMem` built
/// with a direct map.
#[derive(Clone, Debug)]
pub struct DirectMapSource {
    phys: PhysMem,
}

impl DirectMapSource {
    /// The direct map of `phys`; [`Error::NoDirectMap`] if it has none.
    pub fn new(phys: &PhysMem) -> Result<DirectMapSource> {
        if !phys.has_direct_map() {
            return Err(Error::NoDirectMap);
        }
        Ok(DirectMapSource { phys: phys.clone() })
    }
}

/// A direct-map address range; valid while the source (and so its
/// `PhysMem`) is borrowed.
#[derive(Debug)]
#[must_use = "dropping a mapping releases it at once"]
pub struct DirectMapping<'s> {
    ptr: NonNull<u8>,
    len: usize,
    _src: std::marker::PhantomData<&'s DirectMapSource>,
}

// SAFETY: an address and a length; the direct map it points into is shared,
// immutable in layout and lives as long as the borrowed source.
unsafe impl Send for DirectMapping<'_> {}
// SAFETY: as for `Send`.
unsafe impl Sync for DirectMapping<'_> {}

impl Mapped for DirectMapping<'_> {
    fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl MapSource for DirectMapSource {
    type Mapping<'s> = DirectMapping<'s>;

    /// The longest prefix of `run` whose frames are contiguous, in one piece.
    fn map<'s>(&'s self, run: &'s [Page]) -> Result<DirectMapping<'s>> {
        let first = run.first().ok_or_else(|| Error::config("run", "no pages to map"))?;
        if !first.phys().same_as(&self.phys) {
            return Err(Error::ForeignPage);
        }
        let n = contiguous_prefix(run, usize::MAX);
        let ptr = self.phys.direct_ptr(first.pfn()).ok_or(Error::NoDirectMap)?;
        Ok(DirectMapping { ptr, len: n * self.phys.frame_size(), _src: std::marker::PhantomData })
    }
}

// === WindowSource ===

/// Maps every request's pages into a window and unmaps them after the send:
/// the no-cache baseline. A run of contiguous frames goes into adjacent
/// slots with one `enter` (one `mmap` for a [`Window`]) and comes out with
/// one `remove`; every remove of a touched page in a multi-threaded process
/// is a TLB shootdown. Thread-safe: all workers can share one.
pub struct WindowSource {
    kva: KvaSpace,
    unmap_failures: AtomicU64,
}

impl WindowSource {
    /// Map through `mmu` (a [`Window`] or a [`crate::ModelMmu`]); its slots
    /// are this source's to hand out while it lives, so a window already
    /// serving a cache is refused with [`crate::Error::WindowClaimed`]. Live
    /// mappings are capped by [`crate::default_map_budget`].
    pub fn new(mmu: Arc<dyn Mmu>) -> Result<WindowSource> {
        Ok(WindowSource {
            kva: KvaSpace::new(mmu, None, None, crate::kva::Reclaim::Strict)?,
            unmap_failures: AtomicU64::new(0),
        })
    }

    /// A new read-only [`Window`] of `slots` slots over `phys`: one
    /// `mmap(PROT_NONE)`.
    pub fn window(phys: &PhysMem, slots: usize) -> Result<WindowSource> {
        Self::new(Arc::new(Window::builder(phys).slots(slots).read_only(true).build()?))
    }

    /// The MMU.
    pub fn mmu(&self) -> &Arc<dyn Mmu> {
        self.kva.mmu()
    }

    /// Slots not mapped now.
    pub fn free_slots(&self) -> usize {
        self.kva.free_slots()
    }

    /// Removes the MMU refused; those slots are kept out of use for good.
    pub fn unmap_failures(&self) -> u64 {
        self.unmap_failures.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for WindowSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WindowSource")
            .field("mmu", self.kva.mmu())
            .field("free_slots", &self.kva.free_slots())
            .field("unmap_failures", &self.unmap_failures())
            .finish()
    }
}

/// Frames entered into window slots; dropping it removes them (one
/// `remove` for the run) and gives the slots back.
#[derive(Debug)]
#[must_use = "dropping a mapping unmaps it at once"]
pub struct WindowMapping<'s> {
    src: &'s WindowSource,
    mapping: Option<Mapping>,
    /// Where the frames asked for start inside the mapping.
    offset: usize,
    len: usize,
}

impl Mapped for WindowMapping<'_> {
    fn as_ptr(&self) -> *const u8 {
        // `wrapping_add`: an offset inside the mapping, whose address stays
        // valid while the handle lives.
        self.mapping.as_ref().map_or(std::ptr::null(), |m| m.addr().as_ptr().cast_const().wrapping_add(self.offset))
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for WindowMapping<'_> {
    fn drop(&mut self) {
        let Some(m) = self.mapping.take() else { return };
        // SAFETY: the mapping is this handle's alone (made in `map`, never
        // shared), and the send engine drops a handle only once the kernel has
        // taken every byte it was given through it; nothing else can reach the
        // slots.
        match unsafe { self.src.kva.unmap(m) } {
            Ok(run) => self.src.kva.give(run),
            // The MMU refused: the slots still map the frames, so they must
            // never be handed out again. Forgetting the record keeps them
            // claimed forever (a leak, not a hazard); count it.
            Err((_e, _m)) => {
                self.src.unmap_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl MapSource for WindowSource {
    type Mapping<'s> = WindowMapping<'s>;

    /// The longest contiguous prefix of `run` that fits in adjacent free
    /// slots (halving the claim until one fits): one `enter`.
    fn map<'s>(&'s self, run: &'s [Page]) -> Result<WindowMapping<'s>> {
        let first = run.first().ok_or_else(|| Error::config("run", "no pages to map"))?;
        self.kva.check_page(first)?;
        let contiguous = contiguous_prefix(run, usize::MAX);
        let mut n = contiguous.min(self.kva.capacity());
        // On huge-page memory a mapping covers whole huge pages (the
        // granule): the frames asked for lie inside it.
        let (key, slots) = loop {
            let key = self.kva.key_of(first.pfn().0, n);
            if let Some(s) = self.kva.take(key.pages) {
                break (key, s);
            }
            if n == 1 {
                return Err(Error::WindowFull { requested: 1, capacity: self.kva.capacity() });
            }
            n /= 2;
        };
        match self.kva.map(slots, crate::Pfn(key.pfn), key.pages) {
            Ok(m) => {
                let offset = (first.pfn().0 - key.pfn) * self.kva.slot_size();
                Ok(WindowMapping { src: self, mapping: Some(m), offset, len: n * self.kva.slot_size() })
            }
            Err((e, slots)) => {
                self.kva.give(slots);
                Err(e)
            }
        }
    }

    fn mmu_stats(&self) -> Option<MmuStats> {
        Some(self.kva.mmu_stats())
    }
    fn prefault(&self, _: private::Token) -> Option<private::Plan> {
        Some(private::Plan(self.kva.prefault_plan()))
    }
}
