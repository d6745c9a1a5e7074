//! CPUs: ids, masks, thread binding and the per-CPU mailboxes.
//!
//! CPU ids are virtual: a system is created with any count (64 or 256 on a
//! 2-core machine is fine) and a thread *binds* itself to one id. Optional
//! pinning puts the thread on core `cpu % cores`.

mod bind;
mod mailbox;
mod mask;
mod owned;

pub use bind::MAX_BINDINGS_PER_THREAD;
pub(crate) use bind::{bind, current, table_id, unbind, BindTable};
pub(crate) use mailbox::Mailbox;
pub(crate) use mask::Others;
pub use mask::{CpuMask, INLINE_CPUS};
pub(crate) use owned::{barrier, Owned, OwnerGuard, StealGuard};

/// Pin the calling thread to core `cpu % cores` (core_affinity). Returns
/// whether the OS accepted it. A system call; do it once per thread.
pub fn pin_to_core(cpu: usize) -> bool {
    #[cfg(loom)]
    {
        let _ = cpu;
        true
    }
    #[cfg(not(loom))]
    {
        match core_affinity::get_core_ids() {
            Some(ids) if !ids.is_empty() => core_affinity::set_for_current(ids[cpu % ids.len()]),
            _ => false,
        }
    }
}
