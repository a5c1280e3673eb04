//! Subscriptions: reading the log for a subscriber and pushing records to it
//! under credit-based flow control.
//!
//! This mode is the stream subscription (Kafka-like: a group splits
//! partitions, offsets are committed). Each subscription writes to its own
//! stream, so a subscriber that stops reading only stalls itself.

pub mod stream;

pub use stream::{DeliveryError, StreamSubscription, SubEvent};
