//! Random operation sequences against the lwbuf caches and the sf_buf pool,
//! checked step by step against a small reference model.
//!
//! Shared, through `#[path]`, by `tests/proptest_model.rs` (proptest) and
//! `fuzz/fuzz_targets/lwbuf_ops.rs` (cargo-fuzz): both build [`Op`]s from
//! three bytes each ([`Op::from_parts`], [`decode`]) and run them with
//! [`run`], which panics at the first difference between the library and the
//! model.
//!
//! The system: 4 CPUs, 16 frames (one contiguous run) plus one frame of
//! another `PhysMem`; an lwbuf window far larger than anything the sequences
//! can map (so slot allocation never evicts, and the model can leave slots
//! out), and an sf_buf window of 6 slots (so the pool fills, evicts for room
//! and answers `WouldBlock`). Two threads: the driver, and a helper that
//! binds a CPU of its own and otherwise stays idle, so messages to its CPU
//! wait in the mailbox until it (or someone on its behalf) applies them.
//!
//! The model keeps, per CPU: `key -> refcount`, the clock queue of unused
//! entries (front = oldest release) with its queued and referenced marks,
//! the mailbox, and the counters; per handle:
//! its key, home and cpumask; for the pool: `frame -> {refcount, referenced,
//! on the LRU}` and the clock LRU. It predicts every result (`Ok`, or which
//! error), every counter of `Lwbufs::stats` and `SfPool::stats` (hits,
//! misses, evictions, mapped, cached, mailbox lengths, messages sent and
//! applied, no-wait failures), the MMU's enter and remove calls, and the
//! reference total `check_consistency` returns. It also checks that every
//! address handed out reads its own frame, and that an entry keeps its
//! address for as long as it stays mapped.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::{mpsc, Arc};

use lwbuf::{Backing, CpuGuard, Error, Lwbuf, Lwbufs, Mmu, ModelMmu, Page, PhysMem, SfBuf, SfPool, Wait, Window};

/// CPUs of the system.
pub const CPUS: usize = 4;
/// Frames of the memory (one contiguous run).
pub const FRAMES: usize = 16;
/// Slots of the lwbuf window: more than any sequence can use (at most
/// `MAX_OPS` handles of at most 4 pages on each of `CPUS` CPUs, plus the
/// free slots each CPU keeps).
pub const LW_SLOTS: usize = 2048;
/// Slots of the sf_buf window: few, so it fills.
pub const SF_SLOTS: usize = 6;
/// Operations per sequence at most (the fuzz decoder stops there).
pub const MAX_OPS: usize = 256;

/// Which MMU the system runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The real reserved window over a memfd.
    Window,
    /// The model MMU over heap memory.
    Model,
}

/// One operation. Indices into handle lists are taken modulo their length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// The driver binds CPU `c` (`c >= CPUS`: no such CPU), without
    /// unbinding first.
    Bind(u8),
    /// The driver drops its CPU guard.
    Unbind,
    /// The helper drops its guard, then binds CPU `c`.
    HelperBind(u8),
    /// The helper drops its guard.
    HelperUnbind,
    /// The helper calls `poll`.
    HelperPoll,
    /// `alloc` of frame `f` (`f == FRAMES`: a frame of another memory).
    Alloc(u8),
    /// `alloc_run` of frames `start..start + len` (clamped to the memory;
    /// `len == 0`: an empty run).
    AllocRun(u8, u8),
    /// `alloc_run` of pages that are not a run: a gap (`kind` even) or a
    /// foreign page second (`kind` odd).
    AllocBroken(u8, u8),
    /// The driver takes handle `i`'s address on its CPU.
    Kva(u8),
    /// The driver drops handle `i` (on its CPU, or with none).
    Drop(u8),
    /// The helper takes handle `i`'s address on its CPU.
    HelperKva(u8),
    /// The helper drops handle `i` (on its CPU, or with none).
    HelperDrop(u8),
    /// `Lwbufs::set_max_excess(n)`.
    SetMaxExcess(u8),
    /// The driver calls `poll`.
    Poll,
    /// `Lwbufs::reclaim`.
    Reclaim,
    /// `SfPool::alloc(frame f, NoWait)` (`f == FRAMES`: foreign).
    SfAlloc(u8),
    /// Drop sf_buf `i`.
    SfDrop(u8),
    /// `SfPool::set_max_excess(n)`.
    SfSetMaxExcess(u8),
}

/// Which operation each opcode is: the common ones (alloc, drop, bind)
/// appear more often, so that sequences build up cached entries, hits,
/// evictions and messages rather than errors.
const TABLE: [u8; 35] = [
    0, 0, 0, // Bind
    1, // Unbind
    2, 2, // HelperBind
    3, // HelperUnbind
    4, // HelperPoll
    5, 5, 5, 5, 5, // Alloc
    6, 6, // AllocRun
    7, // AllocBroken
    8, 8, // Kva
    9, 9, 9, 9, // Drop
    10, 10, // HelperKva
    11, 11, // HelperDrop
    12, // SetMaxExcess
    13, // Poll
    14, // Reclaim
    15, 15, 15, // SfAlloc
    16, 16, // SfDrop
    17, // SfSetMaxExcess
];

/// Distinct opcodes of [`Op::from_parts`].
pub const OPCODES: u8 = TABLE.len() as u8;

impl Op {
    /// The operation for opcode `code` (modulo [`OPCODES`]) with arguments
    /// `a` and `b`, mapped onto the ranges that matter.
    pub fn from_parts(code: u8, a: u8, b: u8) -> Op {
        // Single pages from the first eight frames (so they hit), or the
        // foreign one.
        let frame = match a % 9 {
            8 => FRAMES as u8,
            f => f,
        };
        match TABLE[(code % OPCODES) as usize] {
            0 => Op::Bind(a % (CPUS as u8 + 1)),
            1 => Op::Unbind,
            2 => Op::HelperBind(a % (CPUS as u8 + 1)),
            3 => Op::HelperUnbind,
            4 => Op::HelperPoll,
            5 => Op::Alloc(frame),
            6 => Op::AllocRun(a % FRAMES as u8, b % 5),
            7 => Op::AllocBroken(a % (FRAMES as u8 - 2), b),
            8 => Op::Kva(a),
            9 => Op::Drop(a),
            10 => Op::HelperKva(a),
            11 => Op::HelperDrop(a),
            12 => Op::SetMaxExcess(a % 6),
            13 => Op::Poll,
            14 => Op::Reclaim,
            15 => {
                // Eight frames, so the six slots fill; the ninth is foreign.
                let f = a % 9;
                Op::SfAlloc(if f == 8 { FRAMES as u8 } else { f })
            }
            16 => Op::SfDrop(a),
            _ => Op::SfSetMaxExcess(a % 5),
        }
    }
}

/// Decode fuzz input: three bytes per operation (a short tail is ignored),
/// at most [`MAX_OPS`].
pub fn decode(data: &[u8]) -> Vec<Op> {
    data.chunks_exact(3).take(MAX_OPS).map(|c| Op::from_parts(c[0], c[1], c[2])).collect()
}

// === the reference model ===

/// A cache key: first frame and length.
type Key = (usize, usize);

/// What an operation returned: `Ok`, or the error's variant name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Err(&'static str),
}

fn outcome<T>(r: &Result<T, Error>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Err(err_name(e)),
    }
}

fn err_name(e: &Error) -> &'static str {
    match e {
        Error::Config { .. } => "Config",
        Error::OutOfFrames { .. } => "OutOfFrames",
        Error::WindowFull { .. } => "WindowFull",
        Error::MapLimit { .. } => "MapLimit",
        Error::WouldBlock => "WouldBlock",
        Error::TimedOut => "TimedOut",
        Error::Cancelled => "Cancelled",
        Error::Closed => "Closed",
        Error::ForeignPage => "ForeignPage",
        Error::OutOfBounds { .. } => "OutOfBounds",
        Error::NotBound => "NotBound",
        Error::NoSuchCpu { .. } => "NoSuchCpu",
        Error::CpuBusy { .. } => "CpuBusy",
        Error::AlreadyBound { .. } => "AlreadyBound",
        Error::NoDirectMap => "NoDirectMap",
        Error::Sys { .. } => "Sys",
        _ => "other",
    }
}

#[derive(Debug, Default, Clone)]
struct CpuModel {
    refs: BTreeMap<Key, u32>,
    /// The clock queue, oldest release first: every unused entry, and used
    /// ones the hand has not passed since they were re-used.
    clock: VecDeque<Key>,
    /// Entries on the clock queue.
    queued: BTreeSet<Key>,
    /// Queued entries released again since the hand last saw them.
    referenced: BTreeSet<Key>,
    mailbox: Vec<Key>,
    /// Address of each mapped entry, once seen.
    addr: HashMap<Key, usize>,
    allocs: u64,
    hits: u64,
    misses: u64,
    foreign: u64,
    sent: u64,
    applied: u64,
    evictions: u64,
}

impl CpuModel {
    /// Entries with a count of zero (cached unused).
    fn unused(&self) -> usize {
        self.refs.values().filter(|&&r| r == 0).count()
    }
}

#[derive(Debug, Clone)]
struct HandleModel {
    key: Key,
    home: usize,
    mask: BTreeSet<usize>,
}

#[derive(Debug, Clone, Copy, Default)]
struct SfEntry {
    refs: u32,
    referenced: bool,
    on_lru: bool,
}

#[derive(Debug, Default, Clone)]
struct SfModel {
    entries: BTreeMap<usize, SfEntry>,
    lru: VecDeque<usize>,
    addr: HashMap<usize, usize>,
    max_excess: usize,
    hits: u64,
    misses: u64,
    evictions: u64,
    nowait_fails: u64,
    enters: u64,
    removes: u64,
}

/// The reference model of the whole system.
#[derive(Debug, Clone)]
struct Model {
    cpus: Vec<CpuModel>,
    max_excess: usize,
    main_cpu: Option<usize>,
    helper_cpu: Option<usize>,
    handles: Vec<HandleModel>,
    unbound_sent: u64,
    enters: u64,
    removes: u64,
    sf: SfModel,
    sf_handles: Vec<usize>,
}

/// Mailbox length at which a sender drains an idle owner's mailbox for it
/// (the library's `MAILBOX_DRAIN_AT`).
const MAILBOX_DRAIN_AT: usize = 256;

impl Model {
    fn new(max_excess: usize, sf_max_excess: usize) -> Model {
        Model {
            cpus: vec![CpuModel::default(); CPUS],
            max_excess,
            main_cpu: None,
            helper_cpu: None,
            handles: Vec::new(),
            unbound_sent: 0,
            enters: 0,
            removes: 0,
            sf: SfModel { max_excess: sf_max_excess, ..SfModel::default() },
            sf_handles: Vec::new(),
        }
    }

    fn is_bound(&self, cpu: usize) -> bool {
        self.main_cpu == Some(cpu) || self.helper_cpu == Some(cpu)
    }

    fn decref(&mut self, cpu: usize, key: Key) {
        let c = &mut self.cpus[cpu];
        let r = c.refs.get_mut(&key).unwrap_or_else(|| panic!("model: decref of {key:?} on CPU {cpu}: no entry"));
        assert!(*r > 0, "model: decref of unreferenced {key:?} on CPU {cpu}");
        *r -= 1;
        if *r == 0 {
            if c.queued.contains(&key) {
                c.referenced.insert(key);
            } else {
                c.queued.insert(key);
                c.clock.push_back(key);
            }
        }
    }

    /// The clock hand (the library's order: see `src/lwbuf/pcpu.rs`).
    fn evict_one(&mut self, cpu: usize) -> bool {
        let c = &mut self.cpus[cpu];
        let key = loop {
            let Some(key) = c.clock.pop_front() else { return false };
            c.queued.remove(&key);
            if c.refs[&key] > 0 {
                continue;
            }
            if c.referenced.remove(&key) {
                c.queued.insert(key);
                c.clock.push_back(key);
                continue;
            }
            break key;
        };
        c.refs.remove(&key);
        c.addr.remove(&key);
        c.evictions += 1;
        self.removes += 1;
        true
    }

    fn trim(&mut self, cpu: usize, max: usize) {
        while self.cpus[cpu].unused() > max {
            self.evict_one(cpu);
        }
    }

    fn drain(&mut self, cpu: usize, max: usize) {
        for key in std::mem::take(&mut self.cpus[cpu].mailbox) {
            self.cpus[cpu].applied += 1;
            self.decref(cpu, key);
        }
        self.trim(cpu, max);
    }

    /// The owner's entry into its cache: pending mail, then the limit.
    fn enter_cpu(&mut self, cpu: usize) {
        if !self.cpus[cpu].mailbox.is_empty() || self.cpus[cpu].unused() > self.max_excess {
            self.drain(cpu, self.max_excess);
        }
    }

    fn acquire(&mut self, cpu: usize, key: Key) {
        self.enter_cpu(cpu);
        let c = &mut self.cpus[cpu];
        c.allocs += 1;
        match c.refs.get_mut(&key) {
            Some(r) => {
                *r += 1;
                c.hits += 1;
            }
            None => {
                c.refs.insert(key, 1);
                c.misses += 1;
                self.enters += 1;
            }
        }
    }

    fn send_decref(&mut self, from: Option<usize>, cpu: usize, key: Key) {
        self.cpus[cpu].mailbox.push(key);
        let queued = self.cpus[cpu].mailbox.len();
        match from {
            Some(f) => self.cpus[f].sent += 1,
            None => self.unbound_sent += 1,
        }
        if !self.is_bound(cpu) || queued >= MAILBOX_DRAIN_AT {
            self.drain(cpu, self.max_excess);
        }
    }

    /// An lwbuf handle released by a thread bound to `me`.
    fn release(&mut self, h: HandleModel, me: Option<usize>) {
        let max = self.max_excess;
        if me == Some(h.home) {
            self.enter_cpu(h.home);
            self.decref(h.home, h.key);
            self.trim(h.home, max);
            if h.mask.len() == 1 {
                return;
            }
        }
        for &cpu in &h.mask {
            if Some(cpu) == me {
                if cpu != h.home {
                    self.enter_cpu(cpu);
                    self.decref(cpu, h.key);
                    self.trim(cpu, max);
                }
            } else {
                self.send_decref(me, cpu, h.key);
            }
        }
    }

    /// A handle's address taken on `cpu` (bound): the model's side effects.
    fn kva(&mut self, i: usize, cpu: usize) {
        let (home, key, known) = {
            let h = &self.handles[i];
            (h.home, h.key, h.mask.contains(&cpu))
        };
        if cpu == home {
            return;
        }
        if known {
            self.enter_cpu(cpu);
            return;
        }
        self.acquire(cpu, key);
        self.enter_cpu(cpu);
        self.cpus[cpu].foreign += 1;
        self.handles[i].mask.insert(cpu);
    }

    fn unbind(&mut self, cpu: usize) {
        self.drain(cpu, self.max_excess);
    }

    fn bind_result(&self, cpu: usize, me_bound: Option<usize>) -> Outcome {
        if cpu >= CPUS {
            Outcome::Err("NoSuchCpu")
        } else if me_bound.is_some() {
            Outcome::Err("AlreadyBound")
        } else if self.is_bound(cpu) {
            Outcome::Err("CpuBusy")
        } else {
            Outcome::Ok
        }
    }

    fn set_max_excess(&mut self, n: usize) {
        self.max_excess = n;
        for cpu in 0..CPUS {
            self.drain(cpu, n);
        }
    }

    fn reclaim(&mut self) {
        for cpu in 0..CPUS {
            self.drain(cpu, usize::MAX);
            while self.evict_one(cpu) {}
        }
    }

    fn total_refs(&self) -> u64 {
        self.cpus.iter().flat_map(|c| c.refs.values()).map(|&r| r as u64).sum()
    }

    // --- the sf_buf pool ---

    fn sf_evict_one(&mut self) -> bool {
        let sf = &mut self.sf;
        let mut budget = 2 * sf.lru.len() + 2;
        while budget > 0 {
            budget -= 1;
            let Some(f) = sf.lru.pop_front() else { return false };
            let e = sf.entries.get_mut(&f).expect("model: LRU entry exists");
            if e.refs != 0 {
                e.on_lru = false;
                e.referenced = false;
            } else if e.referenced {
                e.referenced = false;
                sf.lru.push_back(f);
            } else {
                sf.entries.remove(&f);
                sf.addr.remove(&f);
                sf.evictions += 1;
                sf.removes += 1;
                return true;
            }
        }
        false
    }

    fn sf_trim(&mut self) {
        while self.sf.lru.len() > self.sf.max_excess {
            if !self.sf_evict_one() {
                break;
            }
        }
    }

    fn sf_alloc(&mut self, f: usize) -> Outcome {
        if let Some(e) = self.sf.entries.get_mut(&f) {
            e.refs += 1;
            e.referenced = true;
            self.sf.hits += 1;
            return Outcome::Ok;
        }
        if self.sf.entries.len() >= SF_SLOTS && !self.sf_evict_one() {
            self.sf.nowait_fails += 1;
            return Outcome::Err("WouldBlock");
        }
        self.sf.entries.insert(f, SfEntry { refs: 1, referenced: true, on_lru: false });
        self.sf.misses += 1;
        self.sf.enters += 1;
        Outcome::Ok
    }

    fn sf_release(&mut self, f: usize) {
        let e = self.sf.entries.get_mut(&f).expect("model: released entry exists");
        e.refs -= 1;
        if e.refs == 0 && !e.on_lru {
            e.on_lru = true;
            self.sf.lru.push_back(f);
        }
        if self.sf.lru.len() > self.sf.max_excess {
            self.sf_trim();
        }
    }
}

// === the helper thread ===

enum Cmd<'a> {
    Bind(usize),
    Unbind,
    Poll,
    Kva(Lwbuf<'a>),
    Drop(Lwbuf<'a>),
}

enum Reply<'a> {
    Done(Result<(), Error>),
    Kva(Lwbuf<'a>, Result<Seen, Error>),
}

/// What an address read: its value and the first word of each page.
#[derive(Debug)]
struct Seen {
    addr: usize,
    words: Vec<u64>,
}

fn look(h: &Lwbuf<'_>, fs: usize) -> Result<Seen, Error> {
    let k = h.kva()?;
    let words = (0..h.pages().len()).map(|i| k.read_u64(i * fs)).collect::<Result<_, _>>()?;
    Ok(Seen { addr: k.addr(), words })
}

fn helper<'a>(lw: &'a Lwbufs, fs: usize, rx: mpsc::Receiver<Cmd<'a>>, tx: mpsc::Sender<Reply<'a>>) {
    let mut guard: Option<CpuGuard<'a>> = None;
    for cmd in rx {
        let reply = match cmd {
            Cmd::Bind(cpu) => {
                drop(guard.take());
                Reply::Done(lw.bind(cpu).map(|g| guard = Some(g)))
            }
            Cmd::Unbind => {
                drop(guard.take());
                Reply::Done(Ok(()))
            }
            Cmd::Poll => Reply::Done(lw.poll()),
            Cmd::Kva(h) => {
                let r = look(&h, fs);
                Reply::Kva(h, r)
            }
            Cmd::Drop(h) => {
                drop(h);
                Reply::Done(Ok(()))
            }
        };
        if tx.send(reply).is_err() {
            return;
        }
    }
}

// === the driver ===

struct Sys {
    mem: PhysMem,
    pages: Vec<Page>,
    foreign: Page,
    lw: Lwbufs,
    pool: SfPool,
}

fn system(b: Backend) -> Sys {
    let backing = if b == Backend::Window { Backing::Memfd } else { Backing::Heap };
    let mem = PhysMem::builder().frames(FRAMES).backing(backing).build().unwrap();
    let other = PhysMem::builder().frames(1).backing(backing).build().unwrap();
    let mmu = |slots: usize| -> Arc<dyn Mmu> {
        match b {
            Backend::Window => Arc::new(Window::builder(&mem).slots(slots).build().unwrap()),
            Backend::Model => Arc::new(ModelMmu::new(&mem, slots).unwrap()),
        }
    };
    let pages = mem.alloc_run(FRAMES).unwrap();
    for p in &pages {
        p.direct().unwrap().write_u64(0, stamp(p.pfn().0)).unwrap();
    }
    // An explicit budget (far above anything mapped here): no reading of
    // /proc per system, which a fuzz execution would pay each time.
    let lw = Lwbufs::builder(mmu(LW_SLOTS)).cpus(CPUS).max_excess(2).map_budget(1 << 20).build().unwrap();
    let pool = SfPool::builder(mmu(SF_SLOTS)).max_excess(2).map_budget(1 << 20).shards(8).build().unwrap();
    let foreign = other.alloc_page().unwrap();
    Sys { mem, pages, foreign, lw, pool }
}

fn stamp(pfn: usize) -> u64 {
    0xf00d_0000_0000_0000 | pfn as u64
}

/// The channels to the helper thread, and its handle.
type Link<'a, 's> = (mpsc::Sender<Cmd<'a>>, mpsc::Receiver<Reply<'a>>, std::thread::ScopedJoinHandle<'s, ()>);

/// Everything the driver holds, and the model alongside.
struct Run<'a, 's> {
    sys: &'a Sys,
    fs: usize,
    backend: Backend,
    model: Model,
    guard: Option<CpuGuard<'a>>,
    handles: Vec<Lwbuf<'a>>,
    sf: Vec<SfBuf<'a>>,
    scope: &'s std::thread::Scope<'s, 'a>,
    /// The helper, spawned at its first command (most short sequences need
    /// none, and a thread is the dearest part of a fuzz execution).
    helper: Option<Link<'a, 's>>,
    step: usize,
    op: Op,
}

impl fmt::Debug for Run<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {} ({:?})", self.step, self.op)
    }
}

impl<'a, 's> Run<'a, 's> {
    fn ask(&mut self, c: Cmd<'a>) -> Reply<'a> {
        let (lw, fs) = (&self.sys.lw, self.fs);
        let (cmd, reply, _) = self.helper.get_or_insert_with(|| {
            let (cmd_tx, cmd_rx) = mpsc::channel();
            let (rep_tx, rep_rx) = mpsc::channel();
            let t = self.scope.spawn(move || helper(lw, fs, cmd_rx, rep_tx));
            (cmd_tx, rep_rx, t)
        });
        cmd.send(c).expect("helper alive");
        reply.recv().expect("helper replies")
    }

    fn done(&mut self, c: Cmd<'a>) -> Result<(), Error> {
        match self.ask(c) {
            Reply::Done(r) => r,
            Reply::Kva(..) => unreachable!(),
        }
    }

    #[track_caller]
    fn expect(&self, got: Outcome, want: Outcome) {
        assert_eq!(got, want, "{self:?}: result");
    }

    /// Check what an address shows, and remember it for its entry.
    #[track_caller]
    fn saw(&mut self, cpu: usize, key: Key, seen: &Seen) {
        let want: Vec<u64> = (0..key.1).map(|i| stamp(key.0 + i)).collect();
        assert_eq!(seen.words, want, "{self:?}: frames {key:?} read through {:#x} on CPU {cpu}", seen.addr);
        let (fs, at) = (self.fs, format!("{self:?}"));
        let c = &mut self.model.cpus[cpu];
        if let Some(&a) = c.addr.get(&key) {
            assert_eq!(a, seen.addr, "{at}: entry {key:?} on CPU {cpu} moved while mapped");
        } else {
            if self.backend == Backend::Window {
                // In the real window, entries of one CPU never share a slot
                // (the model MMU's address is the frame's own, shared by
                // design).
                let (lo, hi) = (seen.addr, seen.addr + key.1 * fs);
                for (k, &a) in &c.addr {
                    assert!(
                        hi <= a || a + k.1 * fs <= lo,
                        "{at}: entry {key:?} at {lo:#x} overlaps entry {k:?} at {a:#x} on CPU {cpu}"
                    );
                }
            }
            c.addr.insert(key, seen.addr);
        }
    }

    fn page(&self, f: u8) -> &'a Page {
        let sys: &'a Sys = self.sys;
        if f as usize >= FRAMES {
            &sys.foreign
        } else {
            &sys.pages[f as usize]
        }
    }

    /// `pages` as a slice of `sys.pages`, if they are consecutive there.
    fn run_slice(&self, pages: &[&'a Page]) -> Option<&'a [Page]> {
        let all: &'a [Page] = &self.sys.pages;
        let head = *pages.first()?;
        let first = all.iter().position(|p| std::ptr::eq(p, head))?;
        let run = all.get(first..first + pages.len())?;
        run.iter().zip(pages).all(|(a, &b)| std::ptr::eq(a, b)).then_some(run)
    }

    fn alloc(&mut self, pages: Vec<&'a Page>, single: bool) {
        let me = self.model.main_cpu;
        // The library's order of checks: the pages first, then the CPU.
        let key = (pages.first().map_or(0, |p| p.pfn().0), pages.len());
        let shape = if pages.is_empty() {
            Some("Config")
        } else if let Some(i) = pages.iter().position(|p| !p.phys().same_as(&self.sys.mem)) {
            // A foreign page is found before any gap after it.
            let gap = pages[..i].iter().enumerate().any(|(j, p)| p.pfn().0 != key.0 + j);
            Some(if gap { "Config" } else { "ForeignPage" })
        } else if pages.iter().enumerate().any(|(j, p)| p.pfn().0 != key.0 + j) {
            Some("Config")
        } else {
            None
        };
        let want = match (shape, me) {
            (Some(e), _) => Outcome::Err(e),
            (None, None) => Outcome::Err("NotBound"),
            (None, Some(_)) => Outcome::Ok,
        };
        let r = if single {
            self.sys.lw.alloc(pages[0])
        } else if let Some(run) = self.run_slice(&pages) {
            self.sys.lw.alloc_run(run)
        } else {
            // Not consecutive in `sys.pages` (a broken run, or a foreign
            // page): a handle borrows its pages, so they go through a
            // temporary copy, and only an error may come back.
            let copy: Vec<Page> = pages.iter().map(|&p| p.clone()).collect();
            let e = match self.sys.lw.alloc_run(&copy) {
                Ok(_) => panic!("{self:?}: a broken run was mapped"),
                Err(e) => e,
            };
            Err(e)
        };
        self.expect(outcome(&r), want);
        if let (Ok(h), Some(cpu)) = (r, me) {
            self.model.acquire(cpu, key);
            // On its home CPU the address is a field: no library call.
            let seen = look(&h, self.fs).expect("kva on the home CPU");
            self.saw(cpu, key, &seen);
            self.handles.push(h);
            self.model.handles.push(HandleModel { key, home: cpu, mask: BTreeSet::from([cpu]) });
        }
    }

    fn kva(&mut self, i: u8, helper: bool) {
        if self.handles.is_empty() {
            return;
        }
        let i = i as usize % self.handles.len();
        let cpu = if helper { self.model.helper_cpu } else { self.model.main_cpu };
        let r = if helper {
            let h = self.handles.swap_remove(i);
            let Reply::Kva(h, r) = self.ask(Cmd::Kva(h)) else { unreachable!() };
            self.handles.push(h);
            let last = self.handles.len() - 1;
            self.handles.swap(i, last);
            r
        } else {
            look(&self.handles[i], self.fs)
        };
        match cpu {
            None => self.expect(outcome(&r), Outcome::Err("NotBound")),
            Some(cpu) => {
                self.expect(outcome(&r), Outcome::Ok);
                self.model.kva(i, cpu);
                let key = self.model.handles[i].key;
                self.saw(cpu, key, &r.unwrap());
            }
        }
    }

    fn drop_handle(&mut self, i: u8, helper: bool) {
        if self.handles.is_empty() {
            return;
        }
        let i = i as usize % self.handles.len();
        let h = self.handles.swap_remove(i);
        let hm = self.model.handles.swap_remove(i);
        if helper {
            self.done(Cmd::Drop(h)).unwrap();
            self.model.release(hm, self.model.helper_cpu);
        } else {
            drop(h);
            self.model.release(hm, self.model.main_cpu);
        }
    }

    fn apply(&mut self, op: Op) {
        let lw = &self.sys.lw;
        match op {
            Op::Bind(c) => {
                let c = c as usize;
                let want = self.model.bind_result(c, self.model.main_cpu);
                let r = lw.bind(c);
                self.expect(outcome(&r), want);
                if let Ok(g) = r {
                    self.guard = Some(g);
                    self.model.main_cpu = Some(c);
                }
            }
            Op::Unbind => {
                if let Some(cpu) = self.model.main_cpu.take() {
                    self.guard = None;
                    self.model.unbind(cpu);
                }
            }
            Op::HelperBind(c) => {
                let c = c as usize;
                if let Some(cpu) = self.model.helper_cpu.take() {
                    self.model.unbind(cpu);
                }
                let want = self.model.bind_result(c, None);
                let r = self.done(Cmd::Bind(c));
                self.expect(outcome(&r), want);
                if r.is_ok() {
                    self.model.helper_cpu = Some(c);
                }
            }
            Op::HelperUnbind => {
                if self.helper.is_some() {
                    self.done(Cmd::Unbind).unwrap();
                }
                if let Some(cpu) = self.model.helper_cpu.take() {
                    self.model.unbind(cpu);
                }
            }
            Op::HelperPoll => {
                let r = self.done(Cmd::Poll);
                match self.model.helper_cpu {
                    Some(cpu) => {
                        self.expect(outcome(&r), Outcome::Ok);
                        self.model.enter_cpu(cpu);
                    }
                    None => self.expect(outcome(&r), Outcome::Err("NotBound")),
                }
            }
            Op::Poll => {
                let r = lw.poll();
                match self.model.main_cpu {
                    Some(cpu) => {
                        self.expect(outcome(&r), Outcome::Ok);
                        self.model.enter_cpu(cpu);
                    }
                    None => self.expect(outcome(&r), Outcome::Err("NotBound")),
                }
            }
            Op::Alloc(f) => {
                let p = self.page(f);
                self.alloc(vec![p], true);
            }
            Op::AllocRun(start, len) => {
                let start = start as usize;
                let len = (len as usize).min(FRAMES - start);
                let pages = self.sys.pages[start..start + len].iter().collect();
                self.alloc(pages, false);
            }
            Op::AllocBroken(f, kind) => {
                let f = f as usize;
                let second = if kind % 2 == 0 { &self.sys.pages[f + 2] } else { &self.sys.foreign };
                self.alloc(vec![&self.sys.pages[f], second], false);
            }
            Op::Kva(i) => self.kva(i, false),
            Op::HelperKva(i) => self.kva(i, true),
            Op::Drop(i) => self.drop_handle(i, false),
            Op::HelperDrop(i) => self.drop_handle(i, true),
            Op::SetMaxExcess(n) => {
                let n = [0, 1, 2, 3, 8, usize::MAX][n as usize % 6];
                lw.set_max_excess(n);
                self.model.set_max_excess(n);
            }
            Op::Reclaim => {
                lw.reclaim();
                self.model.reclaim();
            }
            Op::SfAlloc(f) => {
                let p = self.page(f);
                let r = self.sys.pool.alloc(p, Wait::NoWait);
                let want =
                    if f as usize >= FRAMES { Outcome::Err("ForeignPage") } else { self.model.sf_alloc(f as usize) };
                self.expect(outcome(&r), want);
                if let Ok(sf) = r {
                    let f = f as usize;
                    let k = sf.kva();
                    assert_eq!(k.read_u64(0).unwrap(), stamp(f), "{self:?}: sf_buf of frame {f}");
                    match self.model.sf.addr.get(&f) {
                        Some(&a) => assert_eq!(a, k.addr(), "{self:?}: sf_buf of frame {f} moved while mapped"),
                        None => {
                            assert!(!self.model.sf.addr.values().any(|&a| a == k.addr()), "{self:?}: address reused");
                            self.model.sf.addr.insert(f, k.addr());
                        }
                    }
                    self.sf.push(sf);
                    self.model.sf_handles.push(f);
                }
            }
            Op::SfDrop(i) => {
                if !self.sf.is_empty() {
                    let i = i as usize % self.sf.len();
                    drop(self.sf.swap_remove(i));
                    let f = self.model.sf_handles.swap_remove(i);
                    self.model.sf_release(f);
                }
            }
            Op::SfSetMaxExcess(n) => {
                let n = [0, 1, 2, 4, 64][n as usize % 5];
                self.sys.pool.set_max_excess(n);
                self.model.sf.max_excess = n;
                self.model.sf_trim();
            }
        }
    }

    /// Every observable counter against the model.
    fn compare(&self) {
        let st = self.sys.lw.stats();
        let m = &self.model;
        for (cpu, (got, want)) in st.per_cpu.iter().zip(&m.cpus).enumerate() {
            let got_t = (
                got.allocs,
                got.hits,
                got.misses,
                got.foreign,
                got.evictions,
                got.mapped,
                got.cached,
                got.mailbox,
                got.decrefs_sent,
                got.decrefs_applied,
            );
            let want_t = (
                want.allocs,
                want.hits,
                want.misses,
                want.foreign,
                want.evictions,
                want.refs.len() as u64,
                want.unused() as u64,
                want.mailbox.len() as u64,
                want.sent,
                want.applied,
            );
            assert_eq!(
                got_t, want_t,
                "{self:?}: CPU {cpu} (allocs, hits, misses, foreign, evictions, mapped, cached, mailbox, sent, \
                 applied)\nmodel: {want:?}\n{st}"
            );
        }
        assert_eq!(st.unbound_sent, m.unbound_sent, "{self:?}: unbound sends");
        assert_eq!((st.mmu.enters, st.mmu.removes), (m.enters, m.removes), "{self:?}: lwbuf MMU calls\n{st}");
        assert_eq!(self.sys.lw.check_consistency(), Ok(m.total_refs()), "{self:?}: references");

        let ss = self.sys.pool.stats();
        let used = m.sf.entries.values().filter(|e| e.refs > 0).count() as u64;
        let cached = m.sf.entries.values().filter(|e| e.refs == 0).count() as u64;
        let got =
            (ss.used, ss.cached, ss.hits, ss.misses, ss.evictions, ss.nowait_fails, ss.mmu.enters, ss.mmu.removes);
        let want = (used, cached, m.sf.hits, m.sf.misses, m.sf.evictions, m.sf.nowait_fails, m.sf.enters, m.sf.removes);
        assert_eq!(
            got, want,
            "{self:?}: sf_buf (used, cached, hits, misses, evictions, nowait_fails, enters, removes)\nmodel: {:?}\n{ss}",
            m.sf
        );
    }
}

/// Run `ops` on a fresh system over `backend`, checking every step against
/// the model; then release everything and check that nothing is left.
/// Panics at the first difference.
pub fn run(ops: &[Op], backend: Backend) {
    let sys = system(backend);
    let fs = sys.mem.frame_size();
    let lw = &sys.lw;
    std::thread::scope(|s| {
        let mut run = Run {
            sys: &sys,
            fs,
            backend,
            model: Model::new(2, 2),
            guard: None,
            handles: Vec::new(),
            sf: Vec::new(),
            scope: s,
            helper: None,
            step: 0,
            op: Op::Poll,
        };
        for (i, &op) in ops.iter().enumerate() {
            run.step = i;
            run.op = op;
            run.apply(op);
            run.compare();
        }
        // Release everything: handles on the driver's CPU (or none), the
        // helper's binding, the driver's; then nothing may be left.
        run.step = ops.len();
        while !run.handles.is_empty() {
            run.drop_handle(0, false);
        }
        run.apply(Op::HelperUnbind);
        run.apply(Op::Unbind);
        while !run.sf.is_empty() {
            run.apply(Op::SfDrop(0));
        }
        run.compare();
        if let Some((cmd, _, t)) = run.helper.take() {
            drop(cmd); // the helper exits; joined so that its thread-locals are gone too
            t.join().expect("helper");
        }
    });
    assert_eq!(lw.check_consistency(), Ok(0));
    let st = lw.stats();
    assert!(st.per_cpu.iter().all(|c| c.mailbox == 0), "stranded messages\n{st}");
    assert_eq!(st.total.decrefs_sent, st.total.decrefs_applied);
    assert_eq!(sys.pool.stats().used, 0);
    lw.reclaim();
    sys.pool.set_max_excess(0);
    assert_eq!((lw.stats().mmu.mapped, sys.pool.stats().mmu.mapped), (0, 0));
}
