//! The wasmtime host against real components built from `plugins/`:
//! loading, validation, batched calls, limits.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::plugin_wasm;
use switchyard::plugins::{
    CallMessage, EmptyKv, Hook, Limits, LoadError, LoadedPlugin, PluginEngine, RouteAction,
};
use switchyard::protocol::Record;

fn msg(r: Record) -> CallMessage {
    CallMessage {
        record: r.to_raw(),
        topic: "orders".into(),
        timestamp_ms: 1,
        attempt: 0,
    }
}

fn load(
    engine: &PluginEngine,
    name: &str,
    hook: Hook,
    config: &[(&str, &str)],
) -> Result<LoadedPlugin, LoadError> {
    let config: BTreeMap<String, String> = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    LoadedPlugin::load(
        engine,
        &plugin_wasm(name),
        hook,
        format!("{name}@v1").into(),
        config,
        Limits::default(),
        Arc::new(EmptyKv),
    )
}

#[test]
fn route_by_header_decides_a_batch() {
    let engine = PluginEngine::new().unwrap();
    let p = load(
        &engine,
        "route_by_header",
        Hook::Route,
        &[("header", "region"), ("prefix", "orders.")],
    )
    .unwrap();
    p.self_test().unwrap();
    let batch = vec![
        msg(Record::new("a").with_header("region", "eu")),
        msg(Record::new("b")),
        msg(Record::new("c").with_header("region", "us")),
    ];
    let r = p.route(batch);
    let d = r.decisions.unwrap();
    assert_eq!(d.len(), 3);
    assert_eq!(d[0].action, RouteAction::To(vec!["orders.eu".into()]));
    assert_eq!(d[1].action, RouteAction::Keep);
    assert_eq!(d[2].action, RouteAction::To(vec!["orders.us".into()]));
    assert_eq!(r.batch.len(), 3, "the batch is handed back");
    assert_eq!(p.stats.calls.load(std::sync::atomic::Ordering::Relaxed), 2);
}
