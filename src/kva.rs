//! The kernel-virtual-address space of one window: the [`Mmu`] plus its slot
//! allocator. The one place where slots are taken, mapped, unmapped and given
//! back, shared by the lwbuf caches and the sf_buf pool.
//!
//! The types carry the rule the kernels learnt the hard way (DragonFly's
//! resident-count drift, Linux's `kunmap_atomic` race): a slot goes back to a
//! free list only after its mapping is gone. A [`SlotRun`] is a claim on free
//! slots; [`KvaSpace::map`] consumes it into a [`Mapping`]; the only way back
//! to a `SlotRun` is [`KvaSpace::unmap`], which removes the mapping first.

use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::extent::Extents;
use crate::mmu::{Mmu, MmuStats, Slot};
use crate::phys::{Page, Pfn, PhysMem};

/// A claim on `len` adjacent free slots. Not `Clone`: it must be mapped or
/// given back.
#[derive(Debug)]
#[must_use = "a SlotRun must be mapped or given back"]
pub(crate) struct SlotRun {
    pub(crate) start: usize,
    pub(crate) len: usize,
}

/// Slots with frames entered in them. Not `Clone`: it must be unmapped.
#[derive(Debug)]
#[must_use = "a Mapping must be unmapped before its slots are reused"]
pub(crate) struct Mapping {
    run: SlotRun,
    pfn: Pfn,
    addr: NonNull<u8>,
}

// SAFETY: a Mapping is a record (slots, frame, address); it is only
// dereferenced by handles that borrow the cache owning it.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(crate) fn addr(&self) -> NonNull<u8> {
        self.addr
    }
    pub(crate) fn pfn(&self) -> Pfn {
        self.pfn
    }
    pub(crate) fn slot(&self) -> Slot {
        Slot(self.run.start)
    }
    pub(crate) fn pages(&self) -> usize {
        self.run.len
    }
}

/// One window's address space: the MMU and who owns which slot.
#[derive(Debug)]
pub(crate) struct KvaSpace {
    mmu: Arc<dyn Mmu>,
    slots: Extents,
}

impl KvaSpace {
    pub(crate) fn new(mmu: Arc<dyn Mmu>) -> Self {
        let slots = Extents::new(mmu.capacity());
        KvaSpace { mmu, slots }
    }

    pub(crate) fn mmu(&self) -> &Arc<dyn Mmu> {
        &self.mmu
    }

    pub(crate) fn phys(&self) -> &PhysMem {
        self.mmu.phys()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.slots.total()
    }

    pub(crate) fn free_slots(&self) -> usize {
        self.slots.free_count()
    }

    pub(crate) fn slot_size(&self) -> usize {
        self.mmu.slot_size()
    }

    pub(crate) fn mmu_stats(&self) -> MmuStats {
        self.mmu.stats()
    }

    /// Check that `page` is a frame of the memory this window maps.
    #[inline]
    pub(crate) fn check_page(&self, page: &Page) -> Result<()> {
        if page.phys().same_as(self.mmu.phys()) {
            Ok(())
        } else {
            Err(Error::ForeignPage)
        }
    }

    /// Claim `n` adjacent free slots.
    pub(crate) fn take(&self, n: usize) -> Option<SlotRun> {
        self.slots.alloc(n).map(|start| SlotRun { start, len: n })
    }

    /// Claim up to `max` single slots in one lock round trip.
    pub(crate) fn take_batch(&self, max: usize, out: &mut Vec<SlotRun>) -> usize {
        let mut raw = Vec::with_capacity(max);
        let n = self.slots.alloc_batch(max, &mut raw);
        out.extend(raw.into_iter().map(|start| SlotRun { start, len: 1 }));
        n
    }

    /// Give back claimed, unmapped slots.
    pub(crate) fn give(&self, run: SlotRun) {
        self.slots.free(run.start, run.len);
    }

    /// Give back single unmapped slots in one lock round trip.
    pub(crate) fn give_batch(&self, runs: impl IntoIterator<Item = SlotRun>) {
        self.slots.free_batch(runs.into_iter().map(|r| {
            debug_assert_eq!(r.len, 1);
            r.start
        }));
    }

    /// Enter `run.len` contiguous frames from `pfn` into the claimed slots:
    /// one MMU call. On failure the claim comes back with the error.
    pub(crate) fn map(&self, run: SlotRun, pfn: Pfn) -> std::result::Result<Mapping, (Error, SlotRun)> {
        // SAFETY: `run` is a claim on free slots: nothing is entered there and
        // nothing refers to them (the SlotRun protocol of this module).
        match unsafe { self.mmu.enter(Slot(run.start), pfn, run.len) } {
            Ok(addr) => Ok(Mapping { run, pfn, addr }),
            Err(e) => Err((e, run)),
        }
    }

    /// Remove a mapping; its slots come back as a claim, to reuse or give
    /// back. On failure the mapping is handed back intact.
    ///
    /// # Safety
    /// No handle may still reach the mapping's address: its reference count
    /// is zero and no lookup can find it any more.
    pub(crate) unsafe fn unmap(&self, m: Mapping) -> std::result::Result<SlotRun, (Error, Mapping)> {
        // SAFETY: the caller guarantees nothing accesses the slots.
        match unsafe { self.mmu.remove(Slot(m.run.start), m.run.len) } {
            Ok(()) => Ok(m.run),
            Err(e) => Err((e, m)),
        }
    }
}
