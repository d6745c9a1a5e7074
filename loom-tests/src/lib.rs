//! Loom models of the lwbuf protocols live in `tests/`; this crate has no code of its own.
