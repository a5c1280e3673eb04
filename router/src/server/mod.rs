//! The QUIC endpoint: TLS, admission, one task per connection and one per
//! stream.
//!
//! The binary only parses configuration and calls [`run`]; tests call
//! [`Router::start`] with port 0 and talk to the returned address.

pub(crate) mod admission;
mod arriving;
mod auth_admin;
mod connection;
mod console;
mod control;
pub(crate) mod metrics;
pub mod outbox;
pub mod placement;
mod plugin_admin;
mod plugin_test;
mod publish;
mod queue_admin;
mod session;
mod status;
mod subscribe;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::auth::{Auth, AuthConfig, AuthError};
use crate::broker::{Broker, BrokerConfig};
use crate::plugins::PluginRegistry;
use crate::protocol::close;
use crate::storage::{Storage, StorageConfig, StorageError};
pub use arriving::NodeClients;
use arriving::{Arriving, Source};
use tls::{CertPaths, TlsError};

/// Everything the router can be configured with. Every field has a default;
/// a TOML file (`--config`) may set any of them by name.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Data directory: the database, the certificate and its key.
    pub data: PathBuf,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Certificate to serve (PEM); default `<data>/cert.pem`, generated if missing.
    pub cert: Option<PathBuf>,
    /// Private key (PEM); default `<data>/key.pem`.
    pub key: Option<PathBuf>,
    /// Most concurrent client connections.
    pub max_connections: usize,
    /// Most concurrent streams (publish + subscribe) per connection.
    pub max_streams_per_connection: u32,
    /// Largest record accepted, in bytes.
    pub max_message_bytes: usize,
    /// Largest frame accepted, in bytes (a publish batch is one frame).
    pub max_frame_bytes: usize,
    /// Most partitions per topic.
    pub max_partitions: u32,
    /// Most records in one group commit.
    pub commit_max_batch_records: usize,
    /// Most record bytes in one group commit.
    pub commit_max_batch_bytes: usize,
    /// Extra time the writer waits to grow a batch, in microseconds (0: none).
    pub commit_linger_us: u64,
    /// How long the writer polls for the next request after a commit before
    /// parking, in microseconds (0: park at once; lower latency and higher
    /// throughput for a little CPU while busy).
    pub commit_spin_us: u64,
    /// Size of the write-ahead journal small commits are made durable in,
    /// in bytes (0: none; every commit is a durable database commit).
    pub journal_bytes: u64,
    /// Longest time between durable database commits while the journal is
    /// in use, in milliseconds; bounds the replay after a crash.
    pub journal_checkpoint_ms: u64,
    /// Free space, in MiB, the data directory's file system keeps: below
    /// it publishes are refused with `storage_full` until space is freed.
    pub storage_reserve_mb: u64,
    /// How often retention runs, in milliseconds.
    pub retention_check_ms: u64,
    /// redb page cache, in bytes. The hot tail of every partition should fit.
    pub cache_bytes: usize,
    /// Close connections idle (no keep-alive) this long, in milliseconds.
    pub idle_timeout_ms: u64,
    /// Close connections with no stream open and no request for this long,
    /// in milliseconds, even if they send keep-alives (Kafka's
    /// `connections.max.idle.ms`).
    pub connection_max_idle_ms: u64,
    /// Most connections from one client address.
    pub max_connections_per_address: usize,
    /// Most connections from one client address still in their handshake.
    pub max_handshakes_per_address: usize,
    /// Bytes of partially received frames one connection may hold, over
    /// all its streams (a frame counts its announced length).
    pub max_connection_partial_bytes: usize,
    /// The same, over all connections.
    pub max_partial_bytes_total: usize,
    /// A frame must arrive whole within this many ms of its first byte.
    pub frame_timeout_ms: u64,
    /// Longest per-call deadline a plugin deploy may ask for, in ms.
    pub max_plugin_deadline_ms: u64,
    /// Largest memory cap a plugin deploy may ask for, in MiB.
    pub max_plugin_memory_mb: u64,
    /// Largest sum of the memory caps of all live plugins, in MiB.
    pub max_plugin_memory_total_mb: u64,
    /// Longest dedup window a topic may be given, in ms.
    pub max_dedup_window_ms: u64,
    /// Largest queue look-ahead window a topic may be given, in messages.
    pub max_queue_window: u32,
    /// Address of the Prometheus endpoint (`GET /metrics`, plain HTTP;
    /// `None`: none). Beyond loopback it answers only a bearer token of a
    /// principal with `cluster-admin`. `switchyard serve` defaults it to
    /// 127.0.0.1 and the port after `listen`'s.
    pub metrics: Option<SocketAddr>,
    /// Address of the web console (plain HTTP; `None`: none). Sign-in
    /// takes a bearer token; every page and action is checked against
    /// that principal's grants.
    pub console: Option<SocketAddr>,
    /// Principals, credentials and quotas (`[auth]`; see docs/security.md).
    pub auth: AuthConfig,
    /// Run as one node of a replicated cluster (`[cluster]`; see
    /// docs/cluster.md). `serve --node-id`, `--cluster` and `--join`
    /// override it.
    pub cluster: ClusterSection,
    /// Serve over a cluster node's replicated tables instead of opening
    /// the data directory's own (set by the cluster, never in a file).
    #[serde(skip)]
    pub replica: Option<Replica>,
}

/// The `[cluster]` section of the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's id (1 for the first address of `nodes`); none: a
    /// router alone.
    pub node_id: Option<u64>,
    /// Every node's client address, in node id order.
    pub nodes: Vec<SocketAddr>,
    /// Join a running cluster instead of forming one.
    pub join: bool,
    /// How many Raft groups the cluster spreads its topics over (0 or 1:
    /// one). The same on every node, and fixed when the cluster is first
    /// started (docs/cluster.md, *Topics over several groups*).
    pub groups: u32,
    /// How many copies of each topic (the voters of each group but group
    /// 0); none: 3. Fixed when the cluster is first started.
    pub replication_factor: Option<u32>,
}

/// The replicated tables a cluster's leader serves from, and what
/// replicates its commits.
#[derive(Clone)]
pub struct Replica {
    /// The group's state machine database.
    pub db: Arc<redb::Database>,
    /// Its file (`switchyard.redb` in the group's directory).
    pub db_path: PathBuf,
    /// Replicates each commit before it is made.
    pub replicator: Arc<dyn crate::storage::Replicator>,
    /// The cluster's administration (`cluster_status`, adding and
    /// removing nodes).
    pub control: Arc<dyn ClusterControl>,
    /// The connections the node hands this router. The node binds its
    /// client endpoint once for its life and serves every group's router
    /// on it: it hands a connection to the router of the group its
    /// handshake names while the node leads that group, and redirects it
    /// to the group's leader otherwise, so the address is never released
    /// between leaderships (rebinding waited for the old socket's
    /// connections to drain).
    pub clients: NodeClients,
    /// On a cluster of several groups: this router's group, and the
    /// node's replica of group 0, which holds the cluster's principals
    /// (followed by the other groups' routers) and the topic assignment
    /// (see [`placement`]). None on a one-group cluster.
    pub placement: Option<placement::Placement>,
    /// On a cluster of several groups: how this router's outbox forwarder
    /// reaches the cluster (the node's address, CA and admin token), to
    /// forward records routed to other groups' topics ([`outbox`]).
    pub outbox: Option<crate::client::ClientConfig>,
}

/// What the admin protocol asks of a cluster node that serves as leader.
pub trait ClusterControl: Send + Sync {
    /// The cluster as this node sees it, as JSON.
    fn status(&self) -> serde_json::Value;
    /// The client addresses of the voting nodes, told to each client in
    /// `HelloOk` so it can find the next leader when this one is gone.
    fn nodes(&self) -> Vec<SocketAddr>;
    /// Adds node `id` listening for clients on `addr` (its Raft port is 5
    /// above): learner first, voter once it has caught up.
    fn add_node(
        &self,
        id: u64,
        addr: SocketAddr,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), ControlError>> + Send + '_>>;
    /// Removes node `id` from the voters and the group (a group of its
    /// own size first moves its replica there to another node).
    fn remove_node(
        &self,
        id: u64,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), ControlError>> + Send + '_>>;
    /// Moves this group's replica on node `from` to node `to` (or to the
    /// live, undrained node holding fewest replicas): `to` is added as a
    /// learner, made a voter once it holds the log, then `from` is
    /// removed. Returns the node that took it. Only a group of its own
    /// size has replicas to move (group 0 has every node).
    fn move_replica(
        &self,
        from: u64,
        to: Option<u64>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<u64, ControlError>> + Send + '_>>;
    /// Hands leadership to another voter (`to`, or the first to catch up)
    /// while the cluster serves, before maintenance of this node; returns
    /// the new leader. New commits wait while it runs (about one round
    /// trip once a follower holds the whole log).
    fn step_down(
        &self,
        to: Option<u64>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<u64, ControlError>> + Send + '_>>;
}

/// Why a change to a cluster (a step-down, a node added or removed, a
/// replica moved) did not happen, or not all of it.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request cannot be met as asked (no such voter, no other one).
    #[error("{0}")]
    Invalid(String),
    /// No voter was ready to take over in time (the leader goes on
    /// leading), or a new replica did not catch up.
    #[error("{0}")]
    NotNow(String),
    /// This node stopped leading the group while the change ran (an
    /// election, a node lost): the change may be half done, and asking
    /// the group's new leader again finishes it.
    #[error("{0}")]
    Moved(String),
}

impl ControlError {
    /// The wire code: a moved leadership is `ShuttingDown` (ask again of
    /// the next leader), which clients retry.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        use crate::protocol::ErrorCode;
        match self {
            ControlError::Invalid(_) => ErrorCode::InvalidArgument,
            ControlError::NotNow(_) => ErrorCode::Internal,
            ControlError::Moved(_) => ErrorCode::ShuttingDown,
        }
    }
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Replica")
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        let storage = StorageConfig::default();
        let plugin_ceilings = crate::plugins::Ceilings::default();
        let broker = BrokerConfig::default();
        RouterConfig {
            data: PathBuf::from("switchyard-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            cert: None,
            key: None,
            max_connections: 1024,
            max_streams_per_connection: 256,
            max_message_bytes: 1 << 20,
            max_frame_bytes: 16 << 20,
            max_partitions: 1024,
            // The storage defaults live with the storage.
            commit_max_batch_records: storage.max_batch_records,
            commit_max_batch_bytes: storage.max_batch_bytes,
            commit_linger_us: storage.linger.as_micros() as u64,
            commit_spin_us: storage.spin.as_micros() as u64,
            journal_bytes: storage.journal_bytes,
            journal_checkpoint_ms: storage.checkpoint.as_millis() as u64,
            storage_reserve_mb: storage.reserve_bytes >> 20,
            retention_check_ms: 30_000,
            cache_bytes: storage.cache_bytes,
            idle_timeout_ms: 30_000,
            connection_max_idle_ms: 600_000,
            max_connections_per_address: 256,
            max_handshakes_per_address: 32,
            max_connection_partial_bytes: 64 << 20,
            max_partial_bytes_total: 1 << 30,
            frame_timeout_ms: 30_000,
            max_plugin_deadline_ms: plugin_ceilings.max_deadline_ms,
            max_plugin_memory_mb: plugin_ceilings.max_memory_mb,
            max_plugin_memory_total_mb: plugin_ceilings.max_total_memory_mb,
            max_dedup_window_ms: broker.max_dedup_window_ms,
            max_queue_window: broker.max_queue_window,
            metrics: None,
            console: None,
            auth: AuthConfig::default(),
            cluster: ClusterSection::default(),
            replica: None,
        }
    }
}

impl RouterConfig {
    /// Where the certificate and key live.
    pub fn cert_paths(&self) -> CertPaths {
        let d = CertPaths::in_dir(&self.data);
        CertPaths {
            cert: self.cert.clone().unwrap_or(d.cert),
            key: self.key.clone().unwrap_or(d.key),
        }
    }
}

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The database could not be opened. (Not a `source`: the message
    /// already carries it, and error chains would print it twice.)
    #[error("opening storage: {0}")]
    Storage(StorageError),
    /// The UDP socket could not be bound.
    #[error(
        "listening on {addr}: {source} (is another router running? choose another address with --listen)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Deployed plugins could not be loaded.
    #[error("loading plugins: {0}")]
    Plugins(String),
    /// Principals could not be loaded.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A cluster node's Raft stopped on its own (a failed sync of its
    /// log, say): the node must not go on, and a restart recovers it from
    /// its files and the other nodes.
    #[error("the cluster node stopped: {0} (restart it; it catches up from the others)")]
    ClusterStopped(String),
    /// The metrics endpoint's TCP address could not be bound.
    #[error(
        "metrics endpoint on {addr}: {source} (choose another address with --metrics ADDR, or --metrics off)"
    )]
    MetricsBind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The web console's TCP address could not be bound.
    #[error("web console on {addr}: {source} (choose another address with --console ADDR)")]
    ConsoleBind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The router would be reachable beyond this machine with no principal
    /// but the local admin token.
    #[error(
        "refusing to listen on {0} with no principal configured: anyone who reaches this address \
         would need the admin token from this machine's data directory, and no one else could \
         connect. Create principals first (start on 127.0.0.1 and run `switchyard auth token \
         create NAME --grant ...`), define them in the config file's [auth] section, accept client \
         certificates with --client-ca FILE, or pass --allow-anonymous if an open router is really meant"
    )]
    OpenToNetwork(SocketAddr),
}

impl From<StorageError> for StartError {
    fn from(e: StorageError) -> Self {
        StartError::Storage(e)
    }
}

/// State shared by every connection task.
pub(crate) struct Shared {
    /// Partially received frames of every connection.
    pub(crate) partial_budget: Arc<crate::transport::Budget>,
    pub(crate) broker: Broker,
    pub(crate) auth: Arc<Auth>,
    pub(crate) config: RouterConfig,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Endpoint counters and end-to-end histograms, for metrics.
    pub(crate) stats: metrics::ServerStats,
}

/// A running router.
pub struct Router {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    console_addr: Option<SocketAddr>,
    data: PathBuf,
    cert_path: PathBuf,
    generated_cert: bool,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    storage: Storage,
    /// What `/metrics` reads; a cluster node serves it for every router
    /// it runs (`Router::metrics_source`).
    shared: std::sync::Weak<Shared>,
}

impl Router {
    /// Opens storage, prepares TLS, binds the endpoint and starts serving.
    pub async fn start(config: RouterConfig) -> Result<Router, StartError> {
        if config.max_plugin_deadline_ms > crate::plugins::engine::MAX_DEADLINE.as_millis() as u64 {
            return Err(StartError::Config(format!(
                "max_plugin_deadline_ms may be at most {}",
                crate::plugins::engine::MAX_DEADLINE.as_millis()
            )));
        }
        if config.max_connection_partial_bytes < config.max_frame_bytes + 4
            || config.max_partial_bytes_total < config.max_connection_partial_bytes
        {
            return Err(StartError::Config(
                "max_connection_partial_bytes must hold one whole frame (max_frame_bytes), and \
                 max_partial_bytes_total one connection's"
                    .into(),
            ));
        }
        if config.max_message_bytes + 4096 > config.max_frame_bytes {
            return Err(StartError::Config(
                "max_frame_bytes must exceed max_message_bytes by at least 4096".into(),
            ));
        }
        std::fs::create_dir_all(&config.data).map_err(|source| StartError::DataDir {
            path: config.data.clone(),
            source,
        })?;
        let paths = config.cert_paths();
        let generated_cert = tls::ensure_self_signed(&paths)?;
        // A single router's own endpoint (a cluster node's routers share
        // the node's); its certificate is checked before storage opens.
        let own_endpoint = match &config.replica {
            None => Some(endpoint_config(&config, 1)?),
            Some(_) => None,
        };

        let storage_config = StorageConfig {
            max_batch_records: config.commit_max_batch_records,
            max_batch_bytes: config.commit_max_batch_bytes,
            linger: Duration::from_micros(config.commit_linger_us),
            spin: Duration::from_micros(config.commit_spin_us),
            cache_bytes: config.cache_bytes,
            journal_bytes: config.journal_bytes,
            checkpoint: Duration::from_millis(config.journal_checkpoint_ms),
            reserve_bytes: config.storage_reserve_mb << 20,
            replicator: config.replica.as_ref().map(|r| r.replicator.clone()),
        };
        let storage = match &config.replica {
            None => Storage::open(&config.data.join("switchyard.redb"), storage_config)?,
            Some(r) => Storage::open_replicated(r.db.clone(), &r.db_path, storage_config)?,
        };

        let placement = config.replica.as_ref().and_then(|r| r.placement.clone());
        let following = placement
            .as_ref()
            .filter(|p| p.group != 0)
            .map(|p| p.zero.clone());
        let auth = Arc::new(match &following {
            None => Auth::open(&config.auth, &config.data, storage.clone())?,
            Some(replica) => {
                Auth::open_following(&config.auth, &config.data, storage.clone(), replica)?
            }
        });
        if let Some(replica) = following {
            auth.follow(replica);
        }
        if !config.listen.ip().is_loopback()
            && !auth.has_principals_beyond_admin(config.auth.client_ca.is_some())
        {
            storage.shutdown().await;
            return Err(StartError::OpenToNetwork(config.listen));
        }
        if config.auth.allow_anonymous {
            tracing::warn!(
                grants = ?config.auth.anonymous_grants.iter().map(|g| g.to_string()).collect::<Vec<_>>(),
                "anonymous access is allowed: connections without a credential act as 'anonymous'"
            );
        }

        let (source, local_addr) = match (&config.replica, own_endpoint) {
            (Some(r), _) => match Source::node(&r.clients) {
                Some(source) => (source, r.clients.local_addr()),
                None => {
                    storage.shutdown().await;
                    return Err(StartError::Config(
                        "the node's connections were taken by another router".into(),
                    ));
                }
            },
            (None, server_config) => {
                let server_config = server_config.expect("made above for a single router");
                let bound = crate::client::socket::endpoint(
                    quinn::EndpointConfig::default(),
                    Some(server_config),
                    config.listen,
                )
                .and_then(|e| Ok((e.local_addr()?, e)));
                match bound {
                    Ok((local_addr, endpoint)) => (Source::Own(endpoint), local_addr),
                    Err(source) => {
                        storage.shutdown().await;
                        return Err(StartError::Bind {
                            addr: config.listen,
                            source,
                        });
                    }
                }
            }
        };

        let (shutdown, shutdown_rx) = watch::channel(false);
        let ceilings = crate::plugins::Ceilings {
            max_deadline_ms: config.max_plugin_deadline_ms,
            max_memory_mb: config.max_plugin_memory_mb,
            max_total_memory_mb: config.max_plugin_memory_total_mb,
        };
        let plugins = Arc::new(
            PluginRegistry::open_with(storage.clone(), ceilings).map_err(StartError::Plugins)?,
        );
        let broker = Broker::new(
            storage.clone(),
            BrokerConfig {
                max_message_bytes: config.max_message_bytes,
                max_partitions: config.max_partitions,
                max_dedup_window_ms: config.max_dedup_window_ms,
                max_queue_window: config.max_queue_window,
            },
            plugins,
            auth.clone(),
        );
        let broker = match placement {
            Some(p) => broker.with_placement(p),
            None => broker,
        };
        // A route to another group's topic goes into the group's outbox:
        // it exists before the first publish is served.
        if let Some(r) = &config.replica
            && let (Some(p), Some(_)) = (&r.placement, &r.outbox)
            && let Err(e) = outbox::open(&storage, p.group).await
        {
            tracing::warn!(error = %e, "the outbox could not be made; routes to other groups fail until it is");
        }
        if let Err(e) = broker.open_queue_groups() {
            tracing::error!(error = %e, "queue groups not restored");
        }
        let shared = Arc::new(Shared {
            partial_budget: crate::transport::Budget::new(config.max_partial_bytes_total, None),
            broker,
            auth,
            config: config.clone(),
            shutdown: shutdown_rx,
            stats: metrics::ServerStats::default(),
        });
        let mut metrics_addr = None;
        if let Some(addr) = config.metrics {
            let bind = |source| StartError::MetricsBind { addr, source };
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    storage.shutdown().await;
                    return Err(bind(e));
                }
            };
            metrics_addr = Some(listener.local_addr().map_err(bind)?);
            tokio::spawn(metrics::serve(
                listener,
                shared.clone(),
                shared.shutdown.clone(),
            ));
        }
        let mut console_addr = None;
        if let Some(addr) = config.console {
            let bind = |source| StartError::ConsoleBind { addr, source };
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    storage.shutdown().await;
                    return Err(bind(e));
                }
            };
            console_addr = Some(listener.local_addr().map_err(bind)?);
            tokio::spawn(console::serve(
                listener,
                shared.clone(),
                shared.shutdown.clone(),
            ));
        }
        let storage_handle = storage.clone();
        let weak = Arc::downgrade(&shared);
        let task = tokio::spawn(serve(source, shared, storage));
        tracing::info!(%local_addr, cert = %paths.cert.display(), "router listening");
        Ok(Router {
            local_addr,
            metrics_addr,
            console_addr,
            data: config.data.clone(),
            cert_path: paths.cert,
            generated_cert,
            shutdown,
            task,
            storage: storage_handle,
            shared: weak,
        })
    }

    /// Resolves when the storage has failed (a sync of the journal or the
    /// database failed) and the router acknowledges no more writes: the
    /// caller should stop it and exit non-zero, so that a supervisor
    /// restarts it and recovery replays what was synced.
    pub async fn storage_failed(&self) -> Arc<str> {
        self.storage.wait_failed().await
    }

    /// The router's state as its metrics read it, for a cluster node's
    /// `/metrics`, which serves every router the node runs.
    pub(crate) fn metrics_source(&self) -> std::sync::Weak<Shared> {
        self.shared.clone()
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound address of the metrics endpoint, if it serves one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bound address of the web console, if it serves one.
    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.console_addr
    }

    /// The certificate clients should trust.
    pub fn cert_path(&self) -> &std::path::Path {
        &self.cert_path
    }

    /// The admin token file in the data directory (written on first start
    /// unless `[auth] admin_token = false`).
    pub fn admin_token_path(&self) -> PathBuf {
        crate::auth::admin_token_path(&self.data)
    }

    /// True if this start generated a new self-signed certificate.
    pub fn generated_cert(&self) -> bool {
        self.generated_cert
    }

    /// Graceful shutdown: stop accepting, close connections with
    /// `SHUTTING_DOWN`, commit everything queued, wait for the endpoint.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Runs a router until `shutdown` completes, then shuts down gracefully.
pub async fn run(
    config: RouterConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let router = Router::start(config).await?;
    shutdown.await;
    tracing::info!("shutting down");
    router.shutdown().await;
    Ok(())
}

/// The QUIC server configuration of a router's client endpoint: its
/// certificate, the client CA of mutual TLS, the ALPN of each of `groups`
/// Raft groups (1 for a single router) and the transport limits of
/// `config`. A cluster node serves its groups' routers on one endpoint
/// with it.
pub fn endpoint_config(
    config: &RouterConfig,
    groups: u32,
) -> Result<quinn::ServerConfig, StartError> {
    let crypto = tls::server_crypto(
        &config.cert_paths(),
        config.auth.client_ca.as_deref(),
        groups,
    )?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(config.max_streams_per_connection.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((8u32 << 20).into())
        .receive_window((32u32 << 20).into())
        .send_window(32 << 20)
        .max_idle_timeout(Some(
            Duration::from_millis(config.idle_timeout_ms)
                .try_into()
                .map_err(|_| StartError::Config("idle_timeout_ms too large".into()))?,
        ));
    let mut server_config = quinn::ServerConfig::with_crypto(crypto);
    server_config.transport_config(Arc::new(transport));
    Ok(server_config)
}

/// How long a stopping router waits for its closed connections to drain.
const ENDPOINT_DRAIN: Duration = Duration::from_secs(2);

/// Completes the handshake so the client gets a reason it can show, not a
/// bare refusal, then closes.
async fn refuse_politely(arriving: Arriving, why: String) {
    if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(5), arriving.connection()).await
    {
        conn.close(close::TOO_MANY_CONNECTIONS.into(), why.as_bytes());
    }
}

async fn serve(mut source: Source, shared: Arc<Shared>, storage: Storage) {
    let admission = Arc::new(Semaphore::new(shared.config.max_connections));
    let per_address = admission::PerAddress::new(
        shared.config.max_connections_per_address,
        shared.config.max_handshakes_per_address,
    );
    let mut shutdown = shared.shutdown.clone();
    let mut connections = JoinSet::new();
    let every = |ms: u64| Duration::from_millis(ms.max(10));
    let retention = tokio::spawn(periodic(
        every(shared.config.retention_check_ms),
        shared.shutdown.clone(),
        "retention pass",
        storage.clone(),
        |s| async move { s.enforce_retention().await.map(drop) },
    ));
    let checkpoints = tokio::spawn(periodic(
        every(shared.config.journal_checkpoint_ms),
        shared.shutdown.clone(),
        "journal checkpoint",
        storage.clone(),
        |s| async move { s.checkpoint().await },
    ));
    let forwarder = shared.config.replica.as_ref().and_then(|r| {
        let group = r.placement.as_ref()?.group;
        Some(tokio::spawn(outbox::forward(
            storage.clone(),
            group,
            r.outbox.clone()?,
            shared.shutdown.clone(),
        )))
    });
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            incoming = source.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                let (slot, handshaking) = match per_address.admit(remote.ip()) {
                    Ok(admitted) => admitted,
                    Err(admission::Refused::Handshakes(n)) => {
                        shared.stats.refuse(metrics::Refusal::HandshakesPerAddress);
                        // A handshake flood: refuse statelessly, no TLS work.
                        tracing::info!(%remote, limit = n, "connection refused: handshakes in progress per address");
                        incoming.refuse();
                        continue;
                    }
                    Err(admission::Refused::Connections(n)) => {
                        shared.stats.refuse(metrics::Refusal::ConnectionsPerAddress);
                        tracing::info!(%remote, limit = n, "connection refused: connections per address");
                        let why = format!(
                            "this address holds max_connections_per_address = {n} connections; close some or retry later"
                        );
                        connections.spawn(refuse_politely(incoming, why));
                        continue;
                    }
                };
                match admission.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let shared = shared.clone();
                        connections.spawn(async move {
                            connection::handle(incoming, shared, handshaking).await;
                            drop(permit);
                            drop(slot);
                        });
                    }
                    Err(_) => {
                        drop((slot, handshaking));
                        shared.stats.refuse(metrics::Refusal::Connections);
                        tracing::warn!(%remote, "connection limit reached");
                        let limit = shared.config.max_connections;
                        let why = format!("router is at max_connections = {limit}; retry later");
                        connections.spawn(refuse_politely(incoming, why));
                    }
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // No new connections; existing ones drain their publish streams (which
    // needs storage running) and close with SHUTTING_DOWN. Plugin calls in
    // progress are interrupted rather than waited out.
    shared.broker.plugins().stop_calls();
    source.close();
    tracing::debug!(connections = connections.len(), "draining connections");
    while connections.join_next().await.is_some() {}
    retention.abort();
    checkpoints.abort();
    if let Some(f) = forwarder {
        f.abort();
    }
    tracing::debug!("connections drained; stopping storage");
    storage.shutdown().await;
    let Source::Own(endpoint) = source else {
        // A cluster node's: it goes on redirecting on its endpoint.
        tracing::info!("router stopped");
        return;
    };
    tracing::debug!("storage stopped; closing the endpoint");
    endpoint.close(close::SHUTTING_DOWN.into(), b"router shutting down");
    // Every connection has been told; waiting for them to drain is a
    // courtesy. Under clients that reconnect at once (a cluster leader
    // stopping under load) one sometimes never finished draining, and the
    // router hung on SIGTERM; a stopping router must not.
    if tokio::time::timeout(ENDPOINT_DRAIN, endpoint.wait_idle())
        .await
        .is_err()
    {
        tracing::debug!("connections still draining; stopping anyway");
    }
    tracing::info!("router stopped");
}

/// Runs `f` on the storage every `every` until shutdown (retention,
/// checkpoints), logging its failures as `what` failed.
async fn periodic<F, Fut>(
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
    what: &'static str,
    storage: Storage,
    f: F,
) where
    F: Fn(Storage) -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::storage::StorageError>>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = f(storage.clone()).await {
                    tracing::warn!(error = %e, "{what} failed");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}
