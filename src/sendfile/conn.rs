//! [`Connection`]: one socket of a [`Sender`], and the holds its mode keeps
//! between requests.

use std::fmt;
use std::ops::Range;
use std::os::fd::AsFd;
use std::time::Duration;

use super::engine::{send_all, Out};
use super::file::PageFile;
use super::kernel::SendfileHolds;
use super::sender::Sender;
use super::source::DirectMapSource;
use super::via::{Plain, Via};
use super::zerocopy::{ZeroCopy, ZeroCopyStats};
use super::SendStats;
use crate::error::{Error, Result};

/// A connection's half of its sender's [`Via`]: the holds of the modes
/// that keep pages past a send, or the sender's source for the others.
enum State<'s> {
    Plain(&'s Plain),
    Sendfile(SendfileHolds),
    ZeroCopy(ZeroCopy<'s, DirectMapSource>),
}

/// One socket of a [`Sender`]: sends ranges in the sender's mode and keeps
/// what the mode must hold between requests (sendfile's and zero-copy's page
/// holds).
///
/// Dropping it waits up to [`SendOptions::close_timeout`] for held pages to
/// be released, then leaks whatever is still held (see [`SendfileHolds`]).
///
/// [`SendOptions::close_timeout`]: super::SendOptions::close_timeout
pub struct Connection<'s, S: AsFd> {
    sender: &'s Sender,
    stream: S,
    state: State<'s>,
    buf: Vec<u8>,
    stats: SendStats,
}

impl<'s, S: AsFd> Connection<'s, S> {
    /// See [`Sender::connection`].
    pub(super) fn new(sender: &'s Sender, stream: S) -> Result<Self> {
        let state = match &sender.via {
            Via::Sendfile => State::Sendfile(SendfileHolds::new()),
            Via::ZeroCopy(direct) => State::ZeroCopy(ZeroCopy::new(stream.as_fd(), direct)?),
            Via::Plain(p) => State::Plain(p),
        };
        Ok(Connection { sender, stream, state, buf: Vec::new(), stats: SendStats::default() })
    }

    /// The socket.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The socket, to read requests from. Do not send on it directly with
    /// `MSG_ZEROCOPY`.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The sender.
    pub fn sender(&self) -> &'s Sender {
        self.sender
    }

    /// Totals of every send on this connection.
    pub fn stats(&self) -> SendStats {
        self.stats
    }

    /// Zero-copy counters (all zero in other modes).
    pub fn zerocopy_stats(&self) -> ZeroCopyStats {
        match &self.state {
            State::ZeroCopy(z) => z.stats(),
            _ => ZeroCopyStats::default(),
        }
    }

    /// Page holds kept for data the kernel may still read.
    pub fn held_pages(&self) -> usize {
        match &self.state {
            State::Plain(_) => 0,
            State::Sendfile(h) => h.held_pages(),
            State::ZeroCopy(z) => z.held_pages(),
        }
    }

    /// Send `header` and then bytes `range` of `file`, in the sender's mode.
    /// Returns once the kernel has taken every byte (waiting on `EAGAIN` for
    /// a non-blocking socket). Errors: [`Error::OutOfBounds`] for a range
    /// outside the file, [`Error::ForeignPage`] for a file of other memory,
    /// [`Error::Sys`] for the socket's errors (`ECONNRESET`, `EPIPE`, ...),
    /// [`Error::TimedOut`] after [`SendOptions::stall_timeout`](super::SendOptions::stall_timeout) without
    /// progress. Nothing is left mapped after an error; page holds the
    /// kernel may still need are kept until [`reap`](Self::reap) finds them
    /// released.
    pub fn send(&mut self, file: &PageFile, range: Range<u64>, header: &[u8]) -> Result<SendStats> {
        let s = self.sender;
        if !file.phys().same_as(&s.phys) {
            return Err(Error::ForeignPage);
        }
        let fd = self.stream.as_fd();
        let opts = &s.opts;
        let r = match &mut self.state {
            State::Sendfile(h) => h.send(fd, file, range, header, opts),
            State::ZeroCopy(z) => z.send(fd, file, range, header, opts),
            State::Plain(p) => p.send(fd, file, range, header, &mut self.buf, opts),
        };
        if let Ok(st) = &r {
            self.stats += *st;
        }
        r
    }

    /// Send plain bytes (an error response, say) by copy.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<SendStats> {
        let mut st = SendStats::default();
        send_all(&mut Out::new(self.stream.as_fd()), bytes, 0, &self.sender.opts, &mut st)?;
        self.stats += st;
        Ok(st)
    }

    /// Release the holds whose data has left (no waiting). Returns pages or
    /// completions released (sendfile: pages; zero-copy: messages read).
    pub fn reap(&mut self) -> Result<usize> {
        let fd = self.stream.as_fd();
        match &mut self.state {
            State::Plain(_) => Ok(0),
            State::Sendfile(h) => h.reap(fd),
            State::ZeroCopy(z) => z.reap(fd),
        }
    }

    /// Wait until nothing is held, at most `timeout` ([`Error::TimedOut`]).
    pub fn flush(&mut self, timeout: Duration) -> Result<()> {
        let fd = self.stream.as_fd();
        match &mut self.state {
            State::Plain(_) => Ok(()),
            State::Sendfile(h) => h.wait_drained(fd, timeout),
            State::ZeroCopy(z) => z.flush(fd, timeout),
        }
    }
}

impl<S: AsFd> Drop for Connection<'_, S> {
    fn drop(&mut self) {
        if self.held_pages() > 0 {
            // Best effort; whatever is still held afterwards is leaked by the
            // holders' own Drop.
            let _ = self.flush(self.sender.opts.close_timeout);
        }
    }
}

impl<S: AsFd> fmt::Debug for Connection<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("mode", &self.sender.mode())
            .field("held_pages", &self.held_pages())
            .field("stats", &self.stats)
            .finish()
    }
}
