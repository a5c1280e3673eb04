//! What authentication costs a new connection: QUIC + TLS handshake,
//! `Hello`, the principal check, `HelloOk`, and one `whoami` round trip
//! (the connection is dropped, not drained: a graceful close waits out
//! QUIC's closing period, ~80 ms here, which would hide the rest). Three ways in:
//! a bearer token, a client certificate (mutual TLS), and anonymous access
//! on a router that allows it (no credential to check: the baseline).

#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchyard::client::{Client, ClientConfig};
use switchyard::server::{Router, RouterConfig};

/// A CA and a client certificate for `cn` signed by it, as PEM files.
fn client_pki(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "bench");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let p = (
        dir.join("ca.pem"),
        dir.join("client.pem"),
        dir.join("client.key"),
    );
    std::fs::write(&p.0, ca_cert.pem()).unwrap();
    std::fs::write(&p.1, cert.pem()).unwrap();
    std::fs::write(&p.2, key.serialize_pem()).unwrap();
    p
}

fn handshake(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = client_pki(pki.path());
    let router = rt.block_on(async {
        let mut config = RouterConfig {
            data: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            // Dropped connections linger until the router notices.
            max_connections: 1 << 20,
            idle_timeout_ms: 2_000,
            ..RouterConfig::default()
        };
        config.auth.allow_anonymous = true;
        config.auth.client_ca = Some(ca);
        Router::start(config).await.unwrap()
    });
    let base = ClientConfig::new(router.local_addr()).with_ca_file(router.cert_path());
    let ways = [
        ("token", base.clone().with_data_dir(dir.path())),
        ("anonymous", base.clone()),
        ("client_certificate", base.with_client_cert(&cert, &key)),
    ];
    let mut g = c.benchmark_group("connect_hello_close");
    g.sample_size(30);
    g.throughput(Throughput::Elements(1));
    for (name, cfg) in ways {
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let client = Client::connect(cfg.clone()).await.unwrap();
                    client.whoami().await.unwrap();
                })
            })
        });
    }
    g.finish();
    rt.block_on(router.shutdown());
}

criterion_group!(benches, handshake);
criterion_main!(benches);
