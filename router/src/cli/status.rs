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

/// The snapshot as the tables `switchyard status` prints.
pub(super) fn render(s: &Value) -> String {
    let arr = |k: &str| s[k].as_array().cloned().unwrap_or_default();
    let u = |v: &Value| v.as_u64().unwrap_or(0).to_string();
    let mut out = format!(
        "{} · {} connection(s) · {} stream(s) · database {} · journal {} · free {}{}\n",
        s["server"].as_str().unwrap_or("switchyard"),
        u(&s["connections"]),
        u(&s["streams"]),
        bytes(s["storage"]["database_bytes"].as_u64().unwrap_or(0)),
        bytes(s["storage"]["journal_bytes"].as_u64().unwrap_or(0)),
        s["storage"]["free_bytes"]
            .as_u64()
            .map_or("?".into(), bytes),
        match s["storage"]["failed"].as_str() {
            Some(f) => format!("\nSTORAGE FAILED: {f}"),
            None => String::new(),
        }
    );
    let mut rows = vec![
        [
            "TOPIC",
            "PARTITIONS",
            "MESSAGES",
            "SIZE",
            "PUBLISH",
            "DELIVER",
            "REFUSED",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for t in arr("topics") {
        let refused: u64 = t["refused"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        rows.push(vec![
            t["name"].as_str().unwrap_or("").to_string(),
            t["partitions"].as_array().map_or(0, Vec::len).to_string(),
            u(&t["messages"]),
            bytes(t["bytes"].as_u64().unwrap_or(0)),
            per_s(&t["publish_per_s"]),
            per_s(&t["deliver_per_s"]),
            refused.to_string(),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    let groups = arr("groups");
    if !groups.is_empty() {
        let mut rows = vec![
            ["GROUP", "TOPIC", "MEMBERS", "LAG"]
                .map(String::from)
                .to_vec(),
        ];
        for g in groups {
            rows.push(vec![
                g["group"].as_str().unwrap_or("").to_string(),
                g["topic"].as_str().unwrap_or("").to_string(),
                u(&g["members"]),
                u(&g["lag"]),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    let queues = arr("queues");
    if !queues.is_empty() {
        let mut rows = vec![
            [
                "QUEUE",
                "TOPIC",
                "READY",
                "IN FLIGHT",
                "DELAYED",
                "ACK",
                "DEAD-LETTERED",
                "DLQ",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for q in queues {
            rows.push(vec![
                q["group"].as_str().unwrap_or("").to_string(),
                q["topic"].as_str().unwrap_or("").to_string(),
                u(&q["ready"]),
                u(&q["in_flight"]),
                u(&q["delayed"]),
                per_s(&q["ack_per_s"]),
                u(&q["dead_lettered"]),
                format!(
                    "{} ({})",
                    q["dlq"].as_str().unwrap_or(""),
                    u(&q["dlq_size"])
                ),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    let plugins = arr("plugins");
    if !plugins.is_empty() {
        let mut rows = vec![
            [
                "PLUGIN", "HOOK", "TOPIC", "VERSION", "CALLS", "FAILURES", "P99",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for p in plugins {
            rows.push(vec![
                p["name"].as_str().unwrap_or("").to_string(),
                p["hook"].as_str().unwrap_or("").to_string(),
                p["topic"].as_str().unwrap_or("").to_string(),
                p["live_version"]
                    .as_u64()
                    .map_or("-".into(), |v| format!("v{v}")),
                u(&p["calls"]),
                u(&p["failures"]),
                p["p99_us"]
                    .as_u64()
                    .map_or("-".into(), |v| format!("{v} µs")),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    out
}
