//! The writev engine shared by every mapping-based send path, and the
//! classic copy path.
//!
//! The engine walks the runs of a byte range, asks a [`MapSource`] for
//! mappings, queues their addresses as [`IoVec`]s (merging adjacent ones, up
//! to [`IOV_MAX`](super::IOV_MAX) per call and [`SendOptions::batch_bytes`]
//! mapped ahead), and sends them with the public batch calls
//! ([`IoVec::send_vectored`], `MSG_NOSIGNAL`; [`IoVec::write_vectored`] on
//! descriptors that are not sockets), advancing through the pieces on
//! partial writes and polling for `POLLOUT` on `EAGAIN`. A mapping is released as soon as a call has covered its last
//! byte; on any error everything still queued is released before the error
//! is returned.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::os::fd::BorrowedFd;

use super::file::PageFile;
use super::source::{MapSource, Mapped};
use super::sys;
use super::{SendOptions, SendStats};
use crate::error::{Error, Result};
use crate::kaddr::{IoVec, IOV_MAX};

// === IovQueue ===

// std's `thread_local!`, not the sync facade's: a spare buffer shares
// nothing between threads, so there is nothing for a loom model to check.
std::thread_local! {
    /// A spare piece vector per thread, so that a send does not allocate
    /// one (a server thread sends one response after another).
    static SPARE_IOVS: Cell<Vec<IoVec<'static>>> = const { Cell::new(Vec::new()) };
}

/// The most `iovec`s a spare vector keeps room for.
const SPARE_MAX: usize = 4 * IOV_MAX;

/// Pieces waiting to be sent, and the handles that own their memory: an
/// owner is handed back (to drop, or to keep until a completion) once every
/// byte queued up to its end has been sent. The pieces claim `'static`: each
/// lies in a mapping its owner, queued behind it, keeps alive until the
/// piece is sent (or in a buffer the caller lends for the whole send).
pub(crate) struct IovQueue<T> {
    iovs: Vec<IoVec<'static>>,
    /// The first `iovec` not entirely sent.
    head: usize,
    /// `(end, owner)`: the owner's bytes end at queue offset `end`.
    owners: VecDeque<(u64, T)>,
    queued: u64,
    sent: u64,
}

impl<T> IovQueue<T> {
    pub(crate) fn new() -> Self {
        let iovs = SPARE_IOVS.try_with(Cell::take).unwrap_or_default();
        IovQueue { iovs, head: 0, owners: VecDeque::new(), queued: 0, sent: 0 }
    }

    /// Queue `len` bytes at `ptr`, owned by `owner` (if any) until sent.
    /// Adjacent to the previous pending piece, it extends that one.
    ///
    /// # Safety
    /// `ptr..ptr + len` stays readable until those bytes are sent or the
    /// queue is dropped: it lies in `owner`'s mapping, or in one queued
    /// before it, or in a buffer that outlives the queue.
    pub(crate) unsafe fn push(&mut self, ptr: *const u8, len: usize, owner: Option<T>) {
        if len > 0 {
            let merge = self.iovs.len() > self.head
                && self.iovs.last().is_some_and(|l| (l.as_ptr() as usize).wrapping_add(l.len()) == ptr as usize);
            match self.iovs.last_mut() {
                // SAFETY: the previous piece and this one are adjacent, each
                // readable until sent (this function's contract).
                Some(last) if merge => *last = unsafe { IoVec::from_raw_parts(last.as_ptr(), last.len() + len) },
                // SAFETY: readable until sent (this function's contract).
                _ => self.iovs.push(unsafe { IoVec::from_raw_parts(ptr, len) }),
            }
            self.queued += len as u64;
        }
        if let Some(o) = owner {
            self.owners.push_back((self.queued, o));
        }
    }

    /// The next pieces to send (at most `IOV_MAX`).
    pub(crate) fn pending(&self) -> &[IoVec<'static>] {
        &self.iovs[self.head..self.iovs.len().min(self.head + IOV_MAX)]
    }

    pub(crate) fn pending_iovs(&self) -> usize {
        self.iovs.len() - self.head
    }

    pub(crate) fn pending_bytes(&self) -> u64 {
        self.queued - self.sent
    }

    pub(crate) fn is_done(&self) -> bool {
        self.sent == self.queued
    }

    /// Record that the kernel took `n` more bytes; hand every owner whose
    /// bytes are now all sent to `release`, in order.
    pub(crate) fn advance(&mut self, n: usize, mut release: impl FnMut(T)) {
        let n = (n as u64).min(self.pending_bytes());
        self.sent += n;
        let mut left = n as usize;
        while left > 0 && self.head < self.iovs.len() {
            let iov = &mut self.iovs[self.head];
            if left >= iov.len() {
                left -= iov.len();
                self.head += 1;
            } else {
                iov.advance(left);
                left = 0;
            }
        }
        while self.owners.front().is_some_and(|(end, _)| *end <= self.sent) {
            if let Some((_, o)) = self.owners.pop_front() {
                release(o);
            }
        }
        if self.head == self.iovs.len() {
            self.iovs.clear();
            self.head = 0;
        }
    }
}

impl<T> Drop for IovQueue<T> {
    fn drop(&mut self) {
        let mut iovs = std::mem::take(&mut self.iovs);
        if iovs.capacity() <= SPARE_MAX {
            iovs.clear();
            // A thread being torn down just frees it.
            let _ = SPARE_IOVS.try_with(|c| c.set(iovs));
        }
    }
}

// === output helpers ===

/// A socket (sent to with `sendmsg(MSG_NOSIGNAL)`) or, once `ENOTSOCK` said
/// otherwise, any other descriptor (sent to with `writev`).
pub(crate) struct Out<'a> {
    pub(crate) fd: BorrowedFd<'a>,
    socket: bool,
}

impl<'a> Out<'a> {
    pub(crate) fn new(fd: BorrowedFd<'a>) -> Self {
        Out { fd, socket: true }
    }

    /// One send call of the pending pieces with `flags` (sockets only).
    pub(crate) fn send_iov(&mut self, iov: &[IoVec<'_>], flags: i32) -> io::Result<usize> {
        if self.socket {
            match IoVec::send_vectored(self.fd, iov, flags) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => self.socket = false,
                r => return r,
            }
        }
        IoVec::write_vectored(self.fd, iov)
    }
}

/// Wait until `fd` can take more bytes, or fail with [`Error::TimedOut`].
pub(crate) fn wait_writable(fd: BorrowedFd<'_>, opts: &SendOptions) -> Result<()> {
    let revents = sys::poll(fd, libc::POLLOUT, opts.stall_timeout).map_err(|e| sys_err("poll", e))?;
    if revents == 0 {
        return Err(Error::TimedOut);
    }
    // POLLERR/POLLHUP: the next send reports the error itself.
    Ok(())
}

pub(crate) fn sys_err(op: &'static str, source: io::Error) -> Error {
    Error::Sys { op, source }
}

/// What to do with an error of a send call: retry, wait, or give up.
pub(crate) enum Step {
    Retry,
    Wait,
    Fail(Error),
}

pub(crate) fn classify(op: &'static str, e: io::Error) -> Step {
    match e.kind() {
        io::ErrorKind::Interrupted => Step::Retry,
        io::ErrorKind::WouldBlock => Step::Wait,
        _ => Step::Fail(sys_err(op, e)),
    }
}

/// Send all of `buf` with `send(flags | MSG_NOSIGNAL)` (or `write` on a
/// non-socket), waiting on `EAGAIN`.
pub(crate) fn send_all(
    out: &mut Out<'_>,
    buf: &[u8],
    flags: i32,
    opts: &SendOptions,
    st: &mut SendStats,
) -> Result<()> {
    let mut q: IovQueue<()> = IovQueue::new();
    // SAFETY: `buf` outlives `q`, a local.
    unsafe { q.push(buf.as_ptr(), buf.len(), None) };
    drain_queue(out, &mut q, flags, opts, st, |_| {})
}

/// Send everything queued in `q` (plain `sendmsg`/`writev`), releasing
/// owners as their bytes go.
pub(crate) fn drain_queue<T>(
    out: &mut Out<'_>,
    q: &mut IovQueue<T>,
    flags: i32,
    opts: &SendOptions,
    st: &mut SendStats,
    mut release: impl FnMut(T),
) -> Result<()> {
    while !q.is_done() {
        match out.send_iov(q.pending(), flags) {
            Ok(0) => return Err(sys_err("sendmsg", io::Error::from(io::ErrorKind::WriteZero))),
            Ok(n) => {
                st.calls += 1;
                st.bytes += n as u64;
                q.advance(n, &mut release);
            }
            Err(e) => match classify("sendmsg", e) {
                Step::Retry => {}
                Step::Wait => {
                    st.waits += 1;
                    wait_writable(out.fd, opts)?;
                }
                Step::Fail(e) => return Err(e),
            },
        }
    }
    Ok(())
}

// === the mapping-based path ===

/// Send `header` and then bytes `range` of `file` to `sock` from mappings
/// made by `source`: `writev` (as `sendmsg(MSG_NOSIGNAL)`) of up to
/// `IOV_MAX` mapped regions per call.
///
/// Works on blocking and non-blocking sockets (on `EAGAIN` it polls for
/// `POLLOUT`, at most [`SendOptions::stall_timeout`] per wait). Returns what
/// was sent; on error (`ECONNRESET`, `EPIPE`, ... as [`Error::Sys`]) every
/// mapping is released before returning. Costs one send call per
/// `IOV_MAX` regions or [`SendOptions::batch_bytes`], plus whatever `source`
/// costs per mapping.
pub fn send_mapped<M: MapSource>(
    sock: BorrowedFd<'_>,
    file: &PageFile,
    range: Range<u64>,
    header: &[u8],
    source: &M,
    opts: &SendOptions,
) -> Result<SendStats> {
    let runs = file.runs(range)?;
    let mut out = Out::new(sock);
    let mut st = SendStats::default();
    let mut q: IovQueue<M::Mapping<'_>> = IovQueue::new();
    // SAFETY: `header` outlives `q`, a local.
    unsafe { q.push(header.as_ptr(), header.len(), None) };
    let fs = file.page_size();
    let grid = source.run_grid();
    let mut prefault = source.prefault(super::source::private::Token).map(|p| crate::kaddr::Prefaulter::new(p.0));
    for run in runs {
        // The pages to ask for: from `idx` to the end of the piece, or with
        // a grid, the chunk of the allocation run that holds page `idx`.
        let chunks = run.chunks(file, grid);
        let (mut idx, mut off, mut left) = (run.index, run.offset, run.len);
        while left > 0 {
            let Range { start: from, end: to } = chunks.at(idx);
            let ask = file.pages_at(from..to);
            let m = match source.map(ask) {
                Ok(m) => m,
                // Nothing free: send and release what this request holds,
                // then ask once more (never hold some while waiting for more).
                Err(e) if no_room(&e) && !q.is_done() => {
                    drain_queue(&mut out, &mut q, 0, opts, &mut st, drop)?;
                    if let Some(pf) = prefault.as_mut() {
                        pf.forget();
                    }
                    continue;
                }
                // Nothing held: now the source may wait for room.
                Err(e) if no_room(&e) => source.map_idle(ask)?,
                Err(e) => return Err(e),
            };
            st.mappings += 1;
            let npages = check_mapping(&m, fs, ask.len())?;
            let skip = idx - from;
            if npages <= skip {
                return Err(Error::config(
                    "MapSource",
                    format!("mapped {npages} pages of a chunk of {}: not up to page {skip}", ask.len()),
                ));
            }
            let at = skip * fs + off;
            let take = left.min(npages * fs - at);
            if let Some(pf) = prefault.as_mut() {
                // SAFETY: `at + take` is within the mapping (`check_mapping`
                // counted its pages), which `m` keeps mapped; so does every
                // mapping touched since the last drain (queued with it).
                unsafe { pf.touch(m.as_ptr().wrapping_add(at), take) };
            }
            // SAFETY: as above; `m`, queued as the owner of these bytes,
            // keeps them mapped until they are sent.
            unsafe { q.push(m.as_ptr().wrapping_add(at), take, Some(m)) };
            idx = from + npages;
            off = 0;
            left -= take;
            if q.pending_iovs() >= IOV_MAX || q.pending_bytes() >= opts.batch_bytes as u64 {
                drain_queue(&mut out, &mut q, 0, opts, &mut st, drop)?;
                if let Some(pf) = prefault.as_mut() {
                    pf.forget();
                }
            }
        }
    }
    drain_queue(&mut out, &mut q, 0, opts, &mut st, drop)?;
    Ok(st)
}

/// Whether a [`MapSource`] error means "nothing free now": release what is
/// held and ask again (the window or the mapping budget is full, a no-wait
/// pool is empty, or the kernel's `ENOMEM` at the `vm.max_map_count` wall).
pub(crate) fn no_room(e: &Error) -> bool {
    matches!(e, Error::WindowFull { .. } | Error::MapLimit { .. } | Error::WouldBlock)
        || e.errno() == Some(libc::ENOMEM)
}

/// Pages a mapping covers, checked against what was asked.
pub(crate) fn check_mapping(m: &impl Mapped, fs: usize, asked: usize) -> Result<usize> {
    let len = m.len();
    if len == 0 || len % fs != 0 || len / fs > asked || m.as_ptr().is_null() {
        return Err(Error::config(
            "MapSource",
            format!("mapped {len} bytes for a run of {asked} pages of {fs} bytes: not 1..={asked} whole pages"),
        ));
    }
    Ok(len / fs)
}

// === the copy path ===

/// The classic read/write server: copy `range` of `file` out of the direct
/// map into `buf` (grown to [`SendOptions::copy_buffer`] bytes, at least the
/// header) and `send` it, one buffer at a time, `header` in the first.
/// [`Error::NoDirectMap`] without a direct map. One send call per buffer.
pub fn send_copy(
    sock: BorrowedFd<'_>,
    file: &PageFile,
    range: Range<u64>,
    header: &[u8],
    buf: &mut Vec<u8>,
    opts: &SendOptions,
) -> Result<SendStats> {
    file.runs(range.clone())?;
    let cap = opts.copy_buffer.max(header.len()).max(4096);
    if buf.len() < cap {
        buf.resize(cap, 0);
    }
    let mut out = Out::new(sock);
    let mut st = SendStats::default();
    let mut pos = range.start;
    let mut fill = header.len();
    buf[..fill].copy_from_slice(header);
    loop {
        let n = ((range.end - pos) as usize).min(cap - fill);
        file.read_at(pos, &mut buf[fill..fill + n])?;
        pos += n as u64;
        fill += n;
        if fill == 0 {
            break;
        }
        send_all(&mut out, &buf[..fill], 0, opts, &mut st)?;
        fill = 0;
        if pos == range.end {
            break;
        }
    }
    Ok(st)
}
