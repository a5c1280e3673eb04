//! Subscriptions: a stream of messages with credit-based flow control.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use tokio::sync::{mpsc, watch};

use super::ClientError;
use super::connection::Client;
use super::inbox::{Inbox, InboxSender, inbox};
use switchyard_protocol::{Frame, RawRecord, StartPosition, WireError};
use switchyard_protocol::transport::FrameReader;

/// How to subscribe.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// Topic to read.
    pub topic: String,
    /// Consumer group. Members of a group split the partitions and share
    /// committed offsets. Empty: an anonymous subscription that reads every
    /// partition and commits nothing.
    pub group: String,
    /// Where to start in partitions where the group has no committed offset.
    pub start: StartPosition,
    /// Records the router may send ahead of consumption.
    pub prefetch: u32,
    /// Commit each record's offset once it is delivered (at-most-once per
    /// group across failures). Off: call [`Subscription::commit`].
    pub auto_commit: bool,
    /// Follow these keys as the feed named by `group` (see
    /// [`SubscribeOptions::follow`]); `None`: a stream subscription.
    pub follow: Option<Vec<Bytes>>,
}

impl SubscribeOptions {
    /// Anonymous, from the earliest record, prefetch 1024, auto-commit on.
    pub fn new(topic: impl Into<String>) -> Self {
        SubscribeOptions {
            topic: topic.into(),
            group: String::new(),
            start: StartPosition::Earliest,
            prefetch: 1024,
            auto_commit: true,
            follow: None,
        }
    }

    /// Reads the feed named by the group instead: the records of `keys`
    /// appended from now on, in per-key order (the topic must have a
    /// fan-out default). Subscribing again with other keys changes the
    /// follow set; positions are kept by the router as records are sent.
    pub fn follow<K: Into<Bytes>>(mut self, keys: impl IntoIterator<Item = K>) -> Self {
        self.follow = Some(keys.into_iter().map(Into::into).collect());
        self
    }

    /// Joins consumer group `group`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// Sets the start position.
    pub fn start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Sets the prefetch window.
    pub fn prefetch(mut self, n: u32) -> Self {
        self.prefetch = n.max(1);
        self
    }

    /// Turns auto-commit on or off.
    pub fn auto_commit(mut self, on: bool) -> Self {
        self.auto_commit = on;
        self
    }
}

/// A delivered record. Its fields share one buffer with the frame it came in.
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
    /// Append time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The record.
    pub record: RawRecord,
}

impl Message {
    /// The key, if any.
    pub fn key(&self) -> Option<Bytes> {
        self.record.key()
    }
    /// The payload.
    pub fn payload(&self) -> Bytes {
        self.record.payload()
    }
    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<Bytes> {
        self.record.header(name)
    }
    /// All headers, in order.
    pub fn headers(&self) -> Vec<(String, Bytes)> {
        self.record
            .headers()
            .map(|(n, v)| (n.to_string(), v))
            .collect()
    }
}

/// A live subscription: a [`Stream`] of messages. Dropping it (or calling
/// [`Subscription::close`]) leaves the group.
pub struct Subscription {
    rx: Inbox<Message>,
    ctl: mpsc::UnboundedSender<Frame>,
    consumed: u32,
    refill_at: u32,
    assignment: watch::Receiver<Vec<u32>>,
    partitions: u32,
    writer: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Subscribes to a topic. Fails at once for an unknown topic or a bad
    /// group name.
    pub async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, ClientError> {
        let f = Frame::Subscribe {
            group: opts.group.clone(),
            topic: opts.topic.clone(),
            start: opts.start,
            credits: opts.prefetch,
            auto_commit: opts.auto_commit,
            mode: match &opts.follow {
                None => switchyard_protocol::SubscribeMode::Stream,
                Some(keys) => switchyard_protocol::SubscribeMode::Feed { keys: keys.clone() },
            },
        };
        let (send, reader, partitions) = self.open_subscription(f).await?;
        let (tx, rx) = inbox();
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let (assign_tx, assignment) = watch::channel(Vec::new());
        let topic: Arc<str> = opts.topic.as_str().into();
        tokio::spawn(read_deliveries(reader, tx, assign_tx, topic));
        let writer = tokio::spawn(write_control(send, ctl_rx));
        Ok(Subscription {
            rx,
            ctl,
            consumed: 0,
            refill_at: (opts.prefetch / 2).max(1),
            assignment,
            partitions,
            writer,
        })
    }
}

impl Client {
    /// Opens a subscription stream: sends `subscribe` and waits for
    /// `Subscribed` (returning the partition count) or the router's error.
    pub(super) async fn open_subscription(
        &self,
        subscribe: Frame,
    ) -> Result<(quinn::SendStream, FrameReader<quinn::RecvStream>, u32), ClientError> {
        let lost = |e: &dyn std::fmt::Display| ClientError::ConnectionLost(e.to_string());
        let (mut send, recv) = self.conn.open_bi().await.map_err(|e| lost(&e))?;
        send.write_all(&subscribe.to_bytes())
            .await
            .map_err(|e| lost(&e))?;
        let mut reader = FrameReader::new(recv, 64 << 20);
        match reader.next().await {
            Ok(Some(Frame::Subscribed { partitions })) => Ok((send, reader, partitions)),
            Ok(Some(Frame::Error { code, message, .. })) => {
                Err(ClientError::Server(WireError::new(code, message)))
            }
            Ok(Some(other)) => Err(ClientError::Protocol(format!(
                "expected Subscribed, got {other:?}"
            ))),
            Ok(None) => Err(ClientError::ConnectionLost(
                "subscription stream closed".into(),
            )),
            Err(e) => Err(lost(&e)),
        }
    }
}

impl Subscription {
    /// Commits: the group has processed `partition` up to, not including, `offset`.
    pub fn commit(&self, partition: u32, offset: u64) -> Result<(), ClientError> {
        self.ctl
            .send(Frame::Commit { partition, offset })
            .map_err(|_| ClientError::ConnectionLost("subscription closed".into()))
    }

    /// Commits everything up to and including `msg`.
    pub fn commit_message(&self, msg: &Message) -> Result<(), ClientError> {
        self.commit(msg.partition, msg.offset + 1)
    }

    /// Partitions this member holds now.
    pub fn assignment(&self) -> Vec<u32> {
        self.assignment.borrow().clone()
    }

    /// Waits until the assignment changes, and returns it.
    pub async fn assignment_changed(&mut self) -> Vec<u32> {
        let _ = self.assignment.changed().await;
        self.assignment.borrow_and_update().clone()
    }

    /// Messages received from the router but not yet taken from the stream.
    pub fn pending_len(&self) -> usize {
        self.rx.len()
    }

    /// The topic's partition count.
    pub fn partition_count(&self) -> u32 {
        self.partitions
    }

    /// Asks the router to stop delivering and leave the group, keeping the
    /// stream open: messages already sent still arrive, then the stream
    /// ends. With auto-commit, reading to the end this way hands the
    /// partitions over with nothing lost and nothing delivered twice.
    pub fn leave(&mut self) {
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.ctl, closed));
    }

    /// Leaves the group: sends any pending commits, waits until the router
    /// has received them, and ends the subscription. The router then hands
    /// this member's partitions to the others. (Dropping a subscription
    /// leaves too, without waiting.)
    pub async fn close(self) {
        let Subscription { ctl, writer, .. } = self;
        drop(ctl);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
    }
}

impl Stream for Subscription {
    type Item = Result<Message, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.rx.poll_next(cx);
        if let Poll::Ready(Some(Ok(_))) = &item {
            self.consumed += 1;
            if self.consumed >= self.refill_at {
                let credits = std::mem::take(&mut self.consumed);
                let _ = self.ctl.send(Frame::Credit { credits });
            }
        }
        item
    }
}

async fn read_deliveries(
    mut reader: FrameReader<quinn::RecvStream>,
    tx: InboxSender<Message>,
    assignment: watch::Sender<Vec<u32>>,
    topic: Arc<str>,
) {
    loop {
        match reader.next().await {
            Ok(Some(Frame::Deliver { partition, records })) => {
                let batch = records
                    .into_iter()
                    .map(|d| Message {
                        topic: topic.clone(),
                        partition,
                        offset: d.offset,
                        timestamp_ms: d.timestamp_ms,
                        record: d.record,
                    })
                    .collect();
                if !tx.send(batch) {
                    return;
                }
            }
            Ok(Some(Frame::Assignment { partitions })) => {
                assignment.send_replace(partitions);
            }
            Ok(Some(Frame::Error { code, message, .. })) => {
                tx.fail(ClientError::Server(WireError::new(code, message)));
                return;
            }
            Ok(Some(other)) => {
                tx.fail(ClientError::Protocol(format!(
                    "unexpected frame on subscription: {other:?}"
                )));
                return;
            }
            Ok(None) => return,
            Err(e) => {
                tx.fail(ClientError::ConnectionLost(e.to_string()));
                return;
            }
        }
    }
}

/// Writes a subscriber's frames (credits, commits, acks) in order; when the
/// sender side is dropped, finishes the stream and waits until the router
/// has received everything.
pub(super) async fn write_control(
    mut send: quinn::SendStream,
    mut rx: mpsc::UnboundedReceiver<Frame>,
) {
    let mut buf = bytes::BytesMut::new();
    while let Some(f) = rx.recv().await {
        f.encode(&mut buf);
        while let Ok(f) = rx.try_recv() {
            f.encode(&mut buf);
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
    let _ = send.finish();
    // Resolves once the router has received everything, commits included.
    let _ = send.stopped().await;
}
