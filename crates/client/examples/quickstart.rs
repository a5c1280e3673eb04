//! Connect to a running router, create a topic, publish pipelined batches,
//! and read them back as a consumer group.
//!
//! ```text
//! cargo run --release -- serve            # in one terminal
//! cargo run --example quickstart          # in another, same directory
//! ```
//!
//! It trusts the router's certificate and acts with its admin token, both
//! from `switchyard-data/` (`SWITCHYARD_DATA` overrides the directory,
//! `SWITCHYARD_ADDR` the address).

use futures::StreamExt;
use switchyard_client::{Client, ClientConfig, ErrorCode, Record, StartPosition, SubscribeOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("SWITCHYARD_ADDR").unwrap_or_else(|_| "127.0.0.1:7400".into());
    let data = std::env::var("SWITCHYARD_DATA").unwrap_or_else(|_| "switchyard-data".into());
    let client = Client::connect(ClientConfig::new(addr.parse()?).with_data_dir(data)).await?;
    println!("connected to {}", client.server_info().server);

    match client.create_topic("quickstart", 4).await {
        Ok(_) => println!("created topic quickstart"),
        Err(e) if e.code() == Some(ErrorCode::TopicExists) => println!("topic quickstart exists"),
        Err(e) => return Err(e.into()),
    }

    // Queue ten batches without waiting, then collect the acks: one round
    // trip for all of them, and per-key order is kept.
    let mut pending = Vec::new();
    for batch in 0..10 {
        let records = (0..100)
            .map(|i| {
                Record::new(format!("order {batch}-{i}"))
                    .with_key(format!("customer-{}", i % 8))
                    .with_header("source", "quickstart")
            })
            .collect();
        pending.push(client.queue_batch("quickstart", records).await?);
    }
    let mut stored = 0;
    for p in pending {
        stored += p.await?.len();
    }
    println!("stored {stored} records durably");

    // Read them back as group "billing"; offsets are committed as delivered,
    // so running this again continues where the group stopped.
    let opts = SubscribeOptions::new("quickstart")
        .group("billing")
        .start(StartPosition::Earliest);
    let mut sub = client.subscribe(opts).await?;
    for _ in 0..5 {
        let Some(msg) = sub.next().await else { break };
        let msg = msg?;
        println!(
            "partition {} offset {} key {:?}: {}",
            msg.partition,
            msg.offset,
            msg.key(),
            String::from_utf8_lossy(&msg.payload())
        );
    }
    sub.close().await;
    client.close().await;
    Ok(())
}
