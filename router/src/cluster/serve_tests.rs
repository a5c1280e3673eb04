//! Cluster nodes as `switchyard serve` runs them (Raft, the redirecting
//! follower endpoint, the leader's router), three in one process so that
//! the Raft links between them pass through a fault seam, with a real
//! client in front.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::net::Partitions;
use super::serve::{ClusterServe, run};
use super::tls::ClusterCa;
use super::{NodeId, Timing};
use crate::client::{Client, ClientConfig};
use crate::protocol::Record;
use crate::server::{RouterConfig, StartError};
use crate::storage::disk::{OsDisk, SimDisk};

/// A client port whose Raft port (5 above) is free too.
fn free_pair() -> SocketAddr {
    loop {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = s.local_addr().unwrap();
        if a.port() < 60_000 && std::net::UdpSocket::bind(super::serve::raft_addr(a)).is_ok() {
            return a;
        }
    }
}

struct Nodes {
    root: tempfile::TempDir,
    addrs: Vec<SocketAddr>,
    stops: Vec<Option<tokio::sync::oneshot::Sender<()>>>,
    tasks: Vec<Option<tokio::task::JoinHandle<Result<(), crate::server::StartError>>>>,
}

impl Nodes {
    fn start(faults: Arc<Partitions>) -> Nodes {
        Self::start_on(faults, None, 1)
    }

    /// Three nodes of `groups` groups each, on `disks` if given (else real
    /// files).
    fn start_on(
        faults: Arc<Partitions>,
        disks: Option<Vec<Arc<SimDisk>>>,
        groups: super::net::GroupId,
    ) -> Nodes {
        let root = tempfile::tempdir().unwrap();
        let addrs: Vec<SocketAddr> = (0..3).map(|_| free_pair()).collect();
        let ca = ClusterCa::generate().unwrap();
        let token = crate::auth::new_token();
        let members: BTreeMap<NodeId, SocketAddr> =
            (1..=3).map(|id| (id, addrs[id as usize - 1])).collect();
        let (mut stops, mut tasks) = (Vec::new(), Vec::new());
        for (&id, &addr) in &members {
            crate::cli::cluster::make_node(&ca, &token, root.path(), id, addr, &addrs, &[])
                .unwrap();
            let router = RouterConfig {
                data: root.path().join(format!("n{id}")),
                listen: addr,
                ..RouterConfig::default()
            };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let cfg = ClusterServe {
                node_id: id,
                members: members.clone(),
                router,
                timing: Timing {
                    election: (Duration::from_millis(600), Duration::from_millis(1200)),
                    ..Timing::default()
                },
                join: false,
                faults: faults.clone(),
                disk: match &disks {
                    Some(d) => d[id as usize - 1].clone(),
                    None => Arc::new(OsDisk),
                },
                groups,
                replication: None,
            };
            tasks.push(Some(tokio::spawn(run(cfg, async move {
                let _ = stopped.await;
            }))));
            stops.push(Some(stop));
        }
        Nodes {
            root,
            addrs,
            stops,
            tasks,
        }
    }

    async fn client(&self) -> Client {
        self.group_client(0).await
    }

    /// A client of group `group`'s router.
    async fn group_client(&self, group: u32) -> Client {
        let dir = self.root.path().join("n1");
        let mut cfg = self
            .config(group)
            .with_token_file(dir.join("admin.token"))
            .unwrap();
        cfg.idle_timeout = Duration::from_millis(1500);
        Client::connect(cfg).await.unwrap()
    }

    /// A client's configuration for group `group`, with no credential.
    fn config(&self, group: u32) -> ClientConfig {
        ClientConfig::new(self.addrs[0])
            .with_ca_file(self.root.path().join("n1").join("cert.pem"))
            .with_cluster(self.addrs.iter().copied())
            .with_group(group)
    }

    /// A client of the cluster once it serves: topic `t` exists and holds
    /// record `a`; and the leader's id.
    async fn serving(&self) -> (Client, NodeId) {
        let client = self.client().await;
        create_topic(&client).await;
        client
            .publish("t", Record::new("a").with_message_id("a"))
            .await
            .unwrap();
        let leader = leader(&client).await;
        (client, leader)
    }

    /// Stops node `id` as SIGTERM does, and waits until it has.
    async fn stop_node(&mut self, id: NodeId) {
        let _ = self.stops[id as usize - 1].take().unwrap().send(());
        let task = self.tasks[id as usize - 1].take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the node did not stop")
            .unwrap()
            .unwrap();
    }

    async fn stop(self) {
        for s in self.stops.into_iter().flatten() {
            let _ = s.send(());
        }
        for t in self.tasks.into_iter().flatten() {
            t.await.unwrap().unwrap();
        }
    }
}

/// The leader as the node the client reaches sees it (asked again while
/// leadership moves). A request that gets no answer at all fails the
/// test: a client once waited forever on a connection whose router had
/// ended its control stream.
async fn leader(c: &Client) -> NodeId {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = c.admin_request("cluster_status", serde_json::json!({}), bytes::Bytes::new());
        let status = tokio::time::timeout(Duration::from_secs(15), status)
            .await
            .expect("a control request got neither an answer nor an error");
        if let Ok(s) = status
            && let Some(l) = s["leader"].as_u64()
        {
            return l;
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes `id` to `t`; the node the client is on is failing, so it
/// must reach the leader the others elect, within 30 s.
async fn publish_elsewhere(client: &Client, id: &str) {
    let published = tokio::time::timeout(
        Duration::from_secs(30),
        client.publish(
            "t",
            Record::new(id.to_string()).with_message_id(id.to_string()),
        ),
    )
    .await;
    assert!(
        matches!(published, Ok(Ok(_))),
        "the publish never reached a working leader: {published:?}"
    );
}

/// Creates topic `t` (again if leadership moved under the request).
async fn create_topic(client: &Client) {
    create_topic_named(client, "t").await
}

/// Creates topic `name` (again if leadership moved under the request).
async fn create_topic_named(client: &Client, name: &str) {
    let created = async {
        loop {
            match client.create_topic(name, 1).await {
                Ok(_) => return,
                Err(e) if e.to_string().contains("exists") => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), created)
        .await
        .expect("the topic was never created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_others_stops_serving_and_its_clients_move_on() {
    let faults = Arc::new(Partitions::default());
    let nodes = Nodes::start(faults.clone());
    let (client, old) = nodes.serving().await;

    // The leader loses its links to the other nodes, not to the client.
    // The client's next publish must not wait on it forever: the leader
    // stops serving once no majority answers, and the client finds the
    // leader the others elected.
    let others: Vec<NodeId> = (1..=3).filter(|&id| id != old).collect();
    faults.isolate(old, &others);
    let cut = Instant::now();
    publish_elsewhere(&client, "b").await;
    let moved = cut.elapsed();
    let new = leader(&client).await;
    assert_ne!(new, old, "the cut-off node still serves");
    eprintln!("the client published on the new leader {moved:?} after the cut");

    // Healed, the old leader follows; each record is stored once.
    faults.heal();
    let info = client.describe_topic("t").await.unwrap();
    assert_eq!(info.partitions[0].end, 2, "{info:?}");
    drop(client);
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_disk_fails_stops_with_an_error_and_its_clients_move_on() {
    use std::sync::atomic::Ordering::Relaxed;

    let disks: Vec<Arc<SimDisk>> = (0..3).map(|_| SimDisk::new()).collect();
    let mut nodes = Nodes::start_on(Arc::new(Partitions::default()), Some(disks.clone()), 1);
    let (client, old) = nodes.serving().await;

    // Every sync on the leader's disk fails from now on.
    disks[old as usize - 1]
        .faults
        .fail_syncs
        .store(true, Relaxed);
    publish_elsewhere(&client, "b").await;
    assert_ne!(leader(&client).await, old);
    // The node stopped with an error (the process exits non-zero, so a
    // supervisor restarts it) rather than lingering.
    let task = nodes.tasks[old as usize - 1].take().unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), task).await;
    assert!(
        matches!(ended, Ok(Ok(Err(StartError::ClusterStopped(_))))),
        "the node with the failed disk did not stop with an error: {ended:?}"
    );
    let info = client.describe_topic("t").await.unwrap();
    assert_eq!(info.partitions[0].end, 2, "{info:?}");
    drop(client);
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_steps_down_to_a_chosen_node_while_publishers_write() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

    let nodes = Nodes::start(Arc::new(Partitions::default()));
    let (client, first) = nodes.serving().await;
    let client = Arc::new(client);

    // Eight lanes publish without a break, each record with a message
    // id, so that one refused or lost in a move is sent again to the
    // next leader and stored once.
    let stop = Arc::new(AtomicBool::new(false));
    let lanes: Vec<_> = (0..8)
        .map(|lane| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut i = 0u64;
                while !stop.load(Relaxed) {
                    let id = format!("{lane}-{i}");
                    let ack = client
                        .publish("t", Record::new(id.clone()).with_message_id(id))
                        .await
                        .unwrap_or_else(|e| panic!("lane {lane}, record {i}: {e}"));
                    acked.push((ack.offset, Instant::now()));
                    i += 1;
                }
                acked
            })
        })
        .collect();
    // Beside them, topics are created one after another: a create that
    // a move cuts off is asked again of the next leader by the client,
    // and answered with the topic however far the first attempt got.
    let creator = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut made = 0u32;
            while !stop.load(Relaxed) {
                let name = format!("made-{made}");
                let info = client
                    .create_topic(&name, 2)
                    .await
                    .unwrap_or_else(|e| panic!("create {name}: {e}"));
                assert_eq!(info.partitions.len(), 2, "{info:?}");
                made += 1;
            }
            made
        })
    };
    // Around the three nodes, each move to a chosen one. A leader hands
    // over once its lease has run out since its election (about 1.2 s
    // here), which the request waits for, with the lanes in full flow.
    let mut moves = Vec::new();
    let mut from = first;
    for _ in 0..3 {
        let to = from % 3 + 1;
        let asked = Instant::now();
        let answer = client
            .admin_request(
                "cluster_step_down",
                serde_json::json!({ "to": to }),
                bytes::Bytes::new(),
            )
            .await;
        // The move stops the old leader's router, which answers the
        // request in progress before it closes the connection.
        let answer = answer.unwrap_or_else(|e| panic!("step-down from node {from} to {to}: {e}"));
        assert_eq!(answer["leader"].as_u64(), Some(to), "{answer}");
        assert_eq!(answer["previous"].as_u64(), Some(from), "{answer}");
        assert_eq!(
            leader(&client).await,
            to,
            "from node {from}, the step-down answered {answer:?}"
        );
        moves.push((from, to, asked, asked.elapsed()));
        from = to;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Relaxed);
    let mut acks = Vec::new();
    for lane in lanes {
        acks.push(lane.await.unwrap());
    }
    let made = creator.await.unwrap();
    eprintln!("{made} topics created across the moves");
    let topics = client.list_topics().await.unwrap();
    assert_eq!(topics.len() as u32, made + 1, "{topics:?}");
    for (from, to, asked, took) in &moves {
        // The longest wait between two acks of a lane around the move, and
        // how many publishes the new leader acknowledged before the next.
        let mut pause = Duration::ZERO;
        for w in acks.iter().flat_map(|a| a.windows(2)) {
            if w[1].1 > *asked && w[0].1 < *asked + *took {
                pause = pause.max(w[1].1 - w[0].1);
            }
        }
        eprintln!(
            "leadership moved from node {from} to node {to} in {took:?}; \
             the longest pause of a lane: {pause:?}"
        );
    }
    let last = moves.last().unwrap();
    let after = acks
        .iter()
        .flatten()
        .filter(|(_, t)| *t > last.2 + last.3)
        .count();
    assert!(after > 0, "no publish was acknowledged by the last leader");
    // Every acked record once, at offsets 1.. with no gap or duplicate
    // (offset 0 is `serving`'s record).
    let mut offsets: Vec<u64> = acks.into_iter().flatten().map(|(o, _)| o).collect();
    offsets.sort_unstable();
    eprintln!("{} publishes acknowledged", offsets.len());
    let expected: Vec<u64> = (1..=offsets.len() as u64).collect();
    assert_eq!(offsets, expected);
    let info = client.describe_topic("t").await.unwrap();
    assert_eq!(info.partitions[0].end, offsets.len() as u64 + 1, "{info:?}");
    drop(client);
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_groups_spread_their_topics_and_leaders_and_one_client_reaches_them_all() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    const GROUPS: u32 = 3;

    let mut nodes = Nodes::start_on(Arc::new(Partitions::default()), None, GROUPS);
    // One client, given node 1's address only, as an application has it:
    // group 0 places each new topic in the least-loaded group, and the
    // client sends each topic's requests to that group's router.
    let client = Arc::new(nodes.client().await);
    assert_eq!(client.server_info().groups, GROUPS);
    let topic = |g: usize| format!("t{g}");
    for g in 0..GROUPS as usize {
        create_topic_named(&client, &topic(g)).await;
    }
    for g in 0..GROUPS as usize {
        assert_eq!(client.topic_group(&topic(g)).await.unwrap(), g as u32);
    }
    // A topic's dotted children are in its group (a dead-letter topic is
    // made by its topic's router), without a row of their own.
    assert_eq!(client.topic_group("t2.dlq").await.unwrap(), 2);
    // The topics and their records are their groups' own: a record
    // published to one is in that group only.
    for g in 0..GROUPS as usize {
        for i in 0..=g {
            let id = format!("first-{i}");
            client
                .publish(&topic(g), Record::new(id.clone()).with_message_id(id))
                .await
                .unwrap();
        }
    }
    let listed: Vec<String> = client
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(listed, ["t0", "t1", "t2"]);
    // Clients of groups 1 and 2 alone (for leaders, and to see what each
    // router holds); the routing client's own router is group 0's.
    let mut clients = vec![client.clone()];
    for g in 1..GROUPS {
        clients.push(Arc::new(nodes.group_client(g).await));
    }
    for (g, c) in clients.iter().enumerate().skip(1) {
        let info = c.describe_topic(&topic(g)).await.unwrap();
        assert_eq!(info.partitions[0].end, g as u64 + 1, "group {g}: {info:?}");
        let elsewhere = c.describe_topic(&topic(0)).await;
        assert!(
            elsewhere.is_err_and(|e| e.code() == Some(crate::protocol::ErrorCode::UnknownTopic)),
            "group {g} holds t0"
        );
    }
    // A group's router makes only the topics group 0 assigned it.
    let wrong = clients[1].create_topic(&topic(2), 1).await;
    assert!(
        wrong
            .as_ref()
            .is_err_and(|e| e.code() == Some(crate::protocol::ErrorCode::WrongGroup)),
        "{wrong:?}"
    );
    // A topic's dead-letter topic is one a group holds: another group's
    // (written through the outbox), or one named under the topic (in its
    // group, made on the first letter); a name in no group is refused.
    let dlq = |name: String| serde_json::json!({ "dlq": name });
    client
        .set_topic_policy(&topic(1), dlq(topic(2)))
        .await
        .unwrap();
    let nowhere = client
        .set_topic_policy(&topic(1), dlq("failed".into()))
        .await;
    assert!(
        nowhere
            .as_ref()
            .is_err_and(|e| e.to_string().contains("in no group")),
        "{nowhere:?}"
    );
    client
        .set_topic_policy(&topic(1), dlq(format!("{}.failed", topic(1))))
        .await
        .unwrap();
    // Subscribing goes to the topic's group too.
    let mut sub = client
        .subscribe(
            crate::client::SubscribeOptions::new(topic(2))
                .start(crate::protocol::StartPosition::Earliest),
        )
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut sub))
        .await
        .expect("no delivery from group 2")
        .unwrap()
        .unwrap();
    assert_eq!(first.payload(), "first-0");
    drop(sub);

    // The groups' leaderships spread: three groups, one on each node.
    let deadline = Instant::now() + Duration::from_secs(60);
    let spread = loop {
        let mut leaders = Vec::new();
        for c in &clients {
            leaders.push(leader(c).await);
        }
        let mut distinct = leaders.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() == GROUPS as usize {
            break leaders;
        }
        assert!(
            Instant::now() < deadline,
            "leaders never spread: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("group leaders: {spread:?}");
    // `cluster status` through any group names every group's leader, as
    // the node that answers sees them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = clients[1]
            .admin_request("cluster_status", serde_json::json!({}), bytes::Bytes::new())
            .await
            .unwrap();
        assert_eq!(status["group"], 1, "{status}");
        let seen: Vec<Option<u64>> = status["groups"]
            .as_array()
            .expect("a node of several groups lists them")
            .iter()
            .map(|g| g["leader"].as_u64())
            .collect();
        if seen == spread.iter().map(|&l| Some(l)).collect::<Vec<_>>() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status shows {seen:?}, the groups are led by {spread:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Two lanes per topic publish through the one client without a break
    // while group 0's leader stops: its groups move, the others go on,
    // and every group keeps serving with two nodes.
    let stop = Arc::new(AtomicBool::new(false));
    let lanes: Vec<_> = (0..GROUPS as usize * 2)
        .map(|lane| {
            let (client, stop, topic) = (client.clone(), stop.clone(), topic(lane / 2));
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut i = 0u64;
                while !stop.load(Relaxed) {
                    let id = format!("{lane}-{i}");
                    let published = tokio::time::timeout(
                        Duration::from_secs(30),
                        client.publish(&topic, Record::new(id.clone()).with_message_id(id)),
                    )
                    .await;
                    let ack = match published {
                        Ok(Ok(ack)) => ack,
                        other => panic!("lane {lane}, record {i}: {other:?}"),
                    };
                    acked.push(ack.offset);
                    i += 1;
                }
                (lane / 2, acked)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes.stop_node(spread[0]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Relaxed);
    let mut offsets = vec![Vec::new(); GROUPS as usize];
    for lane in lanes {
        let (g, acked) = lane.await.unwrap();
        offsets[g].extend(acked);
    }
    // Every acked record once per topic, at dense offsets after its first
    // records, and nothing more.
    for (g, c) in clients.iter().enumerate() {
        let o = &mut offsets[g];
        o.sort_unstable();
        let first = g as u64 + 1;
        let expected: Vec<u64> = (first..first + o.len() as u64).collect();
        assert_eq!(*o, expected, "group {g}");
        assert!(!o.is_empty(), "group {g} acknowledged nothing");
        let info = client.describe_topic(&topic(g)).await.unwrap();
        assert_eq!(
            info.partitions[0].end,
            first + o.len() as u64,
            "group {g}: {info:?}"
        );
        let l = leader(c).await;
        assert_ne!(l, spread[0], "group {g} is led by the stopped node");
        eprintln!(
            "group {g}: {} publishes acknowledged; led by node {l}",
            o.len()
        );
    }

    // Principals are group 0's and hold in every group: a token made
    // through group 0 opens a connection to another group's router,
    // that router refuses to change them, and revoking the token through
    // group 0 closes that connection. The other group is led by a node
    // that follows group 0, so the changes reach its router through the
    // replay of group 0's log rather than through its own writer.
    let deadline = Instant::now() + Duration::from_secs(30);
    let other = 'found: loop {
        let first = leader(&clients[0]).await;
        for (g, c) in clients.iter().enumerate().skip(1) {
            if leader(c).await != first {
                break 'found g;
            }
        }
        assert!(Instant::now() < deadline, "every group is led with group 0");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("principals checked through group {other}");
    let token = client
        .create_token("app", &[&format!("publish:{}", topic(other))])
        .await
        .unwrap();
    let mut cfg = nodes.config(other as u32).with_token(&token);
    cfg.reconnect = crate::client::Reconnect::off();
    let app = tokio::time::timeout(Duration::from_secs(10), async {
        // The node applies group 0's entry a round trip after its leader.
        loop {
            match Client::connect(cfg.clone()).await {
                Ok(c) => return c,
                Err(e) => {
                    eprintln!("not yet: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await
    .expect("the other group never knew group 0's principal");
    app.publish(&topic(other), Record::new("from app"))
        .await
        .unwrap();
    let refused = clients[other]
        .create_token("elsewhere", &["publish:t"])
        .await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("group 0")),
        "{refused:?}"
    );
    client.revoke_token("app").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.is_connected() {
        assert!(
            Instant::now() < deadline,
            "the other group kept the revoked token's connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(app);
    drop(clients);
    drop(client);
    nodes.stop().await;
}

/// Each group's leader as the node `c` reaches sees it, once every group
/// has one.
async fn group_leaders(c: &Client) -> Vec<NodeId> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = c
            .admin_request("cluster_status", serde_json::json!({}), bytes::Bytes::new())
            .await
            && let Some(groups) = s["groups"].as_array()
            && let Some(leaders) = groups.iter().map(|g| g["leader"].as_u64()).collect()
        {
            return leaders;
        }
        assert!(Instant::now() < deadline, "a group has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Maintenance of one node of a cluster of three groups while every
/// group is written to: drained, it hands over what it leads and is
/// handed nothing back, where the balancer would otherwise give it its
/// share within a second; the last undrained voter cannot be drained;
/// undrained, it leads again. No publish fails throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_hands_over_its_groups_and_is_handed_none_until_undrained() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    const GROUPS: u32 = 3;
    let nodes = Nodes::start_on(Arc::new(Partitions::default()), None, GROUPS);
    let client = Arc::new(nodes.client().await);
    let topic = |g: usize| format!("d{g}");
    for g in 0..GROUPS as usize {
        create_topic_named(&client, &topic(g)).await;
    }
    // The leaderships spread, one per node.
    let deadline = Instant::now() + Duration::from_secs(60);
    let spread = loop {
        let leaders = group_leaders(&client).await;
        let mut distinct = leaders.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() == GROUPS as usize {
            break leaders;
        }
        assert!(Instant::now() < deadline, "never spread: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let lanes: Vec<_> = (0..GROUPS as usize)
        .map(|g| {
            let (client, stop, topic) = (client.clone(), stop.clone(), topic(g));
            tokio::spawn(async move {
                let mut acked = 0u64;
                while !stop.load(Relaxed) {
                    let id = format!("{g}-{acked}");
                    let published = tokio::time::timeout(
                        Duration::from_secs(30),
                        client.publish(&topic, Record::new(id.clone()).with_message_id(id)),
                    )
                    .await;
                    assert!(
                        matches!(published, Ok(Ok(_))),
                        "group {g}, record {acked}: {published:?}"
                    );
                    acked += 1;
                }
                acked
            })
        })
        .collect();

    // Group 0's leader, which serves the client's own connection.
    let drained = spread[0];
    let status = client.drain_node(drained, true).await.unwrap();
    assert_eq!(status["drained"], serde_json::json!([drained]), "{status}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leaders = group_leaders(&client).await;
        if !leaders.contains(&drained) {
            eprintln!("drained node {drained}: groups led by {leaders:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {drained} still leads: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Three balancer rounds: with 2 / 1 / 0 and nothing drained, the node
    // leading two hands one to the node leading none at the first.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let leaders = group_leaders(&client).await;
        assert!(
            !leaders.contains(&drained),
            "node {drained} was handed a group while drained: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = client
        .admin_request("cluster_status", serde_json::json!({}), bytes::Bytes::new())
        .await
        .unwrap();
    let marked: Vec<u64> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["drained"] == true)
        .filter_map(|n| n["id"].as_u64())
        .collect();
    assert_eq!(marked, [drained], "{status}");
    // One more may be drained; not the last.
    let others: Vec<NodeId> = (1..=3).filter(|&n| n != drained).collect();
    client.drain_node(others[0], true).await.unwrap();
    let refused = client.drain_node(others[1], true).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("would leave no voter")),
        "{refused:?}"
    );
    client.drain_node(others[0], false).await.unwrap();
    let status = client.drain_node(drained, false).await.unwrap();
    assert_eq!(status["drained"], serde_json::json!([]), "{status}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leaders = group_leaders(&client).await;
        if leaders.contains(&drained) {
            eprintln!("undrained node {drained}: groups led by {leaders:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {drained} was never handed a group back: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Relaxed);
    for (g, lane) in lanes.into_iter().enumerate() {
        let acked = lane.await.unwrap();
        assert!(acked > 0, "group {g} acknowledged nothing");
        let info = client.describe_topic(&topic(g)).await.unwrap();
        assert_eq!(info.partitions[0].end, acked, "group {g}");
    }
    drop(client);
    nodes.stop().await;
}

#[test]
fn a_node_keeps_the_number_of_groups_it_was_made_with() {
    use super::serve::fixed_groups;
    let made = |e: Result<(), StartError>| e.unwrap_err().to_string();
    let dir = tempfile::tempdir().unwrap();
    fixed_groups(dir.path(), 3).unwrap();
    fixed_groups(dir.path(), 3).unwrap();
    assert!(made(fixed_groups(dir.path(), 1)).contains("made with 3 group(s)"));
    // A node made before groups existed has one.
    let old = tempfile::tempdir().unwrap();
    std::fs::write(old.path().join("raft.redb"), b"").unwrap();
    assert!(made(fixed_groups(old.path(), 3)).contains("made with 1 group(s)"));
    fixed_groups(old.path(), 1).unwrap();
}

/// Groups of their own size are formed on the founding nodes in turn;
/// group 0, and every group where the factor is not below the number of
/// nodes (or was not recorded), on every node.
#[test]
fn founders_spread_groups_of_the_factor_over_the_nodes() {
    use super::serve::{Replication, founders};
    let three = Replication {
        factor: 3,
        formed_with: 5,
    };
    let ids = [1, 2, 3, 4, 5, 6];
    assert_eq!(founders(0, &ids, three), [1, 2, 3, 4, 5]);
    assert_eq!(founders(1, &ids, three), [1, 2, 3]);
    assert_eq!(founders(3, &ids, three), [3, 4, 5]);
    assert_eq!(founders(5, &ids, three), [1, 2, 5]);
    // Node 6 joined later: it founded nothing.
    assert!((1..=10).all(|g| !founders(g, &ids, three).contains(&6)));
    let every = Replication {
        factor: 3,
        formed_with: 3,
    };
    assert_eq!(founders(2, &ids, every), [1, 2, 3]);
    let before = Replication {
        factor: 0,
        formed_with: 5,
    };
    assert_eq!(founders(2, &ids, before), [1, 2, 3, 4, 5]);
}

/// The factor is recorded on a node's first start and refused if changed;
/// a node made before factors keeps every node in every group.
#[test]
fn the_replication_factor_is_fixed_when_the_cluster_is_formed() {
    use super::serve::fixed_replication;
    let dir = tempfile::tempdir().unwrap();
    let r = fixed_replication(dir.path(), None, 5).unwrap();
    assert_eq!((r.factor, r.formed_with), (3, 5));
    assert_eq!(fixed_replication(dir.path(), Some(3), 6).unwrap(), r);
    let changed = fixed_replication(dir.path(), Some(2), 5).unwrap_err();
    assert!(
        changed
            .to_string()
            .contains("formed with replication factor 3"),
        "{changed}"
    );
    let old = tempfile::tempdir().unwrap();
    std::fs::write(old.path().join("raft.redb"), b"").unwrap();
    assert_eq!(fixed_replication(old.path(), None, 3).unwrap().factor, 0);
    assert!(fixed_replication(old.path(), Some(3), 3).is_err());
    let zero = tempfile::tempdir().unwrap();
    assert!(fixed_replication(zero.path(), Some(0), 3).is_err());
}
