//! Certificates and TLS settings: a cluster CA, one certificate per node naming the node, and
//! the rustls configurations of both ports.
//!
//! A node's certificate carries the DNS name `node-<id>.holdfast` (see [`node_name`]). Between
//! nodes, both ends verify the other against the cluster CA: the dialer asks for the name of
//! the node it dials (rustls checks it), and the acceptor checks that the certificate the
//! dialer presented names the node its Hello claims ([`verify_peer_identity`]). So no node can
//! speak as another, and nothing without a certificate of the cluster CA can speak as a node.
//! Clients verify that they reach a node of the cluster: every node certificate also carries
//! [`CLIENT_SERVER_NAME`], which clients ask for (a client may list any subset of the nodes,
//! in any order, so it does not ask for a particular node). Clients prove who they are with
//! a token (`crate::auth`), not a certificate.
//!
//! The crypto provider is `ring`: it builds with a C compiler alone, no cmake or Go, so a
//! fresh machine needs nothing beyond the Rust toolchain. TLS 1.3 only.

use std::path::Path;
use std::sync::Arc;

use holdfast_core::raft::NodeId;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The DNS-name suffix of every node certificate.
pub const CLUSTER_DOMAIN: &str = "holdfast";

/// The name in every node's certificate that clients ask for: any node of the cluster.
pub const CLIENT_SERVER_NAME: &str = "cluster.holdfast";

/// The name in node `id`'s certificate, and the name a dialer expects of node `id`.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.{CLUSTER_DOMAIN}")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first: as strong as a message queue's threat model needs, and the cheapest
    // per byte where AES instructions exist (ring's default puts AES-256 first).
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// The CA's subject and constraints. Rebuilt the same on every run, so a CA stored as PEM (its
/// certificate and key) can sign more node certificates later without parsing its certificate.
fn ca_params() -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "holdfast cluster CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A new cluster CA: (certificate PEM, private key PEM).
pub fn generate_ca() -> Result<(String, String), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
    let cert = ca_params()
        .self_signed(&key)
        .map_err(|e| format!("cannot create the CA certificate: {e}"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A certificate for node `id` signed by the CA whose key is `ca_key_pem`: (certificate PEM,
/// private key PEM). Valid for both ends of a TLS connection, as nodes dial and accept.
pub fn issue_node_certificate(ca_key_pem: &str, id: NodeId) -> Result<(String, String), String> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem).map_err(|e| format!("bad CA key: {e}"))?;
    let issuer = rcgen::Issuer::new(ca_params(), ca_key);
    let mut params =
        rcgen::CertificateParams::new(vec![node_name(id), CLIENT_SERVER_NAME.to_string()])
            .map_err(|e| format!("bad node name: {e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, node_name(id));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| format!("cannot sign node {id}'s certificate: {e}"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Every certificate in a PEM text.
pub fn certificates_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certs)
}

pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    certificates_from_pem(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{}: no usable key: {e}", path.display()))
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots
            .add(cert.clone())
            .map_err(|e| format!("bad CA certificate: {e}"))?;
    }
    Ok(Arc::new(roots))
}

/// A node's three TLS configurations, built once at start.
pub struct NodeTls {
    /// Accepting on the peer port: the dialer must present a certificate of the cluster CA.
    pub peer_server: Arc<ServerConfig>,
    /// Dialing a peer: presents this node's certificate, verifies the peer's.
    pub peer_client: Arc<ClientConfig>,
    /// Accepting on the client port: this node's certificate; clients present tokens.
    pub client_server: Arc<ServerConfig>,
}

impl NodeTls {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<NodeTls, String> {
        let ca = read_certificates(ca)?;
        let chain = read_certificates(cert)?;
        let key = read_key(key)?;
        NodeTls::new(&ca, chain, key)
    }

    pub fn new(
        ca: &[CertificateDer<'static>],
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<NodeTls, String> {
        let roots = roots(ca)?;
        let tls13 = &[&rustls::version::TLS13];
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| format!("cannot verify peers: {e}"))?;
        let peer_server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(tls13)
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("bad node certificate or key: {e}"))?;
        let peer_client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(tls13)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("bad node certificate or key: {e}"))?;
        let client_server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(tls13)
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("bad node certificate or key: {e}"))?;
        Ok(NodeTls {
            peer_server: Arc::new(peer_server),
            peer_client: Arc::new(peer_client),
            client_server: Arc::new(client_server),
        })
    }
}

/// A client's TLS configuration: trusts the cluster CA only, presents no certificate.
pub fn client_config(ca: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, String> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The server name a node expects of node `id`.
pub fn server_name(id: NodeId) -> Result<ServerName<'static>, String> {
    ServerName::try_from(node_name(id)).map_err(|e| format!("bad node name: {e}"))
}

/// The server name a client expects of any node.
pub fn client_server_name() -> Result<ServerName<'static>, String> {
    ServerName::try_from(CLIENT_SERVER_NAME).map_err(|e| format!("bad server name: {e}"))
}

/// Checks that `certificate` (already verified against the CA by rustls) names node `claimed`:
/// the dialer's certificate must back the node id its Hello claims.
pub fn verify_peer_identity(
    certificate: Option<&CertificateDer<'_>>,
    claimed: NodeId,
) -> Result<(), String> {
    let Some(der) = certificate else {
        return Err("no certificate presented".into());
    };
    let cert =
        webpki::EndEntityCert::try_from(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let name = server_name(claimed)?;
    cert.verify_is_valid_for_subject_name(&name).map_err(|_| {
        format!(
            "claims to be node {claimed} but its certificate is not for {}",
            node_name(claimed)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_key(pem: &str) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("key")
    }

    #[test]
    fn a_node_certificate_names_its_node_and_no_other() {
        let (ca_cert, ca_key) = generate_ca().expect("ca");
        let (cert, key) = issue_node_certificate(&ca_key, 2).expect("node");
        let certs = certificates_from_pem(&cert).expect("pem");
        verify_peer_identity(certs.first(), 2).expect("node 2 is node 2");
        let error = verify_peer_identity(certs.first(), 3).expect_err("not node 3");
        assert!(error.contains("node-3.holdfast"), "{error}");
        assert!(verify_peer_identity(None, 2).is_err());
        // The configs build from what was generated.
        let ca = certificates_from_pem(&ca_cert).expect("ca pem");
        NodeTls::new(&ca, certs, pem_key(&key)).expect("tls configs");
        client_config(&ca).expect("client config");
    }
}
