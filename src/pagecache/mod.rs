//! A page cache over real files: pages filled from disk on first use into
//! frames of a [`PhysMem`], kept within a frame budget that can change at
//! run time, written back block by block.
//!
//! ```
//! use lwbuf::PhysMem;
//! use lwbuf::pagecache::PageCache;
//!
//! let dir = std::env::temp_dir().join(format!("lwbuf-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("f");
//! std::fs::write(&path, vec![b'a'; 100_000])?;
//!
//! let mem = PhysMem::builder().frames(64).build()?;
//! let cache = PageCache::builder(&mem).budget(16).block_size(512).build()?;
//! let file = cache.open(&path)?;
//!
//! let mut buf = [0u8; 4];
//! file.read_at(50_000, &mut buf)?;          // a miss: one read from disk
//! assert_eq!(&buf, b"aaaa");
//! file.read_at(50_004, &mut buf)?;          // a hit: no system call
//! assert_eq!(cache.stats().hits, 1);
//!
//! file.write_at(7, b"xyz")?;                // dirties one 512-byte block
//! file.fsync()?;                            // writes that block, then fsync(2)
//! assert_eq!(cache.stats().written_bytes, 512);
//! assert_eq!(&std::fs::read(&path)?[5..11], b"aaxyza");
//!
//! cache.set_budget(4)?;                     // shrinks at once
//! assert!(cache.stats().resident <= 4);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What it promises
//!
//! - **Fill once.** The first use of a page inserts a *filling* entry in
//!   its file's map under the map's lock, after looking again under that
//!   lock; every other thread that wants the page finds the entry and waits
//!   on it. One read per page, however many threads ask at once (loom model
//!   `pagecache_fill_once`, mutant `FillNoRecheck`). A failed fill takes the
//!   entry out of the map before waking the waiters, who then try for
//!   themselves; nothing half-filled is ever marked valid (loom model
//!   `pagecache_fill_error`, mutant `FailedFillMapped`).
//! - **Nothing lost to eviction.** The evictor decides under the entry's
//!   lock, in one critical section, that a page is clean, not being written
//!   back and held by no one but the cache ([`Page::hold_count`] of 1: a
//!   sender or writer holds a clone, which it can only take under that same
//!   lock), and marks it gone in the same section; a writer, which dirties
//!   under the lock, therefore either comes first (and the page is written
//!   back, not dropped) or finds it gone and looks the page up again
//!   (loom model `pagecache_evict_vs_write`, mutant `EvictStaleCheck`).
//!   Dirty pages are written back before their frames are let go.
//! - **A hit takes one lock and no hold.** [`CachedFile::read_at`] copies
//!   from a valid page under its shard's lock alone, from the frame number
//!   the entry publishes while valid. Whoever retires an entry (evictor,
//!   revalidation, close) clears that number and takes the entry out of
//!   the map, which needs the shard's lock, before it lets the frame go;
//!   so a copy under the lock reads a frame that is still the page's
//!   (loom model `pagecache_hit_vs_evict`, mutant `HitCopiesUnlocked`).
//!   The only lock order is entry, then shard.
//! - **Bounded memory.** At most `budget` frames are resident (filling,
//!   valid, dirty) except while more pages than that are held at once by
//!   readers, senders or write-backs, when a fill goes over the budget
//!   rather than fail (counted in [`PageCacheStats::over_budget`]) and the
//!   next fills evict back under it. [`PageCache::set_budget`] evicts down
//!   to a lower budget before it returns.
//! - **Stale pages are dropped, never shown.** A file changed on disk
//!   (device, inode, size or modification time) is noticed by
//!   [`PageCache::open`] and [`CachedFile::revalidate`], which drop its
//!   clean pages; a fill that finds the file shorter than it was is
//!   [`Error::FileChanged`] (nothing is cached), never zeros shown as data.
//!   A revalidation bumps the file's [`generation`](CachedFile::generation)
//!   before it drops the stale pages, and a fill publishes only if the
//!   generation it began with is still current, checked under the entry's
//!   lock that the drop also takes: a fill that read the old bytes never
//!   publishes them after the drop (loom model `pagecache_stale_fill`,
//!   mutant `StaleFillPublished`). The new stat is stored last.
//!   Frames are memfd pages, so a shrunk file can never raise `SIGBUS`.
//! - **Errors are kept, then told once.** A failed write-back (`EIO`,
//!   `ENOSPC`) keeps the blocks dirty. The [`CachedFile::flush`] or
//!   [`CachedFile::fsync`] that sees it returns it; one during an eviction
//!   is remembered and returned by the next `flush`/`fsync` of that file,
//!   once (as Linux's `errseq` does), and the blocks are written again by
//!   the next write-back.
//!
//! Reads and writes copy through the direct map by machine words (the
//! [`Kaddr`](crate::Kaddr) memory model); [`CachedFile::page`] hands out
//! the frame itself ([`Page`]) to map with the lwbuf caches or the sf_buf
//! pool, or to send. Bytes written through such a mapping are not tracked:
//! call [`CachedFile::mark_dirty`] for them.
//!
//! | file | holds |
//! | --- | --- |
//! | `mod.rs` | [`PageCache`], its builder, budget, clock eviction and statistics |
//! | `file.rs` | [`CachedFile`]: fills, readahead, reads, writes, write-back, revalidation |
//! | `entry.rs` | one cached page: fill state, frame, dirty blocks |
//! | `io.rs` | the file I/O seam ([`FileIo`]): [`SysFileIo`], [`MemFileIo`], [`FaultyFileIo`] |

mod entry;
mod file;
mod io;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use file::CachedFile;
pub use io::{DirectFileIo, FaultyFileIo, FileFaultStats, FileIo, FileStat, FrameRange, IoFile, MemFileIo, SysFileIo};

use self::entry::{Entry, Fill};
use self::file::FileInner;
use crate::error::{Error, Result};
use crate::phys::{Page, PhysMem};
use crate::sync::{lock, AtomicU64, AtomicUsize, Mutex, Ordering};

/// The default block size: 512 bytes, the smallest sector.
pub const DEFAULT_BLOCK_SIZE: usize = 512;
/// The default largest readahead, in pages: 32 (128 KiB of 4 KiB frames).
pub const DEFAULT_READAHEAD: usize = 32;

/// Builds a [`PageCache`]. See [`PageCache::builder`].
#[derive(Debug)]
#[must_use]
pub struct PageCacheBuilder {
    phys: PhysMem,
    budget: Option<usize>,
    block_size: usize,
    readahead: usize,
    io: Arc<dyn FileIo>,
}

impl PageCacheBuilder {
    /// The frame budget: the most pages resident at once. Default: every
    /// frame of the memory. A budget above the memory's frames is allowed
    /// (the memory then bounds the cache).
    pub fn budget(mut self, frames: usize) -> Self {
        self.budget = Some(frames);
        self
    }

    /// The block size in bytes: the unit of dirty tracking and write-back.
    /// A power of two from 512 to the frame size; default 512.
    pub fn block_size(mut self, bytes: usize) -> Self {
        self.block_size = bytes;
        self
    }

    /// The largest readahead in pages (0 or 1: none). Sequential misses
    /// read ahead 4 pages, then twice as many each time up to this; other
    /// misses read one page. Default [`DEFAULT_READAHEAD`].
    pub fn readahead(mut self, pages: usize) -> Self {
        self.readahead = pages;
        self
    }

    /// The file system (default [`SysFileIo`], the kernel's).
    pub fn io(mut self, io: Arc<dyn FileIo>) -> Self {
        self.io = io;
        self
    }

    /// Build the cache. [`Error::Config`] naming `"budget"` (0) or
    /// `"block_size"` (not a power of two in 512..=frame size);
    /// [`Error::NoDirectMap`] for a memory without a direct map.
    pub fn build(self) -> Result<PageCache> {
        let fs = self.phys.frame_size();
        let bs = self.block_size;
        if !bs.is_power_of_two() || bs < 512 || bs > fs {
            return Err(Error::config(
                "block_size",
                format!("{bs} is not a power of two from 512 to the frame size {fs}"),
            ));
        }
        let budget = self.budget.unwrap_or(self.phys.frames());
        if budget == 0 {
            return Err(Error::config("budget", "a page cache of 0 frames can hold nothing"));
        }
        if !self.phys.has_direct_map() {
            return Err(Error::NoDirectMap);
        }
        Ok(PageCache {
            inner: Arc::new(Inner {
                phys: self.phys,
                fs: self.io,
                block_size: bs,
                readahead: self.readahead.max(1),
                budget: AtomicUsize::new(budget),
                resident: AtomicUsize::new(0),
                clock: Mutex::new(VecDeque::new()),
                files: Mutex::new(HashMap::new()),
                stats: Counters::default(),
            }),
        })
    }
}

/// A page cache: files opened through it share its frames, budget and
/// eviction. Cloning is cheap (a reference count).
///
/// Dropping the last clone (and every [`CachedFile`]) writes back what is
/// dirty, ignoring errors; call [`sync_all`](Self::sync_all) first to see
/// them.
#[derive(Clone)]
pub struct PageCache {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) phys: PhysMem,
    pub(crate) fs: Arc<dyn FileIo>,
    pub(crate) block_size: usize,
    pub(crate) readahead: usize,
    budget: AtomicUsize,
    /// Frames the cache holds or has claimed for fills in flight.
    resident: AtomicUsize,
    /// The clock: every valid entry, oldest first (gone entries are
    /// dropped when met).
    clock: Mutex<VecDeque<Arc<Entry>>>,
    files: Mutex<HashMap<PathBuf, Arc<FileInner>>>,
    pub(crate) stats: Counters,
}

/// The cache's counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) reads: AtomicU64,
    pub(crate) readahead_pages: AtomicU64,
    pub(crate) readahead_hits: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) dirty: AtomicUsize,
    pub(crate) written_bytes: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) fill_errors: AtomicU64,
    pub(crate) writeback_errors: AtomicU64,
    pub(crate) over_budget: AtomicU64,
    pub(crate) stale_drops: AtomicU64,
}

/// Counters of a [`PageCache`] ([`PageCache::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PageCacheStats {
    /// The frame budget now.
    pub budget: usize,
    /// Frames held: valid pages and fills in flight.
    pub resident: usize,
    /// Pages with dirty blocks.
    pub dirty: usize,
    /// Page lookups that found the page valid (no system call).
    pub hits: u64,
    /// Page lookups that filled the page: read it from the file (with its
    /// readahead), or zeroed it for a write that covers it whole.
    pub misses: u64,
    /// Read calls made to the file system (one per miss with its readahead).
    pub reads: u64,
    /// Bytes read from files.
    pub read_bytes: u64,
    /// Pages read ahead of a miss.
    pub readahead_pages: u64,
    /// Pages read ahead that were used later.
    pub readahead_hits: u64,
    /// Pages evicted to stay within the budget.
    pub evictions: u64,
    /// Write calls made to the file system.
    pub writes: u64,
    /// Bytes written back.
    pub written_bytes: u64,
    /// Fills that failed (the caller got the error; nothing was cached).
    pub fill_errors: u64,
    /// Write-backs that failed (the blocks stayed dirty).
    pub writeback_errors: u64,
    /// Fills that took a frame above the budget because every resident
    /// page was held, dirty with a failing write-back, or being filled.
    pub over_budget: u64,
    /// Clean pages dropped because their file changed on disk.
    pub stale_drops: u64,
}

impl PageCache {
    /// A builder over `phys`: frames come from it, the budget defaults to
    /// all of them.
    pub fn builder(phys: &PhysMem) -> PageCacheBuilder {
        PageCacheBuilder {
            phys: phys.clone(),
            budget: None,
            block_size: DEFAULT_BLOCK_SIZE,
            readahead: DEFAULT_READAHEAD,
            io: Arc::new(SysFileIo),
        }
    }

    /// Open `path` through the cache (read-write where permitted, else
    /// read-only). A path already open gives the same file, revalidated:
    /// if it changed on disk its clean pages are dropped first.
    /// Errors: [`Error::Sys`] with op `"open"` (`ENOENT`, `EACCES`,
    /// `EISDIR` for a directory, another file that is not a regular file
    /// as `EINVAL`...).
    pub fn open(&self, path: impl AsRef<Path>) -> Result<CachedFile> {
        let path = path.as_ref();
        let found = lock(&self.inner.files).get(path).cloned();
        if let Some(f) = found {
            let file = CachedFile::new(self.inner.clone(), f);
            file.revalidate()?;
            return Ok(file);
        }
        let f = FileInner::open(&self.inner, path)?;
        let f = lock(&self.inner.files).entry(path.to_path_buf()).or_insert(f).clone();
        Ok(CachedFile::new(self.inner.clone(), f))
    }

    /// The files open now, by path.
    pub fn files(&self) -> Vec<PathBuf> {
        lock(&self.inner.files).keys().cloned().collect()
    }

    /// Write back `path`'s dirty pages and forget the file: its pages are
    /// dropped (frames held elsewhere stay with their holders) and its
    /// descriptor closed. A later `open` starts afresh. Errors as
    /// [`CachedFile::flush`]; on error the file stays open and cached.
    /// Handles to it still open keep the descriptor and go on working on
    /// the file apart from the cache's list (a later `open` does not see
    /// their pages); what they leave dirty is written back, errors
    /// ignored, when the last of them is dropped.
    pub fn close(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let Some(f) = lock(&self.inner.files).get(path).cloned() else { return Ok(()) };
        let file = CachedFile::new(self.inner.clone(), f);
        file.flush()?;
        file.drop_pages(true);
        lock(&self.inner.files).remove(path);
        Ok(())
    }

    /// Write back every file's dirty pages and `fsync` each file written
    /// to; the first error (all files are tried).
    pub fn sync_all(&self) -> Result<()> {
        let files: Vec<_> = lock(&self.inner.files).values().cloned().collect();
        let mut first = Ok(());
        for f in files {
            let r = CachedFile::new(self.inner.clone(), f).fsync();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// The frame budget now.
    pub fn budget(&self) -> usize {
        self.inner.budget.load(Ordering::Relaxed)
    }

    /// Change the budget at run time. Lowering it evicts clean, unheld
    /// pages (writing dirty ones back first) until at most `frames` are
    /// resident or nothing more can go; returns the pages resident then.
    /// A write-back that fails keeps its page (the error is told to that
    /// file's next `flush`/`fsync`). [`Error::Config`] naming `"budget"`
    /// for 0.
    pub fn set_budget(&self, frames: usize) -> Result<usize> {
        if frames == 0 {
            return Err(Error::config("budget", "a page cache of 0 frames can hold nothing"));
        }
        self.inner.budget.store(frames, Ordering::Relaxed);
        self.inner.shrink_to(frames);
        Ok(self.inner.resident.load(Ordering::Relaxed))
    }

    /// The memory the frames come from.
    pub fn phys(&self) -> &PhysMem {
        &self.inner.phys
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> usize {
        self.inner.block_size
    }

    /// The counters now (each read on its own; a racy snapshot while other
    /// threads use the cache).
    pub fn stats(&self) -> PageCacheStats {
        let s = &self.inner.stats;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PageCacheStats {
            budget: self.budget(),
            resident: self.inner.resident.load(Ordering::Relaxed),
            dirty: s.dirty.load(Ordering::Relaxed),
            hits: r(&s.hits),
            misses: r(&s.misses),
            reads: r(&s.reads),
            read_bytes: r(&s.read_bytes),
            readahead_pages: r(&s.readahead_pages),
            readahead_hits: r(&s.readahead_hits),
            evictions: r(&s.evictions),
            writes: r(&s.writes),
            written_bytes: r(&s.written_bytes),
            fill_errors: r(&s.fill_errors),
            writeback_errors: r(&s.writeback_errors),
            over_budget: r(&s.over_budget),
            stale_drops: r(&s.stale_drops),
        }
    }
}

impl fmt::Debug for PageCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageCache")
            .field("block_size", &self.inner.block_size)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Best effort: errors have nowhere to go (`sync_all` reports them).
        let files: Vec<_> = lock(&self.files).drain().map(|(_, f)| f).collect();
        for f in files {
            let _ = f.write_back_all(self);
        }
    }
}

/// What became of one look at an entry by the evictor.
enum Look {
    Evicted,
    /// Held, dirty with a failing write-back, or referenced: keep it.
    Keep,
    /// Already gone: drop it from the clock.
    Gone,
}

impl Inner {
    /// Claim `n` frames for a fill, evicting to stay within the budget,
    /// and allocate them. On error nothing is claimed.
    pub(crate) fn take_frames(&self, n: usize) -> Result<Vec<Page>> {
        let mut over = false;
        loop {
            let budget = self.budget.load(Ordering::Relaxed);
            let cur = self.resident.load(Ordering::Relaxed);
            if cur + n <= budget || over {
                if self.resident.compare_exchange(cur, cur + n, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                    break;
                }
                continue;
            }
            if !self.evict_one() {
                over = true;
                self.stats.over_budget.fetch_add(1, Ordering::Relaxed);
            }
        }
        // A fill's frames in one run where the allocator has one: the pages
        // then lie contiguous in the memfd, and a send of them is one run
        // (one sendfile(2) call, one run mapping) instead of one per page.
        if n > 1 {
            if let Ok(run) = self.phys.alloc_run(n) {
                return Ok(run);
            }
        }
        let mut pages = Vec::with_capacity(n);
        while pages.len() < n {
            match self.phys.alloc_page() {
                Ok(p) => pages.push(p),
                // The memory may be smaller than the budget, or shared with
                // others: make room by evicting, else give up.
                Err(e) => {
                    if !self.evict_one() {
                        self.resident.fetch_sub(n, Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
        }
        Ok(pages)
    }

    /// Give back `n` claimed frames (a fill that failed, a page dropped).
    pub(crate) fn release_frames(&self, n: usize) {
        self.resident.fetch_sub(n, Ordering::Relaxed);
    }

    /// Put a newly valid entry on the clock.
    pub(crate) fn enlist(&self, e: Arc<Entry>) {
        let mut clock = lock(&self.clock);
        clock.push_back(e);
        // Gone entries are dropped when met; if they pile up (files
        // revalidated or closed while nothing is evicted), sweep them.
        let resident = self.resident.load(Ordering::Relaxed);
        if clock.len() > 2 * resident + 64 {
            clock.retain(|e| lock(&e.st).fill != Fill::Gone);
        }
    }

    /// Evict until at most `target` frames are resident or nothing more
    /// can go.
    fn shrink_to(&self, target: usize) {
        while self.resident.load(Ordering::Relaxed) > target {
            if !self.evict_one() {
                break;
            }
        }
    }

    /// Evict one page by the clock: `false` if two sweeps found nothing
    /// that could go.
    pub(crate) fn evict_one(&self) -> bool {
        let mut looks = 2 * lock(&self.clock).len() + 1;
        while looks > 0 {
            looks -= 1;
            let Some(e) = lock(&self.clock).pop_front() else { return false };
            if e.referenced.swap(false, Ordering::Relaxed) {
                lock(&self.clock).push_back(e);
                continue;
            }
            match self.look(&e) {
                Look::Evicted => return true,
                Look::Keep => lock(&self.clock).push_back(e),
                Look::Gone => {}
            }
        }
        false
    }

    /// Evict `e` if it is valid, not being written back and held by the
    /// cache alone, writing its dirty blocks back first.
    fn look(&self, e: &Arc<Entry>) -> Look {
        let Some(file) = e.file.upgrade() else { return Look::Gone };
        let mut st = lock(&e.st);
        match st.fill {
            Fill::Gone => return Look::Gone,
            Fill::Filling => return Look::Keep,
            Fill::Valid => {}
        }
        let held = st.page.as_ref().is_some_and(|p| p.hold_count() > 1);
        if held || st.writeback {
            return Look::Keep;
        }
        let mut wrote = false;
        if !st.dirty.is_empty() {
            // Written back under the entry's lock: a writer waits, then
            // finds the page gone or clean-and-kept.
            let page = st.page.clone().expect("a valid entry has its frame");
            let blocks = file::take_dirty(self, &file, &mut st);
            if let Err(err) = file.write_blocks(self, &[(e.index, &page, &blocks)]) {
                file::mark(self, &file, &mut st, &blocks);
                file.remember_error(err);
                return Look::Keep;
            }
            wrote = true;
        }
        if crate::sync::mutant!(EvictStaleCheck) {
            // The mutant: decide, let go of the lock, then evict on the
            // strength of the old look.
            drop(st);
            crate::sync::thread::yield_now();
            st = lock(&e.st);
            if st.fill != Fill::Valid {
                return Look::Gone;
            }
        }
        file.retire(self, e, st);
        self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        if wrote {
            file.note_own_write();
        }
        Look::Evicted
    }
}
