//! Subscriptions: a stream of messages with credit-based flow control.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::{mpsc, watch};

use super::ClientError;
use super::connection::{Client, Link, Shared};
use super::inbox::{Inbox, InboxSender, inbox};
use switchyard_protocol::transport::FrameReader;
use switchyard_protocol::{Frame, RawRecord, StartPosition, WireError};

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
/// [`Subscription::close`]) leaves the group. It survives reconnects (see
/// [`Client`]'s section on them) and never yields the same partition and
/// offset twice.
pub struct Subscription {
    rx: Inbox<Message>,
    ctl: mpsc::UnboundedSender<Frame>,
    consumed: u32,
    refill_at: u32,
    assignment: watch::Receiver<Vec<u32>>,
    partitions: u32,
    driver: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Subscribes to a topic. Fails at once for an unknown topic or a bad
    /// group name.
    pub async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, ClientError> {
        let at = self.at(&opts.topic, None).await?;
        if !std::ptr::eq(at, self) {
            return Box::pin(at.subscribe(opts)).await;
        }
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
        // An anonymous subscription resumes where it was in each partition;
        // for one that starts at the end, that is the end as of now.
        let anonymous = opts.group.is_empty() && opts.follow.is_none();
        let mut next = HashMap::new();
        if anonymous && opts.start == StartPosition::Latest {
            let t = self.describe_topic(&opts.topic).await?;
            next = t
                .partitions
                .iter()
                .enumerate()
                .map(|(p, info)| (p as u32, info.end))
                .collect();
        }
        let (link, (send, reader, partitions)) = open_first(&self.shared, &f).await?;
        let (tx, rx) = inbox();
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let (assign_tx, assignment) = watch::channel(Vec::new());
        let handler = StreamHandler {
            subscribe: f,
            anonymous,
            start: opts.start,
            partitions,
            next,
            tx,
            assignment: assign_tx,
            topic: opts.topic.as_str().into(),
        };
        let driver = tokio::spawn(drive(
            self.shared.clone(),
            link,
            send,
            reader,
            ctl_rx,
            handler,
        ));
        Ok(Subscription {
            rx,
            ctl,
            consumed: 0,
            refill_at: (opts.prefetch / 2).max(1),
            assignment,
            partitions,
            driver,
        })
    }
}

/// Opens a new subscription: as [`open_subscription`], on the current
/// connection, and on the next one if that connection is lost meanwhile
/// (a leader killed or handing over as the subscription opens), as an open
/// subscription resumes on it. The router's refusals are returned; so is
/// the loss where the client does not reconnect.
pub(crate) async fn open_first(
    shared: &Arc<Shared>,
    subscribe: &Frame,
) -> Result<(Arc<Link>, Opened), ClientError> {
    loop {
        let link = shared.link().await?;
        match open_subscription(&link, subscribe).await {
            Ok(opened) => return Ok((link, opened)),
            Err(e @ ClientError::ConnectionLost(_)) if shared.reconnects() => {
                tracing::debug!(error = %e, "subscribing failed as the connection was lost; again on the next");
                if link.conn.close_reason().is_some() {
                    shared.link_lost(link.generation).await;
                } else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// An opened subscription stream: its two halves and the topic's
/// partition count.
pub(crate) type Opened = (quinn::SendStream, FrameReader<quinn::RecvStream>, u32);

/// Opens a subscription stream: sends `subscribe` and waits for
/// `Subscribed` (returning the partition count) or the router's error.
pub(crate) async fn open_subscription(
    link: &Link,
    subscribe: &Frame,
) -> Result<Opened, ClientError> {
    let lost = |e: &dyn std::fmt::Display| ClientError::ConnectionLost(e.to_string());
    let (mut send, recv) = link.conn.open_bi().await.map_err(|e| lost(&e))?;
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

/// What a subscription does with the router's frames, and how it
/// subscribes again after a reconnect.
pub(crate) trait Handler: Send + 'static {
    /// Takes one frame from the router.
    fn frame(&mut self, f: Frame) -> Flow;
    /// The `Subscribe` frame that resumes this subscription.
    fn resubscribe(&self) -> Frame;
    /// The stream was lost and a new one is being opened.
    fn lost(&mut self) {}
    /// The subscription ended: by leaving (`None`) or with an error.
    fn ended(&mut self, e: Option<ClientError>);
}

/// What to do after a frame.
pub(crate) enum Flow {
    Continue,
    /// The consumer is gone: stop without a word.
    Stop,
    /// End the subscription with this error.
    Fail(ClientError),
}

/// Runs a subscription stream: the router's frames to `handler`, the
/// consumer's frames (credits, commits, acks) from `ctl` to the router, in
/// order. A lost stream is opened again on the next connection when the
/// client reconnects. When `ctl` closes, finishes the stream and reads on
/// until the router ends it (so it has received everything, commits
/// included).
pub(crate) async fn drive<H: Handler>(
    shared: Arc<Shared>,
    mut link: Arc<Link>,
    mut send: quinn::SendStream,
    mut reader: FrameReader<quinn::RecvStream>,
    mut ctl: mpsc::UnboundedReceiver<Frame>,
    mut handler: H,
) {
    let mut leaving = false;
    let mut buf = bytes::BytesMut::new();
    loop {
        let lost = loop {
            tokio::select! {
                f = reader.next() => match f {
                    Ok(Some(f)) => match handler.frame(f) {
                        Flow::Continue => {}
                        Flow::Stop => return,
                        Flow::Fail(e) => return handler.ended(Some(e)),
                    },
                    Ok(None) if leaving => return handler.ended(None),
                    Ok(None) => break ClientError::ConnectionLost(
                        "subscription stream closed by the router".into(),
                    ),
                    Err(e) => break ClientError::ConnectionLost(e.to_string()),
                },
                c = ctl.recv(), if !leaving => match c {
                    Some(f) => {
                        f.encode(&mut buf);
                        while let Ok(f) = ctl.try_recv() {
                            f.encode(&mut buf);
                        }
                        let written = send.write_all(&buf).await;
                        buf.clear();
                        if let Err(e) = written {
                            break ClientError::ConnectionLost(e.to_string());
                        }
                    }
                    None => {
                        leaving = true;
                        let _ = send.finish();
                    }
                },
            }
        };
        if leaving || !shared.reconnects() {
            return handler.ended((!leaving).then_some(lost));
        }
        handler.lost();
        loop {
            if link.conn.close_reason().is_some() {
                shared.link_lost(link.generation).await;
            }
            link = match shared.link().await {
                Ok(l) => l,
                Err(e) => return handler.ended(Some(e)),
            };
            match open_subscription(&link, &handler.resubscribe()).await {
                Ok((s, r, _)) => {
                    (send, reader) = (s, r);
                    break;
                }
                Err(e @ ClientError::Server(_)) => return handler.ended(Some(e)),
                Err(e) => {
                    tracing::debug!(error = %e, "resubscribing failed; trying again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// A stream subscription's side of [`drive`].
struct StreamHandler {
    subscribe: Frame,
    anonymous: bool,
    start: StartPosition,
    partitions: u32,
    /// Per partition, the offset the next record must reach: records
    /// below it were delivered before a reconnect.
    next: HashMap<u32, u64>,
    tx: InboxSender<Message>,
    assignment: watch::Sender<Vec<u32>>,
    topic: Arc<str>,
}

impl StreamHandler {
    /// Where a partition that delivered nothing yet starts.
    fn initial(&self) -> u64 {
        match self.start {
            StartPosition::Offset(o) => o,
            _ => 0,
        }
    }
}

impl Handler for StreamHandler {
    fn frame(&mut self, f: Frame) -> Flow {
        match f {
            Frame::Deliver { partition, records } => {
                let (floor, untouched) = match self.next.get(&partition) {
                    Some(&n) => (n, false),
                    None => (self.initial(), true),
                };
                let batch: Vec<Message> = records
                    .into_iter()
                    .filter(|d| d.offset >= floor)
                    .filter(|d| match (untouched, self.start) {
                        // Resumed from an offset before this partition's
                        // first record at or after the start time.
                        (true, StartPosition::Timestamp(t)) => d.timestamp_ms >= t,
                        _ => true,
                    })
                    .map(|d| Message {
                        topic: self.topic.clone(),
                        partition,
                        offset: d.offset,
                        timestamp_ms: d.timestamp_ms,
                        record: d.record,
                    })
                    .collect();
                if let Some(last) = batch.last() {
                    self.next.insert(partition, last.offset + 1);
                }
                if !self.tx.send(batch) {
                    return Flow::Stop;
                }
                Flow::Continue
            }
            Frame::Assignment { partitions } => {
                self.assignment.send_replace(partitions);
                Flow::Continue
            }
            Frame::Error { code, message, .. } => {
                Flow::Fail(ClientError::Server(WireError::new(code, message)))
            }
            other => Flow::Fail(ClientError::Protocol(format!(
                "unexpected frame on subscription: {other:?}"
            ))),
        }
    }

    fn resubscribe(&self) -> Frame {
        let mut f = self.subscribe.clone();
        if self.anonymous
            && !self.next.is_empty()
            && let Frame::Subscribe { start, .. } = &mut f
        {
            // From the lowest next offset over the partitions; records
            // below a partition's own next offset are skipped above.
            let missing = (self.next.len() as u32) < self.partitions;
            let lowest = self
                .next
                .values()
                .copied()
                .chain(missing.then(|| self.initial()))
                .min()
                .unwrap_or(0);
            *start = StartPosition::Offset(lowest);
        }
        f
    }

    fn ended(&mut self, e: Option<ClientError>) {
        if let Some(e) = e {
            self.tx.fail(e);
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
        let Subscription { ctl, driver, .. } = self;
        drop(ctl);
        let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
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
