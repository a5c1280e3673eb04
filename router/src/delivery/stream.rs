//! Stream subscriptions: one member of a consumer group, pushing records
//! from the partitions it holds.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::broker::{Group, Held};
use crate::plugins::{CallMessage, FailureMode, LiveVersion, PluginRegistry, Subscriber};
use crate::protocol::RawRecord;
use crate::protocol::{Frame, StartPosition, put_deliver_header, put_delivered};
use crate::storage::Storage;
use crate::storage::{ReadLimit, StorageError};

/// Something the subscriber told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubEvent {
    /// More credits.
    Credit(u32),
    /// An explicit commit.
    Commit {
        /// Partition.
        partition: u32,
        /// Next offset to read.
        offset: u64,
    },
}

/// Why a subscription ended other than by the subscriber closing it.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// Writing to the subscriber failed (it went away).
    #[error("write to subscriber failed: {0}")]
    Write(#[from] std::io::Error),
    /// Reading the log failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Most records in one `Deliver` frame.
const MAX_RECORDS_PER_FRAME: u64 = 1024;
/// Bytes of frames gathered before one stream write.
const WRITE_CHUNK: usize = 256 << 10;

/// One member of a group, delivering to one subscriber stream.
pub struct StreamSubscription {
    group: Arc<Group>,
    plugins: Option<Arc<PluginRegistry>>,
    member: u64,
    start: StartPosition,
    auto_commit: bool,
    credits: u64,
    held: Vec<Held>,
    rotate: usize,
}

impl StreamSubscription {
    /// Joins `group` as a new member.
    pub fn join(
        group: Arc<Group>,
        plugins: Option<Arc<PluginRegistry>>,
        start: StartPosition,
        credits: u32,
        auto_commit: bool,
    ) -> Self {
        let member = group.join();
        StreamSubscription {
            group,
            plugins,
            member,
            start,
            auto_commit,
            credits: credits as u64,
            held: Vec::new(),
            rotate: 0,
        }
    }

    async fn apply(&mut self, ev: SubEvent) -> Result<(), DeliveryError> {
        match ev {
            SubEvent::Credit(n) => self.credits += n as u64,
            SubEvent::Commit { partition, offset } => {
                self.group.commit(self.member, partition, offset).await?;
            }
        }
        Ok(())
    }

    /// Delivers until the subscriber closes its side (`events` ends), the
    /// topic is deleted, or a write fails.
    pub async fn run<W: AsyncWrite + Unpin>(
        mut self,
        out: &mut W,
        mut events: mpsc::Receiver<SubEvent>,
    ) -> Result<(), DeliveryError> {
        let mut topic_rx = self.group.topic.watch();
        let mut group_rx = self.group.watch();
        let mut buf = BytesMut::with_capacity(WRITE_CHUNK + (64 << 10));
        let mut delivered: Vec<(u32, u64)> = Vec::new();
        loop {
            loop {
                match events.try_recv() {
                    Ok(ev) => self.apply(ev).await?,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            // Mark both watches seen before looking at state, so a change
            // made after this point wakes the wait below.
            topic_rx.borrow_and_update();
            group_rx.borrow_and_update();
            if self.group.topic.is_deleted() {
                let f = super::topic_deleted(&self.group.topic.meta.name);
                out.write_all(&f.to_bytes()).await?;
                return Ok(());
            }
            if self
                .group
                .reconcile(self.member, &mut self.held, self.start)?
            {
                let f = Frame::Assignment {
                    partitions: self.held.iter().map(|h| h.partition).collect(),
                };
                f.encode(&mut buf);
            }
            delivered.clear();
            let sent = self.fill(&mut buf, &mut delivered)?;
            if !buf.is_empty() {
                out.write_all(&buf).await?;
                buf.clear();
                if self.auto_commit {
                    for &(p, next) in &delivered {
                        self.group.commit(self.member, p, next).await?;
                    }
                }
            }
            if sent > 0 {
                continue;
            }
            // Without credits new records cannot be sent anyway: do not wake
            // on every commit (a thousand idle subscribers would otherwise
            // all wake for each one). Credits, commits and group changes
            // still wake us.
            let has_credits = self.credits > 0;
            tokio::select! {
                _ = topic_rx.changed(), if has_credits => {}
                _ = group_rx.changed() => {}
                ev = events.recv() => match ev {
                    Some(ev) => self.apply(ev).await?,
                    None => return Ok(()),
                },
            }
        }
    }

    /// Encodes up to `credits` records from held partitions into `buf`,
    /// taking partitions round-robin so none starves. Returns the count
    /// (at least 1 if any position moved, even when a filter skipped all).
    fn fill(
        &mut self,
        buf: &mut BytesMut,
        delivered: &mut Vec<(u32, u64)>,
    ) -> Result<u64, StorageError> {
        if self.held.is_empty() || self.credits == 0 {
            return Ok(0);
        }
        let infos = self.group.topic.partitions();
        let topic_id = self.group.topic.meta.id;
        let storage = self.group.topic_storage();
        let filter = self
            .plugins
            .as_ref()
            .and_then(|p| p.filter_for(&self.group.topic.meta.name, &self.group.name));
        let sub = Subscriber {
            group: self.group.name.to_string(),
            topic: self.group.topic.meta.name.clone(),
        };
        let n = self.held.len();
        let mut sent = 0;
        let mut progressed = false;
        for i in 0..n {
            if self.credits == 0 || buf.len() >= WRITE_CHUNK {
                break;
            }
            let h = &mut self.held[(self.rotate + i) % n];
            let info = infos[h.partition as usize];
            // Retention may have deleted records this member had not read.
            h.position = h.position.max(info.start);
            if h.position >= info.end {
                continue;
            }
            let max = self
                .credits
                .min(MAX_RECORDS_PER_FRAME)
                .min(info.end - h.position);
            if let Some(filter) = &filter {
                let (next, count) = filtered_read(
                    storage,
                    topic_id,
                    h.partition,
                    h.position,
                    max,
                    filter,
                    &sub,
                    buf,
                )?;
                if next == h.position {
                    continue;
                }
                h.position = next;
                self.group
                    .topic
                    .stats
                    .delivered
                    .fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
                self.credits -= count as u64;
                sent += count as u64;
                progressed = true;
                delivered.push((h.partition, next));
                continue;
            }
            let header_at = buf.len();
            buf.put_bytes(0, 13);
            let body_at = buf.len();
            let mut count = 0u32;
            let mut last_ts = 0;
            let next = storage.scan(
                topic_id,
                h.partition,
                h.position,
                ReadLimit {
                    max_records: max as usize,
                    max_bytes: WRITE_CHUNK,
                },
                |offset, ts, rec| {
                    put_delivered(buf, offset, ts, rec);
                    count += 1;
                    last_ts = ts;
                },
            )?;
            if count > 0 && next >= info.end {
                // Caught up: the last record's age is the delivery latency.
                let age_ms = crate::storage::now_ms().saturating_sub(last_ts);
                self.group
                    .topic
                    .stats
                    .publish_to_deliver
                    .observe(age_ms as f64 / 1000.0);
            }
            if count == 0 {
                buf.truncate(header_at);
                // Nothing where the partition says records are, and not
                // because retention just removed them: the log is missing
                // entries. Fail the subscription rather than wait forever.
                let now = self.group.topic.partitions()[h.partition as usize];
                if h.position >= now.start && h.position < now.end {
                    return Err(StorageError::Damaged(format!(
                        "topic '{}' partition {} has no entry at offset {} though it holds \
                         offsets {}..{}: the database file may be damaged. Stop the router \
                         and run `switchyard check --data DIR`",
                        self.group.topic.meta.name, h.partition, h.position, now.start, now.end
                    )));
                }
                continue;
            }
            let body_len = buf.len() - body_at;
            let mut header = [0u8; 13];
            put_deliver_header(&mut &mut header[..], h.partition, count, body_len);
            buf[header_at..body_at].copy_from_slice(&header);
            self.group
                .topic
                .stats
                .delivered
                .fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
            h.position = next;
            self.credits -= count as u64;
            sent += count as u64;
            progressed = true;
            delivered.push((h.partition, next));
        }
        self.rotate = self.rotate.wrapping_add(1);
        Ok(if progressed { sent.max(1) } else { 0 })
    }
}

/// Reads up to `max` records, asks the filter which this subscriber sees,
/// and encodes those into `buf` as one `Deliver` frame. Returns the next
/// position (past skipped records too) and the number delivered.
#[allow(clippy::too_many_arguments)]
fn filtered_read(
    storage: &Storage,
    topic_id: u32,
    partition: u32,
    from: u64,
    max: u64,
    filter: &LiveVersion,
    sub: &Subscriber,
    buf: &mut BytesMut,
) -> Result<(u64, u32), StorageError> {
    let mut scanned: Vec<(u64, u64, RawRecord)> = Vec::new();
    let next = storage.scan(
        topic_id,
        partition,
        from,
        ReadLimit {
            max_records: max as usize,
            max_bytes: WRITE_CHUNK,
        },
        |offset, ts, rec| {
            // The filter needs owned records; stored records were
            // validated when they were published.
            if let Ok(r) = RawRecord::new(bytes::Bytes::copy_from_slice(rec)) {
                scanned.push((offset, ts, r));
            }
        },
    )?;
    let topic: Arc<str> = sub.topic.as_str().into();
    let mut verdicts = Vec::with_capacity(scanned.len());
    for chunk in scanned.chunks(256) {
        let batch = chunk
            .iter()
            .map(|(_, ts, r)| CallMessage {
                record: r.clone(),
                topic: topic.clone(),
                timestamp_ms: *ts,
                attempt: 1,
            })
            .collect();
        match filter.plugin.filter(sub, batch).decisions {
            Ok(v) => verdicts.extend(v),
            Err(e) => {
                let deliver = filter.on_failure == FailureMode::Bypass;
                tracing::warn!(plugin = %filter.plugin.label, error = %e, deliver, "filter failed");
                verdicts.extend(std::iter::repeat_n(deliver, chunk.len()));
            }
        }
    }
    let header_at = buf.len();
    buf.put_bytes(0, 13);
    let body_at = buf.len();
    let mut count = 0u32;
    for ((offset, ts, r), pass) in scanned.iter().zip(verdicts) {
        if pass {
            put_delivered(buf, *offset, *ts, r.as_bytes());
            count += 1;
        }
    }
    if count == 0 {
        buf.truncate(header_at);
    } else {
        let mut header = [0u8; 13];
        put_deliver_header(&mut &mut header[..], partition, count, buf.len() - body_at);
        buf[header_at..body_at].copy_from_slice(&header);
    }
    Ok((next, count))
}

impl Drop for StreamSubscription {
    fn drop(&mut self) {
        self.group.leave(self.member);
    }
}
