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

/// A series' labels, owned while its family is gathered.
type OwnedLabels = Vec<(&'static str, String)>;

/// One family's series, gathered before it is written.
struct Family {
    help: &'static str,
    unit: Option<Unit>,
    kind: MetricType,
    rows: Vec<(OwnedLabels, Box<dyn EncodeMetric>)>,
}

/// Metric families gathered before any is written, so that several
/// sources (each router a cluster node runs, one per group it leads) add
/// series to one family and the exposition names each family once, as
/// the format requires.
#[derive(Default)]
struct Families {
    /// The `raft_group` label of every series added now: set while a
    /// router of a node of several groups adds its own.
    raft_group: Option<String>,
    /// Family names, in the order first added.
    order: Vec<&'static str>,
    by_name: std::collections::HashMap<&'static str, Family>,
}

impl Families {
    /// Writes every family once, in the order first added.
    fn write(self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut by_name = self.by_name;
        for name in self.order {
            let f = by_name.remove(name).expect("named when added");
            let mut e = enc.encode_descriptor(name, f.help, f.unit.as_ref(), f.kind)?;
            for (labels, m) in f.rows {
                if labels.is_empty() {
                    // A metric without labels is written without `{}`
                    // (and is the family's one series).
                    m.encode(e)?;
                    break;
                }
                m.encode(e.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Adds a family's series (`rows`) to `out`, under `out`'s `raft_group`
/// label if it has one.
fn family<'a, M: EncodeMetric + 'static>(
    out: &mut Families,
    name: &'static str,
    help: &'static str,
    unit: Option<&Unit>,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> std::fmt::Result {
    let f = out.by_name.entry(name).or_insert_with(|| {
        out.order.push(name);
        Family {
            help,
            unit: unit.cloned(),
            kind,
            rows: Vec::new(),
        }
    });
    for (labels, m) in rows {
        let mut owned: OwnedLabels = Vec::with_capacity(labels.len() + 1);
        if let Some(g) = &out.raft_group {
            owned.push(("raft_group", g.clone()));
        }
        owned.extend(labels.into_iter().map(|(k, v)| (k, v.to_string())));
        f.rows.push((owned, Box::new(m)));
    }
    Ok(())
}

/// A histogram read from elsewhere at each scrape (a plugin's call
/// times): its sum, count and `(upper bound, count)` buckets.
struct ConstHistogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum,
            self.count,
            &self.buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A node's (or a router's) files and the free space beside them, on
/// every node (a follower's disk fills as surely as its leader's):
/// `files` are `(raft group, file label, path)`, the group set on a node
/// of several groups for a file that is one group's.
fn disk_families(
    out: &mut Families,
    dir: &std::path::Path,
    files: &[(Option<String>, &'static str, std::path::PathBuf)],
) -> std::fmt::Result {
    let size = |path: &std::path::Path| std::fs::metadata(path).map_or(0, |m| m.len() as i64);
    family(
        out,
        "switchyard_storage_file",
        "Bytes of the data directory's files: the database, and the journal (a single router) or the Raft log (a cluster node).",
        Some(&Unit::Bytes),
        MetricType::Gauge,
        files.iter().map(|(group, label, path)| {
            let mut l: Labels = Vec::with_capacity(2);
            if let Some(g) = group {
                l.push(("raft_group", g.as_str()));
            }
            l.push(("file", *label));
            (l, gauge(size(path)))
        }),
    )?;
    use crate::storage::disk::Disk as _;
    if let Ok(free) = crate::storage::disk::OsDisk.free_bytes(dir) {
        family(
            out,
            "switchyard_disk_free",
            "Free bytes on the data directory's file system.",
            Some(&Unit::Bytes),
            MetricType::Gauge,
            [(vec![], gauge(free as i64))],
        )?;
    }
    if let Some(dropped) = udp_receive_buffer_errors() {
        family(
            out,
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

/// The files [`disk_families`] reports for a single router in `dir`.
fn router_files(dir: &std::path::Path) -> Vec<(Option<String>, &'static str, std::path::PathBuf)> {
    vec![
        (None, "database", dir.join("switchyard.redb")),
        (None, "journal", dir.join("switchyard.journal")),
    ]
}

/// One Raft group as a node sees it, for [`cluster_families`].
struct GroupView<'a> {
    /// The `raft_group` label's value; none on a node of one group (whose
    /// series carry no group label).
    group: Option<String>,
    /// `cluster_status`'s JSON for the group.
    status: &'a serde_json::Value,
    /// Whether this node serves the group's clients as its leader.
    serving: bool,
}

/// The groups of a node's `status` (`cluster::serve`'s node status): the
/// one it describes, or each of its `groups` on a node of several, with
/// a `raft_group` label. `serving` tells whether the node's router of a
/// group serves its clients.
fn group_views<'a>(s: &'a serde_json::Value, serving: &dyn Fn(u64) -> bool) -> Vec<GroupView<'a>> {
    let Some(groups) = s["groups"].as_array() else {
        return vec![GroupView {
            group: None,
            status: s,
            serving: serving(s["group"].as_u64().unwrap_or(0)),
        }];
    };
    groups
        .iter()
        // A group the node holds no replica of has no position on it.
        .filter(|g| g["member"] != false)
        .map(|g| {
            let id = g["group"].as_u64().unwrap_or(0);
            GroupView {
                group: Some(id.to_string()),
                status: g,
                serving: serving(id),
            }
        })
        .collect()
}

/// A cluster node's families: its own position in each group on every
/// node, and the members and their lag where it leads (`serving`), the
/// only node that knows them. On a node of several groups every series
/// carries a `raft_group` label.
fn cluster_families(out: &mut Families, views: &[GroupView]) -> std::fmt::Result {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as i64;
    fn labels<'a>(v: &'a GroupView, mut l: Labels<'a>) -> Labels<'a> {
        if let Some(g) = &v.group {
            l.insert(0, ("raft_group", g.as_str()));
        }
        l
    }
    let each = |name: &'static str,
                help: &'static str,
                value: &dyn Fn(&GroupView) -> Option<i64>,
                out: &mut Families| {
        let rows: Vec<_> = views
            .iter()
            .filter_map(|v| Some((labels(v, vec![]), gauge(value(v)?))))
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        family(out, name, help, None, MetricType::Gauge, rows)
    };
    each(
        "switchyard_cluster_term",
        "The Raft term this node is in (each election makes a new one).",
        &|v| Some(n(&v.status["term"])),
        out,
    )?;
    each(
        "switchyard_cluster_leader",
        "The node id of the leader as this node knows it (0: none known).",
        &|v| Some(n(&v.status["leader"])),
        out,
    )?;
    each(
        "switchyard_cluster_serving",
        "1 while this node serves clients as the leader, 0 while it follows (and redirects them).",
        &|v| Some(v.serving as i64),
        out,
    )?;
    each(
        "switchyard_cluster_last_log_index",
        "The position of the last entry in this node's Raft log.",
        &|v| Some(n(&v.status["last_log"])),
        out,
    )?;
    each(
        "switchyard_cluster_applied_index",
        "The position of the last entry this node applied to its tables.",
        &|v| Some(n(&v.status["committed"])),
        out,
    )?;
    each(
        "switchyard_cluster_quorum_ack_age_milliseconds",
        "Time since a majority last answered the leader (it stops serving past the step-down time).",
        &|v| v.status["quorum_ack_ms"].as_u64().map(|ms| ms as i64),
        out,
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
        out,
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
        out,
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
        let mut out = Families::default();
        router_families(&shared, &mut out)?;
        disk_families(
            &mut out,
            &shared.config.data,
            &router_files(&shared.config.data),
        )?;
        out.write(&mut enc)
    }
}

/// A router's own families: its topics, queues, storage, plugins and
/// connections (what a cluster node serves for each group it leads).
fn router_families(shared: &Shared, out: &mut Families) -> std::fmt::Result {
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
        out,
        "switchyard_published_messages",
        "Records accepted on a topic (published to it by name).",
        None,
        MetricType::Counter,
        per_topic(&|t| load(&t.stats.published)),
    )?;
    family(
        out,
        "switchyard_published",
        "Bytes of records accepted on a topic.",
        bytes,
        MetricType::Counter,
        per_topic(&|t| load(&t.stats.published_bytes)),
    )?;
    family(
        out,
        "switchyard_delivered_messages",
        "Records sent to stream, feed and queue subscribers of a topic.",
        None,
        MetricType::Counter,
        per_topic(&|t| load(&t.stats.delivered)),
    )?;
    family(
        out,
        "switchyard_retention_deleted_messages",
        "Records deleted by retention.",
        None,
        MetricType::Counter,
        per_topic(&|t| load(&t.stats.retention_deleted)),
    )?;
    family(
        out,
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
        out,
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
        out,
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
        out,
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
        out,
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
        out,
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

    // A cluster group's outbox: what it has yet to forward.
    if let Some(p) = broker.placement()
        && let Some(n) = super::outbox::pending(broker.storage(), p.group)
    {
        family(
            out,
            "switchyard_outbox_pending_messages",
            "Records routed or dead-lettered to another group's topic that this group's outbox has yet to forward.",
            None,
            MetricType::Gauge,
            std::iter::once((Vec::new(), gauge(n as i64))),
        )?;
    }

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
    family(
        out,
        "switchyard_queue_depth_messages",
        "Messages of a queue group by state: ready, in_flight (delivered, unacked), delayed (waiting for a delay or a retry).",
        None,
        MetricType::Gauge,
        names
            .iter()
            .zip(&depth)
            .flat_map(|((t, g), (_, (ready, in_flight, delayed)))| {
                [
                    ("ready", *ready),
                    ("in_flight", *in_flight),
                    ("delayed", *delayed),
                ]
                .map(|(state, v)| {
                    (
                        vec![
                            ("topic", t.as_str()),
                            ("group", g.as_str()),
                            ("state", state),
                        ],
                        gauge(v as i64),
                    )
                })
            }),
    )?;
    family(
        out,
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
            out,
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
        out,
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
        out,
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
            out,
            name,
            help,
            Some(&Unit::Seconds),
            MetricType::Histogram,
            [(vec![], h.clone())],
        )?;
    }
    if shared.config.replica.is_some() {
        family(
            out,
            "switchyard_cluster_replicate",
            "A data commit from proposing it until a majority holds it durably and it is applied here.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
            [(vec![], st.replicate_seconds.clone())],
        )?;
    }
    family(
        out,
        "switchyard_storage_failed",
        "1 once a sync failed and the router acknowledges no more writes.",
        None,
        MetricType::Gauge,
        [(vec![], gauge(storage.failed().is_some() as i64))],
    )?;

    // End to end, per topic.
    let s = &shared.stats;
    family(
        out,
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
        out,
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
        out,
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
        out,
        "switchyard_plugin_swaps",
        "Activations of a binding (deploys and rollbacks).",
        None,
        MetricType::Counter,
        bound.iter().map(|b| (plabels(b), counter(b.4))),
    )?;
    let live: Vec<_> = bound.iter().filter(|b| b.3.is_some()).collect();
    family(
        out,
        "switchyard_plugin_calls",
        "Calls of the live version (one per batch of up to 256 messages).",
        None,
        MetricType::Counter,
        live.iter().map(|b| {
            let l = b.3.as_ref().expect("filtered");
            (plabels(b), counter(load(&l.plugin.stats.calls)))
        }),
    )?;
    family(
        out,
        "switchyard_plugin_failures",
        "Failed (or not made) calls of the live version, by kind.",
        None,
        MetricType::Counter,
        live.iter().flat_map(|b| {
            let l = b.3.as_ref().expect("filtered");
            FAILURE_KINDS.iter().enumerate().map(move |(k, kind)| {
                let mut labels = plabels(b);
                labels.push(("kind", kind));
                (labels, counter(load(&l.plugin.stats.failures_by_kind[k])))
            })
        }),
    )?;
    // Call times from the version's own histogram, in seconds.
    let bounds_us: Vec<u64> = (0..16).map(|i| 10u64 << i).collect();
    family(
        out,
        "switchyard_plugin_call",
        "Call time of the live version.",
        Some(&Unit::Seconds),
        MetricType::Histogram,
        live.iter().map(|b| {
            let l = b.3.as_ref().expect("filtered");
            let (counts, sum_us, n) = l.plugin.stats.call_time_buckets(&bounds_us);
            let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(counts.len() + 1);
            let mut below = 0;
            for (bound, c) in bounds_us.iter().zip(counts) {
                buckets.push((*bound as f64 / 1e6, c - below));
                below = c;
            }
            buckets.push((f64::MAX, n - below));
            let h = ConstHistogram {
                sum: sum_us / 1e6,
                count: n,
                buckets,
            };
            (plabels(b), h)
        }),
    )?;

    // Connections.
    family(
        out,
        "switchyard_connections",
        "Open client connections.",
        None,
        MetricType::Gauge,
        [(vec![], gauge(s.connections.load(Ordering::Relaxed)))],
    )?;
    family(
        out,
        "switchyard_connections_opened",
        "Client connections accepted (handshake done).",
        None,
        MetricType::Counter,
        [(vec![], counter(load(&s.connections_total)))],
    )?;
    family(
        out,
        "switchyard_streams",
        "Open streams (publish, subscribe, control).",
        None,
        MetricType::Gauge,
        [(vec![], gauge(s.streams.load(Ordering::Relaxed)))],
    )?;
    family(
        out,
        "switchyard_handshake_failures",
        "Connections that failed their QUIC/TLS handshake or Hello.",
        None,
        MetricType::Counter,
        [(vec![], counter(load(&s.handshake_failures)))],
    )?;
    family(
        out,
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

/// The routers a cluster node runs, one per group it leads, by group:
/// the node adds a router once it serves and takes it out when it stops.
pub(crate) type Routers = Arc<std::sync::Mutex<std::collections::BTreeMap<u32, Weak<Shared>>>>;

/// What a cluster node's `/metrics` reads at each scrape. The node binds
/// its metrics address once for its life and serves it whether it leads
/// any group or none, so that a change of leader never leaves the
/// address closed and a scraper of every node sees every node.
pub(crate) struct NodeMetrics {
    /// The cluster as the node sees it (the node status: every group's).
    pub status: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// The node's data directory, for its Raft log and free space.
    pub data: std::path::PathBuf,
    /// Each group's database file, by group.
    pub databases: Vec<(u32, std::path::PathBuf)>,
    /// The routers the node runs now.
    pub routers: Routers,
    /// Whether a bearer token may read metrics (`cluster-admin`), asked
    /// only when the endpoint is bound beyond loopback.
    pub admits: Admits,
}

/// Reads a cluster node's state at each scrape: each router it runs
/// (under a `raft_group` label on a node of several groups), its place in
/// every group, and its disk.
struct NodeCollector {
    status: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    data: std::path::PathBuf,
    databases: Vec<(u32, std::path::PathBuf)>,
    routers: Routers,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let status = (self.status)();
        let routers: Vec<(u32, Arc<Shared>)> = self
            .routers
            .lock()
            .expect("routers lock")
            .iter()
            .filter_map(|(g, r)| Some((*g, r.upgrade()?)))
            .collect();
        let several = self.databases.len() > 1;
        let label = |g: u32| several.then(|| g.to_string());
        let mut out = Families::default();
        for (g, shared) in &routers {
            out.raft_group = label(*g);
            router_families(shared, &mut out)?;
        }
        out.raft_group = None;
        let serving = |g: u64| routers.iter().any(|(r, _)| u64::from(*r) == g);
        cluster_families(&mut out, &group_views(&status, &serving))?;
        let drained = status["drained"]
            .as_array()
            .is_some_and(|d| d.contains(&status["node"]));
        family(
            &mut out,
            "switchyard_cluster_drained",
            "1 while this node is drained (`cluster drain`: it leads no group), 0 otherwise.",
            None,
            MetricType::Gauge,
            [(vec![], gauge(drained as i64))],
        )?;
        let mut files: Vec<_> = self
            .databases
            .iter()
            .map(|(g, path)| (label(*g), "database", path.clone()))
            .collect();
        files.push((None, "raft_log", self.data.join("raft.redb")));
        disk_families(&mut out, &self.data, &files)?;
        out.write(&mut enc)
    }
}

/// Serves a cluster node's `/metrics` on `listener` until `stop`.
pub(crate) async fn serve_node(
    listener: tokio::net::TcpListener,
    metrics: NodeMetrics,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector {
        status: metrics.status,
        data: metrics.data,
        databases: metrics.databases,
        routers: metrics.routers,
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

    /// Two routers of a node add to the same families: each family is
    /// written once (the format allows no repeat), its series labelled by
    /// group, and a family without labels keeps none on a node of one.
    #[test]
    fn families_of_several_routers_are_written_once_each() {
        use super::*;
        #[derive(Debug)]
        struct Two;
        impl Collector for Two {
            fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
                let mut out = Families::default();
                for (g, n) in [("1", 3), ("2", 5)] {
                    out.raft_group = Some(g.to_string());
                    family(
                        &mut out,
                        "a",
                        "A.",
                        None,
                        MetricType::Gauge,
                        [(vec![], gauge(n))],
                    )?;
                    let rows = [(vec![("topic", "t")], counter(7))];
                    family(&mut out, "b", "B.", None, MetricType::Counter, rows)?;
                }
                out.raft_group = None;
                family(
                    &mut out,
                    "c",
                    "C.",
                    None,
                    MetricType::Gauge,
                    [(vec![], gauge(1))],
                )?;
                out.write(&mut enc)
            }
        }
        let mut r = Registry::default();
        r.register_collector(Box::new(Two));
        let text = render(&r);
        for line in [
            "# TYPE a gauge",
            "a{raft_group=\"1\"} 3",
            "a{raft_group=\"2\"} 5",
            "b_total{raft_group=\"2\",topic=\"t\"} 7",
            "c 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        for name in ["a", "b", "c"] {
            let types = text
                .lines()
                .filter(|l| l.starts_with(&format!("# TYPE {name} ")))
                .count();
            assert_eq!(types, 1, "{text}");
        }
    }
}
