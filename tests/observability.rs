//! What an operator sees: the Prometheus endpoint after a known workload,
//! its guard beyond loopback, the `status` snapshot, `switchyard status`
//! and JSON logs.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::json;
use switchyard::client::{QueueOptions, Record, SubscribeOptions};

/// `GET /metrics` over a plain TCP connection: (status code, body).
/// Samples by `name{labels}` (labels as written), skipping comments.
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have {:?}", m.keys().collect::<Vec<_>>()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_describe_a_known_workload() {
    let r = start_router_with(|c| c.metrics = Some("127.0.0.1:0".parse().unwrap())).await;
    let addr = r.router.metrics_addr().expect("metrics served");
    let c = r.client().await;
    c.create_topic("orders", 2).await.unwrap();
    c.create_topic("out", 1).await.unwrap();
    c.set_topic_policy("orders", json!({ "max_delay_ms": 1000 }))
        .await
        .unwrap();

    // 100 records, one refused publish.
    let records: Vec<Record> = (0..100)
        .map(|i| Record::new(format!("order-{i}")).with_key(format!("k{}", i % 7)))
        .collect();
    let bytes: usize = records.iter().map(Record::encoded_len).sum();
    c.publish_batch("orders", records).await.unwrap();
    let late = Record::new("late").with_delay(Duration::from_secs(60));
    assert!(c.publish("orders", late).await.is_err());

    // A stream group reads and commits 30: lag 70.
    let mut sub = c
        .subscribe(
            SubscribeOptions::new("orders")
                .group("billing")
                .auto_commit(false),
        )
        .await
        .unwrap();
    let got = take(&mut sub, 30, 10).await;
    let mut last: HashMap<u32, u64> = HashMap::new();
    for m in &got {
        last.insert(m.partition, m.offset + 1);
    }
    for (p, o) in &last {
        sub.commit(*p, *o).unwrap();
    }
    sub.close().await;

    // A queue group with a prefetch of 10: 7 acked, 1 dead-lettered, so 8
    // more were delivered: 10 in flight, 82 ready.
    let mut q = c
        .subscribe_queue(QueueOptions::new("orders", "workers").prefetch(10))
        .await
        .unwrap();
    let msgs = take(&mut q, 10, 10).await;
    for m in &msgs[..7] {
        q.ack(m).await.unwrap();
    }
    q.nack(&msgs[7], false, "bad", "cannot parse")
        .await
        .unwrap();

    // A route plugin: one version live, called.
    c.deploy_plugin(
        plugin_wasm("route_by_header"),
        json!({ "name": "to-out", "hook": "route", "topic": "orders.routed*",
                "config": { "default": "out" }, "deadline_ms": 1000 }),
    )
    .await
    .unwrap();
    c.create_topic("orders.routed", 1).await.unwrap();
    for i in 0..5 {
        c.publish("orders.routed", Record::new(format!("r{i}")))
            .await
            .unwrap();
    }

    // A plugin that traps on marked records: its failures are counted by kind.
    c.create_topic("hostile", 1).await.unwrap();
    c.deploy_plugin(
        plugin_wasm("hostile"),
        json!({ "name": "trapper", "hook": "route", "topic": "hostile", "on_failure": "bypass",
                "config": { "mode": "trap", "when-header": "evil" }, "deadline_ms": 1000 }),
    )
    .await
    .unwrap();
    for _ in 0..2 {
        c.publish("hostile", Record::new("x").with_header("evil", "1"))
            .await
            .unwrap();
    }

    // Dead-lettering is written by the queue's own task: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let m = loop {
        let (code, body) = get_metrics(addr, None).await;
        assert_eq!(code, 200, "{body}");
        let m = samples(&body);
        if m.get(r#"switchyard_dlq_messages{topic="orders",dlq="orders.dlq"}"#) == Some(&1.0)
            || std::time::Instant::now() > deadline
        {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let t = r#"{topic="orders"}"#;
    assert_eq!(
        value(&m, &format!("switchyard_published_messages_total{t}")),
        100.0
    );
    assert_eq!(
        value(&m, &format!("switchyard_published_bytes_total{t}")),
        bytes as f64
    );
    assert_eq!(
        value(
            &m,
            r#"switchyard_publish_refused_total{topic="orders",code="invalid_delay"}"#
        ),
        1.0
    );
    let lag: f64 = (0..2)
        .map(|p| {
            value(
                &m,
                &format!(
                    r#"switchyard_consumer_lag_messages{{topic="orders",group="billing",partition="{p}"}}"#
                ),
            )
        })
        .sum();
    assert_eq!(lag, 70.0);
    let q = r#"{topic="orders",group="workers"}"#;
    assert_eq!(value(&m, &format!("switchyard_queue_acks_total{q}")), 7.0);
    assert_eq!(value(&m, &format!("switchyard_queue_nacks_total{q}")), 1.0);
    assert_eq!(
        value(&m, &format!("switchyard_queue_dead_lettered_total{q}")),
        1.0
    );
    assert_eq!(
        value(
            &m,
            r#"switchyard_queue_depth_messages{topic="orders",group="workers",state="in_flight"}"#
        ),
        10.0
    );
    assert_eq!(
        value(
            &m,
            r#"switchyard_queue_depth_messages{topic="orders",group="workers",state="ready"}"#
        ),
        82.0
    );
    assert_eq!(
        value(
            &m,
            r#"switchyard_dlq_messages{topic="orders",dlq="orders.dlq"}"#
        ),
        1.0
    );
    assert!(value(&m, &format!("switchyard_delivered_messages_total{t}")) >= 40.0);
    assert!(value(&m, &format!("switchyard_publish_to_ack_seconds_count{t}")) >= 1.0);
    assert!(value(&m, "switchyard_commit_records_count") >= 1.0);
    assert!(value(&m, "switchyard_commit_records_sum") >= 105.0);
    assert!(value(&m, "switchyard_journal_sync_seconds_count") >= 1.0);
    assert!(value(&m, r#"switchyard_storage_file_bytes{file="database"}"#) > 0.0);
    assert!(value(&m, "switchyard_disk_free_bytes") > 0.0);
    if std::path::Path::new("/proc/net/snmp").exists() {
        assert!(value(&m, "switchyard_udp_receive_buffer_errors_total") >= 0.0);
    }
    assert_eq!(value(&m, "switchyard_connections"), 1.0);
    let p = r#"{plugin="to-out",hook="route",topic="orders.routed*"}"#;
    assert_eq!(
        value(&m, &format!("switchyard_plugin_live_version{p}")),
        1.0
    );
    assert_eq!(value(&m, &format!("switchyard_plugin_calls_total{p}")), 5.0);
    assert_eq!(
        value(
            &m,
            r#"switchyard_plugin_failures_total{plugin="to-out",hook="route",topic="orders.routed*",kind="trap"}"#
        ),
        0.0
    );
    let h = r#"plugin="trapper",hook="route",topic="hostile""#;
    assert_eq!(
        value(
            &m,
            &format!("switchyard_plugin_failures_total{{{h},kind=\"trap\"}}")
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            &format!("switchyard_plugin_failures_total{{{h},kind=\"timeout\"}}")
        ),
        0.0
    );
    assert_eq!(
        value(&m, &format!("switchyard_plugin_call_seconds_count{p}")),
        5.0
    );
    assert_eq!(
        value(
            &m,
            r#"switchyard_published_messages_total{topic="orders.routed"}"#
        ),
        5.0
    );

    // Every family is documented, and the dashboard uses only real ones.
    let (_, body) = get_metrics(addr, None).await;
    let families: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(families.len() >= 35, "{families:?}");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    for f in &families {
        assert!(doc.contains(f), "docs/metrics.md does not describe {f}");
    }
    let dash = std::fs::read_to_string(root.join("docs/grafana-dashboard.json")).unwrap();
    for used in dash.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
        if let Some(name) = used.strip_prefix("switchyard_") {
            let base = ["_bucket", "_sum", "_count", "_total"]
                .iter()
                .fold(format!("switchyard_{name}"), |n, s| {
                    n.strip_suffix(s).map_or(n.clone(), str::to_string)
                });
            assert!(
                families.contains(&base.as_str()),
                "the dashboard uses {used}, which the router does not export"
            );
        }
    }

    // The same picture from the status request.
    let s = c.status().await.unwrap();
    let orders = s["topics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "orders")
        .unwrap();
    assert_eq!(orders["messages"], 100);
    assert_eq!(orders["refused"]["invalid_delay"], 1);
    let g = &s["groups"][0];
    assert_eq!(
        (g["group"].as_str(), g["lag"].as_u64()),
        (Some("billing"), Some(70))
    );
    let w = s["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["group"] == "workers")
        .unwrap();
    assert_eq!(
        (w["in_flight"].as_u64(), w["dlq_size"].as_u64()),
        (Some(10), Some(1))
    );
    let to_out = s["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "to-out")
        .unwrap();
    assert_eq!(
        (to_out["live_version"].as_u64(), to_out["calls"].as_u64()),
        (Some(1), Some(5))
    );
}

#[tokio::test]
async fn metrics_beyond_loopback_need_a_cluster_admin_token() {
    let r = start_router_with(|c| c.metrics = Some("0.0.0.0:0".parse().unwrap())).await;
    let port = r.router.metrics_addr().unwrap().port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (code, body) = get_metrics(addr, None).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("cluster-admin"), "{body}");
    let c = r.client().await;
    let reader = c.create_token("reader", &["consume:*"]).await.unwrap();
    assert_eq!(get_metrics(addr, Some(&reader)).await.0, 401);
    let (code, body) = get_metrics(addr, Some(&admin_token(&r.cert))).await;
    assert_eq!(code, 200);
    assert!(body.contains("switchyard_connections "), "{body}");
}

#[test]
fn status_prints_the_router_and_logs_can_be_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(router_bin());
    cmd.args([
        "--log-format",
        "json",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data",
    ])
    .arg(dir.path())
    .env("RUST_LOG", "info");
    let log = dir.path().join("router.log");
    let stderr = std::fs::File::create(&log).unwrap();
    let router = ChildRouter::start_logging(cmd, dir.path(), stderr.into());
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(router_bin())
            .args(args)
            .args(["--addr", &router.addr.to_string()])
            .env("SWITCHYARD_CA", &router.cert)
            .env("SWITCHYARD_TOKEN", admin_token(&router.cert))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    cli(&["topic", "create", "orders", "--partitions", "3"]);
    cli(&["publish", "orders", "--key", "k", "hello"]);
    let text = cli(&["status", "--interval", "0"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("orders "))
        .unwrap_or_else(|| panic!("{text}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&cols[..3], ["orders", "3", "1"], "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&cli(&["status", "--json", "--interval", "200ms"])).unwrap();
    assert_eq!(json["topics"][0]["published"], 1);
    assert!(json["topics"][0]["publish_per_s"].is_number(), "{json}");

    // One JSON object per line, connections named with their principal.
    let logs = std::fs::read_to_string(&log).unwrap();
    let opened: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v: &serde_json::Value| v["fields"]["message"] == "connection open")
        .collect();
    assert!(opened.len() >= 4, "{logs}");
    assert_eq!(opened[0]["fields"]["principal"], "admin");
}

/// `switchyard top` in a real pseudo-terminal: the screen it draws is read
/// back through a terminal emulator, and a topic being published to shows
/// its rate rise.
#[test]
fn top_shows_a_rising_publish_rate_in_a_terminal() {
    use portable_pty::{CommandBuilder, PtySize};
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let router = ChildRouter::spawn(dir.path());
    let token = admin_token(&router.cert);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = rt.block_on(connect(router.addr, &router.cert));
    rt.block_on(async {
        c.create_topic("live", 2).await.unwrap();
        c.create_topic("quiet", 1).await.unwrap();
    });

    let (rows, cols) = (40, 150);
    let pair = portable_pty::native_pty_system()
        .openpty(PtySize {
            rows,
            cols,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let mut cmd = CommandBuilder::new(router_bin());
    cmd.args([
        "top",
        "--interval",
        "300ms",
        "--addr",
        &router.addr.to_string(),
    ]);
    cmd.env("SWITCHYARD_CA", &router.cert);
    cmd.env("SWITCHYARD_TOKEN", &token);
    cmd.env("TERM", "xterm-256color");
    let mut child = pair.slave.spawn_command(cmd).unwrap();
    drop(pair.slave);
    let screen = Arc::new(Mutex::new(vt100::Parser::new(rows, cols, 0)));
    {
        let mut reader = pair.master.try_clone_reader().unwrap();
        let screen = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen.lock().unwrap().process(&buf[..n]);
            }
        });
    }
    let mut keys = pair.master.take_writer().unwrap();
    // The publish rate `top` shows for `live`, once the topic is on screen.
    let rate = || -> Option<(f64, String)> {
        let text = screen.lock().unwrap().screen().contents();
        let words = |l: &str| -> Vec<String> {
            l.split(|c: char| c.is_whitespace() || c == '│')
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect()
        };
        let line = text
            .lines()
            .map(words)
            .find(|w| w.first().is_some_and(|w| w == "live"))?;
        let r = line
            .iter()
            .find_map(|w| w.strip_suffix("/s"))?
            .parse()
            .ok()?;
        Some((r, text))
    };
    let wait_for = |what: &str, ok: &dyn Fn(f64) -> bool| -> f64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((r, _)) = rate().filter(|(r, _)| ok(*r)) {
                return r;
            }
            if std::time::Instant::now() > deadline {
                let shown = screen.lock().unwrap().screen().contents();
                panic!("top never showed {what}; the screen:\n{shown}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let idle = wait_for("the idle topic", &|r| r == 0.0);
    assert_eq!(idle, 0.0);

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (c, stop) = (c.clone(), stop.clone());
        let handle = rt.handle().clone();
        std::thread::spawn(move || {
            handle.block_on(async {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let batch = (0..50).map(|j| Record::new(format!("m{i}-{j}"))).collect();
                    c.publish_batch("live", batch).await.unwrap();
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
    };
    let rising = wait_for("a rising publish rate", &|r| r > 100.0);
    assert!(rising > 100.0);
    // The table is sorted by publish rate: the busy topic comes first.
    let text = screen.lock().unwrap().screen().contents();
    let live_at = text.find("│live ").unwrap();
    let quiet_at = text.find("│quiet ").unwrap();
    assert!(live_at < quiet_at, "{text}");
    stop.store(true, Ordering::Relaxed);
    publisher.join().unwrap();

    keys.write_all(b"q").unwrap();
    keys.flush().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "top did not quit on q"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}
