//! What a cluster's followers hold: the redo of every commit the writer
//! replicates, replayed into another database, gives the same tables as
//! the writer's own, byte for byte. A change the writer makes without
//! recording it would leave the replicas different from their leader.

use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable};

use super::journal;
use super::tables::{INBOX, KEY_INDEX, PARTITIONS};
use super::{Replicator, Storage, StorageConfig, StorageError, fanned_out};
use crate::protocol::Record;

/// Keeps the redo of every commit that committed, in order.
#[derive(Default)]
struct Capture {
    pending: Mutex<Option<Vec<u8>>>,
    log: Mutex<Vec<Vec<u8>>>,
}

impl Replicator for Capture {
    fn replicate(&self, redo: &[u8], _: &redb::WriteTransaction) -> Result<(), StorageError> {
        *self.pending.lock().unwrap() = Some(redo.to_vec());
        Ok(())
    }

    fn done(&self, committed: bool) {
        let redo = self.pending.lock().unwrap().take();
        if let (true, Some(redo)) = (committed, redo) {
            self.log.lock().unwrap().push(redo);
        }
    }
}

#[test]
fn replaying_every_replicated_commit_gives_the_leaders_tables() {
    let dir = tempfile::tempdir().unwrap();
    let capture = Arc::new(Capture::default());
    let path = dir.path().join("leader.redb");
    let db = Arc::new(Database::create(&path).unwrap());
    let config = StorageConfig {
        replicator: Some(capture.clone()),
        ..StorageConfig::default()
    };
    let storage = Storage::open_replicated(db.clone(), &path, config).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Keyed records fanned out on write and on read to a feed, with
        // message ids, under a size limit that retention enforces: the
        // records, the dedup window, the key index, the inbox and their
        // pruning all change.
        let topic = storage.create_topic("t", 2, 0, 2_000).await.unwrap();
        let keys: Vec<Vec<u8>> = (0..10).map(|k| format!("k{k}").into_bytes()).collect();
        storage.follow(&topic, "f", keys.clone()).await.unwrap();
        for round in 0..2usize {
            let records = fanned_out(topic.meta.id, &keys, 300, |i| {
                Some(format!("id-{round}-{i}").into_bytes().into())
            });
            let t = storage.append_many(records, Vec::new()).await.unwrap();
            t.await.unwrap().unwrap();
            assert!(storage.enforce_retention().await.unwrap() > 200);
        }
        storage
            .commit_offset("g".into(), topic.meta.id, 1, 250)
            .await
            .unwrap();
        let gone = storage.create_topic("gone", 1, 0, 0).await.unwrap();
        storage
            .append(&gone, vec![(0, Record::new(b"x".to_vec()).to_raw())])
            .await
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        storage.delete_topic("gone").await.unwrap();
        storage
            .put_principal("app", Some(b"grants".to_vec()))
            .await
            .unwrap();
        storage.flush().await.unwrap();
        storage.shutdown().await;
    });

    let mirror = Database::create(dir.path().join("mirror.redb")).unwrap();
    let log = capture.log.lock().unwrap();
    assert!(log.len() > 5, "only {} commits replicated", log.len());
    for redo in log.iter() {
        let txn = mirror.begin_write().unwrap();
        journal::replay(&txn, redo).unwrap();
        txn.commit().unwrap();
    }
    let (leader, replica) = (journal::dump_db(&db), journal::dump_db(&mirror));
    assert!(
        leader == replica,
        "a replica's tables differ from its leader's"
    );

    // Retention pruned the fan-out references to the records it removed,
    // on the replica too.
    let txn = mirror.begin_read().unwrap();
    let parts = txn.open_table(PARTITIONS).unwrap();
    let start = |t: u32, p: u32| parts.get((t, p)).unwrap().unwrap().value().0;
    let index = txn.open_table(KEY_INDEX).unwrap();
    let inbox = txn.open_table(INBOX).unwrap();
    let refs = index
        .iter()
        .unwrap()
        .map(|e| e.unwrap().0.value())
        .map(|(t, _, p, o)| (t, p, o))
        .chain(inbox.iter().unwrap().map(|e| {
            let (t, _, p, o) = e.unwrap().0.value();
            (t, p, o)
        }));
    let mut kept = 0;
    for (t, p, o) in refs {
        assert!(
            o >= start(t, p),
            "a reference to {t}/{p}/{o}, below the start"
        );
        kept += 1;
    }
    assert!(kept > 0);
}

/// A leader that loses its leadership after `allow` commits: from then
/// on every commit is refused, slowly (so that requests queue up behind
/// the refusal and form a batch).
struct Deposed {
    allow: std::sync::atomic::AtomicU64,
}

impl Replicator for Deposed {
    fn replicate(&self, _: &[u8], _: &redb::WriteTransaction) -> Result<(), StorageError> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.allow.load(Relaxed) > 0 {
            self.allow.fetch_sub(1, Relaxed);
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        Err(StorageError::NotLeader("deposed".into()))
    }

    fn done(&self, _: bool) {}
}

#[test]
fn every_request_of_a_batch_a_lost_leadership_refused_may_be_resent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leader.redb");
    let db = Arc::new(Database::create(&path).unwrap());
    let config = StorageConfig {
        replicator: Some(Arc::new(Deposed { allow: 1.into() })),
        ..StorageConfig::default()
    };
    let storage = Storage::open_replicated(db, &path, config).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let topic = storage.create_topic("t", 1, 0, 0).await.unwrap();
        // Six appends at once: the first commits alone, the others queue
        // behind its refusal and are refused together.
        let appends = (0..6).map(|i| {
            let (s, topic) = (&storage, &topic);
            async move {
                let record = Record::new(format!("r{i}").into_bytes()).to_raw();
                s.append(topic, vec![(0, record)]).await?.await.unwrap()
            }
        });
        for r in futures::future::join_all(appends).await {
            assert!(
                matches!(r, Err(StorageError::NotLeader(_))),
                "a request refused for a lost leadership came back as {r:?}"
            );
        }
        storage.shutdown().await;
    });
}
