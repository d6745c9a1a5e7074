//! Kernel `sendfile(2)` from the memfd, and the holds that keep the pages it
//! sent alive until the data has left.

use std::collections::VecDeque;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use super::engine::{classify, send_all, sys_err, wait_writable, Out, Step};
use super::file::PageFile;
use super::sys;
use super::{SendOptions, SendStats};
use crate::error::{Error, Result};
use crate::phys::Page;

/// The most one `sendfile(2)` call moves on Linux.
const SENDFILE_MAX: usize = 0x7fff_f000;

/// When a held request's data has left.
#[derive(Clone, Copy, Debug)]
enum Mark {
    /// TCP: once the peer has acknowledged this many bytes of the
    /// connection (`tcpi_bytes_acked`), or the connection is closed.
    Acked(u64),
    /// Other sockets: once `SIOCOUTQ` reads 0 (for a Unix socket: the peer
    /// has read everything).
    OutqEmpty,
}

#[derive(Debug)]
struct Held {
    pages: Vec<Page>,
    mark: Mark,
}

/// Kernel `sendfile(2)` for one connection, with the holds it needs.
///
/// `sendfile(2)` does not copy: it hands the page-cache pages (here: frames
/// of the memfd) to the socket **by reference**, and they are read again
/// whenever the stack builds or retransmits a segment. Overwriting a frame
/// after `sendfile` returned changes the bytes the receiver sees (measured:
/// 65,536 of 65,536). So every request's pages stay held (a [`Page`] clone
/// each, which keeps the frame from being reused) until its data has left:
///
/// - TCP: until the peer has acknowledged every byte queued on the socket up
///   to the end of the request (`TCP_INFO` `tcpi_bytes_acked` against a mark
///   taken right after the last `sendfile`; `SIOCOUTQ == 0` releases all), or
///   the connection is closed (its queues are purged).
/// - Other sockets: until `SIOCOUTQ` reads 0.
///
/// Release happens in [`reap`](Self::reap) (called at the start of every
/// [`send`](Self::send); no system call while nothing is held) or
/// [`wait_drained`](Self::wait_drained). Dropping the holder with pages
/// still held **leaks** those holds: a frame the kernel may still read is
/// never reused (call `wait_drained` before closing to avoid it).
///
/// Caveat, loopback and other local paths: a TCP acknowledgement means the
/// receiving *stack* has the data, not that the receiving *process* read it.
/// Over loopback the segment queued at the receiver may still point at the
/// sender's pages, so an acknowledged page that is overwritten can still
/// change what a slow local reader gets. Over a real NIC the acknowledged
/// data is in the remote host's memory. A page cache whose pages are not
/// rewritten while files are served (as here) is not affected.
///
/// `sendfile(2)` takes no `MSG_NOSIGNAL`: a send to a reset connection
/// raises `SIGPIPE`, which Rust programs ignore by default; other hosts
/// should call [`ignore_sigpipe`](super::ignore_sigpipe).
#[derive(Debug, Default)]
pub struct SendfileHolds {
    held: VecDeque<Held>,
    pages: usize,
}

impl SendfileHolds {
    /// No holds.
    pub fn new() -> Self {
        Self::default()
    }

    /// Pages held now (a page held by two requests counts twice).
    pub fn held_pages(&self) -> usize {
        self.pages
    }

    /// Requests whose pages are held.
    pub fn held_requests(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Send `header` (with `MSG_MORE`, so it leaves in the first segment of
    /// the data), then `range` of `file` with `sendfile(2)` from the memfd:
    /// one call per run of contiguous frames (adjacent runs are merged),
    /// more only if the socket takes less. Waits on `EAGAIN` as
    /// [`send_mapped`](super::send_mapped) does.
    ///
    /// The pages of the range are held from the first call on, also when the
    /// send fails part-way (the kernel may hold some of them already).
    /// [`Error::Config`] for a heap-backed `PhysMem` (no memfd).
    pub fn send(
        &mut self,
        sock: BorrowedFd<'_>,
        file: &PageFile,
        range: Range<u64>,
        header: &[u8],
        opts: &SendOptions,
    ) -> Result<SendStats> {
        let runs = file.runs(range.clone())?;
        let memfd = file.phys().memfd().ok_or_else(|| Error::config("backing", "sendfile needs a memfd"))?;
        self.reap(sock)?;
        let mut out = Out::new(sock);
        let mut st = SendStats::default();
        if !range.is_empty() {
            let fs = file.page_size() as u64;
            let first = (range.start / fs) as usize;
            let last = ((range.end - 1) / fs) as usize;
            let pages = file.pages()[first..=last].to_vec();
            self.pages += pages.len();
            // Held before the first call, so an error part-way still holds them.
            self.held.push_back(Held { pages, mark: Mark::Acked(u64::MAX) });
        }
        let result = (|| {
            let more = if range.is_empty() { 0 } else { libc::MSG_MORE };
            send_all(&mut out, header, more, opts, &mut st)?;
            // Merge runs that happen to be adjacent in the memfd.
            let mut pending: Option<(u64, u64)> = None;
            for run in runs {
                let (off, len) = (run.phys_offset(), run.len as u64);
                pending = match pending {
                    Some((o, l)) if o + l == off => Some((o, l + len)),
                    Some((o, l)) => {
                        sendfile_all(sock, memfd, o, l, opts, &mut st)?;
                        Some((off, len))
                    }
                    None => Some((off, len)),
                };
            }
            if let Some((o, l)) = pending {
                sendfile_all(sock, memfd, o, l, opts, &mut st)?;
            }
            Ok(())
        })();
        if !range.is_empty() {
            // Every byte this request queued is in the socket now (or never
            // will be): the mark is safe to take.
            let mark = queued_mark(sock);
            if let Some(h) = self.held.back_mut() {
                h.mark = mark;
            }
        }
        result.map(|()| st)
    }

    /// Release the holds of requests whose data has left. Returns the pages
    /// released. No system call when nothing is held; one `ioctl` when the
    /// send queue is empty; one `getsockopt` more otherwise.
    pub fn reap(&mut self, sock: BorrowedFd<'_>) -> Result<usize> {
        if self.held.is_empty() {
            return Ok(0);
        }
        // Empty send queue: every byte was acknowledged (TCP) or read (Unix).
        // An error (e.g. a pipe) says nothing: keep holding.
        let all = matches!(sys::outq(sock), Ok(0));
        let ack = if all { None } else { sys::tcp_ack(sock).ok().flatten() };
        let mut released = 0;
        while let Some(h) = self.held.front() {
            let done = all
                || match (h.mark, ack) {
                    (Mark::Acked(m), Some(a)) => a.closed || a.bytes_acked >= m,
                    _ => false,
                };
            if !done {
                break;
            }
            if let Some(h) = self.held.pop_front() {
                released += h.pages.len();
                self.pages -= h.pages.len();
            }
        }
        Ok(released)
    }

    /// Wait until every hold is released, checking every few hundred
    /// microseconds (acknowledgements raise no event to wait for).
    /// [`Error::TimedOut`] if some are still held after `timeout`.
    pub fn wait_drained(&mut self, sock: BorrowedFd<'_>, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut nap = Duration::from_micros(50);
        loop {
            self.reap(sock)?;
            if self.held.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::TimedOut);
            }
            std::thread::sleep(nap.min(deadline - now));
            nap = (nap * 2).min(Duration::from_millis(5));
        }
    }
}

impl Drop for SendfileHolds {
    fn drop(&mut self) {
        // Pages the kernel may still read must never be reused: leak them.
        for h in self.held.drain(..) {
            std::mem::forget(h.pages);
        }
    }
}

/// `sendfile(2)` `len` bytes from memfd offset `off`, however many calls it
/// takes.
fn sendfile_all(
    sock: BorrowedFd<'_>,
    memfd: BorrowedFd<'_>,
    off: u64,
    len: u64,
    opts: &SendOptions,
    st: &mut SendStats,
) -> Result<()> {
    let mut offset = off as i64;
    let end = off + len;
    while (offset as u64) < end {
        let count = ((end - offset as u64) as usize).min(SENDFILE_MAX);
        match sys::sendfile(sock, memfd, &mut offset, count) {
            Ok(0) => return Err(sys_err("sendfile", std::io::Error::from(std::io::ErrorKind::WriteZero))),
            Ok(n) => {
                st.calls += 1;
                st.bytes += n as u64;
            }
            Err(e) => match classify("sendfile", e) {
                Step::Retry => {}
                Step::Wait => {
                    st.waits += 1;
                    wait_writable(sock, opts)?;
                }
                Step::Fail(e) => return Err(e),
            },
        }
    }
    Ok(())
}

/// The connection's queued-byte count now, as a point in `tcpi_bytes_acked`
/// (acknowledged + `SIOCOUTQ`, sampled so that no acknowledgement raced the
/// reading; if one keeps racing, the later count, which can only be later
/// than the truth). Not TCP (or no `TCP_INFO`): wait for an empty queue.
fn queued_mark(sock: BorrowedFd<'_>) -> Mark {
    let mut best = None;
    for _ in 0..4 {
        let (Ok(Some(a1)), Ok(q), Ok(Some(a2))) = (sys::tcp_ack(sock), sys::outq(sock), sys::tcp_ack(sock)) else {
            return Mark::OutqEmpty;
        };
        if a1.bytes_acked == a2.bytes_acked {
            return Mark::Acked(a1.bytes_acked + q as u64);
        }
        best = Some(a2.bytes_acked + q as u64);
    }
    best.map_or(Mark::OutqEmpty, Mark::Acked)
}
