//! The cluster's TLS identities: one cluster CA, a certificate per node.
//!
//! Nodes talk Raft over QUIC with mutual TLS: a node accepts a peer only
//! if the peer's certificate is signed by the cluster CA, and a node
//! connecting to node N checks that the certificate it is shown names
//! `node-N`. The same CA certificate is what clients trust (`cert.pem`).

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::server::tls::TlsError;

/// ALPN of Raft connections between nodes. Version 2 names each RPC's
/// group; a node of an older build fails the handshake with a clear
/// "no application protocol" instead of misreading the messages.
pub const RAFT_ALPN: &[u8] = b"switchyard-raft/2";

/// The name a node's certificate carries, which peers check.
pub fn node_name(id: super::NodeId) -> String {
    format!("node-{id}")
}

/// A cluster CA: its certificate and key, as PEM.
pub struct ClusterCa {
    /// The CA certificate (PEM): what every node and client trusts.
    pub cert_pem: String,
    /// The CA's private key (PEM): needed only to issue node certificates.
    pub key_pem: String,
}

impl ClusterCa {
    /// A new CA.
    pub fn generate() -> Result<ClusterCa, TlsError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Switchyard cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate for node `id`, valid for `node-<id>` and the given
    /// host names or addresses (for clients), signed by this CA.
    pub fn issue(&self, id: super::NodeId, hosts: &[String]) -> Result<NodeTls, TlsError> {
        let (cert, key) = self.sign(id, hosts)?;
        Ok(NodeTls {
            ca: vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(pem)?],
            chain: vec![cert.der().clone()],
            key: Arc::new(PrivatePkcs8KeyDer::from(key.serialize_der()).into()),
        })
    }

    /// As [`ClusterCa::issue`], as PEM: `(certificate, key)`.
    pub fn issue_pem(
        &self,
        id: super::NodeId,
        hosts: &[String],
    ) -> Result<(String, String), TlsError> {
        let (cert, key) = self.sign(id, hosts)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Node `id`'s certificate, signed by this CA, and its new key.
    fn sign(
        &self,
        id: super::NodeId,
        hosts: &[String],
    ) -> Result<(rcgen::Certificate, rcgen::KeyPair), TlsError> {
        use rcgen::{
            CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)?;
        let key = KeyPair::generate()?;
        let mut names = vec![node_name(id)];
        names.extend(hosts.iter().cloned());
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, node_name(id));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert, key))
    }
}

fn pem(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(format!("PEM: {e}"))
}

use rustls::pki_types::pem::PemObject;

/// One node's TLS identity in the cluster.
#[derive(Clone)]
pub struct NodeTls {
    /// The cluster CA certificate(s) peers must be signed by.
    pub ca: Vec<CertificateDer<'static>>,
    /// This node's certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// This node's private key.
    pub key: Arc<PrivateKeyDer<'static>>,
}

impl NodeTls {
    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots
                .add(c.clone())
                .map_err(|e| TlsError::Config(format!("cluster CA: {e}")))?;
        }
        Ok(roots)
    }

    /// The server side of Raft connections: peers must present a
    /// certificate signed by the cluster CA.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?.into(),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Config(format!("cluster CA: {e}")))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![RAFT_ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(transport()));
        Ok(config)
    }

    /// The client side of Raft connections: presents this node's
    /// certificate and trusts only the cluster CA.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![RAFT_ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport()));
        Ok(config)
    }
}

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window((16u32 << 20).into())
        .receive_window((64u32 << 20).into())
        .send_window(64 << 20)
        .max_concurrent_bidi_streams(1024u32.into())
        // Nodes are on one network: a lost first packet (to a peer still
        // starting) is sent again after 150 ms, not quinn's 1 s default.
        .initial_rtt(std::time::Duration::from_millis(50))
        .keep_alive_interval(Some(std::time::Duration::from_secs(1)))
        .max_idle_timeout(Some(
            std::time::Duration::from_secs(5)
                .try_into()
                .expect("5 s is a valid idle timeout"),
        ));
    t
}
