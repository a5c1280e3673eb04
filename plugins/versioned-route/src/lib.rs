//! Keeps each message on its topic (or sends it to `target`) and stamps the
//! deploy-time `version` into the `plugin-version` header, so a test can
//! tell which deployment decided each message. With `count-key`, it also
//! counts the messages it decided in its key/value store.

use switchyard_plugin::prelude::*;

/// The route hook.
pub fn route(_m: &Message) -> Route {
    if let Some(key) = host::config("count-key") {
        let n: u64 = host::kv_get(&key)
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        host::kv_set(&key, (n + 1).to_string().as_bytes());
    }
    let version = host::config("version").unwrap_or_else(|| "unset".into());
    let r = match host::config("target") {
        Some(t) => Route::to(t),
        None => Route::keep(),
    };
    r.with_header("plugin-version", version)
}

switchyard_plugin::export_route!(route);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin::testing;

    #[test]
    fn stamps_the_configured_version() {
        testing::reset();
        testing::set_config("version", "v2");
        assert_eq!(
            route(&TestMessage::new("").as_message()),
            Route::keep().with_header("plugin-version", "v2")
        );
    }

    #[test]
    fn counts_in_the_store() {
        testing::reset();
        testing::set_config("count-key", "seen");
        for _ in 0..3 {
            route(&TestMessage::new("").as_message());
        }
        assert_eq!(testing::kv("seen"), Some(b"3".to_vec()));
    }
}
