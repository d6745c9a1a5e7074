//! Baselines: what mapping a page costs without any cache, and what reading
//! a frame through the direct map costs. Every time is per page.
//!
//! - `(a) enter+touch+remove/1 page`: one `mmap(MAP_FIXED)` of one frame into
//!   the real window, a first write (a minor fault), and the `PROT_NONE`
//!   remap that removes it.
//! - `..., second thread running`: the same while another thread of this
//!   process spins on another CPU (both pinned), so every unmap of a touched
//!   page needs a TLB-shootdown IPI to that CPU.
//! - `..., other process spinning (control)`: the same while a thread of
//!   *another* process spins on that CPU: the same competition for the
//!   machine, no shootdown. The difference from the line above is the cost
//!   of the shootdown itself.
//! - `(b) enter+touch+remove/run of 64, per page`: 64 contiguous frames in one
//!   call, each touched, removed in one call; the time is divided by 64. With
//!   the same two spinner variants.
//! - `map_prot/(d) in-place map of 512 frames ...`: a granule mapped
//!   straight over the previous one with a second thread running, in a
//!   read-write window and in a read-only one (`WindowBuilder::read_only`):
//!   what the dirty page-table entries of a writable shmem mapping cost at
//!   eviction.
//! - `(c) direct map read/8 B` and `/whole page`: a frame chosen at random
//!   from 1024, read through the direct map (no system call).
//! - `map_cycle_raw`: the C-equivalent mapping cycle with raw system calls
//!   (`common/raw.rs`): a granule of G frames of a populated memfd mapped
//!   with one `mmap(MAP_SHARED | MAP_FIXED)` into a reserved `PROT_NONE`
//!   window, one word of each 4 KiB page read, and the mapping taken out
//!   again, per 4 KiB page: `strict_gG` remaps it `PROT_NONE` (then the next
//!   granule maps into the reservation), `in_place_gG` maps the next granule
//!   straight over it. G in {1, 16, 64, 512}, and `_g512_huge` on a hugetlb
//!   memfd (one 2 MiB page per granule) when 16 huge pages are free. The
//!   granules are taken in turn round 64 MiB (32 MiB of huge pages): the
//!   pages stay in the page cache, every mapping is new. The library's
//!   cost on the same cycle is `benches/granule.rs`, which checks it
//!   against this one side by side. `LWBUF_BENCH_CLOCK=cpu` times this
//!   group by the thread's CPU time (group `map_cycle_raw_cpu`).
//!
//! `cargo bench --bench baseline` (`-- map_cycle_raw` for the raw cycle
//! only)

use std::hint::black_box;
use std::process::{Child, Command};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, BenchmarkGroup, Criterion, Throughput};
use lwbuf::{system_page_size, Mmu, Page, Pfn, PhysMem, Slot, Window};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::{getppid, Pid};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[path = "common/raw.rs"]
mod raw;

const FRAMES: usize = 1024;
const RUN: usize = 64;

/// Set in the environment of the control spinner: this same binary,
/// re-executed, spins instead of benchmarking.
const SPIN_ENV: &str = "LWBUF_BASELINE_SPIN_CPU";

// === what is measured ===

/// Write one byte at `p + off`: the first touch of a fresh mapping.
///
/// # Safety
/// `p + off` must be mapped writable.
#[inline(always)]
unsafe fn touch(p: NonNull<u8>, off: usize) {
    // SAFETY: mapped writable (contract). Volatile so the store happens.
    unsafe { p.as_ptr().add(off).write_volatile(1) };
}

/// One frame: enter at slot 0, touch, remove.
fn map_one(win: &Window, pfn: Pfn) {
    // SAFETY: the bench owns the window; slot 0 is empty between iterations.
    let p = unsafe { win.enter(Slot(0), pfn, 1) }.expect("enter");
    // SAFETY: slot 0 maps one frame.
    unsafe { touch(black_box(p), 0) };
    // SAFETY: `p` is not used after this.
    unsafe { win.remove(Slot(0), 1) }.expect("remove");
}

/// A run of `RUN` contiguous frames from `pfn`: one enter, touch each page,
/// one remove.
fn map_run(win: &Window, pfn: Pfn) {
    let fs = win.slot_size();
    // SAFETY: slots 0..RUN are empty between iterations.
    let p = unsafe { win.enter(Slot(0), pfn, RUN) }.expect("enter run");
    for i in 0..RUN {
        // SAFETY: the run maps RUN frames contiguously from `p`.
        unsafe { touch(black_box(p), i * fs) };
    }
    // SAFETY: `p` is not used after this.
    unsafe { win.remove(Slot(0), RUN) }.expect("remove run");
}

// === spinners ===

/// Who spins on the other CPU while a variant is measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Spin {
    /// Nobody.
    None,
    /// A thread of this process: unmaps need shootdown IPIs to its CPU.
    Thread,
    /// A thread of another process: same load, no shootdown (the control).
    Process,
}

impl Spin {
    fn suffix(self) -> &'static str {
        match self {
            Spin::None => "",
            Spin::Thread => ", second thread running",
            Spin::Process => ", other process spinning (control)",
        }
    }
}

/// Keeps the other CPU busy while it lives. The measuring thread and the
/// spinner are pinned to two different CPUs (unpinned, the scheduler
/// sometimes stacks them on one CPU and the shootdown disappears from the
/// measurement); the measuring thread's affinity is restored on drop.
struct Spinner {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<u64>>,
    process: Option<Child>,
    saved: Option<CpuSet>,
}

/// The first two CPUs this thread may run on, if there are two.
fn two_cpus(set: &CpuSet) -> Option<(usize, usize)> {
    let mut it = (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false));
    Some((it.next()?, it.next()?))
}

/// Pin thread or process `pid` (0: the calling thread) to `cpu`.
fn pin(pid: i32, cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).expect("cpu id in range");
    sched_setaffinity(Pid::from_raw(pid), &set).expect("sched_setaffinity");
}

/// Spin until `stop`, counting.
fn spin_until(mut stop: impl FnMut() -> bool) -> u64 {
    let mut spins = 0u64;
    while !stop() {
        spins = spins.wrapping_add(1);
        std::hint::spin_loop();
    }
    spins
}

impl Spinner {
    fn start(kind: Spin) -> Spinner {
        let stop = Arc::new(AtomicBool::new(false));
        let mut s = Spinner { stop: Arc::clone(&stop), thread: None, process: None, saved: None };
        if kind == Spin::None {
            return s;
        }
        let saved = sched_getaffinity(Pid::from_raw(0)).ok();
        let Some((mine, its)) = saved.as_ref().and_then(two_cpus) else {
            eprintln!("baseline: only one CPU available, the shootdown cost will not show");
            return s;
        };
        pin(0, mine);
        s.saved = saved;
        match kind {
            Spin::None => {}
            Spin::Thread => {
                s.thread = Some(thread::spawn(move || {
                    pin(0, its);
                    // Relaxed: a stop flag, no data is published with it.
                    spin_until(|| stop.load(Ordering::Relaxed))
                }));
            }
            Spin::Process => {
                let exe = std::env::current_exe().expect("current_exe");
                let child = Command::new(exe).env(SPIN_ENV, its.to_string()).spawn().expect("spawn spinner process");
                // Pinned from here too, so it is on its CPU before we measure.
                pin(child.id() as i32, its);
                s.process = Some(child);
            }
        }
        // Let it get onto its CPU before measuring.
        thread::sleep(Duration::from_millis(20));
        s
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.thread.take() {
            black_box(h.join().expect("spinner thread"));
        }
        if let Some(mut c) = self.process.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(set) = self.saved.take() {
            let _ = sched_setaffinity(Pid::from_raw(0), &set);
        }
    }
}

/// The control spinner's life, in the re-executed binary: spin on `cpu`
/// until killed, or until the benchmark that started it is gone.
fn control_spinner(cpu: &str) -> ! {
    if let Ok(cpu) = cpu.parse() {
        pin(0, cpu);
    }
    let parent = getppid();
    let mut n = 0u32;
    spin_until(|| {
        n = n.wrapping_add(1);
        // Every ~million spins, a cheap check that the parent still lives.
        n % (1 << 20) == 0 && getppid() != parent
    });
    std::process::exit(0)
}

// === the group ===

fn bench_mapping(g: &mut BenchmarkGroup<'_, WallTime>, mem: &PhysMem) {
    let win = Window::builder(mem).slots(RUN).build().expect("window");
    // Frames written once, so every enter maps a page that exists (a minor
    // fault on first touch, as for a page-cache page).
    let pages = mem.alloc_run(FRAMES).expect("frames");
    for p in &pages {
        p.direct().expect("direct map").fill(0xaa).expect("fill");
    }
    let base = pages[0].pfn().0;

    g.throughput(Throughput::Elements(1));
    let mut k = 0usize;
    for spin in [Spin::None, Spin::Thread, Spin::Process] {
        let _spinner = Spinner::start(spin);
        g.bench_function(format!("(a) enter+touch+remove/1 page{}", spin.suffix()), |b| {
            b.iter(|| {
                k = (k + 1) % FRAMES;
                map_one(&win, Pfn(base + k));
            })
        });
    }

    // iter_custom divided by RUN: the reported time is per page.
    let mut r = 0usize;
    for spin in [Spin::None, Spin::Thread, Spin::Process] {
        let _spinner = Spinner::start(spin);
        g.bench_function(format!("(b) enter+touch+remove/run of 64, per page{}", spin.suffix()), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    r = (r + 1) % (FRAMES / RUN);
                    map_run(&win, Pfn(base + r * RUN));
                }
                start.elapsed() / RUN as u32
            })
        });
    }
    let s = win.stats();
    assert_eq!((s.mapped, s.remove_fallbacks), (0, 0));
}

fn bench_direct(g: &mut BenchmarkGroup<'_, WallTime>, mem: &PhysMem) {
    let fs = system_page_size();
    let pages: Vec<Page> = (0..FRAMES).map(|_| mem.alloc_page().expect("frame")).collect();
    for (i, p) in pages.iter().enumerate() {
        p.direct().expect("direct map").fill(i as u8).expect("fill");
    }
    // A fixed random sequence of frames, so the read is the only cost.
    let mut rng = SmallRng::seed_from_u64(0x1b0f);
    let order: Vec<Pfn> = (0..4096).map(|_| pages[rng.gen_range(0..FRAMES)].pfn()).collect();

    let mut i = 0usize;
    g.throughput(Throughput::Bytes(8));
    g.bench_function("(c) direct map read/8 B of a random frame", |b| {
        let mut buf = [0u8; 8];
        b.iter(|| {
            i = (i + 1) & 4095;
            mem.read_frame(black_box(order[i]), 0, &mut buf).expect("read");
            black_box(buf);
        })
    });

    g.throughput(Throughput::Bytes(fs as u64));
    g.bench_function("(c) direct map read/whole page of a random frame", |b| {
        let mut buf = vec![0u8; fs];
        b.iter(|| {
            i = (i + 1) & 4095;
            mem.read_frame(black_box(order[i]), 0, &mut buf).expect("read");
            black_box(&buf);
        })
    });
}

/// Frames of the granule `(d)` maps in place.
const PROT_GRANULE: usize = 512;

/// `(d)`: a granule of 512 frames mapped straight over the previous one
/// (`Mmu::replace`, one `mmap(MAP_FIXED)`) in a window of one granule,
/// going round the memory, one word of every 16th page read (the kernel
/// maps the pages around each read fault), with a second thread of this
/// process running on the other CPU: a read-write window against a
/// read-only one. shmem pages mapped writable get dirty page-table entries,
/// and zapping dirty entries of a shared file flushes the other CPU's TLB
/// once more (before the rmap goes): two shootdowns per map instead of one.
fn bench_prot(g: &mut BenchmarkGroup<'_, WallTime>, mem: &PhysMem) {
    let granules = mem.stats().free / PROT_GRANULE;
    let pages = mem.alloc_run(granules * PROT_GRANULE).expect("frames");
    for p in &pages {
        p.direct().expect("direct map").fill(0xaa).expect("fill");
    }
    let base = pages[0].pfn().0;
    for read_only in [false, true] {
        let win = Window::builder(mem).slots(PROT_GRANULE).read_only(read_only).build().expect("window");
        let fs = win.slot_size();
        // SAFETY: the bench owns the window; slot 0.. are empty.
        unsafe { win.enter(Slot(0), Pfn(base), PROT_GRANULE) }.expect("enter");
        let _spinner = Spinner::start(Spin::Thread);
        let mut k = 0usize;
        let name = if read_only { "read-only" } else { "read-write" };
        g.bench_function(format!("(d) in-place map of 512 frames, per page, second thread running, {name}"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    k = (k + 1) % granules;
                    // SAFETY: the slots hold the previous granule, which
                    // nothing refers to between iterations.
                    let p = unsafe { win.replace(Slot(0), Pfn(base + k * PROT_GRANULE), PROT_GRANULE, PROT_GRANULE) }
                        .expect("replace");
                    for i in (0..PROT_GRANULE).step_by(16) {
                        // SAFETY: inside the granule just mapped, readable.
                        black_box(unsafe { p.as_ptr().add(i * fs).cast::<u64>().read_volatile() });
                    }
                }
                start.elapsed() / PROT_GRANULE as u32
            })
        });
        // SAFETY: nothing refers to the last granule.
        unsafe { win.remove(Slot(0), PROT_GRANULE) }.expect("remove");
    }
}

fn map_per_page(c: &mut Criterion) {
    let mem = PhysMem::builder().frames(4 * FRAMES).name("lwbuf-bench").build().expect("PhysMem");
    let mut g = c.benchmark_group("map_per_page");
    g.sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    bench_mapping(&mut g, &mem);
    bench_direct(&mut g, &mem);
    g.finish();
    let mem = PhysMem::builder().frames(8 * PROT_GRANULE).name("lwbuf-bench").build().expect("PhysMem");
    let mut g = c.benchmark_group("map_prot");
    g.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    bench_prot(&mut g, &mem);
    g.finish();
}

/// The raw cycle of `common/raw.rs`, per 4 KiB page, for every granule.
fn map_cycle_raw(c: &mut Criterion) {
    let mut g = c.benchmark_group(raw::group("map_cycle_raw"));
    g.sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for cfg in raw::configs(raw::HUGE_PAGES, "map_cycle_raw") {
        let mut m = raw::RawMap::for_config(cfg).expect("raw memfd and window");
        for how in [raw::Cycle::Strict, raw::Cycle::InPlace] {
            // iter_custom divided by G: the reported time is per page.
            g.bench_function(format!("{}_{}", how.name(), cfg.id()), |b| {
                b.iter_custom(|iters| {
                    let t = raw::now();
                    for _ in 0..iters {
                        black_box(m.cycle(how));
                    }
                    (raw::now() - t) / cfg.granule as u32
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, map_per_page, map_cycle_raw);

// criterion_main!, plus the control spinner's entry point.
fn main() {
    if let Some(cpu) = std::env::var_os(SPIN_ENV) {
        control_spinner(&cpu.to_string_lossy());
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
