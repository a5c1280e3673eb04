//! `switchyard subscribe`

use std::io::Write;

use anyhow::Context;
use base64::Engine;
use futures::{FutureExt, StreamExt};

use super::ConnectArgs;
use crate::client::{Message, QueueConsumer, QueueMessage, QueueOptions, SubscribeOptions};
use crate::protocol::{DeliveryTag, StartPosition};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// One payload per line.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AckMode {
    /// Ack after printing.
    Manual,
    /// Settled by the router when sent.
    Auto,
}

#[derive(Debug, clap::Args)]
pub(super) struct SubscribeArgs {
    /// Topic to read.
    topic: String,
    /// Consumer group: members split partitions and share committed offsets.
    /// Without it, an anonymous subscription reads everything and commits nothing.
    #[arg(long, default_value = "")]
    group: String,
    /// Start where the group has no committed offset: earliest, latest, an
    /// offset, or an RFC 3339 time (2026-11-23T10:00:00Z).
    #[arg(long, default_value = "earliest", value_parser = parse_start)]
    from: StartPosition,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Messages the router may send ahead of what has been printed (queue
    /// mode with manual acks: most messages unacknowledged at once).
    #[arg(long, default_value_t = 1024)]
    prefetch: u32,
    /// Read the feed named by --group, following this key (repeat for
    /// more): its records appended from now on, in per-key order.
    #[arg(long, requires = "group", conflicts_with = "queue")]
    follow: Vec<String>,
    /// Consume as a queue: members of --group compete for messages, each
    /// acked after it is printed.
    #[arg(long, requires = "group")]
    queue: bool,
    /// Queue mode: how long a message stays hidden before redelivery if
    /// not acked.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s", requires = "queue")]
    visibility: std::time::Duration,
    /// Queue mode: `manual` acks each message once printed; `auto` lets the
    /// router settle it when sent (at most once).
    #[arg(long, value_enum, default_value_t = AckMode::Manual, requires = "queue")]
    ack: AckMode,
    /// Queue mode: run this shell command per message instead of printing
    /// it, one at a time, with the payload on its standard input and
    /// `SWITCHYARD_TOPIC`, `_PARTITION`, `_OFFSET`, `_ATTEMPT` and `_KEY` set.
    /// Exit 0 acks; exit 100 dead-letters at once (a message that will
    /// never succeed); any other status nacks it for a retry under the
    /// topic's retry policy.
    #[arg(
        long,
        value_name = "CMD",
        requires = "queue",
        conflicts_with = "follow"
    )]
    exec: Option<String>,
    #[command(flatten)]
    conn: ConnectArgs,
}

/// Parses `--from`.
pub(crate) fn parse_start(s: &str) -> Result<StartPosition, String> {
    match s {
        "earliest" => Ok(StartPosition::Earliest),
        "latest" => Ok(StartPosition::Latest),
        _ => {
            if let Ok(o) = s.parse::<u64>() {
                return Ok(StartPosition::Offset(o));
            }
            let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
                format!("'{s}' is not earliest, latest, an offset, or an RFC 3339 time")
            })?;
            let ms = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| format!("'{s}' is before 1970"))?
                .as_millis() as u64;
            Ok(StartPosition::Timestamp(ms))
        }
    }
}

pub(super) async fn run(args: SubscribeArgs) -> anyhow::Result<()> {
    let client = args.conn.connect().await?;
    if args.queue {
        return run_queue(args, client).await;
    }
    // Commit what was printed, not what was prefetched: a group member that
    // exits after --count messages leaves the rest to the next member.
    let prefetch = match args.count {
        Some(c) => args.prefetch.min(c.min(u32::MAX as u64) as u32),
        None => args.prefetch,
    };
    let mut opts = SubscribeOptions::new(&args.topic)
        .group(&args.group)
        .start(args.from)
        .prefetch(prefetch)
        .auto_commit(false);
    if !args.follow.is_empty() {
        opts = opts.follow(args.follow.iter().map(|k| bytes::Bytes::from(k.clone())));
    }
    let mut printed: std::collections::BTreeMap<u32, u64> = Default::default();
    let mut sub = client.subscribe(opts).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut seen = 0u64;
    if args.count == Some(0) {
        return Ok(());
    }
    loop {
        // Flush only when nothing more is ready, so bursts print in one write.
        let next = match sub.next().now_or_never() {
            Some(n) => n,
            None => {
                out.flush()?;
                commit_printed(&sub, &mut printed);
                tokio::select! {
                    n = sub.next() => n,
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        };
        let Some(msg) = next else { break };
        let msg = msg.context("subscription failed")?;
        print_message(&mut out, &msg, args.format)?;
        printed.insert(msg.partition, msg.offset + 1);
        seen += 1;
        if args.count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    out.flush()?;
    drop(out);
    commit_printed(&sub, &mut printed);
    sub.close().await;
    client.close().await;
    Ok(())
}

async fn run_queue(args: SubscribeArgs, client: crate::client::Client) -> anyhow::Result<()> {
    let auto = args.ack == AckMode::Auto;
    let prefetch = match args.count {
        Some(c) => args.prefetch.min(c.min(u32::MAX as u64) as u32),
        None => args.prefetch,
    };
    let opts = QueueOptions::new(&args.topic, &args.group)
        .start(args.from)
        .prefetch(prefetch)
        .visibility(args.visibility)
        .auto_ack(auto);
    let mut q = client.subscribe_queue(opts).await?;
    if let Some(cmd) = &args.exec {
        if auto {
            anyhow::bail!("--exec acks or nacks each message by its exit status: drop --ack auto");
        }
        let r = run_exec(&mut q, cmd, args.count).await;
        q.close().await;
        client.close().await;
        return r;
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut printed: Vec<DeliveryTag> = Vec::new();
    let mut seen = 0u64;
    while args.count.is_none_or(|c| seen < c) {
        let next = match q.next().now_or_never() {
            Some(n) => n,
            None => {
                out.flush()?;
                ack_printed(&q, &mut printed).await?;
                tokio::select! {
                    n = q.next() => n,
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        };
        let Some(msg) = next else { break };
        let msg = msg.context("queue subscription failed")?;
        print_queue_message(&mut out, &msg, args.format)?;
        if !auto {
            printed.push(msg.tag);
        }
        seen += 1;
    }
    out.flush()?;
    drop(out);
    ack_printed(&q, &mut printed).await?;
    q.close().await;
    client.close().await;
    Ok(())
}

/// The exit status with which an `--exec` command dead-letters its message.
const EXIT_DEAD_LETTER: i32 = 100;

/// Runs `cmd` per message until `count` messages were handled (or the
/// stream or Ctrl-C ends it): ack on exit 0, dead-letter on exit 100, nack
/// for a retry otherwise.
async fn run_exec(q: &mut QueueConsumer, cmd: &str, count: Option<u64>) -> anyhow::Result<()> {
    let mut seen = 0u64;
    while count.is_none_or(|c| seen < c) {
        let next = tokio::select! {
            n = q.next() => n,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(msg) = next else { break };
        let msg = msg.context("queue subscription failed")?;
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("SWITCHYARD_TOPIC", &*msg.topic)
            .env("SWITCHYARD_PARTITION", msg.tag.partition.to_string())
            .env("SWITCHYARD_OFFSET", msg.tag.offset.to_string())
            .env("SWITCHYARD_ATTEMPT", msg.tag.attempt.to_string())
            .env(
                "SWITCHYARD_KEY",
                msg.key()
                    .map(|k| String::from_utf8_lossy(&k).into_owned())
                    .unwrap_or_default(),
            )
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("running `{cmd}`"))?;
        if let Some(mut stdin) = child.stdin.take() {
            use tokio::io::AsyncWriteExt;
            // A command that does not read its input is fine.
            let _ = stdin.write_all(&msg.payload()).await;
        }
        let out = child.wait_with_output().await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let why = stderr.lines().last().unwrap_or("").trim();
        eprint!("{stderr}");
        match out.status.code() {
            Some(0) => q.ack(&msg).await.context("acknowledging a message")?,
            Some(EXIT_DEAD_LETTER) => q
                .nack(&msg, false, "exit-100", why)
                .await
                .context("dead-lettering a message")?,
            code => {
                let code = code.map_or("signal".to_string(), |c| format!("exit-{c}"));
                q.nack(&msg, true, &code, why)
                    .await
                    .context("nacking a message")?;
            }
        }
        seen += 1;
    }
    Ok(())
}

async fn ack_printed(q: &QueueConsumer, printed: &mut Vec<DeliveryTag>) -> anyhow::Result<()> {
    if !printed.is_empty() {
        q.ack_many(&std::mem::take(printed))
            .await
            .context("acknowledging printed messages")?;
    }
    Ok(())
}

fn print_queue_message(
    out: &mut impl Write,
    m: &QueueMessage,
    format: Format,
) -> std::io::Result<()> {
    match format {
        Format::Text => {
            out.write_all(&m.payload())?;
            out.write_all(b"\n")
        }
        Format::Json => {
            let mut obj = serde_json::Map::new();
            obj.insert("topic".into(), (*m.topic).into());
            obj.insert("partition".into(), m.tag.partition.into());
            obj.insert("offset".into(), m.tag.offset.into());
            obj.insert("attempt".into(), m.tag.attempt.into());
            obj.insert("timestamp_ms".into(), m.timestamp_ms.into());
            put_bytes(&mut obj, "key", m.key().as_deref());
            let mut headers = serde_json::Map::new();
            for (n, v) in m.record.headers() {
                headers.insert(n.to_string(), bytes_value(&v));
            }
            obj.insert("headers".into(), headers.into());
            put_bytes(&mut obj, "payload", Some(&m.payload()));
            serde_json::to_writer(&mut *out, &obj)?;
            out.write_all(b"\n")
        }
    }
}

fn commit_printed(
    sub: &crate::client::Subscription,
    printed: &mut std::collections::BTreeMap<u32, u64>,
) {
    for (p, next) in std::mem::take(printed) {
        let _ = sub.commit(p, next);
    }
}

fn print_message(out: &mut impl Write, m: &Message, format: Format) -> std::io::Result<()> {
    match format {
        Format::Text => {
            out.write_all(&m.payload())?;
            out.write_all(b"\n")
        }
        Format::Json => {
            let mut obj = serde_json::Map::new();
            obj.insert("topic".into(), (*m.topic).into());
            obj.insert("partition".into(), m.partition.into());
            obj.insert("offset".into(), m.offset.into());
            obj.insert("timestamp_ms".into(), m.timestamp_ms.into());
            let ts = std::time::UNIX_EPOCH + std::time::Duration::from_millis(m.timestamp_ms);
            obj.insert(
                "timestamp".into(),
                humantime::format_rfc3339_millis(ts).to_string().into(),
            );
            put_bytes(&mut obj, "key", m.key().as_deref());
            let mut headers = serde_json::Map::new();
            for (n, v) in m.headers() {
                headers.insert(n, bytes_value(&v));
            }
            obj.insert("headers".into(), headers.into());
            put_bytes(&mut obj, "payload", Some(&m.payload()));
            serde_json::to_writer(&mut *out, &obj)?;
            out.write_all(b"\n")
        }
    }
}

/// Text as a JSON string when it is UTF-8; otherwise `{"base64": "..."}`.
fn bytes_value(b: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(b) {
        Ok(s) => s.into(),
        Err(_) => serde_json::json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(b)
        }),
    }
}

fn put_bytes(obj: &mut serde_json::Map<String, serde_json::Value>, name: &str, b: Option<&[u8]>) {
    obj.insert(
        name.into(),
        b.map(bytes_value).unwrap_or(serde_json::Value::Null),
    );
}
