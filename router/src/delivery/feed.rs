//! Feeds: a named subscription to a set of keys of one topic, delivered in
//! per-key order whichever way each record fans out.
//!
//! Fan-out on write pushes a reference into every following feed's inbox
//! when the record is committed: one write per follower, and a feed reads
//! only its own inbox. Fan-out on read writes one entry in the key's index;
//! each feed merges the indexes of the keys it follows when it reads. A
//! topic's policy picks a default and a fanout plugin may choose per message
//! (for example on-read for a hot key with many followers). Both kinds of
//! entry are written in the record's own commit and read in one snapshot,
//! so a feed sees every record of its keys exactly once, in offset order per
//! partition, however the modes are mixed.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{DeliveryError, SubEvent};
use crate::protocol::{put_deliver_header, put_delivered};
use crate::storage::{FeedDef, Storage, StorageError, TopicHandle};

/// Most records read per pass.
const MAX_PER_PASS: usize = 1024;

/// One reader of a feed.
pub struct FeedSubscription {
    topic: Arc<TopicHandle>,
    storage: Storage,
    feed: FeedDef,
    cursors: Vec<u64>,
    credits: u64,
    auto_commit: bool,
}

impl FeedSubscription {
    /// Opens feed `name` following `keys` (creating it, or replacing its
    /// keys) and resumes from its stored cursors. With `auto_commit`, a
    /// record's position is stored once it is sent; otherwise when the
    /// subscriber commits it.
    pub async fn open(
        topic: Arc<TopicHandle>,
        storage: Storage,
        name: &str,
        keys: Vec<Vec<u8>>,
        credits: u32,
        auto_commit: bool,
    ) -> Result<Self, StorageError> {
        let feed = storage.follow(&topic, name, keys).await?;
        let mut cursors = Vec::with_capacity(topic.meta.partitions as usize);
        for p in 0..topic.meta.partitions {
            cursors.push(storage.feed_cursor(topic.meta.id, name, p)?);
        }
        Ok(FeedSubscription {
            topic,
            storage,
            feed,
            cursors,
            credits: credits as u64,
            auto_commit,
        })
    }

    /// The topic's partition count.
    pub fn partitions(&self) -> u32 {
        self.topic.meta.partitions
    }

    /// Encodes up to the available credits into `buf` as `Deliver` frames,
    /// one per partition touched. Returns how many records.
    fn fill(&mut self, buf: &mut BytesMut) -> Result<usize, StorageError> {
        let max = self.credits.min(MAX_PER_PASS as u64) as usize;
        if max == 0 {
            return Ok(0);
        }
        let mut frames: Vec<(u32, usize, u32)> = Vec::new(); // partition, header at, count
        let before = self.cursors.clone();
        let n = self.storage.read_feed(
            self.topic.meta.id,
            &self.feed,
            &mut self.cursors,
            max,
            |p, o, ts, rec| {
                if frames.last().is_none_or(|f| f.0 != p) {
                    frames.push((p, buf.len(), 0));
                    buf.extend_from_slice(&[0u8; 13]);
                }
                put_delivered(buf, o, ts, rec);
                if let Some(f) = frames.last_mut() {
                    f.2 += 1;
                }
            },
        )?;
        // Patch each frame's header now that its length is known.
        for (i, &(p, at, count)) in frames.iter().enumerate() {
            let end = frames.get(i + 1).map_or(buf.len(), |f| f.1);
            let mut header = [0u8; 13];
            put_deliver_header(&mut &mut header[..], p, count, end - at - 13);
            buf[at..at + 13].copy_from_slice(&header);
        }
        self.credits -= n as u64;
        self.topic
            .stats
            .delivered
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        // Cursors moved past skipped entries too: remember them.
        if self.cursors != before && n == 0 {
            return Ok(usize::MAX);
        }
        Ok(n)
    }

    async fn commit(&self, before: &[u64]) -> Result<(), StorageError> {
        if !self.auto_commit {
            return Ok(());
        }
        for (p, (&now, &was)) in self.cursors.iter().zip(before).enumerate() {
            if now != was {
                self.storage
                    .feed_commit(self.topic.meta.id, &self.feed, p as u32, now)
                    .await?;
            }
        }
        Ok(())
    }

    async fn apply(&mut self, ev: SubEvent) -> Result<(), StorageError> {
        match ev {
            SubEvent::Credit(c) => self.credits += c as u64,
            SubEvent::Commit { partition, offset } if !self.auto_commit => {
                if partition < self.topic.meta.partitions {
                    self.storage
                        .feed_commit(self.topic.meta.id, &self.feed, partition, offset)
                        .await?;
                }
            }
            SubEvent::Commit { .. } => {}
        }
        Ok(())
    }

    /// Delivers until the subscriber closes its side, the topic is deleted,
    /// or a write fails. Each record's position is committed once written.
    pub async fn run<W: AsyncWrite + Unpin>(
        mut self,
        out: &mut W,
        mut events: mpsc::Receiver<SubEvent>,
    ) -> Result<(), DeliveryError> {
        let mut topic_rx = self.topic.watch();
        let mut buf = BytesMut::with_capacity(64 << 10);
        loop {
            loop {
                match events.try_recv() {
                    Ok(ev) => self.apply(ev).await?,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            topic_rx.borrow_and_update();
            if self.topic.is_deleted() {
                let f = super::topic_deleted(&self.topic.meta.name);
                out.write_all(&f.to_bytes()).await?;
                return Ok(());
            }
            let before = self.cursors.clone();
            let sent = self.fill(&mut buf)?;
            if !buf.is_empty() {
                out.write_all(&buf).await?;
                buf.clear();
            }
            self.commit(&before).await?;
            if sent > 0 {
                continue;
            }
            let has_credits = self.credits > 0;
            tokio::select! {
                _ = topic_rx.changed(), if has_credits => {}
                ev = events.recv() => match ev {
                    Some(ev) => self.apply(ev).await?,
                    None => return Ok(()),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! For random sequences of publishes, follows and reads, fan-out on
    //! write, on read, and a per-message mix deliver the same records in
    //! the same per-key order, equal to a model of "every record of a
    //! followed key appended after the follow".

    use std::collections::HashMap;

    use proptest::prelude::*;

    use crate::protocol::{RawRecord, Record};
    use crate::storage::{AppendRecord, Fanout, FeedDef, key_hash, with_test_storage};

    #[derive(Debug, Clone)]
    enum Op {
        Publish { key: u8, count: u8 },
        Follow { feed: u8, keys: Vec<u8> },
        Read { feed: u8, max: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..6, 1u8..5).prop_map(|(key, count)| Op::Publish { key, count }),
            1 => (0u8..3, proptest::collection::vec(0u8..6, 0..4))
                .prop_map(|(feed, keys)| Op::Follow { feed, keys }),
            2 => (0u8..3, 1u8..8).prop_map(|(feed, max)| Op::Read { feed, max }),
        ]
    }

    /// What each feed delivered, in order: `(key, sequence number)`.
    type Delivered = HashMap<u8, Vec<(u8, u32)>>;

    /// Runs `ops` against a real store in `mode` (`None`: alternate per message).
    fn run(ops: &[Op], mode: Option<Fanout>) -> Delivered {
        with_test_storage(|storage| async move {
            let topic = storage.create_topic("t", 3, 0, 0).await.unwrap();
            let mut feeds: HashMap<u8, (FeedDef, Vec<u64>)> = HashMap::new();
            let mut out: Delivered = HashMap::new();
            let mut seq = 0u32;
            for op in ops {
                match op {
                    Op::Publish { key, count } => {
                        let k = format!("k{key}");
                        let records = (0..*count)
                            .map(|_| {
                                seq += 1;
                                let fanout = match mode {
                                    Some(m) => m,
                                    None if seq.is_multiple_of(2) => Fanout::OnWrite,
                                    None => Fanout::OnRead,
                                };
                                AppendRecord {
                                    topic_id: topic.meta.id,
                                    partition: (key_hash(k.as_bytes()) % 3) as u32,
                                    record: Record::new(seq.to_string())
                                        .with_key(k.clone())
                                        .to_raw(),
                                    dedup: None,
                                    fanout: Some((key_hash(k.as_bytes()), fanout)),
                                }
                            })
                            .collect();
                        let t = storage.append_many(records, Vec::new()).await.unwrap();
                        t.await.unwrap().unwrap();
                    }
                    Op::Follow { feed, keys } => {
                        let keys = keys.iter().map(|k| format!("k{k}").into_bytes()).collect();
                        let def = storage
                            .follow(&topic, &format!("f{feed}"), keys)
                            .await
                            .unwrap();
                        let cursors = feeds
                            .remove(feed)
                            .map(|(_, c)| c)
                            .unwrap_or_else(|| vec![0; 3]);
                        feeds.insert(*feed, (def, cursors));
                    }
                    Op::Read { feed, max } => {
                        let Some((def, cursors)) = feeds.get_mut(feed) else {
                            continue;
                        };
                        let got = out.entry(*feed).or_default();
                        storage
                            .read_feed(
                                topic.meta.id,
                                def,
                                cursors,
                                *max as usize,
                                |_, _, _, rec| {
                                    let r =
                                        RawRecord::new(bytes::Bytes::copy_from_slice(rec)).unwrap();
                                    let key = r.key().unwrap()[1] - b'0';
                                    let n =
                                        std::str::from_utf8(&r.payload()).unwrap().parse().unwrap();
                                    got.push((key, n));
                                },
                            )
                            .unwrap();
                    }
                }
            }
            storage.shutdown().await;
            out
        })
    }

    /// The model: records get offsets per partition in publish order; a
    /// feed follows each key from the partition's end at follow time
    /// (keeping the start of keys it already followed); a read takes, per
    /// partition in order, the next followed records up to `max`.
    fn model(ops: &[Op]) -> Delivered {
        let part = |k: u8| (key_hash(format!("k{k}").as_bytes()) % 3) as usize;
        let mut ends = [0u64; 3];
        let mut log: Vec<(u8, u32, usize, u64)> = Vec::new(); // key, seq, partition, offset
        let mut feeds: HashMap<u8, (HashMap<u8, u64>, [u64; 3])> = HashMap::new();
        let mut out: Delivered = HashMap::new();
        let mut seq = 0u32;
        for op in ops {
            match op {
                Op::Publish { key, count } => {
                    for _ in 0..*count {
                        seq += 1;
                        let p = part(*key);
                        log.push((*key, seq, p, ends[p]));
                        ends[p] += 1;
                    }
                }
                Op::Follow { feed, keys } => {
                    let (old, cursors) = feeds.remove(feed).unwrap_or_default();
                    let new = keys
                        .iter()
                        .map(|k| (*k, old.get(k).copied().unwrap_or(ends[part(*k)])))
                        .collect();
                    feeds.insert(*feed, (new, cursors));
                }
                Op::Read { feed, max } => {
                    let Some((keys, cursors)) = feeds.get_mut(feed) else {
                        continue;
                    };
                    let got = out.entry(*feed).or_default();
                    let mut total = 0;
                    for (p, cursor) in cursors.iter_mut().enumerate() {
                        for &(k, s, rp, o) in &log {
                            if total == *max as usize {
                                break;
                            }
                            if rp == p && o >= *cursor && keys.get(&k).is_some_and(|st| o >= *st) {
                                got.push((k, s));
                                *cursor = o + 1;
                                total += 1;
                            }
                        }
                    }
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn on_write_on_read_and_mixed_deliver_the_same(ops in proptest::collection::vec(op(), 1..40)) {
            let write = run(&ops, Some(Fanout::OnWrite));
            let read = run(&ops, Some(Fanout::OnRead));
            let mixed = run(&ops, None);
            prop_assert_eq!(&write, &model(&ops));
            prop_assert_eq!(&write, &read);
            prop_assert_eq!(&write, &mixed);
        }
    }
}
