//! `Owned`: per-CPU state that its owner enters without atomic
//! read-modify-write instructions, and that others may *steal* (take over
//! briefly) when the owner is idle or gone.
//!
//! This is the userspace stand-in for "disable preemption and touch your
//! CPU's data": the owner of a CPU (the thread bound to it) marks itself
//! inside (`inside = true`), and a stealer marks itself stealing
//! (`stealing = true`); each then reads the other's flag. That is Dekker's
//! handshake, and it needs a store-load barrier on both sides. The owner's
//! side is the hot path, so the barrier is split asymmetrically: the owner
//! issues only a compiler barrier, and the stealer issues
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes every running
//! thread of the process execute a full memory barrier (Linux 4.14+). If
//! the kernel lacks it, both sides use a full `SeqCst` fence instead; so do
//! they under Miri (see the `barrier` module of the sync facade for why that
//! is the sound stand-in).
//!
//! Outcome of the handshake: either the stealer sees the owner inside (and
//! backs off or waits for it to leave), or the owner sees the stealer (and
//! waits on the steal lock before entering). The owner's `inside = false` is
//! a Release store and the stealer's read an Acquire load, so a stealer sees
//! everything the owner did; the stealer's `stealing = false` is a Release
//! store and the owner's check an Acquire load, so the owner sees everything
//! the stealer did. Stealers serialize on a mutex.
//!
//! Under loom the whole thing is a mutex (loom cannot run `membarrier`), so
//! the models check the protocols built on top of it.

use std::ops::{Deref, DerefMut};

#[cfg(not(loom))]
use crate::sync::barrier;

#[cfg(not(loom))]
use crate::sync::{lock, try_lock, AtomicBool, Mutex, MutexGuard, Ordering, UnsafeCell};
#[cfg(loom)]
use crate::sync::{lock, try_lock, Mutex, MutexGuard};

/// Per-CPU state with an owner fast path and stealing.
#[derive(Debug)]
pub(crate) struct Owned<T> {
    #[cfg(not(loom))]
    value: UnsafeCell<T>,
    #[cfg(not(loom))]
    inside: AtomicBool,
    #[cfg(not(loom))]
    stealing: AtomicBool,
    #[cfg(not(loom))]
    steal_lock: Mutex<()>,
    #[cfg(loom)]
    value: Mutex<T>,
}

// SAFETY: access to `value` is exclusive: the owner enters only when no
// stealer holds it, stealers only when the owner is outside, and stealers
// exclude each other with `steal_lock` (module docs).
#[cfg(not(loom))]
unsafe impl<T: Send> Sync for Owned<T> {}

/// Access as the owner (the thread bound to the CPU).
pub(crate) struct OwnerGuard<'a, T> {
    #[cfg(not(loom))]
    cell: &'a Owned<T>,
    #[cfg(loom)]
    guard: MutexGuard<'a, T>,
}

/// Access as a stealer, on the owner's behalf.
pub(crate) struct StealGuard<'a, T> {
    #[cfg(not(loom))]
    cell: &'a Owned<T>,
    #[cfg(not(loom))]
    _lock: MutexGuard<'a, ()>,
    #[cfg(loom)]
    guard: MutexGuard<'a, T>,
}

#[cfg(not(loom))]
impl<T> Owned<T> {
    pub(crate) fn new(v: T) -> Self {
        barrier::init();
        Owned {
            value: UnsafeCell::new(v),
            inside: AtomicBool::new(false),
            stealing: AtomicBool::new(false),
            steal_lock: Mutex::new(()),
        }
    }

    /// Enter as the owner. The caller must be the only thread that calls
    /// `owner` on this cell at a time (the CPU binding guarantees it). No
    /// atomic read-modify-write: two plain stores and one load.
    #[inline(always)]
    pub(crate) fn owner(&self) -> OwnerGuard<'_, T> {
        match self.try_owner() {
            Some(g) => g,
            None => self.owner_after_steal(),
        }
    }

    /// Announce the owner and look for a stealer: the guard if there is
    /// none, else `None` with `inside` still set (the caller steps out).
    #[inline(always)]
    fn try_owner(&self) -> Option<OwnerGuard<'_, T>> {
        self.inside.store(true, Ordering::Relaxed);
        barrier::light();
        // Acquire: pairs with the Release that ends a steal.
        (!self.stealing.load(Ordering::Acquire)).then_some(OwnerGuard { cell: self })
    }

    /// `owner` when a stealer is (or may be) inside: step out, wait for it,
    /// and try again.
    #[cold]
    #[inline(never)]
    fn owner_after_steal(&self) -> OwnerGuard<'_, T> {
        loop {
            self.inside.store(false, Ordering::Release);
            drop(lock(&self.steal_lock));
            if let Some(g) = self.try_owner() {
                return g;
            }
        }
    }

    /// Enter as a stealer. With `wait`, wait for the owner to leave (owner
    /// sections are short); without, give up if the owner is inside or
    /// another stealer holds the cell. Costs a `membarrier` system call,
    /// unless `unowned()` says (under the steal lock) that no thread owns
    /// the cell: a new owner calls [`owner_arrives`](Self::owner_arrives)
    /// before it first enters, which waits for us.
    pub(crate) fn steal_if(&self, wait: bool, unowned: impl FnOnce() -> bool) -> Option<StealGuard<'_, T>> {
        let g = if wait { lock(&self.steal_lock) } else { try_lock(&self.steal_lock)? };
        if unowned() {
            return Some(StealGuard { cell: self, _lock: g });
        }
        self.stealing.store(true, Ordering::Relaxed);
        loop {
            barrier::heavy();
            // Acquire: pairs with the owner's Release when it leaves.
            if !self.inside.load(Ordering::Acquire) {
                return Some(StealGuard { cell: self, _lock: g });
            }
            if !wait {
                self.stealing.store(false, Ordering::Release);
                return None;
            }
            std::thread::yield_now();
        }
    }
}

#[cfg(not(loom))]
impl<T> Owned<T> {
    /// Called by a thread that has just become the owner, before it first
    /// enters: waits out any stealer that took the cell as unowned.
    pub(crate) fn owner_arrives(&self) {
        drop(lock(&self.steal_lock));
    }
}

#[cfg(loom)]
impl<T> Owned<T> {
    pub(crate) fn owner_arrives(&self) {}

    pub(crate) fn steal_if(&self, wait: bool, _unowned: impl FnOnce() -> bool) -> Option<StealGuard<'_, T>> {
        self.steal(wait)
    }

    pub(crate) fn new(v: T) -> Self {
        Owned { value: Mutex::new(v) }
    }

    pub(crate) fn owner(&self) -> OwnerGuard<'_, T> {
        OwnerGuard { guard: lock(&self.value) }
    }

    pub(crate) fn steal(&self, wait: bool) -> Option<StealGuard<'_, T>> {
        let guard = if wait { lock(&self.value) } else { try_lock(&self.value)? };
        Some(StealGuard { guard })
    }
}

#[cfg(not(loom))]
impl<T> Drop for OwnerGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // Release: a stealer that sees us outside sees all we did.
        self.cell.inside.store(false, Ordering::Release);
    }
}

#[cfg(not(loom))]
impl<T> Drop for StealGuard<'_, T> {
    fn drop(&mut self) {
        // Release: the owner that sees no stealer sees all we did. The lock
        // is released after this (field order), letting waiters in.
        self.cell.stealing.store(false, Ordering::Release);
    }
}

macro_rules! deref_guard {
    ($g:ident) => {
        impl<T> Deref for $g<'_, T> {
            type Target = T;
            #[inline]
            fn deref(&self) -> &T {
                #[cfg(not(loom))]
                // SAFETY: the guard's existence means exclusive access (see
                // `Owned`'s Sync impl).
                return self.cell.value.with(|p| unsafe { &*p });
                #[cfg(loom)]
                return &self.guard;
            }
        }
        impl<T> DerefMut for $g<'_, T> {
            #[inline]
            fn deref_mut(&mut self) -> &mut T {
                #[cfg(not(loom))]
                // SAFETY: as for `deref`; `&mut self` makes it unique.
                return self.cell.value.with_mut(|p| unsafe { &mut *p });
                #[cfg(loom)]
                return &mut self.guard;
            }
        }
    };
}
deref_guard!(OwnerGuard);
deref_guard!(StealGuard);
