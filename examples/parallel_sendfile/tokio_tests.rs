//! The tokio server beyond its HTTP (which `serve_tests.rs` checks on both
//! servers): owned handles held across `.await` while the socket is full,
//! the task then moved to the other worker, which makes its own entries
//! for them and releases them there; partial writes through a small send
//! buffer; and the caches settled once the runtime has shut down (every
//! decref message applied, no reference left). Placement on a worker is
//! forced, not hoped for: a task that blocks a worker's thread leaves the
//! other as the only one that can run anything. Timeouts are watchdogs.

use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use lwbuf::sendfile::{Mode, SendOptions, Sender};
use lwbuf::Lwbufs;

use crate::fileset::FileSet;
use crate::modes::TOKIO_CAPABLE;
use crate::serve_tests::{get_req, Raw, Site, WATCHDOG};
use crate::server::{bind_listeners, Limits};
use crate::tokio_server::{Caches, Options, SendLimits, TokioServer};

/// Bytes of `big.bin`: more than a loopback connection buffers, so a
/// client that does not read makes the server wait.
const BIG: usize = 4 << 20;

/// A site with `big.bin` beside the usual files, served by the tokio
/// server in `mode` with two unpinned workers.
struct Fixture {
    /// Kept for its drop, which removes the directory.
    _site: Site,
    big: Vec<u8>,
    sender: Sender,
    server: Option<TokioServer>,
    port: u16,
}

impl Fixture {
    fn start(tag: &str, mode: Mode, send_buffer: Option<usize>) -> Fixture {
        let site = Site::new(tag);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let big: Vec<u8> = (0..BIG)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        std::fs::write(site.www.join("big.bin"), &big).expect("write big.bin");
        let files = Arc::new(FileSet::load_dir(&site.www, 1 << 30, 0).expect("files"));
        let opts = SendOptions::default().cpus(Some(2)).window_slots(4096).stall_timeout(Some(WATCHDOG));
        let sender = Sender::new(mode, &files.mem, opts).expect("sender");
        let (port, listeners) = bind_listeners(0, 2).expect("bind");
        let o = Options {
            limits: Limits::default(),
            cores: vec![None, None],
            send: SendLimits::of(sender.options()),
            send_buffer,
        };
        let server = TokioServer::start(files, Caches::of(&sender).expect("caches"), listeners, o).expect("start");
        Fixture { _site: site, big, sender, server: Some(server), port }
    }

    fn server(&self) -> &TokioServer {
        self.server.as_ref().expect("running")
    }

    /// A client (with the kernel's receive buffer, which holds far less
    /// than `big.bin` until the client reads).
    fn client(&self) -> Raw {
        Raw::new(TcpStream::connect(("127.0.0.1", self.port)).expect("connect"))
    }

    /// Shut the runtime down: its workers exit, releasing their CPUs.
    fn shutdown(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

/// Wait (under the watchdog) until `done`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WATCHDOG, "never happened: {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// Block one worker of `rt` (whichever takes the task) until the returned
/// sender is used or dropped; returns its CPU of `lw` (`None` for sf_buf).
fn occupy(rt: &tokio::runtime::Handle, lw: Option<&Arc<Lwbufs>>) -> (Option<usize>, mpsc::Sender<()>) {
    let (on, is_on) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let lw = lw.cloned();
    rt.spawn(async move {
        on.send(lw.and_then(|lw| lw.current_cpu())).expect("send");
        let _ = released.recv();
    });
    let cpu = is_on.recv_timeout(WATCHDOG).expect("a worker runs the task");
    (cpu, release)
}

/// An lwbuf response held across `.await` and finished on the other
/// worker. With worker X blocked, the request is accepted and answered on
/// worker Y, whose CPU maps the pages; the client does not read, so the
/// send waits for the socket holding its owned handles. Then Y is blocked
/// and X freed: the socket's readiness wakes the task on X, which makes
/// CPU X's own entries for the handles (`kva()` after the `.await`), sends
/// the rest, and drops them there (decref messages to Y). After shutdown
/// every message is applied and no reference is left.
#[test]
fn lwbuf_handles_cross_workers_and_settle() {
    let mut f = Fixture::start("tokio-cross", Mode::Lwbuf, Some(4096));
    let lw = Arc::clone(f.sender.lwbuf().expect("caches").lwbufs());
    let rt = f.server().handle().clone();
    let (x, free_x) = occupy(&rt, Some(&lw));
    let x = x.expect("worker X is bound");

    let mut c = f.client();
    c.send(&get_req("/big.bin", "Connection: close\r\n"));
    let stats = Arc::clone(f.server().stats());
    wait_until("the send waits for the socket", || stats.waits.load(Relaxed) > 0);
    let held = lw.check_consistency().expect("consistent");
    assert!(held > 0, "handles are held across the wait");
    let homes = lw.stats().per_cpu.iter().map(|c| c.allocs).collect::<Vec<_>>();
    assert_eq!(homes[x], 0, "nothing mapped on the blocked worker's CPU: {homes:?}");

    let (y, free_y) = occupy(&rt, Some(&lw));
    let y = y.expect("worker Y is bound");
    assert_ne!(x, y, "one CPU per worker");
    drop(free_x);
    let r = c.response(false);
    assert_eq!(r.code, 200);
    assert!(r.body == f.big, "every byte of the body");
    assert!(c.closed(), "Connection: close");

    let st = lw.stats();
    assert!(st.per_cpu[x].foreign > 0, "CPU {x} made entries for handles homed on CPU {y}: {st:?}");
    assert!(st.per_cpu[x].decrefs_sent > 0, "CPU {x} released handles of CPU {y}: {st:?}");
    drop(free_y);
    drop(c);
    f.shutdown();
    let st = lw.stats();
    assert_eq!(st.total.decrefs_sent, st.total.decrefs_applied, "every decref applied: {st:?}");
    assert_eq!(lw.check_consistency(), Ok(0), "no reference left");
}

/// A small send buffer on the server's socket and a client that reads
/// only once the server has found the socket full: the response goes out
/// in many short `sendmsg` calls, with waits for readiness between them,
/// the mappings held all along; the bytes arrive whole, in every mode the
/// tokio server runs, and the caches settle after shutdown.
#[test]
fn partial_writes_under_a_small_send_buffer() {
    for &mode in TOKIO_CAPABLE {
        let mut f = Fixture::start("tokio-partial", mode, Some(4096));
        let stats = Arc::clone(f.server().stats());
        let mut c = f.client();
        c.send(&get_req("/big.bin", "Range: bytes=100-\r\nConnection: close\r\n"));
        wait_until("the send waits for the socket", || stats.waits.load(Relaxed) > 0);
        match (f.sender.lwbuf(), f.sender.sfbuf()) {
            (Some(l), _) => assert!(l.lwbufs().check_consistency().expect("consistent") > 0, "{mode}: held"),
            (_, Some(p)) => assert!(p.pool().stats().used > 0, "{mode}: held"),
            _ => unreachable!("a caching mode"),
        }
        let r = c.response(false);
        assert_eq!((r.code, r.header("content-range")), (206, Some(&*format!("bytes 100-{}/{BIG}", BIG - 1))));
        assert!(r.body == f.big[100..], "{mode}: every byte of the body");
        assert!(c.closed(), "{mode}: Connection: close");
        // Counted before the close.
        let (requests, calls, waits) =
            (stats.requests.load(Relaxed), stats.calls.load(Relaxed), stats.waits.load(Relaxed));
        assert_eq!(requests, 1, "{mode}");
        assert!(calls > 1 && waits > 0, "{mode}: {calls} sendmsg calls, {waits} waits for one response");
        drop(c);
        f.shutdown();
        if let Some(l) = f.sender.lwbuf() {
            let st = l.lwbufs().stats();
            assert_eq!(st.total.decrefs_sent, st.total.decrefs_applied, "{mode}: {st:?}");
            assert_eq!(l.lwbufs().check_consistency(), Ok(0), "{mode}");
        }
        if let Some(p) = f.sender.sfbuf() {
            assert_eq!(p.pool().stats().used, 0, "{mode}: nothing held");
        }
    }
}
