//! An acknowledged record survives `kill -9` of the router at any moment.
//!
//! The router runs as a child process and is killed with SIGKILL while a
//! producer has many pipelined batches in flight. After a restart on the same
//! data directory every acknowledged offset must hold exactly the record that
//! was acknowledged for it: the guard against acking before fsync, against
//! reusing offsets after a crash, and against a torn group commit.

mod common;

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::time::Duration;

use bytes::Bytes;
use common::{ChildRouter, connect, take};
use futures::StreamExt;
use switchyard::client::{QueueOptions, SubscribeOptions};
use switchyard::protocol::{ErrorCode, Record, StartPosition};

#[tokio::test]
async fn acked_records_survive_kill_9_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let router = ChildRouter::spawn(dir.path());
    let c = connect(router.addr, &router.cert).await;
    c.create_topic("crash", 4).await.unwrap();

    // Keep up to 32 batches of 100 in flight; record each acked position.
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let producer = {
        let c = c.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut acked: HashMap<(u32, u64), Bytes> = HashMap::new();
            let mut pending = std::collections::VecDeque::new();
            for b in 0..100_000u64 {
                let payloads: Vec<Bytes> =
                    (0..100).map(|i| Bytes::from(format!("{b}-{i}"))).collect();
                let recs = payloads
                    .iter()
                    .map(|p| Record::new(p.clone()).with_key(format!("{}", b % 7)))
                    .collect();
                match c.queue_batch("crash", recs).await {
                    Ok(p) => pending.push_back((payloads, p)),
                    Err(_) => break,
                }
                if pending.len() >= 32 {
                    let (payloads, p) = pending.pop_front().unwrap();
                    match p.await {
                        Ok(acks) => {
                            for (a, p) in acks.into_iter().zip(payloads) {
                                acked.insert((a.partition, a.offset), p);
                            }
                            progress.store(acked.len(), std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(_) => break,
                    }
                }
            }
            for (payloads, p) in pending {
                if let Ok(acks) = p.await {
                    for (a, p) in acks.into_iter().zip(payloads) {
                        acked.insert((a.partition, a.offset), p);
                    }
                }
            }
            acked
        })
    };

    // Let the stream run, then kill the router without warning while
    // batches are still in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while progress.load(std::sync::atomic::Ordering::Relaxed) < 20_000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "producer made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut router = router;
    router.child.kill().unwrap(); // SIGKILL
    router.child.wait().unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(30), producer)
        .await
        .expect("producer notices the crash")
        .unwrap();
    assert!(
        acked.len() >= 20_000,
        "only {} acked before the kill",
        acked.len()
    );
    drop(router);

    let router = ChildRouter::spawn(dir.path());
    let c = connect(router.addr, &router.cert).await;
    let info = c.describe_topic("crash").await.unwrap();
    let stored: u64 = info.partitions.iter().map(|p| p.end).sum();
    assert!(stored >= acked.len() as u64);
    let mut sub = c
        .subscribe(SubscribeOptions::new("crash").prefetch(4096))
        .await
        .unwrap();
    let msgs = take(&mut sub, stored as usize, 60).await;
    let found: HashMap<(u32, u64), Bytes> = msgs
        .into_iter()
        .map(|m| ((m.partition, m.offset), m.payload()))
        .collect();
    for (pos, payload) in &acked {
        assert_eq!(
            found.get(pos),
            Some(payload),
            "acked record at {pos:?} lost or changed"
        );
    }
    // Appends after the restart continue after the surviving records.
    let ack = c
        .publish("crash", Record::new("after").with_key("0"))
        .await
        .unwrap();
    assert_eq!(ack.offset, info.partitions[ack.partition as usize].end);
}

/// A full disk reached despite the reserve (here a file size limit the
/// free-space check cannot see): a write that cannot be stored is refused
/// with `E204 storage_full` (never a false ack, never "shutting down"), the router stays
/// up and keeps serving what it holds, and after a restart with room again
/// every acknowledged record is there and writes work.
#[tokio::test]
async fn a_full_disk_refuses_writes_with_a_code_and_keeps_every_acked_record() {
    let dir = tempfile::tempdir().unwrap();
    // 16,384 blocks: 8 or 16 MiB depending on the shell's block size.
    let child = ChildRouter::spawn_with_file_limit(dir.path(), 16_384);
    let c = connect(child.addr, &child.cert).await;
    c.create_topic("fill", 1).await.unwrap();
    let mut acked = 0u64;
    let mut refused = None;
    for round in 0..64u64 {
        let batch: Vec<Record> = (0..512u64)
            .map(|i| Record::new(Bytes::from(vec![(round * 512 + i) as u8; 1024])))
            .collect();
        match c.publish_batch("fill", batch).await {
            Ok(acks) => acked += acks.len() as u64,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("the file size limit was never reached");
    assert_eq!(e.code(), Some(ErrorCode::StorageFull), "{e}");
    assert!(
        e.to_string().contains("nothing in this request was stored"),
        "{e}"
    );
    assert!(acked >= 512, "some batches fit before the disk filled");
    // Every later write is refused the same way, not as a shutdown.
    let again = c.publish("fill", Record::new("more")).await.unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::StorageFull), "{again}");
    assert!(again.to_string().contains("restart"), "{again}");
    // Still up, still serving what it acknowledged.
    let info = c.describe_topic("fill").await.unwrap();
    assert_eq!(info.partitions[0].end, acked);
    let mut sub = c
        .subscribe(SubscribeOptions::new("fill").start(StartPosition::Earliest))
        .await
        .unwrap();
    assert_eq!(take(&mut sub, 1, 10).await[0].offset, 0);
    drop(sub);
    drop(child);

    // Room again: everything acknowledged is there, and writes work.
    let child = ChildRouter::spawn(dir.path());
    let c = connect(child.addr, &child.cert).await;
    assert_eq!(
        c.describe_topic("fill").await.unwrap().partitions[0].end,
        acked
    );
    let mut sub = c
        .subscribe(SubscribeOptions::new("fill").start(StartPosition::Earliest))
        .await
        .unwrap();
    let got = take(&mut sub, acked as usize, 20).await;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.offset, i as u64);
        assert!(
            m.payload().iter().all(|&b| b == i as u8),
            "record {i} intact"
        );
    }
    let ack = c.publish("fill", Record::new("after")).await.unwrap();
    assert_eq!(ack.offset, acked);
}

/// Small commits are made durable in the write-ahead journal and reach the
/// database file only at the next checkpoint. With checkpoints an hour
/// apart, everything acknowledged after the topic was created exists only
/// in the journal when the router is killed, and all of it must come back:
/// the records at their offsets, the dedup window and the queue's acks.
#[tokio::test]
async fn journaled_commits_come_back_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("router.toml");
    std::fs::write(&config, "journal_checkpoint_ms = 3600000\n").unwrap();
    let data = dir.path().join("data");
    let args = [OsStr::new("--config"), config.as_os_str()];
    let child = ChildRouter::spawn_with(&data, &args);
    let c = connect(child.addr, &child.cert).await;
    c.create_topic("j", 2).await.unwrap();
    // One at a time: every publish is a commit of its own.
    let mut acked = HashMap::new();
    let mut id7 = None;
    for i in 0..200u32 {
        let r = Record::new(format!("m{i}"))
            .with_key(format!("{}", i % 5))
            .with_message_id(format!("id-{i}"));
        let a = c.publish("j", r).await.unwrap();
        assert!(!a.duplicate);
        if i == 7 {
            id7 = Some((a.partition, a.offset));
        }
        acked.insert((a.partition, a.offset), Bytes::from(format!("m{i}")));
    }
    let mut q = c
        .subscribe_queue(QueueOptions::new("j", "g").prefetch(200))
        .await
        .unwrap();
    let got = take(&mut q, 200, 10).await;
    for m in &got[..150] {
        q.ack(m).await.unwrap();
    }
    let unacked: HashSet<Bytes> = got[150..].iter().map(|m| m.payload()).collect();
    // Let the commits carrying the acks finish, then kill -9.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(q);
    drop(child);

    // Copies of the crash image, damaged. One byte flipped in the middle
    // of the journal's entries: the commits after it cannot be replayed,
    // so the router refuses to start (naming the file and `check`) instead
    // of starting without them and handing their offsets out again.
    let damaged = copy_dir(&data, &dir.path().join("damaged"));
    let journal = damaged.join("switchyard.journal");
    let mut bytes = std::fs::read(&journal).unwrap();
    let used = bytes.iter().rposition(|&b| b != 0).unwrap();
    bytes[used / 2] ^= 0x01;
    std::fs::write(&journal, &bytes).unwrap();
    let out = common::serve_until_exit(&damaged, "127.0.0.1:0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a damaged journal: {err}");
    assert!(
        err.contains("switchyard.journal") && err.contains("switchyard check"),
        "{err}"
    );
    // `check` names it too, with what can be done.
    let out = std::process::Command::new(common::router_bin())
        .args(["check", "--data"])
        .arg(&damaged)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("switchyard.journal")
            && text.contains("is damaged")
            && text.contains("what to do"),
        "{text}"
    );
    // Truncated to half: refused the same way.
    let mut clean = std::fs::read(data.join("switchyard.journal")).unwrap();
    clean.truncate(used / 2);
    std::fs::write(&journal, &clean).unwrap();
    let out = common::serve_until_exit(&damaged, "127.0.0.1:0");
    assert!(!out.status.success(), "started on a truncated journal");
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"));
    // A database file truncated to 0 bytes is a new database: its old
    // journal is never replayed into it (no orphan rows, no topics).
    let wiped = copy_dir(&data, &dir.path().join("wiped"));
    std::fs::File::create(wiped.join("switchyard.redb")).unwrap();
    {
        let child = ChildRouter::spawn(&wiped);
        let c = connect(child.addr, &child.cert).await;
        assert!(c.list_topics().await.unwrap().is_empty());
        let e = c.describe_topic("j").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::UnknownTopic), "{e}");
    }

    let child = ChildRouter::spawn_with(&data, &args);
    let c = connect(child.addr, &child.cert).await;
    let info = c.describe_topic("j").await.unwrap();
    let stored: u64 = info.partitions.iter().map(|p| p.end).sum();
    assert_eq!(stored, 200, "every acknowledged record, once");
    let mut sub = c
        .subscribe(SubscribeOptions::new("j").start(StartPosition::Earliest))
        .await
        .unwrap();
    let found: HashMap<(u32, u64), Bytes> = take(&mut sub, 200, 10)
        .await
        .into_iter()
        .map(|m| ((m.partition, m.offset), m.payload()))
        .collect();
    assert_eq!(
        found, acked,
        "each record at the offset it was acknowledged at"
    );
    drop(sub);
    // The dedup window came back too.
    let again = c
        .publish("j", Record::new("m7").with_key("2").with_message_id("id-7"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(Some((again.partition, again.offset)), id7);
    // So did the acks: exactly the unacked messages are delivered again.
    let mut q = c
        .subscribe_queue(QueueOptions::new("j", "g").prefetch(200))
        .await
        .unwrap();
    let redelivered: HashSet<Bytes> = take(&mut q, 50, 10)
        .await
        .iter()
        .map(|m| m.payload())
        .collect();
    assert_eq!(redelivered, unacked);
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), q.next()).await {
        panic!("an acked message came back: {:?}", m.map(|m| m.tag));
    }
    // New appends continue after the replayed records.
    let a = c
        .publish("j", Record::new("after").with_key("0"))
        .await
        .unwrap();
    assert_eq!(a.offset, info.partitions[a.partition as usize].end);
}

/// A log that cannot be written (stderr on a full disk) costs log lines,
/// never the router: every publish is still stored and acknowledged while
/// the storage writer logs each checkpoint at `debug`, and a router whose
/// stdout is full still starts and serves.
#[tokio::test]
async fn a_full_log_disk_never_stops_the_router() {
    let dir = tempfile::tempdir().unwrap();
    let full = || std::fs::OpenOptions::new().write(true).open("/dev/full");
    if full().is_err() {
        eprintln!("skipped: this system has no /dev/full");
        return;
    }
    let mut cmd = std::process::Command::new(common::router_bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .env("RUST_LOG", "debug");
    let mut router = ChildRouter::start_logging(cmd, dir.path(), full().unwrap().into());
    let c = connect(router.addr, &router.cert).await;
    c.create_topic("logs", 1).await.unwrap();
    // Across several checkpoints (every 250 ms), each logged by the writer.
    for i in 0..40u64 {
        let a = c
            .publish("logs", Record::new(format!("{i}")))
            .await
            .unwrap();
        assert_eq!(a.offset, i);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(router.child.try_wait().unwrap().is_none(), "router exited");

    // stdout full too: the router starts and keeps running.
    let data = dir.path().join("quiet");
    let mut child = std::process::Command::new(common::router_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .stdout(full().unwrap())
        .stderr(full().unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !data.join("admin.token").exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        status.is_none(),
        "router with a full stdout exited: {status:?}"
    );
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Mount(std::path::PathBuf);

impl Mount {
    /// Mounts a tmpfs of `mib` MiB at `at`, or says why it cannot.
    fn tmpfs(at: &std::path::Path, mib: u64) -> Result<Mount, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A real, small file system filling up: below the free-space reserve
/// publishes are refused with `storage_full` (nothing acknowledged that is
/// not stored), reads keep working, and once space is freed writes resume
/// by themselves, with nothing lost or damaged after a restart. Needs a
/// tmpfs mount (root); skipped, saying why, where that is not allowed.
#[tokio::test]
async fn a_small_file_system_fills_and_writes_resume_once_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let mount = match Mount::tmpfs(&mnt, 64) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: cannot mount a tmpfs here ({why})");
            return;
        }
    };
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![1u8; 24 << 20]).unwrap();
    let config = dir.path().join("router.toml");
    std::fs::write(&config, "storage_reserve_mb = 8\n").unwrap();
    let data = mnt.join("data");
    let args = [OsStr::new("--config"), config.as_os_str()];
    let child = ChildRouter::spawn_with(&data, &args);
    let c = connect(child.addr, &child.cert).await;
    c.create_topic("fill", 1).await.unwrap();
    let batch = |n: u64| -> Vec<Record> {
        (0..16u64)
            .map(|i| Record::new(Bytes::from(vec![((n * 16 + i) % 251) as u8; 64 << 10])))
            .collect()
    };
    let mut acked = 0u64;
    let mut n = 0;
    let e = loop {
        match c.publish_batch("fill", batch(n)).await {
            Ok(a) => acked += a.len() as u64,
            Err(e) => break e,
        }
        n += 1;
        assert!(n < 1000, "the file system never filled");
    };
    assert_eq!(e.code(), Some(ErrorCode::StorageFull), "{e}");
    assert!(e.to_string().contains("storage_reserve_mb"), "{e}");
    assert!(acked > 0);
    assert_eq!(
        c.describe_topic("fill").await.unwrap().partitions[0].end,
        acked
    );
    let mut sub = c
        .subscribe(SubscribeOptions::new("fill").start(StartPosition::Earliest))
        .await
        .unwrap();
    assert_eq!(
        take(&mut sub, 1, 10).await[0].offset,
        0,
        "reads keep working"
    );
    drop(sub);
    // Free space: writes resume without a restart.
    std::fs::remove_file(&filler).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The refused batch stored nothing: sent again, it follows the last
    // acknowledged one.
    for _ in 0..4 {
        acked += c.publish_batch("fill", batch(n)).await.unwrap().len() as u64;
        n += 1;
    }
    common::sigterm(&child.child);
    let mut child = child;
    assert!(child.child.wait().unwrap().success());
    drop(child);
    // Restart: every acknowledged record, intact, and nothing else.
    let child = ChildRouter::spawn_with(&data, &args);
    let c = connect(child.addr, &child.cert).await;
    assert_eq!(
        c.describe_topic("fill").await.unwrap().partitions[0].end,
        acked
    );
    let mut sub = c
        .subscribe(
            SubscribeOptions::new("fill")
                .start(StartPosition::Earliest)
                .prefetch(256),
        )
        .await
        .unwrap();
    for (i, m) in take(&mut sub, acked as usize, 30).await.iter().enumerate() {
        let want = ((i as u64) % 251) as u8;
        assert!(m.payload().iter().all(|&b| b == want), "record {i} intact");
    }
    drop(sub);
    drop(child);
    drop(mount);
}

/// Copies the files of a data directory (it has no subdirectories).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::path::PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to.to_path_buf()
}
