//! Stable error codes carried in `Error` frames, and the decoder's own errors.

use std::fmt;

/// A stable, documented error code. The numeric values are part of the wire
/// protocol (`docs/protocol.md`) and never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The client and router share no protocol version.
    UnsupportedVersion,
    /// A frame could not be decoded; the connection is closed.
    MalformedFrame,
    /// A frame is larger than the router's `max_frame_bytes`.
    FrameTooLarge,
    /// A frame arrived that is not valid at this point of the conversation.
    UnexpectedFrame,
    /// The named topic does not exist.
    UnknownTopic,
    /// A topic with this name already exists.
    TopicExists,
    /// A topic name is empty, too long, or uses characters outside `[A-Za-z0-9._-]`.
    InvalidTopicName,
    /// A partition count is zero or above the router's limit.
    InvalidPartitions,
    /// A record is larger than the router's `max_message_bytes`.
    MessageTooLarge,
    /// A request carries an argument the router cannot accept.
    InvalidArgument,
    /// A consumer group name is invalid.
    InvalidGroup,
    /// A plugin failed validation at deploy time (not Wasm, wrong hook, self-test).
    PluginInvalid,
    /// No plugin with this name is deployed.
    UnknownPlugin,
    /// A plugin failed at run time and its failure mode is `reject`.
    PluginFailed,
    /// A route plugin rejected the message; the message says why.
    Rejected,
    /// An ack, nack or extend named a delivery that is not in flight: unknown,
    /// already settled, or redelivered after its visibility timeout.
    UnknownDelivery,
    /// A delay or delivery time is malformed or further ahead than the topic allows.
    InvalidDelay,
    /// A priority is not a number from 0 to 9.
    InvalidPriority,
    /// The connection presented no credential, or one the router does not
    /// know (wrong, revoked or expired token; certificate of another CA).
    Unauthenticated,
    /// The principal lacks the grant this request needs; the message names it.
    Forbidden,
    /// The topic belongs to another Raft group of the cluster than the one
    /// whose router was asked; the message names it (`group=N`). A client
    /// that routes by topic looks the topic up again and asks that group.
    WrongGroup,
    /// The storage layer failed (for example a full disk); nothing was acknowledged.
    Storage,
    /// The router is shutting down; retry against another router or later.
    ShuttingDown,
    /// A limit on connections, streams or subscriptions was reached.
    LimitExceeded,
    /// The topic's backlog is at its limit; the message says when to retry
    /// (`retry_after_ms=N`). Nothing of the batch was stored.
    BacklogFull,
    /// The router's disk is full or below its free-space reserve; nothing
    /// of the request was stored. Reads keep working; writes resume once
    /// space is freed.
    StorageFull,
    /// An unexpected internal error; the router logged details.
    Internal,
    /// A code this library does not know (from a newer router).
    Unknown(u16),
}

impl ErrorCode {
    /// The numeric value on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::UnsupportedVersion => 1,
            ErrorCode::MalformedFrame => 2,
            ErrorCode::FrameTooLarge => 3,
            ErrorCode::UnexpectedFrame => 4,
            ErrorCode::UnknownTopic => 100,
            ErrorCode::TopicExists => 101,
            ErrorCode::InvalidTopicName => 102,
            ErrorCode::InvalidPartitions => 103,
            ErrorCode::MessageTooLarge => 104,
            ErrorCode::InvalidArgument => 105,
            ErrorCode::InvalidGroup => 106,
            ErrorCode::PluginInvalid => 107,
            ErrorCode::UnknownPlugin => 108,
            ErrorCode::PluginFailed => 109,
            ErrorCode::Rejected => 110,
            ErrorCode::UnknownDelivery => 111,
            ErrorCode::InvalidDelay => 112,
            ErrorCode::InvalidPriority => 113,
            ErrorCode::Unauthenticated => 114,
            ErrorCode::Forbidden => 115,
            ErrorCode::WrongGroup => 116,
            ErrorCode::Storage => 200,
            ErrorCode::ShuttingDown => 201,
            ErrorCode::LimitExceeded => 202,
            ErrorCode::BacklogFull => 203,
            ErrorCode::StorageFull => 204,
            ErrorCode::Internal => 255,
            ErrorCode::Unknown(v) => v,
        }
    }

    /// Parses a wire value; unknown values are kept as [`ErrorCode::Unknown`].
    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => ErrorCode::UnsupportedVersion,
            2 => ErrorCode::MalformedFrame,
            3 => ErrorCode::FrameTooLarge,
            4 => ErrorCode::UnexpectedFrame,
            100 => ErrorCode::UnknownTopic,
            101 => ErrorCode::TopicExists,
            102 => ErrorCode::InvalidTopicName,
            103 => ErrorCode::InvalidPartitions,
            104 => ErrorCode::MessageTooLarge,
            105 => ErrorCode::InvalidArgument,
            106 => ErrorCode::InvalidGroup,
            107 => ErrorCode::PluginInvalid,
            108 => ErrorCode::UnknownPlugin,
            109 => ErrorCode::PluginFailed,
            110 => ErrorCode::Rejected,
            111 => ErrorCode::UnknownDelivery,
            112 => ErrorCode::InvalidDelay,
            113 => ErrorCode::InvalidPriority,
            114 => ErrorCode::Unauthenticated,
            115 => ErrorCode::Forbidden,
            116 => ErrorCode::WrongGroup,
            200 => ErrorCode::Storage,
            201 => ErrorCode::ShuttingDown,
            202 => ErrorCode::LimitExceeded,
            203 => ErrorCode::BacklogFull,
            204 => ErrorCode::StorageFull,
            255 => ErrorCode::Internal,
            v => ErrorCode::Unknown(v),
        }
    }

    /// A short, stable name, as printed by the CLI (`E104 message_too_large`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnexpectedFrame => "unexpected_frame",
            ErrorCode::UnknownTopic => "unknown_topic",
            ErrorCode::TopicExists => "topic_exists",
            ErrorCode::InvalidTopicName => "invalid_topic_name",
            ErrorCode::InvalidPartitions => "invalid_partitions",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::InvalidGroup => "invalid_group",
            ErrorCode::PluginInvalid => "plugin_invalid",
            ErrorCode::UnknownPlugin => "unknown_plugin",
            ErrorCode::PluginFailed => "plugin_failed",
            ErrorCode::Rejected => "rejected",
            ErrorCode::UnknownDelivery => "unknown_delivery",
            ErrorCode::InvalidDelay => "invalid_delay",
            ErrorCode::InvalidPriority => "invalid_priority",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::WrongGroup => "wrong_group",
            ErrorCode::Storage => "storage",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::BacklogFull => "backlog_full",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown(_) => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "E{} {}", self.as_u16(), self.name())
    }
}

/// An application error: a code plus a human-readable message saying what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    /// The stable code.
    pub code: ErrorCode,
    /// What went wrong and, where possible, what to do next.
    pub message: String,
}

impl WireError {
    /// Builds an error from a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
}

/// Why a byte sequence is not a valid frame. Any of these is a protocol
/// violation: the peer closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix exceeds the configured maximum frame size.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced frame length.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// The frame type byte is not one this version knows.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// A field runs past the end of its frame or record.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A string field is not valid UTF-8.
    #[error("invalid UTF-8 in {0}")]
    InvalidUtf8(&'static str),
    /// A frame has bytes left over after its last field.
    #[error("{0} trailing bytes in frame")]
    TrailingBytes(usize),
    /// A field has a value outside its allowed range.
    #[error("invalid value for {0}")]
    InvalidValue(&'static str),
}

impl DecodeError {
    /// The error code reported to the peer for this violation.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::MalformedFrame,
        }
    }
}
