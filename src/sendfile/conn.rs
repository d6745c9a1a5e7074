//! [`Sender`] (per server: the mode and what it maps with) and
//! [`Connection`] (per socket: the holds a mode keeps between requests).

use std::fmt;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use super::cache::{CacheStats, LwbufSource, SfBufSource};
use super::engine::{send_all, send_copy, send_mapped, Out};
use super::file::PageFile;
use super::kernel::SendfileHolds;
use super::mode::Mode;
use super::source::{DirectMapSource, MapSource, WindowSource};
use super::zerocopy::{ZeroCopy, ZeroCopyStats};
use super::{SendOptions, SendStats};
use crate::error::{Error, Result};
use crate::lwbuf::CpuGuard;
use crate::mmu::{Mmu, MmuStats};
use crate::phys::{Backing, PhysMem};

// === Sender ===

/// What one server sends with: a [`Mode`], the options, and the mapping
/// resources the mode needs (a window for [`Mode::MmapPerRequest`], an
/// sf_buf pool for [`Mode::Sfbuf`], per-CPU lwbuf caches for
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
    mode: Mode,
    opts: SendOptions,
    phys: PhysMem,
    direct: Option<DirectMapSource>,
    window: Option<WindowSource>,
    sfbuf: Option<SfBufSource>,
    lwbuf: Option<LwbufSource>,
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
    /// and [`Mode::Sfbuf`], that many per CPU ([`SendOptions::cpus`]) for
    /// the lwbuf modes. Errors: [`Error::NoDirectMap`] for the direct-map
    /// modes without one, [`Error::Config`] for sendfile or a window over
    /// heap memory.
    pub fn new(mode: Mode, phys: &PhysMem, opts: SendOptions) -> Result<Sender> {
        let (mut window, mut sfbuf, mut lwbuf) = (None, None, None);
        match mode {
            Mode::MmapPerRequest => window = Some(WindowSource::window(phys, opts.window_slots)?),
            Mode::Sfbuf => {
                sfbuf = Some(SfBufSource::window(
                    phys,
                    opts.window_slots,
                    opts.max_excess,
                    opts.max_run,
                    opts.stall_timeout,
                )?)
            }
            Mode::Lwbuf | Mode::LwbufRun => {
                lwbuf = Some(LwbufSource::window(
                    phys,
                    opts.lwbuf_cpus(),
                    opts.window_slots,
                    opts.max_excess,
                    Self::lwbuf_run(mode, &opts),
                )?)
            }
            _ => {}
        }
        Self::build(mode, phys, window, sfbuf, lwbuf, opts)
    }

    /// A sender that maps through `window` (any [`Mmu`], e.g. a
    /// [`ModelMmu`](crate::ModelMmu)) for the window-based modes.
    pub fn with_window(mode: Mode, window: WindowSource, opts: SendOptions) -> Result<Sender> {
        let phys = window.mmu().phys().clone();
        Self::build(mode, &phys, Some(window), None, None, opts)
    }

    /// A sender of a window-based mode whose window, pool or caches map
    /// through `mmu` (all of its slots; e.g. a [`ModelMmu`](crate::ModelMmu),
    /// which makes no system call). [`Error::Config`] for other modes.
    pub fn with_mmu(mode: Mode, mmu: Arc<dyn Mmu>, opts: SendOptions) -> Result<Sender> {
        let phys = mmu.phys().clone();
        let (mut window, mut sfbuf, mut lwbuf) = (None, None, None);
        match mode {
            Mode::MmapPerRequest => window = Some(WindowSource::new(mmu)?),
            Mode::Sfbuf => sfbuf = Some(SfBufSource::with_mmu(mmu, opts.max_excess, opts.max_run, opts.stall_timeout)?),
            Mode::Lwbuf | Mode::LwbufRun => {
                let run = Self::lwbuf_run(mode, &opts);
                lwbuf = Some(LwbufSource::with_mmu(mmu, opts.lwbuf_cpus(), opts.max_excess, run)?)
            }
            _ => return Err(Error::config("mode", format!("{mode} maps through no window"))),
        }
        Self::build(mode, &phys, window, sfbuf, lwbuf, opts)
    }

    fn lwbuf_run(mode: Mode, opts: &SendOptions) -> usize {
        if mode == Mode::LwbufRun {
            opts.max_run
        } else {
            1
        }
    }

    fn build(
        mode: Mode,
        phys: &PhysMem,
        window: Option<WindowSource>,
        sfbuf: Option<SfBufSource>,
        lwbuf: Option<LwbufSource>,
        opts: SendOptions,
    ) -> Result<Sender> {
        let direct = if phys.has_direct_map() { Some(DirectMapSource::new(phys)?) } else { None };
        match mode {
            Mode::Copy | Mode::DirectMap | Mode::ZeroCopy if direct.is_none() => return Err(Error::NoDirectMap),
            Mode::Sendfile if phys.backing() != Backing::Memfd => {
                return Err(Error::config("backing", "sendfile needs memfd-backed memory"))
            }
            Mode::MmapPerRequest if window.is_none() => {
                return Err(Error::config("window", "mmap mode needs a window"))
            }
            Mode::Sfbuf if sfbuf.is_none() => return Err(Error::config("window", "sfbuf mode needs a pool")),
            Mode::Lwbuf | Mode::LwbufRun if lwbuf.is_none() => {
                return Err(Error::config("window", "lwbuf modes need lwbuf caches"))
            }
            _ => {}
        }
        Ok(Sender { mode, opts, phys: phys.clone(), direct, window, sfbuf, lwbuf })
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The options.
    pub fn options(&self) -> &SendOptions {
        &self.opts
    }

    /// The window source, for [`Mode::MmapPerRequest`].
    pub fn window(&self) -> Option<&WindowSource> {
        self.window.as_ref()
    }

    /// The sf_buf pool source, for [`Mode::Sfbuf`].
    pub fn sfbuf(&self) -> Option<&SfBufSource> {
        self.sfbuf.as_ref()
    }

    /// The lwbuf caches source, for [`Mode::Lwbuf`] and [`Mode::LwbufRun`].
    pub fn lwbuf(&self) -> Option<&LwbufSource> {
        self.lwbuf.as_ref()
    }

    /// The window's MMU counters (mapping system calls), `None` for modes
    /// without a window.
    pub fn mmu_stats(&self) -> Option<MmuStats> {
        if let Some(w) = &self.window {
            w.mmu_stats()
        } else if let Some(p) = &self.sfbuf {
            p.mmu_stats()
        } else {
            self.lwbuf.as_ref().and_then(|l| l.mmu_stats())
        }
    }

    /// Hits and lookups of the mode's mapping cache, `None` for modes
    /// without one. Cheap but not free: it reads every CPU's counters
    /// (lwbuf) or scans the pool's entries (sf_buf).
    pub fn cache_stats(&self) -> Option<CacheStats> {
        match (&self.sfbuf, &self.lwbuf) {
            (Some(p), _) => Some(p.cache_stats()),
            (_, Some(l)) => Some(l.cache_stats()),
            _ => None,
        }
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
        let guard = match &self.lwbuf {
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
        let state = match self.mode {
            Mode::Sendfile => State::Sendfile(SendfileHolds::new()),
            Mode::ZeroCopy => {
                let direct = self.direct.as_ref().ok_or(Error::NoDirectMap)?;
                State::ZeroCopy(ZeroCopy::new(stream.as_fd(), direct)?)
            }
            _ => State::Plain,
        };
        Ok(Connection { sender: self, stream, state, buf: Vec::new(), stats: SendStats::default() })
    }
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("mode", &self.mode)
            .field("window", &self.window)
            .field("sfbuf", &self.sfbuf)
            .field("lwbuf", &self.lwbuf)
            .finish()
    }
}

// === Connection ===

enum State<'s> {
    Plain,
    Sendfile(SendfileHolds),
    ZeroCopy(ZeroCopy<'s, DirectMapSource>),
}

/// One socket of a [`Sender`]: sends ranges in the sender's mode and keeps
/// what the mode must hold between requests (sendfile's and zero-copy's page
/// holds).
///
/// Dropping it waits up to [`SendOptions::close_timeout`] for held pages to
/// be released, then leaks whatever is still held (see [`SendfileHolds`]).
pub struct Connection<'s, S: AsFd> {
    sender: &'s Sender,
    stream: S,
    state: State<'s>,
    buf: Vec<u8>,
    stats: SendStats,
}

impl<'s, S: AsFd> Connection<'s, S> {
    /// The socket.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The socket, to read requests from. Do not send on it directly with
    /// `MSG_ZEROCOPY`.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The sender.
    pub fn sender(&self) -> &'s Sender {
        self.sender
    }

    /// Totals of every send on this connection.
    pub fn stats(&self) -> SendStats {
        self.stats
    }

    /// Zero-copy counters (all zero in other modes).
    pub fn zerocopy_stats(&self) -> ZeroCopyStats {
        match &self.state {
            State::ZeroCopy(z) => z.stats(),
            _ => ZeroCopyStats::default(),
        }
    }

    /// Page holds kept for data the kernel may still read.
    pub fn held_pages(&self) -> usize {
        match &self.state {
            State::Plain => 0,
            State::Sendfile(h) => h.held_pages(),
            State::ZeroCopy(z) => z.held_pages(),
        }
    }

    /// Send `header` and then bytes `range` of `file`, in the sender's mode.
    /// Returns once the kernel has taken every byte (waiting on `EAGAIN` for
    /// a non-blocking socket). Errors: [`Error::OutOfBounds`] for a range
    /// outside the file, [`Error::ForeignPage`] for a file of other memory,
    /// [`Error::Sys`] for the socket's errors (`ECONNRESET`, `EPIPE`, ...),
    /// [`Error::TimedOut`] after [`SendOptions::stall_timeout`] without
    /// progress. Nothing is left mapped after an error; page holds the
    /// kernel may still need are kept until [`reap`](Self::reap) finds them
    /// released.
    pub fn send(&mut self, file: &PageFile, range: Range<u64>, header: &[u8]) -> Result<SendStats> {
        let s = self.sender;
        if !file.phys().same_as(&s.phys) {
            return Err(Error::ForeignPage);
        }
        let fd = self.stream.as_fd();
        let opts = &s.opts;
        let r = match (&mut self.state, s.mode) {
            (State::Sendfile(h), _) => h.send(fd, file, range, header, opts),
            (State::ZeroCopy(z), _) => z.send(fd, file, range, header, opts),
            (State::Plain, Mode::Copy) => send_copy(fd, file, range, header, &mut self.buf, opts),
            (State::Plain, Mode::MmapPerRequest) => match &s.window {
                Some(w) => send_mapped(fd, file, range, header, w, opts),
                None => Err(Error::config("window", "mmap mode needs a window")),
            },
            (State::Plain, Mode::Sfbuf) => match &s.sfbuf {
                Some(p) => send_mapped(fd, file, range, header, p, opts),
                None => Err(Error::config("window", "sfbuf mode needs a pool")),
            },
            // Every mapping is released before `send_mapped` returns, so a
            // thread that is no worker of the sender can borrow a CPU for it.
            (State::Plain, Mode::Lwbuf | Mode::LwbufRun) => match &s.lwbuf {
                Some(l) => l.with_cpu(|| send_mapped(fd, file, range, header, l, opts)),
                None => Err(Error::config("window", "lwbuf modes need lwbuf caches")),
            },
            (State::Plain, _) => match &s.direct {
                Some(d) => send_mapped(fd, file, range, header, d, opts),
                None => Err(Error::NoDirectMap),
            },
        };
        if let Ok(st) = &r {
            self.stats += *st;
        }
        r
    }

    /// Send plain bytes (an error response, say) by copy.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<SendStats> {
        let mut st = SendStats::default();
        send_all(&mut Out::new(self.stream.as_fd()), bytes, 0, &self.sender.opts, &mut st)?;
        self.stats += st;
        Ok(st)
    }

    /// Release the holds whose data has left (no waiting). Returns pages or
    /// completions released (sendfile: pages; zero-copy: messages read).
    pub fn reap(&mut self) -> Result<usize> {
        let fd = self.stream.as_fd();
        match &mut self.state {
            State::Plain => Ok(0),
            State::Sendfile(h) => h.reap(fd),
            State::ZeroCopy(z) => z.reap(fd),
        }
    }

    /// Wait until nothing is held, at most `timeout` ([`Error::TimedOut`]).
    pub fn flush(&mut self, timeout: Duration) -> Result<()> {
        let fd = self.stream.as_fd();
        match &mut self.state {
            State::Plain => Ok(()),
            State::Sendfile(h) => h.wait_drained(fd, timeout),
            State::ZeroCopy(z) => z.flush(fd, timeout),
        }
    }
}

impl<S: AsFd> Drop for Connection<'_, S> {
    fn drop(&mut self) {
        if self.held_pages() > 0 {
            // Best effort; whatever is still held afterwards is leaked by the
            // holders' own Drop.
            let _ = self.flush(self.sender.opts.close_timeout);
        }
    }
}

impl<S: AsFd> fmt::Debug for Connection<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("mode", &self.sender.mode)
            .field("held_pages", &self.held_pages())
            .field("stats", &self.stats)
            .finish()
    }
}
