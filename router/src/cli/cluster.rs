//! `switchyard cluster`: make a cluster's data directories, and look at it.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use crate::cluster::serve::CA_FILE;
use crate::cluster::tls::ClusterCa;

/// The file beside `cert.pem` listing every node's client address, which
/// the CLI (and an application) uses to find the leader.
pub(super) const ADDRS_FILE: &str = "cluster.addrs";

/// `switchyard cluster ...`
#[derive(Debug, clap::Subcommand)]
pub(super) enum ClusterCommand {
    /// Make the data directories of a new cluster: one cluster CA, a
    /// certificate per node, one admin token, the node list.
    Init(InitArgs),
    /// Nodes, the leader, terms and how far each follower is behind.
    Status(StatusArgs),
}

/// Arguments of `switchyard cluster init`.
#[derive(Debug, clap::Args)]
pub(super) struct InitArgs {
    /// Every node's client address, in node id order (node 1 first). Each
    /// node also uses the port 5 above it for Raft traffic.
    #[arg(long, value_delimiter = ',', required = true)]
    pub(super) nodes: Vec<SocketAddr>,
    /// Where to make the directories: `<dir>/n1`, `<dir>/n2`, ...
    #[arg(long, default_value = "switchyard-cluster")]
    pub(super) dir: PathBuf,
    /// Extra names or addresses the node certificates are valid for
    /// (besides localhost, loopback and each node's own address).
    #[arg(long, value_delimiter = ',')]
    pub(super) hosts: Vec<String>,
}

/// Arguments of `switchyard cluster status`.
#[derive(Debug, clap::Args)]
pub(super) struct StatusArgs {
    #[command(flatten)]
    connect: super::ConnectArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs a `cluster` subcommand.
pub(super) async fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Init(args) => init(&args),
        ClusterCommand::Status(args) => status(args).await,
    }
}

fn init(args: &InitArgs) -> anyhow::Result<()> {
    if args.nodes.is_empty() {
        anyhow::bail!("--nodes needs at least one address");
    }
    let ca = ClusterCa::generate()?;
    let token = crate::auth::new_token();
    let addrs = args
        .nodes
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut out = std::io::stdout().lock();
    for (i, addr) in args.nodes.iter().enumerate() {
        let id = i as u64 + 1;
        let dir = args.dir.join(format!("n{id}"));
        if dir.join(CA_FILE).exists() {
            anyhow::bail!(
                "{} already belongs to a cluster; remove it to start over",
                dir.display()
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut hosts = vec![
            "localhost".to_string(),
            "127.0.0.1".into(),
            "::1".into(),
            addr.ip().to_string(),
        ];
        hosts.extend(args.hosts.iter().cloned());
        hosts.sort();
        hosts.dedup();
        let (cert, key) = ca.issue_pem(id, &hosts)?;
        let write = |name: &str, text: &str, private: bool| -> anyhow::Result<()> {
            let path = dir.join(name);
            if private {
                crate::auth::write_private(&path, text.as_bytes())
            } else {
                std::fs::write(&path, text)
            }
            .with_context(|| format!("writing {}", path.display()))
        };
        // cert.pem is the node's chain (its certificate, then the CA's):
        // what it presents, and what the CLI beside it trusts.
        write("cert.pem", &format!("{cert}{}", ca.cert_pem), false)?;
        write("key.pem", &key, true)?;
        write(CA_FILE, &ca.cert_pem, false)?;
        write("admin.token", &format!("{token}\n"), true)?;
        write(ADDRS_FILE, &format!("{addrs}\n"), false)?;
        let _ = writeln!(
            out,
            "switchyard serve --data {} --listen {addr} --node-id {id} --cluster {addrs}",
            dir.display()
        );
    }
    let _ = writeln!(
        out,
        "made {} node directories under {}; start each node with the line above it",
        args.nodes.len(),
        args.dir.display()
    );
    Ok(())
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let client = args.connect.connect().await?;
    let v = client
        .admin_request("cluster_status", serde_json::json!({}), bytes::Bytes::new())
        .await?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "leader: node {} (term {}), committed {}",
        v["leader"], v["term"], v["committed"]
    )?;
    writeln!(
        out,
        "{:<6} {:<22} {:<10} {:>12} {:>10}",
        "node", "address", "role", "matched", "behind"
    )?;
    for n in v["nodes"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "{:<6} {:<22} {:<10} {:>12} {:>10}",
            n["id"].to_string(),
            n["addr"].as_str().unwrap_or(""),
            n["role"].as_str().unwrap_or(""),
            n["matched"].to_string(),
            n["behind"].to_string()
        )?;
    }
    Ok(())
}
