//! DKIM key records (RFC 6376 §3.6.1, RFC 8463): tags parsed, `p=` decoded and the key size
//! measured with a tiny DER reader (no crypto crate); graded revoked/<1024 `fail`, <2048 `warn`.

use base64::Engine as _;
use thiserror::Error;

use super::{tag_list, Outcome, TagItem};

/// The `k=` tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyType {
    Rsa,
    Ed25519,
    /// A type verifiers do not know; such keys are ignored.
    Other(String),
}

/// A parsed key record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimKeyRecord {
    /// Whether `v=DKIM1` was present.
    pub has_version: bool,
    pub key_type: KeyType,
    /// Decoded `p=`; empty means the key was revoked.
    pub public_key: Vec<u8>,
    /// `h=`: acceptable hash algorithms; empty means all.
    pub hash_algorithms: Vec<String>,
    /// `s=`: service types; empty means `*`.
    pub service_types: Vec<String>,
    /// `t=` flags (`y` testing, `s` strict), lowercased.
    pub flags: Vec<String>,
    /// `n=` notes.
    pub notes: Option<String>,
}

impl DkimKeyRecord {
    /// An empty `p=` revokes the key (§3.6.1).
    pub fn revoked(&self) -> bool {
        self.public_key.is_empty()
    }

    /// `t=y`: the domain is testing DKIM; verifiers must not treat failures differently.
    pub fn testing(&self) -> bool {
        self.flags.iter().any(|f| f == "y")
    }
}

/// Why a key record does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DkimParseError {
    #[error("malformed item {item:?}")]
    Malformed { item: String },
    #[error("tag {tag} appears more than once")]
    Duplicate { tag: String },
    #[error("v= must be the first tag")]
    VersionNotFirst,
    #[error("unsupported version {value:?}")]
    BadVersion { value: String },
    #[error("no p= tag")]
    MissingKey,
    #[error("p= is not valid base64")]
    BadBase64,
}

/// Why the key size could not be measured.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KeySizeError {
    #[error("key is revoked")]
    Revoked,
    #[error("key is not a DER SubjectPublicKeyInfo or RSAPublicKey")]
    MalformedDer,
    #[error("SubjectPublicKeyInfo is not an rsaEncryption key")]
    NotRsa,
    #[error("ed25519 key is {len} bytes, not 32")]
    Ed25519Length { len: usize },
    #[error("unsupported key type {0}")]
    UnsupportedType(String),
}

/// Parses one DKIM key TXT record (`<selector>._domainkey.<domain>`).
pub fn parse(record: &str) -> Result<DkimKeyRecord, DkimParseError> {
    let mut seen: Vec<String> = Vec::new();
    let mut rec = DkimKeyRecord {
        has_version: false,
        key_type: KeyType::Rsa,
        public_key: Vec::new(),
        hash_algorithms: Vec::new(),
        service_types: Vec::new(),
        flags: Vec::new(),
        notes: None,
    };
    let mut key_text = None;
    for (index, item) in tag_list(record).into_iter().enumerate() {
        let (name, value) = match item {
            TagItem::Pair(n, v) => (n, v),
            TagItem::Malformed(raw) => {
                return Err(DkimParseError::Malformed {
                    item: raw.to_string(),
                })
            }
        };
        // tag names are case-sensitive (§3.2)
        if seen.iter().any(|s| s == name) {
            return Err(DkimParseError::Duplicate {
                tag: name.to_string(),
            });
        }
        seen.push(name.to_string());
        let list = |v: &str| -> Vec<String> {
            v.split(':')
                .map(|x| x.trim().to_ascii_lowercase())
                .filter(|x| !x.is_empty())
                .collect()
        };
        match name {
            "v" => {
                if index != 0 {
                    return Err(DkimParseError::VersionNotFirst);
                }
                if value != "DKIM1" {
                    return Err(DkimParseError::BadVersion {
                        value: value.to_string(),
                    });
                }
                rec.has_version = true;
            }
            "k" => {
                rec.key_type = match value.to_ascii_lowercase().as_str() {
                    "rsa" => KeyType::Rsa,
                    "ed25519" => KeyType::Ed25519,
                    other => KeyType::Other(other.to_string()),
                }
            }
            "p" => key_text = Some(value),
            "h" => rec.hash_algorithms = list(value),
            "s" => rec.service_types = list(value),
            "t" => rec.flags = list(value),
            "n" => rec.notes = Some(value.to_string()),
            _ => {}
        }
    }
    let key_text = key_text.ok_or(DkimParseError::MissingKey)?;
    // base64 in tag values may be broken by folding whitespace
    let compact: String = key_text
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    rec.public_key = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|_| DkimParseError::BadBase64)?;
    Ok(rec)
}

/// The key size in bits: the RSA modulus length, or 256 for Ed25519.
pub fn key_bits(record: &DkimKeyRecord) -> Result<u32, KeySizeError> {
    if record.revoked() {
        return Err(KeySizeError::Revoked);
    }
    match &record.key_type {
        KeyType::Rsa => rsa_modulus_bits(&record.public_key),
        KeyType::Ed25519 => match record.public_key.len() {
            32 => Ok(256),
            len => Err(KeySizeError::Ed25519Length { len }),
        },
        KeyType::Other(t) => Err(KeySizeError::UnsupportedType(t.clone())),
    }
}

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;
/// 1.2.840.113549.1.1.1
const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// Reads one DER TLV: (tag, content, rest). Definite lengths only, up to 4 length bytes.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    let (content, rest) = rest.split_at_checked(len)?;
    Some((tag, content, rest))
}

/// Accepts a SubjectPublicKeyInfo (what `openssl rsa -pubout` writes) or a bare RSAPublicKey.
fn rsa_modulus_bits(der: &[u8]) -> Result<u32, KeySizeError> {
    let (tag, outer, _) = tlv(der).ok_or(KeySizeError::MalformedDer)?;
    if tag != TAG_SEQUENCE {
        return Err(KeySizeError::MalformedDer);
    }
    let (first_tag, first, rest) = tlv(outer).ok_or(KeySizeError::MalformedDer)?;
    let rsa_public_key = match first_tag {
        // RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
        TAG_INTEGER => return integer_bits(first),
        // SubjectPublicKeyInfo ::= SEQUENCE { AlgorithmIdentifier, subjectPublicKey BIT STRING }
        TAG_SEQUENCE => {
            let (oid_tag, oid, _) = tlv(first).ok_or(KeySizeError::MalformedDer)?;
            if oid_tag != TAG_OID {
                return Err(KeySizeError::MalformedDer);
            }
            if oid != RSA_ENCRYPTION {
                return Err(KeySizeError::NotRsa);
            }
            let (bs_tag, bits, _) = tlv(rest).ok_or(KeySizeError::MalformedDer)?;
            match (bs_tag, bits.split_first()) {
                (TAG_BIT_STRING, Some((0, key))) => key,
                _ => return Err(KeySizeError::MalformedDer),
            }
        }
        _ => return Err(KeySizeError::MalformedDer),
    };
    let (tag, seq, _) = tlv(rsa_public_key).ok_or(KeySizeError::MalformedDer)?;
    if tag != TAG_SEQUENCE {
        return Err(KeySizeError::MalformedDer);
    }
    let (tag, modulus, _) = tlv(seq).ok_or(KeySizeError::MalformedDer)?;
    if tag != TAG_INTEGER {
        return Err(KeySizeError::MalformedDer);
    }
    integer_bits(modulus)
}

/// Bit length of a positive DER INTEGER (leading zero bytes skipped).
fn integer_bits(content: &[u8]) -> Result<u32, KeySizeError> {
    let start = content
        .iter()
        .position(|b| *b != 0)
        .ok_or(KeySizeError::MalformedDer)?;
    let significant = content.get(start..).ok_or(KeySizeError::MalformedDer)?;
    let (&top, _) = significant
        .split_first()
        .ok_or(KeySizeError::MalformedDer)?;
    let bytes = u32::try_from(significant.len()).map_err(|_| KeySizeError::MalformedDer)?;
    Ok((bytes - 1) * 8 + (8 - top.leading_zeros()))
}

/// Something worth reporting about a DKIM key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DkimFinding {
    /// No TXT record at the selector.
    NoRecord,
    /// Several TXT strings at the selector; verifiers may pick either.
    MultipleRecords {
        count: usize,
    },
    Invalid(DkimParseError),
    /// `p=` is empty.
    Revoked,
    /// The key cannot be measured or used.
    BadKey(KeySizeError),
    /// Under 1024 bits: verifiers reject it (RFC 8301).
    WeakKey {
        bits: u32,
    },
    /// 1024 up to 2047 bits: accepted but below current advice.
    ShortKey {
        bits: u32,
    },
    /// `t=y`.
    Testing,
    /// `h=` allows only sha1, which RFC 8301 forbids.
    Sha1Only,
}

impl DkimFinding {
    pub fn severity(&self) -> Outcome {
        match self {
            DkimFinding::NoRecord
            | DkimFinding::MultipleRecords { .. }
            | DkimFinding::Invalid(_)
            | DkimFinding::Revoked
            | DkimFinding::BadKey(_)
            | DkimFinding::WeakKey { .. }
            | DkimFinding::Sha1Only => Outcome::Fail,
            DkimFinding::ShortKey { .. } | DkimFinding::Testing => Outcome::Warn,
        }
    }
}

/// The graded state of one selector's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimVerdict {
    pub outcome: Outcome,
    pub record: Option<DkimKeyRecord>,
    /// Key size in bits, when measurable.
    pub bits: Option<u32>,
    pub findings: Vec<DkimFinding>,
}

/// Grades the TXT strings found at `<selector>._domainkey.<domain>`.
pub fn evaluate(txt_records: &[String]) -> DkimVerdict {
    let mut findings = Vec::new();
    let mut bits = None;
    let record = match txt_records {
        [] => {
            findings.push(DkimFinding::NoRecord);
            None
        }
        [one] => match parse(one) {
            Ok(r) => Some(r),
            Err(e) => {
                findings.push(DkimFinding::Invalid(e));
                None
            }
        },
        more => {
            findings.push(DkimFinding::MultipleRecords { count: more.len() });
            None
        }
    };
    if let Some(r) = &record {
        match key_bits(r) {
            Err(KeySizeError::Revoked) => findings.push(DkimFinding::Revoked),
            Err(e) => findings.push(DkimFinding::BadKey(e)),
            Ok(b) => {
                bits = Some(b);
                if r.key_type == KeyType::Rsa && b < 1024 {
                    findings.push(DkimFinding::WeakKey { bits: b });
                } else if r.key_type == KeyType::Rsa && b < 2048 {
                    findings.push(DkimFinding::ShortKey { bits: b });
                }
            }
        }
        if r.testing() {
            findings.push(DkimFinding::Testing);
        }
        if !r.hash_algorithms.is_empty() && r.hash_algorithms.iter().all(|h| h == "sha1") {
            findings.push(DkimFinding::Sha1Only);
        }
    }
    let outcome = findings
        .iter()
        .map(DkimFinding::severity)
        .fold(Outcome::Ok, Outcome::max);
    DkimVerdict {
        outcome,
        record,
        bits,
        findings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // generated with `openssl genrsa N | openssl rsa -pubout -outform DER | base64 -w0`
    const RSA_512_SPKI: &str = "MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAOn0Y9JHgw29dU0BdOXiS2Q773OXaCUVccOkcd4YInUo+E2BwezO02sA5TVnTWEDIqS5O1N9Dy0MtaZJMtX2/dECAwEAAQ==";
    const RSA_1024_SPKI: &str = "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDn5CPR5kY/gPEBOaKY5BOL7xQhK8qIUfhKeplr1FtT5QDlHNWXOCLYzRViYamWyE2YMLVNM9yuI3U3GdPB/pFHyUsijGfXSHze9Hm6h7xt98+PDSFIwEDbbTBNC1Cs2uqukdk+ykoFOlwLYB2EoBG646ZUcR5P5NfzFv29MdKaxwIDAQAB";
    const RSA_2048_SPKI: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAtzNCMUKGePGlGxbivEZ5Lsodf1OVPdkLFcJJR4WGOUwnLR1eAjItRMNSoe9r2rxcRG0R8lzCxEEuvYTyZoqyJJt4PSJExhlMJLE/7FFO2x4pJNkzI1StNVr0kJLFubgDBYzLtZvmOmOIwO/pI6jA9weETlN6Ap1/a/jSdX+40IH2pAyWXi07Vi6S3Bemu29xqZt3ERLmzsBVBHLVqUbdFz8Wm8koR9LPK3vyMzuu5dSYAmHkqOG+AtcrnfVgRbHAf01xCzEILiyt4/hl12Jrned9ZytDO1Nmfas8S1WWF4qsd9n7bvm3fsGfrf9HZNdGSYaA0mpF0xFcTEQrMlPOgwIDAQAB";
    // `openssl rsa -RSAPublicKey_out -outform DER`: a bare PKCS#1 RSAPublicKey
    const RSA_1024_PKCS1: &str = "MIGJAoGBALNT6Zg8c1SxGQnchXja+aZ/rUbbZeSKStGTy9m7snGuTYxWaePx6uzAbTKWqnxh1P5RRg3trf5dEHz8oWYN5ipKr8i8dvfXpEp1mDZJbqIIQsRYnc10ik5U+d/9zujrlG/PqrDlVGhUVBh7L7blsRjajMMHRn7WSWDUGkauSYOrAgMBAAE=";
    // `openssl genpkey -algorithm ed25519 | openssl pkey -pubout -outform DER | tail -c 32 | base64`
    const ED25519_RAW: &str = "SZoH7yyJg8oEq75TzgsGhK0KdiISDACGpH0A2TgyHVY=";

    fn txt(s: &str) -> Vec<String> {
        vec![s.to_string()]
    }

    #[test]
    fn parses_all_tags() {
        let r = parse(&format!(
            "v=DKIM1; k=rsa; h=sha256; s=email; t=y:s; n=rotated 2025; p={RSA_2048_SPKI}"
        ))
        .expect("valid");
        assert!(r.has_version);
        assert_eq!(r.key_type, KeyType::Rsa);
        assert_eq!(r.hash_algorithms, vec!["sha256"]);
        assert_eq!(r.service_types, vec!["email"]);
        assert_eq!(r.flags, vec!["y", "s"]);
        assert_eq!(r.notes.as_deref(), Some("rotated 2025"));
        assert_eq!(r.public_key.len(), 294);
        assert!(r.testing());
        assert!(!r.revoked());
    }

    #[test]
    fn measures_rsa_and_ed25519_key_sizes() {
        let bits = |rec: &str| {
            parse(rec)
                .map_err(|e| e.to_string())
                .and_then(|r| key_bits(&r).map_err(|e| e.to_string()))
        };
        assert_eq!(bits(&format!("p={RSA_512_SPKI}")), Ok(512));
        assert_eq!(bits(&format!("v=DKIM1; p={RSA_1024_SPKI}")), Ok(1024));
        assert_eq!(
            bits(&format!("v=DKIM1; k=rsa; p={RSA_2048_SPKI}")),
            Ok(2048)
        );
        assert_eq!(bits(&format!("v=DKIM1; p={RSA_1024_PKCS1}")), Ok(1024));
        assert_eq!(
            bits(&format!("v=DKIM1; k=ed25519; p={ED25519_RAW}")),
            Ok(256)
        );
    }

    #[test]
    fn key_base64_may_be_folded() {
        let (a, b) = RSA_2048_SPKI.split_at(100);
        let r = parse(&format!("v=DKIM1; k=rsa;\r\n\tp={a}\r\n {b}")).expect("valid");
        assert_eq!(key_bits(&r), Ok(2048));
    }

    #[test]
    fn verdicts_by_key_size() {
        let v = evaluate(&txt(&format!("v=DKIM1; k=rsa; p={RSA_2048_SPKI}")));
        assert_eq!((v.outcome, v.bits), (Outcome::Ok, Some(2048)));
        assert!(v.findings.is_empty());
        let v = evaluate(&txt(&format!("v=DKIM1; k=rsa; p={RSA_1024_SPKI}")));
        assert_eq!(
            (v.outcome, v.findings.as_slice()),
            (
                Outcome::Warn,
                [DkimFinding::ShortKey { bits: 1024 }].as_slice()
            )
        );
        let v = evaluate(&txt(&format!("v=DKIM1; k=rsa; p={RSA_512_SPKI}")));
        assert_eq!(
            (v.outcome, v.findings.as_slice()),
            (
                Outcome::Fail,
                [DkimFinding::WeakKey { bits: 512 }].as_slice()
            )
        );
        let v = evaluate(&txt(&format!("v=DKIM1; k=ed25519; p={ED25519_RAW}")));
        assert_eq!((v.outcome, v.bits), (Outcome::Ok, Some(256)));
    }

    #[test]
    fn revoked_key_fails() {
        let v = evaluate(&txt("v=DKIM1; k=rsa; p="));
        assert_eq!(v.outcome, Outcome::Fail);
        assert_eq!(v.findings, vec![DkimFinding::Revoked]);
        assert!(v.record.is_some_and(|r| r.revoked()));
    }

    #[test]
    fn testing_flag_and_sha1_only() {
        let v = evaluate(&txt(&format!("v=DKIM1; t=y; p={RSA_2048_SPKI}")));
        assert_eq!(
            (v.outcome, v.findings.as_slice()),
            (Outcome::Warn, [DkimFinding::Testing].as_slice())
        );
        let v = evaluate(&txt(&format!("v=DKIM1; h=sha1; p={RSA_2048_SPKI}")));
        assert_eq!(v.findings, vec![DkimFinding::Sha1Only]);
        assert_eq!(v.outcome, Outcome::Fail);
        let v = evaluate(&txt(&format!("v=DKIM1; h=sha1:sha256; p={RSA_2048_SPKI}")));
        assert_eq!(v.outcome, Outcome::Ok);
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(
            parse("k=rsa; v=DKIM1; p="),
            Err(DkimParseError::VersionNotFirst)
        );
        assert_eq!(
            parse("v=DKIM2; p="),
            Err(DkimParseError::BadVersion {
                value: "DKIM2".into()
            })
        );
        assert_eq!(parse("v=DKIM1; k=rsa"), Err(DkimParseError::MissingKey));
        assert_eq!(
            parse("v=DKIM1; p=abc; p=def"),
            Err(DkimParseError::Duplicate { tag: "p".into() })
        );
        assert_eq!(
            parse("v=DKIM1; p=!!!notbase64"),
            Err(DkimParseError::BadBase64)
        );
        assert_eq!(
            parse("v=DKIM1; oops; p="),
            Err(DkimParseError::Malformed {
                item: "oops".into()
            })
        );
        let v = evaluate(&txt("v=DKIM1; p=%%"));
        assert_eq!(
            (v.outcome, v.findings.as_slice()),
            (
                Outcome::Fail,
                [DkimFinding::Invalid(DkimParseError::BadBase64)].as_slice()
            )
        );
    }

    #[test]
    fn unusable_keys() {
        let r = parse("v=DKIM1; k=ed25519; p=AAAA").expect("valid syntax");
        assert_eq!(key_bits(&r), Err(KeySizeError::Ed25519Length { len: 3 }));
        let r = parse("v=DKIM1; k=dsa; p=AAAA").expect("valid syntax");
        assert_eq!(
            key_bits(&r),
            Err(KeySizeError::UnsupportedType("dsa".into()))
        );
        let r = parse("v=DKIM1; p=AAAA").expect("valid syntax");
        assert_eq!(key_bits(&r), Err(KeySizeError::MalformedDer));
        // an EC SubjectPublicKeyInfo (`openssl ecparam -name prime256v1 -genkey | openssl ec -pubout`)
        let ec = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEODi4Kxzjf8AimtalE0aiXURabJzCxsjsX+K8v2u6i8CIxVNgjs+M4+4tbkdApvNibW4bjle8zL2vChnlPcDQGg==";
        let r = parse(&format!("p={ec}")).expect("valid syntax");
        assert_eq!(key_bits(&r), Err(KeySizeError::NotRsa));
        let v = evaluate(&txt(&format!("p={ec}")));
        assert_eq!(v.findings, vec![DkimFinding::BadKey(KeySizeError::NotRsa)]);
    }

    #[test]
    fn missing_and_multiple_records_fail() {
        assert_eq!(evaluate(&[]).findings, vec![DkimFinding::NoRecord]);
        let v = evaluate(&["v=DKIM1; p=".to_string(), "v=DKIM1; p=".to_string()]);
        assert_eq!(
            (v.outcome, v.findings.as_slice()),
            (
                Outcome::Fail,
                [DkimFinding::MultipleRecords { count: 2 }].as_slice()
            )
        );
    }

    #[test]
    fn der_reader_rejects_truncation_and_bad_lengths() {
        let der = base64::engine::general_purpose::STANDARD
            .decode(RSA_2048_SPKI)
            .expect("constant");
        for cut in 0..der.len() {
            assert!(
                rsa_modulus_bits(der.get(..cut).expect("in range")).is_err(),
                "cut at {cut}"
            );
        }
        assert_eq!(tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(tlv(&[0x30, 0x80]), None);
        assert_eq!(integer_bits(&[0, 0]), Err(KeySizeError::MalformedDer));
        assert_eq!(integer_bits(&[0x00, 0x80, 0x00]), Ok(16));
        assert_eq!(integer_bits(&[0x01]), Ok(1));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = evaluate(std::slice::from_ref(&s));
            let _ = evaluate(&[format!("v=DKIM1; {s}")]);
        }

        #[test]
        fn der_reader_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = rsa_modulus_bits(&bytes);
        }
    }
}
