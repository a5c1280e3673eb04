//! `switchyard topic config`, `switchyard queue stats` and `switchyard dlq ...`

use clap::Subcommand;

use super::ConnectArgs;

#[derive(Debug, Subcommand)]
pub(super) enum QueueCommand {
    /// Counters of queue groups: backlog, ready, in flight, waiting,
    /// delivered, acked, nacked, timed out, retried, dead-lettered, expired.
    Stats {
        /// Only this topic's groups.
        topic: Option<String>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum DlqCommand {
    /// Show the oldest dead letters of a topic with their history headers.
    List {
        /// The original topic (its dead letters are on TOPIC.dlq).
        topic: String,
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        count: u64,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Publish dead letters back to their original topics as new messages
    /// (attempts start over), oldest first, and remove them from the DLQ.
    Redrive {
        /// The original topic.
        topic: String,
        /// At most this many (default: all).
        #[arg(long)]
        max: Option<u64>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Delete every dead letter of a topic.
    Purge {
        /// The original topic.
        topic: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

pub(super) async fn run_queue(cmd: QueueCommand) -> anyhow::Result<()> {
    match cmd {
        QueueCommand::Stats { topic, conn } => {
            let c = conn.connect().await?;
            let v = c.queue_stats(topic.as_deref()).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            c.close().await;
        }
    }
    Ok(())
}

pub(super) async fn run_dlq(cmd: DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::List { topic, count, conn } => {
            let c = conn.connect().await?;
            let v = c.dlq_list(&topic, count).await?;
            eprintln!(
                "{} dead letter(s) on {}; showing {}",
                v["total"],
                v["topic"].as_str().unwrap_or_default(),
                v["messages"].as_array().map_or(0, |m| m.len())
            );
            for m in v["messages"].as_array().into_iter().flatten() {
                println!("{}", serde_json::to_string(m)?);
            }
            c.close().await;
        }
        DlqCommand::Redrive { topic, max, conn } => {
            let c = conn.connect().await?;
            let n = c.dlq_redrive(&topic, max).await?;
            println!("redrove {n} message(s) to their original topics");
            c.close().await;
        }
        DlqCommand::Purge { topic, conn } => {
            let c = conn.connect().await?;
            let n = c.dlq_purge(&topic).await?;
            println!("purged {n} dead letter(s)");
            c.close().await;
        }
    }
    Ok(())
}
