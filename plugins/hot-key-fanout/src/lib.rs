//! Fan-out on read for hot keys, on write for the rest.
//!
//! Pushing a reference into every follower's inbox costs one write per
//! follower; above `threshold` followers (default 100) the message is
//! stored once and merged by each follower at read time instead.

use switchyard_plugin::prelude::*;

/// The fan-out hook.
pub fn choose(_m: &Message, followers: u32) -> FanoutMode {
    if followers > host::config_or("threshold", 100u32) {
        FanoutMode::OnRead
    } else {
        FanoutMode::OnWrite
    }
}

switchyard_plugin::export_fanout!(choose);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin::testing;

    #[test]
    fn hot_keys_go_on_read() {
        testing::reset();
        let m = TestMessage::new("").key("celebrity");
        assert_eq!(choose(&m.as_message(), 5), FanoutMode::OnWrite);
        assert_eq!(choose(&m.as_message(), 100), FanoutMode::OnWrite);
        assert_eq!(choose(&m.as_message(), 101), FanoutMode::OnRead);
        testing::set_config("threshold", "3");
        assert_eq!(choose(&m.as_message(), 5), FanoutMode::OnRead);
    }
}
