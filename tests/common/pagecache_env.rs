//! What the page cache tests share: the two file systems a test runs on
//! (`MemFileIo` over heap frames, `SysFileIo` over real files in a fresh
//! temporary directory over memfd frames), file contents to check reads
//! against, and ways to change a file behind the cache.
//!
//! Included with `#[macro_use] #[path = "common/pagecache_env.rs"] mod env;`.

#![allow(dead_code, unused_macros)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lwbuf::pagecache::{FaultyFileIo, FileIo, MemFileIo, PageCache, PageCacheBuilder, SysFileIo};
use lwbuf::{Backing, PhysMem};

/// Which file system a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fs {
    /// `MemFileIo`: files in memory, frames on the heap; no system call.
    Mem,
    /// `SysFileIo`: real files in a temporary directory, memfd frames.
    Sys,
}

/// The file systems a test that loops over them runs on: under Miri only
/// `Mem` (real files and memfds need system calls Miri cannot run).
pub const FILE_SYSTEMS: &[Fs] = if cfg!(miri) { &[Fs::Mem] } else { &[Fs::Sys, Fs::Mem] };

/// A file system to run a test on, and the memory its cache takes frames
/// from. The temporary directory of `Fs::Sys` is removed on drop.
pub struct Env {
    pub fs: Fs,
    pub mem_io: Arc<MemFileIo>,
    pub dir: Option<PathBuf>,
    pub phys: PhysMem,
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

/// File bytes that are never zero (so zeros shown by mistake stand out),
/// different for each `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i + usize::from(seed) * 37) % 251) as u8 + 1).collect()
}

impl Env {
    /// A file system of kind `fs` and a memory of `frames` frames.
    pub fn new(fs: Fs, frames: usize) -> Env {
        let (dir, backing) = match fs {
            Fs::Mem => (None, Backing::Heap),
            Fs::Sys => {
                let n = DIRS.fetch_add(1, Ordering::Relaxed);
                let d = std::env::temp_dir().join(format!("lwbuf-pagecache-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&d);
                std::fs::create_dir_all(&d).expect("create the temporary directory");
                (Some(d), Backing::Memfd)
            }
        };
        let phys = PhysMem::builder().frames(frames).backing(backing).build().expect("build PhysMem");
        Env { fs, mem_io: Arc::new(MemFileIo::new()), dir, phys }
    }

    /// The page (frame) size.
    pub fn ps(&self) -> usize {
        self.phys.frame_size()
    }

    /// The path of file `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        match &self.dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }

    /// The file system the cache is built over.
    pub fn io(&self) -> Arc<dyn FileIo> {
        match self.fs {
            Fs::Mem => self.mem_io.clone(),
            Fs::Sys => Arc::new(SysFileIo),
        }
    }

    /// A fault injector over [`io`](Self::io), nothing armed.
    pub fn faulty(&self) -> Arc<FaultyFileIo> {
        Arc::new(FaultyFileIo::new(self.io()))
    }

    /// A cache builder over this memory and file system.
    pub fn builder(&self) -> PageCacheBuilder {
        PageCache::builder(&self.phys).io(self.io())
    }

    /// Create (or replace in place) file `name` holding `data`.
    pub fn put(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        match self.fs {
            Fs::Mem => self.mem_io.put(&p, data.to_vec()),
            Fs::Sys => std::fs::write(&p, data).expect("write the file"),
        }
        p
    }

    /// File `name`'s bytes on disk now.
    pub fn disk(&self, name: &str) -> Vec<u8> {
        let p = self.path(name);
        match self.fs {
            Fs::Mem => self.mem_io.get(&p).expect("the file exists"),
            Fs::Sys => std::fs::read(&p).expect("read the file"),
        }
    }

    /// Change file `name` in place (same inode) as another process would:
    /// `f` edits its bytes, and its modification time moves on.
    pub fn modify(&self, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
        let p = self.path(name);
        match self.fs {
            Fs::Mem => self.mem_io.modify(&p, f).expect("modify"),
            Fs::Sys => {
                let mut data = std::fs::read(&p).expect("read");
                f(&mut data);
                let file = OpenOptions::new().write(true).open(&p).expect("open");
                let old = file.metadata().expect("metadata").modified().expect("mtime");
                file.set_len(data.len() as u64).expect("set_len");
                file.write_all_at(&data, 0).expect("write");
                // A modification time of its own, whatever the clock's
                // granularity.
                let new = old.checked_add(Duration::from_secs(7)).unwrap_or(SystemTime::UNIX_EPOCH);
                file.set_modified(new).expect("set mtime");
            }
        }
    }

    /// Replace file `name` by a new inode holding `data` (a rename over it).
    pub fn replace(&self, name: &str, data: &[u8]) {
        let p = self.path(name);
        match self.fs {
            Fs::Mem => self.mem_io.put(&p, data.to_vec()),
            Fs::Sys => {
                let tmp = self.path(&format!("{name}.new"));
                std::fs::write(&tmp, data).expect("write");
                std::fs::rename(&tmp, &p).expect("rename");
            }
        }
    }

    /// Frames of the memory in use now.
    pub fn frames_used(&self) -> usize {
        let s = self.phys.stats();
        s.total - s.free
    }
}

/// Make `path` impossible to open for writing, even for root: the mode
/// 0444 and, where the file system allows, the immutable flag. `Err` says
/// why not.
pub fn make_read_only(path: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).map_err(|e| e.to_string())?;
    if OpenOptions::new().write(true).open(path).is_err() {
        return Ok(());
    }
    let f = File::open(path).map_err(|e| e.to_string())?;
    set_immutable(f.as_raw_fd(), true).map_err(|e| format!("the immutable flag cannot be set: {e}"))?;
    if OpenOptions::new().write(true).open(path).is_ok() {
        let _ = set_immutable(f.as_raw_fd(), false);
        return Err("the file can still be opened for writing".into());
    }
    Ok(())
}

const FS_IMMUTABLE_FL: libc::c_long = 0x10;

fn set_immutable(fd: std::os::fd::RawFd, on: bool) -> std::io::Result<()> {
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one `long` into `flags`, which lives
    // across the call.
    if unsafe { libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    flags = if on { flags | FS_IMMUTABLE_FL } else { flags & !FS_IMMUTABLE_FL };
    // SAFETY: FS_IOC_SETFLAGS reads one `long` from `flags`.
    if unsafe { libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            // Files made immutable by `make_read_only` cannot be removed
            // until the flag is cleared.
            if let Ok(rd) = std::fs::read_dir(d) {
                for e in rd.flatten() {
                    if let Ok(f) = File::open(e.path()) {
                        use std::os::fd::AsRawFd;
                        let _ = set_immutable(f.as_raw_fd(), false);
                    }
                }
            }
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Instantiate each test `fn name(Fs)` once per file system, as
/// `on_sys::name` and `on_mem::name`. Under Miri only the `Mem` half runs.
/// Attributes written before a name apply to its `Mem` half, e.g.
/// `#[cfg_attr(miri, ignore = "why")] name`.
macro_rules! on_both_file_systems {
    ($($(#[$mem_attr:meta])* $name:ident),* $(,)?) => {
        mod on_sys {
            $(
                #[test]
                #[cfg_attr(miri, ignore = "real files and memfds need system calls Miri cannot run")]
                fn $name() { super::$name(super::Fs::Sys) }
            )*
        }
        mod on_mem {
            $(
                #[test]
                $(#[$mem_attr])*
                fn $name() { super::$name(super::Fs::Mem) }
            )*
        }
    };
}
