//! Loom models of the sf_buf pool: a hit racing an eviction, and waiting
//! for a slot (plain, timeout, cancel, close).

#![cfg(loom)]

use std::sync::Arc;
use std::time::Duration;

use loom::thread;
use loom_tests::{expect_failure, expect_failure_in_child, leak, model, unleak, Mutant};
use lwbuf::{Backing, CancelToken, Error, Mmu, ModelMmu, PhysMem, SfPool, Wait};

fn pool(frames: usize, slots: usize, max_excess: usize) -> (PhysMem, Arc<ModelMmu>, &'static SfPool) {
    let mem = PhysMem::builder().frames(frames).backing(Backing::Heap).build().unwrap();
    let mmu = Arc::new(ModelMmu::new(&mem, slots).unwrap());
    let p = SfPool::builder(mmu.clone()).max_excess(max_excess).shards(2).build().unwrap();
    (mem, mmu, leak(p))
}

// === 4. a hit racing an eviction ===

fn hit_vs_eviction() {
    let (mem, mmu, pool) = pool(3, 3, 0);
    let f = mem.alloc_page().unwrap();
    let others = [mem.alloc_page().unwrap(), mem.alloc_page().unwrap()];
    let fpfn = f.pfn();
    let user = |page: lwbuf::Page, mmu: Arc<ModelMmu>| {
        move || {
            let sf = pool.alloc(&page, Wait::Forever).unwrap();
            // The address handed out must map this frame for as long as
            // the handle lives.
            assert_eq!(mmu.translate(sf.slot()), Some(fpfn), "hit returned an evicted or remapped slot");
            thread::yield_now();
            assert_eq!(mmu.translate(sf.slot()), Some(fpfn), "slot evicted under a live handle");
        }
    };
    let t1 = thread::spawn(user(f.clone(), mmu.clone()));
    let t2 = thread::spawn(user(f.clone(), mmu.clone()));
    // max_excess = 0: every release evicts, racing the two users' hits.
    for g in &others {
        let sf = pool.alloc(g, Wait::Forever).unwrap();
        assert_eq!(mmu.translate(sf.slot()), Some(g.pfn()));
    }
    t1.join().unwrap();
    t2.join().unwrap();
    let s = pool.stats();
    assert_eq!((s.used, s.cached, s.mapped), (0, 0, 0), "{s}");
    assert_eq!(mmu.stats().mapped, 0);
    // SAFETY: all threads joined.
    unsafe { unleak(pool) };
}

#[test]
fn sfbuf_hit_vs_eviction() {
    model("sfbuf_hit_vs_eviction", hit_vs_eviction);
}

#[test]
fn sfbuf_hit_vs_eviction_mutant_no_recheck() {
    expect_failure("sfbuf_hit_vs_eviction", Mutant::EvictNoRecheck, hit_vs_eviction);
}

// === 4b. a hit through a stale hint while the slot is reused ===

/// One slot, so every eviction hands the slot to the next frame: a user of
/// frame `f` whose hint names the slot races the main thread mapping `g`
/// into it. The hit must take `f`'s mapping or make a new one, never `g`'s.
fn stale_hint() {
    let (mem, mmu, pool) = pool(2, 1, 0);
    let f = mem.alloc_page().unwrap();
    let g = mem.alloc_page().unwrap();
    let (fpfn, gpfn) = (f.pfn(), g.pfn());
    // Map `f` once and let it go: the hint now names slot 0, generation 1.
    drop(pool.alloc(&f, Wait::NoWait).unwrap());
    let mmu2 = mmu.clone();
    let t = thread::spawn(move || {
        let sf = pool.alloc(&f, Wait::Forever).unwrap();
        assert_eq!(mmu2.translate(sf.slot()), Some(fpfn), "hit through a stale hint returned another frame's slot");
    });
    let sf = pool.alloc(&g, Wait::Forever).unwrap();
    assert_eq!(mmu.translate(sf.slot()), Some(gpfn));
    drop(sf);
    t.join().unwrap();
    assert_eq!(pool.stats().used, 0);
    // SAFETY: the thread is joined.
    unsafe { unleak(pool) };
}

#[test]
fn sfbuf_stale_hint() {
    model("sfbuf_stale_hint", stale_hint);
}

/// A hit that trusts the frame's hint without the generation check takes a
/// reference on whatever now lives in the slot.
#[test]
fn sfbuf_stale_hint_mutant_hint_unchecked() {
    expect_failure("sfbuf_stale_hint", Mutant::HintUnchecked, stale_hint);
}

// === 5. waiting for the only slot ===

#[derive(Clone, Copy, Debug)]
enum Mode {
    Forever,
    TimeoutZero,
    TimeoutLong,
    Cancel,
    Close,
}

fn waiting(mode: Mode) {
    let (mem, mmu, pool) = pool(2, 1, 1);
    let a = mem.alloc_page().unwrap();
    let b = mem.alloc_page().unwrap();
    let bpfn = b.pfn();
    let token = CancelToken::new();
    let held = pool.alloc(&a, Wait::NoWait).unwrap();
    let wtoken = token.clone();
    let wmmu = mmu.clone();
    let waiter = thread::spawn(move || {
        let how = match mode {
            Mode::Forever | Mode::Close => Wait::Forever,
            Mode::TimeoutZero => Wait::Timeout(Duration::ZERO),
            Mode::TimeoutLong => Wait::Timeout(Duration::from_secs(3600)),
            Mode::Cancel => Wait::Cancel(&wtoken),
        };
        match pool.alloc(&b, how) {
            Ok(sf) => {
                assert_eq!(wmmu.translate(sf.slot()), Some(bpfn));
                "slot"
            }
            Err(Error::TimedOut) if matches!(mode, Mode::TimeoutZero) => "timeout",
            Err(Error::Cancelled) if matches!(mode, Mode::Cancel) => "cancel",
            Err(Error::Closed) if matches!(mode, Mode::Close) => "closed",
            Err(e) => panic!("waiter in mode {mode:?} ended with {e}"),
        }
    });
    let side = match mode {
        Mode::Cancel => Some(thread::spawn(move || token.cancel())),
        Mode::Close => Some(thread::spawn(move || pool.close())),
        _ => None,
    };
    drop(held); // the release that must wake the waiter
    let how = waiter.join().unwrap();
    if let Some(s) = side {
        s.join().unwrap();
    }
    if matches!(mode, Mode::Forever | Mode::TimeoutLong) {
        assert_eq!(how, "slot");
    }
    assert_eq!(pool.stats().used, 0);
    // SAFETY: all threads joined.
    unsafe { unleak(pool) };
}

#[test]
fn wait_forever_gets_the_slot() {
    model("wait_forever", || waiting(Mode::Forever));
}

#[test]
fn wait_with_timeout() {
    model("wait_timeout_zero", || waiting(Mode::TimeoutZero));
    model("wait_timeout_long", || waiting(Mode::TimeoutLong));
}

#[test]
fn wait_until_cancelled() {
    model("wait_cancel", || waiting(Mode::Cancel));
}

#[test]
fn wait_until_closed() {
    model("wait_close", || waiting(Mode::Close));
}

#[test]
fn wait_mutant_lost_wakeup() {
    expect_failure_in_child("wait_mutant_lost_wakeup", "wait_forever", Mutant::LostWakeup, "deadlock", || {
        waiting(Mode::Forever)
    });
}

// === 6. a pinned hit racing an eviction ===

/// One slot, `max_excess` 1: frame `f` is cached; a user takes it again
/// (a pinned hit: its reference is counted in the user's row of pins, not
/// on the entry) while the main thread needs the slot for frame `g`, so it
/// must evict `f`: never under the pin, and the pinned release must wake it.
fn pin_vs_eviction() {
    let (mem, mmu, pool) = pool(2, 1, 1);
    let f = mem.alloc_page().unwrap();
    let g = mem.alloc_page().unwrap();
    let (fpfn, gpfn) = (f.pfn(), g.pfn());
    drop(pool.alloc(&f, Wait::NoWait).unwrap()); // cached: the next hit pins
    let umm = mmu.clone();
    let user = thread::spawn(move || {
        let sf = pool.alloc(&f, Wait::Forever).unwrap();
        assert_eq!(umm.translate(sf.slot()), Some(fpfn), "pinned hit returned an evicted or remapped slot");
        thread::yield_now();
        assert_eq!(umm.translate(sf.slot()), Some(fpfn), "slot evicted under a pinned handle");
    });
    let sf = pool.alloc(&g, Wait::Forever).unwrap();
    assert_eq!(mmu.translate(sf.slot()), Some(gpfn));
    drop(sf);
    user.join().unwrap();
    let s = pool.stats();
    assert_eq!(s.used, 0, "{s}");
    assert!(s.cached <= 1 && s.mapped == s.cached, "{s}");
    // An entry left mapped but neither used nor listed would be missing
    // from `mapped`: compare with the MMU.
    assert_eq!(mmu.stats().mapped, s.mapped, "a mapping is neither in use nor cached: {s}");
    // SAFETY: all threads joined.
    unsafe { unleak(pool) };
}

#[test]
fn sfbuf_pin_vs_eviction() {
    model("sfbuf_pin_vs_eviction", pin_vs_eviction);
}

#[test]
fn sfbuf_pin_vs_eviction_mutant_pin_unchecked() {
    expect_failure("sfbuf_pin_vs_eviction", Mutant::PinUnchecked, pin_vs_eviction);
}

/// Two users pin the cached frame at once while the main thread waits for
/// its slot: the two pinned releases race to be the last, and one of them
/// (or the evictor's second count) must make the entry evictable again.
fn two_pins_vs_eviction() {
    let (mem, mmu, pool) = pool(2, 1, 1);
    let f = mem.alloc_page().unwrap();
    let g = mem.alloc_page().unwrap();
    let (fpfn, gpfn) = (f.pfn(), g.pfn());
    drop(pool.alloc(&f, Wait::NoWait).unwrap());
    let users: Vec<_> = (0..2)
        .map(|_| {
            let (f, umm) = (f.clone(), mmu.clone());
            thread::spawn(move || {
                let sf = pool.alloc(&f, Wait::Forever).unwrap();
                assert_eq!(umm.translate(sf.slot()), Some(fpfn), "slot evicted under a pinned handle");
            })
        })
        .collect();
    let sf = pool.alloc(&g, Wait::Forever).unwrap();
    assert_eq!(mmu.translate(sf.slot()), Some(gpfn));
    drop(sf);
    for u in users {
        u.join().unwrap();
    }
    let s = pool.stats();
    assert_eq!(s.used, 0, "{s}");
    assert_eq!(mmu.stats().mapped, s.mapped, "a mapping is neither in use nor cached: {s}");
    // SAFETY: all threads joined.
    unsafe { unleak(pool) };
}

#[test]
fn sfbuf_two_pins_vs_eviction() {
    model("sfbuf_two_pins_vs_eviction", two_pins_vs_eviction);
}
