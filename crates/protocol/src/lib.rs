//! The wire protocol: frames, the record format, error codes and version
//! negotiation. Pure data and codecs, no I/O (the `quinn-proto` habit), so it
//! is unit-tested and fuzzed without sockets. `docs/protocol.md` is its
//! human-readable specification.

mod error;
mod frame;
pub mod headers;
mod record;
pub mod transport;

pub use error::{DecodeError, ErrorCode, WireError};
pub use frame::{
    Delivered, DeliveryTag, FRAME_HEADER_LEN, Frame, PartitionInfo, PublishBatchWriter,
    QueueDelivered, StartPosition, SubscribeMode, TopicInfo, decode, put_deliver_header,
    put_delivered, put_queue_deliver_header, put_queue_delivered,
};
pub use record::key_of;
pub use record::{RawRecord, Record};

/// The ALPN identifier both sides require during the TLS handshake: a
/// single router's, and a cluster's group 0.
pub const ALPN: &[u8] = b"switchyard";

/// The ALPN that asks a cluster node for the router of Raft group
/// `group`: [`ALPN`] for group 0, `switchyard/g<group>` for the others.
/// A node hands each connection to the router of the group its handshake
/// named, or redirects it to that group's leader, before any stream is
/// read.
pub fn alpn(group: u32) -> Vec<u8> {
    match group {
        0 => ALPN.to_vec(),
        g => format!("switchyard/g{g}").into_bytes(),
    }
}

/// The group an ALPN identifier names (the inverse of [`alpn`]).
pub fn alpn_group(alpn: &[u8]) -> Option<u32> {
    if alpn == ALPN {
        return Some(0);
    }
    let g: u32 = std::str::from_utf8(alpn.strip_prefix(b"switchyard/g")?)
        .ok()?
        .parse()
        .ok()?;
    (g > 0 && self::alpn(g) == alpn).then_some(g)
}

/// Protocol versions this build speaks, inclusive.
pub const MIN_VERSION: u8 = 1;
/// Highest protocol version this build speaks. Version 2 adds the
/// cluster's nodes to `HelloOk`; a version 1 peer never sees them.
pub const MAX_VERSION: u8 = 2;

/// Picks the highest version both sides speak, if any.
pub fn negotiate(client_min: u8, client_max: u8) -> Option<u8> {
    let hi = client_max.min(MAX_VERSION);
    let lo = client_min.max(MIN_VERSION);
    (lo <= hi).then_some(hi)
}

/// QUIC application close codes, sent when a whole connection ends.
pub mod close {
    /// Normal close by either side.
    pub const NORMAL: u32 = 0;
    /// The peer broke the protocol (malformed frame, unexpected frame).
    pub const PROTOCOL_VIOLATION: u32 = 1;
    /// The router is shutting down.
    pub const SHUTTING_DOWN: u32 = 2;
    /// No common protocol version.
    pub const UNSUPPORTED_VERSION: u32 = 3;
    /// The router is at its connection limit.
    pub const TOO_MANY_CONNECTIONS: u32 = 4;
    /// No valid credential, or the principal's credential or grants were
    /// revoked while connected.
    pub const UNAUTHENTICATED: u32 = 5;
    /// The peer went past a limit on partially received frames (memory
    /// budget, frame timeout) or on connections from its address.
    pub const LIMIT_EXCEEDED: u32 = 6;
    /// The connection had no stream open and made no request for the
    /// router's `connection_max_idle_ms`; reconnect when needed.
    pub const IDLE: u32 = 7;
    /// A cluster node that is not the leader: the reason is the leader's
    /// client address (empty while an election is under way). Connect
    /// there instead.
    pub const NOT_LEADER: u32 = 8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_highest_common_version() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 9), Some(MAX_VERSION));
        assert_eq!(negotiate(1, 2), Some(2));
        assert_eq!(negotiate(MAX_VERSION + 1, 9), None);
        assert_eq!(negotiate(0, 0), None);
    }

    #[test]
    fn a_group_round_trips_through_its_alpn_and_nothing_else_names_one() {
        assert_eq!(alpn(0), ALPN);
        assert_eq!(alpn(3), b"switchyard/g3");
        for g in [0, 1, 2, 17, u32::MAX] {
            assert_eq!(alpn_group(&alpn(g)), Some(g));
        }
        for other in [
            &b"switchyard/g0"[..],
            b"switchyard/g01",
            b"switchyard/g",
            b"switchyard/gx",
            b"h3",
        ] {
            assert_eq!(alpn_group(other), None, "{other:?}");
        }
    }
}
