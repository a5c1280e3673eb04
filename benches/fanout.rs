//! Fan-out on write vs on read, one hot key followed by F feeds (1, 10,
//! 100): the cost of publishing a batch of 256 records of that key
//! (durable: one transaction and fsync), and of every follower reading
//! them. On write pays one inbox reference per follower at publish and
//! reads one stream; on read pays one index entry at publish and each
//! follower merges the key's index at read time.

#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchyard::protocol::Record;
use switchyard::storage::{AppendRecord, Fanout, FeedDef, Storage, TopicHandle, key_hash};

const BATCH: usize = 256;

struct Setup {
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    storage: Storage,
    topic: std::sync::Arc<TopicHandle>,
    feeds: Vec<(FeedDef, Vec<u64>)>,
    /// The keys records are published under, in turn.
    keys: Vec<Vec<u8>>,
    mode: Fanout,
}

impl Setup {
    /// `followers` feeds, each following all of `keys`.
    fn new(mode: Fanout, followers: usize, keys: Vec<Vec<u8>>) -> Setup {
        let (rt, dir, storage) = switchyard_benches::temp_store(1);
        let topic = rt.block_on(storage.create_topic("t", 1, 0, 0)).unwrap();
        let feeds = (0..followers)
            .map(|i| {
                let def = rt
                    .block_on(storage.follow(&topic, &format!("f{i}"), keys.clone()))
                    .unwrap();
                (def, vec![0u64])
            })
            .collect();
        Setup {
            rt,
            _dir: dir,
            storage,
            topic,
            feeds,
            keys,
            mode,
        }
    }

    fn publish(&self) {
        let records = (0..BATCH)
            .map(|i| {
                let k = &self.keys[i % self.keys.len()];
                AppendRecord {
                    topic_id: self.topic.meta.id,
                    partition: 0,
                    record: Record::new(vec![b'x'; 100]).with_key(k.clone()).to_raw(),
                    dedup: None,
                    fanout: Some((key_hash(k), self.mode)),
                }
            })
            .collect();
        self.rt.block_on(async {
            let t = self.storage.append_many(records, Vec::new()).await.unwrap();
            t.await.unwrap().unwrap();
        });
    }

    /// `iters` rounds of publishing a batch (not timed) and every follower
    /// reading it (timed); each round must read `expect` records.
    fn timed_reads(&mut self, iters: u64, expect: usize) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            self.publish();
            let t = Instant::now();
            let n = self.read_all();
            total += t.elapsed();
            assert_eq!(n, expect);
        }
        total
    }

    /// Every follower reads what is new; returns records read.
    fn read_all(&mut self) -> usize {
        let mut n = 0;
        for (def, cursors) in &mut self.feeds {
            n += self
                .storage
                .read_feed(self.topic.meta.id, def, cursors, BATCH, |_, _, _, r| {
                    std::hint::black_box(r);
                })
                .unwrap();
        }
        n
    }
}

fn fanout(c: &mut Criterion) {
    for (label, mode) in [("on_write", Fanout::OnWrite), ("on_read", Fanout::OnRead)] {
        let mut g = c.benchmark_group(format!("fanout_publish_{label}"));
        g.throughput(Throughput::Elements(BATCH as u64));
        for followers in [1usize, 10, 100] {
            let s = Setup::new(mode, followers, vec![b"hot".to_vec()]);
            g.bench_with_input(
                BenchmarkId::from_parameter(followers),
                &followers,
                |b, _| b.iter(|| s.publish()),
            );
            s.rt.block_on(s.storage.shutdown());
        }
        g.finish();

        let mut g = c.benchmark_group(format!("fanout_read_{label}"));
        for followers in [1usize, 10, 100] {
            // Per record delivered to one follower.
            g.throughput(Throughput::Elements((BATCH * followers) as u64));
            let mut s = Setup::new(mode, followers, vec![b"hot".to_vec()]);
            g.bench_with_input(
                BenchmarkId::from_parameter(followers),
                &followers,
                |b, _| {
                    let expect = BATCH * s.feeds.len();
                    b.iter_custom(|iters| s.timed_reads(iters, expect))
                },
            );
            s.rt.block_on(s.storage.shutdown());
        }
        g.finish();
    }
}

/// One feed following K keys (1, 10, 100), 256 records spread over them:
/// on write the feed reads one inbox; on read it merges K key indexes.
fn many_keys(c: &mut Criterion) {
    for (label, mode) in [("on_write", Fanout::OnWrite), ("on_read", Fanout::OnRead)] {
        let mut g = c.benchmark_group(format!("fanout_read_keys_{label}"));
        g.throughput(Throughput::Elements(BATCH as u64));
        for keys in [1usize, 10, 100] {
            let names = (0..keys).map(|k| format!("k{k}").into_bytes()).collect();
            let mut s = Setup::new(mode, 1, names);
            g.bench_with_input(BenchmarkId::from_parameter(keys), &keys, |b, _| {
                b.iter_custom(|iters| s.timed_reads(iters, BATCH))
            });
            s.rt.block_on(s.storage.shutdown());
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = fanout, many_keys
}
criterion_main!(benches);
