//! Sets `cfg(hook)` when building a WebAssembly plugin: exactly one hook
//! feature selects the world to generate bindings for. Native builds (unit
//! tests of plugins) need no bindings, so any features may be on there.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(hook)");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("wasm32") {
        return;
    }
    let hooks = ["ROUTE", "FILTER", "PRIORITY", "FANOUT", "RETRY"];
    let enabled = hooks
        .iter()
        .filter(|h| std::env::var_os(format!("CARGO_FEATURE_{h}")).is_some())
        .count();
    if enabled > 1 {
        panic!("switchyard-plugin: enable exactly one hook feature, not {enabled}");
    }
    if enabled == 1 {
        println!("cargo::rustc-cfg=hook");
    }
}
