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
use super::subscribe::{Flow, Handler, drive, open_first};
use switchyard_protocol::{DeliveryTag, Frame, RawRecord, StartPosition, SubscribeMode, WireError};

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
    /// The consumer's stream it came on: a message from before a
    /// reconnect is settled by its redelivery, not by this one.
    stream: u64,
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
    /// Which stream is current: 1, then one more per reconnect.
    stream: u64,
}

type Waiters = Arc<Mutex<Pending>>;

/// A live queue consumer: a [`Stream`] of messages. Dropping it (or
/// [`QueueConsumer::close`]) leaves the group; messages it had not acked
/// are delivered to other members at once. It rejoins after a reconnect
/// (see [`Client`]'s section on them).
pub struct QueueConsumer {
    rx: Inbox<QueueMessage>,
    ctl: mpsc::UnboundedSender<Frame>,
    waiters: Waiters,
    next_id: AtomicU64,
    auto_ack: bool,
    consumed: u32,
    refill_at: u32,
    driver: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Joins a queue group. Fails at once for an unknown topic or a
    /// missing group name.
    pub async fn subscribe_queue(&self, opts: QueueOptions) -> Result<QueueConsumer, ClientError> {
        let at = self.at(&opts.topic, None).await?;
        if !std::ptr::eq(at, self) {
            return Box::pin(at.subscribe_queue(opts)).await;
        }
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
        let (link, (send, reader, _)) = open_first(&self.shared, &f).await?;
        let (tx, rx) = inbox();
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let waiters: Waiters = Arc::new(Mutex::new(Pending {
            stream: 1,
            ..Pending::default()
        }));
        let handler = QueueHandler {
            subscribe: f,
            tx,
            waiters: waiters.clone(),
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
        Ok(QueueConsumer {
            rx,
            ctl,
            waiters,
            next_id: AtomicU64::new(1),
            auto_ack: opts.auto_ack,
            consumed: 0,
            refill_at: (opts.prefetch / 2).max(1),
            driver,
        })
    }
}

impl QueueConsumer {
    /// Sends a request about deliveries of stream `stream` (`None`: the
    /// current one) and waits for the answer. Deliveries of an earlier
    /// stream were released when it was lost: there is nothing to settle.
    async fn request(
        &self,
        stream: Option<u64>,
        make: impl FnOnce(u64) -> Frame,
    ) -> Result<(), ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut w = self.waiters.lock().expect("waiters lock");
            if let Some(e) = &w.ended {
                return Err(e.clone());
            }
            if stream.is_some_and(|s| s != w.stream) {
                return Ok(());
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

    /// How many times this consumer has joined its group again (after a
    /// reconnect, or the router ending the subscription). An ack, nack or
    /// extend of a message delivered before a rejoin returns `Ok` without
    /// reaching the router: the message comes again. So an ack that
    /// returns `Ok` with this number unchanged since the message arrived
    /// was answered by the router, after the commit that holds it.
    pub fn rejoins(&self) -> u64 {
        self.waiters.lock().expect("waiters lock").stream
    }

    /// Acknowledges a message: it is settled and never delivered again.
    pub async fn ack(&self, msg: &QueueMessage) -> Result<(), ClientError> {
        let items = vec![msg.tag];
        self.request(Some(msg.stream), |id| Frame::Ack { id, items })
            .await
    }

    /// Acknowledges several deliveries in one request. Valid ones are
    /// settled even if the error reports others as unknown.
    pub async fn ack_many(&self, tags: &[DeliveryTag]) -> Result<(), ClientError> {
        let items = tags.to_vec();
        self.request(None, |id| Frame::Ack { id, items }).await
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
        self.request(Some(msg.stream), |id| Frame::Nack {
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
        self.request(Some(msg.stream), |id| Frame::Extend {
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
        let QueueConsumer { ctl, driver, .. } = self;
        drop(ctl);
        let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    }
}

impl Stream for QueueConsumer {
    type Item = Result<QueueMessage, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = loop {
            let item = self.rx.poll_next(cx);
            // A message that came before a reconnect was released by the
            // router and comes again: skip this copy.
            if let Poll::Ready(Some(Ok(m))) = &item {
                let current = self.waiters.lock().expect("waiters lock").stream;
                if m.stream != current {
                    continue;
                }
            }
            break item;
        };
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

/// A queue consumer's side of [`drive`].
struct QueueHandler {
    subscribe: Frame,
    tx: InboxSender<QueueMessage>,
    waiters: Waiters,
    topic: Arc<str>,
}

impl QueueHandler {
    fn answer(&self, id: u64, r: Result<(), ClientError>) {
        if let Some(w) = self.waiters.lock().expect("waiters lock").map.remove(&id) {
            let _ = w.send(r);
        }
    }
}

impl Handler for QueueHandler {
    fn frame(&mut self, f: Frame) -> Flow {
        match f {
            Frame::QueueDeliver { records } => {
                let stream = self.waiters.lock().expect("waiters lock").stream;
                let batch = records
                    .into_iter()
                    .map(|d| QueueMessage {
                        stream,
                        topic: self.topic.clone(),
                        tag: d.tag,
                        timestamp_ms: d.timestamp_ms,
                        record: d.record,
                    })
                    .collect();
                if !self.tx.send(batch) {
                    return Flow::Stop;
                }
                Flow::Continue
            }
            Frame::Ok { id } => {
                self.answer(id, Ok(()));
                Flow::Continue
            }
            Frame::Error { id, code, message } if id != 0 => {
                self.answer(id, Err(ClientError::Server(WireError::new(code, message))));
                Flow::Continue
            }
            Frame::Error { code, message, .. } => {
                Flow::Fail(ClientError::Server(WireError::new(code, message)))
            }
            other => Flow::Fail(ClientError::Protocol(format!(
                "unexpected frame on queue: {other:?}"
            ))),
        }
    }

    fn resubscribe(&self) -> Frame {
        self.subscribe.clone()
    }

    fn lost(&mut self) {
        // Every delivery of the lost stream was released by the router;
        // settling one now has nothing to do (its redelivery is the one
        // to settle).
        let mut w = self.waiters.lock().expect("waiters lock");
        w.stream += 1;
        for (_, tx) in w.map.drain() {
            let _ = tx.send(Ok(()));
        }
    }

    fn ended(&mut self, e: Option<ClientError>) {
        let end = e
            .clone()
            .unwrap_or_else(|| ClientError::ConnectionLost("queue stream ended".into()));
        if let Some(e) = e {
            self.tx.fail(e);
        }
        let mut w = self.waiters.lock().expect("waiters lock");
        for (_, tx) in w.map.drain() {
            let _ = tx.send(Err(end.clone()));
        }
        w.ended = Some(end);
    }
}
