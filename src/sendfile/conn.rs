//! [`Mode`], [`Sender`] (per server: the mode and what it maps with) and
//! [`Connection`] (per socket: the holds a mode keeps between requests).

use std::fmt;
use std::ops::Range;
use std::os::fd::AsFd;
use std::str::FromStr;
use std::time::Duration;

use super::engine::{send_all, send_copy, send_mapped, Out};
use super::file::PageFile;
use super::kernel::SendfileHolds;
use super::source::{DirectMapSource, MapSource, WindowSource};
use super::zerocopy::{ZeroCopy, ZeroCopyStats};
use super::{SendOptions, SendStats};
use crate::error::{Error, Result};
use crate::mmu::MmuStats;
use crate::phys::{Backing, PhysMem};

/// How a byte range of a [`PageFile`] gets to a socket.
///
/// More modes (the lwbuf caches, the sf_buf pool) will join; match with a
/// wildcard arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// Kernel `sendfile(2)` from the memfd: no mapping, no copy in user
    /// space; pages go to the socket by reference and stay held until the
    /// data has left ([`SendfileHolds`]).
    Sendfile,
    /// The classic read/write server: copy into a user buffer (from the
    /// direct map) and `send` it.
    Copy,
    /// Map every page (a run per `mmap`) into a window for each request,
    /// `writev`, unmap: the no-cache baseline; 2 mapping system calls per run.
    MmapPerRequest,
    /// `writev` straight from the direct map: the physical limit of the
    /// mapping-based modes; no mapping system call.
    DirectMap,
    /// `sendmsg(MSG_ZEROCOPY)` from the direct map, pages and mappings held
    /// until the completion notification ([`ZeroCopy`]).
    ZeroCopy,
}

impl Mode {
    /// Every mode, in the order the benchmarks show them.
    pub const ALL: &'static [Mode] =
        &[Mode::Sendfile, Mode::Copy, Mode::MmapPerRequest, Mode::DirectMap, Mode::ZeroCopy];

    /// The short name (`sendfile`, `copy`, `mmap`, `direct`, `zerocopy`),
    /// which [`FromStr`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Sendfile => "sendfile",
            Mode::Copy => "copy",
            Mode::MmapPerRequest => "mmap",
            Mode::DirectMap => "direct",
            Mode::ZeroCopy => "zerocopy",
        }
    }

    /// Whether the mode maps through a window (and so makes mapping system
    /// calls that [`Sender::mmu_stats`] counts).
    pub fn uses_window(self) -> bool {
        matches!(self, Mode::MmapPerRequest)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = Error;

    /// A name of [`Mode::name`] or a longer alias (`read-write`,
    /// `mmap-per-request`, `direct-map`, `msg-zerocopy`), any case.
    fn from_str(s: &str) -> Result<Mode> {
        let m = match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "sendfile" | "kernel-sendfile" => Mode::Sendfile,
            "copy" | "read-write" | "readwrite" => Mode::Copy,
            "mmap" | "mmap-per-request" | "window" => Mode::MmapPerRequest,
            "direct" | "direct-map" | "dmap" => Mode::DirectMap,
            "zerocopy" | "zero-copy" | "msg-zerocopy" => Mode::ZeroCopy,
            _ => {
                let names: Vec<_> = Mode::ALL.iter().map(|m| m.name()).collect();
                return Err(Error::config("mode", format!("unknown mode {s:?}; known: {}", names.join(", "))));
            }
        };
        Ok(m)
    }
}

// === Sender ===

/// What one server sends with: a [`Mode`], the options, and the mapping
/// resources the mode needs (a window for [`Mode::MmapPerRequest`]).
/// `Sync`: one `Sender` serves every worker thread; each socket gets a
/// [`Connection`].
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
pub struct Sender {
    mode: Mode,
    opts: SendOptions,
    phys: PhysMem,
    direct: Option<DirectMapSource>,
    window: Option<WindowSource>,
}

impl Sender {
    /// A sender of `mode` for files in `phys`. [`Mode::MmapPerRequest`]
    /// reserves a [`Window`](crate::Window) of
    /// [`SendOptions::window_slots`] slots (one `mmap`). Errors:
    /// [`Error::NoDirectMap`] for the direct-map modes without one,
    /// [`Error::Config`] for sendfile or a window over heap memory.
    pub fn new(mode: Mode, phys: &PhysMem, opts: SendOptions) -> Result<Sender> {
        let window = if mode.uses_window() { Some(WindowSource::window(phys, opts.window_slots)?) } else { None };
        Self::build(mode, phys, window, opts)
    }

    /// A sender that maps through `window` (any [`Mmu`](crate::Mmu), e.g. a
    /// [`ModelMmu`](crate::ModelMmu)) for the window-based modes.
    pub fn with_window(mode: Mode, window: WindowSource, opts: SendOptions) -> Result<Sender> {
        let phys = window.mmu().phys().clone();
        Self::build(mode, &phys, Some(window), opts)
    }

    fn build(mode: Mode, phys: &PhysMem, window: Option<WindowSource>, opts: SendOptions) -> Result<Sender> {
        let direct = if phys.has_direct_map() { Some(DirectMapSource::new(phys)?) } else { None };
        match mode {
            Mode::Copy | Mode::DirectMap | Mode::ZeroCopy if direct.is_none() => return Err(Error::NoDirectMap),
            Mode::Sendfile if phys.backing() != Backing::Memfd => {
                return Err(Error::config("backing", "sendfile needs memfd-backed memory"))
            }
            Mode::MmapPerRequest if window.is_none() => {
                return Err(Error::config("window", "mmap mode needs a window"))
            }
            _ => {}
        }
        Ok(Sender { mode, opts, phys: phys.clone(), direct, window })
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The options.
    pub fn options(&self) -> &SendOptions {
        &self.opts
    }

    /// The window source, for the window-based modes.
    pub fn window(&self) -> Option<&WindowSource> {
        self.window.as_ref()
    }

    /// The window's MMU counters (mapping system calls), `None` for modes
    /// without a window.
    pub fn mmu_stats(&self) -> Option<MmuStats> {
        self.window.as_ref().and_then(|w| w.mmu_stats())
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
        f.debug_struct("Sender").field("mode", &self.mode).field("window", &self.window).finish()
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

/// `MapSource` is implemented for references too, so a borrowed source can
/// be handed to [`send_mapped`] and [`ZeroCopy`] alike.
impl<T: MapSource> MapSource for &T {
    type Mapping<'s>
        = T::Mapping<'s>
    where
        Self: 's;

    fn map<'s>(&'s self, run: &[crate::phys::Page]) -> Result<Self::Mapping<'s>> {
        (**self).map(run)
    }

    fn mmu_stats(&self) -> Option<MmuStats> {
        (**self).mmu_stats()
    }
}
