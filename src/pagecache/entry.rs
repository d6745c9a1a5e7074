//! One cached page of a file: its fill state, its frame and its dirty
//! blocks, all under the entry's lock.

use std::sync::Weak;

use super::file::FileInner;
use crate::phys::Page;
use crate::sync::{AtomicBool, AtomicUsize, Condvar, Mutex, Ordering};

/// Where an entry is in its life. Only ever moves forward:
/// `Filling -> Valid -> Gone` or `Filling -> Gone`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// One thread is reading the page from the file; others wait on the
    /// entry's condition variable.
    Filling,
    /// The frame holds the page's bytes.
    Valid,
    /// Evicted, dropped as stale, or its fill failed: no longer in its
    /// file's map. A thread that finds it looks the page up again.
    Gone,
}

/// What the entry's lock guards.
#[derive(Debug)]
pub(crate) struct EntrySt {
    pub(crate) fill: Fill,
    /// The cache's hold on the frame (`Some` exactly while `Valid`, and
    /// while `Filling` once a frame is taken).
    pub(crate) page: Option<Page>,
    /// Dirty blocks, one bit each; empty when the page is clean.
    pub(crate) dirty: Blocks,
    /// A write-back of this page is in flight (its dirty bits were taken):
    /// the page must not be evicted or dropped until it ends.
    pub(crate) writeback: bool,
}

/// A cached page.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The page's index in its file.
    pub(crate) index: u64,
    pub(crate) file: Weak<FileInner>,
    pub(crate) st: Mutex<EntrySt>,
    /// Signalled when a fill ends (`Filling` -> `Valid` or `Gone`) and
    /// when a flush's write-back of the page ends (`writeback` cleared).
    pub(crate) filled: Condvar,
    /// The clock's reference bit: set by every hit, cleared by the evictor.
    pub(crate) referenced: AtomicBool,
    /// Filled by readahead and not looked at since.
    pub(crate) readahead: AtomicBool,
    /// The frame number plus one while `Valid`, else 0: what a read under
    /// the shard's lock copies from without taking the entry's lock.
    /// Stored under the entry's lock (Release when set); cleared there
    /// before the entry leaves its map, and the frame is let go only after
    /// that removal, under the shard's lock, so a reader holding that lock
    /// who saw it set copies from a frame that is still the page's.
    pub(crate) valid_pfn: AtomicUsize,
}

impl Entry {
    /// Make the entry valid with `page` (under its lock, `st`).
    pub(crate) fn publish(&self, st: &mut EntrySt, page: Page) {
        self.valid_pfn.store(page.pfn().0 + 1, Ordering::Release);
        st.page = Some(page);
        st.fill = Fill::Valid;
    }

    /// Mark the entry gone (under its lock, `st`) and hand back its frame,
    /// to be dropped only after the entry has left its map.
    pub(crate) fn retire(&self, st: &mut EntrySt) -> Option<Page> {
        self.valid_pfn.store(0, Ordering::Relaxed);
        st.fill = Fill::Gone;
        st.page.take()
    }

    pub(crate) fn filling(file: Weak<FileInner>, index: u64, readahead: bool) -> Entry {
        Entry {
            index,
            file,
            st: Mutex::new(EntrySt { fill: Fill::Filling, page: None, dirty: Blocks::default(), writeback: false }),
            filled: Condvar::new(),
            referenced: AtomicBool::new(false),
            readahead: AtomicBool::new(readahead),
            valid_pfn: AtomicUsize::new(0),
        }
    }
}

/// A set of blocks of one page, as a bitmap (no allocation while empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Blocks(Vec<u64>);

impl Blocks {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// Add blocks `first..end`.
    pub(crate) fn insert(&mut self, first: usize, end: usize) {
        if first >= end {
            return;
        }
        let words = end.div_ceil(64);
        if self.0.len() < words {
            self.0.resize(words, 0);
        }
        for b in first..end {
            self.0[b / 64] |= 1 << (b % 64);
        }
    }

    /// Add every block of `other`.
    pub(crate) fn union(&mut self, other: &Blocks) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (w, o) in self.0.iter_mut().zip(&other.0) {
            *w |= o;
        }
    }

    /// Take the set, leaving it empty.
    pub(crate) fn take(&mut self) -> Blocks {
        std::mem::take(self)
    }

    /// The maximal runs of consecutive blocks, in order, as `first..end`.
    pub(crate) fn runs(&self) -> Vec<std::ops::Range<usize>> {
        let mut out: Vec<std::ops::Range<usize>> = Vec::new();
        for (wi, &w) in self.0.iter().enumerate() {
            let mut bits = w;
            while bits != 0 {
                let b = wi * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                match out.last_mut() {
                    Some(r) if r.end == b => r.end = b + 1,
                    _ => out.push(b..b + 1),
                }
            }
        }
        out
    }

    /// The highest block in the set plus one, or 0.
    pub(crate) fn end(&self) -> usize {
        self.runs().last().map_or(0, |r| r.end)
    }
}

#[cfg(test)]
mod tests {
    use super::Blocks;

    #[test]
    fn runs_merge_neighbours_across_words() {
        let mut b = Blocks::default();
        assert!(b.is_empty());
        assert_eq!(b.runs(), vec![]);
        b.insert(62, 66);
        b.insert(3, 4);
        b.insert(66, 67);
        assert_eq!(b.runs(), vec![3..4, 62..67]);
        assert_eq!(b.end(), 67);
        let mut c = Blocks::default();
        c.insert(4, 5);
        b.union(&c);
        assert_eq!(b.runs(), vec![3..5, 62..67]);
        let t = b.take();
        assert!(b.is_empty());
        assert_eq!(t.runs().len(), 2);
        b.insert(7, 7);
        assert!(b.is_empty());
    }
}
