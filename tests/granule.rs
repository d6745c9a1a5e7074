//! Integration tests of the mapping granule (`LwbufsBuilder::granule`,
//! `SfPoolBuilder::granule`): G aligned frames mapped, cached and evicted
//! as one unit by both caches.
//!
//! What a user of a granule relies on, each checked against an independent
//! view (the direct map, the caches' and the MMU's counters):
//!
//! - every handle points at its own page inside its granule, both ways
//!   (written through the handle, read through the direct map, and back);
//! - the first page of a granule maps all of it with one enter, and its
//!   other pages are hits;
//! - the last granule of a memory whose size is not a multiple of G maps
//!   only the frames that exist;
//! - a run inside one granule uses the granule's entry, a run crossing
//!   granules maps the whole granules it covers (one entry);
//! - a small window cycles many granules, bytes intact, nothing leaked;
//! - an lwbuf handle is valid on another CPU, and its release there is
//!   applied at home;
//! - sf_buf hits from two threads, pinned hits, waiters woken when a
//!   granule (not just one of its pages) is released, and all-or-nothing
//!   requests sized in granules;
//! - a granule that is not a power of two, or larger than the window, is a
//!   `Config` error naming it, and a failed build leaves the window free.
//!
//! Every test is written once, generic over a [`Backend`], and instantiated
//! for the real window (memfd + reserved `PROT_NONE` window) and for the
//! model MMU (heap memory, no system call) by `on_both_backends!`; under
//! Miri only the model half runs, with fewer rounds and fewer words checked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use lwbuf::{system_page_size, Error, Kaddr, Lwbuf, Lwbufs, Mmu, Page, PhysMem, Reclaim, SfBuf, SfPool, Slot, Wait};

#[macro_use]
#[path = "common/backend.rs"]
mod backend;
use backend::{pattern, Backend};

on_both_backends!(
    lwbuf_every_page_of_a_granule_maps_its_own_frame,
    sfbuf_every_page_of_a_granule_maps_its_own_frame,
    lwbuf_later_pages_of_a_granule_hit,
    sfbuf_later_pages_of_a_granule_hit,
    lwbuf_short_last_granule_maps_only_the_frames_that_exist,
    sfbuf_short_last_granule_maps_only_the_frames_that_exist,
    lwbuf_runs_map_their_granule_or_the_granules_they_cover,
    sfbuf_runs_map_their_granule_or_the_granules_they_cover,
    lwbuf_small_window_cycles_many_granules,
    sfbuf_small_window_cycles_many_granules,
    lwbuf_handle_in_a_granule_used_and_released_on_another_cpu,
    sfbuf_two_threads_hammer_the_same_granules,
    sfbuf_forever_waiter_wakes_when_its_granule_is_released,
    sfbuf_hits_on_cached_granules_are_pinned_hits,
    sfbuf_alloc_all_counts_whole_granules,
    bad_granules_are_config_errors,
    granule_as_large_as_the_window,
);

// === helpers ===

/// Every frame of `mem` as a page: `pages[i]` is frame `i`.
fn all_pages(mem: &PhysMem) -> Vec<Page> {
    let pages = mem.alloc_run(mem.frames()).expect("alloc_run of every frame");
    assert!(pages.iter().enumerate().all(|(i, p)| p.pfn().0 == i), "a fresh memory hands out frames in order");
    pages
}

fn lwbufs(mmu: Arc<dyn Mmu>, granule: usize, cpus: usize, max_excess: usize) -> Lwbufs {
    // Strict reclaim: these tests count exactly what the MMU maps.
    let lw = Lwbufs::builder(mmu)
        .cpus(cpus)
        .max_excess(max_excess)
        .granule(granule)
        .reclaim(Reclaim::Strict)
        .build()
        .expect("build Lwbufs");
    assert_eq!(lw.granule(), granule);
    lw
}

fn pool(mmu: Arc<dyn Mmu>, granule: usize, max_excess: usize) -> SfPool {
    let pool = SfPool::builder(mmu)
        .max_excess(max_excess)
        .granule(granule)
        .reclaim(Reclaim::Strict)
        .build()
        .expect("build SfPool");
    assert_eq!(pool.granule(), granule);
    pool
}

/// Word `w` of version `v` of frame `pfn` (version 0 is the shared stamp).
fn value(pfn: usize, w: usize, v: u64) -> u64 {
    pattern(pfn, w) ^ v.wrapping_mul(0xd6e8_feb8_6659_fd93)
}

/// The words of a page that the byte checks write and read: every word;
/// under Miri (about 100x slower) the first two, the middle and the last.
fn words() -> Vec<usize> {
    let n = system_page_size() / 8;
    if cfg!(miri) {
        vec![0, 1, n / 2, n - 1]
    } else {
        (0..n).collect()
    }
}

/// Write version `v` of frame `pfn` into page `i` of `k`.
fn put(k: &Kaddr<'_>, i: usize, pfn: usize, v: u64) {
    let fs = system_page_size();
    if cfg!(miri) {
        for w in words() {
            k.write_u64(i * fs + w * 8, value(pfn, w, v)).expect("write_u64");
        }
        return;
    }
    let buf: Vec<u8> = (0..fs / 8).flat_map(|w| value(pfn, w, v).to_ne_bytes()).collect();
    k.write_at(i * fs, &buf).expect("write_at");
}

/// Check that page `i` of `k` holds version `v` of frame `pfn`; on a
/// mismatch, say which frame's bytes it holds if it is a nearby one.
#[track_caller]
fn expect(k: &Kaddr<'_>, i: usize, pfn: usize, v: u64, what: &str) {
    let fs = system_page_size();
    let word = |w: usize| k.read_u64(i * fs + w * 8).expect("read_u64");
    let mut page = vec![0u8; fs];
    let all = if cfg!(miri) {
        None
    } else {
        k.read_at(i * fs, &mut page).expect("read_at");
        Some(&page)
    };
    for w in words() {
        let got = match all {
            Some(page) => u64::from_ne_bytes(page[w * 8..w * 8 + 8].try_into().expect("8 bytes")),
            None => word(w),
        };
        if got != value(pfn, w, v) {
            let first = word(0);
            let whose = (pfn.saturating_sub(1024)..pfn + 1024).find(|&q| first == value(q, 0, v));
            panic!(
                "{what}: frame {pfn} (page {i} of the view at {:#x}) word {w}: got {got:#x}, want {:#x} \
                 (word 0 is that of frame {whose:?})",
                k.addr(),
                value(pfn, w, v)
            );
        }
    }
}

/// Write version `v` of every page through the direct map.
fn put_direct(pages: &[Page], v: u64) {
    for p in pages {
        put(&p.direct().expect("direct map"), 0, p.pfn().0, v);
    }
}

/// Check version `v` of `p` through the direct map.
#[track_caller]
fn expect_direct(p: &Page, v: u64, what: &str) {
    expect(&p.direct().expect("direct map"), 0, p.pfn().0, v, what);
}

/// Check every page a handle maps, in order, against version `v`.
#[track_caller]
fn expect_view(k: &Kaddr<'_>, pages: &[Page], v: u64, what: &str) {
    assert_eq!(k.len(), pages.len() * system_page_size(), "{what}: view length");
    for (i, p) in pages.iter().enumerate() {
        expect(k, i, p.pfn().0, v, what);
    }
}

/// The pages of granule `gr` (the last one may be short), starting in the
/// middle: the first alloc of a granule is not of its first page.
fn granule_order(gr: usize, g: usize, frames: usize) -> Vec<usize> {
    let (base, end) = (gr * g, ((gr + 1) * g).min(frames));
    let mid = base + (end - base) / 2;
    (mid..end).chain(base..mid).collect()
}

/// Spin (sleeping) until `cond` holds; panics after 20 s: a liveness check.
#[track_caller]
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "still waiting after 20 s for: {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Every reference released, every message applied, every invariant intact.
#[track_caller]
fn lwbuf_quiescent(lw: &Lwbufs) {
    assert_eq!(lw.check_consistency(), Ok(0), "reference counts left or invariants broken");
    let st = lw.stats();
    assert_eq!(st.total.mailbox, 0, "messages stranded:\n{st}");
    assert_eq!(st.total.decrefs_sent, st.total.decrefs_applied, "sent vs applied:\n{st}");
    assert_eq!(st.total.unmap_errors, 0, "{st}");
}

/// No handle alive, at most `max_excess` granules cached, and the MMU maps
/// exactly the frames of the cached entries (`frames_cached`).
#[track_caller]
fn sfbuf_quiescent(pool: &SfPool, frames_cached: impl Fn(u64) -> u64) {
    let s = pool.stats();
    assert_eq!(s.used, 0, "no handle is alive: {s}");
    assert_eq!(s.mapped, s.cached, "{s}");
    assert!(s.cached <= s.max_excess, "cached above max_excess: {s}");
    assert_eq!(s.mmu.mapped, frames_cached(s.cached), "the MMU maps the cached granules' frames: {s}");
    assert_eq!(s.live_mappings, s.mapped, "one live mapping per entry: {s}");
    assert_eq!((s.waiters, s.unmap_errors), (0, 0), "{s}");
}

// === bytes: each handle is its own page ===

/// Both ways, on every page of four granules through a window of two: bytes
/// written through a handle are in its frame (direct map), and bytes
/// written through the direct map are what its handle reads. A handle that
/// pointed at its granule's first page, or at a neighbour, reads or writes
/// another frame.
fn lwbuf_every_page_of_a_granule_maps_its_own_frame(b: Backend) {
    for g in [2, 16] {
        let mem = b.phys(4 * g);
        let pages = all_pages(&mem);
        let lw = lwbufs(b.mmu(&mem, 2 * g), g, 1, 2);
        let _cpu = lw.bind(0).expect("bind");
        // Handle -> direct map: every page of a granule held at once,
        // written, then read in the frames. The third granule evicts one.
        for gr in [1, 3, 0] {
            let held: Vec<Lwbuf<'_>> =
                granule_order(gr, g, pages.len()).into_iter().map(|i| lw.alloc(&pages[i]).expect("alloc")).collect();
            for h in &held {
                put(&h.kva().expect("kva"), 0, h.page().pfn().0, 1);
            }
            for h in &held {
                expect_direct(h.page(), 1, "written through the handle, read in the frame");
            }
        }
        // Direct map -> handle, every granule (two of four fit).
        put_direct(&pages, 2);
        for gr in 0..4 {
            for i in granule_order(gr, g, pages.len()) {
                let h = lw.alloc(&pages[i]).expect("alloc");
                expect_view(&h.kva().expect("kva"), std::slice::from_ref(&pages[i]), 2, "read through the handle");
            }
        }
        lwbuf_quiescent(&lw);
    }
}

/// [`lwbuf_every_page_of_a_granule_maps_its_own_frame`] for the pool.
fn sfbuf_every_page_of_a_granule_maps_its_own_frame(b: Backend) {
    for g in [2, 16] {
        let mem = b.phys(4 * g);
        let pages = all_pages(&mem);
        let pool = pool(b.mmu(&mem, 2 * g), g, 2);
        for gr in [1, 3, 0] {
            let held: Vec<SfBuf<'_>> = granule_order(gr, g, pages.len())
                .into_iter()
                .map(|i| pool.alloc(&pages[i], Wait::NoWait).expect("alloc"))
                .collect();
            for h in &held {
                assert_eq!(h.slot().0 % g, 0, "a handle's slot is its granule's first slot");
                assert_eq!(h.slot(), held[0].slot(), "one entry per granule");
                put(&h.kva(), 0, h.page().pfn().0, 1);
            }
            for h in &held {
                expect_direct(h.page(), 1, "written through the handle, read in the frame");
            }
        }
        put_direct(&pages, 2);
        for gr in 0..4 {
            for i in granule_order(gr, g, pages.len()) {
                let h = pool.alloc(&pages[i], Wait::NoWait).expect("alloc");
                expect_view(&h.kva(), std::slice::from_ref(&pages[i]), 2, "read through the handle");
            }
        }
        sfbuf_quiescent(&pool, |cached| cached * g as u64);
    }
}

// === hits: one enter per granule ===

/// The granules the hit tests try: 512 needs a window of 1024 slots (under
/// Miri 128, whose 384 frames take a quarter of the time).
const HIT_GRANULES: [usize; 4] = [1, 2, 16, if cfg!(miri) { 128 } else { 512 }];

/// The first alloc of a granule (of a page in its middle) is one miss and
/// one enter of G frames; the granule's other pages, before and after it,
/// are hits with no MMU call, with the first handle held or not.
fn lwbuf_later_pages_of_a_granule_hit(b: Backend) {
    for g in HIT_GRANULES {
        let mem = b.phys(3 * g);
        let pages = all_pages(&mem);
        put_direct(&pages, 0);
        let lw = lwbufs(b.mmu(&mem, 2 * g), g, 1, 4);
        let _cpu = lw.bind(0).expect("bind");
        for gr in [2, 0] {
            let order = granule_order(gr, g, pages.len());
            let (st0, mmu0) = (lw.stats().total, lw.mmu().stats());
            let first = lw.alloc(&pages[order[0]]).expect("miss");
            let d = lw.mmu().stats().since(&mmu0);
            assert_eq!((d.enters, d.pages_entered), (1, g as u64), "G = {g}: one enter of the whole granule");
            for &i in &order[1..] {
                let h = lw.alloc(&pages[i]).expect("hit");
                expect_view(&h.kva().expect("kva"), std::slice::from_ref(&pages[i]), 0, "hit");
            }
            expect_view(&first.kva().expect("kva"), std::slice::from_ref(&pages[order[0]]), 0, "miss");
            drop(first);
            // Cached now: every page again, all hits.
            for &i in &order {
                drop(lw.alloc(&pages[i]).expect("hit"));
            }
            let (st, d) = (lw.stats().total, lw.mmu().stats().since(&mmu0));
            assert_eq!(
                (st.misses - st0.misses, st.hits - st0.hits),
                (1, 2 * g as u64 - 1),
                "G = {g}, granule {gr}: one miss, every other alloc a hit"
            );
            assert_eq!(
                (d.enters, d.pages_entered, d.removes),
                (1, g as u64, 0),
                "G = {g}: nothing but the first enter"
            );
        }
        lwbuf_quiescent(&lw);
    }
}

/// [`lwbuf_later_pages_of_a_granule_hit`] for the pool; the handles of one
/// granule share its entry's slot, whose MMU translation is the granule.
fn sfbuf_later_pages_of_a_granule_hit(b: Backend) {
    for g in HIT_GRANULES {
        let mem = b.phys(3 * g);
        let pages = all_pages(&mem);
        put_direct(&pages, 0);
        let pool = pool(b.mmu(&mem, 2 * g), g, 4);
        for gr in [2, 0] {
            let order = granule_order(gr, g, pages.len());
            let s0 = pool.stats();
            let first = pool.alloc(&pages[order[0]], Wait::NoWait).expect("miss");
            let d = pool.mmu().stats().since(&s0.mmu);
            assert_eq!((d.enters, d.pages_entered), (1, g as u64), "G = {g}: one enter of the whole granule");
            for k in 0..g {
                let slot = Slot(first.slot().0 + k);
                assert_eq!(pool.mmu().translate(slot).map(|p| p.0), Some(gr * g + k), "G = {g}: slot {slot:?}");
            }
            for &i in &order[1..] {
                let h = pool.alloc(&pages[i], Wait::NoWait).expect("hit");
                assert_eq!(h.slot(), first.slot(), "G = {g}: frame {i} shares its granule's entry");
                expect_view(&h.kva(), std::slice::from_ref(&pages[i]), 0, "hit");
            }
            expect_view(&first.kva(), std::slice::from_ref(&pages[order[0]]), 0, "miss");
            drop(first);
            for &i in &order {
                let h = pool.alloc(&pages[i], Wait::NoWait).expect("hit on the cached granule");
                expect_view(&h.kva(), std::slice::from_ref(&pages[i]), 0, "hit on the cached granule");
            }
            let s = pool.stats();
            let d = s.mmu.since(&s0.mmu);
            assert_eq!(
                (s.misses - s0.misses, s.hits - s0.hits),
                (1, 2 * g as u64 - 1),
                "G = {g}, granule {gr}: one miss, every other alloc a hit: {s}"
            );
            assert_eq!(
                (d.enters, d.pages_entered, d.removes),
                (1, g as u64, 0),
                "G = {g}: nothing but the first enter"
            );
        }
        sfbuf_quiescent(&pool, |cached| cached * g as u64);
    }
}

// === the short last granule ===

/// (frames, G): a memory that ends inside a granule, one smaller than a
/// granule, one of a single frame.
const SHORT: [(usize, usize); 4] = [(27, 8), (5, 8), (1, 4), (17, 16)];

/// The last granule of a memory that is not a multiple of G has fewer
/// frames: its pages map (one enter of only the frames that exist), read
/// and write their own frames, hit, serve a run of the whole short granule,
/// and are evicted and mapped again.
fn lwbuf_short_last_granule_maps_only_the_frames_that_exist(b: Backend) {
    for (frames, g) in SHORT {
        let mem = b.phys(frames);
        let pages = all_pages(&mem);
        put_direct(&pages, 0);
        let lw = lwbufs(b.mmu(&mem, 2 * g), g, 1, 1);
        let _cpu = lw.bind(0).expect("bind");
        let (last, base) = (frames - 1, (frames - 1) & !(g - 1));
        let mmu0 = lw.mmu().stats();
        let h = lw.alloc(&pages[last]).expect("the last page maps");
        let d = lw.mmu().stats().since(&mmu0);
        assert_eq!((d.enters, d.pages_entered), (1, (frames - base) as u64), "{frames} frames, G = {g}");
        expect_view(&h.kva().expect("kva"), &pages[last..], 0, "the last page");
        put(&h.kva().expect("kva"), 0, last, 1);
        expect_direct(&pages[last], 1, "written through the last page's handle");
        assert_eq!(lw.check_consistency(), Ok(1));
        for page in &pages[base..] {
            let v = if page.pfn().0 == last { 1 } else { 0 };
            let p = lw.alloc(page).expect("hit");
            expect_view(&p.kva().expect("kva"), std::slice::from_ref(page), v, "a page of the short granule");
        }
        let run = lw.alloc_run(&pages[base..]).expect("a run of the whole short granule");
        assert_eq!(lw.mmu().stats().since(&mmu0).enters, 1, "the run used the granule's entry");
        let k = run.kva().expect("kva");
        assert_eq!(k.len(), (frames - base) * system_page_size(), "the run's view");
        for i in base..last {
            expect(&k, i - base, i, 0, "a page of the run");
        }
        expect(&k, last - base, last, 1, "the run's last page");
        drop((h, run));
        assert_eq!(lw.check_consistency(), Ok(0));
        // Evicted and mapped again, from every end, with the other granules.
        put_direct(&pages, 2);
        for i in (0..frames).rev().chain(0..frames) {
            let p = lw.alloc(&pages[i]).expect("alloc");
            expect_view(&p.kva().expect("kva"), std::slice::from_ref(&pages[i]), 2, "after evictions");
        }
        lwbuf_quiescent(&lw);
    }
}

/// [`lwbuf_short_last_granule_maps_only_the_frames_that_exist`] for the
/// pool.
fn sfbuf_short_last_granule_maps_only_the_frames_that_exist(b: Backend) {
    for (frames, g) in SHORT {
        let mem = b.phys(frames);
        let pages = all_pages(&mem);
        put_direct(&pages, 0);
        let pool = pool(b.mmu(&mem, 2 * g), g, 1);
        let (last, base) = (frames - 1, (frames - 1) & !(g - 1));
        let short = (frames - base) as u64;
        let mmu0 = pool.mmu().stats();
        let h = pool.alloc(&pages[last], Wait::NoWait).expect("the last page maps");
        let d = pool.mmu().stats().since(&mmu0);
        assert_eq!((d.enters, d.pages_entered), (1, short), "{frames} frames, G = {g}");
        expect_view(&h.kva(), &pages[last..], 0, "the last page");
        put(&h.kva(), 0, last, 1);
        expect_direct(&pages[last], 1, "written through the last page's handle");
        for page in &pages[base..] {
            let v = if page.pfn().0 == last { 1 } else { 0 };
            let p = pool.alloc(page, Wait::NoWait).expect("hit");
            assert_eq!(p.slot(), h.slot());
            expect_view(&p.kva(), std::slice::from_ref(page), v, "a page of the short granule");
        }
        let run = pool.alloc_run(&pages[base..], Wait::NoWait).expect("a run of the whole short granule");
        assert_eq!((run.slot(), pool.mmu().stats().since(&mmu0).enters), (h.slot(), 1), "the granule's entry");
        let k = run.kva();
        assert_eq!(k.len(), (frames - base) * system_page_size(), "the run's view");
        for i in base..last {
            expect(&k, i - base, i, 0, "a page of the run");
        }
        expect(&k, last - base, last, 1, "the run's last page");
        drop((h, run));
        let s = pool.stats();
        assert_eq!((s.misses, s.mapped, s.mmu.mapped), (1, 1, short), "{s}");
        put_direct(&pages, 2);
        for i in (0..frames).rev().chain(0..frames) {
            let p = pool.alloc(&pages[i], Wait::NoWait).expect("alloc");
            expect_view(&p.kva(), std::slice::from_ref(&pages[i]), 2, "after evictions");
        }
        // The cached granule is the short one (allocated last).
        sfbuf_quiescent(&pool, |cached| cached * (((frames - 1) % g) + 1) as u64);
    }
}

// === runs ===

/// G = 4, 16 frames, a window of two granules. A run inside one granule
/// uses the granule's entry (a hit when cached; a miss maps the whole
/// granule, whose pages then hit); a run crossing granules maps the whole
/// granules it covers as one entry, reads and writes its own frames, and
/// a run needing more granules of slots than the window has is refused.
fn lwbuf_runs_map_their_granule_or_the_granules_they_cover(b: Backend) {
    let g = 4;
    let mem = b.phys(16);
    let pages = all_pages(&mem);
    put_direct(&pages, 0);
    let lw = lwbufs(b.mmu(&mem, 2 * g), g, 1, 4);
    let _cpu = lw.bind(0).expect("bind");
    let mmu0 = lw.mmu().stats();
    let one = lw.alloc(&pages[5]).expect("miss: granule 1");
    for r in [4..7, 6..8, 4..8, 5..6] {
        let run = lw.alloc_run(&pages[r.clone()]).expect("run inside granule 1");
        expect_view(&run.kva().expect("kva"), &pages[r.clone()], 0, "run inside a cached granule");
    }
    assert_eq!(lw.mmu().stats().since(&mmu0).enters, 1, "runs inside granule 1 used its entry");
    drop(one);
    // A run inside a granule not cached maps the whole granule.
    let mmu1 = lw.mmu().stats();
    let run = lw.alloc_run(&pages[9..11]).expect("run inside granule 2");
    let d = lw.mmu().stats().since(&mmu1);
    assert_eq!((d.enters, d.pages_entered), (1, 4), "the run mapped its granule");
    for i in [8, 11] {
        let h = lw.alloc(&pages[i]).expect("hit");
        expect_view(&h.kva().expect("kva"), std::slice::from_ref(&pages[i]), 0, "a page next to the run");
    }
    drop(run);
    assert_eq!(lw.mmu().stats().since(&mmu1).enters, 1, "pages next to the run hit");
    let st = lw.stats().total;
    assert_eq!((st.misses, st.hits), (2, 6), "{st}");

    // Crossing runs: each its own enter of the granules it covers.
    for (r, v) in [(3..6, 1), (7..9, 2), (10..14, 3)] {
        let before = lw.mmu().stats();
        let run = lw.alloc_run(&pages[r.clone()]).expect("crossing run");
        let d = lw.mmu().stats().since(&before);
        let covered = (r.end.div_ceil(g) * g).min(pages.len()) - r.start / g * g;
        assert_eq!((d.enters, d.pages_entered), (1, covered as u64), "run {r:?} mapped as the granules it covers");
        let k = run.kva().expect("kva");
        expect_view(&k, &pages[r.clone()], 0, "crossing run");
        for (i, p) in pages[r.clone()].iter().enumerate() {
            put(&k, i, p.pfn().0, v);
        }
        drop(run);
        for p in &pages[r.clone()] {
            expect_direct(p, v, "written through a crossing run");
            put_direct(std::slice::from_ref(p), 0);
        }
    }
    lwbuf_quiescent(&lw);
    // A crossing run maps the whole granules it covers: two pages across a
    // boundary take both granules of this window, so no other granule fits
    // beside them, nor a single page of one of them (its own key).
    let small = lw.alloc_run(&pages[3..5]).expect("crossing run of 2");
    assert!(matches!(lw.alloc(&pages[12]), Err(Error::WindowFull { .. })), "both granules of slots in use");
    assert!(matches!(lw.alloc(&pages[6]), Err(Error::WindowFull { .. })), "a single granule is another key");
    drop(small);
    let big = lw.alloc_run(&pages[6..11]).expect("crossing run of 5");
    expect_view(&big.kva().expect("kva"), &pages[6..11], 0, "crossing run of 5");
    assert!(matches!(lw.alloc(&pages[0]), Err(Error::WindowFull { .. })), "the 5-page run holds both granules");
    drop(big);
    // Longer than the window in whole granules of slots (pages 1..10 cover
    // three granules: 12 slots), though pages 2..8 (two granules) fit.
    assert!(matches!(lw.alloc_run(&pages[1..10]), Err(Error::WindowFull { requested: 12, capacity: 8 })));
    drop(lw.alloc_run(&pages[2..8]).expect("6 pages in two granules of slots"));
    lwbuf_quiescent(&lw);
}

/// [`lwbuf_runs_map_their_granule_or_the_granules_they_cover`] for the pool
/// (`WouldBlock` where the lwbuf caches say `WindowFull`).
fn sfbuf_runs_map_their_granule_or_the_granules_they_cover(b: Backend) {
    let g = 4;
    let mem = b.phys(16);
    let pages = all_pages(&mem);
    put_direct(&pages, 0);
    let pool = pool(b.mmu(&mem, 2 * g), g, 4);
    let mmu0 = pool.mmu().stats();
    let one = pool.alloc(&pages[5], Wait::NoWait).expect("miss: granule 1");
    for r in [4..7, 6..8, 4..8, 5..6] {
        let run = pool.alloc_run(&pages[r.clone()], Wait::NoWait).expect("run inside granule 1");
        assert_eq!(run.slot(), one.slot(), "run {r:?} shares granule 1's entry");
        expect_view(&run.kva(), &pages[r.clone()], 0, "run inside a cached granule");
    }
    assert_eq!(pool.mmu().stats().since(&mmu0).enters, 1, "runs inside granule 1 used its entry");
    drop(one);
    let mmu1 = pool.mmu().stats();
    let run = pool.alloc_run(&pages[9..11], Wait::NoWait).expect("run inside granule 2");
    let d = pool.mmu().stats().since(&mmu1);
    assert_eq!((d.enters, d.pages_entered), (1, 4), "the run mapped its granule");
    for i in [8, 11] {
        let h = pool.alloc(&pages[i], Wait::NoWait).expect("hit");
        assert_eq!(h.slot(), run.slot());
        expect_view(&h.kva(), std::slice::from_ref(&pages[i]), 0, "a page next to the run");
    }
    drop(run);
    let s = pool.stats();
    assert_eq!((s.misses, s.hits, s.mmu.since(&mmu1).enters), (2, 6, 1), "{s}");

    for (r, v) in [(3..6, 1), (7..9, 2), (10..14, 3)] {
        let before = pool.mmu().stats();
        let run = pool.alloc_run(&pages[r.clone()], Wait::NoWait).expect("crossing run");
        let d = pool.mmu().stats().since(&before);
        let covered = (r.end.div_ceil(g) * g).min(pages.len()) - r.start / g * g;
        assert_eq!((d.enters, d.pages_entered), (1, covered as u64), "run {r:?} mapped as the granules it covers");
        assert_eq!(run.slot().0 % g, 0, "in whole granules of slots");
        let k = run.kva();
        expect_view(&k, &pages[r.clone()], 0, "crossing run");
        for (i, p) in pages[r.clone()].iter().enumerate() {
            put(&k, i, p.pfn().0, v);
        }
        drop(run);
        for p in &pages[r.clone()] {
            expect_direct(p, v, "written through a crossing run");
            put_direct(std::slice::from_ref(p), 0);
        }
    }
    let small = pool.alloc_run(&pages[3..5], Wait::NoWait).expect("crossing run of 2");
    assert!(matches!(pool.alloc(&pages[12], Wait::NoWait), Err(Error::WouldBlock)), "both granules in use");
    drop(small);
    let big = pool.alloc_run(&pages[6..11], Wait::NoWait).expect("crossing run of 5");
    expect_view(&big.kva(), &pages[6..11], 0, "crossing run of 5");
    assert!(matches!(pool.alloc(&pages[0], Wait::NoWait), Err(Error::WouldBlock)), "the run holds both granules");
    drop(big);
    assert!(matches!(
        pool.alloc_run(&pages[1..10], Wait::NoWait),
        Err(Error::WindowFull { requested: 12, capacity: 8 })
    ));
    drop(pool.alloc_run(&pages[2..8], Wait::NoWait).expect("6 pages in two granules of slots"));
    let s = pool.stats();
    assert_eq!((s.used, s.waiters, s.unmap_errors), (0, 0, 0), "{s}");
}

// === eviction ===

/// Rounds of the eviction cycles.
fn cycle_rounds() -> usize {
    if cfg!(miri) {
        40
    } else {
        600
    }
}

/// A window of three granules over sixteen, `max_excess` 1: random pages of
/// random granules, up to two handles held, a new version written through
/// some of them; every read through a handle and, at the end, through the
/// direct map sees the latest version of its own frame.
fn lwbuf_small_window_cycles_many_granules(b: Backend) {
    for g in [2, 8] {
        let mem = b.phys(16 * g);
        let pages = all_pages(&mem);
        put_direct(&pages, 0);
        let lw = lwbufs(b.mmu(&mem, 3 * g), g, 1, 1);
        let _cpu = lw.bind(0).expect("bind");
        let mut version = vec![0u64; pages.len()];
        let mut rng = SmallRng::seed_from_u64(g as u64);
        let mut held: Vec<Lwbuf<'_>> = Vec::new();
        for round in 0..cycle_rounds() {
            let i = rng.gen_range(0..pages.len());
            let h = lw.alloc(&pages[i]).expect("alloc");
            let k = h.kva().expect("kva");
            expect(&k, 0, i, version[i], "cycled");
            if rng.gen_bool(0.25) {
                version[i] = round as u64 + 1;
                put(&k, 0, i, version[i]);
            }
            if rng.gen_bool(0.5) {
                held.push(h);
                if held.len() > 2 {
                    drop(held.remove(0));
                }
            }
        }
        drop(held);
        for p in &pages {
            expect_direct(p, version[p.pfn().0], "after the cycles");
        }
        let st = lw.stats();
        assert!(st.total.evictions > 0 && st.total.cached <= 1, "G = {g}: {st}");
        assert!(st.mmu.mapped <= 3 * g as u64, "G = {g}: {st}");
        lwbuf_quiescent(&lw);
    }
}

/// [`lwbuf_small_window_cycles_many_granules`] for the pool.
fn sfbuf_small_window_cycles_many_granules(b: Backend) {
    for g in [2, 8] {
        let mem = b.phys(16 * g);
        let pages = all_pages(&mem);
        put_direct(&pages, 0);
        let pool = pool(b.mmu(&mem, 3 * g), g, 1);
        let mut version = vec![0u64; pages.len()];
        let mut rng = SmallRng::seed_from_u64(g as u64);
        let mut held: Vec<SfBuf<'_>> = Vec::new();
        for round in 0..cycle_rounds() {
            let i = rng.gen_range(0..pages.len());
            let h = pool.alloc(&pages[i], Wait::NoWait).expect("alloc (two handles held, three granules)");
            expect(&h.kva(), 0, i, version[i], "cycled");
            if rng.gen_bool(0.25) {
                version[i] = round as u64 + 1;
                put(&h.kva(), 0, i, version[i]);
            }
            if rng.gen_bool(0.5) {
                held.push(h);
                if held.len() > 2 {
                    drop(held.remove(0));
                }
            }
        }
        drop(held);
        for p in &pages {
            expect_direct(p, version[p.pfn().0], "after the cycles");
        }
        let s = pool.stats();
        assert!(s.evictions > 0, "G = {g}: {s}");
        sfbuf_quiescent(&pool, |cached| cached * g as u64);
    }
}

// === lwbuf: another CPU ===

/// Handles made on CPU 0, on pages inside three granules (two on one
/// granule), are used by a thread bound to CPU 1: it reads their own
/// frames, maps each granule once there (the second page of a granule is a
/// hit on CPU 1), writes a new version through them and drops them there.
/// CPU 0 applies the decrefs at its next call; it then reads the new bytes
/// through its cached entries (hits).
fn lwbuf_handle_in_a_granule_used_and_released_on_another_cpu(b: Backend) {
    let g = 8;
    let mem = b.phys(4 * g);
    let pages = all_pages(&mem);
    put_direct(&pages, 0);
    // Room for both CPUs' entries: three granules each.
    let lw = lwbufs(b.mmu(&mem, 6 * g), g, 2, 4);
    let _cpu0 = lw.bind(0).expect("bind 0");
    let pfns = [3, g + 5, 2 * g + 7, g + 1];
    let hs: Vec<Lwbuf<'_>> = pfns.iter().map(|&i| lw.alloc(&pages[i]).expect("alloc on CPU 0")).collect();
    for h in &hs {
        expect_view(&h.kva().expect("kva"), std::slice::from_ref(h.page()), 0, "on CPU 0");
    }
    let lw = &lw;
    thread::scope(|s| {
        s.spawn(move || {
            let _cpu1 = lw.bind(1).expect("bind 1");
            for h in &hs {
                let k = h.kva().expect("kva on CPU 1");
                expect_view(&k, std::slice::from_ref(h.page()), 0, "on CPU 1");
                put(&k, 0, h.page().pfn().0, 7);
                assert!(h.cpumask().contains(1), "CPU 1 is in the mask");
            }
            let c1 = lw.stats().per_cpu[1];
            assert_eq!((c1.misses, c1.hits, c1.foreign), (3, 1, 4), "three granules mapped on CPU 1: {c1}");
            drop(hs);
            let c1 = lw.stats().per_cpu[1];
            assert_eq!(c1.decrefs_sent, 4, "one decref per handle sent home: {c1}");
        });
    });
    lw.poll().expect("poll on CPU 0");
    let st = lw.stats();
    assert_eq!(st.per_cpu[0].decrefs_applied, 4, "{st}");
    lwbuf_quiescent(lw);
    for &i in &pfns {
        expect_direct(&pages[i], 7, "written on CPU 1");
        let h = lw.alloc(&pages[i]).expect("hit on CPU 0");
        expect_view(&h.kva().expect("kva"), std::slice::from_ref(&pages[i]), 7, "CPU 0 after CPU 1 wrote");
    }
    let c0 = lw.stats().per_cpu[0];
    assert_eq!((c0.misses, c0.hits), (3, 5), "CPU 0's entries stayed cached: {c0}");
    lwbuf_quiescent(lw);
}

// === sf_buf: threads ===

/// Two threads alloc random pages of three granules with `Wait::Forever`,
/// one handle at a time, and check every read against the stamps: with a
/// window that holds the three (and a miss that loses the race to map one:
/// hits through pins and hints, no eviction) and with one that holds two
/// (evictions racing hits).
fn sfbuf_two_threads_hammer_the_same_granules(b: Backend) {
    let g = 4;
    let rounds = if cfg!(miri) { 50 } else { 4000 };
    for (slots, max_excess) in [(4 * g, 3), (2 * g, 1)] {
        let mem = b.phys(3 * g);
        let pages = all_pages(&mem);
        put_direct(&pages, 0);
        let pool = pool(b.mmu(&mem, slots), g, max_excess);
        let start = Barrier::new(2);
        thread::scope(|s| {
            for t in 0..2u64 {
                let (pool, pages, start) = (&pool, &pages, &start);
                s.spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(t);
                    let ws = words();
                    start.wait();
                    for _ in 0..rounds {
                        let i = rng.gen_range(0..pages.len());
                        let sf = pool.alloc(&pages[i], Wait::Forever).expect("alloc");
                        let k = sf.kva();
                        for w in [ws[0], ws[ws.len() - 1], ws[rng.gen_range(0..ws.len())]] {
                            assert_eq!(k.read_u64(w * 8).expect("read"), value(i, w, 0), "frame {i} word {w}");
                        }
                    }
                });
            }
        });
        let s = pool.stats();
        assert_eq!(s.hits + s.misses, 2 * rounds as u64, "{s}");
        if slots == 4 * g {
            assert_eq!((s.misses, s.evictions), (3, 0), "each granule mapped once: {s}");
            assert_eq!(s.mmu.enters, 3 + s.lost_races, "{s}");
        } else {
            assert!(s.evictions > 0, "{s}");
        }
        sfbuf_quiescent(&pool, |cached| cached * g as u64);
    }
}

/// A window of two granules, G = 4, held by another thread: two handles on
/// granule 0, one on granule 1. A `Wait::Forever` alloc of a page of
/// granule 2 sleeps; dropping one of granule 0's handles frees nothing, so
/// it sleeps on; dropping the other frees the granule and wakes it.
fn sfbuf_forever_waiter_wakes_when_its_granule_is_released(b: Backend) {
    let g = 4;
    let mem = b.phys(3 * g);
    let pages = all_pages(&mem);
    put_direct(&pages, 0);
    let pool = pool(b.mmu(&mem, 2 * g), g, 1);
    // A channel, not a barrier: if the holder fails before it holds the
    // window, the waiter's receive fails instead of waiting for good.
    let (held_tx, held_rx) = mpsc::channel::<()>();
    let (woke, last_dropped) = (AtomicBool::new(false), AtomicBool::new(false));
    thread::scope(|s| {
        s.spawn(|| {
            // Moved in: dropped if this thread fails.
            let held_tx = held_tx;
            let a0 = pool.alloc(&pages[1], Wait::NoWait).expect("granule 0");
            let a1 = pool.alloc(&pages[2], Wait::NoWait).expect("granule 0 again");
            let b0 = pool.alloc(&pages[5], Wait::NoWait).expect("granule 1");
            held_tx.send(()).expect("send");
            eventually("the waiter to sleep", || pool.stats().waiters == 1);
            drop(a0);
            thread::sleep(Duration::from_millis(20));
            assert!(!woke.load(Ordering::SeqCst), "woke while granule 0 was still held");
            assert_eq!(pool.stats().waiters, 1, "still asleep");
            last_dropped.store(true, Ordering::SeqCst);
            drop(a1);
            eventually("the waiter to wake", || woke.load(Ordering::SeqCst));
            expect_view(&b0.kva(), std::slice::from_ref(&pages[5]), 0, "granule 1, held throughout");
        });
        held_rx.recv().expect("the other thread holds the window");
        let sf = pool.alloc(&pages[10], Wait::Forever).expect("Forever succeeds after the release");
        woke.store(true, Ordering::SeqCst);
        assert!(last_dropped.load(Ordering::SeqCst), "woke before granule 0 was released");
        expect_view(&sf.kva(), std::slice::from_ref(&pages[10]), 0, "the waiter's page");
        let s = pool.stats();
        assert_eq!((s.waits, s.timeouts, s.nowait_fails), (1, 0, 0), "{s}");
        assert!(s.no_room >= 1, "{s}");
    });
    sfbuf_quiescent(&pool, |cached| cached * g as u64);
}

/// A hit on a cached granule nobody holds takes the pinned path, as a
/// single frame's does: `SfStats::peak` counts the entries' own references
/// and not pinned ones, so holding hits on three cached granules and then
/// mapping a fourth leaves the peak at 1. A hint that named the wrong slot
/// would send the hits through the map, each counted.
fn sfbuf_hits_on_cached_granules_are_pinned_hits(b: Backend) {
    for g in [1, 2, 4, 16] {
        let mem = b.phys(4 * g);
        let pages = all_pages(&mem);
        put_direct(&pages, 0);
        let pool = pool(b.mmu(&mem, 4 * g), g, 4);
        for gr in 0..3 {
            drop(pool.alloc(&pages[gr * g], Wait::NoWait).expect("miss"));
        }
        let held: Vec<SfBuf<'_>> =
            (0..3).map(|gr| pool.alloc(&pages[gr * g + g - 1], Wait::NoWait).expect("hit")).collect();
        let fourth = pool.alloc(&pages[3 * g], Wait::NoWait).expect("miss");
        for h in held.iter().chain([&fourth]) {
            expect_view(&h.kva(), std::slice::from_ref(h.page()), 0, "pinned hit");
        }
        let s = pool.stats();
        assert_eq!((s.misses, s.hits, s.used), (4, 3, 4), "G = {g}: {s}");
        assert_eq!(s.peak, 1, "G = {g}: the three hits were pinned, as with single frames: {s}");
        drop((held, fourth));
        sfbuf_quiescent(&pool, |cached| cached * g as u64);
    }
}

/// `alloc_all` needs one granule of slots per granule its pages touch
/// (pages of one granule share it): three pages of three granules do not
/// fit a window of two, at once and whatever the wait (it could never
/// succeed), while eight pages of two granules do, with two enters.
fn sfbuf_alloc_all_counts_whole_granules(b: Backend) {
    let g = 4;
    let mem = b.phys(4 * g);
    let pages = all_pages(&mem);
    put_direct(&pages, 0);
    let pool = pool(b.mmu(&mem, 2 * g), g, 2);
    let three = [pages[1].clone(), pages[6].clone(), pages[11].clone()];
    for how in [Wait::NoWait, Wait::Timeout(Duration::from_secs(2))] {
        let r = pool.alloc_all(&three, 1, how);
        assert!(
            matches!(r, Err(Error::WindowFull { requested: 12, capacity: 8 })),
            "three granules of slots in a window of two: {:?}",
            r.map(|v| v.len())
        );
    }
    // Four granules of 16 frames: three whole granules do not fit, nor do
    // two crossing runs of four pages (each covers two granules); one
    // crossing run does.
    let r = pool.alloc_all(&pages[..12], 4, Wait::NoWait);
    assert!(matches!(r, Err(Error::WindowFull { requested: 12, capacity: 8 })), "{:?}", r.map(|v| v.len()));
    let r = pool.alloc_all(&pages[2..10], 4, Wait::NoWait);
    assert!(matches!(r, Err(Error::WindowFull { requested: 16, capacity: 8 })), "{:?}", r.map(|v| v.len()));
    let crossing = pool.alloc_all(&pages[2..6], 4, Wait::NoWait).expect("one crossing run: two granules");
    assert_eq!(crossing.len(), 1);
    for sf in &crossing {
        expect_view(&sf.kva(), sf.pages(), 0, "alloc_all of crossing runs");
    }
    drop(crossing);
    pool.set_max_excess(0);
    pool.set_max_excess(2);
    let eight: Vec<Page> = [13, 1, 12, 0, 15, 2, 14, 3].iter().map(|&i| pages[i].clone()).collect();
    let mmu0 = pool.mmu().stats();
    let bufs = pool.alloc_all(&eight, 1, Wait::NoWait).expect("two granules in a window of two");
    for sf in &bufs {
        expect_view(&sf.kva(), sf.pages(), 0, "alloc_all");
    }
    assert_eq!(pool.mmu().stats().since(&mmu0).enters, 2, "one enter per granule");
    drop(bufs);
    sfbuf_quiescent(&pool, |cached| cached * g as u64);
}

// === configuration ===

/// Granules that are not a power of two or larger than the window's slots
/// are `Config` errors that name the granule, from both builders; the
/// failed builds claim nothing (a good build on the same window works).
fn bad_granules_are_config_errors(b: Backend) {
    let mem = b.phys(64);
    let slots = 24;
    let mmu = b.mmu(&mem, slots);
    #[track_caller]
    fn refused<T>(r: Result<T, Error>, g: usize, who: &str) {
        match r {
            Err(e) => {
                assert!(matches!(e, Error::Config { what: "granule", .. }), "{who}, granule {g}: {e:?}");
                assert!(e.to_string().contains("granule"), "{who}, granule {g}: {e}");
            }
            Ok(_) => panic!("{who}, granule {g}: built"),
        }
    }
    for g in [0, 3, 6, 12, 24, 32, 64, usize::MAX, 1 << 63, usize::MAX / 2 + 2] {
        refused(Lwbufs::builder(mmu.clone()).cpus(1).granule(g).build(), g, "Lwbufs");
        refused(SfPool::builder(mmu.clone()).granule(g).build(), g, "SfPool");
    }
    // Nothing was claimed: each good granule builds on the same window, and
    // uses whole granules of its 24 slots.
    for g in [1, 2, 8, 16] {
        let lw = Lwbufs::builder(mmu.clone()).cpus(1).granule(g).build().expect("a good granule");
        assert_eq!(lw.granule(), g);
        drop(lw);
        let pool = SfPool::builder(mmu.clone()).granule(g).build().expect("a good granule");
        assert_eq!((pool.granule(), pool.capacity()), (g, slots / g * g));
    }
    // The default is one frame.
    assert_eq!(Lwbufs::builder(mmu.clone()).cpus(1).build().expect("default").granule(), 1);
    assert_eq!(SfPool::builder(mmu).build().expect("default").granule(), 1);
}

/// A granule as large as the window: one granule mapped at a time, each of
/// its pages its own frame, the next granule evicting it, and no room for
/// a second while one is held (`WindowFull` from the lwbuf caches,
/// `WouldBlock` from the pool).
fn granule_as_large_as_the_window(b: Backend) {
    for g in [8, 64] {
        let frames = 3 * g + 3;
        let mem = b.phys(frames);
        let pages = all_pages(&mem);
        put_direct(&pages, 0);
        let mmu = b.mmu(&mem, g);
        {
            let lw = lwbufs(mmu.clone(), g, 1, 1);
            let _cpu = lw.bind(0).expect("bind");
            for gr in [1, 0, 3, 1] {
                let order = granule_order(gr, g, frames);
                let held = lw.alloc(&pages[order[0]]).expect("alloc");
                for &i in &order {
                    let h = lw.alloc(&pages[i]).expect("hit");
                    expect_view(&h.kva().expect("kva"), std::slice::from_ref(&pages[i]), 0, "G = the window");
                }
                let other = (order[0] + g) % frames;
                assert!(matches!(lw.alloc(&pages[other]), Err(Error::WindowFull { .. })), "G = {g}, granule {gr}");
                drop(held);
            }
            let st = lw.stats().total;
            assert_eq!((st.misses, st.evictions), (4, 3), "{st}");
            lwbuf_quiescent(&lw);
        }
        let pool = pool(mmu, g, 1);
        for gr in [1, 0, 3, 1] {
            let order = granule_order(gr, g, frames);
            let held = pool.alloc(&pages[order[0]], Wait::NoWait).expect("alloc");
            for &i in &order {
                let h = pool.alloc(&pages[i], Wait::NoWait).expect("hit");
                expect_view(&h.kva(), std::slice::from_ref(&pages[i]), 0, "G = the window");
            }
            let other = (order[0] + g) % frames;
            assert!(matches!(pool.alloc(&pages[other], Wait::NoWait), Err(Error::WouldBlock)), "G = {g}");
            drop(held);
        }
        let s = pool.stats();
        assert_eq!((s.misses, s.evictions), (4, 3), "{s}");
        // The cached granule is the second (full), allocated last.
        sfbuf_quiescent(&pool, |cached| cached * g as u64);
    }
}
