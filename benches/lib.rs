//! Criterion benchmarks for Switchyard; see `codec.rs` and `storage.rs`.
//! Run with `cargo bench -p switchyard-benches`.
