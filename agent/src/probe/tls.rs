//! Probe TLS (rustls, ring): a verifier that records webpki's verdict and the leaf certificate but
//! lets the handshake finish, so bad certificates are reported with their facts, not as a bare failure.
//! The peer's chain can be handed back (DANE matches it against TLSA records).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mxscope_proto::{facts, ErrorClass, FactValue, Observation, Outcome, Phase};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::time::Instant;

use super::dialogue::Io;
use super::Target;

/// Longest wait for a TLS handshake.
pub(crate) const TLS_TIMEOUT: Duration = Duration::from_secs(10);

/// What the verifier saw: the leaf and webpki's verdict on it.
#[derive(Debug)]
struct Seen {
    leaf: CertificateDer<'static>,
    /// Subjects of the intermediate certificates the server sent, in its order.
    chain: Vec<String>,
    verdict: Result<(), rustls::Error>,
}

/// Delegates to webpki, records the verdict and the leaf, and always lets the handshake go on.
/// Handshake signatures are still checked, so the peer must hold the certificate's key.
#[derive(Debug)]
struct RecordingVerifier {
    /// `None` when there are no trust anchors at all (every chain is untrusted).
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    seen: Arc<Mutex<Option<Seen>>>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = match &self.webpki {
            Some(v) => v
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map(|_| ()),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        };
        let seen = Seen {
            leaf: end_entity.clone().into_owned(),
            chain: intermediates
                .iter()
                .take(8)
                .map(|c| read_leaf(c).map_or_else(|| "(unparsable)".to_string(), |l| l.subject))
                .collect(),
            verdict,
        };
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen);
        Ok(ServerCertVerified::assertion())
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

/// The name TLS is asked for: the MX host name, or the address when the host is a literal.
fn server_name(target: &Target<'_>) -> ServerName<'static> {
    let host = super::endpoints::ip_literal(target.host)
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| target.host.trim_end_matches('.').to_string());
    ServerName::try_from(host).unwrap_or_else(|_| ServerName::IpAddress(target.addr.ip().into()))
}

/// Runs a TLS handshake over `io` in phase `tls`, recording timing, TLS facts and the certificate
/// verdict on `obs`. `None` when the handshake failed (recorded on `obs`).
pub(crate) async fn handshake(
    io: Box<dyn Io>,
    target: &Target<'_>,
    obs: &mut Observation,
) -> Option<Box<dyn Io>> {
    let started = Instant::now();
    let deadline = target.phase_deadline(TLS_TIMEOUT);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki =
        WebPkiServerVerifier::builder_with_provider(target.ctx.tls_roots.clone(), provider.clone())
            .build()
            .ok();
    let seen = Arc::new(Mutex::new(None));
    let verifier = RecordingVerifier {
        webpki,
        provider: provider.clone(),
        seen: seen.clone(),
    };
    let mut config = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth(),
        Err(e) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::TlsHandshake,
                Phase::Tls,
                format!("tls setup: {e}"),
            );
            return None;
        }
    };
    // Every probe makes a full handshake with a config of its own, so nothing could be resumed;
    // the default session cache (256 servers, ~100 KiB allocated per handshake) is never used.
    config.resumption = rustls::client::Resumption::disabled();
    let name = server_name(target);
    if let ServerName::DnsName(dns) = &name {
        obs.fact(facts::tls::SNI, dns.as_ref());
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let result = tokio::time::timeout_at(deadline, connector.connect(name.clone(), io)).await;
    obs.timing(Phase::Tls, started.elapsed());

    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(seen) = &seen {
        assess_certificate(obs, seen, &name, target);
    }
    match result {
        Ok(Ok(stream)) => {
            let (_, conn) = stream.get_ref();
            if let (Some(sink), Some(chain)) = (target.peer_chain, conn.peer_certificates()) {
                *sink.lock().unwrap_or_else(|e| e.into_inner()) =
                    chain.iter().map(|c| c.as_ref().to_vec()).collect();
            }
            if let Some(v) = conn.protocol_version() {
                obs.fact(facts::tls::VERSION, version_name(v));
            }
            if let Some(suite) = conn.negotiated_cipher_suite() {
                let s = suite.suite();
                obs.fact(
                    facts::tls::CIPHER,
                    s.as_str().map_or_else(|| format!("{s:?}"), str::to_string),
                );
            }
            if let Some(alpn) = conn.alpn_protocol() {
                obs.fact(facts::tls::ALPN, String::from_utf8_lossy(alpn).into_owned());
            }
            Some(Box::new(stream))
        }
        Ok(Err(e)) => {
            let is_tls = e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>());
            let class = if is_tls {
                ErrorClass::TlsHandshake
            } else {
                super::tcp::classify_io(&e)
            };
            obs.problem(
                Outcome::Fail,
                class,
                Phase::Tls,
                format!("tls handshake: {e}"),
            );
            None
        }
        Err(_) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::Timeout,
                Phase::Tls,
                "tls handshake: no completion before the deadline",
            );
            None
        }
    }
}

fn version_name(v: rustls::ProtocolVersion) -> String {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
        other => format!("{other:?}"),
    }
}

/// What the probe reads from the leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Leaf {
    pub subject: String,
    pub issuer: String,
    pub not_after_unix: i64,
}

pub(crate) fn read_leaf(der: &[u8]) -> Option<Leaf> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(Leaf {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

/// The class of a webpki verdict, by error variant.
fn verdict_class(err: &rustls::Error) -> ErrorClass {
    match err {
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => ErrorClass::CertExpired,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => ErrorClass::CertName,
        _ => ErrorClass::CertUntrusted,
    }
}

/// Lowercase hex SHA-256 of a certificate's DER (the fingerprint the collector's diagnosis compares).
fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Records certificate facts and judges them. An expired certificate or one below the fail
/// threshold fails everywhere; untrusted or mismatched is a failure on client ports (and where TLS
/// is required) but only a warning on port 25, where TLS between servers is opportunistic.
fn assess_certificate(
    obs: &mut Observation,
    seen: &Seen,
    name: &ServerName<'_>,
    target: &Target<'_>,
) {
    let strict = target.spec.check.is_client_port() || target.spec.require_tls;
    let trust_outcome = if strict { Outcome::Fail } else { Outcome::Warn };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    let name_match = rustls::server::ParsedCertificate::try_from(&seen.leaf)
        .ok()
        .is_some_and(|cert| rustls::client::verify_server_name(&cert, name).is_ok());
    obs.fact(facts::cert::VERIFIED, seen.verdict.is_ok());
    obs.fact(facts::cert::NAME_MATCH, name_match);
    obs.fact(facts::cert::SHA256, sha256_hex(&seen.leaf));
    obs.fact(facts::cert::CHAIN_LEN, seen.chain.len());
    if !seen.chain.is_empty() {
        obs.fact(facts::cert::CHAIN, seen.chain.join(" | "));
    }

    let Some(leaf) = read_leaf(&seen.leaf) else {
        obs.problem(
            Outcome::Fail,
            ErrorClass::TlsHandshake,
            Phase::Tls,
            "leaf certificate cannot be parsed",
        );
        return;
    };
    let days_left = (leaf.not_after_unix - now).div_euclid(86_400);
    let not_after = rfc3339(leaf.not_after_unix);
    obs.fact(facts::cert::SUBJECT, leaf.subject.as_str());
    obs.fact(facts::cert::ISSUER, leaf.issuer.as_str());
    obs.fact(facts::cert::NOT_AFTER, not_after.as_str());
    obs.fact(facts::cert::NOT_AFTER_UNIX, leaf.not_after_unix);
    obs.fact(facts::cert::DAYS_LEFT, days_left);

    if let Err(e) = &seen.verdict {
        match verdict_class(e) {
            ErrorClass::CertExpired => {
                obs.problem(
                    Outcome::Fail,
                    ErrorClass::CertExpired,
                    Phase::Tls,
                    format!("certificate expired on {not_after}"),
                );
            }
            ErrorClass::CertName => {
                obs.problem(
                    trust_outcome,
                    ErrorClass::CertName,
                    Phase::Tls,
                    format!("certificate is not valid for {}", name.to_str()),
                );
            }
            class => {
                obs.problem(
                    trust_outcome,
                    class,
                    Phase::Tls,
                    format!("certificate not trusted: {e}"),
                );
            }
        }
        obs.fact(facts::cert::ERROR, verdict_class(e).name());
    }
    if !name_match {
        obs.problem(
            trust_outcome,
            ErrorClass::CertName,
            Phase::Tls,
            format!("certificate is not valid for {}", name.to_str()),
        );
    }
    if days_left >= 0 {
        let options = &target.spec.options;
        if days_left < i64::from(options.cert_fail_days) {
            obs.problem(
                Outcome::Fail,
                ErrorClass::CertExpiring,
                Phase::Tls,
                format!("certificate expires in {days_left} days ({not_after})"),
            );
        } else if days_left < i64::from(options.cert_warn_days) {
            obs.problem(
                Outcome::Warn,
                ErrorClass::CertExpiring,
                Phase::Tls,
                format!("certificate expires in {days_left} days ({not_after})"),
            );
        }
    }
}

/// Whether the TLS session recorded on `obs` presented a certificate that verified against the
/// trust anchors and matched the server's name: the condition for sending a password over it
/// (the verifier lets every handshake finish, so the session alone proves nothing).
pub(crate) fn peer_authenticated(obs: &Observation) -> bool {
    let yes = |key| matches!(obs.fact_of(key), Some(FactValue::Flag(true)));
    yes(facts::cert::VERIFIED) && yes(facts::cert::NAME_MATCH)
}

/// Records that credentials were withheld from `service` because its certificate did not
/// authenticate it. The certificate problem itself is already on `obs` (a failure: the ports that
/// carry passwords are strict); this names the consequence when nothing worse was recorded.
pub(crate) fn withhold_credentials(obs: &mut Observation, service: &str) {
    let class = obs
        .error_class
        .filter(|c| {
            matches!(
                c,
                ErrorClass::CertExpired | ErrorClass::CertName | ErrorClass::CertUntrusted
            )
        })
        .unwrap_or(ErrorClass::CertUntrusted);
    obs.problem(
        Outcome::Fail,
        class,
        Phase::Tls,
        format!(
            "{service} server's certificate did not verify for its name: the probe never sends a \
             password to a server it cannot authenticate"
        ),
    );
}

/// `2025-01-31T12:00:00Z` from Unix seconds (proleptic Gregorian, UTC).
pub(crate) fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn verdicts_classify_by_variant() {
        let e = rustls::Error::InvalidCertificate(CertificateError::Expired);
        assert_eq!(verdict_class(&e), ErrorClass::CertExpired);
        let e = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        assert_eq!(verdict_class(&e), ErrorClass::CertName);
        let e = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(verdict_class(&e), ErrorClass::CertUntrusted);
    }
}
