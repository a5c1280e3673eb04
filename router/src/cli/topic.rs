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
        /// How many copies the topic gets (default: the cluster's
        /// replication factor, `serve --replication-factor`, 3). A cluster
        /// places it in a group of that many voters, and refuses a number
        /// no group has; a single router keeps one copy and refuses any
        /// other number (so a script written for a cluster of three stops
        /// here rather than making an unreplicated topic).
        #[arg(long)]
        replication_factor: Option<u32>,
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
            replication_factor,
            conn,
        } => {
            let c = conn.connect().await?;
            let clustered = !c.server_info().cluster.is_empty();
            let factor = match replication_factor {
                Some(f) => f,
                None => c.replication_factor().await?,
            };
            let made = c
                .create_topic_replicated(
                    &name,
                    partitions,
                    retention_ms,
                    retention_bytes,
                    replication_factor,
                )
                .await;
            let t = match made {
                Ok(t) => t,
                Err(e) => {
                    c.close().await;
                    return Err(e.into());
                }
            };
            let n = t.partitions.len();
            let s = if n == 1 { "" } else { "s" };
            if clustered {
                println!(
                    "created topic {} with {n} partition{s} (replication factor {factor})",
                    t.name
                );
            } else {
                println!("created topic {} with {n} partition{s}", t.name);
            }
            c.close().await;
        }
        TopicCommand::List { conn } => {
            let c = conn.connect().await?;
            let topics = c.list_topics().await?;
            // On a cluster of several groups, the group holding each topic
            // (and so the leader serving it: `cluster status`).
            let grouped = c.server_info().groups > 1;
            println!(
                "{:<32} {:>10} {:>12} {:>14}{}",
                "TOPIC",
                "PARTITIONS",
                "RECORDS",
                "BYTES",
                if grouped { "  GROUP" } else { "" }
            );
            for t in topics {
                let records: u64 = t.partitions.iter().map(|p| p.end - p.start).sum();
                let bytes: u64 = t.partitions.iter().map(|p| p.bytes).sum();
                let group = if grouped {
                    format!("  {:>5}", c.topic_group(&t.name).await?)
                } else {
                    String::new()
                };
                println!(
                    "{:<32} {:>10} {:>12} {:>14}{group}",
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
            let info = c.describe_topic(&name).await?;
            let replicas = c.topic_replicas(&name).await?;
            print_topic(&info, replicas.as_ref());
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

/// A clustered topic's replicas, from its group's status as the group's
/// leader sees it: which nodes hold it, which lead it, and which hold
/// every committed entry (in sync) — a replica that is behind or does not
/// answer is one copy fewer should another node be lost.
fn print_replicas(group: &serde_json::Value) {
    println!(
        "leader:     node {} (group {}, term {})",
        group["leader"]
            .as_u64()
            .map_or("none".into(), |l| l.to_string()),
        group["group"].as_u64().unwrap_or(0),
        group["term"].as_u64().unwrap_or(0),
    );
    let voters = super::cluster::voters(group);
    let list = |synced_only: bool| {
        voters
            .iter()
            .filter(|v| !synced_only || v.in_sync)
            .map(|v| v.id.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let synced = list(true);
    let lagging: Vec<String> = voters
        .iter()
        .filter(|v| !v.in_sync)
        .map(|v| match v.behind {
            Some(1) => format!("node {} behind 1 entry", v.id),
            Some(b) => format!("node {} behind {b} entries", v.id),
            None => format!("node {} not answering", v.id),
        })
        .collect();
    println!(
        "replicas:   nodes {} (replication factor {}); in sync: {}{}",
        list(false),
        voters.len(),
        if synced.is_empty() { "none" } else { &synced },
        if lagging.is_empty() {
            String::new()
        } else {
            format!(" ({})", lagging.join(", "))
        }
    );
}

/// A topic's description; on a cluster, `replicas` is its group's status
/// ([`print_replicas`]).
fn print_topic(t: &TopicInfo, replicas: Option<&serde_json::Value>) {
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
    if let Some(group) = replicas {
        print_replicas(group);
    }
    println!(
        "{:>9} {:>12} {:>12} {:>12}",
        "PARTITION", "START", "END", "BYTES"
    );
    for (i, p) in t.partitions.iter().enumerate() {
        println!("{:>9} {:>12} {:>12} {:>12}", i, p.start, p.end, p.bytes);
    }
}
