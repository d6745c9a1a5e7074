//! The real wall with the lwbuf caches: `vm.max_map_count`.
//!
//! Each scattered single-page mapping in the window is its own VMA, and Linux
//! refuses a process more than `vm.max_map_count` (65,530 by default) with
//! `ENOMEM`. These tests fill a real window of 70,000 slots with lwbuf
//! mappings of 70,000 frames in shuffled order until the kernel (or the
//! mapping budget) says no, and check that the caches turn the refusal into
//! eviction when they have something cached, into a clear error when they do
//! not, never into a panic, and that everything unmaps cleanly afterwards.
//!
//! The wall is process-wide, so each scenario runs in a child process: the
//! parent test re-executes this test binary with `--exact <child>` and
//! `LWBUF_WALL_CHILD=<child>` set; the child tests are `#[ignore]`d and do
//! nothing without that variable.

// Not under Miri: the real vm.max_map_count wall: mmap of a memfd, in child
// processes Miri cannot spawn.
#![cfg(not(miri))]

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use lwbuf::{default_map_budget, Error, Lwbuf, Lwbufs, Page, PhysMem, Window};

const CHILD_ENV: &str = "LWBUF_WALL_CHILD";
const FRAMES: usize = 70_000;

/// Run the ignored test `name` of this binary in a child process and check
/// that it passed.
fn in_child(name: &str) {
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args(["--exact", name, "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .output()
        .expect("spawn the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- child {name} ---\n{stdout}{stderr}");
    assert!(out.status.success(), "child {name} failed: {}", out.status);
    assert!(stdout.contains("1 passed"), "child {name} did not run its test");
}

/// Whether this process is the child for `name`.
fn is_child(name: &str) -> bool {
    std::env::var(CHILD_ENV).as_deref() == Ok(name)
}

fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap().trim().parse().unwrap()
}

fn vmas() -> usize {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().count()
}

/// 70,000 frames, each with its frame number in word 0, held in `pages`, and
/// a shuffled order to map them in (so adjacent slots never get adjacent
/// frames and no two mappings merge into one VMA).
fn memory() -> (PhysMem, Vec<Page>, Vec<usize>) {
    let mem = PhysMem::builder().frames(FRAMES).build().unwrap();
    let pages = mem.alloc_run(FRAMES).unwrap();
    for p in &pages {
        mem.write_frame(p.pfn(), 0, &(p.pfn().0 as u64).to_ne_bytes()).unwrap();
    }
    let mut order: Vec<usize> = (0..FRAMES).collect();
    order.shuffle(&mut SmallRng::seed_from_u64(7));
    (mem, pages, order)
}

#[track_caller]
fn check(h: &Lwbuf<'_>) {
    let got = h.kva().unwrap().read_u64(0).unwrap();
    assert_eq!(got, h.page().pfn().0 as u64, "frame {} read through its mapping", h.page().pfn().0);
}

/// Allocate `pages[order[next..]]` until the first error; returns it.
fn fill<'a>(lw: &'a Lwbufs, pages: &'a [Page], order: &[usize], next: &mut usize, held: &mut Vec<Lwbuf<'a>>) -> Error {
    while *next < order.len() {
        match lw.alloc(&pages[order[*next]]) {
            Ok(h) => {
                held.push(h);
                *next += 1;
            }
            Err(e) => return e,
        }
    }
    panic!("mapped all {FRAMES} frames without reaching any wall");
}

/// The error a full system may answer with: the kernel's `ENOMEM`, a full
/// window, or the mapping budget.
#[track_caller]
fn assert_clear_refusal(e: &Error) {
    let ok = match e {
        Error::Sys { op, .. } => e.errno() == Some(libc::ENOMEM) && op.contains("mmap"),
        Error::WindowFull { .. } | Error::MapLimit { .. } => true,
        _ => false,
    };
    assert!(ok, "not a clear refusal: {e:?} ({e})");
}

/// Drop everything, reclaim, and check nothing is left.
fn drain(lw: &Lwbufs, held: Vec<Lwbuf<'_>>) {
    let n = held.len() as u64;
    drop(held);
    let st = lw.stats();
    assert_eq!(st.total.cached, n.min(lw.max_excess() as u64), "{st}");
    lw.reclaim();
    let st = lw.stats();
    assert_eq!(lw.check_consistency(), Ok(0));
    assert_eq!((st.total.mapped, st.total.cached, st.mmu.mapped), (0, 0, 0), "{st}");
    assert_eq!(st.total.unmap_errors, 0, "{st}");
}

// === the kernel's wall, with an unlimited budget ===

#[test]
fn kernel_wall_is_enomem_then_eviction_recovers() {
    in_child("child_kernel_wall");
}

#[test]
#[ignore = "child process of kernel_wall_is_enomem_then_eviction_recovers"]
fn child_kernel_wall() {
    if !is_child("child_kernel_wall") {
        return;
    }
    let limit = max_map_count();
    assert!(limit < FRAMES, "vm.max_map_count is {limit}: no wall below {FRAMES} mappings to test");
    let (mem, pages, order) = memory();
    let win = Window::builder(&mem).slots(FRAMES).build().unwrap();
    let lw = Lwbufs::builder(Arc::new(win)).cpus(2).map_budget(usize::MAX).max_excess(FRAMES).build().unwrap();
    let _g = lw.bind(0).unwrap();

    // 1. Scattered single pages until the kernel refuses.
    let mut held = Vec::new();
    let mut next = 0;
    let wall = fill(&lw, &pages, &order, &mut next, &mut held);
    let at_wall = held.len();
    eprintln!("wall after {at_wall} mappings ({} VMAs, max_map_count {limit}): {wall}", vmas());
    assert!(matches!(wall, Error::Sys { op: "mmap(enter)", .. }), "{wall:?}");
    assert_eq!(wall.errno(), Some(libc::ENOMEM));
    assert!(wall.to_string().contains("mmap(enter)"), "{wall}");
    assert!((limit / 2..limit).contains(&at_wall), "wall at {at_wall} mappings, limit {limit}");
    held.iter().for_each(check);
    let st = lw.stats();
    assert_eq!(st.mmu.mapped, at_wall as u64);
    assert_eq!(lw.check_consistency(), Ok(at_wall as u64));

    // 2. Drop some (they stay cached), then map frames never mapped before:
    // each is refused by the kernel, and the cache evicts a cached mapping
    // and retries.
    const DROPPED: usize = 1000;
    let mut r = SmallRng::seed_from_u64(9);
    held.shuffle(&mut r);
    let dropped: HashSet<usize> = held.drain(..DROPPED).map(|h| h.page().pfn().0).collect();
    let st = lw.stats();
    assert_eq!((st.total.cached, st.mmu.mapped), (DROPPED as u64, at_wall as u64), "{st}");
    let ev0 = st.total.evictions;
    let mut fresh = Vec::new();
    for _ in 0..DROPPED / 2 {
        let page = &pages[order[next]];
        assert!(!dropped.contains(&page.pfn().0));
        let h = lw.alloc(page).unwrap_or_else(|e| {
            panic!("no recovery after {} with {} cached: {e}\n{}", fresh.len(), lw.stats().total.cached, lw.stats())
        });
        check(&h);
        fresh.push(h);
        next += 1;
    }
    let st = lw.stats();
    eprintln!("recovered {} allocations: {st}", fresh.len());
    // One eviction per new mapping: each unmap at the wall frees the VMA
    // the next mmap needs (not one more, not fewer).
    let evicted = st.total.evictions - ev0;
    assert!((DROPPED / 2..=DROPPED / 2 + 10).contains(&(evicted as usize)), "{evicted} evictions\n{st}");
    assert!(st.mmu.mapped <= at_wall as u64 + 1, "{st}");
    held.extend(fresh);

    // 3. Everything in use: the error is clear, and says so again and again.
    let e = fill(&lw, &pages, &order, &mut next, &mut held);
    eprintln!("full again after {} mappings: {e}", held.len());
    assert_clear_refusal(&e);
    assert_eq!(lw.stats().total.cached, 0, "refused while something was cached");
    assert!(held.len() + 16 >= at_wall, "capacity lost at the wall: {} of {at_wall}", held.len());
    for _ in 0..3 {
        assert_clear_refusal(&lw.alloc(&pages[order[next]]).unwrap_err());
    }
    held.iter().for_each(check);
    assert_eq!(lw.check_consistency(), Ok(held.len() as u64));

    // 4. Everything drops and unmaps cleanly, and the window is usable.
    drain(&lw, held);
    let again: Vec<_> = order[..100].iter().map(|&i| lw.alloc(&pages[i]).unwrap()).collect();
    again.iter().for_each(check);
    drain(&lw, again);
    drop(_g);
    drop(lw);
    drop(pages);
    assert_eq!(mem.stats().free, FRAMES);
}

// === the mapping budget, the default ===

#[test]
fn default_budget_refuses_with_map_limit_before_the_kernel() {
    in_child("child_default_budget");
}

#[test]
#[ignore = "child process of default_budget_refuses_with_map_limit_before_the_kernel"]
fn child_default_budget() {
    if !is_child("child_default_budget") {
        return;
    }
    let (mem, pages, order) = memory();
    let win = Window::builder(&mem).slots(FRAMES).build().unwrap();
    let lw = Lwbufs::builder(Arc::new(win)).cpus(2).max_excess(FRAMES).build().unwrap();
    let budget = default_map_budget();
    assert!(budget < max_map_count() / 2, "budget {budget}");
    let _g = lw.bind(1).unwrap();

    let mut held = Vec::new();
    let mut next = 0;
    let e = fill(&lw, &pages, &order, &mut next, &mut held);
    eprintln!("refused after {} mappings ({} VMAs): {e}", held.len(), vmas());
    assert!(matches!(e, Error::MapLimit { budget: b } if b == budget), "{e:?}");
    assert!(e.to_string().contains(&budget.to_string()), "{e}");
    assert_eq!(held.len(), budget, "the budget counts live mappings");
    assert_eq!(lw.stats().mmu.mapped, budget as u64);

    // Cached mappings are evicted to make room under the budget.
    let dropped: Vec<_> = held.drain(..100).collect();
    drop(dropped);
    for _ in 0..100 {
        let h = lw.alloc(&pages[order[next]]).expect("room by eviction");
        check(&h);
        held.push(h);
        next += 1;
    }
    assert!(matches!(lw.alloc(&pages[order[next]]), Err(Error::MapLimit { .. })));
    assert_eq!(lw.stats().mmu.mapped, budget as u64);
    held.iter().for_each(check);
    drain(&lw, held);
}

// === granules: the same frames in a sixteenth of the VMAs ===

#[test]
fn granules_hold_every_frame_below_the_wall() {
    in_child("child_granules");
}

/// Every one of the 70,000 frames held at once, in shuffled order, which
/// single-page mappings cannot do (the wall is at 65,530 VMAs): with
/// granules of 16 frames they take 4,375 mappings.
#[test]
#[ignore = "child process of granules_hold_every_frame_below_the_wall"]
fn child_granules() {
    if !is_child("child_granules") {
        return;
    }
    let (mem, pages, order) = memory();
    let win = Window::builder(&mem).slots(FRAMES).build().unwrap();
    let lw =
        Lwbufs::builder(Arc::new(win)).cpus(1).granule(16).map_budget(usize::MAX).max_excess(FRAMES).build().unwrap();
    let _g = lw.bind(0).unwrap();
    let before = vmas();
    let held: Vec<Lwbuf<'_>> = order.iter().map(|&i| lw.alloc(&pages[i]).expect("below the wall")).collect();
    let used = vmas() - before;
    let st = lw.stats();
    eprintln!(
        "{} frames held in {} mappings: {used} more VMAs (max_map_count {})",
        held.len(),
        st.mmu.enters,
        max_map_count()
    );
    assert_eq!(held.len(), FRAMES);
    assert_eq!(st.mmu.enters as usize, FRAMES.div_ceil(16), "one mapping per granule");
    assert!(used <= 2 * FRAMES.div_ceil(16) + 2, "{used} VMAs for {} granules", FRAMES.div_ceil(16));
    held.iter().step_by(7).for_each(check);
    drop(held);
    assert_eq!(lw.stats().total.cached as usize, FRAMES.div_ceil(16), "every granule cached");
    lw.reclaim();
    let st = lw.stats();
    assert_eq!(lw.check_consistency(), Ok(0));
    assert_eq!((st.total.mapped, st.mmu.mapped, st.total.unmap_errors), (0, 0, 0), "{st}");
}
