use crate::protocol::{ErrorCode, WireError};

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// redb reported an error (I/O, a full disk, corruption).
    #[error("storage failure: {0}")]
    Db(#[from] redb::Error),
    /// The topic does not exist (or was deleted while the request waited).
    #[error("unknown topic '{0}'")]
    UnknownTopic(String),
    /// A topic with this name already exists.
    #[error("topic '{0}' already exists")]
    TopicExists(String),
    /// The writer has stopped: the router is shutting down.
    #[error("storage is shut down")]
    ShutDown,
    /// Metadata on disk could not be parsed.
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    /// The disk is full, or below the configured free-space reserve:
    /// nothing in the request was stored.
    #[error("storage full, nothing in this request was stored: {0}")]
    StorageFull(String),
    /// A sync of the journal or the database failed: the data it was to
    /// make durable may be lost, so the storage acknowledges nothing more
    /// and the router stops (a restart recovers from what was synced).
    #[error("storage failed, nothing in this request was stored: {0}")]
    Failed(String),
    /// A data file is damaged in a way that would lose acknowledged data
    /// if the router went on; the message names the file and what to do.
    #[error("damaged data: {0}")]
    Damaged(String),
    /// Another process (a router) holds the database open.
    #[error(
        "{0} is in use by another process (another `switchyard serve` on this data directory?): stop it, or give this router its own --data"
    )]
    InUse(std::path::PathBuf),
    /// A group commit failed (for example the disk is full): the whole
    /// batch was rolled back and nothing in it was acknowledged.
    #[error("write failed, nothing in this request was stored: {0}")]
    WriteFailed(String),
    /// A cluster node that is no longer (or not yet) the leader could not
    /// replicate the commit: nothing in it was acknowledged, and a retry
    /// (at the leader) with the same message ids is safe.
    #[error("not the leader, nothing in this request was acknowledged: {0}")]
    NotLeader(String),
}

impl StorageError {
    /// The wire error a client sees for this failure.
    pub fn to_wire(&self) -> WireError {
        let code = match self {
            StorageError::UnknownTopic(_) => ErrorCode::UnknownTopic,
            StorageError::TopicExists(_) => ErrorCode::TopicExists,
            StorageError::ShutDown | StorageError::NotLeader(_) => ErrorCode::ShuttingDown,
            StorageError::StorageFull(_) => ErrorCode::StorageFull,
            StorageError::Failed(_) => ErrorCode::Storage,
            StorageError::Db(_)
            | StorageError::Corrupt(_)
            | StorageError::Damaged(_)
            | StorageError::WriteFailed(_)
            | StorageError::InUse(_) => ErrorCode::Storage,
        };
        let hint = match self {
            StorageError::Db(_) => {
                " (nothing in this request was acknowledged; check the router's disk and log, then retry)"
            }
            // redb refuses every write after an I/O error until the
            // database is reopened: retrying alone will not help.
            StorageError::WriteFailed(m) if m.contains("Previous I/O error") => {
                " (writes stay refused after a storage I/O error: free disk space, then restart the router; reads keep working)"
            }
            StorageError::WriteFailed(_) => " (check the router's disk and log, then retry)",
            StorageError::UnknownTopic(_) => " (create it with `switchyard topic create`)",
            _ => "",
        };
        WireError::new(code, format!("{self}{hint}"))
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
