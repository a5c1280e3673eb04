//! The dedup window across a reopen: it is read on a thread of its own
//! while the store already serves, and no message id may slip through in
//! between.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{AppendRecord, DUPLICATE_BIT, Storage, StorageConfig};

fn with_id(topic_id: u32, id: String) -> AppendRecord {
    AppendRecord {
        topic_id,
        partition: 0,
        record: crate::protocol::Record::new(vec![b'x'; 20]).to_raw(),
        dedup: Some(id.into()),
        fanout: None,
    }
}

/// Appends `ids` in one request; which of them were duplicates.
async fn duplicates(s: &Storage, topic_id: u32, ids: &[String]) -> Vec<bool> {
    let records = ids.iter().map(|i| with_id(topic_id, i.clone())).collect();
    let positions = s
        .append_many(records, Vec::new())
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    positions
        .iter()
        .map(|(p, _)| p & DUPLICATE_BIT != 0)
        .collect()
}

#[test]
fn a_reopened_store_knows_every_id_while_and_after_its_window_loads() {
    // Enough ids that reading them takes far longer than the first
    // append after the reopen.
    const OLD: usize = 60_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = Storage::open(&path, StorageConfig::default()).unwrap();
        let t = s.create_topic("t", 1, 0, 0).await.unwrap().meta.id;
        let old: Vec<String> = (0..OLD).map(|i| format!("old-{i}")).collect();
        for chunk in old.chunks(5_000) {
            assert!(duplicates(&s, t, chunk).await.iter().all(|d| !d));
        }
        s.shutdown().await;
        drop(s);

        let s = Storage::open(&path, StorageConfig::default()).unwrap();
        // At once, before the window is read: old ids are found (on disk).
        let first = [
            "old-0".to_string(),
            format!("old-{}", OLD - 1),
            "new-0".to_string(),
        ];
        assert!(
            !s.stats().dedup_loaded.load(Ordering::Relaxed),
            "the window was read before the first append: the test proves nothing"
        );
        assert_eq!(duplicates(&s, t, &first).await, [true, true, false]);
        // Ids appended while the window is read, then the window arrives:
        // it must keep them as well as the old ones.
        let meanwhile: Vec<String> = (1..100).map(|i| format!("new-{i}")).collect();
        assert!(duplicates(&s, t, &meanwhile).await.iter().all(|d| !d));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s.stats().dedup_loaded.load(Ordering::Relaxed) {
            assert!(Instant::now() < deadline, "the dedup window never loaded");
            // Each commit takes the window in if it is ready.
            duplicates(&s, t, &["new-0".to_string()]).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let again: Vec<String> = ["old-1", "old-30000", "new-0", "new-50", "new-99"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(duplicates(&s, t, &again).await, [true; 5]);
        assert_eq!(duplicates(&s, t, &["new-100".into()]).await, [false]);
        s.shutdown().await;
    });
}
