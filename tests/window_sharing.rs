//! A window's slots are handed out by one slot allocator at a time: a second
//! cache over a window in use is refused at build time, and entering a frame
//! over a live slot is refused instead of silently replacing it.

#[macro_use]
#[path = "common/backend.rs"]
mod backend;

use std::sync::Arc;

use backend::{stamped_pages, Backend};
use lwbuf::sendfile::WindowSource;
use lwbuf::{Error, FaultyMmu, Lwbufs, Mmu, Pfn, SfPool, Slot};

on_both_backends!(
    second_lwbufs_is_refused,
    pool_beside_lwbufs_is_refused,
    wrapper_shares_the_claim,
    claim_ends_with_the_cache,
    window_with_frames_entered_by_hand_is_refused,
    enter_over_a_live_slot_is_refused,
    threads_racing_to_claim_one_window,
);

fn second_lwbufs_is_refused(b: Backend) {
    let mem = b.phys(16);
    let mmu = b.mmu(&mem, 8);
    let first = Lwbufs::builder(mmu.clone()).cpus(2).build().expect("first cache");
    let second = Lwbufs::builder(mmu.clone()).cpus(2).build();
    assert!(matches!(second, Err(Error::WindowClaimed)), "{second:?}");

    // The first cache still works, and its handle reads its own frame.
    let pages = stamped_pages(&mem, 2);
    let _cpu = first.bind(0).expect("bind");
    let h = first.alloc(&pages[1]).expect("alloc");
    let got = h.kva().expect("kva").read_u64(0).expect("read");
    assert_eq!(got, backend::pattern(pages[1].pfn().0, 0));
}

fn pool_beside_lwbufs_is_refused(b: Backend) {
    let mem = b.phys(16);
    let mmu = b.mmu(&mem, 8);
    let lw = Lwbufs::builder(mmu.clone()).cpus(2).build().expect("cache");
    let pool = SfPool::builder(mmu.clone()).build();
    assert!(matches!(pool, Err(Error::WindowClaimed)), "{pool:?}");
    let src = WindowSource::new(mmu.clone());
    assert!(matches!(src, Err(Error::WindowClaimed)), "{src:?}");
    drop(lw);

    // And the other way round.
    let pool = SfPool::builder(mmu.clone()).build().expect("pool");
    let lw = Lwbufs::builder(mmu.clone()).cpus(2).build();
    assert!(matches!(lw, Err(Error::WindowClaimed)), "{lw:?}");
    drop(pool);
}

fn wrapper_shares_the_claim(b: Backend) {
    let mem = b.phys(16);
    let mmu = b.mmu(&mem, 8);
    let faulty: Arc<dyn Mmu> = Arc::new(FaultyMmu::new(mmu.clone()));
    let lw = Lwbufs::builder(faulty.clone()).cpus(2).build().expect("cache over the wrapper");
    let direct = SfPool::builder(mmu.clone()).build();
    assert!(matches!(direct, Err(Error::WindowClaimed)), "{direct:?}");
    drop(lw);
    let pool = SfPool::builder(mmu.clone()).build().expect("pool over the window");
    let wrapped = Lwbufs::builder(faulty).cpus(2).build();
    assert!(matches!(wrapped, Err(Error::WindowClaimed)), "{wrapped:?}");
    drop(pool);
}

fn claim_ends_with_the_cache(b: Backend) {
    let mem = b.phys(16);
    let mmu = b.mmu(&mem, 4);
    let pages = stamped_pages(&mem, 4);
    for round in 0..3 {
        // Each cache maps every slot, then goes; the next starts empty.
        let lw = Lwbufs::builder(mmu.clone()).cpus(1).max_excess(4).build().expect("cache");
        {
            let _cpu = lw.bind(0).expect("bind");
            for p in &pages {
                drop(lw.alloc(p).expect("alloc"));
            }
        }
        assert_eq!(mmu.stats().mapped, 4, "round {round}");
        drop(lw);
        assert_eq!(mmu.stats().mapped, 0, "round {round}: the cache removes what it entered");
        let pool = SfPool::builder(mmu.clone()).build().expect("pool after the cache");
        for p in &pages {
            let got = pool.alloc(p, lwbuf::Wait::NoWait).expect("alloc").kva().read_u64(8).expect("read");
            assert_eq!(got, backend::pattern(p.pfn().0, 1));
        }
        drop(pool);
    }
}

fn window_with_frames_entered_by_hand_is_refused(b: Backend) {
    let mem = b.phys(16);
    let mmu = b.mmu(&mem, 8);
    // SAFETY: slot 2 is empty and no cache serves the window.
    unsafe { mmu.enter(Slot(2), Pfn(5), 1) }.expect("enter by hand");
    let lw = Lwbufs::builder(mmu.clone()).cpus(1).build();
    assert!(matches!(lw, Err(Error::WindowClaimed)), "{lw:?}");
    // SAFETY: nothing refers to slot 2.
    unsafe { mmu.remove(Slot(2), 1) }.expect("remove");
    Lwbufs::builder(mmu).cpus(1).build().expect("an empty window can be claimed");
}

fn enter_over_a_live_slot_is_refused(b: Backend) {
    let mem = b.phys(16);
    let mmu = b.mmu(&mem, 8);
    let pages = stamped_pages(&mem, 8);
    let (one, three) = (pages[1].pfn(), pages[3].pfn());
    // SAFETY: slots 0..2 are empty and nothing refers to them.
    unsafe { mmu.enter(Slot(0), one, 2) }.expect("enter");
    let before = mmu.stats();
    // SAFETY: nothing refers to slot 1's old contents; entering over it is
    // the mistake the call must refuse.
    let r = unsafe { mmu.enter(Slot(1), three, 1) };
    assert!(matches!(r, Err(Error::SlotOccupied { slot: 1 })), "{r:?}");
    // A run of live slots then a free one is refused as a whole.
    // SAFETY: as above.
    let r = unsafe { mmu.enter(Slot(0), three, 3) };
    assert!(matches!(r, Err(Error::SlotOccupied { slot: 0 })), "{r:?}");
    assert_eq!(mmu.stats().enters, before.enters, "nothing was entered");
    assert_eq!(mmu.translate(Slot(1)), Some(Pfn(one.0 + 1)));
    assert_eq!(mmu.translate(Slot(2)), None, "the refused run left no trace");
    // The live mapping still shows its own frame.
    let mut b8 = [0u8; 8];
    let addr = mmu.kva(Slot(1)).expect("mapped");
    // SAFETY: slot 1 maps a whole frame; only this thread uses it.
    unsafe { std::ptr::copy_nonoverlapping(addr.as_ptr(), b8.as_mut_ptr(), 8) };
    assert_eq!(u64::from_ne_bytes(b8), backend::pattern(one.0 + 1, 0));
    // A refused enter leaves the slot usable once it is free.
    // SAFETY: nothing refers to slots 0..2.
    unsafe { mmu.remove(Slot(0), 2) }.expect("remove");
    // SAFETY: slot 1 is empty now.
    unsafe { mmu.enter(Slot(1), three, 1) }.expect("enter after remove");
    assert_eq!(mmu.translate(Slot(1)), Some(three));
    // SAFETY: nothing refers to slot 1.
    unsafe { mmu.remove(Slot(1), 1) }.expect("remove");
}

/// Eight threads build a cache over one window at the same moment (pools and
/// lwbuf caches alternately): exactly one wins, every other gets
/// `WindowClaimed`, and once the winner is dropped the window serves again.
fn threads_racing_to_claim_one_window(b: Backend) {
    let mem = b.phys(16);
    let mmu = b.mmu(&mem, 8);
    for round in 0..if cfg!(miri) { 2 } else { 20 } {
        let start = std::sync::Barrier::new(8);
        let (won, refused) = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|t| {
                    let (mmu, start) = (mmu.clone(), &start);
                    s.spawn(move || {
                        start.wait();
                        // Built and dropped at once: the claim is given back
                        // and may be taken again by whoever comes next.
                        if t % 2 == 0 {
                            Lwbufs::builder(mmu).cpus(1).build().map(|_| ())
                        } else {
                            SfPool::builder(mmu).build().map(|_| ())
                        }
                    })
                })
                .collect();
            let rs: Vec<_> = hs.into_iter().map(|h| h.join().expect("thread")).collect();
            let won = rs.iter().filter(|r| r.is_ok()).count();
            let refused = rs.iter().filter(|r| matches!(r, Err(Error::WindowClaimed))).count();
            (won, refused)
        });
        // The caches are dropped as soon as built, so several may win one
        // after another, but every attempt either won or was refused, and
        // the window is free again at the end.
        assert_eq!(won + refused, 8, "round {round}");
        assert!(won >= 1, "round {round}");
        assert_eq!(mmu.stats().mapped, 0);
    }
    // Held caches: exactly one of eight concurrent builders gets the window.
    let start = std::sync::Barrier::new(8);
    let done = std::sync::Barrier::new(8);
    let won = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let (mmu, start, done) = (mmu.clone(), &start, &done);
                s.spawn(move || {
                    start.wait();
                    let r = Lwbufs::builder(mmu).cpus(1).build();
                    let ok = r.is_ok();
                    assert!(ok || matches!(r, Err(Error::WindowClaimed)), "{r:?}");
                    done.wait(); // every builder has tried while the winner holds it
                    ok
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).filter(|&ok| ok).count()
    });
    assert_eq!(won, 1, "exactly one of eight racing builders claims the window");
    Lwbufs::builder(mmu).cpus(1).build().expect("free again once the winner is gone");
}
