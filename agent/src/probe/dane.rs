//! The `dane` check (RFC 7672): TLSA records at `_25._tcp.<mx>` for each MX, matched against the
//! certificate chain the shared SMTP STARTTLS dialogue sees (DANE-EE and DANE-TA, SHA-256/512).
//! DNSSEC validation is not done here: `dane.dnssec=unknown` says so.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use mxscope_proto::{facts, CheckKind, Endpoint, ErrorClass, Observation, Outcome, Phase};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::time::Instant;

use super::endpoints::bounded;
use super::resolve::TlsaRecord;
use super::smtp::{self, Session};
use super::{observe, CheckSpec, ProbeContext, Target, TargetKind};

/// Runs the `dane` check; one observation with facts per MX host (`dane.<i>.*`).
pub(crate) async fn check(
    spec: &CheckSpec,
    ctx: &ProbeContext,
    start_us: i64,
    deadline: Instant,
) -> Observation {
    observe(spec, CheckKind::Dane, start_us, deadline, async |obs| {
        run(spec, ctx, deadline, obs).await
    })
    .await
}

fn is_void(class: ErrorClass) -> bool {
    matches!(class, ErrorClass::DnsNxdomain | ErrorClass::DnsNodata)
}

async fn run(spec: &CheckSpec, ctx: &ProbeContext, deadline: Instant, obs: &mut Observation) {
    let resolver = ctx.resolver.as_ref();
    let target = spec.target.trim_end_matches('.');
    // Answers are not DNSSEC-validated by this agent; DANE without DNSSEC proves nothing.
    obs.fact(facts::dane::DNSSEC, "unknown");
    let started = Instant::now();
    let hosts: Vec<String> = match spec.kind {
        TargetKind::Host => vec![target.to_string()],
        TargetKind::Domain => match bounded(target, deadline, resolver.mx(target)).await {
            Ok(a) => a
                .records
                .into_iter()
                .map(|r| r.exchange)
                .filter(|h| !h.is_empty() && h != ".")
                .collect(),
            Err(e) if e.class == ErrorClass::DnsNodata => vec![target.to_string()],
            Err(e) => {
                obs.timing(Phase::Resolve, started.elapsed());
                obs.problem(
                    Outcome::Fail,
                    e.class,
                    Phase::Resolve,
                    format!("MX lookup for {target}: {e}"),
                );
                return;
            }
        },
    };
    let lookups = hosts.iter().map(|h| {
        let name = format!("_25._tcp.{h}");
        async move {
            let answer = bounded(&name, deadline, resolver.tlsa(&name)).await;
            (name, answer)
        }
    });
    let answers = futures::future::join_all(lookups).await;
    obs.timing(Phase::Resolve, started.elapsed());

    let smtp_spec = spec.for_service(CheckKind::Smtp);
    let port = spec.service_port(CheckKind::Smtp);
    let mut present = false;
    for (i, (host, (name, answer))) in hosts.iter().zip(answers).enumerate() {
        obs.fact(
            &facts::dane::nth(i, facts::dane::field::HOST),
            host.as_str(),
        );
        let records = match answer {
            Ok(a) => a.records,
            Err(e) if is_void(e.class) => Vec::new(),
            Err(e) => {
                obs.problem(
                    Outcome::Fail,
                    e.class,
                    Phase::Resolve,
                    format!("TLSA lookup {name}: {e}"),
                );
                continue;
            }
        };
        obs.fact(
            &facts::dane::nth(i, facts::dane::field::PRESENT),
            !records.is_empty(),
        );
        if records.is_empty() {
            continue;
        }
        present = true;
        let shown: Vec<String> = records.iter().map(describe).collect();
        obs.fact(
            &facts::dane::nth(i, facts::dane::field::TLSA),
            shown.join("; "),
        );
        let usable: Vec<&TlsaRecord> = records.iter().filter(|r| usable(r)).collect();
        if usable.is_empty() {
            obs.problem(
                Outcome::Warn,
                ErrorClass::Policy,
                Phase::Resolve,
                format!(
                    "{name} has only unusable TLSA records (SMTP uses DANE-TA(2) and DANE-EE(3), \
                     RFC 7672 §3.1.3)"
                ),
            );
            continue;
        }
        let ips = match bounded(host, deadline, resolver.ips(host)).await {
            Ok(a) if !a.records.is_empty() => a.records,
            Ok(_) => {
                obs.problem(
                    Outcome::Fail,
                    ErrorClass::DnsNodata,
                    Phase::Resolve,
                    format!("MX host {host} has no address"),
                );
                continue;
            }
            Err(e) => {
                obs.problem(
                    Outcome::Fail,
                    e.class,
                    Phase::Resolve,
                    format!("MX host {host}: {e}"),
                );
                continue;
            }
        };
        for ip in ips {
            let key = |field| facts::dane::address(i, &ip.to_string(), field);
            let sink = Mutex::new(Vec::new());
            let t = Target {
                spec: &smtp_spec,
                ctx,
                host,
                addr: SocketAddr::new(ip, port),
                deadline,
                peer_chain: Some(&sink),
            };
            let mut seen = Observation::new(
                &spec.target,
                Endpoint::host(host),
                CheckKind::Smtp,
                obs.start_us,
            );
            let permit =
                tokio::time::timeout_at(deadline, ctx.host_limits.acquire(&ip.to_string())).await;
            if permit.is_ok() {
                if let Some(Session { d, .. }) = smtp::open(&t, &mut seen).await {
                    smtp::quit(d, &t, &mut seen).await;
                }
            }
            drop(permit);
            let chain = sink.into_inner().unwrap_or_else(|e| e.into_inner());
            if chain.is_empty() {
                let why = if seen.message.is_empty() {
                    "no TLS session".to_string()
                } else {
                    seen.message.clone()
                };
                obs.fact(&key(facts::dane::field::MATCH), false);
                obs.problem(
                    Outcome::Fail,
                    seen.error_class.unwrap_or(ErrorClass::NoStarttls),
                    Phase::Tls,
                    format!("{host}[{ip}] publishes TLSA but no certificate was seen: {why}"),
                );
                continue;
            }
            match find_match(&usable, &chain, host) {
                Some(record) => {
                    obs.fact(&key(facts::dane::field::MATCH), true);
                    obs.fact(&key(facts::dane::field::MATCHED), describe(record));
                }
                None => {
                    obs.fact(&key(facts::dane::field::MATCH), false);
                    obs.problem(
                        Outcome::Fail,
                        ErrorClass::Policy,
                        Phase::Tls,
                        format!(
                            "no TLSA record at {name} matches the certificate of {host}[{ip}]: \
                             DANE senders will not deliver there"
                        ),
                    );
                }
            }
        }
    }
    obs.fact(facts::dane::PRESENT, present);
}

/// `3 1 1 ab12…` as in a zone file (association data in hex).
fn describe(r: &TlsaRecord) -> String {
    let hex: String = r.data.iter().map(|b| format!("{b:02x}")).collect();
    format!("{} {} {} {hex}", r.usage, r.selector, r.matching)
}

/// DANE-TA(2) or DANE-EE(3), full certificate or SPKI, exact/SHA-256/SHA-512.
fn usable(r: &TlsaRecord) -> bool {
    matches!(r.usage, 2 | 3) && r.selector <= 1 && r.matching <= 2
}

/// The first usable record that matches the chain (leaf first, DER).
fn find_match<'a>(
    records: &[&'a TlsaRecord],
    chain: &[Vec<u8>],
    host: &str,
) -> Option<&'a TlsaRecord> {
    let (leaf, rest) = chain.split_first()?;
    records.iter().copied().find(|r| match r.usage {
        3 => matches(r, leaf),
        2 => rest
            .iter()
            .any(|ta| matches(r, ta) && chains_to(leaf, rest, ta, host)),
        _ => false,
    })
}

/// Whether `cert` is what the record names (selector, then matching type).
pub(crate) fn matches(r: &TlsaRecord, cert: &[u8]) -> bool {
    let selected = match r.selector {
        0 => cert.to_vec(),
        1 => match spki(cert) {
            Some(s) => s,
            None => return false,
        },
        _ => return false,
    };
    match r.matching {
        0 => selected == r.data,
        1 => ring::digest::digest(&ring::digest::SHA256, &selected).as_ref() == r.data.as_slice(),
        2 => ring::digest::digest(&ring::digest::SHA512, &selected).as_ref() == r.data.as_slice(),
        _ => false,
    }
}

/// The DER SubjectPublicKeyInfo of a certificate.
fn spki(cert: &[u8]) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.public_key().raw.to_vec())
}

/// DANE-TA: the leaf must chain to the trust anchor `ta` and name `host` (RFC 7672 §3.1.2).
fn chains_to(leaf: &[u8], intermediates: &[Vec<u8>], ta: &[u8], host: &str) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(CertificateDer::from(ta.to_vec())).is_err() {
        return false;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(verifier) =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
    else {
        return false;
    };
    let Ok(name) = ServerName::try_from(host.trim_end_matches('.').to_string()) else {
        return false;
    };
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    use rustls::client::danger::ServerCertVerifier as _;
    verifier
        .verify_server_cert(
            &CertificateDer::from(leaf),
            &intermediates,
            &name,
            &[],
            UnixTime::now(),
        )
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> TlsaRecord {
        TlsaRecord {
            usage,
            selector,
            matching,
            data,
        }
    }

    #[test]
    fn selectors_and_matching_types() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["mx.example.test".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let der = cert.der().to_vec();
        let spki = key.public_key_der();
        let sha256 = |b: &[u8]| {
            ring::digest::digest(&ring::digest::SHA256, b)
                .as_ref()
                .to_vec()
        };
        let sha512 = |b: &[u8]| {
            ring::digest::digest(&ring::digest::SHA512, b)
                .as_ref()
                .to_vec()
        };
        assert!(matches(&record(3, 0, 0, der.clone()), &der));
        assert!(matches(&record(3, 0, 1, sha256(&der)), &der));
        assert!(matches(&record(3, 1, 1, sha256(&spki)), &der));
        assert!(matches(&record(3, 1, 2, sha512(&spki)), &der));
        assert!(matches(&record(3, 1, 0, spki.clone()), &der));
        assert!(!matches(&record(3, 1, 1, sha256(&der)), &der));
        assert!(!matches(&record(3, 1, 1, vec![0; 32]), &der));
        assert!(!matches(&record(3, 2, 1, sha256(&spki)), &der));
        assert!(!matches(&record(3, 1, 3, sha256(&spki)), &der));
        assert!(!matches(&record(3, 0, 0, der.clone()), b"garbage"));

        let chain = vec![der.clone()];
        let ee = record(3, 1, 1, sha256(&spki));
        assert!(find_match(&[&ee], &chain, "mx.example.test").is_some());
        // DANE-TA needs an issuer in the chain; the leaf alone is not one.
        let ta = record(2, 0, 1, sha256(&der));
        assert!(find_match(&[&ta], &chain, "mx.example.test").is_none());
        assert!(usable(&ee) && usable(&ta) && !usable(&record(1, 0, 1, vec![])));
        assert_eq!(describe(&record(3, 1, 1, vec![0xab, 0x01])), "3 1 1 ab01");
    }
}
