//! Every redb table the router keeps, in one place.
//!
//! The whole router is one redb file (`data/switchyard.redb`): one writer
//! thread then commits appends for every topic and partition in one
//! transaction with one fsync. `docs/storage.md` has the measurements.

use redb::TableDefinition;

/// Topic name -> JSON [`super::TopicMeta`]. Rarely written, so readability wins.
pub(crate) const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");

/// `(topic id, partition)` -> `(start offset, end offset, bytes, last timestamp ms)`.
pub(crate) const PARTITIONS: TableDefinition<(u32, u32), (u64, u64, u64, u64)> =
    TableDefinition::new("partitions");

/// `(topic id, partition, offset)` -> `timestamp ms (u64 BE) | encoded record`.
///
/// Topic ids, not names, key the log: a deleted and re-created topic never
/// sees the old topic's records, and deletion is one range removal.
pub(crate) const LOG: TableDefinition<(u32, u32, u64), &[u8]> = TableDefinition::new("log");

/// `(group, topic id, partition)` -> next offset the group will read.
pub(crate) const OFFSETS: TableDefinition<(&str, u32, u32), u64> =
    TableDefinition::new("group_offsets");

/// Router-wide counters such as the next topic id.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Key in [`META`] holding the next topic id to hand out.
pub(crate) const NEXT_TOPIC_ID: &str = "next_topic_id";

/// Plugin name -> JSON plugin record (binding, versions, history).
pub(crate) const PLUGINS: TableDefinition<&str, &[u8]> = TableDefinition::new("plugins");

/// Principal name -> JSON [`crate::auth::PrincipalRecord`] (token hash,
/// grants, quotas): the principals managed with `switchyard auth`.
pub(crate) const PRINCIPALS: TableDefinition<&str, &[u8]> = TableDefinition::new("principals");

/// Topic name -> `(group, partitions)`: which Raft group of a cluster of
/// several holds the topic, and its partitions when it was assigned (the
/// load the least-loaded choice counts). Kept in group 0 only; empty
/// elsewhere and on a single router.
pub(crate) const TOPIC_GROUPS: TableDefinition<&str, (u32, u32)> =
    TableDefinition::new("topic_groups");

/// `(plugin name, version)` -> the component's bytes.
pub(crate) const PLUGIN_WASM: TableDefinition<(&str, u32), &[u8]> =
    TableDefinition::new("plugin_wasm");

/// `(plugin name, version)` -> the component compiled for this build, so a
/// restart deserializes instead of compiling.
pub(crate) const PLUGIN_ARTIFACT: TableDefinition<(&str, u32), &[u8]> =
    TableDefinition::new("plugin_artifact");

/// `(plugin name, key)` -> value: each plugin's durable key/value store.
pub(crate) const PLUGIN_KV: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("plugin_kv");

/// `(plugin name, activation, topic id, partition)` -> `(offset, swap
/// latency µs)`: the first offset an activation (a deploy or rollback) of a
/// route plugin decided in that partition, written in the commit of that
/// record, so it is exactly as durable as the record.
pub(crate) const PLUGIN_CUTOVER: TableDefinition<(&str, u64, u32, u32), (u64, u64)> =
    TableDefinition::new("plugin_cutover");

/// `(topic id, group, partition)` -> the queue group's floor: every offset
/// below it is settled (acked, dead-lettered or expired).
pub(crate) const QUEUE_FLOOR: TableDefinition<(u32, &str, u32), u64> =
    TableDefinition::new("queue_floor");

/// `(topic id, group, partition, offset)` -> `(state, attempts, due ms)` for
/// queue messages at or above the floor that are not simply "not yet
/// delivered": in flight (due = visibility deadline), waiting for a retry
/// (due = when it becomes ready again) or settled out of order.
pub(crate) const QUEUE: TableDefinition<(u32, &str, u32, u64), super::QueueEntryState> =
    TableDefinition::new("queue_state");

/// `(topic id, message id)` -> `(partition, offset, append ms)`: the
/// idempotent-publish window.
pub(crate) const DEDUP: TableDefinition<(u32, &[u8]), (u32, u64, u64)> =
    TableDefinition::new("dedup");

/// `(topic id, append ms, partition, offset)` -> message id: the dedup
/// window in time order, so expiry finds the ids to forget without
/// holding them in memory.
pub(crate) const DEDUP_EXPIRY: TableDefinition<(u32, u64, u32, u64), &[u8]> =
    TableDefinition::new("dedup_expiry");

/// `(topic id, feed id, partition, offset)`: a fan-out-on-write reference,
/// pushed into a following feed's inbox when the record is appended.
pub(crate) const INBOX: TableDefinition<(u32, u32, u32, u64), ()> = TableDefinition::new("inbox");

/// `(topic id, key hash, partition, offset)`: the per-key log of records
/// fanned out on read, merged by each following feed when it reads.
pub(crate) const KEY_INDEX: TableDefinition<(u32, u64, u32, u64), ()> =
    TableDefinition::new("key_index");

/// `(topic id, feed name)` -> JSON [`super::FeedDef`].
pub(crate) const FEEDS: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("feeds");

/// `(topic id, group, partition)` -> the queue group's first-delivery mark:
/// every offset from the floor up to it was delivered at least once (or has
/// its own `queue_state` row), so first deliveries in offset order need no
/// row of their own.
pub(crate) const QUEUE_MARK: TableDefinition<(u32, &str, u32), u64> =
    TableDefinition::new("queue_mark");

/// `(topic id, group, partition, chunk)` -> settled offsets at or above the
/// floor within offsets `chunk * 4096 ..`, as little-endian `u16` pairs
/// `(start, end)` relative to the chunk (see `delivery::ranges`).
pub(crate) const QUEUE_DONE: TableDefinition<(u32, &str, u32, u64), &[u8]> =
    TableDefinition::new("queue_done");

/// Raft's applied position and membership on a cluster node (`applied`,
/// `membership`), written with the rows they cover; node-local, so never
/// in a redo or a snapshot.
pub(crate) const RAFT_APPLIED: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_applied");
