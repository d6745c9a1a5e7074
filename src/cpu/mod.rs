//! CPUs: ids, masks, thread binding and the per-CPU mailboxes.
//!
//! CPU ids are virtual: a system is created with any count (64 or 256 on a
//! 2-core machine is fine) and a thread *binds* itself to one id. Optional
//! pinning puts the thread on core `cpu % cores`.

mod bind;
mod mailbox;
mod mask;
pub mod owned;

use crate::error::Result;
pub use bind::MAX_BINDINGS_PER_THREAD;

pub(crate) use bind::{bind, current, table_id, unbind, BindTable};
pub(crate) use mailbox::Mailbox;
pub(crate) use mask::Others;
pub use mask::{CpuMask, INLINE_CPUS};
pub(crate) use owned::{Owned, OwnerGuard, StealGuard};

/// Pin the calling thread to the `cpu % n`-th of the `n` cores it may run
/// on now (its affinity mask), and return that core's id. One system call to
/// read the mask and one to set it; do it once per thread. Errors: the
/// kernel's, as [`Error::Sys`](crate::Error::Sys) (`sched_getaffinity` / `sched_setaffinity`).
pub fn pin_to_core(cpu: usize) -> Result<usize> {
    #[cfg(loom)]
    {
        Ok(cpu)
    }
    #[cfg(not(loom))]
    {
        crate::sys::pin_to_nth_core(cpu).map_err(|(op, e)| crate::error::Error::sys(op, e))
    }
}
