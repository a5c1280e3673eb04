//! The control stream: topic administration, request/response by id.

use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use super::connection::{frame_name, read_failed, violation};
use super::session::Session;
use crate::auth::Class;
use crate::protocol::{ErrorCode, Frame, WireError};
use crate::transport::FrameReader;

/// Serves one connection's control stream until the client ends it or
/// the router shuts down. A request in progress when the router starts
/// shutting down is finished and answered (a `cluster_step_down` is one:
/// the move it asks for is what stops the old leader's router), and the
/// answer is delivered before the connection is closed.
pub(super) async fn serve(
    mut send: quinn::SendStream,
    mut reader: FrameReader<quinn::RecvStream>,
    shared: Arc<Shared>,
    conn: quinn::Connection,
    session: Arc<Session>,
) {
    let broker = &shared.broker;
    let mut shutdown = shared.shutdown.clone();
    loop {
        let read = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => None,
            read = reader.next() => Some(read),
        };
        let Some(read) = read else {
            return finish(send).await;
        };
        let frame = match read {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => return read_failed(&conn, &mut send, e).await,
        };
        session.touch();
        let reply = match frame {
            Frame::CreateTopic {
                id,
                name,
                partitions,
                retention_ms,
                retention_bytes,
            } => {
                let r = match session.check(Class::TopicAdmin, &name, "") {
                    Ok(()) => {
                        broker
                            .create_topic(&name, partitions, retention_ms, retention_bytes)
                            .await
                    }
                    Err(e) => Err(e),
                };
                answer(
                    id,
                    r.map(|t| Frame::Topics {
                        id,
                        topics: vec![t],
                    }),
                )
            }
            Frame::DeleteTopic { id, name } => {
                let r = match session.check(Class::TopicAdmin, &name, "") {
                    Ok(()) => broker.delete_topic(&name).await,
                    Err(e) => Err(e),
                };
                answer(id, r.map(|()| Frame::Ok { id }))
            }
            Frame::ListTopics { id } => {
                // A principal sees the topics its grants name.
                let p = session.principal();
                let mut topics = broker.list_topics();
                topics.retain(|t| p.sees(&t.name));
                Frame::Topics { id, topics }
            }
            Frame::DescribeTopic { id, name } => answer(
                id,
                session
                    .principal()
                    .check_sees(&name)
                    .and_then(|()| broker.describe_topic(&name))
                    .map(|t| Frame::Topics {
                        id,
                        topics: vec![t],
                    }),
            ),
            Frame::AdminRequest { id, op, body, wasm } => {
                match super::plugin_admin::handle(&shared, &session, &op, &body, wasm).await {
                    Ok(v) => Frame::AdminResponse {
                        id,
                        body: serde_json::to_vec(&v).expect("json serializes").into(),
                    },
                    Err(e) => Frame::error(id, &e),
                }
            }
            other => {
                let why = format!("{} is not a control request", frame_name(&other));
                return violation(&conn, &mut send, ErrorCode::UnexpectedFrame, &why).await;
            }
        };
        if send.write_all(&reply.to_bytes()).await.is_err() {
            return;
        }
    }
}

/// Ends the stream at shutdown and waits (briefly) until the client has
/// received every answer sent on it: closing the connection discards what
/// it has not.
async fn finish(mut send: quinn::SendStream) {
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(DELIVERY, send.stopped()).await;
    }
}

/// How long a stopping router waits for a client to receive its last
/// answers: many round trips on loopback or a LAN.
const DELIVERY: Duration = Duration::from_secs(1);

fn answer(id: u64, r: Result<Frame, WireError>) -> Frame {
    r.unwrap_or_else(|e| Frame::error(id, &e))
}
