//! `switchyard serve --node-id N --cluster A,B,C`: a router that is one
//! node of a replicated cluster.
//!
//! Every node runs a Raft member ([`ClusterNode`]). The leader serves
//! clients: it opens the replicated tables as its storage (every commit
//! replicated before it is acknowledged) and runs the whole router on its
//! client address. A follower answers every connection on its client
//! address by closing it with [`close::NOT_LEADER`] and the leader's
//! address, which clients follow. When leadership moves, the old leader
//! stops its router (its clients reconnect and follow) and the new one
//! starts its router once it has applied every committed entry.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;

use super::replicate::LeaderReplicator;
use super::tls::NodeTls;
use super::{ClusterNode, NodeConfig, NodeId, Timing};
use crate::protocol::close;
use crate::server::metrics::{FollowerMetrics, serve_follower};
use crate::server::{Replica, Router, RouterConfig, StartError, StepDownError, tls};
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
    /// The router this node runs while it leads (`listen` is its client
    /// address, `data` its data directory).
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
}

/// Runs a cluster node until `shutdown` completes.
pub async fn run(
    cfg: ClusterServe,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let node_tls = load_node_tls(&cfg.router.data)?;
    let raft_members = cfg
        .members
        .iter()
        .map(|(id, a)| (*id, raft_addr(*a)))
        .collect();
    let mut nc = NodeConfig::new(cfg.node_id, raft_members, cfg.router.data.clone(), node_tls);
    nc.timing = cfg.timing.clone();
    nc.join = cfg.join;
    nc.faults = cfg.faults.clone();
    nc.disk = cfg.disk.clone();
    let node = ClusterNode::start(nc)
        .await
        .map_err(|e| StartError::Config(format!("cluster node: {e}")))?;
    tracing::info!(node = cfg.node_id, members = ?cfg.members, "cluster node started");
    tokio::pin!(shutdown);
    let mut incarnation = crate::storage::now_ms() << 8;
    let clients =
        quinn::Endpoint::server(Redirect::config(&cfg)?, cfg.router.listen).map_err(|source| {
            StartError::Bind {
                addr: cfg.router.listen,
                source,
            }
        })?;
    let metrics = match cfg.router.metrics {
        Some(addr) => {
            let bind = |source| StartError::MetricsBind { addr, source };
            let l = std::net::TcpListener::bind(addr).map_err(bind)?;
            l.set_nonblocking(true).map_err(bind)?;
            Some(Arc::new(l))
        }
        None => None,
    };
    loop {
        // Following: point clients at the leader until this node leads.
        let redirect = Redirect::start(&cfg, &node, &clients)?;
        let follower_metrics = metrics
            .as_ref()
            .and_then(|l| FollowerEndpoint::start(&cfg, &node, l));
        let ready = tokio::select! {
            () = &mut shutdown => Ok(false),
            () = until_ready_leader(&node) => Ok(true),
            why = raft_stopped(&node) => Err(why),
        };
        redirect.stop();
        if let Some(m) = follower_metrics {
            m.stop();
        }
        match ready {
            Ok(true) => {}
            Ok(false) => break,
            Err(why) => return Err(stopped(node, why).await),
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
        rc.replica = Some(Replica {
            db: node.state().database().clone(),
            replicator: Arc::new(replicator),
            control: Arc::new(Control {
                handover: node.handover(),
            }),
            endpoint: clients.clone(),
            metrics: metrics.clone(),
        });
        let opening = std::time::Instant::now();
        let router = match Router::start(rc).await {
            Ok(r) => r,
            Err(e) => {
                handoff.set_serving(false);
                node.shutdown().await;
                return Err(e);
            }
        };
        tracing::info!(node = cfg.node_id, term, opened_in = ?opening.elapsed(), "leading: serving clients");
        let ending = tokio::select! {
            () = &mut shutdown => Ending::Shutdown,
            () = until_not_leader(&node, term) => Ending::Handover,
            () = quorum_lost(&node, cfg.timing.step_down) => {
                tracing::warn!(
                    node = cfg.node_id,
                    after = ?cfg.timing.step_down,
                    "no answer from a majority of the cluster: this node is probably cut off; \
                     it stops serving clients (they go to the other nodes) and refuses the \
                     commits that wait (they were not acknowledged)"
                );
                handoff.abandon("this node lost contact with a majority of the cluster");
                Ending::Handover
            }
            why = raft_stopped(&node) => Ending::Fatal(why),
            // A failed sync of the tables (a checkpoint): as on a single
            // router, nothing more may be acknowledged; a restart recovers
            // from the Raft log.
            why = router.storage_failed() => Ending::Fatal(format!("storage failed: {why}")),
        };
        if let Ending::Handover = ending {
            tracing::info!(
                node = cfg.node_id,
                "no longer serving as leader: handing clients over"
            );
        }
        // A commit queued before the stop waits for a majority; if that
        // majority is gone it never comes, so after a while the waiting
        // commits are refused (nothing of them was acknowledged), which
        // lets the router finish.
        let stopping = router.shutdown();
        tokio::pin!(stopping);
        if tokio::time::timeout(Duration::from_secs(5), &mut stopping)
            .await
            .is_err()
        {
            tracing::warn!(
                "commits are waiting for a majority that does not answer; refusing them \
                 so that the router can stop (they were not acknowledged)"
            );
            handoff.abandon("the router is stopping and no majority answers");
            stopping.await;
        }
        handoff.set_serving(false);
        match ending {
            Ending::Handover => {}
            Ending::Shutdown => {
                hand_over(&cfg, &node, &clients).await;
                break;
            }
            Ending::Fatal(why) => return Err(stopped(node, why).await),
        }
    }
    clients.close(close::NOT_LEADER.into(), b"");
    let _ = tokio::time::timeout(Duration::from_secs(1), clients.wait_idle()).await;
    node.shutdown().await;
    Ok(())
}

/// A stopping leader's last act: leadership moves to a follower that holds
/// the whole log ([`ClusterNode::hand_over`]) in one round trip, while this
/// node's client address redirects the clients its router just closed, so
/// that they reach the new leader without waiting out an election.
async fn hand_over(cfg: &ClusterServe, node: &ClusterNode, clients: &quinn::Endpoint) {
    let redirect = match Redirect::start(cfg, node, clients) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::debug!(error = %e, "no redirect during the handover");
            None
        }
    };
    if let Some(to) = node.hand_over().await {
        tracing::info!(node = cfg.node_id, to, "stopping: leadership handed over");
        // Clients closed by the router a moment ago come back here first.
        tokio::time::sleep(HANDOVER_LINGER).await;
    }
    if let Some(r) = redirect {
        r.stop();
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

/// Stops a node whose Raft stopped on its own; the error makes the
/// process exit non-zero, so that a supervisor restarts it (from its
/// files, catching up from the others) instead of it lingering.
async fn stopped(node: ClusterNode, why: String) -> StartError {
    tracing::error!(error = %why, "the cluster node stopped; exiting");
    node.shutdown().await;
    StartError::ClusterStopped(why)
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

/// The admin protocol's hold on the cluster, on the leader.
struct Control {
    /// The group's handover, and through it its Raft.
    handover: super::node::Handover,
}

impl crate::server::ClusterControl for Control {
    fn status(&self) -> serde_json::Value {
        cluster_status(self.handover.raft())
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
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            super::node::add_node(self.handover.raft(), id, raft_addr(addr))
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn remove_node(
        &self,
        id: NodeId,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            super::node::remove_node(self.handover.raft(), id)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn step_down(
        &self,
        to: Option<NodeId>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<NodeId, StepDownError>> + Send + '_>,
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
                    return Err(StepDownError::Invalid(format!(
                        "node {t} is not a voter of the cluster (voters: {voters:?})"
                    )));
                }
                None if voters.len() < 2 => {
                    return Err(StepDownError::Invalid(
                        "this node is the cluster's only voter".into(),
                    ));
                }
                _ => {}
            }
            self.handover.hand_over(to).await.ok_or_else(|| {
                StepDownError::NotNow(
                    "no other voter caught up with the leader's log in time (is it down or far \
                     behind? see `cluster status`); this node goes on leading"
                        .into(),
                )
            })
        })
    }
}

/// The cluster as the leader sees it: nodes, roles, how far each
/// follower's log matches the leader's.
fn cluster_status(raft: &super::Raft) -> serde_json::Value {
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

/// A following node's `/metrics`, on the node's metrics listener.
struct FollowerEndpoint {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl FollowerEndpoint {
    fn start(
        cfg: &ClusterServe,
        node: &ClusterNode,
        listener: &std::net::TcpListener,
    ) -> Option<FollowerEndpoint> {
        let listener = match listener
            .try_clone()
            .and_then(tokio::net::TcpListener::from_std)
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "follower metrics not served");
                return None;
            }
        };
        let raft = node.raft().clone();
        let db = node.state().database().clone();
        let (auth, data) = (cfg.router.auth.clone(), cfg.router.data.clone());
        let metrics = FollowerMetrics {
            status: Box::new(move || cluster_status(&raft)),
            data: cfg.router.data.clone(),
            admits: Box::new(move |token| {
                crate::auth::token_may(
                    &auth,
                    &data,
                    stored_principals(&db),
                    token,
                    crate::auth::Class::ClusterAdmin,
                    "*",
                )
            }),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve_follower(listener, metrics, async move {
            let _ = stopped.await;
        }));
        Some(FollowerEndpoint { stop, task })
    }

    /// Stops accepting at once; a scrape in progress has a second to
    /// finish in the background, so a new leader's router does not wait
    /// for it.
    fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        tokio::spawn(async move {
            if tokio::time::timeout(Duration::from_secs(1), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        });
    }
}

/// The replicated principals (name, JSON record), as a follower reads them.
fn stored_principals(db: &redb::Database) -> Vec<(String, Vec<u8>)> {
    use redb::{ReadableDatabase, ReadableTable};
    let Ok(txn) = db.begin_read() else {
        return Vec::new();
    };
    let Ok(table) = txn.open_table(crate::storage::tables::PRINCIPALS) else {
        return Vec::new();
    };
    let Ok(rows) = table.iter() else {
        return Vec::new();
    };
    rows.filter_map(Result::ok)
        .map(|(k, v)| (k.value().to_string(), v.value().to_vec()))
        .collect()
}

/// A follower's service on the node's client endpoint: every connection
/// is closed with `NOT_LEADER` and the leader's client address.
struct Redirect {
    task: tokio::task::JoinHandle<()>,
}

impl Redirect {
    /// The endpoint's configuration while redirecting: the router's TLS
    /// identity, and a short idle timeout (a redirect is one handshake).
    fn config(cfg: &ClusterServe) -> Result<quinn::ServerConfig, StartError> {
        let crypto = tls::server_crypto(
            &cfg.router.cert_paths(),
            cfg.router.auth.client_ca.as_deref(),
        )?;
        let mut server = quinn::ServerConfig::with_crypto(crypto);
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(
            Duration::from_secs(2)
                .try_into()
                .expect("a valid idle timeout"),
        ));
        server.transport_config(Arc::new(transport));
        Ok(server)
    }

    /// Redirects the clients of `endpoint` until stopped; connections
    /// that arrived while the router stopped are waiting in it and are
    /// redirected first.
    fn start(
        cfg: &ClusterServe,
        node: &ClusterNode,
        endpoint: &quinn::Endpoint,
    ) -> Result<Redirect, StartError> {
        endpoint.set_server_config(Some(Self::config(cfg)?));
        let view = node.leader_view();
        let me = cfg.node_id;
        let e = endpoint.clone();
        let task = tokio::spawn(async move {
            // Owned here, so stopping the redirect aborts the handshakes in
            // progress too.
            let mut closing = tokio::task::JoinSet::new();
            while let Some(incoming) = e.accept().await {
                // Not itself: a leader that stopped serving (cut off from
                // the others) sends clients to try the others.
                let to = view
                    .live_leader()
                    .filter(|(l, _)| *l != me)
                    .and_then(|(_, addr)| client_addr(&addr))
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                closing.spawn(async move {
                    if let Ok(Ok(conn)) =
                        tokio::time::timeout(Duration::from_secs(2), incoming).await
                    {
                        conn.close(close::NOT_LEADER.into(), to.as_bytes());
                    }
                });
                while closing.try_join_next().is_some() {}
            }
        });
        Ok(Redirect { task })
    }

    /// Stops redirecting; the endpoint stays bound for the router.
    fn stop(self) {
        self.task.abort();
    }
}
