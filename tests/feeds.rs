//! Feeds against a real router: following keys, fan-out on write and on
//! read, the hot-key-fanout plugin, and resuming.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use switchyard::client::{Client, SubscribeOptions, Subscription};
use switchyard::protocol::{ErrorCode, Record};

async fn publish_keys(c: &Client, topic: &str, keys: &[&str], rounds: usize, tag: &str) {
    for r in 0..rounds {
        let batch = keys
            .iter()
            .map(|k| Record::new(format!("{tag}{r}")).with_key(k.to_string()))
            .collect();
        c.publish_batch(topic, batch).await.unwrap();
    }
}

fn text(m: &switchyard::client::Message) -> (String, String) {
    (
        String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
        String::from_utf8(m.payload().to_vec()).unwrap(),
    )
}

/// The first three feeds follow "star", the others "quiet": each gets the
/// ten records of its key tagged `tag`, in order.
async fn expect_star_and_quiet(subs: &mut [Subscription], tag: &str) {
    for (i, sub) in subs.iter_mut().enumerate() {
        let got: Vec<(String, String)> = take(sub, 10, 5).await.iter().map(text).collect();
        let key = if i < 3 { "star" } else { "quiet" };
        let expected: Vec<(String, String)> = (0..10)
            .map(|n| (key.to_string(), format!("{tag}{n}")))
            .collect();
        assert_eq!(got, expected);
    }
}

async fn feeds(c: &Client, topic: &str) -> serde_json::Value {
    c.admin_request("feeds", json!({ "topic": topic }), bytes::Bytes::new())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_feed_gets_its_keys_in_order_however_they_fan_out() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("posts", 4).await.unwrap();
    let e = c
        .subscribe(
            SubscribeOptions::new("posts")
                .group("alice")
                .follow(["bob"]),
        )
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument), "{e}");
    c.set_topic_policy("posts", json!({ "fanout": "on-write" }))
        .await
        .unwrap();
    // Published before the follow: not part of the feed.
    publish_keys(&c, "posts", &["bob"], 3, "early-").await;
    let mut alice = c
        .subscribe(
            SubscribeOptions::new("posts")
                .group("alice")
                .follow(["bob", "carol"])
                .prefetch(1),
        )
        .await
        .unwrap();
    publish_keys(&c, "posts", &["bob", "carol", "dave"], 20, "w").await;
    let after_write = feeds(&c, "posts").await;
    // Half way, switch the topic to fan-out on read.
    c.set_topic_policy("posts", json!({ "fanout": "on-read" }))
        .await
        .unwrap();
    publish_keys(&c, "posts", &["bob", "carol", "dave"], 20, "r").await;
    let got: Vec<(String, String)> = take(&mut alice, 80, 10).await.iter().map(text).collect();
    for key in ["bob", "carol"] {
        let mine: Vec<&str> = got
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect();
        let expected: Vec<String> = (0..20)
            .map(|i| format!("w{i}"))
            .chain((0..20).map(|i| format!("r{i}")))
            .collect();
        assert_eq!(mine, expected, "{key}: every record once, in order");
    }
    assert!(
        got.iter().all(|(k, _)| k != "dave"),
        "unfollowed key delivered"
    );
    // On write: one reference per record of a followed key (dave none);
    // the one record alice may have prefetched has had its reference read
    // and dropped.
    let refs = after_write["inbox_references"].as_u64().unwrap();
    assert!((39..=40).contains(&refs), "{after_write}");
    assert_eq!(after_write["key_index_entries"], 0);
    let after_read = feeds(&c, "posts").await;
    assert_eq!(
        after_read["key_index_entries"], 60,
        "one entry per keyed record"
    );
}

#[tokio::test]
async fn a_feed_resumes_where_it_stopped() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("news", 2).await.unwrap();
    c.set_topic_policy("news", json!({ "fanout": "on-read" }))
        .await
        .unwrap();
    // Commit what was processed, not what was sent ahead.
    let opts = SubscribeOptions::new("news")
        .group("reader")
        .follow(["sports"])
        .prefetch(8)
        .auto_commit(false);
    let mut sub = c.subscribe(opts.clone()).await.unwrap();
    publish_keys(&c, "news", &["sports"], 10, "a").await;
    let first = take(&mut sub, 5, 5).await;
    for m in &first {
        sub.commit_message(m).unwrap();
    }
    sub.close().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    publish_keys(&c, "news", &["sports"], 5, "b").await;
    let mut sub = c.subscribe(opts.prefetch(100)).await.unwrap();
    let rest = take(&mut sub, 10, 5).await;
    let all: Vec<String> = first.iter().chain(&rest).map(|m| text(m).1).collect();
    let expected: Vec<String> = (0..10)
        .map(|i| format!("a{i}"))
        .chain((0..5).map(|i| format!("b{i}")))
        .collect();
    assert_eq!(all, expected, "resumed right after the last commit");
}

#[tokio::test]
async fn hot_key_fanout_plugin_reads_hot_keys_at_read_time() {
    let r = start_router().await;
    let c = r.client().await;
    c.create_topic("timeline", 2).await.unwrap();
    c.set_topic_policy("timeline", json!({ "fanout": "on-write" }))
        .await
        .unwrap();
    c.deploy_plugin(
        plugin_wasm("hot_key_fanout"),
        json!({ "name": "hot", "hook": "fanout", "topic": "timeline",
                "deadline_ms": 1000, "config": { "threshold": "2" } }),
    )
    .await
    .unwrap();
    // Three followers of "star" (hot), one of "quiet".
    let mut subs = Vec::new();
    for (name, key) in [
        ("f1", "star"),
        ("f2", "star"),
        ("f3", "star"),
        ("f4", "quiet"),
    ] {
        subs.push(
            c.subscribe(SubscribeOptions::new("timeline").group(name).follow([key]))
                .await
                .unwrap(),
        );
    }
    publish_keys(&c, "timeline", &["star", "quiet"], 10, "m").await;
    expect_star_and_quiet(&mut subs, "m").await;
    let f = feeds(&c, "timeline").await;
    // star (3 followers > 2) fanned out on read: 10 index entries instead
    // of 30 references; quiet (1 follower) on write: 10 references, some
    // of which may already be read and dropped.
    assert_eq!(f["key_index_entries"], 10, "{f}");
    assert!(f["inbox_references"].as_u64().unwrap() <= 10, "{f}");

    // Records that pass a route plugin first fan out the same way.
    c.deploy_plugin(
        plugin_wasm("probe"),
        json!({ "name": "keep", "hook": "route", "topic": "timeline", "deadline_ms": 1000 }),
    )
    .await
    .unwrap();
    publish_keys(&c, "timeline", &["star", "quiet"], 10, "r").await;
    expect_star_and_quiet(&mut subs, "r").await;
    let f = feeds(&c, "timeline").await;
    assert_eq!(f["key_index_entries"], 20, "{f}");
}
