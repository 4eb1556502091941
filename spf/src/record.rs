//! SPF record syntax (RFC 7208 §4.5, §4.6, §7.1): choosing the one `v=spf1` record among a
//! domain's TXT records and parsing it into directives and modifiers, macros left unexpanded.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use thiserror::Error;

/// The prefix in front of a mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qualifier {
    /// `+` (the default)
    Pass,
    /// `-`
    Fail,
    /// `~`
    SoftFail,
    /// `?`
    Neutral,
}

impl Qualifier {
    fn from_char(c: char) -> Option<Qualifier> {
        match c {
            '+' => Some(Qualifier::Pass),
            '-' => Some(Qualifier::Fail),
            '~' => Some(Qualifier::SoftFail),
            '?' => Some(Qualifier::Neutral),
            _ => None,
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Qualifier::Pass => "",
            Qualifier::Fail => "-",
            Qualifier::SoftFail => "~",
            Qualifier::Neutral => "?",
        }
    }
}

/// CIDR lengths of `a` and `mx`; `None` means the whole address (32 or 128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DualCidr {
    pub v4: Option<u8>,
    pub v6: Option<u8>,
}

/// One SPF mechanism. Domains are kept as written (macros unexpanded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    All,
    Include {
        domain: String,
    },
    A {
        domain: Option<String>,
        cidr: DualCidr,
    },
    Mx {
        domain: Option<String>,
        cidr: DualCidr,
    },
    Ptr {
        domain: Option<String>,
    },
    Ip4 {
        addr: Ipv4Addr,
        prefix: u8,
    },
    Ip6 {
        addr: Ipv6Addr,
        prefix: u8,
    },
    Exists {
        domain: String,
    },
}

impl Mechanism {
    /// True for the mechanisms that count toward the 10-lookup limit.
    pub fn is_lookup(&self) -> bool {
        matches!(
            self,
            Mechanism::Include { .. }
                | Mechanism::A { .. }
                | Mechanism::Mx { .. }
                | Mechanism::Ptr { .. }
                | Mechanism::Exists { .. }
        )
    }
}

/// A qualifier and a mechanism, e.g. `-ip4:192.0.2.0/24`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    pub qualifier: Qualifier,
    pub mechanism: Mechanism,
}

impl fmt::Display for Directive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.qualifier.prefix())?;
        let cidr = |f: &mut fmt::Formatter<'_>, c: &DualCidr| -> fmt::Result {
            if let Some(v4) = c.v4 {
                write!(f, "/{v4}")?;
            }
            if let Some(v6) = c.v6 {
                write!(f, "//{v6}")?;
            }
            Ok(())
        };
        match &self.mechanism {
            Mechanism::All => f.write_str("all"),
            Mechanism::Include { domain } => write!(f, "include:{domain}"),
            Mechanism::A { domain, cidr: c } | Mechanism::Mx { domain, cidr: c } => {
                let name = if matches!(self.mechanism, Mechanism::A { .. }) {
                    "a"
                } else {
                    "mx"
                };
                f.write_str(name)?;
                if let Some(d) = domain {
                    write!(f, ":{d}")?;
                }
                cidr(f, c)
            }
            Mechanism::Ptr { domain: None } => f.write_str("ptr"),
            Mechanism::Ptr { domain: Some(d) } => write!(f, "ptr:{d}"),
            Mechanism::Ip4 { addr, prefix } => write!(f, "ip4:{addr}/{prefix}"),
            Mechanism::Ip6 { addr, prefix } => write!(f, "ip6:{addr}/{prefix}"),
            Mechanism::Exists { domain } => write!(f, "exists:{domain}"),
        }
    }
}

/// A parsed `v=spf1` record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpfRecord {
    pub directives: Vec<Directive>,
    /// `redirect=` target, if any.
    pub redirect: Option<String>,
    /// `exp=` target, if any.
    pub exp: Option<String>,
    /// Modifiers this module does not know, kept as (name lowercased, value).
    pub unknown_modifiers: Vec<(String, String)>,
}

impl SpfRecord {
    /// True when the record ends in `+all` (or plain `all`): anyone may send as the domain.
    pub fn plus_all(&self) -> bool {
        self.directives
            .iter()
            .any(|d| d.mechanism == Mechanism::All && d.qualifier == Qualifier::Pass)
    }

    /// The qualifier of the `all` mechanism, if the record has one.
    pub fn all_qualifier(&self) -> Option<Qualifier> {
        self.directives
            .iter()
            .find(|d| d.mechanism == Mechanism::All)
            .map(|d| d.qualifier)
    }

    /// Lookup-counting terms in this record alone (not following includes).
    pub fn local_lookups(&self) -> usize {
        self.directives
            .iter()
            .filter(|d| d.mechanism.is_lookup())
            .count()
            + usize::from(self.redirect.is_some())
    }

    /// `redirect` applies only when the record has no `all` mechanism (§6.1).
    pub(super) fn effective_redirect(&self) -> Option<&str> {
        if self.all_qualifier().is_some() {
            None
        } else {
            self.redirect.as_deref()
        }
    }
}

/// Why an SPF record does not parse; `term` is the offending term as written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SpfParseError {
    #[error("record does not start with v=spf1")]
    NotSpf,
    #[error("unknown mechanism in term {term:?}")]
    UnknownMechanism { term: String },
    #[error("mechanism needs a domain in term {term:?}")]
    MissingDomain { term: String },
    #[error("mechanism takes no argument in term {term:?}")]
    UnexpectedArgument { term: String },
    #[error("invalid domain spec in term {term:?}")]
    InvalidDomain { term: String },
    #[error("invalid address in term {term:?}")]
    InvalidAddress { term: String },
    #[error("invalid cidr length in term {term:?}")]
    InvalidCidr { term: String },
    #[error("invalid term {term:?}")]
    InvalidTerm { term: String },
    #[error("modifier {name} appears more than once")]
    DuplicateModifier { name: String },
}

/// Why no single SPF record could be chosen among a domain's TXT records (§4.5).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SpfSelectError {
    #[error("no v=spf1 record")]
    None,
    #[error("multiple v=spf1 records")]
    Multiple { count: usize },
}

fn is_spf_record(txt: &str) -> bool {
    let Some(head) = txt.get(..6) else {
        return false;
    };
    head.eq_ignore_ascii_case("v=spf1") && matches!(txt.as_bytes().get(6), None | Some(b' '))
}

/// Picks the one TXT record that starts with `v=spf1` followed by a space or the end.
pub fn select_spf(txt_records: &[String]) -> Result<String, SpfSelectError> {
    let mut found = txt_records.iter().filter(|t| is_spf_record(t));
    match (found.next(), found.count()) {
        (None, _) => Err(SpfSelectError::None),
        (Some(one), 0) => Ok(one.clone()),
        (Some(_), more) => Err(SpfSelectError::Multiple { count: more + 1 }),
    }
}

/// Parses one SPF record.
pub fn parse(record: &str) -> Result<SpfRecord, SpfParseError> {
    if !is_spf_record(record) {
        return Err(SpfParseError::NotSpf);
    }
    let mut out = SpfRecord::default();
    for term in record
        .get(6..)
        .unwrap_or("")
        .split(' ')
        .filter(|t| !t.is_empty())
    {
        parse_term(term, &mut out)?;
    }
    Ok(out)
}

fn parse_term(term: &str, out: &mut SpfRecord) -> Result<(), SpfParseError> {
    let err_term = || term.to_string();
    let mut chars = term.chars();
    let (qualifier, rest) = match chars.next().and_then(Qualifier::from_char) {
        Some(q) => (Some(q), chars.as_str()),
        None => (None, term),
    };
    let name_len = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .unwrap_or(rest.len());
    let (name, arg) = rest.split_at(name_len);
    if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(SpfParseError::InvalidTerm { term: err_term() });
    }
    let lname = name.to_ascii_lowercase();
    if let Some(value) = arg.strip_prefix('=') {
        if qualifier.is_some() {
            return Err(SpfParseError::InvalidTerm { term: err_term() });
        }
        return parse_modifier(term, lname, value, out);
    }
    if !(arg.is_empty() || arg.starts_with(':') || arg.starts_with('/')) {
        return Err(SpfParseError::InvalidTerm { term: err_term() });
    }
    let mechanism = parse_mechanism(term, &lname, arg)?;
    out.directives.push(Directive {
        qualifier: qualifier.unwrap_or(Qualifier::Pass),
        mechanism,
    });
    Ok(())
}

fn parse_modifier(
    term: &str,
    name: String,
    value: &str,
    out: &mut SpfRecord,
) -> Result<(), SpfParseError> {
    let slot = match name.as_str() {
        "redirect" => &mut out.redirect,
        "exp" => &mut out.exp,
        _ => {
            if !is_macro_string(value, true) {
                return Err(SpfParseError::InvalidTerm {
                    term: term.to_string(),
                });
            }
            out.unknown_modifiers.push((name, value.to_string()));
            return Ok(());
        }
    };
    if slot.is_some() {
        return Err(SpfParseError::DuplicateModifier { name });
    }
    if !is_domain_spec(value) {
        return Err(SpfParseError::InvalidDomain {
            term: term.to_string(),
        });
    }
    *slot = Some(value.to_string());
    Ok(())
}

fn parse_mechanism(term: &str, name: &str, arg: &str) -> Result<Mechanism, SpfParseError> {
    let t = || term.to_string();
    match name {
        "all" => {
            if arg.is_empty() {
                Ok(Mechanism::All)
            } else {
                Err(SpfParseError::UnexpectedArgument { term: t() })
            }
        }
        "include" | "exists" => {
            let domain = arg
                .strip_prefix(':')
                .filter(|d| !d.is_empty())
                .ok_or_else(|| SpfParseError::MissingDomain { term: t() })?;
            if !is_domain_spec(domain) {
                return Err(SpfParseError::InvalidDomain { term: t() });
            }
            let domain = domain.to_string();
            Ok(if name == "include" {
                Mechanism::Include { domain }
            } else {
                Mechanism::Exists { domain }
            })
        }
        "ptr" => match arg.strip_prefix(':') {
            None if arg.is_empty() => Ok(Mechanism::Ptr { domain: None }),
            Some(d) if is_domain_spec(d) => Ok(Mechanism::Ptr {
                domain: Some(d.to_string()),
            }),
            Some(_) => Err(SpfParseError::InvalidDomain { term: t() }),
            None => Err(SpfParseError::UnexpectedArgument { term: t() }),
        },
        "a" | "mx" => {
            let (rest, cidr) =
                split_dual_cidr(arg).ok_or_else(|| SpfParseError::InvalidCidr { term: t() })?;
            let domain = match rest.strip_prefix(':') {
                None if rest.is_empty() => None,
                Some(d) if is_domain_spec(d) => Some(d.to_string()),
                Some(_) => return Err(SpfParseError::InvalidDomain { term: t() }),
                None => return Err(SpfParseError::InvalidTerm { term: t() }),
            };
            Ok(if name == "a" {
                Mechanism::A { domain, cidr }
            } else {
                Mechanism::Mx { domain, cidr }
            })
        }
        "ip4" => {
            let (addr, prefix) = parse_ip_arg::<Ipv4Addr>(arg, 32, &t)?;
            Ok(Mechanism::Ip4 { addr, prefix })
        }
        "ip6" => {
            let (addr, prefix) = parse_ip_arg::<Ipv6Addr>(arg, 128, &t)?;
            Ok(Mechanism::Ip6 { addr, prefix })
        }
        _ => Err(SpfParseError::UnknownMechanism { term: t() }),
    }
}

/// The `:ADDR[/LEN]` argument of `ip4`/`ip6`: the address and its prefix length (`max` if absent).
fn parse_ip_arg<A: std::str::FromStr>(
    arg: &str,
    max: u8,
    t: &dyn Fn() -> String,
) -> Result<(A, u8), SpfParseError> {
    let body = arg
        .strip_prefix(':')
        .ok_or_else(|| SpfParseError::MissingDomain { term: t() })?;
    let (addr, prefix) = match body.split_once('/') {
        Some((a, p)) => (
            a,
            parse_cidr(p, max).ok_or_else(|| SpfParseError::InvalidCidr { term: t() })?,
        ),
        None => (body, max),
    };
    let addr = addr
        .parse()
        .map_err(|_| SpfParseError::InvalidAddress { term: t() })?;
    Ok((addr, prefix))
}

/// A cidr length: no leading zeros, at most `max`.
fn parse_cidr(digits: &str, max: u8) -> Option<u8> {
    if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    digits.parse::<u8>().ok().filter(|n| *n <= max)
}

/// Splits `[:domain][/v4][//v6]` into the domain part and the lengths; `None` if a length is bad.
fn split_dual_cidr(arg: &str) -> Option<(&str, DualCidr)> {
    let mut rest = arg;
    let mut cidr = DualCidr::default();
    if let Some(pos) = rest.rfind("//") {
        let digits = rest.get(pos + 2..)?;
        if digits.bytes().all(|b| b.is_ascii_digit()) {
            cidr.v6 = Some(parse_cidr(digits, 128)?);
            rest = rest.get(..pos)?;
        }
    }
    if let Some(pos) = rest.rfind('/') {
        let digits = rest.get(pos + 1..)?;
        if digits.bytes().all(|b| b.is_ascii_digit()) {
            cidr.v4 = Some(parse_cidr(digits, 32)?);
            rest = rest.get(..pos)?;
        }
    }
    Some((rest, cidr))
}

/// `macro-string` of §7.1: visible characters, `%` only as `%%`, `%_`, `%-` or `%{...}`; the
/// letters `c`, `r` and `t` only when `exp_letters` (explanation text, unknown modifiers, §7.2).
pub(super) fn is_macro_string(s: &str, exp_letters: bool) -> bool {
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        // explanation text (`explain-string`) may hold spaces between its macro strings
        if !(c.is_ascii_graphic() || (exp_letters && c == ' ')) {
            return false;
        }
        if c != '%' {
            continue;
        }
        match chars.next() {
            Some('%' | '_' | '-') => {}
            Some('{') => {
                let Some(letter) = chars.next() else {
                    return false;
                };
                let allowed = if exp_letters {
                    "slodiphcrtvSLODIPHCRTV"
                } else {
                    "slodiphvSLODIPHV"
                };
                if !allowed.contains(letter) {
                    return false;
                }
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    if !(c.is_ascii_digit() || c == 'r' || c == 'R' || ".-+,/_=".contains(c)) {
                        return false;
                    }
                }
                if !closed {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

/// `domain-spec`: a macro string that, without macros, looks like a host name with a top label.
fn is_domain_spec(s: &str) -> bool {
    if s.is_empty() || !is_macro_string(s, false) {
        return false;
    }
    if s.contains('%') {
        return true;
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 || labels.iter().any(|l| l.is_empty() || l.len() > 63) {
        return false;
    }
    // toplabel: alphanumerics with at least one letter, or with an inner hyphen
    labels.last().is_some_and(|top| {
        top.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !top.starts_with('-')
            && !top.ends_with('-')
            && (top.bytes().any(|b| b.is_ascii_alphabetic()) || top.contains('-'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::strings;

    #[test]
    fn select_picks_the_single_spf_record() {
        let txt = strings(&[
            "google-site-verification=abc",
            "v=spf1 mx -all",
            "v=spf10 nope",
        ]);
        assert_eq!(select_spf(&txt), Ok("v=spf1 mx -all".to_string()));
        assert_eq!(select_spf(&strings(&["v=spf1"])), Ok("v=spf1".to_string()));
        assert_eq!(
            select_spf(&strings(&["V=SPF1 -all"])),
            Ok("V=SPF1 -all".to_string())
        );
    }

    #[test]
    fn select_reports_none_and_multiple() {
        assert_eq!(select_spf(&[]), Err(SpfSelectError::None));
        assert_eq!(
            select_spf(&strings(&["v=spf1x -all", "spf1 -all"])),
            Err(SpfSelectError::None)
        );
        assert_eq!(
            select_spf(&strings(&[
                "v=spf1 mx -all",
                "v=spf1 include:_spf.example.net ~all"
            ])),
            Err(SpfSelectError::Multiple { count: 2 })
        );
    }

    #[test]
    fn parses_every_mechanism_and_qualifier() {
        let r = parse(
            "v=spf1 +a -a:mail.example.com/24 ~mx//64 ?mx:example.org/28//96 ptr ptr:example.net \
             ip4:198.18.0.0/15 ip4:192.0.2.1 ip6:2001:db8::/32 ip6:2001:db8::1 \
             include:_spf.example.net exists:%{i}._spf.example.com redirect=_spf.example.com \
             exp=explain.example.com foo=bar -all",
        )
        .expect("valid record");
        let d = &r.directives;
        assert_eq!(d.len(), 13);
        assert_eq!(
            d[0],
            Directive {
                qualifier: Qualifier::Pass,
                mechanism: Mechanism::A {
                    domain: None,
                    cidr: DualCidr::default()
                }
            }
        );
        assert_eq!(
            d[1],
            Directive {
                qualifier: Qualifier::Fail,
                mechanism: Mechanism::A {
                    domain: Some("mail.example.com".into()),
                    cidr: DualCidr {
                        v4: Some(24),
                        v6: None
                    }
                }
            }
        );
        assert_eq!(d[2].qualifier, Qualifier::SoftFail);
        assert_eq!(
            d[2].mechanism,
            Mechanism::Mx {
                domain: None,
                cidr: DualCidr {
                    v4: None,
                    v6: Some(64)
                }
            }
        );
        assert_eq!(d[3].qualifier, Qualifier::Neutral);
        assert_eq!(
            d[3].mechanism,
            Mechanism::Mx {
                domain: Some("example.org".into()),
                cidr: DualCidr {
                    v4: Some(28),
                    v6: Some(96)
                }
            }
        );
        assert_eq!(d[4].mechanism, Mechanism::Ptr { domain: None });
        assert_eq!(
            d[5].mechanism,
            Mechanism::Ptr {
                domain: Some("example.net".into())
            }
        );
        assert_eq!(
            d[6].mechanism,
            Mechanism::Ip4 {
                addr: Ipv4Addr::new(198, 18, 0, 0),
                prefix: 15
            }
        );
        assert_eq!(
            d[7].mechanism,
            Mechanism::Ip4 {
                addr: Ipv4Addr::new(192, 0, 2, 1),
                prefix: 32
            }
        );
        assert_eq!(
            d[8].mechanism,
            Mechanism::Ip6 {
                addr: "2001:db8::".parse().expect("v6"),
                prefix: 32
            }
        );
        assert_eq!(
            d[9].mechanism,
            Mechanism::Ip6 {
                addr: "2001:db8::1".parse().expect("v6"),
                prefix: 128
            }
        );
        assert_eq!(
            d[10].mechanism,
            Mechanism::Include {
                domain: "_spf.example.net".into()
            }
        );
        assert_eq!(
            d[11].mechanism,
            Mechanism::Exists {
                domain: "%{i}._spf.example.com".into()
            }
        );
        assert_eq!(
            d[12],
            Directive {
                qualifier: Qualifier::Fail,
                mechanism: Mechanism::All
            }
        );
        assert_eq!(r.redirect.as_deref(), Some("_spf.example.com"));
        assert_eq!(r.exp.as_deref(), Some("explain.example.com"));
        assert_eq!(
            r.unknown_modifiers,
            vec![("foo".to_string(), "bar".to_string())]
        );
        assert!(!r.plus_all());
        assert_eq!(r.all_qualifier(), Some(Qualifier::Fail));
        // a, a, mx, mx, ptr, ptr, include, exists, redirect
        assert_eq!(r.local_lookups(), 9);
    }

    #[test]
    fn mechanism_names_are_case_insensitive_and_extra_spaces_ignored() {
        let r = parse("v=spf1  IP4:192.0.2.0/24   Include:_spf.example.com  -ALL ").expect("valid");
        assert_eq!(r.directives.len(), 3);
        assert_eq!(r.directives[2].mechanism, Mechanism::All);
    }

    #[test]
    fn plus_all_is_flagged_with_and_without_the_plus() {
        assert!(parse("v=spf1 mx +all").expect("valid").plus_all());
        assert!(parse("v=spf1 mx all").expect("valid").plus_all());
        assert!(!parse("v=spf1 mx ~all").expect("valid").plus_all());
        assert!(!parse("v=spf1 mx ?all").expect("valid").plus_all());
        assert!(!parse("v=spf1 mx").expect("valid").plus_all());
    }

    #[test]
    fn syntax_errors_name_the_offending_term() {
        let cases: &[(&str, SpfParseError)] = &[
            ("v=spf2 -all", SpfParseError::NotSpf),
            ("spf1 -all", SpfParseError::NotSpf),
            (
                "v=spf1 ipv4:192.0.2.1 -all",
                SpfParseError::UnknownMechanism {
                    term: "ipv4:192.0.2.1".into(),
                },
            ),
            (
                "v=spf1 ip4:192.0.2.300",
                SpfParseError::InvalidAddress {
                    term: "ip4:192.0.2.300".into(),
                },
            ),
            (
                "v=spf1 ip4:192.0.2.0/33",
                SpfParseError::InvalidCidr {
                    term: "ip4:192.0.2.0/33".into(),
                },
            ),
            (
                "v=spf1 ip4:192.0.2.0/",
                SpfParseError::InvalidCidr {
                    term: "ip4:192.0.2.0/".into(),
                },
            ),
            (
                "v=spf1 ip6:2001:db8::/129",
                SpfParseError::InvalidCidr {
                    term: "ip6:2001:db8::/129".into(),
                },
            ),
            (
                "v=spf1 ip6:2001:zz8::",
                SpfParseError::InvalidAddress {
                    term: "ip6:2001:zz8::".into(),
                },
            ),
            (
                "v=spf1 ip4",
                SpfParseError::MissingDomain { term: "ip4".into() },
            ),
            (
                "v=spf1 include",
                SpfParseError::MissingDomain {
                    term: "include".into(),
                },
            ),
            (
                "v=spf1 include:",
                SpfParseError::MissingDomain {
                    term: "include:".into(),
                },
            ),
            (
                "v=spf1 include:localhost",
                SpfParseError::InvalidDomain {
                    term: "include:localhost".into(),
                },
            ),
            (
                "v=spf1 include:%{z}.example.com",
                SpfParseError::InvalidDomain {
                    term: "include:%{z}.example.com".into(),
                },
            ),
            (
                "v=spf1 a/33",
                SpfParseError::InvalidCidr {
                    term: "a/33".into(),
                },
            ),
            (
                "v=spf1 mx//129",
                SpfParseError::InvalidCidr {
                    term: "mx//129".into(),
                },
            ),
            (
                "v=spf1 all:example.com",
                SpfParseError::UnexpectedArgument {
                    term: "all:example.com".into(),
                },
            ),
            (
                "v=spf1 -redirect=example.com",
                SpfParseError::InvalidTerm {
                    term: "-redirect=example.com".into(),
                },
            ),
            (
                "v=spf1 a,mx",
                SpfParseError::InvalidTerm {
                    term: "a,mx".into(),
                },
            ),
            ("v=spf1 -", SpfParseError::InvalidTerm { term: "-".into() }),
            (
                "v=spf1 redirect=a.example.com redirect=b.example.com",
                SpfParseError::DuplicateModifier {
                    name: "redirect".into(),
                },
            ),
            (
                "v=spf1 exp=",
                SpfParseError::InvalidDomain {
                    term: "exp=".into(),
                },
            ),
        ];
        assert!(!cases.is_empty());
        for (record, expected) in cases {
            assert_eq!(parse(record).as_ref(), Err(expected), "record {record:?}");
        }
    }

    #[test]
    fn macro_domains_are_accepted_when_well_formed() {
        let r = parse("v=spf1 exists:%{ir}.%{v}._spf.%{d2} include:%{d}.%%x.example.com -all")
            .expect("valid");
        assert_eq!(r.directives.len(), 3);
        assert!(parse("v=spf1 exists:%{i").is_err());
        assert!(parse("v=spf1 exists:%x.example.com").is_err());
    }

    #[test]
    fn directives_display_as_written() {
        let r =
            parse("v=spf1 -a:mail.example.com/24//64 ~mx ip4:192.0.2.0/24 ?include:x.example.com")
                .expect("valid");
        let shown: Vec<String> = r.directives.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            strings(&[
                "-a:mail.example.com/24//64",
                "~mx",
                "ip4:192.0.2.0/24",
                "?include:x.example.com"
            ])
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = parse(&s);
            let _ = parse(&format!("v=spf1 {s}"));
            let _ = select_spf(std::slice::from_ref(&s));
        }

        #[test]
        fn parse_never_panics_on_term_soup(terms in proptest::collection::vec("[-+~?]?(a|mx|ip4|ip6|include|ptr|exists|all|redirect|exp|x)[:=/]?[0-9a-z.:%{}/]{0,12}", 0..8)) {
            let _ = parse(&format!("v=spf1 {}", terms.join(" ")));
        }
    }
}
