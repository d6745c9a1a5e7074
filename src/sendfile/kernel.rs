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

#[derive(Debug)]
struct Held {
    pages: Vec<Page>,
    /// TCP: released once `tcpi_bytes_acked` reaches this. Taken by the
    /// first `reap` after the send (`None` until then).
    mark: Option<u64>,
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
/// - Any socket: once `SIOCOUTQ` reads 0, everything is released (TCP:
///   every byte was acknowledged; Unix: the peer read everything).
/// - TCP, queue not empty: the first [`reap`](Self::reap) after a send marks
///   it with the connection's queued-byte count then (`SIOCOUTQ` +
///   `tcpi_bytes_acked`, read in that order so the mark can only be late);
///   it is released once `tcpi_bytes_acked` reaches the mark, or the
///   connection is closed (its queues are purged). A late mark holds pages a
///   little longer, never too short, and costs no system call in `send`.
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
/// change what a slow local reader gets (measured: all 65,536 bytes of an
/// acknowledged, unread 64 KiB `sendfile` changed). Over a real NIC the acknowledged
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
            let pages = file.pages_at(first..last + 1).to_vec();
            self.pages += pages.len();
            // Held before the first call, so an error part-way still holds them.
            self.held.push_back(Held { pages, mark: None });
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
        result.map(|()| st)
    }

    /// Release the holds of requests whose data has left. Returns the pages
    /// released. No system call when nothing is held; one `ioctl` when the
    /// send queue is empty; one `getsockopt(TCP_INFO)` more otherwise.
    pub fn reap(&mut self, sock: BorrowedFd<'_>) -> Result<usize> {
        if self.held.is_empty() {
            return Ok(0);
        }
        // An error (e.g. a pipe) says nothing: keep holding.
        let Ok(queued) = sys::outq(sock) else { return Ok(0) };
        let acked = if queued == 0 {
            // Empty send queue: every byte was acknowledged (TCP) or read (Unix).
            u64::MAX
        } else {
            match sys::tcp_ack(sock).ok().flatten() {
                Some(a) if a.closed => u64::MAX,
                Some(a) => {
                    // `queued` was read first: acknowledgements since then make
                    // the mark late (longer hold), never early.
                    let mark = a.bytes_acked + queued as u64;
                    for h in self.held.iter_mut().rev() {
                        if h.mark.is_some() {
                            break;
                        }
                        h.mark = Some(mark);
                    }
                    a.bytes_acked
                }
                None => return Ok(0),
            }
        };
        let mut released = 0;
        while self.held.front().is_some_and(|h| acked == u64::MAX || h.mark.is_some_and(|m| m <= acked)) {
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
        // A deadline the clock cannot hold is no deadline.
        let deadline = Instant::now().checked_add(timeout);
        let mut nap = Duration::from_micros(50);
        loop {
            self.reap(sock)?;
            if self.held.is_empty() {
                return Ok(());
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(l) if !l.is_zero() => l,
                    _ => return Err(Error::TimedOut),
                },
                None => Duration::MAX,
            };
            std::thread::sleep(nap.min(left));
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
