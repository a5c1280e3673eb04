//! Switchyard: a programmable event router.
//!
//! # Layout
//!
//! A publish travels down these modules, and a delivery back up:
//!
//! - [`protocol`]: frames, the record format, error codes (no I/O).
//! - `server`: the QUIC endpoint, TLS, one task per connection and per stream.
//! - [`auth`]: principals, tokens, grants and quotas; every request is
//!   checked against the connection's principal.
//! - [`broker`]: topics, partitioning, consumer groups; the ingress and egress
//!   paths between the server and storage.
//! - [`storage`]: redb partition logs with group commit, offsets, retention.
//! - [`client`]: the Rust client, which speaks [`protocol`] and nothing else.
//! - `cli`: the `switchyard` command.
//!
//! Connection -> frame -> broker -> storage writer -> fsync -> ack.

pub mod auth;
pub mod broker;
pub mod cli;
pub mod cluster;
pub mod delivery;
#[doc(hidden)]
pub mod fuzzing;
pub mod plugins;
pub mod server;
pub mod storage;

pub use switchyard_client as client;
pub use switchyard_protocol as protocol;
pub use switchyard_protocol::transport;
