//! A group of three nodes on loopback: real QUIC endpoints under a real
//! cluster CA, real redb files in temp dirs, openraft deciding.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::ReadableDatabase;

use super::net::{Fault, Faults, Partitions};
use super::tls::{ClusterCa, NodeTls};
use super::{ClusterNode, NodeConfig, NodeId, Timing, WriteError};
use crate::storage::disk::SimDisk;
use crate::storage::journal::Redo;
use crate::storage::tables::LOG;

struct Group {
    _dir: tempfile::TempDir,
    ca: ClusterCa,
    root: PathBuf,
    members: BTreeMap<NodeId, SocketAddr>,
    tls: BTreeMap<NodeId, NodeTls>,
    faults: Arc<Partitions>,
    /// What every node's RPCs pass through: `faults` unless a test gives
    /// its own.
    seam: Arc<dyn Faults>,
    /// Simulated disks by node (real files where a node has none).
    disks: BTreeMap<NodeId, Arc<SimDisk>>,
    timing: Timing,
    nodes: BTreeMap<NodeId, ClusterNode>,
}

pub(super) fn free_port() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap()
}

/// What three nodes on loopback need: a directory for their files, the
/// cluster CA, an address and a certificate each.
pub(super) fn three_members() -> (
    tempfile::TempDir,
    ClusterCa,
    BTreeMap<NodeId, SocketAddr>,
    BTreeMap<NodeId, NodeTls>,
) {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate().unwrap();
    let members: BTreeMap<NodeId, SocketAddr> = (1..=3).map(|id| (id, free_port())).collect();
    let tls = members
        .keys()
        .map(|&id| (id, ca.issue(id, &["127.0.0.1".into()]).unwrap()))
        .collect();
    (dir, ca, members, tls)
}

/// Timing for three nodes sharing two loaded cores.
pub(super) fn timing() -> Timing {
    Timing {
        heartbeat: Duration::from_millis(100),
        election: (Duration::from_millis(600), Duration::from_millis(1200)),
        ..Timing::default()
    }
}

impl Group {
    async fn start(timing: Timing) -> Group {
        let faults = Arc::new(Partitions::default());
        let mut g = Self::start_with(timing, faults.clone()).await;
        g.faults = faults;
        g
    }

    /// Starts three nodes whose RPCs pass through `seam`.
    async fn start_with(timing: Timing, seam: Arc<dyn Faults>) -> Group {
        Self::start_on(timing, seam, BTreeMap::new()).await
    }

    /// Starts three nodes whose RPCs pass through `seam` and whose files
    /// are on `disks` (real files for a node not in it).
    async fn start_on(
        timing: Timing,
        seam: Arc<dyn Faults>,
        disks: BTreeMap<NodeId, Arc<SimDisk>>,
    ) -> Group {
        let (dir, ca, members, tls) = three_members();
        let mut g = Group {
            ca,
            root: dir.path().to_path_buf(),
            _dir: dir,
            members,
            tls,
            faults: Arc::default(),
            seam,
            disks,
            timing,
            nodes: BTreeMap::new(),
        };
        for id in 1..=3 {
            g.up(id, false).await;
        }
        g
    }

    async fn up(&mut self, id: NodeId, join: bool) {
        // A node whose Raft stopped on its own (a failed sync) releases
        // its address once its replication tasks give up their last RPC.
        let deadline = Instant::now() + Duration::from_secs(10);
        let node = loop {
            let mut config = NodeConfig::new(
                id,
                self.members.clone(),
                self.root.join(format!("n{id}")),
                self.tls[&id].clone(),
            );
            config.faults = self.seam.clone();
            if let Some(disk) = self.disks.get(&id) {
                config.disk = disk.clone();
            }
            config.timing = self.timing.clone();
            config.join = join;
            match ClusterNode::start(config).await {
                Ok(node) => break node,
                Err(e) if e.to_string().contains("in use") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("node {id} did not start: {e}"),
            }
        };
        self.nodes.insert(id, node);
    }

    async fn down(&mut self, id: NodeId) {
        self.nodes.remove(&id).unwrap().shutdown().await;
    }

    /// Stops every running node.
    async fn stop(mut self) {
        self.stop_nodes().await;
    }

    /// Stops every running node, keeping their files.
    async fn stop_nodes(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.down(id).await;
        }
    }

    /// Waits until one of `among` is leader, as all of them see it.
    async fn leader(&self, among: &[NodeId]) -> NodeId {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seen: Vec<Option<NodeId>> =
                among.iter().map(|id| self.nodes[id].leader()).collect();
            if let Some(Some(l)) = seen.first()
                && seen.iter().all(|s| *s == Some(*l))
                && among.contains(l)
                && self.nodes[l].is_leader()
            {
                return *l;
            }
            assert!(
                Instant::now() < deadline,
                "no leader among {among:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every running node has applied every entry `leader`
    /// has (call it once the writes are done).
    async fn converge(&self, leader: NodeId) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Every entry the leader has (no more come once the writes
            // are done), applied everywhere. Applied positions in metrics
            // may lag a state machine but never lead it, so comparing
            // them with each other alone could pass too early.
            let target = self.nodes[&leader].raft().metrics().borrow().last_log_index;
            let behind: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|(_, n)| {
                    n.raft().metrics().borrow().last_applied.map(|l| l.index) != target
                })
                .map(|(id, _)| *id)
                .collect();
            if behind.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes {behind:?} never caught up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every running node's tables equal byte for byte, holding exactly
    /// the records `offsets` of topic 1 partition 0.
    fn assert_every_node_holds(&self, offsets: std::ops::Range<u64>) {
        self.assert_replicas_equal();
        let want: Vec<u64> = offsets.collect();
        for id in self.nodes.keys() {
            assert_eq!(self.offsets(*id), want, "node {id}");
        }
    }

    /// Every running node's tables, byte for byte.
    fn assert_replicas_equal(&self) {
        let dumps: Vec<(NodeId, bytes::Bytes)> = self
            .nodes
            .iter()
            .map(|(id, n)| (*id, n.state().dump().unwrap()))
            .collect();
        for (id, d) in &dumps[1..] {
            assert!(
                *d == dumps[0].1,
                "node {id}'s tables differ from node {}'s",
                dumps[0].0
            );
        }
    }

    /// The offsets of topic 1 partition 0 stored on `id`.
    fn offsets(&self, id: NodeId) -> Vec<u64> {
        let db = self.nodes[&id].state().database();
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(LOG).unwrap();
        table
            .range((1, 0, 0)..(1, 1, 0))
            .unwrap()
            .map(|r| r.unwrap().0.value().2)
            .collect()
    }
}

/// The redo of appending record `offset` to topic 1 partition 0.
pub(super) fn append(offset: u64) -> Vec<u8> {
    super::record_redo(1, offset, format!("record {offset}").as_bytes())
}

async fn write_range(node: &ClusterNode, offsets: std::ops::Range<u64>) {
    let writes = offsets.map(|o| node.write(append(o)));
    for r in futures::future::join_all(writes).await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_keep_every_acknowledged_write_across_a_lost_leader() {
    let mut g = Group::start(timing()).await;
    let first = g.leader(&[1, 2, 3]).await;
    write_range(&g.nodes[&first], 0..200).await;
    g.converge(first).await;
    g.assert_replicas_equal();

    // A follower refuses writes and names the leader.
    let follower = *g.nodes.keys().find(|&&id| id != first).unwrap();
    match g.nodes[&follower].write(append(999)).await {
        Err(WriteError::NotLeader { leader, addr }) => {
            assert_eq!(leader, Some(first));
            assert_eq!(addr, Some(g.members[&first].to_string()));
        }
        other => panic!("a follower accepted a write: {other:?}"),
    }

    // Lose the leader: the other two elect one and go on.
    let lost = Instant::now();
    g.down(first).await;
    let rest: Vec<NodeId> = g.nodes.keys().copied().collect();
    let second = g.leader(&rest).await;
    assert_ne!(second, first);
    write_range(&g.nodes[&second], 200..300).await;
    let failover = lost.elapsed();
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );

    // The old leader comes back from its files and catches up.
    g.up(first, false).await;
    g.converge(second).await;
    g.assert_every_node_holds(0..300);
    g.stop().await;
}

/// A leader restarted from its files does not lead its old term again:
/// its log may have lost entries it had already sent out (they were not
/// yet synced here, but were on the followers), and leading that term
/// again it would write other entries under the same log ids, which the
/// followers would take for theirs. Alone it leads nothing; with the
/// others back, a leader is elected in a later term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_does_not_lead_its_old_term_again() {
    let mut g = Group::start(timing()).await;
    let leader = g.leader(&[1, 2, 3]).await;
    g.nodes[&leader].write(append(0)).await.unwrap();
    let term = g.nodes[&leader].raft().metrics().borrow().current_term;
    g.stop_nodes().await;
    g.up(leader, false).await;
    // Before, openraft made it the leader of `term` at once, alone.
    for _ in 0..15 {
        assert!(
            !g.nodes[&leader].is_leader(),
            "node {leader} leads term {} again, alone",
            g.nodes[&leader].raft().metrics().borrow().current_term
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in (1..=3).filter(|id| *id != leader) {
        g.up(id, false).await;
    }
    let now = g.leader(&[1, 2, 3]).await;
    let later = g.nodes[&now].raft().metrics().borrow().current_term;
    assert!(later > term, "elected in term {later}, not after {term}");
    write_somewhere(&g, 1).await;
    g.converge(now).await;
    g.assert_every_node_holds(0..2);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_hands_over_in_one_round_trip() {
    let mut g = Group::start(timing()).await;
    let first = g.leader(&[1, 2, 3]).await;
    write_range(&g.nodes[&first], 0..100).await;
    // No node starts an election on its own from here on: the leadership
    // can only move by the handover.
    for n in g.nodes.values() {
        n.raft().runtime_config().elect(false);
    }
    let to = g.nodes[&first]
        .hand_over()
        .await
        .expect("the leader handed over");
    assert_ne!(to, first);
    g.down(first).await;
    let rest: Vec<NodeId> = g.nodes.keys().copied().collect();
    assert_eq!(g.leader(&rest).await, to);
    write_range(&g.nodes[&to], 100..200).await;
    // A follower does not hand over.
    let other = *rest.iter().find(|&&id| id != to).unwrap();
    assert_eq!(g.nodes[&other].hand_over().await, None);
    g.up(first, false).await;
    g.converge(to).await;
    g.assert_every_node_holds(0..200);
    g.stop().await;
}

/// A follower stops sending clients to a leader it no longer hears from
/// (a crash) after an election timeout, though openraft names that
/// leader until the others elect another: a client sent there would wait
/// for a handshake that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stops_naming_a_leader_gone_silent() {
    let mut g = Group::start(timing()).await;
    let first = g.leader(&[1, 2, 3]).await;
    // No election from here on: openraft goes on naming the old leader.
    for n in g.nodes.values() {
        n.raft().runtime_config().elect(false);
    }
    let other = (1..=3).find(|&id| id != first).unwrap();
    let view = g.nodes[&other].leader_view();
    // Named once its appends arrive (on a loaded machine, not at once).
    let deadline = Instant::now() + Duration::from_secs(10);
    while view.live_leader().map(|(id, _)| id) != Some(first) {
        assert!(
            Instant::now() < deadline,
            "the follower never named its leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    g.down(first).await;
    tokio::time::sleep(timing().election.0 + Duration::from_millis(200)).await;
    assert_eq!(g.nodes[&other].leader(), Some(first));
    assert_eq!(view.live_leader(), None);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_acknowledges_nothing_and_replicas_agree_after_healing() {
    let g = Group::start(timing()).await;
    let old = g.leader(&[1, 2, 3]).await;
    write_range(&g.nodes[&old], 0..50).await;
    let others: Vec<NodeId> = (1..=3).filter(|&id| id != old).collect();
    g.faults.isolate(old, &others);

    // The isolated leader cannot reach a majority: its write is never
    // acknowledged, while the majority elects a leader and goes on. (At
    // an offset of its own, so that it would show if it survived.)
    let lonely = g.nodes[&old].write(append(1000));
    let lonely = tokio::time::timeout(Duration::from_secs(4), lonely).await;
    assert!(
        !matches!(lonely, Ok(Ok(_))),
        "an isolated leader acknowledged a write: {lonely:?}"
    );
    let new = g.leader(&others).await;
    write_range(&g.nodes[&new], 50..80).await;

    g.faults.heal();
    // The old leader learns of the new term, drops its unacknowledged
    // entry and takes the majority's.
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.nodes[&old].leader() != Some(new) {
        assert!(Instant::now() < deadline, "the old leader never followed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    g.converge(new).await;
    g.assert_every_node_holds(0..80);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_purged_log_catches_up_from_a_snapshot() {
    let mut g = Group::start(Timing {
        snapshot_every: 40,
        snapshot_log_bytes: 0,
        keep_logs: 0,
        ..timing()
    })
    .await;
    let leader = g.leader(&[1, 2, 3]).await;
    let away = *g.nodes.keys().find(|&&id| id != leader).unwrap();
    g.down(away).await;
    for chunk in 0..5 {
        write_range(&g.nodes[&leader], chunk * 40..(chunk + 1) * 40).await;
    }
    // The leader has purged entries the stopped node never saw.
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.nodes[&leader]
        .raft()
        .metrics()
        .borrow()
        .purged
        .is_none_or(|p| p.index < 100)
    {
        assert!(Instant::now() < deadline, "the leader never purged its log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    g.up(away, false).await;
    g.converge(leader).await;
    g.assert_every_node_holds(0..200);
    let snap = g.nodes[&away].raft().metrics().borrow().snapshot;
    assert!(snap.is_some(), "the node caught up without a snapshot");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_and_one_removed_while_writes_go_on_lose_nothing() {
    let mut g = Group::start(timing()).await;
    let leader = g.leader(&[1, 2, 3]).await;
    write_range(&g.nodes[&leader], 0..100).await;
    // Node 4 joins (its certificate from the same CA) while writes go on.
    g.members.insert(4, free_port());
    let tls4 = g.ca.issue(4, &["127.0.0.1".into()]).unwrap();
    g.tls.insert(4, tls4);
    g.up(4, true).await;
    let writer = {
        let node = &g.nodes[&leader];
        write_range(node, 100..200)
    };
    let add = g.nodes[&leader].add_node(4, g.members[&4]);
    let (_, added) = tokio::join!(writer, add);
    added.unwrap();
    let voters: Vec<NodeId> = g.nodes[&leader]
        .members()
        .into_iter()
        .filter(|m| m.2)
        .map(|m| m.0)
        .collect();
    assert_eq!(voters, vec![1, 2, 3, 4]);
    // Remove a node that is not the leader; writes go on with four.
    let gone = (1..=3).find(|&id| id != leader).unwrap();
    g.nodes[&leader].remove_node(gone).await.unwrap();
    g.down(gone).await;
    write_range(&g.nodes[&leader], 200..300).await;
    g.converge(leader).await;
    g.assert_every_node_holds(0..300);
    g.stop().await;
}

/// A seed from `name` in the environment (to replay a run), else from
/// the clock; printed either way.
fn seed(name: &str) -> u64 {
    let seed = std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("seed {seed} ({name})");
    seed
}

/// Every RPC's fate drawn at random (seeded, so a failure can be replayed
/// with `SWITCHYARD_CHAOS_SEED`), counting what it did.
struct Chaos {
    state: std::sync::Mutex<u64>,
    on: std::sync::atomic::AtomicBool,
    counts: [std::sync::atomic::AtomicU64; 5],
}

impl Chaos {
    fn new(seed: u64) -> Chaos {
        Chaos {
            state: std::sync::Mutex::new(seed),
            on: true.into(),
            counts: Default::default(),
        }
    }

    /// splitmix64: enough randomness for choosing faults.
    fn next(&self) -> u64 {
        let mut s = self.state.lock().unwrap();
        *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn count(&self, i: usize) -> u64 {
        self.counts[i].load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Faults for Chaos {
    fn decide(&self, _: NodeId, _: NodeId) -> Fault {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.on.load(Relaxed) {
            return Fault::Deliver;
        }
        let r = self.next();
        let (i, fault) = match r % 100 {
            0..8 => (1, Fault::Drop),
            8..14 => (2, Fault::LoseAnswer),
            14..22 => (3, Fault::Duplicate),
            22..42 => (4, Fault::Delay(Duration::from_millis((r >> 8) % 40))),
            _ => (0, Fault::Deliver),
        };
        self.counts[i].fetch_add(1, Relaxed);
        fault
    }
}

/// Writes record `offset` through whichever node leads, until one
/// acknowledges it (a lost answer makes the outcome unknown: the redo is
/// idempotent, so writing it again is safe).
async fn write_somewhere(g: &Group, offset: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut at = *g.nodes.keys().next().unwrap();
    loop {
        match g.nodes[&at].write(append(offset)).await {
            Ok(_) => return,
            Err(WriteError::NotLeader {
                leader: Some(l), ..
            }) => at = l,
            Err(_) => {
                at = at % 3 + 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert!(
            Instant::now() < deadline,
            "record {offset} was never acknowledged"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_lost_duplicated_and_delayed_messages_lose_no_acknowledged_write() {
    let chaos = Arc::new(Chaos::new(seed("SWITCHYARD_CHAOS_SEED")));
    let g = Group::start_with(timing(), chaos.clone()).await;
    // 400 records, 8 at a time, while a fifth of all RPCs are dropped or
    // lose their answer, some are sent twice and some are late.
    let next = &std::sync::atomic::AtomicU64::new(0);
    let group = &g;
    let worker = || async move {
        loop {
            let o = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if o >= 400 {
                return;
            }
            write_somewhere(group, o).await;
        }
    };
    futures::future::join_all((0..8).map(|_| worker())).await;
    for (i, what) in [
        "delivered",
        "dropped",
        "answer lost",
        "duplicated",
        "delayed",
    ]
    .iter()
    .enumerate()
    {
        eprintln!("{what}: {}", chaos.count(i));
        assert!(chaos.count(i) > 0, "no RPC was {what}");
    }

    // Calm again: every node applies the same log and holds every
    // acknowledged record.
    chaos.on.store(false, std::sync::atomic::Ordering::Relaxed);
    let leader = g.leader(&[1, 2, 3]).await;
    // An entry of the leader's own term commits whatever it holds from
    // earlier terms, so every node converges on one log.
    write_somewhere(&g, 400).await;
    g.converge(leader).await;
    g.assert_every_node_holds(0..401);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_on_every_node_loses_no_acknowledged_write() {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

    let seed = seed("SWITCHYARD_POWER_SEED");
    let disks = (1..=3).map(|id| (id, SimDisk::new())).collect();
    // Snapshots and log purges all the time, so that cuts also fall
    // around them.
    let timing = Timing {
        snapshot_every: 50,
        snapshot_log_bytes: 0,
        keep_logs: 0,
        ..timing()
    };
    let mut g = Group::start_on(timing, Arc::new(Partitions::default()), disks).await;
    let mut survived: BTreeSet<u64> = BTreeSet::new();
    let mut purges = 0;
    let next = AtomicU64::new(0);
    for round in 0..3u64 {
        let leader = g.leader(&[1, 2, 3]).await;
        let acked = Mutex::new(BTreeSet::new());
        let stop = AtomicBool::new(false);
        // Eight writers keep entries in flight while the power goes on
        // every node at once (each disk keeps what its syncs covered;
        // later writes are dropped, kept or torn).
        let writers = futures::future::join_all((0..8).map(|_| async {
            while !stop.load(Relaxed) {
                let o = next.fetch_add(1, Relaxed);
                if g.nodes[&leader].write(append(o)).await.is_ok() {
                    acked.lock().unwrap().insert(o);
                }
            }
        }));
        let cut = async {
            tokio::time::sleep(Duration::from_millis(150 + 100 * round)).await;
            let purged = g.nodes[&leader].raft().metrics().borrow().purged;
            let before = acked.lock().unwrap().clone();
            let images: BTreeMap<NodeId, Arc<SimDisk>> = g
                .disks
                .iter()
                .map(|(id, d)| (*id, d.crash(seed ^ (round << 8) ^ id)))
                .collect();
            stop.store(true, Relaxed);
            (before, images, purged)
        };
        let (_, (before, images, purged)) = tokio::join!(writers, cut);
        purges += u64::from(purged.is_some());
        assert!(
            !before.is_empty(),
            "nothing was acknowledged before the cut"
        );
        survived.extend(before);
        g.stop_nodes().await;
        g.disks = images;
        for id in 1..=3 {
            g.up(id, false).await;
        }
    }

    // After the last cut: an entry of the new leader's term commits what
    // it holds, every node applies the same log, and every write that was
    // acknowledged before a cut is on every node.
    let leader = g.leader(&[1, 2, 3]).await;
    let last = next.load(Relaxed);
    write_somewhere(&g, last).await;
    g.converge(leader).await;
    g.assert_replicas_equal();
    for id in 1..=3 {
        let held: BTreeSet<u64> = g.offsets(id).into_iter().collect();
        let lost: Vec<&u64> = survived.difference(&held).collect();
        assert!(
            lost.is_empty(),
            "node {id} lost {} acknowledged writes, the first {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
    }
    assert!(purges > 0, "no cut came after a snapshot and a purge");
    eprintln!(
        "{} writes acknowledged before the cuts, all kept; {} held after them; \
         {purges} of 3 cuts after a purge",
        survived.len(),
        g.offsets(1).len()
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_syncs_fail_stops_and_the_others_go_on() {
    use std::sync::atomic::Ordering::Relaxed;

    let seed = seed("SWITCHYARD_POWER_SEED");
    let disks = (1..=3).map(|id| (id, SimDisk::new())).collect();
    let mut g = Group::start_on(timing(), Arc::new(Partitions::default()), disks).await;
    let bad = g.leader(&[1, 2, 3]).await;
    write_range(&g.nodes[&bad], 0..100).await;

    // The leader's disk starts failing every sync (EIO; what it was to
    // cover is lost for good). It must not go on as if its log were
    // durable: its Raft stops, and the others elect a leader and
    // acknowledge what follows.
    g.disks[&bad].faults.fail_syncs.store(true, Relaxed);
    for o in 100..300 {
        write_somewhere(&g, o).await;
    }
    assert!(g.disks[&bad].faults.failed_syncs.load(Relaxed) > 0);
    let state = g.nodes[&bad]
        .raft()
        .metrics()
        .borrow()
        .running_state
        .clone();
    assert!(
        state.is_err(),
        "node {bad} runs on after its syncs failed: {state:?}"
    );
    let others: Vec<NodeId> = (1..=3).filter(|&id| id != bad).collect();
    let leader = g.leader(&others).await;

    // Its disk replaced by what survives a power cut (the failed syncs'
    // writes gone), it comes back and catches up.
    g.down(bad).await;
    let image = g.disks[&bad].crash(seed);
    g.disks.insert(bad, image);
    g.up(bad, false).await;
    write_somewhere(&g, 300).await;
    g.converge(leader).await;
    g.assert_every_node_holds(0..301);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_built_once_the_log_has_grown_by_its_worth() {
    let g = Group::start(Timing {
        snapshot_every: 10,
        snapshot_log_bytes: 1 << 20,
        ..timing()
    })
    .await;
    let leader = g.leader(&[1, 2, 3]).await;
    let snapshot = |id: NodeId| g.nodes[&id].raft().metrics().borrow().snapshot;
    // Many small entries, far fewer bytes than the threshold: no snapshot.
    write_range(&g.nodes[&leader], 0..300).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        snapshot(leader),
        None,
        "a snapshot for a few kilobytes of log"
    );
    // 2 MiB more: every node builds one.
    let big = |o: u64| {
        let mut redo = Redo::new();
        redo.start(true);
        redo.put(LOG, &(2, 0, o), &vec![7u8; 64 << 10].as_slice());
        redo.payload().to_vec()
    };
    for o in 0..32 {
        g.nodes[&leader].write(big(o)).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for id in 1..=3 {
        while snapshot(id).is_none() {
            assert!(Instant::now() < deadline, "node {id} built no snapshot");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    g.stop().await;
}
