//! fd I/O straight from and into mappings (`Kaddr::write_to`, `read_from`,
//! `IoVec` batches, and the handles' `write_to` / `read_from`): short writes
//! and `WouldBlock` on non-blocking pipes and sockets, reads into mappings,
//! ranges outside the mapping, batches of 0, 1 and more than `IOV_MAX`
//! pieces, a descriptor the call cannot use, and a tokio readiness loop.
//! Everything but `advance_slices` needs real descriptors, which Miri
//! cannot make.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{setsockopt, sockopt};

use lwbuf::{Error, IoVec, Kaddr, Lwbufs, PhysMem, SfPool, Wait, IOV_MAX};

#[macro_use]
#[path = "common/backend.rs"]
mod backend;
use backend::{pattern, stamped_run, Backend};

/// A pipe `(read end, write end)`, the write end non-blocking with room for
/// one page (`F_SETPIPE_SZ`).
fn small_pipe() -> (File, File) {
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("pipe");
    fcntl(w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(4096)).expect("F_SETPIPE_SZ");
    fcntl(w.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("O_NONBLOCK");
    (File::from(r), File::from(w))
}

/// The bytes `run` (stamped with `stamp`) holds, read through the direct map.
fn expected(run: &[lwbuf::Page]) -> Vec<u8> {
    let fs = lwbuf::system_page_size();
    let mut want = vec![0u8; run.len() * fs];
    for (i, p) in run.iter().enumerate() {
        p.direct().expect("direct").read_at(0, &mut want[i * fs..(i + 1) * fs]).expect("read");
    }
    want
}

fn sfpool(b: Backend, mem: &PhysMem, slots: usize) -> Arc<SfPool> {
    Arc::new(SfPool::builder(b.mmu(mem, slots)).build().expect("SfPool"))
}

/// The `lwbuf::Error` inside an `InvalidInput` from a range check.
fn out_of_bounds(e: std::io::Error) -> Error {
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    match e.into_inner().expect("an inner error").downcast::<Error>() {
        Ok(inner) => *inner,
        Err(other) => panic!("not an lwbuf::Error: {other}"),
    }
}

/// A 4-page run mapping written into a pipe with room for one page: the
/// first write is short (one page), the next is `WouldBlock`; after the
/// reader drains, the rest goes, and the bytes read are the run's.
fn short_write_then_would_block_pipe(b: Backend) {
    let mem = b.phys(8);
    let pool = sfpool(b, &mem, 8);
    let run = stamped_run(&mem, 4);
    let h = pool.alloc_run_owned(&run, Wait::NoWait).expect("run");
    let len = h.kva().len();
    let (mut r, w) = small_pipe();
    let n = h.write_to(&w, 0, len).expect("first write");
    assert_eq!(n, 4096, "a short write: what the pipe had room for");
    let e = h.write_to(&w, n, len - n).expect_err("the pipe is full");
    assert_eq!(e.kind(), ErrorKind::WouldBlock);
    let mut got = vec![0u8; n];
    r.read_exact(&mut got).expect("read");
    let mut at = n;
    while at < len {
        match h.kva().write_to(&w, at, len - at) {
            Ok(k) => at += k,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let mut chunk = vec![0u8; 4096];
                let k = r.read(&mut chunk).expect("read");
                got.extend_from_slice(&chunk[..k]);
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    drop(w);
    r.read_to_end(&mut got).expect("read the rest");
    assert_eq!(got, expected(&run));
}

/// The same through a non-blocking socket pair with the smallest send
/// buffer, with `send_to` (`MSG_NOSIGNAL`): progress is reported as it is
/// made, `WouldBlock` when the buffer is full, and the bytes arrive whole.
fn short_writes_socketpair(b: Backend) {
    let mem = b.phys(32);
    let pool = sfpool(b, &mem, 32);
    let run = stamped_run(&mem, 16);
    let h = pool.alloc_run(&run, Wait::NoWait).expect("run");
    let len = h.kva().len();
    let (tx, mut rx) = UnixStream::pair().expect("socketpair");
    setsockopt(&tx, sockopt::SndBuf, &4096).expect("SO_SNDBUF");
    tx.set_nonblocking(true).expect("non-blocking");
    let (mut at, mut short, mut blocked) = (0, 0, 0);
    let mut got = Vec::new();
    while at < len {
        match h.kva().send_to(&tx, at, len - at, 0) {
            Ok(k) => {
                assert!(k > 0 && k <= len - at);
                short += usize::from(k < len - at);
                at += k;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                blocked += 1;
                let mut chunk = vec![0u8; 64 << 10];
                let k = rx.read(&mut chunk).expect("read");
                got.extend_from_slice(&chunk[..k]);
            }
            Err(e) => panic!("send: {e}"),
        }
    }
    drop(tx);
    rx.read_to_end(&mut got).expect("read the rest");
    assert!(short > 0 && blocked > 0, "{len} bytes through a small buffer: {short} short, {blocked} blocked");
    assert_eq!(got, expected(&run));
}

/// Reads from a pipe into a mapping: a short read returns what was there,
/// an empty non-blocking pipe is `WouldBlock`, end of file is 0 (and
/// `UnexpectedEof` for `read_exact_from`); the bytes land in the frame.
fn read_from_pipe(b: Backend) {
    let mem = b.phys(8);
    let lw = Arc::new(Lwbufs::builder(b.mmu(&mem, 8)).cpus(1).build().expect("Lwbufs"));
    let _cpu = lw.bind(0).expect("bind");
    let page = mem.alloc_page().expect("page");
    let h = lw.alloc(&page).expect("alloc");
    let (r, mut w) = small_pipe();
    fcntl(r.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("O_NONBLOCK");
    let e = h.read_from(&r, 0, 16).expect_err("nothing to read");
    assert_eq!(e.kind(), ErrorKind::WouldBlock);
    w.write_all(b"0123456789").expect("write");
    assert_eq!(h.read_from(&r, 100, 64).expect("read"), 10);
    let mut back = [0u8; 10];
    page.direct().expect("direct").read_at(100, &mut back).expect("read");
    assert_eq!(&back, b"0123456789");
    w.write_all(b"abcdef").expect("write");
    h.kva().expect("kva").read_exact_from(&r, 4000, 6).expect("read_exact");
    page.direct().expect("direct").read_at(4000, &mut back[..6]).expect("read");
    assert_eq!(&back[..6], b"abcdef");
    drop(w);
    assert_eq!(h.read_from(&r, 0, 16).expect("end of file"), 0);
    let e = h.kva().expect("kva").read_exact_from(&r, 0, 16).expect_err("end of file");
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
    let owned = lw.alloc_owned(&page).expect("owned");
    let (r2, mut w2) = small_pipe();
    w2.write_all(&7u64.to_ne_bytes()).expect("write");
    assert_eq!(owned.read_from(&r2, 8, 8).expect("read"), 8);
    assert_eq!(owned.kva().expect("kva").read_u64(8).expect("read"), 7);
}

/// Ranges outside the mapping fail before any system call, naming the
/// range; a zero length inside (or at the end of) the mapping is 0 bytes
/// with no system call, even on a descriptor that cannot be written.
fn ranges_checked(b: Backend) {
    let mem = b.phys(2);
    let pool = sfpool(b, &mem, 2);
    let page = mem.alloc_page().expect("page");
    let h = pool.alloc(&page, Wait::NoWait).expect("alloc");
    let k: Kaddr<'_> = h.kva();
    let size = k.len();
    let (r, w) = small_pipe();
    for (offset, len) in [
        (usize::MAX, 1),
        (1, usize::MAX),
        (usize::MAX, usize::MAX),
        (u64::MAX as usize, 0),
        (size, 1),
        (size + 1, 0),
        (size - 8, 9),
    ] {
        let want = Error::OutOfBounds { offset, len, size };
        let got = out_of_bounds(k.write_to(&w, offset, len).expect_err("write out of range"));
        assert!(matches!(got, Error::OutOfBounds { .. }) && got.to_string() == want.to_string(), "{got}");
        out_of_bounds(k.read_from(&r, offset, len).expect_err("read out of range"));
        out_of_bounds(k.write_all_to(&w, offset, len).expect_err("write_all out of range"));
        out_of_bounds(k.read_exact_from(&r, offset, len).expect_err("read_exact out of range"));
        out_of_bounds(h.write_to(&w, offset, len).expect_err("handle write out of range"));
        assert!(matches!(k.io_vec(offset, len), Err(Error::OutOfBounds { .. })));
    }
    // Zero lengths: no system call, so the wrong end of the pipe does not matter.
    assert_eq!(k.write_to(&r, size, 0).expect("zero-length write"), 0);
    assert_eq!(k.read_from(&w, 0, 0).expect("zero-length read"), 0);
    assert_eq!(k.io_vec(size, 0).expect("empty piece").len(), 0);
}

/// Batches of 0 pieces (no system call), 1 piece, and more than `IOV_MAX`:
/// one `write_vectored` call passes the first `IOV_MAX` pieces (a short
/// write), `write_all_vectored` makes the calls it needs; the bytes arrive
/// in order.
fn batches(b: Backend) {
    let mem = b.phys(8);
    let pool = sfpool(b, &mem, 8);
    let run = stamped_run(&mem, 2);
    let h = pool.alloc_run(&run, Wait::NoWait).expect("run");
    let k = h.kva();
    let (r, w) = UnixStream::pair().expect("socketpair");
    assert_eq!(IoVec::write_vectored(&r, &[]).expect("empty batch"), 0);
    let one = [k.io_vec(8, 16).expect("piece")];
    assert_eq!(IoVec::send_vectored(&w, &one, 0).expect("one piece"), 16);
    let mut got = [0u8; 16];
    (&r).read_exact(&mut got).expect("read");
    assert_eq!(got[..8], pattern(run[0].pfn().0, 1).to_ne_bytes());

    // 1500 pieces of 3 bytes, every other one from the mapping, with gaps
    // (so no two pieces are adjacent).
    let header = b"hdr";
    let n = IOV_MAX + 476;
    let pieces: Vec<IoVec<'_>> = (0..n)
        .map(|i| if i % 2 == 0 { k.io_vec(i * 4, 3).expect("piece") } else { IoVec::from_slice(header) })
        .collect();
    let want: Vec<u8> = pieces
        .iter()
        .enumerate()
        .flat_map(|(i, _)| {
            if i % 2 == 0 {
                let mut b = [0u8; 3];
                k.read_at(i * 4, &mut b).expect("read");
                b.to_vec()
            } else {
                header.to_vec()
            }
        })
        .collect();
    assert_eq!(IoVec::write_vectored(&w, &pieces).expect("one call"), 3 * IOV_MAX, "the first IOV_MAX pieces");
    let mut first = vec![0u8; 3 * IOV_MAX];
    (&r).read_exact(&mut first).expect("read");
    assert_eq!(first, want[..3 * IOV_MAX]);
    let mut all = pieces.clone();
    let mut rest = &mut all[..];
    IoVec::write_all_vectored(&w, &mut rest).expect("all of it");
    assert!(rest.is_empty());
    let mut second = vec![0u8; want.len()];
    (&r).read_exact(&mut second).expect("read");
    assert_eq!(second, want);
}

/// `advance_slices` past piece boundaries and beyond the end.
#[test]
fn advance_slices() {
    let (a, b, c) = (b"abc".as_slice(), b"".as_slice(), b"defg".as_slice());
    let mut v = [IoVec::from_slice(a), IoVec::from_slice(b), IoVec::from_slice(c)];
    let mut s = &mut v[..];
    IoVec::advance_slices(&mut s, 2);
    assert_eq!((s.len(), s[0].len()), (3, 1));
    IoVec::advance_slices(&mut s, 1);
    assert_eq!((s.len(), s[0].len()), (1, 4), "the empty piece at the cut is skipped");
    IoVec::advance_slices(&mut s, 10);
    assert!(s.is_empty());
    let mut one = IoVec::from_slice(a);
    one.advance(7);
    assert!(one.is_empty());
}

/// A descriptor the call cannot use is the kernel's error, not a panic:
/// `EBADF` writing to the read end of a pipe or reading from its write
/// end; `EPIPE` (no `SIGPIPE`) sending to a socket whose peer is gone.
fn unusable_descriptors(b: Backend) {
    let mem = b.phys(2);
    let pool = sfpool(b, &mem, 2);
    let page = mem.alloc_page().expect("page");
    let h = pool.alloc_owned(&page, Wait::NoWait).expect("alloc");
    let (r, w) = small_pipe();
    let e = h.write_to(&r, 0, 8).expect_err("write to the read end");
    assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    let e = h.read_from(&w, 0, 8).expect_err("read from the write end");
    assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    let e = IoVec::write_vectored(&r, &[h.kva().io_vec(0, 8).expect("piece")]).expect_err("batch");
    assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    let e = h.kva().send_to(&w, 0, 8, 0).expect_err("send to a pipe");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTSOCK));
    let (tx, rx) = UnixStream::pair().expect("socketpair");
    drop(rx);
    let e = h.kva().send_to(&tx, 0, 8, 0).expect_err("peer gone");
    assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
}

/// A readiness loop as an async server writes it: a tokio socket's
/// `writable().await`, then `write_to` from an owned handle inside `try_io`
/// (which needs `WouldBlock` as the error kind), the handle held across
/// every `.await`.
fn tokio_readiness_loop(b: Backend) {
    let mem = b.phys(32);
    let pool = sfpool(b, &mem, 32);
    let run = stamped_run(&mem, 16);
    let want = expected(&run);
    let h = pool.alloc_run_owned(&run, Wait::NoWait).expect("run");
    let (tx, mut rx) = UnixStream::pair().expect("socketpair");
    setsockopt(&tx, sockopt::SndBuf, &4096).expect("SO_SNDBUF");
    tx.set_nonblocking(true).expect("non-blocking");
    // The reader starts once the writer has found the buffer full, so the
    // loop cannot finish without waiting for readiness.
    let (full, is_full) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        is_full.recv().expect("the buffer filled");
        let mut got = Vec::new();
        rx.read_to_end(&mut got).expect("read");
        got
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let task = rt.spawn(async move {
        let s = tokio::net::UnixStream::from_std(tx).expect("register with the runtime");
        let (len, mut at, mut waits) = (h.kva().len(), 0, 0);
        while at < len {
            s.writable().await.expect("writable");
            match s.try_io(tokio::io::Interest::WRITABLE, || h.write_to(&s, at, len - at)) {
                Ok(k) => at += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    waits += 1;
                    let _ = full.send(());
                }
                Err(e) => panic!("write: {e}"),
            }
        }
        waits
    });
    let waits = rt.block_on(task).expect("task");
    assert!(waits > 0, "a 64 KiB write through a 4 KiB buffer waits for readiness");
    assert_eq!(reader.join().expect("reader"), want);
}

/// `prefault` checks its range as the copies do, and changes no byte: on
/// a run mapping through both caches, at the edges and past them.
fn prefault_checks_ranges_and_changes_nothing(b: Backend) {
    let fs = lwbuf::system_page_size();
    let mem = b.phys(64);
    let run = stamped_run(&mem, 20);
    let want = expected(&run);
    let pool = sfpool(b, &mem, 32);
    let h = pool.alloc_run(&run, Wait::NoWait).expect("alloc_run");
    let k = h.kva();
    for (off, len) in [(0, 0), (0, 1), (0, k.len()), (k.len(), 0), (fs - 3, 5), (k.len() - 1, 1), (17, 16 * fs)] {
        k.prefault(off, len).unwrap_or_else(|e| panic!("prefault({off}, {len}): {e}"));
    }
    for (off, len) in [(k.len(), 1), (1, k.len()), (usize::MAX, 1), (1, usize::MAX)] {
        assert!(matches!(k.prefault(off, len), Err(Error::OutOfBounds { .. })), "prefault({off}, {len})");
    }
    let mut got = vec![0u8; k.len()];
    k.read_at(0, &mut got).expect("read");
    assert!(got == want, "prefault changed the bytes");
    drop(h);
    let lw = Lwbufs::builder(b.mmu(&mem, 32)).cpus(1).build().expect("Lwbufs");
    let _cpu = lw.bind(0).expect("bind");
    let h = lw.alloc_run(&run).expect("alloc_run");
    let k = h.kva().expect("kva");
    k.prefault(0, k.len()).expect("prefault");
    k.read_at(0, &mut got).expect("read");
    assert!(got == want, "prefault changed the bytes");
}

/// Whether the page at `addr` has a page-table entry in this process
/// (bit 63 of its `/proc/self/pagemap` word).
fn page_present(addr: usize) -> bool {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open("/proc/self/pagemap").expect("open /proc/self/pagemap");
    f.seek(SeekFrom::Start((addr / lwbuf::system_page_size() * 8) as u64)).expect("seek");
    let mut w = [0u8; 8];
    f.read_exact(&mut w).expect("read pagemap");
    u64::from_ne_bytes(w) >> 63 == 1
}

/// A run just mapped into the window has no page-table entries; after
/// `prefault`, every page it touched (the first of each 64 KiB block the
/// range reaches) has one, made by a fault from user mode. What the kernel
/// maps around each touch (`fault_around_bytes`) is its own business.
#[test]
#[cfg_attr(miri, ignore = "needs a memfd window and /proc")]
fn prefault_maps_the_touched_pages_of_a_fresh_window_mapping() {
    let fs = lwbuf::system_page_size();
    let mem = Backend::Window.phys(128);
    let run = stamped_run(&mem, 64);
    let pool = sfpool(Backend::Window, &mem, 64);
    let h = pool.alloc_run(&run, Wait::NoWait).expect("alloc_run");
    let k = h.kva();
    let pages: Vec<usize> = (0..run.len()).map(|i| k.addr() + i * fs).collect();
    assert!(pages.iter().all(|&a| !page_present(a)), "a fresh window mapping already has page-table entries");
    // From the middle of page 3 to the end: pages 3.. are reached.
    let from = 3 * fs + 100;
    k.prefault(from, k.len() - from).expect("prefault");
    let block = 64 << 10;
    for (i, &a) in pages.iter().enumerate().skip(3) {
        let first_of_block = i == 3 || a % block == 0;
        if first_of_block {
            assert!(page_present(a), "page {i} was touched but has no page-table entry");
        }
    }
    // A write through the same view then reads back (the pages are the
    // frames, and writable).
    k.write_u64(from & !7, 7).expect("write");
    assert_eq!(run[3].direct().expect("direct").read_u64((from & !7) - 3 * fs).expect("read"), 7);
}

on_both_backends!(
    #[cfg_attr(miri, ignore = "needs a pipe")]
    short_write_then_would_block_pipe,
    #[cfg_attr(miri, ignore = "needs a socketpair")]
    short_writes_socketpair,
    #[cfg_attr(miri, ignore = "needs a pipe")]
    read_from_pipe,
    #[cfg_attr(miri, ignore = "needs a pipe")]
    ranges_checked,
    #[cfg_attr(miri, ignore = "needs a socketpair")]
    batches,
    #[cfg_attr(miri, ignore = "needs a pipe and a socketpair")]
    unusable_descriptors,
    #[cfg_attr(miri, ignore = "needs a socketpair and tokio's I/O driver")]
    tokio_readiness_loop,
    prefault_checks_ranges_and_changes_nothing,
);
