//! The single writer: group commit for the whole router.
//!
//! redb allows one write transaction at a time and an fsync costs ~180 µs on
//! this class of machine, so one thread owns all writes. It takes every
//! request queued while the previous commit was running, applies them in
//! arrival order in one transaction, makes it durable with one fsync (of the
//! write-ahead journal for small commits, see `journal`, else of redb), and
//! only then answers each request. Per-partition counters (next offset,
//! bytes) live here, in memory, and are restored if a commit fails, so a
//! failed batch leaves no gap and acknowledges nothing.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, Durability, Key, ReadableTable, TableDefinition, Value, WriteTransaction};
use tokio::sync::{mpsc, oneshot, watch};

use super::disk::Disk;
use super::journal::{JOURNAL_LSN, Journal, Redo};
use super::tables::{
    DEDUP, DEDUP_EXPIRY, FEEDS, INBOX, KEY_INDEX, LOG, META, NEXT_TOPIC_ID, OFFSETS, PARTITIONS,
    PLUGIN_ARTIFACT, PLUGIN_CUTOVER, PLUGIN_KV, PLUGIN_WASM, PLUGINS, PRINCIPALS, QUEUE,
    QUEUE_DONE, QUEUE_FLOOR, QUEUE_MARK, TOPIC_GROUPS, TOPICS,
};
use super::{
    AppendRecord, CutoverMark, DUPLICATE_BIT, DedupEntry, Fanout, FeedDef, FeedRegistry, KvWrite,
    PartState, QueueWrite, Registry, StorageConfig, StorageError, TopicHandle, TopicMeta,
    TopicPolicy, now_ms,
};
use crate::protocol::PartitionInfo;

/// A request to the writer thread.
pub(crate) enum WriteOp {
    Append {
        records: Vec<AppendRecord>,
        kv: Vec<KvWrite>,
        cutover: Option<CutoverMark>,
        reply: oneshot::Sender<Result<Vec<(u32, u64)>, StorageError>>,
    },
    PutPlugin {
        name: String,
        record: Vec<u8>,
        wasm: Option<(u32, Vec<u8>, Option<Vec<u8>>)>,
        drop_versions: Vec<u32>,
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
    RemovePlugin {
        name: String,
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
    PutPrincipal {
        name: String,
        record: Option<Vec<u8>>,
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
    AssignTopic {
        name: String,
        group: u32,
        partitions: u32,
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
    DrainNode {
        node: u64,
        drained: bool,
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
    CommitOffset {
        group: Arc<str>,
        topic_id: u32,
        partition: u32,
        offset: u64,
    },
    CreateTopic {
        name: String,
        partitions: u32,
        retention_ms: u64,
        retention_bytes: u64,
        reply: oneshot::Sender<Result<Arc<TopicHandle>, StorageError>>,
    },
    DeleteTopic {
        name: String,
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
    Retention {
        reply: oneshot::Sender<Result<u64, StorageError>>,
    },
    Flush {
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
    Queue(QueueWrite),
    FeedCommit {
        topic_id: u32,
        feed_id: u32,
        group: Arc<str>,
        partition: u32,
        next: u64,
    },
    Follow {
        topic_id: u32,
        name: String,
        keys: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<FeedDef, StorageError>>,
    },
    SetPolicy {
        name: String,
        policy: TopicPolicy,
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
    Truncate {
        topic_id: u32,
        partition: u32,
        before: u64,
        reply: oneshot::Sender<Result<u64, StorageError>>,
    },
    /// Make journaled commits durable in redb.
    Checkpoint {
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

impl WriteOp {
    fn is_data(&self) -> bool {
        matches!(
            self,
            WriteOp::Append { .. }
                | WriteOp::CommitOffset { .. }
                | WriteOp::Flush { .. }
                | WriteOp::Queue(_)
                | WriteOp::FeedCommit { .. }
        )
    }
}

/// A topic's message ids within its dedup window, as memory holds them:
/// a filter in front of the `dedup` table. A hash found here is confirmed
/// against the table; a hash not found means a new id, so the filter must
/// hold every id the table does (it may hold more).
#[derive(Default)]
pub(crate) struct DedupWindow {
    /// Hashes ([`super::dedup_hash`]) of the message ids, with how many
    /// ids share each (almost always one). The ids stay on disk: memory
    /// per id is the hash here and its entry below.
    ids: HashMap<u64, u32>,
    /// `(append ms, hash)` in append order, for expiry.
    order: VecDeque<DedupEntry>,
}

impl DedupWindow {
    /// Remembers an id appended at `t` (after every id already held).
    pub(crate) fn remember(&mut self, t: u64, h: u64) {
        *self.ids.entry(h).or_default() += 1;
        self.order.push_back((t, h));
    }

    /// Takes back the newest id, `h` (its commit failed).
    fn forget_newest(&mut self, h: u64) {
        self.forget(h);
        if self.order.back().is_some_and(|(_, b)| *b == h) {
            self.order.pop_back();
        }
    }

    fn forget(&mut self, h: u64) {
        if let Some(n) = self.ids.get_mut(&h) {
            *n -= 1;
            if *n == 0 {
                self.ids.remove(&h);
            }
        }
    }

    /// Appends `newer`, every id of which was appended after this
    /// window's. Costs in proportion to `newer`.
    fn extend(&mut self, newer: DedupWindow) {
        for (t, h) in newer.order {
            self.remember(t, h);
        }
    }

    /// Ids held.
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

/// Every topic's dedup window as the database held it when storage
/// opened, read on a thread of its own so that opening does not wait for
/// it (a window of millions of ids takes seconds to read).
/// Every topic's window by topic id, and how long reading them took.
pub(crate) type DedupWindows = (HashMap<u32, DedupWindow>, Duration);

pub(crate) struct DedupLoad {
    /// The windows, once read.
    pub(crate) rx: std::sync::mpsc::Receiver<Result<DedupWindows, StorageError>>,
    /// Set when the windows are no longer wanted (the storage closed
    /// first): the reader stops.
    pub(crate) cancel: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for DedupLoad {
    fn drop(&mut self) {
        self.cancel
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

pub(crate) struct TopicState {
    handle: Arc<TopicHandle>,
    parts: Vec<PartState>,
    dedup: DedupWindow,
}

impl TopicState {
    pub(crate) fn new(handle: Arc<TopicHandle>, parts: Vec<PartState>) -> Self {
        TopicState {
            handle,
            parts,
            dedup: DedupWindow::default(),
        }
    }

    fn publish(&self) {
        let infos: Arc<[PartitionInfo]> = self.parts.iter().map(|s| s.info()).collect();
        self.handle.state.send_replace(infos);
    }
}

pub(crate) struct Writer {
    db: Arc<Database>,
    registry: Registry,
    feeds: FeedRegistry,
    topics: HashMap<u32, TopicState>,
    config: StorageConfig,
    /// Per topic, how far pruning of fan-out references has got.
    prune: HashMap<u32, PruneState>,
    /// Where small commits are made durable (`None`: every commit is a
    /// durable redb commit).
    journal: Option<Journal>,
    /// The changes of the commit being applied, for the journal.
    redo: Redo,
    /// Where the files are, for the free-space check.
    disk: Arc<dyn Disk>,
    path: std::path::PathBuf,
    /// Free bytes when last looked, when, and record bytes appended since.
    free: Option<(Instant, u64, u64)>,
    /// Set once a sync failed: nothing is acknowledged any more.
    failed: watch::Sender<Option<Arc<str>>>,
    /// A write already failed for lack of space (redb then refuses every
    /// write until it is reopened).
    space_failed: bool,
    stats: Arc<super::stats::StorageStats>,
    /// Whether the in-memory dedup windows hold every id on disk yet.
    dedup: Windows,
}

/// Where the in-memory dedup windows stand. Until they are
/// [`Windows::Loaded`], every message id is looked up on disk.
enum Windows {
    /// Being read since the storage opened.
    Loading(DedupLoad),
    Loaded,
    /// They could not be read: ids are looked up on disk for the life of
    /// this storage (correct, only slower).
    Unreadable,
}

/// How often the writer looks at the free space, at most.
pub(crate) const FREE_CHECK_EVERY: Duration = Duration::from_millis(50);

/// The same failure for another request of the batch.
fn clone_error(e: &StorageError) -> StorageError {
    match e {
        StorageError::StorageFull(m) => StorageError::StorageFull(m.clone()),
        StorageError::Failed(m) => StorageError::Failed(m.clone()),
        // Every request of a batch a lost leadership refused may be resent
        // to the new leader, not just the first.
        StorageError::NotLeader(m) => StorageError::NotLeader(m.clone()),
        other => StorageError::WriteFailed(other.to_string()),
    }
}

/// Whether a failed write ran out of space (rather than failing to sync).
fn is_space_error(msg: &str) -> bool {
    msg.contains("No space left on device")
        || msg.contains("File too large")
        || msg.contains("os error 28")
        || msg.contains("os error 27")
}

/// Declares [`DataTables`]: the tables a data commit writes, each opened on
/// first use (opening one is a lookup in redb's table tree, and most
/// commits touch two or three of the eleven) and reached through
/// [`Recorded`], so that every change is also recorded for the journal.
macro_rules! data_tables {
    ($($name:ident: $def:ident => $k:ty, $v:ty;)*) => {
        struct DataTables<'t, 'r> {
            txn: &'t WriteTransaction,
            redo: &'r mut Redo,
            $($name: Option<redb::Table<'t, $k, $v>>,)*
        }

        impl<'t, 'r> DataTables<'t, 'r> {
            fn new(txn: &'t WriteTransaction, redo: &'r mut Redo) -> Self {
                DataTables { txn, redo, $($name: None,)* }
            }

            $(fn $name(&mut self) -> Result<Recorded<'_, 't, $k, $v>, StorageError> {
                if self.$name.is_none() {
                    self.$name = Some(self.txn.open_table($def)?);
                }
                Ok(Recorded {
                    table: self.$name.as_mut().expect("opened above"),
                    redo: self.redo,
                    def: $def,
                })
            })*
        }
    };
}

/// One table of a data commit. Each change is applied to redb and recorded
/// in the commit's [`Redo`] in the same call: a change missing from the
/// journal would be acknowledged and then lost by a crash before the next
/// checkpoint.
struct Recorded<'a, 't, K: Key + 'static, V: Value + 'static> {
    table: &'a mut redb::Table<'t, K, V>,
    redo: &'a mut Redo,
    def: TableDefinition<'static, K, V>,
}

impl<K: Key + 'static, V: Value + 'static> Recorded<'_, '_, K, V> {
    fn insert<'k, 'v>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        value: impl Borrow<V::SelfType<'v>>,
    ) -> Result<(), StorageError> {
        self.redo.put(self.def, key.borrow(), value.borrow());
        self.table.insert(key, value)?;
        Ok(())
    }

    fn remove<'k>(&mut self, key: impl Borrow<K::SelfType<'k>>) -> Result<(), StorageError> {
        self.redo.del(self.def, key.borrow());
        self.table.remove(key)?;
        Ok(())
    }
}

impl<K: Key + 'static> Recorded<'_, '_, K, &'static [u8]> {
    /// Inserts a value of `len` bytes written in place by `fill`, without
    /// an intermediate copy.
    fn insert_with<'k>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), StorageError> {
        let mut slot = self.table.insert_reserve(key.borrow(), len)?;
        fill(slot.as_mut());
        self.redo.put_raw(self.def, key.borrow(), slot.as_mut());
        Ok(())
    }
}

impl Recorded<'_, '_, (u32, &'static [u8]), (u32, u64, u64)> {
    /// The stored position of a message id, if it is remembered.
    fn get(&self, key: (u32, &[u8])) -> Result<Option<(u32, u64, u64)>, StorageError> {
        Ok(self.table.get(key)?.map(|v| v.value()))
    }
}

impl Recorded<'_, '_, (&'static str, u64, u32, u32), (u64, u64)> {
    /// Whether an activation already has its cut-over row for a partition.
    fn has(&self, key: (&str, u64, u32, u32)) -> Result<bool, StorageError> {
        Ok(self.table.get(key)?.is_some())
    }
}

impl Recorded<'_, '_, (u32, u64, u32, u64), &'static [u8]> {
    /// The expiry entries of `topic` appended at or before `upto` ms.
    #[allow(clippy::type_complexity)]
    fn up_to(
        &self,
        topic: u32,
        upto: u64,
    ) -> Result<Vec<((u32, u64, u32, u64), Vec<u8>)>, StorageError> {
        let mut out = Vec::new();
        for e in self
            .table
            .range((topic, 0, 0, 0)..=(topic, upto, u32::MAX, u64::MAX))?
        {
            let (k, v) = e?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }
}

impl Recorded<'_, '_, (u32, u32, u32, u64), ()> {
    /// Removes every key in `from..to`.
    fn remove_range(
        &mut self,
        from: (u32, u32, u32, u64),
        to: (u32, u32, u32, u64),
    ) -> Result<(), StorageError> {
        self.table.retain_in(from..to, |_, _| false)?;
        self.redo.del_range(self.def, &from, &to);
        Ok(())
    }
}

data_tables! {
    log: LOG => (u32, u32, u64), &'static [u8];
    parts: PARTITIONS => (u32, u32), (u64, u64, u64, u64);
    offsets: OFFSETS => (&'static str, u32, u32), u64;
    kv: PLUGIN_KV => (&'static str, &'static str), &'static [u8];
    cutover: PLUGIN_CUTOVER => (&'static str, u64, u32, u32), (u64, u64);
    dedup: DEDUP => (u32, &'static [u8]), (u32, u64, u64);
    dedup_expiry: DEDUP_EXPIRY => (u32, u64, u32, u64), &'static [u8];
    queue: QUEUE => (u32, &'static str, u32, u64), super::QueueEntryState;
    floors: QUEUE_FLOOR => (u32, &'static str, u32), u64;
    marks: QUEUE_MARK => (u32, &'static str, u32), u64;
    done: QUEUE_DONE => (u32, &'static str, u32, u64), &'static [u8];
    inbox: INBOX => (u32, u32, u32, u64), ();
    key_index: KEY_INDEX => (u32, u64, u32, u64), ();
}

/// Largest group commit (record bytes) sent through the journal; larger
/// ones are written to redb durably at once: their pages are mostly
/// contiguous, so the journal would double their writes for little gain.
const JOURNAL_MAX_COMMIT_BYTES: usize = 256 << 10;

/// Most records one retention pass deletes per partition, to keep its
/// transaction (and the appends queued behind it) short.
const RETENTION_PASS_LIMIT: usize = 100_000;

impl Writer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        db: Arc<Database>,
        registry: Registry,
        feeds: FeedRegistry,
        topics: HashMap<u32, TopicState>,
        config: StorageConfig,
        journal: Option<Journal>,
        disk: Arc<dyn Disk>,
        path: std::path::PathBuf,
        failed: watch::Sender<Option<Arc<str>>>,
        stats: Arc<super::stats::StorageStats>,
        dedup_load: DedupLoad,
    ) -> Self {
        Writer {
            dedup: Windows::Loading(dedup_load),
            db,
            registry,
            feeds,
            topics,
            config,
            prune: HashMap::new(),
            journal,
            redo: Redo::new(),
            disk,
            path,
            free: None,
            failed,
            space_failed: false,
            stats,
        }
    }

    /// Takes in the dedup windows read since storage opened, if they are
    /// ready: each topic's loaded window, then the ids appended since.
    fn take_loaded_dedup(&mut self) {
        let Windows::Loading(load) = &self.dedup else {
            return;
        };
        let (loaded, took) = match load.rx.try_recv() {
            Err(std::sync::mpsc::TryRecvError::Empty) => return,
            Ok(Ok(done)) => done,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "the reader stopped".to_string(),
                };
                tracing::error!(%error, "cannot read the dedup windows; every message id is looked up on disk");
                self.dedup = Windows::Unreadable;
                return;
            }
        };
        self.dedup = Windows::Loaded;
        self.stats
            .dedup_loaded
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut ids = 0;
        for (topic, mut window) in loaded {
            // A topic deleted meanwhile has no state, and its ids no rows.
            if let Some(ts) = self.topics.get_mut(&topic) {
                window.extend(std::mem::take(&mut ts.dedup));
                ids += window.len();
                ts.dedup = window;
            }
        }
        tracing::info!(ids, ?took, "dedup windows loaded");
    }

    /// The failure that stopped this storage, if one did.
    fn failure(&self) -> Option<Arc<str>> {
        self.failed.borrow().clone()
    }

    /// Classifies a failed commit: out of space (refused, the router stays
    /// up) or anything else, above all a failed sync, after which nothing
    /// more is acknowledged: the data that sync was to cover may be gone
    /// even if a retried sync succeeds, so the only safe recovery is a
    /// restart that replays what was synced.
    fn failed_commit(&mut self, e: &StorageError) -> StorageError {
        if let StorageError::NotLeader(m) = e {
            // Not a storage failure: this node lost its leadership.
            return StorageError::NotLeader(m.clone());
        }
        let msg = e.to_string();
        if is_space_error(&msg) || (self.space_failed && msg.contains("Previous I/O error")) {
            self.space_failed = true;
            return StorageError::StorageFull(format!(
                "{msg} (the database refuses writes after a failed write until the router \
                 restarts: free space, then restart it; `storage_reserve_mb` keeps a margin so \
                 that this is not reached)"
            ));
        }
        if self.failure().is_none() {
            tracing::error!(error = %msg, "a commit of the journal or the database failed; acknowledging nothing more: restart the router to recover from what was synced");
            let why: Arc<str> = format!(
                "a commit failed ({msg}); the router acknowledges nothing more and must be \
                 restarted, which recovers every acknowledged write"
            )
            .into();
            self.failed.send_replace(Some(why));
        }
        let why = self.failure().map(|m| m.to_string()).unwrap_or(msg);
        self.failed_error(why)
    }

    /// The refusal of a request after a failed sync. In a cluster the node
    /// is stopping and the others take over, so the client may send it
    /// again there (`NotLeader`); a single router is down until restarted.
    fn failed_error(&self, why: String) -> StorageError {
        if self.replicating() {
            StorageError::NotLeader(format!(
                "this node's storage failed and it is stopping; another node takes over ({why})"
            ))
        } else {
            StorageError::Failed(why)
        }
    }

    /// Why appends must be refused for lack of space, if they must: the
    /// file system's free space, looked at every `FREE_CHECK_EVERY` (less
    /// what was appended since), is below the reserve.
    fn space_short(&mut self) -> Option<String> {
        let reserve = self.config.reserve_bytes;
        if reserve == 0 {
            return None;
        }
        let now = Instant::now();
        let stale = self
            .free
            .is_none_or(|(at, _, since)| now - at >= FREE_CHECK_EVERY || since >= reserve / 8);
        if stale {
            match self.disk.free_bytes(&self.path) {
                Ok(free) => self.free = Some((now, free, 0)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the free space of the data directory");
                    return None;
                }
            }
        }
        let (_, free, since) = self.free?;
        let left = free.saturating_sub(since);
        (left < reserve).then(|| {
            format!(
                "{} MiB free on the data directory's file system, below the reserve of {} MiB \
                 (`storage_reserve_mb`); writes resume by themselves once space is freed \
                 (delete topics, shorten retention, or grow the disk)",
                left >> 20,
                reserve >> 20
            )
        })
    }

    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut ops = Vec::new();
        while let Some(first) = self.next_op(&mut rx) {
            let (mut records, mut bytes) = weight(&first);
            ops.push(first);
            let deadline = Instant::now() + self.config.linger;
            while records < self.config.max_batch_records && bytes < self.config.max_batch_bytes {
                match rx.try_recv() {
                    Ok(op) => {
                        let (r, b) = weight(&op);
                        records += r;
                        bytes += b;
                        ops.push(op);
                    }
                    Err(mpsc::error::TryRecvError::Empty) => {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        std::thread::sleep((deadline - now).min(Duration::from_micros(50)));
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            }
            if let Some(done) = self.process(&mut ops) {
                // Shutdown: refuse new work, but commit what was already queued.
                rx.close();
                while let Ok(op) = rx.try_recv() {
                    ops.push(op);
                }
                let more = self.process(&mut ops);
                if self.failure().is_some() {
                    // Nothing more reaches the files; a restart replays.
                } else if let Err(e) = self.checkpoint() {
                    tracing::error!(error = %e, "final journal checkpoint failed; the next start replays it");
                }
                let _ = done.send(());
                if let Some(d) = more {
                    let _ = d.send(());
                }
                break;
            }
        }
        tracing::debug!("storage writer stopped");
    }

    /// Waits for the next request. After a commit the writer polls for up to
    /// `spin` before parking: waking a parked thread costs ~65 µs on a
    /// virtual machine, more than the gap between commits at a few thousand
    /// requests per second. Yielding while polling leaves the core to
    /// runnable threads, and an idle router parks after one `spin`.
    fn next_op(&self, rx: &mut mpsc::Receiver<WriteOp>) -> Option<WriteOp> {
        let spin = self.config.spin;
        if !spin.is_zero() {
            let t0 = Instant::now();
            while t0.elapsed() < spin {
                match rx.try_recv() {
                    Ok(op) => return Some(op),
                    Err(mpsc::error::TryRecvError::Empty) => std::thread::yield_now(),
                    Err(mpsc::error::TryRecvError::Disconnected) => return None,
                }
            }
        }
        rx.blocking_recv()
    }

    /// Applies `ops` in order. Returns the shutdown reply if one was seen.
    fn process(&mut self, ops: &mut Vec<WriteOp>) -> Option<oneshot::Sender<()>> {
        let mut segment = Vec::new();
        let mut shutdown = None;
        for op in ops.drain(..) {
            if op.is_data() {
                segment.push(op);
                continue;
            }
            if !segment.is_empty() {
                self.commit_data(std::mem::take(&mut segment));
            }
            match op {
                WriteOp::CreateTopic {
                    name,
                    partitions,
                    retention_ms,
                    retention_bytes,
                    reply,
                } => {
                    let r = self.create_topic(name, partitions, retention_ms, retention_bytes);
                    let _ = reply.send(r);
                }
                WriteOp::DeleteTopic { name, reply } => {
                    let _ = reply.send(self.delete_topic(&name));
                }
                WriteOp::Retention { reply } => {
                    let _ = reply.send(self.retention());
                }
                WriteOp::PutPlugin {
                    name,
                    record,
                    wasm,
                    drop_versions,
                    reply,
                } => {
                    let _ = reply.send(self.put_plugin(&name, &record, wasm, &drop_versions));
                }
                WriteOp::RemovePlugin { name, reply } => {
                    let _ = reply.send(self.remove_plugin(&name));
                }
                WriteOp::PutPrincipal {
                    name,
                    record,
                    reply,
                } => {
                    let _ = reply.send(self.put_principal(&name, record.as_deref()));
                }
                WriteOp::AssignTopic {
                    name,
                    group,
                    partitions,
                    reply,
                } => {
                    let _ = reply.send(self.assign_topic(&name, group, partitions));
                }
                WriteOp::DrainNode {
                    node,
                    drained,
                    reply,
                } => {
                    let _ = reply.send(self.drain_node(node, drained));
                }
                WriteOp::SetPolicy {
                    name,
                    policy,
                    reply,
                } => {
                    let _ = reply.send(self.set_policy(&name, policy));
                }
                WriteOp::Truncate {
                    topic_id,
                    partition,
                    before,
                    reply,
                } => {
                    let _ = reply.send(self.truncate(topic_id, partition, before));
                }
                WriteOp::Follow {
                    topic_id,
                    name,
                    keys,
                    reply,
                } => {
                    let _ = reply.send(self.follow(topic_id, name, keys));
                }
                WriteOp::Checkpoint { reply } => {
                    let r = match self.failure() {
                        Some(m) => Err(self.failed_error(m.to_string())),
                        None => self.checkpoint().map_err(|e| self.failed_commit(&e)),
                    };
                    let _ = reply.send(r);
                }
                WriteOp::Shutdown { reply } => shutdown = Some(reply),
                _ => unreachable!("data ops are batched above"),
            }
        }
        if !segment.is_empty() {
            self.commit_data(segment);
        }
        shutdown
    }

    fn commit_data(&mut self, segment: Vec<WriteOp>) {
        // After a failed sync nothing is acknowledged; short of space,
        // appends are refused before they touch the database.
        let refuse = self
            .failure()
            .map(|m| self.failed_error(m.to_string()))
            .or_else(|| {
                segment
                    .iter()
                    .any(|op| matches!(op, WriteOp::Append { .. }))
                    .then(|| self.space_short().map(StorageError::StorageFull))
                    .flatten()
            });
        let segment = match refuse {
            None => segment,
            Some(e) => {
                let failed = !matches!(e, StorageError::StorageFull(_));
                let mut keep = Vec::new();
                for op in segment {
                    match op {
                        WriteOp::Append { reply, .. } => {
                            let _ = reply.send(Err(clone_error(&e)));
                        }
                        WriteOp::Flush { reply } if failed => {
                            let _ = reply.send(Err(clone_error(&e)));
                        }
                        other if !failed => keep.push(other),
                        _ => {}
                    }
                }
                if keep.is_empty() {
                    return;
                }
                keep
            }
        };
        let started = Instant::now();
        let mut undo: HashMap<(u32, u32), PartState> = HashMap::new();
        let mut replies = Vec::new();
        let mut flushes = Vec::new();
        let mut new_ids: Vec<(u32, u64)> = Vec::new();
        // Ops are taken from the front as they are applied; if the
        // transaction fails, those not reached are still here to answer.
        let (records, bytes) = segment.iter().fold((0, 0), |(n, b), op| match op {
            WriteOp::Append { records, .. } => (n + records.len(), b + weight(op).1),
            _ => (n, b),
        });
        // A cycle older than the checkpoint period ends with this commit,
        // made durable in redb (the periodic checkpoint normally comes first).
        let journal = self.journal.as_ref().is_some_and(|j| {
            bytes <= JOURNAL_MAX_COMMIT_BYTES
                && j.age().is_none_or(|age| age < self.config.checkpoint)
        });
        self.redo.start(journal || self.replicating());
        let mut segment: VecDeque<WriteOp> = segment.into();
        let result = self.apply_data(
            &mut segment,
            &mut undo,
            &mut replies,
            &mut flushes,
            &mut new_ids,
        );
        let flushed: Result<(), StorageError>;
        match result {
            Ok(()) => {
                flushed = Ok(());
                self.stats.commit_records.observe(records as f64);
                self.stats
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                if let Some((_, _, since)) = self.free.as_mut() {
                    *since += bytes as u64;
                }
                let touched: HashSet<u32> = undo.keys().map(|(t, _)| *t).collect();
                for t in touched {
                    if let Some(ts) = self.topics.get(&t) {
                        ts.publish();
                    }
                }
                for (reply, r) in replies {
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed; rolling back the batch");
                let e = self.failed_commit(&e);
                flushed = Err(clone_error(&e));
                for (t, h) in new_ids.into_iter().rev() {
                    if let Some(ts) = self.topics.get_mut(&t) {
                        ts.dedup.forget_newest(h);
                    }
                }
                for ((t, p), old) in undo {
                    if let Some(ts) = self.topics.get_mut(&t) {
                        ts.parts[p as usize] = old;
                    }
                }
                for (reply, _) in replies {
                    let _ = reply.send(Err(clone_error(&e)));
                }
                for op in segment {
                    match op {
                        WriteOp::Append { reply, .. } => {
                            let _ = reply.send(Err(clone_error(&e)));
                        }
                        WriteOp::Flush { reply } => flushes.push(reply),
                        _ => {}
                    }
                }
            }
        }
        for f in flushes {
            let _ = f.send(flushed.as_ref().map_err(clone_error).copied());
        }
    }

    #[allow(clippy::type_complexity)]
    fn apply_data(
        &mut self,
        segment: &mut VecDeque<WriteOp>,
        undo: &mut HashMap<(u32, u32), PartState>,
        replies: &mut Vec<(
            oneshot::Sender<Result<Vec<(u32, u64)>, StorageError>>,
            Result<Vec<(u32, u64)>, StorageError>,
        )>,
        flushes: &mut Vec<oneshot::Sender<Result<(), StorageError>>>,
        new_ids: &mut Vec<(u32, u64)>,
    ) -> Result<(), StorageError> {
        self.take_loaded_dedup();
        // Until the windows are loaded every id is looked up on disk.
        let partial = !matches!(self.dedup, Windows::Loaded);
        let txn = self.db.begin_write()?;
        {
            let mut tables = DataTables::new(&txn, &mut self.redo);
            let feed_registry = self.feeds.clone();
            let feeds = feed_registry.read().expect("feeds lock");
            let now = now_ms();
            expire_dedup(&mut self.topics, now, &mut tables)?;
            while let Some(op) = segment.pop_front() {
                match op {
                    WriteOp::Append {
                        records,
                        kv,
                        cutover,
                        reply,
                    } => {
                        // Check the whole request first: it is applied whole or not at all.
                        let bad = records
                            .iter()
                            .find_map(|r| match self.topics.get(&r.topic_id) {
                                None => {
                                    Some(StorageError::UnknownTopic(format!("#{}", r.topic_id)))
                                }
                                Some(ts) if r.partition as usize >= ts.parts.len() => {
                                    Some(StorageError::Corrupt(format!(
                                        "partition {} out of range for '{}'",
                                        r.partition, ts.handle.meta.name
                                    )))
                                }
                                Some(_) => None,
                            });
                        if let Some(e) = bad {
                            replies.push((reply, Err(e)));
                            continue;
                        }
                        // Answered with the commit's error if anything below fails.
                        replies.push((reply, Err(StorageError::ShutDown)));
                        let slot = replies.len() - 1;
                        let mut positions = Vec::with_capacity(records.len());
                        let topic_ids: Vec<u32> = if cutover.is_some() {
                            records.iter().map(|r| r.topic_id).collect()
                        } else {
                            Vec::new()
                        };
                        for r in records {
                            let ts = self.topics.get_mut(&r.topic_id).expect("checked above");
                            let hash = r.dedup.as_deref().map(super::dedup_hash);
                            if let (Some(id), Some(h)) = (&r.dedup, hash)
                                && (partial || ts.dedup.ids.contains_key(&h))
                                && let Some((p, o, _)) =
                                    tables.dedup()?.get((r.topic_id, &id[..]))?
                            {
                                positions.push((p | DUPLICATE_BIT, o));
                                continue;
                            }
                            let p = r.partition;
                            let st = &mut ts.parts[p as usize];
                            undo.entry((r.topic_id, p)).or_insert(*st);
                            let offset = st.end;
                            let t = now.max(st.last_ts);
                            let body = r.record.as_bytes();
                            let key = (r.topic_id, p, offset);
                            tables.log()?.insert_with(
                                key,
                                super::log::ENTRY_OVERHEAD + body.len(),
                                |dst| super::log::put_entry(dst, key, t, body),
                            )?;
                            st.end += 1;
                            st.bytes += body.len() as u64;
                            st.last_ts = t;
                            positions.push((p, offset));
                            match r.fanout {
                                Some((hash, Fanout::OnWrite)) => {
                                    let followers =
                                        feeds.get(&r.topic_id).and_then(|f| f.followers.get(&hash));
                                    for feed in followers.into_iter().flatten() {
                                        let k = (r.topic_id, *feed, p, offset);
                                        tables.inbox()?.insert(k, ())?;
                                    }
                                }
                                Some((hash, Fanout::OnRead)) => {
                                    let k = (r.topic_id, hash, p, offset);
                                    tables.key_index()?.insert(k, ())?;
                                }
                                None => {}
                            }
                            if let (Some(id), Some(h)) = (r.dedup, hash) {
                                tables
                                    .dedup()?
                                    .insert((r.topic_id, &id[..]), (p, offset, t))?;
                                tables
                                    .dedup_expiry()?
                                    .insert((r.topic_id, t, p, offset), &id[..])?;
                                ts.dedup.remember(t, h);
                                new_ids.push((r.topic_id, h));
                            }
                        }
                        for w in kv {
                            let k = (&*w.plugin, w.key.as_str());
                            tables.kv()?.insert(k, w.value.as_slice())?;
                        }
                        if let Some(m) = cutover {
                            // The first stored (not duplicate) offset per
                            // partition, kept only if the activation has no
                            // row there yet.
                            let mut seen: Vec<(u32, u32)> = Vec::new();
                            for (r, &(p, o)) in topic_ids.iter().zip(&positions) {
                                if p & DUPLICATE_BIT != 0 || seen.contains(&(*r, p)) {
                                    continue;
                                }
                                seen.push((*r, p));
                                let k = (&*m.plugin, m.activation, *r, p);
                                if !tables.cutover()?.has(k)? {
                                    tables.cutover()?.insert(k, (o, m.latency_us))?;
                                }
                            }
                        }
                        replies[slot].1 = Ok(positions);
                    }
                    WriteOp::CommitOffset {
                        group,
                        topic_id,
                        partition,
                        offset,
                    } => {
                        // Commits for a deleted topic are dropped, not stored.
                        if self.topics.contains_key(&topic_id) {
                            tables
                                .offsets()?
                                .insert((&*group, topic_id, partition), offset)?;
                        }
                    }
                    WriteOp::Flush { reply } => flushes.push(reply),
                    WriteOp::FeedCommit {
                        topic_id,
                        feed_id,
                        group,
                        partition,
                        next,
                    } => {
                        if !self.topics.contains_key(&topic_id) {
                            continue;
                        }
                        tables
                            .offsets()?
                            .insert((&*group, topic_id, partition), next)?;
                        // Inbox references below the cursor are read: drop them.
                        let (from, to) = (
                            (topic_id, feed_id, partition, 0),
                            (topic_id, feed_id, partition, next),
                        );
                        tables.inbox()?.remove_range(from, to)?;
                    }
                    WriteOp::Queue(w) => {
                        if !self.topics.contains_key(&w.topic_id) {
                            continue;
                        }
                        let g = &*w.group;
                        for (p, o, v) in w.entries {
                            let k = (w.topic_id, g, p, o);
                            match v {
                                Some(v) => {
                                    tables.queue()?.insert(k, v)?;
                                }
                                None => {
                                    tables.queue()?.remove(k)?;
                                }
                            };
                        }
                        for (p, floor) in w.floors {
                            tables.floors()?.insert((w.topic_id, g, p), floor)?;
                        }
                        for (p, mark) in w.marks {
                            tables.marks()?.insert((w.topic_id, g, p), mark)?;
                        }
                        for (p, chunk, bytes) in w.done {
                            let k = (w.topic_id, g, p, chunk);
                            if bytes.is_empty() {
                                tables.done()?.remove(k)?;
                            } else {
                                tables.done()?.insert(k, bytes.as_slice())?;
                            }
                        }
                    }
                    _ => unreachable!("only data ops reach apply_data"),
                }
            }
            for &(t, p) in undo.keys() {
                let s = self.topics[&t].parts[p as usize];
                let v = (s.start, s.end, s.bytes, s.last_ts);
                tables.parts()?.insert((t, p), v)?;
            }
        }
        self.commit(txn)
    }

    /// Commits a data transaction: through the journal if its changes were
    /// recorded and fit, else durably in redb (which also checkpoints
    /// everything journaled before it).
    fn commit(&mut self, mut txn: WriteTransaction) -> Result<(), StorageError> {
        if self.replicating() {
            return self.replicate(txn);
        }
        if let Some(j) = self.journal.as_ref().filter(|_| self.redo.is_on()) {
            // The entry also moves redb's lsn row, so it is recorded first
            // and counted in the size.
            self.redo.put(META, &JOURNAL_LSN, &j.next_lsn());
        }
        let journal = match self.journal.as_mut() {
            Some(j) if self.redo.is_on() && j.fits(self.redo.len()) => j,
            _ => {
                let t0 = Instant::now();
                txn.commit()?;
                self.stats
                    .database_sync_seconds
                    .observe(t0.elapsed().as_secs_f64());
                self.durable();
                return Ok(());
            }
        };
        txn.open_table(META)?
            .insert(JOURNAL_LSN, journal.next_lsn())?;
        txn.set_durability(Durability::None)
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        // Dropping `txn` on an error aborts it: nothing becomes visible.
        let t0 = Instant::now();
        journal.append(&mut self.redo)?;
        self.stats
            .journal_sync_seconds
            .observe(t0.elapsed().as_secs_f64());
        if let Err(e) = txn.commit() {
            // Refused to the client, so it must not come back on replay.
            if let Err(c) = journal.cancel() {
                tracing::error!(error = %c, "cannot void a journal entry after a failed commit");
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Whether commits are replicated (a cluster's leader).
    fn replicating(&self) -> bool {
        self.config.replicator.is_some()
    }

    /// Starts recording a commit that is not a data commit: recorded only
    /// when it is replicated.
    fn start_other(&mut self) {
        let on = self.replicating();
        self.redo.start(on);
    }

    /// Commits a transaction that is not a data commit: replicated first
    /// in a cluster, else durably in redb.
    fn commit_other(&mut self, txn: WriteTransaction) -> Result<(), StorageError> {
        commit_other(self.config.replicator.as_deref(), &self.redo, txn)
    }

    /// Replicates the recorded changes of `txn`, then commits it without a
    /// sync: the replicated log, durable on a majority, is what recovers it.
    fn replicate(&mut self, txn: WriteTransaction) -> Result<(), StorageError> {
        let r = self
            .config
            .replicator
            .clone()
            .expect("replicate() is called only with a replicator");
        let t0 = Instant::now();
        commit_replicated(&*r, self.redo.payload(), txn)?;
        self.stats
            .replicate_seconds
            .observe(t0.elapsed().as_secs_f64());
        Ok(())
    }

    /// Notes a durable redb commit: every journal entry so far is in redb.
    fn durable(&mut self) {
        if let Some(j) = self.journal.as_mut() {
            j.restart();
        }
    }

    /// Makes every journaled commit durable in redb (one durable commit),
    /// so the journal starts a new cycle; nothing to do if it is empty.
    fn checkpoint(&mut self) -> Result<(), StorageError> {
        if self.replicating() {
            // Commits are not synced one by one here; a durable commit now
            // and then lets redb reuse the pages they freed and bounds what
            // a restart replays from the Raft log.
            let t0 = Instant::now();
            let txn = self.db.begin_write()?;
            txn.open_table(super::tables::RAFT_APPLIED)?
                .insert("checkpoint", &[][..])?;
            txn.commit()?;
            self.stats
                .checkpoint_seconds
                .observe(t0.elapsed().as_secs_f64());
            return Ok(());
        }
        let Some(last) = self
            .journal
            .as_ref()
            .filter(|j| j.age().is_some())
            .map(|j| j.next_lsn() - 1)
        else {
            return Ok(());
        };
        let t0 = Instant::now();
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert(JOURNAL_LSN, last)?;
        txn.commit()?;
        self.durable();
        self.stats
            .checkpoint_seconds
            .observe(t0.elapsed().as_secs_f64());
        tracing::debug!(
            lsn = last,
            took_us = t0.elapsed().as_micros() as u64,
            "journal checkpoint"
        );
        Ok(())
    }

    fn create_topic(
        &mut self,
        name: String,
        partitions: u32,
        retention_ms: u64,
        retention_bytes: u64,
    ) -> Result<Arc<TopicHandle>, StorageError> {
        if self
            .registry
            .read()
            .expect("registry lock")
            .contains_key(&name)
        {
            return Err(StorageError::TopicExists(name));
        }
        self.start_other();
        let txn = self.db.begin_write()?;
        let meta;
        {
            let mut m = txn.open_table(META)?;
            let id = m.get(NEXT_TOPIC_ID)?.map(|v| v.value()).unwrap_or(1) as u32;
            m.insert(NEXT_TOPIC_ID, id as u64 + 1)?;
            self.redo.put(META, &NEXT_TOPIC_ID, &(id as u64 + 1));
            meta = TopicMeta {
                id,
                name: name.clone(),
                partitions,
                retention_ms,
                retention_bytes,
                created_ms: now_ms(),
                policy: TopicPolicy::default(),
            };
            let json = serde_json::to_vec(&meta).expect("topic metadata serializes");
            txn.open_table(TOPICS)?
                .insert(name.as_str(), json.as_slice())?;
            self.redo.put(TOPICS, &name.as_str(), &json.as_slice());
            let mut pt = txn.open_table(PARTITIONS)?;
            for p in 0..partitions {
                pt.insert((id, p), (0, 0, 0, 0))?;
                self.redo.put(PARTITIONS, &(id, p), &(0, 0, 0, 0));
            }
        }
        self.commit_other(txn)?;
        let parts = vec![PartState::default(); partitions as usize];
        let infos: Arc<[PartitionInfo]> = parts.iter().map(|s| s.info()).collect();
        let handle = Arc::new(TopicHandle::new(meta.clone(), infos));
        self.topics
            .insert(meta.id, TopicState::new(handle.clone(), parts));
        self.registry
            .write()
            .expect("registry lock")
            .insert(name, handle.clone());
        Ok(handle)
    }

    fn delete_topic(&mut self, name: &str) -> Result<(), StorageError> {
        let Some(handle) = self
            .registry
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
        else {
            return Err(StorageError::UnknownTopic(name.to_string()));
        };
        let id = handle.meta.id;
        let next = id.saturating_add(1);
        self.start_other();
        let txn = self.db.begin_write()?;
        {
            let redo = &mut self.redo;
            txn.open_table(TOPICS)?.remove(name)?;
            redo.del(TOPICS, &name);
            remove_range(&txn, redo, PARTITIONS, (id, 0), (next, 0))?;
            remove_range(&txn, redo, LOG, (id, 0, 0), (next, 0, 0))?;
            remove_where(&txn, redo, OFFSETS, |k| k.1 == id)?;
            remove_range(&txn, redo, QUEUE, (id, "", 0, 0), (next, "", 0, 0))?;
            remove_range(&txn, redo, QUEUE_FLOOR, (id, "", 0), (next, "", 0))?;
            remove_range(&txn, redo, QUEUE_MARK, (id, "", 0), (next, "", 0))?;
            remove_range(&txn, redo, QUEUE_DONE, (id, "", 0, 0), (next, "", 0, 0))?;
            remove_range(&txn, redo, DEDUP, (id, &[][..]), (next, &[][..]))?;
            remove_range(&txn, redo, DEDUP_EXPIRY, (id, 0, 0, 0), (next, 0, 0, 0))?;
            remove_range(&txn, redo, INBOX, (id, 0, 0, 0), (next, 0, 0, 0))?;
            remove_range(&txn, redo, KEY_INDEX, (id, 0, 0, 0), (next, 0, 0, 0))?;
            remove_range(&txn, redo, FEEDS, (id, ""), (next, ""))?;
        }
        self.commit_other(txn)?;
        self.feeds.write().expect("feeds lock").remove(&id);
        self.topics.remove(&id);
        self.registry.write().expect("registry lock").remove(name);
        handle.mark_deleted();
        Ok(())
    }

    fn follow(
        &mut self,
        topic_id: u32,
        name: String,
        keys: Vec<Vec<u8>>,
    ) -> Result<FeedDef, StorageError> {
        let Some(ts) = self.topics.get(&topic_id) else {
            return Err(StorageError::UnknownTopic(format!("#{topic_id}")));
        };
        let n = ts.parts.len() as u64;
        let mut reg = self.feeds.write().expect("feeds lock");
        let topic_feeds = reg.entry(topic_id).or_default();
        let old = topic_feeds.feeds.get(&name).cloned();
        let id = old.as_ref().map_or(topic_feeds.next_id(), |d| d.id);
        let mut def = FeedDef {
            id,
            name: name.clone(),
            keys: Vec::with_capacity(keys.len()),
        };
        for k in keys {
            if def.keys.iter().any(|(e, _)| *e == k) {
                continue;
            }
            let start = old
                .as_ref()
                .and_then(|d| d.keys.iter().find(|(e, _)| *e == k).map(|(_, s)| *s))
                .unwrap_or_else(|| ts.parts[(super::key_hash(&k) % n) as usize].end);
            def.keys.push((k, start));
        }
        let json = serde_json::to_vec(&def).expect("feed serializes");
        // Field by field: the topic's state and the feed registry are
        // borrowed here.
        self.redo.start(self.config.replicator.is_some());
        let txn = self.db.begin_write()?;
        txn.open_table(FEEDS)?
            .insert((topic_id, name.as_str()), json.as_slice())?;
        self.redo
            .put(FEEDS, &(topic_id, name.as_str()), &json.as_slice());
        commit_other(self.config.replicator.as_deref(), &self.redo, txn)?;
        topic_feeds.feeds.insert(name, def.clone());
        topic_feeds.rebuild();
        Ok(def)
    }

    fn set_policy(&mut self, name: &str, policy: TopicPolicy) -> Result<(), StorageError> {
        let handle = self
            .registry
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
            .ok_or_else(|| StorageError::UnknownTopic(name.to_string()))?;
        let mut meta = handle.meta.clone();
        meta.policy = policy.clone();
        let json = serde_json::to_vec(&meta).expect("topic metadata serializes");
        self.start_other();
        let txn = self.db.begin_write()?;
        txn.open_table(TOPICS)?.insert(name, json.as_slice())?;
        self.redo.put(TOPICS, &name, &json.as_slice());
        self.commit_other(txn)?;
        handle.policy.store(Arc::new(policy));
        Ok(())
    }

    fn truncate(&mut self, id: u32, p: u32, before: u64) -> Result<u64, StorageError> {
        let Some(ts) = self.topics.get_mut(&id) else {
            return Err(StorageError::UnknownTopic(format!("#{id}")));
        };
        let Some(st) = ts.parts.get(p as usize).copied() else {
            return Err(StorageError::Corrupt(format!("partition {p} out of range")));
        };
        let before = before.min(st.end);
        if before <= st.start {
            return Ok(0);
        }
        let mut new = st;
        // Field by field: the topic's state is borrowed here.
        self.redo.start(self.config.replicator.is_some());
        let txn = self.db.begin_write()?;
        {
            let mut log = txn.open_table(LOG)?;
            for e in log.range((id, p, st.start)..(id, p, before))? {
                let (_, v) = e?;
                new.bytes -= super::log::entry_meta(v.value()).1 as u64;
            }
            log.retain_in((id, p, st.start)..(id, p, before), |_, _| false)?;
            self.redo
                .del_range(LOG, &(id, p, st.start), &(id, p, before));
            new.start = before;
            let row = (new.start, new.end, new.bytes, new.last_ts);
            txn.open_table(PARTITIONS)?.insert((id, p), row)?;
            self.redo.put(PARTITIONS, &(id, p), &row);
        }
        commit_other(self.config.replicator.as_deref(), &self.redo, txn)?;
        ts.parts[p as usize] = new;
        ts.publish();
        Ok(before - st.start)
    }

    fn put_plugin(
        &mut self,
        name: &str,
        record: &[u8],
        wasm: Option<(u32, Vec<u8>, Option<Vec<u8>>)>,
        drop_versions: &[u32],
    ) -> Result<(), StorageError> {
        self.start_other();
        let txn = self.db.begin_write()?;
        {
            txn.open_table(PLUGINS)?.insert(name, record)?;
            self.redo.put(PLUGINS, &name, &record);
            let mut w = txn.open_table(PLUGIN_WASM)?;
            let mut a = txn.open_table(PLUGIN_ARTIFACT)?;
            if let Some((version, bytes, artifact)) = wasm {
                w.insert((name, version), bytes.as_slice())?;
                self.redo
                    .put(PLUGIN_WASM, &(name, version), &bytes.as_slice());
                // The compiled artifact is for this build only: not replicated.
                if let Some(artifact) = artifact {
                    a.insert((name, version), artifact.as_slice())?;
                }
            }
            for v in drop_versions {
                w.remove((name, *v))?;
                self.redo.del(PLUGIN_WASM, &(name, *v));
                a.remove((name, *v))?;
            }
        }
        self.commit_other(txn)?;
        Ok(())
    }

    fn put_principal(&mut self, name: &str, record: Option<&[u8]>) -> Result<(), StorageError> {
        self.start_other();
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(PRINCIPALS)?;
            match record {
                Some(r) => {
                    t.insert(name, r)?;
                    self.redo.put(PRINCIPALS, &name, &r);
                }
                None => {
                    t.remove(name)?;
                    self.redo.del(PRINCIPALS, &name);
                }
            };
        }
        self.commit_other(txn)?;
        Ok(())
    }

    fn drain_node(&mut self, node: u64, drained: bool) -> Result<(), StorageError> {
        self.start_other();
        let txn = self.db.begin_write()?;
        {
            let key = super::drained_key(node);
            let mut meta = txn.open_table(META)?;
            if drained {
                meta.insert(key.as_str(), 1)?;
                self.redo.put(META, &key.as_str(), &1u64);
            } else {
                meta.remove(key.as_str())?;
                self.redo.del(META, &key.as_str());
            }
        }
        self.commit_other(txn)?;
        Ok(())
    }

    fn assign_topic(
        &mut self,
        name: &str,
        group: u32,
        partitions: u32,
    ) -> Result<(), StorageError> {
        self.start_other();
        let txn = self.db.begin_write()?;
        txn.open_table(TOPIC_GROUPS)?
            .insert(name, (group, partitions))?;
        self.redo.put(TOPIC_GROUPS, &name, &(group, partitions));
        self.commit_other(txn)?;
        Ok(())
    }

    fn remove_plugin(&mut self, name: &str) -> Result<(), StorageError> {
        self.start_other();
        let txn = self.db.begin_write()?;
        {
            let redo = &mut self.redo;
            txn.open_table(PLUGINS)?.remove(name)?;
            redo.del(PLUGINS, &name);
            remove_where(&txn, redo, PLUGIN_WASM, |k| k.0 == name)?;
            txn.open_table(PLUGIN_ARTIFACT)?
                .retain_in((name, 0)..=(name, u32::MAX), |_, _| false)?;
            remove_where(&txn, redo, PLUGIN_KV, |k| k.0 == name)?;
            remove_where(&txn, redo, PLUGIN_CUTOVER, |k| k.0 == name)?;
        }
        self.commit_other(txn)?;
        Ok(())
    }

    /// Deletes records past their topic's age or size limit. Returns how many.
    fn retention(&mut self) -> Result<u64, StorageError> {
        let now = now_ms();
        let mut deleted = 0u64;
        let mut changed: Vec<(u32, u32, PartState)> = Vec::new();
        self.start_other();
        let txn = self.db.begin_write()?;
        {
            let mut log = txn.open_table(LOG)?;
            let mut parts_table = txn.open_table(PARTITIONS)?;
            let mut key_index = txn.open_table(KEY_INDEX)?;
            let mut inbox = txn.open_table(INBOX)?;
            for (&id, ts) in &self.topics {
                let m = &ts.handle.meta;
                if m.retention_ms == 0 && m.retention_bytes == 0 {
                    continue;
                }
                let cutoff = now.saturating_sub(m.retention_ms);
                for (p, st) in ts.parts.iter().enumerate() {
                    let p = p as u32;
                    let mut new = *st;
                    for entry in log
                        .range((id, p, st.start)..(id, p, st.end))?
                        .take(RETENTION_PASS_LIMIT)
                    {
                        let (k, v) = entry?;
                        let (t, len) = super::log::entry_meta(v.value());
                        let len = len as u64;
                        let too_old = m.retention_ms > 0 && t < cutoff;
                        let too_big = m.retention_bytes > 0 && new.bytes > m.retention_bytes;
                        if !(too_old || too_big) {
                            break;
                        }
                        new.start = k.value().2 + 1;
                        new.bytes -= len;
                    }
                    if new.start != st.start {
                        log.retain_in((id, p, st.start)..(id, p, new.start), |_, _| false)?;
                        self.redo
                            .del_range(LOG, &(id, p, st.start), &(id, p, new.start));
                        let row = (new.start, new.end, new.bytes, new.last_ts);
                        parts_table.insert((id, p), row)?;
                        self.redo.put(PARTITIONS, &(id, p), &row);
                        deleted += new.start - st.start;
                        ts.handle
                            .stats
                            .retention_deleted
                            .fetch_add(new.start - st.start, std::sync::atomic::Ordering::Relaxed);
                        changed.push((id, p, new));
                    }
                }
                // Fan-out references to records retention removed, now or in
                // an earlier pass.
                let starts: Vec<u64> = ts
                    .parts
                    .iter()
                    .enumerate()
                    .map(|(p, st)| {
                        changed
                            .iter()
                            .find(|c| c.0 == id && c.1 == p as u32)
                            .map_or(st.start, |c| c.2.start)
                    })
                    .collect();
                let state = self.prune.entry(id).or_default();
                // A finished sweep against these starts has nothing left to do.
                if state.keys_from == 0 && state.feeds_from == 0 && state.swept == starts {
                    continue;
                }
                let redo = &mut self.redo;
                state.keys_from = prune_references(
                    &mut key_index,
                    KEY_INDEX,
                    redo,
                    id,
                    &starts,
                    state.keys_from,
                )?;
                state.feeds_from =
                    prune_references(&mut inbox, INBOX, redo, id, &starts, state.feeds_from)?;
                if state.keys_from == 0 && state.feeds_from == 0 {
                    state.swept = starts;
                }
            }
        }
        self.commit_other(txn)?;
        let mut touched = HashSet::new();
        for (id, p, st) in changed {
            if let Some(ts) = self.topics.get_mut(&id) {
                ts.parts[p as usize] = st;
                touched.insert(id);
            }
        }
        for id in touched {
            self.topics[&id].publish();
        }
        if deleted > 0 {
            tracing::info!(deleted, "retention removed records");
        }
        Ok(deleted)
    }
}

/// Commits a transaction that is not a data commit: replicated first by
/// `replicator` (a cluster's leader), else durably in redb.
fn commit_other(
    replicator: Option<&dyn super::Replicator>,
    redo: &Redo,
    txn: WriteTransaction,
) -> Result<(), StorageError> {
    match replicator {
        Some(r) => commit_replicated(r, redo.payload(), txn),
        None => Ok(txn.commit()?),
    }
}

/// Replicates `redo`, the changes of `txn`, then commits `txn` without a
/// sync. On an error `txn` is dropped, which aborts it.
fn commit_replicated(
    r: &dyn super::Replicator,
    redo: &[u8],
    mut txn: WriteTransaction,
) -> Result<(), StorageError> {
    if redo.is_empty() {
        // Nothing changed (a flush barrier, a retention pass that removed
        // nothing): every earlier commit is replicated already, since the
        // writer waits for each, so there is nothing to order or to send.
        txn.set_durability(Durability::None)
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        return Ok(txn.commit()?);
    }
    r.replicate(redo, &txn)?;
    txn.set_durability(Durability::None)
        .map_err(|e| StorageError::Corrupt(e.to_string()))?;
    let committed = txn.commit();
    r.done(committed.is_ok());
    Ok(committed?)
}

/// Removes the keys in `from..to` from `def`, recording it in `redo`.
fn remove_range<'k, K: Key + 'static, V: Value + 'static>(
    txn: &WriteTransaction,
    redo: &mut Redo,
    def: TableDefinition<K, V>,
    from: K::SelfType<'k>,
    to: K::SelfType<'k>,
) -> Result<(), StorageError>
where
    K::SelfType<'k>: Clone,
{
    redo.del_range(def, &from, &to);
    txn.open_table(def)?
        .retain_in::<K::SelfType<'k>, _>(from..to, |_, _| false)?;
    Ok(())
}

/// Removes the keys of `def` that `matches`, recording each in `redo`.
fn remove_where<K: Key + 'static, V: Value + 'static>(
    txn: &WriteTransaction,
    redo: &mut Redo,
    def: TableDefinition<K, V>,
    matches: impl Fn(&K::SelfType<'_>) -> bool,
) -> Result<(), StorageError> {
    let mut table = txn.open_table(def)?;
    let mut gone: Vec<Vec<u8>> = Vec::new();
    for row in table.iter()? {
        let (k, _) = row?;
        let k = k.value();
        if matches(&k) {
            gone.push(K::as_bytes(&k).as_ref().to_vec());
        }
    }
    for k in &gone {
        let key = K::from_bytes(k);
        redo.del(def, &key);
        table.remove(key)?;
    }
    Ok(())
}

/// Where a topic's sweep of fan-out references stands.
#[derive(Default)]
struct PruneState {
    /// Key hash the next pass prunes the key index from (0: a new sweep).
    keys_from: u64,
    /// Feed id the next pass prunes the inbox from (0: a new sweep).
    feeds_from: u64,
    /// Partition starts the last finished sweep pruned below.
    swept: Vec<u64>,
}

/// Most distinct keys (or feeds) one retention pass prunes references for,
/// per topic, so the pass stays short however many keys a topic has; the
/// next pass continues where this one stopped.
const PRUNE_KEYS_PER_PASS: usize = 4_096;

/// Deletes the entries of `table` (keyed `(topic, key or feed, partition,
/// offset)`: the key index or the inbox) of topic `id` whose offset is below
/// its partition's start in `starts`, for up to [`PRUNE_KEYS_PER_PASS`]
/// distinct keys from `from` on. Returns where the next pass starts (0 once
/// the sweep reached the end). Each deletion goes into `redo` (`def` is
/// the table's definition), so a cluster's replicas prune the same rows.
fn prune_references<S>(
    table: &mut redb::Table<(u32, S, u32, u64), ()>,
    def: redb::TableDefinition<(u32, S, u32, u64), ()>,
    redo: &mut Redo,
    id: u32,
    starts: &[u64],
    from: u64,
) -> Result<u64, StorageError>
where
    S: redb::Key + Copy + Into<u64> + TryFrom<u64> + 'static,
    for<'a> S: redb::Value<SelfType<'a> = S>,
{
    let mut next = from;
    for _ in 0..PRUNE_KEYS_PER_PASS {
        let Ok(lo) = S::try_from(next) else {
            return Ok(0);
        };
        let key: S = {
            let mut it = table.range((id, lo, 0, 0)..(id.saturating_add(1), lo, 0, 0))?;
            match it.next() {
                Some(e) => e?.0.value().1,
                None => return Ok(0),
            }
        };
        for (p, &start) in starts.iter().enumerate() {
            if start > 0 {
                let (from, to) = ((id, key, p as u32, 0), (id, key, p as u32, start));
                table.retain_in(from..to, |_, _| false)?;
                redo.del_range(def, &from, &to);
            }
        }
        let k: u64 = key.into();
        match k.checked_add(1) {
            Some(n) => next = n,
            None => return Ok(0),
        }
    }
    Ok(next)
}

/// The offsets-table group under which a feed's cursors are kept. Group
/// names cannot hold control characters, so this never collides.
pub(crate) fn feed_group(name: &str) -> String {
    format!("\u{1}feed:{name}")
}

fn weight(op: &WriteOp) -> (usize, usize) {
    match op {
        WriteOp::Append { records, .. } => {
            (records.len(), records.iter().map(|r| r.record.len()).sum())
        }
        _ => (1, 0),
    }
}

/// Most message ids one commit forgets per topic.
const EXPIRE_PER_COMMIT: usize = 16_384;

/// Forgets message ids older than their topic's dedup window: their
/// hashes from memory, their rows (found through the expiry index, in
/// time order) from disk.
fn expire_dedup(
    topics: &mut HashMap<u32, TopicState>,
    now: u64,
    tables: &mut DataTables<'_, '_>,
) -> Result<(), StorageError> {
    for (&id, ts) in topics.iter_mut() {
        let window = ts.handle.policy().dedup_window_ms;
        let mut upto = None;
        let mut expired = 0;
        while let Some(&(t, h)) = ts.dedup.order.front() {
            // A bounded share per commit: forgetting a million ids at once
            // would hold them all in one transaction. The rest go with the
            // next commits; until then they are remembered a little longer.
            if t.saturating_add(window) > now || expired == EXPIRE_PER_COMMIT {
                break;
            }
            expired += 1;
            ts.dedup.order.pop_front();
            ts.dedup.forget(h);
            upto = Some(t);
        }
        if let Some(upto) = upto {
            for (key, msg_id) in tables.dedup_expiry()?.up_to(id, upto)? {
                tables.dedup()?.remove((id, &msg_id[..]))?;
                tables.dedup_expiry()?.remove(key)?;
            }
        }
    }
    Ok(())
}
