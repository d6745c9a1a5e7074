//! The reference model: what every operation must return and do.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use lwbuf::Error;

use super::*;

/// A cache key: first frame and length.
pub(super) type Key = (usize, usize);

/// What an operation returned: `Ok`, or the error's variant name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Err(&'static str),
}

pub(super) fn outcome<T>(r: &Result<T, Error>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Err(err_name(e)),
    }
}

pub(super) fn err_name(e: &Error) -> &'static str {
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
pub(super) struct CpuModel {
    pub(super) refs: BTreeMap<Key, u32>,
    /// The clock queue, oldest release first: every unused entry, and used
    /// ones the hand has not passed since they were re-used.
    pub(super) clock: VecDeque<Key>,
    /// Entries on the clock queue.
    pub(super) queued: BTreeSet<Key>,
    /// Queued entries released again since the hand last saw them.
    pub(super) referenced: BTreeSet<Key>,
    pub(super) mailbox: Vec<Key>,
    /// Address of each mapped entry, once seen.
    pub(super) addr: HashMap<Key, usize>,
    pub(super) allocs: u64,
    pub(super) hits: u64,
    pub(super) misses: u64,
    pub(super) foreign: u64,
    pub(super) sent: u64,
    pub(super) applied: u64,
    pub(super) evictions: u64,
}

impl CpuModel {
    /// Entries with a count of zero (cached unused).
    pub(super) fn unused(&self) -> usize {
        self.refs.values().filter(|&&r| r == 0).count()
    }
}

#[derive(Debug, Clone)]
pub(super) struct HandleModel {
    pub(super) key: Key,
    pub(super) home: usize,
    pub(super) mask: BTreeSet<usize>,
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct SfEntry {
    pub(super) refs: u32,
    pub(super) referenced: bool,
    pub(super) on_lru: bool,
}

#[derive(Debug, Default, Clone)]
pub(super) struct SfModel {
    pub(super) entries: BTreeMap<usize, SfEntry>,
    pub(super) lru: VecDeque<usize>,
    pub(super) addr: HashMap<usize, usize>,
    pub(super) max_excess: usize,
    pub(super) hits: u64,
    pub(super) misses: u64,
    pub(super) evictions: u64,
    pub(super) nowait_fails: u64,
    pub(super) enters: u64,
    pub(super) removes: u64,
}

/// The reference model of the whole system.
#[derive(Debug, Clone)]
pub(super) struct Model {
    pub(super) cpus: Vec<CpuModel>,
    pub(super) max_excess: usize,
    pub(super) main_cpu: Option<usize>,
    pub(super) helper_cpu: Option<usize>,
    pub(super) handles: Vec<HandleModel>,
    pub(super) unbound_sent: u64,
    pub(super) enters: u64,
    pub(super) removes: u64,
    pub(super) sf: SfModel,
    pub(super) sf_handles: Vec<usize>,
}

/// Mailbox length at which a sender drains an idle owner's mailbox for it
/// (the library's `MAILBOX_DRAIN_AT`).
pub(super) const MAILBOX_DRAIN_AT: usize = 256;

impl Model {
    pub(super) fn new(max_excess: usize, sf_max_excess: usize) -> Model {
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

    pub(super) fn is_bound(&self, cpu: usize) -> bool {
        self.main_cpu == Some(cpu) || self.helper_cpu == Some(cpu)
    }

    pub(super) fn decref(&mut self, cpu: usize, key: Key) {
        let c = &mut self.cpus[cpu];
        let r = c.refs.get_mut(&key).unwrap_or_else(|| panic!("model: decref of {key:?} on CPU {cpu}: no entry"));
        assert!(*r > 0, "model: decref of unreferenced {key:?} on CPU {cpu}");
        *r -= 1;
        if *r == 0 {
            if c.queued.contains(&key) {
                // The newest on the queue: no mark (see `src/lwbuf/pcpu.rs`).
                if c.clock.back() != Some(&key) {
                    c.referenced.insert(key);
                }
            } else {
                c.queued.insert(key);
                c.clock.push_back(key);
            }
        }
    }

    /// The clock hand (the library's order: see `src/lwbuf/pcpu.rs`).
    pub(super) fn evict_one(&mut self, cpu: usize) -> bool {
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

    pub(super) fn trim(&mut self, cpu: usize, max: usize) {
        while self.cpus[cpu].unused() > max {
            self.evict_one(cpu);
        }
    }

    pub(super) fn drain(&mut self, cpu: usize, max: usize) {
        for key in std::mem::take(&mut self.cpus[cpu].mailbox) {
            self.cpus[cpu].applied += 1;
            self.decref(cpu, key);
        }
        self.trim(cpu, max);
    }

    /// The owner's entry into its cache: pending mail, then the limit.
    pub(super) fn enter_cpu(&mut self, cpu: usize) {
        if !self.cpus[cpu].mailbox.is_empty() || self.cpus[cpu].unused() > self.max_excess {
            self.drain(cpu, self.max_excess);
        }
    }

    pub(super) fn acquire(&mut self, cpu: usize, key: Key) {
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

    pub(super) fn send_decref(&mut self, from: Option<usize>, cpu: usize, key: Key) {
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
    pub(super) fn release(&mut self, h: HandleModel, me: Option<usize>) {
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
    pub(super) fn kva(&mut self, i: usize, cpu: usize) {
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

    pub(super) fn unbind(&mut self, cpu: usize) {
        self.drain(cpu, self.max_excess);
    }

    pub(super) fn bind_result(&self, cpu: usize, me_bound: Option<usize>) -> Outcome {
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

    pub(super) fn set_max_excess(&mut self, n: usize) {
        self.max_excess = n;
        for cpu in 0..CPUS {
            self.drain(cpu, n);
        }
    }

    pub(super) fn reclaim(&mut self) {
        for cpu in 0..CPUS {
            self.drain(cpu, usize::MAX);
            while self.evict_one(cpu) {}
        }
    }

    pub(super) fn total_refs(&self) -> u64 {
        self.cpus.iter().flat_map(|c| c.refs.values()).map(|&r| r as u64).sum()
    }

    // --- the sf_buf pool ---

    pub(super) fn sf_evict_one(&mut self) -> bool {
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

    pub(super) fn sf_trim(&mut self) {
        while self.sf.lru.len() > self.sf.max_excess {
            if !self.sf_evict_one() {
                break;
            }
        }
    }

    pub(super) fn sf_alloc(&mut self, f: usize) -> Outcome {
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

    pub(super) fn sf_release(&mut self, f: usize) {
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
