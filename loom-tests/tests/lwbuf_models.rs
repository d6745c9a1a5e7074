//! Loom models of the per-CPU lwbuf protocol: the mailbox (passive IPI),
//! release across CPUs, and CPUs whose thread has gone.
//!
//! Each model runs the library's own code (its sync facade is loom's under
//! `--cfg loom`) on the model MMU, with a small fixed CPU count. Each has a
//! `*_mutant` twin that switches one protocol breakage on and requires the
//! model to fail.

#![cfg(loom)]

use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Mutex;
use loom::thread;
use loom_tests::{expect_failure, leak, model, unleak, Mutant};
use lwbuf::{Backing, Lwbuf, Lwbufs, ModelMmu, PhysMem, Reclaim};

fn system(frames: usize, slots: usize, cpus: usize, max_excess: usize) -> (PhysMem, Arc<ModelMmu>, &'static Lwbufs) {
    let mem = PhysMem::builder().frames(frames).backing(Backing::Heap).build().unwrap();
    let mmu = Arc::new(ModelMmu::new(&mem, slots).unwrap());
    let lw = Lwbufs::builder(mmu.clone()).cpus(cpus).max_excess(max_excess).reclaim(Reclaim::Strict).build().unwrap();
    (mem, mmu, leak(lw))
}

fn spin_until(flag: &AtomicBool) {
    while !flag.load(Ordering::Acquire) {
        thread::yield_now();
    }
}

// === 1. mailbox: two producers, the owner draining ===

fn mailbox() {
    let (mem, _mmu, lw) = system(2, 4, 2, 1);
    // Handles borrow their pages: the pages need `'static` addresses too.
    let (pa, pb) = (leak(mem.alloc_page().unwrap()), leak(mem.alloc_page().unwrap()));
    let g = lw.bind(0).unwrap();
    let ha = lw.alloc(pa).unwrap();
    let hb = lw.alloc(pb).unwrap();
    // Unbound producers: each drop is one decref message to CPU 0.
    let t1 = thread::spawn(move || drop(ha));
    let t2 = thread::spawn(move || drop(hb));
    lw.poll().unwrap(); // the owner drains concurrently
    t1.join().unwrap();
    t2.join().unwrap();
    lw.poll().unwrap();
    let s = lw.stats();
    assert_eq!(s.per_cpu[0].decrefs_applied, 2, "every message applied exactly once");
    assert_eq!(s.per_cpu[0].mailbox, 0, "mailbox empty at the end");
    assert_eq!(lw.check_consistency(), Ok(0));
    drop(g);
    // SAFETY: both producers are joined.
    unsafe { unleak(lw) };
    unsafe { unleak(pa) };
    unsafe { unleak(pb) };
}

#[test]
fn mailbox_two_producers_and_the_owner() {
    model("mailbox", mailbox);
}

#[test]
fn mailbox_mutant_skip_drain() {
    expect_failure("mailbox", Mutant::SkipDrain, mailbox);
}

// === 2. release: alloc on A, address on B, drop on A (or unbound) while B polls ===

fn release(drop_unbound: bool) {
    let (mem, mmu, lw) = system(1, 4, 2, 0);
    let page = leak(mem.alloc_page().unwrap());
    let pfn = page.pfn();
    page.direct().unwrap().write_u64(0, 0xfeed).unwrap();
    let g0 = lw.bind(0).unwrap();
    let h: &'static Lwbuf<'static> = leak(lw.alloc(page).unwrap());
    let used = leak(AtomicBool::new(false));
    let mmu_b = mmu.clone();
    let b = thread::spawn(move || {
        let _g1 = lw.bind(1).unwrap();
        let k = h.kva().unwrap(); // foreign CPU: makes CPU 1's entry
        assert_eq!(k.read_u64(0).unwrap(), 0xfeed);
        assert!(!mmu_b.slots_of(pfn).is_empty(), "held frame must be mapped");
        used.store(true, Ordering::Release);
        lw.poll().unwrap(); // races with the drop below
    });
    let c = if drop_unbound {
        Some(thread::spawn(move || {
            spin_until(used);
            // SAFETY: B no longer uses `h` once `used` is set.
            unsafe { unleak(h) };
        }))
    } else {
        spin_until(used);
        // SAFETY: B no longer uses `h` once `used` is set.
        unsafe { unleak(h) };
        None
    };
    lw.poll().unwrap();
    b.join().unwrap();
    if let Some(c) = c {
        c.join().unwrap();
    }
    lw.poll().unwrap();
    assert_eq!(lw.check_consistency(), Ok(0), "every count zero, no slot leaked, no frame mapped twice");
    let s = lw.stats();
    assert!(s.per_cpu.iter().all(|c| c.mailbox == 0));
    assert_eq!(s.total.decrefs_sent, s.total.decrefs_applied);
    assert_eq!(mmu.slots_of(pfn), vec![], "max_excess 0: nothing stays mapped");
    drop(g0);
    // SAFETY: every thread is joined.
    unsafe { unleak(lw) };
    unsafe { unleak(used) };
    unsafe { unleak(page) };
}

#[test]
fn release_on_owner_while_foreign_cpu_polls() {
    model("release_on_owner", || release(false));
}

#[test]
fn release_on_unbound_thread_while_foreign_cpu_polls() {
    model("release_unbound", || release(true));
}

#[test]
fn release_mutant_no_remote_decref() {
    expect_failure("release_on_owner", Mutant::NoRemoteDecref, || release(false));
}

// === 3. unowned CPU: messages to a CPU whose thread unbinds ===

fn unowned() {
    let (mem, _mmu, lw) = system(1, 4, 2, 0);
    let page = leak(mem.alloc_page().unwrap());
    let slot: &'static Mutex<Option<Lwbuf<'static>>> = leak(Mutex::new(None));
    let t = thread::spawn(move || {
        let g = lw.bind(1).unwrap();
        let h = lw.alloc(page).unwrap();
        *slot.lock().unwrap() = Some(h);
        drop(g); // unbinds while the main thread may be releasing the handle
    });
    loop {
        let h = slot.lock().unwrap().take();
        if let Some(h) = h {
            drop(h); // unbound thread: one decref message to CPU 1
            break;
        }
        thread::yield_now();
    }
    t.join().unwrap();
    // Nobody polls CPU 1 from here on: nothing may be stranded.
    let s = lw.stats();
    assert_eq!(s.per_cpu[1].mailbox, 0, "message stranded in an unowned CPU's mailbox");
    assert_eq!(lw.check_consistency(), Ok(0));
    // SAFETY: the thread is joined.
    unsafe { unleak(lw) };
    unsafe { unleak(slot) };
    unsafe { unleak(page) };
}

#[test]
fn unowned_cpu_is_drained_on_its_behalf() {
    model("unowned_cpu", unowned);
}

#[test]
fn unowned_mutant_no_unbind_drain() {
    expect_failure("unowned_cpu", Mutant::NoUnbindDrain, unowned);
}
