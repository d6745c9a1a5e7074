//! [`FaultyMmu`]: an [`Mmu`] wrapper that injects system-call failures, for
//! testing what the caches do when the kernel says no.

use std::collections::BTreeSet;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use super::{Mmu, Slot};
use crate::error::{Error, Result};
use crate::phys::{Pfn, PhysMem};
use crate::sync::{lock, AtomicU64, Mutex, Ordering};

/// Which calls of one kind (enter or remove) fail, and with what errno.
///
/// Calls are numbered from 1, counting from the moment the fault is armed
/// ([`FaultyMmu::fail_enters`] / [`FaultyMmu::fail_removes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    when: When,
    errno: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum When {
    Nth(u64),
    From(u64),
    Calls(BTreeSet<u64>),
}

impl Fault {
    /// Fail only the `n`-th call (1-based) with `errno` (e.g. `libc::ENOMEM`).
    pub fn nth(n: u64, errno: i32) -> Fault {
        Fault { when: When::Nth(n), errno }
    }

    /// Fail the `n`-th call and every call after it.
    pub fn from_nth(n: u64, errno: i32) -> Fault {
        Fault { when: When::From(n), errno }
    }

    /// Fail exactly the calls whose numbers are in `calls`.
    pub fn calls(calls: impl IntoIterator<Item = u64>, errno: i32) -> Fault {
        Fault { when: When::Calls(calls.into_iter().collect()), errno }
    }

    /// The errno the failing calls return.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    fn hits(&self, call: u64) -> bool {
        match &self.when {
            When::Nth(n) => call == *n,
            When::From(n) => call >= *n,
            When::Calls(set) => set.contains(&call),
        }
    }
}

/// One kind of call: how many were made since the fault was armed, and the
/// fault.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    since_armed: u64,
    fault: Option<Fault>,
}

impl Plan {
    /// A plan with `fault` armed and no call counted yet.
    pub(crate) fn armed(fault: Option<Fault>) -> Plan {
        Plan { since_armed: 0, fault }
    }

    /// Count a call; the errno to fail it with, if it must fail.
    pub(crate) fn next(&mut self) -> Option<i32> {
        self.since_armed += 1;
        let call = self.since_armed;
        self.fault.as_ref().filter(|f| f.hits(call)).map(|f| f.errno)
    }
}

/// Counters of a [`FaultyMmu`]: every call made to it, failed or not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultStats {
    /// `enter` calls, including failed ones.
    pub enters: u64,
    /// `remove` calls, including failed ones.
    pub removes: u64,
    /// `enter` calls failed by injection (not passed to the inner MMU).
    pub failed_enters: u64,
    /// `remove` calls failed by injection (not passed to the inner MMU).
    pub failed_removes: u64,
}

/// Wraps any [`Mmu`] and fails chosen `enter` and `remove` calls.
///
/// A failing call returns [`Error::Sys`] with the chosen errno and the name
/// of the operation the real window uses (`"mmap(enter)"`,
/// `"mmap(remove)"`), and does *not* reach the inner MMU: a failed enter
/// maps nothing, a failed remove leaves the mapping in place, as the kernel
/// would. Every other call, and every other method, is passed through; the
/// inner MMU's [`MmuStats`](super::MmuStats) therefore count only the calls it performed,
/// while [`FaultyMmu::fault_stats`] counts them all. No system call of its
/// own; a mutex per call, so it is for tests, not for benchmarks.
///
/// ```
/// use std::sync::Arc;
/// use lwbuf::{Backing, Error, Fault, FaultyMmu, Lwbufs, Mmu, ModelMmu, PhysMem};
///
/// let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
/// let faulty = Arc::new(FaultyMmu::new(Arc::new(ModelMmu::new(&mem, 8)?)));
/// let lw = Lwbufs::builder(faulty.clone()).cpus(1).build()?;
/// let _cpu = lw.bind(0)?;
/// let page = mem.alloc_page()?;
///
/// faulty.fail_enters(Some(Fault::nth(1, libc::EINVAL))); // the next enter fails
/// let err = lw.alloc(&page).unwrap_err();
/// assert!(matches!(err, Error::Sys { op: "mmap(enter)", .. }));
/// assert_eq!(err.errno(), Some(libc::EINVAL));
/// assert_eq!(faulty.stats().mapped, 0);                  // nothing was mapped
///
/// let buf = lw.alloc(&page)?;                            // the one after works
/// assert_eq!(faulty.fault_stats().failed_enters, 1);
/// # drop(buf);
/// # Ok::<(), lwbuf::Error>(())
/// ```
pub struct FaultyMmu {
    inner: Arc<dyn Mmu>,
    enter: Mutex<Plan>,
    remove: Mutex<Plan>,
    enters: AtomicU64,
    removes: AtomicU64,
    failed_enters: AtomicU64,
    failed_removes: AtomicU64,
}

impl FaultyMmu {
    /// Wrap `inner`, with no fault armed.
    pub fn new(inner: Arc<dyn Mmu>) -> FaultyMmu {
        FaultyMmu {
            inner,
            enter: Mutex::new(Plan::default()),
            remove: Mutex::new(Plan::default()),
            enters: AtomicU64::new(0),
            removes: AtomicU64::new(0),
            failed_enters: AtomicU64::new(0),
            failed_removes: AtomicU64::new(0),
        }
    }

    /// The wrapped MMU.
    pub fn inner(&self) -> &Arc<dyn Mmu> {
        &self.inner
    }

    /// Arm (or with `None`, clear) the fault for `enter` calls; the calls
    /// are numbered from 1 again starting with the next one.
    pub fn fail_enters(&self, fault: Option<Fault>) {
        *lock(&self.enter) = Plan { since_armed: 0, fault };
    }

    /// Arm (or with `None`, clear) the fault for `remove` calls; the calls
    /// are numbered from 1 again starting with the next one.
    pub fn fail_removes(&self, fault: Option<Fault>) {
        *lock(&self.remove) = Plan { since_armed: 0, fault };
    }

    /// Clear both faults.
    pub fn clear(&self) {
        self.fail_enters(None);
        self.fail_removes(None);
    }

    /// Every call made, and how many were failed.
    pub fn fault_stats(&self) -> FaultStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultStats {
            enters: r(&self.enters),
            removes: r(&self.removes),
            failed_enters: r(&self.failed_enters),
            failed_removes: r(&self.failed_removes),
        }
    }
}

impl super::sealed::Sealed for FaultyMmu {
    // The wrapped window's table, and so its claim: a cache over the
    // wrapper and one over the window itself would hand out the same slots.
    fn table(&self) -> &super::SlotTable {
        self.inner.table()
    }
}

impl Mmu for FaultyMmu {
    fn phys(&self) -> &PhysMem {
        self.inner.phys()
    }

    fn slot_size(&self) -> usize {
        self.inner.slot_size()
    }

    fn writable(&self) -> bool {
        self.inner.writable()
    }

    unsafe fn enter(&self, slot: Slot, pfn: Pfn, count: usize) -> Result<NonNull<u8>> {
        // Relaxed: counters, read by tests after the fact.
        self.enters.fetch_add(1, Ordering::Relaxed);
        if let Some(errno) = lock(&self.enter).next() {
            self.failed_enters.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Sys { op: "mmap(enter)", source: std::io::Error::from_raw_os_error(errno) });
        }
        // SAFETY: the caller's contract for `enter` is passed on unchanged.
        unsafe { self.inner.enter(slot, pfn, count) }
    }

    unsafe fn remove(&self, slot: Slot, count: usize) -> Result<()> {
        self.removes.fetch_add(1, Ordering::Relaxed);
        if let Some(errno) = lock(&self.remove).next() {
            self.failed_removes.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Sys { op: "mmap(remove)", source: std::io::Error::from_raw_os_error(errno) });
        }
        // SAFETY: the caller's contract for `remove` is passed on unchanged.
        unsafe { self.inner.remove(slot, count) }
    }

    /// A replace is an enter for the fault schedule (it counts in
    /// `enters` and fails as one).
    unsafe fn replace(&self, slot: Slot, pfn: Pfn, count: usize, old: usize) -> Result<NonNull<u8>> {
        // Relaxed: counters, read by tests after the fact.
        self.enters.fetch_add(1, Ordering::Relaxed);
        if let Some(errno) = lock(&self.enter).next() {
            self.failed_enters.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Sys { op: "mmap(replace)", source: std::io::Error::from_raw_os_error(errno) });
        }
        // SAFETY: the caller's contract for `replace` is passed on unchanged.
        unsafe { self.inner.replace(slot, pfn, count, old) }
    }

    fn kva(&self, slot: Slot) -> Option<NonNull<u8>> {
        self.inner.kva(slot)
    }
}

impl fmt::Debug for FaultyMmu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyMmu")
            .field("inner", &self.inner)
            .field("enter_fault", &lock(&self.enter).fault)
            .field("remove_fault", &lock(&self.remove).fault)
            .field("calls", &self.fault_stats())
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn numbering_restarts_when_armed() {
        let f = Fault::calls([2, 4], libc::EAGAIN);
        let mut p = Plan { since_armed: 0, fault: Some(f) };
        let got: Vec<_> = (0..5).map(|_| p.next()).collect();
        assert_eq!(got, [None, Some(libc::EAGAIN), None, Some(libc::EAGAIN), None]);
        let mut p = Plan { since_armed: 0, fault: Some(Fault::from_nth(3, libc::ENOMEM)) };
        let got: Vec<_> = (0..5).map(|_| p.next().is_some()).collect();
        assert_eq!(got, [false, false, true, true, true]);
        let mut p = Plan { since_armed: 0, fault: Some(Fault::nth(1, libc::EINVAL)) };
        assert_eq!(p.next(), Some(libc::EINVAL));
        assert_eq!(p.next(), None);
    }
}
