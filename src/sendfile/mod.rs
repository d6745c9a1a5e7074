//! Sending file pages to sockets, sendfile style: the page-cache stand-in
//! ([`PageFile`]) and every way of getting a byte range of it onto a socket.
//!
//! | [`Mode`] | how | per request |
//! | --- | --- | --- |
//! | [`Mode::Sendfile`] | `sendfile(2)` from the memfd, pages by reference | 1 call per run + hold bookkeeping |
//! | [`Mode::Copy`] | copy out of the direct map into a buffer, `send` | 1 `send` per buffer |
//! | [`Mode::MmapPerRequest`] | map runs into a window, `writev`, unmap | 2 mapping calls per run + `writev`s |
//! | [`Mode::SfBuf`] | `writev` from a shared sf_buf pool ([`SfBufSource`]) | `writev`s; a miss: 1 `mmap` (+ 1 unmap if it evicts) |
//! | [`Mode::Lwbuf`] | `writev` from per-CPU lwbuf caches, a page per mapping ([`LwbufSource`]) | `writev`s; a miss: as sf_buf |
//! | [`Mode::LwbufRun`] | the same, contiguous frames as one run mapping | `writev`s; a miss: as sf_buf |
//! | [`Mode::DirectMap`] | `writev` from the direct map | `writev`s only |
//! | [`Mode::ZeroCopy`] | `sendmsg(MSG_ZEROCOPY)` from the direct map | `sendmsg`s + completions |
//!
//! The mapping-based modes share one engine ([`send_mapped`]): it asks a
//! [`MapSource`] for mappings of the runs of a range, sends up to
//! `IOV_MAX` of them per `sendmsg(MSG_NOSIGNAL)`, handles partial writes and
//! `EAGAIN`, and drops each mapping as soon as a call has taken its last
//! byte. The mapping schemes plug in as `MapSource`s: the direct map, a
//! window mapped per request, the sf_buf pool and the lwbuf caches (which
//! keep their mappings cached between requests).
//!
//! Two modes leave the kernel holding references to the pages after the
//! call returns, so they keep [`Page`](crate::Page) holds past it:
//! [`SendfileHolds`] until the data has been acknowledged, [`ZeroCopy`] until
//! the completion notification. [`Sender`] and [`Connection`] wrap it all:
//! one `Sender` per server, one `Connection` per socket.
//!
//! What each file holds:
//!
//! | file | holds |
//! | --- | --- |
//! | `mod.rs` | these docs, [`SendOptions`], [`SendStats`] |
//! | `mode.rs` | [`Mode`]: one table entry per mode (names, aliases, window and cache flags) |
//! | `via.rs` | what a sender sends with, one variant per mode holding that mode's source: where sources are built and checked, and where a send picks its path |
//! | `sender.rs` | [`Sender`] (one per server) and [`WorkerGuard`] |
//! | `conn.rs` | [`Connection`] (one per socket) and the holds it keeps between requests |
//! | `engine.rs` | the `writev` engine ([`send_mapped`]) and the copy path ([`send_copy`]) |
//! | `source.rs` | the [`MapSource`] seam, the direct map and per-request window sources |
//! | `cache.rs` | the cache-backed sources ([`SfBufSource`], [`LwbufSource`]), [`CachedMapping`], [`CacheStats`] |
//! | `kernel.rs` | `sendfile(2)` and [`SendfileHolds`] |
//! | `zerocopy.rs` | `MSG_ZEROCOPY` and its completions ([`ZeroCopy`]) |
//! | `file.rs` | the page-cache stand-in ([`PageFile`]), views of pages held elsewhere ([`PageFile::from_pages`]), and their runs |
//! | `pattern.rs` | [`Pattern`], the verifiable content of generated files (a test and benchmark aid) |
//! | `sys.rs` | the socket system calls, each behind a safe wrapper |
//!
//! ```
//! use std::io::Read;
//! use std::os::fd::AsFd;
//! use lwbuf::PhysMem;
//! use lwbuf::sendfile::{send_mapped, DirectMapSource, PageFile, Pattern, SendOptions};
//!
//! let mem = PhysMem::builder().frames(64).build()?;
//! let file = PageFile::pattern(&mem, 20_000, 9)?;
//! let (tx, mut rx) = std::os::unix::net::UnixStream::pair()?;
//! let st = send_mapped(tx.as_fd(), &file, 0..20_000, b"hdr:", &DirectMapSource::new(&mem)?, &SendOptions::default())?;
//! assert_eq!(st.bytes, 20_004);
//! let mut got = vec![0u8; 20_004];
//! rx.read_exact(&mut got)?;
//! assert_eq!(&got[..4], b"hdr:");
//! assert_eq!(Pattern::new(9).check(0, &got[4..]), None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cache;
mod conn;
mod engine;
mod file;
mod kernel;
mod mode;
mod pattern;
mod sender;
mod source;
mod sys;
mod via;
mod zerocopy;

use std::time::Duration;

pub use cache::{
    chunk_grid, mapping_len, CacheStats, CachedMapping, LwbufMapping, LwbufSource, SfBufSource, SfMapping,
};
pub use conn::Connection;
pub use engine::{send_copy, send_mapped};
pub use file::{ChunkGrid, FileRun, PageFile, PageFileBuilder, Runs};
pub use kernel::SendfileHolds;
pub use mode::Mode;
pub use pattern::Pattern;
pub use sender::{Sender, WorkerGuard};
pub use source::{DirectMapSource, DirectMapping, MapSource, Mapped, WindowMapping, WindowSource};
pub use sys::ignore_sigpipe;
pub use zerocopy::{ZeroCopy, ZeroCopyStats};

/// The most `iovec`s the engine passes to one `sendmsg` (Linux's `UIO_MAXIOV`).
pub const IOV_MAX: usize = crate::kaddr::IOV_MAX;

/// The sendfile caches' default mapping granule, in frames (see
/// [`SendOptions::granule`]): beyond the cache, on the main job's file set,
/// 512 frames served 1.0-1.2x kernel sendfile where 16 frames served 0.5x
/// and single frames 0.1-0.7x (BENCHMARKS.md has the sweep); inside it,
/// every granule did the same.
pub const DEFAULT_GRANULE: usize = 512;

/// Knobs of the send paths. `SendOptions::default()` suits a server; tests
/// shorten the timeouts with the chainable setters:
///
/// ```
/// use std::time::Duration;
/// use lwbuf::sendfile::SendOptions;
///
/// let o = SendOptions::default().max_run(4).stall_timeout(Some(Duration::from_secs(5)));
/// assert_eq!((o.max_run, o.window_slots), (4, SendOptions::default().window_slots));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendOptions {
    /// How long one send may wait for a full socket to take more bytes
    /// (`POLLOUT`) or for a zero-copy completion before failing with
    /// [`Error::TimedOut`](crate::Error::TimedOut); `None` waits forever.
    /// Default 30 s.
    pub stall_timeout: Option<Duration>,
    /// The most bytes the mapping-based modes map ahead of the kernel: a
    /// batch is sent (and its mappings released) when it reaches this or
    /// [`IOV_MAX`] regions. Default 4 MiB.
    pub batch_bytes: usize,
    /// [`Mode::Copy`]'s buffer. Default 64 KiB.
    pub copy_buffer: usize,
    /// The mapping capacity of the window-based modes, in slots (frames):
    /// the window [`Sender::new`] reserves for [`Mode::MmapPerRequest`],
    /// the sf_buf pool's window for [`Mode::SfBuf`], and each CPU's share
    /// of the lwbuf window for [`Mode::Lwbuf`] and [`Mode::LwbufRun`] (whose
    /// window has `cpus * window_slots` slots: every CPU maps what it sends
    /// itself, so every CPU caches its own copy of a hot page). Default
    /// 8192 (32 MiB of 4 KiB frames).
    pub window_slots: usize,
    /// Cached unused mappings the caches keep: the sf_buf pool in all, each
    /// lwbuf CPU on its own (entries: a run mapping is one). `None`: as many
    /// as the window (per CPU for lwbuf) has slots, so a working set that
    /// fits stays mapped. Default `None`.
    pub max_excess: Option<usize>,
    /// The longest run of contiguous frames [`Mode::SfBuf`] and
    /// [`Mode::LwbufRun`] map as one mapping, in pages (1: a mapping per
    /// page). Default 16 (64 KiB of 4 KiB frames).
    pub max_run: usize,
    /// CPUs of the lwbuf caches: the number of worker threads that
    /// [`Sender::bind_worker`] binds. `None`: the available parallelism.
    pub cpus: Option<usize>,
    /// [`Mode::ZeroCopy`]: bytes held for sends in flight on one connection
    /// beyond which a new send first waits for completions. Default 16 MiB.
    pub zerocopy_max_held: usize,
    /// How long dropping a [`Connection`] waits for its holds to be released
    /// before leaking them. Default 1 s.
    pub close_timeout: Duration,
    /// The caches' mapping granule in frames (see
    /// [`LwbufsBuilder::granule`](crate::LwbufsBuilder::granule)). `None`,
    /// the default: [`DEFAULT_GRANULE`] frames (2 MiB of 4 KiB frames), but
    /// at most a sixteenth of the cache's slots and at least the memory's
    /// smallest granule (one huge page on huge-page memory). A file's pages
    /// are runs of contiguous frames, so a large granule serves a whole
    /// file, or several, with one mapping.
    pub granule: Option<usize>,
    /// What the caches do with evicted mappings
    /// ([`Reclaim`](crate::Reclaim)). Default lazy.
    pub reclaim: crate::Reclaim,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            stall_timeout: Some(Duration::from_secs(30)),
            batch_bytes: 4 << 20,
            copy_buffer: 64 << 10,
            window_slots: 8192,
            max_excess: None,
            max_run: 16,
            cpus: None,
            zerocopy_max_held: 16 << 20,
            close_timeout: Duration::from_secs(1),
            granule: None,
            reclaim: crate::Reclaim::Lazy,
        }
    }
}

/// Chainable setters, one per field, named as the field:
/// `SendOptions::default().max_run(4).cpus(Some(2))`. (The struct is
/// `#[non_exhaustive]`, so that a new knob is not a breaking change: build
/// it from `default()` and these, or assign the public fields.)
macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty),* $(,)?) => {
        impl SendOptions {
            $(
                $(#[$doc])*
                #[must_use]
                pub fn $field(mut self, v: $ty) -> Self {
                    self.$field = v;
                    self
                }
            )*
        }
    };
}

setters!(
    /// Set [`stall_timeout`](SendOptions#structfield.stall_timeout).
    stall_timeout: Option<Duration>,
    /// Set [`batch_bytes`](SendOptions#structfield.batch_bytes).
    batch_bytes: usize,
    /// Set [`copy_buffer`](SendOptions#structfield.copy_buffer).
    copy_buffer: usize,
    /// Set [`window_slots`](SendOptions#structfield.window_slots).
    window_slots: usize,
    /// Set [`max_excess`](SendOptions#structfield.max_excess).
    max_excess: Option<usize>,
    /// Set [`max_run`](SendOptions#structfield.max_run).
    max_run: usize,
    /// Set [`cpus`](SendOptions#structfield.cpus).
    cpus: Option<usize>,
    /// Set [`zerocopy_max_held`](SendOptions#structfield.zerocopy_max_held).
    zerocopy_max_held: usize,
    /// Set [`close_timeout`](SendOptions#structfield.close_timeout).
    close_timeout: Duration,
    /// Set [`granule`](SendOptions#structfield.granule).
    granule: Option<usize>,
    /// Set [`reclaim`](SendOptions#structfield.reclaim).
    reclaim: crate::Reclaim,
);

impl SendOptions {
    /// [`cpus`](Self::cpus), or the available parallelism.
    pub(crate) fn lwbuf_cpus(&self) -> usize {
        self.cpus.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// What one send did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendStats {
    /// Bytes the kernel took (header included).
    pub bytes: u64,
    /// Send system calls that took bytes (`sendmsg`, `writev`, `sendfile`).
    pub calls: u64,
    /// Times the socket was full (`EAGAIN`) and the send waited.
    pub waits: u64,
    /// Mappings asked of the [`MapSource`] (0 for copy and sendfile).
    pub mappings: u64,
}

impl std::ops::AddAssign for SendStats {
    fn add_assign(&mut self, o: SendStats) {
        self.bytes += o.bytes;
        self.calls += o.calls;
        self.waits += o.waits;
        self.mappings += o.mappings;
    }
}
