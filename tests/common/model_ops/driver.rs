//! The driver: runs a sequence on the library and the model side by side.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::mpsc;

use lwbuf::{CpuGuard, Error, Lwbuf, Lwbufs, Page, PhysMem, Reclaim, SfBuf, SfPool, Wait};

use super::*;

pub(super) struct Sys {
    pub(super) mem: PhysMem,
    pub(super) pages: Vec<Page>,
    pub(super) foreign: Page,
    pub(super) lw: Lwbufs,
    pub(super) pool: SfPool,
}

pub(super) fn system(b: Backend) -> Sys {
    let mem = b.phys(FRAMES);
    let other = b.phys(1);
    let mmu = |slots: usize| b.mmu(&mem, slots);
    let pages = mem.alloc_run(FRAMES).unwrap();
    for p in &pages {
        p.direct().unwrap().write_u64(0, stamp(p.pfn().0)).unwrap();
    }
    // An explicit budget (far above anything mapped here): no reading of
    // /proc per system, which a fuzz execution would pay each time.
    // Strict reclaim: the model counts every eviction as one remove.
    let lw = Lwbufs::builder(mmu(LW_SLOTS))
        .cpus(CPUS)
        .max_excess(2)
        .map_budget(1 << 20)
        .reclaim(Reclaim::Strict)
        .build()
        .unwrap();
    let pool = SfPool::builder(mmu(SF_SLOTS))
        .max_excess(2)
        .map_budget(1 << 20)
        .shards(8)
        .reclaim(Reclaim::Strict)
        .build()
        .unwrap();
    let foreign = other.alloc_page().unwrap();
    Sys { mem, pages, foreign, lw, pool }
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
}

impl fmt::Debug for Run<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {} ({:?})", self.step, self.op)
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

    #[track_caller]
    pub(super) fn expect(&self, got: Outcome, want: Outcome) {
        assert_eq!(got, want, "{self:?}: result");
    }

    /// Check what an address shows, and remember it for its entry.
    #[track_caller]
    pub(super) fn saw(&mut self, cpu: usize, key: Key, seen: &Seen) {
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
            None => self.expect(outcome(&r), Outcome::Err("NotBound")),
            Some(cpu) => {
                self.expect(outcome(&r), Outcome::Ok);
                self.model.kva(i, cpu);
                let key = self.model.handles[i].key;
                self.saw(cpu, key, &r.unwrap());
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
    pub(super) fn compare(&self) {
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
