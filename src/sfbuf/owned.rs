//! [`OwnedSfBuf`]: a pool handle that owns what it maps through (an `Arc`
//! of the pool and clones of its pages), so it is `'static`: it can be held
//! across an `.await`, moved into a spawned task or thread, stored in a
//! struct. Made by [`SfPool::alloc_owned`] and [`SfPool::alloc_run_owned`].
//!
//! It is an [`SfBuf`] inside, with the same semantics and statistics (the
//! release on drop, of the entry's own count or of a pin). What it adds
//! costs an `Arc` clone, a `Page` clone and one small heap allocation per
//! handle, and their undoing on drop; the borrowed [`SfBuf`] stays the
//! zero-cost path (`benches/sfbuf.rs`, group `sfbuf_owned_hit`).

use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::AsFd;
use std::sync::Arc;

use super::{SfBuf, SfPool, Wait};
use crate::error::Result;
use crate::kaddr::Kaddr;
use crate::owned::OwnedPages;
use crate::phys::Page;

/// A mapping from the pool that owns the pool and its pages: `'static`,
/// `Send` and `Sync`, like [`SfBuf`] in every other respect (`&OwnedSfBuf`
/// only reads the handle's fixed address and length).
///
/// The pool lives as long as any owned handle of it: dropping the last
/// other `Arc<SfPool>` while a handle is alive is fine, the handle's drop
/// then tears the pool down after its release.
///
/// ```
/// use std::sync::Arc;
/// use lwbuf::{PhysMem, SfPool, Wait, Window};
///
/// let mem = PhysMem::builder().frames(64).build()?;
/// let pool = Arc::new(SfPool::builder(Arc::new(Window::builder(&mem).slots(32).build()?)).build()?);
/// let page = mem.alloc_page()?;
///
/// let buf = pool.alloc_owned(&page, Wait::NoWait)?; // 'static
/// buf.kva().write_at(0, b"hello")?;
/// let read = std::thread::spawn(move || {
///     let mut b = [0u8; 5];
///     buf.kva().read_at(0, &mut b)?;
///     Ok::<_, lwbuf::Error>(b)                    // `buf` is released on this thread
/// });
/// assert_eq!(&read.join().unwrap()?, b"hello");
/// assert_eq!(pool.stats().used, 0);
/// # Ok::<(), lwbuf::Error>(())
/// ```
#[must_use = "dropping an OwnedSfBuf releases its mapping at once"]
pub struct OwnedSfBuf {
    // Drop order: `buf` (explicitly, in `Drop`), then `_pages`, then `pool`:
    // `buf` borrows both for the `'static` it claims.
    buf: ManuallyDrop<SfBuf<'static>>,
    _pages: OwnedPages,
    pool: Arc<SfPool>,
}

// `Send + Sync + 'static`, asserted at compile time.
const _: fn() = || {
    fn owned<T: Send + Sync + 'static>() {}
    owned::<OwnedSfBuf>();
};

impl SfPool {
    /// [`alloc`](Self::alloc), returning a handle that owns a clone of
    /// `self` and of `page`: `'static`, to hold across an `.await` or move
    /// to another thread. Costs what `alloc` does, plus an `Arc` and a
    /// `Page` clone and one heap allocation (no system call on a hit).
    /// Errors as `alloc`.
    pub fn alloc_owned(self: &Arc<Self>, page: &Page, how: Wait<'_>) -> Result<OwnedSfBuf> {
        self.owned(std::slice::from_ref(page), false, how)
    }

    /// [`alloc_run`](Self::alloc_run), returning an owned handle (clones of
    /// `self` and of every page). Errors as `alloc_run`.
    pub fn alloc_run_owned(self: &Arc<Self>, pages: &[Page], how: Wait<'_>) -> Result<OwnedSfBuf> {
        self.owned(pages, true, how)
    }

    fn owned(self: &Arc<Self>, pages: &[Page], run: bool, how: Wait<'_>) -> Result<OwnedSfBuf> {
        let pool = Arc::clone(self);
        let pages = OwnedPages::clone_of(pages);
        // SAFETY: `OwnedSfBuf` keeps `pages` and `pool` until it has dropped
        // the handle that borrows them (its `Drop`), and lends the handle out
        // only for borrows of itself. The `SfPool` lives in the `Arc`'s heap
        // allocation, which does not move.
        let (hold, cache): (&'static [Page], &'static SfPool) = unsafe { (pages.hold(), &*Arc::as_ptr(&pool)) };
        let buf = if run { cache.alloc_run(hold, how)? } else { cache.alloc(&hold[0], how)? };
        Ok(OwnedSfBuf { buf: ManuallyDrop::new(buf), _pages: pages, pool })
    }
}

impl OwnedSfBuf {
    /// The mapped bytes, as [`SfBuf::kva`]. No system call.
    #[inline]
    pub fn kva(&self) -> Kaddr<'_> {
        self.buf.kva()
    }

    /// The borrowed handle inside, for code written against [`SfBuf`].
    pub fn as_sfbuf(&self) -> &SfBuf<'_> {
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

    /// The window slot of the mapping's first page.
    pub fn slot(&self) -> crate::Slot {
        self.buf.slot()
    }

    /// The pool the handle keeps alive.
    pub fn pool(&self) -> &Arc<SfPool> {
        &self.pool
    }

    /// Write `len` bytes from `offset` of the mapping to `fd`: one
    /// `writev(2)`, as [`Kaddr::write_to`].
    pub fn write_to(&self, fd: impl AsFd, offset: usize, len: usize) -> io::Result<usize> {
        self.kva().write_to(fd, offset, len)
    }

    /// Read up to `len` bytes from `fd` into the mapping at `offset`: one
    /// `read(2)`, as [`Kaddr::read_from`].
    pub fn read_from(&self, fd: impl AsFd, offset: usize, len: usize) -> io::Result<usize> {
        self.kva().read_from(fd, offset, len)
    }
}

impl Drop for OwnedSfBuf {
    fn drop(&mut self) {
        // SAFETY: dropped once, here, before `_pages` and `pool` (the fields
        // drop after this body) which it borrows; nothing uses it after.
        unsafe { ManuallyDrop::drop(&mut self.buf) };
    }
}

impl fmt::Debug for OwnedSfBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("OwnedSfBuf").field(&*self.buf).finish()
    }
}

// === fd I/O of the borrowed handle ===

impl SfBuf<'_> {
    /// Write `len` bytes from `offset` of the mapping to `fd`: one
    /// `writev(2)`, as [`Kaddr::write_to`] (a short count or `WouldBlock`
    /// on a non-blocking descriptor).
    pub fn write_to(&self, fd: impl AsFd, offset: usize, len: usize) -> io::Result<usize> {
        self.kva().write_to(fd, offset, len)
    }

    /// Read up to `len` bytes from `fd` into the mapping at `offset`: one
    /// `read(2)`, as [`Kaddr::read_from`].
    pub fn read_from(&self, fd: impl AsFd, offset: usize, len: usize) -> io::Result<usize> {
        self.kva().read_from(fd, offset, len)
    }
}
