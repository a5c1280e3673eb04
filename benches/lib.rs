//! Criterion benchmarks for Switchyard (`codec`, `storage`, `plugins`,
//! `publish`, `fanout`, `queue`, `handshake`, `groups`), and what they
//! share.
//! Run with `cargo bench -p switchyard-benches`.

use switchyard::storage::{Storage, StorageConfig};

/// The value after `--name` on the command line, or `default`: enough
/// argument parsing for the load examples.
pub fn flag(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// A store in a fresh temporary directory, with the runtime its async calls
/// run on (`workers` threads). Keep the directory alive as long as the store.
pub fn temp_store(workers: usize) -> (tokio::runtime::Runtime, tempfile::TempDir, Storage) {
    temp_store_with(workers, StorageConfig::default())
}

/// [`temp_store`] with a storage configuration of its own.
pub fn temp_store_with(
    workers: usize,
    config: StorageConfig,
) -> (tokio::runtime::Runtime, tempfile::TempDir, Storage) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temporary directory");
    let storage = Storage::open(&dir.path().join("bench.redb"), config).expect("open the store");
    (rt, dir, storage)
}
