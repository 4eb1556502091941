//! A throw-away certificate authority and the server certificates tests need (valid, expired,
//! wrong name), written as PEM files that Postfix, Dovecot and the agent's `--ca-file` read.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::lab::write_file;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// What kind of server certificate to issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Valid from yesterday for 90 days.
    Valid,
    /// Valid from 60 days ago until 30 days ago.
    Expired,
    /// Valid now, expiring in `days` days (for days-left thresholds).
    ExpiresIn { days: u64 },
}

/// A server certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The DNS names in the certificate's subjectAltName.
    pub names: Vec<String>,
}

/// The test CA. Its certificate is at [`TestCa::ca_file`], for `--ca-file`.
pub struct TestCa {
    cert: Certificate,
    key: KeyPair,
    dir: PathBuf,
    ca_file: PathBuf,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl TestCa {
    /// Makes a new CA and writes its certificate to `<dir>/ca.pem`.
    pub fn new(dir: &Path) -> Result<TestCa> {
        TestCa::named(dir, "mxscope test CA")
    }

    /// Like [`TestCa::new`] with common name `cn`: a second, untrusted CA next to the first
    /// (e.g. an "Inspection CA" re-signing certificates on one path).
    pub fn named(dir: &Path, cn: &str) -> Result<TestCa> {
        let key = KeyPair::generate().context("generate CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn.push(DnType::OrganizationName, "mxscope lab");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - 365 * DAY).into();
        params.not_after = (now + 3650 * DAY).into();
        let cert = params.self_signed(&key).context("self-sign CA")?;
        let ca_file = dir.join("ca.pem");
        write_file(&ca_file, cert.pem())?;
        Ok(TestCa {
            cert,
            key,
            dir: dir.to_path_buf(),
            ca_file,
        })
    }

    /// PEM file of the CA certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Issues a server certificate for `names` (the first is also the CN) and writes
    /// `<dir>/<label>.crt` and `<dir>/<label>.key`.
    pub fn issue(&self, label: &str, names: &[&str], validity: Validity) -> Result<CertFiles> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let key = KeyPair::generate().context("generate server key")?;
        let mut params = CertificateParams::new(names.clone()).context("server cert params")?;
        let mut dn = DistinguishedName::new();
        if let Some(cn) = names.first() {
            dn.push(DnType::CommonName, cn.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let (not_before, not_after) = match validity {
            Validity::Valid => (now - DAY, now + 90 * DAY),
            Validity::Expired => (now - 60 * DAY, now - 30 * DAY),
            Validity::ExpiresIn { days } => {
                (now - DAY, now + Duration::from_secs(days * 24 * 3600))
            }
        };
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .context("sign server cert")?;
        let files = CertFiles {
            cert: self.dir.join(format!("{label}.crt")),
            key: self.dir.join(format!("{label}.key")),
            names,
        };
        write_file(&files.cert, cert.pem())?;
        write_file(&files.key, key.serialize_pem())?;
        Ok(files)
    }

    /// A valid certificate for `name`.
    pub fn valid_for(&self, label: &str, name: &str) -> Result<CertFiles> {
        self.issue(label, &[name], Validity::Valid)
    }

    /// An expired certificate for `name`.
    pub fn expired_for(&self, label: &str, name: &str) -> Result<CertFiles> {
        self.issue(label, &[name], Validity::Expired)
    }

    /// A currently valid certificate that names some other host than `name`.
    pub fn wrong_name_for(&self, label: &str, name: &str) -> Result<CertFiles> {
        let other = format!("not-{name}");
        self.issue(label, &[other.as_str()], Validity::Valid)
    }
}
