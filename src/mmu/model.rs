//! The model MMU: no system calls; a slot's address is the direct-map
//! address of the frame entered there.

use std::fmt;
use std::ptr::NonNull;

use super::{Mmu, Slot, SlotTable};
use crate::error::{Error, Result};
use crate::phys::{Pfn, PhysMem};

/// The model backend. Entering frame F at slot S makes S's address F's bytes
/// in the direct map, so writes through a "mapping" land in the frame, as
/// with the real window, without any system call. It checks the protocol as
/// it goes: entering an occupied slot or removing an empty one panics (the
/// real window would silently clobber or succeed), which is what makes it
/// useful under loom. (Entering an occupied slot is refused with
/// [`Error::SlotOccupied`] on both backends.)
///
/// ```
/// use lwbuf::{Backing, ModelMmu, Mmu, PhysMem, Pfn, Slot};
/// let mem = PhysMem::builder().frames(4).backing(Backing::Heap).build()?;
/// let mmu = ModelMmu::new(&mem, 2)?;
/// // SAFETY: slot 1 is ours and empty.
/// unsafe { mmu.enter(Slot(1), Pfn(2), 1)? };
/// assert_eq!(mmu.translate(Slot(1)), Some(Pfn(2)));
/// assert_eq!(mmu.stats().syscalls, 0);
/// # Ok::<(), lwbuf::Error>(())
/// ```
pub struct ModelMmu {
    phys: PhysMem,
    table: SlotTable,
    writable: bool,
}

impl ModelMmu {
    /// A model window of `slots` slots over `phys`, which must be directly
    /// mapped (heap backing always is).
    pub fn new(phys: &PhysMem, slots: usize) -> Result<ModelMmu> {
        if !phys.has_direct_map() {
            return Err(Error::NoDirectMap);
        }
        if slots == 0 {
            return Err(Error::config("slots", "a window needs at least one slot"));
        }
        Ok(ModelMmu { phys: phys.clone(), table: SlotTable::new(slots, phys.frames())?, writable: true })
    }

    /// As [`new`](Self::new), for a model of a read-only window
    /// ([`WindowBuilder::read_only`](crate::WindowBuilder::read_only)): the
    /// caches' views of its mappings refuse writes. (The model's "mapping"
    /// is the direct map, which stays writable through
    /// [`Page::direct`](crate::Page::direct).)
    pub fn new_read_only(phys: &PhysMem, slots: usize) -> Result<ModelMmu> {
        Ok(ModelMmu { writable: false, ..ModelMmu::new(phys, slots)? })
    }
}

impl ModelMmu {
    /// The slots that have `pfn` entered now (a scan; for checks in tests
    /// and models: a handle's frame must be mapped while it is held).
    pub fn slots_of(&self, pfn: Pfn) -> Vec<Slot> {
        (0..self.table.capacity()).map(Slot).filter(|&s| self.table.translate(s) == Some(pfn)).collect()
    }
}

impl super::sealed::Sealed for ModelMmu {
    fn table(&self) -> &SlotTable {
        &self.table
    }
}

impl Mmu for ModelMmu {
    fn phys(&self) -> &PhysMem {
        &self.phys
    }

    fn writable(&self) -> bool {
        self.writable
    }

    unsafe fn enter(&self, slot: Slot, pfn: Pfn, count: usize) -> Result<NonNull<u8>> {
        self.table.check(slot, Some(pfn), count)?;
        let addr = self.phys.direct_ptr(pfn).expect("checked: direct map and frame in range");
        self.table.reserve(slot, count)?;
        self.table.entered(slot, pfn, count);
        Ok(addr)
    }

    unsafe fn remove(&self, slot: Slot, count: usize) -> Result<()> {
        self.table.check(slot, None, count)?;
        let empty = self.table.removed(slot, count, false);
        assert!(!empty, "model MMU: remove of empty slots {}..+{count}", slot.0);
        Ok(())
    }

    unsafe fn replace(&self, slot: Slot, pfn: Pfn, count: usize, old: usize) -> Result<NonNull<u8>> {
        // The old mapping may reach beyond the new one in slots; the frames
        // are the new ones only (the old pages may have ended further on).
        self.table.check(slot, None, count.max(old))?;
        self.table.check(slot, Some(pfn), count)?;
        if old > count {
            // SAFETY: the caller's contract for the old mapping.
            unsafe { self.remove(Slot(slot.0 + count), old - count)? };
        }
        let addr = self.phys.direct_ptr(pfn).expect("checked: direct map and frame in range");
        self.table.reserve_replace(slot, count, old.min(count))?;
        self.table.replaced(slot, pfn, count, old.min(count));
        Ok(addr)
    }

    fn kva(&self, slot: Slot) -> Option<NonNull<u8>> {
        self.phys.direct_ptr(self.table.translate(slot)?)
    }
}

impl fmt::Debug for ModelMmu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelMmu").field("slots", &self.table.capacity()).field("stats", &self.table.stats()).finish()
    }
}
