//! Queue subscriptions against a real router: competing consumers, acks,
//! visibility timeouts, retries, dead letters, delay, priority, TTL,
//! idempotent publish, backlog limits and restarts.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::json;
use switchyard::client::{Client, QueueConsumer, QueueMessage, QueueOptions};
use switchyard::protocol::{DeliveryTag, ErrorCode, Record};
use switchyard::server::Router;

/// Starts (or restarts) a router on the data directory `dir`.
async fn start_in(dir: &std::path::Path) -> Router {
    Router::start(test_config(dir)).await.unwrap()
}

/// Asserts nothing arrives for `ms` milliseconds.
async fn quiet(c: &mut QueueConsumer, ms: u64) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(ms), c.next()).await {
        panic!("expected no delivery, got {:?}", m.map(|m| m.tag));
    }
}

fn text(m: &QueueMessage) -> String {
    String::from_utf8(m.payload().to_vec()).unwrap()
}

async fn publish_n(c: &Client, topic: &str, n: usize, f: impl Fn(usize) -> Record) {
    let mut pending = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let batch = chunk.iter().map(|&i| f(i)).collect();
        pending.push(c.queue_batch(topic, batch).await.unwrap());
    }
    for p in pending {
        p.await.unwrap();
    }
}

#[tokio::test]
async fn competing_consumers_share_messages_each_acked_once() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("jobs", 4).await.unwrap();
    publish_n(&c, "jobs", 3000, |i| {
        Record::new(format!("{i}")).with_key(format!("k{}", i % 50))
    })
    .await;

    let mut tasks = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for w in 0..3 {
        let c = r.client().await;
        let tx = tx.clone();
        let mut q = c
            .subscribe_queue(QueueOptions::new("jobs", "workers").prefetch(64))
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(m)) = q.next().await {
                q.ack(&m).await.unwrap();
                if tx.send((w, text(&m), m.attempt())).is_err() {
                    break;
                }
            }
            drop(c);
        }));
    }
    drop(tx);
    let mut seen = HashSet::new();
    let mut per_worker = [0usize; 3];
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 3000 {
        let left = deadline.saturating_duration_since(Instant::now());
        let (w, body, attempt) = tokio::time::timeout(left, rx.recv())
            .await
            .expect("all messages within 30 s")
            .unwrap();
        assert_eq!(attempt, 1, "nothing was redelivered");
        assert!(seen.insert(body.clone()), "{body} delivered twice");
        per_worker[w] += 1;
    }
    assert!(
        per_worker.iter().all(|&n| n > 0),
        "every member got work: {per_worker:?}"
    );
    let stats = c.queue_stats(Some("jobs")).await.unwrap();
    assert_eq!(stats[0]["acked"], 3000);
    assert_eq!(stats[0]["backlog"], 0);
    for t in tasks {
        t.abort();
    }
}

#[tokio::test]
async fn unacked_message_reappears_after_visibility_timeout_with_attempt_raised() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("vis", 1).await.unwrap();
    c.set_topic_policy("vis", json!({ "retry_base_ms": 50 }))
        .await
        .unwrap();
    c.publish("vis", Record::new("job")).await.unwrap();

    let opts = QueueOptions::new("vis", "g").visibility(Duration::from_millis(300));
    let mut a = c.subscribe_queue(opts.clone()).await.unwrap();
    let first = take(&mut a, 1, 5).await.remove(0);
    assert_eq!(first.attempt(), 1);
    let t0 = Instant::now();
    // Not acked: after 300 ms visibility and a 50 ms backoff it is back.
    let again = take(&mut a, 1, 5).await.remove(0);
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(again.attempt(), 2);
    assert_eq!(again.tag.offset, first.tag.offset);

    // The stale delivery can no longer be acked or nacked.
    let e = a.ack(&first).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownDelivery));
    let e = a.nack(&first, true, "late", "too late").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownDelivery));
    // The current one can be extended, then acked exactly once.
    a.extend(&again, Duration::from_secs(10)).await.unwrap();
    a.ack(&again).await.unwrap();
    let e = a.ack(&again).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownDelivery));
    let bogus = DeliveryTag {
        partition: 0,
        offset: 999,
        attempt: 1,
    };
    let e = a.ack_many(&[bogus]).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownDelivery));
    quiet(&mut a, 600).await;
}

#[tokio::test]
async fn nacks_back_off_then_dead_letter_and_redrive_returns_them() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("pay", 2).await.unwrap();
    c.set_topic_policy(
        "pay",
        json!({ "max_attempts": 3, "retry_base_ms": 40, "retry_max_ms": 1000 }),
    )
    .await
    .unwrap();
    let ack = c
        .publish("pay", Record::new("charge-1").with_key("c1"))
        .await
        .unwrap();
    c.publish("pay", Record::new("charge-2").with_key("c2"))
        .await
        .unwrap();

    let mut q = c
        .subscribe_queue(QueueOptions::new("pay", "billing"))
        .await
        .unwrap();
    let mut times = Vec::new();
    let mut attempts_1 = Vec::new();
    let t0 = Instant::now();
    // charge-1 always fails; charge-2 fails once with a non-retryable error.
    while attempts_1.len() < 3 || times.is_empty() {
        let m = take(&mut q, 1, 10).await.remove(0);
        if text(&m) == "charge-1" {
            attempts_1.push(m.attempt());
            times.push(t0.elapsed());
            q.nack(&m, true, "card_declined", "insufficient funds")
                .await
                .unwrap();
        } else {
            q.nack(&m, false, "bad_input", "no amount").await.unwrap();
            times.push(t0.elapsed());
        }
    }
    assert_eq!(attempts_1, vec![1, 2, 3]);
    quiet(&mut q, 300).await;

    let dl = c.dlq_list("pay", 10).await.unwrap();
    assert_eq!(dl["total"], 2, "{dl}");
    let msgs = dl["messages"].as_array().unwrap();
    let one = msgs
        .iter()
        .find(|m| m["payload"] == "charge-1")
        .expect("charge-1 dead-lettered");
    let h = &one["headers"];
    assert_eq!(h["x-dlq-topic"], "pay");
    assert_eq!(h["x-dlq-partition"], ack.partition.to_string());
    assert_eq!(h["x-dlq-offset"], ack.offset.to_string());
    assert_eq!(h["x-dlq-attempts"], "3");
    assert!(
        h["x-dlq-error"].as_str().unwrap().contains("card_declined"),
        "{h}"
    );
    assert!(h["x-dlq-time-ms"].as_str().unwrap().parse::<u64>().is_ok());
    let two = msgs.iter().find(|m| m["payload"] == "charge-2").unwrap();
    assert_eq!(two["headers"]["x-dlq-attempts"], "1");
    assert!(
        two["headers"]["x-dlq-error"]
            .as_str()
            .unwrap()
            .contains("non-retryable"),
        "{two}"
    );

    // Redrive one: it comes back as a fresh message (attempt 1).
    assert_eq!(c.dlq_redrive("pay", Some(1)).await.unwrap(), 1);
    let back = take(&mut q, 1, 5).await.remove(0);
    assert_eq!(back.attempt(), 1);
    assert!(back.header("x-dlq-topic").is_none());
    q.ack(&back).await.unwrap();
    assert_eq!(c.dlq_list("pay", 10).await.unwrap()["total"], 1);
    assert_eq!(c.dlq_purge("pay").await.unwrap(), 1);
    assert_eq!(c.dlq_list("pay", 10).await.unwrap()["total"], 0);
    let stats = c.queue_stats(Some("pay")).await.unwrap();
    assert_eq!(stats[0]["dead_lettered"], 2);
    assert_eq!(stats[0]["retried"], 2);
}

#[tokio::test]
async fn delayed_messages_become_visible_on_time() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("later", 1).await.unwrap();
    let mut q = c
        .subscribe_queue(QueueOptions::new("later", "g"))
        .await
        .unwrap();
    let t0 = Instant::now();
    c.publish(
        "later",
        Record::new("delayed").with_delay(Duration::from_millis(700)),
    )
    .await
    .unwrap();
    c.publish("later", Record::new("now")).await.unwrap();
    let first = take(&mut q, 1, 5).await.remove(0);
    assert_eq!(
        text(&first),
        "now",
        "the undelayed message is not held back"
    );
    let second = take(&mut q, 1, 5).await.remove(0);
    let waited = t0.elapsed();
    assert_eq!(text(&second), "delayed");
    assert!(waited >= Duration::from_millis(700), "{waited:?}");
    assert!(waited < Duration::from_millis(2000), "{waited:?}");

    // Absolute time, and limits.
    let at = switchyard::storage::now_ms() + 300;
    c.publish("later", Record::new("at").with_deliver_at(at))
        .await
        .unwrap();
    let m = take(&mut q, 1, 5).await.remove(0);
    assert!(switchyard::storage::now_ms() >= at);
    assert_eq!(text(&m), "at");
    let e = c
        .publish(
            "later",
            Record::new("x").with_delay(Duration::from_secs(30 * 24 * 3600)),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidDelay));
    let e = c
        .publish("later", Record::new("x").with_header("priority", "12"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidPriority));
    assert_eq!(
        c.describe_topic("later").await.unwrap().partitions[0].end,
        3
    );
}

#[tokio::test]
async fn higher_priority_first_but_low_priority_keeps_its_share() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("prio", 2).await.unwrap();
    c.set_topic_policy("prio", json!({ "min_share_pct": 10 }))
        .await
        .unwrap();
    // Create the group first so it sees everything.
    drop(
        c.subscribe_queue(QueueOptions::new("prio", "g"))
            .await
            .unwrap(),
    );
    publish_n(&c, "prio", 200, |i| {
        Record::new(format!("low-{i}")).with_priority(0)
    })
    .await;
    publish_n(&c, "prio", 2000, |i| {
        Record::new(format!("high-{i}")).with_priority(9)
    })
    .await;
    publish_n(&c, "prio", 5, |i| Record::new(format!("mid-{i}"))).await; // default priority 4

    let mut q = c
        .subscribe_queue(QueueOptions::new("prio", "g").prefetch(100))
        .await
        .unwrap();
    let mut order = Vec::new();
    while order.len() < 1000 {
        let ms = take(&mut q, 100, 10).await;
        let tags: Vec<DeliveryTag> = ms.iter().map(|m| m.tag).collect();
        q.ack_many(&tags).await.unwrap();
        order.extend(ms.iter().map(text));
    }
    assert!(order[0].starts_with("high-"), "{}", order[0]);
    let lows = order.iter().filter(|s| s.starts_with("low-")).count();
    // One delivery in ten goes to the longest-waiting message: the lows.
    assert!(
        (90..=110).contains(&lows),
        "low priority got {lows} of 1000"
    );
    // Lows leave in their own order.
    let low_seq: Vec<usize> = order
        .iter()
        .filter_map(|s| s.strip_prefix("low-").map(|n| n.parse().unwrap()))
        .collect();
    assert!(low_seq.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test]
async fn expired_messages_are_never_delivered() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("ttl", 1).await.unwrap();
    c.publish(
        "ttl",
        Record::new("short").with_ttl(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    c.publish("ttl", Record::new("long").with_ttl(Duration::from_secs(60)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut q = c
        .subscribe_queue(QueueOptions::new("ttl", "g"))
        .await
        .unwrap();
    let m = take(&mut q, 1, 5).await.remove(0);
    assert_eq!(text(&m), "long");
    q.ack(&m).await.unwrap();
    quiet(&mut q, 300).await;

    // Per topic, dead-lettered when the topic says so.
    c.set_topic_policy("ttl", json!({ "ttl_ms": 100, "dead_letter_expired": true }))
        .await
        .unwrap();
    drop(q);
    c.publish("ttl", Record::new("old")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut q = c
        .subscribe_queue(QueueOptions::new("ttl", "g"))
        .await
        .unwrap();
    quiet(&mut q, 300).await;
    let dl = c.dlq_list("ttl", 10).await.unwrap();
    assert_eq!(dl["messages"][0]["payload"], "old");
    assert!(
        dl["messages"][0]["headers"]["x-dlq-error"]
            .as_str()
            .unwrap()
            .starts_with("expired")
    );
    let stats = c.queue_stats(Some("ttl")).await.unwrap();
    assert_eq!(stats[0]["expired"], 2);
}

#[tokio::test]
async fn auto_ack_settles_on_send_and_leaving_releases_unacked() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("auto", 1).await.unwrap();
    publish_n(&c, "auto", 10, |i| Record::new(format!("{i}"))).await;
    let mut q = c
        .subscribe_queue(QueueOptions::new("auto", "g").auto_ack(true).prefetch(4))
        .await
        .unwrap();
    let got = take(&mut q, 10, 5).await;
    assert_eq!(got.len(), 10);
    q.close().await;
    let mut q = c
        .subscribe_queue(QueueOptions::new("auto", "g"))
        .await
        .unwrap();
    quiet(&mut q, 300).await;

    // Manual acks: a member that leaves without acking hands its messages
    // to the next member at once (no visibility wait).
    publish_n(&c, "auto", 3, |i| Record::new(format!("m{i}"))).await;
    let held = take(&mut q, 3, 5).await;
    q.close().await;
    let mut q2 = c
        .subscribe_queue(QueueOptions::new("auto", "g"))
        .await
        .unwrap();
    let again = take(&mut q2, 3, 5).await;
    let a: HashSet<u64> = held.iter().map(|m| m.tag.offset).collect();
    let b: HashSet<u64> = again.iter().map(|m| m.tag.offset).collect();
    assert_eq!(a, b);
    assert!(again.iter().all(|m| m.attempt() == 2));
}

#[tokio::test]
async fn queue_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let router = start_in(dir.path()).await;
    let c = connect(router.local_addr(), router.cert_path()).await;
    c.create_topic("durable", 2).await.unwrap();
    c.set_topic_policy("durable", json!({ "retry_base_ms": 60_000 }))
        .await
        .unwrap();
    publish_n(&c, "durable", 20, |i| {
        Record::new(format!("{i}")).with_key(format!("{i}"))
    })
    .await;
    let mut q = c
        .subscribe_queue(QueueOptions::new("durable", "g").prefetch(20))
        .await
        .unwrap();
    let got = take(&mut q, 20, 5).await;
    // Ack 10, nack 5 (retry in a minute), leave 5 in flight.
    let tags: Vec<DeliveryTag> = got[..10].iter().map(|m| m.tag).collect();
    q.ack_many(&tags).await.unwrap();
    for m in &got[10..15] {
        q.nack(m, true, "later", "try again later").await.unwrap();
    }
    let in_flight: HashSet<String> = got[15..].iter().map(text).collect();
    c.close().await;
    router.shutdown().await;

    let router = start_in(dir.path()).await;
    let c = connect(router.local_addr(), router.cert_path()).await;
    let mut q = c
        .subscribe_queue(QueueOptions::new("durable", "g").prefetch(20))
        .await
        .unwrap();
    let again = take(&mut q, 5, 5).await;
    let texts: HashSet<String> = again.iter().map(text).collect();
    assert_eq!(texts, in_flight, "exactly the in-flight ones come back");
    assert!(again.iter().all(|m| m.attempt() == 2));
    quiet(&mut q, 300).await; // acked ones gone, nacked ones wait a minute
    let stats = c.queue_stats(Some("durable")).await.unwrap();
    assert_eq!(stats[0]["waiting"], 5, "{stats}");
    router.shutdown().await;
}

#[tokio::test]
async fn idempotent_publish_survives_a_cut_connection() {
    let dir = tempfile::tempdir().unwrap();
    let router = start_in(dir.path()).await;
    let client = || connect(router.local_addr(), router.cert_path());
    let c = client().await;
    c.create_topic("orders", 3).await.unwrap();
    let rec = |i: usize| {
        Record::new(format!("order-{i}"))
            .with_key(format!("c{}", i % 7))
            .with_message_id(format!("id-{i}"))
    };
    let first = c.publish("orders", rec(0)).await.unwrap();
    assert!(!first.duplicate);
    let dup = c.publish("orders", rec(0)).await.unwrap();
    assert!(dup.duplicate);
    assert_eq!((dup.partition, dup.offset), (first.partition, first.offset));

    // A producer sends 500 more and its connection is cut before it has
    // its acks; it reconnects and sends all of them again.
    let cut = client().await;
    let mut pending = Vec::new();
    for chunk in (1..=500).collect::<Vec<_>>().chunks(50) {
        pending.push(
            cut.queue_batch("orders", chunk.iter().map(|&i| rec(i)).collect())
                .await
                .unwrap(),
        );
    }
    drop(pending);
    drop(cut);
    let again = client().await;
    let mut dups = 0;
    for chunk in (1..=500).collect::<Vec<_>>().chunks(50) {
        let acks = again
            .publish_batch("orders", chunk.iter().map(|&i| rec(i)).collect())
            .await
            .unwrap();
        dups += acks.iter().filter(|a| a.duplicate).count();
    }
    let total: u64 = c
        .describe_topic("orders")
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.end)
        .sum();
    assert_eq!(
        total, 501,
        "each id stored once ({dups} retries were duplicates)"
    );

    // Every id is delivered once.
    let mut q = c
        .subscribe_queue(
            QueueOptions::new("orders", "g")
                .auto_ack(true)
                .prefetch(600),
        )
        .await
        .unwrap();
    let all = take(&mut q, 501, 10).await;
    let unique: HashSet<String> = all.iter().map(text).collect();
    assert_eq!(unique.len(), 501);

    // The window is persisted: after a restart a repeat is still recognised.
    c.close().await;
    router.shutdown().await;
    let router = start_in(dir.path()).await;
    let c = connect(router.local_addr(), router.cert_path()).await;
    let dup = c.publish("orders", rec(0)).await.unwrap();
    assert!(dup.duplicate, "id remembered across a restart");
    assert_eq!((dup.partition, dup.offset), (first.partition, first.offset));
    router.shutdown().await;
}

#[tokio::test]
async fn backlog_limit_refuses_or_sheds_low_priority() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("full", 1).await.unwrap();
    c.set_topic_policy("full", json!({ "backlog_limit": 100 }))
        .await
        .unwrap();
    let q = c
        .subscribe_queue(QueueOptions::new("full", "slow").prefetch(1))
        .await
        .unwrap();
    publish_n(&c, "full", 100, |i| Record::new(format!("{i}"))).await;
    let e = c
        .publish("full", Record::new("one too many"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BacklogFull));
    assert!(e.retry_after().is_some(), "{e}");
    assert_eq!(
        c.describe_topic("full").await.unwrap().partitions[0].end,
        100
    );

    c.set_topic_policy("full", json!({ "shed_below_priority": 5 }))
        .await
        .unwrap();
    let acks = c
        .publish_batch(
            "full",
            vec![
                Record::new("low").with_priority(1),
                Record::new("high").with_priority(9),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        (acks[0].partition, acks[0].offset),
        switchyard::broker::DROPPED
    );
    assert_eq!(acks[1].offset, 100);
    drop(q);
}

#[tokio::test]
async fn queue_subscriptions_need_a_group_and_a_topic() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("t", 1).await.unwrap();
    let e = c
        .subscribe_queue(QueueOptions::new("t", ""))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Some(ErrorCode::InvalidGroup));
    let e = c
        .subscribe_queue(QueueOptions::new("nope", "g"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Some(ErrorCode::UnknownTopic));
    let e = c
        .set_topic_policy("t", json!({ "max_attemps": 3 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument));
    let e = c
        .set_topic_policy("t", json!({ "default_priority": 12 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument));
}

#[tokio::test]
async fn unacked_messages_survive_kill_9_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let child = ChildRouter::spawn(dir.path());
    let c = connect(child.addr, &child.cert).await;
    c.create_topic("crashy", 2).await.unwrap();
    publish_n(&c, "crashy", 200, |i| {
        Record::new(format!("{i}")).with_key(format!("{i}"))
    })
    .await;
    let mut q = c
        .subscribe_queue(QueueOptions::new("crashy", "g").prefetch(200))
        .await
        .unwrap();
    let got = take(&mut q, 200, 10).await;
    let tags: Vec<DeliveryTag> = got[..120].iter().map(|m| m.tag).collect();
    q.ack_many(&tags).await.unwrap();
    let unacked: HashSet<String> = got[120..].iter().map(text).collect();
    // Let the group commit carrying the acks finish, then kill -9.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(q);
    drop(child);

    let child = ChildRouter::spawn(dir.path());
    let c = connect(child.addr, &child.cert).await;
    let mut q = c
        .subscribe_queue(QueueOptions::new("crashy", "g").prefetch(200))
        .await
        .unwrap();
    let again = take(&mut q, 80, 10).await;
    let texts: HashSet<String> = again.iter().map(text).collect();
    assert_eq!(texts, unacked, "every unacked message, and only those");
    assert!(again.iter().all(|m| m.attempt() == 2));
    quiet(&mut q, 300).await;
}

#[tokio::test]
async fn scattered_acks_across_chunks_survive_kill_9() {
    // One partition, 10,000 messages: acks above the floor are stored as
    // ranges per 4,096-offset chunk, so leave gaps in every chunk and across
    // chunk boundaries, and hold back the very first message so nothing
    // moves the floor.
    let dir = tempfile::tempdir().unwrap();
    let child = ChildRouter::spawn(dir.path());
    let c = connect(child.addr, &child.cert).await;
    c.create_topic("gaps", 1).await.unwrap();
    let n = 10_000;
    publish_n(&c, "gaps", n, |i| Record::new(format!("{i}"))).await;
    let mut q = c
        .subscribe_queue(QueueOptions::new("gaps", "g").prefetch(n as u32))
        .await
        .unwrap();
    let got = take(&mut q, n, 30).await;
    let keep = |o: u64| o == 0 || o % 7 == 3 || (4090..4100).contains(&o) || o == 8191;
    let acks: Vec<DeliveryTag> = got
        .iter()
        .map(|m| m.tag)
        .filter(|t| !keep(t.offset))
        .collect();
    for chunk in acks.chunks(500).rev() {
        q.ack_many(chunk).await.unwrap();
    }
    let unacked: HashSet<u64> = got
        .iter()
        .map(|m| m.tag.offset)
        .filter(|&o| keep(o))
        .collect();
    // Let the group commit carrying the acks finish, then kill -9.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(q);
    drop(child);

    let child = ChildRouter::spawn(dir.path());
    let c = connect(child.addr, &child.cert).await;
    let mut q = c
        .subscribe_queue(QueueOptions::new("gaps", "g").prefetch(n as u32))
        .await
        .unwrap();
    let again = take(&mut q, unacked.len(), 20).await;
    let offsets: HashSet<u64> = again.iter().map(|m| m.tag.offset).collect();
    assert_eq!(offsets, unacked, "every unacked message, and only those");
    assert!(again.iter().all(|m| m.attempt() == 2));
    quiet(&mut q, 300).await;
    // Settling the rest empties the queue for good.
    let tags: Vec<DeliveryTag> = again.iter().map(|m| m.tag).collect();
    q.ack_many(&tags).await.unwrap();
    let stats = wait_for_stats(&c, "gaps", |s| s["floors"][0] == n as u64).await;
    assert_eq!(stats["in_flight"], 0, "{stats}");
}

/// Polls `queue stats` for `topic` until `ok` holds (5 s at most).
async fn wait_for_stats(
    c: &Client,
    topic: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = c.queue_stats(Some(topic)).await.unwrap();
        if ok(&stats[0]) {
            return stats[0].clone();
        }
        assert!(Instant::now() < deadline, "stats never got there: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn tenant_priority_plugin_orders_queue_deliveries() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("tickets", 1).await.unwrap();
    c.deploy_plugin(
        plugin_wasm("tenant_priority"),
        json!({
            "name": "tiers", "hook": "priority", "topic": "tickets", "deadline_ms": 1000,
            "config": { "tenant.acme": "gold", "tenant.initech": "bronze",
                        "tier.gold": "9", "tier.bronze": "1" }
        }),
    )
    .await
    .unwrap();
    c.set_topic_policy("tickets", json!({ "min_share_pct": 0 }))
        .await
        .unwrap();
    drop(
        c.subscribe_queue(QueueOptions::new("tickets", "support"))
            .await
            .unwrap(),
    );
    // Bronze first, then gold; the producer's own header loses to the plugin.
    publish_n(&c, "tickets", 50, |i| {
        Record::new(format!("bronze-{i}"))
            .with_header("tenant", "initech")
            .with_priority(9)
    })
    .await;
    publish_n(&c, "tickets", 50, |i| {
        Record::new(format!("gold-{i}")).with_header("tenant", "acme")
    })
    .await;
    let mut q = c
        .subscribe_queue(QueueOptions::new("tickets", "support").prefetch(100))
        .await
        .unwrap();
    let got = take(&mut q, 100, 10).await;
    let order: Vec<String> = got.iter().map(text).collect();
    assert!(
        order[..50].iter().all(|s| s.starts_with("gold-")),
        "{order:?}"
    );
    assert!(order[50..].iter().all(|s| s.starts_with("bronze-")));
    assert_eq!(got[0].header("priority").as_deref(), Some(&b"9"[..]));
    assert_eq!(got[99].header("priority").as_deref(), Some(&b"1"[..]));
}

#[tokio::test]
async fn retry_backoff_plugin_decides_retries_and_dead_letters() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("hooks", 1).await.unwrap();
    c.deploy_plugin(
        plugin_wasm("retry_backoff"),
        json!({
            "name": "backoff", "hook": "retry", "topic": "hooks", "deadline_ms": 1000,
            "config": { "base-ms": "100", "max-attempts": "3", "jitter": "0",
                        "non-retryable": "auth" }
        }),
    )
    .await
    .unwrap();
    // The topic default would dead-letter after 5 attempts and wait 1 s:
    // the plugin's 100 ms, 200 ms and 3 attempts must be what happens.
    c.publish("hooks", Record::new("flaky").with_key("k"))
        .await
        .unwrap();
    c.publish("hooks", Record::new("forbidden").with_key("k2"))
        .await
        .unwrap();
    let mut q = c
        .subscribe_queue(QueueOptions::new("hooks", "g"))
        .await
        .unwrap();
    let mut flaky_at = Vec::new();
    let t0 = Instant::now();
    let mut forbidden = 0;
    while flaky_at.len() < 3 || forbidden == 0 {
        let m = take(&mut q, 1, 10).await.remove(0);
        if text(&m) == "flaky" {
            flaky_at.push((m.attempt(), t0.elapsed()));
            q.nack(&m, true, "timeout", "upstream slow").await.unwrap();
        } else {
            forbidden += 1;
            q.nack(&m, true, "auth", "token revoked").await.unwrap();
        }
    }
    quiet(&mut q, 500).await;
    assert_eq!(forbidden, 1, "non-retryable code dead-letters at once");
    let attempts: Vec<u32> = flaky_at.iter().map(|a| a.0).collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    let gap1 = flaky_at[1].1 - flaky_at[0].1;
    let gap2 = flaky_at[2].1 - flaky_at[1].1;
    assert!(
        gap1 >= Duration::from_millis(100) && gap1 < Duration::from_millis(900),
        "{gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(200) && gap2 < Duration::from_millis(900),
        "{gap2:?}"
    );
    let dl = c.dlq_list("hooks", 10).await.unwrap();
    let reasons: Vec<&str> = dl["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["headers"]["x-dlq-error"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 2, "{dl}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("non-retryable failure auth")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("gave up after 3 attempts")),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn attempts_after_a_restart_count_only_real_deliveries() {
    // Priority makes deliveries skip ahead in the log: messages never
    // delivered must come back as first attempts, delivered ones as second.
    let dir = tempfile::tempdir().unwrap();
    let router = start_in(dir.path()).await;
    let c = connect(router.local_addr(), router.cert_path()).await;
    c.create_topic("mixed", 1).await.unwrap();
    c.set_topic_policy("mixed", json!({ "min_share_pct": 0 }))
        .await
        .unwrap();
    drop(
        c.subscribe_queue(QueueOptions::new("mixed", "g"))
            .await
            .unwrap(),
    );
    publish_n(&c, "mixed", 3, |i| Record::new(format!("first-{i}"))).await;
    publish_n(&c, "mixed", 10, |i| {
        Record::new(format!("low-{i}")).with_priority(0)
    })
    .await;
    publish_n(&c, "mixed", 10, |i| {
        Record::new(format!("high-{i}")).with_priority(9)
    })
    .await;
    let mut q = c
        .subscribe_queue(QueueOptions::new("mixed", "g").prefetch(8))
        .await
        .unwrap();
    let got: Vec<String> = take(&mut q, 8, 5).await.iter().map(text).collect();
    // The default-priority firsts (4) come after the highs (9).
    assert!(got.iter().all(|s| s.starts_with("high-")), "{got:?}");
    c.close().await;
    router.shutdown().await;

    let router = start_in(dir.path()).await;
    let c = connect(router.local_addr(), router.cert_path()).await;
    let mut q = c
        .subscribe_queue(QueueOptions::new("mixed", "g").prefetch(100))
        .await
        .unwrap();
    let all = take(&mut q, 23, 5).await;
    for m in &all {
        let expected = if got.contains(&text(m)) { 2 } else { 1 };
        assert_eq!(m.attempt(), expected, "{}", text(m));
    }
    router.shutdown().await;
}

#[tokio::test]
async fn an_empty_dead_letter_queue_lists_as_empty_before_first_use() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("jobs", 2).await.unwrap();
    // Nothing was ever dead-lettered: `jobs.dlq` does not exist yet.
    let dl = c.dlq_list("jobs", 10).await.unwrap();
    assert_eq!(dl["total"], 0);
    assert_eq!(dl["messages"], json!([]));
    assert_eq!(c.dlq_redrive("jobs", None).await.unwrap(), 0);
    assert_eq!(c.dlq_purge("jobs").await.unwrap(), 0);
    // An unknown original topic is still an error, naming that topic.
    let e = c.dlq_list("nope", 10).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownTopic));
    assert!(e.to_string().contains("'nope'"), "{e}");
}

/// One stage reading two topics: a retry plugin bound to `payments.*`
/// decides for both, and both name one dead-letter topic.
#[tokio::test]
async fn a_pattern_binding_and_a_shared_dlq_serve_a_stage_of_several_topics() {
    let r = start_router().await;
    let c = r.client().await;
    for t in ["payments.eu", "payments.us", "other"] {
        c.create_topic(t, 1).await.unwrap();
    }
    // Before anything was dead-lettered, the shared DLQ lists as empty.
    c.set_topic_policy("payments.eu", json!({ "dlq": "payments-dead" }))
        .await
        .unwrap();
    let empty = c.dlq_list("payments.eu", 10).await.unwrap();
    assert_eq!(empty["topic"], "payments-dead");
    assert_eq!(empty["total"], 0);
    c.set_topic_policy("payments.us", json!({ "dlq": "payments-dead" }))
        .await
        .unwrap();
    let own = c
        .set_topic_policy("other", json!({ "dlq": "other" }))
        .await
        .unwrap_err();
    assert_eq!(own.code(), Some(ErrorCode::InvalidArgument), "{own}");

    let d = c
        .deploy_plugin(
            plugin_wasm("retry_backoff"),
            json!({
                "name": "payments-retry", "hook": "retry", "topic": "payments.*",
                "deadline_ms": 1000, "config": { "non-retryable": "declined" }
            }),
        )
        .await
        .unwrap();
    assert_eq!(d["version"], 1, "{d}");
    // A pattern may only end in '*'.
    let bad = c
        .deploy_plugin(
            plugin_wasm("retry_backoff"),
            json!({ "name": "bad", "hook": "retry", "topic": "pay*ments", "deadline_ms": 1000 }),
        )
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(ErrorCode::InvalidArgument), "{bad}");

    // "declined" is the plugin's non-retryable code: the topic default
    // (max_attempts 5, nothing special about the code) would retry it.
    for t in ["payments.eu", "payments.us", "other"] {
        c.publish(t, Record::new(format!("from {t}")))
            .await
            .unwrap();
        let mut q = c.subscribe_queue(QueueOptions::new(t, "g")).await.unwrap();
        let m = take(&mut q, 1, 10).await.remove(0);
        q.nack(&m, true, "declined", "card declined").await.unwrap();
        if t == "other" {
            // No plugin applies: retried by the topic's policy.
            let again = take(&mut q, 1, 10).await.remove(0);
            assert_eq!(again.attempt(), 2);
            q.ack(&again).await.unwrap();
        }
        q.close().await;
    }
    let dl = c.dlq_list("payments.us", 10).await.unwrap();
    assert_eq!(dl["topic"], "payments-dead");
    let origins: HashSet<&str> = dl["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["headers"]["x-dlq-topic"].as_str().unwrap())
        .collect();
    assert_eq!(
        origins,
        HashSet::from(["payments.eu", "payments.us"]),
        "{dl}"
    );
    for m in dl["messages"].as_array().unwrap() {
        let why = m["headers"]["x-dlq-error"].as_str().unwrap();
        assert!(why.contains("non-retryable failure declined"), "{why}");
    }
    // Redrive sends each letter back to the topic it came from.
    assert_eq!(c.dlq_redrive("payments.eu", None).await.unwrap(), 2);
    for t in ["payments.eu", "payments.us"] {
        let end: u64 = c.describe_topic(t).await.unwrap().partitions[0].end;
        assert_eq!(end, 2, "{t} got its letter back");
    }
}
