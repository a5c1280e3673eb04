//! The web console in a real headless browser (Debian's chromium, driven
//! through chromedriver over WebDriver): sign in, read a topic's offsets,
//! redrive a dead letter, roll a plugin back, and check each in the
//! router's own state. `.ci/run` installs chromium and chromium-driver.
//! With `SWITCHYARD_CONSOLE_SCREENSHOTS=DIR` the test saves screenshots
//! of the pages there (`docs/console-*.png` were made this way).

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use switchyard::client::{QueueOptions, Record};

/// chromedriver on a free loopback port, killed on drop.
struct Driver(Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chromedriver() -> Driver {
    let bin = std::env::var("SWITCHYARD_CHROMEDRIVER").unwrap_or("/usr/bin/chromedriver".into());
    assert!(
        std::path::Path::new(&bin).exists(),
        "{bin} is missing: install Debian's chromium and chromium-driver (.ci/run does)"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Driver(child, port)
}

async fn browser(d: &Driver) -> Client {
    // The WebDriver client's TLS stack needs a process-wide provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let chromium = std::env::var("SWITCHYARD_CHROMIUM").unwrap_or("/usr/bin/chromium".into());
    let caps = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1000"],
        }
    });
    ClientBuilder::rustls()
        .expect("rustls")
        .capabilities(caps.as_object().unwrap().clone())
        .connect(&format!("http://127.0.0.1:{}", d.1))
        .await
        .expect("a browser session")
}

/// The text of element `id`, waiting for it to appear (a click may return
/// before the page it leads to has loaded).
async fn text(b: &Client, id: &str) -> String {
    b.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Id(id))
        .await
        .unwrap_or_else(|e| panic!("no element {id}: {e}"))
        .text()
        .await
        .unwrap()
}

/// Waits (a click may return before its navigation ends) until the
/// browser is on a page whose path ends with `path`.
async fn on_page(b: &Client, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = b.current_url().await.unwrap();
        if now.path().ends_with(path) {
            return;
        }
        assert!(Instant::now() < deadline, "on {now}, expected {path}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn click(b: &Client, id: &str) {
    b.find(Locator::Id(id))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn type_in(b: &Client, id: &str, keys: &str) {
    b.find(Locator::Id(id))
        .await
        .unwrap()
        .send_keys(keys)
        .await
        .unwrap();
}

async fn screenshot(b: &Client, name: &str) {
    if let Ok(dir) = std::env::var("SWITCHYARD_CONSOLE_SCREENSHOTS") {
        let png = b.screenshot().await.unwrap();
        std::fs::write(std::path::Path::new(&dir).join(name), png).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_signs_in_reads_offsets_redrives_and_rolls_back() {
    let r = start_router_with(|c| c.console = Some("127.0.0.1:0".parse().unwrap())).await;
    let base = format!("http://{}", r.router.console_addr().unwrap());
    let c = r.client().await;
    c.create_topic("orders", 2).await.unwrap();
    let batch = (0..25)
        .map(|i| Record::new(format!("order {i}")).with_key(format!("c{}", i % 5)))
        .collect();
    c.publish_batch("orders", batch).await.unwrap();
    // One dead letter.
    let mut q = c
        .subscribe_queue(QueueOptions::new("orders", "workers").prefetch(1))
        .await
        .unwrap();
    let m = take(&mut q, 1, 10).await.remove(0);
    q.nack(&m, false, "bad-order", "total is negative")
        .await
        .unwrap();
    q.close().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.dlq_list("orders", 10).await.unwrap()["total"] != 1 {
        assert!(Instant::now() < deadline, "the nack was not dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A plugin with two versions, v2 live.
    for _ in 0..2 {
        c.deploy_plugin(
            plugin_wasm("route_by_header"),
            json!({ "name": "by-region", "hook": "route", "topic": "orders",
                    "config": { "header": "region", "prefix": "orders." }, "deadline_ms": 1000 }),
        )
        .await
        .unwrap();
    }

    let driver = chromedriver();
    let b = browser(&driver).await;

    // Signed out, every page leads to the sign-in form.
    b.goto(&format!("{base}/topics")).await.unwrap();
    on_page(&b, "/login").await;
    type_in(&b, "token", "not-a-token").await;
    click(&b, "signin").await;
    assert!(text(&b, "message").await.contains("not recognised"));
    type_in(&b, "token", &admin_token(&r.cert)).await;
    click(&b, "signin").await;
    on_page(&b, "/").await;
    // Give the overview's charts a few samples before the screenshot.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    b.refresh().await.unwrap();
    b.find(Locator::Id("chart-rate")).await.unwrap();
    screenshot(&b, "console-overview.png").await;

    // Topics: the offsets the console shows are the router's.
    b.goto(&format!("{base}/topics")).await.unwrap();
    let info = c.describe_topic("orders").await.unwrap();
    for (p, part) in info.partitions.iter().enumerate() {
        let shown = text(&b, &format!("end-orders-{p}")).await;
        assert_eq!(shown, part.end.to_string(), "partition {p}");
    }
    screenshot(&b, "console-topics.png").await;

    // Dead letters: redrive the one back to its topic.
    b.goto(&format!("{base}/queues")).await.unwrap();
    screenshot(&b, "console-queues.png").await;
    b.goto(&format!("{base}/dlq/orders")).await.unwrap();
    assert_eq!(text(&b, "dlq-total").await, "1");
    let page = b.source().await.unwrap();
    assert!(page.contains("total is negative"), "{page}");
    screenshot(&b, "console-dlq.png").await;
    click(&b, "redrive").await;
    assert!(text(&b, "message").await.contains("1 redriven"));
    assert_eq!(c.dlq_list("orders", 10).await.unwrap()["total"], 0);
    let end: u64 = c
        .describe_topic("orders")
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.end)
        .sum();
    assert_eq!(end, 26, "the letter went back to orders");

    // Plugins: roll back from v2 to v1.
    b.goto(&format!("{base}/plugins")).await.unwrap();
    assert_eq!(text(&b, "live-by-region").await, "v2");
    screenshot(&b, "console-plugins.png").await;
    click(&b, "rollback-by-region").await;
    assert!(text(&b, "message").await.contains("now v1"));
    assert_eq!(text(&b, "live-by-region").await, "v1");
    let show = c
        .plugin_request("show", json!({ "name": "by-region" }), bytes::Bytes::new())
        .await
        .unwrap();
    assert_eq!(show["live_version"], 1);
    assert_eq!(show["history"].as_array().unwrap().len(), 3);

    // Signing out ends the session.
    click(&b, "logout").await;
    b.goto(&format!("{base}/plugins")).await.unwrap();
    on_page(&b, "/login").await;
    b.close().await.unwrap();
    let _: SocketAddr = r.addr;
}
