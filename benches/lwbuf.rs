//! Criterion benchmarks of the per-CPU lwbuf caches on the real window,
//! each group putting the candidate beside its baselines:
//!
//! - `lwbuf_read_8`: (a) a local cache hit: `alloc` + `kva` + read 8 bytes +
//!   drop; (b) the same read through the direct map (`Page::direct`);
//!   (c) what a cache exists to avoid: `mmap` a frame into a window slot,
//!   touch it, remap the slot `PROT_NONE` (`Window::enter` + write +
//!   `Window::remove`). (a) and (b) walk the same random sequence over 512
//!   frames, all cached on CPU 0 beforehand, so (a) is always a hit.
//!   Targets: (a) within 3x of (b), and at least 300x faster than (c).
//! - `lwbuf_read_4k`: reading a whole 4 KiB page through an lwbuf hit vs the
//!   direct map, in bytes per second. Target: at least 0.8x the direct map.
//! - `lwbuf_remote_release`: a handle allocated on CPU 0 and dropped on CPU
//!   1, the decref applied by CPU 0 at its next library call; amortized per
//!   decref (method at [`remote_release`]). Target: at most 100 ns.
//!
//! Run with `cargo bench --bench lwbuf`; targets are reported, not asserted.
//!
//! On a shared, loaded machine wall time mostly measures the time the bench
//! thread spent preempted. `LWBUF_BENCH_CLOCK=cpu cargo bench --bench lwbuf`
//! measures each thread's own CPU time instead (`CLOCK_THREAD_CPUTIME_ID`),
//! under group names ending in `_cpu` so criterion keeps the two apart.

use std::hint::black_box;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_main, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use lwbuf::{Lwbuf, Lwbufs, Mmu, Page, PhysMem, Slot, Window};

/// Frames the hot benchmarks cycle through (all cached on CPU 0).
const FRAMES: usize = 512;
/// Length of the random access sequence (a power of two, for masking).
const SEQ: usize = 4096;

struct Fixture {
    mem: PhysMem,
    pages: Vec<Page>,
    /// `(page index, byte offset of an 8-byte word)`, random, shared by the
    /// candidate and its baseline.
    seq: Vec<(usize, usize)>,
    lw: Lwbufs,
}

impl Fixture {
    /// 512 stamped frames of a memfd; a 2-CPU lwbuf system over a window
    /// large enough to keep all of them cached.
    fn new() -> Fixture {
        let mem = PhysMem::builder().frames(2 * FRAMES).build().expect("PhysMem");
        let pages: Vec<Page> = (0..FRAMES).map(|_| mem.alloc_page().expect("alloc_page")).collect();
        let fs = mem.frame_size();
        for p in &pages {
            let k = p.direct().expect("direct map");
            for w in 0..fs / 8 {
                k.write_u64(w * 8, (p.pfn().0 * 1000 + w) as u64).expect("stamp");
            }
        }
        let mut r = SmallRng::seed_from_u64(0x1b0f);
        let seq = (0..SEQ).map(|_| (r.gen_range(0..FRAMES), r.gen_range(0..fs / 8) * 8)).collect();
        let win = Window::builder(&mem).slots(4 * FRAMES).build().expect("Window");
        let lw = Lwbufs::builder(Arc::new(win)).cpus(2).max_excess(2 * FRAMES).build().expect("Lwbufs");
        Fixture { mem, pages, seq, lw }
    }

    /// Map every frame on the calling thread's CPU and leave it cached.
    fn warm(&self) {
        for p in &self.pages {
            drop(self.lw.alloc(p).expect("alloc"));
        }
    }
}

/// (a), (b) and (c) of the module docs, in one group.
fn read_8<M: Measurement>(c: &mut Criterion<M>, clock: Clock) {
    let f = Fixture::new();
    let _cpu0 = f.lw.bind(0).expect("bind");
    f.warm();
    let misses = f.lw.stats().total.misses;
    let mut g = c.benchmark_group(clock.group("lwbuf_read_8"));

    let mut i = 0;
    g.bench_function("lwbuf_hit", |b| {
        b.iter(|| {
            let (p, off) = f.seq[i & (SEQ - 1)];
            i += 1;
            let h = f.lw.alloc(&f.pages[p]).expect("alloc");
            let v = h.kva().expect("kva").read_u64(off).expect("read");
            drop(h);
            black_box(v)
        })
    });
    assert_eq!(f.lw.stats().total.misses, misses, "every alloc was a hit");

    let mut i = 0;
    g.bench_function("direct_map", |b| {
        b.iter(|| {
            let (p, off) = f.seq[i & (SEQ - 1)];
            i += 1;
            black_box(f.pages[p].direct().expect("direct").read_u64(off).expect("read"))
        })
    });

    // A window of its own, so the lwbuf cache's slots are not disturbed;
    // one slot, entered and removed per iteration (the kernel's cost: one
    // mmap, one page fault on the write, one PROT_NONE remap).
    let win = Window::builder(&f.mem).slots(1).build().expect("Window");
    let mut i = 0;
    g.bench_function("mmap_touch_remap", |b| {
        b.iter(|| {
            let (p, off) = f.seq[i & (SEQ - 1)];
            i += 1;
            // SAFETY: slot 0 of this private window is empty (every
            // iteration removes what it entered) and nothing refers to it.
            let a = unsafe { win.enter(Slot(0), f.pages[p].pfn(), 1) }.expect("enter");
            // SAFETY: the slot maps a whole frame; `off + 8 <= frame size`.
            unsafe { a.as_ptr().add(off).cast::<u64>().write_unaligned(black_box(i as u64)) };
            // SAFETY: `a` is not used past this point.
            unsafe { win.remove(Slot(0), 1) }.expect("remove");
        })
    });
    g.finish();
}

/// A whole 4 KiB page read through an lwbuf hit vs the direct map.
fn read_4k<M: Measurement>(c: &mut Criterion<M>, clock: Clock) {
    let f = Fixture::new();
    let fs = f.mem.frame_size();
    let _cpu0 = f.lw.bind(0).expect("bind");
    f.warm();
    let mut g = c.benchmark_group(clock.group("lwbuf_read_4k"));
    g.throughput(Throughput::Bytes(fs as u64));
    let mut buf = vec![0u8; fs];

    let mut i = 0;
    g.bench_function("lwbuf_hit", |b| {
        b.iter(|| {
            let (p, _) = f.seq[i & (SEQ - 1)];
            i += 1;
            let h = f.lw.alloc(&f.pages[p]).expect("alloc");
            h.kva().expect("kva").read_at(0, &mut buf).expect("read");
            drop(h);
            black_box(&buf);
        })
    });
    let mut i = 0;
    g.bench_function("direct_map", |b| {
        b.iter(|| {
            let (p, _) = f.seq[i & (SEQ - 1)];
            i += 1;
            f.pages[p].direct().expect("direct").read_at(0, &mut buf).expect("read");
            black_box(&buf);
        })
    });
    // The same read through window mappings already held (no cache
    // operation per read): what is left is the cost of the mapping itself.
    let held: Vec<Lwbuf<'_>> = f.pages.iter().map(|p| f.lw.alloc(p).expect("alloc")).collect();
    let mut i = 0;
    g.bench_function("held_lwbuf", |b| {
        b.iter(|| {
            let (p, _) = f.seq[i & (SEQ - 1)];
            i += 1;
            held[p].kva().expect("kva").read_at(0, &mut buf).expect("read");
            black_box(&buf);
        })
    });
    drop(held);
    g.finish();
}

/// What the helper thread (bound to CPU 0) is asked to do.
enum Cmd {
    /// Allocate this many handles (cache hits) and send them back.
    Alloc(usize),
    /// Run `poll()` (the owner's next library call, which applies the
    /// pending decrefs) and report how long it took.
    Poll,
}

/// Handles dropped on CPU 1 per batch: below the mailbox length at which a
/// sender drains for an idle owner (256), so every decref here takes the
/// ordinary path: queued by the dropper, applied by the owner.
const BATCH: usize = 128;

/// A remote release, amortized per decref.
///
/// Two threads: a helper bound to CPU 0 (the handles' home, staying bound
/// for the whole benchmark, so its mailbox is never drained on its behalf)
/// and the bench thread bound to CPU 1. Per batch, untimed: the helper
/// allocates `BATCH` handles (hits on pre-warmed frames) and sends them
/// over. Timed: the bench thread drops them all (each drop posts one decref
/// message to CPU 0's mailbox), then the helper's `poll()` applies them,
/// timed by the helper. The time per iteration is (drops + poll) / handles,
/// measured with `iter_custom`; channel round trips are not counted. Each
/// thread reads `clock` for its own part (wall or its own CPU time).
fn remote_release<M: Measurement<Value = Duration>>(c: &mut Criterion<M>, clock: Clock) {
    let f = Fixture::new();
    let lw = &f.lw;
    // CPU 0's cache outlives this binding: the helper finds it warm.
    {
        let _cpu0 = lw.bind(0).expect("bind 0");
        f.warm();
    }
    let mut g = c.benchmark_group(clock.group("lwbuf_remote_release"));
    thread::scope(|s| {
        let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>();
        let (bufs_tx, bufs_rx) = mpsc::channel::<Vec<Lwbuf<'_>>>();
        let (poll_tx, poll_rx) = mpsc::channel::<Duration>();
        let (pages, seq) = (&f.pages, &f.seq);
        s.spawn(move || {
            let _cpu0 = lw.bind(0).expect("bind 0");
            let mut i = 0;
            for cmd in cmd_rx {
                match cmd {
                    Cmd::Alloc(n) => {
                        let hs = (0..n)
                            .map(|_| {
                                i += 1;
                                lw.alloc(&pages[seq[i & (SEQ - 1)].0]).expect("alloc")
                            })
                            .collect();
                        bufs_tx.send(hs).expect("send handles");
                    }
                    Cmd::Poll => {
                        let t = clock.now();
                        lw.poll().expect("poll");
                        poll_tx.send(clock.now() - t).expect("send time");
                    }
                }
            }
        });
        let _cpu1 = lw.bind(1).expect("bind 1");
        let before = lw.stats();
        g.bench_function("drop_on_cpu1_applied_by_cpu0", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters as usize;
                while left > 0 {
                    let n = left.min(BATCH);
                    left -= n;
                    cmd_tx.send(Cmd::Alloc(n)).expect("send");
                    let mut hs = bufs_rx.recv().expect("handles");
                    let t = clock.now();
                    for h in hs.drain(..) {
                        drop(h);
                    }
                    total += clock.now() - t;
                    drop(hs);
                    cmd_tx.send(Cmd::Poll).expect("send");
                    total += poll_rx.recv().expect("time");
                }
                total
            })
        });
        drop(cmd_tx);
        let after = lw.stats();
        let sent = after.per_cpu[1].decrefs_sent - before.per_cpu[1].decrefs_sent;
        let applied = after.per_cpu[0].decrefs_applied - before.per_cpu[0].decrefs_applied;
        assert_eq!(sent, applied, "every decref applied by the owner");
        assert_eq!(after.total.misses, before.total.misses, "the helper's allocs were all hits");
    });
    g.finish();
}

// === clocks ===

/// What the benchmarks time with: wall time (criterion's default) or the
/// calling thread's CPU time.
#[derive(Clone, Copy)]
enum Clock {
    Wall,
    ThreadCpu,
}

impl Clock {
    fn from_env() -> Clock {
        match std::env::var("LWBUF_BENCH_CLOCK").as_deref() {
            Ok("cpu") => Clock::ThreadCpu,
            _ => Clock::Wall,
        }
    }

    fn group(self, name: &str) -> String {
        match self {
            Clock::Wall => name.to_string(),
            Clock::ThreadCpu => format!("{name}_cpu"),
        }
    }

    /// A reading of this clock on the calling thread (an arbitrary origin).
    fn now(self) -> Duration {
        match self {
            Clock::Wall => {
                static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
                ORIGIN.get_or_init(Instant::now).elapsed()
            }
            Clock::ThreadCpu => thread_cpu_time(),
        }
    }
}

/// CPU time consumed by the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant
    // Linux supports.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Criterion measurement by the bench thread's own CPU time: immune to the
/// time it spends preempted by other processes (not to their cache traffic).
struct ThreadCpuTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;
    fn start(&self) -> Duration {
        thread_cpu_time()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu_time() - start
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Values are nanoseconds, as for wall time: reuse its formatting.
        static WALL: WallTime = WallTime;
        WALL.formatter()
    }
}

fn config<M: Measurement>(c: Criterion<M>) -> Criterion<M> {
    c.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30)
        .configure_from_args()
}

fn run_all<M: Measurement<Value = Duration>>(mut c: Criterion<M>, clock: Clock) {
    read_8(&mut c, clock);
    read_4k(&mut c, clock);
    remote_release(&mut c, clock);
}

fn benches() {
    match Clock::from_env() {
        Clock::Wall => run_all(config(Criterion::default()), Clock::Wall),
        Clock::ThreadCpu => run_all(config(Criterion::default().with_measurement(ThreadCpuTime)), Clock::ThreadCpu),
    }
}

criterion_main!(benches);
