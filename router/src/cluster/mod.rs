//! Replication: a Raft group of routers that hold the same data.
//!
//! The consensus engine is openraft; what it replicates is ours. A Raft
//! log entry's payload is a *redo*, the physical table changes of one
//! storage commit, in the same format the single-node write-ahead journal
//! uses (`storage::journal`). The leader decides everything a commit
//! holds (offsets, dedup hits, queue transitions, plugin decisions and
//! their kv writes) and every replica applies the same rows, so replicas
//! are equal by construction, not by re-running the decisions.
//!
//! - [`log_store`]: the Raft log and vote in their own redb file (one
//!   per node, shared by its groups), with group commit of log appends
//!   (one fsync for every append queued while the previous one synced).
//! - [`state`]: the state machine, the router's own tables in a redb file,
//!   applying redo entries; snapshots are those tables dumped as a redo.
//! - [`net`]: Raft RPCs over QUIC with mutual TLS under one cluster CA,
//!   one endpoint per node for all its groups ([`net::RaftHost`]), behind
//!   a seam ([`net::Faults`]) that tests use to drop, delay, duplicate or
//!   cut messages.
//! - [`node`]: one member of a group, started from a data directory.
//! - [`balance`]: spreads the leadership of a node's groups over the
//!   nodes.
//!
//! `docs/cluster.md` has the design and its measurements.

// openraft's storage traits return its `StorageError` (224 bytes); our
// helpers return the same type rather than converting at every call.
#![allow(clippy::result_large_err)]

pub mod balance;
pub mod log_store;
pub mod net;
pub mod node;
pub mod replicate;
pub mod serve;
pub mod snapshot;
pub mod state;
pub mod tls;

use serde::{Deserialize, Serialize};

pub use node::{ClusterNode, NodeConfig, Timing, WriteError};

/// A node's identity in the cluster: `--node-id`.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The types one Switchyard Raft group is built from.
    pub TypeConfig:
        D = Command,
        R = (),
        NodeId = NodeId,
        Node = openraft::BasicNode,
        SnapshotData = snapshot::SnapshotFile,
);

/// One replicated change: the redo of one storage commit, decided by the
/// leader.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Table changes in the journal's redo format (`storage::journal`).
    pub redo: bytes::Bytes,
    /// Which leader's storage writer made it, if one did: that writer
    /// applies it itself (its transaction is open, waiting for it).
    pub origin: Option<Origin>,
}

/// The storage commit a [`Command`] came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The leader's node id.
    pub node: NodeId,
    /// Which term of serving on that node (a new one each time it becomes
    /// leader and opens its storage).
    pub incarnation: u64,
    /// The commit's number within the incarnation.
    pub seq: u64,
}

/// The redo of appending record `offset` (its body `body`) to partition
/// 0 of topic `topic`: a replicated write without a router on top, for
/// benchmarks and tests of the Raft layer.
#[doc(hidden)]
pub fn record_redo(topic: u32, offset: u64, body: &[u8]) -> Vec<u8> {
    use crate::storage::tables::{LOG, PARTITIONS};
    let mut redo = crate::storage::journal::Redo::new();
    redo.start(true);
    redo.put(LOG, &(topic, 0, offset), &body);
    redo.put(PARTITIONS, &(topic, 0), &(0, offset + 1, 0, 0));
    redo.payload().to_vec()
}

/// A Raft log position.
pub type LogId = openraft::LogId<NodeId>;
/// The Raft handle of one group.
pub type Raft = openraft::Raft<TypeConfig>;
type Entry = openraft::Entry<TypeConfig>;
type StorageError = openraft::StorageError<NodeId>;

#[cfg(test)]
mod groups_tests;
#[cfg(test)]
mod serve_tests;
#[cfg(test)]
mod tests;

fn storage_error(verb: openraft::ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    openraft::StorageIOError::new(
        openraft::ErrorSubject::Store,
        verb,
        openraft::AnyError::error(e.to_string()),
    )
    .into()
}

fn read_error(e: impl std::fmt::Display) -> StorageError {
    storage_error(openraft::ErrorVerb::Read, e)
}

fn write_error(e: impl std::fmt::Display) -> StorageError {
    storage_error(openraft::ErrorVerb::Write, e)
}

/// Opens (or creates) the redb file at `path` on `disk`: through the
/// disk's own file when it has one (a simulated disk in tests), else by
/// redb itself.
fn create_db(
    disk: &dyn crate::storage::disk::Disk,
    path: &std::path::Path,
) -> Result<redb::Database, StorageError> {
    match disk.redb_file(path).map_err(write_error)? {
        Some(file) => redb::Database::builder()
            .create_with_backend(crate::storage::disk::DiskBackend(file))
            .map_err(write_error),
        None => redb::Database::create(path).map_err(write_error),
    }
}
