//! Random operation sequences against the lwbuf caches and the sf_buf pool,
//! checked step by step against a small reference model.
//!
//! Shared, through `#[path]`, by `tests/proptest_model.rs` (proptest) and
//! `fuzz/fuzz_targets/lwbuf_ops.rs` (cargo-fuzz): both build [`Op`]s from
//! three bytes each ([`Op::from_parts`], [`decode`]) and run them with
//! [`run`], which panics at the first difference between the library and the
//! model.
//!
//! The system: 4 CPUs, 16 frames (one contiguous run) plus one frame of
//! another `PhysMem`; an lwbuf window far larger than anything the sequences
//! can map (so slot allocation never evicts, and the model can leave slots
//! out), and an sf_buf window of 6 slots (so the pool fills, evicts for room
//! and answers `WouldBlock`). Two threads: the driver, and a helper that
//! binds a CPU of its own and otherwise stays idle, so messages to its CPU
//! wait in the mailbox until it (or someone on its behalf) applies them.
//!
//! The model keeps, per CPU: `key -> refcount`, the clock queue of unused
//! entries (front = oldest release) with its queued and referenced marks,
//! the mailbox, and the counters; per handle:
//! its key, home and cpumask; for the pool: `frame -> {refcount, referenced,
//! on the LRU}` and the clock LRU. It predicts every result (`Ok`, or which
//! error), every counter of `Lwbufs::stats` and `SfPool::stats` (hits,
//! misses, evictions, mapped, cached, mailbox lengths, messages sent and
//! applied, no-wait failures), the MMU's enter and remove calls, and the
//! reference total `check_consistency` returns. It also checks that every
//! address handed out reads its own frame, and that an entry keeps its
//! address for as long as it stays mapped.

//!
//! One job per file: `op.rs` (the operations and the fuzz input codec),
//! `model.rs` (the reference model), `helper.rs` (the second CPU's idle
//! owner thread), `driver.rs` (running a sequence on both, comparing).

#![allow(dead_code)]

mod driver;
mod helper;
mod model;
mod op;

pub use driver::run;
// The driver reaches the model and the helper through `super::*`.
#[allow(unused_imports)]
use helper::*;
#[allow(unused_imports)]
use model::*;
#[allow(unused_imports)] // each includer uses part of it
pub use op::{decode, Op, OPCODES};

/// CPUs of the system.
pub const CPUS: usize = 4;
/// Frames of the memory (one contiguous run).
pub const FRAMES: usize = 16;
/// Slots of the lwbuf window: more than any sequence can use (at most
/// `MAX_OPS` handles of at most 4 pages on each of `CPUS` CPUs, plus the
/// free slots each CPU keeps).
pub const LW_SLOTS: usize = 2048;
/// Slots of the sf_buf window: few, so it fills.
pub const SF_SLOTS: usize = 6;
/// Operations per sequence at most (the fuzz decoder stops there).
pub const MAX_OPS: usize = 256;

/// Which MMU the system runs on: the one of every integration test.
#[path = "../backend.rs"]
mod backend;
pub use backend::Backend;
