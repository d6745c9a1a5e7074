//! Huge-page memory (`Backing::HugeTlb`): the caches map whole huge pages.
//!
//! Tests that need huge pages skip, saying why, when too few are reserved
//! (`echo 64 > /proc/sys/vm/nr_hugepages` as root reserves 128 MiB; `.ci/run`
//! does that for the suite and puts the old value back). The refusal with
//! too few reserved is tested on every machine.

#![cfg(not(miri))]

use std::sync::Arc;

use lwbuf::{huge_page_size, huge_pages_free, Backing, Error, Lwbufs, PhysMem, SfPool, Wait, Window};

/// Frames of one huge page, and whether `n` huge pages are free; prints why
/// a test skips.
fn huge_pages(n: usize, test: &str) -> Option<usize> {
    let size = huge_page_size().ok()?;
    let free = huge_pages_free(size).unwrap_or(0);
    if free < n {
        println!("{test}: skipped: {free} huge pages free, {n} needed (echo {n} > /proc/sys/vm/nr_hugepages)");
        return None;
    }
    Some(size / lwbuf::system_page_size())
}

#[test]
fn too_few_huge_pages_is_an_error_naming_nr_hugepages() {
    let Ok(size) = huge_page_size() else {
        println!("skipped: the kernel has no huge pages");
        return;
    };
    let per = size / lwbuf::system_page_size();
    let free = huge_pages_free(size).unwrap_or(0);
    let e = PhysMem::builder().frames((free + 1) * per).backing(Backing::HugeTlb).build().unwrap_err();
    let Error::HugePages { needed, free: f, size: s } = e else { panic!("{e:?}") };
    assert_eq!((needed, s), (free + 1, size));
    assert!(f <= free);
    let shown = e.to_string();
    assert!(shown.contains("vm.nr_hugepages") && shown.contains("/proc/sys/vm/nr_hugepages"), "{shown}");
    assert_eq!(std::io::Error::from(e).kind(), std::io::ErrorKind::OutOfMemory);
}

#[test]
fn memory_that_is_not_whole_huge_pages_is_refused() {
    let Ok(size) = huge_page_size() else { return };
    let per = size / lwbuf::system_page_size();
    for frames in [1, per - 1, per + 1] {
        let e = PhysMem::builder().frames(frames).backing(Backing::HugeTlb).build().unwrap_err();
        assert!(matches!(e, Error::Config { what: "frames", .. }), "{frames}: {e:?}");
        assert!(e.to_string().contains("huge pages"), "{e}");
    }
}

#[test]
fn caches_map_whole_huge_pages() {
    let Some(per) = huge_pages(4, "caches_map_whole_huge_pages") else { return };
    let mem = PhysMem::builder().frames(2 * per).backing(Backing::HugeTlb).build().unwrap();
    assert_eq!((mem.backing(), mem.min_granule()), (Backing::HugeTlb, per));
    let pages = mem.alloc_run(2 * per).unwrap();
    for p in &pages {
        p.direct().unwrap().write_u64(8, p.pfn().0 as u64 * 3).unwrap();
    }

    // A granule smaller than a huge page, or not a multiple of one: refused.
    for bad in [1, per / 2] {
        let w = Arc::new(Window::builder(&mem).slots(2 * per).build().unwrap());
        let e = Lwbufs::builder(w).cpus(1).granule(bad).build().unwrap_err();
        assert!(matches!(e, Error::Config { what: "granule", .. }), "{bad}: {e:?}");
    }

    let w = Arc::new(Window::builder(&mem).slots(per).build().unwrap());
    assert_eq!(w.base() as usize % (per * mem.frame_size()), 0, "the window starts on a huge page");
    let lw = Lwbufs::builder(w.clone()).cpus(1).build().unwrap();
    assert_eq!(lw.granule(), per);
    let _cpu = lw.bind(0).unwrap();
    for i in [3, 0, per - 1, per, 2 * per - 1, 5] {
        let h = lw.alloc(&pages[i]).unwrap();
        let k = h.kva().unwrap();
        assert_eq!(k.len(), mem.frame_size());
        assert_eq!(k.read_u64(8).unwrap(), i as u64 * 3, "page {i}");
        k.write_u64(16, i as u64).unwrap();
    }
    // Two huge pages through one slot's worth of granule: the second evicts
    // the first (mapped over in place), the third maps the first again.
    let st = lw.stats();
    assert_eq!((st.total.hits, st.total.misses), (3, 3), "{st}");
    assert_eq!(st.mmu.pages_entered, 3 * per as u64, "{st}");
    for (i, p) in pages.iter().enumerate().step_by(97) {
        let mut b = [0u8; 8];
        p.direct().unwrap().read_at(16, &mut b).unwrap();
        if [3, 0, per - 1, per, 2 * per - 1, 5].contains(&i) {
            assert_eq!(u64::from_ne_bytes(b), i as u64);
        }
    }
    drop(_cpu);
    assert_eq!(lw.check_consistency(), Ok(0));
    drop(lw);

    // Three granules of slots: the run crosses two huge pages and is mapped
    // apart from the single page's granule.
    let pool = SfPool::builder(Arc::new(Window::builder(&mem).slots(3 * per).build().unwrap())).build().unwrap();
    assert_eq!(pool.granule(), per);
    let a = pool.alloc(&pages[per + 7], Wait::NoWait).unwrap();
    let b = pool.alloc_run(&pages[per - 2..per + 2], Wait::NoWait).unwrap();
    assert_eq!(a.kva().read_u64(8).unwrap(), (per as u64 + 7) * 3);
    assert_eq!(b.kva().read_u64(8 + 3 * mem.frame_size()).unwrap(), (per as u64 + 1) * 3);
    assert_eq!(pool.stats().mmu.enters, 2, "one granule, then the two huge pages the run crosses");
    drop((a, b));
    pool.reclaim();
    assert_eq!(pool.stats().mmu.mapped, 0);
}
