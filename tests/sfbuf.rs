//! Integration tests of the shared sf_buf pool (`SfPool`, `SfBuf`, `Wait`,
//! `CancelToken`, `SfStats`): hits after free, the `max_excess` cap (fixed
//! and changed at run time), the four waiting behaviours and `close`,
//! eviction racing hits on four threads with content checks, the
//! all-or-nothing multi-page request that must not deadlock, run mappings
//! (one enter, one remove, one VMA), misuse errors and the auto traits.
//!
//! Every test is written once, generic over a [`Backend`], and instantiated
//! for the real window (memfd + reserved `PROT_NONE` window) and for the
//! model MMU (heap memory, no system call) by `on_both_backends!`. The
//! `/proc/self/maps` checks only apply to the real window.
//!
//! Frames are *stamped* through the direct map with a per-frame pattern
//! before they are mapped, and reads through a handle are checked against
//! it: a handle that maps the wrong frame, or a slot reused while still
//! referenced, shows up as a wrong word.
//!
//! The real-kernel wall (`vm.max_map_count`) is in `tests/sfbuf_wall.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use lwbuf::{
    system_page_size, CancelToken, Error, Mmu, ModelMmu, Page, PhysMem, Reclaim, SfBuf, SfPool, SfStats, Slot, Wait,
    Window,
};

// === helpers ===

#[macro_use]
#[path = "common/backend.rs"]
mod backend;
use backend::{pattern, stamped_pages, stamped_run, Backend};

/// Memory, the MMU over it, and (real backend only) the window itself, for
/// its base and length.
struct Rig {
    mem: PhysMem,
    mmu: Arc<dyn Mmu>,
    win: Option<Arc<Window>>,
}

impl Backend {
    fn rig(self, frames: usize, slots: usize) -> Rig {
        let mem = self.phys(frames);
        match self {
            Backend::Window => {
                let win = Arc::new(Window::builder(&mem).slots(slots).build().expect("build Window"));
                Rig { mmu: win.clone(), win: Some(win), mem }
            }
            Backend::Model => {
                let mmu = Arc::new(ModelMmu::new(&mem, slots).expect("build ModelMmu"));
                Rig { mmu, win: None, mem }
            }
        }
    }
}

impl Rig {
    fn pool(&self, max_excess: usize) -> SfPool {
        SfPool::builder(self.mmu.clone()).max_excess(max_excess).reclaim(Reclaim::Strict).build().expect("build SfPool")
    }
}

on_both_backends!(
    hit_after_free_makes_no_mmu_call,
    max_excess_zero_one_and_many,
    set_max_excess_is_enforced_before_it_returns,
    nowait_fails_at_once_while_another_thread_holds_the_window,
    forever_wakes_when_the_holder_drops,
    timeout_expires_when_nobody_releases,
    timeout_succeeds_when_the_release_comes_first,
    cancel_wakes_the_waiter_with_cancelled,
    cancel_loses_to_a_release_that_comes_first,
    timeout_max_waits_until_a_release,
    timeout_zero_is_a_no_wait_call,
    close_wakes_every_waiter_with_closed,
    closed_pool_refuses_every_allocation,
    eviction_races_hits_on_four_threads,
    pinned_hits_given_back_on_other_threads,
    pin_rows_change_hands_while_pins_are_out,
    alloc_all_sleeps_instead_of_spinning,
    alloc_all_cannot_deadlock_two_threads,
    alloc_all_runs_cannot_deadlock_two_threads,
    run_of_64_frames_is_one_enter_one_remove_one_vma,
    misuse_returns_its_error,
);

/// Check the first, last and one random word of every page of `sf`.
#[track_caller]
fn check_words(sf: &SfBuf<'_>, rng: &mut SmallRng) {
    let fs = system_page_size();
    let words = fs / 8;
    let k = sf.kva();
    assert_eq!(k.len(), sf.pages().len() * fs, "kva length");
    for (i, p) in sf.pages().iter().enumerate() {
        for w in [0, words - 1, rng.gen_range(0..words)] {
            let got = k.read_u64(i * fs + w * 8).expect("read_u64");
            assert_eq!(got, pattern(p.pfn().0, w), "frame {} word {w} read through {:#x}", p.pfn().0, k.addr());
        }
    }
}

/// Check every word of every page of `sf`. Under Miri (about 100x slower)
/// every word of the first page and four words of each other page.
#[track_caller]
fn check_all_words(sf: &SfBuf<'_>) {
    let fs = system_page_size();
    let k = sf.kva();
    let mut buf = vec![0u8; fs];
    for (i, p) in sf.pages().iter().enumerate() {
        if cfg!(miri) && i > 0 {
            let words = fs / 8;
            for w in [0, 1, words / 2, words - 1] {
                let got = k.read_u64(i * fs + w * 8).expect("read_u64");
                assert_eq!(got, pattern(p.pfn().0, w), "frame {} word {w} read through {:#x}", p.pfn().0, k.addr());
            }
            continue;
        }
        k.read_at(i * fs, &mut buf).expect("read page");
        for (w, chunk) in buf.chunks_exact(8).enumerate() {
            let got = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
            assert_eq!(got, pattern(p.pfn().0, w), "frame {} word {w} read through {:#x}", p.pfn().0, k.addr());
        }
    }
}

/// The pool's own bookkeeping agrees with the MMU's (single-page entries
/// only: `mapped` counts entries, the MMU counts slots).
#[track_caller]
fn assert_quiescent(pool: &SfPool) -> SfStats {
    let s = pool.stats();
    assert_eq!(s.used, 0, "no handle is alive: {s}");
    assert_eq!(s.mapped, s.cached, "{s}");
    assert!(s.mapped as usize <= pool.capacity(), "{s}");
    assert!(s.cached <= s.max_excess, "cached above max_excess: {s}");
    assert_eq!(s.mmu.mapped, s.mapped, "MMU and pool disagree: {s}");
    assert_eq!(s.live_mappings, s.mapped, "live mappings vs mapped: {s}");
    assert_eq!(s.waiters, 0, "{s}");
    assert!(s.peak <= pool.capacity() as u64, "peak above the window: {s}");
    s
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

// === hits and the excess cap ===

fn hit_after_free_makes_no_mmu_call(b: Backend) {
    let rig = b.rig(16, 8);
    let pool = rig.pool(4);
    let mut rng = SmallRng::seed_from_u64(1);
    let page = stamped_pages(&rig.mem, 1).remove(0);

    let sf = pool.alloc(&page, Wait::NoWait).expect("first alloc");
    check_all_words(&sf);
    let (slot, addr) = (sf.slot(), sf.kva().addr());
    let s = pool.stats();
    assert_eq!((s.hits, s.misses, s.grows, s.used, s.cached), (0, 1, 1, 1, 0), "{s}");
    assert_eq!((s.mmu.enters, s.mmu.mapped), (1, 1), "{s}");
    // The handle borrows the page (the borrow keeps it alive): no hold is
    // taken, so a hit makes no atomic operation on the page.
    assert!(std::ptr::eq(sf.page(), &page));
    assert_eq!(page.hold_count(), 1, "the handle borrows, it takes no hold");
    drop(sf);
    assert_eq!(page.hold_count(), 1, "a cached entry holds no page");

    let s = pool.stats();
    assert_eq!((s.used, s.cached, s.mapped), (0, 1, 1), "freed, still mapped: {s}");
    assert_eq!(s.mmu.removes, 0, "freeing does not unmap: {s}");
    let mmu_before = pool.mmu().stats();

    let sf = pool.alloc(&page, Wait::NoWait).expect("alloc after free");
    assert_eq!((sf.slot(), sf.kva().addr()), (slot, addr), "a hit reuses the mapping");
    check_words(&sf, &mut rng);
    // A second handle on the same frame is a hit too, at the same address.
    let sf2 = pool.alloc(&page, Wait::NoWait).expect("second handle");
    assert_eq!(sf2.kva().addr(), addr);
    let s = pool.stats();
    assert_eq!((s.hits, s.misses, s.used), (2, 1, 1), "{s}");
    assert_eq!(pool.mmu().stats(), mmu_before, "a hit makes no MMU call at all");
    drop((sf, sf2));
    assert_quiescent(&pool);
}

fn max_excess_zero_one_and_many(b: Backend) {
    const HELD: usize = 10;
    for n in [0usize, 1, 6] {
        let rig = b.rig(32, 16);
        let pool = rig.pool(n);
        let mut rng = SmallRng::seed_from_u64(n as u64);
        let pages = stamped_pages(&rig.mem, HELD);
        let mut held: Vec<SfBuf<'_>> = pages.iter().map(|p| pool.alloc(p, Wait::NoWait).expect("alloc")).collect();
        held.iter().for_each(|sf| check_words(sf, &mut rng));
        assert_eq!(pool.stats().used, HELD as u64);
        // Release in a random order; the cap holds after every release.
        held.shuffle(&mut rng);
        let mut released = 0;
        while let Some(sf) = held.pop() {
            drop(sf);
            released += 1;
            let s = pool.stats();
            assert!(s.cached <= n as u64, "max_excess {n}: {} cached after {released} releases: {s}", s.cached);
            assert_eq!(s.used, (HELD - released) as u64, "{s}");
            assert_eq!(s.mmu.mapped, s.used + s.cached, "{s}");
        }
        let s = assert_quiescent(&pool);
        let kept = n.min(HELD) as u64;
        assert_eq!(s.cached, kept, "max_excess {n}: {s}");
        assert_eq!(s.evictions, HELD as u64 - kept, "{s}");
        assert_eq!(s.mmu.removes, HELD as u64 - kept, "{s}");
        // What is cached is a hit, with the right bytes (held until the
        // end, so no release trims a cached entry before its turn).
        let hits_before = s.hits;
        let again: Vec<SfBuf<'_>> = pages.iter().map(|p| pool.alloc(p, Wait::NoWait).expect("realloc")).collect();
        again.iter().for_each(|sf| check_words(sf, &mut rng));
        drop(again);
        let s = pool.stats();
        assert_eq!(s.hits - hits_before, kept, "the {kept} cached frames are hits: {s}");
    }
}

fn set_max_excess_is_enforced_before_it_returns(b: Backend) {
    let rig = b.rig(32, 16);
    let pool = rig.pool(8);
    let mut rng = SmallRng::seed_from_u64(2);
    let pages = stamped_pages(&rig.mem, 10);
    // 8 cached, 2 in use.
    let held: Vec<SfBuf<'_>> = pages.iter().map(|p| pool.alloc(p, Wait::NoWait).expect("alloc")).collect();
    let mut held = held.into_iter();
    let in_use: Vec<SfBuf<'_>> = held.by_ref().take(2).collect();
    drop(held);
    let s = pool.stats();
    assert_eq!((s.used, s.cached, s.evictions, s.mmu.mapped), (2, 8, 0, 10), "{s}");

    pool.set_max_excess(3);
    let s = pool.stats();
    assert_eq!(s.max_excess, 3);
    assert_eq!((s.used, s.cached, s.evictions), (2, 3, 5), "cut to 3 before returning: {s}");
    assert_eq!((s.mmu.removes, s.mmu.mapped), (5, 5), "{s}");
    in_use.iter().for_each(|sf| check_all_words(sf));

    pool.set_max_excess(0);
    let s = pool.stats();
    assert_eq!((s.used, s.cached, s.evictions), (2, 0, 8), "{s}");
    assert_eq!((s.mmu.removes, s.mmu.mapped), (8, 2), "in-use mappings stay: {s}");
    in_use.iter().for_each(|sf| check_words(sf, &mut rng));

    // Raising the cap maps nothing; releases are cached again up to it.
    pool.set_max_excess(1);
    assert_eq!(pool.mmu().stats().enters, 10);
    drop(in_use);
    let s = assert_quiescent(&pool);
    assert_eq!((s.cached, s.evictions), (1, 9), "{s}");
}

// === waiting ===

/// A pool over a window of `slots` slots, and `slots + 2` stamped pages.
fn small_pool(b: Backend, slots: usize) -> (Rig, SfPool, Vec<Page>) {
    let rig = b.rig(16, slots);
    let pool = rig.pool(slots);
    let pages = stamped_pages(&rig.mem, slots + 2);
    (rig, pool, pages)
}

/// Map the first `pool.capacity()` pages, held by the returned handles.
fn fill<'p>(pool: &'p SfPool, pages: &'p [Page]) -> Vec<SfBuf<'p>> {
    pages[..pool.capacity()].iter().map(|p| pool.alloc(p, Wait::NoWait).expect("fill the window")).collect()
}

fn nowait_fails_at_once_while_another_thread_holds_the_window(b: Backend) {
    for slots in [1, 2] {
        let (_rig, pool, pages) = small_pool(b, slots);
        let (held_tx, held_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        thread::scope(|s| {
            s.spawn(|| {
                let go_rx = go_rx;
                let held = fill(&pool, &pages);
                held_tx.send(()).expect("send");
                go_rx.recv().expect("recv");
                drop(held);
            });
            held_rx.recv().expect("holder ready");
            let before = pool.stats();
            let r = pool.alloc(&pages[slots], Wait::NoWait);
            assert!(matches!(r, Err(Error::WouldBlock)), "{slots} slot(s) in use elsewhere: {r:?}");
            let s = pool.stats();
            assert_eq!((s.nowait_fails - before.nowait_fails, s.no_room - before.no_room), (1, 1), "{s}");
            assert_eq!((s.waits, s.waiters), (0, 0), "no-wait never sleeps: {s}");
            assert_eq!(s.mmu.enters, before.mmu.enters, "nothing was mapped: {s}");
            // A frame already mapped is still a hit.
            drop(pool.alloc(&pages[0], Wait::NoWait).expect("hit while full"));
            go_tx.send(()).expect("send");
        });
        // Released (cached): a no-wait miss now evicts and succeeds.
        let sf = pool.alloc(&pages[slots], Wait::NoWait).expect("room after the release");
        check_all_words(&sf);
        assert!(pool.stats().evictions >= 1);
    }
}

fn forever_wakes_when_the_holder_drops(b: Backend) {
    for slots in [1, 2] {
        let (_rig, pool, pages) = small_pool(b, slots);
        let barrier = Barrier::new(2);
        let dropping = AtomicBool::new(false);
        thread::scope(|s| {
            s.spawn(|| {
                let held = fill(&pool, &pages);
                barrier.wait();
                eventually("the waiter to sleep", || pool.stats().waiters == 1);
                thread::sleep(Duration::from_millis(20));
                dropping.store(true, Ordering::SeqCst);
                drop(held);
            });
            barrier.wait();
            let sf = pool.alloc(&pages[slots], Wait::Forever).expect("Forever succeeds after the release");
            assert!(dropping.load(Ordering::SeqCst), "woke before the holder released");
            check_all_words(&sf);
            let s = pool.stats();
            assert_eq!((s.waits, s.timeouts, s.cancels, s.nowait_fails), (1, 0, 0, 0), "{s}");
            // The first try found no room; the re-check after the waiter's
            // announcement finds none either unless the release came in
            // between (a slow scheduler, Miri): at least one.
            assert!(s.no_room >= 1, "the first try found no room: {s}");
        });
        assert_quiescent(&pool);
    }
}

fn timeout_expires_when_nobody_releases(b: Backend) {
    for slots in [1, 2] {
        let (_rig, pool, pages) = small_pool(b, slots);
        let barrier = Barrier::new(2);
        let (go_tx, go_rx) = mpsc::channel::<()>();
        thread::scope(|s| {
            s.spawn(|| {
                let go_rx = go_rx;
                let held = fill(&pool, &pages);
                barrier.wait();
                go_rx.recv().expect("recv");
                drop(held);
            });
            barrier.wait();
            let t0 = Instant::now();
            let r = pool.alloc(&pages[slots], Wait::Timeout(Duration::from_millis(50)));
            let waited = t0.elapsed();
            assert!(matches!(r, Err(Error::TimedOut)), "{r:?}");
            assert!(waited >= Duration::from_millis(50), "gave up early, after {waited:?}");
            let s = pool.stats();
            assert_eq!((s.waits, s.timeouts, s.cancels, s.waiters), (1, 1, 0, 0), "{s}");
            go_tx.send(()).expect("send");
        });
        assert_quiescent(&pool);
    }
}

fn timeout_succeeds_when_the_release_comes_first(b: Backend) {
    for slots in [1, 2] {
        let (_rig, pool, pages) = small_pool(b, slots);
        let barrier = Barrier::new(2);
        thread::scope(|s| {
            s.spawn(|| {
                let held = fill(&pool, &pages);
                barrier.wait();
                // Release as soon as the waiter sleeps: long before its
                // deadline (generous, so a loaded machine cannot miss it).
                eventually("the waiter to sleep", || pool.stats().waiters == 1);
                drop(held);
            });
            barrier.wait();
            let sf = pool.alloc(&pages[slots], Wait::Timeout(Duration::from_secs(10))).expect("released in time");
            check_all_words(&sf);
            let s = pool.stats();
            assert_eq!((s.waits, s.timeouts), (1, 0), "{s}");
        });
        assert_quiescent(&pool);
    }
}

fn cancel_wakes_the_waiter_with_cancelled(b: Backend) {
    for slots in [1, 2] {
        let (_rig, pool, pages) = small_pool(b, slots);
        let token = CancelToken::new();
        let barrier = Barrier::new(2);
        let (go_tx, go_rx) = mpsc::channel::<()>();
        thread::scope(|s| {
            s.spawn(|| {
                let go_rx = go_rx;
                let held = fill(&pool, &pages);
                barrier.wait();
                go_rx.recv().expect("recv");
                drop(held);
            });
            let canceller = token.clone();
            let pool = &pool;
            s.spawn(move || {
                eventually("the waiter to sleep", || pool.stats().waiters == 1);
                canceller.cancel();
            });
            barrier.wait();
            let r = pool.alloc(&pages[slots], Wait::Cancel(&token));
            assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
            assert!(token.is_cancelled());
            let s = pool.stats();
            assert_eq!((s.waits, s.cancels, s.timeouts, s.waiters), (1, 1, 0, 0), "{s}");
            // A cancelled token fails a wait at once; a hit still succeeds.
            let r = pool.alloc(&pages[slots + 1], Wait::Cancel(&token));
            assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
            drop(pool.alloc(&pages[0], Wait::Cancel(&token)).expect("a hit needs no room"));
            go_tx.send(()).expect("send");
        });
        assert_quiescent(&pool);
    }
}

fn cancel_loses_to_a_release_that_comes_first(b: Backend) {
    for slots in [1, 2] {
        let (_rig, pool, pages) = small_pool(b, slots);
        let token = CancelToken::new();
        let barrier = Barrier::new(2);
        thread::scope(|s| {
            s.spawn(|| {
                let held = fill(&pool, &pages);
                barrier.wait();
                eventually("the waiter to sleep", || pool.stats().waiters == 1);
                drop(held);
            });
            barrier.wait();
            let sf = pool.alloc(&pages[slots], Wait::Cancel(&token)).expect("released before any cancel");
            check_all_words(&sf);
            // Cancelling afterwards changes nothing for the handle.
            token.cancel();
            check_all_words(&sf);
            let s = pool.stats();
            assert_eq!((s.waits, s.cancels), (1, 0), "{s}");
        });
        assert_quiescent(&pool);
    }
}

/// A timeout too long for the clock (`Instant + Duration` overflows) is a
/// wait without a deadline: until a release makes room (or a cancel or
/// close), for every entry point that waits.
fn timeout_max_waits_until_a_release(b: Backend) {
    let (rig, pool, pages) = small_pool(b, 2);
    let run = stamped_run(&rig.mem, 2);
    type Call<'p> = Box<dyn Fn() -> Vec<SfBuf<'p>> + Sync + 'p>;
    let how = Wait::Timeout(Duration::MAX);
    let (pool, pages, run) = (&pool, &pages, &run);
    let calls: [(&str, Call<'_>); 3] = [
        ("alloc", Box::new(move || vec![pool.alloc(&pages[2], how).expect("alloc with Timeout(MAX)")])),
        ("alloc_run", Box::new(move || vec![pool.alloc_run(run, how).expect("alloc_run with Timeout(MAX)")])),
        ("alloc_all", Box::new(move || pool.alloc_all(&pages[2..4], 1, how).expect("alloc_all with Timeout(MAX)"))),
    ];
    for (what, call) in calls {
        let barrier = Barrier::new(2);
        let dropping = AtomicBool::new(false);
        let before = pool.stats();
        thread::scope(|s| {
            s.spawn(|| {
                let held = fill(pool, pages);
                barrier.wait();
                eventually("the waiter to sleep", || pool.stats().waiters == 1);
                thread::sleep(Duration::from_millis(20));
                dropping.store(true, Ordering::SeqCst);
                drop(held);
            });
            barrier.wait();
            let got = call();
            assert!(dropping.load(Ordering::SeqCst), "{what}: woke before the holder released");
            got.iter().for_each(check_all_words);
            let s = pool.stats();
            assert_eq!((s.waits - before.waits, s.timeouts - before.timeouts), (1, 0), "{what}: {s}");
        });
        // (Not `assert_quiescent`: a run's entry maps two slots.)
        let s = pool.stats();
        assert_eq!((s.used, s.waiters), (0, 0), "{what}: {s}");
    }
    pool.set_max_excess(0);
    assert_eq!(pool.stats().mmu.mapped, 0);
}

/// `Timeout(Duration::ZERO)` is a no-wait call (one attempt, never a
/// waiter, never asleep) that reports the timeout as a timeout.
fn timeout_zero_is_a_no_wait_call(b: Backend) {
    let (rig, pool, pages) = small_pool(b, 2);
    let run = stamped_run(&rig.mem, 2);
    let zero = Wait::Timeout(Duration::ZERO);
    // Held on this very thread: a call that slept would never wake.
    let held = fill(&pool, &pages);
    let before = pool.stats();
    let r = pool.alloc(&pages[2], zero).map(drop);
    assert!(matches!(r, Err(Error::TimedOut)), "alloc: {r:?}");
    let r = pool.alloc_run(&run, zero).map(drop);
    assert!(matches!(r, Err(Error::TimedOut)), "alloc_run: {r:?}");
    let r = pool.alloc_all(&pages[2..4], 1, zero).map(drop);
    assert!(matches!(r, Err(Error::TimedOut)), "alloc_all: {r:?}");
    let s = pool.stats();
    let d = |f: fn(&SfStats) -> u64| f(&s) - f(&before);
    assert_eq!((d(|s| s.waits), d(|s| s.timeouts), d(|s| s.nowait_fails)), (0, 3, 0), "never asleep: {s}");
    // One attempt each: the no-wait call's one look for room.
    assert_eq!(d(|s| s.no_room), 3, "one attempt per call: {s}");
    assert_eq!((s.waiters, s.mmu.enters), (0, before.mmu.enters), "{s}");
    // A hit needs no room; with room, a miss succeeds.
    drop(pool.alloc(&pages[0], zero).expect("a hit with a zero timeout"));
    drop(held);
    let sf = pool.alloc(&pages[2], zero).expect("room after the release");
    check_all_words(&sf);
    drop(sf);
    assert_quiescent(&pool);
}

fn close_wakes_every_waiter_with_closed(b: Backend) {
    let (rig, pool, pages) = small_pool(b, 2);
    let run = stamped_run(&rig.mem, 2);
    let token = CancelToken::new();
    let held = fill(&pool, &pages);
    thread::scope(|s| {
        let waiters = [
            s.spawn(|| pool.alloc(&pages[2], Wait::Forever).map(drop)),
            s.spawn(|| pool.alloc(&pages[3], Wait::Timeout(Duration::from_secs(30))).map(drop)),
            s.spawn(|| pool.alloc(&pages[2], Wait::Timeout(Duration::MAX)).map(drop)),
            s.spawn(|| pool.alloc(&pages[3], Wait::Cancel(&token)).map(drop)),
            s.spawn(|| pool.alloc_run(&run, Wait::Forever).map(drop)),
            s.spawn(|| pool.alloc_all(&pages[2..4], 1, Wait::Forever).map(drop)),
        ];
        // Closed even if not every waiter got to sleep (one failed at
        // once), so that the others end and the checks below report it.
        let n = waiters.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(20);
        while pool.stats().waiters < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        let sleeping = pool.stats().waiters;
        pool.close();
        for (i, w) in waiters.into_iter().enumerate() {
            let r = w.join().expect("waiter thread");
            assert!(matches!(r, Err(Error::Closed)), "waiter {i}: {r:?}");
        }
        assert_eq!(sleeping, n, "every waiter was asleep at the close");
    });
    let s = pool.stats();
    assert_eq!((s.waits, s.waiters, s.timeouts, s.cancels), (6, 0, 0, 0), "{s}");
    // Later calls fail at once, hits too (see `closed_pool_refuses_every_allocation`);
    // live handles still work and release normally.
    assert!(matches!(pool.alloc(&pages[2], Wait::Forever), Err(Error::Closed)));
    assert!(matches!(pool.alloc(&pages[0], Wait::NoWait), Err(Error::Closed)));
    check_all_words(&held[0]);
    drop(held);
    let s = assert_quiescent(&pool);
    assert_eq!(s.cached, 2, "released handles are cached as on an open pool: {s}");
}

/// After `close`, every allocation fails with `Closed`: hit or miss, single
/// page, run or all-or-nothing, whatever the wait mode. Handles taken
/// before stay valid and release normally.
fn closed_pool_refuses_every_allocation(b: Backend) {
    let rig = b.rig(32, 8);
    let pool = rig.pool(8);
    let pages = stamped_pages(&rig.mem, 4);
    let run = stamped_run(&rig.mem, 3);
    // pages[0] and the run cached and unused, pages[1] held (a hit on it
    // finds an entry in use), pages[2..] never mapped, room for them.
    drop(pool.alloc(&pages[0], Wait::NoWait).expect("alloc"));
    drop(pool.alloc(&pages[0], Wait::NoWait).expect("a hit (cached, unused)"));
    let held = pool.alloc(&pages[1], Wait::NoWait).expect("alloc");
    drop(pool.alloc_run(&run, Wait::NoWait).expect("alloc_run"));
    let token = CancelToken::new();
    pool.close();
    let before = pool.stats();
    let modes = [
        Wait::NoWait,
        Wait::Forever,
        Wait::Timeout(Duration::ZERO),
        Wait::Timeout(Duration::from_secs(1)),
        Wait::Timeout(Duration::MAX),
        Wait::Cancel(&token),
    ];
    for how in modes {
        for (what, p) in [("hit, unused", &pages[0]), ("hit, in use", &pages[1]), ("miss with room", &pages[2])] {
            let r = pool.alloc(p, how).map(drop);
            assert!(matches!(r, Err(Error::Closed)), "alloc {what} with {how:?}: {r:?}");
        }
        let r = pool.alloc_run(&run, how).map(drop);
        assert!(matches!(r, Err(Error::Closed)), "alloc_run of a cached run with {how:?}: {r:?}");
        let r = pool.alloc_run(&run[..2], how).map(drop);
        assert!(matches!(r, Err(Error::Closed)), "alloc_run of an uncached run with {how:?}: {r:?}");
        for (what, ps, max_run) in [
            ("a cached page", &pages[..1], 1),
            ("cached pages, one in use", &pages[..2], 1),
            ("uncached pages", &pages[2..], 1),
            ("cached and uncached pages", &pages[..], 1),
            ("a cached run", &run[..], 3),
        ] {
            let r = pool.alloc_all(ps, max_run, how).map(drop);
            assert!(matches!(r, Err(Error::Closed)), "alloc_all of {what} with {how:?}: {r:?}");
        }
    }
    let s = pool.stats();
    assert_eq!((s.hits, s.misses, s.mmu.enters), (before.hits, before.misses, before.mmu.enters), "{s}");
    assert_eq!((s.waits, s.waiters, s.nowait_fails), (0, 0, 0), "a closed pool fails at once: {s}");
    // The handle taken before the close is valid and releases normally.
    check_all_words(&held);
    drop(held);
    let s = pool.stats();
    // Three entries, one of them the run of 3: five slots mapped.
    assert_eq!((s.used, s.cached, s.evictions, s.mmu.mapped), (0, 3, 0, 5), "{s}");
    assert!(pages.iter().chain(&run).all(|p| p.hold_count() == 1), "no hold leaked");
}

// === concurrency ===

fn eviction_races_hits_on_four_threads(b: Backend) {
    const FRAMES: usize = 64;
    const SLOTS: usize = 16;
    const THREADS: usize = 4;
    // Per thread: 20k in all; under Miri (about 100x slower) 120.
    const OPS: usize = if cfg!(miri) { 30 } else { 5_000 };
    // Thread 0 moves the cap every CAP_EVERY operations.
    const CAP_EVERY: usize = if cfg!(miri) { 8 } else { 500 };
    const MAX_EXCESS: usize = 4;
    let rig = b.rig(FRAMES, SLOTS);
    let pool = rig.pool(MAX_EXCESS);
    let pages = stamped_pages(&rig.mem, FRAMES);
    let ops_done = AtomicUsize::new(0);
    thread::scope(|s| {
        for t in 0..THREADS {
            let (pool, pages, ops_done) = (&pool, &pages, &ops_done);
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(0x5f0 + t as u64);
                let mut held: Vec<SfBuf<'_>> = Vec::new();
                for op in 0..OPS {
                    // Hold up to 3 at once: 4 threads never fill 16 slots,
                    // so `Forever` never sleeps for good.
                    let p = &pages[rng.gen_range(0..FRAMES)];
                    let sf = pool.alloc(p, Wait::Forever).expect("alloc");
                    assert_eq!(sf.page(), p);
                    if op % 64 == 0 {
                        check_all_words(&sf);
                    } else {
                        check_words(&sf, &mut rng);
                    }
                    held.push(sf);
                    while held.len() > rng.gen_range(0..3) {
                        let i = rng.gen_range(0..held.len());
                        let sf = held.swap_remove(i);
                        check_words(&sf, &mut rng);
                        drop(sf);
                    }
                    // Thread 0 also moves the cap while the others race.
                    if t == 0 && op % CAP_EVERY == CAP_EVERY / 2 {
                        pool.set_max_excess([0, 1, 8, MAX_EXCESS][(op / CAP_EVERY) % 4]);
                    }
                }
                drop(held);
                ops_done.fetch_add(OPS, Ordering::Relaxed);
            });
        }
    });
    pool.set_max_excess(MAX_EXCESS);
    assert_eq!(ops_done.load(Ordering::Relaxed), THREADS * OPS);
    let s = assert_quiescent(&pool);
    assert_eq!(s.hits + s.misses, (THREADS * OPS) as u64, "every alloc counted once: {s}");
    assert_eq!(s.unmap_errors, 0, "{s}");
    assert!(s.evictions > 0 && s.hits > 0, "the run raced hits against evictions: {s}");

    // Every slot the MMU has a frame in is a cached entry of that frame: a
    // no-wait alloc of the frame is a hit at that very slot, with no MMU call.
    let mut mapped: BTreeMap<usize, usize> = BTreeMap::new();
    for slot in 0..pool.capacity() {
        if let Some(pfn) = pool.mmu().translate(Slot(slot)) {
            let addr = pool.mmu().kva(Slot(slot)).expect("mapped slot has an address");
            // SAFETY: the slot maps a whole frame; no handle is alive and no
            // other thread runs, so nothing unmaps it during the read.
            let word = unsafe { addr.as_ptr().cast::<u64>().read_unaligned() };
            assert_eq!(word, pattern(pfn.0, 0), "slot {slot} maps frame {} with foreign bytes", pfn.0);
            mapped.insert(slot, pfn.0);
        }
    }
    assert_eq!(mapped.len() as u64, s.cached, "MMU slots with a frame vs cached entries: {s}");
    let by_pfn: BTreeMap<usize, &Page> = pages.iter().map(|p| (p.pfn().0, p)).collect();
    let mmu_before = pool.mmu().stats();
    for (&slot, &pfn) in &mapped {
        let sf = pool.alloc(by_pfn[&pfn], Wait::NoWait).expect("cached frame");
        assert_eq!(sf.slot(), Slot(slot), "frame {pfn} is cached at slot {slot}");
        check_all_words(&sf);
    }
    assert_eq!(pool.mmu().stats(), mmu_before, "all of them were hits");
    assert_quiescent(&pool);
}

/// Two threads, each asking for `per_thread` pages all-or-nothing from a
/// window of 8 slots, 200 times; panics if they have not both finished
/// within 20 s (a deadlock: a liveness check, not a timing assertion).
/// Under Miri, whose clock advances with the instructions it interprets,
/// 5 rounds within 600 s.
fn two_greedy_threads(b: Backend, per_thread: usize, contiguous: bool, max_run: usize) {
    const SLOTS: usize = 8;
    // Under Miri (about 100x slower, and its clock runs with the work done)
    // fewer rounds, and a 600 s watchdog (below).
    const ROUNDS: usize = if cfg!(miri) { 5 } else { 200 };
    let rig = b.rig(64, SLOTS);
    let pool = Arc::new(rig.pool(2));
    let (done_tx, done_rx) = mpsc::channel();
    for t in 0..2 {
        let pages = if contiguous { stamped_run(&rig.mem, per_thread) } else { stamped_pages(&rig.mem, per_thread) };
        let pool = pool.clone();
        let done_tx = done_tx.clone();
        thread::spawn(move || {
            let mut rng = SmallRng::seed_from_u64(t);
            for _ in 0..ROUNDS {
                let bufs = pool.alloc_all(&pages, max_run, Wait::Forever).expect("alloc_all");
                let mapped: usize = bufs.iter().map(|sf| sf.pages().len()).sum();
                assert_eq!(mapped, per_thread, "all pages mapped");
                bufs.iter().for_each(|sf| check_words(sf, &mut rng));
                thread::yield_now();
                drop(bufs);
            }
            done_tx.send(t).expect("send");
        });
    }
    let limit = Duration::from_secs(if cfg!(miri) { 600 } else { 20 });
    let deadline = Instant::now() + limit;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(_) => {}
            Err(_) => panic!(
                "two threads each needing {per_thread} of {SLOTS} slots did not finish {ROUNDS} rounds in {limit:?} \
                 (deadlock?): {}",
                pool.stats()
            ),
        }
    }
    let s = pool.stats();
    assert_eq!((s.used, s.waiters), (0, 0), "{s}");
    assert!(s.cached <= s.max_excess, "{s}");
    assert_eq!(s.unmap_errors, 0, "{s}");
}

/// After the pin tests: nothing held, only the four first allocations
/// missed, and with the cap at zero every entry is evicted (a pin left
/// counted would keep its entry mapped for ever).
fn assert_no_pin_left(pool: &SfPool) {
    let st = assert_quiescent(pool);
    assert_eq!(st.misses, 4, "every alloc after the first four was a hit: {st}");
    pool.set_max_excess(0);
    let st = pool.stats();
    assert_eq!((st.mapped, st.used, st.mmu.mapped), (0, 0, 0), "an entry stayed mapped: {st}");
}

/// Hits on cached frames are pinned in the hitting thread's own row of
/// pins. Two threads hit the same four frames over and over and hand half
/// of their handles to a third thread, which drops them, while they keep
/// hitting: a pin given back by a thread that does not own its row must
/// not disturb the owner's count. At the end nothing is held, and with the
/// cap at zero every entry is evicted (a pin left counted would keep its
/// entry mapped for ever).
fn pinned_hits_given_back_on_other_threads(b: Backend) {
    let rig = b.rig(16, 8);
    let pool = rig.pool(8);
    let pages = stamped_pages(&rig.mem, 4);
    for p in &pages {
        drop(pool.alloc(p, Wait::NoWait).expect("miss"));
    }
    let rounds = if cfg!(miri) { 20 } else { 5_000 };
    let (tx, rx) = std::sync::mpsc::channel::<SfBuf<'_>>();
    thread::scope(|s| {
        for t in 0..2 {
            let (tx, pool, pages) = (tx.clone(), &pool, &pages);
            s.spawn(move || {
                let mut r = SmallRng::seed_from_u64(t);
                for i in 0..rounds {
                    let sf = pool.alloc(&pages[(i + t as usize) % 4], Wait::NoWait).expect("hit");
                    check_words(&sf, &mut r);
                    if i % 2 == 0 {
                        tx.send(sf).expect("send");
                    }
                }
            });
        }
        drop(tx);
        s.spawn(move || {
            let mut r = SmallRng::seed_from_u64(9);
            for sf in rx {
                check_words(&sf, &mut r);
                drop(sf);
            }
        });
    });
    assert_no_pin_left(&pool);
}

/// Threads one after another pin the cached pages (each hit on an entry
/// nobody holds counts in the thread's own row while it holds a statistics
/// stripe alone), and each exits with one pinned handle still out, sent
/// back here. The next thread takes the lowest free stripe, and so the
/// row the last one wrote, and pins in it while the old pins are out; the
/// old handles are given back last, on this thread. No pin may be lost or
/// left counted: with the cap at zero every entry is evicted.
fn pin_rows_change_hands_while_pins_are_out(b: Backend) {
    let rig = b.rig(16, 8);
    let pool = rig.pool(8);
    let pages = stamped_pages(&rig.mem, 4);
    for p in &pages {
        drop(pool.alloc(p, Wait::NoWait).expect("miss"));
    }
    let (generations, rounds) = if cfg!(miri) { (3, 10) } else { (24, 1_000) };
    let mut out = Vec::new();
    for g in 0..generations {
        let (pool, pages) = (&pool, &pages);
        let sf = thread::scope(|s| {
            s.spawn(move || {
                let mut r = SmallRng::seed_from_u64(g as u64);
                for i in 0..rounds {
                    let sf = pool.alloc(&pages[(i + g) % 4], Wait::NoWait).expect("hit");
                    check_words(&sf, &mut r);
                }
                pool.alloc(&pages[g % 4], Wait::NoWait).expect("hit")
            })
            .join()
            .expect("pinning thread")
        });
        out.push(sf);
    }
    let mut r = SmallRng::seed_from_u64(99);
    for sf in &out {
        check_words(sf, &mut r);
    }
    drop(out);
    assert_no_pin_left(&pool);
}

fn alloc_all_sleeps_instead_of_spinning(b: Backend) {
    // Window of 2: another thread holds one slot for 200 ms; we need both.
    // Each attempt maps the first page, fails on the second and gives the
    // first back, which makes room (a wake-up) but only of our own doing:
    // the waiter must sleep until the holder releases, not retry in a loop.
    let (_rig, pool, pages) = small_pool(b, 2);
    let barrier = Barrier::new(2);
    thread::scope(|s| {
        s.spawn(|| {
            let held = pool.alloc(&pages[0], Wait::NoWait).expect("holder");
            barrier.wait();
            eventually("the waiter to sleep", || pool.stats().waiters == 1);
            thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        barrier.wait();
        let before = pool.stats();
        let t0 = Instant::now();
        let bufs = pool.alloc_all(&pages[1..3], 1, Wait::Forever).expect("alloc_all");
        let waited_ms = t0.elapsed().as_millis() as u64;
        bufs.iter().for_each(check_all_words);
        let s = pool.stats();
        // Allowed: a few attempts, plus timed self-retries (at most one per
        // 64 ms once backed off; twice that rate here). A busy loop makes
        // tens of thousands.
        let attempts = s.no_room - before.no_room;
        assert!(attempts >= 1, "the first try found no room: {s}");
        assert!(attempts <= 12 + waited_ms / 32, "{attempts} failed attempts in {waited_ms} ms: busy retrying: {s}");
        // Its pieces' tries are not no-wait calls of the user's.
        assert_eq!((s.nowait_fails - before.nowait_fails, s.waits - before.waits), (0, 1), "{s}");
    });
}

fn alloc_all_cannot_deadlock_two_threads(b: Backend) {
    two_greedy_threads(b, 6, false, 1);
}

fn alloc_all_runs_cannot_deadlock_two_threads(b: Backend) {
    // 6 contiguous frames each, mapped as two runs of 3: runs need adjacent
    // free slots, so fragmentation joins the contention.
    two_greedy_threads(b, 6, true, 3);
}

// === run mappings ===

/// `(start, end, perms)` of every line of `/proc/self/maps` intersecting
/// `[lo, hi)`.
fn maps_in(lo: usize, hi: usize) -> Vec<(usize, usize, String)> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            let (a, b) = range.split_once('-')?;
            let (a, b) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
            (a < hi && b > lo).then(|| (a, b, perms.to_string()))
        })
        .collect()
}

/// Lines of `/proc/self/maps` inside the window that map frames (anything
/// but the `PROT_NONE` reservation).
fn mapped_vmas(win: &Window) -> Vec<(usize, usize, String)> {
    let lo = win.base() as usize;
    maps_in(lo, lo + win.len()).into_iter().filter(|(_, _, p)| p != "---p").collect()
}

fn run_of_64_frames_is_one_enter_one_remove_one_vma(b: Backend) {
    const RUN: usize = 64;
    let fs = system_page_size();
    let rig = b.rig(256, 128);
    let pool = rig.pool(8);
    let pages = stamped_run(&rig.mem, RUN);
    let before = pool.mmu().stats();

    let sf = pool.alloc_run(&pages, Wait::NoWait).expect("alloc_run");
    let d = pool.mmu().stats().since(&before);
    assert_eq!((d.enters, d.pages_entered, d.mapped), (1, RUN as u64, RUN as u64), "one enter: {d}");
    if b == Backend::Window {
        assert_eq!(d.syscalls, 1, "one mmap: {d}");
    }
    assert_eq!(sf.pages().len(), RUN);
    assert_eq!(sf.kva().len(), RUN * fs);
    check_all_words(&sf);
    // Every page of the run sits at its offset in the one mapping.
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(pool.mmu().translate(Slot(sf.slot().0 + i)), Some(p.pfn()), "slot of page {i}");
    }
    if let Some(win) = &rig.win {
        let vmas = mapped_vmas(win);
        let addr = sf.kva().addr();
        assert_eq!(vmas.len(), 1, "a run of {RUN} frames is one line of /proc/self/maps: {vmas:x?}");
        assert_eq!((vmas[0].0, vmas[0].1), (addr, addr + RUN * fs), "{vmas:x?}");
        assert!(vmas[0].2.starts_with("rw"), "{vmas:x?}");
    }
    // A second handle on the same run is a hit.
    let again = pool.alloc_run(&pages, Wait::NoWait).expect("run hit");
    assert_eq!(again.kva().addr(), sf.kva().addr());
    assert_eq!(pool.stats().hits, 1);
    drop((sf, again));
    assert_eq!(pool.mmu().stats().since(&before).removes, 0, "cached, not unmapped");

    pool.set_max_excess(0);
    let d = pool.mmu().stats().since(&before);
    assert_eq!((d.removes, d.pages_removed, d.mapped), (1, RUN as u64, 0), "one remove: {d}");
    if let Some(win) = &rig.win {
        assert_eq!(d.syscalls, 2, "one mmap, one PROT_NONE remap: {d}");
        assert!(mapped_vmas(win).is_empty(), "{:x?}", mapped_vmas(win));
    }
    let s = pool.stats();
    assert_eq!((s.used, s.cached, s.mapped, s.evictions, s.live_mappings), (0, 0, 0, 1, 0), "{s}");

    // Contrast: the same frames as 64 single mappings, in shuffled order,
    // cost 64 enters and (on the real window) one VMA per break in the
    // frame order between adjacent slots.
    pool.set_max_excess(RUN);
    let mut order: Vec<&Page> = pages.iter().collect();
    order.shuffle(&mut SmallRng::seed_from_u64(64));
    let before = pool.mmu().stats();
    let singles: Vec<SfBuf<'_>> = order.iter().map(|p| pool.alloc(p, Wait::NoWait).expect("single")).collect();
    assert_eq!(pool.mmu().stats().since(&before).enters, RUN as u64);
    if let Some(win) = &rig.win {
        let mut by_slot: Vec<(usize, usize)> = singles.iter().map(|sf| (sf.slot().0, sf.page().pfn().0)).collect();
        by_slot.sort_unstable();
        let expected = 1 + by_slot.windows(2).filter(|w| !(w[1].0 == w[0].0 + 1 && w[1].1 == w[0].1 + 1)).count();
        assert_eq!(mapped_vmas(win).len(), expected, "one VMA per run of file-contiguous frames in adjacent slots");
        assert!(expected > 1, "shuffling scattered the frames");
    }
    singles.iter().for_each(check_all_words);
    drop(singles);
    pool.set_max_excess(0);
    assert_eq!(pool.mmu().stats().since(&before).removes, RUN as u64, "64 removes for 64 singles");
    assert_quiescent(&pool);
}

// === misuse ===

fn misuse_returns_its_error(b: Backend) {
    let rig = b.rig(64, 8);
    let pool = rig.pool(4);
    let other = b.phys(4);
    let foreign = other.alloc_page().expect("page of another PhysMem");
    assert!(matches!(pool.alloc(&foreign, Wait::NoWait), Err(Error::ForeignPage)));
    assert!(matches!(pool.alloc(&foreign, Wait::Forever), Err(Error::ForeignPage)));
    assert!(matches!(pool.alloc_run(std::slice::from_ref(&foreign), Wait::NoWait), Err(Error::ForeignPage)));

    // A run whose frames are not contiguous.
    let a = rig.mem.alloc_run(2).expect("run");
    let gap = rig.mem.alloc_page().expect("page");
    let broken = [a[0].clone(), gap.clone()];
    assert!(matches!(pool.alloc_run(&broken, Wait::NoWait), Err(Error::Config { .. })));
    let reversed = [a[1].clone(), a[0].clone()];
    assert!(matches!(pool.alloc_run(&reversed, Wait::Forever), Err(Error::Config { .. })));
    assert!(matches!(pool.alloc_run(&[], Wait::NoWait), Err(Error::Config { .. })));

    // More pages than the window, all or nothing, and a run longer than it.
    let many = stamped_pages(&rig.mem, 9);
    let r = pool.alloc_all(&many, 1, Wait::Forever);
    assert!(matches!(r, Err(Error::WindowFull { requested: 9, capacity: 8 })), "{:?}", r.map(|v| v.len()));
    let long = rig.mem.alloc_run(9).expect("run of 9");
    assert!(matches!(pool.alloc_run(&long, Wait::Forever), Err(Error::WindowFull { requested: 9, capacity: 8 })));
    // A foreign page in a multi-page request fails it as a whole.
    let mixed = [many[0].clone(), foreign.clone()];
    assert!(matches!(pool.alloc_all(&mixed, 1, Wait::NoWait), Err(Error::ForeignPage)));

    // None of that mapped anything or left anything held.
    drop((broken, reversed, mixed));
    let s = pool.stats();
    assert_eq!((s.used, s.mmu.mapped), (0, s.cached), "{s}");
    assert!(many.iter().chain(&a).chain([&gap, &foreign]).all(|p| p.hold_count() == 1), "no hold leaked");
    // And the pool still works: exactly the window fits, all or nothing.
    let bufs = pool.alloc_all(&many[..8], 1, Wait::NoWait).expect("8 pages into 8 slots");
    bufs.iter().for_each(check_all_words);
    assert!(matches!(pool.alloc(&many[8], Wait::NoWait), Err(Error::WouldBlock)));
    drop(bufs);
    assert_quiescent(&pool);
}

// === auto traits ===

#[test]
fn pool_and_handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<SfPool>();
    send_sync::<SfBuf<'static>>();
    send_sync::<CancelToken>();
    send_sync::<SfStats>();
    fn send<T: Send>() {}
    send::<Wait<'static>>();
}

#[test]
fn a_handle_moves_to_another_thread_and_is_dropped_there() {
    // Under Miri the model: it cannot run the window's memfd_create and mmap.
    let rig = if cfg!(miri) { Backend::Model } else { Backend::Window }.rig(8, 4);
    let pool = rig.pool(1);
    let page = stamped_pages(&rig.mem, 1).remove(0);
    let sf = pool.alloc(&page, Wait::NoWait).expect("alloc");
    thread::scope(|s| {
        s.spawn(move || {
            check_all_words(&sf);
            drop(sf);
        });
    });
    assert_quiescent(&pool);
    assert_eq!(page.hold_count(), 1);
}
