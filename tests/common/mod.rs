//! Helpers shared by the integration tests: a real router on 127.0.0.1:0
//! with a temporary data directory, clients for it, and the router binary
//! as a child process.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use switchyard::client::{Client, ClientConfig};
use switchyard::server::{Router, RouterConfig};

/// A router running in this process.
pub struct TestRouter {
    pub router: Router,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub cert: PathBuf,
}

/// Configuration for a test router in `dir`: loopback, port 0.
pub fn test_config(dir: &Path) -> RouterConfig {
    RouterConfig {
        data: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        retention_check_ms: 100,
        ..RouterConfig::default()
    }
}

/// Starts a router with default settings.
pub async fn start_router() -> TestRouter {
    start_router_with(|_| {}).await
}

/// Starts a router after `tweak` adjusts its configuration.
pub async fn start_router_with(tweak: impl FnOnce(&mut RouterConfig)) -> TestRouter {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    tweak(&mut config);
    let router = Router::start(config).await.unwrap();
    TestRouter {
        addr: router.local_addr(),
        cert: router.cert_path().to_path_buf(),
        router,
        dir,
    }
}

impl TestRouter {
    pub async fn client(&self) -> Arc<Client> {
        connect(self.addr, &self.cert).await
    }
}

/// The admin token of the router whose certificate is `cert` (both live in
/// its data directory).
pub fn admin_token(cert: &Path) -> String {
    std::fs::read_to_string(cert.with_file_name("admin.token"))
        .expect("the router wrote its admin token")
        .trim()
        .to_string()
}

/// Connects to the router at `addr` as its admin.
pub async fn connect(addr: SocketAddr, cert: &Path) -> Arc<Client> {
    connect_with(addr, cert, |c| c.with_token(admin_token(cert))).await
}

/// Connects to the router at `addr` after `tweak` sets the credential.
pub async fn connect_with(
    addr: SocketAddr,
    cert: &Path,
    tweak: impl FnOnce(ClientConfig) -> ClientConfig,
) -> Arc<Client> {
    let mut cfg = tweak(ClientConfig::new(addr).with_ca_file(cert));
    // Notice a killed router quickly.
    cfg.idle_timeout = Duration::from_secs(2);
    Arc::new(Client::connect(cfg).await.unwrap())
}

/// A QUIC connection to `r` from address `bind`, with our ALPN and trust
/// and nothing else of the client: for tests that speak raw frames.
pub async fn raw_connect_from(r: &TestRouter, bind: &str) -> quinn::Connection {
    raw_connect_to(r.addr, &r.cert, bind).await
}

/// [`raw_connect_from`] any router or cluster node at `addr` whose
/// certificate (or CA) is `cert`.
pub async fn raw_connect_to(addr: SocketAddr, cert: &Path, bind: &str) -> quinn::Connection {
    let mut roots = rustls::RootCertStore::empty();
    for c in switchyard::server::tls::load_certs(cert).unwrap() {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![switchyard::protocol::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client(format!("{bind}:0").parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    ep.connect(addr, "localhost").unwrap().await.unwrap()
}

/// [`raw_connect_from`] loopback's usual address.
pub async fn raw_connect(r: &TestRouter) -> quinn::Connection {
    raw_connect_from(r, "127.0.0.1").await
}

/// The names of the topics `c` lists, in its order.
pub async fn topic_names(c: &Client) -> Vec<String> {
    c.list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect()
}

/// Reads exactly `n` messages from a subscription or a queue consumer,
/// failing the test after `secs` seconds.
pub async fn take<S, T, E>(sub: &mut S, n: usize, secs: u64) -> Vec<T>
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while out.len() < n {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(Ok(m))) => out.push(m),
            Ok(Some(Err(e))) => panic!("error after {} messages: {e}", out.len()),
            Ok(None) => panic!("ended after {} of {n} messages", out.len()),
            Err(_) => panic!("timed out after {} of {n} messages", out.len()),
        }
    }
    out
}

/// The router binary, built by cargo for this test run.
pub fn router_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))
}

/// Runs `switchyard serve` on `data` and `listen` to its end: for starts
/// that must be refused. A router still running after 20 s is killed (and
/// its status is then the kill's, not success).
pub fn serve_until_exit(data: &Path, listen: &str) -> std::process::Output {
    let mut child = Command::new(router_bin())
        .args(["serve", "--listen", listen, "--data"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

/// Sends SIGTERM to a child router.
pub fn sigterm(child: &Child) {
    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success());
}

/// A router running as a child process.
pub struct ChildRouter {
    pub child: Child,
    pub addr: SocketAddr,
    pub cert: PathBuf,
}

impl ChildRouter {
    /// Starts `switchyard serve` on 127.0.0.1:0 with `data` and waits for
    /// its "listening on" line.
    pub fn spawn(data: &Path) -> ChildRouter {
        Self::spawn_with(data, &[])
    }

    /// As [`ChildRouter::spawn`], on a given address (to restart a router
    /// where its clients will look for it).
    pub fn spawn_on(data: &Path, addr: SocketAddr) -> ChildRouter {
        let mut cmd = Command::new(router_bin());
        cmd.args(["serve", "--listen", &addr.to_string(), "--data"])
            .arg(data);
        Self::start(cmd, data)
    }

    /// As [`ChildRouter::spawn`], with more arguments to `serve`.
    pub fn spawn_with(data: &Path, extra: &[&std::ffi::OsStr]) -> ChildRouter {
        let mut cmd = Command::new(router_bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .args(extra);
        Self::start(cmd, data)
    }

    /// As [`ChildRouter::spawn`], but the router may not grow any file past
    /// `limit_blocks` (`ulimit -f`: a disk that fills up). Writes past it
    /// fail with EFBIG instead of a signal.
    pub fn spawn_with_file_limit(data: &Path, limit_blocks: u64) -> ChildRouter {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "ulimit -f {limit_blocks} && trap '' XFSZ && exec \"$0\" serve --listen 127.0.0.1:0 --data \"$1\""
            ))
            .arg(router_bin())
            .arg(data);
        Self::start(cmd, data)
    }

    /// As [`ChildRouter::spawn`], but a router that exits before it
    /// listens is an `Err` with what it printed to stderr.
    pub fn try_spawn(data: &Path) -> Result<ChildRouter, String> {
        let mut child = Command::new(router_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn router");
        let mut stderr = child.stderr.take().unwrap();
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = lines.by_ref().map_while(Result::ok).find_map(|l| {
            l.strip_prefix("switchyard listening on ")
                .map(|a| a.trim().parse().unwrap())
        });
        let Some(addr) = addr else {
            let _ = child.wait();
            return Err(err.join().unwrap());
        };
        std::thread::spawn(move || for _ in lines {});
        Ok(ChildRouter {
            child,
            addr,
            cert: data.join("cert.pem"),
        })
    }

    fn start(cmd: Command, data: &Path) -> ChildRouter {
        Self::start_logging(cmd, data, Stdio::inherit())
    }

    /// Starts `cmd` (a `serve`) with its log going to `stderr`, at the
    /// level `RUST_LOG` set on `cmd` says (`warn` if none).
    pub fn start_logging(mut cmd: Command, data: &Path, stderr: Stdio) -> ChildRouter {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn router");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(a) = line.strip_prefix("switchyard listening on ") {
                addr = Some(a.trim().parse().unwrap());
                break;
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        ChildRouter {
            child,
            addr: addr.expect("router printed its address"),
            cert: data.join("cert.pem"),
        }
    }
}

impl Drop for ChildRouter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback UDP address free right now, for a router that is restarted
/// on the same address.
pub fn free_udp_addr() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A plugin component built by `plugins/build.sh`, by crate name with
/// underscores (`route_by_header`).
pub fn plugin_wasm(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. Build the plugins first: plugins/build.sh (the README's test command does)",
            path.display()
        )
    })
}

/// Nanoseconds of the wall clock, as a cheap seed.
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `GET /metrics` over plain HTTP: the status code and the body.
pub async fn get_metrics(addr: SocketAddr, token: Option<&str>) -> (u16, String) {
    // A listener that nobody accepts on would hold the request forever.
    tokio::time::timeout(Duration::from_secs(10), get_metrics_once(addr, token))
        .await
        .unwrap_or_else(|_| panic!("no answer from the metrics endpoint {addr} in 10 s"))
}

async fn get_metrics_once(addr: SocketAddr, token: Option<&str>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap();
    (code, body)
}
