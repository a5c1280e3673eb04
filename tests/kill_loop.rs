//! A kill -9 loop on the real binary.
//!
//! Each round starts the router on the same data directory, checks what
//! earlier rounds were told, then runs pipelined producers with message
//! ids, a queue consumer that acks, a stream group that commits, and now
//! and then a plugin deploy, and kills the router with SIGKILL at a random
//! moment. After every restart:
//!
//! - every acknowledged publish is readable at its offset with its bytes;
//! - no queue message whose ack was answered comes back;
//! - the stream group's committed position never goes backwards (and
//!   never passes what was committed);
//! - the live plugin version is the last whose deploy returned (or one
//!   whose deploy was cut short by the kill);
//! - a retried message id returns its original offset.
//!
//! `SWITCHYARD_KILL_LOOP=N` runs N rounds (default 20); the seed of the
//! random moments is printed, and `SWITCHYARD_KILL_SEED=S` repeats a run.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{ChildRouter, admin_token, connect, connect_with, plugin_wasm};
use futures::StreamExt;
use serde_json::json;
use switchyard::client::{QueueOptions, Reconnect, SubscribeOptions};
use switchyard::protocol::{Record, StartPosition};

#[derive(Default)]
struct Model {
    /// Offset -> payload of every acknowledged publish (one partition).
    acked: HashMap<u64, Bytes>,
    /// Message id -> acknowledged offset, and when (ids are remembered for
    /// the topic's dedup window, 2 minutes by default).
    ids: HashMap<String, (u64, std::time::Instant)>,
    /// Highest offset already verified after a restart.
    verified: u64,
    /// Payloads whose queue ack was answered.
    queue_acked: HashSet<Bytes>,
    /// The stream group's position seen after the last restart.
    group_pos: u64,
    /// Highest position the stream group committed.
    group_committed: u64,
    /// The last version whose deploy returned, and one in flight at the kill.
    plugin_live: Option<u64>,
    plugin_in_flight: Option<u64>,
    next_msg: u64,
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_state_survives_repeated_kill_9() {
    let rounds: usize = std::env::var("SWITCHYARD_KILL_LOOP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("SWITCHYARD_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("kill loop: {rounds} rounds, SWITCHYARD_KILL_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let model = Arc::new(Mutex::new(Model::default()));
    let wasm = Bytes::from(plugin_wasm("versioned_route"));
    let started = std::time::Instant::now();
    for round in 0..rounds {
        let mut router = ChildRouter::spawn(&data);
        // Each round's clients end with their router: the model learns
        // what the kill cut off from their errors, so they do not reconnect
        // (the next router listens elsewhere anyway).
        let c = connect_with(router.addr, &router.cert, |cfg| {
            cfg.with_token(admin_token(&router.cert))
                .with_reconnect(Reconnect::off())
        })
        .await;
        if round == 0 {
            c.create_topic("k", 1).await.unwrap();
            c.create_topic("r", 1).await.unwrap();
        } else {
            verify(&c, &model, &mut rng, round).await;
        }

        // Load, killed at a random moment.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let producer = tokio::spawn(produce(c.clone(), model.clone(), stop.clone()));
        let queue = tokio::spawn(consume_queue(c.clone(), model.clone(), stop.clone()));
        let stream = tokio::spawn(consume_stream(c.clone(), model.clone(), stop.clone()));
        if round % 3 == 1 {
            let m = model.clone();
            let (c, wasm) = (c.clone(), wasm.clone());
            let v = model.lock().unwrap().plugin_live.map_or(1, |v| v + 1);
            model.lock().unwrap().plugin_in_flight = Some(v);
            tokio::spawn(async move {
                let opts = json!({ "name": "stamp", "hook": "route", "topic": "r",
                    "deadline_ms": 1000, "config": { "version": format!("v{v}") } });
                if let Ok(r) = c.deploy_plugin(wasm.to_vec(), opts).await {
                    let mut m = m.lock().unwrap();
                    assert_eq!(r["version"].as_u64(), Some(v));
                    m.plugin_live = Some(v);
                    m.plugin_in_flight = None;
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(100 + rng.below(500))).await;
        router.child.kill().unwrap();
        router.child.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in [producer, queue, stream] {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("clients notice the kill")
                .unwrap();
        }
        drop(router);
    }
    // A last restart checks the last round.
    let router = ChildRouter::spawn(&data);
    let c = connect(router.addr, &router.cert).await;
    verify(&c, &model, &mut rng, rounds).await;
    let m = model.lock().unwrap();
    println!(
        "kill loop: {rounds} kills in {:.0?}; {} publishes acked, {} queue acks, group at {}, plugin v{:?}; losses 0",
        started.elapsed(),
        m.acked.len(),
        m.queue_acked.len(),
        m.group_pos,
        m.plugin_live
    );
}

async fn verify(
    c: &Arc<switchyard::client::Client>,
    model: &Arc<Mutex<Model>>,
    rng: &mut Rng,
    round: usize,
) {
    let (from, top, sample, ids) = {
        let m = model.lock().unwrap();
        let top = m.acked.keys().max().map_or(0, |o| o + 1);
        let sample = if m.verified > 0 {
            Some(rng.below(m.verified))
        } else {
            None
        };
        // Well inside the dedup window.
        let ids: Vec<(String, u64)> = m
            .ids
            .iter()
            .filter(|(_, (_, at))| at.elapsed() < Duration::from_secs(60))
            .take(1 + rng.below(4) as usize)
            .map(|(k, (o, _))| (k.clone(), *o))
            .collect();
        (m.verified, top, sample, ids)
    };
    let end = c.describe_topic("k").await.unwrap().partitions[0].end;
    assert!(
        end >= top,
        "round {round}: topic ends at {end}, {top} acked"
    );
    // Everything acknowledged since the last check, and a window of older
    // records, at their offsets with their bytes.
    for (start, n) in [(from, top.saturating_sub(from)), (sample.unwrap_or(0), 64)] {
        let n = n.min(end - start.min(end));
        if n == 0 {
            continue;
        }
        let mut sub = c
            .subscribe(
                SubscribeOptions::new("k")
                    .start(StartPosition::Offset(start))
                    .prefetch(4096),
            )
            .await
            .unwrap();
        let got = common::take(&mut sub, n as usize, 60).await;
        let m = model.lock().unwrap();
        for msg in got {
            if let Some(want) = m.acked.get(&msg.offset) {
                assert_eq!(
                    &msg.payload(),
                    want,
                    "round {round}: offset {} changed",
                    msg.offset
                );
            }
        }
    }
    model.lock().unwrap().verified = top;
    // Retried ids return their original offsets.
    for (id, offset) in ids {
        let payload = model.lock().unwrap().acked[&offset].clone();
        let a = c
            .publish("k", Record::new(payload).with_message_id(id.clone()))
            .await
            .unwrap();
        assert!(a.duplicate, "round {round}: retried id {id} stored again");
        assert_eq!(a.offset, offset, "round {round}: retried id {id}");
    }
    // The plugin: the last deploy that returned (or the one cut short).
    let (live, in_flight) = {
        let m = model.lock().unwrap();
        (m.plugin_live, m.plugin_in_flight)
    };
    if live.is_some() || in_flight.is_some() {
        let show = c
            .plugin_request("show", json!({ "name": "stamp" }), Bytes::new())
            .await;
        let got = show.ok().and_then(|s| s["live_version"].as_u64());
        assert!(
            got == live || (got.is_some() && got == in_flight),
            "round {round}: live plugin v{got:?}, last deploy returned v{live:?}, in flight v{in_flight:?}"
        );
        let mut m = model.lock().unwrap();
        if got.is_some() && got == in_flight {
            m.plugin_live = got;
        }
        m.plugin_in_flight = None;
    }
    // The stream group's position never goes backwards.
    let mut sub = c
        .subscribe(
            SubscribeOptions::new("k")
                .group("s")
                .auto_commit(false)
                .start(StartPosition::Earliest),
        )
        .await
        .unwrap();
    let pos = match tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
        Ok(Some(Ok(msg))) => msg.offset,
        _ => end,
    };
    let mut m = model.lock().unwrap();
    assert!(
        pos >= m.group_pos && pos <= m.group_committed.max(m.group_pos),
        "round {round}: group position {pos}, was {}, committed up to {}",
        m.group_pos,
        m.group_committed
    );
    m.group_pos = pos;
}

/// Pipelined batches with message ids until the connection dies.
async fn produce(
    c: Arc<switchyard::client::Client>,
    model: Arc<Mutex<Model>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut pending = std::collections::VecDeque::new();
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let base = {
            let mut m = model.lock().unwrap();
            m.next_msg += 20;
            m.next_msg - 20
        };
        let msgs: Vec<(String, Bytes)> = (base..base + 20)
            .map(|i| (format!("id-{i}"), Bytes::from(format!("m{i}"))))
            .collect();
        let recs = msgs
            .iter()
            .map(|(id, p)| Record::new(p.clone()).with_message_id(id.clone()))
            .collect();
        match c.queue_batch("k", recs).await {
            Ok(p) => pending.push_back((msgs, p)),
            Err(_) => break,
        }
        // Also through the plugin's topic, so its versions decide things.
        let _ = c.queue_batch("r", vec![Record::new("x")]).await;
        // About 10,000 messages a second: enough to be mid-commit at the
        // kill, few enough to check every one after each restart.
        tokio::time::sleep(Duration::from_millis(2)).await;
        if pending.len() >= 8 {
            let (msgs, p) = pending.pop_front().unwrap();
            match p.await {
                Ok(acks) => record(&model, msgs, acks),
                Err(_) => break,
            }
        }
    }
    for (msgs, p) in pending {
        if let Ok(acks) = p.await {
            record(&model, msgs, acks);
        }
    }
}

fn record(model: &Mutex<Model>, msgs: Vec<(String, Bytes)>, acks: Vec<switchyard::client::Ack>) {
    let mut m = model.lock().unwrap();
    for ((id, p), a) in msgs.into_iter().zip(acks) {
        if !a.duplicate {
            m.acked.insert(a.offset, p);
        }
        m.ids.insert(id, (a.offset, std::time::Instant::now()));
    }
}

/// Receives from queue group "q" and acks; never sees an acked message.
async fn consume_queue(
    c: Arc<switchyard::client::Client>,
    model: Arc<Mutex<Model>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let Ok(mut q) = c
        .subscribe_queue(QueueOptions::new("k", "q").prefetch(256))
        .await
    else {
        return;
    };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let msg = match tokio::time::timeout(Duration::from_millis(200), q.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(_) => break,
            Err(_) => continue,
        };
        let payload = msg.payload();
        assert!(
            !model.lock().unwrap().queue_acked.contains(&payload),
            "an acked queue message came back: {payload:?}"
        );
        if q.ack(&msg).await.is_ok() {
            model.lock().unwrap().queue_acked.insert(payload);
        } else {
            break;
        }
    }
}

/// Reads as stream group "s" and commits as it goes.
async fn consume_stream(
    c: Arc<switchyard::client::Client>,
    model: Arc<Mutex<Model>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let Ok(mut sub) = c
        .subscribe(
            SubscribeOptions::new("k")
                .group("s")
                .auto_commit(false)
                .start(StartPosition::Earliest),
        )
        .await
    else {
        return;
    };
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let msg = match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(_) => break,
            Err(_) => continue,
        };
        n += 1;
        if n.is_multiple_of(16) {
            // Recorded before it is sent: a commit the router got counts.
            let mut m = model.lock().unwrap();
            m.group_committed = m.group_committed.max(msg.offset + 1);
            drop(m);
            if sub.commit_message(&msg).is_err() {
                break;
            }
        }
    }
}
