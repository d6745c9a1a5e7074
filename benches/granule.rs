//! What a granule miss and its eviction cost the caches per 4 KiB page,
//! beside the raw mapping cycle they stand in for (`common/raw.rs`, the
//! `map_cycle_raw` group of `benches/baseline.rs`).
//!
//! - `granule_miss`: an lwbuf system (one CPU) and an sf_buf pool, each
//!   with a mapping granule of G frames over a window of two granules and
//!   `max_excess(1)`, going round the granules of 64 MiB of populated
//!   memory (32 MiB of huge pages for `_g512_huge`). Per granule: `alloc`
//!   each of its G pages in turn (the first a miss that maps the granule,
//!   whose release evicts the granule before last; the other G-1 hits),
//!   read one word of each through the handle, drop it. Time per page. `lwbuf_strict_gG`
//!   and `sfbuf_strict_gG` with `Reclaim::Strict` (the eviction remaps the
//!   old granule `PROT_NONE`: the raw `strict` cycle); `..._lazy_gG` with
//!   `Reclaim::Lazy` (the miss maps over the evicted granule in place: the
//!   raw `in_place` cycle). G in {1, 16, 64, 512}, and a huge page (512
//!   frames) when 32 huge pages are free. `lwbuf_run_...` and
//!   `sfbuf_run_...`: the same granules taken as one run each
//!   (`alloc_run` of the granule's G pages: one handle, one word read of
//!   each page), where the miss is spread over the pages without a hit
//!   per page. `lwbuf_local_...`: the per-page cycle through the scoped
//!   `CpuGuard::map_local` (no handle) instead of `alloc`.
//!
//! After the groups, the summary measures each library cycle and its raw
//! cycle side by side (alternating rounds, median per-round ratio; the raw
//! cycle maps the library's own memfd, so both touch the same frames, and
//! an A/A line shows what a memfd of its own would have moved) and
//! checks the target: the strict cycle at most 1.2x the raw strict cycle
//! per page. The lazy cycle beside the raw in-place cycle is reported, with
//! the system calls each cycle made per granule. Also reported, per
//! configuration: where the per-page strict cycles of sf_buf and lwbuf
//! spend a granule (the miss, the first read, the first release with its
//! eviction, the other pages).
//!
//! `cargo bench --bench granule`; `LWBUF_BENCH_CLOCK=cpu` times by the
//! thread's CPU time (groups end in `_cpu`). Huge pages: as root,
//! `echo 32 > /proc/sys/vm/nr_hugepages` (and put the old value back after).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::Criterion;
use lwbuf::{Backing, CpuGuard, Lwbufs, MmuStats, Page, PhysMem, Reclaim, SfPool, Wait, Window};

mod common;
#[path = "common/floor.rs"]
mod floor;
#[path = "common/raw.rs"]
mod raw;

use common::median_ns;
use floor::Floor;
use raw::{Config, Cycle, RawMap};

const GROUP: &str = "granule_miss";
const RAW_GROUP: &str = "map_cycle_raw";
/// Huge pages needed: the library's memory, which the raw cycle shares,
/// and in the summary the raw cycle's own memfd for its A/A line.
const HUGE_NEEDED: usize = 2 * raw::HUGE_PAGES;

/// The library's memory for one configuration: every frame allocated (in
/// order) and written once, as the raw cycle's memfd is.
struct Memory {
    mem: PhysMem,
    pages: Vec<Page>,
    granule: usize,
}

impl Memory {
    fn new(cfg: Config) -> Memory {
        let frames = cfg.bytes() / raw::PAGE;
        let backing = if cfg.huge { Backing::HugeTlb } else { Backing::Memfd };
        let mem = PhysMem::builder().frames(frames).backing(backing).name("lwbuf-granule").build().expect("PhysMem");
        let pages = mem.alloc_run(frames).expect("frames");
        for p in &pages {
            p.direct().expect("direct map").write_u64(0, p.pfn().0 as u64).expect("write");
        }
        Memory { mem, pages, granule: cfg.granule }
    }

    fn window(&self) -> Arc<Window> {
        Arc::new(Window::builder(&self.mem).slots(2 * self.granule).build().expect("Window"))
    }

    fn lwbufs(&self, reclaim: Reclaim) -> Lwbufs {
        Lwbufs::builder(self.window())
            .cpus(1)
            .granule(self.granule)
            .max_excess(1)
            .reclaim(reclaim)
            .build()
            .expect("Lwbufs")
    }

    fn pool(&self, reclaim: Reclaim) -> SfPool {
        SfPool::builder(self.window()).granule(self.granule).max_excess(1).reclaim(reclaim).build().expect("SfPool")
    }

    /// The pages of granule `k` (round the memory).
    #[inline(always)]
    fn granule_pages(&self, k: usize) -> &[Page] {
        let first = (k % (self.pages.len() / self.granule)) * self.granule;
        &self.pages[first..first + self.granule]
    }

    /// Granule `k` through the calling thread's CPU of `lw`: every page
    /// allocated, one word read, released.
    #[inline(always)]
    fn lw_cycle(&self, lw: &Lwbufs, k: usize) -> u64 {
        lw_pages(lw, self.granule_pages(k))
    }

    /// Granule `k` through `cpu`'s `map_local`, a page at a time, one word
    /// read of each (the scoped form of [`lw_cycle`](Self::lw_cycle)).
    #[inline(always)]
    fn local_cycle(&self, cpu: &CpuGuard<'_>, k: usize) -> u64 {
        let mut sum = 0u64;
        for p in self.granule_pages(k) {
            sum = sum.wrapping_add(cpu.map_local(p, |kva| kva.read_u64(0).expect("read")).expect("map_local"));
        }
        sum
    }

    /// Granule `k` through `lw` as one run: one handle for its G pages
    /// (`alloc_run`), one word read of each.
    #[inline(always)]
    fn lw_run_cycle(&self, lw: &Lwbufs, k: usize) -> u64 {
        let h = lw.alloc_run(self.granule_pages(k)).expect("alloc_run");
        let kva = h.kva().expect("kva");
        (0..self.granule).fold(0u64, |sum, i| sum.wrapping_add(kva.read_u64(i * raw::PAGE).expect("read")))
    }

    /// Granule `k` through `pool` as one run, as [`lw_run_cycle`](Self::lw_run_cycle).
    #[inline(always)]
    fn sf_run_cycle(&self, pool: &SfPool, k: usize) -> u64 {
        let h = pool.alloc_run(self.granule_pages(k), Wait::NoWait).expect("alloc_run");
        let kva = h.kva();
        (0..self.granule).fold(0u64, |sum, i| sum.wrapping_add(kva.read_u64(i * raw::PAGE).expect("read")))
    }

    /// Granule `k` through `pool`, as [`lw_cycle`](Self::lw_cycle).
    #[inline(always)]
    fn sf_cycle(&self, pool: &SfPool, k: usize) -> u64 {
        sf_pages(pool, self.granule_pages(k))
    }
}

/// `pages` through `lw`, a handle at a time: each allocated, one word read,
/// released.
#[inline(always)]
fn lw_pages(lw: &Lwbufs, pages: &[Page]) -> u64 {
    let mut sum = 0u64;
    for p in pages {
        let h = lw.alloc(p).expect("alloc");
        sum = sum.wrapping_add(h.kva().expect("kva").read_u64(0).expect("read"));
    }
    sum
}

/// `pages` through `pool`, as [`lw_pages`].
#[inline(always)]
fn sf_pages(pool: &SfPool, pages: &[Page]) -> u64 {
    let mut sum = 0u64;
    for p in pages {
        let h = pool.alloc(p, Wait::NoWait).expect("alloc");
        sum = sum.wrapping_add(h.kva().read_u64(0).expect("read"));
    }
    sum
}

/// Which cache and API, for the benchmark ids and the summary: a handle
/// per page (`alloc`), or one per granule (`alloc_run`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cache {
    Lwbuf,
    LwbufLocal,
    SfBuf,
    LwbufRun,
    SfBufRun,
}

impl Cache {
    fn name(self) -> &'static str {
        match self {
            Cache::Lwbuf => "lwbuf",
            Cache::LwbufLocal => "lwbuf_local",
            Cache::SfBuf => "sfbuf",
            Cache::LwbufRun => "lwbuf_run",
            Cache::SfBufRun => "sfbuf_run",
        }
    }

    fn run(self) -> bool {
        matches!(self, Cache::LwbufRun | Cache::SfBufRun)
    }
}

fn reclaim_name(r: Reclaim) -> &'static str {
    match r {
        Reclaim::Strict => "strict",
        Reclaim::Lazy => "lazy",
    }
}

/// The raw cycle a library cycle stands in for.
fn raw_cycle(r: Reclaim) -> Cycle {
    match r {
        Reclaim::Strict => Cycle::Strict,
        Reclaim::Lazy => Cycle::InPlace,
    }
}

/// `G=16`, `G=512 hugetlb`: a configuration in the summary.
fn label(cfg: Config) -> String {
    format!("G={}{}", cfg.granule, if cfg.huge { " hugetlb" } else { "" })
}

fn id(cache: Cache, r: Reclaim, cfg: Config) -> String {
    format!("{}_{}_{}", cache.name(), reclaim_name(r), cfg.id())
}

const RECLAIMS: [Reclaim; 2] = [Reclaim::Strict, Reclaim::Lazy];
const CACHES: [Cache; 5] = [Cache::Lwbuf, Cache::SfBuf, Cache::LwbufRun, Cache::SfBufRun, Cache::LwbufLocal];

/// A cache under test (boxed: the two differ much in size), and which of
/// its cycles.
enum Lib {
    Lw(Box<Lwbufs>, Cache),
    Sf(Box<SfPool>, bool),
}

impl Lib {
    fn new(m: &Memory, cache: Cache, r: Reclaim) -> Lib {
        match cache {
            Cache::Lwbuf | Cache::LwbufLocal | Cache::LwbufRun => Lib::Lw(Box::new(m.lwbufs(r)), cache),
            Cache::SfBuf | Cache::SfBufRun => Lib::Sf(Box::new(m.pool(r)), cache.run()),
        }
    }

    /// Granule `k` of `m`; for lwbuf, on the calling thread's CPU, whose
    /// guard `cpu` is.
    #[inline(always)]
    fn cycle(&self, m: &Memory, k: usize, cpu: Option<&CpuGuard<'_>>) -> u64 {
        match self {
            Lib::Lw(lw, Cache::LwbufRun) => m.lw_run_cycle(lw, k),
            Lib::Lw(_, Cache::LwbufLocal) => m.local_cycle(cpu.expect("bound"), k),
            Lib::Lw(lw, _) => m.lw_cycle(lw, k),
            Lib::Sf(pool, false) => m.sf_cycle(pool, k),
            Lib::Sf(pool, true) => m.sf_run_cycle(pool, k),
        }
    }

    fn mmu_stats(&self) -> MmuStats {
        match self {
            Lib::Lw(lw, _) => lw.mmu().stats(),
            Lib::Sf(pool, _) => pool.mmu().stats(),
        }
    }
}

fn granule_miss(c: &mut Criterion) {
    let mut g = c.benchmark_group(raw::group(GROUP));
    g.sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for cfg in raw::configs(HUGE_NEEDED, GROUP) {
        let m = Memory::new(cfg);
        for cache in CACHES {
            for r in RECLAIMS {
                let lib = Lib::new(&m, cache, r);
                let cpu0 = if let Lib::Lw(lw, _) = &lib { Some(lw.bind(0).expect("bind")) } else { None };
                let mut k = 0;
                // iter_custom divided by G: the reported time is per page.
                g.bench_function(id(cache, r, cfg), |b| {
                    b.iter_custom(|iters| {
                        let t = raw::now();
                        for _ in 0..iters {
                            k += 1;
                            black_box(lib.cycle(&m, k, cpu0.as_ref()));
                        }
                        (raw::now() - t) / cfg.granule as u32
                    })
                });
            }
        }
    }
    g.finish();
}

// === the summary ===

/// The MMU calls per granule of a library cycle, from its statistics.
fn calls_per_granule(d: &MmuStats, granules: usize) -> String {
    let per = |n: u64| n as f64 / granules as f64;
    format!("{:.2} maps ({:.2} in place), {:.2} removes per granule", per(d.enters), per(d.replaces), per(d.removes))
}

fn summary() {
    let show = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1} ns"));
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let (gl, gr) = (raw::group(GROUP), raw::group(RAW_GROUP));
    let clock = if raw::cpu_clock() { "the thread's CPU time" } else { "wall time" };
    println!("\n== granule bench summary ({clock}; per 4 KiB page)");
    let cfgs = raw::configs(HUGE_NEEDED, "granule summary");
    println!("criterion medians (the raw cycle from `cargo bench --bench baseline -- map_cycle_raw`, if run):");
    for &cfg in &cfgs {
        let mut line = format!("  {}:", label(cfg));
        for cache in CACHES {
            for r in RECLAIMS {
                line += &format!(" {} {} {},", cache.name(), reclaim_name(r), show(median_ns(&gl, &id(cache, r, cfg))));
            }
        }
        for how in [Cycle::Strict, Cycle::InPlace] {
            line += &format!(" raw {} {},", how.name(), show(median_ns(&gr, &format!("{}_{}", how.name(), cfg.id()))));
        }
        println!("{}", line.trim_end_matches(','));
    }

    const ROUNDS: usize = 21;
    println!("side by side ({ROUNDS} alternating rounds; medians, and the median per-round ratio):");
    let ns = || raw::now().as_nanos() as f64;
    for &cfg in &cfgs {
        let m = Memory::new(cfg);
        // The raw cycle maps the library's own memfd: the same frames in
        // the same state (see `RawMap::sharing`).
        let fd = m.mem.memfd().expect("a memfd backing");
        let mut rawm = RawMap::sharing(fd, cfg.bytes(), cfg.granule).expect("raw window");
        // Pages per round and side: whole passes round the memory (at
        // least ~10 ms of small-page cycles), so that every granule either
        // side maps was last mapped one round before, by one side or the
        // other: neither finds its pages warmer in the caches.
        let pages = cfg.bytes() / raw::PAGE * if cfg.huge { 16 } else { 1 };
        let iters = (pages / cfg.granule).max(1);
        println!("  {}:", label(cfg));
        {
            // A/A: the same raw cycle over a memfd of its own, as this
            // bench measured it before: what placement alone moves.
            let mut own = RawMap::for_config(cfg).expect("raw memfd and window");
            let p = common::paired(ROUNDS, iters, ns, |_| own.cycle(Cycle::Strict), |_| rawm.cycle(Cycle::Strict));
            let g = cfg.granule as f64;
            println!(
                "    A/A, raw strict over its own memfd: {:.1} ns / over the library's {:.1} ns = {:.2}x (reported)",
                p.a_ns / g,
                p.b_ns / g,
                p.ratio
            );
        }
        {
            // The floor: the raw cycle with the bare per-CPU protocol's hit
            // around each page's read (an entry per granule, its address
            // stored once per granule, as a miss would): the least a
            // per-page API adds, whatever its code.
            let floor = Floor::new(cfg.bytes() / (cfg.granule * raw::PAGE));
            // A second window over the same memfd for the plain side.
            let mut rawm2 = RawMap::sharing(fd, cfg.bytes(), cfg.granule).expect("raw window");
            let mut hit = |g: usize, win: *const u8, off: usize| {
                if off == 0 {
                    // SAFETY: the granule stays mapped at `win` until the
                    // cycle's last read of it, which is a page of it.
                    unsafe { floor.set_addr(g, win) };
                }
                floor.hit(g, off)
            };
            let p = common::paired(
                ROUNDS,
                iters,
                ns,
                |_| rawm.cycle_with(Cycle::Strict, &mut hit),
                |_| rawm2.cycle(Cycle::Strict),
            );
            let g = cfg.granule as f64;
            println!(
                "    floor, raw strict + the bare protocol's hit per page: {:.1} ns / raw strict {:.1} ns = {:.2}x (reported: the least a per-page API adds)",
                p.a_ns / g,
                p.b_ns / g,
                p.ratio
            );
        }
        breakdown(&m);
        for r in RECLAIMS {
            let how = raw_cycle(r);
            for cache in CACHES {
                let lib = Lib::new(&m, cache, r);
                let cpu0 = if let Lib::Lw(lw, _) = &lib { Some(lw.bind(0).expect("bind")) } else { None };
                let before = lib.mmu_stats();
                let p = common::paired(ROUNDS, iters, ns, |k| lib.cycle(&m, k, cpu0.as_ref()), |_| rawm.cycle(how));
                let d = lib.mmu_stats().since(&before);
                let g = cfg.granule as f64;
                let (a, b) = (p.a_ns / g, p.b_ns / g);
                let target = match r {
                    Reclaim::Strict => format!(" (target <= 1.2x: {})", verdict(p.ratio <= 1.2)),
                    Reclaim::Lazy => " (reported)".to_owned(),
                };
                println!(
                    "    {} {}: {a:.1} ns / raw {} {b:.1} ns = {:.2}x{target}; {}",
                    cache.name(),
                    reclaim_name(r),
                    how.name(),
                    p.ratio,
                    calls_per_granule(&d, ROUNDS * iters)
                );
            }
        }
    }
}

/// Where a page-at-a-time strict cycle spends a granule, sf_buf and lwbuf
/// in alternating rounds (reported): the first page's `alloc` (the miss
/// that maps the granule), its read, its release (the last release of a
/// fresh entry, which trims the LRU: the eviction of the granule before
/// last), and the other G - 1 pages (hits, reads, releases). ns per granule,
/// medians of the rounds, by wall time whatever the bench's clock (five
/// readings a granule: the thread's CPU clock is a system call). Each
/// reading waits for the instructions before it (the clock's read is
/// ordered on x86-64), so the parts add up to a little more than the
/// cycle's time, and the reads overlap less; a pair of readings costs
/// about 30 ns (the G=1 line's "other pages", where there are none).
fn breakdown(m: &Memory) {
    const ROUNDS: usize = 11;
    let pool = m.pool(Reclaim::Strict);
    let lw = m.lwbufs(Reclaim::Strict);
    let _cpu0 = lw.bind(0).expect("bind");
    let granules = m.pages.len() / m.granule;
    let t0 = std::time::Instant::now();
    let ns = || t0.elapsed().as_nanos() as f64;
    // [side][part]: per round, ns per granule.
    let mut parts: [[Vec<f64>; 4]; 2] = Default::default();
    let (mut k, mut sum) = (0usize, 0u64);
    for round in 0..ROUNDS {
        for i in 0..2 {
            // Alternate which side goes first.
            let side = (i + round) % 2;
            let mut t = [0f64; 4];
            for _ in 0..granules {
                k += 1;
                let pages = m.granule_pages(k);
                let (a, b, c, d, e);
                if side == 0 {
                    a = ns();
                    let h = pool.alloc(&pages[0], Wait::NoWait).expect("alloc");
                    b = ns();
                    sum = sum.wrapping_add(h.kva().read_u64(0).expect("read"));
                    c = ns();
                    drop(h);
                    d = ns();
                    sum = sum.wrapping_add(sf_pages(&pool, &pages[1..]));
                    e = ns();
                } else {
                    a = ns();
                    let h = lw.alloc(&pages[0]).expect("alloc");
                    b = ns();
                    sum = sum.wrapping_add(h.kva().expect("kva").read_u64(0).expect("read"));
                    c = ns();
                    drop(h);
                    d = ns();
                    sum = sum.wrapping_add(lw_pages(&lw, &pages[1..]));
                    e = ns();
                }
                for (part, (from, to)) in [(a, b), (b, c), (c, d), (d, e)].into_iter().enumerate() {
                    t[part] += to - from;
                }
            }
            for (part, v) in t.iter().enumerate() {
                parts[side][part].push(v / granules as f64);
            }
        }
    }
    black_box(sum);
    let names = ["first alloc (miss)", "first read", "first release (trim)", "the other pages"];
    let mut line = "    breakdown per granule, sfbuf / lwbuf (reported):".to_owned();
    for (part, name) in names.iter().enumerate() {
        let (a, b) = (common::median(&mut parts[0][part]), common::median(&mut parts[1][part]));
        line += &format!(" {name} {a:.0} / {b:.0} ns,");
    }
    println!("{}", line.trim_end_matches(','));
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    granule_miss(&mut c);
    c.final_summary();
    // Only a real measurement run has estimates to summarize (`cargo test`
    // runs each benchmark once in test mode).
    if std::env::args().any(|a| a == "--bench") {
        summary();
    }
}
