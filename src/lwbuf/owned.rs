//! [`OwnedLwbuf`]: an lwbuf handle that owns what it maps through (an `Arc`
//! of the caches and clones of its pages), so it is `'static`: it can be
//! held across an `.await`, moved into a spawned task or thread, stored in
//! a struct. Made by [`Lwbufs::alloc_owned`] and [`Lwbufs::alloc_run_owned`].
//!
//! It is an [`Lwbuf`] inside, with the same semantics and statistics: the
//! cpumask, `kva()` on another CPU making a local entry there, the release
//! on drop (a local decref, one mailbox message to every other CPU of the
//! mask). What it adds costs an `Arc` clone, a `Page` clone (two atomic
//! increments, on lines other CPUs share) and one small heap allocation per
//! handle, and their undoing on drop; the borrowed [`Lwbuf`] stays the
//! zero-cost path (`benches/lwbuf.rs`, group `lwbuf_owned_hit`).

use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::AsFd;
use std::sync::Arc;

use super::{Lwbuf, Lwbufs};
use crate::cpu::CpuMask;
use crate::error::Result;
use crate::kaddr::Kaddr;
use crate::owned::OwnedPages;
use crate::phys::Page;

/// A mapping of one page (or a run) that owns its caches and pages:
/// `'static`, `Send` and `Sync`, like [`Lwbuf`] in every other respect.
///
/// `Send`: drop it on any thread; bound to a CPU of the caches, the release
/// decrefs that CPU's entry (if it has one) locally and posts a message to
/// every other CPU in the mask, as an [`Lwbuf`] does. `Sync`: `&OwnedLwbuf`
/// allows only what `&Lwbuf` does (reading the address on the calling
/// thread's CPU, which may add that CPU to the mask under its lock), so an
/// `Arc<OwnedLwbuf>` may be shared by tasks on several CPUs.
///
/// The caches live as long as any owned handle of them: dropping the last
/// other `Arc<Lwbufs>` while a handle is alive is fine, the handle's drop
/// then tears the caches down after its release.
///
/// ```
/// use std::sync::Arc;
/// use lwbuf::{Lwbufs, PhysMem, Window};
///
/// let mem = PhysMem::builder().frames(64).build()?;
/// let lw = Arc::new(Lwbufs::builder(Arc::new(Window::builder(&mem).slots(32).build()?)).cpus(2).build()?);
/// let page = mem.alloc_page()?;
///
/// let _cpu0 = lw.bind(0)?;
/// let buf = lw.alloc_owned(&page)?;        // 'static: holds `lw` and a clone of `page`
/// buf.kva()?.write_at(0, b"hello")?;
/// let lw2 = Arc::clone(&lw);
/// let read = std::thread::spawn(move || {
///     let _cpu1 = lw2.bind(1)?;
///     let mut b = [0u8; 5];
///     buf.kva()?.read_at(0, &mut b)?;     // CPU 1 joins the mask
///     drop(buf);                           // a local decref, a message to CPU 0
///     Ok::<_, lwbuf::Error>(b)
/// });
/// assert_eq!(&read.join().unwrap()?, b"hello");
/// lw.poll()?;                              // CPU 0 applies the message
/// assert_eq!(lw.check_consistency(), Ok(0));
/// # Ok::<(), lwbuf::Error>(())
/// ```
#[must_use = "dropping an OwnedLwbuf releases its mapping at once"]
pub struct OwnedLwbuf {
    // Drop order: `buf` (explicitly, in `Drop`), then `_pages`, then `sys`:
    // `buf` borrows both for the `'static` it claims.
    buf: ManuallyDrop<Lwbuf<'static>>,
    _pages: OwnedPages,
    sys: Arc<Lwbufs>,
}

// `Send + Sync + 'static`, asserted at compile time.
const _: fn() = || {
    fn owned<T: Send + Sync + 'static>() {}
    owned::<OwnedLwbuf>();
};

impl Lwbufs {
    /// [`alloc`](Self::alloc), returning a handle that owns a clone of
    /// `self` and of `page`: `'static`, to hold across an `.await` or move
    /// to another thread. Costs what `alloc` does, plus an `Arc` and a
    /// `Page` clone and one heap allocation (no system call on a hit).
    /// Errors as `alloc`.
    pub fn alloc_owned(self: &Arc<Self>, page: &Page) -> Result<OwnedLwbuf> {
        self.owned(std::slice::from_ref(page), false)
    }

    /// [`alloc_run`](Self::alloc_run), returning an owned handle (clones of
    /// `self` and of every page). Errors as `alloc_run`.
    pub fn alloc_run_owned(self: &Arc<Self>, pages: &[Page]) -> Result<OwnedLwbuf> {
        self.owned(pages, true)
    }

    fn owned(self: &Arc<Self>, pages: &[Page], run: bool) -> Result<OwnedLwbuf> {
        let sys = Arc::clone(self);
        let pages = OwnedPages::clone_of(pages);
        // SAFETY: `OwnedLwbuf` keeps `pages` and `sys` until it has dropped
        // the handle that borrows them (its `Drop`), and lends the handle out
        // only for borrows of itself. The `Lwbufs` lives in the `Arc`'s heap
        // allocation, which does not move.
        let (hold, cache): (&'static [Page], &'static Lwbufs) = unsafe { (pages.hold(), &*Arc::as_ptr(&sys)) };
        let buf = if run { cache.alloc_run(hold)? } else { cache.alloc(&hold[0])? };
        Ok(OwnedLwbuf { buf: ManuallyDrop::new(buf), _pages: pages, sys })
    }
}

impl OwnedLwbuf {
    /// The mapped bytes on the calling thread's CPU, as [`Lwbuf::kva`]
    /// (a field read on the home CPU; on a CPU outside the mask it makes or
    /// bumps that CPU's entry and adds it). Errors as `Lwbuf::kva`.
    #[inline]
    pub fn kva(&self) -> Result<Kaddr<'_>> {
        self.buf.kva()
    }

    /// The borrowed handle inside, for code written against [`Lwbuf`].
    pub fn as_lwbuf(&self) -> &Lwbuf<'_> {
        &self.buf
    }

    /// The first (or only) page.
    pub fn page(&self) -> &Page {
        self.buf.page()
    }

    /// Every page mapped.
    pub fn pages(&self) -> &[Page] {
        self.buf.pages()
    }

    /// The CPU that allocated the handle.
    pub fn home_cpu(&self) -> usize {
        self.buf.home_cpu()
    }

    /// The CPUs the handle has an entry on (a copy), as [`Lwbuf::cpumask`].
    pub fn cpumask(&self) -> CpuMask {
        self.buf.cpumask()
    }

    /// The caches the handle keeps alive.
    pub fn caches(&self) -> &Arc<Lwbufs> {
        &self.sys
    }

    /// Write `len` bytes from `offset` of the mapping to `fd`: one
    /// `writev(2)`, as [`Kaddr::write_to`] (a short count or `WouldBlock`
    /// on a non-blocking descriptor). Errors also those of [`kva`](Self::kva),
    /// as `io::Error`.
    pub fn write_to(&self, fd: impl AsFd, offset: usize, len: usize) -> io::Result<usize> {
        self.buf.write_to(fd, offset, len)
    }

    /// Read up to `len` bytes from `fd` into the mapping at `offset`: one
    /// `read(2)`, as [`Kaddr::read_from`]. Errors also those of
    /// [`kva`](Self::kva), as `io::Error`.
    pub fn read_from(&self, fd: impl AsFd, offset: usize, len: usize) -> io::Result<usize> {
        self.buf.read_from(fd, offset, len)
    }
}

impl Drop for OwnedLwbuf {
    fn drop(&mut self) {
        // SAFETY: dropped once, here, before `_pages` and `sys` (the fields
        // drop after this body) which it borrows; nothing uses it after.
        unsafe { ManuallyDrop::drop(&mut self.buf) };
    }
}

impl fmt::Debug for OwnedLwbuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("OwnedLwbuf").field(&*self.buf).finish()
    }
}

// === fd I/O of the borrowed handle ===

impl Lwbuf<'_> {
    /// Write `len` bytes from `offset` of the mapping to `fd`: one
    /// `writev(2)` from the address on the calling thread's CPU, as
    /// [`Kaddr::write_to`] (a short count or `WouldBlock` on a non-blocking
    /// descriptor). Errors also those of [`kva`](Self::kva), as `io::Error`.
    pub fn write_to(&self, fd: impl AsFd, offset: usize, len: usize) -> io::Result<usize> {
        self.kva()?.write_to(fd, offset, len)
    }

    /// Read up to `len` bytes from `fd` into the mapping at `offset`: one
    /// `read(2)`, as [`Kaddr::read_from`]. Errors also those of
    /// [`kva`](Self::kva), as `io::Error`.
    pub fn read_from(&self, fd: impl AsFd, offset: usize, len: usize) -> io::Result<usize> {
        self.kva()?.read_from(fd, offset, len)
    }
}
