//! Loom model of the `Page` hold count: clones dropped on different threads
//! free the frame exactly once, after every holder is done with it.

#![cfg(loom)]

use loom::thread;
use loom_tests::{expect_failure, model, Mutant};
use lwbuf::{Backing, PhysMem};

fn page_refcount() {
    let mem = PhysMem::builder().frames(1).backing(Backing::Heap).build().unwrap();
    let page = mem.alloc_page().unwrap();
    let holders: Vec<_> = (0..2)
        .map(|i| {
            let p = page.clone();
            thread::spawn(move || {
                // Touch the frame (under loom this reads the page's probe),
                // then let go of the hold.
                p.direct().unwrap().write_u64(8 * i, i as u64).unwrap();
                drop(p);
            })
        })
        .collect();
    page.direct().unwrap().read_u64(0).unwrap();
    drop(page);
    for h in holders {
        h.join().unwrap();
    }
    let s = mem.stats();
    assert_eq!(s.free, 1, "the frame is back exactly once");
    let again = mem.alloc_page().unwrap();
    assert!(mem.alloc_page().is_err(), "a double free would hand the frame out twice");
    drop(again);
}

#[test]
fn page_clones_free_the_frame_once() {
    model("page_refcount", page_refcount);
}

#[test]
fn page_mutant_relaxed_release() {
    let msg = expect_failure("page_refcount", Mutant::PageRelaxed, page_refcount);
    assert!(msg.contains("Causality") || msg.contains("race"), "expected a causality violation, got: {msg}");
}
