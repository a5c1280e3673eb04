//! A client that survives its router restarting: gracefully (SIGTERM) and
//! by crash (kill -9), under a pipelined producer, a queue consumer and a
//! stream subscriber, with the application code seeing no error.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use switchyard::client::{Client, ClientConfig, QueueOptions, Record, SubscribeOptions};

const PER_BATCH: usize = 20;

async fn client(addr: std::net::SocketAddr, data: &std::path::Path) -> Arc<Client> {
    let mut cfg = ClientConfig::new(addr).with_data_dir(data);
    // Notice a killed router within a second or two.
    cfg.idle_timeout = Duration::from_millis(1500);
    Arc::new(Client::connect(cfg).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_router_loses_nothing_the_application_relied_on() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_udp_addr();
    let mut router = ChildRouter::spawn_on(dir.path(), addr);
    let admin = client(addr, dir.path()).await;
    admin.create_topic("jobs", 4).await.unwrap();
    // How many records the producer published, once it has stopped.
    let total = Arc::new(AtomicUsize::new(usize::MAX));
    let stop = Arc::new(AtomicBool::new(false));

    // A pipelined producer: up to 8 batches in flight, every record with a
    // message id, until told to stop.
    let pc = client(addr, dir.path()).await;
    let producer = {
        let (c, stop) = (pc.clone(), stop.clone());
        tokio::spawn(async move {
            let mut in_flight = FuturesOrdered::new();
            let mut b = 0;
            while !stop.load(Ordering::Relaxed) {
                let records = (0..PER_BATCH)
                    .map(|i| {
                        let id = format!("job-{}", b * PER_BATCH + i);
                        Record::new(id.clone()).with_message_id(id)
                    })
                    .collect();
                in_flight.push_back(c.queue_batch("jobs", records).await.unwrap());
                if in_flight.len() == 8 {
                    in_flight.next().await.unwrap().unwrap();
                }
                b += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            while let Some(acks) = in_flight.next().await {
                acks.unwrap();
            }
            b * PER_BATCH
        })
    };

    // A queue consumer acking everything, and a stream subscriber.
    let worker = {
        let (c, total) = (client(addr, dir.path()).await, total.clone());
        tokio::spawn(async move {
            let mut q = c
                .subscribe_queue(QueueOptions::new("jobs", "workers"))
                .await
                .unwrap();
            let mut seen = HashSet::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while seen.len() < total.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), q.next()).await
                else {
                    continue;
                };
                let m = m.unwrap();
                q.ack(&m).await.unwrap();
                seen.insert(m.payload());
            }
            seen
        })
    };
    let reader = {
        let (c, total) = (client(addr, dir.path()).await, total.clone());
        tokio::spawn(async move {
            let mut sub = c.subscribe(SubscribeOptions::new("jobs")).await.unwrap();
            let mut positions = HashMap::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while positions.len() < total.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok(Some(m)) =
                    tokio::time::timeout(Duration::from_millis(200), sub.next()).await
                else {
                    continue;
                };
                let m = m.unwrap();
                let again = positions.insert((m.partition, m.offset), m.payload());
                assert!(
                    again.is_none(),
                    "p{}@{} delivered twice",
                    m.partition,
                    m.offset
                );
            }
            positions
        })
    };

    // Each restart lands while the producer has batches in flight.
    let reconnected = |n: u64| {
        let pc = pc.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while pc.connections() < n {
                assert!(Instant::now() < deadline, "the producer did not reconnect");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    };
    reconnected(1).await;
    sigterm(&router.child);
    assert!(router.child.wait().unwrap().success());
    router = ChildRouter::spawn_on(dir.path(), addr);
    reconnected(2).await;
    router.child.kill().unwrap();
    router.child.wait().unwrap();
    let _router = ChildRouter::spawn_on(dir.path(), addr);
    reconnected(3).await;
    stop.store(true, Ordering::Relaxed);

    let published = producer.await.unwrap();
    total.store(published, Ordering::Relaxed);
    let total = published;
    // Every acknowledged record is stored once: resends were deduplicated.
    let stored: u64 = admin
        .describe_topic("jobs")
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.end)
        .sum();
    assert_eq!(stored, total as u64);
    let seen = worker.await.unwrap();
    assert_eq!(seen.len(), total, "the queue consumer got every job");
    let positions = reader.await.unwrap();
    assert_eq!(
        positions.len(),
        total,
        "the subscriber read every record once"
    );
    let distinct: HashSet<_> = positions.values().collect();
    assert_eq!(distinct.len(), total);
    assert!(admin.connections() >= 3);
}

/// A subscription (stream or queue) opened just as its router dies, before
/// the client has noticed, opens on the next connection instead of failing
/// with `ConnectionLost`, as one already open resumes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_opened_as_the_router_dies_opens_on_the_next_connection() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_udp_addr();
    let mut router = ChildRouter::spawn_on(dir.path(), addr);
    let c = client(addr, dir.path()).await;
    c.create_topic("jobs", 1).await.unwrap();
    c.publish("jobs", Record::new("one").with_message_id("one"))
        .await
        .unwrap();
    router.child.kill().unwrap();
    router.child.wait().unwrap();
    // The client learns of the loss only at its idle timeout (1.5 s).
    let stream = tokio::spawn({
        let c = c.clone();
        async move { c.subscribe(SubscribeOptions::new("jobs")).await }
    });
    let queue = tokio::spawn({
        let c = c.clone();
        async move {
            c.subscribe_queue(QueueOptions::new("jobs", "workers"))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _router = ChildRouter::spawn_on(dir.path(), addr);
    let mut sub = stream
        .await
        .unwrap()
        .expect("the stream subscription opened");
    let mut q = queue.await.unwrap().expect("the queue subscription opened");
    let m = tokio::time::timeout(Duration::from_secs(15), sub.next())
        .await
        .expect("no delivery")
        .unwrap()
        .unwrap();
    assert_eq!(m.payload(), "one");
    let m = tokio::time::timeout(Duration::from_secs(15), q.next())
        .await
        .expect("no queue delivery")
        .unwrap()
        .unwrap();
    assert_eq!(m.payload(), "one");
}

#[tokio::test]
async fn without_reconnects_a_lost_connection_fails_calls_with_connection_lost() {
    let dir = tempfile::tempdir().unwrap();
    let router = ChildRouter::spawn(dir.path());
    let mut cfg = ClientConfig::new(router.addr)
        .with_data_dir(dir.path())
        .with_reconnect(switchyard::client::Reconnect::off());
    cfg.idle_timeout = Duration::from_millis(1500);
    let c = Client::connect(cfg).await.unwrap();
    c.create_topic("t", 1).await.unwrap();
    sigterm(&router.child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        match c.list_topics().await {
            Err(e) => break e,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(_) => panic!("the router never went away"),
        }
    };
    assert!(
        matches!(e, switchyard::client::ClientError::ConnectionLost(_)),
        "{e}"
    );
    assert!(!c.is_connected());
}
