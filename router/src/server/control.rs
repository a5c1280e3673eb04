//! The control stream: topic administration, request/response by id.

use std::sync::Arc;

use super::Shared;
use super::connection::{frame_name, read_failed, violation};
use super::session::Session;
use crate::auth::Class;
use crate::protocol::{ErrorCode, Frame, WireError};
use crate::transport::FrameReader;

pub(super) async fn serve(
    mut send: quinn::SendStream,
    mut reader: FrameReader<quinn::RecvStream>,
    shared: Arc<Shared>,
    conn: quinn::Connection,
    session: Arc<Session>,
) {
    let broker = &shared.broker;
    loop {
        let frame = match reader.next().await {
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

fn answer(id: u64, r: Result<Frame, WireError>) -> Frame {
    r.unwrap_or_else(|e| Frame::error(id, &e))
}
