//! The HTTP/1.1 pieces of the server: request parsing (httparse), safe path
//! resolution, and response heads.

use std::borrow::Cow;
use std::io::Write;

/// The most header bytes a request may have.
pub const MAX_HEAD: usize = 16 << 10;

/// What a complete request asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// `GET` (false: `HEAD`).
    pub get: bool,
    /// The file key (a relative path), or why there is none. Borrowed from
    /// the request when it needs no decoding (no allocation).
    pub target: Result<Cow<'a, str>, Status>,
    /// Keep the connection open after the response.
    pub keep_alive: bool,
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
    HeaderTooLarge,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::HeaderTooLarge => "431 Request Header Fields Too Large",
        }
    }
}

/// Parse one request from the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed<'_> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Parsed::Error(Status::HeaderTooLarge),
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Error(Status::HeaderTooLarge),
        Err(_) => return Parsed::Error(Status::BadRequest),
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Error(Status::BadRequest);
    };
    let mut keep_alive = version == 1;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.split(',').any(|t| t.trim() == "close") {
                keep_alive = false;
            } else if v.split(',').any(|t| t.trim() == "keep-alive") {
                keep_alive = true;
            }
        }
        // A request body would desynchronise the connection: refuse it.
        let body = (h.name.eq_ignore_ascii_case("content-length") && h.value.iter().any(|&b| b != b'0' && b != b' '))
            || h.name.eq_ignore_ascii_case("transfer-encoding");
        if body {
            return Parsed::Error(Status::BadRequest);
        }
    }
    let get = match method {
        "GET" => true,
        "HEAD" => false,
        _ => return Parsed::Complete(n, Request { get: true, target: Err(Status::MethodNotAllowed), keep_alive }),
    };
    Parsed::Complete(n, Request { get, target: resolve(path), keep_alive })
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The file key of a request target: the percent-decoded path relative to
/// the served directory. Rejected (400): anything not starting with `/`
/// (after an optional `http://authority`), bad or NUL escapes, non-UTF-8,
/// backslashes, `..` segments, and empty segments (`//`, which a naive join
/// would take for an absolute path). The key only ever indexes the table of
/// files loaded at startup, so nothing outside the directory can be named.
pub fn resolve(target: &str) -> Result<Cow<'_, str>, Status> {
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = target.split(['?', '#']).next().unwrap_or("");
    let Some(path) = path.strip_prefix('/') else { return Err(Status::BadRequest) };
    // The common case: nothing to decode or normalise, so the key is the
    // path itself (what the general case below would build).
    let plain_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~' | b'/');
    let plain_seg = |seg: &str| !seg.is_empty() && seg != "." && seg != "..";
    if path.bytes().all(plain_byte) && path.split('/').all(plain_seg) {
        return Ok(Cow::Borrowed(path));
    }
    let raw = path.as_bytes();
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let (Some(h), Some(l)) = (raw.get(i + 1).and_then(|&b| hex(b)), raw.get(i + 2).and_then(|&b| hex(b)))
            else {
                return Err(Status::BadRequest);
            };
            bytes.push(h << 4 | l);
            i += 3;
        } else {
            bytes.push(raw[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(bytes).map_err(|_| Status::BadRequest)?;
    if s.contains(['\0', '\\']) {
        return Err(Status::BadRequest);
    }
    let segs: Vec<&str> = s.split('/').collect();
    let mut parts = Vec::with_capacity(segs.len());
    for (k, seg) in segs.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => return Err(Status::BadRequest),
            "" if k + 1 == segs.len() => {}
            "" => return Err(Status::BadRequest),
            _ => parts.push(*seg),
        }
    }
    if parts.is_empty() {
        return Err(Status::NotFound);
    }
    Ok(Cow::Owned(parts.join("/")))
}

/// Write a `200 OK` head for a body of `len` bytes into `out`.
pub fn ok_head(out: &mut Vec<u8>, len: u64, keep_alive: bool) {
    out.clear();
    let conn = if keep_alive { "keep-alive" } else { "close" };
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\nServer: lwbuf-parallel_sendfile\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {len}\r\nConnection: {conn}\r\n\r\n"
    );
}

/// A complete error response.
pub fn error_response(status: Status, keep_alive: bool) -> Vec<u8> {
    let body = format!("{}\n", status.line());
    let conn = if keep_alive { "keep-alive" } else { "close" };
    let allow = if status == Status::MethodNotAllowed { "Allow: GET, HEAD\r\n" } else { "" };
    format!(
        "HTTP/1.1 {}\r\nServer: lwbuf-parallel_sendfile\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         {allow}Connection: {conn}\r\n\r\n{body}",
        status.line(),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_escape() {
        assert_eq!(resolve("/a/b.bin"), Ok("a/b.bin".into()));
        assert_eq!(resolve("/a/./b%2Ebin?x=1#f"), Ok("a/b.bin".into()));
        assert_eq!(resolve("http://127.0.0.1:8080/f1"), Ok("f1".into()));
        assert_eq!(resolve("/sp%20ace"), Ok("sp ace".into()));
        for bad in [
            "/../etc/passwd",
            "/a/../../x",
            "/%2e%2e/x",
            "/a/%2E%2E/b",
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
            assert_eq!(resolve(bad), Err(Status::BadRequest), "{bad}");
        }
        assert_eq!(resolve("/"), Err(Status::NotFound));
        assert_eq!(resolve("/dir/"), Ok("dir".into()));
    }

    #[test]
    fn requests_parse() {
        let r = parse(b"GET /f1 HTTP/1.1\r\nHost: x\r\n\r\nGET");
        assert_eq!(r, Parsed::Complete(29, Request { get: true, target: Ok("f1".into()), keep_alive: true }));
        let r = parse(b"HEAD /f1 HTTP/1.0\r\n\r\n");
        assert!(matches!(r, Parsed::Complete(_, Request { get: false, keep_alive: false, .. })));
        let r = parse(b"GET /f1 HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(matches!(r, Parsed::Complete(_, Request { keep_alive: false, .. })));
        assert_eq!(parse(b"GET /f1 HTTP/1.1\r\nHost"), Parsed::Partial);
        assert_eq!(parse(b"GARBAGE\r\n\r\n"), Parsed::Error(Status::BadRequest));
        assert_eq!(parse(b"GET /f1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"), Parsed::Error(Status::BadRequest));
        let r = parse(b"POST /f1 HTTP/1.1\r\n\r\n");
        assert!(matches!(r, Parsed::Complete(_, Request { target: Err(Status::MethodNotAllowed), .. })));
        let mut big = b"GET /f1 HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(parse(&big), Parsed::Error(Status::HeaderTooLarge));
    }
}
