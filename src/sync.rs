//! The one sync facade.
//!
//! Every atomic, lock, `UnsafeCell`, `Arc`, thread-local and spawn in the crate
//! comes from here. Normally these are std's (and crossbeam-utils') types;
//! under `--cfg loom` they are loom's, so the loom models in `loom-tests/` run
//! the library's own code. The std side mirrors loom's API
//! (`UnsafeCell::with`/`with_mut`) so call sites do not change between the two.

#![allow(unused_imports, dead_code)]

#[cfg(not(loom))]
mod imp {
    pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
    pub(crate) use std::sync::{Arc, Condvar, Mutex, MutexGuard};
    pub(crate) use std::thread;
    pub(crate) use std::thread_local;

    /// `UnsafeCell` with loom's closure API.
    #[derive(Debug, Default)]
    pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub(crate) const fn new(v: T) -> Self {
            Self(std::cell::UnsafeCell::new(v))
        }
        #[inline(always)]
        pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            f(self.0.get())
        }
        #[inline(always)]
        pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }

    /// Yield inside a spin loop (a plain spin hint outside loom).
    #[inline(always)]
    pub(crate) fn spin_loop() {
        std::hint::spin_loop();
    }
}

#[cfg(loom)]
mod imp {
    pub(crate) use loom::cell::UnsafeCell;
    /// A static made afresh for every execution (a loom atomic cannot be
    /// a plain `static`).
    pub(crate) use loom::lazy_static;
    pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
    pub(crate) use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
    pub(crate) use loom::thread;
    pub(crate) use loom::thread_local;

    /// Under loom a spin loop must yield, or the model never makes progress.
    pub(crate) fn spin_loop() {
        loom::thread::yield_now();
    }
}

pub(crate) use imp::*;

pub(crate) use crossbeam_utils::CachePadded;

/// Atomics whose all-zero bytes are a valid value of 0 (std documents the
/// same size, alignment and bit validity as the integer), so a zeroed
/// allocation is a table of them holding 0.
///
/// # Safety
/// Implementors must have the representation of an integer whose zero is
/// all-zero bytes.
#[cfg(not(loom))]
pub(crate) unsafe trait ZeroedAtomic: Sized {}
// SAFETY: `AtomicU64` has the size, alignment and bit validity of `u64`.
#[cfg(not(loom))]
unsafe impl ZeroedAtomic for AtomicU64 {}
// SAFETY: `AtomicUsize` has the size, alignment and bit validity of `usize`.
#[cfg(not(loom))]
unsafe impl ZeroedAtomic for AtomicUsize {}

/// Under loom: atomics made one by one (loom's are not plain integers).
#[cfg(loom)]
pub(crate) trait ZeroedAtomic: Sized {
    fn zero() -> Self;
}
#[cfg(loom)]
impl ZeroedAtomic for AtomicU64 {
    fn zero() -> Self {
        AtomicU64::new(0)
    }
}
#[cfg(loom)]
impl ZeroedAtomic for AtomicUsize {
    fn zero() -> Self {
        AtomicUsize::new(0)
    }
}

/// `n` atomics holding 0, or `None` if the allocator refuses (callers turn
/// that into an error naming the setting, instead of the abort of an
/// infallible allocation). The memory comes zeroed from the allocator: for
/// a large table, fresh anonymous memory, resident only where written, so
/// a table sized for a huge window costs address space until it is used.
#[cfg(not(loom))]
pub(crate) fn try_zeroed<A: ZeroedAtomic>(n: usize) -> Option<Box<[A]>> {
    let layout = std::alloc::Layout::array::<A>(n).ok()?;
    let ptr = if layout.size() == 0 {
        std::ptr::NonNull::<A>::dangling().as_ptr()
    } else {
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        if p.is_null() {
            return None;
        }
        p.cast::<A>()
    };
    // SAFETY: `ptr` is an allocation of the global allocator with the layout
    // of `[A; n]` (or dangling and aligned for a zero-sized one), every byte
    // zero, which is `n` valid atomics holding 0 (`ZeroedAtomic`); the box
    // frees it with that same layout.
    Some(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, n)) })
}

#[cfg(loom)]
pub(crate) fn try_zeroed<A: ZeroedAtomic>(n: usize) -> Option<Box<[A]>> {
    Some((0..n).map(|_| A::zero()).collect())
}

/// A table of `n` values made by `make`, or `None` if the allocator refuses
/// its `n * size_of::<T>()` bytes (see [`try_zeroed`]).
pub(crate) fn try_table<T>(n: usize, make: impl FnMut() -> T) -> Option<Box<[T]>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.extend(std::iter::repeat_with(make).take(n));
    Some(v.into_boxed_slice())
}

/// Lock a mutex, ignoring poisoning: every critical section in the crate
/// leaves its data consistent before anything that can panic, so a poisoned
/// lock (a panic elsewhere while it was held) still guards valid state.
#[inline]
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    #[cfg(not(loom))]
    {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
    #[cfg(loom)]
    {
        m.lock().unwrap()
    }
}

/// Wait on a condition variable, ignoring poisoning as [`lock`] does.
#[inline]
pub(crate) fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    #[cfg(not(loom))]
    {
        cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }
    #[cfg(loom)]
    {
        cv.wait(g).unwrap()
    }
}

/// Try to lock a mutex without blocking; `None` if another thread holds it.
#[inline]
pub(crate) fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        #[cfg(not(loom))]
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(_) => None,
    }
}

/// Sizes that shrink under loom so that models stay small enough to explore
/// exhaustively (as tokio shrinks its queue capacity from 256 to 4 under loom).
pub(crate) mod env {
    /// How many slots a CPU takes from (and returns to) the shared slot
    /// allocator at once.
    #[cfg(not(loom))]
    pub(crate) const SLOT_BATCH: usize = 32;
    /// Under loom: 2, so a model of a 4-slot window exercises batching.
    #[cfg(loom)]
    pub(crate) const SLOT_BATCH: usize = 2;

    /// Mailbox length beyond which a sender drains the mailbox on the
    /// owner's behalf if the owner is not running the library right now.
    #[cfg(not(loom))]
    pub(crate) const MAILBOX_DRAIN_AT: usize = 256;
    /// Under loom: 3, above what the models' two producers send, so the
    /// mailbox model checks the owner's own drain and the unowned-CPU model
    /// checks the unbind drain, with no helping drain to mask either.
    #[cfg(loom)]
    pub(crate) const MAILBOX_DRAIN_AT: usize = 3;

    /// Whether the sf_buf pool's hint table has one bucket per frame
    /// whatever the memory's size. Normally not: its size follows the
    /// window, and frames may share a bucket.
    #[cfg(not(loom))]
    pub(crate) const HINTS_EXACT: bool = false;
    /// Under loom, always (the models' memories are a few frames, so the
    /// table stays tiny): a live generation named by a frame's hint then
    /// maps that frame, and the models skip the key check that a shared
    /// bucket would need.
    #[cfg(loom)]
    pub(crate) const HINTS_EXACT: bool = true;
}

/// The asymmetric barrier pair: the *light* side (a compiler barrier) is
/// for hot paths, the *heavy* side (`membarrier(PRIVATE_EXPEDITED)`: every
/// running thread of the process executes a full memory barrier) for rare
/// ones, and together they order a store before a load on both sides as two
/// `SeqCst` fences would. Used by the per-CPU owner/stealer handshake
/// (`cpu::owned`) and the sf_buf pool's pins. Where the kernel lacks
/// `membarrier`, both sides are `SeqCst` fences.
///
/// Under Miri both sides are `SeqCst` fences too: Miri cannot run the system
/// call, and could not model it if it did (a compiler barrier paired with a
/// barrier the kernel forces on other threads lies outside the language's
/// memory model, where the light side is no fence at all). Two `SeqCst`
/// fences are sound within the model, so Miri checks everything built on
/// the pair as a kernel without `membarrier` runs it. Under loom likewise:
/// the models check the store-buffering argument the real pair implements.
/// What neither can check is that every party a light side races issues
/// the heavy side and not a plain fence: against a `SeqCst` fence the light
/// side is no barrier at all. That is argued where each light side is used
/// (`cpu::owned`; the sf_buf pool's `hit.rs`, 9, and `handle.rs`, 12).
#[cfg(not(loom))]
pub(crate) mod barrier {
    use std::sync::atomic::{compiler_fence, fence, AtomicU8, Ordering};

    /// 0: not yet tried, 1: membarrier registered, 2: unavailable.
    static STATE: AtomicU8 = AtomicU8::new(0);

    /// Register the process for expedited membarriers (once).
    pub(crate) fn init() {
        if STATE.load(Ordering::Acquire) != 0 {
            return;
        }
        let ok = !cfg!(miri) && crate::sys::membarrier_register().is_ok();
        STATE.store(if ok { 1 } else { 2 }, Ordering::Release);
    }

    #[inline]
    fn registered() -> bool {
        STATE.load(Ordering::Relaxed) == 1
    }

    /// The light side: a compiler barrier when the heavy side can force a
    /// full barrier on us, else a full fence.
    #[inline]
    pub(crate) fn light() {
        if registered() {
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
    }

    /// The heavy side: a full barrier here and in every running thread.
    pub(crate) fn heavy() {
        if registered() {
            // The light sides rely on it (they issue only a compiler
            // barrier), so a failure after a successful registration cannot
            // be papered over.
            if let Err(e) = crate::sys::membarrier() {
                panic!("membarrier(PRIVATE_EXPEDITED) failed after registration: {e}");
            }
        } else {
            fence(Ordering::SeqCst);
        }
    }
}

/// Under loom both sides are full fences (see above).
#[cfg(loom)]
pub(crate) mod barrier {
    use super::{fence, Ordering};

    pub(crate) fn init() {}

    pub(crate) fn light() {
        fence(Ordering::SeqCst);
    }

    pub(crate) fn heavy() {
        fence(Ordering::SeqCst);
    }
}

/// The concurrent map of the sf_buf pool: dashmap normally; under loom a
/// mutex around a `HashMap`, because dashmap's own locks are invisible to
/// loom (and would spin forever in a model). Every closure runs under the
/// lock of the key's shard, which is what the pool's eviction argument
/// relies on.
pub(crate) use map::ConcurrentMap;

mod map {
    use std::hash::Hash;

    use crate::hash::BuildWordHasher;

    #[cfg(not(loom))]
    pub(crate) struct ConcurrentMap<K, V>(dashmap::DashMap<K, V, BuildWordHasher>);

    #[cfg(not(loom))]
    impl<K: Hash + Eq + Copy, V: Copy> ConcurrentMap<K, V> {
        pub(crate) fn new(shards: usize) -> Self {
            let shards = shards.next_power_of_two().max(2);
            ConcurrentMap(dashmap::DashMap::with_capacity_and_hasher_and_shard_amount(
                0,
                BuildWordHasher::default(),
                shards,
            ))
        }

        /// Run `f` on the value of `k` under its shard's read lock.
        #[inline]
        pub(crate) fn get_with<R>(&self, k: &K, f: impl FnOnce(&V) -> R) -> Option<R> {
            self.0.get(k).map(|r| f(r.value()))
        }

        /// Insert `v` if `k` is vacant (`None`), else run `f` on the existing
        /// value (`Some`), under the shard's write lock either way.
        pub(crate) fn insert_or_with<R>(&self, k: K, v: V, f: impl FnOnce(&V) -> R) -> Option<R> {
            match self.0.entry(k) {
                dashmap::mapref::entry::Entry::Occupied(o) => Some(f(o.get())),
                dashmap::mapref::entry::Entry::Vacant(vac) => {
                    vac.insert(v);
                    None
                }
            }
        }

        /// Remove `k` if `f` says so, under the shard's write lock.
        pub(crate) fn remove_if(&self, k: &K, f: impl FnOnce(&V) -> bool) -> bool {
            self.0.remove_if(k, |_, v| f(v)).is_some()
        }

        pub(crate) fn len(&self) -> usize {
            self.0.len()
        }
    }

    #[cfg(loom)]
    pub(crate) struct ConcurrentMap<K, V>(super::Mutex<std::collections::HashMap<K, V, BuildWordHasher>>);

    #[cfg(loom)]
    impl<K: Hash + Eq + Copy, V: Copy> ConcurrentMap<K, V> {
        pub(crate) fn new(_shards: usize) -> Self {
            ConcurrentMap(super::Mutex::new(Default::default()))
        }

        pub(crate) fn get_with<R>(&self, k: &K, f: impl FnOnce(&V) -> R) -> Option<R> {
            super::lock(&self.0).get(k).map(f)
        }

        pub(crate) fn insert_or_with<R>(&self, k: K, v: V, f: impl FnOnce(&V) -> R) -> Option<R> {
            let mut m = super::lock(&self.0);
            match m.get(&k) {
                Some(old) => Some(f(old)),
                None => {
                    m.insert(k, v);
                    None
                }
            }
        }

        pub(crate) fn remove_if(&self, k: &K, f: impl FnOnce(&V) -> bool) -> bool {
            let mut m = super::lock(&self.0);
            match m.get(k) {
                Some(v) if f(v) => {
                    m.remove(k);
                    true
                }
                _ => false,
            }
        }

        pub(crate) fn len(&self) -> usize {
            super::lock(&self.0).len()
        }
    }
}

/// Deliberate protocol breakages ("mutants") that the loom suite switches on
/// one at a time to show that each model can fail. They exist only under
/// `cfg(loom)`; in every other build `mutant()` is a constant `false` and the
/// branches vanish.
#[cfg(loom)]
pub mod mutants {
    use std::cell::Cell;

    /// One way to break a protocol.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[non_exhaustive]
    pub enum Mutant {
        /// `Page` drop decrements `Relaxed` and skips the `Acquire` fence.
        PageRelaxed,
        /// The owner's mailbox check always says "no mail".
        SkipDrain,
        /// Unbinding a CPU does not drain its mailbox.
        NoUnbindDrain,
        /// A handle dropped on one CPU releases only that CPU's entry and
        /// sends no messages (DragonFly's first lwbuf leak, in spirit).
        NoRemoteDecref,
        /// `CpuGuard::map_local` gives its reference back before the
        /// closure runs instead of after.
        LocalReleaseEarly,
        /// The sf_buf evictor kills an entry without re-checking its count.
        EvictNoRecheck,
        /// Releases do not bump the wait queue's generation.
        LostWakeup,
        /// The sf_buf pool trusts a frame's hint without checking the
        /// slot's generation.
        HintUnchecked,
        /// The sf_buf evictor ignores pinned references.
        PinUnchecked,
        /// A last sf_buf release of either kind reads the other kind of
        /// reference without the SeqCst fence after its own decrement.
        LastReleaseNoFence,
        /// The pinned hit's re-check ignores `PINNED`, so it misses a
        /// second-chance look that cleared `REVOKED` and `PINNED` together.
        PinRecheckNoPinned,
        /// The pinned hit's re-check ignores `REVOKED`, so it keeps a pin an
        /// evictor did not count and is about to kill the entry under.
        PinRecheckNoRevoked,
        /// An sf_buf evictor that took a pinned entry off the LRU does not
        /// count the pins again, so a pin given back meanwhile relists nothing.
        UnlistNoRecount,
        /// An sf_buf evictor that took a pinned entry off the LRU reads the
        /// pins with no barrier between, though the pinned release it races
        /// issues only the light one.
        UnlistLight,
        /// An sf_buf evictor gives up when its number of looks runs out,
        /// though an unused entry is still listed.
        LooksRunShort,
        /// Taking a stale claim (lazy reclaim) hands out a copy and leaves
        /// the claim listed, so the next miss maps over the same slots.
        StaleTakeKeeps,
        /// A batch removal of stale claims copies the list instead of
        /// taking it, and removes claims a miss took from it meanwhile.
        PurgeSnapshot,
        /// A release of an lwbuf handle decrefs its page's own key instead
        /// of the key of the granule its entry maps.
        ReleasePageKey,
        /// Asking for an lwbuf handle's address on another CPU makes (or
        /// finds) that CPU's entry for the page instead of its granule.
        ForeignPageKey,
        /// A page-cache miss inserts its filling entry without looking
        /// again under the shard lock, so two first uses both read.
        FillNoRecheck,
        /// The page-cache evictor checks "clean and unheld" under the
        /// entry's lock, lets go, and evicts later without checking again.
        EvictStaleCheck,
        /// A page-cache hit lets go of the shard's lock before it copies,
        /// so the page can be evicted and its frame refilled with another
        /// page under the copy.
        HitCopiesUnlocked,
        /// A page-cache revalidation that finds the file changed drops its
        /// pages without bumping the file's generation, so a fill that
        /// read the old bytes before it publishes them after the drop.
        StaleFillPublished,
        /// A failed page-cache fill marks its entries gone and wakes the
        /// waiters without taking the entries out of the map, so every
        /// later lookup of the page finds a gone entry and looks again.
        FailedFillMapped,
        /// A thread that gives back a pin taken in another thread's own
        /// row writes that row with a load and a store, as its owner does,
        /// instead of subtracting in its own shared row: the two writers
        /// race and one update is lost.
        ForeignUnpinPlain,
        /// A slot reservation reads a word of slot states and writes it
        /// back with the `BUSY` bits set in two steps instead of one
        /// read-modify-write, so two enters of one slot can both pass.
        ReserveNotAtomic,
        /// A thread claims a statistics stripe, and with it a row of pins,
        /// with a `Relaxed` CAS instead of an `AcqRel` one: it does not see
        /// the counts the last owner stored, and its load and store of the
        /// row can start from an old count and lose theirs.
        ClaimRelaxed,
    }

    std::thread_local! {
        // A std thread-local on purpose: loom runs every thread of a model
        // on the test's OS thread, so this reaches all of them and no other
        // test running in parallel.
        static ACTIVE: Cell<Option<Mutant>> = const { Cell::new(None) };
    }

    /// Switch a mutant on (or all off with `None`) for models run by the
    /// calling test thread.
    pub fn set(m: Option<Mutant>) {
        ACTIVE.with(|a| a.set(m));
    }

    pub(crate) fn is(m: Mutant) -> bool {
        ACTIVE.with(|a| a.get() == Some(m))
    }
}

#[cfg(loom)]
pub(crate) use mutants::Mutant;

/// Whether mutant `m` is on (always false outside loom).
#[cfg(loom)]
#[inline]
pub(crate) fn mutant_on(m: Mutant) -> bool {
    mutants::is(m)
}

#[cfg(not(loom))]
macro_rules! mutant {
    ($m:ident) => {
        false
    };
}
#[cfg(loom)]
macro_rules! mutant {
    ($m:ident) => {
        $crate::sync::mutant_on($crate::sync::Mutant::$m)
    };
}
pub(crate) use mutant;
