//! The owned handles ([`OwnedLwbuf`], [`OwnedSfBuf`]) and the thread-lifetime
//! binding ([`Lwbufs::bind_for_thread`]): handles moved to and dropped on
//! other threads and CPUs, caches and pages dropped before the handles, every
//! drop order, and a tokio runtime whose tasks hold a handle across `.await`
//! and drop it on another worker. Every test runs on the real window and the
//! model MMU (`on_both_backends!`).

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use lwbuf::{Error, Lwbufs, OwnedLwbuf, OwnedSfBuf, Page, PhysMem, SfPool, Wait};

#[macro_use]
#[path = "common/backend.rs"]
mod backend;
use backend::{stamp, Backend};

// The owned handles are `Send + Sync + 'static`: they can be held across an
// `.await` in a spawned task and shared through an `Arc`.
const _: fn() = || {
    fn owned<T: Send + Sync + 'static>() {}
    owned::<OwnedLwbuf>();
    owned::<OwnedSfBuf>();
};

fn lwbufs(b: Backend, mem: &PhysMem, slots: usize, cpus: usize) -> Arc<Lwbufs> {
    Arc::new(Lwbufs::builder(b.mmu(mem, slots)).cpus(cpus).build().expect("Lwbufs"))
}

fn pool(b: Backend, mem: &PhysMem, slots: usize) -> Arc<SfPool> {
    Arc::new(SfPool::builder(b.mmu(mem, slots)).build().expect("SfPool"))
}

/// Every decref sent was applied, no handle is alive, the caches agree with
/// the MMU.
fn assert_settled(lw: &Lwbufs) {
    let st = lw.stats();
    assert_eq!(st.total.decrefs_sent + st.unbound_sent, st.total.decrefs_applied, "{st:?}");
    assert_eq!(lw.check_consistency(), Ok(0));
}

// === lwbuf ===

/// Allocated on CPU 0, moved into a thread bound to CPU 1, read there (CPU 1
/// joins the mask with an entry of its own) and dropped there: a local decref
/// on CPU 1 and one message to CPU 0, applied at CPU 0's next call.
fn lw_dropped_on_other_cpu(b: Backend) {
    let mem = b.phys(8);
    let lw = lwbufs(b, &mem, 8, 2);
    let page = mem.alloc_page().expect("page");
    stamp(&page);
    let cpu0 = lw.bind(0).expect("bind 0");
    let h = lw.alloc_owned(&page).expect("alloc_owned");
    assert_eq!(h.home_cpu(), 0);
    h.kva().expect("kva").write_u64(8, 0xfeed).expect("write");
    let lw1 = Arc::clone(&lw);
    let (cpus, word) = thread::spawn(move || {
        let _cpu1 = lw1.bind(1).expect("bind 1");
        let word = h.kva().expect("kva on CPU 1").read_u64(8).expect("read");
        let cpus: Vec<usize> = h.cpumask().iter().collect();
        drop(h);
        (cpus, word)
    })
    .join()
    .expect("thread");
    assert_eq!(word, 0xfeed);
    assert_eq!(cpus, [0, 1]);
    let st = lw.stats();
    assert_eq!(st.per_cpu[1].foreign, 1, "CPU 1 made an entry for the handle");
    assert_eq!(st.per_cpu[1].decrefs_sent, 1, "one message, to CPU 0");
    assert_eq!(st.per_cpu[0].mailbox, 1, "not applied before CPU 0's next call");
    lw.poll().expect("poll");
    assert_eq!(lw.stats().per_cpu[0].decrefs_applied, 1);
    assert_settled(&lw);
    drop(cpu0);
}

/// The user drops their `Arc` of the caches while an owned handle is alive:
/// the handle keeps the caches working, and its drop tears them down, giving
/// the window back (a new system can claim it) with nothing mapped or held.
fn lw_caches_dropped_first(b: Backend) {
    let mem = b.phys(8);
    let mmu = b.mmu(&mem, 8);
    let lw = Arc::new(Lwbufs::builder(Arc::clone(&mmu)).cpus(1).build().expect("Lwbufs"));
    let page = mem.alloc_page().expect("page");
    let h = {
        let _cpu = lw.bind(0).expect("bind");
        lw.alloc_owned(&page).expect("alloc_owned")
    };
    drop(lw);
    assert!(matches!(Lwbufs::builder(Arc::clone(&mmu)).build(), Err(Error::WindowClaimed)));
    {
        let _cpu = h.caches().bind(0).expect("bind through the handle");
        h.kva().expect("kva").write_u64(0, 7).expect("write");
    }
    assert_eq!(page.hold_count(), 2, "the user's page and the handle's clone");
    drop(h);
    assert_eq!(page.hold_count(), 1);
    assert_eq!(mmu.stats().mapped, 0, "the caches unmapped everything when the handle dropped them");
    Lwbufs::builder(mmu).build().expect("the window is free again");
    assert_eq!(page.direct().expect("direct").read_u64(0).expect("read"), 7);
}

/// The user's last clone of the page is dropped while an owned handle maps
/// it: the handle's clone keeps the frame allocated; it is freed when the
/// handle goes.
fn lw_page_dropped_first(b: Backend) {
    let mem = b.phys(8);
    let lw = lwbufs(b, &mem, 8, 1);
    let _cpu = lw.bind(0).expect("bind");
    let page = mem.alloc_page().expect("page");
    let free = mem.stats().free;
    let h = lw.alloc_owned(&page).expect("alloc_owned");
    drop(page);
    assert_eq!(mem.stats().free, free, "the handle holds the frame");
    h.kva().expect("kva").write_u64(0, 3).expect("write");
    assert_eq!(h.page().hold_count(), 1);
    drop(h);
    assert_eq!(mem.stats().free, free + 1, "the frame is free once the handle is gone");
    assert_settled(&lw);
}

/// Two owned handles of one page, each moved to a thread bound to its own
/// CPU, each writing its own word and dropping its handle there.
fn lw_two_handles_two_threads(b: Backend) {
    let mem = b.phys(8);
    let lw = lwbufs(b, &mem, 8, 3);
    let page = mem.alloc_page().expect("page");
    let cpu0 = lw.bind(0).expect("bind 0");
    let hs = [lw.alloc_owned(&page).expect("first"), lw.alloc_owned(&page).expect("second")];
    assert_eq!(lw.check_consistency(), Ok(2));
    thread::scope(|s| {
        for (i, h) in hs.into_iter().enumerate() {
            let lw = &lw;
            s.spawn(move || {
                let _cpu = lw.bind(i + 1).expect("bind");
                h.kva().expect("kva").write_u64(8 * i, 100 + i as u64).expect("write");
                drop(h);
            });
        }
    });
    lw.poll().expect("poll");
    let k = page.direct().expect("direct");
    assert_eq!((k.read_u64(0).expect("read"), k.read_u64(8).expect("read")), (100, 101));
    assert_eq!(lw.stats().per_cpu[0].decrefs_applied, 2);
    assert_settled(&lw);
    drop(cpu0);
}

/// Handle, caches, page and memory dropped in each of the 24 orders (on a
/// thread with no CPU bound, so the handle's release goes by message to its
/// unbound home CPU, which the sender drains itself): each time the window
/// ends with nothing mapped and free for a new system, and the frame free.
fn lw_every_drop_order(b: Backend) {
    for order in permutations(4) {
        let mem = b.phys(4);
        let mmu = b.mmu(&mem, 4);
        let lw = Arc::new(Lwbufs::builder(Arc::clone(&mmu)).cpus(2).build().expect("Lwbufs"));
        let page = mem.alloc_page().expect("page");
        let h = {
            let _cpu = lw.bind(1).expect("bind");
            lw.alloc_owned(&page).expect("alloc_owned")
        };
        let probe = mem.clone();
        let mut parts = (Some(h), Some(lw), Some(page), Some(mem));
        for &i in &order {
            match i {
                0 => drop(parts.0.take()),
                1 => drop(parts.1.take()),
                2 => drop(parts.2.take()),
                _ => drop(parts.3.take()),
            }
        }
        assert_eq!(mmu.stats().mapped, 0, "order {order:?}");
        assert_eq!(probe.stats().free, 4, "order {order:?}");
        Lwbufs::builder(mmu).build().unwrap_or_else(|e| panic!("order {order:?}: {e}"));
    }
}

/// A thread bound with `bind_for_thread` keeps its CPU, with no guard, until
/// it exits; a message posted to the CPU meanwhile waits in its mailbox and
/// is applied when the thread exits, and the CPU is free again after.
fn lw_bind_for_thread_ends_at_exit(b: Backend) {
    let mem = b.phys(8);
    let lw = lwbufs(b, &mem, 8, 2);
    let page = mem.alloc_page().expect("page");
    let (to_main, from_thread) = mpsc::channel();
    let (to_thread, from_main) = mpsc::channel::<()>();
    let worker = {
        let lw = Arc::clone(&lw);
        let page = page.clone();
        thread::spawn(move || {
            lw.bind_for_thread(1).expect("bind for life");
            assert!(matches!(lw.bind(0), Err(Error::AlreadyBound { cpu: 1 })));
            to_main.send(lw.alloc_owned(&page).expect("alloc_owned")).expect("send");
            from_main.recv().expect("told to exit");
        })
    };
    let h = from_thread.recv().expect("handle");
    assert_eq!(h.home_cpu(), 1);
    assert!(matches!(lw.bind(1), Err(Error::CpuBusy { cpu: 1 })), "bound while the thread lives");
    let cpu0 = lw.bind(0).expect("bind 0");
    drop(h); // on CPU 0, away from home: a message to CPU 1
    assert_eq!(lw.stats().per_cpu[1].mailbox, 1, "CPU 1 is bound: its thread applies it");
    assert_eq!(lw.check_consistency(), Ok(1));
    to_thread.send(()).expect("tell the thread to exit");
    worker.join().expect("thread");
    assert_eq!(lw.stats().per_cpu[1].mailbox, 0, "applied when the thread exited");
    assert_settled(&lw);
    drop(cpu0);
    let _cpu1 = lw.bind(1).expect("released when the thread exited");
}

// === sf_buf ===

/// Allocated here, moved to another thread, read and dropped there.
fn sf_dropped_on_other_thread(b: Backend) {
    let mem = b.phys(8);
    let pool = pool(b, &mem, 8);
    let page = mem.alloc_page().expect("page");
    let h = pool.alloc_owned(&page, Wait::NoWait).expect("alloc_owned");
    h.kva().write_u64(16, 0xbeef).expect("write");
    let word = thread::spawn(move || h.kva().read_u64(16).expect("read")).join().expect("thread");
    assert_eq!(word, 0xbeef);
    let st = pool.stats();
    assert_eq!((st.used, st.cached), (0, 1), "released on the other thread, still cached");
    let again = pool.alloc(&page, Wait::NoWait).expect("a hit");
    assert_eq!(pool.stats().hits, 1);
    drop(again);
}

/// The user drops their `Arc` of the pool while an owned handle is alive.
fn sf_pool_dropped_first(b: Backend) {
    let mem = b.phys(8);
    let mmu = b.mmu(&mem, 8);
    let pool = Arc::new(SfPool::builder(Arc::clone(&mmu)).build().expect("SfPool"));
    let page = mem.alloc_page().expect("page");
    let h = pool.alloc_owned(&page, Wait::NoWait).expect("alloc_owned");
    drop(pool);
    assert!(matches!(SfPool::builder(Arc::clone(&mmu)).build(), Err(Error::WindowClaimed)));
    h.kva().write_u64(0, 9).expect("write");
    assert_eq!(h.pool().stats().used, 1);
    drop(h);
    assert_eq!(page.hold_count(), 1);
    assert_eq!(mmu.stats().mapped, 0);
    SfPool::builder(mmu).build().expect("the window is free again");
    assert_eq!(page.direct().expect("direct").read_u64(0).expect("read"), 9);
}

/// The user's last clone of the page is dropped while the handle maps it.
fn sf_page_dropped_first(b: Backend) {
    let mem = b.phys(8);
    let pool = pool(b, &mem, 8);
    let page = mem.alloc_page().expect("page");
    let free = mem.stats().free;
    let h = pool.alloc_owned(&page, Wait::NoWait).expect("alloc_owned");
    drop(page);
    h.kva().write_u64(0, 1).expect("write");
    assert_eq!(mem.stats().free, free);
    drop(h);
    assert_eq!(mem.stats().free, free + 1);
}

/// Two owned handles of one page (one entry, two references) on two threads.
fn sf_two_handles_two_threads(b: Backend) {
    let mem = b.phys(8);
    let pool = pool(b, &mem, 8);
    let page = mem.alloc_page().expect("page");
    let hs =
        [pool.alloc_owned(&page, Wait::NoWait).expect("first"), pool.alloc_owned(&page, Wait::NoWait).expect("second")];
    assert_eq!(hs[0].slot(), hs[1].slot());
    assert_eq!(pool.stats().used, 1, "one entry");
    thread::scope(|s| {
        for (i, h) in hs.into_iter().enumerate() {
            s.spawn(move || h.kva().write_u64(8 * i, 200 + i as u64).expect("write"));
        }
    });
    let st = pool.stats();
    assert_eq!((st.used, st.cached), (0, 1));
    let k = page.direct().expect("direct");
    assert_eq!((k.read_u64(0).expect("read"), k.read_u64(8).expect("read")), (200, 201));
}

/// Handle, pool, page and memory dropped in each of the 24 orders.
fn sf_every_drop_order(b: Backend) {
    for order in permutations(4) {
        let mem = b.phys(4);
        let mmu = b.mmu(&mem, 4);
        let pool = Arc::new(SfPool::builder(Arc::clone(&mmu)).build().expect("SfPool"));
        let page = mem.alloc_page().expect("page");
        let h = pool.alloc_owned(&page, Wait::NoWait).expect("alloc_owned");
        let probe = mem.clone();
        let mut parts = (Some(h), Some(pool), Some(page), Some(mem));
        for &i in &order {
            match i {
                0 => drop(parts.0.take()),
                1 => drop(parts.1.take()),
                2 => drop(parts.2.take()),
                _ => drop(parts.3.take()),
            }
        }
        assert_eq!(mmu.stats().mapped, 0, "order {order:?}");
        assert_eq!(probe.stats().free, 4, "order {order:?}");
        SfPool::builder(mmu).build().unwrap_or_else(|e| panic!("order {order:?}: {e}"));
    }
}

/// Every order of `0..n`.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for at in 0..=p.len() {
            let mut q = p.clone();
            q.insert(at, n - 1);
            out.push(q);
        }
    }
    out
}

// === tokio ===

/// A two-worker runtime in which a task holds a handle across `.await` and
/// then runs on the other worker, where it drops the handle. Placement is
/// forced, not hoped for: while the task allocates, the first worker is
/// blocked by a task that occupies it (so the allocation runs on the second
/// worker); before the task is woken again, a task it spawned occupies the
/// second worker, and the first is freed (so the wake-up, sent from outside
/// the runtime, can only run on the first).
///
/// `alloc` runs on the second worker and returns the handle; `finish` runs
/// on the first with it. Each returns the id of the thread it ran on.
fn on_two_workers<H: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    alloc: impl FnOnce() -> H + Send + 'static,
    finish: impl FnOnce(H) + Send + 'static,
) -> (thread::ThreadId, thread::ThreadId) {
    let (occupied1, is_occupied1) = mpsc::channel();
    let (free1, release1) = mpsc::channel::<()>();
    rt.spawn(async move {
        occupied1.send(thread::current().id()).expect("send");
        release1.recv().expect("release the first worker");
    });
    let first = is_occupied1.recv().expect("the first worker is occupied");
    let (go, wait_go) = tokio::sync::oneshot::channel::<()>();
    let (occupied2, is_occupied2) = mpsc::channel();
    let task = rt.spawn(async move {
        let second = thread::current().id();
        let h = alloc();
        // Spawned from this worker: it runs on it as soon as we yield.
        let (free2, release2) = mpsc::channel::<()>();
        tokio::spawn(async move {
            occupied2.send(()).expect("send");
            release2.recv().expect("release the second worker");
        });
        wait_go.await.expect("go"); // the handle is held across this .await
        let now = thread::current().id();
        finish(h);
        free2.send(()).expect("release the second worker");
        (second, now)
    });
    is_occupied2.recv().expect("the second worker is occupied");
    free1.send(()).expect("release the first worker");
    go.send(()).expect("go");
    let (second, finished_on) = rt.block_on(task).expect("task");
    assert_ne!(first, second, "the allocation ran on the other worker");
    assert_eq!(finished_on, first, "woken on the first worker, the second being occupied");
    (second, finished_on)
}

/// Worker threads bound for life to CPUs 0, 1, ... as they start.
fn runtime_bound_to(lw: &Arc<Lwbufs>) -> tokio::runtime::Runtime {
    let lw = Arc::clone(lw);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            let cpu = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            lw.bind_for_thread(cpu).expect("bind the worker");
        })
        .build()
        .expect("runtime")
}

/// An owned lwbuf held across `.await` in a task that moves to the other
/// worker (bound to another CPU): `kva` there makes that CPU's entry, the
/// drop there posts the home CPU's decref, which is applied at the latest
/// when the home worker exits with the runtime.
fn lw_tokio_across_await(b: Backend) {
    let mem = b.phys(8);
    let lw = lwbufs(b, &mem, 8, 2);
    let page = mem.alloc_page().expect("page");
    stamp(&page);
    let want = page.direct().expect("direct").read_u64(64).expect("read");
    let rt = runtime_bound_to(&lw);
    let (tx, rx) = mpsc::channel();
    let (lw_a, lw_f) = (Arc::clone(&lw), Arc::clone(&lw));
    on_two_workers(
        &rt,
        move || {
            let h = lw_a.alloc_owned(&page).expect("alloc_owned on a worker");
            assert_eq!(Some(h.home_cpu()), lw_a.current_cpu());
            h
        },
        move |h| {
            let here = lw_f.current_cpu().expect("a bound worker");
            let word = h.kva().expect("kva on the other CPU").read_u64(64).expect("read");
            tx.send((h.home_cpu(), here, word, h.cpumask().count())).expect("send");
            drop(h);
        },
    );
    let (home, dropped_on, word, mask) = rx.recv().expect("report");
    assert_ne!(home, dropped_on, "dropped on another CPU");
    assert_eq!((word, mask), (want, 2));
    drop(rt); // the workers exit: their CPUs are unbound and drained
    assert_eq!(lw.stats().per_cpu[dropped_on].foreign, 1);
    assert_settled(&lw);
    let _home = lw.bind(home).expect("the home CPU is released");
}

/// An owned sf_buf held across `.await` and dropped on the other worker.
fn sf_tokio_across_await(b: Backend) {
    let mem = b.phys(8);
    let pool = pool(b, &mem, 8);
    let page = mem.alloc_page().expect("page");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let p = Arc::clone(&pool);
    let (tx, rx) = mpsc::channel();
    let (allocated_on, dropped_on) = on_two_workers(
        &rt,
        move || {
            let h = p.alloc_owned(&page, Wait::NoWait).expect("alloc_owned");
            h.kva().write_u64(0, 42).expect("write");
            h
        },
        move |h| {
            tx.send(h.kva().read_u64(0).expect("read")).expect("send");
            drop(h);
        },
    );
    assert_ne!(allocated_on, dropped_on);
    assert_eq!(rx.recv().expect("report"), 42);
    let st = pool.stats();
    assert_eq!((st.used, st.cached), (0, 1));
}

on_both_backends!(
    lw_dropped_on_other_cpu,
    lw_caches_dropped_first,
    lw_page_dropped_first,
    lw_two_handles_two_threads,
    lw_every_drop_order,
    lw_bind_for_thread_ends_at_exit,
    sf_dropped_on_other_thread,
    sf_pool_dropped_first,
    sf_page_dropped_first,
    sf_two_handles_two_threads,
    sf_every_drop_order,
    #[cfg_attr(miri, ignore = "tokio's multi-thread runtime is too slow under Miri")]
    lw_tokio_across_await,
    #[cfg_attr(miri, ignore = "tokio's multi-thread runtime is too slow under Miri")]
    sf_tokio_across_await,
);

/// Pages are what the handles clone: a page used by nobody else but an owned
/// handle has one hold, the handle's.
#[test]
fn owned_handle_holds_one_clone() {
    let mem = Backend::Model.phys(2);
    let pool = pool(Backend::Model, &mem, 2);
    let page: Page = mem.alloc_page().expect("page");
    let h = pool.alloc_owned(&page, Wait::NoWait).expect("alloc_owned");
    assert_eq!(page.hold_count(), 2);
    drop(page);
    assert_eq!(h.page().hold_count(), 1);
}
