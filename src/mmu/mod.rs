//! The `Mmu` seam: what the caches need from an address space.
//!
//! Two implementations: [`Window`], a reserved `PROT_NONE` region into which
//! frames of the memfd are `mmap`ped, and [`ModelMmu`], which makes no
//! system call at all (a slot's address is the frame's direct-map address) so
//! loom models and simulations of hundreds of CPUs can run on it. Nothing
//! above this module calls `mmap`.

mod fault;
mod model;
mod window;

pub use fault::{Fault, FaultStats, FaultyMmu};
pub use model::ModelMmu;
pub use window::{Window, WindowBuilder};

use std::fmt;
use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::phys::{Pfn, PhysMem};
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// The index of a slot in a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(pub usize);

/// The part of [`Mmu`] that only this crate implements: the caches trust
/// what an `Mmu` says (the address `enter` returns is dereferenced by safe
/// handles), and they need to claim a window's slots for one allocator.
pub(crate) mod sealed {
    use crate::error::Result;

    pub trait Sealed {
        /// Claim every slot for one slot allocator (a cache). Fails with
        /// [`crate::Error::WindowClaimed`] if another holds the claim or
        /// frames are entered now. Wrappers delegate to the window they wrap.
        fn claim(&self) -> Result<()>;
        /// Give the claim back (the cache is gone and has removed all it
        /// entered).
        fn unclaim(&self);
    }
}

/// An address space into which frames of one [`PhysMem`] are mapped, one
/// frame per slot.
///
/// Implementations count what they do ([`MmuStats`]). The trait is sealed:
/// the caches dereference the addresses it returns from safe code, so only
/// the crate's own [`Window`], [`ModelMmu`] and [`FaultyMmu`] (a wrapper
/// that injects failures) implement it.
///
/// A window serves one cache at a time ([`crate::Lwbufs`],
/// [`crate::SfPool`] or a sendfile `WindowSource`): building a second one
/// over a window that is in use fails with [`Error::WindowClaimed`], and the
/// window can serve another once the first is dropped.
pub trait Mmu: sealed::Sealed + Send + Sync + fmt::Debug {
    /// The memory whose frames this MMU maps.
    fn phys(&self) -> &PhysMem;

    /// Slots in the window.
    fn capacity(&self) -> usize;

    /// Bytes per slot (the frame size).
    fn slot_size(&self) -> usize {
        self.phys().frame_size()
    }

    /// Map `count` contiguous frames starting at `pfn` into the `count`
    /// adjacent slots starting at `slot`, with one operation (one system call
    /// for the window). Returns the address of the first slot; the run is
    /// contiguous from there.
    ///
    /// Slots that already have a frame entered are refused with
    /// [`Error::SlotOccupied`] before anything changes.
    ///
    /// # Safety
    /// The caller owns the slots (from the slot allocator, or by hand on a
    /// window no cache serves), and no reference to their old contents may
    /// be live.
    unsafe fn enter(&self, slot: Slot, pfn: Pfn, count: usize) -> Result<NonNull<u8>>;

    /// Remove the mappings of `count` adjacent slots entered together (or
    /// separately) from `slot`. After it returns `Ok`, nothing is mapped
    /// there and the slots may go back to the allocator.
    ///
    /// # Safety
    /// No access through these slots may happen during or after the call.
    unsafe fn remove(&self, slot: Slot, count: usize) -> Result<()>;

    /// The frame entered at `slot` now, if any. No system call.
    fn translate(&self, slot: Slot) -> Option<Pfn>;

    /// The address of `slot` with whatever is entered there, `None` if
    /// nothing is. No system call.
    fn kva(&self, slot: Slot) -> Option<NonNull<u8>>;

    /// Counters of operations and system calls.
    fn stats(&self) -> MmuStats;
}

/// Counters of an [`Mmu`]. `enters` and `removes` count calls (a run is one);
/// `pages_entered`/`pages_removed` count slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MmuStats {
    /// Calls of `enter`.
    pub enters: u64,
    /// Calls of `remove`.
    pub removes: u64,
    /// Slots entered, summed over calls.
    pub pages_entered: u64,
    /// Slots removed, summed over calls.
    pub pages_removed: u64,
    /// System calls made (0 for the model).
    pub syscalls: u64,
    /// Removes that fell back to `munmap` because the kernel refused the
    /// `PROT_NONE` remap (`ENOMEM` at the `vm.max_map_count` wall).
    pub remove_fallbacks: u64,
    /// Slots mapped now.
    pub mapped: u64,
}

impl MmuStats {
    /// Field-wise difference `self - earlier`, for measuring one operation.
    pub fn since(&self, earlier: &MmuStats) -> MmuStats {
        MmuStats {
            enters: self.enters - earlier.enters,
            removes: self.removes - earlier.removes,
            pages_entered: self.pages_entered - earlier.pages_entered,
            pages_removed: self.pages_removed - earlier.pages_removed,
            syscalls: self.syscalls - earlier.syscalls,
            remove_fallbacks: self.remove_fallbacks - earlier.remove_fallbacks,
            mapped: self.mapped,
        }
    }
}

impl fmt::Display for MmuStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "enters {} ({} pages), removes {} ({} pages), syscalls {}, munmap fallbacks {}, mapped now {}",
            self.enters,
            self.pages_entered,
            self.removes,
            self.pages_removed,
            self.syscalls,
            self.remove_fallbacks,
            self.mapped
        )
    }
}

// === SlotTable: state and counters shared by both backends ===

/// Per-slot record of what is entered (`pfn + 1`, 0 for nothing) plus flags,
/// and the counters. Both backends keep one so `translate` and the stats
/// mean the same on both.
#[derive(Debug)]
pub(crate) struct SlotTable {
    slots: Box<[AtomicUsize]>,
    /// One cache's slot allocator holds the window (see [`sealed::Sealed`]).
    claimed: AtomicBool,
    frames: usize,
    enters: AtomicU64,
    removes: AtomicU64,
    pages_entered: AtomicU64,
    pages_removed: AtomicU64,
    syscalls: AtomicU64,
    remove_fallbacks: AtomicU64,
    mapped: AtomicU64,
}

/// The reservation of this slot was lost (it was `munmap`ped): the next
/// enter must not use `MAP_FIXED` blindly.
pub(crate) const HOLE: usize = 1 << (usize::BITS - 1);
/// An `enter` of this slot is under way (set by [`SlotTable::reserve`]).
const BUSY: usize = 1 << (usize::BITS - 2);
const PFN_MASK: usize = !(HOLE | BUSY);

/// `n` slot records, all zero. Outside loom they come from `calloc`, whose
/// large allocations are fresh anonymous memory: a huge window costs 8 bytes
/// per slot of *address space*, made resident only as slots are used.
#[cfg(not(loom))]
fn zeroed_slots(n: usize) -> Box<[AtomicUsize]> {
    let zeros: Box<[usize]> = vec![0usize; n].into_boxed_slice();
    let len = zeros.len();
    let ptr = Box::into_raw(zeros) as *mut usize as *mut AtomicUsize;
    // SAFETY: `AtomicUsize` has the same size, alignment and bit validity as
    // `usize` (std documents it), so the allocation of `len` zeroed `usize`s
    // is one of `len` `AtomicUsize`s holding 0, freed with the same layout.
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) }
}

#[cfg(loom)]
fn zeroed_slots(n: usize) -> Box<[AtomicUsize]> {
    (0..n).map(|_| AtomicUsize::new(0)).collect()
}

impl SlotTable {
    pub(crate) fn new(capacity: usize, frames: usize) -> Self {
        SlotTable {
            slots: zeroed_slots(capacity),
            claimed: AtomicBool::new(false),
            frames,
            enters: AtomicU64::new(0),
            removes: AtomicU64::new(0),
            pages_entered: AtomicU64::new(0),
            pages_removed: AtomicU64::new(0),
            syscalls: AtomicU64::new(0),
            remove_fallbacks: AtomicU64::new(0),
            mapped: AtomicU64::new(0),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Reject ranges outside the window or the memory (a clear error, even
    /// though the callers are `unsafe`).
    pub(crate) fn check(&self, slot: Slot, pfn: Option<Pfn>, count: usize) -> Result<()> {
        if count == 0 || slot.0.checked_add(count).is_none_or(|e| e > self.slots.len()) {
            return Err(Error::config(
                "slot range",
                format!("slots {}..+{count} outside a window of {}", slot.0, self.slots.len()),
            ));
        }
        if let Some(p) = pfn {
            if p.0.checked_add(count).is_none_or(|e| e > self.frames) {
                return Err(Error::config(
                    "frame range",
                    format!("frames {}..+{count} outside a memory of {}", p.0, self.frames),
                ));
            }
        }
        Ok(())
    }

    /// Take the window for one slot allocator; see [`sealed::Sealed::claim`].
    pub(crate) fn claim(&self) -> Result<()> {
        // Acquire/Release: a cache that claims after another let go sees
        // that one's removes recorded.
        if self.claimed.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return Err(Error::WindowClaimed);
        }
        if self.mapped.load(Ordering::Acquire) != 0 {
            self.claimed.store(false, Ordering::Release);
            return Err(Error::WindowClaimed);
        }
        Ok(())
    }

    pub(crate) fn unclaim(&self) {
        self.claimed.store(false, Ordering::Release);
    }

    /// Mark `count` slots from `slot` as being entered, if none has a frame
    /// entered or an enter under way; otherwise change nothing and report
    /// the first such slot. Undo with [`unreserve`](Self::unreserve), or
    /// complete with [`entered`](Self::entered).
    pub(crate) fn reserve(&self, slot: Slot, count: usize) -> Result<()> {
        for i in 0..count {
            let s = &self.slots[slot.0 + i];
            // Relaxed: the flag only keeps two enters apart; the frame number
            // is published by `entered`'s Release.
            let r = s.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v & (PFN_MASK | BUSY) == 0).then_some(v | BUSY)
            });
            if r.is_err() {
                self.unreserve(slot, i);
                return Err(Error::SlotOccupied { slot: slot.0 + i });
            }
        }
        Ok(())
    }

    /// Undo [`reserve`](Self::reserve) of `count` slots from `slot`.
    pub(crate) fn unreserve(&self, slot: Slot, count: usize) {
        for s in &self.slots[slot.0..slot.0 + count] {
            s.fetch_and(!BUSY, Ordering::Relaxed);
        }
    }

    pub(crate) fn translate(&self, slot: Slot) -> Option<Pfn> {
        let v = self.slots.get(slot.0)?.load(Ordering::Acquire) & PFN_MASK;
        v.checked_sub(1).map(Pfn)
    }

    pub(crate) fn any_hole(&self, slot: Slot, count: usize) -> bool {
        self.slots[slot.0..slot.0 + count].iter().any(|s| s.load(Ordering::Relaxed) & HOLE != 0)
    }

    pub(crate) fn is_hole(&self, slot: usize) -> bool {
        self.slots[slot].load(Ordering::Relaxed) & HOLE != 0
    }

    /// Record an enter of slots [`reserve`](Self::reserve)d for it.
    pub(crate) fn entered(&self, slot: Slot, pfn: Pfn, count: usize) {
        for i in 0..count {
            // Release: publishes the mapping to `translate` readers.
            let old = self.slots[slot.0 + i].swap(pfn.0 + i + 1, Ordering::Release);
            debug_assert!(old & BUSY != 0 && old & PFN_MASK == 0, "enter of a slot not reserved");
        }
        self.enters.fetch_add(1, Ordering::Relaxed);
        self.pages_entered.fetch_add(count as u64, Ordering::Relaxed);
        self.mapped.fetch_add(count as u64, Ordering::Relaxed);
    }

    /// Record a remove; returns whether any slot was empty (a caller bug).
    pub(crate) fn removed(&self, slot: Slot, count: usize, keep_hole: bool) -> bool {
        let mut was_mapped = 0;
        for i in 0..count {
            let new = if keep_hole { HOLE } else { 0 };
            let old = self.slots[slot.0 + i].swap(new, Ordering::Release);
            was_mapped += usize::from(old & PFN_MASK != 0);
        }
        self.removes.fetch_add(1, Ordering::Relaxed);
        self.pages_removed.fetch_add(count as u64, Ordering::Relaxed);
        // Only what was mapped: removing an empty slot is a caller bug the
        // model reports, and must not wrap the counter.
        self.mapped.fetch_sub(was_mapped as u64, Ordering::Relaxed);
        was_mapped < count
    }

    pub(crate) fn syscall(&self) {
        self.syscalls.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn fallback(&self) {
        self.remove_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> MmuStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MmuStats {
            enters: r(&self.enters),
            removes: r(&self.removes),
            pages_entered: r(&self.pages_entered),
            pages_removed: r(&self.pages_removed),
            syscalls: r(&self.syscalls),
            remove_fallbacks: r(&self.remove_fallbacks),
            mapped: r(&self.mapped),
        }
    }
}
