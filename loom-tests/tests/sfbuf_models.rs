//! Loom models of the sf_buf pool: a hit racing an eviction, and waiting
//! for a slot (plain, timeout, cancel, close), pins (and a row of pins
//! handed from an exited thread to the next), and lazy reclaim (a miss
//! mapping over an evicted mapping in place, a batch removal racing it).

#![cfg(loom)]

use std::sync::Arc;
use std::time::Duration;

use loom::thread;
use loom_tests::{expect_failure, expect_failure_in_child, leak, model, unleak, Mutant};
use lwbuf::{Backing, CancelToken, Error, Mmu, ModelMmu, PhysMem, Reclaim, SfPool, Slot, Wait};

fn pool(frames: usize, slots: usize, max_excess: usize) -> (PhysMem, Arc<ModelMmu>, &'static SfPool) {
    let mem = PhysMem::builder().frames(frames).backing(Backing::Heap).build().unwrap();
    let mmu = Arc::new(ModelMmu::new(&mem, slots).unwrap());
    let p = SfPool::builder(mmu.clone()).max_excess(max_excess).shards(2).reclaim(Reclaim::Strict).build().unwrap();
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

// === 7. the races of the pinned-hit protocol, one small model each ===

/// A pool of one slot whose cached frame `f` was pinned once (so `PINNED`
/// is set and `REFERENCED` too): `max_excess` 1, `f` on the LRU, unused.
fn pinned_once(frames: usize) -> (PhysMem, Arc<ModelMmu>, &'static SfPool, Vec<lwbuf::Page>) {
    let (mem, mmu, pool) = pool(frames, 1, 1);
    let pages: Vec<_> = (0..frames).map(|_| mem.alloc_page().unwrap()).collect();
    drop(pool.alloc(&pages[0], Wait::NoWait).unwrap()); // a miss, then cached
    drop(pool.alloc(&pages[0], Wait::NoWait).unwrap()); // a pinned hit: PINNED
    (mem, mmu, pool, pages)
}

/// What every pin model checks at the end: nothing held, every mapping the
/// MMU still has is one the pool counts as cached (listed on the LRU), and
/// no more are cached than `max_excess` allows (a look by a miss's evictor
/// hides the entry it popped from a concurrent trim: an evictor must not
/// give up while an unused entry is listed, `miss.rs`, 13).
fn settled(pool: &SfPool, mmu: &ModelMmu) -> lwbuf::SfStats {
    let s = pool.stats();
    assert_eq!(s.used, 0, "{s}");
    assert_eq!(mmu.stats().mapped, s.mapped, "a mapping is neither in use nor cached: {s}");
    assert!(s.cached <= s.max_excess, "cached over the cap: {s}");
    s
}

/// 7a. The last two references of an entry are of different kinds: one in
/// the entry's count (central), one pin. An evictor took the entry off the
/// LRU because of the pin (REVOKED, PINNED, unlisted), then a central hit
/// came (a pin is refused on a revoked entry). Both holders release at
/// once: each fences and reads the other kind, so at least one sees both
/// at zero and relists the entry, and the CAS on `ON_LRU` lists it once.
fn central_and_pin_release() {
    let (mem, mmu, pool, pages) = pinned_once(2);
    let f: &'static lwbuf::Page = leak(pages[0].clone());
    let pinned = pool.alloc(f, Wait::NoWait).unwrap();
    // The evictor's look: it counts the pin and takes `f` off the LRU; no
    // room is left for `g`.
    assert!(matches!(pool.alloc(&pages[1], Wait::NoWait), Err(Error::WouldBlock)));
    let central = pool.alloc(f, Wait::NoWait).unwrap();
    assert_eq!(pool.stats().used, 1, "the second holder took a pin, not a central reference");
    let t = thread::spawn(move || drop(pinned));
    drop(central);
    t.join().unwrap();
    let s = settled(pool, &mmu);
    // Listed exactly once: not at all leaves it neither used nor cached;
    // twice makes the LRU's length 2 > max_excess, and the trim evicts it.
    assert_eq!((s.cached, mmu.stats().mapped), (1, 1), "relisted never or twice: {s}");
    // SAFETY: all threads joined; the handles are dropped.
    unsafe {
        unleak(pool);
        unleak(f);
    }
    drop(mem);
}

#[test]
fn sfbuf_central_and_pin_release() {
    model("sfbuf_central_and_pin_release", central_and_pin_release);
}

/// Without the fence after its decrement, each release may read the other
/// kind from before the other's decrement: neither relists.
#[test]
fn sfbuf_central_and_pin_release_mutant_no_fence() {
    expect_failure("sfbuf_central_and_pin_release", Mutant::LastReleaseNoFence, central_and_pin_release);
}

/// 7b. A hitter reads the state of a cached entry that was pinned before
/// (`PINNED` already set, so it takes its pin without a CAS) while a trim
/// looks at the entry: `REFERENCED` gives it a second chance, which clears
/// `REVOKED` and `PINNED` together. A hitter that read the state before
/// that look and re-checks after it must back off (its pin was not
/// counted, and with `PINNED` clear the next look kills without counting).
fn pinned_reset() {
    let (_mem, mmu, pool, pages) = pinned_once(1);
    let f = pages[0].clone();
    let fpfn = f.pfn();
    let umm = mmu.clone();
    let hitter = thread::spawn(move || {
        // NoWait: the trim may be unmapping `f` right now (no room).
        if let Ok(sf) = pool.alloc(&f, Wait::NoWait) {
            assert_eq!(umm.translate(sf.slot()), Some(fpfn), "hit returned an evicted slot");
            thread::yield_now();
            assert_eq!(umm.translate(sf.slot()), Some(fpfn), "slot evicted under a pinned handle");
        }
    });
    pool.set_max_excess(0); // the trim: looks until `f` is gone or in use
    hitter.join().unwrap();
    settled(pool, &mmu);
    // SAFETY: the thread is joined.
    unsafe { unleak(pool) };
}

#[test]
fn sfbuf_pinned_reset() {
    model("sfbuf_pinned_reset", pinned_reset);
}

/// A re-check blind to `PINNED` sees `REVOKED` as it was and keeps a pin
/// nobody counted; the next look kills the entry under it.
#[test]
fn sfbuf_pinned_reset_mutant_recheck_no_pinned() {
    expect_failure("sfbuf_pinned_reset", Mutant::PinRecheckNoPinned, pinned_reset);
}

/// 7c. A hitter of frame `f` adds its pin to the slot's count just as the
/// main thread evicts `f` and republishes the slot for `g` (the next
/// generation). The hitter backs off, but until it gives the pin back, a
/// look at `g`'s entry may count it and take `g` off the LRU: either the
/// look's second count after unlisting sees the pin gone and relists `g`,
/// or the late unpin (which relists the generation it reads, not the one
/// it pinned) does. `g` must neither stay unlisted nor be killed under it.
fn stale_pin_reuse() {
    let (_mem, mmu, pool, pages) = pinned_once(2);
    let (f, g) = (pages[0].clone(), pages[1].clone());
    let (fpfn, gpfn) = (f.pfn(), g.pfn());
    let umm = mmu.clone();
    let hitter = thread::spawn(move || {
        // NoWait: the slot may be `g`'s, in use; then there is no room.
        if let Ok(sf) = pool.alloc(&f, Wait::NoWait) {
            assert_eq!(umm.translate(sf.slot()), Some(fpfn), "hit returned another generation's slot");
        }
    });
    if let Ok(sf) = pool.alloc(&g, Wait::NoWait) {
        assert_eq!(mmu.translate(sf.slot()), Some(gpfn));
        drop(sf);
        // Pinned, so `g` is PINNED (unless the hitter took the slot back).
        drop(pool.alloc(&g, Wait::NoWait));
        pool.set_max_excess(0); // the look that may count a stale pin
    }
    hitter.join().unwrap();
    settled(pool, &mmu);
    // SAFETY: the thread is joined.
    unsafe { unleak(pool) };
}

#[test]
fn sfbuf_stale_pin_reuse() {
    model("sfbuf_stale_pin_reuse", stale_pin_reuse);
}

/// An evictor that does not count the pins again after unlisting leaves
/// `g` unlisted when the stale pin went between its two looks.
#[test]
fn sfbuf_stale_pin_reuse_mutant_no_recount() {
    expect_failure("sfbuf_stale_pin_reuse", Mutant::UnlistNoRecount, stale_pin_reuse);
}

/// A pinned release issues only the light barrier (`handle.rs`, 12): an
/// evictor that unlists with no barrier of its own before it counts the
/// pins again can miss that release's decrement while the release misses
/// the unlisting, and `g` stays unlisted.
#[test]
fn sfbuf_stale_pin_reuse_mutant_unlist_light() {
    expect_failure("sfbuf_stale_pin_reuse", Mutant::UnlistLight, stale_pin_reuse);
}

/// (`miss.rs`, 13) The hitter's alloc of `f` may miss and need `g`'s slot
/// while the main thread pins `g` and then trims to a cap of 0: while the
/// miss's look has `g` popped, the trim sees an empty LRU and stops. An
/// evictor that gives up when its looks run out, although `g` is listed
/// and unused again, leaves `g` cached over the cap.
#[test]
fn sfbuf_stale_pin_reuse_mutant_looks_run_short() {
    let msg = expect_failure("sfbuf_stale_pin_reuse", Mutant::LooksRunShort, stale_pin_reuse);
    assert!(msg.contains("cached over the cap"), "failed for another reason: {msg}");
}

/// 7d. A pinned holder of the cached frame `f` releases while the main
/// thread lowers `max_excess` to 0 and then hits `f` again. When the unpin
/// finds `f` still listed with the LRU over the cap, it trims, and its trim
/// may judge `f` while the main thread's hit pins it: the pin is either
/// counted (REVOKED, then off the LRU) or refused by the hit's re-check.
fn unpin_trims() {
    let (_mem, mmu, pool, pages) = pinned_once(1);
    let f: &'static lwbuf::Page = leak(pages[0].clone());
    let fpfn = f.pfn();
    let pinned = pool.alloc(f, Wait::NoWait).unwrap();
    let t = thread::spawn(move || drop(pinned));
    pool.set_max_excess(0);
    // NoWait: the unpin's trim may be unmapping `f` right now.
    if let Ok(sf) = pool.alloc(f, Wait::NoWait) {
        assert_eq!(mmu.translate(sf.slot()), Some(fpfn), "hit returned an evicted slot");
        thread::yield_now();
        assert_eq!(mmu.translate(sf.slot()), Some(fpfn), "slot evicted under a live handle");
    }
    t.join().unwrap();
    settled(pool, &mmu);
    // SAFETY: the thread is joined; its handle is dropped.
    unsafe {
        unleak(pool);
        unleak(f);
    }
}

#[test]
fn sfbuf_unpin_trims() {
    model("sfbuf_unpin_trims", unpin_trims);
}

/// A re-check blind to `REVOKED` keeps a pin the trim did not count while
/// the trim goes on to kill the entry.
#[test]
fn sfbuf_unpin_trims_mutant_recheck_no_revoked() {
    expect_failure("sfbuf_unpin_trims", Mutant::PinRecheckNoRevoked, unpin_trims);
}

/// 7e. A thread that owns a row of pins writes it with a plain load and
/// store (`hit.rs`, 9). Here the main thread pins the cached frame `f` in
/// its row and hands the handle to another thread, which gives the pin
/// back while the main thread pins `f` again in the same row. The giver
/// must not write the main thread's row (it subtracts in its own shared
/// row): at the end no pin is left and `f` is cached, unused.
fn foreign_unpin() {
    let (_mem, mmu, pool, pages) = pinned_once(1);
    let f: &'static lwbuf::Page = leak(pages[0].clone());
    let fpfn = f.pfn();
    let sf = pool.alloc(f, Wait::NoWait).unwrap();
    let giver = thread::spawn(move || drop(sf));
    let again = pool.alloc(f, Wait::NoWait).unwrap();
    assert_eq!(mmu.translate(again.slot()), Some(fpfn));
    drop(again);
    giver.join().unwrap();
    let s = settled(pool, &mmu);
    assert_eq!((s.cached, mmu.stats().mapped), (1, 1), "{s}");
    // SAFETY: the thread is joined; every handle is dropped.
    unsafe {
        unleak(pool);
        unleak(f);
    }
}

#[test]
fn sfbuf_foreign_unpin() {
    model("sfbuf_foreign_unpin", foreign_unpin);
}

/// A giver that writes the owner's row as the owner does races with the
/// owner's own load and store: one update is lost and a pin stays counted
/// (the entry never becomes evictable again).
#[test]
fn sfbuf_foreign_unpin_mutant_plain() {
    expect_failure("sfbuf_foreign_unpin", Mutant::ForeignUnpinPlain, foreign_unpin);
}

/// 7f. A pin given back by another thread while the main thread needs the
/// slot: the pin is counted in its taker's row and subtracted in the
/// giver's shared row, and the evictor, which sums every row, must neither
/// evict under the pin nor miss its release (it waits for the slot).
fn foreign_unpin_vs_eviction() {
    let (mem, mmu, pool) = pool(2, 1, 1);
    let f: &'static lwbuf::Page = leak(mem.alloc_page().unwrap());
    let g = mem.alloc_page().unwrap();
    let (fpfn, gpfn) = (f.pfn(), g.pfn());
    drop(pool.alloc(f, Wait::NoWait).unwrap());
    let sf = pool.alloc(f, Wait::NoWait).unwrap(); // pinned, in the main thread's row
    let umm = mmu.clone();
    let giver = thread::spawn(move || {
        assert_eq!(umm.translate(sf.slot()), Some(fpfn), "slot evicted under a pinned handle");
        thread::yield_now();
        assert_eq!(umm.translate(sf.slot()), Some(fpfn), "slot evicted under a pinned handle");
        drop(sf);
    });
    let sg = pool.alloc(&g, Wait::Forever).unwrap();
    assert_eq!(mmu.translate(sg.slot()), Some(gpfn));
    drop(sg);
    giver.join().unwrap();
    let s = pool.stats();
    assert_eq!(s.used, 0, "{s}");
    assert_eq!(mmu.stats().mapped, s.mapped, "a mapping is neither in use nor cached: {s}");
    // SAFETY: the thread is joined; every handle is dropped.
    unsafe {
        unleak(pool);
        unleak(f);
    }
}

#[test]
fn sfbuf_foreign_unpin_vs_eviction() {
    model("sfbuf_foreign_unpin_vs_eviction", foreign_unpin_vs_eviction);
}

/// An evictor that ignores pins evicts `f` while the giver still holds it.
#[test]
fn sfbuf_foreign_unpin_vs_eviction_mutant_pin_unchecked() {
    expect_failure("sfbuf_foreign_unpin_vs_eviction", Mutant::PinUnchecked, foreign_unpin_vs_eviction);
}

/// 7g. A row of pins changes hands (`hit.rs`, 9; `counter.rs`). Thread A
/// claims a statistics stripe, and with it a row, the first time it pins:
/// it pins the cached frame `f` in its row, gives the pin back and pins
/// `f` again (each a plain load and store of the row); then it exits,
/// giving the stripe back, and hands its pin to the main thread. Thread B
/// pins `f` and gives the pin back meanwhile: when it claims the stripe A
/// gave back, it continues A's row with loads and stores that must start
/// from A's last count (the claim's Acquire pairs with the give-back's
/// Release). While A's pin is out the rows must not sum to zero; once
/// every handle is gone no pin may be left.
fn pin_row_handover() {
    let (mem, mmu, pool) = pool(1, 1, 1);
    let f: &'static lwbuf::Page = leak(mem.alloc_page().unwrap());
    let fpfn = f.pfn();
    drop(pool.alloc(f, Wait::NoWait).unwrap()); // a miss, then cached: no thread holds a row yet
    let a = thread::spawn(move || {
        drop(pool.alloc(f, Wait::NoWait).unwrap()); // pinned and given back in A's row
        let kept = pool.alloc(f, Wait::NoWait).unwrap(); // pinned in A's row
        lwbuf::__loom::exit_thread(); // A's stripe and row are free for the next thread to claim
        kept
    });
    let b = thread::spawn(move || {
        // In A's row if B claims after A's exit, else in a row of its own.
        drop(pool.alloc(f, Wait::NoWait).unwrap());
        lwbuf::__loom::exit_thread();
    });
    let kept = a.join().unwrap();
    assert_eq!(mmu.translate(kept.slot()), Some(fpfn));
    assert_eq!(pool.stats().used, 1, "a pin is out, but the rows of pins sum to zero");
    drop(kept); // a foreign unpin, or (if the main thread claims A's row now) its new owner's
    b.join().unwrap();
    let s = pool.stats();
    assert_eq!(s.used, 0, "every handle is gone, but the rows of pins do not sum to zero: {s}");
    assert_eq!((s.cached, mmu.stats().mapped), (1, 1), "{s}");
    // SAFETY: the threads are joined; every handle is dropped.
    unsafe {
        unleak(pool);
        unleak(f);
    }
}

#[test]
fn sfbuf_pin_row_handover() {
    model("sfbuf_pin_row_handover", pin_row_handover);
}

/// A claim without Acquire: B's load of A's row may read a count older
/// than A's last, and B's store then loses A's later ones (A's pin no
/// longer counted, or a pin given back still counted).
#[test]
fn sfbuf_pin_row_handover_mutant_claim_relaxed() {
    let msg = expect_failure("sfbuf_pin_row_handover", Mutant::ClaimRelaxed, pin_row_handover);
    assert!(msg.contains("rows of pins"), "failed for another reason: {msg}");
}

// === 8. lazy reclaim: evicted mappings mapped over in place ===

/// A pool under lazy reclaim (the default) with one page per frame of the
/// memory, each frame's first word marked with its number.
fn lazy_pool(frames: usize, slots: usize, max_excess: usize) -> (Arc<ModelMmu>, &'static SfPool, Vec<lwbuf::Page>) {
    let mem = PhysMem::builder().frames(frames).backing(Backing::Heap).build().unwrap();
    let mmu = Arc::new(ModelMmu::new(&mem, slots).unwrap());
    let p = SfPool::builder(mmu.clone()).max_excess(max_excess).shards(2).build().unwrap();
    assert_eq!(p.reclaim_mode(), Reclaim::Lazy);
    let pages: Vec<_> = (0..frames).map(|_| mem.alloc_page().unwrap()).collect();
    for pg in &pages {
        pg.direct().unwrap().write_u64(0, mark(pg)).unwrap();
    }
    (mmu, leak(p), pages)
}

fn mark(page: &lwbuf::Page) -> u64 {
    0x5f00_0000 + page.pfn().0 as u64
}

/// What a handle must see for its whole life: its slot maps its frame, and
/// its bytes are that frame's.
fn maps_its_frame(mmu: &ModelMmu, sf: &lwbuf::SfBuf<'_>, when: &str) {
    let pfn = sf.page().pfn();
    assert_eq!(mmu.translate(sf.slot()), Some(pfn), "{when}: slot {} does not map frame {}", sf.slot().0, pfn.0);
    assert_eq!(sf.kva().read_u64(0).unwrap(), mark(sf.page()), "{when}: the handle's bytes are not its frame's");
}

/// Nothing held or cached (`max_excess` 0), so every slot is free or
/// stale: a last reclaim removes every stale mapping (one remove per
/// contiguous range), and nothing is left entered.
fn lazy_settled(pool: &SfPool, mmu: &ModelMmu) {
    let s = pool.stats();
    assert_eq!((s.used, s.cached), (0, 0), "{s}");
    pool.reclaim();
    assert_eq!(mmu.stats().mapped, 0, "a stale mapping outlived the last reclaim: {}", mmu.stats());
}

/// 8a. Two slots, `max_excess` 0: every last release evicts, and under
/// lazy reclaim the eviction leaves the old frame entered for the next miss
/// to map over in place. Frame `a` was mapped and evicted, so a stale claim
/// waits from the start. The main thread holds frame `f` (a miss, over the
/// stale claim or not) while another thread maps `g`, hits (or maps) `f`
/// and maps `h`: a miss takes a stale claim if one waits and replaces the
/// frame there, and none may pick a slot whose handle still lives.
fn lazy_replace_vs_reader() {
    let (mmu, pool, pages) = lazy_pool(4, 2, 0);
    drop(pool.alloc(&pages[0], Wait::NoWait).unwrap());
    let f = &pages[1];
    let (others, omm) = ([2, 1, 3].map(|i| pages[i].clone()), mmu.clone());
    let t = thread::spawn(move || {
        for p in &others {
            let sf = pool.alloc(p, Wait::Forever).unwrap();
            maps_its_frame(&omm, &sf, "other thread");
        }
    });
    let sf = pool.alloc(f, Wait::Forever).unwrap();
    maps_its_frame(&mmu, &sf, "holder, at alloc");
    thread::yield_now();
    maps_its_frame(&mmu, &sf, "holder, later (replaced in place under a live handle?)");
    drop(sf);
    t.join().unwrap();
    assert!(mmu.stats().replaces >= 1, "a miss took the stale claim and mapped over it: {}", mmu.stats());
    lazy_settled(pool, &mmu);
    // SAFETY: the thread is joined.
    unsafe { unleak(pool) };
}

#[test]
fn sfbuf_lazy_replace_vs_reader() {
    model("sfbuf_lazy_replace_vs_reader", lazy_replace_vs_reader);
}

/// A stale claim handed out but left listed is taken again by the next
/// miss, which maps over the slot the first taker's handle still uses.
#[test]
fn sfbuf_lazy_replace_vs_reader_mutant_stale_take_keeps() {
    let msg = expect_failure("sfbuf_lazy_replace_vs_reader", Mutant::StaleTakeKeeps, lazy_replace_vs_reader);
    assert!(msg.contains("does not map frame"), "failed for another reason: {msg}");
}

/// Who runs the batch removal in `purge_vs_stale_take`.
#[derive(Clone, Copy, Debug)]
enum Purger {
    /// `SfPool::reclaim`.
    Reclaim,
    /// A miss for a run of two frames: no stale claim has its length, no
    /// two clean slots are adjacent, so it removes the stale ones first.
    RunMiss,
}

/// 8b. A batch removal racing a miss that takes a stale claim. Frames `a`
/// and `b` were mapped side by side and evicted: two stale claims, slots 0
/// and 1, whose removal coalesces into one call (slot 2 is clean). A user
/// maps `f` (taking a stale claim and mapping over it, or, after the purge
/// took the list, a clean slot) while the main thread runs the purge
/// (`by`): it must remove only claims it took off the list, never one a
/// miss took and mapped over.
fn purge_vs_stale_take(by: Purger) {
    let (mmu, pool, pages) = lazy_pool(6, 3, 0);
    let (a, b) = (pool.alloc(&pages[0], Wait::NoWait).unwrap(), pool.alloc(&pages[1], Wait::NoWait).unwrap());
    drop((a, b));
    assert_eq!(mmu.stats().mapped, 2, "lazy reclaim leaves evicted mappings entered");
    let f = pages[2].clone();
    let umm = mmu.clone();
    let user = thread::spawn(move || {
        let sf = pool.alloc(&f, Wait::Forever).unwrap_or_else(|e| panic!("user's miss failed: {e}"));
        maps_its_frame(&umm, &sf, "user, at alloc");
        thread::yield_now();
        maps_its_frame(&umm, &sf, "user, later (removed by a purge under a live handle?)");
    });
    match by {
        Purger::Reclaim => {
            pool.reclaim();
        }
        Purger::RunMiss => {
            // Waits, if the user holds a slot of the only adjacent pair,
            // for its release (an eviction: a stale claim again).
            let sf = pool.alloc_run(&pages[4..6], Wait::Forever).unwrap();
            for (i, p) in sf.pages().iter().enumerate() {
                assert_eq!(mmu.translate(Slot(sf.slot().0 + i)), Some(p.pfn()), "the run's slots map its frames");
            }
        }
    }
    user.join().unwrap();
    lazy_settled(pool, &mmu);
    // SAFETY: the thread is joined.
    unsafe { unleak(pool) };
}

#[test]
fn sfbuf_purge_vs_stale_take() {
    model("sfbuf_purge_vs_stale_take/reclaim", || purge_vs_stale_take(Purger::Reclaim));
    model("sfbuf_purge_vs_stale_take/run_miss", || purge_vs_stale_take(Purger::RunMiss));
}

/// A purge that copies the list removes the claim the user took meanwhile:
/// the user's slot goes (or its replace finds it gone).
#[test]
fn sfbuf_purge_vs_stale_take_mutant_purge_snapshot() {
    for by in [Purger::Reclaim, Purger::RunMiss] {
        let msg = expect_failure("sfbuf_purge_vs_stale_take", Mutant::PurgeSnapshot, move || purge_vs_stale_take(by));
        assert!(
            msg.contains("does not map frame") || msg.contains("user's miss failed"),
            "{by:?}: failed for another reason: {msg}"
        );
    }
}
