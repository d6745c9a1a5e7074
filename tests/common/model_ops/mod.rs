//! Random operation sequences against the lwbuf caches and the sf_buf pool,
//! checked step by step against a small reference model.
//!
//! Shared, through `#[path]`, by `tests/proptest_model.rs` (proptest) and
//! `fuzz/fuzz_targets/lwbuf_ops.rs` (cargo-fuzz): both build [`Op`]s from
//! three bytes each ([`Op::from_parts`], [`decode`]) and run them with
//! [`run`] under a [`Config`] (mapping granule 1, 2 or 4 frames; strict or
//! lazy reclaim, for both caches), which panics at the first difference
//! between the library and the model.
//!
//! The system: 4 CPUs, 15 frames (one contiguous run, so that with a
//! granule of 2 or 4 the last granule is short) plus one frame of another
//! `PhysMem`; an lwbuf window far larger than anything the sequences can map
//! (so slot allocation never evicts, and the model can leave out where the
//! slots lie), and an sf_buf window of 6 slots (6, 3 or 1 granules: the pool
//! fills, evicts for room and answers `WouldBlock`). Two threads: the
//! driver, and a helper that binds a CPU of its own and otherwise stays
//! idle, so messages to its CPU wait in the mailbox until it (or someone on
//! its behalf) applies them.
//!
//! The model keeps, per CPU: `key -> refcount` (a key is a granule, or a
//! run across granules), the clock queue of unused entries (front = oldest
//! release) with its queued and referenced marks, the mailbox, the list of
//! free granules the CPU holds (clean, or stale: still entered by an
//! evicted mapping under lazy reclaim) and the counters; per handle: its
//! key, its frames, home and cpumask; for the pool: `key -> {refcount,
//! referenced, on the LRU}` and the clock LRU; per window: the free clean
//! granules (a count) and the list of stale claims. It predicts every
//! result (`Ok`, or which error), every counter of `Lwbufs::stats` and
//! `SfPool::stats` (hits, misses, evictions, mapped, cached, mailbox
//! lengths, messages sent and applied, no-wait failures), what `reclaim`
//! returns, the reference total `check_consistency` returns, and per window
//! the MMU's enters, replaces in place, pages entered, replaced and removed,
//! slots mapped, and the frames entered (read slot by slot): the entries'
//! plus the stale ones. Removes are exact under strict reclaim and a range
//! under lazy (see `MmuCount` in `model.rs`); on the real window, every enter,
//! replace and remove is one system call. It also checks that every address
//! handed out reads its own frames, and that an entry keeps its address
//! (and an sf_buf its slot) for as long as it stays mapped.
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
pub use op::{decode, decode_case, Config, Op, OPCODES};

/// CPUs of the system.
pub const CPUS: usize = 4;
/// Frames of the memory (one contiguous run; not a multiple of 2 or 4).
pub const FRAMES: usize = 15;
/// Slots of the lwbuf window: more than any sequence can use. An operation
/// makes at most one entry, of at most 4 slots (a run of up to 4 pages, or a
/// granule of up to 4 frames), and a CPU holds beyond its entries at most
/// the free granules of one batch (32 granules of up to 4 slots): at most
/// `4 * MAX_OPS + CPUS * 32 * 4` = 1536 slots.
pub const LW_SLOTS: usize = 2048;
/// Slots of the sf_buf window: few, so it fills.
pub const SF_SLOTS: usize = 6;
/// Operations per sequence at most (the fuzz decoder stops there).
pub const MAX_OPS: usize = 256;

/// Which MMU the system runs on: the one of every integration test.
#[path = "../backend.rs"]
mod backend;
pub use backend::Backend;
