//! Snapshots as files.
//!
//! A snapshot is every replicated row as of one applied position, written
//! as a sequence of frames (`u32` little-endian length, then a redo
//! payload of whole rows, about [`CHUNK`] bytes each) to a file in the
//! node's `snapshots/` directory. It is built from one redb read
//! transaction, so the writer goes on meanwhile; it is sent by streaming
//! the file and installed by replaying its frames one at a time. Memory
//! stays about one frame however large the tables are; a snapshot held in
//! memory would be as large as the data.
//!
//! Only the newest snapshot is kept. A restart deletes what is left: the
//! tables are durable at their applied position, and openraft builds a
//! new snapshot when it needs one.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{StorageError, read_error, write_error};
use crate::storage::journal::{self, Redo};

/// Bytes of rows per frame.
pub const CHUNK: usize = 1 << 20;

/// The data of a snapshot: its file, open.
#[derive(Debug)]
pub struct SnapshotFile {
    /// Where it is.
    pub path: PathBuf,
    /// The open file (reads go by offset, so clones do not interfere).
    pub file: File,
    /// Its length in bytes.
    pub len: u64,
}

impl SnapshotFile {
    /// Opens the snapshot at `path`.
    pub fn open(path: &Path) -> std::io::Result<SnapshotFile> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(SnapshotFile {
            path: path.to_path_buf(),
            file,
            len,
        })
    }

    /// Replays every frame into `txn`.
    pub fn replay_into(&self, txn: &redb::WriteTransaction) -> Result<(), StorageError> {
        let mut at = 0u64;
        let mut body = Vec::new();
        while at < self.len {
            let mut len = [0u8; 4];
            self.file.read_exact_at(&mut len, at).map_err(read_error)?;
            let len = u32::from_le_bytes(len) as u64;
            if at + 4 + len > self.len {
                return Err(read_error(format!(
                    "snapshot {} is cut short at byte {at}",
                    self.path.display()
                )));
            }
            body.resize(len as usize, 0);
            self.file
                .read_exact_at(&mut body, at + 4)
                .map_err(read_error)?;
            journal::replay(txn, &body).map_err(write_error)?;
            at += 4 + len;
        }
        Ok(())
    }
}

/// A node's `snapshots/` directory.
#[derive(Debug)]
pub struct SnapshotDir {
    dir: PathBuf,
    seq: AtomicU64,
}

impl SnapshotDir {
    /// Opens (creating it) `dir`, deleting what an earlier run left there.
    pub fn open(dir: &Path) -> Result<SnapshotDir, StorageError> {
        std::fs::create_dir_all(dir).map_err(write_error)?;
        for e in std::fs::read_dir(dir).map_err(read_error)? {
            let path = e.map_err(read_error)?.path();
            let _ = std::fs::remove_file(&path);
        }
        Ok(SnapshotDir {
            dir: dir.to_path_buf(),
            seq: AtomicU64::new(0),
        })
    }

    /// A new file name in the directory, with `what` in it.
    pub fn fresh(&self, what: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{what}-{n}.snap"))
    }

    /// Writes every replicated row `txn` sees to a new file, synced.
    pub fn write(&self, txn: &redb::ReadTransaction) -> Result<SnapshotFile, StorageError> {
        let path = self.fresh("built");
        let file = File::create(&path).map_err(write_error)?;
        let mut out = std::io::BufWriter::with_capacity(CHUNK, &file);
        let mut frame = |rows: &[u8]| -> Result<(), crate::storage::StorageError> {
            let len = u32::try_from(rows.len()).expect("a frame is about CHUNK bytes");
            out.write_all(&len.to_le_bytes())
                .and_then(|()| out.write_all(rows))
                .map_err(|e| crate::storage::StorageError::WriteFailed(e.to_string()))
        };
        let mut redo = Redo::new();
        redo.start(true);
        journal::dump_chunked(txn, &mut redo, CHUNK, &mut frame).map_err(read_error)?;
        if redo.len() > 0 {
            frame(redo.payload()).map_err(write_error)?;
        }
        out.flush().map_err(write_error)?;
        drop(out);
        file.sync_all().map_err(write_error)?;
        SnapshotFile::open(&path).map_err(read_error)
    }
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase};

    use super::*;
    use crate::storage::tables::LOG;

    /// Tables several frames large come back whole, byte for byte.
    #[test]
    fn a_snapshot_of_many_frames_replays_into_the_same_tables() {
        let dir = tempfile::tempdir().unwrap();
        let source = Database::create(dir.path().join("a.redb")).unwrap();
        let txn = source.begin_write().unwrap();
        {
            let mut log = txn.open_table(LOG).unwrap();
            for o in 0..5_000u64 {
                let body = vec![(o % 251) as u8; 1_000];
                log.insert((1, (o % 3) as u32, o), body.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();

        let snaps = SnapshotDir::open(&dir.path().join("snapshots")).unwrap();
        let file = snaps.write(&source.begin_read().unwrap()).unwrap();
        assert!(file.len > 4 * CHUNK as u64, "{} bytes", file.len);

        let target = Database::create(dir.path().join("b.redb")).unwrap();
        let txn = target.begin_write().unwrap();
        file.replay_into(&txn).unwrap();
        txn.commit().unwrap();
        assert!(
            journal::dump_db(&source) == journal::dump_db(&target),
            "the replayed tables differ"
        );

        // A file cut short is an error, not a partial install.
        let cut = SnapshotFile {
            len: file.len - 10,
            ..SnapshotFile::open(&file.path).unwrap()
        };
        let other = Database::create(dir.path().join("c.redb")).unwrap();
        let txn = other.begin_write().unwrap();
        assert!(cut.replay_into(&txn).is_err());
    }
}
