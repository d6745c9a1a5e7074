//! Binding a thread to a CPU for the rest of its life, with no guard to
//! keep: [`Lwbufs::bind_for_thread`], for threads the caller does not run
//! the body of (an async runtime's workers, bound from its thread-start
//! hook).
//!
//! The binding is a [`CpuGuard`] kept in a thread-local with an `Arc` of the
//! caches; the thread-local's destructor, at thread exit, drops the guard
//! (unbinds, then drains the CPU's mailbox, as any guard's drop does) and
//! then the `Arc`. A CPU bound this way is therefore released when its
//! thread exits, and the messages other CPUs posted to it are applied then;
//! the caches stay alive until every thread bound this way has exited.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::Arc;

use super::{CpuGuard, Lwbufs};
use crate::error::{Error, Result};
use crate::sync::thread_local;

/// The caches this thread is bound to for life, and the CPU of each.
struct ForLife(RefCell<Vec<(Arc<Lwbufs>, usize)>>);

impl Drop for ForLife {
    fn drop(&mut self) {
        for (sys, cpu) in self.0.get_mut().drain(..) {
            // What `bind` returned, dropped now: unbind and drain. If the
            // binding table's own thread-local went first, it released the
            // CPU already, and `unbind` does not release it twice.
            drop(CpuGuard { sys: &sys, cpu, _not_send_or_sync: PhantomData });
        }
    }
}

#[cfg(not(loom))]
thread_local! {
    static FOR_LIFE: ForLife = const { ForLife(RefCell::new(Vec::new())) };
}

// loom's `thread_local!` has no `const` form.
#[cfg(loom)]
thread_local! {
    static FOR_LIFE: ForLife = ForLife(RefCell::new(Vec::new()));
}

impl Lwbufs {
    /// Bind the calling thread to `cpu` until the thread exits, with no
    /// guard to keep: for threads whose body the caller does not write,
    /// such as an async runtime's workers, bound from its thread-start hook
    /// (tokio's `Builder::on_thread_start`). At thread exit the CPU is
    /// unbound and its mailbox drained, as when a [`CpuGuard`] is dropped.
    /// The thread keeps a clone of the `Arc` until then: the caches outlive
    /// every thread bound this way.
    ///
    /// Errors: those of [`bind`](Self::bind), and [`Error::Config`]
    /// (`"binding"`) on a thread that is already exiting. No system call.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use lwbuf::{Backing, Lwbufs, ModelMmu, PhysMem};
    ///
    /// let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build()?;
    /// let lw = Arc::new(Lwbufs::builder(Arc::new(ModelMmu::new(&mem, 4)?)).cpus(2).build()?);
    /// let lw2 = Arc::clone(&lw);
    /// std::thread::spawn(move || {
    ///     lw2.bind_for_thread(1).expect("bind");
    ///     assert_eq!(lw2.current_cpu(), Some(1));
    /// })
    /// .join()
    /// .unwrap();
    /// let _cpu1 = lw.bind(1)?; // released when the thread exited
    /// # Ok::<(), lwbuf::Error>(())
    /// ```
    pub fn bind_for_thread(self: &Arc<Self>, cpu: usize) -> Result<()> {
        let guard = self.bind(cpu)?;
        let kept = FOR_LIFE.try_with(|f| f.0.borrow_mut().push((Arc::clone(self), cpu)));
        match kept {
            Ok(()) => {
                // The thread-local drops an equal guard at thread exit.
                std::mem::forget(guard);
                Ok(())
            }
            Err(_) => {
                drop(guard);
                Err(Error::config("binding", "the thread is exiting"))
            }
        }
    }
}
