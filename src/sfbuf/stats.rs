//! Counters of the sf_buf pool, named as the kernels' users know them.

use std::fmt;

use crate::mmu::MmuStats;

/// A snapshot of an [`super::SfPool`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SfStats {
    /// sf_bufs in use now (a reference of either kind: the entry's count or
    /// a pin).
    pub used: u64,
    /// Cached unused sf_bufs now (mapped, on the inactive LRU).
    pub cached: u64,
    /// Mapped now: `used + cached`.
    pub mapped: u64,
    /// Most sf_bufs in use at once (sampled whenever the pool grows, from
    /// the entries' own counts: references taken by pinned hits are not in
    /// it).
    pub peak: u64,
    /// Allocations served from the cache: no system call.
    pub hits: u64,
    /// Allocations that mapped the frame anew.
    pub misses: u64,
    /// New mappings made (the pool grew by one entry).
    pub grows: u64,
    /// Cached mappings unmapped (excess cap, room for a miss, budget).
    pub evictions: u64,
    /// Pages those mappings mapped (a granule or run maps several).
    pub evicted_pages: u64,
    /// Allocations that had to sleep.
    pub waits: u64,
    /// Timed allocations that ran out of time: sleeps that ended in a
    /// timeout, and calls with a zero timeout that found no room (they
    /// never sleep, so they are not in `waits`).
    pub timeouts: u64,
    /// Sleeps that ended in a cancel.
    pub cancels: u64,
    /// No-wait calls (`alloc`, `alloc_run`, `alloc_all`) that failed with
    /// [`crate::Error::WouldBlock`].
    pub nowait_fails: u64,
    /// Attempts that found every slot mapped and in use, with nothing to
    /// evict: a no-wait failure, each try of a sleeping allocation, each
    /// piece an all-or-nothing request could not get. (A mapping budget or
    /// kernel refusal is an error returned at once, not counted here.)
    pub no_room: u64,
    /// Misses that lost the race to map the same frame (their mapping undone).
    pub lost_races: u64,
    /// Unmaps the MMU refused.
    pub unmap_errors: u64,
    /// Threads sleeping now.
    pub waiters: u64,
    /// Live mappings counted against the budget.
    pub live_mappings: u64,
    /// The mapping budget.
    pub map_budget: u64,
    /// The cap on cached unused sf_bufs.
    pub max_excess: u64,
    /// The MMU's counters.
    pub mmu: MmuStats,
}

impl SfStats {
    /// Hits over hits plus misses.
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

impl fmt::Display for SfStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "sf_buf: used {} (peak {}), cached {} (max_excess {}), hits {} misses {} ({:.1}% hit), grows {}, evictions {}",
            self.used,
            self.peak,
            self.cached,
            self.max_excess,
            self.hits,
            self.misses,
            100.0 * self.hit_rate(),
            self.grows,
            self.evictions
        )?;
        writeln!(
            f,
            "  waits {} (timeouts {}, cancels {}, waiting now {}), nowait failures {}, attempts without room {}, lost races {}, unmap errors {}",
            self.waits,
            self.timeouts,
            self.cancels,
            self.waiters,
            self.nowait_fails,
            self.no_room,
            self.lost_races,
            self.unmap_errors
        )?;
        writeln!(f, "  live mappings {} of budget {}", self.live_mappings, self.map_budget)?;
        write!(f, "  mmu: {}", self.mmu)
    }
}
