//! A route plugin for measuring the plugin path itself. The `read`
//! configuration picks what each call reads per message: `none` (default),
//! `key`, `header` (the `h` header) or `payload`. Every message is kept.

use std::sync::OnceLock;

use switchyard_plugin::prelude::*;

fn mode() -> &'static str {
    static MODE: OnceLock<String> = OnceLock::new();
    MODE.get_or_init(|| host::config("read").unwrap_or_else(|| "none".into()))
}

/// The route hook.
pub fn route(m: &Message) -> Route {
    let touched = match mode() {
        "key" => m.key().map_or(0, |k| k.len()),
        "header" => m.header("h").map_or(0, |h| h.len()),
        "payload" => m.payload().len(),
        _ => 0,
    };
    std::hint::black_box(touched);
    Route::keep()
}

switchyard_plugin::export_route!(route);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything() {
        assert_eq!(route(&TestMessage::new("x").as_message()), Route::keep());
    }
}
