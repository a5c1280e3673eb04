//! Pipelined publishing over one long-lived stream.
//!
//! Every `publish` call queues its records with a writer task, which packs
//! whatever is queued into `PublishBatch` frames and sends them in one
//! stream write; an ack task matches the router's in-order acks back to the
//! callers. A semaphore bounds records awaiting acknowledgement.
//!
//! Each call's records are one *part* of the frame they travel in, and the
//! frame lists its parts: the router stores or refuses each part as a unit,
//! so one caller's refused record never fails another caller's publish.
//! When the connection is lost, parts whose records all carry a message id
//! are sent again on the next connection, ahead of anything newer; the
//! others fail with `ConnectionLost`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::ClientError;
use super::connection::{Client, ServerInfo, Shared};
use switchyard_protocol::transport::FrameReader;
use switchyard_protocol::{ErrorCode, Frame, PublishBatchWriter, Record, WireError};

/// Where a record was stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ack {
    /// Partition.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: u64,
    /// True if the record carried a message id already stored within the
    /// topic's dedup window: nothing new was stored, and this is the
    /// original's position.
    pub duplicate: bool,
    /// The topic a route plugin stored the record in, if not the one it
    /// was published to (`partition` and `offset` are in that topic).
    pub topic: Option<Arc<str>>,
}

type Reply = oneshot::Sender<Result<Vec<Ack>, ClientError>>;

struct Request {
    topic: Arc<str>,
    records: Vec<Record>,
    reply: Reply,
    permit: OwnedSemaphorePermit,
}

/// One caller's records in a batch frame.
struct Part {
    reply: Reply,
    count: usize,
    permit: OwnedSemaphorePermit,
    /// The records, kept until acknowledged when they may be sent again
    /// after a reconnect (every one has a message id).
    resend: Option<Vec<Record>>,
}

/// Callers waiting on one batch frame.
struct InFlight {
    seq: u64,
    topic: Arc<str>,
    parts: Vec<Part>,
}

#[derive(Default)]
struct Pending {
    /// Batches the router did not store because it was shutting down,
    /// whose parts may be resent: before `queue`, which they preceded.
    again: Vec<InFlight>,
    queue: VecDeque<InFlight>,
    /// Set by the ack reader when the stream has ended, with why.
    dead: Option<String>,
}

/// Most bytes packed into one stream write.
const WRITE_CHUNK: usize = 256 << 10;
/// Most records in one batch frame.
const MAX_BATCH_RECORDS: usize = 4096;

pub(super) struct Publisher {
    shared: Arc<Shared>,
    info: ServerInfo,
    window: Arc<Semaphore>,
    max_in_flight: usize,
    tx: tokio::sync::OnceCell<mpsc::Sender<Request>>,
}

impl Publisher {
    pub(super) fn new(shared: Arc<Shared>, info: ServerInfo, max_in_flight: usize) -> Self {
        let max_in_flight = max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        Publisher {
            shared,
            info,
            window: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            tx: tokio::sync::OnceCell::new(),
        }
    }

    async fn sender(&self) -> &mpsc::Sender<Request> {
        self.tx
            .get_or_init(|| async {
                let (tx, rx) = mpsc::channel(1024);
                tokio::spawn(run(self.shared.clone(), rx));
                tx
            })
            .await
    }

    async fn submit(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Ack>, ClientError> {
        let budget = frame_budget(self.info.max_frame_bytes);
        let total: usize = records.iter().map(|r| r.encoded_len() + 4).sum();
        if records.len() <= MAX_BATCH_RECORDS && total <= budget {
            return self.submit_one(topic, records).await;
        }
        // Too big for one frame: send consecutive chunks, pipelined, in order.
        let mut chunks = Vec::new();
        let mut cur = Vec::new();
        let mut cur_len = 0;
        for r in records {
            let l = r.encoded_len() + 4;
            if !cur.is_empty() && (cur.len() == MAX_BATCH_RECORDS || cur_len + l > budget) {
                chunks.push(std::mem::take(&mut cur));
                cur_len = 0;
            }
            cur_len += l;
            cur.push(r);
        }
        chunks.push(cur);
        // Queue every chunk before awaiting any ack: order is fixed at
        // queueing time, and the chunks are pipelined.
        let mut pending = Vec::with_capacity(chunks.len());
        for c in chunks {
            pending.push(self.enqueue(topic, c).await?);
        }
        let mut acks = Vec::new();
        for p in pending {
            acks.extend(p.await?);
        }
        Ok(acks)
    }

    async fn submit_one(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Ack>, ClientError> {
        self.enqueue(topic, records).await?.await
    }

    /// Validates and queues records as one batch; the returned future
    /// resolves with their acks.
    pub(super) async fn enqueue(
        &self,
        topic: &str,
        records: Vec<Record>,
    ) -> Result<PendingAcks, ClientError> {
        for r in &records {
            if r.encoded_len() > self.info.max_message_bytes {
                return Err(ClientError::Server(WireError::new(
                    ErrorCode::MessageTooLarge,
                    format!(
                        "record of {} bytes exceeds the router's max_message_bytes = {}",
                        r.encoded_len(),
                        self.info.max_message_bytes
                    ),
                )));
            }
            r.check().map_err(|e| {
                ClientError::Server(WireError::new(ErrorCode::InvalidArgument, e.to_string()))
            })?;
        }
        if records.is_empty() {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Ok(Vec::new()));
            return Ok(PendingAcks(rx));
        }
        let n = records.len().min(self.max_in_flight) as u32;
        let permit = self
            .window
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("semaphore never closed");
        let (reply, rx) = oneshot::channel();
        let tx = self.sender().await;
        tx.send(Request {
            topic: topic.into(),
            records,
            reply,
            permit,
        })
        .await
        .map_err(|_| ClientError::ConnectionLost("publish stream closed".into()))?;
        Ok(PendingAcks(rx))
    }

    pub(super) async fn flush(&self) {
        if let Ok(all) = self.window.acquire_many(self.max_in_flight as u32).await {
            drop(all);
        }
    }
}

/// Acks for records already queued, in order, on the publish stream.
#[must_use = "dropping this loses the acknowledgement, not the records"]
pub struct PendingAcks(oneshot::Receiver<Result<Vec<Ack>, ClientError>>);

impl std::future::Future for PendingAcks {
    type Output = Result<Vec<Ack>, ClientError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| {
            r.unwrap_or_else(|_| Err(ClientError::ConnectionLost("publish stream closed".into())))
        })
    }
}

impl Client {
    /// Queues records as one batch and returns once they are queued, with a
    /// future for their acks. Records queued by successive calls are stored
    /// in call order, so a producer can keep many batches in flight without
    /// losing per-key order. The batch must fit one frame (4096 records and
    /// the router's frame size).
    pub async fn queue_batch(
        &self,
        topic: &str,
        records: Vec<Record>,
    ) -> Result<PendingAcks, ClientError> {
        if records.len() > MAX_BATCH_RECORDS {
            return Err(ClientError::Server(WireError::new(
                ErrorCode::InvalidArgument,
                format!("queue_batch takes at most {MAX_BATCH_RECORDS} records; use publish_batch"),
            )));
        }
        self.at(topic, None)
            .await?
            .publisher
            .enqueue(topic, records)
            .await
    }

    /// Publishes one record; resolves once it is durable, with its position.
    ///
    /// Calls are pipelined: many may be in flight at once on one stream, and
    /// records from one task keep their order.
    ///
    /// # Batching and its fate
    ///
    /// Concurrent calls (from any tasks sharing this client) travel
    /// together: the publisher packs whatever is queued into one batch
    /// frame. Each call's records are a *part* of that frame, and the router
    /// stores or refuses each part on its own: a record refused by a route
    /// or priority plugin, a bad header or a delay over the topic's limit
    /// fails only the call that published it, never another call that
    /// happened to share its frame. Refusals that concern the whole frame
    /// (an unknown topic, a missing grant, a full backlog, a full disk)
    /// fail every call in it with that error. After a reconnect, see
    /// [`Client`]'s section on reconnects.
    pub async fn publish(&self, topic: &str, record: Record) -> Result<Ack, ClientError> {
        let mut v = self
            .at(topic, None)
            .await?
            .publisher
            .submit(topic, vec![record])
            .await?;
        v.pop()
            .ok_or_else(|| ClientError::Protocol("empty ack".into()))
    }

    /// Publishes records; positions come back in input order. A batch that
    /// fits one frame (4096 records and the router's frame size) is stored
    /// atomically: all of it or none, whatever other calls share its frame
    /// (see [`Client::publish`]). A larger one is sent as several such
    /// batches, in order, and the call fails if any of them fails (those
    /// before it may have been stored).
    pub async fn publish_batch(
        &self,
        topic: &str,
        records: Vec<Record>,
    ) -> Result<Vec<Ack>, ClientError> {
        self.at(topic, None)
            .await?
            .publisher
            .submit(topic, records)
            .await
    }

    /// Waits until every publish issued so far has been acknowledged.
    pub async fn flush(&self) {
        for other in self.other_groups() {
            other.publisher.flush().await;
        }
        self.publisher.flush().await
    }
}

fn fail(parts: Vec<Part>, err: &ClientError) {
    for p in parts {
        let _ = p.reply.send(Err(err.clone()));
    }
}

/// Why a publish stream's writer stopped.
enum Ended {
    /// Every sender is gone and everything queued was written.
    Finished,
    /// The stream (or the connection) was lost.
    Lost,
}

/// The publisher: one publish stream per connection, for as long as the
/// client lives. After a loss, resends what may be resent (see the module
/// doc) on the next connection before anything newer.
async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Request>) {
    let mut carry: VecDeque<Request> = VecDeque::new();
    let mut seq = 0u64;
    let resend = shared.reconnects();
    loop {
        if carry.is_empty() {
            // Open a stream only when there is something to send.
            match rx.recv().await {
                Some(r) => carry.push_back(r),
                None => return,
            }
        }
        let link = match shared.link().await {
            Ok(l) => l,
            Err(e) => {
                // The client is closed or failed for good: so is every
                // publish, queued now or later.
                for r in carry.drain(..) {
                    let _ = r.reply.send(Err(e.clone()));
                }
                while let Some(r) = rx.recv().await {
                    let _ = r.reply.send(Err(e.clone()));
                }
                return;
            }
        };
        let (send, recv) = match link.conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                if !resend {
                    let err = ClientError::ConnectionLost(e.to_string());
                    for r in carry.drain(..) {
                        let _ = r.reply.send(Err(err.clone()));
                    }
                }
                // Wait for the supervisor to notice before asking again.
                shared.link_lost(link.generation).await;
                continue;
            }
        };
        let pending = Arc::new(Mutex::new(Pending::default()));
        let dead = Arc::new(Notify::new());
        tokio::spawn(ack_reader(
            FrameReader::new(recv, 64 << 20),
            pending.clone(),
            dead.clone(),
        ));
        let max_frame = link.info.max_frame_bytes;
        let ended = writer(
            &mut rx, &mut carry, send, &pending, &dead, max_frame, &mut seq, resend,
        )
        .await;
        // Wait until the ack reader is done: after that no ack can arrive
        // for what is still pending.
        let (queue, reason) = loop {
            let notified = dead.notified();
            {
                let mut p = pending.lock().expect("pending lock");
                if let Some(reason) = p.dead.clone() {
                    let mut all: VecDeque<InFlight> = std::mem::take(&mut p.again).into();
                    all.extend(std::mem::take(&mut p.queue));
                    break (all, reason);
                }
            }
            notified.await;
        };
        let err = ClientError::ConnectionLost(reason);
        let mut again = VecDeque::new();
        for f in queue {
            for part in f.parts {
                match part.resend {
                    Some(records) if resend => again.push_back(Request {
                        topic: f.topic.clone(),
                        records,
                        reply: part.reply,
                        permit: part.permit,
                    }),
                    _ => {
                        let _ = part.reply.send(Err(err.clone()));
                    }
                }
            }
        }
        if matches!(ended, Ended::Finished) {
            for r in again {
                let _ = r.reply.send(Err(err.clone()));
            }
            return;
        }
        if !again.is_empty() {
            tracing::debug!(parts = again.len(), "resending unacknowledged publishes");
        }
        again.extend(carry.drain(..));
        carry = again;
        if !resend {
            for r in carry.drain(..) {
                let _ = r.reply.send(Err(err.clone()));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn writer(
    rx: &mut mpsc::Receiver<Request>,
    carry: &mut VecDeque<Request>,
    mut send: quinn::SendStream,
    pending: &Mutex<Pending>,
    dead: &Notify,
    max_frame: usize,
    seq: &mut u64,
    resend: bool,
) -> Ended {
    let mut buf = BytesMut::with_capacity(WRITE_CHUNK + (64 << 10));
    let budget = frame_budget(max_frame);
    loop {
        let first = match carry.pop_front() {
            Some(r) => r,
            None => tokio::select! {
                biased;
                _ = dead.notified() => {
                    // Give the permit back for `run`, which waits on it too.
                    dead.notify_one();
                    return Ended::Lost;
                }
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => {
                        let _ = send.finish();
                        return Ended::Finished;
                    }
                },
            },
        };
        let mut frames: Vec<InFlight> = Vec::new();
        let mut open: Option<PublishBatchWriter> = None;
        let mut next = Some(first);
        while let Some(req) = next.take() {
            // `submit` sizes every request to fit one frame, so a request
            // never spans frames and is acknowledged as a unit.
            let req_len: usize = req.records.iter().map(|r| r.encoded_len() + 4).sum();
            let fits = open.as_ref().is_some_and(|w| {
                frames.last().is_some_and(|f| f.topic == req.topic)
                    && w.count() as usize + req.records.len() <= MAX_BATCH_RECORDS
                    && w.len(&buf) + req_len + 8 * frames.last().map_or(0, |f| f.parts.len())
                        <= budget
            });
            if !fits {
                if let (Some(w), Some(f)) = (open.take(), frames.last()) {
                    w.finish_parts(&mut buf, f.parts.iter().map(|p| p.count as u32));
                }
                *seq += 1;
                open = Some(PublishBatchWriter::begin(&mut buf, *seq, &req.topic));
                frames.push(InFlight {
                    seq: *seq,
                    topic: req.topic.clone(),
                    parts: Vec::new(),
                });
            }
            let w = open.as_mut().expect("opened above");
            for r in &req.records {
                w.push(&mut buf, r);
            }
            let keep = resend && req.records.iter().all(|r| r.message_id().is_some());
            frames
                .last_mut()
                .expect("a frame is open")
                .parts
                .push(Part {
                    reply: req.reply,
                    count: req.records.len(),
                    permit: req.permit,
                    resend: keep.then_some(req.records),
                });
            if buf.len() < WRITE_CHUNK {
                next = carry.pop_front().or_else(|| rx.try_recv().ok());
            }
        }
        if let (Some(w), Some(f)) = (open.take(), frames.last()) {
            w.finish_parts(&mut buf, f.parts.iter().map(|p| p.count as u32));
        }
        {
            let mut p = pending.lock().expect("pending lock");
            let lost = p.dead.is_some();
            p.queue.extend(frames);
            if lost {
                // Not written: `run` resends or fails them with the rest.
                return Ended::Lost;
            }
        }
        if let Err(e) = send.write_all(&buf).await {
            tracing::debug!(error = %e, "publish stream write failed");
            return Ended::Lost;
        }
        buf.clear();
    }
}

/// Bytes of records one batch frame may carry, leaving room for its header
/// and topic name.
fn frame_budget(max_frame: usize) -> usize {
    max_frame.saturating_sub(1024).max(4096)
}

async fn ack_reader(
    mut reader: FrameReader<quinn::RecvStream>,
    pending: Arc<Mutex<Pending>>,
    dead: Arc<Notify>,
) {
    let reason = loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => break "publish stream closed by the router".to_string(),
            Err(e) => break e.to_string(),
        };
        let (seq, result) = match frame {
            Frame::PublishAck {
                seq,
                positions,
                duplicates,
                routed,
                refused,
            } => (seq, Ok((positions, duplicates, routed, refused))),
            Frame::Error { id, code, message } => (id, Err(WireError::new(code, message))),
            other => break format!("unexpected frame on publish stream: {other:?}"),
        };
        let batch = {
            let mut p = pending.lock().expect("pending lock");
            match p.queue.front() {
                Some(b) if b.seq == seq => p.queue.pop_front(),
                _ => None,
            }
        };
        let Some(batch) = batch else {
            if seq == 0
                && let Err(e) = result
            {
                break e.to_string();
            }
            break format!("ack for unknown batch {seq}");
        };
        match result {
            Ok((positions, duplicates, routed, refused)) => {
                let stored: usize = batch
                    .parts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !refused.iter().any(|(j, _)| *j as usize == *i))
                    .map(|(_, p)| p.count)
                    .sum();
                let mut refused = refused.into_iter().peekable();
                if stored != positions.len() {
                    break format!(
                        "ack for batch {seq} has {} positions, expected {stored}",
                        positions.len()
                    );
                }
                // Indexes come in order: merged, not searched.
                let mut routed = routed.into_iter().peekable();
                let mut it = positions
                    .into_iter()
                    .enumerate()
                    .map(|(i, (partition, offset))| Ack {
                        partition,
                        offset,
                        duplicate: duplicates.contains(&(i as u32)),
                        topic: routed
                            .next_if(|(j, _)| *j == i as u32)
                            .map(|(_, t)| Arc::from(t)),
                    });
                for (i, part) in batch.parts.into_iter().enumerate() {
                    let answer = match refused.next_if(|(j, _)| *j as usize == i) {
                        Some((_, e)) => Err(ClientError::Server(e)),
                        None => Ok(it.by_ref().take(part.count).collect()),
                    };
                    let _ = part.reply.send(answer);
                }
            }
            Err(e) if e.code == ErrorCode::ShuttingDown => {
                // Not stored: what may be resent goes to the next
                // connection, the rest fails now.
                let (keep, lost): (Vec<Part>, Vec<Part>) =
                    batch.parts.into_iter().partition(|p| p.resend.is_some());
                fail(lost, &ClientError::Server(e));
                pending.lock().expect("pending lock").again.push(InFlight {
                    parts: keep,
                    ..batch
                });
            }
            Err(e) => fail(batch.parts, &ClientError::Server(e)),
        }
    };
    pending.lock().expect("pending lock").dead = Some(reason);
    dead.notify_one();
}
