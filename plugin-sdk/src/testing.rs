//! Native test support: build messages, set configuration, inspect logs
//! and the key/value store, all without WebAssembly.
//!
//! ```
//! use switchyard_plugin::prelude::*;
//! use switchyard_plugin::testing;
//!
//! testing::set_config("threshold", "3");
//! let m = TestMessage::new("payload").key("user-1").header("tier", "gold");
//! assert_eq!(m.as_message().header_str("tier").as_deref(), Some("gold"));
//! assert_eq!(host::config_or("threshold", 0), 3);
//! ```

use std::cell::RefCell;
use std::collections::HashMap;

use crate::host::Level;
use crate::message::Message;

/// A message built in a test.
#[derive(Debug, Clone, Default)]
pub struct TestMessage {
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
    pub(crate) payload: Vec<u8>,
    pub(crate) topic: String,
    pub(crate) timestamp_ms: u64,
    pub(crate) attempt: u32,
}

impl TestMessage {
    /// A message with this payload on topic `test`.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        TestMessage {
            payload: payload.into(),
            topic: "test".into(),
            timestamp_ms: 1_700_000_000_000,
            ..Default::default()
        }
    }
    /// Sets the key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }
    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    /// Sets the topic.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }
    /// Sets the timestamp.
    pub fn timestamp_ms(mut self, ms: u64) -> Self {
        self.timestamp_ms = ms;
        self
    }
    /// Sets the delivery attempt.
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }
    /// The [`Message`] view a hook function takes.
    pub fn as_message(&self) -> Message<'_> {
        Message::from_test(self)
    }
}

#[derive(Default)]
pub(crate) struct TestHost {
    pub(crate) config: HashMap<String, String>,
    pub(crate) kv: HashMap<String, Vec<u8>>,
    pub(crate) logs: Vec<(Level, String)>,
    pub(crate) now_ms: u64,
}

thread_local! {
    static HOST: RefCell<TestHost> = RefCell::new(TestHost {
        now_ms: 1_700_000_000_000,
        ..Default::default()
    });
}

#[cfg_attr(all(hook, target_arch = "wasm32"), allow(dead_code))]
pub(crate) fn with_host<R>(f: impl FnOnce(&mut TestHost) -> R) -> R {
    HOST.with(|h| f(&mut h.borrow_mut()))
}

/// Sets a deploy-time setting for this test thread.
pub fn set_config(key: &str, value: &str) {
    with_host(|h| {
        h.config.insert(key.into(), value.into());
    })
}

/// Clears settings, key/value store and logs for this test thread.
pub fn reset() {
    with_host(|h| {
        let now = h.now_ms;
        *h = TestHost {
            now_ms: now,
            ..Default::default()
        };
    })
}

/// Sets the clock seen by [`crate::host::now_ms`].
pub fn set_now_ms(ms: u64) {
    with_host(|h| h.now_ms = ms)
}

/// A value in the key/value store.
pub fn kv(key: &str) -> Option<Vec<u8>> {
    with_host(|h| h.kv.get(key).cloned())
}

/// Log lines written so far on this thread.
pub fn logs() -> Vec<(Level, String)> {
    with_host(|h| h.logs.clone())
}
