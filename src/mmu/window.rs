//! The real window: a reserved `PROT_NONE` region of the process's address
//! space into which frames of the memfd are mapped with `MAP_FIXED`.

use std::fmt;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use super::{Mmu, Slot, SlotTable};
use crate::error::{Error, Result};
use crate::phys::{Backing, Pfn, PhysMem, MAX_REGION_BYTES};
use crate::sys::{self, Errno};

/// Builds a [`Window`]. See [`Window::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until it is built"]
pub struct WindowBuilder {
    phys: PhysMem,
    slots: usize,
    writable: bool,
}

impl WindowBuilder {
    /// Slots in the window (default: as many as the memory has frames, but
    /// at most 65,536).
    pub fn slots(mut self, n: usize) -> Self {
        self.slots = n;
        self
    }

    /// Map frames `PROT_READ` only (default: false, read and write). Views
    /// of such a window refuse writes with [`Error::ReadOnly`]; a hardened
    /// store's readers cannot write through it, and a cache that only sends
    /// pays less per mapping: shmem pages mapped writable get dirty
    /// page-table entries, whose removal (each eviction) flushes the TLB of
    /// the process's other CPUs twice instead of once (measured in
    /// `benches/baseline.rs`, group `map_prot`). The sendfile layer's
    /// own windows are read-only.
    pub fn read_only(mut self, yes: bool) -> Self {
        self.writable = !yes;
        self
    }

    /// Reserve the window: one `mmap(PROT_NONE, MAP_NORESERVE)`. It costs
    /// address space, plus about 8.25 bytes of bookkeeping per slot, itself
    /// allocated zeroed and made resident only as slots are used.
    pub fn build(self) -> Result<Window> {
        if self.phys.backing() == Backing::Heap {
            return Err(Error::config("backing", "the real window maps a memfd; use ModelMmu for heap memory"));
        }
        if self.slots == 0 {
            return Err(Error::config("slots", "a window needs at least one slot"));
        }
        let slot_size = self.phys.frame_size();
        let len = self.slots.checked_mul(slot_size).filter(|&b| b <= MAX_REGION_BYTES).ok_or_else(|| {
            Error::config(
                "slots",
                format!(
                    "{} slots of {slot_size} bytes exceed the {} TiB address-space limit",
                    self.slots,
                    MAX_REGION_BYTES >> 40
                ),
            )
        })?;
        let nz = NonZeroUsize::new(len).expect("len > 0");
        // Aligned to the memory's smallest granule, so that a huge page's
        // slots start on a huge-page boundary, and at least to the kernel's
        // fault-around block, so that a granule of that size or more is
        // mapped whole blocks at a time (the send engines' prefault touches
        // a block once: `kaddr::Prefaulter`).
        let align = (self.phys.min_granule() * slot_size).max(crate::kaddr::PREFAULT_STRIDE);
        // The table first: nothing to give back if it cannot be allocated.
        let table = SlotTable::new(self.slots, self.phys.frames())?;
        let base = sys::reserve_aligned(nz, align).map_err(|e| Error::sys("mmap(reserve window)", e))?;
        table.syscall();
        Ok(Window { phys: self.phys, base, slot_size, len, table, writable: self.writable })
    }
}

/// The real backend: a reserved region of `slots * frame_size` bytes.
///
/// `enter` is `mmap(MAP_SHARED | MAP_FIXED)` of the memfd at the frame's
/// offset (one call for a run); `remove` remaps the slots `PROT_NONE`, and
/// when the kernel refuses that (`ENOMEM` at the `vm.max_map_count` wall)
/// falls back to `munmap`, keeping the slot usable: the next enter there uses
/// `MAP_FIXED_NOREPLACE` so it can never clobber a mapping someone else made
/// in the hole. Dropping the window unmaps all of it.
///
/// ```
/// use lwbuf::{Mmu, PhysMem, Pfn, Slot, Window};
/// let mem = PhysMem::builder().frames(16).build()?;
/// let win = Window::builder(&mem).slots(8).build()?;
/// // SAFETY: slot 0 is ours and empty; nothing refers to it.
/// let p = unsafe { win.enter(Slot(0), Pfn(3), 1)? };
/// // SAFETY: the slot maps frame 3, a whole frame of writable bytes.
/// unsafe { p.as_ptr().write(42) };
/// let mut b = [0u8];
/// mem.read_frame(Pfn(3), 0, &mut b)?;
/// assert_eq!(b[0], 42);
/// // SAFETY: no reference into slot 0 remains.
/// unsafe { win.remove(Slot(0), 1)? };
/// assert_eq!(win.stats().syscalls, 3); // reserve, enter, remove
/// # Ok::<(), lwbuf::Error>(())
/// ```
pub struct Window {
    phys: PhysMem,
    base: NonNull<u8>,
    slot_size: usize,
    len: usize,
    table: SlotTable,
    writable: bool,
}

// SAFETY: the window owns its reservation; all mutation of mappings goes
// through `unsafe` methods whose callers own the slots they touch, and the
// bookkeeping is atomic.
unsafe impl Send for Window {}
// SAFETY: as for `Send`.
unsafe impl Sync for Window {}

impl Window {
    /// A builder for a window mapping frames of `phys`.
    pub fn builder(phys: &PhysMem) -> WindowBuilder {
        WindowBuilder { phys: phys.clone(), slots: phys.frames().min(1 << 16), writable: true }
    }

    /// The first byte of the window.
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Bytes the window spans.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never: a window has at least one slot.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn addr(&self, slot: Slot) -> NonNull<u8> {
        // SAFETY: callers pass a slot checked against the capacity, so the
        // offset stays inside the reservation.
        unsafe { self.base.add(slot.0 * self.slot_size) }
    }

    /// Restore a `PROT_NONE` reservation over `len` bytes at `addr`.
    ///
    /// # Safety
    /// As [`sys::reserve_at`]: the slots are the caller's and unused.
    unsafe fn reserve_at(&self, addr: NonNull<u8>, len: usize) -> Result<(), Errno> {
        self.table.syscall();
        // SAFETY: `addr..addr+len` lies inside our window and the caller
        // owns those slots and does not use them (contract).
        unsafe { sys::reserve_at(addr, NonZeroUsize::new(len).expect("len > 0"), false) }
    }
}

impl super::sealed::Sealed for Window {
    fn table(&self) -> &SlotTable {
        &self.table
    }
}

impl Mmu for Window {
    fn phys(&self) -> &PhysMem {
        &self.phys
    }

    fn writable(&self) -> bool {
        self.writable
    }

    unsafe fn enter(&self, slot: Slot, pfn: Pfn, count: usize) -> Result<NonNull<u8>> {
        self.table.check(slot, Some(pfn), count)?;
        let fd = self.phys.memfd().expect("window PhysMem is memfd-backed");
        let addr = self.addr(slot);
        let len = NonZeroUsize::new(count * self.slot_size).expect("count > 0");
        let offset = (pfn.0 * self.slot_size) as i64;
        // A slot whose reservation was lost must not be mapped with plain
        // MAP_FIXED: another mmap of the process may have landed there.
        let noreplace = self.table.any_hole(slot, count);
        // Never map over a live slot: MAP_FIXED would silently replace it.
        self.table.reserve(slot, count)?;
        self.table.syscall();
        // SAFETY: the range lies inside the window, the caller owns these
        // slots (method contract) and `reserve` found nothing entered in
        // them, so MAP_FIXED replaces only our own PROT_NONE reservation;
        // holes use MAP_FIXED_NOREPLACE instead.
        match unsafe { sys::map_shared_at(addr, len, fd, offset, noreplace, self.writable) } {
            Ok(()) => {
                self.table.entered(slot, pfn, count);
                Ok(addr)
            }
            Err(e) => {
                self.table.unreserve(slot, count);
                Err(Error::sys("mmap(enter)", e))
            }
        }
    }

    unsafe fn remove(&self, slot: Slot, count: usize) -> Result<()> {
        self.table.check(slot, None, count)?;
        let addr = self.addr(slot);
        let len = count * self.slot_size;
        // SAFETY: the caller owns these slots and nothing accesses them
        // (method contract).
        match unsafe { self.reserve_at(addr, len) } {
            Ok(()) => {
                self.table.removed(slot, count, false);
                Ok(())
            }
            Err(Errno::ENOMEM) => {
                // At the vm.max_map_count wall even the PROT_NONE remap fails
                // (it needs a new VMA before the old one goes); plain munmap
                // still works because it only removes.
                self.table.fallback();
                self.table.syscall();
                // SAFETY: the caller owns these slots and promises nothing
                // accesses them (method contract).
                unsafe { sys::unmap(addr, len) }.map_err(|e| Error::sys("munmap(remove)", e))?;
                // Leave a hole: restoring the reservation here would take
                // the one VMA the munmap just freed, and the caller unmapped
                // precisely to make room for its next mapping (on 6.18 every
                // mmap fails at the wall, even one that replaces a VMA
                // exactly). The next enter here uses MAP_FIXED_NOREPLACE, so
                // it never clobbers a mapping made in the hole meanwhile.
                self.table.removed(slot, count, true);
                Ok(())
            }
            Err(e) => Err(Error::sys("mmap(remove)", e)),
        }
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
        let old = old.min(count);
        if self.table.any_hole(slot, count) {
            // A lost reservation must not be mapped over blindly (see
            // `enter`): take the two-call way.
            // SAFETY: the caller's contract covers both calls.
            return unsafe {
                self.remove(slot, old)?;
                self.enter(slot, pfn, count)
            };
        }
        let fd = self.phys.memfd().expect("window PhysMem is memfd-backed");
        let addr = self.addr(slot);
        let len = NonZeroUsize::new(count * self.slot_size).expect("count > 0");
        let offset = (pfn.0 * self.slot_size) as i64;
        self.table.reserve_replace(slot, count, old)?;
        self.table.syscall();
        // SAFETY: the range lies inside the window; the caller owns these
        // slots and nothing accesses the old mapping (method contract), and
        // `reserve_replace` found exactly the caller's old mapping and our
        // own reservation there, so MAP_FIXED replaces only those.
        match unsafe { sys::map_shared_at(addr, len, fd, offset, false, self.writable) } {
            Ok(()) => {
                self.table.replaced(slot, pfn, count, old);
                Ok(addr)
            }
            Err(e) => {
                // A failed MAP_FIXED may have unmapped the old pages or not:
                // put the reservation back so the slots are known empty.
                self.table.unreserve(slot, count);
                // SAFETY: as above: ours, unused.
                if unsafe { self.reserve_at(addr, len.get()) }.is_ok() {
                    // Slots `old..count` were empty and stay so.
                    self.table.removed(slot, old, false);
                }
                Err(Error::sys("mmap(replace)", e))
            }
        }
    }

    fn kva(&self, slot: Slot) -> Option<NonNull<u8>> {
        self.table.translate(slot).map(|_| self.addr(slot))
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // Unmap the window in segments, skipping slots whose reservation was
        // lost: whatever is mapped there now is not ours.
        let cap = self.table.capacity();
        let mut i = 0;
        while i < cap {
            if self.table.is_hole(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < cap && !self.table.is_hole(i) {
                i += 1;
            }
            let addr = self.addr(Slot(start));
            // SAFETY: the window is being dropped, so no handle can refer to
            // any slot (handles borrow the cache that borrows the window), and
            // the segment is ours.
            let _ = unsafe { sys::unmap(addr, (i - start) * self.slot_size) };
        }
    }
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Window")
            .field("base", &self.base)
            .field("slots", &self.table.capacity())
            .field("slot_size", &self.slot_size)
            .field("stats", &self.table.stats())
            .finish()
    }
}
