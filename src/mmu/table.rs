//! [`SlotTable`]: the state and counters both backends keep per slot, so
//! that `translate`, the stats, the one-allocator claim and the refusal to
//! enter over a live slot mean the same on both.

use super::{MmuStats, Slot};
use crate::error::{Error, Result};
use crate::phys::Pfn;
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Per-slot record of what is entered (`pfn + 1`, 0 for nothing, plus the
/// hole flag), two state bits per slot packed into words (entered, and an
/// enter under way), and the counters. Both backends keep one so
/// `translate` and the stats mean the same on both.
///
/// The state bits are what keep two enters of one slot apart and refuse an
/// enter over a live slot; packing them makes that one atomic
/// read-modify-write per word of slots instead of several per slot: for a
/// granule of 512 slots, 48 locked instructions for a map and its remove
/// (16 each for reserve, publish and remove) instead of 1,536, which on
/// huge pages cost more than the kernel's own work. The frame numbers are
/// then plain stores by the slots' owner.
#[derive(Debug)]
pub struct SlotTable {
    slots: Box<[AtomicUsize]>,
    /// `STATE_BITS` bits per slot, `PER_WORD` slots per word: `LIVE` (a
    /// frame is entered), `BUSY` (an enter or replace is under way).
    state: Box<[AtomicUsize]>,
    /// Slots whose record has `HOLE` set: while there are none (the
    /// usual case: holes are made only at the `vm.max_map_count` wall), no
    /// enter scans its slots for one. A slot's flag changes only under its
    /// owner, and the owner that made a hole counted it before giving the
    /// slot back through the caches' slot allocator, so the next owner's
    /// read of the count is never 0 while one of its slots is a hole.
    holes: AtomicUsize,
    /// One cache's slot allocator holds the window (see [`sealed::Sealed`]).
    claimed: AtomicBool,
    frames: usize,
    enters: AtomicU64,
    removes: AtomicU64,
    pages_entered: AtomicU64,
    pages_removed: AtomicU64,
    syscalls: AtomicU64,
    remove_fallbacks: AtomicU64,
    mapped: AtomicU64,
    replaces: AtomicU64,
    pages_replaced: AtomicU64,
}

/// The reservation of this slot was lost (it was `munmap`ped): the next
/// enter must not use `MAP_FIXED` blindly. A flag of the slot's record.
pub(crate) const HOLE: usize = 1 << (usize::BITS - 1);
const PFN_MASK: usize = !HOLE;

const STATE_BITS: usize = 2;
const PER_WORD: usize = usize::BITS as usize / STATE_BITS;
/// The `LIVE` bit of every slot of a word (`BUSY` is the bit above it).
const LIVE_BITS: usize = usize::MAX / 0b11;

/// The `LIVE` bits, in word `w` of `state`, of the slots of `slot..end`
/// (0 if none of them is in that word). Their `BUSY` bits are the mask
/// shifted left by one.
fn live_mask(w: usize, slot: usize, end: usize) -> usize {
    let lo = slot.max(w * PER_WORD);
    let hi = end.min((w + 1) * PER_WORD);
    if hi <= lo {
        return 0;
    }
    let (lo, hi) = (lo - w * PER_WORD, hi - w * PER_WORD);
    // Bits `lo * 2 .. hi * 2` of the word.
    let range = (usize::MAX >> (usize::BITS as usize - (hi - lo) * STATE_BITS)) << (lo * STATE_BITS);
    range & LIVE_BITS
}

/// The words of `state` that slots `slot..slot + count` touch, each with
/// their `LIVE` mask in it.
fn spans(slot: usize, count: usize) -> impl Iterator<Item = (usize, usize)> {
    let end = slot + count;
    (slot / PER_WORD..end.div_ceil(PER_WORD)).map(move |w| (w, live_mask(w, slot, end)))
}

/// The first slot of word `w` whose bits differ in `diff` (not 0).
fn first_slot(w: usize, diff: usize) -> usize {
    w * PER_WORD + diff.trailing_zeros() as usize / STATE_BITS
}

impl SlotTable {
    /// The table of a window of `capacity` slots over `frames` frames: 8
    /// bytes per slot plus its state bits, allocated zeroed (address space,
    /// made resident only as slots are used). [`Error::Config`] naming
    /// `"slots"` if the allocator refuses it.
    pub(crate) fn new(capacity: usize, frames: usize) -> Result<Self> {
        let (slots, state) = crate::sync::try_zeroed(capacity)
            .zip(crate::sync::try_zeroed(capacity.div_ceil(PER_WORD)))
            .ok_or_else(|| {
                Error::config(
                    "slots",
                    format!(
                        "{capacity} slots: the slot table ({} bytes) cannot be allocated",
                        capacity.saturating_mul(std::mem::size_of::<usize>())
                    ),
                )
            })?;
        Ok(SlotTable {
            slots,
            state,
            holes: AtomicUsize::new(0),
            claimed: AtomicBool::new(false),
            frames,
            enters: AtomicU64::new(0),
            removes: AtomicU64::new(0),
            pages_entered: AtomicU64::new(0),
            pages_removed: AtomicU64::new(0),
            syscalls: AtomicU64::new(0),
            remove_fallbacks: AtomicU64::new(0),
            mapped: AtomicU64::new(0),
            replaces: AtomicU64::new(0),
            pages_replaced: AtomicU64::new(0),
        })
    }

    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Reject ranges outside the window or the memory (a clear error, even
    /// though the callers are `unsafe`).
    pub(crate) fn check(&self, slot: Slot, pfn: Option<Pfn>, count: usize) -> Result<()> {
        if count == 0 || slot.0.checked_add(count).is_none_or(|e| e > self.slots.len()) {
            return Err(Error::config(
                "slot range",
                format!("slots {}..+{count} outside a window of {}", slot.0, self.slots.len()),
            ));
        }
        if let Some(p) = pfn {
            if p.0.checked_add(count).is_none_or(|e| e > self.frames) {
                return Err(Error::config(
                    "frame range",
                    format!("frames {}..+{count} outside a memory of {}", p.0, self.frames),
                ));
            }
        }
        Ok(())
    }

    /// Take the window for one slot allocator; see [`sealed::Sealed::claim`].
    pub(crate) fn claim(&self) -> Result<()> {
        // Acquire/Release: a cache that claims after another let go sees
        // that one's removes recorded.
        if self.claimed.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return Err(Error::WindowClaimed);
        }
        if self.mapped.load(Ordering::Acquire) != 0 {
            self.claimed.store(false, Ordering::Release);
            return Err(Error::WindowClaimed);
        }
        Ok(())
    }

    pub(crate) fn unclaim(&self) {
        self.claimed.store(false, Ordering::Release);
    }

    /// Set the `BUSY` bits of slots `slot..slot + count` if, word by word,
    /// `refuse(word, its state bits for those slots)` names no slot;
    /// otherwise undo the words already done and report the slot it names
    /// (the first offending one).
    fn reserve_with(&self, slot: Slot, count: usize, refuse: impl Fn(usize, usize) -> Option<usize>) -> Result<()> {
        for (w, live) in spans(slot.0, count) {
            let both = live | (live << 1);
            // Acquire on success: pairs with the Release of the `publish` or
            // `removed` that last changed the word, so this reserve's own
            // record stores come after that remove's (the records are
            // other atomics than the bits). The caches order these calls
            // through their slot allocator anyway.
            let r = if crate::sync::mutant!(ReserveNotAtomic) {
                let v = self.state[w].load(Ordering::Relaxed);
                match refuse(w, v & both) {
                    None => {
                        self.state[w].store(v | (live << 1), Ordering::Relaxed);
                        Ok(v)
                    }
                    Some(_) => Err(v),
                }
            } else {
                self.state[w].fetch_update(Ordering::Acquire, Ordering::Relaxed, |v| {
                    refuse(w, v & both).is_none().then_some(v | (live << 1))
                })
            };
            if let Err(v) = r {
                let bad = refuse(w, v & both).expect("a refused word names a slot");
                self.unreserve(slot, (w * PER_WORD).max(slot.0) - slot.0);
                return Err(Error::SlotOccupied { slot: bad });
            }
        }
        Ok(())
    }

    /// Mark `count` slots from `slot` as being entered, if none has a frame
    /// entered or an enter under way; otherwise change nothing and report
    /// the first such slot. Undo with [`unreserve`](Self::unreserve), or
    /// complete with [`entered`](Self::entered).
    pub(crate) fn reserve(&self, slot: Slot, count: usize) -> Result<()> {
        self.reserve_with(slot, count, |w, bits| (bits != 0).then(|| first_slot(w, bits)))
    }

    /// Mark `count` slots from `slot` as being entered in place of a
    /// mapping in the first `old` of them (`old <= count`): those must have
    /// a frame entered, the rest must be empty and not holes, and none may
    /// have an enter under way. Otherwise change nothing and report the
    /// first offending slot. Complete with [`replaced`](Self::replaced) or
    /// undo with [`unreserve`](Self::unreserve).
    pub(crate) fn reserve_replace(&self, slot: Slot, count: usize, old: usize) -> Result<()> {
        debug_assert!(old <= count);
        // Holes are made only by a remove of the slots' owner, which is the
        // caller: a plain look suffices.
        if self.may_have_holes() {
            if let Some(i) = (slot.0..slot.0 + count).find(|&i| self.is_hole(i)) {
                return Err(Error::SlotOccupied { slot: i });
            }
        }
        self.reserve_with(slot, count, |w, bits| {
            // Wanted: exactly the old mapping's slots live, nothing busy.
            let diff = bits ^ live_mask(w, slot.0, slot.0 + old);
            (diff != 0).then(|| first_slot(w, diff))
        })
    }

    /// Record a replace of slots [`reserve_replace`](Self::reserve_replace)d
    /// for it.
    pub(crate) fn replaced(&self, slot: Slot, pfn: Pfn, count: usize, old: usize) {
        self.publish(slot, pfn, count, old);
        self.enters.fetch_add(1, Ordering::Relaxed);
        self.replaces.fetch_add(1, Ordering::Relaxed);
        self.pages_entered.fetch_add(count as u64, Ordering::Relaxed);
        self.pages_replaced.fetch_add(old as u64, Ordering::Relaxed);
        self.mapped.fetch_add((count - old) as u64, Ordering::Relaxed);
    }

    /// Store the frames of reserved slots `slot..slot + count`, of which the
    /// first `old` were live already, and turn their `BUSY` bits into `LIVE`.
    fn publish(&self, slot: Slot, pfn: Pfn, count: usize, old: usize) {
        // Release: publishes the mapping to `translate` readers.
        self.store_records(slot, count, |i| pfn.0 + 1 + i, Ordering::Release);
        for (w, live) in spans(slot.0, count) {
            let was = live_mask(w, slot.0, slot.0 + old);
            // Clear BUSY, set LIVE where it was not: one XOR. Release: pairs
            // with a later reserve's Acquire of the word.
            let prev = self.state[w].fetch_xor((live << 1) | (live & !was), Ordering::Release);
            debug_assert_eq!(prev & (live | (live << 1)), (live << 1) | was, "publish of slots not reserved");
        }
    }

    /// Undo [`reserve`](Self::reserve) of `count` slots from `slot`.
    pub(crate) fn unreserve(&self, slot: Slot, count: usize) {
        if count == 0 {
            return;
        }
        for (w, live) in spans(slot.0, count) {
            self.state[w].fetch_and(!(live << 1), Ordering::Relaxed);
        }
    }

    pub(crate) fn translate(&self, slot: Slot) -> Option<Pfn> {
        let v = self.slots.get(slot.0)?.load(Ordering::Acquire) & PFN_MASK;
        v.checked_sub(1).map(Pfn)
    }

    pub(crate) fn any_hole(&self, slot: Slot, count: usize) -> bool {
        self.may_have_holes()
            && self.slots[slot.0..slot.0 + count].iter().any(|s| s.load(Ordering::Relaxed) & HOLE != 0)
    }

    /// Whether any slot may be a hole (see `holes`). Relaxed: a hole in
    /// the caller's own slots was counted before they became the caller's.
    #[inline]
    fn may_have_holes(&self) -> bool {
        self.holes.load(Ordering::Relaxed) != 0
    }

    /// Store `record(i)` in the record of slot `slot + i`, for `i <
    /// count`, keeping `holes` exact: plain stores while there are no
    /// holes, swaps (to see which flags went) otherwise.
    fn store_records(&self, slot: Slot, count: usize, record: impl Fn(usize) -> usize, order: Ordering) {
        let recs = &self.slots[slot.0..slot.0 + count];
        if !self.may_have_holes() && record(0) & HOLE == 0 {
            for (i, s) in recs.iter().enumerate() {
                s.store(record(i), order);
            }
            return;
        }
        let (mut made, mut gone) = (0, 0);
        for (i, s) in recs.iter().enumerate() {
            let new = record(i);
            let was = s.swap(new, order);
            match (was & HOLE != 0, new & HOLE != 0) {
                (false, true) => made += 1,
                (true, false) => gone += 1,
                _ => {}
            }
        }
        if made > gone {
            self.holes.fetch_add(made - gone, Ordering::Relaxed);
        } else if gone > made {
            self.holes.fetch_sub(gone - made, Ordering::Relaxed);
        }
    }

    pub(crate) fn is_hole(&self, slot: usize) -> bool {
        self.slots[slot].load(Ordering::Relaxed) & HOLE != 0
    }

    /// Record an enter of slots [`reserve`](Self::reserve)d for it.
    pub(crate) fn entered(&self, slot: Slot, pfn: Pfn, count: usize) {
        self.publish(slot, pfn, count, 0);
        self.enters.fetch_add(1, Ordering::Relaxed);
        self.pages_entered.fetch_add(count as u64, Ordering::Relaxed);
        self.mapped.fetch_add(count as u64, Ordering::Relaxed);
    }

    /// Record a remove; returns whether any slot was empty (a caller bug).
    pub(crate) fn removed(&self, slot: Slot, count: usize, keep_hole: bool) -> bool {
        let new = if keep_hole { HOLE } else { 0 };
        // Release: as `publish`'s.
        self.store_records(slot, count, |_| new, Ordering::Release);
        let mut was_mapped = 0;
        for (w, live) in spans(slot.0, count) {
            let prev = self.state[w].fetch_and(!live, Ordering::Release);
            was_mapped += (prev & live).count_ones() as usize;
        }
        self.removes.fetch_add(1, Ordering::Relaxed);
        self.pages_removed.fetch_add(count as u64, Ordering::Relaxed);
        // Only what was mapped: removing an empty slot is a caller bug the
        // model reports, and must not wrap the counter.
        self.mapped.fetch_sub(was_mapped as u64, Ordering::Relaxed);
        was_mapped < count
    }

    pub(crate) fn syscall(&self) {
        self.syscalls.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn fallback(&self) {
        self.remove_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> MmuStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MmuStats {
            enters: r(&self.enters),
            removes: r(&self.removes),
            pages_entered: r(&self.pages_entered),
            pages_removed: r(&self.pages_removed),
            syscalls: r(&self.syscalls),
            remove_fallbacks: r(&self.remove_fallbacks),
            mapped: r(&self.mapped),
            replaces: r(&self.replaces),
            pages_replaced: r(&self.pages_replaced),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn live_masks_cover_exactly_the_slots() {
        let end_bits = |m: usize| (m.trailing_zeros() as usize / STATE_BITS, m.count_ones() as usize);
        assert_eq!(live_mask(0, 0, 1), 1);
        assert_eq!(end_bits(live_mask(0, 3, 7)), (3, 4));
        // A whole word, and ranges that start or end in another word.
        assert_eq!(live_mask(0, 0, PER_WORD), LIVE_BITS);
        assert_eq!(live_mask(1, 0, 3 * PER_WORD), LIVE_BITS);
        assert_eq!(end_bits(live_mask(1, PER_WORD - 2, PER_WORD + 3)), (0, 3));
        assert_eq!(end_bits(live_mask(0, PER_WORD - 2, PER_WORD + 3)), (PER_WORD - 2, 2));
        assert_eq!(live_mask(2, 0, PER_WORD), 0);
        assert_eq!(live_mask(0, PER_WORD, 2 * PER_WORD), 0);
        // Every range of a few words: the masks of `spans` name each slot
        // once, and no other.
        // Fewer under Miri, where each range costs far more.
        let reach = if cfg!(miri) { PER_WORD + 3 } else { 3 * PER_WORD };
        for slot in (0..reach).step_by(if cfg!(miri) { 7 } else { 1 }) {
            for count in 1..reach {
                let mut seen = Vec::new();
                for (w, m) in spans(slot, count) {
                    assert_eq!(m & !LIVE_BITS, 0);
                    let mut m = m;
                    while m != 0 {
                        seen.push(first_slot(w, m));
                        m &= m - 1;
                    }
                }
                assert_eq!(seen, (slot..slot + count).collect::<Vec<_>>(), "slots {slot}+{count}");
            }
        }
    }

    #[test]
    fn reserve_refuses_the_first_busy_or_live_slot_and_changes_nothing() {
        let t = SlotTable::new(4 * PER_WORD, 1 << 20).expect("table");
        let a = Slot(PER_WORD - 3);
        t.reserve(a, 5).unwrap();
        t.entered(a, Pfn(100), 5);
        assert_eq!(t.translate(Slot(PER_WORD + 1)), Some(Pfn(104)));
        assert_eq!(t.stats().mapped, 5);
        // Over the live range, from before and from inside it.
        assert!(matches!(t.reserve(Slot(0), PER_WORD), Err(Error::SlotOccupied { slot }) if slot == PER_WORD - 3));
        assert!(matches!(t.reserve(Slot(PER_WORD + 1), 10), Err(Error::SlotOccupied { slot }) if slot == PER_WORD + 1));
        // A refused reserve that crossed a word left nothing busy: the
        // slots before the live range can be reserved.
        t.reserve(Slot(0), PER_WORD - 3).unwrap();
        // An enter under way refuses too.
        assert!(matches!(t.reserve(Slot(4), 1), Err(Error::SlotOccupied { slot: 4 })));
        t.unreserve(Slot(0), PER_WORD - 3);
        t.reserve(Slot(4), 1).unwrap();
        t.unreserve(Slot(4), 1);
        // Removing frees the slots; a remove of empty slots is reported.
        assert!(!t.removed(a, 5, false));
        assert_eq!(t.stats().mapped, 0);
        assert!(t.removed(a, 5, false));
        assert_eq!(t.stats().mapped, 0);
        t.reserve(Slot(0), 4 * PER_WORD).unwrap();
        t.entered(Slot(0), Pfn(0), 4 * PER_WORD);
        assert_eq!(t.stats().mapped, 4 * PER_WORD as u64);
        assert!(!t.removed(Slot(0), 4 * PER_WORD, false));
    }

    #[test]
    fn reserve_replace_wants_exactly_the_old_mapping() {
        let t = SlotTable::new(3 * PER_WORD, 1 << 20).expect("table");
        let s = Slot(PER_WORD - 2);
        t.reserve(s, 4).unwrap();
        t.entered(s, Pfn(10), 4);
        // Longer than the old mapping into empty slots: fine.
        t.reserve_replace(s, 6, 4).unwrap();
        t.replaced(s, Pfn(50), 6, 4);
        assert_eq!(t.translate(Slot(PER_WORD + 3)), Some(Pfn(55)));
        assert_eq!(t.stats().mapped, 6);
        // Claiming fewer old slots than are live, or more: refused at the
        // first slot that differs, nothing left busy.
        assert!(matches!(t.reserve_replace(s, 8, 5), Err(Error::SlotOccupied { slot }) if slot == PER_WORD + 3));
        assert!(matches!(t.reserve_replace(s, 8, 7), Err(Error::SlotOccupied { slot }) if slot == PER_WORD + 4));
        t.reserve_replace(s, 8, 6).unwrap();
        t.unreserve(s, 8);
        // A hole is refused.
        assert!(!t.removed(Slot(PER_WORD + 2), 2, true));
        assert!(t.is_hole(PER_WORD + 2));
        assert!(matches!(t.reserve_replace(s, 6, 4), Err(Error::SlotOccupied { slot }) if slot == PER_WORD + 2));
        // A plain reserve may enter a hole (the window maps it without
        // replacing); entering clears the flag.
        t.reserve(Slot(PER_WORD + 2), 2).unwrap();
        t.entered(Slot(PER_WORD + 2), Pfn(7), 2);
        assert!(!t.is_hole(PER_WORD + 2));
        assert_eq!(t.stats().mapped, 6);
    }

    #[test]
    fn hole_count_follows_the_flags() {
        let t = SlotTable::new(2 * PER_WORD, 1 << 20).expect("table");
        let s = Slot(PER_WORD - 3);
        t.reserve(s, 6).unwrap();
        t.entered(s, Pfn(0), 6);
        assert!(!t.any_hole(Slot(0), 2 * PER_WORD));
        // Two holes made; the scan finds them, and only where they are.
        assert!(!t.removed(Slot(PER_WORD - 1), 2, true));
        assert_eq!(t.holes.load(Ordering::Relaxed), 2);
        assert!(t.any_hole(s, 6));
        assert!(!t.any_hole(s, 2));
        // Made again over themselves (a remove of holes: a caller bug the
        // table reports), they are still two.
        assert!(t.removed(Slot(PER_WORD - 1), 2, true));
        assert_eq!(t.holes.load(Ordering::Relaxed), 2);
        // One entered (the window maps a hole without replacing), then a
        // plain remove of the rest: none left, and the scans stop.
        t.reserve(Slot(PER_WORD - 1), 1).unwrap();
        t.entered(Slot(PER_WORD - 1), Pfn(9), 1);
        assert_eq!(t.holes.load(Ordering::Relaxed), 1);
        assert!(t.removed(Slot(PER_WORD - 3), 5, false));
        assert_eq!(t.holes.load(Ordering::Relaxed), 0);
        assert!(!t.any_hole(Slot(0), 2 * PER_WORD));
        assert!((0..2 * PER_WORD).all(|i| !t.is_hole(i)));
    }

    #[test]
    fn racing_reserves_of_overlapping_ranges_never_both_win() {
        let t = std::sync::Arc::new(SlotTable::new(2 * PER_WORD, 1 << 20).expect("table"));
        let ranges = [(PER_WORD - 4, 6), (PER_WORD - 1, 4)];
        for _ in 0..if cfg!(miri) { 8 } else { 2000 } {
            let wins: Vec<bool> = std::thread::scope(|sc| {
                let hs: Vec<_> = ranges
                    .iter()
                    .map(|&(s, n)| {
                        let t = &t;
                        sc.spawn(move || t.reserve(Slot(s), n).is_ok())
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(!(wins[0] && wins[1]), "two reserves of slot {} both passed", PER_WORD - 1);
            for (&(s, n), won) in ranges.iter().zip(wins) {
                if won {
                    t.unreserve(Slot(s), n);
                }
            }
            // Everything is free again.
            t.reserve(Slot(0), 2 * PER_WORD).unwrap();
            t.unreserve(Slot(0), 2 * PER_WORD);
        }
    }
}
