//! End-to-end durable publish throughput through a real router (QUIC on
//! loopback, redb with fsync): no plugin vs a route plugin on the topic.
//! One producer, pipelined: 16 batches of 1000 x 100 B records in flight.
//!
//! Needs the components: `plugins/build.sh` first.

#![allow(missing_docs)]

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchyard::client::{Client, ClientConfig};
use switchyard::protocol::Record;
use switchyard::server::{Router, RouterConfig};

const BATCH: usize = 1000;
const IN_FLIGHT: usize = 16;

fn publish(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (router, client) = rt.block_on(async {
        let router = Router::start(RouterConfig {
            data: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            ..RouterConfig::default()
        })
        .await
        .unwrap();
        let client =
            Client::connect(ClientConfig::new(router.local_addr()).with_data_dir(dir.path()))
                .await
                .unwrap();
        client.create_topic("plain", 4).await.unwrap();
        client.create_topic("routed", 4).await.unwrap();
        let wasm = std::fs::read(format!(
            "{}/../plugins/target/wasm32-wasip2/release/probe.wasm",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("run plugins/build.sh first");
        client
            .deploy_plugin(wasm, serde_json_value())
            .await
            .unwrap();
        (router, Arc::new(client))
    });
    let records: Vec<Record> = (0..BATCH)
        .map(|i| Record::new(vec![b'x'; 100]).with_key(format!("k{}", i % 100)))
        .collect();

    let mut g = c.benchmark_group("publish_durable_100B");
    g.throughput(Throughput::Elements((BATCH * IN_FLIGHT) as u64));
    g.sample_size(20);
    for topic in ["plain", "routed"] {
        g.bench_function(
            if topic == "plain" {
                "no_plugin"
            } else {
                "route_plugin"
            },
            |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let mut pending = Vec::with_capacity(IN_FLIGHT);
                        for _ in 0..IN_FLIGHT {
                            pending.push(client.queue_batch(topic, records.clone()).await.unwrap());
                        }
                        for p in pending {
                            p.await.unwrap();
                        }
                    })
                })
            },
        );
    }
    g.finish();
    rt.block_on(async {
        client.close().await;
        router.shutdown().await;
    });
}

fn serde_json_value() -> serde_json::Value {
    // A generous deadline: the bench also runs once, unoptimized, in CI.
    serde_json::json!({ "name": "probe", "hook": "route", "topic": "routed", "deadline_ms": 1000 })
}

criterion_group!(benches, publish);
criterion_main!(benches);
