//! The file I/O seam: what the page cache asks of a file system, the real
//! one ([`SysFileIo`]), an in-memory one ([`MemFileIo`], for loom models,
//! Miri and fast property tests) and a fault injector ([`FaultyFileIo`]).
//!
//! Reads land straight in frames and writes are taken straight from them
//! ([`FrameRange`]: part of a frame's direct-map view); neither passes
//! through a Rust buffer.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::kaddr::{Kaddr, IOV_MAX};
use crate::mmu::{Fault, Plan};
use crate::sync::{lock, AtomicU64, Mutex, Ordering};

/// What identifies a file's contents on disk: a change of any field means
/// the file changed behind the cache (see
/// [`CachedFile::revalidate`](super::CachedFile::revalidate)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FileStat {
    /// Device of the inode.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub len: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl FileStat {
    fn of(m: &std::fs::Metadata) -> FileStat {
        FileStat {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }
}

/// Part of a frame a read fills or a write takes its bytes from: the
/// frame's view, an offset in it and a length.
#[derive(Clone, Copy)]
pub struct FrameRange<'a> {
    frame: Kaddr<'a>,
    offset: usize,
    len: usize,
}

impl<'a> FrameRange<'a> {
    /// Bytes `offset..offset + len` of `frame`;
    /// [`Error::OutOfBounds`](crate::Error::OutOfBounds) if they are not
    /// all inside it, [`Error::ReadOnly`](crate::Error::ReadOnly) if
    /// `frame` is a read-only view (a fill writes into the range).
    pub fn new(frame: Kaddr<'a>, offset: usize, len: usize) -> crate::Result<FrameRange<'a>> {
        frame.check_writable()?;
        frame.io_vec(offset, len)?;
        Ok(FrameRange { frame, offset, len })
    }

    /// Bytes in the range.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Copy `src` (at most [`len`](Self::len) bytes) into the start of the
    /// range, by machine words (the frame's memory model).
    pub fn write(&self, src: &[u8]) -> crate::Result<()> {
        self.frame.write_at(self.offset, &src[..src.len().min(self.len)])
    }

    /// Copy the start of the range into `dst` (at most `len` bytes).
    pub fn read(&self, dst: &mut [u8]) -> crate::Result<()> {
        let n = dst.len().min(self.len);
        self.frame.read_at(self.offset, &mut dst[..n])
    }

    /// The first `n` bytes of the range (`n` clamped to it).
    pub fn prefix(&self, n: usize) -> FrameRange<'a> {
        FrameRange { len: n.min(self.len), ..*self }
    }

    /// The range without its first `n` bytes (`n` clamped to it).
    pub fn suffix(&self, n: usize) -> FrameRange<'a> {
        let n = n.min(self.len);
        FrameRange { offset: self.offset + n, len: self.len - n, ..*self }
    }

    fn iovec(&self) -> libc::iovec {
        // `new` checked the range is inside the frame.
        libc::iovec { iov_base: self.frame.as_ptr().wrapping_add(self.offset).cast(), iov_len: self.len }
    }
}

impl fmt::Debug for FrameRange<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FrameRange({:#x}+{}, {})", self.frame.addr(), self.offset, self.len)
    }
}

/// A file system, as the page cache sees it. Implementations must be
/// thread-safe; every method may be called from any thread at once.
pub trait FileIo: Send + Sync + fmt::Debug {
    /// Open `path` for reading and writing (for reading only if
    /// `writable` is false).
    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn IoFile>>;
    /// What `path` names now (following symbolic links).
    fn stat(&self, path: &Path) -> io::Result<FileStat>;
}

/// An open file.
pub trait IoFile: Send + Sync + fmt::Debug {
    /// What the open file is now.
    fn stat(&self) -> io::Result<FileStat>;
    /// Read from `offset` into `bufs` in order (one `preadv(2)`); the bytes
    /// read, fewer only at the end of the file (or when interrupted).
    fn read_at(&self, offset: u64, bufs: &[FrameRange<'_>]) -> io::Result<usize>;
    /// Write `bufs` in order at `offset` (one `pwritev(2)`); the bytes
    /// written, possibly fewer.
    fn write_at(&self, offset: u64, bufs: &[FrameRange<'_>]) -> io::Result<usize>;
    /// Make what was written durable (`fsync(2)`).
    fn sync(&self) -> io::Result<()>;
}

// === the real file system ===

/// The kernel's file system: `open(2)`, `preadv(2)` straight into frames,
/// `pwritev(2)` straight from them, `fsync(2)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SysFileIo;

#[derive(Debug)]
struct SysFile {
    file: File,
    /// A second descriptor opened `O_DIRECT`, for fills ([`DirectFileIo`]).
    direct: Option<File>,
}

/// The kernel's file system with fills read `O_DIRECT`: straight from the
/// disk into the frames, bypassing (and not filling) the kernel's page
/// cache, so a file's bytes are cached once, here, instead of twice.
/// Reads are rounded up to whole 4 KiB (the frames have room; the kernel
/// stops at the end of the file); write-back stays buffered, and the
/// kernel writes any of its own dirty pages of a range before a direct
/// read of it. Where the file system refuses `O_DIRECT` (`EINVAL`, as
/// tmpfs does), `open` falls back to buffered reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct DirectFileIo;

/// The alignment [`DirectFileIo`] rounds reads up to.
const DIRECT_ALIGN: usize = 4096;

fn open_regular(path: &Path, writable: bool) -> io::Result<File> {
    let f = OpenOptions::new().read(true).write(writable).open(path)?;
    if !f.metadata()?.is_file() {
        // As the kernel says it (an errno the caller can match on).
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(f)
}

impl FileIo for SysFileIo {
    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn IoFile>> {
        Ok(Box::new(SysFile { file: open_regular(path, writable)?, direct: None }))
    }

    fn stat(&self, path: &Path) -> io::Result<FileStat> {
        Ok(FileStat::of(&std::fs::metadata(path)?))
    }
}

impl FileIo for DirectFileIo {
    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn IoFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = open_regular(path, writable)?;
        let direct = match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(d) => Some(d),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
            Err(e) => return Err(e),
        };
        Ok(Box::new(SysFile { file, direct }))
    }

    fn stat(&self, path: &Path) -> io::Result<FileStat> {
        Ok(FileStat::of(&std::fs::metadata(path)?))
    }
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn to_off(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset above i64::MAX"))
}

impl IoFile for SysFile {
    fn stat(&self) -> io::Result<FileStat> {
        Ok(FileStat::of(&self.file.metadata()?))
    }

    fn read_at(&self, offset: u64, bufs: &[FrameRange<'_>]) -> io::Result<usize> {
        let mut iov: Vec<libc::iovec> = bufs.iter().take(IOV_MAX).map(FrameRange::iovec).collect();
        let mut fd = self.file.as_raw_fd();
        if let Some(d) = &self.direct {
            // O_DIRECT wants the offset, every address and every length
            // aligned: fills start at page offsets into page-aligned frames,
            // and only the last piece may be short, so round it up within
            // its frame. Anything else goes the buffered way.
            let last = bufs.len().min(IOV_MAX).saturating_sub(1);
            let ok = offset % DIRECT_ALIGN as u64 == 0
                && bufs.iter().take(IOV_MAX).enumerate().all(|(i, b)| {
                    b.offset % DIRECT_ALIGN == 0
                        && (i == last || b.len % DIRECT_ALIGN == 0)
                        && b.frame.len() % DIRECT_ALIGN == 0
                });
            if ok {
                if let (Some(l), Some(b)) = (iov.last_mut(), bufs.get(last)) {
                    l.iov_len = b.len.next_multiple_of(DIRECT_ALIGN).min(b.frame.len() - b.offset);
                }
                fd = d.as_raw_fd();
            }
        }
        // SAFETY: every iovec lies inside a frame (checked when the range was
        // made; a rounded-up last piece stays inside its frame), mapped
        // writable for the borrow of `bufs`; the kernel writes there outside
        // the Rust memory model, as for `Kaddr::read_from`, and checks the
        // addresses itself.
        cvt(unsafe { libc::preadv(fd, iov.as_ptr(), iov.len() as i32, to_off(offset)?) })
    }

    fn write_at(&self, offset: u64, bufs: &[FrameRange<'_>]) -> io::Result<usize> {
        let iov: Vec<libc::iovec> = bufs.iter().take(IOV_MAX).map(FrameRange::iovec).collect();
        // SAFETY: as for `read_at`; the kernel only reads these bytes.
        cvt(unsafe { libc::pwritev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, to_off(offset)?) })
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}

// === an in-memory file system ===

/// Files in memory: a path names a byte vector. For loom models, Miri and
/// fast tests; it makes no system call. Writes and reads are applied under
/// a lock per file; `sync` only counts. Files end at 1 TiB (`EFBIG`).
///
/// ```
/// use lwbuf::pagecache::{FileIo, MemFileIo};
/// let fs = MemFileIo::new();
/// fs.put("a", b"hello".to_vec());
/// assert_eq!(fs.stat("a".as_ref())?.len, 5);
/// assert_eq!(fs.get("a").unwrap(), b"hello");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct MemFileIo {
    files: Mutex<HashMap<PathBuf, Arc<MemNode>>>,
    inos: AtomicU64,
}

/// The largest file [`MemFileIo`] holds (1 TiB): a write that would end
/// past it is `EFBIG`, as a file system's own limit is, rather than an
/// allocation the process cannot survive.
const MEM_FILE_MAX: usize = 1 << 40;

#[derive(Debug)]
struct MemNode {
    ino: u64,
    data: Mutex<(Vec<u8>, i128)>,
    syncs: AtomicU64,
}

#[derive(Debug)]
struct MemFile(Arc<MemNode>);

impl MemFileIo {
    /// An empty file system.
    pub fn new() -> MemFileIo {
        MemFileIo::default()
    }

    /// Create (or replace, as a new inode) the file at `path`.
    pub fn put(&self, path: impl AsRef<Path>, data: Vec<u8>) {
        let ino = self.inos.fetch_add(1, Ordering::Relaxed) + 1;
        let node = Arc::new(MemNode { ino, data: Mutex::new((data, 0)), syncs: AtomicU64::new(0) });
        lock(&self.files).insert(path.as_ref().to_path_buf(), node);
    }

    /// The file's bytes now, if it exists.
    pub fn get(&self, path: impl AsRef<Path>) -> Option<Vec<u8>> {
        let node = lock(&self.files).get(path.as_ref()).cloned()?;
        let data = lock(&node.data).0.clone();
        Some(data)
    }

    /// Change the file in place (same inode), as another process would:
    /// `f` edits the bytes; the modification time moves on.
    pub fn modify(&self, path: impl AsRef<Path>, f: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        let node =
            lock(&self.files).get(path.as_ref()).cloned().ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let mut d = lock(&node.data);
        f(&mut d.0);
        d.1 += 1;
        Ok(())
    }

    /// `sync` calls made on the file's inode.
    pub fn syncs(&self, path: impl AsRef<Path>) -> u64 {
        lock(&self.files).get(path.as_ref()).map_or(0, |n| n.syncs.load(Ordering::Relaxed))
    }
}

impl MemNode {
    fn stat(&self) -> FileStat {
        let d = lock(&self.data);
        FileStat { dev: 0, ino: self.ino, len: d.0.len() as u64, mtime_ns: d.1 }
    }
}

impl FileIo for MemFileIo {
    fn open(&self, path: &Path, _writable: bool) -> io::Result<Box<dyn IoFile>> {
        let node = lock(&self.files).get(path).cloned().ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(Box::new(MemFile(node)))
    }

    fn stat(&self, path: &Path) -> io::Result<FileStat> {
        let node = lock(&self.files).get(path).cloned().ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(node.stat())
    }
}

impl IoFile for MemFile {
    fn stat(&self) -> io::Result<FileStat> {
        Ok(self.0.stat())
    }

    fn read_at(&self, offset: u64, bufs: &[FrameRange<'_>]) -> io::Result<usize> {
        let d = lock(&self.0.data);
        let mut at = usize::try_from(offset).unwrap_or(usize::MAX);
        let mut done = 0;
        for b in bufs.iter().take(IOV_MAX) {
            let Some(src) = d.0.get(at..) else { break };
            let n = b.len.min(src.len());
            b.write(&src[..n]).map_err(io::Error::from)?;
            done += n;
            at += n;
            if n < b.len {
                break;
            }
        }
        Ok(done)
    }

    fn write_at(&self, offset: u64, bufs: &[FrameRange<'_>]) -> io::Result<usize> {
        let mut d = lock(&self.0.data);
        let mut at = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let total: usize = bufs.iter().take(IOV_MAX).map(FrameRange::len).sum();
        let end = at
            .checked_add(total)
            .filter(|&e| e <= MEM_FILE_MAX)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if let Some(more) = end.checked_sub(d.0.len()) {
            d.0.try_reserve(more).map_err(|_| io::Error::from_raw_os_error(libc::ENOSPC))?;
        }
        let mut done = 0;
        for b in bufs.iter().take(IOV_MAX) {
            let mut bytes = vec![0u8; b.len()];
            b.read(&mut bytes).map_err(io::Error::from)?;
            let end = at + bytes.len();
            if d.0.len() < end {
                d.0.resize(end, 0);
            }
            d.0[at..end].copy_from_slice(&bytes);
            at = end;
            done += bytes.len();
        }
        d.1 += 1;
        Ok(done)
    }

    fn sync(&self) -> io::Result<()> {
        self.0.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

// === fault injection ===

/// Counters of a [`FaultyFileIo`]: every call made to it, failed or not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileFaultStats {
    /// Read calls, including failed and shortened ones.
    pub reads: u64,
    /// Write calls, including failed ones.
    pub writes: u64,
    /// Sync calls, including failed ones.
    pub syncs: u64,
    /// Calls failed or shortened by injection.
    pub injected: u64,
}

/// Wraps any [`FileIo`] and fails chosen calls of its files, as
/// [`FaultyMmu`](crate::FaultyMmu) does for mappings. Calls are numbered
/// from 1 from the moment a fault is armed, across all files opened
/// through it.
///
/// - [`fail_reads`](Self::fail_reads): the chosen reads return the errno
///   (nothing is read);
/// - [`short_reads`](Self::short_reads): the chosen reads return half of
///   the bytes asked for and the read after each returns 0, as if the file
///   had been cut short there (a read of 1 byte returns 0 at once);
/// - [`fail_writes`](Self::fail_writes), [`fail_syncs`](Self::fail_syncs):
///   the errno (e.g. `EIO`, `ENOSPC`), nothing written.
///
/// ```
/// use std::sync::Arc;
/// use lwbuf::{Fault, PhysMem, Backing};
/// use lwbuf::pagecache::{FaultyFileIo, MemFileIo, PageCache};
///
/// let fs = Arc::new(MemFileIo::new());
/// fs.put("f", vec![7u8; 10_000]);
/// let faulty = Arc::new(FaultyFileIo::new(fs.clone()));
/// let mem = PhysMem::builder().frames(16).backing(Backing::Heap).build()?;
/// let cache = PageCache::builder(&mem).io(faulty.clone()).build()?;
/// let file = cache.open("f")?;
/// faulty.fail_reads(Some(Fault::nth(1, libc::EIO)));
/// let mut buf = [0u8; 10];
/// assert_eq!(file.read_at(0, &mut buf).unwrap_err().errno(), Some(libc::EIO));
/// assert_eq!(cache.stats().resident, 0);   // nothing cached
/// file.read_at(0, &mut buf)?;              // the next read works
/// assert_eq!(buf, [7u8; 10]);
/// # Ok::<(), lwbuf::Error>(())
/// ```
#[derive(Debug)]
pub struct FaultyFileIo {
    inner: Arc<dyn FileIo>,
    plans: Arc<Plans>,
}

#[derive(Debug)]
struct Plans {
    read: Mutex<Plan>,
    short: Mutex<Plan>,
    /// Set by a shortened read: the next read returns 0.
    cut: crate::sync::AtomicBool,
    write: Mutex<Plan>,
    sync: Mutex<Plan>,
    reads: AtomicU64,
    writes: AtomicU64,
    syncs: AtomicU64,
    injected: AtomicU64,
}

#[derive(Debug)]
struct FaultyFile {
    inner: Box<dyn IoFile>,
    plans: Arc<Plans>,
}

impl FaultyFileIo {
    /// Wrap `inner`, with no fault armed.
    pub fn new(inner: Arc<dyn FileIo>) -> FaultyFileIo {
        FaultyFileIo {
            inner,
            plans: Arc::new(Plans {
                read: Mutex::new(Plan::armed(None)),
                short: Mutex::new(Plan::armed(None)),
                cut: crate::sync::AtomicBool::new(false),
                write: Mutex::new(Plan::armed(None)),
                sync: Mutex::new(Plan::armed(None)),
                reads: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                syncs: AtomicU64::new(0),
                injected: AtomicU64::new(0),
            }),
        }
    }

    /// Arm (or clear) failing reads.
    pub fn fail_reads(&self, fault: Option<Fault>) {
        *lock(&self.plans.read) = Plan::armed(fault);
    }

    /// Arm (or clear) shortened reads (the fault's errno is not used).
    /// A cut still pending from an earlier shortened read is forgotten.
    pub fn short_reads(&self, fault: Option<Fault>) {
        *lock(&self.plans.short) = Plan::armed(fault);
        self.plans.cut.store(false, Ordering::Relaxed);
    }

    /// Arm (or clear) failing writes.
    pub fn fail_writes(&self, fault: Option<Fault>) {
        *lock(&self.plans.write) = Plan::armed(fault);
    }

    /// Arm (or clear) failing syncs.
    pub fn fail_syncs(&self, fault: Option<Fault>) {
        *lock(&self.plans.sync) = Plan::armed(fault);
    }

    /// Clear every fault.
    pub fn clear(&self) {
        self.fail_reads(None);
        self.short_reads(None);
        self.fail_writes(None);
        self.fail_syncs(None);
    }

    /// Every call made, and how many were failed or shortened.
    pub fn fault_stats(&self) -> FileFaultStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FileFaultStats {
            reads: r(&self.plans.reads),
            writes: r(&self.plans.writes),
            syncs: r(&self.plans.syncs),
            injected: r(&self.plans.injected),
        }
    }
}

impl FileIo for FaultyFileIo {
    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn IoFile>> {
        Ok(Box::new(FaultyFile { inner: self.inner.open(path, writable)?, plans: self.plans.clone() }))
    }

    fn stat(&self, path: &Path) -> io::Result<FileStat> {
        self.inner.stat(path)
    }
}

impl Plans {
    fn injected(&self, errno: i32) -> io::Error {
        self.injected.fetch_add(1, Ordering::Relaxed);
        io::Error::from_raw_os_error(errno)
    }
}

impl IoFile for FaultyFile {
    fn stat(&self) -> io::Result<FileStat> {
        self.inner.stat()
    }

    fn read_at(&self, offset: u64, bufs: &[FrameRange<'_>]) -> io::Result<usize> {
        let p = &self.plans;
        p.reads.fetch_add(1, Ordering::Relaxed);
        if let Some(errno) = lock(&p.read).next() {
            return Err(p.injected(errno));
        }
        if p.cut.swap(false, Ordering::Relaxed) {
            p.injected.fetch_add(1, Ordering::Relaxed);
            return Ok(0);
        }
        if lock(&p.short).next().is_some() {
            let want: usize = bufs.iter().map(FrameRange::len).sum();
            let mut left = want / 2;
            let mut short = Vec::new();
            for b in bufs {
                if left == 0 {
                    break;
                }
                short.push(b.prefix(left));
                left -= short.last().map_or(0, FrameRange::len);
            }
            p.injected.fetch_add(1, Ordering::Relaxed);
            let n = self.inner.read_at(offset, &short)?;
            // A read that got nothing is already the cut; only one that got
            // something is followed by the 0.
            p.cut.store(n > 0, Ordering::Relaxed);
            return Ok(n);
        }
        self.inner.read_at(offset, bufs)
    }

    fn write_at(&self, offset: u64, bufs: &[FrameRange<'_>]) -> io::Result<usize> {
        let p = &self.plans;
        p.writes.fetch_add(1, Ordering::Relaxed);
        if let Some(errno) = lock(&p.write).next() {
            return Err(p.injected(errno));
        }
        self.inner.write_at(offset, bufs)
    }

    fn sync(&self) -> io::Result<()> {
        let p = &self.plans;
        p.syncs.fetch_add(1, Ordering::Relaxed);
        if let Some(errno) = lock(&p.sync).next() {
            return Err(p.injected(errno));
        }
        self.inner.sync()
    }
}
