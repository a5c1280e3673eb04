//! What the storage writer measures about itself, for metrics: one
//! histogram observation per commit, sync or checkpoint, never per record.

use prometheus_client::metrics::histogram::Histogram;

/// Histograms of the group commit, shared by the writer and the metrics
/// collector.
#[derive(Debug)]
pub struct StorageStats {
    /// Records per group commit.
    pub commit_records: Histogram,
    /// Wall time of a group commit, applying and making it durable, in
    /// seconds.
    pub commit_seconds: Histogram,
    /// Appending and syncing one journal entry, in seconds.
    pub journal_sync_seconds: Histogram,
    /// A durable database commit (its fsyncs), in seconds.
    pub database_sync_seconds: Histogram,
    /// A journal checkpoint, in seconds.
    pub checkpoint_seconds: Histogram,
    /// A cluster leader's data commit from proposing its redo until the
    /// entry is durable on a majority and its turn to be applied, in
    /// seconds (the cluster's counterpart of the journal sync).
    pub replicate_seconds: Histogram,
    /// Whether the dedup windows have been read since the storage opened
    /// (until then every message id is looked up on disk).
    pub dedup_loaded: std::sync::atomic::AtomicBool,
}

/// Buckets for durations from 50 µs to about 3 s.
pub fn seconds_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 17)
}

impl Default for StorageStats {
    fn default() -> Self {
        let records = || {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                1.0, 2.0, 15,
            ))
        };
        let secs = || Histogram::new(seconds_buckets());
        StorageStats {
            commit_records: records(),
            commit_seconds: secs(),
            journal_sync_seconds: secs(),
            database_sync_seconds: secs(),
            checkpoint_seconds: secs(),
            replicate_seconds: secs(),
            dedup_loaded: Default::default(),
        }
    }
}
