//! Fault injection: every `enter` and every `remove` of a scripted workload
//! is made to fail in turn, through [`FaultyMmu`], and the library must
//! answer each with a clear error, leak nothing and keep working.
//!
//! For each backend (the real window, the model MMU), each workload (lwbuf
//! caches: alloc, `kva` on a second CPU, drops on both CPUs, eviction by the
//! excess limit and for room, run mappings, `set_max_excess`, `reclaim`;
//! sf_buf pool: alloc, runs, `alloc_all`, eviction for room and by the cap),
//! each errno (`ENOMEM`, `EINVAL`, `EAGAIN`), each mode (only the N-th call
//! fails, or the N-th and every later one) and every N from 1 to one past the
//! number of calls the workload makes:
//!
//! - a step that returns an error returns [`Error::Sys`] with the injected
//!   errno, names the operation that failed (in `Display` too), and an
//!   injected failure of that operation did happen during the step;
//! - a step during which an enter failed returns an error, unless the failure
//!   was `ENOMEM` and the cache recovered by evicting (counted);
//! - after every step the caches' invariants hold (`check_consistency`) and
//!   what they say they have mapped is what the MMU has mapped;
//! - failed removes leave the entry cached and are counted (`unmap_errors`),
//!   one for one with the injected failures;
//! - once the fault is cleared, shrinking the caches unmaps everything
//!   (`mapped == 0`), every reference count is zero, every frame comes back,
//!   and a fresh round of calls works.

use std::sync::Arc;

use lwbuf::{
    CpuGuard, Error, Fault, FaultStats, FaultyMmu, Lwbuf, Lwbufs, Mmu, Page, PhysMem, Reclaim, SfBuf, SfPool, Wait,
};

// === helpers ===

#[macro_use]
#[path = "common/backend.rs"]
mod backend;
use backend::{Backend, BACKENDS};

impl Backend {
    /// The backend's MMU of `slots` slots, behind a fault injector.
    fn faulty(self, mem: &PhysMem, slots: usize) -> Arc<FaultyMmu> {
        Arc::new(FaultyMmu::new(self.mmu(mem, slots)))
    }
}

/// Which calls fail in one run.
#[derive(Clone, Copy, Debug)]
enum Target {
    Enter,
    Remove,
}

#[derive(Clone, Copy, Debug)]
struct Injection {
    target: Target,
    n: u64,
    persistent: bool,
    errno: i32,
}

impl Injection {
    fn arm(&self, mmu: &FaultyMmu) {
        let f = if self.persistent { Fault::from_nth(self.n, self.errno) } else { Fault::nth(self.n, self.errno) };
        match self.target {
            Target::Enter => mmu.fail_enters(Some(f)),
            Target::Remove => mmu.fail_removes(Some(f)),
        }
    }
}

/// What one run of a workload saw.
struct Outcome {
    /// Calls made to the faulty MMU, and how many it failed.
    calls: FaultStats,
    /// Steps that returned an error.
    errors: usize,
}

const ERRNOS: [i32; 3] = [libc::ENOMEM, libc::EINVAL, libc::EAGAIN];
/// Injected runs a sweep makes at least (a third as many under Miri).
const MIN_RUNS: usize = if cfg!(miri) { 33 } else { 100 };

/// The word every frame carries at offset 0: its frame number, so a mapping
/// of the wrong frame shows.
fn stamp_of(pfn: usize) -> u64 {
    0x5a5a_0000_0000_0000 | pfn as u64
}

fn stamped(mem: &PhysMem) -> Vec<Page> {
    let pages = mem.alloc_run(mem.frames()).expect("all frames");
    for p in &pages {
        p.direct().unwrap().write_u64(0, stamp_of(p.pfn().0)).unwrap();
    }
    pages
}

/// One step of a workload: what it did and how it went; `None` when the
/// workload is over.
type Step = Option<(&'static str, lwbuf::Result<()>)>;

/// Arm `inj` (if any), then run a workload's steps in order: each judged
/// against the injection (or required to succeed with none) and followed by
/// `check` of the cache's invariants. Returns the errors the injection
/// caused.
fn drive<S>(
    faulty: &FaultyMmu,
    inj: Option<&Injection>,
    st: &mut S,
    step: fn(&mut S, usize) -> Step,
    check: impl Fn(&str),
) -> usize {
    if let Some(inj) = inj {
        inj.arm(faulty);
    }
    let mut errors = 0;
    for i in 0.. {
        let before = faulty.fault_stats();
        let Some((what, r)) = step(st, i) else { break };
        match inj {
            Some(inj) => judge_step(&mut errors, what, inj, &r, before, faulty.fault_stats()),
            None => r.unwrap_or_else(|e| panic!("{what} with no fault: {e}")),
        }
        check(what);
    }
    errors
}

/// Judge one step's result against the faults injected while it ran.
#[track_caller]
fn judge_step(
    errors: &mut usize,
    what: &str,
    inj: &Injection,
    r: &lwbuf::Result<()>,
    before: FaultStats,
    after: FaultStats,
) {
    let failed_enters = after.failed_enters - before.failed_enters;
    let failed_removes = after.failed_removes - before.failed_removes;
    match r {
        Err(e) => {
            *errors += 1;
            let Error::Sys { op, source } = e else { panic!("{what} under {inj:?}: not a system-call error: {e:?}") };
            assert_eq!(source.raw_os_error(), Some(inj.errno), "{what} under {inj:?}: wrong errno in {e}");
            let shown = e.to_string();
            assert!(shown.contains(op), "{what}: `{shown}` does not name {op}");
            assert!(
                shown.contains(&std::io::Error::from_raw_os_error(inj.errno).to_string()),
                "{what}: `{shown}` does not show the errno"
            );
            match *op {
                "mmap(enter)" | "mmap(replace)" => {
                    assert!(failed_enters > 0, "{what} under {inj:?}: {e} but no enter failed")
                }
                "mmap(remove)" => assert!(failed_removes > 0, "{what} under {inj:?}: {e} but no remove failed"),
                other => panic!("{what} under {inj:?}: unexpected op {other}"),
            }
        }
        Ok(()) => {
            // A failed enter must be reported, except `ENOMEM` (the
            // `vm.max_map_count` wall), which the caches cure by evicting a
            // cached mapping or reclaiming other CPUs' and trying again:
            // then a later enter of the same step succeeded.
            if failed_enters > 0 {
                let retried = after.enters - before.enters > failed_enters;
                assert!(
                    inj.errno == libc::ENOMEM && retried,
                    "{what} under {inj:?}: an enter failed with errno {} and the call succeeded without a retry",
                    inj.errno
                );
            }
        }
    }
}

/// A step that cannot fail (a drop, a setter): run it, `Ok`.
fn done(f: impl FnOnce()) -> lwbuf::Result<()> {
    f();
    Ok(())
}

// === lwbuf workload ===

const LW_FRAMES: usize = 16;
const LW_SLOTS: usize = 12;

/// The lwbuf workload's state: one thread, moving between CPUs 0 and 1.
struct LwState<'a> {
    lw: &'a Lwbufs,
    pages: &'a [Page],
    guard: Option<CpuGuard<'a>>,
    a: Option<Lwbuf<'a>>,
    b: Option<Lwbuf<'a>>,
    r: Option<Lwbuf<'a>>,
    fill: Vec<Lwbuf<'a>>,
}

impl<'a> LwState<'a> {
    fn rebind(&mut self, cpu: usize) -> lwbuf::Result<()> {
        self.guard = None;
        self.guard = Some(self.lw.bind(cpu)?);
        Ok(())
    }

    fn alloc(&self, i: usize) -> lwbuf::Result<Lwbuf<'a>> {
        let h = self.lw.alloc(&self.pages[i])?;
        check_lw(&h)?;
        Ok(h)
    }
}

/// Read every page of `h` on the current CPU and check its stamp.
fn check_lw(h: &Lwbuf<'_>) -> lwbuf::Result<()> {
    let k = h.kva()?;
    let fs = k.len() / h.pages().len();
    for (i, p) in h.pages().iter().enumerate() {
        assert_eq!(k.read_u64(i * fs)?, stamp_of(p.pfn().0), "frame {} read through {k:?}", p.pfn().0);
    }
    Ok(())
}

/// Step `i` of the lwbuf workload, `None` past the end. Each step is one
/// public call (or a drop, whose unmaps cannot report an error).
fn lw_step(st: &mut LwState<'_>, i: usize) -> Step {
    let r = match i {
        0 => ("bind 0", st.rebind(0)),
        1 => ("alloc a", st.alloc(0).map(|h| st.a = Some(h))),
        2 => ("alloc b", st.alloc(1).map(|h| st.b = Some(h))),
        3 => ("alloc_run r", st.lw.alloc_run(&st.pages[8..12]).map(|h| st.r = Some(h))),
        4 => ("rebind 1", st.rebind(1)),
        5 => ("kva a on CPU 1", st.a.as_ref().map_or(Ok(()), check_lw)),
        6 => ("kva r on CPU 1", st.r.as_ref().map_or(Ok(()), check_lw)),
        7 => ("drop a on CPU 1", done(|| drop(st.a.take()))),
        8 => ("rebind 0", st.rebind(0)),
        9 => ("drop b on CPU 0", done(|| drop(st.b.take()))),
        10 => ("alloc and drop c", st.alloc(2).map(drop)),
        11..=14 => ("alloc fill", st.alloc(i - 8).map(|h| st.fill.push(h))),
        15 => ("drop fill", done(|| st.fill.clear())),
        16 => ("drop r on CPU 0", done(|| drop(st.r.take()))),
        17 => ("set_max_excess 0", done(|| st.lw.set_max_excess(0))),
        18 => ("alloc and drop a", st.alloc(0).map(drop)),
        19 => ("set_max_excess 2", done(|| st.lw.set_max_excess(2))),
        20 => ("kva on a new CPU after drops", {
            st.alloc(7).and_then(|h| {
                st.rebind(1)?;
                let r = check_lw(&h);
                drop(h);
                r
            })
        }),
        21 => ("reclaim", {
            st.lw.reclaim();
            Ok(())
        }),
        22 => ("unbind", done(|| st.guard = None)),
        _ => return None,
    };
    Some(r)
}

fn lw_mapped_consistent(lw: &Lwbufs, what: &str) {
    let st = lw.stats();
    let mmu = lw.mmu().stats();
    if lw.reclaim_mode() == Reclaim::Strict {
        assert_eq!(st.total.mapped, mmu.enters - mmu.removes, "{what}: cache entries vs live MMU mappings\n{st}");
    } else {
        // Evicted mappings may still be entered, waiting to be mapped over.
        assert!(mmu.mapped >= st.total.mapped, "{what}: cache entries vs MMU mappings\n{st}");
    }
    assert!(lw.check_consistency().is_ok(), "{what}: {:?}", lw.check_consistency());
}

fn lw_run_strict(b: Backend, inj: Option<Injection>) -> Outcome {
    lw_run(b, inj, Reclaim::Strict)
}

fn lw_run_lazy(b: Backend, inj: Option<Injection>) -> Outcome {
    lw_run(b, inj, Reclaim::Lazy)
}

/// Run the lwbuf workload with `inj` armed (or none); returns the calls made.
fn lw_run(b: Backend, inj: Option<Injection>, reclaim: Reclaim) -> Outcome {
    let mem = b.phys(LW_FRAMES);
    let pages = stamped(&mem);
    let faulty = b.faulty(&mem, LW_SLOTS);
    let lw = Lwbufs::builder(faulty.clone()).cpus(2).max_excess(2).reclaim(reclaim).build().unwrap();
    let mut st = LwState { lw: &lw, pages: &pages, guard: None, a: None, b: None, r: None, fill: Vec::new() };
    let errors = drive(&faulty, inj.as_ref(), &mut st, lw_step, |what| lw_mapped_consistent(&lw, what));
    let calls = faulty.fault_stats();
    drop(st);

    // Failed removes left their entries cached, and were counted.
    let stats = lw.stats();
    assert_eq!(stats.total.unmap_errors, calls.failed_removes, "{inj:?}\n{stats}");
    assert!(stats.per_cpu.iter().all(|c| c.mailbox == 0), "{inj:?}: stranded messages\n{stats}");
    assert_eq!(lw.check_consistency(), Ok(0), "{inj:?}: references left");

    // Cleared: the caches shrink to nothing.
    faulty.clear();
    lw.reclaim();
    lw.set_max_excess(0);
    assert_eq!(lw.check_consistency(), Ok(0));
    assert_eq!(lw.mmu().stats().mapped, 0, "{inj:?}: mappings left\n{}", lw.stats());
    assert_eq!(lw.stats().total.mapped, 0);

    // And the next calls work.
    lw.set_max_excess(2);
    {
        let _g = lw.bind(1).expect("bind after the fault");
        let h = lw.alloc(&pages[3]).expect("alloc after the fault");
        check_lw(&h).expect("kva after the fault");
        let r = lw.alloc_run(&pages[4..8]).expect("alloc_run after the fault");
        check_lw(&r).expect("run kva after the fault");
    }
    lw.reclaim();
    assert_eq!(lw.mmu().stats().mapped, 0);
    assert_eq!(lw.check_consistency(), Ok(0));
    drop(lw);
    for p in &pages {
        assert_eq!(p.hold_count(), 1, "{inj:?}: frame {} still held", p.pfn().0);
    }
    drop(pages);
    assert_eq!(mem.stats().free, LW_FRAMES, "{inj:?}: frames leaked");
    Outcome { calls, errors }
}

// === sf_buf workload ===

const SF_FRAMES: usize = 16;
const SF_SLOTS: usize = 6;

struct SfState<'a> {
    pool: &'a SfPool,
    pages: &'a [Page],
    a: Option<SfBuf<'a>>,
    r: Option<SfBuf<'a>>,
    all: Vec<SfBuf<'a>>,
}

fn check_sf(sf: &SfBuf<'_>) -> lwbuf::Result<()> {
    let k = sf.kva();
    let fs = k.len() / sf.pages().len();
    for (i, p) in sf.pages().iter().enumerate() {
        assert_eq!(k.read_u64(i * fs)?, stamp_of(p.pfn().0), "frame {} read through {k:?}", p.pfn().0);
    }
    Ok(())
}

impl<'a> SfState<'a> {
    fn alloc(&self, i: usize, how: Wait<'_>) -> lwbuf::Result<SfBuf<'a>> {
        let sf = self.pool.alloc(&self.pages[i], how)?;
        check_sf(&sf)?;
        Ok(sf)
    }
}

fn sf_step(st: &mut SfState<'_>, i: usize) -> Step {
    let quick = Wait::Timeout(std::time::Duration::from_millis(1));
    let r = match i {
        0 => ("alloc a", st.alloc(0, Wait::NoWait).map(|s| st.a = Some(s))),
        1 => (
            "alloc_run r",
            st.pool.alloc_run(&st.pages[8..11], Wait::NoWait).and_then(|s| check_sf(&s).map(|()| st.r = Some(s))),
        ),
        2 => ("drop a", done(|| drop(st.a.take()))),
        3 => ("alloc and drop b", st.alloc(1, Wait::NoWait).map(drop)),
        4 => ("alloc and drop c", st.alloc(2, quick).map(drop)),
        5 => ("alloc_all", {
            st.pool.alloc_all(&st.pages[3..6], 1, Wait::NoWait).map(|v| {
                v.iter().for_each(|s| check_sf(s).unwrap());
                st.all = v;
            })
        }),
        6 => ("drop all", done(|| st.all.clear())),
        7 => ("alloc a again", st.alloc(0, Wait::Forever).map(|s| st.a = Some(s))),
        8 => ("set_max_excess 0", done(|| st.pool.set_max_excess(0))),
        9 => ("drop r", done(|| drop(st.r.take()))),
        10 => ("alloc_all runs", {
            st.pool.alloc_all(&st.pages[11..14], 2, quick).map(|v| {
                v.iter().for_each(|s| check_sf(s).unwrap());
                st.all = v;
            })
        }),
        11 => ("set_max_excess 2", done(|| st.pool.set_max_excess(2))),
        12 => (
            "drop all and a",
            done(|| {
                st.all.clear();
                st.a = None;
            }),
        ),
        13 => ("alloc and drop d", st.alloc(6, Wait::NoWait).map(drop)),
        14 => ("reclaim", {
            st.pool.reclaim();
            Ok(())
        }),
        15 => ("alloc and drop b again", st.alloc(1, Wait::NoWait).map(drop)),
        _ => return None,
    };
    Some(r)
}

fn sf_mapped_consistent(pool: &SfPool, what: &str) {
    let st = pool.stats();
    if pool.reclaim_mode() == Reclaim::Strict {
        assert_eq!(st.mapped, st.mmu.enters - st.mmu.removes, "{what}: pool entries vs live MMU mappings\n{st}");
        assert_eq!(st.live_mappings, st.mapped, "{what}: live-mapping count\n{st}");
    } else {
        // Evicted mappings may still be entered, waiting to be mapped over.
        assert!(st.live_mappings >= st.mapped, "{what}: live-mapping count\n{st}");
        assert!(st.mmu.mapped >= st.mapped, "{what}: pool entries vs MMU mappings\n{st}");
    }
}

fn sf_run_strict(b: Backend, inj: Option<Injection>) -> Outcome {
    sf_run(b, inj, Reclaim::Strict)
}

fn sf_run_lazy(b: Backend, inj: Option<Injection>) -> Outcome {
    sf_run(b, inj, Reclaim::Lazy)
}

fn sf_run(b: Backend, inj: Option<Injection>, reclaim: Reclaim) -> Outcome {
    let mem = b.phys(SF_FRAMES);
    let pages = stamped(&mem);
    let faulty = b.faulty(&mem, SF_SLOTS);
    let pool = SfPool::builder(faulty.clone()).max_excess(2).reclaim(reclaim).build().unwrap();
    let mut st = SfState { pool: &pool, pages: &pages, a: None, r: None, all: Vec::new() };
    let errors = drive(&faulty, inj.as_ref(), &mut st, sf_step, |what| sf_mapped_consistent(&pool, what));
    let calls = faulty.fault_stats();
    drop(st);

    let stats = pool.stats();
    assert_eq!(stats.used, 0, "{inj:?}\n{stats}");
    assert_eq!(stats.unmap_errors, calls.failed_removes, "{inj:?}\n{stats}");
    assert_eq!(stats.waiters, 0);

    faulty.clear();
    pool.set_max_excess(0);
    pool.reclaim();
    let stats = pool.stats();
    assert_eq!((stats.mapped, stats.cached, stats.mmu.mapped), (0, 0, 0), "{inj:?}: mappings left\n{stats}");

    pool.set_max_excess(2);
    {
        let a = pool.alloc(&pages[7], Wait::NoWait).expect("alloc after the fault");
        check_sf(&a).unwrap();
        let r = pool.alloc_run(&pages[12..15], Wait::NoWait).expect("alloc_run after the fault");
        check_sf(&r).unwrap();
    }
    pool.set_max_excess(0);
    pool.reclaim();
    assert_eq!(pool.stats().mmu.mapped, 0);
    drop(pool);
    for p in &pages {
        assert_eq!(p.hold_count(), 1, "{inj:?}: frame {} still held", p.pfn().0);
    }
    drop(pages);
    assert_eq!(mem.stats().free, SF_FRAMES, "{inj:?}: frames leaked");
    Outcome { calls, errors }
}

// === the sweep ===

/// Every injection over a workload: enters and removes, each N up to one
/// past the calls the fault-free run makes, each errno, once and forever.
/// Returns the runs made and, per target, the runs in which some step
/// returned an error.
fn sweep(b: Backend, run: fn(Backend, Option<Injection>) -> Outcome) -> (usize, usize, usize) {
    let clean = run(b, None);
    let c = clean.calls;
    assert!(c.enters >= 10 && c.removes >= 1, "the workload exercises too little: {c:?}");
    assert_eq!((c.failed_enters, c.failed_removes, clean.errors), (0, 0, 0));
    let (mut runs, mut enter_errors, mut remove_errors) = (0, 0, 0);
    for (target, calls) in [(Target::Enter, c.enters), (Target::Remove, c.removes)] {
        for n in 1..=calls + 1 {
            for (e, errno) in ERRNOS.into_iter().enumerate() {
                for persistent in [false, true] {
                    // Under Miri (about 100x slower) one errno of the three
                    // per call and mode, rotating with N: every call still
                    // fails in both modes, and every errno is still tried.
                    if cfg!(miri) && (n + u64::from(persistent)) % ERRNOS.len() as u64 != e as u64 {
                        continue;
                    }
                    let inj = Injection { target, n, persistent, errno };
                    let got = run(b, Some(inj));
                    let failed = got.calls.failed_enters + got.calls.failed_removes;
                    if n <= calls {
                        assert!(failed > 0, "{inj:?} never fired: {:?}", got.calls);
                    } else {
                        assert_eq!(failed, 0, "{inj:?}: the workload is not deterministic");
                    }
                    if got.errors > 0 {
                        match target {
                            Target::Enter => enter_errors += 1,
                            Target::Remove => remove_errors += 1,
                        }
                    }
                    runs += 1;
                }
            }
        }
    }
    (runs, enter_errors, remove_errors)
}

#[test]
#[cfg_attr(
    miri,
    ignore = "the whole sweep takes about 7 minutes under Miri; it runs in the normal suite, and the single-fault tests of this file run under Miri"
)]
fn lwbuf_every_fault_on_model() {
    let (runs, enter_errors, remove_errors) = sweep(Backend::Model, lw_run_strict);
    assert!(runs > MIN_RUNS && enter_errors > runs / 4 && remove_errors > 0, "{runs} {enter_errors} {remove_errors}");
}

#[test]
#[cfg_attr(miri, ignore = "the real window needs memfd_create and mmap")]
fn lwbuf_every_fault_on_window() {
    let (runs, enter_errors, remove_errors) = sweep(Backend::Window, lw_run_strict);
    assert!(runs > MIN_RUNS && enter_errors > runs / 4 && remove_errors > 0, "{runs} {enter_errors} {remove_errors}");
}

#[test]
#[cfg_attr(
    miri,
    ignore = "the whole sweep takes about 7 minutes under Miri; it runs in the normal suite, and the single-fault tests of this file run under Miri"
)]
fn sfbuf_every_fault_on_model() {
    let (runs, enter_errors, remove_errors) = sweep(Backend::Model, sf_run_strict);
    assert!(runs > MIN_RUNS && enter_errors > runs / 4 && remove_errors > 0, "{runs} {enter_errors} {remove_errors}");
}

#[test]
#[cfg_attr(miri, ignore = "the real window needs memfd_create and mmap")]
fn sfbuf_every_fault_on_window() {
    let (runs, enter_errors, remove_errors) = sweep(Backend::Window, sf_run_strict);
    assert!(runs > MIN_RUNS && enter_errors > runs / 4 && remove_errors > 0, "{runs} {enter_errors} {remove_errors}");
}

// Lazy reclaim: evictions make no remove; replaces in place fail as enters,
// and the batched removes of `reclaim` are the removes that fail.

#[test]
#[cfg_attr(miri, ignore = "the whole sweep takes minutes under Miri; it runs in the normal suite")]
fn lwbuf_every_fault_lazy_on_model() {
    let (runs, enter_errors, _) = sweep(Backend::Model, lw_run_lazy);
    assert!(runs > MIN_RUNS && enter_errors > runs / 4, "{runs} {enter_errors}");
}

#[test]
#[cfg_attr(miri, ignore = "the real window needs memfd_create and mmap")]
fn lwbuf_every_fault_lazy_on_window() {
    let (runs, enter_errors, _) = sweep(Backend::Window, lw_run_lazy);
    assert!(runs > MIN_RUNS && enter_errors > runs / 4, "{runs} {enter_errors}");
}

#[test]
#[cfg_attr(miri, ignore = "the whole sweep takes minutes under Miri; it runs in the normal suite")]
fn sfbuf_every_fault_lazy_on_model() {
    let (runs, enter_errors, _) = sweep(Backend::Model, sf_run_lazy);
    assert!(runs > MIN_RUNS && enter_errors > runs / 4, "{runs} {enter_errors}");
}

#[test]
#[cfg_attr(miri, ignore = "the real window needs memfd_create and mmap")]
fn sfbuf_every_fault_lazy_on_window() {
    let (runs, enter_errors, _) = sweep(Backend::Window, sf_run_lazy);
    assert!(runs > MIN_RUNS && enter_errors > runs / 4, "{runs} {enter_errors}");
}

/// A remove that fails keeps the entry cached and mapped (counted in
/// `unmap_errors`); it is found again as a hit, and the next successful
/// remove cleans it up.
#[test]
fn failed_remove_keeps_the_entry_and_a_later_remove_cleans_up() {
    for &b in BACKENDS {
        let mem = b.phys(8);
        let pages = stamped(&mem);

        let faulty = b.faulty(&mem, 8);
        let lw = Lwbufs::builder(faulty.clone()).cpus(1).max_excess(1).reclaim(Reclaim::Strict).build().unwrap();
        let g = lw.bind(0).unwrap();
        drop(lw.alloc(&pages[0]).unwrap());
        faulty.fail_removes(Some(Fault::nth(1, libc::EINVAL)));
        lw.set_max_excess(0);
        let st = lw.stats();
        assert_eq!((st.total.unmap_errors, st.total.cached, st.total.evictions), (1, 1, 0), "{st}");
        assert_eq!((faulty.stats().mapped, faulty.fault_stats().failed_removes), (1, 1));
        assert_eq!(lw.check_consistency(), Ok(0));
        // Still cached: a hit, with the right bytes.
        lw.set_max_excess(1);
        let h = lw.alloc(&pages[0]).unwrap();
        check_lw(&h).unwrap();
        assert_eq!(lw.stats().total.hits, 1);
        drop(h);
        lw.set_max_excess(0); // remove call 2: it works
        let st = lw.stats();
        assert_eq!((st.total.cached, st.total.evictions, st.mmu.mapped), (0, 1, 0), "{st}");
        drop(g);

        // The sf_buf pool: the same, and a trim stops at a refusal instead
        // of retrying it forever.
        let faulty = b.faulty(&mem, 8);
        let pool = SfPool::builder(faulty.clone()).max_excess(1).reclaim(Reclaim::Strict).build().unwrap();
        drop(pool.alloc(&pages[1], Wait::NoWait).unwrap());
        faulty.fail_removes(Some(Fault::from_nth(1, libc::EAGAIN)));
        pool.set_max_excess(0);
        let st = pool.stats();
        assert_eq!((st.unmap_errors, st.cached, st.evictions, st.mmu.mapped), (1, 1, 0, 1), "{st}");
        let sf = pool.alloc(&pages[1], Wait::NoWait).unwrap();
        check_sf(&sf).unwrap();
        assert_eq!(pool.stats().hits, 1);
        drop(sf); // over the cap again: one more refused remove
        assert_eq!(pool.stats().unmap_errors, 2);
        faulty.clear();
        pool.set_max_excess(0);
        let st = pool.stats();
        assert_eq!((st.cached, st.evictions, st.mmu.mapped), (0, 1, 0), "{st}");
    }
}

/// When every cached mapping's unmap is refused, a miss that needs a slot
/// reports the refusal, not a full window.
#[test]
fn refused_unmaps_are_the_error_of_a_miss_that_needs_the_slot() {
    for &b in BACKENDS {
        let mem = b.phys(8);
        let pages = stamped(&mem);
        let faulty = b.faulty(&mem, 2);
        let lw = Lwbufs::builder(faulty.clone()).cpus(1).max_excess(2).reclaim(Reclaim::Strict).build().unwrap();
        let g = lw.bind(0).unwrap();
        drop((lw.alloc(&pages[0]).unwrap(), lw.alloc(&pages[1]).unwrap()));
        faulty.fail_removes(Some(Fault::from_nth(1, libc::EINVAL)));
        let e = lw.alloc(&pages[2]).unwrap_err();
        assert!(matches!(e, Error::Sys { op: "mmap(remove)", .. }) && e.errno() == Some(libc::EINVAL), "{e}");
        faulty.clear();
        check_lw(&lw.alloc(&pages[2]).unwrap()).unwrap();
        drop(g);

        let faulty = b.faulty(&mem, 2);
        let pool = SfPool::builder(faulty.clone()).max_excess(2).reclaim(Reclaim::Strict).build().unwrap();
        drop((pool.alloc(&pages[0], Wait::NoWait).unwrap(), pool.alloc(&pages[1], Wait::NoWait).unwrap()));
        faulty.fail_removes(Some(Fault::from_nth(1, libc::EINVAL)));
        for how in [Wait::NoWait, Wait::Forever] {
            let e = pool.alloc(&pages[2], how).unwrap_err();
            assert!(matches!(e, Error::Sys { op: "mmap(remove)", .. }) && e.errno() == Some(libc::EINVAL), "{e}");
        }
        faulty.clear();
        check_sf(&pool.alloc(&pages[2], Wait::NoWait).unwrap()).unwrap();
    }
}
