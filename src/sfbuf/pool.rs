//! The pool itself: its builder, its fields and counters, the public entry
//! points (`alloc`, `alloc_run`, `alloc_all`), the cap on cached entries,
//! `close`, the statistics and the final unmap. The paths an allocation
//! takes are in `hit.rs` (a cached frame) and `miss.rs` (a new mapping);
//! releases are in `handle.rs`.

use std::fmt;
use std::ptr::NonNull;

use super::counter::Striped;
use super::entry::Entry;
use super::hint::Hints;
use super::hit::{pin_row_len, PIN_ROWS};
use super::lru::Lru;
use super::wait::{Outcome, WaitQueue};
use super::{SfBuf, SfStats, Wait};
use crate::error::{Error, Result};
use crate::kva::{Hold, KvaSpace, MapKey, Mapping, Reclaim};
use crate::mmu::Mmu;
use crate::phys::{contiguous_prefix, Page};
use crate::sync::barrier;
use crate::sync::{fence, lock, Arc, AtomicBool, AtomicU64, AtomicUsize, CachePadded, ConcurrentMap, Mutex, Ordering};

// === impl SfPoolBuilder ===

/// Builds an [`SfPool`]. See [`SfPool::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until it is built"]
pub struct SfPoolBuilder {
    mmu: std::sync::Arc<dyn Mmu>,
    max_excess: Option<usize>,
    map_budget: Option<usize>,
    shards: usize,
    granule: Option<usize>,
    reclaim: Reclaim,
}

impl SfPoolBuilder {
    /// What becomes of an evicted entry's mapping, as
    /// [`LwbufsBuilder::reclaim`](crate::LwbufsBuilder::reclaim). Default:
    /// [`Reclaim::Lazy`].
    pub fn reclaim(mut self, r: Reclaim) -> Self {
        self.reclaim = r;
        self
    }

    /// The mapping granule: the frames mapped, cached and evicted as one
    /// unit, aligned to their number (a power of two, at most the window's
    /// slots), as [`LwbufsBuilder::granule`](crate::LwbufsBuilder::granule).
    /// Default: the memory's smallest granule.
    pub fn granule(mut self, frames: usize) -> Self {
        self.granule = Some(frames);
        self
    }

    /// Cached unused sf_bufs kept at most (entries: a granule or run
    /// mapping is one). Default: a quarter of the window's granules.
    pub fn max_excess(mut self, n: usize) -> Self {
        self.max_excess = Some(n);
        self
    }

    /// Live mappings allowed (default [`crate::default_map_budget`]).
    pub fn map_budget(mut self, n: usize) -> Self {
        self.map_budget = Some(n);
        self
    }

    /// Shards of the concurrent map (rounded up to a power of two; default
    /// 256).
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n;
        self
    }

    /// Create the pool. No system call; no mapping is made until used.
    /// Its bookkeeping is about 300 bytes per slot of the window (pin rows
    /// and the hint table allocated zeroed, resident as they are used;
    /// entries written at once). [`Error::Config`] naming `"slots"` if the
    /// allocator refuses any of it.
    pub fn build(self) -> Result<SfPool> {
        if self.shards == 0 || self.shards > 1 << 16 {
            return Err(Error::config("shards", format!("{} is not in 1..=65536", self.shards)));
        }
        let kva = KvaSpace::new(self.mmu, self.map_budget, self.granule, self.reclaim)?;
        let cap = kva.capacity();
        // Slot numbers are u32 (map values, pins, handles), and a hint
        // holds `slot + 1` in 32 bits.
        if cap >= u32::MAX as usize {
            return Err(Error::config("slots", format!("{cap} slots: a pool takes fewer than {}", u32::MAX)));
        }
        // The per-slot tables, allocated fallibly: a window too large for
        // this machine's memory is an error naming it, not an abort.
        let refused = |what: &str, bytes: usize| {
            Error::config("slots", format!("{cap} slots: the pool's {what} ({bytes} bytes) cannot be allocated"))
        };
        let pin_stride = pin_row_len(cap);
        let pin_count = PIN_ROWS * pin_stride;
        let pins = crate::sync::try_zeroed::<AtomicU64>(pin_count)
            .ok_or_else(|| refused("pin rows", pin_count.saturating_mul(8)))?;
        let entries = crate::sync::try_table(cap, || CachePadded::new(Entry::new()))
            .ok_or_else(|| refused("entries", cap.saturating_mul(std::mem::size_of::<CachePadded<Entry>>())))?;
        // Indexed by granule; a hint holds the entry's slot number, so
        // its slot field is sized for every slot, not every granule.
        let hint = Hints::new(cap, kva.phys().frames().div_ceil(kva.granule()))
            .map_err(|bytes| refused("hint table", bytes))?;
        barrier::init();
        #[cfg(loom)]
        super::counter::init();
        Ok(SfPool {
            map: ConcurrentMap::new(self.shards),
            hint,
            pins,
            pin_stride,
            entries,
            lru: Mutex::new(Lru::default()),
            lru_len: AtomicUsize::new(0),
            stale: Mutex::new(Vec::new()),
            // Entries, each a granule of slots.
            max_excess: AtomicUsize::new(self.max_excess.unwrap_or((cap / kva.granule() / 4).max(1))),
            waitq: WaitQueue::new(),
            closed: AtomicBool::new(false),
            peak: AtomicU64::new(0),
            counters: Counters::default(),
            kva,
        })
    }
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) hits: Striped,
    pub(super) misses: Striped,
    pub(super) used: Striped,
    pub(super) grows: Striped,
    pub(super) evictions: Striped,
    pub(super) evicted_pages: Striped,
    pub(super) waits: Striped,
    pub(super) timeouts: Striped,
    pub(super) cancels: Striped,
    pub(super) nowait_fails: Striped,
    pub(super) no_room: Striped,
    pub(super) lost_races: Striped,
    pub(super) unmap_errors: Striped,
}

// === impl SfPool ===

/// A pool of cached mappings shared by every thread.
///
/// ```
/// use std::sync::Arc;
/// use lwbuf::{PhysMem, SfPool, Wait, Window};
///
/// let mem = PhysMem::builder().frames(64).build()?;
/// let pool = SfPool::builder(Arc::new(Window::builder(&mem).slots(16).build()?)).build()?;
/// let page = mem.alloc_page()?;
/// let sf = pool.alloc(&page, Wait::NoWait)?;     // a miss: one mmap
/// sf.kva().write_at(0, b"sf_buf")?;
/// drop(sf);                                      // cached, still mapped
/// let sf = pool.alloc(&page, Wait::Forever)?;    // a hit: no system call
/// assert_eq!(sf.kva().read_u64(0)? & 0xffff, u64::from_ne_bytes(*b"sf_buf\0\0") & 0xffff);
/// assert_eq!(pool.stats().hits, 1);
/// # Ok::<(), lwbuf::Error>(())
/// ```
pub struct SfPool {
    pub(super) kva: KvaSpace,
    pub(super) map: ConcurrentMap<MapKey, u32>,
    /// Per granule (per frame with the default granule of 1), `(slot,
    /// generation)` of the granule's mapping last published (`hit.rs`, 6):
    /// two hints per bucket, buckets in proportion to the window's slots
    /// (`hint.rs`). Stale hints, and hints of another granule of the
    /// bucket, are harmless.
    pub(super) hint: Hints,
    /// `PIN_ROWS` rows of one 64-bit count per slot (128 bytes a slot; each
    /// row padded to whole 128-byte blocks: `pin_row_len`): the
    /// references taken by pinned hits (`hit.rs`, 9; `miss.rs`, 10;
    /// `handle.rs`, 11-12); the first `PIN_STRIPES` rows each written by
    /// the one thread that owns it, the others shared.
    pub(super) pins: Box<[AtomicU64]>,
    /// Counts in a row of `pins` (`pin_row_len` of the slots).
    pub(super) pin_stride: usize,
    pub(super) entries: Box<[CachePadded<Entry>]>,
    pub(super) lru: Mutex<Lru>,
    /// Mirror of the LRU's length, for the lock-free check on release.
    pub(super) lru_len: AtomicUsize,
    /// Mappings whose unmap failed and that no entry can keep (a lost
    /// race's duplicate, or an evicted entry whose key was mapped again
    /// meanwhile): out of every lookup, their slots never reused, and
    /// unmapped again at the next trim.
    pub(super) stale: Mutex<Vec<Mapping>>,
    pub(super) max_excess: AtomicUsize,
    pub(super) waitq: Arc<WaitQueue>,
    /// Set by `close`: every allocation from then on fails. Read by every
    /// call, hit or miss; here rather than behind the wait queue's pointer,
    /// so a hit makes no extra dependent load.
    pub(super) closed: AtomicBool,
    pub(super) peak: AtomicU64,
    pub(super) counters: Counters,
}

impl SfPool {
    /// A builder over `mmu` (the real [`crate::Window`] or
    /// [`crate::ModelMmu`]).
    pub fn builder(mmu: std::sync::Arc<dyn Mmu>) -> SfPoolBuilder {
        SfPoolBuilder {
            mmu,
            max_excess: None,
            map_budget: None,
            shards: 256,
            granule: None,
            reclaim: Reclaim::default(),
        }
    }

    /// The MMU below the pool.
    pub fn mmu(&self) -> &std::sync::Arc<dyn Mmu> {
        self.kva.mmu()
    }

    /// Slots in the window: the most sf_bufs that can be mapped at once.
    pub fn capacity(&self) -> usize {
        self.kva.capacity()
    }

    /// What becomes of evicted mappings (see [`SfPoolBuilder::reclaim`]).
    pub fn reclaim_mode(&self) -> Reclaim {
        self.kva.reclaim()
    }

    /// The mapping granule, in frames (see [`SfPoolBuilder::granule`]).
    pub fn granule(&self) -> usize {
        self.kva.granule()
    }

    /// How the send engines prefault this pool's mappings.
    pub(crate) fn prefault_plan(&self) -> crate::kaddr::PrefaultPlan {
        self.kva.prefault_plan()
    }

    /// The cap on cached unused sf_bufs.
    pub fn max_excess(&self) -> usize {
        self.max_excess.load(Ordering::Relaxed)
    }

    /// Change the cap; enforced before this returns (each eviction is a
    /// system call).
    pub fn set_max_excess(&self, n: usize) {
        self.max_excess.store(n, Ordering::Relaxed);
        // SeqCst: against a release that lists an entry, fences and then
        // reads the cap (`after_release`): either it sees the new cap and
        // trims, or this trim sees its entry on the LRU.
        fence(Ordering::SeqCst);
        self.trim();
    }

    /// Unmap every cached unused mapping now (the cap stays), and remove the
    /// mappings lazy reclaim left behind. Returns the slots given back to
    /// the window. One system call per contiguous range of slots unmapped.
    pub fn reclaim(&self) -> usize {
        let before = self.kva.free_slots();
        while let Ok(Some(run)) = self.evict_one() {
            self.give_slots(run);
        }
        self.kva.purge();
        self.waitq.wake();
        self.kva.free_slots().saturating_sub(before)
    }

    /// Map `page`. A hit (the frame is cached) makes no system call; a miss
    /// makes one `mmap`, plus an unmap when it evicts. When every slot is
    /// mapped and in use, `how` decides (see [`Wait`]).
    ///
    /// Errors: [`Error::ForeignPage`], [`Error::WouldBlock`],
    /// [`Error::TimedOut`], [`Error::Cancelled`], [`Error::Closed`] (after
    /// [`close`](Self::close), hit or miss),
    /// [`Error::MapLimit`] / [`Error::Sys`] when the mapping budget or the
    /// kernel refuses and nothing is left to evict, without waiting.
    #[inline(always)]
    pub fn alloc<'a>(&'a self, page: &'a Page, how: Wait<'_>) -> Result<SfBuf<'a>> {
        // A single page's key and granule number without a branch (one
        // page is always within one granule): the per-page hit path.
        self.kva.check_page(page)?;
        let (key, index) = self.kva.page_granule(page.pfn().0);
        let hold = std::slice::from_ref(page);
        self.check_open()?;
        if let Some(b) = self.try_cached_at(key, Some(index), hold) {
            return Ok(b);
        }
        self.alloc_miss(key, hold, how)
    }

    /// Map a run of pages whose frames are contiguous into adjacent slots
    /// with one `mmap`, cached as one entry and released with one unmap:
    /// the kernel sees one VMA and does one shootdown instead of one per
    /// page. Errors as [`alloc`](Self::alloc), plus [`Error::Config`] for a
    /// broken run.
    pub fn alloc_run<'a>(&'a self, pages: &'a [Page], how: Wait<'_>) -> Result<SfBuf<'a>> {
        let (key, hold) = self.kva.run_key(pages)?;
        self.alloc_key(key, hold, how)
    }

    /// Map every page, all or nothing. It never holds some mappings while
    /// waiting for the rest (FreeBSD's sendfile deadlock): each attempt takes
    /// them without waiting, and if one is missing, gives back what it took
    /// before sleeping as `how` allows. Contiguous frames are mapped as runs
    /// of up to `max_run` pages (1: one mapping per page). A request that
    /// needs more slots than the window has (whole granules: one per
    /// granule its pages touch, and per run that crosses granules) fails
    /// at once with [`Error::WindowFull`], whatever `how` says.
    pub fn alloc_all<'a>(&'a self, pages: &'a [Page], max_run: usize, how: Wait<'_>) -> Result<Vec<SfBuf<'a>>> {
        let mut groups: Vec<&[Page]> = Vec::new();
        let max_run = max_run.max(1);
        let mut rest = pages;
        while !rest.is_empty() {
            let n = contiguous_prefix(rest, max_run);
            groups.push(&rest[..n]);
            rest = &rest[n..];
        }
        // Slots the request needs: whole granules, once per entry (pages of
        // one granule share its entry). More than the window can never be
        // served, so waiting would never end.
        let mut keys = Vec::with_capacity(groups.len());
        for g in &groups {
            keys.push(self.kva.run_key(g)?.0);
        }
        keys.sort_unstable_by_key(|k| (k.pfn, k.pages));
        keys.dedup();
        let slots_needed: usize = keys.iter().map(|k| self.kva.slots_for(k.pages)).sum();
        if slots_needed > self.capacity() {
            return Err(Error::WindowFull { requested: slots_needed, capacity: self.capacity() });
        }
        self.check_open()?;
        let attempt = || -> Result<Option<Vec<SfBuf<'a>>>> {
            let mut got = Vec::with_capacity(groups.len());
            for g in &groups {
                let (key, hold) = self.kva.run_key(g)?;
                match self.alloc_now(key, hold)? {
                    Some(b) => got.push(b),
                    None => return Ok(None), // `got` drops: all given back
                }
            }
            Ok(Some(got))
        };
        WaitQueue::wait_for(&self.waitq, how, attempt, |o| self.count_wait(o))
    }

    fn count_wait(&self, o: Outcome) {
        match o {
            Outcome::Waited => self.counters.waits.inc(),
            Outcome::NoWait => self.counters.nowait_fails.inc(),
            Outcome::TimedOut => self.counters.timeouts.inc(),
            Outcome::Cancelled => self.counters.cancels.inc(),
            Outcome::Closed => {}
        }
    }

    /// `Closed` after [`close`](Self::close): the one rule for every entry
    /// point, before it looks at the cache.
    #[inline(always)]
    fn check_open(&self) -> Result<()> {
        // Relaxed: a close that happens before this call (the caller joined
        // the closing thread, got a message from it...) is seen by read
        // coherence; one racing with the call may or may not be, as any
        // racing event. A call that passed this check and then sleeps is
        // woken by the wait queue's own flag.
        if self.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Inlined whole into the caller, so that a hit's handle is built in
    /// registers: returned through memory from a call, its fields were
    /// stored piecewise and loaded back wider, which stalled every hit on
    /// failed store forwarding (measured: most of an lwbuf hit's time).
    #[inline(always)]
    fn alloc_key<'a>(&'a self, key: MapKey, hold: Hold<'a>, how: Wait<'_>) -> Result<SfBuf<'a>> {
        self.check_open()?;
        if let Some(b) = self.try_cached(key, hold) {
            return Ok(b);
        }
        self.alloc_miss(key, hold, how)
    }

    /// `alloc_key` past the cache: map, evict or wait.
    #[inline(never)]
    fn alloc_miss<'a>(&'a self, key: MapKey, hold: Hold<'a>, how: Wait<'_>) -> Result<SfBuf<'a>> {
        let (slot, addr) = WaitQueue::wait_for(&self.waitq, how, || self.try_room(key), |o| self.count_wait(o))?;
        Ok(self.handle(key, hold, slot, addr))
    }

    /// One try at `key` that neither waits nor counts as a call's outcome:
    /// a piece of an all-or-nothing request. `Ok(None)`: no room now.
    fn alloc_now<'a>(&'a self, key: MapKey, hold: Hold<'a>) -> Result<Option<SfBuf<'a>>> {
        if let Some(b) = self.try_cached(key, hold) {
            return Ok(Some(b));
        }
        Ok(self.try_room(key)?.map(|(slot, addr)| self.handle(key, hold, slot, addr)))
    }

    /// [`try_miss`](Self::try_miss), counting the attempts that find no room.
    fn try_room(&self, key: MapKey) -> Result<Option<(u32, NonNull<u8>)>> {
        let r = self.try_miss(key);
        if let Ok(None) = r {
            self.counters.no_room.inc();
        }
        r
    }

    /// Close the pool, for good: from now on every allocation (`alloc`,
    /// `alloc_run`, `alloc_all`; hit or miss; whatever its [`Wait`]) fails
    /// at once with [`Error::Closed`], unless its arguments are wrong
    /// (`ForeignPage`, a broken run, `WindowFull` may be reported first),
    /// and every allocation sleeping now wakes and fails with it. Handles
    /// already held stay valid and release as on an open pool (their
    /// mappings stay cached up to `max_excess`); the pool unmaps everything
    /// when dropped. No system call.
    ///
    /// Hits fail too: whether a frame happens to be cached is the pool's
    /// business, not its callers', so it must not decide whether a call
    /// succeeds; and a close that let hits through would keep serving hot
    /// frames indefinitely, so a shutdown could never count on it to stop
    /// new work.
    pub fn close(&self) {
        // Relaxed: see `check_open`; the wait queue's flag (SeqCst, checked
        // under its mutex) is the one that wakes sleepers.
        self.closed.store(true, Ordering::Relaxed);
        self.waitq.close();
    }

    /// Counters, with the MMU's. Scans the entries for `used`/`cached`.
    pub fn stats(&self) -> SfStats {
        let mut used = 0;
        let mut cached = 0;
        let mut mapped = 0;
        for (slot, e) in self.entries.iter().enumerate() {
            let s = e.state.load(Ordering::Relaxed);
            if s.is_dead() || e.addr.load(Ordering::Relaxed).is_null() {
                continue;
            }
            if s.ref_count() != 0 || self.pinned(slot) != 0 {
                used += 1;
                mapped += 1;
            } else if s.is_listed() {
                cached += 1;
                mapped += 1;
            }
        }
        let (live, budget) = self.kva.live_mappings();
        SfStats {
            used,
            cached,
            mapped,
            peak: self.peak.load(Ordering::Relaxed),
            hits: self.counters.hits.get(),
            misses: self.counters.misses.get(),
            grows: self.counters.grows.get(),
            evictions: self.counters.evictions.get(),
            evicted_pages: self.counters.evicted_pages.get(),
            waits: self.counters.waits.get(),
            timeouts: self.counters.timeouts.get(),
            cancels: self.counters.cancels.get(),
            nowait_fails: self.counters.nowait_fails.get(),
            no_room: self.counters.no_room.get(),
            lost_races: self.counters.lost_races.get(),
            unmap_errors: self.counters.unmap_errors.get() + self.kva.purge_failures(),
            waiters: self.waitq.waiters() as u64,
            live_mappings: live as u64,
            map_budget: budget as u64,
            max_excess: self.max_excess() as u64,
            mmu: self.kva.mmu_stats(),
        }
    }
}

impl Drop for SfPool {
    fn drop(&mut self) {
        // Handles borrow the pool: none is alive. Unmap every entry.
        self.waitq.close();
        for e in self.entries.iter() {
            // SAFETY: `&mut self`: no other thread can touch the entries.
            if let Some(m) = e.mapping.with_mut(|p| unsafe { (*p).take() }) {
                // SAFETY: no handle exists, no lookup can run.
                if let Ok(run) = unsafe { self.kva.unmap(m) } {
                    self.kva.give(run);
                }
            }
        }
        for m in std::mem::take(&mut *lock(&self.stale)) {
            // SAFETY: as above; a stale mapping is reachable by nobody.
            if let Ok(run) = unsafe { self.kva.unmap(m) } {
                self.kva.give(run);
            }
        }
    }
}

impl fmt::Debug for SfPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SfPool")
            .field("capacity", &self.capacity())
            .field("max_excess", &self.max_excess())
            .field("mapped", &self.map.len())
            .field("mmu", self.kva.mmu())
            .finish()
    }
}
