//! Every misuse of the public API gets a clear error, never a panic: one
//! test per row of the README's misuse table (the table is in the module
//! docs of each test, in the same order). Each checks the exact `Error`
//! variant and its fields, and that the system still works afterwards.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use lwbuf::{
    system_page_size, Backing, CancelToken, Error, Lwbufs, Mmu, ModelMmu, Page, Pfn, PhysMem, SfPool, Slot, Wait,
    Window, MAX_BINDINGS_PER_THREAD, MAX_CPUS, MAX_REGION_BYTES,
};

#[macro_use]
#[path = "common/backend.rs"]
mod backend;
use backend::{Backend, BACKENDS};

/// Wait until a thread sleeps in the pool (a liveness watchdog, not a
/// timing assertion: a minute means something is broken).
#[track_caller]
fn until_a_waiter_sleeps(pool: &SfPool) {
    let t = Instant::now();
    while pool.stats().waiters == 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "no thread ever waited");
        thread::yield_now();
    }
}

#[track_caller]
fn config<T: std::fmt::Debug>(r: lwbuf::Result<T>, what: &str) {
    match r {
        Err(Error::Config { what: w, why }) => {
            assert_eq!(w, what, "{why}");
            assert!(!why.is_empty());
        }
        other => panic!("expected Config {{ what: {what:?} }}, got {other:?}"),
    }
}

/// `alloc`, `alloc_run`, `poll` with no CPU bound: `NotBound`.
#[test]
fn alloc_with_no_bound_cpu() {
    for &b in BACKENDS {
        let mem = b.phys(8);
        let lw = Lwbufs::builder(b.mmu(&mem, 8)).cpus(2).build().unwrap();
        let run = mem.alloc_run(2).unwrap();
        assert!(matches!(lw.alloc(&run[0]), Err(Error::NotBound)));
        assert!(matches!(lw.alloc_run(&run), Err(Error::NotBound)));
        assert!(matches!(lw.poll(), Err(Error::NotBound)));
        assert_eq!((lw.stats().total.allocs, lw.mmu().stats().enters), (0, 0));
    }
}

/// `Lwbuf::kva` on a thread with no CPU bound: `NotBound`; the handle stays
/// good and drops fine there.
#[test]
fn kva_with_no_bound_cpu() {
    for &b in BACKENDS {
        let mem = b.phys(8);
        let lw = Lwbufs::builder(b.mmu(&mem, 8)).cpus(2).build().unwrap();
        let page = mem.alloc_page().unwrap();
        let g = lw.bind(0).unwrap();
        let h = lw.alloc(&page).unwrap();
        drop(g);
        assert!(matches!(h.kva(), Err(Error::NotBound)));
        let h = thread::scope(|s| s.spawn(move || (matches!(h.kva(), Err(Error::NotBound)), h)).join().unwrap());
        assert!(h.0);
        drop(h);
        assert_eq!(lw.check_consistency(), Ok(0));
    }
}

/// A page of another `PhysMem`, to every mapper: `ForeignPage`.
#[test]
fn page_of_another_physmem() {
    for &b in BACKENDS {
        let mem = b.phys(8);
        let other = b.phys(8);
        let lw = Lwbufs::builder(b.mmu(&mem, 8)).cpus(1).build().unwrap();
        let pool = SfPool::builder(b.mmu(&mem, 8)).build().unwrap();
        let foreign = other.alloc_page().unwrap();
        let run = mem.alloc_run(2).unwrap();
        let mixed = [run[0].clone(), foreign.clone()];
        let _g = lw.bind(0).unwrap();
        assert!(matches!(lw.alloc(&foreign), Err(Error::ForeignPage)));
        assert!(matches!(lw.alloc_run(&mixed), Err(Error::ForeignPage)));
        assert!(matches!(pool.alloc(&foreign, Wait::NoWait), Err(Error::ForeignPage)));
        assert!(matches!(pool.alloc_run(&mixed, Wait::Forever), Err(Error::ForeignPage)));
        assert!(matches!(pool.alloc_all(&mixed, 1, Wait::Forever), Err(Error::ForeignPage)));
        // Same frame number, other memory: still foreign.
        assert_eq!(foreign.pfn(), Pfn(0));
        assert!(foreign != run[0]);
        assert_eq!((lw.mmu().stats().enters, pool.stats().used), (0, 0));
    }
}

/// `bind` twice on one thread: `AlreadyBound { cpu }`, the CPU it holds.
#[test]
fn double_binding_on_one_thread() {
    let mem = Backend::Model.phys(4);
    let lw = Lwbufs::builder(Backend::Model.mmu(&mem, 4)).cpus(4).build().unwrap();
    let g = lw.bind(1).unwrap();
    assert!(matches!(lw.bind(1), Err(Error::AlreadyBound { cpu: 1 })));
    assert!(matches!(lw.bind(3), Err(Error::AlreadyBound { cpu: 1 })));
    assert_eq!(lw.current_cpu(), Some(1));
    drop(g);
    drop(lw.bind(3).unwrap());
}

/// `bind` of a CPU another live thread holds: `CpuBusy { cpu }`.
#[test]
fn binding_a_cpu_another_thread_holds() {
    let mem = Backend::Model.phys(4);
    let lw = Lwbufs::builder(Backend::Model.mmu(&mem, 4)).cpus(4).build().unwrap();
    let bar = Barrier::new(2);
    thread::scope(|s| {
        s.spawn(|| {
            let _g = lw.bind(2).unwrap();
            bar.wait();
            bar.wait();
        });
        bar.wait();
        assert!(matches!(lw.bind(2), Err(Error::CpuBusy { cpu: 2 })));
        assert_eq!(lw.current_cpu(), None, "a refused bind binds nothing");
        bar.wait();
    });
    drop(lw.bind(2).expect("free once its thread let go"));
}

/// A CPU id at or beyond the count: `NoSuchCpu { cpu, ncpus }`.
#[test]
fn cpu_id_out_of_range() {
    let mem = Backend::Model.phys(4);
    let lw = Lwbufs::builder(Backend::Model.mmu(&mem, 4)).cpus(4).build().unwrap();
    assert!(matches!(lw.bind(4), Err(Error::NoSuchCpu { cpu: 4, ncpus: 4 })));
    assert!(matches!(lw.bind(usize::MAX), Err(Error::NoSuchCpu { cpu: usize::MAX, ncpus: 4 })));
    assert!(matches!(lw.bind_pinned(99), Err(Error::NoSuchCpu { cpu: 99, ncpus: 4 })));
}

/// CPUs of more than `MAX_BINDINGS_PER_THREAD` systems on one thread:
/// `Config { what: "binding" }`.
#[test]
fn too_many_systems_bound_on_one_thread() {
    let mem = Backend::Model.phys(4);
    let systems: Vec<Lwbufs> = (0..=MAX_BINDINGS_PER_THREAD)
        .map(|_| Lwbufs::builder(Backend::Model.mmu(&mem, 2)).cpus(1).build().unwrap())
        .collect();
    let guards: Vec<_> = systems[1..].iter().map(|s| s.bind(0).unwrap()).collect();
    config(systems[0].bind(0), "binding");
    drop(guards);
    drop(systems[0].bind(0).unwrap());
}

/// Every slot of the pool mapped and in use, with each wait mode.
#[test]
fn full_window_for_sf_buf_with_each_wait_mode() {
    for &b in BACKENDS {
        let mem = b.phys(16);
        let pool = SfPool::builder(b.mmu(&mem, 4)).build().unwrap();
        let pages: Vec<Page> = (0..8).map(|_| mem.alloc_page().unwrap()).collect();
        let held: Vec<_> = pages[..4].iter().map(|p| pool.alloc(p, Wait::NoWait).unwrap()).collect();

        // NoWait: at once.
        assert!(matches!(pool.alloc(&pages[4], Wait::NoWait), Err(Error::WouldBlock)));
        assert!(matches!(pool.alloc_all(&pages[4..6], 1, Wait::NoWait), Err(Error::WouldBlock)));
        // Timeout: after (at least) the timeout.
        let t = Instant::now();
        assert!(matches!(pool.alloc(&pages[4], Wait::Timeout(Duration::from_millis(20))), Err(Error::TimedOut)));
        assert!(t.elapsed() >= Duration::from_millis(20));
        // Cancel: when the token is cancelled (already cancelled: at once).
        let token = CancelToken::new();
        thread::scope(|s| {
            let w = s.spawn(|| pool.alloc(&pages[4], Wait::Cancel(&token)).map(|_| ()));
            until_a_waiter_sleeps(&pool);
            token.cancel();
            assert!(matches!(w.join().unwrap(), Err(Error::Cancelled)));
        });
        assert!(matches!(pool.alloc(&pages[4], Wait::Cancel(&token)), Err(Error::Cancelled)));
        // Forever: no error; it sleeps until a release makes room.
        thread::scope(|s| {
            let w = s.spawn(|| pool.alloc(&pages[4], Wait::Forever));
            until_a_waiter_sleeps(&pool);
            let mut held = held;
            held.pop();
            let got = w.join().unwrap().expect("woken by the release");
            assert_eq!(got.page().pfn(), pages[4].pfn());
            // Every slot in use again.
            held.push(got);
            // More pages than the window has slots: WindowFull at once,
            // whatever the mode (waiting could never help).
            let all: Vec<Page> = pages.to_vec();
            for how in [Wait::NoWait, Wait::Forever] {
                let e = pool.alloc_all(&all, 1, how).unwrap_err();
                assert!(matches!(e, Error::WindowFull { requested: 8, capacity: 4 }), "{e:?}");
            }
            // Closed: every waiter and every later wait.
            let w = s.spawn(|| pool.alloc(&pages[5], Wait::Forever).map(|_| ()));
            until_a_waiter_sleeps(&pool);
            pool.close();
            assert!(matches!(w.join().unwrap(), Err(Error::Closed)));
            assert!(matches!(pool.alloc(&pages[6], Wait::Forever), Err(Error::Closed)));
            drop(held);
        });
    }
}

/// Every lwbuf slot held by a live handle: `WindowFull`; the mapping
/// budget used up by live handles: `MapLimit`. (The kernel's own wall,
/// `Sys { op: "mmap(enter)" }` with `ENOMEM`, is in `tests/lwbuf_wall.rs`.)
#[test]
fn full_window_for_lwbuf() {
    for &b in BACKENDS {
        let mem = b.phys(16);
        let pages: Vec<Page> = (0..6).map(|_| mem.alloc_page().unwrap()).collect();
        let lw = Lwbufs::builder(b.mmu(&mem, 4)).cpus(2).max_excess(4).build().unwrap();
        let _g = lw.bind(0).unwrap();
        let held: Vec<_> = pages[..4].iter().map(|p| lw.alloc(p).unwrap()).collect();
        let e = lw.alloc(&pages[4]).unwrap_err();
        assert!(matches!(e, Error::WindowFull { requested: 1, capacity: 4 }), "{e:?}");
        assert!(e.to_string().contains("window full"), "{e}");
        let run = mem.alloc_run(5).unwrap();
        let e = lw.alloc_run(&run).unwrap_err();
        assert!(matches!(e, Error::WindowFull { requested: 5, capacity: 4 }), "a run longer than the window: {e:?}");
        drop(held);
        drop(lw.alloc(&pages[4]).expect("room again: a cached entry is evicted"));

        let lw = Lwbufs::builder(b.mmu(&mem, 8)).cpus(1).map_budget(3).build().unwrap();
        let _g = lw.bind(0).unwrap();
        let held: Vec<_> = pages[..3].iter().map(|p| lw.alloc(p).unwrap()).collect();
        let e = lw.alloc(&pages[3]).unwrap_err();
        assert!(matches!(e, Error::MapLimit { budget: 3 }), "{e:?}");
        drop(held);
        drop(lw.alloc(&pages[3]).expect("under the budget once a cached mapping is evicted"));
        let lw = Lwbufs::builder(b.mmu(&mem, 8)).cpus(1).map_budget(0).build().unwrap();
        let _g = lw.bind(0).unwrap();
        assert!(matches!(lw.alloc(&pages[0]), Err(Error::MapLimit { budget: 0 })));
    }
}

/// Zero or absurd configurations: `Config { what }` naming the setting (or
/// `NoDirectMap` for a model MMU over memory without a direct map).
#[test]
#[cfg_attr(miri, ignore = "most of the configurations checked are of memfd memory and the window")]
fn zero_or_absurd_configurations() {
    let page = system_page_size();
    config(PhysMem::builder().build(), "frames");
    config(PhysMem::builder().frames(0).build(), "frames");
    for bad in [0, 1, page / 2, page + 1, 3 * page] {
        config(PhysMem::builder().frames(1).frame_size(bad).build(), "frame_size");
    }
    config(PhysMem::builder().frames(MAX_REGION_BYTES / page + 1).build(), "frames");
    config(PhysMem::builder().frames(usize::MAX).build(), "frames");
    config(PhysMem::builder().frames(usize::MAX).backing(Backing::Heap).build(), "frames");
    config(PhysMem::builder().frames(1).name("a\0b").build(), "name");

    let mem = PhysMem::builder().frames(4).build().unwrap();
    config(Window::builder(&mem).slots(0).build(), "slots");
    config(Window::builder(&mem).slots(usize::MAX).build(), "slots");
    config(Window::builder(&mem).slots(MAX_REGION_BYTES / page + 1).build(), "slots");
    let heap = PhysMem::builder().frames(4).backing(Backing::Heap).build().unwrap();
    config(Window::builder(&heap).build(), "backing");
    config(ModelMmu::new(&heap, 0), "slots");
    let no_dmap = PhysMem::builder().frames(4).direct_map(false).build().unwrap();
    assert!(matches!(ModelMmu::new(&no_dmap, 4), Err(Error::NoDirectMap)));

    let mmu = || -> Arc<dyn Mmu> { Arc::new(ModelMmu::new(&heap, 4).unwrap()) };
    config(Lwbufs::builder(mmu()).cpus(0).build(), "cpus");
    config(Lwbufs::builder(mmu()).cpus(MAX_CPUS + 1).build(), "cpus");
    config(Lwbufs::builder(mmu()).cpus(usize::MAX).build(), "cpus");
    config(SfPool::builder(mmu()).shards(0).build(), "shards");
    config(SfPool::builder(mmu()).shards((1 << 16) + 1).build(), "shards");
    // Extreme but meaningful values are accepted.
    assert!(Lwbufs::builder(mmu()).cpus(MAX_CPUS).max_excess(usize::MAX).map_budget(usize::MAX).build().is_ok());
    assert!(SfPool::builder(mmu()).shards(1).max_excess(0).build().is_ok());
}

/// Bytes of RAM plus swap, from `/proc/meminfo` (`None` if unreadable).
fn memory_and_swap_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((kib("MemTotal:")? + kib("SwapTotal:")?) * 1024)
}

/// A window or pool whose bookkeeping the allocator refuses is
/// `Config { what: "slots" }` saying how many bytes, never an abort of the
/// process on a failed allocation. Then the system still builds what fits.
#[test]
#[cfg_attr(miri, ignore = "allocations of terabytes")]
fn bookkeeping_too_large_to_allocate() {
    // 2^45 slots of a model window: a slot table of 256 TiB, more than the
    // address space of a process, refused on any machine.
    let heap = PhysMem::builder().frames(4).backing(Backing::Heap).build().unwrap();
    config(ModelMmu::new(&heap, 1 << 45), "slots");
    config(ModelMmu::new(&heap, usize::MAX / 2), "slots");
    assert!(ModelMmu::new(&heap, 4).is_ok(), "a small model window after the refusals");

    // A real window of 2^32 slots (16 TiB of address space, under the
    // 64 TiB limit) has a 32 GiB slot table, and a pool over a window of
    // 2^28 slots 32 GiB of pin rows (the window's own table: 2 GiB).
    // Whether the allocator refuses those depends on the machine, so each
    // is checked only where the kernel's heuristic overcommit (mode 0)
    // refuses an allocation larger than RAM plus swap. Elsewhere an
    // accepted pool would fill gigabytes of entries.
    let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").ok();
    let ram = memory_and_swap_bytes();
    let refused = |bytes: u64| {
        overcommit.as_deref().map(str::trim) == Some("0") && ram.is_some_and(|r| r.saturating_add(r / 8) < bytes)
    };
    let mem = PhysMem::builder().frames(4).build().unwrap();
    if refused(32 << 30) {
        config(Window::builder(&mem).slots(1 << 32).build(), "slots");
        let win = Arc::new(Window::builder(&mem).slots(1 << 28).build().expect("a 2 GiB slot table"));
        match SfPool::builder(win.clone()).build() {
            Err(Error::Config { what: "slots", why }) => {
                assert!(why.contains("pin rows") && why.contains("34359738368 bytes"), "{why}")
            }
            other => panic!("expected the pin rows refused, got {other:?}"),
        }
        // The failed build gave the window back: a pool of it can be built
        // again (and fails the same way), and a smaller window serves.
        assert!(matches!(SfPool::builder(win).build(), Err(Error::Config { what: "slots", .. })));
    } else {
        println!(
            "skipping the real window and pool cases: overcommit mode {:?}, RAM + swap {ram:?} bytes: \
             a 32 GiB allocation may be accepted here",
            overcommit.as_deref().map(str::trim)
        );
    }
    let pool = SfPool::builder(Arc::new(Window::builder(&mem).slots(4).build().unwrap())).build().unwrap();
    let page = mem.alloc_page().unwrap();
    let sf = pool.alloc(&page, Wait::NoWait).unwrap();
    sf.kva().write_u64(0, 7).unwrap();
    assert_eq!(page.direct().unwrap().read_u64(0).unwrap(), 7);
}

/// Copies outside a mapping, a frame or the memory: `OutOfBounds`.
#[test]
fn out_of_bounds_kaddr_access() {
    for &b in BACKENDS {
        let mem = b.phys(4);
        let fs = mem.frame_size();
        let lw = Lwbufs::builder(b.mmu(&mem, 4)).cpus(1).build().unwrap();
        let pool = SfPool::builder(b.mmu(&mem, 4)).build().unwrap();
        let run = mem.alloc_run(2).unwrap();
        let _g = lw.bind(0).unwrap();
        let h = lw.alloc(&run[0]).unwrap();
        let k = h.kva().unwrap();
        let mut buf = [0u8; 16];
        assert!(
            matches!(k.read_at(fs - 8, &mut buf), Err(Error::OutOfBounds { offset, len: 16, size }) if offset == fs - 8 && size == fs)
        );
        assert!(matches!(k.write_at(fs, &[1]), Err(Error::OutOfBounds { len: 1, .. })));
        assert!(matches!(k.read_u64(fs - 7), Err(Error::OutOfBounds { len: 8, .. })));
        assert!(matches!(k.write_u64(usize::MAX, 0), Err(Error::OutOfBounds { offset: usize::MAX, .. })));
        k.write_u64(fs - 8, 7).expect("the last word is inside");
        let r = lw.alloc_run(&run).unwrap();
        let rk = r.kva().unwrap();
        assert_eq!(rk.len(), 2 * fs);
        assert!(matches!(rk.read_u64(2 * fs), Err(Error::OutOfBounds { size, .. }) if size == 2 * fs));
        let sf = pool.alloc(&run[1], Wait::NoWait).unwrap();
        assert!(matches!(sf.kva().read_u64(fs), Err(Error::OutOfBounds { .. })));
        let d = run[0].direct().unwrap();
        assert!(matches!(d.read_u64(fs), Err(Error::OutOfBounds { .. })));
        assert!(matches!(mem.read_frame(Pfn(4), 0, &mut buf), Err(Error::OutOfBounds { .. })));
        assert!(matches!(mem.write_frame(Pfn(usize::MAX), 0, &buf), Err(Error::OutOfBounds { .. })));
        assert!(matches!(mem.read_frame(Pfn(0), fs - 1, &mut buf), Err(Error::OutOfBounds { .. })));
        assert_eq!(k.read_u64(fs - 8).unwrap(), 7, "nothing was written out of bounds");
    }
    // No direct map: NoDirectMap rather than a view. Only memfd memory can
    // lack one, and Miri cannot create a memfd.
    if cfg!(miri) {
        return;
    }
    let mem = PhysMem::builder().frames(2).direct_map(false).build().unwrap();
    let p = mem.alloc_page().unwrap();
    assert!(matches!(p.direct(), Err(Error::NoDirectMap)));
    assert!(matches!(mem.read_frame(Pfn(0), 0, &mut [0; 8]), Err(Error::NoDirectMap)));
}

/// A run whose frames are not contiguous (or that is empty):
/// `Config { what: "pages" }`.
#[test]
fn non_contiguous_run() {
    for &b in BACKENDS {
        let mem = b.phys(8);
        let lw = Lwbufs::builder(b.mmu(&mem, 8)).cpus(1).build().unwrap();
        let pool = SfPool::builder(b.mmu(&mem, 8)).build().unwrap();
        let run = mem.alloc_run(4).unwrap();
        let _g = lw.bind(0).unwrap();
        let gap = [run[0].clone(), run[2].clone()];
        let backwards = [run[1].clone(), run[0].clone()];
        let twice = [run[0].clone(), run[0].clone()];
        for bad in [&gap[..], &backwards[..], &twice[..], &[]] {
            config(lw.alloc_run(bad), "pages");
            config(pool.alloc_run(bad, Wait::NoWait), "pages");
        }
        // `alloc_all` takes any pages: it splits them into runs itself.
        assert_eq!(pool.alloc_all(&gap, 4, Wait::NoWait).unwrap().len(), 2);
        assert_eq!((lw.stats().total.allocs, lw.mmu().stats().enters), (0, 0));
    }
}

/// Frames used up: `OutOfFrames`, with what is left.
#[test]
fn out_of_frames() {
    let mem = Backend::Model.phys(4);
    let _a = mem.alloc_run(3).unwrap();
    assert!(matches!(mem.alloc_run(2), Err(Error::OutOfFrames { requested: 2, free: 1, largest_run: 1 })));
    let _b = mem.alloc_page().unwrap();
    assert!(matches!(mem.alloc_page(), Err(Error::OutOfFrames { requested: 1, free: 0, largest_run: 0 })));
}

/// The `Mmu` seam's own checks (an `unsafe` API, but still an error, not
/// memory corruption): slots or frames out of range.
#[test]
fn mmu_calls_outside_the_window() {
    for &b in BACKENDS {
        let mem = b.phys(4);
        let mmu = b.mmu(&mem, 4);
        // SAFETY: rejected before anything is mapped (that is the point).
        let r = unsafe { mmu.enter(Slot(4), Pfn(0), 1) };
        config(r, "slot range");
        // SAFETY: as above.
        let r = unsafe { mmu.enter(Slot(0), Pfn(3), 2) };
        config(r, "frame range");
        // SAFETY: as above.
        let r = unsafe { mmu.remove(Slot(3), 2) };
        config(r, "slot range");
        // SAFETY: as above.
        let r = unsafe { mmu.enter(Slot(0), Pfn(0), 0) };
        config(r, "slot range");
        assert_eq!(mmu.stats().mapped, 0);
    }
}
