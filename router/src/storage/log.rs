//! Reading partition logs.
//!
//! Reads run in redb read transactions (MVCC snapshots), so they never block
//! the writer and always see whole commits. The tail of a log is almost always
//! in redb's page cache, so reads run inline on the async task: a batch read
//! is a few microseconds of memcpy, cheaper than a hop to a blocking thread.

use redb::ReadableDatabase;

use super::tables::LOG;
use super::{Storage, StorageError};

/// Limits for one read.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimit {
    /// Most records to return.
    pub max_records: usize,
    /// Stop after the record that takes the total past this many bytes.
    pub max_bytes: usize,
}

impl Storage {
    /// Calls `f(offset, timestamp_ms, record)` for records of one partition
    /// from `from` onwards, within `limit`. Returns the offset after the last
    /// record visited (or `from` if none).
    pub fn scan(
        &self,
        topic_id: u32,
        partition: u32,
        from: u64,
        limit: ReadLimit,
        mut f: impl FnMut(u64, u64, &[u8]),
    ) -> Result<u64, StorageError> {
        let txn = self.db().begin_read()?;
        let table = txn.open_table(LOG)?;
        let mut next = from;
        let mut bytes = 0usize;
        for (n, entry) in table
            .range((topic_id, partition, from)..=(topic_id, partition, u64::MAX))?
            .enumerate()
        {
            if n >= limit.max_records || bytes >= limit.max_bytes {
                break;
            }
            let (k, v) = entry?;
            let offset = k.value().2;
            let v = v.value();
            let (ts, rec) = split_entry(v)?;
            bytes += rec.len();
            f(offset, ts, rec);
            next = offset + 1;
        }
        Ok(next)
    }

    /// Calls `f(index, timestamp_ms, record)` for each `(partition, offset)`
    /// of `keys` still in the log, in one read transaction.
    pub fn get_many(
        &self,
        topic_id: u32,
        keys: &[(u32, u64)],
        mut f: impl FnMut(usize, u64, &[u8]),
    ) -> Result<(), StorageError> {
        let txn = self.db().begin_read()?;
        let table = txn.open_table(LOG)?;
        for (i, &(p, o)) in keys.iter().enumerate() {
            if let Some(v) = table.get((topic_id, p, o))? {
                let (ts, rec) = split_entry(v.value())?;
                f(i, ts, rec);
            }
        }
        Ok(())
    }

    /// The first offset in `[start, end)` whose timestamp is at or after
    /// `ts_ms`, or `end` if none. Timestamps are append times, made
    /// non-decreasing per partition by the writer, so this is a binary search.
    pub fn offset_for_time(
        &self,
        topic_id: u32,
        partition: u32,
        start: u64,
        end: u64,
        ts_ms: u64,
    ) -> Result<u64, StorageError> {
        let txn = self.db().begin_read()?;
        let table = txn.open_table(LOG)?;
        // Retention may have moved the start since `start` was read; find
        // the first record that still exists.
        let lo_entry = table
            .range((topic_id, partition, start)..(topic_id, partition, end))?
            .next();
        let Some(first) = lo_entry else {
            return Ok(end);
        };
        let (mut lo, mut hi) = (first?.0.value().2, end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let t = match table.get((topic_id, partition, mid))? {
                Some(v) => split_entry(v.value())?.0,
                None => 0, // deleted meanwhile: older than anything retained
            };
            if t < ts_ms {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }
}

fn split_entry(v: &[u8]) -> Result<(u64, &[u8]), StorageError> {
    if v.len() < 8 {
        return Err(StorageError::Corrupt(
            "log entry shorter than its timestamp".into(),
        ));
    }
    let ts = u64::from_be_bytes(v[..8].try_into().expect("checked length"));
    Ok((ts, &v[8..]))
}
