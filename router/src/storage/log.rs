//! Reading partition logs.
//!
//! Reads run in redb read transactions (MVCC snapshots), so they never block
//! the writer and always see whole commits. The tail of a log is almost always
//! in redb's page cache, so reads run inline on the async task: a batch read
//! is a few microseconds of memcpy, cheaper than a hop to a blocking thread.

use redb::ReadableDatabase;

use super::tables::{INBOX, KEY_INDEX, LOG};
use super::{FeedDef, Storage, StorageError, key_hash};

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
        guarded("the log", || {
            self.scan_inner(topic_id, partition, from, limit, &mut f)
        })
    }

    fn scan_inner(
        &self,
        topic_id: u32,
        partition: u32,
        from: u64,
        limit: ReadLimit,
        f: &mut impl FnMut(u64, u64, &[u8]),
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
            let key = k.value();
            let offset = key.2;
            // Offsets of a partition are contiguous from its start. The
            // first may lie past `from` only if retention moved the start
            // there (this snapshot's partition row says so).
            let gap = if n > 0 {
                offset != next
            } else {
                offset != from && {
                    let row = txn.open_table(super::tables::PARTITIONS)?;
                    let start = row.get((topic_id, partition))?.map_or(0, |r| r.value().0);
                    offset != start.max(from)
                }
            };
            let entry = if gap {
                Err(StorageError::Damaged(format!(
                    "the log of topic id {topic_id} partition {partition} has no entry at \
                     offset {next} but has one at {offset}: the file may be damaged. Stop \
                     the router and run `switchyard check --data DIR`"
                )))
            } else {
                split_entry(key, v.value())
            };
            let (ts, rec) = match entry {
                Ok(e) => e,
                // Deliver what came before; the next read starts here and
                // reports it.
                Err(_) if n > 0 => break,
                Err(e) => return Err(e),
            };
            bytes += rec.len();
            f(offset, ts, rec);
            next = offset + 1;
        }
        Ok(next)
    }

    /// Calls `f(index, timestamp_ms, record)` for each `(partition, offset)`
    /// of `keys` still in the log, in the order of `keys`, in one read
    /// transaction. A run of consecutive offsets of one partition (the usual
    /// case: queue groups admit partitions in runs) is read with one range
    /// scan instead of a B-tree descent per key.
    pub fn get_many(
        &self,
        topic_id: u32,
        keys: &[(u32, u64)],
        mut f: impl FnMut(usize, u64, &[u8]),
    ) -> Result<(), StorageError> {
        guarded("the log", || self.get_many_inner(topic_id, keys, &mut f))
    }

    fn get_many_inner(
        &self,
        topic_id: u32,
        keys: &[(u32, u64)],
        f: &mut impl FnMut(usize, u64, &[u8]),
    ) -> Result<(), StorageError> {
        let txn = self.db().begin_read()?;
        let table = txn.open_table(LOG)?;
        let mut i = 0;
        while i < keys.len() {
            let (p, first) = keys[i];
            let mut end = i + 1;
            while end < keys.len() && keys[end] == (p, first + (end - i) as u64) {
                end += 1;
            }
            if end - i == 1 {
                if let Some(v) = table.get((topic_id, p, first))? {
                    let (ts, rec) = split_entry((topic_id, p, first), v.value())?;
                    f(i, ts, rec);
                }
            } else {
                let last = first + (end - i - 1) as u64;
                for e in table.range((topic_id, p, first)..=(topic_id, p, last))? {
                    let (k, v) = e?;
                    let key = k.value();
                    let (ts, rec) = split_entry(key, v.value())?;
                    f(i + (key.2 - first) as usize, ts, rec);
                }
            }
            i = end;
        }
        Ok(())
    }

    /// Reads up to `max` records of a feed, from `cursors[p]` in each
    /// partition: the references in its inbox (records fanned out on write)
    /// merged by offset with the index of each followed key (records fanned
    /// out on read). Both are written in the record's own commit, so one
    /// read snapshot sees every record of a followed key exactly once
    /// whichever way it fanned out. Calls `f(partition, offset, ts, record)`
    /// in offset order per partition and advances `cursors`.
    pub fn read_feed(
        &self,
        topic_id: u32,
        feed: &FeedDef,
        cursors: &mut [u64],
        max: usize,
        mut f: impl FnMut(u32, u64, u64, &[u8]),
    ) -> Result<usize, StorageError> {
        guarded("a feed", || {
            self.read_feed_inner(topic_id, feed, cursors, max, &mut f)
        })
    }

    fn read_feed_inner(
        &self,
        topic_id: u32,
        feed: &FeedDef,
        cursors: &mut [u64],
        max: usize,
        f: &mut impl FnMut(u32, u64, u64, &[u8]),
    ) -> Result<usize, StorageError> {
        let txn = self.db().begin_read()?;
        let inbox = txn.open_table(INBOX)?;
        let index = txn.open_table(KEY_INDEX)?;
        let log = txn.open_table(LOG)?;
        let n = cursors.len() as u64;
        let keys: Vec<(&[u8], u64, u64)> = feed
            .keys
            .iter()
            .map(|(k, start)| (k.as_slice(), key_hash(k), *start))
            .collect();
        let starts: std::collections::HashMap<&[u8], u64> =
            keys.iter().map(|(k, _, start)| (*k, *start)).collect();
        let mut total = 0;
        let mut offsets = Vec::new();
        for p in 0..n as u32 {
            'partition: while total < max {
                let want = max - total;
                let from = cursors[p as usize];
                offsets.clear();
                // Read up to `want` entries of each source; entries past the
                // last one of a source that had more are not yet safe to
                // order, so stop there (the horizon).
                let mut horizon = u64::MAX;
                let mut take = |it: &mut dyn Iterator<Item = Result<u64, StorageError>>,
                                offsets: &mut Vec<u64>|
                 -> Result<(), StorageError> {
                    let mut last = None;
                    let mut count = 0;
                    for o in it {
                        let o = o?;
                        offsets.push(o);
                        last = Some(o);
                        count += 1;
                        if count == want {
                            break;
                        }
                    }
                    if count == want {
                        horizon = horizon.min(last.unwrap_or(u64::MAX));
                    }
                    Ok(())
                };
                let mut it = inbox
                    .range((topic_id, feed.id, p, from)..=(topic_id, feed.id, p, u64::MAX))?
                    .map(|e| e.map(|(k, _)| k.value().3).map_err(StorageError::from));
                take(&mut it, &mut offsets)?;
                for &(_, h, start) in keys.iter().filter(|k| k.1 % n == p as u64) {
                    let mut it = index
                        .range((topic_id, h, p, from.max(start))..=(topic_id, h, p, u64::MAX))?
                        .map(|e| e.map(|(k, _)| k.value().3).map_err(StorageError::from));
                    take(&mut it, &mut offsets)?;
                }
                if offsets.is_empty() {
                    break;
                }
                offsets.sort_unstable();
                offsets.dedup();
                for &o in offsets.iter().filter(|o| **o <= horizon) {
                    if total == max {
                        break 'partition;
                    }
                    cursors[p as usize] = o + 1;
                    let Some(v) = log.get((topic_id, p, o))? else {
                        continue; // removed by retention
                    };
                    let (ts, rec) = split_entry((topic_id, p, o), v.value())?;
                    // Keys are indexed by hash: skip a colliding key, a key
                    // no longer followed, and a key's records from before
                    // the feed followed it.
                    let followed = crate::protocol::key_of(rec)
                        .and_then(|k| starts.get(k))
                        .is_some_and(|start| o >= *start);
                    if followed {
                        f(p, o, ts, rec);
                        total += 1;
                    }
                }
                if horizon == u64::MAX {
                    break; // every source was read to its end
                }
            }
        }
        Ok(total)
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
                Some(v) => entry_meta(v.value()).0,
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

/// Set in a log value's first word: the word packs a checksum with the
/// timestamp. Entries written before checksums existed lack the bit and
/// are read unchecked.
const CHECKED: u64 = 1 << 63;
/// Bits of the append timestamp (milliseconds since 1970, enough until
/// the year 2109).
const TS_BITS: u32 = 42;
const TS_MASK: u64 = (1 << TS_BITS) - 1;
/// Bits of the checksum: the low 21 bits of a CRC-32.
const CRC_MASK: u64 = (1 << 21) - 1;
/// Bytes a log value adds to its record: the timestamp word.
pub(crate) const ENTRY_OVERHEAD: usize = 8;

/// The checksum of one log entry: a CRC-32 of the record, seeded from the
/// key and the timestamp, so a record that is damaged, or a value found
/// under another key or with another timestamp, fails the check. Packed
/// beside the timestamp so that it costs no bytes: 4 more bytes per
/// 100-byte record cost 3% of single-producer publish throughput.
fn entry_crc(key: (u32, u32, u64), ts: u64, rec: &[u8]) -> u64 {
    let seed = key.0.rotate_left(7)
        ^ key.1.rotate_left(19)
        ^ key.2 as u32
        ^ (key.2 >> 32) as u32
        ^ (ts as u32).rotate_left(11)
        ^ (ts >> 32) as u32;
    let mut h = crc32fast::Hasher::new_with_initial(seed);
    h.update(rec);
    h.finalize() as u64 & CRC_MASK
}

/// Writes the log value of `rec` at `key`, appended at `ts`, into `dst`
/// (exactly `ENTRY_OVERHEAD + rec.len()` bytes): one big-endian word
/// `CHECKED | checksum << 42 | ts`, then the record as the producer
/// encoded it.
pub(crate) fn put_entry(dst: &mut [u8], key: (u32, u32, u64), ts: u64, rec: &[u8]) {
    let word = if ts <= TS_MASK {
        CHECKED | entry_crc(key, ts, rec) << TS_BITS | ts
    } else {
        ts // does not fit beside a checksum: stored unchecked
    };
    dst[..8].copy_from_slice(&word.to_be_bytes());
    dst[8..].copy_from_slice(rec);
}

/// The timestamp of a log value's first word.
fn word_ts(word: u64) -> u64 {
    if word & CHECKED != 0 {
        word & TS_MASK
    } else {
        word
    }
}

/// The timestamp and record length of a log value, unchecked: for
/// retention, which only deletes.
pub(crate) fn entry_meta(v: &[u8]) -> (u64, usize) {
    let Some(raw) = v.get(..8) else {
        return (0, 0);
    };
    let word = u64::from_be_bytes(raw.try_into().expect("8 bytes"));
    (word_ts(word), v.len() - 8)
}

/// The timestamp and record of the log value stored at `key`, verified
/// against its checksum. A damaged entry is an error naming where it is,
/// never a record delivered with the wrong bytes.
pub(crate) fn split_entry(key: (u32, u32, u64), v: &[u8]) -> Result<(u64, &[u8]), StorageError> {
    let damaged = |what: &str| {
        StorageError::Damaged(format!(
            "log entry of topic id {} partition {} offset {}: {what}. Stop the router and \
             run `switchyard check --data DIR`",
            key.0, key.1, key.2
        ))
    };
    let Some(raw) = v.get(..8) else {
        return Err(damaged("shorter than its timestamp"));
    };
    let word = u64::from_be_bytes(raw.try_into().expect("8 bytes"));
    let ts = word_ts(word);
    let rec = &v[8..];
    if word & CHECKED != 0 && entry_crc(key, ts, rec) != (word >> TS_BITS) & CRC_MASK {
        return Err(damaged("its bytes do not match their checksum"));
    }
    Ok((ts, rec))
}

/// Runs `f`, returning the message of a panic inside it as an `Err`.
pub(crate) fn guarded_panic<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    })
}

/// Runs a read, turning a panic inside it (redb meets a damaged page) into
/// an error for this read alone: the subscription that asked gets an error
/// frame and the log says where, instead of a task dying silently and the
/// subscriber waiting forever.
pub(crate) fn guarded<R>(
    what: &str,
    read: impl FnOnce() -> Result<R, StorageError>,
) -> Result<R, StorageError> {
    match guarded_panic(read) {
        Ok(r) => r,
        Err(msg) => {
            tracing::error!(read = what, panic = %msg, "a read of the database failed: its file may be damaged");
            Err(StorageError::Damaged(format!(
                "reading {what} failed inside the database ({msg}): the file may be damaged. \
                 Stop the router and run `switchyard check --data DIR`"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use redb::{ReadableDatabase, ReadableTable};

    use crate::protocol::Record;
    use crate::storage::tables::{INBOX, KEY_INDEX};
    use crate::storage::{fanned_out, with_test_storage};

    /// Retention removes the fan-out references (key index and inbox
    /// entries) to the records it deletes, and keeps those to records it
    /// keeps.
    #[test]
    fn retention_prunes_fan_out_references() {
        with_test_storage(|storage| async move {
            // Keep about 20 records of 100 B per partition.
            let topic = storage.create_topic("t", 2, 0, 2_000).await.unwrap();
            let keys: Vec<Vec<u8>> = (0..10).map(|k| format!("k{k}").into_bytes()).collect();
            storage.follow(&topic, "f", keys.clone()).await.unwrap();
            // Two rounds: the second checks a finished sweep does not stop
            // later ones.
            for round in 0..2u64 {
                let records = fanned_out(topic.meta.id, &keys, 400, |_| None);
                let t = storage.append_many(records, Vec::new()).await.unwrap();
                t.await.unwrap().unwrap();
                assert!(storage.enforce_retention().await.unwrap() > 300);
                let starts: Vec<u64> = topic.partitions().iter().map(|p| p.start).collect();
                assert!(starts.iter().all(|&s| s > 150 + 200 * round), "{starts:?}");

                let txn = storage.db().begin_read().unwrap();
                let index = txn.open_table(KEY_INDEX).unwrap();
                let inbox = txn.open_table(INBOX).unwrap();
                let index_refs = index.iter().unwrap().map(|e| {
                    let (_, _, p, o) = e.unwrap().0.value();
                    ("index", p, o)
                });
                let inbox_refs = inbox.iter().unwrap().map(|e| {
                    let (_, _, p, o) = e.unwrap().0.value();
                    ("inbox", p, o)
                });
                let mut kept = 0;
                for (what, p, o) in index_refs.chain(inbox_refs) {
                    assert!(
                        o >= starts[p as usize],
                        "{what} entry {p}/{o} below the start"
                    );
                    kept += 1;
                }
                // Every retained record still has its one reference.
                let retained: u64 = topic.partitions().iter().map(|p| p.end - p.start).sum();
                assert_eq!(kept, retained);
            }
        });
    }

    /// `get_many` reads runs with range scans and single keys with lookups;
    /// either way every stored key is reported once, at its index, in the
    /// order of the keys, and keys no longer (or not yet) in the log are
    /// skipped.
    #[test]
    fn get_many_reports_each_stored_key_at_its_index_in_key_order() {
        with_test_storage(|storage| async move {
            let topic = storage.create_topic("t", 2, 0, 0).await.unwrap();
            let records = (0..20u32)
                .map(|i| (i % 2, Record::new(format!("{}-{}", i % 2, i / 2)).to_raw()))
                .collect();
            let t = storage.append(&topic, records).await.unwrap();
            t.await.unwrap().unwrap();
            // Partition 0 now starts at offset 3.
            storage.truncate(&topic, 0, 3).await.unwrap();
            let keys = [
                (0, 5),
                (0, 6),
                (0, 7),
                (1, 2),
                (0, 1), // truncated
                (0, 2), // truncated, starts a run that reaches 0/3 and 0/4
                (0, 3),
                (0, 4),
                (1, 9),
                (1, 10), // past the end
                (1, 11),
                (0, 8),
            ];
            let mut got = Vec::new();
            storage
                .get_many(topic.meta.id, &keys, |i, _, rec| {
                    let r = crate::protocol::RawRecord::new(bytes::Bytes::copy_from_slice(rec))
                        .unwrap();
                    got.push((i, String::from_utf8(r.payload().to_vec()).unwrap()));
                })
                .unwrap();
            let want: Vec<(usize, String)> = [
                (0, "0-5"),
                (1, "0-6"),
                (2, "0-7"),
                (3, "1-2"),
                (6, "0-3"),
                (7, "0-4"),
                (8, "1-9"),
                (11, "0-8"),
            ]
            .into_iter()
            .map(|(i, s)| (i, s.to_string()))
            .collect();
            assert_eq!(got, want);
        });
    }
}
