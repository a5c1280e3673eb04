//! Plugins end to end against a real router: real components built from
//! `plugins/`, deployed over QUIC, deciding real publishes and deliveries.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{TestRouter, plugin_wasm, start_router, take};
use serde_json::json;
use switchyard::client::{Client, SubscribeOptions};
use switchyard::protocol::{ErrorCode, Record};

/// Deploys a component. Tests that are not about deadlines give calls a
/// generous one: the default 10 ms is sized for a release router, and a
/// debug build on a loaded 2-core CI machine can be descheduled for longer.
async fn deploy(
    c: &Client,
    file: &str,
    mut opts: serde_json::Value,
) -> Result<serde_json::Value, switchyard::client::ClientError> {
    if opts.get("deadline_ms").is_none() {
        opts["deadline_ms"] = json!(1000);
    }
    c.deploy_plugin(plugin_wasm(file), opts).await
}

async fn show(c: &Client, name: &str) -> serde_json::Value {
    c.plugin_request("show", json!({ "name": name }), Bytes::new())
        .await
        .unwrap()
}

async fn end(c: &Client, topic: &str) -> u64 {
    c.describe_topic(topic)
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.end)
        .sum()
}

#[tokio::test]
async fn route_plugin_sends_messages_to_the_topics_it_names() {
    let r = start_router().await;
    let c = r.client().await;
    for t in ["orders", "orders.eu", "orders.us"] {
        c.create_topic(t, 2).await.unwrap();
    }
    let d = deploy(
        &c,
        "route_by_header",
        json!({
            "name": "by-region", "hook": "route", "topic": "orders",
            "config": { "header": "region", "prefix": "orders." },
        }),
    )
    .await
    .unwrap();
    assert_eq!(d["version"], 1);

    let acks = c
        .publish_batch(
            "orders",
            vec![
                Record::new("eu-1").with_header("region", "eu"),
                Record::new("us-1")
                    .with_header("region", "us")
                    .with_key("k"),
                Record::new("plain"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(acks.len(), 3);
    // Each ack names the topic its record landed in, if a route moved it.
    let topics: Vec<Option<&str>> = acks.iter().map(|a| a.topic.as_deref()).collect();
    assert_eq!(topics, [Some("orders.eu"), Some("orders.us"), None]);
    assert_eq!(end(&c, "orders.eu").await, 1);
    assert_eq!(end(&c, "orders.us").await, 1);
    assert_eq!(
        end(&c, "orders").await,
        1,
        "no header: kept on its own topic"
    );
    let mut sub = c
        .subscribe(SubscribeOptions::new("orders.eu"))
        .await
        .unwrap();
    assert_eq!(
        take(&mut sub, 1, 10).await[0].payload(),
        Bytes::from("eu-1")
    );

    // A decision naming a topic that does not exist fails the whole batch
    // (failure mode reject): nothing of it is stored.
    let before = (end(&c, "orders").await, end(&c, "orders.eu").await);
    let e = c
        .publish_batch(
            "orders",
            vec![
                Record::new("ok").with_header("region", "eu"),
                Record::new("bad").with_header("region", "mars"),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PluginFailed));
    assert!(e.to_string().contains("orders.mars"), "{e}");
    assert_eq!(
        (end(&c, "orders").await, end(&c, "orders.eu").await),
        before
    );

    let list = c
        .plugin_request("list", json!({}), Bytes::new())
        .await
        .unwrap();
    let p = &list[0];
    assert_eq!(p["name"], "by-region");
    assert_eq!(p["live_version"], 1);
    // Two batches, one call each: the deploy's self-test is not counted.
    assert_eq!(p["stats"]["calls"], 2);
    assert_eq!(p["stats"]["messages"], 5);
    assert!(p["stats"]["failures"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn filter_plugin_decides_what_each_subscription_sees() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("payments", 1).await.unwrap();
    deploy(
        &c,
        "content_filter",
        json!({
            "name": "paid-only", "hook": "filter", "topic": "payments", "group": "billing",
            "config": { "field": "status", "equals": "paid" },
        }),
    )
    .await
    .unwrap();
    let recs: Vec<Record> = (0..100)
        .map(|i| {
            Record::new(format!(
                r#"{{"n": {i}, "status": "{}"}}"#,
                if i % 3 == 0 { "paid" } else { "open" }
            ))
        })
        .collect();
    c.publish_batch("payments", recs).await.unwrap();

    // The bound group sees only paid payments, in order.
    let mut billing = c
        .subscribe(SubscribeOptions::new("payments").group("billing"))
        .await
        .unwrap();
    let got = take(&mut billing, 34, 10).await;
    for m in &got {
        assert!(String::from_utf8_lossy(&m.payload()).contains("paid"));
    }
    assert!(got.windows(2).all(|w| w[0].offset < w[1].offset));
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            futures::StreamExt::next(&mut billing)
        )
        .await
        .is_err(),
        "nothing else is delivered"
    );
    // Other subscriptions are unfiltered.
    let mut audit = c
        .subscribe(SubscribeOptions::new("payments").group("audit"))
        .await
        .unwrap();
    take(&mut audit, 100, 10).await;
}

async fn hostile(c: &Client, name: &str, topic: &str, mode: &str, on_failure: &str) {
    // Only the loop should hit the deadline; the others must fail their own way.
    let deadline_ms = if mode == "loop" { 100 } else { 1000 };
    deploy(
        c,
        "hostile",
        json!({
            "name": name, "hook": "route", "topic": topic, "on_failure": on_failure,
            "config": { "mode": mode, "when-header": "evil" }, "deadline_ms": deadline_ms, "memory_mb": 16,
        }),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn hostile_plugins_fail_calls_not_the_router() {
    let r = start_router().await;
    let c = r.client().await;
    for (mode, code_text) in [
        ("loop", "timed out"),
        ("alloc", "out of memory"),
        ("trap", "trapped"),
    ] {
        let topic = format!("t-{mode}");
        c.create_topic(&topic, 1).await.unwrap();
        hostile(&c, &format!("h-{mode}"), &topic, mode, "reject").await;
        let e = c
            .publish(&topic, Record::new("x").with_header("evil", "1"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::PluginFailed), "{mode}: {e}");
        assert!(e.to_string().contains(code_text), "{mode}: {e}");
        // The same plugin keeps serving well-behaved messages afterwards.
        let ack = c.publish(&topic, Record::new("fine")).await.unwrap();
        assert_eq!(ack.offset, 0, "{mode}: only the good message was stored");
        let s = show(&c, &format!("h-{mode}")).await;
        assert!(s["stats"]["failures"].as_u64().unwrap() >= 1);
    }

    // Bypass: the message is stored as if there were no plugin.
    c.create_topic("t-bypass", 1).await.unwrap();
    hostile(&c, "h-bypass", "t-bypass", "trap", "bypass").await;
    c.publish("t-bypass", Record::new("kept").with_header("evil", "1"))
        .await
        .unwrap();
    assert_eq!(end(&c, "t-bypass").await, 1);

    // Dead letter: the message goes to <topic>.dlq with the error.
    c.create_topic("t-dlq", 1).await.unwrap();
    hostile(&c, "h-dlq", "t-dlq", "loop", "dead-letter").await;
    c.publish("t-dlq", Record::new("lost?").with_header("evil", "1"))
        .await
        .unwrap();
    assert_eq!(end(&c, "t-dlq").await, 0);
    let mut dlq = c
        .subscribe(SubscribeOptions::new("t-dlq.dlq"))
        .await
        .unwrap();
    let m = take(&mut dlq, 1, 10).await.remove(0);
    assert_eq!(m.payload(), Bytes::from("lost?"));
    assert_eq!(m.header("x-dlq-topic"), Some(Bytes::from("t-dlq")));
    assert!(String::from_utf8_lossy(&m.header("x-dlq-error").unwrap()).contains("timed out"));

    // The router is fine: plain topics still work.
    c.create_topic("plain", 1).await.unwrap();
    c.publish("plain", Record::new("ok")).await.unwrap();
}

#[tokio::test]
async fn bad_components_are_refused_at_deploy() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("t", 1).await.unwrap();
    let opts = |name: &str| json!({ "name": name, "hook": "route", "topic": "t" });
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not wasm",
            b"hello, world".to_vec(),
            "not a WebAssembly file",
        ),
        (
            "core module",
            b"\0asm\x01\0\0\0".to_vec(),
            "core WebAssembly module",
        ),
        (
            "truncated",
            plugin_wasm("route_by_header")[..500].to_vec(),
            "does not compile",
        ),
        (
            "wrong hook",
            plugin_wasm("content_filter"),
            "does not implement the `route` hook",
        ),
    ];
    for (what, wasm, expect) in cases {
        let e = c.deploy_plugin(wasm, opts("bad")).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::PluginInvalid), "{what}: {e}");
        assert!(e.to_string().contains(expect), "{what}: {e}");
    }
    let e = deploy(&c, "hostile", json!({ "name": "bad", "hook": "route", "topic": "t", "config": { "mode": "fail-self-test" } }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PluginInvalid));
    assert!(e.to_string().contains("self-test"), "{e}");
    let e = deploy(
        &c,
        "route_by_header",
        json!({ "name": "x", "hook": "route", "topic": "missing" }),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownTopic));
    // Nothing was deployed by any of that.
    let list = c
        .plugin_request("list", json!({}), Bytes::new())
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 0);
    let e = c
        .plugin_request("show", json!({ "name": "bad" }), Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownPlugin));
}

#[tokio::test]
async fn plugins_versions_and_rollbacks_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || common::test_config(dir.path());
    let router = switchyard::server::Router::start(cfg()).await.unwrap();
    let c = common::connect(router.local_addr(), router.cert_path()).await;
    c.create_topic("t", 1).await.unwrap();
    for v in ["one", "two", "three"] {
        deploy(
            &c,
            "versioned_route",
            json!({ "name": "stamp", "hook": "route", "topic": "t", "config": { "version": v } }),
        )
        .await
        .unwrap();
    }
    let r = c
        .plugin_request("rollback", json!({ "name": "stamp" }), Bytes::new())
        .await
        .unwrap();
    assert_eq!(r["version"], 2);
    c.publish("t", Record::new("a")).await.unwrap();
    router.shutdown().await;

    let router = switchyard::server::Router::start(cfg()).await.unwrap();
    let c = common::connect(router.local_addr(), router.cert_path()).await;
    let s = show(&c, "stamp").await;
    assert_eq!(s["live_version"], 2);
    assert_eq!(s["versions"], json!([1, 2, 3]));
    let events: Vec<_> = s["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        events,
        vec![
            ("deploy".into(), 1),
            ("deploy".into(), 2),
            ("deploy".into(), 3),
            ("rollback".into(), 2)
        ]
    );
    c.publish("t", Record::new("b")).await.unwrap();
    let mut sub = c.subscribe(SubscribeOptions::new("t")).await.unwrap();
    for m in take(&mut sub, 2, 10).await {
        assert_eq!(
            m.header("plugin-version"),
            Some(Bytes::from("two")),
            "decided by the live version"
        );
    }
    c.plugin_request("remove", json!({ "name": "stamp" }), Bytes::new())
        .await
        .unwrap();
    c.publish("t", Record::new("c")).await.unwrap();
    let m = take(&mut sub, 1, 10).await.remove(0);
    assert_eq!(
        m.header("plugin-version"),
        None,
        "removed plugins decide nothing"
    );
    router.shutdown().await;
}

#[tokio::test]
async fn dry_run_summarises_decisions_without_side_effects() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("orders", 1).await.unwrap();
    c.create_topic("orders.eu", 1).await.unwrap();
    let recs = (0..30)
        .map(|i| match i % 3 {
            0 => Record::new("x").with_header("region", "eu"),
            1 => Record::new("x").with_header("region", "apac"),
            _ => Record::new("x"),
        })
        .collect();
    c.publish_batch("orders", recs).await.unwrap();
    let r = c
        .plugin_request(
            "test",
            json!({ "hook": "route", "topic": "orders", "count": 30, "config": { "header": "region", "prefix": "orders." } }),
            plugin_wasm("route_by_header").into(),
        )
        .await
        .unwrap();
    assert_eq!(r["messages"], 30);
    assert_eq!(r["outcomes"]["to orders.eu"], 10);
    assert_eq!(r["outcomes"]["to orders.apac (invalid: unknown topic)"], 10);
    assert_eq!(r["outcomes"]["keep -> orders"], 10);
    assert!(r["call_us"]["p99"].as_u64().unwrap() > 0);
    // Nothing was routed, deployed or stored.
    assert_eq!(end(&c, "orders.eu").await, 0);
    assert_eq!(end(&c, "orders").await, 30);
    let list = c
        .plugin_request("list", json!({}), Bytes::new())
        .await
        .unwrap();
    assert!(list.as_array().unwrap().is_empty());
}

/// Publishes `total` messages from one pipelined producer while `during`
/// runs, returning the ids acked.
async fn pump(
    c: Arc<Client>,
    topic: &'static str,
    total: usize,
    progress: Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<usize> {
    let mut pending = std::collections::VecDeque::new();
    let mut acked = Vec::new();
    for start in (0..total).step_by(250) {
        let ids: Vec<usize> = (start..(start + 250).min(total)).collect();
        let recs = ids
            .iter()
            .map(|i| Record::new(format!("{i}")).with_key(format!("k{}", i % 64)))
            .collect();
        pending.push_back((ids, c.queue_batch(topic, recs).await.unwrap()));
        while pending.len() > 16 {
            let (ids, p) = pending.pop_front().unwrap();
            p.await.unwrap();
            acked.extend(ids);
            progress.store(acked.len(), std::sync::atomic::Ordering::Relaxed);
        }
    }
    for (ids, p) in pending {
        p.await.unwrap();
        acked.extend(ids);
    }
    acked
}

#[tokio::test]
async fn hot_swaps_under_load_decide_every_message_exactly_once_in_order() {
    const TOTAL: usize = 100_000;
    let r: TestRouter = start_router().await;
    let c = r.client().await;
    c.create_topic("hot", 4).await.unwrap();
    let stamp = |v: &str| json!({ "name": "stamp", "hook": "route", "topic": "hot", "config": { "version": v } });
    deploy(&c, "versioned_route", stamp("v1")).await.unwrap();

    let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let producer = tokio::spawn(pump(r.client().await, "hot", TOTAL, progress.clone()));
    let wait_for = |n: usize| {
        let progress = progress.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while progress.load(std::sync::atomic::Ordering::Relaxed) < n {
                assert!(Instant::now() < deadline, "producer stalled");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    wait_for(20_000).await;
    deploy(&c, "versioned_route", stamp("v2")).await.unwrap();
    wait_for(45_000).await;
    deploy(&c, "versioned_route", stamp("v3")).await.unwrap();
    wait_for(70_000).await;
    let rb = c
        .plugin_request(
            "rollback",
            json!({ "name": "stamp", "to": 2 }),
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(rb["version"], 2);
    let acked = producer.await.unwrap();
    assert_eq!(acked.len(), TOTAL);

    let mut sub = c
        .subscribe(SubscribeOptions::new("hot").prefetch(8192))
        .await
        .unwrap();
    let msgs = take(&mut sub, TOTAL, 120).await;
    let mut ids = HashSet::new();
    let mut runs: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let mut by_partition: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
    for m in &msgs {
        let id: usize = String::from_utf8_lossy(&m.payload()).parse().unwrap();
        assert!(ids.insert(id), "message {id} stored twice");
        let stamps: Vec<_> = m
            .record
            .headers()
            .filter(|(n, _)| *n == "plugin-version")
            .collect();
        assert_eq!(
            stamps.len(),
            1,
            "message {id} decided by exactly one version"
        );
        by_partition
            .entry(m.partition)
            .or_default()
            .push((m.offset, String::from_utf8_lossy(&stamps[0].1).into_owned()));
    }
    assert_eq!(ids.len(), TOTAL, "every acked message delivered");
    let mut first_v3: HashMap<u32, u64> = HashMap::new();
    for (p, mut v) in by_partition {
        v.sort();
        let seq = runs.entry(p).or_default();
        for (o, s) in v {
            if seq.last() != Some(&s) {
                seq.push(s.clone());
                if s == "v3" {
                    first_v3.insert(p, o);
                }
            }
        }
    }
    for (p, seq) in &runs {
        assert_eq!(
            seq,
            &vec!["v1", "v2", "v3", "v2"],
            "partition {p}: versions switch in order, once each"
        );
    }
    // The deploy history records exactly where each version took over.
    let s = show(&c, "stamp").await;
    let v3 = s["version_details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == 3)
        .unwrap();
    for (p, o) in first_v3 {
        assert_eq!(
            v3["cutover"][format!("hot/{p}")],
            o,
            "cut-over of v3 in partition {p}"
        );
    }
    let lat = v3["swap_latency_us"]
        .as_u64()
        .expect("swap latency recorded");
    println!("swap latency (activation to first decision) of v3: {lat} µs");
    assert!(lat < 5_000_000);
    // Each activation keeps its own: v2's deploy and its later rollback.
    let v2_events: Vec<&serde_json::Value> = s["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["version"] == 2)
        .collect();
    assert_eq!(v2_events.len(), 2);
    assert_eq!(v2_events[0]["event"], "deploy");
    assert_eq!(v2_events[1]["event"], "rollback");
    for p in 0..4 {
        let key = format!("hot/{p}");
        let (deployed, rolled_back) = (
            v2_events[0]["cutover"][&key].as_u64().unwrap(),
            v2_events[1]["cutover"][&key].as_u64().unwrap(),
        );
        let v3_at = v3["cutover"][&key].as_u64().unwrap();
        assert!(deployed < v3_at && v3_at < rolled_back, "partition {p}");
    }
}

/// Cut-over points are stored in the commit of the first record each
/// activation decided: they survive kill -9, a deduplicated re-publish
/// never moves them, and a rollback adds its own instead of overwriting
/// the earlier activation's.
#[tokio::test]
async fn cutover_points_survive_kill_9_and_ignore_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let router = common::ChildRouter::spawn(dir.path());
    let c = common::connect(router.addr, &router.cert).await;
    c.create_topic("co", 1).await.unwrap();
    let stamp = |v: &str| json!({ "name": "co", "hook": "route", "topic": "co", "config": { "version": v } });
    let publish = |c: Arc<Client>, i: u32| async move {
        c.publish(
            "co",
            Record::new(format!("{i}")).with_message_id(format!("id-{i}")),
        )
        .await
        .unwrap()
    };
    deploy(&c, "versioned_route", stamp("v1")).await.unwrap();
    for i in 0..10 {
        assert_eq!(publish(c.clone(), i).await.offset, i as u64);
    }
    deploy(&c, "versioned_route", stamp("v2")).await.unwrap();
    let dup = publish(c.clone(), 3).await;
    assert!(dup.duplicate);
    assert_eq!(dup.offset, 3);
    assert_eq!(publish(c.clone(), 10).await.offset, 10);
    drop(router); // kill -9

    let router = common::ChildRouter::spawn(dir.path());
    let c = common::connect(router.addr, &router.cert).await;
    let cutovers = |s: &serde_json::Value| -> Vec<(String, u32, serde_json::Value)> {
        s["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let ev = e["event"].as_str().unwrap().to_string();
                (
                    ev,
                    e["version"].as_u64().unwrap() as u32,
                    e["cutover"].clone(),
                )
            })
            .collect()
    };
    let s = show(&c, "co").await;
    assert_eq!(
        cutovers(&s),
        vec![
            ("deploy".into(), 1, json!({ "co/0": 0 })),
            ("deploy".into(), 2, json!({ "co/0": 10 })),
        ]
    );
    let rb = c
        .plugin_request("rollback", json!({ "name": "co", "to": 1 }), Bytes::new())
        .await
        .unwrap();
    assert_eq!(rb["version"], 1);
    assert_eq!(publish(c.clone(), 11).await.offset, 11);
    let s = show(&c, "co").await;
    assert_eq!(
        cutovers(&s),
        vec![
            ("deploy".into(), 1, json!({ "co/0": 0 })),
            ("deploy".into(), 2, json!({ "co/0": 10 })),
            ("rollback".into(), 1, json!({ "co/0": 11 })),
        ]
    );
    let v1 = &s["version_details"][0];
    assert_eq!(v1["cutover"], json!({ "co/0": 0 }), "v1's first activation");
}

#[tokio::test]
async fn plugin_key_value_state_counts_every_stored_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || common::test_config(dir.path());
    let router = switchyard::server::Router::start(cfg()).await.unwrap();
    let c = common::connect(router.local_addr(), router.cert_path()).await;
    c.create_topic("counted", 2).await.unwrap();
    let opts = |v: &str| json!({ "name": "counter", "hook": "route", "topic": "counted", "config": { "version": v, "count-key": "seen" } });
    deploy(&c, "versioned_route", opts("v1")).await.unwrap();
    // Pipelined: later batches are decided before earlier ones commit, and
    // must still see their writes. A hot swap halfway keeps the count.
    let mut pending = Vec::new();
    for b in 0..40 {
        if b == 20 {
            deploy(&c, "versioned_route", opts("v2")).await.unwrap();
        }
        let recs = (0..250).map(|i| Record::new(format!("{b}-{i}"))).collect();
        pending.push(c.queue_batch("counted", recs).await.unwrap());
    }
    for p in pending {
        p.await.unwrap();
    }
    let kv = |c: Arc<Client>| async move {
        c.plugin_request(
            "kv-get",
            json!({ "name": "counter", "key": "seen" }),
            Bytes::new(),
        )
        .await
        .unwrap()["value"]
            .clone()
    };
    assert_eq!(kv(c.clone()).await, json!("10000"));
    assert_eq!(end(&c, "counted").await, 10_000);
    router.shutdown().await;

    // The count was committed with the messages: it survives a restart.
    let router = switchyard::server::Router::start(cfg()).await.unwrap();
    let c = common::connect(router.local_addr(), router.cert_path()).await;
    assert_eq!(kv(c.clone()).await, json!("10000"));
    router.shutdown().await;
}

/// Concurrent `publish` calls share batch frames; the router stores or
/// refuses each call's records as a unit, so a record a route plugin
/// refuses fails only the call that published it.
#[tokio::test]
async fn a_refused_record_fails_only_its_own_publish() {
    let r = start_router().await;
    let c = r.client().await;
    for t in ["in", "out"] {
        c.create_topic(t, 1).await.unwrap();
    }
    deploy(
        &c,
        "route_by_header",
        json!({ "name": "by-header", "hook": "route", "topic": "in", "on_failure": "reject" }),
    )
    .await
    .unwrap();
    // A current-thread runtime polls every call before the publisher's
    // writer runs: all 40 are queued, and travel, in one frame.
    let calls = (0..40).map(|i| {
        let target = if i == 17 { "nowhere" } else { "out" };
        c.publish(
            "in",
            Record::new(format!("m{i}")).with_header("route-to", target),
        )
    });
    let results = futures::future::join_all(calls).await;
    for (i, r) in results.iter().enumerate() {
        match (i, r) {
            (17, Err(e)) => {
                assert_eq!(e.code(), Some(ErrorCode::PluginFailed), "{e}");
                assert!(e.to_string().contains("nowhere"), "{e}");
            }
            (17, Ok(a)) => panic!("the record routed nowhere was stored: {a:?}"),
            (_, Ok(a)) => assert_eq!(a.topic.as_deref(), Some("out")),
            (_, Err(e)) => panic!("call {i} failed for another call's record: {e}"),
        }
    }
    assert_eq!(end(&c, "out").await, 39);
    assert_eq!(end(&c, "in").await, 0);
    // In publish order.
    let mut sub = c.subscribe(SubscribeOptions::new("out")).await.unwrap();
    let got: Vec<Bytes> = take(&mut sub, 39, 5)
        .await
        .into_iter()
        .map(|m| m.payload())
        .collect();
    let want: Vec<Bytes> = (0..40)
        .filter(|i| *i != 17)
        .map(|i| Bytes::from(format!("m{i}")))
        .collect();
    assert_eq!(got, want);
}
