//! Binding threads to CPU ids: who owns which CPU, and the thread-local
//! record that makes "which CPU am I?" a lookup with no system call.

use std::cell::{Cell, RefCell};

use crate::error::{Error, Result};
use crate::sync::{thread_local, Arc, AtomicBool, Ordering};

/// CPU bindings (of distinct systems) one thread may hold at once.
pub const MAX_BINDINGS_PER_THREAD: usize = 4;

/// Which CPUs of one system are bound to a live thread.
#[derive(Debug)]
pub(crate) struct BindTable {
    owned: Box<[AtomicBool]>,
}

impl BindTable {
    pub(crate) fn new(ncpus: usize) -> Arc<BindTable> {
        Arc::new(BindTable { owned: (0..ncpus).map(|_| AtomicBool::new(false)).collect() })
    }

    /// Whether a live thread holds `cpu` now.
    pub(crate) fn is_bound(&self, cpu: usize) -> bool {
        // Acquire: pairs with the Release in `release`, so a sender that sees
        // the CPU unbound also sees everything its last owner did.
        self.owned[cpu].load(Ordering::Acquire)
    }

    fn try_take(&self, cpu: usize) -> bool {
        self.owned[cpu].compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }

    fn release(&self, cpu: usize) {
        self.owned[cpu].store(false, Ordering::Release);
    }
}

/// This thread's bindings, for lookups: `(table id, cpu)`, id 0 for an
/// empty place. No destructor, so reading it is a plain thread-local access
/// (no registration or state check): every library call makes one.
type Fast = [Cell<(usize, usize)>; MAX_BINDINGS_PER_THREAD];

/// The tables this thread holds CPUs of, so that a thread which exits
/// without dropping its guard still releases its CPUs.
struct Keep(RefCell<Vec<(Arc<BindTable>, usize)>>);

impl Drop for Keep {
    fn drop(&mut self) {
        let keep = self.0.get_mut();
        if keep.is_empty() {
            // Nothing to release (and under loom, this may run after the
            // model ended, where its thread-locals cannot be touched).
            return;
        }
        // Stop claiming the CPUs before giving them up: a handle dropped by
        // a later thread-local destructor then finds this thread unbound.
        let _ = FAST.try_with(|f| f.iter().for_each(|c| c.set((0, 0))));
        for (table, cpu) in keep.drain(..) {
            table.release(cpu);
        }
    }
}

#[cfg(not(loom))]
thread_local! {
    static FAST: Fast = const { [const { Cell::new((0, 0)) }; MAX_BINDINGS_PER_THREAD] };
    static KEEP: Keep = const { Keep(RefCell::new(Vec::new())) };
}

// loom's `thread_local!` has no `const` form.
#[cfg(loom)]
thread_local! {
    static FAST: Fast = [const { Cell::new((0, 0)) }; MAX_BINDINGS_PER_THREAD];
    static KEEP: Keep = Keep(RefCell::new(Vec::new()));
}

pub(crate) fn table_id(t: &Arc<BindTable>) -> usize {
    &**t as *const BindTable as usize
}

/// The CPU of table `id` bound to this thread, if any. No system call.
#[inline]
pub(crate) fn current(id: usize) -> Option<usize> {
    FAST.try_with(|f| {
        f.iter().find_map(|c| {
            let (t, cpu) = c.get();
            (t == id).then_some(cpu)
        })
    })
    .ok()
    .flatten()
}

/// Bind this thread to `cpu` of `table`.
pub(crate) fn bind(table: &Arc<BindTable>, cpu: usize) -> Result<()> {
    let id = table_id(table);
    if let Some(held) = current(id) {
        return Err(Error::AlreadyBound { cpu: held });
    }
    let gone = || Error::config("binding", "the thread is exiting");
    let place = FAST.try_with(|f| f.iter().position(|c| c.get().0 == 0)).map_err(|_| gone())?.ok_or_else(|| {
        Error::config("binding", format!("a thread may hold CPUs of at most {MAX_BINDINGS_PER_THREAD} systems at once"))
    })?;
    KEEP.try_with(|k| {
        if !table.try_take(cpu) {
            return Err(Error::CpuBusy { cpu });
        }
        k.0.borrow_mut().push((table.clone(), cpu));
        FAST.with(|f| f[place].set((id, cpu)));
        Ok(())
    })
    .map_err(|_| gone())?
}

/// Undo `bind` on this thread.
pub(crate) fn unbind(table: &Arc<BindTable>, cpu: usize) {
    let id = table_id(table);
    let _ = FAST.try_with(|f| f.iter().filter(|c| c.get().0 == id).for_each(|c| c.set((0, 0))));
    let held = KEEP
        .try_with(|k| {
            let mut keep = k.0.borrow_mut();
            let before = keep.len();
            keep.retain(|(t, _)| table_id(t) != id);
            keep.len() != before
        })
        .unwrap_or(false);
    // Release only a binding this thread still records. A guard dropped by a
    // thread-local destructor that runs after `KEEP`'s own finds it gone:
    // that destructor released the CPU already, and another thread may have
    // bound it since, so releasing again would give the CPU two owners.
    if held {
        table.release(cpu);
    }
}
