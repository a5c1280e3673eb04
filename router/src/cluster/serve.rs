//! `switchyard serve --node-id N --cluster A,B,C`: a router that is one
//! node of a replicated cluster.
//!
//! Every node runs a Raft member ([`ClusterNode`]) of each of the
//! cluster's groups (one, as `serve` runs it). The leader of a group
//! serves its clients: it opens the group's replicated tables as its
//! storage (every commit replicated before it is acknowledged) and runs a
//! whole router on them. The node's one client address serves every
//! group ([`Dispatch`]): a connection names its group in its handshake's
//! ALPN and goes to that group's router if this node leads the group, or
//! is closed with [`close::NOT_LEADER`] and the leader's address, which
//! clients follow. When leadership moves, the old leader stops its router
//! (its clients reconnect and follow) and the new one starts its router
//! once it has applied every committed entry.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::ServerState;
use tokio::sync::{mpsc, watch};

use super::balance::Balancer;
use super::log_store::LogFile;
use super::net::{GroupId, RaftHost};
use super::node::LeaderView;
use super::replicate::LeaderReplicator;
use super::tls::NodeTls;
use super::{ClusterNode, NodeConfig, NodeId, Timing};
use crate::protocol::close;
use crate::server::admission::PerAddress;
use crate::server::metrics::{NodeMetrics, Routers, serve_node};
use crate::server::placement::{GroupZero, Placement};
use crate::server::{
    ControlError, NodeClients, Replica, Router, RouterConfig, StartError, endpoint_config, tls,
};
#[cfg(doc)]
use crate::storage::disk::OsDisk;

/// The Raft port of a node is its client port plus this.
pub const RAFT_PORT_OFFSET: u16 = 5;

/// The files in a node's data directory that make it a cluster member.
pub const CA_FILE: &str = "cluster-ca.pem";

/// A node's Raft address, from its client address.
pub fn raft_addr(client: SocketAddr) -> SocketAddr {
    SocketAddr::new(client.ip(), client.port() + RAFT_PORT_OFFSET)
}

/// Loads a node's TLS identity from its data directory: `cert.pem` (its
/// certificate, then the CA's), `key.pem`, `cluster-ca.pem`.
pub fn load_node_tls(dir: &Path) -> Result<NodeTls, StartError> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let paths = tls::CertPaths::in_dir(dir);
    let missing = |what: &str| {
        StartError::Config(format!(
            "{} has no {what}: a cluster node's data directory is made by \
             `switchyard cluster init`",
            dir.display()
        ))
    };
    let ca_path = dir.join(CA_FILE);
    if !ca_path.exists() {
        return Err(missing(CA_FILE));
    }
    let ca = tls::load_certs(&ca_path)?;
    let mut chain = tls::load_certs(&paths.cert).map_err(|_| missing("cert.pem"))?;
    chain.truncate(1);
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|_| missing("key.pem"))?;
    Ok(NodeTls {
        ca,
        chain,
        key: Arc::new(key),
    })
}

/// A cluster node's settings.
pub struct ClusterServe {
    /// This node's id.
    pub node_id: NodeId,
    /// Every node's client address, by id (`--cluster`, in id order).
    pub members: BTreeMap<NodeId, SocketAddr>,
    /// The router this node runs for each group it leads (`listen` is its
    /// client address, `data` its data directory).
    pub router: RouterConfig,
    /// Election timing.
    pub timing: Timing,
    /// Join a running cluster (`cluster add-node`) instead of forming one.
    pub join: bool,
    /// The Raft network seam ([`super::net::NoFaults`] but in tests).
    pub faults: Arc<dyn super::net::Faults>,
    /// Where the node's Raft log and tables live ([`OsDisk`] but in tests,
    /// which fail its syncs).
    pub disk: Arc<dyn crate::storage::disk::Disk>,
    /// How many Raft groups the node is a member of, each with a router
    /// of its own while the node leads it (`serve --groups`, 1 by
    /// default; see [`group_dir`]). With more than one, the cluster's
    /// topics are spread over them ([`crate::server::placement`]) and
    /// their leaderships over the nodes ([`super::balance`]). Fixed for a
    /// node's life ([`fixed_groups`]).
    pub groups: GroupId,
    /// How many voters each group but group 0 has (`serve
    /// --replication-factor`; `None`: 3): a topic's replication factor is
    /// its group's size. Group 0, the cluster's metadata, has every node.
    /// Fixed for a cluster's life ([`fixed_replication`]).
    pub replication: Option<u32>,
}

/// The replication factor of a cluster formed without one: three copies,
/// as Kafka's and Redpanda's clusters and RabbitMQ's quorum queues keep.
pub const DEFAULT_REPLICATION: u32 = 3;

/// The file in a node's data directory that records the cluster's
/// replication factor and how many nodes formed it (`<factor>
/// <nodes>`; `cluster add-node` writes the cluster's into the new node's
/// directory).
pub const REPLICATION_FILE: &str = "cluster-replication";

/// How a cluster's groups are sized: recorded when it is formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replication {
    /// The voters of each group but group 0; 0 for every node (a cluster
    /// formed before replication factors, whose groups all have every
    /// node, as they grow with `add-node`).
    pub factor: u32,
    /// How many nodes formed the cluster (ids 1 to this): each group's
    /// founding members are among them ([`founders`]).
    pub formed_with: u32,
}

impl Replication {
    /// Whether group `group` has fewer voters than the cluster has nodes
    /// (`nodes`): a group of its own size, not one that every node joins.
    pub fn sized(&self, group: GroupId, nodes: usize) -> Option<u32> {
        (group != 0 && self.factor != 0 && (self.factor as usize) < nodes.max(1))
            .then_some(self.factor)
    }

    /// The voters group `group` is meant to have in a cluster of `nodes`:
    /// its own number where [`Replication::sized`], else every node.
    pub fn size_of(&self, group: GroupId, nodes: usize) -> u32 {
        self.sized(group, nodes).unwrap_or(nodes as u32)
    }
}

/// Checks that a node is started with the replication factor its cluster
/// was formed with, recording it (and the cluster's size) on its first
/// start. A node made before replication factors (a `raft.redb` but no
/// record) has every node in every group.
pub fn fixed_replication(
    data: &Path,
    wanted: Option<u32>,
    nodes: usize,
) -> Result<Replication, StartError> {
    let path = data.join(REPLICATION_FILE);
    let bad = || StartError::Config(format!("{}: not a replication record", path.display()));
    let recorded = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut words = text.split_whitespace().map(str::parse::<u32>);
            match (words.next(), words.next()) {
                (Some(Ok(factor)), Some(Ok(formed_with))) => Some(Replication {
                    factor,
                    formed_with,
                }),
                _ => return Err(bad()),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            data.join("raft.redb").exists().then_some(Replication {
                factor: 0,
                formed_with: nodes as u32,
            })
        }
        Err(e) => return Err(StartError::Config(format!("{}: {e}", path.display()))),
    };
    match (recorded, wanted) {
        (Some(r), Some(w)) if r.factor != w => Err(StartError::Config(match r.factor {
            0 => format!(
                "this node's cluster was formed before replication factors: each of its groups                  has every node, and --replication-factor {w} cannot change that"
            ),
            f => format!(
                "this node's cluster was formed with replication factor {f} and cannot be                  started with {w}: it is fixed for a cluster's life (--replication-factor {f})"
            ),
        })),
        (Some(r), _) => Ok(r),
        (None, w) => {
            let factor = w.unwrap_or(DEFAULT_REPLICATION);
            if factor == 0 {
                return Err(StartError::Config(
                    "--replication-factor 0: a topic needs at least one copy".into(),
                ));
            }
            std::fs::write(&path, format!("{factor} {nodes}\n"))
                .map_err(|e| StartError::Config(format!("{}: {e}", path.display())))?;
            Ok(Replication {
                factor,
                formed_with: nodes as u32,
            })
        }
    }
}

/// The nodes that form group `group` when the cluster is first started:
/// every node for group 0 (the cluster's metadata: topic assignment,
/// principals, drain marks, read by every node from its own replica) and
/// for a group as large as the cluster; otherwise `factor` of the first
/// `formed_with` nodes in turn, group N starting at the Nth, so that the
/// groups' replicas, like their leaders, spread evenly over the nodes.
pub fn founders(group: GroupId, ids: &[NodeId], replication: Replication) -> Vec<NodeId> {
    let formed: Vec<NodeId> = ids
        .iter()
        .copied()
        .take(replication.formed_with.max(1) as usize)
        .collect();
    let Some(factor) = replication.sized(group, formed.len()) else {
        return formed;
    };
    let n = formed.len();
    let mut chosen: Vec<NodeId> = (0..factor as usize)
        .map(|i| formed[(group as usize - 1 + i) % n])
        .collect();
    chosen.sort_unstable();
    chosen
}

/// How often a node of several groups looks for a leadership to move.
const BALANCE_EVERY: Duration = Duration::from_secs(1);

/// Where group `group`'s tables live in a node's data directory: group 0's
/// in the directory itself (a node of one group), group N's in `g<N>/`.
/// Every group's Raft log is in the directory's one `raft.redb`.
pub fn group_dir(data: &Path, group: GroupId) -> PathBuf {
    match group {
        0 => data.to_path_buf(),
        g => data.join(format!("g{g}")),
    }
}

/// The file in a node's data directory that records how many groups the
/// node was made with.
pub const GROUPS_FILE: &str = "cluster-groups";

/// Checks that a node is started with the number of groups it was made
/// with, recording it on its first start. The count is fixed for a
/// cluster's life: topics are assigned to groups by number, so a node
/// with fewer would leave some unserved, and a node made before groups
/// existed (a `raft.redb` but no record) has one.
pub fn fixed_groups(data: &Path, groups: GroupId) -> Result<(), StartError> {
    let path = data.join(GROUPS_FILE);
    let recorded = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text.trim().parse::<GroupId>().map_err(|_| {
            StartError::Config(format!("{}: not a number of groups", path.display()))
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            data.join("raft.redb").exists().then_some(1)
        }
        Err(e) => return Err(StartError::Config(format!("{}: {e}", path.display()))),
    };
    match recorded {
        Some(n) if n == groups => Ok(()),
        Some(n) => Err(StartError::Config(format!(
            "this node was made with {n} group(s) and cannot be started with {groups}: the number of groups is fixed for a cluster's life (--groups {n})"
        ))),
        None => std::fs::write(&path, format!("{groups}\n"))
            .map_err(|e| StartError::Config(format!("{}: {e}", path.display()))),
    }
}

/// Runs a cluster node until `shutdown` completes.
pub async fn run(
    cfg: ClusterServe,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let node_tls = load_node_tls(&cfg.router.data)?;
    fixed_groups(&cfg.router.data, cfg.groups.max(1))?;
    let replication = fixed_replication(&cfg.router.data, cfg.replication, cfg.members.len())?;
    let failed = |e: &dyn std::fmt::Display| StartError::Config(format!("cluster node: {e}"));
    let raft_members: BTreeMap<NodeId, SocketAddr> = cfg
        .members
        .iter()
        .map(|(id, a)| (*id, raft_addr(*a)))
        .collect();
    let me = *raft_members
        .get(&cfg.node_id)
        .ok_or_else(|| failed(&format!("node {} is not a member", cfg.node_id)))?;
    // The client address and the metrics listener first: a node that
    // cannot bind them says so before it takes part in any election.
    let groups = cfg.groups.max(1);
    let bind = |source| StartError::Bind {
        addr: cfg.router.listen,
        source,
    };
    let clients = crate::client::socket::endpoint(
        quinn::EndpointConfig::default(),
        Some(endpoint_config(&cfg.router, groups)?),
        cfg.router.listen,
    )
    .map_err(bind)?;
    let local_addr = clients.local_addr().map_err(bind)?;
    let metrics = match cfg.router.metrics {
        Some(addr) => {
            let bind = |source| StartError::MetricsBind { addr, source };
            let l = std::net::TcpListener::bind(addr).map_err(bind)?;
            l.set_nonblocking(true).map_err(bind)?;
            Some(l)
        }
        None => None,
    };
    // One Raft endpoint and one log file for all the node's groups.
    let host = RaftHost::bind(me, &node_tls).map_err(|e| failed(&e))?;
    let log = match LogFile::open_on(&*cfg.disk, &cfg.router.data.join("raft.redb")) {
        Ok(log) => log,
        Err(e) => {
            host.close().await;
            return Err(failed(&e));
        }
    };
    let ids: Vec<NodeId> = cfg.members.keys().copied().collect();
    let mut nodes = BTreeMap::new();
    for group in 0..groups {
        let mut nc = NodeConfig::new(
            cfg.node_id,
            raft_members.clone(),
            group_dir(&cfg.router.data, group),
            node_tls.clone(),
        );
        nc.timing = cfg.timing.clone();
        nc.join = cfg.join;
        nc.founders = Some(founders(group, &ids, replication));
        nc.faults = cfg.faults.clone();
        nc.disk = cfg.disk.clone();
        nc.group = group;
        nc.host = Some(host.clone());
        nc.log = Some(log.clone());
        match ClusterNode::start(nc).await {
            Ok(node) => {
                nodes.insert(group, node);
            }
            Err(e) => {
                for (_, node) in nodes {
                    node.shutdown().await;
                }
                host.close().await;
                return Err(failed(&e));
            }
        }
    }
    drop(log);
    tracing::info!(node = cfg.node_id, members = ?cfg.members, groups = nodes.len(), "cluster node started");
    // Who leads the groups this node is not a member of, asked of every
    // node: for the redirects, the balancer and `cluster status`.
    let directory = Arc::new(Directory::default());
    let gathering = tokio::spawn(gather(
        cfg.node_id,
        host.clone(),
        cfg.faults.clone(),
        nodes[&0].raft().clone(),
        directory.clone(),
    ));
    let (dispatch, accepting) = Dispatch::start(
        cfg.node_id,
        &nodes,
        directory.clone(),
        &clients,
        local_addr,
        &cfg.router,
    );
    // The balancer spreads leaderships over the nodes (with several
    // groups) and moves them off a drained node (with one too).
    let zero_db = nodes[&0].state().database().clone();
    let balancer = {
        let handovers = nodes.iter().map(|(g, n)| (*g, n.handover())).collect();
        let zero_db = zero_db.clone();
        let drained = Box::new(move || crate::storage::drained_nodes(&zero_db));
        let directory = directory.clone();
        let others = Box::new(move || directory.views());
        Balancer::spawn(cfg.node_id, handovers, drained, others, BALANCE_EVERY)
    };
    // Every group leads (or follows) on its own until the node stops, or
    // until one group's Raft or storage fails, which stops them all.
    let (stop, mut stopping) = watch::channel(false);
    // The principals and the topic assignment are group 0's: with several
    // groups, every group's router reads them from the node's replica of
    // group 0 (and the other groups' routers follow its principals).
    let zero = (nodes.len() > 1).then(|| GroupZero {
        db: nodes[&0].state().database().clone(),
        changed: nodes[&0].state().cluster_rows_changed(),
    });
    let groups = nodes.len() as u32;
    // Every group's Raft on this node, for `cluster status`.
    let local = Arc::new(NodeGroups {
        rafts: nodes.iter().map(|(g, n)| (*g, n.raft().clone())).collect(),
        zero: zero_db,
        directory: directory.clone(),
        replication,
    });
    // The metrics address is the node's, served for its life whether it
    // leads any group or none, with the families of every router it runs.
    let routers: Routers = Routers::default();
    let metrics_task = metrics.and_then(|l| {
        let status = {
            let local = local.clone();
            Box::new(move || node_status(0, &local.rafts[0].1, &local))
        };
        serve_metrics(
            &cfg,
            l,
            &nodes[&0],
            status,
            groups,
            routers.clone(),
            stop.subscribe(),
        )
    });
    // Each group's size, for placing topics by replication factor: group
    // 0 has every node, the others the replication factor (every node
    // where it is not below their number).
    let sizes: Arc<dyn Fn() -> Vec<u32> + Send + Sync> = {
        let zero = nodes[&0].raft().clone();
        Arc::new(move || {
            let n = voters_of(&zero).len();
            (0..groups).map(|g| replication.size_of(g, n)).collect()
        })
    };
    let leads = futures::future::join_all(nodes.iter().map(|(group, node)| {
        let placement = zero
            .as_ref()
            .map(|zero| Placement::new(*group, groups, zero.clone()).with_sizes(sizes.clone()));
        lead(&cfg, node, &dispatch, &local, &routers, placement, &stop)
    }));
    let stopper = async {
        tokio::select! {
            () = shutdown => {}
            _ = stopping.wait_for(|s| *s) => {}
        }
        stop.send_replace(true);
    };
    let ((), results) = tokio::join!(stopper, leads);
    drop(balancer);
    gathering.abort();
    if let Some(task) = metrics_task {
        // A scrape in progress has a second to finish.
        if tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .is_err()
        {
            tracing::debug!("a metrics scrape outlived the node");
        }
    }
    accepting.abort();
    clients.close(close::NOT_LEADER.into(), b"");
    let _ = tokio::time::timeout(Duration::from_secs(1), clients.wait_idle()).await;
    let failure = results.into_iter().find_map(Result::err);
    if let Some(StartError::ClusterStopped(why)) = &failure {
        tracing::error!(error = %why, "the cluster node stopped; exiting");
    }
    for (_, node) in nodes {
        node.shutdown().await;
    }
    host.close().await;
    match failure {
        // The error makes the process exit non-zero, so that a supervisor
        // restarts it (from its files, catching up from the others)
        // instead of it lingering.
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One group on this node until `stop` is set: while the node leads it,
/// its router serves the connections that name the group; while it
/// follows, the dispatcher redirects them. A fatal error of its Raft or
/// storage sets `stop` for the node's other groups and is returned.
async fn lead(
    cfg: &ClusterServe,
    node: &ClusterNode,
    dispatch: &Arc<Dispatch>,
    local: &Arc<NodeGroups>,
    routers: &Routers,
    placement: Option<Placement>,
    stop: &watch::Sender<bool>,
) -> Result<(), StartError> {
    let group = node.group();
    let fatal = |why: String| {
        stop.send_replace(true);
        StartError::ClusterStopped(why)
    };
    let mut stopping = stop.subscribe();
    let mut incarnation = crate::storage::now_ms() << 8;
    loop {
        // Following: the dispatcher points clients at the leader until
        // this node leads.
        let ready = tokio::select! {
            _ = stopping.wait_for(|s| *s) => Ok(false),
            () = until_ready_leader(node) => Ok(true),
            why = raft_stopped(node) => Err(why),
        };
        match ready {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(why) => return Err(fatal(why)),
        }
        // Leading: the router serves from the replicated tables.
        incarnation += 1;
        let term = node.raft().metrics().borrow().current_term;
        let handoff = node.state().handoff().clone();
        handoff.set_serving(true);
        let replicator = LeaderReplicator::new(
            node.raft().clone(),
            tokio::runtime::Handle::current(),
            handoff.clone(),
            cfg.node_id,
            incarnation,
            node.handover().gate(),
        );
        let mut rc = cfg.router.clone();
        // The node serves the metrics address for every router it runs.
        rc.metrics = None;
        if group != 0 {
            // The console is group 0's router's: another group's router
            // binding it too would find it taken and stop the node.
            rc.console = None;
        }
        rc.replica = Some(Replica {
            db: node.state().database().clone(),
            db_path: group_dir(&cfg.router.data, group).join("switchyard.redb"),
            replicator: Arc::new(replicator),
            control: Arc::new(Control {
                group,
                handover: node.handover(),
                local: local.clone(),
            }),
            // Connections that arrive while the router opens wait in it.
            clients: dispatch.route(group),
            placement: placement.clone(),
            outbox: placement.as_ref().map(|_| outbox_client(cfg)),
        });
        let opening = std::time::Instant::now();
        let router = match Router::start(rc).await {
            Ok(r) => r,
            Err(e) => {
                dispatch.unroute(group);
                handoff.set_serving(false);
                stop.send_replace(true);
                return Err(e);
            }
        };
        tracing::info!(node = cfg.node_id, group, term, opened_in = ?opening.elapsed(), "leading: serving clients");
        routers
            .lock()
            .expect("routers lock")
            .insert(group, router.metrics_source());
        let ending = tokio::select! {
            _ = stopping.wait_for(|s| *s) => Ending::Shutdown,
            () = until_not_leader(node, term) => Ending::Handover,
            () = quorum_lost(node, cfg.timing.step_down) => {
                tracing::warn!(
                    node = cfg.node_id,
                    group,
                    after = ?cfg.timing.step_down,
                    "no answer from a majority of the cluster: this node is probably cut off; \
                     it stops serving clients (they go to the other nodes) and refuses the \
                     commits that wait (they were not acknowledged)"
                );
                handoff.abandon("this node lost contact with a majority of the cluster");
                Ending::Handover
            }
            why = raft_stopped(node) => Ending::Fatal(why),
            // A failed sync of the tables (a checkpoint): as on a single
            // router, nothing more may be acknowledged; a restart recovers
            // from the Raft log.
            why = router.storage_failed() => Ending::Fatal(format!("storage failed: {why}")),
        };
        if let Ending::Handover = ending {
            tracing::info!(
                node = cfg.node_id,
                group,
                "no longer serving as leader: handing clients over"
            );
        }
        // New connections are redirected from now on; those already
        // handed to the router and not yet taken come back to be.
        dispatch.unroute(group);
        routers.lock().expect("routers lock").remove(&group);
        // A commit queued before the stop waits for a majority; if that
        // majority is gone it never comes, so after a while the waiting
        // commits are refused (nothing of them was acknowledged), which
        // lets the router finish.
        let stopping_router = router.shutdown();
        tokio::pin!(stopping_router);
        if tokio::time::timeout(Duration::from_secs(5), &mut stopping_router)
            .await
            .is_err()
        {
            tracing::warn!(
                "commits are waiting for a majority that does not answer; refusing them \
                 so that the router can stop (they were not acknowledged)"
            );
            handoff.abandon("the router is stopping and no majority answers");
            stopping_router.await;
        }
        handoff.set_serving(false);
        match ending {
            Ending::Handover => {}
            Ending::Shutdown => {
                hand_over(cfg, node).await;
                return Ok(());
            }
            Ending::Fatal(why) => return Err(fatal(why)),
        }
    }
}

/// A stopping leader's last act: leadership moves to a follower that holds
/// the whole log ([`ClusterNode::hand_over`]) in one round trip, while the
/// dispatcher redirects the clients its router just closed, so that they
/// reach the new leader without waiting out an election.
async fn hand_over(cfg: &ClusterServe, node: &ClusterNode) {
    if let Some(to) = node.hand_over().await {
        tracing::info!(
            node = cfg.node_id,
            group = node.group(),
            to,
            "stopping: leadership handed over"
        );
        // Clients closed by the router a moment ago come back here first.
        tokio::time::sleep(HANDOVER_LINGER).await;
    }
}

/// How long a stopping leader goes on redirecting clients after it handed
/// leadership over: about two of a reconnecting client's first backoffs.
const HANDOVER_LINGER: Duration = Duration::from_millis(300);

/// Why a node stops serving as leader.
enum Ending {
    /// The process is stopping.
    Shutdown,
    /// Leadership moved, or this node is cut off: it follows again.
    Handover,
    /// Its Raft or its storage failed: the process exits.
    Fatal(String),
}

/// Waits until this leader has had no answer from a majority for
/// `limit` (openraft's time since the last quorum acknowledgement).
async fn quorum_lost(node: &ClusterNode, limit: Duration) {
    let limit = limit.as_millis() as u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let lost = {
            let metrics = node.raft().metrics();
            let m = metrics.borrow();
            m.state == ServerState::Leader && m.millis_since_quorum_ack.is_some_and(|ms| ms > limit)
        };
        if lost {
            return;
        }
    }
}

/// Waits until this node's Raft stops on its own: a storage error (a
/// failed sync of its log, say) after which it must not go on.
async fn raft_stopped(node: &ClusterNode) -> String {
    let mut metrics = node.raft().metrics();
    loop {
        if let Err(e) = &metrics.borrow_and_update().running_state {
            return e.to_string();
        }
        if metrics.changed().await.is_err() {
            return "Raft stopped".into();
        }
    }
}

/// A node's client address, from its Raft address (the client port is 5
/// below).
pub fn client_addr(raft: &str) -> Option<SocketAddr> {
    let a: SocketAddr = raft.parse().ok()?;
    Some(SocketAddr::new(
        a.ip(),
        a.port().checked_sub(RAFT_PORT_OFFSET)?,
    ))
}

/// How a router's outbox forwarder reaches the cluster: through this
/// node's client address, with the CA and the admin token every node's
/// data directory holds, knowing every node.
fn outbox_client(cfg: &ClusterServe) -> crate::client::ClientConfig {
    let data = &cfg.router.data;
    let own = cfg.members.get(&cfg.node_id).copied();
    let mut c = crate::client::ClientConfig::new(own.unwrap_or(cfg.router.listen))
        .with_ca_file(data.join(CA_FILE))
        .with_cluster(cfg.members.values().copied());
    match c
        .clone()
        .with_token_file(crate::auth::admin_token_path(data))
    {
        Ok(with) => c = with,
        Err(e) => tracing::warn!(error = %e, "no admin token for the outbox forwarder"),
    }
    c
}

/// The admin protocol's hold on the cluster, on the leader.
struct Control {
    /// The group this router serves.
    group: GroupId,
    /// The group's handover, and through it its Raft.
    handover: super::node::Handover,
    /// Every group's Raft on this node, and its replica of group 0.
    local: Arc<NodeGroups>,
}

/// Every group's Raft on this node, and its replica of group 0 (for the
/// nodes marked drained), for `cluster status`.
struct NodeGroups {
    rafts: Vec<(GroupId, super::Raft)>,
    zero: Arc<redb::Database>,
    /// The leaders of the groups this node is not a member of.
    directory: Arc<Directory>,
    /// How the cluster's groups are sized.
    replication: Replication,
}

impl NodeGroups {
    /// The replication factor a topic gets unless it asks for another:
    /// the size of the groups but group 0 where they have their own, else
    /// the cluster's (group 0's voters).
    fn default_factor(&self) -> u32 {
        // With one group, group 0 holds every topic.
        let nodes = voters_of(&self.rafts[0].1).len();
        let group = u32::from(self.rafts.len() > 1);
        self.replication.size_of(group, nodes)
    }
}

impl Control {
    /// The voters this group is meant to have, where that is its own
    /// number rather than every node (group 0, and the groups of a
    /// cluster formed before replication factors, have every node).
    fn factor(&self) -> Option<u32> {
        let f = self.local.replication.factor;
        (self.group != 0 && f != 0).then_some(f)
    }

    /// Whether `voters` are more than the group's factor: a replica was
    /// added and the one it replaces not yet removed (a move cut short).
    fn over_factor(&self, voters: &[NodeId]) -> bool {
        self.factor().is_some_and(|f| voters.len() > f as usize)
    }

    /// The cluster's nodes (group 0's voters) and their Raft addresses.
    fn cluster_nodes(&self) -> Vec<(NodeId, SocketAddr)> {
        let m = self.local.rafts[0].1.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        membership
            .voter_ids()
            .filter_map(|id| Some((id, membership.get_node(&id)?.addr.parse().ok()?)))
            .collect()
    }

    /// The node to move a replica of this group (whose voters are
    /// `voters`) to from node `leaving`: a node of the cluster that is not
    /// a voter of the group, answered this node lately and is not
    /// drained, with the fewest voter places in the groups this node
    /// knows of, then the lowest id; and its Raft address.
    fn spare(&self, leaving: NodeId, voters: &[NodeId]) -> Option<(NodeId, SocketAddr)> {
        let drained = crate::storage::drained_nodes(&self.local.zero);
        let mut places: BTreeMap<NodeId, usize> = BTreeMap::new();
        for (g, raft) in &self.local.rafts {
            let vs: Vec<NodeId> = if is_member(raft) {
                voters_of(raft)
            } else {
                self.local
                    .directory
                    .get(*g)
                    .map(|(_, l)| l.voters)
                    .unwrap_or_default()
            };
            for v in vs {
                *places.entry(v).or_default() += 1;
            }
        }
        self.cluster_nodes()
            .into_iter()
            .filter(|(id, _)| *id != leaving && !voters.contains(id) && !drained.contains(id))
            .filter(|(id, _)| self.handover.answered_within(*id, Duration::from_secs(2)))
            .map(|(id, addr)| (places.get(&id).copied().unwrap_or(0), id, addr))
            .min()
            .map(|(_, id, addr)| (id, addr))
    }
}

impl crate::server::ClusterControl for Control {
    /// This group as its leader sees it; on a node of several groups,
    /// also `groups`: each of them as this node sees it (a group's
    /// followers' positions are known only where it is led).
    fn status(&self) -> serde_json::Value {
        node_status(self.group, self.handover.raft(), &self.local)
    }

    fn nodes(&self) -> Vec<SocketAddr> {
        let m = self.handover.raft().metrics();
        let m = m.borrow();
        let voters: std::collections::BTreeSet<NodeId> = m.membership_config.voter_ids().collect();
        m.membership_config
            .nodes()
            .filter(|(id, _)| voters.contains(id))
            .filter_map(|(_, n)| client_addr(&n.addr))
            .collect()
    }

    fn add_node(
        &self,
        id: NodeId,
        addr: SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ControlError>> + Send + '_>>
    {
        Box::pin(async move {
            // A group of its own size that has it already is left as it
            // is: the new node holds group 0 (the metadata), and takes a
            // replica of such a group when one moves to it.
            let _changing = self.handover.changing_members();
            let raft = self.handover.raft();
            if let Some(factor) = self.factor() {
                let voters = voters_of(raft).len();
                if voters >= factor as usize {
                    tracing::info!(
                        group = self.group,
                        node = id,
                        factor,
                        "the group has its replication factor of voters: not adding the node"
                    );
                    return Ok(());
                }
            }
            super::node::add_node(raft, id, raft_addr(addr))
                .await
                .map_err(|e| control_error(self.group, e))
        })
    }

    fn remove_node(
        &self,
        id: NodeId,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ControlError>> + Send + '_>>
    {
        Box::pin(async move {
            let _changing = self.handover.changing_members();
            let raft = self.handover.raft();
            // A group of its own size keeps its replication factor: its
            // replica on the node goes to another node first, the live,
            // undrained one with the fewest replicas (added as a learner,
            // made a voter once it holds the log), then the node leaves.
            let voters: Vec<NodeId> = voters_of(raft);
            // (A request asked again after a lost answer finds the new
            // replica there already: one more voter than the factor.)
            if self.factor().is_some() && !self.over_factor(&voters) && voters.contains(&id) {
                match self.spare(id, &voters) {
                    Some((spare, addr)) => {
                        tracing::info!(
                            group = self.group,
                            from = id,
                            to = spare,
                            "moving the group's replica"
                        );
                        super::node::add_node(raft, spare, addr)
                            .await
                            .map_err(|e| control_error(self.group, e))?;
                    }
                    None => tracing::warn!(
                        group = self.group,
                        node = id,
                        "no other live, undrained node to move the group's replica to: \
                         it keeps one fewer copy until `cluster add-node`"
                    ),
                }
            }
            super::node::remove_node(raft, id)
                .await
                .map_err(|e| control_error(self.group, e))
        })
    }

    fn move_replica(
        &self,
        from: NodeId,
        to: Option<NodeId>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<NodeId, ControlError>> + Send + '_>,
    > {
        Box::pin(async move {
            let _changing = self.handover.changing_members();
            let group = self.group;
            if self.factor().is_none() {
                return Err(ControlError::Invalid(format!(
                    "group {group} has every node of the cluster as a replica: there is no \
                     other node to move one to"
                )));
            }
            let raft = self.handover.raft();
            let voters: Vec<NodeId> = voters_of(raft);
            if !voters.contains(&from) {
                return Err(ControlError::Invalid(format!(
                    "node {from} holds no replica of group {group} (its replicas: {voters:?})"
                )));
            }
            let (to, addr) = match to {
                None if self.over_factor(&voters) => {
                    return Err(ControlError::Invalid(format!(
                        "group {group} has more replicas than its factor ({voters:?}): a move is \
                         half done; name the node it added with --to to finish it"
                    )));
                }
                None => self.spare(from, &voters).ok_or_else(|| {
                    ControlError::Invalid(format!(
                        "no live, undrained node outside group {group} (replicas {voters:?}) to \
                         move it to"
                    ))
                })?,
                // Asked again after a move that added `to` but lost the
                // leadership before removing `from`: finish it.
                Some(to) if voters.contains(&to) && self.over_factor(&voters) => {
                    tracing::info!(group, from, to, "finishing a move of the group's replica");
                    super::node::remove_node(raft, from)
                        .await
                        .map_err(|e| control_error(group, e))?;
                    return Ok(to);
                }
                Some(to) if voters.contains(&to) => {
                    return Err(ControlError::Invalid(format!(
                        "node {to} already holds a replica of group {group}"
                    )));
                }
                Some(to) => {
                    let addr = self
                        .cluster_nodes()
                        .into_iter()
                        .find_map(|(id, addr)| (id == to).then_some(addr))
                        .ok_or_else(|| {
                            ControlError::Invalid(format!(
                                "node {to} is not a voter of the cluster"
                            ))
                        })?;
                    (to, addr)
                }
            };
            tracing::info!(group, from, to, "moving the group's replica");
            super::node::add_node(raft, to, addr)
                .await
                .map_err(|e| control_error(group, e))?;
            super::node::remove_node(raft, from)
                .await
                .map_err(|e| control_error(group, e))?;
            Ok(to)
        })
    }

    fn step_down(
        &self,
        to: Option<NodeId>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<NodeId, ControlError>> + Send + '_>,
    > {
        Box::pin(async move {
            let (me, voters) = {
                let m = self.handover.raft().metrics();
                let m = m.borrow();
                let voters: Vec<NodeId> = m.membership_config.voter_ids().collect();
                (m.id, voters)
            };
            match to {
                // Asked to lead, it does: nothing to move.
                Some(t) if t == me => return Ok(me),
                Some(t) if !voters.contains(&t) => {
                    return Err(ControlError::Invalid(format!(
                        "node {t} is not a voter of the cluster (voters: {voters:?})"
                    )));
                }
                None if voters.len() < 2 => {
                    return Err(ControlError::Invalid(
                        "this node is the cluster's only voter".into(),
                    ));
                }
                _ => {}
            }
            self.handover.hand_over(to).await.ok_or_else(|| {
                ControlError::NotNow(
                    "no other voter caught up with the leader's log in time (is it down or far \
                     behind? see `cluster status`); this node goes on leading"
                        .into(),
                )
            })
        })
    }
}

/// Group `group` as this node sees it (`raft` is its Raft); on a node of
/// several groups, also `groups`: each of them as this node sees it (a
/// group's followers' positions are known only where it is led).
fn node_status(group: GroupId, raft: &super::Raft, node: &NodeGroups) -> serde_json::Value {
    let drained = crate::storage::drained_nodes(&node.zero);
    let mut status = cluster_status(raft, &drained);
    status["group"] = group.into();
    status["drained"] = drained.iter().copied().collect();
    status["replication_factor"] = node.default_factor().into();
    status["replication"] = serde_json::json!({
        "factor": node.replication.factor,
        "formed_with": node.replication.formed_with,
    });
    if node.rafts.len() > 1 {
        let nodes = voters_of(&node.rafts[0].1).len();
        status["groups"] = node
            .rafts
            .iter()
            .map(|(g, raft)| {
                // A group of every node has this one (if it has not heard
                // from the group yet, it is about to); one of its own size
                // may not, and its leader describes it.
                let every = node.replication.sized(*g, nodes).is_none();
                let mut s = if every || is_member(raft) {
                    cluster_status(raft, &drained)
                } else {
                    led_status(*g, node.directory.get(*g), &drained)
                };
                s["group"] = (*g).into();
                s
            })
            .collect();
    }
    status
}

/// A membership change of group `group` that failed: this node no longer
/// leads the group (ask its new leader again), or another reason.
fn control_error(group: GroupId, e: super::WriteError) -> ControlError {
    match e {
        super::WriteError::NotLeader { .. } => ControlError::Moved(format!(
            "this node stopped leading group {group} during the change; ask again (the group's \
             new leader finishes it)"
        )),
        e => ControlError::NotNow(format!("group {group}: {e}")),
    }
}

/// The voters of `raft`'s group, as this node knows them.
fn voters_of(raft: &super::Raft) -> Vec<NodeId> {
    raft.metrics()
        .borrow()
        .membership_config
        .voter_ids()
        .collect()
}

/// Whether this node is a member (a voter or a learner) of `raft`'s group.
fn is_member(raft: &super::Raft) -> bool {
    let m = raft.metrics();
    let m = m.borrow();
    m.membership_config.membership().get_node(&m.id).is_some()
}

/// A group this node is not a member of, as its leader last described it
/// to this node (its members' positions are known only to the leader).
fn led_status(
    group: GroupId,
    led: Option<(NodeId, super::net::Led)>,
    drained: &std::collections::BTreeSet<NodeId>,
) -> serde_json::Value {
    let Some((leader, led)) = led else {
        return serde_json::json!({ "group": group, "member": false, "leader": null, "nodes": [] });
    };
    let nodes: Vec<serde_json::Value> = led
        .nodes
        .iter()
        .map(|(id, addr)| {
            let role = match (*id == leader, led.voters.contains(id)) {
                (true, _) => "leader",
                (false, true) => "follower",
                (false, false) => "learner",
            };
            serde_json::json!({
                "id": id,
                "addr": client_addr(addr).map(|a| a.to_string()),
                "role": role,
                "drained": drained.contains(id),
            })
        })
        .collect();
    serde_json::json!({
        "group": group,
        "member": false,
        "leader": leader,
        "term": led.term,
        "nodes": nodes,
    })
}

/// The cluster as the leader sees it: nodes, roles, how far each
/// follower's log matches the leader's, and which nodes are `drained`.
fn cluster_status(
    raft: &super::Raft,
    drained: &std::collections::BTreeSet<NodeId>,
) -> serde_json::Value {
    let m = raft.metrics().borrow().clone();
    let last = m.last_log_index.unwrap_or(0);
    let replication = m.replication.clone().unwrap_or_default();
    let voters: std::collections::BTreeSet<NodeId> = m.membership_config.voter_ids().collect();
    let nodes: Vec<serde_json::Value> = m
        .membership_config
        .nodes()
        .map(|(id, n)| {
            let leader = m.current_leader == Some(*id);
            let matched = if leader {
                Some(last)
            } else {
                replication.get(id).and_then(|l| l.map(|l| l.index))
            };
            let role = match (leader, voters.contains(id)) {
                (true, _) => "leader",
                (false, true) => "follower",
                (false, false) => "learner",
            };
            serde_json::json!({
                "id": id,
                "addr": client_addr(&n.addr).map(|a| a.to_string()),
                "role": role,
                "drained": drained.contains(id),
                "matched": matched,
                "behind": matched.map(|i| last.saturating_sub(i)),
            })
        })
        .collect();
    serde_json::json!({
        "node": m.id,
        "leader": m.current_leader,
        "term": m.current_term,
        "last_log": m.last_log_index,
        "committed": m.last_applied.map(|l| l.index),
        "snapshot": m.snapshot.map(|l| l.index),
        "purged": m.purged.map(|l| l.index),
        "quorum_ack_ms": m.millis_since_quorum_ack,
        "nodes": nodes,
    })
}

/// Waits until this node is the leader and has applied every entry
/// committed before its term (so its tables are complete).
async fn until_ready_leader(node: &ClusterNode) {
    let mut metrics = node.raft().metrics();
    loop {
        if metrics.borrow().state == ServerState::Leader {
            tracing::debug!("leader: making sure every committed entry is applied");
            match node.raft().ensure_linearizable().await {
                Ok(_) => return,
                Err(e) => tracing::debug!(error = %e, "not yet a ready leader"),
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), metrics.changed()).await;
    }
}

/// Waits until this node is no longer the leader of `term`.
async fn until_not_leader(node: &ClusterNode, term: u64) {
    let mut metrics = node.raft().metrics();
    loop {
        {
            let m = metrics.borrow_and_update();
            if m.state != ServerState::Leader || m.current_term != term {
                return;
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Serves the node's `/metrics` on `listener` until `stop` is set: the
/// families of every router in `routers`, the node's place in each group
/// (`status`), and its files; bound beyond loopback, to the tokens of
/// `cluster-admin` principals in the node's replica of group 0.
fn serve_metrics(
    cfg: &ClusterServe,
    listener: std::net::TcpListener,
    zero: &ClusterNode,
    status: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    groups: GroupId,
    routers: Routers,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "metrics not served");
            return None;
        }
    };
    let db = zero.state().database().clone();
    let (auth, data) = (cfg.router.auth.clone(), cfg.router.data.clone());
    let metrics = NodeMetrics {
        status,
        data: cfg.router.data.clone(),
        databases: (0..groups)
            .map(|g| (g, group_dir(&cfg.router.data, g).join("switchyard.redb")))
            .collect(),
        routers,
        admits: Box::new(move |token| {
            crate::auth::token_may(
                &auth,
                &data,
                crate::auth::stored_principals(&db),
                token,
                crate::auth::Class::ClusterAdmin,
                "*",
            )
        }),
    };
    Some(tokio::spawn(serve_node(listener, metrics, async move {
        let _ = stop.wait_for(|s| *s).await;
    })))
}

/// The node's client endpoint, shared by its groups: it reads the group a
/// connection's handshake names (its ALPN, [`crate::protocol::alpn`]) and
/// hands the connection to that group's router while this node leads the
/// group, or closes it with [`close::NOT_LEADER`] and the address of the
/// node that does.
pub(crate) struct Dispatch {
    me: NodeId,
    /// Each group's leader as this node knows it.
    views: BTreeMap<GroupId, LeaderView>,
    /// The leaders of the groups this node is not a member of.
    directory: Arc<Directory>,
    /// The routers serving now, by group.
    routes: Mutex<BTreeMap<GroupId, mpsc::Sender<quinn::Connecting>>>,
    /// The node's client address.
    local_addr: SocketAddr,
}

/// The leaders of the cluster's groups as they say themselves
/// ([`super::net::Request::Led`]), gathered from every node every
/// [`GATHER_EVERY`]: how a node learns who leads a group it is not a
/// member of (a group of fewer voters than the cluster has nodes).
#[derive(Default)]
pub(crate) struct Directory {
    /// Each group's leader (the highest term heard) and what it said.
    led: Mutex<BTreeMap<GroupId, (NodeId, super::net::Led)>>,
}

/// How often a node asks the others which groups they lead.
const GATHER_EVERY: Duration = Duration::from_millis(500);

impl Directory {
    /// Group `group`'s leader and its Raft address, if one answered.
    fn leader(&self, group: GroupId) -> Option<(NodeId, String)> {
        let led = self.led.lock().expect("directory lock");
        let (leader, l) = led.get(&group)?;
        let addr = l.nodes.iter().find(|(id, _)| id == leader)?.1.clone();
        Some((*leader, addr))
    }

    /// Every group as its leader describes it, for the balancer.
    fn views(&self) -> Vec<super::balance::GroupView> {
        self.led
            .lock()
            .expect("directory lock")
            .iter()
            .map(|(g, (leader, l))| super::balance::GroupView {
                group: *g,
                leader: Some(*leader),
                mine: false,
                voters: l.voters.clone(),
            })
            .collect()
    }

    /// Group `group`'s leader and what it said of the group.
    fn get(&self, group: GroupId) -> Option<(NodeId, super::net::Led)> {
        self.led
            .lock()
            .expect("directory lock")
            .get(&group)
            .cloned()
    }
}

/// Fills `directory` until aborted: every [`GATHER_EVERY`], asks each node
/// of the cluster (group 0's members, which are every node) which groups
/// it leads, through the fault seam as Raft's own RPCs go.
async fn gather(
    me: NodeId,
    host: RaftHost,
    faults: Arc<dyn super::net::Faults>,
    zero: super::Raft,
    directory: Arc<Directory>,
) {
    let network = host.network(me, 0, faults);
    let mut tick = tokio::time::interval(GATHER_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let peers: Vec<(NodeId, String)> = {
            let m = zero.metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != me)
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect()
        };
        let asked = futures::future::join_all(peers.into_iter().map(|(id, addr)| {
            let mut peer = network.peer(id, &addr);
            async move { (id, peer.led(GATHER_EVERY).await) }
        }))
        .await;
        let mut led: BTreeMap<GroupId, (NodeId, super::net::Led)> = BTreeMap::new();
        let answers = asked
            .into_iter()
            .filter_map(|(id, r)| Some((id, r.ok()?)))
            .chain(std::iter::once((me, host.led())));
        for (id, groups) in answers {
            for l in groups {
                if led
                    .get(&l.group)
                    .is_none_or(|(_, known)| known.term < l.term)
                {
                    led.insert(l.group, (id, l));
                }
            }
        }
        *directory.led.lock().expect("directory lock") = led;
    }
}

/// How long a connection has to get far enough in its handshake to name
/// its group (or, redirected, to finish it).
const DISPATCH_HANDSHAKE: Duration = Duration::from_secs(2);

/// Connections waiting for a router that is opening (or busy accepting).
const ROUTE_QUEUE: usize = 1024;

impl Dispatch {
    /// Starts dispatching the connections of `endpoint` (bound at
    /// `local_addr`) among `nodes`, this node's members of its groups,
    /// until the task it returns is aborted.
    fn start(
        me: NodeId,
        nodes: &BTreeMap<GroupId, ClusterNode>,
        directory: Arc<Directory>,
        endpoint: &quinn::Endpoint,
        local_addr: SocketAddr,
        limits: &RouterConfig,
    ) -> (Arc<Dispatch>, tokio::task::JoinHandle<()>) {
        let dispatch = Arc::new(Dispatch {
            me,
            views: nodes.iter().map(|(g, n)| (*g, n.leader_view())).collect(),
            directory,
            routes: Mutex::default(),
            local_addr,
        });
        let d = dispatch.clone();
        let e = endpoint.clone();
        // The routers' limits on handshakes apply before any TLS work here
        // too, or a flood of handshakes from one address would cost the
        // node the TLS work the routers refuse to do; each router then
        // admits the connections it is handed as it does its own.
        let per_address = PerAddress::new(usize::MAX, limits.max_handshakes_per_address);
        let most = limits.max_connections;
        let task = tokio::spawn(async move {
            // Owned here, so stopping aborts the handshakes in progress.
            let mut handshakes = tokio::task::JoinSet::new();
            while let Some(incoming) = e.accept().await {
                while handshakes.try_join_next().is_some() {}
                let remote = incoming.remote_address();
                let Ok(held) = per_address.admit(remote.ip()).map_err(drop) else {
                    tracing::info!(%remote, "connection refused: handshakes in progress per address");
                    incoming.refuse();
                    continue;
                };
                if handshakes.len() >= most {
                    tracing::warn!(%remote, "connection refused: max_connections handshakes in progress");
                    incoming.refuse();
                    continue;
                }
                let Ok(mut connecting) = incoming.accept() else {
                    continue;
                };
                let d = d.clone();
                handshakes.spawn(async move {
                    let _held = held;
                    let group =
                        match tokio::time::timeout(DISPATCH_HANDSHAKE, connecting.handshake_data())
                            .await
                        {
                            Ok(Ok(data)) => data
                                .downcast::<quinn::crypto::rustls::HandshakeData>()
                                .ok()
                                .and_then(|h| h.protocol)
                                .and_then(|p| crate::protocol::alpn_group(&p)),
                            _ => None,
                        };
                    // The TLS layer accepts only the ALPNs of the node's
                    // groups, so a handshake that got this far names one.
                    if let Some(group) = group {
                        d.dispatch(group, connecting);
                    }
                });
            }
        });
        (dispatch, task)
    }

    /// Hands `connecting` to `group`'s router, or redirects it.
    fn dispatch(self: &Arc<Self>, group: GroupId, connecting: quinn::Connecting) {
        let route = self
            .routes
            .lock()
            .expect("dispatch lock")
            .get(&group)
            .cloned();
        let connecting = match route {
            Some(tx) => match tx.try_send(connecting) {
                Ok(()) => return,
                Err(e) => e.into_inner(),
            },
            None => connecting,
        };
        self.redirect(group, connecting);
    }

    /// Closes `connecting` with `NOT_LEADER` and the client address of
    /// `group`'s leader: as this node's member of the group knows it, or,
    /// for a group this node is not a member of, as its leader last said.
    /// Not this node: a leader that stopped serving (cut off from the
    /// others, or stopping) sends clients to try the others.
    fn redirect(&self, group: GroupId, connecting: quinn::Connecting) {
        let to = match self.views.get(&group) {
            Some(view) if view.is_member() => view.live_leader(),
            _ => self.directory.leader(group),
        }
        .filter(|(l, _)| *l != self.me)
        .and_then(|(_, addr)| client_addr(&addr))
        .map(|a| a.to_string())
        .unwrap_or_default();
        tokio::spawn(async move {
            if let Ok(Ok(conn)) = tokio::time::timeout(DISPATCH_HANDSHAKE, connecting).await {
                conn.close(close::NOT_LEADER.into(), to.as_bytes());
            }
        });
    }

    /// The connections of `group` from now on, for the router that is
    /// about to serve it.
    fn route(self: &Arc<Self>, group: GroupId) -> NodeClients {
        let (tx, rx) = mpsc::channel(ROUTE_QUEUE);
        self.routes.lock().expect("dispatch lock").insert(group, tx);
        let d = self.clone();
        NodeClients::new(
            rx,
            self.local_addr,
            Arc::new(move |connecting| d.redirect(group, connecting)),
        )
    }

    /// Redirects `group`'s connections again.
    fn unroute(&self, group: GroupId) {
        self.routes.lock().expect("dispatch lock").remove(&group);
    }
}
