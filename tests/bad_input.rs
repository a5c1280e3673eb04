//! Bad input gets a clear error code; application errors keep the
//! connection; protocol violations close only the offending connection; and
//! nothing acknowledged is ever lost. Raw-protocol cases speak QUIC directly.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::{TestRouter, admin_token, raw_connect, start_router, start_router_with, take};
use switchyard::client::SubscribeOptions;
use switchyard::protocol::{ErrorCode, Frame, Record, close};
use switchyard::transport::FrameReader;

type Reader = FrameReader<quinn::RecvStream>;

/// Connects and completes the version handshake.
async fn raw_session(r: &TestRouter) -> (quinn::Connection, quinn::SendStream, Reader) {
    let conn = raw_connect(r).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = Frame::Hello {
        min_version: 1,
        max_version: 1,
        client: "raw".into(),
        token: Some(admin_token(&r.cert)),
    };
    send.write_all(&hello.to_bytes()).await.unwrap();
    let mut reader = FrameReader::new(recv, 1 << 26);
    assert!(matches!(
        reader.next().await.unwrap(),
        Some(Frame::HelloOk { version: 1, .. })
    ));
    (conn, send, reader)
}

async fn next_frame(reader: &mut Reader) -> Frame {
    tokio::time::timeout(Duration::from_secs(10), reader.next())
        .await
        .expect("router answered")
        .expect("frame decodes")
        .expect("stream open")
}

async fn expect_closed_with(conn: &quinn::Connection, code: u32) {
    let err = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .unwrap();
    match err {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(c.error_code, code.into()),
        other => panic!("expected an application close, got {other}"),
    }
}

fn error_code(f: &Frame) -> ErrorCode {
    match f {
        Frame::Error { code, .. } => *code,
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

#[tokio::test]
async fn application_errors_have_codes_and_keep_the_connection() {
    let r = start_router_with(|c| c.max_partitions = 64).await;
    let c = r.client().await;
    let code = |e: switchyard::client::ClientError| e.code().unwrap();

    assert_eq!(
        code(c.publish("nope", Record::new("x")).await.unwrap_err()),
        ErrorCode::UnknownTopic
    );
    assert_eq!(
        code(c.describe_topic("nope").await.unwrap_err()),
        ErrorCode::UnknownTopic
    );
    assert_eq!(
        code(c.delete_topic("nope").await.unwrap_err()),
        ErrorCode::UnknownTopic
    );
    let sub = c.subscribe(SubscribeOptions::new("nope")).await;
    assert_eq!(code(sub.err().unwrap()), ErrorCode::UnknownTopic);

    for bad in [
        "",
        "has space",
        "slash/y",
        "..",
        &"x".repeat(250),
        "ünïcode",
    ] {
        let e = c.create_topic(bad, 1).await.unwrap_err();
        assert_eq!(code(e), ErrorCode::InvalidTopicName, "name {bad:?}");
    }
    assert_eq!(
        code(c.create_topic("t", 0).await.unwrap_err()),
        ErrorCode::InvalidPartitions
    );
    assert_eq!(
        code(c.create_topic("t", 65).await.unwrap_err()),
        ErrorCode::InvalidPartitions
    );
    c.create_topic("t", 64).await.unwrap();
    assert_eq!(
        code(c.create_topic("t", 2).await.unwrap_err()),
        ErrorCode::TopicExists
    );
    let sub = c
        .subscribe(SubscribeOptions::new("t").group("bad\u{1}group"))
        .await;
    assert_eq!(code(sub.err().unwrap()), ErrorCode::InvalidGroup);

    // Errors carry a message that says what to do.
    let e = c.publish("nope", Record::new("x")).await.unwrap_err();
    assert!(e.to_string().contains("topic create"), "{e}");

    // After all that, the same connection still works.
    let ack = c.publish("t", Record::new("fine")).await.unwrap();
    assert_eq!(ack.offset, 0);
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_stream_continues() {
    let r = start_router_with(|c| c.max_message_bytes = 1024).await;
    let c = r.client().await;
    c.create_topic("t", 1).await.unwrap();
    // The client knows the limit from the handshake and refuses locally.
    let e = c
        .publish("t", Record::new(vec![0u8; 2000]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::MessageTooLarge));

    // A client that does not check gets the same code from the router, for
    // that batch only; the next batch on the same stream is stored.
    let (_conn, _ctl, _) = raw_session(&r).await;
    let (mut send, recv) = _conn.open_bi().await.unwrap();
    let mut reader = FrameReader::new(recv, 1 << 26);
    let big = Frame::PublishBatch {
        seq: 1,
        topic: "t".into(),
        records: vec![
            Record::new("ok").to_raw(),
            Record::new(vec![1u8; 2000]).to_raw(),
        ],
        parts: Vec::new(),
    };
    let small = Frame::PublishBatch {
        seq: 2,
        topic: "t".into(),
        records: vec![Record::new("ok").to_raw()],
        parts: Vec::new(),
    };
    send.write_all(&big.to_bytes()).await.unwrap();
    send.write_all(&small.to_bytes()).await.unwrap();
    let f = next_frame(&mut reader).await;
    assert_eq!(error_code(&f), ErrorCode::MessageTooLarge);
    assert!(matches!(f, Frame::Error { id: 1, .. }));
    assert_eq!(
        next_frame(&mut reader).await,
        Frame::PublishAck {
            seq: 2,
            positions: vec![(0, 0)],
            duplicates: vec![],
            routed: vec![],
            refused: vec![],
        }
    );
    // The rejected batch stored nothing: the one record is the small batch's.
    assert_eq!(c.describe_topic("t").await.unwrap().partitions[0].end, 1);
}

/// Publishes records through the client and returns their acks, so a test
/// can check they survive someone else's bad behaviour.
async fn acked_records(r: &TestRouter) -> (Arc<switchyard::client::Client>, usize) {
    let c = r.client().await;
    c.create_topic("safe", 2).await.unwrap();
    let recs: Vec<Record> = (0..500).map(|i| Record::new(format!("{i}"))).collect();
    let acks = c.publish_batch("safe", recs).await.unwrap();
    (c, acks.len())
}

async fn still_serving(c: &switchyard::client::Client, acked: usize) {
    let ack = c.publish("safe", Record::new("after")).await.unwrap();
    assert!(ack.offset < 1000);
    let mut sub = c.subscribe(SubscribeOptions::new("safe")).await.unwrap();
    let got = take(&mut sub, acked + 1, 10).await;
    assert_eq!(got.len(), acked + 1);
}

/// Sends `bytes` on a fresh data stream of a fresh connection (finishing the
/// stream if `finish`), expects an `Error` with `code` on that stream, and
/// expects the connection closed as a protocol violation.
async fn expect_violation(r: &TestRouter, bytes: &[u8], finish: bool, code: ErrorCode) {
    let (conn, _ctl, _) = raw_session(r).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let mut reader = FrameReader::new(recv, 1 << 26);
    assert_eq!(error_code(&next_frame(&mut reader).await), code);
    expect_closed_with(&conn, close::PROTOCOL_VIOLATION).await;
}

#[tokio::test]
async fn malformed_frames_close_only_that_connection() {
    let r = start_router().await;
    let (good, acked) = acked_records(&r).await;

    // Unknown frame type.
    let unknown = [0, 0, 0, 5, 0xEE, 1, 2, 3, 4];
    expect_violation(&r, &unknown, false, ErrorCode::MalformedFrame).await;

    // A record whose inner lengths run past its end.
    let mut buf = BytesMut::new();
    buf.put_u32(1 + 8 + 2 + 1 + 4 + 4 + 6);
    buf.put_u8(0x20); // PublishBatch
    buf.put_u64(1);
    buf.put_u16(1);
    buf.put_slice(b"t");
    buf.put_u32(1); // one record
    buf.put_u32(6); // of six bytes
    buf.put_u32(100); // claiming a 100-byte key
    buf.put_u16(0);
    expect_violation(&r, &buf, false, ErrorCode::MalformedFrame).await;

    // A frame cut off by the end of its stream.
    let whole = Frame::PublishBatch {
        seq: 1,
        topic: "safe".into(),
        records: vec![Record::new("x").to_raw()],
        parts: Vec::new(),
    }
    .to_bytes();
    expect_violation(
        &r,
        &whole[..whole.len() - 3],
        true,
        ErrorCode::MalformedFrame,
    )
    .await;

    // A control request on a data stream.
    let list = Frame::ListTopics { id: 1 }.to_bytes();
    expect_violation(&r, &list, false, ErrorCode::UnexpectedFrame).await;

    still_serving(&good, acked).await;
}

#[tokio::test]
async fn frames_over_the_limit_are_refused_before_they_are_buffered() {
    let r = start_router_with(|c| {
        c.max_message_bytes = 4096;
        c.max_frame_bytes = 64 << 10;
    })
    .await;
    let (good, acked) = acked_records(&r).await;
    // Announce a 1 GiB frame and send only its header.
    expect_violation(&r, &[0x40, 0, 0, 0, 0x20], false, ErrorCode::FrameTooLarge).await;
    still_serving(&good, acked).await;
}

#[tokio::test]
async fn unsupported_versions_are_refused_with_a_code() {
    let r = start_router().await;
    let conn = raw_connect(&r).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = Frame::Hello {
        min_version: 7,
        max_version: 9,
        client: "future".into(),
        token: None,
    };
    send.write_all(&hello.to_bytes()).await.unwrap();
    let mut reader = FrameReader::new(recv, 1 << 26);
    let f = next_frame(&mut reader).await;
    assert_eq!(error_code(&f), ErrorCode::UnsupportedVersion);
    if let Frame::Error { message, .. } = &f {
        assert!(message.contains("7-9"), "{message}");
    }
    expect_closed_with(&conn, close::UNSUPPORTED_VERSION).await;

    // A first frame that is not Hello is a violation.
    let conn = raw_connect(&r).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(&Frame::ListTopics { id: 1 }.to_bytes())
        .await
        .unwrap();
    let mut reader = FrameReader::new(recv, 1 << 26);
    assert_eq!(
        error_code(&next_frame(&mut reader).await),
        ErrorCode::UnexpectedFrame
    );
    expect_closed_with(&conn, close::PROTOCOL_VIOLATION).await;
}

#[tokio::test]
async fn raw_protocol_roundtrip_matches_the_documented_frames() {
    // What docs/protocol.md promises a client in another language.
    let r = start_router().await;
    let (conn, mut ctl, mut ctl_reader) = raw_session(&r).await;
    let create = Frame::CreateTopic {
        id: 7,
        name: "raw".into(),
        partitions: 1,
        retention_ms: 0,
        retention_bytes: 0,
    };
    ctl.write_all(&create.to_bytes()).await.unwrap();
    match next_frame(&mut ctl_reader).await {
        Frame::Topics { id: 7, topics } => assert_eq!(topics[0].name, "raw"),
        other => panic!("{other:?}"),
    }
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut reader = FrameReader::new(recv, 1 << 26);
    let batch = Frame::PublishBatch {
        seq: 42,
        topic: "raw".into(),
        records: vec![
            Record::new("a").to_raw(),
            Record::new("b").with_key("k").to_raw(),
        ],
        parts: Vec::new(),
    };
    send.write_all(&batch.to_bytes()).await.unwrap();
    assert_eq!(
        next_frame(&mut reader).await,
        Frame::PublishAck {
            seq: 42,
            positions: vec![(0, 0), (0, 1)],
            duplicates: vec![],
            routed: vec![],
            refused: vec![],
        }
    );

    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut reader = FrameReader::new(recv, 1 << 26);
    let sub = Frame::Subscribe {
        group: String::new(),
        topic: "raw".into(),
        start: switchyard::protocol::StartPosition::Earliest,
        credits: 1,
        auto_commit: true,
        mode: switchyard::protocol::SubscribeMode::Stream,
    };
    send.write_all(&sub.to_bytes()).await.unwrap();
    assert_eq!(
        next_frame(&mut reader).await,
        Frame::Subscribed { partitions: 1 }
    );
    assert_eq!(
        next_frame(&mut reader).await,
        Frame::Assignment {
            partitions: vec![0]
        }
    );
    // One credit: one record.
    match next_frame(&mut reader).await {
        Frame::Deliver {
            partition: 0,
            records,
        } => {
            assert_eq!(records.len(), 1);
            assert_eq!(records[0].record.payload(), Bytes::from("a"));
        }
        other => panic!("{other:?}"),
    }
    send.write_all(&Frame::Credit { credits: 5 }.to_bytes())
        .await
        .unwrap();
    match next_frame(&mut reader).await {
        Frame::Deliver { records, .. } => {
            assert_eq!(records.len(), 1);
            assert_eq!(records[0].offset, 1);
            assert_eq!(records[0].record.key(), Some(Bytes::from("k")));
        }
        other => panic!("{other:?}"),
    }
    // Closing our side ends the subscription cleanly.
    send.finish().unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), reader.next())
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn connections_over_the_limit_are_told_why() {
    let r = start_router_with(|c| c.max_connections = 1).await;
    let first = r.client().await;
    let second = switchyard::client::Client::connect(
        switchyard::client::ClientConfig::new(r.addr).with_data_dir(r.dir.path()),
    )
    .await;
    let err = second.err().expect("second connection refused");
    assert!(err.to_string().contains("max_connections"), "{err}");
    // The first is unaffected, and its slot frees when it leaves.
    first.create_topic("t", 1).await.unwrap();
    first.close().await;
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = switchyard::client::Client::connect(
            switchyard::client::ClientConfig::new(r.addr).with_data_dir(r.dir.path()),
        )
        .await;
        if let Ok(c) = c {
            assert_eq!(c.list_topics().await.unwrap().len(), 1);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn raw_queue_frames_and_misplaced_acks() {
    use switchyard::protocol::{DeliveryTag, SubscribeMode};
    let r = start_router().await;
    let (conn, mut ctl, mut ctl_reader) = raw_session(&r).await;
    let create = Frame::CreateTopic {
        id: 1,
        name: "rq".into(),
        partitions: 1,
        retention_ms: 0,
        retention_bytes: 0,
    };
    ctl.write_all(&create.to_bytes()).await.unwrap();
    next_frame(&mut ctl_reader).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut reader = FrameReader::new(recv, 1 << 26);
    let batch = Frame::PublishBatch {
        seq: 1,
        topic: "rq".into(),
        records: vec![Record::new("job").to_raw()],
        parts: Vec::new(),
    };
    send.write_all(&batch.to_bytes()).await.unwrap();
    next_frame(&mut reader).await;

    // Queue subscription: QueueDeliver with a tag; Ack answered by Ok, a
    // second Ack of the same tag by Error 111 with the same id.
    let (mut qs, recv) = conn.open_bi().await.unwrap();
    let mut qr = FrameReader::new(recv, 1 << 26);
    let sub = Frame::Subscribe {
        group: "g".into(),
        topic: "rq".into(),
        start: switchyard::protocol::StartPosition::Earliest,
        credits: 10,
        auto_commit: false,
        mode: SubscribeMode::Queue {
            visibility_ms: 30_000,
        },
    };
    qs.write_all(&sub.to_bytes()).await.unwrap();
    assert_eq!(
        next_frame(&mut qr).await,
        Frame::Subscribed { partitions: 1 }
    );
    let tag = match next_frame(&mut qr).await {
        Frame::QueueDeliver { records } => {
            assert_eq!(records.len(), 1);
            assert_eq!(records[0].record.payload(), Bytes::from("job"));
            records[0].tag
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        tag,
        DeliveryTag {
            partition: 0,
            offset: 0,
            attempt: 1
        }
    );
    let ack = |id| Frame::Ack {
        id,
        items: vec![tag],
    };
    qs.write_all(&ack(5).to_bytes()).await.unwrap();
    assert_eq!(next_frame(&mut qr).await, Frame::Ok { id: 5 });
    qs.write_all(&ack(6).to_bytes()).await.unwrap();
    let f = next_frame(&mut qr).await;
    assert!(matches!(f, Frame::Error { id: 6, .. }), "{f:?}");
    assert_eq!(error_code(&f), ErrorCode::UnknownDelivery);

    // An Ack on a stream subscription is a protocol violation: that
    // connection closes, the router keeps serving others.
    let (mut ss, recv) = conn.open_bi().await.unwrap();
    let mut sr = FrameReader::new(recv, 1 << 26);
    let stream_sub = Frame::Subscribe {
        group: String::new(),
        topic: "rq".into(),
        start: switchyard::protocol::StartPosition::Earliest,
        credits: 10,
        auto_commit: true,
        mode: SubscribeMode::Stream,
    };
    ss.write_all(&stream_sub.to_bytes()).await.unwrap();
    assert_eq!(
        next_frame(&mut sr).await,
        Frame::Subscribed { partitions: 1 }
    );
    ss.write_all(&ack(7).to_bytes()).await.unwrap();
    loop {
        let f = next_frame(&mut sr).await;
        if let Frame::Error { .. } = f {
            assert_eq!(error_code(&f), ErrorCode::UnexpectedFrame);
            break;
        }
    }
    expect_closed_with(&conn, close::PROTOCOL_VIOLATION).await;
    let c = r.client().await;
    assert_eq!(c.describe_topic("rq").await.unwrap().partitions[0].end, 1);
}
