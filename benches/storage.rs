//! Durable append throughput through the group-commit writer: one append
//! request of N records of 100 B, awaited (so one redb transaction and one
//! fsync per iteration), for N = 1, 64 and 1024. Also the read path.

#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchyard::protocol::{RawRecord, Record};
use switchyard::storage::ReadLimit;

fn append(c: &mut Criterion) {
    let (rt, _dir, storage) = switchyard_benches::temp_store(1);
    let topic = rt.block_on(storage.create_topic("bench", 1, 0, 0)).unwrap();
    let rec: RawRecord = Record::new(vec![b'x'; 100]).to_raw();

    let mut g = c.benchmark_group("storage_append_durable");
    for n in [1usize, 64, 1024] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                rt.block_on(async {
                    let batch = (0..n).map(|_| (0, rec.clone())).collect();
                    let ticket = storage.append(&topic, batch).await.unwrap();
                    ticket.await.unwrap().unwrap()
                })
            })
        });
    }
    g.finish();

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
