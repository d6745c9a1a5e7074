//! Read-only windows (`WindowBuilder::read_only`, `ModelMmu::new_read_only`):
//! every view the caches hand out of them refuses writes with
//! `Error::ReadOnly` before touching a byte, reads see the frames, the real
//! window maps `PROT_READ`, and the default stays read-write.

use std::sync::Arc;

use lwbuf::{Error, Kaddr, Lwbufs, Mmu, ModelMmu, PhysMem, SfPool, Wait, Window};

#[macro_use]
#[path = "common/backend.rs"]
mod backend;
use backend::{pattern, stamped_run, Backend};

/// A read-only MMU of `slots` slots over `mem` on backend `b`.
fn read_only_mmu(b: Backend, mem: &PhysMem, slots: usize) -> Arc<dyn Mmu> {
    match b {
        Backend::Window => Arc::new(Window::builder(mem).slots(slots).read_only(true).build().expect("Window")),
        Backend::Model => Arc::new(ModelMmu::new_read_only(mem, slots).expect("ModelMmu")),
    }
}

/// Every write of a read-only view is refused, nothing changes, and reads
/// see the frame's stamp.
fn check_read_only_view(k: Kaddr<'_>, pfn: usize) {
    let fs = lwbuf::system_page_size();
    assert!(!k.is_writable(), "{k:?}");
    assert!(matches!(k.write_at(0, &[1, 2, 3]), Err(Error::ReadOnly)));
    assert!(matches!(k.write_at(0, &[]), Err(Error::ReadOnly)));
    assert!(matches!(k.write_u64(8, 7), Err(Error::ReadOnly)));
    assert!(matches!(k.fill(0), Err(Error::ReadOnly)));
    // The refusal comes first, even for a range outside the view.
    assert!(matches!(k.write_at(usize::MAX, &[1]), Err(Error::ReadOnly)));
    for w in [0, 1, fs / 8 - 1] {
        assert_eq!(k.read_u64(w * 8).expect("read"), pattern(pfn, w), "word {w}");
    }
    k.prefault(0, k.len()).expect("prefault reads only");
}

/// An sf_buf, an lwbuf and owned handles of both over a read-only MMU: read
/// only, whatever the handle; the frames keep their bytes; the direct map
/// stays writable.
fn every_handle_of_a_read_only_window_refuses_writes(b: Backend) {
    let mem = b.phys(16);
    let run = stamped_run(&mem, 4);
    let pfn = run[1].pfn().0;

    let pool = Arc::new(SfPool::builder(read_only_mmu(b, &mem, 8)).build().expect("SfPool"));
    let h = pool.alloc(&run[1], Wait::NoWait).expect("alloc");
    check_read_only_view(h.kva(), pfn);
    let o = pool.alloc_owned(&run[1], Wait::NoWait).expect("alloc_owned");
    check_read_only_view(o.kva(), pfn);
    let r = pool.alloc_run(&run, Wait::NoWait).expect("alloc_run");
    assert!(matches!(r.kva().fill(1), Err(Error::ReadOnly)));
    drop((h, o, r));

    let lw = Arc::new(Lwbufs::builder(read_only_mmu(b, &mem, 8)).cpus(1).build().expect("Lwbufs"));
    let _cpu = lw.bind(0).expect("bind");
    let h = lw.alloc(&run[1]).expect("alloc");
    check_read_only_view(h.kva().expect("kva"), pfn);
    let o = lw.alloc_owned(&run[1]).expect("alloc_owned");
    check_read_only_view(o.kva().expect("kva"), pfn);
    drop((h, o));

    let d = run[1].direct().expect("direct");
    assert!(d.is_writable());
    assert_eq!(d.read_u64(0).expect("read"), pattern(pfn, 0), "a refused write changed the frame");
    d.write_u64(0, 5).expect("the direct map stays writable");
}

/// A read-only MMU says so; an lwbuf run and a view on another CPU of a
/// read-only window refuse writes too; `read_from` and `read_exact_from`
/// are refused before any system call (any descriptor will do).
fn read_only_mmus_runs_foreign_views_and_reads_into_them(b: Backend) {
    let mem = b.phys(16);
    let run = stamped_run(&mem, 4);
    let mmu = read_only_mmu(b, &mem, 16);
    assert!(!mmu.writable());
    let lw = Lwbufs::builder(mmu).cpus(2).build().expect("Lwbufs");
    let h = {
        let _cpu0 = lw.bind(0).expect("bind 0");
        let h = lw.alloc_run(&run).expect("alloc_run");
        assert!(matches!(h.kva().expect("kva").write_u64(0, 1), Err(Error::ReadOnly)));
        h
    };
    {
        let _cpu1 = lw.bind(1).expect("bind 1");
        let k = h.kva().expect("kva on CPU 1");
        check_read_only_view(k, run[0].pfn().0);
        let fd = std::io::stdin();
        for e in
            [k.read_from(&fd, 0, 8).expect_err("read_from"), k.read_exact_from(&fd, 0, 8).expect_err("read_exact_from")]
        {
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
            assert!(matches!(e.into_inner().expect("inner").downcast::<Error>().map(|b| *b), Ok(Error::ReadOnly)));
        }
        assert_eq!(k.read_from(&fd, 0, 0).expect_err("even for 0 bytes").kind(), std::io::ErrorKind::PermissionDenied);
        drop(h);
    }
    assert_eq!(Error::ReadOnly.to_string(), "a write through a read-only mapping");
    assert_eq!(Error::ReadOnly.errno(), None);
}

/// A default window and model are writable, and so are their views.
fn default_windows_stay_writable(b: Backend) {
    let mem = b.phys(8);
    let run = stamped_run(&mem, 1);
    let pool = SfPool::builder(b.mmu(&mem, 4)).build().expect("SfPool");
    assert!(pool.mmu().writable());
    let h = pool.alloc(&run[0], Wait::NoWait).expect("alloc");
    assert!(h.kva().is_writable());
    h.kva().write_u64(0, 9).expect("write");
    assert_eq!(run[0].direct().expect("direct").read_u64(0).expect("read"), 9);
}

/// `as_mut_slice` of a read-only view panics instead of handing out a
/// slice whose writes would fault.
fn as_mut_slice_of_a_read_only_view_panics(b: Backend) {
    let mem = b.phys(8);
    let run = stamped_run(&mem, 1);
    let pool = SfPool::builder(read_only_mmu(b, &mem, 4)).build().expect("SfPool");
    let h = pool.alloc(&run[0], Wait::NoWait).expect("alloc");
    let k = h.kva();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: nothing else uses the frame in this test; the call must
        // panic before it makes a slice.
        let s = unsafe { k.as_mut_slice() };
        s.len()
    }));
    assert!(r.is_err(), "as_mut_slice of a read-only view returned a slice");
}

on_both_backends!(
    every_handle_of_a_read_only_window_refuses_writes,
    read_only_mmus_runs_foreign_views_and_reads_into_them,
    default_windows_stay_writable,
    as_mut_slice_of_a_read_only_view_panics,
);

/// The real window maps a read-only window's slots `PROT_READ`
/// (`r--s` in `/proc/self/maps`), a default one `rw-s`; and `read_from`
/// into a read-only view is refused before any system call.
#[test]
#[cfg_attr(miri, ignore = "needs a memfd window, /proc and a pipe")]
fn the_real_window_maps_read_only_slots_prot_read() {
    let perms_at = |addr: usize| -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let (range, perms) = (f.next().expect("range"), f.next().expect("perms"));
            let (lo, hi) = range.split_once('-').expect("lo-hi");
            let (lo, hi) = (usize::from_str_radix(lo, 16).expect("hex"), usize::from_str_radix(hi, 16).expect("hex"));
            if (lo..hi).contains(&addr) {
                return perms.to_owned();
            }
        }
        panic!("{addr:#x} is not mapped");
    };
    let mem = Backend::Window.phys(8);
    let run = stamped_run(&mem, 2);
    for (read_only, want) in [(true, "r--s"), (false, "rw-s")] {
        let win = Window::builder(&mem).slots(4).read_only(read_only).build().expect("Window");
        let pool = SfPool::builder(Arc::new(win)).build().expect("SfPool");
        let h = pool.alloc_run(&run, Wait::NoWait).expect("alloc_run");
        assert_eq!(perms_at(h.kva().addr()), want, "read_only({read_only})");
        if read_only {
            let (r, _w) = nix::unistd::pipe().expect("pipe");
            let e = h.kva().read_from(&r, 0, 8).expect_err("read_from into a read-only view");
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        }
    }
}

/// The sendfile layer's own windows only send, so they are read-only;
/// windows a user builds stay read-write unless asked.
#[test]
#[cfg_attr(miri, ignore = "needs a memfd window")]
fn the_sendfile_layers_own_windows_are_read_only() {
    use lwbuf::sendfile::{LwbufSource, SfBufSource, WindowSource};
    let mem = Backend::Window.phys(64);
    let sf = SfBufSource::window(&mem, 16, None, 4, None).expect("SfBufSource");
    assert!(!sf.pool().mmu().writable());
    let lw = LwbufSource::window(&mem, 2, 16, None, 4).expect("LwbufSource");
    assert!(!lw.lwbufs().mmu().writable());
    let ws = WindowSource::window(&mem, 16).expect("WindowSource");
    assert!(!ws.mmu().writable());
    assert!(Window::builder(&mem).slots(4).build().expect("Window").writable());
    assert!(!Window::builder(&mem).slots(4).read_only(true).build().expect("Window").writable());
    assert!(Window::builder(&mem).slots(4).read_only(true).read_only(false).build().expect("Window").writable());
}
