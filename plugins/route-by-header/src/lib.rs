//! Routes each message to the topic named by a header.
//!
//! Configuration (set at deploy with `--config KEY=VALUE`):
//! - `header`: the header holding the target (default `route-to`);
//! - `prefix`: prepended to the header value (default empty);
//! - `default`: the topic for messages without the header (default: keep
//!   the message on the topic it was published to).

use switchyard_plugin::prelude::*;

/// The route hook.
pub fn route(m: &Message) -> Route {
    let header = host::config("header").unwrap_or_else(|| "route-to".into());
    match m.header_str(&header) {
        Some(target) if !target.is_empty() => {
            let prefix = host::config("prefix").unwrap_or_default();
            Route::to(format!("{prefix}{target}"))
        }
        _ => match host::config("default") {
            Some(topic) => Route::to(topic),
            None => Route::keep(),
        },
    }
}

/// Deploy-time check: a message carrying the configured header is routed.
fn self_test() -> Result<(), String> {
    let header = host::config("header").unwrap_or_else(|| "route-to".into());
    match route(&TestMessage::new("x").header(header, "a").as_message()).action {
        Action::To(t) if t.len() == 1 => Ok(()),
        other => Err(format!("self-test routed to {other:?}")),
    }
}

switchyard_plugin::export_route!(route, self_test = self_test);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin::testing;

    #[test]
    fn routes_by_header_with_prefix() {
        testing::reset();
        testing::set_config("header", "region");
        testing::set_config("prefix", "orders.");
        let m = TestMessage::new("{}").header("region", "eu");
        assert_eq!(route(&m.as_message()), Route::to("orders.eu"));
    }

    #[test]
    fn falls_back_to_the_default_or_keeps() {
        testing::reset();
        let m = TestMessage::new("{}");
        assert_eq!(route(&m.as_message()), Route::keep());
        testing::set_config("default", "orders.other");
        assert_eq!(route(&m.as_message()), Route::to("orders.other"));
    }

    #[test]
    fn self_test_passes() {
        testing::reset();
        assert_eq!(self_test(), Ok(()));
    }
}
