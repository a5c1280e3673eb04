//! Publish streams: pipelined batches in, durable acks out, in order.
//!
//! The reader queues each batch with the storage writer as soon as it is
//! decoded and moves on; a second task waits for the tickets in order and
//! writes acks, coalescing every ack that is ready into one stream write. A
//! producer therefore keeps many batches in flight on one stream, and the
//! bounded queue between the two tasks is its backpressure.

use std::sync::Arc;

use bytes::BytesMut;
use futures::FutureExt;
use tokio::sync::mpsc;

use super::Shared;
use super::connection::{frame_name, read_failed, violation};
use super::session::Session;
use crate::broker::{PublishTicket, Published};
use crate::protocol::{ErrorCode, Frame, WireError};
use crate::storage::{StorageError, TopicHandle};
use crate::transport::FrameReader;

/// Batches in flight per publish stream before the reader stops reading.
const MAX_IN_FLIGHT: usize = 256;

/// What became of one batch frame: stored or refused as a whole, or (a
/// batch of several parts that was refused as a whole) part by part.
enum Outcome {
    Whole(Result<PublishTicket, WireError>),
    Parts(Vec<Result<PublishTicket, WireError>>),
}

/// A batch's sequence number, what became of it, and when it arrived on
/// which topic (for the publish-to-ack histogram).
type Pending = (u64, Outcome, Option<Timing>);

type Timing = (std::time::Instant, Arc<TopicHandle>);

pub(super) async fn serve(
    first: Frame,
    send: quinn::SendStream,
    mut reader: FrameReader<quinn::RecvStream>,
    shared: Arc<Shared>,
    conn: quinn::Connection,
    session: Arc<Session>,
) {
    let (tx, rx) = mpsc::channel::<Pending>(MAX_IN_FLIGHT);
    let acks = tokio::spawn(write_acks(rx, send));
    let mut cached: Option<Arc<TopicHandle>> = None;
    let mut rr: u32 = rand_start();
    let mut next = Some(first);
    let mut shutdown = shared.shutdown.clone();
    loop {
        let frame = match next.take() {
            Some(f) => f,
            None => match tokio::select! {
                // FrameReader::next is cancel-safe: bytes read stay buffered.
                f = reader.next() => f,
                // Stop taking batches; those queued are still acked below.
                _ = shutdown.wait_for(|s| *s) => break,
            } {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    // Acks for batches already queued still go out first.
                    drop(tx);
                    if let Ok((mut send, _)) = acks.await {
                        read_failed(&conn, &mut send, e).await;
                    }
                    return;
                }
            },
        };
        let arrived = std::time::Instant::now();
        let Frame::PublishBatch {
            seq,
            topic,
            records,
            parts,
        } = frame
        else {
            drop(tx);
            let why = format!("{} is not valid on a publish stream", frame_name(&frame));
            if let Ok((mut send, _)) = acks.await {
                violation(&conn, &mut send, ErrorCode::UnexpectedFrame, &why).await;
            }
            return;
        };
        // Over its rate quota the principal waits here: this stream stops
        // being read, and QUIC flow control slows the producer.
        match session.admit_publish(&topic, &records) {
            Ok(None) => {}
            Ok(Some(wait)) => {
                shared.stats.refuse(super::metrics::Refusal::Quota);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|s| *s) => break,
                }
            }
            Err(e) => {
                shared.stats.refuse(super::metrics::Refusal::Quota);
                if tx.send((seq, Outcome::Whole(Err(e)), None)).await.is_err() {
                    break;
                }
                continue;
            }
        }
        let handle = match &cached {
            Some(h) if h.meta.name == topic && !h.is_deleted() => Ok(h.clone()),
            _ => shared.broker.topic_for_publish(&topic),
        };
        let result = match handle {
            Ok(h) if parts.len() > 1 => {
                // Several callers' records: if the batch is refused, each
                // part is tried alone, so one part's bad record refuses
                // only that part. A refused batch stored nothing, so
                // nothing is stored twice, and parts keep their order.
                let whole = shared.broker.publish(&h, records.clone(), &mut rr).await;
                let r = match whole {
                    Ok(ticket) => Outcome::Whole(Ok(ticket)),
                    Err(_) => {
                        let mut left = records.into_iter();
                        let mut each = Vec::with_capacity(parts.len());
                        for n in &parts {
                            let part: Vec<_> = left.by_ref().take(*n as usize).collect();
                            each.push(shared.broker.publish(&h, part, &mut rr).await);
                        }
                        Outcome::Parts(each)
                    }
                };
                cached = Some(h);
                r
            }
            Ok(h) => {
                let r = shared.broker.publish(&h, records, &mut rr).await;
                cached = Some(h);
                Outcome::Whole(r)
            }
            Err(e) => Outcome::Whole(Err(e)),
        };
        // Refusals are not acks: only stored batches are timed.
        let timing = (!matches!(result, Outcome::Whole(Err(_))))
            .then(|| cached.clone().map(|h| (arrived, h)))
            .flatten();
        if tx.send((seq, result, timing)).await.is_err() {
            break; // the ack writer failed: the stream is gone
        }
    }
    drop(tx);
    if let Ok((mut send, Ok(()))) = acks.await {
        let _ = send.finish();
    }
}

/// Writes acks in batch order, one stream write per group of ready acks.
async fn write_acks(
    rx: mpsc::Receiver<Pending>,
    mut send: quinn::SendStream,
) -> (quinn::SendStream, Result<(), quinn::WriteError>) {
    let r = ack_loop(rx, &mut send).await;
    (send, r)
}

async fn ack_loop(
    mut rx: mpsc::Receiver<Pending>,
    send: &mut quinn::SendStream,
) -> Result<(), quinn::WriteError> {
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut head = rx.recv().await;
    while let Some((seq, result, timing)) = head.take() {
        encode_ack(seq, result, &mut buf).await;
        observe(timing);
        // Coalesce every ack that is already decided.
        loop {
            match rx.try_recv() {
                Ok((seq, Outcome::Whole(Err(e)), _)) => Frame::error(seq, &e).encode(&mut buf),
                Ok((seq, Outcome::Whole(Ok(mut ticket)), timing)) => {
                    match (&mut ticket).now_or_never() {
                        Some(r) => {
                            encode_result(seq, r, &mut buf);
                            observe(timing);
                        }
                        None => {
                            head = Some((seq, Outcome::Whole(Ok(ticket)), timing));
                            break;
                        }
                    }
                }
                Ok(parts @ (_, Outcome::Parts(_), _)) => {
                    head = Some(parts);
                    break;
                }
                Err(_) => break,
            }
        }
        send.write_all(&buf).await?;
        buf.clear();
        if head.is_none() {
            head = rx.recv().await;
        }
    }
    Ok(())
}

/// Records a batch's publish-to-ack time on its topic.
fn observe(timing: Option<Timing>) {
    if let Some((arrived, topic)) = timing {
        topic
            .stats
            .publish_to_ack
            .observe(arrived.elapsed().as_secs_f64());
    }
}

async fn encode_ack(seq: u64, outcome: Outcome, buf: &mut BytesMut) {
    match outcome {
        Outcome::Whole(Ok(ticket)) => encode_result(seq, ticket.await, buf),
        Outcome::Whole(Err(e)) => Frame::error(seq, &e).encode(buf),
        Outcome::Parts(each) => {
            // One ack: the stored parts' positions, and each refused part
            // with its error. Indexes count stored records only.
            let mut all = Published::default();
            let mut refused = Vec::new();
            for (i, r) in each.into_iter().enumerate() {
                let stored = match r {
                    Ok(ticket) => ticket.await.map_err(|e| storage_wire(&e)),
                    Err(e) => Err(e),
                };
                match stored {
                    Ok(p) => {
                        let base = all.positions.len() as u32;
                        all.positions.extend(p.positions);
                        all.duplicates.extend(p.duplicates.iter().map(|d| d + base));
                        all.routed
                            .extend(p.routed.into_iter().map(|(j, t)| (j + base, t)));
                    }
                    Err(e) => refused.push((i as u32, e)),
                }
            }
            Frame::PublishAck {
                seq,
                positions: all.positions,
                duplicates: all.duplicates,
                routed: all.routed,
                refused,
            }
            .encode(buf)
        }
    }
}

fn storage_wire(e: &StorageError) -> WireError {
    match e {
        StorageError::ShutDown => WireError::new(
            ErrorCode::ShuttingDown,
            "router shutting down before this batch was stored; retry",
        ),
        e => e.to_wire(),
    }
}

fn encode_result(seq: u64, r: Result<Published, StorageError>, buf: &mut BytesMut) {
    match r {
        Ok(Published {
            positions,
            duplicates,
            routed,
        }) => Frame::PublishAck {
            seq,
            positions,
            duplicates,
            routed,
            refused: Vec::new(),
        }
        .encode(buf),
        Err(e) => Frame::error(seq, &storage_wire(&e)).encode(buf),
    }
}

fn rand_start() -> u32 {
    // Spread keyless records of different streams over different partitions
    // without a shared counter.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    t ^ (std::process::id() << 16)
}
