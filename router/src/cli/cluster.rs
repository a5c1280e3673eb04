//! `switchyard cluster`: make a cluster's data directories, and look at it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use crate::cluster::serve::CA_FILE;
use crate::cluster::tls::ClusterCa;
use crate::protocol::ErrorCode;
use std::io::Write;

/// The file beside `cert.pem` listing every node's client address, which
/// the CLI (and an application) uses to find the leader.
pub(super) const ADDRS_FILE: &str = "cluster.addrs";

/// Reads a `cluster.addrs` file: client addresses, comma-separated.
pub(super) fn read_addrs(path: &std::path::Path) -> anyhow::Result<Vec<SocketAddr>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .split(',')
        .map(|a| a.trim().parse())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a list of addresses", path.display()))
}

/// `switchyard cluster ...`
#[derive(Debug, clap::Subcommand)]
pub(super) enum ClusterCommand {
    /// Make the data directories of a new cluster: one cluster CA, a
    /// certificate per node, one admin token, the node list.
    Init(InitArgs),
    /// Nodes, the leader, terms and how far each follower is behind.
    Status(StatusArgs),
    /// Make a new node's data directory (certificate from the cluster CA
    /// that `init` kept) and add it to the running cluster: as a learner
    /// until it has caught up, then as a voter. Start the node with the
    /// printed `serve --join` line; this waits for it.
    AddNode(AddNodeArgs),
    /// Remove a node from the cluster; stop it afterwards.
    RemoveNode(RemoveNodeArgs),
    /// Move leadership off the current leader while the cluster serves
    /// (before maintenance of its machine, say): to `--to`, or to the
    /// first voter that holds the whole log. Writes pause for about one
    /// round trip; clients follow on their own.
    StepDown(StepDownArgs),
    /// Move a group's replica from one node to another while the group
    /// serves (to spread replicas onto a node added since): the new node
    /// catches up as a learner and becomes a voter before the old one
    /// leaves, so the group keeps its replication factor throughout.
    MoveReplica(MoveReplicaArgs),
    /// Put a node in maintenance: it is handed no leadership and hands
    /// over every group it leads, while the cluster serves; waits until it
    /// leads none. The mark outlives a restart of the node (drain, stop,
    /// upgrade, start, then `undrain`).
    Drain(DrainArgs),
    /// Take a node out of maintenance: the cluster hands it its share of
    /// leaderships again.
    Undrain(DrainArgs),
}

/// Arguments of `switchyard cluster drain` and `undrain`.
#[derive(Debug, clap::Args)]
pub(super) struct DrainArgs {
    #[command(flatten)]
    connect: super::ConnectArgs,
    /// The node's id.
    #[arg(long)]
    node: u64,
    /// How long `drain` waits for the node to lead no group.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Mark the node and return, without waiting for the moves.
    #[arg(long)]
    no_wait: bool,
}

/// Arguments of `switchyard cluster step-down`.
#[derive(Debug, clap::Args)]
pub(super) struct StepDownArgs {
    #[command(flatten)]
    connect: super::ConnectArgs,
    /// The node to lead next (a voter); any voter that has caught up if
    /// not given.
    #[arg(long)]
    to: Option<u64>,
}

/// Arguments of `switchyard cluster move-replica`.
#[derive(Debug, clap::Args)]
pub(super) struct MoveReplicaArgs {
    #[command(flatten)]
    connect: super::ConnectArgs,
    /// The group (`cluster status` lists each group's replicas).
    #[arg(long)]
    group: u32,
    /// The node that gives up its replica.
    #[arg(long)]
    from: u64,
    /// The node that takes it; if not given, the live, undrained node
    /// outside the group holding fewest replicas.
    #[arg(long)]
    to: Option<u64>,
}

/// Arguments of `switchyard cluster add-node`.
#[derive(Debug, clap::Args)]
pub(super) struct AddNodeArgs {
    #[command(flatten)]
    connect: super::ConnectArgs,
    /// The directory `cluster init` made (holds the CA and the nodes').
    #[arg(long, default_value = "switchyard-cluster")]
    dir: PathBuf,
    /// The new node's client address (its Raft port is 5 above).
    #[arg(long = "node-addr")]
    node_addr: SocketAddr,
}

/// Arguments of `switchyard cluster remove-node`.
#[derive(Debug, clap::Args)]
pub(super) struct RemoveNodeArgs {
    #[command(flatten)]
    connect: super::ConnectArgs,
    /// The node's id.
    #[arg(long)]
    id: u64,
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
    /// The number of Raft groups the nodes will spread topics over: the
    /// serve lines printed carry it (`serve --groups`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(super) groups: u32,
    /// How many copies of each topic the cluster keeps (default 3):
    /// recorded in each node's directory, so the serve lines need no
    /// `--replication-factor`. Below the number of nodes it needs
    /// `--groups` 2 or more.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub(super) replication_factor: Option<u32>,
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
        ClusterCommand::AddNode(args) => add_node(args).await,
        ClusterCommand::StepDown(args) => step_down(args).await,
        ClusterCommand::MoveReplica(args) => move_replica(args).await,
        ClusterCommand::Drain(args) => drain(args, true).await,
        ClusterCommand::Undrain(args) => drain(args, false).await,
        ClusterCommand::RemoveNode(args) => {
            let client = args.connect.connect().await?;
            let body = serde_json::json!({ "id": args.id });
            client
                .admin_request("cluster_remove_node", body, bytes::Bytes::new())
                .await?;
            writeln!(
                std::io::stdout(),
                "node {} removed; stop it (its data directory is no longer needed)",
                args.id
            )?;
            Ok(())
        }
    }
}

/// Where `init` keeps the cluster CA's key, to issue certificates for
/// nodes added later. Keep it offline once the cluster is complete.
const CA_KEY_FILE: &str = "cluster-ca.key";

fn init(args: &InitArgs) -> anyhow::Result<()> {
    if args.nodes.is_empty() {
        anyhow::bail!("--nodes needs at least one address");
    }
    if args.dir.join(CA_KEY_FILE).exists() {
        anyhow::bail!(
            "{} already holds a cluster; remove it to start over",
            args.dir.display()
        );
    }
    let n = args.nodes.len();
    if let Some(r) = args.replication_factor
        && args.groups == 1
        && (r as usize) < n
    {
        anyhow::bail!(
            "--replication-factor {r} with {n} nodes needs --groups 2 or more: group 0, the \
             cluster's metadata, has every node, and the other groups have {r} each"
        );
    }
    let ca = ClusterCa::generate()?;
    let token = crate::auth::new_token();
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    write_file(&args.dir.join(CA_KEY_FILE), &ca.key_pem, true)?;
    write_file(&args.dir.join(CA_FILE), &ca.cert_pem, false)?;
    let mut out = std::io::stdout().lock();
    for (i, addr) in args.nodes.iter().enumerate() {
        let id = i as u64 + 1;
        make_node(&ca, &token, &args.dir, id, *addr, &args.nodes, &args.hosts)?;
        if let Some(r) = args.replication_factor {
            let made = args.dir.join(format!("n{id}"));
            write_file(
                &made.join(crate::cluster::serve::REPLICATION_FILE),
                &format!("{r} {n}\n"),
                false,
            )?;
        }
        let _ = writeln!(
            out,
            "{}",
            serve_line(&args.dir, id, *addr, &args.nodes, false, args.groups)
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

fn write_file(path: &std::path::Path, text: &str, private: bool) -> anyhow::Result<()> {
    if private {
        crate::auth::write_private(path, text.as_bytes())
    } else {
        std::fs::write(path, text)
    }
    .with_context(|| format!("writing {}", path.display()))
}

fn list(nodes: &[SocketAddr]) -> String {
    nodes
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn serve_line(
    dir: &std::path::Path,
    id: u64,
    addr: SocketAddr,
    nodes: &[SocketAddr],
    join: bool,
    groups: u32,
) -> String {
    format!(
        "switchyard serve --data {} --listen {addr} --node-id {id} --cluster {}{}{}",
        dir.join(format!("n{id}")).display(),
        list(nodes),
        if groups > 1 {
            format!(" --groups {groups}")
        } else {
            String::new()
        },
        if join { " --join" } else { "" }
    )
}

/// Makes node `id`'s data directory under `dir`.
pub(crate) fn make_node(
    ca: &ClusterCa,
    token: &str,
    dir: &std::path::Path,
    id: u64,
    addr: SocketAddr,
    nodes: &[SocketAddr],
    extra_hosts: &[String],
) -> anyhow::Result<()> {
    let dir = dir.join(format!("n{id}"));
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
    hosts.extend(extra_hosts.iter().cloned());
    hosts.sort();
    hosts.dedup();
    let (cert, key) = ca.issue_pem(id, &hosts)?;
    // cert.pem is the node's chain (its certificate, then the CA's): what
    // it presents, and what the CLI beside it trusts.
    write_file(
        &dir.join("cert.pem"),
        &format!("{cert}{}", ca.cert_pem),
        false,
    )?;
    write_file(&dir.join("key.pem"), &key, true)?;
    write_file(&dir.join(CA_FILE), &ca.cert_pem, false)?;
    write_file(
        &dir.join("admin.token"),
        &format!("{}\n", token.trim()),
        true,
    )?;
    write_file(&dir.join(ADDRS_FILE), &format!("{}\n", list(nodes)), false)?;
    Ok(())
}

async fn add_node(args: AddNodeArgs) -> anyhow::Result<()> {
    let read = |name: &str| {
        let p = args.dir.join(name);
        std::fs::read_to_string(&p).with_context(|| {
            format!(
                "reading {} (the directory `cluster init` made)",
                p.display()
            )
        })
    };
    let ca = ClusterCa {
        cert_pem: read(CA_FILE)?,
        key_pem: read(CA_KEY_FILE)?,
    };
    // Nodes are n1, n2, ...: the new one is the next number.
    let mut id = 1;
    while args.dir.join(format!("n{id}")).exists() {
        id += 1;
    }
    let first = args.dir.join("n1");
    let token = std::fs::read_to_string(first.join("admin.token"))
        .with_context(|| format!("reading {}", first.join("admin.token").display()))?;
    let mut nodes = read_addrs(&first.join(ADDRS_FILE))?;
    nodes.push(args.node_addr);
    // The cluster is asked first: the new node needs its number of groups,
    // and an unreachable cluster should leave no directory behind.
    let client = args.connect.connect().await?;
    let groups = client.server_info().groups.max(1);
    // And its replication factor, which the new node must share (it
    // decides which groups a node joins and where replicas move).
    let status = client
        .admin_request("cluster_status", serde_json::json!({}), bytes::Bytes::new())
        .await?;
    let replication = &status["replication"];
    let (factor, formed_with) = (
        replication["factor"].as_u64(),
        replication["formed_with"].as_u64(),
    );
    make_node(&ca, &token, &args.dir, id, args.node_addr, &nodes, &[])?;
    let made = args.dir.join(format!("n{id}"));
    if let (Some(f), Some(n)) = (factor, formed_with) {
        write_file(
            &made.join(crate::cluster::serve::REPLICATION_FILE),
            &format!("{f} {n}\n"),
            false,
        )?;
    }
    for i in 1..id {
        let d = args.dir.join(format!("n{i}"));
        if d.exists() {
            write_file(&d.join(ADDRS_FILE), &format!("{}\n", list(&nodes)), false)?;
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "made {}; start node {id} with:",
        args.dir.join(format!("n{id}")).display()
    )?;
    writeln!(
        out,
        "{}",
        serve_line(&args.dir, id, args.node_addr, &nodes, true, groups)
    )?;
    let sized = factor.is_some_and(|f| f != 0 && f < nodes.len() as u64);
    if groups > 1 && sized {
        writeln!(
            out,
            "waiting for it to catch up and join group 0 as a voter (the other groups keep \
             their {} replicas; `cluster remove-node` of another node moves them here)...",
            factor.unwrap_or(0)
        )?;
    } else if groups > 1 {
        writeln!(
            out,
            "waiting for it to catch up and join each of the {groups} groups as a voter..."
        )?;
    } else {
        writeln!(out, "waiting for it to catch up and join as a voter...")?;
    }
    out.flush()?;
    drop(out);
    let body = serde_json::json!({ "id": id, "addr": args.node_addr });
    client
        .admin_request("cluster_add_node", body, bytes::Bytes::new())
        .await?;
    writeln!(std::io::stdout(), "node {id} joined the cluster")?;
    Ok(())
}

async fn move_replica(args: MoveReplicaArgs) -> anyhow::Result<()> {
    let client = args.connect.connect().await?;
    let started = std::time::Instant::now();
    let v = client.move_replica(args.group, args.from, args.to).await?;
    let replicas: Vec<String> = voters(&v).iter().map(|r| r.id.to_string()).collect();
    writeln!(
        std::io::stdout(),
        "group {}: replica moved from node {} to node {} ({} ms); replicas now {}",
        args.group,
        args.from,
        v["moved_to"],
        started.elapsed().as_millis(),
        replicas.join(", ")
    )?;
    client.close().await;
    Ok(())
}

async fn step_down(args: StepDownArgs) -> anyhow::Result<()> {
    let client = args.connect.connect().await?;
    let before = client
        .admin_request("cluster_status", serde_json::json!({}), bytes::Bytes::new())
        .await?["leader"]
        .as_u64();
    let started = std::time::Instant::now();
    let body = serde_json::json!({ "to": args.to });
    let leader = match client
        .admin_request("cluster_step_down", body, bytes::Bytes::new())
        .await
    {
        Ok(v) => v["leader"].as_u64(),
        // The old leader's router stops as leadership leaves it; it
        // answers first, but should the answer be lost on the way, ask
        // the cluster (the client follows to the new leader).
        Err(e) if e.code().is_none_or(|c| c == ErrorCode::ShuttingDown) => {
            moved_from(&client, before).await
        }
        Err(e) => return Err(e.into()),
    };
    let Some(leader) = leader else {
        anyhow::bail!("leadership did not move within 10 s; see `switchyard cluster status`");
    };
    if let Some(to) = args.to.filter(|&to| to != leader) {
        anyhow::bail!("leadership moved to node {leader}, not to node {to}");
    }
    if before == Some(leader) {
        writeln!(std::io::stdout(), "node {leader} leads already")?;
        return Ok(());
    }
    writeln!(
        std::io::stdout(),
        "leadership moved from node {} to node {leader} in {} ms",
        before.map_or("?".into(), |b| b.to_string()),
        started.elapsed().as_millis()
    )?;
    Ok(())
}

async fn drain(args: DrainArgs, drained: bool) -> anyhow::Result<()> {
    let client = args.connect.connect().await?;
    let node = args.node;
    client.drain_node(node, drained).await?;
    let mut out = std::io::stdout();
    if !drained {
        writeln!(
            out,
            "node {node} is no longer drained; it is handed its share of leaderships again"
        )?;
        return Ok(());
    }
    if args.no_wait {
        writeln!(out, "node {node} is drained; its leaderships move off it")?;
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut said = None;
    loop {
        // Each group's leader as the node answering sees it.
        let led = match client
            .admin_request("cluster_status", serde_json::json!({}), bytes::Bytes::new())
            .await
        {
            Ok(s) => Some(led_by(&s, node)),
            // The answering leader may be the drained node, handing over.
            Err(e) if e.code().is_none_or(|c| c == ErrorCode::ShuttingDown) => None,
            Err(e) => return Err(e.into()),
        };
        match led {
            Some(led) if led.is_empty() => break,
            Some(led) if said.as_ref() != Some(&led) => {
                writeln!(out, "node {node} still leads group(s) {led:?}; waiting")?;
                said = Some(led);
            }
            _ => {}
        }
        if started.elapsed() > args.timeout {
            anyhow::bail!(
                "node {node} still leads group(s) {:?} after {:?}: no other voter took them \
                 (down, or behind? see `switchyard cluster status`); it stays drained and \
                 hands them over when one can",
                said.unwrap_or_default(),
                args.timeout
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    writeln!(
        out,
        "node {node} is drained: it leads no group ({} ms)",
        started.elapsed().as_millis()
    )?;
    Ok(())
}

/// The groups `node` leads in a `cluster_status` answer: every group's
/// where the answer lists them, else the one group's.
fn led_by(status: &serde_json::Value, node: u64) -> Vec<u64> {
    match status["groups"].as_array() {
        Some(groups) => groups
            .iter()
            .filter(|g| g["leader"].as_u64() == Some(node))
            .filter_map(|g| g["group"].as_u64())
            .collect(),
        None if status["leader"].as_u64() == Some(node) => vec![0],
        None => Vec::new(),
    }
}

/// The leader once it is another than `before`, asked for 10 s.
async fn moved_from(client: &crate::client::Client, before: Option<u64>) -> Option<u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Ok(s) = client
            .admin_request("cluster_status", serde_json::json!({}), bytes::Bytes::new())
            .await
            && let Some(l) = s["leader"].as_u64()
            && Some(l) != before
        {
            return Some(l);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    None
}

/// A number, or `-` where the leader has heard nothing (a node down).
fn dash(v: &serde_json::Value) -> String {
    if v.is_null() {
        "-".into()
    } else {
        v.to_string()
    }
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let client = args.connect.connect().await?;
    let mut v = client
        .admin_request("cluster_status", serde_json::json!({}), bytes::Bytes::new())
        .await?;
    // Each group as its own leader sees it: only a group's leader knows
    // how far each of its members is behind (a group whose leader does
    // not answer keeps the view of the node asked first).
    let groups = v["groups"].as_array().map_or(0, Vec::len);
    for g in 1..groups {
        if let Ok(mut s) = client.group_status(g as u32).await {
            if let Some(o) = s.as_object_mut() {
                o.remove("groups");
            }
            v["groups"][g] = s;
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    print_status(&v, &mut out)?;
    Ok(())
}

/// One voter of a group, as the group's leader sees it.
pub(super) struct Voter {
    pub id: u64,
    /// It holds every committed entry.
    pub in_sync: bool,
    /// Entries its log is behind the leader's; none while it does not
    /// answer (or where its lag is unknown: not asked of the leader).
    pub behind: Option<u64>,
}

/// The voters of a group, from its status (`cluster_status`'s JSON).
pub(super) fn voters(group: &serde_json::Value) -> Vec<Voter> {
    let committed = group["committed"].as_u64().unwrap_or(0);
    group["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["role"] != "learner")
        .map(|n| Voter {
            id: n["id"].as_u64().unwrap_or(0),
            in_sync: n["matched"].as_u64().is_some_and(|m| m >= committed),
            behind: n["behind"].as_u64(),
        })
        .collect()
}

/// How many of a group's voters are in sync, of how many (`None` where
/// the lag of its members is not known: not asked of its leader).
pub(super) fn in_sync(group: &serde_json::Value) -> Option<(usize, usize)> {
    let voters = voters(group);
    if voters.iter().all(|v| v.behind.is_none()) {
        return None;
    }
    Some((voters.iter().filter(|v| v.in_sync).count(), voters.len()))
}

/// A node's role in `cluster status`, marked where it is drained.
fn role(n: &serde_json::Value) -> String {
    let role = n["role"].as_str().unwrap_or("");
    if n["drained"] == true {
        format!("{role} (drained)")
    } else {
        role.to_string()
    }
}

/// `cluster status` as text.
fn print_status(v: &serde_json::Value, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "leader: node {} (term {}), committed {}",
        v["leader"], v["term"], v["committed"]
    )?;
    writeln!(
        out,
        "last answer from a majority: {} ms ago; snapshot at {}, log purged to {}",
        dash(&v["quorum_ack_ms"]),
        dash(&v["snapshot"]),
        dash(&v["purged"])
    )?;
    writeln!(
        out,
        "{:<6} {:<22} {:<18} {:>12} {:>10}",
        "node", "address", "role", "matched", "behind"
    )?;
    for n in v["nodes"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "{:<6} {:<22} {:<18} {:>12} {:>10}",
            n["id"].to_string(),
            n["addr"].as_str().unwrap_or(""),
            role(n),
            dash(&n["matched"]),
            dash(&n["behind"])
        )?;
    }
    // A node of several groups: each group as that node sees it.
    if let Some(groups) = v["groups"].as_array() {
        writeln!(out, "groups, as node {} sees them:", v["node"])?;
        writeln!(
            out,
            "{:<6} {:<7} {:>6} {:>12} {:>12} {:>8}  replicas",
            "group", "leader", "term", "committed", "last log", "in sync"
        )?;
        for g in groups {
            // The group's voters: where its topics are kept.
            let replicas: Vec<String> = voters(g).iter().map(|v| v.id.to_string()).collect();
            writeln!(
                out,
                "{:<6} {:<7} {:>6} {:>12} {:>12} {:>8}  {}",
                g["group"].to_string(),
                dash(&g["leader"]),
                dash(&g["term"]),
                dash(&g["committed"]),
                dash(&g["last_log"]),
                in_sync(g).map_or("-".into(), |(s, n)| format!("{s}/{n}")),
                if replicas.is_empty() {
                    "-".to_string()
                } else {
                    replicas.join(",")
                }
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lists_the_groups_of_a_node_of_several() {
        let node = |id: u64, role: &str| serde_json::json!({ "id": id, "addr": "127.0.0.1:7400", "role": role, "matched": 9, "behind": 0 });
        let group = |g: u32, leader: u64| serde_json::json!({ "group": g, "leader": leader, "term": 2, "committed": 9, "last_log": 9 });
        let mut v = serde_json::json!({
            "node": 1, "leader": 1, "term": 2, "committed": 9, "last_log": 9, "group": 0,
            "nodes": [node(1, "leader"), node(2, "follower")],
        });
        let mut one = Vec::new();
        print_status(&v, &mut one).unwrap();
        let one = String::from_utf8(one).unwrap();
        assert!(
            one.starts_with("leader: node 1 (term 2), committed 9"),
            "{one}"
        );
        assert!(!one.contains("groups"), "{one}");

        // Group 1 as its leader sees it: node 1 is behind.
        let mut led = group(1, 3);
        led["nodes"] = serde_json::json!([
            node(3, "leader"),
            { "id": 1, "role": "follower", "matched": 5, "behind": 4 },
            node(2, "follower"),
        ]);
        v["groups"] = serde_json::json!([group(0, 1), led, group(2, 2)]);
        let mut several = Vec::new();
        print_status(&v, &mut several).unwrap();
        let several = String::from_utf8(several).unwrap();
        let rows: Vec<Vec<&str>> = several
            .lines()
            .skip_while(|l| !l.starts_with("groups, as node 1 sees them"))
            .skip(2)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                ["0", "1", "2", "9", "9", "-", "-"],
                ["1", "3", "2", "9", "9", "2/3", "3,1,2"],
                ["2", "2", "2", "9", "9", "-", "-"]
            ],
            "{several}"
        );
    }
}
