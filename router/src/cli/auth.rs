//! `switchyard auth ...`: tokens, grants, quotas and `whoami`.

use clap::Subcommand;

use super::ConnectArgs;
use crate::auth::{Grant, Quotas};

#[derive(Debug, Subcommand)]
pub(super) enum AuthCommand {
    /// Create, list and revoke bearer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Add grants (or quotas) to a principal; a new name makes a principal
    /// without a token, for a client certificate with that subject.
    Grant {
        /// The principal.
        name: String,
        /// CLASS:PATTERN, e.g. publish:orders.* or consume:orders.*@billing.
        grants: Vec<String>,
        /// NAME=VALUE; quotas: publish_msgs_per_s, publish_bytes_per_s,
        /// connections, subscriptions, queue_in_flight (`none` removes one).
        #[arg(long = "quota", value_name = "NAME=VALUE")]
        quotas: Vec<String>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Remove grants from a principal (its open connections are closed).
    Revoke {
        /// The principal.
        name: String,
        /// Grants to remove, as listed by `auth token list`.
        #[arg(required = true)]
        grants: Vec<String>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Who this CLI acts as: principal, grants, quotas and usage.
    Whoami {
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Print the SHA-256 of a token read from standard input, for
    /// `token_sha256` of a principal in the config file.
    Hash,
}

#[derive(Debug, Subcommand)]
pub(super) enum TokenCommand {
    /// Create a principal with a new token; prints the token once.
    Create {
        /// The principal's name.
        name: String,
        /// CLASS:PATTERN grants (classes: publish, consume, topic-admin,
        /// plugin-admin, dlq-admin, cluster-admin).
        #[arg(long = "grant", value_name = "CLASS:PATTERN")]
        grants: Vec<String>,
        /// NAME=VALUE quota (see `auth grant --help`).
        #[arg(long = "quota", value_name = "NAME=VALUE")]
        quotas: Vec<String>,
        /// Give an existing principal a new token; the old one stops
        /// working and its connections are closed.
        #[arg(long)]
        rotate: bool,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// List principals, their grants and quotas (never their tokens).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Remove a principal with its token and grants; its open connections
    /// are closed at once.
    Revoke {
        /// The principal.
        name: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

fn parse_grants(grants: &[String]) -> anyhow::Result<Vec<Grant>> {
    grants
        .iter()
        .map(|g| Grant::parse(g).map_err(anyhow::Error::msg))
        .collect()
}

fn parse_quotas(quotas: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    quotas
        .iter()
        .map(|q| {
            let (k, v) = q
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--quota {q}: write NAME=VALUE"))?;
            // Checked here too, for an error before connecting.
            Quotas::default().set(k, v).map_err(anyhow::Error::msg)?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

pub(super) async fn run(cmd: AuthCommand) -> anyhow::Result<()> {
    match cmd {
        AuthCommand::Token(TokenCommand::Create {
            name,
            grants,
            quotas,
            rotate,
            conn,
        }) => {
            let grants = parse_grants(&grants)?;
            let mut q = Quotas::default();
            for (k, v) in parse_quotas(&quotas)? {
                q.set(&k, &v).map_err(anyhow::Error::msg)?;
            }
            let c = conn.connect().await?;
            let v = c
                .admin_request(
                    "auth-token-create",
                    serde_json::json!({ "name": name, "grants": grants, "quotas": q, "rotate": rotate }),
                    bytes::Bytes::new(),
                )
                .await?;
            c.close().await;
            // The token alone on stdout, so `$(switchyard auth token create ...)` works.
            println!("{}", v["secret"].as_str().unwrap_or_default());
            eprintln!(
                "{} principal '{name}' with grants [{}]; the token above is shown only this once",
                if rotate { "new token for" } else { "created" },
                grant_list(&v)
            );
        }
        AuthCommand::Token(TokenCommand::List { json, conn }) => {
            let c = conn.connect().await?;
            let v = c
                .admin_request(
                    "auth-token-list",
                    serde_json::json!({}),
                    bytes::Bytes::new(),
                )
                .await?;
            c.close().await;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<24} {:<12} {:<6} GRANTS", "PRINCIPAL", "SOURCE", "TOKEN");
                for p in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<12} {:<6} {}",
                        p["name"].as_str().unwrap_or_default(),
                        p["source"].as_str().unwrap_or_default(),
                        if p["token"].as_bool() == Some(true) {
                            "yes"
                        } else {
                            "no"
                        },
                        grant_list(p)
                    );
                }
            }
        }
        AuthCommand::Token(TokenCommand::Revoke { name, conn }) => {
            let c = conn.connect().await?;
            c.revoke_token(&name).await?;
            c.close().await;
            println!(
                "revoked principal '{name}': its token no longer works and its connections are closed"
            );
        }
        AuthCommand::Grant {
            name,
            grants,
            quotas,
            conn,
        } => {
            if grants.is_empty() && quotas.is_empty() {
                anyhow::bail!("name at least one grant (CLASS:PATTERN) or --quota NAME=VALUE");
            }
            let grants = parse_grants(&grants)?;
            let quotas = parse_quotas(&quotas)?;
            let c = conn.connect().await?;
            let v = c
                .admin_request(
                    "auth-grant",
                    serde_json::json!({ "name": name, "grants": grants, "quotas": quotas }),
                    bytes::Bytes::new(),
                )
                .await?;
            c.close().await;
            println!("principal '{name}' now has grants [{}]", grant_list(&v));
        }
        AuthCommand::Revoke { name, grants, conn } => {
            let grants = parse_grants(&grants)?;
            let c = conn.connect().await?;
            let v = c
                .admin_request(
                    "auth-revoke",
                    serde_json::json!({ "name": name, "grants": grants }),
                    bytes::Bytes::new(),
                )
                .await?;
            c.close().await;
            println!("principal '{name}' now has grants [{}]", grant_list(&v));
        }
        AuthCommand::Whoami { conn } => {
            let c = conn.connect().await?;
            let v = c.whoami().await?;
            c.close().await;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        AuthCommand::Hash => {
            let mut token = String::new();
            std::io::stdin().read_line(&mut token)?;
            println!("{}", crate::auth::hex(&crate::auth::hash_token(&token)));
        }
    }
    Ok(())
}

fn grant_list(v: &serde_json::Value) -> String {
    v["grants"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
