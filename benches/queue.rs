//! A queue group's own cost, without the network: members take messages
//! (`QueueDeliver` frames written to an in-memory pipe), a reader decodes the
//! frames and acks every message back in batches of 256, and the group
//! writes its state through the real group commit (redb, fsync).
//! One or four members drain a preloaded backlog; throughput is in
//! acknowledged messages.

#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchyard::delivery::{QueueEvent, QueueGroup, QueueSubscription};
use switchyard::plugins::PluginRegistry;
use switchyard::protocol::{DeliveryTag, Frame, Record, StartPosition};
use switchyard::storage::{Storage, TopicHandle};
use switchyard::transport::FrameReader;
use tokio::sync::mpsc;

/// Messages drained per measured iteration.
const PER_ITER: u64 = 4096;
const PREFETCH: u32 = 8192;

struct Setup {
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    storage: Storage,
    topic: Arc<TopicHandle>,
    plugins: Arc<PluginRegistry>,
    groups: u32,
}

impl Setup {
    fn new() -> Setup {
        let (rt, dir, storage) = switchyard_benches::temp_store(2);
        let topic = rt.block_on(storage.create_topic("q", 4, 0, 0)).unwrap();
        let plugins = Arc::new(PluginRegistry::open(storage.clone()).unwrap());
        Setup {
            rt,
            _dir: dir,
            storage,
            topic,
            plugins,
            groups: 0,
        }
    }

    /// Appends `n` 100-byte records over the four partitions.
    fn preload(&self, n: u64) {
        self.rt.block_on(async {
            let mut left = n;
            while left > 0 {
                let k = left.min(4096);
                let records = (0..k)
                    .map(|i| ((i % 4) as u32, Record::new(vec![b'x'; 100]).to_raw()))
                    .collect();
                let t = self.storage.append(&self.topic, records).await.unwrap();
                t.await.unwrap().unwrap();
                left -= k;
            }
        });
    }

    /// A new group positioned at the end of the log, so it drains exactly
    /// what is appended after it opens.
    fn group(&mut self) -> Arc<QueueGroup> {
        self.groups += 1;
        let _guard = self.rt.enter();
        QueueGroup::open(
            format!("g{}", self.groups).into(),
            self.topic.clone(),
            self.storage.clone(),
            self.plugins.clone(),
            StartPosition::Latest,
            None,
        )
        .unwrap()
    }
}

/// What the members of one run share: messages not yet acked, and when the
/// last ack was sent.
struct Run {
    left: AtomicI64,
    started: Instant,
    done_ns: AtomicU64,
}

/// One member: runs its subscription into a pipe and acks everything it
/// decodes from the other end; returns once every message is acked.
async fn member(group: Arc<QueueGroup>, run_state: Arc<Run>) {
    let left = &run_state.left;
    let (mut ours, theirs) = tokio::io::duplex(1 << 20);
    let (tx, rx) = mpsc::channel(64);
    let sub = QueueSubscription::join(group, PREFETCH, 60_000, false);
    let run = tokio::spawn(async move { sub.run(&mut ours, rx).await });
    let mut reader = FrameReader::new(theirs, 16 << 20);
    let mut pending: Vec<DeliveryTag> = Vec::new();
    let mut id = 0;
    while left.load(Ordering::Relaxed) > 0 {
        let frame = match tokio::time::timeout(Duration::from_millis(2), reader.next()).await {
            Ok(Ok(Some(f))) => Some(f),
            Ok(_) => break,
            Err(_) => None, // nothing more for this member right now
        };
        if let Some(Frame::QueueDeliver { records }) = &frame {
            pending.extend(records.iter().map(|r| r.tag));
        }
        while pending.len() >= 256 || (frame.is_none() && !pending.is_empty()) {
            let n = pending.len().min(256);
            let items: Vec<DeliveryTag> = pending.drain(..n).collect();
            let n = items.len() as i64;
            id += 1;
            if tx.send(QueueEvent::Ack { id, items }).await.is_err() {
                return;
            }
            if left.fetch_sub(n, Ordering::Relaxed) <= n {
                let ns = run_state.started.elapsed().as_nanos() as u64;
                run_state.done_ns.store(ns, Ordering::Relaxed);
            }
        }
    }
    drop(tx);
    let _ = run.await;
}

fn drain(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue_drain_acked");
    g.throughput(Throughput::Elements(PER_ITER));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    for members in [1usize, 4] {
        let mut s = Setup::new();
        g.bench_with_input(
            BenchmarkId::from_parameter(members),
            &members,
            |b, &members| {
                b.iter_custom(|iters| {
                    let group = s.group();
                    let n = iters * PER_ITER;
                    s.preload(n);
                    let run = Arc::new(Run {
                        left: AtomicI64::new(n as i64),
                        started: Instant::now(),
                        done_ns: AtomicU64::new(0),
                    });
                    s.rt.block_on(async {
                        let tasks: Vec<_> = (0..members)
                            .map(|_| tokio::spawn(member(group.clone(), run.clone())))
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                    });
                    // Up to the last ack, not the members' idle wait after it.
                    Duration::from_nanos(run.done_ns.load(Ordering::Relaxed))
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, drain);
criterion_main!(benches);
