//! The page cache's benchmarks that a criterion loop cannot take: a cold
//! sequential read of a large file beside `cat`, and sub-page write-back
//! beside whole-page write-back.
//!
//! ```text
//! cargo run --release --example pagecache_bench -- cold       # 1 GiB, 3 rounds; root (drops caches)
//! cargo run --release --example pagecache_bench -- writeback  # 10,000 pages, 5 rounds
//! ```
//!
//! Both alternate candidate and baseline round by round and report medians
//! and the median of the per-round ratios. Files go to `--dir` (default the
//! system's temporary directory) and are removed at the end.
//!
//! - `cold`: before each timed read, `sync` and `echo 3 >
//!   /proc/sys/vm/drop_caches`, so both read from the disk. The baseline is
//!   `cat FILE > /dev/null`; the candidate reads the file front to back
//!   through a [`PageCache`] (budget `--budget-mib`, default 64) in
//!   `--chunk-kib` (default 128) pieces, with readahead; `--fill direct`
//!   fills with `O_DIRECT` ([`DirectFileIo`]) instead of buffered `preadv`. Without permission
//!   to drop the caches it says so and stops (nothing measured would be
//!   cold).
//! - `writeback`: a file of `--pages` 4 KiB pages, all cached; one byte
//!   of each page written through the cache, then `flush` (and `fsync`,
//!   timed apart). Candidate: 512-byte blocks; baseline: 4096-byte blocks
//!   (whole pages). Bytes written are read from the cache's statistics and
//!   from `/proc/self/io` (`wchar`: bytes passed to write calls;
//!   `write_bytes`: bytes the kernel sent to the disk for this process,
//!   whole kernel pages).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use std::sync::Arc;

use lwbuf::pagecache::{DirectFileIo, FileIo, PageCache, SysFileIo};
use lwbuf::PhysMem;

#[derive(Parser)]
#[command(about = "Page cache benchmarks: cold sequential read beside cat, sub-page write-back")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
    /// Where the test files go (default: the system's temporary directory).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    /// Rounds (each: candidate and baseline, in alternating order).
    #[arg(long, global = true)]
    rounds: Option<usize>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cold sequential read through the cache beside `cat FILE > /dev/null`.
    Cold {
        /// The file's size in MiB.
        #[arg(long, default_value_t = 1024)]
        file_mib: usize,
        /// The cache's frame budget in MiB.
        #[arg(long, default_value_t = 64)]
        budget_mib: usize,
        /// Bytes per read call, in KiB.
        #[arg(long, default_value_t = 128)]
        chunk_kib: usize,
        /// The cache's largest readahead, in pages.
        #[arg(long, default_value_t = lwbuf::pagecache::DEFAULT_READAHEAD)]
        readahead: usize,
        /// Write the cached pages to /dev/null straight from the frames (as
        /// cat does with what it reads) instead of copying them into a buffer.
        #[arg(long)]
        to_null: bool,
        /// How fills read: `buffered` (preadv through the kernel's page
        /// cache, the default) or `direct` (O_DIRECT, cached once).
        #[arg(long, default_value = "buffered")]
        fill: String,
    },
    /// Dirty one byte in each page, then write back: 512-byte blocks beside whole pages.
    Writeback {
        /// Pages in the file (4 KiB each).
        #[arg(long, default_value_t = 10_000)]
        pages: usize,
    },
}

/// Removes the directory it names when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(base: Option<PathBuf>) -> std::io::Result<TempDir> {
    let d = base.unwrap_or_else(std::env::temp_dir).join(format!("lwbuf-pagecache-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(TempDir(d))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let dir = temp_dir(args.dir)?;
    match args.cmd {
        Cmd::Cold { file_mib, budget_mib, chunk_kib, readahead, to_null, fill } => {
            let io: Arc<dyn FileIo> = match fill.as_str() {
                "buffered" => Arc::new(SysFileIo),
                "direct" => Arc::new(DirectFileIo),
                other => return Err(format!("--fill {other}: expected buffered or direct").into()),
            };
            cold(&dir.0, ColdRun { file_mib, budget_mib, chunk_kib, readahead, to_null, io }, args.rounds.unwrap_or(3))
        }
        Cmd::Writeback { pages } => writeback(&dir.0, pages, args.rounds.unwrap_or(5)),
    }
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`.
fn drop_caches() -> std::io::Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")
}

fn write_file(path: &Path, bytes: usize) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut chunk = vec![0u8; 1 << 20];
    let mut off = 0usize;
    while off < bytes {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = ((off + i) as u64).wrapping_mul(0x9e37_79b9).to_le_bytes()[3];
        }
        let n = chunk.len().min(bytes - off);
        f.write_all(&chunk[..n])?;
        off += n;
    }
    f.into_inner()?.sync_all()
}

/// What a cold run reads, and how.
struct ColdRun {
    file_mib: usize,
    budget_mib: usize,
    chunk_kib: usize,
    readahead: usize,
    to_null: bool,
    io: Arc<dyn FileIo>,
}

fn cold(dir: &Path, run: ColdRun, rounds: usize) -> Result<(), Box<dyn std::error::Error>> {
    let ColdRun { file_mib, budget_mib, chunk_kib, readahead, to_null, io } = run;
    let path = dir.join("cold");
    let bytes = file_mib.max(1) << 20;
    println!("writing {file_mib} MiB to {}", path.display());
    write_file(&path, bytes)?;
    if let Err(e) = drop_caches() {
        println!("cold: skipped: cannot drop the page caches ({e}); run as root so the reads are cold");
        return Ok(());
    }
    let chunk = chunk_kib.max(4) << 10;
    let mut cat_s = Vec::new();
    let mut ours_s = Vec::new();
    let mut ratios = Vec::new();
    let mut last_stats = None;
    for round in 0..rounds.max(1) {
        let run_cat = || -> Result<f64, Box<dyn std::error::Error>> {
            drop_caches()?;
            let t = Instant::now();
            let st = Command::new("cat").arg(&path).stdout(Stdio::null()).status()?;
            if !st.success() {
                return Err(format!("cat failed: {st}").into());
            }
            Ok(t.elapsed().as_secs_f64())
        };
        let mut run_ours = || -> Result<f64, Box<dyn std::error::Error>> {
            drop_caches()?;
            let mem = PhysMem::builder().frames((budget_mib.max(1) << 20) / 4096).build()?;
            let cache = PageCache::builder(&mem).readahead(readahead).io(io.clone()).build()?;
            let t = Instant::now();
            let file = cache.open(&path)?;
            let mut buf = vec![0u8; chunk];
            let mut off = 0u64;
            let mut sum = 0u64;
            if to_null {
                // What cat does with the bytes: write them to /dev/null,
                // here straight from the cached frames (one writev a chunk).
                let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
                let len = file.len();
                while off < len {
                    let end = (off + chunk as u64).min(len);
                    let pages = file.pages(off..end)?;
                    let views: Vec<_> = pages.iter().map(|p| p.direct()).collect::<Result<_, _>>()?;
                    let mut at = off;
                    let mut iov = Vec::with_capacity(views.len());
                    for v in &views {
                        let in_page = (at % 4096) as usize;
                        let n = (4096 - in_page).min((end - at) as usize);
                        iov.push(v.io_vec(in_page, n)?);
                        at += n as u64;
                    }
                    lwbuf::IoVec::write_all_vectored(&null, &mut &mut iov[..])?;
                    off = end;
                }
            } else {
                loop {
                    let n = file.read_at(off, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    sum = sum.wrapping_add(buf[n - 1] as u64);
                    off += n as u64;
                }
            }
            let secs = t.elapsed().as_secs_f64();
            if off != bytes as u64 {
                return Err(format!("read {off} bytes of {bytes}").into());
            }
            std::hint::black_box(sum);
            last_stats = Some(cache.stats());
            Ok(secs)
        };
        let (c, o) = if round % 2 == 0 {
            let c = run_cat()?;
            (c, run_ours()?)
        } else {
            let o = run_ours()?;
            (run_cat()?, o)
        };
        println!(
            "round {}: cat {:.0} MiB/s, page cache {:.0} MiB/s",
            round + 1,
            file_mib as f64 / c,
            file_mib as f64 / o
        );
        cat_s.push(c);
        ours_s.push(o);
        ratios.push(c / o);
    }
    let (c, o, r) = (median(&mut cat_s), median(&mut ours_s), median(&mut ratios));
    println!(
        "\n== cold sequential read of {file_mib} MiB, {} rounds: cat {:.0} MiB/s, page cache {:.0} MiB/s; \
         page cache / cat = {r:.2}x (target >= 0.8x)",
        cat_s.len(),
        file_mib as f64 / c,
        file_mib as f64 / o
    );
    if let Some(s) = last_stats {
        println!(
            "page cache (last round): {} misses, {} read calls, {} pages read ahead ({} used), {} evictions, budget {} frames",
            s.misses, s.reads, s.readahead_pages, s.readahead_hits, s.evictions, s.budget
        );
    }
    Ok(())
}

/// `wchar` and `write_bytes` of /proc/self/io.
fn proc_io() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let get = |k: &str| s.lines().find_map(|l| l.strip_prefix(k).and_then(|v| v.trim().parse().ok())).unwrap_or(0);
    (get("wchar:"), get("write_bytes:"))
}

struct WbRound {
    flush: Duration,
    fsync: Duration,
    stat_bytes: u64,
    wchar: u64,
    disk_bytes: u64,
    writes: u64,
}

fn writeback_round(
    path: &Path,
    pages: usize,
    block: usize,
    round: usize,
) -> Result<WbRound, Box<dyn std::error::Error>> {
    let mem = PhysMem::builder().frames(pages + 64).build()?;
    let cache = PageCache::builder(&mem).block_size(block).build()?;
    let file = cache.open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while file.read_at(off, &mut buf)? > 0 {
        off += buf.len() as u64;
    }
    for p in 0..pages {
        // A different byte each round, so every round really changes the file.
        file.write_at(p as u64 * 4096 + (p % 4096) as u64, &[(round + p) as u8 | 1])?;
    }
    let before = cache.stats();
    let (w0, d0) = proc_io();
    let t = Instant::now();
    file.flush()?;
    let flush = t.elapsed();
    let (w1, _) = proc_io();
    let t = Instant::now();
    file.fsync()?;
    let fsync = t.elapsed();
    let (_, d2) = proc_io();
    let after = cache.stats();
    Ok(WbRound {
        flush,
        fsync,
        stat_bytes: after.written_bytes - before.written_bytes,
        wchar: w1 - w0,
        disk_bytes: d2 - d0,
        writes: after.writes - before.writes,
    })
}

fn writeback(dir: &Path, pages: usize, rounds: usize) -> Result<(), Box<dyn std::error::Error>> {
    let path = dir.join("writeback");
    let pages = pages.max(1);
    write_file(&path, pages * 4096)?;
    let (mut sub, mut whole) = (Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        if round % 2 == 0 {
            sub.push(writeback_round(&path, pages, 512, round)?);
            whole.push(writeback_round(&path, pages, 4096, round)?);
        } else {
            whole.push(writeback_round(&path, pages, 4096, round)?);
            sub.push(writeback_round(&path, pages, 512, round)?);
        }
    }
    let report = |name: &str, v: &[WbRound]| {
        let mut fl: Vec<f64> = v.iter().map(|r| r.flush.as_secs_f64() * 1e3).collect();
        let mut fs: Vec<f64> = v.iter().map(|r| r.fsync.as_secs_f64() * 1e3).collect();
        let r = &v[0];
        println!(
            "{name}: flush {:.1} ms, fsync {:.1} ms (medians); written by the cache {} B in {} pwritev calls, \
             wchar {} B, kernel to disk {} B (first round)",
            median(&mut fl),
            median(&mut fs),
            r.stat_bytes,
            r.writes,
            r.wchar,
            r.disk_bytes
        );
        median(&mut fl)
    };
    println!("\n== write-back of 1 byte in each of {pages} pages, {} rounds", sub.len());
    let a = report("512-byte blocks ", &sub);
    let b = report("whole 4 KiB pages", &whole);
    let mut ratios: Vec<f64> =
        sub.iter().zip(&whole).map(|(s, w)| w.flush.as_secs_f64() / s.flush.as_secs_f64()).collect();
    println!(
        "bytes written: {} = {pages} x 512 ({}), whole pages {}; flush time whole / blocks = {:.2}x (median per round; medians {a:.1} / {b:.1} ms)",
        sub[0].stat_bytes,
        if sub.iter().all(|r| r.stat_bytes == pages as u64 * 512) { "exact in every round" } else { "NOT exact" },
        whole[0].stat_bytes,
        median(&mut ratios)
    );
    Ok(())
}
