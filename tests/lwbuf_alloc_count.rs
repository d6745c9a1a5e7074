//! Heap allocations on the lwbuf hot paths, counted by a `#[global_allocator]`
//! (a binary of its own, so no other test's allocator traffic is counted).
//!
//! Only allocations made by the calling thread while it has switched counting
//! on are counted (a `const` thread-local flag, which itself allocates
//! nothing), so the test harness's own threads cannot disturb the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use lwbuf::{Backing, Lwbufs, Mmu, ModelMmu, Page, PhysMem, Window};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counting touches only an atomic and a const thread-local `Cell`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: forwarded with the caller's layout (GlobalAlloc contract).
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as above; `ptr` came from this allocator, i.e. from System.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap allocations made by this thread while running `f`.
fn allocations_in(f: impl FnOnce()) -> usize {
    let before = ALLOCS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCS.load(Ordering::Relaxed) - before
}

/// The one test of this binary (see the module docs): on both backends, a
/// cache hit (alloc + kva + read + drop) allocates nothing and calls the MMU
/// not at all; in steady state neither does a release on another CPU.
#[test]
fn hot_paths_make_no_heap_allocation() {
    assert!(allocations_in(|| drop(Box::new(1u64))) == 1, "the counter counts");

    // Under Miri only heap memory: it cannot run the window's memfd_create
    // and mmap.
    let backings: &[Backing] = if cfg!(miri) { &[Backing::Heap] } else { &[Backing::Memfd, Backing::Heap] };
    for &backing in backings {
        let mem = PhysMem::builder().frames(64).backing(backing).build().unwrap();
        let mmu: Arc<dyn Mmu> = match backing {
            Backing::Memfd => Arc::new(Window::builder(&mem).slots(64).build().unwrap()),
            _ => Arc::new(ModelMmu::new(&mem, 64).unwrap()),
        };
        let lw = Lwbufs::builder(mmu).cpus(4).max_excess(16).build().unwrap();
        let pages: Vec<Page> = (0..8).map(|_| mem.alloc_page().unwrap()).collect();
        for p in &pages {
            p.direct().unwrap().write_u64(16, p.pfn().0 as u64).unwrap();
        }

        // Local hits. Warm up first: misses grow the cache's tables.
        let g = lw.bind(0).unwrap();
        for _ in 0..2 {
            for p in &pages {
                drop(lw.alloc(p).unwrap());
            }
        }
        let mmu_before = lw.mmu().stats();
        let hits_before = lw.stats().total.hits;
        let mut sum = 0;
        let n = allocations_in(|| {
            for i in 0..1000 {
                let p = &pages[i % pages.len()];
                let h = lw.alloc(p).unwrap();
                let v = h.kva().unwrap().read_u64(16).unwrap();
                assert_eq!(v, p.pfn().0 as u64);
                sum += v;
                drop(h);
            }
        });
        assert_eq!(n, 0, "{backing:?}: {n} heap allocations in 1000 hits");
        assert!(sum > 0);
        assert_eq!(lw.stats().total.hits - hits_before, 1000);
        let d = lw.mmu().stats().since(&mmu_before);
        assert_eq!((d.enters, d.removes, d.syscalls), (0, 0, 0), "{backing:?}: a hit calls the MMU: {d}");

        // Remote release, steady state: handles made on CPU 0, dropped on
        // CPU 1 while CPU 0 has no owner, so the drop drains CPU 0's mailbox
        // on its behalf; the mailbox's vectors are recycled, not regrown.
        let round = |count: bool| {
            let g0 = lw.bind(0).unwrap();
            let hs: Vec<_> = (0..64).map(|i| lw.alloc(&pages[i % pages.len()]).unwrap()).collect();
            drop(g0);
            let g1 = lw.bind(1).unwrap();
            let n = if count { allocations_in(|| drop(hs)) } else { 0 };
            drop(g1);
            n
        };
        drop(g);
        for _ in 0..3 {
            round(false);
        }
        let sent = lw.stats().total.decrefs_sent;
        let n = round(true);
        assert_eq!(lw.stats().total.decrefs_sent - sent, 64);
        // Dropping the Vec that held them frees, never allocates.
        assert_eq!(n, 0, "{backing:?}: {n} heap allocations in 64 remote releases");
        assert_eq!(lw.check_consistency(), Ok(0));
    }
}
