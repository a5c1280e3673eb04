//! Replicated writes to three Raft groups whose members are three nodes
//! in this process (real QUIC on loopback, real redb files in a temporary
//! directory): each node's groups share one Raft log file, so one sync
//! covers the appends of all of them (`shared_log`), or each group has a
//! log file of its own and syncs it on its own (`log_per_group`). One
//! iteration is 64 concurrent writes to each group, led by a different
//! node each, all acknowledged (on the disks of a majority).

#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchyard::cluster::log_store::LogFile;
use switchyard::cluster::net::RaftHost;
use switchyard::cluster::tls::ClusterCa;
use switchyard::cluster::{ClusterNode, NodeConfig, NodeId, record_redo};
use switchyard::storage::disk::OsDisk;

const GROUPS: u32 = 3;
const WRITES: u64 = 64;

struct Cluster {
    _dir: tempfile::TempDir,
    /// By node, then group.
    nodes: BTreeMap<NodeId, (RaftHost, BTreeMap<u32, ClusterNode>)>,
    /// Each group's leader.
    leaders: BTreeMap<u32, NodeId>,
}

fn free_port() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("a port");
    s.local_addr().expect("its address")
}

async fn start(shared_log: bool) -> Cluster {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ca = ClusterCa::generate().expect("a CA");
    let members: BTreeMap<NodeId, SocketAddr> = (1..=3).map(|id| (id, free_port())).collect();
    let mut nodes = BTreeMap::new();
    for (&id, &addr) in &members {
        let tls = ca.issue(id, &["127.0.0.1".into()]).expect("a certificate");
        let host = RaftHost::bind(addr, &tls).expect("bind");
        let node_dir = dir.path().join(format!("n{id}"));
        std::fs::create_dir_all(&node_dir).expect("node directory");
        let log = shared_log
            .then(|| LogFile::open_on(&OsDisk, &node_dir.join("raft.redb")).expect("log file"));
        let mut groups = BTreeMap::new();
        for g in 0..GROUPS {
            let mut config = NodeConfig::new(
                id,
                members.clone(),
                node_dir.join(format!("g{g}")),
                tls.clone(),
            );
            config.group = g;
            config.host = Some(host.clone());
            config.log = log.clone();
            groups.insert(g, ClusterNode::start(config).await.expect("a member"));
        }
        nodes.insert(id, (host, groups));
    }
    // Group g led by node g + 1, so that every node leads one.
    let mut leaders = BTreeMap::new();
    for g in 0..GROUPS {
        let want = NodeId::from(g) + 1;
        loop {
            let leader = nodes.values().find_map(|(_, gs)| {
                let n = &gs[&g];
                n.is_leader().then(|| n.id())
            });
            match leader {
                Some(l) if l == want => break,
                Some(l) => {
                    nodes[&l].1[&g].handover().hand_over(Some(want)).await;
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        leaders.insert(g, want);
    }
    Cluster {
        _dir: dir,
        nodes,
        leaders,
    }
}

fn replicated_writes(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("raft_groups_replicated_writes");
    g.sample_size(20);
    g.throughput(Throughput::Elements(WRITES * u64::from(GROUPS)));
    for (name, shared) in [("shared_log", true), ("log_per_group", false)] {
        let cluster = rt.block_on(start(shared));
        let body = vec![b'x'; 100];
        let mut next = 0u64;
        g.bench_function(BenchmarkId::new(name, GROUPS), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let writes = cluster.leaders.iter().flat_map(|(group, leader)| {
                        let node = &cluster.nodes[leader].1[group];
                        (next..next + WRITES).map(|o| node.write(record_redo(1, o, &body)))
                    });
                    for r in futures::future::join_all(writes).await {
                        r.expect("an acknowledged write");
                    }
                });
                next += WRITES;
            });
        });
        rt.block_on(async {
            for (_, (host, groups)) in cluster.nodes {
                for (_, n) in groups {
                    n.shutdown().await;
                }
                host.close().await;
            }
        });
    }
    g.finish();
}

criterion_group!(benches, replicated_writes);
criterion_main!(benches);
