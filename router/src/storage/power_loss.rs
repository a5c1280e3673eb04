//! Power loss, simulated: random workloads on a [`SimDisk`], cut at random
//! moments, recovered, and checked against what was acknowledged.
//!
//! Each seed picks a workload (pipelined appends with plugin key/value
//! writes and message ids, queue floors, consumer offsets, plugin records,
//! truncation, retention, checkpoints, a small or a large journal), runs part of it,
//! and takes the disk image a power cut would leave at that instant
//! ([`SimDisk::crash`]: unsynced writes dropped, kept or torn by sector).
//! The storage reopened on that image must start (a torn tail is never an
//! error) and hold every acknowledged operation, byte for byte; new appends
//! continue after everything acknowledged (no offset is handed out twice).
//!
//! `cargo test -p switchyard --lib power_loss` runs seeds for about 30 s;
//! `SWITCHYARD_POWER_LOSS_SEEDS=N` runs N seeds with no time bound, and
//! `SWITCHYARD_POWER_LOSS_FIRST=S` starts at seed S (to replay a failure).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::disk::SimDisk;
use super::{AppendRecord, AppendTicket, KvWrite, QueueWrite, Storage, StorageConfig};
use crate::protocol::Record;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64: any seed, including 0, gives a good stream.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `(offset, payload)` of up to `max` records of one partition from
/// `from` (`None` for a record that does not decode).
fn payloads(
    storage: &Storage,
    topic_id: u32,
    partition: u32,
    from: u64,
    max: usize,
) -> Result<Vec<(u64, Option<bytes::Bytes>)>, super::StorageError> {
    let mut out = Vec::new();
    let limit = super::ReadLimit {
        max_records: max,
        max_bytes: usize::MAX,
    };
    storage.scan(topic_id, partition, from, limit, |o, _, r| {
        let rec = crate::protocol::RawRecord::new(bytes::Bytes::copy_from_slice(r));
        out.push((o, rec.ok().map(|r| r.payload())));
    })?;
    Ok(out)
}

/// What the workload was told was stored, and what it tried.
#[derive(Default)]
struct Acked {
    /// `(partition, offset)` -> payload.
    records: HashMap<(u32, u64), Vec<u8>>,
    /// Every payload ever sent, acknowledged or not.
    attempted: std::collections::HashSet<Vec<u8>>,
    /// Plugin kv: key -> (last acknowledged sequence, highest attempted).
    kv: HashMap<String, (Option<u64>, u64)>,
    /// Queue floor per partition: (acknowledged, highest attempted).
    floors: HashMap<u32, (u64, u64)>,
    /// Consumer offsets per partition: (acknowledged, highest attempted).
    offsets: HashMap<u32, (u64, u64)>,
    /// Plugin record: (acknowledged, highest attempted) revision.
    plugin: (Option<u64>, u64),
    /// Highest truncation point attempted per partition.
    truncated: HashMap<u32, u64>,
    /// Message id -> acknowledged position.
    ids: HashMap<String, (u32, u64)>,
}

impl Acked {
    /// One past the highest acknowledged offset of partition `p`.
    fn end(&self, p: u32) -> u64 {
        self.records
            .keys()
            .filter(|k| k.0 == p)
            .map(|k| k.1 + 1)
            .max()
            .unwrap_or(0)
    }
}

const PARTS: u32 = 3;

fn payload(seq: u64, i: usize) -> Vec<u8> {
    let mut p = format!("s{seq}-{i}-").into_bytes();
    p.resize(
        40 + (seq as usize * 37 + i * 11) % 700,
        b'a' + (seq % 26) as u8,
    );
    p
}

/// Appends in flight, with what each record carried.
type InFlight = Vec<(AppendTicket, Vec<(Vec<u8>, Option<String>)>)>;

async fn settle(pending: &mut InFlight, acked: &mut Acked, kvs: &mut Vec<(String, u64)>) {
    for (ticket, sent) in pending.drain(..) {
        if let Ok(Ok(positions)) = ticket.await {
            for ((p, o), (payload, id)) in positions.into_iter().zip(sent) {
                let dup = p & super::DUPLICATE_BIT != 0;
                let p = p & !super::DUPLICATE_BIT;
                if !dup {
                    acked.records.insert((p, o), payload);
                }
                if let Some(id) = id {
                    acked.ids.entry(id).or_insert((p, o));
                }
            }
        }
    }
    for (k, seq) in kvs.drain(..) {
        let e = acked.kv.entry(k).or_default();
        e.0 = Some(e.0.map_or(seq, |s| s.max(seq)));
    }
}

/// Runs one seed; returns a description of what went wrong, if anything.
fn run_seed(seed: u64) -> Result<(), String> {
    let rt = runtime();
    let mut rng = Rng(seed);
    let disk = SimDisk::new();
    let path = Path::new("/sim/switchyard.redb");
    let config = StorageConfig {
        journal_bytes: if rng.below(2) == 0 { 24 << 10 } else { 1 << 20 },
        checkpoint: Duration::from_millis(if rng.below(2) == 0 { 5 } else { 3_600_000 }),
        ..StorageConfig::default()
    };
    let ops = 5 + rng.below(40);
    let crash_after = rng.below(ops + 1);
    // Some topics keep only their last ~64 KiB per partition: retention
    // may then remove acknowledged records (and only those below the
    // recovered start may be missing).
    let retention_bytes = if rng.below(3) == 0 { 64 << 10 } else { 0 };
    let mut acked = Acked::default();
    let image = rt.block_on(async {
        let storage = Storage::open_on(disk.clone(), path, config.clone())
            .map_err(|e| format!("first open: {e}"))?;
        let topic = storage
            .create_topic("t", PARTS, 0, retention_bytes)
            .await
            .map_err(|e| e.to_string())?;
        let policy = super::TopicPolicy {
            dedup_window_ms: 3_600_000,
            ..Default::default()
        };
        storage
            .set_policy("t", policy)
            .await
            .map_err(|e| e.to_string())?;
        let id = topic.meta.id;
        let mut pending = Vec::new();
        let mut kvs = Vec::new();
        for seq in 0..ops {
            if seq == crash_after {
                break;
            }
            match rng.below(10) {
                0..=4 => {
                    let big = rng.below(8) == 0;
                    let n = 1 + rng.below(if big { 400 } else { 6 }) as usize;
                    let mut recs = Vec::new();
                    let mut sent = Vec::new();
                    for i in 0..n {
                        let p = payload(seq, i);
                        // Some records carry a message id, some reuse one.
                        let mid = match rng.below(6) {
                            0 => Some(format!("id-{seq}-{i}")),
                            1 if !acked.ids.is_empty() => {
                                let k = rng.below(acked.ids.len() as u64) as usize;
                                acked.ids.keys().nth(k).cloned()
                            }
                            _ => None,
                        };
                        let mut r = Record::new(p.clone());
                        if let Some(m) = &mid {
                            r = r.with_message_id(m.clone());
                        }
                        let raw = r.to_raw();
                        let dedup = mid.as_ref().map(|_| {
                            crate::protocol::headers::Policy::parse_stored(raw.as_bytes())
                                .message_id
                                .map(|m| raw.as_bytes().slice_ref(m))
                                .expect("message id")
                        });
                        acked.attempted.insert(p.clone());
                        recs.push(AppendRecord {
                            topic_id: id,
                            partition: rng.below(PARTS as u64) as u32,
                            record: raw,
                            dedup,
                            fanout: None,
                        });
                        sent.push((p, mid));
                    }
                    let mut kv = Vec::new();
                    if rng.below(2) == 0 {
                        let key = format!("k{}", rng.below(4));
                        acked.kv.entry(key.clone()).or_default().1 = seq;
                        kv.push(KvWrite {
                            plugin: "p".into(),
                            key: key.clone(),
                            value: seq.to_be_bytes().to_vec(),
                        });
                        kvs.push((key, seq));
                    }
                    let ticket = storage
                        .append_many(recs, kv)
                        .await
                        .map_err(|e| e.to_string())?;
                    pending.push((ticket, sent));
                    if pending.len() > rng.below(8) as usize {
                        settle(&mut pending, &mut acked, &mut kvs).await;
                    }
                }
                5 => {
                    settle(&mut pending, &mut acked, &mut kvs).await;
                    let p = rng.below(PARTS as u64) as u32;
                    let top = acked.end(p);
                    let floor = rng.below(top + 1);
                    let e = acked.floors.entry(p).or_default();
                    if floor <= e.1 {
                        continue;
                    }
                    e.1 = floor;
                    storage
                        .queue_write(QueueWrite {
                            topic_id: id,
                            group: "q".into(),
                            entries: vec![],
                            floors: vec![(p, floor)],
                            marks: vec![(p, floor)],
                            done: vec![],
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                    if storage.flush().await.is_ok() {
                        acked.floors.get_mut(&p).unwrap().0 = floor;
                    }
                }
                6 => {
                    let p = rng.below(PARTS as u64) as u32;
                    let e = acked.offsets.entry(p).or_default();
                    let o = e.1 + 1 + rng.below(5);
                    e.1 = o;
                    storage
                        .commit_offset("g".into(), id, p, o)
                        .await
                        .map_err(|e| e.to_string())?;
                    if rng.below(2) == 0 && storage.flush().await.is_ok() {
                        acked.offsets.get_mut(&p).unwrap().0 = o;
                    }
                }
                7 => {
                    acked.plugin.1 = seq;
                    let rec = format!("{{\"rev\":{seq}}}").into_bytes();
                    let wasm = Some((seq as u32, vec![seq as u8; 3000], None));
                    if storage.put_plugin("plug", rec, wasm, vec![]).await.is_ok() {
                        acked.plugin.0 = Some(seq);
                    }
                }
                8 => {
                    settle(&mut pending, &mut acked, &mut kvs).await;
                    let p = rng.below(PARTS as u64) as u32;
                    let end = topic.partitions()[p as usize].end;
                    let before = rng.below(end + 1);
                    let t = acked.truncated.entry(p).or_default();
                    *t = (*t).max(before);
                    let _ = storage.truncate(&topic, p, before).await;
                }
                _ if rng.below(2) == 0 => {
                    settle(&mut pending, &mut acked, &mut kvs).await;
                    let _ = storage.enforce_retention().await;
                }
                _ => {
                    let _ = storage.checkpoint().await;
                }
            }
        }
        // Let the acks already on their way arrive, then cut the power
        // with whatever is still in flight.
        if rng.below(2) == 0 {
            settle(&mut pending, &mut acked, &mut kvs).await;
        } else {
            tokio::task::yield_now().await;
        }
        let image = disk.crash(rng.next());
        drop(pending);
        storage.shutdown().await;
        Ok::<_, String>(image)
    })?;

    rt.block_on(async {
        let storage =
            Storage::open_on(image, path, config).map_err(|e| format!("recovery failed: {e}"))?;
        let topic = storage.topic("t").ok_or("topic lost")?;
        let id = topic.meta.id;
        let parts = topic.partitions();
        for (&(p, o), want) in &acked.records {
            let info = parts[p as usize];
            if info.end <= o {
                return Err(format!(
                    "acked offset {p}/{o} is past the recovered end {}",
                    info.end
                ));
            }
            let cut = if retention_bytes > 0 {
                u64::MAX
            } else {
                acked.truncated.get(&p).copied().unwrap_or(0)
            };
            if info.start > cut {
                return Err(format!(
                    "partition {p} starts at {} but was truncated to {cut} at most",
                    info.start
                ));
            }
            if o < info.start {
                continue;
            }
            let got =
                payloads(&storage, id, p, o, 1).map_err(|e| format!("reading {p}/{o}: {e}"))?;
            match got.first() {
                Some((off, Some(bytes))) if *off == o && bytes[..] == want[..] => {}
                other => return Err(format!("acked record {p}/{o} lost or changed: {other:?}")),
            }
        }
        // Every stored record was sent by the workload (nothing invented).
        for (p, info) in parts.iter().enumerate() {
            let bad = payloads(&storage, id, p as u32, info.start, usize::MAX)
                .map_err(|e| format!("reading partition {p}: {e}"))?
                .into_iter()
                .find(|(_, b)| !b.as_ref().is_some_and(|b| acked.attempted.contains(&b[..])))
                .map(|(off, _)| off);
            if let Some(off) = bad {
                return Err(format!(
                    "partition {p} offset {off} holds a record nobody sent"
                ));
            }
        }
        for (key, (ok, top)) in &acked.kv {
            let v = storage.plugin_kv_get("p", key).map_err(|e| e.to_string())?;
            let v = v.map(|v| u64::from_be_bytes(v.try_into().unwrap_or_default()));
            if let Some(ok) = ok
                && !v.is_some_and(|v| v >= *ok && v <= *top)
            {
                return Err(format!("kv {key}: acked {ok}, found {v:?}"));
            }
        }
        let snap = storage.queue_snapshot(id, "q").map_err(|e| e.to_string())?;
        for (p, (ok, top)) in &acked.floors {
            let f = snap.floors.get(p).copied().unwrap_or(0);
            if f < *ok || f > *top {
                return Err(format!(
                    "queue floor {p}: acked {ok}, attempted {top}, found {f}"
                ));
            }
        }
        for (p, (ok, top)) in &acked.offsets {
            let o = storage
                .committed_offset("g", id, *p)
                .map_err(|e| e.to_string())?
                .unwrap_or(0);
            if o < *ok || o > *top {
                return Err(format!(
                    "offset {p}: acked {ok}, attempted {top}, found {o}"
                ));
            }
        }
        if let Some(ok) = acked.plugin.0 {
            let recs = storage.plugin_records().map_err(|e| e.to_string())?;
            let rev = recs.iter().find(|(n, _)| n == "plug").and_then(|(_, r)| {
                serde_json::from_slice::<serde_json::Value>(r).ok()?["rev"].as_u64()
            });
            if !rev.is_some_and(|r| r >= ok && r <= acked.plugin.1) {
                return Err(format!("plugin record: acked rev {ok}, found {rev:?}"));
            }
            let wasm = storage
                .plugin_wasm("plug", ok as u32)
                .map_err(|e| e.to_string())?;
            if wasm.as_deref() != Some(&vec![ok as u8; 3000][..]) {
                return Err(format!("plugin component of rev {ok} lost or changed"));
            }
        }
        // A retried id returns its original position.
        for (mid, &(p, o)) in acked.ids.iter().take(5) {
            let raw = Record::new("again").with_message_id(mid.clone()).to_raw();
            let dedup = crate::protocol::headers::Policy::parse_stored(raw.as_bytes())
                .message_id
                .map(|m| raw.as_bytes().slice_ref(m));
            let t = storage
                .append_many(
                    vec![AppendRecord {
                        topic_id: id,
                        partition: p,
                        record: raw,
                        dedup,
                        fanout: None,
                    }],
                    vec![],
                )
                .await
                .map_err(|e| e.to_string())?;
            let got = t
                .await
                .map_err(|_| "no reply")?
                .map_err(|e| e.to_string())?;
            if o >= parts[p as usize].start && got != [(p | super::DUPLICATE_BIT, o)] {
                return Err(format!("retried id {mid} at {p}/{o} got {got:?}"));
            }
        }
        // New appends continue after everything acknowledged.
        for p in 0..PARTS {
            let top = acked.end(p);
            let t = storage
                .append(&topic, vec![(p, Record::new("after").to_raw())])
                .await
                .map_err(|e| e.to_string())?;
            let got = t
                .await
                .map_err(|_| "no reply")?
                .map_err(|e| e.to_string())?;
            if got[0].1 < top {
                return Err(format!(
                    "partition {p}: new append got offset {} though {} were acked",
                    got[0].1, top
                ));
            }
        }
        storage.shutdown().await;
        Ok(())
    })
}

#[test]
fn acknowledged_operations_survive_a_power_cut_at_any_moment() {
    let seeds: Option<u64> = std::env::var("SWITCHYARD_POWER_LOSS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let first: u64 = std::env::var("SWITCHYARD_POWER_LOSS_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let budget = if seeds.is_some() {
        Duration::MAX
    } else {
        Duration::from_secs(30)
    };
    let started = Instant::now();
    let mut run = 0u64;
    let mut failures = Vec::new();
    for seed in first..first + seeds.unwrap_or(u64::MAX) {
        if started.elapsed() > budget {
            break;
        }
        run += 1;
        if let Err(e) = run_seed(seed) {
            failures.push(format!("seed {seed}: {e}"));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    println!(
        "power-loss seeds run: {run} (from {first}), failures: {}",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(run >= 20, "only {run} seeds ran");
}

#[test]
fn a_failed_sync_acknowledges_nothing_that_depended_on_it() {
    let rt = runtime();
    let disk = SimDisk::new();
    let path = Path::new("/sim/switchyard.redb");
    let config = StorageConfig::default();
    rt.block_on(async {
        let storage = Storage::open_on(disk.clone(), path, config.clone()).unwrap();
        let topic = storage.create_topic("t", 1, 0, 0).await.unwrap();
        let rec = |s: &str| vec![(0, Record::new(s.to_string()).to_raw())];
        let t = storage.append(&topic, rec("before")).await.unwrap();
        assert_eq!(t.await.unwrap().unwrap(), [(0, 0)]);
        disk.faults
            .fail_syncs
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let t = storage.append(&topic, rec("lost")).await.unwrap();
        let e = t.await.unwrap().unwrap_err();
        assert!(
            e.to_string().contains("Input/output error") || e.to_string().contains("sync"),
            "{e}"
        );
        // The disk recovers; a retried sync would now succeed but would
        // not cover the write the failed one lost. Nothing more is
        // acknowledged by this storage: it refuses until reopened.
        disk.faults
            .fail_syncs
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let t = storage.append(&topic, rec("after")).await.unwrap();
        let r = t.await.unwrap();
        assert!(r.is_err(), "acknowledged after a failed sync: {r:?}");
        assert!(storage.failed().is_some(), "the storage reports it failed");
        let image = disk.crash(7);
        storage.shutdown().await;
        // Reopened: the acknowledged record is there, the refused ones are
        // not, and writes work again.
        let storage = Storage::open_on(image, path, config).unwrap();
        let topic = storage.topic("t").unwrap();
        let got = payloads(&storage, topic.meta.id, 0, 0, 10).unwrap();
        assert_eq!(got, [(0, Some(bytes::Bytes::from("before")))]);
        let t = storage.append(&topic, rec("again")).await.unwrap();
        assert_eq!(t.await.unwrap().unwrap(), [(0, 1)]);
        storage.shutdown().await;
    });
}

/// Appends 64 KiB batches until one is refused; returns the acked
/// `(offset, byte)` pairs and the error.
async fn fill(
    storage: &Storage,
    topic: &Arc<super::TopicHandle>,
    from: u64,
) -> (Vec<(u64, u8)>, super::StorageError) {
    let mut acked = Vec::new();
    for i in from..from + 10_000 {
        let rec = Record::new(vec![i as u8; 64 << 10]).to_raw();
        let t = storage.append(topic, vec![(0, rec)]).await.unwrap();
        match t.await.unwrap() {
            Ok(p) => acked.push((p[0].1, i as u8)),
            Err(e) => return (acked, e),
        }
    }
    panic!("the disk never filled");
}

/// Every acked record is readable with its bytes.
fn check(storage: &Storage, topic: &super::TopicHandle, acked: &[(u64, u8)]) {
    let got: Vec<(u64, u8, bool)> = payloads(storage, topic.meta.id, 0, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(o, p)| {
            let p = p.expect("decodes");
            (o, p[0], p.iter().all(|b| *b == p[0]))
        })
        .collect();
    for (i, &(o, b)) in acked.iter().enumerate() {
        assert_eq!(got.get(i), Some(&(o, b, true)), "acked record {o}");
    }
}

#[test]
fn a_full_disk_is_storage_full_and_the_reserve_recovers_by_itself() {
    let rt = runtime();
    let path = Path::new("/sim/switchyard.redb");
    rt.block_on(async {
        // No reserve: the database meets ENOSPC. Refused as storage_full,
        // nothing acknowledged that was not stored, reads keep working,
        // and after a restart everything acknowledged is there.
        let disk = SimDisk::new();
        let config = StorageConfig {
            reserve_bytes: 0,
            ..StorageConfig::default()
        };
        let storage = Storage::open_on(disk.clone(), path, config.clone()).unwrap();
        let topic = storage.create_topic("t", 1, 0, 0).await.unwrap();
        disk.faults.space.store(
            disk.used() + (4 << 20),
            std::sync::atomic::Ordering::Relaxed,
        );
        let (acked, e) = fill(&storage, &topic, 0).await;
        assert!(matches!(e, super::StorageError::StorageFull(_)), "{e}");
        assert_eq!(e.to_wire().code, crate::protocol::ErrorCode::StorageFull);
        assert!(!acked.is_empty());
        check(&storage, &topic, &acked);
        assert!(storage.failed().is_none(), "a full disk is not a failure");
        let image = disk.crash(3);
        storage.shutdown().await;
        let storage = Storage::open_on(image, path, config).unwrap();
        let topic = storage.topic("t").unwrap();
        check(&storage, &topic, &acked);
        storage.shutdown().await;

        // With a reserve, appends are refused before the disk is full, and
        // resume by themselves once there is room: no restart.
        let disk = SimDisk::new();
        let config = StorageConfig {
            reserve_bytes: 2 << 20,
            ..StorageConfig::default()
        };
        let storage = Storage::open_on(disk.clone(), path, config.clone()).unwrap();
        let topic = storage.create_topic("t", 1, 0, 0).await.unwrap();
        let space = disk.used() + (6 << 20);
        disk.faults
            .space
            .store(space, std::sync::atomic::Ordering::Relaxed);
        let (mut acked, e) = fill(&storage, &topic, 0).await;
        assert!(
            matches!(&e, super::StorageError::StorageFull(m) if m.contains("reserve")),
            "{e}"
        );
        check(&storage, &topic, &acked);
        disk.faults
            .space
            .store(space + (64 << 20), std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(super::writer::FREE_CHECK_EVERY * 2).await;
        let (more, e) = fill(&storage, &topic, acked.len() as u64).await;
        assert!(more.len() > acked.len(), "writes resumed: {e}");
        acked.extend(more);
        check(&storage, &topic, &acked);
        storage.shutdown().await;
    });
}

/// A page of the log zeroed under a running storage: whatever redb makes
/// of it (a panic inside a read, an error, a missing range), a read returns
/// an error that says where and what to do, and the storage keeps serving
/// the records it can read.
#[test]
fn a_damaged_page_under_a_running_storage_is_an_error_not_a_panic() {
    let rt = runtime();
    let disk = SimDisk::new();
    let path = Path::new("/sim/switchyard.redb");
    let config = StorageConfig {
        cache_bytes: 0,
        ..StorageConfig::default()
    };
    rt.block_on(async {
        let storage = Storage::open_on(disk.clone(), path, config).unwrap();
        let topic = storage.create_topic("t", 1, 0, 0).await.unwrap();
        for chunk in 0..20u64 {
            let recs = (0..1000)
                .map(|i| {
                    (
                        0,
                        Record::new(format!("rec-{:06}-{}", chunk * 1000 + i, "x".repeat(60)))
                            .to_raw(),
                    )
                })
                .collect();
            storage
                .append(&topic, recs)
                .await
                .unwrap()
                .await
                .unwrap()
                .unwrap();
        }
        storage.checkpoint().await.unwrap();
        let at = disk.find(path, b"rec-012345-").expect("stored in the file");
        disk.zero(path, at / 4096 * 4096, 4096);
        let limit = super::ReadLimit {
            max_records: usize::MAX,
            max_bytes: usize::MAX,
        };
        let mut read = 0u64;
        let mut from = 0;
        let err = loop {
            match storage.scan(topic.meta.id, 0, from, limit, |_, _, _| read += 1) {
                Ok(next) if next == from => panic!("a read stopped at {from} with no error"),
                Ok(next) if next >= 20_000 => panic!("all records read past a zeroed page"),
                Ok(next) => from = next,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, super::StorageError::Damaged(_)), "{err}");
        assert!(err.to_string().contains("switchyard check"), "{err}");
        // Reads of what is intact go on.
        let first = payloads(&storage, topic.meta.id, 0, 0, 10).unwrap().len();
        assert_eq!(first, 10);
        storage.shutdown().await;
    });
}
