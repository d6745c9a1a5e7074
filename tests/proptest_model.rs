//! Property test: random sequences of operations on the lwbuf caches and the
//! sf_buf pool (bind and unbind CPUs on two threads, alloc, runs, broken
//! runs, foreign pages, the address on another CPU, drops on a CPU or with
//! none, `set_max_excess`, `poll`, `reclaim`, `map_local`; sf_buf alloc,
//! runs, drop, `set_max_excess` and `reclaim`), under a mapping granule of
//! 1, 2 or 4 frames and strict or lazy reclaim, give the results, counters
//! and MMU calls that a small reference model predicts. The operations, the
//! model and the runner are in `tests/common/model_ops/`, shared with the
//! cargo-fuzz target `fuzz/fuzz_targets/lwbuf_ops.rs`.
//!
//! A failing input found by fuzzing goes below as a `#[test]` that replays
//! it (`let (cfg, ops) = decode_case(bytes); run(&ops, .., cfg)`); none so
//! far.

#[path = "common/model_ops/mod.rs"]
mod model_ops;

use model_ops::{decode, decode_case, run, Backend, Config, Op, MAX_OPS, OPCODES};
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    (0..OPCODES, any::<u8>(), any::<u8>()).prop_map(|(c, a, b)| Op::from_parts(c, a, b))
}

fn ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..max)
}

/// A configuration of the caches; shrinks towards granule 1, strict.
fn cfg() -> impl Strategy<Value = Config> {
    (0..Config::ALL.len()).prop_map(|i| Config::ALL[i])
}

/// Operations per case (fewer under Miri).
const MAX_LEN: usize = if cfg!(miri) { 60 } else { 200 };

/// Under Miri (about 100x slower, and isolated from the file system) a few
/// cases, and no failure file: persistence looks for the source directory.
fn settings(cases: u32) -> ProptestConfig {
    if cfg!(miri) {
        ProptestConfig { cases: 4, failure_persistence: None, ..ProptestConfig::default() }
    } else {
        ProptestConfig { cases, ..ProptestConfig::default() }
    }
}

proptest! {
    #![proptest_config(settings(512))]

    #[test]
    fn model_backend_matches_the_reference_model(cfg in cfg(), ops in ops(MAX_LEN)) {
        run(&ops, Backend::Model, cfg);
    }
}

proptest! {
    #![proptest_config(settings(64))]

    #[test]
    #[cfg_attr(miri, ignore = "the real window needs memfd_create and mmap")]
    fn real_window_matches_the_reference_model(cfg in cfg(), ops in ops(200)) {
        run(&ops, Backend::Window, cfg);
    }
}

/// The configurations a scripted sequence runs under: every one, or under
/// Miri (where a run of 40 steps takes some 10 s) only `miri`.
fn script_configs(miri: Config) -> Vec<Config> {
    if cfg!(miri) {
        vec![miri]
    } else {
        Config::ALL.to_vec()
    }
}

/// A hand-written sequence through every path the model knows (the
/// comments say what each step does with a granule of 1), so a broken
/// runner cannot pass by doing nothing; run in every configuration (under
/// Miri in granule 1, strict only).
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
        MapLocal(7),  // a hit on the entry the handles hold
        MapLocal(6),  // a miss, given back at once (max_excess 0: unmapped)
        MapLocal(16), // ForeignPage
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
    for cfg in script_configs(Config::ALL[0]) {
        run(&ops, Backend::Model, cfg);
        // Miri cannot run the real window (memfd_create, mmap).
        if !cfg!(miri) {
            run(&ops, Backend::Window, cfg);
        }
    }
}

/// A hand-written sequence through the paths of a granule of 4 frames and
/// of lazy reclaim (the comments say what each step does there), checked
/// against the model in every configuration (under Miri in that one only);
/// in that one, the statistics show that the paths were taken.
#[test]
fn scripted_granules_and_lazy_reclaim() {
    use Op::*;
    let ops = [
        Bind(0),
        Alloc(1),        // h0: granule 0..4, a miss
        Alloc(2),        // h1: the same granule, a hit
        AllocRun(1, 3),  // h2: inside it, a hit
        AllocRun(3, 2),  // h3: across granules: granules 0 and 4 as one entry (8 slots)
        AllocRun(13, 4), // h4: frames 13..15, in the last granule, 12..15, short
        AllocRun(4, 4),  // h5: granule 4..8 as a run
        SetMaxExcess(0), // nothing unused yet
        Drop(3),         // h3: evicted, its claim stale (8 of 8 slots entered)
        Drop(4),         // h4: the same (3 of 4)
        Drop(0),         // h0
        Drop(1),         // h1
        Drop(1),         // h2: granule 0 evicted, stale
        Drop(0),         // h5: granule 4 evicted, stale, on top of CPU 0's list
        Alloc(9),        // h6: granule 8 over granule 4's claim, in place
        AllocRun(12, 3), // h7: the short granule over granule 0's: in place, one slot removed
        HelperBind(1),
        HelperKva(0),     // CPU 1 maps granule 8 into a clean claim
        HelperDrop(0),    // CPU 1's entry evicted (stale); a message to CPU 0
        Reclaim,          // CPU 0 applies it, evicts granule 8; four stale claims purged
        SfAlloc(0),       // the pool's one granule of slots: a miss
        SfAlloc(3),       // the same granule: a hit
        SfAllocRun(2, 2), // inside it: a hit
        SfAlloc(5),       // granule 4: the slots are in use, WouldBlock
        SfDrop(0),
        SfDrop(0),
        SfDrop(0),         // granule 0 cached
        SfAlloc(5),        // evicts it and maps granule 4 over it in place
        SfAllocRun(3, 2),  // cut to granule 0 (frame 3): the slots are in use, WouldBlock
        SfDrop(0),         // granule 4 cached
        SfSetMaxExcess(0), // evicted, its claim listed stale
        SfAllocRun(3, 2),  // granule 0 over it in place
        SfDrop(0),         // evicted, listed stale
        SfReclaim,         // removed
        HelperUnbind,
    ];
    let lazy_4 = Config { granule: 4, reclaim: lwbuf::Reclaim::Lazy };
    for cfg in script_configs(lazy_4) {
        let (lw, sf) = run(&ops, Backend::Model, cfg);
        if !cfg!(miri) {
            run(&ops, Backend::Window, cfg);
        }
        if cfg == lazy_4 {
            let cpu0 = &lw.per_cpu[0];
            assert_eq!((cpu0.hits, cpu0.misses, cpu0.evictions), (2, 6, 5), "{lw}");
            let m = &lw.mmu;
            assert_eq!((m.enters, m.replaces, m.pages_replaced, m.pages_removed, m.mapped), (7, 2, 7, 20, 3), "{lw}");
            assert!((3..=5).contains(&m.removes), "{lw}");
            assert_eq!((sf.hits, sf.misses, sf.evictions, sf.nowait_fails), (2, 3, 3, 2), "{sf}");
            let m = &sf.mmu;
            assert_eq!((m.enters, m.replaces, m.pages_replaced, m.removes, m.pages_removed), (3, 2, 8, 1, 4), "{sf}");
        }
    }
}

/// Found by the property test: under lazy reclaim with a granule of 2, the
/// short last granule (frame 14 of 15) mapped over granule 0's stale claim
/// was refused with `Config` ("frames 14..+2 outside a memory of 15"): the
/// replace checked the new frames over the old mapping's length.
#[test]
fn regression_short_granule_over_a_longer_stale_claim() {
    use Op::*;
    let cfg = Config { granule: 2, reclaim: lwbuf::Reclaim::Lazy };
    run(&[Bind(0), SetMaxExcess(0), Alloc(0), Drop(0), AllocRun(14, 1)], Backend::Model, cfg);
    if !cfg!(miri) {
        run(&[Bind(0), SetMaxExcess(0), Alloc(0), Drop(0), AllocRun(14, 1)], Backend::Window, cfg);
    }
}

/// The cases the property test once failed on, as it shrank them
/// (`proptest_model.proptest-regressions` keeps their seeds, but a seed
/// decodes to other operations whenever the opcode table changes): in
/// every configuration, on both backends (under Miri in the first
/// configuration, on the model).
#[test]
fn past_failures_replay() {
    use Op::*;
    let cases: [&[Op]; 4] = [
        &[
            Bind(0),
            Alloc(0),
            Alloc(4),
            Bind(0),
            Alloc(3),
            HelperDrop(1),
            Alloc(4),
            Drop(243),
            Drop(153),
            HelperDrop(102),
            HelperDrop(119),
            Poll,
            Alloc(4),
        ],
        &[
            Bind(0),
            Alloc(2),
            Drop(0),
            Alloc(1),
            Bind(0),
            Bind(0),
            Alloc(0),
            Alloc(2),
            Alloc(6),
            Alloc(3),
            Drop(2),
            Bind(0),
            Alloc(4),
            Drop(3),
            HelperBind(0),
            Bind(0),
            Drop(0),
            Alloc(2),
        ],
        &[
            SfAlloc(4),
            SfAlloc(1),
            Bind(0),
            SfAlloc(7),
            SfDrop(9),
            SfAlloc(4),
            SfSetMaxExcess(1),
            SfDrop(106),
            SfAlloc(6),
            SfAlloc(5),
            SfAlloc(6),
            SfDrop(220),
        ],
        &[
            SfAlloc(0),
            SfAlloc(1),
            SfAlloc(5),
            SfAlloc(4),
            SfDrop(2),
            SfDrop(17),
            SfAlloc(4),
            Bind(0),
            SfDrop(9),
            Bind(0),
            SfAlloc(2),
            SfDrop(4),
        ],
    ];
    for cfg in script_configs(Config::ALL[0]) {
        for ops in cases {
            run(ops, Backend::Model, cfg);
            if !cfg!(miri) {
                run(ops, Backend::Window, cfg);
            }
        }
    }
}

/// The fuzz decoder reads the configuration from the first byte, then
/// three bytes per operation, at most `MAX_OPS`.
#[test]
fn decoder_reads_three_bytes_per_op() {
    assert_eq!(decode(&[]), []);
    assert_eq!(decode(&[8, 3, 0, 1]), [Op::Alloc(3)]);
    assert_eq!(decode(&vec![13; 3 * MAX_OPS + 30]).len(), MAX_OPS);
    assert_eq!(decode_case(&[]), (Config::ALL[0], vec![]));
    assert_eq!(decode_case(&[5, 8, 3, 0]), (Config { granule: 4, reclaim: lwbuf::Reclaim::Lazy }, vec![Op::Alloc(3)]));
    assert_eq!(decode_case(&[6]), (Config::ALL[0], vec![]));
}
