//! One client connection: the version handshake on the control stream, then
//! a task per stream, chosen by the stream's first frame.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tracing::Instrument;

use rustls::pki_types::CertificateDer;

use super::metrics::Open;
use super::session::Session;
use super::{Shared, control, publish, subscribe, tls};
use crate::protocol::{ErrorCode, Frame, close, negotiate};
use crate::transport::{Budget, FrameReader, ReadFrameError};

/// How long a new connection has to send `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn handle(
    arriving: super::Arriving,
    shared: Arc<Shared>,
    handshaking: super::admission::Handshaking,
) {
    let remote = arriving.remote_address();
    let conn = match arriving.connection().await {
        Ok(c) => c,
        Err(e) => {
            shared
                .stats
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    tracing::debug!(%remote, "connection open");
    let max_frame = shared.config.max_frame_bytes;
    let budget = Budget::new(
        shared.config.max_connection_partial_bytes,
        Some(shared.partial_budget.clone()),
    );
    let frame_timeout = Duration::from_millis(shared.config.frame_timeout_ms);
    let reader =
        |recv| FrameReader::new(recv, max_frame).with_limits(budget.clone(), frame_timeout);

    let hello = hello(&conn, &shared, reader);
    let (control, session) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, hello).await {
        Ok(Ok(c)) => c,
        Ok(Err(reason)) => {
            shared
                .stats
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(%remote, %reason, "connection refused");
            return;
        }
        Err(_) => {
            shared
                .stats
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            conn.close(close::PROTOCOL_VIOLATION.into(), b"no Hello within 10 s");
            return;
        }
    };
    // Admitted: no longer a handshake in progress for its address.
    drop(handshaking);
    let session = Arc::new(session);
    shared
        .stats
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    let _open = Open::new(&shared, |s| &s.connections);
    let principal = session.principal().name.clone();
    tracing::info!(%remote, %principal, "connection open");
    // Everything its streams log names the connection and principal.
    let span = tracing::info_span!("connection", %remote, %principal);
    let max_idle = Duration::from_millis(shared.config.connection_max_idle_ms);
    let mut idle_check = tokio::time::interval(max_idle / 4);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut principals = shared.auth.watch();

    let mut shutdown = shared.shutdown.clone();
    // On shutdown, publish streams drain (their queued batches are acked)
    // and the control stream answers the request in progress.
    let mut publishers = tokio::task::JoinSet::new();
    let mut others = tokio::task::JoinSet::new();
    {
        let (send, reader) = control;
        let shared = shared.clone();
        let conn = conn.clone();
        let session = session.clone();
        others.spawn(
            async move { control::serve(send, reader, shared, conn, session).await }
                .instrument(span.clone()),
        );
    }
    let shutting_down = loop {
        tokio::select! {
            _ = shutdown.changed() => break true,
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    session.touch();
                    let shared = shared.clone();
                    let conn = conn.clone();
                    publishers.spawn(
                        stream(send, reader(recv), shared, conn, session.clone())
                            .instrument(span.clone()),
                    );
                }
                Err(e) => {
                    tracing::info!(%remote, %principal, reason = %e, "connection closed");
                    break false;
                }
            },
            Ok(()) = principals.changed() => {
                if let Err(why) = session.recheck(&shared.auth) {
                    tracing::info!(%remote, principal = %session.principal().name, %why, "closing connection");
                    conn.close(close::UNAUTHENTICATED.into(), why.as_bytes());
                    break false;
                }
            }
            _ = idle_check.tick() => {
                // Streams count as activity; the control stream does not.
                if publishers.is_empty() && session.idle_for() >= max_idle {
                    let why = format!(
                        "idle for {} ms with no stream open (connection_max_idle_ms); reconnect when needed",
                        max_idle.as_millis()
                    );
                    tracing::debug!(%remote, "closing idle connection");
                    conn.close(close::IDLE.into(), why.as_bytes());
                    break false;
                }
            }
            Some(_) = publishers.join_next(), if !publishers.is_empty() => session.touch(),
            Some(_) = others.join_next(), if !others.is_empty() => {}
        }
    };
    if shutting_down {
        // Stream tasks watch the same signal: publish streams stop reading,
        // wait for the acks of what they queued and finish; subscriptions
        // end; the control stream answers the request in progress. Give
        // them a bounded time, then close.
        let drain = async {
            while publishers.join_next().await.is_some() {}
            while others.join_next().await.is_some() {}
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
            tracing::warn!(%remote, "streams did not drain in time");
        }
        conn.close(close::SHUTTING_DOWN.into(), b"router shutting down");
    }
    others.shutdown().await;
    publishers.shutdown().await;
}

/// How long streams get to finish when the router shuts down.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

type Control = (quinn::SendStream, FrameReader<quinn::RecvStream>);

/// The handshake: `Hello`, the version, then who the client is (its token,
/// else its certificate) and whether its connection quota has room; only
/// then `HelloOk`.
async fn hello(
    conn: &quinn::Connection,
    shared: &Shared,
    reader: impl Fn(quinn::RecvStream) -> FrameReader<quinn::RecvStream>,
) -> Result<(Control, Session), String> {
    let (mut send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let mut reader = reader(recv);
    let (version, client, token) = match reader.next().await {
        Ok(Some(Frame::Hello {
            min_version,
            max_version,
            client,
            token,
        })) => match negotiate(min_version, max_version) {
            Some(version) => (version, client, token),
            None => {
                let msg = format!(
                    "client speaks protocol versions {min_version}-{max_version}; this router speaks {}-{}: upgrade the older side",
                    crate::protocol::MIN_VERSION,
                    crate::protocol::MAX_VERSION
                );
                refuse(
                    conn,
                    &mut send,
                    ErrorCode::UnsupportedVersion,
                    &msg,
                    close::UNSUPPORTED_VERSION,
                )
                .await;
                return Err(msg);
            }
        },
        Ok(Some(other)) => {
            let why = format!("expected Hello, got {}", frame_name(&other));
            violation(conn, &mut send, ErrorCode::UnexpectedFrame, &why).await;
            return Err("no Hello".into());
        }
        Ok(None) => return Err("control stream closed before Hello".into()),
        Err(e) => {
            let why = e.to_string();
            read_failed(conn, &mut send, e).await;
            return Err(why);
        }
    };
    let certificate = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(tls::certificate_principal));
    let remote = conn.remote_address();
    let (principal, credential) = match shared
        .auth
        .authenticate(token.as_deref(), certificate.as_deref())
    {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(%remote, client, reason = %e.message, "connection refused: unauthenticated");
            refuse(conn, &mut send, e.code, &e.message, close::UNAUTHENTICATED).await;
            return Err(e.message);
        }
    };
    let usage = shared.auth.usage(&principal.name);
    let held = match usage.connect(&principal.quotas, &principal.name) {
        Ok(h) => h,
        Err(e) => {
            tracing::info!(%remote, principal = %principal.name, "connection refused: quota");
            refuse(
                conn,
                &mut send,
                e.code,
                &e.message,
                close::TOO_MANY_CONNECTIONS,
            )
            .await;
            return Err(e.message);
        }
    };
    let ok = Frame::HelloOk {
        version,
        server: format!("switchyard {}", env!("CARGO_PKG_VERSION")),
        max_message_bytes: shared.config.max_message_bytes as u32,
        max_frame_bytes: shared.config.max_frame_bytes as u32,
        // Version 1 clients would take the field for trailing garbage.
        cluster: match &shared.config.replica {
            Some(r) if version >= 2 => r.control.nodes(),
            _ => Vec::new(),
        },
        groups: match shared
            .config
            .replica
            .as_ref()
            .and_then(|r| r.placement.as_ref())
        {
            Some(p) if version >= 2 => p.groups,
            _ => 1,
        },
    };
    send.write_all(&ok.to_bytes())
        .await
        .map_err(|e| e.to_string())?;
    tracing::debug!(%remote, client, version, principal = %principal.name, "hello");
    Ok((
        (send, reader),
        Session::new(principal, credential, usage, held),
    ))
}

/// Answers the handshake with an error and closes the connection.
async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: ErrorCode,
    message: &str,
    close_code: u32,
) {
    let f = Frame::Error {
        id: 0,
        code,
        message: message.to_string(),
    };
    let _ = send.write_all(&f.to_bytes()).await;
    let _ = send.finish();
    // Give the error frame a moment to leave before closing.
    let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
    let reason = &message.as_bytes()[..message.len().min(1000)];
    conn.close(close_code.into(), reason);
}

/// A new stream: its first frame says what it is.
async fn stream(
    mut send: quinn::SendStream,
    mut reader: FrameReader<quinn::RecvStream>,
    shared: Arc<Shared>,
    conn: quinn::Connection,
    session: Arc<Session>,
) {
    let _open = Open::new(&shared, |s| &s.streams);
    let mut shutdown = shared.shutdown.clone();
    let first = tokio::select! {
        f = reader.next() => f,
        _ = shutdown.wait_for(|s| *s) => return,
    };
    match first {
        Ok(Some(first @ Frame::PublishBatch { .. })) => {
            // A stream's logs name the topic its first batch is for.
            let topic = match &first {
                Frame::PublishBatch { topic, .. } => topic.clone(),
                _ => String::new(),
            };
            publish::serve(first, send, reader, shared, conn, session)
                .instrument(tracing::info_span!("publish", %topic))
                .await
        }
        Ok(Some(first @ Frame::Subscribe { .. })) => {
            let (topic, group) = match &first {
                Frame::Subscribe { topic, group, .. } => (topic.clone(), group.clone()),
                _ => Default::default(),
            };
            subscribe::serve(first, send, reader, shared, conn, session)
                .instrument(tracing::info_span!("subscription", %topic, %group))
                .await
        }
        Ok(Some(other)) => {
            let why = format!(
                "a stream must start with PublishBatch or Subscribe, not {}",
                frame_name(&other)
            );
            violation(&conn, &mut send, ErrorCode::UnexpectedFrame, &why).await;
        }
        Ok(None) => {}
        Err(e) => read_failed(&conn, &mut send, e).await,
    }
}

/// Reports a protocol violation on `send` and closes the whole connection,
/// as the protocol requires; other connections are untouched.
pub(super) async fn violation(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: ErrorCode,
    why: &str,
) {
    tracing::debug!(remote = %conn.remote_address(), why, "protocol violation");
    let f = Frame::Error {
        id: 0,
        code,
        message: why.to_string(),
    };
    let mut buf = BytesMut::new();
    f.encode(&mut buf);
    let _ = tokio::time::timeout(Duration::from_millis(200), send.write_all(&buf)).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
    conn.close(close::PROTOCOL_VIOLATION.into(), why.as_bytes());
}

/// Handles a failed frame read: a decode error is a violation; a stream
/// error (reset, connection lost) just ends the stream.
pub(super) async fn read_failed(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    e: ReadFrameError,
) {
    match e {
        ReadFrameError::Decode(d) => violation(conn, send, d.code(), &d.to_string()).await,
        ReadFrameError::Truncated => {
            violation(
                conn,
                send,
                ErrorCode::MalformedFrame,
                "stream ended inside a frame",
            )
            .await
        }
        ReadFrameError::Io(e) => tracing::debug!(error = %e, "stream ended"),
        e @ (ReadFrameError::OverBudget { .. } | ReadFrameError::Stalled(_)) => {
            let why = e.to_string();
            tracing::info!(remote = %conn.remote_address(), %why, "connection closed: limit");
            refuse(
                conn,
                send,
                ErrorCode::LimitExceeded,
                &why,
                close::LIMIT_EXCEEDED,
            )
            .await;
        }
    }
}

/// A frame's name, for error messages.
pub(super) fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "Hello",
        Frame::HelloOk { .. } => "HelloOk",
        Frame::Error { .. } => "Error",
        Frame::Ok { .. } => "Ok",
        Frame::CreateTopic { .. } => "CreateTopic",
        Frame::DeleteTopic { .. } => "DeleteTopic",
        Frame::ListTopics { .. } => "ListTopics",
        Frame::DescribeTopic { .. } => "DescribeTopic",
        Frame::Topics { .. } => "Topics",
        Frame::PublishBatch { .. } => "PublishBatch",
        Frame::PublishAck { .. } => "PublishAck",
        Frame::Subscribe { .. } => "Subscribe",
        Frame::QueueDeliver { .. } => "QueueDeliver",
        Frame::Ack { .. } => "Ack",
        Frame::Nack { .. } => "Nack",
        Frame::Extend { .. } => "Extend",
        Frame::Subscribed { .. } => "Subscribed",
        Frame::Assignment { .. } => "Assignment",
        Frame::Credit { .. } => "Credit",
        Frame::Commit { .. } => "Commit",
        Frame::Deliver { .. } => "Deliver",
        Frame::AdminRequest { .. } => "AdminRequest",
        Frame::AdminResponse { .. } => "AdminResponse",
    }
}
