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

/// Limits that only a misbehaving plugin reaches, even in a debug build on a
/// loaded machine.
fn generous() -> Limits {
    Limits {
        deadline: std::time::Duration::from_secs(5),
        ..Limits::default()
    }
}

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
        generous(),
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
    // The self-test is not traffic: one call, three messages.
    assert_eq!(p.stats.calls.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        p.stats.messages.load(std::sync::atomic::Ordering::Relaxed),
        3
    );
}

#[test]
fn compiled_artifacts_reload_without_compiling() {
    let engine = PluginEngine::new().unwrap();
    let p = load(&engine, "route_by_header", Hook::Route, &[]).unwrap();
    let artifact = p.precompiled().expect("serializable");
    // With a usable artifact the component bytes are not even looked at.
    let again = LoadedPlugin::load_cached(
        &engine,
        Some(&artifact),
        b"not used",
        Hook::Route,
        "again".into(),
        BTreeMap::new(),
        generous(),
        Arc::new(EmptyKv),
    )
    .unwrap();
    let d = again
        .route(vec![msg(Record::new("x").with_header("route-to", "b"))])
        .decisions
        .unwrap();
    assert_eq!(d[0].action, RouteAction::To(vec!["b".into()]));
    // A corrupt artifact falls back to compiling the component.
    let fallback = LoadedPlugin::load_cached(
        &engine,
        Some(b"garbage"),
        &plugin_wasm("route_by_header"),
        Hook::Route,
        "fallback".into(),
        BTreeMap::new(),
        generous(),
        Arc::new(EmptyKv),
    );
    assert!(fallback.is_ok());
}

#[test]
fn a_plugin_gets_no_wasi() {
    // The guest's standard library imports WASI; those imports trap. A
    // plugin that panics writes to stderr through WASI first: it must come
    // back as a trap, not crash or hang the host.
    let engine = PluginEngine::new().unwrap();
    let p = load(&engine, "hostile", Hook::Route, &[("mode", "trap")]).unwrap();
    let r = p.route(vec![msg(Record::new("x"))]);
    let e = r.decisions.unwrap_err();
    assert!(matches!(e, switchyard::plugins::CallError::Trap(_)), "{e}");
    // And the next call works on a fresh instance.
    let ok = load(&engine, "hostile", Hook::Route, &[]).unwrap();
    assert!(ok.route(vec![msg(Record::new("x"))]).decisions.is_ok());
}
