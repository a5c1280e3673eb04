//! `switchyard publish`

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::ConnectArgs;
use crate::client::PendingAcks;
use crate::protocol::Record;

#[derive(Debug, clap::Args)]
pub(super) struct PublishArgs {
    /// Topic to publish to.
    topic: String,
    /// The payload. Without it, every line of standard input is one message.
    payload: Option<String>,
    /// Record key: same key, same partition, in order.
    #[arg(long)]
    key: Option<String>,
    /// A header, NAME=VALUE; repeat for more.
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Hold queue delivery this long after the append (e.g. 10s, 5m).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "at")]
    delay: Option<std::time::Duration>,
    /// Hold queue delivery until this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    at: Option<u64>,
    /// Priority 0 (lowest) to 9 (highest) for queue delivery.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
    priority: Option<u8>,
    /// Expire the message this long after the append (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<std::time::Duration>,
    /// Message id: a second publish with the same id within the topic's
    /// dedup window stores nothing and reports the original position.
    #[arg(long)]
    id: Option<String>,
    /// How standard input is read: `lines` (each line is a payload) or
    /// `json` (each line is an object with `payload` and optional `key`,
    /// `headers` and `id`, which add to or replace the flags).
    #[arg(long, value_enum, default_value = "lines")]
    input: Input,
    /// Lines per batch when reading standard input.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Batches awaiting acknowledgement when reading standard input.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    #[command(flatten)]
    conn: ConnectArgs,
}

/// The line format of standard input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Input {
    /// Each line is one payload.
    Lines,
    /// Each line is a JSON object: `{"payload": ..., "key": "...",
    /// "headers": {"name": "value"}, "id": "..."}`.
    Json,
}

/// One line of `--input json`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    /// A string is the payload as is; any other JSON value is published
    /// as its JSON text.
    payload: serde_json::Value,
    key: Option<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    id: Option<String>,
}

fn parse_time(s: &str) -> Result<u64, String> {
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|_| format!("'{s}' is not an RFC 3339 time (2026-11-23T10:00:00Z)"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("'{s}' is before 1970"))?
        .as_millis() as u64)
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .ok_or_else(|| format!("header '{s}' is not NAME=VALUE"))
}

impl PublishArgs {
    fn record(&self, payload: Bytes) -> Record {
        let mut r = Record::new(payload);
        r.key = self.key.clone().map(Bytes::from);
        r.headers = self
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), Bytes::from(v.clone())))
            .collect();
        if let Some(d) = self.delay {
            r = r.with_delay(d);
        }
        if let Some(at) = self.at {
            r = r.with_deliver_at(at);
        }
        if let Some(p) = self.priority {
            r = r.with_priority(p);
        }
        if let Some(t) = self.ttl {
            r = r.with_ttl(t);
        }
        if let Some(id) = &self.id {
            r = r.with_message_id(id.clone());
        }
        r
    }
}

pub(super) async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let client = args.conn.connect().await?;
    if let Some(p) = &args.payload {
        let ack = client
            .publish(&args.topic, args.record(Bytes::from(p.clone())))
            .await?;
        println!(
            "{}partition {} offset {}{}",
            ack.topic
                .as_deref()
                .map(|t| format!("routed to {t}: "))
                .unwrap_or_default(),
            ack.partition,
            ack.offset,
            if ack.duplicate {
                " (duplicate: already stored with this id)"
            } else {
                ""
            }
        );
        client.close().await;
        return Ok(());
    }

    if args.id.is_some() {
        anyhow::bail!(
            "--id names one message: give the payload as an argument, or an \"id\" per line with --input json"
        );
    }
    // Pipelined: queue batches as lines arrive, keep up to `in_flight`
    // batches unacknowledged, and never wait a round trip per line.
    let started = Instant::now();
    let mut stdin = BufReader::with_capacity(1 << 20, tokio::io::stdin());
    let mut line = String::new();
    let mut batch = Vec::with_capacity(args.batch);
    let mut pending: VecDeque<(usize, PendingAcks)> = VecDeque::new();
    let mut acked = 0usize;
    let mut bytes = 0usize;
    let batch_max = args.batch.clamp(1, 4096);
    let mut lines = 0usize;
    loop {
        line.clear();
        let n = stdin.read_line(&mut line).await?;
        if n > 0 {
            let text = line.strip_suffix('\n').unwrap_or(&line);
            let text = text.strip_suffix('\r').unwrap_or(text);
            bytes += text.len();
            lines += 1;
            let record = match args.input {
                Input::Lines => args.record(Bytes::copy_from_slice(text.as_bytes())),
                Input::Json if text.trim().is_empty() => continue,
                Input::Json => json_record(&args, text).map_err(|e| {
                    anyhow::anyhow!(
                        "line {lines}: {e} (expected {{\"payload\": ..., \"key\": ..., \"headers\": {{...}}, \"id\": ...}}; lines before it were published)"
                    )
                })?,
            };
            batch.push(record);
        }
        // Send when the batch is full, at end of input, or when no more
        // input is buffered (so interactive use is not held back).
        let flush = n == 0 || batch.len() >= batch_max || stdin.buffer().is_empty();
        if flush && !batch.is_empty() {
            let count = batch.len();
            let p = client
                .queue_batch(&args.topic, std::mem::take(&mut batch))
                .await?;
            pending.push_back((count, p));
            while pending.len() > args.in_flight.max(1) {
                let (count, p) = pending.pop_front().expect("non-empty");
                p.await?;
                acked += count;
            }
        }
        if n == 0 {
            break;
        }
    }
    for (count, p) in pending {
        p.await?;
        acked += count;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "published {acked} messages ({:.1} MB) in {secs:.2} s: {:.0} msg/s, all durable",
        bytes as f64 / 1e6,
        acked as f64 / secs.max(1e-9)
    );
    client.close().await;
    Ok(())
}

/// The record of one `--input json` line: the flags, with the line's key,
/// headers and id added or in their place.
fn json_record(args: &PublishArgs, text: &str) -> Result<Record, serde_json::Error> {
    let line: JsonLine = serde_json::from_str(text)?;
    let payload = match line.payload {
        serde_json::Value::String(s) => Bytes::from(s),
        other => Bytes::from(other.to_string()),
    };
    let mut r = args.record(payload);
    if let Some(k) = line.key {
        r.key = Some(Bytes::from(k));
    }
    r.headers
        .extend(line.headers.into_iter().map(|(n, v)| (n, Bytes::from(v))));
    if let Some(id) = line.id {
        r = r.with_message_id(id);
    }
    Ok(r)
}
