//! Waiting for room in the pool: [`Wait`] modes, [`CancelToken`], and the
//! wait queue a release wakes.
//!
//! No polling: a waiter sleeps on a condition variable and every release
//! that makes room (an entry becoming unused, slots given back) wakes the
//! waiters. The lost-wake-up argument, with `gen` a counter bumped by every
//! room-making event: a waiter announces itself (`waiters += 1`), reads
//! `gen`, makes its attempt *without* the queue mutex (so an attempt that
//! itself makes room can wake others without deadlocking), then takes the
//! mutex and sleeps only if `gen` has not moved. A releaser makes room, bumps
//! `gen`, then reads `waiters` and notifies under the mutex. All four
//! accesses are SeqCst, so either the waiter sees the new `gen` and retries,
//! or the releaser sees the waiter and notifies it after it is asleep (the
//! waiter holds the mutex from its second `gen` read until it sleeps).
//! Cancel and close set their flag before taking the mutex to notify, and
//! the waiter checks the flags again under the mutex.

use std::fmt;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sync::{lock, Arc, AtomicBool, AtomicUsize, Condvar, Mutex, Ordering};

/// What an allocation does when every slot is mapped and in use.
#[derive(Clone, Copy, Debug)]
pub enum Wait<'a> {
    /// Fail at once with [`Error::WouldBlock`] (FreeBSD's `SFB_NOWAIT`).
    NoWait,
    /// Sleep until a release makes room.
    Forever,
    /// Sleep at most this long, then fail with [`Error::TimedOut`].
    Timeout(Duration),
    /// Sleep until room or until the token is cancelled
    /// ([`Error::Cancelled`]), like `SFB_CATCH`.
    Cancel(&'a CancelToken),
}

struct TokenInner {
    cancelled: AtomicBool,
    queues: Mutex<Vec<Arc<WaitQueue>>>,
}

/// Cancels waits: [`CancelToken::cancel`] wakes every allocation waiting
/// with [`Wait::Cancel`] on this token, in any pool, and makes later waits
/// with it fail at once. Clones share the state.
#[derive(Clone)]
pub struct CancelToken(Arc<TokenInner>);

impl Default for CancelToken {
    fn default() -> Self {
        CancelToken::new()
    }
}

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        CancelToken(Arc::new(TokenInner { cancelled: AtomicBool::new(false), queues: Mutex::new(Vec::new()) }))
    }

    /// Cancel: wake every waiter using this token.
    pub fn cancel(&self) {
        // SeqCst: pairs with the waiter's registration (under `queues`) and
        // its check of the flag under the queue mutex.
        self.0.cancelled.store(true, Ordering::SeqCst);
        let queues = lock(&self.0.queues).clone();
        for q in queues {
            let _g = lock(&q.mutex);
            q.cond.notify_all();
        }
    }

    /// Whether `cancel` was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    fn register(&self, q: &Arc<WaitQueue>) {
        lock(&self.0.queues).push(q.clone());
    }

    fn unregister(&self, q: &Arc<WaitQueue>) {
        let mut v = lock(&self.0.queues);
        if let Some(i) = v.iter().position(|x| Arc::ptr_eq(x, q)) {
            v.swap_remove(i);
        }
    }
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelToken").field("cancelled", &self.is_cancelled()).finish()
    }
}

/// Where waiters sleep.
#[derive(Debug)]
pub(crate) struct WaitQueue {
    mutex: Mutex<()>,
    cond: Condvar,
    waiters: AtomicUsize,
    gen: AtomicUsize,
    closed: AtomicBool,
}

/// How a wait ended without an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Waited,
    NoWait,
    TimedOut,
    Cancelled,
    Closed,
}

impl WaitQueue {
    pub(crate) fn new() -> Arc<WaitQueue> {
        Arc::new(WaitQueue {
            mutex: Mutex::new(()),
            cond: Condvar::new(),
            waiters: AtomicUsize::new(0),
            gen: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        })
    }

    /// Waiters sleeping (or about to), for stats and tests.
    pub(crate) fn waiters(&self) -> usize {
        self.waiters.load(Ordering::SeqCst)
    }

    /// Wake every waiter if there is any. Call after making room.
    #[inline]
    pub(crate) fn wake(&self) {
        if !crate::sync::mutant!(LostWakeup) {
            self.gen.fetch_add(1, Ordering::SeqCst);
        }
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = lock(&self.mutex);
            self.cond.notify_all();
        }
    }

    /// Close: every waiter (and every later wait) fails with `Closed`.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _g = lock(&self.mutex);
        self.cond.notify_all();
    }

    /// Run `attempt` until it yields a value, sleeping between attempts as
    /// `how` allows. `on_end` learns how the wait went (for counters).
    pub(crate) fn wait_for<T>(
        this: &Arc<Self>,
        how: Wait<'_>,
        mut attempt: impl FnMut() -> Option<T>,
        mut on_end: impl FnMut(Outcome),
    ) -> Result<T> {
        if this.closed.load(Ordering::SeqCst) {
            on_end(Outcome::Closed);
            return Err(Error::Closed);
        }
        if let Some(v) = attempt() {
            return Ok(v);
        }
        let (deadline, token) = match how {
            Wait::NoWait => {
                on_end(Outcome::NoWait);
                return Err(Error::WouldBlock);
            }
            Wait::Forever => (None, None),
            Wait::Timeout(d) => (Some(Instant::now() + d), None),
            Wait::Cancel(t) => (None, Some(t)),
        };
        on_end(Outcome::Waited);
        if let Some(t) = token {
            t.register(this);
        }
        let r = this.sleep_loop(deadline, token, &mut attempt);
        if let Some(t) = token {
            t.unregister(this);
        }
        match &r {
            Err(Error::TimedOut) => on_end(Outcome::TimedOut),
            Err(Error::Cancelled) => on_end(Outcome::Cancelled),
            Err(Error::Closed) => on_end(Outcome::Closed),
            _ => {}
        }
        r
    }

    fn sleep_loop<T>(
        &self,
        deadline: Option<Instant>,
        token: Option<&CancelToken>,
        attempt: &mut impl FnMut() -> Option<T>,
    ) -> Result<T> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let stop = || {
            if self.closed.load(Ordering::SeqCst) {
                Some(Error::Closed)
            } else if token.is_some_and(|t| t.is_cancelled()) {
                Some(Error::Cancelled)
            } else {
                None
            }
        };
        let r = 'outer: loop {
            let gen = self.gen.load(Ordering::SeqCst);
            if let Some(e) = stop() {
                break Err(e);
            }
            if let Some(v) = attempt() {
                break Ok(v);
            }
            let mut g = lock(&self.mutex);
            // Sleep until something changes: room made (gen), cancel,
            // close, or the deadline.
            loop {
                if self.gen.load(Ordering::SeqCst) != gen {
                    continue 'outer;
                }
                if let Some(e) = stop() {
                    break 'outer Err(e);
                }
                match deadline {
                    None => g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner()),
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            break 'outer Err(Error::TimedOut);
                        }
                        g = wait_timeout(&self.cond, g, d - now);
                    }
                }
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

#[cfg(not(loom))]
fn wait_timeout<'a>(c: &Condvar, g: crate::sync::MutexGuard<'a, ()>, d: Duration) -> crate::sync::MutexGuard<'a, ()> {
    c.wait_timeout(g, d).unwrap_or_else(|e| e.into_inner()).0
}

/// Loom has no clock: a timed wait is a wait that may also return
/// spuriously (loom explores both), which is what a timeout looks like to
/// the protocol.
#[cfg(loom)]
fn wait_timeout<'a>(c: &Condvar, g: crate::sync::MutexGuard<'a, ()>, d: Duration) -> crate::sync::MutexGuard<'a, ()> {
    c.wait_timeout(g, d).unwrap().0
}
