//! The send paths of `lwbuf::sendfile` over real loopback sockets: bytes
//! verified for every mode, partial writes, peer resets, the holds that
//! sendfile and MSG_ZEROCOPY keep until the kernel is done with the pages,
//! and the mapping caches behind the sfbuf and lwbuf modes (hits without
//! system calls, per-CPU workers, a pool smaller than the requests).

// Not under Miri: real sockets, sendfile(2), MSG_ZEROCOPY and files on disk,
// none of which Miri can run.
#![cfg(not(miri))]

use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use lwbuf::sendfile::{
    send_copy, send_mapped, CacheStats, Connection, DirectMapSource, LwbufSource, Mode, PageFile, Pattern, SendOptions,
    Sender, SendfileHolds, SfBufSource, WindowSource, ZeroCopy,
};
use lwbuf::{Backing, Error, Mmu, ModelMmu, Page, PhysMem};

const FS: u64 = 4096;

fn opts() -> SendOptions {
    SendOptions::default()
        .stall_timeout(Some(Duration::from_secs(10)))
        .close_timeout(Duration::from_secs(2))
        .cpus(Some(2))
}

/// After a send returned (or failed): nothing the sender maps is left in
/// use. The per-request window is empty; the caches keep their mappings,
/// but no handle holds one, and the lwbuf caches are consistent.
fn nothing_in_use(sender: &Sender) {
    let mode = sender.mode();
    if let Some(w) = sender.window() {
        let st = sender.mmu_stats().expect("window stats");
        assert_eq!(st.mapped, 0, "{mode}: nothing left mapped");
        assert_eq!(st.enters, st.removes, "{mode}");
        assert_eq!(w.free_slots(), w.mmu().capacity(), "{mode}: every slot back");
    }
    if let Some(p) = sender.sfbuf() {
        let st = p.pool().stats();
        assert_eq!(st.used, 0, "{mode}: no sf_buf in use: {st}");
        assert_eq!(st.mapped, st.cached, "{mode}");
    }
    if let Some(l) = sender.lwbuf() {
        assert_eq!(l.lwbufs().check_consistency(), Ok(0), "{mode}: no lwbuf referenced");
        let t = l.lwbufs().stats().total;
        assert_eq!(t.mailbox, 0, "{mode}: no decref left undelivered: {t}");
        assert_eq!(t.mapped, t.cached, "{mode}: every mapping unused: {t}");
    }
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (server, _) = l.accept().expect("accept");
    (server, client)
}

fn setsockopt_int(s: &impl AsRawFd, level: i32, name: i32, v: i32) {
    // SAFETY: an int option passed by pointer with its size, on an open socket.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt({level}, {name}, {v}): {}", io::Error::last_os_error());
}

/// Close with `SO_LINGER {on, 0}`: the peer gets a reset.
fn reset(s: TcpStream) {
    let lg = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a linger struct passed by pointer with its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&lg as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    drop(s);
}

fn read_n(mut s: impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("read_exact");
    v
}

/// Memory in which free frames come in separate runs of 4, so a file of it
/// is made of many runs that are not adjacent.
fn fragmented(frames: usize) -> (PhysMem, Vec<Page>) {
    let mem = PhysMem::builder().frames(frames).build().expect("phys");
    let all = mem.alloc_run(frames).expect("all frames");
    let kept = all.into_iter().enumerate().filter(|(i, _)| i % 7 >= 4).map(|(_, p)| p).collect();
    (mem, kept)
}

fn all_released(file: &PageFile) -> bool {
    file.pages().iter().all(|p| p.hold_count() == 1)
}

// === PageFile ===

#[test]
fn page_file_runs_cover_ranges_exactly() {
    let (mem, _hog) = fragmented(256);
    let len = 30 * FS + 123;
    let file = PageFile::pattern(&mem, len, 5).expect("file");
    assert_eq!(file.page_count(), 31);
    assert!(file.run_count() >= 8, "runs of at most 4 pages: {}", file.run_count());
    for range in [0..len, 1..len - 1, 4095..4097, 3 * FS + 7..17 * FS + 9, len - 1..len, 77..77] {
        let mut pos = range.start;
        for r in file.runs(range.clone()).expect("runs") {
            assert_eq!(r.file_offset(), pos);
            assert!(r.len > 0 && r.offset < FS as usize);
            assert!(r.offset + r.len <= r.pages.len() * FS as usize);
            assert!(r.offset + r.len > (r.pages.len() - 1) * FS as usize, "no spare page at the end");
            for (i, p) in r.pages.iter().enumerate() {
                assert_eq!(p.pfn().0, r.pfn().0 + i, "contiguous frames");
                assert_eq!(p, file.page(r.index + i).expect("page"));
            }
            pos += r.len as u64;
        }
        assert_eq!(pos, range.end);
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        file.read_at(range.start, &mut buf).expect("read_at");
        assert_eq!(Pattern::new(5).check(range.start, &buf), None);
    }
    assert!(matches!(file.runs(0..len + 1), Err(Error::OutOfBounds { .. })));
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = 10..5;
    assert!(matches!(file.runs(backwards), Err(Error::OutOfBounds { .. })));
    assert!(file.page(31).is_none());
    let free = mem.stats().free;
    drop(file);
    assert_eq!(mem.stats().free, free + 31, "frames go back when the file goes");
}

#[test]
fn page_file_from_disk_and_out_of_memory() {
    let mem = PhysMem::builder().frames(8).build().expect("phys");
    let path = std::env::temp_dir().join(format!("lwbuf-sendfile-test-{}", std::process::id()));
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    std::fs::write(&path, &data).expect("write");
    let file = PageFile::from_path(&mem, &path).expect("load");
    std::fs::remove_file(&path).ok();
    let mut back = vec![0u8; data.len()];
    file.read_at(0, &mut back).expect("read");
    assert_eq!(back, data);
    assert!(matches!(PageFile::pattern(&mem, 6 * FS, 1), Err(Error::OutOfFrames { .. })));
    assert_eq!(mem.stats().free, 5, "a failed load gives its frames back");
    assert!(PageFile::from_path(&mem, "/nonexistent/x").is_err());
    assert!(PageFile::from_path(&mem, "/").is_err());
    let empty = PageFile::from_bytes(&mem, b"").expect("empty");
    assert!(empty.is_empty() && empty.page_count() == 0 && empty.runs(0..0).expect("runs").next().is_none());
}

#[test]
fn pattern_detects_moved_bytes() {
    let p = Pattern::new(3);
    let mut a = vec![0u8; 3 * FS as usize];
    p.fill(100, &mut a);
    assert_eq!(p.check(100, &a), None);
    assert_eq!(p.check(108, &a), Some(0), "shifted by a word");
    assert_ne!(Pattern::new(4).check(100, &a), None, "another seed");
    a.swap(5000, 9000);
    assert_eq!(p.check(100, &a), Some(5000));
    for off in 0..9 {
        assert_eq!(p.byte_at(100 + off), a[off as usize]);
    }
}

// === every mode ===

/// Send `ranges` of `file` over one keep-alive loopback connection in
/// `mode`, checking every byte on the other side.
fn check_mode(mode: Mode, mem: &PhysMem, file: &PageFile, seed: u64, ranges: &[std::ops::Range<u64>]) {
    // A view's pages are held by their cache too: compare with before.
    let holds = |f: &PageFile| f.pages().iter().map(Page::hold_count).collect::<Vec<_>>();
    let before = holds(file);
    let sender = Sender::new(mode, mem, opts()).expect("sender");
    let (server, client) = tcp_pair();
    let total: usize = ranges.iter().map(|r| 6 + (r.end - r.start) as usize).sum();
    thread::scope(|s| {
        let reader = s.spawn(move || read_n(client, total));
        let mut conn = sender.connection(server).expect("connection");
        for r in ranges {
            let st = conn.send(file, r.clone(), b"HEAD:\n").expect("send");
            assert_eq!(st.bytes, 6 + r.end - r.start, "{mode}");
        }
        let got = reader.join().expect("reader");
        let mut at = 0;
        for r in ranges {
            assert_eq!(&got[at..at + 6], b"HEAD:\n", "{mode} header");
            at += 6;
            let n = (r.end - r.start) as usize;
            assert_eq!(Pattern::new(seed).check(r.start, &got[at..at + n]), None, "{mode} range {r:?}");
            at += n;
        }
        conn.flush(Duration::from_secs(5)).expect("flush");
        assert_eq!(conn.held_pages(), 0);
    });
    assert_eq!(holds(file), before, "{mode}: holds released");
    nothing_in_use(&sender);
}

#[test]
fn every_mode_sends_ranges_byte_exact() {
    let (mem, _hog) = fragmented(512);
    let len = 100 * FS + 555;
    let file = PageFile::pattern(&mem, len, 11).expect("file");
    assert!(file.run_count() > 20);
    let ranges = [0..len, 1..len - 1, FS - 1..FS + 1, 5 * FS + 100..45 * FS + 7, len - 10..len, 9..9, 0..1];
    for &mode in Mode::ALL {
        check_mode(mode, &mem, &file, 11, &ranges);
    }
}

#[test]
fn every_mode_large_contiguous_range() {
    // 6 MiB in one run: more than IOV_MAX pages, more than one batch.
    let mem = PhysMem::builder().frames(2048).build().expect("phys");
    let len = 6 << 20;
    let file = PageFile::pattern(&mem, len, 12).expect("file");
    assert_eq!(file.run_count(), 1);
    for &mode in Mode::ALL {
        check_mode(mode, &mem, &file, 12, std::slice::from_ref(&(3..len - 3)));
    }
}

/// Views of held pages (`PageFile::from_pages`): the pages a page cache
/// pins for one request, frames in any order, sent in every mode from the
/// file's own offsets; nothing held once the sends are done.
#[test]
fn every_mode_sends_views_of_page_cache_pages() {
    let dir = std::env::temp_dir().join(format!("lwbuf-sendfile-view-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("f");
    let len = 40 * FS + 77;
    let mut data = vec![0u8; len as usize];
    Pattern::new(21).fill(0, &mut data);
    std::fs::write(&path, &data).expect("write");
    let (mem, _hog) = fragmented(512);
    let cache = lwbuf::pagecache::PageCache::builder(&mem).budget(64).readahead(4).build().expect("cache");
    let file = cache.open(&path).expect("open");
    // Scatter the frames: fill pages in an order that is not the file's.
    for i in (0..41).rev().step_by(3) {
        file.page(i).expect("page");
    }
    for range in [0..len, 5 * FS + 9..30 * FS + 1, len - 3..len, FS..2 * FS] {
        let first = (range.start / FS) as usize;
        let pages = file.pages(range.clone()).expect("pin");
        let view = PageFile::from_pages(&mem, pages, first, file.len()).expect("view");
        assert_eq!(view.first_page(), first);
        assert!(view.page(first.wrapping_sub(1)).is_none());
        if first > 0 {
            assert!(matches!(view.runs(first as u64 * FS - 1..range.end), Err(Error::OutOfBounds { .. })));
        }
        let past = (first + view.page_count()) as u64 * FS;
        if past < len {
            assert!(matches!(view.runs(range.start..past + 1), Err(Error::OutOfBounds { .. })));
        }
        for &mode in Mode::ALL {
            check_mode(mode, &mem, &view, 21, &[range.clone(), range.start..range.start + 1]);
        }
        drop(view);
    }
    assert!(cache.set_budget(1).expect("shrink") <= 1, "no page left pinned by the sends");
    let pages = file.pages(0..2 * FS).expect("pin");
    assert!(matches!(PageFile::from_pages(&mem, pages.clone(), 40, len), Err(Error::OutOfBounds { .. })));
    let other = PhysMem::builder().frames(4).build().expect("phys");
    assert!(matches!(PageFile::from_pages(&other, pages, 0, len), Err(Error::ForeignPage)));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_ranges_and_memory_are_errors() {
    let mem = PhysMem::builder().frames(16).build().expect("phys");
    let other = PhysMem::builder().frames(16).build().expect("phys");
    let file = PageFile::pattern(&mem, 3 * FS, 1).expect("file");
    let foreign = PageFile::pattern(&other, FS, 1).expect("file");
    for &mode in Mode::ALL {
        let sender = Sender::new(mode, &mem, opts()).expect("sender");
        let (server, _client) = tcp_pair();
        let mut conn = sender.connection(server).expect("conn");
        assert!(matches!(conn.send(&file, 0..3 * FS + 1, b""), Err(Error::OutOfBounds { .. })), "{mode}");
        assert!(matches!(conn.send(&file, u64::MAX - 1..u64::MAX, b""), Err(Error::OutOfBounds { .. })));
        assert!(matches!(conn.send(&foreign, 0..1, b""), Err(Error::ForeignPage)), "{mode}");
        assert_eq!(conn.held_pages(), 0);
    }
    let heap = PhysMem::builder().frames(4).backing(Backing::Heap).build().expect("heap");
    assert!(matches!(Sender::new(Mode::Sendfile, &heap, opts()), Err(Error::Config { .. })));
    for m in [Mode::MmapPerRequest, Mode::SfBuf, Mode::Lwbuf, Mode::LwbufRun] {
        assert!(matches!(Sender::new(m, &heap, opts()), Err(Error::Config { .. })), "{m}");
    }
    let nodmap = PhysMem::builder().frames(4).direct_map(false).build().expect("no dmap");
    for m in [Mode::Copy, Mode::DirectMap, Mode::ZeroCopy] {
        assert!(matches!(Sender::new(m, &nodmap, opts()), Err(Error::NoDirectMap)), "{m}");
    }
    assert!(Sender::new(Mode::Sendfile, &nodmap, opts()).is_ok());
}

#[test]
fn mode_names_round_trip() {
    for &m in Mode::ALL {
        assert_eq!(m.name().parse::<Mode>().expect("parse"), m);
        assert_eq!(m.to_string(), m.name());
    }
    assert_eq!("MMAP-per-request".parse::<Mode>().expect("alias"), Mode::MmapPerRequest);
    assert_eq!("sf_buf".parse::<Mode>().expect("alias"), Mode::SfBuf);
    assert_eq!("LWBUF_RUN".parse::<Mode>().expect("alias"), Mode::LwbufRun);
    for &m in Mode::ALL {
        assert_eq!(m.caches_mappings(), matches!(m, Mode::SfBuf | Mode::Lwbuf | Mode::LwbufRun), "{m}");
        assert_eq!(m.uses_window(), m.caches_mappings() || m == Mode::MmapPerRequest, "{m}");
    }
    assert!(matches!("lwbufz".parse::<Mode>(), Err(Error::Config { .. })));
}

// === partial writes ===

#[test]
fn partial_writes_on_nonblocking_socket_with_slow_reader() {
    let mem = PhysMem::builder().frames(512).build().expect("phys");
    let len = 512 << 10;
    let file = PageFile::builder(&mem).max_run(16).pattern(len, 21).expect("file");
    for &mode in Mode::ALL {
        let sender = Sender::new(mode, &mem, opts()).expect("sender");
        let (server, client) = tcp_pair();
        setsockopt_int(&server, libc::SOL_SOCKET, libc::SO_SNDBUF, 8 << 10);
        setsockopt_int(&client, libc::SOL_SOCKET, libc::SO_RCVBUF, 32 << 10);
        server.set_nonblocking(true).expect("nonblocking");
        thread::scope(|s| {
            let reader = s.spawn(move || {
                let mut got = Vec::with_capacity(len as usize);
                let mut buf = [0u8; 16 << 10];
                let mut c = &client;
                let mut n = 0;
                while got.len() < len as usize {
                    let k = c.read(&mut buf).expect("read");
                    assert!(k > 0, "early EOF");
                    got.extend_from_slice(&buf[..k]);
                    n += 1;
                    if n % 8 == 0 {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
                got
            });
            let mut conn = sender.connection(server).expect("conn");
            let st = conn.send(&file, 0..len, b"").expect("send");
            assert_eq!(st.bytes, len);
            assert!(st.waits > 0, "{mode}: the socket was full at least once: {st:?}");
            assert!(st.calls > 1, "{mode}: partial writes: {st:?}");
            let got = reader.join().expect("reader");
            assert_eq!(Pattern::new(21).check(0, &got), None, "{mode}");
            conn.flush(Duration::from_secs(5)).expect("flush");
        });
        assert!(all_released(&file), "{mode}");
    }
}

#[test]
fn stall_timeout_is_an_error() {
    let mem = PhysMem::builder().frames(1024).build().expect("phys");
    let file = PageFile::pattern(&mem, 4 << 20, 2).expect("file");
    let o = opts().stall_timeout(Some(Duration::from_millis(50)));
    let sender = Sender::new(Mode::DirectMap, &mem, o).expect("sender");
    let (server, _client) = tcp_pair(); // never read
    setsockopt_int(&server, libc::SOL_SOCKET, libc::SO_SNDBUF, 4096);
    server.set_nonblocking(true).expect("nonblocking");
    let mut conn = sender.connection(server).expect("conn");
    assert!(matches!(conn.send(&file, 0..4 << 20, b""), Err(Error::TimedOut)));
}

// === peer reset ===

#[test]
fn peer_reset_is_an_error_and_releases_everything() {
    let mem = PhysMem::builder().frames(4096).build().expect("phys");
    let len = 8 << 20;
    let file = PageFile::builder(&mem).max_run(64).pattern(len, 31).expect("file");
    for &mode in Mode::ALL {
        for nonblocking in [false, true] {
            let sender = Sender::new(mode, &mem, opts()).expect("sender");
            let (server, client) = tcp_pair();
            setsockopt_int(&server, libc::SOL_SOCKET, libc::SO_SNDBUF, 16 << 10);
            server.set_nonblocking(nonblocking).expect("nonblocking");
            let mut conn = sender.connection(server).expect("conn");
            let err = thread::scope(|s| {
                s.spawn(move || {
                    let got = read_n(&client, 64 << 10);
                    assert_eq!(Pattern::new(31).check(0, &got), None);
                    reset(client);
                });
                conn.send(&file, 0..len, b"").expect_err("the peer reset")
            });
            let errno = err.errno();
            assert!(
                matches!(errno, Some(libc::ECONNRESET) | Some(libc::EPIPE)),
                "{mode}: expected ECONNRESET/EPIPE, got {err}"
            );
            assert!(matches!(err, Error::Sys { .. }));
            conn.flush(Duration::from_secs(5)).expect("holds released after the reset");
            assert_eq!(conn.held_pages(), 0);
            drop(conn);
            assert!(all_released(&file), "{mode}: every hold back to 1");
            nothing_in_use(&sender);
        }
    }
}

// === sendfile's holds ===

#[test]
fn sendfile_holds_pages_until_the_data_is_acknowledged() {
    let mem = PhysMem::builder().frames(256).build().expect("phys");
    let len = 768 << 10;
    let file = PageFile::pattern(&mem, len, 41).expect("file");
    let (server, client) = tcp_pair();
    // Room for the whole range on the sending side; the receiver does not
    // read yet, so all beyond its window (~128 KiB) stays unacknowledged.
    setsockopt_int(&server, libc::SOL_SOCKET, libc::SO_SNDBUF, 2 << 20);
    let mut holds = SendfileHolds::new();
    let st = holds.send(server.as_fd(), &file, 0..len, b"H", &opts()).expect("sendfile");
    assert_eq!(st.bytes, len + 1);
    thread::sleep(Duration::from_millis(20));
    assert_eq!(holds.reap(server.as_fd()).expect("reap"), 0, "nothing acknowledged beyond the window yet");
    assert_eq!(holds.held_pages(), 192);
    assert!(file.pages().iter().all(|p| p.hold_count() == 2));
    assert!(matches!(holds.wait_drained(server.as_fd(), Duration::from_millis(30)), Err(Error::TimedOut)));

    let got = thread::scope(|s| {
        let r = s.spawn(|| read_n(&client, len as usize + 1));
        holds.wait_drained(server.as_fd(), Duration::from_secs(5)).expect("drained");
        r.join().expect("reader")
    });
    assert_eq!(Pattern::new(41).check(0, &got[1..]), None);
    assert!(holds.is_empty() && all_released(&file));

    // A second request on the same connection: marks keep working.
    let st = holds.send(server.as_fd(), &file, 10..20_000, b"", &opts()).expect("again");
    assert_eq!(st.bytes, 19_990);
    let got = read_n(&client, 19_990);
    assert_eq!(Pattern::new(41).check(10, &got), None);
    holds.wait_drained(server.as_fd(), Duration::from_secs(5)).expect("drained again");
    assert!(all_released(&file));
}

// === zero-copy ===

#[test]
fn zerocopy_completions_release_pages_and_mappings() {
    let mem = PhysMem::builder().frames(512).build().expect("phys");
    let len = 512 << 10;
    let file = PageFile::builder(&mem).max_run(8).pattern(len, 51).expect("file");
    let win = WindowSource::window(&mem, 256).expect("window");
    let (server, client) = tcp_pair();
    let mut zc = ZeroCopy::new(server.as_fd(), &win).expect("SO_ZEROCOPY");
    thread::scope(|s| {
        let reader = s.spawn(|| {
            thread::sleep(Duration::from_millis(20));
            read_n(&client, len as usize)
        });
        // All 128 pages are mapped and sent; the kernel has pinned their
        // frames, so the mappings go at once, but the pages stay held
        // (their frames not reused) until the completions.
        let st = zc.send(server.as_fd(), &file, 0..len, b"", &opts()).expect("send");
        assert_eq!(st.bytes, len);
        assert!(zc.in_flight() > 0 && zc.held_pages() == 128, "{zc:?}");
        assert_eq!(win.free_slots(), 256, "mappings released once sent");
        assert!(file.pages().iter().all(|p| p.hold_count() == 2));
        let got = reader.join().expect("reader");
        assert_eq!(Pattern::new(51).check(0, &got), None);
    });
    zc.flush(server.as_fd(), Duration::from_secs(5)).expect("flush");
    let st = zc.stats();
    assert_eq!(zc.in_flight(), 0);
    assert_eq!(zc.held_pages(), 0);
    assert_eq!(win.free_slots(), 256, "every mapping released");
    assert!(all_released(&file));
    assert!(st.sends > 0 && st.completed == st.sends, "{st:?}");
    assert_eq!(st.copied, st.completed, "loopback always copies");
}

#[test]
fn zerocopy_with_a_window_smaller_than_the_request() {
    // 16 slots for a 1 MiB request: the sender sends what it mapped to free
    // the slots instead of failing.
    let mem = PhysMem::builder().frames(512).build().expect("phys");
    let len = 1 << 20;
    let file = PageFile::pattern(&mem, len, 52).expect("file");
    let win = WindowSource::window(&mem, 16).expect("window");
    let (server, client) = tcp_pair();
    let mut zc = ZeroCopy::new(server.as_fd(), &win).expect("SO_ZEROCOPY");
    let got = thread::scope(|s| {
        let r = s.spawn(|| read_n(&client, len as usize));
        zc.send(server.as_fd(), &file, 0..len, b"", &opts()).expect("send");
        r.join().expect("reader")
    });
    assert_eq!(Pattern::new(52).check(0, &got), None);
    zc.flush(server.as_fd(), Duration::from_secs(5)).expect("flush");
    assert_eq!(win.free_slots(), 16);
    assert!(all_released(&file));
}

// === the engine on its own ===

#[test]
fn engine_over_model_mmu_and_a_full_window() {
    // Heap memory and the model MMU: no system call to map, a window of 4
    // slots for runs of 64 pages.
    let mem = PhysMem::builder().frames(128).backing(Backing::Heap).build().expect("heap");
    let file = PageFile::pattern(&mem, 64 * FS, 61).expect("file");
    let mmu: Arc<dyn Mmu> = Arc::new(ModelMmu::new(&mem, 4).expect("model"));
    let src = WindowSource::new(mmu.clone()).expect("window source");
    let (a, b) = UnixStream::pair().expect("pair");
    let got = thread::scope(|s| {
        let r = s.spawn(|| read_n(&b, 64 * FS as usize));
        let st = send_mapped(a.as_fd(), &file, 0..64 * FS, b"", &src, &opts()).expect("send");
        assert!(st.mappings >= 16, "at most 4 pages per mapping: {st:?}");
        r.join().expect("reader")
    });
    assert_eq!(Pattern::new(61).check(0, &got), None);
    let m = mmu.stats();
    assert_eq!((m.syscalls, m.mapped), (0, 0));
    assert_eq!(m.enters, m.removes);
    assert_eq!(src.free_slots(), 4);
}

#[test]
fn engine_and_copy_write_to_a_pipe() {
    let mem = PhysMem::builder().frames(64).build().expect("phys");
    let file = PageFile::pattern(&mem, 20 * FS, 71).expect("file");
    let (r, w) = nix::unistd::pipe().expect("pipe");
    let mut reader = std::fs::File::from(r);
    let got = thread::scope(|s| {
        let h = s.spawn(move || read_n(&mut reader, 2 * 20 * FS as usize));
        send_mapped(w.as_fd(), &file, 0..20 * FS, b"", &DirectMapSource::new(&mem).expect("dmap"), &opts())
            .expect("writev to a pipe");
        send_copy(w.as_fd(), &file, 0..20 * FS, b"", &mut Vec::new(), &opts()).expect("copy to a pipe");
        h.join().expect("reader")
    });
    let n = 20 * FS as usize;
    assert_eq!(Pattern::new(71).check(0, &got[..n]), None);
    assert_eq!(Pattern::new(71).check(0, &got[n..]), None);
}

#[test]
fn connections_drop_cleanly_with_nothing_held() {
    let mem = PhysMem::builder().frames(64).build().expect("phys");
    let file = PageFile::pattern(&mem, 10 * FS, 81).expect("file");
    for &mode in Mode::ALL {
        let sender = Sender::new(mode, &mem, opts()).expect("sender");
        let (server, client) = tcp_pair();
        let mut conn: Connection<'_, TcpStream> = sender.connection(server).expect("conn");
        conn.send(&file, 0..10 * FS, b"").expect("send");
        let got = read_n(&client, 10 * FS as usize);
        assert_eq!(Pattern::new(81).check(0, &got), None);
        drop(conn); // waits for the holds, then closes
        assert!(all_released(&file), "{mode}");
        nothing_in_use(&sender);
    }
}

#[test]
fn auto_traits() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Sender>();
    send_sync::<PageFile>();
    send_sync::<WindowSource>();
    send_sync::<DirectMapSource>();
    send_sync::<SfBufSource>();
    send_sync::<LwbufSource>();
    fn send<T: Send>() {}
    send::<Connection<'static, TcpStream>>();
    send::<SendfileHolds>();
}

// === the mapping caches (sfbuf, lwbuf, lwbuf-run) ===

/// Send `range` on a Unix socket pair and check it on the other side.
fn send_and_check<S: std::os::fd::AsFd>(
    conn: &mut Connection<'_, S>,
    rx: &UnixStream,
    file: &PageFile,
    seed: u64,
    range: std::ops::Range<u64>,
) {
    let n = (range.end - range.start) as usize;
    let got = thread::scope(|s| {
        let r = s.spawn(|| read_n(rx, n));
        conn.send(file, range.clone(), b"").expect("send");
        r.join().expect("reader")
    });
    assert_eq!(Pattern::new(seed).check(range.start, &got), None);
}

#[test]
fn cache_modes_hit_without_system_calls_the_second_time() {
    let mem = PhysMem::builder().frames(512).build().expect("phys");
    let len = 200 * FS + 17;
    let file = PageFile::builder(&mem).max_run(16).pattern(len, 91).expect("file");
    let runs = file.run_count() as u64;
    for mode in [Mode::SfBuf, Mode::Lwbuf, Mode::LwbufRun] {
        // Single-frame granules: one mapping per page, or per run.
        let sender = Sender::new(mode, &mem, opts().granule(Some(1))).expect("sender");
        let (a, b) = UnixStream::pair().expect("pair");
        let _worker = sender.bind_worker(0, false).expect("bind");
        let mut conn = sender.connection(a).expect("conn");
        send_and_check(&mut conn, &b, &file, 91, 0..len);
        let c1 = sender.cache_stats().expect("cache");
        let m1 = sender.mmu_stats().expect("mmu");
        // One mapping per page, or per run of up to 16 pages.
        let per_page = mode == Mode::Lwbuf;
        assert_eq!(c1, CacheStats::new(if per_page { 201 } else { runs }, 0), "{mode}");
        assert_eq!(m1.enters, c1.lookups, "{mode}: one mmap per miss");
        send_and_check(&mut conn, &b, &file, 91, 3..len - 3);
        let c2 = sender.cache_stats().expect("cache").since(&c1);
        assert_eq!(c2.hits, c2.lookups, "{mode}: all hits: {c2:?}");
        assert!((c2.hit_rate() - 1.0).abs() < 1e-9);
        assert_eq!(sender.mmu_stats().expect("mmu").since(&m1).syscalls, 0, "{mode}: no system call");
        nothing_in_use(&sender);
    }
}

/// With the default granule (512 frames here: the window has 8,192 slots)
/// the whole file is one granule: one mapping, every other lookup a hit,
/// the second send no system call at all.
#[test]
fn default_granule_maps_a_file_with_one_mapping() {
    let mem = PhysMem::builder().frames(512).build().expect("phys");
    let len = 200 * FS + 17;
    let file = PageFile::builder(&mem).max_run(16).pattern(len, 93).expect("file");
    for mode in [Mode::SfBuf, Mode::Lwbuf, Mode::LwbufRun] {
        let sender = Sender::new(mode, &mem, opts()).expect("sender");
        assert_eq!(sender.granule(), Some(lwbuf::sendfile::DEFAULT_GRANULE), "{mode}");
        let (a, b) = UnixStream::pair().expect("pair");
        let _worker = sender.bind_worker(0, false).expect("bind");
        let mut conn = sender.connection(a).expect("conn");
        send_and_check(&mut conn, &b, &file, 93, 0..len);
        let c1 = sender.cache_stats().expect("cache");
        let m1 = sender.mmu_stats().expect("mmu");
        assert_eq!((m1.enters, c1.lookups - c1.hits), (1, 1), "{mode}: one granule, one miss: {c1:?}");
        send_and_check(&mut conn, &b, &file, 93, 5..len - 1);
        assert_eq!(sender.mmu_stats().expect("mmu").since(&m1).syscalls, 0, "{mode}: no system call");
        nothing_in_use(&sender);
    }
    // A window too small for the default: the granule shrinks to a
    // sixteenth of it.
    let sender = Sender::new(Mode::SfBuf, &mem, opts().window_slots(64)).expect("sender");
    assert_eq!(sender.granule(), Some(4));
}

#[test]
fn lwbuf_workers_map_and_release_on_their_own_cpu() {
    let mem = PhysMem::builder().frames(1024).build().expect("phys");
    let file = PageFile::builder(&mem).max_run(8).pattern(64 * FS, 92).expect("file");
    for mode in [Mode::Lwbuf, Mode::LwbufRun] {
        let sender = Sender::new(mode, &mem, opts()).expect("sender");
        let lw = sender.lwbuf().expect("caches").lwbufs();
        thread::scope(|s| {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
            let sender = &sender;
            let file = &file;
            let workers: Vec<_> = (0..2)
                .map(|cpu| {
                    let ready = ready_tx.clone();
                    s.spawn(move || {
                        let w = sender.bind_worker(cpu, false).expect("bind");
                        assert!(w.is_bound() && w.cpu() == cpu);
                        assert!(matches!(sender.bind_worker(cpu, false), Err(Error::AlreadyBound { .. })));
                        let (a, b) = UnixStream::pair().expect("pair");
                        let mut conn = sender.connection(a).expect("conn");
                        for r in [0..64 * FS, 5..63 * FS, 0..64 * FS] {
                            send_and_check(&mut conn, &b, file, 92, r);
                        }
                        ready.send(()).expect("ready");
                        // Stay bound until the main thread has tried to send.
                        thread::sleep(Duration::from_millis(200));
                    })
                })
                .collect();
            for _ in 0..2 {
                ready_rx.recv_timeout(Duration::from_secs(10)).expect("worker ready");
            }
            // Both CPUs are bound to live workers: an unbound thread cannot
            // borrow one.
            let (a, _b) = UnixStream::pair().expect("pair");
            let mut conn = sender.connection(a).expect("conn");
            assert!(matches!(conn.send(file, 0..FS, b""), Err(Error::CpuBusy { .. })));
            assert!(matches!(sender.bind_worker(2, false), Err(Error::NoSuchCpu { .. })));
            for w in workers {
                w.join().expect("worker");
            }
        });
        let st = lw.stats();
        assert_eq!(st.total.decrefs_sent, 0, "{mode}: every release on the home CPU: {st}");
        assert_eq!(st.total.foreign, 0, "{mode}");
        for (cpu, c) in st.per_cpu.iter().enumerate() {
            // Each worker mapped the file on its own CPU once, then mostly
            // hit (lwbuf-run misses the shorter last run of `5..63 * FS`).
            assert!(c.misses > 0 && c.hits > c.misses, "{mode} cpu {cpu}: {c}");
            assert_eq!(c.cached, c.mapped, "{mode} cpu {cpu}: nothing in use");
        }
        nothing_in_use(&sender);
        // Now the CPUs are free again: a send from this thread borrows one.
        let (a, b) = UnixStream::pair().expect("pair");
        let mut conn = sender.connection(a).expect("conn");
        send_and_check(&mut conn, &b, &file, 92, 0..64 * FS);
        assert_eq!(lw.current_cpu(), None, "the borrowed CPU is given back");
        nothing_in_use(&sender);
    }
}

#[test]
fn sfbuf_requests_larger_than_the_pool_and_concurrent_requests_do_not_deadlock() {
    // 8 slots, runs of up to 4 pages, 4 threads each sending 96 pages at a
    // time: every request needs the pool many times over, and the requests
    // hold mappings while the others want them. A request only sleeps for
    // room when it holds nothing, so all of them finish.
    let mem = PhysMem::builder().frames(1024).build().expect("phys");
    let file = PageFile::builder(&mem).max_run(6).pattern(96 * FS, 93).expect("file");
    let o = opts().window_slots(8).max_run(4).stall_timeout(Some(Duration::from_secs(20)));
    let sender = Sender::new(Mode::SfBuf, &mem, o).expect("sender");
    thread::scope(|s| {
        for t in 0..4u64 {
            let (sender, file) = (&sender, &file);
            s.spawn(move || {
                let (a, b) = UnixStream::pair().expect("pair");
                let mut conn = sender.connection(a).expect("conn");
                for i in 0..5 {
                    let start = (t * 7 + i) % 5 * 100;
                    send_and_check(&mut conn, &b, file, 93, start..96 * FS - start);
                }
            });
        }
    });
    let st = sender.sfbuf().expect("pool").pool().stats();
    assert_eq!(st.used, 0, "{st}");
    assert!(st.mapped <= 8, "{st}");
    assert!(st.peak <= 8, "{st}");
    assert!(all_released(&file));
}

#[test]
fn sfbuf_no_wait_while_holding_then_waits_when_idle() {
    // A pool of 2 slots, all held by someone else: the send maps nothing,
    // holds nothing, and so waits (up to the stall timeout) for room.
    let mem = PhysMem::builder().frames(64).build().expect("phys");
    let file = PageFile::pattern(&mem, 4 * FS, 94).expect("file");
    let other = mem.alloc_run(2).expect("frames");
    let o = opts().window_slots(2).max_run(1).stall_timeout(Some(Duration::from_millis(100)));
    let sender = Sender::new(Mode::SfBuf, &mem, o).expect("sender");
    let pool = sender.sfbuf().expect("pool").pool();
    let held: Vec<_> = other.iter().map(|p| pool.alloc(p, lwbuf::Wait::NoWait).expect("hold")).collect();
    let (a, b) = UnixStream::pair().expect("pair");
    let mut conn = sender.connection(a).expect("conn");
    let t = std::time::Instant::now();
    assert!(matches!(conn.send(&file, 0..4 * FS, b""), Err(Error::TimedOut)));
    assert!(t.elapsed() >= Duration::from_millis(90), "it waited");
    assert!(pool.stats().waits >= 1);
    // Released while the send waits: it goes through.
    thread::scope(|s| {
        s.spawn(move || {
            thread::sleep(Duration::from_millis(30));
            drop(held);
        });
        send_and_check(&mut conn, &b, &file, 94, 0..4 * FS);
    });
    assert_eq!(pool.stats().used, 0);
    assert!(all_released(&file));
}

#[test]
fn cache_modes_over_the_model_mmu_make_no_system_call() {
    let mem = PhysMem::builder().frames(256).backing(Backing::Heap).build().expect("heap");
    let file = PageFile::builder(&mem).max_run(5).pattern(40 * FS, 95).expect("file");
    for mode in [Mode::SfBuf, Mode::Lwbuf, Mode::LwbufRun, Mode::MmapPerRequest] {
        let mmu: Arc<dyn Mmu> = Arc::new(ModelMmu::new(&mem, 64).expect("model"));
        let sender = Sender::with_mmu(mode, mmu.clone(), opts()).expect("sender");
        let (a, b) = UnixStream::pair().expect("pair");
        let mut conn = sender.connection(a).expect("conn");
        send_and_check(&mut conn, &b, &file, 95, 0..40 * FS);
        send_and_check(&mut conn, &b, &file, 95, 1..40 * FS - 1);
        assert_eq!(mmu.stats().syscalls, 0, "{mode}");
        assert!(mmu.stats().enters > 0, "{mode}");
        nothing_in_use(&sender);
    }
    let mmu: Arc<dyn Mmu> = Arc::new(ModelMmu::new(&mem, 4).expect("model"));
    assert!(matches!(Sender::with_mmu(Mode::Copy, mmu, opts()), Err(Error::Config { .. })));
}

#[test]
fn a_given_window_serves_the_mmap_mode_only() {
    let mem = PhysMem::builder().frames(64).backing(Backing::Heap).build().expect("heap");
    let file = PageFile::pattern(&mem, 6 * FS, 99).expect("file");
    let window = |n| WindowSource::new(Arc::new(ModelMmu::new(&mem, n).expect("model"))).expect("window");
    let sender = Sender::with_window(Mode::MmapPerRequest, window(8), opts()).expect("sender");
    assert_eq!(sender.mode(), Mode::MmapPerRequest);
    let (a, b) = UnixStream::pair().expect("pair");
    let mut conn = sender.connection(a).expect("conn");
    send_and_check(&mut conn, &b, &file, 99, 0..6 * FS);
    nothing_in_use(&sender);
    for &mode in Mode::ALL.iter().filter(|&&m| m != Mode::MmapPerRequest) {
        let r = Sender::with_window(mode, window(4), opts());
        assert!(matches!(r, Err(Error::Config { .. })), "{mode}: a window it would not use");
    }
}

#[test]
fn lwbuf_cache_smaller_than_the_working_set_evicts_and_stays_consistent() {
    // 16 slots per CPU for a 100-page file: every send evicts.
    let mem = PhysMem::builder().frames(512).build().expect("phys");
    let file = PageFile::builder(&mem).max_run(4).pattern(100 * FS, 96).expect("file");
    for mode in [Mode::Lwbuf, Mode::LwbufRun, Mode::SfBuf] {
        let o = opts().window_slots(16).max_run(4);
        let sender = Sender::new(mode, &mem, o).expect("sender");
        let (a, b) = UnixStream::pair().expect("pair");
        let mut conn = sender.connection(a).expect("conn");
        for r in [0..100 * FS, 7..99 * FS, 50 * FS..100 * FS, 0..100 * FS] {
            send_and_check(&mut conn, &b, &file, 96, r);
        }
        let m = sender.mmu_stats().expect("mmu");
        // Lazy reclaim (the default): evicted mappings are mapped over in
        // place by later misses.
        assert!(m.removes + m.replaces > 0, "{mode}: evictions unmap or are mapped over: {m}");
        assert!(m.mapped <= 32, "{mode}: within the window: {m}");
        nothing_in_use(&sender);
    }
}

#[test]
fn run_mappings_are_found_again_by_ranges_that_start_anywhere() {
    // Runs of 16 pages, mapped in chunks of 4: a range that starts or ends
    // inside a chunk still maps (and later finds) the whole chunk.
    let mem = PhysMem::builder().frames(512).build().expect("phys");
    let len = 64 * FS;
    let file = PageFile::builder(&mem).max_run(16).pattern(len, 97).expect("file");
    assert_eq!(file.run_of(17), Some(16..32));
    assert_eq!(file.run_of(64), None);
    for mode in [Mode::SfBuf, Mode::LwbufRun] {
        let o = opts().max_run(4);
        let sender = Sender::new(mode, &mem, o).expect("sender");
        let (a, b) = UnixStream::pair().expect("pair");
        let mut conn = sender.connection(a).expect("conn");
        send_and_check(&mut conn, &b, &file, 97, 0..len);
        let c0 = sender.cache_stats().expect("cache");
        assert_eq!(c0.lookups, 16, "{mode}: 64 pages in chunks of 4");
        let m0 = sender.mmu_stats().expect("mmu");
        for r in [FS + 5..9 * FS - 1, 3 * FS..4 * FS, 17 * FS + 1..63 * FS + 100, 61 * FS..len] {
            send_and_check(&mut conn, &b, &file, 97, r);
        }
        let c = sender.cache_stats().expect("cache").since(&c0);
        assert_eq!(c.hits, c.lookups, "{mode}: every chunk found again: {c:?}");
        assert_eq!(sender.mmu_stats().expect("mmu").since(&m0).syscalls, 0, "{mode}");
        nothing_in_use(&sender);
    }
}

#[test]
fn zerocopy_from_the_cache_sources() {
    // MSG_ZEROCOPY from sf_buf and lwbuf mappings: the mappings go back to
    // the caches as soon as they are sent; the page holds wait for the
    // completions.
    let mem = PhysMem::builder().frames(512).build().expect("phys");
    let len = 256 << 10;
    let file = PageFile::builder(&mem).max_run(8).pattern(len, 98).expect("file");
    let sf = SfBufSource::window(&mem, 64, None, 8, Some(Duration::from_secs(5))).expect("pool");
    let lw = LwbufSource::window(&mem, 1, 64, None, 8).expect("caches");
    let _cpu = lw.bind_worker(0, false).expect("bind");
    fn run<M: lwbuf::sendfile::MapSource>(src: &M, file: &PageFile, len: u64) {
        let (server, client) = tcp_pair();
        let mut zc = ZeroCopy::new(server.as_fd(), src).expect("SO_ZEROCOPY");
        let got = thread::scope(|s| {
            let r = s.spawn(|| read_n(&client, 2 * len as usize));
            for _ in 0..2 {
                zc.send(server.as_fd(), file, 0..len, b"", &opts()).expect("send");
            }
            r.join().expect("reader")
        });
        assert_eq!(Pattern::new(98).check(0, &got[..len as usize]), None);
        assert_eq!(Pattern::new(98).check(0, &got[len as usize..]), None);
        zc.flush(server.as_fd(), Duration::from_secs(5)).expect("flush");
        assert_eq!(zc.held_pages(), 0);
    }
    run(&sf, &file, len);
    let st = sf.pool().stats();
    assert!(st.used == 0 && st.hits > 0, "{st}");
    run(&lw, &file, len);
    assert_eq!(lw.lwbufs().check_consistency(), Ok(0));
    assert!(lw.cache_stats().hits > 0);
    assert!(all_released(&file));
}

/// `mapping_len` and `chunk_grid`, the piece sizes every send loop shares:
/// gaps in the frames, granule ends, `max_run` at both extremes.
#[test]
fn mapping_len_cuts_at_gaps_granule_ends_and_max_run() {
    use lwbuf::sendfile::{chunk_grid, mapping_len};
    let mem = PhysMem::builder().frames(64).backing(Backing::Heap).build().expect("mem");
    let run = mem.alloc_run(40).expect("run"); // frames 0..40
    assert_eq!(mapping_len(&[], 16, 1), 0);
    assert_eq!(mapping_len(&run, 0, 1), 1, "at least the first page");
    assert_eq!(mapping_len(&run, usize::MAX, 1), 40);
    assert_eq!(mapping_len(&run, usize::MAX, usize::MAX), 40);
    assert_eq!(mapping_len(&run[5..], usize::MAX, 8), 3, "frames 5..8: the end of granule 0");
    assert_eq!(mapping_len(&run[8..], usize::MAX, 8), 8);
    assert_eq!(mapping_len(&run[39..], usize::MAX, 64), 1);
    // A gap in the frames ends the piece wherever the granule ends.
    let gap: Vec<Page> = [0, 1, 2, 5].iter().map(|&i| run[i].clone()).collect();
    assert_eq!(mapping_len(&gap, usize::MAX, 1), 3);
    assert_eq!(mapping_len(&gap, 2, 1), 2);
    assert_eq!(mapping_len(&gap, usize::MAX, 2), 2);
    assert_eq!(chunk_grid(16, 1), Some(16));
    assert_eq!(chunk_grid(1, 1), None);
    assert_eq!(chunk_grid(0, 1), None);
    assert_eq!(chunk_grid(16, 512), None);
    assert_eq!(chunk_grid(usize::MAX, 1), Some(usize::MAX));
}
