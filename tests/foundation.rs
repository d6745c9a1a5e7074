//! Integration tests of the foundation: `PhysMem` and `Page`, the frame
//! allocator, and both `Mmu` backends (the real `Window` and the `ModelMmu`).
//!
//! Tests that make sense on both backends are written once, generic over a
//! [`Backend`], and instantiated for each by `on_both_backends!`. The window
//! runs on a memfd; the model runs on `Backing::Heap`, the memory loom models
//! and simulations use.

use std::fs;
use std::ptr::NonNull;
use std::sync::{Arc, Barrier};
use std::thread;

use lwbuf::{
    system_page_size, Backing, Error, Kaddr, Mmu, ModelMmu, Page, Pfn, PhysMem, Slot, Window, MAX_REGION_BYTES,
};

// === helpers ===

#[macro_use]
#[path = "common/backend.rs"]
mod backend;
use backend::Backend;

on_both_backends!(
    writes_through_a_mapping_are_seen_everywhere,
    run_is_one_enter_and_one_remove,
    enter_and_remove_outside_the_window_are_errors,
    two_mib_frames,
);

/// A builder of the memory the backend-neutral tests use: a memfd (the
/// default), or heap memory under Miri, which cannot create a memfd.
fn memory() -> lwbuf::PhysMemBuilder {
    let backing = if cfg!(miri) { Backing::Heap } else { Backing::Memfd };
    PhysMem::builder().backing(backing)
}

/// Enter `count` frames from `pfn` at `slot`, panicking on error.
fn enter(mmu: &dyn Mmu, slot: usize, pfn: usize, count: usize) -> NonNull<u8> {
    // SAFETY: every test owns its MMU outright and enters only slots it has
    // not entered (or has removed) before; nothing refers to them.
    unsafe { mmu.enter(Slot(slot), Pfn(pfn), count) }.expect("enter")
}

/// Remove `count` slots from `slot`, panicking on error.
fn remove(mmu: &dyn Mmu, slot: usize, count: usize) {
    // SAFETY: the tests drop every address into these slots before removing.
    unsafe { mmu.remove(Slot(slot), count) }.expect("remove")
}

/// Copy `len` bytes at `p + off` out of a mapping.
///
/// # Safety
/// `p + off .. p + off + len` must be mapped readable.
unsafe fn peek(p: NonNull<u8>, off: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: the range is mapped (contract); `v` is a distinct buffer.
    unsafe { std::ptr::copy_nonoverlapping(p.as_ptr().add(off), v.as_mut_ptr(), len) };
    v
}

/// Copy `bytes` into a mapping at `p + off`.
///
/// # Safety
/// `p + off .. p + off + bytes.len()` must be mapped writable.
unsafe fn poke(p: NonNull<u8>, off: usize, bytes: &[u8]) {
    // SAFETY: the range is mapped writable (contract); `bytes` is distinct.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.as_ptr().add(off), bytes.len()) };
}

fn read_frame(mem: &PhysMem, pfn: Pfn, off: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_frame(pfn, off, &mut v).expect("read_frame");
    v
}

/// Assert that `r` is `Error::Config` about `what`, and that its message
/// names `mentions`.
#[track_caller]
fn assert_config<T: std::fmt::Debug>(r: lwbuf::Result<T>, what: &str, mentions: &str) {
    match r {
        Err(ref e @ Error::Config { what: w, .. }) => {
            assert_eq!(w, what, "wrong setting blamed: {e}");
            assert!(e.to_string().contains(mentions), "message {e:?} does not mention {mentions:?}");
        }
        other => panic!("expected Error::Config {{ what: {what:?} }}, got {other:?}"),
    }
}

// === mappings: coherence, runs, VMAs ===

/// Bytes written through a mapping are the frame's: the direct map and a
/// second mapping of the frame in another slot see them; after a remove, the
/// slot shows whatever frame is entered there next.
fn writes_through_a_mapping_are_seen_everywhere(b: Backend) {
    let fs = system_page_size();
    let mem = b.phys_sized(16, fs);
    let mmu = b.mmu(&mem, 8);
    let a = mem.alloc_page().unwrap();
    let c = mem.alloc_page().unwrap();
    assert_ne!(a.pfn(), c.pfn());
    c.direct().unwrap().write_at(100, b"frame c").unwrap();

    let p1 = enter(&*mmu, 1, a.pfn().0, 1);
    // SAFETY: slot 1 maps frame a, a whole frame.
    unsafe { poke(p1, 0, b"through slot 1") };
    // SAFETY: as above; the last byte of the frame.
    unsafe { poke(p1, fs - 1, &[0x5a]) };
    assert_eq!(read_frame(&mem, a.pfn(), 0, 14), b"through slot 1");
    assert_eq!(read_frame(&mem, a.pfn(), fs - 1, 1), [0x5a]);

    let p3 = enter(&*mmu, 3, a.pfn().0, 1);
    if b == Backend::Window {
        assert_ne!(p1, p3, "two slots of the window are two addresses");
    }
    // SAFETY: slot 3 maps frame a too.
    assert_eq!(unsafe { peek(p3, 0, 14) }, b"through slot 1");
    // SAFETY: as above.
    unsafe { poke(p3, 20, b"via 3") };
    // SAFETY: slot 1 still maps frame a.
    assert_eq!(unsafe { peek(p1, 20, 5) }, b"via 3");
    assert_eq!(mmu.translate(Slot(1)), Some(a.pfn()));
    assert_eq!(mmu.translate(Slot(3)), Some(a.pfn()));
    assert_eq!(mmu.kva(Slot(1)), Some(p1));

    remove(&*mmu, 1, 1);
    assert_eq!(mmu.translate(Slot(1)), None);
    assert_eq!(mmu.kva(Slot(1)), None);
    let p1b = enter(&*mmu, 1, c.pfn().0, 1);
    if b == Backend::Window {
        assert_eq!(p1b, p1, "a slot's address does not change");
    }
    // SAFETY: slot 1 now maps frame c.
    assert_eq!(unsafe { peek(p1b, 100, 7) }, b"frame c");
    // SAFETY: as above.
    assert_eq!(unsafe { peek(p1b, 0, 14) }, vec![0u8; 14], "frame c was never written there");
    // SAFETY: slot 3 still maps frame a.
    assert_eq!(unsafe { peek(p3, 0, 14) }, b"through slot 1");

    remove(&*mmu, 1, 1);
    remove(&*mmu, 3, 1);
    let s = mmu.stats();
    assert_eq!((s.enters, s.removes, s.pages_entered, s.pages_removed, s.mapped), (3, 3, 3, 3, 0));
    match b {
        Backend::Window => assert_eq!(s.syscalls, 1 + 3 + 3, "reserve, then one per enter and remove"),
        Backend::Model => assert_eq!(s.syscalls, 0),
    }
    assert_eq!(s.remove_fallbacks, 0);
}

/// A run of 64 contiguous frames entered with one call is one enter and one
/// remove, on both backends; the frames land in consecutive slots.
fn run_is_one_enter_and_one_remove(b: Backend) {
    let fs = system_page_size();
    let mem = b.phys_sized(128, fs);
    let mmu = b.mmu(&mem, 64);
    let run = mem.alloc_run(64).unwrap();
    for (i, p) in run.iter().enumerate() {
        p.direct().unwrap().write_u64(8, i as u64 * 3 + 1).unwrap();
    }
    let before = mmu.stats();
    let base = enter(&*mmu, 0, run[0].pfn().0, 64);
    for (i, p) in run.iter().enumerate() {
        assert_eq!(mmu.translate(Slot(i)), Some(p.pfn()));
        // SAFETY: the run maps 64 frames contiguously from `base`.
        let got = unsafe { peek(base, i * fs + 8, 8) };
        assert_eq!(u64::from_ne_bytes(got.try_into().unwrap()), i as u64 * 3 + 1);
    }
    remove(&*mmu, 0, 64);
    let d = mmu.stats().since(&before);
    assert_eq!((d.enters, d.removes, d.pages_entered, d.pages_removed, d.mapped), (1, 1, 64, 64, 0));
    assert_eq!(d.syscalls, if b == Backend::Window { 2 } else { 0 });
    assert!((0..64).all(|i| mmu.translate(Slot(i)).is_none()));
}

/// Lines of /proc/self/maps whose range intersects `lo..hi`, as
/// `(start, end, perms)`.
fn vmas_in(lo: usize, hi: usize) -> Vec<(usize, usize, String)> {
    let maps = fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    maps.lines()
        .filter_map(|line| {
            let mut it = line.split_whitespace();
            let (s, e) = it.next()?.split_once('-')?;
            let perms = it.next()?.to_string();
            Some((usize::from_str_radix(s, 16).ok()?, usize::from_str_radix(e, 16).ok()?, perms))
        })
        .filter(|&(s, e, _)| s < hi && e > lo)
        .collect()
}

/// Mapped (readable) VMAs inside the window: the reservation itself is
/// `---p`, entered frames are `rw-s`.
fn mapped_vmas(win: &Window) -> Vec<(usize, usize, String)> {
    let lo = win.base() as usize;
    let mut v = vmas_in(lo, lo + win.len());
    v.retain(|(_, _, perms)| perms.starts_with("rw"));
    v
}

#[test]
#[cfg_attr(miri, ignore = "counts VMAs of the real window in /proc/self/maps (mmap)")]
fn contiguous_run_is_one_vma_scattered_frames_are_many() {
    let fs = system_page_size();
    let mem = PhysMem::builder().frames(512).build().unwrap();
    let win = Window::builder(&mem).slots(256).build().unwrap();
    let base = win.base() as usize;
    assert_eq!(win.len(), 256 * fs);
    assert!(mapped_vmas(&win).is_empty(), "a fresh window maps nothing");
    assert_eq!(vmas_in(base, base + win.len()).len(), 1, "a fresh window is one PROT_NONE reservation");
    // Aligned to the kernel's fault-around block (64 KiB), so that a
    // granule of 16 frames or more is mapped whole blocks at a time.
    assert_eq!(base % (64 << 10), 0, "window base {base:#x}");

    // One call for 64 contiguous frames: one VMA, exactly the run.
    let run = mem.alloc_run(64).unwrap();
    let before = win.stats();
    let p = enter(&win, 0, run[0].pfn().0, 64);
    for i in 0..64 {
        // SAFETY: the run maps 64 frames from `p`; touch one byte of each.
        unsafe { poke(p, i * fs, &[i as u8]) };
    }
    assert_eq!(mapped_vmas(&win), vec![(base, base + 64 * fs, "rw-s".to_string())]);
    remove(&win, 0, 64);
    let d = win.stats().since(&before);
    assert_eq!((d.enters, d.removes, d.syscalls), (1, 1, 2));
    assert!(mapped_vmas(&win).is_empty());

    // 64 frames with non-contiguous frame numbers in adjacent slots: the
    // file offsets do not follow each other, so no two VMAs can merge.
    let scattered: Vec<Page> = {
        let all = mem.alloc_run(128).unwrap();
        all.into_iter().step_by(2).collect()
    };
    for (i, pg) in scattered.iter().enumerate() {
        let p = enter(&win, i, pg.pfn().0, 1);
        // SAFETY: slot i maps one frame.
        unsafe { poke(p, 0, &[1]) };
    }
    assert_eq!(mapped_vmas(&win).len(), 64, "scattered frames in adjacent slots");
    for i in 0..64 {
        remove(&win, i, 1);
    }
    assert!(mapped_vmas(&win).is_empty());

    // Contiguous frames in non-adjacent slots: separated by reservation.
    for (i, pg) in run.iter().enumerate() {
        enter(&win, 2 * i + 1, pg.pfn().0, 1);
    }
    assert_eq!(mapped_vmas(&win).len(), 64, "contiguous frames in non-adjacent slots");
    for i in 0..64 {
        remove(&win, 2 * i + 1, 1);
    }
    assert!(mapped_vmas(&win).is_empty());
    let s = win.stats();
    assert_eq!((s.enters, s.removes, s.mapped, s.remove_fallbacks), (1 + 64 + 64, 1 + 64 + 64, 0, 0));
    // The window's reservation is whole again: removes restore PROT_NONE.
    assert!(vmas_in(base, base + win.len()).iter().all(|(_, _, perms)| perms == "---p"));
}

// === physical memory ===

/// Resident set size of this process, in bytes.
fn rss_bytes() -> usize {
    let statm = fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let resident: usize = statm.split_whitespace().nth(1).expect("statm field 2").parse().expect("a number");
    resident * system_page_size()
}

#[test]
#[cfg_attr(miri, ignore = "a memfd and /proc/self/status")]
fn one_tib_sparse_memory_costs_no_resident_memory() {
    const TIB: usize = 1 << 40;
    let fs = system_page_size();
    let rss0 = rss_bytes();
    let mem = PhysMem::builder().frames(TIB / fs).build().expect("a 1 TiB sparse PhysMem");
    assert_eq!(mem.bytes(), TIB);
    assert_eq!(mem.stats().free, TIB / fs);

    // A far frame through the direct map.
    let far = Pfn(mem.frames() - 1);
    mem.write_frame(far, fs - 8, b"far away").unwrap();
    assert_eq!(read_frame(&mem, far, fs - 8, 8), b"far away");
    // The same frame through a small window: the offset is right at 1 TiB.
    let win = Window::builder(&mem).slots(4).build().unwrap();
    let p = enter(&win, 2, far.0, 1);
    // SAFETY: slot 2 maps the far frame.
    assert_eq!(unsafe { peek(p, fs - 8, 8) }, b"far away");
    remove(&win, 2, 1);
    // And an allocated page of it.
    let page = mem.alloc_page().unwrap();
    page.direct().unwrap().write_u64(0, 0xfeed).unwrap();
    assert_eq!(page.direct().unwrap().read_u64(0).unwrap(), 0xfeed);

    let grown = rss_bytes().saturating_sub(rss0);
    // Other tests run in parallel in this process; 64 MiB is far above what
    // any of them touches and far below what a non-sparse 1 TiB would be.
    assert!(grown < 64 << 20, "RSS grew by {} MiB", grown >> 20);
}

#[test]
fn exhaustion_is_out_of_frames() {
    let mem = memory().frames(8).build().unwrap();
    match mem.alloc_run(9) {
        Err(Error::OutOfFrames { requested: 9, free: 8, largest_run: 8 }) => {}
        other => panic!("expected OutOfFrames for a run larger than memory, got {other:?}"),
    }
    let mut pages: Vec<Page> = (0..8).map(|_| mem.alloc_page().unwrap()).collect();
    assert_eq!(mem.stats().free, 0);
    match mem.alloc_page() {
        Err(Error::OutOfFrames { requested: 1, free: 0, largest_run: 0 }) => {}
        other => panic!("expected OutOfFrames, got {other:?}"),
    }
    pages.swap_remove(3);
    let again = mem.alloc_page().expect("a freed frame is allocatable again");
    assert!(matches!(mem.alloc_page(), Err(Error::OutOfFrames { .. })));
    drop(again);
    match mem.alloc_run(2) {
        Err(Error::OutOfFrames { requested: 2, free: 1, largest_run: 1 }) => {}
        other => panic!("expected OutOfFrames for a run, got {other:?}"),
    }
    assert!(mem.alloc_run(0).unwrap().is_empty());
}

#[test]
fn run_after_fragmentation_churn() {
    const N: usize = 256;
    let mem = memory().frames(N).build().unwrap();
    for _round in 0..3 {
        let mut pages: Vec<Page> = (0..N).map(|_| mem.alloc_page().unwrap()).collect();
        assert_eq!(mem.stats().free, 0);
        pages.sort_by_key(|p| p.pfn());
        // Free every other frame: the free memory is as fragmented as it gets.
        let odd: Vec<Page> = pages.iter().skip(1).step_by(2).cloned().collect();
        pages = pages.into_iter().step_by(2).collect();
        drop(odd.into_iter().rev().collect::<Vec<_>>());
        let s = mem.stats();
        assert_eq!((s.free, s.largest_free_run), (N / 2, 1));
        assert!(matches!(mem.alloc_run(2), Err(Error::OutOfFrames { requested: 2, largest_run: 1, .. })));
        drop(pages);
        let run = mem.alloc_run(N).expect("the whole memory as one run after churn");
        assert!(run.windows(2).all(|w| w[1].pfn().0 == w[0].pfn().0 + 1));
        assert_eq!(mem.stats().free, 0);
    }
    assert_eq!(mem.stats().largest_free_run, N);
}

#[test]
fn frame_returns_when_the_last_clone_drops_on_any_thread() {
    let mem = memory().frames(64).build().unwrap();
    let page = mem.alloc_page().unwrap();
    assert_eq!(mem.stats().free, 63);
    let c1 = page.clone();
    let c2 = page.clone();
    assert_eq!(page.hold_count(), 3);
    assert_eq!(c1, page);
    drop(page);
    assert_eq!(mem.stats().free, 63, "two holds remain");
    drop(c1);
    assert_eq!(mem.stats().free, 63, "one hold remains");
    thread::spawn(move || drop(c2)).join().unwrap();
    assert_eq!(mem.stats().free, 64, "the last hold was dropped on another thread");

    // Many holders on many threads, released at once.
    let pages = mem.alloc_run(16).unwrap();
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let mine: Vec<Page> = pages.iter().flat_map(|p| [p.clone(), p.clone()]).collect();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                drop(mine);
            })
        })
        .collect();
    assert_eq!(mem.stats().free, 48);
    drop(pages);
    for h in handles {
        h.join().unwrap();
    }
    let s = mem.stats();
    assert_eq!((s.free, s.largest_free_run), (64, 64));
}

#[test]
#[cfg_attr(miri, ignore = "compares memfd memory with heap memory (memfd_create)")]
fn pages_know_their_memory() {
    let a = PhysMem::builder().frames(4).build().unwrap();
    let b = PhysMem::builder().frames(4).build().unwrap();
    let pa = a.alloc_page().unwrap();
    let pb = b.alloc_page().unwrap();
    assert!(pa.phys().same_as(&a));
    assert!(pa.phys().same_as(&a.clone()));
    assert!(!pa.phys().same_as(&b));
    assert!(!pb.phys().same_as(pa.phys()));
    // Equal frame numbers of different memories are different pages.
    assert_eq!(pa.pfn(), pb.pfn(), "fresh memories hand out the same first frame");
    assert_ne!(pa, pb);
    assert_eq!(pa.clone(), pa);

    let heap = PhysMem::builder().frames(4).backing(Backing::Heap).build().unwrap();
    assert_eq!(heap.backing(), Backing::Heap);
    assert!(heap.memfd().is_none());
    assert_config(Window::builder(&heap).slots(4).build(), "backing", "memfd");
}

#[test]
#[cfg_attr(miri, ignore = "most configurations checked are of memfd memory and the window (memfd_create, mmap)")]
fn configuration_errors() {
    let page = system_page_size();
    let b = || PhysMem::builder();
    assert_config(b().build(), "frames", "at least one frame");
    assert_config(b().frames(0).backing(Backing::Heap).build(), "frames", "at least one frame");
    for bad in [0, 1, 1000, 2048, page / 2, page + page / 2, 6144, 3 * page] {
        assert_config(b().frames(4).frame_size(bad).build(), "frame_size", &bad.to_string());
    }
    // frames * frame_size overflows, or exceeds the limit by one frame.
    assert_config(b().frames(usize::MAX).build(), "frames", "TiB");
    assert_config(b().frames(2).frame_size(1 << (usize::BITS - 1)).build(), "frames", "TiB");
    assert_config(b().frames(MAX_REGION_BYTES / page + 1).build(), "frames", "TiB");
    assert_config(b().frames(MAX_REGION_BYTES / page + 1).direct_map(false).build(), "frames", "TiB");
    assert_config(b().frames(4).name("nul\0byte").build(), "name", "NUL");
    // Exactly at the limit is allowed (without a direct map it costs nothing).
    let max = b().frames(MAX_REGION_BYTES / page).direct_map(false).build().expect("a PhysMem of MAX_REGION_BYTES");
    assert_eq!(max.bytes(), MAX_REGION_BYTES);

    let mem = b().frames(4).build().unwrap();
    assert_config(Window::builder(&mem).slots(0).build(), "slots", "at least one slot");
    assert_config(Window::builder(&mem).slots(MAX_REGION_BYTES / page + 1).build(), "slots", "TiB");
    assert_config(Window::builder(&mem).slots(usize::MAX).build(), "slots", "TiB");
    assert_config(ModelMmu::new(&mem, 0), "slots", "at least one slot");

    let undirected = b().frames(4).direct_map(false).build().unwrap();
    assert!(!undirected.has_direct_map());
    assert!(matches!(ModelMmu::new(&undirected, 4), Err(Error::NoDirectMap)));
    let pg = undirected.alloc_page().unwrap();
    assert!(matches!(pg.direct(), Err(Error::NoDirectMap)));
    assert!(matches!(undirected.read_frame(Pfn(0), 0, &mut [0u8; 1]), Err(Error::NoDirectMap)));
    // The window does not need the direct map.
    let win = Window::builder(&undirected).slots(2).build().unwrap();
    let p = enter(&win, 0, pg.pfn().0, 1);
    // SAFETY: slot 0 maps the page.
    unsafe { poke(p, 0, b"no dmap") };
    // SAFETY: as above.
    assert_eq!(unsafe { peek(p, 0, 7) }, b"no dmap");
    remove(&win, 0, 1);
}

/// Slot or frame ranges outside the window or memory are errors, not
/// panics, and leave the MMU untouched.
fn enter_and_remove_outside_the_window_are_errors(b: Backend) {
    let mem = b.phys_sized(8, system_page_size());
    let mmu = b.mmu(&mem, 4);
    let before = mmu.stats();
    let enters: [(usize, usize, usize, &str); 9] = [
        (4, 0, 1, "slot range"),          // slot == capacity
        (3, 0, 2, "slot range"),          // run past the last slot
        (0, 0, 5, "slot range"),          // run longer than the window
        (0, 0, 0, "slot range"),          // empty run
        (usize::MAX, 0, 1, "slot range"), // slot + count overflows
        (0, 8, 1, "frame range"),         // pfn == frames
        (0, 6, 3, "frame range"),         // run past the last frame
        (0, usize::MAX, 1, "frame range"),
        (1, usize::MAX - 1, 2, "frame range"),
    ];
    for (slot, pfn, count, what) in enters {
        // SAFETY: nothing is entered anywhere; the call must fail cleanly.
        let r = unsafe { mmu.enter(Slot(slot), Pfn(pfn), count) };
        assert_config(r, what, "outside");
    }
    for (slot, count) in [(4, 1), (2, 3), (0, 0), (usize::MAX, 2)] {
        // SAFETY: as above.
        let r = unsafe { mmu.remove(Slot(slot), count) };
        assert_config(r, "slot range", "outside");
    }
    assert_eq!(mmu.stats(), before, "failed calls change nothing");
    assert_eq!(mmu.translate(Slot(4)), None);
    assert_eq!(mmu.kva(Slot(usize::MAX)), None);
    // The edges themselves are fine.
    enter(&*mmu, 3, 7, 1);
    enter(&*mmu, 0, 5, 3);
    remove(&*mmu, 0, 4);
}

/// 2 MiB frames work as plain larger mappings: the last byte of a frame,
/// and of a run of two, is reachable through a mapping and lands in the frame.
fn two_mib_frames(b: Backend) {
    const FS: usize = 2 << 20;
    let mem = b.phys_sized(4, FS);
    assert_eq!(mem.frame_size(), FS);
    let mmu = b.mmu(&mem, 3);
    assert_eq!(mmu.slot_size(), FS);

    let page = mem.alloc_page().unwrap();
    assert_eq!(page.direct().unwrap().len(), FS);
    assert_eq!(page.offset(), (page.pfn().0 * FS) as u64);
    let p = enter(&*mmu, 1, page.pfn().0, 1);
    assert_eq!(mmu.kva(Slot(1)), Some(p));
    // SAFETY: slot 1 maps a whole 2 MiB frame.
    unsafe { poke(p, FS - 1, &[0xa5]) };
    // SAFETY: as above.
    unsafe { poke(p, 0, &[0x11]) };
    assert_eq!(read_frame(&mem, page.pfn(), FS - 1, 1), [0xa5]);
    assert_eq!(read_frame(&mem, page.pfn(), 0, 1), [0x11]);
    assert!(matches!(page.direct().unwrap().read_at(FS, &mut [0u8; 1]), Err(Error::OutOfBounds { .. })));
    remove(&*mmu, 1, 1);

    let run = mem.alloc_run(2).unwrap();
    run[1].direct().unwrap().write_at(FS - 4, b"end!").unwrap();
    let p = enter(&*mmu, 1, run[0].pfn().0, 2);
    // SAFETY: slots 1 and 2 map the run, 4 MiB from `p`.
    assert_eq!(unsafe { peek(p, 2 * FS - 4, 4) }, b"end!");
    // SAFETY: as above.
    unsafe { poke(p, FS - 1, &[7]) };
    assert_eq!(read_frame(&mem, run[0].pfn(), FS - 1, 1), [7]);
    remove(&*mmu, 1, 2);
    assert_eq!(mmu.stats().mapped, 0);
}

// === views ===

/// `write_u64` / `read_u64` at every offset of a word, aligned or not, at
/// both ends of a frame: the value round-trips, is stored native-endian
/// (as `write_at` of its bytes would), and no neighbouring byte changes.
#[test]
fn u64_helpers_at_every_alignment() {
    let fs = system_page_size();
    let mem = memory().frames(4).build().unwrap();
    let page = mem.alloc_page().unwrap();
    let k = page.direct().unwrap();
    let v = 0x0102_0304_0506_0708u64;
    for off in (0..=16).chain(fs - 16..=fs - 8) {
        k.fill(0xee).expect("fill");
        k.write_u64(off, v).unwrap();
        assert_eq!(k.read_u64(off).unwrap(), v, "offset {off}");
        let mut frame = vec![0u8; fs];
        k.read_at(0, &mut frame).unwrap();
        assert_eq!(&frame[off..off + 8], &v.to_ne_bytes(), "offset {off}");
        assert!(
            frame[..off].iter().chain(&frame[off + 8..]).all(|&b| b == 0xee),
            "a neighbour of offset {off} changed"
        );
        // And the other way round: bytes written as bytes read as a word.
        k.write_at(off, &u64::MAX.to_ne_bytes()).unwrap();
        assert_eq!(k.read_u64(off).unwrap(), u64::MAX, "offset {off}");
    }
    for off in [fs - 7, fs - 1, fs, usize::MAX - 7, usize::MAX] {
        assert!(matches!(k.read_u64(off), Err(Error::OutOfBounds { len: 8, .. })), "offset {off}");
        assert!(matches!(k.write_u64(off, 1), Err(Error::OutOfBounds { len: 8, .. })), "offset {off}");
    }
}

#[test]
fn direct_view_bounds() {
    let fs = system_page_size();
    let mem = memory().frames(4).build().unwrap();
    let page = mem.alloc_page().unwrap();
    let k: Kaddr<'_> = page.direct().unwrap();
    assert_eq!(k.len(), fs);
    assert_eq!(Some(k.as_ptr()), mem.direct_ptr(page.pfn()).map(NonNull::as_ptr));

    let oob = |r: lwbuf::Result<()>, offset: usize, len: usize| match r {
        Err(Error::OutOfBounds { offset: o, len: l, size }) => assert_eq!((o, l, size), (offset, len, fs)),
        other => panic!("expected OutOfBounds at {offset}+{len}, got {other:?}"),
    };
    oob(k.read_at(fs - 1, &mut [0u8; 2]), fs - 1, 2);
    oob(k.read_at(fs, &mut [0u8; 1]), fs, 1);
    oob(k.write_at(fs, &[1]), fs, 1);
    oob(k.read_at(usize::MAX, &mut [0u8; 1]), usize::MAX, 1);
    oob(k.write_at(1, &vec![0u8; fs]), 1, fs);
    assert!(matches!(k.read_u64(fs - 7), Err(Error::OutOfBounds { .. })));
    assert!(matches!(k.write_u64(fs - 7, 1), Err(Error::OutOfBounds { .. })));
    // The edges are in bounds.
    k.write_u64(fs - 8, u64::MAX).unwrap();
    assert_eq!(k.read_u64(fs - 8).unwrap(), u64::MAX);
    k.read_at(fs, &mut []).unwrap();
    k.write_at(0, &vec![3u8; fs]).unwrap();
    k.fill(9).expect("fill");
    assert_eq!(read_frame(&mem, page.pfn(), 0, fs), vec![9u8; fs]);

    // Frames outside the memory, through `PhysMem`.
    assert!(matches!(mem.read_frame(Pfn(4), 0, &mut [0u8; 1]), Err(Error::OutOfBounds { .. })));
    assert!(matches!(mem.write_frame(Pfn(usize::MAX), 0, &[0]), Err(Error::OutOfBounds { .. })));
    assert!(matches!(mem.read_frame(Pfn(0), fs, &mut [0u8; 1]), Err(Error::OutOfBounds { .. })));
    assert_eq!(mem.direct_ptr(Pfn(4)), None);
}

#[test]
fn auto_traits() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<PhysMem>();
    send_sync::<Page>();
    send_sync::<Window>();
    send_sync::<ModelMmu>();
    send_sync::<Kaddr<'static>>();
    send_sync::<Error>();
    send_sync::<Arc<dyn Mmu>>();
}

/// `pin_to_core` reports the core it pinned to, and the thread's affinity
/// is then that core alone; cpu ids beyond the cores wrap round.
#[test]
fn pin_to_core_reports_the_core() {
    fn affinity() -> Vec<usize> {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the call writes
        // at most `size_of::<cpu_set_t>()` bytes into it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; pid 0 is the calling thread.
        let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        assert_eq!(r, 0, "sched_getaffinity");
        // SAFETY: `set` is initialized and `c` is below CPU_SETSIZE.
        (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
    }
    let allowed = thread::spawn(affinity).join().expect("thread");
    for cpu in [0, 1, allowed.len(), usize::MAX] {
        let (core, now) = thread::spawn(move || {
            let core = lwbuf::pin_to_core(cpu).expect("pin");
            (core, affinity())
        })
        .join()
        .expect("thread");
        assert_eq!(core, allowed[cpu % allowed.len()], "cpu {cpu}");
        assert_eq!(now, [core], "cpu {cpu}: the thread runs on that core alone");
    }
}
