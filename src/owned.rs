//! What the owned handles ([`OwnedLwbuf`](crate::OwnedLwbuf),
//! [`OwnedSfBuf`](crate::OwnedSfBuf)) share: the pages they hold, at an
//! address that does not move with the handle.
//!
//! An owned handle is a borrowed handle (`Lwbuf<'static>`, `SfBuf<'static>`)
//! plus what it borrows: an `Arc` of the cache and a clone of its pages. The
//! borrowed handle's release path runs unchanged when the owned one is
//! dropped; the `'static` is made true by the drop order (the borrowed
//! handle first, then the pages, then the cache) and by never handing out a
//! borrow longer than one of the owned handle itself.

use std::ptr::NonNull;

use crate::phys::Page;

/// Clones of one page or a run, on the heap, freed by `Drop`.
///
/// A raw pointer rather than a `Box`: a `Box` moved with its handle would
/// assert unique access to the pages, which the borrowed handle's shared
/// view of them contradicts.
pub(crate) struct OwnedPages {
    ptr: NonNull<[Page]>,
}

// SAFETY: `OwnedPages` owns its `[Page]` as a `Box` would, and `Page` is
// `Send + Sync`.
unsafe impl Send for OwnedPages {}
// SAFETY: as above; `&OwnedPages` only hands out `&[Page]`.
unsafe impl Sync for OwnedPages {}

impl OwnedPages {
    /// Clones of `pages` (one atomic increment each, one heap allocation).
    pub(crate) fn clone_of(pages: &[Page]) -> OwnedPages {
        let b: Box<[Page]> = pages.into();
        OwnedPages { ptr: NonNull::from(Box::leak(b)) }
    }

    /// The pages, for a borrowed handle kept beside them.
    ///
    /// # Safety
    /// The slice must not be used after `self` is dropped.
    pub(crate) unsafe fn hold(&self) -> &'static [Page] {
        // SAFETY: `ptr` came from `Box::leak` and is freed only by `Drop`;
        // the caller does not use the slice past it. Nothing writes the pages.
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for OwnedPages {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `Box::leak` in `clone_of` and is dropped
        // once, here; the owner dropped every borrow of it first.
        drop(unsafe { Box::from_raw(self.ptr.as_ptr()) });
    }
}
