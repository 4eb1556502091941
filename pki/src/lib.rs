//! The private PKI behind mTLS: a CA, agent certificates whose identity (id and region) is bound in
//! a URI SAN, admin and read-only client certificates for ctl, collector server certificates, and
//! CSR signing for token enrolment. Peer identities are read back from certificates here too, and
//! the revocation list's entries ([`revocation`]) are parsed here for the collector and ctl.

pub mod revocation;
pub mod token;

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use mxscope_proto::names::{is_label, LABEL_RULE};
pub use revocation::{BadLine, CertId, Entry, Fingerprint, Revocations, Serial};
pub use token::Token;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

const URN: &str = "urn:mxscope:";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists: refusing to overwrite a CA (remove it first if you mean it)")]
    Exists(PathBuf),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid {what} '{value}': {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

/// Who a client certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An agent: results are attributed to this id and region, whatever its hello says.
    Agent { id: String, region: String },
    /// ctl with every right (targets may be changed).
    Admin { name: String },
    /// ctl that may only read.
    Reader { name: String },
}

impl Identity {
    fn uri(&self) -> String {
        match self {
            Identity::Agent { id, region } => format!("{URN}agent:{region}:{id}"),
            Identity::Admin { name } => format!("{URN}admin:{name}"),
            Identity::Reader { name } => format!("{URN}read:{name}"),
        }
    }

    fn common_name(&self) -> String {
        match self {
            Identity::Agent { id, region } => format!("mxscope agent {id} ({region})"),
            Identity::Admin { name } => format!("mxscope admin {name}"),
            Identity::Reader { name } => format!("mxscope reader {name}"),
        }
    }

    fn parse_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(URN)?;
        let (kind, rest) = rest.split_once(':')?;
        match kind {
            "agent" => {
                let (region, id) = rest.split_once(':')?;
                (is_label(region) && is_label(id)).then(|| Identity::Agent {
                    id: id.into(),
                    region: region.into(),
                })
            }
            "admin" if is_label(rest) => Some(Identity::Admin { name: rest.into() }),
            "read" if is_label(rest) => Some(Identity::Reader { name: rest.into() }),
            _ => None,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Agent { id, region } => write!(f, "agent {id} in {region}"),
            Identity::Admin { name } => write!(f, "admin {name}"),
            Identity::Reader { name } => write!(f, "reader {name}"),
        }
    }
}

fn check_label(what: &'static str, value: &str) -> Result<(), PkiError> {
    if is_label(value) {
        Ok(())
    } else {
        Err(PkiError::Invalid {
            what,
            value: value.into(),
            why: LABEL_RULE,
        })
    }
}

/// The identity a peer certificate (DER) carries, if it is one of ours.
pub fn identity_of(cert_der: &[u8]) -> Option<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    identity_in(&cert)
}

fn identity_in(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<Identity> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => Identity::parse_uri(uri),
        _ => None,
    })
}

/// A client certificate as the collector sees it: whom it speaks for, and which certificate it
/// is (what revocation entries name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub identity: Identity,
    pub cert: CertId,
    /// The end of the certificate's validity, µs since the epoch.
    pub not_after_us: i64,
}

/// The identity, serial and fingerprint of a peer certificate (DER), if it is one of ours.
pub fn peer_of(cert_der: &[u8]) -> Option<Peer> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(Peer {
        identity: identity_in(&cert)?,
        cert: CertId::of_parsed(cert_der, &cert),
        not_after_us: cert
            .validity()
            .not_after
            .timestamp()
            .saturating_mul(1_000_000),
    })
}

/// The first certificate in a PEM text: its identity (if it is one of ours), serial and
/// fingerprint. `what` names the file in errors.
pub fn read_cert_pem(pem: &str, what: &str) -> Result<(Option<Identity>, CertId), PkiError> {
    cert_info(pem, what).map(|info| (info.identity, info.id))
}

/// What a certificate file says of itself.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// `None` if it is not one of ours.
    pub identity: Option<Identity>,
    pub id: CertId,
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
}

/// The identity, serial, fingerprint and validity of the first certificate in a PEM text.
pub fn cert_info(pem: &str, what: &str) -> Result<CertInfo, PkiError> {
    let invalid = |why| PkiError::Invalid {
        what: "certificate file",
        value: what.into(),
        why,
    };
    let block = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .ok_or_else(|| invalid("no PEM block 'BEGIN CERTIFICATE' in it"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&block.contents)
        .map_err(|_| invalid("its CERTIFICATE block is not an X.509 certificate"))?;
    let validity = cert.validity();
    Ok(CertInfo {
        identity: identity_in(&cert),
        id: CertId::of_parsed(&block.contents, &cert),
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
    })
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The end of its validity.
    pub not_after: time::OffsetDateTime,
}

impl Issued {
    /// The serial and fingerprint of the certificate (what `mxscopectl revoke` names).
    pub fn cert_id(&self) -> Result<CertId, PkiError> {
        read_cert_pem(&self.cert_pem, "issued certificate").map(|(_, id)| id)
    }

    /// When it expires, `YYYY-MM-DD HH:MM UTC`.
    pub fn expires(&self) -> String {
        let t = self.not_after.to_offset(time::UtcOffset::UTC);
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        )
    }
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"***")
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// How long issued certificates live.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Days before now (negative values make certificates that are not yet valid).
    pub from_days_ago: i64,
    pub days: i64,
}

/// Days a certificate lives unless asked otherwise: agents, readers and the collector 825.
pub const DEFAULT_DAYS: i64 = 825;
/// Days an admin certificate lives unless asked otherwise: it may change every agent's targets,
/// so a lost one should stop working soon on its own, revoked or not.
pub const ADMIN_DAYS: i64 = 30;

impl Validity {
    /// The default validity of a certificate for `who`.
    pub fn default_for(who: &Identity) -> Validity {
        match who {
            Identity::Admin { .. } => Validity {
                days: ADMIN_DAYS,
                ..Validity::default()
            },
            Identity::Agent { .. } | Identity::Reader { .. } => Validity::default(),
        }
    }
}

impl Default for Validity {
    fn default() -> Self {
        Validity {
            from_days_ago: 1,
            days: DEFAULT_DAYS,
        }
    }
}

fn apply(params: &mut CertificateParams, v: Validity) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(v.from_days_ago);
    params.not_after = params.not_before + time::Duration::days(v.days);
}

/// A certificate authority held in memory.
pub struct Ca {
    /// The issuer rcgen signs with (for a loaded CA, re-made from its certificate and key).
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate as distributed (the file's, for a loaded CA), PEM and DER.
    pem: String,
    der: Vec<u8>,
}

impl fmt::Debug for Ca {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("cert_der_len", &self.cert.der().len())
            .field("key", &"***")
            .finish()
    }
}

impl Ca {
    /// A new CA (ECDSA P-256), valid ten years.
    pub fn create(name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        apply(
            &mut params,
            Validity {
                from_days_ago: 1,
                days: 3650,
            },
        );
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            pem: cert.pem(),
            der: cert.der().to_vec(),
            cert,
            key,
        })
    }

    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|source| PkiError::Io { path, source })
        };
        Ca::from_pems(&read("ca.pem")?, &read("ca.key")?, "ca.pem")
    }

    /// The CA of a certificate and its key (both PEM); `what` names the certificate in errors.
    /// The key must be the certificate's.
    pub fn from_pems(cert_pem: &str, key_pem: &str, what: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let invalid = |why| PkiError::Invalid {
            what: "CA certificate",
            value: what.into(),
            why,
        };
        let block = x509_parser::pem::Pem::iter_from_buffer(cert_pem.as_bytes())
            .filter_map(Result::ok)
            .find(|p| p.label == "CERTIFICATE")
            .ok_or_else(|| invalid("no PEM block 'BEGIN CERTIFICATE' in it"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&block.contents)
            .map_err(|_| invalid("its CERTIFICATE block is not an X.509 certificate"))?;
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(invalid(
                "the private key is not this certificate's (pass the key of the CA that signed the agents' certificates)",
            ));
        }
        if !parsed.is_ca() {
            return Err(invalid("it is not a CA certificate"));
        }
        let der = block.contents.clone();
        let pem = pem_of(&der);
        let params = CertificateParams::from_ca_cert_der(&der.clone().into())?;
        // Re-signing the parsed parameters gives an issuer with the same name and key.
        Ok(Ca {
            cert: params.self_signed(&key)?,
            key,
            pem,
            der,
        })
    }

    /// The SHA-256 fingerprint of the CA certificate: what enrolment tokens carry.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.der)
    }

    /// Writes `ca.pem` and `ca.key` (mode 0600) into `dir`, never overwriting.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.into(),
            source,
        })?;
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        for p in [&cert, &key] {
            if p.exists() {
                return Err(PkiError::Exists(p.clone()));
            }
        }
        write_private(&key, &self.key.serialize_pem())?;
        fs::write(&cert, &self.pem).map_err(|source| PkiError::Io { path: cert, source })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.pem.clone()
    }

    /// A client certificate for an agent, an admin or a reader.
    pub fn issue(&self, who: &Identity, validity: Validity) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let params = self.client_params(who, validity)?;
        let not_after = params.not_after;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }

    /// Signs an agent's CSR, taking only its public key: the identity is set here, server-side.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        who: &Identity,
        validity: Validity,
    ) -> Result<String, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        csr.params = self.client_params(who, validity)?;
        Ok(csr.signed_by(&self.cert, &self.key)?.pem())
    }

    /// Signs an agent's CSR for `who`, valid from a minute ago (clock skew) for `life` from now.
    pub fn sign_csr_for(
        &self,
        csr_pem: &str,
        who: &Identity,
        life: std::time::Duration,
    ) -> Result<Issued, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = self.client_params(who, Validity::default())?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + life;
        let not_after = params.not_after;
        csr.params = params;
        Ok(Issued {
            cert_pem: csr.signed_by(&self.cert, &self.key)?.pem(),
            key_pem: String::new(),
            not_after,
        })
    }

    /// A server certificate for the collector, for these DNS names and IP addresses.
    pub fn issue_server(&self, names: &[String], validity: Validity) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "mxscope collector");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        apply(&mut params, validity);
        let not_after = params.not_after;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }

    fn client_params(
        &self,
        who: &Identity,
        validity: Validity,
    ) -> Result<CertificateParams, PkiError> {
        match who {
            Identity::Agent { id, region } => {
                check_label("agent id", id)?;
                check_label("region", region)?;
            }
            Identity::Admin { name } | Identity::Reader { name } => check_label("name", name)?,
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, who.common_name());
        let uri = who.uri().try_into().map_err(|_| PkiError::Invalid {
            what: "identity",
            value: who.uri(),
            why: "not an IA5 string",
        })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        apply(&mut params, validity);
        Ok(params)
    }
}

/// A new key and a CSR for it (what an agent sends when it enrols with a token).
pub fn new_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "mxscope agent enrolment");
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// The PEM text of a certificate's DER.
pub fn pem_of(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Writes a secret file readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.into(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        let mut r = pem.as_bytes();
        let cert = rustls_pemfile::certs(&mut r)
            .next()
            .expect("one cert")
            .expect("valid pem");
        cert.to_vec()
    }

    #[test]
    fn agent_identity_round_trips_and_is_server_side_on_csr() {
        let ca = Ca::create("test ca").unwrap();
        let who = Identity::Agent {
            id: "ag-1".into(),
            region: "eu-west".into(),
        };
        let issued = ca.issue(&who, Validity::default()).unwrap();
        assert_eq!(identity_of(&der(&issued.cert_pem)), Some(who.clone()));
        assert!(
            format!("{issued:?}").contains("***") && !format!("{issued:?}").contains("PRIVATE")
        );

        let (csr, _key) = new_csr().unwrap();
        let signed = ca.sign_csr(&csr, &who, Validity::default()).unwrap();
        assert_eq!(identity_of(&der(&signed)), Some(who));

        let admin = Identity::Admin { name: "ops".into() };
        assert_eq!(
            identity_of(&der(&ca
                .issue(&admin, Validity::default())
                .unwrap()
                .cert_pem)),
            Some(admin)
        );
        let server = ca
            .issue_server(
                &["localhost".into(), "127.0.0.1".into()],
                Validity::default(),
            )
            .unwrap();
        assert_eq!(identity_of(&der(&server.cert_pem)), None);
    }

    #[test]
    fn a_certificate_is_known_by_its_serial_and_fingerprint() {
        let ca = Ca::create("test ca").unwrap();
        let who = Identity::Admin { name: "ops".into() };
        let one = ca.issue(&who, Validity::default()).unwrap();
        let two = ca.issue(&who, Validity::default()).unwrap();
        let peer = peer_of(&der(&one.cert_pem)).expect("one of ours");
        assert_eq!(peer.identity, who);
        assert_eq!(peer.cert.fingerprint, Fingerprint::of(&der(&one.cert_pem)));
        let (identity, cert) = read_cert_pem(&one.cert_pem, "admin.pem").unwrap();
        assert_eq!((identity, cert), (Some(who.clone()), peer.cert.clone()));
        // rcgen's serials are 20 bytes (from the key): each certificate has its own.
        assert!(
            peer.cert.serial.to_string().len() > 30,
            "{}",
            peer.cert.serial
        );
        let other = peer_of(&der(&two.cert_pem)).unwrap().cert;
        assert_ne!(other.serial, peer.cert.serial);
        assert_ne!(other.fingerprint, peer.cert.fingerprint);

        let server = ca
            .issue_server(&["localhost".into()], Validity::default())
            .unwrap();
        assert_eq!(peer_of(&der(&server.cert_pem)), None);
        let (none, _) = read_cert_pem(&server.cert_pem, "collector.pem").unwrap();
        assert_eq!(none, None);
        for bad in [
            "",
            "hello",
            &one.key_pem,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            let err = read_cert_pem(bad, "x.pem").unwrap_err().to_string();
            assert!(err.contains("x.pem"), "{err}");
        }
    }

    #[test]
    fn admin_certificates_live_30_days_by_default_the_others_825() {
        let admin = Identity::Admin { name: "ops".into() };
        let reader = Identity::Reader {
            name: "dash".into(),
        };
        let agent = Identity::Agent {
            id: "a".into(),
            region: "eu".into(),
        };
        assert_eq!(Validity::default_for(&admin).days, 30);
        assert_eq!(Validity::default_for(&reader).days, 825);
        assert_eq!(Validity::default_for(&agent).days, 825);
        let ca = Ca::create("test ca").unwrap();
        let issued = ca.issue(&admin, Validity::default_for(&admin)).unwrap();
        let left = issued.not_after - time::OffsetDateTime::now_utc();
        assert!(
            (28..=29).contains(&left.whole_days()),
            "{left}, expires {}",
            issued.expires()
        );
        // And the certificate says so, not only the struct.
        let der = der(&issued.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            cert.validity().not_after.timestamp(),
            issued.not_after.unix_timestamp()
        );
        assert!(issued.expires().ends_with(" UTC"), "{}", issued.expires());
    }

    #[test]
    fn bad_names_are_refused() {
        let ca = Ca::create("test ca").unwrap();
        for (id, region) in [
            ("Ag", "eu"),
            ("a b", "eu"),
            ("a", ""),
            ("a", "eu:west"),
            ("-a", "eu"),
        ] {
            let who = Identity::Agent {
                id: id.into(),
                region: region.into(),
            };
            assert!(
                matches!(
                    ca.issue(&who, Validity::default()),
                    Err(PkiError::Invalid { .. })
                ),
                "{id}/{region}"
            );
        }
        assert_eq!(Identity::parse_uri("urn:mxscope:agent:eu-west"), None);
        assert_eq!(Identity::parse_uri("urn:other:admin:x"), None);
        assert_eq!(Identity::parse_uri("urn:mxscope:root:x"), None);
    }

    #[test]
    fn save_load_and_no_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create("test ca").unwrap();
        ca.save(dir.path()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(dir.path().join("ca.key"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(ca.save(dir.path()), Err(PkiError::Exists(_))));
        let loaded = Ca::load(dir.path()).unwrap();
        let who = Identity::Reader {
            name: "dash".into(),
        };
        let issued = loaded.issue(&who, Validity::default()).unwrap();
        assert_eq!(identity_of(&der(&issued.cert_pem)), Some(who));
        assert!(matches!(
            Ca::load(&dir.path().join("missing")),
            Err(PkiError::Io { .. })
        ));
    }

    #[test]
    fn a_ca_from_its_files_keeps_its_certificate_and_refuses_another_key() {
        let ca = Ca::create("test ca").unwrap();
        let key = ca.key.serialize_pem();
        let loaded = Ca::from_pems(&ca.cert_pem(), &key, "ca.pem").unwrap();
        assert_eq!(
            loaded.cert_pem(),
            ca.cert_pem(),
            "the distributed certificate, not a re-signed one"
        );
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        let other = Ca::create("other ca").unwrap();
        let err = Ca::from_pems(&ca.cert_pem(), &other.key.serialize_pem(), "ca.pem")
            .expect_err("mismatched key refused")
            .to_string();
        assert!(err.contains("not this certificate's"), "{err}");
        let leaf = ca
            .issue(&Identity::Admin { name: "ops".into() }, Validity::default())
            .unwrap();
        let err = Ca::from_pems(&leaf.cert_pem, &leaf.key_pem, "admin.pem")
            .expect_err("a leaf is not a CA")
            .to_string();
        assert!(err.contains("not a CA"), "{err}");
    }

    #[test]
    fn a_csr_signed_for_a_short_life_says_so() {
        let ca = Ca::create("test ca").unwrap();
        let (csr, _key) = new_csr().unwrap();
        let who = Identity::Agent {
            id: "ag-7".into(),
            region: "eu".into(),
        };
        let issued = ca
            .sign_csr_for(&csr, &who, std::time::Duration::from_secs(60))
            .unwrap();
        let info = cert_info(&issued.cert_pem, "agent.pem").unwrap();
        assert_eq!(info.identity, Some(who));
        let life = info.not_after - info.not_before;
        assert_eq!(
            life.whole_seconds(),
            120,
            "a minute back for skew, a minute ahead"
        );
        let left = info.not_after - time::OffsetDateTime::now_utc();
        assert!(
            left.whole_seconds() <= 60 && left.whole_seconds() >= 55,
            "{left}"
        );
    }
}
