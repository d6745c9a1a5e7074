//! [`SlotTable`]: the state and counters both backends keep per slot, so
//! that `translate`, the stats, the one-allocator claim and the refusal to
//! enter over a live slot mean the same on both.

use super::{MmuStats, Slot};
use crate::error::{Error, Result};
use crate::phys::Pfn;
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Per-slot record of what is entered (`pfn + 1`, 0 for nothing) plus flags,
/// and the counters. Both backends keep one so `translate` and the stats
/// mean the same on both.
#[derive(Debug)]
pub struct SlotTable {
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
    replaces: AtomicU64,
    pages_replaced: AtomicU64,
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
            replaces: AtomicU64::new(0),
            pages_replaced: AtomicU64::new(0),
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

    /// Mark `count` slots from `slot` as being entered in place of a
    /// mapping in the first `old` of them (`old <= count`): those must have
    /// a frame entered, the rest must be empty and not holes, and none may
    /// have an enter under way. Otherwise change nothing and report the
    /// first offending slot. Complete with [`replaced`](Self::replaced) or
    /// undo with [`unreserve`](Self::unreserve).
    pub(crate) fn reserve_replace(&self, slot: Slot, count: usize, old: usize) -> Result<()> {
        debug_assert!(old <= count);
        for i in 0..count {
            let s = &self.slots[slot.0 + i];
            let ok = |v: usize| {
                let mapped = v & PFN_MASK != 0;
                v & (BUSY | HOLE) == 0 && mapped == (i < old)
            };
            let r = s.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| ok(v).then_some(v | BUSY));
            if r.is_err() {
                self.unreserve(slot, i);
                return Err(Error::SlotOccupied { slot: slot.0 + i });
            }
        }
        Ok(())
    }

    /// Record a replace of slots [`reserve_replace`](Self::reserve_replace)d
    /// for it.
    pub(crate) fn replaced(&self, slot: Slot, pfn: Pfn, count: usize, old: usize) {
        for i in 0..count {
            // Release: publishes the mapping to `translate` readers.
            let prev = self.slots[slot.0 + i].swap(pfn.0 + i + 1, Ordering::Release);
            debug_assert!(prev & BUSY != 0, "replace of a slot not reserved");
        }
        self.enters.fetch_add(1, Ordering::Relaxed);
        self.replaces.fetch_add(1, Ordering::Relaxed);
        self.pages_entered.fetch_add(count as u64, Ordering::Relaxed);
        self.pages_replaced.fetch_add(old as u64, Ordering::Relaxed);
        self.mapped.fetch_add((count - old) as u64, Ordering::Relaxed);
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
            replaces: r(&self.replaces),
            pages_replaced: r(&self.pages_replaced),
        }
    }
}
