//! The server: one worker thread per CPU, pinned, each with its own
//! `SO_REUSEPORT` listener on 127.0.0.1 and its own event loop (mio, epoll
//! underneath). Worker `i` is CPU `i` of the sender's lwbuf caches for its
//! whole life (`Sender::bind_worker`). A request is answered in place: the
//! worker sends the whole response (the library polls for `POLLOUT` when
//! the socket is full) before it serves the next. What a request gets is
//! decided by `http.rs`, and what its body is sent from by
//! `FileSet::answer` (a file in memory, or the pages of a file on disk
//! pinned in the page cache, read there on a miss); this file does the I/O
//! and enforces the limits.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant, SystemTime};

use lwbuf::sendfile::{Connection, SendOptions, SendStats, Sender};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};
use nix::sys::socket::{listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType};

use crate::fileset::FileSet;
use crate::http::{self, DateCache, Parsed, Request, Route, Status};
use crate::modes::{Runtime, ServerMode};
use crate::ServeArgs;

/// Counters of all workers (relaxed atomics: read once the run is over, or
/// roughly for progress).
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub calls: AtomicU64,
    pub waits: AtomicU64,
    pub send_errors: AtomicU64,
    pub bad_requests: AtomicU64,
    pub connections: AtomicU64,
    /// Connections open now (counted against `Limits::max_connections`).
    pub open: AtomicU64,
    /// Connections refused with 503 (over `Limits::max_connections`).
    pub refused: AtomicU64,
    pub zc_sends: AtomicU64,
    pub zc_completed: AtomicU64,
    pub zc_copied: AtomicU64,
}

/// A worker's counts of sent responses since it last added them to the
/// shared [`Stats`]: bumping shared atomics on every response would bounce
/// their cache line between the workers' CPUs.
#[derive(Default)]
struct Sent {
    requests: u64,
    bytes: u64,
    calls: u64,
    waits: u64,
}

impl Sent {
    fn add(&mut self, st: SendStats) {
        self.requests += 1;
        self.bytes += st.bytes;
        self.calls += st.calls;
        self.waits += st.waits;
    }
}

impl Stats {
    /// Add a worker's counts (once per turn of its event loop).
    fn flush(&self, s: &mut Sent) {
        if s.requests > 0 {
            self.requests.fetch_add(s.requests, Relaxed);
            self.bytes.fetch_add(s.bytes, Relaxed);
            self.calls.fetch_add(s.calls, Relaxed);
            self.waits.fetch_add(s.waits, Relaxed);
            *s = Sent::default();
        }
    }

    fn closed(&self, c: &Connection<'_, TcpStream>) {
        let z = c.zerocopy_stats();
        self.zc_sends.fetch_add(z.sends, Relaxed);
        self.zc_completed.fetch_add(z.completed, Relaxed);
        self.zc_copied.fetch_add(z.copied, Relaxed);
    }
}

// === listeners ===

fn listener(port: u16) -> io::Result<std::net::TcpListener> {
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: `addr` is a complete sockaddr_in, passed with its size, and
    // `fd` is the open socket created above.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    listen(&fd, Backlog::new(1024)?)?;
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    Ok(l)
}

/// `n` listeners sharing one port on 127.0.0.1 (`SO_REUSEPORT`: the kernel
/// spreads connections over them). Port 0 picks a free port.
pub fn bind_listeners(port: u16, n: usize) -> io::Result<(u16, Vec<std::net::TcpListener>)> {
    let first = listener(port)?;
    let port = first.local_addr()?.port();
    let mut all = vec![first];
    for _ in 1..n {
        all.push(listener(port)?);
    }
    Ok((port, all))
}

// === workers ===

/// Limits of the server (see `serve --help`): what a request head may hold,
/// how long a connection may sit without a complete request, and how many
/// may be open at once.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub http: http::Limits,
    /// A connection without a complete request for this long (since it
    /// was accepted or its last response was sent) is closed: with 408 if
    /// part of a request had arrived, silently otherwise.
    pub idle: Duration,
    /// More connections than this (all workers together) are answered 503
    /// and closed as they are accepted.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { http: http::Limits::default(), idle: Duration::from_secs(30), max_connections: 1024 }
    }
}

/// How long a connection the server closes is drained before it is closed
/// (a lingering close): the response goes out, then the write side is shut,
/// and what the client still sends is read and dropped until it closes or
/// this runs out, so that a close with unread bytes (a reset) does not
/// destroy the response before the client has read it.
pub const LINGER: Duration = Duration::from_secs(1);

/// How often a worker looks for idle connections and finished lingers.
const SWEEP: Duration = Duration::from_millis(100);

const LISTENER: Token = Token(usize::MAX);

struct Client<'s> {
    conn: Connection<'s, TcpStream>,
    inbuf: Vec<u8>,
    /// When the connection was accepted or its last response finished.
    since: Instant,
    /// Closing: drained until this deadline.
    closing: Option<Instant>,
    /// Counted in `Stats::open` (false for a refused connection).
    counted: bool,
}

/// What to do with a connection after serving it.
enum Next {
    Keep,
    /// Close now (the client closed, or the connection failed).
    Close,
    /// Close after draining (the server chose to close).
    Linger,
}

/// Everything a worker reads and counts.
pub struct Shared<'a> {
    pub files: &'a FileSet,
    pub sender: &'a Sender,
    pub stop: &'a AtomicBool,
    pub stats: &'a Stats,
    pub limits: Limits,
}

/// Start one worker per listener: worker `i` binds CPU `i` of the sender
/// and, if `cores[i]` is a core, pins itself to it (`cores` comes from
/// `crate::cores`, whose core `i` is the one `bind_worker(i, true)` picks).
pub fn spawn_workers<'scope, 'env>(
    s: &'scope Scope<'scope, 'env>,
    listeners: Vec<std::net::TcpListener>,
    shared: &'env Shared<'env>,
    cores: &[Option<core_affinity::CoreId>],
) -> Vec<ScopedJoinHandle<'scope, io::Result<()>>> {
    listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let pin = cores.get(i).copied().flatten().is_some();
            s.spawn(move || worker(i, l, shared, pin))
        })
        .collect()
}

/// A worker's buffers and counts, reused for every request.
struct Scratch {
    rbuf: Vec<u8>,
    head: Vec<u8>,
    sent: Sent,
    dates: DateCache,
}

/// A worker's connections, by token.
struct Clients<'s> {
    slots: Vec<Option<Client<'s>>>,
    free: Vec<usize>,
}

fn worker(cpu: usize, listener: std::net::TcpListener, sh: &Shared<'_>, pin: bool) -> io::Result<()> {
    // For the whole life of the thread: mappings are made and released on
    // this CPU's cache.
    let _cpu = sh.sender.bind_worker(cpu, pin).map_err(io::Error::from)?;
    // mio's registrations are edge-triggered: every read below goes on
    // until the socket is empty (a short read or EAGAIN), or the
    // connection is closed, so no readiness is left unreported.
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::from_std(listener);
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(128);
    let mut clients = Clients { slots: Vec::new(), free: Vec::new() };
    let mut s = Scratch {
        rbuf: vec![0u8; 16 << 10],
        head: Vec::with_capacity(512),
        sent: Sent::default(),
        dates: DateCache::default(),
    };
    let mut next_sweep = Instant::now() + SWEEP;
    while !sh.stop.load(Relaxed) {
        sh.stats.flush(&mut s.sent);
        match poll.poll(&mut events, Some(Duration::from_millis(50))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let reg = poll.registry();
        let now = Instant::now();
        let wall = SystemTime::now();
        for ev in events.iter() {
            if ev.token() == LISTENER {
                accept_all(&listener, reg, sh, &mut clients, &mut s, now, wall);
                continue;
            }
            let idx = ev.token().0;
            let next = match clients.slots.get_mut(idx).and_then(Option::as_mut) {
                Some(c) if c.closing.is_some() => {
                    if drain(c, &mut s.rbuf) {
                        Next::Close
                    } else {
                        Next::Keep
                    }
                }
                Some(c) => serve_client(c, sh, &mut s, now, wall),
                None => continue,
            };
            clients.after(idx, next, reg, sh, &mut s.rbuf, now);
        }
        if now >= next_sweep {
            next_sweep = now + SWEEP;
            clients.sweep(reg, sh, &mut s, now, wall);
        }
    }
    sh.stats.flush(&mut s.sent);
    for idx in 0..clients.slots.len() {
        clients.close(idx, poll.registry(), sh);
    }
    Ok(())
}

impl<'s> Clients<'s> {
    fn add(&mut self, c: Client<'s>, reg: &Registry) -> Option<usize> {
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let mut c = c;
        if reg.register(c.conn.get_mut(), Token(idx), Interest::READABLE).is_err() {
            self.free.push(idx);
            return None;
        }
        self.slots[idx] = Some(c);
        Some(idx)
    }

    fn close(&mut self, idx: usize, reg: &Registry, sh: &Shared<'_>) {
        if let Some(mut c) = self.slots.get_mut(idx).and_then(Option::take) {
            let _ = reg.deregister(c.conn.get_mut());
            sh.stats.closed(&c.conn);
            if c.counted {
                sh.stats.open.fetch_sub(1, Relaxed);
            }
            self.free.push(idx);
        }
    }

    /// Start the lingering close of `idx`, or close it now if the client
    /// has already closed its side.
    fn linger(&mut self, idx: usize, reg: &Registry, sh: &Shared<'_>, rbuf: &mut [u8], now: Instant) {
        let Some(c) = self.slots.get_mut(idx).and_then(Option::as_mut) else { return };
        c.inbuf = Vec::new();
        c.closing = Some(now + LINGER);
        // Edge-triggered: what had arrived was reported already, so read now.
        if c.conn.get_ref().shutdown(Shutdown::Write).is_err() || drain(c, rbuf) {
            self.close(idx, reg, sh);
        }
    }

    fn after(&mut self, idx: usize, next: Next, reg: &Registry, sh: &Shared<'_>, rbuf: &mut [u8], now: Instant) {
        match next {
            Next::Keep => {}
            Next::Close => self.close(idx, reg, sh),
            Next::Linger => self.linger(idx, reg, sh, rbuf, now),
        }
    }

    /// Close the connections idle too long (408 if part of a request
    /// arrived) and those whose linger ran out.
    fn sweep(&mut self, reg: &Registry, sh: &Shared<'_>, s: &mut Scratch, now: Instant, wall: SystemTime) {
        for idx in 0..self.slots.len() {
            let Some(c) = self.slots[idx].as_mut() else { continue };
            let next = match c.closing {
                Some(deadline) if now >= deadline => Next::Close,
                Some(_) => Next::Keep,
                None if now.saturating_duration_since(c.since) < sh.limits.idle => Next::Keep,
                None if c.inbuf.is_empty() => Next::Close,
                None => {
                    sh.stats.bad_requests.fetch_add(1, Relaxed);
                    http::write_error(&mut s.head, Status::RequestTimeout, s.dates.at(wall), false);
                    let _ = c.conn.send_bytes(&s.head);
                    Next::Linger
                }
            };
            self.after(idx, next, reg, sh, &mut s.rbuf, now);
        }
    }
}

fn accept_all<'s>(
    listener: &TcpListener,
    reg: &Registry,
    sh: &Shared<'s>,
    clients: &mut Clients<'s>,
    s: &mut Scratch,
    now: Instant,
    wall: SystemTime,
) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors, say: the connections still queued
                // are taken at the next one's arrival.
                eprintln!("accept: {e}");
                return;
            }
        };
        if stream.set_nodelay(true).is_err() {
            continue;
        }
        let counted = sh
            .stats
            .open
            .fetch_update(Relaxed, Relaxed, |n| (n < sh.limits.max_connections as u64).then_some(n + 1))
            .is_ok();
        let conn = match sh.sender.connection(stream) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("connection setup ({}): {e}", sh.sender.mode());
                sh.stats.send_errors.fetch_add(1, Relaxed);
                if counted {
                    sh.stats.open.fetch_sub(1, Relaxed);
                }
                continue;
            }
        };
        let c = Client { conn, inbuf: Vec::new(), since: now, closing: None, counted };
        let Some(idx) = clients.add(c, reg) else {
            if counted {
                sh.stats.open.fetch_sub(1, Relaxed);
            }
            continue;
        };
        if counted {
            sh.stats.connections.fetch_add(1, Relaxed);
        } else {
            sh.stats.refused.fetch_add(1, Relaxed);
            if let Some(c) = clients.slots[idx].as_mut() {
                http::write_error(&mut s.head, Status::ServiceUnavailable, s.dates.at(wall), false);
                let _ = c.conn.send_bytes(&s.head);
            }
            clients.linger(idx, reg, sh, &mut s.rbuf, now);
        }
    }
}

/// Read what a closing connection's client sent and drop it. Returns
/// whether to close it now (the client closed, or the connection failed).
fn drain(c: &mut Client<'_>, rbuf: &mut [u8]) -> bool {
    loop {
        match c.conn.get_mut().read(rbuf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// Read what the client sent and answer every complete request.
fn serve_client(c: &mut Client<'_>, sh: &Shared<'_>, s: &mut Scratch, now: Instant, wall: SystemTime) -> Next {
    let mut eof = false;
    let most = sh.limits.http.max_head + s.rbuf.len();
    loop {
        match c.conn.get_mut().read(&mut s.rbuf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                c.inbuf.extend_from_slice(&s.rbuf[..n]);
                // A short read took everything queued: the next read would
                // only say EAGAIN (one system call per request saved; what
                // arrives later is a new edge, reported by the next poll).
                // Beyond `most` the head is too large whatever follows.
                if n < s.rbuf.len() || c.inbuf.len() > most {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Next::Close,
        }
    }
    loop {
        let (n, r) = match http::parse(&c.inbuf, &sh.limits.http) {
            Parsed::Partial if eof => return Next::Close,
            Parsed::Partial => return Next::Keep,
            Parsed::Error(status) => {
                sh.stats.bad_requests.fetch_add(1, Relaxed);
                http::write_error(&mut s.head, status, s.dates.at(wall), false);
                let _ = c.conn.send_bytes(&s.head);
                return Next::Linger;
            }
            Parsed::Complete(n, req) => (n, respond(&req, &mut c.conn, sh, s, wall)),
        };
        c.inbuf.drain(..n);
        c.since = now;
        match r {
            Err(()) => return Next::Close,
            Ok(false) => return Next::Linger,
            Ok(true) if eof && c.inbuf.is_empty() => return Next::Close,
            Ok(true) => {}
        }
    }
}

/// Answer one request. Returns whether the connection goes on, or `Err`
/// if sending failed.
fn respond(
    req: &Request<'_>,
    conn: &mut Connection<'_, TcpStream>,
    sh: &Shared<'_>,
    s: &mut Scratch,
    wall: SystemTime,
) -> Result<bool, ()> {
    let keep = req.keep_alive;
    let date = s.dates.at(wall);
    let entry = match &req.target {
        Err(status) => {
            sh.stats.bad_requests.fetch_add(1, Relaxed);
            let keep = keep && status.keeps_connection();
            http::write_error(&mut s.head, *status, date, keep);
            return conn.send_bytes(&s.head).map(|_| keep).map_err(drop);
        }
        Ok(t) => match http::route(t, |k| sh.files.get(k)) {
            Route::File(e) => e,
            Route::Redirect(location) => {
                http::write_redirect(&mut s.head, &location, date, keep);
                return conn.send_bytes(&s.head).map(|_| keep).map_err(drop);
            }
            Route::NotFound => {
                sh.stats.bad_requests.fetch_add(1, Relaxed);
                http::write_error(&mut s.head, Status::NotFound, date, keep);
                return conn.send_bytes(&s.head).map(|_| keep).map_err(drop);
            }
        },
    };
    let a = match sh.files.answer(entry, req.get, &req.cond) {
        Ok(a) => a,
        // The file is gone (404), or its pages cannot be had now (503, the
        // connection kept: the request was well framed).
        Err(status) => {
            sh.stats.bad_requests.fetch_add(1, Relaxed);
            http::write_error(&mut s.head, status, date, keep);
            return conn.send_bytes(&s.head).map(|_| keep).map_err(drop);
        }
    };
    http::write_head(&mut s.head, &a.reply, &a.meta, date, keep);
    let r = match &a.body {
        Some((file, range)) => conn.send(file, range.clone(), &s.head),
        None => conn.send_bytes(&s.head),
    };
    match r {
        Ok(st) => {
            s.sent.add(st);
            Ok(keep)
        }
        Err(e) => {
            if sh.stats.send_errors.fetch_add(1, Relaxed) == 0 {
                eprintln!("first send error ({}): {e}", sh.sender.mode());
            }
            Err(())
        }
    }
}

// === serve ===

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Relaxed);
}

/// `parallel_sendfile serve`: until SIGINT or SIGTERM (or `--duration`).
pub fn serve(args: &ServeArgs) -> Result<(), String> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    serve_until(args, &STOP, |_| {})
}

/// Serve `args.dir` until `stop` is set (or `--duration` passes); `ready`
/// gets the port once the listeners are bound.
pub fn serve_until(args: &ServeArgs, stop: &AtomicBool, ready: impl FnOnce(u16)) -> Result<(), String> {
    if args.runtime == Runtime::Tokio {
        crate::modes::tokio_runs(args.mode)?;
    }
    let t = Instant::now();
    let files = match args.mem_mib {
        Some(mib) => FileSet::open_dir(&args.dir, mib)?,
        None => FileSet::load_dir(&args.dir, args.max_mib << 20, args.max_run)?,
    };
    let cores = crate::cores(args.cpus);
    let opts = SendOptions::default()
        .stall_timeout(Some(Duration::from_secs(10)))
        .close_timeout(Duration::from_millis(200))
        .window_slots(crate::cache_slots(args.cache_mib)?)
        .max_run(args.map_run.max(1))
        .granule(args.granule)
        .reclaim(args.reclaim)
        .cpus(Some(cores.len()));
    let sender = Sender::new(args.mode, &files.mem, opts).map_err(|e| format!("mode {}: {e}", args.mode))?;
    let limits = args.limits()?;
    let (port, listeners) =
        bind_listeners(args.port, cores.len()).map_err(|e| format!("bind 127.0.0.1:{}: {e}", args.port))?;
    let how = match &files.cache {
        Some(c) => {
            format!("on disk, through a page cache of {} MiB, listed", (c.budget() * files.mem.frame_size()) >> 20)
        }
        None => "loaded".to_string(),
    };
    println!(
        "serving {} files ({:.1} MiB, {how} in {:.2} s) from {} on http://127.0.0.1:{port}/ with mode {}, {} workers; \
         limits: {} header bytes, {} header fields, {:.1} s idle, {} connections",
        files.files.len(),
        files.total_bytes() as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64(),
        args.dir.display(),
        ServerMode { runtime: args.runtime, mode: args.mode },
        cores.len(),
        limits.http.max_head,
        limits.http.max_headers,
        limits.idle.as_secs_f64(),
        limits.max_connections,
    );
    let stats = Stats::default();
    let shared = Shared { files: &files, sender: &sender, stop, stats: &stats, limits };
    let start = Instant::now();
    let result = thread::scope(|s| {
        let workers = match args.runtime {
            Runtime::Threads => spawn_workers(s, listeners, &shared, &cores),
            Runtime::Tokio => vec![s.spawn(|| crate::tokio_server::run(&shared, listeners, &cores))],
        };
        ready(port);
        while !stop.load(Relaxed) && args.duration.is_none_or(|d| start.elapsed() < d) {
            if workers.iter().any(|w| w.is_finished()) {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Relaxed);
        let mut r = Ok(());
        for w in workers {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => r = Err(format!("worker: {e}")),
                Err(_) => r = Err("a worker panicked".to_string()),
            }
        }
        r
    });
    let secs = start.elapsed().as_secs_f64();
    let reqs = stats.requests.load(Relaxed);
    println!(
        "served {reqs} requests ({:.1} MB, {:.0} req/s) on {} connections in {secs:.1} s; {} bad requests, \
         {} refused connections, {} send errors{}",
        stats.bytes.load(Relaxed) as f64 / 1e6,
        reqs as f64 / secs.max(1e-9),
        stats.connections.load(Relaxed),
        stats.bad_requests.load(Relaxed),
        stats.refused.load(Relaxed),
        stats.send_errors.load(Relaxed),
        sender.mmu_stats().map(|m| format!("; window: {m}")).unwrap_or_default()
    );
    if let Some(c) = sender.cache_stats() {
        println!("mapping cache: {} lookups, {:.2}% hits", c.lookups, 100.0 * c.hit_rate());
    }
    if let Some(c) = files.cache_stats() {
        println!(
            "page cache: {} of {} frames resident, {} hits, {} misses ({} reads, {:.1} MB), {} evictions, \
             {} over budget, {} stale pages dropped",
            c.resident,
            c.budget,
            c.hits,
            c.misses,
            c.reads,
            c.read_bytes as f64 / 1e6,
            c.evictions,
            c.over_budget,
            c.stale_drops
        );
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream;

    fn roundtrip(port: u16, req: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(req).expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("read");
        out
    }

    #[test]
    fn serves_files_and_errors_in_every_mode() {
        let set = FileSet::generate(5000, 70_000, 200_000, 4, 3, false).expect("files");
        let e = &set.files[0];
        for &mode in lwbuf::sendfile::Mode::ALL {
            let opts = SendOptions::default().cpus(Some(2)).window_slots(512);
            let sender = Sender::new(mode, &set.mem, opts).expect("sender");
            let (port, listeners) = bind_listeners(0, 2).expect("bind");
            let stop = AtomicBool::new(false);
            let stats = Stats::default();
            let shared = Shared { files: &set, sender: &sender, stop: &stop, stats: &stats, limits: Limits::default() };
            thread::scope(|s| {
                let workers = spawn_workers(s, listeners, &shared, &[None, None]);
                // Two GETs and a HEAD on one keep-alive connection, the last one closing.
                let req = format!(
                    "GET /{0} HTTP/1.1\r\nHost: x\r\n\r\nHEAD /{0} HTTP/1.1\r\nHost: x\r\n\r\n\
                     GET /{0} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    e.name
                );
                let out = roundtrip(port, req.as_bytes());
                let mut rest = &out[..];
                for get in [true, false, true] {
                    let mut headers = [httparse::EMPTY_HEADER; 16];
                    let mut resp = httparse::Response::new(&mut headers);
                    let n = match resp.parse(rest) {
                        Ok(httparse::Status::Complete(n)) => n,
                        other => panic!("{mode}: bad response {other:?}"),
                    };
                    assert_eq!(resp.code, Some(200), "{mode}");
                    let len = e.len() as usize;
                    let body_len = if get { len } else { 0 };
                    let body = &rest[n..n + body_len];
                    assert_eq!(lwbuf::sendfile::Pattern::new(e.seed.expect("seed")).check(0, body), None, "{mode}");
                    rest = &rest[n + body_len..];
                }
                assert!(rest.is_empty(), "{mode}: nothing after the last response");
                for (req, code) in [
                    (&b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..], "404"),
                    (b"GET /../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
                    (b"GET /%2e%2e/x HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
                    (b"BREW /pot HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "405"),
                    (b"\x01\x02garbage\r\n\r\n", "400"),
                ] {
                    let out = roundtrip(port, req);
                    assert!(
                        out.starts_with(format!("HTTP/1.1 {code}").as_bytes()),
                        "{mode}: {:?}",
                        String::from_utf8_lossy(&out)
                    );
                }
                stop.store(true, Relaxed);
                for w in workers {
                    w.join().expect("worker").expect("worker result");
                }
            });
            assert_eq!(stats.send_errors.load(Relaxed), 0, "{mode}");
            if let Some(l) = sender.lwbuf() {
                assert_eq!(l.lwbufs().check_consistency(), Ok(0), "{mode}: no lwbuf in use");
                let t = l.lwbufs().stats().total;
                assert_eq!(t.decrefs_sent, 0, "{mode}: released on the CPU that mapped: {t}");
            }
            if let Some(p) = sender.sfbuf() {
                assert_eq!(p.pool().stats().used, 0, "{mode}");
            }
            assert!(
                set.files.iter().all(|e| e.mem_file().is_some_and(|f| f.pages().iter().all(|p| p.hold_count() == 1))),
                "{mode}: holds"
            );
        }
    }
}
