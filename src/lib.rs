//! Lightweight page mappings for userspace: the kernel's `lwbuf`
//! (DragonFly BSD), `sf_buf` (FreeBSD/DragonFly) and `kmap_local` (Linux),
//! over a memfd and a reserved window of address space.
//!
//! "Physical pages" are frames of a memfd ([`PhysMem`], [`Page`]); the
//! "kernel address space" is a reserved `PROT_NONE` window ([`Window`]);
//! mapping a page is an `mmap(MAP_SHARED | MAP_FIXED)` of one frame into one
//! slot of the window, and in a multi-threaded process every unmap is a TLB
//! shootdown costing microseconds. The caches hand out mappings in
//! nanoseconds instead: per-CPU [`Lwbufs`] for threads bound to CPUs, and
//! the shared [`SfPool`] for everyone else.
//!
//! ```
//! use std::sync::Arc;
//! use lwbuf::{Lwbufs, PhysMem, SfPool, Wait, Window};
//!
//! let mem = PhysMem::builder().frames(1024).build()?;   // 4 MiB of sparse "RAM"
//! let page = mem.alloc_page()?;                         // a held frame
//!
//! // Per-CPU caches: bind the thread to a CPU, map, use, drop (stays cached).
//! let lw = Lwbufs::builder(Arc::new(Window::builder(&mem).slots(64).build()?)).cpus(4).build()?;
//! let cpu = lw.bind(0)?;
//! let buf = lw.alloc(&page)?;                           // a miss: one mmap
//! buf.kva()?.write_at(0, b"hello")?;
//! drop(buf);
//! let again = lw.alloc(&page)?;                         // a hit: no system call
//! let mut b = [0u8; 5];
//! again.kva()?.read_at(0, &mut b)?;
//! assert_eq!(&b, b"hello");
//! drop((again, cpu));
//!
//! // The shared pool: no binding; wait, or not, when the window is full.
//! let pool = SfPool::builder(Arc::new(Window::builder(&mem).slots(64).build()?)).build()?;
//! let sf = pool.alloc(&page, Wait::NoWait)?;
//! assert_eq!(sf.kva().read_u64(0)?, u64::from_ne_bytes(*b"hello\0\0\0"));
//! # Ok::<(), lwbuf::Error>(())
//! ```
//!
//! # Layers, and where each argument lives
//!
//! Data flows down; nothing points up. Each layer's module documentation
//! holds the argument for what it promises.
//!
//! - [`sendfile`]: a page-cache file and every way of sending a byte range
//!   of it to a socket, through the caches or not.
//! - [`lwbuf`](mod@lwbuf): the per-CPU caches; the passive-IPI release
//!   protocol. [`cpu`]: CPU ids, masks, binding; [`cpu::owned`] argues why
//!   an owner may enter its CPU's cache with no atomic read-modify-write.
//! - [`sfbuf`]: the shared pool; the proof that a lock-free hit never sees
//!   a slot unmapped or remapped, and of pinned hits; [`sfbuf::wait`] the
//!   argument that no wake-up is lost.
//! - [`kva`]: one window's slot allocator; its types make "unmap before the
//!   slot is reused" the only possible order.
//! - [`mmu`]: the seam: the real [`Window`] and the [`ModelMmu`] that makes
//!   no system call (loom models and simulations run on it).
//! - [`phys`]: the memfd "RAM", its frame allocator, the direct map.
//! - [`Kaddr`]: the memory model of shared bytes (what a reader sees while
//!   a writer runs: whole words, never undefined behaviour), and fd I/O
//!   straight from and into mappings ([`Kaddr::write_to`], [`IoVec`]
//!   batches, [`Kaddr::read_from`]).
//!
//! For async servers, [`OwnedLwbuf`] and [`OwnedSfBuf`] are `'static`
//! handles (they own an `Arc` of their cache and clones of their pages),
//! and [`Lwbufs::bind_for_thread`] binds a runtime's worker thread for its
//! whole life.
//!
//! The loom models of every protocol are in `loom-tests/`; each has a
//! mutant twin that must fail.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod cpu;
mod error;
mod extent;
mod hash;
mod kaddr;
pub mod kva;
pub mod lwbuf;
pub mod mmu;
mod owned;
pub mod pagecache;
pub mod phys;
pub mod sendfile;
pub mod sfbuf;
mod sync;
mod sys;

pub use cpu::{pin_to_core, CpuMask, INLINE_CPUS, MAX_BINDINGS_PER_THREAD};
pub use error::{Error, Inconsistency, Result};

/// Loom-only hooks for the model-checking suite in `loom-tests/`.
#[cfg(loom)]
#[doc(hidden)]
pub mod __loom {
    pub use crate::lwbuf::entry_slot as lwbuf_entry_slot;
    pub use crate::lwbuf::local_entry_slot as lwbuf_local_slot;
    pub use crate::sync::mutants::{set as set_mutant, Mutant};

    /// What a thread's exit does outside loom, where a thread-local
    /// destructor runs it: give the thread's statistics stripe, and with it
    /// its row of sf_buf pins, back for the next thread to claim. A model
    /// calls it last in a thread whose row it hands on (loom runs
    /// thread-local destructors too late for that, see `sfbuf/counter.rs`).
    pub fn exit_thread() {
        crate::sfbuf::exit_thread();
    }
}

pub use extent::ExtentStats;
pub use kaddr::{IoVec, Kaddr, IOV_MAX};
pub use kva::{default_map_budget, Reclaim};
pub use lwbuf::{CpuGuard, CpuStats, Lwbuf, LwbufStats, Lwbufs, LwbufsBuilder, OwnedLwbuf, MAX_CPUS};
pub use mmu::{Fault, FaultStats, FaultyMmu, Mmu, MmuStats, ModelMmu, Slot, Window, WindowBuilder};
pub use phys::{
    huge_page_size, huge_pages_free, system_page_size, Backing, FrameStats, Page, Pfn, PhysMem, PhysMemBuilder,
    MAX_REGION_BYTES,
};
pub use sfbuf::{CancelToken, OwnedSfBuf, SfBuf, SfPool, SfPoolBuilder, SfStats, Wait};

/// README.md's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
