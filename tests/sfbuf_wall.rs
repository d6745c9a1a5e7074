//! The real wall: `vm.max_map_count`. Linux caps a process's VMAs (65,530 by
//! default) and `mmap` fails with `ENOMEM` at the cap. The sf_buf pool must
//! turn that into eviction of cached mappings, or into a clear error when
//! everything is in use, never a panic or a lost page.
//!
//! Each scenario runs in a CHILD PROCESS (this test binary re-executed with
//! `--exact <name>` and `LWBUF_WALL_CHILD=1`), because a process at the wall
//! makes every other `mmap` in it fail, including those of tests running
//! beside it. The child tests return at once unless the variable is set; the
//! parent tests run them and check their exit status and report.
//!
//! - `wall_child`: a window of ~70,000 slots and a pool with no budget
//!   (`map_budget(usize::MAX)`), filled with scattered single-page mappings
//!   (frames in shuffled order, so adjacent slots never merge into one VMA)
//!   until the kernel refuses with `ENOMEM`; then some handles are dropped
//!   (cached) and new frames are mapped by evicting them until, with
//!   everything in use again, the error is the clear one; no panic, no page
//!   lost, the books balance.
//! - `wall_recovery_child`: the same wall, and each cached mapping evicted
//!   there makes room for one new mapping: 1,000 new frames with 2,000
//!   cached, one eviction each, and no capacity lost at the wall.
//! - `budget_child`: the same with the default budget
//!   ([`lwbuf::default_map_budget`]), which stops it first with
//!   [`Error::MapLimit`].

// Not under Miri: the real vm.max_map_count wall: mmap of a memfd, in child
// processes Miri cannot spawn.
#![cfg(not(miri))]

use std::process::Command;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use lwbuf::{default_map_budget, Error, Page, PhysMem, Reclaim, SfBuf, SfPool, Wait, Window};

const CHILD_ENV: &str = "LWBUF_WALL_CHILD";

/// Handles dropped at the wall (they stay cached) to make room for new ones.
const DROP_AT_WALL: usize = 2_000;
/// New frames mapped while those cached mappings remain.
const NEW_AT_WALL: usize = 1_000;

// === the parent side ===

/// Run the test `name` of this binary in a child process; panics with its
/// output if it fails or did not run. Returns its report lines.
fn run_child(name: &str) -> Vec<String> {
    let exe = std::env::current_exe().expect("current_exe");
    let out = Command::new(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("spawn the child test process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child `{name}` failed: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", out.status);
    // libtest prints `test <name> ... ` and the test's first line on one line.
    let report: Vec<String> = stdout.lines().filter_map(|l| l.find("REPORT ").map(|i| l[i..].to_owned())).collect();
    assert!(!report.is_empty(), "child `{name}` reported nothing (did it run?)\n--- stdout\n{stdout}");
    for l in &report {
        println!("{name}: {l}");
    }
    report
}

#[test]
fn wall_of_max_map_count_becomes_eviction_then_a_clear_error() {
    run_child("wall_child");
}

#[test]
fn at_the_wall_each_eviction_makes_room_for_one_mapping() {
    run_child("wall_recovery_child");
}

#[test]
fn default_budget_stops_before_the_wall() {
    run_child("budget_child");
}

// === the child side ===

fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("read /proc/sys/vm/max_map_count")
}

/// VMAs of this process now.
fn vma_count() -> usize {
    std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps").lines().count()
}

/// Lines of `/proc/self/maps` inside `win` that map frames (anything but
/// the `PROT_NONE` reservation).
fn mapped_lines_in(win: &Window) -> Vec<String> {
    let (lo, hi) = (win.base() as usize, win.base() as usize + win.len());
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    maps.lines()
        .filter(|l| {
            let mut f = l.split_whitespace();
            let (Some((a, b)), Some(perms)) = (f.next().and_then(|r| r.split_once('-')), f.next()) else {
                return false;
            };
            let a = usize::from_str_radix(a, 16).unwrap_or(0);
            let b = usize::from_str_radix(b, 16).unwrap_or(0);
            a < hi && b > lo && perms != "---p"
        })
        .map(str::to_owned)
        .collect()
}

/// The word every frame is stamped with (word 0 of the frame).
fn stamp_of(pfn: usize) -> u64 {
    (pfn as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

struct Fixture {
    mem: PhysMem,
    win: Arc<Window>,
    pool: SfPool,
    pages: Vec<Page>,
    /// Indices into `pages`, shuffled: the order frames are mapped in.
    order: Vec<usize>,
}

impl Fixture {
    fn new(frames: usize, budget: Option<usize>) -> Fixture {
        let mem = PhysMem::builder().frames(frames).build().expect("PhysMem");
        let win = Arc::new(Window::builder(&mem).slots(frames).build().expect("Window"));
        let mut b = SfPool::builder(win.clone()).max_excess(frames);
        if let Some(n) = budget {
            b = b.map_budget(n);
        }
        let pool = b.build().expect("SfPool");
        let pages: Vec<Page> = (0..frames).map(|_| mem.alloc_page().expect("alloc_page")).collect();
        for p in &pages {
            p.direct().expect("direct map").write_u64(0, stamp_of(p.pfn().0)).expect("stamp");
        }
        let mut order: Vec<usize> = (0..frames).collect();
        order.shuffle(&mut SmallRng::seed_from_u64(0x3a11));
        Fixture { mem, win, pool, pages, order }
    }
}

/// Map the next frame in shuffled order, checking what the mapping reads.
fn map_next<'p>(fx: &'p Fixture, next: &mut usize) -> Result<SfBuf<'p>, Error> {
    assert!(*next < fx.order.len(), "ran out of frames before the wall: {}", fx.pool.stats());
    let page = &fx.pages[fx.order[*next]];
    let holds = page.hold_count();
    match fx.pool.alloc(page, Wait::NoWait) {
        Ok(sf) => {
            *next += 1;
            check(&sf);
            Ok(sf)
        }
        Err(e) => {
            assert_eq!(page.hold_count(), holds, "a failed alloc keeps no hold on the page");
            Err(e)
        }
    }
}

#[track_caller]
fn check(sf: &SfBuf<'_>) {
    let pfn = sf.page().pfn().0;
    assert_eq!(sf.kva().read_u64(0).expect("read"), stamp_of(pfn), "frame {pfn} reads wrong through {:?}", sf);
}

/// Fill until an error; returns it.
fn fill<'p>(fx: &'p Fixture, next: &mut usize, held: &mut Vec<SfBuf<'p>>) -> Error {
    loop {
        match map_next(fx, next) {
            Ok(sf) => held.push(sf),
            Err(e) => return e,
        }
    }
}

/// Drop `n` handles at random positions (scattered slots).
fn drop_some(held: &mut Vec<SfBuf<'_>>, n: usize, rng: &mut SmallRng) {
    for _ in 0..n {
        let i = rng.gen_range(0..held.len());
        drop(held.swap_remove(i));
    }
}

/// Release everything and check the books: nothing used, the MMU agrees,
/// every page back to the test's own hold; then unmap all of it.
fn drop_all_and_check(fx: &Fixture, held: Vec<SfBuf<'_>>) {
    held.iter().for_each(check);
    drop(held);
    let s = fx.pool.stats();
    assert_eq!(s.used, 0, "{s}");
    assert_eq!(s.mapped, s.cached, "{s}");
    if fx.pool.reclaim_mode() == Reclaim::Strict {
        assert_eq!(s.mmu.mapped, s.mapped, "MMU and pool disagree: {s}");
        assert_eq!(s.live_mappings, s.mapped, "{s}");
    } else {
        // Evicted mappings wait to be mapped over or removed in a batch.
        assert!(s.mmu.mapped >= s.mapped, "MMU and pool disagree: {s}");
        assert!(s.live_mappings >= s.mapped, "{s}");
    }
    assert_eq!(s.unmap_errors, 0, "{s}");
    assert!(s.peak <= fx.pool.capacity() as u64, "{s}");
    let bad: Vec<&Page> = fx.pages.iter().filter(|p| p.hold_count() != 1).collect();
    assert!(bad.is_empty(), "pages still held after every handle was dropped: {:?}", &bad[..bad.len().min(8)]);
    fx.pool.set_max_excess(0);
    fx.pool.reclaim();
    let s = fx.pool.stats();
    assert_eq!((s.mapped, s.mmu.mapped, s.live_mappings, s.unmap_errors), (0, 0, 0, 0), "{s}");
    let left = mapped_lines_in(&fx.win);
    assert!(left.is_empty(), "frames still mapped in the window: {:?}", &left[..left.len().min(4)]);
    println!(
        "REPORT after dropping everything and max_excess 0: removes {}, munmap fallbacks {}, evictions {}",
        s.mmu.removes, s.mmu.remove_fallbacks, s.evictions
    );
    assert_eq!(fx.mem.stats().free, 0, "the test holds every frame");
}

/// A budget-less pool over a window larger than `vm.max_map_count`, with
/// frames for it; `None` (skipped) if that limit is too large to fill.
fn to_the_wall() -> Option<(Fixture, usize)> {
    let limit = max_map_count();
    if limit > 250_000 {
        println!("REPORT skipped: vm.max_map_count is {limit}, too many mappings to fill in a test");
        return None;
    }
    Some((Fixture::new(70_000.max(limit + 4_500), Some(usize::MAX)), limit))
}

/// Fill to the wall and check how it looks there; returns the wall.
fn fill_to_the_wall<'p>(fx: &'p Fixture, limit: usize, next: &mut usize, held: &mut Vec<SfBuf<'p>>) -> usize {
    let vmas_before = vma_count();
    let e = fill(fx, next, held);
    assert_eq!(e.errno(), Some(libc::ENOMEM), "the wall is ENOMEM from mmap, got: {e}");
    let wall = held.len();
    let vmas = vma_count();
    let s = fx.pool.stats();
    println!(
        "REPORT wall: {wall} live single-page mappings ({vmas_before} VMAs in the process before, {vmas} at the \
         wall; vm.max_map_count {limit}); error: {e}"
    );
    assert_eq!((s.used, s.cached, s.mmu.mapped), (wall as u64, 0, wall as u64), "{s}");
    assert!(wall > limit / 2, "the wall came early: {wall} of {limit}");
    assert!(vmas + 16 >= limit, "ENOMEM well below vm.max_map_count: {vmas} VMAs");
    wall
}

#[test]
fn wall_child() {
    if !is_child() {
        return;
    }
    let Some((fx, limit)) = to_the_wall() else { return };
    let mut rng = SmallRng::seed_from_u64(7);
    let mut held: Vec<SfBuf<'_>> = Vec::with_capacity(fx.pages.len());
    let mut next = 0;
    let wall = fill_to_the_wall(&fx, limit, &mut next, &mut held);

    // (1) Release some: they stay cached, and new frames get mapped by
    // evicting them: the kernel's ENOMEM turned into eviction.
    drop_some(&mut held, DROP_AT_WALL, &mut rng);
    let s0 = fx.pool.stats();
    assert_eq!((s0.used, s0.cached), ((wall - DROP_AT_WALL) as u64, DROP_AT_WALL as u64), "{s0}");
    let before = held.len();
    // (2) ... until everything is in use again: then the error is the clear
    // one, no panic.
    let e = fill(&fx, &mut next, &mut held);
    let made = held.len() - before;
    let s1 = fx.pool.stats();
    println!(
        "REPORT at the wall with {DROP_AT_WALL} cached: {made} new frames mapped with {} evictions ({} munmap \
         fallbacks), then: {e}; {} in use now",
        s1.evictions - s0.evictions,
        s1.mmu.remove_fallbacks,
        held.len()
    );
    assert!(made >= 1, "no new frame could be mapped with {DROP_AT_WALL} cached mappings to evict: {s1}");
    assert!(s1.evictions > s0.evictions, "mapping at the wall must evict: {s1}");
    assert!(e.errno() == Some(libc::ENOMEM) || matches!(e, Error::MapLimit { .. }), "unclear error: {e:?}");
    assert_eq!((s1.used, s1.cached), (held.len() as u64, 0), "the error comes when nothing is left to evict: {s1}");
    assert_eq!(s1.mmu.mapped, s1.used, "{s1}");

    // (3) No page lost: every handle reads its frame; the books balance and
    // every page is back to one hold.
    drop_all_and_check(&fx, held);
}

#[test]
fn wall_recovery_child() {
    if !is_child() {
        return;
    }
    let Some((fx, limit)) = to_the_wall() else { return };
    let mut rng = SmallRng::seed_from_u64(9);
    let mut held: Vec<SfBuf<'_>> = Vec::with_capacity(fx.pages.len());
    let mut next = 0;
    let wall = fill_to_the_wall(&fx, limit, &mut next, &mut held);

    drop_some(&mut held, DROP_AT_WALL, &mut rng);
    let s0 = fx.pool.stats();
    let mut made = 0;
    let failure = loop {
        if made == NEW_AT_WALL {
            break None;
        }
        match map_next(&fx, &mut next) {
            Ok(sf) => {
                held.push(sf);
                made += 1;
            }
            Err(e) => break Some(e),
        }
    };
    let s1 = fx.pool.stats();
    let evicted = s1.evictions - s0.evictions;
    println!(
        "REPORT recovery at the wall with {DROP_AT_WALL} cached: {made} of {NEW_AT_WALL} new frames mapped with \
         {evicted} evictions ({} munmap fallbacks); {} mapped now (wall {wall})",
        s1.mmu.remove_fallbacks, s1.mmu.mapped
    );
    if let Some(e) = failure {
        panic!(
            "a new frame failed after {made} of {NEW_AT_WALL} with {DROP_AT_WALL} cached to evict at first: {e}; \
             {evicted} evictions for {made} new mappings, so evicting at the wall did not free a VMA for the \
             next mmap: {s1}"
        );
    }
    assert!(evicted <= (NEW_AT_WALL + 10) as u64, "{evicted} evictions for {NEW_AT_WALL} new mappings: {s1}");
    assert_eq!(s1.cached, s0.cached - evicted, "{s1}");

    // Everything in use again: as many mappings as at the wall, none lost.
    let e = fill(&fx, &mut next, &mut held);
    let s2 = fx.pool.stats();
    println!("REPORT all in use again at {} mappings (wall {wall}): {e}", held.len());
    assert_eq!(s2.cached, 0, "{s2}");
    assert!(held.len() + 16 >= wall, "capacity lost at the wall: {} in use of {wall}: {s2}", held.len());
    drop_all_and_check(&fx, held);
}

#[test]
fn budget_child() {
    if !is_child() {
        return;
    }
    let budget = default_map_budget();
    let frames = budget + 2 * DROP_AT_WALL + 1_000;
    let fx = Fixture::new(frames, None);
    let mut rng = SmallRng::seed_from_u64(8);
    let mut held: Vec<SfBuf<'_>> = Vec::with_capacity(frames);
    let mut next = 0;

    let e = fill(&fx, &mut next, &mut held);
    println!("REPORT budget: {} live mappings, then: {e}", held.len());
    assert!(matches!(e, Error::MapLimit { budget: b } if b == budget), "the budget stops it first: {e:?}");
    let s = fx.pool.stats();
    assert_eq!((held.len(), s.live_mappings, s.map_budget), (budget, budget as u64, budget as u64), "{s}");
    assert_eq!(s.mmu.mapped, budget as u64, "{s}");

    // Cached mappings make room: exactly one eviction per new frame.
    drop_some(&mut held, DROP_AT_WALL, &mut rng);
    let s0 = fx.pool.stats();
    for _ in 0..NEW_AT_WALL {
        held.push(map_next(&fx, &mut next).expect("room from a cached mapping"));
    }
    let s1 = fx.pool.stats();
    assert_eq!(s1.evictions - s0.evictions, NEW_AT_WALL as u64, "{s1}");
    assert_eq!(s1.live_mappings, budget as u64, "{s1}");

    // In use to the budget again: MapLimit, after using up the cache.
    let e = fill(&fx, &mut next, &mut held);
    assert!(matches!(e, Error::MapLimit { .. }), "{e:?}");
    let s2 = fx.pool.stats();
    assert_eq!((held.len(), s2.cached), (budget, 0), "{s2}");
    println!("REPORT budget after eviction round: {} evictions, then {e}", s2.evictions);

    drop_all_and_check(&fx, held);
}
