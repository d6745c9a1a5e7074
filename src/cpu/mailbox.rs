//! [`Mailbox`]: the per-CPU message queue, the userspace passive IPI.

use crate::sync::{lock, AtomicUsize, Mutex, Ordering};

/// A multi-producer queue drained in one step by its owner (or by whoever
/// holds the owner's cache lock on its behalf).
///
/// A mutex around a `Vec`: producers push under it, the drainer swaps the
/// whole vector out under it, so every message is taken exactly once and a
/// drain costs one lock round trip however long the backlog. `len` mirrors
/// the length so the owner's check for mail is one load with no lock.
#[derive(Debug)]
pub(crate) struct Mailbox<T> {
    queue: Mutex<Vec<T>>,
    len: AtomicUsize,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox { queue: Mutex::new(Vec::new()), len: AtomicUsize::new(0) }
    }
}

impl<T> Mailbox<T> {
    /// Queue a message; returns the queue length after the push.
    pub(crate) fn push(&self, msg: T) -> usize {
        let mut q = lock(&self.queue);
        q.push(msg);
        let n = q.len();
        // Relaxed: `len` is a hint for the owner's lock-free check; the
        // messages themselves are published by the mutex.
        self.len.store(n, Ordering::Relaxed);
        n
    }

    /// Whether there may be mail (a hint: a push racing with this call may
    /// or may not be seen; it will be seen by the next drain).
    #[inline]
    pub(crate) fn has_mail(&self) -> bool {
        !crate::sync::mutant!(SkipDrain) && self.len.load(Ordering::Relaxed) != 0
    }

    /// Messages waiting now (a hint, as `has_mail`).
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Take every queued message, swapping `spare` (which must be empty) in
    /// as the new queue so steady-state draining allocates nothing.
    pub(crate) fn take_all(&self, spare: &mut Vec<T>) {
        debug_assert!(spare.is_empty());
        let mut q = lock(&self.queue);
        std::mem::swap(&mut *q, spare);
        self.len.store(0, Ordering::Relaxed);
    }
}
