//! `switchyard bench`: a load generator in the spirit of `nats bench` and
//! RabbitMQ PerfTest. Producers publish pipelined batches (at full speed or
//! at a fixed rate), consumers subscribe; it reports throughput and
//! publish->ack and publish->deliver latency percentiles.
//!
//! At a fixed rate each message has an intended send time on a fixed
//! schedule, and latency is measured from that time, not from when the
//! producer got around to sending it: a stall shows up in the percentiles
//! instead of hiding in a slower send rate (no coordinated omission).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;

use super::ConnectArgs;
use crate::client::{QueueOptions, SubscribeOptions};
use crate::protocol::{ErrorCode, Record, StartPosition};

#[derive(Debug, clap::Args)]
pub(super) struct BenchArgs {
    /// Topic to use (created if missing).
    #[arg(default_value = "bench")]
    topic: String,
    /// Producer connections.
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Consumer connections; each reads every message (fan-out), or shares
    /// with the others in `--group`.
    #[arg(long, default_value_t = 0)]
    consumers: usize,
    /// Consumers join this group and split the partitions.
    #[arg(long)]
    group: Option<String>,
    /// Consumers form a queue group (named by --group, default
    /// `bench-queue`) and ack every message, in batches.
    #[arg(long)]
    queue: bool,
    /// Publish everything first, then start the consumers and measure how
    /// fast they drain it.
    #[arg(long)]
    preload: bool,
    /// Messages a consumer may hold ahead (queue: unacknowledged).
    #[arg(long, default_value_t = 8192)]
    prefetch: u32,
    /// Payload size in bytes (at least 8: the send time travels in it).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Distinct keys (0: keyless).
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Partitions when creating the topic.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Messages to publish in total (ignored with --duration).
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Publish for this long instead, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Total messages per second across producers (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Messages per publish batch.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Batches in flight per producer.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Also hold this many subscriptions open that never read (memory and
    /// fairness under many idle subscribers).
    #[arg(long, default_value_t = 0)]
    idle_subscriptions: usize,
    /// Deploy this component as the topic's route plugin first.
    #[arg(long)]
    plugin: Option<std::path::PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: ConnectArgs,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

struct Shared {
    started: Instant,
    published: AtomicU64,
    delivered: AtomicU64,
    last_delivery_ns: AtomicU64,
    done_publishing: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }
}

pub(super) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.size >= 8, "--size must be at least 8 bytes");
    anyhow::ensure!(args.producers > 0, "--producers must be at least 1");
    let admin = args.conn.connect().await?;
    match admin.create_topic(&args.topic, args.partitions).await {
        Ok(_) => {}
        Err(e) if e.code() == Some(ErrorCode::TopicExists) => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(file) = &args.plugin {
        let wasm = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        admin
            .deploy_plugin(
                wasm,
                json!({ "name": format!("bench-{}", args.topic), "hook": "route", "topic": args.topic }),
            )
            .await?;
    }

    let mut idle_clients = Vec::new();
    let shared = Arc::new(Shared {
        started: Instant::now(),
        published: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        done_publishing: AtomicBool::new(false),
    });

    // Idle subscriptions: 200 per connection, below the router's stream limit.
    let mut idle = Vec::new();
    for chunk in 0..args.idle_subscriptions.div_ceil(200) {
        let client = Arc::new(args.conn.connect().await?);
        let n = (args.idle_subscriptions - chunk * 200).min(200);
        for _ in 0..n {
            let opts = SubscribeOptions::new(&args.topic)
                .start(StartPosition::Latest)
                .prefetch(1);
            idle.push(client.subscribe(opts).await?);
        }
        idle_clients.push(client);
    }

    // Consumers first, from the end of the log, so they see only this run
    // (with --preload, after publishing, from this run's first record).
    let total = if args.duration.is_some() {
        u64::MAX
    } else {
        args.count
    };
    let run_wall_ms = crate::storage::now_ms();
    let mut consumers = Vec::new();
    if !args.preload {
        consumers = spawn_consumers(&args, &shared, total, StartPosition::Latest).await?;
    }

    let progress = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        let pb = match args.duration {
            Some(d) => indicatif::ProgressBar::new(d.as_secs().max(1)),
            None => indicatif::ProgressBar::new(args.count),
        };
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {msg}")
                .expect("valid template"),
        );
        pb
    };

    // Rates count from here: connections and subscriptions are set up.
    let run_start_ns = shared.now_ns();
    let per_producer = total / args.producers as u64;
    let rate_each = args.rate as f64 / args.producers as f64;
    let deadline = args.duration.map(|d| Instant::now() + d);
    let mut producers = Vec::new();
    for i in 0..args.producers {
        let client = Arc::new(args.conn.connect().await?);
        let shared = shared.clone();
        let (topic, size, keys, batch, in_flight) = (
            args.topic.clone(),
            args.size,
            args.keys,
            args.batch.clamp(1, 4096),
            args.in_flight.max(1),
        );
        let count = if i == 0 {
            per_producer + total % args.producers as u64
        } else {
            per_producer
        };
        producers.push(tokio::spawn(async move {
            // Each batch's ack is awaited in its own task, so its latency is
            // taken when it arrives, not when the producer gets to it.
            let lat = Arc::new(std::sync::Mutex::new(hist()));
            let window = Arc::new(tokio::sync::Semaphore::new(in_flight));
            let mut acks = tokio::task::JoinSet::new();
            let mut sent = 0u64;
            let mut seq = i as u64;
            // Open loop: a pacing thread emits each batch's intended send
            // time. OS sleeps are precise to tens of microseconds, where
            // tokio's timer rounds up to the next millisecond and would add
            // its own delay to every measured latency. The thread also
            // records how late it woke (the generator's own share of every
            // latency), reported as `send lag`.
            let mut pacer = None;
            let mut ticks = (rate_each > 0.0).then(|| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
                let interval_ns = 1e9 * batch as f64 / rate_each;
                let shared = shared.clone();
                let batches = count.div_ceil(batch as u64);
                pacer = Some(std::thread::spawn(move || {
                    let mut late = hist();
                    precise_sleeps();
                    let t0 = shared.now_ns();
                    for k in 0..batches {
                        let at = t0 + (k as f64 * interval_ns) as u64;
                        let now = shared.now_ns();
                        if at > now {
                            std::thread::sleep(Duration::from_nanos(at - now));
                        }
                        let _ = late.record(shared.now_ns().saturating_sub(at).max(1));
                        if tx.send(at).is_err() {
                            break;
                        }
                    }
                    late
                }));
                rx
            });
            while sent < count && deadline.is_none_or(|d| Instant::now() < d) {
                let n = (batch as u64).min(count - sent) as usize;
                let permit = window.clone().acquire_owned().await.expect("never closed");
                let intended = match ticks.as_mut() {
                    Some(rx) => match rx.recv().await {
                        Some(at) => at,
                        None => break,
                    },
                    None => shared.now_ns(),
                };
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    let mut p = BytesMut::with_capacity(size);
                    p.put_u64(intended);
                    p.resize(size, b'x');
                    let mut r = Record::new(p.freeze());
                    if keys > 0 {
                        r.key = Some(Bytes::from((seq % keys).to_string()));
                    }
                    seq += 1;
                    records.push(r);
                }
                let ack = client.queue_batch(&topic, records).await?;
                sent += n as u64;
                let (lat, shared) = (lat.clone(), shared.clone());
                acks.spawn(async move {
                    let r = ack.await;
                    let took = shared.now_ns().saturating_sub(intended).max(1);
                    let _ = lat.lock().expect("hist lock").record_n(took, n as u64);
                    shared.published.fetch_add(n as u64, Ordering::Relaxed);
                    drop(permit);
                    r.map(|_| ())
                });
                while let Some(r) = acks.try_join_next() {
                    r.expect("ack task")?;
                }
            }
            while let Some(r) = acks.join_next().await {
                r.expect("ack task")?;
            }
            client.close().await;
            let lat = lat.lock().expect("hist lock").clone();
            // The pacer stops at its next tick once `ticks` is gone.
            drop(ticks);
            let lag = match pacer {
                Some(t) => tokio::task::spawn_blocking(move || t.join())
                    .await
                    .expect("join pacer")
                    .expect("pacer thread"),
                None => hist(),
            };
            Ok::<_, crate::client::ClientError>((lat, lag))
        }));
    }

    let ticker = {
        let shared = shared.clone();
        let pb = progress.clone();
        let by_time = args.duration.is_some();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let p = shared.published.load(Ordering::Relaxed);
                let d = shared.delivered.load(Ordering::Relaxed);
                let secs = shared.started.elapsed().as_secs_f64();
                if by_time {
                    pb.set_position(secs as u64);
                } else {
                    pb.set_position(p);
                }
                pb.set_message(format!(
                    "published {p} ({:.0}/s), delivered {d}",
                    p as f64 / secs.max(1e-9)
                ));
            }
        })
    };

    let mut pub_lat = hist();
    let mut send_lag = hist();
    for p in producers {
        let (lat, lag) = p.await??;
        pub_lat.add(lat).expect("same bounds");
        send_lag.add(lag).expect("same bounds");
    }
    let pub_secs = ((shared.now_ns() - run_start_ns) as f64 / 1e9).max(1e-9);
    shared.done_publishing.store(true, Ordering::Relaxed);
    let mut deliver_start_ns = run_start_ns;
    if args.preload {
        deliver_start_ns = shared.now_ns();
        let from = StartPosition::Timestamp(run_wall_ms);
        consumers = spawn_consumers(&args, &shared, total, from).await?;
    }
    let mut del_lat = hist();
    for c in consumers {
        del_lat.add(c.await?).expect("same bounds");
    }
    // Delivery rate up to the last delivery, not the idle wait after it.
    let all_secs = (shared
        .last_delivery_ns
        .load(Ordering::Relaxed)
        .saturating_sub(deliver_start_ns) as f64
        / 1e9)
        .max(1e-9);
    ticker.abort();
    progress.finish_and_clear();
    drop(idle);
    for c in idle_clients {
        c.close().await;
    }
    admin.close().await;

    let published = shared.published.load(Ordering::Relaxed);
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let pct = |h: &Histogram<u64>| {
        json!({
            "p50_us": h.value_at_quantile(0.5) as f64 / 1e3,
            "p90_us": h.value_at_quantile(0.9) as f64 / 1e3,
            "p99_us": h.value_at_quantile(0.99) as f64 / 1e3,
            "p999_us": h.value_at_quantile(0.999) as f64 / 1e3,
            "max_us": h.max() as f64 / 1e3,
        })
    };
    let untuned = super::tune::untuned();
    let report = json!({
        "topic": args.topic,
        "producers": args.producers,
        "consumers": args.consumers,
        "size": args.size,
        "rate": if args.rate == 0 { json!("max") } else { json!(args.rate) },
        "published": published,
        "publish_msgs_per_s": published as f64 / pub_secs,
        "publish_mb_per_s": (published * args.size as u64) as f64 / pub_secs / 1e6,
        "publish_to_ack": pct(&pub_lat),
        "send_lag": if args.rate > 0 { pct(&send_lag) } else { json!(null) },
        "delivered": delivered,
        "deliver_msgs_per_s": if args.consumers > 0 { json!(delivered as f64 / all_secs) } else { json!(null) },
        "deliver_mb_per_s": if args.consumers > 0 { json!((delivered * args.size as u64) as f64 / all_secs / 1e6) } else { json!(null) },
        "publish_to_deliver": if args.consumers > 0 { pct(&del_lat) } else { json!(null) },
        "mode": if args.queue { "queue" } else if args.group.is_some() { "group" } else { "fan-out" },
        "preload": args.preload,
        "durable": true,
        // Settings of this machine that slow thread wake-ups (`switchyard tune`).
        "host_untuned": untuned.iter().map(|s| json!({
            "path": s.path.display().to_string(),
            "current": s.current,
            "recommended": s.recommended,
        })).collect::<Vec<_>>(),
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "publish: {published} msgs in {pub_secs:.2} s = {:.0} msg/s, {:.1} MB/s ({} producers, {} B, durable)",
        report["publish_msgs_per_s"].as_f64().unwrap_or(0.0),
        report["publish_mb_per_s"].as_f64().unwrap_or(0.0),
        args.producers,
        args.size
    );
    let line = |name: &str, v: &serde_json::Value| {
        println!(
            "  {name:<18} p50 {:>8.1} µs  p90 {:>8.1} µs  p99 {:>8.1} µs  p99.9 {:>8.1} µs  max {:>8.1} µs",
            v["p50_us"].as_f64().unwrap_or(0.0),
            v["p90_us"].as_f64().unwrap_or(0.0),
            v["p99_us"].as_f64().unwrap_or(0.0),
            v["p999_us"].as_f64().unwrap_or(0.0),
            v["max_us"].as_f64().unwrap_or(0.0)
        )
    };
    if args.rate > 0 {
        line("send lag", &report["send_lag"]);
    }
    line("publish -> ack", &report["publish_to_ack"]);
    if args.consumers > 0 {
        println!(
            "deliver: {delivered} msgs = {:.0} msg/s, {:.1} MB/s ({} consumers, {}{})",
            report["deliver_msgs_per_s"].as_f64().unwrap_or(0.0),
            report["deliver_mb_per_s"].as_f64().unwrap_or(0.0),
            args.consumers,
            report["mode"].as_str().unwrap_or_default(),
            if args.queue {
                ", every message acked"
            } else {
                ""
            }
        );
        line("publish -> deliver", &report["publish_to_deliver"]);
    }
    if args.rate > 0 && !untuned.is_empty() {
        let what: Vec<String> = untuned
            .iter()
            .map(|s| format!("{} = {}", s.path.display(), s.current))
            .collect();
        eprintln!(
            "note: this machine is not tuned ({}); `switchyard tune` shows what to change",
            what.join(", ")
        );
    }
    Ok(())
}

type Consumer = tokio::task::JoinHandle<Histogram<u64>>;

/// Starts the consumers: fan-out (each reads everything), a group (they
/// split partitions) or a queue group (they compete, acking every message).
async fn spawn_consumers(
    args: &BenchArgs,
    shared: &Arc<Shared>,
    total: u64,
    start: StartPosition,
) -> anyhow::Result<Vec<Consumer>> {
    let mut consumers = Vec::new();
    // Fan-out: each consumer expects every message; groups: together.
    let grouped = args.group.is_some() || args.queue;
    for _ in 0..args.consumers {
        let client = args.conn.connect().await?;
        let shared = shared.clone();
        if args.queue {
            let group = args.group.clone().unwrap_or_else(|| "bench-queue".into());
            let opts = QueueOptions::new(&args.topic, group)
                .start(start)
                .prefetch(args.prefetch)
                .visibility(Duration::from_secs(300));
            let mut q = client.subscribe_queue(opts).await?;
            let ack_every = (args.prefetch / 4).clamp(1, 2048) as usize;
            consumers.push(tokio::spawn(async move {
                let mut lat = hist();
                let mut tags = Vec::with_capacity(ack_every);
                loop {
                    // Ack what has been processed whenever the buffer runs dry.
                    let m = match q.next().now_or_never() {
                        Some(m) => m,
                        None => {
                            if !tags.is_empty()
                                && q.ack_many(&std::mem::take(&mut tags)).await.is_err()
                            {
                                break;
                            }
                            match tokio::time::timeout(Duration::from_secs(2), q.next()).await {
                                Ok(m) => m,
                                Err(_) if shared.done_publishing.load(Ordering::Relaxed) => break,
                                Err(_) => continue,
                            }
                        }
                    };
                    let Some(Ok(m)) = m else { break };
                    let p = m.payload();
                    let sent = u64::from_be_bytes(p[..8].try_into().expect("8-byte stamp"));
                    let now = shared.now_ns();
                    let _ = lat.record(now.saturating_sub(sent).max(1));
                    tags.push(m.tag);
                    if tags.len() >= ack_every
                        && q.ack_many(&std::mem::take(&mut tags)).await.is_err()
                    {
                        break;
                    }
                    shared
                        .last_delivery_ns
                        .fetch_max(shared.now_ns(), Ordering::Relaxed);
                    let all = shared.delivered.fetch_add(1, Ordering::Relaxed) + 1;
                    if all >= total {
                        break;
                    }
                }
                if !tags.is_empty() {
                    let _ = q.ack_many(&tags).await;
                }
                q.close().await;
                client.close().await;
                lat
            }));
            continue;
        }
        let mut opts = SubscribeOptions::new(&args.topic)
            .start(start)
            .prefetch(args.prefetch);
        if let Some(g) = &args.group {
            opts = opts.group(g);
        }
        let mut sub = client.subscribe(opts).await?;
        consumers.push(tokio::spawn(async move {
            let mut lat = hist();
            let mut seen = 0u64;
            loop {
                let next = tokio::time::timeout(Duration::from_secs(2), sub.next()).await;
                let m = match next {
                    Ok(Some(Ok(m))) => m,
                    Ok(_) => break,
                    Err(_) if shared.done_publishing.load(Ordering::Relaxed) => break,
                    Err(_) => continue,
                };
                let p = m.payload();
                let sent = u64::from_be_bytes(p[..8].try_into().expect("8-byte stamp"));
                let now = shared.now_ns();
                let _ = lat.record(now.saturating_sub(sent).max(1));
                shared.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
                seen += 1;
                let all = shared.delivered.fetch_add(1, Ordering::Relaxed) + 1;
                if (!grouped && seen == total) || (grouped && all >= total) {
                    break;
                }
            }
            drop(sub);
            client.close().await;
            lat
        }));
    }
    Ok(consumers)
}

/// Asks the kernel to wake this thread on time: by default Linux may delay
/// a sleeping thread's timer by up to 50 µs to batch wake-ups, which an
/// open-loop generator would add to every latency it measures.
fn precise_sleeps() {
    #[cfg(target_os = "linux")]
    {
        let _ = nix::sys::prctl::set_timerslack(1);
    }
}
