//! The certificates probe TLS trusts: the built-in web PKI roots plus an operator's `--ca-file`;
//! and the agent's mTLS identity towards the collector (`--tls-cert`, `--tls-key`,
//! `--collector-ca`). A file that cannot be read or holds nothing usable is an error naming it.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use rustls::RootCertStore;

use crate::error::ConfigError;

/// System (web PKI) roots plus the certificates in `ca_file`, if any.
pub fn probe_roots(ca_file: Option<&Path>) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        add_pem_file(&mut roots, path)?;
    }
    Ok(roots)
}

/// Adds every certificate of a PEM file; returns how many were added.
pub fn add_pem_file(roots: &mut RootCertStore, path: &Path) -> Result<usize, ConfigError> {
    let err = |message: String| ConfigError::CaFile {
        file: path.display().to_string(),
        message,
    };
    let file = File::open(path).map_err(|e| err(format!("cannot read CA file: {e}")))?;
    let mut reader = BufReader::new(file);
    let mut added = 0;
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|e| err(format!("cannot read CA file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| err(format!("bad CA certificate: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(err("no PEM certificates in CA file".to_string()));
    }
    Ok(added)
}

/// The agent's side of mTLS to the collector, read at startup.
#[derive(Clone)]
pub struct CollectorTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for CollectorTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorTls")
            .field("key_pem", &"***")
            .field("ca", &self.ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl CollectorTls {
    /// Our certificate and key, and the collector's CA (PEM texts).
    pub fn from_pems(cert_pem: Vec<u8>, key_pem: Vec<u8>, ca_pem: Option<Vec<u8>>) -> CollectorTls {
        CollectorTls {
            cert_pem,
            key_pem,
            ca_pem,
        }
    }

    /// The tonic client configuration: our certificate, and the collector CA or the web PKI roots.
    pub fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let tls =
            ClientTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.ca_pem {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
            None => tls.with_webpki_roots(),
        }
    }
}

fn read_pem(path: &Path, flag: &str, marker: &str, what: &str) -> Result<Vec<u8>, ConfigError> {
    let err = |message: String| ConfigError::CaFile {
        file: path.display().to_string(),
        message,
    };
    let pem = if marker == "PRIVATE KEY" {
        mxscope_proto::secret::read_private(path).map_err(|e| err(format!("{flag}: {e}")))?
    } else {
        std::fs::read(path).map_err(|e| err(format!("cannot read {flag}: {e}")))?
    };
    if !String::from_utf8_lossy(&pem).contains(marker) {
        return Err(err(format!(
            "{flag}: no {what} in this file (expected PEM '{marker}'; 'mxscopectl enroll' writes agent.pem, agent.key and ca.pem)"
        )));
    }
    Ok(pem)
}

/// Loads the collector mTLS files. `https` collectors need `--tls-cert` and `--tls-key`;
/// `http` collectors (plain text, `--insecure`) take none of them.
pub fn collector_tls(
    https: bool,
    cert: Option<&Path>,
    key: Option<&Path>,
    ca: Option<&Path>,
) -> Result<Option<CollectorTls>, ConfigError> {
    let flag = |message: &str| ConfigError::Flag {
        flag: "collector",
        message: message.to_string(),
    };
    match (https, cert, key) {
        (false, None, None) if ca.is_none() => Ok(None),
        (false, ..) => Err(flag(
            "--tls-cert, --tls-key and --collector-ca need an https:// collector;              use https://host:port",
        )),
        (true, Some(cert), Some(key)) => Ok(Some(CollectorTls {
            cert_pem: read_pem(cert, "--tls-cert", "CERTIFICATE", "certificate")?,
            key_pem: read_pem(key, "--tls-key", "PRIVATE KEY", "private key")?,
            ca_pem: ca
                .map(|p| read_pem(p, "--collector-ca", "CERTIFICATE", "CA certificate"))
                .transpose()?,
        })),
        (true, ..) => Err(flag(
            "an https:// collector needs this agent's certificate: pass --tls-cert agent.pem              --tls-key agent.key (from 'mxscopectl enroll')",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_is_added_to_system_roots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).unwrap();
        std::fs::write(&path, ca.cert.pem()).unwrap();
        let system = probe_roots(None).unwrap().len();
        assert!(system > 0, "built-in roots are loaded");
        let with = probe_roots(Some(&path)).unwrap().len();
        assert_eq!(with, system + 1);
    }

    #[test]
    fn collector_tls_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("agent.pem");
        let key = dir.path().join("agent.key");
        let issued = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        std::fs::write(&cert, issued.cert.pem()).unwrap();
        std::fs::write(&key, issued.key_pair.serialize_pem()).unwrap();
        // A private key others can read is refused, naming the file and the fix.
        let e = collector_tls(true, Some(&cert), Some(&key), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.key") && e.contains("chmod 600"), "{e}");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(collector_tls(false, None, None, None).unwrap().is_none());
        let tls = collector_tls(true, Some(&cert), Some(&key), Some(&cert))
            .unwrap()
            .expect("tls");
        assert!(!format!("{tls:?}").contains("PRIVATE"));
        let _ = tls.client_config();
        let e = collector_tls(true, Some(&key), Some(&key), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.key") && e.contains("--tls-cert"), "{e}");
        let e = collector_tls(true, Some(&cert), Some(&dir.path().join("nope.key")), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.key") && e.contains("cannot read"), "{e}");
        let e = collector_tls(false, Some(&cert), Some(&key), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("https://"), "{e}");
    }

    #[test]
    fn unreadable_or_empty_ca_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = probe_roots(Some(&missing)).unwrap_err().to_string();
        assert!(
            e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = probe_roots(Some(&empty)).unwrap_err().to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no PEM certificates"),
            "{e}"
        );
    }
}
