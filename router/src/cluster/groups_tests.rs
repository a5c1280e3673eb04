//! Three nodes, each a member of three Raft groups over one endpoint and
//! one log file per node: the groups replicate apart (and come back from
//! the shared file apart), share their connections, and their
//! leaderships spread over the nodes and spread again after a node is
//! lost and comes back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::ReadableDatabase;

use super::balance::Balancer;
use super::log_store::LogFile;
use super::net::{GroupId, NoFaults, RaftHost};
use super::tests::{append, free_port, timing};
use super::tls::{ClusterCa, NodeTls};
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
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate().unwrap();
        let members: BTreeMap<NodeId, SocketAddr> = (1..=3).map(|id| (id, free_port())).collect();
        let tls = members
            .keys()
            .map(|&id| (id, ca.issue(id, &["127.0.0.1".into()]).unwrap()))
            .collect();
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
            config.faults = Arc::new(NoFaults);
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
        node.balancer = Some(Balancer::spawn(id, handovers, Duration::from_millis(300)));
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

    /// Waits until every node has applied all of `group`'s log, then
    /// checks that its replicas are equal and hold exactly `count`
    /// records.
    async fn assert_group_holds(&self, group: GroupId, leader: NodeId, count: u64) {
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
        let want: Vec<u64> = (0..count).collect();
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
    for g in 0..GROUPS {
        n.write(g, 1, 0..(10 * (g as u64 + 1))).await;
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

    // The balancers spread the leaderships: one group each.
    for id in 1..=3 {
        n.balance(id);
    }
    let spread = n
        .wait_leaders("spreading", |l| counts(l).values().all(|&c| c == 1))
        .await;

    // Lose a node: its group elects a leader among the others, and every
    // group takes writes.
    let lost = spread[&0];
    n.down(lost).await;
    let after = n
        .wait_leaders("after a loss", |l| l.values().all(|&l| l != lost))
        .await;
    for g in 0..GROUPS {
        let base = 10 * (g as u64 + 1);
        n.write(g, after[&g], base..base + 5).await;
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
        n.assert_group_holds(g, back[&g], 10 * (g as u64 + 1) + 5)
            .await;
    }
    for id in 1..=3 {
        n.down(id).await;
    }
}
