//! The replicated state machine: the router's tables in a redb file.
//!
//! Applying an entry replays its redo into the tables; the last applied
//! log id and membership are written in the same transaction, so the two
//! never disagree. Applied commits are not synced one by one: the Raft log
//! holds every entry until a snapshot covers it, and a snapshot is only
//! built after a durable commit of the tables, so after a crash the tables
//! are at some applied position and openraft replays the log after it
//! (replaying a redo is idempotent: puts and deletes of whole rows).
//!
//! A snapshot is every replicated row, read from one read transaction (so
//! building it does not stop the appliers) into a file of redo frames
//! (`snapshot`). Installing one clears the tables and replays it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StoredMembership,
};
use redb::{Database, Durability, ReadableDatabase};

use super::snapshot::{SnapshotDir, SnapshotFile};
use super::{Entry, LogId, NodeId, StorageError, TypeConfig, read_error, write_error};
use crate::storage::journal::{self, Redo};

use crate::storage::tables::RAFT_APPLIED as APPLIED;

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

/// Whether `table` holds cluster-wide rows, which group 0 keeps for every
/// group: the principals and the topic assignment.
fn cluster_wide(table: &str) -> bool {
    use crate::storage::tables::{PRINCIPALS, TOPIC_GROUPS};
    use redb::TableHandle;
    table == PRINCIPALS.name() || table == TOPIC_GROUPS.name()
}
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// The last snapshot built or installed: what it covers and its file.
type LastSnapshot = (Meta, PathBuf);

/// The state machine of one node. Cheap to clone: clones share the file
/// and the last snapshot.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    handoff: Arc<super::replicate::Handoff>,
    snapshot: Arc<std::sync::Mutex<Option<LastSnapshot>>>,
    snapshots: Arc<SnapshotDir>,
    /// Counts applied changes to the cluster-wide rows (principals and
    /// topic assignment), for the routers of the node's groups, which
    /// authenticate against group 0's principals and create only the
    /// topics group 0 assigned them. Looked for only while one listens.
    cluster_rows: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StateMachine {
    /// Opens (or creates) the tables at `path`.
    pub fn open(path: &Path) -> Result<StateMachine, StorageError> {
        Self::open_on(&crate::storage::disk::OsDisk, path)
    }

    /// As [`StateMachine::open`], with the file on `disk`.
    pub fn open_on(
        disk: &dyn crate::storage::disk::Disk,
        path: &Path,
    ) -> Result<StateMachine, StorageError> {
        let db = Arc::new(super::create_db(disk, path)?);
        let snapshots = path.parent().unwrap_or(Path::new(".")).join("snapshots");
        let snapshots = Arc::new(SnapshotDir::open(&snapshots)?);
        let txn = db.begin_write().map_err(write_error)?;
        txn.open_table(APPLIED).map_err(write_error)?;
        txn.commit().map_err(write_error)?;
        Ok(StateMachine {
            db,
            handoff: Arc::default(),
            snapshot: Arc::default(),
            snapshots,
            cluster_rows: Arc::new(tokio::sync::watch::channel(0).0),
        })
    }

    /// Changes whenever an applied entry (or an installed snapshot)
    /// changes the principals or the topic assignment, once it is
    /// committed.
    pub fn cluster_rows_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.cluster_rows.subscribe()
    }

    /// Whether `redo`, committed by the leader's writer, changes the
    /// cluster-wide rows, if anyone listens.
    fn changes_cluster_rows(&self, redo: &[u8]) -> bool {
        self.cluster_rows.receiver_count() > 0 && journal::touches(redo, cluster_wide)
    }

    /// Replays `redo` in `txn`, noting in `cluster_rows` whether it
    /// changed them.
    fn replay(
        txn: &redb::WriteTransaction,
        log_id: LogId,
        redo: &[u8],
        cluster_rows: &mut bool,
    ) -> Result<(), StorageError> {
        journal::replay_seeing(txn, redo, |table| *cluster_rows |= cluster_wide(table)).map_err(
            |e| openraft::StorageIOError::apply(log_id, openraft::AnyError::new(&e)).into(),
        )
    }

    fn cluster_rows_changed_now(&self) {
        self.cluster_rows.send_modify(|n| *n += 1);
    }

    /// The size of the snapshot this node holds (0: none yet).
    pub fn snapshot_len(&self) -> u64 {
        self.snapshot
            .lock()
            .expect("snapshot lock")
            .as_ref()
            .and_then(|(_, path)| std::fs::metadata(path).ok())
            .map_or(0, |m| m.len())
    }

    /// Where this node's snapshots are written and received.
    pub fn snapshots(&self) -> &Arc<SnapshotDir> {
        &self.snapshots
    }

    /// Shared with the storage writer while this node serves as leader.
    pub fn handoff(&self) -> &Arc<super::replicate::Handoff> {
        &self.handoff
    }

    /// The database the entries are applied to, for reading.
    pub fn database(&self) -> &Arc<Database> {
        &self.db
    }

    /// Every replicated row, as a redo: equal on two replicas that applied
    /// the same entries.
    pub fn dump(&self) -> Result<Bytes, StorageError> {
        dump_in(&self.db.begin_read().map_err(read_error)?)
    }

    /// The last applied position and membership.
    pub fn applied(&self) -> Result<(Option<LogId>, Membership), StorageError> {
        applied_in(&self.db.begin_read().map_err(read_error)?)
    }

    /// Makes every applied entry durable in the tables.
    pub fn checkpoint(&self) -> Result<(), StorageError> {
        // A durable commit makes the earlier non-durable ones durable;
        // it writes a row so that it is never an empty commit.
        let txn = self.db.begin_write().map_err(write_error)?;
        txn.open_table(APPLIED)
            .map_err(write_error)?
            .insert("checkpoint", &[][..])
            .map_err(write_error)?;
        txn.commit().map_err(write_error)
    }
}

/// Every replicated row `txn` sees, as one redo.
fn dump_in(txn: &redb::ReadTransaction) -> Result<Bytes, StorageError> {
    let mut redo = Redo::new();
    journal::dump(txn, &mut redo).map_err(read_error)?;
    Ok(redo.into_payload())
}

fn applied_in(txn: &redb::ReadTransaction) -> Result<(Option<LogId>, Membership), StorageError> {
    let table = txn.open_table(APPLIED).map_err(read_error)?;
    let get = |key: &str| -> Result<Option<Vec<u8>>, StorageError> {
        Ok(table
            .get(key)
            .map_err(read_error)?
            .map(|v| v.value().to_vec()))
    };
    let applied = match get("applied")? {
        Some(b) => postcard::from_bytes(&b).map_err(read_error)?,
        None => None,
    };
    let membership = match get("membership")? {
        Some(b) => postcard::from_bytes(&b).map_err(read_error)?,
        None => Membership::default(),
    };
    Ok((applied, membership))
}

pub(crate) fn set_applied(
    txn: &redb::WriteTransaction,
    applied: Option<LogId>,
    membership: &Membership,
) -> Result<(), StorageError> {
    let mut table = txn.open_table(APPLIED).map_err(write_error)?;
    let a = postcard::to_allocvec(&applied).map_err(write_error)?;
    let m = postcard::to_allocvec(membership).map_err(write_error)?;
    table.insert("applied", a.as_slice()).map_err(write_error)?;
    table
        .insert("membership", m.as_slice())
        .map_err(write_error)?;
    Ok(())
}

impl StateMachine {
    /// The transaction entries are replayed into, begun on first use.
    fn direct<'a>(
        &self,
        direct: &'a mut Option<(redb::WriteTransaction, LogId)>,
    ) -> Result<&'a redb::WriteTransaction, StorageError> {
        if direct.is_none() {
            let mut txn = self.db.begin_write().map_err(write_error)?;
            txn.set_durability(Durability::None).map_err(write_error)?;
            *direct = Some((txn, LogId::default()));
        }
        Ok(&direct.as_ref().expect("begun above").0)
    }
}

impl StateMachine {
    /// Makes `file` (covering `meta`) the snapshot this node serves, and
    /// deletes the one it replaces.
    fn keep_snapshot(&self, meta: &Meta, file: &SnapshotFile) {
        // Under the lock: `get_current_snapshot` opens the file it names
        // under it too, so a file is never deleted between the two.
        let mut current = self.snapshot.lock().expect("snapshot lock");
        if let Some((_, old)) = current.replace((meta.clone(), file.path.clone()))
            && old != file.path
        {
            let _ = std::fs::remove_file(old);
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // The log before this snapshot may be purged once it exists, so a
        // crash must not take the tables back past its position: the read
        // transaction first, then a durable commit, which makes every
        // commit before it durable, those this snapshot sees included.
        let txn = self.db.begin_read().map_err(read_error)?;
        self.checkpoint()?;
        let (applied, membership) = applied_in(&txn)?;
        let this = self.clone();
        let file = tokio::task::spawn_blocking(move || this.snapshots.write(&txn))
            .await
            .map_err(read_error)??;
        let meta = Meta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id: format!(
                "{}-{}",
                applied.map_or(0, |l| l.index),
                crate::storage::now_ms()
            ),
        };
        self.keep_snapshot(&meta, &file);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        self.applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let (_, mut membership) = self.applied()?;
        if let Some(m) = self
            .handoff
            .membership
            .lock()
            .expect("handoff lock")
            .clone()
        {
            membership = m;
        }
        let mut out = Vec::new();
        // Entries replayed here, not yet committed: (transaction, last).
        let mut direct: Option<(redb::WriteTransaction, LogId)> = None;
        // Whether those change the cluster-wide rows.
        let mut cluster_rows = false;
        for entry in entries {
            out.push(());
            let log_id = entry.log_id;
            if self.handoff.serving() {
                match entry.payload {
                    EntryPayload::Blank => continue,
                    EntryPayload::Membership(m) => {
                        membership = Membership::new(Some(log_id), m);
                        *self.handoff.membership.lock().expect("handoff lock") =
                            Some(membership.clone());
                        continue;
                    }
                    EntryPayload::Normal(cmd) => match self.handoff.take(cmd.origin) {
                        Some(expected) => {
                            // The writer holds these rows in its open
                            // transaction: let it commit them here.
                            let _ = expected
                                .events
                                .send(super::replicate::Event::Apply(log_id, membership.clone()));
                            if expected.done.recv() != Ok(true) {
                                return Err(write_error(format!(
                                    "the leader's commit of entry {log_id} failed"
                                )));
                            }
                            if self.changes_cluster_rows(&cmd.redo) {
                                self.cluster_rows_changed_now();
                            }
                            continue;
                        }
                        None => {
                            // Another leader's entry: this node's writer is
                            // stopping; replay once it has let go.
                            self.handoff.until_not_serving().await;
                            let txn = self.direct(&mut direct)?;
                            Self::replay(txn, log_id, &cmd.redo, &mut cluster_rows)?;
                        }
                    },
                }
            } else {
                let txn = self.direct(&mut direct)?;
                match entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(cmd) => {
                        Self::replay(txn, log_id, &cmd.redo, &mut cluster_rows)?;
                    }
                    EntryPayload::Membership(m) => {
                        membership = Membership::new(Some(log_id), m);
                    }
                }
            }
            if let Some((_, last)) = direct.as_mut() {
                *last = log_id;
            }
        }
        if let Some((txn, last)) = direct {
            set_applied(&txn, Some(last), &membership)?;
            txn.commit().map_err(write_error)?;
            *self.handoff.membership.lock().expect("handoff lock") = None;
            if cluster_rows && self.cluster_rows.receiver_count() > 0 {
                self.cluster_rows_changed_now();
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        // Snapshots arrive whole (`net`), never through this.
        let path = self.snapshots.fresh("unused");
        std::fs::File::create(&path).map_err(write_error)?;
        Ok(Box::new(SnapshotFile::open(&path).map_err(read_error)?))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError> {
        let db = self.db.clone();
        let (m, snap) = (meta.clone(), snapshot);
        let snap = tokio::task::spawn_blocking(move || -> Result<SnapshotFile, StorageError> {
            let txn = db.begin_write().map_err(write_error)?;
            journal::clear(&txn).map_err(write_error)?;
            snap.replay_into(&txn)?;
            set_applied(&txn, m.last_log_id, &m.last_membership)?;
            txn.commit().map_err(write_error)?;
            Ok(*snap)
        })
        .await
        .map_err(write_error)??;
        self.keep_snapshot(meta, &snap);
        self.cluster_rows_changed_now();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self.snapshot.lock().expect("snapshot lock");
        let Some((meta, path)) = current.as_ref() else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(SnapshotFile::open(path).map_err(read_error)?),
        }))
    }
}
