//! Connections per client address: how many it holds, and how many of
//! them are still in their handshake, so one address cannot take every
//! connection slot of the router.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Default, Clone, Copy)]
struct Count {
    connections: usize,
    handshakes: usize,
}

/// Live counts per client address.
pub(crate) struct PerAddress {
    counts: Mutex<HashMap<IpAddr, Count>>,
    max_connections: usize,
    max_handshakes: usize,
}

/// Why a connection from an address was not admitted.
pub(crate) enum Refused {
    /// The address holds its most connections.
    Connections(usize),
    /// The address has its most handshakes in progress.
    Handshakes(usize),
}

/// One admitted connection's place in its address's count.
pub(crate) struct Slot {
    owner: Arc<PerAddress>,
    ip: IpAddr,
}

/// Held until the connection's handshake (through `HelloOk`) is over.
pub(crate) struct Handshaking {
    owner: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    pub(crate) fn new(max_connections: usize, max_handshakes: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress {
            counts: Mutex::new(HashMap::new()),
            max_connections,
            max_handshakes,
        })
    }

    /// Admits a connection from `ip`, or says which limit it is at.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<(Slot, Handshaking), Refused> {
        let mut counts = self.counts.lock().expect("address counts lock");
        let c = counts.entry(ip).or_default();
        if c.connections >= self.max_connections {
            return Err(Refused::Connections(self.max_connections));
        }
        if c.handshakes >= self.max_handshakes {
            return Err(Refused::Handshakes(self.max_handshakes));
        }
        c.connections += 1;
        c.handshakes += 1;
        Ok((
            Slot {
                owner: self.clone(),
                ip,
            },
            Handshaking {
                owner: self.clone(),
                ip,
            },
        ))
    }

    fn release(&self, ip: IpAddr, f: impl FnOnce(&mut Count)) {
        let mut counts = self.counts.lock().expect("address counts lock");
        if let Some(c) = counts.get_mut(&ip) {
            f(c);
            if c.connections == 0 && c.handshakes == 0 {
                counts.remove(&ip);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.owner.release(self.ip, |c| c.connections -= 1);
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.owner.release(self.ip, |c| c.handshakes -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_counted_apart_and_freed_on_drop() {
        let pa = PerAddress::new(2, 1);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let (s1, h1) = pa.admit(a).ok().unwrap();
        assert!(matches!(pa.admit(a), Err(Refused::Handshakes(1))));
        drop(h1);
        let (_s2, _h2) = pa.admit(a).ok().unwrap();
        assert!(matches!(pa.admit(a), Err(Refused::Connections(2))));
        assert!(pa.admit(b).is_ok(), "another address is not affected");
        drop(s1);
        assert!(matches!(pa.admit(a), Err(Refused::Handshakes(1))));
    }
}
