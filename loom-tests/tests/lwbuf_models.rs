//! Loom models of the per-CPU lwbuf protocol: the mailbox (passive IPI),
//! release across CPUs, CPUs whose thread has gone, two pages of one
//! mapping granule used and released on two CPUs, and the scoped
//! `map_local` against a reclaim of its CPU.
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
use loom_tests::{expect_failure, expect_failure_in_child, leak, model, unleak, Mutant};
use lwbuf::__loom::{lwbuf_entry_slot, lwbuf_local_slot};
use lwbuf::{Backing, Lwbuf, Lwbufs, Mmu, ModelMmu, Pfn, PhysMem, Reclaim, Slot};

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

// === 4. granule sharing: two pages of one granule, used on two CPUs ===

/// Granule 2: frames 0 and 1 are one granule, mapped and cached as one
/// entry per CPU. The main thread (CPU 0) maps both pages: one miss, one
/// hit on the granule's entry (count 2). Thread B (CPU 1) takes both
/// handles and uses them there (its own entry for the granule, count 2),
/// releases the first on CPU 1 (a decref message to CPU 0) and hands the
/// second back; the main thread, which maps frame 2 meanwhile (a miss that
/// may map over a stale claim in place), uses it and releases it on CPU 0
/// (a decref message to CPU 1). `max_excess` 0: an entry whose count
/// reaches zero is evicted at once. Every decref must be applied exactly
/// once, to the granule's entry, and neither CPU's mapping of the granule
/// may go or change while a handle can use it.
fn granule_shared() {
    let mem = PhysMem::builder().frames(4).backing(Backing::Heap).build().unwrap();
    let mmu = Arc::new(ModelMmu::new(&mem, 6).unwrap());
    let lw = leak(Lwbufs::builder(mmu.clone()).cpus(2).max_excess(0).granule(2).build().unwrap());
    assert_eq!((lw.granule(), lw.reclaim_mode()), (2, Reclaim::Lazy));
    let pages: &'static Vec<lwbuf::Page> = leak((0..3).map(|_| mem.alloc_page().unwrap()).collect());
    for p in pages {
        p.direct().unwrap().write_u64(0, mark(p)).unwrap();
    }
    let back: &'static Mutex<Option<Lwbuf<'static>>> = leak(Mutex::new(None));
    let g0 = lw.bind(0).unwrap();
    let h0 = lw.alloc(&pages[0]).unwrap();
    let h1 = lw.alloc(&pages[1]).unwrap();
    let (bmmu, bmmu2) = (mmu.clone(), mmu.clone());
    let b = thread::spawn(move || {
        let g1 = lw.bind(1).unwrap();
        uses_its_granule(&bmmu, &h0, "CPU 1, first page");
        uses_its_granule(&bmmu, &h1, "CPU 1, second page");
        drop(h0); // on CPU 1: a local decref, a message to CPU 0
        uses_its_granule(&bmmu, &h1, "CPU 1, after the first release");
        *back.lock().unwrap() = Some(h1);
        drop(g1); // unbinds: drains CPU 1's mailbox (or a sender does)
    });
    // Frame 2 is the other granule: CPU 0's second miss; evicted at once,
    // its mapping stays entered, and the next miss maps over it in place.
    for when in ["CPU 0, the other granule", "CPU 0, the other granule mapped over in place"] {
        let other = lw.alloc(&pages[2]).unwrap();
        uses_its_granule(&bmmu2, &other, when);
    }
    let h1 = loop {
        if let Some(h) = back.lock().unwrap().take() {
            break h;
        }
        lw.poll().unwrap();
        thread::yield_now();
    };
    uses_its_granule(&mmu, &h1, "CPU 0, handed back");
    drop(h1); // on CPU 0: a local decref, a message to CPU 1
    b.join().unwrap();
    lw.poll().unwrap();
    let s = lw.stats();
    assert_eq!(s.total.decrefs_sent, s.total.decrefs_applied, "a decref message lost or applied twice");
    assert_eq!(s.total.decrefs_sent, 2);
    assert!(s.per_cpu.iter().all(|c| c.mailbox == 0));
    assert_eq!(lw.check_consistency(), Ok(0), "every count back to zero, every slot accounted for");
    assert!(mmu.stats().replaces >= 1, "frame 2's second miss maps over its stale mapping: {}", mmu.stats());
    drop(g0);
    // SAFETY: the thread is joined; every handle is dropped.
    unsafe {
        unleak(lw);
        unleak(back);
        unleak(pages);
    }
}

fn mark(page: &lwbuf::Page) -> u64 {
    0x1b00_0000 + page.pfn().0 as u64
}

/// On the calling thread's CPU: the handle's bytes are its page's, and
/// that CPU's entry for its granule maps the whole granule in place.
fn uses_its_granule(mmu: &ModelMmu, h: &Lwbuf<'_>, when: &str) {
    assert_eq!(h.kva().unwrap().read_u64(0).unwrap(), mark(h.page()), "{when}: the handle's bytes are not its page's");
    let slot = lwbuf_entry_slot(h).unwrap_or_else(|| panic!("{when}: this CPU has no entry for the handle's granule"));
    let base = h.page().pfn().0 & !1;
    for i in 0..2 {
        assert_eq!(
            mmu.translate(Slot(slot.0 + i)),
            Some(Pfn(base + i)),
            "{when}: the granule's mapping went or changed under a live handle"
        );
    }
}

#[test]
fn lwbuf_granule_shared() {
    model("lwbuf_granule_shared", granule_shared);
}

// Both mutants panic in a thread that holds handles and a CPU binding,
// whose drops during the unwinding panic again: the process aborts, so
// they run in a child process.

/// A release that decrefs the page's own key: the second page's key names
/// no entry (the library's own check panics).
#[test]
fn lwbuf_granule_shared_mutant_release_page_key() {
    expect_failure_in_child(
        "lwbuf_granule_shared_mutant_release_page_key",
        "lwbuf_granule_shared",
        Mutant::ReleasePageKey,
        "decref of MapKey { pfn: 1, pages: 1 } on CPU 0, which holds no reference on it",
        granule_shared,
    );
}

/// A foreign CPU's entry made for the page: CPU 1 maps the page alone, and
/// has no entry for the granule the handle maps (nor for the decref
/// messages, which name the granule).
#[test]
fn lwbuf_granule_shared_mutant_foreign_page_key() {
    expect_failure_in_child(
        "lwbuf_granule_shared_mutant_foreign_page_key",
        "lwbuf_granule_shared",
        Mutant::ForeignPageKey,
        "CPU 1, first page: this CPU has no entry for the handle's granule",
        granule_shared,
    );
}

// === 5. map_local: the scoped mapping against a reclaim of its CPU ===

/// A thread bound to CPU 0 reads its page inside `CpuGuard::map_local`
/// while an unbound thread reclaims every CPU's unused mappings (stealing
/// CPU 0 from its owner between the owner's own sections). The closure's
/// entry is in use for the whole call, so CPU 0 keeps the page's mapping
/// through it, whatever the interleaving; afterwards the reference is back
/// and a reclaim unmaps everything.
fn map_local_vs_reclaim() {
    let (mem, mmu, lw) = system(1, 2, 2, 1);
    let page = leak(mem.alloc_page().unwrap());
    page.direct().unwrap().write_u64(0, mark(page)).unwrap();
    let reclaimer = thread::spawn(move || {
        lw.reclaim();
    });
    let cpu = lw.bind(0).unwrap();
    cpu.map_local(page, |kva| {
        let slot = lwbuf_local_slot(lw, page).expect("CPU 0 lost its entry for the page inside map_local");
        assert_eq!(mmu.translate(slot), Some(page.pfn()), "the page's mapping went or changed inside map_local");
        assert_eq!(kva.read_u64(0).unwrap(), mark(page));
    })
    .unwrap();
    // Given back: whatever is still mapped is unused (the reclaimer may
    // have unmapped it since).
    let st = lw.stats();
    assert_eq!(st.per_cpu[0].cached, st.per_cpu[0].mapped, "the reference was not given back");
    drop(cpu);
    reclaimer.join().unwrap();
    lw.reclaim();
    assert_eq!(mmu.stats().mapped, 0, "nothing left in use after a last reclaim");
    assert_eq!(lw.check_consistency(), Ok(0));
    // SAFETY: the reclaimer is joined; nothing borrows them any more.
    unsafe { unleak(lw) };
    unsafe { unleak(page) };
}

#[test]
fn lwbuf_map_local_vs_reclaim() {
    model("lwbuf_map_local_vs_reclaim", map_local_vs_reclaim);
}

/// The reference given back before the closure runs: a reclaim between the
/// two unmaps the page the closure reads.
#[test]
fn lwbuf_map_local_vs_reclaim_mutant_release_early() {
    expect_failure("lwbuf_map_local_vs_reclaim", Mutant::LocalReleaseEarly, map_local_vs_reclaim);
}
