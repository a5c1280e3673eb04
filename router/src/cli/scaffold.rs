//! `switchyard plugin new`: a plugin crate that tests natively and builds
//! for wasm32-wasip2 out of the box.

use std::path::Path;

use anyhow::Context;

fn body(hook: &str) -> anyhow::Result<(&'static str, &'static str)> {
    Ok(match hook {
        "route" => (
            r#"/// Sends messages with a `region` header to `orders.<region>`; keeps the rest.
pub fn route(m: &Message) -> Route {
    match m.header_str("region") {
        Some(region) => Route::to(format!("orders.{region}")),
        None => Route::keep(),
    }
}

switchyard_plugin::export_route!(route);"#,
            r#"    #[test]
    fn routes_by_region() {
        let m = TestMessage::new("{}").header("region", "eu");
        assert_eq!(route(&m.as_message()), Route::to("orders.eu"));
        assert_eq!(route(&TestMessage::new("{}").as_message()), Route::keep());
    }"#,
        ),
        "filter" => (
            r#"/// Delivers only messages whose payload contains the configured `needle`.
pub fn filter(_sub: &Subscriber, m: &Message) -> bool {
    let needle = host::config("needle").unwrap_or_default();
    String::from_utf8_lossy(&m.payload()).contains(&needle)
}

switchyard_plugin::export_filter!(filter);"#,
            r#"    #[test]
    fn keeps_matching_payloads() {
        switchyard_plugin::testing::set_config("needle", "paid");
        let sub = Subscriber::default();
        assert!(filter(&sub, &TestMessage::new("order paid").as_message()));
        assert!(!filter(&sub, &TestMessage::new("order open").as_message()));
    }"#,
        ),
        "priority" => (
            r#"/// Priority 9 for messages marked urgent, 4 otherwise.
pub fn priority(m: &Message) -> u8 {
    if m.header_str("urgent").as_deref() == Some("true") { 9 } else { 4 }
}

switchyard_plugin::export_priority!(priority);"#,
            r#"    #[test]
    fn urgent_is_high() {
        assert_eq!(priority(&TestMessage::new("").header("urgent", "true").as_message()), 9);
        assert_eq!(priority(&TestMessage::new("").as_message()), 4);
    }"#,
        ),
        "fanout" => (
            r#"/// Fan out on read above 100 followers, on write below.
pub fn choose(_m: &Message, followers: u32) -> FanoutMode {
    if followers > 100 { FanoutMode::OnRead } else { FanoutMode::OnWrite }
}

switchyard_plugin::export_fanout!(choose);"#,
            r#"    #[test]
    fn hot_keys_on_read() {
        assert_eq!(choose(&TestMessage::new("").as_message(), 1000), FanoutMode::OnRead);
        assert_eq!(choose(&TestMessage::new("").as_message(), 3), FanoutMode::OnWrite);
    }"#,
        ),
        "retry" => (
            r#"/// Retries after 1 s, 2 s, 4 s; dead-letters after the third attempt.
pub fn on_failure(m: &Message, f: &Failure) -> RetryDecision {
    if !f.retryable || m.attempt() >= 3 {
        return RetryDecision::dead_letter(f.message.clone());
    }
    RetryDecision::RetryAfterMs(1000 << m.attempt().saturating_sub(1))
}

switchyard_plugin::export_retry!(on_failure);"#,
            r#"    #[test]
    fn backs_off_then_gives_up() {
        let f = Failure { code: "e".into(), message: "boom".into(), retryable: true };
        assert_eq!(on_failure(&TestMessage::new("").attempt(2).as_message(), &f), RetryDecision::RetryAfterMs(2000));
        assert!(matches!(on_failure(&TestMessage::new("").attempt(3).as_message(), &f), RetryDecision::DeadLetter(_)));
    }"#,
        ),
        other => {
            anyhow::bail!("unknown hook '{other}': use route, filter, priority, fanout or retry")
        }
    })
}

/// Writes the crate.
pub(super) fn create(dir: &Path, name: &str, hook: &str, sdk: &Path) -> anyhow::Result<()> {
    let (code, test) = body(hook)?;
    if dir.exists()
        && dir
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        anyhow::bail!("{} already exists and is not empty", dir.display());
    }
    let sdk = sdk
        .canonicalize()
        .with_context(|| format!("SDK not found at {} (pass --sdk PATH)", sdk.display()))?;
    std::fs::create_dir_all(dir.join("src"))?;
    // Relative, so the plugin keeps building when the checkout it sits in
    // moves (with the plugin inside or beside it).
    let here = dir.canonicalize()?;
    let sdk_path = relative(&here, &sdk)
        .display()
        .to_string()
        .replace('\\', "/");
    let cargo = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
switchyard-plugin = {{ path = "{sdk}", features = ["{hook}"] }}

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true

# A plugin is its own workspace.
[workspace]
"#,
        sdk = sdk_path
    );
    std::fs::write(dir.join("Cargo.toml"), cargo)?;
    // The versions the SDK's own plugins are built and tested with; cargo
    // adds this crate to it on the first build and keeps the rest pinned.
    let tested = sdk.parent().map(|p| p.join("plugins/Cargo.lock"));
    if let Some(lock) = tested.filter(|l| l.exists()) {
        std::fs::copy(&lock, dir.join("Cargo.lock"))
            .with_context(|| format!("copying {}", lock.display()))?;
    }
    let lib = format!(
        "//! A Switchyard {hook} plugin.\n\nuse switchyard_plugin::prelude::*;\n\n{code}\n\n#[cfg(test)]\nmod tests {{\n    use super::*;\n\n{test}\n}}\n"
    );
    std::fs::write(dir.join("src/lib.rs"), lib)?;
    std::fs::write(dir.join(".gitignore"), "/target\n")?;
    Ok(())
}

/// The path from directory `from` to `to`, both absolute: `..` up to their
/// common ancestor, then down.
fn relative(from: &Path, to: &Path) -> std::path::PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = std::path::PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_common_ancestor() {
        let r = relative(Path::new("/a/b/plugin"), Path::new("/a/sdk"));
        assert_eq!(r, Path::new("../../sdk"));
        assert_eq!(relative(Path::new("/a"), Path::new("/a/b")), Path::new("b"));
    }
}
