//! Topics, partitioning and consumer groups: the ingress and egress paths
//! between the server's streams and storage.

mod group;
pub mod partitioner;
mod route;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use group::{Group, Held};

use crate::plugins::{LiveVersion, PluginRegistry};
use crate::protocol::{ErrorCode, RawRecord, TopicInfo, WireError};
use crate::storage::{AppendTicket, Storage, StorageError, TopicHandle};

/// Limits the broker enforces on requests.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Largest encoded record accepted.
    pub max_message_bytes: usize,
    /// Most partitions a topic may have.
    pub max_partitions: u32,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_message_bytes: 1 << 20,
            max_partitions: 1024,
        }
    }
}

/// The broker: shared by every connection.
pub struct Broker {
    storage: Storage,
    config: BrokerConfig,
    groups: Mutex<HashMap<(String, u32), Arc<Group>>>,
    plugins: Arc<PluginRegistry>,
}

/// Where one published record went, for its ack.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Slot {
    /// At this index of the storage positions.
    Stored(usize),
    /// Dropped by the route plugin.
    Dropped,
}

/// Position reported for a record a route plugin dropped.
pub const DROPPED: (u32, u64) = (u32::MAX, u64::MAX);

/// The acks of one publish batch, once durable: one `(partition, offset)`
/// per record, in order ([`DROPPED`] for records a route plugin dropped).
pub struct PublishTicket {
    inner: AppendTicket,
    route: Option<Routed>,
}

struct Routed {
    slots: Vec<Slot>,
    live: Arc<LiveVersion>,
    /// Topic of each stored record, in storage order.
    topics: Vec<Arc<TopicHandle>>,
    /// Key/value writes riding on this commit.
    kv: Vec<(String, Vec<u8>)>,
}

impl PublishTicket {
    fn plain(inner: AppendTicket) -> Self {
        PublishTicket { inner, route: None }
    }

    fn routed(
        inner: AppendTicket,
        slots: Vec<Slot>,
        live: Arc<LiveVersion>,
        topics: Vec<Arc<TopicHandle>>,
        kv: Vec<(String, Vec<u8>)>,
    ) -> Self {
        PublishTicket {
            inner,
            route: Some(Routed {
                slots,
                live,
                topics,
                kv,
            }),
        }
    }
}

impl std::future::Future for PublishTicket {
    type Output = Result<Vec<(u32, u64)>, StorageError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let r = match std::pin::Pin::new(&mut self.inner).poll(cx) {
            std::task::Poll::Pending => return std::task::Poll::Pending,
            std::task::Poll::Ready(r) => r.unwrap_or(Err(StorageError::ShutDown)),
        };
        let Some(route) = self.route.take() else {
            return std::task::Poll::Ready(r);
        };
        route.live.plugin.settle_kv(&route.kv);
        std::task::Poll::Ready(r.map(|positions| {
            route.live.note_decided(
                route
                    .topics
                    .iter()
                    .zip(&positions)
                    .map(|(t, (p, o))| (t.meta.name.as_str(), *p, *o)),
            );
            route
                .slots
                .iter()
                .map(|s| match s {
                    Slot::Stored(i) => positions[*i],
                    Slot::Dropped => DROPPED,
                })
                .collect()
        }))
    }
}

/// Longest topic or group name.
pub const MAX_NAME_LEN: usize = 249;

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
    pub fn new(storage: Storage, config: BrokerConfig, plugins: Arc<PluginRegistry>) -> Self {
        Broker {
            storage,
            config,
            groups: Mutex::new(HashMap::new()),
            plugins,
        }
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
        if partitions == 0 || partitions > self.config.max_partitions {
            return Err(WireError::new(
                ErrorCode::InvalidPartitions,
                format!(
                    "invalid partition count {partitions}: use 1 to {}",
                    self.config.max_partitions
                ),
            ));
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
        self.storage
            .delete_topic(name)
            .await
            .map_err(|e| e.to_wire())?;
        self.groups
            .lock()
            .expect("groups lock")
            .retain(|_, g| !g.topic.is_deleted());
        Ok(())
    }

    /// Describes one topic.
    pub fn describe_topic(&self, name: &str) -> Result<TopicInfo, WireError> {
        self.topic(name).map(|t| t.info())
    }

    /// Describes every topic.
    pub fn list_topics(&self) -> Vec<TopicInfo> {
        self.storage.topics().iter().map(|t| t.info()).collect()
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
        if let Some(live) = self.plugins.route_for(&topic.meta.name) {
            return self.publish_routed(topic, records, rr, live).await;
        }
        let n = topic.meta.partitions;
        let placed = records
            .into_iter()
            .map(|r| (partitioner::partition_of(&r, n, rr), r))
            .collect();
        self.storage
            .append(topic, placed)
            .await
            .map(PublishTicket::plain)
            .map_err(|e| e.to_wire())
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
