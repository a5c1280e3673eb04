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

type Pending = (u64, Result<PublishTicket, WireError>);

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
        let Frame::PublishBatch {
            seq,
            topic,
            records,
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
            Ok(Some(wait)) => tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            },
            Err(e) => {
                if tx.send((seq, Err(e))).await.is_err() {
                    break;
                }
                continue;
            }
        }
        let handle = match &cached {
            Some(h) if h.meta.name == topic && !h.is_deleted() => Ok(h.clone()),
            _ => shared.broker.topic(&topic),
        };
        let result = match handle {
            Ok(h) => {
                let r = shared.broker.publish(&h, records, &mut rr).await;
                cached = Some(h);
                r
            }
            Err(e) => Err(e),
        };
        if tx.send((seq, result)).await.is_err() {
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
    while let Some((seq, result)) = head.take() {
        encode_ack(seq, result, &mut buf).await;
        // Coalesce every ack that is already decided.
        loop {
            match rx.try_recv() {
                Ok((seq, Err(e))) => Frame::error(seq, &e).encode(&mut buf),
                Ok((seq, Ok(mut ticket))) => match (&mut ticket).now_or_never() {
                    Some(r) => encode_result(seq, r, &mut buf),
                    None => {
                        head = Some((seq, Ok(ticket)));
                        break;
                    }
                },
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

async fn encode_ack(seq: u64, result: Result<PublishTicket, WireError>, buf: &mut BytesMut) {
    match result {
        Ok(ticket) => encode_result(seq, ticket.await, buf),
        Err(e) => Frame::error(seq, &e).encode(buf),
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
        }
        .encode(buf),
        Err(StorageError::ShutDown) => Frame::error(
            seq,
            &WireError::new(
                ErrorCode::ShuttingDown,
                "router shutting down before this batch was stored; retry",
            ),
        )
        .encode(buf),
        Err(e) => Frame::error(seq, &e.to_wire()).encode(buf),
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
