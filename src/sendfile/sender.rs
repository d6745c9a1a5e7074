//! [`Sender`]: what one server sends with (a [`Mode`], the options and the
//! mode's sources, shared by every worker), and [`WorkerGuard`], a worker
//! thread's binding to it.

use std::fmt;
use std::os::fd::AsFd;
use std::sync::Arc;

use super::cache::{CacheStats, LwbufSource, SfBufSource};
use super::conn::Connection;
use super::mode::Mode;
use super::source::WindowSource;
use super::via::{Plain, Via};
use super::SendOptions;
use crate::error::{Error, Result};
use crate::lwbuf::CpuGuard;
use crate::mmu::{Mmu, MmuStats};
use crate::phys::PhysMem;

/// What one server sends with: a [`Mode`], the options, and the mapping
/// resources the mode needs (a window for [`Mode::MmapPerRequest`], an
/// sf_buf pool for [`Mode::SfBuf`], per-CPU lwbuf caches for
/// [`Mode::Lwbuf`] and [`Mode::LwbufRun`]). `Sync`: one `Sender` serves
/// every worker thread, which share its caches; each socket gets a
/// [`Connection`]. Mappings borrow the sender, so it outlives every worker
/// (`std::thread::scope`, or workers joined before it is dropped).
///
/// ```
/// use std::io::Read;
/// use std::net::{TcpListener, TcpStream};
/// use lwbuf::PhysMem;
/// use lwbuf::sendfile::{Mode, PageFile, Pattern, SendOptions, Sender};
///
/// let mem = PhysMem::builder().frames(64).build()?;
/// let file = PageFile::pattern(&mem, 50_000, 42)?;
/// let l = TcpListener::bind("127.0.0.1:0")?;
/// let client = TcpStream::connect(l.local_addr()?)?;
/// let (server, _) = l.accept()?;
///
/// let sender = Sender::new(Mode::MmapPerRequest, &mem, SendOptions::default())?;
/// let mut conn = sender.connection(server)?;
/// std::thread::scope(|s| {
///     let reader = s.spawn(move || {
///         let mut got = vec![0u8; 40_000];
///         (&client).read_exact(&mut got).map(|_| got)
///     });
///     conn.send(&file, 10_000..50_000, b"")?;
///     let got = reader.join().expect("reader")?;
///     assert_eq!(Pattern::new(42).check(10_000, &got), None);
///     Ok::<_, Box<dyn std::error::Error>>(())
/// })?;
/// // 11 pages in one run: one mmap in, one remap out.
/// assert_eq!(sender.mmu_stats().map(|s| s.enters), Some(1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// With a cache, the second send of the same pages makes no system call:
///
/// ```
/// use std::io::Read;
/// use std::os::unix::net::UnixStream;
/// use lwbuf::PhysMem;
/// use lwbuf::sendfile::{Mode, PageFile, SendOptions, Sender};
///
/// let mem = PhysMem::builder().frames(64).build()?;
/// let file = PageFile::pattern(&mem, 40_000, 7)?;
/// let opts = SendOptions::default().cpus(Some(2));
/// let sender = Sender::new(Mode::LwbufRun, &mem, opts)?;
/// let worker = sender.bind_worker(0, false)?; // this thread is CPU 0 of the caches
/// let (a, mut b) = UnixStream::pair()?;
/// let mut conn = sender.connection(a)?;
/// let mut got = vec![0u8; 40_000];
/// conn.send(&file, 0..40_000, b"")?; // a miss: one mmap of the 10-page run
/// b.read_exact(&mut got)?;
/// let before = sender.mmu_stats().expect("window");
/// conn.send(&file, 0..40_000, b"")?; // a hit
/// b.read_exact(&mut got)?;
/// assert_eq!(sender.mmu_stats().expect("window").since(&before).syscalls, 0);
/// assert_eq!(sender.cache_stats().map(|c| c.hits), Some(1));
/// drop(worker);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Sender {
    pub(super) opts: SendOptions,
    pub(super) phys: PhysMem,
    /// The mode and its sources, one value: a sender cannot hold a source
    /// its mode does not use.
    pub(super) via: Via,
}

/// The binding of a worker thread, from [`Sender::bind_worker`]; dropping
/// it unbinds. Not `Send`: a binding belongs to its thread.
#[must_use = "the worker is unbound as soon as the guard is dropped"]
pub struct WorkerGuard<'s> {
    cpu: usize,
    guard: Option<CpuGuard<'s>>,
}

impl WorkerGuard<'_> {
    /// The worker's CPU id.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// Whether the thread holds a CPU of the sender's lwbuf caches.
    pub fn is_bound(&self) -> bool {
        self.guard.is_some()
    }
}

impl fmt::Debug for WorkerGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerGuard").field("cpu", &self.cpu).field("bound", &self.is_bound()).finish()
    }
}

impl Sender {
    /// A sender of `mode` for files in `phys`. The window-based modes
    /// reserve a [`Window`](crate::Window) (one `mmap`):
    /// [`SendOptions::window_slots`] slots for [`Mode::MmapPerRequest`]
    /// and [`Mode::SfBuf`], that many per CPU ([`SendOptions::cpus`]) for
    /// the lwbuf modes. Errors: [`Error::NoDirectMap`] for the direct-map
    /// modes without one, [`Error::Config`] for sendfile or a window over
    /// heap memory.
    pub fn new(mode: Mode, phys: &PhysMem, opts: SendOptions) -> Result<Sender> {
        let via = Via::build(mode, phys, None, &opts)?;
        Ok(Sender { opts, phys: phys.clone(), via })
    }

    /// A [`Mode::MmapPerRequest`] sender that maps through `window` (over
    /// any [`Mmu`], e.g. a [`ModelMmu`](crate::ModelMmu)). [`Error::Config`]
    /// for other modes, which map through no per-request window.
    pub fn with_window(mode: Mode, window: WindowSource, opts: SendOptions) -> Result<Sender> {
        if mode != Mode::MmapPerRequest {
            return Err(Error::config("mode", format!("{mode} maps through no per-request window")));
        }
        let phys = window.mmu().phys().clone();
        Ok(Sender { opts, phys, via: Via::Plain(Plain::MmapPerRequest(window)) })
    }

    /// A sender of a window-based mode whose window, pool or caches map
    /// through `mmu` (all of its slots; e.g. a [`ModelMmu`](crate::ModelMmu),
    /// which makes no system call). [`Error::Config`] for other modes.
    pub fn with_mmu(mode: Mode, mmu: Arc<dyn Mmu>, opts: SendOptions) -> Result<Sender> {
        let phys = mmu.phys().clone();
        let via = Via::build(mode, &phys, Some(mmu), &opts)?;
        Ok(Sender { opts, phys, via })
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.via.mode()
    }

    /// The options.
    pub fn options(&self) -> &SendOptions {
        &self.opts
    }

    /// The window source, for [`Mode::MmapPerRequest`].
    pub fn window(&self) -> Option<&WindowSource> {
        match &self.via {
            Via::Plain(Plain::MmapPerRequest(w)) => Some(w),
            _ => None,
        }
    }

    /// The sf_buf pool source, for [`Mode::SfBuf`].
    pub fn sfbuf(&self) -> Option<&SfBufSource> {
        match &self.via {
            Via::Plain(Plain::SfBuf(p)) => Some(p),
            _ => None,
        }
    }

    /// The lwbuf caches source, for [`Mode::Lwbuf`] and [`Mode::LwbufRun`].
    pub fn lwbuf(&self) -> Option<&LwbufSource> {
        match &self.via {
            Via::Plain(Plain::Lwbuf(l) | Plain::LwbufRun(l)) => Some(l),
            _ => None,
        }
    }

    /// The window's MMU counters (mapping system calls), `None` for modes
    /// without a window.
    pub fn mmu_stats(&self) -> Option<MmuStats> {
        self.via.mmu_stats()
    }

    /// The mapping granule of the mode's cache, in frames (see
    /// [`SendOptions::granule`]), `None` for modes without one.
    pub fn granule(&self) -> Option<usize> {
        match &self.via {
            Via::Plain(Plain::SfBuf(p)) => Some(p.pool().granule()),
            Via::Plain(Plain::Lwbuf(l) | Plain::LwbufRun(l)) => Some(l.lwbufs().granule()),
            _ => None,
        }
    }

    /// Hits and lookups of the mode's mapping cache, `None` for modes
    /// without one. Cheap but not free: it reads every CPU's counters
    /// (lwbuf) or scans the pool's entries (sf_buf).
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.via.cache_stats()
    }

    /// Make the calling thread worker `cpu` of this sender, until the guard
    /// is dropped: for the lwbuf modes, bind it to CPU `cpu` of the caches
    /// (every mapping it makes then comes from, and goes back to, that
    /// CPU's cache); with `pin`, also pin it to core `cpu % cores` (one
    /// system call), in every mode. Do it once per worker thread, for its
    /// whole life. Errors (lwbuf modes): [`Error::NoSuchCpu`] for `cpu` not
    /// below [`SendOptions::cpus`], [`Error::CpuBusy`],
    /// [`Error::AlreadyBound`]; with `pin`, the kernel's refusal to pin
    /// ([`Error::Sys`]).
    pub fn bind_worker(&self, cpu: usize, pin: bool) -> Result<WorkerGuard<'_>> {
        let guard = match self.lwbuf() {
            Some(l) => Some(l.bind_worker(cpu, pin)?),
            None => {
                if pin {
                    crate::cpu::pin_to_core(cpu)?;
                }
                None
            }
        };
        Ok(WorkerGuard { cpu, guard })
    }

    /// Per-socket state for sending on `stream` (blocking or not). For
    /// [`Mode::ZeroCopy`] this sets `SO_ZEROCOPY` (one `setsockopt`).
    pub fn connection<S: AsFd>(&self, stream: S) -> Result<Connection<'_, S>> {
        Connection::new(self, stream)
    }
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender").field("mode", &self.mode()).field("via", &self.via).finish()
    }
}
