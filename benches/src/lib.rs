//! hoststack benchmarks.
//!
//! The criterion micro-benchmarks of the shared-memory primitives live in
//! `benches/fifo.rs` (`cargo bench -p hoststack-benches --bench fifo`).
