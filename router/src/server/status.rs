//! The `status` admin operation: one JSON snapshot of what an operator
//! looks at first (topics, consumer lag, queue depth, dead letters, plugin
//! health, the storage). `switchyard status` prints it, `switchyard top`
//! polls it; rates are computed by the caller from two snapshots.

use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use super::Shared;
use super::session::Session;
use crate::plugins::loaded::FAILURE_KINDS;

/// The snapshot, limited to the topics the principal sees.
pub(super) fn status(shared: &Shared, session: &Session) -> Value {
    let principal = session.principal();
    status_of(shared, &|t| principal.sees(t))
}

/// The snapshot of the topics `sees` accepts.
pub(super) fn status_of(shared: &Shared, sees: &dyn Fn(&str) -> bool) -> Value {
    let broker = &shared.broker;
    let storage = broker.storage();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut topics = storage.topics();
    // A group's outbox is the router's own, as in `topic list`.
    topics.retain(|t| sees(&t.meta.name) && !super::outbox::is_outbox(&t.meta.name));
    topics.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
    let topics_json: Vec<Value> = topics
        .iter()
        .map(|t| {
            let parts = t.partitions();
            let refused: serde_json::Map<String, Value> = t
                .stats
                .refused
                .lock()
                .expect("refused lock")
                .iter()
                .map(|(c, n)| {
                    let code = crate::protocol::ErrorCode::from_u16(*c).name().to_string();
                    (code, json!(n))
                })
                .collect();
            json!({
                "name": t.meta.name,
                "partitions": parts.iter().enumerate().map(|(p, i)| json!({
                    "partition": p, "start": i.start, "end": i.end, "bytes": i.bytes,
                })).collect::<Vec<_>>(),
                "messages": t.messages(),
                "bytes": parts.iter().map(|i| i.bytes).sum::<u64>(),
                "published": load(&t.stats.published),
                "published_bytes": load(&t.stats.published_bytes),
                "delivered": load(&t.stats.delivered),
                "refused": refused,
            })
        })
        .collect();
    let groups: Vec<Value> = broker
        .stream_groups()
        .into_iter()
        .filter(|g| sees(&g.topic.meta.name))
        .map(|g| {
            let lag = g.lag();
            let total: u64 = lag.iter().map(|l| l.2).sum();
            let lags: Vec<Value> = lag
                .into_iter()
                .enumerate()
                .map(|(p, (c, end, n))| {
                    json!({ "partition": p, "committed": c, "end": end, "lag": n })
                })
                .collect();
            json!({
                "topic": g.topic.meta.name, "group": &*g.name,
                "members": g.member_count(), "lag": total, "partitions": lags,
            })
        })
        .collect();
    let queues: Vec<Value> = broker
        .queue_groups(None)
        .into_iter()
        .filter(|q| sees(&q.topic.meta.name))
        .map(|q| {
            let (ready, in_flight, delayed) = q.depth();
            let (dlq, dlq_size) = broker.dlq_of(&q.topic);
            json!({
                "topic": q.topic.meta.name, "group": &*q.name,
                "ready": ready, "in_flight": in_flight, "delayed": delayed,
                "backlog": q.backlog(),
                "delivered": load(&q.stats.delivered), "acked": load(&q.stats.acked),
                "nacked": load(&q.stats.nacked), "redelivered": load(&q.stats.retried),
                "dead_lettered": load(&q.stats.dead_lettered),
                "dlq": dlq, "dlq_size": dlq_size,
            })
        })
        .collect();
    let plugins: Vec<Value> = broker
        .plugins()
        .snapshot()
        .into_iter()
        .filter(|(b, _, _)| sees(&b.topic))
        .map(|(b, live, swaps)| {
            let mut v = json!({
                "name": &*b.name, "hook": b.hook.name(), "topic": b.topic,
                "group": b.group, "swaps": swaps, "live_version": live.as_ref().map(|l| l.version),
            });
            if let Some(l) = live {
                let s = &l.plugin.stats;
                let kinds: serde_json::Map<String, Value> = FAILURE_KINDS
                    .iter()
                    .zip(&s.failures_by_kind)
                    .filter(|(_, n)| load(n) > 0)
                    .map(|(k, n)| (k.to_string(), json!(load(n))))
                    .collect();
                v["calls"] = json!(load(&s.calls));
                v["messages"] = json!(load(&s.messages));
                v["failures"] = json!(load(&s.failures));
                v["failures_by_kind"] = Value::Object(kinds);
                v["p99_us"] = json!(s.quantile_us(0.99));
                v["suspended"] = json!(load(&s.suspended));
            }
            v
        })
        .collect();
    let (db, journal) = storage.file_bytes();
    let s = &shared.stats;
    let mut storage_json = json!({
        "database_bytes": db, "journal_bytes": journal,
        "free_bytes": storage.free_bytes(), "failed": storage.failed().map(|f| f.to_string()),
    });
    if shared.config.replica.is_some() {
        // A cluster node has no journal: the Raft log, one file for all
        // the node's groups, is where commits are made durable.
        storage_json["raft_log_bytes"] = std::fs::metadata(shared.config.data.join("raft.redb"))
            .map_or(0, |m| m.len())
            .into();
    }
    json!({
        "server": format!("switchyard {}", env!("CARGO_PKG_VERSION")),
        "time_ms": crate::storage::now_ms(),
        "connections": s.connections.load(Ordering::Relaxed),
        "streams": s.streams.load(Ordering::Relaxed),
        "storage": storage_json,
        "topics": topics_json,
        "groups": groups,
        "queues": queues,
        "plugins": plugins,
    })
}
