//! Waiting for room in the pool: [`Wait`] modes, [`CancelToken`], and the
//! wait queue a release wakes.
//!
//! No polling: a waiter sleeps on a condition variable and every release
//! that makes room (an entry becoming unused, slots given back) wakes the
//! waiters. The lost-wake-up argument, with `gen` a counter bumped by every
//! room-making event that finds a waiter:
//!
//! - A waiter announces itself (`waiters += 1`), then the heavy barrier
//!   (`membarrier`; a SeqCst fence without it), reads
//!   `gen`, makes its attempt *without* the queue mutex (so an attempt that
//!   itself makes room can wake others without deadlocking), then takes the
//!   mutex and sleeps only if `gen` has not moved.
//! - A releaser makes room, then a SeqCst fence (a pinned release: the
//!   light barrier, which the heavy one pairs with), then reads `waiters`;
//!   only if there is one does it bump `gen` and notify under the mutex.
//!
//! The two fences make the announcement and the room a store-buffering
//! pair: either the releaser sees the waiter, or every attempt the waiter
//! makes after its fence sees the room. In the first case the bump comes
//! after the room, and the waiter either reads the bumped `gen` before its
//! attempt (and so sees the room), or sees it move under the mutex and
//! retries, or is asleep when the releaser notifies (it holds the mutex
//! from its second `gen` read until it sleeps). A release with no waiter
//! costs a fence and a read of a line nobody writes: the common case (every
//! hit's release) writes no shared line here, so threads scale.
//! Cancel and close set their flag before taking the mutex to notify, and
//! the waiter checks the flags again under the mutex.
//!
//! A waiter's own attempt can bump `gen` too: an all-or-nothing request
//! (`alloc_all`, a run that evicts singles) gives back what it took when a
//! later piece is missing, and that give-back must wake *other* waiters. It
//! is no news to the waiter itself, so the waiter counts the bumps its
//! attempt made (a thread-local tally, kept only for the queue it is
//! attempting on) and sleeps if `gen` moved by exactly that much: every bump
//! by another thread still makes it retry, so the argument above is
//! unchanged. Before this, such a waiter never slept while another thread
//! held what it needed (tens of thousands of retries in 200 ms). Because an
//! attempt is not perfectly idempotent (a give-back may be trimmed, and a
//! run may land elsewhere next time), a sleep that only its own bumps
//! preceded is a timed one, 1 ms doubling to 64 ms, then a retry.

use std::cell::Cell;
use std::fmt;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sync::{barrier, fence, lock, thread_local, Arc, AtomicBool, AtomicUsize, Condvar, Mutex, Ordering};

// The queue whose attempt this thread is running in `sleep_loop` (its
// address, 0 for none) and how many times the attempt bumped its `gen`.
// Declared twice because loom's `thread_local!` takes no `const {}`.
#[cfg(not(loom))]
thread_local! {
    static OWN_WAKES: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}
#[cfg(loom)]
thread_local! {
    static OWN_WAKES: Cell<(usize, usize)> = Cell::new((0, 0));
}

/// First and longest timed sleep of a waiter whose `gen` moved only by its
/// own attempt's give-backs (see the module docs).
const SELF_RETRY_MIN: Duration = Duration::from_millis(1);
const SELF_RETRY_MAX: Duration = Duration::from_millis(64);

/// What an allocation does when every slot is mapped and in use.
#[derive(Clone, Copy, Debug)]
pub enum Wait<'a> {
    /// Fail at once with [`Error::WouldBlock`] (FreeBSD's `SFB_NOWAIT`).
    NoWait,
    /// Sleep until a release makes room.
    Forever,
    /// Sleep at most this long, then fail with [`Error::TimedOut`]. Any
    /// duration works: one too long for the clock (`Duration::MAX`) is no
    /// limit, as [`Forever`](Wait::Forever). `Duration::ZERO` never sleeps:
    /// one attempt, as [`NoWait`](Wait::NoWait), but failing with
    /// `TimedOut` (as std's `recv_timeout(Duration::ZERO)` does).
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
        // SeqCst fence: pairs with the waiter's fence after `waiters += 1`
        // (module docs): either we see the waiter here, or it sees the room
        // we made before this call.
        fence(Ordering::SeqCst);
        self.wake_fenced();
    }

    /// [`wake`](Self::wake) for a caller that issued the SeqCst fence itself
    /// after making room.
    #[inline]
    pub(crate) fn wake_fenced(&self) {
        if self.waiters.load(Ordering::SeqCst) == 0 {
            return;
        }
        self.wake_waiters();
    }

    /// `wake_fenced` when someone waits: out of the release path.
    #[cold]
    #[inline(never)]
    fn wake_waiters(&self) {
        if !crate::sync::mutant!(LostWakeup) {
            self.gen.fetch_add(1, Ordering::SeqCst);
            self.tally_own_wake();
        }
        let _g = lock(&self.mutex);
        self.cond.notify_all();
    }

    /// Count a `gen` bump made by the attempt this thread is running on this
    /// queue, if it is running one.
    #[inline]
    fn tally_own_wake(&self) {
        let me = self as *const Self as usize;
        // `try_with`: a handle dropped by a thread-local destructor still
        // wakes; it just is not tallied (no attempt is running then).
        let _ = OWN_WAKES.try_with(|c| {
            let (q, n) = c.get();
            if q == me {
                c.set((q, n + 1));
            }
        });
    }

    /// Run one attempt, returning its result and how many times it bumped
    /// `gen` itself. Without the thread-local (thread exiting) it reports 0,
    /// which only costs a spurious retry.
    fn attempt_tallied<T>(&self, attempt: &mut impl FnMut() -> Result<Option<T>>) -> (Result<Option<T>>, usize) {
        let me = self as *const Self as usize;
        let prev = OWN_WAKES.try_with(|c| c.replace((me, 0))).unwrap_or((0, 0));
        let r = attempt();
        let own = OWN_WAKES.try_with(|c| c.replace(prev).1).unwrap_or(0);
        (r, own)
    }

    /// Close: every waiter (and every later wait) fails with `Closed`.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _g = lock(&self.mutex);
        self.cond.notify_all();
    }

    /// Run `attempt` until it yields a value (`Ok(Some)`) or an error that
    /// waiting will not cure (`Err`, returned as is), sleeping between
    /// attempts that found no room (`Ok(None)`) as `how` allows. `on_end`
    /// learns how the wait went (for counters).
    pub(crate) fn wait_for<T>(
        this: &Arc<Self>,
        how: Wait<'_>,
        mut attempt: impl FnMut() -> Result<Option<T>>,
        mut on_end: impl FnMut(Outcome),
    ) -> Result<T> {
        if this.closed.load(Ordering::SeqCst) {
            on_end(Outcome::Closed);
            return Err(Error::Closed);
        }
        if let Some(v) = attempt()? {
            return Ok(v);
        }
        let (deadline, token) = match how {
            Wait::NoWait => {
                on_end(Outcome::NoWait);
                return Err(Error::WouldBlock);
            }
            Wait::Forever => (None, None),
            // Already over: no announcement, no second attempt, not a
            // wait (a no-wait call that reports a timeout).
            Wait::Timeout(d) if d.is_zero() => {
                on_end(Outcome::TimedOut);
                return Err(Error::TimedOut);
            }
            // A deadline the clock cannot hold is no deadline.
            Wait::Timeout(d) => (Instant::now().checked_add(d), None),
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
        attempt: &mut impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `wake` (module docs), and, heavy, with
        // the light barrier of a pinned release (`handle.rs`, 12).
        barrier::heavy();
        let stop = || {
            if self.closed.load(Ordering::SeqCst) {
                Some(Error::Closed)
            } else if token.is_some_and(|t| t.is_cancelled()) {
                Some(Error::Cancelled)
            } else {
                None
            }
        };
        let mut backoff = SELF_RETRY_MIN;
        let r = 'outer: loop {
            let gen = self.gen.load(Ordering::SeqCst);
            if let Some(e) = stop() {
                break Err(e);
            }
            let (v, own) = self.attempt_tallied(attempt);
            match v {
                Ok(Some(v)) => break Ok(v),
                Err(e) => break Err(e),
                Ok(None) => {}
            }
            // Our own give-backs are no news to us: sleep unless `gen` moved
            // by more than they did (module docs). If only they moved it,
            // sleep a bounded while, then retry anyway.
            let gen = gen.wrapping_add(own);
            let retry_at = (own > 0).then(|| Instant::now().checked_add(backoff)).flatten();
            backoff = if own > 0 { (backoff * 2).min(SELF_RETRY_MAX) } else { SELF_RETRY_MIN };
            let mut g = lock(&self.mutex);
            // Sleep until something changes: room made (gen), cancel,
            // close, the deadline, or the self-retry time.
            loop {
                if self.gen.load(Ordering::SeqCst) != gen {
                    backoff = SELF_RETRY_MIN;
                    continue 'outer;
                }
                if let Some(e) = stop() {
                    break 'outer Err(e);
                }
                let wake_at = match (deadline, retry_at) {
                    (Some(d), Some(r)) => Some(d.min(r)),
                    (d, r) => d.or(r),
                };
                match wake_at {
                    None => g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner()),
                    Some(t) => {
                        let now = Instant::now();
                        if deadline.is_some_and(|d| now >= d) {
                            break 'outer Err(Error::TimedOut);
                        }
                        if now >= t {
                            continue 'outer;
                        }
                        g = wait_timeout(&self.cond, g, t - now);
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
