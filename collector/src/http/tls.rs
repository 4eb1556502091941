//! TLS on the metrics port: the server certificate and key, and client certificates required to
//! chain to a CA (`--http-tls-cert`, `--http-tls-key`, `--http-client-ca`); and who may scrape.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mxscope_pki::{identity_of, Identity};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Why the metrics port's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{}: cannot read the {what}", path.display())]
    Read {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] mxscope_proto::secret::SecretFileError),
    #[error("{}: no {what} in this file (expected PEM)", path.display())]
    Pem { path: PathBuf, what: &'static str },
    #[error("--http-client-ca {}: no usable CA certificate", path.display())]
    Ca {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("--http-tls-cert and --http-tls-key do not make a usable server identity")]
    Identity(#[source] rustls::Error),
}

/// The acceptor for `files`: our certificate, and a client certificate chaining to
/// `files.client_ca` required from every client (refused at the handshake otherwise).
pub fn acceptor(files: &crate::shared::TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let certs = certificates(&files.cert, "certificate")?;
    let key_pem = mxscope_proto::secret::read_private(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::Pem {
        path: files.key.clone(),
        what: "private key",
    })?;
    let mut roots = RootCertStore::empty();
    for ca in certificates(&files.client_ca, "CA certificate")? {
        // A certificate the verifier cannot use shows up as an empty store below.
        let _ = roots.add(ca);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|source| TlsError::Ca {
            path: files.client_ca.clone(),
            source,
        })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Identity)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(TlsError::Identity)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Every certificate of a PEM file; at least one.
fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        what,
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(certs)
}

/// Whether the holder of a verified client certificate may scrape: anyone but an agent (an
/// agent certificate from the mxscope CA proves only that its holder runs probes).
pub(crate) fn may_scrape(peer: Option<&[CertificateDer<'_>]>) -> bool {
    let identity = peer
        .and_then(|chain| chain.first())
        .and_then(|leaf| identity_of(leaf));
    !matches!(identity, Some(Identity::Agent { .. }))
}
