//! `plugin test`: run a component over stored messages without side effects
//! and summarise its decisions, so an operator sees what a version would do
//! before deploying it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Deserialize;

use crate::broker::Broker;
use crate::plugins::{
    CallMessage, EmptyKv, FanoutMode, Hook, Limits, LoadedPlugin, RouteAction, Subscriber,
};
use crate::protocol::{ErrorCode, RawRecord, WireError};
use crate::storage::ReadLimit;

#[derive(Deserialize)]
pub(super) struct TestRequest {
    hook: Hook,
    pub(super) topic: String,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    from_offset: Option<u64>,
    #[serde(default)]
    from_time_ms: Option<u64>,
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    config: BTreeMap<String, String>,
    #[serde(default)]
    followers: Option<u32>,
}

/// Most messages a dry run reads.
const MAX_COUNT: u64 = 100_000;

pub(super) async fn dry_run(
    broker: &Broker,
    req: TestRequest,
    wasm: Bytes,
) -> Result<serde_json::Value, WireError> {
    let topic = broker.topic(&req.topic)?;
    if req.hook == Hook::Retry {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            "retry plugins decide on failures, not stored messages; test them with cargo test",
        ));
    }
    let engine = broker.plugins().engine().clone();
    let (hook, config) = (req.hook, req.config.clone());
    let plugin = tokio::task::spawn_blocking(move || {
        LoadedPlugin::load(
            &engine,
            &wasm,
            hook,
            "dry-run".into(),
            config,
            // A dry run reports call times; it should not fail a slow
            // but finite plugin the way a live binding's deadline would.
            Limits {
                deadline: std::time::Duration::from_secs(1),
                ..Limits::default()
            },
            Arc::new(EmptyKv),
        )
    })
    .await
    .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
    .map_err(|e| WireError::new(ErrorCode::PluginInvalid, e.to_string()))?;

    // Read up to `count` messages, partition by partition.
    let want = req.count.unwrap_or(1000).min(MAX_COUNT);
    let storage = broker.storage();
    let topic_name: Arc<str> = topic.meta.name.as_str().into();
    let mut msgs = Vec::new();
    for (p, info) in topic.partitions().iter().enumerate() {
        let p = p as u32;
        let mut from = match (req.from_offset, req.from_time_ms) {
            (Some(o), _) => o.clamp(info.start, info.end),
            (None, Some(t)) => storage
                .offset_for_time(topic.meta.id, p, info.start, info.end, t)
                .map_err(|e| e.to_wire())?,
            (None, None) => info.start,
        };
        while (msgs.len() as u64) < want && from < info.end {
            let left = (want - msgs.len() as u64) as usize;
            from = storage
                .scan(
                    topic.meta.id,
                    p,
                    from,
                    ReadLimit {
                        max_records: left.min(4096),
                        max_bytes: 16 << 20,
                    },
                    |_, ts, rec| {
                        if let Ok(record) = RawRecord::new(Bytes::copy_from_slice(rec)) {
                            msgs.push(CallMessage {
                                record,
                                topic: topic_name.clone(),
                                timestamp_ms: ts,
                                attempt: 0,
                            });
                        }
                    },
                )
                .map_err(|e| e.to_wire())?;
        }
    }

    let total = msgs.len();
    let started = Instant::now();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures: HashMap<String, u64> = HashMap::new();
    let sub = Subscriber {
        group: req.group.clone().unwrap_or_default(),
        topic: req.topic.clone(),
    };
    let followers = req.followers.unwrap_or(1);
    for chunk in msgs.chunks(256) {
        let batch = chunk.to_vec();
        let n = batch.len() as u64;
        let failed = |failures: &mut HashMap<String, u64>, e: &crate::plugins::CallError| {
            let kind = e
                .to_string()
                .split(':')
                .next()
                .unwrap_or("failure")
                .to_string();
            *failures.entry(kind).or_default() += n;
        };
        match req.hook {
            Hook::Route => match plugin.route(batch).decisions {
                Ok(ds) => {
                    for d in ds {
                        let key = match d.action {
                            RouteAction::Keep => format!("keep -> {}", req.topic),
                            RouteAction::To(ts) => {
                                let unknown: Vec<_> =
                                    ts.iter().filter(|t| !broker.topic_known(t)).collect();
                                if unknown.is_empty() {
                                    format!("to {}", ts.join(", "))
                                } else {
                                    format!("to {} (invalid: unknown topic)", ts.join(", "))
                                }
                            }
                            RouteAction::Drop => "drop".into(),
                            RouteAction::Reject(r) => format!("reject: {r}"),
                        };
                        *outcomes.entry(key).or_default() += 1;
                    }
                }
                Err(e) => failed(&mut failures, &e),
            },
            Hook::Filter => match plugin.filter(&sub, batch).decisions {
                Ok(ds) => {
                    for d in ds {
                        *outcomes
                            .entry(if d { "deliver" } else { "skip" }.into())
                            .or_default() += 1;
                    }
                }
                Err(e) => failed(&mut failures, &e),
            },
            Hook::Priority => match plugin.priority(batch).decisions {
                Ok(ds) => {
                    for d in ds {
                        *outcomes.entry(format!("priority {d}")).or_default() += 1;
                    }
                }
                Err(e) => failed(&mut failures, &e),
            },
            Hook::Fanout => {
                let f = vec![followers; batch.len()];
                match plugin.fanout(batch, &f).decisions {
                    Ok(ds) => {
                        for d in ds {
                            let k = match d {
                                FanoutMode::OnWrite => "on-write",
                                FanoutMode::OnRead => "on-read",
                            };
                            *outcomes.entry(k.into()).or_default() += 1;
                        }
                    }
                    Err(e) => failed(&mut failures, &e),
                }
            }
            Hook::Retry => unreachable!("refused above"),
        }
    }
    let s = &plugin.stats;
    Ok(serde_json::json!({
        "hook": req.hook.name(),
        "topic": req.topic,
        "messages": total,
        "outcomes": outcomes,
        "failures": failures,
        "calls": s.calls.load(std::sync::atomic::Ordering::Relaxed),
        "call_us": {
            "p50": s.quantile_us(0.5),
            "p99": s.quantile_us(0.99),
            "max": s.quantile_us(1.0),
        },
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }))
}
