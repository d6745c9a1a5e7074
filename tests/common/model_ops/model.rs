//! The reference model: what every operation must return and do.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use lwbuf::{Error, Reclaim};

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

/// The key under which `n` contiguous frames from `first` are cached with a
/// granule of `g` frames (the library's rule, `KvaSpace::key_of`): the
/// granules they lie in, cut at the end of the memory (with `g` = 1, the
/// run itself).
pub(super) fn key_of(g: usize, first: usize, n: usize) -> Key {
    let base = first / g * g;
    let end = if first + n <= base + g { base + g } else { (first + n).div_ceil(g) * g };
    (base, end.min(FRAMES) - base)
}

/// Slots a mapping of `pages` frames takes with a granule of `g`: whole
/// granules.
pub(super) fn slots_for(g: usize, pages: usize) -> usize {
    pages.div_ceil(g) * g
}

/// The frames of `key`, one by one.
pub(super) fn frames_of(key: Key) -> std::ops::Range<usize> {
    key.0..key.0 + key.1
}

/// A claim on slots as the model sees it: how many (whole granules), and the
/// frames an evicted mapping left entered from its first slot under lazy
/// reclaim (`stale.1 == 0`: a clean claim). Where the slots lie is left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Claim {
    pub(super) len: usize,
    pub(super) stale: Key,
}

impl Claim {
    fn clean(len: usize) -> Claim {
        Claim { len, stale: (0, 0) }
    }

    fn is_stale(&self) -> bool {
        self.stale.1 > 0
    }
}

/// The MMU calls and counts of one window the model predicts (`MmuStats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct MmuCount {
    pub(super) enters: u64,
    pub(super) replaces: u64,
    pub(super) pages_entered: u64,
    pub(super) pages_replaced: u64,
    pub(super) pages_removed: u64,
    /// Slots with a frame entered: the entries' pages plus the stale ones.
    pub(super) mapped: u64,
    /// Removes, as a range. Exact under strict reclaim (one per eviction),
    /// and one per replace over a longer stale mapping (its slots beyond
    /// the new pages). A batch purge of stale claims makes one remove per contiguous range
    /// of slots, and which claims are neighbours depends on where the slot
    /// allocator put them, which the model leaves out: it counts at least
    /// one per purge and one per partly entered claim (such a claim ends a
    /// range), at most one per claim. The pages removed are exact.
    pub(super) removes_min: u64,
    pub(super) removes_max: u64,
}

/// One window's slot allocator (`KvaSpace`, `src/kva.rs`) as the model sees
/// it: the free clean granules by count, the stale claims given back in the
/// order of the window's list, and the MMU calls made.
#[derive(Debug, Clone)]
pub(super) struct WindowModel {
    pub(super) granule: usize,
    pub(super) reclaim: Reclaim,
    /// Free granules with nothing entered.
    pub(super) clean: usize,
    /// Stale claims waiting for reuse or a purge, in the list's order.
    pub(super) stale: Vec<Claim>,
    pub(super) mmu: MmuCount,
}

impl WindowModel {
    pub(super) fn new(slots: usize, granule: usize, reclaim: Reclaim) -> Self {
        WindowModel { granule, reclaim, clean: slots / granule, stale: Vec::new(), mmu: MmuCount::default() }
    }

    /// Slots free for a new mapping, clean or stale (`KvaSpace::free_slots`).
    pub(super) fn free_slots(&self) -> usize {
        self.clean * self.granule + self.stale.iter().map(|c| c.len).sum::<usize>()
    }

    /// `KvaSpace::take`: the last stale claim of the right length listed,
    /// else clean granules, else clean ones after a purge. Clean granules
    /// count as adjacent when there are enough of them: only lwbuf runs
    /// take more than one at a time, from a window far larger than anything
    /// mapped (sf_buf runs are cut to one granule: see `Op::SfAllocRun`).
    pub(super) fn take(&mut self, pages: usize) -> Option<Claim> {
        let len = slots_for(self.granule, pages);
        if let Some(i) = self.stale.iter().rposition(|c| c.len == len) {
            return Some(self.stale.swap_remove(i));
        }
        let units = len / self.granule;
        if self.clean < units {
            self.purge();
            if self.clean < units {
                return None;
            }
        }
        self.clean -= units;
        Some(Claim::clean(len))
    }

    /// `KvaSpace::take_batch`: up to `max` single granules, stale ones from
    /// the back of the list first, then clean ones; with none, purge and
    /// try again.
    pub(super) fn take_batch(&mut self, max: usize, out: &mut Vec<Claim>) -> usize {
        let mut n = 0;
        let mut i = self.stale.len();
        while i > 0 && n < max {
            i -= 1;
            if self.stale[i].len == self.granule {
                out.push(self.stale.swap_remove(i));
                n += 1;
            }
        }
        let clean = (max - n).min(self.clean);
        self.clean -= clean;
        out.extend(std::iter::repeat_n(Claim::clean(self.granule), clean));
        n += clean;
        if n == 0 && self.purge() > 0 {
            return self.take_batch(max, out);
        }
        n
    }

    /// `KvaSpace::give` (and, claim by claim, `give_batch`): a stale claim
    /// joins the back of the list, a clean one the free granules.
    pub(super) fn give(&mut self, c: Claim) {
        if c.is_stale() {
            self.stale.push(c);
        } else {
            self.clean += c.len / self.granule;
        }
    }

    pub(super) fn give_batch(&mut self, cs: impl IntoIterator<Item = Claim>) {
        for c in cs {
            self.give(c);
        }
    }

    /// `KvaSpace::purge`: remove every stale claim listed. Returns the
    /// slots freed.
    pub(super) fn purge(&mut self) -> usize {
        if self.stale.is_empty() {
            return 0;
        }
        let runs = std::mem::take(&mut self.stale);
        let partial = runs.iter().filter(|c| c.stale.1 < c.len).count();
        let pages: usize = runs.iter().map(|c| c.stale.1).sum();
        let freed: usize = runs.iter().map(|c| c.len).sum();
        self.mmu.removes_min += partial.max(1) as u64;
        self.mmu.removes_max += runs.len() as u64;
        self.mmu.pages_removed += pages as u64;
        self.mmu.mapped -= pages as u64;
        self.clean += freed / self.granule;
        freed
    }

    /// `KvaSpace::map` of `key` into the claim: one enter, in place over a
    /// stale claim (`Mmu::replace`, which removes the old pages beyond the
    /// new ones with one more call).
    pub(super) fn map(&mut self, c: Claim, key: Key) {
        debug_assert_eq!(c.len, slots_for(self.granule, key.1), "model: claim and key disagree");
        let (count, old) = (key.1 as u64, c.stale.1 as u64);
        let m = &mut self.mmu;
        m.enters += 1;
        m.pages_entered += count;
        if old > 0 {
            m.replaces += 1;
            m.pages_replaced += old.min(count);
            if old > count {
                m.removes_min += 1;
                m.removes_max += 1;
                m.pages_removed += old - count;
            }
        }
        m.mapped = m.mapped + count - old;
    }

    /// `KvaSpace::retire` of an evicted entry's mapping: a stale claim
    /// under lazy reclaim, one remove and a clean claim under strict.
    pub(super) fn retire(&mut self, key: Key) -> Claim {
        let len = slots_for(self.granule, key.1);
        match self.reclaim {
            Reclaim::Lazy => Claim { len, stale: key },
            Reclaim::Strict => {
                let m = &mut self.mmu;
                m.removes_min += 1;
                m.removes_max += 1;
                m.pages_removed += key.1 as u64;
                m.mapped -= key.1 as u64;
                Claim::clean(len)
            }
        }
    }

    /// The frames left entered by the stale claims listed.
    pub(super) fn stale_frames(&self) -> impl Iterator<Item = usize> + '_ {
        self.stale.iter().flat_map(|c| frames_of(c.stale))
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
    /// Address of each mapped entry (its first slot's), once seen.
    pub(super) addr: HashMap<Key, usize>,
    /// The single granules this CPU holds for its next misses, clean or
    /// stale, in the order of its list (the last is taken first).
    pub(super) free: Vec<Claim>,
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
    /// The entry it holds (per CPU in its mask).
    pub(super) key: Key,
    /// The frames it maps: first and count.
    pub(super) hold: Key,
    pub(super) home: usize,
    pub(super) mask: BTreeSet<usize>,
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct SfEntry {
    pub(super) refs: u32,
    pub(super) referenced: bool,
    pub(super) on_lru: bool,
}

#[derive(Debug, Clone)]
pub(super) struct SfModel {
    pub(super) entries: BTreeMap<Key, SfEntry>,
    pub(super) lru: VecDeque<Key>,
    /// Address and first slot of each mapped entry, once seen.
    pub(super) addr: HashMap<Key, (usize, usize)>,
    pub(super) window: WindowModel,
    pub(super) max_excess: usize,
    pub(super) hits: u64,
    pub(super) misses: u64,
    pub(super) evictions: u64,
    pub(super) nowait_fails: u64,
}

/// The reference model of the whole system.
#[derive(Debug, Clone)]
pub(super) struct Model {
    pub(super) granule: usize,
    pub(super) cpus: Vec<CpuModel>,
    pub(super) max_excess: usize,
    pub(super) main_cpu: Option<usize>,
    pub(super) helper_cpu: Option<usize>,
    pub(super) handles: Vec<HandleModel>,
    pub(super) unbound_sent: u64,
    /// The lwbuf window.
    pub(super) lw: WindowModel,
    pub(super) sf: SfModel,
    pub(super) sf_handles: Vec<Key>,
}

/// Mailbox length at which a sender drains an idle owner's mailbox for it
/// (the library's `MAILBOX_DRAIN_AT`).
pub(super) const MAILBOX_DRAIN_AT: usize = 256;

/// Granules a CPU takes from the window at once, and half of what it keeps
/// before giving the surplus back (the library's `SLOT_BATCH`).
pub(super) const SLOT_BATCH: usize = 32;

impl Model {
    pub(super) fn new(max_excess: usize, sf_max_excess: usize, cfg: Config) -> Model {
        let g = cfg.granule;
        Model {
            granule: g,
            cpus: vec![CpuModel::default(); CPUS],
            max_excess,
            main_cpu: None,
            helper_cpu: None,
            handles: Vec::new(),
            unbound_sent: 0,
            lw: WindowModel::new(LW_SLOTS, g, cfg.reclaim),
            sf: SfModel {
                entries: BTreeMap::new(),
                lru: VecDeque::new(),
                addr: HashMap::new(),
                window: WindowModel::new(SF_SLOTS, g, cfg.reclaim),
                max_excess: sf_max_excess,
                hits: 0,
                misses: 0,
                evictions: 0,
                nowait_fails: 0,
            },
            sf_handles: Vec::new(),
        }
    }

    /// The key of `n` frames from `first`.
    pub(super) fn key_of(&self, first: usize, n: usize) -> Key {
        key_of(self.granule, first, n)
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

    /// The clock hand (the library's order: see `src/lwbuf/pcpu.rs`); the
    /// evicted entry's slots are retired and kept by the CPU.
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
        let claim = self.lw.retire(key);
        self.put_slots(cpu, claim);
        true
    }

    /// `Local::put_slots`: a single granule stays with the CPU (beyond
    /// twice a batch, the oldest go back to the window down to one batch);
    /// a longer claim goes back to the window.
    fn put_slots(&mut self, cpu: usize, c: Claim) {
        if c.len != self.granule {
            self.lw.give(c);
            return;
        }
        let free = &mut self.cpus[cpu].free;
        free.push(c);
        if free.len() > 2 * SLOT_BATCH {
            let surplus = free.len() - SLOT_BATCH;
            let back: Vec<Claim> = free.drain(..surplus).collect();
            self.lw.give_batch(back);
        }
    }

    /// `Local::take_slots`: slots for a miss of `pages` frames. One granule
    /// comes from the CPU's list (refilled by a batch from the window);
    /// a longer claim from the window (after giving the CPU's granules
    /// back, if that is what it lacks). Evicting for room never happens
    /// here: the window is far larger than anything the sequences map.
    fn take_slots(&mut self, cpu: usize, pages: usize) -> Claim {
        const RAN_OUT: &str = "model: the lwbuf window ran out (LW_SLOTS is meant to be out of reach)";
        if pages <= self.granule {
            loop {
                if let Some(c) = self.cpus[cpu].free.pop() {
                    return c;
                }
                assert!(self.lw.take_batch(SLOT_BATCH, &mut self.cpus[cpu].free) > 0, "{RAN_OUT}");
            }
        }
        loop {
            if let Some(c) = self.lw.take(pages) {
                return c;
            }
            assert!(!self.cpus[cpu].free.is_empty(), "{RAN_OUT}");
            let free = std::mem::take(&mut self.cpus[cpu].free);
            self.lw.give_batch(free);
        }
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
        self.cpus[cpu].allocs += 1;
        if let Some(r) = self.cpus[cpu].refs.get_mut(&key) {
            *r += 1;
            self.cpus[cpu].hits += 1;
            return;
        }
        let claim = self.take_slots(cpu, key.1);
        self.lw.map(claim, key);
        let c = &mut self.cpus[cpu];
        c.refs.insert(key, 1);
        c.misses += 1;
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
            // A release at home of a handle used nowhere else touches only
            // its entry (the mailbox waits for the next alloc or poll).
            if h.mask.len() > 1 {
                self.enter_cpu(h.home);
            }
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

    /// `Lwbufs::reclaim`: every CPU drained and emptied, its free granules
    /// given back, then every stale claim purged. Returns the slots the
    /// window gained.
    pub(super) fn reclaim(&mut self) -> usize {
        let before = self.lw.free_slots();
        let mut freed = Vec::new();
        for cpu in 0..CPUS {
            self.drain(cpu, usize::MAX);
            while self.evict_one(cpu) {}
            freed.append(&mut self.cpus[cpu].free);
        }
        self.lw.give_batch(freed);
        self.lw.purge();
        self.lw.free_slots().saturating_sub(before)
    }

    pub(super) fn total_refs(&self) -> u64 {
        self.cpus.iter().flat_map(|c| c.refs.values()).map(|&r| r as u64).sum()
    }

    /// The frames entered in the lwbuf window, sorted: every entry's, and
    /// the stale ones the CPUs and the window hold.
    pub(super) fn lw_frames(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .cpus
            .iter()
            .flat_map(|c| {
                c.refs.keys().flat_map(|&k| frames_of(k)).chain(c.free.iter().flat_map(|f| frames_of(f.stale)))
            })
            .chain(self.lw.stale_frames())
            .collect();
        v.sort_unstable();
        v
    }

    // --- the sf_buf pool ---

    /// The clock hand over the LRU; returns the evicted entry's retired
    /// slots.
    pub(super) fn sf_evict_one(&mut self) -> Option<Claim> {
        let sf = &mut self.sf;
        let mut budget = 2 * sf.lru.len() + 2;
        while budget > 0 {
            budget -= 1;
            let k = sf.lru.pop_front()?;
            let e = sf.entries.get_mut(&k).expect("model: LRU entry exists");
            if e.refs != 0 {
                e.on_lru = false;
                e.referenced = false;
            } else if e.referenced {
                e.referenced = false;
                sf.lru.push_back(k);
            } else {
                sf.entries.remove(&k);
                sf.addr.remove(&k);
                sf.evictions += 1;
                return Some(sf.window.retire(k));
            }
        }
        None
    }

    pub(super) fn sf_trim(&mut self) {
        while self.sf.lru.len() > self.sf.max_excess {
            match self.sf_evict_one() {
                Some(c) => self.sf.window.give(c),
                None => break,
            }
        }
    }

    /// `SfPool::alloc(_run)` of `key` without waiting: a hit, or a miss into
    /// slots the window has, or that an eviction frees.
    pub(super) fn sf_alloc(&mut self, key: Key) -> Outcome {
        if let Some(e) = self.sf.entries.get_mut(&key) {
            e.refs += 1;
            e.referenced = true;
            self.sf.hits += 1;
            return Outcome::Ok;
        }
        let len = slots_for(self.granule, key.1);
        let claim = loop {
            if let Some(c) = self.sf.window.take(key.1) {
                break c;
            }
            match self.sf_evict_one() {
                Some(c) if c.len == len => break c,
                Some(c) => self.sf.window.give(c),
                None => {
                    self.sf.nowait_fails += 1;
                    return Outcome::Err("WouldBlock");
                }
            }
        };
        self.sf.window.map(claim, key);
        self.sf.entries.insert(key, SfEntry { refs: 1, referenced: true, on_lru: false });
        self.sf.misses += 1;
        Outcome::Ok
    }

    pub(super) fn sf_release(&mut self, key: Key) {
        let e = self.sf.entries.get_mut(&key).expect("model: released entry exists");
        e.refs -= 1;
        if e.refs == 0 && !e.on_lru {
            e.on_lru = true;
            self.sf.lru.push_back(key);
        }
        if self.sf.lru.len() > self.sf.max_excess {
            self.sf_trim();
        }
    }

    /// `SfPool::reclaim`: evict every unused entry, then purge. Returns the
    /// slots the window gained.
    pub(super) fn sf_reclaim(&mut self) -> usize {
        let before = self.sf.window.free_slots();
        while let Some(c) = self.sf_evict_one() {
            self.sf.window.give(c);
        }
        self.sf.window.purge();
        self.sf.window.free_slots().saturating_sub(before)
    }

    /// The frames entered in the sf_buf window, sorted.
    pub(super) fn sf_frames(&self) -> Vec<usize> {
        let mut v: Vec<usize> =
            self.sf.entries.keys().flat_map(|&k| frames_of(k)).chain(self.sf.window.stale_frames()).collect();
        v.sort_unstable();
        v
    }
}
