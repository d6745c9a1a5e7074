//! Copies in and out of shared bytes with word-sized relaxed atomics.
//!
//! Every byte a [`Kaddr`](super::Kaddr) reaches may be written at the same
//! moment through another mapping of the same frame, by another thread. A
//! plain `memcpy` racing a write is a data race, which is undefined behaviour
//! even when nobody cares about the value read; so is a volatile copy. What
//! the memory model does allow is racing *atomic* accesses of one size, so
//! every access here is a relaxed atomic load, store or compare-exchange of
//! one aligned machine word ([`usize`]), never of a byte or of another size
//! (racing atomic writes of different sizes are undefined too):
//!
//! - the aligned words a copy covers whole are loaded or stored;
//! - a word the copy covers only in part (at most one at each end) is loaded
//!   whole and the wanted bytes taken out of it; a store merges its bytes
//!   into the word with a compare-exchange loop, so the neighbours' bytes,
//!   which may be another writer's, are left as they are.
//!
//! A frame is mapped at a page-aligned address in every view (window slot,
//! direct map, heap model), so a byte belongs to the same word in all of them
//! and the words of two views never straddle each other. The word that holds
//! a copy's first or last byte lies inside the mapping for the same reason.
//!
//! On x86-64 and AArch64 a relaxed word load or store is an ordinary `mov` /
//! `ldr` / `str`; what it costs against `memcpy` is the vector width (8
//! bytes a step instead of 32), measured in `benches/lwbuf.rs`, whose direct
//! map baseline copies the same way.
//!
//! Loom does not see these accesses (they are std atomics on the frame's
//! memory, not state of the protocol): the loom models check the protocols,
//! Miri checks these copies.

use std::sync::atomic::{AtomicUsize, Ordering};

const WORD: usize = std::mem::size_of::<usize>();

/// The word containing `p`, and `p`'s offset in it.
#[inline(always)]
fn word_of(p: *mut u8) -> (*mut usize, usize) {
    let off = (p as usize) % WORD;
    // `wrapping_sub` keeps `p`'s provenance; the word lies inside the mapping
    // (module docs), which the caller's contract covers.
    (p.wrapping_sub(off).cast::<usize>(), off)
}

/// # Safety
/// `w` is aligned and valid for reads and writes for the duration of the
/// call, and every concurrent access to it is an atomic access of a word.
#[inline(always)]
unsafe fn atomic<'a>(w: *mut usize) -> &'a AtomicUsize {
    // SAFETY: the caller's contract is `from_ptr`'s.
    unsafe { AtomicUsize::from_ptr(w) }
}

/// One relaxed load of the aligned word at `w`.
///
/// # Safety
/// `w` is aligned and valid for reads for the duration of the call, and
/// every concurrent access to it is an atomic access of a word. The memory
/// may be read-only (a `PROT_READ` window): a `Relaxed` atomic load of at
/// most a register's width is allowed there (core::sync::atomic, "Atomic
/// accesses to read-only memory"), and every load of this module is one.
#[inline(always)]
unsafe fn load_word(w: *mut usize) -> usize {
    // SAFETY: the caller's contract, with the read-only exception above for
    // `from_ptr`'s "valid for writes".
    unsafe { AtomicUsize::from_ptr(w) }.load(Ordering::Relaxed)
}

/// Copy `dst.len()` bytes from shared memory at `src` into `dst`.
///
/// # Safety
/// `src..src + dst.len()` lies inside one mapping whose base is word-aligned
/// and whose length is a multiple of the word, readable for the duration of
/// the call, and every concurrent access to it is made through this module.
#[inline]
pub(crate) unsafe fn load(src: *mut u8, dst: &mut [u8]) {
    let n = dst.len();
    if n == 0 {
        return;
    }
    // Every write to `dst` below goes through `out` (a reborrow of `dst`
    // in between would invalidate it).
    let out = dst.as_mut_ptr();
    let (w, off) = word_of(src);
    let mut done = 0;
    if off != 0 {
        // SAFETY: the containing word lies inside the mapping (module docs).
        let v = unsafe { load_word(w) }.to_ne_bytes();
        done = (WORD - off).min(n);
        // SAFETY: `done <= n` bytes into `dst`, from a local array.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr().add(off), out, done) };
    }
    // `src + done` is word-aligned from here on. Four words a step: the
    // loads must stay word-sized atomics, but the private destination can
    // take them in one wide store (measured about 1.3x faster than a word
    // at a time on x86-64, store-bound either way).
    while n - done >= 4 * WORD {
        // SAFETY: four whole aligned words inside the range.
        let w = unsafe {
            let p = src.add(done).cast::<usize>();
            [load_word(p), load_word(p.add(1)), load_word(p.add(2)), load_word(p.add(3))]
        };
        // SAFETY: `done + 4 * WORD <= n`, inside `dst`, which may be unaligned.
        unsafe { out.add(done).cast::<[usize; 4]>().write_unaligned(w) };
        done += 4 * WORD;
    }
    while n - done >= WORD {
        // SAFETY: a whole aligned word inside the range.
        let v = unsafe { load_word(src.add(done).cast::<usize>()) };
        // SAFETY: `done + WORD <= n`, inside `dst`, which may be unaligned.
        unsafe { out.add(done).cast::<usize>().write_unaligned(v) };
        done += WORD;
    }
    if done < n {
        // SAFETY: the word holding the last bytes lies inside the mapping.
        let v = unsafe { load_word(src.add(done).cast::<usize>()) }.to_ne_bytes();
        // SAFETY: the last `n - done < WORD` bytes of `dst`, from a local array.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out.add(done), n - done) };
    }
}

/// Load the native-endian `u64` at `src`: on 64-bit targets, one word load
/// when `src` is aligned (the common case, a field of a page); otherwise as
/// [`load`].
///
/// # Safety
/// As [`load`]'s, for the 8 bytes at `src`.
#[inline(always)]
pub(crate) unsafe fn load_u64(src: *mut u8) -> u64 {
    #[cfg(target_pointer_width = "64")]
    if (src as usize) % WORD == 0 {
        // SAFETY: an aligned word inside the mapping (caller's contract).
        return unsafe { load_word(src.cast::<usize>()) } as u64;
    }
    let mut b = [0u8; 8];
    // SAFETY: the caller's contract is `load`'s.
    unsafe { load(src, &mut b) };
    u64::from_ne_bytes(b)
}

/// Store the native-endian `u64` `v` at `dst`: on 64-bit targets, one word
/// store when `dst` is aligned; otherwise as [`store`].
///
/// # Safety
/// As [`store`]'s, for the 8 bytes at `dst`.
#[inline(always)]
pub(crate) unsafe fn store_u64(dst: *mut u8, v: u64) {
    #[cfg(target_pointer_width = "64")]
    if (dst as usize) % WORD == 0 {
        // SAFETY: an aligned word inside the mapping (caller's contract);
        // the store covers the whole word, so no neighbour's byte is lost.
        return unsafe { atomic(dst.cast::<usize>()) }.store(v as usize, Ordering::Relaxed);
    }
    // SAFETY: the caller's contract is `store`'s.
    unsafe { store(dst, &v.to_ne_bytes()) }
}

/// Load one word in each `stride`-byte block (aligned) that
/// `ptr..ptr + len` reaches, among the words the range covers whole, and
/// discard it: the loads fault missing pages in from user mode. A block
/// whose part of the range holds no whole aligned word is skipped. Returns
/// the words loaded.
///
/// # Safety
/// `ptr..ptr + len` lies inside one mapping, readable for the duration of
/// the call, and every concurrent access to it is made through this module
/// or by the kernel. `stride` is a power of two.
#[inline]
pub(crate) unsafe fn prefault(ptr: *const u8, len: usize, stride: usize) -> usize {
    debug_assert!(stride.is_power_of_two());
    let (start, end) = (ptr as usize, (ptr as usize).saturating_add(len));
    let mut at = start;
    let mut loads = 0;
    while at < end {
        let w = at.next_multiple_of(WORD);
        if w.checked_add(WORD).is_some_and(|e| e <= end) {
            // SAFETY: an aligned word inside the range (caller's contract);
            // the offset keeps `ptr`'s provenance.
            let v = unsafe { load_word(ptr.wrapping_add(w - start).cast_mut().cast::<usize>()) };
            std::hint::black_box(v);
            loads += 1;
        }
        at = (at & !(stride - 1)).saturating_add(stride);
    }
    loads
}

/// Merge `bytes` into the word at `w` from byte `off`, leaving its other
/// bytes as they are (a compare-exchange loop).
///
/// # Safety
/// As [`store`]'s, for the word `w`.
#[inline]
unsafe fn merge(w: *mut usize, off: usize, bytes: &[u8]) {
    // SAFETY: the word lies inside the mapping (caller's contract).
    let a = unsafe { atomic(w) };
    let mut old = a.load(Ordering::Relaxed);
    loop {
        let mut b = old.to_ne_bytes();
        b[off..off + bytes.len()].copy_from_slice(bytes);
        let new = usize::from_ne_bytes(b);
        if new == old {
            return;
        }
        match a.compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(now) => old = now,
        }
    }
}

/// Copy `src` into shared memory at `dst`.
///
/// # Safety
/// `dst..dst + src.len()` lies inside one mapping whose base is word-aligned
/// and whose length is a multiple of the word, writable for the duration of
/// the call, and every concurrent access to it is made through this module.
#[inline]
pub(crate) unsafe fn store(dst: *mut u8, src: &[u8]) {
    let n = src.len();
    if n == 0 {
        return;
    }
    let (w, off) = word_of(dst);
    let mut done = 0;
    if off != 0 {
        done = (WORD - off).min(n);
        // SAFETY: the containing word lies inside the mapping.
        unsafe { merge(w, off, &src[..done]) };
    }
    while n - done >= WORD {
        // SAFETY: `done + WORD <= n`, inside `src`, which may be unaligned.
        let v = unsafe { src.as_ptr().add(done).cast::<usize>().read_unaligned() };
        // SAFETY: a whole aligned word inside the range.
        unsafe { atomic(dst.add(done).cast::<usize>()) }.store(v, Ordering::Relaxed);
        done += WORD;
    }
    if done < n {
        // SAFETY: the word holding the last bytes lies inside the mapping.
        unsafe { merge(dst.add(done).cast::<usize>(), 0, &src[done..]) };
    }
}

/// Set `len` bytes at `dst` (word-aligned, a whole number of words) to
/// `byte`.
///
/// # Safety
/// As [`store`]'s; `dst` is word-aligned and `len` a multiple of the word.
#[inline]
pub(crate) unsafe fn fill(dst: *mut u8, len: usize, byte: u8) {
    debug_assert!(dst as usize % WORD == 0 && len % WORD == 0);
    let v = usize::from_ne_bytes([byte; WORD]);
    let mut done = 0;
    while done < len {
        // SAFETY: a whole aligned word inside the range.
        unsafe { atomic(dst.add(done).cast::<usize>()) }.store(v, Ordering::Relaxed);
        done += WORD;
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Every offset within three words and every length up to nine words
    /// (the four-word steps, single words and partial ends), against a
    /// plain copy.
    #[test]
    fn every_offset_and_length() {
        const WORDS: usize = 12;
        let mut mem = vec![0usize; WORDS];
        let base = mem.as_mut_ptr().cast::<u8>();
        let pattern: Vec<u8> = (0..WORDS * WORD).map(|i| (i as u8).wrapping_mul(7).wrapping_add(1)).collect();
        let step = if cfg!(miri) { 5 } else { 1 };
        for off in 0..3 * WORD {
            for len in (0..=9 * WORD).step_by(step) {
                // SAFETY: `mem` is WORDS aligned words, only this thread uses it.
                unsafe { fill(base, WORDS * WORD, 0xAA) };
                // SAFETY: as above, `off + len` stays inside.
                unsafe { store(base.add(off), &pattern[..len]) };
                let mut all = vec![0u8; WORDS * WORD];
                // SAFETY: as above.
                unsafe { load(base, &mut all) };
                for (i, &b) in all.iter().enumerate() {
                    let want = if (off..off + len).contains(&i) { pattern[i - off] } else { 0xAA };
                    assert_eq!(b, want, "store at {off}+{len}: byte {i}");
                }
                let mut part = vec![0u8; len];
                // SAFETY: as above.
                unsafe { load(base.add(off), &mut part) };
                assert_eq!(part, &pattern[..len], "load at {off}+{len}");
            }
        }
    }
}
