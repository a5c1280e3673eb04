//! Subscription streams: the subscriber's credits and commits come in on the
//! receive side; records go out on the send side, which belongs to this
//! subscription alone.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::Shared;
use super::connection::{frame_name, read_failed, violation};
use crate::delivery::{
    FeedSubscription, QueueEvent, QueueSubscription, StreamSubscription, SubEvent,
};
use crate::plugins::Failure;
use crate::protocol::{ErrorCode, Frame, SubscribeMode};
use crate::transport::{FrameReader, ReadFrameError};

/// Why the subscriber's side of the stream is unusable.
enum Bad {
    Unexpected(String),
    Read(ReadFrameError),
}

pub(super) async fn serve(
    first: Frame,
    mut send: quinn::SendStream,
    mut reader: FrameReader<quinn::RecvStream>,
    shared: Arc<Shared>,
    conn: quinn::Connection,
) {
    let Frame::Subscribe {
        group,
        topic,
        start,
        credits,
        auto_commit,
        mode,
    } = first
    else {
        unreachable!("dispatched on Subscribe");
    };
    if let SubscribeMode::Feed { keys } = mode {
        let feed = match open_feed(&shared, &topic, &group, keys, credits, auto_commit).await {
            Ok(f) => f,
            Err(e) => {
                let _ = send.write_all(&Frame::error(0, &e).to_bytes()).await;
                let _ = send.finish();
                return;
            }
        };
        let ok = Frame::Subscribed {
            partitions: feed.partitions(),
        };
        if send.write_all(&ok.to_bytes()).await.is_err() {
            return;
        }
        let (tx, rx) = mpsc::channel(64);
        let (bad_tx, bad_rx) = mpsc::channel(1);
        let events = tokio::spawn(read_sub_events(reader, tx, bad_tx));
        let mut shutdown = shared.shutdown.clone();
        let result = tokio::select! {
            r = feed.run(&mut send, rx) => r,
            _ = shutdown.wait_for(|s| *s) => Ok(()),
        };
        events.abort();
        return finish(result, bad_rx, &conn, &mut send).await;
    }
    if let SubscribeMode::Queue { visibility_ms } = mode {
        let setup = shared
            .broker
            .topic(&topic)
            .and_then(|t| shared.broker.queue_group(&group, &t, start));
        let queue = match setup {
            Ok(g) => g,
            Err(e) => {
                let _ = send.write_all(&Frame::error(0, &e).to_bytes()).await;
                let _ = send.finish();
                return;
            }
        };
        let ok = Frame::Subscribed {
            partitions: queue.topic.meta.partitions,
        };
        if send.write_all(&ok.to_bytes()).await.is_err() {
            return;
        }
        let sub = QueueSubscription::join(queue, credits, visibility_ms, auto_commit);
        let (tx, rx) = mpsc::channel(256);
        let (bad_tx, bad_rx) = mpsc::channel(1);
        let events = tokio::spawn(async move {
            loop {
                let ev = match reader.next().await {
                    Ok(Some(Frame::Credit { credits })) => QueueEvent::Credit(credits),
                    Ok(Some(Frame::Ack { id, items })) => QueueEvent::Ack { id, items },
                    Ok(Some(Frame::Nack {
                        id,
                        items,
                        retryable,
                        code,
                        message,
                    })) => QueueEvent::Nack {
                        id,
                        items,
                        failure: Failure {
                            code,
                            message,
                            retryable,
                        },
                    },
                    Ok(Some(Frame::Extend {
                        id,
                        items,
                        visibility_ms,
                    })) => QueueEvent::Extend {
                        id,
                        items,
                        visibility_ms,
                    },
                    Ok(Some(other)) => {
                        let why = format!(
                            "{} is not valid on a queue subscription stream",
                            frame_name(&other)
                        );
                        let _ = bad_tx.send(Bad::Unexpected(why)).await;
                        return;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = bad_tx.send(Bad::Read(e)).await;
                        return;
                    }
                };
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        });
        let mut shutdown = shared.shutdown.clone();
        let result = tokio::select! {
            r = sub.run(&mut send, rx) => r,
            _ = shutdown.wait_for(|s| *s) => Ok(()),
        };
        events.abort();
        return finish(result, bad_rx, &conn, &mut send).await;
    }
    let setup = shared
        .broker
        .topic(&topic)
        .and_then(|t| shared.broker.group(&group, &t));
    let group = match setup {
        Ok(g) => g,
        Err(e) => {
            let _ = send.write_all(&Frame::error(0, &e).to_bytes()).await;
            let _ = send.finish();
            return;
        }
    };
    let ok = Frame::Subscribed {
        partitions: group.topic.meta.partitions,
    };
    if send.write_all(&ok.to_bytes()).await.is_err() {
        return;
    }
    let plugins = Some(shared.broker.plugins().clone());
    let sub = StreamSubscription::join(group, plugins, start, credits, auto_commit);

    // Events are tiny and bounded by what the client sends between our
    // reads; a small channel is plenty and applies backpressure otherwise.
    let (tx, rx) = mpsc::channel(64);
    let (bad_tx, bad_rx) = mpsc::channel(1);
    let events = tokio::spawn(read_sub_events(reader, tx, bad_tx));

    let mut shutdown = shared.shutdown.clone();
    let result = tokio::select! {
        r = sub.run(&mut send, rx) => r,
        _ = shutdown.wait_for(|s| *s) => Ok(()),
    };
    events.abort();
    finish(result, bad_rx, &conn, &mut send).await
}

async fn open_feed(
    shared: &Shared,
    topic: &str,
    name: &str,
    keys: Vec<bytes::Bytes>,
    credits: u32,
    auto_commit: bool,
) -> Result<FeedSubscription, crate::protocol::WireError> {
    use crate::protocol::WireError;
    let t = shared.broker.topic(topic)?;
    if name.is_empty() || name.len() > crate::broker::MAX_NAME_LEN {
        return Err(WireError::new(
            ErrorCode::InvalidGroup,
            "a feed needs a name (the group, 1-249 bytes): its cursors and follows are kept under it",
        ));
    }
    if t.policy().fanout.is_none() {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "topic '{topic}' has no feeds: choose a fan-out default first \
                 (switchyard topic config {topic} --set fanout=on-read, or on-write)"
            ),
        ));
    }
    FeedSubscription::open(
        t,
        shared.broker.storage().clone(),
        name,
        keys.into_iter().map(|k| k.to_vec()).collect(),
        credits,
        auto_commit,
    )
    .await
    .map_err(|e| e.to_wire())
}

/// Reads credits and commits from a stream or feed subscriber.
async fn read_sub_events(
    mut reader: FrameReader<quinn::RecvStream>,
    tx: mpsc::Sender<SubEvent>,
    bad_tx: mpsc::Sender<Bad>,
) {
    loop {
        let ev = match reader.next().await {
            Ok(Some(Frame::Credit { credits })) => SubEvent::Credit(credits),
            Ok(Some(Frame::Commit { partition, offset })) => SubEvent::Commit { partition, offset },
            Ok(Some(other)) => {
                let why = format!(
                    "{} is not valid on a subscription stream",
                    frame_name(&other)
                );
                let _ = bad_tx.send(Bad::Unexpected(why)).await;
                return;
            }
            Ok(None) => return,
            Err(e) => {
                let _ = bad_tx.send(Bad::Read(e)).await;
                return;
            }
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

async fn finish(
    result: Result<(), crate::delivery::DeliveryError>,
    mut bad_rx: mpsc::Receiver<Bad>,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
) {
    match bad_rx.try_recv() {
        Ok(Bad::Unexpected(why)) => {
            return violation(conn, send, ErrorCode::UnexpectedFrame, &why).await;
        }
        Ok(Bad::Read(e)) => return read_failed(conn, send, e).await,
        Err(_) => {}
    }
    match result {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(e) => tracing::debug!(error = %e, "subscription ended"),
    }
}
