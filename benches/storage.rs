//! Durable append throughput through the group-commit writer: one append
//! request of N records of 100 B, awaited (so one transaction and one fsync
//! per iteration), for N = 1, 64 and 1024, made durable through the
//! write-ahead journal (the default for small commits) and by a durable redb
//! commit (`journal_bytes = 0`). Also the read path.

#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchyard::protocol::{RawRecord, Record};
use switchyard::storage::{ReadLimit, StorageConfig};

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

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = append
}
criterion_main!(benches);
