//! The HTTP/1.1 of a static file server, as plain functions over bytes and
//! file metadata, with no I/O: request parsing within limits (httparse),
//! safe path resolution and routing (`index.html` for directories), the
//! reply a request gets (ranges, conditional requests, `HEAD`), and the
//! response heads. `server.rs` drives it from its event loop; any other
//! server (one per task on an async runtime, say) can drive it the same way:
//!
//! 1. [`parse`] the bytes received so far: need more, a request, or an
//!    error to answer before closing;
//! 2. [`route`] the request's [`Target`] to a file (or a redirect, or 404);
//! 3. [`reply`] decides 200, 206, 304 or 416 from the request's
//!    [`Conditions`] and the file's [`FileMeta`], and [`Reply::body`] says
//!    which bytes of the file follow the head [`write_head`] writes.
//!
//! What it does not do: request bodies (refused with 400), multiple ranges
//! (answered 200 with the whole file, as RFC 9110 allows), `If-Match` and
//! `If-Unmodified-Since` (ignored), directory listings (404).

use std::borrow::Cow;
use std::io::Write;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The `Server` header of every response.
const SERVER: &str = "lwbuf-parallel_sendfile";

/// The most header fields [`Limits::max_headers`] may allow.
pub const HEADERS_CAP: usize = 256;

/// What a request head may hold. Beyond either limit the request is
/// answered 431 and the connection closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes of a request head: request line and header fields.
    pub max_head: usize,
    /// The most header fields (at most [`HEADERS_CAP`]).
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_head: 16 << 10, max_headers: 64 }
    }
}

// === requests ===

/// What a complete request asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// `GET` (false: `HEAD`).
    pub get: bool,
    /// Where, or the error status to answer instead.
    pub target: Result<Target<'a>, Status>,
    /// Keep the connection open after the response (HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`).
    pub keep_alive: bool,
    /// The header fields that make the reply conditional or partial.
    pub cond: Conditions<'a>,
}

/// The request headers [`reply`] looks at, raw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conditions<'a> {
    pub range: Option<&'a [u8]>,
    pub if_range: Option<&'a [u8]>,
    pub if_none_match: Option<&'a [u8]>,
    pub if_modified_since: Option<&'a [u8]>,
}

/// A request target, resolved.
#[derive(Debug, PartialEq, Eq)]
pub struct Target<'a> {
    /// The file key: the percent-decoded path relative to the served
    /// directory, without leading or trailing `/` (empty for `/`).
    /// Borrowed from the request when it needs no decoding.
    pub key: Cow<'a, str>,
    /// The path ended in `/`: it names a directory.
    pub dir: bool,
    /// The path as the request gave it (no query), for redirects.
    pub raw: &'a str,
}

/// The outcome of parsing the start of a connection's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// Need more bytes.
    Partial,
    /// A request of `len` bytes (head only: bodies are not accepted).
    Complete(usize, Request<'a>),
    /// Respond with this status and close.
    Error(Status),
}

/// The error statuses the server sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    HeaderTooLarge,
    ServiceUnavailable,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::RequestTimeout => "408 Request Timeout",
            Status::HeaderTooLarge => "431 Request Header Fields Too Large",
            Status::ServiceUnavailable => "503 Service Unavailable",
        }
    }

    /// Whether a connection may go on after this status (the request was
    /// well framed and the server is not shedding it).
    pub fn keeps_connection(self) -> bool {
        matches!(self, Status::NotFound | Status::MethodNotAllowed)
    }
}

/// Parse one request from the start of `buf`.
pub fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Parsed<'a> {
    let mut headers = [MaybeUninit::<httparse::Header<'a>>::uninit(); HEADERS_CAP];
    let mut req = httparse::Request::new(&mut []);
    let n = match req.parse_with_uninit_headers(buf, &mut headers[..limits.max_headers.min(HEADERS_CAP)]) {
        Ok(httparse::Status::Partial) if buf.len() > limits.max_head => return Parsed::Error(Status::HeaderTooLarge),
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Ok(httparse::Status::Complete(n)) if n > limits.max_head => return Parsed::Error(Status::HeaderTooLarge),
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Error(Status::HeaderTooLarge),
        Err(_) => return Parsed::Error(Status::BadRequest),
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Error(Status::BadRequest);
    };
    let mut keep_alive = version == 1;
    let mut host = false;
    let mut cond = Conditions::default();
    for h in req.headers.iter() {
        let name = h.name;
        let is = |s: &str| name.eq_ignore_ascii_case(s);
        if is("connection") {
            let tokens = || h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii);
            if tokens().any(|t| t.eq_ignore_ascii_case(b"close")) {
                keep_alive = false;
            } else if tokens().any(|t| t.eq_ignore_ascii_case(b"keep-alive")) {
                keep_alive = true;
            }
        } else if is("host") {
            host = true;
        } else if is("range") {
            cond.range = Some(h.value);
        } else if is("if-range") {
            cond.if_range = Some(h.value);
        } else if is("if-none-match") {
            cond.if_none_match = Some(h.value);
        } else if is("if-modified-since") {
            cond.if_modified_since = Some(h.value);
        } else if (is("content-length") && h.value.iter().any(|&b| b != b'0' && b != b' ')) || is("transfer-encoding") {
            // A request body would desynchronise the connection: refuse it.
            return Parsed::Error(Status::BadRequest);
        }
    }
    // RFC 9112, 3.2: a server must answer 400 to an HTTP/1.1 request
    // without `Host`.
    if version == 1 && !host {
        return Parsed::Error(Status::BadRequest);
    }
    let get = match method {
        "GET" => true,
        "HEAD" => false,
        _ => {
            return Parsed::Complete(n, Request { get: true, target: Err(Status::MethodNotAllowed), keep_alive, cond })
        }
    };
    Parsed::Complete(n, Request { get, target: resolve(path), keep_alive, cond })
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Resolve a request target to a file key. Rejected (400): anything not
/// starting with `/` (after an optional `http://authority`), bad or NUL
/// escapes, non-UTF-8, backslashes, `..` segments (also encoded, `%2e%2e`),
/// and empty segments (`//`, which a naive join would take for an absolute
/// path; also encoded, `%2f`). The key only ever indexes the table of files
/// loaded at startup, so nothing outside the directory can be named.
pub fn resolve(target: &str) -> Result<Target<'_>, Status> {
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let raw = target.split(['?', '#']).next().unwrap_or("");
    let Some(path) = raw.strip_prefix('/') else { return Err(Status::BadRequest) };
    // The common case: nothing to decode or normalise, so the key is the
    // path itself (what the general case below would build).
    let plain_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~' | b'/');
    let plain_seg = |seg: &str| !seg.is_empty() && seg != "." && seg != "..";
    if path.bytes().all(plain_byte) && path.split('/').all(plain_seg) {
        return Ok(Target { key: Cow::Borrowed(path), dir: path.is_empty(), raw });
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (Some(h), Some(l)) = (bytes.get(i + 1).and_then(|&b| hex(b)), bytes.get(i + 2).and_then(|&b| hex(b)))
            else {
                return Err(Status::BadRequest);
            };
            decoded.push(h << 4 | l);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(decoded).map_err(|_| Status::BadRequest)?;
    if s.contains(['\0', '\\']) {
        return Err(Status::BadRequest);
    }
    let segs: Vec<&str> = s.split('/').collect();
    let mut parts = Vec::with_capacity(segs.len());
    let mut dir = false;
    for (k, seg) in segs.iter().enumerate() {
        let last = k + 1 == segs.len();
        match *seg {
            "." => dir |= last,
            ".." => return Err(Status::BadRequest),
            "" if last => dir = true,
            "" => return Err(Status::BadRequest),
            _ => parts.push(*seg),
        }
    }
    Ok(Target { key: Cow::Owned(parts.join("/")), dir: dir || parts.is_empty(), raw })
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<T> {
    /// This file.
    File(T),
    /// A directory named without its trailing `/`: redirect (301) to this
    /// path, so that the relative links of its index resolve.
    Redirect(String),
    NotFound,
}

/// Route `t` over the files `lookup` finds by key: a file by its key; a
/// directory (a path ending in `/`, or `/` itself) by its `index.html`; a
/// directory named without the `/` to a redirect. One lookup for a file.
pub fn route<T>(t: &Target<'_>, lookup: impl Fn(&str) -> Option<T>) -> Route<T> {
    if !t.dir {
        if let Some(f) = lookup(&t.key) {
            return Route::File(f);
        }
    }
    let index = if t.key.is_empty() { "index.html".to_string() } else { format!("{}/index.html", t.key) };
    match lookup(&index) {
        Some(f) if t.dir => Route::File(f),
        Some(_) => Route::Redirect(format!("{}/", t.raw)),
        None => Route::NotFound,
    }
}

// === files ===

/// What the replies need to know of a file, computed when it is loaded (or,
/// from disk, when its stat changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMeta {
    pub len: u64,
    /// The modification time, in whole seconds (what HTTP dates carry).
    pub modified: SystemTime,
    /// `modified` as an HTTP date.
    pub last_modified: String,
    /// A strong entity tag (quoted): the modification time to the
    /// nanosecond and the length. The bytes served under one tag never
    /// change: files loaded at startup keep theirs, and a file served from
    /// disk gets a new tag with every change of its stat, its pinned bytes
    /// checked to be of that version.
    pub etag: String,
    /// By the name's extension (`application/octet-stream` if unknown).
    pub content_type: String,
}

impl FileMeta {
    pub fn new(name: &str, len: u64, modified: SystemTime) -> FileMeta {
        let since = modified.duration_since(UNIX_EPOCH).unwrap_or_default();
        let modified = UNIX_EPOCH + Duration::from_secs(since.as_secs());
        let mut content_type = mime_guess::from_path(name).first_or_octet_stream().essence_str().to_string();
        if content_type.starts_with("text/") || content_type == "application/javascript" {
            // What a browser assumes otherwise depends on its locale.
            content_type.push_str("; charset=utf-8");
        }
        FileMeta {
            len,
            modified,
            last_modified: httpdate::fmt_http_date(modified),
            etag: format!("\"{:x}.{:x}-{len:x}\"", since.as_secs(), since.subsec_nanos()),
            content_type,
        }
    }
}

// === replies ===

/// The reply to a `GET` or `HEAD` of an existing file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// 200, the whole file.
    Ok,
    /// 206, these bytes.
    Partial(Range<u64>),
    /// 304: the client's copy is current.
    NotModified,
    /// 416: the range asks for nothing the file has.
    RangeNotSatisfiable,
}

impl Reply {
    /// The bytes of the file that follow the head of a `GET`.
    pub fn body(&self, meta: &FileMeta) -> Option<Range<u64>> {
        match self {
            Reply::Ok => Some(0..meta.len),
            Reply::Partial(r) => Some(r.clone()),
            Reply::NotModified | Reply::RangeNotSatisfiable => None,
        }
    }
}

/// Decide the reply (RFC 9110, 13.2.2): `If-None-Match` (weak comparison)
/// and, without it, `If-Modified-Since` may answer 304; then, for `GET`
/// only, a single `Range` is served (206 or 416) when `If-Range` is absent
/// or matches (a strong entity tag, or exactly the `Last-Modified` date).
/// Anything the server does not understand (a malformed header, another
/// range unit, several ranges) falls back to the whole file, which is
/// always a correct answer.
pub fn reply(get: bool, cond: &Conditions<'_>, meta: &FileMeta) -> Reply {
    if let Some(inm) = cond.if_none_match {
        if etag_list_matches(inm, &meta.etag) {
            return Reply::NotModified;
        }
    } else if let Some(since) = cond.if_modified_since.and_then(http_date) {
        if meta.modified <= since {
            return Reply::NotModified;
        }
    }
    let Some(range) = cond.range.filter(|_| get) else { return Reply::Ok };
    if let Some(v) = cond.if_range {
        if !if_range_matches(v, meta) {
            return Reply::Ok;
        }
    }
    match byte_range(range, meta.len) {
        RangeSpec::One(r) => Reply::Partial(r),
        RangeSpec::Unsatisfiable => Reply::RangeNotSatisfiable,
        RangeSpec::Ignore => Reply::Ok,
    }
}

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeSpec {
    One(Range<u64>),
    Unsatisfiable,
    /// Malformed, another unit, or several ranges: serve the whole file.
    Ignore,
}

/// Parse `bytes=FIRST-LAST`, `bytes=FIRST-` or `bytes=-SUFFIX` against a
/// file of `len` bytes.
pub fn byte_range(v: &[u8], len: u64) -> RangeSpec {
    let Ok(v) = std::str::from_utf8(v) else { return RangeSpec::Ignore };
    let v = v.trim();
    let Some(spec) = v.get(..6).filter(|u| u.eq_ignore_ascii_case("bytes=")).map(|_| v[6..].trim()) else {
        return RangeSpec::Ignore;
    };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.split_once('-') else { return RangeSpec::Ignore };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        // Too many digits for u64: as good as infinite.
        Some(s.parse().unwrap_or(u64::MAX))
    };
    match (a.trim().is_empty(), num(a), num(b)) {
        // `-SUFFIX`: the last SUFFIX bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                RangeSpec::Unsatisfiable
            } else {
                RangeSpec::One(len.saturating_sub(n)..len)
            }
        }
        (false, Some(first), last) if b.trim().is_empty() || last.is_some() => {
            if last.is_some_and(|l| l < first) {
                return RangeSpec::Ignore;
            }
            if first >= len {
                return RangeSpec::Unsatisfiable;
            }
            let end = last.map_or(len, |l| l.saturating_add(1).min(len));
            RangeSpec::One(first..end)
        }
        _ => RangeSpec::Ignore,
    }
}

/// The entity tags of a list (`"a", W/"b"`), each with its `W/` prefix
/// if any; `None` at the first malformed one.
fn etags(v: &[u8]) -> impl Iterator<Item = Option<&[u8]>> {
    let mut rest = v;
    std::iter::from_fn(move || {
        rest = rest.trim_ascii_start();
        while let [b',', tail @ ..] = rest {
            rest = tail.trim_ascii_start();
        }
        if rest.is_empty() {
            return None;
        }
        let start = rest;
        let body = rest.strip_prefix(b"W/").unwrap_or(rest);
        let tag = body.strip_prefix(b"\"").and_then(|b| b.iter().position(|&c| c == b'"')).map(|end| {
            let taken = start.len() - body.len() + end + 2;
            let (tag, tail) = start.split_at(taken);
            rest = tail;
            tag
        });
        if tag.is_none() {
            rest = &[];
        }
        Some(tag)
    })
}

fn is_weak(tag: &[u8]) -> bool {
    tag.starts_with(b"W/")
}

fn opaque(tag: &[u8]) -> &[u8] {
    tag.strip_prefix(b"W/").unwrap_or(tag)
}

/// `If-None-Match`: `*`, or a list one of whose tags matches `etag` by
/// the weak comparison (the opaque tags are equal, `W/` or not).
pub fn etag_list_matches(v: &[u8], etag: &str) -> bool {
    if v.trim_ascii() == b"*" {
        return true;
    }
    etags(v).any(|t| t.is_some_and(|t| opaque(t) == opaque(etag.as_bytes())))
}

/// `If-Range`: a strong entity tag equal to the file's, or an HTTP date
/// exactly its `Last-Modified`.
pub fn if_range_matches(v: &[u8], meta: &FileMeta) -> bool {
    let v = v.trim_ascii();
    if v.starts_with(b"\"") || v.starts_with(b"W/") {
        return !is_weak(v) && v == meta.etag.as_bytes();
    }
    http_date(v) == Some(meta.modified)
}

/// An HTTP date (any of the three formats RFC 9110 accepts).
pub fn http_date(v: &[u8]) -> Option<SystemTime> {
    httpdate::parse_http_date(std::str::from_utf8(v).ok()?.trim()).ok()
}

/// The current time as an HTTP date, formatted once per second.
#[derive(Default)]
pub struct DateCache {
    secs: u64,
    text: String,
}

impl DateCache {
    /// `now` as an HTTP date.
    pub fn at(&mut self, now: SystemTime) -> &str {
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.text.is_empty() || secs != self.secs {
            self.secs = secs;
            self.text = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs));
        }
        &self.text
    }
}

// === response heads ===

fn connection(keep_alive: bool) -> &'static str {
    if keep_alive {
        "keep-alive"
    } else {
        "close"
    }
}

/// Write the head of `reply` for the file `meta` into `out` (cleared
/// first). The same head answers `GET` and `HEAD`; only a `GET` is followed
/// by [`Reply::body`].
pub fn write_head(out: &mut Vec<u8>, reply: &Reply, meta: &FileMeta, date: &str, keep_alive: bool) {
    out.clear();
    let FileMeta { len, last_modified, etag, content_type, .. } = meta;
    let conn = connection(keep_alive);
    // Writing to a Vec cannot fail.
    let _ = match reply {
        Reply::Ok => write!(
            out,
            "HTTP/1.1 200 OK\r\nServer: {SERVER}\r\nDate: {date}\r\nContent-Type: {content_type}\r\n\
             Content-Length: {len}\r\nLast-Modified: {last_modified}\r\nETag: {etag}\r\nAccept-Ranges: bytes\r\n\
             Connection: {conn}\r\n\r\n"
        ),
        Reply::Partial(r) => write!(
            out,
            "HTTP/1.1 206 Partial Content\r\nServer: {SERVER}\r\nDate: {date}\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\nContent-Range: bytes {}-{}/{len}\r\nLast-Modified: {last_modified}\r\n\
             ETag: {etag}\r\nAccept-Ranges: bytes\r\nConnection: {conn}\r\n\r\n",
            r.end - r.start,
            r.start,
            r.end.saturating_sub(1)
        ),
        Reply::NotModified => write!(
            out,
            "HTTP/1.1 304 Not Modified\r\nServer: {SERVER}\r\nDate: {date}\r\nLast-Modified: {last_modified}\r\n\
             ETag: {etag}\r\nConnection: {conn}\r\n\r\n"
        ),
        Reply::RangeNotSatisfiable => write!(
            out,
            "HTTP/1.1 416 Range Not Satisfiable\r\nServer: {SERVER}\r\nDate: {date}\r\nContent-Range: bytes */{len}\r\n\
             Content-Length: 0\r\nAccept-Ranges: bytes\r\nConnection: {conn}\r\n\r\n"
        ),
    };
}

/// Write a complete error response into `out` (cleared first).
pub fn write_error(out: &mut Vec<u8>, status: Status, date: &str, keep_alive: bool) {
    out.clear();
    let line = status.line();
    let conn = connection(keep_alive);
    let extra = match status {
        Status::MethodNotAllowed => "Allow: GET, HEAD\r\n",
        Status::ServiceUnavailable => "Retry-After: 1\r\n",
        _ => "",
    };
    let _ = write!(
        out,
        "HTTP/1.1 {line}\r\nServer: {SERVER}\r\nDate: {date}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n{extra}Connection: {conn}\r\n\r\n{line}\n",
        line.len() + 1
    );
}

/// Write a complete `301 Moved Permanently` to `location` into `out`.
pub fn write_redirect(out: &mut Vec<u8>, location: &str, date: &str, keep_alive: bool) {
    out.clear();
    let conn = connection(keep_alive);
    let _ = write!(
        out,
        "HTTP/1.1 301 Moved Permanently\r\nServer: {SERVER}\r\nDate: {date}\r\nLocation: {location}\r\n\
         Content-Length: 0\r\nConnection: {conn}\r\n\r\n"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str) -> Result<(String, bool), Status> {
        resolve(t).map(|t| (t.key.into_owned(), t.dir))
    }

    #[test]
    fn paths_cannot_escape() {
        assert_eq!(key("/a/b.bin"), Ok(("a/b.bin".into(), false)));
        assert!(matches!(resolve("/a/b.bin").map(|t| t.key), Ok(Cow::Borrowed(_))), "no allocation");
        assert_eq!(key("/a/./b%2Ebin?x=1#f"), Ok(("a/b.bin".into(), false)));
        assert_eq!(key("http://127.0.0.1:8080/f1"), Ok(("f1".into(), false)));
        assert_eq!(key("/sp%20ace"), Ok(("sp ace".into(), false)));
        for bad in [
            "/../etc/passwd",
            "/a/../../x",
            "/%2e%2e/x",
            "/a/%2E%2E/b",
            "/%2e%2e%2fetc%2fpasswd",
            "//etc/passwd",
            "/a//b",
            "/%2Fetc%2Fpasswd",
            "etc/passwd",
            "*",
            "/bad%zz",
            "/trunc%2",
            "/nul%00",
            "/back%5c..%5cx",
            "/%ff%fe",
        ] {
            assert_eq!(key(bad), Err(Status::BadRequest), "{bad}");
        }
        assert_eq!(key("/"), Ok((String::new(), true)));
        assert_eq!(key("/dir/"), Ok(("dir".into(), true)));
        assert_eq!(key("/dir/."), Ok(("dir".into(), true)));
        assert_eq!(resolve("/a%20b/?q").map(|t| t.raw), Ok("/a%20b/"));
    }

    #[test]
    fn directories_route_to_their_index() {
        let files = ["index.html", "f1", "d/index.html", "e/x"];
        let lookup = |k: &str| files.iter().position(|f| *f == k);
        let r = |t: &str| route(&resolve(t).expect("target"), lookup);
        assert_eq!(r("/"), Route::File(0));
        assert_eq!(r("/f1"), Route::File(1));
        assert_eq!(r("/d/"), Route::File(2));
        assert_eq!(r("/d"), Route::Redirect("/d/".into()));
        assert_eq!(r("/d/index.html"), Route::File(2));
        assert_eq!(r("/e/"), Route::NotFound, "no listing");
        assert_eq!(r("/f1/"), Route::NotFound, "a file is not a directory");
        assert_eq!(r("/nope"), Route::NotFound);
    }

    const L: Limits = Limits { max_head: 16 << 10, max_headers: 64 };

    #[test]
    fn requests_parse() {
        let r = parse(b"GET /f1 HTTP/1.1\r\nHost: x\r\n\r\nGET", &L);
        let Parsed::Complete(29, Request { get: true, target: Ok(t), keep_alive: true, cond }) = r else {
            panic!("{r:?}")
        };
        assert_eq!((t.key.as_ref(), cond), ("f1", Conditions::default()));
        let r = parse(b"HEAD /f1 HTTP/1.0\r\n\r\n", &L);
        assert!(matches!(r, Parsed::Complete(_, Request { get: false, keep_alive: false, .. })));
        let r = parse(b"GET /f1 HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", &L);
        assert!(matches!(r, Parsed::Complete(_, Request { keep_alive: true, .. })));
        let r = parse(b"GET /f1 HTTP/1.1\r\nHost: x\r\nConnection: foo, close\r\n\r\n", &L);
        assert!(matches!(r, Parsed::Complete(_, Request { keep_alive: false, .. })));
        assert_eq!(parse(b"GET /f1 HTTP/1.1\r\nHost", &L), Parsed::Partial);
        assert_eq!(parse(b"GARBAGE\r\n\r\n", &L), Parsed::Error(Status::BadRequest));
        assert_eq!(parse(b"GET /f1 HTTP/1.1\r\n\r\n", &L), Parsed::Error(Status::BadRequest), "no Host");
        let body = b"GET /f1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse(body, &L), Parsed::Error(Status::BadRequest));
        let r = parse(b"POST /f1 HTTP/1.1\r\nHost: x\r\n\r\n", &L);
        assert!(matches!(r, Parsed::Complete(_, Request { target: Err(Status::MethodNotAllowed), .. })));
        let r = parse(
            b"GET /f1 HTTP/1.1\r\nHost: x\r\nrange: bytes=1-2\r\nIf-Range: \"e\"\r\nIf-None-Match: *\r\n\
              If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n",
            &L,
        );
        let Parsed::Complete(_, Request { cond, .. }) = r else { panic!("{r:?}") };
        assert_eq!(cond.range, Some(&b"bytes=1-2"[..]));
        assert_eq!(cond.if_range, Some(&b"\"e\""[..]));
        assert_eq!(cond.if_none_match, Some(&b"*"[..]));
        assert_eq!(cond.if_modified_since, Some(&b"Sun, 06 Nov 1994 08:49:37 GMT"[..]));
    }

    #[test]
    fn limits_answer_431() {
        let mut big = b"GET /f1 HTTP/1.1\r\nX: ".to_vec();
        big.resize(L.max_head + 10, b'a');
        assert_eq!(parse(&big, &L), Parsed::Error(Status::HeaderTooLarge), "partial and too large");
        big.extend_from_slice(b"\r\nHost: x\r\n\r\n");
        assert_eq!(parse(&big, &L), Parsed::Error(Status::HeaderTooLarge), "complete and too large");
        let small = Limits { max_head: 1 << 10, max_headers: 3 };
        let mut many = b"GET /f1 HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..2 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        let ok = [&many[..], b"\r\n"].concat();
        assert!(matches!(parse(&ok, &small), Parsed::Complete(..)), "3 headers");
        many.extend_from_slice(b"X-3: y\r\n\r\n");
        assert_eq!(parse(&many, &small), Parsed::Error(Status::HeaderTooLarge), "4 headers");
    }

    #[test]
    fn ranges_parse() {
        use RangeSpec::*;
        assert_eq!(byte_range(b"bytes=0-9", 100), One(0..10));
        assert_eq!(byte_range(b"Bytes=90-", 100), One(90..100));
        assert_eq!(byte_range(b"bytes=90-1000", 100), One(90..100));
        assert_eq!(byte_range(b"bytes=-10", 100), One(90..100));
        assert_eq!(byte_range(b"bytes=-1000", 100), One(0..100));
        assert_eq!(byte_range(b"bytes=99-99", 100), One(99..100));
        assert_eq!(byte_range(b"bytes=0-99999999999999999999999", 100), One(0..100));
        assert_eq!(byte_range(b"bytes=100-", 100), Unsatisfiable);
        assert_eq!(byte_range(b"bytes=-0", 100), Unsatisfiable);
        assert_eq!(byte_range(b"bytes=0-", 0), Unsatisfiable);
        assert_eq!(byte_range(b"bytes=-5", 0), Unsatisfiable);
        for ignored in [
            &b"bytes=5-1"[..],
            b"bytes=0-1,5-6",
            b"items=0-1",
            b"bytes=x-1",
            b"bytes=1",
            b"bytes=-",
            b"bytes = 1-2",
            b"\xff",
        ] {
            assert_eq!(byte_range(ignored, 100), Ignore, "{:?}", String::from_utf8_lossy(ignored));
        }
    }

    #[test]
    fn entity_tags_compare() {
        let e = "\"5f.0-64\"";
        assert!(etag_list_matches(b"*", e));
        assert!(etag_list_matches(b"\"5f.0-64\"", e));
        assert!(etag_list_matches(b"W/\"5f.0-64\"", e), "weak comparison");
        assert!(etag_list_matches(b"\"a\", \"b,c\" ,, W/\"5f.0-64\"", e));
        assert!(!etag_list_matches(b"\"a\", \"b\"", e));
        assert!(!etag_list_matches(b"5f.0-64", e), "unquoted");
        assert!(!etag_list_matches(b"\"a\" junk \"5f.0-64\"", e), "stops at the first malformed tag");
        assert!(!etag_list_matches(b"", e));
    }

    fn meta() -> FileMeta {
        FileMeta::new("a/page.html", 100, UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789))
    }

    #[test]
    fn file_meta() {
        let m = meta();
        assert_eq!(m.modified, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert_eq!(m.last_modified, "Tue, 14 Nov 2023 22:13:20 GMT");
        assert_eq!(m.content_type, "text/html; charset=utf-8");
        assert!(m.etag.starts_with('"') && m.etag.ends_with('"') && m.etag.len() > 4, "{}", m.etag);
        assert_eq!(FileMeta::new("x.png", 1, UNIX_EPOCH).content_type, "image/png");
        assert_eq!(FileMeta::new("noext", 1, UNIX_EPOCH).content_type, "application/octet-stream");
        let other = FileMeta::new("a/page.html", 100, UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_790));
        assert_ne!(m.etag, other.etag, "the tag tells sub-second changes apart");
    }

    #[test]
    fn replies_follow_rfc_9110() {
        let m = meta();
        let lm = m.last_modified.clone();
        let c = |f: fn(&mut Conditions<'static>)| {
            let mut c = Conditions::default();
            f(&mut c);
            c
        };
        // The header values, owned here for the whole test.
        let owned = [
            m.etag.clone(),
            lm.clone(),
            httpdate::fmt_http_date(m.modified - Duration::from_secs(1)),
            format!("W/{}", m.etag),
        ];
        let [etag, lm_b, older, weak] = [0, 1, 2, 3].map(|i| owned[i].as_bytes());

        assert_eq!(reply(true, &Conditions::default(), &m), Reply::Ok);
        let r = Conditions { range: Some(b"bytes=10-19"), ..c(|_| {}) };
        assert_eq!(reply(true, &r, &m), Reply::Partial(10..20));
        assert_eq!(reply(false, &r, &m), Reply::Ok, "HEAD ignores Range");
        let r = Conditions { range: Some(b"bytes=100-"), ..c(|_| {}) };
        assert_eq!(reply(true, &r, &m), Reply::RangeNotSatisfiable);
        // If-None-Match.
        let inm = Conditions { if_none_match: Some(etag), ..c(|_| {}) };
        assert_eq!(reply(true, &inm, &m), Reply::NotModified);
        assert_eq!(reply(false, &inm, &m), Reply::NotModified);
        let inm_other = Conditions { if_none_match: Some(b"\"x\""), if_modified_since: Some(lm_b), ..c(|_| {}) };
        assert_eq!(reply(true, &inm_other, &m), Reply::Ok, "If-None-Match overrides If-Modified-Since");
        // If-Modified-Since.
        let ims = Conditions { if_modified_since: Some(lm_b), ..c(|_| {}) };
        assert_eq!(reply(true, &ims, &m), Reply::NotModified);
        let ims = Conditions { if_modified_since: Some(older), ..c(|_| {}) };
        assert_eq!(reply(true, &ims, &m), Reply::Ok);
        let ims = Conditions { if_modified_since: Some(b"yesterday"), ..c(|_| {}) };
        assert_eq!(reply(true, &ims, &m), Reply::Ok, "an invalid date is ignored");
        // If-Range.
        for (if_range, partial) in [(etag, true), (lm_b, true), (weak, false), (older, false), (&b"\"x\""[..], false)] {
            let ir = Conditions { range: Some(b"bytes=0-0"), if_range: Some(if_range), ..c(|_| {}) };
            let want = if partial { Reply::Partial(0..1) } else { Reply::Ok };
            assert_eq!(reply(true, &ir, &m), want, "If-Range: {}", String::from_utf8_lossy(if_range));
        }
        assert_eq!(Reply::Ok.body(&m), Some(0..100));
        assert_eq!(Reply::Partial(3..4).body(&m), Some(3..4));
        assert_eq!(Reply::NotModified.body(&m), None);
    }

    fn head_of(reply: &Reply, keep: bool) -> (u16, Vec<(String, String)>) {
        let mut out = Vec::new();
        write_head(&mut out, reply, &meta(), "Thu, 01 Jan 2026 00:00:00 GMT", keep);
        parse_response(&out)
    }

    fn parse_response(out: &[u8]) -> (u16, Vec<(String, String)>) {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        assert!(matches!(resp.parse(out), Ok(httparse::Status::Complete(_))));
        let code = resp.code.expect("code");
        (
            code,
            resp.headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                .collect(),
        )
    }

    fn get<'h>(h: &'h [(String, String)], name: &str) -> Option<&'h str> {
        h.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn heads_carry_their_headers() {
        let (code, h) = head_of(&Reply::Ok, true);
        assert_eq!(code, 200);
        assert_eq!(get(&h, "content-length"), Some("100"));
        assert_eq!(get(&h, "content-type"), Some("text/html; charset=utf-8"));
        assert_eq!(get(&h, "last-modified"), Some("Tue, 14 Nov 2023 22:13:20 GMT"));
        assert_eq!(get(&h, "etag"), Some(meta().etag.as_str()));
        assert_eq!(get(&h, "accept-ranges"), Some("bytes"));
        assert_eq!(get(&h, "date"), Some("Thu, 01 Jan 2026 00:00:00 GMT"));
        assert_eq!(get(&h, "connection"), Some("keep-alive"));
        let (code, h) = head_of(&Reply::Partial(10..20), false);
        assert_eq!(code, 206);
        assert_eq!(get(&h, "content-length"), Some("10"));
        assert_eq!(get(&h, "content-range"), Some("bytes 10-19/100"));
        assert_eq!(get(&h, "connection"), Some("close"));
        let (code, h) = head_of(&Reply::NotModified, true);
        assert_eq!(code, 304);
        assert_eq!(get(&h, "content-length"), None, "no body, no length");
        assert!(get(&h, "etag").is_some() && get(&h, "last-modified").is_some());
        let (code, h) = head_of(&Reply::RangeNotSatisfiable, true);
        assert_eq!(code, 416);
        assert_eq!(get(&h, "content-range"), Some("bytes */100"));
        assert_eq!(get(&h, "content-length"), Some("0"));

        let mut out = Vec::new();
        write_error(&mut out, Status::MethodNotAllowed, "d", true);
        let (code, h) = parse_response(&out);
        assert_eq!((code, get(&h, "allow")), (405, Some("GET, HEAD")));
        let body_len: usize = get(&h, "content-length").expect("length").parse().expect("number");
        assert!(out.ends_with(b"405 Method Not Allowed\n") && body_len == "405 Method Not Allowed\n".len());
        write_error(&mut out, Status::ServiceUnavailable, "d", false);
        assert_eq!(parse_response(&out).0, 503);
        write_redirect(&mut out, "/d/", "d", true);
        let (code, h) = parse_response(&out);
        assert_eq!((code, get(&h, "location")), (301, Some("/d/")));
    }

    #[test]
    fn dates_are_cached_per_second() {
        let mut d = DateCache::default();
        let t = UNIX_EPOCH + Duration::from_millis(784_111_777_100);
        assert_eq!(d.at(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(d.at(t + Duration::from_millis(800)), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(d.at(t + Duration::from_secs(1)), "Sun, 06 Nov 1994 08:49:38 GMT");
        assert_eq!(http_date(b"Sunday, 06-Nov-94 08:49:37 GMT"), Some(UNIX_EPOCH + Duration::from_secs(784_111_777)));
    }
}
