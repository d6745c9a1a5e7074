//! An LRU list over small integer indices (the pool's slots), O(1) for
//! every operation and allocation-free once grown: the sf_buf pool's
//! inactive list of cached-but-unused mappings, which its evictor walks in
//! clock order (`miss.rs`). The per-CPU lwbuf caches keep their own clock
//! queue (`src/lwbuf/pcpu.rs`).

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Link {
    prev: u32,
    next: u32,
    on: bool,
}

const UNLINKED: Link = Link { prev: NIL, next: NIL, on: false };

/// Doubly linked list threaded through a vector indexed by entry index.
#[derive(Debug)]
pub(super) struct Lru {
    links: Vec<Link>,
    head: u32,
    tail: u32,
    len: usize,
}

impl Default for Lru {
    fn default() -> Self {
        Lru { links: Vec::new(), head: NIL, tail: NIL, len: 0 }
    }
}

impl Lru {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn contains(&self, i: usize) -> bool {
        self.links.get(i).is_some_and(|l| l.on)
    }

    /// Append `i` as the most recently used. `i` must not be on the list.
    pub(super) fn push_back(&mut self, i: usize) {
        if i >= self.links.len() {
            self.links.resize((i + 1).max(self.links.len() * 2), UNLINKED);
        }
        debug_assert!(!self.links[i].on, "entry {i} already on the LRU");
        let i32 = i as u32;
        self.links[i] = Link { prev: self.tail, next: NIL, on: true };
        if self.tail == NIL {
            self.head = i32;
        } else {
            self.links[self.tail as usize].next = i32;
        }
        self.tail = i32;
        self.len += 1;
    }

    /// Unlink `i`; returns whether it was on the list.
    pub(super) fn remove(&mut self, i: usize) -> bool {
        if !self.contains(i) {
            return false;
        }
        let Link { prev, next, .. } = self.links[i];
        if prev == NIL {
            self.head = next;
        } else {
            self.links[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.links[next as usize].prev = prev;
        }
        self.links[i] = UNLINKED;
        self.len -= 1;
        true
    }

    /// The least recently used index, unlinked.
    pub(super) fn pop_front(&mut self) -> Option<usize> {
        if self.head == NIL {
            return None;
        }
        let i = self.head as usize;
        self.remove(i);
        Some(i)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::Lru;

    #[test]
    fn order_and_removal() {
        let mut l = Lru::default();
        for i in [3, 1, 4, 10] {
            l.push_back(i);
        }
        assert_eq!(l.len(), 4);
        assert!(l.remove(4));
        assert!(!l.remove(4));
        assert_eq!(l.pop_front(), Some(3));
        l.push_back(3);
        assert_eq!(l.pop_front(), Some(1));
        assert_eq!(l.pop_front(), Some(10));
        assert_eq!(l.pop_front(), Some(3));
        assert_eq!(l.pop_front(), None);
        assert_eq!(l.len(), 0);
    }
}
