//! What the integration tests share: the two `Mmu` backends every generic
//! test runs on, and per-frame stamps to check reads against.
//!
//! Included with `#[macro_use] #[path = "common/backend.rs"] mod backend;`.

#![allow(dead_code, unused_macros)]

use std::sync::{Arc, Mutex};

use lwbuf::{system_page_size, Backing, Mmu, ModelMmu, Page, PhysMem, Window};

/// Which `Mmu` implementation a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The real reserved window over a memfd.
    Window,
    /// The model MMU over heap memory: no system calls.
    Model,
}

/// The backends a test that loops over them runs on: both, the real window
/// first; under Miri only the model (the window needs `memfd_create` and
/// `mmap`, which Miri cannot run).
pub const BACKENDS: &[Backend] = if cfg!(miri) { &[Backend::Model] } else { &[Backend::Window, Backend::Model] };

impl Backend {
    /// `frames` frames of the system page size this backend can map.
    pub fn phys(self, frames: usize) -> PhysMem {
        self.phys_sized(frames, system_page_size())
    }

    /// Memory this backend can map: a memfd for the window, the heap for the model.
    pub fn phys_sized(self, frames: usize, frame_size: usize) -> PhysMem {
        let backing = match self {
            Backend::Window => Backing::Memfd,
            Backend::Model => Backing::Heap,
        };
        PhysMem::builder().frames(frames).frame_size(frame_size).backing(backing).build().expect("build PhysMem")
    }

    /// An MMU of `slots` slots over `mem`.
    pub fn mmu(self, mem: &PhysMem, slots: usize) -> Arc<dyn Mmu> {
        match self {
            Backend::Window => Arc::new(Window::builder(mem).slots(slots).build().expect("build Window")),
            Backend::Model => Arc::new(ModelMmu::new(mem, slots).expect("build ModelMmu")),
        }
    }
}

/// Instantiate each generic test `fn name(Backend)` once per backend, as
/// `on_window::name` and `on_model::name`. Under Miri only the model half
/// runs: the window needs `memfd_create` and `mmap`, which Miri cannot run.
/// Attributes written before a name apply to its model half, e.g.
/// `#[cfg_attr(miri, ignore = "why")] name` to leave it out of the Miri run.
macro_rules! on_both_backends {
    ($($(#[$model_attr:meta])* $name:ident),* $(,)?) => {
        mod on_window {
            $(
                #[test]
                #[cfg_attr(miri, ignore = "the real window needs memfd_create and mmap")]
                fn $name() { super::$name(super::Backend::Window) }
            )*
        }
        mod on_model {
            $(
                #[test]
                $(#[$model_attr])*
                fn $name() { super::$name(super::Backend::Model) }
            )*
        }
    };
}

/// The word `word` of frame `pfn`'s stamp.
pub fn pattern(pfn: usize, word: usize) -> u64 {
    (pfn as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (word as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
}

/// Fill `page` with its pattern through the direct map.
pub fn stamp(page: &Page) {
    let fs = system_page_size();
    let mut buf = vec![0u8; fs];
    for (w, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&pattern(page.pfn().0, w).to_ne_bytes());
    }
    page.direct().expect("direct map").write_at(0, &buf).expect("stamp");
}

/// `n` fresh pages, stamped.
pub fn stamped_pages(mem: &PhysMem, n: usize) -> Vec<Page> {
    (0..n)
        .map(|_| {
            let p = mem.alloc_page().expect("alloc_page");
            stamp(&p);
            p
        })
        .collect()
}

/// A stamped run of `n` contiguous frames.
pub fn stamped_run(mem: &PhysMem, n: usize) -> Vec<Page> {
    let run = mem.alloc_run(n).expect("alloc_run");
    run.iter().for_each(stamp);
    run
}

/// What tests leak on purpose (to get `'static` borrows for thread-locals
/// and threads), kept reachable from a static so that leak checkers (Miri,
/// LeakSanitizer) know it is meant to live until the process exits.
static LEAKED: Mutex<Vec<&'static dyn Sync>> = Mutex::new(Vec::new());

/// Leak `v` for the rest of the process (see `LEAKED`).
pub fn leak<T: Sync + 'static>(v: T) -> &'static T {
    let r: &'static T = Box::leak(Box::new(v));
    LEAKED.lock().unwrap().push(r);
    r
}

/// Runs its closure when dropped (in a thread-local: at thread exit).
pub struct RunOnDrop(pub Option<Box<dyn FnOnce()>>);

impl Drop for RunOnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}
