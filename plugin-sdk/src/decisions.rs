//! Typed decisions a hook returns.

use std::time::Duration;

/// What happens to a message at publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Store it on the topic it was published to.
    Keep,
    /// Store it on these topics instead.
    To(Vec<String>),
    /// Acknowledge it and store it nowhere.
    Drop,
    /// Refuse it; the producer sees the reason.
    Reject(String),
}

/// A route decision: an [`Action`] plus headers to add to the stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Where the message goes.
    pub action: Action,
    /// Headers appended to the stored record.
    pub add_headers: Vec<(String, Vec<u8>)>,
}

impl Route {
    fn new(action: Action) -> Self {
        Route {
            action,
            add_headers: Vec::new(),
        }
    }
    /// Keep the message on its own topic.
    pub fn keep() -> Self {
        Route::new(Action::Keep)
    }
    /// Send the message to `topic` instead.
    pub fn to(topic: impl Into<String>) -> Self {
        Route::new(Action::To(vec![topic.into()]))
    }
    /// Copy the message to each of `topics`.
    pub fn to_many<I, S>(topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Route::new(Action::To(topics.into_iter().map(Into::into).collect()))
    }
    /// Acknowledge and discard the message.
    pub fn drop() -> Self {
        Route::new(Action::Drop)
    }
    /// Refuse the message with a reason the producer sees.
    pub fn reject(reason: impl Into<String>) -> Self {
        Route::new(Action::Reject(reason.into()))
    }
    /// Adds a header to the stored record.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.add_headers.push((name.into(), value.into()));
        self
    }
}

/// How a message reaches the subscriptions that follow its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanoutMode {
    /// Push a reference into each follower's inbox at publish time.
    OnWrite,
    /// Store once; each follower merges at read time.
    OnRead,
}

/// Why processing a message failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Application code from the nack, or a router code such as `visibility-timeout`.
    pub code: String,
    /// Human-readable detail.
    pub message: String,
    /// Whether the consumer thinks a retry can succeed.
    pub retryable: bool,
}

/// What to do with a failed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryDecision {
    /// Deliver again after this many milliseconds.
    RetryAfterMs(u64),
    /// Move to the dead-letter topic with this reason.
    DeadLetter(String),
}

impl RetryDecision {
    /// Retry after `delay`.
    pub fn retry_after(delay: Duration) -> Self {
        RetryDecision::RetryAfterMs(delay.as_millis().min(u64::MAX as u128) as u64)
    }
    /// Dead-letter with `reason`.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        RetryDecision::DeadLetter(reason.into())
    }
}

/// The subscription a filter decides for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subscriber {
    /// Consumer group (empty for an anonymous subscription).
    pub group: String,
    /// Topic.
    pub topic: String,
}

/// Conversions to the generated WIT types, used by the export macros.
pub(crate) mod wit {
    #[cfg(hook)]
    #[allow(unused_imports)]
    use crate::bindings::switchyard::plugin::types as t;

    #[cfg(all(hook, feature = "route"))]
    #[doc(hidden)]
    pub fn route_to_wit(r: super::Route) -> t::RouteDecision {
        t::RouteDecision {
            action: match r.action {
                super::Action::Keep => t::RouteAction::Keep,
                super::Action::To(v) => t::RouteAction::To(v),
                super::Action::Drop => t::RouteAction::Drop,
                super::Action::Reject(s) => t::RouteAction::Reject(s),
            },
            add_headers: r.add_headers,
        }
    }

    #[cfg(all(hook, feature = "filter"))]
    #[doc(hidden)]
    pub fn subscriber_from_wit(s: t::Subscriber) -> super::Subscriber {
        super::Subscriber {
            group: s.group,
            topic: s.topic,
        }
    }

    #[cfg(all(hook, feature = "fanout"))]
    #[doc(hidden)]
    pub fn fanout_to_wit(m: super::FanoutMode) -> t::FanoutMode {
        match m {
            super::FanoutMode::OnWrite => t::FanoutMode::OnWrite,
            super::FanoutMode::OnRead => t::FanoutMode::OnRead,
        }
    }

    #[cfg(all(hook, feature = "retry"))]
    #[doc(hidden)]
    pub fn failure_from_wit(f: t::Failure) -> super::Failure {
        super::Failure {
            code: f.code,
            message: f.message,
            retryable: f.retryable,
        }
    }

    #[cfg(all(hook, feature = "retry"))]
    #[doc(hidden)]
    pub fn retry_to_wit(d: super::RetryDecision) -> t::RetryDecision {
        match d {
            super::RetryDecision::RetryAfterMs(ms) => t::RetryDecision::RetryAfterMs(ms),
            super::RetryDecision::DeadLetter(s) => t::RetryDecision::DeadLetter(s),
        }
    }
}
