//! The tokio server: the same HTTP/1.1 as the thread-per-core server
//! (`http.rs` decides every response), on a tokio multi-thread runtime with
//! a task per connection, sending from the sf_buf pool or the lwbuf caches
//! with owned handles held across `.await` (`tokio_send.rs`).
//!
//! - **Workers**: one per CPU. Each binds a CPU of the lwbuf caches for its
//!   whole life in the runtime's `on_thread_start` hook
//!   ([`Lwbufs::bind_for_thread`](lwbuf::Lwbufs::bind_for_thread): no guard
//!   to keep; released when the thread exits), CPU ids handed out by an
//!   atomic counter, and is pinned to a core as the thread-per-core workers
//!   are (worker `i` to core `i % cores`). The runtime starts its workers
//!   first, so they take ids `0..workers`; a thread started later (tokio's
//!   blocking pool, which this server does not use) is left unbound.
//! - **Connections**: an accept task per `SO_REUSEPORT` listener spawns a
//!   task per connection; tokio's scheduler may move a task to another
//!   worker between two polls, so a handle is often released on another
//!   CPU than it was mapped on (a mailbox message to its home CPU).
//! - **Files on disk** (`serve --mem-mib`): a request pins its pages in the
//!   page cache on the worker that runs it, reading a miss from disk there
//!   as a page fault would (the worker waits for the read), then sends
//!   them as it sends a file in memory.
//! - **Limits**, as `server.rs` enforces them: 431 from `http::parse`; an
//!   idle connection closed (408 if part of a request arrived) by a timer
//!   on each read; 503 beyond `max_connections`; every closing error
//!   answered, then a lingering close.
//!
//! [`run`] is what the benchmark and `serve --runtime tokio` call in place
//! of `server::spawn_workers`: it serves until the stop flag is set and
//! adds its counts to the shared [`Stats`].

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use lwbuf::sendfile::{SendOptions, SendStats};
use lwbuf::Lwbufs;
use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpListener, TcpStream};

use crate::fileset::FileSet;
use crate::http::{self, DateCache, Parsed, Request, Route, Status};
use crate::server::{Limits, Shared, Stats, LINGER};
use crate::tokio_send::{send_file, send_head, Out};
pub use crate::tokio_send::{Caches, SendLimits};

/// How long the workers may take to start (a watchdog).
const STARTUP: Duration = Duration::from_secs(30);

/// How often [`run`] adds the server's counts to the caller's.
const RELAY: Duration = Duration::from_millis(10);

/// How the server runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub limits: Limits,
    /// One worker per entry; worker `i` is pinned to core `i % cores` when
    /// its entry is a core (see `crate::cores`).
    pub cores: Vec<Option<core_affinity::CoreId>>,
    pub send: SendLimits,
    /// `SO_SNDBUF` of every accepted socket (default: the kernel's).
    pub send_buffer: Option<usize>,
}

impl SendLimits {
    /// What a sender with `o` allows a send.
    pub fn of(o: &SendOptions) -> SendLimits {
        SendLimits { batch_bytes: o.batch_bytes, stall: o.stall_timeout }
    }
}

/// What every task reads.
struct Ctx {
    files: Arc<FileSet>,
    caches: Caches,
    limits: Limits,
    send: SendLimits,
    send_buffer: Option<usize>,
    stats: Arc<Stats>,
}

/// A running server; [`shutdown`](Self::shutdown) (or drop) stops it.
pub struct TokioServer {
    rt: tokio::runtime::Runtime,
    stats: Arc<Stats>,
}

impl TokioServer {
    /// Start the workers, bound and pinned, and an accept task per
    /// listener. Errors: the runtime could not start, or a worker could not
    /// bind its CPU or pin itself.
    pub fn start(
        files: Arc<FileSet>,
        caches: Caches,
        listeners: Vec<std::net::TcpListener>,
        opts: Options,
    ) -> Result<TokioServer, String> {
        let workers = opts.cores.len().max(1);
        let pin: Vec<bool> = (0..workers).map(|i| opts.cores.get(i).copied().flatten().is_some()).collect();
        let lw = caches.lwbufs().cloned();
        let next = AtomicUsize::new(0);
        let (started, is_started) = mpsc::channel();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("lwbuf-tokio")
            .enable_all()
            .on_thread_start(move || {
                let cpu = next.fetch_add(1, Relaxed);
                if cpu < workers {
                    let _ = started.send(start_worker(cpu, pin[cpu], lw.as_ref()));
                }
            })
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        for _ in 0..workers {
            is_started.recv_timeout(STARTUP).map_err(|_| "a tokio worker did not start".to_string())??;
        }
        let stats = Arc::new(Stats::default());
        let ctx = Arc::new(Ctx {
            files,
            caches,
            limits: opts.limits,
            send: opts.send,
            send_buffer: opts.send_buffer,
            stats: Arc::clone(&stats),
        });
        // Registering a listener with the runtime's I/O driver needs its context.
        let in_runtime = rt.enter();
        for l in listeners {
            let l = TcpListener::from_std(l).map_err(|e| format!("listener: {e}"))?;
            rt.spawn(accept_loop(l, Arc::clone(&ctx)));
        }
        drop(in_runtime);
        Ok(TokioServer { rt, stats })
    }

    /// The server's counts (waits as they happen; the rest once per turn
    /// of each connection: after it has answered what it had received).
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The runtime, to spawn tasks on its workers (tests).
    #[cfg(test)]
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.rt.handle()
    }

    /// Stop: drop every task (their handles are released on the workers)
    /// and wait for the worker threads to exit, which unbinds their CPUs
    /// and applies the messages left in their mailboxes.
    pub fn shutdown(self) {
        drop(self.rt);
    }
}

/// What the thread-start hook does for worker `cpu`: bind it to CPU `cpu`
/// of the lwbuf caches for its life, and pin it to a core.
fn start_worker(cpu: usize, pin: bool, lw: Option<&Arc<Lwbufs>>) -> Result<(), String> {
    if let Some(lw) = lw {
        lw.bind_for_thread(cpu).map_err(|e| format!("tokio worker {cpu}: bind CPU {cpu}: {e}"))?;
    }
    if pin {
        lwbuf::pin_to_core(cpu).map_err(|e| format!("tokio worker {cpu}: pin: {e}"))?;
    }
    Ok(())
}

// === run: the benchmark's and serve's entry ===

/// Serve on `listeners` from `sh.sender`'s caches until `sh.stop` is set,
/// adding the counts to `sh.stats` (every few milliseconds, and at the
/// end). `cores` as for `server::spawn_workers`.
pub fn run(
    sh: &Shared<'_>,
    listeners: Vec<std::net::TcpListener>,
    cores: &[Option<core_affinity::CoreId>],
) -> io::Result<()> {
    let caches = Caches::of(sh.sender).map_err(io::Error::other)?;
    let opts = Options {
        limits: sh.limits,
        cores: cores.to_vec(),
        send: SendLimits::of(sh.sender.options()),
        send_buffer: None,
    };
    // The tasks are 'static: they share a clone of the file table (clones
    // of the pages, no bytes copied).
    let server = TokioServer::start(Arc::new(sh.files.clone()), caches, listeners, opts).map_err(io::Error::other)?;
    let mut relay = Relay::default();
    while !sh.stop.load(Relaxed) {
        thread::sleep(RELAY);
        relay.add(server.stats(), sh.stats);
    }
    let stats = Arc::clone(server.stats());
    server.shutdown();
    relay.add(&stats, sh.stats);
    Ok(())
}

/// What was already added of each counter.
#[derive(Default)]
struct Relay([u64; 8]);

impl Relay {
    fn add(&mut self, from: &Stats, to: &Stats) {
        let pairs = [
            (&from.requests, &to.requests),
            (&from.bytes, &to.bytes),
            (&from.calls, &to.calls),
            (&from.waits, &to.waits),
            (&from.send_errors, &to.send_errors),
            (&from.bad_requests, &to.bad_requests),
            (&from.connections, &to.connections),
            (&from.refused, &to.refused),
        ];
        for (seen, (f, t)) in self.0.iter_mut().zip(pairs) {
            let now = f.load(Relaxed);
            t.fetch_add(now - *seen, Relaxed);
            *seen = now;
        }
    }
}

// === connections ===

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: try again a little later.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if stream.set_nodelay(true).is_err() {
            continue;
        }
        if let Some(n) = ctx.send_buffer {
            let _ = setsockopt(&stream, sockopt::SndBuf, &n);
        }
        let st = &ctx.stats;
        let max = ctx.limits.max_connections as u64;
        let counted = st.open.fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1)).is_ok();
        if counted { &st.connections } else { &st.refused }.fetch_add(1, Relaxed);
        tokio::spawn(connection(stream, Arc::clone(&ctx), counted));
    }
}

/// A connection's count in `Stats::open`, given back when its task ends or
/// is dropped.
struct Open<'a>(Option<&'a AtomicU64>);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if let Some(open) = self.0 {
            open.fetch_sub(1, Relaxed);
        }
    }
}

/// A connection's counts since it last added them to [`Stats`].
#[derive(Default)]
struct Sent {
    requests: u64,
    bytes: u64,
    calls: u64,
}

impl Sent {
    fn add(&mut self, st: SendStats) {
        self.requests += 1;
        self.bytes += st.bytes;
        self.calls += st.calls;
    }

    fn flush(&mut self, to: &Stats) {
        if self.requests > 0 {
            to.requests.fetch_add(self.requests, Relaxed);
            to.bytes.fetch_add(self.bytes, Relaxed);
            to.calls.fetch_add(self.calls, Relaxed);
            *self = Sent::default();
        }
    }
}

/// What a read brought.
enum Read {
    Data,
    Eof,
    Failed,
    /// Nothing until the deadline.
    Idle,
}

/// Read what the client sent (at most 16 KiB more), waiting for it until
/// `deadline`.
async fn read_more(stream: &TcpStream, inbuf: &mut Vec<u8>, deadline: Instant) -> Read {
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.readable()).await {
            Err(_) => return Read::Idle,
            Ok(Err(_)) => return Read::Failed,
            Ok(Ok(())) => {}
        }
        inbuf.reserve(16 << 10);
        match stream.try_read_buf(inbuf) {
            Ok(0) => return Read::Eof,
            Ok(_) => return Read::Data,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(_) => return Read::Failed,
        }
    }
}

/// Close after the response: shut the write side, then read and drop what
/// the client still sends until it closes or [`LINGER`] runs out (so that
/// unread bytes do not turn the close into a reset that destroys the
/// response).
async fn linger(stream: &TcpStream) {
    if nix::sys::socket::shutdown(stream.as_raw_fd(), nix::sys::socket::Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut sink = vec![0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.readable()).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        match stream.try_read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(_) => return,
        }
    }
}

/// Serve one connection: answer every complete request it sends, in
/// order, until it closes, fails, idles out, or a response closes it.
async fn connection(stream: TcpStream, ctx: Arc<Ctx>, counted: bool) {
    let _open = Open(counted.then_some(&ctx.stats.open));
    let out = Out { stream: &stream, lim: &ctx.send, waits: &ctx.stats.waits };
    let mut dates = DateCache::default();
    let mut head = Vec::with_capacity(512);
    if !counted {
        http::write_error(&mut head, Status::ServiceUnavailable, dates.at(SystemTime::now()), false);
        let _ = send_head(&out, &head).await;
        return linger(&stream).await;
    }
    let mut inbuf = Vec::new();
    let mut sent = Sent::default();
    let mut since = Instant::now();
    let mut eof = false;
    loop {
        loop {
            let wall = SystemTime::now();
            let (n, r) = match http::parse(&inbuf, &ctx.limits.http) {
                Parsed::Partial if eof => return sent.flush(&ctx.stats),
                Parsed::Partial => break,
                Parsed::Error(status) => {
                    sent.flush(&ctx.stats);
                    ctx.stats.bad_requests.fetch_add(1, Relaxed);
                    http::write_error(&mut head, status, dates.at(wall), false);
                    let _ = send_head(&out, &head).await;
                    return linger(&stream).await;
                }
                Parsed::Complete(n, req) => (n, respond(&req, &ctx, &out, &mut head, dates.at(wall), &mut sent).await),
            };
            inbuf.drain(..n);
            since = Instant::now();
            match r {
                Err(()) => return sent.flush(&ctx.stats),
                Ok(false) => {
                    sent.flush(&ctx.stats);
                    return linger(&stream).await;
                }
                Ok(true) if eof && inbuf.is_empty() => return sent.flush(&ctx.stats),
                Ok(true) => {}
            }
        }
        sent.flush(&ctx.stats);
        match read_more(&stream, &mut inbuf, since + ctx.limits.idle).await {
            Read::Data => {}
            Read::Eof => eof = true,
            Read::Failed => return,
            Read::Idle if inbuf.is_empty() => return,
            Read::Idle => {
                ctx.stats.bad_requests.fetch_add(1, Relaxed);
                http::write_error(&mut head, Status::RequestTimeout, dates.at(SystemTime::now()), false);
                let _ = send_head(&out, &head).await;
                return linger(&stream).await;
            }
        }
    }
}

/// Answer one request. Returns whether the connection goes on, or `Err`
/// if sending failed.
async fn respond(
    req: &Request<'_>,
    ctx: &Ctx,
    out: &Out<'_>,
    head: &mut Vec<u8>,
    date: &str,
    sent: &mut Sent,
) -> Result<bool, ()> {
    let keep = req.keep_alive;
    let entry = match &req.target {
        Err(status) => {
            ctx.stats.bad_requests.fetch_add(1, Relaxed);
            let keep = keep && status.keeps_connection();
            http::write_error(head, *status, date, keep);
            return send_head(out, head).await.map(|_| keep).map_err(drop);
        }
        Ok(t) => match http::route(t, |k| ctx.files.get(k)) {
            Route::File(e) => e,
            Route::Redirect(location) => {
                http::write_redirect(head, &location, date, keep);
                return send_head(out, head).await.map(|_| keep).map_err(drop);
            }
            Route::NotFound => {
                ctx.stats.bad_requests.fetch_add(1, Relaxed);
                http::write_error(head, Status::NotFound, date, keep);
                return send_head(out, head).await.map(|_| keep).map_err(drop);
            }
        },
    };
    // A file on disk is read here, on the worker, as a page fault would be.
    let a = match ctx.files.answer(entry, req.get, &req.cond) {
        Ok(a) => a,
        Err(status) => {
            ctx.stats.bad_requests.fetch_add(1, Relaxed);
            http::write_error(head, status, date, keep);
            return send_head(out, head).await.map(|_| keep).map_err(drop);
        }
    };
    http::write_head(head, &a.reply, &a.meta, date, keep);
    let r = match &a.body {
        Some((file, range)) => send_file(out, head, file, range.clone(), &ctx.caches).await,
        None => send_head(out, head).await,
    };
    match r {
        Ok(st) => {
            sent.add(st);
            Ok(keep)
        }
        Err(_) => {
            ctx.stats.send_errors.fetch_add(1, Relaxed);
            Err(())
        }
    }
}
