//! Counters of the lwbuf caches.

use std::fmt;

use super::pcpu::{Local, Pcpu};
use crate::mmu::MmuStats;
use crate::sync::Ordering;

/// One CPU's counters (or their sum).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CpuStats {
    /// `alloc` calls (and foreign-CPU entry creations) on this CPU.
    pub allocs: u64,
    /// Of those, found cached: no system call.
    pub hits: u64,
    /// Of those, mapped anew.
    pub misses: u64,
    /// Address requests from a CPU not yet in the handle's mask.
    pub foreign: u64,
    /// Decref messages sent by threads bound to this CPU.
    pub decrefs_sent: u64,
    /// Decref messages applied to this CPU's cache.
    pub decrefs_applied: u64,
    /// Entries unmapped to respect the excess limit or to free slots.
    pub evictions: u64,
    /// Pages those entries mapped (a granule or run entry maps several).
    pub evicted_pages: u64,
    /// Entries mapped now (in use or cached).
    pub mapped: u64,
    /// Entries mapped and unused now.
    pub cached: u64,
    /// Most entries mapped at once.
    pub peak: u64,
    /// Messages waiting in the mailbox now.
    pub mailbox: u64,
    /// Unmaps the MMU refused (the entry stayed cached).
    pub unmap_errors: u64,
}

impl CpuStats {
    pub(crate) fn read(l: &Local, pc: &Pcpu) -> CpuStats {
        CpuStats {
            // Every successful alloc is a hit or a miss: one counter fewer
            // on the hit path.
            allocs: l.counters.hits + l.counters.misses,
            hits: l.counters.hits,
            misses: l.counters.misses,
            foreign: l.counters.foreign,
            decrefs_sent: pc.sent.load(Ordering::Relaxed),
            decrefs_applied: l.counters.applied,
            evictions: l.counters.evictions,
            evicted_pages: l.counters.evicted_pages,
            mapped: l.mapped() as u64,
            cached: l.cached() as u64,
            peak: l.counters.peak_mapped,
            mailbox: pc.mailbox.len() as u64,
            unmap_errors: l.counters.unmap_errors,
        }
    }

    fn add(&mut self, o: &CpuStats) {
        self.allocs += o.allocs;
        self.hits += o.hits;
        self.misses += o.misses;
        self.foreign += o.foreign;
        self.decrefs_sent += o.decrefs_sent;
        self.decrefs_applied += o.decrefs_applied;
        self.evictions += o.evictions;
        self.evicted_pages += o.evicted_pages;
        self.mapped += o.mapped;
        self.cached += o.cached;
        self.peak += o.peak;
        self.mailbox += o.mailbox;
        self.unmap_errors += o.unmap_errors;
    }

    /// Hits over allocs (0 with no allocs).
    pub fn hit_rate(&self) -> f64 {
        if self.allocs == 0 {
            0.0
        } else {
            self.hits as f64 / self.allocs as f64
        }
    }
}

/// A snapshot of an [`super::Lwbufs`]: per CPU, summed, and the MMU's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LwbufStats {
    /// Indexed by CPU id.
    pub per_cpu: Vec<CpuStats>,
    /// The sum over CPUs (`peak` is the sum of per-CPU peaks), with
    /// `decrefs_sent` including those sent by unbound threads.
    pub total: CpuStats,
    /// Decref messages sent by threads with no CPU bound.
    pub unbound_sent: u64,
    /// The MMU's counters.
    pub mmu: MmuStats,
}

impl LwbufStats {
    /// `purge_failures`: batch removes of lazily reclaimed mappings that
    /// the MMU refused, counted in the total's `unmap_errors`.
    pub(crate) fn new(per_cpu: Vec<CpuStats>, unbound_sent: u64, mmu: MmuStats, purge_failures: u64) -> Self {
        let mut total = CpuStats::default();
        for c in &per_cpu {
            total.add(c);
        }
        total.decrefs_sent += unbound_sent;
        total.unmap_errors += purge_failures;
        LwbufStats { per_cpu, total, unbound_sent, mmu }
    }
}

impl fmt::Display for CpuStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "allocs {} (hits {}, misses {}, {:.1}% hit), foreign {}, decrefs sent {} applied {}, \
             evictions {}, mapped {} (cached {}, peak {}), mailbox {}",
            self.allocs,
            self.hits,
            self.misses,
            100.0 * self.hit_rate(),
            self.foreign,
            self.decrefs_sent,
            self.decrefs_applied,
            self.evictions,
            self.mapped,
            self.cached,
            self.peak,
            self.mailbox
        )?;
        if self.unmap_errors > 0 {
            write!(f, ", unmap errors {}", self.unmap_errors)?;
        }
        Ok(())
    }
}

impl fmt::Display for LwbufStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "lwbuf: {}", self.total)?;
        for (cpu, s) in self.per_cpu.iter().enumerate() {
            if s.allocs > 0 || s.mapped > 0 || s.decrefs_sent > 0 || s.mailbox > 0 {
                writeln!(f, "  cpu {cpu:>3}: {s}")?;
            }
        }
        if self.unbound_sent > 0 {
            writeln!(f, "  unbound threads sent {} decrefs", self.unbound_sent)?;
        }
        write!(f, "  mmu: {}", self.mmu)
    }
}
