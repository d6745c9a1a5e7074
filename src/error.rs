//! The crate's error type.

use std::fmt;
use std::io;

/// Everything that can go wrong in the library.
///
/// System-call failures carry the `io::Error` (and so the errno) and the name
/// of the operation that failed. Conditions a caller may want to retry
/// ([`Error::WouldBlock`], [`Error::WindowFull`]) are distinct variants.
/// Every variant says which calls return it; each of those cases is a test
/// in `tests/misuse.rs` (or the test file named). A failed call leaves
/// nothing mapped, held or half-done on its behalf.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value was rejected when building an object, or an
    /// argument is malformed. `what` names it:
    /// - `"frames"`: a [`PhysMem`](crate::PhysMem) of 0 frames, or above
    ///   [`MAX_REGION_BYTES`](crate::MAX_REGION_BYTES) (64 TiB) or
    ///   overflowing;
    /// - `"frame_size"`: not a power-of-two multiple of the page size;
    /// - `"slots"` / `"backing"`: a window of 0 slots or above 64 TiB, or a
    ///   real [`Window`](crate::Window) over heap memory; a window or an
    ///   sf_buf pool whose per-slot bookkeeping the allocator refuses (the
    ///   slot table, 8 bytes a slot; a pool's pin rows, 128 bytes a slot,
    ///   and entries, 128 bytes a slot), with the bytes asked for;
    /// - `"cpus"`: [`LwbufsBuilder::cpus`](crate::LwbufsBuilder::cpus) of 0
    ///   or more than [`MAX_CPUS`](crate::MAX_CPUS);
    /// - `"shards"`: an sf_buf pool of 0 or more than 65,536 shards;
    /// - `"granule"`: a mapping granule
    ///   ([`LwbufsBuilder::granule`](crate::LwbufsBuilder::granule),
    ///   [`SfPoolBuilder::granule`](crate::SfPoolBuilder::granule)) that is
    ///   not a power of two or is larger than the window (tests/granule.rs);
    /// - `"binding"`: CPUs of more than
    ///   [`MAX_BINDINGS_PER_THREAD`](crate::MAX_BINDINGS_PER_THREAD) systems
    ///   bound on one thread;
    /// - `"pages"`: `alloc_run` of no pages, or of frames that are not
    ///   contiguous;
    /// - `"slot range"` / `"frame range"`: [`Mmu::enter`](crate::Mmu::enter)
    ///   or [`Mmu::remove`](crate::Mmu::remove) outside the window or memory.
    Config {
        /// The setting that was rejected.
        what: &'static str,
        /// Why, with the offending value.
        why: String,
    },
    /// The frame allocator cannot satisfy the request
    /// ([`PhysMem::alloc_page`](crate::PhysMem::alloc_page) and
    /// [`alloc_run`](crate::PhysMem::alloc_run)).
    OutOfFrames {
        /// Contiguous frames asked for.
        requested: usize,
        /// Frames free in all.
        free: usize,
        /// The largest contiguous run of free frames.
        largest_run: usize,
    },
    /// Every slot of the window is mapped and in use; nothing could be
    /// evicted. From an lwbuf `alloc`/`alloc_run`/`kva` only when every slot
    /// is held by a live handle (cached entries and slots other CPUs hold
    /// free are reclaimed first); from [`SfPool::alloc_all`](crate::SfPool::alloc_all)
    /// at once when it asks for more slots than the window has.
    WindowFull {
        /// Slots asked for.
        requested: usize,
        /// Slots in the window.
        capacity: usize,
    },
    /// The mapping budget (`map_budget`, derived from `vm.max_map_count` by
    /// [`default_map_budget`](crate::default_map_budget)) is used up by
    /// mappings in use; nothing could be evicted. (At the kernel's own wall
    /// with nothing to evict the caller gets [`Error::Sys`] with `ENOMEM`.)
    MapLimit {
        /// The budget in mappings.
        budget: usize,
    },
    /// A [`Wait::NoWait`](crate::Wait::NoWait) request found every slot in
    /// use; returned at once.
    WouldBlock,
    /// A [`Wait::Timeout`](crate::Wait::Timeout) request ran out of time
    /// before a release made room (`Duration::ZERO`: after one attempt,
    /// without sleeping; a duration the clock cannot hold, such as
    /// `Duration::MAX`, is no limit).
    TimedOut,
    /// A [`Wait::Cancel`](crate::Wait::Cancel) request's token was
    /// cancelled (at once if it already was).
    Cancelled,
    /// The pool is closed ([`SfPool::close`](crate::SfPool::close)): every
    /// allocation after the close, hit or miss, with any [`Wait`](crate::Wait),
    /// and the waiters sleeping at the moment of the close. Handles already
    /// held stay valid and release normally.
    Closed,
    /// A [`Page`](crate::Page) of one `PhysMem` was handed to a cache (or
    /// source) over another.
    ForeignPage,
    /// A [`Kaddr`](crate::Kaddr) read or write, or a direct-map access,
    /// outside the mapping or frame; nothing was copied.
    OutOfBounds {
        /// Start of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the region.
        size: usize,
    },
    /// An lwbuf call (`alloc`, `alloc_run`, `poll`, `Lwbuf::kva`) on a
    /// thread with no CPU of this system bound. Nothing is mapped; a handle
    /// stays valid and may be dropped there.
    NotBound,
    /// [`Lwbufs::bind`](crate::Lwbufs::bind) of a CPU id at or beyond the
    /// configured count.
    NoSuchCpu {
        /// The CPU asked for.
        cpu: usize,
        /// CPUs configured.
        ncpus: usize,
    },
    /// [`Lwbufs::bind`](crate::Lwbufs::bind) of a CPU another live thread
    /// holds.
    CpuBusy {
        /// The CPU asked for.
        cpu: usize,
    },
    /// [`Lwbufs::bind`](crate::Lwbufs::bind) on a thread that already holds
    /// a CPU of the same system.
    AlreadyBound {
        /// The CPU it holds.
        cpu: usize,
    },
    /// The operation needs a direct map and the `PhysMem` was built without
    /// one ([`ModelMmu::new`](crate::ModelMmu::new), [`Page::direct`](crate::Page::direct),
    /// the direct-map send modes).
    NoDirectMap,
    /// The window already serves another cache (an `Lwbufs`, an `SfPool` or
    /// a `WindowSource`), or has frames entered by hand: a window's slots
    /// are handed out by one slot allocator at a time. Build a window for
    /// each cache, or wait until the other cache is dropped.
    WindowClaimed,
    /// A write through a read-only view: the mapping behind it is
    /// `PROT_READ` (a [`Window`](crate::Window) built with
    /// [`read_only`](crate::WindowBuilder::read_only), or a model MMU made
    /// with [`ModelMmu::new_read_only`](crate::ModelMmu::new_read_only)).
    /// Nothing was written.
    ReadOnly,
    /// [`Mmu::enter`](crate::Mmu::enter) was asked to map over a slot that
    /// already has a frame entered (nothing was changed).
    SlotOccupied {
        /// The first occupied slot found.
        slot: usize,
    },
    /// A [`PhysMem`](crate::PhysMem) of [`Backing::HugeTlb`](crate::Backing::HugeTlb)
    /// needs more huge pages than the system has free: reserve them with
    /// `vm.nr_hugepages` (`echo N > /proc/sys/vm/nr_hugepages`). Returned by
    /// `build`, which allocates every huge page up front, so a mapping of
    /// the memory can never fault for lack of one (`SIGBUS`) later.
    HugePages {
        /// Huge pages the memory needs.
        needed: usize,
        /// Huge pages free (and not reserved) when it was built.
        free: usize,
        /// The huge page size in bytes.
        size: usize,
    },
    /// A file cached by a [`PageCache`](crate::pagecache::PageCache)
    /// changed on disk behind it: a fill found it shorter than the cache
    /// knew it. Nothing of the page was cached, and the file was
    /// revalidated (its new size taken, its clean pages dropped), so the
    /// next call sees the file as it is now.
    FileChanged {
        /// The file's path.
        path: std::path::PathBuf,
        /// What was found.
        why: String,
    },
    /// A system call the kernel (or [`FaultyMmu`](crate::FaultyMmu))
    /// refused, naming the call and its errno. A refused unmap leaves the
    /// cached entry mapped and counted, and is retried later.
    Sys {
        /// What the library was doing (`"mmap(enter)"`, `"memfd_create"`, ...).
        op: &'static str,
        /// The error the kernel returned.
        source: io::Error,
    },
}

/// What [`Lwbufs::check_consistency`](crate::Lwbufs::check_consistency)
/// found broken: an internal invariant of the caches does not hold, which is
/// a bug in this library. The message names the CPU, entry or slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inconsistency(pub(crate) String);

impl fmt::Display for Inconsistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lwbuf invariant broken: {}", self.0)
    }
}

impl std::error::Error for Inconsistency {}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn config(what: &'static str, why: impl Into<String>) -> Self {
        Error::Config { what, why: why.into() }
    }

    pub(crate) fn sys(op: &'static str, errno: nix::errno::Errno) -> Self {
        Error::Sys { op, source: io::Error::from_raw_os_error(errno as i32) }
    }

    /// The errno of a failed system call, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Sys { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config { what, why } => write!(f, "invalid {what}: {why}"),
            Error::OutOfFrames { requested, free, largest_run } => write!(
                f,
                "out of frames: asked for {requested} contiguous, {free} free, largest free run {largest_run}"
            ),
            Error::WindowFull { requested, capacity } => {
                write!(f, "window full: no {requested} free slot(s) among {capacity}, and no cached mapping to evict")
            }
            Error::MapLimit { budget } => {
                write!(f, "mapping budget of {budget} mappings (from vm.max_map_count) is in use, nothing to evict")
            }
            Error::WouldBlock => f.write_str("no free slot and the request may not wait"),
            Error::TimedOut => f.write_str("timed out waiting for a free slot"),
            Error::Cancelled => f.write_str("cancelled while waiting for a free slot"),
            Error::Closed => f.write_str("the pool is closed"),
            Error::ForeignPage => f.write_str("page belongs to another PhysMem than this mapper's"),
            Error::OutOfBounds { offset, len, size } => {
                write!(f, "access of {len} bytes at offset {offset} is outside a region of {size} bytes")
            }
            Error::NotBound => f.write_str("no CPU of this system is bound to the calling thread"),
            Error::NoSuchCpu { cpu, ncpus } => write!(f, "CPU {cpu} does not exist (the system has {ncpus})"),
            Error::CpuBusy { cpu } => write!(f, "CPU {cpu} is bound to another live thread"),
            Error::AlreadyBound { cpu } => write!(f, "the calling thread already has CPU {cpu} of this system bound"),
            Error::NoDirectMap => f.write_str("the PhysMem was built without a direct map"),
            Error::WindowClaimed => f.write_str(
                "the window already serves another cache or has frames entered by hand (one slot allocator per window)",
            ),
            Error::SlotOccupied { slot } => write!(f, "slot {slot} already has a frame entered"),
            Error::ReadOnly => write!(f, "a write through a read-only mapping"),
            Error::HugePages { needed, free, size } => write!(
                f,
                "the memory needs {needed} huge pages of {} KiB and {free} are free: reserve more with \
                 `echo {} > /proc/sys/vm/nr_hugepages` (vm.nr_hugepages; as root)",
                size >> 10,
                needed.saturating_sub(*free) + crate::phys::huge_pages_total().unwrap_or(0)
            ),
            Error::FileChanged { path, why } => {
                write!(f, "{} changed on disk behind the page cache: {why}", path.display())
            }
            Error::Sys { op, source } => write!(f, "{op} failed: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Sys { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Sys { source, .. } => source,
            Error::WouldBlock => io::Error::new(io::ErrorKind::WouldBlock, e),
            Error::TimedOut => io::Error::new(io::ErrorKind::TimedOut, e),
            Error::OutOfFrames { .. } | Error::WindowFull { .. } | Error::MapLimit { .. } | Error::HugePages { .. } => {
                io::Error::new(io::ErrorKind::OutOfMemory, e)
            }
            Error::Config { .. } | Error::OutOfBounds { .. } | Error::NoSuchCpu { .. } | Error::SlotOccupied { .. } => {
                io::Error::new(io::ErrorKind::InvalidInput, e)
            }
            Error::FileChanged { .. } => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            Error::ReadOnly => io::Error::new(io::ErrorKind::PermissionDenied, e),
            other => io::Error::other(other),
        }
    }
}
