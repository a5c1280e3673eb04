//! Durable append throughput through the group-commit writer: one append
//! request of N records of 100 B, awaited (so one transaction and one fsync
//! per iteration), for N = 1, 64 and 1024, made durable through the
//! write-ahead journal (the default for small commits) and by a durable redb
//! commit (`journal_bytes = 0`). Also the read path, and how long a store
//! takes to open and take its first idempotent publish with N message ids
//! in its dedup window (what a restart, or a cluster's new leader, waits).

#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchyard::protocol::{RawRecord, Record};
use switchyard::storage::{AppendRecord, ReadLimit, Storage, StorageConfig};

fn append(c: &mut Criterion) {
    let rec: RawRecord = Record::new(vec![b'x'; 100]).to_raw();
    let mut g = c.benchmark_group("storage_append_durable");
    for (name, journal_bytes) in [("redb", 0), ("journal", 8 << 20)] {
        let config = StorageConfig {
            journal_bytes,
            ..StorageConfig::default()
        };
        let (rt, _dir, storage) = switchyard_benches::temp_store_with(1, config);
        let topic = rt.block_on(storage.create_topic("bench", 1, 0, 0)).unwrap();
        for n in [1usize, 64, 1024] {
            g.throughput(Throughput::Elements(n as u64));
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                b.iter(|| {
                    rt.block_on(async {
                        let batch = (0..n).map(|_| (0, rec.clone())).collect();
                        let ticket = storage.append(&topic, batch).await.unwrap();
                        ticket.await.unwrap().unwrap()
                    })
                })
            });
        }
        rt.block_on(storage.shutdown());
    }
    g.finish();

    let (rt, _dir, storage) = switchyard_benches::temp_store(1);
    let topic = rt.block_on(storage.create_topic("bench", 1, 0, 0)).unwrap();
    let batch = (0..1024).map(|_| (0, rec.clone())).collect();
    let ticket = rt.block_on(storage.append(&topic, batch)).unwrap();
    rt.block_on(ticket).unwrap().unwrap();

    let mut g = c.benchmark_group("storage_read");
    g.throughput(Throughput::Elements(1024));
    g.bench_function("scan_1024x100B", |b| {
        b.iter(|| {
            let mut bytes = 0usize;
            storage
                .scan(
                    topic.meta.id,
                    0,
                    0,
                    ReadLimit {
                        max_records: 1024,
                        max_bytes: usize::MAX,
                    },
                    |_, _, r| bytes += r.len(),
                )
                .unwrap();
            bytes
        })
    });
    g.finish();
    rt.block_on(storage.shutdown());
}

/// `Storage::open` and one publish with a new message id, acknowledged,
/// over a store whose dedup window holds `n` ids.
fn open(c: &mut Criterion) {
    let rec: RawRecord = Record::new(vec![b'x'; 100]).to_raw();
    let mut g = c.benchmark_group("storage_open_then_publish");
    g.sample_size(10);
    for n in [0usize, 200_000] {
        let (rt, dir, storage) = switchyard_benches::temp_store(1);
        let topic = rt.block_on(storage.create_topic("bench", 1, 0, 0)).unwrap();
        let id = topic.meta.id;
        let with_id = |i: usize| AppendRecord {
            topic_id: id,
            partition: 0,
            record: rec.clone(),
            dedup: Some(bytes::Bytes::from(format!("id-{i}"))),
            fanout: None,
        };
        for chunk in (0..n).collect::<Vec<_>>().chunks(4096) {
            let batch = chunk.iter().map(|&i| with_id(i)).collect();
            let ticket = rt.block_on(storage.append_many(batch, Vec::new())).unwrap();
            rt.block_on(ticket).unwrap().unwrap();
        }
        rt.block_on(storage.shutdown());
        drop(storage);
        let path = dir.path().join("bench.redb");
        let mut next = n;
        g.bench_with_input(BenchmarkId::new("ids", n), &n, |b, _| {
            b.iter(|| {
                let storage = Storage::open(&path, StorageConfig::default()).unwrap();
                next += 1;
                rt.block_on(async {
                    let ticket = storage
                        .append_many(vec![with_id(next)], Vec::new())
                        .await
                        .unwrap();
                    ticket.await.unwrap().unwrap();
                    storage.shutdown().await;
                });
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = append, open
}
criterion_main!(benches);
