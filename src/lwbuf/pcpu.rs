//! One CPU's lwbuf cache (`lwbuf_pcpu`): the owner's state and the mailbox
//! other CPUs post to.
//!
//! [`Local`] is the owner's: `frame -> {slot, refcnt}`, the LRU of entries
//! whose count is zero (still mapped, so the next alloc is a hit), and the
//! slots this CPU took from the shared allocator. It sits behind a mutex that
//! only its owner takes in the common case (uncontended: one CAS, no shared
//! cache line); the mutex exists so that a CPU whose thread is idle or gone
//! can be drained and trimmed on its behalf. [`Pcpu::mailbox`] is the shared
//! part: decref messages from other CPUs.

use std::ptr::NonNull;

use crate::cpu::Mailbox;
use crate::cpu::Owned;
use crate::error::Error;
use crate::hash::WordMap;
pub(crate) use crate::kva::MapKey as Key;
use crate::kva::{KvaSpace, Mapping, SlotRun};
use crate::lru::Lru;
use crate::phys::Pfn;
use crate::sync::{env, AtomicU64};

#[derive(Debug)]
struct Entry {
    key: Key,
    refs: u32,
    /// `None` only while the entry is on the free list.
    mapping: Option<Mapping>,
}

/// Counters kept by the owner (under the cache lock).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counters {
    pub(crate) allocs: u64,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) foreign: u64,
    pub(crate) applied: u64,
    pub(crate) evictions: u64,
    pub(crate) peak_mapped: u64,
    pub(crate) unmap_errors: u64,
}

/// Why a lookup could not produce a mapping.
#[derive(Debug)]
pub(crate) enum Miss {
    /// No free slot, or no room under the mapping budget, and nothing of
    /// this CPU's to evict; other CPUs may have some to give back. The error
    /// says which ([`Error::WindowFull`] or [`Error::MapLimit`]/`ENOMEM`).
    NoRoom(Error),
    /// The MMU refused for another reason.
    Failed(Error),
}

/// The owner's half of a CPU's cache.
#[derive(Debug)]
pub(crate) struct Local {
    pub(crate) cpu: usize,
    map: WordMap<Key, u32>,
    entries: Vec<Entry>,
    free_entries: Vec<u32>,
    lru: Lru,
    /// Unmapped single slots this CPU holds for its next misses.
    free_slots: Vec<SlotRun>,
    /// The mailbox's spare vector, swapped in at each drain.
    spare: Vec<Key>,
    /// The error of the last unmap the MMU refused during the current miss,
    /// so that a miss that found nothing it could evict reports it rather
    /// than a full window.
    unmap_error: Option<Error>,
    pub(crate) c: Counters,
}

/// One CPU: its cache and its mailbox, each on its own cache lines.
#[derive(Debug)]
pub(crate) struct Pcpu {
    pub(crate) local: Owned<Local>,
    pub(crate) mailbox: Mailbox<Key>,
    /// Decref messages sent by threads bound to this CPU.
    pub(crate) sent: AtomicU64,
}

impl Pcpu {
    pub(crate) fn new(cpu: usize) -> Self {
        Pcpu { local: Owned::new(Local::new(cpu)), mailbox: Mailbox::default(), sent: AtomicU64::new(0) }
    }
}

impl Local {
    fn new(cpu: usize) -> Self {
        Local {
            cpu,
            map: WordMap::default(),
            entries: Vec::new(),
            free_entries: Vec::new(),
            lru: Lru::default(),
            free_slots: Vec::new(),
            spare: Vec::new(),
            unmap_error: None,
            c: Counters::default(),
        }
    }

    /// Entries mapped now (in use or cached).
    pub(crate) fn mapped(&self) -> usize {
        self.map.len()
    }

    /// Entries mapped and unused now.
    pub(crate) fn cached(&self) -> usize {
        self.lru.len()
    }

    /// Single slots held unmapped.
    pub(crate) fn free_slot_count(&self) -> usize {
        self.free_slots.len()
    }

    /// The frames mapped here with their slots and counts (for checks).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (Key, crate::mmu::Slot, u32)> + '_ {
        self.entries.iter().filter_map(|e| e.mapping.as_ref().map(|m| (e.key, m.slot(), e.refs)))
    }

    /// Apply every message in the mailbox, then enforce the excess limit.
    pub(crate) fn drain(&mut self, mailbox: &Mailbox<Key>, kva: &KvaSpace, max_excess: usize) {
        let mut msgs = std::mem::take(&mut self.spare);
        mailbox.take_all(&mut msgs);
        for key in msgs.drain(..) {
            let idx = *self.map.get(&key).unwrap_or_else(|| {
                panic!("lwbuf: decref message for {key:?} on CPU {} which has no such entry", self.cpu)
            });
            self.c.applied += 1;
            self.decref_idx(idx as usize);
        }
        self.spare = msgs;
        self.trim(kva, max_excess);
    }

    /// Find or create the entry for `key`, take a reference, and return its
    /// index and address. A hit makes no system call and no allocation.
    pub(crate) fn acquire(&mut self, kva: &KvaSpace, key: Key) -> std::result::Result<(u32, NonNull<u8>), Miss> {
        self.c.allocs += 1;
        if let Some(&idx) = self.map.get(&key) {
            let e = &mut self.entries[idx as usize];
            e.refs = e.refs.checked_add(1).expect("lwbuf: entry reference count overflow");
            if e.refs == 1 {
                self.lru.remove(idx as usize);
            }
            self.c.hits += 1;
            let addr = e.mapping.as_ref().expect("mapped entry").addr();
            return Ok((idx, addr));
        }
        self.c.misses += 1;
        let mapping = self.map_new(kva, key)?;
        let addr = mapping.addr();
        let entry = Entry { key, refs: 1, mapping: Some(mapping) };
        let idx = match self.free_entries.pop() {
            Some(i) => {
                self.entries[i as usize] = entry;
                i
            }
            None => {
                self.entries.push(entry);
                (self.entries.len() - 1) as u32
            }
        };
        self.map.insert(key, idx);
        self.c.peak_mapped = self.c.peak_mapped.max(self.map.len() as u64);
        Ok((idx, addr))
    }

    /// The address of the entry for `key`, which the caller holds a
    /// reference on.
    pub(crate) fn addr_of(&self, key: Key) -> NonNull<u8> {
        let idx = self.map[&key];
        self.entries[idx as usize].mapping.as_ref().expect("held entry is mapped").addr()
    }

    /// Map `key` into fresh slots: from this CPU's free slots, the shared
    /// allocator, or by evicting this CPU's least recently used entry. When
    /// the kernel refuses the mapping for lack of room (`ENOMEM`: the
    /// `vm.max_map_count` wall), evict a cached entry and try again.
    fn map_new(&mut self, kva: &KvaSpace, key: Key) -> std::result::Result<Mapping, Miss> {
        self.unmap_error = None;
        loop {
            let Some(run) = self.take_slots(kva, key.pages) else {
                // Every cached entry is in use, or the MMU refused to unmap
                // the one we tried: say which.
                let full = Error::WindowFull { requested: key.pages, capacity: kva.capacity() };
                return Err(Miss::NoRoom(self.unmap_error.take().unwrap_or(full)));
            };
            match kva.map(run, Pfn(key.pfn)) {
                Ok(m) => return Ok(m),
                Err((e, run)) => {
                    self.put_slots(kva, run);
                    if Mapping::no_room(&e) {
                        if self.evict_one(kva) {
                            continue;
                        }
                        return Err(Miss::NoRoom(e));
                    }
                    return Err(Miss::Failed(e));
                }
            }
        }
    }

    fn take_slots(&mut self, kva: &KvaSpace, pages: usize) -> Option<SlotRun> {
        if pages == 1 {
            loop {
                if let Some(s) = self.free_slots.pop() {
                    return Some(s);
                }
                if kva.take_batch(env::SLOT_BATCH, &mut self.free_slots) > 0 {
                    continue;
                }
                if !self.evict_one(kva) {
                    return None;
                }
            }
        }
        loop {
            if let Some(run) = kva.take(pages) {
                return Some(run);
            }
            // Our free singles may be what the run needs.
            if !self.free_slots.is_empty() {
                kva.give_batch(self.free_slots.drain(..));
                continue;
            }
            if !self.evict_one(kva) {
                return None;
            }
        }
    }

    /// Keep an unmapped claim: singles stay here, runs go back to the window.
    fn put_slots(&mut self, kva: &KvaSpace, run: SlotRun) {
        if run.len == 1 {
            self.free_slots.push(run);
            if self.free_slots.len() > 2 * env::SLOT_BATCH {
                let surplus = self.free_slots.len() - env::SLOT_BATCH;
                kva.give_batch(self.free_slots.drain(..surplus));
            }
        } else {
            kva.give(run);
        }
    }

    /// Drop one reference of entry `idx`; at zero the entry stays mapped on
    /// the LRU. The caller trims afterwards.
    pub(crate) fn decref_idx(&mut self, idx: usize) {
        let e = &mut self.entries[idx];
        assert!(
            e.refs > 0 && e.mapping.is_some(),
            "lwbuf: decref of unreferenced entry {:?} on CPU {}",
            e.key,
            self.cpu
        );
        e.refs -= 1;
        if e.refs == 0 {
            self.lru.push_back(idx);
        }
    }

    /// Drop one reference of the entry for `key`.
    pub(crate) fn decref_key(&mut self, key: Key) {
        let idx = *self.map.get(&key).unwrap_or_else(|| panic!("lwbuf: no entry {key:?} on CPU {}", self.cpu));
        self.decref_idx(idx as usize);
    }

    /// Evict least recently used unused entries beyond `max_excess`.
    pub(crate) fn trim(&mut self, kva: &KvaSpace, max_excess: usize) {
        while self.lru.len() > max_excess {
            if !self.evict_one(kva) {
                break;
            }
        }
    }

    /// Unmap the least recently used unused entry and keep its slots.
    /// Returns false when there is none or the MMU refused (the entry then
    /// stays cached and mapped, and the failure is counted).
    fn evict_one(&mut self, kva: &KvaSpace) -> bool {
        let Some(idx) = self.lru.pop_front() else { return false };
        let e = &mut self.entries[idx];
        debug_assert_eq!(e.refs, 0);
        let m = e.mapping.take().expect("cached entry is mapped");
        let key = e.key;
        self.map.remove(&key);
        // SAFETY: the entry's count is zero, so no handle holds it, and it is
        // out of the map, so no lookup can find it: nothing can reach the
        // address while it is unmapped.
        match unsafe { kva.unmap(m) } {
            Ok(run) => {
                self.free_entries.push(idx as u32);
                self.c.evictions += 1;
                self.put_slots(kva, run);
                true
            }
            Err((e, m)) => {
                // Still mapped: put it back as it was, most recently used so
                // the next eviction tries another one first.
                self.entries[idx].mapping = Some(m);
                self.map.insert(key, idx as u32);
                self.lru.push_back(idx);
                self.c.unmap_errors += 1;
                self.unmap_error = Some(e);
                false
            }
        }
    }

    /// The error of the last unmap the MMU refused, if any; clears it.
    pub(crate) fn take_unmap_error(&mut self) -> Option<Error> {
        self.unmap_error.take()
    }

    /// Evict every unused entry and give every free slot back to the
    /// window. Returns the number of slots given back.
    pub(crate) fn shrink(&mut self, kva: &KvaSpace) -> usize {
        let before = kva.free_slots();
        while self.evict_one(kva) {}
        kva.give_batch(self.free_slots.drain(..));
        kva.free_slots().saturating_sub(before)
    }

    /// Unmap everything, used or not (the system is going away and no handle
    /// can exist: they borrow it).
    pub(crate) fn teardown(&mut self, kva: &KvaSpace) {
        for e in &mut self.entries {
            if let Some(m) = e.mapping.take() {
                // SAFETY: the system is being dropped; handles borrow it, so
                // none is alive and nothing can reach the address.
                match unsafe { kva.unmap(m) } {
                    Ok(run) => kva.give(run),
                    Err((_, m)) => {
                        // The window unmaps everything when dropped.
                        let _ = m;
                    }
                }
            }
        }
        self.map.clear();
        self.lru = Lru::default();
        kva.give_batch(self.free_slots.drain(..));
    }
}

impl Miss {
    /// The error the caller sees.
    pub(crate) fn into_error(self) -> Error {
        match self {
            Miss::NoRoom(e) | Miss::Failed(e) => e,
        }
    }
}
