//! The UDP sockets under the QUIC endpoints, the client's and the
//! router's alike.

use std::net::SocketAddr;

/// What each UDP socket asks of the kernel for its receive and send
/// buffers. Linux gives 208 KiB by default and caps a request at
/// `net.core.rmem_max` / `wmem_max`. A burst of pipelined publish batches,
/// or a 1 MiB Raft append, arrives as hundreds of datagrams at once; with
/// the default buffer a busy router dropped thousands of them a minute,
/// and each loss costs its stream a QUIC loss-recovery round.
pub const UDP_BUFFER: usize = 8 << 20;

/// Binds a UDP socket for a QUIC endpoint with buffers of [`UDP_BUFFER`],
/// or as much as the kernel allows: the size is a request, and a kernel
/// that grants less (or refuses) leaves a working socket.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A QUIC endpoint on a socket from [`bind_udp`]: a server if `server` is
/// given, else a client only.
pub fn endpoint(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    addr: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime to run the endpoint on"))?;
    quinn::Endpoint::new(config, server, bind_udp(addr)?, runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffers are raised above the kernel's default as far as the
    /// kernel allows (Linux reports twice the size set, for its own
    /// bookkeeping, and caps it at `rmem_max`).
    #[test]
    fn sockets_get_larger_buffers_than_the_default() {
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let plain = socket2::SockRef::from(&plain).recv_buffer_size().unwrap();
        let ours = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let ours = socket2::SockRef::from(&ours).recv_buffer_size().unwrap();
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        match cap {
            // Nothing to gain where the kernel allows no more.
            Some(cap) if cap * 2 <= plain => assert!(ours >= plain),
            Some(cap) => assert!(ours >= (2 * cap).min(2 * UDP_BUFFER), "{ours} < {cap}"),
            None => assert!(ours >= plain),
        }
    }
}
