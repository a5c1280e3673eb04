//! `switchyard topic ...`

use clap::Subcommand;

use super::ConnectArgs;
use crate::protocol::TopicInfo;

#[derive(Debug, Subcommand)]
pub(super) enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name: 1-249 characters from A-Z a-z 0-9 . _ -
        name: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Delete records older than this many milliseconds (0: never).
        #[arg(long, default_value_t = 0)]
        retention_ms: u64,
        /// Delete the oldest records while a partition holds more bytes (0: no limit).
        #[arg(long, default_value_t = 0)]
        retention_bytes: u64,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// List topics.
    List {
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Show a topic's partitions, offsets, bytes and retention.
    Describe {
        /// Topic name.
        name: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Show or change a topic's delivery policy (retries, priority, delay,
    /// TTL, dedup window, backlog limit); see docs/queues.md.
    Config {
        /// Topic name.
        name: String,
        /// A policy field, NAME=VALUE (e.g. max_attempts=3,
        /// shed_below_priority=5); repeat for more. Values are JSON.
        #[arg(long = "set")]
        set: Vec<String>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Delete a topic and all its records.
    Delete {
        /// Topic name.
        name: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

pub(super) async fn run(cmd: TopicCommand) -> anyhow::Result<()> {
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            retention_ms,
            retention_bytes,
            conn,
        } => {
            let c = conn.connect().await?;
            let t = c
                .create_topic_with(&name, partitions, retention_ms, retention_bytes)
                .await?;
            let n = t.partitions.len();
            let s = if n == 1 { "" } else { "s" };
            println!("created topic {} with {n} partition{s}", t.name);
            c.close().await;
        }
        TopicCommand::List { conn } => {
            let c = conn.connect().await?;
            let topics = c.list_topics().await?;
            println!(
                "{:<32} {:>10} {:>12} {:>14}",
                "TOPIC", "PARTITIONS", "RECORDS", "BYTES"
            );
            for t in topics {
                let records: u64 = t.partitions.iter().map(|p| p.end - p.start).sum();
                let bytes: u64 = t.partitions.iter().map(|p| p.bytes).sum();
                println!(
                    "{:<32} {:>10} {:>12} {:>14}",
                    t.name,
                    t.partitions.len(),
                    records,
                    bytes
                );
            }
            c.close().await;
        }
        TopicCommand::Describe { name, conn } => {
            let c = conn.connect().await?;
            print_topic(&c.describe_topic(&name).await?);
            c.close().await;
        }
        TopicCommand::Delete { name, conn } => {
            let c = conn.connect().await?;
            c.delete_topic(&name).await?;
            println!("deleted topic {name}");
            c.close().await;
        }
        TopicCommand::Config { name, set, conn } => {
            let mut fields = serde_json::Map::new();
            for kv in &set {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--set '{kv}' is not NAME=VALUE"))?;
                // Values are JSON; a bare word is taken as a string.
                let v = serde_json::from_str(v).unwrap_or_else(|_| v.into());
                fields.insert(k.to_string(), v);
            }
            let c = conn.connect().await?;
            let policy = if fields.is_empty() {
                c.topic_policy(&name).await?
            } else {
                c.set_topic_policy(&name, fields.into()).await?
            };
            println!("{}", serde_json::to_string_pretty(&policy)?);
            c.close().await;
        }
    }
    Ok(())
}

fn print_topic(t: &TopicInfo) {
    let created = std::time::UNIX_EPOCH + std::time::Duration::from_millis(t.created_ms);
    println!("topic:      {}", t.name);
    println!("created:    {}", humantime::format_rfc3339_millis(created));
    println!(
        "retention:  {}, {}",
        if t.retention_ms == 0 {
            "no age limit".to_string()
        } else {
            format!("{} ms", t.retention_ms)
        },
        if t.retention_bytes == 0 {
            "no size limit".to_string()
        } else {
            format!("{} bytes per partition", t.retention_bytes)
        }
    );
    println!(
        "{:>9} {:>12} {:>12} {:>12}",
        "PARTITION", "START", "END", "BYTES"
    );
    for (i, p) in t.partitions.iter().enumerate() {
        println!("{:>9} {:>12} {:>12} {:>12}", i, p.start, p.end, p.bytes);
    }
}
