//! The load generator: each client thread drives its share of keep-alive
//! connections with `poll`, one request in flight per connection (GET of a
//! random file of the working set), parses responses with httparse and
//! checks body bytes against the file's pattern.
//!
//! Verification (the clients share the cores with the server, so it is not
//! free): every response's status, `Content-Length` and framing are checked
//! (a byte too many or too few breaks the next response); every byte of the
//! first response of each connection and of a random one in
//! `--verify-every` others is checked. The other responses' bodies are
//! dropped by the kernel without being copied (`recv(MSG_TRUNC)`), or, with
//! `--spot-check`, read and checked at the first word of every page (each
//! 4 KiB of file offset), so that a page sent from the wrong frame or a
//! stale mapping is caught on every response, and a wrong byte inside a
//! page on the sampled ones.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use lwbuf::sendfile::Pattern;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Spot checks of unsampled responses: one word per this many bytes.
const SPOT_EVERY: u64 = 4096;

/// One file a client may ask for.
pub struct Target {
    pub path: String,
    pub len: u64,
    /// Verify the body against this pattern.
    pub seed: Option<u64>,
}

impl Progress {
    /// Move these counts into `to`.
    fn flush_into(&self, to: &Progress) {
        for (a, b) in [(&self.bytes, &to.bytes), (&self.requests, &to.requests), (&self.errors, &to.errors)] {
            let n = a.swap(0, Relaxed);
            if n > 0 {
                b.fetch_add(n, Relaxed);
            }
        }
    }
}

/// Counters all client threads bump as they go (for the progress line).
#[derive(Default)]
pub struct Progress {
    pub bytes: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
}

/// When the measured seconds are: set once by the benchmark when the
/// warm-up is over, read by every client thread.
pub struct Clock {
    start: Instant,
    /// Nanoseconds after `start`; `u64::MAX` until set.
    from: AtomicU64,
    until: AtomicU64,
}

impl Clock {
    pub fn new(start: Instant) -> Clock {
        Clock { start, from: AtomicU64::new(u64::MAX), until: AtomicU64::new(u64::MAX) }
    }

    /// Measure from `at` for `d`.
    pub fn begin(&self, at: Instant, d: Duration) {
        let from = at.saturating_duration_since(self.start).as_nanos() as u64;
        // `until` first: a reader that sees `from` sees the end too.
        self.until.store(from + d.as_nanos() as u64, Relaxed);
        self.from.store(from, std::sync::atomic::Ordering::Release);
    }

    fn get(&self, a: &AtomicU64) -> Option<Instant> {
        match a.load(std::sync::atomic::Ordering::Acquire) {
            u64::MAX => None,
            ns => Some(self.start + Duration::from_nanos(ns)),
        }
    }

    /// The start of the measured seconds, once set.
    pub fn measure_from(&self) -> Option<Instant> {
        self.get(&self.from)
    }

    /// The end of the measured seconds (no new request after it), once set.
    pub fn deadline(&self) -> Option<Instant> {
        self.measure_from().and_then(|_| self.get(&self.until))
    }

    /// Whether `t` is inside the measured seconds.
    fn measuring(&self, t: Instant) -> bool {
        match (self.measure_from(), self.deadline()) {
            (Some(a), Some(b)) => t >= a && t < b,
            _ => false,
        }
    }
}

/// What one client thread does.
pub struct Plan<'a> {
    pub addr: SocketAddr,
    pub targets: &'a [Target],
    pub connections: usize,
    /// Responses sent before the measured seconds are warm-up; no new
    /// request after them.
    pub clock: &'a Clock,
    pub seed: u64,
    /// Check every byte of one response in this many (at least 1).
    pub verify_every: u64,
    /// Of the other responses, check the first word of every page (which
    /// needs their bytes); otherwise let the kernel drop their bodies
    /// unread (`recv(MSG_TRUNC)`), counting them.
    pub spot_check: bool,
}

/// What one client thread measured (inside the measurement window).
#[derive(Default)]
pub struct Outcome {
    pub latencies_ns: Vec<u64>,
    pub bytes: u64,
    pub requests: u64,
    pub errors: u64,
    pub verify_failures: u64,
    /// Responses whose every byte was checked.
    pub fully_verified: u64,
    pub first_error: Option<String>,
}

enum Phase {
    Idle,
    Writing(usize),
    Head,
    Body { left: u64, off: u64 },
    Dead,
}

struct Conn {
    stream: TcpStream,
    phase: Phase,
    req: Vec<u8>,
    target: usize,
    sent_at: Instant,
    head: Vec<u8>,
    /// Check every byte of the response in flight (else spot checks).
    full_check: bool,
    /// Responses completed on this connection.
    done: u64,
}

/// How long to let responses in flight finish after the deadline.
const GRACE: Duration = Duration::from_secs(3);

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

pub fn run(plan: &Plan<'_>, shared: &Progress) -> Outcome {
    // Counted here and added to the shared counters once per turn of the
    // loop: bumping those on every read would bounce their cache line
    // between the client threads' CPUs.
    let progress = &Progress::default();
    let mut out = Outcome::default();
    let mut rng = SmallRng::seed_from_u64(plan.seed);
    let mut rbuf = vec![0u8; 256 << 10];
    let mut conns: Vec<Conn> = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        match connect(plan.addr) {
            Ok(stream) => conns.push(Conn {
                stream,
                phase: Phase::Idle,
                req: Vec::with_capacity(64),
                target: 0,
                sent_at: Instant::now(),
                head: Vec::with_capacity(512),
                full_check: true,
                done: 0,
            }),
            Err(e) => fail(&mut out, progress, format!("connect: {e}"), false),
        }
    }
    if plan.targets.is_empty() {
        progress.flush_into(shared);
        return out;
    }
    let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(conns.len());
    let mut map: Vec<usize> = Vec::with_capacity(conns.len());
    loop {
        progress.flush_into(shared);
        let now = Instant::now();
        let deadline = plan.clock.deadline();
        let stopping = deadline.is_some_and(|d| now >= d);
        if deadline.is_some_and(|d| now >= d + GRACE) {
            break;
        }
        for c in conns.iter_mut() {
            if stopping {
                continue;
            }
            if matches!(c.phase, Phase::Dead) {
                match connect(plan.addr) {
                    Ok(s) => {
                        c.stream = s;
                        c.phase = Phase::Idle;
                        c.done = 0;
                    }
                    Err(e) => {
                        fail(&mut out, progress, format!("reconnect: {e}"), false);
                        continue;
                    }
                }
            }
            if matches!(c.phase, Phase::Idle) {
                let t = rng.gen_range(0..plan.targets.len());
                c.full_check = c.done == 0 || plan.verify_every <= 1 || rng.gen_range(0..plan.verify_every) == 0;
                if let Err(e) = start(c, t, &plan.targets[t]) {
                    fail(&mut out, progress, format!("send request: {e}"), false);
                    c.phase = Phase::Dead;
                }
            }
        }
        pfds.clear();
        map.clear();
        for (i, c) in conns.iter().enumerate() {
            let events = match c.phase {
                Phase::Writing(_) => libc::POLLOUT,
                Phase::Head | Phase::Body { .. } => libc::POLLIN,
                Phase::Idle | Phase::Dead => continue,
            };
            pfds.push(libc::pollfd { fd: c.stream.as_raw_fd(), events, revents: 0 });
            map.push(i);
        }
        if pfds.is_empty() {
            if stopping {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        // SAFETY: `pfds` is a live array of `pfds.len()` pollfds of open sockets.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 50) };
        if r <= 0 {
            continue;
        }
        for (k, pfd) in pfds.iter().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            let c = &mut conns[map[k]];
            if let Err((msg, verify)) = step(c, plan, &mut rbuf, &mut out, progress, stopping) {
                fail(&mut out, progress, msg, verify);
                c.phase = Phase::Dead;
            }
        }
    }
    progress.flush_into(shared);
    out
}

fn fail(out: &mut Outcome, progress: &Progress, msg: String, verify: bool) {
    out.errors += 1;
    if verify {
        out.verify_failures += 1;
    }
    progress.errors.fetch_add(1, Relaxed);
    if out.first_error.is_none() {
        out.first_error = Some(msg);
    }
}

fn start(c: &mut Conn, t: usize, target: &Target) -> io::Result<()> {
    c.req.clear();
    write!(c.req, "GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", target.path)?;
    c.target = t;
    c.sent_at = Instant::now();
    c.phase = Phase::Writing(0);
    write_more(c)
}

fn write_more(c: &mut Conn) -> io::Result<()> {
    while let Phase::Writing(off) = c.phase {
        match c.stream.write(&c.req[off..]) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) if off + n == c.req.len() => c.phase = Phase::Head,
            Ok(n) => c.phase = Phase::Writing(off + n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

type StepError = (String, bool);

/// Make progress on one ready connection.
fn step(
    c: &mut Conn,
    plan: &Plan<'_>,
    rbuf: &mut [u8],
    out: &mut Outcome,
    progress: &Progress,
    stopping: bool,
) -> Result<(), StepError> {
    if let Phase::Writing(_) = c.phase {
        return write_more(c).map_err(|e| (format!("write: {e}"), false));
    }
    for _ in 0..8 {
        // The body of a response that is not checked: dropped unread.
        let skip = match c.phase {
            Phase::Body { left, .. } if !c.full_check && !plan.spot_check => Some(left),
            _ => None,
        };
        let r = match skip {
            Some(left) => discard(&c.stream, rbuf, left),
            None => c.stream.read(rbuf),
        };
        let n = match r {
            Ok(0) => return Err(("server closed the connection".into(), false)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((format!("read: {e}"), false)),
        };
        let now = Instant::now();
        if plan.clock.measuring(now) {
            out.bytes += n as u64;
        }
        progress.bytes.fetch_add(n as u64, Relaxed);
        let done = match skip {
            Some(_) => on_dropped(c, plan, n as u64, now, out, progress),
            None => on_bytes(c, plan, &rbuf[..n], now, out, progress)?,
        };
        if done {
            // The response is complete: the connection is idle, and the
            // next request goes out on the next turn of the loop.
            c.phase = if stopping { Phase::Dead } else { Phase::Idle };
            return Ok(());
        }
    }
    Ok(())
}

/// Consume received bytes; returns whether the response is complete.
fn on_bytes(
    c: &mut Conn,
    plan: &Plan<'_>,
    data: &[u8],
    now: Instant,
    out: &mut Outcome,
    progress: &Progress,
) -> Result<bool, StepError> {
    let target = &plan.targets[c.target];
    let mut body: &[u8] = data;
    let spill;
    if let Phase::Head = c.phase {
        // Parse straight from what was read when the head is all in it (the
        // usual case), so the body bytes are not copied.
        let from_data = c.head.is_empty();
        if !from_data {
            c.head.extend_from_slice(data);
        }
        let buf: &[u8] = if from_data { data } else { &c.head };
        let (n, code, len) = {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(buf) {
                Ok(httparse::Status::Partial) if buf.len() > 64 << 10 => {
                    return Err(("response head too large".into(), false))
                }
                Ok(httparse::Status::Partial) => {
                    if from_data {
                        c.head.extend_from_slice(data);
                    }
                    return Ok(false);
                }
                Ok(httparse::Status::Complete(n)) => {
                    let len = resp
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    (n, resp.code, len)
                }
                Err(e) => return Err((format!("bad response: {e}"), false)),
            }
        };
        if code != Some(200) {
            return Err((format!("{} answered {code:?}", target.path), false));
        }
        if len != Some(target.len) {
            return Err((format!("{}: Content-Length {len:?}, file is {}", target.path, target.len), true));
        }
        c.phase = Phase::Body { left: target.len, off: 0 };
        if from_data {
            body = &data[n..];
        } else {
            spill = c.head[n..].to_vec();
            c.head.clear();
            body = &spill;
        }
    }
    let Phase::Body { left, off } = &mut c.phase else { return Ok(false) };
    let k = (body.len() as u64).min(*left) as usize;
    if let Some(seed) = target.seed {
        let bad = if c.full_check {
            Pattern::new(seed).check(*off, &body[..k]).map(|i| i as u64)
        } else {
            spot_check(Pattern::new(seed), *off, &body[..k])
        };
        if let Some(i) = bad {
            return Err((format!("{}: wrong byte at offset {}", target.path, *off + i), true));
        }
    }
    *off += k as u64;
    *left -= k as u64;
    if body.len() > k {
        return Err((format!("{}: {} bytes past the end of the response", target.path, body.len() - k), true));
    }
    if *left > 0 {
        return Ok(false);
    }
    complete(c, plan, now, out, progress);
    Ok(true)
}

/// `n` more body bytes were dropped unread; returns whether the response
/// is complete.
fn on_dropped(c: &mut Conn, plan: &Plan<'_>, n: u64, now: Instant, out: &mut Outcome, progress: &Progress) -> bool {
    let Phase::Body { left, off } = &mut c.phase else { return false };
    // `discard` never takes more than `left`.
    *off += n;
    *left -= n.min(*left);
    if *left > 0 {
        return false;
    }
    complete(c, plan, now, out, progress);
    true
}

/// The response in flight on `c` is complete: count it.
fn complete(c: &mut Conn, plan: &Plan<'_>, now: Instant, out: &mut Outcome, progress: &Progress) {
    let target = &plan.targets[c.target];
    progress.requests.fetch_add(1, Relaxed);
    c.done += 1;
    if c.full_check && target.seed.is_some() {
        out.fully_verified += 1;
    }
    if plan.clock.measure_from().is_some_and(|m| c.sent_at >= m) && plan.clock.measuring(now) {
        out.requests += 1;
        out.latencies_ns.push(now.duration_since(c.sent_at).as_nanos() as u64);
    }
}

/// Let the kernel drop up to `left` bytes of what `s` received, without
/// copying them (`recv(MSG_TRUNC)` on TCP). Returns how many it dropped.
fn discard(s: &TcpStream, buf: &mut [u8], left: u64) -> io::Result<usize> {
    let len = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
    // SAFETY: `buf` is writable for `len` bytes (the kernel does not even
    // write to it: with MSG_TRUNC a TCP socket drops the bytes).
    let r = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), len, libc::MSG_TRUNC | libc::MSG_DONTWAIT) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // Never more than asked (it could only be more for a datagram socket).
    Ok((r as usize).min(len))
}

/// Check the first word (up to 8 bytes) of every `SPOT_EVERY` bytes of file
/// offset in `buf`, which holds the file's bytes from `offset`. Returns the
/// index of the first wrong byte.
fn spot_check(p: Pattern, offset: u64, buf: &[u8]) -> Option<u64> {
    let end = offset + buf.len() as u64;
    let mut at = offset.next_multiple_of(SPOT_EVERY);
    while at < end {
        let i = (at - offset) as usize;
        let n = buf.len().min(i + 8);
        if let Some(j) = p.check(at, &buf[i..n]) {
            return Some((i + j) as u64);
        }
        at += SPOT_EVERY;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spot_checks_catch_a_wrong_page() {
        let p = Pattern::new(5);
        let mut buf = vec![0u8; 5 * 4096];
        p.fill(100, &mut buf);
        assert_eq!(spot_check(p, 100, &buf), None);
        // A page sent from the wrong place: its first word is wrong.
        let mut other = vec![0u8; 4096];
        Pattern::new(6).fill(8092, &mut other);
        buf[3996..3996 + 4096].copy_from_slice(&other);
        assert_eq!(spot_check(p, 100, &buf), Some(3996));
        // Chunks that start mid-page and end inside a word are checked too.
        let mut tail = [0u8; 3];
        p.fill(8192, &mut tail);
        assert_eq!(spot_check(p, 8192, &tail), None);
        tail[2] ^= 1;
        assert_eq!(spot_check(p, 8192, &tail), Some(2));
        assert_eq!(spot_check(p, 8193, &tail), None, "no page start in 8193..8196");
    }
}
