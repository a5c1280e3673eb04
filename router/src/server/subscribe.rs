//! Subscription streams: the subscriber's credits and commits come in on the
//! receive side; records go out on the send side, which belongs to this
//! subscription alone.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::Shared;
use super::connection::{frame_name, read_failed, violation};
use super::session::Session;
use crate::auth::Class;
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

/// The three kinds of subscription a `Subscribe` can open.
enum Sub {
    Stream(StreamSubscription),
    Queue(QueueSubscription),
    Feed(FeedSubscription),
}

pub(super) async fn serve(
    first: Frame,
    mut send: quinn::SendStream,
    reader: FrameReader<quinn::RecvStream>,
    shared: Arc<Shared>,
    conn: quinn::Connection,
    session: Arc<Session>,
) {
    let Frame::Subscribe {
        group,
        topic,
        start,
        mut credits,
        auto_commit,
        mode,
    } = first
    else {
        unreachable!("dispatched on Subscribe");
    };
    // Who may read, and how much they hold, before anything about the
    // topic is revealed. The quota shares are given back when this ends.
    let principal = session.principal();
    let held = session
        .check(Class::Consume, &topic, &group)
        .and_then(|()| session.usage.subscribe(&principal.quotas, &principal.name))
        .and_then(|sub| {
            let prefetch = match mode {
                SubscribeMode::Queue { .. } if !auto_commit => Some(session.usage.prefetch(
                    &principal.quotas,
                    credits,
                    &principal.name,
                )?),
                _ => None,
            };
            Ok((sub, prefetch))
        });
    let _held = match held {
        Ok((sub, prefetch)) => {
            if let Some(p) = &prefetch {
                credits = p.amount();
            }
            (sub, prefetch)
        }
        Err(e) => {
            tracing::info!(principal = %principal.name, topic, group, code = %e.code, "subscription refused");
            let _ = send.write_all(&Frame::error(0, &e).to_bytes()).await;
            let _ = send.finish();
            return;
        }
    };
    let broker = &shared.broker;
    let setup = match mode {
        SubscribeMode::Feed { keys } => {
            open_feed(&shared, &topic, &group, keys, credits, auto_commit)
                .await
                .map(|f| (f.partitions(), Sub::Feed(f)))
        }
        SubscribeMode::Queue { visibility_ms } => broker
            .topic(&topic)
            .and_then(|t| broker.queue_group(&group, &t, start))
            .map(|g| {
                let partitions = g.topic.meta.partitions;
                let q = QueueSubscription::join(g, credits, visibility_ms, auto_commit);
                (partitions, Sub::Queue(q))
            }),
        SubscribeMode::Stream => broker
            .topic(&topic)
            .and_then(|t| broker.group(&group, &t))
            .map(|g| {
                let partitions = g.topic.meta.partitions;
                let plugins = Some(broker.plugins().clone());
                let s = StreamSubscription::join(g, plugins, start, credits, auto_commit);
                (partitions, Sub::Stream(s))
            }),
    };
    let sub = match setup {
        Ok((partitions, sub)) => {
            let ok = Frame::Subscribed { partitions };
            if send.write_all(&ok.to_bytes()).await.is_err() {
                return;
            }
            sub
        }
        Err(e) => {
            let _ = send.write_all(&Frame::error(0, &e).to_bytes()).await;
            let _ = send.finish();
            return;
        }
    };

    // Events are tiny and bounded by what the client sends between our
    // reads; a small channel is plenty and applies backpressure otherwise.
    let (bad_tx, bad_rx) = mpsc::channel(1);
    let mut shutdown = shared.shutdown.clone();
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    type Run<'a> = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<(), crate::delivery::DeliveryError>>
                + Send
                + 'a,
        >,
    >;
    let (run, events): (Run<'_>, _) = match sub {
        Sub::Queue(q) => {
            let (tx, rx) = mpsc::channel(256);
            let events = tokio::spawn(read_events(reader, tx, bad_tx, queue_event));
            (Box::pin(q.run(&mut send, rx)), events)
        }
        Sub::Stream(_) | Sub::Feed(_) => {
            let (tx, rx) = mpsc::channel(64);
            let events = tokio::spawn(read_events(reader, tx, bad_tx, sub_event));
            let run: Run<'_> = match sub {
                Sub::Stream(s) => Box::pin(s.run(&mut send, rx)),
                Sub::Feed(f) => Box::pin(f.run(&mut send, rx)),
                Sub::Queue(_) => unreachable!("matched above"),
            };
            (run, events)
        }
    };
    let result = tokio::select! {
        r = run => r,
        _ = stop => Ok(()),
    };
    events.abort();
    finish(result, bad_rx, &conn, &mut send).await
}

/// Acks, nacks, extends and credits from a queue subscriber.
fn queue_event(f: Frame) -> Result<QueueEvent, Frame> {
    Ok(match f {
        Frame::Credit { credits } => QueueEvent::Credit(credits),
        Frame::Ack { id, items } => QueueEvent::Ack { id, items },
        Frame::Nack {
            id,
            items,
            retryable,
            code,
            message,
        } => QueueEvent::Nack {
            id,
            items,
            failure: Failure {
                code,
                message,
                retryable,
            },
        },
        Frame::Extend {
            id,
            items,
            visibility_ms,
        } => QueueEvent::Extend {
            id,
            items,
            visibility_ms,
        },
        other => return Err(other),
    })
}

/// Credits and commits from a stream or feed subscriber.
fn sub_event(f: Frame) -> Result<SubEvent, Frame> {
    match f {
        Frame::Credit { credits } => Ok(SubEvent::Credit(credits)),
        Frame::Commit { partition, offset } => Ok(SubEvent::Commit { partition, offset }),
        other => Err(other),
    }
}

/// Reads the subscriber's frames as events until it finishes its side; a
/// frame `event` refuses, or a read error, is reported on `bad_tx`.
async fn read_events<E>(
    mut reader: FrameReader<quinn::RecvStream>,
    tx: mpsc::Sender<E>,
    bad_tx: mpsc::Sender<Bad>,
    event: fn(Frame) -> Result<E, Frame>,
) {
    loop {
        let ev = match reader.next().await {
            Ok(Some(f)) => match event(f) {
                Ok(ev) => ev,
                Err(other) => {
                    let why = format!(
                        "{} is not valid on this subscription stream",
                        frame_name(&other)
                    );
                    let _ = bad_tx.send(Bad::Unexpected(why)).await;
                    return;
                }
            },
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
        // A read that failed (a damaged entry, a database error) ends the
        // subscription with an error frame that says why: never a stream
        // that just stops.
        Err(crate::delivery::DeliveryError::Storage(e)) => {
            tracing::error!(error = %e, "a subscription's read failed; ending it with an error");
            let _ = send
                .write_all(&Frame::error(0, &e.to_wire()).to_bytes())
                .await;
            let _ = send.finish();
        }
        Err(e) => tracing::debug!(error = %e, "subscription ended"),
    }
}
