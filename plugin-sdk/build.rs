//! Sets `cfg(hook)` when exactly one hook feature selects a world.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(hook)");
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
