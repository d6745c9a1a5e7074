//! The server: one worker thread per CPU, pinned, each with its own
//! `SO_REUSEPORT` listener on 127.0.0.1 and its own epoll loop. Worker `i`
//! is CPU `i` of the sender's lwbuf caches for its whole life
//! (`Sender::bind_worker`). A request is answered in place: the worker sends
//! the whole response (the library polls for `POLLOUT` when the socket is
//! full) before it serves the next.

use std::io::{self, Read};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use lwbuf::sendfile::{Connection, SendOptions, SendStats, Sender};
use nix::sys::socket::{listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType};

use crate::fileset::FileSet;
use crate::http::{self, Parsed, Status};
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

    fn closed(&self, c: &Connection<'_, std::net::TcpStream>) {
        let z = c.zerocopy_stats();
        self.zc_sends.fetch_add(z.sends, Relaxed);
        self.zc_completed.fetch_add(z.completed, Relaxed);
        self.zc_copied.fetch_add(z.copied, Relaxed);
    }
}

// === epoll ===

struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: i32, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid event for the call; `fd` is an open
        // descriptor owned by the caller.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wait up to `ms`; a signal counts as a timeout.
    fn wait(&self, events: &mut [libc::epoll_event], ms: i32) -> io::Result<usize> {
        // SAFETY: the kernel writes at most `events.len()` entries into the slice.
        let r = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
        }
        Ok(r as usize)
    }
}

// === listeners ===

fn listener(port: u16) -> io::Result<TcpListener> {
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
    let l = TcpListener::from(fd);
    l.set_nonblocking(true)?;
    Ok(l)
}

/// `n` listeners sharing one port on 127.0.0.1 (`SO_REUSEPORT`: the kernel
/// spreads connections over them). Port 0 picks a free port.
pub fn bind_listeners(port: u16, n: usize) -> io::Result<(u16, Vec<TcpListener>)> {
    let first = listener(port)?;
    let port = first.local_addr()?.port();
    let mut all = vec![first];
    for _ in 1..n {
        all.push(listener(port)?);
    }
    Ok((port, all))
}

// === workers ===

const LISTENER: u64 = u64::MAX;

struct Client<'s> {
    conn: Connection<'s, std::net::TcpStream>,
    inbuf: Vec<u8>,
}

/// Everything a worker reads and counts.
pub struct Shared<'a> {
    pub files: &'a FileSet,
    pub sender: &'a Sender,
    pub stop: &'a AtomicBool,
    pub stats: &'a Stats,
}

/// Start one worker per listener: worker `i` binds CPU `i` of the sender
/// and, if `cores[i]` is a core, pins itself to it (`cores` comes from
/// `crate::cores`, whose core `i` is the one `bind_worker(i, true)` picks).
pub fn spawn_workers<'scope, 'env>(
    s: &'scope Scope<'scope, 'env>,
    listeners: Vec<TcpListener>,
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

fn worker(cpu: usize, listener: TcpListener, sh: &Shared<'_>, pin: bool) -> io::Result<()> {
    // For the whole life of the thread: mappings are made and released on
    // this CPU's cache.
    let _cpu = sh.sender.bind_worker(cpu, pin).map_err(io::Error::from)?;
    let ep = Epoll::new()?;
    ep.ctl(libc::EPOLL_CTL_ADD, listener.as_raw_fd(), LISTENER, libc::EPOLLIN as u32)?;
    let mut slots: Vec<Option<Client<'_>>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 128];
    let mut rbuf = vec![0u8; 16 << 10];
    let mut head = Vec::with_capacity(256);
    let mut sent = Sent::default();
    while !sh.stop.load(Relaxed) {
        sh.stats.flush(&mut sent);
        let n = ep.wait(&mut events, 50)?;
        for ev in events.iter().take(n) {
            let token = ev.u64;
            if token == LISTENER {
                accept_all(&listener, &ep, sh, &mut slots, &mut free);
                continue;
            }
            let idx = token as usize;
            let close = match slots.get_mut(idx).and_then(Option::as_mut) {
                Some(c) => serve_client(c, sh, &mut rbuf, &mut head, &mut sent),
                None => false,
            };
            if close {
                if let Some(c) = slots[idx].take() {
                    let _ = ep.ctl(libc::EPOLL_CTL_DEL, c.conn.get_ref().as_raw_fd(), 0, 0);
                    sh.stats.closed(&c.conn);
                    free.push(idx);
                }
            }
        }
    }
    sh.stats.flush(&mut sent);
    for c in slots.into_iter().flatten() {
        sh.stats.closed(&c.conn);
    }
    Ok(())
}

fn accept_all<'s>(
    listener: &TcpListener,
    ep: &Epoll,
    sh: &Shared<'s>,
    slots: &mut Vec<Option<Client<'s>>>,
    free: &mut Vec<usize>,
) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("accept: {e}");
                return;
            }
        };
        if stream.set_nonblocking(true).is_err() || stream.set_nodelay(true).is_err() {
            continue;
        }
        let conn = match sh.sender.connection(stream) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("connection setup ({}): {e}", sh.sender.mode());
                sh.stats.send_errors.fetch_add(1, Relaxed);
                continue;
            }
        };
        let fd = conn.get_ref().as_raw_fd();
        let idx = free.pop().unwrap_or_else(|| {
            slots.push(None);
            slots.len() - 1
        });
        if ep.ctl(libc::EPOLL_CTL_ADD, fd, idx as u64, (libc::EPOLLIN | libc::EPOLLRDHUP) as u32).is_err() {
            free.push(idx);
            continue;
        }
        slots[idx] = Some(Client { conn, inbuf: Vec::new() });
        sh.stats.connections.fetch_add(1, Relaxed);
    }
}

/// Read what the client sent and answer every complete request. Returns
/// whether to close the connection.
fn serve_client(c: &mut Client<'_>, sh: &Shared<'_>, rbuf: &mut [u8], head: &mut Vec<u8>, sent: &mut Sent) -> bool {
    let mut eof = false;
    loop {
        match c.conn.get_mut().read(rbuf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                c.inbuf.extend_from_slice(&rbuf[..n]);
                // A short read took everything queued: the next read would
                // only say EAGAIN (one system call per request saved; epoll
                // is level-triggered, so anything arriving later is seen).
                if n < rbuf.len() || c.inbuf.len() > 2 * http::MAX_HEAD {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
    loop {
        match http::parse(&c.inbuf) {
            Parsed::Partial => return eof,
            Parsed::Error(status) => {
                sh.stats.bad_requests.fetch_add(1, Relaxed);
                let _ = c.conn.send_bytes(&http::error_response(status, false));
                return true;
            }
            Parsed::Complete(n, req) => {
                let keep = req.keep_alive;
                let ok = match req.target {
                    Err(status) => {
                        sh.stats.bad_requests.fetch_add(1, Relaxed);
                        let keep = keep && status != Status::BadRequest;
                        c.conn.send_bytes(&http::error_response(status, keep)).is_ok() && keep
                    }
                    Ok(key) => match sh.files.get(&key) {
                        None => {
                            sh.stats.bad_requests.fetch_add(1, Relaxed);
                            c.conn.send_bytes(&http::error_response(Status::NotFound, keep)).is_ok()
                        }
                        Some(entry) => {
                            let len = entry.file.len();
                            http::ok_head(head, len, keep);
                            let r =
                                if req.get { c.conn.send(&entry.file, 0..len, head) } else { c.conn.send_bytes(head) };
                            match r {
                                Ok(st) => {
                                    sent.add(st);
                                    true
                                }
                                Err(_) => {
                                    sh.stats.send_errors.fetch_add(1, Relaxed);
                                    false
                                }
                            }
                        }
                    },
                };
                c.inbuf.drain(..n);
                if !ok || !keep {
                    return true;
                }
            }
        }
    }
}

// === serve ===

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Relaxed);
}

/// `parallel_sendfile serve`.
pub fn serve(args: &ServeArgs) -> Result<(), String> {
    let t = Instant::now();
    let files = FileSet::load_dir(&args.dir, args.max_mib << 20, args.max_run)?;
    let cores = crate::cores(args.cpus);
    let opts = SendOptions::default()
        .stall_timeout(Some(Duration::from_secs(10)))
        .close_timeout(Duration::from_millis(200))
        .window_slots(crate::cache_slots(args.cache_mib)?)
        .max_run(args.map_run.max(1))
        .cpus(Some(cores.len()));
    let sender = Sender::new(args.mode, &files.mem, opts).map_err(|e| format!("mode {}: {e}", args.mode))?;
    let (port, listeners) =
        bind_listeners(args.port, cores.len()).map_err(|e| format!("bind 127.0.0.1:{}: {e}", args.port))?;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    println!(
        "serving {} files ({:.1} MiB, loaded in {:.2} s) from {} on http://127.0.0.1:{port}/ with mode {}, {} workers",
        files.files.len(),
        files.total_bytes() as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64(),
        args.dir.display(),
        args.mode,
        cores.len()
    );
    let stats = Stats::default();
    let shared = Shared { files: &files, sender: &sender, stop: &STOP, stats: &stats };
    let start = Instant::now();
    let result = thread::scope(|s| {
        let workers = spawn_workers(s, listeners, &shared, &cores);
        while !STOP.load(Relaxed) && args.duration.is_none_or(|d| start.elapsed() < d) {
            if workers.iter().any(|w| w.is_finished()) {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        STOP.store(true, Relaxed);
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
        "served {reqs} requests ({:.1} MB, {:.0} req/s) on {} connections in {secs:.1} s; {} bad requests, {} send errors{}",
        stats.bytes.load(Relaxed) as f64 / 1e6,
        reqs as f64 / secs.max(1e-9),
        stats.connections.load(Relaxed),
        stats.bad_requests.load(Relaxed),
        stats.send_errors.load(Relaxed),
        sender.mmu_stats().map(|m| format!("; window: {m}")).unwrap_or_default()
    );
    if let Some(c) = sender.cache_stats() {
        println!("mapping cache: {} lookups, {:.2}% hits", c.lookups, 100.0 * c.hit_rate());
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
        let set = FileSet::generate(5000, 70_000, 200_000, 4, 3).expect("files");
        let e = &set.files[0];
        for &mode in lwbuf::sendfile::Mode::ALL {
            let opts = SendOptions::default().cpus(Some(2)).window_slots(512);
            let sender = Sender::new(mode, &set.mem, opts).expect("sender");
            let (port, listeners) = bind_listeners(0, 2).expect("bind");
            let stop = AtomicBool::new(false);
            let stats = Stats::default();
            let shared = Shared { files: &set, sender: &sender, stop: &stop, stats: &stats };
            thread::scope(|s| {
                let workers = spawn_workers(s, listeners, &shared, &[None, None]);
                // Two GETs and a HEAD on one keep-alive connection, the last one closing.
                let req = format!(
                    "GET /{0} HTTP/1.1\r\nHost: x\r\n\r\nHEAD /{0} HTTP/1.1\r\n\r\nGET /{0} HTTP/1.1\r\nConnection: close\r\n\r\n",
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
                    let len = e.file.len() as usize;
                    let body_len = if get { len } else { 0 };
                    let body = &rest[n..n + body_len];
                    assert_eq!(lwbuf::sendfile::Pattern::new(e.seed.expect("seed")).check(0, body), None, "{mode}");
                    rest = &rest[n + body_len..];
                }
                assert!(rest.is_empty(), "{mode}: nothing after the last response");
                for (req, code) in [
                    (&b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n"[..], "404"),
                    (b"GET /../etc/passwd HTTP/1.1\r\n\r\n", "400"),
                    (b"GET /%2e%2e/x HTTP/1.1\r\n\r\n", "400"),
                    (b"BREW /pot HTTP/1.1\r\nConnection: close\r\n\r\n", "405"),
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
            assert!(set.files.iter().all(|e| e.file.pages().iter().all(|p| p.hold_count() == 1)), "{mode}: holds");
        }
    }
}
