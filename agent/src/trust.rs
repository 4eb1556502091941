//! The certificates probe TLS trusts: the built-in web PKI roots plus an operator's `--ca-file`.
//! A CA file that cannot be read or holds no certificate is a configuration error naming the file.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use rustls::RootCertStore;

use crate::config::ConfigError;

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
