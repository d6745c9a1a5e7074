//! The `Mmu` seam: what the caches need from an address space.
//!
//! Two implementations: [`Window`], a reserved `PROT_NONE` region into which
//! frames of the memfd are `mmap`ped, and [`ModelMmu`], which makes no
//! system call at all (a slot's address is the frame's direct-map address) so
//! loom models and simulations of hundreds of CPUs can run on it. Nothing
//! above this module calls `mmap`.

mod fault;
mod model;
mod table;
mod window;

pub(crate) use fault::Plan;
pub use fault::{Fault, FaultStats, FaultyMmu};
pub use model::ModelMmu;
pub use window::{Window, WindowBuilder};

pub(crate) use table::SlotTable;

use std::fmt;
use std::ptr::NonNull;

use crate::error::Result;
use crate::phys::{Pfn, PhysMem};

/// The index of a slot in a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(pub usize);

/// The part of [`Mmu`] that only this crate implements: the caches trust
/// what an `Mmu` says (the address `enter` returns is dereferenced by safe
/// handles), and they need to claim a window's slots for one allocator.
pub(crate) mod sealed {
    use super::SlotTable;
    use crate::error::Result;

    /// Outside the crate nothing can name this trait or `SlotTable` (both
    /// are `pub` in private modules), which is the point of the seal.
    pub trait Sealed {
        /// The slot table of the window (wrappers: of the window they wrap).
        fn table(&self) -> &SlotTable;

        /// Claim every slot for one slot allocator (a cache). Fails with
        /// [`crate::Error::WindowClaimed`] if another holds the claim or
        /// frames are entered now.
        fn claim(&self) -> Result<()> {
            self.table().claim()
        }

        /// Give the claim back (the cache is gone and has removed all it
        /// entered).
        fn unclaim(&self) {
            self.table().unclaim();
        }
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
/// over a window that is in use fails with [`Error::WindowClaimed`](crate::Error::WindowClaimed), and the
/// window can serve another once the first is dropped.
pub trait Mmu: sealed::Sealed + Send + Sync + fmt::Debug {
    /// The memory whose frames this MMU maps.
    fn phys(&self) -> &PhysMem;

    /// Slots in the window.
    fn capacity(&self) -> usize {
        self.table().capacity()
    }

    /// Bytes per slot (the frame size).
    fn slot_size(&self) -> usize {
        self.phys().frame_size()
    }

    /// Whether frames are entered writable; fixed when the MMU is built
    /// (the caches read it once). False for a read-only window
    /// ([`WindowBuilder::read_only`](crate::WindowBuilder::read_only),
    /// [`ModelMmu::new_read_only`]): the caches' views of its mappings then
    /// refuse writes with [`Error::ReadOnly`](crate::Error::ReadOnly), and
    /// the addresses [`enter`](Self::enter), [`replace`](Self::replace) and
    /// [`kva`](Self::kva) return are readable only (a raw write through them
    /// faults).
    fn writable(&self) -> bool {
        true
    }

    /// Map `count` contiguous frames starting at `pfn` into the `count`
    /// adjacent slots starting at `slot`, with one operation (one system call
    /// for the window). Returns the address of the first slot; the run is
    /// contiguous from there, readable, and writable if
    /// [`writable`](Self::writable).
    ///
    /// Slots that already have a frame entered are refused with
    /// [`Error::SlotOccupied`](crate::Error::SlotOccupied) before anything changes.
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

    /// Enter `count` contiguous frames from `pfn` into the slots from
    /// `slot`, whose first `old` slots hold an earlier mapping, replacing it
    /// in place: for the window one `mmap(MAP_FIXED)` straight over the old
    /// pages (one system call and one TLB flush, where a remove and an enter
    /// make two calls). Slots `old..count` must be empty; if `old > count`,
    /// the slots beyond `count` are removed. Returns the address of `slot`.
    ///
    /// On failure the old mapping may be gone or still there; the slots'
    /// state is what [`translate`](Self::translate) says.
    ///
    /// # Safety
    /// As for [`remove`](Self::remove) of the old mapping and
    /// [`enter`](Self::enter) of the new one: the caller owns the slots and
    /// nothing accesses them through the old mapping during or after the
    /// call.
    unsafe fn replace(&self, slot: Slot, pfn: Pfn, count: usize, old: usize) -> Result<NonNull<u8>> {
        // SAFETY: the caller's contract covers both calls.
        unsafe {
            self.remove(slot, old)?;
            self.enter(slot, pfn, count)
        }
    }

    /// The frame entered at `slot` now, if any. No system call.
    fn translate(&self, slot: Slot) -> Option<Pfn> {
        self.table().translate(slot)
    }

    /// The address of `slot` with whatever is entered there, `None` if
    /// nothing is. No system call.
    fn kva(&self, slot: Slot) -> Option<NonNull<u8>>;

    /// Counters of operations and system calls.
    fn stats(&self) -> MmuStats {
        self.table().stats()
    }
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
    /// Enters that replaced an earlier mapping in place (also counted in
    /// `enters`): each one unmapped the old pages with its own call.
    pub replaces: u64,
    /// Slots whose old mapping a replace took away.
    pub pages_replaced: u64,
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
            replaces: self.replaces - earlier.replaces,
            pages_replaced: self.pages_replaced - earlier.pages_replaced,
        }
    }
}

impl fmt::Display for MmuStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "enters {} ({} pages; {} in place over {} pages), removes {} ({} pages), syscalls {}, munmap fallbacks {}, mapped now {}",
            self.enters,
            self.pages_entered,
            self.replaces,
            self.pages_replaced,
            self.removes,
            self.pages_removed,
            self.syscalls,
            self.remove_fallbacks,
            self.mapped
        )
    }
}
