//! One bad plugin, client or topic can never slow or starve the others.
//!
//! The bugs these guard against: plugin calls ran on the async runtime's
//! worker threads behind a per-plugin lock, so a looping route plugin on
//! one topic stalled publishes to every other topic (and shutdown); deploys
//! and topic policies accepted any deadline, memory cap or dedup window.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use serde_json::json;
use switchyard::client::Client;
use switchyard::protocol::{ErrorCode, Record};

/// Deploys the hostile plugin in `mode` as `hot`'s route plugin.
async fn deploy_hostile(c: &Client, name: &str, topic: &str, mode: &str, deadline_ms: u64) {
    c.deploy_plugin(
        plugin_wasm("hostile"),
        json!({ "name": name, "hook": "route", "topic": topic, "deadline_ms": deadline_ms,
                "config": { "mode": mode } }),
    )
    .await
    .unwrap();
}

/// Publishes to `topic` from `n` tasks until `stop`; counts failures.
fn hammer(
    c: &Arc<Client>,
    topic: &'static str,
    n: usize,
    stop: &Arc<AtomicBool>,
) -> (Vec<tokio::task::JoinHandle<()>>, Arc<AtomicU64>) {
    let failed = Arc::new(AtomicU64::new(0));
    let tasks = (0..n)
        .map(|i| {
            let (c, stop, failed) = (c.clone(), stop.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let batch = (0..10).map(|j| Record::new(format!("{i}-{j}"))).collect();
                    if c.publish_batch(topic, batch).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    (tasks, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_plugin_on_one_topic_does_not_stall_another() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("hot", 1).await.unwrap();
    c.create_topic("cold", 1).await.unwrap();
    // The longest deadline this router allows, spent in full by every call.
    deploy_hostile(&c, "looper", "hot", "loop", 1_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let hot_clients: Vec<_> = futures::future::join_all((0..4).map(|_| r.client())).await;
    let mut tasks = Vec::new();
    let mut failures = Vec::new();
    for hc in &hot_clients {
        let (t, f) = hammer(hc, "hot", 1, &stop);
        tasks.extend(t);
        failures.push(f);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Meanwhile another client publishes to `cold`, one record at a time.
    let cold = r.client().await;
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let t = Instant::now();
        cold.publish("cold", Record::new(format!("c{i}")))
            .await
            .unwrap();
        slowest = slowest.max(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    // Well under the plugin's 1 s deadline: `cold` never waited for it.
    assert!(
        slowest < Duration::from_millis(500),
        "a publish to the cold topic took {slowest:?}"
    );
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let failed: u64 = failures.iter().map(|f| f.load(Ordering::Relaxed)).sum();
    assert!(failed > 0, "the looping plugin's own topic fails");
    assert_eq!(
        c.describe_topic("cold").await.unwrap().partitions[0].end,
        100
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_keeps_timing_out_is_suspended_and_listed_as_such() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("hot", 1).await.unwrap();
    deploy_hostile(&c, "looper", "hot", "loop", 50).await;
    let mut last = None;
    for _ in 0..8 {
        last = Some(
            c.publish("hot", Record::new("x"))
                .await
                .unwrap_err()
                .to_string(),
        );
    }
    let last = last.unwrap();
    assert!(last.contains("suspended"), "{last}");
    let list = c
        .admin_request("list", json!({}), Bytes::new())
        .await
        .unwrap();
    let stats = &list[0]["stats"];
    assert!(stats["suspensions"].as_u64().unwrap() >= 1, "{list}");
    assert!(stats["suspended_calls"].as_u64().unwrap() >= 1, "{list}");
    assert!(stats["suspended_for_ms"].as_u64().is_some(), "{list}");
    // With the failure mode `bypass`, a suspended plugin lets messages through.
    c.deploy_plugin(
        plugin_wasm("hostile"),
        json!({ "name": "looper", "hook": "route", "topic": "hot", "deadline_ms": 50,
                "on_failure": "bypass", "config": { "mode": "loop" } }),
    )
    .await
    .unwrap();
    for _ in 0..8 {
        c.publish("hot", Record::new("kept")).await.unwrap();
    }
    assert_eq!(c.describe_topic("hot").await.unwrap().partitions[0].end, 8);
}

#[tokio::test]
async fn deploys_and_policies_above_the_router_maxima_are_refused() {
    let r = start_router_with(|c| c.max_plugin_memory_total_mb = 200).await;
    let c = r.client().await;
    c.create_topic("t", 1).await.unwrap();
    c.create_topic("u", 1).await.unwrap();
    let deploy = |name: &'static str, topic: &'static str, extra: serde_json::Value| {
        let c = c.clone();
        async move {
            let mut opts = json!({ "name": name, "hook": "route", "topic": topic });
            for (k, v) in extra.as_object().unwrap() {
                opts[k] = v.clone();
            }
            c.deploy_plugin(plugin_wasm("route_by_header"), opts).await
        }
    };
    for (extra, max) in [
        (json!({ "deadline_ms": 30_000 }), "1000"),
        (json!({ "memory_mb": 65_536 }), "256"),
    ] {
        let e = deploy("big", "t", extra.clone()).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{extra}: {e}");
        assert!(e.to_string().contains(max), "names the maximum: {e}");
    }
    deploy(
        "first",
        "t",
        json!({ "memory_mb": 128, "deadline_ms": 1000 }),
    )
    .await
    .unwrap();
    let e = deploy("second", "u", json!({ "memory_mb": 128 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded));
    assert!(e.to_string().contains("max_plugin_memory_total_mb"), "{e}");
    // A new version of the same plugin replaces its memory, not adds to it.
    deploy("first", "t", json!({ "memory_mb": 190 }))
        .await
        .unwrap();
    let list = c
        .admin_request("list", json!({}), Bytes::new())
        .await
        .unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "nothing refused was deployed"
    );

    let e = c
        .set_topic_policy("t", json!({ "dedup_window_ms": 365u64 * 24 * 3600 * 1000 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded));
    assert!(e.to_string().contains("max_dedup_window_ms"), "{e}");
    let e = c
        .set_topic_policy("t", json!({ "queue_window": 100_000_000 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded));
    assert_eq!(
        c.topic_policy("t").await.unwrap()["dedup_window_ms"],
        120_000
    );
}

#[test]
fn sigterm_with_a_looping_plugin_exits_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = ChildRouter::spawn(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = rt.block_on(async {
        let c = connect(r.addr, &r.cert).await;
        c.create_topic("hot", 1).await.unwrap();
        deploy_hostile(&c, "looper", "hot", "loop", 1_000).await;
        // Four connections: four publish streams, each with a call to make.
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let c = connect(r.addr, &r.cert).await;
            tasks.extend(hammer(&c, "hot", 1, &stop).0);
        }
        // Let calls be in progress when the signal comes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        tasks
    });
    let sent = Instant::now();
    sigterm(&r.child);
    let status = r.child.wait().unwrap();
    let took = sent.elapsed();
    stop.store(true, Ordering::Relaxed);
    assert!(
        status.success(),
        "router exits 0 after SIGTERM, got {status}"
    );
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    rt.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    });
}

/// A raw QUIC connection from `from` that has completed `Hello` as the
/// router's admin; returns it with the control stream.
async fn raw_session(
    r: &TestRouter,
    from: &str,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let conn = raw_connect_from(r, from).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = switchyard::protocol::Frame::Hello {
        min_version: 1,
        max_version: 1,
        client: "raw".into(),
        token: Some(admin_token(&r.cert)),
    };
    send.write_all(&hello.to_bytes()).await.unwrap();
    let mut head = [0u8; 5];
    recv.read_exact(&mut head).await.unwrap();
    assert_eq!(head[4], 0x02, "HelloOk");
    let len = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize - 1;
    let mut rest = vec![0u8; len];
    recv.read_exact(&mut rest).await.unwrap();
    (conn, send, recv)
}

/// Opens a stream and sends the first `sent` bytes of a publish frame
/// announcing `announced` bytes; never finishes it.
async fn start_frame(conn: &quinn::Connection, announced: u32, sent: usize) -> quinn::SendStream {
    let (mut s, _) = conn.open_bi().await.unwrap();
    let mut head = announced.to_be_bytes().to_vec();
    head.push(0x20);
    let _ = s.write_all(&head).await;
    let chunk = vec![0u8; 64 << 10];
    let mut left = sent;
    while left > 0 {
        let n = left.min(chunk.len());
        // The router may close the connection mid-frame: that is the point.
        if s.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        left -= n;
    }
    s
}

async fn closed_code(conn: &quinn::Connection, secs: u64) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(secs), conn.closed())
        .await
        .expect("connection closed in time")
    {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("closed otherwise: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_frames_are_bounded_per_connection_and_in_time() {
    let r = start_router_with(|c| {
        c.max_connection_partial_bytes = 20 << 20;
        c.frame_timeout_ms = 1_000;
    })
    .await;
    let good = r.client().await;
    good.create_topic("t", 1).await.unwrap();

    // Two 15 MiB frames started at once: the second is over the budget.
    let (conn, _c, _r) = raw_session(&r, "127.0.0.1").await;
    let _a = start_frame(&conn, 15 << 20, 1 << 20).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _b = start_frame(&conn, 15 << 20, 1 << 20).await;
    let (code, why) = closed_code(&conn, 10).await;
    assert_eq!(code, 6, "{why}");
    assert!(why.contains("budget"), "{why}");
    good.publish("t", Record::new("still served"))
        .await
        .unwrap();

    // A frame that stops arriving is cut off after the frame timeout, and
    // what it held is released: a new connection may start one again.
    let (conn, _c, _r) = raw_session(&r, "127.0.0.1").await;
    let _a = start_frame(&conn, 15 << 20, 1 << 20).await;
    let (code, why) = closed_code(&conn, 10).await;
    assert_eq!(code, 6, "{why}");
    assert!(why.contains("stopped arriving"), "{why}");
    let (conn, _c, _r) = raw_session(&r, "127.0.0.1").await;
    let _a = start_frame(&conn, 15 << 20, 1 << 20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(conn.close_reason().is_none(), "the budget was released");
    good.publish("t", Record::new("still served"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    let r = start_router_with(|c| c.max_connections_per_address = 3).await;
    let held: Vec<_> = futures::future::join_all((0..3).map(|_| r.client())).await;
    let e = switchyard::client::Client::connect(
        switchyard::client::ClientConfig::new(r.addr).with_data_dir(r.dir.path()),
    )
    .await
    .err()
    .expect("a fourth connection from the same address is refused");
    assert!(e.to_string().contains("max_connections_per_address"), "{e}");
    // Another address keeps its slots.
    let (_conn, _s, _r) = raw_session(&r, "127.0.0.2").await;
    held[0].list_topics().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_only_keep_alive_are_closed_when_idle() {
    let r = start_router_with(|c| c.connection_max_idle_ms = 400).await;
    let idle = connect_with(r.addr, &r.cert, |c| {
        c.with_token(admin_token(&r.cert))
            .with_reconnect(switchyard::client::Reconnect::off())
    })
    .await;
    let reconnecting = r.client().await;
    let busy = r.client().await;
    busy.create_topic("t", 1).await.unwrap();
    let _sub = busy
        .subscribe(switchyard::client::SubscribeOptions::new("t"))
        .await
        .unwrap();
    // The client's keep-alives (every 0.67 s in tests) do not count.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let e = idle.list_topics().await.unwrap_err();
    assert!(e.to_string().contains("idle"), "{e}");
    busy.list_topics().await.unwrap();
    assert_eq!(busy.connections(), 1, "a subscription keeps its connection");
    // A client that reconnects makes a new connection when next used, not
    // before (an idle client does not churn connections).
    assert!(!reconnecting.is_connected());
    reconnecting.list_topics().await.unwrap();
    assert_eq!(reconnecting.connections(), 2);
}

/// A 200-byte message id, as the probe that filled memory used.
fn long_id(i: usize) -> String {
    format!("{i:0>200}")
}

async fn publish_ids(c: &Client, range: std::ops::Range<usize>) -> Vec<switchyard::client::Ack> {
    let mut acks = Vec::new();
    let ids: Vec<usize> = range.collect();
    for chunk in ids.chunks(250) {
        let batch = chunk
            .iter()
            .map(|&i| Record::new(format!("m{i}")).with_message_id(long_id(i)))
            .collect();
        acks.extend(c.publish_batch("t", batch).await.unwrap());
    }
    acks
}

#[tokio::test]
async fn message_ids_are_remembered_across_a_restart_and_forgotten_after_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let start = || switchyard::server::Router::start(test_config(dir.path()));
    let router = start().await.unwrap();
    let cert = router.cert_path().to_path_buf();
    let c = connect(router.local_addr(), &cert).await;
    c.create_topic("t", 2).await.unwrap();
    let first = publish_ids(&c, 0..2_000).await;
    assert!(first.iter().all(|a| !a.duplicate));
    // Every retry is recognised, with the original's position.
    let again = publish_ids(&c, 0..2_000).await;
    for (a, b) in first.iter().zip(&again) {
        assert!(b.duplicate);
        assert_eq!((a.partition, a.offset), (b.partition, b.offset));
    }
    // Ids are remembered across a restart (rebuilt from disk as hashes).
    c.close().await;
    router.shutdown().await;
    let router = start().await.unwrap();
    let c = connect(router.local_addr(), &cert).await;
    let after = publish_ids(&c, 1_990..2_010).await;
    assert!(after[..10].iter().all(|a| a.duplicate), "remembered");
    assert!(after[10..].iter().all(|a| !a.duplicate), "new ids are new");
    // Past the window they are forgotten: the same id is stored anew.
    c.set_topic_policy("t", json!({ "dedup_window_ms": 300 }))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.publish("t", Record::new("tick")).await.unwrap();
    let late = publish_ids(&c, 0..10).await;
    assert!(
        late.iter().all(|a| !a.duplicate),
        "forgotten after the window"
    );
    let end: u64 = c
        .describe_topic("t")
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.end)
        .sum();
    assert_eq!(end, 2_000 + 10 + 1 + 10);
    c.close().await;
    router.shutdown().await;
}

/// The router's resident memory, in bytes (Linux).
#[cfg(target_os = "linux")]
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb << 10
}

#[cfg(target_os = "linux")]
#[test]
fn remembered_message_ids_do_not_keep_their_bytes_in_memory() {
    const IDS: usize = 200_000;
    let dir = tempfile::tempdir().unwrap();
    // A small page cache, so that its filling up is not what is measured.
    let config = dir.path().join("router.toml");
    std::fs::write(&config, "cache_bytes = 1048576\n").unwrap();
    let data = dir.path().join("data");
    let r = ChildRouter::spawn_with(&data, &["--config".as_ref(), config.as_os_str()]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pid = r.child.id();
    let grew = rt.block_on(async {
        let c = connect(r.addr, &r.cert).await;
        c.create_topic("ids", 4).await.unwrap();
        // Warm up the same paths without ids, then measure ids alone.
        let plain = |n: usize| {
            (0..n)
                .map(|i| Record::new(format!("{i}")))
                .collect::<Vec<_>>()
        };
        for _ in 0..20 {
            c.publish_batch("ids", plain(1000)).await.unwrap();
        }
        let before = rss_of(pid);
        let mut pending = Vec::new();
        for start in (0..IDS).step_by(1000) {
            let batch = (start..start + 1000)
                .map(|i| Record::new(format!("{i}")).with_message_id(long_id(i)))
                .collect();
            pending.push(c.queue_batch("ids", batch).await.unwrap());
            if pending.len() == 16 {
                pending.remove(0).await.unwrap();
            }
        }
        for p in pending {
            p.await.unwrap();
        }
        rss_of(pid).saturating_sub(before)
    });
    // Holding the 200-byte ids took ~500 bytes each (100 MB here); a hash
    // and an expiry entry take ~50.
    let per_id = grew / IDS as u64;
    assert!(
        per_id < 250,
        "router memory grew {grew} bytes: {per_id} per remembered id"
    );
}
