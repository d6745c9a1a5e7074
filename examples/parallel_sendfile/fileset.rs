//! The files a server serves: generated (for the benchmark) or loaded from a
//! directory (for `serve`), all in one `PhysMem`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use lwbuf::sendfile::PageFile;
use lwbuf::PhysMem;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::http::FileMeta;

/// One served file.
#[derive(Clone)]
pub struct Entry {
    /// The key requests name it by (`/KEY`).
    pub name: String,
    pub file: PageFile,
    /// The pattern seed of a generated file.
    pub seed: Option<u64>,
    /// Length, dates, entity tag and type, for the HTTP replies.
    pub meta: FileMeta,
}

/// The files, by name. A clone shares the pages (a hold on each, no bytes
/// copied).
#[derive(Clone)]
pub struct FileSet {
    pub mem: PhysMem,
    pub files: Vec<Entry>,
    by_name: HashMap<String, usize>,
}

impl FileSet {
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).map(|&i| &self.files[i])
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|e| e.file.len()).sum()
    }

    fn new(mem: PhysMem, files: Vec<Entry>) -> FileSet {
        let by_name = files.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect();
        FileSet { mem, files, by_name }
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
            files.push(Entry { name, file, seed: Some(fseed), meta });
        }
        Ok(FileSet::new(mem, files))
    }

    /// Every regular file under `dir` (recursively; symlinks only if they
    /// resolve to a regular file inside `dir`), keyed by its path relative to
    /// `dir` with `/` separators. Refuses more than `max_bytes` in all.
    pub fn load_dir(dir: &Path, max_bytes: u64, max_run: usize) -> Result<FileSet, String> {
        let root = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
        if !root.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        let mut found = Vec::new();
        walk(&root, &root, "", 0, &mut found)?;
        found.sort_by(|a, b| a.0.cmp(&b.0));
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
                    files.push(Entry { name, file, seed: None, meta })
                }
                Err(e) => eprintln!("skipping {}: {e}", path.display()),
            }
        }
        Ok(FileSet::new(mem, files))
    }
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
