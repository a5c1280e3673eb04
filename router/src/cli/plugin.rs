//! `switchyard plugin ...`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use bytes::Bytes;
use clap::Subcommand;
use serde_json::json;

use super::ConnectArgs;
use super::subscribe::parse_start;
use crate::protocol::StartPosition;

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE"))
}

#[derive(Debug, Subcommand)]
pub(super) enum PluginCommand {
    /// Validate a component and make it the live version of a plugin.
    Deploy {
        /// The component (.wasm) to deploy.
        file: PathBuf,
        /// Plugin name; deploying an existing name adds a version.
        #[arg(long)]
        name: String,
        /// route, filter, priority, fanout or retry.
        #[arg(long)]
        hook: String,
        /// Topic to bind to, or a pattern ending in '*' ('payments.*')
        /// for every topic it matches, now and later.
        #[arg(long)]
        topic: String,
        /// Consumer group (filters only; default: every subscription
        /// without a filter of its own group).
        #[arg(long)]
        group: Option<String>,
        /// Configuration the plugin reads, KEY=VALUE; repeat for more.
        #[arg(long = "config", value_parser = parse_kv)]
        config: Vec<(String, String)>,
        /// On a trap, timeout or invalid decision: reject, dead-letter or bypass.
        #[arg(long, default_value = "reject")]
        on_failure: String,
        /// Per-call deadline in milliseconds.
        #[arg(long, default_value_t = 10)]
        deadline_ms: u64,
        /// Memory cap per instance in MiB.
        #[arg(long, default_value_t = 64)]
        memory_mb: u64,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// List plugins: binding, live version, calls, failures, p99 call time.
    List {
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Everything about a plugin, with each version's cut-over points.
    Show {
        /// Plugin name.
        name: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Make an earlier version live again.
    Rollback {
        /// Plugin name.
        name: String,
        /// Version (default: the one before the live version).
        #[arg(long)]
        to: Option<u32>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Unbind a plugin and delete its versions and store.
    Remove {
        /// Plugin name.
        name: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Dry run: what a component would decide for stored messages.
    Test {
        /// The component (.wasm).
        file: PathBuf,
        /// route, filter, priority or fanout.
        #[arg(long)]
        hook: String,
        /// Topic whose messages to read.
        #[arg(long)]
        topic: String,
        /// Group, as a filter would see it.
        #[arg(long)]
        group: Option<String>,
        /// Start at an offset or an RFC 3339 time (default: earliest).
        #[arg(long, value_parser = parse_start)]
        from: Option<StartPosition>,
        /// Messages to read.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Configuration, KEY=VALUE.
        #[arg(long = "config", value_parser = parse_kv)]
        config: Vec<(String, String)>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Scaffold a new plugin crate.
    New {
        /// Crate name (also its directory).
        name: String,
        /// route, filter, priority, fanout or retry.
        #[arg(long, default_value = "route")]
        hook: String,
        /// Where to create it (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Path to the switchyard-plugin SDK (default: the one this binary was built with).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

fn read_wasm(file: &Path) -> anyhow::Result<Bytes> {
    Ok(std::fs::read(file)
        .with_context(|| format!("reading {}", file.display()))?
        .into())
}

pub(super) async fn run(cmd: PluginCommand) -> anyhow::Result<()> {
    match cmd {
        PluginCommand::Deploy {
            file,
            name,
            hook,
            topic,
            group,
            config,
            on_failure,
            deadline_ms,
            memory_mb,
            conn,
        } => {
            let wasm = read_wasm(&file)?;
            let c = conn.connect().await?;
            let config: BTreeMap<_, _> = config.into_iter().collect();
            let r = c
                .deploy_plugin(
                    wasm,
                    json!({
                        "name": name, "hook": hook, "topic": topic, "group": group,
                        "config": config, "on_failure": on_failure,
                        "deadline_ms": deadline_ms, "memory_mb": memory_mb,
                    }),
                )
                .await?;
            println!(
                "deployed {} v{}: {} hook on topic {} (compiled in {} ms), live now",
                r["name"].as_str().unwrap_or_default(),
                r["version"],
                r["hook"].as_str().unwrap_or_default(),
                r["topic"].as_str().unwrap_or_default(),
                r["compile_ms"]
            );
            c.close().await;
        }
        PluginCommand::List { conn } => {
            let c = conn.connect().await?;
            let r = c.plugin_request("list", json!({}), Bytes::new()).await?;
            println!(
                "{:<24} {:<9} {:<24} {:>5} {:>12} {:>10} {:>10} {:>9}",
                "NAME", "HOOK", "BINDING", "LIVE", "VERSIONS", "CALLS", "FAILURES", "P99 µs"
            );
            for p in r.as_array().into_iter().flatten() {
                let binding = match p["group"].as_str() {
                    Some(g) => format!("{}/{}", p["topic"].as_str().unwrap_or_default(), g),
                    None => p["topic"].as_str().unwrap_or_default().to_string(),
                };
                let versions: Vec<String> = p["versions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.to_string())
                    .collect();
                println!(
                    "{:<24} {:<9} {:<24} {:>5} {:>12} {:>10} {:>10} {:>9}",
                    p["name"].as_str().unwrap_or_default(),
                    p["hook"].as_str().unwrap_or_default(),
                    binding,
                    p["live_version"]
                        .as_u64()
                        .map(|v| format!("v{v}"))
                        .unwrap_or("-".into()),
                    versions.join(","),
                    p["stats"]["calls"].as_u64().unwrap_or(0),
                    p["stats"]["failures"].as_u64().unwrap_or(0),
                    p["stats"]["p99_us"].as_u64().unwrap_or(0),
                );
            }
            c.close().await;
        }
        PluginCommand::Show { name, conn } => {
            let c = conn.connect().await?;
            let r = c
                .plugin_request("show", json!({ "name": name }), Bytes::new())
                .await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            c.close().await;
        }
        PluginCommand::Rollback { name, to, conn } => {
            let c = conn.connect().await?;
            let r = c
                .plugin_request("rollback", json!({ "name": name, "to": to }), Bytes::new())
                .await?;
            println!("{} is live at v{}", name, r["version"]);
            c.close().await;
        }
        PluginCommand::Remove { name, conn } => {
            let c = conn.connect().await?;
            c.plugin_request("remove", json!({ "name": name }), Bytes::new())
                .await?;
            println!("removed plugin {name}");
            c.close().await;
        }
        PluginCommand::Test {
            file,
            hook,
            topic,
            group,
            from,
            count,
            config,
            conn,
        } => {
            let wasm = read_wasm(&file)?;
            let c = conn.connect().await?;
            let (from_offset, from_time_ms) = match from {
                Some(StartPosition::Offset(o)) => (Some(o), None),
                Some(StartPosition::Timestamp(t)) => (None, Some(t)),
                Some(StartPosition::Latest) => {
                    anyhow::bail!("--from latest reads nothing; use an offset or a time")
                }
                Some(StartPosition::Earliest) | None => (None, None),
            };
            let config: BTreeMap<_, _> = config.into_iter().collect();
            let r = c
                .plugin_request(
                    "test",
                    json!({
                        "hook": hook, "topic": topic, "group": group, "count": count,
                        "from_offset": from_offset, "from_time_ms": from_time_ms, "config": config,
                    }),
                    wasm,
                )
                .await?;
            print_summary(&r);
            c.close().await;
        }
        PluginCommand::New {
            name,
            hook,
            dir,
            sdk,
        } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let sdk = sdk.unwrap_or_else(|| {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../plugin-sdk"))
            });
            super::scaffold::create(&dir, &name, &hook, &sdk)?;
            println!("created {} ({} hook)", dir.display(), hook);
            let steps = [
                (
                    format!("cd {} && cargo test", dir.display()),
                    "test natively",
                ),
                (
                    "cargo build --release --target wasm32-wasip2".to_string(),
                    "build the component",
                ),
            ];
            let width = steps.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
            for (cmd, what) in steps {
                println!("  {cmd:<width$}  # {what}");
            }
        }
    }
    Ok(())
}

fn print_summary(r: &serde_json::Value) {
    println!(
        "{} hook over {} messages of {}: {} calls",
        r["hook"].as_str().unwrap_or_default(),
        r["messages"],
        r["topic"].as_str().unwrap_or_default(),
        r["calls"]
    );
    for (k, v) in r["outcomes"].as_object().into_iter().flatten() {
        println!("  {v:>8}  {k}");
    }
    for (k, v) in r["failures"].as_object().into_iter().flatten() {
        println!("  {v:>8}  FAILED: {k}");
    }
    println!(
        "call time: p50 {} µs, p99 {} µs, max {} µs",
        r["call_us"]["p50"], r["call_us"]["p99"], r["call_us"]["max"]
    );
}
