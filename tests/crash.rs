//! An acknowledged record survives `kill -9` of the router at any moment.
//!
//! The router runs as a child process and is killed with SIGKILL while a
//! producer has many pipelined batches in flight. After a restart on the same
//! data directory every acknowledged offset must hold exactly the record that
//! was acknowledged for it: the guard against acking before fsync, against
//! reusing offsets after a crash, and against a torn group commit.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::{ChildRouter, connect, take};
use switchyard::client::SubscribeOptions;
use switchyard::protocol::Record;

#[tokio::test]
async fn acked_records_survive_kill_9_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let router = ChildRouter::spawn(dir.path());
    let c = connect(router.addr, &router.cert).await;
    c.create_topic("crash", 4).await.unwrap();

    // Keep up to 32 batches of 100 in flight; record each acked position.
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let producer = {
        let c = c.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut acked: HashMap<(u32, u64), Bytes> = HashMap::new();
            let mut pending = std::collections::VecDeque::new();
            for b in 0..100_000u64 {
                let payloads: Vec<Bytes> =
                    (0..100).map(|i| Bytes::from(format!("{b}-{i}"))).collect();
                let recs = payloads
                    .iter()
                    .map(|p| Record::new(p.clone()).with_key(format!("{}", b % 7)))
                    .collect();
                match c.queue_batch("crash", recs).await {
                    Ok(p) => pending.push_back((payloads, p)),
                    Err(_) => break,
                }
                if pending.len() >= 32 {
                    let (payloads, p) = pending.pop_front().unwrap();
                    match p.await {
                        Ok(acks) => {
                            for (a, p) in acks.into_iter().zip(payloads) {
                                acked.insert((a.partition, a.offset), p);
                            }
                            progress.store(acked.len(), std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(_) => break,
                    }
                }
            }
            for (payloads, p) in pending {
                if let Ok(acks) = p.await {
                    for (a, p) in acks.into_iter().zip(payloads) {
                        acked.insert((a.partition, a.offset), p);
                    }
                }
            }
            acked
        })
    };

    // Let the stream run, then kill the router without warning while
    // batches are still in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while progress.load(std::sync::atomic::Ordering::Relaxed) < 20_000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "producer made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut router = router;
    router.child.kill().unwrap(); // SIGKILL
    router.child.wait().unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(30), producer)
        .await
        .expect("producer notices the crash")
        .unwrap();
    assert!(
        acked.len() >= 20_000,
        "only {} acked before the kill",
        acked.len()
    );
    drop(router);

    let router = ChildRouter::spawn(dir.path());
    let c = connect(router.addr, &router.cert).await;
    let info = c.describe_topic("crash").await.unwrap();
    let stored: u64 = info.partitions.iter().map(|p| p.end).sum();
    assert!(stored >= acked.len() as u64);
    let mut sub = c
        .subscribe(SubscribeOptions::new("crash").prefetch(4096))
        .await
        .unwrap();
    let msgs = take(&mut sub, stored as usize, 60).await;
    let found: HashMap<(u32, u64), Bytes> = msgs
        .into_iter()
        .map(|m| ((m.partition, m.offset), m.payload()))
        .collect();
    for (pos, payload) in &acked {
        assert_eq!(
            found.get(pos),
            Some(payload),
            "acked record at {pos:?} lost or changed"
        );
    }
    // Appends after the restart continue after the surviving records.
    let ack = c
        .publish("crash", Record::new("after").with_key("0"))
        .await
        .unwrap();
    assert_eq!(ack.offset, info.partitions[ack.partition as usize].end);
}
