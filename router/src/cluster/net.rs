//! Raft RPCs over QUIC.
//!
//! Every node listens for Raft on one QUIC endpoint, its [`RaftHost`]
//! (mutual TLS under the cluster CA, ALPN `switchyard-raft/2`), shared by
//! every Raft group the node is a member of. A node keeps one connection
//! per peer, whatever the number of groups, and sends each RPC on a
//! stream of its own, so a large snapshot never blocks heartbeats. A
//! message is a `u32` little-endian length and a postcard encoding of an
//! [`Envelope`] (the group, then the [`Request`]) or of a [`Response`]; a
//! snapshot's file follows its request on the same stream, streamed from
//! the sender's file into the receiver's.
//!
//! Every RPC a node sends passes its [`Faults`] first: in production
//! [`NoFaults`]; tests use [`Partitions`] (or their own) to drop, delay,
//! duplicate or cut messages between chosen nodes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, Snapshot, SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};

use super::snapshot::{CHUNK, SnapshotDir, SnapshotFile};
use super::tls::{NodeTls, node_name};
use super::{NodeId, Raft, TypeConfig};

/// Largest message accepted (a batch of log entries; snapshots are
/// streamed beside their message).
const MAX_MESSAGE: usize = 1 << 30;

/// Which Raft group an RPC is for. One node is a member of several
/// groups, all behind its one [`RaftHost`].
pub type GroupId = u32;

/// What one request stream carries first: the group it is for, and the
/// request.
#[derive(Serialize, Deserialize)]
pub struct Envelope {
    /// The group.
    pub group: GroupId,
    /// The RPC.
    pub request: Request,
}

/// An [`Envelope`] as it is sent, borrowing its request (the same
/// encoding).
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    group: GroupId,
    request: &'a Request,
}

/// A Raft RPC on the wire.
#[derive(Serialize, Deserialize)]
pub enum Request {
    /// Replicate entries, or a heartbeat.
    Append(AppendEntriesRequest<TypeConfig>),
    /// Ask for a vote.
    Vote(VoteRequest<NodeId>),
    /// Install a whole snapshot, whose `len` bytes follow on the stream.
    Snapshot {
        /// The sender's vote.
        vote: Vote<NodeId>,
        /// What the snapshot covers.
        meta: SnapshotMeta<NodeId, BasicNode>,
        /// The snapshot file's length.
        len: u64,
    },
    /// Start an election now (Raft's TimeoutNow): sent by a leader that is
    /// stopping, once this node holds its whole log, so that leadership
    /// moves in one round trip instead of after an election timeout.
    TimeoutNow,
    /// Which groups the node leads (its envelope's group is not read): a
    /// node that is not a member of a group learns its leader this way,
    /// to send the group's clients there and to count leaderships.
    Led,
}

/// A group a node leads, as it answers [`Request::Led`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Led {
    /// The group.
    pub group: GroupId,
    /// The leader's term.
    pub term: u64,
    /// Its voters.
    pub voters: Vec<NodeId>,
    /// Every member (voters and learners) with its Raft address.
    pub nodes: Vec<(NodeId, String)>,
}

/// The answer to a [`Request`].
#[derive(Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::Append`].
    Append(AppendEntriesResponse<NodeId>),
    /// Answer to [`Request::Vote`].
    Vote(VoteResponse<NodeId>),
    /// Answer to [`Request::Snapshot`].
    Snapshot(SnapshotResponse<NodeId>),
    /// Answer to [`Request::TimeoutNow`]: the election has started.
    TimeoutNow,
    /// Answer to [`Request::Led`].
    Led(Vec<Led>),
    /// The receiving node could not handle it (it is shutting down).
    Failed(String),
}

/// What happens to one RPC a node is about to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Sent as usual.
    Deliver,
    /// Lost: the sender sees the peer as unreachable.
    Drop,
    /// Sent after this long.
    Delay(Duration),
    /// Sent twice; the second answer is the one used.
    Duplicate,
    /// Delivered and handled, but the answer is lost: the sender sees the
    /// peer as unreachable although the peer acted on it.
    LoseAnswer,
}

/// The seam between Raft and the network: decides the fate of each RPC.
pub trait Faults: Send + Sync + 'static {
    /// The fate of an RPC from `from` to `to`.
    fn decide(&self, from: NodeId, to: NodeId) -> Fault;
}

/// Every RPC is delivered.
pub struct NoFaults;

impl Faults for NoFaults {
    fn decide(&self, _: NodeId, _: NodeId) -> Fault {
        Fault::Deliver
    }
}

/// Network partitions for tests: cut links are dropped both ways; any
/// link may also be given a fixed fault.
#[derive(Default)]
pub struct Partitions {
    cut: Mutex<HashSet<(NodeId, NodeId)>>,
    links: Mutex<BTreeMap<(NodeId, NodeId), Fault>>,
}

impl Partitions {
    /// Cuts `node` off from every node in `others`, both ways.
    pub fn isolate(&self, node: NodeId, others: &[NodeId]) {
        let mut cut = self.cut.lock().expect("partition lock");
        for &o in others {
            cut.insert((node, o));
            cut.insert((o, node));
        }
    }

    /// Gives RPCs from `from` to `to` a fault (until [`Partitions::heal`]).
    pub fn set(&self, from: NodeId, to: NodeId, fault: Fault) {
        self.links
            .lock()
            .expect("partition lock")
            .insert((from, to), fault);
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.cut.lock().expect("partition lock").clear();
        self.links.lock().expect("partition lock").clear();
    }
}

impl Faults for Partitions {
    fn decide(&self, from: NodeId, to: NodeId) -> Fault {
        if self
            .cut
            .lock()
            .expect("partition lock")
            .contains(&(from, to))
        {
            return Fault::Drop;
        }
        self.links
            .lock()
            .expect("partition lock")
            .get(&(from, to))
            .copied()
            .unwrap_or(Fault::Deliver)
    }
}

async fn write_message<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), String> {
    write_unfinished(send, msg).await?;
    send.finish().map_err(|e| e.to_string())
}

/// Writes a message and leaves the stream open for what follows it.
async fn write_unfinished<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), String> {
    let body = postcard::to_allocvec(msg).map_err(|e| e.to_string())?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    send.write_all(&frame).await.map_err(|e| e.to_string())
}

/// Streams `file` into `send`, one chunk at a time.
async fn send_file(send: &mut quinn::SendStream, file: &SnapshotFile) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < file.len {
        let n = CHUNK.min((file.len - at) as usize);
        file.file
            .read_exact_at(&mut buf[..n], at)
            .map_err(|e| e.to_string())?;
        send.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
        at += n as u64;
    }
    Ok(())
}

/// Receives `len` bytes from `recv` into a new file in `dir`.
async fn receive_file(
    recv: &mut quinn::RecvStream,
    dir: &SnapshotDir,
    len: u64,
) -> Result<SnapshotFile, String> {
    let path = dir.fresh("received");
    let file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < len {
        let n = CHUNK.min((len - at) as usize);
        recv.read_exact(&mut buf[..n])
            .await
            .map_err(|e| e.to_string())?;
        file.write_all_at(&buf[..n], at)
            .map_err(|e| e.to_string())?;
        at += n as u64;
    }
    drop(file);
    SnapshotFile::open(&path).map_err(|e| e.to_string())
}

async fn read_message<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, String> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(format!("message of {len} bytes is over the limit"));
    }
    let mut body = vec![0; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    postcard::from_bytes(&body).map_err(|e| e.to_string())
}

/// When this node last accepted entries or a heartbeat from a leader of
/// its group: how a follower tells a leader that went silent (crashed,
/// cut off) before the group has elected another, while openraft still
/// names it leader.
#[derive(Clone)]
pub struct LeaderContact {
    start: std::time::Instant,
    /// Milliseconds after `start` (0 until a leader is heard from).
    last_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl LeaderContact {
    /// No contact yet.
    pub fn new() -> LeaderContact {
        LeaderContact {
            start: std::time::Instant::now(),
            last_ms: Arc::default(),
        }
    }

    pub(crate) fn heard(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since a leader was last heard from (since this node
    /// started, if never).
    pub fn silent_for(&self) -> Duration {
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

impl Default for LeaderContact {
    fn default() -> Self {
        Self::new()
    }
}

/// What a node answers Raft RPCs of one group with.
#[derive(Clone)]
pub(crate) struct Member {
    /// The group's Raft on this node.
    pub raft: Raft,
    /// Where snapshots received for the group are written.
    pub snapshots: Arc<SnapshotDir>,
    /// Noted on each append a leader of the group made.
    pub contact: LeaderContact,
}

/// A node's Raft endpoint, shared by every group it is a member of: the
/// groups' RPCs arrive on it and are answered by the group each names;
/// the groups' RPCs to a peer share one connection to it.
#[derive(Clone)]
pub struct RaftHost {
    inner: Arc<HostInner>,
}

struct HostInner {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    groups: Mutex<HashMap<GroupId, Member>>,
    /// Woken when a group is registered.
    registered: tokio::sync::Notify,
    /// The connection to each peer, by its Raft address (a failed one is
    /// replaced on the next RPC).
    peers: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<quinn::Connection>>>>>,
    /// When each peer last answered an RPC of any group from this node.
    answered: Mutex<HashMap<NodeId, std::time::Instant>>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl RaftHost {
    /// Binds `addr` with this node's certificate and starts answering.
    pub fn bind(addr: SocketAddr, tls: &NodeTls) -> Result<RaftHost, String> {
        let server = tls.server_config().map_err(|e| e.to_string())?;
        let client = tls.client_config().map_err(|e| e.to_string())?;
        let endpoint = crate::client::socket::endpoint(endpoint_config(tls), Some(server), addr)
            .map_err(|e| e.to_string())?;
        let host = RaftHost {
            inner: Arc::new(HostInner {
                endpoint,
                client,
                groups: Mutex::default(),
                registered: tokio::sync::Notify::new(),
                peers: Mutex::default(),
                answered: Mutex::default(),
                server: Mutex::default(),
            }),
        };
        let serving = tokio::spawn(serve(host.inner.endpoint.clone(), host.clone()));
        *host.inner.server.lock().expect("host lock") = Some(serving);
        Ok(host)
    }

    /// Whether node `node` answered an RPC from this node (of any group)
    /// within the last `within`: a leader hears from each follower at
    /// every heartbeat, so one silent for longer is probably down.
    pub fn answered_within(&self, node: NodeId, within: Duration) -> bool {
        self.inner
            .answered
            .lock()
            .expect("host lock")
            .get(&node)
            .is_some_and(|t| t.elapsed() < within)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// Connections open on the endpoint, both ways.
    pub fn open_connections(&self) -> usize {
        self.inner.endpoint.open_connections()
    }

    /// Starts answering `group`'s RPCs with `member`.
    pub(crate) fn register(&self, group: GroupId, member: Member) {
        self.groups().insert(group, member);
        self.inner.registered.notify_waiters();
    }

    /// Stops answering `group`'s RPCs: they fail as for a group the node
    /// is not a member of.
    pub(crate) fn unregister(&self, group: GroupId) {
        self.groups().remove(&group);
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, HashMap<GroupId, Member>> {
        self.inner.groups.lock().expect("host lock")
    }

    fn member(&self, group: GroupId) -> Option<Member> {
        self.groups().get(&group).cloned()
    }

    /// The group's member, waiting a moment for one that is starting: a
    /// node's endpoint answers before its groups have opened their files,
    /// and a peer told "no such group" backs off for longer than that.
    async fn member_soon(&self, group: GroupId) -> Option<Member> {
        let deadline = tokio::time::Instant::now() + GROUP_WAIT;
        loop {
            let registered = self.inner.registered.notified();
            if let Some(m) = self.member(group) {
                return Some(m);
            }
            if tokio::time::timeout_at(deadline, registered).await.is_err() {
                return None;
            }
        }
    }

    /// The groups this node leads now.
    pub fn led(&self) -> Vec<Led> {
        let rafts: Vec<(GroupId, Raft)> = self
            .groups()
            .iter()
            .map(|(g, m)| (*g, m.raft.clone()))
            .collect();
        let mut led: Vec<Led> = rafts
            .into_iter()
            .filter_map(|(group, raft)| {
                let metrics = raft.metrics();
                let m = metrics.borrow();
                (m.state == openraft::ServerState::Leader).then(|| {
                    let membership = m.membership_config.membership();
                    Led {
                        group,
                        term: m.current_term,
                        voters: membership.voter_ids().collect(),
                        nodes: membership
                            .nodes()
                            .map(|(id, n)| (*id, n.addr.clone()))
                            .collect(),
                    }
                })
            })
            .collect();
        led.sort_by_key(|l| l.group);
        led
    }

    /// RPCs of `group` from node `me`.
    pub fn network(&self, me: NodeId, group: GroupId, faults: Arc<dyn Faults>) -> Network {
        Network {
            me,
            group,
            host: self.clone(),
            faults,
        }
    }

    /// The live connection to the peer at `addr`, made if there is none
    /// (then `true`).
    /// One connection is made at a time per peer, so groups starting
    /// together share the first instead of each keeping its own. The
    /// handshake runs in a task of its own, holding the peer's slot: an
    /// RPC's deadline (a heartbeat's is 100 ms) may drop the RPC, but not
    /// the handshake, whose result the next RPC finds. On a loaded machine
    /// a handshake can take longer than a heartbeat's deadline, and one
    /// restarted by every heartbeat never completed.
    async fn connect(
        &self,
        target: NodeId,
        addr: SocketAddr,
    ) -> Result<(quinn::Connection, bool), String> {
        let slot = self
            .inner
            .peers
            .lock()
            .expect("host lock")
            .entry(addr)
            .or_default()
            .clone();
        let mut slot = slot.lock_owned().await;
        if let Some(c) = &*slot
            && c.close_reason().is_none()
        {
            return Ok((c.clone(), false));
        }
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.client.clone(), addr, &node_name(target))
            .map_err(|e| e.to_string())?;
        let dial = tokio::spawn(async move {
            let conn = tokio::time::timeout(HANDSHAKE, connecting)
                .await
                .map_err(|_| format!("no handshake with node {target} within {HANDSHAKE:?}"))?
                .map_err(|e| e.to_string())?;
            *slot = Some(conn.clone());
            Ok((conn, true))
        });
        dial.await.map_err(|e| e.to_string())?
    }

    /// Closes the endpoint: every group's RPCs stop both ways. Waits a
    /// moment for the close to go out.
    pub async fn close(&self) {
        self.inner.endpoint.close(0u32.into(), b"node stopping");
        if let Some(server) = self.inner.server.lock().expect("host lock").take() {
            server.abort();
        }
        self.groups().clear();
        self.inner.peers.lock().expect("host lock").clear();
        // The close is sent at once. Waiting for every connection to drain
        // took 2.5-3.4 s in the cluster tests on loopback, which every
        // rolling restart would wait for; a peer that misses the close
        // finds out by its idle timeout.
        let _ = tokio::time::timeout(RAFT_DRAIN, self.inner.endpoint.wait_idle()).await;
    }
}

/// How long a handshake with a peer may take before a new one is tried (a
/// peer that was down when the first began answers a new one at once,
/// where the first's retransmissions back off).
const HANDSHAKE: Duration = Duration::from_millis(500);

/// How long an RPC for a group this node has not (yet) registered waits
/// for it.
const GROUP_WAIT: Duration = Duration::from_secs(1);

/// How long a stopping node waits for its Raft connections to drain.
const RAFT_DRAIN: Duration = Duration::from_millis(300);

/// The endpoint's settings: a stateless-reset key derived from the node's
/// private key (and so is its connection-id key), so they are the same
/// after a restart. A peer still holding a
/// connection to this node's previous process then gets a reset it
/// recognizes on its first packet and closes the connection at once; with
/// a random key per process it would wait out the idle timeout (5 s),
/// sending votes nobody reads. The kill test showed that wait in every
/// third failover (3.9 s instead of 2 s): the survivors' connection to
/// each other dated from before one of them restarted.
fn endpoint_config(tls: &NodeTls) -> quinn::EndpointConfig {
    let derive = |purpose: &[u8]| {
        let mut seed = purpose.to_vec();
        seed.extend_from_slice(tls.key.secret_der());
        ring::digest::digest(&ring::digest::SHA256, &seed)
    };
    let reset = derive(b"switchyard raft stateless reset\0");
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    // Connection ids are checked against a keyed hash before a reset is
    // sent; the same key after a restart makes the new process recognize
    // the previous one's ids (else it drops their packets unanswered).
    let cids = derive(b"switchyard raft connection ids\0");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cids.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// Answers Raft RPCs arriving at `endpoint` with the group each names in
/// `host`, until the endpoint closes.
async fn serve(endpoint: quinn::Endpoint, host: RaftHost) {
    while let Some(incoming) = endpoint.accept().await {
        let host = host.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(handle(host.clone(), send, recv));
            }
        });
    }
}

async fn handle(host: RaftHost, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let Envelope { group, request } = match read_message(&mut recv).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "unreadable Raft request");
            return;
        }
    };
    if let Request::Led = request {
        let _ = write_message(&mut send, &Response::Led(host.led())).await;
        return;
    }
    let response = match host.member_soon(group).await {
        // Starting, stopping, or never a member: the sender retries.
        None => Response::Failed(format!("this node serves no Raft group {group}")),
        Some(member) => answer(member, request, &mut recv).await,
    };
    let _ = write_message(&mut send, &response).await;
}

async fn answer(member: Member, request: Request, recv: &mut quinn::RecvStream) -> Response {
    let Member {
        raft,
        snapshots,
        contact,
    } = member;
    match request {
        Request::Append(rpc) => match raft.append_entries(rpc).await {
            Err(e) => Response::Failed(e.to_string()),
            Ok(r) => {
                // Anything but a refusal of its term: a live leader.
                if !matches!(r, AppendEntriesResponse::HigherVote(_)) {
                    contact.heard();
                }
                Response::Append(r)
            }
        },
        Request::Vote(rpc) => raft
            .vote(rpc)
            .await
            .map_or_else(|e| Response::Failed(e.to_string()), Response::Vote),
        Request::TimeoutNow => {
            tracing::info!("asked by the leader to stand for election");
            raft.trigger().elect().await.map_or_else(
                |e| Response::Failed(e.to_string()),
                |()| Response::TimeoutNow,
            )
        }
        // Answered by the host before a group is looked up.
        Request::Led => Response::Led(Vec::new()),
        Request::Snapshot { vote, meta, len } => {
            match receive_file(recv, &snapshots, len).await {
                Err(e) => Response::Failed(format!("receiving a snapshot: {e}")),
                Ok(file) => {
                    let path = file.path.clone();
                    let r = raft
                        .install_full_snapshot(
                            vote,
                            Snapshot {
                                meta,
                                snapshot: Box::new(file),
                            },
                        )
                        .await
                        .map_or_else(|e| Response::Failed(e.to_string()), Response::Snapshot);
                    // Installed, it is this node's snapshot (kept under its
                    // name); refused, it is deleted.
                    if matches!(r, Response::Failed(_)) {
                        let _ = std::fs::remove_file(path);
                    }
                    r
                }
            }
        }
    }
}

/// Makes a [`PeerClient`] for each peer openraft replicates a group to.
#[derive(Clone)]
pub struct Network {
    me: NodeId,
    group: GroupId,
    host: RaftHost,
    faults: Arc<dyn Faults>,
}

impl Network {
    /// Whether node `node` answered this node lately
    /// ([`RaftHost::answered_within`]).
    pub fn answered_within(&self, node: NodeId, within: Duration) -> bool {
        self.host.answered_within(node, within)
    }

    /// A client of node `target`, whose Raft address is `addr`.
    pub fn peer(&self, target: NodeId, addr: &str) -> PeerClient {
        PeerClient {
            me: self.me,
            group: self.group,
            target,
            addr: addr.parse().ok(),
            host: self.host.clone(),
            faults: self.faults.clone(),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        self.peer(target, &node.addr)
    }
}

/// RPCs of one group from this node to one peer, on the connection every
/// group on this node shares to that peer.
pub struct PeerClient {
    me: NodeId,
    group: GroupId,
    target: NodeId,
    addr: Option<SocketAddr>,
    host: RaftHost,
    faults: Arc<dyn Faults>,
}

/// Why an RPC did not get an answer.
enum Failure {
    /// Could not reach the peer: back off.
    Unreachable(String),
    /// Reached it, but the exchange failed.
    Network(String),
}

impl PeerClient {
    /// Asks the peer to start an election at once ([`Request::TimeoutNow`]).
    pub async fn timeout_now(&mut self, ttl: Duration) -> Result<(), String> {
        let failure = match self.call(Request::TimeoutNow, None, ttl).await {
            Ok(Response::TimeoutNow) => return Ok(()),
            Ok(other) => mismatch(other),
            Err(f) => f,
        };
        match failure {
            Failure::Network(m) | Failure::Unreachable(m) => Err(m),
        }
    }

    /// Asks the peer which groups it leads ([`Request::Led`]).
    pub async fn led(&mut self, ttl: Duration) -> Result<Vec<Led>, String> {
        match self.call(Request::Led, None, ttl).await {
            Ok(Response::Led(led)) => Ok(led),
            Ok(_) => Err("unexpected answer to Led".into()),
            Err(Failure::Network(m) | Failure::Unreachable(m)) => Err(m),
        }
    }

    async fn call_once(
        &mut self,
        request: &Request,
        file: Option<&SnapshotFile>,
    ) -> Result<Response, Failure> {
        let addr = self
            .addr
            .ok_or_else(|| Failure::Unreachable(format!("node {} has no address", self.target)))?;
        let (conn, fresh) = self
            .host
            .connect(self.target, addr)
            .await
            .map_err(Failure::Unreachable)?;
        match self.exchange(&conn, request, file).await {
            // A connection made earlier that turns out dead (the peer
            // restarted and reset it): once more, on a new one.
            Err(_) if !fresh && conn.close_reason().is_some() => {
                let (conn, _) = self
                    .host
                    .connect(self.target, addr)
                    .await
                    .map_err(Failure::Unreachable)?;
                self.exchange(&conn, request, file).await
            }
            r => r,
        }
    }

    /// One request and its answer, on a stream of its own on `conn`.
    async fn exchange(
        &self,
        conn: &quinn::Connection,
        request: &Request,
        file: Option<&SnapshotFile>,
    ) -> Result<Response, Failure> {
        // A failed connection is closed, so the next RPC makes a new one.
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        let envelope = EnvelopeRef {
            group: self.group,
            request,
        };
        write_unfinished(&mut send, &envelope)
            .await
            .map_err(Failure::Network)?;
        if let Some(file) = file {
            send_file(&mut send, file).await.map_err(Failure::Network)?;
        }
        send.finish().map_err(|e| Failure::Network(e.to_string()))?;
        read_message(&mut recv).await.map_err(Failure::Network)
    }

    /// Sends `request` (and `file`, a snapshot's, after it) through the
    /// fault seam.
    async fn call(
        &mut self,
        request: Request,
        file: Option<&SnapshotFile>,
        ttl: Duration,
    ) -> Result<Response, Failure> {
        let fault = self.faults.decide(self.me, self.target);
        let run = async {
            match fault {
                Fault::Drop => {
                    return Err(Failure::Unreachable(format!(
                        "link {} -> {} is cut",
                        self.me, self.target
                    )));
                }
                Fault::Delay(d) => tokio::time::sleep(d).await,
                Fault::Duplicate => {
                    let _ = self.call_once(&request, file).await;
                }
                Fault::LoseAnswer => {
                    let _ = self.call_once(&request, file).await;
                    return Err(Failure::Unreachable(format!(
                        "the answer from {} to {} was lost",
                        self.target, self.me
                    )));
                }
                Fault::Deliver => {}
            }
            self.call_once(&request, file).await
        };
        match tokio::time::timeout(ttl, run).await {
            Ok(r) => {
                if r.is_ok() {
                    self.host
                        .inner
                        .answered
                        .lock()
                        .expect("host lock")
                        .insert(self.target, std::time::Instant::now());
                }
                r
            }
            Err(_) => Err(Failure::Unreachable(format!(
                "node {} did not answer within {ttl:?}",
                self.target
            ))),
        }
    }
}

fn rpc_error<E: std::error::Error>(f: Failure) -> RPCError<NodeId, BasicNode, E> {
    match f {
        Failure::Unreachable(m) => RPCError::Unreachable(Unreachable::new(&Message(m))),
        Failure::Network(m) => RPCError::Network(NetworkError::new(&Message(m))),
    }
}

/// An error that is just its text.
#[derive(Debug)]
struct Message(String);

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

/// An answer of the wrong kind: the peer failed, or broke the protocol.
fn mismatch(r: Response) -> Failure {
    Failure::Network(match r {
        Response::Failed(m) => format!("peer failed the request: {m}"),
        _ => "peer answered another request".to_string(),
    })
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // A heartbeat's time to live is short; a large batch on a loaded
        // machine can take longer than that without anything being wrong.
        let ttl = option.hard_ttl().max(Duration::from_secs(2));
        match self.call(Request::Append(rpc), None, ttl).await {
            Ok(Response::Append(r)) => Ok(r),
            Ok(other) => Err(rpc_error(mismatch(other))),
            Err(f) => Err(rpc_error(f)),
        }
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(RPCError::Network(NetworkError::new(&Message(
            "snapshots are sent whole (full_snapshot)".into(),
        ))))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(Request::Vote(rpc), None, option.hard_ttl()).await {
            Ok(Response::Vote(r)) => Ok(r),
            Ok(other) => Err(rpc_error(mismatch(other))),
            Err(f) => Err(rpc_error(f)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let file = *snapshot.snapshot;
        let request = Request::Snapshot {
            vote,
            meta: snapshot.meta,
            len: file.len,
        };
        // A large snapshot takes longer than an RPC: allow for it at a
        // floor of 10 MiB/s.
        let ttl = option.hard_ttl() + Duration::from_secs(file.len / (10 << 20));
        let sent = tokio::select! {
            r = self.call(request, Some(&file), ttl) => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let failure = match sent {
            Ok(Response::Snapshot(r)) => return Ok(r),
            Ok(other) => mismatch(other),
            Err(f) => f,
        };
        Err(match failure {
            Failure::Unreachable(m) => StreamingError::Unreachable(Unreachable::new(&Message(m))),
            Failure::Network(m) => StreamingError::Network(NetworkError::new(&Message(m))),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::cluster::tls::ClusterCa;

    /// A node that crashes and comes back on the same address resets the
    /// connections its previous process had, on the first packet a peer
    /// sends on one: the peer dials anew at once instead of sending into
    /// a dead connection until its idle timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_node_resets_the_connections_of_its_previous_process() {
        let ca = ClusterCa::generate().unwrap();
        let tls_a = ca.issue(1, &["127.0.0.1".into()]).unwrap();
        let tls_b = ca.issue(2, &["127.0.0.1".into()]).unwrap();
        let a = RaftHost::bind("127.0.0.1:0".parse().unwrap(), &tls_a).unwrap();
        // Node 2 runs on a runtime of its own, so that it can crash: a
        // runtime shut down drops its tasks without sending anything.
        let crashing = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let b = {
            let _in = crashing.enter();
            RaftHost::bind("127.0.0.1:0".parse().unwrap(), &tls_b).unwrap()
        };
        let b_addr = b.local_addr().unwrap();
        let (conn, fresh) = a.connect(2, b_addr).await.unwrap();
        assert!(fresh);
        drop(b);
        crashing.shutdown_background();

        // Its socket is released once the runtime's threads have dropped
        // its tasks.
        let deadline = Instant::now() + Duration::from_secs(10);
        let _b_again = loop {
            match RaftHost::bind(b_addr, &tls_b) {
                Ok(h) => break h,
                Err(e) => assert!(Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The next RPC on the old connection: its first packet is reset.
        let sent = Instant::now();
        if let Ok((mut send, _recv)) = conn.open_bi().await {
            let _ = send.write_all(b"anyone there?").await;
        }
        while conn.close_reason().is_none() {
            assert!(
                sent.elapsed() < Duration::from_secs(2),
                "the old connection is still taken for alive"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            matches!(conn.close_reason(), Some(quinn::ConnectionError::Reset)),
            "{:?}",
            conn.close_reason()
        );
        // And the next connection is a new one, to the new process.
        let (_, fresh) = a.connect(2, b_addr).await.unwrap();
        assert!(fresh);
        a.close().await;
    }
}
