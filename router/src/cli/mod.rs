//! The `switchyard` command line.

mod auth;
mod bench;
pub(crate) mod cluster;
mod plugin;
mod publish;
mod queue;
mod scaffold;
mod status;
mod subscribe;
mod top;
mod topic;
mod tune;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::client::{Client, ClientConfig};
use crate::server::RouterConfig;

/// A programmable event router: durable partitioned logs over QUIC.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text, or as JSON objects (one per line) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SWITCHYARD_LOG_FORMAT")]
    log_format: LogFormat,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable (coloured only on a terminal).
    Text,
    /// One JSON object per line: timestamp, level, message, fields, spans.
    Json,
}

/// How client commands reach the router.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Router address.
    #[arg(long, env = "SWITCHYARD_ADDR", default_value = "127.0.0.1:7400")]
    addr: SocketAddr,
    /// PEM certificate (or CA) to trust.
    #[arg(
        long,
        env = "SWITCHYARD_CA",
        default_value = "switchyard-data/cert.pem"
    )]
    ca: PathBuf,
    /// Name to verify in the router's certificate.
    #[arg(long, env = "SWITCHYARD_SERVER_NAME", default_value = "localhost")]
    server_name: String,
    /// Bearer token to act with.
    #[arg(long, env = "SWITCHYARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token (default: `admin.token` beside the
    /// --ca certificate, if there is one: the router's own data directory).
    #[arg(long, env = "SWITCHYARD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Every node of a cluster (client addresses): follow its leader
    /// (default: `cluster.addrs` beside --ca, if there is one).
    #[arg(long, env = "SWITCHYARD_CLUSTER", value_delimiter = ',')]
    cluster: Vec<SocketAddr>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "SWITCHYARD_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, env = "SWITCHYARD_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
}

impl ConnectArgs {
    fn config(&self) -> anyhow::Result<ClientConfig> {
        if !self.ca.exists() {
            anyhow::bail!(
                "certificate {} not found: start a router with `switchyard serve` in this directory, or pass --ca / SWITCHYARD_CA",
                self.ca.display()
            );
        }
        let mut cfg = ClientConfig::new(self.addr)
            .with_ca_file(&self.ca)
            .with_server_name(&self.server_name);
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            cfg = cfg.with_client_cert(cert, key);
        }
        if !self.cluster.is_empty() {
            cfg = cfg.with_cluster(self.cluster.iter().copied());
        } else if let Some(dir) = self.ca.parent() {
            // Beside a cluster node, the cluster's node list.
            let beside = dir.join(cluster::ADDRS_FILE);
            if beside.exists() {
                cfg = cfg.with_cluster(cluster::read_addrs(&beside)?);
            }
        }
        if let Some(t) = &self.token {
            cfg = cfg.with_token(t);
        } else if let Some(f) = &self.token_file {
            cfg = cfg.with_token_file(f)?;
        } else if self.client_cert.is_none() {
            // Beside a router, its data directory's admin token, found the
            // same way as its certificate.
            let beside = self
                .ca
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("admin.token");
            if beside.exists() {
                cfg = cfg.with_token_file(beside)?;
            }
        }
        Ok(cfg)
    }

    async fn connect(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(self.config()?).await?)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a router.
    Serve(ServeArgs),
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Publish one message, or one per line of standard input.
    Publish(publish::PublishArgs),
    /// Read messages from a topic.
    Subscribe(subscribe::SubscribeArgs),
    /// Deploy, inspect, roll back, remove, dry-run and scaffold plugins.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// Generate load and report throughput and latency.
    Bench(bench::BenchArgs),
    /// Inspect queue groups.
    #[command(subcommand)]
    Queue(queue::QueueCommand),
    /// List, redrive and purge dead letters.
    #[command(subcommand)]
    Dlq(queue::DlqCommand),
    /// Show (and with --apply set) the host settings that decide latency.
    Tune(tune::TuneArgs),
    /// One look at the router: topics, rates, consumer lag, queue depth,
    /// dead letters, plugin health (`--json` for scripts).
    Status(status::StatusArgs),
    /// The same, live in the terminal: refreshing, sortable (s, r; q quits).
    Top(top::TopArgs),
    /// Verify a stopped router's data directory; `--repair` fixes what can
    /// be fixed without losing acknowledged data.
    Check(CheckArgs),
    /// Principals: tokens, grants, quotas, whoami.
    #[command(subcommand)]
    Auth(auth::AuthCommand),
    /// A replicated cluster: make its data directories, see its state.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Data directory (database, certificate, key).
    #[arg(long)]
    data: Option<PathBuf>,
    /// UDP address to listen on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// TOML file; any field of the router configuration (see docs/configuration.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Accept client certificates signed by this CA (PEM): mutual TLS, the
    /// certificate's subject common name is the principal.
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// Let connections without a credential in, as principal `anonymous`
    /// with every right (or `[auth] anonymous_grants`). Logged at every start.
    #[arg(long)]
    allow_anonymous: bool,
    /// Prometheus endpoint (`GET /metrics`, plain HTTP), or `off`. Default:
    /// 127.0.0.1 on the port after --listen's (7401), or the config file's
    /// `metrics`. Beyond loopback it needs a cluster-admin bearer token.
    #[arg(long, value_name = "ADDR|off")]
    metrics: Option<String>,
    /// Serve the web console here (plain HTTP, e.g. 127.0.0.1:7402); sign
    /// in with a token. Off unless given (or the config file's `console`).
    #[arg(long, value_name = "ADDR")]
    console: Option<SocketAddr>,
    /// This node's id in a cluster (1 for the first address of --cluster;
    /// or the config file's `[cluster] node_id`).
    #[arg(long)]
    node_id: Option<u64>,
    /// Every node's client address, in node id order: run as one node of a
    /// replicated cluster (data directories from `switchyard cluster init`).
    #[arg(long, value_delimiter = ',')]
    cluster: Vec<SocketAddr>,
    /// Join a running cluster (a node made by `switchyard cluster
    /// add-node`): wait to be added instead of forming a new cluster.
    #[arg(long)]
    join: bool,
    /// How many Raft groups a cluster spreads its topics over (or the
    /// config file's `[cluster] groups`; default 1). Give every node the
    /// same number; it is fixed when the cluster first starts. Several
    /// groups spread the leaders, and so the write load, over the nodes.
    #[arg(long)]
    groups: Option<u32>,
    /// How many copies a cluster keeps of each topic (or the config
    /// file's `[cluster] replication_factor`; default 3, or every node of
    /// a smaller cluster): the voters of each of its groups but group 0,
    /// which has every node. Below the number of nodes it needs `--groups`
    /// 2 or more. Fixed when the cluster first starts.
    #[arg(long)]
    replication_factor: Option<u32>,
}

/// Arguments of `switchyard check`.
#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// The data directory of a stopped router.
    #[arg(long, default_value = "switchyard-data")]
    data: PathBuf,
    /// Fix what can be fixed without losing acknowledged data.
    #[arg(long)]
    repair: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    if args.data.join("raft.redb").exists() {
        return check_node(args);
    }
    let report = crate::storage::check::check(&args.data, args.repair)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(
            out,
            "checked {}: {} topic(s), {} partition(s), {} record checksum(s) verified; \
             journal: {} commit(s) to replay at the next start",
            args.data.display(),
            report.topics,
            report.partitions,
            report.records,
            report.journal_pending
        )?;
        for f in &report.findings {
            let state = if f.repaired { "repaired" } else { "problem" };
            writeln!(out, "{state}: {}: {}", f.file.display(), f.problem)?;
            if !f.repaired {
                writeln!(out, "  what to do: {}", f.action)?;
            }
        }
    }
    let open = report.findings.iter().filter(|f| !f.repaired).count();
    if open > 0 {
        anyhow::bail!("{open} problem(s) left in {}", args.data.display());
    }
    if !args.json {
        writeln!(out, "ok")?;
    }
    Ok(())
}

/// `switchyard check` of a cluster node's directory: each group's tables
/// and the Raft log, verified; repairs are refused (a replica is rebuilt
/// from the others, not patched behind its log).
fn check_node(args: CheckArgs) -> anyhow::Result<()> {
    use crate::storage::check::REPLACE_NODE;
    if args.repair {
        anyhow::bail!(
            "{} is a cluster node's: --repair would change a replica behind its Raft log. \
             Run `switchyard check` without it to see what is wrong; to fix a damaged node, {REPLACE_NODE}",
            args.data.display()
        );
    }
    let groups = match std::fs::read_to_string(args.data.join(crate::cluster::serve::GROUPS_FILE)) {
        Ok(n) => n
            .trim()
            .parse::<u32>()
            .map_err(|_| anyhow::anyhow!("{}: not a number of groups", args.data.display()))?,
        Err(_) => 1,
    };
    let report = crate::storage::check::check_node(&args.data, groups)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    }
    let mut open = 0;
    let findings = report
        .groups
        .iter()
        .flat_map(|(_, r)| &r.findings)
        .chain(&report.raft_log);
    for f in findings {
        if !f.repaired {
            open += 1;
        }
        if !args.json {
            let state = if f.repaired { "repaired" } else { "problem" };
            writeln!(out, "{state}: {}: {}", f.file.display(), f.problem)?;
            if !f.repaired {
                writeln!(out, "  what to do: {}", f.action)?;
            }
        }
    }
    if !args.json {
        for (g, r) in &report.groups {
            writeln!(
                out,
                "checked {} group {g}: {} topic(s), {} partition(s), {} record checksum(s) verified",
                args.data.display(),
                r.topics,
                r.partitions,
                r.records
            )?;
        }
        writeln!(
            out,
            "checked {}: the Raft log's pages",
            args.data.join("raft.redb").display()
        )?;
    }
    if open > 0 {
        anyhow::bail!("{open} problem(s) left in {}", args.data.display());
    }
    if !args.json {
        writeln!(out, "ok")?;
    }
    Ok(())
}

/// Bytes as B, KiB, MiB, GiB.
pub fn human_bytes(n: u64) -> String {
    status::bytes(n)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,openraft=warn"));
    // A log line that cannot be written (a full disk under stderr) is
    // dropped: reporting that failure would print to stderr again, and a
    // failed print panics on whatever thread logged, the storage writer
    // included.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match cli.log_format {
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        // Colour only on a terminal: a log redirected to a file stays plain.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Topic(cmd) => topic::run(cmd).await,
        Command::Publish(args) => publish::run(args).await,
        Command::Subscribe(args) => subscribe::run(args).await,
        Command::Plugin(cmd) => plugin::run(cmd).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Queue(cmd) => queue::run_queue(cmd).await,
        Command::Dlq(cmd) => queue::run_dlq(cmd).await,
        Command::Tune(args) => tune::run(args),
        Command::Status(args) => status::run(args).await,
        Command::Top(args) => top::run(args).await,
        Command::Check(args) => check(args),
        Command::Auth(cmd) => auth::run(cmd).await,
        Command::Cluster(cmd) => cluster::run(cmd).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<RouterConfig>(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => RouterConfig::default(),
    };
    if let Some(d) = args.data {
        config.data = d;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(ca) = args.client_ca {
        config.auth.client_ca = Some(ca);
    }
    if args.allow_anonymous {
        config.auth.allow_anonymous = true;
    }
    match args.metrics.as_deref() {
        Some("off") => config.metrics = None,
        Some(a) => {
            config.metrics = Some(
                a.parse()
                    .with_context(|| format!("--metrics '{a}' is not an address or 'off'"))?,
            )
        }
        None if config.metrics.is_none() => {
            let port = match config.listen.port() {
                0 => 0,
                p => p.wrapping_add(1),
            };
            config.metrics = Some(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        None => {}
    }
    if let Some(c) = args.console {
        config.console = Some(c);
    }
    if let Some(id) = args.node_id {
        config.cluster.node_id = Some(id);
    }
    if !args.cluster.is_empty() {
        config.cluster.nodes = args.cluster;
    }
    if args.join {
        config.cluster.join = true;
    }
    if let Some(g) = args.groups {
        config.cluster.groups = g;
    }
    if let Some(r) = args.replication_factor {
        config.cluster.replication_factor = Some(r);
    }
    if let Some(id) = config.cluster.node_id {
        let (nodes, join) = (config.cluster.nodes.clone(), config.cluster.join);
        return serve_cluster(config, id, nodes, join).await;
    }
    if !config.cluster.nodes.is_empty()
        || config.cluster.join
        || config.cluster.groups > 1
        || config.cluster.replication_factor.is_some()
    {
        anyhow::bail!(
            "--cluster, --join, --groups and --replication-factor need --node-id (or `[cluster] \
             node_id` in the config file)"
        );
    }
    // Listening for SIGTERM before the router announces itself: a
    // supervisor may stop it the moment it reads that line.
    let stop = shutdown_signal();
    let router = crate::server::Router::start(config).await?;
    // Tests and scripts read these two lines. A router whose stdout cannot
    // be written (closed, or a full disk) still serves.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "switchyard listening on {}", router.local_addr());
    let _ = writeln!(
        out,
        "certificate: {}{}",
        router.cert_path().display(),
        if router.generated_cert() {
            " (generated)"
        } else {
            ""
        }
    );
    if router.admin_token_path().exists() {
        let _ = writeln!(out, "admin token: {}", router.admin_token_path().display());
    }
    if let Some(m) = router.metrics_addr() {
        let _ = writeln!(out, "metrics: http://{m}/metrics");
    }
    if let Some(c) = router.console_addr() {
        let _ = writeln!(out, "console: http://{c}/");
    }
    let _ = out.flush();
    drop(out);
    tune::hint();
    let failed = tokio::select! {
        _ = stop => None,
        why = router.storage_failed() => Some(why),
    };
    if let Some(why) = failed {
        // Nothing more can be acknowledged: stop, and exit non-zero so that
        // a supervisor restarts the router, whose recovery replays what
        // was synced.
        router.shutdown().await;
        anyhow::bail!("storage failed, stopping: {why}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "shutting down: flushing the commit queue and closing connections"
    );
    router.shutdown().await;
    Ok(())
}

async fn serve_cluster(
    config: RouterConfig,
    id: u64,
    nodes: Vec<SocketAddr>,
    join: bool,
) -> anyhow::Result<()> {
    if id == 0 || id as usize > nodes.len() {
        anyhow::bail!(
            "--node-id {id} is not one of the {} nodes of --cluster",
            nodes.len()
        );
    }
    if nodes[id as usize - 1] != config.listen {
        anyhow::bail!(
            "--cluster names {} for node {id}, but it listens on {} (--listen)",
            nodes[id as usize - 1],
            config.listen
        );
    }
    let members = nodes
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u64 + 1, *a))
        .collect();
    let groups = config.cluster.groups.max(1);
    if groups > 64 {
        anyhow::bail!("--groups {groups}: at most 64 groups");
    }
    let replication = config.cluster.replication_factor;
    if let Some(r) = replication
        && groups == 1
        && (r as usize) < nodes.len()
    {
        anyhow::bail!(
            "--replication-factor {r} with {} nodes needs --groups 2 or more: group 0, the \
             cluster's metadata, has every node, and the other groups have {r} each",
            nodes.len()
        );
    }
    let stop = shutdown_signal();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "switchyard node {id} of {} listening on {} (Raft on {}){}",
        nodes.len(),
        config.listen,
        crate::cluster::serve::raft_addr(config.listen),
        if groups > 1 {
            format!(", {groups} groups")
        } else {
            String::new()
        }
    );
    let _ = out.flush();
    drop(out);
    crate::cluster::serve::run(
        crate::cluster::serve::ClusterServe {
            node_id: id,
            members,
            router: config,
            timing: crate::cluster::Timing::default(),
            join,
            faults: std::sync::Arc::new(crate::cluster::net::NoFaults),
            disk: std::sync::Arc::new(crate::storage::disk::OsDisk),
            groups,
            replication,
        },
        stop,
    )
    .await?;
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C. The handlers are installed when this
/// is called, not when the future is first polled, so that a signal that
/// comes between the two (just after the router prints its address, say)
/// stops the router gracefully instead of killing it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            match (term, int) {
                (Some(mut term), Some(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
