//! Records a route plugin sends to a topic of another Raft group.
//!
//! On a cluster of several groups, a publish is one commit in its topic's
//! group, and no commit spans two groups. A record routed to a topic that
//! another group holds is therefore committed, in the same commit as the
//! rest of its batch, to this group's **outbox**: a one-partition topic
//! `__outbox.<group>`, each record carrying its target in the
//! `x-outbox-to` header. The group's leader forwards the outbox, in order,
//! to the targets' leaders through an ordinary client of the cluster, and
//! records how far it got as a consumer-group offset (`__outbox-forwarder`),
//! a replicated commit. After a failover the new leader resumes from that
//! offset, so a record is forwarded at least once; each goes out with its
//! publisher's message id, or one made from its outbox offset
//! (`outbox.<group>.<offset>`), so the target's dedup window (2 minutes
//! by default) makes a second forward land once.
//!
//! The publisher's acknowledgement of a record routed elsewhere means
//! "durable, and will appear in the target": the record's position in
//! the outbox, not in the target. That is the contract of a
//! transactional outbox (docs/cluster.md, *What one commit may touch*).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::client::{Client, ClientConfig, ClientError};
use crate::protocol::{ErrorCode, RawRecord, Record, WireError};
use crate::storage::{ReadLimit, Storage, StorageError, TopicHandle};

/// The prefix of every group's outbox topic; reserved.
pub const PREFIX: &str = "__outbox.";

/// The header naming a record's target topic while it is in the outbox.
pub const TO_HEADER: &str = "x-outbox-to";

/// The consumer group whose offset is how far the outbox was forwarded.
const FORWARDER: &str = "__outbox-forwarder";

/// How long an unforwarded record is kept in the outbox: a target group
/// unavailable for longer loses it.
const RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// Records read from the outbox per round, at most.
const ROUND: usize = 4096;

/// Records per batch sent to a target; a round's batches are in flight
/// together, stored in the order they were sent.
const BATCH: usize = 512;

/// The outbox topic of group `group`.
pub fn name(group: u32) -> String {
    format!("{PREFIX}{group}")
}

/// Whether `topic` is a name reserved for the outboxes (one group's, or
/// any other under the prefix).
pub fn is_outbox(topic: &str) -> bool {
    topic.starts_with(PREFIX)
}

/// The group whose outbox `topic` is, if it is one.
pub fn group_of(topic: &str) -> Option<u32> {
    topic.strip_prefix(PREFIX)?.parse().ok()
}

/// The refusal of a client's create, delete or assignment of a name that
/// is reserved for the outboxes.
pub fn reserved(topic: &str) -> Result<(), WireError> {
    if is_outbox(topic) {
        return Err(WireError::new(
            ErrorCode::InvalidTopicName,
            format!(
                "topic names starting with '{PREFIX}' are reserved for the cluster's outboxes \
                 (records routed to another group's topic)"
            ),
        ));
    }
    Ok(())
}

/// Records in group `group`'s outbox not yet forwarded; `None` where it
/// has no outbox.
pub fn pending(storage: &Storage, group: u32) -> Option<u64> {
    let topic = storage.topic(&name(group))?;
    let end = topic.partitions().first()?.end;
    let done = storage
        .committed_offset(FORWARDER, topic.meta.id, 0)
        .ok()?
        .unwrap_or(0);
    Some(end.saturating_sub(done))
}

/// `record` as it goes into the outbox, bound for `target`.
pub fn bound_for(record: &RawRecord, target: &str) -> Result<RawRecord, String> {
    crate::broker::with_headers(record, vec![(TO_HEADER.into(), target.as_bytes().to_vec())])
}

/// Group `group`'s outbox topic, made if it does not exist yet (a
/// replicated commit, once in the group's life).
pub async fn open(storage: &Storage, group: u32) -> Result<Arc<TopicHandle>, StorageError> {
    let name = name(group);
    if let Some(t) = storage.topic(&name) {
        return Ok(t);
    }
    storage.create_topic(&name, 1, RETENTION_MS, 0).await
}

/// One record read from the outbox, ready to forward.
struct Outgoing {
    offset: u64,
    target: String,
    record: Record,
}

/// `raw` at `offset` of group `group`'s outbox as it is forwarded: its
/// target, and the record without the header naming it, with a message
/// id (its own, or one made from its place in the outbox).
fn outgoing(group: u32, offset: u64, raw: RawRecord) -> Option<Outgoing> {
    let target = String::from_utf8(raw.header(TO_HEADER)?.to_vec()).ok()?;
    let mut record = raw.to_record();
    record.headers.retain(|(n, _)| n != TO_HEADER);
    if record.message_id().is_none() {
        record = record.with_message_id(format!("outbox.{group}.{offset}"));
    }
    Some(Outgoing {
        offset,
        target,
        record,
    })
}

/// Forwards group `group`'s outbox until `shutdown`: the task of the
/// group's leader. `client` reaches the cluster (every group's leader).
pub async fn forward(
    storage: Storage,
    group: u32,
    client: ClientConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let run = async {
        let topic = loop {
            match open(&storage, group).await {
                Ok(t) => break t,
                Err(e) => {
                    tracing::warn!(error = %e, "the outbox could not be opened; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        Forwarder {
            storage,
            group,
            topic,
            config: client,
            client: None,
        }
        .run()
        .await
    };
    tokio::select! {
        () = run => {}
        _ = shutdown.wait_for(|s| *s) => {}
    }
}

struct Forwarder {
    storage: Storage,
    group: u32,
    topic: Arc<TopicHandle>,
    config: ClientConfig,
    client: Option<Client>,
}

impl Forwarder {
    async fn run(mut self) {
        let id = self.topic.meta.id;
        let mut changed = self.topic.watch();
        let mut from = match self.storage.committed_offset(FORWARDER, id, 0) {
            Ok(o) => o.unwrap_or(0),
            Err(e) => {
                tracing::error!(error = %e, "the outbox's position could not be read");
                return;
            }
        };
        let mut pause = Duration::from_millis(100);
        loop {
            changed.borrow_and_update();
            let start = self.topic.partitions().first().map_or(0, |p| p.start);
            if from < start {
                tracing::warn!(
                    lost = start - from,
                    "outbox records expired before they were forwarded"
                );
                from = start;
            }
            let batch = match self.read(from) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "the outbox could not be read");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            let Some(last) = batch.last().map(|o| o.offset) else {
                if changed.changed().await.is_err() {
                    return;
                }
                continue;
            };
            match self.send(batch).await {
                Ok(()) => {
                    pause = Duration::from_millis(100);
                    from = last + 1;
                    let committed = self
                        .storage
                        .commit_offset(FORWARDER.into(), id, 0, from)
                        .await;
                    if let Err(e) = committed {
                        tracing::warn!(error = %e, "the outbox's position was not recorded");
                    }
                }
                Err(e) => {
                    tracing::info!(error = %e, ?pause, "outbox records not forwarded yet; trying again");
                    self.client = None;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Up to [`ROUND`] records from `from` on.
    fn read(&self, from: u64) -> Result<Vec<Outgoing>, StorageError> {
        let mut out = Vec::new();
        let limit = ReadLimit {
            max_records: ROUND,
            max_bytes: 8 << 20,
        };
        let group = self.group;
        self.storage
            .scan(self.topic.meta.id, 0, from, limit, |offset, _, bytes| {
                let raw = RawRecord::new(bytes::Bytes::copy_from_slice(bytes));
                match raw.ok().and_then(|raw| outgoing(group, offset, raw)) {
                    Some(o) => out.push(o),
                    None => tracing::warn!(offset, "an outbox record without a target; skipped"),
                }
            })?;
        Ok(out)
    }

    /// Publishes `batch` to its targets: each run of records for one
    /// target (up to [`BATCH`]) as one batch, all of them in flight at once
    /// and stored in order. A target that no longer exists loses its
    /// records (as a route to a deleted topic would); any other failure is
    /// returned, and the whole batch is sent again.
    async fn send(&mut self, batch: Vec<Outgoing>) -> Result<(), ClientError> {
        if self.client.is_none() {
            self.client = Some(Client::connect(self.config.clone()).await?);
        }
        let client = self.client.as_ref().expect("connected above");
        let mut rest = batch.into_iter().peekable();
        let mut in_flight = Vec::new();
        while let Some(first) = rest.next() {
            let target = first.target;
            let mut records = vec![first.record];
            while records.len() < BATCH
                && let Some(next) = rest.next_if(|o| o.target == target)
            {
                records.push(next.record);
            }
            let n = records.len();
            let acks = client.queue_batch(&target, records).await;
            in_flight.push((target, n, acks));
        }
        for (target, n, acks) in in_flight {
            let stored = match acks {
                Ok(acks) => acks.await,
                Err(e) => Err(e),
            };
            match stored {
                Ok(_) => {}
                Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => {
                    tracing::warn!(topic = %target, records = n, "outbox records for a topic that no longer exists; dropped");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
