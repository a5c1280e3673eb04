//! Connecting, the version handshake and the control stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::{Notify, oneshot, watch};

use super::ClientError;
use super::publish::Publisher;
use switchyard_protocol::transport::FrameReader;
use switchyard_protocol::{Frame, MAX_VERSION, MIN_VERSION, TopicInfo, WireError, close};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The router's UDP address.
    pub addr: SocketAddr,
    /// Name checked against the router's certificate.
    pub server_name: String,
    /// PEM file with the certificate (or CA) to trust.
    pub ca_file: Option<PathBuf>,
    /// Certificates to trust, in addition to `ca_file`.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// Most publish records awaiting acknowledgement before `publish` waits.
    pub max_in_flight: usize,
    /// Identifies this client in the router's logs.
    pub client_name: String,
    /// A connection that hears nothing from the router for this long is
    /// declared lost (keep-alives are sent at a third of it).
    pub idle_timeout: Duration,
    /// Bearer token naming the principal to act as (sent in `Hello`).
    pub token: Option<String>,
    /// Client certificate and key (PEM files) for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Whether and how a lost connection is remade (on by default).
    pub reconnect: Reconnect,
    /// The other nodes of a cluster `addr` belongs to (client addresses).
    /// The client connects to whichever node leads, following the
    /// redirects of the others, and tries these when `addr` (or the last
    /// leader) cannot be reached. Empty for a single router. Optional: a
    /// cluster's leader tells every client its nodes in the handshake,
    /// and the client adds them (see [`ServerInfo::cluster`]).
    pub cluster: Vec<SocketAddr>,
    /// The Raft group of a cluster whose router this client talks to
    /// (named in the TLS handshake's ALPN, [`switchyard_protocol::alpn`]);
    /// 0, a single router's and a one-group cluster's, by default. Every
    /// node hands the connection to that group's router, or redirects it
    /// to the node that leads the group. A client of group 0 of a cluster
    /// of several groups routes each topic to its group itself (see
    /// [`Client`]); one of another group talks to that group only.
    pub group: u32,
}

/// The idle timeout [`ClientConfig::new`] sets: keep-alives every 5 s,
/// and a router that stopped answering is given up after 15.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// The idle timeout of a client of a cluster ([`ClientConfig::with_cluster`],
/// or a client left at [`DEFAULT_IDLE_TIMEOUT`] that finds itself connected
/// to a cluster): keep-alives every second, and a leader that stopped
/// answering is given up after three, where a single router's clients
/// wait 15.
pub const CLUSTER_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// How a client remakes a lost connection: attempts with exponential
/// backoff and jitter, from `initial_backoff` up to `max_backoff`.
#[derive(Debug, Clone)]
pub struct Reconnect {
    /// Remake lost connections. Off: after a loss every call fails with
    /// [`ClientError::ConnectionLost`].
    pub enabled: bool,
    /// Wait after the first failed attempt (the first attempt is at once);
    /// doubles after each further failure.
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// Stop after trying for this long; calls then fail with
    /// [`ClientError::ConnectionLost`]. `None`: keep trying.
    pub give_up_after: Option<Duration>,
}

impl Default for Reconnect {
    /// On; 50 ms doubling to 5 s between attempts; never give up.
    fn default() -> Self {
        Reconnect {
            enabled: true,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            give_up_after: None,
        }
    }
}

impl Reconnect {
    /// Never reconnect.
    pub fn off() -> Self {
        Reconnect {
            enabled: false,
            ..Reconnect::default()
        }
    }

    /// The wait after failed attempt number `attempt` (from 1): the
    /// doubled backoff, capped, less up to a quarter at random so that
    /// many clients of one router do not retry in step.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doubled = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = doubled.min(self.max_backoff);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        capped - capped.mul_f64(f64::from(nanos % 1000) / 4000.0)
    }
}

impl ClientConfig {
    /// Defaults for `addr`: server name `localhost`, 64 Ki records in flight.
    pub fn new(addr: SocketAddr) -> Self {
        ClientConfig {
            addr,
            server_name: "localhost".into(),
            ca_file: None,
            ca_certs: Vec::new(),
            max_in_flight: 65_536,
            client_name: format!("switchyard-rust/{}", env!("CARGO_PKG_VERSION")),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            token: None,
            client_cert: None,
            reconnect: Reconnect::default(),
            cluster: Vec::new(),
            group: 0,
        }
    }

    /// Trusts the router's certificate in data directory `dir` and acts
    /// with its admin token, as the CLI does beside a router: what an
    /// application or test on the router's machine uses.
    pub fn with_data_dir(self, dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        let cfg = self.with_ca_file(dir.join("cert.pem"));
        match std::fs::read_to_string(dir.join("admin.token")) {
            Ok(t) => cfg.with_token(t),
            Err(_) => cfg,
        }
    }

    /// Acts as the principal this bearer token names.
    pub fn with_token(mut self, token: impl AsRef<str>) -> Self {
        self.token = Some(token.as_ref().trim().to_string());
        self
    }

    /// Reads the bearer token from a file (its first line).
    pub fn with_token_file(self, path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let t = std::fs::read_to_string(path)
            .map_err(|e| ClientError::Tls(format!("token file {}: {e}", path.display())))?;
        Ok(self.with_token(t))
    }

    /// Presents this certificate (PEM chain) and key for mutual TLS.
    pub fn with_client_cert(mut self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Self {
        self.client_cert = Some((cert.as_ref().to_path_buf(), key.as_ref().to_path_buf()));
        self
    }

    /// Trust the certificate(s) in this PEM file.
    pub fn with_ca_file(mut self, path: impl AsRef<Path>) -> Self {
        self.ca_file = Some(path.as_ref().to_path_buf());
        self
    }

    /// Sets how lost connections are remade ([`Reconnect::off`] to never).
    pub fn with_reconnect(mut self, reconnect: Reconnect) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Names the other nodes of the cluster `addr` belongs to; see
    /// [`ClientConfig::cluster`]. Also shortens `idle_timeout` to
    /// [`CLUSTER_IDLE_TIMEOUT`] (set it after this call to choose
    /// another): a leader that dies without closing its connections is
    /// noticed only when the connection falls idle, and the sooner that
    /// happens the sooner the client moves to the new leader.
    pub fn with_cluster(mut self, nodes: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.cluster = nodes.into_iter().filter(|a| *a != self.addr).collect();
        self.idle_timeout = CLUSTER_IDLE_TIMEOUT;
        self
    }

    /// Sets the TLS server name.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// Talks to the router of Raft group `group` of a cluster (see
    /// [`ClientConfig::group`]).
    pub fn with_group(mut self, group: u32) -> Self {
        self.group = group;
        self
    }
}

/// What the router said about itself in the handshake.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// Negotiated protocol version.
    pub version: u8,
    /// Router identification.
    pub server: String,
    /// Largest record the router accepts.
    pub max_message_bytes: usize,
    /// Largest frame the router accepts.
    pub max_frame_bytes: usize,
    /// The client addresses of the cluster's voting nodes, if the router
    /// is one node of a cluster (empty for a single router, or a router
    /// older than protocol version 2). The client tries them when the
    /// node it is connected to is gone.
    pub cluster: Vec<SocketAddr>,
    /// How many Raft groups the cluster spreads its topics over (1 for a
    /// single router or a one-group cluster). A client of group 0 of a
    /// cluster of several sends each topic's requests to the router of
    /// the group that holds it (see [`Client`]).
    pub groups: u32,
}

/// The control requests of a connection waiting for their answers; `None`
/// once its control stream has ended (no answer can come any more).
type Waiters = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Frame>>>>>;

/// How long a connection whose control stream the router ended may take to
/// close (a stopping router drains publish streams first) before the
/// client closes it itself.
const CONTROL_ENDED_GRACE: Duration = Duration::from_secs(10);

/// One connection to the router, from a handshake to its loss. A client
/// has one at a time; after a loss it makes a new one (see [`Reconnect`]).
pub(crate) struct Link {
    pub(crate) conn: quinn::Connection,
    pub(crate) info: ServerInfo,
    control: tokio::sync::Mutex<quinn::SendStream>,
    waiters: Waiters,
    /// 1 for the first connection, then one more per reconnect.
    pub(crate) generation: u64,
}

#[derive(Clone)]
enum State {
    Up(Arc<Link>),
    /// Lost; a new connection is being made (or will be, on next use).
    Down,
    /// Lost for good: reconnecting is off, gave up, or the router refused us.
    Failed(ClientError),
}

/// What a client's calls, its publisher and its subscriptions share: the
/// current connection, and how to make the next one.
pub(crate) struct Shared {
    cfg: ClientConfig,
    endpoint: quinn::Endpoint,
    state: watch::Sender<State>,
    /// Asks for a connection after an idle close, which is not remade
    /// until something needs it.
    want: Arc<Notify>,
    closing: AtomicBool,
    next_id: AtomicU64,
    /// Where and how to connect next.
    route: Mutex<Route>,
}

/// Where the next connection goes and how it is made: the node to try
/// first (a cluster's leader, as last learned), the nodes a cluster told
/// of, and the QUIC timing to use.
pub(crate) struct Route {
    target: SocketAddr,
    /// The nodes the last cluster handshake named, beside the configured ones.
    learned: Vec<SocketAddr>,
    quic: quinn::ClientConfig,
    /// Cluster timing ([`CLUSTER_IDLE_TIMEOUT`]) to switch to on finding a
    /// cluster, for a client left at the single-router default.
    cluster_quic: Option<quinn::ClientConfig>,
    /// A node whose connection went silent, and when: probably down, so
    /// for [`SILENT_SKIP`] the client asks the others first (it still
    /// follows a redirect there: the others name it only if they hear
    /// from it).
    silent: Option<(SocketAddr, Instant)>,
    /// A handshake was given up on (a node that did not answer in time,
    /// or one that lost a race): its connection lingers in the endpoint
    /// until its own timers end it, so closing the client does not wait
    /// for the endpoint to fall idle ([`Client::close`]).
    abandoned: bool,
}

/// How long a node that went silent is passed over: about as long as the
/// others take to elect a new leader.
const SILENT_SKIP: Duration = Duration::from_secs(3);

impl Route {
    /// A route to `cfg.addr`, with `tls` as the client's TLS setup.
    fn new(cfg: &ClientConfig, tls: &Arc<QuicClientConfig>) -> Result<Route, ClientError> {
        let cluster_quic = (cfg.cluster.is_empty() && cfg.idle_timeout == DEFAULT_IDLE_TIMEOUT)
            .then(|| quic_config(tls, CLUSTER_IDLE_TIMEOUT))
            .transpose()?;
        Ok(Route {
            target: cfg.addr,
            learned: Vec::new(),
            quic: quic_config(tls, cfg.idle_timeout)?,
            cluster_quic,
            silent: None,
            abandoned: false,
        })
    }

    /// Moves on to the next node to try, passing over one that went
    /// silent a moment ago unless it is the only one.
    fn advance(&mut self, cfg: &ClientConfig) {
        let nodes = self.nodes(cfg);
        let skip = self
            .silent
            .filter(|(_, since)| since.elapsed() < SILENT_SKIP)
            .map(|(a, _)| a);
        let at = nodes.iter().position(|a| *a == self.target).unwrap_or(0);
        self.target = (1..=nodes.len())
            .map(|k| nodes[(at + k) % nodes.len()])
            .find(|a| Some(*a) != skip)
            .unwrap_or(nodes[(at + 1) % nodes.len()]);
    }

    /// The nodes in the order to try them: the target, then the others
    /// from there on, one that went silent a moment ago last.
    fn order(&self, cfg: &ClientConfig) -> Vec<SocketAddr> {
        let nodes = self.nodes(cfg);
        let mut order = vec![self.target];
        match nodes.iter().position(|a| *a == self.target) {
            Some(at) => order.extend((1..nodes.len()).map(|k| nodes[(at + k) % nodes.len()])),
            // A leader named in a redirect, not among the nodes.
            None => order.extend(nodes),
        }
        if let Some((silent, since)) = self.silent
            && since.elapsed() < SILENT_SKIP
            && let Some(i) = order.iter().position(|a| *a == silent)
        {
            let a = order.remove(i);
            order.push(a);
        }
        order
    }

    /// Every node worth trying, the configured ones first.
    fn nodes(&self, cfg: &ClientConfig) -> Vec<SocketAddr> {
        let mut nodes: Vec<SocketAddr> = std::iter::once(cfg.addr)
            .chain(cfg.cluster.iter().copied())
            .collect();
        for a in &self.learned {
            if !nodes.contains(a) {
                nodes.push(*a);
            }
        }
        nodes
    }

    /// The connection to `addr` went silent: the node is probably down,
    /// so the client asks the others first.
    fn went_silent(&mut self, cfg: &ClientConfig, addr: SocketAddr) {
        self.silent = Some((addr, Instant::now()));
        self.target = addr;
        self.advance(cfg);
    }

    /// Takes in what a handshake said of the cluster. True if the QUIC
    /// timing changed, so the connection just made should be made again.
    fn learn(&mut self, cluster: &[SocketAddr]) -> bool {
        if cluster.is_empty() {
            return false;
        }
        self.learned = cluster.to_vec();
        match self.cluster_quic.take() {
            Some(q) => {
                self.quic = q;
                true
            }
            None => false,
        }
    }
}

impl Shared {
    /// The current connection, waiting while a new one is being made.
    pub(crate) async fn link(&self) -> Result<Arc<Link>, ClientError> {
        let mut rx = self.state.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                State::Up(l) => return Ok(l),
                State::Failed(e) => return Err(e),
                State::Down => self.want.notify_one(),
            }
            if rx.changed().await.is_err() {
                return Err(ClientError::ConnectionLost("client closed".into()));
            }
        }
    }

    /// Waits until connection number `generation` is no longer the
    /// current one (lost, replaced, or the client failed).
    pub(crate) async fn link_lost(&self, generation: u64) {
        let mut rx = self.state.subscribe();
        loop {
            let current =
                matches!(&*rx.borrow_and_update(), State::Up(l) if l.generation == generation);
            if !current || rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The current connection if it is up now, without waiting.
    pub(crate) fn current(&self) -> Option<Arc<Link>> {
        match &*self.state.borrow() {
            State::Up(l) => Some(l.clone()),
            _ => None,
        }
    }

    /// Whether a lost connection is remade.
    pub(crate) fn reconnects(&self) -> bool {
        self.cfg.reconnect.enabled
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Ends the supervisor, which holds a handle to the connection.
        if let State::Up(l) = &*self.state.borrow() {
            l.conn.close(close::NORMAL.into(), b"client dropped");
        }
        self.want.notify_one();
    }
}

/// The client's TLS setup: the trusted CA certificates, the client
/// certificate if any, TLS 1.3 and the ALPN of its group.
fn client_tls(cfg: &ClientConfig) -> Result<Arc<QuicClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = &cfg.ca_file {
        let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
            .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?
            .collect();
        let certs = certs.map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
        for c in certs {
            roots
                .add(c)
                .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
        }
    }
    for c in &cfg.ca_certs {
        roots
            .add(c.clone())
            .map_err(|e| ClientError::Tls(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Tls("no trusted certificate given".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut tls = match &cfg.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let tls_err = |p: &Path, e: &dyn std::fmt::Display| {
                ClientError::Tls(format!("{}: {e}", p.display()))
            };
            let chain: Result<Vec<_>, _> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| tls_err(cert, &e))?
                .collect();
            let chain = chain.map_err(|e| tls_err(cert, &e))?;
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
                .map_err(|e| tls_err(key, &e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Tls(e.to_string()))?
        }
    };
    tls.alpn_protocols = vec![switchyard_protocol::alpn(cfg.group)];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| ClientError::Tls(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// A connection's QUIC setup: flow-control windows sized for batches in
/// flight, and keep-alives at a third of `idle_timeout`.
fn quic_config(
    tls: &Arc<QuicClientConfig>,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, ClientError> {
    let mut config = quinn::ClientConfig::new(tls.clone());
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window((8u32 << 20).into())
        .receive_window((32u32 << 20).into())
        .send_window(32 << 20)
        .keep_alive_interval(Some(idle_timeout / 3))
        .max_idle_timeout(Some(
            idle_timeout
                .try_into()
                .map_err(|_| ClientError::Tls("idle_timeout too large".into()))?,
        ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A connection to a router. Cheap to share behind an `Arc`; every method
/// takes `&self` and may be called concurrently.
///
/// # Reconnects
///
/// A lost connection is remade by the client, with backoff (see
/// [`Reconnect`]; on by default). While it is down, calls wait for it.
/// Across a reconnect:
///
/// - **Publishes** whose records all carry a message id
///   ([`Record::with_message_id`](switchyard_protocol::Record::with_message_id))
///   and were not yet acknowledged are sent again, before anything newer,
///   and the caller gets the ack of the new connection: the dedup window
///   stores each once (a resent record that had been stored comes back
///   with `duplicate: true` and the original position). A publish with a
///   record without an id that was in flight fails with
///   [`ClientError::ConnectionLost`]: it may or may not have been stored.
/// - **Stream subscriptions** subscribe again. A group member resumes from
///   the group's committed offsets (with auto-commit every record is
///   delivered at most once; with manual commits, uncommitted records come
///   again). An anonymous subscription resumes after the last record it
///   delivered in each partition.
/// - **Queue consumers** rejoin their group. Messages delivered before the
///   loss and not yet acknowledged are released by the router and
///   delivered again (attempt + 1), to this consumer or another: at least
///   once. Acking, nacking or extending such a message afterwards does
///   nothing and returns `Ok` (the new delivery is the one to settle).
/// - **Requests** (topic and plugin administration) issued while the
///   connection is down wait for it; one in flight when it is lost fails
///   with [`ClientError::ConnectionLost`] and may or may not have been
///   applied.
///
/// The router refusing the client (a revoked token, no common protocol
/// version, a protocol violation) is not retried: every call then fails
/// with the reason.
///
/// # A cluster of several groups
///
/// A cluster started with `--groups N` spreads whole topics over N Raft
/// groups, each led by its own node ([`ServerInfo::groups`]). A client
/// of group 0 (the default) asks group 0 once which group holds each
/// topic it uses, creating a topic places it in the least-loaded group,
/// and it keeps one more connection per other group it uses: publishes,
/// subscriptions, queue consumers and topic-scoped requests go to the
/// topic's group, each connection following its group's leader as
/// described above. Records published to topics of different groups
/// travel on different connections, so their relative order is not kept
/// (a topic's own order is). [`Client::list_topics`] gathers every
/// group's topics.
pub struct Client {
    pub(crate) shared: Arc<Shared>,
    info: ServerInfo,
    pub(super) publisher: Publisher,
    /// On a cluster of several groups, for a client of group 0: which
    /// group holds each topic used, and a client of each other group used.
    pub(crate) groups: Option<Groups>,
}

/// How many times a control request whose fate a leader change left
/// unknown is sent in all (see [`Client::create_topic_with`]).
const CONTROL_RETRIES: u32 = 6;

/// Whether a request failed in a way that leaves unknown whether the
/// router applied it, and that the next router to serve may not repeat:
/// the connection went, or the router stopped (a leader stepping down).
fn fate_unknown(e: &ClientError) -> bool {
    matches!(e, ClientError::ConnectionLost(_)) || e.code() == Some(crate::ErrorCode::ShuttingDown)
}

/// What a client of a cluster of several groups keeps to send each
/// topic's requests to its group's router: group 0 (the client itself)
/// assigns and looks up topics, and the client keeps one more client
/// (its own connection) per other group it uses, as a Kafka client keeps
/// one connection per broker it uses.
pub(crate) struct Groups {
    /// How many groups the cluster has.
    count: u32,
    /// The configuration of the other groups' clients (with
    /// [`ClientConfig::group`] set per group).
    cfg: ClientConfig,
    /// Topic -> group, as group 0 answered. A topic's group never changes.
    topics: Mutex<HashMap<String, u32>>,
    /// The client of each group but 0 (index g - 1), made when first
    /// needed: connecting to one group holds up no other.
    clients: Vec<tokio::sync::OnceCell<Client>>,
}

impl Client {
    /// Connects, negotiates the protocol version and opens the control
    /// stream. The first connection is not retried: an unreachable router
    /// is an error at once.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        let route = Mutex::new(Route::new(&cfg, &client_tls(&cfg)?)?);
        let bind: SocketAddr = if cfg.addr.is_ipv6() {
            "[::]:0".parse().expect("valid")
        } else {
            "0.0.0.0:0".parse().expect("valid")
        };
        let endpoint = crate::socket::endpoint(quinn::EndpointConfig::default(), None, bind)
            .map_err(|e| ClientError::Connect {
                addr: cfg.addr,
                reason: e.to_string(),
            })?;
        let link = connect_any(&cfg, &endpoint, &route, 1).await?;
        let info = link.info.clone();
        let (state, _) = watch::channel(State::Up(link.clone()));
        let max_in_flight = cfg.max_in_flight;
        let shared = Arc::new(Shared {
            cfg,
            endpoint,
            state,
            want: Arc::new(Notify::new()),
            closing: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            route,
        });
        let groups = (shared.cfg.group == 0 && info.groups > 1).then(|| {
            let mut cfg = shared.cfg.clone();
            cfg.cluster.extend(info.cluster.iter().copied());
            // Each group's client starts at the node this one reached,
            // which answers (the address configured first may be a node
            // that is down), and keeps the cluster's timing, as this one
            // switched to on finding the cluster.
            if !cfg.cluster.contains(&cfg.addr) {
                cfg.cluster.push(cfg.addr);
            }
            cfg.addr = link.conn.remote_address();
            if cfg.idle_timeout == DEFAULT_IDLE_TIMEOUT {
                cfg.idle_timeout = CLUSTER_IDLE_TIMEOUT;
            }
            Groups {
                count: info.groups,
                cfg,
                topics: Mutex::default(),
                clients: (1..info.groups).map(|_| Default::default()).collect(),
            }
        });
        tokio::spawn(supervise(Arc::downgrade(&shared), link));
        let publisher = Publisher::new(shared.clone(), info.clone(), max_in_flight);
        Ok(Client {
            shared,
            info,
            publisher,
            groups,
        })
    }

    /// The client that serves `topic`: this one, unless the cluster has
    /// several groups and another holds it (see [`Client::group_of`]).
    pub(crate) async fn at(
        &self,
        topic: &str,
        assign: Option<(u32, Option<u32>)>,
    ) -> Result<&Client, ClientError> {
        if self.groups.is_none() {
            return Ok(self);
        }
        let group = self.group_of(topic, assign).await?;
        self.in_group(group).await
    }

    /// The group holding `topic`: 0 without groups; else as group 0
    /// answered, asked the first time a topic is used. With `assign`
    /// (partitions, replicas), group 0 places a new topic of that many
    /// partitions in the least-loaded group of that many voters (by
    /// default, the cluster's replication factor).
    async fn group_of(
        &self,
        topic: &str,
        assign: Option<(u32, Option<u32>)>,
    ) -> Result<u32, ClientError> {
        let Some(groups) = &self.groups else {
            return Ok(0);
        };
        let known = groups
            .topics
            .lock()
            .expect("topics lock")
            .get(topic)
            .copied();
        if let Some(g) = known {
            return Ok(g);
        }
        let mut body = serde_json::json!({ "name": topic });
        if let Some((partitions, replicas)) = assign {
            body["assign"] = true.into();
            body["partitions"] = partitions.into();
            if let Some(r) = replicas {
                body["replicas"] = r.into();
            }
        }
        let v = self
            .admin_here("topic-group", body, bytes::Bytes::new())
            .await?;
        let g = v["group"]
            .as_u64()
            .and_then(|g| u32::try_from(g).ok())
            .filter(|g| *g < groups.count)
            .ok_or_else(|| ClientError::Protocol(format!("bad topic-group answer: {v}")))?;
        groups
            .topics
            .lock()
            .expect("topics lock")
            .insert(topic.to_string(), g);
        Ok(g)
    }

    /// The client of group `group`: this one for group 0 (or on a cluster
    /// of one group), another made when first needed.
    async fn in_group(&self, group: u32) -> Result<&Client, ClientError> {
        let Some(cell) = self
            .groups
            .as_ref()
            .and_then(|g| g.clients.get((group as usize).checked_sub(1)?))
        else {
            return Ok(self);
        };
        let cfg = self.groups.as_ref().expect("groups").cfg.clone();
        cell.get_or_try_init(|| Box::pin(Client::connect(cfg.with_group(group))))
            .await
    }

    /// The clients of every group of the cluster, group 0 (this one) first.
    async fn every_group(&self) -> Result<Vec<&Client>, ClientError> {
        let count = self.groups.as_ref().map_or(1, |g| g.count);
        let mut all = Vec::with_capacity(count as usize);
        for g in 0..count {
            all.push(self.in_group(g).await?);
        }
        Ok(all)
    }

    /// The clients of the other groups made so far.
    pub(crate) fn other_groups(&self) -> impl Iterator<Item = &Client> {
        self.groups
            .iter()
            .flat_map(|g| g.clients.iter().filter_map(|c| c.get()))
    }

    /// What the router reported in the handshake.
    pub fn server_info(&self) -> &ServerInfo {
        &self.info
    }

    /// Whether the connection is up now (false while reconnecting).
    pub fn is_connected(&self) -> bool {
        self.shared.current().is_some()
    }

    /// How many connections this client has made: 1, plus one per
    /// reconnect.
    pub fn connections(&self) -> u64 {
        match &*self.shared.state.borrow() {
            State::Up(l) => l.generation,
            _ => 0,
        }
    }

    async fn request(&self, make: impl FnOnce(u64) -> Frame) -> Result<Frame, ClientError> {
        let (link, id, rx) = self.waiting_link().await?;
        let bytes = make(id).to_bytes();
        {
            let mut send = link.control.lock().await;
            if let Err(e) = send.write_all(&bytes).await {
                if let Some(waiting) = link.waiters.lock().expect("waiters lock").as_mut() {
                    waiting.remove(&id);
                }
                // The router's own reason, when it closed the connection.
                let why = match link.conn.close_reason() {
                    Some(c) => describe_close(&c),
                    None => e.to_string(),
                };
                return Err(ClientError::ConnectionLost(why));
            }
        }
        let Ok(frame) = rx.await else {
            // The control stream ended without an answer: the connection
            // goes with it (a stopping router closes it next). Report the
            // router's reason once it has, and only then, so that a caller
            // told `ConnectionLost` finds the client no longer connected.
            self.until_lost(&link).await;
            return Err(ClientError::ConnectionLost(close_reason(&link.conn)));
        };
        match frame {
            Frame::Error { code, message, .. } => {
                Err(ClientError::Server(WireError::new(code, message)))
            }
            f => Ok(f),
        }
    }

    /// The connection to send a control request on, with the request's id
    /// registered for its answer. A router that stops ends its control
    /// streams (after answering what it was asked) before it closes the
    /// connection: a request made in between is not sent there but on the
    /// next connection, once this one is closed.
    async fn waiting_link(
        &self,
    ) -> Result<(Arc<Link>, u64, oneshot::Receiver<Frame>), ClientError> {
        let mut tries = 0;
        loop {
            let link = self.shared.link().await?;
            let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            let registered = link
                .waiters
                .lock()
                .expect("waiters lock")
                .as_mut()
                .map(|waiting| waiting.insert(id, tx))
                .is_some();
            if registered {
                return Ok((link, id, rx));
            }
            tries += 1;
            if tries > 3 {
                return Err(ClientError::ConnectionLost(close_reason(&link.conn)));
            }
            self.until_lost(&link).await;
        }
    }

    /// Waits until `link`, whose control stream has ended, is no longer
    /// the client's connection. A router that ended the control stream
    /// but keeps the connection open past [`CONTROL_ENDED_GRACE`] gets it
    /// closed: it is of no use for requests.
    async fn until_lost(&self, link: &Link) {
        let lost = self.shared.link_lost(link.generation);
        if tokio::time::timeout(CONTROL_ENDED_GRACE, lost)
            .await
            .is_err()
        {
            link.conn
                .close(close::NORMAL.into(), b"control stream ended");
            self.shared.link_lost(link.generation).await;
        }
    }

    /// Creates a topic with `partitions` partitions and no retention limit.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
    ) -> Result<TopicInfo, ClientError> {
        self.create_topic_with(name, partitions, 0, 0).await
    }

    /// Creates a topic with retention by age (ms) and by bytes per
    /// partition; 0 disables either.
    pub async fn create_topic_with(
        &self,
        name: &str,
        partitions: u32,
        retention_ms: u64,
        retention_bytes: u64,
    ) -> Result<TopicInfo, ClientError> {
        self.create_topic_replicated(name, partitions, retention_ms, retention_bytes, None)
            .await
    }

    /// Creates a topic as [`Client::create_topic_with`] does, kept on
    /// `replicas` nodes of a cluster (a group of that many voters holds
    /// it; `None`: the cluster's replication factor, see
    /// [`Client::replication_factor`]). A cluster with no group of that
    /// size refuses it, and a single router anything but 1.
    pub async fn create_topic_replicated(
        &self,
        name: &str,
        partitions: u32,
        retention_ms: u64,
        retention_bytes: u64,
        replicas: Option<u32>,
    ) -> Result<TopicInfo, ClientError> {
        // Several groups: group 0 checks the number as it places the
        // topic. One group (or none): every topic has the same copies.
        if let Some(want) = replicas.filter(|_| self.groups.is_none()) {
            let factor = self.replication_factor().await?;
            if want != factor {
                return Err(ClientError::Server(WireError::new(
                    crate::ErrorCode::InvalidArgument,
                    format!(
                        "replication factor {want} is not available here: {}",
                        if self.info.cluster.is_empty() {
                            "a single router keeps one copy of a topic (replication factor 1); \
                             run a cluster for more"
                                .to_string()
                        } else {
                            format!(
                                "this cluster has one group, whose {factor} voters hold every \
                                 topic (replication factor {factor}); a cluster of several \
                                 groups (`serve --groups`) has groups of its replication factor"
                            )
                        }
                    ),
                )));
            }
        }
        let create = || async {
            let f = self
                .at(name, Some((partitions, replicas)))
                .await?
                .request(|id| Frame::CreateTopic {
                    id,
                    name: name.to_string(),
                    partitions,
                    retention_ms,
                    retention_bytes,
                })
                .await?;
            one_topic(f)
        };
        // A leader that steps down (or a router that stops) under the
        // request leaves its fate unknown. With reconnects on, the client
        // asks again of whoever serves next, a few times; if the topic
        // then exists with the partitions asked for, the first attempt
        // (or another client asking the same) made it, and that is the
        // answer, as a topic made by this call would be.
        let reconnect = &self.shared.cfg.reconnect;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match create().await {
                Err(e) if attempt > 1 && e.code() == Some(crate::ErrorCode::TopicExists) => {
                    return match self.describe_topic(name).await {
                        Ok(info) if info.partitions.len() == partitions as usize => Ok(info),
                        _ => Err(e),
                    };
                }
                Err(e) if reconnect.enabled && attempt < CONTROL_RETRIES && fate_unknown(&e) => e,
                r => return r,
            };
            tracing::debug!(topic = name, error = %err, attempt, "create topic: asking again");
            tokio::time::sleep(reconnect.backoff(attempt)).await;
        }
    }

    /// Deletes a topic and all its records.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        match self
            .at(name, None)
            .await?
            .request(|id| Frame::DeleteTopic {
                id,
                name: name.to_string(),
            })
            .await?
        {
            Frame::Ok { .. } => Ok(()),
            f => Err(ClientError::Protocol(format!("unexpected answer {f:?}"))),
        }
    }

    /// Lists every topic with its partitions (of every group of a
    /// cluster of several, by name).
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>, ClientError> {
        let mut all = Vec::new();
        for c in self.every_group().await? {
            match c.request(|id| Frame::ListTopics { id }).await? {
                Frame::Topics { topics, .. } => all.extend(topics),
                f => return Err(ClientError::Protocol(format!("unexpected answer {f:?}"))),
            }
        }
        if self.groups.is_some() {
            all.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(all)
    }

    /// The Raft group of the cluster that holds topic `name` (0 on a
    /// single router or a cluster of one group).
    pub async fn topic_group(&self, name: &str) -> Result<u32, ClientError> {
        self.group_of(name, None).await
    }

    /// How many copies the router keeps of a topic made without asking
    /// for a number: 1 on a single router; on a cluster, the size of its
    /// groups (`serve --replication-factor`, 3 by default), or its voting
    /// nodes where every group has them all.
    pub async fn replication_factor(&self) -> Result<u32, ClientError> {
        if self.info.cluster.is_empty() {
            return Ok(1);
        }
        let status = self
            .admin_here("cluster_status", serde_json::json!({}), bytes::Bytes::new())
            .await?;
        if let Some(f) = status["replication_factor"].as_u64() {
            return Ok(f as u32);
        }
        let voters = status["nodes"]
            .as_array()
            .map_or(0, |n| n.iter().filter(|n| n["role"] != "learner").count());
        Ok(voters as u32)
    }

    /// Marks cluster node `node` drained (`drained`: it is handed no
    /// leadership, and the groups it leads move to other nodes within a
    /// second or so each) or no longer drained (it gets its share back).
    /// The mark is a row of the cluster's metadata, so it outlives a
    /// restart of the node: drain, stop, upgrade, start, undrain. Answers
    /// the cluster's status (`cluster_status`'s JSON, with `drained`).
    pub async fn drain_node(
        &self,
        node: u64,
        drained: bool,
    ) -> Result<serde_json::Value, ClientError> {
        self.admin_here(
            "cluster_drain",
            serde_json::json!({ "node": node, "drained": drained }),
            bytes::Bytes::new(),
        )
        .await
    }

    /// Group `group`'s Raft state as its leader sees it (`cluster_status`'s
    /// JSON, with each member's lag, which only the group's leader knows);
    /// group 0's on a single router or a cluster of one group.
    pub async fn group_status(&self, group: u32) -> Result<serde_json::Value, ClientError> {
        self.in_group(group)
            .await?
            .admin_here("cluster_status", serde_json::json!({}), bytes::Bytes::new())
            .await
    }

    /// Moves group `group`'s replica on node `from` to node `to` (or to
    /// the live, undrained node holding fewest replicas), while the group
    /// serves: the new node is added as a learner, made a voter once it
    /// holds the group's log, then `from` is removed, so the group keeps
    /// its replication factor throughout. Answers the group's status, with
    /// `moved_to`. Only a group smaller than the cluster has replicas to
    /// move (`serve --replication-factor`).
    pub async fn move_replica(
        &self,
        group: u32,
        from: u64,
        to: Option<u64>,
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::json!({ "from": from, "to": to });
        let c = self.in_group(group).await?;
        let ask = || c.admin_here("cluster_move_replica", body.clone(), bytes::Bytes::new());
        // Named, the new node makes asking again finish a move cut short.
        match to {
            Some(_) => again_if_moved(ask).await,
            None => ask().await,
        }
    }

    /// Where topic `name` is replicated, on a cluster: its group's
    /// Raft state as that group's leader sees it (`cluster_status`'s JSON:
    /// `group`, `leader`, `term`, `committed`, and `nodes`, each replica's
    /// role and how far its log is behind). `None` from a single router.
    pub async fn topic_replicas(
        &self,
        name: &str,
    ) -> Result<Option<serde_json::Value>, ClientError> {
        if self.info.cluster.is_empty() {
            return Ok(None);
        }
        let group = self.group_of(name, None).await?;
        self.group_status(group).await.map(Some)
    }

    /// Describes one topic: partitions with start/end offsets and bytes.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo, ClientError> {
        let f = self
            .at(name, None)
            .await?
            .request(|id| Frame::DescribeTopic {
                id,
                name: name.to_string(),
            })
            .await?;
        one_topic(f)
    }

    /// Sends a plugin administration request (`deploy`, `list`, `show`,
    /// `rollback`, `remove`, `test`) with a JSON body; returns the JSON answer.
    pub async fn plugin_request(
        &self,
        op: &str,
        body: serde_json::Value,
        wasm: bytes::Bytes,
    ) -> Result<serde_json::Value, ClientError> {
        self.admin_request(op, body, wasm).await
    }

    /// Reads a topic's delivery policy.
    pub async fn topic_policy(&self, name: &str) -> Result<serde_json::Value, ClientError> {
        self.admin_json("topic-policy", serde_json::json!({ "name": name }))
            .await
    }

    /// Changes fields of a topic's delivery policy (for example
    /// `{"max_attempts": 3}`); returns the whole new policy.
    pub async fn set_topic_policy(
        &self,
        name: &str,
        set: serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        self.admin_json(
            "topic-policy",
            serde_json::json!({ "name": name, "set": set }),
        )
        .await
    }

    /// Counters of the queue groups (of one topic, or all).
    pub async fn queue_stats(&self, topic: Option<&str>) -> Result<serde_json::Value, ClientError> {
        self.admin_json("queue-stats", serde_json::json!({ "topic": topic }))
            .await
    }

    /// The oldest `count` dead letters of `topic`.
    pub async fn dlq_list(
        &self,
        topic: &str,
        count: u64,
    ) -> Result<serde_json::Value, ClientError> {
        self.admin_json(
            "dlq-list",
            serde_json::json!({ "topic": topic, "count": count }),
        )
        .await
    }

    /// Publishes up to `max` dead letters (all if `None`) back to their
    /// original topics as new messages, then removes them from the
    /// dead-letter topic. Returns how many.
    pub async fn dlq_redrive(&self, topic: &str, max: Option<u64>) -> Result<u64, ClientError> {
        let v = self
            .admin_json(
                "dlq-redrive",
                serde_json::json!({ "topic": topic, "count": max }),
            )
            .await?;
        Ok(v["redriven"].as_u64().unwrap_or(0))
    }

    /// Deletes every dead letter of `topic`. Returns how many.
    pub async fn dlq_purge(&self, topic: &str) -> Result<u64, ClientError> {
        let v = self
            .admin_json("dlq-purge", serde_json::json!({ "topic": topic }))
            .await?;
        Ok(v["purged"].as_u64().unwrap_or(0))
    }

    /// A snapshot of the router for operators: topics with their offsets
    /// and counters, consumer lag, queue depth, dead letters, plugin
    /// health and the storage (what `switchyard status` prints), limited
    /// to the topics this principal sees.
    pub async fn status(&self) -> Result<serde_json::Value, ClientError> {
        self.admin_json("status", serde_json::json!({})).await
    }

    /// Who this connection acts as: name, grants, quotas and usage.
    pub async fn whoami(&self) -> Result<serde_json::Value, ClientError> {
        self.admin_json("whoami", serde_json::json!({})).await
    }

    /// Creates a principal with a new bearer token and these grants
    /// (`publish:orders.*`, `consume:orders.*@billing`, ...). The answer's
    /// `secret` is the token: shown this once, stored only as a hash.
    pub async fn create_token(&self, name: &str, grants: &[&str]) -> Result<String, ClientError> {
        let v = self
            .admin_json(
                "auth-token-create",
                serde_json::json!({ "name": name, "grants": grants }),
            )
            .await?;
        v["secret"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ClientError::Protocol("token answer without a secret".into()))
    }

    /// Removes a principal and its token; its open connections are closed.
    pub async fn revoke_token(&self, name: &str) -> Result<(), ClientError> {
        self.admin_json("auth-token-revoke", serde_json::json!({ "name": name }))
            .await
            .map(drop)
    }

    /// Adds grants to a principal (creating one without a token, for a
    /// client certificate, if the name is new).
    pub async fn grant(&self, name: &str, grants: &[&str]) -> Result<(), ClientError> {
        self.change_grants("auth-grant", name, grants).await
    }

    /// Removes grants from a principal; its connections are closed, so
    /// nothing keeps running on the old grants.
    pub async fn revoke_grant(&self, name: &str, grants: &[&str]) -> Result<(), ClientError> {
        self.change_grants("auth-revoke", name, grants).await
    }

    async fn change_grants(
        &self,
        op: &str,
        name: &str,
        grants: &[&str],
    ) -> Result<(), ClientError> {
        let body = serde_json::json!({ "name": name, "grants": grants });
        self.admin_json(op, body).await.map(drop)
    }

    async fn admin_json(
        &self,
        op: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        self.admin_request(op, body, bytes::Bytes::new()).await
    }

    /// Sends an administration request (plugin and queue operations, see
    /// `docs/protocol.md`) with a JSON body; returns the JSON answer.
    ///
    /// On a cluster of several groups, a request about one topic goes to
    /// the router of the group that holds it (a plugin's, to its topic's;
    /// one naming a plugin only, to the groups that have it; a deploy to
    /// a pattern such as `orders.*`, to every group, each binding the
    /// topics it holds); `list` and `status` gather every group's; the
    /// rest (`auth-*`, `cluster_*`, ...) are group 0's.
    pub async fn admin_request(
        &self,
        op: &str,
        body: serde_json::Value,
        wasm: bytes::Bytes,
    ) -> Result<serde_json::Value, ClientError> {
        if self.groups.is_none() {
            return self.admin_here(op, body, wasm).await;
        }
        let topic = match op {
            "topic-policy" | "feeds" | "dlq-list" | "dlq-redrive" | "dlq-purge" => {
                body["name"].as_str().or(body["topic"].as_str())
            }
            "queue-stats" | "deploy" | "test" => body["topic"].as_str(),
            _ => None,
        };
        match topic {
            // A binding to a pattern (`orders.*`) applies to the topics it
            // matches in every group: it is deployed to each.
            Some(t) if t.ends_with('*') && op == "deploy" => {}
            Some(t) if t.ends_with('*') => return self.admin_here(op, body, wasm).await,
            Some(t) => return self.at(t, None).await?.admin_here(op, body, wasm).await,
            None => {}
        }
        let unknown_plugin =
            |e: &ClientError| e.code() == Some(switchyard_protocol::ErrorCode::UnknownPlugin);
        match op {
            "list" => {
                let mut all = Vec::new();
                for c in self.every_group().await? {
                    match c.admin_here(op, body.clone(), wasm.clone()).await? {
                        serde_json::Value::Array(list) => all.extend(list),
                        other => return Ok(other),
                    }
                }
                Ok(serde_json::Value::Array(all))
            }
            "status" => {
                // Each group's topics, consumers and plugins; the storage
                // of group 0's leader.
                let mut merged = serde_json::Value::Null;
                for c in self.every_group().await? {
                    let v = c.admin_here(op, body.clone(), wasm.clone()).await?;
                    if merged.is_null() {
                        merged = v;
                        continue;
                    }
                    for key in ["topics", "groups", "queues", "plugins"] {
                        if let (Some(all), Some(more)) =
                            (merged[key].as_array_mut(), v[key].as_array())
                        {
                            all.extend(more.iter().cloned());
                        }
                    }
                    for key in ["connections", "streams"] {
                        let sum = merged[key].as_u64().unwrap_or(0) + v[key].as_u64().unwrap_or(0);
                        merged[key] = sum.into();
                    }
                }
                if let Some(topics) = merged["topics"].as_array_mut() {
                    topics.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
                }
                Ok(merged)
            }
            "deploy" | "rollback" | "remove" => {
                // A plugin bound to a pattern is in every group, one bound
                // to a topic in its topic's group: every group is asked.
                // Any failure but "unknown plugin" (from a group that does
                // not have it) is the answer; else the first success.
                let (mut answer, mut unknown) = (None, None);
                for c in self.every_group().await? {
                    match c.admin_here(op, body.clone(), wasm.clone()).await {
                        Ok(v) => {
                            answer.get_or_insert(v);
                        }
                        Err(e) if op != "deploy" && unknown_plugin(&e) => unknown = Some(e),
                        Err(e) => return Err(e),
                    }
                }
                answer.ok_or_else(|| unknown.expect("a cluster has a group"))
            }
            "show" | "kv-get" => {
                // The first group that knows the plugin answers.
                let mut unknown = None;
                for c in self.every_group().await? {
                    match c.admin_here(op, body.clone(), wasm.clone()).await {
                        Err(e) if unknown_plugin(&e) => unknown = Some(e),
                        r => return r,
                    }
                }
                Err(unknown.expect("a cluster has a group"))
            }
            "cluster_add_node" | "cluster_remove_node" => {
                // Membership is each group's: a node joins every group,
                // group 0 (the cluster's metadata) first, and leaves them
                // in the reverse order. The answer is group 0's status.
                // The first failure stops it; adding again finishes an
                // interrupted add (openraft re-adds a present node).
                let mut all = self.every_group().await?;
                if op == "cluster_remove_node" {
                    all.reverse();
                }
                let mut zero = None;
                for c in all {
                    let v = again_if_moved(|| c.admin_here(op, body.clone(), wasm.clone())).await?;
                    if std::ptr::eq(c, self) {
                        zero = Some(v);
                    }
                }
                Ok(zero.expect("group 0 is one of every group"))
            }
            _ => self.admin_here(op, body, wasm).await,
        }
    }

    /// Sends an administration request to this client's own router.
    async fn admin_here(
        &self,
        op: &str,
        body: serde_json::Value,
        wasm: bytes::Bytes,
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::to_vec(&body).expect("json serializes");
        match self
            .request(|id| Frame::AdminRequest {
                id,
                op: op.to_string(),
                body: body.into(),
                wasm,
            })
            .await?
        {
            Frame::AdminResponse { body, .. } => serde_json::from_slice(&body)
                .map_err(|e| ClientError::Protocol(format!("bad admin response: {e}"))),
            f => Err(ClientError::Protocol(format!("unexpected answer {f:?}"))),
        }
    }

    /// Deploys a plugin version; `opts` is the JSON deploy request (name,
    /// hook, topic, group, config, on_failure, deadline_ms, memory_mb).
    pub async fn deploy_plugin(
        &self,
        wasm: impl Into<bytes::Bytes>,
        opts: serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        self.plugin_request("deploy", opts, wasm.into()).await
    }

    /// Waits for every publish to be acknowledged, then closes the
    /// connection and waits for the close to reach the router.
    pub async fn close(&self) {
        for other in self.other_groups() {
            Box::pin(other.close()).await;
        }
        self.publisher.flush().await;
        self.shared.closing.store(true, Ordering::Relaxed);
        if let Some(link) = self.shared.current() {
            link.conn.close(close::NORMAL.into(), b"client closed");
        }
        self.shared
            .state
            .send_replace(State::Failed(ClientError::ConnectionLost(
                "client closed".into(),
            )));
        self.shared.want.notify_one();
        // Waits for the close to reach the router (the endpoint falls idle
        // once it has); a handshake given up on lingers in the endpoint
        // for seconds, so then only briefly (the close is sent at once).
        let abandoned = self.shared.route.lock().expect("route lock").abandoned;
        let grace = if abandoned {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(2)
        };
        let _ = tokio::time::timeout(grace, self.shared.endpoint.wait_idle()).await;
    }
}

/// The reason a connection ended, or a generic one while it is open.
pub(crate) fn close_reason(conn: &quinn::Connection) -> String {
    conn.close_reason()
        .map(|e| describe_close(&e))
        .unwrap_or_else(|| "control stream closed".into())
}

/// True if the router ended the connection in a way a new one would not
/// change: retrying would only repeat the refusal.
fn refused(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => [
            close::PROTOCOL_VIOLATION,
            close::UNSUPPORTED_VERSION,
            close::UNAUTHENTICATED,
        ]
        .iter()
        .any(|&code| c.error_code == code.into()),
        quinn::ConnectionError::LocallyClosed | quinn::ConnectionError::VersionMismatch => true,
        _ => false,
    }
}

/// True if a failed (re)connect attempt is worth repeating.
fn retryable(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Connect { .. } | ClientError::ConnectionLost(_)
    )
}

/// Why a handshake did not make a link.
enum Handshake {
    /// A cluster node that does not lead; the leader's address if known.
    NotLeader(Option<SocketAddr>),
    /// Anything else.
    Failed(ClientError),
}

impl From<ClientError> for Handshake {
    fn from(e: ClientError) -> Self {
        Handshake::Failed(e)
    }
}

/// How long a cluster node is given to answer before the next is tried
/// beside it. A loopback or LAN handshake takes a few milliseconds, so a
/// node silent this long is probably down; if it answers after all, the
/// first answer wins either way. Without it, every connection made while
/// a node is down (each command of the CLI, each group's) waited out that
/// node's whole handshake limit first.
const HEAD_START: Duration = Duration::from_millis(200);

/// Connects to the router, or to a cluster's leader: follows redirects
/// from nodes that do not lead, waits out an election (up to 15 s), and
/// tries the other nodes (configured, or named by the cluster in an
/// earlier handshake) when one does not answer: each after the one before
/// had [`HEAD_START`] to answer, all racing, the first answer winning.
async fn connect_any(
    cfg: &ClientConfig,
    endpoint: &quinn::Endpoint,
    route: &Mutex<Route>,
    generation: u64,
) -> Result<Arc<Link>, ClientError> {
    use futures::StreamExt as _;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (order, quic) = {
            let r = route.lock().expect("route lock");
            (r.order(cfg), r.quic.clone())
        };
        let many = order.len() > 1;
        let attempt = |addr: SocketAddr| {
            let quic = quic.clone();
            async move {
                let r = handshake(cfg, addr, endpoint, &quic, generation, many).await;
                (addr, r)
            }
        };
        let mut racing = futures::stream::FuturesUnordered::new();
        racing.push(attempt(order[0]));
        let (mut started, mut electing) = (1, false);
        let mut unreachable: Option<ClientError> = None;
        // What the round came to: a connection, a leader to follow, or
        // no node that could serve.
        let follow = loop {
            let head_start = tokio::time::sleep(HEAD_START);
            tokio::select! {
                Some((addr, r)) = racing.next() => match r {
                    Ok(link) => {
                        let mut r = route.lock().expect("route lock");
                        r.target = addr;
                        r.abandoned |= !racing.is_empty() || unreachable.is_some();
                        if !r.learn(&link.info.cluster) {
                            return Ok(link);
                        }
                        // Found a cluster with single-router timing: the
                        // next connection uses the cluster's, so that a
                        // leader that dies is noticed in seconds. Once
                        // per client.
                        tracing::debug!(%addr, nodes = ?link.info.cluster, "connected to a cluster; reconnecting with cluster timing");
                        link.conn
                            .close(close::NORMAL.into(), b"reconnecting with cluster timing");
                        break None;
                    }
                    Err(Handshake::NotLeader(Some(leader))) if leader != addr => {
                        tracing::debug!(%addr, %leader, "not the leader; following");
                        break Some(leader);
                    }
                    // Between leaders: this node knows none yet.
                    Err(Handshake::NotLeader(_)) => electing = true,
                    Err(Handshake::Failed(e @ ClientError::Connect { .. })) if many => {
                        route.lock().expect("route lock").abandoned = true;
                        unreachable = Some(e);
                    }
                    Err(Handshake::Failed(e)) => return Err(e),
                },
                () = head_start, if started < order.len() => {}
                else => {}
            }
            // The next node starts once the last had its head start, or
            // at once when an answer came without a connection.
            if started < order.len() {
                racing.push(attempt(order[started]));
                started += 1;
            } else if racing.is_empty() {
                // Every node answered or failed to; none serves.
                if !electing {
                    return Err(unreachable.unwrap_or_else(|| {
                        ClientError::ConnectionLost(format!("no node of {order:?} serves"))
                    }));
                }
                if Instant::now() >= deadline {
                    return Err(ClientError::ConnectionLost(format!(
                        "no cluster leader among {order:?} within 15 s"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                route.lock().expect("route lock").advance(cfg);
                break None;
            }
        };
        if !racing.is_empty() {
            // Handshakes still under way when a redirect came.
            route.lock().expect("route lock").abandoned = true;
        }
        drop(racing);
        if let Some(leader) = follow {
            if Instant::now() >= deadline {
                return Err(ClientError::ConnectionLost(format!(
                    "no cluster leader among {order:?} within 15 s: redirected to {leader} again and again"
                )));
            }
            route.lock().expect("route lock").target = leader;
        }
    }
}

/// Connects and shakes hands: one [`Link`]. `many` says whether other
/// nodes may be tried if this one does not answer.
async fn handshake(
    cfg: &ClientConfig,
    addr: SocketAddr,
    endpoint: &quinn::Endpoint,
    crypto: &quinn::ClientConfig,
    generation: u64,
    many: bool,
) -> Result<Arc<Link>, Handshake> {
    let connect_err = |reason: String| ClientError::Connect { addr, reason };
    // A cluster node that is down does not answer at all: give up on it
    // sooner and try the others (a loopback or LAN handshake takes a few
    // milliseconds; this is its time to answer at all).
    let limit = if many {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    };
    let connecting = endpoint
        .connect_with(crypto.clone(), addr, &cfg.server_name)
        .map_err(|e| connect_err(e.to_string()))?;
    let conn = match tokio::time::timeout(limit, connecting).await {
        Err(_) => return Err(connect_err(format!("timed out after {limit:?}")).into()),
        Ok(Err(e)) => {
            return Err(not_leader(&e).unwrap_or_else(|| connect_err(e.to_string()).into()));
        }
        Ok(Ok(c)) => c,
    };

    let (mut send, recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(_) => return Err(ended(&conn).await),
    };
    let hello = Frame::Hello {
        min_version: MIN_VERSION,
        max_version: MAX_VERSION,
        client: cfg.client_name.clone(),
        token: cfg.token.clone(),
    };
    if send.write_all(&hello.to_bytes()).await.is_err() {
        return Err(ended(&conn).await);
    }
    // Frames from the router are bounded by our own generous limit.
    let mut reader = FrameReader::new(recv, 64 << 20);
    let info = match reader.next().await {
        Ok(Some(Frame::HelloOk {
            version,
            server,
            max_message_bytes,
            max_frame_bytes,
            cluster,
            groups,
        })) => ServerInfo {
            version,
            server,
            max_message_bytes: max_message_bytes as usize,
            max_frame_bytes: max_frame_bytes as usize,
            cluster,
            groups,
        },
        Ok(Some(Frame::Error { code, message, .. })) => {
            return Err(ClientError::Server(WireError::new(code, message)).into());
        }
        Ok(Some(other)) => {
            return Err(ClientError::Protocol(format!("expected HelloOk, got {other:?}")).into());
        }
        Ok(None) | Err(_) => return Err(ended(&conn).await),
    };
    let waiters: Waiters = Arc::new(Mutex::new(Some(HashMap::new())));
    tokio::spawn(control_reader(reader, waiters.clone()));
    Ok(Arc::new(Link {
        conn,
        info,
        control: tokio::sync::Mutex::new(send),
        waiters,
        generation,
    }))
}

/// Why a connection ended during the handshake. Waits briefly for the
/// close frame so that its reason can be shown (or followed).
async fn ended(conn: &quinn::Connection) -> Handshake {
    let Ok(e) = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await else {
        return ClientError::ConnectionLost("closed during handshake".into()).into();
    };
    if let Some(h) = not_leader(&e) {
        return h;
    }
    if refused(&e) {
        ClientError::Refused(describe_close(&e)).into()
    } else {
        ClientError::ConnectionLost(describe_close(&e)).into()
    }
}

/// A `NOT_LEADER` close, if `e` is one: its reason is the leader's
/// address, if known.
fn not_leader(e: &quinn::ConnectionError) -> Option<Handshake> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == close::NOT_LEADER.into() =>
        {
            Some(Handshake::NotLeader(
                std::str::from_utf8(&c.reason)
                    .ok()
                    .and_then(|r| r.parse().ok()),
            ))
        }
        _ => None,
    }
}

/// Watches the connection; when it is lost, makes a new one with backoff
/// (or marks the client failed). Holds the client weakly: it ends when the
/// client and everything made from it are gone.
async fn supervise(weak: Weak<Shared>, mut link: Arc<Link>) {
    loop {
        let lost = link.conn.closed().await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.closing.load(Ordering::Relaxed) {
            return;
        }
        let reason = describe_close(&lost);
        if refused(&lost) || !shared.cfg.reconnect.enabled {
            let e = if refused(&lost) {
                ClientError::Refused(reason)
            } else {
                ClientError::ConnectionLost(reason)
            };
            shared.state.send_replace(State::Failed(e));
            return;
        }
        shared.state.send_replace(State::Down);
        let idle = matches!(&lost, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == close::IDLE.into());
        if idle {
            // Closed for idleness: connect again when something needs it.
            tracing::debug!(addr = %shared.cfg.addr, "router closed an idle connection");
            let want = shared.want.clone();
            let notified = want.notified();
            drop(shared);
            notified.await;
        } else {
            tracing::warn!(addr = %shared.cfg.addr, %reason, "connection lost; reconnecting");
            if matches!(lost, quinn::ConnectionError::TimedOut) {
                shared
                    .route
                    .lock()
                    .expect("route lock")
                    .went_silent(&shared.cfg, link.conn.remote_address());
            }
            drop(shared);
        }
        let generation = link.generation + 1;
        let started = Instant::now();
        let mut attempts = 0u32;
        link = loop {
            let Some(shared) = weak.upgrade() else { return };
            if shared.closing.load(Ordering::Relaxed) {
                return;
            }
            attempts += 1;
            let rc = &shared.cfg.reconnect;
            let e =
                match connect_any(&shared.cfg, &shared.endpoint, &shared.route, generation).await {
                    Ok(l) => break l,
                    Err(e) => e,
                };
            let gave_up = rc.give_up_after.is_some_and(|d| started.elapsed() >= d);
            if !retryable(&e) || gave_up {
                let e = if gave_up {
                    ClientError::ConnectionLost(format!(
                        "gave up reconnecting to {} after {attempts} attempts in {:.1?}: {e}",
                        shared.cfg.addr,
                        started.elapsed()
                    ))
                } else {
                    e
                };
                tracing::warn!(addr = %shared.cfg.addr, error = %e, "not reconnecting");
                shared.state.send_replace(State::Failed(e));
                return;
            }
            let wait = rc.backoff(attempts);
            tracing::debug!(addr = %shared.cfg.addr, error = %e, ?wait, "reconnect attempt failed");
            drop(shared);
            tokio::time::sleep(wait).await;
        };
        let Some(shared) = weak.upgrade() else { return };
        tracing::info!(
            addr = %shared.cfg.addr,
            attempts,
            elapsed = ?started.elapsed(),
            "reconnected"
        );
        shared.state.send_replace(State::Up(link.clone()));
    }
}

/// A connection error as a user should read it: the router's own reason
/// when it closed the connection on purpose.
pub(super) fn describe_close(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => format!(
            "router closed the connection (code {}): {}",
            c.error_code,
            String::from_utf8_lossy(&c.reason)
        ),
        other => other.to_string(),
    }
}

fn one_topic(f: Frame) -> Result<TopicInfo, ClientError> {
    match f {
        Frame::Topics { mut topics, .. } if topics.len() == 1 => Ok(topics.remove(0)),
        f => Err(ClientError::Protocol(format!("unexpected answer {f:?}"))),
    }
}

async fn control_reader(mut reader: FrameReader<quinn::RecvStream>, waiters: Waiters) {
    loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            _ => break,
        };
        let id = match &frame {
            Frame::Ok { id }
            | Frame::Topics { id, .. }
            | Frame::Error { id, .. }
            | Frame::AdminResponse { id, .. } => *id,
            _ => continue,
        };
        let tx = waiters
            .lock()
            .expect("waiters lock")
            .as_mut()
            .and_then(|w| w.remove(&id));
        if let Some(tx) = tx {
            let _ = tx.send(frame);
        }
    }
    // Dropping the senders fails every waiting request; later ones go to
    // the next connection.
    waiters.lock().expect("waiters lock").take();
}

/// How long a change of a cluster's members is asked again while its
/// group's leadership moves under it.
const MEMBERSHIP_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `ask` again while its answer says the group's leadership moved
/// during it (`ShuttingDown`, or the connection lost as its router
/// stopped), for up to [`MEMBERSHIP_RETRY`]: the client follows the new
/// leader, which finishes the change (adding or removing a node, and
/// moving a named replica, are the same asked twice).
async fn again_if_moved<F, Fut>(ask: F) -> Result<serde_json::Value, ClientError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<serde_json::Value, ClientError>>,
{
    let deadline = tokio::time::Instant::now() + MEMBERSHIP_RETRY;
    loop {
        match ask().await {
            Err(e)
                if (e.code() == Some(crate::ErrorCode::ShuttingDown)
                    || matches!(e, ClientError::ConnectionLost(_)))
                    && tokio::time::Instant::now() < deadline =>
            {
                tracing::info!(error = %e, "the group's leadership moved during the change; asking again");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(cfg: &ClientConfig) -> Route {
        Route {
            target: cfg.addr,
            learned: Vec::new(),
            quic: {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                let quic = Arc::new(QuicClientConfig::try_from(tls).unwrap());
                quic_config(&quic, DEFAULT_IDLE_TIMEOUT).unwrap()
            },
            cluster_quic: None,
            silent: None,
            abandoned: false,
        }
    }

    #[test]
    fn a_node_gone_silent_is_passed_over_for_a_while() {
        let a: Vec<SocketAddr> = (0..3)
            .map(|i| format!("127.0.0.1:{}", 7400 + i).parse().unwrap())
            .collect();
        let cfg = ClientConfig::new(a[0]).with_cluster(a.clone());
        let mut r = route(&cfg);
        r.went_silent(&cfg, a[0]);
        assert_eq!(r.target, a[1]);
        r.advance(&cfg);
        assert_eq!(r.target, a[2]);
        // Round again, past the silent node.
        r.advance(&cfg);
        assert_eq!(r.target, a[1]);
        // A while later it is tried again in turn.
        r.silent = Some((a[0], Instant::now() - SILENT_SKIP));
        r.advance(&cfg);
        assert_eq!(r.target, a[2]);
        r.advance(&cfg);
        assert_eq!(r.target, a[0]);
    }

    /// Every node is raced in turn, from the target on; one gone silent
    /// a moment ago last, and a leader named by a redirect first.
    #[test]
    fn nodes_are_tried_from_the_target_on_a_silent_one_last() {
        let a: Vec<SocketAddr> = (0..4)
            .map(|i| format!("127.0.0.1:{}", 7400 + i).parse().unwrap())
            .collect();
        let cfg = ClientConfig::new(a[0]).with_cluster(a[..3].to_vec());
        let mut r = route(&cfg);
        assert_eq!(r.order(&cfg), [a[0], a[1], a[2]]);
        r.target = a[1];
        assert_eq!(r.order(&cfg), [a[1], a[2], a[0]]);
        r.silent = Some((a[2], Instant::now()));
        assert_eq!(r.order(&cfg), [a[1], a[0], a[2]]);
        r.silent = None;
        r.target = a[3];
        assert_eq!(r.order(&cfg), [a[3], a[0], a[1], a[2]]);
    }

    #[test]
    fn a_lone_node_gone_silent_is_still_tried() {
        let a: SocketAddr = "127.0.0.1:7400".parse().unwrap();
        let cfg = ClientConfig::new(a);
        let mut r = route(&cfg);
        r.went_silent(&cfg, a);
        assert_eq!(r.target, a);
    }
}
