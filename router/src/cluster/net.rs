//! Raft RPCs over QUIC.
//!
//! Every node listens for Raft on its own QUIC endpoint (mutual TLS under
//! the cluster CA, ALPN `switchyard-raft`). A node keeps one connection
//! per peer and sends each RPC on a stream of its own, so a large
//! snapshot never blocks heartbeats. A message is a `u32` little-endian
//! length and a postcard encoding of [`Request`] or [`Response`]; a
//! snapshot's file follows its request on the same stream, streamed from
//! the sender's file into the receiver's.
//!
//! Every RPC a node sends passes its [`Faults`] first: in production
//! [`NoFaults`]; tests use [`Partitions`] (or their own) to drop, delay,
//! duplicate or cut messages between chosen nodes.

use std::collections::{BTreeMap, HashSet};
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
use super::tls::node_name;
use super::{NodeId, Raft, TypeConfig};

/// Largest message accepted (a batch of log entries; snapshots are
/// streamed beside their message).
const MAX_MESSAGE: usize = 1 << 30;

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

/// Answers Raft RPCs arriving at `endpoint` with `raft`, until the
/// endpoint closes, noting in `contact` each append a leader made.
/// Snapshots received are written to files in `snapshots`.
pub async fn serve(
    endpoint: quinn::Endpoint,
    raft: Raft,
    snapshots: Arc<SnapshotDir>,
    contact: LeaderContact,
) {
    while let Some(incoming) = endpoint.accept().await {
        let raft = raft.clone();
        let snapshots = snapshots.clone();
        let contact = contact.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(handle(
                    raft.clone(),
                    snapshots.clone(),
                    contact.clone(),
                    send,
                    recv,
                ));
            }
        });
    }
}

async fn handle(
    raft: Raft,
    snapshots: Arc<SnapshotDir>,
    contact: LeaderContact,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let request: Request = match read_message(&mut recv).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "unreadable Raft request");
            return;
        }
    };
    let response = match request {
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
            tracing::info!("asked by the stopping leader to stand for election");
            raft.trigger().elect().await.map_or_else(
                |e| Response::Failed(e.to_string()),
                |()| Response::TimeoutNow,
            )
        }
        Request::Snapshot { vote, meta, len } => {
            match receive_file(&mut recv, &snapshots, len).await {
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
    };
    let _ = write_message(&mut send, &response).await;
}

/// Makes a [`PeerClient`] for each peer openraft replicates to.
#[derive(Clone)]
pub struct Network {
    me: NodeId,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    faults: Arc<dyn Faults>,
}

impl Network {
    /// RPCs from node `me`, sent through `endpoint` with `client` TLS.
    pub fn new(
        me: NodeId,
        endpoint: quinn::Endpoint,
        client: quinn::ClientConfig,
        faults: Arc<dyn Faults>,
    ) -> Network {
        Network {
            me,
            endpoint,
            client,
            faults,
        }
    }

    /// A client of node `target`, whose Raft address is `addr`.
    pub fn peer(&self, target: NodeId, addr: &str) -> PeerClient {
        PeerClient {
            me: self.me,
            target,
            addr: addr.parse().ok(),
            endpoint: self.endpoint.clone(),
            client: self.client.clone(),
            faults: self.faults.clone(),
            conn: None,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        self.peer(target, &node.addr)
    }
}

/// RPCs from this node to one peer.
pub struct PeerClient {
    me: NodeId,
    target: NodeId,
    addr: Option<SocketAddr>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    faults: Arc<dyn Faults>,
    conn: Option<quinn::Connection>,
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

    async fn connection(&mut self) -> Result<quinn::Connection, Failure> {
        if let Some(c) = &self.conn
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let addr = self
            .addr
            .ok_or_else(|| Failure::Unreachable(format!("node {} has no address", self.target)))?;
        let conn = self
            .endpoint
            .connect_with(self.client.clone(), addr, &node_name(self.target))
            .map_err(|e| Failure::Unreachable(e.to_string()))?
            .await
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    async fn call_once(
        &mut self,
        request: &Request,
        file: Option<&SnapshotFile>,
    ) -> Result<Response, Failure> {
        let conn = self.connection().await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| {
            self.conn = None;
            Failure::Unreachable(e.to_string())
        })?;
        write_unfinished(&mut send, request)
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
            Ok(r) => r,
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
