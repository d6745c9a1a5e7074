//! Warm random 4 KiB reads from the page cache beside `pread(2)` of the
//! same bytes from the kernel's page cache.
//!
//! A 64 MiB file of a known pattern in the system's temporary directory,
//! read once whole through a [`PageCache`] whose budget holds all of it
//! (and so also resident in the kernel's page cache). Then, at random
//! page-aligned offsets (one xorshift sequence for both):
//!
//! - `pagecache_warm_4k/read_at`: [`CachedFile::read_at`] of 4 KiB (a hit:
//!   a map lookup, the entry's lock, a word copy out of the direct map; no
//!   system call);
//! - `pagecache_warm_4k/pread`: `pread(2)` of the same 4 KiB into the same
//!   buffer.
//!
//! The summary measures both side by side (alternating rounds, median
//! per-round ratio) and checks the target: `pread` at least 5x the cache's
//! read. `cargo bench --bench pagecache`.

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::Criterion;
use lwbuf::pagecache::{CachedFile, PageCache};
use lwbuf::PhysMem;

mod common;

const GROUP: &str = "pagecache_warm_4k";
const READ: usize = 4096;

/// The file's size: `LWBUF_BENCH_FILE_MIB` (default 64).
fn file_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        std::env::var("LWBUF_BENCH_FILE_MIB").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(64).clamp(1, 1 << 20)
            << 20
    })
}

struct Setup {
    dir: PathBuf,
    file: CachedFile,
    _cache: PageCache,
    plain: File,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup() -> Setup {
    let dir = std::env::temp_dir().join(format!("lwbuf-bench-pagecache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("data");
    let bytes: Vec<u8> =
        (0..file_bytes()).map(|i| (i as u64).wrapping_mul(0x9e37_79b9) as u8 ^ (i >> 12) as u8).collect();
    std::fs::write(&path, &bytes).expect("write the file");
    let mem = PhysMem::builder().frames(file_bytes() / 4096 + 64).build().expect("memory");
    let cache = PageCache::builder(&mem).build().expect("cache");
    let file = cache.open(&path).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..file_bytes()).step_by(buf.len()) {
        file.read_exact_at(off as u64, &mut buf).expect("warm read");
        assert_eq!(buf[..], bytes[off..off + buf.len()], "the cache read the file's bytes");
    }
    let plain = File::open(&path).expect("open plain");
    Setup { dir, file, _cache: cache, plain }
}

/// Page-aligned offset number `step` of one xorshift sequence.
fn offset(step: usize) -> u64 {
    let mut x = (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    (x % (file_bytes() / READ) as u64) * READ as u64
}

fn main() {
    let s = setup();
    let mut c = Criterion::default().configure_from_args().measurement_time(Duration::from_secs(3));
    let mut buf = [0u8; READ];
    {
        let mut g = c.benchmark_group(GROUP);
        let mut step = 0usize;
        g.bench_function("read_at", |b| {
            b.iter(|| {
                step += 1;
                black_box(s.file.read_at(offset(step), &mut buf).expect("read"))
            })
        });
        let mut step = 0usize;
        g.bench_function("pread", |b| {
            b.iter(|| {
                step += 1;
                black_box(s.plain.read_at(&mut buf, offset(step)).expect("pread"))
            })
        });
        g.finish();
    }
    c.final_summary();
    // Only a real measurement run summarizes (`cargo test` runs each
    // benchmark once in test mode, without `--bench`).
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let t0 = Instant::now();
    let clock = move || t0.elapsed().as_nanos() as f64;
    let mut b1 = [0u8; READ];
    let mut b2 = [0u8; READ];
    let p = common::paired(
        31,
        20_000,
        clock,
        |i| s.plain.read_at(&mut b1, offset(i)).expect("pread"),
        |i| s.file.read_at(offset(i), &mut b2).expect("read"),
    );
    // The floor: the same random 4 KiB copied straight from the frames
    // (held up front), with no lookup.
    let held = s.file.pages(0..file_bytes() as u64).expect("hold every page");
    let mut b3 = [0u8; READ];
    let copy = common::paired(
        31,
        20_000,
        clock,
        |i| held[(offset(i) / READ as u64) as usize].direct().expect("direct map").read_at(0, &mut b3).expect("copy"),
        |i| s.plain.read_at(&mut b1, offset(i)).expect("pread"),
    );
    drop(held);
    // Below any cache: a plain memcpy of the same 4 KiB from a private
    // copy of the file (no shared memory, no lookup).
    let private = std::fs::read(s.dir.join("data")).expect("read the file");
    let mut b4 = [0u8; READ];
    let memcpy = common::paired(
        31,
        20_000,
        clock,
        |i| {
            let o = offset(i) as usize;
            b4.copy_from_slice(&private[o..o + READ]);
            black_box(&b4);
        },
        |i| s.plain.read_at(&mut b1, offset(i)).expect("pread"),
    );
    let st = s._cache.stats();
    println!("\n== {GROUP}: side by side, 31 alternating rounds of 20,000 reads");
    println!(
        "pread(2) {:.0} ns, PageCache::read_at {:.0} ns: pread / read_at = {:.2}x (target >= 5x)",
        p.a_ns, p.b_ns, p.ratio
    );
    println!(
        "the floor, a word copy of the same 4 KiB straight from its frame: {:.0} ns (pread / copy = {:.2}x)",
        copy.a_ns,
        1.0 / copy.ratio
    );
    println!(
        "below any cache, memcpy of the same 4 KiB from a private buffer: {:.0} ns (pread / memcpy = {:.2}x)",
        memcpy.a_ns,
        1.0 / memcpy.ratio
    );
    println!("cache: {} hits, {} misses, {} resident", st.hits, st.misses, st.resident);
    println!(
        "criterion medians: read_at {:?} ns, pread {:?} ns",
        common::median_ns(GROUP, "read_at"),
        common::median_ns(GROUP, "pread")
    );
}
