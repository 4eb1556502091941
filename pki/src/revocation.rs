//! The revocation list: certificates refused by serial or SHA-256 fingerprint, and agents refused
//! by id. `mxscopectl revoke` appends to it, the collector reads it; both parse entries here.
//!
//! One entry a line, `#` starts a comment:
//!
//! ```text
//! # 2025-06-01T09:00:00Z laptop stolen
//! serial:4f:1a:09:c3
//! sha256:9b0c…(64 hex digits)
//! eu-west-1
//! ```

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use mxscope_proto::names::{is_label, LABEL_RULE};

use crate::PkiError;

const SERIAL_RULE: &str =
    "a serial is 1 to 20 bytes in hex digits (case and colons do not matter), e.g. 4f:1a:09:c3";
const FINGERPRINT_RULE: &str = "a fingerprint is the SHA-256 of the certificate's DER: 64 hex \
                                digits (case and colons do not matter)";

/// The hex digits of `text` in lowercase, colons dropped; `None` if anything else is in it.
fn hex_digits(text: &str) -> Option<String> {
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    digits
        .chars()
        .all(|c| c.is_ascii_hexdigit())
        .then(|| digits.to_ascii_lowercase())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A certificate serial number, as a number: lowercase hex without leading zeros, so
/// `00:AB:01` and `ab01` are the same serial.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Serial(String);

impl Serial {
    /// The serial whose big-endian bytes (as in the certificate's DER) are `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Serial {
        Serial::canonical(&hex(bytes))
    }

    fn canonical(digits: &str) -> Serial {
        let trimmed = digits.trim_start_matches('0');
        Serial(if trimmed.is_empty() { "0" } else { trimmed }.to_string())
    }
}

impl FromStr for Serial {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Serial, PkiError> {
        let invalid = || PkiError::Invalid {
            what: "serial",
            value: s.into(),
            why: SERIAL_RULE,
        };
        let digits = hex_digits(s.trim())
            .filter(|d| !d.is_empty())
            .ok_or_else(invalid)?;
        let serial = Serial::canonical(&digits);
        // RFC 5280: at most 20 octets.
        if serial.0.len() > 40 {
            return Err(invalid());
        }
        Ok(serial)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The SHA-256 of a certificate's DER, in lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// The fingerprint of the certificate `der`.
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(sha256_hex(der))
    }
}

/// The SHA-256 of `bytes` in lowercase hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

impl FromStr for Fingerprint {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Fingerprint, PkiError> {
        match hex_digits(s.trim()) {
            Some(digits) if digits.len() == 64 => Ok(Fingerprint(digits)),
            _ => Err(PkiError::Invalid {
                what: "fingerprint",
                value: s.into(),
                why: FINGERPRINT_RULE,
            }),
        }
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which certificate a peer presented: what a revocation entry can name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertId {
    pub serial: Serial,
    pub fingerprint: Fingerprint,
}

impl CertId {
    /// The serial and fingerprint of the certificate `der`, if it is a certificate.
    pub fn of_der(der: &[u8]) -> Option<CertId> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(CertId::of_parsed(der, &cert))
    }

    pub(crate) fn of_parsed(
        der: &[u8],
        cert: &x509_parser::certificate::X509Certificate<'_>,
    ) -> CertId {
        CertId {
            serial: Serial::from_bytes(cert.raw_serial()),
            fingerprint: Fingerprint::of(der),
        }
    }
}

/// One line of the revocation list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Entry {
    /// Every certificate of this agent id (and its hellos, also without certificates).
    Agent(String),
    /// The certificate with this serial.
    Serial(Serial),
    /// The certificate with this SHA-256 fingerprint.
    Fingerprint(Fingerprint),
}

impl FromStr for Entry {
    type Err = PkiError;

    /// `serial:HEX`, `sha256:HEX` or an agent id.
    fn from_str(s: &str) -> Result<Entry, PkiError> {
        let s = s.trim();
        if let Some(serial) = strip_prefix_ignore_case(s, "serial:") {
            return serial.parse().map(Entry::Serial);
        }
        if let Some(fp) = strip_prefix_ignore_case(s, "sha256:") {
            return fp.parse().map(Entry::Fingerprint);
        }
        if is_label(s) {
            return Ok(Entry::Agent(s.into()));
        }
        Err(PkiError::Invalid {
            what: "revocation entry (an agent id, serial:HEX or sha256:HEX)",
            value: s.into(),
            why: LABEL_RULE,
        })
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

impl fmt::Display for Entry {
    /// The line as the list holds it (it parses back to the same entry).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Agent(id) => f.write_str(id),
            Entry::Serial(s) => write!(f, "serial:{s}"),
            Entry::Fingerprint(fp) => write!(f, "sha256:{fp}"),
        }
    }
}

/// A line of the list that is not an entry (its message includes the error's).
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {error}")]
pub struct BadLine {
    /// 1-based.
    pub line: usize,
    pub error: PkiError,
}

/// What the revocation list refuses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    agents: HashSet<String>,
    serials: HashSet<Serial>,
    fingerprints: HashSet<Fingerprint>,
}

impl Revocations {
    /// Reads the list; lines that are not entries are returned beside it (and left out).
    pub fn parse(text: &str) -> (Revocations, Vec<BadLine>) {
        let mut list = Revocations::default();
        let mut bad = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            match entry.parse() {
                Ok(e) => {
                    list.insert(e);
                }
                Err(error) => bad.push(BadLine { line: i + 1, error }),
            }
        }
        (list, bad)
    }

    /// Adds an entry; `false` if it was there already.
    pub fn insert(&mut self, entry: Entry) -> bool {
        match entry {
            Entry::Agent(id) => self.agents.insert(id),
            Entry::Serial(s) => self.serials.insert(s),
            Entry::Fingerprint(fp) => self.fingerprints.insert(fp),
        }
    }

    /// Both lists in one.
    pub fn union(&self, other: &Revocations) -> Revocations {
        Revocations {
            agents: self.agents.union(&other.agents).cloned().collect(),
            serials: self.serials.union(&other.serials).cloned().collect(),
            fingerprints: self
                .fingerprints
                .union(&other.fingerprints)
                .cloned()
                .collect(),
        }
    }

    /// Whether this very entry is in the list.
    pub fn contains(&self, entry: &Entry) -> bool {
        match entry {
            Entry::Agent(id) => self.agents.contains(id),
            Entry::Serial(s) => self.serials.contains(s),
            Entry::Fingerprint(fp) => self.fingerprints.contains(fp),
        }
    }

    /// Entries in the list.
    pub fn len(&self) -> usize {
        self.agents.len() + self.serials.len() + self.fingerprints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the agent id is revoked.
    pub fn revokes_agent(&self, id: &str) -> bool {
        self.agents.contains(id)
    }

    /// The entry that revokes a caller speaking as `agent` (if it is an agent) with the
    /// certificate `cert` (if it has one), or `None` if nothing does.
    pub fn revoking(&self, agent: Option<&str>, cert: Option<&CertId>) -> Option<Entry> {
        if let Some(id) = agent.filter(|id| self.revokes_agent(id)) {
            return Some(Entry::Agent(id.into()));
        }
        let cert = cert?;
        if self.serials.contains(&cert.serial) {
            return Some(Entry::Serial(cert.serial.clone()));
        }
        self.fingerprints
            .contains(&cert.fingerprint)
            .then(|| Entry::Fingerprint(cert.fingerprint.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "9b0c5a1e2d3f4a5b6c7d8e9f00112233445566778899aabbccddeeff00112233";

    fn cert(serial: &str, fp: &str) -> CertId {
        CertId {
            serial: serial.parse().unwrap(),
            fingerprint: fp.parse().unwrap(),
        }
    }

    #[test]
    fn serials_are_numbers_whatever_their_spelling() {
        for spelling in ["ab01", "AB01", "00:ab:01", "  00AB01 "] {
            assert_eq!(
                spelling.parse::<Serial>().unwrap().to_string(),
                "ab01",
                "{spelling}"
            );
        }
        assert_eq!(Serial::from_bytes(&[0x00, 0xab, 0x01]).to_string(), "ab01");
        assert_eq!(Serial::from_bytes(&[0]).to_string(), "0");
        assert_eq!("00".parse::<Serial>().unwrap().to_string(), "0");
        // 20 bytes is the most RFC 5280 allows; a leading zero byte (DER's sign byte) is fine.
        let twenty = "7f".repeat(20);
        assert!(twenty.parse::<Serial>().is_ok());
        assert!(format!("00{twenty}").parse::<Serial>().is_ok());
        for bad in [
            "",
            ":",
            "xyz",
            "ab-01",
            "ab 01",
            "0x",
            "0xab",
            &"7f".repeat(21),
        ] {
            let err = bad.parse::<Serial>().expect_err(bad).to_string();
            assert!(
                err.contains("invalid serial") && err.contains("hex digits"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn fingerprints_are_64_hex_digits() {
        let colons = FP
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(colons.parse::<Fingerprint>().unwrap().to_string(), FP);
        assert_eq!(FP.parse::<Fingerprint>().unwrap().to_string(), FP);
        for bad in ["", &FP[1..], &format!("{FP}0"), &FP.replace('9', "g")] {
            let err = bad.parse::<Fingerprint>().expect_err(bad).to_string();
            assert!(err.contains("SHA-256"), "{bad}: {err}");
        }
        // The SHA-256 test vector of "abc" (FIPS 180-2).
        assert_eq!(
            Fingerprint::of(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn entries_print_as_lines_that_parse_back() {
        for line in ["ag-1", "serial:ab01", &format!("sha256:{FP}")] {
            let entry: Entry = line.parse().unwrap();
            assert_eq!(entry.to_string(), line);
        }
        assert_eq!(
            "SERIAL:00:AB:01".parse::<Entry>().unwrap(),
            Entry::Serial("ab01".parse().unwrap())
        );
        assert_eq!(
            format!("Sha256:{}", FP.to_uppercase())
                .parse::<Entry>()
                .unwrap(),
            Entry::Fingerprint(FP.parse().unwrap())
        );
        for bad in [
            "Ag-1",
            "a b",
            "serial:",
            "serial:zz",
            "sha256:ab",
            "md5:ab",
            "-x",
        ] {
            assert!(bad.parse::<Entry>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_list_keeps_good_lines_and_names_bad_ones() {
        let text = format!(
            "# revoked\nag-1\n\n  ag-2  # stolen laptop\n#ag-3\nserial:0A:0B # admin ops\n\
             serial:nope\nsha256:{FP}\nNot An Id\n"
        );
        let (list, bad) = Revocations::parse(&text);
        assert_eq!(list.len(), 4);
        assert!(list.revokes_agent("ag-1") && list.revokes_agent("ag-2"));
        assert!(!list.revokes_agent("ag-3"));
        let lines: Vec<usize> = bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![7, 9]);
        assert!(
            bad[0]
                .to_string()
                .starts_with("line 7: invalid serial 'nope'"),
            "{}",
            bad[0]
        );

        let other = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";
        assert_eq!(
            list.revoking(None, Some(&cert("a0b", other))),
            Some(Entry::Serial("a0b".parse().unwrap()))
        );
        assert_eq!(
            list.revoking(None, Some(&cert("1", FP))),
            Some(Entry::Fingerprint(FP.parse().unwrap()))
        );
        assert_eq!(list.revoking(None, Some(&cert("1", other))), None);
        assert_eq!(
            list.revoking(Some("ag-2"), None),
            Some(Entry::Agent("ag-2".into()))
        );
        assert_eq!(list.revoking(Some("ag-9"), Some(&cert("1", other))), None);
        assert_eq!(
            Revocations::default().revoking(Some("ag-1"), Some(&cert("a0b", FP))),
            None
        );
    }
}
