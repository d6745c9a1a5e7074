//! Lightweight page mappings for userspace.
//!
//! "Physical pages" are frames of a memfd ([`PhysMem`], [`Page`]); the
//! "kernel address space" is a reserved `PROT_NONE` window ([`Window`]);
//! mapping a page is an `mmap(MAP_SHARED | MAP_FIXED)` of one frame into one
//! slot of the window, and in a multi-threaded process every unmap is a TLB
//! shootdown costing tens of microseconds. The caches above the [`Mmu`] seam
//! hand out mappings in nanoseconds instead.
//!
//! ```
//! use lwbuf::{Mmu, PhysMem, Pfn, Slot, Window};
//!
//! let mem = PhysMem::builder().frames(256).build()?;    // a sparse memfd
//! let page = mem.alloc_page()?;                          // a frame, held
//! page.direct()?.write_at(0, b"frame bytes")?;           // via the direct map
//!
//! let win = Window::builder(&mem).slots(64).build()?;    // PROT_NONE reservation
//! // SAFETY: slot 5 is free and nothing refers to it.
//! let addr = unsafe { win.enter(Slot(5), page.pfn(), 1)? };
//! let mut buf = [0u8; 11];
//! // SAFETY: slot 5 maps the page's frame, 4 KiB of readable bytes.
//! unsafe { std::ptr::copy_nonoverlapping(addr.as_ptr(), buf.as_mut_ptr(), 11) };
//! assert_eq!(&buf, b"frame bytes");
//! // SAFETY: nothing refers to slot 5 any more.
//! unsafe { win.remove(Slot(5), 1)? };
//! # Ok::<(), lwbuf::Error>(())
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

mod cpu;
mod error;
mod extent;
mod hash;
mod kaddr;
mod kva;
mod lwbuf;
mod mmu;
mod phys;
pub mod sendfile;
mod sfbuf;
mod sync;

pub use cpu::{pin_to_core, CpuMask, INLINE_CPUS, MAX_BINDINGS_PER_THREAD};
pub use error::{Error, Inconsistency, Result};

/// Loom-only hooks for the model-checking suite in `loom-tests/`.
#[cfg(loom)]
#[doc(hidden)]
pub mod __loom {
    pub use crate::sync::mutants::{set as set_mutant, Mutant};
}

pub use extent::ExtentStats;
pub use kaddr::Kaddr;
pub use kva::default_map_budget;
pub use lwbuf::{CpuGuard, CpuStats, Lwbuf, LwbufStats, Lwbufs, LwbufsBuilder, MAX_CPUS};
pub use mmu::{Fault, FaultStats, FaultyMmu, Mmu, MmuStats, ModelMmu, Slot, Window, WindowBuilder};
pub use phys::{system_page_size, Backing, FrameStats, Page, Pfn, PhysMem, PhysMemBuilder, MAX_REGION_BYTES};
pub use sfbuf::{CancelToken, SfBuf, SfPool, SfPoolBuilder, SfStats, Wait};

/// README.md's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
