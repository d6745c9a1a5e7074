//! The sf_buf pool over very large memories: building one costs memory in
//! proportion to its window, never to the memory behind it (a table of 8
//! bytes per frame of the whole memory once made a 1 TiB pool cost 2 GiB
//! resident, and aborted the process at 64 TiB). Frames at the very top of
//! a 64 TiB memory are tested inside the crate (`sfbuf::tests`), which can
//! allocate them.
//!
//! A test binary of its own, so that the resident-memory reading is not
//! disturbed by the many threads of the other sf_buf tests.

use std::sync::Arc;
use std::time::Instant;

use lwbuf::{system_page_size, PhysMem, SfPool, Wait, Window, MAX_REGION_BYTES};

/// Resident bytes of this process (`/proc/self/statm`, second field).
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: usize = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("resident field");
    pages * system_page_size()
}

/// A pool over `bytes` of memory (no direct map) and a window of `slots`.
fn pool_over(bytes: usize, slots: usize) -> (PhysMem, SfPool) {
    let mem = PhysMem::builder().frames(bytes / system_page_size()).direct_map(false).build().expect("PhysMem");
    let win = Arc::new(Window::builder(&mem).slots(slots).build().expect("Window"));
    let pool = SfPool::builder(win).build().expect("SfPool");
    (mem, pool)
}

#[test]
fn building_a_pool_over_1_tib_costs_little_memory() {
    let frames = (1usize << 40) / system_page_size();
    let mem = PhysMem::builder().frames(frames).direct_map(false).build().expect("1 TiB PhysMem");
    let win = Arc::new(Window::builder(&mem).slots(1024).build().expect("Window"));
    let before = resident_bytes();
    let t0 = Instant::now();
    let pool = SfPool::builder(win).build().expect("SfPool");
    let took = t0.elapsed();
    let grown = resident_bytes().saturating_sub(before);
    // 1024 slots need well under 1 MiB of tables; 64 MiB leaves room for
    // whatever else the process does meanwhile, and is 1/32 of what one
    // word per frame of 1 TiB costs.
    assert!(grown < 64 << 20, "building the pool made {} MiB resident (in {took:?})", grown >> 20);
    // And it works.
    let page = mem.alloc_page().expect("page");
    drop(pool.alloc(&page, Wait::NoWait).expect("miss"));
    drop(pool.alloc(&page, Wait::NoWait).expect("hit"));
    assert_eq!(pool.stats().hits, 1);
}

#[test]
fn a_pool_over_the_largest_memory_builds_and_hits() {
    let (mem, pool) = pool_over(MAX_REGION_BYTES, 16);
    let pages: Vec<_> = (0..4).map(|_| mem.alloc_page().expect("page")).collect();
    for p in &pages {
        let sf = pool.alloc(p, Wait::NoWait).expect("miss");
        sf.kva().write_u64(8, p.pfn().0 as u64 + 7).expect("write");
    }
    for p in &pages {
        let sf = pool.alloc(p, Wait::NoWait).expect("hit");
        assert_eq!(sf.kva().read_u64(8).expect("read"), p.pfn().0 as u64 + 7);
    }
    let s = pool.stats();
    assert_eq!((s.misses, s.hits), (4, 4), "{s}");
}
