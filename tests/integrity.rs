//! Damage is detected and never served: a flipped byte in a stored record,
//! or a page of the database zeroed, ends a subscription with an error
//! that says where, and never delivers a record with the wrong bytes or
//! leaves a subscriber waiting forever.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{ChildRouter, connect};
use futures::StreamExt;
use redb::ReadableTable;
use switchyard::client::SubscribeOptions;
use switchyard::protocol::{ErrorCode, Record, StartPosition};

fn payload(i: usize) -> Bytes {
    Bytes::from(format!("rec-{i:06}-{}", "x".repeat(60)))
}

/// Publishes `n` records to a one-partition topic and stops the router
/// cleanly, so that the database file alone holds them.
async fn stored_router(data: &std::path::Path, n: usize) {
    let router = ChildRouter::spawn(data);
    let c = connect(router.addr, &router.cert).await;
    c.create_topic("t", 1).await.unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let recs = chunk.iter().map(|&i| Record::new(payload(i))).collect();
        for a in c.publish_batch("t", recs).await.unwrap() {
            assert_eq!(a.offset as usize, chunk[a.offset as usize - chunk[0]]);
        }
    }
    common::sigterm(&router.child);
    let mut router = router;
    router.child.wait().unwrap();
}

/// Reads the whole topic: returns the records delivered before the
/// subscription ended, and the error it ended with, if any. Fails the test
/// if a delivered record differs from what was published, or if nothing
/// happens for 10 s.
async fn read_all(
    data: &std::path::Path,
    n: usize,
) -> (usize, Option<switchyard::client::ClientError>) {
    let router = ChildRouter::spawn(data);
    let c = connect(router.addr, &router.cert).await;
    let mut sub = c
        .subscribe(
            SubscribeOptions::new("t")
                .start(StartPosition::Earliest)
                .prefetch(4096),
        )
        .await
        .unwrap();
    let mut got = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Some(Ok(m))) => {
                assert_eq!(
                    m.payload(),
                    payload(m.offset as usize),
                    "a damaged record was delivered"
                );
                got += 1;
                if got == n {
                    return (got, None);
                }
            }
            Ok(Some(Err(e))) => return (got, Some(e)),
            Ok(None) => panic!("the subscription ended without an error after {got} of {n}"),
            Err(_) => panic!("the subscription stalled after {got} of {n} records"),
        }
    }
}

#[tokio::test]
async fn a_flipped_byte_in_a_stored_record_is_an_error_not_a_wrong_record() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean");
    stored_router(&clean, 2000).await;
    let db = std::fs::read(clean.join("switchyard.redb")).unwrap();
    // Flip a byte inside the payloads of several records, one copy each.
    for (k, target) in [17usize, 640, 1333, 1999].into_iter().enumerate() {
        let needle = format!("rec-{target:06}-");
        let at = db
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .expect("record stored in the file");
        let copy = dir.path().join(format!("flip{k}"));
        std::fs::create_dir(&copy).unwrap();
        for f in [
            "switchyard.redb",
            "switchyard.journal",
            "cert.pem",
            "key.pem",
            "admin.token",
        ] {
            std::fs::copy(clean.join(f), copy.join(f)).unwrap();
        }
        let mut bytes = db.clone();
        bytes[at + 11 + k * 7] ^= 0x20;
        std::fs::write(copy.join("switchyard.redb"), &bytes).unwrap();
        let (got, err) = read_all(&copy, 2000).await;
        let err = err.unwrap_or_else(|| panic!("all {got} records delivered, one of them damaged"));
        assert_eq!(
            got, target,
            "every record before the damaged one, then the error"
        );
        assert_eq!(err.code(), Some(ErrorCode::Storage), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("offset {target}")) && msg.contains("checksum"),
            "{msg}"
        );
    }
}

/// A zeroed page inside the log: whatever redb makes of it (a panic, an
/// error, a missing range), the subscriber gets an error frame, never a
/// partial stream that stalls, and the router keeps serving.
#[tokio::test]
async fn a_zeroed_database_page_ends_the_subscription_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    stored_router(&data, 20_000).await;
    let path = data.join("switchyard.redb");
    let mut bytes = std::fs::read(&path).unwrap();
    let needle = b"rec-010000-";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    let page = at / 4096 * 4096;
    bytes[page..page + 4096].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    // redb may meet the page while it opens the file: then the router
    // refuses to start, naming the file and `check`.
    if let Err(stderr) = ChildRouter::try_spawn(&data) {
        assert!(
            stderr.contains("switchyard.redb") && stderr.contains("switchyard check"),
            "{stderr}"
        );
        return;
    }
    let (got, err) = read_all(&data, 20_000).await;
    let err = err.unwrap_or_else(|| panic!("all {got} records delivered past a zeroed page"));
    assert!(got < 20_000);
    assert_eq!(err.code(), Some(ErrorCode::Storage), "{err}");
    assert!(err.to_string().contains("switchyard check"), "{err}");
}

fn check(data: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(common::router_bin())
        .args(["check", "--data"])
        .arg(data)
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `switchyard check` verifies a stopped router's files: every record's
/// checksum, the journal, the tables against each other. It names what is
/// wrong and what to do, exits non-zero while problems remain, refuses a
/// running router's directory, and `--repair` fixes what it can without
/// losing acknowledged data.
#[tokio::test]
async fn check_verifies_a_stopped_routers_files_and_repairs_what_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    stored_router(&data, 2000).await;
    let (ok, out) = check(&data, &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("2000 record checksum(s) verified") && out.contains("ok"),
        "{out}"
    );

    // A running router's directory is refused, not read under its feet.
    {
        let _router = ChildRouter::spawn(&data);
        let (ok, out) = check(&data, &[]);
        assert!(!ok && out.contains("in use"), "{out}");
    }

    // Leftovers a crash or a bug could leave: a log row below the
    // partition's start and a feed reference past its end.
    {
        const LOG: redb::TableDefinition<(u32, u32, u64), &[u8]> =
            redb::TableDefinition::new("log");
        const PARTS: redb::TableDefinition<(u32, u32), (u64, u64, u64, u64)> =
            redb::TableDefinition::new("partitions");
        const INBOX: redb::TableDefinition<(u32, u32, u32, u64), ()> =
            redb::TableDefinition::new("inbox");
        let db = redb::Database::create(data.join("switchyard.redb")).unwrap();
        let w = db.begin_write().unwrap();
        {
            let mut parts = w.open_table(PARTS).unwrap();
            let (s, e, b, t) = parts.get((1, 0)).unwrap().unwrap().value();
            let first = w
                .open_table(LOG)
                .unwrap()
                .get((1, 0, 0))
                .unwrap()
                .unwrap()
                .value()
                .len() as u64
                - 8;
            parts.insert((1, 0), (s + 1, e, b - first, t)).unwrap();
            w.open_table(INBOX)
                .unwrap()
                .insert((1, 7, 0, 99_999), ())
                .unwrap();
        }
        w.commit().unwrap();
    }
    let (ok, out) = check(&data, &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("below their start") && out.contains("what to do"),
        "{out}"
    );
    assert!(
        out.contains("1 inbox and 0 key-index reference(s)"),
        "{out}"
    );
    let (ok, out) = check(&data, &["--repair"]);
    assert!(ok, "{out}");
    assert!(out.contains("repaired:"), "{out}");
    let (ok, out) = check(&data, &[]);
    assert!(ok && out.contains("1999 record checksum(s)"), "{out}");

    // A damaged record: named, with what to do, and not repairable.
    let path = data.join("switchyard.redb");
    let mut bytes = std::fs::read(&path).unwrap();
    let needle = b"rec-000777-";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    bytes[at + 20] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let (ok, out) = check(&data, &["--repair"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("topic 't' partition 0: 1 record(s) fail their checksum (offsets [777])"),
        "{out}"
    );
}
