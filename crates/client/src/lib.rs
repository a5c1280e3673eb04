//! The Rust client for Switchyard: connect, publish, subscribe, commit,
//! queues and topic administration. It depends on the wire protocol
//! ([`switchyard_protocol`], re-exported as [`protocol`]) and nothing of
//! the router, so an application builds it without wasmtime or redb.
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchyard_client::ClientError> {
//! use futures::StreamExt;
//! use switchyard_client::{Client, ClientConfig, Record, SubscribeOptions};
//!
//! let client = Client::connect(ClientConfig::new("127.0.0.1:7400".parse().unwrap())
//!     .with_ca_file("switchyard-data/cert.pem")).await?;
//! client.create_topic("orders", 4).await?;
//! let ack = client.publish("orders", Record::new("hello").with_key("customer-7")).await?;
//! println!("stored at partition {} offset {}", ack.partition, ack.offset);
//!
//! let mut sub = client.subscribe(SubscribeOptions::new("orders").group("billing")).await?;
//! while let Some(msg) = sub.next().await {
//!     let msg = msg?;
//!     println!("{:?}", msg.payload());
//! }
//! # Ok(()) }
//! ```
//!

mod connection;
mod inbox;
mod publish;
mod queue;
pub mod socket;
mod subscribe;

pub use connection::{
    CLUSTER_IDLE_TIMEOUT, Client, ClientConfig, DEFAULT_IDLE_TIMEOUT, Reconnect, ServerInfo,
};
pub use publish::{Ack, PendingAcks};
pub use queue::{QueueConsumer, QueueMessage, QueueOptions};
pub use subscribe::{Message, SubscribeOptions, Subscription};

pub use switchyard_protocol as protocol;
pub use switchyard_protocol::{
    DeliveryTag, ErrorCode, RawRecord, Record, StartPosition, TopicInfo, WireError,
};

/// Everything a client call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The router answered with an error; see its code.
    #[error(transparent)]
    Server(#[from] WireError),
    /// The certificate or TLS settings are unusable.
    #[error("TLS setup: {0} (pass the router's certificate with --ca or SWITCHYARD_CA)")]
    Tls(String),
    /// The router could not be reached.
    #[error(
        "cannot connect to {addr}: {reason} (is the router running? set --addr or SWITCHYARD_ADDR)"
    )]
    Connect {
        /// The address tried.
        addr: std::net::SocketAddr,
        /// What failed.
        reason: String,
    },
    /// The connection or stream ended; in-flight requests may or may not
    /// have been applied.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The router refused this client (a revoked or unknown credential, no
    /// common protocol version, a protocol violation); reconnecting would
    /// be refused again, so the client does not try.
    #[error("refused by the router: {0}")]
    Refused(String),
    /// The router sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The router's error code, if the router reported one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code),
            _ => None,
        }
    }

    /// For `backlog_full`: how long the router asks the producer to wait.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        let ClientError::Server(e) = self else {
            return None;
        };
        let rest = e.message.split("retry_after_ms=").nth(1)?;
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok().map(std::time::Duration::from_millis)
    }
}
