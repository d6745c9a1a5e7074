//! One entry per window slot: the state word (`state.rs`), the key and
//! address of the mapping it caches, and the mapping itself. Meaningful at
//! the first slot of a mapping.
//!
//! The mapping has one owner at a time, handed over by the state word and
//! the map's shard lock: the thread that took the free slot writes it
//! before publishing the entry (insert under the write lock, `miss.rs`, 4),
//! the evictor that killed it (`DEAD` and removed from the map in one step
//! under the same lock, `miss.rs`, 2) takes it, a miss that lost the insert
//! race takes back its never-published one, and the pool's `Drop` has
//! `&mut`.

use crate::kva::{MapKey, Mapping};
use crate::sync::{AtomicPtr, AtomicUsize, Ordering, UnsafeCell};

use super::state::{AtomicState, Snapshot};

pub(super) struct Entry {
    pub(super) state: AtomicState,
    /// The key, written before the entry is published in the map.
    pub(super) pfn: AtomicUsize,
    pub(super) pages: AtomicUsize,
    pub(super) addr: AtomicPtr<u8>,
    /// Written by the thread that maps the entry before it publishes it,
    /// taken by the evictor that killed it: never two at once (the module
    /// docs).
    pub(super) mapping: UnsafeCell<Option<Mapping>>,
}

// SAFETY: every field but `mapping` is atomic. `mapping` has one owner at a
// time, handed over by the state word and the map's shard lock (the module
// docs): no two threads ever touch it at once.
unsafe impl Sync for Entry {}

impl Entry {
    pub(super) fn new() -> Self {
        Entry {
            state: AtomicState::new(),
            pfn: AtomicUsize::new(0),
            pages: AtomicUsize::new(0),
            addr: AtomicPtr::new(std::ptr::null_mut()),
            mapping: UnsafeCell::new(None),
        }
    }

    /// The key. Relaxed: read after an Acquire of the state word that
    /// published it (`hit.rs`, 7), or under the map's shard lock.
    #[inline]
    pub(super) fn key(&self) -> MapKey {
        MapKey { pfn: self.pfn.load(Ordering::Relaxed), pages: self.pages.load(Ordering::Relaxed) }
    }

    /// Take a reference on a live entry (caller holds its shard's lock and
    /// found it in the map: `hit.rs`, 1). Returns whether the entry was
    /// unused before, and the new state.
    #[inline]
    pub(super) fn bump(&self) -> (bool, Snapshot) {
        let live = |s: Snapshot| {
            debug_assert!(!s.is_dead(), "sf_buf: bump of a dead entry");
            true
        };
        self.state.take_ref(self.state.load(Ordering::Relaxed), live).expect("an entry in the map is live")
    }
}
