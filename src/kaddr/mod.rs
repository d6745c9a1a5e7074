//! [`Kaddr`]: a borrowed view of mapped bytes.
//!
//! Every mapping of a frame (through the window, a cache handle or the
//! direct map) shares the frame's bytes with every other mapping of it. The
//! safe API therefore never forms a Rust reference to those bytes: it copies
//! in and out with word-sized atomic accesses ([`atomic`]), bounds-checked,
//! and the view borrows the handle it came from so it cannot outlive the
//! mapping. Slices are available through `unsafe` methods whose contract
//! states the aliasing rule.
//!
//! File-descriptor I/O goes straight between a descriptor and the mapped
//! bytes, with no slice and no `unsafe` in the caller ([`Kaddr::write_to`],
//! [`Kaddr::read_from`], batches of [`IoVec`]s): the kernel does the copy.

mod atomic;
mod io;

/// How far apart [`Kaddr::prefault`] touches a mapping: the kernel maps the
/// pages around a read fault of a file mapping up to this block
/// (`fault_around_bytes`, 64 KiB by default, mm/memory.c), so one touch per
/// block faults in all of a freshly mapped range that is in the page cache
/// (a memfd's frames always are).
pub(crate) const PREFAULT_STRIDE: usize = 64 << 10;

/// Fault in the pages of `ptr..ptr + len` from user mode (see
/// [`Kaddr::prefault`]), one touch per [`PREFAULT_STRIDE`].
///
/// # Safety
/// `ptr..ptr + len` lies inside one mapping of frames, readable for the
/// duration of the call.
pub(crate) unsafe fn prefault_range(ptr: *const u8, len: usize) {
    // SAFETY: the caller's contract; every access to mapped frames is an
    // atomic word access or the kernel's.
    unsafe { atomic::prefault(ptr, len, PREFAULT_STRIDE) };
}

/// How a send engine faults in what it sends from a cache's window: one
/// touch per aligned `block` of bytes (what one read fault maps: the
/// fault-around block, or a whole huge page), in mappings that are whole
/// aligned `unit`s of bytes (the window's granule: one mapping, one VMA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PrefaultPlan {
    pub(crate) block: usize,
    pub(crate) unit: usize,
}

impl PrefaultPlan {
    /// The plan for a window over frames of `frame_size` bytes whose
    /// memory maps at least `min_granule` frames at once (a huge page) and
    /// whose mappings are whole granules of `granule` frames.
    pub(crate) fn new(frame_size: usize, min_granule: usize, granule: usize) -> PrefaultPlan {
        let block = PREFAULT_STRIDE
            .max(frame_size.saturating_mul(min_granule))
            .checked_next_power_of_two()
            .unwrap_or(1 << (usize::BITS - 1));
        PrefaultPlan { block, unit: frame_size.saturating_mul(granule) }
    }
}

/// The send engines' prefault (see [`Kaddr::prefault`]): one touch per
/// block of each piece queued, and none for a block an earlier piece
/// touched since the last [`forget`](Self::forget), when blocks lie whole
/// inside one mapping. A cache that maps single pages out of one granule
/// mapping hands the engine a piece per page: without the memory of the
/// last block, the engine touched every page (each a cache miss), where
/// one touch per block faults them all in.
pub(crate) struct Prefaulter {
    plan: PrefaultPlan,
    /// The block of the last word touched, while its mapping is held.
    last: Option<usize>,
}

impl Prefaulter {
    pub(crate) fn new(plan: PrefaultPlan) -> Prefaulter {
        Prefaulter { plan, last: None }
    }

    /// Fault in `ptr..ptr + len`, skipping its first block if the last
    /// touch was there and a block cannot straddle two mappings. Returns
    /// the words loaded.
    ///
    /// # Safety
    /// As [`prefault_range`]'s; and every mapping touched since the last
    /// [`forget`](Self::forget) is still mapped (a block touched once keeps
    /// its page-table entries while its mapping lives).
    pub(crate) unsafe fn touch(&mut self, ptr: *const u8, len: usize) -> usize {
        let PrefaultPlan { block, unit } = self.plan;
        let start = ptr as usize;
        let end = start.saturating_add(len);
        let mut from = start;
        if block <= unit && self.last == Some(start / block) {
            from = (start / block).saturating_add(1).saturating_mul(block).min(end);
        }
        let mut loads = 0;
        if from < end {
            // SAFETY: a part of the caller's range, inside its mapping; the
            // offset keeps `ptr`'s provenance.
            loads = unsafe { atomic::prefault(ptr.wrapping_add(from - start), end - from, block) };
        }
        // The block of the range's last whole aligned word, if it has one:
        // the touch of that block (at or before that word) was made.
        const WORD: usize = std::mem::size_of::<usize>();
        let last_word = (end & !(WORD - 1)).checked_sub(WORD).filter(|&w| w >= start.next_multiple_of(WORD));
        if let Some(w) = last_word {
            self.last = Some(w / block);
        }
        loads
    }

    /// Mappings touched so far may be gone (sent and released): touch
    /// every block again from now on.
    pub(crate) fn forget(&mut self) {
        self.last = None;
    }
}

pub use io::{IoVec, IOV_MAX};

use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::error::{Error, Result};

/// The address of mapped bytes, valid for `'a` (the borrow of the handle or
/// page that keeps the mapping alive).
///
/// Copies are bounds-checked and return [`Error::OutOfBounds`] instead of
/// panicking.
///
/// # What a reader sees while a writer runs (the memory model)
///
/// A frame's bytes are shared memory: every handle, pool buffer, direct-map
/// view and [`PhysMem::read_frame`](crate::PhysMem::read_frame) of one frame
/// reaches the same bytes, from any thread (like any `MAP_SHARED` mapping of
/// a file). The safe methods ([`read_at`](Self::read_at),
/// [`write_at`](Self::write_at), [`fill`](Self::fill) and the `u64` helpers)
/// may race each other freely, and a race is never undefined behaviour:
///
/// - each copy is made of relaxed atomic loads and stores of aligned
///   machine words (8 bytes on 64-bit targets), so a racing reader sees, for
///   every aligned word, either the whole old value or the whole new one;
/// - a copy that spans several words is not atomic as a whole: a reader may
///   see some words of a concurrent write and not others (a *torn* value),
///   and an unaligned `read_u64` spans two words;
/// - a write of part of a word changes only its own bytes: two threads
///   writing different bytes of one word both land.
///
/// The copies are `Relaxed`: they order nothing else. To hand bytes from a
/// writer to a reader, synchronize the two as for any shared data (join the
/// writer, send a message, take a lock, or release a handle that the reader
/// then allocates: both caches order a release before the next allocation
/// of the same mapping). The `unsafe` [`as_slice`](Self::as_slice) and
/// [`as_mut_slice`](Self::as_mut_slice) are for callers who can promise there
/// is no concurrent writer at all (they let the compiler use `memcpy` and
/// SIMD); the kernel's own accesses (`writev`, `sendfile`, `pread` into a
/// mapping) are outside the Rust memory model and never undefined behaviour
/// for the process.
///
/// ```
/// use lwbuf::{Backing, PhysMem};
///
/// let mem = PhysMem::builder().frames(1).backing(Backing::Heap).build()?;
/// let page = mem.alloc_page()?;
/// std::thread::scope(|s| {
///     let view = page.direct().unwrap();
///     s.spawn(move || view.write_at(0, &[1; 64]).unwrap());
///     s.spawn(move || view.write_at(0, &[2; 64]).unwrap());
/// });
/// // Both writes raced; every aligned word holds one of them, whole.
/// let mut b = [0u8; 64];
/// page.direct()?.read_at(0, &mut b)?;
/// for w in b.chunks(8) {
///     assert!(w == [1; 8] || w == [2; 8]);
/// }
/// # Ok::<(), lwbuf::Error>(())
/// ```
#[derive(Clone, Copy)]
pub struct Kaddr<'a> {
    ptr: NonNull<u8>,
    /// The length, and [`READ_ONLY`] for a view of a `PROT_READ` mapping
    /// (a length never reaches that bit: mappings are at most `isize::MAX`
    /// bytes), which keeps the view two words.
    len: usize,
    _borrow: PhantomData<&'a ()>,
}

/// The flag in [`Kaddr`]'s `len` that marks a read-only view.
const READ_ONLY: usize = 1 << (usize::BITS - 1);

// SAFETY: a `Kaddr` is an address plus a length; it only ever copies through
// raw pointers, which is as valid from any thread as from the one that
// obtained it while the borrow `'a` keeps the mapping alive.
unsafe impl Send for Kaddr<'_> {}
// SAFETY: as for `Send`: all access is by raw-pointer copies.
unsafe impl Sync for Kaddr<'_> {}

impl<'a> Kaddr<'a> {
    /// # Safety
    /// `ptr..ptr+len` must be mapped readable and writable for all of `'a`;
    /// `ptr` is page-aligned and `len` a whole number of pages (what the
    /// word copies of [`atomic`] rely on), and the bytes are only ever
    /// accessed through those copies or by callers of the `unsafe` slices.
    pub(crate) unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        // SAFETY: the caller's contract, for a writable mapping.
        unsafe { Kaddr::with_access(ptr, len, true) }
    }

    /// As [`new`](Self::new) for a mapping that may be only readable
    /// (`writable == false`): every write through the view is refused
    /// with [`Error::ReadOnly`] before it touches the bytes.
    ///
    /// # Safety
    /// As `new`'s, with "readable" for "writable" when `!writable`.
    #[inline]
    pub(crate) unsafe fn with_access(ptr: NonNull<u8>, len: usize, writable: bool) -> Self {
        debug_assert!(len < READ_ONLY);
        Kaddr { ptr, len: if writable { len } else { len | READ_ONLY }, _borrow: PhantomData }
    }

    /// Whether writes through this view are allowed: false for a view of a
    /// read-only mapping (see [`Error::ReadOnly`]).
    #[inline]
    pub fn is_writable(&self) -> bool {
        self.len & READ_ONLY == 0
    }

    #[inline]
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.is_writable() {
            Ok(())
        } else {
            Err(Error::ReadOnly)
        }
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
        self.len & !READ_ONLY
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::OutOfBounds { offset, len, size: self.len() }),
        }
    }

    /// Copy `buf.len()` bytes starting at `offset` out of the mapping.
    /// No system call; a copy by machine words that may race writers (see
    /// the memory model above).
    #[inline]
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: `check` keeps the range inside the mapping, which is valid
        // for `'a`, page-aligned and whole pages (constructor contract);
        // `buf` is a distinct Rust buffer.
        unsafe { atomic::load(self.ptr.as_ptr().add(offset), buf) };
        Ok(())
    }

    /// Copy `buf` into the mapping at `offset`. No system call; a copy by
    /// machine words that may race other readers and writers (see the
    /// memory model above).
    #[inline]
    pub fn write_at(&self, offset: usize, buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check(offset, buf.len())?;
        // SAFETY: as in `read_at`; the mapping is writable.
        unsafe { atomic::store(self.ptr.as_ptr().add(offset), buf) };
        Ok(())
    }

    /// Read a native-endian `u64` at `offset` (unaligned is fine).
    #[inline]
    pub fn read_u64(&self, offset: usize) -> Result<u64> {
        self.check(offset, 8)?;
        // SAFETY: as in `read_at`: `check` keeps the 8 bytes inside the
        // mapping.
        Ok(unsafe { atomic::load_u64(self.ptr.as_ptr().add(offset)) })
    }

    /// Fault bytes `offset..offset + len` of the mapping in from user mode,
    /// without changing them: one word load per 64 KiB (the kernel maps the
    /// pages around a fault of a file mapping up to that block).
    ///
    /// Why: on x86-64 Linux a page fault taken inside a system call that
    /// copies from user memory (`writev`, `sendmsg`) always takes the
    /// process's mmap lock (`do_user_addr_fault` in arch/x86/mm/fault.c
    /// uses the per-VMA lock only for faults from user mode), so it waits
    /// behind every `mmap` another thread is making, and a mapping cache
    /// makes them all the time. A window slot just mapped has no page-table
    /// entries. Touching it first moves those faults to user mode, where
    /// they take only the mapping's own lock. [`write_to`](Self::write_to),
    /// [`send_to`](Self::send_to) and [`write_all_to`](Self::write_all_to)
    /// do it for the range they send, and the send engine for every piece
    /// of a window or cache it sends; call it before handing
    /// [`io_vec`](Self::io_vec)s of a fresh mapping to the kernel yourself.
    ///
    /// Errors: [`Error::OutOfBounds`] for a range outside the mapping
    /// (nothing touched).
    ///
    /// ```
    /// use lwbuf::{Backing, PhysMem};
    ///
    /// let mem = PhysMem::builder().frames(2).backing(Backing::Heap).build()?;
    /// let page = mem.alloc_page()?;
    /// let view = page.direct()?;
    /// view.prefault(0, view.len())?; // changes nothing
    /// assert_eq!(view.read_u64(0)?, 0);
    /// assert!(view.prefault(1, view.len()).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[inline]
    pub fn prefault(&self, offset: usize, len: usize) -> Result<()> {
        self.check(offset, len)?;
        // SAFETY: `check` keeps the range inside the mapping, readable for
        // `'a` (constructor contract).
        unsafe { prefault_range(self.ptr.as_ptr().add(offset), len) };
        Ok(())
    }

    /// Write a native-endian `u64` at `offset` (unaligned is fine).
    #[inline]
    pub fn write_u64(&self, offset: usize, v: u64) -> Result<()> {
        self.check_writable()?;
        self.check(offset, 8)?;
        // SAFETY: as in `write_at`: `check` keeps the 8 bytes inside the
        // mapping, which is writable.
        unsafe { atomic::store_u64(self.ptr.as_ptr().add(offset), v) };
        Ok(())
    }

    /// Fill the whole mapping with `byte` (word stores; see the memory
    /// model above).
    ///
    /// Errors: [`Error::ReadOnly`] for a read-only view (nothing written).
    pub fn fill(&self, byte: u8) -> Result<()> {
        self.check_writable()?;
        // SAFETY: the whole range is mapped writable for `'a` (checked just
        // above), page-aligned and whole pages (constructor contract).
        unsafe { atomic::fill(self.ptr.as_ptr(), self.len(), byte) };
        Ok(())
    }

    /// The bytes as a shared slice.
    ///
    /// # Safety
    /// While the slice lives, no one may write these bytes through any
    /// mapping of the frame (another handle, the direct map, the safe
    /// copies of any `Kaddr`, another process).
    pub unsafe fn as_slice(&self) -> &'a [u8] {
        // SAFETY: the range is mapped for `'a`; the caller promises no writer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    /// The bytes as a mutable slice.
    ///
    /// # Safety
    /// While the slice lives, no one else may read or write these bytes
    /// through any mapping of the frame (the safe copies of any `Kaddr`
    /// included), and no other slice of them may exist.
    ///
    /// # Panics
    /// On a read-only view ([`is_writable`](Self::is_writable) is false):
    /// a write through the slice would fault.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &'a mut [u8] {
        assert!(self.is_writable(), "as_mut_slice of a read-only view");
        // SAFETY: the range is mapped writable for `'a` (asserted above);
        // the caller promises exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl fmt::Debug for Kaddr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kaddr")
            .field("addr", &self.ptr)
            .field("len", &self.len())
            .field("writable", &self.is_writable())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::{PrefaultPlan, Prefaulter, PREFAULT_STRIDE};

    const KIB: usize = 1 << 10;

    /// Zeroed memory of `blocks` whole blocks of `block` bytes, and the
    /// first block-aligned address in it.
    fn blocks(block: usize, blocks: usize) -> (Vec<u64>, *const u8) {
        let buf = vec![0u64; (blocks + 1) * block / 8];
        let p = buf.as_ptr().cast::<u8>();
        let off = (p as usize).next_multiple_of(block) - p as usize;
        (buf, p.wrapping_add(off))
    }

    #[test]
    fn plans_follow_the_memory_and_the_granule() {
        assert_eq!(PrefaultPlan::new(4 * KIB, 1, 1), PrefaultPlan { block: PREFAULT_STRIDE, unit: 4 * KIB });
        assert_eq!(PrefaultPlan::new(4 * KIB, 1, 512), PrefaultPlan { block: 64 * KIB, unit: 2048 * KIB });
        // A huge page is faulted in whole: one touch per 2 MiB.
        assert_eq!(PrefaultPlan::new(4 * KIB, 512, 512), PrefaultPlan { block: 2048 * KIB, unit: 2048 * KIB });
        // Extreme sizes saturate instead of overflowing.
        let p = PrefaultPlan::new(usize::MAX, 1, usize::MAX);
        assert_eq!((p.block, p.unit), (1 << (usize::BITS - 1), usize::MAX));
    }

    #[test]
    fn one_touch_per_block_of_page_sized_pieces() {
        let plan = PrefaultPlan::new(4 * KIB, 1, 512);
        let (_buf, base) = blocks(plan.block, 2);
        let mut pf = Prefaulter::new(plan);
        let pages = 2 * plan.block / (4 * KIB);
        // SAFETY: every piece lies in `_buf`, alive and not shared.
        let loads: Vec<usize> =
            (0..pages).map(|i| unsafe { pf.touch(base.wrapping_add(i * 4 * KIB), 4 * KIB) }).collect();
        assert_eq!(loads.iter().sum::<usize>(), 2, "{loads:?}");
        assert_eq!((loads[0], loads[pages / 2]), (1, 1));
        // After a drain the held mappings may be gone: touch again.
        pf.forget();
        // SAFETY: as above.
        assert_eq!(unsafe { pf.touch(base.wrapping_add(4 * KIB), 4 * KIB) }, 1);
    }

    #[test]
    fn granules_smaller_than_a_block_touch_every_piece() {
        // Single-frame granules: a block may span two mappings, so no block
        // is taken as touched by another piece.
        let plan = PrefaultPlan::new(4 * KIB, 1, 1);
        let (_buf, base) = blocks(plan.block, 1);
        let mut pf = Prefaulter::new(plan);
        for i in 0..16 {
            // SAFETY: inside `_buf`.
            assert_eq!(unsafe { pf.touch(base.wrapping_add(i * 4 * KIB), 4 * KIB) }, 1, "piece {i}");
        }
    }

    #[test]
    fn a_piece_without_a_whole_word_does_not_count_as_a_touch() {
        let plan = PrefaultPlan::new(4 * KIB, 1, 512);
        let (_buf, base) = blocks(plan.block, 3);
        let mut pf = Prefaulter::new(plan);
        // SAFETY: every range below lies in `_buf`.
        unsafe {
            // 7 bytes from an odd address: no aligned word, nothing loaded.
            assert_eq!(pf.touch(base.wrapping_add(1), 7), 0);
            assert_eq!(pf.touch(base.wrapping_add(4 * KIB), 4 * KIB), 1);
            // From the middle of the touched block across two more: the
            // first is skipped, the next two are touched.
            assert_eq!(pf.touch(base.wrapping_add(8 * KIB), 2 * plan.block), 2);
            // Empty and zero-length pieces load nothing.
            assert_eq!(pf.touch(base, 0), 0);
        }
    }
}
