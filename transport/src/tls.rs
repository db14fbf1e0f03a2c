//! TLS identity: the node's ed25519 key *is* its identity.
//!
//! Why this exists: QUIC needs TLS 1.3, and TLS wants certificates. Lichen has
//! no certificate authority and does not care about IP addresses or names; a
//! peer is whoever holds the private half of an ed25519 key that the
//! membership document lists. So:
//!
//! * each node presents a self-signed X.509 certificate (made with `rcgen`
//!   from the caller's 32-byte seed) whose SubjectPublicKeyInfo is its ed25519
//!   public key; the certificate's own signature, names and validity dates
//!   are ignored;
//! * both sides run a custom verifier ([`PeerVerifier`], used as rustls'
//!   `ServerCertVerifier` *and* `ClientCertVerifier`, so authentication is
//!   mutual) that extracts the key from the SPKI (it must be exactly an
//!   ed25519 SPKI), optionally checks it equals the key we meant to dial, and
//!   asks the [`Authorizer`] whether it is a member;
//! * the TLS 1.3 `CertificateVerify` signature is checked with rustls' ring
//!   provider ([`rustls::crypto::verify_tls13_signature`]), which proves the
//!   peer holds the private key; only `ed25519` is offered;
//! * the cluster id is bound into the handshake as the single ALPN protocol
//!   `lichen/1/<hex cluster id>`: a node of another cluster offers a different
//!   protocol and rustls aborts the handshake (`no_application_protocol`);
//! * session resumption and tickets are disabled so every connection runs the
//!   full verification (a removed member cannot come back on a ticket);
//! * the certificate's serial number is random per [`Identity::new`], i.e. per
//!   run of the endpoint, so the certificate also names the *run* (its
//!   [`RunId`] is a hash of the certificate). Two connections from the same
//!   run of a peer present the same certificate; a peer that restarted
//!   presents a new one. The endpoint's duplicate tie-break uses this to
//!   replace, at once, a connection left over from a peer's previous run (see
//!   `endpoint`). The run id is as authentic as the key: the certificate is
//!   the one the peer proved it holds the key for in the handshake.
//!
//! Data flow: `Endpoint::bind` calls [`Identity::new`] once, then
//! [`Identity::server_config`] for the listening side and
//! [`Identity::client_config`] per dialled peer (the expected key is baked
//! into that peer's verifier). After a handshake, [`peer_of`] reads the
//! verified key and the peer's run id back from the connection.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::{Authorizer, Error, PeerKey};

/// DER prefix of a PKCS#8 v1 document holding an ed25519 seed (RFC 8410).
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// DER prefix of an ed25519 SubjectPublicKeyInfo; the 32-byte key follows.
const SPKI_ED25519_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Server name used for SNI. It is never checked: the key is.
pub(crate) const SERVER_NAME: &str = "lichen";

/// Hex rendering of keys and ids for logs and the ALPN string.
pub(crate) struct Hex<'a>(pub(crate) &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// ALPN protocol binding the handshake to one cluster.
pub fn alpn_for(cluster_id: &[u8; 32]) -> Vec<u8> {
    format!("lichen/1/{}", Hex(cluster_id)).into_bytes()
}

/// Extracts the ed25519 public key from a DER certificate.
///
/// Fails unless the certificate parses and its SPKI is exactly an ed25519 key.
pub(crate) fn peer_key_from_cert(cert: &CertificateDer<'_>) -> Result<PeerKey, rustls::Error> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert)?;
    let spki = parsed.subject_public_key_info();
    spki.as_ref()
        .strip_prefix(&SPKI_ED25519_PREFIX[..])
        .and_then(|k| PeerKey::try_from(k).ok())
        .ok_or_else(|| other_error("certificate key is not an ed25519 key"))
}

fn key_pair_from_secret(secret_key: &[u8; 32]) -> Result<(rcgen::KeyPair, Vec<u8>), Error> {
    let mut pkcs8 = PKCS8_ED25519_PREFIX.to_vec();
    pkcs8.extend_from_slice(secret_key);
    let key_pair = rcgen::KeyPair::try_from(pkcs8.as_slice())?;
    Ok((key_pair, pkcs8))
}

pub(crate) fn public_key_from_secret(secret_key: &[u8; 32]) -> Result<PeerKey, Error> {
    let (key_pair, _) = key_pair_from_secret(secret_key)?;
    PeerKey::try_from(key_pair.public_key_raw())
        .map_err(|_| Error::Config("seed did not yield an ed25519 key".into()))
}

/// Identifies one run of a node: the SHA-256 of the certificate it presents, which carries
/// a serial number drawn at random when the endpoint is bound.
pub(crate) type RunId = [u8; 32];

fn run_id_of(cert: &CertificateDer<'_>) -> RunId {
    let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let mut id = [0u8; 32];
    id.copy_from_slice(d.as_ref());
    id
}

/// The verified key of the peer of an established connection, and the id of the peer's run.
pub(crate) fn peer_of(conn: &quinn::Connection) -> Option<(PeerKey, RunId)> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let cert = certs.first()?;
    Some((peer_key_from_cert(cert).ok()?, run_id_of(cert)))
}

/// This node's key material and the TLS settings shared by both directions.
pub(crate) struct Identity {
    public_key: PeerKey,
    cert: CertificateDer<'static>,
    pkcs8: Vec<u8>,
    alpn: Vec<u8>,
    provider: Arc<CryptoProvider>,
    auth: Arc<dyn Authorizer>,
}

impl Identity {
    /// Derives the key pair from the seed and makes the self-signed certificate.
    pub(crate) fn new(
        secret_key: &[u8; 32],
        cluster_id: &[u8; 32],
        auth: Arc<dyn Authorizer>,
    ) -> Result<Self, Error> {
        let (key_pair, pkcs8) = key_pair_from_secret(secret_key)?;
        let public_key = PeerKey::try_from(key_pair.public_key_raw())
            .map_err(|_| Error::Config("seed did not yield an ed25519 key".into()))?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        // A fresh serial per run makes the certificate (and so the run id peers derive from
        // it) different from the previous run's: see the module doc.
        let mut serial: [u8; 16] = rand::random();
        serial[0] = (serial[0] & 0x7f) | 0x40; // positive, 16 bytes, no leading zero
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("lichen node {}", Hex(&public_key)),
        );
        let cert = params.self_signed(&key_pair)?.der().clone();
        Ok(Self {
            public_key,
            cert,
            pkcs8,
            alpn: alpn_for(cluster_id),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            auth,
        })
    }

    pub(crate) fn public_key(&self) -> PeerKey {
        self.public_key
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()))
    }

    fn verifier(&self, expected: Option<PeerKey>) -> Arc<PeerVerifier> {
        Arc::new(PeerVerifier {
            auth: self.auth.clone(),
            expected,
            algs: self.provider.signature_verification_algorithms,
        })
    }

    /// rustls server config: TLS 1.3 only, mandatory client certificates.
    pub(crate) fn server_config(&self) -> Result<quinn::crypto::rustls::QuicServerConfig, Error> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.verifier(None))
            .with_single_cert(vec![self.cert.clone()], self.private_key())?;
        cfg.alpn_protocols = vec![self.alpn.clone()];
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
            .map_err(|e| Error::Config(format!("QUIC/TLS server config: {e}")))
    }

    /// rustls client config for dialling `expected`: the server must present
    /// exactly that key (and still be a member).
    pub(crate) fn client_config(
        &self,
        expected: PeerKey,
    ) -> Result<quinn::crypto::rustls::QuicClientConfig, Error> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(self.verifier(Some(expected)))
            .with_client_auth_cert(vec![self.cert.clone()], self.private_key())?;
        cfg.alpn_protocols = vec![self.alpn.clone()];
        cfg.resumption = rustls::client::Resumption::disabled();
        cfg.enable_early_data = false;
        quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
            .map_err(|e| Error::Config(format!("QUIC/TLS client config: {e}")))
    }
}

/// Certificate verifier for both directions: identity = ed25519 key, checked
/// against membership, no CA, no names, no dates.
pub(crate) struct PeerVerifier {
    auth: Arc<dyn Authorizer>,
    /// When dialling, the key we expect the server to have.
    expected: Option<PeerKey>,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerVerifier")
            .field(
                "expected",
                &self.expected.as_ref().map(|k| Hex(k).to_string()),
            )
            .finish_non_exhaustive()
    }
}

impl PeerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(other_error("unexpected certificate chain"));
        }
        let key = peer_key_from_cert(end_entity)?;
        if let Some(expected) = self.expected {
            if expected != key {
                tracing::warn!(expected = %Hex(&expected), got = %Hex(&key), "peer presented an unexpected key");
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ));
            }
        }
        if !self.auth.is_member(&key) {
            tracing::warn!(peer = %Hex(&key), "handshake from a key that is not a member");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(())
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::PeerMisbehaved(
                rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
            ));
        }
        verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

#[derive(Debug)]
struct VerifyError(&'static str);

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for VerifyError {}

fn other_error(msg: &'static str) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        VerifyError(msg),
    ))))
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic)
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct All;
    impl Authorizer for All {
        fn is_member(&self, _: &PeerKey) -> bool {
            true
        }
    }

    #[test]
    fn certificate_carries_the_seed_public_key() {
        // RFC 8032 test vector 1.
        let seed: [u8; 32] = [
            0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec,
            0x2c, 0xc4, 0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03,
            0x1c, 0xae, 0x7f, 0x60,
        ];
        let public: [u8; 32] = [
            0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64,
            0x07, 0x3a, 0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68,
            0xf7, 0x07, 0x51, 0x1a,
        ];
        let id = Identity::new(&seed, &[7; 32], Arc::new(All)).unwrap();
        assert_eq!(id.public_key(), public);
        assert_eq!(public_key_from_secret(&seed).unwrap(), public);
        assert_eq!(peer_key_from_cert(&id.cert).unwrap(), public);
        assert!(id.server_config().is_ok());
        assert!(id.client_config(public).is_ok());
    }

    #[test]
    fn each_identity_is_a_new_run_of_the_same_key() {
        let a = Identity::new(&[3; 32], &[7; 32], Arc::new(All)).unwrap();
        let b = Identity::new(&[3; 32], &[7; 32], Arc::new(All)).unwrap();
        assert_eq!(peer_key_from_cert(&a.cert).unwrap(), a.public_key());
        assert_eq!(peer_key_from_cert(&b.cert).unwrap(), a.public_key());
        assert_ne!(run_id_of(&a.cert), run_id_of(&b.cert));
        assert_eq!(run_id_of(&a.cert), run_id_of(&a.cert.clone()));
    }

    #[test]
    fn alpn_binds_cluster_id() {
        let mut id = [0u8; 32];
        id[0] = 0xab;
        let alpn = String::from_utf8(alpn_for(&id)).unwrap();
        assert_eq!(alpn.len(), "lichen/1/".len() + 64);
        assert!(alpn.starts_with("lichen/1/ab00"));
    }

    #[test]
    fn garbage_certificate_rejected() {
        assert!(peer_key_from_cert(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }
}
