//! File-descriptor I/O straight from and into mapped bytes, with no `unsafe`
//! in the caller and no copy through a Rust buffer: the kernel reads a
//! mapping for `writev(2)` / `sendmsg(2)` and writes it for `read(2)`.
//!
//! Why this is sound without forming a slice of the bytes: the kernel's own
//! copies are outside the Rust memory model, like another process writing
//! a shared mapping of the same file. A `writev` from a mapping that another
//! thread writes at the same moment sends some mix of old and new bytes
//! (torn, as a racing [`Kaddr::read_at`] may see them) and is never
//! undefined behaviour; a `read` into a mapping that other threads read
//! with the safe copies is likewise a race on the values only. Every address
//! handed to the kernel lies inside a mapping the borrow keeps alive
//! (bounds-checked here), and the kernel validates it again itself.
//!
//! Every call here is one system call, so each is the non-blocking variant
//! on a non-blocking descriptor: a short transfer returns its count, and
//! `EAGAIN` is an [`io::Error`] of kind [`io::ErrorKind::WouldBlock`], as a
//! readiness loop (`AsyncFd::try_io`, tokio's `async_io`, mio) expects. The
//! `*_all_*` / `*_exact_*` helpers loop (retrying `EINTR`) and are meant for
//! blocking descriptors; [`IoVec::write_all_vectored`] keeps its progress in
//! the caller's slice, so it suits non-blocking ones too.
//!
//! Errors are `io::Error`: the kernel's with its errno (`EBADF`, `EPIPE`,
//! ...), and a range outside the mapping as [`io::ErrorKind::InvalidInput`]
//! wrapping [`Error::OutOfBounds`](crate::Error::OutOfBounds) (`e.get_ref()` downcasts to it).

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd};

use libc::{c_int, c_void, iovec};

use super::Kaddr;
use crate::error::Result;

/// The most pieces one `writev(2)` / `sendmsg(2)` takes on Linux
/// (`UIO_MAXIOV`). A batch of more makes [`IoVec::write_vectored`] and
/// [`IoVec::send_vectored`] pass the first `IOV_MAX` pieces (a short
/// transfer, as if the kernel had taken less);
/// [`IoVec::write_all_vectored`] makes as many calls as it needs.
pub const IOV_MAX: usize = 1024;

/// A byte range to write from, laid out as the kernel's `struct iovec` (so
/// a slice of them is passed to `writev` as it is): part of a mapping
/// ([`Kaddr::io_vec`]) or an ordinary buffer ([`IoVec::from_slice`]),
/// borrowed for `'a`. Only ever read, by the kernel.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct IoVec<'a> {
    iov: iovec,
    _borrow: PhantomData<&'a [u8]>,
}

// SAFETY: an address and a length, read only by the kernel, valid for `'a`
// from any thread (a mapping or a `&[u8]`, both shareable).
unsafe impl Send for IoVec<'_> {}
// SAFETY: as for `Send`; `&IoVec` only reads the two fields.
unsafe impl Sync for IoVec<'_> {}

impl<'a> IoVec<'a> {
    /// A piece that writes `buf` (a header, say, before mapped pages).
    pub fn from_slice(buf: &'a [u8]) -> IoVec<'a> {
        IoVec {
            iov: iovec { iov_base: buf.as_ptr().cast_mut().cast::<c_void>(), iov_len: buf.len() },
            _borrow: PhantomData,
        }
    }

    /// A piece of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + len` stays readable (mapped, or a live buffer) for `'a`.
    pub(crate) unsafe fn from_raw_parts(ptr: *const u8, len: usize) -> IoVec<'a> {
        IoVec { iov: iovec { iov_base: ptr.cast_mut().cast::<c_void>(), iov_len: len }, _borrow: PhantomData }
    }

    /// The address of the first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.iov.iov_base.cast::<u8>().cast_const()
    }

    /// Bytes in the piece.
    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    /// Whether the piece has no bytes.
    pub fn is_empty(&self) -> bool {
        self.iov.iov_len == 0
    }

    /// Drop the first `n` bytes (all of them if `n` is larger), after a
    /// transfer took them.
    pub fn advance(&mut self, n: usize) {
        let n = n.min(self.iov.iov_len);
        self.iov.iov_base = self.as_ptr().wrapping_add(n).cast_mut().cast::<c_void>();
        self.iov.iov_len -= n;
    }

    /// Drop the first `n` bytes of a batch: the pieces they cover whole are
    /// cut off the front of `bufs`, and the next one is advanced (all of the
    /// batch if `n` is larger).
    pub fn advance_slices(bufs: &mut &mut [IoVec<'a>], n: usize) {
        let mut left = n;
        let mut whole = 0;
        for b in bufs.iter() {
            if left < b.len() {
                break;
            }
            left -= b.len();
            whole += 1;
        }
        let rest = &mut std::mem::take(bufs)[whole..];
        if let Some(first) = rest.first_mut() {
            first.advance(left);
        }
        *bufs = rest;
    }

    /// One `writev(2)` of the batch (its first [`IOV_MAX`] pieces) to `fd`.
    /// Returns the bytes written, which may be fewer than the batch holds (a
    /// short write: advance with [`advance_slices`](Self::advance_slices)
    /// and call again). An empty batch makes no system call and returns 0.
    /// On a socket whose peer has gone, `writev` raises `SIGPIPE` (which
    /// Rust programs ignore); [`send_vectored`](Self::send_vectored) never
    /// does.
    ///
    /// Errors: the kernel's, as `io::Error` ([`io::ErrorKind::WouldBlock`]
    /// on a full non-blocking descriptor, `EBADF`, `EPIPE`, ...).
    ///
    /// ```
    /// use std::io::Read;
    /// use std::os::unix::net::UnixStream;
    /// use lwbuf::{Backing, IoVec, PhysMem, SfPool, ModelMmu, Wait};
    /// use std::sync::Arc;
    ///
    /// let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
    /// let pool = SfPool::builder(Arc::new(ModelMmu::new(&mem, 4)?)).build()?;
    /// let (a, b) = (mem.alloc_page()?, mem.alloc_page()?);
    /// let (x, y) = (pool.alloc(&a, Wait::NoWait)?, pool.alloc(&b, Wait::NoWait)?);
    /// x.kva().write_at(0, b"hello, ")?;
    /// y.kva().write_at(100, b"world")?;
    ///
    /// let (tx, mut rx) = UnixStream::pair()?;
    /// let batch = [IoVec::from_slice(b">> "), x.kva().io_vec(0, 7)?, y.kva().io_vec(100, 5)?];
    /// assert_eq!(IoVec::write_vectored(&tx, &batch)?, 15); // one writev
    /// let mut got = [0u8; 15];
    /// rx.read_exact(&mut got)?;
    /// assert_eq!(&got, b">> hello, world");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write_vectored(fd: impl AsFd, bufs: &[IoVec<'_>]) -> io::Result<usize> {
        if bufs.is_empty() {
            return Ok(0);
        }
        let n = bufs.len().min(IOV_MAX);
        // SAFETY: `IoVec` is a transparent `iovec`; each of the `n` pieces is
        // readable for its borrow, which outlives the call, and the kernel
        // only reads them (validating every address itself).
        cvt(unsafe { libc::writev(fd.as_fd().as_raw_fd(), bufs.as_ptr().cast::<iovec>(), n as c_int) })
    }

    /// One `sendmsg(2)` of the batch (its first [`IOV_MAX`] pieces) to the
    /// socket `fd`, with `flags` (`MSG_*` bits such as `libc::MSG_DONTWAIT`
    /// or `libc::MSG_ZEROCOPY`) and always `MSG_NOSIGNAL`: a peer that has
    /// gone is `EPIPE`, never `SIGPIPE`. Otherwise as
    /// [`write_vectored`](Self::write_vectored); `ENOTSOCK` on anything but
    /// a socket.
    pub fn send_vectored(fd: impl AsFd, bufs: &[IoVec<'_>], flags: i32) -> io::Result<usize> {
        if bufs.is_empty() {
            return Ok(0);
        }
        let n = bufs.len().min(IOV_MAX);
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = bufs.as_ptr().cast::<iovec>().cast_mut();
        msg.msg_iovlen = n as _;
        // SAFETY: `msg` points at `n` pieces laid out as `iovec`s, each
        // readable for its borrow, which outlives the call; the kernel only
        // reads them (and `msg`), validating every address itself.
        cvt(unsafe { libc::sendmsg(fd.as_fd().as_raw_fd(), &msg, flags | libc::MSG_NOSIGNAL) })
    }

    /// Write the whole batch with as many `writev(2)` calls as it takes
    /// (batches beyond [`IOV_MAX`] pieces included), retrying `EINTR`.
    /// `bufs` is advanced past what was written, also when an error is
    /// returned, so after [`io::ErrorKind::WouldBlock`] on a non-blocking
    /// descriptor the caller waits for readiness and calls again with the
    /// rest. A write of 0 bytes is [`io::ErrorKind::WriteZero`].
    pub fn write_all_vectored(fd: impl AsFd, bufs: &mut &mut [IoVec<'a>]) -> io::Result<()> {
        let fd = fd.as_fd();
        IoVec::advance_slices(bufs, 0);
        while !bufs.is_empty() {
            match IoVec::write_vectored(fd, bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoVec::advance_slices(bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl fmt::Debug for IoVec<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoVec").field("addr", &self.as_ptr()).field("len", &self.len()).finish()
    }
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

// === impl Kaddr: fd I/O ===

impl<'a> Kaddr<'a> {
    /// Bytes `offset..offset + len` of the mapping as a piece of a batch
    /// for [`IoVec::write_vectored`] / [`IoVec::send_vectored`]; it borrows
    /// what this view borrows. [`Error::OutOfBounds`](crate::Error::OutOfBounds) if the range is not
    /// inside the mapping. No system call.
    pub fn io_vec(&self, offset: usize, len: usize) -> Result<IoVec<'a>> {
        self.check(offset, len)?;
        // SAFETY: the range is inside the mapping (checked), which stays
        // mapped for `'a`.
        Ok(unsafe { IoVec::from_raw_parts(self.ptr.as_ptr().add(offset), len) })
    }

    /// The range as a piece, or the `io::Error` the fd calls return.
    fn io_range(&self, offset: usize, len: usize) -> io::Result<IoVec<'a>> {
        self.io_vec(offset, len).map_err(io::Error::from)
    }

    /// The range as a piece for a call that copies out of it, its pages
    /// faulted in from user mode first ([`prefault`](Self::prefault)).
    fn io_range_out(&self, offset: usize, len: usize) -> io::Result<IoVec<'a>> {
        let piece = self.io_range(offset, len)?;
        // SAFETY: `io_range` checked the range against the mapping, which
        // is readable for `'a`.
        unsafe { super::prefault_range(piece.as_ptr(), piece.len()) };
        Ok(piece)
    }

    /// Write bytes `offset..offset + len` of the mapping to `fd`: one
    /// `writev(2)`, no copy through a Rust buffer, after faulting the
    /// range in from user mode ([`prefault`](Self::prefault)). Returns the bytes
    /// written: on a non-blocking descriptor possibly fewer than `len` (a
    /// short write), and [`io::ErrorKind::WouldBlock`] when it takes none.
    /// A zero `len` makes no system call and returns 0.
    ///
    /// Errors: a range outside the mapping as [`io::ErrorKind::InvalidInput`]
    /// (wrapping [`Error::OutOfBounds`](crate::Error::OutOfBounds); nothing is written), else the
    /// kernel's (`EBADF`, `EPIPE`, ...). A socket whose peer has gone
    /// raises `SIGPIPE` for `writev` (Rust programs ignore it);
    /// [`send_to`](Self::send_to) never does.
    ///
    /// ```
    /// use std::io::{ErrorKind, Read};
    /// use std::os::unix::net::UnixStream;
    /// use lwbuf::{Backing, PhysMem};
    ///
    /// let mem = PhysMem::builder().frames(1).backing(Backing::Heap).build()?;
    /// let page = mem.alloc_page()?;
    /// let view = page.direct()?;
    /// view.write_at(0, b"hello")?;
    ///
    /// let (tx, mut rx) = UnixStream::pair()?;
    /// assert_eq!(view.write_to(&tx, 0, 5)?, 5);
    /// let mut got = [0u8; 5];
    /// rx.read_exact(&mut got)?;
    /// assert_eq!(&got, b"hello");
    ///
    /// let e = view.write_to(&tx, 4090, 10).unwrap_err(); // past the page's end
    /// assert_eq!(e.kind(), ErrorKind::InvalidInput);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write_to(&self, fd: impl AsFd, offset: usize, len: usize) -> io::Result<usize> {
        let piece = self.io_range_out(offset, len)?;
        if len == 0 {
            return Ok(0);
        }
        IoVec::write_vectored(fd, &[piece])
    }

    /// As [`write_to`](Self::write_to), with `sendmsg(2)` on a socket:
    /// `flags` (`MSG_*` bits) plus `MSG_NOSIGNAL` always (a peer that has
    /// gone is `EPIPE`, never `SIGPIPE`). `ENOTSOCK` on anything but a
    /// socket.
    pub fn send_to(&self, fd: impl AsFd, offset: usize, len: usize, flags: i32) -> io::Result<usize> {
        let piece = self.io_range_out(offset, len)?;
        if len == 0 {
            return Ok(0);
        }
        IoVec::send_vectored(fd, &[piece], flags)
    }

    /// Write all of bytes `offset..offset + len` to `fd`, with as many
    /// `writev(2)` calls as it takes, retrying `EINTR`. For blocking
    /// descriptors: an error (`WouldBlock` included) loses the count of
    /// what was written before it; on a non-blocking descriptor loop over
    /// [`write_to`](Self::write_to) instead. Errors as `write_to`, and
    /// [`io::ErrorKind::WriteZero`] if the kernel takes nothing.
    pub fn write_all_to(&self, fd: impl AsFd, offset: usize, len: usize) -> io::Result<()> {
        let mut piece = [self.io_range_out(offset, len)?];
        IoVec::write_all_vectored(fd, &mut &mut piece[..])
    }

    /// Read up to `len` bytes from `fd` into the mapping at `offset`: one
    /// `read(2)` straight into the mapped bytes. Returns the bytes read: 0
    /// at end of file, possibly fewer than `len`, and
    /// [`io::ErrorKind::WouldBlock`] on a non-blocking descriptor with
    /// nothing to read. A zero `len` makes no system call and returns 0.
    ///
    /// Other threads' safe copies of these bytes race the kernel's write as
    /// they race each other (see the memory model): they may see part of
    /// what was read.
    ///
    /// Errors: a range outside the mapping as [`io::ErrorKind::InvalidInput`]
    /// (wrapping [`Error::OutOfBounds`](crate::Error::OutOfBounds); nothing is read), a read-only view
    /// as [`io::ErrorKind::PermissionDenied`] (wrapping
    /// [`Error::ReadOnly`](crate::Error::ReadOnly)), else the kernel's.
    ///
    /// ```
    /// use std::io::Write;
    /// use std::os::unix::net::UnixStream;
    /// use lwbuf::{Backing, PhysMem};
    ///
    /// let mem = PhysMem::builder().frames(1).backing(Backing::Heap).build()?;
    /// let page = mem.alloc_page()?;
    /// let (mut tx, rx) = UnixStream::pair()?;
    /// tx.write_all(b"hello")?;
    /// let view = page.direct()?;
    /// assert_eq!(view.read_from(&rx, 100, 64)?, 5); // what was there
    /// let mut got = [0u8; 5];
    /// view.read_at(100, &mut got)?;
    /// assert_eq!(&got, b"hello");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read_from(&self, fd: impl AsFd, offset: usize, len: usize) -> io::Result<usize> {
        self.check_writable()?;
        let piece = self.io_range(offset, len)?;
        if len == 0 {
            return Ok(0);
        }
        // SAFETY: the range is inside the mapping (checked), mapped writable
        // for `'a`; the kernel writes at most `len` bytes there, outside the
        // Rust memory model (module docs), and validates the address itself.
        cvt(unsafe { libc::read(fd.as_fd().as_raw_fd(), piece.as_ptr().cast_mut().cast::<c_void>(), len) })
    }

    /// Fill bytes `offset..offset + len` from `fd`, with as many `read(2)`
    /// calls as it takes, retrying `EINTR`; for blocking descriptors (an
    /// error loses the count read before it). End of file first is
    /// [`io::ErrorKind::UnexpectedEof`]. Errors otherwise as
    /// [`read_from`](Self::read_from).
    pub fn read_exact_from(&self, fd: impl AsFd, offset: usize, len: usize) -> io::Result<()> {
        let fd = fd.as_fd();
        self.check_writable()?;
        self.io_range(offset, len)?;
        let mut done = 0;
        while done < len {
            match self.read_from(fd, offset + done, len - done) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
