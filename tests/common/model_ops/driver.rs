//! The driver: runs a sequence on the library and the model side by side.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::mpsc;

use lwbuf::{CpuGuard, Error, Lwbuf, LwbufStats, Lwbufs, MmuStats, Page, PhysMem, SfBuf, SfPool, SfStats, Slot, Wait};

use super::*;

pub(super) struct Sys {
    pub(super) mem: PhysMem,
    pub(super) pages: Vec<Page>,
    pub(super) foreign: Page,
    pub(super) lw: Lwbufs,
    pub(super) pool: SfPool,
    /// System calls each window made before the caches used it (the
    /// reservation of the real window).
    pub(super) syscalls: (u64, u64),
}

pub(super) fn system(b: Backend, cfg: Config) -> Sys {
    let mem = b.phys(FRAMES);
    let other = b.phys(1);
    let mmu = |slots: usize| b.mmu(&mem, slots);
    let pages = mem.alloc_run(FRAMES).unwrap();
    for p in &pages {
        p.direct().unwrap().write_u64(0, stamp(p.pfn().0)).unwrap();
    }
    // An explicit budget (far above anything mapped here): no reading of
    // /proc per system, which a fuzz execution would pay each time.
    let lw = Lwbufs::builder(mmu(LW_SLOTS))
        .cpus(CPUS)
        .max_excess(2)
        .map_budget(1 << 20)
        .granule(cfg.granule)
        .reclaim(cfg.reclaim)
        .build()
        .unwrap();
    let pool = SfPool::builder(mmu(SF_SLOTS))
        .max_excess(2)
        .map_budget(1 << 20)
        .shards(8)
        .granule(cfg.granule)
        .reclaim(cfg.reclaim)
        .build()
        .unwrap();
    let foreign = other.alloc_page().unwrap();
    let syscalls = (lw.mmu().stats().syscalls, pool.mmu().stats().syscalls);
    Sys { mem, pages, foreign, lw, pool, syscalls }
}

pub(super) fn stamp(pfn: usize) -> u64 {
    0xf00d_0000_0000_0000 | pfn as u64
}

/// The channels to the helper thread, and its handle.
pub(super) type Link<'a, 's> =
    (mpsc::Sender<Cmd<'a>>, mpsc::Receiver<Reply<'a>>, std::thread::ScopedJoinHandle<'s, ()>);

/// Everything the driver holds, and the model alongside.
pub(super) struct Run<'a, 's> {
    pub(super) sys: &'a Sys,
    pub(super) fs: usize,
    pub(super) backend: Backend,
    pub(super) cfg: Config,
    pub(super) model: Model,
    pub(super) guard: Option<CpuGuard<'a>>,
    pub(super) handles: Vec<Lwbuf<'a>>,
    pub(super) sf: Vec<SfBuf<'a>>,
    pub(super) scope: &'s std::thread::Scope<'s, 'a>,
    /// The helper, spawned at its first command (most short sequences need
    /// none, and a thread is the dearest part of a fuzz execution).
    pub(super) helper: Option<Link<'a, 's>>,
    pub(super) step: usize,
    pub(super) op: Op,
    /// Each window's MMU counters when its frames were last read: unchanged
    /// counters mean unchanged slots, and reading 2048 slots per step would
    /// be most of a case's time.
    pub(super) read_at: [Option<MmuStats>; 2],
}

impl fmt::Debug for Run<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {} ({:?}) under {:?}", self.step, self.op, self.cfg)
    }
}

impl<'a, 's> Run<'a, 's> {
    pub(super) fn ask(&mut self, c: Cmd<'a>) -> Reply<'a> {
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

    pub(super) fn done(&mut self, c: Cmd<'a>) -> Result<(), Error> {
        match self.ask(c) {
            Reply::Done(r) => r,
            Reply::Kva(..) => unreachable!(),
        }
    }

    /// Check a result against the model's.
    #[track_caller]
    pub(super) fn expect_r<T>(&self, r: &Result<T, Error>, want: Outcome) {
        let got = outcome(r);
        assert!(got == want, "{self:?}: result {got:?} ({:?}), model: {want:?}", r.as_ref().err());
    }

    /// Check what an address shows (a handle on the frames `hold` of the
    /// entry `key`), and remember the entry's address.
    #[track_caller]
    pub(super) fn saw(&mut self, cpu: usize, key: Key, hold: Key, seen: &Seen) {
        let want: Vec<u64> = frames_of(hold).map(stamp).collect();
        assert_eq!(seen.words, want, "{self:?}: frames {hold:?} read through {:#x} on CPU {cpu}", seen.addr);
        let (fs, g, at) = (self.fs, self.cfg.granule, format!("{self:?}"));
        // The handle points at its first page inside the entry.
        let addr = seen.addr - (hold.0 - key.0) * fs;
        let c = &mut self.model.cpus[cpu];
        if let Some(&a) = c.addr.get(&key) {
            assert_eq!(a, addr, "{at}: entry {key:?} on CPU {cpu} moved while mapped");
        } else {
            if self.backend == Backend::Window {
                // In the real window, entries of one CPU never share a slot
                // (the model MMU's address is the frame's own, shared by
                // design). An entry holds whole granules of slots.
                let (lo, hi) = (addr, addr + slots_for(g, key.1) * fs);
                for (k, &a) in &c.addr {
                    assert!(
                        hi <= a || a + slots_for(g, k.1) * fs <= lo,
                        "{at}: entry {key:?} at {lo:#x} overlaps entry {k:?} at {a:#x} on CPU {cpu}"
                    );
                }
            }
            c.addr.insert(key, addr);
        }
    }

    pub(super) fn page(&self, f: u8) -> &'a Page {
        let sys: &'a Sys = self.sys;
        if f as usize >= FRAMES {
            &sys.foreign
        } else {
            &sys.pages[f as usize]
        }
    }

    /// `pages` as a slice of `sys.pages`, if they are consecutive there.
    pub(super) fn run_slice(&self, pages: &[&'a Page]) -> Option<&'a [Page]> {
        let all: &'a [Page] = &self.sys.pages;
        let head = *pages.first()?;
        let first = all.iter().position(|p| std::ptr::eq(p, head))?;
        let run = all.get(first..first + pages.len())?;
        run.iter().zip(pages).all(|(a, &b)| std::ptr::eq(a, b)).then_some(run)
    }

    pub(super) fn alloc(&mut self, pages: Vec<&'a Page>, single: bool) {
        let me = self.model.main_cpu;
        // The library's order of checks: the pages first, then the CPU.
        let hold = (pages.first().map_or(0, |p| p.pfn().0), pages.len());
        let key = self.model.key_of(hold.0, hold.1);
        let shape = if pages.is_empty() {
            Some("Config")
        } else if let Some(i) = pages.iter().position(|p| !p.phys().same_as(&self.sys.mem)) {
            // A foreign page is found before any gap after it.
            let gap = pages[..i].iter().enumerate().any(|(j, p)| p.pfn().0 != hold.0 + j);
            Some(if gap { "Config" } else { "ForeignPage" })
        } else if pages.iter().enumerate().any(|(j, p)| p.pfn().0 != hold.0 + j) {
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
        self.expect_r(&r, want);
        if let (Ok(h), Some(cpu)) = (r, me) {
            self.model.acquire(cpu, key);
            // On its home CPU the address is a field: no library call.
            let seen = look(&h, self.fs).expect("kva on the home CPU");
            self.saw(cpu, key, hold, &seen);
            self.handles.push(h);
            self.model.handles.push(HandleModel { key, hold, home: cpu, mask: BTreeSet::from([cpu]) });
        }
    }

    /// `map_local` of frame `f` on the driver's CPU: as `alloc` of it
    /// and the handle's drop at home, in the model.
    pub(super) fn map_local(&mut self, f: u8) {
        let (Some(guard), Some(cpu)) = (self.guard.as_ref(), self.model.main_cpu) else { return };
        let p = self.page(f);
        let r = guard.map_local(p, |kva| -> Result<Seen, Error> {
            Ok(Seen { addr: kva.addr(), words: vec![kva.read_u64(0)?] })
        });
        if !p.phys().same_as(&self.sys.mem) {
            self.expect_r(&r, Outcome::Err("ForeignPage"));
            return;
        }
        self.expect_r(&r, Outcome::Ok);
        let seen = r.unwrap().expect("a read inside the page");
        let hold = (p.pfn().0, 1);
        let key = self.model.key_of(hold.0, hold.1);
        self.model.acquire(cpu, key);
        self.saw(cpu, key, hold, &seen);
        self.model.release(HandleModel { key, hold, home: cpu, mask: BTreeSet::from([cpu]) }, Some(cpu));
    }

    pub(super) fn kva(&mut self, i: u8, helper: bool) {
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
            None => self.expect_r(&r, Outcome::Err("NotBound")),
            Some(cpu) => {
                self.expect_r(&r, Outcome::Ok);
                self.model.kva(i, cpu);
                let (key, hold) = (self.model.handles[i].key, self.model.handles[i].hold);
                self.saw(cpu, key, hold, &r.unwrap());
            }
        }
    }

    pub(super) fn drop_handle(&mut self, i: u8, helper: bool) {
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

    pub(super) fn apply(&mut self, op: Op) {
        let lw = &self.sys.lw;
        match op {
            Op::Bind(c) => {
                let c = c as usize;
                let want = self.model.bind_result(c, self.model.main_cpu);
                let r = lw.bind(c);
                self.expect_r(&r, want);
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
                self.expect_r(&r, want);
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
                        self.expect_r(&r, Outcome::Ok);
                        self.model.enter_cpu(cpu);
                    }
                    None => self.expect_r(&r, Outcome::Err("NotBound")),
                }
            }
            Op::Poll => {
                let r = lw.poll();
                match self.model.main_cpu {
                    Some(cpu) => {
                        self.expect_r(&r, Outcome::Ok);
                        self.model.enter_cpu(cpu);
                    }
                    None => self.expect_r(&r, Outcome::Err("NotBound")),
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
            Op::MapLocal(f) => self.map_local(f),
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
                let got = lw.reclaim();
                let want = self.model.reclaim();
                assert_eq!(got, want, "{self:?}: slots Lwbufs::reclaim gave back");
            }
            Op::SfAlloc(f) => self.sf_alloc(f as usize, 1, true),
            Op::SfAllocRun(start, len) => {
                let start = start as usize;
                // Inside the start's granule: where a run of several
                // granules lands depends on the slot allocator's placement.
                let g = self.cfg.granule;
                let len = (len as usize).min(g - start % g).min(FRAMES - start);
                self.sf_alloc(start, len, false);
            }
            Op::SfReclaim => {
                let got = self.sys.pool.reclaim();
                let want = self.model.sf_reclaim();
                assert_eq!(got, want, "{self:?}: slots SfPool::reclaim gave back");
            }
            Op::SfDrop(i) => {
                if !self.sf.is_empty() {
                    let i = i as usize % self.sf.len();
                    drop(self.sf.swap_remove(i));
                    let key = self.model.sf_handles.swap_remove(i);
                    self.model.sf_release(key);
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

    /// `SfPool::alloc` of frame `first` (`single`; `FRAMES`: the foreign
    /// page) or `alloc_run` of `len` frames from it, without waiting.
    pub(super) fn sf_alloc(&mut self, first: usize, len: usize, single: bool) {
        let sys: &'a Sys = self.sys;
        let r = if single {
            sys.pool.alloc(self.page(first as u8), Wait::NoWait)
        } else {
            sys.pool.alloc_run(&sys.pages[first..first + len], Wait::NoWait)
        };
        let want = if first >= FRAMES {
            Outcome::Err("ForeignPage")
        } else {
            self.model.sf_alloc(self.model.key_of(first, len))
        };
        self.expect_r(&r, want);
        let Ok(sf) = r else { return };
        let key = self.model.key_of(first, len);
        let k = sf.kva();
        for i in 0..len {
            assert_eq!(
                k.read_u64(i * self.fs).unwrap(),
                stamp(first + i),
                "{self:?}: sf_buf of frames {key:?}, page {i}"
            );
        }
        // The handle points at its first page inside the entry, which
        // starts at a granule of slots.
        let (g, fs) = (self.cfg.granule, self.fs);
        let seen = (k.addr() - (first - key.0) * fs, sf.slot().0);
        assert!(seen.1 % g == 0 && seen.1 + g <= SF_SLOTS, "{self:?}: sf_buf of {key:?} at slot {}", seen.1);
        match self.model.sf.addr.get(&key) {
            Some(&a) => assert_eq!(a, seen, "{self:?}: sf_buf of frames {key:?} moved while mapped (address, slot)"),
            None => {
                for (k, &(a, slot)) in &self.model.sf.addr {
                    assert_ne!(slot, seen.1, "{self:?}: {key:?} mapped at the slot of {k:?}");
                    // The model MMU's address is the frame's own (shared by
                    // design when two entries start at one frame).
                    if self.backend == Backend::Window {
                        assert_ne!(a, seen.0, "{self:?}: {key:?} mapped at the address of {k:?}");
                    }
                }
                self.model.sf.addr.insert(key, seen);
            }
        }
        self.sf.push(sf);
        self.model.sf_handles.push(key);
    }

    /// One window's MMU counters, and the frames entered in it slot by
    /// slot, against the model's.
    #[track_caller]
    pub(super) fn check_mmu(&mut self, lwbuf: bool, got: &MmuStats, want: &MmuCount, frames: Vec<usize>) {
        let sys = self.sys;
        let (which, what, mmu, syscalls_before) = if lwbuf {
            (0, "lwbuf", &**sys.lw.mmu(), sys.syscalls.0)
        } else {
            (1, "sf_buf", &**sys.pool.mmu(), sys.syscalls.1)
        };
        let got_t = (got.enters, got.replaces, got.pages_entered, got.pages_replaced, got.pages_removed, got.mapped);
        let want_t =
            (want.enters, want.replaces, want.pages_entered, want.pages_replaced, want.pages_removed, want.mapped);
        assert_eq!(
            got_t, want_t,
            "{self:?}: {what} MMU (enters, replaces, pages entered, replaced, removed, mapped)\nmodel: {want:?}\n{got}"
        );
        assert!(
            (want.removes_min..=want.removes_max).contains(&got.removes),
            "{self:?}: {what} MMU removes {} outside {}..={}\n{got}",
            got.removes,
            want.removes_min,
            want.removes_max
        );
        if self.backend == Backend::Window {
            let calls = got.syscalls - syscalls_before;
            assert_eq!(calls, got.enters + got.removes, "{self:?}: {what} system calls\n{got}");
        }
        if self.read_at[which] == Some(*got) {
            return;
        }
        self.read_at[which] = Some(*got);
        // The slots are read until as many are found entered as the MMU
        // counts (checked above): the caches take low slots first, and the
        // lwbuf window is mostly empty.
        let mut entered: Vec<usize> =
            (0..mmu.capacity()).filter_map(|s| mmu.translate(Slot(s))).map(|p| p.0).take(got.mapped as usize).collect();
        entered.sort_unstable();
        assert_eq!(entered, frames, "{self:?}: frames entered in the {what} window (entries' and stale)");
    }

    /// Every observable counter against the model.
    pub(super) fn compare(&mut self) {
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
        assert_eq!(self.sys.lw.check_consistency(), Ok(m.total_refs()), "{self:?}: references");

        let ss = self.sys.pool.stats();
        let used = m.sf.entries.values().filter(|e| e.refs > 0).count() as u64;
        let cached = m.sf.entries.values().filter(|e| e.refs == 0).count() as u64;
        let got = (ss.used, ss.cached, ss.hits, ss.misses, ss.evictions, ss.nowait_fails);
        let want = (used, cached, m.sf.hits, m.sf.misses, m.sf.evictions, m.sf.nowait_fails);
        assert_eq!(
            got, want,
            "{self:?}: sf_buf (used, cached, hits, misses, evictions, nowait_fails)\nmodel: {:?}\n{ss}",
            m.sf
        );
        let (lw_want, lw_frames) = (m.lw.mmu, m.lw_frames());
        let (sf_want, sf_frames) = (m.sf.window.mmu, m.sf_frames());
        self.check_mmu(true, &st.mmu, &lw_want, lw_frames);
        self.check_mmu(false, &ss.mmu, &sf_want, sf_frames);
    }
}

/// Run `ops` on a fresh system over `backend` built as `cfg` says,
/// checking every step against the model; then release everything, reclaim
/// and check that nothing is left. Panics at the first difference. Returns
/// both caches' statistics as the last operation left them.
pub fn run(ops: &[Op], backend: Backend, cfg: Config) -> (LwbufStats, SfStats) {
    let sys = system(backend, cfg);
    let fs = sys.mem.frame_size();
    let lw = &sys.lw;
    let stats = std::thread::scope(|s| {
        let mut run = Run {
            sys: &sys,
            fs,
            backend,
            cfg,
            model: Model::new(2, 2, cfg),
            guard: None,
            handles: Vec::new(),
            sf: Vec::new(),
            scope: s,
            helper: None,
            step: 0,
            op: Op::Poll,
            read_at: [None, None],
        };
        for (i, &op) in ops.iter().enumerate() {
            run.step = i;
            run.op = op;
            run.apply(op);
            run.compare();
        }
        let stats = (lw.stats(), sys.pool.stats());
        // Release everything: handles on the driver's CPU (or none), the
        // helper's binding, the driver's; then nothing may be left but
        // cached entries and stale mappings, which reclaim removes.
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
        for op in [Op::Reclaim, Op::SfReclaim] {
            run.op = op;
            run.apply(op);
            run.compare();
        }
        if let Some((cmd, _, t)) = run.helper.take() {
            drop(cmd); // the helper exits; joined so that its thread-locals are gone too
            t.join().expect("helper");
        }
        stats
    });
    assert_eq!(lw.check_consistency(), Ok(0));
    let st = lw.stats();
    assert!(st.per_cpu.iter().all(|c| c.mailbox == 0), "stranded messages\n{st}");
    assert_eq!(st.total.decrefs_sent, st.total.decrefs_applied);
    assert_eq!(sys.pool.stats().used, 0);
    assert_eq!((st.mmu.mapped, sys.pool.stats().mmu.mapped), (0, 0));
    stats
}
