//! Threads that panic or exit while holding CPUs, lwbuf handles and sf_bufs.
//!
//! - A thread that panics while holding lwbuf handles (its own, and one made
//!   on another CPU whose address it took on its CPU), sf_bufs (single and
//!   run) and its CPU guard: unwinding drops them, in either order (handles
//!   first, on the bound CPU; or the guard first, then the handles with no
//!   CPU). The system is consistent afterwards, the message the unwinding
//!   sent to another CPU is applied, the sf_bufs are free (a waiter blocked
//!   on them wakes), and the panicking thread's CPU can be bound again.
//! - A thread that exits without unbinding (its guard `mem::forget`-ten):
//!   its CPU can be bound by another thread, and a message stranded in its
//!   mailbox is applied by the next sender, by `reclaim`, or by the CPU's
//!   next owner.
//!
//! Each test runs on the real window and on the model MMU.

use std::sync::{mpsc, Barrier};
use std::thread;

use lwbuf::{Error, Lwbufs, Page, PhysMem, Reclaim, SfPool, Wait};

#[macro_use]
#[path = "common/backend.rs"]
mod backend;
use backend::Backend;

on_both_backends!(
    panic_with_handles_dropped_before_the_guard,
    panic_with_the_guard_dropped_before_the_handles,
    panic_holding_every_sf_buf_wakes_a_waiter,
    forgotten_guard_message_applied_by_the_next_sender,
    forgotten_guard_message_applied_by_reclaim,
    forgotten_guard_message_applied_by_the_next_owner,
);

struct Rig {
    mem: PhysMem,
    pages: Vec<Page>,
    lw: Lwbufs,
    pool: SfPool,
}

const FRAMES: usize = 32;

fn rig(b: Backend) -> Rig {
    let mem = b.phys(FRAMES);
    let pages = mem.alloc_run(FRAMES).unwrap();
    for p in &pages {
        p.direct().unwrap().write_u64(0, p.pfn().0 as u64).unwrap();
    }
    let lw = Lwbufs::builder(b.mmu(&mem, 64)).cpus(8).max_excess(4).reclaim(Reclaim::Strict).build().unwrap();
    let pool = SfPool::builder(b.mmu(&mem, 8)).max_excess(4).reclaim(Reclaim::Strict).build().unwrap();
    Rig { mem, pages, lw, pool }
}

impl Rig {
    /// Everything released and applied; every frame back once the pages go.
    #[track_caller]
    fn assert_clean(self) {
        let Rig { mem, pages, lw, pool } = self;
        assert_eq!(lw.check_consistency(), Ok(0), "references left");
        let st = lw.stats();
        assert!(st.per_cpu.iter().all(|c| c.mailbox == 0), "stranded messages:\n{st}");
        assert_eq!(st.total.decrefs_sent, st.total.decrefs_applied, "{st}");
        assert_eq!(st.total.mapped, st.mmu.enters - st.mmu.removes, "{st}");
        let ss = pool.stats();
        assert_eq!((ss.used, ss.waiters), (0, 0), "{ss}");
        assert_eq!(ss.mapped, ss.mmu.enters - ss.mmu.removes, "{ss}");
        lw.reclaim();
        pool.set_max_excess(0);
        assert_eq!(lw.stats().mmu.mapped, 0);
        assert_eq!(pool.stats().mmu.mapped, 0);
        drop((lw, pool));
        for p in &pages {
            assert_eq!(p.hold_count(), 1, "frame {} still held", p.pfn().0);
        }
        drop(pages);
        assert_eq!(mem.stats().free, FRAMES);
    }
}

/// Bind `cpu` on a fresh thread, allocate and read a page there, and let go.
#[track_caller]
fn usable_from_another_thread(lw: &Lwbufs, cpu: usize, page: &Page) {
    thread::scope(|s| {
        s.spawn(|| {
            let _g = lw.bind(cpu).unwrap_or_else(|e| panic!("CPU {cpu} not bindable again: {e}"));
            let h = lw.alloc(page).unwrap();
            assert_eq!(h.kva().unwrap().read_u64(0).unwrap(), page.pfn().0 as u64);
        })
        .join()
        .unwrap();
    });
}

fn panic_message(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| e.downcast_ref::<String>().cloned()).unwrap_or_default()
}

// === panics ===

/// The panicking thread holds, on CPU 3: two handles of its own (a page and
/// a run), a handle made on CPU 2 by the main thread whose address it took
/// on CPU 3 (mask {2, 3}), and two sf_bufs (a page and a run).
fn panic_holding(b: Backend, guard_first: bool) {
    let rig = rig(b);
    let (lw, pool, pages) = (&rig.lw, &rig.pool, &rig.pages);
    let g2 = lw.bind(2).unwrap();
    let from_main = lw.alloc(&pages[0]).unwrap();
    let r = thread::scope(|s| {
        s.spawn(move || {
            let from_main = from_main;
            // Locals drop in reverse order: with `guard_first` the guard is
            // moved to `late`, declared last, so it is dropped (unbinding
            // CPU 3) first; otherwise it stays in `early` and goes last.
            let mut early = Some(lw.bind(3).unwrap());
            let own = lw.alloc(&pages[1]).unwrap();
            let run = lw.alloc_run(&pages[4..8]).unwrap();
            assert_eq!(from_main.kva().unwrap().read_u64(0).unwrap(), 0);
            let sf = pool.alloc(&pages[9], Wait::NoWait).unwrap();
            let sf_run = pool.alloc_run(&pages[10..13], Wait::NoWait).unwrap();
            let late = if guard_first { early.take() } else { None };
            assert_eq!(lw.current_cpu(), Some(3));
            assert!(from_main.cpumask().contains(2) && from_main.cpumask().contains(3));
            let _keep = (&early, &own, &run, &sf, &sf_run, &late);
            panic!("boom while holding everything");
        })
        .join()
    });
    assert_eq!(panic_message(r.unwrap_err()), "boom while holding everything");

    // Unwinding dropped `from_main` on CPU 3 (or unbound): a decref message
    // went to CPU 2, which this thread holds and has not run since.
    let st = lw.stats();
    assert_eq!(st.per_cpu[2].mailbox, 1, "{st}");
    assert_eq!(lw.check_consistency(), Ok(1), "only CPU 2's entry is still referenced, until its owner runs");
    lw.poll().unwrap();
    assert_eq!(lw.stats().per_cpu[2].mailbox, 0);
    assert_eq!(lw.check_consistency(), Ok(0));
    assert_eq!(pool.stats().used, 0);
    drop(g2);

    usable_from_another_thread(lw, 3, &pages[1]);
    rig.assert_clean();
}

fn panic_with_handles_dropped_before_the_guard(b: Backend) {
    panic_holding(b, false);
}

fn panic_with_the_guard_dropped_before_the_handles(b: Backend) {
    panic_holding(b, true);
}

/// A thread holding every slot of the pool panics; a thread waiting
/// `Forever` for a slot is woken by the unwinding's releases.
fn panic_holding_every_sf_buf_wakes_a_waiter(b: Backend) {
    let rig = rig(b);
    let (pool, pages) = (&rig.pool, &rig.pages);
    let cap = pool.capacity();
    let bar = Barrier::new(2);
    let bar = &bar;
    thread::scope(|s| {
        let holder = s.spawn(move || {
            let all: Vec<_> = pages[..cap].iter().map(|p| pool.alloc(p, Wait::NoWait).unwrap()).collect();
            assert!(matches!(pool.alloc(&pages[cap], Wait::NoWait), Err(Error::WouldBlock)));
            bar.wait(); // the waiter may start
                        // Wait until it sleeps (a liveness wait, no time limit).
            while pool.stats().waiters == 0 {
                thread::yield_now();
            }
            let _keep = &all;
            panic!("boom holding the whole pool");
        });
        let waiter = s.spawn(move || {
            bar.wait();
            let sf = pool.alloc(&pages[cap], Wait::Forever).expect("woken by the unwinding releases");
            assert_eq!(sf.kva().read_u64(0).unwrap(), pages[cap].pfn().0 as u64);
        });
        assert_eq!(panic_message(holder.join().unwrap_err()), "boom holding the whole pool");
        waiter.join().unwrap();
    });
    assert!(pool.stats().waits >= 1);
    rig.assert_clean();
}

// === exits without unbinding ===

/// How a message stranded on a CPU whose thread exited without unbinding
/// gets applied.
#[derive(Clone, Copy, Debug)]
enum Drainer {
    /// The next message to that CPU: its sender sees the CPU unbound.
    NextSender,
    /// `Lwbufs::reclaim`.
    Reclaim,
    /// A thread that binds the CPU and calls into the library.
    NextOwner,
}

/// A thread binds CPU 5, allocates `own` there and takes the address of the
/// main thread's `from_main` there too, hands both to the main thread, and
/// waits. The main thread (CPU 0) drops `from_main`: a message to CPU 5,
/// which is bound, so it waits in the mailbox. Then the thread forgets its
/// guard and exits.
fn forgotten_guard(b: Backend, drainer: Drainer) {
    let rig = rig(b);
    let (lw, pages) = (&rig.lw, &rig.pages);
    let g0 = lw.bind(0).unwrap();
    let from_main = lw.alloc(&pages[0]).unwrap();
    let (tx, rx) = mpsc::channel();
    let bar = Barrier::new(2);
    let bar = &bar;
    thread::scope(|s| {
        let t = s.spawn(move || {
            let g = lw.bind(5).unwrap();
            assert_eq!(from_main.kva().unwrap().read_u64(0).unwrap(), 0);
            let own = lw.alloc(&pages[1]).unwrap();
            tx.send((from_main, own)).unwrap();
            bar.wait(); // the main thread drops `from_main` now
            bar.wait();
            std::mem::forget(g);
        });
        let (from_main, own) = rx.recv().unwrap();
        drop(from_main);
        assert_eq!(lw.stats().per_cpu[5].mailbox, 1, "CPU 5 is bound: the message waits");
        bar.wait();
        bar.wait();
        t.join().unwrap();
        // Exited without unbinding: the CPU is free for others...
        assert!(lw.stats().per_cpu[5].mailbox == 1, "...and its message is still there");
        match drainer {
            Drainer::NextSender => {
                // `own` lives on CPU 5 only; dropped on CPU 0 it is a message
                // to CPU 5, whose sender finds the CPU unbound and drains it.
                drop(own);
                assert_eq!(lw.stats().per_cpu[5].mailbox, 0);
            }
            Drainer::Reclaim => {
                lw.reclaim();
                assert_eq!(lw.stats().per_cpu[5].mailbox, 0);
                drop(own);
            }
            Drainer::NextOwner => {
                let own = s
                    .spawn(move || {
                        let _g = lw.bind(5).expect("the CPU of an exited thread is free");
                        lw.poll().unwrap();
                        assert_eq!(lw.stats().per_cpu[5].mailbox, 0);
                        // The handle is still good on its home CPU.
                        assert_eq!(own.kva().unwrap().read_u64(0).unwrap(), 1);
                        own
                    })
                    .join()
                    .unwrap();
                drop(own);
            }
        }
    });
    drop(rx);
    assert_eq!(lw.check_consistency(), Ok(0));
    drop(g0);
    usable_from_another_thread(lw, 5, &pages[2]);
    rig.assert_clean();
}

fn forgotten_guard_message_applied_by_the_next_sender(b: Backend) {
    forgotten_guard(b, Drainer::NextSender);
}

fn forgotten_guard_message_applied_by_reclaim(b: Backend) {
    forgotten_guard(b, Drainer::Reclaim);
}

fn forgotten_guard_message_applied_by_the_next_owner(b: Backend) {
    forgotten_guard(b, Drainer::NextOwner);
}
