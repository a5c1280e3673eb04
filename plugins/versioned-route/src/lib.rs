//! Keeps each message on its topic (or sends it to `target`) and stamps the
//! deploy-time `version` into the `plugin-version` header, so a test can
//! tell which deployment decided each message.

use switchyard_plugin::prelude::*;

/// The route hook.
pub fn route(_m: &Message) -> Route {
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
        assert_eq!(route(&TestMessage::new("").as_message()), Route::keep().with_header("plugin-version", "v2"));
    }
}
