//! Frames: one enum, one encoder, one decoder. No I/O.
//!
//! Every frame is `length: u32 | type: u8 | body`, where `length` counts the
//! type byte and the body. Integers are big-endian; strings are
//! `u16 length | UTF-8`; byte fields are `u32 length | bytes`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::{DecodeError, ErrorCode, WireError};
use super::record::{RawRecord, Record};

/// Bytes before a frame's body: the length prefix and the type byte.
pub const FRAME_HEADER_LEN: usize = 5;

/// Where a subscription starts reading when its group has no committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest retained record.
    Earliest,
    /// Only records appended after the subscription starts.
    Latest,
    /// This offset in every partition (clamped to the retained range).
    Offset(u64),
    /// The first record whose timestamp is at or after this time (ms since the epoch).
    Timestamp(u64),
}

/// How a subscription consumes a topic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SubscribeMode {
    /// Kafka-like: members of a group split partitions and read them in order.
    #[default]
    Stream,
    /// RabbitMQ/SQS-like: members compete for individual messages, which
    /// are acked one by one and redelivered after `visibility_ms` if not.
    Queue {
        /// How long a delivered message stays invisible to other members.
        visibility_ms: u64,
    },
    /// A feed named by the group: the records of these keys appended from
    /// now on, in per-key order, whichever way they fan out.
    Feed {
        /// The keys to follow (replacing the feed's previous set).
        keys: Vec<Bytes>,
    },
}

/// Names one delivery of a queue message: acks must name the attempt they
/// settle, so a late ack cannot settle a later redelivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryTag {
    /// Partition.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
    /// Delivery attempt, from 1.
    pub attempt: u32,
}

/// One message delivered to a queue subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDelivered {
    /// Which delivery this is.
    pub tag: DeliveryTag,
    /// Append time, ms since the epoch.
    pub timestamp_ms: u64,
    /// The record as the producer encoded it.
    pub record: RawRecord,
}

/// What one partition of a topic holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionInfo {
    /// Offset of the oldest retained record.
    pub start: u64,
    /// Offset the next record will get.
    pub end: u64,
    /// Bytes of record data retained.
    pub bytes: u64,
}

/// A topic and its partitions, as returned by list and describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// The topic name.
    pub name: String,
    /// Records older than this are deleted (0: keep forever).
    pub retention_ms: u64,
    /// Oldest records are deleted while a partition holds more than this (0: no limit).
    pub retention_bytes: u64,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// One entry per partition.
    pub partitions: Vec<PartitionInfo>,
}

/// One record delivered to a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Its offset in the partition.
    pub offset: u64,
    /// Append time, ms since the epoch.
    pub timestamp_ms: u64,
    /// The record as the producer encoded it.
    pub record: RawRecord,
}

/// Every frame of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame on the control stream: the versions the client speaks.
    Hello {
        /// Lowest version the client supports.
        min_version: u8,
        /// Highest version the client supports.
        max_version: u8,
        /// Free-form client identification, for logs.
        client: String,
        /// A bearer token naming the principal this connection acts as
        /// (absent: a client certificate or anonymous access must do).
        token: Option<String>,
    },
    /// The router's answer to `Hello`.
    HelloOk {
        /// The version both sides now speak.
        version: u8,
        /// Router identification.
        server: String,
        /// Largest record the router accepts.
        max_message_bytes: u32,
        /// Largest frame the router accepts.
        max_frame_bytes: u32,
        /// The client addresses of every voting node when the router is
        /// one node of a cluster (version 2 and later; empty otherwise).
        /// A client that was given one address learns the others here, so
        /// it can find the next leader when this one is gone. An optional
        /// trailing field: absent when empty.
        cluster: Vec<std::net::SocketAddr>,
        /// How many Raft groups the cluster's topics are spread over (1 for
        /// a single router or a one-group cluster). A client of several
        /// groups asks which group holds a topic and sends its requests to
        /// that group's router. An optional trailing field after `cluster`:
        /// absent when 1.
        groups: u32,
    },
    /// An error answer to the request, batch or stream identified by `id`.
    Error {
        /// The request id, publish batch sequence, or 0 for the stream itself.
        id: u64,
        /// The stable code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Success with no payload.
    Ok {
        /// The request id.
        id: u64,
    },
    /// Create a topic.
    CreateTopic {
        /// The request id.
        id: u64,
        /// Topic name.
        name: String,
        /// Number of partitions.
        partitions: u32,
        /// Retention by age (0: none).
        retention_ms: u64,
        /// Retention by size per partition (0: none).
        retention_bytes: u64,
    },
    /// Delete a topic and its records.
    DeleteTopic {
        /// The request id.
        id: u64,
        /// Topic name.
        name: String,
    },
    /// List all topics.
    ListTopics {
        /// The request id.
        id: u64,
    },
    /// Describe one topic.
    DescribeTopic {
        /// The request id.
        id: u64,
        /// Topic name.
        name: String,
    },
    /// Answer to `ListTopics` or `DescribeTopic`.
    Topics {
        /// The request id.
        id: u64,
        /// The topics.
        topics: Vec<TopicInfo>,
    },
    /// A batch of records for one topic, on a publish stream.
    PublishBatch {
        /// Producer-chosen sequence number, echoed in the ack.
        seq: u64,
        /// Target topic.
        topic: String,
        /// Encoded records.
        records: Vec<RawRecord>,
        /// How many records each of the batch's parts holds, in order: the
        /// router stores or refuses each part as a unit. Empty: one part,
        /// the whole batch. An optional trailing field, sent run-length
        /// encoded (see `docs/protocol.md`).
        parts: Vec<u32>,
    },
    /// Durable acknowledgement of a publish batch, one position per record
    /// of every part that was stored.
    PublishAck {
        /// The batch's sequence number.
        seq: u64,
        /// `(partition, offset)` of each stored record, in batch order
        /// (records of refused parts have none).
        positions: Vec<(u32, u64)>,
        /// Indexes (into the batch) of records whose message id was already
        /// stored within the dedup window: their position is the original's.
        duplicates: Vec<u32>,
        /// `(index, topic)` of records a route plugin stored in another
        /// topic than the one published to: their position is in that
        /// topic. An optional trailing field (absent when empty).
        routed: Vec<(u32, String)>,
        /// `(part, error)` of each part refused while the rest of the batch
        /// was stored; indexes in `duplicates` and `routed` count only
        /// stored records. An optional trailing field (absent when empty).
        refused: Vec<(u32, WireError)>,
    },
    /// First frame on a subscription stream.
    Subscribe {
        /// Consumer group; empty for an anonymous, uncommitted subscription.
        group: String,
        /// Topic to read.
        topic: String,
        /// Where to start where the group has no committed offset.
        start: StartPosition,
        /// Initial credits: how many records may be in flight to the client.
        credits: u32,
        /// Stream: commit each record's offset as soon as it is delivered.
        /// Queue: settle each message as soon as it is sent (no acks).
        auto_commit: bool,
        /// Stream or queue consumption.
        mode: SubscribeMode,
    },
    /// Answer to `Subscribe`.
    Subscribed {
        /// Partition count of the topic.
        partitions: u32,
    },
    /// The partitions this member currently owns.
    Assignment {
        /// Owned partitions, ascending.
        partitions: Vec<u32>,
    },
    /// More credits from the subscriber.
    Credit {
        /// Records the router may send in addition to those already allowed.
        credits: u32,
    },
    /// Commit: the group has processed everything before `offset`.
    Commit {
        /// Partition.
        partition: u32,
        /// The next offset to read.
        offset: u64,
    },
    /// A plugin administration request (deploy, list, show, rollback,
    /// remove, test). Bodies are JSON: these are rare, and their shape grows.
    AdminRequest {
        /// The request id.
        id: u64,
        /// Operation name.
        op: String,
        /// JSON arguments.
        body: Bytes,
        /// The component, for `deploy` and `test`; empty otherwise.
        wasm: Bytes,
    },
    /// Answer to `AdminRequest`.
    AdminResponse {
        /// The request id.
        id: u64,
        /// JSON result.
        body: Bytes,
    },
    /// Messages for a queue subscriber, each with its delivery tag.
    QueueDeliver {
        /// The messages, in the order the router chose them.
        records: Vec<QueueDelivered>,
    },
    /// Acknowledge queue deliveries: processed, never deliver again.
    Ack {
        /// Request id, answered by `Ok` or `Error` on the subscription stream.
        id: u64,
        /// The deliveries.
        items: Vec<DeliveryTag>,
    },
    /// Negative acknowledgement: processing failed; the retry policy decides.
    Nack {
        /// Request id.
        id: u64,
        /// The deliveries.
        items: Vec<DeliveryTag>,
        /// False: do not retry (dead-letter at once under the default policy).
        retryable: bool,
        /// Application error code, passed to the retry plugin.
        code: String,
        /// Human-readable reason, kept in the dead letter's headers.
        message: String,
    },
    /// Extend the visibility timeout of in-flight deliveries.
    Extend {
        /// Request id.
        id: u64,
        /// The deliveries.
        items: Vec<DeliveryTag>,
        /// New timeout, counted from now.
        visibility_ms: u64,
    },
    /// Records for a subscriber from one partition.
    Deliver {
        /// Partition.
        partition: u32,
        /// Records in offset order.
        records: Vec<Delivered>,
    },
}

mod ty {
    pub(super) const HELLO: u8 = 0x01;
    pub(super) const HELLO_OK: u8 = 0x02;
    pub(super) const ERROR: u8 = 0x03;
    pub(super) const OK: u8 = 0x04;
    pub(super) const CREATE_TOPIC: u8 = 0x10;
    pub(super) const DELETE_TOPIC: u8 = 0x11;
    pub(super) const LIST_TOPICS: u8 = 0x12;
    pub(super) const DESCRIBE_TOPIC: u8 = 0x13;
    pub(super) const TOPICS: u8 = 0x14;
    pub(super) const PUBLISH_BATCH: u8 = 0x20;
    pub(super) const PUBLISH_ACK: u8 = 0x21;
    pub(super) const SUBSCRIBE: u8 = 0x30;
    pub(super) const SUBSCRIBED: u8 = 0x31;
    pub(super) const ASSIGNMENT: u8 = 0x32;
    pub(super) const CREDIT: u8 = 0x33;
    pub(super) const COMMIT: u8 = 0x34;
    pub(super) const DELIVER: u8 = 0x35;
    pub(super) const QUEUE_DELIVER: u8 = 0x36;
    pub(super) const ACK: u8 = 0x37;
    pub(super) const NACK: u8 = 0x38;
    pub(super) const EXTEND: u8 = 0x39;
    pub(super) const ADMIN_REQUEST: u8 = 0x40;
    pub(super) const ADMIN_RESPONSE: u8 = 0x41;
}

impl Frame {
    /// An `Error` frame from a [`WireError`].
    pub fn error(id: u64, err: &WireError) -> Frame {
        Frame::Error {
            id,
            code: err.code,
            message: err.message.clone(),
        }
    }

    /// Appends the encoded frame to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        let start = buf.len();
        buf.put_u32(0); // length, patched below
        match self {
            Frame::Hello {
                min_version,
                max_version,
                client,
                token,
            } => {
                buf.put_u8(ty::HELLO);
                buf.put_u8(*min_version);
                buf.put_u8(*max_version);
                put_str(buf, client);
                if let Some(token) = token {
                    put_str(buf, token);
                }
            }
            Frame::HelloOk {
                version,
                server,
                max_message_bytes,
                max_frame_bytes,
                cluster,
                groups,
            } => {
                buf.put_u8(ty::HELLO_OK);
                buf.put_u8(*version);
                put_str(buf, server);
                buf.put_u32(*max_message_bytes);
                buf.put_u32(*max_frame_bytes);
                if !cluster.is_empty() || *groups > 1 {
                    buf.put_u32(cluster.len() as u32);
                    for a in cluster {
                        put_str(buf, &a.to_string());
                    }
                }
                if *groups > 1 {
                    buf.put_u32(*groups);
                }
            }
            Frame::Error { id, code, message } => {
                buf.put_u8(ty::ERROR);
                buf.put_u64(*id);
                buf.put_u16(code.as_u16());
                put_str(buf, message);
            }
            Frame::Ok { id } => {
                buf.put_u8(ty::OK);
                buf.put_u64(*id);
            }
            Frame::CreateTopic {
                id,
                name,
                partitions,
                retention_ms,
                retention_bytes,
            } => {
                buf.put_u8(ty::CREATE_TOPIC);
                buf.put_u64(*id);
                put_str(buf, name);
                buf.put_u32(*partitions);
                buf.put_u64(*retention_ms);
                buf.put_u64(*retention_bytes);
            }
            Frame::DeleteTopic { id, name } => {
                buf.put_u8(ty::DELETE_TOPIC);
                buf.put_u64(*id);
                put_str(buf, name);
            }
            Frame::ListTopics { id } => {
                buf.put_u8(ty::LIST_TOPICS);
                buf.put_u64(*id);
            }
            Frame::DescribeTopic { id, name } => {
                buf.put_u8(ty::DESCRIBE_TOPIC);
                buf.put_u64(*id);
                put_str(buf, name);
            }
            Frame::Topics { id, topics } => {
                buf.put_u8(ty::TOPICS);
                buf.put_u64(*id);
                buf.put_u32(topics.len() as u32);
                for t in topics {
                    put_str(buf, &t.name);
                    buf.put_u64(t.retention_ms);
                    buf.put_u64(t.retention_bytes);
                    buf.put_u64(t.created_ms);
                    buf.put_u32(t.partitions.len() as u32);
                    for p in &t.partitions {
                        buf.put_u64(p.start);
                        buf.put_u64(p.end);
                        buf.put_u64(p.bytes);
                    }
                }
            }
            Frame::PublishBatch {
                seq,
                topic,
                records,
                parts,
            } => {
                buf.put_u8(ty::PUBLISH_BATCH);
                buf.put_u64(*seq);
                put_str(buf, topic);
                buf.put_u32(records.len() as u32);
                for r in records {
                    buf.put_u32(r.len() as u32);
                    buf.put_slice(r.as_bytes());
                }
                put_parts(buf, parts.iter().copied());
            }
            Frame::PublishAck {
                seq,
                positions,
                duplicates,
                routed,
                refused,
            } => {
                buf.put_u8(ty::PUBLISH_ACK);
                buf.put_u64(*seq);
                buf.put_u32(positions.len() as u32);
                for (p, o) in positions {
                    buf.put_u32(*p);
                    buf.put_u64(*o);
                }
                buf.put_u32(duplicates.len() as u32);
                for i in duplicates {
                    buf.put_u32(*i);
                }
                if !routed.is_empty() || !refused.is_empty() {
                    buf.put_u32(routed.len() as u32);
                    for (i, topic) in routed {
                        buf.put_u32(*i);
                        put_str(buf, topic);
                    }
                }
                if !refused.is_empty() {
                    buf.put_u32(refused.len() as u32);
                    for (i, e) in refused {
                        buf.put_u32(*i);
                        buf.put_u16(e.code.as_u16());
                        put_str(buf, &e.message);
                    }
                }
            }
            Frame::Subscribe {
                group,
                topic,
                start,
                credits,
                auto_commit,
                mode,
            } => {
                buf.put_u8(ty::SUBSCRIBE);
                put_str(buf, group);
                put_str(buf, topic);
                let (kind, value) = match start {
                    StartPosition::Earliest => (0, 0),
                    StartPosition::Latest => (1, 0),
                    StartPosition::Offset(o) => (2, *o),
                    StartPosition::Timestamp(t) => (3, *t),
                };
                buf.put_u8(kind);
                buf.put_u64(value);
                buf.put_u32(*credits);
                buf.put_u8(*auto_commit as u8);
                match mode {
                    SubscribeMode::Stream => {
                        buf.put_u8(0);
                        buf.put_u64(0);
                    }
                    SubscribeMode::Queue { visibility_ms } => {
                        buf.put_u8(1);
                        buf.put_u64(*visibility_ms);
                    }
                    SubscribeMode::Feed { keys } => {
                        buf.put_u8(2);
                        buf.put_u64(0);
                        buf.put_u32(keys.len() as u32);
                        for k in keys {
                            buf.put_u32(k.len() as u32);
                            buf.put_slice(k);
                        }
                    }
                }
            }
            Frame::Subscribed { partitions } => {
                buf.put_u8(ty::SUBSCRIBED);
                buf.put_u32(*partitions);
            }
            Frame::Assignment { partitions } => {
                buf.put_u8(ty::ASSIGNMENT);
                buf.put_u32(partitions.len() as u32);
                for p in partitions {
                    buf.put_u32(*p);
                }
            }
            Frame::Credit { credits } => {
                buf.put_u8(ty::CREDIT);
                buf.put_u32(*credits);
            }
            Frame::Commit { partition, offset } => {
                buf.put_u8(ty::COMMIT);
                buf.put_u32(*partition);
                buf.put_u64(*offset);
            }
            Frame::AdminRequest { id, op, body, wasm } => {
                buf.put_u8(ty::ADMIN_REQUEST);
                buf.put_u64(*id);
                put_str(buf, op);
                buf.put_u32(body.len() as u32);
                buf.put_slice(body);
                buf.put_u32(wasm.len() as u32);
                buf.put_slice(wasm);
            }
            Frame::AdminResponse { id, body } => {
                buf.put_u8(ty::ADMIN_RESPONSE);
                buf.put_u64(*id);
                buf.put_u32(body.len() as u32);
                buf.put_slice(body);
            }
            Frame::QueueDeliver { records } => {
                buf.put_u8(ty::QUEUE_DELIVER);
                buf.put_u32(records.len() as u32);
                for d in records {
                    put_queue_delivered(buf, d.tag, d.timestamp_ms, d.record.as_bytes());
                }
            }
            Frame::Ack { id, items } => {
                buf.put_u8(ty::ACK);
                buf.put_u64(*id);
                put_tags(buf, items);
            }
            Frame::Nack {
                id,
                items,
                retryable,
                code,
                message,
            } => {
                buf.put_u8(ty::NACK);
                buf.put_u64(*id);
                put_tags(buf, items);
                buf.put_u8(*retryable as u8);
                put_str(buf, code);
                put_str(buf, message);
            }
            Frame::Extend {
                id,
                items,
                visibility_ms,
            } => {
                buf.put_u8(ty::EXTEND);
                buf.put_u64(*id);
                put_tags(buf, items);
                buf.put_u64(*visibility_ms);
            }
            Frame::Deliver { partition, records } => {
                buf.put_u8(ty::DELIVER);
                buf.put_u32(*partition);
                buf.put_u32(records.len() as u32);
                for d in records {
                    put_delivered(buf, d.offset, d.timestamp_ms, d.record.as_bytes());
                }
            }
        }
        let len = (buf.len() - start - 4) as u32;
        buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        buf.freeze()
    }
}

/// Writes a batch's part sizes as the optional trailing field of
/// `PublishBatch`: runs of `(repeat, records)`, so a batch of many
/// one-record parts costs 12 bytes. Nothing for a single part.
fn put_parts(buf: &mut BytesMut, parts: impl IntoIterator<Item = u32>) {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for n in parts {
        match runs.last_mut() {
            Some((repeat, size)) if *size == n => *repeat += 1,
            _ => runs.push((1, n)),
        }
    }
    if runs.len() == 1 && runs[0].0 == 1 || runs.is_empty() {
        return;
    }
    buf.put_u32(runs.len() as u32);
    for (repeat, size) in runs {
        buf.put_u32(repeat);
        buf.put_u32(size);
    }
}

/// Appends one record of a `PublishBatch` straight from an owned [`Record`],
/// so a producer encodes each record exactly once, into the frame buffer.
pub struct PublishBatchWriter {
    start: usize,
    count_at: usize,
    count: u32,
}

impl PublishBatchWriter {
    /// Starts a `PublishBatch` frame in `buf`.
    pub fn begin(buf: &mut BytesMut, seq: u64, topic: &str) -> Self {
        let start = buf.len();
        buf.put_u32(0);
        buf.put_u8(ty::PUBLISH_BATCH);
        buf.put_u64(seq);
        put_str(buf, topic);
        let count_at = buf.len();
        buf.put_u32(0);
        PublishBatchWriter {
            start,
            count_at,
            count: 0,
        }
    }

    /// Appends one record.
    pub fn push(&mut self, buf: &mut BytesMut, record: &Record) {
        buf.put_u32(record.encoded_len() as u32);
        record.encode(buf);
        self.count += 1;
    }

    /// Records appended so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Bytes written so far, including the frame header.
    pub fn len(&self, buf: &BytesMut) -> usize {
        buf.len() - self.start
    }

    /// True if no record was appended.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Patches the frame length and record count, after listing the
    /// batch's parts (record counts, in order) if there is more than one.
    pub fn finish_parts(self, buf: &mut BytesMut, parts: impl IntoIterator<Item = u32>) {
        put_parts(buf, parts);
        self.finish(buf);
    }

    /// Patches the frame length and record count.
    pub fn finish(self, buf: &mut BytesMut) {
        let len = (buf.len() - self.start - 4) as u32;
        buf[self.start..self.start + 4].copy_from_slice(&len.to_be_bytes());
        buf[self.count_at..self.count_at + 4].copy_from_slice(&self.count.to_be_bytes());
    }
}

/// Appends one delivered record in `Deliver` layout: used by the router to
/// write records read from the log without building [`Delivered`] values.
pub fn put_delivered(buf: &mut impl BufMut, offset: u64, timestamp_ms: u64, record: &[u8]) {
    buf.put_u64(offset);
    buf.put_u64(timestamp_ms);
    buf.put_u32(record.len() as u32);
    buf.put_slice(record);
}

/// Writes a `Deliver` frame's header for `count` records whose encoded
/// `put_delivered` bodies total `body_len` bytes.
pub fn put_deliver_header(buf: &mut impl BufMut, partition: u32, count: u32, body_len: usize) {
    buf.put_u32((1 + 4 + 4 + body_len) as u32);
    buf.put_u8(ty::DELIVER);
    buf.put_u32(partition);
    buf.put_u32(count);
}

/// Appends one message in `QueueDeliver` layout.
pub fn put_queue_delivered(
    buf: &mut impl BufMut,
    tag: DeliveryTag,
    timestamp_ms: u64,
    record: &[u8],
) {
    buf.put_u32(tag.partition);
    buf.put_u64(tag.offset);
    buf.put_u32(tag.attempt);
    buf.put_u64(timestamp_ms);
    buf.put_u32(record.len() as u32);
    buf.put_slice(record);
}

/// Writes a `QueueDeliver` frame's header (9 bytes) for `count` messages
/// whose `put_queue_delivered` bodies total `body_len` bytes.
pub fn put_queue_deliver_header(buf: &mut impl BufMut, count: u32, body_len: usize) {
    buf.put_u32((1 + 4 + body_len) as u32);
    buf.put_u8(ty::QUEUE_DELIVER);
    buf.put_u32(count);
}

fn put_tags(buf: &mut BytesMut, items: &[DeliveryTag]) {
    buf.put_u32(items.len() as u32);
    for t in items {
        buf.put_u32(t.partition);
        buf.put_u64(t.offset);
        buf.put_u32(t.attempt);
    }
}

fn put_str(buf: &mut BytesMut, s: &str) {
    // Strings are bounded by their users (topic and group names, messages);
    // truncate rather than corrupt the frame if a message is absurdly long.
    let s = if s.len() > u16::MAX as usize {
        let mut end = u16::MAX as usize;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        &s[..end]
    } else {
        s
    };
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

/// A reader over one frame's body that reports truncation instead of panicking.
struct Body {
    buf: Bytes,
}

impl Body {
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(DecodeError::Truncated(what))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64())
    }
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let n = self.u16(what)? as usize;
        let b = self.bytes(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::InvalidUtf8(what))
    }
    /// Guards a count against the bytes actually left, so a hostile count
    /// cannot make us allocate.
    fn count(&mut self, what: &'static str, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_item) > self.buf.remaining() {
            return Err(DecodeError::Truncated(what));
        }
        Ok(n)
    }
    fn tags(&mut self) -> Result<Vec<DeliveryTag>, DecodeError> {
        let n = self.count("delivery count", 16)?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(DeliveryTag {
                partition: self.u32("partition")?,
                offset: self.u64("offset")?,
                attempt: self.u32("attempt")?,
            });
        }
        Ok(items)
    }
    fn flag(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::InvalidValue(what)),
        }
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.has_remaining() {
            Err(DecodeError::TrailingBytes(self.buf.remaining()))
        } else {
            Ok(())
        }
    }
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read more
/// and call again), and an error for anything that is not a valid frame.
/// The decoded frame's byte fields share `buf`'s memory.
pub fn decode(buf: &mut BytesMut, max_frame_bytes: usize) -> Result<Option<Frame>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_frame_bytes {
        return Err(DecodeError::FrameTooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    if len == 0 {
        return Err(DecodeError::Truncated("frame type"));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let frame = buf.split_to(len).freeze();
    decode_body(frame).map(Some)
}

fn decode_body(frame: Bytes) -> Result<Frame, DecodeError> {
    let mut b = Body { buf: frame };
    let t = b.u8("frame type")?;
    let f = match t {
        ty::HELLO => Frame::Hello {
            min_version: b.u8("min version")?,
            max_version: b.u8("max version")?,
            client: b.string("client")?,
            // Optional trailing field: absent means no token.
            token: if b.buf.is_empty() {
                None
            } else {
                Some(b.string("token")?)
            },
        },
        ty::HELLO_OK => Frame::HelloOk {
            version: b.u8("version")?,
            server: b.string("server")?,
            max_message_bytes: b.u32("max message bytes")?,
            max_frame_bytes: b.u32("max frame bytes")?,
            // Optional trailing field: absent means not a cluster.
            cluster: if b.buf.is_empty() {
                Vec::new()
            } else {
                let n = b.count("cluster node count", 2)?;
                let mut nodes = Vec::with_capacity(n);
                for _ in 0..n {
                    let a = b.string("cluster node")?;
                    nodes.push(
                        a.parse()
                            .map_err(|_| DecodeError::InvalidValue("cluster node"))?,
                    );
                }
                nodes
            },
            // Optional trailing field: absent means one group.
            groups: if b.buf.is_empty() {
                1
            } else {
                match b.u32("groups")? {
                    0 => return Err(DecodeError::InvalidValue("groups")),
                    n => n,
                }
            },
        },
        ty::ERROR => Frame::Error {
            id: b.u64("id")?,
            code: ErrorCode::from_u16(b.u16("code")?),
            message: b.string("message")?,
        },
        ty::OK => Frame::Ok { id: b.u64("id")? },
        ty::CREATE_TOPIC => Frame::CreateTopic {
            id: b.u64("id")?,
            name: b.string("topic name")?,
            partitions: b.u32("partitions")?,
            retention_ms: b.u64("retention ms")?,
            retention_bytes: b.u64("retention bytes")?,
        },
        ty::DELETE_TOPIC => Frame::DeleteTopic {
            id: b.u64("id")?,
            name: b.string("topic name")?,
        },
        ty::LIST_TOPICS => Frame::ListTopics { id: b.u64("id")? },
        ty::DESCRIBE_TOPIC => Frame::DescribeTopic {
            id: b.u64("id")?,
            name: b.string("topic name")?,
        },
        ty::TOPICS => {
            let id = b.u64("id")?;
            let n = b.count("topic count", 2 + 8 * 3 + 4)?;
            let mut topics = Vec::with_capacity(n);
            for _ in 0..n {
                let name = b.string("topic name")?;
                let retention_ms = b.u64("retention ms")?;
                let retention_bytes = b.u64("retention bytes")?;
                let created_ms = b.u64("created")?;
                let pn = b.count("partition count", 24)?;
                let mut partitions = Vec::with_capacity(pn);
                for _ in 0..pn {
                    partitions.push(PartitionInfo {
                        start: b.u64("start")?,
                        end: b.u64("end")?,
                        bytes: b.u64("bytes")?,
                    });
                }
                topics.push(TopicInfo {
                    name,
                    retention_ms,
                    retention_bytes,
                    created_ms,
                    partitions,
                });
            }
            Frame::Topics { id, topics }
        }
        ty::PUBLISH_BATCH => {
            let seq = b.u64("seq")?;
            let topic = b.string("topic")?;
            let n = b.count("record count", 4)?;
            let mut records = Vec::with_capacity(n);
            for _ in 0..n {
                let len = b.u32("record length")? as usize;
                let bytes = b.bytes(len, "record")?;
                records.push(RawRecord::new(bytes)?);
            }
            // Optional trailing field: absent means one part.
            let mut parts = Vec::new();
            if !b.buf.is_empty() {
                let runs = b.count("part runs", 8)?;
                let mut left = records.len();
                for _ in 0..runs {
                    let repeat = b.u32("part repeat")? as usize;
                    let size = b.u32("part size")? as usize;
                    if size == 0 || repeat.saturating_mul(size) > left {
                        return Err(DecodeError::InvalidValue("publish batch parts"));
                    }
                    left -= repeat * size;
                    parts.extend(std::iter::repeat_n(size as u32, repeat));
                }
                if left != 0 {
                    return Err(DecodeError::InvalidValue("publish batch parts"));
                }
                if parts.len() == 1 {
                    parts.clear();
                }
            }
            Frame::PublishBatch {
                seq,
                topic,
                records,
                parts,
            }
        }
        ty::PUBLISH_ACK => {
            let seq = b.u64("seq")?;
            let n = b.count("ack count", 12)?;
            let mut positions = Vec::with_capacity(n);
            for _ in 0..n {
                positions.push((b.u32("partition")?, b.u64("offset")?));
            }
            let n = b.count("duplicate count", 4)?;
            let mut duplicates = Vec::with_capacity(n);
            for _ in 0..n {
                duplicates.push(b.u32("duplicate index")?);
            }
            // Optional trailing field: absent means nothing was routed.
            let mut routed = Vec::new();
            if !b.buf.is_empty() {
                let n = b.count("routed count", 6)?;
                for _ in 0..n {
                    routed.push((b.u32("routed index")?, b.string("routed topic")?));
                }
            }
            let mut refused = Vec::new();
            if !b.buf.is_empty() {
                let n = b.count("refused count", 8)?;
                for _ in 0..n {
                    let part = b.u32("refused part")?;
                    let code = ErrorCode::from_u16(b.u16("refused code")?);
                    refused.push((part, WireError::new(code, b.string("refused message")?)));
                }
            }
            Frame::PublishAck {
                seq,
                positions,
                duplicates,
                routed,
                refused,
            }
        }
        ty::SUBSCRIBE => {
            let group = b.string("group")?;
            let topic = b.string("topic")?;
            let kind = b.u8("start kind")?;
            let value = b.u64("start value")?;
            let start = match kind {
                0 => StartPosition::Earliest,
                1 => StartPosition::Latest,
                2 => StartPosition::Offset(value),
                3 => StartPosition::Timestamp(value),
                _ => return Err(DecodeError::InvalidValue("start kind")),
            };
            let credits = b.u32("credits")?;
            let auto_commit = b.flag("auto commit")?;
            let mode = match (b.u8("mode")?, b.u64("visibility")?) {
                (0, _) => SubscribeMode::Stream,
                (1, visibility_ms) => SubscribeMode::Queue { visibility_ms },
                (2, _) => {
                    let n = b.count("key count", 4)?;
                    let mut keys = Vec::with_capacity(n);
                    for _ in 0..n {
                        let len = b.u32("key length")? as usize;
                        keys.push(b.bytes(len, "key")?);
                    }
                    SubscribeMode::Feed { keys }
                }
                _ => return Err(DecodeError::InvalidValue("mode")),
            };
            Frame::Subscribe {
                group,
                topic,
                start,
                credits,
                auto_commit,
                mode,
            }
        }
        ty::SUBSCRIBED => Frame::Subscribed {
            partitions: b.u32("partitions")?,
        },
        ty::ASSIGNMENT => {
            let n = b.count("partition count", 4)?;
            let mut partitions = Vec::with_capacity(n);
            for _ in 0..n {
                partitions.push(b.u32("partition")?);
            }
            Frame::Assignment { partitions }
        }
        ty::CREDIT => Frame::Credit {
            credits: b.u32("credits")?,
        },
        ty::COMMIT => Frame::Commit {
            partition: b.u32("partition")?,
            offset: b.u64("offset")?,
        },
        ty::ADMIN_REQUEST => {
            let id = b.u64("id")?;
            let op = b.string("op")?;
            let n = b.u32("body length")? as usize;
            let body = b.bytes(n, "body")?;
            let n = b.u32("wasm length")? as usize;
            let wasm = b.bytes(n, "wasm")?;
            Frame::AdminRequest { id, op, body, wasm }
        }
        ty::ADMIN_RESPONSE => {
            let id = b.u64("id")?;
            let n = b.u32("body length")? as usize;
            Frame::AdminResponse {
                id,
                body: b.bytes(n, "body")?,
            }
        }
        ty::QUEUE_DELIVER => {
            let n = b.count("record count", 32)?;
            let mut records = Vec::with_capacity(n);
            for _ in 0..n {
                let tag = DeliveryTag {
                    partition: b.u32("partition")?,
                    offset: b.u64("offset")?,
                    attempt: b.u32("attempt")?,
                };
                let timestamp_ms = b.u64("timestamp")?;
                let len = b.u32("record length")? as usize;
                let record = RawRecord::new(b.bytes(len, "record")?)?;
                records.push(QueueDelivered {
                    tag,
                    timestamp_ms,
                    record,
                });
            }
            Frame::QueueDeliver { records }
        }
        ty::ACK => Frame::Ack {
            id: b.u64("id")?,
            items: b.tags()?,
        },
        ty::NACK => Frame::Nack {
            id: b.u64("id")?,
            items: b.tags()?,
            retryable: b.flag("retryable")?,
            code: b.string("code")?,
            message: b.string("message")?,
        },
        ty::EXTEND => Frame::Extend {
            id: b.u64("id")?,
            items: b.tags()?,
            visibility_ms: b.u64("visibility")?,
        },
        ty::DELIVER => {
            let partition = b.u32("partition")?;
            let n = b.count("record count", 20)?;
            let mut records = Vec::with_capacity(n);
            for _ in 0..n {
                let offset = b.u64("offset")?;
                let timestamp_ms = b.u64("timestamp")?;
                let len = b.u32("record length")? as usize;
                let record = RawRecord::new(b.bytes(len, "record")?)?;
                records.push(Delivered {
                    offset,
                    timestamp_ms,
                    record,
                });
            }
            Frame::Deliver { partition, records }
        }
        other => return Err(DecodeError::UnknownType(other)),
    };
    b.finish()?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn raw_record() -> impl Strategy<Value = RawRecord> {
        (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
            proptest::collection::vec(
                ("[a-z]{0,8}", proptest::collection::vec(any::<u8>(), 0..8)),
                0..3,
            ),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(k, h, p)| {
                let mut r = Record::new(p);
                r.key = k.map(Bytes::from);
                r.headers = h.into_iter().map(|(n, v)| (n, Bytes::from(v))).collect();
                r.to_raw()
            })
    }

    fn start() -> impl Strategy<Value = StartPosition> {
        prop_oneof![
            Just(StartPosition::Earliest),
            Just(StartPosition::Latest),
            any::<u64>().prop_map(StartPosition::Offset),
            any::<u64>().prop_map(StartPosition::Timestamp),
        ]
    }

    fn tag() -> impl Strategy<Value = DeliveryTag> {
        (any::<u32>(), any::<u64>(), any::<u32>()).prop_map(|(partition, offset, attempt)| {
            DeliveryTag {
                partition,
                offset,
                attempt,
            }
        })
    }

    fn topic_info() -> impl Strategy<Value = TopicInfo> {
        (
            "[a-z.]{1,10}",
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u64>()), 0..4),
        )
            .prop_map(
                |(name, retention_ms, retention_bytes, created_ms, p)| TopicInfo {
                    name,
                    retention_ms,
                    retention_bytes,
                    created_ms,
                    partitions: p
                        .into_iter()
                        .map(|(start, end, bytes)| PartitionInfo { start, end, bytes })
                        .collect(),
                },
            )
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                any::<u8>(),
                any::<u8>(),
                ".{0,10}",
                proptest::option::of(".{0,50}")
            )
                .prop_map(|(a, b, c, t)| Frame::Hello {
                    min_version: a,
                    max_version: b,
                    client: c,
                    token: t,
                }),
            (
                any::<u8>(),
                ".{0,10}",
                any::<u32>(),
                any::<u32>(),
                proptest::collection::vec(
                    (any::<std::net::IpAddr>(), any::<u16>())
                        .prop_map(|(ip, port)| std::net::SocketAddr::new(ip, port)),
                    0..4
                ),
                1..5u32
            )
                .prop_map(|(v, s, m, f, c, g)| Frame::HelloOk {
                    version: v,
                    server: s,
                    max_message_bytes: m,
                    max_frame_bytes: f,
                    cluster: c,
                    groups: g,
                }),
            (any::<u64>(), any::<u16>(), ".{0,20}").prop_map(|(id, c, m)| Frame::Error {
                id,
                code: ErrorCode::from_u16(c),
                message: m
            }),
            any::<u64>().prop_map(|id| Frame::Ok { id }),
            (
                any::<u64>(),
                "[a-z]{0,10}",
                any::<u32>(),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(id, name, partitions, retention_ms, retention_bytes)| {
                    Frame::CreateTopic {
                        id,
                        name,
                        partitions,
                        retention_ms,
                        retention_bytes,
                    }
                }),
            (any::<u64>(), "[a-z]{0,10}").prop_map(|(id, name)| Frame::DeleteTopic { id, name }),
            any::<u64>().prop_map(|id| Frame::ListTopics { id }),
            (any::<u64>(), "[a-z]{0,10}").prop_map(|(id, name)| Frame::DescribeTopic { id, name }),
            (any::<u64>(), proptest::collection::vec(topic_info(), 0..3))
                .prop_map(|(id, topics)| Frame::Topics { id, topics }),
            (
                any::<u64>(),
                "[a-z]{0,10}",
                proptest::collection::vec(raw_record(), 0..5)
            )
                .prop_map(|(seq, topic, records)| {
                    // Parts from the seq's low bits: one part, or the
                    // records split 1 + rest, or one record per part.
                    let n = records.len() as u32;
                    let parts = match seq % 3 {
                        1 if n >= 2 => vec![1, n - 1],
                        2 if n >= 2 => vec![1; n as usize],
                        _ => Vec::new(),
                    };
                    Frame::PublishBatch {
                        seq,
                        topic,
                        records,
                        parts,
                    }
                }),
            (
                any::<u64>(),
                proptest::collection::vec((any::<u32>(), any::<u64>()), 0..5),
                proptest::collection::vec(any::<u32>(), 0..3),
                proptest::collection::vec((any::<u32>(), "[a-z.]{1,10}"), 0..3),
                proptest::collection::vec((any::<u32>(), any::<u16>(), ".{0,20}"), 0..3)
            )
                .prop_map(|(seq, positions, duplicates, routed, refused)| {
                    Frame::PublishAck {
                        seq,
                        positions,
                        duplicates,
                        routed,
                        refused: refused
                            .into_iter()
                            .map(|(i, c, m)| (i, WireError::new(ErrorCode::from_u16(c), m)))
                            .collect(),
                    }
                }),
            (
                "[a-z]{0,10}",
                "[a-z]{0,10}",
                start(),
                any::<u32>(),
                any::<bool>(),
                prop_oneof![
                    Just(None),
                    any::<u64>().prop_map(|v| Some(Err(v))),
                    proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..6), 0..3)
                        .prop_map(|k| Some(Ok(k))),
                ]
            )
                .prop_map(|(group, topic, start, credits, auto_commit, q)| {
                    Frame::Subscribe {
                        group,
                        topic,
                        start,
                        credits,
                        auto_commit,
                        mode: match q {
                            None => SubscribeMode::Stream,
                            Some(Err(visibility_ms)) => SubscribeMode::Queue { visibility_ms },
                            Some(Ok(keys)) => SubscribeMode::Feed {
                                keys: keys.into_iter().map(Bytes::from).collect(),
                            },
                        },
                    }
                }),
            any::<u32>().prop_map(|partitions| Frame::Subscribed { partitions }),
            proptest::collection::vec(any::<u32>(), 0..6)
                .prop_map(|partitions| Frame::Assignment { partitions }),
            any::<u32>().prop_map(|credits| Frame::Credit { credits }),
            (
                any::<u64>(),
                "[a-z]{0,8}",
                proptest::collection::vec(any::<u8>(), 0..40),
                proptest::collection::vec(any::<u8>(), 0..40)
            )
                .prop_map(|(id, op, body, wasm)| Frame::AdminRequest {
                    id,
                    op,
                    body: body.into(),
                    wasm: wasm.into()
                }),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(id, body)| {
                Frame::AdminResponse {
                    id,
                    body: body.into(),
                }
            }),
            (any::<u32>(), any::<u64>())
                .prop_map(|(partition, offset)| Frame::Commit { partition, offset }),
            proptest::collection::vec((tag(), any::<u64>(), raw_record()), 0..4).prop_map(|r| {
                Frame::QueueDeliver {
                    records: r
                        .into_iter()
                        .map(|(tag, timestamp_ms, record)| QueueDelivered {
                            tag,
                            timestamp_ms,
                            record,
                        })
                        .collect(),
                }
            }),
            (any::<u64>(), proptest::collection::vec(tag(), 0..4))
                .prop_map(|(id, items)| Frame::Ack { id, items }),
            (
                any::<u64>(),
                proptest::collection::vec(tag(), 0..4),
                any::<bool>(),
                "[a-z]{0,8}",
                ".{0,20}"
            )
                .prop_map(|(id, items, retryable, code, message)| Frame::Nack {
                    id,
                    items,
                    retryable,
                    code,
                    message
                }),
            (
                any::<u64>(),
                proptest::collection::vec(tag(), 0..4),
                any::<u64>()
            )
                .prop_map(|(id, items, visibility_ms)| Frame::Extend {
                    id,
                    items,
                    visibility_ms
                }),
            (
                any::<u32>(),
                proptest::collection::vec((any::<u64>(), any::<u64>(), raw_record()), 0..4)
            )
                .prop_map(|(partition, r)| Frame::Deliver {
                    partition,
                    records: r
                        .into_iter()
                        .map(|(offset, timestamp_ms, record)| Delivered {
                            offset,
                            timestamp_ms,
                            record
                        })
                        .collect()
                }),
        ]
    }

    proptest! {
        #[test]
        fn every_frame_roundtrips(frames in proptest::collection::vec(frame(), 1..6)) {
            let mut buf = BytesMut::new();
            for f in &frames {
                f.encode(&mut buf);
            }
            for f in &frames {
                let got = decode(&mut buf, 1 << 20).unwrap().unwrap();
                prop_assert_eq!(&got, f);
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn every_prefix_is_incomplete_not_an_error(f in frame()) {
            let full = f.to_bytes();
            for cut in 0..full.len() {
                let mut buf = BytesMut::from(&full[..cut]);
                prop_assert_eq!(decode(&mut buf, 1 << 20), Ok(None));
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut buf, 1 << 16) {}
        }

        #[test]
        fn decoding_mutated_frames_never_panics(f in frame(), idx in any::<usize>(), val in any::<u8>()) {
            let mut bytes = f.to_bytes().to_vec();
            let i = idx % bytes.len();
            bytes[i] = val;
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode(&mut buf, 1 << 20);
        }
    }

    #[test]
    fn documented_example_bytes_match() {
        // The example in docs/protocol.md.
        let f = Frame::PublishBatch {
            seq: 1,
            topic: "orders".into(),
            records: vec![Record::new("hi").with_key("k").to_raw()],
            parts: Vec::new(),
        };
        let hex: String = f.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "0000002220000000000000000100066f72646572730000000100000009000000016b00006869"
        );
    }

    #[test]
    fn oversized_length_prefix_is_rejected_before_buffering() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(matches!(
            decode(&mut buf, 1024),
            Err(DecodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn batch_writer_matches_frame_encoding() {
        let recs = vec![
            Record::new("a").with_key("k"),
            Record::new("bb").with_header("h", "v"),
        ];
        let mut buf = BytesMut::new();
        let mut w = PublishBatchWriter::begin(&mut buf, 7, "t");
        for r in &recs {
            w.push(&mut buf, r);
        }
        w.finish(&mut buf);
        let expected = Frame::PublishBatch {
            seq: 7,
            topic: "t".into(),
            records: recs.iter().map(Record::to_raw).collect(),
            parts: Vec::new(),
        };
        assert_eq!(&buf[..], &expected.to_bytes()[..]);
    }

    #[test]
    fn an_ack_refusing_a_part_with_an_empty_message_roundtrips() {
        // Found by the property test: the smallest refused entry is 8 bytes.
        let f = Frame::PublishAck {
            seq: 0,
            positions: vec![],
            duplicates: vec![],
            routed: vec![],
            refused: vec![(0, WireError::new(ErrorCode::from_u16(0), ""))],
        };
        let mut buf = BytesMut::from(&f.to_bytes()[..]);
        assert_eq!(decode(&mut buf, 1 << 20).unwrap(), Some(f));
    }

    #[test]
    fn batch_parts_travel_run_length_encoded_and_must_add_up() {
        let recs: Vec<RawRecord> = (0..6).map(|i| Record::new(vec![i]).to_raw()).collect();
        let mut buf = BytesMut::new();
        let mut w = PublishBatchWriter::begin(&mut buf, 3, "t");
        for r in &recs {
            w.push(&mut buf, &r.to_record());
        }
        w.finish_parts(&mut buf, [1, 1, 1, 1, 2]);
        let parts = Frame::PublishBatch {
            seq: 3,
            topic: "t".into(),
            records: recs.clone(),
            parts: vec![1, 1, 1, 1, 2],
        };
        assert_eq!(&buf[..], &parts.to_bytes()[..]);
        // Two runs: 4 parts of 1, 1 part of 2.
        let one_part = Frame::PublishBatch {
            seq: 3,
            topic: "t".into(),
            records: recs.clone(),
            parts: Vec::new(),
        };
        assert_eq!(buf.len(), one_part.to_bytes().len() + 4 + 2 * 8);
        assert_eq!(decode(&mut buf, 1 << 20).unwrap(), Some(parts));

        // Parts that claim more (or fewer) records than the batch holds.
        for bad in [[2u32, 5], [1, 4]] {
            let mut buf = BytesMut::new();
            let mut w = PublishBatchWriter::begin(&mut buf, 3, "t");
            for r in &recs {
                w.push(&mut buf, &r.to_record());
            }
            w.finish_parts(&mut buf, bad);
            assert!(matches!(
                decode(&mut buf, 1 << 20),
                Err(DecodeError::InvalidValue("publish batch parts"))
            ));
        }
    }

    #[test]
    fn deliver_header_matches_frame_encoding() {
        let rec = Record::new("x").to_raw();
        let mut body = BytesMut::new();
        put_delivered(&mut body, 3, 9, rec.as_bytes());
        let mut buf = BytesMut::new();
        put_deliver_header(&mut buf, 2, 1, body.len());
        buf.extend_from_slice(&body);
        let expected = Frame::Deliver {
            partition: 2,
            records: vec![Delivered {
                offset: 3,
                timestamp_ms: 9,
                record: rec,
            }],
        };
        assert_eq!(&buf[..], &expected.to_bytes()[..]);
    }
}
