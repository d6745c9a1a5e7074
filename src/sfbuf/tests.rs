//! Tests of the pool that need the crate's internals: frames at the top of
//! a 64 TiB memory, which the frame allocator (low frames first) never
//! hands out through the public API, an evictor's stale view of the LRU
//! staged by hand, and the hint table of a pool with a mapping granule.

use std::sync::Arc;

use super::{SfPool, Wait};
use crate::mmu::{ModelMmu, Window};
use crate::phys::{system_page_size, Backing, Page, Pfn, PhysMem, MAX_REGION_BYTES};
use crate::sync::Ordering;

/// The largest memory the builder accepts, 4 KiB frames (2^34 of them), no
/// direct map: the pool builds, and frames at both ends of the frame
/// numbers miss, hit, and keep their bytes across an unmap.
#[test]
#[cfg_attr(miri, ignore = "a 64 TiB memory needs memfd_create")]
fn pool_over_64_tib_maps_frames_at_both_ends() {
    let fs = system_page_size();
    let frames = MAX_REGION_BYTES / fs;
    let mem = PhysMem::builder().frames(frames).direct_map(false).build().expect("64 TiB PhysMem");
    let win = Arc::new(Window::builder(&mem).slots(8).build().expect("Window"));
    let pool = SfPool::builder(win).max_excess(8).build().expect("a pool over 64 TiB");
    let pfns = [0, 1, frames / 2, frames - 2, frames - 1];
    let pages: Vec<Page> = pfns.iter().map(|&p| mem.alloc_page_at(Pfn(p)).expect("alloc_page_at")).collect();
    let stamp = |p: &Page| (p.pfn().0 as u64) ^ 0x5fb0_0000_0000_0000;

    for p in &pages {
        let sf = pool.alloc(p, Wait::NoWait).expect("miss");
        sf.kva().write_u64(0, stamp(p)).expect("write");
        sf.kva().write_u64(fs - 8, !stamp(p)).expect("write");
    }
    let s = pool.stats();
    assert_eq!((s.misses, s.hits, s.cached), (5, 0, 5), "{s}");
    // Hits (through the hints, or the map), twice each, the same bytes.
    for _ in 0..2 {
        for p in &pages {
            let sf = pool.alloc(p, Wait::NoWait).expect("hit");
            assert_eq!(sf.kva().read_u64(0).expect("read"), stamp(p), "frame {}", p.pfn().0);
        }
    }
    let s = pool.stats();
    assert_eq!((s.misses, s.hits, s.mmu.enters), (5, 10, 5), "every later alloc was a hit: {s}");
    // Unmap everything; mapped again, each frame still holds its bytes.
    pool.set_max_excess(0);
    assert_eq!(pool.stats().mapped, 0);
    for p in &pages {
        let sf = pool.alloc(p, Wait::NoWait).expect("miss again");
        assert_eq!(sf.kva().read_u64(0).expect("read"), stamp(p), "frame {}", p.pfn().0);
        assert_eq!(sf.kva().read_u64(fs - 8).expect("read"), !stamp(p), "frame {}", p.pfn().0);
    }
    let s = pool.stats();
    assert_eq!((s.misses, s.hits, s.used, s.mapped), (10, 10, 0, 0), "{s}");
}

/// Two frames whose hints share a way (same bucket, same tag: frames 2^32
/// apart in a table of 2048 buckets): each hit through the other's hint
/// finds the wrong key and gives its reference back, and the map serves
/// it. Every hit returns its own frame's bytes.
#[test]
#[cfg_attr(miri, ignore = "a 64 TiB memory needs memfd_create")]
fn frames_that_share_a_hint_hit_their_own_mappings() {
    let fs = system_page_size();
    let frames = MAX_REGION_BYTES / fs;
    let mem = PhysMem::builder().frames(frames).direct_map(false).build().expect("64 TiB PhysMem");
    let win = Arc::new(Window::builder(&mem).slots(1024).build().expect("Window"));
    let pool = SfPool::builder(win).max_excess(1024).build().expect("pool");
    let a = 12_345;
    let b = pool.hint.twin(a, frames).expect("a frame sharing a's hint");
    let pages = [mem.alloc_page_at(Pfn(a)).expect("a"), mem.alloc_page_at(Pfn(b)).expect("b")];
    for p in &pages {
        pool.alloc(p, Wait::NoWait).expect("miss").kva().write_u64(0, p.pfn().0 as u64).expect("write");
    }
    for round in 0..6 {
        let p = &pages[round % 2];
        let sf = pool.alloc(p, Wait::NoWait).expect("hit");
        assert_eq!(sf.kva().read_u64(0).expect("read"), p.pfn().0 as u64, "round {round}");
        // Held while the other is taken: its hint then names an entry in use.
        let q = &pages[(round + 1) % 2];
        let other = pool.alloc(q, Wait::NoWait).expect("hit");
        assert_eq!(other.kva().read_u64(0).expect("read"), q.pfn().0 as u64, "round {round}");
    }
    let s = pool.stats();
    assert_eq!((s.misses, s.hits, s.mmu.enters, s.used), (2, 12, 2, 0), "{s}");
}

/// A pool of `slots` slots over the model MMU, with every slot holding a
/// cached frame (used once, so each gets a second chance first).
fn full_of_cached(slots: usize) -> (PhysMem, SfPool, Vec<Page>) {
    let mem = PhysMem::builder().frames(slots + 1).backing(Backing::Heap).build().expect("PhysMem");
    let mmu = Arc::new(ModelMmu::new(&mem, slots).expect("ModelMmu"));
    let pool = SfPool::builder(mmu).max_excess(slots).build().expect("pool");
    let pages: Vec<Page> = (0..=slots).map(|_| mem.alloc_page().expect("alloc_page")).collect();
    for p in &pages[..slots] {
        drop(pool.alloc(p, Wait::NoWait).expect("miss"));
    }
    assert_eq!(pool.stats().cached, slots as u64);
    (mem, pool, pages)
}

/// (`miss.rs`, 13) An evictor stops after a number of looks taken from a
/// relaxed read of the LRU's length, which may be stale (here: forced to
/// 0, so two looks, both second chances). A miss must not report no room
/// while an unused entry is listed: the evictor goes on and evicts one.
#[test]
fn a_miss_looks_again_when_its_looks_run_short() {
    let (_mem, pool, pages) = full_of_cached(2);
    pool.lru_len.store(0, Ordering::Relaxed);
    let sf = pool.alloc(&pages[2], Wait::NoWait).expect("an unused entry was cached: room");
    drop(sf);
    let s = pool.stats();
    assert_eq!((s.misses, s.evictions, s.nowait_fails, s.no_room), (3, 1, 0, 0), "{s}");
    assert!(s.cached <= s.max_excess, "{s}");
}

/// With a mapping granule, hints are indexed by granule number and name the
/// entry's slot (a multiple of the granule, up to the window's last
/// granule): after a miss on each of four granules filling the window,
/// every granule's hint names its own entry.
#[test]
fn granule_hints_name_their_entries() {
    for g in [2, 4, 16] {
        let mem = PhysMem::builder().frames(8 * g).backing(Backing::Heap).build().expect("PhysMem");
        let mmu = Arc::new(ModelMmu::new(&mem, 4 * g).expect("ModelMmu"));
        let pool = SfPool::builder(mmu).granule(g).max_excess(4).build().expect("pool");
        let pages = mem.alloc_run(8 * g).expect("alloc_run");
        for gr in [7, 0, 3, 5] {
            let sf = pool.alloc(&pages[gr * g + 1], Wait::NoWait).expect("miss");
            assert_eq!(pool.hint.get(gr).map(|h| h.slot as usize), Some(sf.slot().0), "G = {g}, granule {gr}");
        }
    }
}
