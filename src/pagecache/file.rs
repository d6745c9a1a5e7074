//! [`CachedFile`]: one file's pages, how they are filled, read, written
//! and written back.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use super::entry::{Blocks, Entry, EntrySt, Fill};
use super::io::{FileStat, FrameRange, IoFile};
use super::Inner;
use crate::error::{Error, Result};
use crate::hash::WordMap;
use crate::kaddr::IOV_MAX;
use crate::phys::Page;
use crate::sync::{lock, wait, AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering};

/// Shards of a file's page map (a lock each).
#[cfg(not(loom))]
const SHARDS: usize = 64;
#[cfg(loom)]
const SHARDS: usize = 2;

/// One shard of a file's page map: page index to entry.
type Shard = Mutex<WordMap<u64, Arc<Entry>>>;

/// Sequential misses read ahead at least this many pages.
const MIN_READAHEAD: usize = 4;

/// The largest file offset a write may reach (`off_t` is signed).
const MAX_OFFSET: u64 = i64::MAX as u64;

/// A file opened through a [`PageCache`](super::PageCache). Cloning is
/// cheap; every clone (and every later `open` of the path) is the same
/// file. `Send + Sync`: any thread may read, write and flush at once.
#[derive(Clone)]
pub struct CachedFile {
    cache: Arc<Inner>,
    file: Arc<FileInner>,
}

/// One open file's state, shared by its handles and (weakly) its entries.
pub(crate) struct FileInner {
    /// The cache, to write back and give frames back when the file is
    /// dropped while the cache lives (it was closed with handles open).
    cache: Weak<Inner>,
    path: PathBuf,
    io: Mutex<Arc<dyn IoFile>>,
    writable: bool,
    /// What the file was on disk at open or the last revalidation.
    stat: Mutex<FileStat>,
    /// The file's length as the cache sees it: the disk's, grown by writes.
    len: AtomicU64,
    /// Bytes of the file on disk that a fill may read; beyond, pages are
    /// zeros (grown by write-back).
    disk_len: AtomicU64,
    shards: Box<[Shard]>,
    /// Where a sequential miss would be, and the last readahead.
    next_seq: AtomicU64,
    ra_window: AtomicUsize,
    /// Pages of this file with dirty blocks.
    dirty: AtomicUsize,
    /// A write-back error no `flush`/`fsync` has reported yet.
    error: Mutex<Option<Error>>,
    /// Bumped (under `reval`) each time a change on disk is noticed,
    /// before the stale pages are dropped: a fill that read before the
    /// bump does not publish what it read ([`CachedFile::generation`]).
    gen: AtomicU64,
    /// Serializes revalidations and the recording of our own write-backs'
    /// effect on the stat. Taken before any entry lock.
    reval: Mutex<()>,
}

/// What became of a call to [`CachedFile::fill`].
enum Filled {
    /// Another thread had put the page in the map first: look again.
    Raced,
    /// Filled from the file and valid: look again.
    Valid,
    /// A page to be overwritten whole: its frame is zeros and the entry
    /// still `Filling`; the caller writes it, then makes it valid.
    Zeroed(Arc<Entry>),
}

/// How a page is wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// Its bytes: read it from the file (with readahead).
    Read,
    /// The whole page is about to be overwritten: no read, zeros.
    Overwrite,
}

fn sys(op: &'static str, e: io::Error) -> Error {
    Error::Sys { op, source: e }
}

impl FileInner {
    pub(crate) fn open(cache: &Arc<Inner>, path: &Path) -> Result<Arc<FileInner>> {
        let (io, writable) = match cache.fs.open(path, true) {
            Ok(f) => (f, true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EROFS | libc::EPERM)) => {
                (cache.fs.open(path, false).map_err(|e| sys("open", e))?, false)
            }
            Err(e) => return Err(sys("open", e)),
        };
        let stat = io.stat().map_err(|e| sys("fstat", e))?;
        Ok(Arc::new(FileInner {
            cache: Arc::downgrade(cache),
            path: path.to_path_buf(),
            io: Mutex::new(Arc::from(io)),
            writable,
            stat: Mutex::new(stat),
            len: AtomicU64::new(stat.len),
            disk_len: AtomicU64::new(stat.len),
            shards: (0..SHARDS).map(|_| Mutex::new(WordMap::default())).collect(),
            next_seq: AtomicU64::new(0),
            ra_window: AtomicUsize::new(0),
            dirty: AtomicUsize::new(0),
            error: Mutex::new(None),
            gen: AtomicU64::new(0),
            reval: Mutex::new(()),
        }))
    }

    fn shard(&self, index: u64) -> &Shard {
        &self.shards[(index as usize) % SHARDS]
    }

    fn io(&self) -> Arc<dyn IoFile> {
        lock(&self.io).clone()
    }

    /// Take `e` out of the map if it is still the entry there. Called with
    /// `e`'s lock held: a shard's lock nests inside an entry's, and no
    /// entry's lock is taken under a shard's.
    pub(crate) fn unmap_entry(&self, e: &Arc<Entry>) {
        let mut map = lock(self.shard(e.index));
        if map.get(&e.index).is_some_and(|cur| Arc::ptr_eq(cur, e)) {
            map.remove(&e.index);
        }
    }

    /// After a write-back of ours: take the file's stat as it is now (its
    /// size and mtime moved because of us), so the next revalidation does
    /// not take our own write for a change behind the cache and drop every
    /// clean page. A change another process makes in the same instant is
    /// not told apart from ours. Skipped while a revalidation runs (it
    /// may be waiting on a slow `stat`; it decides for itself, and at
    /// worst drops clean pages that were current).
    pub(crate) fn note_own_write(&self) {
        let Some(_g) = crate::sync::try_lock(&self.reval) else { return };
        if let Ok(now) = self.io().stat() {
            let mut st = lock(&self.stat);
            if (st.dev, st.ino) == (now.dev, now.ino) {
                *st = now;
            }
        }
    }

    /// Retire valid entry `e`, whose lock `st` is: gone, out of the map
    /// before the lock goes (a thread that finds it gone looks again and
    /// must not find it there, or it would spin), and its frame given back
    /// last, after the removal (`CachedFile::read_cached` copies under the
    /// shard's lock with no hold).
    pub(crate) fn retire(&self, cache: &Inner, e: &Arc<Entry>, mut st: MutexGuard<'_, EntrySt>) {
        let page = e.retire(&mut st);
        self.unmap_entry(e);
        drop(st);
        drop(page);
        cache.release_frames(1);
    }

    pub(crate) fn remember_error(&self, e: Error) {
        let mut slot = lock(&self.error);
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    fn all_entries(&self) -> Vec<Arc<Entry>> {
        let mut v: Vec<Arc<Entry>> = Vec::new();
        for s in self.shards.iter() {
            v.extend(lock(s).values().cloned());
        }
        v.sort_by_key(|e| e.index);
        v
    }

    /// Write `items` (page index, frame, dirty blocks) back, coalescing
    /// neighbouring blocks (in one page or across consecutive pages) into
    /// one `pwritev` of up to `IOV_MAX` pieces. Returns which items were
    /// written whole, and the first error.
    pub(crate) fn write_blocks(&self, cache: &Inner, items: &[(u64, &Page, &Blocks)]) -> Result<()> {
        let (ok, err) = self.write_items(cache, items);
        match err {
            Some(e) if ok.iter().any(|o| !o) => Err(e),
            _ => Ok(()),
        }
    }

    fn write_items(&self, cache: &Inner, items: &[(u64, &Page, &Blocks)]) -> (Vec<bool>, Option<Error>) {
        let fs = cache.phys.frame_size() as u64;
        let bs = cache.block_size as u64;
        let len = self.len.load(Ordering::Relaxed);
        let io = self.io();
        let mut ok = vec![true; items.len()];
        let mut first_err = None;
        // Groups: a file offset, its pieces, and the items they cover.
        let mut groups: Vec<(u64, Vec<FrameRange<'_>>, Vec<usize>)> = Vec::new();
        let mut end = 0u64;
        for (i, (index, page, blocks)) in items.iter().enumerate() {
            let frame = match page.direct() {
                Ok(f) => f,
                Err(e) => {
                    ok[i] = false;
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            for r in blocks.runs() {
                let off = index * fs + r.start as u64 * bs;
                let stop = (index * fs + r.end as u64 * bs).min(len);
                if off >= stop {
                    continue;
                }
                let piece = FrameRange::new(frame, (r.start as u64 * bs) as usize, (stop - off) as usize)
                    .expect("a block run lies inside its frame");
                match groups.last_mut() {
                    Some((_, pieces, covers)) if off == end && pieces.len() < IOV_MAX => {
                        pieces.push(piece);
                        if covers.last() != Some(&i) {
                            covers.push(i);
                        }
                    }
                    _ => groups.push((off, vec![piece], vec![i])),
                }
                end = stop;
            }
        }
        for (start, pieces, covers) in &groups {
            if let Err(e) = self.write_all(cache, &*io, *start, pieces) {
                cache.stats.writeback_errors.fetch_add(1, Ordering::Relaxed);
                for &i in covers {
                    ok[i] = false;
                }
                first_err.get_or_insert(e);
            }
        }
        (ok, first_err)
    }

    /// One group: `pwritev` until every byte is written.
    fn write_all(&self, cache: &Inner, io: &dyn IoFile, offset: u64, pieces: &[FrameRange<'_>]) -> Result<()> {
        let total: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        let mut done = 0u64;
        while done < total {
            let rest = skip(pieces, done);
            cache.stats.writes.fetch_add(1, Ordering::Relaxed);
            match io.write_at(offset + done, &rest) {
                Ok(0) => return Err(sys("pwritev(write-back)", io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(sys("pwritev(write-back)", e)),
            }
        }
        cache.stats.written_bytes.fetch_add(total, Ordering::Relaxed);
        self.disk_len.fetch_max(offset + total, Ordering::Relaxed);
        Ok(())
    }

    /// Write back every dirty page (the cache's drop).
    pub(crate) fn write_back_all(&self, cache: &Inner) -> Result<()> {
        flush_file(cache, self)
    }
}

impl Drop for FileInner {
    fn drop(&mut self) {
        // The cache lists every file it has open, and drops them only as
        // it goes itself (having written them back): a file dropped while
        // the cache lives was closed while handles to it were open, and
        // the last of them is gone. Write back what they left dirty (no
        // one is left to tell of an error) and give its frames back.
        let Some(cache) = self.cache.upgrade() else { return };
        let _ = flush_file(&cache, self);
        for e in self.all_entries() {
            let mut st = lock(&e.st);
            if st.fill != Fill::Valid {
                continue;
            }
            take_dirty(&cache, self, &mut st);
            self.retire(&cache, &e, st);
        }
    }
}

/// `pieces` without their first `n` bytes.
fn skip<'a>(pieces: &[FrameRange<'a>], mut n: u64) -> Vec<FrameRange<'a>> {
    let mut out = Vec::with_capacity(pieces.len());
    for p in pieces {
        let l = p.len() as u64;
        if n >= l {
            n -= l;
            continue;
        }
        out.push(if n > 0 { p.suffix(n as usize) } else { *p });
        n = 0;
    }
    out
}

/// Mark blocks dirty under the entry's lock, keeping the counters.
pub(crate) fn mark(cache: &Inner, file: &FileInner, st: &mut EntrySt, blocks: &Blocks) {
    if blocks.is_empty() {
        return;
    }
    if st.dirty.is_empty() {
        cache.stats.dirty.fetch_add(1, Ordering::Relaxed);
        file.dirty.fetch_add(1, Ordering::Relaxed);
    }
    st.dirty.union(blocks);
}

/// Take a page's dirty blocks under its lock, keeping the counters.
pub(crate) fn take_dirty(cache: &Inner, file: &FileInner, st: &mut EntrySt) -> Blocks {
    if st.dirty.is_empty() {
        return Blocks::default();
    }
    cache.stats.dirty.fetch_sub(1, Ordering::Relaxed);
    file.dirty.fetch_sub(1, Ordering::Relaxed);
    st.dirty.take()
}

fn flush_file(cache: &Inner, file: &FileInner) -> Result<()> {
    let mut items: Vec<(Arc<Entry>, Page, Blocks)> = Vec::new();
    // Every page is looked at, even with no page dirty: a page another
    // flush is writing back is clean until that write-back ends.
    for e in file.all_entries() {
        let mut st = lock(&e.st);
        // Another flush is writing this page: its blocks were written
        // before this call, so wait for that write-back to end (a
        // failed one leaves them dirty again, for this one to write).
        // Flushes take pages in index order and wait only on a page
        // another has taken, so they never wait on each other in a
        // cycle.
        while st.writeback {
            st = wait(&e.filled, st);
        }
        if st.fill != Fill::Valid || st.dirty.is_empty() {
            continue;
        }
        let blocks = take_dirty(cache, file, &mut st);
        st.writeback = true;
        let page = st.page.clone().expect("a valid entry has its frame");
        drop(st);
        items.push((e, page, blocks));
    }
    let refs: Vec<(u64, &Page, &Blocks)> = items.iter().map(|(e, p, b)| (e.index, p, b)).collect();
    let (ok, err) = file.write_items(cache, &refs);
    for ((e, _, blocks), ok) in items.iter().zip(ok) {
        let mut st = lock(&e.st);
        st.writeback = false;
        if !ok {
            mark(cache, file, &mut st, blocks);
        }
        drop(st);
        e.filled.notify_all();
    }
    if !items.is_empty() {
        file.note_own_write();
    }
    let pending = lock(&file.error).take();
    match (err, pending) {
        (Some(e), _) => Err(e),
        (None, Some(p)) => Err(p),
        (None, None) => Ok(()),
    }
}

impl CachedFile {
    pub(crate) fn new(cache: Arc<Inner>, file: Arc<FileInner>) -> CachedFile {
        CachedFile { cache, file }
    }

    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// The file's length as the cache sees it: on disk at open (or the
    /// last revalidation), grown by writes.
    pub fn len(&self) -> u64 {
        self.file.len.load(Ordering::Relaxed)
    }

    /// Whether [`len`](Self::len) is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether writes are allowed (the file was opened read-write).
    pub fn is_writable(&self) -> bool {
        self.file.writable
    }

    /// What the file was on disk when opened or last revalidated.
    pub fn stat(&self) -> FileStat {
        *lock(&self.file.stat)
    }

    /// The page size (the memory's frame size).
    pub fn page_size(&self) -> usize {
        self.cache.phys.frame_size()
    }

    /// Pages in the file ([`len`](Self::len) rounded up).
    pub fn page_count(&self) -> u64 {
        self.len().div_ceil(self.page_size() as u64)
    }

    /// Copy bytes from `offset` into `buf`: the bytes copied, fewer than
    /// `buf.len()` only at the end of the file (0 at or beyond it). Pages
    /// not cached are read from the file first (with readahead when reads
    /// are sequential); cached ones cost no system call. Errors:
    /// [`Error::Sys`] (`"preadv(fill)"`) or [`Error::FileChanged`] from a
    /// fill (nothing of that page is cached; bytes of earlier pages are
    /// already in `buf`).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let len = self.len();
        if offset >= len || buf.is_empty() {
            return Ok(0);
        }
        let n = (len - offset).min(buf.len() as u64) as usize;
        let fs = self.page_size() as u64;
        let mut done = 0usize;
        while done < n {
            let at = offset + done as u64;
            let (index, in_page) = (at / fs, (at % fs) as usize);
            let take = (fs as usize - in_page).min(n - done);
            let dst = &mut buf[done..done + take];
            if !self.read_cached(index, in_page, dst)? {
                self.with_valid(index, Want::Read, |st| {
                    st.page.as_ref().expect("a valid entry has its frame").direct()?.read_at(in_page, dst)
                })??;
            }
            done += take;
        }
        Ok(n)
    }

    /// Fill `buf` from `offset`: [`Error::OutOfBounds`] (nothing read) if
    /// the file is shorter than `offset + buf.len()`. Errors otherwise as
    /// [`read_at`](Self::read_at).
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = self.len();
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > len) {
            return Err(out_of_bounds(offset, buf.len(), len));
        }
        self.read_at(offset, buf).map(drop)
    }

    /// Copy `data` into the file's pages at `offset`, marking the blocks
    /// it touches dirty; the file grows if it ends beyond
    /// [`len`](Self::len). A page not cached is read first unless the
    /// write covers all of it (so a partial block never holds garbage).
    /// Nothing reaches the disk until a write-back
    /// ([`flush`](Self::flush), [`fsync`](Self::fsync), an eviction).
    /// Errors: [`Error::Sys`] with `EBADF` (op `"write(read-only file)"`)
    /// if the file was opened read-only; [`Error::Config`] naming
    /// `"offset"` past `i64::MAX`; fill errors as [`read_at`](Self::read_at)
    /// (earlier pages are written and dirty).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_write(offset, data.len())?;
        let fs = self.page_size() as u64;
        let bs = self.cache.block_size;
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let (index, in_page) = (at / fs, (at % fs) as usize);
            let take = (fs as usize - in_page).min(data.len() - done);
            let src = &data[done..done + take];
            let want = if take == fs as usize { Want::Overwrite } else { Want::Read };
            let mut blocks = Blocks::default();
            blocks.insert(in_page / bs, (in_page + take).div_ceil(bs));
            let (cache, file) = (&*self.cache, &*self.file);
            self.with_valid(index, want, |st| -> Result<()> {
                st.page.as_ref().expect("a valid entry has its frame").direct()?.write_at(in_page, src)?;
                mark(cache, file, st, &blocks);
                // Grown under the entry's lock, so a write-back that takes
                // these blocks sees the length that covers them.
                file.len.fetch_max(at + take as u64, Ordering::Relaxed);
                Ok(())
            })??;
            done += take;
        }
        Ok(())
    }

    /// Mark `len` bytes at `offset` dirty without copying: for bytes
    /// written straight into a frame from [`page`](Self::page) through a
    /// mapping. Pages not cached are skipped (there is nothing to write
    /// back). Errors as [`write_at`](Self::write_at)'s checks.
    pub fn mark_dirty(&self, offset: u64, len: usize) -> Result<()> {
        self.check_write(offset, len)?;
        let fs = self.page_size() as u64;
        let bs = self.cache.block_size;
        let end = (offset + len as u64).min(self.len());
        let mut at = offset;
        while at < end {
            let (index, in_page) = (at / fs, (at % fs) as usize);
            let take = ((fs - in_page as u64).min(end - at)) as usize;
            let e = lock(self.file.shard(index)).get(&index).cloned();
            if let Some(e) = e {
                let mut st = lock(&e.st);
                if st.fill == Fill::Valid {
                    let mut blocks = Blocks::default();
                    blocks.insert(in_page / bs, (in_page + take).div_ceil(bs));
                    mark(&self.cache, &self.file, &mut st, &blocks);
                }
            }
            at += take as u64;
        }
        Ok(())
    }

    fn check_write(&self, offset: u64, len: usize) -> Result<()> {
        if !self.file.writable {
            return Err(Error::Sys { op: "write(read-only file)", source: io::Error::from_raw_os_error(libc::EBADF) });
        }
        if offset.checked_add(len as u64).is_none_or(|end| end > MAX_OFFSET) {
            return Err(Error::config("offset", format!("a write of {len} bytes at {offset} ends past i64::MAX")));
        }
        Ok(())
    }

    /// The frame of page `index`, read from the file if not cached: a hold
    /// that keeps the page resident (it cannot be evicted while any clone
    /// lives). Map it with an lwbuf cache or the sf_buf pool, or send it.
    /// [`Error::OutOfBounds`] for a page at or beyond the end of the file;
    /// fill errors as [`read_at`](Self::read_at).
    pub fn page(&self, index: u64) -> Result<Page> {
        if index >= self.page_count() {
            return Err(out_of_bounds(index.saturating_mul(self.page_size() as u64), self.page_size(), self.len()));
        }
        self.with_valid(index, Want::Read, |st| st.page.clone().expect("a valid entry has its frame"))
    }

    /// The frames of every page that bytes `range` touch, in order (holds,
    /// as [`page`](Self::page)). [`Error::OutOfBounds`] if the range ends
    /// beyond the file.
    pub fn pages(&self, range: Range<u64>) -> Result<Vec<Page>> {
        let len = self.len();
        if range.start > range.end || range.end > len {
            return Err(out_of_bounds(range.start, range.end.saturating_sub(range.start) as usize, len));
        }
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let fs = self.page_size() as u64;
        (range.start / fs..range.end.div_ceil(fs)).map(|i| self.page(i)).collect()
    }

    /// Write every dirty block back, adjacent blocks (within and across
    /// pages) in one `pwritev` each. Returns the first error of this
    /// write-back (its blocks stay dirty for the next one), else an error
    /// an earlier eviction's write-back met that no `flush` has reported
    /// yet (once), else `Ok`. A page another flush is writing back is
    /// waited for (and written again if that write-back failed), so `Ok`
    /// means every block dirtied before the call is in the file. Does not
    /// `fsync`.
    pub fn flush(&self) -> Result<()> {
        flush_file(&self.cache, &self.file)
    }

    /// [`flush`](Self::flush), then `fsync(2)` (op `"fsync"` on error).
    /// After it returns `Ok`, the file on disk holds every write made
    /// before the call.
    pub fn fsync(&self) -> Result<()> {
        self.flush()?;
        if self.file.writable {
            self.file.io().sync().map_err(|e| sys("fsync", e))?;
        }
        Ok(())
    }

    /// How many times a change of the file on disk has been noticed (by
    /// [`revalidate`](Self::revalidate) or [`PageCache::open`](super::PageCache::open)).
    /// Pages taken with [`page`](Self::page) or [`pages`](Self::pages) are
    /// current if the generation read before taking them is still the
    /// generation after a `revalidate` that follows, and [`stat`](Self::stat)
    /// read after the generation is still the stat then: the pattern a
    /// server uses to never send a mix of two versions of a file. (A
    /// revalidation bumps the generation, drops the stale pages, then
    /// stores the new stat.)
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use lwbuf::{Backing, PhysMem};
    /// # use lwbuf::pagecache::{MemFileIo, PageCache};
    /// let fs = Arc::new(MemFileIo::new());
    /// fs.put("f", vec![1u8; 8192]);
    /// let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
    /// let cache = PageCache::builder(&mem).io(fs.clone()).build()?;
    /// let file = cache.open("f")?;
    /// let g = file.generation();
    /// let pages = file.pages(0..8192)?;
    /// fs.modify("f", |d| d[0] = 2)?;          // changed behind the cache
    /// assert!(file.revalidate()?);
    /// assert_ne!(file.generation(), g);       // `pages` may be stale: take them again
    /// # drop(pages);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn generation(&self) -> u64 {
        self.file.gen.load(Ordering::Acquire)
    }

    /// Compare the file on disk (by path: device, inode, size, mtime) with
    /// what the cache last saw. If it changed, drop its clean pages that
    /// no one holds (held ones are dropped from the cache and freed when
    /// let go), reopen the path if it is another inode now, and take the
    /// new size; dirty pages are kept and written at the next write-back.
    /// Returns whether the file had changed. [`Error::Sys`] (`"stat"`,
    /// `"open"`) if the path cannot be looked at.
    pub fn revalidate(&self) -> Result<bool> {
        let _g = lock(&self.file.reval);
        // Taken before the stat: writes and write-backs going on meanwhile
        // only grow these, and a growth after this load must survive.
        let (old_len, old_disk_len) = (self.len(), self.file.disk_len.load(Ordering::Relaxed));
        let now = self.cache.fs.stat(&self.file.path).map_err(|e| sys("stat", e))?;
        let old = *lock(&self.file.stat);
        if now == old {
            return Ok(false);
        }
        if (now.dev, now.ino) != (old.dev, old.ino) {
            let io = self.cache.fs.open(&self.file.path, self.file.writable).map_err(|e| sys("open", e))?;
            *lock(&self.file.io) = Arc::from(io);
        }
        // Before the pages are dropped: a fill in flight that read the old
        // bytes then sees the bump when it publishes (under its entry's
        // lock, which the drop below takes after this) and discards them.
        if !crate::sync::mutant!(StaleFillPublished) {
            self.file.gen.fetch_add(1, Ordering::Release);
        }
        set_unless_grown(&self.file.disk_len, old_disk_len, now.len);
        // Dirty pages kept: the length still covers what was written to
        // them, which ends within their last dirty block but not
        // necessarily at its end. And `now` may predate a write-back that
        // grew the file since (its page, clean now, was just dropped): the
        // length covers what is on disk by our own write-backs too. (If
        // the file was cut short meanwhile, a fill finds out.)
        let kept_end = self.drop_pages(false).min(old_len);
        let on_disk = self.file.disk_len.load(Ordering::Relaxed).min(old_len.max(now.len));
        set_unless_grown(&self.file.len, old_len, now.len.max(kept_end).max(on_disk));
        self.file.next_seq.store(0, Ordering::Relaxed);
        // Last: whoever reads the new stat finds the stale pages gone.
        *lock(&self.file.stat) = now;
        Ok(true)
    }

    /// Drop the file's pages from the cache: clean ones only, or all with
    /// `all`. Returns the end offset of the dirty pages kept.
    pub(crate) fn drop_pages(&self, all: bool) -> u64 {
        let fs = self.page_size() as u64;
        let bs = self.cache.block_size as u64;
        let mut kept_end = 0;
        for e in self.file.all_entries() {
            let mut st = lock(&e.st);
            if st.fill != Fill::Valid {
                continue;
            }
            if !all && (!st.dirty.is_empty() || st.writeback) {
                // A write-back in flight took its blocks' dirty bits: which
                // they are is not known here, so the whole page is kept in
                // the length (the caller caps it by the length it had).
                let end = if st.writeback { fs } else { st.dirty.end() as u64 * bs };
                kept_end = kept_end.max(e.index * fs + end);
                continue;
            }
            take_dirty(&self.cache, &self.file, &mut st);
            self.file.retire(&self.cache, &e, st);
            self.cache.stats.stale_drops.fetch_add(u64::from(!all), Ordering::Relaxed);
        }
        kept_end
    }

    /// The hit path of a read: copy from page `index` if it is valid, under
    /// its shard's lock alone (no entry lock, no hold). `Ok(false)` if the
    /// page is not valid now. The frame cannot be let go meanwhile: an
    /// entry's frame is dropped only after the entry has left the map,
    /// which takes this lock (`Entry::valid_pfn`).
    #[inline]
    fn read_cached(&self, index: u64, in_page: usize, dst: &mut [u8]) -> Result<bool> {
        let map = lock(self.file.shard(index));
        let Some(e) = map.get(&index) else { return Ok(false) };
        let v = e.valid_pfn.load(Ordering::Acquire);
        if v == 0 {
            return Ok(false);
        }
        self.touched(e, true);
        if crate::sync::mutant!(HitCopiesUnlocked) {
            drop(map);
            crate::sync::thread::yield_now();
        }
        self.cache.phys.direct_view(crate::phys::Pfn(v - 1), 1)?.read_at(in_page, dst)?;
        Ok(true)
    }

    /// Count a use of a valid entry: its clock bit, a hit, a readahead hit.
    #[inline]
    fn touched(&self, e: &Entry, hit: bool) {
        e.referenced.store(true, Ordering::Relaxed);
        if hit {
            self.cache.stats.hits.fetch_add(1, Ordering::Relaxed);
        }
        if e.readahead.load(Ordering::Relaxed) && e.readahead.swap(false, Ordering::Relaxed) {
            self.cache.stats.readahead_hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Run `f` on page `index`'s state while it is valid, under its lock,
    /// filling it first if needed.
    fn with_valid<R>(&self, index: u64, want: Want, f: impl FnOnce(&mut EntrySt) -> R) -> Result<R> {
        let mut missed = false;
        loop {
            let found = lock(self.file.shard(index)).get(&index).cloned();
            let Some(e) = found else {
                match self.fill(index, want)? {
                    // Finding another thread's fill under the shard's lock
                    // is a wait for it, counted as a hit below like the one
                    // here.
                    Filled::Raced => {}
                    Filled::Valid => missed = true,
                    Filled::Zeroed(e) => {
                        // Ours alone until `f` has overwritten the zeros:
                        // others wait on the fill (and the hit path sees no
                        // frame published), so none sees them.
                        let mut st = lock(&e.st);
                        let r = f(&mut st);
                        let page = st.page.take().expect("a zeroed entry has its frame");
                        e.publish(&mut st, page);
                        drop(st);
                        e.filled.notify_all();
                        self.cache.enlist(e);
                        return Ok(r);
                    }
                }
                continue;
            };
            let mut st = lock(&e.st);
            while st.fill == Fill::Filling {
                st = wait(&e.filled, st);
            }
            if st.fill == Fill::Gone {
                continue;
            }
            self.touched(&e, !missed);
            return Ok(f(&mut st));
        }
    }

    /// Fill page `index` (and pages read ahead of it), or find someone
    /// already is.
    fn fill(&self, index: u64, want: Want) -> Result<Filled> {
        // Before anything is read: a revalidation that bumps it meanwhile
        // drops what this fill would publish.
        let gen = self.file.gen.load(Ordering::Relaxed);
        let weak: Weak<FileInner> = Arc::downgrade(&self.file);
        let first = Arc::new(Entry::filling(weak.clone(), index, false));
        {
            let mut map = lock(self.file.shard(index));
            if !crate::sync::mutant!(FillNoRecheck) && map.contains_key(&index) {
                return Ok(Filled::Raced);
            }
            map.insert(index, first.clone());
        }
        let mut entries = vec![first];
        if want == Want::Read {
            let ahead = self.readahead_after(index);
            for i in index + 1..index + ahead as u64 {
                let mut map = lock(self.file.shard(i));
                if map.contains_key(&i) {
                    break;
                }
                let e = Arc::new(Entry::filling(weak.clone(), i, true));
                map.insert(i, e.clone());
                drop(map);
                entries.push(e);
            }
        }
        let filled =
            self.cache.take_frames(entries.len()).and_then(|pages| match self.read_into(index, &pages, want) {
                Ok(()) => Ok(pages),
                Err(e) => {
                    let n = pages.len();
                    drop(pages);
                    self.cache.release_frames(n);
                    Err(e)
                }
            });
        let stats = &self.cache.stats;
        match filled {
            Ok(pages) => {
                stats.misses.fetch_add(1, Ordering::Relaxed);
                stats.readahead_pages.fetch_add(entries.len() as u64 - 1, Ordering::Relaxed);
                if want == Want::Overwrite {
                    // No readahead: `entries` is the page alone. Its frame is
                    // zeros, not the file's bytes: it stays `Filling` until
                    // the caller has written over it.
                    let e = entries.swap_remove(0);
                    lock(&e.st).page = pages.into_iter().next();
                    return Ok(Filled::Zeroed(e));
                }
                let mut stale = false;
                for (e, p) in entries.iter().zip(pages) {
                    let mut st = lock(&e.st);
                    // The file changed on disk since this fill began (the
                    // entry's lock orders this load after the bump of a
                    // revalidation that has looked at the entry): what was
                    // read may be the old bytes, so it is not published.
                    stale |= self.file.gen.load(Ordering::Relaxed) != gen;
                    if stale {
                        st.fill = Fill::Gone;
                        self.file.unmap_entry(e);
                        drop(st);
                        drop(p);
                        self.cache.release_frames(1);
                    } else {
                        e.publish(&mut st, p);
                        drop(st);
                        self.cache.enlist(e.clone());
                    }
                    e.filled.notify_all();
                }
                Ok(if stale { Filled::Raced } else { Filled::Valid })
            }
            Err(err) => {
                stats.fill_errors.fetch_add(1, Ordering::Relaxed);
                for e in &entries {
                    if !crate::sync::mutant!(FailedFillMapped) {
                        self.file.unmap_entry(e);
                    }
                    lock(&e.st).fill = Fill::Gone;
                    e.filled.notify_all();
                }
                if matches!(err, Error::FileChanged { .. }) {
                    // Take the new size now, so the next call sees it.
                    let _ = self.revalidate();
                }
                Err(err)
            }
        }
    }

    /// How many pages a miss at `index` reads (itself included).
    fn readahead_after(&self, index: u64) -> usize {
        let max = self.cache.readahead;
        let seq = self.file.next_seq.load(Ordering::Relaxed) == index && index > 0;
        let mut n = if seq && max > 1 {
            (self.file.ra_window.load(Ordering::Relaxed) * 2).clamp(MIN_READAHEAD, max)
        } else {
            1
        };
        // Never read ahead more than a quarter of the budget, nor past the
        // end of the file.
        let quarter = (self.cache.budget.load(Ordering::Relaxed) / 4).max(1);
        n = n.min(quarter).max(1);
        let pages = self.page_count();
        n = n.min(pages.saturating_sub(index).max(1) as usize);
        self.file.ra_window.store(n, Ordering::Relaxed);
        self.file.next_seq.store(index + n as u64, Ordering::Relaxed);
        n
    }

    /// Read pages `index..index + pages.len()` into `pages`' frames; zeros
    /// beyond the data on disk.
    fn read_into(&self, index: u64, pages: &[Page], want: Want) -> Result<()> {
        let fs = self.page_size();
        let start = index * fs as u64;
        let disk = self.file.disk_len.load(Ordering::Relaxed);
        let frames: Vec<_> = pages.iter().map(Page::direct).collect::<Result<_>>()?;
        let expect = if want == Want::Overwrite {
            0
        } else {
            disk.saturating_sub(start).min((fs * pages.len()) as u64) as usize
        };
        if expect > 0 {
            let mut ranges = Vec::with_capacity(pages.len());
            let mut left = expect;
            for f in &frames {
                if left == 0 {
                    break;
                }
                let n = left.min(fs);
                ranges.push(FrameRange::new(*f, 0, n)?);
                left -= n;
            }
            let io = self.file.io();
            let mut done = 0usize;
            while done < expect {
                let rest = skip(&ranges, done as u64);
                self.cache.stats.reads.fetch_add(1, Ordering::Relaxed);
                match io.read_at(start + done as u64, &rest) {
                    Ok(0) => {
                        return Err(Error::FileChanged {
                            path: self.file.path.clone(),
                            why: format!("it ends at {} bytes, where {} were on disk", start + done as u64, disk),
                        })
                    }
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(sys("preadv(fill)", e)),
                }
            }
            self.cache.stats.read_bytes.fetch_add(expect as u64, Ordering::Relaxed);
        }
        // Zeros where no data was read: a frame's old bytes (another file's
        // page) must never show.
        for (k, f) in frames.iter().enumerate() {
            let filled = expect.saturating_sub(k * fs).min(fs);
            if filled == 0 {
                f.fill(0)?;
            } else if filled < fs {
                zero(f, filled, fs - filled)?;
            }
        }
        Ok(())
    }
}

/// Set `a` (last seen holding `seen`) to `new`, unless it changed since:
/// then someone grew it (a write, a write-back), and it may only grow.
fn set_unless_grown(a: &AtomicU64, seen: u64, new: u64) {
    if a.compare_exchange(seen, new, Ordering::Relaxed, Ordering::Relaxed).is_err() {
        a.fetch_max(new, Ordering::Relaxed);
    }
}

fn zero(f: &crate::Kaddr<'_>, mut at: usize, mut n: usize) -> Result<()> {
    const Z: [u8; 512] = [0; 512];
    while n > 0 {
        let k = n.min(Z.len());
        f.write_at(at, &Z[..k])?;
        at += k;
        n -= k;
    }
    Ok(())
}

fn out_of_bounds(offset: u64, len: usize, size: u64) -> Error {
    let c = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    Error::OutOfBounds { offset: c(offset), len, size: c(size) }
}

impl fmt::Debug for CachedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedFile")
            .field("path", &self.file.path)
            .field("len", &self.len())
            .field("writable", &self.file.writable)
            .field("dirty_pages", &self.file.dirty.load(Ordering::Relaxed))
            .finish()
    }
}

impl fmt::Debug for FileInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileInner").field("path", &self.path).finish_non_exhaustive()
    }
}
