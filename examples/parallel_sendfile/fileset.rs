//! The files a server serves, all in one `PhysMem`: generated (for the
//! benchmark) or loaded from a directory (for `serve`) into the page-cache
//! stand-in, or on disk behind a `PageCache` (`serve --mem-mib`, the
//! benchmark's `--on-disk`), whose pages a request pins while it sends
//! them ([`FileSet::answer`]).

use std::collections::HashMap;
use std::io::Write as _;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use lwbuf::pagecache::{CachedFile, FileStat, PageCache};
use lwbuf::sendfile::{PageFile, Pattern};
use lwbuf::{Error, PhysMem};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::http::{self, Conditions, FileMeta, Reply, Status};

/// One served file.
#[derive(Clone)]
pub struct Entry {
    /// The key requests name it by (`/KEY`).
    pub name: String,
    /// The pattern seed of a generated file.
    pub seed: Option<u64>,
    pub data: Data,
}

/// Where a file's bytes are.
#[derive(Clone)]
pub enum Data {
    /// In memory for the server's life, with its reply metadata.
    Mem { file: PageFile, meta: FileMeta },
    /// On disk, read through the set's page cache.
    Disk(Arc<DiskFile>),
}

/// A file on disk: opened through the page cache on its first request;
/// its reply metadata follows the file's stat.
pub struct DiskFile {
    path: PathBuf,
    file: OnceLock<CachedFile>,
    meta: Mutex<SeenMeta>,
}

/// The reply metadata of the last stat (and length) a request saw (`None`:
/// the stat listed at start, before the file was opened).
type SeenMeta = (Option<(FileStat, u64)>, Arc<FileMeta>);

impl Entry {
    /// The length now (for a file on disk: as last seen).
    pub fn len(&self) -> u64 {
        match &self.data {
            Data::Mem { file, .. } => file.len(),
            Data::Disk(d) => d.lock_meta().1.len,
        }
    }

    /// The in-memory file, for a file in memory.
    #[cfg(test)]
    pub fn mem_file(&self) -> Option<&PageFile> {
        match &self.data {
            Data::Mem { file, .. } => Some(file),
            Data::Disk(_) => None,
        }
    }
}

impl DiskFile {
    fn new(path: PathBuf, meta: FileMeta) -> DiskFile {
        DiskFile { path, file: OnceLock::new(), meta: Mutex::new((None, Arc::new(meta))) }
    }

    fn lock_meta(&self) -> std::sync::MutexGuard<'_, SeenMeta> {
        self.meta.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The file, opened through `cache` on first use (two threads that race
    /// get the same file: the cache keeps one per path).
    fn open(&self, cache: &PageCache) -> lwbuf::Result<&CachedFile> {
        if let Some(f) = self.file.get() {
            return Ok(f);
        }
        let f = cache.open(&self.path)?;
        Ok(self.file.get_or_init(|| f))
    }

    /// The reply metadata of the file as `st` and `len` say it is (made
    /// again only when they change).
    fn meta_for(&self, name: &str, st: FileStat, len: u64) -> Arc<FileMeta> {
        let mut m = self.lock_meta();
        if m.0 != Some((st, len)) {
            let modified = SystemTime::UNIX_EPOCH
                + Duration::new(
                    (st.mtime_ns.max(0) / 1_000_000_000) as u64,
                    (st.mtime_ns.max(0) % 1_000_000_000) as u32,
                );
            *m = (Some((st, len)), Arc::new(FileMeta::new(name, len, modified)));
        }
        Arc::clone(&m.1)
    }
}

/// A file's reply metadata: borrowed from an in-memory file, shared with a
/// file on disk.
pub enum Meta<'a> {
    Mem(&'a FileMeta),
    Disk(Arc<FileMeta>),
}

impl Deref for Meta<'_> {
    type Target = FileMeta;
    fn deref(&self) -> &FileMeta {
        match self {
            Meta::Mem(m) => m,
            Meta::Disk(m) => m,
        }
    }
}

/// What a response body is sent from: an in-memory file, or a view of the
/// pages a request pinned in the page cache (released when it is dropped,
/// but for the holds a send keeps until the kernel is done).
pub enum Body<'a> {
    Mem(&'a PageFile),
    Pinned(PageFile),
}

impl Deref for Body<'_> {
    type Target = PageFile;
    fn deref(&self) -> &PageFile {
        match self {
            Body::Mem(f) => f,
            Body::Pinned(f) => f,
        }
    }
}

/// The answer to a `GET` or `HEAD` of a file: its metadata, the reply, and
/// for a `GET` with a body, what to send it from.
pub struct Answer<'a> {
    pub meta: Meta<'a>,
    pub reply: Reply,
    pub body: Option<(Body<'a>, Range<u64>)>,
}

/// How many times a request of a file on disk looks again when the file
/// changes while its pages are pinned, before it answers 503.
const CHANGED_TRIES: usize = 4;

/// The files, by name. A clone shares the pages (a hold on each, no bytes
/// copied) and the page cache.
#[derive(Clone)]
pub struct FileSet {
    pub mem: PhysMem,
    pub files: Vec<Entry>,
    by_name: HashMap<String, usize>,
    /// The page cache of the files on disk.
    pub cache: Option<PageCache>,
}

impl FileSet {
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).map(|&i| &self.files[i])
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(Entry::len).sum()
    }

    fn new(mem: PhysMem, files: Vec<Entry>, cache: Option<PageCache>) -> FileSet {
        let by_name = files.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect();
        FileSet { mem, files, by_name, cache }
    }

    /// Decide the answer to a `GET` (`get`) or `HEAD` of `e` under the
    /// request's conditions, and for a body, get its pages: an in-memory
    /// file as it is (no allocation); a file on disk through the page cache,
    /// pinned (`CachedFile::pages`) for the send.
    ///
    /// A file on disk is looked at once per request (`revalidate`: one
    /// `stat`) after its pages are pinned, and the answer is made again if
    /// the file changed meanwhile (its generation moved, or its stat); so the length, validators and pinned
    /// bytes of an answer are of one version of the file (pages cached
    /// since the last change, read from disk after it). Errors: 404 for a
    /// file gone from disk; 503 when no frame can be had (every page is
    /// pinned), when the file keeps changing, or on a read error.
    pub fn answer<'a>(&'a self, e: &'a Entry, get: bool, cond: &Conditions<'_>) -> Result<Answer<'a>, Status> {
        let d = match &e.data {
            Data::Mem { file, meta } => {
                let reply = http::reply(get, cond, meta);
                let body = reply.body(meta).filter(|_| get).map(|r| (Body::Mem(file), r));
                return Ok(Answer { meta: Meta::Mem(meta), reply, body });
            }
            Data::Disk(d) => d,
        };
        let cache = self.cache.as_ref().ok_or(Status::ServiceUnavailable)?;
        let f = d.open(cache).map_err(|err| disk_status(&e.name, &err))?;
        for _ in 0..CHANGED_TRIES {
            // The generation first, then the stat (a revalidation elsewhere
            // bumps the one, drops stale pages, then stores the other); the
            // stat's own length, so the two are of one version.
            let gen = f.generation();
            let st = f.stat();
            let len = st.len;
            let meta = d.meta_for(&e.name, st, len);
            let reply = http::reply(get, cond, &meta);
            let body = match reply.body(&meta).filter(|_| get) {
                None => None,
                Some(r) => {
                    let first = (r.start / self.mem.frame_size() as u64) as usize;
                    match f.pages(r.clone()).and_then(|p| PageFile::from_pages(&self.mem, p, first, len)) {
                        Ok(view) => Some((Body::Pinned(view), r)),
                        // Shorter than it was: look again.
                        Err(Error::FileChanged { .. } | Error::OutOfBounds { .. }) => {
                            f.revalidate().map_err(|err| disk_status(&e.name, &err))?;
                            continue;
                        }
                        Err(err) => return Err(disk_status(&e.name, &err)),
                    }
                }
            };
            f.revalidate().map_err(|err| disk_status(&e.name, &err))?;
            if f.generation() == gen && f.stat() == st && f.len() == len {
                return Ok(Answer { meta: Meta::Disk(meta), reply, body });
            }
        }
        Err(Status::ServiceUnavailable)
    }

    /// Counters of the page cache, if the files are on disk.
    pub fn cache_stats(&self) -> Option<lwbuf::pagecache::PageCacheStats> {
        self.cache.as_ref().map(PageCache::stats)
    }

    /// Files of sizes log-uniform in `min..=max` (page-cache runs of at most
    /// `max_run` pages) until they add up to `total` bytes, with pattern
    /// contents.
    /// `huge`: in huge pages ([`lwbuf::Backing::HugeTlb`]), the frames
    /// rounded up to whole huge pages.
    pub fn generate(min: u64, max: u64, total: u64, max_run: usize, seed: u64, huge: bool) -> lwbuf::Result<FileSet> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (lmin, lmax) = ((min as f64).ln(), (max as f64).ln());
        let mut sizes = Vec::new();
        let mut sum = 0;
        while sum < total || sizes.is_empty() {
            let s = if min == max { min } else { rng.gen_range(lmin..=lmax).exp().round() as u64 };
            let s = s.clamp(min, max);
            sizes.push(s);
            sum += s;
        }
        let fs = lwbuf::system_page_size() as u64;
        let frames: u64 = sizes.iter().map(|s| s.div_ceil(fs)).sum::<u64>() + 64;
        let mut b = PhysMem::builder().name("parallel_sendfile");
        let frames = if huge {
            b = b.backing(lwbuf::Backing::HugeTlb);
            let per = (lwbuf::huge_page_size()? as u64 / fs).max(1);
            frames.div_ceil(per) * per
        } else {
            frames
        };
        let mem = b.frames(frames as usize).build()?;
        let mut files = Vec::with_capacity(sizes.len());
        let now = SystemTime::now();
        for (i, &len) in sizes.iter().enumerate() {
            let fseed = seed.wrapping_mul(0x9E37_79B9).wrapping_add(i as u64);
            let file = PageFile::builder(&mem).max_run(max_run).pattern(len, fseed)?;
            let name = format!("f{i:05}");
            let meta = FileMeta::new(&name, len, now);
            files.push(Entry { name, seed: Some(fseed), data: Data::Mem { file, meta } });
        }
        Ok(FileSet::new(mem, files, None))
    }

    /// The same files written to `dir` (created if need be), served from
    /// there through a page cache of `mem_mib` MiB: the generated set on
    /// disk, with the same names and seeds (clients verify it alike).
    pub fn on_disk(&self, dir: &Path, mem_mib: u64) -> Result<FileSet, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        for e in &self.files {
            let path = dir.join(&e.name);
            let mut out = std::fs::File::create(&path).map_err(|err| format!("{}: {err}", path.display()))?;
            let seed = e.seed.ok_or_else(|| format!("{}: not a generated file", e.name))?;
            let (len, pat) = (e.len(), Pattern::new(seed));
            let mut off = 0;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                pat.fill(off, &mut buf[..n]);
                out.write_all(&buf[..n]).map_err(|err| format!("{}: {err}", path.display()))?;
                off += n as u64;
            }
        }
        let mut set = FileSet::open_dir(dir, mem_mib)?;
        for e in &mut set.files {
            e.seed = self.get(&e.name).and_then(|g| g.seed);
        }
        Ok(set)
    }

    /// Every regular file under `dir` (as [`load_dir`](Self::load_dir)
    /// finds them), served from disk through a page cache of `mem_mib` MiB:
    /// a `PhysMem` of that size, all of it the cache's budget. Only the
    /// names, paths and stat of the files are kept at start; each file is
    /// opened through the cache on its first request.
    pub fn open_dir(dir: &Path, mem_mib: u64) -> Result<FileSet, String> {
        if mem_mib == 0 {
            return Err("--mem-mib must be at least 1".into());
        }
        let found = find_files(dir)?;
        let frames = usize::try_from((mem_mib << 20) / lwbuf::system_page_size() as u64)
            .map_err(|_| "--mem-mib is too large".to_string())?;
        let mem = PhysMem::builder()
            .frames(frames)
            .name("parallel_sendfile-pagecache")
            .build()
            .map_err(|e| format!("memory of {mem_mib} MiB: {e}"))?;
        let cache = PageCache::builder(&mem).build().map_err(|e| format!("page cache: {e}"))?;
        let files = found
            .into_iter()
            .map(|(name, path, m)| {
                let meta = FileMeta::new(&name, m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH));
                Entry { data: Data::Disk(Arc::new(DiskFile::new(path, meta))), name, seed: None }
            })
            .collect();
        Ok(FileSet::new(mem, files, Some(cache)))
    }

    /// Every regular file under `dir` (recursively; symlinks only if they
    /// resolve to a regular file inside `dir`), keyed by its path relative to
    /// `dir` with `/` separators. Refuses more than `max_bytes` in all.
    pub fn load_dir(dir: &Path, max_bytes: u64, max_run: usize) -> Result<FileSet, String> {
        let found = find_files(dir)?;
        let total: u64 = found.iter().map(|(_, _, m)| m.len()).sum();
        if total > max_bytes {
            return Err(format!(
                "{} holds {} MiB, more than --max-mib {}",
                dir.display(),
                total >> 20,
                max_bytes >> 20
            ));
        }
        let fs = lwbuf::system_page_size() as u64;
        let frames: u64 = found.iter().map(|(_, _, m)| m.len().div_ceil(fs)).sum::<u64>() + 64;
        let mem = PhysMem::builder()
            .frames(frames as usize)
            .name("parallel_sendfile-serve")
            .build()
            .map_err(|e| e.to_string())?;
        let mut files = Vec::with_capacity(found.len());
        for (name, path, m) in found {
            let mut b = PageFile::builder(&mem);
            if max_run > 0 {
                b = b.max_run(max_run);
            }
            let modified = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            match b.path(&path) {
                Ok(file) => {
                    let meta = FileMeta::new(&name, file.len(), modified);
                    files.push(Entry { name, seed: None, data: Data::Mem { file, meta } })
                }
                Err(e) => eprintln!("skipping {}: {e}", path.display()),
            }
        }
        Ok(FileSet::new(mem, files, None))
    }
}

/// The status of a request whose file on disk could not be read: 404 if it
/// is gone, else 503 (the first such error of the process is logged).
fn disk_status(name: &str, err: &Error) -> Status {
    if err.errno() == Some(libc::ENOENT) {
        return Status::NotFound;
    }
    static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!("{name}: {err} (answered 503; later errors are not logged)");
    }
    Status::ServiceUnavailable
}

/// Every regular file under `dir`, sorted by key (see
/// [`FileSet::load_dir`]).
fn find_files(dir: &Path) -> Result<Vec<(String, PathBuf, std::fs::Metadata)>, String> {
    let root = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
    if !root.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let mut found = Vec::new();
    walk(&root, &root, "", 0, &mut found)?;
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

fn walk(
    root: &Path,
    dir: &Path,
    prefix: &str,
    depth: usize,
    out: &mut Vec<(String, PathBuf, std::fs::Metadata)>,
) -> Result<(), String> {
    if depth > 32 {
        return Ok(());
    }
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for ent in rd.flatten() {
        let Some(name) = ent.file_name().to_str().map(str::to_owned) else {
            eprintln!("skipping a name that is not UTF-8 in {}", dir.display());
            continue;
        };
        let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        let path = ent.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let ft = meta.file_type();
        if ft.is_dir() {
            walk(root, &path, &key, depth + 1, out)?;
        } else if ft.is_file() {
            out.push((key, path, meta));
        } else if ft.is_symlink() {
            // Only links that stay inside the directory, to regular files.
            match path.canonicalize() {
                Ok(real) if real.starts_with(root) => match std::fs::metadata(&real) {
                    Ok(m) if m.is_file() => out.push((key, real, m)),
                    _ => eprintln!("skipping symlink {key}: not a regular file"),
                },
                _ => eprintln!("skipping symlink {key}: it leads out of the directory"),
            }
        }
    }
    Ok(())
}
