//! Per-CPU lwbuf caches (DragonFly BSD's `lwbuf`).
//!
//! Each CPU keeps `frame -> {slot, refcnt}`. [`Lwbufs::alloc`] on CPU c finds
//! or creates c's entry and returns an [`Lwbuf`] whose cpumask is `{c}`;
//! asking for the address on a CPU d outside the mask makes (or bumps) d's
//! entry and adds d; dropping the handle decrefs the current CPU's entry
//! locally and posts one decref message to every other CPU in the mask,
//! which applies it at its next `alloc` or `poll` (a passive IPI; a release
//! at home of a handle used nowhere else touches its entry alone). Entries whose
//! count reaches zero stay mapped on an LRU for reuse, up to the per-CPU
//! *excess* limit. The owner's cache and its clock are in `pcpu.rs`, its entry index in
//! `index.rs`, the owner/stealer protocol in `cpu/owned.rs`.
//!
//! [`OwnedLwbuf`] (`owned.rs`) is an [`Lwbuf`] that owns its caches and
//! pages, to hold across an `.await`; [`Lwbufs::bind_for_thread`]
//! (`thread.rs`) binds a thread until it exits, for runtime worker threads.

mod index;
mod owned;
mod pcpu;
mod stats;
mod thread;

pub use owned::OwnedLwbuf;
pub use stats::{CpuStats, LwbufStats};

use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;

use index::NOT_INDEXED;
use pcpu::{Key, Local, Miss, Pcpu};

use crate::cpu::{self, BindTable, CpuMask, Others, OwnerGuard, StealGuard};
use crate::error::{Error, Inconsistency, Result};
use crate::kaddr::Kaddr;
use crate::kva::{Hold, KvaSpace, Reclaim, SlotRun};
use crate::mmu::Mmu;
use crate::phys::Page;
use crate::sync::{env, Arc, AtomicU64, AtomicUsize, CachePadded, Ordering};

/// The largest CPU count a system accepts.
pub const MAX_CPUS: usize = 4096;

/// Reclaim passes a miss makes, when the window is full, before it reports
/// `WindowFull`: at least [`RECLAIM_MIN_ROUNDS`] (a release on a CPU the
/// pass already visited makes a cached entry behind it), then only while
/// slots move (another miss is reclaiming, or slots went back to the
/// window during the pass).
const RECLAIM_ROUNDS: usize = 64;
const RECLAIM_MIN_ROUNDS: usize = 3;

/// Builds an [`Lwbufs`] system. See [`Lwbufs::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until it is built"]
pub struct LwbufsBuilder {
    mmu: std::sync::Arc<dyn Mmu>,
    cpus: usize,
    max_excess: Option<usize>,
    map_budget: Option<usize>,
    granule: Option<usize>,
    reclaim: Reclaim,
}

impl LwbufsBuilder {
    /// What becomes of an evicted entry's mapping: [`Reclaim::Lazy`] (the
    /// default) leaves it for the next miss to map over in place, one
    /// system call instead of two; [`Reclaim::Strict`] removes it at once,
    /// for stores that want nothing released left readable in the window.
    pub fn reclaim(mut self, r: Reclaim) -> Self {
        self.reclaim = r;
        self
    }

    /// The mapping granule: the frames mapped, cached and evicted as one
    /// unit, aligned to their number (a power of two, at most the window's
    /// slots). `alloc` of one page maps its whole granule, so the next pages
    /// of the granule are hits; a run that lies inside one granule uses the
    /// granule's mapping. Handles, counts and statistics keep their meaning
    /// per page. Default: the memory's smallest granule
    /// ([`PhysMem::min_granule`](crate::PhysMem::min_granule): 1 frame, or
    /// one huge page). [`Error::Config`] names a bad value.
    pub fn granule(mut self, frames: usize) -> Self {
        self.granule = Some(frames);
        self
    }

    /// CPU ids `0..n` (virtual: any count up to [`MAX_CPUS`], independent of
    /// the cores the machine has). Default: the available parallelism.
    pub fn cpus(mut self, n: usize) -> Self {
        self.cpus = n;
        self
    }

    /// Unused mappings each CPU keeps cached (the *excess* limit). Default:
    /// an even share of half the window's granules, at least 1.
    pub fn max_excess(mut self, n: usize) -> Self {
        self.max_excess = Some(n);
        self
    }

    /// Live mappings allowed at once (default: [`crate::default_map_budget`],
    /// derived from `vm.max_map_count`). Beyond it, cached mappings are
    /// evicted, and with nothing to evict `alloc` returns
    /// [`Error::MapLimit`].
    pub fn map_budget(mut self, n: usize) -> Self {
        self.map_budget = Some(n);
        self
    }

    /// Create the system. No system call.
    pub fn build(self) -> Result<Lwbufs> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(Error::config("cpus", format!("{} is not in 1..={MAX_CPUS}", self.cpus)));
        }
        let kva = KvaSpace::new(self.mmu, self.map_budget, self.granule, self.reclaim)?;
        // Entries, each a granule of slots.
        let granules = kva.capacity() / kva.granule();
        let max_excess = self.max_excess.unwrap_or_else(|| (granules / (2 * self.cpus)).max(1));
        let binds = BindTable::new(self.cpus);
        Ok(Lwbufs {
            id: cpu::table_id(&binds),
            cpus: (0..self.cpus).map(|c| CachePadded::new(Pcpu::new(c, kva.granule_shift()))).collect(),
            binds,
            slot_size: kva.slot_size(),
            kva,
            max_excess: AtomicUsize::new(max_excess),
            unbound_sent: AtomicU64::new(0),
            reclaiming: AtomicUsize::new(0),
        })
    }
}

/// A set of per-CPU lwbuf caches over one window.
///
/// ```
/// use std::sync::Arc;
/// use lwbuf::{Lwbufs, PhysMem, Window};
///
/// let mem = PhysMem::builder().frames(64).build()?;
/// let lw = Lwbufs::builder(Arc::new(Window::builder(&mem).slots(32).build()?)).cpus(4).build()?;
/// let page = mem.alloc_page()?;
///
/// let cpu0 = lw.bind(0)?;                   // this thread is CPU 0 now
/// let buf = lw.alloc(&page)?;               // a miss: one mmap
/// buf.kva()?.write_at(0, b"hello")?;
/// drop(buf);                                // stays mapped, cached
/// let again = lw.alloc(&page)?;             // a hit: no system call
/// let mut b = [0u8; 5];
/// again.kva()?.read_at(0, &mut b)?;
/// assert_eq!(&b, b"hello");
/// drop(again);
/// assert_eq!(lw.stats().total.hits, 1);
/// drop(cpu0);
/// # Ok::<(), lwbuf::Error>(())
/// ```
pub struct Lwbufs {
    id: usize,
    cpus: Box<[CachePadded<Pcpu>]>,
    binds: Arc<BindTable>,
    kva: KvaSpace,
    /// `kva.slot_size()`, kept here so `Lwbuf::kva` makes no dynamic call.
    slot_size: usize,
    max_excess: AtomicUsize,
    unbound_sent: AtomicU64,
    /// Misses reclaiming other CPUs for room right now (see `acquire_full`).
    reclaiming: AtomicUsize,
}

/// The binding of the calling thread to one CPU of an [`Lwbufs`]; dropping
/// it unbinds. Neither `Send` nor `Sync`: a binding belongs to its thread,
/// and [`map_local`](Self::map_local) runs as that CPU's owner, so another
/// thread may not even borrow the guard:
///
/// ```compile_fail
/// # use std::sync::Arc;
/// # use lwbuf::{Lwbufs, PhysMem, Window};
/// # let mem = PhysMem::builder().frames(64).build().unwrap();
/// # let lw = Lwbufs::builder(Arc::new(Window::builder(&mem).slots(16).build().unwrap())).build().unwrap();
/// # let page = mem.alloc_page().unwrap();
/// let cpu = lw.bind(0).unwrap();
/// std::thread::scope(|s| {
///     s.spawn(|| cpu.map_local(&page, |kva| kva.len())); // error: `CpuGuard` is not `Sync`
/// });
/// ```
#[must_use = "the CPU is unbound as soon as the guard is dropped"]
pub struct CpuGuard<'a> {
    sys: &'a Lwbufs,
    cpu: usize,
    _not_send_or_sync: PhantomData<*const ()>,
}

impl<'a> CpuGuard<'a> {
    /// The CPU id held.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// Map `page` on this guard's CPU for the duration of `f`, which gets a
    /// view of its bytes (Linux's `kmap_local_page`): an
    /// [`alloc`](Lwbufs::alloc), a [`kva`](Lwbuf::kva) and the handle's
    /// release in one call, with the same cache, semantics and statistics,
    /// and without the handle. The binding is checked once, on entry; the
    /// guard is borrowed for the call and is neither `Send` nor `Sync`, so
    /// the thread stays bound to its CPU until the release, which is the
    /// home release. The view cannot leave `f` (its lifetime is `f`'s own),
    /// and the reference is given back even if `f` panics. Calls nest, and
    /// `f` may use the caches in every other way.
    ///
    /// Errors: as [`Lwbufs::alloc`], before `f` runs; `f`'s own result is
    /// returned inside `Ok`. [`Error::NotBound`] only from a guard kept in a
    /// thread-local and used by a later thread-local's destructor, after
    /// the thread's bindings were given back at its exit.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use lwbuf::{Lwbufs, PhysMem, Window};
    ///
    /// let mem = PhysMem::builder().frames(64).build()?;
    /// let lw = Lwbufs::builder(Arc::new(Window::builder(&mem).slots(16).build()?)).cpus(2).build()?;
    /// let page = mem.alloc_page()?;
    /// let cpu = lw.bind(0)?;
    /// cpu.map_local(&page, |kva| kva.write_u64(8, 42))??;
    /// assert_eq!(cpu.map_local(&page, |kva| kva.read_u64(8))??, 42);
    /// assert_eq!(lw.stats().total.hits, 1); // the second call hit the cached mapping
    /// # Ok::<(), lwbuf::Error>(())
    /// ```
    ///
    /// The view cannot be kept past the call, which gives the reference
    /// back:
    ///
    /// ```compile_fail
    /// # use std::sync::Arc;
    /// # use lwbuf::{Lwbufs, PhysMem, Window};
    /// # let mem = PhysMem::builder().frames(64).build().unwrap();
    /// # let lw = Lwbufs::builder(Arc::new(Window::builder(&mem).slots(16).build().unwrap())).build().unwrap();
    /// # let page = mem.alloc_page().unwrap();
    /// let cpu = lw.bind(0).unwrap();
    /// let kept = cpu.map_local(&page, |kva| kva).unwrap(); // error: the view escapes the closure
    /// ```
    #[inline(always)]
    pub fn map_local<R>(&self, page: &Page, f: impl FnOnce(Kaddr<'_>) -> R) -> Result<R> {
        let sys = self.sys;
        // A guard outlives its binding in one case: kept in a thread-local
        // whose destructor runs after the one that gives the thread's
        // bindings back (`cpu::bind`); the CPU may be another thread's by
        // then. Checked once: nothing ends a binding while `f` runs on this
        // thread.
        if sys.current_cpu() != Some(self.cpu) {
            return Err(Error::NotBound);
        }
        sys.kva.check_page(page)?;
        let pfn = page.pfn().0;
        // The key only for a miss: a hit needs the index alone.
        let index = sys.kva.page_index(pfn);
        let key = || sys.kva.page_granule(pfn).0;
        let addr = sys.kva.frame_in_granule(sys.acquire_on(self.cpu, index, key)?, pfn);
        if crate::sync::mutant!(LocalReleaseEarly) {
            sys.release_local(self.cpu, index, pfn);
            // SAFETY: a loom-only breakage, which the models must catch:
            // the slot may be unmapped while `f` runs. Under loom the MMU
            // is the model, whose views are of the memory's direct map,
            // which stays allocated as long as the memory.
            let r = f(unsafe { sys.kva.view(addr, sys.slot_size) });
            return Ok(r);
        }
        let held = LocalRef { sys, cpu: self.cpu, index, pfn };
        // SAFETY: `held` holds a reference on this CPU's entry for `key`
        // until it drops, after `f` returns (or unwinds); the entry's
        // mapping of the granule, which holds `page`'s frame at `addr`,
        // stays that long. The view's lifetime is `f`'s argument's, so no
        // borrow of it outlives the call.
        let r = f(unsafe { sys.kva.view(addr, sys.slot_size) });
        // The release inline, from registers; `held`'s drop only for an
        // unwind (a drop call here moved it through memory, stored in four
        // words and loaded back in two, and stalled on the store
        // forwarding: twice the time of the whole call).
        std::mem::forget(held);
        sys.release_local(self.cpu, index, pfn);
        Ok(r)
    }
}

/// The reference a [`CpuGuard::map_local`] holds while its closure runs:
/// given back on `cpu`, to which the guard keeps the thread bound.
struct LocalRef<'a> {
    sys: &'a Lwbufs,
    cpu: usize,
    index: usize,
    pfn: usize,
}

impl Drop for LocalRef<'_> {
    fn drop(&mut self) {
        self.sys.release_local(self.cpu, self.index, self.pfn);
    }
}

impl Lwbufs {
    /// Give back a reference a [`CpuGuard::map_local`] took on `cpu`'s
    /// entry at `index` for frame `pfn`: a home release, on the thread
    /// bound to `cpu`.
    #[inline(always)]
    fn release_local(&self, cpu: usize, index: usize, pfn: usize) {
        debug_assert_eq!(self.current_cpu(), Some(cpu));
        let max = self.max_excess();
        if !self.cpus[cpu].local.owner().release_fast(index, max) {
            self.release_local_slow(cpu, index, pfn, max);
        }
    }

    /// As [`Lwbuf::release_slow`] at home.
    #[cold]
    #[inline(never)]
    fn release_local_slow(&self, cpu: usize, index: usize, pfn: usize, max: usize) {
        let key = self.kva.key_of(pfn, 1);
        self.cpus[cpu].local.owner().release(&self.kva, max, index, || key);
    }
}

impl Drop for CpuGuard<'_> {
    fn drop(&mut self) {
        cpu::unbind(&self.sys.binds, self.cpu);
        // Messages posted while we were bound would otherwise wait for the
        // next owner: drain them now. A sender that posts after this drain
        // sees the CPU unbound and drains for itself (see `send_decref`).
        if !crate::sync::mutant!(NoUnbindDrain) {
            self.sys.drain_on_behalf(self.cpu, true);
        }
    }
}

impl fmt::Debug for CpuGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuGuard").field("cpu", &self.cpu).finish()
    }
}

/// A mapping of one page (or a run of contiguous pages), valid on every CPU
/// in its mask. `Send` and `Sync`: pass it to another thread and ask for the
/// address there. Dropping it releases it (see the module docs).
///
/// # Lifetimes
///
/// A handle borrows its caches and its pages, and a view of its bytes
/// borrows the handle, so none of them can outlive what keeps the mapping
/// alive. These do not compile:
///
/// ```compile_fail,E0597
/// # use std::sync::Arc;
/// # use lwbuf::{Backing, Lwbufs, ModelMmu, PhysMem};
/// # let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
/// let lw = Lwbufs::builder(Arc::new(ModelMmu::new(&mem, 4)?)).cpus(1).build()?;
/// let _cpu = lw.bind(0)?;
/// let buf = {
///     let page = mem.alloc_page()?;
///     lw.alloc(&page)? // the page is dropped while the handle maps it
/// };
/// drop(buf);
/// # Ok::<(), lwbuf::Error>(())
/// ```
///
/// ```compile_fail,E0597
/// # use std::sync::Arc;
/// # use lwbuf::{Backing, Lwbufs, ModelMmu, PhysMem};
/// # let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
/// let page = mem.alloc_page()?;
/// let buf = {
///     let lw = Lwbufs::builder(Arc::new(ModelMmu::new(&mem, 4)?)).cpus(1).build()?;
///     let _cpu = lw.bind(0)?;
///     lw.alloc(&page)? // the caches are dropped while the handle is alive
/// };
/// drop(buf);
/// # Ok::<(), lwbuf::Error>(())
/// ```
///
/// ```compile_fail,E0597
/// # use std::sync::Arc;
/// # use lwbuf::{Backing, Lwbufs, ModelMmu, PhysMem};
/// # let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
/// # let lw = Lwbufs::builder(Arc::new(ModelMmu::new(&mem, 4)?)).cpus(1).build()?;
/// # let _cpu = lw.bind(0)?;
/// let page = mem.alloc_page()?;
/// let bytes = {
///     let buf = lw.alloc(&page)?;
///     buf.kva()? // the view outlives the handle, whose drop may unmap it
/// };
/// bytes.fill(0);
/// # Ok::<(), lwbuf::Error>(())
/// ```
///
/// And a CPU binding stays on its thread (`CpuGuard` is not `Send`):
///
/// ```compile_fail,E0277
/// # use std::sync::Arc;
/// # use lwbuf::{Backing, Lwbufs, ModelMmu, PhysMem};
/// # let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
/// # let lw = Lwbufs::builder(Arc::new(ModelMmu::new(&mem, 4)?)).cpus(1).build()?;
/// let cpu = lw.bind(0)?;
/// std::thread::scope(|s| {
///     s.spawn(move || drop(cpu));
/// });
/// # Ok::<(), lwbuf::Error>(())
/// ```
#[must_use = "dropping an Lwbuf releases its mapping at once"]
pub struct Lwbuf<'a> {
    sys: &'a Lwbufs,
    hold: Hold<'a>,
    home: u32,
    /// The CPUs besides `home` with an entry for this handle: its cpumask
    /// is `{home} + others`.
    others: Others,
    /// The home entry's place in its CPU's index (`Local::index_of`), so
    /// that a release at home finds it without computing its key.
    index: usize,
    home_addr: NonNull<u8>,
}

// SAFETY: `home_addr` is an address in the window, valid while the handle
// holds its home entry, from any thread; everything else is Send.
unsafe impl Send for Lwbuf<'_> {}
// SAFETY: `&Lwbuf` only reads immutable fields or extends the atomic mask
// under the target CPU's lock.
unsafe impl Sync for Lwbuf<'_> {}

impl Lwbufs {
    /// A builder over `mmu` (any [`Mmu`]: the real [`crate::Window`] or the
    /// [`crate::ModelMmu`]).
    pub fn builder(mmu: std::sync::Arc<dyn Mmu>) -> LwbufsBuilder {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        LwbufsBuilder { mmu, cpus, max_excess: None, map_budget: None, granule: None, reclaim: Reclaim::default() }
    }

    /// CPUs configured.
    pub fn cpus(&self) -> usize {
        self.cpus.len()
    }

    /// The mapping granule, in frames (see [`LwbufsBuilder::granule`]).
    pub fn granule(&self) -> usize {
        self.kva.granule()
    }

    /// How the send engines prefault this caches's mappings.
    pub(crate) fn prefault_plan(&self) -> crate::kaddr::PrefaultPlan {
        self.kva.prefault_plan()
    }

    /// The MMU below the caches.
    pub fn mmu(&self) -> &std::sync::Arc<dyn Mmu> {
        self.kva.mmu()
    }

    /// Bind the calling thread to `cpu`. Errors: [`Error::NoSuchCpu`],
    /// [`Error::CpuBusy`] (another live thread has it),
    /// [`Error::AlreadyBound`] (this thread holds a CPU of this system).
    /// No system call.
    pub fn bind(&self, cpu: usize) -> Result<CpuGuard<'_>> {
        if cpu >= self.cpus.len() {
            return Err(Error::NoSuchCpu { cpu, ncpus: self.cpus.len() });
        }
        cpu::bind(&self.binds, cpu)?;
        // A stealer that took this CPU as unowned (without the membarrier)
        // may still be inside: wait for it before we enter as the owner.
        self.cpus[cpu].local.owner_arrives();
        Ok(CpuGuard { sys: self, cpu, _not_send_or_sync: PhantomData })
    }

    /// [`bind`](Self::bind), and pin the thread to core `cpu % cores` with
    /// [`pin_to_core`](crate::pin_to_core) (two system calls). Errors: those
    /// of `bind`, or the kernel's refusal to pin ([`Error::Sys`]), in which
    /// case the thread is left unbound.
    pub fn bind_pinned(&self, cpu: usize) -> Result<CpuGuard<'_>> {
        let g = self.bind(cpu)?;
        cpu::pin_to_core(cpu)?;
        Ok(g)
    }

    /// The CPU bound to the calling thread, if any. No system call.
    #[inline]
    pub fn current_cpu(&self) -> Option<usize> {
        cpu::current(self.id)
    }

    #[inline]
    fn require_cpu(&self) -> Result<usize> {
        // Not `ok_or(Error::NotBound)`: that builds the error on every call
        // and runs its drop glue on the hit path.
        match self.current_cpu() {
            Some(cpu) => Ok(cpu),
            None => Err(Error::NotBound),
        }
    }

    /// The unused mappings each CPU keeps.
    #[inline]
    pub fn max_excess(&self) -> usize {
        self.max_excess.load(Ordering::Relaxed)
    }

    /// Change the excess limit. CPUs not running the library right now are
    /// trimmed at once; the others at their next `alloc`, `poll` or
    /// release.
    pub fn set_max_excess(&self, n: usize) {
        self.max_excess.store(n, Ordering::Relaxed);
        for cpu in 0..self.cpus.len() {
            if let Some(mut l) = self.steal_cpu(cpu, false) {
                l.drain(&self.cpus[cpu].mailbox, &self.kva, n);
            }
        }
    }

    /// Take `cpu`'s cache on its owner's behalf. A CPU nobody has bound
    /// cannot have an owner inside (binding waits for stealers), so it is
    /// taken without the `membarrier`.
    fn steal_cpu(&self, cpu: usize, wait: bool) -> Option<StealGuard<'_, Local>> {
        self.cpus[cpu].local.steal_if(wait, || !self.binds.is_bound(cpu))
    }

    /// Enter `cpu`'s cache as its owner (the caller is the thread bound to
    /// `cpu`): apply pending messages first (the passive IPI), then enforce
    /// the excess limit. No atomic read-modify-write (see `cpu::Owned`).
    #[inline(always)]
    fn enter_cpu(&self, cpu: usize) -> OwnerGuard<'_, Local> {
        debug_assert_eq!(self.current_cpu(), Some(cpu), "enter_cpu by a thread not bound to CPU {cpu}");
        let pc = &self.cpus[cpu];
        let mut l = pc.local.owner();
        let max = self.max_excess();
        if pc.mailbox.has_mail() || l.cached() > max {
            l.drain(&pc.mailbox, &self.kva, max);
        }
        l
    }

    /// Map `page` on the calling thread's CPU. A hit (the frame is cached on
    /// this CPU) makes no system call and no heap allocation; a miss makes
    /// one `mmap` (plus a `PROT_NONE` remap if it evicts).
    ///
    /// Errors: [`Error::NotBound`], [`Error::ForeignPage`],
    /// [`Error::WindowFull`] (every slot mapped and in use),
    /// [`Error::MapLimit`] (the mapping budget is in use), or the MMU's
    /// [`Error::Sys`] (`ENOMEM` at the `vm.max_map_count` wall once nothing
    /// is left to evict).
    #[inline(always)]
    pub fn alloc<'a>(&'a self, page: &'a Page) -> Result<Lwbuf<'a>> {
        self.kva.check_page(page)?;
        let (key, index) = self.kva.page_granule(page.pfn().0);
        self.alloc_key(key, index, std::slice::from_ref(page))
    }

    /// Map a run of pages whose frames are contiguous (as a page-cache file
    /// lays them out) into adjacent slots with one `mmap`, cached as one
    /// entry: the kernel sees one VMA, and its eventual unmap is one cheap
    /// shootdown instead of one per page. Errors as [`alloc`](Self::alloc),
    /// plus [`Error::Config`] if the frames are not contiguous or `pages` is
    /// empty.
    pub fn alloc_run<'a>(&'a self, pages: &'a [Page]) -> Result<Lwbuf<'a>> {
        let (key, hold) = self.kva.run_key(pages)?;
        self.alloc_key(key, self.kva.granule_index(key).unwrap_or(NOT_INDEXED), hold)
    }

    /// Inlined whole into the caller (with `alloc` and the hit path under
    /// it), so that a hit's handle is built in registers: returned through
    /// memory from a call, its fields were stored piecewise and loaded back
    /// wider, and every hit stalled on failed store forwarding (24 ns a
    /// hit, 14 ns inlined, `benches/lwbuf.rs`).
    #[inline(always)]
    fn alloc_key<'a>(&'a self, key: Key, index: usize, hold: Hold<'a>) -> Result<Lwbuf<'a>> {
        let cpu = self.require_cpu()?;
        let addr = self.kva.addr_in(key, self.acquire_on(cpu, index, || key)?, hold[0].pfn().0);
        Ok(Lwbuf { sys: self, hold, others: Others::new(), home: cpu as u32, index, home_addr: addr })
    }

    /// Take a reference on `key` in `cpu`'s cache, reclaiming slots from
    /// other CPUs if the window is otherwise full.
    #[inline(always)]
    fn acquire_on(&self, cpu: usize, index: usize, key: impl Fn() -> Key) -> Result<NonNull<u8>> {
        // A statement of its own: the guard must be gone before the slow
        // path steals other CPUs (a guard in a `match` scrutinee would live
        // through it, and two CPUs reclaiming at once would each wait for
        // the other to leave its cache).
        let r = self.enter_cpu(cpu).acquire(&self.kva, index, &key);
        match r {
            Ok(addr) => Ok(addr),
            Err(m) => self.acquire_full(cpu, index, key(), m),
        }
    }

    /// `acquire_on` when the first try failed for lack of room: reclaim the
    /// other CPUs' cached mappings and free slots, keep one of the freed
    /// slots for this request (so that other CPUs' batches cannot take them
    /// all back first), and try again. `WindowFull` is reported only after
    /// a reclaim pass found nothing to free and the window had no free slot
    /// (a few rounds, in case releases on other CPUs raced the pass).
    #[cold]
    fn acquire_full(&self, cpu: usize, index: usize, key: Key, first: Miss) -> Result<NonNull<u8>> {
        let Miss::NoRoom(mut err) = first else { return Err(first.into_error()) };
        let mut freed = Vec::new();
        for round in 0..RECLAIM_ROUNDS {
            let gives = self.kva.gives();
            // Our cache is left (`acquire_on`): take the others one at a time.
            // While we hold what we freed, no other miss can see it: count
            // ourselves in transit so that one retries instead of failing.
            self.reclaiming.fetch_add(1, Ordering::Relaxed);
            let refused = self.reclaim_except(cpu, &mut freed);
            // Relaxed: a hint for retrying, read after our own pass.
            let progress = round + 1 < RECLAIM_MIN_ROUNDS
                || !freed.is_empty()
                || self.kva.free_slots() > 0
                || self.kva.gives() != gives
                || self.reclaiming.load(Ordering::Relaxed) > 1;
            let r = {
                let mut l = self.enter_cpu(cpu);
                if key.pages <= self.kva.granule() {
                    if let Some(slot) = freed.pop() {
                        l.keep_slot(&self.kva, slot);
                    }
                }
                self.kva.give_batch(freed.drain(..));
                self.reclaiming.fetch_sub(1, Ordering::Relaxed);
                l.acquire(&self.kva, index, || key)
            };
            match r {
                Ok(addr) => return Ok(addr),
                Err(Miss::NoRoom(e)) => {
                    // Full because another CPU's cached mapping could not
                    // be unmapped: that refusal is the error to report.
                    err = match (e, refused) {
                        (Error::WindowFull { .. }, Some(refusal)) => refusal,
                        (e, _) => e,
                    };
                    if !progress {
                        break;
                    }
                    crate::sync::thread::yield_now();
                }
                Err(m) => return Err(m.into_error()),
            }
        }
        Err(err)
    }

    /// Apply this CPU's pending messages and enforce the excess limit now
    /// (otherwise done by the next `alloc` on this CPU; a release at home
    /// leaves the mailbox alone, to touch only its entry).
    pub fn poll(&self) -> Result<()> {
        let cpu = self.require_cpu()?;
        drop(self.enter_cpu(cpu));
        Ok(())
    }

    /// Drain every CPU's mailbox and unmap every cached unused mapping, on
    /// behalf of CPUs whose threads are idle or gone, and remove the
    /// mappings lazy reclaim left behind. Returns the slots given back to
    /// the window. One system call per contiguous range of slots unmapped.
    pub fn reclaim(&self) -> usize {
        let before = self.kva.free_slots();
        let mut freed = Vec::new();
        self.reclaim_except(usize::MAX, &mut freed);
        self.kva.give_batch(freed);
        self.kva.purge();
        self.kva.free_slots().saturating_sub(before)
    }

    /// What becomes of evicted mappings (see [`LwbufsBuilder::reclaim`]).
    pub fn reclaim_mode(&self) -> Reclaim {
        self.kva.reclaim()
    }

    /// Reclaim every CPU but `except`: their single free slots (those they
    /// held and those their evictions freed) go to `freed`, runs back to the
    /// window. Returns the first unmap the MMU refused while doing it (that
    /// entry stays cached, counted).
    fn reclaim_except(&self, except: usize, freed: &mut Vec<SlotRun>) -> Option<Error> {
        let mut refused = None;
        for (cpu, pc) in self.cpus.iter().enumerate() {
            if cpu == except {
                continue;
            }
            let mut l = self.steal_cpu(cpu, true).expect("a waiting steal always succeeds");
            l.drain(&pc.mailbox, &self.kva, usize::MAX);
            l.take_unmap_error();
            l.shrink_into(&self.kva, freed);
            if let Some(e) = l.take_unmap_error() {
                refused.get_or_insert(e);
            }
        }
        refused
    }

    /// Drain `cpu`'s mailbox for it. `wait`: block for its lock (only for
    /// CPUs without an owner, whose lock is held briefly by other drainers);
    /// otherwise give up if someone (its owner) is in the library.
    fn drain_on_behalf(&self, cpu: usize, wait: bool) {
        let pc = &self.cpus[cpu];
        let guard = self.steal_cpu(cpu, wait);
        if let Some(mut l) = guard {
            l.drain(&pc.mailbox, &self.kva, self.max_excess());
        }
    }

    /// Post a decref for `key` to `cpu`.
    fn send_decref(&self, from: Option<usize>, cpu: usize, key: Key) {
        let pc = &self.cpus[cpu];
        let queued = pc.mailbox.push(key);
        match from {
            Some(f) => {
                // Only the thread bound to `f` counts as `f`, so a load and a
                // store do (an atomic add costs ~10x more); the bind hand-over
                // (`BindTable`: AcqRel take, Release give) orders one owner's
                // increments before the next owner's.
                let sent = &self.cpus[f].sent;
                sent.store(sent.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            }
            None => {
                self.unbound_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The push took the mailbox lock after any drain an unbinding owner
        // did (or before it, and then that drain took our message): if the
        // CPU has no owner now, nobody else will apply it, so we do.
        if !self.binds.is_bound(cpu) {
            self.drain_on_behalf(cpu, true);
        } else if queued >= env::MAILBOX_DRAIN_AT {
            // Keep an idle owner's backlog bounded.
            self.drain_on_behalf(cpu, false);
        }
    }

    /// Counters per CPU and summed, with the MMU's. Takes each CPU's lock
    /// briefly.
    pub fn stats(&self) -> LwbufStats {
        let per_cpu: Vec<CpuStats> = self
            .cpus
            .iter()
            .enumerate()
            .map(|(cpu, pc)| {
                let l = self.steal_cpu(cpu, true).expect("a waiting steal always succeeds");
                CpuStats::read(&l, pc)
            })
            .collect();
        LwbufStats::new(
            per_cpu,
            self.unbound_sent.load(Ordering::Relaxed),
            self.kva.mmu_stats(),
            self.kva.purge_failures(),
        )
    }

    /// Check the caches' invariants, for tests and debugging: every entry's
    /// slot maps its frame, every frame is mapped at most once per CPU, and
    /// every slot of the window is free, held free by one CPU or mapped by
    /// one entry. Returns the reference counts summed over every CPU (0 when
    /// no handle is alive and every message is applied).
    ///
    /// It takes each CPU's lock in turn and walks every entry (no system
    /// call); run it while the system is quiet, or the counts it sums may
    /// be from different moments. An [`Inconsistency`] is a bug in this
    /// library.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use lwbuf::{Backing, Lwbufs, ModelMmu, PhysMem};
    ///
    /// let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
    /// let lw = Lwbufs::builder(Arc::new(ModelMmu::new(&mem, 4)?)).cpus(1).build()?;
    /// let page = mem.alloc_page()?;
    /// let _cpu = lw.bind(0)?;
    /// let buf = lw.alloc(&page)?;
    /// assert_eq!(lw.check_consistency(), Ok(1));
    /// drop(buf);
    /// assert_eq!(lw.check_consistency(), Ok(0));
    /// # Ok::<(), lwbuf::Error>(())
    /// ```
    pub fn check_consistency(&self) -> std::result::Result<u64, Inconsistency> {
        let mmu = self.kva.mmu();
        let mut refs = 0;
        let mut slots_held = 0;
        for cpu in 0..self.cpus.len() {
            let l = self.steal_cpu(cpu, true).expect("a waiting steal always succeeds");
            let mut seen = std::collections::HashSet::new();
            for (key, slot, slots, r) in l.entries() {
                if !seen.insert(key) {
                    return Err(Inconsistency(format!("CPU {}: {key:?} mapped twice", l.cpu)));
                }
                for i in 0..key.pages {
                    let got = mmu.translate(crate::mmu::Slot(slot.0 + i));
                    if got != Some(crate::phys::Pfn(key.pfn + i)) {
                        return Err(Inconsistency(format!(
                            "CPU {}: slot {} maps {got:?}, expected frame {}",
                            l.cpu,
                            slot.0 + i,
                            key.pfn + i
                        )));
                    }
                }
                slots_held += slots;
                refs += r as u64;
            }
            slots_held += l.free_slot_count();
        }
        let total = slots_held + self.kva.free_slots();
        if total != self.kva.capacity() {
            return Err(Inconsistency(format!(
                "slots: {slots_held} held by CPUs + {} free = {total}, window has {}",
                self.kva.free_slots(),
                self.kva.capacity()
            )));
        }
        Ok(refs)
    }
}

impl Drop for Lwbufs {
    fn drop(&mut self) {
        // No handle or guard can exist: both borrow the system.
        for (cpu, pc) in self.cpus.iter().enumerate() {
            let mut l = self.steal_cpu(cpu, true).expect("a waiting steal always succeeds");
            let mut msgs = Vec::new();
            pc.mailbox.take_all(&mut msgs);
            l.teardown(&self.kva);
        }
    }
}

impl fmt::Debug for Lwbufs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lwbufs")
            .field("cpus", &self.cpus.len())
            .field("max_excess", &self.max_excess())
            .field("mmu", self.kva.mmu())
            .finish()
    }
}

// === impl Lwbuf ===

impl<'a> Lwbuf<'a> {
    /// The first (or only) page.
    pub fn page(&self) -> &'a Page {
        &self.hold[0]
    }

    /// Every page mapped (one, or the run), as [`SfBuf::pages`](crate::SfBuf::pages).
    pub fn pages(&self) -> &'a [Page] {
        self.hold
    }

    /// The CPU that allocated the handle.
    pub fn home_cpu(&self) -> usize {
        self.home as usize
    }

    /// The CPUs the handle has an entry on, as a copy: the handle's own
    /// mask decides which CPUs its release reaches, so callers must not be
    /// able to change it (a CPU added by hand would receive a decref it
    /// holds no reference for, and take another handle's).
    pub fn cpumask(&self) -> CpuMask {
        let m = CpuMask::single(self.sys.cpus.len(), self.home as usize);
        for cpu in self.others.iter() {
            m.insert(cpu);
        }
        m
    }

    /// The cache entry the handle holds, from the pages it borrows (not
    /// stored: a smaller handle is cheaper to return from `alloc`). With a
    /// granule above 1 frame, the granule's entry, shared by the handles of
    /// its pages on every CPU; the loom model `lwbuf_granule_shared` fails
    /// when a release names the page instead (`ReleasePageKey`) or a
    /// foreign CPU's entry is made for it (`ForeignPageKey`).
    #[inline]
    fn key(&self) -> Key {
        self.sys.kva.key_of(self.hold[0].pfn().0, self.hold.len())
    }

    /// The key a release decrefs: the handle's entry's.
    #[inline]
    fn release_key(&self) -> Key {
        if crate::sync::mutant!(ReleasePageKey) {
            return Key { pfn: self.hold[0].pfn().0, pages: self.hold.len() };
        }
        self.key()
    }

    fn len(&self) -> usize {
        self.hold.len() * self.sys.slot_size
    }

    /// The mapped bytes, on the calling thread's CPU (`lwbuf_kva`). On the
    /// home CPU this is a field read; on another CPU in the mask, a lookup
    /// in that CPU's cache; on a CPU not yet in the mask, it creates (or
    /// bumps) that CPU's entry, possibly with one `mmap`, and adds the CPU
    /// (the first such CPU with an id of 64 or more also allocates the
    /// handle's mask for those ids).
    /// The view borrows the handle, so it cannot outlive the mapping.
    ///
    /// Errors: [`Error::NotBound`]; on a new CPU, as [`Lwbufs::alloc`].
    #[inline]
    pub fn kva(&self) -> Result<Kaddr<'_>> {
        let cpu = self.sys.require_cpu()?;
        let addr = if cpu == self.home as usize { self.home_addr } else { self.foreign_addr(cpu)? };
        // SAFETY: the handle holds a reference on this CPU's entry for its
        // whole life (home entry, or the entry added to the mask), so the
        // mapping of `len` bytes stays for the borrow of `self`.
        Ok(unsafe { self.sys.kva.view(addr, self.len()) })
    }

    #[cold]
    fn foreign_addr(&self, cpu: usize) -> Result<NonNull<u8>> {
        let sys = self.sys;
        let (key, pfn) = (self.key(), self.hold[0].pfn().0);
        let key = if crate::sync::mutant!(ForeignPageKey) { Key { pfn, pages: self.hold.len() } } else { key };
        if self.others.contains(cpu) {
            return Ok(sys.kva.addr_in(key, sys.enter_cpu(cpu).addr_of(key), pfn));
        }
        // Only a thread bound to `cpu` adds `cpu` to a mask, under its lock:
        // the test above cannot race with another insert of the same CPU.
        let index = sys.kva.granule_index(key).unwrap_or(NOT_INDEXED);
        let addr = sys.kva.addr_in(key, sys.acquire_on(cpu, index, || key)?, pfn);
        sys.enter_cpu(cpu).counters.foreign += 1;
        self.others.insert(cpu, sys.cpus.len());
        Ok(addr)
    }
}

impl Drop for Lwbuf<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        let sys = self.sys;
        let home = self.home as usize;
        // The common case: released on its home CPU, used nowhere else, a
        // decref that needs nothing else (see `Local::release_fast`). No
        // mailbox check here: messages wait for the next `alloc` or `poll`,
        // so that a release costs its decref alone. Small enough to inline
        // whole, so that a handle released where it was made never leaves
        // the registers.
        if sys.current_cpu() == Some(home) && self.others.is_empty() && !crate::sync::mutant!(ReleasePageKey) {
            let max = sys.max_excess();
            if sys.cpus[home].local.owner().release_fast(self.index, max) {
                return;
            }
        }
        self.release_slow();
    }
}

impl Lwbuf<'_> {
    /// Every release `Local::release_fast` does not finish: the entry's
    /// first trip to the clock, a trim, a run's entry, or a handle used on
    /// other CPUs or dropped away from home.
    #[cold]
    #[inline(never)]
    fn release_slow(&mut self) {
        let sys = self.sys;
        let home = self.home as usize;
        if sys.current_cpu() == Some(home) && self.others.is_empty() {
            let max = sys.max_excess();
            let mut l = sys.cpus[home].local.owner();
            let index = if crate::sync::mutant!(ReleasePageKey) { l.index_of(self.release_key()) } else { self.index };
            l.release(&sys.kva, max, index, || self.release_key());
            return;
        }
        self.release_spread();
    }

    /// Release a handle used on other CPUs, or dropped away from home: a
    /// local decref for the current CPU, a message to every other CPU in
    /// the mask.
    #[cold]
    #[inline(never)]
    fn release_spread(&mut self) {
        let sys = self.sys;
        let me = sys.current_cpu();
        for cpu in std::iter::once(self.home as usize).chain(self.others.iter()) {
            if Some(cpu) == me {
                let mut l = sys.enter_cpu(cpu);
                l.decref(self.release_key());
                l.trim(&sys.kva, sys.max_excess());
            } else if !crate::sync::mutant!(NoRemoteDecref) {
                sys.send_decref(me, cpu, self.release_key());
            }
        }
        // The only release that can find a mask of ids >= 64 (the others
        // require `others` empty).
        self.others.free();
    }
}

/// Under loom only: the first slot of the calling thread's CPU's entry for
/// `h`'s mapping (`None` if that CPU has none, or the thread is unbound),
/// so that a model can check that the slots stay mapped to the handle's
/// frames while it lives. A library call on that CPU, as `poll` is.
#[cfg(loom)]
pub fn entry_slot(h: &Lwbuf<'_>) -> Option<crate::Slot> {
    h.sys.current_entry_slot(h.key())
}

/// Under loom only: the first slot of the calling thread's CPU's entry for
/// the granule holding `page` (`None` if that CPU has none, or the thread
/// is unbound): for a model to check, inside a [`CpuGuard::map_local`]
/// closure, that the mapping stays while the closure runs.
#[cfg(loom)]
pub fn local_entry_slot(lw: &Lwbufs, page: &Page) -> Option<crate::Slot> {
    lw.current_entry_slot(lw.kva.page_granule(page.pfn().0).0)
}

#[cfg(loom)]
impl Lwbufs {
    /// The first slot of the calling thread's CPU's entry for `key`.
    fn current_entry_slot(&self, key: Key) -> Option<crate::Slot> {
        let cpu = self.current_cpu()?;
        let l = self.enter_cpu(cpu);
        // A binding of its own: the search borrows the guard.
        let slot = l.entries().find(|&(k, ..)| k == key).map(|(_, slot, ..)| slot);
        slot
    }
}

impl fmt::Debug for Lwbuf<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lwbuf")
            .field("pfn", &self.key().pfn)
            .field("pages", &self.hold.len())
            .field("home", &self.home)
            .field("cpumask", &self.cpumask())
            .finish()
    }
}
