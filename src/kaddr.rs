//! [`Kaddr`]: a borrowed view of mapped bytes.
//!
//! Every mapping of a frame (through the window, a cache handle or the
//! direct map) shares the frame's bytes with every other mapping of it. The
//! safe API therefore never forms a Rust reference to those bytes: it copies
//! in and out through raw pointers, bounds-checked, and the view borrows the
//! handle it came from so it cannot outlive the mapping. Slices are available
//! through `unsafe` methods whose contract states the aliasing rule.

use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::error::{Error, Result};

/// The address of mapped bytes, valid for `'a` (the borrow of the handle or
/// page that keeps the mapping alive).
///
/// Copies are bounds-checked and return [`Error::OutOfBounds`] instead of
/// panicking. Other handles of the same frame may write the same bytes
/// concurrently (they are shared memory, like any `MAP_SHARED` mapping):
/// coordinate writers of one frame yourself, as with a file.
#[derive(Clone, Copy)]
pub struct Kaddr<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _borrow: PhantomData<&'a ()>,
}

// SAFETY: a `Kaddr` is an address plus a length; it only ever copies through
// raw pointers, which is as valid from any thread as from the one that
// obtained it while the borrow `'a` keeps the mapping alive.
unsafe impl Send for Kaddr<'_> {}
// SAFETY: as for `Send`: all access is by raw-pointer copies.
unsafe impl Sync for Kaddr<'_> {}

impl<'a> Kaddr<'a> {
    /// # Safety
    /// `ptr..ptr+len` must be mapped readable and writable for all of `'a`.
    pub(crate) unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        Kaddr { ptr, len, _borrow: PhantomData }
    }

    /// The address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The address as an integer (what a kernel would call the KVA).
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Bytes mapped: the frame size, or the run's length for a run mapping.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::OutOfBounds { offset, len, size: self.len }),
        }
    }

    /// Copy `buf.len()` bytes starting at `offset` out of the mapping.
    /// No system call; costs a `memcpy`.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: `check` keeps the range inside the mapping, which is valid
        // for `'a` (constructor contract); `buf` is a distinct Rust buffer, so
        // the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copy `buf` into the mapping at `offset`. No system call.
    pub fn write_at(&self, offset: usize, buf: &[u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: as in `read_at`; the mapping is writable.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.as_ptr().add(offset), buf.len()) };
        Ok(())
    }

    /// Read a native-endian `u64` at `offset` (unaligned is fine).
    pub fn read_u64(&self, offset: usize) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read_at(offset, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }

    /// Write a native-endian `u64` at `offset` (unaligned is fine).
    pub fn write_u64(&self, offset: usize, v: u64) -> Result<()> {
        self.write_at(offset, &v.to_ne_bytes())
    }

    /// Fill the whole mapping with `byte`.
    pub fn fill(&self, byte: u8) {
        // SAFETY: the whole range is mapped writable for `'a`.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), byte, self.len) };
    }

    /// The bytes as a shared slice.
    ///
    /// # Safety
    /// While the slice lives, no one may write these bytes through any
    /// mapping of the frame (another handle, the direct map, another process).
    pub unsafe fn as_slice(&self) -> &'a [u8] {
        // SAFETY: the range is mapped for `'a`; the caller promises no writer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes as a mutable slice.
    ///
    /// # Safety
    /// While the slice lives, no one else may read or write these bytes
    /// through any mapping of the frame, and no other slice of them may exist.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &'a mut [u8] {
        // SAFETY: the range is mapped writable for `'a`; the caller promises
        // exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for Kaddr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kaddr").field("addr", &self.ptr).field("len", &self.len).finish()
    }
}
