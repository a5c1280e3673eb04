//! Connecting, the version handshake and the control stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::oneshot;

use super::ClientError;
use super::publish::Publisher;
use switchyard_protocol::{ALPN, Frame, MAX_VERSION, MIN_VERSION, TopicInfo, WireError, close};
use switchyard_protocol::transport::FrameReader;

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
            idle_timeout: Duration::from_secs(15),
            token: None,
            client_cert: None,
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

    /// Sets the TLS server name.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
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
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Frame>>>>;

/// A connection to a router. Cheap to share behind an `Arc`; every method
/// takes `&self` and may be called concurrently.
pub struct Client {
    pub(super) conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    info: ServerInfo,
    control: tokio::sync::Mutex<quinn::SendStream>,
    waiters: Waiters,
    next_id: AtomicU64,
    pub(super) publisher: Publisher,
}

fn client_crypto(cfg: &ClientConfig) -> Result<quinn::ClientConfig, ClientError> {
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
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window((8u32 << 20).into())
        .receive_window((32u32 << 20).into())
        .send_window(32 << 20)
        .keep_alive_interval(Some(cfg.idle_timeout / 3))
        .max_idle_timeout(Some(
            cfg.idle_timeout
                .try_into()
                .map_err(|_| ClientError::Tls("idle_timeout too large".into()))?,
        ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

impl Client {
    /// Connects, negotiates the protocol version and opens the control stream.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        let crypto = client_crypto(&cfg)?;
        let bind: SocketAddr = if cfg.addr.is_ipv6() {
            "[::]:0".parse().expect("valid")
        } else {
            "0.0.0.0:0".parse().expect("valid")
        };
        let connect_err = |reason: String| ClientError::Connect {
            addr: cfg.addr,
            reason,
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| connect_err(e.to_string()))?;
        endpoint.set_default_client_config(crypto);
        let connecting = endpoint
            .connect(cfg.addr, &cfg.server_name)
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .map_err(|_| connect_err("timed out after 10 s".into()))?
            .map_err(|e| connect_err(e.to_string()))?;

        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| ClientError::ConnectionLost(e.to_string()))?;
        let hello = Frame::Hello {
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            client: cfg.client_name.clone(),
            token: cfg.token.clone(),
        };
        send.write_all(&hello.to_bytes())
            .await
            .map_err(|e| ClientError::ConnectionLost(e.to_string()))?;
        // Frames from the router are bounded by our own generous limit.
        let mut reader = FrameReader::new(recv, 64 << 20);
        let info = match reader.next().await {
            Ok(Some(Frame::HelloOk {
                version,
                server,
                max_message_bytes,
                max_frame_bytes,
            })) => ServerInfo {
                version,
                server,
                max_message_bytes: max_message_bytes as usize,
                max_frame_bytes: max_frame_bytes as usize,
            },
            Ok(Some(Frame::Error { code, message, .. })) => {
                return Err(ClientError::Server(WireError::new(code, message)));
            }
            Ok(Some(other)) => {
                return Err(ClientError::Protocol(format!(
                    "expected HelloOk, got {other:?}"
                )));
            }
            Ok(None) | Err(_) => {
                // Wait briefly for the close frame so its reason can be shown.
                let reason = tokio::time::timeout(Duration::from_secs(1), conn.closed())
                    .await
                    .map(|e| describe_close(&e))
                    .unwrap_or_else(|_| "closed during handshake".into());
                return Err(ClientError::ConnectionLost(reason));
            }
        };

        let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(control_reader(reader, waiters.clone()));
        let publisher = Publisher::new(conn.clone(), info.clone(), cfg.max_in_flight);
        Ok(Client {
            conn,
            endpoint,
            info,
            control: tokio::sync::Mutex::new(send),
            waiters,
            next_id: AtomicU64::new(1),
            publisher,
        })
    }

    /// What the router reported in the handshake.
    pub fn server_info(&self) -> &ServerInfo {
        &self.info
    }

    async fn request(&self, make: impl FnOnce(u64) -> Frame) -> Result<Frame, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().expect("waiters lock").insert(id, tx);
        let bytes = make(id).to_bytes();
        {
            let mut send = self.control.lock().await;
            if let Err(e) = send.write_all(&bytes).await {
                self.waiters.lock().expect("waiters lock").remove(&id);
                // The router's own reason, when it closed the connection.
                let why = match self.conn.close_reason() {
                    Some(c) => describe_close(&c),
                    None => e.to_string(),
                };
                return Err(ClientError::ConnectionLost(why));
            }
        }
        let frame = rx
            .await
            .map_err(|_| ClientError::ConnectionLost(self.close_reason()))?;
        match frame {
            Frame::Error { code, message, .. } => {
                Err(ClientError::Server(WireError::new(code, message)))
            }
            f => Ok(f),
        }
    }

    pub(super) fn close_reason(&self) -> String {
        self.conn
            .close_reason()
            .map(|e| describe_close(&e))
            .unwrap_or_else(|| "control stream closed".into())
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
        let f = self
            .request(|id| Frame::CreateTopic {
                id,
                name: name.to_string(),
                partitions,
                retention_ms,
                retention_bytes,
            })
            .await?;
        one_topic(f)
    }

    /// Deletes a topic and all its records.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        match self
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

    /// Lists every topic with its partitions.
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>, ClientError> {
        match self.request(|id| Frame::ListTopics { id }).await? {
            Frame::Topics { topics, .. } => Ok(topics),
            f => Err(ClientError::Protocol(format!("unexpected answer {f:?}"))),
        }
    }

    /// Describes one topic: partitions with start/end offsets and bytes.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo, ClientError> {
        let f = self
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
    pub async fn admin_request(
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
        self.publisher.flush().await;
        self.conn.close(close::NORMAL.into(), b"client closed");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
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
        if let Some(tx) = waiters.lock().expect("waiters lock").remove(&id) {
            let _ = tx.send(frame);
        }
    }
    // Dropping the senders fails every waiting request.
    waiters.lock().expect("waiters lock").clear();
}
