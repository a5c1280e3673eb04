//! The `switchyard` command, end to end: a router child process and the
//! client subcommands, as a user runs them.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{ChildRouter, router_bin, serve_until_exit, sigterm};

fn cli(r: &ChildRouter, dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    run_cli(r, dir, &[], args, stdin)
}

/// As `cli`, with extra environment variables.
fn cli_env(r: &ChildRouter, dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    run_cli(r, dir, env, args, None)
}

fn run_cli(
    r: &ChildRouter,
    dir: &Path,
    env: &[(&str, &str)],
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Output {
    let mut child = Command::new(router_bin())
        .args(args)
        .env("SWITCHYARD_ADDR", r.addr.to_string())
        .current_dir(dir) // the default --ca is ./switchyard-data/cert.pem
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// A router on `switchyard-data` in a fresh directory, where the CLI run
/// from that directory finds its certificate and token by default.
fn router_in_tempdir() -> (tempfile::TempDir, std::path::PathBuf, ChildRouter) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("switchyard-data");
    let r = ChildRouter::spawn(&data);
    (dir, data, r)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn cli_roundtrip_create_publish_subscribe_describe() {
    let (dir, data, r) = router_in_tempdir();
    assert!(
        data.join("cert.pem").exists(),
        "certificate generated on first start"
    );

    ok(&cli(
        &r,
        dir.path(),
        &["topic", "create", "orders", "--partitions", "3"],
        None,
    ));
    let out = ok(&cli(
        &r,
        dir.path(),
        &[
            "publish", "orders", "--key", "k1", "--header", "src=cli", "first",
        ],
        None,
    ));
    assert!(out.starts_with("partition "), "{out}");

    let lines: String = (0..1000).map(|i| format!("line-{i}\n")).collect();
    let out = cli(
        &r,
        dir.path(),
        &["publish", "orders"],
        Some(lines.as_bytes()),
    );
    ok(&out);
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("published 1000 messages"), "{summary}");

    let out = ok(&cli(&r, dir.path(), &["topic", "describe", "orders"], None));
    assert!(out.contains("PARTITION"), "{out}");
    let total: u64 = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[0].parse::<u32>().is_ok())
                .then(|| f[2].parse::<u64>().unwrap() - f[1].parse::<u64>().unwrap())
        })
        .sum();
    assert_eq!(total, 1001);

    let out = ok(&cli(
        &r,
        dir.path(),
        &["subscribe", "orders", "--count", "1001", "--format", "json"],
        None,
    ));
    let msgs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(msgs.len(), 1001);
    let first = msgs
        .iter()
        .find(|m| m["payload"] == "first")
        .expect("keyed message");
    assert_eq!(first["key"], "k1");
    assert_eq!(first["headers"]["src"], "cli");
    for field in ["partition", "offset", "timestamp_ms", "timestamp"] {
        assert!(!first[field].is_null(), "json has {field}");
    }
    let mut payloads: Vec<&str> = msgs
        .iter()
        .map(|m| m["payload"].as_str().unwrap())
        .collect();
    payloads.sort();
    payloads.dedup();
    assert_eq!(payloads.len(), 1001);

    // A group resumes where the last member stopped.
    let a = ok(&cli(
        &r,
        dir.path(),
        &["subscribe", "orders", "--group", "g", "--count", "600"],
        None,
    ));
    let b = ok(&cli(
        &r,
        dir.path(),
        &["subscribe", "orders", "--group", "g", "--count", "401"],
        None,
    ));
    let mut seen: Vec<&str> = a.lines().chain(b.lines()).collect();
    assert_eq!(seen.len(), 1001);
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        1001,
        "no message printed twice across the two runs"
    );

    let out = ok(&cli(&r, dir.path(), &["topic", "list"], None));
    assert!(out.contains("orders"));

    // Errors print their code and exit non-zero.
    let out = cli(&r, dir.path(), &["publish", "missing", "x"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("E100 unknown_topic"), "{err}");

    ok(&cli(&r, dir.path(), &["topic", "delete", "orders"], None));
    let out = cli(&r, dir.path(), &["topic", "describe", "orders"], None);
    assert!(!out.status.success());
}

/// A supervisor may stop the router the moment it announces itself:
/// SIGTERM right after the address line still stops it gracefully (it
/// once killed the router when it came before the handler was installed).
#[cfg(unix)]
#[test]
fn sigterm_shuts_down_gracefully() {
    for round in 0..8 {
        let dir = tempfile::tempdir().unwrap();
        let mut r = ChildRouter::spawn(dir.path());
        sigterm(&r.child);
        let status = r.child.wait().unwrap();
        assert!(
            status.success(),
            "round {round}: router exits 0 after SIGTERM, got {status}"
        );
    }
}

#[test]
fn plugin_new_scaffolds_a_crate_that_tests_builds_and_deploys() {
    let (dir, _, r) = router_in_tempdir();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let crate_dir = dir.path().join("keep-paid");
    ok(&cli(
        &r,
        dir.path(),
        &[
            "plugin",
            "new",
            "keep-paid",
            "--hook",
            "filter",
            "--dir",
            crate_dir.to_str().unwrap(),
        ],
        None,
    ));
    // Share the plugins' target directory so dependencies are built once.
    let target = repo.join("plugins/target");
    let cargo = |args: &[&str]| {
        let out = Command::new(env!("CARGO"))
            .args(args)
            .current_dir(&crate_dir)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cargo(&["test", "--quiet"]);
    cargo(&["build", "--quiet", "--release", "--target", "wasm32-wasip2"]);
    let wasm = target.join("wasm32-wasip2/release/keep_paid.wasm");
    assert!(wasm.exists());

    ok(&cli(&r, dir.path(), &["topic", "create", "orders"], None));
    ok(&cli(
        &r,
        dir.path(),
        &[
            "plugin",
            "deploy",
            wasm.to_str().unwrap(),
            "--name",
            "keep-paid",
            "--hook",
            "filter",
            "--topic",
            "orders",
            "--config",
            "needle=paid",
            // Generous: a debug router on a loaded CI machine is slow.
            "--deadline-ms",
            "1000",
        ],
        None,
    ));
    ok(&cli(
        &r,
        dir.path(),
        &["publish", "orders"],
        Some(b"order 1 open\norder 2 paid\norder 3 open\n"),
    ));
    let out = ok(&cli(
        &r,
        dir.path(),
        &["subscribe", "orders", "--count", "1"],
        None,
    ));
    assert_eq!(out.trim(), "order 2 paid");
    let out = ok(&cli(&r, dir.path(), &["plugin", "list"], None));
    assert!(out.contains("keep-paid") && out.contains("filter"), "{out}");
}

#[test]
fn bench_reports_throughput_and_latency_as_json() {
    let (dir, _, r) = router_in_tempdir();
    let out = ok(&cli(
        &r,
        dir.path(),
        &[
            "bench",
            "b",
            "--count",
            "3000",
            "--batch",
            "100",
            "--consumers",
            "2",
            "--json",
        ],
        None,
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["published"], 3000);
    assert_eq!(
        v["delivered"], 6000,
        "two fan-out consumers each see every message"
    );
    assert!(v["publish_msgs_per_s"].as_f64().unwrap() > 0.0);
    for k in ["publish_to_ack", "publish_to_deliver"] {
        let q = |p: &str| v[k][p].as_f64().unwrap();
        let (p50, p90, p99, max) = (q("p50_us"), q("p90_us"), q("p99_us"), q("max_us"));
        assert!(
            p50 > 0.0 && p50 <= p90 && p90 <= p99 && p99 <= max,
            "{k}: percentiles out of order: {}",
            v[k]
        );
    }
    // The records really are in the topic.
    let out = ok(&cli(&r, dir.path(), &["topic", "describe", "b"], None));
    assert!(out.contains("PARTITION"));

    // Open loop: a fixed schedule of 500 msg/s for one second sends at most
    // its 500 (+ the one at time zero), however fast the router is, and
    // reports the generator's own lateness.
    let out = ok(&cli(
        &r,
        dir.path(),
        &[
            "bench",
            "b",
            "--rate",
            "500",
            "--duration",
            "1s",
            "--batch",
            "1",
            "--json",
        ],
        None,
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["rate"], 500);
    let sent = v["published"].as_u64().unwrap();
    assert!((1..=501).contains(&sent), "{v}");
    assert!(v["send_lag"]["p50_us"].as_f64().unwrap() > 0.0, "{v}");
    // It names the settings of this machine that `switchyard tune` would change.
    let tune = ok(&cli(&r, dir.path(), &["tune"], None));
    let untuned = v["host_untuned"]
        .as_array()
        .expect("host_untuned is a list");
    assert_eq!(
        untuned.len(),
        tune.matches("(recommended ").count(),
        "{v}\n{tune}"
    );

    // Queue mode, preloaded: two competing consumers drain this run's
    // messages once between them, acking each.
    let out = ok(&cli(
        &r,
        dir.path(),
        &[
            "bench",
            "b",
            "--count",
            "2000",
            "--consumers",
            "2",
            "--queue",
            "--preload",
            "--json",
        ],
        None,
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["mode"], "queue");
    assert_eq!(v["delivered"], 2000, "{v}");
    let stats = ok(&cli(&r, dir.path(), &["queue", "stats", "b"], None));
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats[0]["acked"], 2000, "{stats}");
    assert_eq!(stats[0]["backlog"], 0, "{stats}");
}

#[test]
fn cli_queue_policy_delay_ids_and_dead_letters() {
    let (dir, _, r) = router_in_tempdir();
    let run = |args: &[&str]| ok(&cli(&r, dir.path(), args, None));
    run(&["topic", "create", "tasks", "--partitions", "2"]);
    let policy = run(&[
        "topic",
        "config",
        "tasks",
        "--set",
        "max_attempts=1",
        "--set",
        "default_priority=2",
    ]);
    let policy: serde_json::Value = serde_json::from_str(&policy).unwrap();
    assert_eq!(policy["max_attempts"], 1);
    assert_eq!(policy["default_priority"], 2);
    let bad = cli(
        &r,
        dir.path(),
        &["topic", "config", "tasks", "--set", "nope=1"],
        None,
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("E105"));

    let first = run(&["publish", "tasks", "one", "--key", "a", "--id", "t-1"]);
    let again = run(&["publish", "tasks", "one", "--key", "a", "--id", "t-1"]);
    assert!(!first.contains("duplicate"));
    assert!(again.contains("duplicate"), "{again}");
    assert_eq!(
        first.split(" (").next().unwrap().trim(),
        again.split(" (").next().unwrap().trim()
    );
    let started = std::time::Instant::now();
    run(&[
        "publish",
        "tasks",
        "urgent",
        "--priority",
        "9",
        "--delay",
        "300ms",
    ]);
    let late = cli(
        &r,
        dir.path(),
        &["publish", "tasks", "x", "--delay", "400days"],
        None,
    );
    assert!(String::from_utf8_lossy(&late.stderr).contains("invalid_delay"));

    // Queue consumption prints attempts; the delayed one arrives last.
    let out = run(&[
        "subscribe",
        "tasks",
        "--group",
        "w",
        "--queue",
        "--count",
        "2",
        "--format",
        "json",
    ]);
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["payload"], "one");
    assert_eq!(lines[1]["payload"], "urgent");
    assert_eq!(lines[1]["attempt"], 1);
    // Both were acked: nothing is left for the group.
    let stats: serde_json::Value =
        serde_json::from_str(&run(&["queue", "stats", "tasks"])).unwrap();
    assert_eq!(stats[0]["acked"], 2, "{stats}");
    assert_eq!(stats[0]["backlog"], 0, "{stats}");

    // Auto-ack settles on send.
    run(&["publish", "tasks", "fire-and-forget", "--key", "p"]);
    let out = run(&[
        "subscribe",
        "tasks",
        "--group",
        "w",
        "--queue",
        "--count",
        "1",
        "--ack",
        "auto",
    ]);
    assert_eq!(out.trim(), "fire-and-forget");

    // An expired message is never delivered; this topic dead-letters it.
    run(&[
        "topic",
        "config",
        "tasks",
        "--set",
        "dead_letter_expired=true",
    ]);
    run(&["publish", "tasks", "stale", "--key", "p", "--ttl", "1ms"]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut q = Command::new(router_bin())
        .args(["subscribe", "tasks", "--group", "w", "--queue"])
        .env("SWITCHYARD_ADDR", r.addr.to_string())
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let listed = loop {
        let out = cli(&r, dir.path(), &["dlq", "list", "tasks"], None);
        if out.status.success() && !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing dead-lettered"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let _ = q.kill();
    let printed = q.wait_with_output().unwrap();
    assert!(
        printed.stdout.is_empty(),
        "an expired message was delivered"
    );
    let dead: serde_json::Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(dead["payload"], "stale");
    assert_eq!(dead["headers"]["x-dlq-topic"], "tasks");
    assert_eq!(dead["headers"]["x-dlq-attempts"], "0");
    assert!(
        dead["headers"]["x-dlq-error"]
            .as_str()
            .unwrap()
            .starts_with("expired")
    );
    let redriven = run(&["dlq", "redrive", "tasks", "--max", "1"]);
    assert!(redriven.contains("redrove 1"), "{redriven}");
    let purged = run(&["dlq", "purge", "tasks"]);
    assert!(purged.contains("purged"), "{purged}");
}

#[test]
fn tune_shows_and_applies_the_wake_up_settings() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let poll = root.join("sys/module/haltpoll/parameters/guest_halt_poll_ns");
    let idle = root.join("sys/devices/system/cpu/cpuidle/current_driver");
    for (p, v) in [(&poll, "0\n"), (&idle, "haltpoll\n")] {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, v).unwrap();
    }
    let tune = |args: &[&str]| {
        Command::new(router_bin())
            .arg("tune")
            .args(args)
            .arg("--root")
            .arg(root)
            .output()
            .unwrap()
    };
    let shown = tune(&[]);
    let text = String::from_utf8(shown.stdout).unwrap();
    assert!(shown.status.success(), "{text}");
    assert!(
        text.contains("guest_halt_poll_ns: 0 (recommended 200000)"),
        "{text}"
    );
    assert_eq!(std::fs::read_to_string(&poll).unwrap(), "0\n", "only shown");

    let applied = tune(&["--apply"]);
    let text = String::from_utf8(applied.stdout).unwrap();
    assert!(applied.status.success(), "{text}");
    assert!(text.contains("changed 1 setting(s)"), "{text}");
    assert!(text.contains("all tuned"), "{text}");
    assert_eq!(std::fs::read_to_string(&poll).unwrap(), "200000");
}

#[test]
fn auth_tour_tokens_grants_and_revocation_from_the_cli() {
    let (dir, data, r) = router_in_tempdir();
    let token_file = data.join("admin.token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the admin token is private");
    }
    ok(&cli(&r, dir.path(), &["topic", "create", "orders"], None));
    let out = cli(
        &r,
        dir.path(),
        &[
            "auth",
            "token",
            "create",
            "billing",
            "--grant",
            "publish:orders",
            "--grant",
            "consume:orders@billing",
            "--quota",
            "publish_msgs_per_s=5000",
        ],
        None,
    );
    let token = ok(&out).trim().to_string();
    assert!(
        token.starts_with("sy_"),
        "the token alone on stdout: {token}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("shown only this once"));

    let as_billing = [("SWITCHYARD_TOKEN", token.as_str())];
    ok(&cli_env(
        &r,
        dir.path(),
        &as_billing,
        &["publish", "orders", "{\"total\": 7}"],
    ));
    let out = cli_env(&r, dir.path(), &as_billing, &["topic", "delete", "orders"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("E115 forbidden") && err.contains("topic-admin:orders"),
        "{err}"
    );
    let me = ok(&cli_env(&r, dir.path(), &as_billing, &["auth", "whoami"]));
    assert!(me.contains("\"billing\"") && me.contains("5000"), "{me}");

    let list = ok(&cli(&r, dir.path(), &["auth", "token", "list"], None));
    assert!(
        list.contains("billing") && list.contains("consume:orders@billing"),
        "{list}"
    );
    assert!(list.contains("admin"), "{list}");
    assert!(!list.contains(&token), "tokens are never listed");

    ok(&cli(
        &r,
        dir.path(),
        &["auth", "token", "revoke", "billing"],
        None,
    ));
    let out = cli_env(&r, dir.path(), &as_billing, &["publish", "orders", "late"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("E114 unauthenticated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The topic is untouched, with the one record billing published.
    let out = ok(&cli(&r, dir.path(), &["topic", "describe", "orders"], None));
    assert!(out.contains("orders"), "{out}");
}

#[test]
fn a_second_router_on_the_same_data_directory_says_so_once() {
    let dir = tempfile::tempdir().unwrap();
    let _first = ChildRouter::spawn(dir.path());
    let out = serve_until_exit(dir.path(), "127.0.0.1:0");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");
    assert_eq!(err.matches("in use").count(), 1, "said once: {err}");
}

#[test]
fn the_plugin_build_script_works_with_cargo_target_dir_set() {
    // Developer machines and CI caches often set CARGO_TARGET_DIR; the
    // components must still land where the tests look for them.
    let elsewhere = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("CARGO_TARGET_DIR", elsewhere.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("built target/wasm32-wasip2/release/hostile.wasm")
    );
    assert!(common::plugin_wasm("hostile").len() > 1000);
    assert!(
        !elsewhere.path().join("wasm32-wasip2").exists(),
        "nothing built where the tests would not look"
    );
}

#[test]
fn logs_redirected_to_a_file_carry_no_colour_codes_and_counts_read_right() {
    let (dir, _, r) = router_in_tempdir();
    let out = ok(&cli(&r, dir.path(), &["topic", "create", "one"], None));
    assert_eq!(out.trim(), "created topic one with 1 partition");
    // A script that asks for three copies stops on a single router,
    // which keeps one, before it makes an unreplicated topic.
    let three = cli(
        &r,
        dir.path(),
        &["topic", "create", "safe", "--replication-factor", "3"],
        None,
    );
    assert!(!three.status.success());
    let err = String::from_utf8_lossy(&three.stderr);
    assert!(
        err.contains("replication factor 3 is not available here"),
        "{err}"
    );
    let list = ok(&cli(&r, dir.path(), &["topic", "list"], None));
    assert!(!list.contains("safe"), "{list}");
    let one = ["topic", "create", "safe", "--replication-factor", "1"];
    ok(&cli(&r, dir.path(), &one, None));
    // A router whose log goes to a pipe, not a terminal.
    let other = dir.path().join("other");
    let mut child = Command::new(router_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&other)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() > 0);
    }
    child.kill().unwrap();
    let log = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&log.stderr);
    assert!(err.contains("router listening"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "no ANSI escapes off a terminal: {err:?}"
    );
}

/// Copies a directory tree (small: the plugin SDK).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn a_scaffolded_plugin_survives_its_checkout_moving() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // A checkout: the SDK and the lock its plugins are tested with.
    let checkout = dir.path().join("checkout");
    copy_tree(
        &repo.join("plugin-sdk/src"),
        &checkout.join("plugin-sdk/src"),
    );
    for f in ["Cargo.toml", "build.rs"] {
        std::fs::copy(
            repo.join("plugin-sdk").join(f),
            checkout.join("plugin-sdk").join(f),
        )
        .unwrap();
    }
    copy_tree(&repo.join("wit"), &checkout.join("wit"));
    std::fs::create_dir_all(checkout.join("plugins")).unwrap();
    std::fs::copy(
        repo.join("plugins/Cargo.lock"),
        checkout.join("plugins/Cargo.lock"),
    )
    .unwrap();
    let out = Command::new(router_bin())
        .args([
            "plugin",
            "new",
            "by-region",
            "--hook",
            "route",
            "--sdk",
            "plugin-sdk",
        ])
        .current_dir(&checkout)
        .output()
        .unwrap();
    let printed = ok(&out);
    // The next steps' comments line up.
    let cols: Vec<usize> = printed.lines().filter_map(|l| l.find('#')).collect();
    assert_eq!(cols.len(), 2, "{printed}");
    assert_eq!(cols[0], cols[1], "{printed}");
    let manifest = std::fs::read_to_string(checkout.join("by-region/Cargo.toml")).unwrap();
    assert!(manifest.contains(r#"path = "../plugin-sdk""#), "{manifest}");
    assert!(
        checkout.join("by-region/Cargo.lock").exists(),
        "the tested lock file"
    );

    // Move the whole checkout: the plugin still resolves its SDK.
    let moved = dir.path().join("moved");
    std::fs::rename(&checkout, &moved).unwrap();
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--offline",
            "--format-version",
            "1",
            "--no-deps",
        ])
        .current_dir(moved.join("by-region"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `publish --input json`: key, headers and message id per line; a line
/// that does not parse stops the publish, naming its line number.
#[test]
fn publish_reads_json_lines_with_a_key_headers_and_an_id_each() {
    let (dir, _, r) = router_in_tempdir();
    ok(&cli(
        &r,
        dir.path(),
        &["topic", "create", "j", "--partitions", "1"],
        None,
    ));
    let input = concat!(
        r#"{"payload": "first", "key": "k1", "headers": {"src": "json"}, "id": "a"}"#,
        "\n",
        r#"{"payload": {"total": 7}, "key": "k2"}"#,
        "\n\n",
        r#"{"payload": "again", "id": "a"}"#,
        "\n",
    );
    let out = cli(
        &r,
        dir.path(),
        &["publish", "j", "--input", "json", "--header", "via=cli"],
        Some(input.as_bytes()),
    );
    ok(&out);
    let out = ok(&cli(
        &r,
        dir.path(),
        &["subscribe", "j", "--count", "2", "--format", "json"],
        None,
    ));
    let msgs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(msgs.len(), 2, "the duplicate id stored nothing: {out}");
    assert_eq!(msgs[0]["key"], "k1");
    assert_eq!(msgs[0]["payload"], "first");
    assert_eq!(msgs[0]["headers"]["src"], "json");
    assert_eq!(msgs[0]["headers"]["via"], "cli");
    assert_eq!(msgs[1]["key"], "k2");
    assert_eq!(msgs[1]["payload"], r#"{"total":7}"#);
    let out = cli(
        &r,
        dir.path(),
        &["publish", "j", "--input", "json"],
        Some(b"{\"payload\": \"ok\"}\n{\"payload\": 1, \"colour\": \"red\"}\n"),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.contains("colour"), "{err}");
}

/// `subscribe --queue --exec CMD`: a shell worker. Exit 0 acks, exit 100
/// dead-letters, any other status is retried under the topic's policy.
#[test]
fn a_queue_worker_in_shell_acks_retries_and_dead_letters_by_exit_status() {
    let (dir, _, r) = router_in_tempdir();
    ok(&cli(
        &r,
        dir.path(),
        &["topic", "create", "jobs", "--partitions", "1"],
        None,
    ));
    ok(&cli(
        &r,
        dir.path(),
        &["topic", "config", "jobs", "--set", "retry_base_ms=100"],
        None,
    ));
    for p in ["ok", "flaky", "poison"] {
        ok(&cli(&r, dir.path(), &["publish", "jobs", p], None));
    }
    let worker = r#"p=$(cat); echo "$p@$SWITCHYARD_ATTEMPT"; case "$p" in
        ok) exit 0;;
        flaky) [ "$SWITCHYARD_ATTEMPT" -ge 2 ] && exit 0; echo "not yet" >&2; exit 3;;
        poison) echo "cannot parse" >&2; exit 100;;
    esac"#;
    let out = ok(&cli(
        &r,
        dir.path(),
        &[
            "subscribe",
            "jobs",
            "--group",
            "w",
            "--queue",
            "--exec",
            worker,
            "--count",
            "4",
        ],
        None,
    ));
    let mut runs: Vec<&str> = out.lines().collect();
    runs.sort();
    assert_eq!(runs, ["flaky@1", "flaky@2", "ok@1", "poison@1"], "{out}");
    let dlq = ok(&cli(&r, dir.path(), &["dlq", "list", "jobs"], None));
    assert!(
        dlq.contains("poison") && dlq.contains("cannot parse"),
        "{dlq}"
    );
    assert!(!dlq.contains("flaky"), "{dlq}");
    // Every message was settled: two acked, one dead-lettered, none left.
    let stats = ok(&cli(&r, dir.path(), &["queue", "stats", "jobs"], None));
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats[0]["acked"], 2, "{stats}");
    assert_eq!(stats[0]["backlog"], 0, "{stats}");
}
