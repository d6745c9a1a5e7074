//! The cache-backed [`MapSource`]s: the shared sf_buf pool ([`SfBufSource`])
//! and the per-CPU lwbuf caches ([`LwbufSource`]), each over a window of its
//! own. A hit makes no system call; the mapping stays cached after the send
//! for the next request of the same pages.

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use super::source::{MapSource, Mapped};
use crate::error::{Error, Result};
use crate::lwbuf::{CpuGuard, Lwbuf, Lwbufs};
use crate::mmu::{Mmu, MmuStats, Window};
use crate::phys::{contiguous_prefix, Page, PhysMem};
use crate::sfbuf::{SfBuf, SfPool, Wait};

/// Hits and lookups of a mapping cache (the sf_buf pool or the lwbuf
/// caches), as [`Sender::cache_stats`](super::Sender::cache_stats) reports
/// them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Mappings asked of the cache.
    pub lookups: u64,
    /// Of those, found mapped already: no system call.
    pub hits: u64,
    /// Pages whose cached mapping was evicted.
    pub evicted_pages: u64,
}

impl CacheStats {
    /// Hits over lookups (0 with none).
    pub fn hit_rate(&self) -> f64 {
        if self.lookups == 0 {
            0.0
        } else {
            self.hits as f64 / self.lookups as f64
        }
    }

    /// Counts of `lookups` lookups of which `hits` hit.
    pub fn new(lookups: u64, hits: u64) -> CacheStats {
        CacheStats { lookups, hits, evicted_pages: 0 }
    }

    /// Field-wise difference `self - earlier`.
    pub fn since(&self, earlier: &CacheStats) -> CacheStats {
        CacheStats {
            lookups: self.lookups.saturating_sub(earlier.lookups),
            hits: self.hits.saturating_sub(earlier.hits),
            evicted_pages: self.evicted_pages.saturating_sub(earlier.evicted_pages),
        }
    }
}

impl std::ops::Add for CacheStats {
    type Output = CacheStats;

    /// Field-wise sum (of two caches, or two periods), saturating.
    fn add(self, o: CacheStats) -> CacheStats {
        CacheStats {
            lookups: self.lookups.saturating_add(o.lookups),
            hits: self.hits.saturating_add(o.hits),
            evicted_pages: self.evicted_pages.saturating_add(o.evicted_pages),
        }
    }
}

// === CachedMapping ===

/// A handle of a mapping cache as the send engine holds it: an [`SfBuf`]
/// ([`SfMapping`]) or an [`Lwbuf`] ([`LwbufMapping`]), with the address and
/// length read from it once. Dropping it drops the handle, which releases
/// the mapping (it stays cached for the next request of its frames).
#[derive(Debug)]
#[must_use = "dropping a mapping releases it at once"]
pub struct CachedMapping<H> {
    _handle: H,
    ptr: NonNull<u8>,
    len: usize,
}

/// What [`SfBufSource`] maps: an [`SfBuf`] of the pool.
pub type SfMapping<'s> = CachedMapping<SfBuf<'s>>;

/// What [`LwbufSource`] maps: an [`Lwbuf`] of the calling thread's CPU.
pub type LwbufMapping<'s> = CachedMapping<Lwbuf<'s>>;

impl<H> CachedMapping<H> {
    /// Hold `handle`, whose mapping covers `len` bytes at `ptr` (on the
    /// CPU it was made on, for an lwbuf) for as long as the handle lives.
    fn new(handle: H, ptr: *mut u8, len: usize) -> Self {
        CachedMapping { _handle: handle, ptr: NonNull::new(ptr).expect("mapped address"), len }
    }
}

// SAFETY: the pointer is only an address, valid process-wide while
// `_handle` holds its reference (an sf_buf's address is every thread's; an
// lwbuf's is its home CPU's, on which the handle holds a reference until
// it is dropped); sending it with the handle is as safe as sending the
// handle.
unsafe impl<H: Send> Send for CachedMapping<H> {}
// SAFETY: as for `Send`; `&CachedMapping` only reads the address and
// length.
unsafe impl<H: Sync> Sync for CachedMapping<H> {}

impl<H> Mapped for CachedMapping<H> {
    fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr().cast_const()
    }
    fn len(&self) -> usize {
        self.len
    }
}

// === SfBufSource ===

/// Maps through a shared [`SfPool`]: every thread of a server uses the one
/// pool, a freed mapping stays cached for the next request of its frame.
///
/// Contiguous frames are mapped as one run of up to `max_run` pages
/// ([`SfPool::alloc_run`]: one `mmap`, one cache entry), or one page at a
/// time with `max_run == 1`. [`map`](MapSource::map) never waits: with the
/// pool full it fails with [`Error::WouldBlock`], and the send engine then
/// sends and releases what the request holds before asking again with
/// [`map_idle`](MapSource::map_idle), which may sleep (up to the source's
/// wait limit) because the request holds nothing of the pool any more. So a
/// request never holds some mappings while sleeping for others, the
/// deadlock FreeBSD's sendfile avoids by letting only its first `sf_buf`
/// sleep.
pub struct SfBufSource {
    pool: Arc<SfPool>,
    max_run: usize,
    wait: Option<Duration>,
}

impl SfBufSource {
    /// Map through `pool`: runs of up to `max_run` pages (taken into
    /// `1..=capacity`); [`map_idle`](MapSource::map_idle) sleeps at most
    /// `wait` (`None`: until room is made).
    pub fn new(pool: SfPool, max_run: usize, wait: Option<Duration>) -> SfBufSource {
        let max_run = max_run.clamp(1, pool.capacity().max(1));
        SfBufSource { pool: Arc::new(pool), max_run, wait }
    }

    /// A pool over `mmu` caching up to `max_excess` unused mappings
    /// (default: all the MMU can map).
    pub fn with_mmu(
        mmu: Arc<dyn Mmu>,
        max_excess: Option<usize>,
        max_run: usize,
        wait: Option<Duration>,
    ) -> Result<SfBufSource> {
        let cap = mmu.capacity();
        let pool = SfPool::builder(mmu).max_excess(max_excess.unwrap_or(cap)).build()?;
        Ok(Self::new(pool, max_run, wait))
    }

    /// A pool over a new read-only [`Window`] of `slots` slots of `phys`
    /// (one `mmap(PROT_NONE)`; sending only reads, and a read-only
    /// mapping costs less to evict: [`WindowBuilder::read_only`](crate::WindowBuilder::read_only)).
    pub fn window(
        phys: &PhysMem,
        slots: usize,
        max_excess: Option<usize>,
        max_run: usize,
        wait: Option<Duration>,
    ) -> Result<SfBufSource> {
        Self::with_mmu(Arc::new(Window::builder(phys).slots(slots).read_only(true).build()?), max_excess, max_run, wait)
    }

    /// The pool, for its [`stats`](SfPool::stats) and tuning, and for
    /// [`SfPool::alloc_owned`] (which takes the `Arc`): a server on an async
    /// runtime maps through the sender's pool with owned handles.
    pub fn pool(&self) -> &Arc<SfPool> {
        &self.pool
    }

    /// The longest run mapped as one mapping, in pages.
    pub fn max_run(&self) -> usize {
        self.max_run
    }

    /// Hits and lookups so far.
    pub fn cache_stats(&self) -> CacheStats {
        let s = self.pool.stats();
        CacheStats { lookups: s.hits + s.misses, hits: s.hits, evicted_pages: s.evicted_pages }
    }

    fn alloc<'s>(&'s self, run: &'s [Page], how: Wait<'_>) -> Result<SfMapping<'s>> {
        let n = mapping_len(run, self.max_run, self.pool.granule());
        let buf = match n {
            0 => return Err(Error::config("run", "no pages to map")),
            1 => self.pool.alloc(&run[0], how)?,
            n => self.pool.alloc_run(&run[..n], how)?,
        };
        let k = buf.kva();
        let (ptr, len) = (k.as_ptr(), k.len());
        Ok(CachedMapping::new(buf, ptr, len))
    }
}

/// How many pages of `run` one mapping of a cache covers on the send
/// paths: the prefix of contiguous frame numbers, at most `max_run` pages
/// (but always the first page: a `max_run` of 0 counts as 1), cut at the
/// end of the first page's granule (a mapping then hits, or makes,
/// that granule's entry, and never maps a second granule for one request's
/// piece). 0 for an empty run. Only frame numbers are compared: pages of
/// another memory are the cache's to refuse (`Error::ForeignPage`).
/// [`SfBufSource`] and [`LwbufSource`] map this much; a sender of its own
/// (over owned handles, say) should too.
///
/// ```
/// use lwbuf::sendfile::mapping_len;
/// use lwbuf::{Backing, PhysMem};
///
/// let mem = PhysMem::builder().frames(64).backing(Backing::Heap).build()?;
/// let run = mem.alloc_run(40)?; // frames 0..40
/// assert_eq!(mapping_len(&run, 16, 1), 16);
/// assert_eq!(mapping_len(&run[10..], 16, 16), 6); // frames 10..16: granule 0
/// assert_eq!(mapping_len(&run, 64, 32), 32);
/// assert_eq!(mapping_len(&[], 16, 1), 0);
/// # Ok::<(), lwbuf::Error>(())
/// ```
pub fn mapping_len(run: &[Page], max_run: usize, granule: usize) -> usize {
    let n = contiguous_prefix(run, max_run);
    match run.first() {
        Some(p) if granule > 1 => n.min(granule - p.pfn().0 % granule),
        _ => n,
    }
}

/// The chunk grid a cache with runs of `max_run` pages and a mapping
/// granule of `granule` frames asks the send engine for
/// ([`MapSource::run_grid`](super::MapSource::run_grid)): runs of `max_run`
/// with single-frame granules, none otherwise (every mapping is then keyed
/// by its granule, wherever the pages asked for start).
pub fn chunk_grid(max_run: usize, granule: usize) -> Option<usize> {
    (max_run > 1 && granule == 1).then_some(max_run)
}

impl fmt::Debug for SfBufSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SfBufSource").field("pool", &self.pool).field("max_run", &self.max_run).finish()
    }
}

impl MapSource for SfBufSource {
    type Mapping<'s> = SfMapping<'s>;

    /// A hit, or a miss with one `mmap` (plus an unmap if it evicts); never
    /// waits ([`Error::WouldBlock`] when every slot is in use).
    fn map<'s>(&'s self, run: &'s [Page]) -> Result<SfMapping<'s>> {
        self.alloc(run, Wait::NoWait)
    }

    /// As `map`, but sleeps until a release makes room (at most the
    /// source's wait limit, then [`Error::TimedOut`]).
    fn map_idle<'s>(&'s self, run: &'s [Page]) -> Result<SfMapping<'s>> {
        match self.wait {
            Some(d) => self.alloc(run, Wait::Timeout(d)),
            None => self.alloc(run, Wait::Forever),
        }
    }

    /// Runs of `max_run` pages (none for single pages: every page is its
    /// own key anyway).
    /// With a granule above one frame, none: every mapping is keyed by
    /// its granule, wherever the pages asked for start.
    fn run_grid(&self) -> Option<usize> {
        chunk_grid(self.max_run, self.pool.granule())
    }

    fn mmu_stats(&self) -> Option<MmuStats> {
        Some(self.pool.mmu().stats())
    }
    fn prefault(&self, _: super::source::private::Token) -> Option<super::source::private::Plan> {
        Some(super::source::private::Plan(self.pool.prefault_plan()))
    }
}

// === LwbufSource ===

/// Maps through per-CPU [`Lwbufs`] caches: each CPU keeps its own mappings,
/// so a hit makes no system call and takes no lock another CPU contends
/// for.
///
/// A thread must be bound to a CPU of the caches to map: a server binds
/// each worker thread for its whole life with
/// [`bind_worker`](Self::bind_worker) (and releases every mapping on the
/// thread that made it, the cheap path). [`Connection::send`] on a thread
/// that is not bound binds a free CPU for the duration of the send
/// ([`with_cpu`](Self::with_cpu)).
///
/// With `max_run == 1` every page is its own mapping ([`Lwbufs::alloc`]);
/// with more, contiguous frames are mapped as runs of up to `max_run` pages
/// ([`Lwbufs::alloc_run`]: one `mmap`, cached as one entry).
///
/// [`Connection::send`]: super::Connection::send
pub struct LwbufSource {
    sys: Arc<Lwbufs>,
    max_run: usize,
}

impl LwbufSource {
    /// Map through `sys`, runs of up to `max_run` pages (taken into
    /// `1..=` the window's slots).
    pub fn new(sys: Lwbufs, max_run: usize) -> LwbufSource {
        let max_run = max_run.clamp(1, sys.mmu().capacity().max(1));
        LwbufSource { sys: Arc::new(sys), max_run }
    }

    /// Caches for `cpus` CPUs over `mmu`, each keeping up to `max_excess`
    /// unused mappings (default: the window's share of one CPU).
    pub fn with_mmu(mmu: Arc<dyn Mmu>, cpus: usize, max_excess: Option<usize>, max_run: usize) -> Result<LwbufSource> {
        let share = (mmu.capacity() / cpus.max(1)).max(1);
        let sys = Lwbufs::builder(mmu).cpus(cpus).max_excess(max_excess.unwrap_or(share)).build()?;
        Ok(Self::new(sys, max_run))
    }

    /// Caches for `cpus` CPUs over a new read-only [`Window`] of `cpus *
    /// slots_per_cpu` slots of `phys` (one `mmap(PROT_NONE)`): every CPU
    /// can cache `slots_per_cpu` pages, because every CPU maps the pages it
    /// sends itself.
    pub fn window(
        phys: &PhysMem,
        cpus: usize,
        slots_per_cpu: usize,
        max_excess: Option<usize>,
        max_run: usize,
    ) -> Result<LwbufSource> {
        let slots = cpus
            .checked_mul(slots_per_cpu)
            .ok_or_else(|| Error::config("window_slots", format!("{cpus} x {slots_per_cpu} slots overflow")))?;
        Self::with_mmu(Arc::new(Window::builder(phys).slots(slots).read_only(true).build()?), cpus, max_excess, max_run)
    }

    /// The caches, for their [`stats`](Lwbufs::stats) and checks, and for
    /// what takes the `Arc` ([`Lwbufs::alloc_owned`],
    /// [`Lwbufs::bind_for_thread`]): a server on an async runtime binds its
    /// workers and maps through the sender's caches with owned handles.
    pub fn lwbufs(&self) -> &Arc<Lwbufs> {
        &self.sys
    }

    /// The longest run mapped as one mapping, in pages.
    pub fn max_run(&self) -> usize {
        self.max_run
    }

    /// Hits and lookups so far (takes each CPU's lock briefly).
    pub fn cache_stats(&self) -> CacheStats {
        let t = self.sys.stats().total;
        CacheStats { lookups: t.allocs, hits: t.hits, evicted_pages: t.evicted_pages }
    }

    /// Bind the calling thread to `cpu` of the caches until the guard is
    /// dropped; `pin` also pins it to core `cpu % cores` (one system call).
    /// Errors: [`Error::NoSuchCpu`], [`Error::CpuBusy`],
    /// [`Error::AlreadyBound`]; with `pin`, the kernel's refusal to pin
    /// ([`Error::Sys`]).
    pub fn bind_worker(&self, cpu: usize, pin: bool) -> Result<CpuGuard<'_>> {
        if pin {
            self.sys.bind_pinned(cpu)
        } else {
            self.sys.bind(cpu)
        }
    }

    /// Run `f` with the calling thread bound to a CPU of the caches: the one
    /// it is bound to already, or else the lowest free one (so that an
    /// unbound thread keeps finding its mappings on the same CPU), bound for
    /// the duration of `f` (no system call; the unbind drains that CPU's
    /// mailbox). [`Error::CpuBusy`] if every CPU is bound to another
    /// thread. Every mapping `f` makes must be released inside it.
    pub fn with_cpu<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        if self.sys.current_cpu().is_some() {
            return f();
        }
        for cpu in 0..self.sys.cpus() {
            match self.sys.bind(cpu) {
                Ok(guard) => {
                    let r = f();
                    drop(guard);
                    return r;
                }
                Err(Error::CpuBusy { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::CpuBusy { cpu: 0 })
    }
}

impl fmt::Debug for LwbufSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LwbufSource").field("lwbufs", &self.sys).field("max_run", &self.max_run).finish()
    }
}

impl MapSource for LwbufSource {
    type Mapping<'s> = LwbufMapping<'s>;

    /// On the calling thread's CPU: a hit (no system call), or a miss with
    /// one `mmap` (plus an unmap if it evicts). [`Error::NotBound`] on a thread without a CPU (see
    /// [`with_cpu`](Self::with_cpu)).
    fn map<'s>(&'s self, run: &'s [Page]) -> Result<LwbufMapping<'s>> {
        let n = mapping_len(run, self.max_run, self.sys.granule());
        let buf = match n {
            0 => return Err(Error::config("run", "no pages to map")),
            1 => self.sys.alloc(&run[0])?,
            n => self.sys.alloc_run(&run[..n])?,
        };
        // On the home CPU this is a field read.
        let k = buf.kva()?;
        let (ptr, len) = (k.as_ptr(), k.len());
        Ok(CachedMapping::new(buf, ptr, len))
    }

    /// Runs of `max_run` pages (none for single pages).
    /// As for the sf_buf pool: none with a granule above one frame.
    fn run_grid(&self) -> Option<usize> {
        chunk_grid(self.max_run, self.sys.granule())
    }

    fn mmu_stats(&self) -> Option<MmuStats> {
        Some(self.sys.mmu().stats())
    }
    fn prefault(&self, _: super::source::private::Token) -> Option<super::source::private::Plan> {
        Some(super::source::private::Plan(self.sys.prefault_plan()))
    }
}
