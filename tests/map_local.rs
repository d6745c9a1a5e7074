//! `CpuGuard::map_local`: a mapping scoped to a closure on the guard's CPU
//! (Linux's `kmap_local_page`), over the same per-CPU caches as `alloc`.
//!
//! Every test runs on the real window and on the model MMU
//! (`on_both_backends!`); reads are checked against per-frame stamps
//! written through the direct map.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;

use lwbuf::{system_page_size, CpuGuard, Error, Lwbufs, PhysMem, Reclaim};

#[macro_use]
#[path = "common/backend.rs"]
mod backend;
use backend::{leak, pattern, stamped_pages, stamped_run, Backend, RunOnDrop};

on_both_backends!(
    reads_and_writes_like_a_handle,
    nests_and_shares_entries_with_handles,
    panic_in_the_closure_gives_the_reference_back,
    errors_come_before_the_closure_runs,
    two_cpus_at_once,
    granule_pages_share_one_mapping,
    extreme_excess_limits,
    guard_outliving_its_binding_is_not_bound,
);

fn system(b: Backend, mem: &PhysMem, slots: usize, cpus: usize, max_excess: usize, granule: usize) -> Lwbufs {
    Lwbufs::builder(b.mmu(mem, slots))
        .cpus(cpus)
        .max_excess(max_excess)
        .granule(granule)
        .reclaim(Reclaim::Strict)
        .build()
        .expect("build Lwbufs")
}

/// The first and last words of the view are its frame's stamps.
#[track_caller]
fn check_stamps(kva: &lwbuf::Kaddr<'_>, pfn: usize) {
    let fs = system_page_size();
    assert_eq!(kva.len(), fs, "a view of one page");
    assert_eq!(kva.read_u64(0).unwrap(), pattern(pfn, 0));
    assert_eq!(kva.read_u64(fs - 8).unwrap(), pattern(pfn, fs / 8 - 1));
}

/// A miss then a hit, each the frame's bytes; a write lands in the frame;
/// `alloc` after it hits the same cached entry (one mapping made in all).
fn reads_and_writes_like_a_handle(b: Backend) {
    let mem = b.phys(8);
    let pages = stamped_pages(&mem, 2);
    let lw = system(b, &mem, 8, 2, 4, 1);
    let cpu = lw.bind(1).unwrap();
    let pfn = pages[0].pfn().0;
    cpu.map_local(&pages[0], |kva| check_stamps(&kva, pfn)).unwrap();
    cpu.map_local(&pages[0], |kva| kva.write_u64(16, 0xfeed)).unwrap().unwrap();
    assert_eq!(pages[0].direct().unwrap().read_u64(16).unwrap(), 0xfeed);
    let h = lw.alloc(&pages[0]).unwrap();
    assert_eq!(h.kva().unwrap().read_u64(16).unwrap(), 0xfeed);
    drop(h);
    let st = lw.stats();
    assert_eq!((st.per_cpu[1].misses, st.per_cpu[1].hits, st.per_cpu[1].allocs), (1, 2, 3), "{st}");
    assert_eq!((st.per_cpu[1].mapped, st.per_cpu[1].cached), (1, 1), "{st}");
    assert_eq!(lw.mmu().stats().enters, 1);
    // The closure's own result comes back inside `Ok`.
    assert_eq!(cpu.map_local(&pages[1], |kva| kva.len()).unwrap(), system_page_size());
    assert_eq!(lw.check_consistency(), Ok(0));
}

/// Nested calls on one page and a handle held across them share one entry,
/// whose count goes back to zero only when the last is done.
fn nests_and_shares_entries_with_handles(b: Backend) {
    let mem = b.phys(8);
    let pages = stamped_pages(&mem, 2);
    let lw = system(b, &mem, 8, 1, 4, 1);
    let cpu = lw.bind(0).unwrap();
    let (p0, p1) = (pages[0].pfn().0, pages[1].pfn().0);
    let h = lw.alloc(&pages[0]).unwrap();
    cpu.map_local(&pages[0], |outer| {
        cpu.map_local(&pages[1], |other| {
            cpu.map_local(&pages[0], |inner| {
                check_stamps(&inner, p0);
                check_stamps(&outer, p0);
                check_stamps(&other, p1);
                assert_eq!(inner.as_ptr(), outer.as_ptr(), "one entry, one address on one CPU");
                assert_eq!(lw.stats().per_cpu[0].cached, 0, "everything in use");
            })
        })
    })
    .unwrap()
    .unwrap()
    .unwrap();
    assert_eq!(lw.stats().per_cpu[0].cached, 1, "page 1 unused; page 0 still held by the handle");
    check_stamps(&h.kva().unwrap(), p0);
    // Handles dropped and made inside the closure: the handle made before
    // goes first, the call's reference next, the handle made inside last.
    let made = cpu
        .map_local(&pages[0], |kva| {
            drop(h);
            check_stamps(&kva, p0);
            lw.alloc(&pages[0]).unwrap()
        })
        .unwrap();
    assert_eq!(lw.stats().per_cpu[0].cached, 1, "page 0 held by the handle made inside");
    check_stamps(&made.kva().unwrap(), p0);
    drop(made);
    assert_eq!(lw.stats().per_cpu[0].cached, 2);
    assert_eq!(lw.mmu().stats().enters, 2);
    assert_eq!(lw.check_consistency(), Ok(0));
    lw.reclaim();
    assert_eq!(lw.mmu().stats().mapped, 0, "nothing left referenced");
}

/// A panic inside the closure unwinds through `map_local`, which gives its
/// reference back: the entry is cached and unused after, and reclaim
/// unmaps it.
fn panic_in_the_closure_gives_the_reference_back(b: Backend) {
    let mem = b.phys(8);
    let pages = stamped_pages(&mem, 1);
    let lw = system(b, &mem, 8, 1, 4, 1);
    let cpu = lw.bind(0).unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| {
        cpu.map_local(&pages[0], |kva| {
            check_stamps(&kva, pages[0].pfn().0);
            panic!("inside map_local");
        })
    }));
    assert!(r.is_err(), "the panic reaches the caller");
    let st = lw.stats();
    assert_eq!((st.per_cpu[0].mapped, st.per_cpu[0].cached), (1, 1), "{st}");
    assert_eq!(lw.check_consistency(), Ok(0));
    // The CPU is still usable, and the entry is the same mapping.
    cpu.map_local(&pages[0], |kva| check_stamps(&kva, pages[0].pfn().0)).unwrap();
    assert_eq!(lw.stats().per_cpu[0].hits, 1);
    lw.reclaim();
    assert_eq!(lw.mmu().stats().mapped, 0, "the entry was unused: reclaim unmapped it");
}

/// A page of other memory, and a full window: the error, and the closure
/// never runs; the system works afterwards.
fn errors_come_before_the_closure_runs(b: Backend) {
    let mem = b.phys(8);
    let other = b.phys(1);
    let pages = stamped_pages(&mem, 3);
    let foreign = other.alloc_page().unwrap();
    let lw = system(b, &mem, 2, 1, 4, 1);
    let cpu = lw.bind(0).unwrap();
    let ran = AtomicBool::new(false);
    let run = |_kva: lwbuf::Kaddr<'_>| ran.store(true, Ordering::Relaxed);
    assert!(matches!(cpu.map_local(&foreign, run), Err(Error::ForeignPage)));
    let held: Vec<_> = pages[..2].iter().map(|p| lw.alloc(p).unwrap()).collect();
    assert!(matches!(cpu.map_local(&pages[2], run), Err(Error::WindowFull { requested: 1, capacity: 2 })));
    assert!(!ran.load(Ordering::Relaxed), "the closure ran after an error");
    drop(held);
    cpu.map_local(&pages[2], |kva| check_stamps(&kva, pages[2].pfn().0)).expect("room once a handle is gone");
    assert_eq!(lw.check_consistency(), Ok(0));
}

/// Two threads bound to two CPUs map the same pages at once, each in its
/// own CPU's cache, and every read is its frame's.
fn two_cpus_at_once(b: Backend) {
    let rounds = if cfg!(miri) { 20 } else { 2000 };
    let mem = b.phys(16);
    let pages = stamped_pages(&mem, 8);
    let lw = system(b, &mem, 8, 2, 2, 1);
    thread::scope(|s| {
        for c in 0..2 {
            let (lw, pages) = (&lw, &pages);
            s.spawn(move || {
                let cpu = lw.bind(c).unwrap();
                for i in 0..rounds {
                    let p = &pages[(i * 3 + c) % pages.len()];
                    cpu.map_local(p, |kva| check_stamps(&kva, p.pfn().0)).unwrap();
                }
            });
        }
    });
    let st = lw.stats();
    assert_eq!(st.total.allocs, 2 * rounds as u64, "{st}");
    assert_eq!(st.total.hits + st.total.misses, st.total.allocs);
    assert_eq!(lw.check_consistency(), Ok(0));
    lw.reclaim();
    assert_eq!(lw.mmu().stats().mapped, 0);
}

/// With a granule of 4 frames the pages of a granule share one mapping:
/// one miss, three hits; the memory's last granule is short (6 frames)
/// and maps just its 2.
fn granule_pages_share_one_mapping(b: Backend) {
    let mem = b.phys(6);
    let run = stamped_run(&mem, 6);
    let lw = system(b, &mem, 8, 1, 4, 4);
    let cpu = lw.bind(0).unwrap();
    for p in &run[..4] {
        cpu.map_local(p, |kva| check_stamps(&kva, p.pfn().0)).unwrap();
    }
    let st = lw.stats();
    assert_eq!((st.total.misses, st.total.hits), (1, 3), "{st}");
    assert_eq!(lw.mmu().stats().pages_entered, 4);
    for p in &run[4..] {
        cpu.map_local(p, |kva| check_stamps(&kva, p.pfn().0)).unwrap();
    }
    let st = lw.stats();
    assert_eq!((st.total.misses, st.total.hits), (2, 4), "{st}");
    assert_eq!(lw.mmu().stats().pages_entered, 6, "the short last granule maps 2 frames");
    assert_eq!(lw.check_consistency(), Ok(0));
}

/// `max_excess(0)`: nothing stays cached after a call (every call maps and
/// the release unmaps); `usize::MAX`: everything stays.
fn extreme_excess_limits(b: Backend) {
    let mem = b.phys(8);
    let pages = stamped_pages(&mem, 4);
    let lw = system(b, &mem, 4, 1, 0, 1);
    let cpu = lw.bind(0).unwrap();
    for _ in 0..3 {
        for p in &pages {
            cpu.map_local(p, |kva| check_stamps(&kva, p.pfn().0)).unwrap();
        }
    }
    let st = lw.stats();
    assert_eq!((st.total.misses, st.total.hits, st.total.mapped), (12, 0, 0), "{st}");
    drop(cpu);
    let lw = system(b, &mem, 4, 1, usize::MAX, 1);
    let cpu = lw.bind(0).unwrap();
    for _ in 0..3 {
        for p in &pages {
            cpu.map_local(p, |kva| check_stamps(&kva, p.pfn().0)).unwrap();
        }
    }
    let st = lw.stats();
    assert_eq!((st.total.misses, st.total.hits, st.total.cached), (4, 8, 4), "{st}");
    assert_eq!(lw.check_consistency(), Ok(0));
}

thread_local! {
    static GUARD: RefCell<Option<CpuGuard<'static>>> = const { RefCell::new(None) };
    static BETWEEN: RefCell<RunOnDrop> = const { RefCell::new(RunOnDrop(None)) };
}

/// A guard kept in a thread-local outlives the thread's bindings, which
/// are given back by an earlier thread-local destructor at its exit; by
/// the time a later destructor uses the guard, another thread may own its
/// CPU. `map_local` then says `NotBound` and never runs the closure, while
/// the CPU's new owner maps through it undisturbed.
fn guard_outliving_its_binding_is_not_bound(b: Backend) {
    let mem: &'static PhysMem = leak(b.phys(16));
    let pages: &'static Vec<lwbuf::Page> = leak(stamped_pages(mem, 4));
    let lw: &'static Lwbufs = leak(system(b, mem, 8, 2, 2, 1));
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (bound_tx, bound_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let other = thread::spawn(move || {
        go_rx.recv().unwrap();
        let cpu = lw.bind(1).expect("CPU 1 given back by the exiting thread");
        bound_tx.send(()).unwrap();
        done_rx.recv().unwrap();
        for p in pages.iter() {
            cpu.map_local(p, |kva| check_stamps(&kva, p.pfn().0)).unwrap();
        }
    });
    let ran: &'static AtomicBool = leak(AtomicBool::new(false));
    let result = thread::spawn(move || {
        let (result_tx, result_rx) = mpsc::channel();
        // Registration order = reverse destruction order: GUARD, then
        // BETWEEN, then the library's bindings (at the first bind).
        GUARD.with(|_| ());
        BETWEEN.with(|slot| {
            slot.borrow_mut().0 = Some(Box::new(move || {
                assert_eq!(lw.current_cpu(), None, "the bindings are given back first");
                go_tx.send(()).unwrap();
                bound_rx.recv().unwrap();
                let r = GUARD.with(|g| {
                    let g = g.borrow();
                    let cpu = g.as_ref().expect("the guard is still there");
                    cpu.map_local(&pages[0], |_| ran.store(true, Ordering::Relaxed)).map(|_| ())
                });
                result_tx.send(r).unwrap();
                done_tx.send(()).unwrap();
            }))
        });
        let g = lw.bind(1).unwrap();
        g.map_local(&pages[1], |kva| check_stamps(&kva, pages[1].pfn().0)).unwrap();
        GUARD.with(|s| *s.borrow_mut() = Some(g));
        result_rx
    })
    .join()
    .unwrap()
    .recv()
    .unwrap();
    assert!(matches!(result, Err(Error::NotBound)), "{result:?}");
    assert!(!ran.load(Ordering::Relaxed), "the closure ran on a CPU the thread no longer holds");
    other.join().unwrap();
    assert_eq!(lw.check_consistency(), Ok(0));
}
