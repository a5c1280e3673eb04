//! Prometheus metrics: `GET /metrics` on `--metrics` (plain HTTP).
//!
//! Recording costs the hot paths one relaxed atomic add per batch or
//! delivery frame (per-topic counters live on the topic), and one
//! histogram observation per batch, commit or sync. Everything else (queue
//! depths, lag, plugin state, file sizes) is read from the router's own
//! state when the endpoint is scraped. `docs/metrics.md` lists every
//! metric.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use super::Shared;
use crate::plugins::loaded::FAILURE_KINDS;

/// Why a connection or request was refused by a limit, as labelled.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    /// `max_connections`.
    Connections = 0,
    /// `max_connections_per_address`.
    ConnectionsPerAddress,
    /// `max_handshakes_per_address`.
    HandshakesPerAddress,
    /// A principal over its publish quota (throttled or refused).
    Quota,
}

const REFUSALS: [&str; 4] = [
    "max_connections",
    "max_connections_per_address",
    "max_handshakes_per_address",
    "quota",
];

/// Counters of the QUIC endpoint and the publish path.
#[derive(Debug)]
pub(crate) struct ServerStats {
    pub(crate) connections: AtomicI64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) streams: AtomicI64,
    pub(crate) handshake_failures: AtomicU64,
    refused: [AtomicU64; REFUSALS.len()],
}

impl Default for ServerStats {
    fn default() -> Self {
        ServerStats {
            connections: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            streams: AtomicI64::new(0),
            handshake_failures: AtomicU64::new(0),
            refused: Default::default(),
        }
    }
}

impl ServerStats {
    /// Counts a refusal.
    pub(crate) fn refuse(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Which gauge an [`Open`] holds up.
pub(crate) type Gauge = fn(&ServerStats) -> &AtomicI64;

/// Keeps a gauge up while alive (an open connection or stream).
pub(crate) struct Open(Arc<Shared>, Gauge);

impl Open {
    pub(crate) fn new(shared: &Arc<Shared>, g: Gauge) -> Self {
        g(&shared.stats).fetch_add(1, Ordering::Relaxed);
        Open(shared.clone(), g)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        (self.1)(&self.0.stats).fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads the router's state at each scrape.
struct RouterCollector {
    shared: Weak<Shared>,
}

impl std::fmt::Debug for RouterCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouterCollector")
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: a descriptor, then each label set's value.
fn family<'a, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> std::fmt::Result {
    let mut e = enc.encode_descriptor(name, help, unit, kind)?;
    for (labels, m) in rows {
        if labels.is_empty() {
            // A metric without labels is written without `{}`.
            return m.encode(e);
        }
        m.encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The data directory's files and the free space beside them, on every
/// node (a follower's disk fills as surely as its leader's): `files` are
/// `(label, file name)`.
fn disk_families(
    enc: &mut DescriptorEncoder,
    dir: &std::path::Path,
    files: &[(&str, &str)],
) -> std::fmt::Result {
    let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len() as i64);
    family(
        enc,
        "switchyard_storage_file",
        "Bytes of the data directory's files: the database, and the journal (a single router) or the Raft log (a cluster node).",
        Some(&Unit::Bytes),
        MetricType::Gauge,
        files
            .iter()
            .map(|(label, name)| (vec![("file", *label)], gauge(size(name)))),
    )?;
    use crate::storage::disk::Disk as _;
    if let Ok(free) = crate::storage::disk::OsDisk.free_bytes(dir) {
        family(
            enc,
            "switchyard_disk_free",
            "Free bytes on the data directory's file system.",
            Some(&Unit::Bytes),
            MetricType::Gauge,
            [(vec![], gauge(free as i64))],
        )?;
    }
    if let Some(dropped) = udp_receive_buffer_errors() {
        family(
            enc,
            "switchyard_udp_receive_buffer_errors",
            "Datagrams the host's kernel dropped because a UDP socket's receive buffer was full (all sockets of the host: /proc/net/snmp RcvbufErrors). QUIC recovers each with a retransmission, at a cost in latency.",
            None,
            MetricType::Counter,
            [(vec![], counter(dropped))],
        )?;
    }
    Ok(())
}

/// The kernel's count of UDP datagrams dropped for a full receive buffer
/// (`Udp: RcvbufErrors` in `/proc/net/snmp`), where there is one.
fn udp_receive_buffer_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    parse_rcvbuf_errors(&snmp)
}

/// `RcvbufErrors` of the `Udp:` header and value lines of `snmp`.
fn parse_rcvbuf_errors(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// The files [`disk_families`] reports for a router: a cluster node's
/// Raft log stands where a single router's journal does.
const ROUTER_FILES: [(&str, &str); 2] = [
    ("database", "switchyard.redb"),
    ("journal", "switchyard.journal"),
];
const NODE_FILES: [(&str, &str); 2] = [("database", "switchyard.redb"), ("raft_log", "raft.redb")];

/// One Raft group as a node sees it, for [`cluster_families`].
struct GroupView<'a> {
    /// The `group` label's value; none on a node of one group (whose
    /// series carry no group label).
    group: Option<String>,
    /// `cluster_status`'s JSON for the group.
    status: &'a serde_json::Value,
    /// Whether this node serves the group's clients as its leader.
    serving: bool,
}

/// The groups of a node's `status` (`Control::status`'s JSON): the one
/// it describes, or each of its `groups` on a node of several, with a
/// `group` label. `serving` is whether the node serves group 0 (or its
/// one group); another group is served where it is led.
fn group_views(s: &serde_json::Value, serving: bool) -> Vec<GroupView<'_>> {
    let Some(groups) = s["groups"].as_array() else {
        return vec![GroupView {
            group: None,
            status: s,
            serving,
        }];
    };
    groups
        .iter()
        .map(|g| {
            let id = g["group"].as_u64().unwrap_or(0);
            GroupView {
                group: Some(id.to_string()),
                status: g,
                serving: if id == 0 {
                    serving
                } else {
                    g["leader"].is_u64() && g["leader"] == g["node"]
                },
            }
        })
        .collect()
}

/// A cluster node's families: its own position in each group on every
/// node, and the members and their lag where it leads (`serving`), the
/// only node that knows them. On a node of several groups every series
/// carries a `group` label.
fn cluster_families(enc: &mut DescriptorEncoder, views: &[GroupView]) -> std::fmt::Result {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as i64;
    fn labels<'a>(v: &'a GroupView, mut l: Labels<'a>) -> Labels<'a> {
        if let Some(g) = &v.group {
            l.insert(0, ("group", g.as_str()));
        }
        l
    }
    let each =
        |name, help, value: &dyn Fn(&GroupView) -> Option<i64>, enc: &mut DescriptorEncoder| {
            let rows: Vec<_> = views
                .iter()
                .filter_map(|v| Some((labels(v, vec![]), gauge(value(v)?))))
                .collect();
            if rows.is_empty() {
                return Ok(());
            }
            family(enc, name, help, None, MetricType::Gauge, rows)
        };
    each(
        "switchyard_cluster_term",
        "The Raft term this node is in (each election makes a new one).",
        &|v| Some(n(&v.status["term"])),
        enc,
    )?;
    each(
        "switchyard_cluster_leader",
        "The node id of the leader as this node knows it (0: none known).",
        &|v| Some(n(&v.status["leader"])),
        enc,
    )?;
    each(
        "switchyard_cluster_serving",
        "1 while this node serves clients as the leader, 0 while it follows (and redirects them).",
        &|v| Some(v.serving as i64),
        enc,
    )?;
    each(
        "switchyard_cluster_last_log_index",
        "The position of the last entry in this node's Raft log.",
        &|v| Some(n(&v.status["last_log"])),
        enc,
    )?;
    each(
        "switchyard_cluster_applied_index",
        "The position of the last entry this node applied to its tables.",
        &|v| Some(n(&v.status["committed"])),
        enc,
    )?;
    each(
        "switchyard_cluster_quorum_ack_age_milliseconds",
        "Time since a majority last answered the leader (it stops serving past the step-down time).",
        &|v| v.status["quorum_ack_ms"].as_u64().map(|ms| ms as i64),
        enc,
    )?;
    let led: Vec<(&GroupView, Vec<(String, &serde_json::Value)>)> = views
        .iter()
        .filter(|v| v.serving)
        .map(|v| {
            let nodes = v.status["nodes"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            (v, nodes.iter().map(|m| (m["id"].to_string(), m)).collect())
        })
        .collect();
    if led.is_empty() {
        return Ok(());
    }
    family(
        enc,
        "switchyard_cluster_member",
        "1 per member, by node id and role (leader, follower, learner).",
        None,
        MetricType::Gauge,
        led.iter().flat_map(|(v, members)| {
            members.iter().map(|(id, m)| {
                let role = m["role"].as_str().unwrap_or("");
                (
                    labels(v, vec![("node", id.as_str()), ("role", role)]),
                    gauge(1),
                )
            })
        }),
    )?;
    family(
        enc,
        "switchyard_cluster_behind_entries",
        "Log entries a member's log is behind the leader's (absent while the leader has no answer from it).",
        None,
        MetricType::Gauge,
        led.iter().flat_map(|(v, members)| {
            members
                .iter()
                .filter(|(_, m)| m["behind"].is_u64())
                .map(|(id, m)| {
                    (
                        labels(v, vec![("node", id.as_str())]),
                        gauge(n(&m["behind"])),
                    )
                })
        }),
    )
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: i64) -> ConstGauge<i64> {
    ConstGauge::new(v)
}

impl Collector for RouterCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        let broker = &shared.broker;
        let storage = broker.storage();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let topics = {
            let mut t = storage.topics();
            t.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
            t
        };
        let bytes = Some(&Unit::Bytes);

        // Topics.
        let per_topic = |f: &dyn Fn(&crate::storage::TopicHandle) -> u64| {
            topics
                .iter()
                .map(|t| (vec![("topic", t.meta.name.as_str())], counter(f(t))))
                .collect::<Vec<_>>()
        };
        family(
            &mut enc,
            "switchyard_published_messages",
            "Records accepted on a topic (published to it by name).",
            None,
            MetricType::Counter,
            per_topic(&|t| load(&t.stats.published)),
        )?;
        family(
            &mut enc,
            "switchyard_published",
            "Bytes of records accepted on a topic.",
            bytes,
            MetricType::Counter,
            per_topic(&|t| load(&t.stats.published_bytes)),
        )?;
        family(
            &mut enc,
            "switchyard_delivered_messages",
            "Records sent to stream, feed and queue subscribers of a topic.",
            None,
            MetricType::Counter,
            per_topic(&|t| load(&t.stats.delivered)),
        )?;
        family(
            &mut enc,
            "switchyard_retention_deleted_messages",
            "Records deleted by retention.",
            None,
            MetricType::Counter,
            per_topic(&|t| load(&t.stats.retention_deleted)),
        )?;
        family(
            &mut enc,
            "switchyard_shed_messages",
            "Records shed by the backlog limit.",
            None,
            MetricType::Counter,
            per_topic(&|t| load(&t.shed)),
        )?;
        let refused: Vec<(String, String, u64)> = topics
            .iter()
            .flat_map(|t| {
                let r = t.stats.refused.lock().expect("refused lock").clone();
                r.into_iter().map(|(code, n)| {
                    let name = crate::protocol::ErrorCode::from_u16(code)
                        .name()
                        .to_string();
                    (t.meta.name.clone(), name, n)
                })
            })
            .collect();
        family(
            &mut enc,
            "switchyard_publish_refused",
            "Publish batches (or parts) refused, by error code.",
            None,
            MetricType::Counter,
            refused.iter().map(|(t, c, n)| {
                (
                    vec![("topic", t.as_str()), ("code", c.as_str())],
                    counter(*n),
                )
            }),
        )?;
        let mut partitions = Vec::new();
        for t in &topics {
            for (p, info) in t.partitions().iter().enumerate() {
                partitions.push((t.meta.name.as_str(), p.to_string(), *info));
            }
        }
        family(
            &mut enc,
            "switchyard_partition_end_offset",
            "Next offset to be written in a partition.",
            None,
            MetricType::Gauge,
            partitions.iter().map(|(t, p, i)| {
                (
                    vec![("topic", *t), ("partition", p.as_str())],
                    gauge(i.end as i64),
                )
            }),
        )?;
        family(
            &mut enc,
            "switchyard_partition_start_offset",
            "Oldest retained offset of a partition.",
            None,
            MetricType::Gauge,
            partitions.iter().map(|(t, p, i)| {
                (
                    vec![("topic", *t), ("partition", p.as_str())],
                    gauge(i.start as i64),
                )
            }),
        )?;
        family(
            &mut enc,
            "switchyard_partition",
            "Bytes of records retained in a partition.",
            bytes,
            MetricType::Gauge,
            partitions.iter().map(|(t, p, i)| {
                (
                    vec![("topic", *t), ("partition", p.as_str())],
                    gauge(i.bytes as i64),
                )
            }),
        )?;

        // Stream consumer groups: lag per partition.
        let groups = broker.stream_groups();
        let mut lag = Vec::new();
        for g in &groups {
            for (p, (_, _, n)) in g.lag().into_iter().enumerate() {
                lag.push((g, p.to_string(), n));
            }
        }
        family(
            &mut enc,
            "switchyard_consumer_lag_messages",
            "Records a stream consumer group has yet to commit in a partition.",
            None,
            MetricType::Gauge,
            lag.iter().map(|(g, p, n)| {
                (
                    vec![
                        ("topic", g.topic.meta.name.as_str()),
                        ("group", &*g.name),
                        ("partition", p.as_str()),
                    ],
                    gauge(*n as i64),
                )
            }),
        )?;

        // Queue groups.
        let queues = broker.queue_groups(None);
        let depth: Vec<_> = queues.iter().map(|q| (q, q.depth())).collect();
        let q_labels = |q: &crate::delivery::queue::QueueGroup| -> (String, String) {
            (q.topic.meta.name.clone(), q.name.to_string())
        };
        let names: Vec<(String, String)> = queues.iter().map(|q| q_labels(q)).collect();
        let rows = |f: &dyn Fn(usize) -> i64| {
            names
                .iter()
                .enumerate()
                .map(|(i, (t, g))| {
                    (
                        vec![("topic", t.as_str()), ("group", g.as_str())],
                        gauge(f(i)),
                    )
                })
                .collect::<Vec<_>>()
        };
        {
            let mut e = enc.encode_descriptor(
                "switchyard_queue_depth_messages",
                "Messages of a queue group by state: ready, in_flight (delivered, unacked), delayed (waiting for a delay or a retry).",
                None,
                MetricType::Gauge,
            )?;
            for (i, (t, g)) in names.iter().enumerate() {
                let (ready, in_flight, delayed) = depth[i].1;
                for (state, v) in [
                    ("ready", ready),
                    ("in_flight", in_flight),
                    ("delayed", delayed),
                ] {
                    gauge(v as i64).encode(e.encode_family(&vec![
                        ("topic", t.as_str()),
                        ("group", g.as_str()),
                        ("state", state),
                    ])?)?;
                }
            }
        }
        family(
            &mut enc,
            "switchyard_queue_backlog_messages",
            "Unsettled messages of a queue group (what backlog_limit counts).",
            None,
            MetricType::Gauge,
            rows(&|i| queues[i].backlog() as i64),
        )?;
        for (name, help, f) in [
            (
                "switchyard_queue_acks",
                "Messages acknowledged.",
                (|q: &crate::delivery::queue::QueueGroup| q.stats.acked.load(Ordering::Relaxed))
                    as fn(&crate::delivery::queue::QueueGroup) -> u64,
            ),
            (
                "switchyard_queue_nacks",
                "Negative acknowledgements.",
                |q| q.stats.nacked.load(Ordering::Relaxed),
            ),
            (
                "switchyard_queue_redeliveries",
                "Messages scheduled for another delivery (nack or visibility timeout).",
                |q| q.stats.retried.load(Ordering::Relaxed),
            ),
            (
                "switchyard_queue_visibility_timeouts",
                "Deliveries whose visibility timeout passed unacknowledged.",
                |q| q.stats.timed_out.load(Ordering::Relaxed),
            ),
            (
                "switchyard_queue_dead_lettered",
                "Messages moved to the dead-letter topic.",
                |q| q.stats.dead_lettered.load(Ordering::Relaxed),
            ),
            (
                "switchyard_queue_expired",
                "Messages dropped (or dead-lettered) by TTL.",
                |q| q.stats.expired.load(Ordering::Relaxed),
            ),
        ] {
            family(
                &mut enc,
                name,
                help,
                None,
                MetricType::Counter,
                names.iter().zip(&queues).map(|((t, g), q)| {
                    (
                        vec![("topic", t.as_str()), ("group", g.as_str())],
                        counter(f(q)),
                    )
                }),
            )?;
        }
        // Dead-letter topics of the topics with queue groups.
        let mut dlqs: Vec<(String, String, u64)> = Vec::new();
        for q in &queues {
            let name = q.topic.meta.name.clone();
            if dlqs.iter().any(|(t, _, _)| *t == name) {
                continue;
            }
            let (dlq, size) = broker.dlq_of(&q.topic);
            dlqs.push((name, dlq, size));
        }
        family(
            &mut enc,
            "switchyard_dlq_messages",
            "Dead letters held for a topic (its dead-letter topic's retained records).",
            None,
            MetricType::Gauge,
            dlqs.iter().map(|(t, d, n)| {
                (
                    vec![("topic", t.as_str()), ("dlq", d.as_str())],
                    gauge(*n as i64),
                )
            }),
        )?;

        // Storage.
        let st = storage.stats();
        family(
            &mut enc,
            "switchyard_commit_records",
            "Records per group commit.",
            None,
            MetricType::Histogram,
            [(vec![], st.commit_records.clone())],
        )?;
        for (name, help, h) in [
            (
                "switchyard_commit",
                "Wall time of a group commit, applied and durable.",
                &st.commit_seconds,
            ),
            (
                "switchyard_journal_sync",
                "Appending and syncing one write-ahead journal entry.",
                &st.journal_sync_seconds,
            ),
            (
                "switchyard_database_sync",
                "A durable database commit (redb's fsyncs).",
                &st.database_sync_seconds,
            ),
            (
                "switchyard_checkpoint",
                "A journal checkpoint.",
                &st.checkpoint_seconds,
            ),
        ] {
            family(
                &mut enc,
                name,
                help,
                Some(&Unit::Seconds),
                MetricType::Histogram,
                [(vec![], h.clone())],
            )?;
        }
        let files = if shared.config.replica.is_some() {
            NODE_FILES
        } else {
            ROUTER_FILES
        };
        disk_families(&mut enc, &shared.config.data, &files)?;
        if let Some(r) = &shared.config.replica {
            let status = r.control.status();
            cluster_families(&mut enc, &group_views(&status, true))?;
            family(
                &mut enc,
                "switchyard_cluster_replicate",
                "A data commit from proposing it until a majority holds it durably and it is applied here.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
                [(vec![], st.replicate_seconds.clone())],
            )?;
        }
        family(
            &mut enc,
            "switchyard_storage_failed",
            "1 once a sync failed and the router acknowledges no more writes.",
            None,
            MetricType::Gauge,
            [(vec![], gauge(storage.failed().is_some() as i64))],
        )?;

        // End to end, per topic.
        let s = &shared.stats;
        family(
            &mut enc,
            "switchyard_publish_to_ack",
            "From a publish batch's arrival to its durable ack.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            topics.iter().map(|t| {
                (
                    vec![("topic", t.meta.name.as_str())],
                    t.stats.publish_to_ack.clone(),
                )
            }),
        )?;
        family(
            &mut enc,
            "switchyard_publish_to_deliver",
            "From a record's append (ms clock) to its delivery, for deliveries that bring a stream subscriber to the end of a partition.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            topics.iter().map(|t| {
                (
                    vec![("topic", t.meta.name.as_str())],
                    t.stats.publish_to_deliver.clone(),
                )
            }),
        )?;

        // Plugins.
        let plugins = broker.plugins().snapshot();
        let bound: Vec<_> = plugins
            .iter()
            .map(|(b, live, swaps)| -> Bound {
                (
                    b.name.to_string(),
                    b.hook.name(),
                    b.topic.clone(),
                    live.clone(),
                    *swaps,
                )
            })
            .collect();
        type Bound = (
            String,
            &'static str,
            String,
            Option<Arc<crate::plugins::LiveVersion>>,
            u64,
        );
        fn plabels(b: &Bound) -> Labels<'_> {
            vec![
                ("plugin", b.0.as_str()),
                ("hook", b.1),
                ("topic", b.2.as_str()),
            ]
        }
        family(
            &mut enc,
            "switchyard_plugin_live_version",
            "The version a plugin binding runs (0: none).",
            None,
            MetricType::Gauge,
            bound.iter().map(|b| {
                (
                    plabels(b),
                    gauge(b.3.as_ref().map_or(0, |l| l.version as i64)),
                )
            }),
        )?;
        family(
            &mut enc,
            "switchyard_plugin_swaps",
            "Activations of a binding (deploys and rollbacks).",
            None,
            MetricType::Counter,
            bound.iter().map(|b| (plabels(b), counter(b.4))),
        )?;
        let live: Vec<_> = bound.iter().filter(|b| b.3.is_some()).collect();
        family(
            &mut enc,
            "switchyard_plugin_calls",
            "Calls of the live version (one per batch of up to 256 messages).",
            None,
            MetricType::Counter,
            live.iter().map(|b| {
                let l = b.3.as_ref().expect("filtered");
                (plabels(b), counter(load(&l.plugin.stats.calls)))
            }),
        )?;
        {
            let mut e = enc.encode_descriptor(
                "switchyard_plugin_failures",
                "Failed (or not made) calls of the live version, by kind.",
                None,
                MetricType::Counter,
            )?;
            for b in &live {
                let l = b.3.as_ref().expect("filtered");
                for (k, kind) in FAILURE_KINDS.iter().enumerate() {
                    let mut labels = plabels(b);
                    labels.push(("kind", kind));
                    counter(load(&l.plugin.stats.failures_by_kind[k]))
                        .encode(e.encode_family(&labels)?)?;
                }
            }
        }
        {
            // Call times from the version's own histogram, in seconds.
            let bounds_us: Vec<u64> = (0..16).map(|i| 10u64 << i).collect();
            let mut e = enc.encode_descriptor(
                "switchyard_plugin_call",
                "Call time of the live version.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for b in &live {
                let l = b.3.as_ref().expect("filtered");
                let (counts, sum_us, n) = l.plugin.stats.call_time_buckets(&bounds_us);
                let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(counts.len() + 1);
                let mut below = 0;
                for (bound, c) in bounds_us.iter().zip(counts) {
                    buckets.push((*bound as f64 / 1e6, c - below));
                    below = c;
                }
                buckets.push((f64::MAX, n - below));
                e.encode_family(&plabels(b))?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum_us / 1e6,
                        n,
                        &buckets,
                        None,
                    )?;
            }
        }

        // Connections.
        family(
            &mut enc,
            "switchyard_connections",
            "Open client connections.",
            None,
            MetricType::Gauge,
            [(vec![], gauge(s.connections.load(Ordering::Relaxed)))],
        )?;
        family(
            &mut enc,
            "switchyard_connections_opened",
            "Client connections accepted (handshake done).",
            None,
            MetricType::Counter,
            [(vec![], counter(load(&s.connections_total)))],
        )?;
        family(
            &mut enc,
            "switchyard_streams",
            "Open streams (publish, subscribe, control).",
            None,
            MetricType::Gauge,
            [(vec![], gauge(s.streams.load(Ordering::Relaxed)))],
        )?;
        family(
            &mut enc,
            "switchyard_handshake_failures",
            "Connections that failed their QUIC/TLS handshake or Hello.",
            None,
            MetricType::Counter,
            [(vec![], counter(load(&s.handshake_failures)))],
        )?;
        family(
            &mut enc,
            "switchyard_refused",
            "Connections and requests refused by a limit, by limit.",
            None,
            MetricType::Counter,
            REFUSALS
                .iter()
                .zip(&s.refused)
                .map(|(why, n)| (vec![("limit", *why)], counter(load(n)))),
        )?;
        Ok(())
    }
}

/// The registry behind `/metrics`.
pub(crate) fn registry(shared: &Arc<Shared>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(RouterCollector {
        shared: Arc::downgrade(shared),
    }));
    r
}

/// The text exposition of `registry`.
pub(crate) fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        let _ = writeln!(out, "# encoding failed");
    }
    out
}

/// Whether a bearer token may read metrics (a `cluster-admin` principal's).
type Admits = Box<dyn Fn(&str) -> bool + Send + Sync>;

struct Endpoint {
    registry: Registry,
    admits: Admits,
    /// Bound beyond loopback: a bearer token that `admits` accepts is
    /// required.
    guarded: bool,
}

async fn scrape(State(ep): State<Arc<Endpoint>>, headers: HeaderMap) -> Response {
    if ep.guarded {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !token.is_some_and(|t| (ep.admits)(t.trim())) {
            return unauthorized();
        }
    }
    exposition(render(&ep.registry))
}

/// Serves `registry` at `/metrics` on `listener` until `stop`; bound
/// beyond loopback, only to tokens `admits` accepts.
async fn serve_registry(
    listener: tokio::net::TcpListener,
    registry: Registry,
    admits: Admits,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let guarded = listener
        .local_addr()
        .map(|a: SocketAddr| !a.ip().is_loopback())
        .unwrap_or(true);
    let ep = Arc::new(Endpoint {
        registry,
        admits,
        guarded,
    });
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(ep);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}

/// Serves the router's `/metrics` on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let registry = registry(&shared);
    let weak = Arc::downgrade(&shared);
    drop(shared);
    let admits: Admits = Box::new(move |token| {
        weak.upgrade().is_some_and(|shared| {
            shared
                .auth
                .authenticate(Some(token), None)
                .is_ok_and(|(p, _)| p.may(crate::auth::Class::ClusterAdmin, "*", ""))
        })
    });
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    serve_registry(listener, registry, admits, stop).await;
}

/// What a following cluster node's `/metrics` reads at each scrape.
pub(crate) struct FollowerMetrics {
    /// The cluster as the node sees it (`cluster_status`'s JSON).
    pub status: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// The node's data directory, for its files and free space.
    pub data: std::path::PathBuf,
    /// Whether a bearer token may read metrics (`cluster-admin`), asked
    /// only when the endpoint is bound beyond loopback.
    pub admits: Admits,
}

/// Reads a follower's state at each scrape.
struct FollowerCollector {
    status: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    data: std::path::PathBuf,
}

impl std::fmt::Debug for FollowerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FollowerCollector")
    }
}

impl Collector for FollowerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let status = (self.status)();
        cluster_families(&mut enc, &group_views(&status, false))?;
        disk_families(&mut enc, &self.data, &NODE_FILES)
    }
}

/// Serves `/metrics` for a cluster node while it follows, so a scraper
/// of every node sees every node (a follower's router is not running):
/// the node's own cluster families, `switchyard_cluster_serving 0`, and
/// its disk.
pub(crate) async fn serve_follower(
    listener: tokio::net::TcpListener,
    metrics: FollowerMetrics,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(FollowerCollector {
        status: metrics.status,
        data: metrics.data,
    }));
    serve_registry(listener, registry, metrics.admits, stop).await;
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "metrics bound beyond loopback need `Authorization: Bearer <token>` of a principal with the cluster-admin grant\n",
    )
        .into_response()
}

fn exposition(text: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    /// The counter is read from the `Udp:` lines, not the `UdpLite:` ones
    /// that follow them.
    #[test]
    fn rcvbuf_errors_are_read_from_the_udp_lines() {
        let snmp = "Tcp: RtoAlgorithm RtoMin\nTcp: 1 200\n\
            Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
            Udp: 1000 2 7 900 5126 0\n\
            UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
            UdpLite: 0 0 0 0 0 0\n";
        assert_eq!(super::parse_rcvbuf_errors(snmp), Some(5126));
        assert_eq!(super::parse_rcvbuf_errors("Tcp: 1\nTcp: 2\n"), None);
    }
}
