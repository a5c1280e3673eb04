//! A three-node cluster of real `switchyard serve` processes on loopback:
//! kill -9 the leader again and again (every fourth time a SIGTERM, as in a
//! rolling restart; before every fourth kill a `cluster step-down`) under
//! a pipelined producer, an acking queue consumer
//! and a stream reader, then check the history the clients saw against
//! what every replica holds.
//!
//! `SWITCHYARD_CLUSTER_KILLS=N` sets the number of kills (20 by default);
//! `SWITCHYARD_NODE_LOG` the nodes' log filter (their logs are `node.log`
//! in each data directory, kept with `SWITCHYARD_KEEP_CLUSTER`).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{router_bin, sigterm};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use switchyard::client::{
    Client, ClientConfig, QueueOptions, Record, StartPosition, SubscribeOptions,
};
use switchyard::protocol::Frame;
use switchyard::transport::FrameReader;

const PER_BATCH: usize = 20;

/// Loopback client addresses whose Raft ports (5 above) are free too,
/// below the ephemeral port range: a killed node's port must still be
/// free when it restarts, not taken by some client's socket meanwhile.
fn cluster_addrs(n: usize) -> Vec<SocketAddr> {
    // Ports handed out in this process: the tests run side by side, and
    // a port checked free here is bound only when its node starts, so
    // without this two clusters could be given overlapping ports (a node
    // that finds its metrics port taken stops, and its scraper reaches
    // another test's node).
    static TAKEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut taken = TAKEN.lock().unwrap();
    let mut out: Vec<SocketAddr> = Vec::new();
    let seed = std::process::id() as u64 ^ common::now_nanos();
    let mut port = 20_000 + (seed % 12_000) as u16;
    while out.len() < n {
        port += 10;
        if port > 32_000 {
            port = 20_000;
        }
        // The client port, the metrics port (TCP) and the Raft port.
        let used = [port, port + 1, port + 5];
        let free = |p: u16| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok();
        if used.iter().all(|p| !taken.contains(p))
            && free(port)
            && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok()
            && free(port + 5)
        {
            taken.extend(used);
            out.push(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    out
}

/// Runs a command to its end; it must succeed.
fn succeed(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The output of a CLI run by `run` on a blocking thread (the runtime's
/// threads go on serving the test's lanes), checked to have succeeded.
async fn succeeded_off_runtime(
    run: impl FnOnce() -> std::process::Output + Send + 'static,
) -> std::process::Output {
    let out = tokio::task::spawn_blocking(run).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Addresses as `--cluster` takes them.
fn joined(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

struct Node {
    id: u64,
    addr: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

struct Cluster {
    _root: tempfile::TempDir,
    addrs: Vec<SocketAddr>,
    /// Serve metrics on each node's client port + 1 (else none).
    metrics: bool,
    /// `serve --groups` (1: left out).
    groups: u32,
    nodes: Vec<Node>,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        Self::start_with(n, false)
    }

    fn start_with(n: usize, metrics: bool) -> Cluster {
        Self::start_groups(n, metrics, 1)
    }

    fn start_groups(n: usize, metrics: bool, groups: u32) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let addrs = cluster_addrs(n);
        let list = joined(&addrs);
        succeed(
            Command::new(router_bin())
                .args(["cluster", "init", "--nodes", &list, "--dir"])
                .arg(root.path()),
        );
        let mut c = Cluster {
            nodes: addrs
                .iter()
                .enumerate()
                .map(|(i, a)| Node {
                    id: i as u64 + 1,
                    addr: *a,
                    dir: root.path().join(format!("n{}", i + 1)),
                    child: None,
                })
                .collect(),
            addrs,
            metrics,
            groups,
            _root: root,
        };
        for i in 0..n {
            c.up(i as u64 + 1);
        }
        c
    }

    fn up(&mut self, id: u64) {
        self.start_node(id, false);
    }

    fn start_node(&mut self, id: u64, join: bool) {
        let list = joined(&self.addrs);
        let metrics = if self.metrics {
            let a = self.nodes[id as usize - 1].addr;
            SocketAddr::new(a.ip(), a.port() + 1).to_string()
        } else {
            "off".to_string()
        };
        let node = &mut self.nodes[id as usize - 1];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("node.log"))
            .unwrap();
        let mut cmd = Command::new(router_bin());
        cmd.args(["serve", "--data"]).arg(&node.dir).args([
            "--listen",
            &node.addr.to_string(),
            "--metrics",
            &metrics,
        ]);
        if self.groups > 1 {
            cmd.args(["--groups", &self.groups.to_string()]);
        }
        if join {
            // A joining node takes its cluster settings from the config
            // file's [cluster] section, the others from flags.
            let quoted: Vec<String> = self.addrs.iter().map(|a| format!("\"{a}\"")).collect();
            let config = node.dir.join("node.toml");
            std::fs::write(
                &config,
                format!(
                    "[cluster]\nnode_id = {id}\nnodes = [{}]\njoin = true\n",
                    quoted.join(", ")
                ),
            )
            .unwrap();
            cmd.arg("--config").arg(config);
        } else {
            cmd.args(["--node-id", &id.to_string(), "--cluster", &list]);
        }
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("SWITCHYARD_NODE_LOG")
                    .unwrap_or_else(|_| "warn,switchyard::cluster=info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        assert!(first.starts_with("switchyard node"), "{first}");
        std::thread::spawn(move || for _ in lines {});
        node.child = Some(child);
    }

    fn kill(&mut self, id: u64) {
        let mut child = self.nodes[id as usize - 1].child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Stops node `id` as an operator's rolling restart does (SIGTERM).
    /// The handle answers how long after the signal it exited, and
    /// checks that it exited cleanly within 20 s.
    fn terminate(&mut self, id: u64) -> std::thread::JoinHandle<Duration> {
        let mut child = self.nodes[id as usize - 1].child.take().unwrap();
        sigterm(&child);
        let since = Instant::now();
        std::thread::spawn(move || {
            let status = loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break s;
                }
                assert!(
                    since.elapsed() < Duration::from_secs(20),
                    "node {id} did not stop on SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(5));
            };
            assert!(status.success(), "node {id} stopped with {status}");
            since.elapsed()
        })
    }

    /// Stops every node gracefully, `last` last: once the others are
    /// gone it can commit nothing more, so every node stops at the same
    /// applied position.
    fn stop_all_but_last(&mut self, last: u64) {
        let order: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].id != last)
            .chain((0..self.nodes.len()).filter(|&i| self.nodes[i].id == last))
            .collect();
        for i in order {
            if let Some(mut c) = self.nodes[i].child.take() {
                sigterm(&c);
                c.wait().unwrap();
            }
        }
    }

    fn cert(&self) -> PathBuf {
        self.nodes[0].dir.join("cert.pem")
    }

    async fn client(&self) -> Arc<Client> {
        Arc::new(self.group_client(0).await)
    }

    /// A client of group `group` (group 0's routes every topic to its
    /// group itself).
    async fn group_client(&self, group: u32) -> Client {
        let mut cfg = ClientConfig::new(self.addrs[0])
            .with_ca_file(self.cert())
            .with_token_file(self.nodes[0].dir.join("admin.token"))
            .unwrap()
            .with_cluster(self.addrs.iter().copied())
            .with_group(group);
        // Notice a killed leader within a second or two.
        cfg.idle_timeout = Duration::from_millis(1500);
        Client::connect(cfg).await.unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var_os("SWITCHYARD_KEEP_CLUSTER").is_some() {
            eprintln!("cluster files kept in {}", self._root.path().display());
            std::mem::forget(std::mem::replace(
                &mut self._root,
                tempfile::tempdir().unwrap(),
            ));
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The leader's view of the cluster (asked again if the request was cut
/// off by a leader change).
async fn cluster_status(c: &Client) -> serde_json::Value {
    let mut tries = 0;
    loop {
        match c
            .admin_request("cluster_status", serde_json::json!({}), bytes::Bytes::new())
            .await
        {
            Ok(v) => return v,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("cluster_status: {e}; again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cluster_status: {e}"),
        }
    }
}

/// Waits until every node's log matches the leader's.
async fn converged(c: &Client) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = cluster_status(c).await;
        let nodes = s["nodes"].as_array().unwrap();
        if nodes.iter().all(|n| n["behind"] == 0) {
            return s["leader"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "never converged: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a topic, again if the leader changed under the request (an
/// admin request is not resent by the client: its fate is unknown).
async fn create_topic(c: &Client, name: &str, partitions: u32) {
    for _ in 0..20 {
        match c.create_topic(name, partitions).await {
            Ok(_) => return,
            Err(e) if e.code() == Some(switchyard::client::ErrorCode::TopicExists) => return,
            Err(e) => {
                eprintln!("create {name}: {e}; again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    panic!("could not create {name}");
}

fn kills() -> usize {
    std::env::var("SWITCHYARD_CLUSTER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_message() {
    if let Ok(filter) = std::env::var("SWITCHYARD_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    }
    let mut cluster = Cluster::start(3);
    let admin = cluster.client().await;
    create_topic(&admin, "jobs", 3).await;

    // A pipelined producer, every record with a message id: remembers
    // where each acknowledged id was stored.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let stored: Arc<Mutex<HashMap<String, (u32, u64)>>> = Arc::default();
    let producer = {
        let c = cluster.client().await;
        let (stop, acked, stored) = (stop.clone(), acked.clone(), stored.clone());
        tokio::spawn(async move {
            let mut in_flight = FuturesOrdered::new();
            let mut b = 0;
            let settle = |ids: Vec<String>, acks: Vec<switchyard::client::Ack>| {
                let mut s = stored.lock().unwrap();
                for (id, a) in ids.into_iter().zip(acks) {
                    if let Some(old) = s.insert(id.clone(), (a.partition, a.offset)) {
                        panic!("{id} acknowledged twice: {old:?} and {a:?}");
                    }
                }
                acked.store(s.len(), Ordering::Relaxed);
            };
            while !stop.load(Ordering::Relaxed) {
                let ids: Vec<String> = (0..PER_BATCH)
                    .map(|i| format!("job-{}", b * PER_BATCH + i))
                    .collect();
                let records = ids
                    .iter()
                    .map(|id| Record::new(id.clone()).with_message_id(id.clone()))
                    .collect();
                let pending = c.queue_batch("jobs", records).await.unwrap();
                in_flight.push_back(async move { (ids, pending.await) });
                if in_flight.len() == 8 {
                    let (ids, acks) = in_flight.next().await.unwrap();
                    settle(ids, acks.expect("a publish failed"));
                }
                b += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            while let Some((ids, acks)) = in_flight.next().await {
                settle(ids, acks.expect("a publish failed"));
            }
        })
    };

    // A queue consumer acking everything: an acknowledged ack must never
    // be followed by the same message again.
    let worker_done = Arc::new(AtomicBool::new(false));
    let worker = {
        let c = cluster.client().await;
        let done = worker_done.clone();
        tokio::spawn(async move {
            let mut q = c
                .subscribe_queue(QueueOptions::new("jobs", "workers"))
                .await
                .unwrap();
            let mut settled: HashSet<(u32, u64)> = HashSet::new();
            let mut seen: HashSet<Vec<u8>> = HashSet::new();
            let mut redeliveries = 0;
            // Acks go in batches (one request per up to 256 messages, or
            // whenever the queue pauses): one commit each, so the group
            // keeps up with the producer.
            let mut batch: Vec<switchyard::client::DeliveryTag> = Vec::new();
            let mut batch_joined = q.rejoins();
            while !done.load(Ordering::Relaxed) {
                let joined = q.rejoins();
                if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(20), q.next()).await
                {
                    let m = m.unwrap();
                    let at = (m.tag.partition, m.tag.offset);
                    assert!(
                        !settled.contains(&at),
                        "p{}@{} came again after its ack was answered (attempt {})",
                        at.0,
                        at.1,
                        m.attempt()
                    );
                    if !seen.insert(m.payload().to_vec()) {
                        redeliveries += 1;
                    }
                    if joined != batch_joined {
                        // Delivered before the consumer rejoined: the
                        // router released them; they come again.
                        batch.clear();
                        batch_joined = joined;
                    }
                    batch.push(m.tag);
                    if batch.len() < 256 {
                        continue;
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                // Settled only if the router answered the ack: no rejoin
                // since the messages came (a rejoin makes it a no-op).
                if q.ack_many(&batch).await.is_ok() && q.rejoins() == batch_joined {
                    settled.extend(batch.iter().map(|t| (t.partition, t.offset)));
                }
                batch.clear();
                batch_joined = q.rejoins();
            }
            (seen, redeliveries)
        })
    };

    let (mut failovers, mut stopped, mut moved) = (Vec::new(), Vec::new(), Vec::new());
    let wait_for_acks = |n: usize| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while acked.load(Ordering::Relaxed) < n {
                assert!(Instant::now() < deadline, "no acknowledgement for 30 s");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for_acks(100).await;
    for k in 0..kills() {
        let mut leader = converged(&admin).await;
        if k % 4 == 1 {
            // Before every fourth kill an operator moves leadership with
            // `cluster step-down` under the same load (past the leader's
            // lease, which it would otherwise wait out first): the
            // router's commits are held back while it runs.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let from = acked.load(Ordering::Relaxed);
            let asked = Instant::now();
            let answer = admin
                .admin_request(
                    "cluster_step_down",
                    serde_json::json!({}),
                    bytes::Bytes::new(),
                )
                .await;
            wait_for_acks(from + PER_BATCH * 8 + 1).await;
            let took = asked.elapsed();
            // The old leader answers before its router stops.
            let answer = answer.unwrap_or_else(|e| panic!("step-down from node {leader}: {e}"));
            let to = converged(&admin).await;
            assert_ne!(to, leader, "the step-down answered {answer}");
            assert_eq!(answer["leader"].as_u64(), Some(to), "{answer}");
            moved.push(took);
            eprintln!("step-down: node {leader} to node {to}, writes again after {took:?}");
            leader = to;
        }
        if k % 4 == 3 {
            // Stopped as in a rolling restart below, the leader has led
            // for a while: one elected less than its lease (the election
            // timeout's maximum, 1 s) ago cannot hand over until it is out.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let before = acked.load(Ordering::Relaxed);
        wait_for_acks(before + 50).await;
        let from = acked.load(Ordering::Relaxed);
        // Every fourth time the leader is stopped as in a rolling restart
        // instead: it must hand over cleanly under the same load.
        let graceful = k % 4 == 3;
        let killed = Instant::now();
        let stopping = if graceful {
            Some(cluster.terminate(leader))
        } else {
            cluster.kill(leader);
            None
        };
        // Writes resume once a new leader serves and clients found it.
        wait_for_acks(from + PER_BATCH * 8 + 1).await;
        let took = killed.elapsed();
        if let Some(exit) = stopping {
            let exited = exit
                .join()
                .expect("the stopped node exits cleanly within 20 s");
            stopped.push(took);
            eprintln!(
                "stop {}: node {leader}, writes again after {took:?}, exited after {exited:?}",
                k + 1
            );
        } else {
            failovers.push(took);
            eprintln!("kill {}: node {leader}, writes again after {took:?}", k + 1);
        }
        cluster.up(leader);
    }
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    let stored = stored.lock().unwrap().clone();
    let total = stored.len();

    // The topic holds each acknowledged record once, at its acknowledged
    // position, with offsets dense in every partition.
    let mut sub = admin
        .subscribe(SubscribeOptions::new("jobs").start(StartPosition::Earliest))
        .await
        .unwrap();
    let mut log: BTreeMap<(u32, u64), String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while log.len() < total && Instant::now() < deadline {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await else {
            continue;
        };
        let m = m.unwrap();
        let payload = String::from_utf8(m.payload().to_vec()).unwrap();
        assert!(log.insert((m.partition, m.offset), payload).is_none());
    }
    let info = admin.describe_topic("jobs").await.unwrap();
    let in_topic: u64 = info.partitions.iter().map(|p| p.end - p.start).sum();
    assert_eq!(
        in_topic, total as u64,
        "records stored beyond the acknowledged ones"
    );
    for (id, at) in &stored {
        assert_eq!(
            log.get(at),
            Some(id),
            "{id} not at its acknowledged position {at:?}"
        );
    }
    for (i, p) in info.partitions.iter().enumerate() {
        let offsets: Vec<u64> = log
            .keys()
            .filter(|k| k.0 == i as u32)
            .map(|k| k.1)
            .collect();
        assert_eq!(
            offsets,
            (p.start..p.end).collect::<Vec<_>>(),
            "partition {i}"
        );
    }

    // The queue group got every record (at least once).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = admin.queue_stats(Some("jobs")).await.unwrap();
        if s[0]["backlog"] == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker_done.store(true, Ordering::Relaxed);
    let (seen, redeliveries) = worker.await.unwrap();
    assert_eq!(seen.len(), total, "the queue group got every record");

    // Every replica holds the same tables, byte for byte.
    let leader = converged(&admin).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.stop_all_but_last(leader);
    let replicas: Vec<(bytes::Bytes, Option<u64>)> = cluster
        .nodes
        .iter()
        .map(|n| {
            let sm = switchyard::cluster::state::StateMachine::open(&n.dir.join("switchyard.redb"))
                .unwrap();
            (sm.dump().unwrap(), sm.applied().unwrap().0.map(|l| l.index))
        })
        .collect();
    for (i, r) in replicas.iter().enumerate().skip(1) {
        assert_eq!(
            r.1,
            replicas[0].1,
            "node {} applied another position",
            i + 1
        );
        assert!(
            r.0 == replicas[0].0,
            "node {}'s tables differ from node 1's",
            i + 1
        );
    }

    failovers.sort();
    stopped.sort();
    moved.sort();
    if let (Some(first), Some(last)) = (moved.first(), moved.last()) {
        eprintln!(
            "{} step-downs under load: writes resumed after {first:?} to {last:?}",
            moved.len()
        );
    }
    if let (Some(first), Some(last)) = (stopped.first(), stopped.last()) {
        eprintln!(
            "{} graceful stops of the leader: writes resumed after {first:?} to {last:?}",
            stopped.len()
        );
    }
    eprintln!(
        "{} kills, {total} records acknowledged, {redeliveries} queue redeliveries; \
         writes resumed after p50 {:?}, max {:?}",
        failovers.len(),
        failovers[failovers.len() / 2],
        failovers.last().unwrap()
    );
}

/// The README's cluster steps: three nodes, `cluster status` beside any
/// node, kill one, and keep publishing and reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_beside_any_node_names_the_leader() {
    let mut cluster = Cluster::start_with(3, true);
    let status = |dir: &Path| {
        let out = succeed(
            Command::new(router_bin())
                .args(["cluster", "status", "--json", "--ca"])
                .arg(dir.join("cert.pem"))
                .args(["--addr", &cluster_addr(dir)]),
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let mut leader = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &cluster.nodes {
        loop {
            let s = status(&n.dir);
            if s["leader"].is_u64() {
                assert!(leader.is_none() || leader == s["leader"].as_u64());
                leader = s["leader"].as_u64();
                assert_eq!(s["nodes"].as_array().unwrap().len(), 3);
                // Answered by the leader, which hears from a majority.
                assert!(
                    s["quorum_ack_ms"].as_u64().is_some_and(|ms| ms < 10_000),
                    "{s}"
                );
                break;
            }
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let leader = leader.unwrap();
    let admin = cluster.client().await;
    create_topic(&admin, "t", 1).await;
    admin.publish("t", Record::new("before")).await.unwrap();
    // A client given only the leader's address learns the other nodes in
    // the handshake, which is what lets it outlive the leader below.
    let leader_addr = cluster.nodes[leader as usize - 1].addr;
    let lone = Client::connect(
        ClientConfig::new(leader_addr)
            .with_ca_file(cluster.cert())
            .with_token_file(cluster.nodes[0].dir.join("admin.token"))
            .unwrap(),
    )
    .await
    .unwrap();
    let mut told = lone.server_info().cluster.clone();
    told.sort();
    let mut all = cluster.addrs.clone();
    all.sort();
    assert_eq!(told, all, "the nodes a cluster client is told of");
    // A client of protocol version 1 is not sent them: it would take the
    // field for trailing bytes and fail the handshake.
    let token = std::fs::read_to_string(cluster.nodes[0].dir.join("admin.token")).unwrap();
    for (max_version, nodes) in [(1, 0), (2, 3)] {
        let conn = common::raw_connect_to(leader_addr, &cluster.cert(), "127.0.0.1").await;
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let hello = Frame::Hello {
            min_version: 1,
            max_version,
            client: "raw".into(),
            token: Some(token.trim().to_string()),
        };
        send.write_all(&hello.to_bytes()).await.unwrap();
        let mut reader = FrameReader::new(recv, 1 << 20);
        match reader.next().await {
            Ok(Some(Frame::HelloOk {
                version, cluster, ..
            })) => {
                assert_eq!(version, max_version);
                assert_eq!(cluster.len(), nodes, "version {version}");
            }
            other => panic!("version {max_version}: {other:?}"),
        }
        conn.close(0u32.into(), b"");
    }
    // The leader's metrics describe the cluster, and the publish's
    // replication was timed.
    let at = cluster.nodes[leader as usize - 1].addr;
    let (code, body) = common::get_metrics(SocketAddr::new(at.ip(), at.port() + 1), None).await;
    assert_eq!(code, 200);
    for line in [
        format!("switchyard_cluster_leader {leader}"),
        format!("switchyard_cluster_member{{node=\"{leader}\",role=\"leader\"}} 1"),
    ] {
        assert!(body.lines().any(|l| l == line), "no `{line}` in:\n{body}");
    }
    let followers = body
        .lines()
        .filter(|l| l.starts_with("switchyard_cluster_member{") && l.contains("role=\"follower\""))
        .count();
    assert_eq!(followers, 2);
    assert!(
        body.lines()
            .any(|l| l.starts_with("switchyard_cluster_quorum_ack_age_milliseconds ")),
        "no quorum age in:\n{body}"
    );
    let replicated = body
        .lines()
        .find_map(|l| l.strip_prefix("switchyard_cluster_replicate_seconds_count "))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        replicated.is_some_and(|n| n >= 1),
        "no replicated commit timed in:\n{body}"
    );
    assert!(body.lines().any(|l| l == "switchyard_cluster_serving 1"));
    // Every follower answers too (a scraper of every node must not see
    // the followers as down): its own position, and that it follows.
    let addrs: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.addr).collect();
    let metrics_of = |id: u64| {
        let at = addrs[id as usize - 1];
        SocketAddr::new(at.ip(), at.port() + 1)
    };
    for n in cluster.nodes.iter().filter(|n| n.id != leader) {
        // The leader commits with any one follower, so the other may
        // still be starting (or catching up) on a busy machine: it serves
        // its metrics from the start, and names the leader once it has
        // heard from it.
        let deadline = Instant::now() + Duration::from_secs(20);
        let body = loop {
            let (code, body) = common::get_metrics(metrics_of(n.id), None).await;
            assert_eq!(code, 200, "node {}", n.id);
            let heard = body
                .lines()
                .any(|l| l == format!("switchyard_cluster_leader {leader}"));
            if heard || Instant::now() >= deadline {
                break body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for line in [
            "switchyard_cluster_serving 0".to_string(),
            format!("switchyard_cluster_leader {leader}"),
        ] {
            assert!(body.lines().any(|l| l == line), "no `{line}` in:\n{body}");
        }
        let applied = body
            .lines()
            .find_map(|l| l.strip_prefix("switchyard_cluster_applied_index "))
            .and_then(|n| n.parse::<u64>().ok());
        assert!(applied.is_some_and(|i| i > 0), "{body}");
        // Its disk, which fills as surely as the leader's.
        for name in [
            r#"switchyard_storage_file_bytes{file="database"} "#,
            r#"switchyard_storage_file_bytes{file="raft_log"} "#,
            "switchyard_disk_free_bytes ",
        ] {
            let v = body
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.parse::<u64>().ok());
            assert!(v.is_some_and(|v| v > 0), "no `{name}` in:\n{body}");
        }
        // Members and their lag are the leader's to tell.
        assert!(!body.contains("switchyard_cluster_member"), "{body}");
    }
    // An operator moves leadership off a node before its maintenance; the
    // CLI reports where it went, and the cluster agrees.
    let to = leader % 3 + 1;
    let out = succeed(
        Command::new(router_bin())
            .args(["cluster", "step-down", "--to", &to.to_string(), "--ca"])
            .arg(cluster.cert())
            .args(["--addr", &cluster_addr(&cluster.nodes[0].dir)]),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("from node {leader} to node {to} in")),
        "{said}"
    );
    let leader = to;
    assert_eq!(converged(&admin).await, leader);
    // Maintenance of the leader's machine: `cluster drain` moves the
    // leadership off the node and keeps it off (the mark outlives its
    // restart), `cluster status` marks it, the last undrained voter cannot
    // be drained, and `undrain` ends it.
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(router_bin());
        cmd.args(args)
            .arg("--ca")
            .arg(cluster.cert())
            .args(["--addr", &cluster_addr(&cluster.nodes[0].dir)]);
        cmd
    };
    let drained = leader;
    let out = succeed(&mut cli(&[
        "cluster",
        "drain",
        "--node",
        &drained.to_string(),
    ]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("node {drained} is drained: it leads no group")),
        "{said}"
    );
    let leader = converged(&admin).await;
    assert_ne!(leader, drained);
    let out = succeed(&mut cli(&["cluster", "status"]));
    let said = String::from_utf8_lossy(&out.stdout);
    let marked: Vec<&str> = said.lines().filter(|l| l.contains("(drained)")).collect();
    assert!(
        marked.len() == 1 && marked[0].starts_with(&format!("{drained} ")),
        "{said}"
    );
    let flagged = |id: u64, v: u8| async move {
        let (_, body) = common::get_metrics(metrics_of(id), None).await;
        let line = format!("switchyard_cluster_drained {v}");
        assert!(body.lines().any(|l| l == line), "node {id}: no `{line}`");
    };
    flagged(drained, 1).await;
    flagged(leader, 0).await;
    let third = (1..=3).find(|&n| n != drained && n != leader).unwrap();
    succeed(&mut cli(&[
        "cluster",
        "drain",
        "--no-wait",
        "--node",
        &third.to_string(),
    ]));
    let refused = cli(&["cluster", "drain", "--node", &leader.to_string()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("would leave no voter"),
        "{said}"
    );
    for n in [drained, third] {
        let out = succeed(&mut cli(&["cluster", "undrain", "--node", &n.to_string()]));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("no longer drained"), "{said}");
    }
    let out = succeed(&mut cli(&["cluster", "status"]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("(drained)"));
    flagged(drained, 0).await;
    assert_eq!(converged(&admin).await, leader);
    let lone = Client::connect(
        ClientConfig::new(cluster.nodes[leader as usize - 1].addr)
            .with_ca_file(cluster.cert())
            .with_token_file(cluster.nodes[0].dir.join("admin.token"))
            .unwrap(),
    )
    .await
    .unwrap();
    cluster.kill(leader);
    // With a message id the client resends it to the new leader if the
    // first copy's fate was lost with the old one.
    admin
        .publish("t", Record::new("after").with_message_id("after"))
        .await
        .unwrap();
    // The client that knew only the dead leader finds the new one, and
    // in seconds: it switched to the cluster's idle timeout (3 s) on
    // finding a cluster. At the single-router default (15 s) this took 16 s.
    let since = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(10),
        lone.publish("t", Record::new("lone").with_message_id("lone")),
    )
    .await
    .expect("a client told of the cluster reaches the new leader")
    .unwrap();
    eprintln!(
        "a client that knew only the killed leader published again after {:?}",
        since.elapsed()
    );
    let other = cluster.nodes.iter().find(|n| n.id != leader).unwrap();
    let s = status(&other.dir);
    assert_ne!(s["leader"].as_u64(), Some(leader));
    // The new leader's metrics address, a follower's a moment ago, now
    // has its router's metrics.
    let new_leader = s["leader"].as_u64().unwrap();
    let (code, body) = common::get_metrics(metrics_of(new_leader), None).await;
    assert_eq!(code, 200);
    assert!(
        body.lines().any(|l| l == "switchyard_cluster_serving 1"),
        "{body}"
    );
    assert!(
        body.contains("switchyard_published_messages_total"),
        "{body}"
    );
    let info = admin.describe_topic("t").await.unwrap();
    assert_eq!(info.partitions[0].end, 3);
}

/// The README's cluster of several groups, run with the CLI: `serve
/// --groups 3` on three nodes, topics placed one per group, published
/// and read through one node's address, and a node killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_groups_serve_the_cli_and_outlive_a_killed_node() {
    use std::io::Write as _;
    const GROUPS: usize = 3;
    // Metrics on, as `serve` has them by default: a node leading a group
    // other than 0 must not stop over the node's one metrics address.
    let mut cluster = Cluster::start_groups(3, true, GROUPS as u32);
    let cli = |at: &Path, args: &[&str]| {
        let mut c = Command::new(router_bin());
        c.args(args)
            .env("SWITCHYARD_CA", at.join("cert.pem"))
            .env("SWITCHYARD_ADDR", cluster_addr(at));
        c
    };
    // Every group's leader, as `cluster status` beside `at` prints them
    // once each group has one (other than `not`).
    let leaders = |at: &Path, not: Option<u64>| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = cli(at, &["cluster", "status", "--json"]).output().unwrap();
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let leaders: Vec<Option<u64>> = s["groups"]
                .as_array()
                .map(|g| g.iter().map(|g| g["leader"].as_u64()).collect())
                .unwrap_or_default();
            if leaders.len() == GROUPS && leaders.iter().all(|l| l.is_some() && *l != not) {
                return leaders.into_iter().flatten().collect::<Vec<u64>>();
            }
            assert!(Instant::now() < deadline, "groups never all led: {s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let n1 = cluster.nodes[0].dir.clone();
    leaders(&n1, None);
    // Every node serves its metrics, the ones leading groups 1 and 2 too,
    // with each group's Raft state under a `raft_group` label: one node
    // serves each group, and that node lists the group's members.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut serving = vec![Vec::new(); GROUPS];
        for n in &cluster.nodes {
            let at = SocketAddr::new(n.addr.ip(), n.addr.port() + 1);
            let (code, body) = common::get_metrics(at, None).await;
            assert_eq!(code, 200, "node {}: {body}", n.id);
            for (g, on) in serving.iter_mut().enumerate() {
                let term = format!("switchyard_cluster_term{{raft_group=\"{g}\"}} ");
                assert!(body.contains(&term), "node {}: no {term}\n{body}", n.id);
                if body.contains(&format!(
                    "switchyard_cluster_serving{{raft_group=\"{g}\"}} 1"
                )) {
                    let member = format!("switchyard_cluster_member{{raft_group=\"{g}\",node=");
                    assert!(body.contains(&member), "node {}: no {member}\n{body}", n.id);
                    on.push(n.id);
                }
            }
        }
        if serving.iter().all(|on| on.len() == 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "each group should be served by one node: {serving:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let topics = ["orders", "payments", "audit"];
    for t in topics {
        let out = succeed(&mut cli(
            &n1,
            &[
                "topic",
                "create",
                t,
                "--partitions",
                "2",
                "--replication-factor",
                "3",
            ],
        ));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("(replication factor 3)"), "{said}");
    }
    // A factor the cluster does not give is refused, and nothing made.
    let two = cli(
        &n1,
        &["topic", "create", "few", "--replication-factor", "2"],
    )
    .output()
    .unwrap();
    assert!(!two.status.success());
    let err = String::from_utf8_lossy(&two.stderr);
    assert!(
        err.contains("replication factor 2 is not available here"),
        "{err}"
    );
    // Group 0 placed them one per group (the least-loaded first).
    let admin = cluster.client().await;
    let mut placed = Vec::new();
    for t in topics {
        placed.push(admin.topic_group(t).await.unwrap());
    }
    assert_eq!(placed, [0, 1, 2]);
    // A plugin bound to a pattern binds the topics it matches in every
    // group; `list` and `status` gather every group's; removing it
    // removes it from each.
    admin
        .deploy_plugin(
            common::plugin_wasm("probe"),
            serde_json::json!({ "name": "keep", "hook": "route", "topic": "*", "deadline_ms": 1000 }),
        )
        .await
        .unwrap();
    let plugins = || async {
        admin
            .plugin_request("list", serde_json::json!({}), Default::default())
            .await
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(plugins().await, GROUPS);
    let status = admin.status().await.unwrap();
    let names: Vec<&str> = status["topics"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["audit", "orders", "payments"], "{status}");
    assert_eq!(status["plugins"].as_array().unwrap().len(), GROUPS);
    admin
        .plugin_request(
            "remove",
            serde_json::json!({ "name": "keep" }),
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(plugins().await, 0);
    let publish = |at: &Path, topic: &str, from: u32| {
        let mut child = cli(at, &["publish", topic])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let lines: String = (from..from + 300).map(|i| format!("{i}\n")).collect();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(lines.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "publish to {topic}");
    };
    for t in topics {
        publish(&n1, t, 1);
    }
    // Each group's router families are on the metrics of the node that
    // leads it, under its `raft_group`: the 300 records of the group's
    // topic at its partitions' ends, and the group's own database file.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut seen = [false; GROUPS];
        for n in &cluster.nodes {
            let at = SocketAddr::new(n.addr.ip(), n.addr.port() + 1);
            let (_, body) = common::get_metrics(at, None).await;
            for (g, t) in topics.iter().enumerate() {
                let end = format!(
                    "switchyard_partition_end_offset{{raft_group=\"{g}\",topic=\"{t}\",partition="
                );
                let ends: u64 = body
                    .lines()
                    .filter(|l| l.starts_with(&end))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .sum();
                if ends == 300 {
                    let file = format!(
                        "switchyard_storage_file_bytes{{raft_group=\"{g}\",file=\"database\"}} "
                    );
                    assert!(body.contains(&file), "node {}: no {file}\n{body}", n.id);
                    seen[g] = true;
                }
            }
        }
        if seen.iter().all(|s| *s) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every group's router families on the node leading it: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Kill -9 the node leading group 0, the one that places topics; the
    // CLI beside a surviving node goes on.
    let before = leaders(&n1, None);
    let killed = before[0];
    cluster.kill(killed);
    let alive = cluster
        .nodes
        .iter()
        .find(|n| n.id != killed)
        .unwrap()
        .dir
        .clone();
    let after = leaders(&alive, Some(killed));
    eprintln!("group leaders {before:?}; node {killed} killed; then {after:?}");
    // The CLI beside the killed node dials it first and finds the others
    // at once: each node has a head start, not its whole handshake limit,
    // and each group's connection starts where group 0's was made. (It
    // took 6 s a command while a node was down: a second per connection.)
    let beside_killed = cluster.nodes[killed as usize - 1].dir.clone();
    let since = Instant::now();
    let out = succeed(&mut cli(&beside_killed, &["topic", "list"]));
    let took = since.elapsed();
    let listed = String::from_utf8_lossy(&out.stdout);
    // Each topic with the group that holds it, as placed above.
    for (g, t) in topics.iter().enumerate() {
        let row: Vec<&str> = listed
            .lines()
            .find(|l| l.starts_with(t))
            .unwrap_or_else(|| panic!("no {t} in:\n{listed}"))
            .split_whitespace()
            .collect();
        assert_eq!(row.last(), Some(&g.to_string().as_str()), "{listed}");
    }
    eprintln!("`topic list` with its first address down took {took:?}");
    assert!(
        took < Duration::from_secs(2),
        "`topic list` waited {took:?} for a node that is down"
    );
    for t in topics {
        publish(&alive, t, 301);
    }
    // `topic describe` names each topic's replicas, and the killed node
    // among them as not in sync (it missed the records just published).
    for t in topics {
        let out = succeed(&mut cli(&alive, &["topic", "describe", t]));
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("replicas:"))
            .unwrap_or_else(|| panic!("no replicas in:\n{text}"));
        assert!(
            line.contains("nodes 1, 2, 3 (replication factor 3)"),
            "{line}"
        );
        let in_sync: Vec<u64> = line
            .split("in sync: ")
            .nth(1)
            .and_then(|r| r.split(" (").next())
            .map(|r| r.split(", ").filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default();
        assert_eq!(in_sync.len(), 2, "{line}");
        assert!(!in_sync.contains(&killed), "{line}");
        assert!(line.contains(&format!("(node {killed} ")), "{line}");
    }
    for t in topics {
        let out = succeed(&mut cli(&alive, &["subscribe", t, "--count", "600"]));
        let mut got: Vec<u32> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, (1..=600).collect::<Vec<u32>>(), "{t}");
    }
    // With a node down, the node left leading two groups must not try to
    // hand one to the node that is down: each try held that group's
    // writes back for 2 s, every second (publishes to it took 3 s).
    for t in topics {
        admin.publish(t, Record::new("warm")).await.unwrap();
    }
    let (mut slowest, mut n) = (Duration::ZERO, 0);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        for t in topics {
            let since = Instant::now();
            admin.publish(t, Record::new("steady")).await.unwrap();
            slowest = slowest.max(since.elapsed());
            n += 1;
        }
    }
    eprintln!("{n} publishes with a node down: the slowest took {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "a publish waited {slowest:?} with a node down"
    );
    // `cluster status` prints a row per group.
    let out = succeed(&mut cli(&alive, &["cluster", "status"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("groups, as node"), "{text}");
    // Each group as its leader sees it: two of its three replicas in sync,
    // the killed node's behind the records published since.
    let in_sync: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("groups, as node"))
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    assert_eq!(in_sync, ["2/3"; GROUPS], "{text}");
    // `status` shows the node's Raft log where a single router's journal
    // would be (a cluster node has none).
    let out = succeed(&mut cli(&alive, &["status"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" · raft log "), "{text}");
    // `check` of the killed (stopped) node's directory verifies every
    // group's tables, not only group 0's, and the Raft log; a damaged
    // group database is found, and repairing a replica is refused.
    let killed_dir = &cluster.nodes[killed as usize - 1].dir;
    let check = |extra: &[&str]| {
        Command::new(router_bin())
            .args(["check", "--data"])
            .arg(killed_dir)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = check(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}{err}");
    // (A killed node's tables hold what was last synced, its Raft log the
    // rest: a group may show no topic yet.)
    for g in 0..GROUPS {
        assert!(text.contains(&format!(" group {g}: ")), "{text}");
    }
    assert!(text.contains("raft.redb: the Raft log's pages"), "{text}");
    let g2 = killed_dir.join("g2").join("switchyard.redb");
    let len = std::fs::metadata(&g2).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&g2)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = check(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("problem: ") && text.contains("g2"), "{text}");
    assert!(text.contains("cluster remove-node"), "{text}");
    let out = check(&["--repair"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("would change a replica"), "{err}");
}

fn cluster_addr(dir: &Path) -> String {
    let list = std::fs::read_to_string(dir.join("cluster.addrs")).unwrap();
    let i: usize = dir.file_name().unwrap().to_str().unwrap()[1..]
        .parse()
        .unwrap();
    list.trim().split(',').nth(i - 1).unwrap().to_string()
}

/// `cluster add-node` grows a running cluster by a fourth node (learner,
/// then voter) and `remove-node` takes one out, while the data stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_added_and_removed_while_the_cluster_serves() {
    add_and_remove_a_node(1).await;
}

/// The same on a cluster of three groups: the new node joins every group
/// (not only group 0, whose router answers the CLI), holds each group's
/// rows, and leaves every group when removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_added_to_and_removed_from_every_group() {
    add_and_remove_a_node(3).await;
}

async fn add_and_remove_a_node(groups: u32) {
    let mut cluster = Cluster::start_groups(3, false, groups);
    let admin = cluster.client().await;
    create_topic(&admin, "t", 2).await;
    // Changes besides records, replicated as rows too: the byte-for-byte
    // comparison at the end covers them on every node, the new one too.
    admin.grant("alice", &["consume:t"]).await.unwrap();
    admin
        .set_topic_policy("t", serde_json::json!({ "max_attempts": 3 }))
        .await
        .unwrap();
    create_topic(&admin, "gone", 1).await;
    admin.publish("gone", Record::new("x")).await.unwrap();
    admin.delete_topic("gone").await.unwrap();
    // With three groups, `t` is in group 0, `gone` was in group 1, and
    // these two fill groups 2 and 1 (the least loaded first).
    let topics: &[&str] = if groups > 1 { &["t", "u", "v"] } else { &["t"] };
    for t in &topics[1..] {
        create_topic(&admin, t, 1).await;
    }
    let mut placed = Vec::new();
    for t in topics {
        placed.push(admin.topic_group(t).await.unwrap());
    }
    placed.sort_unstable();
    assert_eq!(placed, (0..groups).collect::<Vec<u32>>());
    for t in topics {
        for i in 0..50 {
            let id = format!("r{i}");
            admin
                .publish(t, Record::new(id.clone()).with_message_id(id))
                .await
                .unwrap();
        }
    }
    let root = cluster._root.path().to_path_buf();
    let new_addr = loop {
        let a = cluster_addrs(1)[0];
        if !cluster.addrs.contains(&a) {
            break a;
        }
    };
    // add-node makes the directory, prints the serve line and waits for
    // the node to catch up.
    let add = Command::new(router_bin())
        .args(["cluster", "add-node", "--dir"])
        .arg(&root)
        .args(["--node-addr", &new_addr.to_string(), "--ca"])
        .arg(cluster.cert())
        .args(["--addr", &cluster.addrs[0].to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !root.join("n4").join("cluster.addrs").exists() {
        assert!(Instant::now() < deadline, "add-node made no directory");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Until the new node runs and holds the log it is a learner, without
    // a vote, and add-node waits: a voter that is not there would leave a
    // group of three needing three of four to commit.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = cluster_status(&admin).await;
    let role = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == 4)
        .map(|n| n["role"].clone());
    assert_eq!(role, Some("learner".into()), "{s}");
    let mut add = add;
    assert!(add.try_wait().unwrap().is_none(), "add-node returned early");
    cluster.addrs.push(new_addr);
    cluster.nodes.push(Node {
        id: 4,
        addr: new_addr,
        dir: root.join("n4"),
        child: None,
    });
    cluster.start_node(4, true);
    let out = succeeded_off_runtime(move || add.wait_with_output().unwrap()).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("node 4 joined"));
    // The new node shares the cluster's replication factor (and founding
    // size), which add-node wrote beside its certificate.
    let recorded = std::fs::read_to_string(root.join("n4").join("cluster-replication")).unwrap();
    assert_eq!(recorded.trim(), "3 3");
    let s = cluster_status(&admin).await;
    // Group 0 (the metadata) has every node: all four voters. A group
    // of its own size (the replication factor, 3 by default) keeps its
    // three: the new node holds no replica of it until one moves there.
    let views: Vec<serde_json::Value> = match s["groups"].as_array() {
        Some(each) => each.clone(),
        None => vec![s.clone()],
    };
    assert_eq!(views.len(), groups as usize, "{s}");
    // With one group a topic has a copy on every node; with several,
    // the groups' own size.
    let factor = if groups > 1 { 3 } else { 4 };
    assert_eq!(s["replication_factor"], factor, "{s}");
    for g in &views {
        let nodes: Vec<(u64, &str)> = g["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["id"].as_u64().unwrap(), n["role"].as_str().unwrap()))
            .collect();
        assert!(nodes.iter().all(|(_, r)| *r != "learner"), "{s}");
        let has_new = nodes.iter().any(|(id, _)| *id == 4);
        if g["group"] == 0 {
            assert_eq!(nodes.len(), 4, "{s}");
            assert!(has_new, "{s}");
        } else {
            assert_eq!(nodes.len(), 3, "{s}");
            assert!(!has_new, "{s}");
        }
    }
    assert_eq!(converged(&admin).await, s["leader"].as_u64().unwrap());
    if groups > 1 {
        // A client given only the new node's address reaches the groups
        // it holds no replica of: the node sends it to their leaders,
        // which it learns by asking the others.
        let mut cfg = ClientConfig::new(new_addr)
            .with_ca_file(cluster.cert())
            .with_token_file(cluster.nodes[0].dir.join("admin.token"))
            .unwrap();
        cfg.idle_timeout = Duration::from_millis(1500);
        let outside = Client::connect(cfg).await.unwrap();
        for t in &topics[1..] {
            assert_ne!(outside.topic_group(t).await.unwrap(), 0);
            outside
                .publish(t, Record::new("r0").with_message_id("r0"))
                .await
                .unwrap();
        }
        outside.close().await;
    }

    // Remove a follower, drained first as for maintenance; the other three
    // go on, and the mark goes with the node.
    let leader = s["leader"].as_u64().unwrap();
    let gone = (1..=4).find(|&id| id != leader).unwrap();
    admin.drain_node(gone, true).await.unwrap();
    // Records flow to every topic while the node leaves (and, with
    // several groups, its replicas move): each is retried until it is
    // acknowledged, and its id makes a retry land once.
    let flowing = Arc::new(AtomicBool::new(true));
    let lanes: Vec<_> = topics
        .iter()
        .map(|t| {
            let (admin, flowing, t) = (admin.clone(), flowing.clone(), t.to_string());
            tokio::spawn(async move {
                let mut sent = 0u64;
                while flowing.load(Ordering::Relaxed) {
                    let id = format!("moving{sent}");
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while let Err(e) = admin
                        .publish(&t, Record::new(id.clone()).with_message_id(id.clone()))
                        .await
                    {
                        assert!(Instant::now() < deadline, "{t} {id}: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    sent += 1;
                }
                (t, sent)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut remove = Command::new(router_bin());
    remove
        .args(["cluster", "remove-node", "--id", &gone.to_string(), "--ca"])
        .arg(cluster.cert())
        .args(["--addr", &cluster.addrs[0].to_string()]);
    succeeded_off_runtime(move || remove.output().unwrap()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    flowing.store(false, Ordering::Relaxed);
    let mut moving = HashMap::new();
    for lane in lanes {
        let (t, sent) = lane.await.unwrap();
        assert!(sent > 0, "nothing published to {t} while the node left");
        moving.insert(t, sent);
    }
    cluster.kill(gone);
    for t in topics {
        admin
            .publish(t, Record::new("after").with_message_id("after"))
            .await
            .unwrap();
    }
    // Every group has three voters again: group 0 lost one of four, and
    // each of the others moved its replica from the node removed to the
    // new one, which was live, undrained and held the fewest.
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        let s = cluster_status(&admin).await;
        let each = s["groups"].as_array().cloned().unwrap_or(vec![s.clone()]);
        let settled = each.iter().all(|g| {
            let ids: Vec<u64> = g["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["id"].as_u64().unwrap())
                .collect();
            ids.len() == 3 && !ids.contains(&gone) && ids.contains(&4)
        });
        if settled {
            break s;
        }
        assert!(Instant::now() < deadline, "the replicas did not move: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(s["drained"], serde_json::json!([]), "{s}");
    for t in topics {
        let info = admin.describe_topic(t).await.unwrap();
        assert_eq!(
            info.partitions.iter().map(|p| p.end).sum::<u64>(),
            51 + moving[*t],
            "{t}: each acknowledged record once"
        );
    }
    // The new node holds what the others hold, in every group: each
    // group's leader sees every log matched before the nodes stop.
    let mut leader = converged(&admin).await;
    for g in 1..groups {
        converged(&cluster.group_client(g).await).await;
        leader = converged(&admin).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.stop_all_but_last(leader);
    for g in 0..groups {
        let dumps: Vec<bytes::Bytes> = cluster
            .nodes
            .iter()
            .filter(|n| n.id != gone)
            .map(|n| {
                let dir = switchyard::cluster::serve::group_dir(&n.dir, g);
                switchyard::cluster::state::StateMachine::open(&dir.join("switchyard.redb"))
                    .unwrap()
                    .dump()
                    .unwrap()
            })
            .collect();
        assert_eq!(dumps.len(), 3);
        assert!(
            dumps.iter().all(|d| *d == dumps[0]),
            "replicas of group {g} differ"
        );
    }
}

/// A route plugin on a cluster of several groups sends records to a
/// topic another group holds: each goes into its group's outbox in the
/// publish's commit and is forwarded from there, so every acknowledged
/// record lands in the target once and in order, also when the node
/// leading the origin's group is killed while they flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_to_another_groups_topic_land_once_through_the_outbox() {
    const RECORDS: usize = 240;
    let mut cluster = Cluster::start_groups(3, true, 3);
    let admin = cluster.client().await;
    create_topic(&admin, "orders", 1).await;
    create_topic(&admin, "audit", 1).await;
    let from = admin.topic_group("orders").await.unwrap();
    let to = admin.topic_group("audit").await.unwrap();
    assert_ne!(from, to, "the topics share a group");
    // Before the outbox, this was refused: "route to unknown topic".
    admin
        .deploy_plugin(
            common::plugin_wasm("route_by_header"),
            serde_json::json!({ "name": "split", "hook": "route", "topic": "orders" }),
        )
        .await
        .unwrap();
    // Four lanes publish without a break, each record after the last one's
    // acknowledgement; every third record of a lane stays on `orders`, the
    // others go to `audit`. A third of the way in, the node leading
    // `orders`' group is killed; two thirds in, it is back and the node
    // leading `audit`'s group is killed: each side's failover under load.
    const LANES: usize = 4;
    let routed = |j: usize| !j.is_multiple_of(3);
    let acked = Arc::new(AtomicUsize::new(0));
    let lanes: Vec<_> = (0..LANES)
        .map(|l| {
            let (admin, acked) = (admin.clone(), acked.clone());
            tokio::spawn(async move {
                for j in 0..RECORDS / LANES {
                    let id = format!("r{l}-{j}");
                    let mut record = Record::new(id.clone()).with_message_id(id);
                    if routed(j) {
                        record = record.with_header("route-to", "audit");
                    }
                    tokio::time::timeout(Duration::from_secs(30), admin.publish("orders", record))
                        .await
                        .expect("a publish hung")
                        .unwrap_or_else(|e| panic!("lane {l}, record {j}: {e}"));
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let until = |n: usize| {
        let acked = acked.clone();
        async move {
            while acked.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    until(RECORDS / 3).await;
    let s = cluster_status(&admin).await;
    let first = s["groups"][from as usize]["leader"].as_u64().unwrap();
    eprintln!("killing node {first}, which leads group {from} of `orders`");
    cluster.kill(first);
    until(2 * RECORDS / 3).await;
    cluster.up(first);
    converged(&admin).await;
    let s = cluster_status(&admin).await;
    let second = s["groups"][to as usize]["leader"].as_u64().unwrap();
    eprintln!("killing node {second}, which leads group {to} of `audit`");
    cluster.kill(second);
    let killed = [first, second];
    for lane in lanes {
        lane.await.unwrap();
    }
    let read = |topic: &'static str, want: usize| {
        let admin = admin.clone();
        async move {
            let mut sub = admin
                .subscribe(SubscribeOptions::new(topic).start(StartPosition::Earliest))
                .await
                .unwrap();
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while got.len() < want && Instant::now() < deadline {
                if let Ok(Some(m)) =
                    tokio::time::timeout(Duration::from_millis(500), sub.next()).await
                {
                    let m = m.unwrap();
                    assert!(
                        m.header("x-outbox-to").is_none(),
                        "the outbox's header came along"
                    );
                    got.push(String::from_utf8(m.payload().to_vec()).unwrap());
                }
            }
            got
        }
    };
    // Each record once, and each lane's in the order it published them.
    let expect = |keep: bool| -> Vec<String> {
        let mut all: Vec<String> = (0..LANES)
            .flat_map(|l| {
                (0..RECORDS / LANES)
                    .filter(move |&j| routed(j) != keep)
                    .map(move |j| format!("r{l}-{j}"))
            })
            .collect();
        all.sort();
        all
    };
    let in_lane_order = |got: &[String]| {
        for l in 0..LANES {
            let lane: Vec<usize> = got
                .iter()
                .filter_map(|id| id.strip_prefix(&format!("r{l}-")))
                .map(|j| j.parse().unwrap())
                .collect();
            assert!(lane.is_sorted(), "lane {l} out of order: {lane:?}");
        }
    };
    let audit = read("audit", expect(false).len()).await;
    in_lane_order(&audit);
    let mut sorted = audit.clone();
    sorted.sort();
    assert_eq!(sorted, expect(false));
    let orders = read("orders", expect(true).len()).await;
    in_lane_order(&orders);
    let mut sorted = orders.clone();
    sorted.sort();
    assert_eq!(sorted, expect(true));
    // Nothing more arrives: each record once, the resent ones included.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (topic, keep) in [("audit", false), ("orders", true)] {
        let info = admin.describe_topic(topic).await.unwrap();
        assert_eq!(
            info.partitions[0].end,
            expect(keep).len() as u64,
            "{topic}: {info:?} (nodes {killed:?} killed)"
        );
    }
    // Dead letters of `orders`' queue go to `audit` too, in the other
    // group, the same way (before, naming it was refused).
    admin
        .set_topic_policy("orders", serde_json::json!({ "dlq": "audit" }))
        .await
        .unwrap();
    let mut q = admin
        .subscribe_queue(QueueOptions::new("orders", "billing"))
        .await
        .unwrap();
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(20), q.next())
            .await
            .expect("no queue delivery")
            .unwrap()
            .unwrap();
        q.nack(&m, false, "bad_input", "no amount").await.unwrap();
    }
    let mut all = audit.clone();
    all.extend(orders[..3].iter().cloned());
    let got = read("audit", all.len()).await;
    assert_eq!(got, all);
    let mut sub = admin
        .subscribe(
            SubscribeOptions::new("audit").start(StartPosition::Offset(all.len() as u64 - 3)),
        )
        .await
        .unwrap();
    let letter = sub.next().await.unwrap().unwrap();
    assert_eq!(
        letter.header("x-dlq-topic").as_deref(),
        Some(&b"orders"[..])
    );
    // `queue dlq list orders` is asked of `orders`' group, which does not
    // hold them: it says where they are.
    let elsewhere = admin.dlq_list("orders", 10).await;
    assert!(
        elsewhere
            .as_ref()
            .is_err_and(|e| e.to_string().contains("subscribe audit")),
        "{elsewhere:?}"
    );
    // The origin group's leader tells what its outbox has yet to forward:
    // nothing, once its position (recorded after each forward) is written.
    let line = format!("switchyard_outbox_pending_messages{{raft_group=\"{from}\"}} 0");
    let forwarded = || async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = cluster_status(&admin).await;
            let leader = s["groups"][from as usize]["leader"].as_u64().unwrap();
            let at = cluster.nodes[leader as usize - 1].addr;
            let (_, body) =
                common::get_metrics(SocketAddr::new(at.ip(), at.port() + 1), None).await;
            if body.lines().any(|l| l == line) {
                return;
            }
            let seen: Vec<&str> = body
                .lines()
                .filter(|l| l.contains("outbox_pending"))
                .collect();
            assert!(
                Instant::now() < deadline,
                "no `{line}` on node {leader}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    forwarded().await;
    // A target deleted meanwhile loses what is routed to it (as a route to
    // a deleted topic in the group would), and the outbox goes on: made
    // again (in its group, which keeps the name), the target gets what is
    // routed after.
    admin.delete_topic("audit").await.unwrap();
    let routed_to_audit = |id: &str| {
        Record::new(id.to_string())
            .with_message_id(id.to_string())
            .with_header("route-to", "audit")
    };
    admin
        .publish("orders", routed_to_audit("lost"))
        .await
        .unwrap();
    forwarded().await;
    create_topic(&admin, "audit", 1).await;
    assert_eq!(admin.topic_group("audit").await.unwrap(), to);
    admin
        .publish("orders", routed_to_audit("after"))
        .await
        .unwrap();
    assert_eq!(read("audit", 1).await, ["after"]);
    // The outbox is the router's own: not listed, not for clients to make.
    assert_eq!(common::topic_names(&admin).await, ["audit", "orders"]);
    // An operator can look at one by its name.
    let outbox = admin
        .describe_topic(&format!("__outbox.{from}"))
        .await
        .unwrap();
    assert!(
        outbox.partitions[0].end >= expect(false).len() as u64,
        "{outbox:?}"
    );
    // Nor for clients to write: a record there is forwarded with the
    // node's rights to whatever its header names.
    let forged = Record::new("x").with_header("x-outbox-to", "audit");
    let reserved = |r: Result<(), switchyard::client::ClientError>| {
        assert!(
            r.as_ref()
                .is_err_and(|e| e.to_string().contains("reserved")),
            "{r:?}"
        );
    };
    reserved(
        admin
            .publish(&format!("__outbox.{from}"), forged)
            .await
            .map(drop),
    );
    reserved(admin.create_topic("__outbox.7", 1).await.map(drop));
}

/// Four nodes formed with three groups and the default replication
/// factor (3): group 0, the metadata, has all four; each of the others
/// three, turn by turn, so a topic is kept on three nodes. A client of a
/// node outside a topic's group is sent to the group's leader; killing
/// that leader loses no acknowledged record; and the node outside holds
/// no copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_smaller_than_the_cluster_keep_a_topic_on_its_replication_factor() {
    let mut cluster = Cluster::start_groups(4, false, 3);
    let admin = cluster.client().await;
    // Every group has a leader, as node 1 learns it (it is not a member
    // of group 2: nodes 2, 3, 4).
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = cluster_status(&admin).await;
        let led = s["groups"]
            .as_array()
            .is_some_and(|g| g.len() == 3 && g.iter().all(|g| g["leader"].is_u64()));
        if led {
            break s;
        }
        assert!(Instant::now() < deadline, "no leader in every group: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(s["replication_factor"], 3, "{s}");
    let members = |g: &serde_json::Value| -> Vec<u64> {
        let mut ids: Vec<u64> = g["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_u64().unwrap())
            .collect();
        ids.sort_unstable();
        ids
    };
    let groups = s["groups"].as_array().unwrap();
    assert_eq!(members(&groups[0]), [1, 2, 3, 4], "{s}");
    assert_eq!(members(&groups[1]), [1, 2, 3], "{s}");
    assert_eq!(members(&groups[2]), [2, 3, 4], "{s}");

    // Topics go to groups of the factor asked for: by default three
    // copies (groups 1 and 2), four only in group 0, two nowhere.
    admin.create_topic("a", 2).await.unwrap();
    admin.create_topic("b", 2).await.unwrap();
    let mut placed = vec![
        admin.topic_group("a").await.unwrap(),
        admin.topic_group("b").await.unwrap(),
    ];
    placed.sort_unstable();
    assert_eq!(placed, [1, 2]);
    admin
        .create_topic_replicated("everywhere", 1, 0, 0, Some(4))
        .await
        .unwrap();
    assert_eq!(admin.topic_group("everywhere").await.unwrap(), 0);
    let two = admin
        .create_topic_replicated("few", 1, 0, 0, Some(2))
        .await
        .unwrap_err();
    assert!(
        two.to_string()
            .contains("replication factor 2 is not available here"),
        "{two}"
    );
    let t = if admin.topic_group("a").await.unwrap() == 2 {
        "a"
    } else {
        "b"
    };
    let replicas = admin.topic_replicas(t).await.unwrap().unwrap();
    assert_eq!(members(&replicas), [2, 3, 4], "{replicas}");

    // Node 1 holds no replica of group 2: its client is sent to the
    // group's leader, and goes on when that leader is killed.
    let leader = replicas["leader"].as_u64().unwrap();
    const RECORDS: usize = 90;
    for i in 0..RECORDS {
        if i == RECORDS / 3 {
            cluster.kill(leader);
        }
        let id = format!("r{i}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let sent = admin
                .publish(t, Record::new(id.clone()).with_message_id(id.clone()))
                .await;
            match sent {
                Ok(_) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "record {i}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let info = admin.describe_topic(t).await.unwrap();
    assert_eq!(
        info.partitions.iter().map(|p| p.end).sum::<u64>(),
        RECORDS as u64,
        "each acknowledged record once"
    );
    let mut sub = admin
        .subscribe(SubscribeOptions::new(t).start(StartPosition::Earliest))
        .await
        .unwrap();
    let mut got = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < RECORDS && Instant::now() < deadline {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
            got.insert(String::from_utf8(m.unwrap().payload().to_vec()).unwrap());
        }
    }
    assert_eq!(got.len(), RECORDS);
    drop(sub);
    cluster.up(leader);

    // Replicas move while their group serves: group 1's from node 1 to
    // node 4 (named), then from node 2 to the node holding fewest (node
    // 1 again, now outside the group), each new one caught up before the
    // old one leaves.
    let other = if t == "a" { "b" } else { "a" };
    for i in 0..20 {
        let id = format!("m{i}");
        admin
            .publish(other, Record::new(id.clone()).with_message_id(id))
            .await
            .unwrap();
    }
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(router_bin());
        cmd.args(args)
            .arg("--ca")
            .arg(cluster.cert())
            .args(["--addr", &cluster_addr(&cluster.nodes[0].dir)]);
        cmd
    };
    let move_replica = |args: &[&str]| {
        let out = succeed(&mut cli(&[&["cluster", "move-replica"][..], args].concat()));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = move_replica(&["--group", "1", "--from", "1", "--to", "4"]);
    assert!(said.contains("replicas now 2, 3, 4"), "{said}");
    let said = move_replica(&["--group", "1", "--from", "2"]);
    assert!(said.contains("to node 1"), "{said}");
    assert!(said.contains("replicas now 1, 3, 4"), "{said}");
    // Group 0 has every node: nothing to move; nor is a node's replica
    // moved to one that has it.
    for refused in [
        &["--group", "0", "--from", "1"][..],
        &["--group", "1", "--from", "3", "--to", "4"],
    ] {
        let out = cli(&[&["cluster", "move-replica"][..], refused].concat())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{refused:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("replica not moved"), "{err}");
    }
    for i in 20..30 {
        let id = format!("m{i}");
        admin
            .publish(other, Record::new(id.clone()).with_message_id(id))
            .await
            .unwrap();
    }
    let ends = admin.describe_topic(other).await.unwrap();
    assert_eq!(ends.partitions.iter().map(|p| p.end).sum::<u64>(), 30);

    // Each group's replicas hold the same rows; node 1, outside group 2,
    // holds none of its.
    converged(&cluster.group_client(1).await).await;
    converged(&cluster.group_client(2).await).await;
    let last = converged(&admin).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.stop_all_but_last(last);
    let dump = |id: u64, group: u32| {
        let dir = switchyard::cluster::serve::group_dir(&cluster.nodes[id as usize - 1].dir, group);
        switchyard::cluster::state::StateMachine::open(&dir.join("switchyard.redb"))
            .unwrap()
            .dump()
            .unwrap()
    };
    let copies: Vec<_> = [2, 3, 4].into_iter().map(|id| dump(id, 2)).collect();
    assert!(copies.iter().all(|d| *d == copies[0]), "replicas differ");
    let moved: Vec<_> = [1, 3, 4].into_iter().map(|id| dump(id, 1)).collect();
    assert!(
        moved.iter().all(|d| *d == moved[0]),
        "moved replicas differ"
    );
    let outside = dump(1, 2);
    assert!(
        outside.len() * 4 < copies[0].len(),
        "node 1 holds group 2's rows: {} bytes against {}",
        outside.len(),
        copies[0].len()
    );
}

/// `cluster init --replication-factor` records the factor in every node's
/// directory, where `serve` reads it: a node started with another is
/// refused, naming the recorded one. A factor below the node count with
/// one group is refused before anything is made.
#[test]
fn cluster_init_records_the_replication_factor_for_serve() {
    let root = tempfile::tempdir().unwrap();
    let addrs = cluster_addrs(3);
    let list = joined(&addrs);
    let init = |dir: &Path, extra: &[&str]| {
        Command::new(router_bin())
            .args(["cluster", "init", "--nodes", &list, "--dir"])
            .arg(dir)
            .args(extra)
            .output()
            .unwrap()
    };
    let one_group = init(&root.path().join("one"), &["--replication-factor", "2"]);
    assert!(!one_group.status.success());
    let err = String::from_utf8_lossy(&one_group.stderr);
    assert!(err.contains("needs --groups 2 or more"), "{err}");
    assert!(!root.path().join("one").join("n1").exists());

    let dir = root.path().join("c");
    let made = init(&dir, &["--groups", "2", "--replication-factor", "2"]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    for id in 1..=3 {
        let recorded =
            std::fs::read_to_string(dir.join(format!("n{id}")).join("cluster-replication"))
                .unwrap();
        assert_eq!(recorded.trim(), "2 3");
    }
    let serve = Command::new(router_bin())
        .args(["serve", "--data"])
        .arg(dir.join("n1"))
        .args(["--listen", &addrs[0].to_string(), "--metrics", "off"])
        .args(["--node-id", "1", "--cluster", &list, "--groups", "2"])
        .args(["--replication-factor", "3"])
        .output()
        .unwrap();
    assert!(!serve.status.success());
    let err = String::from_utf8_lossy(&serve.stderr);
    assert!(err.contains("formed with replication factor 2"), "{err}");
}
