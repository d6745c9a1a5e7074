//! Integration tests of the per-CPU lwbuf caches (`Lwbufs`, `Lwbuf`,
//! `CpuGuard`): hits and misses, the excess limit and its LRU order, remote
//! releases through the mailboxes, threads that exit (or forget their guard)
//! while holding CPUs and handles, 64 virtual CPUs shared by 8 threads, run
//! mappings, and every misuse error.
//!
//! Every test is written once, generic over a [`Backend`], and instantiated
//! for the real window (memfd + reserved `PROT_NONE` window) and for the
//! model MMU (heap memory, no system call) by `on_both_backends!`.
//!
//! Frames are *stamped* through the direct map with a per-frame pattern
//! before they are mapped, and reads through a handle are checked against
//! it: a handle that maps the wrong frame, or a slot reused while still
//! referenced, shows up as a wrong word.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};
use std::thread;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use lwbuf::{system_page_size, CpuGuard, Error, Lwbuf, Lwbufs, Page, PhysMem, Reclaim, Slot, MAX_CPUS};

// === helpers ===

#[macro_use]
#[path = "common/backend.rs"]
mod backend;
use backend::{leak, pattern, stamp, stamped_pages, Backend, RunOnDrop};

impl Backend {
    /// A system of `cpus` CPUs over a fresh window of `slots` slots.
    fn system(self, mem: &PhysMem, slots: usize, cpus: usize, max_excess: usize) -> Lwbufs {
        Lwbufs::builder(self.mmu(mem, slots))
            .cpus(cpus)
            .max_excess(max_excess)
            .reclaim(Reclaim::Strict)
            .build()
            .expect("build Lwbufs")
    }
}

on_both_backends!(
    hit_and_miss_on_one_cpu,
    hit_makes_no_mmu_call,
    excess_limit_evicts_least_recently_used_first,
    set_max_excess_takes_effect_at_run_time,
    made_on_0_used_on_3_dropped_on_5,
    mail_waits_through_home_releases_for_the_next_alloc,
    made_on_0_used_on_3_dropped_unbound,
    spread_over_cpus_beyond_64,
    idle_owner_mailbox_stays_bounded,
    thread_exit_with_handles_and_binding_strands_nothing,
    thread_panic_with_handles_and_binding_strands_nothing,
    forgotten_guard_then_exit_frees_the_cpu,
    handles_in_thread_local_with_forgotten_guard,
    guard_in_thread_local_dropped_after_the_bindings,
    sixty_four_cpus_eight_threads,
    misuse_returns_its_error,
    window_full_when_every_slot_is_in_use,
    run_of_64_pages_is_one_enter_and_one_remove,
    short_last_granule_maps_over_a_full_stale_one,
    two_cpus_reclaiming_each_other_at_once,
    no_window_full_while_a_slot_is_free_or_cached_8_cpus,
    #[cfg_attr(miri, ignore = "16 threads over 1024 stamped frames take many minutes under Miri; the 8-CPU case runs")]
    no_window_full_while_a_slot_is_free_or_cached_16_cpus,
);

/// Read the first, last and one random word of every page of `h` through
/// `kva()` on the calling thread's CPU and check them against the stamps.
#[track_caller]
fn check_read(h: &Lwbuf<'_>, rng: &mut SmallRng) {
    let fs = system_page_size();
    let words = fs / 8;
    let k = h.kva().expect("kva");
    assert_eq!(k.len(), h.pages().len() * fs);
    let pfn0 = h.page().pfn().0;
    for i in 0..h.pages().len() {
        for w in [0, words - 1, rng.gen_range(0..words)] {
            let got = k.read_u64(i * fs + w * 8).expect("read_u64");
            assert_eq!(
                got,
                pattern(pfn0 + i, w),
                "frame {} word {w} read through {:#x} on CPU {:?}",
                pfn0 + i,
                k.addr(),
                h.cpumask()
            );
        }
    }
}

/// The frames entered in any slot of the system's window now.
fn mapped_frames(lw: &Lwbufs) -> BTreeSet<usize> {
    let mmu = lw.mmu();
    (0..mmu.capacity()).filter_map(|s| mmu.translate(Slot(s))).map(|p| p.0).collect()
}

fn pfns<'p>(pages: impl IntoIterator<Item = &'p Page>) -> BTreeSet<usize> {
    pages.into_iter().map(|p| p.pfn().0).collect()
}

/// Alloc and drop `page` at once on the calling thread's CPU (moves its
/// cached entry to the most recently used end).
fn touch(lw: &Lwbufs, page: &Page) {
    drop(lw.alloc(page).expect("alloc"));
}

/// Every reference released, every message applied, every invariant intact.
#[track_caller]
fn assert_quiescent(lw: &Lwbufs) {
    assert_eq!(lw.check_consistency(), Ok(0), "reference counts left");
    let st = lw.stats();
    assert_eq!(st.total.mailbox, 0, "messages stranded:\n{st}");
    assert_eq!(st.total.decrefs_sent, st.total.decrefs_applied, "sent vs applied:\n{st}");
    assert_eq!(st.total.unmap_errors, 0);
}

fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// A barrier that a panic breaks: once any participant panics (a failed
/// assertion), every `wait`, present or future, panics too, so a failing
/// multi-thread test fails instead of hanging in a wait nobody will join.
/// Each participant holds a [`Barrier::enter`] guard for the length of its part.
struct Barrier {
    n: usize,
    /// (arrived in this generation, generation, broken)
    state: Mutex<(usize, usize, bool)>,
    cv: Condvar,
}

impl Barrier {
    fn new(n: usize) -> Barrier {
        Barrier { n, state: Mutex::new((0, 0, false)), cv: Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, usize, bool)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[track_caller]
    fn wait(&self) {
        let mut g = self.lock();
        assert!(!g.2, "another thread of this test panicked");
        let generation = g.1;
        g.0 += 1;
        if g.0 == self.n {
            g.0 = 0;
            g.1 += 1;
            self.cv.notify_all();
            return;
        }
        while g.1 == generation && !g.2 {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        assert!(!g.2, "another thread of this test panicked");
    }

    /// Break the barrier if the holder of the returned guard panics.
    fn enter(&self) -> BreakOnPanic<'_> {
        BreakOnPanic(self)
    }
}

struct BreakOnPanic<'a>(&'a Barrier);

impl Drop for BreakOnPanic<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.lock().2 = true;
            self.0.cv.notify_all();
        }
    }
}

// === hits, misses and the excess limit ===

/// The first alloc of a frame is a miss (one enter), the next a hit at the
/// same address (no enter); after the drop the entry stays mapped, cached.
fn hit_and_miss_on_one_cpu(b: Backend) {
    let mem = b.phys(64);
    let pages = stamped_pages(&mem, 2);
    let lw = b.system(&mem, 32, 4, 8);
    let mut r = rng(1);
    let _g = lw.bind(0).unwrap();

    let m0 = lw.mmu().stats();
    let h = lw.alloc(&pages[0]).unwrap();
    check_read(&h, &mut r);
    let addr = h.kva().unwrap().addr();
    assert_eq!(h.home_cpu(), 0);
    assert_eq!(h.cpumask().iter().collect::<Vec<_>>(), [0]);
    drop(h);
    let s = lw.stats();
    assert_eq!((s.total.allocs, s.total.hits, s.total.misses), (1, 0, 1));
    assert_eq!((s.per_cpu[0].mapped, s.per_cpu[0].cached), (1, 1));
    assert_eq!(lw.mmu().stats().since(&m0).enters, 1);
    assert_eq!(mapped_frames(&lw), pfns([&pages[0]]), "a released entry stays mapped");

    let h = lw.alloc(&pages[0]).unwrap();
    assert_eq!(h.kva().unwrap().addr(), addr, "a hit hands out the cached address");
    check_read(&h, &mut r);
    // Held twice: both handles share the entry.
    let h2 = lw.alloc(&pages[0]).unwrap();
    assert_eq!(h2.kva().unwrap().addr(), addr);
    assert_eq!(lw.check_consistency(), Ok(2));
    let other = lw.alloc(&pages[1]).unwrap();
    check_read(&other, &mut r);
    assert_ne!(other.kva().unwrap().addr(), addr);
    drop((h, h2, other));
    let s = lw.stats();
    assert_eq!((s.total.allocs, s.total.hits, s.total.misses), (4, 2, 2));
    assert_eq!(lw.mmu().stats().since(&m0).enters, 2);
    assert_eq!(lw.mmu().stats().since(&m0).removes, 0);
    assert_quiescent(&lw);
}

/// A hit (alloc + kva + read + drop) makes no MMU call at all: no enter, no
/// remove, no system call. (Heap allocations: `tests/lwbuf_alloc_count.rs`.)
fn hit_makes_no_mmu_call(b: Backend) {
    let mem = b.phys(64);
    let pages = stamped_pages(&mem, 16);
    let lw = b.system(&mem, 64, 2, 16);
    let mut r = rng(2);
    let _g = lw.bind(1).unwrap();
    for p in &pages {
        touch(&lw, p);
    }
    let before = lw.mmu().stats();
    let hits = lw.stats().total.hits;
    for i in 0..1000 {
        let h = lw.alloc(&pages[i % pages.len()]).unwrap();
        check_read(&h, &mut r);
    }
    let d = lw.mmu().stats().since(&before);
    assert_eq!((d.enters, d.removes, d.syscalls), (0, 0, 0), "{d}");
    assert_eq!(lw.stats().total.hits - hits, 1000);
    assert_quiescent(&lw);
}

/// With `max_excess = 3` the fourth released entry evicts the least recently
/// released one; a hit moves an entry to the recent end.
fn excess_limit_evicts_least_recently_used_first(b: Backend) {
    let mem = b.phys(64);
    let p = stamped_pages(&mem, 7); // A..G
    let lw = b.system(&mem, 32, 2, 3);
    let _g = lw.bind(0).unwrap();
    let m0 = lw.mmu().stats();

    // Held entries never count against the limit.
    let held: Vec<_> = p[..5].iter().map(|pg| lw.alloc(pg).unwrap()).collect();
    assert_eq!(mapped_frames(&lw), pfns(&p[..5]));
    // Release A, B, C, D, E in that order: A then B are evicted.
    drop(held);
    assert_eq!(mapped_frames(&lw), pfns(&p[2..5]), "C, D, E stay cached");
    let d = lw.mmu().stats().since(&m0);
    assert_eq!((d.enters, d.removes), (5, 2));
    assert_eq!(lw.stats().per_cpu[0].evictions, 2);

    // Touch C: the order is now D, E, C. F evicts D, G evicts E.
    touch(&lw, &p[2]);
    touch(&lw, &p[5]);
    assert_eq!(mapped_frames(&lw), pfns([&p[4], &p[2], &p[5]]));
    touch(&lw, &p[6]);
    assert_eq!(mapped_frames(&lw), pfns([&p[2], &p[5], &p[6]]));

    // Re-allocating shows the same thing through the hit/miss counters.
    let s0 = lw.stats().total;
    let c = lw.alloc(&p[2]).unwrap();
    let s1 = lw.stats().total;
    assert_eq!((s1.hits - s0.hits, s1.misses - s0.misses), (1, 0), "C was kept");
    let d_ = lw.alloc(&p[3]).unwrap();
    let s2 = lw.stats().total;
    assert_eq!((s2.hits - s1.hits, s2.misses - s1.misses), (0, 1), "D was evicted");
    drop((c, d_));
    // C, then D released (tuple order): F, now the oldest, goes.
    assert_eq!(mapped_frames(&lw), pfns([&p[6], &p[3], &p[2]]));
    assert_quiescent(&lw);
}

/// `set_max_excess` trims an idle CPU at once, oldest first, and a larger
/// limit lets more entries stay cached from then on.
fn set_max_excess_takes_effect_at_run_time(b: Backend) {
    let mem = b.phys(64);
    let p = stamped_pages(&mem, 12);
    let lw = b.system(&mem, 64, 4, 8);
    let g = lw.bind(2).unwrap();
    for pg in &p[..8] {
        touch(&lw, pg);
    }
    assert_eq!(mapped_frames(&lw), pfns(&p[..8]));
    let m0 = lw.mmu().stats();

    // Not in the library right now (bound, but idle): trimmed at once.
    lw.set_max_excess(2);
    assert_eq!(lw.max_excess(), 2);
    assert_eq!(mapped_frames(&lw), pfns(&p[6..8]), "the two most recent stay");
    assert_eq!(lw.mmu().stats().since(&m0).removes, 6);
    touch(&lw, &p[8]);
    assert_eq!(mapped_frames(&lw), pfns(&p[7..9]));

    lw.set_max_excess(5);
    for pg in &p[9..12] {
        touch(&lw, pg);
    }
    assert_eq!(mapped_frames(&lw), pfns(&p[7..12]), "five cached now");
    assert_eq!(lw.stats().per_cpu[2].cached, 5);

    // An unbound CPU's cache is trimmed too.
    drop(g);
    lw.set_max_excess(0);
    assert!(mapped_frames(&lw).is_empty());
    assert_eq!(lw.mmu().stats().mapped, 0);
    assert_quiescent(&lw);
}

// === remote release ===

/// A handle allocated on CPU 0, used on CPU 3 (a second entry there), and
/// dropped on CPU 5: one decref message each to CPUs 0 and 3, applied when
/// their owners next run the library (CPU 0's `poll`) or let the CPU go
/// (CPU 3's unbind drains its mailbox).
fn made_on_0_used_on_3_dropped_on_5(b: Backend) {
    let mem = b.phys(64);
    let page = stamped_pages(&mem, 1).pop().unwrap();
    let lw = b.system(&mem, 64, 8, 4);
    let g0 = lw.bind(0).unwrap();
    let h = lw.alloc(&page).unwrap();
    check_read(&h, &mut rng(3));
    let home_addr = h.kva().unwrap().addr();

    let bar = Barrier::new(3);
    let (to3, from0) = mpsc::channel::<Lwbuf<'_>>();
    let (to5, from3) = mpsc::channel::<Lwbuf<'_>>();
    let (lw, bar) = (&lw, &bar);
    thread::scope(|s| {
        s.spawn(move || {
            let _b = bar.enter();
            let g3 = lw.bind(3).unwrap();
            let h = from0.recv().unwrap();
            check_read(&h, &mut rng(4));
            let a3 = h.kva().unwrap().addr();
            if b == Backend::Window {
                assert_ne!(a3, home_addr, "CPU 3 has its own mapping");
            }
            check_read(&h, &mut rng(5));
            assert_eq!(h.kva().unwrap().addr(), a3, "a second kva on CPU 3 is a lookup");
            assert_eq!(h.cpumask().iter().collect::<Vec<_>>(), [0, 3]);
            assert_eq!(h.home_cpu(), 0);
            let s3 = lw.stats().per_cpu[3];
            assert_eq!((s3.foreign, s3.allocs, s3.misses), (1, 1, 1));
            to5.send(h).unwrap();
            bar.wait(); // 1: dropped on 5
            bar.wait(); // 2: main saw the messages pending
            drop(g3); // no poll: unbinding applies what is pending
            bar.wait(); // 3
        });
        s.spawn(move || {
            let _b = bar.enter();
            let _g5 = lw.bind(5).unwrap();
            drop(from3.recv().unwrap());
            bar.wait();
            bar.wait();
            bar.wait();
        });
        let _b = bar.enter();
        to3.send(h).unwrap();
        bar.wait(); // 1
        let st = lw.stats();
        assert_eq!((st.per_cpu[0].mailbox, st.per_cpu[3].mailbox), (1, 1), "{st}");
        assert_eq!(st.per_cpu[5].decrefs_sent, 2);
        assert_eq!(st.total.decrefs_applied, 0);
        assert_eq!(lw.check_consistency(), Ok(2), "the owners have not run yet");
        bar.wait(); // 2
        lw.poll().unwrap();
        bar.wait(); // 3
    });
    let st = lw.stats();
    assert_eq!((st.total.decrefs_sent, st.total.decrefs_applied), (2, 2));
    assert_eq!((st.per_cpu[0].decrefs_applied, st.per_cpu[3].decrefs_applied), (1, 1));
    assert_eq!((st.per_cpu[0].cached, st.per_cpu[3].cached, st.per_cpu[5].mapped), (1, 1, 0));
    assert_quiescent(lw);
    drop(g0);
    assert_quiescent(lw);
}

/// A release at home touches its own entry only: a decref message waiting
/// for CPU 0 stays queued through CPU 0's home releases (each still counted
/// and still holding the excess limit) and is applied by its next `alloc`.
fn mail_waits_through_home_releases_for_the_next_alloc(b: Backend) {
    let mem = b.phys(64);
    let pages = stamped_pages(&mem, 4);
    let lw = b.system(&mem, 32, 4, 8);
    lw.set_max_excess(1);
    let _g0 = lw.bind(0).unwrap();
    let shared = lw.alloc(&pages[0]).unwrap();
    let mine: Vec<Lwbuf<'_>> = pages[1..].iter().map(|p| lw.alloc(p).unwrap()).collect();
    thread::scope(|s| {
        s.spawn(|| {
            let _g1 = lw.bind(1).unwrap();
            check_read(&shared, &mut rng(11));
            drop(shared); // one message to CPU 0, one local decref on 1
        });
    });
    let st = lw.stats();
    assert_eq!((st.per_cpu[0].mailbox, st.per_cpu[0].decrefs_applied), (1, 0), "{st}");
    // Three releases at home: the message waits, the limit (1) holds.
    drop(mine);
    let st = lw.stats();
    assert_eq!((st.per_cpu[0].mailbox, st.per_cpu[0].decrefs_applied), (1, 0), "{st}");
    assert_eq!((st.per_cpu[0].cached, st.per_cpu[0].evictions), (1, 2), "{st}");
    assert_eq!(lw.check_consistency(), Ok(1), "CPU 0 still counts the shared page");
    // The next alloc applies it: two unused entries, one over the limit, so
    // the older (page 3's, released first) goes before page 3 maps again.
    let h = lw.alloc(&pages[3]).unwrap();
    let st = lw.stats();
    assert_eq!((st.per_cpu[0].mailbox, st.per_cpu[0].decrefs_applied), (0, 1), "{st}");
    assert_eq!((st.per_cpu[0].cached, st.per_cpu[0].evictions, st.per_cpu[0].hits), (1, 3, 0), "{st}");
    drop(h);
    assert_quiescent(&lw);
}

/// The same handle dropped on a thread with no CPU: its messages are counted
/// as sent by an unbound thread; `reclaim()` applies them on behalf of the
/// owners and unmaps everything cached.
fn made_on_0_used_on_3_dropped_unbound(b: Backend) {
    let mem = b.phys(64);
    let page = stamped_pages(&mem, 1).pop().unwrap();
    let lw = b.system(&mem, 64, 8, 4);
    let _g0 = lw.bind(0).unwrap();
    let h = lw.alloc(&page).unwrap();
    let bar = Barrier::new(2);
    let (lw, bar) = (&lw, &bar);
    thread::scope(|s| {
        s.spawn(move || {
            let _b = bar.enter();
            let _g3 = lw.bind(3).unwrap();
            check_read(&h, &mut rng(6));
            thread::scope(|s2| {
                // A thread with no CPU drops it; 3 stays bound meanwhile.
                s2.spawn(move || {
                    assert_eq!(lw.current_cpu(), None);
                    drop(h);
                });
            });
            bar.wait(); // 1: dropped
            bar.wait(); // 2: reclaimed
        });
        let _b = bar.enter();
        bar.wait();
        let st = lw.stats();
        assert_eq!((st.unbound_sent, st.total.decrefs_sent), (2, 2));
        assert_eq!((st.per_cpu[0].mailbox, st.per_cpu[3].mailbox), (1, 1));
        assert_eq!(lw.check_consistency(), Ok(2));
        // Both owners bound but idle: reclaim drains and unmaps for them.
        // Every slot comes back: the two cached entries, unmapped, and the
        // spare slots both CPUs took in batches.
        assert_eq!(lw.reclaim(), 64);
        assert!(mapped_frames(lw).is_empty());
        assert_quiescent(lw);
        bar.wait();
    });
    assert_quiescent(lw);
}

/// A handle spread over CPU ids on both sides of 64 (a handle keeps the
/// first 64 ids in a word and the rest in a mask allocated on first use):
/// made on CPU 200, used on 3, 64, 255 and again on 64, dropped on 100.
/// Every entry gets exactly one decref, whatever side of 64 it is on.
fn spread_over_cpus_beyond_64(b: Backend) {
    let mem = b.phys(64);
    let page = stamped_pages(&mem, 1).pop().unwrap();
    let lw = b.system(&mem, 64, 256, 4);
    let on = |cpu: usize, f: &(dyn Fn() + Sync)| {
        thread::scope(|s| {
            s.spawn(|| {
                let _g = lw.bind(cpu).unwrap();
                f();
            });
        })
    };
    let g200 = lw.bind(200).unwrap();
    let h = lw.alloc(&page).unwrap();
    drop(g200);
    assert_eq!(h.cpumask().iter().collect::<Vec<_>>(), [200]);
    for (i, cpu) in [3, 64, 255, 64].into_iter().enumerate() {
        on(cpu, &|| check_read(&h, &mut rng(40 + i as u64)));
    }
    assert_eq!(h.cpumask().iter().collect::<Vec<_>>(), [3, 64, 200, 255]);
    let st = lw.stats();
    assert_eq!((st.per_cpu[64].foreign, st.per_cpu[64].allocs), (1, 1), "the second use on 64 is a lookup");
    assert_eq!(st.total.allocs, 4);
    let h = std::sync::Mutex::new(Some(h));
    on(100, &|| drop(h.lock().unwrap().take()));
    let st = lw.stats();
    assert_eq!(st.per_cpu[100].decrefs_sent, 4, "{st}");
    // No thread owns those CPUs any more: the sender applied each message
    // on the owner's behalf.
    for cpu in [3, 64, 200, 255] {
        let c = st.per_cpu[cpu];
        assert_eq!((c.decrefs_applied, c.mailbox, c.cached), (1, 0, 1), "CPU {cpu}: {st}");
    }
    assert_eq!(lw.check_consistency(), Ok(0));
    // What reclaim gives back depends on how the misses spread the slots
    // (a miss that found the window full kept one reclaimed slot); after
    // it, nothing is mapped and nothing is left to give back.
    lw.reclaim();
    assert_eq!(lw.mmu().stats().mapped, 0, "every cached mapping is unmapped");
    assert_eq!(lw.reclaim(), 0, "every slot came back");
    assert!(mapped_frames(&lw).is_empty());
    assert_quiescent(&lw);
}

/// An owner that is bound but never calls the library does not let its
/// mailbox grow without bound: senders drain it for it past a threshold.
fn idle_owner_mailbox_stays_bounded(b: Backend) {
    let mem = b.phys(64);
    let pages = stamped_pages(&mem, 4);
    let lw = b.system(&mem, 64, 4, 4);
    let _g0 = lw.bind(0).unwrap();
    let handles: Vec<_> = (0..1000).map(|i| lw.alloc(&pages[i % 4]).unwrap()).collect();
    assert_eq!(lw.check_consistency(), Ok(1000));
    let lw = &lw;
    thread::scope(|s| {
        s.spawn(move || {
            let _g1 = lw.bind(1).unwrap();
            for h in handles {
                drop(h);
                assert!(lw.stats().per_cpu[0].mailbox <= 256, "mailbox of an idle owner grows without bound");
            }
        });
    });
    let st = lw.stats();
    assert_eq!(st.total.decrefs_sent, 1000);
    assert!(st.per_cpu[0].decrefs_applied >= 1000 - 256, "{st}");
    lw.poll().unwrap();
    assert_quiescent(lw);
}

// === threads that go away ===

/// A thread bound to CPU 2 that returns while holding its guard, its own
/// handles and a handle homed on CPU 0: the handles are released on CPU 2
/// before the binding goes, CPU 2 can be bound again, and after CPU 0's
/// owner polls nothing is left.
fn thread_exit_with_handles_and_binding_strands_nothing(b: Backend) {
    exit_holding(b, false);
}

/// The same, but the thread panics while holding everything.
fn thread_panic_with_handles_and_binding_strands_nothing(b: Backend) {
    exit_holding(b, true);
}

fn exit_holding(b: Backend, panic: bool) {
    let mem = b.phys(64);
    let pages = stamped_pages(&mem, 4);
    let lw = b.system(&mem, 64, 8, 4);
    let g0 = lw.bind(0).unwrap();
    let remote = lw.alloc(&pages[0]).unwrap();
    let (lw, pages) = (&lw, &pages);
    thread::scope(|s| {
        let t = s.spawn(move || {
            let _g2 = lw.bind(2).unwrap();
            // A local declared after the guard is dropped before it (a
            // capture would be dropped after the body, CPU 2 already gone).
            let remote = remote;
            let mine: Vec<_> = pages[1..].iter().map(|p| lw.alloc(p).unwrap()).collect();
            let mut r = rng(7);
            check_read(&remote, &mut r);
            for h in &mine {
                check_read(h, &mut r);
            }
            assert_eq!(lw.check_consistency(), Ok(1 + 1 + 3));
            if panic {
                panic!("worker dies holding CPU 2 and {} handles (expected by the test)", mine.len() + 1);
            }
        });
        assert_eq!(t.join().is_err(), panic);
    });
    // CPU 2's own entries were released there, on the way out.
    let st = lw.stats();
    assert_eq!((st.per_cpu[2].mapped, st.per_cpu[2].cached), (4, 4), "{st}");
    assert_eq!(st.per_cpu[2].decrefs_sent, 1, "one message home to CPU 0");
    assert_eq!(st.per_cpu[0].mailbox, 1);
    assert_eq!(lw.check_consistency(), Ok(1), "CPU 0 has not run yet");
    lw.poll().unwrap();
    assert_quiescent(lw);
    // CPU 2 is free again.
    thread::scope(|s| {
        s.spawn(|| drop(lw.bind(2).expect("CPU 2 bindable after its thread exited")));
    });
    drop(g0);
    assert_quiescent(lw);
}

/// A thread that `mem::forget`s its guard and exits still gives its CPU
/// back (the binding lives in a thread-local destroyed with the thread), and
/// the messages for that CPU are applied: one queued while the thread was
/// alive is applied by the first sender after it is gone (which finds the
/// CPU unbound and drains for it); one with no later sender waits for the
/// next thread to bind the CPU, or for `reclaim`.
fn forgotten_guard_then_exit_frees_the_cpu(b: Backend) {
    let mem = b.phys(64);
    let pages = stamped_pages(&mem, 4);
    let lw = b.system(&mem, 64, 8, 4);
    let (lw, pages) = (&lw, &pages);
    let _g0 = lw.bind(0).unwrap();
    let bar = Barrier::new(2);
    let bar = &bar;

    // Stranded message, then a later sender.
    thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<Vec<Lwbuf<'_>>>();
        let _b = bar.enter();
        let t = s.spawn(move || {
            let _b = bar.enter();
            let g = lw.bind(2).unwrap();
            tx.send(pages[..3].iter().map(|p| lw.alloc(p).unwrap()).collect()).unwrap();
            bar.wait(); // main dropped one while we are alive and bound
            std::mem::forget(g);
        });
        let mut hs = rx.recv().unwrap();
        drop(hs.pop());
        assert_eq!(lw.stats().per_cpu[2].mailbox, 1, "CPU 2 is bound: the message waits for it");
        bar.wait();
        t.join().unwrap();
        assert_eq!(lw.check_consistency(), Ok(3));
        // CPU 2 is unbound now: this drop applies its message and the
        // earlier one.
        drop(hs.pop());
        let st = lw.stats();
        assert_eq!((st.per_cpu[2].mailbox, st.per_cpu[2].decrefs_applied), (0, 2), "{st}");
        assert_eq!(lw.check_consistency(), Ok(1));
        drop(hs);
    });
    assert_quiescent(lw);
    thread::scope(|s| {
        s.spawn(|| drop(lw.bind(2).expect("CPU 2 bindable after a forgotten guard's thread exited")));
    });

    // Stranded message, no later sender: the next owner applies it, and
    // failing that `reclaim` does.
    for next_owner in [true, false] {
        thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<Lwbuf<'_>>();
            let _b = bar.enter();
            let t = s.spawn(move || {
                let _b = bar.enter();
                let g = lw.bind(4).unwrap();
                tx.send(lw.alloc(&pages[3]).unwrap()).unwrap();
                bar.wait();
                std::mem::forget(g);
            });
            drop(rx.recv().unwrap());
            bar.wait();
            t.join().unwrap();
        });
        assert_eq!(lw.stats().per_cpu[4].mailbox, 1);
        assert_eq!(lw.check_consistency(), Ok(1));
        if next_owner {
            thread::scope(|s| {
                s.spawn(|| {
                    let _g4 = lw.bind(4).expect("CPU 4 bindable");
                    lw.poll().unwrap();
                });
            });
        } else {
            lw.reclaim();
        }
        assert_quiescent(lw);
    }
}

thread_local! {
    static STASH: RefCell<Vec<Lwbuf<'static>>> = const { RefCell::new(Vec::new()) };
}

/// Handles kept in a thread-local, a forgotten guard, and a thread exit:
/// whichever of the two thread-locals (the library's bindings, the stash) is
/// destroyed first, the handles are released, their messages applied, and
/// the CPU comes back.
fn handles_in_thread_local_with_forgotten_guard(b: Backend) {
    for stash_first in [false, true] {
        let mem = b.phys(64);
        // The stash needs `'static` handles, so the system and the pages
        // are leaked.
        let pages: &'static [Page] = leak(stamped_pages(&mem, 3));
        let lw: &'static Lwbufs = leak(b.system(&mem, 64, 4, 4));
        let g0 = lw.bind(0).unwrap();
        let from0 = lw.alloc(&pages[0]).unwrap();
        thread::spawn(move || {
            if stash_first {
                // The stash's destructor registers first, so runs last.
                STASH.with(|s| s.borrow_mut().clear());
            }
            let g = lw.bind(1).unwrap();
            let mut r = rng(8);
            check_read(&from0, &mut r);
            let mut hs = vec![from0];
            hs.extend(pages[1..].iter().map(|p| lw.alloc(p).unwrap()));
            STASH.with(|s| s.borrow_mut().extend(hs));
            std::mem::forget(g);
        })
        .join()
        .unwrap();
        lw.poll().unwrap();
        assert_quiescent(lw);
        thread::spawn(move || drop(lw.bind(1).expect("CPU 1 bindable"))).join().unwrap();
        drop(g0);
        lw.reclaim();
        assert_eq!(lw.mmu().stats().mapped, 0);
    }
}

thread_local! {
    static GUARD: RefCell<Option<CpuGuard<'static>>> = const { RefCell::new(None) };
    static BETWEEN: RefCell<RunOnDrop> = const { RefCell::new(RunOnDrop(None)) };
}

/// A guard kept in a thread-local whose destructor runs *after* the
/// library's own bindings are destroyed (it was registered first, as in
/// `GUARD.with(|g| *g.borrow_mut() = Some(lw.bind(1)?))`): the bindings'
/// destructor releases the CPU, and the guard's drop, later, must not release
/// it again, since another thread may have bound it in between.
fn guard_in_thread_local_dropped_after_the_bindings(b: Backend) {
    let mem = b.phys(16);
    let lw: &'static Lwbufs = leak(b.system(&mem, 16, 4, 4));
    let (bound_tx, bound_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let other = thread::spawn(move || {
        // Waits until the dying thread's bindings are gone, binds CPU 1,
        // and holds it while the dying thread's guard is dropped.
        go_rx.recv().unwrap();
        let g = lw.bind(1).expect("CPU 1 released by the exiting thread's bindings");
        bound_tx.send(()).unwrap();
        done_rx.recv().unwrap();
        assert_eq!(lw.current_cpu(), Some(1));
        drop(g);
    });
    thread::spawn(move || {
        // Registration order = reverse destruction order: GUARD, then
        // BETWEEN, then the library's bindings (at the first bind).
        GUARD.with(|_| ());
        BETWEEN.with(|b| {
            b.borrow_mut().0 = Some(Box::new(move || {
                go_tx.send(()).unwrap();
                bound_rx.recv().unwrap();
            }))
        });
        let g = lw.bind(1).unwrap();
        GUARD.with(|s| *s.borrow_mut() = Some(g));
    })
    .join()
    .unwrap();
    // `other` holds CPU 1 now: nobody else may bind it.
    assert!(matches!(lw.bind(1), Err(Error::CpuBusy { cpu: 1 })), "CPU 1 released twice: two owners");
    done_tx.send(()).unwrap();
    other.join().unwrap();
    drop(lw.bind(1).expect("free once its owner let go"));
}

// === many CPUs, many threads ===

/// 64 virtual CPUs, 8 OS threads. Each thread binds one CPU at a time and
/// moves to another now and then; handles are allocated, read through
/// `kva()` on whichever CPU the reader holds (every word read is checked
/// against the frame's stamp), passed to random threads, and dropped
/// wherever they happen to be. Handles still in inboxes at the end are
/// dropped by the main thread, which has no CPU. Then: every count zero,
/// every message applied, the invariants intact.
fn sixty_four_cpus_eight_threads(b: Backend) {
    const CPUS: usize = 64;
    const THREADS: usize = 8;
    // Under Miri (about 100x slower) a tenth of the operations over fewer
    // frames.
    const OPS: usize = if cfg!(miri) { 2_000 } else { 20_000 };
    const FRAMES: usize = if cfg!(miri) { 64 } else { 256 };
    const MAX_HELD: usize = 12;
    let mem = b.phys(FRAMES);
    let pages = stamped_pages(&mem, FRAMES);
    let lw = b.system(&mem, 4096, CPUS, 8);
    let inboxes: Vec<Mutex<Vec<Lwbuf<'_>>>> = (0..THREADS).map(|_| Mutex::new(Vec::new())).collect();
    let done = AtomicUsize::new(0);
    let reads = AtomicUsize::new(0);
    let (lw_, pages_, inboxes_, done_, reads_) = (&lw, &pages, &inboxes, &done, &reads);

    thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                let (lw, pages, inboxes) = (lw_, pages_, inboxes_);
                let mut r = rng(100 + t as u64);
                let mut guard: Option<CpuGuard<'_>> = None;
                let mut held: Vec<Lwbuf<'_>> = Vec::new();
                let mut my_reads = 0;
                while done_.fetch_add(1, Ordering::Relaxed) < OPS {
                    if guard.is_none() || r.gen_ratio(1, 40) {
                        // One CPU per thread at a time: drop the old binding
                        // first (dropping it drains its mailbox).
                        drop(guard.take());
                        guard = Some(bind_any(lw, CPUS, &mut r));
                    }
                    held.append(&mut inboxes[t].lock().unwrap());
                    match r.gen_range(0..10) {
                        0..=2 if held.len() < MAX_HELD => {
                            let h = lw.alloc(&pages[r.gen_range(0..FRAMES)]).unwrap();
                            check_read(&h, &mut r);
                            my_reads += 1;
                            held.push(h);
                        }
                        0..=5 if !held.is_empty() => {
                            let i = r.gen_range(0..held.len());
                            check_read(&held[i], &mut r);
                            my_reads += 1;
                        }
                        6..=7 if !held.is_empty() => {
                            let h = held.swap_remove(r.gen_range(0..held.len()));
                            inboxes[r.gen_range(0..THREADS)].lock().unwrap().push(h);
                        }
                        _ if !held.is_empty() => {
                            drop(held.swap_remove(r.gen_range(0..held.len())));
                        }
                        _ => {}
                    }
                }
                // Dropped on this thread's last CPU, then the binding goes.
                drop(held);
                drop(guard);
                reads_.fetch_add(my_reads, Ordering::Relaxed);
            });
        }
    });
    // Left in inboxes: dropped here, with no CPU bound.
    assert_eq!(lw.current_cpu(), None);
    drop(inboxes);
    let st = lw.stats();
    assert!(reads.load(Ordering::Relaxed) > OPS / 4, "only {} checked reads", reads.load(Ordering::Relaxed));
    assert!(st.total.foreign > (OPS / 200) as u64, "handles rarely crossed CPUs:\n{st}");
    assert!(st.total.decrefs_sent > (OPS / 200) as u64, "{st}");
    assert!(st.per_cpu.iter().filter(|c| c.allocs > 0).count() > CPUS / 2, "{st}");
    assert_quiescent(&lw);
    lw.reclaim();
    assert_eq!(lw.mmu().stats().mapped, 0);
    assert!(mapped_frames(&lw).is_empty());
}

/// Bind a random CPU that no other thread holds.
fn bind_any<'a>(lw: &'a Lwbufs, cpus: usize, r: &mut SmallRng) -> CpuGuard<'a> {
    loop {
        match lw.bind(r.gen_range(0..cpus)) {
            Ok(g) => return g,
            Err(Error::CpuBusy { .. }) => continue,
            Err(e) => panic!("bind: {e}"),
        }
    }
}

// === errors ===

/// Each misuse returns its error, and leaves the system usable.
fn misuse_returns_its_error(b: Backend) {
    let mem = b.phys(64);
    let other = b.phys(8);
    let lw = b.system(&mem, 32, 8, 4);
    let page = mem.alloc_page().unwrap();
    let run = mem.alloc_run(4).unwrap();

    // No CPU bound.
    assert!(matches!(lw.alloc(&page), Err(Error::NotBound)));
    assert!(matches!(lw.alloc_run(&run), Err(Error::NotBound)));
    assert!(matches!(lw.poll(), Err(Error::NotBound)));

    // Binding.
    assert!(matches!(lw.bind(8), Err(Error::NoSuchCpu { cpu: 8, ncpus: 8 })));
    assert!(matches!(lw.bind(usize::MAX), Err(Error::NoSuchCpu { ncpus: 8, .. })));
    let g = lw.bind(1).unwrap();
    assert_eq!(lw.current_cpu(), Some(1));
    assert!(matches!(lw.bind(2), Err(Error::AlreadyBound { cpu: 1 })));
    assert!(matches!(lw.bind(1), Err(Error::AlreadyBound { cpu: 1 })));
    let lw_ = &lw;
    thread::scope(|s| {
        s.spawn(move || assert!(matches!(lw_.bind(1), Err(Error::CpuBusy { cpu: 1 }))));
    });

    // A page of another PhysMem.
    let foreign = other.alloc_page().unwrap();
    assert!(matches!(lw.alloc(&foreign), Err(Error::ForeignPage)));
    let mixed = [run[0].clone(), foreign.clone()];
    assert!(matches!(lw.alloc_run(&mixed), Err(Error::ForeignPage)));

    // Runs that are not runs.
    let gap = [run[0].clone(), run[2].clone()];
    assert!(matches!(lw.alloc_run(&gap), Err(Error::Config { what: "pages", .. })));
    let backwards = [run[1].clone(), run[0].clone()];
    assert!(matches!(lw.alloc_run(&backwards), Err(Error::Config { what: "pages", .. })));
    assert!(matches!(lw.alloc_run(&[]), Err(Error::Config { what: "pages", .. })));
    assert_eq!(lw.stats().total.allocs, 0, "rejected requests touch nothing");
    assert_eq!(lw.mmu().stats().enters, 0);

    // A handle asked for its address on a thread with no CPU.
    let h = lw.alloc(&page).unwrap();
    drop(g);
    assert_eq!(lw.current_cpu(), None);
    assert!(matches!(h.kva(), Err(Error::NotBound)));
    drop(h);
    assert_quiescent(&lw);

    // Another live thread holds the CPU.
    let bar = Barrier::new(2);
    let bar = &bar;
    thread::scope(|s| {
        s.spawn(move || {
            let _b = bar.enter();
            let _g = lw_.bind(3).unwrap();
            bar.wait();
            bar.wait();
        });
        let _b = bar.enter();
        bar.wait();
        assert!(matches!(lw_.bind(3), Err(Error::CpuBusy { cpu: 3 })));
        bar.wait();
    });
    drop(lw_.bind(3).expect("free again once its thread let go"));

    // A thread holds CPUs of at most MAX_BINDINGS_PER_THREAD systems.
    let systems: Vec<Lwbufs> = (0..=lwbuf::MAX_BINDINGS_PER_THREAD).map(|_| b.system(&mem, 4, 1, 1)).collect();
    let guards: Vec<_> = systems[1..].iter().map(|s| s.bind(0).unwrap()).collect();
    assert!(matches!(systems[0].bind(0), Err(Error::Config { what: "binding", .. })));
    drop(guards);
    drop(systems[0].bind(0).unwrap());

    // Configuration.
    let build = |n| Lwbufs::builder(b.mmu(&mem, 4)).cpus(n).build();
    assert!(matches!(build(0), Err(Error::Config { what: "cpus", .. })));
    assert!(matches!(build(MAX_CPUS + 1), Err(Error::Config { what: "cpus", .. })));
    if cfg!(miri) {
        // A system of MAX_CPUS CPUs takes minutes to set up and check under
        // Miri; the smaller systems above run the same code.
        return;
    }
    let big = build(MAX_CPUS).expect("MAX_CPUS is accepted");
    assert_eq!(big.cpus(), MAX_CPUS);
    let g = big.bind(MAX_CPUS - 1).unwrap();
    drop(big.alloc(&page).unwrap());
    drop(g);
    assert_quiescent(&big);
}

/// `WindowFull` comes only when every slot is held by a live handle: slots
/// cached or hoarded by another CPU are reclaimed first, and the excess
/// limit plays no part.
fn window_full_when_every_slot_is_in_use(b: Backend) {
    const SLOTS: usize = 8;
    let mem = b.phys(64);
    let pages = stamped_pages(&mem, SLOTS + 2);
    let lw = b.system(&mem, SLOTS, 2, SLOTS);
    let (lw_, pages_) = (&lw, &pages);
    // CPU 1 takes every slot (its batch) and caches four mappings.
    thread::scope(|s| {
        s.spawn(move || {
            let _g1 = lw_.bind(1).unwrap();
            for p in &pages_[..4] {
                touch(lw_, p);
            }
        });
    });
    assert_eq!(lw.stats().per_cpu[1].cached, 4);

    let _g0 = lw.bind(0).unwrap();
    let mut hs: Vec<_> = pages[..SLOTS].iter().map(|p| lw.alloc(p).expect("reclaims CPU 1's slots")).collect();
    assert_eq!(lw.stats().per_cpu[1].mapped, 0, "CPU 1's cached mappings were reclaimed");
    for max_excess in [SLOTS, 0, usize::MAX] {
        lw.set_max_excess(max_excess);
        match lw.alloc(&pages[SLOTS]) {
            Err(Error::WindowFull { requested: 1, capacity: SLOTS }) => {}
            other => panic!("expected WindowFull with max_excess {max_excess}, got {other:?}"),
        }
        assert!(matches!(lw.alloc_run(&mem.alloc_run(2).unwrap()), Err(Error::WindowFull { requested: 2, .. })));
    }
    // A handle asking for an entry on another CPU hits the same wall.
    let h0 = &hs[0];
    thread::scope(|s| {
        s.spawn(move || {
            let _g1 = lw_.bind(1).unwrap();
            assert!(matches!(h0.kva(), Err(Error::WindowFull { .. })));
            assert!(!h0.cpumask().contains(1));
        });
    });
    assert_eq!(lw.check_consistency(), Ok(SLOTS as u64));

    // One release makes room (its cached mapping is evicted for the miss).
    lw.set_max_excess(SLOTS);
    drop(hs.pop());
    let h = lw.alloc(&pages[SLOTS + 1]).unwrap();
    check_read(&h, &mut rng(9));
    drop(h);
    drop(hs);
    assert_quiescent(&lw);
}

/// `alloc_run` of 64 contiguous pages is one enter of 64 slots; a second
/// `alloc_run` of the same run is a hit; after drop and eviction, one remove.
/// Under lazy reclaim the short last granule of a memory that is no whole
/// number of granules (frames 4..6, granule 4) maps in place over the stale
/// mapping of a full one: the old pages reach past the new ones (and past
/// the end of the memory, counted from the new first frame), and the slots
/// beyond the new pages are removed with one more call.
fn short_last_granule_maps_over_a_full_stale_one(b: Backend) {
    let mem = b.phys(6);
    let run = mem.alloc_run(6).unwrap();
    assert_eq!(run[0].pfn().0, 0, "a fresh memory hands out its first frames");
    run.iter().for_each(stamp);
    let lw = Lwbufs::builder(b.mmu(&mem, 8))
        .cpus(1)
        .max_excess(0)
        .granule(4)
        .reclaim(Reclaim::Lazy)
        .build()
        .expect("build Lwbufs");
    let _g = lw.bind(0).unwrap();
    drop(lw.alloc(&run[1]).unwrap()); // granule 0..4: evicted, left entered
    let m0 = lw.mmu().stats();
    assert_eq!(m0.mapped, 4);
    let h = lw.alloc(&run[5]).expect("the short granule over the stale one");
    let d = lw.mmu().stats().since(&m0);
    assert_eq!(
        (d.enters, d.replaces, d.pages_replaced, d.removes, d.pages_removed, d.mapped),
        (1, 1, 2, 1, 2, 2),
        "one replace in place, one remove of the slots beyond"
    );
    check_read(&h, &mut rng(12));
    assert_eq!(mapped_frames(&lw), pfns(&run[4..6]));
    drop(h);
    lw.reclaim();
    assert_eq!(lw.mmu().stats().mapped, 0);
    assert_quiescent(&lw);
}

fn run_of_64_pages_is_one_enter_and_one_remove(b: Backend) {
    let fs = system_page_size();
    let mem = b.phys(256);
    let lw = b.system(&mem, 256, 4, 4);
    let _stray = mem.alloc_page().unwrap();
    let run = mem.alloc_run(64).unwrap();
    run.iter().for_each(stamp);
    let mut r = rng(10);
    let _g = lw.bind(0).unwrap();

    let m0 = lw.mmu().stats();
    let h = lw.alloc_run(&run).unwrap();
    let d = lw.mmu().stats().since(&m0);
    assert_eq!((d.enters, d.pages_entered, d.removes), (1, 64, 0));
    assert_eq!(h.pages().len(), 64);
    assert_eq!(h.kva().unwrap().len(), 64 * fs);
    check_read(&h, &mut r);
    assert_eq!(mapped_frames(&lw), pfns(&run));
    drop(h);

    let h = lw.alloc_run(&run).unwrap();
    assert_eq!(lw.mmu().stats().since(&m0).enters, 1, "the second alloc_run is a hit");
    assert_eq!(lw.stats().total.hits, 1);
    // Used on another CPU: one more enter of the whole run there.
    let (lw_, h_) = (&lw, &h);
    thread::scope(|s| {
        s.spawn(move || {
            let _g1 = lw_.bind(1).unwrap();
            check_read(h_, &mut rng(11));
        });
    });
    let d = lw.mmu().stats().since(&m0);
    assert_eq!((d.enters, d.pages_entered), (2, 128));
    drop(h);
    lw.poll().unwrap();
    lw.reclaim();
    let d = lw.mmu().stats().since(&m0);
    assert_eq!((d.removes, d.pages_removed), (2, 128), "one remove per run mapping");
    assert_quiescent(&lw);

    // A single-page run is an ordinary lwbuf.
    let h = lw.alloc_run(&run[5..6]).unwrap();
    assert_eq!(h.pages().len(), 1);
    check_read(&h, &mut r);
    drop(h);

    // Eviction by the excess limit: one remove too.
    let m1 = lw.mmu().stats();
    drop(lw.alloc_run(&run).unwrap());
    lw.set_max_excess(0);
    let d = lw.mmu().stats().since(&m1);
    assert_eq!((d.enters, d.removes, d.pages_removed), (1, 2, 65));
    assert_quiescent(&lw);
}

// === auto traits ===

#[test]
fn auto_traits() {
    fn assert_send<T: Send>() {}
    fn assert_sync<T: Sync>() {}
    assert_send::<Lwbuf<'static>>();
    assert_sync::<Lwbuf<'static>>();
    assert_send::<Lwbufs>();
    assert_sync::<Lwbufs>();
    assert_send::<lwbuf::CpuMask>();
    assert_sync::<lwbuf::CpuMask>();

    // `CpuGuard: !Send`, checked at compile time: if `CpuGuard` were `Send`,
    // both impls would apply and `<CpuGuard as AmbiguousIfSend<_>>` would be
    // ambiguous, failing to compile (the `static_assertions` trick).
    trait AmbiguousIfSend<A> {
        fn some_item() {}
    }
    impl<T: ?Sized> AmbiguousIfSend<()> for T {}
    impl<T: ?Sized + Send> AmbiguousIfSend<u8> for T {}
    let _ = <CpuGuard<'static> as AmbiguousIfSend<_>>::some_item;
}

/// Two CPUs whose misses both find the window full reclaim from each other
/// at the same time. A miss must leave its own cache before it steals
/// another CPU's: otherwise each waits for the other to leave, for ever.
/// Each CPU wants three of the four slots at once, so both often find no
/// room together; a watchdog turns a hang into a failure.
fn two_cpus_reclaiming_each_other_at_once(b: Backend) {
    // Under Miri (about 100x slower, and its clock runs with the work done)
    // fewer rounds, so that the 60 s watchdog still means a deadlock.
    const ROUNDS: usize = if cfg!(miri) { 100 } else { 3000 };
    let mem = b.phys(64);
    // Shared, not borrowed: on a hang the workers cannot be joined, and must
    // not borrow from a frame the failing test unwinds.
    let fx = std::sync::Arc::new((stamped_pages(&mem, 16), b.system(&mem, 4, 2, 4)));
    let (done_tx, done_rx) = mpsc::channel();
    let mut workers = Vec::new();
    for cpu in 0..2 {
        let done = done_tx.clone();
        let fx = fx.clone();
        workers.push(thread::spawn(move || {
            let (pages, lw) = &*fx;
            let _g = lw.bind(cpu).expect("bind");
            let mut r = rng(cpu as u64);
            let (mut got, mut full) = (0u64, 0u64);
            for _ in 0..ROUNDS {
                let mut held = Vec::new();
                for _ in 0..3 {
                    // Each CPU keeps to its own half of the frames.
                    let p = &pages[cpu * 8 + r.gen_range(0..8)];
                    match lw.alloc(p) {
                        Ok(h) => {
                            check_read(&h, &mut r);
                            held.push(h);
                            got += 1;
                        }
                        Err(Error::WindowFull { .. }) => {
                            full += 1;
                            break;
                        }
                        Err(e) => panic!("CPU {cpu}: {e}"),
                    }
                }
            }
            done.send((got, full)).expect("report");
        }));
    }
    let (mut got, mut full) = (0, 0);
    for _ in 0..2 {
        let (g, f) = done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("both CPUs finish: no deadlock between two reclaiming CPUs");
        got += g;
        full += f;
    }
    for w in workers {
        w.join().expect("worker");
    }
    let lw = &fx.1;
    let s = lw.stats();
    assert_eq!(s.total.allocs, got, "one alloc counted per successful call: {s}");
    // How often both found no room together depends on timing (on the real
    // window, where a miss is a system call, often enough that the old
    // guard-held-through-reclaim code hung here within the first second);
    // it is not asserted.
    assert!(got > 0, "{got} mapped, {full} full");
    assert_eq!(lw.check_consistency(), Ok(0));
}

/// Threads that each hold at most one single-page handle never fill the
/// window, so none may see `WindowFull`, however the slots are spread over
/// the CPUs' slot batches and caches while they race: a miss that finds no
/// slot reclaims the other CPUs and keeps one of the slots it freed.
fn no_window_full_while_a_slot_is_free_or_cached_8_cpus(b: Backend) {
    no_spurious_window_full(b, 8, 64);
}

fn no_window_full_while_a_slot_is_free_or_cached_16_cpus(b: Backend) {
    no_spurious_window_full(b, 16, 256);
}

fn no_spurious_window_full(b: Backend, threads: usize, slots: usize) {
    // Under Miri (about 100x slower) fewer rounds over a working set of
    // twice the window instead of four times: still beyond it.
    let (rounds, frames) = if cfg!(miri) { (10, 2 * slots) } else { (4000, 4 * slots) };
    let mem = b.phys(frames);
    let pages = stamped_pages(&mem, frames);
    // The default excess limit: an even share of half the window.
    let lw = Lwbufs::builder(b.mmu(&mem, slots)).cpus(threads).build().expect("build Lwbufs");
    let full = AtomicUsize::new(0);
    thread::scope(|s| {
        for cpu in 0..threads {
            let (lw, pages, full) = (&lw, &pages, &full);
            s.spawn(move || {
                let _g = lw.bind(cpu).expect("bind");
                let mut r = rng(cpu as u64 + 100);
                for _ in 0..rounds {
                    let p = &pages[r.gen_range(0..pages.len())];
                    match lw.alloc(p) {
                        Ok(h) => check_read(&h, &mut r),
                        Err(Error::WindowFull { .. }) => {
                            full.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("CPU {cpu}: {e}"),
                    }
                }
            });
        }
    });
    let s = lw.stats();
    assert_eq!(full.load(Ordering::Relaxed), 0, "WindowFull with at most {threads} of {slots} slots in use: {s}");
    assert_eq!(s.total.allocs, (threads * rounds) as u64);
    assert_eq!(lw.check_consistency(), Ok(0));
}

/// The pages of one granule read in turn are one use of its entry: with
/// one unused entry kept (`max_excess(1)`) and a window of two granules, a
/// scan page by page maps every granule once. (The clock once marked the
/// granule at each of its releases, then spared it and evicted the granule
/// mapped after it, which mapped again at its next page: two maps each.)
#[test]
fn a_granule_read_page_by_page_is_mapped_once() {
    let mem = PhysMem::builder().frames(64).backing(lwbuf::Backing::Heap).build().unwrap();
    let pages = mem.alloc_run(64).unwrap();
    for reclaim in [Reclaim::Strict, Reclaim::Lazy] {
        let mmu = std::sync::Arc::new(lwbuf::ModelMmu::new(&mem, 8).unwrap());
        let lw = Lwbufs::builder(mmu).cpus(1).granule(4).max_excess(1).reclaim(reclaim).build().unwrap();
        let _cpu = lw.bind(0).unwrap();
        for p in &pages {
            drop(lw.alloc(p).unwrap());
        }
        let s = lw.stats();
        assert_eq!((s.total.misses, s.total.hits, s.mmu.enters), (16, 48, 16), "{reclaim:?}");
        assert_eq!(lw.check_consistency(), Ok(0));
    }
}
