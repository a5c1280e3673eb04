//! Subscriptions: reading the log for a subscriber and pushing records to it
//! under credit-based flow control.
//!
//! Two modes. Stream subscriptions (Kafka-like): a group splits partitions
//! and commits offsets. Queue subscriptions (RabbitMQ/SQS-like): members
//! compete for individual messages with per-message acks, visibility
//! timeouts, retries, priority, delay, TTL and dead letters. Each
//! subscription writes to its own stream, so a subscriber that stops reading
//! only stalls itself.

pub mod feed;
pub mod queue;
pub mod ranges;
pub mod stream;

pub use feed::FeedSubscription;
pub use queue::{QueueEvent, QueueGroup, QueueSubscription};
pub use stream::{DeliveryError, StreamSubscription, SubEvent};

/// What a subscriber is sent, before its stream ends, when its topic is deleted.
pub(crate) fn topic_deleted(topic: &str) -> crate::protocol::Frame {
    crate::protocol::Frame::Error {
        id: 0,
        code: crate::protocol::ErrorCode::UnknownTopic,
        message: format!("topic '{topic}' was deleted"),
    }
}
