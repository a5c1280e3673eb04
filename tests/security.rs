//! Principals against a real router: every operation of the protocol with
//! no credential, a wrong token, a revoked token, a principal missing the
//! grant, and the right grant; mutual TLS; plugins acting with their
//! deployer's rights; revocation under load; quotas; and the refusal to
//! listen beyond loopback with no principal.
//!
//! The bug these guard against: before principals, any client that reached
//! the port could read every topic, move other teams' offsets, purge dead
//! letters, deploy plugins and delete topics.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use serde_json::json;
use switchyard::client::{Client, ClientConfig, ClientError, QueueOptions, SubscribeOptions};
use switchyard::protocol::{ErrorCode, Frame, Record, StartPosition, SubscribeMode};
use switchyard::server::{Router, StartError};
use switchyard::transport::FrameReader;

/// One request of the protocol, and the grant that allows it.
#[derive(Debug, Clone, Copy)]
enum Op {
    CreateTopic,
    DeleteTopic,
    DescribeTopic,
    Publish,
    SubscribeStream,
    SubscribeQueue,
    SubscribeFeed,
    SetPolicy,
    ReadPolicy,
    Deploy,
    ShowPlugin,
    Rollback,
    RemovePlugin,
    TestPlugin,
    KvGet,
    Feeds,
    DlqList,
    DlqRedrive,
    DlqPurge,
    TokenCreate,
    TokenList,
    TokenRevoke,
    Grant,
    Revoke,
}

const OPS: [Op; 24] = [
    Op::CreateTopic,
    Op::DeleteTopic,
    Op::DescribeTopic,
    Op::Publish,
    Op::SubscribeStream,
    Op::SubscribeQueue,
    Op::SubscribeFeed,
    Op::SetPolicy,
    Op::ReadPolicy,
    Op::Deploy,
    Op::ShowPlugin,
    Op::KvGet,
    Op::Rollback,
    Op::RemovePlugin,
    Op::TestPlugin,
    Op::Feeds,
    Op::DlqList,
    Op::DlqRedrive,
    Op::DlqPurge,
    Op::TokenCreate,
    Op::TokenList,
    Op::Grant,
    Op::Revoke,
    Op::TokenRevoke,
];

impl Op {
    /// The grant that allows this operation, and nothing broader.
    fn grant(self) -> &'static str {
        match self {
            Op::CreateTopic => "topic-admin:fresh",
            Op::DeleteTopic => "topic-admin:doomed",
            Op::DescribeTopic | Op::ReadPolicy | Op::Feeds => "consume:orders",
            Op::Publish => "publish:orders",
            Op::SubscribeStream => "consume:orders@billing",
            Op::SubscribeQueue => "consume:jobs@workers",
            Op::SubscribeFeed => "consume:feed@dash",
            Op::SetPolicy => "topic-admin:jobs",
            Op::Deploy | Op::ShowPlugin | Op::Rollback | Op::RemovePlugin | Op::TestPlugin => {
                "plugin-admin:orders"
            }
            Op::KvGet => "plugin-admin:orders",
            Op::DlqList | Op::DlqRedrive | Op::DlqPurge => "dlq-admin:jobs",
            Op::TokenCreate | Op::TokenList | Op::TokenRevoke | Op::Grant | Op::Revoke => {
                "cluster-admin:*"
            }
        }
    }

    /// Runs the operation as `c`; `Ok` if the router accepted it.
    async fn run(self, c: &Client) -> Result<(), ClientError> {
        let admin = |op: &'static str, body: serde_json::Value| async move {
            c.admin_request(op, body, Bytes::new()).await.map(drop)
        };
        match self {
            Op::CreateTopic => c.create_topic("fresh", 1).await.map(drop),
            Op::DeleteTopic => c.delete_topic("doomed").await,
            Op::DescribeTopic => c.describe_topic("orders").await.map(drop),
            Op::Publish => c.publish("orders", Record::new("x")).await.map(drop),
            Op::SubscribeStream => {
                let mut s = c
                    .subscribe(SubscribeOptions::new("orders").group("billing"))
                    .await?;
                // Reading proves delivery works; one record is enough.
                take(&mut s, 1, 10).await;
                Ok(())
            }
            Op::SubscribeQueue => c
                .subscribe_queue(QueueOptions::new("jobs", "workers").prefetch(1))
                .await
                .map(drop),
            Op::SubscribeFeed => c
                .subscribe(
                    SubscribeOptions::new("feed")
                        .group("dash")
                        .follow(["k".to_string()]),
                )
                .await
                .map(drop),
            Op::SetPolicy => c
                .set_topic_policy("jobs", json!({ "max_attempts": 7 }))
                .await
                .map(drop),
            Op::ReadPolicy => c.topic_policy("orders").await.map(drop),
            Op::Deploy => c
                .deploy_plugin(
                    plugin_wasm("route_by_header"),
                    json!({ "name": "by-region", "hook": "route", "topic": "orders",
                            "deadline_ms": 1000, "config": { "header": "region", "prefix": "orders." } }),
                )
                .await
                .map(drop),
            Op::ShowPlugin => admin("show", json!({ "name": "by-region" })).await,
            Op::Rollback => admin("rollback", json!({ "name": "by-region" })).await,
            Op::RemovePlugin => admin("remove", json!({ "name": "by-region" })).await,
            Op::TestPlugin => c
                .admin_request(
                    "test",
                    json!({ "hook": "route", "topic": "orders", "count": 5 }),
                    plugin_wasm("route_by_header").into(),
                )
                .await
                .map(drop),
            Op::KvGet => admin("kv-get", json!({ "name": "by-region", "key": "k" })).await,
            Op::Feeds => admin("feeds", json!({ "topic": "orders" })).await,
            Op::DlqList => c.dlq_list("jobs", 10).await.map(drop),
            Op::DlqRedrive => c.dlq_redrive("jobs", None).await.map(drop),
            Op::DlqPurge => c.dlq_purge("jobs").await.map(drop),
            Op::TokenCreate => c.create_token("minted", &["publish:orders"]).await.map(drop),
            Op::TokenList => admin("auth-token-list", json!({})).await,
            Op::TokenRevoke => c.revoke_token("victim").await,
            Op::Grant => c.grant("victim", &["publish:*"]).await,
            Op::Revoke => c.revoke_grant("victim", &["consume:orders"]).await,
        }
    }
}

/// Everything an operation of the matrix could change, as the admin sees it.
async fn snapshot(admin: &Client) -> serde_json::Value {
    let topics: Vec<_> = admin
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| {
            let ends: Vec<_> = t.partitions.iter().map(|p| (p.start, p.end)).collect();
            json!([t.name, ends])
        })
        .collect();
    let plugins: Vec<_> = admin
        .admin_request("list", json!({}), Bytes::new())
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!([p["name"], p["live_version"], p["versions"]]))
        .collect();
    json!({
        "topics": topics,
        "plugins": plugins,
        "jobs_policy": admin.topic_policy("jobs").await.unwrap(),
        "dlq": admin.dlq_list("jobs", 100).await.unwrap()["total"],
        "principals": admin.admin_request("auth-token-list", json!({}), Bytes::new()).await.unwrap(),
        "billing_offsets": admin.queue_stats(None).await.unwrap(),
    })
}

/// A router with the matrix's world: topics, a plugin with two versions,
/// a dead letter, a group with a committed offset, and principal `victim`.
async fn world() -> (TestRouter, Arc<Client>) {
    let r = start_router().await;
    let a = r.client().await;
    for t in ["orders", "orders.eu", "jobs", "doomed", "feed"] {
        a.create_topic(t, 1).await.unwrap();
    }
    a.set_topic_policy("feed", json!({ "fanout": "on-write" }))
        .await
        .unwrap();
    a.set_topic_policy("jobs", json!({ "max_attempts": 1 }))
        .await
        .unwrap();
    for v in ["a", "b"] {
        a.deploy_plugin(
            plugin_wasm("route_by_header"),
            json!({ "name": "by-region", "hook": "route", "topic": "orders", "deadline_ms": 1000,
                    "config": { "header": "region", "prefix": "orders.", "v": v } }),
        )
        .await
        .unwrap();
    }
    for i in 0..3 {
        a.publish("orders", Record::new(format!("o{i}")))
            .await
            .unwrap();
    }
    // One dead letter and one job still waiting.
    a.publish("jobs", Record::new("doomed-job")).await.unwrap();
    let mut q = a
        .subscribe_queue(QueueOptions::new("jobs", "dlq-maker").prefetch(1))
        .await
        .unwrap();
    let m = take(&mut q, 1, 10).await.remove(0);
    q.nack(&m, false, "bad", "bad").await.unwrap();
    q.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.dlq_list("jobs", 10).await.unwrap()["total"] != 1 {
        assert!(tokio::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.publish("jobs", Record::new("waiting-job")).await.unwrap();
    a.create_token("victim", &["consume:orders"]).await.unwrap();
    (r, a)
}

async fn as_token(r: &TestRouter, token: &str) -> Result<Client, ClientError> {
    Client::connect(
        ClientConfig::new(r.addr)
            .with_ca_file(&r.cert)
            .with_token(token),
    )
    .await
}

fn code(r: Result<(), ClientError>) -> Option<ErrorCode> {
    r.err().and_then(|e| e.code())
}

#[tokio::test]
async fn every_operation_needs_its_grant_and_changes_nothing_without_it() {
    let (r, admin) = world().await;
    // A principal with grants on everything except what each operation needs.
    let unrelated = [
        "publish:other",
        "consume:other@billing",
        "consume:orders@other-group",
        "topic-admin:other",
        "plugin-admin:other",
        "dlq-admin:other",
    ];
    let outsider = admin.create_token("outsider", &unrelated).await.unwrap();
    let outsider = as_token(&r, &outsider).await.unwrap();
    for op in OPS {
        let before = snapshot(&admin).await;
        let got = code(op.run(&outsider).await);
        // Reading a topic needs a grant naming it: the outsider has one for
        // `orders` (another group), which lets it see but not consume.
        let seeing = matches!(op, Op::DescribeTopic | Op::ReadPolicy | Op::Feeds);
        if seeing {
            assert_eq!(
                got, None,
                "{op:?}: a grant naming the topic lets it be described"
            );
            continue;
        }
        assert_eq!(
            got,
            Some(ErrorCode::Forbidden),
            "{op:?} without {}",
            op.grant()
        );
        assert_eq!(
            snapshot(&admin).await,
            before,
            "{op:?} changed state while forbidden"
        );
    }

    // The right grant, and only it, allows each operation.
    for (i, op) in OPS.into_iter().enumerate() {
        let name = format!("holder-{i}");
        let token = admin.create_token(&name, &[op.grant()]).await.unwrap();
        let c = as_token(&r, &token).await.unwrap();
        let res = op.run(&c).await;
        assert!(res.is_ok(), "{op:?} with {}: {:?}", op.grant(), res.err());
        c.close().await;
    }
    // Whoever held the deploy grant is recorded as the deployer.
    let show = admin
        .admin_request("show", json!({ "name": "by-region" }), Bytes::new())
        .await;
    // The remove step above removed the plugin; its absence is the effect.
    assert_eq!(show.unwrap_err().code(), Some(ErrorCode::UnknownPlugin));
    assert!(admin.describe_topic("fresh").await.is_ok());
    assert!(admin.describe_topic("doomed").await.is_err());
}

/// Sends `Hello` with `token` and, without waiting for the answer, one
/// frame of every request kind; returns the answer to `Hello`.
async fn raw_hello_then_everything(r: &TestRouter, token: Option<String>) -> Frame {
    let conn = raw_connect(r).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = Frame::Hello {
        min_version: 1,
        max_version: 1,
        client: "raw".into(),
        token,
    };
    let mut bytes = hello.to_bytes().to_vec();
    for f in [
        Frame::CreateTopic {
            id: 1,
            name: "sneaky".into(),
            partitions: 1,
            retention_ms: 0,
            retention_bytes: 0,
        },
        Frame::DeleteTopic {
            id: 2,
            name: "doomed".into(),
        },
        Frame::AdminRequest {
            id: 3,
            op: "dlq-purge".into(),
            body: Bytes::from_static(br#"{"topic":"jobs"}"#),
            wasm: Bytes::new(),
        },
        Frame::AdminRequest {
            id: 4,
            op: "remove".into(),
            body: Bytes::from_static(br#"{"name":"by-region"}"#),
            wasm: Bytes::new(),
        },
        Frame::AdminRequest {
            id: 5,
            op: "auth-token-revoke".into(),
            body: Bytes::from_static(br#"{"name":"victim"}"#),
            wasm: Bytes::new(),
        },
    ] {
        bytes.extend_from_slice(&f.to_bytes());
    }
    let _ = send.write_all(&bytes).await;
    // Streams opened at once: a publish and a subscription.
    if let Ok((mut s, _)) = conn.open_bi().await {
        let mut buf = bytes::BytesMut::new();
        let mut w = switchyard::protocol::PublishBatchWriter::begin(&mut buf, 1, "orders");
        w.push(&mut buf, &Record::new("sneaky"));
        w.finish(&mut buf);
        let _ = s.write_all(&buf).await;
    }
    if let Ok((mut s, _)) = conn.open_bi().await {
        let sub = Frame::Subscribe {
            group: "billing".into(),
            topic: "orders".into(),
            start: StartPosition::Earliest,
            credits: 10,
            auto_commit: true,
            mode: SubscribeMode::Stream,
        };
        let _ = s.write_all(&sub.to_bytes()).await;
    }
    let mut reader = FrameReader::new(recv, 1 << 20);
    let f = tokio::time::timeout(Duration::from_secs(10), reader.next())
        .await
        .expect("router answered")
        .expect("frame decodes")
        .expect("an answer to Hello");
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    f
}

#[tokio::test]
async fn no_wrong_or_revoked_credential_is_refused_before_any_request() {
    let (r, admin) = world().await;
    let revoked = admin
        .create_token("short-lived", &["cluster-admin:*"])
        .await
        .unwrap();
    admin.revoke_token("short-lived").await.unwrap();
    let wrong = switchyard::auth::new_token();
    for (what, token) in [
        ("no credential", None),
        ("a wrong token", Some(wrong.clone())),
        ("a revoked token", Some(revoked.clone())),
    ] {
        let before = snapshot(&admin).await;
        // Through the client: refused at connect with the code.
        let e = match token.clone() {
            Some(t) => as_token(&r, &t).await.err(),
            None => Client::connect(ClientConfig::new(r.addr).with_ca_file(&r.cert))
                .await
                .err(),
        }
        .unwrap_or_else(|| panic!("{what}: connected"));
        assert_eq!(e.code(), Some(ErrorCode::Unauthenticated), "{what}: {e}");
        // Raw: every request kind pipelined behind Hello is not executed.
        let answer = raw_hello_then_everything(&r, token).await;
        match answer {
            Frame::Error { code, message, .. } => {
                assert_eq!(code, ErrorCode::Unauthenticated, "{what}: {message}");
            }
            other => panic!("{what}: expected Error, got {other:?}"),
        }
        assert_eq!(snapshot(&admin).await, before, "{what} changed state");
    }
    // The hint tells a user where the admin token is.
    let e = Client::connect(ClientConfig::new(r.addr).with_ca_file(&r.cert))
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("admin.token"), "{e}");
}

/// A CA and a client certificate with common name `cn` signed by it,
/// written as PEM files into `dir`: `(ca, cert, key)`.
fn client_pki(
    dir: &Path,
    tag: &str,
    cn: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, format!("{tag} CA"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, cn);
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join(format!("{tag}-ca.pem")),
        dir.join(format!("{tag}-{cn}.pem")),
        dir.join(format!("{tag}-{cn}.key")),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test]
async fn client_certificates_map_to_principals_and_other_cas_are_refused() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, alice_cert, alice_key) = client_pki(pki.path(), "ours", "alice");
    let (_, mallory_cert, mallory_key) = client_pki(pki.path(), "theirs", "alice");
    let r = start_router_with(|c| c.auth.client_ca = Some(ca.clone())).await;
    let admin = r.client().await;
    admin.create_topic("orders", 1).await.unwrap();
    admin.create_topic("secret", 1).await.unwrap();
    admin
        .grant("alice", &["consume:orders", "publish:orders"])
        .await
        .unwrap();

    let connect = |cert: &Path, key: &Path| {
        Client::connect(
            ClientConfig::new(r.addr)
                .with_ca_file(&r.cert)
                .with_client_cert(cert, key),
        )
    };
    // Signed by another CA (even with the same name): refused at the handshake.
    let e = connect(&mallory_cert, &mallory_key)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            e,
            ClientError::Connect { .. } | ClientError::ConnectionLost(_)
        ),
        "{e}"
    );

    let alice = connect(&alice_cert, &alice_key).await.unwrap();
    let me = alice.whoami().await.unwrap();
    assert_eq!(me["name"], "alice");
    assert_eq!(me["grants"], json!(["consume:orders", "publish:orders"]));
    alice
        .publish("orders", Record::new("from alice"))
        .await
        .unwrap();
    let e = alice
        .publish("secret", Record::new("no"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));
    assert!(
        e.to_string().contains("publish:secret"),
        "names the missing grant: {e}"
    );
    let topics = topic_names(&alice).await;
    assert_eq!(
        topics,
        ["orders"],
        "a principal lists only what its grants name"
    );
    // Clients without a certificate still use tokens.
    assert!(r.client().await.whoami().await.is_ok());
}

#[tokio::test]
async fn a_route_plugin_can_only_route_where_its_deployer_may_publish() {
    let r = start_router().await;
    let admin = r.client().await;
    for t in ["orders", "orders.eu", "orders.us"] {
        admin.create_topic(t, 1).await.unwrap();
    }
    let team = admin
        .create_token(
            "team",
            &["plugin-admin:orders", "publish:orders", "publish:orders.us"],
        )
        .await
        .unwrap();
    let team = as_token(&r, &team).await.unwrap();
    team.deploy_plugin(
        plugin_wasm("route_by_header"),
        json!({ "name": "by-region", "hook": "route", "topic": "orders", "deadline_ms": 1000,
                "config": { "header": "region", "prefix": "orders." } }),
    )
    .await
    .unwrap();
    let show = admin
        .admin_request("show", json!({ "name": "by-region" }), Bytes::new())
        .await
        .unwrap();
    assert_eq!(show["version_details"][0]["deployed_by"], "team", "{show}");
    assert_eq!(show["history"][0]["by"], "team", "{show}");

    // Even the admin's publish cannot be moved where the deployer may not go.
    let e = admin
        .publish(
            "orders",
            Record::new("eu order").with_header("region", "eu"),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PluginFailed), "{e}");
    assert!(e.to_string().contains("may not publish"), "{e}");
    assert_eq!(
        admin.describe_topic("orders.eu").await.unwrap().partitions[0].end,
        0
    );
    // Where it may go, it routes.
    admin
        .publish(
            "orders",
            Record::new("us order").with_header("region", "us"),
        )
        .await
        .unwrap();
    assert_eq!(
        admin.describe_topic("orders.us").await.unwrap().partitions[0].end,
        1
    );
    // The check follows the deployer's grants as they change.
    admin.grant("team", &["publish:orders.eu"]).await.unwrap();
    admin
        .publish(
            "orders",
            Record::new("eu order").with_header("region", "eu"),
        )
        .await
        .unwrap();
    assert_eq!(
        admin.describe_topic("orders.eu").await.unwrap().partitions[0].end,
        1
    );
}

#[tokio::test]
async fn a_revoked_consumer_stops_and_its_group_loses_nothing() {
    let r = start_router().await;
    let admin = r.client().await;
    admin.create_topic("jobs", 2).await.unwrap();
    let token = admin
        .create_token("worker", &["consume:jobs@workers"])
        .await
        .unwrap();
    const N: usize = 2_000;
    let mut pending = Vec::new();
    for chunk in (0..N).collect::<Vec<_>>().chunks(200) {
        let batch = chunk.iter().map(|i| Record::new(format!("{i}"))).collect();
        pending.push(admin.queue_batch("jobs", batch).await.unwrap());
    }
    for p in pending {
        p.await.unwrap();
    }
    let acked = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let worker = as_token(&r, &token).await.unwrap();
    let mut wq = worker
        .subscribe_queue(QueueOptions::new("jobs", "workers").prefetch(16))
        .await
        .unwrap();
    let (got_some_tx, got_some) = tokio::sync::oneshot::channel();
    let worker_acked = acked.clone();
    let worker_task = tokio::spawn(async move {
        let mut tx = Some(got_some_tx);
        let mut n = 0usize;
        loop {
            match tokio::time::timeout(Duration::from_secs(20), wq.next()).await {
                Ok(Some(Ok(m))) => {
                    if wq.ack(&m).await.is_err() {
                        return n;
                    }
                    worker_acked.lock().unwrap().insert(m.payload());
                    n += 1;
                    if n == 100 {
                        let _ = tx.take().unwrap().send(());
                    }
                    // Slow worker: the revocation lands mid-stream.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Ok(Some(Err(_))) | Ok(None) => return n,
                Err(_) => panic!("the revoked worker's subscription never ended"),
            }
        }
    });
    got_some.await.unwrap();
    admin.revoke_token("worker").await.unwrap();
    let worker_n = tokio::time::timeout(Duration::from_secs(20), worker_task)
        .await
        .expect("the revoked worker stopped")
        .unwrap();
    assert!((100..N).contains(&worker_n), "worker processed {worker_n}");
    assert_eq!(
        as_token(&r, &token).await.err().and_then(|e| e.code()),
        Some(ErrorCode::Unauthenticated)
    );
    // The rest of the group gets everything the revoked member did not ack.
    let mut q = admin
        .subscribe_queue(
            QueueOptions::new("jobs", "workers")
                .prefetch(256)
                .visibility(Duration::from_secs(2)),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < N {
        let m = tokio::time::timeout_at(deadline, q.next())
            .await
            .unwrap_or_else(|_| panic!("lost: {} of {N} acked", acked.lock().unwrap().len()))
            .unwrap()
            .unwrap();
        q.ack(&m).await.unwrap();
        acked.lock().unwrap().insert(m.payload());
    }
}

#[tokio::test]
async fn quotas_slow_or_refuse_a_principal_without_disconnecting_it() {
    let r = start_router().await;
    let admin = r.client().await;
    admin.create_topic("t", 1).await.unwrap();
    admin.create_topic("jobs", 1).await.unwrap();
    let v = admin
        .admin_request(
            "auth-token-create",
            json!({ "name": "small", "grants": ["publish:t", "consume:*"],
                    "quotas": { "publish_msgs_per_s": 500, "connections": 2,
                                "subscriptions": 1, "queue_in_flight": 5 } }),
            Bytes::new(),
        )
        .await
        .unwrap();
    let token = v["secret"].as_str().unwrap().to_string();
    let c = as_token(&r, &token).await.unwrap();

    // Publishing over the rate is slowed, never refused: all are stored,
    // and the router counted the waits.
    let batch: Vec<_> = (0..1_500).map(|i| Record::new(format!("{i}"))).collect();
    let acks = c.publish_batch("t", batch).await.unwrap();
    assert_eq!(acks.len(), 1_500);
    let me = c.whoami().await.unwrap();
    assert!(
        me["usage"]["throttled_batches"].as_u64().unwrap() > 0,
        "{me}"
    );

    // Connections: the third is refused with a retry hint; the others work.
    let c2 = as_token(&r, &token).await.unwrap();
    let e = as_token(&r, &token)
        .await
        .err()
        .expect("over the connection quota");
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");
    assert!(e.retry_after().is_some(), "{e}");
    c2.close().await;

    // Subscriptions: one at a time.
    for i in 0..20 {
        admin
            .publish("jobs", Record::new(format!("j{i}")))
            .await
            .unwrap();
    }
    let mut q = c
        .subscribe_queue(QueueOptions::new("jobs", "w").prefetch(100))
        .await
        .unwrap();
    let e = c
        .subscribe(SubscribeOptions::new("t").start(StartPosition::Earliest))
        .await
        .err()
        .expect("over the subscription quota");
    assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");
    // In flight: at most 5 unacked, though the prefetch asked for 100.
    let first = take(&mut q, 5, 10).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), q.next())
            .await
            .is_err(),
        "a sixth delivery arrived while five were unacked"
    );
    for m in &first {
        q.ack(m).await.unwrap();
    }
    assert_eq!(take(&mut q, 5, 10).await.len(), 5);
    let me = admin.whoami().await.unwrap();
    assert_eq!(me["name"], "admin");
}

#[tokio::test]
async fn listening_beyond_loopback_needs_a_principal() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.listen = "0.0.0.0:0".parse().unwrap();
    let e = Router::start(config.clone()).await.err().expect("refused");
    assert!(matches!(e, StartError::OpenToNetwork(_)), "{e}");
    let msg = e.to_string();
    for hint in [
        "auth token create",
        "--client-ca",
        "--allow-anonymous",
        "[auth]",
    ] {
        assert!(msg.contains(hint), "the message names {hint}: {msg}");
    }
    // The binary says the same and exits non-zero.
    let out = serve_until_exit(dir.path(), "0.0.0.0:0");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to listen on 0.0.0.0:0"), "{err}");
}

#[tokio::test]
async fn anonymous_access_is_explicit_and_limited_to_its_grants() {
    let r = start_router_with(|c| {
        c.auth.allow_anonymous = true;
        c.auth.anonymous_grants = vec![switchyard::auth::Grant::parse("consume:public.*").unwrap()];
    })
    .await;
    let admin = r.client().await;
    admin.create_topic("public.news", 1).await.unwrap();
    admin.create_topic("private", 1).await.unwrap();
    let anon = Client::connect(ClientConfig::new(r.addr).with_ca_file(&r.cert))
        .await
        .unwrap();
    assert_eq!(anon.whoami().await.unwrap()["name"], "anonymous");
    assert!(anon.describe_topic("public.news").await.is_ok());
    let e = anon.publish("private", Record::new("x")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));
}
