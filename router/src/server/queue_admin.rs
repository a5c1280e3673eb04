//! Queue administration on the control stream: topic delivery policy,
//! queue group statistics, and dead letters (list, redrive, purge).

use serde::Deserialize;

use super::session::Session;
use crate::auth::Class;
use crate::broker::Broker;
use crate::delivery::queue::redrive_record;
use crate::protocol::{ErrorCode, RawRecord, WireError};
use crate::storage::{ReadLimit, TopicHandle, TopicPolicy};

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(body)
        .map_err(|e| WireError::new(ErrorCode::InvalidArgument, format!("bad request body: {e}")))
}

#[derive(Deserialize)]
struct PolicyReq {
    name: String,
    #[serde(default)]
    set: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct DlqReq {
    topic: String,
    #[serde(default)]
    count: Option<u64>,
}

#[derive(Deserialize)]
struct StatsReq {
    #[serde(default)]
    topic: Option<String>,
}

/// Serializes redrives so two at once never publish the same dead letter twice.
static REDRIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Most dead letters read per step.
const CHUNK: usize = 1_000;

/// The operations this module handles.
pub(super) const OPS: [&str; 6] = [
    "topic-policy",
    "feeds",
    "queue-stats",
    "dlq-list",
    "dlq-redrive",
    "dlq-purge",
];

/// Handles one of [`OPS`].
pub(super) async fn handle(
    broker: &Broker,
    session: &Session,
    op: &str,
    body: &[u8],
) -> Result<serde_json::Value, WireError> {
    let principal = session.principal();
    match op {
        "topic-policy" => {
            let r: PolicyReq = parse(body)?;
            if r.set.is_empty() {
                principal.check_sees(&r.name)?;
            } else {
                principal.check(Class::TopicAdmin, &r.name, "")?;
            }
            topic_policy(broker, session, r).await
        }
        "queue-stats" => {
            let r: StatsReq = parse(body)?;
            if let Some(t) = &r.topic {
                principal.check_sees(t)?;
            }
            Ok(serde_json::Value::Array(
                broker
                    .queue_groups(r.topic.as_deref())
                    .iter()
                    .filter(|g| principal.sees(&g.topic.meta.name))
                    .map(|g| g.describe())
                    .collect(),
            ))
        }
        "dlq-list" => {
            let r: DlqReq = parse(body)?;
            principal.check(Class::DlqAdmin, &r.topic, "")?;
            dlq_list(broker, r)
        }
        "feeds" => {
            let r: DlqReq = parse(body)?;
            principal.check_sees(&r.topic)?;
            let t = broker.topic(&r.topic)?;
            let (inbox, index) = broker
                .storage()
                .feed_entries(t.meta.id)
                .map_err(|e| e.to_wire())?;
            let feeds: Vec<serde_json::Value> = broker.storage().with_feeds(t.meta.id, |f| {
                let mut v: Vec<_> = f
                    .feeds
                    .values()
                    .map(|d| {
                        serde_json::json!({
                            "name": d.name,
                            "keys": d.keys.iter().map(|(k, _)| String::from_utf8_lossy(k)).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                v.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
                v
            });
            Ok(serde_json::json!({
                "topic": r.topic,
                "feeds": feeds,
                "inbox_references": inbox,
                "key_index_entries": index,
            }))
        }
        "dlq-redrive" => {
            let r: DlqReq = parse(body)?;
            principal.check(Class::DlqAdmin, &r.topic, "")?;
            dlq_redrive(broker, session, r).await
        }
        "dlq-purge" => {
            let r: DlqReq = parse(body)?;
            principal.check(Class::DlqAdmin, &r.topic, "")?;
            dlq_purge(broker, r).await
        }
        other => Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!("unknown queue operation '{other}'"),
        )),
    }
}

async fn topic_policy(
    broker: &Broker,
    session: &Session,
    r: PolicyReq,
) -> Result<serde_json::Value, WireError> {
    let topic = broker.topic(&r.name)?;
    let current = topic.policy();
    if r.set.is_empty() {
        return Ok(serde_json::to_value(&*current).expect("policy serializes"));
    }
    let mut v = serde_json::to_value(&*current).expect("policy serializes");
    let obj = v.as_object_mut().expect("policy is an object");
    for (k, val) in r.set {
        obj.insert(k, val);
    }
    let bad = |m: String| WireError::new(ErrorCode::InvalidArgument, m);
    let policy: TopicPolicy =
        serde_json::from_value(v).map_err(|e| bad(format!("invalid policy: {e}")))?;
    policy.validate().map_err(bad)?;
    if let Some(dlq) = &policy.dlq
        && policy.dlq != current.dlq
    {
        crate::broker::validate_topic_name(dlq)?;
        if *dlq == r.name {
            return Err(bad(format!(
                "topic '{dlq}' cannot be its own dead-letter topic"
            )));
        }
        // Dead letters are written there: naming it needs rights on it.
        session.principal().check(Class::TopicAdmin, dlq, "")?;
        // In the topic's group, dead letters are appended to it there (and
        // it is made on the first); in another, they go through the
        // group's outbox, so it must exist: a name no group holds has no
        // group to be made in.
        if let Some(p) = broker.placement()
            && p.zero.group_of(dlq).is_none()
        {
            return Err(bad(format!(
                "dead-letter topic '{dlq}' is in no group of the cluster: create it first, or \
                 name it under '{}' (for example '{}.failed'), which keeps it in the topic's \
                 group {}",
                r.name, r.name, p.group
            )));
        }
    }
    let limits = broker.config();
    let over = |field: &str, asked: u64, max: u64, key: &str| {
        WireError::new(
            ErrorCode::LimitExceeded,
            format!(
                "{field} {asked} is above this router's maximum of {max} (`{key}` in the router's configuration)"
            ),
        )
    };
    if policy.dedup_window_ms > limits.max_dedup_window_ms
        && policy.dedup_window_ms != current.dedup_window_ms
    {
        let (asked, max) = (policy.dedup_window_ms, limits.max_dedup_window_ms);
        return Err(over("dedup_window_ms", asked, max, "max_dedup_window_ms"));
    }
    if policy.queue_window > limits.max_queue_window && policy.queue_window != current.queue_window
    {
        let (asked, max) = (policy.queue_window as u64, limits.max_queue_window as u64);
        return Err(over("queue_window", asked, max, "max_queue_window"));
    }
    broker
        .storage()
        .set_policy(&r.name, policy.clone())
        .await
        .map_err(|e| e.to_wire())?;
    Ok(serde_json::to_value(&policy).expect("policy serializes"))
}

/// The oldest `max` dead letters of `dlq`: `(offset, timestamp ms, record)`.
fn read_dlq(
    broker: &Broker,
    dlq: &TopicHandle,
    max: usize,
) -> Result<Vec<(u64, u64, RawRecord)>, WireError> {
    let mut out = Vec::new();
    broker
        .storage()
        .scan(
            dlq.meta.id,
            0,
            dlq.partitions()[0].start,
            ReadLimit {
                max_records: max,
                max_bytes: 16 << 20,
            },
            |offset, ts, rec| {
                // Stored records were validated when they were appended.
                if let Ok(raw) = RawRecord::new(bytes::Bytes::copy_from_slice(rec)) {
                    out.push((offset, ts, raw));
                }
            },
        )
        .map_err(|e| e.to_wire())?;
    Ok(out)
}

/// The dead-letter topic of `topic`, or `None` if nothing was ever
/// dead-lettered (it is created on first use): an empty DLQ, not an error.
/// The original topic must exist.
/// On a cluster of several groups, a dead-letter topic another group
/// holds (its letters go through the outbox) is refused here, naming it.
fn dlq_of(broker: &Broker, topic: &str) -> Result<Option<std::sync::Arc<TopicHandle>>, WireError> {
    let name = dlq_name(broker, topic)?;
    if let Ok(t) = broker.topic(&name) {
        return Ok(Some(t));
    }
    if let Some(p) = broker.placement()
        && let Some(g) = p.zero.group_of(&name).filter(|g| *g != p.group)
    {
        return Err(WireError::new(
            ErrorCode::WrongGroup,
            format!(
                "the dead letters of '{topic}' go to '{name}', which group={g} of the cluster \
                 holds: read it as a topic (`switchyard subscribe {name} --from earliest`); \
                 redrive and purge work on a dead-letter topic in the topic's own group"
            ),
        ));
    }
    Ok(None)
}

/// The name of `topic`'s dead-letter topic (its policy's `dlq`, else
/// `<topic>.dlq`). The original topic must exist.
fn dlq_name(broker: &Broker, topic: &str) -> Result<String, WireError> {
    Ok(broker.topic(topic)?.policy().dlq_of(topic))
}

fn dlq_list(broker: &Broker, r: DlqReq) -> Result<serde_json::Value, WireError> {
    let Some(dlq) = dlq_of(broker, &r.topic)? else {
        let name = dlq_name(broker, &r.topic)?;
        return Ok(serde_json::json!({ "topic": name, "total": 0, "messages": [] }));
    };
    let info = dlq.partitions()[0];
    let letters = read_dlq(broker, &dlq, r.count.unwrap_or(20) as usize)?;
    let out: Vec<serde_json::Value> = letters
        .iter()
        .map(|(offset, ts, raw)| {
            let headers: serde_json::Map<String, serde_json::Value> = raw
                .headers()
                .map(|(n, v)| {
                    (
                        n.to_string(),
                        String::from_utf8_lossy(&v).into_owned().into(),
                    )
                })
                .collect();
            serde_json::json!({
                "offset": offset,
                "timestamp_ms": ts,
                "key": raw.key().map(|k| String::from_utf8_lossy(&k).into_owned()),
                "headers": headers,
                "payload": String::from_utf8_lossy(&raw.payload()),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "topic": dlq.meta.name,
        "total": info.end - info.start,
        "messages": out,
    }))
}

async fn dlq_redrive(
    broker: &Broker,
    session: &Session,
    r: DlqReq,
) -> Result<serde_json::Value, WireError> {
    let _one = REDRIVE.lock().await;
    let Some(dlq) = dlq_of(broker, &r.topic)? else {
        return Ok(serde_json::json!({ "topic": r.topic, "redriven": 0, "remaining": 0 }));
    };
    let max = r.count.unwrap_or(u64::MAX);
    let mut redriven = 0u64;
    let mut rr = 0u32;
    while redriven < max {
        let want = (max - redriven).min(CHUNK as u64) as usize;
        let batch = read_dlq(broker, &dlq, want)?;
        let Some(last) = batch.last().map(|(o, _, _)| *o) else {
            break;
        };
        // Publish each run of dead letters bound for one topic as a batch,
        // in order, and remove them from the dead-letter topic only once
        // every one is stored.
        let mut runs: Vec<(String, Vec<RawRecord>)> = Vec::new();
        for (_, _, raw) in &batch {
            let (origin, rec) = redrive_record(raw);
            let origin = origin.unwrap_or_else(|| r.topic.clone());
            match runs.last_mut() {
                Some((t, v)) if *t == origin => v.push(rec.to_raw()),
                _ => runs.push((origin, vec![rec.to_raw()])),
            }
        }
        for (name, records) in runs {
            // A dead letter names its origin in a header; sending it to
            // another topic than the one administered needs publish there.
            if name != r.topic {
                session.check(Class::Publish, &name, "")?;
            }
            let topic = broker.topic(&name)?;
            let ticket = broker.publish(&topic, records, &mut rr).await?;
            ticket.await.map_err(|e| e.to_wire())?;
        }
        broker
            .storage()
            .truncate(&dlq, 0, last + 1)
            .await
            .map_err(|e| e.to_wire())?;
        redriven += batch.len() as u64;
    }
    let info = dlq.partitions()[0];
    Ok(serde_json::json!({
        "topic": r.topic,
        "redriven": redriven,
        "remaining": info.end - info.start,
    }))
}

async fn dlq_purge(broker: &Broker, r: DlqReq) -> Result<serde_json::Value, WireError> {
    let _one = REDRIVE.lock().await;
    let Some(dlq) = dlq_of(broker, &r.topic)? else {
        return Ok(serde_json::json!({ "topic": r.topic, "purged": 0 }));
    };
    let end = dlq.partitions()[0].end;
    let purged = broker
        .storage()
        .truncate(&dlq, 0, end)
        .await
        .map_err(|e| e.to_wire())?;
    Ok(serde_json::json!({ "topic": r.topic, "purged": purged }))
}
