//! Applying a topic's route plugin to a publish batch.

use std::sync::Arc;

use super::{Broker, PublishTicket, Slot, partitioner, unknown_topic};
use crate::auth::{Class, Principal};
use crate::plugins::{
    CallError, CallMessage, FailureMode, LiveVersion, RouteAction, RouteDecision,
};
use crate::protocol::{ErrorCode, RawRecord, Record, WireError};
use crate::storage::{AppendRecord, KvWrite, TopicHandle, now_ms};

/// Messages per plugin call: bounds one call's time under its deadline.
const CALL_BATCH: usize = 256;

/// Where one message ends up.
enum Placement {
    Targets(Vec<(Arc<TopicHandle>, RawRecord)>),
    Dropped,
}

impl Broker {
    /// Routes `records` published to `topic` through `live`, then queues
    /// the resulting appends.
    pub(super) async fn publish_routed(
        &self,
        topic: &Arc<TopicHandle>,
        records: Vec<RawRecord>,
        rr: &mut u32,
        live: Arc<LiveVersion>,
    ) -> Result<PublishTicket, WireError> {
        let topic_name: Arc<str> = topic.meta.name.as_str().into();
        let now = now_ms();
        let mut placements: Vec<Placement> = Vec::with_capacity(records.len());
        let mut kv: Vec<KvWrite> = Vec::new();
        // Writes staged by successful calls; settled when this batch's
        // commit finishes, or now if the batch is refused.
        let mut staged: Vec<(String, Vec<u8>)> = Vec::new();
        let plugin_name: Arc<str> = live
            .plugin
            .label
            .split('@')
            .next()
            .unwrap_or_default()
            .into();
        // A plugin acts with its deployer's rights, resolved once per batch:
        // `None` for a version deployed before principals existed.
        let deployer = live
            .deployer
            .as_deref()
            .map(|name| (name, self.auth.principal(name)));
        let mut pending = records.into_iter().peekable();
        while pending.peek().is_some() {
            let batch: Vec<CallMessage> = pending
                .by_ref()
                .take(CALL_BATCH)
                .map(|record| CallMessage {
                    record,
                    topic: topic_name.clone(),
                    timestamp_ms: now,
                    attempt: 0,
                })
                .collect();
            let result = live.plugin.route(batch);
            match result.decisions {
                Ok(decisions) => {
                    staged.extend(result.kv_writes.iter().cloned());
                    kv.extend(result.kv_writes.into_iter().map(|(key, value)| KvWrite {
                        plugin: plugin_name.clone(),
                        key,
                        value,
                    }));
                    for (m, d) in result.batch.into_iter().zip(decisions) {
                        match self.place(topic, m.record, d, deployer.as_ref()) {
                            Ok(p) => placements.push(p),
                            Err(Decided::Reject(reason)) => {
                                live.plugin.settle_kv(&staged);
                                return Err(WireError::new(
                                    ErrorCode::Rejected,
                                    format!(
                                        "rejected by route plugin {}: {reason} (no record of this batch was stored)",
                                        live.plugin.label
                                    ),
                                ));
                            }
                            Err(Decided::Invalid(record, why)) => {
                                live.plugin.record_invalid();
                                let e = CallError::InvalidDecision(why);
                                match self.on_failure(topic, &live, record, &e) {
                                    Ok(p) => placements.push(p),
                                    Err(err) => {
                                        live.plugin.settle_kv(&staged);
                                        return Err(err);
                                    }
                                }
                            }
                        }
                    }
                }
                Err(CallError::Stopped) => {
                    live.plugin.settle_kv(&staged);
                    return Err(stopped());
                }
                Err(e) => {
                    tracing::warn!(plugin = %live.plugin.label, error = %e, "route plugin failed");
                    for m in result.batch {
                        match self.on_failure(topic, &live, m.record, &e) {
                            Ok(p) => placements.push(p),
                            Err(err) => {
                                live.plugin.settle_kv(&staged);
                                return Err(err);
                            }
                        }
                    }
                }
            }
        }

        let mut appends = Vec::new();
        let mut slots = Vec::with_capacity(placements.len());
        let mut decided = Vec::new();
        for p in placements {
            match p {
                Placement::Dropped => slots.push(Slot::Dropped),
                Placement::Targets(targets) => {
                    slots.push(Slot::Stored(appends.len()));
                    for (t, record) in targets {
                        let partition = partitioner::partition_of(&record, t.meta.partitions, rr);
                        // Into the outbox, the target's dedup window
                        // applies once it is forwarded (the id goes with it).
                        let outbox = crate::server::outbox::is_outbox(&t.meta.name);
                        let dedup =
                            crate::protocol::headers::Policy::parse_stored(record.as_bytes())
                                .message_id
                                .filter(|_| !outbox)
                                .map(|id| record.as_bytes().slice_ref(id));
                        appends.push(AppendRecord {
                            topic_id: t.meta.id,
                            partition,
                            record,
                            dedup,
                            fanout: None,
                        });
                        decided.push(t);
                    }
                }
            }
        }
        // Fan-out per target topic, decided as for unrouted records (the
        // target's fanout plugin, else its default).
        let mut targets: Vec<(&Arc<TopicHandle>, Vec<usize>)> = Vec::new();
        for (i, t) in decided.iter().enumerate() {
            if t.policy().fanout.is_none() {
                continue;
            }
            match targets.iter_mut().find(|(u, _)| u.meta.id == t.meta.id) {
                Some((_, idx)) => idx.push(i),
                None => targets.push((t, vec![i])),
            }
        }
        for (t, idx) in targets {
            let records: Vec<RawRecord> = idx.iter().map(|&i| appends[i].record.clone()).collect();
            if let Some(fanouts) = self.fanouts(t, &records) {
                for (&i, f) in idx.iter().zip(fanouts) {
                    appends[i].fanout = f;
                }
            }
        }
        let mark = live.cutover_mark(
            &plugin_name,
            appends.iter().map(|a| (a.topic_id, a.partition)),
        );
        let appended = match mark {
            Some(mark) => self.storage.append_routed(appends, kv, mark).await,
            None => self.storage.append_many(appends, kv).await,
        };
        let ticket = match appended {
            Ok(t) => t,
            Err(e) => {
                live.plugin.settle_kv(&staged);
                return Err(e.to_wire());
            }
        };
        Ok(PublishTicket::routed(
            ticket,
            topic.meta.id,
            slots,
            live,
            decided,
            staged,
        ))
    }

    fn place(
        &self,
        topic: &Arc<TopicHandle>,
        record: RawRecord,
        d: RouteDecision,
        deployer: Option<&(&str, Option<Arc<Principal>>)>,
    ) -> Result<Placement, Decided> {
        let record = if d.add_headers.is_empty() {
            record
        } else {
            match with_headers(&record, d.add_headers) {
                Ok(r) => r,
                Err(why) => return Err(Decided::Invalid(record, why)),
            }
        };
        match d.action {
            RouteAction::Keep => Ok(Placement::Targets(vec![(topic.clone(), record)])),
            RouteAction::Drop => Ok(Placement::Dropped),
            RouteAction::Reject(reason) => Err(Decided::Reject(reason)),
            RouteAction::To(names) => {
                if names.is_empty() {
                    return Err(Decided::Invalid(
                        record,
                        "route to an empty list of topics".into(),
                    ));
                }
                let mut targets = Vec::with_capacity(names.len());
                for n in &names {
                    if let Some((who, principal)) = deployer
                        && !principal
                            .as_ref()
                            .is_some_and(|p| p.may(Class::Publish, n, ""))
                    {
                        return Err(Decided::Invalid(
                            record,
                            format!(
                                "route to '{n}': the plugin acts with the rights of '{who}', \
                                 who deployed it and may not publish there"
                            ),
                        ));
                    }
                    if crate::server::outbox::is_outbox(n) {
                        return Err(Decided::Invalid(
                            record,
                            format!("route to '{n}': the outboxes are the router's own"),
                        ));
                    }
                    match self.storage.topic(n) {
                        Some(t) => targets.push((t, record.clone())),
                        None => match self.outbox_for(n) {
                            // Held by another group: into this group's
                            // outbox, in this commit, forwarded from there.
                            Some(outbox) => match crate::server::outbox::bound_for(&record, n) {
                                Ok(bound) => targets.push((outbox, bound)),
                                Err(why) => return Err(Decided::Invalid(record, why)),
                            },
                            None => {
                                return Err(Decided::Invalid(
                                    record,
                                    format!("route to unknown topic '{n}'"),
                                ));
                            }
                        },
                    }
                }
                Ok(Placement::Targets(targets))
            }
        }
    }

    /// This group's outbox, where a cluster of several groups has another
    /// group holding topic `name`.
    fn outbox_for(&self, name: &str) -> Option<Arc<TopicHandle>> {
        let p = self.placement.as_ref()?;
        if p.zero.group_of(name)? == p.group {
            return None;
        }
        self.storage.topic(&crate::server::outbox::name(p.group))
    }

    fn on_failure(
        &self,
        topic: &Arc<TopicHandle>,
        live: &LiveVersion,
        record: RawRecord,
        e: &CallError,
    ) -> Result<Placement, WireError> {
        match live.on_failure {
            FailureMode::Reject => Err(WireError::new(
                ErrorCode::PluginFailed,
                format!(
                    "route plugin {} failed: {e}; no record of this batch was stored (the plugin's failure mode is reject)",
                    live.plugin.label
                ),
            )),
            FailureMode::Bypass => Ok(Placement::Targets(vec![(topic.clone(), record)])),
            FailureMode::DeadLetter => {
                let dlq = topic.policy().dlq_of(&topic.meta.name);
                let t = self
                    .storage
                    .topic(&dlq)
                    .ok_or_else(|| unknown_topic(&dlq))?;
                let mut r = record.to_record();
                r.headers
                    .push(("x-dlq-topic".into(), topic.meta.name.clone().into()));
                r.headers.push((
                    "x-dlq-error".into(),
                    format!("{}: {e}", live.plugin.label).into(),
                ));
                r.headers
                    .push(("x-dlq-time-ms".into(), now_ms().to_string().into()));
                Ok(Placement::Targets(vec![(t, r.to_raw())]))
            }
        }
    }
}

/// A batch whose plugin call was cut short by shutdown: stored nowhere,
/// whatever the plugin's failure mode says.
pub(super) fn stopped() -> WireError {
    WireError::new(
        ErrorCode::ShuttingDown,
        "router shutting down before this batch was routed; nothing was stored; retry",
    )
}

enum Decided {
    Reject(String),
    Invalid(RawRecord, String),
}

/// `record` with the headers a route decision adds, or why the record
/// format cannot hold them (a header name over 65,535 bytes, more than
/// 65,535 headers): an invalid decision, never a record stored with a
/// truncated length that no reader can parse.
pub fn with_headers(record: &RawRecord, add: Vec<(String, Vec<u8>)>) -> Result<RawRecord, String> {
    // Adding headers changes the encoding: the one copy a route plugin can
    // cause, and only when it asks for it.
    let mut r: Record = record.to_record();
    r.headers
        .extend(add.into_iter().map(|(n, v)| (n, bytes::Bytes::from(v))));
    r.check()
        .map_err(|e| format!("the headers it adds do not fit the record format: {e}"))?;
    Ok(r.to_raw())
}
