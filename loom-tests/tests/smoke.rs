//! Loom models of the `Page` hold count and the frame allocator under it.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release`
//! (`./scripts/test` does). Under `cfg(loom)` the library's atomics, locks and
//! `Arc` come from loom (its sync facade), so every interleaving of the
//! threads below is explored, up to `LOOM_MAX_PREEMPTIONS` preemptions.
//!
//! What the models check: a frame goes back to the allocator exactly once
//! (a double free panics in the allocator, a leak shows in `stats()`), on
//! whichever thread drops the last hold, and concurrent allocations never
//! hand out the same frame.
//!
//! What they cannot check: the ordering of the last decrement against the
//! free. The page's payload is not a loom cell, so a `Relaxed` decrement
//! without the `Acquire` fence would pass here too.

#![cfg(loom)]

use loom::thread;
use lwbuf::{Backing, Error, PhysMem};

fn heap(frames: usize) -> PhysMem {
    PhysMem::builder().frames(frames).backing(Backing::Heap).build().expect("heap PhysMem")
}

/// Two threads drop clones of one page while a third hold is dropped on the
/// main thread: the frame is freed once, by whoever is last.
#[test]
fn last_hold_frees_the_frame_once_on_any_thread() {
    loom::model(|| {
        let mem = heap(2);
        let page = mem.alloc_page().unwrap();
        let pfn = page.pfn();
        let a = page.clone();
        let b = page.clone();
        let ta = thread::spawn(move || drop(a));
        let tb = thread::spawn(move || drop(b));
        drop(page);
        ta.join().unwrap();
        tb.join().unwrap();
        let s = mem.stats();
        assert_eq!((s.free, s.largest_free_run), (2, 2));
        // The frame is allocatable again, and only once.
        let again = mem.alloc_run(2).unwrap();
        assert!(again.iter().any(|p| p.pfn() == pfn));
        assert!(matches!(mem.alloc_page(), Err(Error::OutOfFrames { .. })));
    });
}

/// Two allocations race with the release of another frame's holds, each
/// thread dropping its hold only after it allocated: the one free frame goes
/// to exactly one of them, the held frame is never handed out while held, and
/// both frames are free at the end.
#[test]
fn alloc_races_with_release() {
    loom::model(|| {
        let mem = heap(2);
        let held = mem.alloc_page().unwrap();
        let held_pfn = held.pfn();
        let clone = held.clone();
        let m2 = mem.clone();
        let t = thread::spawn(move || {
            let mine = m2.alloc_page();
            drop(clone);
            mine
        });
        let here = mem.alloc_page();
        drop(held);
        let there = t.join().unwrap();
        let got = match (&here, &there) {
            (Ok(p), Err(Error::OutOfFrames { requested: 1, .. }))
            | (Err(Error::OutOfFrames { requested: 1, .. }), Ok(p)) => p.pfn(),
            other => panic!("exactly one allocation should succeed, got {other:?}"),
        };
        assert_ne!(got, held_pfn, "a held frame was handed out");
        drop((here, there));
        let s = mem.stats();
        assert_eq!((s.free, s.largest_free_run), (2, 2));
    });
}
