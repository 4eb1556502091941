//! Joining with a token and keeping the certificate fresh: the agent's state directory (its key,
//! certificate and the collector's CA), the first start with `--enroll TOKEN` (a key made here,
//! the collector pinned by the CA fingerprint in the token before the token is sent, a CSR signed
//! over the `Enrollment` call), and the files a renewal over the session replaces.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mxscope_pki::{cert_info, CertInfo, Fingerprint, Identity, Token};
use mxscope_proto::pb;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tracing::{info, warn};

use crate::error::chain;

const KEY: &str = "agent.key";
const CERT: &str = "agent.pem";
const CA: &str = "ca.pem";
const TIMEOUT: Duration = Duration::from_secs(15);

/// Why the agent could not join or load its identity; worded for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrolError {
    #[error("--enroll: {0}")]
    Token(String),
    #[error("--state-dir {dir}: {message}")]
    State { dir: PathBuf, message: String },
    #[error("cannot reach the collector {collector} to enrol: {reason} (check --collector and the network; the token is not used up)")]
    Unreachable { collector: String, reason: String },
    #[error("the collector {collector} does not present the CA of the token (sha256 {expected}; it presented {found}): it is not the collector the token was made for, or something on the path intercepts TLS. The token was not sent.")]
    Pin {
        collector: String,
        expected: Fingerprint,
        found: String,
    },
    #[error("enrolment refused by the collector: {0}")]
    Refused(String),
}

/// The agent's state directory: `agent.key` (mode 0600), `agent.pem`, `ca.pem`, the spool.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

/// The identity held in a state directory.
#[derive(Clone)]
pub struct Held {
    pub cert_pem: String,
    pub key_pem: Vec<u8>,
    pub ca_pem: String,
    pub info: CertInfo,
    pub id: String,
    pub region: String,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("id", &self.id)
            .field("region", &self.region)
            .field("serial", &self.info.id.serial.to_string())
            .finish_non_exhaustive()
    }
}

impl Held {
    /// When to ask for a new certificate: at two thirds of this one's life.
    pub fn renew_at(&self) -> SystemTime {
        renew_at(&self.info)
    }

    /// Whether the certificate has expired.
    pub fn expired(&self) -> bool {
        time::OffsetDateTime::now_utc() >= self.info.not_after
    }
}

/// Two thirds into the certificate's validity.
pub fn renew_at(info: &CertInfo) -> SystemTime {
    let life = (info.not_after - info.not_before).whole_seconds().max(0);
    let at = info.not_before.unix_timestamp() + life * 2 / 3;
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0))
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        StateDir { dir: dir.into() }
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join(KEY)
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join(CERT)
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join(CA)
    }

    fn err(&self, message: impl Into<String>) -> EnrolError {
        EnrolError::State {
            dir: self.dir.clone(),
            message: message.into(),
        }
    }

    /// The identity in the directory, `None` if it holds no certificate yet.
    pub fn load(&self) -> Result<Option<Held>, EnrolError> {
        let cert_pem = match std::fs::read_to_string(self.cert()) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(format!("cannot read {CERT}: {e}"))),
        };
        let key_pem = mxscope_proto::secret::read_private(&self.key())
            .map_err(|e| self.err(format!("{KEY}: {e}")))?;
        let ca_pem = std::fs::read_to_string(self.ca())
            .map_err(|e| self.err(format!("cannot read {CA}: {e}")))?;
        let info = cert_info(&cert_pem, CERT).map_err(|e| self.err(e.to_string()))?;
        let Some(Identity::Agent { id, region }) = info.identity.clone() else {
            return Err(self.err(format!(
                "{CERT} is not an mxscope agent certificate; remove the directory's files and enrol again"
            )));
        };
        Ok(Some(Held {
            cert_pem,
            key_pem,
            ca_pem,
            info,
            id,
            region,
        }))
    }

    /// Writes a key and its certificate (and the CA, when given), each replacing the old file at
    /// once (written beside it, synced, renamed), the key readable by its owner only.
    pub fn store(
        &self,
        key_pem: &str,
        cert_pem: &str,
        ca_pem: Option<&str>,
    ) -> Result<(), EnrolError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| self.err(format!("cannot create it: {e}")))?;
        let put = |name: &str, text: &str, mode: u32| -> Result<(), EnrolError> {
            use std::io::Write;
            let tmp = self.dir.join(format!(".{name}.new"));
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
                .map_err(|e| self.err(format!("cannot write {name}: {e}")))?;
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| self.err(format!("cannot write {name}: {e}")))?;
            std::fs::rename(&tmp, self.dir.join(name))
                .map_err(|e| self.err(format!("cannot replace {name}: {e}")))
        };
        if let Some(ca) = ca_pem {
            put(CA, ca, 0o644)?;
        }
        // The key first: a crash between the two renames leaves a key without its certificate,
        // which the next renewal or enrolment replaces; never a certificate without its key.
        put(KEY, key_pem, 0o600)?;
        put(CERT, cert_pem, 0o644)?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Accepts the collector only if the chain it presents holds the CA of `pin` and its certificate
/// verifies against that CA for the name asked for; keeps the CA certificate.
#[derive(Debug)]
struct PinnedCa {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
    found: Mutex<Vec<String>>,
    ca: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut found = self.found.lock().unwrap_or_else(|e| e.into_inner());
        let mut ca = None;
        for c in std::iter::once(end_entity).chain(intermediates) {
            let fp = Fingerprint::of(c);
            if fp == self.pin {
                ca = Some(c.clone().into_owned());
            }
            found.push(fp.to_string());
        }
        let Some(ca) = ca else {
            return Err(rustls::Error::General(
                "CA of the token not in the chain".into(),
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| rustls::Error::General(format!("pinned CA unusable: {e}")))?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        *self.ca.lock().unwrap_or_else(|e| e.into_inner()) = Some(ca);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The host and port of an `https://host:port` URL.
fn host_port(collector: &str) -> Result<(String, u16), EnrolError> {
    let bad = || {
        EnrolError::Token(format!(
            "--collector '{collector}' must be https://host:port to enrol"
        ))
    };
    let uri: tonic::transport::Uri = collector.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https") {
        return Err(bad());
    }
    let host = uri.host().ok_or_else(bad)?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((host, uri.port_u16().ok_or_else(bad)?))
}

/// A TLS handshake with the collector that succeeds only with the token's CA: its certificate.
async fn pinned_ca(
    collector: &str,
    pin: &Fingerprint,
) -> Result<CertificateDer<'static>, EnrolError> {
    let (host, port) = host_port(collector)?;
    let unreachable = |reason: String| EnrolError::Unreachable {
        collector: collector.to_string(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCa {
        pin: pin.clone(),
        provider: provider.clone(),
        found: Mutex::new(Vec::new()),
        ca: Mutex::new(None),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| unreachable(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let name =
        ServerName::try_from(host.clone()).map_err(|e| unreachable(format!("{host}: {e}")))?;
    let tcp = tokio::time::timeout(
        TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| unreachable(format!("no connection within {} s", TIMEOUT.as_secs())))?
    .map_err(|e| unreachable(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = tokio::time::timeout(TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| unreachable(format!("no TLS handshake within {} s", TIMEOUT.as_secs())))?;
    let ca = verifier.ca.lock().unwrap_or_else(|e| e.into_inner()).take();
    match (handshake, ca) {
        (Ok(_), Some(ca)) => Ok(ca),
        (Err(e), None)
            if verifier
                .found
                .lock()
                .map(|f| !f.is_empty())
                .unwrap_or(false) =>
        {
            let found = verifier
                .found
                .lock()
                .map(|f| f.join(", "))
                .unwrap_or_default();
            let _ = e;
            Err(EnrolError::Pin {
                collector: collector.to_string(),
                expected: pin.clone(),
                found,
            })
        }
        (Err(e), _) => Err(unreachable(chain(&e))),
        (Ok(_), None) => Err(unreachable(
            "the handshake ended without a certificate".into(),
        )),
    }
}

/// First start: makes a key, pins the collector by the token's CA, sends a CSR with the token,
/// and writes key, certificate and CA into `dir`. `id` and `region` are what the operator asked
/// for (the token decides; a mismatch is refused by the collector). The collectors are tried in
/// order: one that cannot be reached, or does not present the token's CA (the token is then not
/// sent), passes to the next; a refusal ends the enrolment.
pub async fn enroll(
    collectors: &[String],
    token: &str,
    id: Option<&str>,
    region: Option<&str>,
    dir: &StateDir,
) -> Result<Held, EnrolError> {
    let parsed: Token = token
        .parse()
        .map_err(|e: mxscope_pki::PkiError| EnrolError::Token(e.to_string()))?;
    // Before anything goes over the network: the directory must take the files.
    dir.store_probe()?;
    let mut failed: Option<EnrolError> = None;
    for (i, collector) in collectors.iter().enumerate() {
        match enroll_at(collector, token, &parsed, id, region, dir).await {
            Err(e @ (EnrolError::Unreachable { .. } | EnrolError::Pin { .. })) => {
                if i + 1 < collectors.len() {
                    warn!(collector = %collector, error = %e, "cannot enrol with this collector, trying the next");
                }
                // A collector with the wrong CA says more than one that is down: it is kept.
                if !matches!(failed, Some(EnrolError::Pin { .. })) {
                    failed = Some(e);
                }
            }
            done => return done,
        }
    }
    Err(failed.unwrap_or_else(|| EnrolError::Token("needs --collector https://host:port".into())))
}

/// [`enroll`] with one collector.
async fn enroll_at(
    collector: &str,
    token: &str,
    parsed: &Token,
    id: Option<&str>,
    region: Option<&str>,
    dir: &StateDir,
) -> Result<Held, EnrolError> {
    let ca = pinned_ca(collector, &parsed.ca).await?;
    let ca_pem = mxscope_pki::pem_of(&ca);
    let (csr, key) = mxscope_pki::new_csr().map_err(|e| EnrolError::Token(e.to_string()))?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem));
    let unreachable = |reason: String| EnrolError::Unreachable {
        collector: collector.to_string(),
        reason,
    };
    let endpoint = tonic::transport::Endpoint::from_shared(collector.to_string())
        .map_err(|e| unreachable(chain(&e)))?
        .tls_config(tls)
        .map_err(|e| unreachable(chain(&e)))?
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| unreachable(chain(&e)))?;
    let mut client = pb::enrollment_client::EnrollmentClient::new(channel);
    let answer = client
        .enroll(pb::EnrollRequest {
            token: token.trim().to_string(),
            csr_pem: csr,
            agent_id: id.unwrap_or_default().to_string(),
            region: region.unwrap_or_default().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => {
                unreachable(status.message().to_string())
            }
            _ => EnrolError::Refused(status.message().to_string()),
        })?
        .into_inner();
    dir.store(&key, &answer.cert_pem, Some(&ca_pem))?;
    let held = dir
        .load()?
        .ok_or_else(|| dir.err("the certificate just written is gone"))?;
    info!(collector = %collector, agent.id = %held.id, region = %held.region,
        cert.serial = %held.info.id.serial, state_dir = %dir.dir.display(), "enrolled with the collector");
    Ok(held)
}

impl StateDir {
    /// Checks that the directory exists (or can be made) and takes files, before enrolling.
    fn store_probe(&self) -> Result<(), EnrolError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| self.err(format!("cannot create it: {e}")))?;
        let probe = self.dir.join(".write-test");
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| self.err(format!("cannot write in it: {e}")))
    }
}

/// The identity the agent runs with: the one in `dir`, or, with a token and no (valid)
/// certificate there yet, the one it enrols for. `None` and no token is an error naming the fix.
pub async fn prepare(
    collectors: &[String],
    token: Option<&str>,
    id: Option<&str>,
    region: Option<&str>,
    dir: &StateDir,
) -> Result<Held, EnrolError> {
    match (dir.load()?, token) {
        (Some(held), _) if !held.expired() => {
            if token.is_some() {
                info!(agent.id = %held.id, state_dir = %dir.dir.display(),
                    "already enrolled: --enroll is ignored (the certificate in the state directory is used)");
            }
            Ok(held)
        }
        (Some(held), None) => Err(dir.err(format!(
            "the certificate of agent '{}' expired at {}; enrol again: mxscope-agent --enroll TOKEN \
             --state-dir {} (a token from 'mxscopectl token create --region {} --id {}')",
            held.id,
            held.info.not_after,
            dir.dir.display(),
            held.region,
            held.id
        ))),
        (None, None) => Err(dir.err(
            "holds no agent certificate yet: start once with --enroll TOKEN (from 'mxscopectl \
             token create --region R') and --collector https://host:port"
                .to_string(),
        )),
        (_, Some(token)) => enroll(collectors, token, id, region, dir).await,
    }
}

/// What the uplink needs to renew: the directory, when the next renewal is due, and the mTLS
/// settings new sessions use (replaced by each renewal).
#[derive(Debug)]
pub struct Renewal {
    pub dir: StateDir,
    pub renew_at: Mutex<SystemTime>,
    pub tls: Mutex<crate::trust::CollectorTls>,
}

impl Renewal {
    /// Keeps a renewed certificate and the key it was made for: files first, then the settings
    /// of the next session and the next renewal time.
    pub fn install(&self, key_pem: &str, cert_pem: &str) -> Result<SystemTime, EnrolError> {
        let info =
            cert_info(cert_pem, "renewed certificate").map_err(|e| self.dir.err(e.to_string()))?;
        self.dir.store(key_pem, cert_pem, None)?;
        let ca = std::fs::read(self.dir.ca()).ok();
        *self.tls.lock().unwrap_or_else(|e| e.into_inner()) =
            crate::trust::CollectorTls::from_pems(cert_pem.into(), key_pem.into(), ca);
        let at = renew_at(&info);
        *self.renew_at.lock().unwrap_or_else(|e| e.into_inner()) = at;
        Ok(at)
    }

    /// Puts the next attempt `after` from now (a refused or failed renewal).
    pub fn retry_in(&self, after: Duration) {
        *self.renew_at.lock().unwrap_or_else(|e| e.into_inner()) = SystemTime::now() + after;
    }

    pub fn due(&self) -> SystemTime {
        *self.renew_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn current_tls(&self) -> crate::trust::CollectorTls {
        self.tls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "9b0c5a1e2d3f4a5b6c7d8e9f00112233445566778899aabbccddeeff00112233";

    /// `https://` URLs of loopback ports nothing listens on.
    fn closed(n: usize) -> Vec<String> {
        let held: Vec<std::net::TcpListener> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        held.iter()
            .map(|l| format!("https://{}", l.local_addr().unwrap()))
            .collect()
    }

    /// A TLS server on loopback presenting a self-signed certificate (not the token's CA); it
    /// serves handshakes until the test ends.
    async fn other_ca_server() -> String {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        url
    }

    fn token() -> String {
        Token::generate(PIN.parse().unwrap()).unwrap().to_string()
    }

    #[tokio::test]
    async fn enrolment_tries_every_collector_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let collectors = closed(2);
        let e = enroll(&collectors, &token(), None, None, &state)
            .await
            .unwrap_err();
        match &e {
            EnrolError::Unreachable { collector, .. } => {
                assert_eq!(collector, &collectors[1], "the last one tried: {e}")
            }
            other => panic!("unreachable expected: {other}"),
        }
        assert!(state.load().unwrap().is_none(), "nothing written");
    }

    #[tokio::test]
    async fn a_collector_with_another_ca_is_passed_over_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let other = other_ca_server().await;
        // First or last, the collector with the wrong CA is the error: it says more than one
        // that is down.
        for collectors in [
            vec![other.clone(), closed(1).remove(0)],
            vec![closed(1).remove(0), other.clone()],
        ] {
            let e = enroll(&collectors, &token(), None, None, &state)
                .await
                .unwrap_err();
            match &e {
                EnrolError::Pin { collector, .. } => assert_eq!(collector, &other, "{e}"),
                other => panic!("CA mismatch expected with {collectors:?}: {other}"),
            }
        }
        assert!(state.load().unwrap().is_none(), "nothing written");
    }
}
