//! The shared sf_buf pool (FreeBSD/DragonFly `sf_buf`, made dynamic and
//! lock-light).
//!
//! One pool for every thread: a concurrent map `frame -> slot` and, per
//! slot, an entry with an atomic state word (reference count, flags and a
//! generation). A hit of a single page takes no lock: a per-frame hint
//! names the slot and generation that last mapped the frame, and one CAS on
//! the entry takes the reference if that generation is still live (the
//! map, under a shard read lock, is the fallback and the authority);
//! a freed sf_buf stays mapped on an inactive LRU so the next alloc of the
//! frame is a hit; the pool grows on demand up to the window and caps its
//! cached-but-unused entries at `max_excess`, tunable at run time.
//! [`SfPool::close`] ends it: from then on every allocation fails with
//! [`Error::Closed`], hit or miss, and waiters wake with it; handles
//! already held stay valid and release as before.
//!
//! # The race that matters
//!
//! A lookup that finds an entry while another thread evicts it must never
//! return an address that is, or is about to be, unmapped or remapped. The
//! argument:
//!
//! 1. A hit takes its reference (CAS `refs + 1`) *inside* the map's read
//!    lock for the key's shard, and only on an entry the map points at.
//! 2. An eviction kills an entry (CAS `refs == 0` to `DEAD`) and removes it
//!    from the map *in one step under the same shard's write lock*
//!    (`remove_if`). So a hit either bumped the count first (the kill's CAS
//!    then fails and the entry lives) or runs after the removal (it misses
//!    and maps the frame anew elsewhere). It can never bump a dead entry.
//! 3. The unmap happens after the removal, outside any lock: by then no
//!    lookup can find the entry and its count is zero, so no handle holds
//!    its address. Its slots go back to the allocator only after the unmap
//!    returns (the `SlotRun`/`Mapping` types of `kva` enforce that order).
//! 4. A new mapping is fully written (mapping, address, count 1) before it
//!    is inserted into the map under the write lock, which publishes it.
//!
//! # The lock-free hit
//!
//! 5. Every publication of an entry starts a new *generation* of its slot
//!    (the high half of the state word); a killed or free entry stays
//!    `DEAD` until its slot is published again, with the next generation.
//! 6. After a successful insert, the publisher records the hint `(slot,
//!    generation)` in the frame's bucket of the hint table (`hint.rs`):
//!    buckets in proportion to the window's slots, never to the memory's
//!    frames, two hints a bucket, each tagged with high bits of its frame
//!    number. A hint is only ever a true statement about the past:
//!    "generation g of slot s was published for a frame of this bucket and
//!    tag", for this very frame when the table is *exact* (a memory of no
//!    more frames than buckets, and always under loom). It may be stale or
//!    name a bucket-mate; it never names a generation that was not
//!    published.
//! 7. A hit through the hint CASes the state from a value that carries that
//!    generation and is not `DEAD` to one more reference. If it succeeds,
//!    generation g is still live, and the kill of (2) can no longer succeed
//!    while the reference is held. The entry's key, written before g was
//!    published (so seen after the CAS, see below), then says whether g
//!    maps this frame: if not (a bucket-mate), the reference is given back
//!    and the lookup goes to the map. If the generation moved on or the
//!    entry is dead, the CAS is not attempted and the lookup goes to the
//!    map. A mapping is `UNPUBLISHED` from its first store until its insert
//!    succeeded, and hint readers refuse that state: a mapping that loses
//!    the insert race (and is then unmapped with a plain store) cannot be
//!    reached through a hint, not even through a stale one whose generation
//!    has wrapped round to its own.
//!    Acquire on that CAS pairs with the Release store that published the
//!    generation (every later change of the word within a generation is a
//!    read-modify-write, continuing its release sequence), so the key and
//!    address read after it are the ones published.
//! 8. Generations are 32 bits; a reader would have to stall through 2^32
//!    reuses of one slot to see a wrapped one. The key check of (7) covers
//!    that too.
//!
//! The loom model `sfbuf_hit_vs_eviction` checks this with `max_excess = 0`,
//! and fails with the generation check switched off.
//!
//! # Pins: hits that write no shared line
//!
//! Even the lock-free hit writes the entry's state word, and so does its
//! release: two cores hitting the same frames pass that line back and forth.
//! A hit on a cached entry that nobody holds (listed on the LRU, count zero)
//! instead counts its reference in the calling thread's row of *pins* (one
//! count per slot per row; a row's lines are written by its threads only):
//!
//! 9. The hitter reads the state (same generation, live, listed, count zero,
//!    not `REVOKED`), sets `PINNED` if it is not set yet (a CAS: one shared
//!    write per entry until an evictor next finds it unused), adds its pin,
//!    issues the light barrier, and reads the state again; if the
//!    generation or any of `DEAD`, `UNPUBLISHED`, `REVOKED`, `PINNED`
//!    changed, it gives the pin back (a full release, see 11) and takes the
//!    ordinary path. The invariant: while a pin may be out, `PINNED` is set.
//! 10. An evictor that finds an entry with a count of zero and no `PINNED`
//!     judges it as before: no pin can be out (taking one first changes the
//!     state, which fails the evictor's CAS). With `PINNED`, it sets `REVOKED`
//!     (no new pins), issues the heavy barrier (`membarrier`: the pair of
//!     `src/cpu/owned.rs`) and sums the pins. Either it sees a hitter's pin,
//!     or that hitter's second read sees `REVOKED` and it backs off: no pin
//!     is missed, so an entry is killed only with no reference of either
//!     kind. A pinned entry is taken off the LRU as an entry in use is;
//!     `REVOKED` and `PINNED` are cleared when a look finds it unused
//!     (second chance), so a cold entry's eviction costs no `membarrier`.
//! 11. Pins are never moved into the entry's count. A last release of
//!     either kind (the count reaching zero, a pin given back) fences and
//!     reads the other kind; so does an evictor that just took an entry off
//!     the LRU. Of two such racing parties at least one sees everything at
//!     zero (store-buffering) and puts the entry back on the LRU, through a
//!     CAS that sets `ON_LRU` only on a live, unlisted, unreferenced entry:
//!     pushed once (see `SfPool::after_release` for which generation).
//! 12. A pinned release on an entry still listed, with the LRU within
//!     `max_excess`, does what a last release would (nothing to push, no
//!     trim) by writing only its pin; it still wakes waiters after its fence.
//!
//! The loom model `sfbuf_pin_vs_eviction` checks 9-12 and fails when the
//! evictor ignores pins (`PinUnchecked`); `sfbuf_two_pins_vs_eviction` races
//! two pinned last releases. One small model per race of 9-12 each fails
//! with its mutant: `sfbuf_central_and_pin_release` (11: a central and a
//! pinned last release at once; `LastReleaseNoFence`),
//! `sfbuf_pinned_reset` (9: a second-chance look clears `PINNED` between
//! a hitter's two reads; `PinRecheckNoPinned`), `sfbuf_stale_pin_reuse`
//! (11: a backed-off pin counted against the slot's next generation;
//! `UnlistNoRecount`) and `sfbuf_unpin_trims` (12: an unpin over the cap
//! trims while a hit pins; `PinRecheckNoRevoked`). `peak` counts only the
//! entries' own counts (pins are not seen at the moment they are taken).

mod counter;
mod hint;
mod lru;
mod stats;
#[cfg(all(test, not(loom)))]
mod tests;
mod wait;

pub use stats::SfStats;
pub use wait::{CancelToken, Wait};

use std::fmt;
use std::ptr::NonNull;

use counter::Striped;
use hint::{Hint, Hints};
use lru::Lru;
use wait::{Outcome, WaitQueue};

use crate::cpu::barrier;
use crate::error::{Error, Result};
use crate::kaddr::Kaddr;
use crate::kva::{Hold, KvaSpace, MapKey, Mapping, SlotRun};
use crate::mmu::Mmu;
use crate::phys::{Page, Pfn};
use crate::sync::{
    fence, lock, Arc, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, CachePadded, ConcurrentMap, Mutex, Ordering,
    UnsafeCell,
};

// === entry state ===

const REFS: u64 = (1 << 26) - 1;
/// Pins may be out (set by a hitter before its first pin): only then does
/// an evictor pay for revoking them.
const PINNED: u64 = 1 << 26;
/// No new pins (see "Pins" in the module docs): an evictor is counting them.
const REVOKED: u64 = 1 << 27;
/// Used since the clock hand last passed: one more round on the LRU.
const REFERENCED: u64 = 1 << 28;
/// On the inactive LRU (or being looked at by an evictor that popped it).
const ON_LRU: u64 = 1 << 29;
/// Killed by an evictor (out of the map, about to be unmapped), or free.
const DEAD: u64 = 1 << 30;
/// Written but not yet in the map: a miss that may still lose the insert
/// race (and then unmap it), or a revival. Hint readers refuse it.
const UNPUBLISHED: u64 = 1 << 31;
/// The slot's generation: one more at every publication (module docs, 5).
const GEN_SHIFT: u32 = 32;
const GEN: u64 = !((1 << GEN_SHIFT) - 1);

/// Rows of pin counts: threads share a row when there are more of them.
#[cfg(not(loom))]
const PIN_STRIPES: usize = 8;
/// Under loom one row (the models check the protocol, not the spreading).
#[cfg(loom)]
const PIN_STRIPES: usize = 1;

/// The calling thread's row of pins: its statistics stripe, folded (under
/// loom always 0, so that replays of an execution touch the same rows).
// Under loom `PIN_STRIPES` is 1, and the modulo is the point.
#[cfg_attr(loom, allow(clippy::modulo_one))]
fn pin_row() -> usize {
    counter::thread_stripe() % PIN_STRIPES
}

/// The state of a free slot whose last generation was that of `s`.
fn dead_of(s: u64) -> u64 {
    (s & GEN) | DEAD
}

/// The state that publishes the next generation after `s`, with `flags`.
fn next_gen(s: u64, flags: u64) -> u64 {
    (s & GEN).wrapping_add(1 << GEN_SHIFT) | flags
}

/// One per slot; meaningful at the first slot of a mapping.
struct Entry {
    state: AtomicU64,
    /// The key, written before the entry is published in the map.
    pfn: AtomicUsize,
    pages: AtomicUsize,
    addr: AtomicUsize,
    /// Written by the thread that maps the entry before it publishes it,
    /// taken by the evictor that killed it: never two at once (see the
    /// module docs).
    mapping: UnsafeCell<Option<Mapping>>,
}

// SAFETY: every field but `mapping` is atomic. `mapping` has one owner at a
// time, handed over by the state word and the map's shard lock: the thread
// that took the free slot writes it before publishing the entry (insert under
// the write lock), the evictor that killed it (DEAD and removed from the map
// in one step under the same lock) takes it, a miss that lost the insert race
// takes back its never-published one, and `Drop` has `&mut`. No two threads
// ever touch it at once (the module docs' argument).
unsafe impl Sync for Entry {}

impl Entry {
    fn new() -> Self {
        Entry {
            state: AtomicU64::new(DEAD),
            pfn: AtomicUsize::new(0),
            pages: AtomicUsize::new(0),
            addr: AtomicUsize::new(0),
            mapping: UnsafeCell::new(None),
        }
    }

    fn key(&self) -> MapKey {
        MapKey { pfn: self.pfn.load(Ordering::Relaxed), pages: self.pages.load(Ordering::Relaxed) }
    }

    /// Take a reference on a live entry (caller holds its shard's lock and
    /// found it in the map). Returns whether the entry was unused before,
    /// and the new state.
    #[inline]
    fn bump(&self) -> (bool, u64) {
        let live = |s: u64| {
            debug_assert!(s & DEAD == 0, "sf_buf: bump of a dead entry");
            true
        };
        self.bump_from(self.state.load(Ordering::Relaxed), live).expect("an entry in the map is live")
    }

    /// Take a reference if `live` accepts the state, trying the state `s`
    /// first (a guess, or a load). `None` if `live` refuses what it sees.
    #[inline(always)]
    fn bump_from(&self, mut s: u64, live: impl Fn(u64) -> bool) -> Option<(bool, u64)> {
        loop {
            if !live(s) {
                return None;
            }
            // As std's Arc: a count this high means leaked handles, and
            // carrying into the flags would corrupt the entry.
            assert!(s & REFS < REFS, "sf_buf: reference count overflow (leaked handles)");
            // Acquire: pairs with the Release of the last counted release
            // and with the one that published the generation (module docs,
            // 7). (A pinned holder's release writes only its pin row: the
            // pool orders mappings, not page contents; handing bytes from
            // one holder to the next takes the callers' own
            // synchronization, as with the direct map.)
            let new = (s + 1) | REFERENCED;
            match self.state.compare_exchange_weak(s, new, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Some((s & REFS == 0, new)),
                Err(now) => s = now,
            }
        }
    }
}

/// What the evictor decided about an LRU entry.
enum Verdict {
    Evict,
    SecondChance,
    InUse,
    /// Taken off the LRU as in use, then found unused: back on it.
    Relist,
}

// === the pool ===

/// Builds an [`SfPool`]. See [`SfPool::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until it is built"]
pub struct SfPoolBuilder {
    mmu: std::sync::Arc<dyn Mmu>,
    max_excess: Option<usize>,
    map_budget: Option<usize>,
    shards: usize,
}

impl SfPoolBuilder {
    /// Cached unused sf_bufs kept at most. Default: a quarter of the window.
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
    pub fn build(self) -> Result<SfPool> {
        if self.shards == 0 || self.shards > 1 << 16 {
            return Err(Error::config("shards", format!("{} is not in 1..=65536", self.shards)));
        }
        let kva = KvaSpace::new(self.mmu, self.map_budget)?;
        let cap = kva.capacity();
        // Slot numbers are u32 (map values, pins, handles), and a hint
        // holds `slot + 1` in 32 bits.
        if cap >= u32::MAX as usize {
            return Err(Error::config("slots", format!("{cap} slots: a pool takes fewer than {}", u32::MAX)));
        }
        barrier::init();
        Ok(SfPool {
            map: ConcurrentMap::new(self.shards),
            hint: Hints::new(cap, kva.phys().frames()),
            pins: (0..PIN_STRIPES * cap).map(|_| AtomicU32::new(0)).collect(),
            entries: (0..cap).map(|_| CachePadded::new(Entry::new())).collect(),
            lru: Mutex::new(Lru::default()),
            lru_len: AtomicUsize::new(0),
            stale: Mutex::new(Vec::new()),
            max_excess: AtomicUsize::new(self.max_excess.unwrap_or((cap / 4).max(1))),
            waitq: WaitQueue::new(),
            closed: AtomicBool::new(false),
            peak: AtomicU64::new(0),
            c: Counters::default(),
            kva,
        })
    }
}

#[derive(Debug, Default)]
struct Counters {
    hits: Striped,
    misses: Striped,
    used: Striped,
    grows: Striped,
    evictions: Striped,
    waits: Striped,
    timeouts: Striped,
    cancels: Striped,
    nowait_fails: Striped,
    no_room: Striped,
    lost_races: Striped,
    unmap_errors: Striped,
}

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
    kva: KvaSpace,
    map: ConcurrentMap<MapKey, u32>,
    /// Per frame, `(slot, generation)` of the single-page mapping last
    /// published for it (module docs, 6): two hints per bucket, buckets in
    /// proportion to the window's slots (`hint.rs`). Stale hints, and
    /// hints of another frame of the bucket, are harmless.
    hint: Hints,
    /// `PIN_STRIPES` rows of one count per slot: the references taken by
    /// pinned hits (module docs, 9-12), each row written by its threads.
    pins: Box<[AtomicU32]>,
    entries: Box<[CachePadded<Entry>]>,
    lru: Mutex<Lru>,
    /// Mirror of the LRU's length, for the lock-free check on release.
    lru_len: AtomicUsize,
    /// Mappings whose unmap failed and that no entry can keep (a lost
    /// race's duplicate, or an evicted entry whose key was mapped again
    /// meanwhile): out of every lookup, their slots never reused, and
    /// unmapped again at the next trim.
    stale: Mutex<Vec<Mapping>>,
    max_excess: AtomicUsize,
    waitq: Arc<WaitQueue>,
    /// Set by `close`: every allocation from then on fails. Read by every
    /// call, hit or miss; here rather than behind the wait queue's pointer,
    /// so a hit makes no extra dependent load.
    closed: AtomicBool,
    peak: AtomicU64,
    c: Counters,
}

/// A mapping from the pool; dropping it releases it (it stays cached).
/// `Send` and `Sync`: the address is valid in every thread.
///
/// It borrows the pool and its pages, and a view of its bytes borrows it,
/// so none of them can outlive the mapping. These do not compile:
///
/// ```compile_fail,E0597
/// # use std::sync::Arc;
/// # use lwbuf::{Backing, ModelMmu, PhysMem, SfPool, Wait};
/// # let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
/// let pool = SfPool::builder(Arc::new(ModelMmu::new(&mem, 4)?)).build()?;
/// let buf = {
///     let page = mem.alloc_page()?;
///     pool.alloc(&page, Wait::NoWait)? // the page is dropped while mapped
/// };
/// drop(buf);
/// # Ok::<(), lwbuf::Error>(())
/// ```
///
/// ```compile_fail,E0597
/// # use std::sync::Arc;
/// # use lwbuf::{Backing, ModelMmu, PhysMem, SfPool, Wait};
/// # let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
/// let page = mem.alloc_page()?;
/// let buf = {
///     let pool = SfPool::builder(Arc::new(ModelMmu::new(&mem, 4)?)).build()?;
///     pool.alloc(&page, Wait::NoWait)? // the pool is dropped under the handle
/// };
/// drop(buf);
/// # Ok::<(), lwbuf::Error>(())
/// ```
///
/// ```compile_fail,E0597
/// # use std::sync::Arc;
/// # use lwbuf::{Backing, ModelMmu, PhysMem, SfPool, Wait};
/// # let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
/// # let pool = SfPool::builder(Arc::new(ModelMmu::new(&mem, 4)?)).build()?;
/// let page = mem.alloc_page()?;
/// let bytes = {
///     let buf = pool.alloc(&page, Wait::NoWait)?;
///     buf.kva() // the view outlives the handle
/// };
/// bytes.fill(0);
/// # Ok::<(), lwbuf::Error>(())
/// ```
#[must_use = "dropping an SfBuf releases its mapping at once"]
pub struct SfBuf<'a> {
    pool: &'a SfPool,
    hold: Hold<'a>,
    slot: u32,
    addr: NonNull<u8>,
    /// The pin count this handle holds its reference in, or `NO_PIN` for
    /// the entry's own count.
    pin: u32,
}

const NO_PIN: u32 = u32::MAX;

// SAFETY: the address is valid process-wide while the handle holds its
// reference; the pool is Sync.
unsafe impl Send for SfBuf<'_> {}
// SAFETY: `&SfBuf` only reads immutable fields.
unsafe impl Sync for SfBuf<'_> {}

impl SfPool {
    /// A builder over `mmu` (the real [`crate::Window`] or
    /// [`crate::ModelMmu`]).
    pub fn builder(mmu: std::sync::Arc<dyn Mmu>) -> SfPoolBuilder {
        SfPoolBuilder { mmu, max_excess: None, map_budget: None, shards: 256 }
    }

    /// The MMU below the pool.
    pub fn mmu(&self) -> &std::sync::Arc<dyn Mmu> {
        self.kva.mmu()
    }

    /// Slots in the window: the most sf_bufs that can be mapped at once.
    pub fn capacity(&self) -> usize {
        self.kva.capacity()
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

    /// Map `page`. A hit (the frame is cached) makes no system call; a miss
    /// makes one `mmap`, plus an unmap when it evicts. When every slot is
    /// mapped and in use, `how` decides (see [`Wait`]).
    ///
    /// Errors: [`Error::ForeignPage`], [`Error::WouldBlock`],
    /// [`Error::TimedOut`], [`Error::Cancelled`], [`Error::Closed`] (after
    /// [`close`](Self::close), hit or miss),
    /// [`Error::MapLimit`] / [`Error::Sys`] when the mapping budget or the
    /// kernel refuses and nothing is left to evict, without waiting.
    pub fn alloc<'a>(&'a self, page: &'a Page, how: Wait<'_>) -> Result<SfBuf<'a>> {
        let (key, hold) = self.kva.page_key(page)?;
        self.alloc_key(key, hold, how)
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
    /// of up to `max_run` pages (1: one mapping per page).
    pub fn alloc_all<'a>(&'a self, pages: &'a [Page], max_run: usize, how: Wait<'_>) -> Result<Vec<SfBuf<'a>>> {
        let mut groups: Vec<&[Page]> = Vec::new();
        let max_run = max_run.max(1);
        let mut rest = pages;
        while !rest.is_empty() {
            let mut n = 1;
            while n < rest.len() && n < max_run && rest[n].pfn().0 == rest[0].pfn().0 + n {
                n += 1;
            }
            groups.push(&rest[..n]);
            rest = &rest[n..];
        }
        let slots_needed: usize = groups.iter().map(|g| g.len()).sum();
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
            Outcome::Waited => self.c.waits.inc(),
            Outcome::NoWait => self.c.nowait_fails.inc(),
            Outcome::TimedOut => self.c.timeouts.inc(),
            Outcome::Cancelled => self.c.cancels.inc(),
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

    #[inline]
    fn alloc_key<'a>(&'a self, key: MapKey, hold: Hold<'a>, how: Wait<'_>) -> Result<SfBuf<'a>> {
        self.check_open()?;
        if let Some(b) = self.try_cached(key, hold) {
            return Ok(b);
        }
        let (slot, addr) = WaitQueue::wait_for(&self.waitq, how, || self.try_room(key), |o| self.count_wait(o))?;
        Ok(self.handle(hold, slot, addr))
    }

    /// One try at `key` that neither waits nor counts as a call's outcome:
    /// a piece of an all-or-nothing request. `Ok(None)`: no room now.
    fn alloc_now<'a>(&'a self, key: MapKey, hold: Hold<'a>) -> Result<Option<SfBuf<'a>>> {
        if let Some(b) = self.try_cached(key, hold) {
            return Ok(Some(b));
        }
        Ok(self.try_room(key)?.map(|(slot, addr)| self.handle(hold, slot, addr)))
    }

    /// A hit, if `key` is cached: pinned, else through the hint, else
    /// through the map.
    #[inline]
    fn try_cached<'a>(&'a self, key: MapKey, hold: Hold<'a>) -> Option<SfBuf<'a>> {
        if let Some(b) = self.try_pin(key, hold) {
            return Some(b);
        }
        let (slot, addr) = self.try_hint(key).or_else(|| self.try_hit(key))?;
        self.c.hits.inc();
        Some(self.handle(hold, slot, addr))
    }

    /// [`try_miss`](Self::try_miss), counting the attempts that find no room.
    fn try_room(&self, key: MapKey) -> Result<Option<(u32, NonNull<u8>)>> {
        let r = self.try_miss(key);
        if let Ok(None) = r {
            self.c.no_room.inc();
        }
        r
    }

    fn handle<'a>(&'a self, hold: Hold<'a>, slot: u32, addr: NonNull<u8>) -> SfBuf<'a> {
        SfBuf { pool: self, hold, slot, addr, pin: NO_PIN }
    }

    /// The pinned hit (module docs, 9): on a cached entry nobody
    /// holds, count the reference in this thread's row of pins, writing
    /// no line another core writes.
    #[inline]
    fn try_pin<'a>(&'a self, key: MapKey, hold: Hold<'a>) -> Option<SfBuf<'a>> {
        if key.pages != 1 {
            return None;
        }
        let Hint { slot, gen } = self.hint.get(key.pfn)?;
        let e = &self.entries[slot as usize];
        // Acquire: pairs with the Release store that published this
        // generation (module docs, 7): the key and address read below are
        // its own.
        let mut s = e.state.load(Ordering::Acquire);
        if s & GEN != gen || s & (REFS | DEAD | UNPUBLISHED | REVOKED) != 0 || s & ON_LRU == 0 {
            return None;
        }
        // A bucket-mate's entry (module docs, 6): pass it by before writing
        // to it. Only a filter: the check after the pin decides.
        #[cfg(not(loom))]
        if e.key() != key {
            return None;
        }
        if s & PINNED == 0 {
            // The first pin since the entry was last found unused: say so,
            // once (an evictor that sees no PINNED kills with a plain CAS,
            // which this CAS then loses, or wins against).
            e.state.compare_exchange(s, s | PINNED, Ordering::Acquire, Ordering::Relaxed).ok()?;
            s |= PINNED;
        }
        let pin = pin_row() * self.entries.len() + slot as usize;
        let old = self.pins[pin].fetch_add(1, Ordering::Relaxed);
        // As for the entry's own count: a count this high means leaked
        // handles, and a wrap to zero would let an evictor kill under them.
        assert!(old < u32::MAX / 2, "sf_buf: pin count overflow (leaked handles)");
        // Against the evictor's REVOKED store + heavy barrier + read of the
        // pins: either it sees our pin, or we see REVOKED below.
        barrier::light();
        let now = e.state.load(Ordering::Relaxed);
        // PINNED too: a look that found the entry unused (its sum missed
        // our pin, so we must back off) may have cleared REVOKED again, but
        // then it cleared PINNED with it. While PINNED is set, every look
        // sums the pins, so a pin is safe under any PINNED, even one a
        // later hitter set again.
        let mut same = GEN | DEAD | UNPUBLISHED | REVOKED | PINNED;
        if crate::sync::mutant!(PinRecheckNoPinned) {
            same &= !PINNED;
        }
        if crate::sync::mutant!(PinRecheckNoRevoked) {
            same &= !REVOKED;
        }
        if now & same != s & same {
            // A full release, not just the decrement: an evictor may have
            // counted this pin and taken the entry off the LRU meanwhile.
            self.unpin(slot, pin as u32);
            return None;
        }
        // Another frame of the hint's bucket, or a wrapped generation
        // (module docs, 7-8), as in `try_hint`.
        #[cfg(not(loom))]
        if e.key() != key {
            self.unpin(slot, pin as u32);
            return None;
        }
        if now & REFERENCED == 0 {
            // Once per trip of the clock hand: a second chance for a frame
            // used through pins.
            e.state.fetch_or(REFERENCED, Ordering::Relaxed);
        }
        self.c.hits.inc();
        Some(SfBuf { pool: self, hold, slot, addr: self.addr_of(e), pin: pin as u32 })
    }

    /// Give back a pinned reference. On an entry still on the LRU, with the
    /// LRU within its cap, that is all a last release would do (it would
    /// push nothing and trim nothing), so nothing shared is written.
    fn unpin(&self, slot: u32, pin: u32) {
        // Release: the evictor's Acquire read of the pins sees every access
        // this holder made through the address before it unmaps.
        self.pins[pin as usize].fetch_sub(1, Ordering::Release);
        // SeqCst: against an evictor that takes the entry off the LRU and
        // then reads the pins (`after_unlisting`): either it sees this
        // decrement, or we see `ON_LRU` cleared below and list it again.
        // It is also the fence of the wake-up argument (`wait`).
        fence(Ordering::SeqCst);
        let s = self.entries[slot as usize].state.load(Ordering::Relaxed);
        if s & ON_LRU == 0 || self.lru_len.load(Ordering::Relaxed) > self.max_excess() {
            self.after_release(slot as usize, s);
        } else {
            // A waiter may be waiting for this entry to become evictable.
            self.waitq.wake_fenced();
        }
    }

    /// The pinned references on `slot`, with Acquire (see `unpin`).
    fn pinned(&self, slot: usize) -> u32 {
        let n = self.entries.len();
        (0..PIN_STRIPES).fold(0u32, |a, r| a.wrapping_add(self.pins[r * n + slot].load(Ordering::Acquire)))
    }

    /// The lock-free hit (module docs, 5-8): take a reference on the
    /// generation the frame's hint names, if it is still live.
    #[inline]
    fn try_hint(&self, key: MapKey) -> Option<(u32, NonNull<u8>)> {
        if key.pages != 1 {
            return None;
        }
        let Hint { slot, gen } = self.hint.get(key.pfn)?;
        let e = &self.entries[slot as usize];
        let unchecked = crate::sync::mutant!(HintUnchecked);
        // The first CAS guesses the usual state of a cached entry instead of
        // loading it: a load followed by a CAS costs two coherence misses
        // when the line was last written by another core (a shared copy,
        // then the upgrade), one CAS costs one. A wrong guess fails and
        // returns the real state.
        let guess = gen | ON_LRU | REFERENCED;
        let live = |s: u64| (unchecked || s & GEN == gen) && s & (DEAD | UNPUBLISHED) == 0;
        let (was_unused, _) = e.bump_from(guess, live)?;
        if was_unused {
            self.c.used.inc();
        }
        // The generation is live, but it may map another frame of the
        // hint's bucket (module docs, 7), or have wrapped (8). Under loom
        // the table is exact and no generation wraps, so the models skip
        // the check (two atomic loads, each a scheduling point).
        #[cfg(not(loom))]
        if e.key() != key {
            self.release(slot);
            return None;
        }
        Some((slot, self.addr_of(e)))
    }

    /// Record that generation `state` of `slot` maps `key` (single pages
    /// only). A bucket-mate's hint is kept if it still names a live
    /// generation (see `Hints::set`).
    fn set_hint(&self, key: MapKey, slot: u32, state: u64) {
        if key.pages != 1 {
            return;
        }
        self.hint.set(key.pfn, slot, state & GEN, |h| {
            let s = self.entries[h.slot as usize].state.load(Ordering::Relaxed);
            s & GEN == h.gen && s & DEAD == 0
        });
    }

    /// Look `key` up and take a reference, under the shard's read lock;
    /// refresh the frame's hint.
    fn try_hit(&self, key: MapKey) -> Option<(u32, NonNull<u8>)> {
        let (slot, state) = self.map.get_with(&key, |&slot| {
            let e = &self.entries[slot as usize];
            let (was_unused, state) = e.bump();
            if was_unused {
                self.c.used.inc();
            }
            (slot, state)
        })?;
        self.set_hint(key, slot, state);
        Some((slot, self.addr_of(&self.entries[slot as usize])))
    }

    fn addr_of(&self, e: &Entry) -> NonNull<u8> {
        NonNull::new(e.addr.load(Ordering::Relaxed) as *mut u8).expect("published entry has an address")
    }

    /// One attempt at a miss: `Ok(None)` when there is no room now (the
    /// caller may wait), `Err` for a failure that waiting will not cure.
    fn try_miss(&self, key: MapKey) -> Result<Option<(u32, NonNull<u8>)>> {
        // Someone may have mapped it since we looked.
        if let Some(v) = self.try_hit(key) {
            self.c.hits.inc();
            return Ok(Some(v));
        }
        let Some(run) = self.take_slots(key.pages)? else { return Ok(None) };
        let m = match self.kva.map(run, Pfn(key.pfn)) {
            Ok(m) => m,
            Err((e, run)) => {
                self.give_slots(run);
                if Mapping::no_room(&e) {
                    // Budget or kernel wall: evict a cached mapping and let
                    // the caller retry; with none left, report it.
                    if let Some(run) = self.evict_one()? {
                        self.give_slots(run);
                        return self.try_miss(key);
                    }
                    return Err(e);
                }
                return Err(e);
            }
        };
        let slot = m.slot().0 as u32;
        let e = &self.entries[slot as usize];
        let addr = m.addr();
        e.pfn.store(key.pfn, Ordering::Relaxed);
        e.pages.store(key.pages, Ordering::Relaxed);
        e.addr.store(addr.as_ptr() as usize, Ordering::Relaxed);
        // SAFETY: the slot was free (ours from `take_slots`), so no other
        // thread can reach this entry until we publish it below.
        e.mapping.with_mut(|p| unsafe { *p = Some(m) });
        // Release: a hint reader's Acquire CAS on this generation sees the
        // fields above (module docs, 7). For map readers, the insert's write
        // lock releases them.
        let live = next_gen(e.state.load(Ordering::Relaxed), 1 | REFERENCED | UNPUBLISHED);
        e.state.store(live, Ordering::Release);
        match self.map.insert_or_with(key, slot, |&other| {
            if self.entries[other as usize].bump().0 {
                self.c.used.inc();
            }
            other
        }) {
            None => {
                // In the map: hint readers may take it from now on. Release
                // (a read-modify-write, so map readers' bumps since the
                // insert are kept): as the store above, for hint readers.
                e.state.fetch_and(!UNPUBLISHED, Ordering::Release);
                self.set_hint(key, slot, live);
                self.c.misses.inc();
                self.c.grows.inc();
                self.c.used.inc();
                // The stripes are read one by one while other threads move
                // them, so the sum can be off by the operations in flight,
                // below zero included (it wraps): never record that.
                let used = self.c.used.get();
                if used <= self.entries.len() as u64 {
                    self.peak.fetch_max(used, Ordering::Relaxed);
                }
                Ok(Some((slot, addr)))
            }
            Some(other) => {
                // Lost the race to map this frame: use theirs, undo ours.
                self.c.lost_races.inc();
                self.c.hits.inc();
                e.state.store(dead_of(live), Ordering::Relaxed);
                // SAFETY: never published, so ours alone.
                let m = e.mapping.with_mut(|p| unsafe { (*p).take() }).expect("just stored");
                self.unmap_and_free(m);
                Ok(Some((other, self.addr_of(&self.entries[other as usize]))))
            }
        }
    }

    /// `n` adjacent free slots: free ones, or by evicting cached entries.
    /// `Ok(None)`: nothing left to evict; `Err`: an unmap failed.
    fn take_slots(&self, n: usize) -> Result<Option<SlotRun>> {
        loop {
            if let Some(run) = self.kva.take(n) {
                return Ok(Some(run));
            }
            let Some(freed) = self.evict_one()? else { return Ok(None) };
            if freed.len == n {
                return Ok(Some(freed));
            }
            self.give_slots(freed);
        }
    }

    fn give_slots(&self, run: SlotRun) {
        self.kva.give(run);
        self.waitq.wake();
    }

    fn unmap_and_free(&self, m: Mapping) {
        // SAFETY: callers pass a mapping no handle or lookup can reach.
        match unsafe { self.kva.unmap(m) } {
            Ok(run) => self.give_slots(run),
            Err((_, m)) => {
                // Keep the slots out of circulation rather than reuse a slot
                // that is still mapped; the next trim tries again.
                self.c.unmap_errors.inc();
                lock(&self.stale).push(m);
            }
        }
    }

    /// Evict one cached unused entry (clock order: entries used since the
    /// last pass get a second chance). Returns its slots, unmapped;
    /// `Ok(None)` if no entry is unused; `Err` if the MMU refused the unmap
    /// (the entry then stays cached, and the failure is counted).
    fn evict_one(&self) -> Result<Option<SlotRun>> {
        let mut budget = 2 * self.lru_len.load(Ordering::Relaxed) + 2;
        while budget > 0 {
            budget -= 1;
            let slot = {
                let mut l = lock(&self.lru);
                let s = l.pop_front();
                self.lru_len.store(l.len(), Ordering::Relaxed);
                match s {
                    Some(s) => s,
                    None => return Ok(None),
                }
            };
            let e = &self.entries[slot];
            let key = e.key();
            let mut verdict = Verdict::InUse;
            let removed = self.map.remove_if(&key, |&s| {
                debug_assert_eq!(s as usize, slot, "map and entry disagree");
                verdict = self.judge(slot, e);
                matches!(verdict, Verdict::Evict)
            });
            match verdict {
                Verdict::Evict => {
                    debug_assert!(removed);
                    // SAFETY: the entry is dead and out of the map (one step
                    // under the shard lock), so nobody else can reach it.
                    let m = e.mapping.with_mut(|p| unsafe { (*p).take() }).expect("live entry has a mapping");
                    // SAFETY: no handle holds it (count was 0) and no lookup
                    // can find it (removed): see the module docs.
                    match unsafe { self.kva.unmap(m) } {
                        Ok(run) => {
                            // The state stays DEAD (with the generation that
                            // died) until the slot is published again.
                            self.c.evictions.inc();
                            return Ok(Some(run));
                        }
                        Err((err, m)) => {
                            self.c.unmap_errors.inc();
                            // Still mapped: bring it back as a cached entry,
                            // published as a new one is (state, then insert).
                            // SAFETY: dead and unreachable, ours alone.
                            e.mapping.with_mut(|p| unsafe { *p = Some(m) });
                            // A new generation: hints of the old one stay
                            // stale (the map finds it again).
                            let back = next_gen(e.state.load(Ordering::Relaxed), ON_LRU | UNPUBLISHED);
                            e.state.store(back, Ordering::Release);
                            if self.map.insert_or_with(key, slot as u32, |_| ()).is_none() {
                                e.state.fetch_and(!UNPUBLISHED, Ordering::Release);
                                self.push_lru(slot);
                            } else {
                                // A miss mapped the frame again meanwhile: this
                                // entry must not shadow it (on the LRU it would
                                // be judged under the other entry's key).
                                e.state.store(dead_of(back), Ordering::Relaxed);
                                // SAFETY: never republished, still ours alone.
                                let m = e.mapping.with_mut(|p| unsafe { (*p).take() }).expect("just stored");
                                lock(&self.stale).push(m);
                            }
                            return Err(err);
                        }
                    }
                }
                Verdict::SecondChance | Verdict::Relist => self.push_lru(slot),
                Verdict::InUse => {}
            }
        }
        Ok(None)
    }

    /// Decide an LRU entry's fate under its shard's write lock. An entry
    /// nobody holds through its own count may still be held through pins:
    /// stop new pins (REVOKED), make every thread's pin visible (heavy
    /// barrier, against the light one in `try_pin`), and count them.
    fn judge(&self, slot: usize, e: &Entry) -> Verdict {
        let mut s = e.state.load(Ordering::Relaxed);
        loop {
            let (new, verdict) = if crate::sync::mutant!(EvictNoRecheck) {
                (dead_of(s), Verdict::Evict)
            } else if s & REFS != 0 {
                // In use: off the LRU; its last release puts it back.
                (s & !(ON_LRU | REFERENCED), Verdict::InUse)
            } else if s & PINNED == 0 {
                // No pin was taken since the entry was last found unused,
                // and none can be without changing the state: no barrier.
                if s & REFERENCED != 0 {
                    (s & !(REFERENCED | REVOKED), Verdict::SecondChance)
                } else {
                    (dead_of(s), Verdict::Evict)
                }
            } else {
                if s & REVOKED == 0 {
                    match e.state.compare_exchange(s, s | REVOKED, Ordering::AcqRel, Ordering::Relaxed) {
                        Ok(_) => s |= REVOKED,
                        Err(now) => {
                            s = now;
                            continue;
                        }
                    }
                    barrier::heavy();
                }
                if !crate::sync::mutant!(PinUnchecked) && self.pinned(slot) != 0 {
                    // Held through pins: off the LRU as an entry in use is
                    // (REVOKED stays until a look finds it unused); the last
                    // pinned release puts it back.
                    match e.state.compare_exchange(s, s & !(ON_LRU | REFERENCED), Ordering::AcqRel, Ordering::Relaxed) {
                        Ok(_) => return self.after_unlisting(slot, e),
                        Err(now) => {
                            s = now;
                            continue;
                        }
                    }
                }
                if s & REFERENCED != 0 {
                    // Unused, and pins may be taken again.
                    (s & !(REFERENCED | REVOKED | PINNED), Verdict::SecondChance)
                } else {
                    (dead_of(s), Verdict::Evict)
                }
            };
            // AcqRel: the kill acquires what the last holder released; the
            // flag changes release to the next release's fetch_sub.
            match e.state.compare_exchange(s, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return verdict,
                Err(now) => s = now,
            }
        }
    }

    /// The evictor's half of the race with a last pinned release (see
    /// `after_release`): having taken the entry off the LRU, fence, and if
    /// the pins are gone meanwhile, put it back (unless that release did).
    fn after_unlisting(&self, slot: usize, e: &Entry) -> Verdict {
        fence(Ordering::SeqCst);
        if crate::sync::mutant!(UnlistNoRecount) || self.pinned(slot) != 0 {
            return Verdict::InUse;
        }
        let mut s = e.state.load(Ordering::Relaxed);
        while s & (REFS | DEAD | ON_LRU) == 0 {
            match e.state.compare_exchange_weak(s, s | ON_LRU, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Verdict::Relist,
                Err(now) => s = now,
            }
        }
        Verdict::InUse
    }

    fn push_lru(&self, slot: usize) {
        let mut l = lock(&self.lru);
        l.push_back(slot);
        self.lru_len.store(l.len(), Ordering::Relaxed);
    }

    /// Evict until the LRU (an upper bound on unused entries) is within
    /// `max_excess`.
    fn trim(&self) {
        self.retry_stale();
        while self.lru_len.load(Ordering::Relaxed) > self.max_excess() {
            match self.evict_one() {
                Ok(Some(run)) => self.give_slots(run),
                Ok(None) => {
                    // Only in-use entries were left to look at: re-check the
                    // length and stop if nothing moved.
                    if self.lru_len.load(Ordering::Relaxed) > self.max_excess() && self.evictable() == 0 {
                        break;
                    }
                }
                // The MMU refused an unmap (counted; the entry stays cached):
                // retrying now would spin if it keeps refusing. The next
                // trim tries again.
                Err(_) => break,
            }
        }
    }

    /// Try again to unmap the mappings whose unmap failed before.
    fn retry_stale(&self) {
        let stale = {
            let mut g = lock(&self.stale);
            if g.is_empty() {
                return;
            }
            std::mem::take(&mut *g)
        };
        for m in stale {
            // SAFETY: stale mappings are out of the map and held by no
            // handle: nothing can reach them.
            match unsafe { self.kva.unmap(m) } {
                Ok(run) => self.give_slots(run),
                Err((_, m)) => {
                    self.c.unmap_errors.inc();
                    lock(&self.stale).push(m);
                }
            }
        }
    }

    /// Unused entries on the LRU now (a scan: for `trim`'s rare exit path
    /// and the stats).
    fn evictable(&self) -> usize {
        self.entries
            .iter()
            .enumerate()
            .filter(|(slot, e)| {
                e.state.load(Ordering::Relaxed) & (REFS | ON_LRU | DEAD) == ON_LRU && self.pinned(*slot) == 0
            })
            .count()
    }

    fn release(&self, slot: u32) {
        let e = &self.entries[slot as usize];
        let mut s = e.state.load(Ordering::Relaxed);
        let now = loop {
            debug_assert!(s & REFS != 0 && s & DEAD == 0, "sf_buf: release of unreferenced entry");
            // AcqRel: Release orders this holder's accesses before the
            // evictor's kill (which acquires the state); Acquire orders it
            // after an evictor's flag change (the wake-up argument in
            // `wait`).
            match e.state.compare_exchange_weak(s, s - 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break s - 1,
                Err(now) => s = now,
            }
        };
        if now & REFS != 0 {
            return;
        }
        self.c.used.sub(1);
        self.after_release(slot as usize, now);
    }

    /// After a release that may have been the entry's last (its own count
    /// at zero, or a pin given back): if no reference of either kind is
    /// left, put the entry on the LRU unless it is there, then trim and
    /// wake as a last release does.
    ///
    /// Both kinds of release run this after their decrement and a SeqCst
    /// fence, then read the other kind: of two last releases racing (one of
    /// each, or two pins), at least one sees both counts at zero
    /// (store-buffering). Both may: the LRU is claimed by a CAS that sets
    /// `ON_LRU` only on a live, unlisted, unreferenced entry of the
    /// generation `seen`, so it is pushed once. From `release`, `seen` is
    /// what its own decrement left, so a kill or reuse since fails the CAS.
    /// From `unpin`, `seen` is read after the pin went, i.e. the current
    /// generation, on purpose: a hitter that backed off from an old
    /// generation leaves a pin for a moment, a look at the reused slot may
    /// count it and unlist the new entry, and then that late unpin is the
    /// release that must list it again.
    fn after_release(&self, slot: usize, seen: u64) {
        let e = &self.entries[slot];
        if !crate::sync::mutant!(LastReleaseNoFence) {
            fence(Ordering::SeqCst);
        }
        if self.pinned(slot) != 0 {
            return;
        }
        let mut s = e.state.load(Ordering::Relaxed);
        while s & GEN == seen & GEN && s & (REFS | DEAD | ON_LRU) == 0 {
            match e.state.compare_exchange_weak(s, s | ON_LRU, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    self.push_lru(slot);
                    // SeqCst: the cap is read below; see `set_max_excess`.
                    fence(Ordering::SeqCst);
                    break;
                }
                Err(now) => s = now,
            }
        }
        if self.lru_len.load(Ordering::Relaxed) > self.max_excess() {
            self.trim();
        }
        self.waitq.wake();
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
            if s & DEAD != 0 || e.addr.load(Ordering::Relaxed) == 0 {
                continue;
            }
            if s & REFS != 0 || self.pinned(slot) != 0 {
                used += 1;
                mapped += 1;
            } else if s & ON_LRU != 0 {
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
            hits: self.c.hits.get(),
            misses: self.c.misses.get(),
            grows: self.c.grows.get(),
            evictions: self.c.evictions.get(),
            waits: self.c.waits.get(),
            timeouts: self.c.timeouts.get(),
            cancels: self.c.cancels.get(),
            nowait_fails: self.c.nowait_fails.get(),
            no_room: self.c.no_room.get(),
            lost_races: self.c.lost_races.get(),
            unmap_errors: self.c.unmap_errors.get(),
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

// === impl SfBuf ===

impl<'a> SfBuf<'a> {
    /// The mapped bytes (the frame, or the whole run). No system call. The
    /// view borrows the handle, so it cannot outlive the mapping.
    pub fn kva(&self) -> Kaddr<'_> {
        let len = self.hold.len() * self.pool.kva.slot_size();
        // SAFETY: the handle holds a reference on the entry, which keeps the
        // mapping of `len` bytes until the handle is dropped.
        unsafe { Kaddr::new(self.addr, len) }
    }

    /// The first (or only) page.
    pub fn page(&self) -> &'a Page {
        &self.hold[0]
    }

    /// Every page mapped.
    pub fn pages(&self) -> &'a [Page] {
        self.hold
    }

    /// The window slot of the mapping's first page.
    pub fn slot(&self) -> crate::Slot {
        crate::Slot(self.slot as usize)
    }
}

impl Drop for SfBuf<'_> {
    fn drop(&mut self) {
        if self.pin == NO_PIN {
            self.pool.release(self.slot);
        } else {
            self.pool.unpin(self.slot, self.pin);
        }
    }
}

impl fmt::Debug for SfBuf<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SfBuf")
            .field("pfn", &self.page().pfn().0)
            .field("pages", &self.hold.len())
            .field("slot", &self.slot)
            .finish()
    }
}
