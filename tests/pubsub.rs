//! Publish/subscribe through the client library against a real router:
//! QUIC on 127.0.0.1, redb in a temporary directory.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{start_router, take, test_config};
use futures::StreamExt;
use switchyard::client::{SubscribeOptions, Subscription};
use switchyard::protocol::{Record, StartPosition};
use switchyard::server::Router;

#[tokio::test]
async fn published_records_come_back_with_key_headers_and_payload() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("orders", 3).await.unwrap();
    let rec = Record::new("hello")
        .with_key("customer-7")
        .with_header("trace", "abc")
        .with_header("bin", vec![0u8, 255]);
    let ack = c.publish("orders", rec).await.unwrap();
    assert!(ack.partition < 3);
    assert_eq!(ack.offset, 0);

    let mut sub = c.subscribe(SubscribeOptions::new("orders")).await.unwrap();
    let got = take(&mut sub, 1, 10).await.remove(0);
    assert_eq!(got.partition, ack.partition);
    assert_eq!(got.offset, 0);
    assert_eq!(got.key(), Some(Bytes::from("customer-7")));
    assert_eq!(got.header("trace"), Some(Bytes::from("abc")));
    assert_eq!(got.header("bin"), Some(Bytes::from(vec![0u8, 255])));
    assert_eq!(got.payload(), Bytes::from("hello"));
    assert!(got.timestamp_ms > 1_700_000_000_000);

    // A record published after subscribing arrives too.
    let ack2 = c
        .publish("orders", Record::new("second").with_key("customer-7"))
        .await
        .unwrap();
    assert_eq!((ack2.partition, ack2.offset), (ack.partition, 1));
    let got = take(&mut sub, 1, 10).await.remove(0);
    assert_eq!(got.payload(), Bytes::from("second"));
}

#[tokio::test]
async fn batch_acks_return_positions_in_input_order() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("t", 2).await.unwrap();
    let recs: Vec<Record> = (0..10_000).map(|i| Record::new(format!("{i}"))).collect();
    let acks = c.publish_batch("t", recs).await.unwrap();
    assert_eq!(acks.len(), 10_000);
    let unique: HashSet<_> = acks.iter().map(|a| (a.partition, a.offset)).collect();
    assert_eq!(unique.len(), 10_000, "every record has its own position");
    let info = c.describe_topic("t").await.unwrap();
    let total: u64 = info.partitions.iter().map(|p| p.end - p.start).sum();
    assert_eq!(total, 10_000);
    // Offsets within a partition follow input order.
    let mut last: HashMap<u32, u64> = HashMap::new();
    for a in &acks {
        if let Some(prev) = last.insert(a.partition, a.offset) {
            assert_eq!(a.offset, prev + 1);
        }
    }
}

#[tokio::test]
async fn per_key_order_holds_across_partitions_with_concurrent_producers() {
    let r = start_router().await;
    let admin = r.client().await;
    admin.create_topic("events", 4).await.unwrap();
    const PRODUCERS: usize = 4;
    const PER_PRODUCER: usize = 2_000;
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let c = r.client().await;
        tasks.push(tokio::spawn(async move {
            let mut pending = Vec::new();
            for chunk in (0..PER_PRODUCER).collect::<Vec<_>>().chunks(50) {
                let batch = chunk
                    .iter()
                    .map(|i| Record::new(format!("{p}:{i}")).with_key(format!("k{}", i % 16)))
                    .collect();
                pending.push(c.queue_batch("events", batch).await.unwrap());
            }
            for f in pending {
                f.await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut sub = admin
        .subscribe(SubscribeOptions::new("events"))
        .await
        .unwrap();
    let msgs = take(&mut sub, PRODUCERS * PER_PRODUCER, 30).await;
    let mut key_partition: HashMap<Bytes, u32> = HashMap::new();
    let mut by_partition: BTreeMap<u32, Vec<(u64, String, Bytes)>> = BTreeMap::new();
    for m in &msgs {
        let key = m.key().unwrap();
        let p = *key_partition.entry(key.clone()).or_insert(m.partition);
        assert_eq!(p, m.partition, "key {key:?} seen in two partitions");
        let payload = String::from_utf8(m.payload().to_vec()).unwrap();
        by_partition
            .entry(m.partition)
            .or_default()
            .push((m.offset, payload, key));
    }
    assert!(
        by_partition.len() > 1,
        "16 keys should spread over several partitions"
    );
    // Within each partition, each producer's records for each key appear in
    // the order it published them.
    let mut last: HashMap<(String, Bytes), usize> = HashMap::new();
    for (_, mut recs) in by_partition {
        recs.sort_by_key(|r| r.0);
        for (_, payload, key) in recs {
            let (producer, seq) = payload.split_once(':').unwrap();
            let seq: usize = seq.parse().unwrap();
            if let Some(prev) = last.insert((producer.to_string(), key.clone()), seq) {
                assert!(
                    seq > prev,
                    "producer {producer} key {key:?}: {seq} after {prev}"
                );
            }
        }
    }
    assert_eq!(last.len(), PRODUCERS * 16);
}

/// What group members received: (member, partition, offset).
type Seen = Arc<Mutex<Vec<(&'static str, u32, u64)>>>;

/// One group member, recording what it receives until told to leave; then
/// it leaves gracefully and reads what was already sent to it.
fn member(
    mut sub: Subscription,
    name: &'static str,
    seen: Seen,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                m = sub.next() => match m {
                    Some(Ok(m)) => seen.lock().unwrap().push((name, m.partition, m.offset)),
                    other => panic!("{name}: subscription ended early: {other:?}"),
                },
                _ = &mut stop => break,
            }
        }
        sub.leave();
        while let Some(m) = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("stream ends after leave")
        {
            let m = m.unwrap();
            seen.lock().unwrap().push((name, m.partition, m.offset));
        }
    })
}

async fn wait_for(seen: &Seen, what: impl Fn(&[(&'static str, u32, u64)]) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !what(&seen.lock().unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn group_rebalance_on_join_and_leave_loses_nothing_and_delivers_each_record_once() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("work", 6).await.unwrap();
    const TOTAL: usize = 20_000;

    // A producer keeps publishing while members come and go.
    let producer = {
        let c = r.client().await;
        tokio::spawn(async move {
            for i in 0..TOTAL / 100 {
                let batch = (0..100)
                    .map(|j| Record::new(format!("{}", i * 100 + j)).with_key(format!("{j}")))
                    .collect();
                c.publish_batch("work", batch).await.unwrap();
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    };

    let seen: Seen = Arc::default();
    let opts = || SubscribeOptions::new("work").group("g").prefetch(64);
    let count = |name: &'static str| {
        move |v: &[(&'static str, u32, u64)]| v.iter().filter(|x| x.0 == name).count()
    };

    let (stop_a, a_rx) = tokio::sync::oneshot::channel();
    let a = member(c.subscribe(opts()).await.unwrap(), "a", seen.clone(), a_rx);
    wait_for(&seen, |v| count("a")(v) >= 2_000).await;

    let c2 = r.client().await;
    let mut b_sub = c2.subscribe(opts()).await.unwrap();
    let b_assignment = tokio::time::timeout(Duration::from_secs(10), b_sub.assignment_changed())
        .await
        .expect("b gets partitions");
    assert_eq!(b_assignment.len(), 3, "two members split six partitions");
    let (stop_b, b_rx) = tokio::sync::oneshot::channel();
    let b = member(b_sub, "b", seen.clone(), b_rx);
    wait_for(&seen, |v| count("b")(v) >= 1_000).await;

    let c3 = r.client().await;
    let (stop_c, c_rx) = tokio::sync::oneshot::channel();
    let cm = member(c3.subscribe(opts()).await.unwrap(), "c", seen.clone(), c_rx);
    wait_for(&seen, |v| count("c")(v) >= 500).await;

    // A leaves while traffic flows; B and C take over its partitions.
    stop_a.send(()).unwrap();
    a.await.unwrap();
    let a_total = count("a")(&seen.lock().unwrap());

    producer.await.unwrap();
    wait_for(&seen, |v| v.len() >= TOTAL).await;
    stop_b.send(()).unwrap();
    stop_c.send(()).unwrap();
    b.await.unwrap();
    cm.await.unwrap();

    let seen = seen.lock().unwrap().clone();
    let mut owner: HashMap<(u32, u64), &str> = HashMap::new();
    for (name, p, o) in seen.iter() {
        if let Some(prev) = owner.insert((*p, *o), name) {
            panic!("partition {p} offset {o} delivered to both {prev} and {name}");
        }
    }
    assert_eq!(owner.len(), TOTAL, "every record delivered exactly once");
    assert_eq!(
        count("a")(&seen),
        a_total,
        "nothing reached a after it left"
    );
    let info = c.describe_topic("work").await.unwrap();
    for (p, part) in info.partitions.iter().enumerate() {
        for o in part.start..part.end {
            assert!(
                owner.contains_key(&(p as u32, o)),
                "partition {p} offset {o} lost"
            );
        }
    }
}

#[tokio::test]
async fn replay_starts_at_an_offset_or_a_time() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("log", 1).await.unwrap();
    for i in 0..10 {
        c.publish("log", Record::new(format!("{i}"))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    for i in 10..20 {
        c.publish("log", Record::new(format!("{i}"))).await.unwrap();
    }
    let mut all = c.subscribe(SubscribeOptions::new("log")).await.unwrap();
    let msgs = take(&mut all, 20, 10).await;
    let t10 = msgs[10].timestamp_ms;
    assert!(
        t10 > msgs[9].timestamp_ms,
        "the pause separates the two halves"
    );

    let mut from_offset = c
        .subscribe(SubscribeOptions::new("log").start(StartPosition::Offset(5)))
        .await
        .unwrap();
    let got = take(&mut from_offset, 15, 10).await;
    assert_eq!(got[0].offset, 5);
    assert_eq!(got[0].payload(), Bytes::from("5"));
    assert_eq!(got[14].offset, 19);

    let mut from_time = c
        .subscribe(SubscribeOptions::new("log").start(StartPosition::Timestamp(t10)))
        .await
        .unwrap();
    let got = take(&mut from_time, 10, 10).await;
    assert_eq!(got[0].offset, 10);
    assert_eq!(got[9].offset, 19);

    let mut latest = c
        .subscribe(SubscribeOptions::new("log").start(StartPosition::Latest))
        .await
        .unwrap();
    c.publish("log", Record::new("new")).await.unwrap();
    let got = take(&mut latest, 1, 10).await;
    assert_eq!((got[0].offset, got[0].payload()), (20, Bytes::from("new")));
}

#[tokio::test]
async fn restart_keeps_topics_records_and_committed_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::start(test_config(dir.path())).await.unwrap();
    let c = common::connect(router.local_addr(), router.cert_path()).await;
    c.create_topic("durable", 1).await.unwrap();
    let recs = (0..100).map(|i| Record::new(format!("{i}"))).collect();
    c.publish_batch("durable", recs).await.unwrap();
    let mut sub = c
        .subscribe(
            SubscribeOptions::new("durable")
                .group("g")
                .auto_commit(false)
                .prefetch(100),
        )
        .await
        .unwrap();
    let got = take(&mut sub, 60, 10).await;
    sub.commit_message(&got[59]).unwrap();
    sub.close().await;
    c.close().await;
    router.shutdown().await;

    let router = Router::start(test_config(dir.path())).await.unwrap();
    let c = common::connect(router.local_addr(), router.cert_path()).await;
    let topics = c.list_topics().await.unwrap();
    assert_eq!(topics.len(), 1);
    assert_eq!(topics[0].name, "durable");
    assert_eq!(topics[0].partitions[0].end, 100);
    let mut sub = c
        .subscribe(SubscribeOptions::new("durable").group("g"))
        .await
        .unwrap();
    let got = take(&mut sub, 40, 10).await;
    assert_eq!(got[0].offset, 60, "resumes after the committed offset");
    assert_eq!(got[0].payload(), Bytes::from("60"));
    let mut all = c.subscribe(SubscribeOptions::new("durable")).await.unwrap();
    let got = take(&mut all, 100, 10).await;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.payload(), Bytes::from(format!("{i}")));
    }
    // New appends continue the offsets.
    let ack = c.publish("durable", Record::new("after")).await.unwrap();
    assert_eq!(ack.offset, 100);
    router.shutdown().await;
}

#[tokio::test]
async fn a_stalled_subscriber_does_not_hold_back_another() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("feed", 1).await.unwrap();
    let recs: Vec<Record> = (0..20_000)
        .map(|i| Record::new(vec![i as u8; 100]))
        .collect();
    c.publish_batch("feed", recs).await.unwrap();

    // The slow subscriber never reads past its first message: its prefetch
    // window of 10 fills and stays full.
    let slow_client = r.client().await;
    let mut slow = slow_client
        .subscribe(SubscribeOptions::new("feed").prefetch(10))
        .await
        .unwrap();
    take(&mut slow, 1, 10).await;

    let mut fast = c
        .subscribe(SubscribeOptions::new("feed").prefetch(2048))
        .await
        .unwrap();
    let got = take(&mut fast, 20_000, 30).await;
    assert_eq!(got.last().unwrap().offset, 19_999);

    // Meanwhile the slow one was sent exactly its window: one taken, nine
    // waiting, and no more however long it waits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(slow.pending_len(), 9);
}

#[tokio::test]
async fn retention_deletes_by_size_and_by_age() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic_with("by-size", 1, 0, 10_000).await.unwrap();
    c.create_topic_with("by-age", 1, 200, 0).await.unwrap();
    let recs: Vec<Record> = (0..100).map(|i| Record::new(vec![i as u8; 1000])).collect();
    c.publish_batch("by-size", recs.clone()).await.unwrap();
    c.publish_batch("by-age", recs).await.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let size = c.describe_topic("by-size").await.unwrap().partitions[0];
        let age = c.describe_topic("by-age").await.unwrap().partitions[0];
        if size.bytes <= 10_000 && age.start == 100 {
            assert_eq!(size.end, 100);
            assert!(size.start >= 89, "about ten 1 KB records fit in 10 KB");
            assert_eq!(age.bytes, 0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention did not run: {size:?} {age:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Subscribers start at the retained start.
    let start = c.describe_topic("by-size").await.unwrap().partitions[0].start;
    let mut sub = c.subscribe(SubscribeOptions::new("by-size")).await.unwrap();
    let got = take(&mut sub, 1, 10).await;
    assert_eq!(got[0].offset, start);
}

#[tokio::test]
async fn deleted_topics_are_gone_and_recreated_ones_start_empty() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("temp", 2).await.unwrap();
    c.publish("temp", Record::new("x")).await.unwrap();
    let mut sub = c.subscribe(SubscribeOptions::new("temp")).await.unwrap();
    take(&mut sub, 1, 10).await;
    c.delete_topic("temp").await.unwrap();
    // The live subscriber is told.
    let end = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap();
    let err = end.unwrap().unwrap_err();
    assert_eq!(
        err.code(),
        Some(switchyard::protocol::ErrorCode::UnknownTopic)
    );
    assert!(c.list_topics().await.unwrap().is_empty());
    c.create_topic("temp", 2).await.unwrap();
    let info = c.describe_topic("temp").await.unwrap();
    assert!(info.partitions.iter().all(|p| p.end == 0 && p.bytes == 0));
}

#[tokio::test]
async fn graceful_shutdown_acks_queued_batches_and_keeps_every_acked_record() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::start(test_config(dir.path())).await.unwrap();
    let c = common::connect(router.local_addr(), router.cert_path()).await;
    c.create_topic("t", 2).await.unwrap();
    let mut acked = Vec::new();
    for b in 0..10 {
        let recs = (0..100).map(|i| Record::new(format!("{b}-{i}"))).collect();
        acked.extend(c.publish_batch("t", recs).await.unwrap());
    }
    // Shut down with more batches in flight: each is either acked (and then
    // durable) or fails with a clear error; none hangs.
    let mut pending = Vec::new();
    for b in 10..200 {
        let recs = (0..100).map(|i| Record::new(format!("{b}-{i}"))).collect();
        pending.push(c.queue_batch("t", recs).await.unwrap());
    }
    tokio::time::timeout(Duration::from_secs(15), router.shutdown())
        .await
        .expect("shutdown completes");
    for p in pending {
        match tokio::time::timeout(Duration::from_secs(15), p)
            .await
            .expect("every ack resolves")
        {
            Ok(a) => acked.extend(a),
            Err(e) => assert!(
                matches!(e, switchyard::client::ClientError::ConnectionLost(_))
                    || e.code() == Some(switchyard::protocol::ErrorCode::ShuttingDown),
                "unexpected error {e}"
            ),
        }
    }
    assert!(
        !acked.is_empty(),
        "batches queued before shutdown are acked"
    );

    let router = Router::start(test_config(dir.path())).await.unwrap();
    let c = common::connect(router.local_addr(), router.cert_path()).await;
    let info = c.describe_topic("t").await.unwrap();
    for a in &acked {
        assert!(
            a.offset < info.partitions[a.partition as usize].end,
            "{a:?} lost"
        );
    }
    router.shutdown().await;
}
