//! Three nodes, each a member of three Raft groups over one endpoint and
//! one log file per node: the groups replicate apart (and come back from
//! the shared file apart), share their connections, and their
//! leaderships spread over the nodes and spread again after a node is
//! lost and comes back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redb::ReadableDatabase;

use super::balance::Balancer;
use super::log_store::LogFile;
use super::net::{GroupId, RaftHost};
use super::tests::{append, three_members, timing};
use super::tls::NodeTls;
use super::{ClusterNode, NodeConfig, NodeId};
use crate::storage::tables::LOG;

const GROUPS: GroupId = 3;

/// One node: its endpoint and its member of each group.
struct Node {
    host: RaftHost,
    groups: BTreeMap<GroupId, ClusterNode>,
    balancer: Option<Balancer>,
}

struct Nodes {
    _dir: tempfile::TempDir,
    root: PathBuf,
    members: BTreeMap<NodeId, SocketAddr>,
    tls: BTreeMap<NodeId, NodeTls>,
    nodes: BTreeMap<NodeId, Node>,
}

impl Nodes {
    async fn start() -> Nodes {
        let (dir, _ca, members, tls) = three_members();
        let mut n = Nodes {
            root: dir.path().to_path_buf(),
            _dir: dir,
            members,
            tls,
            nodes: BTreeMap::new(),
        };
        for id in 1..=3 {
            n.up(id).await;
        }
        n
    }

    async fn up(&mut self, id: NodeId) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let host = loop {
            match RaftHost::bind(self.members[&id], &self.tls[&id]) {
                Ok(h) => break h,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "address still held");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("node {id} did not bind: {e}"),
            }
        };
        // One log file for the node's groups: one sync covers them all.
        let node_dir = self.root.join(format!("n{id}"));
        std::fs::create_dir_all(&node_dir).unwrap();
        let log =
            LogFile::open_on(&crate::storage::disk::OsDisk, &node_dir.join("raft.redb")).unwrap();
        let mut groups = BTreeMap::new();
        for group in 0..GROUPS {
            let mut config = NodeConfig::new(
                id,
                self.members.clone(),
                node_dir.join(format!("g{group}")),
                self.tls[&id].clone(),
            );
            config.timing = timing();
            config.group = group;
            config.host = Some(host.clone());
            config.log = Some(log.clone());
            groups.insert(group, ClusterNode::start(config).await.unwrap());
        }
        self.nodes.insert(
            id,
            Node {
                host,
                groups,
                balancer: None,
            },
        );
    }

    async fn down(&mut self, id: NodeId) {
        let node = self.nodes.remove(&id).unwrap();
        drop(node.balancer);
        for (_, g) in node.groups {
            g.shutdown().await;
        }
        node.host.close().await;
    }

    fn balance(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).unwrap();
        let handovers = node
            .groups
            .iter()
            .map(|(g, n)| (*g, n.handover()))
            .collect();
        node.balancer = Some(Balancer::spawn(
            id,
            handovers,
            Box::new(Default::default),
            Box::new(Vec::new),
            Duration::from_millis(300),
        ));
    }

    /// Each group's leader, once every running node agrees on it.
    fn leaders(&self) -> Option<BTreeMap<GroupId, NodeId>> {
        (0..GROUPS)
            .map(|g| {
                let seen: Vec<Option<NodeId>> =
                    self.nodes.values().map(|n| n.groups[&g].leader()).collect();
                let l = (*seen.first()?)?;
                let agreed = seen.iter().all(|s| *s == Some(l))
                    && self.nodes.get(&l)?.groups[&g].is_leader();
                agreed.then_some((g, l))
            })
            .collect()
    }

    /// Waits until every group has a leader that `ok` accepts.
    async fn wait_leaders(
        &self,
        what: &str,
        ok: impl Fn(&BTreeMap<GroupId, NodeId>) -> bool,
    ) -> BTreeMap<GroupId, NodeId> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let leaders = self.leaders();
            if let Some(l) = &leaders
                && ok(l)
            {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "{what}: leaders {leaders:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes records `offsets` to `group` through its leader.
    async fn write(&self, group: GroupId, leader: NodeId, offsets: std::ops::Range<u64>) {
        let node = &self.nodes[&leader].groups[&group];
        let writes = offsets.map(|o| node.write(append(o)));
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
    }

    /// Writes records to `group` through whichever node leads it, `LANES`
    /// at a time, until `stop`; returns the offsets acknowledged. Each lane
    /// writes its own offsets, from `from` on, and sends a refused write
    /// again (leadership moving) until it is acknowledged.
    async fn keep_writing(&self, group: GroupId, from: u64, stop: &AtomicBool) -> Vec<u64> {
        const LANES: u64 = 8;
        let lane = |first: u64| async move {
            let mut acked = Vec::new();
            let mut next = first;
            while !stop.load(Ordering::Relaxed) {
                let leader = self
                    .nodes
                    .values()
                    .map(|n| &n.groups[&group])
                    .find(|n| n.is_leader());
                let written = match leader {
                    Some(n) => n.write(append(next)).await.is_ok(),
                    None => false,
                };
                if written {
                    acked.push(next);
                    next += LANES;
                } else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            acked
        };
        let lanes = futures::future::join_all((0..LANES).map(|i| lane(from + i))).await;
        let mut acked: Vec<u64> = lanes.into_iter().flatten().collect();
        acked.sort_unstable();
        acked
    }

    /// Waits until every node has applied all of `group`'s log, then
    /// checks that its replicas are equal and hold exactly the records
    /// `offsets`.
    async fn assert_group_holds(&self, group: GroupId, leader: NodeId, offsets: &[u64]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let target = self.nodes[&leader].groups[&group]
            .raft()
            .metrics()
            .borrow()
            .last_log_index;
        while self.nodes.values().any(|n| {
            n.groups[&group]
                .raft()
                .metrics()
                .borrow()
                .last_applied
                .map(|l| l.index)
                != target
        }) {
            assert!(Instant::now() < deadline, "group {group} never converged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let want = offsets.to_vec();
        let first = self.nodes[&leader].groups[&group].state().dump().unwrap();
        for (id, n) in &self.nodes {
            let state = n.groups[&group].state();
            assert!(state.dump().unwrap() == first, "node {id} group {group}");
            let txn = state.database().begin_read().unwrap();
            let table = txn.open_table(LOG).unwrap();
            let got: Vec<u64> = table
                .range((1, 0, 0)..(1, 1, 0))
                .unwrap()
                .map(|r| r.unwrap().0.value().2)
                .collect();
            assert_eq!(got, want, "node {id} group {group}");
        }
    }
}

fn counts(leaders: &BTreeMap<GroupId, NodeId>) -> BTreeMap<NodeId, usize> {
    let mut c = BTreeMap::new();
    for l in leaders.values() {
        *c.entry(*l).or_default() += 1;
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_on_shared_endpoints_replicate_apart_and_spread_their_leaders() {
    let mut n = Nodes::start().await;
    let leaders = n.wait_leaders("first elections", |_| true).await;
    // Gather every leadership on node 1, as an unlucky start could.
    for (g, l) in leaders {
        if l != 1 {
            let to = n.nodes[&l].groups[&g].handover().hand_over(Some(1)).await;
            assert_eq!(to, Some(1), "group {g}");
        }
    }
    n.wait_leaders("all on node 1", |l| l.values().all(|&l| l == 1))
        .await;

    // Each group its own records, over the one connection per pair.
    let mut held: BTreeMap<GroupId, Vec<u64>> = BTreeMap::new();
    for g in 0..GROUPS {
        let offsets: Vec<u64> = (0..10 * (u64::from(g) + 1)).collect();
        n.write(g, 1, offsets[0]..offsets.len() as u64).await;
        held.insert(g, offsets);
    }
    // A connection out to each of two peers and one in from each, once
    // the attempts made while peers were still starting have timed out:
    // a connection per group would keep up to three times that open.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let open: Vec<usize> = n
            .nodes
            .values()
            .map(|n| n.host.open_connections())
            .collect();
        if open.iter().all(|&o| o <= 4) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Raft connections by node: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The balancers spread the leaderships, one group each, while every
    // group is written to without a break: a handover holds new writes
    // back until it is done (with a steady stream no follower would hold
    // the whole log at any one moment), and a write refused meanwhile is
    // sent again to the new leader.
    for id in 1..=3 {
        n.balance(id);
    }
    let stop = AtomicBool::new(false);
    let (spread, written) = futures::join!(
        async {
            let s = n
                .wait_leaders("spreading", |l| counts(l).values().all(|&c| c == 1))
                .await;
            stop.store(true, Ordering::Relaxed);
            s
        },
        futures::future::join_all((0..GROUPS).map(|g| n.keep_writing(
            g,
            held[&g].len() as u64,
            &stop
        ))),
    );
    for (g, offsets) in (0..GROUPS).zip(written) {
        assert!(!offsets.is_empty(), "nothing written to group {g}");
        held.get_mut(&g).unwrap().extend(offsets);
    }

    // Lose a node: its group elects a leader among the others, and every
    // group takes writes.
    let lost = spread[&0];
    n.down(lost).await;
    let after = n
        .wait_leaders("after a loss", |l| l.values().all(|&l| l != lost))
        .await;
    for g in 0..GROUPS {
        let base = held[&g].last().unwrap() + 1;
        n.write(g, after[&g], base..base + 5).await;
        held.get_mut(&g).unwrap().extend(base..base + 5);
    }

    // It comes back from its files: the leaderships spread again, and
    // every replica of every group holds exactly its group's records.
    n.up(lost).await;
    n.balance(lost);
    let back = n
        .wait_leaders("after the return", |l| {
            counts(l).values().all(|&c| c == 1) && counts(l).len() == 3
        })
        .await;
    for g in 0..GROUPS {
        n.assert_group_holds(g, back[&g], &held[&g]).await;
    }
    for id in 1..=3 {
        n.down(id).await;
    }
}
