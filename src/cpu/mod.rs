//! CPUs: ids, masks, thread binding and the per-CPU mailboxes.
//!
//! CPU ids are virtual: a system is created with any count (64 or 256 on a
//! 2-core machine is fine) and a thread *binds* itself to one id. Optional
//! pinning puts the thread on core `cpu % cores`.

mod bind;
mod mailbox;
mod mask;
pub mod owned;

use crate::error::{Error, Result};
pub use bind::MAX_BINDINGS_PER_THREAD;

pub(crate) use bind::{bind, current, table_id, unbind, BindTable};
pub(crate) use mailbox::Mailbox;
pub(crate) use mask::Others;
pub use mask::{CpuMask, INLINE_CPUS};
pub(crate) use owned::{barrier, Owned, OwnerGuard, StealGuard};

/// Pin the calling thread to the `cpu % n`-th of the `n` cores it may run
/// on now (its affinity mask), and return that core's id. One system call to
/// read the mask and one to set it; do it once per thread. Errors: the
/// kernel's, as [`Error::Sys`] (`sched_getaffinity` / `sched_setaffinity`).
pub fn pin_to_core(cpu: usize) -> Result<usize> {
    #[cfg(loom)]
    {
        Ok(cpu)
    }
    #[cfg(not(loom))]
    {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        use nix::unistd::Pid;

        let me = Pid::from_raw(0);
        let allowed = sched_getaffinity(me).map_err(|e| Error::sys("sched_getaffinity", e))?;
        let cores: Vec<usize> = (0..CpuSet::count()).filter(|&c| allowed.is_set(c).unwrap_or(false)).collect();
        // The kernel never reports an empty mask for a running thread.
        let core = *cores
            .get(cpu % cores.len().max(1))
            .ok_or_else(|| Error::sys("sched_getaffinity", nix::errno::Errno::EINVAL))?;
        let mut set = CpuSet::new();
        set.set(core).map_err(|e| Error::sys("sched_setaffinity", e))?;
        sched_setaffinity(me, &set).map_err(|e| Error::sys("sched_setaffinity", e))?;
        Ok(core)
    }
}
