//! Queue consumers: compete with the other members of a group for
//! individual messages, and ack, nack or extend each one.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::{mpsc, oneshot};

use super::ClientError;
use super::connection::Client;
use super::inbox::{Inbox, InboxSender, inbox};
use super::subscribe::write_control;
use switchyard_protocol::{DeliveryTag, Frame, RawRecord, StartPosition, SubscribeMode, WireError};
use switchyard_protocol::transport::FrameReader;

/// How to consume a topic as a queue.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// Topic to read.
    pub topic: String,
    /// Queue group: members share its messages; required.
    pub group: String,
    /// Manual acks: most unacknowledged messages held at once. Auto-ack:
    /// messages the router may send ahead of consumption.
    pub prefetch: u32,
    /// How long a delivered message stays hidden from other members
    /// before it is delivered again.
    pub visibility: Duration,
    /// Settle each message as soon as the router sends it (at most once).
    pub auto_ack: bool,
    /// Where a new group starts.
    pub start: StartPosition,
}

impl QueueOptions {
    /// Group `group` on `topic`: prefetch 256, visibility 30 s, manual acks,
    /// a new group starting at the earliest record.
    pub fn new(topic: impl Into<String>, group: impl Into<String>) -> Self {
        QueueOptions {
            topic: topic.into(),
            group: group.into(),
            prefetch: 256,
            visibility: Duration::from_secs(30),
            auto_ack: false,
            start: StartPosition::Earliest,
        }
    }

    /// Sets the prefetch.
    pub fn prefetch(mut self, n: u32) -> Self {
        self.prefetch = n.max(1);
        self
    }

    /// Sets the visibility timeout.
    pub fn visibility(mut self, d: Duration) -> Self {
        self.visibility = d;
        self
    }

    /// Turns auto-ack on or off.
    pub fn auto_ack(mut self, on: bool) -> Self {
        self.auto_ack = on;
        self
    }

    /// Sets where a new group starts.
    pub fn start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }
}

/// A message delivered by a queue.
#[derive(Debug, Clone)]
pub struct QueueMessage {
    /// Topic.
    pub topic: Arc<str>,
    /// Which delivery this is: pass it back to ack, nack or extend.
    pub tag: DeliveryTag,
    /// Append time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The record.
    pub record: RawRecord,
}

impl QueueMessage {
    /// Delivery attempt: 1 the first time, then one more per redelivery.
    pub fn attempt(&self) -> u32 {
        self.tag.attempt
    }
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
}

/// Requests awaiting the router's answer. Once the stream has ended,
/// `ended` says why, and a new request fails at once instead of waiting
/// for an answer that can no longer come.
#[derive(Default)]
struct Pending {
    map: HashMap<u64, oneshot::Sender<Result<(), ClientError>>>,
    ended: Option<ClientError>,
}

type Waiters = Arc<Mutex<Pending>>;

/// A live queue consumer: a [`Stream`] of messages. Dropping it (or
/// [`QueueConsumer::close`]) leaves the group; messages it had not acked
/// are delivered to other members at once.
pub struct QueueConsumer {
    rx: Inbox<QueueMessage>,
    ctl: mpsc::UnboundedSender<Frame>,
    waiters: Waiters,
    next_id: AtomicU64,
    auto_ack: bool,
    consumed: u32,
    refill_at: u32,
    writer: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Joins a queue group. Fails at once for an unknown topic or a
    /// missing group name.
    pub async fn subscribe_queue(&self, opts: QueueOptions) -> Result<QueueConsumer, ClientError> {
        let f = Frame::Subscribe {
            group: opts.group.clone(),
            topic: opts.topic.clone(),
            start: opts.start,
            credits: opts.prefetch,
            auto_commit: opts.auto_ack,
            mode: SubscribeMode::Queue {
                visibility_ms: opts.visibility.as_millis() as u64,
            },
        };
        let (send, reader, _) = self.open_subscription(f).await?;
        let (tx, rx) = inbox();
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let waiters: Waiters = Arc::default();
        let topic: Arc<str> = opts.topic.as_str().into();
        tokio::spawn(read_queue(reader, tx, waiters.clone(), topic));
        let writer = tokio::spawn(write_control(send, ctl_rx));
        Ok(QueueConsumer {
            rx,
            ctl,
            waiters,
            next_id: AtomicU64::new(1),
            auto_ack: opts.auto_ack,
            consumed: 0,
            refill_at: (opts.prefetch / 2).max(1),
            writer,
        })
    }
}

impl QueueConsumer {
    async fn request(&self, make: impl FnOnce(u64) -> Frame) -> Result<(), ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut w = self.waiters.lock().expect("waiters lock");
            if let Some(e) = &w.ended {
                return Err(e.clone());
            }
            w.map.insert(id, tx);
        }
        if self.ctl.send(make(id)).is_err() {
            self.waiters.lock().expect("waiters lock").map.remove(&id);
            return Err(ClientError::ConnectionLost("queue consumer closed".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(ClientError::ConnectionLost("queue stream ended".into())))
    }

    /// Acknowledges a message: it is settled and never delivered again.
    pub async fn ack(&self, msg: &QueueMessage) -> Result<(), ClientError> {
        self.ack_many(&[msg.tag]).await
    }

    /// Acknowledges several deliveries in one request. Valid ones are
    /// settled even if the error reports others as unknown.
    pub async fn ack_many(&self, tags: &[DeliveryTag]) -> Result<(), ClientError> {
        let items = tags.to_vec();
        self.request(|id| Frame::Ack { id, items }).await
    }

    /// Reports that processing failed. The topic's retry policy decides
    /// when it is delivered again, or dead-letters it (at once if
    /// `retryable` is false under the default policy).
    pub async fn nack(
        &self,
        msg: &QueueMessage,
        retryable: bool,
        code: &str,
        message: &str,
    ) -> Result<(), ClientError> {
        let items = vec![msg.tag];
        self.request(|id| Frame::Nack {
            id,
            items,
            retryable,
            code: code.to_string(),
            message: message.to_string(),
        })
        .await
    }

    /// Keeps a message hidden for `visibility` more, from now.
    pub async fn extend(
        &self,
        msg: &QueueMessage,
        visibility: Duration,
    ) -> Result<(), ClientError> {
        let items = vec![msg.tag];
        self.request(|id| Frame::Extend {
            id,
            items,
            visibility_ms: visibility.as_millis() as u64,
        })
        .await
    }

    /// Messages received but not yet taken from the stream.
    pub fn pending_len(&self) -> usize {
        self.rx.len()
    }

    /// Leaves the group after the router has received every request sent.
    pub async fn close(self) {
        let QueueConsumer { ctl, writer, .. } = self;
        drop(ctl);
        let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    }
}

impl Stream for QueueConsumer {
    type Item = Result<QueueMessage, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.rx.poll_next(cx);
        if self.auto_ack
            && let Poll::Ready(Some(Ok(_))) = &item
        {
            self.consumed += 1;
            if self.consumed >= self.refill_at {
                let credits = std::mem::take(&mut self.consumed);
                let _ = self.ctl.send(Frame::Credit { credits });
            }
        }
        item
    }
}

async fn read_queue(
    mut reader: FrameReader<quinn::RecvStream>,
    tx: InboxSender<QueueMessage>,
    waiters: Waiters,
    topic: Arc<str>,
) {
    let answer = |id: u64, r: Result<(), ClientError>| {
        if let Some(w) = waiters.lock().expect("waiters lock").map.remove(&id) {
            let _ = w.send(r);
        }
    };
    let end = loop {
        match reader.next().await {
            Ok(Some(Frame::QueueDeliver { records })) => {
                let batch = records
                    .into_iter()
                    .map(|d| QueueMessage {
                        topic: topic.clone(),
                        tag: d.tag,
                        timestamp_ms: d.timestamp_ms,
                        record: d.record,
                    })
                    .collect();
                if !tx.send(batch) {
                    break ClientError::ConnectionLost("consumer dropped".into());
                }
            }
            Ok(Some(Frame::Ok { id })) => answer(id, Ok(())),
            Ok(Some(Frame::Error { id, code, message })) if id != 0 => {
                answer(id, Err(ClientError::Server(WireError::new(code, message))));
            }
            Ok(Some(Frame::Error { code, message, .. })) => {
                let e = ClientError::Server(WireError::new(code, message));
                tx.fail(e.clone());
                break e;
            }
            Ok(Some(other)) => {
                let e = ClientError::Protocol(format!("unexpected frame on queue: {other:?}"));
                tx.fail(e.clone());
                break e;
            }
            Ok(None) => break ClientError::ConnectionLost("queue stream ended".into()),
            Err(e) => {
                let e = ClientError::ConnectionLost(e.to_string());
                tx.fail(e.clone());
                break e;
            }
        }
    };
    let mut w = waiters.lock().expect("waiters lock");
    for (_, tx) in w.map.drain() {
        let _ = tx.send(Err(end.clone()));
    }
    w.ended = Some(end);
}
