//! What the router offers a plugin: logging, deploy-time configuration, a
//! durable key/value store and a clock.
//!
//! Inside the router these call the host. In native `cargo test` runs they
//! use an in-memory stand-in that [`crate::testing`] lets tests set up and
//! inspect.

/// Log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Very verbose.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something looks wrong.
    Warn,
    /// Something failed.
    Error,
}

#[cfg(all(hook, target_arch = "wasm32"))]
mod imp {
    use super::Level;
    use crate::bindings::switchyard::plugin::host as h;

    pub(super) fn log(level: Level, message: &str) {
        let l = match level {
            Level::Trace => h::Level::Trace,
            Level::Debug => h::Level::Debug,
            Level::Info => h::Level::Info,
            Level::Warn => h::Level::Warn,
            Level::Error => h::Level::Error,
        };
        h::log(l, message)
    }
    /// Configuration is fixed for a deployed version: fetch it once per
    /// instance instead of one host call (and string copy) per lookup.
    fn cached() -> &'static std::collections::BTreeMap<String, String> {
        static CONFIG: std::sync::OnceLock<std::collections::BTreeMap<String, String>> =
            std::sync::OnceLock::new();
        CONFIG.get_or_init(|| h::config_all().into_iter().collect())
    }
    pub(super) fn config(key: &str) -> Option<String> {
        cached().get(key).cloned()
    }
    pub(super) fn config_all() -> Vec<(String, String)> {
        cached()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
    pub(super) fn kv_get(key: &str) -> Option<Vec<u8>> {
        h::kv_get(key)
    }
    pub(super) fn kv_set(key: &str, value: &[u8]) {
        h::kv_set(key, value)
    }
    pub(super) fn now_ms() -> u64 {
        h::now_ms()
    }
}

#[cfg(not(all(hook, target_arch = "wasm32")))]
mod imp {
    use super::Level;
    use crate::testing::with_host;

    pub(super) fn log(level: Level, message: &str) {
        with_host(|h| h.logs.push((level, message.to_string())))
    }
    pub(super) fn config(key: &str) -> Option<String> {
        with_host(|h| h.config.get(key).cloned())
    }
    pub(super) fn config_all() -> Vec<(String, String)> {
        with_host(|h| {
            let mut v: Vec<_> = h
                .config
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            v.sort();
            v
        })
    }
    pub(super) fn kv_get(key: &str) -> Option<Vec<u8>> {
        with_host(|h| h.kv.get(key).cloned())
    }
    pub(super) fn kv_set(key: &str, value: &[u8]) {
        with_host(|h| {
            h.kv.insert(key.to_string(), value.to_vec());
        })
    }
    pub(super) fn now_ms() -> u64 {
        with_host(|h| h.now_ms)
    }
}

/// Writes to the router's log, tagged with the plugin's name and version.
pub fn log(level: Level, message: &str) {
    imp::log(level, message)
}

/// A deploy-time setting (`switchyard plugin deploy --config KEY=VALUE`).
pub fn config(key: &str) -> Option<String> {
    imp::config(key)
}

/// A deploy-time setting parsed as `T`, or `default` if absent or unparsable.
pub fn config_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    config(key).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// All deploy-time settings, sorted by key.
pub fn config_all() -> Vec<(String, String)> {
    imp::config_all()
}

/// Reads the plugin's durable key/value store.
pub fn kv_get(key: &str) -> Option<Vec<u8>> {
    imp::kv_get(key)
}

/// Writes the plugin's durable key/value store. The write becomes durable
/// together with the message whose decision made it.
pub fn kv_set(key: &str, value: &[u8]) {
    imp::kv_set(key, value)
}

/// Milliseconds since the Unix epoch, from the router's clock.
pub fn now_ms() -> u64 {
    imp::now_ms()
}
