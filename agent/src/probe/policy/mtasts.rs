//! MTA-STS (RFC 8461): the `_mta-sts` TXT record, the policy file served at
//! `https://mta-sts.<domain>/.well-known/mta-sts.txt`, and its `mx` patterns matched to the MX set.

use thiserror::Error;

use super::{tag_list, TagItem};

/// The largest `max_age` allowed (one year, §3.2).
pub const MAX_AGE_LIMIT: u32 = 31_557_600;

/// A parsed `_mta-sts` TXT record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsRecord {
    /// 1-32 alphanumerics; changes when the policy changes.
    pub id: String,
    /// Extension fields, as (name, value).
    pub extensions: Vec<(String, String)>,
}

/// Why a TXT string is not a valid MTA-STS record.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum StsRecordError {
    #[error("record does not start with v=STSv1")]
    NotSts,
    #[error("no id field")]
    MissingId,
    #[error("invalid id {id:?}: 1 to 32 letters and digits")]
    InvalidId { id: String },
    #[error("malformed field {field:?}")]
    Malformed { field: String },
    #[error("no v=STSv1 record")]
    NoRecord,
    #[error("{count} v=STSv1 records")]
    MultipleRecords { count: usize },
}

fn is_sts(items: &[TagItem<'_>]) -> bool {
    matches!(items.first(), Some(TagItem::Pair("v", "STSv1")))
}

/// Parses one `_mta-sts` TXT string (§3.1).
pub fn parse_record(record: &str) -> Result<StsRecord, StsRecordError> {
    let items = tag_list(record);
    if !is_sts(&items) {
        return Err(StsRecordError::NotSts);
    }
    let mut id = None;
    let mut extensions = Vec::new();
    for item in items.iter().skip(1) {
        match item {
            TagItem::Pair("id", value) => {
                let valid = (1..=32).contains(&value.len())
                    && value.bytes().all(|b| b.is_ascii_alphanumeric());
                if !valid {
                    return Err(StsRecordError::InvalidId {
                        id: value.to_string(),
                    });
                }
                id.get_or_insert_with(|| value.to_string());
            }
            TagItem::Pair(name, value) if is_ext_name(name) && is_ext_value(value) => {
                extensions.push((name.to_string(), value.to_string()));
            }
            TagItem::Pair(name, value) => {
                return Err(StsRecordError::Malformed {
                    field: format!("{name}={value}"),
                });
            }
            TagItem::Malformed(raw) => {
                return Err(StsRecordError::Malformed {
                    field: raw.to_string(),
                })
            }
        }
    }
    let id = id.ok_or(StsRecordError::MissingId)?;
    Ok(StsRecord { id, extensions })
}

/// Picks and parses the one `v=STSv1` record among a name's TXT strings (§3.1: several = none).
pub fn select_record(txt_records: &[String]) -> Result<StsRecord, StsRecordError> {
    let candidates: Vec<&String> = txt_records
        .iter()
        .filter(|t| is_sts(&tag_list(t)))
        .collect();
    match candidates.as_slice() {
        [] => Err(StsRecordError::NoRecord),
        [one] => parse_record(one),
        more => Err(StsRecordError::MultipleRecords { count: more.len() }),
    }
}

fn is_ext_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.len() <= 32
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn is_ext_value(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b';' && b != b'=')
}

/// The policy `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

/// A parsed policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsPolicy {
    pub mode: Mode,
    /// Allowed MX patterns, as written (possibly `*.example.com`).
    pub mx: Vec<String>,
    /// Seconds a sender may cache the policy.
    pub max_age: u32,
    /// Unknown fields, as (name, value).
    pub extensions: Vec<(String, String)>,
}

/// Why a policy file does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum StsPolicyError {
    #[error("line {line}: not a key: value pair")]
    MalformedLine { line: usize },
    #[error("missing field {field}")]
    Missing { field: &'static str },
    #[error("unsupported version {value:?}")]
    BadVersion { value: String },
    #[error("invalid mode {value:?}")]
    BadMode { value: String },
    #[error("invalid max_age {value:?}")]
    BadMaxAge { value: String },
    #[error("invalid mx pattern {value:?}")]
    BadMx { value: String },
}

/// Parses the policy file body (§3.2); lines end in CRLF or LF; the first of repeated fields
/// wins except `mx`, which accumulates.
pub fn parse_policy(body: &str) -> Result<StsPolicy, StsPolicyError> {
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    let mut extensions = Vec::new();
    for (index, raw) in body.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once(':')
            .ok_or(StsPolicyError::MalformedLine { line: index + 1 })?;
        let value = value.trim_matches([' ', '\t']);
        match key {
            "version" => {
                version.get_or_insert(value);
            }
            "mode" => {
                mode.get_or_insert(value);
            }
            "max_age" => {
                max_age.get_or_insert(value);
            }
            "mx" => {
                if !is_mx_pattern(value) {
                    return Err(StsPolicyError::BadMx {
                        value: value.to_string(),
                    });
                }
                mx.push(value.to_string());
            }
            _ if is_ext_name(key) => extensions.push((key.to_string(), value.to_string())),
            _ => return Err(StsPolicyError::MalformedLine { line: index + 1 }),
        }
    }
    match version {
        None => return Err(StsPolicyError::Missing { field: "version" }),
        Some("STSv1") => {}
        Some(v) => {
            return Err(StsPolicyError::BadVersion {
                value: v.to_string(),
            })
        }
    }
    let mode = match mode.ok_or(StsPolicyError::Missing { field: "mode" })? {
        "enforce" => Mode::Enforce,
        "testing" => Mode::Testing,
        "none" => Mode::None,
        other => {
            return Err(StsPolicyError::BadMode {
                value: other.to_string(),
            })
        }
    };
    let max_age_text = max_age.ok_or(StsPolicyError::Missing { field: "max_age" })?;
    let max_age = Some(max_age_text)
        .filter(|v| (1..=10).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n <= u64::from(MAX_AGE_LIMIT))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| StsPolicyError::BadMaxAge {
            value: max_age_text.to_string(),
        })?;
    if mx.is_empty() && mode != Mode::None {
        return Err(StsPolicyError::Missing { field: "mx" });
    }
    Ok(StsPolicy {
        mode,
        mx,
        max_age,
        extensions,
    })
}

/// A host name, optionally with a leading `*.` wildcard label.
fn is_mx_pattern(p: &str) -> bool {
    let name = p.strip_prefix("*.").unwrap_or(p);
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn norm(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `host` matches `pattern`: exactly, or `*.example.com` for exactly one extra label
/// (§4.1: `*.example.com` matches `mail.example.com`, not `example.com` or `a.b.example.com`).
pub fn mx_matches(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (norm(pattern), norm(host));
    if host.is_empty() {
        return false;
    }
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

/// The MX hosts no pattern of the policy matches: mail to them fails under `enforce`.
pub fn check_mx_set(policy: &StsPolicy, mx_hosts: &[String]) -> Vec<String> {
    mx_hosts
        .iter()
        .filter(|host| !policy.mx.iter().any(|p| mx_matches(p, host)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_records() {
        let r = parse_record("v=STSv1; id=20250301T120000;").expect("valid");
        assert_eq!(r.id, "20250301T120000");
        assert!(r.extensions.is_empty());
        let r = parse_record("v=STSv1;id=abc123; ext-1=hello").expect("valid");
        assert_eq!(
            r.extensions,
            vec![("ext-1".to_string(), "hello".to_string())]
        );
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(parse_record("id=1; v=STSv1"), Err(StsRecordError::NotSts));
        assert_eq!(parse_record("v=STSv2; id=1"), Err(StsRecordError::NotSts));
        assert_eq!(parse_record("v=STSv1"), Err(StsRecordError::MissingId));
        assert_eq!(
            parse_record("v=STSv1; id="),
            Err(StsRecordError::InvalidId { id: String::new() })
        );
        assert_eq!(
            parse_record("v=STSv1; id=2025-03-01"),
            Err(StsRecordError::InvalidId {
                id: "2025-03-01".into()
            })
        );
        let long = "a".repeat(33);
        assert_eq!(
            parse_record(&format!("v=STSv1; id={long}")),
            Err(StsRecordError::InvalidId { id: long })
        );
        assert!(matches!(
            parse_record("v=STSv1; id=1; junk"),
            Err(StsRecordError::Malformed { .. })
        ));
    }

    #[test]
    fn selects_exactly_one_record() {
        let txt = hosts(&["v=spf1 -all", "v=STSv1; id=1"]);
        assert_eq!(select_record(&txt).map(|r| r.id), Ok("1".to_string()));
        assert_eq!(
            select_record(&hosts(&["v=spf1 -all"])),
            Err(StsRecordError::NoRecord)
        );
        assert_eq!(
            select_record(&hosts(&["v=STSv1; id=1", "v=STSv1; id=2"])),
            Err(StsRecordError::MultipleRecords { count: 2 })
        );
    }

    const POLICY_CRLF: &str =
        "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.backup.example.net\r\nmax_age: 604800\r\n";

    #[test]
    fn parses_policy_with_crlf_and_lf() {
        let p = parse_policy(POLICY_CRLF).expect("valid");
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx, hosts(&["mail.example.com", "*.backup.example.net"]));
        assert_eq!(p.max_age, 604800);
        let lf = POLICY_CRLF.replace("\r\n", "\n");
        assert_eq!(parse_policy(&lf), Ok(p));
        let p = parse_policy(
            "version: STSv1\nmode: testing\nmx:mx.example.com\nmax_age:86400\nfoo: bar",
        )
        .expect("valid");
        assert_eq!((p.mode, p.max_age), (Mode::Testing, 86400));
        assert_eq!(p.extensions, vec![("foo".to_string(), "bar".to_string())]);
        let p = parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").expect("none needs no mx");
        assert_eq!((p.mode, p.max_age, p.mx.len()), (Mode::None, 0, 0));
    }

    #[test]
    fn rejects_bad_policies() {
        let cases: &[(&str, StsPolicyError)] = &[
            (
                "mode: enforce\nmx: a.example\nmax_age: 1",
                StsPolicyError::Missing { field: "version" },
            ),
            (
                "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1",
                StsPolicyError::BadVersion {
                    value: "STSv2".into(),
                },
            ),
            (
                "version: STSv1\nmx: a.example\nmax_age: 1",
                StsPolicyError::Missing { field: "mode" },
            ),
            (
                "version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 1",
                StsPolicyError::BadMode {
                    value: "Enforce".into(),
                },
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.example",
                StsPolicyError::Missing { field: "max_age" },
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601",
                StsPolicyError::BadMaxAge {
                    value: "31557601".into(),
                },
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -5",
                StsPolicyError::BadMaxAge { value: "-5".into() },
            ),
            (
                "version: STSv1\nmode: enforce\nmax_age: 10",
                StsPolicyError::Missing { field: "mx" },
            ),
            (
                "version: STSv1\nmode: enforce\nmx: bad host\nmax_age: 10",
                StsPolicyError::BadMx {
                    value: "bad host".into(),
                },
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 10",
                StsPolicyError::BadMx {
                    value: "a.*.example".into(),
                },
            ),
            (
                "version: STSv1\nthis line has no colon\n",
                StsPolicyError::MalformedLine { line: 2 },
            ),
            (
                "<html>not found</html>",
                StsPolicyError::MalformedLine { line: 1 },
            ),
        ];
        assert!(!cases.is_empty());
        for (body, expected) in cases {
            assert_eq!(parse_policy(body).as_ref(), Err(expected), "{body:?}");
        }
        assert_eq!(
            parse_policy("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557600")
                .map(|p| p.max_age),
            Ok(MAX_AGE_LIMIT)
        );
    }

    #[test]
    fn wildcard_matches_exactly_one_label() {
        assert!(mx_matches("*.example.com", "mail.example.com"));
        assert!(mx_matches("*.example.com", "MAIL.Example.COM."));
        assert!(!mx_matches("*.example.com", "example.com"));
        assert!(!mx_matches("*.example.com", "a.b.example.com"));
        assert!(!mx_matches("*.example.com", "mailexample.com"));
        assert!(!mx_matches("*.example.com", ".example.com"));
        assert!(mx_matches("mail.example.com", "mail.example.com."));
        assert!(!mx_matches("mail.example.com", "mail2.example.com"));
        assert!(!mx_matches("mail.example.com", ""));
    }

    #[test]
    fn reports_mx_hosts_the_policy_does_not_list() {
        let p = parse_policy(POLICY_CRLF).expect("valid");
        let mx = hosts(&[
            "mail.example.com",
            "mx1.backup.example.net",
            "mx2.example.org",
            "deep.mx.backup.example.net",
        ]);
        assert_eq!(
            check_mx_set(&p, &mx),
            hosts(&["mx2.example.org", "deep.mx.backup.example.net"])
        );
        assert!(check_mx_set(&p, &hosts(&["mail.example.com"])).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC*") {
            let _ = parse_record(&s);
            let _ = parse_policy(&s);
            let _ = mx_matches(&s, &s);
            let _ = mx_matches("*.example.com", &s);
        }

        #[test]
        fn policy_lines_never_panic(lines in proptest::collection::vec("(version|mode|mx|max_age|x): ?[a-zA-Z0-9.*-]{0,12}\r?", 0..8)) {
            let _ = parse_policy(&lines.join("\n"));
        }
    }
}
