//! Publishes records that each carry a unique message id, to measure what
//! remembering ids costs the router (memory per id; `docs/configuration.md`).
//!
//! ```text
//! cargo run --release -p switchyard-benches --example dedup_ids -- \
//!     --data switchyard-data --count 1000000 --id-bytes 200
//! ```
//!
//! Watch the router's RSS (`grep VmRSS /proc/$(pgrep -f 'switchyard serve')/status`)
//! before, after, and after the topic's dedup window has passed.

#![allow(missing_docs)]

use switchyard_benches::flag;

use std::time::Instant;

use switchyard::client::{Client, ClientConfig};
use switchyard::protocol::{ErrorCode, Record};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = flag("--addr", "127.0.0.1:7400").parse()?;
    let data = flag("--data", "switchyard-data");
    let topic = flag("--topic", "ids");
    let count: usize = flag("--count", "1000000").parse()?;
    let id_bytes: usize = flag("--id-bytes", "200").parse()?;
    let client = Client::connect(ClientConfig::new(addr).with_data_dir(&data)).await?;
    match client.create_topic(&topic, 4).await {
        Err(e) if e.code() != Some(ErrorCode::TopicExists) => return Err(e.into()),
        _ => {}
    }
    let started = Instant::now();
    let mut pending = Vec::new();
    for start in (0..count).step_by(1000) {
        let batch = (start..(start + 1000).min(count))
            .map(|i| {
                let r = Record::new(vec![b'x'; 100]);
                // --id-bytes 0: no id, the baseline.
                match id_bytes {
                    0 => r,
                    n => r.with_message_id(format!("{i:0>n$}")),
                }
            })
            .collect();
        pending.push(client.queue_batch(&topic, batch).await?);
        if pending.len() >= 16 {
            pending.remove(0).await?;
        }
    }
    for p in pending {
        p.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "published {count} records with {id_bytes}-byte ids in {secs:.2} s ({:.0} msg/s)",
        count as f64 / secs
    );
    client.close().await;
    Ok(())
}
