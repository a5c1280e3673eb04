//! One member of a Raft group, started from a data directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};

use super::log_store::{LogFile, LogStore};
use super::net::{Faults, GroupId, Member, Network, NoFaults, RaftHost};
use super::state::StateMachine;
use super::tls::NodeTls;
use super::{Command, LogId, NodeId, Raft};
use crate::storage::disk::{Disk, OsDisk};

/// Election and heartbeat timing. Loopback clusters on a loaded 2-core
/// machine need more slack than the openraft defaults.
#[derive(Clone, Debug)]
pub struct Timing {
    /// How often a leader sends heartbeats.
    pub heartbeat: Duration,
    /// A follower that hears nothing for a random time in this range
    /// starts an election.
    pub election: (Duration, Duration),
    /// Entries applied since the last snapshot before a new one is
    /// considered (see `snapshot_log_bytes`).
    pub snapshot_every: u64,
    /// A new snapshot is built once the log has grown by this many bytes
    /// since the last one, or by the last snapshot's size if larger: a
    /// snapshot costs a pass over all the data, so it is built when the log
    /// it lets go of is worth as much (the cost stays in proportion to what
    /// is written, however large the data).
    pub snapshot_log_bytes: u64,
    /// Entries kept in the log behind a snapshot, so a briefly lagging
    /// follower catches up from the log instead of a whole snapshot.
    pub keep_logs: u64,
    /// A leader that has had no answer from a majority for this long
    /// stops serving clients (they go to the other nodes), refusing the
    /// commits that wait: it is probably cut off, and the others elect a
    /// leader after the election timeout.
    pub step_down: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat: Duration::from_millis(100),
            election: (Duration::from_millis(500), Duration::from_millis(1000)),
            snapshot_every: 10_000,
            snapshot_log_bytes: 64 << 20,
            keep_logs: 10_000,
            step_down: Duration::from_secs(2),
        }
    }
}

/// What a node needs to start.
pub struct NodeConfig {
    /// This node's id.
    pub id: NodeId,
    /// Every member's Raft address, this node's included.
    pub members: BTreeMap<NodeId, SocketAddr>,
    /// Where the log (`raft.redb`) and tables (`switchyard.redb`) live.
    pub dir: PathBuf,
    /// This node's certificate under the cluster CA.
    pub tls: NodeTls,
    /// The network seam (tests cut and delay links here).
    pub faults: Arc<dyn Faults>,
    /// Join an existing group (`cluster add-node`) instead of forming one
    /// with `members`: the node waits for the leader to add it.
    pub join: bool,
    /// Election and heartbeat timing.
    pub timing: Timing,
    /// The files' seam (tests cut the power or fail syncs here).
    pub disk: Arc<dyn Disk>,
    /// Which group this is (0 for a cluster of one group).
    pub group: GroupId,
    /// The node's Raft endpoint, shared with its other groups; `None`
    /// binds one of its own at this node's address in `members`.
    pub host: Option<RaftHost>,
    /// The node's Raft log file, shared with its other groups (one sync
    /// for all); `None` opens `raft.redb` in `dir` for this group alone.
    pub log: Option<LogFile>,
    /// The members the group is formed with when they are not all of
    /// `members` (a group of fewer voters than the cluster has nodes). A
    /// node outside them waits, as a joining node does, until the group's
    /// leader adds it (a replica moved to it), if ever.
    pub founders: Option<Vec<NodeId>>,
}

impl NodeConfig {
    /// A node with no faults and default timing.
    pub fn new(
        id: NodeId,
        members: BTreeMap<NodeId, SocketAddr>,
        dir: PathBuf,
        tls: NodeTls,
    ) -> NodeConfig {
        NodeConfig {
            id,
            members,
            dir,
            tls,
            faults: Arc::new(NoFaults),
            join: false,
            timing: Timing::default(),
            disk: Arc::new(OsDisk),
            group: 0,
            host: None,
            log: None,
            founders: None,
        }
    }
}

/// Why a replicated write was not committed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// This node is not the leader; `leader` is the one it knows of.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader's id, if known.
        leader: Option<NodeId>,
        /// The leader's Raft address, if known.
        addr: Option<String>,
    },
    /// The node is stopping or its storage failed.
    #[error("replication failed: {0}")]
    Failed(String),
}

/// How far behind the leader's log a learner may be when it is made a
/// voter: a few appends' worth, so that it takes its share of each
/// commit's majority at once.
const CATCH_UP_LAG: u64 = 64;

/// How long a new learner has to catch up before adding it gives up
/// (leaving it a learner, which holds no vote): time to start it and for
/// it to receive the log or a snapshot.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(600);

/// See [`ClusterNode::add_node`].
pub async fn add_node(raft: &Raft, id: NodeId, addr: SocketAddr) -> Result<(), WriteError> {
    let node = BasicNode::new(addr.to_string());
    // openraft's blocking add counts a learner that has answered nothing
    // as up to date while the log is shorter than its lag threshold
    // (5,000 entries), so a node not even started became a voter at once:
    // a group of three then needed three of four to commit. The learner
    // is waited for here instead, until its log matches the leader's.
    raft.add_learner(id, node, false)
        .await
        .map_err(membership_error)?;
    let mut metrics = raft.metrics();
    let caught_up = tokio::time::timeout(CATCH_UP_LIMIT, async {
        loop {
            {
                let m = metrics.borrow_and_update();
                if m.state != ServerState::Leader {
                    return Err(WriteError::NotLeader {
                        leader: m.current_leader,
                        addr: None,
                    });
                }
                if m.membership_config.membership().get_node(&id).is_none() {
                    return Err(WriteError::Failed(format!(
                        "node {id} was removed while it caught up"
                    )));
                }
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .map(|l| l.index);
                let last = m.last_log_index.unwrap_or(0);
                if matched.is_some_and(|i| i + CATCH_UP_LAG >= last) {
                    return Ok(());
                }
            }
            if metrics.changed().await.is_err() {
                return Err(WriteError::Failed("the group is stopping".into()));
            }
        }
    })
    .await;
    match caught_up {
        Ok(r) => r?,
        Err(_) => {
            return Err(WriteError::Failed(format!(
                "node {id} did not catch up within {} s: it stays a learner, which holds no \
                 vote; take it out with `switchyard cluster remove-node --id {id}` (a node \
                 being added must be started, with the serve line add-node prints, within \
                 that time)",
                CATCH_UP_LIMIT.as_secs()
            )));
        }
    }
    let voters: std::collections::BTreeSet<NodeId> = [id].into();
    raft.change_membership(openraft::ChangeMembers::AddVoterIds(voters), false)
        .await
        .map_err(membership_error)?;
    Ok(())
}

/// See [`ClusterNode::remove_node`].
pub async fn remove_node(raft: &Raft, id: NodeId) -> Result<(), WriteError> {
    let voters: std::collections::BTreeSet<NodeId> = [id].into();
    raft.change_membership(openraft::ChangeMembers::RemoveVoters(voters), false)
        .await
        .map_err(membership_error)?;
    Ok(())
}

fn membership_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> WriteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => WriteError::NotLeader {
            leader: f.leader_id,
            addr: f.leader_node.map(|n| n.addr),
        },
        e => WriteError::Failed(e.to_string()),
    }
}

/// A running member of a group.
pub struct ClusterNode {
    id: NodeId,
    group: GroupId,
    /// When a leader was last heard from (on a follower).
    contact: super::net::LeaderContact,
    raft: Raft,
    state: StateMachine,
    host: RaftHost,
    /// Whether `host` was bound for this group alone (closed with it).
    own_host: bool,
    handover: Handover,
    trigger: tokio::task::JoinHandle<()>,
    tracker: tokio::task::JoinHandle<()>,
}

/// Moves a group's leadership from this node to another
/// ([`Handover::hand_over`]); cheap to clone, so a balancer can hold one
/// per group.
#[derive(Clone)]
pub struct Handover {
    id: NodeId,
    raft: Raft,
    /// For RPCs of our own beside openraft's.
    network: Network,
    timing: Timing,
    /// When this node last became leader, and of which term.
    leading_since: Arc<std::sync::Mutex<Option<(u64, tokio::time::Instant)>>>,
    /// Writes in flight, and handovers holding new ones back.
    gate: WriteGate,
    /// Membership changes of the group under way on this leader
    /// ([`Handover::changing_members`]).
    changing: Arc<std::sync::atomic::AtomicUsize>,
}

/// A membership change under way ([`Handover::changing_members`]); it
/// ends when dropped.
pub struct Changing(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Changing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The writes of one group on this node, and the handovers that hold
/// them back. A handover stops new writes and waits for those in flight
/// to finish, so that a follower can hold the whole log at one moment:
/// under a steady stream of writes none would otherwise (Raft's
/// leadership transfer stops taking requests the same way). A write that
/// checked for a handover a moment before one began is in flight, and the
/// handover waits for it, so none slips past.
#[derive(Clone)]
pub struct WriteGate(Arc<tokio::sync::watch::Sender<Gate>>);

#[derive(Clone, Copy, Default)]
struct Gate {
    /// Handovers running (each holds new writes back until it ends).
    held: u32,
    /// Writes that entered and have not finished.
    in_flight: u32,
}

impl WriteGate {
    fn new() -> WriteGate {
        WriteGate(Arc::new(tokio::sync::watch::channel(Gate::default()).0))
    }

    /// Enters a write unless a handover holds writes back.
    fn try_enter(&self) -> Option<InFlight> {
        let mut entered = false;
        self.0.send_if_modified(|g| {
            entered = g.held == 0;
            if entered {
                g.in_flight += 1;
            }
            entered
        });
        entered.then(|| InFlight(self.0.clone()))
    }

    /// Enters a write, first waiting while a handover runs. The write is
    /// in flight until the returned guard is dropped.
    pub async fn enter(&self) -> InFlight {
        let mut rx = self.0.subscribe();
        loop {
            if let Some(w) = self.try_enter() {
                return w;
            }
            let _ = rx.wait_for(|g| g.held == 0).await;
        }
    }

    /// [`WriteGate::enter`] for a thread outside the runtime (the storage
    /// writer's), blocking it; also says whether it had to wait.
    pub fn enter_blocking(&self, runtime: &tokio::runtime::Handle) -> (InFlight, bool) {
        match self.try_enter() {
            Some(w) => (w, false),
            None => (runtime.block_on(self.enter()), true),
        }
    }

    /// Holds new writes back until the guard is dropped.
    fn hold(&self) -> Held {
        self.0.send_modify(|g| g.held += 1);
        Held(self.0.clone())
    }

    /// Waits until no write is in flight.
    async fn drained(&self) {
        let _ = self.0.subscribe().wait_for(|g| g.in_flight == 0).await;
    }
}

/// A write that entered the [`WriteGate`]; it ends when dropped.
pub struct InFlight(Arc<tokio::sync::watch::Sender<Gate>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|g| g.in_flight -= 1);
    }
}

/// A handover's hold on new writes; released when dropped (a count, so
/// one handover ending does not release another's).
struct Held(Arc<tokio::sync::watch::Sender<Gate>>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.send_modify(|g| g.held -= 1);
    }
}

/// The leader a client should be sent to, as a follower knows it, for
/// the redirect.
#[derive(Clone)]
pub struct LeaderView {
    me: NodeId,
    raft: Raft,
    contact: super::net::LeaderContact,
    silent_limit: Duration,
}

impl LeaderView {
    /// Whether this node is a member (a voter or a learner) of the group:
    /// a node outside it knows no leader of it.
    pub fn is_member(&self) -> bool {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&self.me)
            .is_some()
    }

    /// The leader's id and Raft address: none while an election is under
    /// way, and none once the leader has been silent for an election
    /// timeout. It probably crashed and the others will elect another;
    /// openraft names it until then, and a client sent to it would wait
    /// for a handshake that never comes.
    pub fn live_leader(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let leader = m.current_leader?;
        if leader != self.me && self.contact.silent_for() >= self.silent_limit {
            return None;
        }
        let node = m.membership_config.membership().get_node(&leader)?;
        Some((leader, node.addr.clone()))
    }
}

impl ClusterNode {
    /// Opens the node's files in `config.dir`, binds its Raft address and
    /// joins the group. A new group is formed by its members when each
    /// starts with the same member list; a node restarting from its files
    /// picks up where it was.
    pub async fn start(config: NodeConfig) -> Result<ClusterNode, WriteError> {
        let failed = |e: &dyn std::fmt::Display| WriteError::Failed(e.to_string());
        let addr = *config
            .members
            .get(&config.id)
            .ok_or_else(|| WriteError::Failed(format!("node {} is not a member", config.id)))?;
        std::fs::create_dir_all(&config.dir).map_err(|e| failed(&e))?;
        let disk = &*config.disk;
        let log = match &config.log {
            Some(file) => file.group(config.group),
            None => LogStore::open_on(disk, &config.dir.join("raft.redb")),
        }
        .map_err(|e| failed(&e))?;
        let appended = log.appended();
        let state = StateMachine::open_on(disk, &config.dir.join("switchyard.redb"))
            .map_err(|e| failed(&e))?;
        let (host, own_host) = match &config.host {
            Some(host) => (host.clone(), false),
            None => (
                RaftHost::bind(addr, &config.tls).map_err(|e| failed(&e))?,
                true,
            ),
        };
        let network = host.network(config.id, config.group, config.faults.clone());
        let t = &config.timing;
        let raft_config = Config {
            cluster_name: "switchyard".into(),
            heartbeat_interval: t.heartbeat.as_millis() as u64,
            election_timeout_min: t.election.0.as_millis() as u64,
            election_timeout_max: t.election.1.as_millis() as u64,
            install_snapshot_timeout: 30_000,
            // Built by `snapshot_trigger` instead.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: t.keep_logs,
            ..Default::default()
        }
        .validate()
        .map_err(|e| failed(&e))?;
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            network.clone(),
            log,
            state.clone(),
        )
        .await
        .map_err(|e| failed(&e))?;
        let founders: Vec<NodeId> = match &config.founders {
            Some(f) => f.clone(),
            None => config.members.keys().copied().collect(),
        };
        let members: BTreeMap<NodeId, BasicNode> = config
            .members
            .iter()
            .filter(|(id, _)| founders.contains(id))
            .map(|(id, a)| (*id, BasicNode::new(a.to_string())))
            .collect();
        // Every founding member initializes with the same list; on a node
        // that already has a log or a vote this is refused, which is fine.
        // A joining node must not: it would form a group of its own; nor
        // may a node outside the group's founders. The first member does
        // it at once and the others one election timeout apart, by rank,
        // so on a first start they vote for the first instead of each
        // standing in the same term: then the leader with the lower id was
        // deposed by the next one's vote a moment after it began to serve,
        // and its first clients' requests were lost with their connection.
        // A later member initializes only if it has heard from none before
        // its turn (the first is down). The order turns with the group
        // (group 1 starts at the second member, ...), so a new cluster's
        // groups are led by different nodes from the start: gathered on
        // the lowest id, they had to be handed over by the balancer while
        // the first clients came, who saw their routers stop under them.
        if !config.join && founders.contains(&config.id) {
            let ids: Vec<NodeId> = config.members.keys().copied().collect();
            let n = ids.len().max(1);
            let first = config.group as usize % n;
            let rank = (0..n)
                .map(|i| ids[(first + i) % n])
                .filter(|id| founders.contains(id))
                .take_while(|&id| id != config.id)
                .count() as u32;
            let wait = config.timing.election.1 * rank;
            let raft = raft.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                if let Err(e) = raft.initialize(members).await {
                    tracing::debug!(error = %e, "Raft group already initialized");
                }
            });
        }
        let contact = super::net::LeaderContact::new();
        host.register(
            config.group,
            Member {
                raft: raft.clone(),
                snapshots: state.snapshots().clone(),
                contact: contact.clone(),
            },
        );
        let trigger = tokio::spawn(snapshot_trigger(
            raft.clone(),
            appended,
            state.clone(),
            config.timing.clone(),
        ));
        let leading_since = Arc::default();
        let tracker = tokio::spawn(track_leadership(
            raft.clone(),
            Arc::clone(&leading_since),
            contact.clone(),
        ));
        Ok(ClusterNode {
            id: config.id,
            group: config.group,
            contact,
            raft: raft.clone(),
            state,
            host,
            own_host,
            handover: Handover {
                id: config.id,
                raft,
                network,
                timing: config.timing.clone(),
                leading_since,
                gate: WriteGate::new(),
                changing: Arc::default(),
            },
            trigger,
            tracker,
        })
    }

    /// Which group this is.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// What moves this group's leadership away from this node.
    pub fn handover(&self) -> Handover {
        self.handover.clone()
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Where this node would send a client: see [`LeaderView`].
    pub fn leader_view(&self) -> LeaderView {
        LeaderView {
            me: self.id,
            raft: self.raft.clone(),
            contact: self.contact.clone(),
            silent_limit: self.handover.timing.election.0,
        }
    }

    /// The replicated tables.
    pub fn state(&self) -> &StateMachine {
        &self.state
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Whether this node is the leader now.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Replicates one redo; returns once a majority holds it durably and
    /// this node has applied it. While this node hands leadership over, a
    /// new write waits for the handover, and if leadership moved it is
    /// refused with [`WriteError::NotLeader`] without having been proposed
    /// (so it may be sent to the new leader as it is).
    pub async fn write(&self, redo: impl Into<bytes::Bytes>) -> Result<LogId, WriteError> {
        let _in_flight = self.handover.gate.enter().await;
        match self
            .raft
            .client_write(Command {
                redo: redo.into(),
                origin: None,
            })
            .await
        {
            Ok(r) => Ok(r.log_id),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader {
                    leader: f.leader_id,
                    addr: f.leader_node.map(|n| n.addr),
                })
            }
            Err(e) => Err(WriteError::Failed(e.to_string())),
        }
    }

    /// Adds node `id` (its Raft address `addr`) to the group: first as a
    /// learner, which receives the log (or a snapshot) while writes go on;
    /// once it has caught up, as a voter. On the leader only.
    pub async fn add_node(&self, id: NodeId, addr: SocketAddr) -> Result<(), WriteError> {
        add_node(&self.raft, id, addr).await
    }

    /// Removes node `id` from the group (it may then be stopped and its
    /// files deleted). On the leader only; the leader may remove itself,
    /// and the others then elect one.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), WriteError> {
        remove_node(&self.raft, id).await
    }

    /// Every member's id and Raft address, and whether it votes.
    pub fn members(&self) -> Vec<(NodeId, String, bool)> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters: std::collections::BTreeSet<NodeId> = m.voter_ids().collect();
        m.nodes()
            .map(|(id, n)| (*id, n.addr.clone(), voters.contains(id)))
            .collect()
    }

    /// Hands leadership over before this leader stops (a rolling
    /// restart): see [`Handover::hand_over`].
    pub async fn hand_over(&self) -> Option<NodeId> {
        self.handover.hand_over(None).await
    }

    /// Stops this member: Raft, then the endpoint if it was its own (a
    /// shared one goes on serving the node's other groups). Its files
    /// stay for a restart.
    pub async fn shutdown(self) {
        self.trigger.abort();
        self.tracker.abort();
        let _ = self.raft.shutdown().await;
        self.host.unregister(self.group);
        if self.own_host {
            self.host.close().await;
        }
    }
}

impl Handover {
    /// The group's Raft on this node.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The gate this group's writes pass on this node. A writer that does
    /// not go through [`ClusterNode::write`] (a leader's router, through
    /// [`super::replicate::LeaderReplicator`]) enters it for each commit,
    /// or no follower would catch up under its writes.
    pub fn gate(&self) -> WriteGate {
        self.gate.clone()
    }

    /// Marks a change of the group's members under way (a node added, a
    /// replica moved) until the value returned is dropped: the balancer
    /// hands no such group over meanwhile, which would stop the router
    /// whose request runs it and leave the change half done.
    pub fn changing_members(&self) -> Changing {
        self.changing
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Changing(self.changing.clone())
    }

    /// Whether a change of the group's members is under way here.
    pub fn is_changing_members(&self) -> bool {
        self.changing.load(std::sync::atomic::Ordering::Acquire) > 0
    }

    /// Whether voter `node` answered this node's Raft RPCs within the last
    /// `within` (the balancer hands leadership only to one that did).
    pub fn answered_within(&self, node: NodeId, within: Duration) -> bool {
        node == self.id || self.network.answered_within(node, within)
    }

    /// Hands this group's leadership to another voter (to `to`, if given):
    /// waits until that voter holds the whole log, then asks it to stand for
    /// election at once (Raft's TimeoutNow). This leader grants it its vote
    /// (it is not bound by a leader lease of its own), so in a group of
    /// three the new leader is elected in one round trip, where the others
    /// would otherwise wait out the leader lease and an election timeout
    /// (1.5-2 s with the default timing). New writes through
    /// [`ClusterNode::write`] wait while it runs, and so do a leader's
    /// router's commits ([`Handover::gate`]). Returns
    /// the new leader, or `None` when this node does not lead or no voter
    /// took over within twice the election timeout once its lease allowed
    /// it (after a stop, the others then elect one as after a crash).
    pub async fn hand_over(&self, to: Option<NodeId>) -> Option<NodeId> {
        if self.raft.metrics().borrow().state != ServerState::Leader {
            return None;
        }
        // A leader grants a vote only once its own lease has run out since
        // it was elected (the lease is the election timeout's maximum):
        // a leader elected a moment ago waits for that first, while
        // writes go on.
        let since = self
            .leading_since
            .lock()
            .expect("leadership lock")
            .map(|(_, t)| t);
        if let Some(since) = since {
            tokio::time::sleep_until(since + self.timing.election.1 + Duration::from_millis(50))
                .await;
        }
        let limit = self.timing.election.1 * 2;
        let deadline = tokio::time::Instant::now() + limit;
        // From here until the handover ends, new writes through
        // `ClusterNode::write` wait: under a steady stream of them no
        // follower would hold the whole log at any one moment (Raft's
        // leadership transfer stops taking requests the same way).
        let _held = self.gate.hold();
        // Writes that entered a moment before the hold are still proposed:
        // a target matched before they are would be behind again.
        if tokio::time::timeout_at(deadline, self.gate.drained())
            .await
            .is_err()
        {
            tracing::info!("writes in flight did not finish in time for a handover");
            return None;
        }
        let mut metrics = self.raft.metrics();
        // A voter whose log matches this leader's last entry.
        let (target, addr) = loop {
            let found = {
                let m = metrics.borrow_and_update();
                if m.state != ServerState::Leader {
                    return None;
                }
                let last = m.last_log_index;
                let membership = m.membership_config.membership();
                let replication = m.replication.as_ref();
                membership
                    .voter_ids()
                    .filter(|&v| v != self.id && to.is_none_or(|t| t == v))
                    .filter(|v| replication.and_then(|r| r.get(v)?.map(|l| l.index)) == last)
                    .find_map(|v| membership.get_node(&v).map(|n| (v, n.addr.clone())))
            };
            if let Some(f) = found {
                break f;
            }
            if tokio::time::timeout_at(deadline, metrics.changed())
                .await
                .map_or(true, |r| r.is_err())
            {
                tracing::info!("no follower caught up in time to take over");
                return None;
            }
        };
        let mut peer = self.network.peer(target, &addr);
        if let Err(e) = peer.timeout_now(self.timing.election.1).await {
            tracing::info!(to = target, error = %e, "could not hand leadership over");
            return None;
        }
        let moved = tokio::time::timeout_at(
            deadline,
            metrics.wait_for(|m| m.current_leader.is_some_and(|l| l != self.id)),
        )
        .await;
        match moved {
            Ok(Ok(m)) => {
                let to = m.current_leader;
                tracing::info!(to = ?to, "leadership handed over");
                to
            }
            _ => {
                tracing::info!(to = target, "the handover did not complete in time");
                None
            }
        }
    }
}

/// Notes when this node becomes leader of a new term (see
/// [`ClusterNode::hand_over`]).
async fn track_leadership(
    raft: Raft,
    slot: Arc<std::sync::Mutex<Option<(u64, tokio::time::Instant)>>>,
    contact: super::net::LeaderContact,
) {
    let mut metrics = raft.metrics();
    loop {
        {
            let m = metrics.borrow_and_update();
            let mut s = slot.lock().expect("leadership lock");
            if m.state != ServerState::Leader {
                if s.is_some() {
                    // A leader is in contact with itself until it steps
                    // down: its redirect names the next leader at once
                    // (a handover), not only once that one's appends come.
                    contact.heard();
                }
                *s = None;
            } else if s.is_none_or(|(term, _)| term != m.current_term) {
                *s = Some((m.current_term, tokio::time::Instant::now()));
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Builds a snapshot when enough has been applied and appended since the
/// last one (see [`Timing::snapshot_log_bytes`]); openraft then purges the
/// log it covers.
async fn snapshot_trigger(
    raft: Raft,
    appended: Arc<std::sync::atomic::AtomicU64>,
    state: StateMachine,
    timing: Timing,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut mark = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let (applied, snapshot) = {
            let m = raft.metrics();
            let m = m.borrow();
            (
                m.last_applied.map_or(0, |l| l.index),
                m.snapshot.map_or(0, |l| l.index),
            )
        };
        let grown = appended.load(Relaxed).saturating_sub(mark);
        let need = timing.snapshot_log_bytes.max(state.snapshot_len());
        if applied.saturating_sub(snapshot) >= timing.snapshot_every && grown >= need {
            mark = appended.load(Relaxed);
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }
}
