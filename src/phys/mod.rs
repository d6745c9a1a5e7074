//! Physical memory: the memfd that stands in for RAM, its frame allocator and
//! its direct map.

mod page;

pub(crate) use page::contiguous_prefix;
pub use page::Page;

use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::extent::{ExtentStats, Extents};
use crate::kaddr::Kaddr;
use crate::sync::Arc;

/// A page frame number: the index of a frame in its [`PhysMem`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pfn(pub usize);

/// The largest total size accepted for a `PhysMem` or a window: 64 TiB, half
/// of the 47-bit user address space of x86-64 and AArch64 Linux.
pub const MAX_REGION_BYTES: usize = 1 << 46;

/// The system's default huge page size (`Hugepagesize` in
/// `/proc/meminfo`), for [`Backing::HugeTlb`].
pub fn huge_page_size() -> Result<usize> {
    let info =
        std::fs::read_to_string("/proc/meminfo").map_err(|source| Error::Sys { op: "read /proc/meminfo", source })?;
    info.lines()
        .find_map(|l| l.strip_prefix("Hugepagesize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map(|kib| kib << 10)
        .ok_or_else(|| Error::config("backing", "the kernel reports no huge page size (no hugetlbfs)"))
}

/// Huge pages of `size` bytes free for a new hugetlbfs file now (free and
/// not promised to other mappings).
pub fn huge_pages_free(size: usize) -> Option<usize> {
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", size >> 10);
    let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok()?.trim().parse::<usize>().ok();
    Some(read("free_hugepages")?.saturating_sub(read("resv_hugepages")?))
}

/// Huge pages of the default size the system keeps (`vm.nr_hugepages`).
pub(crate) fn huge_pages_total() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/vm/nr_hugepages").ok()?.trim().parse().ok()
}

/// The system page size (what `sysconf(_SC_PAGESIZE)` reports).
pub fn system_page_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(crate::sys::page_size)
}

/// Where the frames live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backing {
    /// A memfd (the default): real pages that the real window can map,
    /// sparse until touched.
    #[default]
    Memfd,
    /// A memfd of huge pages (hugetlbfs, the system's default huge page
    /// size, 2 MiB on x86-64): frames keep their size (4 KiB), and the
    /// caches map whole huge pages (their mapping granule is a multiple of
    /// [`PhysMem::min_granule`]), which the kernel maps with one page-table
    /// entry each: a mapping costs a few hundred times less per 4 KiB than
    /// with small pages. Every huge page is allocated when the memory is
    /// built; with too few reserved (`vm.nr_hugepages`) the build fails with
    /// [`Error::HugePages`] naming how many are needed. The memory must be
    /// a whole number of huge pages.
    HugeTlb,
    /// Plain process memory, for the model MMU (loom models, simulations):
    /// no file, always directly mapped, and the real window cannot map it.
    Heap,
}

/// Builds a [`PhysMem`]. See [`PhysMem::builder`].
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until it is built"]
pub struct PhysMemBuilder {
    frames: usize,
    frame_size: usize,
    direct_map: bool,
    backing: Backing,
    name: String,
}

impl PhysMemBuilder {
    /// Number of frames (required, at least 1).
    pub fn frames(mut self, n: usize) -> Self {
        self.frames = n;
        self
    }

    /// Frame size in bytes: a power-of-two multiple of the system page size.
    /// Default: the system page size (4 KiB). 2 MiB frames work as plain
    /// larger mappings (no huge pages needed).
    pub fn frame_size(mut self, bytes: usize) -> Self {
        self.frame_size = bytes;
        self
    }

    /// Map the whole memory once (the amd64 DMAP analogue). Default: on. It
    /// costs address space only; turn it off for a store that wants its
    /// pages unmapped except while in use. Always on for [`Backing::Heap`].
    pub fn direct_map(mut self, on: bool) -> Self {
        self.direct_map = on;
        self
    }

    /// Where the frames live. Default: [`Backing::Memfd`].
    pub fn backing(mut self, b: Backing) -> Self {
        self.backing = b;
        self
    }

    /// Name of the memfd as shown in `/proc/self/maps` (default `lwbuf-phys`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Create it. One `memfd_create`, one `ftruncate`, one `fcntl` and, with
    /// a direct map, one `mmap`; no memory is touched, so a 1 TiB `PhysMem`
    /// costs no resident memory until its frames are written.
    pub fn build(self) -> Result<PhysMem> {
        let page = system_page_size();
        if self.frames == 0 {
            return Err(Error::config("frames", "a PhysMem needs at least one frame"));
        }
        if self.frame_size < page || !self.frame_size.is_power_of_two() {
            return Err(Error::config(
                "frame_size",
                format!("{} is not a power-of-two multiple of the system page size ({page})", self.frame_size),
            ));
        }
        let bytes = self.frames.checked_mul(self.frame_size).filter(|&b| b <= MAX_REGION_BYTES).ok_or_else(|| {
            Error::config(
                "frames",
                format!(
                    "{} frames of {} bytes exceed the {} TiB limit",
                    self.frames,
                    self.frame_size,
                    MAX_REGION_BYTES >> 40
                ),
            )
        })?;
        let store = match self.backing {
            Backing::Memfd => Store::memfd(&self.name, bytes, self.direct_map, None)?,
            Backing::HugeTlb => {
                let huge = huge_page_size()?;
                if huge % self.frame_size != 0 || bytes % huge != 0 {
                    return Err(Error::config(
                        "frames",
                        format!(
                            "{} frames of {} bytes are not a whole number of huge pages of {} KiB",
                            self.frames,
                            self.frame_size,
                            huge >> 10
                        ),
                    ));
                }
                let needed = bytes / huge;
                let free = huge_pages_free(huge).unwrap_or(0);
                if needed > free {
                    return Err(Error::HugePages { needed, free, size: huge });
                }
                Store::memfd(&self.name, bytes, self.direct_map, Some((huge, free)))?
            }
            Backing::Heap => Store::heap(bytes, self.frame_size)?,
        };
        Ok(PhysMem {
            inner: Arc::new(PhysInner {
                frames: self.frames,
                frame_size: self.frame_size,
                alloc: Extents::new(self.frames),
                store,
            }),
        })
    }
}

enum Store {
    /// `huge`: the huge page size of a hugetlbfs memfd, 0 for small pages.
    Memfd {
        fd: OwnedFd,
        dmap: Option<memmap2::MmapRaw>,
        huge: usize,
    },
    Heap {
        ptr: NonNull<u8>,
        layout: std::alloc::Layout,
    },
}

// SAFETY: the heap pointer is owned by the store and only ever used for raw
// copies by whoever holds a handle; the memfd and MmapRaw are Send + Sync.
unsafe impl Send for Store {}
// SAFETY: see `Send`; nothing in the store is mutated after construction.
unsafe impl Sync for Store {}

impl Store {
    /// `huge`: the huge page size and the huge pages free, for hugetlbfs.
    fn memfd(name: &str, bytes: usize, direct_map: bool, huge: Option<(usize, usize)>) -> Result<Store> {
        let cname = CString::new(name).map_err(|_| Error::config("name", "contains a NUL byte"))?;
        let len = i64::try_from(bytes).map_err(|_| Error::config("frames", "size overflows off_t"))?;
        let fd = match huge {
            None => crate::sys::sealed_memfd(&cname, len).map_err(|(op, e)| Error::sys(op, e))?,
            Some((size, _)) => crate::sys::sealed_huge_memfd(&cname, len, size).map_err(|(op, e)| {
                // Another process took the pages between the check and the
                // allocation: the same answer as too few reserved.
                if matches!(e, crate::sys::Errno::ENOSPC | crate::sys::Errno::ENOMEM) {
                    Error::HugePages { needed: bytes / size, free: huge_pages_free(size).unwrap_or(0), size }
                } else {
                    Error::sys(op, e)
                }
            })?,
        };
        let dmap = if direct_map {
            Some(
                memmap2::MmapOptions::new()
                    .len(bytes)
                    .map_raw(&fd)
                    .map_err(|source| Error::Sys { op: "mmap(direct map)", source })?,
            )
        } else {
            None
        };
        Ok(Store::Memfd { fd, dmap, huge: huge.map_or(0, |(size, _)| size) })
    }

    fn heap(bytes: usize, align: usize) -> Result<Store> {
        let layout =
            std::alloc::Layout::from_size_align(bytes, align).map_err(|e| Error::config("frames", e.to_string()))?;
        // SAFETY: `layout` has a non-zero size (frames >= 1, frame_size >= page).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(Error::OutOfFrames { requested: bytes, free: 0, largest_run: 0 })?;
        Ok(Store::Heap { ptr, layout })
    }

    fn base(&self) -> Option<NonNull<u8>> {
        match self {
            Store::Memfd { dmap: Some(m), .. } => NonNull::new(m.as_mut_ptr()),
            Store::Memfd { dmap: None, .. } => None,
            Store::Heap { ptr, .. } => Some(*ptr),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Store::Heap { ptr, layout } = self {
            // SAFETY: allocated in `heap` with this very layout, freed once.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), *layout) };
        }
    }
}

struct PhysInner {
    frames: usize,
    frame_size: usize,
    alloc: Extents,
    store: Store,
}

/// The "physical memory": `frames` frames of `frame_size` bytes in a memfd
/// (or, for the model MMU, in plain memory), with a thread-safe frame
/// allocator and an optional direct map.
///
/// Cloning is cheap (a reference count); every clone is the same memory.
///
/// ```
/// use lwbuf::PhysMem;
/// let mem = PhysMem::builder().frames(1024).build()?;
/// let page = mem.alloc_page()?;
/// page.direct()?.write_at(0, b"hello")?;
/// let run = mem.alloc_run(8)?; // 8 contiguous frames
/// assert_eq!(run[7].pfn().0, run[0].pfn().0 + 7);
/// assert_eq!(mem.stats().free, 1024 - 9);
/// # Ok::<(), lwbuf::Error>(())
/// ```
#[derive(Clone)]
pub struct PhysMem {
    inner: Arc<PhysInner>,
}

/// Counters of a [`PhysMem`]'s frame allocator.
pub type FrameStats = ExtentStats;

impl PhysMem {
    /// A builder with the defaults: system page size frames, memfd backing,
    /// direct map on.
    pub fn builder() -> PhysMemBuilder {
        PhysMemBuilder {
            frames: 0,
            frame_size: system_page_size(),
            direct_map: true,
            backing: Backing::Memfd,
            name: "lwbuf-phys".into(),
        }
    }

    /// Number of frames.
    pub fn frames(&self) -> usize {
        self.inner.frames
    }

    /// Frame size in bytes.
    pub fn frame_size(&self) -> usize {
        self.inner.frame_size
    }

    /// The smallest mapping granule the memory allows, in frames: 1, or the
    /// frames of one huge page for [`Backing::HugeTlb`] (a huge page is
    /// mapped whole).
    pub fn min_granule(&self) -> usize {
        match &self.inner.store {
            Store::Memfd { huge, .. } if *huge > 0 => huge / self.inner.frame_size,
            _ => 1,
        }
    }

    /// Total size in bytes.
    pub fn bytes(&self) -> usize {
        self.inner.frames * self.inner.frame_size
    }

    /// How the frames are backed.
    pub fn backing(&self) -> Backing {
        match self.inner.store {
            Store::Memfd { huge, .. } if huge > 0 => Backing::HugeTlb,
            Store::Memfd { .. } => Backing::Memfd,
            Store::Heap { .. } => Backing::Heap,
        }
    }

    /// The memfd, for mapping it or `sendfile(2)` from it; `None` for heap
    /// backing. A frame's bytes are at file offset `pfn * frame_size`.
    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        match &self.inner.store {
            Store::Memfd { fd, .. } => Some(fd.as_fd()),
            Store::Heap { .. } => None,
        }
    }

    /// Whether the memory is directly mapped.
    pub fn has_direct_map(&self) -> bool {
        self.inner.store.base().is_some()
    }

    /// Allocate one frame. O(1) in the common case; no system call.
    pub fn alloc_page(&self) -> Result<Page> {
        let pfn = self.inner.alloc.alloc(1).ok_or_else(|| self.out_of_frames(1))?;
        Ok(Page::new(self.clone(), Pfn(pfn)))
    }

    /// Allocate `n` contiguous frames (a run), as separate [`Page`]s whose
    /// frame numbers are consecutive. Freed frames are coalesced lazily, so a
    /// run can still be found after churn.
    pub fn alloc_run(&self, n: usize) -> Result<Vec<Page>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let start = self.inner.alloc.alloc(n).ok_or_else(|| self.out_of_frames(n))?;
        Ok((start..start + n).map(|p| Page::new(self.clone(), Pfn(p))).collect())
    }

    /// Allocate frame `pfn` itself, if it is free (tests only: the
    /// allocator hands out low frames first).
    #[cfg(test)]
    pub(crate) fn alloc_page_at(&self, pfn: Pfn) -> Result<Page> {
        if pfn.0 < self.inner.frames && self.inner.alloc.take_at(pfn.0) {
            Ok(Page::new(self.clone(), pfn))
        } else {
            Err(self.out_of_frames(1))
        }
    }

    fn out_of_frames(&self, requested: usize) -> Error {
        let s = self.inner.alloc.stats();
        Error::OutOfFrames { requested, free: s.free, largest_run: s.largest_free_run }
    }

    /// Frames total, free, and the largest free run (merges pending frees).
    pub fn stats(&self) -> FrameStats {
        self.inner.alloc.stats()
    }

    pub(crate) fn free_frame(&self, pfn: Pfn) {
        self.inner.alloc.free(pfn.0, 1);
    }

    /// Whether two handles are the same memory.
    #[inline]
    pub fn same_as(&self, other: &PhysMem) -> bool {
        self.id() == other.id()
    }

    /// An identity of the memory: the address of its shared state, unique
    /// among memories alive at once (a page keeps its memory alive).
    #[inline]
    pub(crate) fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// The direct-map address of `pfn`, or `None` without a direct map or
    /// for a frame out of range.
    pub fn direct_ptr(&self, pfn: Pfn) -> Option<NonNull<u8>> {
        if pfn.0 >= self.inner.frames {
            return None;
        }
        let base = self.inner.store.base()?;
        // SAFETY: pfn < frames, so the offset stays inside the direct map.
        Some(unsafe { base.add(pfn.0 * self.inner.frame_size) })
    }

    /// A view of `count` frames from `pfn` through the direct map.
    pub(crate) fn direct_view(&self, pfn: Pfn, count: usize) -> Result<Kaddr<'_>> {
        if pfn.0.checked_add(count).is_none_or(|end| end > self.inner.frames) {
            return Err(Error::OutOfBounds {
                // Saturating: `pfn` may be anything (e.g. `Pfn(usize::MAX)`),
                // and reporting it must not overflow.
                offset: pfn.0.saturating_mul(self.inner.frame_size),
                len: count.saturating_mul(self.inner.frame_size),
                size: self.bytes(),
            });
        }
        let ptr = self.direct_ptr(pfn).ok_or(Error::NoDirectMap)?;
        // SAFETY: the direct map covers the whole memory and lives as long as
        // `self` (the borrow of the view).
        Ok(unsafe { Kaddr::new(ptr, count * self.inner.frame_size) })
    }

    /// Read bytes of any frame through the direct map: the independent view
    /// tests use to check what was written through the window.
    pub fn read_frame(&self, pfn: Pfn, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.direct_view(pfn, 1)?.read_at(offset, buf)
    }

    /// Write bytes of any frame through the direct map.
    pub fn write_frame(&self, pfn: Pfn, offset: usize, buf: &[u8]) -> Result<()> {
        self.direct_view(pfn, 1)?.write_at(offset, buf)
    }
}

impl fmt::Debug for PhysMem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PhysMem")
            .field("frames", &self.inner.frames)
            .field("frame_size", &self.inner.frame_size)
            .field("backing", &self.backing())
            .field("direct_map", &self.has_direct_map())
            .field("free", &self.inner.alloc.free_count())
            .finish()
    }
}
