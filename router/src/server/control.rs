//! The control stream: topic administration, request/response by id.

use std::sync::Arc;

use super::Shared;
use super::connection::{frame_name, read_failed, violation};
use crate::protocol::{ErrorCode, Frame, WireError};
use crate::transport::FrameReader;

pub(super) async fn serve(
    mut send: quinn::SendStream,
    mut reader: FrameReader<quinn::RecvStream>,
    shared: Arc<Shared>,
    conn: quinn::Connection,
) {
    let broker = &shared.broker;
    loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => return read_failed(&conn, &mut send, e).await,
        };
        let reply = match frame {
            Frame::CreateTopic {
                id,
                name,
                partitions,
                retention_ms,
                retention_bytes,
            } => answer(
                id,
                broker
                    .create_topic(&name, partitions, retention_ms, retention_bytes)
                    .await
                    .map(|t| Frame::Topics {
                        id,
                        topics: vec![t],
                    }),
            ),
            Frame::DeleteTopic { id, name } => answer(
                id,
                broker.delete_topic(&name).await.map(|()| Frame::Ok { id }),
            ),
            Frame::ListTopics { id } => Frame::Topics {
                id,
                topics: broker.list_topics(),
            },
            Frame::DescribeTopic { id, name } => answer(
                id,
                broker.describe_topic(&name).map(|t| Frame::Topics {
                    id,
                    topics: vec![t],
                }),
            ),
            Frame::AdminRequest { id, op, body, wasm } => {
                match super::plugin_admin::handle(broker, &op, &body, wasm).await {
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
