//! The crate's error type.

use std::fmt;
use std::io;

/// Everything that can go wrong in the library.
///
/// System-call failures carry the `io::Error` (and so the errno) and the name
/// of the operation that failed. Conditions a caller may want to retry
/// ([`Error::WouldBlock`], [`Error::WindowFull`]) are distinct variants.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value was rejected when building an object.
    Config {
        /// The setting that was rejected.
        what: &'static str,
        /// Why, with the offending value.
        why: String,
    },
    /// The frame allocator cannot satisfy the request.
    OutOfFrames {
        /// Contiguous frames asked for.
        requested: usize,
        /// Frames free in all.
        free: usize,
        /// The largest contiguous run of free frames.
        largest_run: usize,
    },
    /// Every slot of the window is mapped and in use; nothing could be evicted.
    WindowFull {
        /// Slots asked for.
        requested: usize,
        /// Slots in the window.
        capacity: usize,
    },
    /// The mapping budget (derived from `vm.max_map_count`) is used up by
    /// mappings in use; nothing could be evicted.
    MapLimit {
        /// The budget in mappings.
        budget: usize,
    },
    /// A no-wait request found no free slot.
    WouldBlock,
    /// A waiting request ran out of time.
    TimedOut,
    /// A waiting request was cancelled through its cancel token.
    Cancelled,
    /// The pool (or system) is shutting down.
    Closed,
    /// A page of one `PhysMem` was handed to a mapper of another.
    ForeignPage,
    /// An offset or length falls outside the mapping or frame.
    OutOfBounds {
        /// Start of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the region.
        size: usize,
    },
    /// The operation needs a CPU bound to the calling thread.
    NotBound,
    /// The CPU id is at or beyond the configured count.
    NoSuchCpu {
        /// The CPU asked for.
        cpu: usize,
        /// CPUs configured.
        ncpus: usize,
    },
    /// Another live thread has bound this CPU.
    CpuBusy {
        /// The CPU asked for.
        cpu: usize,
    },
    /// The calling thread already has a CPU of this system bound.
    AlreadyBound {
        /// The CPU it holds.
        cpu: usize,
    },
    /// The operation needs a direct map, and the `PhysMem` was built without one.
    NoDirectMap,
    /// The window already serves another cache (an `Lwbufs`, an `SfPool` or
    /// a `WindowSource`), or has frames entered by hand: a window's slots
    /// are handed out by one slot allocator at a time. Build a window for
    /// each cache, or wait until the other cache is dropped.
    WindowClaimed,
    /// [`Mmu::enter`](crate::Mmu::enter) was asked to map over a slot that
    /// already has a frame entered (nothing was changed).
    SlotOccupied {
        /// The first occupied slot found.
        slot: usize,
    },
    /// A system call failed.
    Sys {
        /// What the library was doing (`"mmap"`, `"memfd_create"`, ...).
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
            Error::OutOfFrames { .. } | Error::WindowFull { .. } | Error::MapLimit { .. } => {
                io::Error::new(io::ErrorKind::OutOfMemory, e)
            }
            Error::Config { .. } | Error::OutOfBounds { .. } | Error::NoSuchCpu { .. } | Error::SlotOccupied { .. } => {
                io::Error::new(io::ErrorKind::InvalidInput, e)
            }
            other => io::Error::other(other),
        }
    }
}
