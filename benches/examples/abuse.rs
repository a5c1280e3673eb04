//! A misbehaving client, to measure what it costs everyone else
//! (`docs/configuration.md`, Limits). Loopback only.
//!
//! ```text
//! # one connection starting 128 frames of 16 MiB and sending 15 MiB of each
//! cargo run --release -p switchyard-benches --example abuse -- partial --streams 128
//! # 1,100 connections that say Hello and then only keep alive
//! cargo run --release -p switchyard-benches --example abuse -- slots --connections 1100
//! ```
//!
//! Both hold on for `--hold` seconds (default 20) and print what the router
//! refused. `--data` names the router's data directory (certificate, and
//! admin token if there is one).

#![allow(missing_docs)]

use switchyard_benches::flag;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard::protocol::{ALPN, Frame};

fn endpoint(data: &str) -> anyhow::Result<quinn::Endpoint> {
    let mut roots = rustls::RootCertStore::empty();
    for c in switchyard::server::tls::load_certs(&std::path::Path::new(data).join("cert.pem"))? {
        roots.add(c)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    config.transport_config(Arc::new(transport));
    // `--bind 127.0.0.2` plays a client on another address than the
    // well-behaved ones on loopback.
    let bind = format!("{}:0", flag("--bind", "127.0.0.1"));
    let mut ep = quinn::Endpoint::client(bind.parse()?)?;
    ep.set_default_client_config(config);
    Ok(ep)
}

/// Connects and says Hello; `None` if the router refused.
async fn hello(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    token: Option<String>,
) -> Option<quinn::Connection> {
    let conn = ep.connect(addr, "localhost").ok()?.await.ok()?;
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    let f = Frame::Hello {
        min_version: 1,
        max_version: 1,
        client: "abuse".into(),
        token,
    };
    send.write_all(&f.to_bytes()).await.ok()?;
    let mut head = [0u8; 5];
    recv.read_exact(&mut head).await.ok()?;
    (head[4] == 0x02).then_some(conn)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let addr: SocketAddr = flag("--addr", "127.0.0.1:7400").parse()?;
    let data = flag("--data", "switchyard-data");
    let hold = Duration::from_secs(flag("--hold", "20").parse()?);
    let token = std::fs::read_to_string(std::path::Path::new(&data).join("admin.token"))
        .ok()
        .map(|t| t.trim().to_string());
    let ep = endpoint(&data)?;
    match mode.as_str() {
        "partial" => {
            let streams: usize = flag("--streams", "128").parse()?;
            let frame_mb: u32 = flag("--frame-mb", "16").parse()?;
            let conn = hello(&ep, addr, token)
                .await
                .ok_or_else(|| anyhow::anyhow!("refused at Hello"))?;
            let mut tasks = Vec::new();
            for _ in 0..streams {
                let conn = conn.clone();
                tasks.push(tokio::spawn(async move {
                    let Ok((mut s, _)) = conn.open_bi().await else {
                        return 0usize;
                    };
                    let announced = (frame_mb << 20) - 64;
                    let mut head = announced.to_be_bytes().to_vec();
                    head.push(0x20);
                    if s.write_all(&head).await.is_err() {
                        return 0;
                    }
                    let chunk = vec![0u8; 1 << 20];
                    let mut sent = 0;
                    for _ in 0..frame_mb - 1 {
                        if s.write_all(&chunk).await.is_err() {
                            break;
                        }
                        sent += chunk.len();
                    }
                    std::future::pending::<()>().await;
                    sent
                }));
            }
            tokio::time::sleep(hold).await;
            match conn.close_reason() {
                Some(r) => println!("partial: the router closed the connection: {r}"),
                None => println!("partial: {streams} unfinished frames held for {hold:?}"),
            }
        }
        "slots" => {
            let n: usize = flag("--connections", "1100").parse()?;
            let mut held = Vec::new();
            let mut refused = 0;
            for _ in 0..n {
                match hello(&ep, addr, token.clone()).await {
                    Some(c) => held.push(c),
                    None => refused += 1,
                }
            }
            println!("slots: {} held, {refused} refused", held.len());
            tokio::time::sleep(hold).await;
            let open = held.iter().filter(|c| c.close_reason().is_none()).count();
            println!("slots: {open} still open after {hold:?}");
        }
        other => anyhow::bail!("mode '{other}': partial or slots"),
    }
    Ok(())
}
