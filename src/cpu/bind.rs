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

type Fast = [(usize, usize); MAX_BINDINGS_PER_THREAD];

/// This thread's bindings: `fast` answers lookups (table id, cpu; id 0 is
/// an empty place), `keep` holds the tables so that a thread which exits
/// without dropping its guard still releases its CPUs.
struct ThreadBindings {
    fast: Cell<Fast>,
    keep: RefCell<Vec<(Arc<BindTable>, usize)>>,
}

impl Drop for ThreadBindings {
    fn drop(&mut self) {
        for (table, cpu) in self.keep.get_mut().drain(..) {
            table.release(cpu);
        }
    }
}

#[cfg(not(loom))]
thread_local! {
    static BINDINGS: ThreadBindings = const {
        ThreadBindings { fast: Cell::new([(0, 0); MAX_BINDINGS_PER_THREAD]), keep: RefCell::new(Vec::new()) }
    };
}

// loom's `thread_local!` has no `const` form.
#[cfg(loom)]
thread_local! {
    static BINDINGS: ThreadBindings = ThreadBindings {
        fast: Cell::new([(0, 0); MAX_BINDINGS_PER_THREAD]),
        keep: RefCell::new(Vec::new()),
    };
}

pub(crate) fn table_id(t: &Arc<BindTable>) -> usize {
    &**t as *const BindTable as usize
}

/// The CPU of table `id` bound to this thread, if any. No system call.
#[inline]
pub(crate) fn current(id: usize) -> Option<usize> {
    BINDINGS.try_with(|b| b.fast.get().iter().find(|&&(t, _)| t == id).map(|&(_, cpu)| cpu)).ok().flatten()
}

/// Bind this thread to `cpu` of `table`.
pub(crate) fn bind(table: &Arc<BindTable>, cpu: usize) -> Result<()> {
    let id = table_id(table);
    if let Some(held) = current(id) {
        return Err(Error::AlreadyBound { cpu: held });
    }
    BINDINGS.with(|b| {
        let mut fast = b.fast.get();
        let place = fast.iter().position(|&(t, _)| t == 0).ok_or_else(|| {
            Error::config(
                "binding",
                format!("a thread may hold CPUs of at most {MAX_BINDINGS_PER_THREAD} systems at once"),
            )
        })?;
        if !table.try_take(cpu) {
            return Err(Error::CpuBusy { cpu });
        }
        fast[place] = (id, cpu);
        b.fast.set(fast);
        b.keep.borrow_mut().push((table.clone(), cpu));
        Ok(())
    })
}

/// Undo `bind` on this thread.
pub(crate) fn unbind(table: &Arc<BindTable>, cpu: usize) {
    let id = table_id(table);
    let held = BINDINGS
        .try_with(|b| {
            let mut fast = b.fast.get();
            for e in fast.iter_mut().filter(|e| e.0 == id) {
                *e = (0, 0);
            }
            b.fast.set(fast);
            let mut keep = b.keep.borrow_mut();
            let before = keep.len();
            keep.retain(|(t, _)| table_id(t) != id);
            keep.len() != before
        })
        .unwrap_or(false);
    // Release only a binding this thread still records. A guard dropped by a
    // thread-local destructor that runs after `BINDINGS`' own finds it gone:
    // that destructor released the CPU already, and another thread may have
    // bound it since, so releasing again would give the CPU two owners.
    if held {
        table.release(cpu);
    }
}
