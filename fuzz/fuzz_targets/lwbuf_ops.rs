//! Fuzz the lwbuf caches and the sf_buf pool with operation sequences,
//! checked step by step against the reference model.
//!
//! The input's first byte picks the configuration of the caches (mapping
//! granule 1, 2 or 4 frames; strict or lazy reclaim), and the rest is
//! decoded three bytes per operation into the same [`Op`]s the property test
//! `tests/proptest_model.rs` generates; they are run by the same runner
//! against the same model (`tests/common/model_ops/`), on the model MMU (no
//! system calls, so many executions per second).
//!
//! ```text
//! cargo +nightly fuzz run lwbuf_ops -- -max_total_time=300
//! ```
//!
//! A crashing input goes into `tests/proptest_model.rs` as a regression test.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/common/model_ops/mod.rs"]
mod model_ops;

fuzz_target!(|data: &[u8]| {
    let (cfg, ops) = model_ops::decode_case(data);
    model_ops::run(&ops, model_ops::Backend::Model, cfg);
});
