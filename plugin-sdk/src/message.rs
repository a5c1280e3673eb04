//! The message a hook function sees.

use crate::testing::TestMessage;

#[cfg(hook)]
use crate::bindings::switchyard::plugin::types::Batch;

/// A message: read-only, read lazily. Inside the router each accessor is
/// one call to the host, so read only what the decision needs.
pub struct Message<'a> {
    src: Source<'a>,
}

enum Source<'a> {
    #[cfg(hook)]
    Host(&'a Batch, u32),
    Test(&'a TestMessage),
}

impl<'a> Message<'a> {
    #[doc(hidden)]
    #[cfg(hook)]
    pub fn __from_host(batch: &'a Batch, index: u32) -> Self {
        Message {
            src: Source::Host(batch, index),
        }
    }

    pub(crate) fn from_test(m: &'a TestMessage) -> Self {
        Message {
            src: Source::Test(m),
        }
    }

    /// The record key, if any.
    pub fn key(&self) -> Option<Vec<u8>> {
        match &self.src {
            #[cfg(hook)]
            Source::Host(b, i) => b.key(*i),
            Source::Test(m) => m.key.clone(),
        }
    }

    /// The key as UTF-8 text, if it is present and valid.
    pub fn key_str(&self) -> Option<String> {
        self.key().and_then(|k| String::from_utf8(k).ok())
    }

    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<Vec<u8>> {
        match &self.src {
            #[cfg(hook)]
            Source::Host(b, i) => b.header(*i, name),
            Source::Test(m) => m
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone()),
        }
    }

    /// The first header with this name as UTF-8 text, if valid.
    pub fn header_str(&self, name: &str) -> Option<String> {
        self.header(name).and_then(|v| String::from_utf8(v).ok())
    }

    /// All headers, in order.
    pub fn headers(&self) -> Vec<(String, Vec<u8>)> {
        match &self.src {
            #[cfg(hook)]
            Source::Host(b, i) => b.headers(*i),
            Source::Test(m) => m.headers.clone(),
        }
    }

    /// The payload.
    pub fn payload(&self) -> Vec<u8> {
        match &self.src {
            #[cfg(hook)]
            Source::Host(b, i) => b.payload(*i),
            Source::Test(m) => m.payload.clone(),
        }
    }

    /// The topic the message was published (or is delivered) to.
    pub fn topic(&self) -> String {
        match &self.src {
            #[cfg(hook)]
            Source::Host(b, i) => b.topic(*i),
            Source::Test(m) => m.topic.clone(),
        }
    }

    /// Publish time, ms since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        match &self.src {
            #[cfg(hook)]
            Source::Host(b, i) => b.timestamp_ms(*i),
            Source::Test(m) => m.timestamp_ms,
        }
    }

    /// Delivery attempt: 0 at publish, 1 at first delivery, then retries.
    pub fn attempt(&self) -> u32 {
        match &self.src {
            #[cfg(hook)]
            Source::Host(b, i) => b.attempt(*i),
            Source::Test(m) => m.attempt,
        }
    }
}
