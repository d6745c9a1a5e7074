//! The page cache over real files (`SysFileIo`, files in a temporary
//! directory) and over `MemFileIo` (heap frames; the half that runs under
//! Miri): reads near page and end-of-file boundaries, fill once, readahead,
//! the frame budget and eviction, block write-back and its coalescing,
//! files that grow, offsets at the top of the range, read-only files,
//! files changed behind the cache, the ways a file is written back (flush,
//! fsync, close, sync_all, drop), concurrent writers and flushers, pages
//! mapped through the sf_buf pool and lwbufs, and injected file-system
//! faults (`FaultyFileIo`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};

use lwbuf::pagecache::{CachedFile, FileIo, FileStat, FrameRange, IoFile, PageCache};
use lwbuf::{Error, Fault, Lwbufs, Mmu, ModelMmu, SfPool, Wait, Window};

#[macro_use]
#[path = "common/pagecache_env.rs"]
mod env;
use env::{make_read_only, pattern, Env, Fs};

const MIRI: bool = cfg!(miri);

/// Panic with the first difference (not every byte) unless `got == want`;
/// the caller's line says which comparison.
#[track_caller]
fn same(got: &[u8], want: &[u8], what: impl std::fmt::Display) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        let show = |v: &[u8]| v[at.min(v.len())..(at + 16).min(v.len())].to_vec();
        let what = what.to_string();
        let what = if what.is_empty() { "the bytes (see the line)" } else { &what };
        panic!(
            "{what}: {} bytes where {} were expected; first difference at {at}: {:?} where {:?} were expected",
            got.len(),
            want.len(),
            show(got),
            show(want)
        );
    }
}

fn read_vec(file: &CachedFile, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let n = file.read_at(offset, &mut buf).expect("read_at");
    buf.truncate(n);
    buf
}

/// Apply a write to the expected contents, growing them with zeros.
fn apply(want: &mut Vec<u8>, offset: usize, data: &[u8]) {
    if want.len() < offset + data.len() {
        want.resize(offset + data.len(), 0);
    }
    want[offset..offset + data.len()].copy_from_slice(data);
}

fn config_what(e: &Error) -> &'static str {
    match e {
        Error::Config { what, .. } => what,
        other => panic!("not a Config error: {other:?}"),
    }
}

// === reads ===

/// Every size near a page boundary and the end of the file, at every
/// offset near them, gives the file's bytes (`read_at`: as many as there
/// are; `read_exact_at`: all or `OutOfBounds`), through a budget of 3
/// frames so that pages come and go.
fn reads_near_page_and_eof_boundaries(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let len = if MIRI { ps + 100 } else { 3 * ps + 100 };
    let data = pattern(len, 1);
    let path = env.put("f", &data);
    let cache = env.builder().budget(3).build().expect("cache");
    let file = cache.open(&path).expect("open");
    assert_eq!(file.len(), len as u64);
    assert_eq!(file.page_count(), len.div_ceil(ps) as u64);
    let offsets: Vec<usize> = if MIRI {
        vec![0, ps - 1, len - 1, len + 1]
    } else {
        vec![0, 1, 7, ps - 9, ps - 1, ps, ps + 1, 2 * ps - 1, 2 * ps, 3 * ps - 1, 3 * ps, len - 1, len, len + 1, 4 * ps]
    };
    let sizes: Vec<usize> =
        if MIRI { vec![9, ps + 1] } else { vec![0, 1, 2, 7, 8, 9, ps - 1, ps, ps + 1, 2 * ps + 3, len] };
    for &off in &offsets {
        for &size in &sizes {
            let mut buf = vec![0u8; size];
            let n = file.read_at(off as u64, &mut buf).expect("read_at");
            let want = len.saturating_sub(off).min(size);
            assert_eq!(n, want, "read_at({off}, {size})");
            let from = off.min(len);
            same(&buf[..n], &data[from..from + n], format!("read_at({off}, {size})"));
            assert!(buf[n..].iter().all(|&b| b == 0), "bytes past the end left alone");
            let mut exact = vec![0u8; size];
            match file.read_exact_at(off as u64, &mut exact) {
                Ok(()) => {
                    assert!(off + size <= len, "read_exact_at({off}, {size}) past the end");
                    assert_eq!(&exact[..], &data[off..off + size]);
                }
                Err(Error::OutOfBounds { .. }) => assert!(off + size > len, "read_exact_at({off}, {size})"),
                Err(e) => panic!("read_exact_at({off}, {size}): {e}"),
            }
            assert!(cache.stats().resident <= 3);
        }
    }
}

/// Many threads reading the same page at once: one read from the file,
/// one miss, every other lookup a hit.
fn fill_once_under_many_threads(fs: Fs) {
    let env = Env::new(fs, 64);
    let ps = env.ps();
    let (threads, rounds) = if MIRI { (2, 1) } else { (8, 12) };
    let data = pattern(3 * rounds * ps + ps, 2);
    let path = env.put("f", &data);
    let cache = env.builder().build().expect("cache");
    let file = cache.open(&path).expect("open");
    for r in 0..rounds {
        // Never the page after the last miss: no readahead.
        let page = 3 * r + 2;
        let before = cache.stats();
        let barrier = Barrier::new(threads);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (file, barrier, data) = (&file, &barrier, &data);
                s.spawn(move || {
                    barrier.wait();
                    let at = page * ps + t * 8;
                    same(&read_vec(file, at as u64, 16), &data[at..at + 16], "");
                });
            }
        });
        let after = cache.stats();
        assert_eq!(after.reads - before.reads, 1, "round {r}: one read");
        assert_eq!(after.misses - before.misses, 1, "round {r}: one miss");
        assert_eq!(after.hits - before.hits, threads as u64 - 1, "round {r}: the rest hit");
        assert_eq!(after.resident, r + 1);
    }
}

/// Sequential reads read ahead 4 pages, then twice as many each miss up to
/// the largest readahead, and every page read ahead is used; reads by a
/// stride never read ahead.
fn readahead_on_sequential_reads_only(fs: Fs) {
    let env = Env::new(fs, if MIRI { 32 } else { 128 });
    let ps = env.ps();
    // The windows of each miss: 1 (page 0 is no sequel), 4, 8, ... capped
    // by the largest readahead (32) and the end of the file.
    let (pages, windows): (usize, &[u64]) = if MIRI { (8, &[1, 4, 3]) } else { (64, &[1, 4, 8, 16, 32, 3]) };
    let data = pattern(pages * ps, 3);
    let path = env.put("f", &data);
    let cache = env.builder().budget(if MIRI { 32 } else { 128 }).readahead(32).build().expect("cache");
    let file = cache.open(&path).expect("open");
    for p in 0..pages {
        same(&read_vec(&file, (p * ps) as u64, ps), &data[p * ps..(p + 1) * ps], format!("page {p}"));
    }
    let s = cache.stats();
    let ahead: u64 = windows.iter().map(|w| w - 1).sum();
    assert_eq!(s.reads, windows.len() as u64);
    assert_eq!(s.misses, windows.len() as u64);
    assert_eq!(s.readahead_pages, ahead);
    assert_eq!(s.readahead_hits, ahead, "every page read ahead was used");
    assert_eq!(s.read_bytes, (pages * ps) as u64);

    // By a stride of 7 pages: never the page after the last miss.
    let path = env.put("g", &data);
    let cache = env.builder().budget(if MIRI { 32 } else { 128 }).readahead(32).build().expect("cache");
    let file = cache.open(&path).expect("open");
    for i in 0..pages {
        let p = (i * 7) % pages;
        same(&read_vec(&file, (p * ps + 5) as u64, 9), &data[p * ps + 5..p * ps + 14], "");
    }
    let s = cache.stats();
    assert_eq!(s.readahead_pages, 0);
    assert_eq!(s.reads, pages as u64);
    assert_eq!(s.misses, pages as u64);
}

// === the budget ===

/// Mixed reads and writes over 4 times the budget, one thread: never more
/// than the budget resident, frames in use equal to resident pages, and
/// the file right after a flush.
fn resident_never_above_budget(fs: Fs) {
    let env = Env::new(fs, 32);
    let ps = env.ps();
    let pages = if MIRI { 12 } else { 40 };
    let budget = if MIRI { 3 } else { 4 };
    let mut want = pattern(pages * ps, 4);
    let path = env.put("f", &want);
    let cache = env.builder().budget(budget).build().expect("cache");
    let file = cache.open(&path).expect("open");
    let mut x = 12345u64;
    let steps = if MIRI { 30 } else { 400 };
    for step in 0..steps {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let off = ((x >> 33) as usize) % (pages * ps - 64);
        let n = 1 + ((x >> 20) as usize % 60);
        if step % 3 == 0 {
            let bytes = vec![(step % 250) as u8 + 1; n];
            file.write_at(off as u64, &bytes).expect("write");
            apply(&mut want, off, &bytes);
        } else {
            same(&read_vec(&file, off as u64, n), &want[off..off + n], format!("step {step}"));
        }
        let s = cache.stats();
        assert!(s.resident <= budget, "step {step}: {} resident, budget {budget}", s.resident);
        assert_eq!(env.frames_used(), s.resident, "step {step}: frames in use");
    }
    file.flush().expect("flush");
    same(&env.disk("f"), &want, "");
}

/// `set_budget` lower evicts down to it before it returns; 0 is refused.
fn set_budget_lower_shrinks_at_once(fs: Fs) {
    let env = Env::new(fs, 32);
    let ps = env.ps();
    let data = pattern(16 * ps, 5);
    let path = env.put("f", &data);
    let cache = env.builder().budget(16).build().expect("cache");
    let file = cache.open(&path).expect("open");
    for i in 0..16 {
        let p = (i * 5) % 16;
        read_vec(&file, (p * ps) as u64, 1);
    }
    file.write_at(3, b"dirty").expect("write");
    assert_eq!(cache.stats().resident, 16);
    let left = cache.set_budget(3).expect("set_budget");
    assert!(left <= 3, "{left} resident after set_budget(3)");
    let s = cache.stats();
    assert!(s.resident <= 3);
    assert_eq!(s.budget, 3);
    assert!(s.evictions >= 13);
    assert_eq!(env.frames_used(), s.resident);
    same(&env.disk("f")[3..8], b"dirty", "a dirty page is written back before it goes");
    let e = cache.set_budget(0).expect_err("a budget of 0");
    assert_eq!(config_what(&e), "budget");
    assert_eq!(cache.budget(), 3);
    same(&read_vec(&file, 0, 10), &[&data[..3], b"dirty", &data[8..10]].concat(), "");
}

/// Dirty pages pushed out by other fills are written back first: the file
/// on disk is right without a flush.
fn dirty_pages_written_back_before_eviction(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let mut want = pattern(8 * ps, 6);
    let a = env.put("a", &want);
    let b = env.put("b", &pattern(4 * ps, 7));
    let cache = env.builder().budget(2).build().expect("cache");
    let fa = cache.open(&a).expect("open a");
    let fb = cache.open(&b).expect("open b");
    for p in 0..8 {
        let off = p * ps + 100 + p;
        fa.write_at(off as u64, &[0xA0 + p as u8]).expect("write");
        apply(&mut want, off, &[0xA0 + p as u8]);
    }
    for p in 0..4 {
        read_vec(&fb, (p * ps) as u64, 1);
    }
    let s = cache.stats();
    assert_eq!(s.dirty, 0, "every dirty page was evicted, so written back");
    assert!(s.written_bytes >= 8 * 512);
    same(&env.disk("a"), &want, "no flush, no loss");
    same(&read_vec(&fa, 0, 8 * ps), &want, "");
}

/// Pages held through `page()` are not evicted: a fill goes over the
/// budget (counted), and once they are let go the next fill evicts back
/// under it.
fn held_pages_are_not_evicted(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let data = pattern(6 * ps, 8);
    let path = env.put("f", &data);
    let cache = env.builder().budget(2).build().expect("cache");
    let file = cache.open(&path).expect("open");
    let p0 = file.page(0).expect("page 0");
    let p1 = file.page(2).expect("page 2");
    assert!(p0.hold_count() >= 2, "the cache's hold and ours");
    same(&read_vec(&file, (4 * ps) as u64, 5), &data[4 * ps..4 * ps + 5], "");
    let s = cache.stats();
    assert!(s.over_budget >= 1);
    assert_eq!(s.resident, 3);
    let mut got = vec![0u8; ps];
    p0.direct().expect("direct").read_at(0, &mut got).expect("read");
    same(&got, &data[..ps], "");
    p1.direct().expect("direct").read_at(0, &mut got).expect("read");
    same(&got, &data[2 * ps..3 * ps], "");
    drop((p0, p1));
    read_vec(&file, (3 * ps) as u64, 1);
    assert!(cache.stats().resident <= 2, "back under the budget: {:?}", cache.stats());
    assert_eq!(env.frames_used(), cache.stats().resident);
}

// === block write-back ===

/// One byte dirtied in each of N pages: the flush writes N blocks in N
/// calls; bytes on both sides of a page boundary: 2 blocks in one call; a
/// write over 3 blocks of a page: 3 blocks in one call. For blocks of 512,
/// 1024 and 4096 bytes.
fn block_write_back_and_coalescing(fs: Fs) {
    let env = Env::new(fs, 32);
    let ps = env.ps();
    let sizes: &[usize] = if MIRI { &[512, 4096] } else { &[512, 1024, 4096] };
    for &bs in sizes {
        let name = format!("f{bs}");
        let mut want = pattern(if MIRI { 5 } else { 10 } * ps, 9);
        let path = env.put(&name, &want);
        let cache = env.builder().block_size(bs).build().expect("cache");
        assert_eq!(cache.block_size(), bs);
        let file = cache.open(&path).expect("open");
        let pages: &[usize] = if MIRI { &[0, 2, 4] } else { &[0, 2, 4, 6, 8] };
        for &p in pages {
            let off = p * ps + 700;
            file.write_at(off as u64, b"x").expect("write");
            apply(&mut want, off, b"x");
        }
        assert_eq!(cache.stats().dirty, pages.len());
        let before = cache.stats();
        file.flush().expect("flush");
        let s = cache.stats();
        assert_eq!(s.written_bytes - before.written_bytes, (pages.len() * bs) as u64, "bs {bs}");
        assert_eq!(s.writes - before.writes, pages.len() as u64, "bs {bs}: one call per page");
        assert_eq!(s.dirty, 0);
        same(&env.disk(&name), &want, "");

        // Across a page boundary: the last block of page 0 and the first of
        // page 1 go in one call.
        file.write_at(ps as u64 - 1, b"yz").expect("write");
        apply(&mut want, ps - 1, b"yz");
        let before = cache.stats();
        file.flush().expect("flush");
        let s = cache.stats();
        assert_eq!(s.written_bytes - before.written_bytes, 2 * bs as u64, "bs {bs}");
        assert_eq!(s.writes - before.writes, 1, "bs {bs}: adjacent blocks in one call");
        same(&env.disk(&name), &want, "");

        // Three consecutive blocks of page 3 (one block when it is the page).
        if bs < ps {
            let off = 3 * ps + bs - 1;
            let data = vec![b'w'; bs + 2];
            file.write_at(off as u64, &data).expect("write");
            apply(&mut want, off, &data);
            let before = cache.stats();
            file.flush().expect("flush");
            let s = cache.stats();
            assert_eq!(s.written_bytes - before.written_bytes, 3 * bs as u64, "bs {bs}");
            assert_eq!(s.writes - before.writes, 1, "bs {bs}");
            same(&env.disk(&name), &want, "");
        }

        // Nothing dirty: nothing written.
        let before = cache.stats();
        file.flush().expect("flush");
        assert_eq!(cache.stats().writes, before.writes);
        assert_eq!(cache.stats().written_bytes, before.written_bytes);
    }
}

/// A partial-block write to a page never read keeps the rest of the
/// block's bytes on disk (the page is read first).
fn partial_block_write_to_an_unread_page(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    for bs in [512usize, 4096] {
        let name = format!("f{bs}");
        let mut want = pattern(4 * ps, 10);
        let path = env.put(&name, &want);
        let cache = env.builder().block_size(bs).build().expect("cache");
        let file = cache.open(&path).expect("open");
        file.write_at(2 * ps as u64 + 100, b"abc").expect("write");
        apply(&mut want, 2 * ps + 100, b"abc");
        file.fsync().expect("fsync");
        assert_eq!(cache.stats().written_bytes, bs as u64);
        same(&env.disk(&name), &want, "");
    }
}

/// A whole-page write to a page not cached needs no read, and the bytes
/// around it are unchanged.
fn whole_page_write_needs_no_read(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let mut want = pattern(4 * ps, 11);
    let path = env.put("f", &want);
    let cache = env.builder().build().expect("cache");
    let file = cache.open(&path).expect("open");
    let page = vec![0x5Au8; ps];
    file.write_at(ps as u64, &page).expect("write");
    apply(&mut want, ps, &page);
    assert_eq!(cache.stats().reads, 0);
    same(&read_vec(&file, ps as u64, ps), &page, "");
    file.fsync().expect("fsync");
    same(&env.disk("f"), &want, "");
    assert_eq!(cache.stats().written_bytes, ps as u64);
}

/// Block sizes that are not a power of two from 512 to the frame size, and
/// a budget of 0, are refused, naming the setting and the value.
#[test]
fn invalid_block_sizes_and_budget_are_config_errors() {
    let env = Env::new(Fs::Mem, 4);
    let ps = env.ps();
    for bs in [0usize, 256, 3000, 2 * ps, 511, usize::MAX] {
        let e = env.builder().block_size(bs).build().expect_err("an invalid block size");
        assert_eq!(config_what(&e), "block_size", "{bs}");
        assert!(e.to_string().contains(&bs.to_string()), "{e} names {bs}");
    }
    let e = env.builder().budget(0).build().expect_err("a budget of 0");
    assert_eq!(config_what(&e), "budget");
    // A budget above the memory is allowed; the memory bounds it.
    let cache = env.builder().budget(100).build().expect("budget above the memory");
    assert_eq!(cache.budget(), 100);
    assert_eq!(env.builder().build().expect("default").budget(), 4);
}

/// What `open` refuses, with the errno its documentation gives: a missing
/// file, a directory, and a file that is not a regular file.
#[test]
#[cfg_attr(miri, ignore = "real files need open(2)")]
fn open_refuses_what_is_not_a_regular_file() {
    let env = Env::new(Fs::Sys, 4);
    let cache = env.builder().build().expect("cache");
    let errno = |p: &Path| match cache.open(p) {
        Err(e @ Error::Sys { op: "open", .. }) => e.errno(),
        other => panic!("{}: {other:?}", p.display()),
    };
    assert_eq!(errno(&env.path("missing")), Some(libc::ENOENT));
    assert_eq!(errno(env.dir.as_deref().expect("a directory")), Some(libc::EISDIR));
    if Path::new("/dev/null").exists() {
        assert_eq!(errno(Path::new("/dev/null")), Some(libc::EINVAL));
    }
    assert!(cache.files().is_empty());
}

// === files that grow, offsets at the top ===

/// Writes past the end grow the file; the gap reads as zeros, before and
/// after the write-back, which extends the file on disk.
fn writes_extend_the_file(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let mut want = pattern(1000, 12);
    let path = env.put("f", &want);
    let cache = env.builder().build().expect("cache");
    let file = cache.open(&path).expect("open");
    let far = 3 * ps + 5;
    file.write_at(far as u64, b"tail").expect("write");
    apply(&mut want, far, b"tail");
    assert_eq!(file.len(), (far + 4) as u64);
    same(&read_vec(&file, 0, 2 * far), &want, "");
    assert!(read_vec(&file, 1000, far - 1000).iter().all(|&b| b == 0), "the gap reads as zeros");
    // Appending at the end.
    file.write_at(file.len(), b"!").expect("append");
    want.push(b'!');
    // A write that ends exactly at a page boundary.
    let end = 5 * ps;
    file.write_at((end - 3) as u64, b"END").expect("write");
    apply(&mut want, end - 3, b"END");
    assert_eq!(file.len(), end as u64);
    file.fsync().expect("fsync");
    same(&env.disk("f"), &want, "");
    // Read back through a fresh cache.
    let cache2 = env.builder().build().expect("cache");
    let f2 = cache2.open(&path).expect("open");
    same(&read_vec(&f2, 0, want.len() + 10), &want, "");
}

/// Offsets at the top of the range: writes ending past `i64::MAX` are
/// `Config("offset")`; reads there give 0 bytes or `OutOfBounds`; nothing
/// panics. A write just below `i64::MAX` is cached; its write-back fails
/// (no file is that large) and says so.
fn offsets_near_the_top(fs: Fs) {
    let env = Env::new(fs, 16);
    let path = env.put("f", &pattern(100, 13));
    let cache = env.builder().build().expect("cache");
    let file = cache.open(&path).expect("open");
    let top = i64::MAX as u64;
    for (off, n) in [(u64::MAX, 1usize), (u64::MAX - 1, 2), (top, 1), (top - 1, 2), (u64::MAX / 2 + 1, 1), (0, 0)] {
        if n == 0 {
            continue;
        }
        let e = file.write_at(off, &vec![1u8; n]).expect_err("past i64::MAX");
        assert_eq!(config_what(&e), "offset", "write_at({off}, {n})");
        assert_eq!(config_what(&file.mark_dirty(off, n).expect_err("past i64::MAX")), "offset");
    }
    file.write_at(u64::MAX, b"").expect_err("even empty, the offset is past i64::MAX");
    for off in [u64::MAX, u64::MAX - 1, top, top + 1, 100, 101] {
        let mut buf = [0u8; 8];
        assert_eq!(file.read_at(off, &mut buf).expect("read_at"), 0);
        assert!(matches!(file.read_exact_at(off, &mut buf), Err(Error::OutOfBounds { .. })));
        assert!(matches!(file.page(off), Err(Error::OutOfBounds { .. })));
    }
    assert!(matches!(file.read_exact_at(u64::MAX, &mut []), Err(Error::OutOfBounds { .. })));
    assert!(matches!(file.pages(u64::MAX - 1..u64::MAX), Err(Error::OutOfBounds { .. })));
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = 50..10;
    assert!(matches!(file.pages(backwards), Err(Error::OutOfBounds { .. })));
    assert_eq!(file.len(), 100);

    file.write_at(top - 10, b"12345").expect("a write just below i64::MAX");
    assert_eq!(file.len(), top - 5);
    same(&read_vec(&file, top - 12, 100), b"\x00\x0012345", "the bytes below the top");
    let e = file.flush().expect_err("no file is that large");
    assert!(matches!(e, Error::Sys { .. }), "{e}");
    assert_eq!(cache.stats().dirty, 1, "kept dirty");
}

// === read-only files ===

/// A file system wrapper that refuses to open anything for writing, as a
/// read-only mount would.
#[derive(Debug)]
struct ReadOnlyFs(Arc<dyn FileIo>);

impl FileIo for ReadOnlyFs {
    fn open(&self, path: &Path, writable: bool) -> std::io::Result<Box<dyn IoFile>> {
        if writable {
            return Err(std::io::Error::from_raw_os_error(libc::EROFS));
        }
        self.0.open(path, false)
    }

    fn stat(&self, path: &Path) -> std::io::Result<FileStat> {
        self.0.stat(path)
    }
}

/// A file that cannot be opened for writing is opened read-only: reads
/// work, writes and `mark_dirty` are `EBADF`, flush and fsync are `Ok`.
fn read_only_files(fs: Fs) {
    let env = Env::new(fs, 16);
    let data = pattern(5000, 14);
    let path = env.put("ro", &data);
    let io: Arc<dyn FileIo> = match fs {
        Fs::Mem => Arc::new(ReadOnlyFs(env.io())),
        Fs::Sys => {
            if let Err(why) = make_read_only(&path) {
                println!("skipped: a read-only file cannot be made here: {why}");
                return;
            }
            env.io()
        }
    };
    let cache = PageCache::builder(&env.phys).io(io).build().expect("cache");
    let file = cache.open(&path).expect("open read-only");
    assert!(!file.is_writable());
    same(&read_vec(&file, 0, 6000), &data, "");
    let e = file.write_at(0, b"x").expect_err("read-only");
    assert!(matches!(e, Error::Sys { .. }), "{e}");
    assert_eq!(e.errno(), Some(libc::EBADF));
    assert_eq!(file.mark_dirty(0, 1).expect_err("read-only").errno(), Some(libc::EBADF));
    file.flush().expect("flush");
    file.fsync().expect("fsync");
    cache.sync_all().expect("sync_all");
    assert_eq!(cache.stats().writes, 0);
    same(&env.disk("ro"), &data, "");
}

// === files changed behind the cache ===

/// A file truncated behind the cache: the next fill is `FileChanged`,
/// nothing is cached, and then the cache has the new length: reads beyond
/// it give 0 / `OutOfBounds`, and the bytes left are the new ones, never
/// stale.
fn truncated_behind_the_cache(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let old = pattern(4 * ps, 15);
    let path = env.put("f", &old);
    let cache = env.builder().build().expect("cache");
    let file = cache.open(&path).expect("open");
    same(&read_vec(&file, 0, 16), &old[..16], "");
    let new = pattern(100, 16);
    env.modify("f", |d| *d = new.clone());
    let e = file.read_at(2 * ps as u64, &mut [0u8; 16]).expect_err("the file is shorter");
    assert!(matches!(e, Error::FileChanged { .. }), "{e}");
    let s = cache.stats();
    assert_eq!(s.fill_errors, 1);
    assert_eq!(s.resident, 0, "nothing cached: the failed fill, and the clean page of the old file dropped");
    assert_eq!(env.frames_used(), 0);
    assert_eq!(file.len(), 100);
    assert_eq!(file.read_at(2 * ps as u64, &mut [0u8; 16]).expect("read"), 0);
    assert!(matches!(file.read_exact_at(99, &mut [0u8; 2]), Err(Error::OutOfBounds { .. })));
    assert!(matches!(file.page(1), Err(Error::OutOfBounds { .. })));
    same(&read_vec(&file, 0, ps), &new, "the new bytes, never the old");
}

/// A file modified in place (same size, new bytes and modification time):
/// `revalidate` and a second `open` notice it and drop the clean pages.
fn modified_in_place(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let old = pattern(3 * ps, 17);
    let path = env.put("f", &old);
    let cache = env.builder().build().expect("cache");
    let file = cache.open(&path).expect("open");
    same(&read_vec(&file, 0, 3 * ps), &old, "");
    let new = pattern(3 * ps, 18);
    env.modify("f", |d| d.copy_from_slice(&new));
    assert!(file.revalidate().expect("revalidate"), "changed");
    assert!(cache.stats().stale_drops >= 3);
    assert_eq!(cache.stats().resident, 0);
    same(&read_vec(&file, 0, 3 * ps), &new, "");
    assert!(!file.revalidate().expect("revalidate"), "unchanged since");
    let newer = pattern(3 * ps, 19);
    env.modify("f", |d| d.copy_from_slice(&newer));
    let again = cache.open(&path).expect("open again");
    same(&read_vec(&again, 0, 3 * ps), &newer, "");
    same(&read_vec(&file, 0, 3 * ps), &newer, "the same file");
}

/// A file replaced by a new inode (renamed over): `revalidate` reopens it
/// and takes its length.
fn replaced_by_a_new_inode(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let old = pattern(4 * ps, 20);
    let path = env.put("f", &old);
    let cache = env.builder().build().expect("cache");
    let file = cache.open(&path).expect("open");
    same(&read_vec(&file, 0, 4 * ps), &old, "");
    let ino = file.stat().ino;
    let new = pattern(2 * ps + 10, 21);
    env.replace("f", &new);
    assert!(file.revalidate().expect("revalidate"));
    assert_ne!(file.stat().ino, ino);
    assert_eq!(file.len(), new.len() as u64);
    same(&read_vec(&file, 0, 4 * ps), &new, "");
    assert_eq!(file.read_at(3 * ps as u64, &mut [0u8; 4]).expect("read"), 0);
    // Writes go to the new inode.
    file.write_at(1, b"new").expect("write");
    file.fsync().expect("fsync");
    let mut want = new.clone();
    apply(&mut want, 1, b"new");
    same(&env.disk("f"), &want, "");
}

/// A file touched behind the cache (only its modification time changed)
/// while the cache holds a write that grew it: the length stays where the
/// write ended, and so does the file on disk after the write-back.
fn touched_file_keeps_the_written_length(fs: Fs) {
    let env = Env::new(fs, 16);
    let mut want = pattern(100, 22);
    let path = env.put("f", &want);
    let cache = env.builder().build().expect("cache");
    let file = cache.open(&path).expect("open");
    file.write_at(100, b"0123456789").expect("append");
    want.extend_from_slice(b"0123456789");
    env.modify("f", |_| {});
    assert!(file.revalidate().expect("revalidate"));
    assert_eq!(file.len(), 110);
    same(&read_vec(&file, 0, 1000), &want, "");
    file.fsync().expect("fsync");
    same(&env.disk("f"), &want, "");
}

/// `open` of a path already open gives the same file: writes through one
/// handle are read through the other, before and after write-backs.
fn open_twice_is_the_same_file(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let mut want = pattern(2 * ps + 7, 23);
    let path = env.put("f", &want);
    let cache = env.builder().build().expect("cache");
    let h1 = cache.open(&path).expect("open");
    h1.write_at(10, b"abc").expect("write");
    apply(&mut want, 10, b"abc");
    let h2 = cache.open(&path).expect("open again");
    assert_eq!(cache.files().len(), 1);
    same(&read_vec(&h2, 0, 3 * ps), &want, "");
    h2.write_at(ps as u64 + 1, b"xyz").expect("write");
    apply(&mut want, ps + 1, b"xyz");
    same(&read_vec(&h1, 0, 3 * ps), &want, "");
    h1.flush().expect("flush");
    // Grow it after a write-back of ours changed it on disk, then open the
    // path again.
    let end = want.len() as u64;
    h1.write_at(end, b"more").expect("append");
    want.extend_from_slice(b"more");
    let h3 = cache.open(&path).expect("open a third time");
    assert_eq!(h3.len(), want.len() as u64);
    same(&read_vec(&h3, 0, 3 * ps), &want, "");
    h3.fsync().expect("fsync");
    same(&env.disk("f"), &want, "");
    assert!(cache.open(env.path("missing")).is_err());
}

// === the ways a file is written back ===

/// `close` writes back and forgets the file; `sync_all` writes back and
/// syncs every file.
fn close_and_sync_all_write_back(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let mut a = pattern(2 * ps, 24);
    let mut b = pattern(3 * ps, 25);
    let pa = env.put("a", &a);
    let pb = env.put("b", &b);
    let cache = env.builder().build().expect("cache");
    let fa = cache.open(&pa).expect("open");
    let fb = cache.open(&pb).expect("open");
    fa.write_at(5, b"AAA").expect("write");
    apply(&mut a, 5, b"AAA");
    fb.write_at(ps as u64 * 3, b"BBB").expect("write");
    apply(&mut b, 3 * ps, b"BBB");
    cache.sync_all().expect("sync_all");
    same(&env.disk("a"), &a, "");
    same(&env.disk("b"), &b, "");
    if fs == Fs::Mem {
        assert_eq!(env.mem_io.syncs(&pa), 1);
        assert_eq!(env.mem_io.syncs(&pb), 1);
    }
    fa.write_at(ps as u64, b"again").expect("write");
    apply(&mut a, ps, b"again");
    drop(fa);
    cache.close(&pa).expect("close");
    same(&env.disk("a"), &a, "");
    assert_eq!(cache.files().len(), 1);
    let fa = cache.open(&pa).expect("open again");
    same(&read_vec(&fa, 0, 3 * ps), &a, "");
    cache.close(env.path("never-opened")).expect("closing a file not open");
}

#[derive(Clone, Copy, Debug)]
enum DropOrder {
    CacheFirst,
    FileFirst,
    PageLast,
}

/// Dropping every handle writes back, whatever the order: the cache first,
/// the file first, or a page from `page()` last (still holding the
/// written bytes).
fn dropping_writes_back_in_every_order(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let orders: &[DropOrder] =
        if MIRI { &[DropOrder::PageLast] } else { &[DropOrder::CacheFirst, DropOrder::FileFirst, DropOrder::PageLast] };
    for &order in orders {
        let name = format!("{order:?}");
        let mut want = pattern(2 * ps, 26);
        let path = env.put(&name, &want);
        let cache = env.builder().build().expect("cache");
        let file = cache.open(&path).expect("open");
        file.write_at(ps as u64 + 3, b"dropped").expect("write");
        apply(&mut want, ps + 3, b"dropped");
        let page = file.page(1).expect("page");
        match order {
            DropOrder::CacheFirst => {
                drop(cache);
                drop(page);
                drop(file);
            }
            DropOrder::FileFirst => {
                drop(file);
                drop(page);
                drop(cache);
            }
            DropOrder::PageLast => {
                drop(file);
                drop(cache);
                let mut got = vec![0u8; ps];
                page.direct().expect("direct").read_at(0, &mut got).expect("read");
                same(&got, &want[ps..], "");
                drop(page);
            }
        }
        same(&env.disk(&name), &want, format!("{order:?}"));
        assert_eq!(env.frames_used(), 0, "{order:?}: every frame freed");
    }
}

/// Two threads write disjoint ranges while a third flushes over and over,
/// through a budget small enough to evict: after an fsync the file is
/// exact.
fn concurrent_writers_and_a_flusher(fs: Fs) {
    let env = Env::new(fs, 32);
    let ps = env.ps();
    let pages = if MIRI { 2 } else { 16 };
    let rounds = if MIRI { 2 } else { 40 };
    let mut want = pattern(pages * ps, 27);
    let path = env.put("f", &want);
    let cache = env.builder().budget(4).build().expect("cache");
    let file = cache.open(&path).expect("open");
    let done = AtomicBool::new(false);
    // Writer w writes the bytes at offsets of its parity, a chunk at a time.
    let chunk = 37;
    let write_of = |w: usize, r: usize, at: usize| -> Vec<u8> {
        (0..chunk).map(|k| ((w * 101 + r * 7 + at + k) % 250) as u8 + 1).collect()
    };
    std::thread::scope(|s| {
        let (file_ref, done_ref) = (&file, &done);
        s.spawn(move || {
            while !done_ref.load(Ordering::Relaxed) {
                file_ref.flush().expect("flush");
                std::thread::yield_now();
            }
        });
        std::thread::scope(|ws| {
            for w in 0..2 {
                let (file, write_of) = (&file, &write_of);
                ws.spawn(move || {
                    for r in 0..rounds {
                        let mut at = w * chunk;
                        while at + chunk <= pages * ps {
                            file.write_at(at as u64, &write_of(w, r, at)).expect("write");
                            at += 2 * chunk * if MIRI { 23 } else { 3 };
                        }
                    }
                });
            }
        });
        done.store(true, Ordering::Relaxed);
    });
    for w in 0..2 {
        let mut at = w * chunk;
        while at + chunk <= pages * ps {
            apply(&mut want, at, &write_of(w, rounds - 1, at));
            at += 2 * chunk * if MIRI { 23 } else { 3 };
        }
    }
    file.fsync().expect("fsync");
    same(&env.disk("f"), &want, "");
    same(&read_vec(&file, 0, pages * ps), &want, "");
}

/// Threads writing, reading back and growing bytes only they own (chunks
/// of 100 bytes dealt out in turn, so neighbours share pages and words),
/// while others flush, fsync, revalidate, change the budget and hold
/// pages: each thread always reads its own bytes back, and after a last
/// fsync the file is every thread's bytes.
fn threads_own_interleaved_chunks(fs: Fs) {
    let env = Env::new(fs, 32);
    let ps = env.ps();
    let threads = if MIRI { 2 } else { 4 };
    let steps = if MIRI { 6 } else { 1000 };
    const CHUNK: usize = 100;
    let chunks = if MIRI { 40 } else { 12 * ps / CHUNK };
    let start = pattern(chunks * CHUNK / 2, 38);
    let path = env.put("f", &start);
    let cache = env.builder().budget(3).block_size(512).build().expect("cache");
    let file = cache.open(&path).expect("open");
    // Each thread's view of the whole file (only its own chunks matter);
    // bytes past the start file that no one writes stay zeros.
    let mut initial = start.clone();
    initial.resize(chunks * CHUNK, 0);
    let views: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (file, cache, initial) = (&file, &cache, &initial);
                s.spawn(move || {
                    let mut mine = initial.clone();
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
                    let mut next = move || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    for step in 0..steps {
                        let c = (next() as usize % (chunks / threads)) * threads + t;
                        let a = (next() as usize) % CHUNK;
                        let b = a + (next() as usize) % (CHUNK - a) + 1;
                        let off = c * CHUNK + a;
                        match next() % 16 {
                            0..=6 => {
                                let data: Vec<u8> = (0..b - a).map(|k| (step + k + t * 7) as u8 | 1).collect();
                                file.write_at(off as u64, &data).expect("write");
                                mine[off..off + data.len()].copy_from_slice(&data);
                            }
                            7..=11 => {
                                // The file may grow while this reads (others
                                // append): as many bytes as the length before,
                                // maybe more, and bytes never written are zeros.
                                let before = file.len() as usize;
                                let got = read_vec(file, off as u64, b - a);
                                assert!(off + got.len() >= (off + b - a).min(before), "thread {t}: a short read");
                                let want = &mine[off..off + got.len()];
                                same(&got, want, format!("thread {t} step {step}: chunk {c} at {a}..{b}"));
                            }
                            12 => file.flush().expect("flush"),
                            13 => file.fsync().expect("fsync"),
                            14 => {
                                file.revalidate().expect("revalidate");
                            }
                            _ => {
                                cache.set_budget(1 + (next() as usize % 6)).expect("set_budget");
                                if let Ok(p) = file.page((off / ps) as u64) {
                                    let mut one = [0u8; 1];
                                    p.direct().expect("direct").read_at(off % ps, &mut one).expect("read");
                                }
                            }
                        }
                    }
                    mine
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut want = initial;
    for c in 0..chunks {
        let r = c * CHUNK..(c + 1) * CHUNK;
        want[r.clone()].copy_from_slice(&views[c % threads][r]);
    }
    // The file ends where the last byte anyone wrote (or the start) ends.
    let end =
        (0..chunks * CHUNK).rev().find(|&i| i < start.len() || want[i] != 0).map_or(0, |i| i + 1).max(start.len());
    assert_eq!(file.len() as usize, end, "the length is the end of the last byte written");
    want.truncate(end);
    file.fsync().expect("fsync");
    same(&env.disk("f"), &want, "the file after the last fsync");
    same(&read_vec(&file, 0, want.len() + 1), &want, "the cache after the last fsync");
}

/// A file system whose next write, once armed, waits until the gate opens
/// (and then fails with `EIO`): a write-back held in flight.
#[derive(Debug, Default)]
struct Gate {
    st: Mutex<GateSt>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GateSt {
    armed: bool,
    held: u32,
    open: bool,
}

impl Gate {
    fn wait_held(&self) {
        let mut st = self.st.lock().unwrap();
        while st.held == 0 {
            st = self.cv.wait(st).unwrap();
        }
    }

    fn open(&self) {
        self.st.lock().unwrap().open = true;
        self.cv.notify_all();
    }
}

#[derive(Debug)]
struct GatedFs(Arc<dyn FileIo>, Arc<Gate>);

#[derive(Debug)]
struct GatedFile(Box<dyn IoFile>, Arc<Gate>);

impl FileIo for GatedFs {
    fn open(&self, path: &Path, writable: bool) -> std::io::Result<Box<dyn IoFile>> {
        Ok(Box::new(GatedFile(self.0.open(path, writable)?, self.1.clone())))
    }

    fn stat(&self, path: &Path) -> std::io::Result<FileStat> {
        self.0.stat(path)
    }
}

impl IoFile for GatedFile {
    fn stat(&self) -> std::io::Result<FileStat> {
        self.0.stat()
    }

    fn read_at(&self, offset: u64, bufs: &[FrameRange<'_>]) -> std::io::Result<usize> {
        self.0.read_at(offset, bufs)
    }

    fn write_at(&self, offset: u64, bufs: &[FrameRange<'_>]) -> std::io::Result<usize> {
        let gate = &self.1;
        let mut st = gate.st.lock().unwrap();
        if st.armed {
            st.armed = false;
            st.held += 1;
            gate.cv.notify_all();
            while !st.open {
                st = gate.cv.wait(st).unwrap();
            }
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        drop(st);
        self.0.write_at(offset, bufs)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
}

/// An fsync made while another thread's write-back of the same page is in
/// flight waits for it: when it returns `Ok` the write made before it is
/// on disk, even though that other write-back failed.
fn fsync_waits_for_a_write_back_in_flight(fs: Fs) {
    let env = Env::new(fs, 16);
    let mut want = pattern(3000, 28);
    let path = env.put("f", &want);
    let gate = Arc::new(Gate::default());
    let cache = PageCache::builder(&env.phys).io(Arc::new(GatedFs(env.io(), gate.clone()))).build().expect("cache");
    let file = cache.open(&path).expect("open");
    file.write_at(5, b"first").expect("write");
    apply(&mut want, 5, b"first");
    gate.st.lock().unwrap().armed = true;
    std::thread::scope(|s| {
        let flusher = s.spawn(|| file.flush());
        gate.wait_held();
        let opener = s.spawn(|| {
            // Give the fsync below time to run while the write-back is held;
            // a correct fsync waits for the gate however long this takes.
            std::thread::sleep(std::time::Duration::from_millis(if MIRI { 1 } else { 100 }));
            gate.open();
        });
        let r = file.fsync();
        let disk = env.disk("f");
        opener.join().unwrap();
        assert_eq!(flusher.join().unwrap().expect_err("the held write-back failed").errno(), Some(libc::EIO));
        if r.is_ok() {
            same(&disk, &want, "fsync returned Ok before the write made before it was on disk");
        }
    });
    file.fsync().expect("fsync");
    same(&env.disk("f"), &want, "");
}

/// A file system whose next `stat` of a path, once armed, looks at the
/// file and then waits until the gate opens before it answers: a
/// revalidation holding a look that grows old.
#[derive(Debug)]
struct StatGatedFs(Arc<dyn FileIo>, Arc<Gate>);

impl FileIo for StatGatedFs {
    fn open(&self, path: &Path, writable: bool) -> std::io::Result<Box<dyn IoFile>> {
        self.0.open(path, writable)
    }

    fn stat(&self, path: &Path) -> std::io::Result<FileStat> {
        let st = self.0.stat(path);
        let gate = &self.1;
        let mut g = gate.st.lock().unwrap();
        if g.armed {
            g.armed = false;
            g.held += 1;
            gate.cv.notify_all();
            while !g.open {
                g = gate.cv.wait(g).unwrap();
            }
        }
        st
    }
}

/// A revalidation whose look at the file predates a write-back that grew
/// it: the length and the bytes written stay, and later write-backs of
/// the page do not write zeros over them.
fn revalidate_racing_a_write_back(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let mut want = pattern(100, 39);
    let path = env.put("f", &want);
    let gate = Arc::new(Gate::default());
    let cache = PageCache::builder(&env.phys).io(Arc::new(StatGatedFs(env.io(), gate.clone()))).build().expect("cache");
    let file = cache.open(&path).expect("open");
    file.write_at(ps as u64 + 10, b"DATA").expect("write");
    apply(&mut want, ps + 10, b"DATA");
    env.modify("f", |_| {});
    gate.st.lock().unwrap().armed = true;
    std::thread::scope(|s| {
        let r = s.spawn(|| file.revalidate());
        gate.wait_held();
        file.flush().expect("flush");
        gate.open();
        assert!(r.join().unwrap().expect("revalidate"), "the file had changed");
    });
    assert_eq!(file.len(), want.len() as u64, "the length a write-back made");
    same(&read_vec(&file, 0, 2 * ps), &want, "the bytes after the revalidation");
    // Dirty the first block of that page and another, then write back.
    file.write_at(ps as u64, b"x").expect("write");
    apply(&mut want, ps, b"x");
    file.write_at(ps as u64 + 600, b"y").expect("write");
    apply(&mut want, ps + 600, b"y");
    file.fsync().expect("fsync");
    same(&env.disk("f"), &want, "the file after the last write-back");
}

/// A revalidation while a flush's write-back of the last page is in
/// flight (its dirty bits taken): the length still covers the bytes being
/// written, which a failed write-back leaves dirty for the next one.
fn revalidate_during_a_write_back_in_flight(fs: Fs) {
    let env = Env::new(fs, 16);
    let mut want = pattern(100, 40);
    let path = env.put("f", &want);
    let gate = Arc::new(Gate::default());
    let cache = PageCache::builder(&env.phys).io(Arc::new(GatedFs(env.io(), gate.clone()))).build().expect("cache");
    let file = cache.open(&path).expect("open");
    file.write_at(100, b"0123456789").expect("append");
    want.extend_from_slice(b"0123456789");
    gate.st.lock().unwrap().armed = true;
    std::thread::scope(|s| {
        let flusher = s.spawn(|| file.flush());
        gate.wait_held();
        env.modify("f", |_| {});
        let changed = file.revalidate();
        let len = file.len();
        // Let the write-back go before anything here can fail.
        gate.open();
        assert!(flusher.join().unwrap().is_err(), "the held write-back failed");
        assert!(changed.expect("revalidate"), "the file had changed");
        assert_eq!(len, 110, "the bytes being written back are still in the file");
    });
    assert_eq!(file.len(), 110);
    file.fsync().expect("fsync");
    same(&env.disk("f"), &want, "the file after the next write-back");
}

/// A whole-page write to a page not cached, racing a reader of that page:
/// the reader sees the old bytes or the new, never a page of zeros. (Here
/// both are the same bytes, so anything else is wrong.)
fn whole_page_overwrite_never_shows_zeros(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let data = pattern(4 * ps, 29);
    let path = env.put("f", &data);
    let cache = env.builder().budget(1).build().expect("cache");
    let file = cache.open(&path).expect("open");
    let rounds = if MIRI { 2 } else { 3000 };
    let done = AtomicBool::new(false);
    let started = Barrier::new(2);
    std::thread::scope(|s| {
        let (file_r, data_r, done_r, started_r) = (&file, &data, &done, &started);
        let reader = s.spawn(move || {
            started_r.wait();
            // Under Miri a few reads: each costs as much as a round.
            let mut left = if MIRI { 3 } else { u64::MAX };
            while !done_r.load(Ordering::Relaxed) && left > 0 {
                let got = read_vec(file_r, ps as u64, ps);
                same(&got, &data_r[ps..2 * ps], "a reader saw bytes never written");
                left -= 1;
            }
        });
        started.wait();
        for _ in 0..rounds {
            file.write_at(ps as u64, &data[ps..2 * ps]).expect("write");
            // Push page 1 out (written back first) so the next write fills it
            // again.
            read_vec(&file, 3 * ps as u64, 1);
        }
        done.store(true, Ordering::Relaxed);
        reader.join().unwrap();
    });
    file.fsync().expect("fsync");
    same(&env.disk("f"), &data, "");
}

/// A page from `page()` mapped through the sf_buf pool and an lwbuf cache
/// reads the file's bytes; bytes written through a mapping and marked
/// dirty reach the file.
fn pages_map_through_sfpool_and_lwbufs(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let n = if MIRI { 2 } else { 3 };
    let mut want = pattern(n * ps, 30);
    let path = env.put("f", &want);
    let cache = env.builder().build().expect("cache");
    let file = cache.open(&path).expect("open");
    let mmu = |slots| -> Arc<dyn Mmu> {
        match fs {
            Fs::Sys => Arc::new(Window::builder(&env.phys).slots(slots).build().expect("window")),
            Fs::Mem => Arc::new(ModelMmu::new(&env.phys, slots).expect("model mmu")),
        }
    };
    let page = file.page(1).expect("page 1");
    let pool = SfPool::builder(mmu(4)).build().expect("pool");
    let sf = pool.alloc(&page, Wait::NoWait).expect("sf alloc");
    let mut got = vec![0u8; ps];
    sf.kva().read_at(0, &mut got).expect("read");
    same(&got, &want[ps..2 * ps], "");
    sf.kva().write_at(10, b"mapped").expect("write through the mapping");
    file.mark_dirty(ps as u64 + 10, 6).expect("mark_dirty");
    apply(&mut want, ps + 10, b"mapped");
    drop(sf);
    same(&read_vec(&file, ps as u64, 20), &want[ps..ps + 20], "");
    file.fsync().expect("fsync");
    same(&env.disk("f"), &want, "");

    let lw = Lwbufs::builder(mmu(4)).cpus(1).build().expect("lwbufs");
    let cpu = lw.bind(0).expect("bind");
    let pages = file.pages(0..(n * ps) as u64).expect("pages");
    assert_eq!(pages.len(), n);
    for (i, p) in pages.iter().enumerate() {
        let b = lw.alloc(p).expect("lwbuf alloc");
        b.kva().expect("kva").read_at(0, &mut got).expect("read");
        same(&got, &want[i * ps..(i + 1) * ps], format!("page {i}"));
    }
    drop(cpu);
}

/// A handle kept past `close` of its path goes on working; what it leaves
/// behind is written back when it is dropped, and its frames come back to
/// the cache's count.
fn a_handle_kept_past_close(fs: Fs) {
    let env = Env::new(fs, 16);
    let ps = env.ps();
    let mut want = pattern(4 * ps, 31);
    let path = env.put("f", &want);
    let other = env.put("g", &pattern(4 * ps, 32));
    let cache = env.builder().budget(4).build().expect("cache");
    let file = cache.open(&path).expect("open");
    cache.close(&path).expect("close");
    assert!(cache.files().is_empty());
    same(&read_vec(&file, 0, 4 * ps), &want, "");
    file.write_at(7, b"late").expect("write");
    apply(&mut want, 7, b"late");
    drop(file);
    same(&env.disk("f"), &want, "written back when the last handle went");
    let g = cache.open(&other).expect("open g");
    for p in 0..4 {
        read_vec(&g, (p * ps) as u64, 1);
    }
    let s = cache.stats();
    assert_eq!(env.frames_used(), s.resident, "{s:?}");
    assert!(s.resident <= 4);
}

// === faults ===

fn faulty_cache(env: &Env, budget: usize) -> (PageCache, Arc<lwbuf::pagecache::FaultyFileIo>) {
    let faulty = env.faulty();
    let cache = PageCache::builder(&env.phys).budget(budget).io(faulty.clone()).build().expect("cache");
    (cache, faulty)
}

/// `EIO` on a fill: the caller gets it, nothing is cached (not the page,
/// not its readahead), and the next read works.
fn eio_on_fill(fs: Fs) {
    let env = Env::new(fs, 32);
    let ps = env.ps();
    let pages = if MIRI { 3 } else { 16 };
    let data = pattern(pages * ps, 33);
    let path = env.put("f", &data);
    let (cache, faulty) = faulty_cache(&env, 16);
    let file = cache.open(&path).expect("open");
    faulty.fail_reads(Some(Fault::nth(1, libc::EIO)));
    let e = file.read_at(0, &mut [0u8; 10]).expect_err("EIO");
    assert!(matches!(e, Error::Sys { op: "preadv(fill)", .. }), "{e}");
    assert_eq!(e.errno(), Some(libc::EIO));
    assert_eq!(cache.stats().resident, 0);
    assert_eq!(cache.stats().fill_errors, 1);
    same(&read_vec(&file, 0, 10), &data[..10], "");
    // A sequential miss with readahead fails whole.
    faulty.fail_reads(Some(Fault::nth(1, libc::EIO)));
    assert_eq!(file.read_at(ps as u64, &mut [0u8; 10]).expect_err("EIO").errno(), Some(libc::EIO));
    assert_eq!(cache.stats().resident, 1);
    assert_eq!(env.frames_used(), 1);
    same(&read_vec(&file, 0, pages * ps), &data, "");
    assert_eq!(faulty.fault_stats().injected, 2);
}

/// Short reads (half of what was asked, then 0: the file cut short):
/// `FileChanged`, nothing cached; after clearing the fault the bytes are
/// right. Also for a file of one byte, where half is nothing.
fn short_reads_cache_nothing(fs: Fs) {
    let env = Env::new(fs, 32);
    let ps = env.ps();
    let pages = if MIRI { 3 } else { 8 };
    let data = pattern(pages * ps, 34);
    let path = env.put("f", &data);
    let (cache, faulty) = faulty_cache(&env, 16);
    let file = cache.open(&path).expect("open");
    // Page 0 alone, then pages 1..5 read ahead.
    for at in [0, ps] {
        faulty.short_reads(Some(Fault::nth(1, 0)));
        let e = file.read_at(at as u64, &mut [0u8; 10]).expect_err("cut short");
        assert!(matches!(e, Error::FileChanged { .. }), "{e}");
        assert_eq!(cache.stats().resident, (at / ps).min(1), "nothing half-filled cached");
        faulty.clear();
        same(&read_vec(&file, at as u64, 10), &data[at..at + 10], "");
    }
    assert_eq!(file.len(), data.len() as u64, "the file did not change");
    same(&read_vec(&file, 0, pages * ps), &data, "");

    let tiny = env.put("tiny", b"z");
    let file = cache.open(&tiny).expect("open");
    faulty.short_reads(Some(Fault::nth(1, 0)));
    let e = file.read_at(0, &mut [0u8; 1]).expect_err("cut short");
    assert!(matches!(e, Error::FileChanged { .. }), "{e}");
    faulty.clear();
    assert_eq!(read_vec(&file, 0, 1), b"z");
}

/// `EIO` and `ENOSPC` on the write-back of a flush: the flush fails, the
/// blocks stay dirty; the next flush writes them and the file is exact.
fn write_back_errors_on_flush(fs: Fs) {
    let env = Env::new(fs, 32);
    let ps = env.ps();
    // The second group starts on this page.
    let second = if MIRI { 1 } else { 3 };
    let combos: Vec<(i32, Fault)> = if MIRI {
        vec![(libc::ENOSPC, Fault::from_nth(1, libc::ENOSPC))]
    } else {
        [libc::EIO, libc::ENOSPC]
            .into_iter()
            .flat_map(|e| [Fault::nth(1, e), Fault::nth(2, e), Fault::from_nth(1, e)].map(|f| (e, f)))
            .collect()
    };
    {
        for (errno, fault) in combos {
            let name = format!("f{errno}-{fault:?}").replace(['(', ')', '{', '}', ' ', ',', ':'], "");
            let mut want = pattern((second + 3) * ps, 35);
            let path = env.put(&name, &want);
            let (cache, faulty) = faulty_cache(&env, 16);
            let file = cache.open(&path).expect("open");
            // Two groups: page 0, and pages `second` and the next.
            file.write_at(1, b"one").expect("write");
            apply(&mut want, 1, b"one");
            let big = vec![b'B'; ps + 10];
            file.write_at((second * ps) as u64 + 100, &big).expect("write");
            apply(&mut want, second * ps + 100, &big);
            faulty.fail_writes(Some(fault.clone()));
            let e = file.flush().expect_err("the write-back fails");
            assert_eq!(e.errno(), Some(errno), "{e}");
            let s = cache.stats();
            assert!(s.writeback_errors >= 1);
            assert!(s.dirty >= 1, "kept dirty");
            if fault == Fault::from_nth(1, errno) {
                assert_eq!(file.fsync().expect_err("still failing").errno(), Some(errno));
                assert_eq!(env.mem_io.syncs(&path), 0, "no fsync(2) after a failed write-back");
            }
            faulty.clear();
            file.flush().expect("the next flush");
            assert_eq!(cache.stats().dirty, 0);
            same(&env.disk(&name), &want, format!("{errno} {fault:?}"));
            let before = cache.stats().writes;
            file.fsync().expect("fsync");
            assert_eq!(cache.stats().writes, before, "nothing left to write");
        }
    }
}

/// `EIO` on the write-back of an eviction: the page stays (dirty), the
/// next flush writes it and reports the error once; the one after is Ok.
fn write_back_error_on_eviction_is_told_once(fs: Fs) {
    let env = Env::new(fs, 32);
    let ps = env.ps();
    let ways: &[bool] = if MIRI { &[true] } else { &[false, true] };
    for &via_fsync in ways {
        let name = format!("f{via_fsync}");
        let mut want = pattern(if MIRI { 4 } else { 8 } * ps, 36);
        let path = env.put(&name, &want);
        let (cache, faulty) = faulty_cache(&env, 2);
        let file = cache.open(&path).expect("open");
        file.write_at(10, b"evict me").expect("write");
        apply(&mut want, 10, b"evict me");
        faulty.fail_writes(Some(Fault::from_nth(1, libc::EIO)));
        let reads: &[usize] = if MIRI { &[1, 2, 3] } else { &[2, 4, 6] };
        for &p in reads {
            same(&read_vec(&file, (p * ps) as u64, 4), &want[p * ps..p * ps + 4], "");
        }
        let s = cache.stats();
        assert!(s.writeback_errors >= 1, "an eviction tried to write page 0 back: {s:?}");
        assert_eq!(s.dirty, 1, "and kept it");
        assert!(s.resident <= 2, "clean pages went instead: {s:?}");
        faulty.clear();
        let r = if via_fsync { file.fsync() } else { file.flush() };
        assert_eq!(r.expect_err("the eviction's error, told once").errno(), Some(libc::EIO));
        assert_eq!(cache.stats().dirty, 0, "and the page written");
        same(&env.disk(&name), &want, "");
        if via_fsync {
            file.fsync().expect("told once");
        } else {
            file.flush().expect("told once");
        }
    }
}

/// A failing `fsync(2)` is reported (by `fsync` and `sync_all`); the next
/// one is `Ok`.
fn fsync_failure_is_reported(fs: Fs) {
    let env = Env::new(fs, 16);
    let mut want = pattern(5000, 37);
    let path = env.put("f", &want);
    let (cache, faulty) = faulty_cache(&env, 8);
    let file = cache.open(&path).expect("open");
    file.write_at(4999, b"!").expect("write");
    apply(&mut want, 4999, b"!");
    faulty.fail_syncs(Some(Fault::nth(1, libc::EIO)));
    let e = file.fsync().expect_err("fsync fails");
    assert!(matches!(e, Error::Sys { op: "fsync", .. }), "{e}");
    assert_eq!(e.errno(), Some(libc::EIO));
    same(&env.disk("f"), &want, "written, not synced");
    file.fsync().expect("the next fsync");
    faulty.fail_syncs(Some(Fault::nth(1, libc::EIO)));
    assert_eq!(cache.sync_all().expect_err("sync_all").errno(), Some(libc::EIO));
    cache.sync_all().expect("the next sync_all");
    assert_eq!(faulty.fault_stats().syncs, 4);
}

on_both_file_systems!(
    reads_near_page_and_eof_boundaries,
    fill_once_under_many_threads,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    readahead_on_sequential_reads_only,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    resident_never_above_budget,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    set_budget_lower_shrinks_at_once,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    dirty_pages_written_back_before_eviction,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    held_pages_are_not_evicted,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    block_write_back_and_coalescing,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    partial_block_write_to_an_unread_page,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    whole_page_write_needs_no_read,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    writes_extend_the_file,
    offsets_near_the_top,
    read_only_files,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    truncated_behind_the_cache,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    modified_in_place,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    replaced_by_a_new_inode,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    touched_file_keeps_the_written_length,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    open_twice_is_the_same_file,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    close_and_sync_all_write_back,
    dropping_writes_back_in_every_order,
    concurrent_writers_and_a_flusher,
    threads_own_interleaved_chunks,
    fsync_waits_for_a_write_back_in_flight,
    revalidate_racing_a_write_back,
    revalidate_during_a_write_back_in_flight,
    whole_page_overwrite_never_shows_zeros,
    pages_map_through_sfpool_and_lwbufs,
    #[cfg_attr(miri, ignore = "cache policy, checked natively; Miri runs the unsafe paths and the races")]
    a_handle_kept_past_close,
    eio_on_fill,
    short_reads_cache_nothing,
    write_back_errors_on_flush,
    write_back_error_on_eviction_is_told_once,
    fsync_failure_is_reported,
);
