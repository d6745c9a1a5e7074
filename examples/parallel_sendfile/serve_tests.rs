//! `serve` against real clients: the server runs on a temporary directory
//! and an ephemeral port, in every sending mode where the bytes matter,
//! on both servers (the thread-per-core one and `--runtime tokio`: each
//! HTTP test is `NAME::threads` and `NAME::tokio`);
//! ureq checks what an HTTP client sees, raw sockets what a client library
//! would hide (framing, closes, malformed requests, limits), and curl its
//! range download and resume (skipped, saying so, where curl is missing).
//! Timeouts in here are watchdogs only: nothing asserts how long anything
//! took.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::Parser;
use lwbuf::sendfile::Mode;

use crate::modes::{Runtime, ServerMode, TOKIO_CAPABLE};
use crate::{Cli, Command as Sub};

/// How long any one read, connect or server start may take before the
/// test fails (a watchdog, not a measurement).
pub(crate) const WATCHDOG: Duration = Duration::from_secs(20);

// === fixture ===

/// A temporary directory of files to serve, and one file beside it that
/// must never be served.
pub(crate) struct Site {
    pub(crate) root: PathBuf,
    pub(crate) www: PathBuf,
    pub(crate) data: Vec<u8>,
}

impl Site {
    pub(crate) fn new(tag: &str) -> Site {
        // Tests run in parallel, some under one tag on both servers.
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("parallel_sendfile-serve-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let www = root.join("www");
        std::fs::create_dir_all(www.join("sub")).expect("mkdir");
        std::fs::create_dir_all(www.join("noindex")).expect("mkdir");
        // Bytes that differ at every offset a range could start at.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..300_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let files: [(&str, &[u8]); 8] = [
            ("index.html", b"<!doctype html><title>root</title>\n"),
            ("sub/index.html", b"<!doctype html><title>sub</title>\n"),
            ("noindex/file.txt", b"no index here\n"),
            ("a.txt", b"hello, world\n"),
            ("img.png", b"\x89PNG\r\n\x1a\nnot really"),
            ("sp ace.txt", b"space\n"),
            ("empty.bin", b""),
            ("data.bin", &data),
        ];
        for (name, bytes) in files {
            std::fs::write(www.join(name), bytes).expect("write");
        }
        std::fs::write(root.join("secret"), b"outside the served directory\n").expect("write");
        Site { root, www, data }
    }

    /// `serve` of the site on the server `rt` in the mode the HTTP tests use
    /// there (sendfile; lwbuf on tokio, which serves from the caches).
    pub(crate) fn serve_http(&self, rt: Runtime, extra: &[&str]) -> Server {
        let mode = if rt == Runtime::Tokio { Mode::Lwbuf } else { Mode::Sendfile };
        self.serve_on(ServerMode { runtime: rt, mode }, extra)
    }

    /// `serve` of the site in mode `m` (`--runtime` and `--mode`).
    pub(crate) fn serve_on(&self, m: ServerMode, extra: &[&str]) -> Server {
        let ServerMode { runtime, mode } = m;
        let mut argv = vec![
            "x".to_string(),
            "serve".into(),
            "--dir".into(),
            self.www.display().to_string(),
            "--port".into(),
            "0".into(),
            "--cpus".into(),
            "2".into(),
            "--cache-mib".into(),
            "2".into(),
            "--mode".into(),
            mode.name().into(),
            "--runtime".into(),
            runtime.name().into(),
            // A bound on the server's life even if a test hangs.
            "--duration".into(),
            "300".into(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        let Some(Sub::Serve(args)) = Cli::try_parse_from(argv).expect("serve args").command else {
            panic!("not serve")
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let thread = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || crate::server::serve_until(&args, &stop, |port| tx.send(port).expect("send port")))
        };
        let port = rx.recv_timeout(WATCHDOG).expect("the server starts");
        Server { port, stop, thread: Some(thread) }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

pub(crate) struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Server {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub(crate) fn connect(&self) -> Raw {
        Raw::new(TcpStream::connect(("127.0.0.1", self.port)).expect("connect"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let r = t.join().expect("server thread");
            if !thread::panicking() {
                r.expect("server result");
            }
        }
    }
}

// === a raw client ===

/// One connection, read response by response (what a client library hides).
pub(crate) struct Raw {
    pub(crate) s: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) code: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Resp {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

impl Raw {
    /// A client on `s`, whose reads fail after the watchdog.
    pub(crate) fn new(s: TcpStream) -> Raw {
        s.set_read_timeout(Some(WATCHDOG)).expect("timeout");
        Raw { s, buf: Vec::new() }
    }

    pub(crate) fn send(&mut self, req: &str) {
        self.s.write_all(req.as_bytes()).expect("write request");
    }

    pub(crate) fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 64 << 10];
        let n = self.s.read(&mut chunk).expect("read (watchdog)");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Read one response; `head_only` for the answer to a HEAD.
    pub(crate) fn response(&mut self, head_only: bool) -> Resp {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut headers);
            match r.parse(&self.buf).expect("a well-formed response") {
                httparse::Status::Complete(n) => {
                    let code = r.code.expect("code");
                    let headers: Vec<(String, String)> = r
                        .headers
                        .iter()
                        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect();
                    let len: usize = if head_only || code == 304 {
                        0
                    } else {
                        let v = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length"));
                        v.expect("Content-Length").1.parse().expect("a length")
                    };
                    self.buf.drain(..n);
                    while self.buf.len() < len {
                        assert!(self.fill() > 0, "the server closed in the middle of a body");
                    }
                    let body = self.buf.drain(..len).collect();
                    return Resp { code, headers, body };
                }
                httparse::Status::Partial => assert!(self.fill() > 0, "closed before a response: {:?}", self.buf),
            }
        }
    }

    /// Whether the server closed the connection (with nothing more sent).
    pub(crate) fn closed(&mut self) -> bool {
        self.buf.is_empty() && self.fill() == 0
    }
}

/// One request on a new connection that the server is to close: the
/// response and whether it then closed.
fn once(srv: &Server, req: &str) -> (Resp, bool) {
    let mut c = srv.connect();
    c.send(req);
    let r = c.response(req.starts_with("HEAD"));
    let closed = c.closed();
    (r, closed)
}

pub(crate) fn get_req(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n")
}

// === ureq ===

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .timeout_global(Some(WATCHDOG))
        .build()
        .into()
}

struct Got {
    code: u16,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
}

impl Got {
    fn h(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn fetch(a: &ureq::Agent, method: &str, url: &str, headers: &[(&str, &str)]) -> Got {
    let resp = match method {
        "HEAD" => {
            let mut r = a.head(url);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.call()
        }
        _ => {
            let mut r = a.get(url);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.call()
        }
    }
    .expect("request");
    let code = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().read_to_vec().expect("body");
    Got { code, headers, body }
}

// === tests ===

fn files_get_their_type_dates_and_validators(rt: Runtime) {
    let site = Site::new("meta");
    let srv = site.serve_http(rt, &[]);
    let a = agent();
    let g = fetch(&a, "GET", &srv.url("/a.txt"), &[]);
    assert_eq!(g.code, 200);
    assert_eq!(g.body, b"hello, world\n");
    assert_eq!(g.h("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(g.h("content-length"), Some("13"));
    assert_eq!(g.h("accept-ranges"), Some("bytes"));
    let modified = std::fs::metadata(site.www.join("a.txt")).and_then(|m| m.modified()).expect("mtime");
    let lm = httpdate::parse_http_date(g.h("last-modified").expect("Last-Modified")).expect("an HTTP date");
    assert!(lm <= modified && modified.duration_since(lm).expect("after") < Duration::from_secs(1));
    assert!(httpdate::parse_http_date(g.h("date").expect("Date")).is_ok());
    let etag = g.h("etag").expect("ETag");
    assert!(etag.starts_with('"') && etag.ends_with('"'), "a strong tag: {etag}");
    assert_eq!(fetch(&a, "GET", &srv.url("/a.txt"), &[]).h("etag"), Some(etag), "stable");
    assert_ne!(fetch(&a, "GET", &srv.url("/data.bin"), &[]).h("etag"), Some(etag), "per file");
    for (path, ty) in
        [("/img.png", "image/png"), ("/data.bin", "application/octet-stream"), ("/", "text/html; charset=utf-8")]
    {
        assert_eq!(fetch(&a, "GET", &srv.url(path), &[]).h("content-type"), Some(ty), "{path}");
    }
    // HEAD: the GET's headers, no body.
    let h = fetch(&a, "HEAD", &srv.url("/data.bin"), &[]);
    assert_eq!(h.code, 200);
    assert_eq!(h.h("content-length"), Some("300000"));
    assert!(h.body.is_empty());
    let (r, _) = once(&srv, "HEAD /data.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert_eq!((r.code, r.header("content-length")), (200, Some("300000")));
    // A percent-encoded name.
    assert_eq!(fetch(&a, "GET", &srv.url("/sp%20ace.txt"), &[]).body, b"space\n");
}

fn single_ranges_are_partial_content(rt: Runtime) {
    let site = Site::new("range");
    let srv = site.serve_http(rt, &[]);
    let a = agent();
    let url = srv.url("/data.bin");
    let g = fetch(&a, "GET", &url, &[("Range", "bytes=1000-1999")]);
    assert_eq!(g.code, 206);
    assert_eq!(g.h("content-range"), Some("bytes 1000-1999/300000"));
    assert_eq!(g.h("content-length"), Some("1000"));
    assert_eq!(g.body, &site.data[1000..2000]);
    let g = fetch(&a, "GET", &url, &[("Range", "bytes=-10")]);
    assert_eq!((g.code, g.h("content-range")), (206, Some("bytes 299990-299999/300000")));
    assert_eq!(g.body, &site.data[299_990..]);
    let g = fetch(&a, "GET", &url, &[("Range", "bytes=299000-")]);
    assert_eq!((g.code, g.body.as_slice()), (206, &site.data[299_000..]));
    let g = fetch(&a, "GET", &url, &[("Range", "bytes=299999-5000000")]);
    assert_eq!((g.code, g.h("content-range")), (206, Some("bytes 299999-299999/300000")));
    // Unsatisfiable: 416 and the length.
    for r in ["bytes=300000-", "bytes=-0"] {
        let g = fetch(&a, "GET", &url, &[("Range", r)]);
        assert_eq!((g.code, g.h("content-range")), (416, Some("bytes */300000")), "{r}");
        assert!(g.body.is_empty());
    }
    let g = fetch(&a, "GET", &srv.url("/empty.bin"), &[("Range", "bytes=0-")]);
    assert_eq!((g.code, g.h("content-range")), (416, Some("bytes */0")));
    // Several ranges, a range the server does not understand, and HEAD: the whole file.
    for (m, r) in [("GET", "bytes=0-9,20-29"), ("GET", "lines=1-2"), ("GET", "bytes=9-2"), ("HEAD", "bytes=0-9")] {
        let g = fetch(&a, m, &url, &[("Range", r)]);
        assert_eq!((g.code, g.h("content-length")), (200, Some("300000")), "{m} {r}");
        assert!(g.h("content-range").is_none());
        if m == "GET" {
            assert_eq!(g.body, site.data);
        }
    }
}

fn conditional_requests_answer_not_modified(rt: Runtime) {
    let site = Site::new("cond");
    let srv = site.serve_http(rt, &[]);
    let a = agent();
    let url = srv.url("/data.bin");
    let first = fetch(&a, "GET", &url, &[]);
    let etag = first.h("etag").expect("ETag").to_string();
    let lm = first.h("last-modified").expect("Last-Modified").to_string();
    let older = httpdate::fmt_http_date(httpdate::parse_http_date(&lm).expect("date") - Duration::from_secs(60));
    let weak = format!("W/{etag}");
    let list = format!("\"nope\", {etag}");
    for (method, headers, code) in [
        ("GET", vec![("If-None-Match", etag.as_str())], 304),
        ("HEAD", vec![("If-None-Match", etag.as_str())], 304),
        ("GET", vec![("If-None-Match", weak.as_str())], 304),
        ("GET", vec![("If-None-Match", list.as_str())], 304),
        ("GET", vec![("If-None-Match", "*")], 304),
        ("GET", vec![("If-None-Match", "\"nope\"")], 200),
        ("GET", vec![("If-Modified-Since", lm.as_str())], 304),
        ("GET", vec![("If-Modified-Since", older.as_str())], 200),
        // If-None-Match decides alone when present.
        ("GET", vec![("If-None-Match", "\"nope\""), ("If-Modified-Since", lm.as_str())], 200),
    ] {
        let g = fetch(&a, method, &url, &headers);
        assert_eq!(g.code, code, "{method} {headers:?}");
        if code == 304 {
            assert!(g.body.is_empty());
            assert_eq!(g.h("etag"), Some(etag.as_str()));
            assert_eq!(g.h("last-modified"), Some(lm.as_str()));
        }
    }
    // If-Range: the range only if the validator still matches.
    for (if_range, code) in
        [(etag.as_str(), 206), (lm.as_str(), 206), (weak.as_str(), 200), ("\"nope\"", 200), (older.as_str(), 200)]
    {
        let g = fetch(&a, "GET", &url, &[("Range", "bytes=0-99"), ("If-Range", if_range)]);
        assert_eq!(g.code, code, "If-Range: {if_range}");
        let want = if code == 206 { &site.data[..100] } else { &site.data[..] };
        assert_eq!(g.body, want, "If-Range: {if_range}");
    }
}

fn directories_serve_their_index(rt: Runtime) {
    let site = Site::new("index");
    let srv = site.serve_http(rt, &[]);
    let a = agent();
    let g = fetch(&a, "GET", &srv.url("/"), &[]);
    assert_eq!((g.code, g.body.as_slice()), (200, &b"<!doctype html><title>root</title>\n"[..]));
    let g = fetch(&a, "GET", &srv.url("/sub/"), &[]);
    assert_eq!((g.code, g.body.as_slice()), (200, &b"<!doctype html><title>sub</title>\n"[..]));
    let g = fetch(&a, "GET", &srv.url("/sub"), &[]);
    assert_eq!((g.code, g.h("location")), (301, Some("/sub/")));
    assert_eq!(fetch(&a, "GET", &srv.url("/noindex/"), &[]).code, 404, "no listing");
    assert_eq!(fetch(&a, "GET", &srv.url("/noindex/file.txt"), &[]).code, 200);
    assert_eq!(fetch(&a, "GET", &srv.url("/nothing"), &[]).code, 404);
}

fn paths_outside_the_directory_are_refused(rt: Runtime) {
    let site = Site::new("traversal");
    let srv = site.serve_http(rt, &[]);
    // Raw requests: a client library would normalise these paths away.
    for path in [
        "/../secret",
        "/sub/../../secret",
        "/%2e%2e/secret",
        "/%2E%2E%2Fsecret",
        "/sub/%2e%2e/%2e%2e/secret",
        "/..%5csecret",
        "//secret",
        "/%2fsecret",
        "/a.txt%00.png",
        "secret",
        "http://t/../secret",
    ] {
        let (r, closed) = once(&srv, &get_req(path, ""));
        assert_eq!(r.code, 400, "{path}");
        assert!(closed, "{path}: a bad request closes the connection");
        assert!(!r.body.windows(7).any(|w| w == b"outside"), "{path}");
    }
    let (r, _) = once(&srv, &get_req(&site.root.join("secret").display().to_string(), "Connection: close\r\n"));
    assert!(r.code == 400 || r.code == 404, "an absolute file name: {}", r.code);
    assert!(!r.body.windows(7).any(|w| w == b"outside"));
}

fn connections_close_as_http_says(rt: Runtime) {
    let site = Site::new("close");
    let srv = site.serve_http(rt, &[]);
    // HTTP/1.1: keep-alive by default, several requests on one connection
    // (pipelined), closed after the one that says `Connection: close`.
    let mut c = srv.connect();
    c.send("GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\nHEAD /a.txt HTTP/1.1\r\nHost: t\r\n\r\n");
    c.send("GET /a.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    for head_only in [false, true, false] {
        let r = c.response(head_only);
        assert_eq!(r.code, 200);
        assert_eq!(r.body.len(), if head_only { 0 } else { 13 });
    }
    assert!(c.closed(), "closed after Connection: close");
    // HTTP/1.0: closed after the response unless it asks for keep-alive.
    let (r, closed) = once(&srv, "GET /a.txt HTTP/1.0\r\n\r\n");
    assert_eq!((r.code, r.header("connection"), closed), (200, Some("close"), true));
    let mut c = srv.connect();
    for _ in 0..2 {
        c.send("GET /a.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let r = c.response(false);
        assert_eq!(
            (r.code, r.header("connection"), r.body.as_slice()),
            (200, Some("keep-alive"), &b"hello, world\n"[..])
        );
    }
    c.send("GET /a.txt HTTP/1.0\r\n\r\n");
    assert_eq!(c.response(false).code, 200);
    assert!(c.closed());
    // 404 and 405 keep the connection; 400 closes it.
    let mut c = srv.connect();
    c.send(&get_req("/nothing", ""));
    assert_eq!(c.response(false).code, 404);
    c.send("DELETE /a.txt HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.response(false);
    assert_eq!((r.code, r.header("allow")), (405, Some("GET, HEAD")));
    c.send("GET /a.txt HTTP/1.1\r\n\r\n");
    assert_eq!(c.response(false).code, 400, "HTTP/1.1 without Host");
    assert!(c.closed());
    let (r, closed) = once(&srv, "GET /a.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!((r.code, closed), (400, true), "a request body");
}

fn heads_over_the_limits_get_431(rt: Runtime) {
    let site = Site::new("limits");
    let srv = site.serve_http(rt, &["--max-header-bytes", "1k", "--max-headers", "8"]);
    // Header bytes and fields.
    let big = format!("X-Big: {}\r\n", "a".repeat(1100));
    let (r, closed) = once(&srv, &get_req("/a.txt", &big));
    assert_eq!((r.code, closed), (431, true), "a head over --max-header-bytes");
    let many: String = (0..8).map(|i| format!("X-{i}: y\r\n")).collect();
    let (r, closed) = once(&srv, &get_req("/a.txt", &many));
    assert_eq!((r.code, closed), (431, true), "9 fields, over --max-headers");
    let six: String = (0..6).map(|i| format!("X-{i}: y\r\n")).collect();
    assert_eq!(once(&srv, &get_req("/a.txt", &format!("{six}Connection: close\r\n"))).0.code, 200, "8 fields");
    // A head that keeps coming is cut off at the limit, not read forever.
    let mut c = srv.connect();
    let _ = c.s.write_all(format!("GET /a.txt HTTP/1.1\r\nHost: t\r\nX: {}", "b".repeat(64 << 10)).as_bytes());
    assert_eq!(c.response(false).code, 431);
}

fn connections_over_the_limit_get_503(rt: Runtime) {
    let site = Site::new("maxconn");
    let srv = site.serve_http(rt, &["--max-connections", "3"]);
    // Three are served; the fourth gets 503 and is closed.
    let mut held: Vec<Raw> = (0..3).map(|_| srv.connect()).collect();
    for c in &mut held {
        c.send(&get_req("/a.txt", ""));
        assert_eq!(c.response(false).code, 200);
    }
    let mut extra = srv.connect();
    let r = extra.response(false);
    assert_eq!((r.code, r.header("retry-after")), (503, Some("1")));
    assert!(extra.closed());
    // Once one closes, a new connection is served again (when the server
    // has seen the close: tried until then, under the watchdog).
    drop(held.pop());
    let start = Instant::now();
    loop {
        let mut c = srv.connect();
        c.send(&get_req("/a.txt", "Connection: close\r\n"));
        let code = c.response(false).code;
        if code == 200 {
            break;
        }
        assert_eq!(code, 503);
        assert!(start.elapsed() < WATCHDOG, "a closed connection was never given back");
        thread::sleep(Duration::from_millis(20));
    }
}

fn idle_connections_are_closed_with_408(rt: Runtime) {
    let site = Site::new("idle");
    let srv = site.serve_http(rt, &["--idle-timeout", "0.3"]);
    // Part of a request, then nothing: 408 and close.
    let mut c = srv.connect();
    c.send("GET /a.txt HTTP/1.1\r\nHo");
    let r = c.response(false);
    assert_eq!((r.code, r.header("connection")), (408, Some("close")));
    assert!(c.closed());
    // Nothing at all, or nothing after a response: closed without a word.
    let mut c = srv.connect();
    assert!(c.closed(), "an idle new connection");
    let mut c = srv.connect();
    c.send(&get_req("/a.txt", ""));
    assert_eq!(c.response(false).code, 200);
    assert!(c.closed(), "an idle kept-alive connection");
    // A client that half-closes after its request still gets the response.
    let mut c = srv.connect();
    c.send(&get_req("/a.txt", ""));
    c.s.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(c.response(false).code, 200);
    assert!(c.closed());
}

#[test]
fn every_mode_serves_whole_files_and_ranges() {
    let site = Site::new("modes");
    let threads = Mode::ALL.iter().map(|&mode| ServerMode { runtime: Runtime::Threads, mode });
    let tokio = TOKIO_CAPABLE.iter().map(|&mode| ServerMode { runtime: Runtime::Tokio, mode });
    for mode in threads.chain(tokio) {
        let srv = site.serve_on(mode, &[]);
        let mut c = srv.connect();
        c.send(&get_req("/data.bin", ""));
        let r = c.response(false);
        assert_eq!((r.code, r.body == site.data), (200, true), "{mode}");
        c.send(&get_req("/data.bin", "Range: bytes=4095-70000\r\n"));
        let r = c.response(false);
        assert_eq!((r.code, r.body.as_slice()), (206, &site.data[4095..70001]), "{mode}");
        c.send(&get_req("/data.bin", "Range: bytes=-5000\r\n"));
        assert_eq!(c.response(false).body, &site.data[295_000..], "{mode}");
        c.send(&get_req("/empty.bin", ""));
        let r = c.response(false);
        assert_eq!((r.code, r.body.len(), r.header("content-length")), (200, 0, Some("0")), "{mode}");
        c.send("HEAD /data.bin HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(c.response(true).header("content-length"), Some("300000"), "{mode}");
        c.send(&get_req("/a.txt", "Connection: close\r\n"));
        assert_eq!(c.response(false).body, b"hello, world\n", "{mode}: framing held");
        assert!(c.closed(), "{mode}");
    }
}

// === from disk through the page cache (--mem-mib) ===

/// A site with `n` more files of `size` bytes (`big/NNN.bin`, each its own
/// bytes), beside the usual ones: with `--mem-mib 1` (256 frames) the
/// directory is several times larger than the memory.
fn big_site(tag: &str, n: usize, size: usize) -> (Site, Vec<Vec<u8>>) {
    let site = Site::new(tag);
    std::fs::create_dir_all(site.www.join("big")).expect("mkdir");
    let bigs: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut v = vec![0u8; size];
            lwbuf::sendfile::Pattern::new(1000 + i as u64).fill(0, &mut v);
            v
        })
        .collect();
    for (i, b) in bigs.iter().enumerate() {
        std::fs::write(site.www.join(format!("big/{i:03}.bin")), b).expect("write");
    }
    (site, bigs)
}

#[test]
fn every_mode_serves_a_directory_larger_than_its_memory_from_disk() {
    // 12 x 200 KB + the site: about 2.7 MB through 1 MiB of memory.
    let (site, bigs) = big_site("disk-modes", 12, 200_000);
    let threads = Mode::ALL.iter().map(|&mode| ServerMode { runtime: Runtime::Threads, mode });
    let tokio = TOKIO_CAPABLE.iter().map(|&mode| ServerMode { runtime: Runtime::Tokio, mode });
    for mode in threads.chain(tokio) {
        let srv = site.serve_on(mode, &["--mem-mib", "1"]);
        let mut c = srv.connect();
        // Twice over, so the second round finds the first one's pages
        // evicted and reads them again.
        for round in 0..2 {
            for (i, b) in bigs.iter().enumerate() {
                c.send(&get_req(&format!("/big/{i:03}.bin"), ""));
                let r = c.response(false);
                assert_eq!(r.code, 200, "{mode} round {round} file {i}");
                assert!(r.body == *b, "{mode} round {round} file {i}: bytes");
            }
        }
        c.send(&get_req("/data.bin", ""));
        let r = c.response(false);
        assert_eq!((r.code, r.body == site.data), (200, true), "{mode}");
        c.send(&get_req("/data.bin", "Range: bytes=4095-70000\r\n"));
        let r = c.response(false);
        assert_eq!((r.code, r.body.as_slice()), (206, &site.data[4095..70001]), "{mode}");
        assert_eq!(r.header("content-range"), Some("bytes 4095-70000/300000"), "{mode}");
        c.send(&get_req("/data.bin", "Range: bytes=-5000\r\n"));
        assert_eq!(c.response(false).body, &site.data[295_000..], "{mode}");
        c.send(&get_req("/big/007.bin", "Range: bytes=199999-\r\n"));
        assert_eq!(c.response(false).body, &bigs[7][199_999..], "{mode}: the last byte alone");
        c.send(&get_req("/data.bin", "Range: bytes=300000-\r\n"));
        assert_eq!(c.response(false).code, 416, "{mode}");
        c.send(&get_req("/empty.bin", ""));
        let r = c.response(false);
        assert_eq!((r.code, r.body.len(), r.header("content-length")), (200, 0, Some("0")), "{mode}");
        c.send("HEAD /data.bin HTTP/1.1\r\nHost: t\r\n\r\n");
        let h = c.response(true);
        assert_eq!(h.header("content-length"), Some("300000"), "{mode}");
        let etag = h.header("etag").expect("an ETag").to_string();
        c.send(&get_req("/data.bin", &format!("If-None-Match: {etag}\r\n")));
        assert_eq!(c.response(false).code, 304, "{mode}");
        c.send(&get_req("/sub/", ""));
        assert_eq!(c.response(false).body, b"<!doctype html><title>sub</title>\n", "{mode}");
        c.send(&get_req("/nope", ""));
        assert_eq!(c.response(false).code, 404, "{mode}");
        c.send(&get_req("/a.txt", "Connection: close\r\n"));
        assert_eq!(c.response(false).body, b"hello, world\n", "{mode}: framing held");
        assert!(c.closed(), "{mode}");
    }
}

/// Replace `path` with `bytes` as a new inode (written beside it, renamed
/// over it), the way a site is updated under a running server.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Change `path` in place (same inode) to `bytes`, and give it a
/// modification time of its own (`secs` after the epoch), so that the
/// change shows in its stat whatever the file system's clock granularity.
fn rewrite_in_place(path: &Path, bytes: &[u8], secs: u64) {
    let f = std::fs::OpenOptions::new().write(true).truncate(true).open(path).expect("open");
    (&f).write_all(bytes).expect("write");
    f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs)).expect("set mtime");
}

fn files_changed_on_disk_are_served_as_they_are_now(rt: Runtime) {
    let site = Site::new("disk-change");
    let mode = if rt == Runtime::Tokio { Mode::LwbufRun } else { Mode::Sendfile };
    let srv = site.serve_on(ServerMode { runtime: rt, mode }, &["--mem-mib", "1"]);
    let path = site.www.join("data.bin");
    let mut c = srv.connect();
    c.send(&get_req("/data.bin", ""));
    let first = c.response(false);
    assert!(first.body == site.data);
    let old_tag = first.header("etag").expect("ETag").to_string();

    // Longer, in place: new bytes and the new length.
    let longer: Vec<u8> = site.data.iter().chain(site.data[..50_000].iter()).map(|b| b ^ 0x5a).collect();
    rewrite_in_place(&path, &longer, 1_000_000_000);
    c.send(&get_req("/data.bin", ""));
    let r = c.response(false);
    assert_eq!((r.code, r.body.len()), (200, longer.len()));
    assert!(r.body == longer, "the new bytes, not the cached old ones");
    assert_ne!(r.header("etag"), Some(old_tag.as_str()), "a new entity tag");
    assert_eq!(r.header("last-modified"), Some("Sun, 09 Sep 2001 01:46:40 GMT"));
    // A range of the old length is now inside the file.
    c.send(&get_req("/data.bin", "Range: bytes=300000-300009\r\n"));
    assert_eq!(c.response(false).body, &longer[300_000..300_010]);

    // Shorter, in place: the new length, never the old tail.
    let shorter: Vec<u8> = site.data[..10_000].iter().map(|b| b ^ 0xa5).collect();
    rewrite_in_place(&path, &shorter, 1_000_000_100);
    c.send("HEAD /data.bin HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.response(true).header("content-length"), Some("10000"));
    c.send(&get_req("/data.bin", ""));
    let r = c.response(false);
    assert!(r.code == 200 && r.body == shorter, "{} bytes", r.body.len());
    c.send(&get_req("/data.bin", "Range: bytes=20000-\r\n"));
    assert_eq!(c.response(false).code, 416, "past the new end");
    // The old validator no longer matches.
    c.send(&get_req("/data.bin", &format!("If-None-Match: {old_tag}\r\n")));
    assert_eq!(c.response(false).code, 200);

    // Replaced by another inode.
    replace(&path, &site.data);
    c.send(&get_req("/data.bin", ""));
    assert!(c.response(false).body == site.data);

    // Gone.
    std::fs::remove_file(&path).expect("remove");
    c.send(&get_req("/data.bin", ""));
    assert_eq!(c.response(false).code, 404);
    c.send(&get_req("/a.txt", ""));
    assert_eq!(c.response(false).body, b"hello, world\n", "the connection goes on");
}

/// A file replaced again and again while it is requested: every response
/// is one whole version, its length, entity tag and bytes together.
fn a_file_replaced_while_served_is_never_a_mix(rt: Runtime) {
    let site = Site::new("disk-race");
    let mode = if rt == Runtime::Tokio { Mode::Lwbuf } else { Mode::LwbufRun };
    let srv = site.serve_on(ServerMode { runtime: rt, mode }, &["--mem-mib", "1"]);
    let path = site.www.join("data.bin");
    let a = site.data.clone();
    let b: Vec<u8> = site.data[..123_456].iter().map(|x| !x).collect();
    // The file is replaced once per response, while the next request is
    // on its way and being answered.
    let (tick, ticks) = mpsc::channel::<()>();
    thread::scope(|s| {
        let (a, b, path) = (&a, &b, &path);
        s.spawn(move || {
            let mut n = 0u32;
            while ticks.recv().is_ok() {
                replace(path, if n % 2 == 0 { b } else { a });
                n += 1;
            }
        });
        let mut c = srv.connect();
        let mut tags: Vec<(String, usize)> = Vec::new();
        let mut seen = [0u32; 2];
        for i in 0..300 {
            c.send(&get_req("/data.bin", ""));
            tick.send(()).expect("the writer runs");
            let r = c.response(false);
            if r.code == 503 {
                continue; // changed on every look: allowed, and never a mix
            }
            assert_eq!(r.code, 200, "request {i}");
            let which = if r.body == *a {
                0
            } else if r.body == *b {
                1
            } else {
                panic!("request {i}: {} bytes that are neither version", r.body.len())
            };
            seen[which] += 1;
            let tag = r.header("etag").expect("ETag").to_string();
            if let Some((_, w)) = tags.iter().find(|(t, _)| *t == tag) {
                assert_eq!(*w, which, "request {i}: one entity tag, two contents");
            } else {
                tags.push((tag, which));
            }
        }
        drop(tick);
        assert!(seen[0] > 0 && seen[1] > 0, "both versions served whole: {seen:?}");
    });
}

#[test]
fn a_request_that_cannot_get_frames_gets_503_then_serves() {
    // 256 frames of memory; files of 75 pages each: three pinned at once
    // hold 225 frames, a fourth cannot get its 75.
    let (site, bigs) = big_site("disk-full", 4, 75 * 4096);
    let set = crate::fileset::FileSet::open_dir(&site.www, 1).expect("set");
    let get = |i: usize| set.get(&format!("big/{i:03}.bin")).expect("entry");
    let cond = crate::http::Conditions::default();
    let held: Vec<_> = (0..3).map(|i| set.answer(get(i), true, &cond).expect("pinned")).collect();
    assert!(matches!(set.answer(get(3), true, &cond), Err(crate::http::Status::ServiceUnavailable)));
    assert!(set.answer(get(3), false, &cond).is_ok(), "a HEAD pins nothing");
    drop(held);
    let a = set.answer(get(3), true, &cond).expect("room again");
    let (body, range) = a.body.as_ref().expect("a body");
    let mut got = vec![0u8; (range.end - range.start) as usize];
    body.read_at(range.start, &mut got).expect("read the pinned pages");
    assert!(got == bigs[3]);
    let st = set.cache_stats().expect("a page cache");
    assert!(st.resident <= st.budget, "{st:?}");
}

// === curl ===

/// curl, or why a test skips.
fn curl() -> Option<&'static str> {
    match Command::new("curl").arg("--version").output() {
        Ok(o) if o.status.success() => Some("curl"),
        _ => {
            println!("SKIPPED: curl is not installed (.ci/run installs it)");
            None
        }
    }
}

fn run_curl(args: &[&str]) -> Vec<u8> {
    let mut all = vec!["--silent", "--show-error", "--max-time", "20"];
    all.extend_from_slice(args);
    let out = Command::new("curl").args(&all).output().expect("run curl");
    assert!(out.status.success(), "curl {all:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn curl_downloads_ranges_and_resumes(rt: Runtime) {
    let Some(_) = curl() else { return };
    let site = Site::new("curl");
    let srv = site.serve_on(ServerMode { runtime: rt, mode: Mode::LwbufRun }, &[]);
    let url = srv.url("/data.bin");
    assert_eq!(run_curl(&[&url]), site.data);
    assert_eq!(run_curl(&["--range", "100-199", &url]), &site.data[100..200]);
    // A download cut short, then resumed: curl asks for the rest with a
    // Range from the size of the partial file, and appends it.
    let part = site.root.join("part.bin");
    std::fs::write(&part, &site.data[..123_457]).expect("partial file");
    run_curl(&["--continue-at", "-", "--output", path_str(&part), &url]);
    assert_eq!(std::fs::read(&part).expect("resumed file"), site.data, "resumed byte for byte");
    // Headers as curl sees them, and a conditional request.
    let head = String::from_utf8(run_curl(&["--head", &url])).expect("text");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("ETag: ").or_else(|| l.strip_prefix("etag: ")))
        .expect("ETag")
        .trim()
        .to_string();
    let code = run_curl(&[
        "--output",
        "/dev/null",
        "--write-out",
        "%{http_code}",
        "--header",
        &format!("If-None-Match: {etag}"),
        &url,
    ]);
    assert_eq!(code, b"304");
    let code = run_curl(&["--output", "/dev/null", "--write-out", "%{http_code}", "--range", "300000-", &url]);
    assert_eq!(code, b"416");
    // A file already complete: the resume asks for nothing left (416) and
    // curl takes that as done.
    run_curl(&["--continue-at", "-", "--output", path_str(&part), &url]);
    assert_eq!(std::fs::read(&part).expect("file"), site.data);
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Each test on both servers: `NAME::threads` and `NAME::tokio`.
macro_rules! on_both_servers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn threads() {
                super::$name(super::Runtime::Threads)
            }

            #[test]
            fn tokio() {
                super::$name(super::Runtime::Tokio)
            }
        }
    )*};
}

on_both_servers!(
    files_get_their_type_dates_and_validators,
    single_ranges_are_partial_content,
    conditional_requests_answer_not_modified,
    directories_serve_their_index,
    paths_outside_the_directory_are_refused,
    connections_close_as_http_says,
    heads_over_the_limits_get_431,
    connections_over_the_limit_get_503,
    idle_connections_are_closed_with_408,
    curl_downloads_ranges_and_resumes,
    files_changed_on_disk_are_served_as_they_are_now,
    a_file_replaced_while_served_is_never_a_mix,
);
