//! Identity and TLS verification: rustls verifiers that pin peer keys, the
//! TLS configurations and the checks on a finished handshake.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::Connection;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use storemesh_protocol::ids::NodeId;

use super::*;
use crate::identity::{node_id_of_cert, Identity};

/// Markers our certificate verifier puts into its error, so that the accept and
/// dial paths (which know the remote address) can report the rejected key.
pub(super) const UNKNOWN_KEY_MARKER: &str = "unknown peer key ";
pub(super) const OWN_KEY_MARKER: &str = "peer presented this node's own key ";

/// Accepts a certificate only if SHA-256(SPKI) is a configured peer's id.
pub(super) struct PinnedPeers {
    pub(super) allowed: HashSet<NodeId>,
    pub(super) own: NodeId,
    pub(super) algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PinnedPeers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedPeers")
            .field("allowed", &self.allowed.len())
            .finish()
    }
}

/// The verifier's rejection; its `Debug` text ends up in quinn's handshake error.
pub(super) struct KeyRejected {
    pub(super) id: NodeId,
    pub(super) own: bool,
}

impl fmt::Display for KeyRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let marker = if self.own {
            OWN_KEY_MARKER
        } else {
            UNKNOWN_KEY_MARKER
        };
        write!(f, "{marker}{}", self.id.hex())
    }
}

impl fmt::Debug for KeyRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for KeyRejected {}

impl PinnedPeers {
    pub(super) fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let id = node_id_of_cert(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if id != self.own && self.allowed.contains(&id) {
            return Ok(());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(KeyRejected {
                id,
                own: id == self.own,
            })),
        )))
    }
}

impl ServerCertVerifier for PinnedPeers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedPeers {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

pub(super) fn tls_configs(
    identity: &Identity,
    verifier: Arc<PinnedPeers>,
    provider: Arc<CryptoProvider>,
) -> anyhow::Result<(QuicServerConfig, QuicClientConfig)> {
    let cert = CertificateDer::from(identity.cert_der.clone());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone()));

    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("the crypto provider does not support TLS 1.3")?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(vec![cert.clone()], key.clone_key())
        .context("the node key cannot be used for TLS")?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    server.max_early_data_size = 0;
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});

    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("the crypto provider does not support TLS 1.3")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], key)
        .context("the node key cannot be used for TLS")?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    client.enable_early_data = false;
    client.enable_sni = false;
    client.resumption = rustls::client::Resumption::disabled();

    let server = QuicServerConfig::try_from(server).map_err(|e| anyhow!("QUIC server TLS: {e}"))?;
    let client = QuicClientConfig::try_from(client).map_err(|e| anyhow!("QUIC client TLS: {e}"))?;
    Ok((server, client))
}

/// The node id the peer proved with its TLS certificate.
pub(super) fn peer_node_id(conn: &Connection) -> Option<NodeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    node_id_of_cert(certs.first()?.as_ref()).ok()
}

pub(super) fn negotiated_alpn_ok(conn: &Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ALPN)
}

/// Finds a node id our verifier put into a local handshake error.
pub(super) fn rejected_key(reason: &str, marker: &str) -> Option<NodeId> {
    let start = reason.find(marker)? + marker.len();
    NodeId::parse(reason.get(start..start + 64)?).ok()
}
