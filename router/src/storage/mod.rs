//! Durable storage in redb: partition logs, topic metadata, group offsets and
//! retention.
//!
//! Writes go through one writer thread (`writer`) that batches appends from
//! every connection into one write transaction and one fsync (group commit),
//! then acknowledges each request with its offsets. Reads ([`log`]) use
//! redb's MVCC read transactions and never wait for the writer.

pub mod check;
pub mod disk;
mod error;
pub mod log;
pub mod stats;
pub use log::ReadLimit;
#[cfg(test)]
mod dedup_tests;
pub(crate) mod journal;
#[cfg(test)]
mod power_loss;
#[cfg(test)]
mod replica_tests;
pub(crate) mod tables;
mod writer;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

pub use error::StorageError;
use tables::{OFFSETS, PARTITIONS, TOPICS};
use writer::WriteOp;

use crate::protocol::{PartitionInfo, RawRecord, TopicInfo};

/// Replicates each commit before it is made (a cluster's leader).
///
/// With a replicator the writer records every change of every commit as
/// a redo (`journal`'s format) and, instead of syncing the journal or the
/// database, hands the redo to [`Replicator::replicate`], which returns
/// once a majority holds it durably. The transaction then commits without
/// a sync: the replicated log is what a restart recovers from.
pub trait Replicator: Send + Sync + 'static {
    /// Proposes `redo` and blocks until it is committed and it is its turn
    /// to be applied here; then writes the applied position into `txn`.
    /// An error means it was not committed by this leader (the commit is
    /// refused; a retry with the message id is safe).
    fn replicate(&self, redo: &[u8], txn: &redb::WriteTransaction) -> Result<(), StorageError>;
    /// Reports whether the transaction of the last successful
    /// [`Replicator::replicate`] committed.
    fn done(&self, committed: bool);
}

/// Group-commit tuning.
#[derive(Clone)]
pub struct StorageConfig {
    /// Most records one write transaction takes before it commits.
    pub max_batch_records: usize,
    /// Most record bytes one write transaction takes before it commits.
    pub max_batch_bytes: usize,
    /// How long the writer waits for more appends once it has one. Zero
    /// means "commit what is queued now": under load, requests that arrive
    /// during one fsync form the next batch anyway.
    pub linger: Duration,
    /// How long the writer polls for the next request before parking its
    /// thread (zero: park at once). Trades a little CPU after each commit
    /// for latency; see `Writer::next_op`.
    pub spin: Duration,
    /// redb page cache size.
    pub cache_bytes: usize,
    /// Size of the write-ahead journal small commits go through (0: no
    /// journal, every commit is a durable redb commit). See `journal`.
    pub journal_bytes: u64,
    /// Longest time between durable redb commits while the journal is in
    /// use; bounds how much a restart after a crash replays.
    pub checkpoint: Duration,
    /// Free space the data directory's file system keeps: below it, appends
    /// are refused with `storage_full` (nothing stored) until space is
    /// freed, so the database never meets a full disk mid-commit.
    pub reserve_bytes: u64,
    /// Replicate every commit (a cluster); `None` alone.
    pub replicator: Option<Arc<dyn Replicator>>,
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("max_batch_records", &self.max_batch_records)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("linger", &self.linger)
            .field("spin", &self.spin)
            .field("cache_bytes", &self.cache_bytes)
            .field("journal_bytes", &self.journal_bytes)
            .field("checkpoint", &self.checkpoint)
            .field("reserve_bytes", &self.reserve_bytes)
            .field("replicated", &self.replicator.is_some())
            .finish()
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            max_batch_records: 8192,
            max_batch_bytes: 16 << 20,
            linger: Duration::ZERO,
            spin: Duration::from_micros(100),
            cache_bytes: 64 << 20,
            journal_bytes: 8 << 20,
            checkpoint: Duration::from_millis(250),
            reserve_bytes: 64 << 20,
            replicator: None,
        }
    }
}

/// A topic's durable definition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopicMeta {
    /// Internal id; never reused, so a re-created topic starts empty.
    pub id: u32,
    /// Topic name.
    pub name: String,
    /// Partition count, fixed at creation.
    pub partitions: u32,
    /// Retention by age in ms (0: none).
    pub retention_ms: u64,
    /// Retention by bytes per partition (0: none).
    pub retention_bytes: u64,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Delivery policy as stored; the live one is [`TopicHandle::policy`].
    #[serde(default)]
    pub policy: TopicPolicy,
}

/// A topic's delivery policy: retries, priority, delay, TTL, dedup and
/// backlog limits. Every field has a default; `switchyard topic config`
/// changes them on a live topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TopicPolicy {
    /// Dead-letter a queue message after this many failed deliveries.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt.
    pub retry_base_ms: u64,
    /// Longest retry delay.
    pub retry_max_ms: u64,
    /// Priority of messages without a `priority` header or plugin decision.
    pub default_priority: u8,
    /// Share of queue deliveries (percent) that go to the longest-waiting
    /// ready message whatever its priority, so low priority never starves.
    pub min_share_pct: u8,
    /// Time to live of every message, from its append time (0: none).
    pub ttl_ms: u64,
    /// Move expired messages to the dead-letter topic instead of
    /// discarding them.
    pub dead_letter_expired: bool,
    /// Longest delay a publisher may ask for.
    pub max_delay_ms: u64,
    /// How long a message id is remembered for idempotent publish.
    pub dedup_window_ms: u64,
    /// Most unsettled messages per group before publishers are throttled
    /// (0: no limit).
    pub backlog_limit: u64,
    /// Past the backlog limit, shed messages below this priority instead of
    /// refusing the batch (`None`: refuse with `backlog_full`).
    pub shed_below_priority: Option<u8>,
    /// Messages a queue group looks ahead in the log to order by priority.
    pub queue_window: u32,
    /// Feeds: how keyed records reach the feeds following their key when
    /// no fanout plugin decides (`None`: the topic has no feeds).
    pub fanout: Option<Fanout>,
    /// The topic dead letters go to (`None`: `<topic>.dlq`). Several
    /// topics may name one, so that a stage reading `orders.eu` and
    /// `orders.us` has one DLQ; each letter names its origin.
    pub dlq: Option<String>,
}

impl Default for TopicPolicy {
    fn default() -> Self {
        TopicPolicy {
            max_attempts: 5,
            retry_base_ms: 1_000,
            retry_max_ms: 300_000,
            default_priority: 4,
            min_share_pct: 10,
            ttl_ms: 0,
            dead_letter_expired: false,
            max_delay_ms: 7 * 24 * 3600 * 1000,
            dedup_window_ms: 120_000,
            backlog_limit: 0,
            shed_below_priority: None,
            queue_window: 65_536,
            fanout: None,
            dlq: None,
        }
    }
}

impl TopicPolicy {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if self.default_priority > 9 {
            return Err("default_priority must be 0 to 9".into());
        }
        if self.shed_below_priority.is_some_and(|p| p > 9) {
            return Err("shed_below_priority must be 0 to 9".into());
        }
        if self.min_share_pct > 100 {
            return Err("min_share_pct must be 0 to 100".into());
        }
        if self.queue_window == 0 {
            return Err("queue_window must be at least 1".into());
        }
        if self.retry_max_ms < self.retry_base_ms {
            return Err("retry_max_ms must be at least retry_base_ms".into());
        }
        Ok(())
    }

    /// The dead-letter topic of `topic` under this policy.
    pub fn dlq_of(&self, topic: &str) -> String {
        match &self.dlq {
            Some(d) => d.clone(),
            None => format!("{topic}.dlq"),
        }
    }

    /// The default retry delay before attempt `attempt + 1`.
    pub fn backoff_ms(&self, attempt: u32) -> u64 {
        let shift = attempt.saturating_sub(1).min(40);
        self.retry_base_ms
            .saturating_mul(1u64 << shift)
            .min(self.retry_max_ms)
    }
}

/// A live topic: its definition plus a watch of its partitions' state,
/// updated after every commit that touches it. Subscribers wait on the watch.
#[derive(Debug)]
pub struct TopicHandle {
    /// The durable definition.
    pub meta: TopicMeta,
    state: watch::Sender<Arc<[PartitionInfo]>>,
    deleted: AtomicBool,
    policy: arc_swap::ArcSwap<TopicPolicy>,
    /// Records shed by the backlog limit since the router started.
    pub shed: std::sync::atomic::AtomicU64,
    /// Counters since the router started, for metrics.
    pub stats: TopicStats,
}

/// A topic's counters since the router started: bumped once per batch or
/// delivery frame on the hot paths, read by the metrics collector.
#[derive(Debug)]
pub struct TopicStats {
    /// Records accepted for this topic (published to it by name).
    pub published: AtomicU64,
    /// Their bytes, as encoded records.
    pub published_bytes: AtomicU64,
    /// Records sent to stream, feed and queue subscribers.
    pub delivered: AtomicU64,
    /// Records deleted by retention.
    pub retention_deleted: AtomicU64,
    /// Publishes refused, by error code (written only when one is).
    pub refused: std::sync::Mutex<std::collections::BTreeMap<u16, u64>>,
    /// From a publish batch's arrival to its durable ack, in seconds.
    pub publish_to_ack: prometheus_client::metrics::histogram::Histogram,
    /// From a record's append (ms clock) to its delivery, in seconds, for
    /// delivery frames that bring a stream subscriber to the end of a
    /// partition (a replay from far back would say nothing about latency).
    pub publish_to_deliver: prometheus_client::metrics::histogram::Histogram,
}

impl Default for TopicStats {
    fn default() -> Self {
        let secs =
            || prometheus_client::metrics::histogram::Histogram::new(stats::seconds_buckets());
        TopicStats {
            published: AtomicU64::new(0),
            published_bytes: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            retention_deleted: AtomicU64::new(0),
            refused: Default::default(),
            publish_to_ack: secs(),
            publish_to_deliver: secs(),
        }
    }
}

impl TopicStats {
    /// Counts a refused publish.
    pub fn refuse(&self, code: crate::protocol::ErrorCode) {
        *self
            .refused
            .lock()
            .expect("refused lock")
            .entry(code.as_u16())
            .or_default() += 1;
    }
}

impl TopicHandle {
    fn new(meta: TopicMeta, parts: Arc<[PartitionInfo]>) -> Self {
        TopicHandle {
            policy: arc_swap::ArcSwap::from_pointee(meta.policy.clone()),
            meta,
            state: watch::Sender::new(parts),
            deleted: AtomicBool::new(false),
            shed: std::sync::atomic::AtomicU64::new(0),
            stats: TopicStats::default(),
        }
    }

    /// Partition states as of the last commit.
    pub fn partitions(&self) -> Arc<[PartitionInfo]> {
        self.state.borrow().clone()
    }

    /// Records retained over all partitions.
    pub fn messages(&self) -> u64 {
        self.partitions().iter().map(|p| p.end - p.start).sum()
    }

    /// A receiver that changes after every commit touching this topic.
    pub fn watch(&self) -> watch::Receiver<Arc<[PartitionInfo]>> {
        self.state.subscribe()
    }

    /// The live delivery policy.
    pub fn policy(&self) -> Arc<TopicPolicy> {
        self.policy.load_full()
    }

    /// True once the topic was deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
        // Wake every subscriber so it notices.
        self.state.send_modify(|_| {});
    }

    /// The wire description of this topic.
    pub fn info(&self) -> TopicInfo {
        TopicInfo {
            name: self.meta.name.clone(),
            retention_ms: self.meta.retention_ms,
            retention_bytes: self.meta.retention_bytes,
            created_ms: self.meta.created_ms,
            partitions: self.partitions().to_vec(),
        }
    }
}

type Registry = Arc<RwLock<HashMap<String, Arc<TopicHandle>>>>;

/// Scans `data` as a journal and replays its chain into an empty
/// in-memory database, and checks `data` as a log value: for
/// [`crate::fuzzing::journal`].
#[doc(hidden)]
pub fn fuzz_journal(data: &[u8]) {
    let _ = log::split_entry((1, 0, 7), data);
    let _ = log::entry_meta(data);
    let scan = journal::scan(data, 0, data.len());
    let Ok(db) = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())
    else {
        return;
    };
    let Ok(txn) = db.begin_write() else { return };
    for (_, range) in scan.chain {
        if journal::replay(&txn, &data[range]).is_err() {
            break;
        }
    }
}

/// The exit status of a router whose storage writer thread panicked.
pub const WRITER_PANIC_EXIT: i32 = 70;

/// A handle to the router's storage; cheap to clone.
#[derive(Clone)]
pub struct Storage {
    db: Arc<Database>,
    tx: mpsc::Sender<WriteOp>,
    topics: Registry,
    feeds: FeedRegistry,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// True while journaled commits wait for a checkpoint (`None`: no journal).
    journal_pending: Option<Arc<AtomicBool>>,
    /// Set once a commit failed in a way that may have lost what it was to
    /// make durable: from then on nothing is acknowledged.
    failed: watch::Receiver<Option<Arc<str>>>,
    /// The database file (the journal is beside it).
    path: Arc<std::path::PathBuf>,
    stats: Arc<stats::StorageStats>,
}

/// The future of one append: resolves once the records are durable.
pub type AppendTicket = oneshot::Receiver<Result<Vec<(u32, u64)>, StorageError>>;

impl Storage {
    /// Opens (or creates) the database at `path` and starts the writer.
    pub fn open(path: &Path, config: StorageConfig) -> Result<Storage, StorageError> {
        Self::open_on(Arc::new(disk::OsDisk), path, config)
    }

    /// As [`Storage::open`], with the files on `disk` (tests use a
    /// [`disk::SimDisk`] to cut the power or fail a sync).
    pub fn open_on(
        disk: Arc<dyn disk::Disk>,
        path: &Path,
        config: StorageConfig,
    ) -> Result<Storage, StorageError> {
        let io = |e: std::io::Error| StorageError::Corrupt(format!("{}: {e}", path.display()));
        // A file of 0 bytes is a database redb will create afresh, as if the
        // file were missing: its journal must not be replayed into it.
        let new_db = match disk.open(path).map_err(io)? {
            None => true,
            Some(f) => f.len().map_err(io)? == 0,
        };
        let backend = disk.redb_file(path).map_err(io)?;
        // redb panics on some damaged pages while it opens a file: that is
        // damage to report with the file's name, not a crash.
        let opened = log::guarded_panic(|| {
            let mut b = Database::builder();
            b.set_cache_size(config.cache_bytes);
            match backend {
                Some(file) => b.create_with_backend(disk::DiskBackend(file)),
                None => b.create(path),
            }
        });
        let db = match opened {
            Err(panic) => {
                return Err(StorageError::Damaged(format!(
                    "database {}: opening it failed inside redb ({panic}): the file is \
                     damaged. Run `switchyard check --data {}` for what can be done",
                    path.display(),
                    path.parent()
                        .map_or_else(|| ".".into(), |p| p.display().to_string()),
                )));
            }
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
                return Err(StorageError::InUse(path.to_path_buf()));
            }
            Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(why)))) => {
                return Err(StorageError::Damaged(format!(
                    "database {}: {why}. Run `switchyard check --data {}` for what can be done",
                    path.display(),
                    path.parent()
                        .map_or_else(|| ".".into(), |p| p.display().to_string()),
                )));
            }
            Ok(r) => r?,
        };
        let journal = open_journal(&*disk, &db, path, new_db, &config)?;
        Self::start(Arc::new(db), journal, disk, path, config)
    }

    /// Storage over a cluster node's replicated tables, already open in
    /// `db` at `path`: no journal (the Raft log is the journal), and every
    /// commit goes through `config.replicator`.
    pub fn open_replicated(
        db: Arc<Database>,
        path: &Path,
        config: StorageConfig,
    ) -> Result<Storage, StorageError> {
        if config.replicator.is_none() {
            return Err(StorageError::Corrupt(
                "replicated storage needs a replicator".into(),
            ));
        }
        Self::start(db, None, Arc::new(disk::OsDisk), path, config)
    }

    fn start(
        db: Arc<Database>,
        journal: Option<journal::Journal>,
        disk: Arc<dyn disk::Disk>,
        path: &Path,
        config: StorageConfig,
    ) -> Result<Storage, StorageError> {
        // Replicated storage checkpoints on the same timer, always.
        let journal_pending = journal.as_ref().map(|j| j.pending_flag()).or_else(|| {
            config
                .replicator
                .is_some()
                .then(|| Arc::new(AtomicBool::new(true)))
        });
        let (metas, parts) = load(&db)?;
        let dedup_load = load_dedup(&db)?;
        let feeds: FeedRegistry = Arc::new(RwLock::new(load_feeds(&db)?));
        let mut registry = HashMap::new();
        let mut states = HashMap::new();
        for meta in metas {
            let p = parts.get(&meta.id).cloned().unwrap_or_default();
            let infos: Arc<[PartitionInfo]> = p.iter().map(|s| s.info()).collect();
            let handle = Arc::new(TopicHandle::new(meta.clone(), infos));
            states.insert(meta.id, writer::TopicState::new(handle.clone(), p));
            registry.insert(meta.name.clone(), handle);
        }
        let topics: Registry = Arc::new(RwLock::new(registry));
        let (tx, rx) = mpsc::channel(4096);
        let (failed_tx, failed) = watch::channel(None);
        let stats = Arc::new(stats::StorageStats::default());
        let w = writer::Writer::new(
            db.clone(),
            topics.clone(),
            feeds.clone(),
            states,
            config,
            journal,
            disk,
            path.to_path_buf(),
            failed_tx,
            stats.clone(),
            dedup_load,
        );
        let join = std::thread::Builder::new()
            .name("switchyard-writer".into())
            .spawn(move || {
                // Every write goes through this thread: without it the
                // router could only refuse writes while it went on serving
                // reads. A panic here stops the process, loudly and with a
                // failure status, so a supervisor restarts it (and recovery
                // replays the journal) instead of it living on as a zombie.
                let run = std::panic::AssertUnwindSafe(move || w.run(rx));
                if std::panic::catch_unwind(run).is_err() {
                    let _ = writeln!(
                        std::io::stderr(),
                        "fatal: the storage writer thread panicked (above); stopping the \
                         router so that it restarts and recovers from its journal"
                    );
                    std::process::exit(WRITER_PANIC_EXIT);
                }
            })
            .map_err(|e| StorageError::Corrupt(format!("cannot start writer thread: {e}")))?;
        Ok(Storage {
            db,
            tx,
            topics,
            feeds,
            writer: Arc::new(std::sync::Mutex::new(Some(join))),
            journal_pending,
            failed,
            path: Arc::new(path.to_path_buf()),
            stats,
        })
    }

    /// The writer's commit, sync and checkpoint histograms.
    pub fn stats(&self) -> &stats::StorageStats {
        &self.stats
    }

    /// Bytes of the database file and of the journal beside it (0 for a
    /// file that is missing).
    pub fn file_bytes(&self) -> (u64, u64) {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        (size(&self.path), size(&self.path.with_extension("journal")))
    }

    /// Free bytes on the data directory's file system, if it can be read.
    pub fn free_bytes(&self) -> Option<u64> {
        use disk::Disk as _;
        disk::OsDisk.free_bytes(&self.path).ok()
    }

    /// Why this storage stopped acknowledging writes, if it did (a sync of
    /// the journal or the database failed). The router then stops; a
    /// restart recovers every acknowledged write.
    pub fn failed(&self) -> Option<Arc<str>> {
        self.failed.borrow().clone()
    }

    /// Waits until the storage fails (see [`Storage::failed`]).
    pub async fn wait_failed(&self) -> Arc<str> {
        let mut rx = self.failed.clone();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                // The writer is gone without a failure: wait forever.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The live topic with this name.
    pub fn topic(&self, name: &str) -> Option<Arc<TopicHandle>> {
        self.topics
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    /// All live topics, sorted by name.
    pub fn topics(&self) -> Vec<Arc<TopicHandle>> {
        let mut v: Vec<_> = self
            .topics
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        v
    }

    async fn send(&self, op: WriteOp) -> Result<(), StorageError> {
        self.tx.send(op).await.map_err(|_| StorageError::ShutDown)
    }

    /// Creates a topic. Names are validated by the broker.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        retention_ms: u64,
        retention_bytes: u64,
    ) -> Result<Arc<TopicHandle>, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::CreateTopic {
            name: name.to_string(),
            partitions,
            retention_ms,
            retention_bytes,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StorageError::ShutDown)?
    }

    /// Deletes a topic, its records and its group offsets.
    pub async fn delete_topic(&self, name: &str) -> Result<(), StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::DeleteTopic {
            name: name.to_string(),
            reply,
        })
        .await?;
        rx.await.map_err(|_| StorageError::ShutDown)?
    }

    /// Queues records for durable append and returns a ticket that resolves
    /// with `(partition, offset)` per record once they are fsynced.
    ///
    /// Appends queued by one caller are applied in the order queued, which is
    /// what keeps per-key order for a pipelined producer.
    pub async fn append(
        &self,
        topic: &Arc<TopicHandle>,
        records: Vec<(u32, RawRecord)>,
    ) -> Result<AppendTicket, StorageError> {
        let id = topic.meta.id;
        let records = records
            .into_iter()
            .map(|(partition, record)| AppendRecord {
                topic_id: id,
                partition,
                record,
                dedup: None,
                fanout: None,
            })
            .collect();
        self.append_many(records, Vec::new()).await
    }

    /// Like [`Storage::append_many`], for a batch a route plugin decided:
    /// also records, in the same commit, the first offset the plugin's
    /// activation decided in each partition it has not decided in before.
    pub async fn append_routed(
        &self,
        records: Vec<AppendRecord>,
        kv: Vec<KvWrite>,
        cutover: CutoverMark,
    ) -> Result<AppendTicket, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::Append {
            records,
            kv,
            cutover: Some(cutover),
            reply,
        })
        .await?;
        Ok(rx)
    }

    /// Each route plugin activation's cut-over rows, for `plugin`:
    /// `(activation, topic id, partition, offset, swap latency µs)`.
    pub fn plugin_cutovers(&self, plugin: &str) -> Result<Vec<CutoverRow>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(tables::PLUGIN_CUTOVER)?;
        let mut out = Vec::new();
        for e in table.range((plugin, 0, 0, 0)..=(plugin, u64::MAX, u32::MAX, u32::MAX))? {
            let (k, v) = e?;
            let (_, a, t, p) = k.value();
            let (o, lat) = v.value();
            out.push((a, t, p, o, lat));
        }
        Ok(out)
    }

    /// Like [`Storage::append`], for records bound to several topics, plus
    /// plugin key/value writes: all of it commits in one transaction or none.
    pub async fn append_many(
        &self,
        records: Vec<AppendRecord>,
        kv: Vec<KvWrite>,
    ) -> Result<AppendTicket, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::Append {
            records,
            kv,
            cutover: None,
            reply,
        })
        .await?;
        Ok(rx)
    }

    /// Stores a plugin's record and, optionally, one version's component
    /// (with its compiled artifact); deletes those of `drop_versions`.
    pub async fn put_plugin(
        &self,
        name: &str,
        record: Vec<u8>,
        wasm: Option<(u32, Vec<u8>, Option<Vec<u8>>)>,
        drop_versions: Vec<u32>,
    ) -> Result<(), StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::PutPlugin {
            name: name.to_string(),
            record,
            wasm,
            drop_versions,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StorageError::ShutDown)?
    }

    /// Deletes a plugin, its components and its key/value store.
    pub async fn remove_plugin(&self, name: &str) -> Result<(), StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::RemovePlugin {
            name: name.to_string(),
            reply,
        })
        .await?;
        rx.await.map_err(|_| StorageError::ShutDown)?
    }

    /// Stores (`Some`) or deletes a principal's record; durable on return.
    pub async fn put_principal(
        &self,
        name: &str,
        record: Option<Vec<u8>>,
    ) -> Result<(), StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::PutPrincipal {
            name: name.to_string(),
            record,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StorageError::ShutDown)?
    }

    /// Records that topic `name` is held by Raft group `group` of the
    /// cluster, with `partitions` partitions (group 0's table of the
    /// cluster-wide topic assignment); replicated and durable on return.
    pub async fn assign_topic(
        &self,
        name: &str,
        group: u32,
        partitions: u32,
    ) -> Result<(), StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::AssignTopic {
            name: name.to_string(),
            group,
            partitions,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StorageError::ShutDown)?
    }

    /// Marks cluster node `node` drained (it is handed no leadership and
    /// hands over what it leads) or no longer drained: a row of group 0,
    /// replicated and durable on return.
    pub async fn drain_node(&self, node: u64, drained: bool) -> Result<(), StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::DrainNode {
            node,
            drained,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StorageError::ShutDown)?
    }

    /// Every stored principal record.
    pub fn principal_records(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.named_records(tables::PRINCIPALS)
    }

    /// Every stored plugin record.
    pub fn plugin_records(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.named_records(tables::PLUGINS)
    }

    /// Every `(name, record)` row of a control-plane table.
    fn named_records(
        &self,
        table: redb::TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// A stored plugin component.
    pub fn plugin_wasm(&self, name: &str, version: u32) -> Result<Option<Vec<u8>>, StorageError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(tables::PLUGIN_WASM)?;
        Ok(t.get((name, version))?.map(|v| v.value().to_vec()))
    }

    /// A stored compiled artifact of a plugin version.
    pub fn plugin_artifact(
        &self,
        name: &str,
        version: u32,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(tables::PLUGIN_ARTIFACT)?;
        Ok(t.get((name, version))?.map(|v| v.value().to_vec()))
    }

    /// A committed value of a plugin's key/value store.
    pub fn plugin_kv_get(&self, name: &str, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(tables::PLUGIN_KV)?;
        Ok(t.get((name, key))?.map(|v| v.value().to_vec()))
    }

    /// Records a group's position. Durable at the next group commit; not
    /// waited for, because a lost commit only means redelivery.
    pub async fn commit_offset(
        &self,
        group: Arc<str>,
        topic_id: u32,
        partition: u32,
        offset: u64,
    ) -> Result<(), StorageError> {
        self.send(WriteOp::CommitOffset {
            group,
            topic_id,
            partition,
            offset,
        })
        .await
    }

    /// Applies retention to every topic now.
    pub async fn enforce_retention(&self) -> Result<u64, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::Retention { reply }).await?;
        rx.await.map_err(|_| StorageError::ShutDown)?
    }

    /// Makes every commit held only in the write-ahead journal durable in
    /// the database, so the journal starts over and a restart after a
    /// crash has less to replay. The server calls it every
    /// `journal_checkpoint_ms`.
    pub async fn checkpoint(&self) -> Result<(), StorageError> {
        // Nothing to do: do not wake the writer (an idle router stays idle).
        if !self
            .journal_pending
            .as_ref()
            .is_some_and(|p| p.load(Ordering::Acquire))
        {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::Checkpoint { reply }).await?;
        rx.await.map_err(|_| StorageError::ShutDown)?
    }

    /// Queues a flush and returns its ticket, which resolves once
    /// everything queued before it is durable (an error if that commit
    /// failed), without waiting here.
    pub async fn flush_ticket(
        &self,
    ) -> Result<oneshot::Receiver<Result<(), StorageError>>, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::Flush { reply }).await?;
        Ok(rx)
    }

    /// Waits until everything queued before this call is durable; an error
    /// if the commit that held it failed.
    pub async fn flush(&self) -> Result<(), StorageError> {
        self.flush_ticket()
            .await?
            .await
            .map_err(|_| StorageError::ShutDown)?
    }

    /// Commits everything queued and stops the writer thread. Later writes
    /// fail with [`StorageError::ShutDown`]; reads keep working.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.send(WriteOp::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
        let join = self.writer.lock().expect("writer lock").take();
        if let Some(join) = join {
            let _ = tokio::task::spawn_blocking(move || join.join()).await;
        }
    }

    /// The group's committed position in a partition, if any.
    pub fn committed_offset(
        &self,
        group: &str,
        topic_id: u32,
        partition: u32,
    ) -> Result<Option<u64>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(OFFSETS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(table.get((group, topic_id, partition))?.map(|v| v.value()))
    }

    /// Queues queue-state changes for the next group commit. Not waited for:
    /// a lost change only means a redelivery.
    pub async fn queue_write(&self, w: QueueWrite) -> Result<(), StorageError> {
        if w.is_empty() {
            return Ok(());
        }
        self.send(WriteOp::Queue(w)).await
    }

    /// `(topic id, group)` of every queue group with stored state.
    pub fn queue_groups(&self) -> Result<Vec<(u32, String)>, StorageError> {
        let txn = self.db.begin_read()?;
        let floors = txn.open_table(tables::QUEUE_FLOOR)?;
        let mut out: Vec<(u32, String)> = Vec::new();
        for e in floors.iter()? {
            let (k, _) = e?;
            let (t, g, _) = k.value();
            if out.last().is_none_or(|(lt, lg)| *lt != t || lg != g) {
                out.push((t, g.to_string()));
            }
        }
        Ok(out)
    }

    /// A queue group's stored state.
    pub fn queue_snapshot(
        &self,
        topic_id: u32,
        group: &str,
    ) -> Result<QueueSnapshot, StorageError> {
        let txn = self.db.begin_read()?;
        let mut snap = QueueSnapshot::default();
        let floors = txn.open_table(tables::QUEUE_FLOOR)?;
        for e in floors.range((topic_id, group, 0)..=(topic_id, group, u32::MAX))? {
            let (k, v) = e?;
            snap.floors.insert(k.value().2, v.value());
        }
        let marks = txn.open_table(tables::QUEUE_MARK)?;
        for e in marks.range((topic_id, group, 0)..=(topic_id, group, u32::MAX))? {
            let (k, v) = e?;
            snap.marks.insert(k.value().2, v.value());
        }
        let q = txn.open_table(tables::QUEUE)?;
        for e in q.range((topic_id, group, 0, 0)..=(topic_id, group, u32::MAX, u64::MAX))? {
            let (k, v) = e?;
            let (_, _, p, o) = k.value();
            snap.entries.push((p, o, v.value()));
        }
        let done = txn.open_table(tables::QUEUE_DONE)?;
        for e in done.range((topic_id, group, 0, 0)..=(topic_id, group, u32::MAX, u64::MAX))? {
            let (k, v) = e?;
            let (_, _, p, c) = k.value();
            snap.done.push((p, c, v.value().to_vec()));
        }
        Ok(snap)
    }

    /// Replaces a topic's delivery policy, durably.
    pub async fn set_policy(&self, name: &str, policy: TopicPolicy) -> Result<(), StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::SetPolicy {
            name: name.to_string(),
            policy,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StorageError::ShutDown)?
    }

    /// Deletes a partition's records below `before` (dead-letter redrive
    /// and purge). Returns how many were deleted.
    pub async fn truncate(
        &self,
        topic: &TopicHandle,
        partition: u32,
        before: u64,
    ) -> Result<u64, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::Truncate {
            topic_id: topic.meta.id,
            partition,
            before,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StorageError::ShutDown)?
    }

    /// Runs `f` on the feeds of a topic (empty if it has none).
    pub fn with_feeds<R>(&self, topic_id: u32, f: impl FnOnce(&TopicFeeds) -> R) -> R {
        let reg = self.feeds.read().expect("feeds lock");
        match reg.get(&topic_id) {
            Some(t) => f(t),
            None => f(&TopicFeeds::default()),
        }
    }

    /// Unread inbox references and key-index entries of a topic's feeds:
    /// the write amplification of fan-out on write vs on read.
    pub fn feed_entries(&self, topic_id: u32) -> Result<(u64, u64), StorageError> {
        let txn = self.db.begin_read()?;
        let next = topic_id.saturating_add(1);
        let inbox = txn
            .open_table(tables::INBOX)?
            .range((topic_id, 0, 0, 0)..(next, 0, 0, 0))?
            .count() as u64;
        let index = txn
            .open_table(tables::KEY_INDEX)?
            .range((topic_id, 0, 0, 0)..(next, 0, 0, 0))?
            .count() as u64;
        Ok((inbox, index))
    }

    /// Records that a feed has read a partition up to `next` (durable at the
    /// next group commit) and drops the inbox references before it.
    pub async fn feed_commit(
        &self,
        topic_id: u32,
        feed: &FeedDef,
        partition: u32,
        next: u64,
    ) -> Result<(), StorageError> {
        self.send(WriteOp::FeedCommit {
            topic_id,
            feed_id: feed.id,
            group: writer::feed_group(&feed.name).into(),
            partition,
            next,
        })
        .await
    }

    /// A feed's stored cursor in one partition (0 if none).
    pub fn feed_cursor(
        &self,
        topic_id: u32,
        name: &str,
        partition: u32,
    ) -> Result<u64, StorageError> {
        Ok(self
            .committed_offset(&writer::feed_group(name), topic_id, partition)?
            .unwrap_or(0))
    }

    /// Creates feed `name` on `topic`, or sets the keys it follows. Newly
    /// followed keys are seen from the current end of their partition;
    /// keys already followed keep their start.
    pub async fn follow(
        &self,
        topic: &TopicHandle,
        name: &str,
        keys: Vec<Vec<u8>>,
    ) -> Result<FeedDef, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteOp::Follow {
            topic_id: topic.meta.id,
            name: name.to_string(),
            keys,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StorageError::ShutDown)?
    }

    /// The underlying database, for readers in [`log`].
    pub fn db(&self) -> &Database {
        &self.db
    }
}

/// One record to append, with its destination.
#[derive(Debug, Clone)]
pub struct AppendRecord {
    /// Topic id.
    pub topic_id: u32,
    /// Partition.
    pub partition: u32,
    /// The encoded record.
    pub record: RawRecord,
    /// The producer's message id, for idempotent publish.
    pub dedup: Option<bytes::Bytes>,
    /// For topics with feeds: the record key's hash and how it fans out.
    pub fanout: Option<(u64, Fanout)>,
}

/// How a keyed record reaches the feeds that follow its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fanout {
    /// A reference is written into each following feed's inbox now.
    OnWrite,
    /// One entry in the key's index; each feed merges the keys it follows
    /// when it reads.
    OnRead,
}

/// A feed: a named subscription to a set of keys of one topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FeedDef {
    /// Internal id, unique per topic.
    pub id: u32,
    /// Feed name.
    pub name: String,
    /// Followed keys, each with the offset (in its partition) from which
    /// the feed sees it: records appended after the follow.
    pub keys: Vec<(Vec<u8>, u64)>,
}

/// The feeds of one topic, shared by the writer (which pushes references
/// on write) and readers.
#[derive(Debug, Default, Clone)]
pub struct TopicFeeds {
    /// Feed name -> definition.
    pub feeds: HashMap<String, FeedDef>,
    /// Key hash -> ids of the feeds following a key with that hash.
    pub followers: HashMap<u64, Vec<u32>>,
    next_id: u32,
}

impl TopicFeeds {
    pub(crate) fn rebuild(&mut self) {
        self.followers.clear();
        for f in self.feeds.values() {
            for (k, _) in &f.keys {
                let v = self.followers.entry(key_hash(k)).or_default();
                if !v.contains(&f.id) {
                    v.push(f.id);
                }
            }
            self.next_id = self.next_id.max(f.id + 1);
        }
    }

    fn next_id(&self) -> u32 {
        self.next_id
    }

    /// How many feeds follow the key with this hash.
    pub fn follower_count(&self, hash: u64) -> u32 {
        self.followers.get(&hash).map_or(0, |v| v.len() as u32)
    }
}

/// Feeds of every topic, by topic id.
pub type FeedRegistry = Arc<RwLock<HashMap<u32, TopicFeeds>>>;

/// The key hash the feed tables use (FNV-1a 64, as for partitioning).
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Set in the partition of a returned position when the record was a
/// duplicate within the dedup window: the position is the original's.
pub const DUPLICATE_BIT: u32 = 1 << 31;

/// A stored queue entry: `(state, attempts, due ms)`.
pub type QueueEntryState = (u8, u32, u64);

/// Queue-state changes for one group, applied in one group commit.
#[derive(Debug, Default)]
pub struct QueueWrite {
    /// Topic id.
    pub topic_id: u32,
    /// Group name.
    pub group: Arc<str>,
    /// In order: `(partition, offset, Some((state, attempts, due ms)))` to
    /// store, or `None` to delete.
    pub entries: Vec<(u32, u64, Option<QueueEntryState>)>,
    /// New floors.
    pub floors: Vec<(u32, u64)>,
    /// New first-delivery marks.
    pub marks: Vec<(u32, u64)>,
    /// `(partition, chunk, encoded ranges)` of settled offsets above the
    /// floor; empty bytes delete the chunk.
    pub done: Vec<(u32, u64, Vec<u8>)>,
}

impl QueueWrite {
    /// True if there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.floors.is_empty()
            && self.marks.is_empty()
            && self.done.is_empty()
    }
}

/// A queue group's durable state, as loaded at startup.
#[derive(Debug, Default)]
pub struct QueueSnapshot {
    /// Floor per partition, where stored.
    pub floors: HashMap<u32, u64>,
    /// First-delivery mark per partition, where stored.
    pub marks: HashMap<u32, u64>,
    /// `(partition, offset, (state, attempts, due ms))`.
    pub entries: Vec<(u32, u64, QueueEntryState)>,
    /// `(partition, chunk, encoded ranges)` of settled offsets.
    pub done: Vec<(u32, u64, Vec<u8>)>,
}

/// One stored cut-over point: `(activation, topic id, partition, offset,
/// swap latency µs)`.
pub type CutoverRow = (u64, u32, u32, u64, u64);

/// Where a route plugin activation's cut-over rows go: see
/// [`Storage::append_routed`].
#[derive(Debug, Clone)]
pub struct CutoverMark {
    /// Plugin name.
    pub plugin: Arc<str>,
    /// The activation (deploy or rollback) that decided the batch.
    pub activation: u64,
    /// Time from the activation to this batch's decision, in microseconds.
    pub latency_us: u64,
}

/// A plugin's key/value write, committed with the records it decided.
#[derive(Debug, Clone)]
pub struct KvWrite {
    /// Plugin name.
    pub plugin: Arc<str>,
    /// Key.
    pub key: String,
    /// Value.
    pub value: Vec<u8>,
}

/// One partition's durable counters, as kept by the writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PartState {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) bytes: u64,
    pub(crate) last_ts: u64,
}

impl PartState {
    pub(crate) fn info(&self) -> PartitionInfo {
        PartitionInfo {
            start: self.start,
            end: self.end,
            bytes: self.bytes,
        }
    }
}

/// A remembered message id, as memory holds it: `(append ms, id hash)`.
pub(crate) type DedupEntry = (u64, u64);

/// The in-memory form of a message id: a 64-bit hash, keyed per process so
/// that ids cannot be crafted to collide. A hash hit is confirmed against
/// the stored row, so a collision never makes a new message a duplicate.
pub(crate) fn dedup_hash(id: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    static KEY: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    KEY.get_or_init(std::hash::RandomState::new).hash_one(id)
}

type Loaded = (Vec<TopicMeta>, HashMap<u32, Vec<PartState>>);

/// Opens the journal beside the database and replays into redb the
/// commits it holds that redb lost in a crash. A journal that cannot be
/// created (a full disk, say) leaves the router committing every write
/// durably in redb; one that exists but cannot be read stops the start,
/// since it may hold acknowledged writes. `new_db`: the database file was
/// just created.
fn open_journal(
    disk: &dyn disk::Disk,
    db: &Database,
    path: &Path,
    new_db: bool,
    config: &StorageConfig,
) -> Result<Option<journal::Journal>, StorageError> {
    let jpath = path.with_extension("journal");
    let remove = |why: &str| {
        tracing::warn!(journal = %jpath.display(), "{why}");
        disk.remove(&jpath)
            .map_err(|e| StorageError::Corrupt(format!("removing {}: {e}", jpath.display())))
    };
    let existing = disk
        .open(&jpath)
        .map_err(|e| StorageError::Corrupt(format!("{}: {e}", jpath.display())))?;
    let mut existed = existing.is_some();
    if new_db && existed {
        // A journal belongs to its database: replaying one into a new,
        // empty database would invent rows for topics it does not have.
        remove("database missing or empty; discarding its journal")?;
        existed = false;
    }
    if config.journal_bytes == 0 && !existed {
        return Ok(None);
    }
    let applied = {
        let txn = db.begin_read()?;
        match txn.open_table(tables::META) {
            Ok(t) => t.get(journal::JOURNAL_LSN)?.map_or(0, |v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(e.into()),
        }
    };
    let capacity = match (&existing, existed) {
        (Some(f), true) => f.len().unwrap_or(0),
        _ => config.journal_bytes,
    };
    drop(existing);
    let opened = journal::Journal::open(disk, &jpath, capacity, applied, config.journal_bytes);
    let (mut journal, pending) = match opened {
        Ok(j) => j,
        Err(e) if !existed => {
            tracing::warn!(error = %e, "no journal: every commit goes to the database durably");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if let Some(&(last, _)) = pending.last() {
        let txn = db.begin_write()?;
        for (_, payload) in &pending {
            journal::replay(&txn, payload)?;
        }
        txn.open_table(tables::META)?
            .insert(journal::JOURNAL_LSN, last)?;
        txn.commit()?;
        tracing::info!(
            commits = pending.len(),
            "replayed commits from the journal that the database lost"
        );
    }
    if config.journal_bytes == 0 {
        // Replayed and durable: the journal is no longer needed.
        drop(journal);
        remove("journal_bytes = 0: journal replayed and removed")?;
        return Ok(None);
    }
    if let Err(e) = journal.resize(config.journal_bytes) {
        // Its entries are in the database now; only the size is wrong.
        tracing::warn!(error = %e, "cannot resize the journal");
        drop(journal);
        let _ = remove("no journal: every commit goes to the database durably");
        return Ok(None);
    }
    Ok(Some(journal))
}

fn load(db: &Database) -> Result<Loaded, StorageError> {
    // Create every table up front so readers never see "table does not exist".
    let w = db.begin_write()?;
    {
        w.open_table(TOPICS)?;
        w.open_table(PARTITIONS)?;
        w.open_table(tables::LOG)?;
        w.open_table(OFFSETS)?;
        w.open_table(tables::META)?;
        w.open_table(tables::PLUGINS)?;
        w.open_table(tables::PLUGIN_WASM)?;
        w.open_table(tables::PLUGIN_KV)?;
        w.open_table(tables::PLUGIN_CUTOVER)?;
        w.open_table(tables::PLUGIN_ARTIFACT)?;
        w.open_table(tables::QUEUE)?;
        w.open_table(tables::QUEUE_FLOOR)?;
        w.open_table(tables::QUEUE_MARK)?;
        w.open_table(tables::QUEUE_DONE)?;
        w.open_table(tables::DEDUP)?;
        w.open_table(tables::INBOX)?;
        w.open_table(tables::KEY_INDEX)?;
        w.open_table(tables::FEEDS)?;
        w.open_table(tables::PRINCIPALS)?;
        w.open_table(tables::TOPIC_GROUPS)?;
        // Ids stored before the expiry index existed get their entries.
        let mut expiry = w.open_table(tables::DEDUP_EXPIRY)?;
        if redb::ReadableTableMetadata::is_empty(&expiry)? {
            for entry in w.open_table(tables::DEDUP)?.iter()? {
                let (k, v) = entry?;
                let (topic, id) = k.value();
                let (p, o, ts) = v.value();
                expiry.insert((topic, ts, p, o), id)?;
            }
        }
    }
    w.commit()?;

    let r = db.begin_read()?;
    let topics = r.open_table(TOPICS)?;
    let mut metas = Vec::new();
    for entry in topics.iter()? {
        let (_, v) = entry?;
        let meta: TopicMeta = serde_json::from_slice(v.value())
            .map_err(|e| StorageError::Corrupt(format!("topic metadata: {e}")))?;
        metas.push(meta);
    }
    let parts_table = r.open_table(PARTITIONS)?;
    let mut parts: HashMap<u32, Vec<PartState>> = HashMap::new();
    for m in &metas {
        let mut v = vec![PartState::default(); m.partitions as usize];
        for entry in parts_table.range((m.id, 0)..=(m.id, u32::MAX))? {
            let (k, val) = entry?;
            let (_, p) = k.value();
            let (start, end, bytes, last_ts) = val.value();
            if let Some(slot) = v.get_mut(p as usize) {
                *slot = PartState {
                    start,
                    end,
                    bytes,
                    last_ts,
                };
            }
        }
        parts.insert(m.id, v);
    }
    Ok((metas, parts))
}

/// Starts reading every topic's dedup window as `db` holds it now, on a
/// thread of its own: the writer serves meanwhile, looking every message
/// id up on disk until the windows arrive. The expiry index is in append
/// order per topic, which is the order a window keeps.
fn load_dedup(db: &Database) -> Result<writer::DedupLoad, StorageError> {
    let r = db.begin_read()?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let cancel = Arc::new(AtomicBool::new(false));
    let cancelled = cancel.clone();
    std::thread::Builder::new()
        .name("switchyard-dedup-load".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            let read = || -> Result<HashMap<u32, writer::DedupWindow>, StorageError> {
                let mut windows: HashMap<u32, writer::DedupWindow> = HashMap::new();
                for (n, entry) in r.open_table(tables::DEDUP_EXPIRY)?.iter()?.enumerate() {
                    if n % 4096 == 0 && cancelled.load(Ordering::Relaxed) {
                        return Err(StorageError::ShutDown);
                    }
                    let (k, id) = entry?;
                    let (topic, ts, _, _) = k.value();
                    windows
                        .entry(topic)
                        .or_default()
                        .remember(ts, dedup_hash(id.value()));
                }
                Ok(windows)
            };
            let _ = tx.send(read().map(|w| (w, started.elapsed())));
        })
        .map_err(|e| StorageError::Corrupt(format!("cannot start the dedup reader: {e}")))?;
    Ok(writer::DedupLoad { rx, cancel })
}

fn load_feeds(db: &Database) -> Result<HashMap<u32, TopicFeeds>, StorageError> {
    let r = db.begin_read()?;
    let mut out: HashMap<u32, TopicFeeds> = HashMap::new();
    for e in r.open_table(tables::FEEDS)?.iter()? {
        let (k, v) = e?;
        let (topic, name) = k.value();
        let def: FeedDef = serde_json::from_slice(v.value())
            .map_err(|e| StorageError::Corrupt(format!("feed {name}: {e}")))?;
        out.entry(topic)
            .or_default()
            .feeds
            .insert(name.to_string(), def);
    }
    for t in out.values_mut() {
        t.rebuild();
    }
    Ok(out)
}

/// The `meta` key marking cluster node `node` drained (in group 0).
pub(crate) fn drained_key(node: u64) -> String {
    format!("{DRAINED_PREFIX}{node}")
}

const DRAINED_PREFIX: &str = "drained.";

/// The cluster nodes marked drained in `db` (a node's replica of group
/// 0): `meta` rows `drained.<id>`, kept there rather than in a table of
/// their own so that a node of an older build applies them.
pub fn drained_nodes(db: &Database) -> std::collections::BTreeSet<u64> {
    rows_of(db, tables::META, |key, _| {
        key.strip_prefix(DRAINED_PREFIX)
            .and_then(|id| id.parse::<u64>().ok())
    })
    .into_iter()
    .flatten()
    .collect()
}

/// Every row of `table` in `db`, read outside the storage writer (a
/// cluster node's replica of another group, say) and mapped by `f`; empty
/// if the table is missing or cannot be read.
pub fn rows_of<K: redb::Key + 'static, V: redb::Value + 'static, T>(
    db: &Database,
    table: redb::TableDefinition<K, V>,
    f: impl for<'a> Fn(K::SelfType<'a>, V::SelfType<'a>) -> T,
) -> Vec<T> {
    let Ok(txn) = db.begin_read() else {
        return Vec::new();
    };
    let Ok(t) = txn.open_table(table) else {
        return Vec::new();
    };
    let Ok(rows) = t.iter() else {
        return Vec::new();
    };
    rows.filter_map(Result::ok)
        .map(|(k, v)| f(k.value(), v.value()))
        .collect()
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `count` records of 90 bytes for topic `topic_id`'s two partitions, keyed
/// in turn by `keys` and fanned out to a feed, one in three on write and
/// the others on read; `id` gives each its message id (or none).
#[cfg(test)]
pub(crate) fn fanned_out(
    topic_id: u32,
    keys: &[Vec<u8>],
    count: usize,
    id: impl Fn(usize) -> Option<bytes::Bytes>,
) -> Vec<AppendRecord> {
    (0..count)
        .map(|i| {
            let k = &keys[i % keys.len()];
            let fanout = if i % 3 == 0 {
                Fanout::OnWrite
            } else {
                Fanout::OnRead
            };
            AppendRecord {
                topic_id,
                partition: (i % 2) as u32,
                record: crate::protocol::Record::new(vec![b'x'; 90])
                    .with_key(k.clone())
                    .to_raw(),
                dedup: id(i),
                fanout: Some((key_hash(k), fanout)),
            }
        })
        .collect()
}

/// Runs `f` on a fresh store in a temporary directory, on a single-threaded
/// runtime: the setup every storage unit test shares.
#[cfg(test)]
pub(crate) fn with_test_storage<F, Fut, T>(f: F) -> T
where
    F: FnOnce(Storage) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let storage = Storage::open(&dir.path().join("db.redb"), StorageConfig::default()).unwrap();
    rt.block_on(f(storage))
}
