//! DMARC (RFC 7489): the `_dmarc` TXT record parsed and validated tag by tag, and graded:
//! `p=none` or partial `pct` is `warn`, a missing, duplicated or invalid record is `fail`.

use thiserror::Error;

use super::{tag_list, Outcome, TagItem};

/// `p=` and `sp=` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    None,
    Quarantine,
    Reject,
}

/// `adkim=` and `aspf=` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Alignment {
    #[default]
    Relaxed,
    Strict,
}

/// One `fo=` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureOption {
    /// `0`: report when all mechanisms fail (the default)
    AllFail,
    /// `1`: report when any mechanism fails
    AnyFail,
    /// `d`: report DKIM failures
    Dkim,
    /// `s`: report SPF failures
    Spf,
}

/// A `rua`/`ruf` destination: a `mailto:` URI with an optional size limit (`!10m`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportUri {
    pub uri: String,
    /// The address after `mailto:`.
    pub address: String,
    /// Size limit in bytes, if given.
    pub max_size: Option<u64>,
}

/// A valid DMARC record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcRecord {
    pub policy: Policy,
    pub subdomain_policy: Option<Policy>,
    pub pct: u8,
    pub rua: Vec<ReportUri>,
    pub ruf: Vec<ReportUri>,
    pub adkim: Alignment,
    pub aspf: Alignment,
    pub fo: Vec<FailureOption>,
    /// Aggregate report interval in seconds.
    pub ri: u32,
    /// Tags this module does not know (ignored by receivers), as (lowercased name, value).
    pub unknown_tags: Vec<(String, String)>,
}

/// What is wrong with one tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TagProblem {
    /// A required tag is absent.
    Missing,
    /// The tag appears more than once.
    Duplicate,
    /// The value is not one the RFC allows.
    InvalidValue,
    /// The item has no `=`.
    Malformed,
}

/// A problem with one tag, with the tag and value as written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("tag {tag}: {problem:?} (value {value:?})")]
pub struct TagError {
    pub tag: String,
    pub value: String,
    pub problem: TagProblem,
}

/// Why a TXT string is not a valid DMARC record.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DmarcError {
    #[error("record does not start with v=DMARC1")]
    NotDmarc,
    #[error("invalid tags: {}", .errors.iter().map(|e| e.tag.as_str()).collect::<Vec<_>>().join(", "))]
    Invalid { errors: Vec<TagError> },
}

fn is_dmarc(items: &[TagItem<'_>]) -> bool {
    matches!(items.first(), Some(TagItem::Pair(name, "DMARC1")) if name.eq_ignore_ascii_case("v"))
}

/// Parses one `_dmarc` TXT string. Every bad tag is reported, not only the first.
pub fn parse(record: &str) -> Result<DmarcRecord, DmarcError> {
    let items = tag_list(record);
    if !is_dmarc(&items) {
        return Err(DmarcError::NotDmarc);
    }
    let mut errors = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut policy = None;
    let mut rec = DmarcRecord {
        policy: Policy::None,
        subdomain_policy: None,
        pct: 100,
        rua: Vec::new(),
        ruf: Vec::new(),
        adkim: Alignment::Relaxed,
        aspf: Alignment::Relaxed,
        fo: vec![FailureOption::AllFail],
        ri: 86400,
        unknown_tags: Vec::new(),
    };
    for item in items.iter().skip(1) {
        let (name, value) = match item {
            TagItem::Pair(n, v) => (n.to_ascii_lowercase(), *v),
            TagItem::Malformed(raw) => {
                errors.push(TagError {
                    tag: raw.to_string(),
                    value: String::new(),
                    problem: TagProblem::Malformed,
                });
                continue;
            }
        };
        let bad = |problem| TagError {
            tag: name.clone(),
            value: value.to_string(),
            problem,
        };
        if seen.contains(&name) {
            errors.push(bad(TagProblem::Duplicate));
            continue;
        }
        seen.push(name.clone());
        let ok = match name.as_str() {
            "v" => false,
            "p" => parse_policy(value).map(|p| policy = Some(p)).is_some(),
            "sp" => parse_policy(value)
                .map(|p| rec.subdomain_policy = Some(p))
                .is_some(),
            "pct" => parse_number(value)
                .and_then(|n| u8::try_from(n).ok())
                .filter(|n| *n <= 100)
                .map(|n| rec.pct = n)
                .is_some(),
            "ri" => parse_number(value)
                .and_then(|n| u32::try_from(n).ok())
                .map(|n| rec.ri = n)
                .is_some(),
            "adkim" => parse_alignment(value).map(|a| rec.adkim = a).is_some(),
            "aspf" => parse_alignment(value).map(|a| rec.aspf = a).is_some(),
            "fo" => parse_fo(value).map(|fo| rec.fo = fo).is_some(),
            "rua" => parse_uris(value).map(|u| rec.rua = u).is_some(),
            "ruf" => parse_uris(value).map(|u| rec.ruf = u).is_some(),
            // rf (report format) only knows afrf
            "rf" => value
                .split(':')
                .all(|f| f.trim().eq_ignore_ascii_case("afrf")),
            _ => {
                rec.unknown_tags.push((name.clone(), value.to_string()));
                true
            }
        };
        if !ok {
            errors.push(bad(TagProblem::InvalidValue));
        }
    }
    match policy {
        Some(p) => rec.policy = p,
        None if !seen.iter().any(|n| n == "p") => {
            errors.push(TagError {
                tag: "p".into(),
                value: String::new(),
                problem: TagProblem::Missing,
            });
        }
        None => {}
    }
    if errors.is_empty() {
        Ok(rec)
    } else {
        Err(DmarcError::Invalid { errors })
    }
}

fn parse_policy(v: &str) -> Option<Policy> {
    match v.to_ascii_lowercase().as_str() {
        "none" => Some(Policy::None),
        "quarantine" => Some(Policy::Quarantine),
        "reject" => Some(Policy::Reject),
        _ => None,
    }
}

fn parse_alignment(v: &str) -> Option<Alignment> {
    match v.to_ascii_lowercase().as_str() {
        "r" => Some(Alignment::Relaxed),
        "s" => Some(Alignment::Strict),
        _ => None,
    }
}

fn parse_number(v: &str) -> Option<u64> {
    if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

fn parse_fo(v: &str) -> Option<Vec<FailureOption>> {
    v.split(':')
        .map(|o| match o.trim().to_ascii_lowercase().as_str() {
            "0" => Some(FailureOption::AllFail),
            "1" => Some(FailureOption::AnyFail),
            "d" => Some(FailureOption::Dkim),
            "s" => Some(FailureOption::Spf),
            _ => None,
        })
        .collect()
}

/// `mailto:addr[!size[k|m|g|t]]`, comma-separated.
fn parse_uris(v: &str) -> Option<Vec<ReportUri>> {
    v.split(',').map(|u| parse_uri(u.trim())).collect()
}

fn parse_uri(u: &str) -> Option<ReportUri> {
    let (uri, size) = match u.rsplit_once('!') {
        Some((uri, size)) => (uri, Some(parse_size(size)?)),
        None => (u, None),
    };
    let scheme = uri.get(..7)?;
    if !scheme.eq_ignore_ascii_case("mailto:") {
        return None;
    }
    let address = uri.get(7..)?;
    let (local, domain) = address.split_once('@')?;
    let valid = !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && address
            .chars()
            .all(|c| c.is_ascii_graphic() && c != ',' && c != '!');
    valid.then(|| ReportUri {
        uri: uri.to_string(),
        address: address.to_string(),
        max_size: size,
    })
}

fn parse_size(s: &str) -> Option<u64> {
    let (digits, unit) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (s.get(..i)?, Some(c.to_ascii_lowercase())),
        _ => (s, None),
    };
    let n = parse_number(digits)?;
    let mult: u64 = match unit {
        None => 1,
        Some('k') => 1 << 10,
        Some('m') => 1 << 20,
        Some('g') => 1 << 30,
        Some('t') => 1 << 40,
        Some(_) => return None,
    };
    n.checked_mul(mult)
}

/// Something worth reporting about a domain's DMARC setup.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DmarcFinding {
    NoRecord,
    MultipleRecords {
        count: usize,
    },
    Invalid(DmarcError),
    /// `p=none`: receivers only monitor.
    PolicyNone,
    /// `sp=none` under an enforcing `p`.
    SubdomainPolicyNone,
    /// `pct` below 100: the policy applies to only part of the failing mail.
    PartialPct {
        pct: u8,
    },
    /// No `rua`: nobody receives aggregate reports.
    NoAggregateReports,
}

impl DmarcFinding {
    /// How much this finding alone weighs.
    pub fn severity(&self) -> Outcome {
        match self {
            DmarcFinding::NoRecord
            | DmarcFinding::MultipleRecords { .. }
            | DmarcFinding::Invalid(_) => Outcome::Fail,
            DmarcFinding::PolicyNone
            | DmarcFinding::SubdomainPolicyNone
            | DmarcFinding::PartialPct { .. } => Outcome::Warn,
            DmarcFinding::NoAggregateReports => Outcome::Ok,
        }
    }
}

/// The graded DMARC state of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcVerdict {
    pub outcome: Outcome,
    pub record: Option<DmarcRecord>,
    pub findings: Vec<DmarcFinding>,
}

/// Grades the TXT strings found at `_dmarc.<domain>` (RFC 7489 §6.6.3: exactly one record applies).
pub fn evaluate(txt_records: &[String]) -> DmarcVerdict {
    let candidates: Vec<&String> = txt_records
        .iter()
        .filter(|t| is_dmarc(&tag_list(t)))
        .collect();
    let mut findings = Vec::new();
    let record = match candidates.as_slice() {
        [] => {
            findings.push(DmarcFinding::NoRecord);
            None
        }
        [one] => match parse(one) {
            Ok(r) => Some(r),
            Err(e) => {
                findings.push(DmarcFinding::Invalid(e));
                None
            }
        },
        more => {
            findings.push(DmarcFinding::MultipleRecords { count: more.len() });
            None
        }
    };
    if let Some(r) = &record {
        if r.policy == Policy::None {
            findings.push(DmarcFinding::PolicyNone);
        } else if r.subdomain_policy == Some(Policy::None) {
            findings.push(DmarcFinding::SubdomainPolicyNone);
        }
        if r.pct < 100 && r.policy != Policy::None {
            findings.push(DmarcFinding::PartialPct { pct: r.pct });
        }
        if r.rua.is_empty() {
            findings.push(DmarcFinding::NoAggregateReports);
        }
    }
    let outcome = findings
        .iter()
        .map(DmarcFinding::severity)
        .fold(Outcome::Ok, Outcome::max);
    DmarcVerdict {
        outcome,
        record,
        findings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Vec<String> {
        vec![s.to_string()]
    }

    #[test]
    fn parses_a_full_record() {
        let r = parse(
            "v=DMARC1; p=reject; sp=quarantine; pct=50; rua=mailto:dmarc@example.com,mailto:agg@thirdparty.example!10m; \
             ruf=mailto:forensic@example.com!512; adkim=s; aspf=r; fo=1:d:s; ri=3600; rf=afrf; np=reject",
        )
        .expect("valid");
        assert_eq!(r.policy, Policy::Reject);
        assert_eq!(r.subdomain_policy, Some(Policy::Quarantine));
        assert_eq!(r.pct, 50);
        assert_eq!(r.rua.len(), 2);
        assert_eq!(r.rua[0].address, "dmarc@example.com");
        assert_eq!(r.rua[0].max_size, None);
        assert_eq!(r.rua[1].uri, "mailto:agg@thirdparty.example");
        assert_eq!(r.rua[1].max_size, Some(10 * 1024 * 1024));
        assert_eq!(r.ruf[0].max_size, Some(512));
        assert_eq!((r.adkim, r.aspf), (Alignment::Strict, Alignment::Relaxed));
        assert_eq!(
            r.fo,
            vec![
                FailureOption::AnyFail,
                FailureOption::Dkim,
                FailureOption::Spf
            ]
        );
        assert_eq!(r.ri, 3600);
        assert_eq!(
            r.unknown_tags,
            vec![("np".to_string(), "reject".to_string())]
        );
    }

    #[test]
    fn defaults_apply_when_tags_are_absent() {
        let r = parse("v=DMARC1; p=quarantine").expect("valid");
        assert_eq!(r.pct, 100);
        assert_eq!(r.ri, 86400);
        assert_eq!((r.adkim, r.aspf), (Alignment::Relaxed, Alignment::Relaxed));
        assert_eq!(r.fo, vec![FailureOption::AllFail]);
        assert!(r.rua.is_empty() && r.ruf.is_empty() && r.subdomain_policy.is_none());
    }

    #[test]
    fn version_must_come_first_and_be_exact() {
        assert_eq!(parse("p=reject; v=DMARC1"), Err(DmarcError::NotDmarc));
        assert_eq!(parse("v=DMARC2; p=reject"), Err(DmarcError::NotDmarc));
        assert_eq!(parse("v=dmarc1; p=reject"), Err(DmarcError::NotDmarc));
        assert_eq!(parse(""), Err(DmarcError::NotDmarc));
        assert!(parse("v = DMARC1 ; p = reject ;").is_ok());
    }

    #[test]
    fn every_invalid_tag_is_reported() {
        let Err(DmarcError::Invalid { errors }) = parse(
            "v=DMARC1; p=block; sp=maybe; pct=101; rua=https://example.com/r,mailto:x@example.com; ruf=mailto:nobody; \
             adkim=x; aspf=; fo=2; ri=-1; rua=mailto:y@example.com; junk",
        ) else {
            panic!("expected invalid tags");
        };
        let got: Vec<(&str, TagProblem)> =
            errors.iter().map(|e| (e.tag.as_str(), e.problem)).collect();
        assert_eq!(
            got,
            vec![
                ("p", TagProblem::InvalidValue),
                ("sp", TagProblem::InvalidValue),
                ("pct", TagProblem::InvalidValue),
                ("rua", TagProblem::InvalidValue),
                ("ruf", TagProblem::InvalidValue),
                ("adkim", TagProblem::InvalidValue),
                ("aspf", TagProblem::InvalidValue),
                ("fo", TagProblem::InvalidValue),
                ("ri", TagProblem::InvalidValue),
                ("rua", TagProblem::Duplicate),
                ("junk", TagProblem::Malformed),
            ]
        );
        assert_eq!(errors[2].value, "101");
    }

    #[test]
    fn missing_policy_is_an_error() {
        let e = parse("v=DMARC1; rua=mailto:d@example.com").expect_err("p is required");
        assert_eq!(
            e,
            DmarcError::Invalid {
                errors: vec![TagError {
                    tag: "p".into(),
                    value: String::new(),
                    problem: TagProblem::Missing
                }]
            }
        );
    }

    #[test]
    fn size_units_and_bad_sizes() {
        assert_eq!(parse_size("1k"), Some(1024));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("1t"), Some(1 << 40));
        assert_eq!(parse_size("10x"), None);
        assert_eq!(parse_size("k"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999"), None);
    }

    #[test]
    fn reject_with_reports_is_ok() {
        let v = evaluate(&one("v=DMARC1; p=reject; rua=mailto:dmarc@example.com"));
        assert_eq!(v.outcome, Outcome::Ok);
        assert!(v.findings.is_empty());
        assert_eq!(v.record.map(|r| r.policy), Some(Policy::Reject));
    }

    #[test]
    fn p_none_warns() {
        let v = evaluate(&one("v=DMARC1; p=none; rua=mailto:dmarc@example.com"));
        assert_eq!(v.outcome, Outcome::Warn);
        assert_eq!(v.findings, vec![DmarcFinding::PolicyNone]);
    }

    #[test]
    fn partial_pct_and_lax_subdomains_warn() {
        let v = evaluate(&one(
            "v=DMARC1; p=reject; sp=none; pct=20; rua=mailto:d@example.com",
        ));
        assert_eq!(v.outcome, Outcome::Warn);
        assert_eq!(
            v.findings,
            vec![
                DmarcFinding::SubdomainPolicyNone,
                DmarcFinding::PartialPct { pct: 20 }
            ]
        );
    }

    #[test]
    fn missing_rua_is_noted_but_ok() {
        let v = evaluate(&one("v=DMARC1; p=quarantine"));
        assert_eq!(v.outcome, Outcome::Ok);
        assert_eq!(v.findings, vec![DmarcFinding::NoAggregateReports]);
    }

    #[test]
    fn missing_multiple_and_invalid_records_fail() {
        let v = evaluate(&one("v=spf1 -all"));
        assert_eq!(
            (v.outcome, v.findings.as_slice()),
            (Outcome::Fail, [DmarcFinding::NoRecord].as_slice())
        );
        let v = evaluate(&[]);
        assert_eq!(v.outcome, Outcome::Fail);
        let v = evaluate(&[
            "v=DMARC1; p=reject".to_string(),
            "v=DMARC1; p=none".to_string(),
        ]);
        assert_eq!(v.findings, vec![DmarcFinding::MultipleRecords { count: 2 }]);
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.record.is_none());
        let v = evaluate(&one("v=DMARC1; p=rejected"));
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(matches!(
            v.findings.as_slice(),
            [DmarcFinding::Invalid(DmarcError::Invalid { .. })]
        ));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = parse(&s);
            let _ = parse(&format!("v=DMARC1; {s}"));
            let _ = evaluate(&[s]);
        }

        #[test]
        fn parse_never_panics_on_tag_soup(tags in proptest::collection::vec("(p|sp|pct|rua|ruf|adkim|aspf|fo|ri|rf|x)=[a-z0-9:@.!,]{0,16}", 0..10)) {
            let _ = parse(&format!("v=DMARC1; {}", tags.join("; ")));
        }
    }
}
