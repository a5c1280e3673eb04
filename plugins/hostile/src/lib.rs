//! A route plugin that misbehaves on purpose, to test the sandbox. The
//! `mode` configuration picks the misbehaviour:
//! - `loop`: never returns;
//! - `alloc`: allocates until memory runs out;
//! - `trap`: panics;
//! - `nowhere`: routes to a topic that does not exist;
//! - `fail-self-test`: fails its deploy-time self-test;
//! - anything else: keeps the message (well behaved).
//!
//! With `when-header=NAME`, it misbehaves only for messages carrying that
//! header and keeps the rest.

use switchyard_plugin::prelude::*;

/// The route hook.
pub fn route(m: &Message) -> Route {
    if let Some(h) = host::config("when-header")
        && m.header(&h).is_none()
    {
        return Route::keep();
    }
    match host::config("mode").as_deref() {
        Some("loop") => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Some("alloc") => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Some("trap") => panic!("hostile plugin panics on purpose"),
        Some("nowhere") => Route::to("no-such-topic-anywhere"),
        _ => Route::keep(),
    }
}

fn self_test() -> Result<(), String> {
    if host::config("mode").as_deref() == Some("fail-self-test") {
        return Err("refusing to deploy, as configured".into());
    }
    Ok(())
}

switchyard_plugin::export_route!(route, self_test = self_test);
