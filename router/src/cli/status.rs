//! `switchyard status`: one look at the router (topics, rates, lag, queue
//! depth, dead letters, plugin health), from the `status` admin request.
//! `switchyard top` shows the same, live.

use std::time::Duration;

use serde_json::Value;

use super::ConnectArgs;

/// Arguments of `switchyard status`.
#[derive(Debug, clap::Args)]
pub(super) struct StatusArgs {
    /// Print JSON (the router's snapshot, with rates) for scripts.
    #[arg(long)]
    json: bool,
    /// Time between the two snapshots rates are computed from (0: one
    /// snapshot, no rates).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    #[command(flatten)]
    conn: ConnectArgs,
}

pub(super) async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let c = args.conn.connect().await?;
    let mut snap = c.status().await?;
    if !args.interval.is_zero() {
        tokio::time::sleep(args.interval).await;
        let now = c.status().await?;
        snap = with_rates(&snap, now);
    }
    c.close().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&snap)?);
    } else {
        print!("{}", render(&snap));
    }
    Ok(())
}

/// `cur` with per-second rates against `prev` added: `publish_per_s` and
/// `deliver_per_s` on topics, `ack_per_s` on queues.
pub(super) fn with_rates(prev: &Value, mut cur: Value) -> Value {
    let secs = (cur["time_ms"].as_u64().unwrap_or(0))
        .saturating_sub(prev["time_ms"].as_u64().unwrap_or(0)) as f64
        / 1000.0;
    if secs <= 0.0 {
        return cur;
    }
    let rate = |list: &str, key: &[&str], field: &str, cur: &Value| -> Option<f64> {
        let find = |v: &Value| {
            v[list]
                .as_array()?
                .iter()
                .find(|x| key.iter().all(|k| x[*k] == cur[*k]))
                .and_then(|x| x[field].as_u64())
        };
        let before = find(prev).unwrap_or(0);
        let now = cur[field].as_u64()?;
        Some(now.saturating_sub(before) as f64 / secs)
    };
    let topics: Vec<Value> = cur["topics"].as_array().cloned().unwrap_or_default();
    let topics = topics
        .into_iter()
        .map(|mut t| {
            t["publish_per_s"] = rate("topics", &["name"], "published", &t).into();
            t["deliver_per_s"] = rate("topics", &["name"], "delivered", &t).into();
            t
        })
        .collect();
    cur["topics"] = Value::Array(topics);
    let queues: Vec<Value> = cur["queues"].as_array().cloned().unwrap_or_default();
    let queues = queues
        .into_iter()
        .map(|mut q| {
            q["ack_per_s"] = rate("queues", &["topic", "group"], "acked", &q).into();
            q
        })
        .collect();
    cur["queues"] = Value::Array(queues);
    cur["interval_s"] = secs.into();
    cur
}

/// Bytes as B, KiB, MiB, GiB.
pub(super) fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// A rate, or `-` when there is none.
pub(super) fn per_s(v: &Value) -> String {
    match v.as_f64() {
        Some(r) if r >= 100.0 => format!("{r:.0}/s"),
        Some(r) => format!("{r:.1}/s"),
        None => "-".into(),
    }
}

/// Rows as aligned columns, the first row the header.
fn table(rows: &[Vec<String>]) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let widths: Vec<usize> = (0..first.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                // Names left-aligned, numbers right-aligned.
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One table of a snapshot: its title, column names and rows.
pub(super) struct Section {
    pub(super) title: &'static str,
    pub(super) header: &'static [&'static str],
    pub(super) rows: Vec<Vec<String>>,
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The snapshot's tables, topics in the order the snapshot lists them:
/// what `status` prints and `top` draws.
pub(super) fn sections(s: &Value) -> Vec<Section> {
    let arr = |k: &str| s[k].as_array().cloned().unwrap_or_default();
    let topics = arr("topics")
        .iter()
        .map(|t| {
            let refused: u64 = t["refused"]
                .as_object()
                .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
            vec![
                cell(&t["name"]),
                t["partitions"].as_array().map_or(0, Vec::len).to_string(),
                cell(&t["messages"]),
                bytes(t["bytes"].as_u64().unwrap_or(0)),
                per_s(&t["publish_per_s"]),
                per_s(&t["deliver_per_s"]),
                refused.to_string(),
            ]
        })
        .collect();
    let groups = arr("groups")
        .iter()
        .map(|g| {
            ["group", "topic", "members", "lag"]
                .map(|k| cell(&g[k]))
                .to_vec()
        })
        .collect();
    let queues = arr("queues")
        .iter()
        .map(|q| {
            vec![
                cell(&q["group"]),
                cell(&q["topic"]),
                cell(&q["ready"]),
                cell(&q["in_flight"]),
                cell(&q["delayed"]),
                per_s(&q["ack_per_s"]),
                cell(&q["dead_lettered"]),
                format!("{} ({})", cell(&q["dlq"]), cell(&q["dlq_size"])),
            ]
        })
        .collect();
    let plugins = arr("plugins")
        .iter()
        .map(|p| {
            vec![
                cell(&p["name"]),
                cell(&p["hook"]),
                cell(&p["topic"]),
                p["live_version"]
                    .as_u64()
                    .map_or("-".into(), |v| format!("v{v}")),
                cell(&p["calls"]),
                cell(&p["failures"]),
                p["p99_us"]
                    .as_u64()
                    .map_or("-".into(), |v| format!("{v} µs")),
            ]
        })
        .collect();
    vec![
        Section {
            title: "Topics",
            header: &[
                "TOPIC",
                "PARTITIONS",
                "MESSAGES",
                "SIZE",
                "PUBLISH",
                "DELIVER",
                "REFUSED",
            ],
            rows: topics,
        },
        Section {
            title: "Consumer groups",
            header: &["GROUP", "TOPIC", "MEMBERS", "LAG"],
            rows: groups,
        },
        Section {
            title: "Queues",
            header: &[
                "QUEUE",
                "TOPIC",
                "READY",
                "IN FLIGHT",
                "DELAYED",
                "ACK",
                "DEAD-LETTERED",
                "DLQ",
            ],
            rows: queues,
        },
        Section {
            title: "Plugins",
            header: &[
                "PLUGIN", "HOOK", "TOPIC", "VERSION", "CALLS", "FAILURES", "P99",
            ],
            rows: plugins,
        },
    ]
}

/// The line above the tables: the router, its connections and storage.
pub(super) fn summary(s: &Value) -> String {
    format!(
        "{} · {} connection(s) · {} stream(s) · database {} · {} · free {}{}",
        s["server"].as_str().unwrap_or("switchyard"),
        cell(&s["connections"]),
        cell(&s["streams"]),
        bytes(s["storage"]["database_bytes"].as_u64().unwrap_or(0)),
        // A cluster node's commits are made durable in its Raft log.
        match s["storage"]["raft_log_bytes"].as_u64() {
            Some(n) => format!("raft log {}", bytes(n)),
            None => format!(
                "journal {}",
                bytes(s["storage"]["journal_bytes"].as_u64().unwrap_or(0))
            ),
        },
        s["storage"]["free_bytes"]
            .as_u64()
            .map_or("?".into(), bytes),
        match s["storage"]["failed"].as_str() {
            Some(f) => format!(" · STORAGE FAILED: {f}"),
            None => String::new(),
        }
    )
}

/// The snapshot as the tables `switchyard status` prints (the topics
/// table always, the others when they have rows).
pub(super) fn render(s: &Value) -> String {
    let mut out = summary(s);
    out.push('\n');
    for (i, sec) in sections(s).into_iter().enumerate() {
        if i > 0 && sec.rows.is_empty() {
            continue;
        }
        let mut rows = vec![sec.header.iter().map(|h| h.to_string()).collect()];
        rows.extend(sec.rows);
        out.push('\n');
        out.push_str(&table(&rows));
    }
    out
}
