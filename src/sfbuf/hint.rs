//! The hint table of the lock-free hit (`hit.rs`, 6-7; `state.rs`, 5, 8):
//! "generation g of slot s was published for this frame", looked up by
//! frame number without a lock.
//!
//! Its size follows the window, not the memory: two buckets of two hints
//! per slot (32 bytes a slot, at least 64 buckets), fixed when the pool is
//! built, so nothing is allocated, published or freed while readers run. A
//! frame's bucket is its frame number when the memory has no more frames
//! than the table has buckets (one bucket per frame: the table is *exact*),
//! and otherwise its low bits folded with a multiplicative hash of the rest,
//! so that frames of one aligned block of `buckets` never share a bucket
//! and strided frames spread. A hint also carries a *tag* of the frame
//! number's high bits, so a frame passes over its bucket-mate's hint
//! without touching that mapping's entry.
//!
//! Sharing a bucket only costs hits: a hint read for a frame may name
//! another frame of the same bucket and tag (a tag has fewer bits than a
//! frame number), so a hit that took a reference through a hint checks the
//! entry's key (`hit.rs`, 7) and gives the reference back if it is not
//! the wanted frame. Two frames hot at once in one bucket keep one way each;
//! a third pushes the older one out, which then hits through the map.
//!
//! Word layout: the generation in the high half (as in the entry's state
//! word), then the tag, then `slot + 1` in the low `slot_bits` bits (0: no
//! hint).

use crate::sync::{env, AtomicU64, Ordering};

/// Hints per bucket, in adjacent words (one cache line).
const WAYS: usize = 2;
/// Buckets per slot of the window.
const BUCKETS_PER_SLOT: usize = 2;
/// The fewest buckets of a table that is not exact.
const MIN_BUCKETS: usize = 64;
/// The low half of a word: tag and slot.
const LOW: u64 = (1 << 32) - 1;
/// Fibonacci hashing's multiplier (2^64 / golden ratio, odd).
const FIB: u64 = 0x9e37_79b9_7f4a_7c15;

/// What a frame's hint says: generation `gen` (in the high half, as in the
/// entry's state word) of `slot` was published for a frame of this bucket
/// and tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Hint {
    pub(super) slot: u32,
    pub(super) gen: u64,
}

/// The table. Every access is `Relaxed`: a hint is a guess, and the
/// Acquire CAS on the entry it names is what orders the mapping's fields.
pub(super) struct Hints {
    words: Box<[AtomicU64]>,
    /// `buckets - 1` (buckets: a power of two).
    mask: usize,
    /// `log2(buckets)`, at least 1.
    bits: u32,
    /// `64 - bits`: shifts a hash down to a bucket number.
    hash_shift: u32,
    /// The low bits that hold `slot + 1`.
    slot_bits: u32,
    slot_mask: u64,
    /// The bits of the low half above the slot: the tag.
    tag_mask: u64,
}

impl Hints {
    /// A table for a window of `slots` slots (at most `u32::MAX - 1`) over
    /// a memory of `frames` frames: one bucket per frame when that is
    /// smaller, and always under loom (whose models skip the key check that
    /// a shared bucket needs, see `env::HINTS_EXACT`). Allocated zeroed;
    /// `Err` with the bytes asked for if the allocator refuses them.
    pub(super) fn new(slots: usize, frames: usize) -> Result<Hints, usize> {
        debug_assert!(slots < u32::MAX as usize, "slot + 1 must fit the low half");
        let exact = frames.max(2).checked_next_power_of_two().unwrap_or(1 << (usize::BITS - 1));
        let by_slots = slots.saturating_mul(BUCKETS_PER_SLOT).max(MIN_BUCKETS).next_power_of_two();
        let buckets = if env::HINTS_EXACT { exact } else { exact.min(by_slots) };
        let bits = buckets.trailing_zeros();
        let slot_bits = u64::BITS - (slots as u64).leading_zeros();
        let slot_mask = (1u64 << slot_bits) - 1;
        let n = buckets.saturating_mul(WAYS);
        let words = crate::sync::try_zeroed::<AtomicU64>(n).ok_or(n.saturating_mul(8))?;
        Ok(Hints {
            words,
            mask: buckets - 1,
            bits,
            hash_shift: u64::BITS - bits,
            slot_bits,
            slot_mask,
            tag_mask: LOW & !slot_mask,
        })
    }

    /// The first word of `pfn`'s bucket, and its tag (in place).
    #[inline(always)]
    fn place(&self, pfn: usize) -> (usize, u64) {
        // Frames below the table's size (every frame of an exact table) are
        // their own bucket, tag 0: what the fold below gives them, without
        // the multiply on the way to the load.
        if pfn <= self.mask {
            return (pfn * WAYS, 0);
        }
        let high = (pfn >> self.bits) as u64;
        let fold = (high.wrapping_mul(FIB) >> self.hash_shift) as usize;
        let bucket = (pfn ^ fold) & self.mask;
        (bucket * WAYS, (high << self.slot_bits) & self.tag_mask)
    }

    #[inline(always)]
    fn is_for(&self, w: u64, tag: u64) -> bool {
        w & self.slot_mask != 0 && w & self.tag_mask == tag
    }

    #[inline(always)]
    fn hint_of(&self, w: u64) -> Hint {
        Hint { slot: (w & self.slot_mask) as u32 - 1, gen: w & !LOW }
    }

    /// The hint for `pfn`, if its bucket holds one with its tag: one load
    /// (two when the first way holds a bucket-mate's hint).
    #[inline(always)]
    pub(super) fn get(&self, pfn: usize) -> Option<Hint> {
        let (i, tag) = self.place(pfn);
        let w = self.words[i].load(Ordering::Relaxed);
        if self.is_for(w, tag) {
            return Some(self.hint_of(w));
        }
        // The first way is filled first and never emptied: empty, the
        // bucket is.
        if w & self.slot_mask == 0 {
            return None;
        }
        let w = self.words[i + 1].load(Ordering::Relaxed);
        self.is_for(w, tag).then(|| self.hint_of(w))
    }

    /// Record that generation `gen` of `slot` maps `pfn`. `live` says
    /// whether a hint still names a live generation: a way is taken over
    /// if it is empty, has this frame's tag, or is dead; with both ways
    /// live for other frames, the newer moves to the second way and the
    /// older is dropped. Written only when it changes: the bucket's line
    /// is read by every hit.
    pub(super) fn set(&self, pfn: usize, slot: u32, gen: u64, live: impl Fn(Hint) -> bool) {
        debug_assert_eq!(gen & LOW, 0, "a generation lives in the high half");
        let (i, tag) = self.place(pfn);
        let v = gen | tag | (slot as u64 + 1);
        let free = |w: u64| w & self.slot_mask == 0 || w & self.tag_mask == tag || !live(self.hint_of(w));
        let w0 = self.words[i].load(Ordering::Relaxed);
        if w0 == v {
            return;
        }
        if free(w0) {
            self.words[i].store(v, Ordering::Relaxed);
            return;
        }
        let w1 = self.words[i + 1].load(Ordering::Relaxed);
        if w1 == v {
            return;
        }
        if !free(w1) {
            // A reader between the two stores sees the older hint twice or
            // not at all: a missed hint, which the map serves.
            self.words[i + 1].store(w0, Ordering::Relaxed);
            self.words[i].store(v, Ordering::Relaxed);
            return;
        }
        self.words[i + 1].store(v, Ordering::Relaxed);
    }

    /// Bytes of the table (for tests and the docs' claims).
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.words.len() * std::mem::size_of::<AtomicU64>()
    }

    /// A frame other than `pfn`, below `frames`, of the same bucket and the
    /// same tag (only a key check tells their hints apart), if there is one
    /// at the next tag period.
    #[cfg(test)]
    pub(super) fn twin(&self, pfn: usize, frames: usize) -> Option<usize> {
        let tag_bits = (self.tag_mask >> self.slot_bits).count_ones();
        let high = (pfn >> self.bits).checked_add(1usize.checked_shl(tag_bits)?)?;
        let fold = |h: usize| ((h as u64).wrapping_mul(FIB) >> self.hash_shift) as usize;
        let low = (pfn ^ fold(pfn >> self.bits) ^ fold(high)) & self.mask;
        let twin = high.checked_shl(self.bits)? | low;
        debug_assert_eq!(self.place(twin), self.place(pfn));
        (twin < frames && twin >> self.bits == high).then_some(twin)
    }

    /// Whether every frame has a bucket of its own.
    #[cfg(test)]
    pub(super) fn is_exact(&self, frames: usize) -> bool {
        frames <= self.mask + 1
    }
}

impl std::fmt::Debug for Hints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hints").field("buckets", &(self.mask + 1)).field("slot_bits", &self.slot_bits).finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const GEN1: u64 = 1 << 32;

    #[test]
    fn small_memories_get_one_bucket_per_frame() {
        let h = Hints::new(1024, 1000).expect("hints");
        assert!(h.is_exact(1000));
        for pfn in 0..1000 {
            assert_eq!(h.place(pfn), (pfn * WAYS, 0), "frame {pfn}");
        }
        assert_eq!(h.bytes(), 1024 * WAYS * 8);
    }

    #[test]
    fn the_table_follows_the_window_not_the_memory() {
        for frames in [1 << 20, 1 << 28, 1 << 34, usize::MAX] {
            let h = Hints::new(1024, frames).expect("hints");
            assert!(!h.is_exact(frames));
            assert_eq!(h.bytes(), 2 * 1024 * WAYS * 8, "{frames} frames");
        }
        assert_eq!(Hints::new(1, 1 << 34).expect("hints").bytes(), MIN_BUCKETS * WAYS * 8);
    }

    #[test]
    fn hints_at_both_ends_of_64_tib_of_frames() {
        let frames = 1usize << 34;
        let h = Hints::new(16, frames).expect("hints");
        let pfns = [0, 1, 2, frames / 2, frames - 2, frames - 1];
        for (slot, &pfn) in pfns.iter().enumerate() {
            assert_eq!(h.get(pfn), None);
            h.set(pfn, slot as u32, GEN1, |_| true);
            assert_eq!(h.get(pfn), Some(Hint { slot: slot as u32, gen: GEN1 }), "frame {pfn}");
        }
    }

    #[test]
    fn a_block_of_frames_never_shares_a_bucket() {
        let h = Hints::new(64, 1 << 30).expect("hints");
        let base = 0x1234_5678 & !h.mask;
        let mut seen = std::collections::HashSet::new();
        for pfn in base..=base + h.mask {
            assert!(seen.insert(h.place(pfn).0), "frame {pfn:#x}");
        }
    }

    #[test]
    fn two_frames_of_one_bucket_keep_a_way_each_and_a_third_drops_the_older() {
        let h = Hints::new(64, 1 << 30).expect("hints");
        // Frames of one bucket and different tags.
        let (i, _) = h.place(5);
        let mates: Vec<usize> = (1..).map(|k| 5 + k * (h.mask + 1)).filter(|&p| h.place(p).0 == i).take(3).collect();
        let (a, b, c) = (mates[0], mates[1], mates[2]);
        assert!(h.place(a).1 != h.place(b).1 && h.place(b).1 != h.place(c).1 && h.place(a).1 != h.place(c).1);
        h.set(a, 1, GEN1, |_| true);
        h.set(b, 2, GEN1, |_| true);
        assert_eq!(h.get(a).map(|x| x.slot), Some(1));
        assert_eq!(h.get(b).map(|x| x.slot), Some(2));
        // A stale generation of the same frame is replaced in place.
        h.set(a, 3, 2 * GEN1, |_| true);
        assert_eq!(h.get(a), Some(Hint { slot: 3, gen: 2 * GEN1 }));
        assert_eq!(h.get(b).map(|x| x.slot), Some(2));
        // Both live: the newcomer goes first, the newer of the two (a)
        // moves over, the older (b) is dropped.
        h.set(c, 4, GEN1, |_| true);
        assert_eq!(h.get(c).map(|x| x.slot), Some(4));
        assert_eq!(h.get(a).map(|x| x.slot), Some(3));
        assert_eq!(h.get(b), None);
        // A dead hint's way is taken first.
        h.set(b, 5, GEN1, |x| x.slot != 3);
        assert_eq!(h.get(b).map(|x| x.slot), Some(5));
        assert_eq!(h.get(c).map(|x| x.slot), Some(4));
        assert_eq!(h.get(a), None);
    }
}
