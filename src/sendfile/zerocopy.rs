//! `MSG_ZEROCOPY`: send from mapped pages without a copy, holding the pages
//! until the kernel's completion notification.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use super::engine::{check_mapping, classify, no_room, send_all, sys_err, IovQueue, Out, Step};
use super::file::PageFile;
use super::source::{DirectMapSource, MapSource, Mapped};
use super::sys::{self, ZcNotice};
use super::{SendOptions, SendStats};
use crate::error::{Error, Result};
use crate::kaddr::IOV_MAX;
use crate::phys::Page;

/// Counters of a [`ZeroCopy`] sender.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ZeroCopyStats {
    /// `sendmsg(MSG_ZEROCOPY)` calls that queued bytes (each gets a send id).
    pub sends: u64,
    /// Send ids the kernel reported complete.
    pub completed: u64,
    /// Of those, ids the kernel reported as copied after all
    /// (`SO_EE_CODE_ZEROCOPY_COPIED`): every one on loopback.
    pub copied: u64,
    /// Completion messages read from the error queue (one may cover a range
    /// of ids).
    pub notifications: u64,
}

impl std::ops::AddAssign for ZeroCopyStats {
    fn add_assign(&mut self, o: ZeroCopyStats) {
        self.sends += o.sends;
        self.completed += o.completed;
        self.copied += o.copied;
        self.notifications += o.notifications;
    }
}

/// Holds on the pages of one mapping, kept until the send that took its
/// last byte (and every earlier one) is complete.
struct Held {
    pages: Vec<Page>,
    bytes: usize,
}

/// One `sendmsg(MSG_ZEROCOPY)` call: its send id and the holds of the
/// mappings whose last byte it took.
struct InFlight {
    id: u32,
    done: bool,
    held: Vec<Held>,
}

/// `MSG_ZEROCOPY` sending for one connection.
///
/// [`new`](Self::new) sets `SO_ZEROCOPY`; [`send`](Self::send) sends from
/// mappings made by the source (the direct map by default) with
/// `sendmsg(MSG_ZEROCOPY | MSG_NOSIGNAL)`. The kernel pins the pages instead
/// of copying them: it takes references on the frames behind the addresses
/// during the call, so a mapping is released as soon as the call that took
/// its last byte returns (as in the writev engine), but the frames must
/// keep their contents until the kernel is done. So each call's pages (a
/// [`Page`] clone each, which keeps the frame from being reused) are held
/// until its completion arrives on the socket's error
/// queue (`recvmsg(MSG_ERRQUEUE)`: a `sock_extended_err` with origin
/// `SO_EE_ORIGIN_ZEROCOPY` and the range of completed send ids in
/// `ee_info..=ee_data`). Holds are released in send order, when a send and
/// all before it are complete. Completions are read by [`reap`](Self::reap)
/// (at the start of every send, and whenever a send waits) and
/// [`flush`](Self::flush).
///
/// On loopback the kernel copies anyway (each completion carries
/// `SO_EE_CODE_ZEROCOPY_COPIED`, counted in [`ZeroCopyStats::copied`]):
/// the lifecycle is real, the speed-up is not.
///
/// This must be the only `MSG_ZEROCOPY` sender on the socket (send ids are
/// a per-socket counter it mirrors). Dropping it with sends in flight
/// **leaks** their holds (a frame the kernel may still read is never
/// reused): [`flush`](Self::flush) first.
pub struct ZeroCopy<'s, M: MapSource = DirectMapSource> {
    source: &'s M,
    next_id: u32,
    inflight: VecDeque<InFlight>,
    held_pages: usize,
    held_bytes: usize,
    stats: ZeroCopyStats,
    notices: Vec<ZcNotice>,
}

impl<'s, M: MapSource> ZeroCopy<'s, M> {
    /// Enable `SO_ZEROCOPY` on `sock` (a TCP socket on which nothing was sent
    /// with `MSG_ZEROCOPY` yet) and send from mappings of `source`.
    pub fn new(sock: BorrowedFd<'_>, source: &'s M) -> Result<Self> {
        sys::set_zerocopy(sock).map_err(|e| sys_err("setsockopt(SO_ZEROCOPY)", e))?;
        Ok(ZeroCopy {
            source,
            next_id: 0,
            inflight: VecDeque::new(),
            held_pages: 0,
            held_bytes: 0,
            stats: ZeroCopyStats::default(),
            notices: Vec::new(),
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> ZeroCopyStats {
        self.stats
    }

    /// Sends whose completion is outstanding (or whose earlier sends'
    /// completions are).
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Page holds kept for sends in flight.
    pub fn held_pages(&self) -> usize {
        self.held_pages
    }

    /// Send `header` (copied, with `MSG_MORE`) and then `range` of `file`
    /// with `sendmsg(MSG_ZEROCOPY)` of up to `IOV_MAX` mapped regions per
    /// call. Before sending, waits for completions while more than
    /// [`SendOptions::zerocopy_max_held`] bytes are held. On error, sends the
    /// kernel accepted stay held until their completions arrive (a reset
    /// connection completes them at once: [`flush`](Self::flush) releases
    /// them); everything else is released before returning.
    pub fn send(
        &mut self,
        sock: BorrowedFd<'_>,
        file: &PageFile,
        range: Range<u64>,
        header: &[u8],
        opts: &SendOptions,
    ) -> Result<SendStats> {
        let runs = file.runs(range.clone())?;
        let mut st = SendStats::default();
        self.reap(sock)?;
        while self.held_bytes > opts.zerocopy_max_held && !self.inflight.is_empty() {
            self.wait_completion(sock, opts)?;
        }
        let mut out = Out::new(sock);
        send_all(&mut out, header, if range.is_empty() { 0 } else { libc::MSG_MORE }, opts, &mut st)?;
        let mut q: IovQueue<(M::Mapping<'_>, Held)> = IovQueue::new();
        let result = self.send_runs(&mut out, &mut q, runs, file.page_size(), opts, &mut st);
        if result.is_err() {
            self.abandon(&mut q);
        }
        result.map(|()| st)
    }

    fn send_runs<'m>(
        &mut self,
        out: &mut Out<'_>,
        q: &mut IovQueue<(M::Mapping<'m>, Held)>,
        runs: super::file::Runs<'m>,
        fs: usize,
        opts: &SendOptions,
        st: &mut SendStats,
    ) -> Result<()>
    where
        's: 'm,
    {
        let source: &'m M = self.source;
        for run in runs {
            let (mut pages, mut off, mut left) = (run.pages, run.offset, run.len);
            while left > 0 {
                let m = match source.map(pages) {
                    Ok(m) => m,
                    // Nothing free: send what is queued, which releases its
                    // mappings, and ask again.
                    Err(e) if no_room(&e) && !q.is_done() => {
                        self.drain(out, q, opts, st)?;
                        continue;
                    }
                    // Nothing mapped is held: the source may wait.
                    Err(e) if no_room(&e) => source.map_idle(pages)?,
                    Err(e) => return Err(e),
                };
                st.mappings += 1;
                let npages = check_mapping(&m, fs, pages.len())?;
                let take = left.min(npages * fs - off);
                let ptr = m.as_ptr().wrapping_add(off);
                if let Some(plan) = source.prefault(super::source::private::Token) {
                    // SAFETY: `off + take` is within the mapping
                    // (`check_mapping` counted its pages), which `m` keeps
                    // mapped. (The kernel pins the pages of a zero-copy send
                    // from the page tables, falling back to the mmap lock
                    // for missing ones.)
                    unsafe { crate::kaddr::Prefaulter::new(plan.0).touch(ptr, take) };
                }
                let held = Held { pages: pages[..npages].to_vec(), bytes: take };
                self.held_pages += npages;
                self.held_bytes += take;
                // SAFETY: `off + take` is within the mapping (`check_mapping`
                // counted its pages), which `m`, queued as the owner of these
                // bytes, keeps mapped until they are sent.
                unsafe { q.push(ptr, take, Some((m, held))) };
                pages = &pages[npages..];
                off = 0;
                left -= take;
                if q.pending_iovs() >= IOV_MAX || q.pending_bytes() >= opts.batch_bytes as u64 {
                    self.drain(out, q, opts, st)?;
                }
            }
        }
        self.drain(out, q, opts, st)
    }

    /// Send everything queued with `MSG_ZEROCOPY`, one send id per call that
    /// takes bytes; each mapping is released once a call took its last
    /// byte, and its page holds move to that call.
    fn drain<T>(
        &mut self,
        out: &mut Out<'_>,
        q: &mut IovQueue<(T, Held)>,
        opts: &SendOptions,
        st: &mut SendStats,
    ) -> Result<()> {
        while !q.is_done() {
            match out.send_iov(q.pending(), libc::MSG_ZEROCOPY) {
                Ok(0) => return Err(sys_err("sendmsg(MSG_ZEROCOPY)", io::Error::from(io::ErrorKind::WriteZero))),
                Ok(n) => {
                    st.calls += 1;
                    st.bytes += n as u64;
                    self.stats.sends += 1;
                    let mut rec = InFlight { id: self.next_id, done: false, held: Vec::new() };
                    self.next_id = self.next_id.wrapping_add(1);
                    q.advance(n, |(mapping, h)| {
                        drop(mapping);
                        rec.held.push(h);
                    });
                    self.inflight.push_back(rec);
                }
                // The socket's option memory is full of pending
                // notifications: read some and retry.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && !self.inflight.is_empty() => {
                    st.waits += 1;
                    self.wait_completion(out.fd, opts)?;
                }
                Err(e) => match classify("sendmsg(MSG_ZEROCOPY)", e) {
                    Step::Retry => {}
                    Step::Wait => {
                        st.waits += 1;
                        self.wait_writable(out.fd, opts)?;
                    }
                    Step::Fail(e) => return Err(e),
                },
            }
        }
        Ok(())
    }

    /// After an error: the pages of mappings still queued may have had their
    /// first bytes taken by the last call, whose completion is outstanding;
    /// their holds join it. If it is complete (or there was none), they go
    /// now. The mappings go now either way.
    fn abandon<T>(&mut self, q: &mut IovQueue<(T, Held)>) {
        let mut rest = Vec::new();
        // Hand every owner back by pretending the rest was sent.
        q.advance(usize::MAX, |(mapping, h)| {
            drop(mapping);
            rest.push(h);
        });
        match self.inflight.back_mut() {
            Some(last) if !last.done => last.held.extend(rest),
            _ => {
                for h in rest {
                    self.held_pages -= h.pages.len();
                    self.held_bytes -= h.bytes;
                }
            }
        }
    }

    /// Wait for `POLLOUT`, reading completions if the error queue wakes us.
    fn wait_writable(&mut self, sock: BorrowedFd<'_>, opts: &SendOptions) -> Result<()> {
        let rev = sys::poll(sock, libc::POLLOUT, opts.stall_timeout).map_err(|e| sys_err("poll", e))?;
        if rev == 0 {
            return Err(Error::TimedOut);
        }
        if rev & libc::POLLERR != 0 {
            self.reap(sock)?;
        }
        Ok(())
    }

    /// Wait until at least one more send id completes (or nothing is in
    /// flight), at most [`SendOptions::stall_timeout`].
    fn wait_completion(&mut self, sock: BorrowedFd<'_>, opts: &SendOptions) -> Result<()> {
        let before = self.stats.completed;
        // A deadline the clock cannot hold is no deadline.
        let deadline = opts.stall_timeout.and_then(|d| Instant::now().checked_add(d));
        self.wait_until(sock, deadline, |z| z.stats.completed > before || z.inflight.is_empty())
    }

    fn wait_until(
        &mut self,
        sock: BorrowedFd<'_>,
        deadline: Option<Instant>,
        done: impl Fn(&Self) -> bool,
    ) -> Result<()> {
        loop {
            self.reap(sock)?;
            if done(self) {
                return Ok(());
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(l) if !l.is_zero() => Some(l),
                    _ => return Err(Error::TimedOut),
                },
                None => None,
            };
            // Completions raise POLLERR. So do socket errors and hang-ups,
            // which stay raised: then nap instead of spinning.
            let rev = sys::poll(sock, 0, left).map_err(|e| sys_err("poll", e))?;
            if rev != 0 && self.reap(sock)? == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Read the completions queued on the error queue, without blocking, and
    /// release the holds of every send that is complete along with all sends
    /// before it. Returns the completion messages read. One `recvmsg` when
    /// none is queued.
    pub fn reap(&mut self, sock: BorrowedFd<'_>) -> Result<usize> {
        if self.inflight.is_empty() {
            return Ok(0);
        }
        self.notices.clear();
        let n = sys::recv_zc_notices(sock, &mut self.notices).map_err(|e| sys_err("recvmsg(MSG_ERRQUEUE)", e))?;
        for i in 0..self.notices.len() {
            let ZcNotice { lo, hi, copied } = self.notices[i];
            let ids = u64::from(hi.wrapping_sub(lo)) + 1;
            self.stats.notifications += 1;
            self.stats.completed += ids;
            if copied {
                self.stats.copied += ids;
            }
            let Some(front) = self.inflight.front().map(|r| r.id) else { continue };
            // Signed distance from the oldest send in flight (ids wrap).
            let from = (lo.wrapping_sub(front) as i32).max(0) as i64;
            let to = (hi.wrapping_sub(front) as i32) as i64;
            let len = self.inflight.len() as i64;
            let mut k = from;
            while k <= to && k < len {
                self.inflight[k as usize].done = true;
                k += 1;
            }
        }
        while self.inflight.front().is_some_and(|r| r.done) {
            if let Some(rec) = self.inflight.pop_front() {
                for h in &rec.held {
                    self.held_pages -= h.pages.len();
                    self.held_bytes -= h.bytes;
                }
            }
        }
        Ok(n)
    }

    /// Wait until every send in flight is complete and its holds released.
    /// [`Error::TimedOut`] after `timeout`.
    pub fn flush(&mut self, sock: BorrowedFd<'_>, timeout: Duration) -> Result<()> {
        // A deadline the clock cannot hold is no deadline.
        let deadline = Instant::now().checked_add(timeout);
        self.wait_until(sock, deadline, |z| z.inflight.is_empty())
    }
}

impl<M: MapSource> Drop for ZeroCopy<'_, M> {
    fn drop(&mut self) {
        // Sends in flight may still be read by the kernel: leak their holds.
        for rec in self.inflight.drain(..) {
            std::mem::forget(rec.held);
        }
    }
}

impl<M: MapSource> std::fmt::Debug for ZeroCopy<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroCopy")
            .field("next_id", &self.next_id)
            .field("in_flight", &self.inflight.len())
            .field("held_pages", &self.held_pages)
            .field("stats", &self.stats)
            .finish()
    }
}
