//! (d) of `benches/lwbuf.rs` and the floor line of `benches/granule.rs`:
//! a per-CPU reference-counted mapping cache stripped to what its protocol
//! needs on a hit. Find the calling thread's CPU (a thread-local), enter
//! the CPU's cache as its owner (a flag store, a compiler barrier, a load
//! of the stealer's flag), check for mail, find the entry in a flat table,
//! count the reference (and the unused entries, and the hit), leave; read;
//! and on release the same entry and exit with the count going down and
//! the excess limit checked. No page validation, no handle, no `Result`, no
//! granule arithmetic, no statistics beyond the hit count: a floor, not a
//! usable cache. One thread only (the table is not `Sync`).

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

thread_local! {
    /// The floor's CPU binding: (system id, CPU), as the library keeps it.
    static FLOOR_CPU: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

pub struct Floor {
    id: usize,
    inside: AtomicBool,
    stealing: AtomicBool,
    mail: AtomicUsize,
    max_excess: AtomicUsize,
    local: UnsafeCell<FloorLocal>,
}

struct FloorLocal {
    table: Vec<FloorEntry>,
    unused: usize,
    hits: u64,
    newest: usize,
}

struct FloorEntry {
    addr: *const u8,
    refs: u32,
    referenced: bool,
}

impl Floor {
    /// `entries` entries, every one cached and unused, with no address
    /// yet ([`set_addr`](Self::set_addr)); the calling thread bound to
    /// CPU 0.
    pub fn new(entries: usize) -> Floor {
        let table: Vec<FloorEntry> =
            (0..entries).map(|_| FloorEntry { addr: std::ptr::null(), refs: 0, referenced: false }).collect();
        let id = 1;
        FLOOR_CPU.with(|c| c.set((id, 0)));
        let local = FloorLocal { unused: entries, table, hits: 0, newest: usize::MAX };
        Floor {
            id,
            inside: AtomicBool::new(false),
            stealing: AtomicBool::new(false),
            mail: AtomicUsize::new(0),
            max_excess: AtomicUsize::new(usize::MAX),
            local: UnsafeCell::new(local),
        }
    }

    /// Where entry `e` is mapped now: what a miss stores.
    ///
    /// # Safety
    /// Until the next `set_addr` of `e`, every [`hit`](Self::hit) of it
    /// reads a mapping of at least `offset + 8` bytes at `addr`.
    pub unsafe fn set_addr(&self, e: usize, addr: *const u8) {
        // SAFETY: `Floor` is not `Sync` (the cell), so only this thread
        // reaches `local`, and no other reference to it is alive.
        let l = unsafe { &mut *self.local.get() };
        l.table[e].addr = addr;
    }

    #[inline(always)]
    fn cpu(&self) -> Option<usize> {
        FLOOR_CPU.with(|c| {
            let (id, cpu) = c.get();
            (id == self.id).then_some(cpu)
        })
    }

    #[inline(always)]
    fn enter(&self) {
        self.inside.store(true, Ordering::Relaxed);
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        assert!(!self.stealing.load(Ordering::Acquire), "no stealer in the bench");
    }

    #[inline(always)]
    fn leave(&self) {
        self.inside.store(false, Ordering::Release);
    }

    /// A hit on entry `e`, a read of the word at `offset` of its mapping,
    /// and the release.
    #[inline(always)]
    pub fn hit(&self, e: usize, offset: usize) -> u64 {
        let home = self.cpu().expect("bound");
        self.enter();
        assert_eq!(self.mail.load(Ordering::Relaxed), 0, "no mail in the bench");
        let addr = {
            // SAFETY: as in `set_addr`.
            let l = unsafe { &mut *self.local.get() };
            let en = &mut l.table[e];
            en.refs += 1;
            let (addr, first) = (en.addr, en.refs == 1);
            if first {
                l.unused -= 1;
            }
            l.hits += 1;
            addr
        };
        self.leave();
        assert_eq!(self.cpu(), Some(home));
        // SAFETY: `set_addr`'s contract: a mapping of at least `offset + 8`
        // bytes; the callers' offsets are 8-aligned.
        let v = unsafe { (*addr.add(offset).cast::<AtomicU64>()).load(Ordering::Relaxed) };
        if self.cpu() == Some(home) {
            let max = self.max_excess.load(Ordering::Relaxed);
            self.enter();
            // SAFETY: as above.
            let l = unsafe { &mut *self.local.get() };
            let newest = l.newest;
            let en = &mut l.table[e];
            en.refs -= 1;
            if en.refs == 0 {
                en.referenced |= e != newest;
                l.unused += 1;
                assert!(l.unused <= max, "no eviction in the bench");
            }
            self.leave();
        }
        v
    }
}
