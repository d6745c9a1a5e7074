//! Property test: random sequences of operations on the lwbuf caches and the
//! sf_buf pool (bind and unbind CPUs on two threads, alloc, runs, broken
//! runs, foreign pages, the address on another CPU, drops on a CPU or with
//! none, `set_max_excess`, `poll`, `reclaim`; sf_buf alloc, drop and
//! `set_max_excess`) give exactly the results, counters and MMU calls that a
//! small reference model predicts. The operations, the model and the runner
//! are in `tests/common/model_ops/`, shared with the cargo-fuzz target
//! `fuzz/fuzz_targets/lwbuf_ops.rs`.
//!
//! A failing input found by fuzzing goes below as a `#[test]` that replays
//! it (`run(&decode(bytes), ..)`); none so far (two 5-minute runs, about
//! 240,000 executions).

#[path = "common/model_ops/mod.rs"]
mod model_ops;

use model_ops::{decode, run, Backend, Op, MAX_OPS, OPCODES};
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    (0..OPCODES, any::<u8>(), any::<u8>()).prop_map(|(c, a, b)| Op::from_parts(c, a, b))
}

fn ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..max)
}

/// Operations per case (fewer under Miri).
const MAX_LEN: usize = if cfg!(miri) { 60 } else { 200 };

/// Under Miri (about 100x slower, and isolated from the file system) a few
/// cases, and no failure file: persistence looks for the source directory.
fn config(cases: u32) -> ProptestConfig {
    if cfg!(miri) {
        ProptestConfig { cases: 4, failure_persistence: None, ..ProptestConfig::default() }
    } else {
        ProptestConfig { cases, ..ProptestConfig::default() }
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn model_backend_matches_the_reference_model(ops in ops(MAX_LEN)) {
        run(&ops, Backend::Model);
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    #[cfg_attr(miri, ignore = "the real window needs memfd_create and mmap")]
    fn real_window_matches_the_reference_model(ops in ops(200)) {
        run(&ops, Backend::Window);
    }
}

/// A hand-written sequence through every path the model knows, so a broken
/// runner cannot pass by doing nothing.
#[test]
fn scripted_sequence_covers_the_paths() {
    use Op::*;
    let ops = [
        Alloc(0), // NotBound
        Bind(9),  // NoSuchCpu
        Bind(0),
        Bind(1),       // AlreadyBound
        HelperBind(0), // CpuBusy
        HelperBind(1),
        Alloc(0),
        Alloc(16), // ForeignPage
        AllocRun(2, 4),
        AllocRun(3, 0),    // Config: empty
        AllocBroken(4, 0), // Config: gap
        AllocBroken(4, 1), // ForeignPage
        HelperKva(0),      // CPU 1 joins handle 0's mask
        HelperKva(1),      // and the run's
        Drop(0),           // on CPU 0: a message to CPU 1, bound and idle
        HelperPoll,        // applied
        Alloc(5),
        HelperDrop(1), // on CPU 1: a message to CPU 0
        Poll,
        Unbind,
        Drop(0), // unbound
        SetMaxExcess(0),
        Bind(2),
        Alloc(7),
        Alloc(7),
        Kva(0),
        Reclaim,
        SfAlloc(0),
        SfAlloc(1),
        SfAlloc(16), // ForeignPage
        SfAlloc(2),
        SfAlloc(3),
        SfAlloc(4),
        SfAlloc(5),
        SfAlloc(6), // WouldBlock: six slots in use
        SfDrop(0),
        SfAlloc(6), // evicts for room
        SfSetMaxExcess(0),
        SfDrop(0),
        SfDrop(0),
        HelperUnbind,
    ];
    run(&ops, Backend::Model);
    // Miri cannot run the real window (memfd_create, mmap).
    if !cfg!(miri) {
        run(&ops, Backend::Window);
    }
}

/// The fuzz decoder reads three bytes per operation, at most `MAX_OPS`.
#[test]
fn decoder_reads_three_bytes_per_op() {
    assert_eq!(decode(&[]), []);
    assert_eq!(decode(&[8, 3, 0, 1]), [Op::Alloc(3)]);
    assert_eq!(decode(&vec![13; 3 * MAX_OPS + 30]).len(), MAX_OPS);
}
