//! Topics, partitioning and consumer groups: the ingress and egress paths
//! between the server's streams and storage.

mod group;
pub mod partitioner;
mod route;
pub use route::with_headers;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
pub use group::{Group, Held};

use crate::auth::Auth;
use crate::delivery::QueueGroup;
use crate::plugins::{CallMessage, FailureMode, Hook, LiveVersion, PluginRegistry};
use crate::protocol::headers::{PRIORITY, Policy};
use crate::protocol::{ErrorCode, RawRecord, StartPosition, TopicInfo, WireError};
use crate::storage::{
    AppendRecord, AppendTicket, DUPLICATE_BIT, Fanout, KvWrite, Storage, StorageError, TopicHandle,
    now_ms,
};

/// Limits the broker enforces on requests.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Largest encoded record accepted.
    pub max_message_bytes: usize,
    /// Most partitions a topic may have.
    pub max_partitions: u32,
    /// Longest dedup window a topic policy may set (ids are held in memory
    /// for the window).
    pub max_dedup_window_ms: u64,
    /// Largest queue look-ahead window a topic policy may set (memory per
    /// queue group).
    pub max_queue_window: u32,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_message_bytes: 1 << 20,
            max_partitions: 1024,
            max_dedup_window_ms: 24 * 3600 * 1000,
            max_queue_window: 1 << 20,
        }
    }
}

/// The broker: shared by every connection.
pub struct Broker {
    storage: Storage,
    config: BrokerConfig,
    groups: Mutex<HashMap<(String, u32), Arc<Group>>>,
    queues: Mutex<HashMap<(String, u32), Arc<QueueGroup>>>,
    plugins: Arc<PluginRegistry>,
    auth: Arc<Auth>,
    /// On a router of a cluster of several groups: which topics its group
    /// may create.
    placement: Option<crate::server::placement::Placement>,
}

/// Where one published record went, for its ack.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Slot {
    /// At this index of the storage positions.
    Stored(usize),
    /// Dropped by the route plugin.
    Dropped,
}

/// A plugin's key/value writes to settle once the commit carrying them ends.
type SettleAfter = Option<(Arc<LiveVersion>, Vec<(String, Vec<u8>)>)>;

/// Position reported for a record a route plugin dropped.
pub const DROPPED: (u32, u64) = (u32::MAX, u64::MAX);

/// The acks of one publish batch, once durable: one `(partition, offset)`
/// per record, in order ([`DROPPED`] for records a route plugin dropped).
pub struct PublishTicket {
    inner: AppendTicket,
    route: Option<Routed>,
    /// Indexes of records shed by the backlog limit, ascending.
    shed: Vec<usize>,
    /// Priority plugin key/value writes riding on this commit.
    after: SettleAfter,
}

struct Routed {
    /// The topic the batch was published to.
    origin: u32,
    slots: Vec<Slot>,
    live: Arc<LiveVersion>,
    /// Topic of each stored record, in storage order.
    topics: Vec<Arc<TopicHandle>>,
    /// Key/value writes riding on this commit.
    kv: Vec<(String, Vec<u8>)>,
}

impl PublishTicket {
    fn plain(inner: AppendTicket) -> Self {
        PublishTicket {
            inner,
            route: None,
            shed: Vec::new(),
            after: None,
        }
    }

    fn routed(
        inner: AppendTicket,
        origin: u32,
        slots: Vec<Slot>,
        live: Arc<LiveVersion>,
        topics: Vec<Arc<TopicHandle>>,
        kv: Vec<(String, Vec<u8>)>,
    ) -> Self {
        PublishTicket {
            inner,
            route: Some(Routed {
                origin,
                slots,
                live,
                topics,
                kv,
            }),
            shed: Vec::new(),
            after: None,
        }
    }
}

/// Where a publish batch's records went, once durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// `(partition, offset)` per record in batch order; [`DROPPED`] for a
    /// record a route plugin dropped or the backlog limit shed.
    pub positions: Vec<(u32, u64)>,
    /// Indexes of records whose message id was already stored within the
    /// dedup window: their position is the original's.
    pub duplicates: Vec<u32>,
    /// `(index, topic)` of records a route plugin stored in another topic
    /// than the one published to (their position is in that topic).
    pub routed: Vec<(u32, String)>,
}

impl std::future::Future for PublishTicket {
    type Output = Result<Published, StorageError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let r = match std::pin::Pin::new(&mut self.inner).poll(cx) {
            std::task::Poll::Pending => return std::task::Poll::Pending,
            std::task::Poll::Ready(r) => r.unwrap_or(Err(StorageError::ShutDown)),
        };
        if let Some((live, kv)) = self.after.take() {
            live.plugin.settle_kv(&kv);
        }
        let route = self.route.take();
        if let Some(route) = &route {
            route.live.plugin.settle_kv(&route.kv);
        }
        let shed = std::mem::take(&mut self.shed);
        std::task::Poll::Ready(r.map(|stored| {
            // The common case: positions as stored, nothing to rearrange.
            if route.is_none()
                && shed.is_empty()
                && stored.iter().all(|(p, _)| p & DUPLICATE_BIT == 0)
            {
                return Published {
                    positions: stored,
                    duplicates: Vec::new(),
                    routed: Vec::new(),
                };
            }
            // Storage marks duplicates in the partition's top bit.
            let stored: Vec<((u32, u64), bool)> = stored
                .into_iter()
                .map(|(p, o)| ((p & !DUPLICATE_BIT, o), p & DUPLICATE_BIT != 0))
                .collect();
            // One entry per record the broker queued: through the route
            // plugin's slots if there is one, then with shed records back.
            // Per record: its position, whether it was a duplicate, and the
            // topic it landed in if a route plugin moved it.
            let mut per_record: Vec<((u32, u64), bool, Option<&str>)> = match &route {
                None => stored.into_iter().map(|(pos, d)| (pos, d, None)).collect(),
                Some(route) => {
                    route.live.note_decided(
                        route
                            .topics
                            .iter()
                            .zip(&stored)
                            .filter(|(_, (_, duplicate))| !duplicate)
                            .map(|(t, ((p, _), _))| (t.meta.id, *p)),
                    );
                    route
                        .slots
                        .iter()
                        .map(|s| match s {
                            Slot::Stored(i) => {
                                let (pos, dup) = stored[*i];
                                let t = route.topics[*i].meta.id;
                                let to = (t != route.origin)
                                    .then_some(route.topics[*i].meta.name.as_str());
                                (pos, dup, to)
                            }
                            Slot::Dropped => (DROPPED, false, None),
                        })
                        .collect()
                }
            };
            for i in shed {
                per_record.insert(i.min(per_record.len()), (DROPPED, false, None));
            }
            Published {
                duplicates: (0..per_record.len() as u32)
                    .filter(|i| per_record[*i as usize].1)
                    .collect(),
                routed: per_record
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| r.2.map(|t| (i as u32, t.to_string())))
                    .collect(),
                positions: per_record.into_iter().map(|(pos, _, _)| pos).collect(),
            }
        }))
    }
}

/// Longest topic or group name.
pub const MAX_NAME_LEN: usize = 249;

/// Records about to be published, as one plugin call's batch.
fn call_batch(records: &[RawRecord], topic: &Arc<str>, now: u64) -> Vec<CallMessage> {
    records
        .iter()
        .map(|r| CallMessage {
            record: r.clone(),
            topic: topic.clone(),
            timestamp_ms: now,
            attempt: 0,
        })
        .collect()
}

fn plugin_name(live: &LiveVersion) -> Arc<str> {
    live.plugin
        .label
        .split('@')
        .next()
        .unwrap_or_default()
        .into()
}

/// Runs the topic's priority plugin and stamps each record's `priority`
/// header with its decision (the plugin wins over a producer's header).
#[allow(clippy::type_complexity)]
fn stamp_priority(
    topic: &TopicHandle,
    records: Vec<RawRecord>,
    live: &LiveVersion,
) -> Result<(Vec<RawRecord>, Vec<(String, Vec<u8>)>), WireError> {
    let name: Arc<str> = topic.meta.name.as_str().into();
    let now = now_ms();
    let mut out = Vec::with_capacity(records.len());
    let mut writes = Vec::new();
    for chunk in records.chunks(256) {
        let res = live.plugin.priority(call_batch(chunk, &name, now));
        match res.decisions {
            Ok(ps) => {
                writes.extend(res.kv_writes);
                for (r, p) in chunk.iter().zip(ps) {
                    let mut rec = r.to_record();
                    rec.headers.retain(|(n, _)| n != PRIORITY);
                    rec.headers.push((PRIORITY.into(), p.to_string().into()));
                    out.push(rec.to_raw());
                }
            }
            Err(crate::plugins::CallError::Stopped) => {
                live.plugin.settle_kv(&writes);
                return Err(route::stopped());
            }
            Err(e) if live.on_failure == FailureMode::Reject => {
                live.plugin.settle_kv(&writes);
                return Err(WireError::new(
                    ErrorCode::PluginFailed,
                    format!(
                        "priority plugin {} failed: {e}; no record of this batch was stored (failure mode reject)",
                        live.plugin.label
                    ),
                ));
            }
            Err(e) => {
                tracing::warn!(plugin = %live.plugin.label, error = %e,
                    "priority plugin failed; keeping header or topic default");
                out.extend(chunk.iter().cloned());
            }
        }
    }
    Ok((out, writes))
}

/// Checks a topic name: 1-249 characters from `[A-Za-z0-9._-]`, as in Kafka.
pub fn validate_topic_name(name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(WireError::new(
            ErrorCode::InvalidTopicName,
            format!(
                "invalid topic name '{name}': use 1-{MAX_NAME_LEN} characters from A-Z a-z 0-9 . _ -"
            ),
        ))
    }
}

fn validate_group_name(name: &str) -> Result<(), WireError> {
    if name.len() > MAX_NAME_LEN || name.chars().any(|c| c.is_control()) {
        return Err(WireError::new(
            ErrorCode::InvalidGroup,
            format!("invalid group name: at most {MAX_NAME_LEN} bytes, no control characters"),
        ));
    }
    Ok(())
}

pub(crate) fn unknown_topic(name: &str) -> WireError {
    WireError::new(
        ErrorCode::UnknownTopic,
        format!("unknown topic '{name}' (create it with `switchyard topic create {name}`)"),
    )
}

impl Broker {
    /// A broker over `storage`, with the deployed plugins.
    pub fn new(
        storage: Storage,
        config: BrokerConfig,
        plugins: Arc<PluginRegistry>,
        auth: Arc<Auth>,
    ) -> Self {
        Broker {
            storage,
            config,
            groups: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            plugins,
            auth,
            placement: None,
        }
    }

    /// On a router of a cluster of several groups: its group and the
    /// node's replica of group 0.
    pub fn placement(&self) -> Option<&crate::server::placement::Placement> {
        self.placement.as_ref()
    }

    /// Makes this the broker of one group of a cluster of several: it
    /// creates only the topics group 0 assigned to its group.
    pub fn with_placement(mut self, placement: crate::server::placement::Placement) -> Self {
        self.placement = Some(placement);
        self
    }

    /// Principals: a plugin acts with the rights of the one who deployed it.
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// The plugin registry.
    pub fn plugins(&self) -> &Arc<PluginRegistry> {
        &self.plugins
    }

    /// The storage handle.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The broker's limits.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Creates a topic after validating its name and partition count.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        retention_ms: u64,
        retention_bytes: u64,
    ) -> Result<TopicInfo, WireError> {
        validate_topic_name(name)?;
        crate::server::outbox::reserved(name)?;
        if partitions == 0 || partitions > self.config.max_partitions {
            return Err(WireError::new(
                ErrorCode::InvalidPartitions,
                format!(
                    "invalid partition count {partitions}: use 1 to {}",
                    self.config.max_partitions
                ),
            ));
        }
        if let Some(p) = &self.placement
            && self.storage.topic(name).is_none()
        {
            p.may_create(name).await?;
        }
        let h = self
            .storage
            .create_topic(name, partitions, retention_ms, retention_bytes)
            .await
            .map_err(|e| e.to_wire())?;
        Ok(h.info())
    }

    /// Deletes a topic and everything in it.
    pub async fn delete_topic(&self, name: &str) -> Result<(), WireError> {
        validate_topic_name(name)?;
        if self.placement.is_some() {
            crate::server::outbox::reserved(name)?;
        }
        self.storage
            .delete_topic(name)
            .await
            .map_err(|e| e.to_wire())?;
        self.groups
            .lock()
            .expect("groups lock")
            .retain(|_, g| !g.topic.is_deleted());
        self.queues
            .lock()
            .expect("queues lock")
            .retain(|_, g| !g.topic.is_deleted());
        Ok(())
    }

    /// Describes one topic.
    pub fn describe_topic(&self, name: &str) -> Result<TopicInfo, WireError> {
        self.topic(name).map(|t| t.info())
    }

    /// Describes every topic but a cluster group's outbox (which `describe`
    /// shows by its name, `__outbox.<group>`).
    pub fn list_topics(&self) -> Vec<TopicInfo> {
        self.storage
            .topics()
            .iter()
            .filter(|t| !crate::server::outbox::is_outbox(&t.meta.name))
            .map(|t| t.info())
            .collect()
    }

    /// Whether topic `name` exists: here, or, on a cluster of several
    /// groups, in another group (where a route reaches it through the
    /// outbox).
    pub fn topic_known(&self, name: &str) -> bool {
        self.storage.topic(name).is_some()
            || self
                .placement
                .as_ref()
                .is_some_and(|p| p.zero.group_of(name).is_some())
    }

    /// The topic a client publishes to: as [`Broker::topic`], but a
    /// group's outbox is the router's own (a record in it is forwarded
    /// with the node's rights to the topic its header names), so on a
    /// cluster of several groups it takes no client's publishes.
    pub fn topic_for_publish(&self, name: &str) -> Result<Arc<TopicHandle>, WireError> {
        if self.placement.is_some() {
            crate::server::outbox::reserved(name)?;
        }
        self.topic(name)
    }

    /// The live topic, or an `UnknownTopic` error.
    pub fn topic(&self, name: &str) -> Result<Arc<TopicHandle>, WireError> {
        self.storage.topic(name).ok_or_else(|| unknown_topic(name))
    }

    /// Validates a batch and queues it for durable append. `rr` is the
    /// caller's round-robin cursor for keyless records.
    ///
    /// The whole batch is accepted or rejected: a producer never has to work
    /// out which half of a batch landed.
    pub async fn publish(
        &self,
        topic: &Arc<TopicHandle>,
        records: Vec<RawRecord>,
        rr: &mut u32,
    ) -> Result<PublishTicket, WireError> {
        let (n, bytes) = (
            records.len() as u64,
            records.iter().map(|r| r.len() as u64).sum::<u64>(),
        );
        let r = self.publish_batch(topic, records, rr).await;
        match &r {
            Ok(_) => {
                topic.stats.published.fetch_add(n, Ordering::Relaxed);
                topic
                    .stats
                    .published_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) => topic.stats.refuse(e.code),
        }
        r
    }

    async fn publish_batch(
        &self,
        topic: &Arc<TopicHandle>,
        records: Vec<RawRecord>,
        rr: &mut u32,
    ) -> Result<PublishTicket, WireError> {
        if let Some(r) = records
            .iter()
            .find(|r| r.len() > self.config.max_message_bytes)
        {
            return Err(WireError::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "record of {} bytes exceeds max_message_bytes = {}; split it or raise the router's limit",
                    r.len(),
                    self.config.max_message_bytes
                ),
            ));
        }
        let policy = topic.policy();
        let mut records = records;
        let mut kv = Vec::new();
        let mut after = None;
        if let Some(live) = self.plugins.hook_for(Hook::Priority, &topic.meta.name) {
            let writes;
            (records, writes) = stamp_priority(topic, records, &live)?;
            if !writes.is_empty() {
                let plugin: Arc<str> = plugin_name(&live);
                kv.extend(writes.iter().map(|(key, value)| KvWrite {
                    plugin: plugin.clone(),
                    key: key.clone(),
                    value: value.clone(),
                }));
                after = Some((live, writes));
            }
        }
        let settle = |after: &SettleAfter| {
            if let Some((live, w)) = after {
                live.plugin.settle_kv(w);
            }
        };
        // Check the router-read headers of every record: the whole batch is
        // refused if one asks for something the topic does not allow.
        let now = now_ms();
        let mut ids: Vec<Option<Bytes>> = Vec::with_capacity(records.len());
        // Priorities matter here only for shedding.
        let shedding = policy.backlog_limit > 0 && policy.shed_below_priority.is_some();
        let mut priorities = Vec::with_capacity(if shedding { records.len() } else { 0 });
        for r in &records {
            let p = Policy::parse(r.as_bytes()).inspect_err(|_| settle(&after))?;
            let delay = p.visible_at(now).saturating_sub(now);
            if delay > policy.max_delay_ms {
                settle(&after);
                return Err(WireError::new(
                    ErrorCode::InvalidDelay,
                    format!(
                        "delay of {delay} ms exceeds topic '{}' max_delay_ms = {}",
                        topic.meta.name, policy.max_delay_ms
                    ),
                ));
            }
            ids.push(p.message_id.map(|id| r.as_bytes().slice_ref(id)));
            if shedding {
                priorities.push(p.priority.unwrap_or(policy.default_priority));
            }
        }
        let mut shed = Vec::new();
        if policy.backlog_limit > 0 {
            let backlog = self.backlog(topic);
            if backlog.saturating_add(records.len() as u64) > policy.backlog_limit {
                let Some(min) = policy.shed_below_priority else {
                    settle(&after);
                    return Err(WireError::new(
                        ErrorCode::BacklogFull,
                        format!(
                            "topic '{}' has {backlog} unsettled messages (backlog_limit = {}); \
                             nothing of this batch was stored; retry_after_ms=200",
                            topic.meta.name, policy.backlog_limit
                        ),
                    ));
                };
                let mut kept = Vec::with_capacity(records.len());
                let mut kept_ids = Vec::with_capacity(records.len());
                for (i, ((r, id), p)) in records.into_iter().zip(ids).zip(priorities).enumerate() {
                    if p < min {
                        shed.push(i);
                    } else {
                        kept.push(r);
                        kept_ids.push(id);
                    }
                }
                topic.shed.fetch_add(shed.len() as u64, Ordering::Relaxed);
                (records, ids) = (kept, kept_ids);
            }
        }
        if let Some(live) = self.plugins.route_for(&topic.meta.name) {
            let mut t = self
                .publish_routed(topic, records, rr, live)
                .await
                .inspect_err(|_| settle(&after))?;
            t.shed = shed;
            t.after = after;
            return Ok(t);
        }
        let n = topic.meta.partitions;
        let mut fanouts = self.fanouts(topic, &records).into_iter().flatten();
        let appends = records
            .into_iter()
            .zip(ids)
            .map(|(r, dedup)| AppendRecord {
                topic_id: topic.meta.id,
                partition: partitioner::partition_of(&r, n, rr),
                record: r,
                dedup,
                fanout: fanouts.next().flatten(),
            })
            .collect();
        match self.storage.append_many(appends, kv).await {
            Ok(inner) => {
                let mut t = PublishTicket::plain(inner);
                t.shed = shed;
                t.after = after;
                Ok(t)
            }
            Err(e) => {
                settle(&after);
                Err(e.to_wire())
            }
        }
    }

    /// How each keyed record reaches the feeds following its key: the
    /// topic's fanout plugin decides per message (given its follower
    /// count), else the topic's default; `None` where the topic has no feeds.
    fn fanouts(
        &self,
        topic: &TopicHandle,
        records: &[RawRecord],
    ) -> Option<Vec<Option<(u64, Fanout)>>> {
        let default = topic.policy().fanout?;
        let hashes: Vec<Option<u64>> = records
            .iter()
            .map(|r| r.key_bytes().map(crate::storage::key_hash))
            .collect();
        let Some(live) = self.plugins.hook_for(Hook::Fanout, &topic.meta.name) else {
            return Some(hashes.iter().map(|h| h.map(|h| (h, default))).collect());
        };
        let followers: Vec<u32> = self.storage.with_feeds(topic.meta.id, |f| {
            hashes
                .iter()
                .map(|h| h.map_or(0, |h| f.follower_count(h)))
                .collect()
        });
        let name: Arc<str> = topic.meta.name.as_str().into();
        let now = now_ms();
        let mut out = Vec::with_capacity(records.len());
        for (i, chunk) in records.chunks(256).enumerate() {
            let at = i * 256;
            let batch = call_batch(chunk, &name, now);
            let res = live.plugin.fanout(batch, &followers[at..at + chunk.len()]);
            live.plugin.settle_kv(&res.kv_writes);
            let modes: Vec<Fanout> = match res.decisions {
                Ok(m) => m
                    .into_iter()
                    .map(|m| match m {
                        crate::plugins::FanoutMode::OnWrite => Fanout::OnWrite,
                        crate::plugins::FanoutMode::OnRead => Fanout::OnRead,
                    })
                    .collect(),
                Err(e) => {
                    tracing::warn!(plugin = %live.plugin.label, error = %e,
                        "fanout plugin failed; using the topic default");
                    vec![default; chunk.len()]
                }
            };
            for (h, m) in hashes[at..at + chunk.len()].iter().zip(modes) {
                out.push(h.map(|h| (h, m)));
            }
        }
        Some(out)
    }

    /// The largest backlog (unsettled messages) of the topic's queue groups.
    pub fn backlog(&self, topic: &TopicHandle) -> u64 {
        let groups: Vec<Arc<QueueGroup>> = self
            .queues
            .lock()
            .expect("queues lock")
            .values()
            .filter(|g| g.topic.meta.id == topic.meta.id)
            .cloned()
            .collect();
        groups.iter().map(|g| g.backlog()).max().unwrap_or(0)
    }

    /// The queue group `name` on `topic`, opened (and recovered from
    /// storage) on first use. A group without stored state starts at `start`.
    pub fn queue_group(
        &self,
        name: &str,
        topic: &Arc<TopicHandle>,
        start: StartPosition,
    ) -> Result<Arc<QueueGroup>, WireError> {
        validate_group_name(name)?;
        if name.is_empty() {
            return Err(WireError::new(
                ErrorCode::InvalidGroup,
                "queue subscriptions need a group name (--group NAME): members of a group share its messages",
            ));
        }
        let mut queues = self.queues.lock().expect("queues lock");
        let key = (name.to_string(), topic.meta.id);
        if let Some(g) = queues.get(&key) {
            return Ok(g.clone());
        }
        let g = QueueGroup::open(
            name.into(),
            topic.clone(),
            self.storage.clone(),
            self.plugins.clone(),
            start,
            self.placement.clone(),
        )
        .map_err(|e| e.to_wire())?;
        queues.insert(key, g.clone());
        Ok(g)
    }

    /// Reopens every queue group with stored state, so their backlogs
    /// count and their timers run before a member reconnects.
    pub fn open_queue_groups(&self) -> Result<(), StorageError> {
        for (topic_id, group) in self.storage.queue_groups()? {
            if let Some(t) = self
                .storage
                .topics()
                .into_iter()
                .find(|t| t.meta.id == topic_id)
            {
                let _ = self.queue_group(&group, &t, StartPosition::Earliest);
            }
        }
        Ok(())
    }

    /// `topic`'s dead-letter topic and how many letters it holds (0 if it
    /// does not exist yet).
    pub fn dlq_of(&self, topic: &TopicHandle) -> (String, u64) {
        let dlq = topic.policy().dlq_of(&topic.meta.name);
        let held = self.storage.topic(&dlq).map_or(0, |d| d.messages());
        (dlq, held)
    }

    /// Named stream consumer groups known since the router started.
    pub fn stream_groups(&self) -> Vec<Arc<Group>> {
        let mut v: Vec<Arc<Group>> = self
            .groups
            .lock()
            .expect("groups lock")
            .values()
            .filter(|g| !g.name.is_empty() && !g.topic.is_deleted())
            .cloned()
            .collect();
        v.sort_by(|a, b| (&a.topic.meta.name, &a.name).cmp(&(&b.topic.meta.name, &b.name)));
        v
    }

    /// Queue groups, optionally of one topic.
    pub fn queue_groups(&self, topic: Option<&str>) -> Vec<Arc<QueueGroup>> {
        let mut v: Vec<Arc<QueueGroup>> = self
            .queues
            .lock()
            .expect("queues lock")
            .values()
            .filter(|g| topic.is_none_or(|t| g.topic.meta.name == t))
            .cloned()
            .collect();
        v.sort_by(|a, b| (&a.topic.meta.name, &a.name).cmp(&(&b.topic.meta.name, &b.name)));
        v
    }

    /// The group `name` on `topic`; an empty name makes a fresh anonymous group.
    pub fn group(&self, name: &str, topic: &Arc<TopicHandle>) -> Result<Arc<Group>, WireError> {
        validate_group_name(name)?;
        let make = || {
            Group::new(name.into(), topic.clone(), self.storage.clone())
                .map(Arc::new)
                .map_err(|e| e.to_wire())
        };
        if name.is_empty() {
            return make();
        }
        let mut groups = self.groups.lock().expect("groups lock");
        let key = (name.to_string(), topic.meta.id);
        if let Some(g) = groups.get(&key) {
            return Ok(g.clone());
        }
        let g = make()?;
        groups.insert(key, g.clone());
        Ok(g)
    }
}
