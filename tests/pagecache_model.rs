//! Property test: random operations on 1 to 3 files through a page cache
//! (writes at random offsets, extending files too; reads; flush; fsync;
//! `set_budget`; `revalidate`; holds on pages from `page()` kept and let
//! go; `close` and a fresh `open`) with faults injected by `FaultyFileIo`
//! (`EIO` on fills, `EIO` or `ENOSPC` on write-backs, `EIO` on fsync),
//! over `MemFileIo` and over real files, agree with a reference model:
//! each file's bytes as its writes made them.
//!
//! What must hold:
//! - every read that succeeds gives the model's bytes, and the file's
//!   length is the model's after every operation;
//! - after a flush or fsync that returns `Ok`, the file on disk is the
//!   model byte for byte (a failed one leaves the blocks dirty in the
//!   cache; the disk may hold any part of them);
//! - a write that fails (its fill failed) has written a whole number of
//!   its pages, in order, and nothing else;
//! - with no page held and no write-back able to fail since the budget
//!   was last set or a page was last filled, no more than the budget is
//!   resident; with no page held, the frames in use are the resident
//!   pages.
//!
//! Cases: 64 per file system (4 under Miri); `PAGECACHE_MODEL_CASES` sets
//! another number.

use std::sync::Arc;

use lwbuf::pagecache::{CachedFile, FaultyFileIo, PageCache, PageCacheStats};
use lwbuf::{Error, Fault, Page};
use proptest::prelude::*;

#[path = "common/pagecache_env.rs"]
mod env;
use env::{pattern, Env, Fs};

/// Frames of the memory: room for the largest budget, the holds and
/// fills over the budget.
const FRAMES: usize = 24;
const MAX_BUDGET: usize = 8;
const MAX_HOLDS: usize = 4;
/// Offsets reach this many pages (files start shorter: writes grow them).
const SPAN_PAGES: usize = 8;

#[derive(Clone, Debug)]
enum Op {
    Write { file: usize, off: usize, len: usize, seed: u8 },
    Read { file: usize, off: usize, len: usize },
    Flush(usize),
    Fsync(usize),
    SetBudget(usize),
    Revalidate(usize),
    Hold { file: usize, page: usize },
    DropHold(usize),
    Reopen(usize),
    FailFills(u64),
    FailWriteBacks { nth: u64, every_after: bool, enospc: bool },
    FailSyncs(u64),
    ClearFaults,
}

fn op(ps: usize) -> impl Strategy<Value = Op> {
    let span = SPAN_PAGES * ps;
    let len = prop_oneof![0..16usize, 0..ps + 16, ps - 8..2 * ps + 8];
    prop_oneof![
        6 => (0..3usize, 0..span, len.clone(), any::<u8>())
            .prop_map(|(file, off, len, seed)| Op::Write { file, off, len, seed }),
        5 => (0..3usize, 0..span + 64, len).prop_map(|(file, off, len)| Op::Read { file, off, len }),
        2 => (0..3usize).prop_map(Op::Flush),
        2 => (0..3usize).prop_map(Op::Fsync),
        1 => (1..=MAX_BUDGET).prop_map(Op::SetBudget),
        1 => (0..3usize).prop_map(Op::Revalidate),
        1 => (0..3usize, 0..SPAN_PAGES).prop_map(|(file, page)| Op::Hold { file, page }),
        1 => (0..MAX_HOLDS).prop_map(Op::DropHold),
        1 => (0..3usize).prop_map(Op::Reopen),
        1 => (1..4u64).prop_map(Op::FailFills),
        1 => (1..4u64, any::<bool>(), any::<bool>())
            .prop_map(|(nth, every_after, enospc)| Op::FailWriteBacks { nth, every_after, enospc }),
        1 => (1..3u64).prop_map(Op::FailSyncs),
        1 => Just(Op::ClearFaults),
    ]
}

#[derive(Clone, Debug)]
struct Case {
    /// Each file's length at the start (1 to 3 files).
    lens: Vec<usize>,
    budget: usize,
    block_size: usize,
    ops: Vec<Op>,
}

fn case(ps: usize, max_ops: usize) -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec(0..6 * ps, 1..=3),
        1..=MAX_BUDGET,
        prop_oneof![Just(512usize), Just(1024), Just(ps)],
        proptest::collection::vec(op(ps), 1..max_ops),
    )
        .prop_map(|(lens, budget, block_size, ops)| Case { lens, budget, block_size, ops })
}

struct Run {
    env: Env,
    faulty: Arc<FaultyFileIo>,
    cache: PageCache,
    files: Vec<CachedFile>,
    model: Vec<Vec<u8>>,
    holds: Vec<Page>,
    budget: usize,
    /// A write-back fault has been armed since the faults were last
    /// cleared.
    writes_may_fail: bool,
    /// The cache may be above its budget: pages were held, or a write-back
    /// could fail, since a `set_budget` last brought it under.
    may_exceed: bool,
}

fn name(i: usize) -> String {
    format!("f{i}")
}

/// The errors a fill may give here: the injected `EIO`, or no frame left
/// when write-backs fail and keep their pages.
fn fill_error(e: &Error, what: &str) {
    match e {
        Error::Sys { op: "preadv(fill)", .. } if e.errno() == Some(libc::EIO) => {}
        Error::OutOfFrames { .. } => {}
        other => panic!("{what}: not an injected fault: {other:?}"),
    }
}

/// The errors a flush may give here: an injected write-back fault (now or
/// remembered from an eviction).
fn write_back_error(e: &Error, what: &str) {
    match e {
        Error::Sys { op: "pwritev(write-back)", .. } if matches!(e.errno(), Some(libc::EIO | libc::ENOSPC)) => {}
        other => panic!("{what}: not an injected fault: {other:?}"),
    }
}

impl Run {
    fn new(fs: Fs, c: &Case) -> Run {
        let env = Env::new(fs, FRAMES);
        let faulty = env.faulty();
        let cache = PageCache::builder(&env.phys)
            .budget(c.budget)
            .block_size(c.block_size)
            .io(faulty.clone())
            .build()
            .expect("cache");
        let mut files = Vec::new();
        let mut model = Vec::new();
        for (i, &len) in c.lens.iter().enumerate() {
            let data = pattern(len, i as u8);
            let path = env.put(&name(i), &data);
            files.push(cache.open(&path).expect("open"));
            model.push(data);
        }
        Run {
            env,
            faulty,
            cache,
            files,
            model,
            holds: Vec::new(),
            budget: c.budget,
            writes_may_fail: false,
            may_exceed: false,
        }
    }

    fn ps(&self) -> usize {
        self.env.ps()
    }

    /// The cache's view of file `f`, whole, read with no fault armed.
    fn cached(&self, f: usize) -> Vec<u8> {
        let file = &self.files[f];
        let mut buf = vec![0u8; file.len() as usize];
        let n = file.read_at(0, &mut buf).expect("read with no fault armed");
        assert_eq!(n, buf.len());
        buf
    }

    fn disk_is_model(&self, f: usize, what: &str) {
        let disk = self.env.disk(&name(f));
        if disk != self.model[f] {
            let at = disk.iter().zip(&self.model[f]).position(|(a, b)| a != b);
            panic!(
                "{what}: file {f} on disk ({} bytes) is not the model ({} bytes); first difference at {at:?}",
                disk.len(),
                self.model[f].len()
            );
        }
    }

    fn clear_faults(&mut self) {
        self.faulty.clear();
        self.writes_may_fail = false;
    }

    fn step(&mut self, op: &Op) {
        let nfiles = self.files.len();
        let ps = self.ps();
        match *op {
            Op::Write { file, off, len, seed } => {
                let f = file % nfiles;
                let data: Vec<u8> = (0..len).map(|k| (k as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect();
                match self.files[f].write_at(off as u64, &data) {
                    Ok(()) => apply(&mut self.model[f], off, &data),
                    Err(e) => {
                        fill_error(&e, "write_at");
                        // Pages are written in order, each whole or not at
                        // all: find how many, with faults cleared.
                        self.clear_faults();
                        let got = self.cached(f);
                        let ends =
                            std::iter::once(off).chain((off / ps + 1..).map(|p| p * ps).take_while(|&b| b < off + len));
                        let mut found = None;
                        for end in ends {
                            let mut m = self.model[f].clone();
                            if end > off {
                                apply(&mut m, off, &data[..end - off]);
                            }
                            if m == got {
                                found = Some(m);
                                break;
                            }
                        }
                        self.model[f] = found.unwrap_or_else(|| {
                            panic!(
                                "a failed write_at({off}, {len}) left the file in no state a prefix of pages explains"
                            )
                        });
                    }
                }
            }
            Op::Read { file, off, len } => {
                let f = file % nfiles;
                let mut buf = vec![0u8; len];
                match self.files[f].read_at(off as u64, &mut buf) {
                    Ok(n) => {
                        let m = &self.model[f];
                        let want = m.len().saturating_sub(off).min(len);
                        assert_eq!(n, want, "read_at({off}, {len}) of file {f}");
                        let from = off.min(m.len());
                        assert!(buf[..n] == m[from..from + n], "read_at({off}, {len}) of file {f}: not the model");
                    }
                    Err(e) => fill_error(&e, "read_at"),
                }
            }
            Op::Flush(file) | Op::Fsync(file) => {
                let f = file % nfiles;
                let sync = matches!(op, Op::Fsync(_));
                let r = if sync { self.files[f].fsync() } else { self.files[f].flush() };
                match r {
                    Ok(()) => self.disk_is_model(f, if sync { "after fsync" } else { "after flush" }),
                    Err(e) if sync && matches!(e, Error::Sys { op: "fsync", .. }) => {
                        assert_eq!(e.errno(), Some(libc::EIO));
                        // The flush before it succeeded.
                        self.disk_is_model(f, "after a flush whose fsync failed");
                    }
                    Err(e) => write_back_error(&e, "flush"),
                }
            }
            Op::SetBudget(b) => {
                let left = self.cache.set_budget(b).expect("set_budget");
                self.budget = b;
                if self.holds.is_empty() && !self.writes_may_fail {
                    assert!(left <= b, "set_budget({b}) left {left} resident");
                    self.may_exceed = false;
                }
            }
            Op::Revalidate(file) => {
                let f = file % nfiles;
                self.files[f].revalidate().expect("revalidate");
            }
            Op::Hold { file, page } => {
                let f = file % nfiles;
                if self.holds.len() >= MAX_HOLDS {
                    return;
                }
                match self.files[f].page(page as u64) {
                    Ok(p) => {
                        let m = &self.model[f];
                        assert!(page * ps < m.len(), "page({page}) of a file of {} bytes", m.len());
                        let n = (m.len() - page * ps).min(ps);
                        let mut got = vec![0u8; n];
                        p.direct().expect("direct").read_at(0, &mut got).expect("read the frame");
                        assert!(got == m[page * ps..page * ps + n], "page({page}) of file {f}: not the model");
                        self.holds.push(p);
                        self.may_exceed = true;
                    }
                    Err(Error::OutOfBounds { .. }) => assert!(page * ps >= self.model[f].len()),
                    Err(e) => fill_error(&e, "page"),
                }
            }
            Op::DropHold(k) => {
                if !self.holds.is_empty() {
                    let k = k % self.holds.len();
                    self.holds.swap_remove(k);
                }
            }
            Op::Reopen(file) => {
                let f = file % nfiles;
                let path = self.env.path(&name(f));
                match self.cache.close(&path) {
                    Ok(()) => {
                        self.disk_is_model(f, "after close");
                        self.files[f] = self.cache.open(&path).expect("open again");
                    }
                    Err(e) => write_back_error(&e, "close"),
                }
            }
            Op::FailFills(n) => self.faulty.fail_reads(Some(Fault::nth(n, libc::EIO))),
            Op::FailWriteBacks { nth, every_after, enospc } => {
                let errno = if enospc { libc::ENOSPC } else { libc::EIO };
                let fault = if every_after { Fault::from_nth(nth, errno) } else { Fault::nth(nth, errno) };
                self.faulty.fail_writes(Some(fault));
                self.writes_may_fail = true;
                self.may_exceed = true;
            }
            Op::FailSyncs(n) => self.faulty.fail_syncs(Some(Fault::nth(n, libc::EIO))),
            Op::ClearFaults => self.clear_faults(),
        }
    }

    fn check(&mut self, i: usize, op: &Op, before: &PageCacheStats) {
        for (f, file) in self.files.iter().enumerate() {
            assert_eq!(file.len(), self.model[f].len() as u64, "step {i} ({op:?}): length of file {f}");
        }
        let s = self.cache.stats();
        // A fill with nothing held and every write-back working evicts
        // until it fits: the cache is back under its budget.
        if s.misses > before.misses && self.holds.is_empty() && !self.writes_may_fail {
            self.may_exceed = false;
        }
        if !self.may_exceed {
            assert!(s.resident <= self.budget, "step {i} ({op:?}): {} resident, budget {}", s.resident, self.budget);
        }
        if self.holds.is_empty() {
            assert_eq!(self.env.frames_used(), s.resident, "step {i} ({op:?}): frames in use");
        }
    }

    /// With the faults cleared, every file fsyncs and is the model on disk.
    fn finish(mut self) {
        self.clear_faults();
        self.holds.clear();
        for f in 0..self.files.len() {
            // An error an eviction met may still be owed to this file: told
            // once, then the next is Ok.
            if let Err(e) = self.files[f].fsync() {
                write_back_error(&e, "the last fsync");
                self.files[f].fsync().expect("the fsync after the owed error");
            }
            self.disk_is_model(f, "at the end");
            assert_eq!(self.cached(f), self.model[f]);
        }
        let s = self.cache.stats();
        assert_eq!(s.dirty, 0);
        assert_eq!(self.env.frames_used(), s.resident);
    }
}

fn apply(m: &mut Vec<u8>, off: usize, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    if m.len() < off + data.len() {
        m.resize(off + data.len(), 0);
    }
    m[off..off + data.len()].copy_from_slice(data);
}

fn run(fs: Fs, c: &Case) {
    let mut r = Run::new(fs, c);
    for (i, op) in c.ops.iter().enumerate() {
        let before = r.cache.stats();
        r.step(op);
        r.check(i, op, &before);
    }
    r.finish();
}

fn cases() -> u32 {
    if cfg!(miri) {
        return 4;
    }
    std::env::var("PAGECACHE_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

/// Under Miri no failure file: persistence looks for the source directory.
fn settings() -> ProptestConfig {
    let base = ProptestConfig { cases: cases(), ..ProptestConfig::default() };
    if cfg!(miri) {
        ProptestConfig { failure_persistence: None, ..base }
    } else {
        base
    }
}

const PS: usize = 4096;
const MAX_OPS: usize = if cfg!(miri) { 12 } else { 60 };

proptest! {
    #![proptest_config(settings())]

    #[test]
    fn mem_file_io_matches_the_model(c in case(PS, MAX_OPS)) {
        run(Fs::Mem, &c);
    }

    #[test]
    #[cfg_attr(miri, ignore = "real files and memfds need system calls Miri cannot run")]
    fn real_files_match_the_model(c in case(PS, MAX_OPS)) {
        run(Fs::Sys, &c);
    }
}

/// A scripted sequence through the paths the random cases rely on (so a
/// runner that does nothing cannot pass): a write that grows the file, an
/// eviction whose write-back fails, the error told once, a failed fill in
/// the middle of a write, a failed fsync, holds over the budget.
#[test]
fn scripted_sequence_covers_the_paths() {
    use Op::*;
    let c = Case {
        lens: vec![3 * PS + 100, 10],
        budget: 2,
        block_size: 512,
        ops: vec![
            Write { file: 0, off: 5 * PS + 7, len: 20, seed: 1 },
            FailWriteBacks { nth: 1, every_after: true, enospc: false },
            Read { file: 0, off: 0, len: 2 * PS },
            Read { file: 1, off: 0, len: 10 },
            Flush(0),
            ClearFaults,
            Flush(0),
            Flush(0),
            Hold { file: 0, page: 0 },
            Hold { file: 0, page: 1 },
            Read { file: 0, off: 2 * PS, len: 10 },
            DropHold(0),
            DropHold(0),
            SetBudget(1),
            Read { file: 1, off: 0, len: 10 },
            FailFills(2),
            Write { file: 0, off: PS - 10, len: 2 * PS, seed: 2 },
            FailSyncs(1),
            Fsync(0),
            Fsync(0),
            Revalidate(0),
            Write { file: 1, off: 10, len: 5, seed: 3 },
            Revalidate(1),
            Reopen(1),
            Read { file: 1, off: 0, len: 100 },
        ],
    };
    for &fs in env::FILE_SYSTEMS {
        let mut r = Run::new(fs, &c);
        for (i, op) in c.ops.iter().enumerate() {
            let before = r.cache.stats();
            r.step(op);
            r.check(i, op, &before);
            let after = r.cache.stats();
            match i {
                2 => assert!(
                    after.writeback_errors > before.writeback_errors,
                    "{fs:?}: the eviction's write-back failed"
                ),
                6 => assert_eq!(after.dirty, 0, "{fs:?}: the flush after clearing the faults wrote everything"),
                10 => assert!(after.over_budget > before.over_budget, "{fs:?}: two pages held, budget 2"),
                16 => assert!(after.fill_errors > before.fill_errors, "{fs:?}: the write's second fill failed"),
                _ => {}
            }
        }
        // The failed write's first page was written (its first byte is
        // (0 * 31 + 2) | 1).
        assert_eq!(r.model[0][PS - 10], 3, "{fs:?}");
        assert_eq!(r.model[1].len(), 15);
        r.finish();
    }
}
