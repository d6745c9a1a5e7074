//! Integrity soak: many threads on many virtual CPUs hammer the lwbuf caches
//! and the sf_buf pool at once, and every byte read through every mapping is
//! checked.
//!
//! Every frame carries a stamp unique to it and to a version: word 0 is the
//! frame number, word 1 the version, every other word derived from both.
//! Writes go through a mapping (an lwbuf or an sf_buf) and bump the version;
//! the expected version of each frame lives in a table owned by the test, one
//! `RwLock` per frame, so a writer is the only one touching that frame while
//! it writes and readers never see a half-written stamp. Every read through a
//! mapping is compared with the frame read through the direct map
//! ([`PhysMem::read_frame`]) and with the expected stamp: a mapping of the
//! wrong frame, a slot reused while still referenced, or a write that landed
//! elsewhere is a mismatch.
//!
//! Eight OS threads share 64 virtual CPUs (256 in the long run), rebinding to
//! random CPUs from time to time, and run random operations: lwbuf `alloc`
//! and `alloc_run`, reads and writes through `kva()` on whatever CPU the
//! thread holds (so handles gain CPUs), handles passed to other threads
//! through channels and dropped there, bound or unbound; sf_buf `alloc`,
//! `alloc_run` and `alloc_all` with `NoWait`, `Timeout` and `Forever`
//! (bounded holds: a thread waits forever only when it holds no sf_buf, and
//! at most a few slots' worth are in flight between threads, so a waiter
//! always has room to wait for); both excess limits changed at run time;
//! `poll` and `reclaim`. At the end every count is zero, every message
//! applied, every mailbox empty, every slot and frame accounted for, and what
//! the caches say they have mapped is what the MMU has mapped.
//!
//! Commands:
//!
//! ```text
//! # the normal suite: the model backend for 30 s and the real window for 5 s
//! cargo test --test soak
//! # longer or shorter: seconds for the model run and for the window run
//! LWBUF_SOAK_SECS=120 LWBUF_SOAK_WINDOW_SECS=30 cargo test --test soak -- --nocapture
//! # the long run: 256 CPUs, 10^7 operations, real window (ignored by default)
//! LWBUF_SOAK_OPS=10000000 cargo test --release --test soak -- --ignored --nocapture soak_long
//! ```
//!
//! `LWBUF_SOAK_SEED` fixes the seed (each run prints the one it used); the
//! thread interleaving is not reproducible, the operation mix is.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use lwbuf::{
    system_page_size, Backing, CpuGuard, Error, Kaddr, Lwbuf, Lwbufs, Mmu, ModelMmu, Page, PhysMem, Reclaim, SfBuf,
    SfPool, Wait, Window,
};

// === configuration ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Window,
    Model,
}

#[derive(Clone, Copy, Debug)]
enum Budget {
    Time(Duration),
    Ops(u64),
}

#[derive(Clone, Debug)]
struct Config {
    backend: Backend,
    cpus: usize,
    threads: usize,
    frames: usize,
    lw_slots: usize,
    sf_slots: usize,
    budget: Budget,
    seed: u64,
    /// Mapping granule of both caches, and what their evictions do.
    granule: usize,
    reclaim: Reclaim,
}

/// Frames most operations pick from, so caches hit.
const HOT: usize = 48;
/// lwbuf handles alive at once, all threads together (each thread also
/// allocates only while it holds fewer than `LW_HELD`).
const LW_LIVE_MAX: usize = 192;
const LW_HELD: usize = 16;
const LW_RUN_MAX: usize = 8;
/// sf_buf slots one thread may hold.
const SF_HELD_SLOTS: usize = 8;
/// sf_buf slots in flight between threads, at most.
const SF_TRANSIT_SLOTS: usize = 8;
const SF_RUN_MAX: usize = 4;
const SF_ALL_MAX: usize = 5;
/// A thread making no progress for this long is stuck: the watchdog aborts.
const WATCHDOG: Duration = Duration::from_secs(180);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

fn seed() -> u64 {
    env_u64("LWBUF_SOAK_SEED").unwrap_or_else(|| {
        // Miri isolates the program from the wall clock (and its runs are
        // reproducible anyway): a fixed seed there.
        if cfg!(miri) {
            return 1;
        }
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    })
}

// === stamps ===

/// Word `w` of frame `pfn`'s stamp at version `ver`.
#[inline]
fn word(pfn: usize, ver: u64, w: usize) -> u64 {
    match w {
        0 => pfn as u64,
        1 => ver,
        _ => (pfn as u64 ^ 0x9e37_79b9_7f4a_7c15)
            .wrapping_mul(ver.wrapping_add(0xc2b2_ae3d_27d4_eb4f) | 1)
            .wrapping_add((w as u64).wrapping_mul(0x1656_67b1_9e37_79f9)),
    }
}

fn fill_stamp(pfn: usize, ver: u64, buf: &mut [u8]) {
    for (w, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&word(pfn, ver, w).to_ne_bytes());
    }
}

/// The first word of `buf` that differs from the stamp, if any.
fn stamp_diff(pfn: usize, ver: u64, buf: &[u8]) -> Option<(usize, u64, u64)> {
    buf.chunks_exact(8).enumerate().find_map(|(w, chunk)| {
        let got = u64::from_ne_bytes(chunk.try_into().unwrap());
        let want = word(pfn, ver, w);
        (got != want).then_some((w, got, want))
    })
}

// === shared state ===

/// Everything the threads share besides the system under test.
struct Shared<'a> {
    mem: &'a PhysMem,
    pages: &'a [Page],
    /// The expected version and bytes of every frame; held for reading
    /// while a frame is checked and for writing while it is rewritten.
    frames: Vec<RwLock<Expected>>,
    ops: AtomicU64,
    stop: AtomicBool,
    deadline: Option<Instant>,
    op_limit: Option<u64>,
    mismatches: AtomicU64,
    first_mismatches: Mutex<Vec<String>>,
    checked_pages: AtomicU64,
    writes: AtomicU64,
    lw_live: AtomicUsize,
    sf_transit: AtomicUsize,
    /// Errors that are legitimate answers under load, by kind.
    lw_refused: AtomicU64,
    sf_refused: AtomicU64,
    forever_waits: AtomicU64,
    finished: AtomicUsize,
}

impl Shared<'_> {
    fn frame_size(&self) -> usize {
        self.mem.frame_size()
    }

    fn mismatch(&self, what: String) {
        self.mismatches.fetch_add(1, Ordering::Relaxed);
        let mut v = self.first_mismatches.lock().unwrap();
        if v.len() < 20 {
            v.push(what);
        }
    }

    /// Check `pages` frames from `pfn0` seen through `k`, frame by frame.
    fn check(&self, k: &Kaddr<'_>, pfn0: usize, pages: usize, via: &str, bufs: &mut Bufs) {
        let fs = self.frame_size();
        for i in 0..pages {
            let pfn = pfn0 + i;
            let exp = self.frames[pfn].read().unwrap();
            k.read_at(i * fs, &mut bufs.mapped).expect("read through the mapping");
            self.mem.read_frame(lwbuf::Pfn(pfn), 0, &mut bufs.direct).expect("read through the direct map");
            if bufs.mapped != bufs.direct {
                let w = bufs.mapped.chunks(8).zip(bufs.direct.chunks(8)).position(|(a, b)| a != b).unwrap();
                self.mismatch(format!(
                    "{via}: frame {pfn} at {:#x}: word {w} differs from the direct map (mapped word 0 = {})",
                    k.addr() + i * fs,
                    u64::from_ne_bytes(bufs.mapped[..8].try_into().unwrap())
                ));
            } else if bufs.mapped != exp.bytes {
                let (w, got, want) = stamp_diff(pfn, exp.ver, &bufs.mapped).expect("differs from the stamp");
                self.mismatch(format!("{via}: frame {pfn} version {}: word {w} is {got:#x}, not {want:#x}", exp.ver));
            }
            drop(exp);
            self.checked_pages.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Rewrite `pages` frames from `pfn0` through `k` with the next version.
    fn write(&self, k: &Kaddr<'_>, pfn0: usize, pages: usize, via: &str, bufs: &mut Bufs) {
        let fs = self.frame_size();
        for i in 0..pages {
            let pfn = pfn0 + i;
            let mut exp = self.frames[pfn].write().unwrap();
            exp.ver += 1;
            let ver = exp.ver;
            fill_stamp(pfn, ver, &mut exp.bytes);
            k.write_at(i * fs, &exp.bytes).expect("write through the mapping");
            self.mem.read_frame(lwbuf::Pfn(pfn), 0, &mut bufs.direct).unwrap();
            if bufs.direct != exp.bytes {
                self.mismatch(format!("{via}: write of frame {pfn} version {ver} did not land in the frame"));
            }
            drop(exp);
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count an operation; false once the run is over.
    fn tick(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        let n = self.ops.fetch_add(1, Ordering::Relaxed) + 1;
        let over = self.op_limit.is_some_and(|l| n >= l)
            || (n % 64 == 0 && self.deadline.is_some_and(|d| Instant::now() >= d));
        if over {
            self.stop.store(true, Ordering::Relaxed);
        }
        !over
    }

    /// The first frame of a run of `run`: mostly from the hot sets.
    fn frame(&self, r: &mut SmallRng, run: usize) -> usize {
        let n = self.pages.len();
        let hi = match r.gen_range(0..20) {
            0..=9 => HOT / 4,
            10..=16 => HOT,
            _ => n,
        };
        r.gen_range(0..=hi.min(n) - run)
    }
}

/// What a frame must hold: its stamp at `ver` (kept as bytes, so checking a
/// read is a `memcmp`, fast even in a debug build).
struct Expected {
    ver: u64,
    bytes: Vec<u8>,
}

impl Expected {
    fn new(pfn: usize, fs: usize) -> Self {
        let mut bytes = vec![0; fs];
        fill_stamp(pfn, 0, &mut bytes);
        Expected { ver: 0, bytes }
    }
}

struct Bufs {
    mapped: Vec<u8>,
    direct: Vec<u8>,
}

/// A handle counted in a gauge while it lives (or until taken out).
struct Counted<'a, T> {
    h: Option<T>,
    gauge: &'a AtomicUsize,
    amount: usize,
}

impl<'a, T> Counted<'a, T> {
    /// Count `h` (the caller added `amount` to `gauge` already).
    fn new(h: T, gauge: &'a AtomicUsize, amount: usize) -> Self {
        Counted { h: Some(h), gauge, amount }
    }

    fn get(&self) -> &T {
        self.h.as_ref().expect("present until taken")
    }

    /// Stop counting it and hand it out.
    fn take(mut self) -> T {
        self.h.take().expect("present until taken")
    }
}

impl<T> Drop for Counted<'_, T> {
    fn drop(&mut self) {
        self.gauge.fetch_sub(self.amount, Ordering::Relaxed);
    }
}

type Lw<'a> = Counted<'a, Lwbuf<'a>>;

/// What travels between threads.
enum Item<'a> {
    Lw(Lw<'a>),
    /// An sf_buf in flight, counted in `sf_transit` until received.
    Sf(Counted<'a, SfBuf<'a>>),
}

fn sf_slots_of(v: &[SfBuf<'_>]) -> usize {
    v.iter().map(|s| s.pages().len()).sum()
}

// === one worker ===

struct Worker<'a, 's> {
    id: usize,
    sh: &'a Shared<'a>,
    lw: &'a Lwbufs,
    pool: &'a SfPool,
    tx: &'s [mpsc::Sender<Item<'a>>],
    rx: mpsc::Receiver<Item<'a>>,
    r: SmallRng,
    guard: Option<CpuGuard<'a>>,
    lw_held: Vec<Lw<'a>>,
    sf_held: Vec<SfBuf<'a>>,
    bufs: Bufs,
}

impl<'a> Worker<'a, '_> {
    fn bind_any(&mut self) {
        self.guard = None;
        loop {
            match self.lw.bind(self.r.gen_range(0..self.lw.cpus())) {
                Ok(g) => {
                    self.guard = Some(g);
                    return;
                }
                Err(Error::CpuBusy { .. }) => continue,
                Err(e) => panic!("bind: {e}"),
            }
        }
    }

    fn receive(&mut self) {
        while let Ok(item) = self.rx.try_recv() {
            match item {
                Item::Lw(h) => self.lw_held.push(h),
                // Out of the transit gauge, into this thread's holds.
                Item::Sf(c) => self.sf_held.push(c.take()),
            }
        }
    }

    /// An lwbuf error that is a legitimate answer under load.
    fn lw_refused(&self, e: Error, what: &str) {
        match e {
            Error::WindowFull { .. } | Error::MapLimit { .. } => {}
            ref e if e.errno() == Some(libc::ENOMEM) => {}
            e => panic!("thread {}: {what}: {e}", self.id),
        }
        self.sh.lw_refused.fetch_add(1, Ordering::Relaxed);
    }

    fn sf_refused(&self, e: Error, what: &str) {
        match e {
            Error::WouldBlock | Error::TimedOut => {}
            e => panic!("thread {}: {what}: {e}", self.id),
        }
        self.sh.sf_refused.fetch_add(1, Ordering::Relaxed);
    }

    fn lw_alloc(&mut self, run: usize) {
        if self.guard.is_none() || self.lw_held.len() >= LW_HELD {
            return;
        }
        if self.sh.lw_live.fetch_add(1, Ordering::Relaxed) >= LW_LIVE_MAX {
            self.sh.lw_live.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let f = self.sh.frame(&mut self.r, run);
        let r = if run == 1 { self.lw.alloc(&self.sh.pages[f]) } else { self.lw.alloc_run(&self.sh.pages[f..f + run]) };
        match r {
            Ok(h) => {
                let h = Counted::new(h, &self.sh.lw_live, 1);
                self.lw_check(&h, false);
                self.lw_held.push(h);
            }
            Err(e) => {
                self.sh.lw_live.fetch_sub(1, Ordering::Relaxed);
                self.lw_refused(e, "alloc");
            }
        }
    }

    fn lw_check(&mut self, h: &Lw<'a>, write: bool) {
        if self.guard.is_none() {
            return;
        }
        let h = h.get();
        let k = match h.kva() {
            Ok(k) => k,
            Err(e) => return self.lw_refused(e, "kva"),
        };
        let via = "lwbuf";
        if write {
            self.sh.write(&k, h.page().pfn().0, h.pages().len(), via, &mut self.bufs);
        } else {
            self.sh.check(&k, h.page().pfn().0, h.pages().len(), via, &mut self.bufs);
        }
    }

    fn sf_wait(&mut self) -> Wait<'static> {
        match self.r.gen_range(0..3) {
            0 => Wait::NoWait,
            1 => Wait::Timeout(Duration::from_micros(self.r.gen_range(0..3000))),
            _ if self.sf_held.is_empty() => {
                self.sh.forever_waits.fetch_add(1, Ordering::Relaxed);
                Wait::Forever
            }
            _ => Wait::NoWait,
        }
    }

    fn sf_alloc(&mut self, kind: u32) {
        let held = sf_slots_of(&self.sf_held);
        let (f, n) = match kind {
            0 => (self.sh.frame(&mut self.r, 1), 1),
            1 => {
                let n = self.r.gen_range(2..=SF_RUN_MAX);
                (self.sh.frame(&mut self.r, n), n)
            }
            _ => {
                let n = self.r.gen_range(2..=SF_ALL_MAX);
                (self.sh.frame(&mut self.r, n), n)
            }
        };
        if held + n > SF_HELD_SLOTS {
            return;
        }
        let how = self.sf_wait();
        let pages = &self.sh.pages[f..f + n];
        let got = match kind {
            0 => self.pool.alloc(&pages[0], how).map(|s| vec![s]),
            1 => self.pool.alloc_run(pages, how).map(|s| vec![s]),
            _ => self.pool.alloc_all(pages, self.r.gen_range(1..=3), how),
        };
        match got {
            Ok(v) => {
                for s in &v {
                    self.sh.check(&s.kva(), s.page().pfn().0, s.pages().len(), "sf_buf", &mut self.bufs);
                }
                self.sf_held.extend(v);
            }
            Err(e) => self.sf_refused(e, "sf alloc"),
        }
    }

    fn pick<T>(r: &mut SmallRng, v: &[T]) -> Option<usize> {
        (!v.is_empty()).then(|| r.gen_range(0..v.len()))
    }

    fn step(&mut self) {
        self.receive();
        if self.guard.is_none() && self.r.gen_ratio(9, 10) {
            self.bind_any();
        }
        match self.r.gen_range(0..1000) {
            0..=139 => self.lw_alloc(1),
            140..=199 => {
                let n = self.r.gen_range(2..=LW_RUN_MAX);
                self.lw_alloc(n)
            }
            200..=339 => {
                if let Some(i) = Self::pick(&mut self.r, &self.lw_held) {
                    let h = self.lw_held.swap_remove(i);
                    self.lw_check(&h, false);
                    self.lw_held.push(h);
                }
            }
            340..=389 => {
                if let Some(i) = Self::pick(&mut self.r, &self.lw_held) {
                    let h = self.lw_held.swap_remove(i);
                    self.lw_check(&h, true);
                    self.lw_held.push(h);
                }
            }
            390..=449 => {
                if let Some(i) = Self::pick(&mut self.r, &self.lw_held) {
                    let h = self.lw_held.swap_remove(i);
                    let to = self.r.gen_range(0..self.tx.len());
                    // A receiver that has finished drops what it is sent.
                    let _ = self.tx[to].send(Item::Lw(h));
                }
            }
            450..=549 => {
                if let Some(i) = Self::pick(&mut self.r, &self.lw_held) {
                    drop(self.lw_held.swap_remove(i));
                }
            }
            550..=579 => {
                // Dropped with no CPU bound: every CPU in the mask gets a
                // message, applied by its owner or by this thread.
                if let Some(i) = Self::pick(&mut self.r, &self.lw_held) {
                    self.guard = None;
                    drop(self.lw_held.swap_remove(i));
                }
            }
            580..=659 => self.sf_alloc(0),
            660..=689 => self.sf_alloc(1),
            690..=709 => self.sf_alloc(2),
            710..=759 => {
                if let Some(i) = Self::pick(&mut self.r, &self.sf_held) {
                    let s = &self.sf_held[i];
                    self.sh.check(&s.kva(), s.page().pfn().0, s.pages().len(), "sf_buf", &mut self.bufs);
                }
            }
            760..=779 => {
                if let Some(i) = Self::pick(&mut self.r, &self.sf_held) {
                    let s = &self.sf_held[i];
                    self.sh.write(&s.kva(), s.page().pfn().0, s.pages().len(), "sf_buf", &mut self.bufs);
                }
            }
            780..=799 => {
                if let Some(i) = Self::pick(&mut self.r, &self.sf_held) {
                    let n = self.sf_held[i].pages().len();
                    if self.sh.sf_transit.fetch_add(n, Ordering::Relaxed) + n <= SF_TRANSIT_SLOTS {
                        let s = self.sf_held.swap_remove(i);
                        let to = self.r.gen_range(0..self.tx.len());
                        let _ = self.tx[to].send(Item::Sf(Counted::new(s, &self.sh.sf_transit, n)));
                    } else {
                        self.sh.sf_transit.fetch_sub(n, Ordering::Relaxed);
                    }
                }
            }
            800..=889 => {
                if let Some(i) = Self::pick(&mut self.r, &self.sf_held) {
                    drop(self.sf_held.swap_remove(i));
                }
            }
            890..=914 => self.bind_any(),
            915..=974 => {
                if self.guard.is_some() {
                    self.lw.poll().expect("poll while bound");
                }
            }
            975..=984 => {
                let n = [0, 1, 4, 16, 64, 256][self.r.gen_range(0..6)];
                self.lw.set_max_excess(n);
            }
            985..=994 => {
                let n = [0, 1, 4, 16, 48][self.r.gen_range(0..5)];
                self.pool.set_max_excess(n);
            }
            _ => {
                if self.r.gen_ratio(1, 4) {
                    self.lw.reclaim();
                }
            }
        }
    }

    fn run(mut self) {
        while self.sh.tick() {
            self.step();
        }
        // Drop what is held on this thread's last CPU (or none), then what
        // others sent meanwhile; then the binding goes.
        self.lw_held.clear();
        self.sf_held.clear();
        self.receive();
        self.lw_held.clear();
        self.sf_held.clear();
        self.guard = None;
        self.sh.finished.fetch_add(1, Ordering::Relaxed);
    }
}

// === the soak ===

fn soak(cfg: Config) {
    let fs = system_page_size();
    let backing = if cfg.backend == Backend::Window { Backing::Memfd } else { Backing::Heap };
    let mem = PhysMem::builder().frames(cfg.frames).backing(backing).build().unwrap();
    let mmu = |slots: usize| -> Arc<dyn Mmu> {
        match cfg.backend {
            Backend::Window => Arc::new(Window::builder(&mem).slots(slots).build().unwrap()),
            Backend::Model => Arc::new(ModelMmu::new(&mem, slots).unwrap()),
        }
    };
    let pages = mem.alloc_run(cfg.frames).unwrap();
    let mut buf = vec![0u8; fs];
    for p in &pages {
        fill_stamp(p.pfn().0, 0, &mut buf);
        p.direct().unwrap().write_at(0, &buf).unwrap();
    }
    let lw = Lwbufs::builder(mmu(cfg.lw_slots))
        .cpus(cfg.cpus)
        .max_excess(16)
        .granule(cfg.granule)
        .reclaim(cfg.reclaim)
        .build()
        .unwrap();
    // The pool keeps as many granules as it had slots with single pages.
    let pool = SfPool::builder(mmu(cfg.sf_slots * cfg.granule))
        .max_excess(16)
        .granule(cfg.granule)
        .reclaim(cfg.reclaim)
        .build()
        .unwrap();
    let start = Instant::now();
    let (deadline, op_limit) = match cfg.budget {
        Budget::Time(d) => (Some(start + d), None),
        Budget::Ops(n) => (None, Some(n)),
    };
    let sh = Shared {
        mem: &mem,
        pages: &pages,
        frames: (0..cfg.frames).map(|pfn| RwLock::new(Expected::new(pfn, fs))).collect(),
        ops: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        deadline,
        op_limit,
        mismatches: AtomicU64::new(0),
        first_mismatches: Mutex::new(Vec::new()),
        checked_pages: AtomicU64::new(0),
        writes: AtomicU64::new(0),
        lw_live: AtomicUsize::new(0),
        sf_transit: AtomicUsize::new(0),
        lw_refused: AtomicU64::new(0),
        sf_refused: AtomicU64::new(0),
        forever_waits: AtomicU64::new(0),
        finished: AtomicUsize::new(0),
    };
    eprintln!(
        "soak {:?}: {} CPUs, {} threads, seed {} ({:?})",
        cfg.backend, cfg.cpus, cfg.threads, cfg.seed, cfg.budget
    );

    let (txs, rxs): (Vec<_>, Vec<_>) = (0..cfg.threads).map(|_| mpsc::channel::<Item<'_>>()).unzip();
    thread::scope(|s| {
        for (id, rx) in rxs.into_iter().enumerate() {
            let (sh, lw, pool, tx, seed) = (&sh, &lw, &pool, &txs[..], cfg.seed);
            s.spawn(move || {
                Worker {
                    id,
                    sh,
                    lw,
                    pool,
                    tx,
                    rx,
                    r: SmallRng::seed_from_u64(seed.wrapping_add(id as u64)),
                    guard: None,
                    lw_held: Vec::new(),
                    sf_held: Vec::new(),
                    bufs: Bufs { mapped: vec![0; fs], direct: vec![0; fs] },
                }
                .run()
            });
        }
        // Liveness watchdog: a stuck run (a lost wake-up, a deadlock) would
        // otherwise hang the suite. Generous: three minutes without one op.
        let (sh, lw, pool) = (&sh, &lw, &pool);
        let threads = cfg.threads;
        s.spawn(move || {
            let (mut last, mut since) = (sh.ops.load(Ordering::Relaxed), Instant::now());
            while sh.finished.load(Ordering::Relaxed) < threads {
                thread::sleep(Duration::from_millis(200));
                let n = sh.ops.load(Ordering::Relaxed);
                if n != last {
                    (last, since) = (n, Instant::now());
                } else if since.elapsed() > WATCHDOG {
                    eprintln!(
                        "soak watchdog: no progress for {WATCHDOG:?} at op {n}\n{}\n{}",
                        lw.stats(),
                        pool.stats()
                    );
                    std::process::abort();
                }
            }
        });
    });
    let elapsed = start.elapsed();
    // Handles still in channels (sent to a thread after its last look) drop
    // here, on a thread with no CPU.
    drop(txs);
    assert_eq!(lw.current_cpu(), None);

    let ops = sh.ops.load(Ordering::Relaxed);
    let mismatches = sh.mismatches.load(Ordering::Relaxed);
    let lst = lw.stats();
    let sst = pool.stats();
    eprintln!(
        "soak {:?} (granule {}, {:?} reclaim): {ops} ops in {:.1} s ({:.0}/s), {} CPUs, {} pages checked, \
         {} frame writes, {mismatches} mismatches, {} lwbuf refusals, {} sf_buf refusals, {} forever waits",
        cfg.backend,
        cfg.granule,
        cfg.reclaim,
        elapsed.as_secs_f64(),
        ops as f64 / elapsed.as_secs_f64(),
        cfg.cpus,
        sh.checked_pages.load(Ordering::Relaxed),
        sh.writes.load(Ordering::Relaxed),
        sh.lw_refused.load(Ordering::Relaxed),
        sh.sf_refused.load(Ordering::Relaxed),
        sh.forever_waits.load(Ordering::Relaxed),
    );
    eprintln!("{lst}\n{sst}");
    assert_eq!(mismatches, 0, "mismatches: {:#?}", sh.first_mismatches.lock().unwrap());

    // The run did what it is meant to.
    // Under Miri the run is a fixed number of operations (`MIRI_OPS`).
    let min_ops = if cfg!(miri) { MIRI_OPS / 2 } else { 1000 };
    assert!(ops > min_ops, "only {ops} operations");
    assert!(sh.checked_pages.load(Ordering::Relaxed) > ops / 10);
    assert!(sh.writes.load(Ordering::Relaxed) > ops / 100);
    assert!(lst.total.hits > 0 && lst.total.misses > 0 && lst.total.evictions > 0, "{lst}");
    assert!(lst.total.foreign > 0 && lst.total.decrefs_sent > 0 && lst.unbound_sent > 0, "{lst}");
    // Most CPUs took part (under Miri's 200 operations, an eighth of them).
    let min_cpus = if cfg!(miri) { cfg.cpus / 8 } else { cfg.cpus / 2 };
    assert!(lst.per_cpu.iter().filter(|c| c.allocs > 0).count() > min_cpus, "{lst}");
    assert!(sst.hits > 0 && sst.misses > 0 && sst.evictions > 0, "{sst}");
    assert_eq!(sh.lw_live.load(Ordering::Relaxed), 0);
    assert_eq!(sh.sf_transit.load(Ordering::Relaxed), 0);

    // Every count zero, every message applied, every mailbox empty.
    assert_eq!(lw.check_consistency(), Ok(0), "{lst}");
    assert!(lst.per_cpu.iter().all(|c| c.mailbox == 0), "stranded messages\n{lst}");
    assert_eq!(lst.total.decrefs_sent, lst.total.decrefs_applied, "{lst}");
    assert_eq!(lst.total.unmap_errors, 0);
    // What the caches say they map is what the MMUs map (under lazy
    // reclaim, evicted mappings may wait to be mapped over).
    assert_eq!(sst.used, 0, "{sst}");
    assert_eq!(sst.waiters, 0, "{sst}");
    if cfg.reclaim == Reclaim::Strict {
        assert_eq!(lst.total.mapped, lst.mmu.enters - lst.mmu.removes, "{lst}");
        assert_eq!(sst.mapped, sst.mmu.enters - sst.mmu.removes, "{sst}");
        assert_eq!(sst.live_mappings, sst.mapped, "{sst}");
    } else {
        assert!(lst.mmu.replaces > 0 && sst.mmu.replaces > 0, "evictions mapped over in place\n{lst}\n{sst}");
        assert!(sst.live_mappings >= sst.mapped, "{sst}");
    }
    assert_eq!(sst.unmap_errors, 0);

    // Shrunk to nothing, every slot comes back.
    lw.reclaim();
    pool.set_max_excess(0);
    pool.reclaim();
    let lst = lw.stats();
    let sst = pool.stats();
    assert_eq!(lw.check_consistency(), Ok(0));
    assert_eq!((lst.total.mapped, lst.total.cached, lst.mmu.mapped), (0, 0, 0), "{lst}");
    assert_eq!((sst.mapped, sst.cached, sst.mmu.mapped), (0, 0, 0), "{sst}");
    let mmu = lw.mmu().clone();
    assert!((0..mmu.capacity()).all(|s| mmu.translate(lwbuf::Slot(s)).is_none()));

    // The frames hold their last versions, and every hold is returned.
    let mut direct = vec![0u8; fs];
    for (pfn, exp) in sh.frames.iter().enumerate() {
        mem.read_frame(lwbuf::Pfn(pfn), 0, &mut direct).unwrap();
        assert_eq!(stamp_diff(pfn, exp.read().unwrap().ver, &direct), None, "frame {pfn} at the end");
    }
    drop((lw, pool));
    for p in &pages {
        assert_eq!(p.hold_count(), 1, "frame {} still held", p.pfn().0);
    }
    drop(pages);
    assert_eq!(mem.stats().free, cfg.frames, "frames leaked");
}

fn base(backend: Backend, cpus: usize, budget: Budget) -> Config {
    Config {
        backend,
        cpus,
        threads: 8,
        frames: 1024,
        lw_slots: 16384,
        sf_slots: 48,
        budget,
        seed: seed(),
        granule: 1,
        reclaim: Reclaim::Lazy,
    }
}

/// 64 CPUs on the model backend for `LWBUF_SOAK_SECS` (default 15), lazy
/// reclaim, single-frame granules. Under
/// Miri (about 100x slower, on a virtual clock) `LWBUF_SOAK_OPS` operations
/// instead (default 200) on 256 frames.
#[test]
#[cfg_attr(miri, ignore = "minutes under Miri: run it with `./scripts/miri soak_model --ignored`")]
fn soak_model_64_cpus() {
    if cfg!(miri) {
        let ops = env_u64("LWBUF_SOAK_OPS").unwrap_or(MIRI_OPS);
        soak(Config { frames: MIRI_FRAMES, ..base(Backend::Model, 64, Budget::Ops(ops)) });
        return;
    }
    let secs = env_u64("LWBUF_SOAK_SECS").unwrap_or(15);
    soak(base(Backend::Model, 64, Budget::Time(Duration::from_secs(secs))));
}

/// As [`soak_model_64_cpus`], with granules of 4 frames and strict reclaim.
#[test]
#[cfg_attr(miri, ignore = "minutes under Miri: run it with `./scripts/miri soak_model --ignored`")]
fn soak_model_64_cpus_granule_4_strict() {
    let secs = env_u64("LWBUF_SOAK_SECS").unwrap_or(15);
    let budget = if cfg!(miri) {
        Budget::Ops(env_u64("LWBUF_SOAK_OPS").unwrap_or(MIRI_OPS))
    } else {
        Budget::Time(Duration::from_secs(secs))
    };
    let frames = if cfg!(miri) { MIRI_FRAMES } else { 1024 };
    soak(Config { granule: 4, reclaim: Reclaim::Strict, frames, ..base(Backend::Model, 64, budget) });
}

/// The soak's size under Miri: operations (200 take four minutes or more
/// on a 2-core machine) and frames.
const MIRI_OPS: u64 = 200;
const MIRI_FRAMES: usize = 256;

/// 64 CPUs on the real window for `LWBUF_SOAK_WINDOW_SECS` (default 5).
#[test]
#[cfg_attr(miri, ignore = "the real window needs memfd_create and mmap")]
fn soak_window_64_cpus() {
    let secs = env_u64("LWBUF_SOAK_WINDOW_SECS").unwrap_or(5);
    soak(base(Backend::Window, 64, Budget::Time(Duration::from_secs(secs))));
}

/// As [`soak_window_64_cpus`], with granules of 8 frames (lazy reclaim).
#[test]
#[cfg_attr(miri, ignore = "the real window needs memfd_create and mmap")]
fn soak_window_64_cpus_granule_8() {
    let secs = env_u64("LWBUF_SOAK_WINDOW_SECS").unwrap_or(5);
    soak(Config { granule: 8, ..base(Backend::Window, 64, Budget::Time(Duration::from_secs(secs))) });
}

/// The long run: 256 CPUs, `LWBUF_SOAK_OPS` operations (default 10^7), the
/// real window. See the module docs for the command.
#[test]
#[ignore = "long: run with --ignored (see the module docs)"]
fn soak_long_window_256_cpus() {
    let ops = env_u64("LWBUF_SOAK_OPS").unwrap_or(10_000_000);
    soak(base(Backend::Window, 256, Budget::Ops(ops)));
}
