//! Plugin call cost, per message: batched vs one call per message, reading
//! nothing, a header, or the payload (100 B and 4 KiB) through the host
//! resource, and each example hook with a realistic batch.
//!
//! Needs the components: `plugins/build.sh` first.

#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchyard::plugins::{
    CallMessage, EmptyKv, Failure, Hook, Limits, LoadedPlugin, PluginEngine, Subscriber,
};
use switchyard::protocol::Record;

fn wasm(name: &str) -> Vec<u8> {
    let p = format!(
        "{}/../plugins/target/wasm32-wasip2/release/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}; run plugins/build.sh first"))
}

fn load(engine: &PluginEngine, name: &str, hook: Hook, config: &[(&str, &str)]) -> LoadedPlugin {
    let config: BTreeMap<String, String> = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    LoadedPlugin::load(
        engine,
        &wasm(name),
        hook,
        name.into(),
        config,
        // Far above any call here: benchmarks measure, they do not enforce.
        Limits {
            deadline: std::time::Duration::from_secs(5),
            ..Limits::default()
        },
        Arc::new(EmptyKv),
    )
    .unwrap()
}

fn batch(n: usize, payload: usize) -> Vec<CallMessage> {
    (0..n)
        .map(|i| CallMessage {
            record: Record::new(vec![b'x'; payload])
                .with_key(format!("key-{i}"))
                .with_header("h", "eu")
                .with_header("tenant", "acme")
                .to_raw(),
            topic: "bench".into(),
            timestamp_ms: 1,
            attempt: 1,
        })
        .collect()
}

fn calls(c: &mut Criterion) {
    let engine = PluginEngine::new().unwrap();

    // Batched (one call per 256 messages) vs one call per message.
    let mut g = c.benchmark_group("plugin_route_probe");
    for read in ["none", "header", "payload"] {
        let p = load(&engine, "probe", Hook::Route, &[("read", read)]);
        for payload in [100usize, 4096] {
            if read != "payload" && payload != 100 {
                continue;
            }
            for per_call in [1usize, 256] {
                let msgs = batch(256, payload);
                g.throughput(Throughput::Elements(256));
                let id = format!("read={read}/payload={payload}B/batch={per_call}");
                g.bench_function(BenchmarkId::from_parameter(id), |b| {
                    b.iter_batched(
                        || msgs.clone(),
                        |msgs| {
                            let mut it = msgs.into_iter().peekable();
                            while it.peek().is_some() {
                                let chunk: Vec<_> = it.by_ref().take(per_call).collect();
                                let r = p.route(chunk);
                                assert!(r.decisions.is_ok());
                            }
                        },
                        criterion::BatchSize::SmallInput,
                    )
                });
            }
        }
    }
    g.finish();

    // The example plugin of each hook, 256 messages of 100 B per call.
    let mut g = c.benchmark_group("plugin_hook");
    g.throughput(Throughput::Elements(256));
    let msgs = batch(256, 100);
    let route = load(&engine, "route_by_header", Hook::Route, &[("header", "h")]);
    g.bench_function("route/route_by_header", |b| {
        b.iter_batched(
            || msgs.clone(),
            |m| route.route(m).decisions.unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    let json_msgs: Vec<CallMessage> = (0..256)
        .map(|i| CallMessage {
            record: Record::new(format!(
                r#"{{"status": "{}", "total": {i}}}"#,
                if i % 2 == 0 { "paid" } else { "open" }
            ))
            .to_raw(),
            topic: "bench".into(),
            timestamp_ms: 1,
            attempt: 1,
        })
        .collect();
    let filter = load(
        &engine,
        "content_filter",
        Hook::Filter,
        &[("field", "status"), ("equals", "paid")],
    );
    let sub = Subscriber {
        group: "g".into(),
        topic: "bench".into(),
    };
    g.bench_function("filter/content_filter_json", |b| {
        b.iter_batched(
            || json_msgs.clone(),
            |m| filter.filter(&sub, m).decisions.unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    let prio = load(
        &engine,
        "tenant_priority",
        Hook::Priority,
        &[("tenant.acme", "gold"), ("tier.gold", "9")],
    );
    g.bench_function("priority/tenant_priority", |b| {
        b.iter_batched(
            || msgs.clone(),
            |m| prio.priority(m).decisions.unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    let fan = load(&engine, "hot_key_fanout", Hook::Fanout, &[]);
    let followers = vec![150u32; 256];
    g.bench_function("fanout/hot_key_fanout", |b| {
        b.iter_batched(
            || msgs.clone(),
            |m| fan.fanout(m, &followers).decisions.unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("plugin_retry");
    g.throughput(Throughput::Elements(1));
    let retry = load(&engine, "retry_backoff", Hook::Retry, &[]);
    let failure = Failure {
        code: "timeout".into(),
        message: "slow".into(),
        retryable: true,
    };
    let one = batch(1, 100).remove(0);
    g.bench_function("retry/retry_backoff", |b| {
        b.iter_batched(
            || one.clone(),
            |m| retry.retry(m, &failure).decisions.unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, calls);
criterion_main!(benches);
