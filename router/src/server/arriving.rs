//! Where a router's connections come from: its own endpoint, or a cluster
//! node's, which serves the routers of all the node's groups on one
//! address and hands each one the connections whose handshake named its
//! group.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

/// The connections a cluster node hands the router of one of its groups.
/// Cheap to clone (it sits in the router's configuration); the router that
/// starts with it takes the receiving end.
#[derive(Clone)]
pub struct NodeClients {
    /// Connections in their handshake, in arrival order: those whose ALPN
    /// named this router's group.
    arriving: Arc<Mutex<Option<mpsc::Receiver<quinn::Connecting>>>>,
    /// The node's client address.
    local_addr: SocketAddr,
    /// Takes back a connection the router received but will not serve
    /// (it is stopping): the node redirects it to the group's leader.
    bounce: Arc<dyn Fn(quinn::Connecting) + Send + Sync>,
}

impl NodeClients {
    /// Connections from `arriving`, on a node whose client address is
    /// `local_addr`; those left when the router stops go to `bounce`.
    pub fn new(
        arriving: mpsc::Receiver<quinn::Connecting>,
        local_addr: SocketAddr,
        bounce: Arc<dyn Fn(quinn::Connecting) + Send + Sync>,
    ) -> NodeClients {
        NodeClients {
            arriving: Arc::new(Mutex::new(Some(arriving))),
            local_addr,
            bounce,
        }
    }

    /// The node's client address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// A router's source of connections.
pub(super) enum Source {
    /// Its own endpoint (a single router).
    Own(quinn::Endpoint),
    /// A cluster node's, through the node.
    Node {
        arriving: mpsc::Receiver<quinn::Connecting>,
        bounce: Arc<dyn Fn(quinn::Connecting) + Send + Sync>,
    },
}

impl Source {
    /// The source of a router started with `clients`; `None` if another
    /// router took them already.
    pub(super) fn node(clients: &NodeClients) -> Option<Source> {
        let arriving = clients.arriving.lock().expect("clients lock").take()?;
        Some(Source::Node {
            arriving,
            bounce: clients.bounce.clone(),
        })
    }

    /// The next connection; `None` once the source is closed.
    pub(super) async fn accept(&mut self) -> Option<Arriving> {
        match self {
            Source::Own(endpoint) => endpoint
                .accept()
                .await
                .map(|i| Arriving::Incoming(Box::new(i))),
            Source::Node { arriving, .. } => arriving.recv().await.map(Arriving::Connecting),
        }
    }

    /// Stops taking connections: a node's take the ones not yet accepted
    /// back, to redirect them.
    pub(super) fn close(&mut self) {
        match self {
            Source::Own(endpoint) => endpoint.set_server_config(None),
            Source::Node { arriving, bounce } => {
                arriving.close();
                while let Ok(c) = arriving.try_recv() {
                    bounce(c);
                }
            }
        }
    }
}

/// A connection that has not finished its handshake.
pub(super) enum Arriving {
    /// Not yet accepted: refusing it costs no TLS work.
    Incoming(Box<quinn::Incoming>),
    /// Accepted by a cluster node, which read its ALPN.
    Connecting(quinn::Connecting),
}

impl Arriving {
    /// The client's address.
    pub(super) fn remote_address(&self) -> SocketAddr {
        match self {
            Arriving::Incoming(i) => i.remote_address(),
            Arriving::Connecting(c) => c.remote_address(),
        }
    }

    /// Refuses it without a reason.
    pub(super) fn refuse(self) {
        match self {
            Arriving::Incoming(i) => i.refuse(),
            // Dropped mid-handshake: the connection is closed.
            Arriving::Connecting(c) => drop(c),
        }
    }

    /// Completes the handshake.
    pub(super) async fn connection(self) -> Result<quinn::Connection, quinn::ConnectionError> {
        match self {
            Arriving::Incoming(i) => (*i).await,
            Arriving::Connecting(c) => c.await,
        }
    }
}
