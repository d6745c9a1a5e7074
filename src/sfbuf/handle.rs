//! The handle, [`SfBuf`], and the releases its drop makes: of the entry's
//! own count, or of a pin. A last release lists the entry on the inactive
//! LRU (it stays mapped, so the next alloc of the frame is a hit) and trims
//! the LRU to `max_excess`.
//!
//! # Last releases of two kinds
//!
//! A reference is held either in the entry's own count (`state.rs`) or in
//! a row of pins (`hit.rs`, 9), never moved from one to the other:
//!
//! 11. Pins are never moved into the entry's count. A last release of
//!     either kind (the count reaching zero, a pin given back) fences and
//!     reads the other kind; so does an evictor that just took an entry off
//!     the LRU (`miss.rs`, 10). Of two such racing parties at least one sees
//!     everything at zero (store-buffering) and puts the entry back on the
//!     LRU, through a CAS that sets `ON_LRU` only on a live, unlisted,
//!     unreferenced entry: pushed once (see `SfPool::after_release` for
//!     which generation).
//! 12. A pinned release on an entry still listed, with the LRU within
//!     `max_excess`, does what a last release would (nothing to push, no
//!     trim) by writing only its pin; it still wakes waiters. Its barrier
//!     between the pin's store and the state's load is the light one, so
//!     whoever can make that read stale issues the heavy barrier before
//!     it reads the pins: an evictor taking the entry off the LRU
//!     (`miss.rs`, 10), whether the entry is held through pins or through
//!     its count with `PINNED` set, and a waiter going to sleep
//!     (`wait.rs`), and an evictor deciding that nothing on the LRU is
//!     unused, which the release's read of the LRU's length races
//!     (`SfPool::evictable`). The second case matters: a pin and a central
//!     reference can be out at once (a hitter that lost the race to set
//!     `PINNED` takes the lock-free path), the evictor unlists the entry
//!     for the central reference, the pinned release reads it as still
//!     listed and takes the fast path, and the last central release,
//!     fenced but not paired with a light barrier, can still see the pin
//!     and list nothing; the evictor's second count after its heavy
//!     barrier sees the pin gone and lists the entry again. Only when the
//!     entry is unlisted or the LRU over its cap does the pinned release
//!     fence fully and read the state again, as 11 needs. A last central
//!     release that still sees a pin the fast path gave back returns
//!     without listing, trimming or waking, and a heavy barrier elsewhere
//!     covers each: the listing by the evictor's recount above, the trim
//!     by `SfPool::evictable` (an evictor stops with the LRU over its cap
//!     only after it), the wake-up by the waiter's own. A pin that backs
//!     off (`hit.rs`, 9) may be out while `PINNED` is clear, where no
//!     evictor recounts; its give-back fences fully, pairing with the last
//!     central release's fence as in 11.
//!
//! The loom model `sfbuf_pin_vs_eviction` checks 9-12 and fails when the
//! evictor ignores pins (`PinUnchecked`); `sfbuf_two_pins_vs_eviction` races
//! two pinned last releases. One small model per race of 9-12 each fails
//! with its mutant: `sfbuf_central_and_pin_release` (11: a central and a
//! pinned last release at once; `LastReleaseNoFence`),
//! `sfbuf_pinned_reset` (9: a second-chance look clears `PINNED` between
//! a hitter's two reads; `PinRecheckNoPinned`), `sfbuf_stale_pin_reuse`
//! (11: a backed-off pin counted against the slot's next generation;
//! `UnlistNoRecount`), `sfbuf_unpin_trims` (12: an unpin over the cap
//! trims while a hit pins; `PinRecheckNoRevoked`) and `sfbuf_foreign_unpin`
//! (9: a pin given back by a thread that does not own its row;
//! `ForeignUnpinPlain`); `sfbuf_foreign_unpin_vs_eviction` gives a pin back
//! on another thread while the evictor waits for the slot;
//! `sfbuf_pin_row_handover` (9: a row handed from an exited owner to the
//! next, while a pin taken in it is out; `ClaimRelaxed`).
//! `peak` counts only the entries' own counts (pins are not seen at the
//! moment they are taken).

use std::fmt;
use std::ptr::NonNull;

use super::state::Snapshot;
use super::SfPool;
use crate::kaddr::Kaddr;
use crate::kva::{Hold, MapKey};
use crate::phys::Page;
use crate::sync::{barrier, fence, Ordering};

// === impl SfBuf ===

/// A mapping from the pool; dropping it releases it (it stays cached).
/// `Send` and `Sync`: the address is valid in every thread.
///
/// It borrows the pool and its pages, and a view of its bytes borrows it,
/// so none of them can outlive the mapping. These do not compile:
///
/// ```compile_fail,E0597
/// # use std::sync::Arc;
/// # use lwbuf::{Backing, ModelMmu, PhysMem, SfPool, Wait};
/// # let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
/// let pool = SfPool::builder(Arc::new(ModelMmu::new(&mem, 4)?)).build()?;
/// let buf = {
///     let page = mem.alloc_page()?;
///     pool.alloc(&page, Wait::NoWait)? // the page is dropped while mapped
/// };
/// drop(buf);
/// # Ok::<(), lwbuf::Error>(())
/// ```
///
/// ```compile_fail,E0597
/// # use std::sync::Arc;
/// # use lwbuf::{Backing, ModelMmu, PhysMem, SfPool, Wait};
/// # let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
/// let page = mem.alloc_page()?;
/// let buf = {
///     let pool = SfPool::builder(Arc::new(ModelMmu::new(&mem, 4)?)).build()?;
///     pool.alloc(&page, Wait::NoWait)? // the pool is dropped under the handle
/// };
/// drop(buf);
/// # Ok::<(), lwbuf::Error>(())
/// ```
///
/// ```compile_fail,E0597
/// # use std::sync::Arc;
/// # use lwbuf::{Backing, ModelMmu, PhysMem, SfPool, Wait};
/// # let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
/// # let pool = SfPool::builder(Arc::new(ModelMmu::new(&mem, 4)?)).build()?;
/// let page = mem.alloc_page()?;
/// let bytes = {
///     let buf = pool.alloc(&page, Wait::NoWait)?;
///     buf.kva() // the view outlives the handle
/// };
/// bytes.fill(0);
/// # Ok::<(), lwbuf::Error>(())
/// ```
#[must_use = "dropping an SfBuf releases its mapping at once"]
pub struct SfBuf<'a> {
    pub(super) pool: &'a SfPool,
    pub(super) hold: Hold<'a>,
    pub(super) slot: u32,
    pub(super) addr: NonNull<u8>,
    /// The row of pins this handle's reference was counted in (`hit.rs`,
    /// 9), or `NO_PIN` for the entry's own count.
    pub(super) pin: u32,
}

pub(super) const NO_PIN: u32 = u32::MAX;

// SAFETY: the address is valid process-wide while the handle holds its
// reference; the pool is Sync.
unsafe impl Send for SfBuf<'_> {}
// SAFETY: `&SfBuf` only reads immutable fields.
unsafe impl Sync for SfBuf<'_> {}

impl<'a> SfBuf<'a> {
    /// The mapped bytes (the frame, or the whole run). No system call. The
    /// view borrows the handle, so it cannot outlive the mapping.
    pub fn kva(&self) -> Kaddr<'_> {
        let len = self.hold.len() * self.pool.kva.slot_size();
        // SAFETY: the handle holds a reference on the entry, which keeps the
        // mapping of `len` bytes until the handle is dropped.
        unsafe { self.pool.kva.view(self.addr, len) }
    }

    /// The first (or only) page.
    pub fn page(&self) -> &'a Page {
        &self.hold[0]
    }

    /// Every page mapped.
    pub fn pages(&self) -> &'a [Page] {
        self.hold
    }

    /// The window slot where the handle's mapping starts: its first page's,
    /// or with a mapping granule above 1 frame, the granule's first slot.
    pub fn slot(&self) -> crate::Slot {
        crate::Slot(self.slot as usize)
    }
}

// === releases ===

impl SfPool {
    /// A handle on a reference of the entry's own count: the entry maps
    /// `key` at `addr`, the handle the pages it holds.
    pub(super) fn handle<'a>(&'a self, key: MapKey, hold: Hold<'a>, slot: u32, addr: NonNull<u8>) -> SfBuf<'a> {
        let addr = self.kva.addr_in(key, addr, hold[0].pfn().0);
        SfBuf { pool: self, hold, slot, addr, pin: NO_PIN }
    }

    /// Give back a reference of the entry's own count.
    pub(super) fn release(&self, slot: u32) {
        let now = self.entries[slot as usize].state.release();
        if now.ref_count() != 0 {
            return;
        }
        self.counters.used.sub(1);
        self.after_release(slot as usize, now);
    }

    /// Give back a pinned reference. On an entry still on the LRU, with the
    /// LRU within its cap, that is all a last release would do (it would
    /// push nothing and trim nothing), so nothing shared is written (12).
    #[inline(always)]
    pub(super) fn unpin(&self, slot: u32, pin: u32) {
        self.unpin_with(slot, pin, false);
    }

    /// [`unpin`](Self::unpin) of a pin that backed off (`hit.rs`, 9), with
    /// a full fence in place of the light barrier: `PINNED` may be clear
    /// while such a pin is out (an evictor counted none and gave the entry
    /// a second chance, or killed it and the slot was reused), so an
    /// evictor may unlist the entry for a central reference without the
    /// heavy barrier and recount of 12; the last central release then
    /// fences and reads the pins, and this release's fence pairs with it
    /// (11).
    pub(super) fn unpin_fenced(&self, slot: u32, pin: u32) {
        self.unpin_with(slot, pin, true);
    }

    #[inline(always)]
    fn unpin_with(&self, slot: u32, pin: u32, fenced: bool) {
        // Release: the evictor's Acquire read of the pins sees every access
        // this holder made through the address before it unmaps. The row's
        // owner takes its pin back out of its own row with a load and a
        // store; any other thread (the pin's handle was sent to it, or the
        // row changed hands) subtracts in its own shared row, never writing
        // a row it does not own (the sum over the rows is what counts).
        let rows = self.pin_rows();
        let cell = self.pin_cell(pin as usize, slot as usize);
        let owner = rows.own == Some(pin as usize)
            || (crate::sync::mutant!(ForeignUnpinPlain) && (pin as usize) < super::hit::PIN_STRIPES);
        if owner {
            cell.store(cell.load(Ordering::Relaxed).wrapping_sub(1), Ordering::Release);
        } else {
            self.pin_cell(rows.shared, slot as usize).fetch_sub(1, Ordering::Release);
        }
        // The light barrier (12): against an evictor that takes the entry
        // off the LRU, issues the heavy barrier and then reads the pins
        // (`after_unlisting`): either it sees this decrement, or we see
        // `ON_LRU` cleared below and take the full path. Likewise against
        // a waiter's heavy barrier (`wait.rs`). Not a full fence: that
        // would wait for every load before it, and a holder's last read of
        // the page (a TLB miss, a cache miss) would then be paid in full by
        // each release instead of overlapping the next page's work.
        if fenced {
            fence(Ordering::SeqCst);
        } else {
            barrier::light();
        }
        let s = self.entries[slot as usize].state.load(Ordering::Relaxed);
        if !s.is_listed() || self.lru_len.load(Ordering::Relaxed) > self.max_excess() {
            self.unpin_full(slot);
        } else {
            // A waiter may be waiting for this entry to become evictable.
            self.waitq.wake_fenced();
        }
    }

    /// The rest of a pinned release that found the entry off the LRU or
    /// the LRU over its cap: out of the inlined release.
    #[cold]
    #[inline(never)]
    fn unpin_full(&self, slot: u32) {
        // The full path reads the state after a full fence, against the
        // other kind of last release (11), which fences fully too.
        fence(Ordering::SeqCst);
        let s = self.entries[slot as usize].state.load(Ordering::Relaxed);
        self.after_release(slot as usize, s);
    }

    /// After a release that may have been the entry's last (its own count
    /// at zero, or a pin given back): if no reference of either kind is
    /// left, put the entry on the LRU unless it is there, then trim and
    /// wake as a last release does (11).
    ///
    /// Both kinds of release run this after their decrement and a SeqCst
    /// fence, then read the other kind: of two last releases racing (one of
    /// each, or two pins), at least one sees both counts at zero
    /// (store-buffering). Both may: the LRU is claimed by a CAS that sets
    /// `ON_LRU` only on a live, unlisted, unreferenced entry of the
    /// generation `seen`, so it is pushed once. From `release`, `seen` is
    /// what its own decrement left, so a kill or reuse since fails the CAS.
    /// From `unpin`, `seen` is read after the pin went, i.e. the current
    /// generation, on purpose: a hitter that backed off from an old
    /// generation leaves a pin for a moment, a look at the reused slot may
    /// count it and unlist the new entry, and then that late unpin is the
    /// release that must list it again.
    fn after_release(&self, slot: usize, seen: Snapshot) {
        let e = &self.entries[slot];
        if !crate::sync::mutant!(LastReleaseNoFence) {
            fence(Ordering::SeqCst);
        }
        if self.pinned(slot) != 0 {
            return;
        }
        if e.state.list_unused_of(seen) {
            self.push_lru(slot);
            // SeqCst: the cap is read below; see `set_max_excess`.
            fence(Ordering::SeqCst);
        }
        if self.lru_len.load(Ordering::Relaxed) > self.max_excess() {
            self.trim();
        }
        self.waitq.wake();
    }
}

impl Drop for SfBuf<'_> {
    fn drop(&mut self) {
        if self.pin == NO_PIN {
            self.pool.release(self.slot);
        } else {
            self.pool.unpin(self.slot, self.pin);
        }
    }
}

impl fmt::Debug for SfBuf<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SfBuf")
            .field("pfn", &self.page().pfn().0)
            .field("pages", &self.hold.len())
            .field("slot", &self.slot)
            .finish()
    }
}
