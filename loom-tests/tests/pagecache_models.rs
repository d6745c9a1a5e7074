//! Loom models of the page cache: fill-once of a page, eviction racing a
//! write, a fill racing the eviction of another page, and a failed fill
//! with a waiter. Files live in a `MemFileIo`, frames in a heap memory.

#![cfg(loom)]

use std::sync::Arc;

use loom::thread;
use loom_tests::{expect_failure, model, Mutant};
use lwbuf::pagecache::{CachedFile, FaultyFileIo, FileIo, MemFileIo, PageCache};
use lwbuf::{Backing, Fault, PhysMem};

/// Page `page` of the models' files holds this byte throughout: a page read
/// from the wrong place, or not read at all (a frame's zeros), shows.
fn byte_of(page: usize) -> u8 {
    b'a' + page as u8
}

/// A cache over `fs` and a heap memory of 4 frames, with a budget of
/// `budget` and no readahead, and its file "f".
fn cache(fs: Arc<dyn FileIo>, budget: usize) -> (PageCache, CachedFile) {
    let mem = PhysMem::builder().frames(4).backing(Backing::Heap).build().unwrap();
    let cache = PageCache::builder(&mem).budget(budget).readahead(1).io(fs).build().unwrap();
    let file = cache.open("f").unwrap();
    (cache, file)
}

/// A file system holding "f": `pages` pages, each all `byte_of` it.
fn mem_file(pages: usize, page_size: usize) -> Arc<MemFileIo> {
    let fs = Arc::new(MemFileIo::new());
    fs.put("f", (0..pages).flat_map(|p| vec![byte_of(p); page_size]).collect());
    fs
}

/// Read 16 bytes of page `page` at byte 100 of it and check them.
fn read_page(file: &CachedFile, page: usize) {
    let ps = file.page_size() as u64;
    let mut buf = [0u8; 16];
    assert_eq!(file.read_at(page as u64 * ps + 100, &mut buf).unwrap(), 16);
    assert_eq!(buf, [byte_of(page); 16], "page {page} read wrong bytes");
}

// === 1. fill once ===

/// Three threads read the same page, which is not cached: one reads it
/// from the file, the others wait for that fill (or find it done) and
/// read the same frame. The file system is read exactly once, and every
/// other lookup is a hit.
fn fill_once() {
    let ps = lwbuf::system_page_size();
    let fs = mem_file(1, ps);
    let (cache, file) = cache(fs, 2);
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let f = file.clone();
            thread::spawn(move || read_page(&f, 0))
        })
        .collect();
    read_page(&file, 0);
    for r in readers {
        r.join().unwrap();
    }
    let s = cache.stats();
    assert_eq!((s.reads, s.misses, s.hits), (1, 1, 2), "the page was not filled exactly once: {s:?}");
    assert_eq!(s.resident, 1, "{s:?}");
}

#[test]
fn pagecache_fill_once() {
    model("pagecache_fill_once", fill_once);
}

/// A miss that inserts its filling entry without looking again under the
/// shard's lock reads the page a second time.
#[test]
fn pagecache_fill_once_mutant_no_recheck() {
    expect_failure("pagecache_fill_once", Mutant::FillNoRecheck, fill_once);
}

// === 2. an eviction racing a write ===

/// What evicts page 0 while it is written.
#[derive(Clone, Copy, Debug)]
enum Evictor {
    /// Pages 0 and 1 are cached, budget 2; the budget is lowered to 1,
    /// which evicts page 0 (the clock's oldest).
    SetBudget,
    /// Page 0 is cached, budget 1; a read of page 1 fills it and evicts
    /// page 0 to make room.
    Fill,
}

/// Page 0 is cached and clean. One thread writes a byte into it while the
/// main thread evicts it: the write either comes first and is written back
/// by the eviction, or finds the page gone and fills it again (evicting
/// page 1 in turn). After a flush the file holds the byte: nothing lost.
fn evict_vs_write(by: Evictor) {
    let ps = lwbuf::system_page_size();
    let fs = mem_file(2, ps);
    let budget = match by {
        Evictor::SetBudget => 2,
        Evictor::Fill => 1,
    };
    let (cache, file) = cache(fs.clone(), budget);
    read_page(&file, 0);
    if let Evictor::SetBudget = by {
        read_page(&file, 1);
    }
    let f2 = file.clone();
    let t = thread::spawn(move || f2.write_at(10, b"X").unwrap());
    match by {
        Evictor::SetBudget => {
            cache.set_budget(1).unwrap();
        }
        Evictor::Fill => read_page(&file, 1),
    }
    t.join().unwrap();
    file.flush().unwrap();
    let s = cache.stats();
    let disk = fs.get("f").unwrap();
    assert_eq!(disk[10], b'X', "the write was lost to the eviction: {s:?}");
    assert_eq!(s.dirty, 0, "dirty after a flush: {s:?}");
    assert!(disk[..10].iter().chain(&disk[11..ps]).all(|&b| b == byte_of(0)), "page 0 written back wrong");
    assert!(disk[ps..].iter().all(|&b| b == byte_of(1)), "page 1 written back wrong");
    let mut b = [0u8; 1];
    file.read_at(10, &mut b).unwrap();
    assert_eq!(b, *b"X", "the cache lost the write");
}

#[test]
fn pagecache_evict_vs_write() {
    model("pagecache_evict_vs_write(set_budget)", || evict_vs_write(Evictor::SetBudget));
    model("pagecache_evict_vs_write(fill)", || evict_vs_write(Evictor::Fill));
}

/// An evictor that checks "clean and unheld" under the entry's lock, lets
/// go and evicts later drops a write made in between.
#[test]
fn pagecache_evict_vs_write_mutant_stale_check() {
    for by in [Evictor::SetBudget, Evictor::Fill] {
        expect_failure(&format!("pagecache_evict_vs_write({by:?})"), Mutant::EvictStaleCheck, move || {
            evict_vs_write(by)
        });
    }
}

// === 3. a fill racing the eviction of another page ===

/// Budget 1, nothing cached: threads read pages 0 and 1 at once (with
/// `two_on_0`, two threads read page 0), so each fill may evict the other
/// page (before or after its reader copied from it) or, finding it still
/// being filled, go over the budget. Every read returns its page's bytes,
/// and the counters add up.
fn fill_vs_evict(two_on_0: bool) {
    let ps = lwbuf::system_page_size();
    let fs = mem_file(2, ps);
    let (cache, file) = cache(fs, 1);
    let on_0 = if two_on_0 { 2 } else { 1 };
    let readers: Vec<_> = (0..on_0)
        .map(|_| {
            let f = file.clone();
            thread::spawn(move || read_page(&f, 0))
        })
        .collect();
    read_page(&file, 1);
    for r in readers {
        r.join().unwrap();
    }
    assert!(cache.set_budget(1).unwrap() <= 1);
    let s = cache.stats();
    assert!(s.resident <= 1, "over the budget after set_budget: {s:?}");
    // Each page was filled at least once; a fill whose page was evicted
    // before its reader copied fills again. A read either hit (once) or
    // missed (at least once). Every fill read once, and every filled page
    // is resident or was evicted.
    let reads = on_0 + 1;
    assert!(s.misses >= 2 && s.hits + s.misses >= reads, "{s:?}");
    assert_eq!((s.reads, s.read_bytes), (s.misses, s.misses * ps as u64), "{s:?}");
    assert_eq!(s.resident as u64 + s.evictions, s.misses, "frames leaked or freed twice: {s:?}");
    assert_eq!((s.fill_errors, s.dirty, s.writes), (0, 0, 0), "{s:?}");
    // Nothing left filling or half-evicted: both pages read again.
    read_page(&file, 0);
    read_page(&file, 1);
}

#[test]
fn pagecache_fill_vs_evict() {
    model("pagecache_fill_vs_evict", || fill_vs_evict(false));
}

#[test]
fn pagecache_fill_vs_evict_two_on_0() {
    model("pagecache_fill_vs_evict(two_on_0)", || fill_vs_evict(true));
}

// === 4. a failed fill with a waiter ===

/// How the first read from the file fails.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// `EIO`: nothing read.
    Eio,
    /// Half the page, then end of file: the frame is half-filled and the
    /// fill fails with `FileChanged`.
    Short,
}

/// The file system fails its first read. Two threads read the end of the
/// same page: whichever fills first gets the error; the other, waiting on
/// that fill or coming after it, never sees the page half-filled: it fills
/// the page itself and gets the bytes. Nothing stays filling.
fn fill_error(how: Failure) {
    let ps = lwbuf::system_page_size();
    let faulty = Arc::new(FaultyFileIo::new(mem_file(1, ps)));
    match how {
        Failure::Eio => faulty.fail_reads(Some(Fault::nth(1, libc::EIO))),
        Failure::Short => faulty.short_reads(Some(Fault::nth(1, 0))),
    }
    let (cache, file) = cache(faulty.clone(), 2);
    let reader = |file: CachedFile| {
        move || {
            // Past the half a short read fills.
            let mut buf = [0u8; 16];
            match file.read_at(ps as u64 - 16, &mut buf) {
                Ok(n) => {
                    assert_eq!(n, 16);
                    assert_eq!(buf, [byte_of(0); 16], "a reader saw a page a failed fill left behind");
                    true
                }
                Err(e) => {
                    match how {
                        Failure::Eio => assert_eq!(e.errno(), Some(libc::EIO), "{e}"),
                        Failure::Short => assert!(matches!(e, lwbuf::Error::FileChanged { .. }), "{e}"),
                    }
                    false
                }
            }
        }
    };
    let t = thread::spawn(reader(file.clone()));
    let mine = reader(file.clone())();
    let theirs = t.join().unwrap();
    assert!(mine != theirs, "one read must fail (the first from the file), the other succeed");
    let s = cache.stats();
    // The short read's fill read twice (half, then the end of the file).
    let reads = match how {
        Failure::Eio => 2,
        Failure::Short => 3,
    };
    assert_eq!((s.fill_errors, s.misses, s.reads, s.resident), (1, 1, reads, 1), "{s:?}");
    assert_eq!((faulty.fault_stats().reads, file.len()), (reads, ps as u64));
    // The page is valid: a hit, no wait on a fill that ended.
    read_page(&file, 0);
    assert_eq!(cache.stats().hits, s.hits + 1);
}

#[test]
fn pagecache_fill_error() {
    model("pagecache_fill_error(eio)", || fill_error(Failure::Eio));
    model("pagecache_fill_error(short)", || fill_error(Failure::Short));
}

/// A failed fill that wakes its waiters but leaves its entry in the map:
/// the waiter (and every later reader of the page) finds it gone, looks
/// again, and finds it again, for ever.
#[test]
fn pagecache_fill_error_mutant_failed_fill_mapped() {
    expect_failure("pagecache_fill_error(eio)", Mutant::FailedFillMapped, || fill_error(Failure::Eio));
}

// === 5. a hit under the shard's lock racing the eviction of its page ===

/// Page 0 is cached in frame 0 of a two-frame memory, with a budget of 1.
/// One thread reads page 0 (a hit copies under the shard's lock with no
/// hold on the frame) while another reads page 1, whose fill evicts page 0
/// and takes its frame back from the allocator (lowest free frame first)
/// to read page 1 into. The hit must copy page 0's bytes: the frame is
/// let go only once the entry has left the map, after the hit's lock.
fn hit_vs_evict() {
    let ps = lwbuf::system_page_size();
    let fs = mem_file(2, ps);
    let mem = PhysMem::builder().frames(2).backing(Backing::Heap).build().unwrap();
    let cache = PageCache::builder(&mem).budget(1).readahead(1).io(fs).build().unwrap();
    let file = cache.open("f").unwrap();
    read_page(&file, 0);
    let f = file.clone();
    let reader = thread::spawn(move || read_page(&f, 0));
    read_page(&file, 1);
    reader.join().unwrap();
    let s = cache.stats();
    assert_eq!(s.resident as u64 + s.evictions, s.misses, "frames leaked or freed twice: {s:?}");
}

#[test]
fn pagecache_hit_vs_evict() {
    model("pagecache_hit_vs_evict", hit_vs_evict);
}

/// A hit that lets go of the shard's lock before it copies can copy page
/// 1's bytes (or the zeros of a frame being filled) as page 0's.
#[test]
fn pagecache_hit_vs_evict_mutant_copies_unlocked() {
    expect_failure("pagecache_hit_vs_evict", Mutant::HitCopiesUnlocked, hit_vs_evict);
}

// === 6. a fill racing a revalidation of a file changed on disk ===

/// Page 0 of "f" is all `a` and not cached. One thread reads it (a fill)
/// while the main thread changes the file on disk to all `z` and then
/// revalidates. Once the revalidation has returned, a read must see `z`: a
/// fill that read the old bytes before the change must not publish them
/// after the revalidation dropped the stale pages.
fn stale_fill() {
    let ps = lwbuf::system_page_size();
    let fs = mem_file(1, ps);
    let (_cache, file) = cache(fs.clone(), 2);
    let f = file.clone();
    let reader = thread::spawn(move || {
        let mut b = [0u8; 16];
        assert_eq!(f.read_at(100, &mut b).unwrap(), 16);
        assert!(b == [b'a'; 16] || b == [b'z'; 16], "a mix of two versions: {b:?}");
    });
    fs.modify("f", |d| d.fill(b'z')).unwrap();
    assert!(file.revalidate().unwrap(), "the change was noticed");
    reader.join().unwrap();
    let mut b = [0u8; 16];
    assert_eq!(file.read_at(100, &mut b).unwrap(), 16);
    assert_eq!(b, [b'z'; 16], "stale bytes published after the revalidation");
}

#[test]
fn pagecache_stale_fill() {
    model("pagecache_stale_fill", stale_fill);
}

/// A revalidation that does not bump the generation lets the fill that
/// read the old bytes publish them after the drop.
#[test]
fn pagecache_stale_fill_mutant_no_generation() {
    expect_failure("pagecache_stale_fill", Mutant::StaleFillPublished, stale_fill);
}
