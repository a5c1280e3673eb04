//! The Raft log and vote, in their own redb file (`raft.redb`), shared by
//! every Raft group on the node ([`LogFile`]; a table pair per group).
//!
//! An append commits its entries to redb without a sync, so they can be
//! read (and replicated) at once, and hands openraft's completion callback
//! to a flusher thread. The flusher makes every append queued since its
//! last sync durable with one durable commit and only then reports them
//! flushed: openraft counts an entry towards a majority only after that,
//! so an acknowledged write is on the disks of a majority. One flusher
//! serves every group in the file, so one sync covers the appends of all
//! of a node's groups. A vote is saved
//! with a durable commit before it is answered.
//!
//! A separate file from the state machine's: its commits are small and
//! frequent, the state machine's are checkpointed lazily, and a snapshot
//! install can replace the state machine's tables without touching the
//! log. `docs/cluster.md` has the measurements.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader, Vote};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::storage::disk::{Disk, OsDisk};

use super::net::GroupId;
use super::{Entry, LogId, NodeId, StorageError, TypeConfig, read_error, write_error};

/// What the flusher's durable commit writes (a commit must change
/// something).
const FLUSH: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_flush");

/// A node's Raft log file, shared by its groups. Cheap to clone: clones
/// share the file and its flusher.
#[derive(Clone)]
pub struct LogFile {
    db: Arc<Database>,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
}

impl LogFile {
    /// Opens (or creates) the file at `path` on `disk` and starts its
    /// flusher thread, which ends when the last clone (and the last
    /// [`LogStore`] of it) is dropped.
    pub fn open_on(disk: &dyn Disk, path: &Path) -> Result<LogFile, StorageError> {
        let db = Arc::new(super::create_db(disk, path)?);
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let flush_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flusher(&flush_db, &rx))
            .map_err(write_error)?;
        Ok(LogFile { db, flusher: tx })
    }

    /// The log of `group` in this file. Group 0's tables are `raft_log`
    /// and `raft_state` (the names of a file with one group, as nodes
    /// before groups wrote it); group N's are `raft_log.N` and
    /// `raft_state.N`.
    pub fn group(&self, group: GroupId) -> Result<LogStore, StorageError> {
        let (log, state) = match group {
            0 => ("raft_log".to_string(), "raft_state".to_string()),
            g => (format!("raft_log.{g}"), format!("raft_state.{g}")),
        };
        let store = LogStore {
            file: self.clone(),
            log: log.into(),
            state: state.into(),
            appended: Arc::default(),
        };
        let txn = self.db.begin_write().map_err(write_error)?;
        txn.open_table(store.log()).map_err(write_error)?;
        txn.open_table(store.state()).map_err(write_error)?;
        txn.commit().map_err(write_error)?;
        Ok(store)
    }
}

/// The Raft log store of one group on one node. Cheap to clone: clones
/// share the file.
#[derive(Clone)]
pub struct LogStore {
    file: LogFile,
    /// Its table of entries: index -> postcard-encoded entry.
    log: Arc<str>,
    /// Its table of `vote`, `committed`, `purged` -> postcard-encoded
    /// value.
    state: Arc<str>,
    /// Bytes of entries appended since the log was opened.
    appended: Arc<AtomicU64>,
}

impl LogStore {
    /// Opens (or creates) the log at `path`, a file of its own, for a
    /// node of one group.
    pub fn open(path: &Path) -> Result<LogStore, StorageError> {
        Self::open_on(&OsDisk, path)
    }

    /// As [`LogStore::open`], with the file on `disk`.
    pub fn open_on(disk: &dyn Disk, path: &Path) -> Result<LogStore, StorageError> {
        LogFile::open_on(disk, path)?.group(0)
    }

    fn log(&self) -> TableDefinition<'_, u64, &'static [u8]> {
        TableDefinition::new(&self.log)
    }

    fn state(&self) -> TableDefinition<'_, &'static str, &'static [u8]> {
        TableDefinition::new(&self.state)
    }

    /// Bytes of entries appended since the log was opened, counted as
    /// they are appended (what snapshots are weighed against).
    pub fn appended(&self) -> Arc<AtomicU64> {
        self.appended.clone()
    }

    fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let txn = self.file.db.begin_read().map_err(read_error)?;
        let table = txn.open_table(self.state()).map_err(read_error)?;
        let Some(v) = table.get(key).map_err(read_error)? else {
            return Ok(None);
        };
        postcard::from_bytes(v.value())
            .map(Some)
            .map_err(read_error)
    }

    fn put<T: serde::Serialize>(
        &self,
        key: &str,
        value: &T,
        durability: Durability,
    ) -> Result<(), StorageError> {
        let bytes = postcard::to_allocvec(value).map_err(write_error)?;
        let mut txn = self.file.db.begin_write().map_err(write_error)?;
        txn.set_durability(durability).map_err(write_error)?;
        txn.open_table(self.state())
            .map_err(write_error)?
            .insert(key, bytes.as_slice())
            .map_err(write_error)?;
        txn.commit().map_err(write_error)
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let txn = self.file.db.begin_read().map_err(read_error)?;
        let table = txn.open_table(self.log()).map_err(read_error)?;
        let Some((_, v)) = table.last().map_err(read_error)? else {
            return Ok(None);
        };
        let entry: Entry = postcard::from_bytes(v.value()).map_err(read_error)?;
        Ok(Some(entry.log_id))
    }
}

/// Makes queued appends durable, one sync for all of them, then reports
/// each flushed in order.
fn flusher(db: &Database, rx: &mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut done = vec![first];
        while let Ok(more) = rx.try_recv() {
            done.push(more);
        }
        // A durable commit makes every earlier non-durable one durable.
        let r = (|| -> Result<(), String> {
            let txn = db.begin_write().map_err(|e| e.to_string())?;
            txn.open_table(FLUSH)
                .map_err(|e| e.to_string())?
                .insert("flushed", &[][..])
                .map_err(|e| e.to_string())?;
            txn.commit().map_err(|e| e.to_string())
        })();
        for cb in done {
            cb.log_io_completed(r.clone().map_err(std::io::Error::other));
        }
    }
}

impl LogStore {
    /// The entries in `range`, in order, stopping before the entry that
    /// would take their stored size past `budget` bytes (one at least).
    fn read_entries(
        &self,
        range: (Bound<u64>, Bound<u64>),
        budget: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        let txn = self.file.db.begin_read().map_err(read_error)?;
        let table = txn.open_table(self.log()).map_err(read_error)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for row in table.range::<u64>(range).map_err(read_error)? {
            let (_, v) = row.map_err(read_error)?;
            bytes += v.value().len();
            if bytes > budget && !out.is_empty() {
                break;
            }
            out.push(postcard::from_bytes(v.value()).map_err(read_error)?);
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        self.read_entries(range, usize::MAX)
    }

    /// The entries from `start` up to `end` (exclusive), or fewer: only
    /// as many as fit in [`APPEND_BUDGET`] stored bytes (one at least).
    /// openraft sends what this returns as one AppendEntries.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let range = (Bound::Included(start), Bound::Excluded(end));
        self.read_entries(range, APPEND_BUDGET)
    }
}

/// The most stored bytes of entries one AppendEntries carries (unless a
/// single entry is larger). openraft waits for an AppendEntries only as
/// long as its heartbeat interval (100 ms) and then sends it again from
/// the follower's last matched entry. A follower a moment behind under
/// full load was sent its whole backlog at once, up to 300 entries
/// (openraft's `max_payload_entries`) of tens of KiB each: MiBs that did
/// not arrive within 100 ms on a busy machine, so every resend timed out
/// too, no append succeeded, and after 2 s the leader stepped down. In
/// pieces of this size each append lands in time and the backlog drains.
pub const APPEND_BUDGET: usize = 256 << 10;

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId> = self.get("purged")?;
        let last = self.last_entry_id()?.or(purged);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put("vote", vote, Durability::Immediate)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        // Read back as not committed, so that a leader that restarts is
        // not its old term's leader again (openraft restores a node whose
        // vote is committed for itself as leader at once). Its own log
        // may have lost entries it had already sent out, which the
        // followers hold durably; leading the same term again, it would
        // write other entries under those same log ids, and the
        // followers, taking them for the ones they hold, would keep
        // different rows (found by the power-cut test, about one run in
        // six on a loaded machine). A vote for itself not committed still
        // keeps it from voting for another in that term; to lead again it
        // stands in a new one. A follower's vote read back this way still
        // accepts its leader's appends (their committed vote is higher).
        Ok(self.get::<Vote<NodeId>>("vote")?.map(|mut vote| {
            vote.committed = false;
            vote
        }))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Durable with the next flush; losing it only makes a restart
        // learn the commit point from the leader again.
        self.put("committed", &committed, Durability::None)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get::<Option<LogId>>("committed")?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut txn = self.file.db.begin_write().map_err(write_error)?;
        txn.set_durability(Durability::None).map_err(write_error)?;
        {
            let mut table = txn.open_table(self.log()).map_err(write_error)?;
            let mut buf = Vec::new();
            for entry in entries {
                buf.clear();
                let bytes =
                    postcard::to_extend(&entry, std::mem::take(&mut buf)).map_err(write_error)?;
                table
                    .insert(entry.log_id.index, bytes.as_slice())
                    .map_err(write_error)?;
                self.appended
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                buf = bytes;
            }
        }
        txn.commit().map_err(write_error)?;
        self.file
            .flusher
            .send(callback)
            .map_err(|_| write_error("the log flusher stopped"))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut txn = self.file.db.begin_write().map_err(write_error)?;
        txn.set_durability(Durability::None).map_err(write_error)?;
        txn.open_table(self.log())
            .map_err(write_error)?
            .retain_in(log_id.index.., |_, _| false)
            .map_err(write_error)?;
        txn.commit().map_err(write_error)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = postcard::to_allocvec(&log_id).map_err(write_error)?;
        let mut txn = self.file.db.begin_write().map_err(write_error)?;
        txn.set_durability(Durability::None).map_err(write_error)?;
        txn.open_table(self.state())
            .map_err(write_error)?
            .insert("purged", bytes.as_slice())
            .map_err(write_error)?;
        txn.open_table(self.log())
            .map_err(write_error)?
            .retain_in(..=log_id.index, |_, _| false)
            .map_err(write_error)?;
        txn.commit().map_err(write_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stores entries `1..=sizes.len()` with redo payloads of `sizes`
    /// bytes, as `append` stores them (without the flush callback,
    /// which only openraft can make).
    fn store(log: &LogStore, sizes: &[usize]) {
        let txn = log.file.db.begin_write().unwrap();
        {
            let mut table = txn.open_table(log.log()).unwrap();
            for (i, size) in sizes.iter().enumerate() {
                let index = i as u64 + 1;
                let entry = Entry {
                    log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
                    payload: openraft::EntryPayload::Normal(super::super::Command {
                        redo: vec![7u8; *size].into(),
                        origin: None,
                    }),
                };
                let bytes = postcard::to_allocvec(&entry).unwrap();
                table.insert(index, bytes.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    /// A follower's backlog goes out in appends of at most
    /// [`APPEND_BUDGET`] bytes, each a prefix of what is asked, so that
    /// each lands within openraft's deadline; an entry larger than the
    /// budget still goes, alone.
    #[tokio::test]
    async fn a_backlog_is_read_in_pieces_of_the_append_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogStore::open(&dir.path().join("raft.redb")).unwrap();
        // 300 entries of 40 KiB (openraft's default batch of entries, each
        // a group commit of a busy leader), then one of 1 MiB.
        let mut sizes = vec![40 << 10; 300];
        sizes.push(1 << 20);
        store(&log, &sizes);
        let mut next = 1;
        let mut pieces = 0;
        while next <= 300 {
            let got = log.limited_get_log_entries(next, 302).await.unwrap();
            assert!(!got.is_empty());
            assert_eq!(got[0].log_id.index, next, "a prefix of the range");
            let bytes: usize = got
                .iter()
                .map(|e| postcard::to_allocvec(e).unwrap().len())
                .sum();
            if got.len() > 1 {
                assert!(
                    bytes <= APPEND_BUDGET,
                    "{} entries, {bytes} bytes",
                    got.len()
                );
            }
            next += got.len() as u64;
            pieces += 1;
        }
        assert_eq!(next, 301);
        assert!(
            pieces >= 300 * (40 << 10) / APPEND_BUDGET,
            "{pieces} pieces"
        );
        let last = log.limited_get_log_entries(301, 302).await.unwrap();
        assert_eq!(last.len(), 1, "an entry over the budget goes alone");
        // The unlimited read openraft uses elsewhere is unchanged.
        assert_eq!(log.try_get_log_entries(1..302).await.unwrap().len(), 301);
    }
}
