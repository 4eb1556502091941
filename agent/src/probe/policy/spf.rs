//! SPF (RFC 7208): record selection and parsing, the recursive DNS-lookup count (10-lookup and
//! 2-void-lookup limits of §4.6.4) and a `check_host` evaluator to tell whether an address passes.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;

use thiserror::Error;

/// Terms that cause DNS queries may appear at most this many times in one evaluation (§4.6.4).
pub const LOOKUP_LIMIT: usize = 10;
/// Lookups that return no answer (NXDOMAIN or no records) allowed before `permerror` (§4.6.4).
pub const VOID_LOOKUP_LIMIT: usize = 2;
/// An `mx` mechanism may name at most this many exchanges (§4.6.4).
pub const MX_NAME_LIMIT: usize = 10;
/// `include`/`redirect` nesting followed by [`count_lookups`] before it stops descending.
pub const MAX_DEPTH: usize = 12;
/// Upper bound of DNS queries [`count_lookups`] issues, so a hostile tree cannot fan out forever.
pub const MAX_QUERIES: usize = 100;

/// The DNS view SPF needs. Implementations return `Ok(vec![])` for NXDOMAIN and "no records of
/// that type" (void lookups) and `Err` only when the query itself failed (timeout, SERVFAIL).
#[async_trait::async_trait]
pub trait SpfDns: Send + Sync {
    /// TXT records at `name`, each with its character strings already concatenated.
    async fn txt(&self, name: &str) -> Result<Vec<String>, String>;
    /// Exchange host names of the MX records at `name`.
    async fn mx_hosts(&self, name: &str) -> Result<Vec<String>, String>;
    /// A and AAAA addresses of `name`.
    async fn addrs(&self, name: &str) -> Result<Vec<IpAddr>, String>;
}

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

    fn result(self) -> SpfResult {
        match self {
            Qualifier::Pass => SpfResult::Pass,
            Qualifier::Fail => SpfResult::Fail,
            Qualifier::SoftFail => SpfResult::SoftFail,
            Qualifier::Neutral => SpfResult::Neutral,
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
    fn effective_redirect(&self) -> Option<&str> {
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
            if !is_macro_string(value) {
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

/// A cidr length: no leading zeros, at most `max`.
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
    if rest.contains('/') && !rest.contains('%') {
        return None;
    }
    Some((rest, cidr))
}

/// `macro-string` of §7.1: visible characters, `%` only as `%%`, `%_`, `%-` or `%{...}`.
fn is_macro_string(s: &str) -> bool {
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if !(c.is_ascii_graphic()) {
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
                if !"slodiphcrtvSLODIPHCRTV".contains(letter) {
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
    if s.is_empty() || !is_macro_string(s) {
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

// ---------------------------------------------------------------------------------------------
// Lookup counting
// ---------------------------------------------------------------------------------------------

/// Something wrong found while walking the include/redirect tree.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LookupIssue {
    #[error("dns query for {name} failed: {message}")]
    Dns { name: String, message: String },
    #[error("{domain} has no spf record")]
    NoRecord { domain: String },
    #[error("{domain} has {count} spf records")]
    MultipleRecords { domain: String, count: usize },
    #[error("{domain}: {error}")]
    Syntax {
        domain: String,
        error: SpfParseError,
    },
    #[error("include loop back to {domain}")]
    Loop { domain: String },
    #[error("nesting deeper than {MAX_DEPTH} at {domain}")]
    TooDeep { domain: String },
    #[error("{domain}: mx names {count} exchanges, more than {MX_NAME_LIMIT}")]
    TooManyMx { domain: String, count: usize },
    #[error("{term} uses macros; not followed")]
    MacroNotExpanded { term: String },
    #[error("stopped after {MAX_QUERIES} dns queries")]
    Truncated,
}

/// What [`count_lookups`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LookupReport {
    /// Lookup-counting terms in the whole tree (include, a, mx, ptr, exists, redirect).
    pub total: usize,
    /// `total` is above [`LOOKUP_LIMIT`]: receivers return `permerror`.
    pub limit_exceeded: bool,
    /// `a`/`mx`/include lookups that returned nothing.
    pub void_lookups: usize,
    /// `void_lookups` is above [`VOID_LOOKUP_LIMIT`].
    pub void_limit_exceeded: bool,
    /// Domains whose records were read, in visiting order (the first is the queried domain).
    pub chain: Vec<String>,
    pub errors: Vec<LookupIssue>,
    /// Whether the top record ends in `+all`.
    pub plus_all: bool,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

struct Walk<'d, D: ?Sized> {
    dns: &'d D,
    report: LookupReport,
    queries: usize,
}

impl<D: SpfDns + ?Sized> Walk<'_, D> {
    fn budget(&mut self) -> bool {
        if self.queries >= MAX_QUERIES {
            if !self.report.errors.contains(&LookupIssue::Truncated) {
                self.report.errors.push(LookupIssue::Truncated);
            }
            return false;
        }
        self.queries += 1;
        true
    }

    /// Fetches, selects and parses the record of `domain`, recording any issue.
    async fn record(&mut self, domain: &str) -> Option<SpfRecord> {
        if !self.budget() {
            return None;
        }
        let txt = match self.dns.txt(domain).await {
            Ok(txt) => txt,
            Err(message) => {
                self.report.errors.push(LookupIssue::Dns {
                    name: domain.to_string(),
                    message,
                });
                return None;
            }
        };
        let chosen = match select_spf(&txt) {
            Ok(r) => r,
            Err(SpfSelectError::None) => {
                if txt.is_empty() {
                    self.report.void_lookups += 1;
                }
                self.report.errors.push(LookupIssue::NoRecord {
                    domain: domain.to_string(),
                });
                return None;
            }
            Err(SpfSelectError::Multiple { count }) => {
                self.report.errors.push(LookupIssue::MultipleRecords {
                    domain: domain.to_string(),
                    count,
                });
                return None;
            }
        };
        self.report.chain.push(domain.to_string());
        match parse(&chosen) {
            Ok(r) => Some(r),
            Err(error) => {
                self.report.errors.push(LookupIssue::Syntax {
                    domain: domain.to_string(),
                    error,
                });
                None
            }
        }
    }

    fn visit<'a>(&'a mut self, domain: String, path: &'a mut Vec<String>) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let key = normalize(&domain);
            if path.contains(&key) {
                self.report.errors.push(LookupIssue::Loop { domain });
                return;
            }
            if path.len() >= MAX_DEPTH {
                self.report.errors.push(LookupIssue::TooDeep { domain });
                return;
            }
            let Some(record) = self.record(&domain).await else {
                return;
            };
            if path.is_empty() {
                self.report.plus_all = record.plus_all();
            }
            path.push(key);
            for d in &record.directives {
                if !d.mechanism.is_lookup() {
                    continue;
                }
                self.report.total += 1;
                match &d.mechanism {
                    Mechanism::Include { domain: target } => {
                        if target.contains('%') {
                            self.report.errors.push(LookupIssue::MacroNotExpanded {
                                term: d.to_string(),
                            });
                        } else {
                            self.visit(target.clone(), path).await;
                        }
                    }
                    Mechanism::A { domain: target, .. } => {
                        let name = target.clone().unwrap_or_else(|| domain.clone());
                        if !name.contains('%') && self.budget() {
                            self.addrs_void(&name).await;
                        }
                    }
                    Mechanism::Mx { domain: target, .. } => {
                        let name = target.clone().unwrap_or_else(|| domain.clone());
                        if !name.contains('%') && self.budget() {
                            self.mx_void(&name).await;
                        }
                    }
                    // ptr and exists need the client's address or macros: counted, not resolved
                    _ => {}
                }
            }
            if let Some(target) = record.redirect.clone() {
                if record.effective_redirect().is_some() {
                    self.report.total += 1;
                    if target.contains('%') {
                        self.report.errors.push(LookupIssue::MacroNotExpanded {
                            term: format!("redirect={target}"),
                        });
                    } else {
                        self.visit(target, path).await;
                    }
                }
            }
            path.pop();
        })
    }

    async fn addrs_void(&mut self, name: &str) {
        match self.dns.addrs(name).await {
            Ok(a) if a.is_empty() => self.report.void_lookups += 1,
            Ok(_) => {}
            Err(message) => self.report.errors.push(LookupIssue::Dns {
                name: name.to_string(),
                message,
            }),
        }
    }

    async fn mx_void(&mut self, name: &str) {
        match self.dns.mx_hosts(name).await {
            Ok(h) if h.is_empty() => self.report.void_lookups += 1,
            Ok(h) if h.len() > MX_NAME_LIMIT => self.report.errors.push(LookupIssue::TooManyMx {
                domain: name.to_string(),
                count: h.len(),
            }),
            Ok(_) => {}
            Err(message) => self.report.errors.push(LookupIssue::Dns {
                name: name.to_string(),
                message,
            }),
        }
    }
}

fn normalize(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

/// Counts the DNS-querying terms of `domain`'s SPF tree, following every `include` and `redirect`
/// (the static worst case receivers may hit), with loop protection and a depth cap.
pub async fn count_lookups<D: SpfDns + ?Sized>(domain: &str, dns: &D) -> LookupReport {
    let mut walk = Walk {
        dns,
        report: LookupReport::default(),
        queries: 0,
    };
    let mut path = Vec::new();
    walk.visit(domain.to_string(), &mut path).await;
    let mut report = walk.report;
    report.limit_exceeded = report.total > LOOKUP_LIMIT;
    report.void_limit_exceeded = report.void_lookups > VOID_LOOKUP_LIMIT;
    report
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

/// The results of `check_host()` (§2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpfResult {
    None,
    Neutral,
    Pass,
    Fail,
    SoftFail,
    TempError,
    PermError,
}

/// Why evaluation ended in `temperror` or `permerror`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SpfEvalError {
    #[error("dns query for {name} failed: {message}")]
    Dns { name: String, message: String },
    #[error("{domain}: {error}")]
    Syntax {
        domain: String,
        error: SpfParseError,
    },
    #[error("{domain} has multiple spf records")]
    MultipleRecords { domain: String },
    #[error("{term} points at {domain}, which has no spf record")]
    MissingTarget { term: String, domain: String },
    #[error("more than {LOOKUP_LIMIT} dns-querying terms")]
    LookupLimit,
    #[error("more than {VOID_LOOKUP_LIMIT} void lookups")]
    VoidLookupLimit,
    #[error("{domain}: mx names more than {MX_NAME_LIMIT} exchanges")]
    TooManyMx { domain: String },
    #[error("macro in {term} cannot be expanded")]
    BadMacro { term: String },
}

impl SpfEvalError {
    /// The `check_host()` result this error stands for.
    pub fn result(&self) -> SpfResult {
        match self {
            SpfEvalError::Dns { .. } => SpfResult::TempError,
            _ => SpfResult::PermError,
        }
    }
}

/// The outcome of [`authorizes`] when no error occurred.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// `None`, `Neutral`, `Pass`, `Fail` or `SoftFail`.
    pub result: SpfResult,
    /// The directive that matched, as written, if any.
    pub matched: Option<String>,
    /// The domain whose record held the matching directive.
    pub matched_in: Option<String>,
    /// Lookup-counting terms evaluated.
    pub lookups: usize,
}

impl Authorization {
    pub fn is_pass(&self) -> bool {
        self.result == SpfResult::Pass
    }
}

struct Eval<'d, D: ?Sized> {
    dns: &'d D,
    ip: IpAddr,
    sender_domain: String,
    lookups: usize,
    voids: usize,
}

struct Hit {
    result: SpfResult,
    matched: Option<String>,
    matched_in: Option<String>,
}

impl<D: SpfDns + ?Sized> Eval<'_, D> {
    fn count(&mut self) -> Result<(), SpfEvalError> {
        self.lookups += 1;
        if self.lookups > LOOKUP_LIMIT {
            return Err(SpfEvalError::LookupLimit);
        }
        Ok(())
    }

    fn void(&mut self, empty: bool) -> Result<(), SpfEvalError> {
        if empty {
            self.voids += 1;
            if self.voids > VOID_LOOKUP_LIMIT {
                return Err(SpfEvalError::VoidLookupLimit);
            }
        }
        Ok(())
    }

    async fn addrs(&mut self, name: &str) -> Result<Vec<IpAddr>, SpfEvalError> {
        let a = self
            .dns
            .addrs(name)
            .await
            .map_err(|message| SpfEvalError::Dns {
                name: name.to_string(),
                message,
            })?;
        self.void(a.is_empty())?;
        Ok(a)
    }

    fn expand(&self, spec: &str, domain: &str, term: &Directive) -> Result<String, SpfEvalError> {
        expand_macros(
            spec,
            &MacroContext {
                ip: self.ip,
                domain,
                sender_domain: &self.sender_domain,
            },
        )
        .ok_or_else(|| SpfEvalError::BadMacro {
            term: term.to_string(),
        })
    }

    /// `check_host()` for `domain`; `Ok(None)` when the domain has no SPF record.
    fn check_host<'a>(
        &'a mut self,
        domain: String,
    ) -> BoxFuture<'a, Result<Option<Hit>, SpfEvalError>> {
        Box::pin(async move {
            let txt = self
                .dns
                .txt(&domain)
                .await
                .map_err(|message| SpfEvalError::Dns {
                    name: domain.clone(),
                    message,
                })?;
            let record = match select_spf(&txt) {
                Ok(r) => r,
                Err(SpfSelectError::None) => return Ok(None),
                Err(SpfSelectError::Multiple { .. }) => {
                    return Err(SpfEvalError::MultipleRecords { domain });
                }
            };
            let record = parse(&record).map_err(|error| SpfEvalError::Syntax {
                domain: domain.clone(),
                error,
            })?;
            for d in &record.directives {
                if d.mechanism.is_lookup() {
                    self.count()?;
                }
                if self.matches(d, &domain).await? {
                    return Ok(Some(Hit {
                        result: d.qualifier.result(),
                        matched: Some(d.to_string()),
                        matched_in: Some(domain.clone()),
                    }));
                }
            }
            if let Some(target) = record.effective_redirect() {
                self.count()?;
                let term = format!("redirect={target}");
                let target = expand_macros(
                    target,
                    &MacroContext {
                        ip: self.ip,
                        domain: &domain,
                        sender_domain: &self.sender_domain,
                    },
                )
                .ok_or_else(|| SpfEvalError::BadMacro { term: term.clone() })?;
                return match self.check_host(target.clone()).await? {
                    Some(hit) => Ok(Some(hit)),
                    None => Err(SpfEvalError::MissingTarget {
                        term,
                        domain: target,
                    }),
                };
            }
            Ok(Some(Hit {
                result: SpfResult::Neutral,
                matched: None,
                matched_in: None,
            }))
        })
    }

    async fn matches(&mut self, d: &Directive, domain: &str) -> Result<bool, SpfEvalError> {
        let ip = canonical(self.ip);
        match &d.mechanism {
            Mechanism::All => Ok(true),
            Mechanism::Ip4 { addr, prefix } => Ok(in_prefix(ip, IpAddr::V4(*addr), *prefix)),
            Mechanism::Ip6 { addr, prefix } => Ok(in_prefix(ip, IpAddr::V6(*addr), *prefix)),
            Mechanism::A {
                domain: target,
                cidr,
            } => {
                let name = match target {
                    Some(t) => self.expand(t, domain, d)?,
                    None => domain.to_string(),
                };
                let addrs = self.addrs(&name).await?;
                Ok(addrs.into_iter().any(|a| cidr_match(ip, a, cidr)))
            }
            Mechanism::Mx {
                domain: target,
                cidr,
            } => {
                let name = match target {
                    Some(t) => self.expand(t, domain, d)?,
                    None => domain.to_string(),
                };
                let hosts =
                    self.dns
                        .mx_hosts(&name)
                        .await
                        .map_err(|message| SpfEvalError::Dns {
                            name: name.clone(),
                            message,
                        })?;
                self.void(hosts.is_empty())?;
                if hosts.len() > MX_NAME_LIMIT {
                    return Err(SpfEvalError::TooManyMx { domain: name });
                }
                for host in hosts {
                    let addrs = self.addrs(&host).await?;
                    if addrs.into_iter().any(|a| cidr_match(ip, a, cidr)) {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Mechanism::Include { domain: target } => {
                let target = self.expand(target, domain, d)?;
                match self.check_host(target.clone()).await? {
                    Some(hit) => Ok(hit.result == SpfResult::Pass),
                    None => Err(SpfEvalError::MissingTarget {
                        term: d.to_string(),
                        domain: target,
                    }),
                }
            }
            Mechanism::Exists { domain: target } => {
                let name = self.expand(target, domain, d)?;
                let addrs = self.addrs(&name).await?;
                Ok(addrs.iter().any(IpAddr::is_ipv4))
            }
            // ptr is deprecated (§5.5) and needs reverse DNS the trait lacks: never matches
            Mechanism::Ptr { .. } => Ok(false),
        }
    }
}

/// Whether `ip` would get `pass` for mail from `domain` (sender `postmaster@domain`, HELO `domain`).
/// `Err` carries `temperror`/`permerror` causes; see [`SpfEvalError::result`]. `ptr` never matches.
pub async fn authorizes<D: SpfDns + ?Sized>(
    domain: &str,
    ip: IpAddr,
    dns: &D,
) -> Result<Authorization, SpfEvalError> {
    let mut eval = Eval {
        dns,
        ip,
        sender_domain: domain.to_string(),
        lookups: 0,
        voids: 0,
    };
    let hit = eval.check_host(domain.to_string()).await?;
    Ok(match hit {
        None => Authorization {
            result: SpfResult::None,
            matched: None,
            matched_in: None,
            lookups: eval.lookups,
        },
        Some(h) => Authorization {
            result: h.result,
            matched: h.matched,
            matched_in: h.matched_in,
            lookups: eval.lookups,
        },
    })
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn cidr_match(ip: IpAddr, candidate: IpAddr, cidr: &DualCidr) -> bool {
    match candidate {
        IpAddr::V4(_) => in_prefix(ip, candidate, cidr.v4.unwrap_or(32)),
        IpAddr::V6(_) => in_prefix(ip, candidate, cidr.v6.unwrap_or(128)),
    }
}

fn in_prefix(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

struct MacroContext<'a> {
    ip: IpAddr,
    domain: &'a str,
    sender_domain: &'a str,
}

/// Expands the macros of §7 for a sender `postmaster@<sender_domain>`; `None` on bad syntax.
fn expand_macros(spec: &str, ctx: &MacroContext<'_>) -> Option<String> {
    if !is_macro_string(spec) {
        return None;
    }
    let mut out = String::new();
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            '%' => out.push('%'),
            '_' => out.push(' '),
            '-' => out.push_str("%20"),
            '{' => {
                let letter = chars.next()?.to_ascii_lowercase();
                let mut body = String::new();
                for c in chars.by_ref() {
                    if c == '}' {
                        break;
                    }
                    body.push(c);
                }
                let value = macro_value(letter, ctx)?;
                out.push_str(&transform(&value, &body)?);
            }
            _ => return None,
        }
    }
    Some(out)
}

fn macro_value(letter: char, ctx: &MacroContext<'_>) -> Option<String> {
    Some(match letter {
        's' => format!("postmaster@{}", ctx.sender_domain),
        'l' => "postmaster".to_string(),
        'o' | 'h' => ctx.sender_domain.to_string(),
        'd' => ctx.domain.to_string(),
        'i' => match canonical(ctx.ip) {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => nibbles(&v6).join("."),
        },
        'v' => if ctx.ip.is_ipv4() || canonical(ctx.ip).is_ipv4() {
            "in-addr"
        } else {
            "ip6"
        }
        .to_string(),
        'p' => "unknown".to_string(),
        // c, r, t are only allowed in exp text, which this module does not expand
        _ => return None,
    })
}

/// Applies `[digits][r][delimiters]` to a macro value (§7.3).
fn transform(value: &str, body: &str) -> Option<String> {
    let digits: String = body.chars().take_while(char::is_ascii_digit).collect();
    let rest = body.get(digits.len()..)?;
    let (reverse, delims) = match rest.strip_prefix(['r', 'R']) {
        Some(d) => (true, d),
        None => (false, rest),
    };
    let delims = if delims.is_empty() { "." } else { delims };
    let mut parts: Vec<&str> = value.split(|c| delims.contains(c)).collect();
    if reverse {
        parts.reverse();
    }
    if !digits.is_empty() {
        let keep: usize = digits.parse().ok()?;
        if keep == 0 {
            return None;
        }
        let skip = parts.len().saturating_sub(keep);
        parts.drain(..skip);
    }
    Some(parts.join("."))
}

fn nibbles(v6: &Ipv6Addr) -> Vec<String> {
    v6.octets()
        .iter()
        .flat_map(|b| [b >> 4, b & 0x0f])
        .map(|n| format!("{n:x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    /// A fake DNS built from literal tables; unknown names answer empty (NXDOMAIN).
    #[derive(Default)]
    struct FakeDns {
        txt: HashMap<String, Vec<String>>,
        mx: HashMap<String, Vec<String>>,
        addrs: HashMap<String, Vec<IpAddr>>,
        failing: HashSet<String>,
    }

    impl FakeDns {
        fn spf(mut self, name: &str, record: &str) -> Self {
            self.txt
                .entry(name.to_string())
                .or_default()
                .push(record.to_string());
            self
        }
        fn mx(mut self, name: &str, hosts: &[&str]) -> Self {
            self.mx.insert(
                name.to_string(),
                hosts.iter().map(|h| h.to_string()).collect(),
            );
            self
        }
        fn addr(mut self, name: &str, ips: &[&str]) -> Self {
            let ips = ips
                .iter()
                .map(|i| i.parse().expect("test address"))
                .collect();
            self.addrs.insert(name.to_string(), ips);
            self
        }
        fn fail(mut self, name: &str) -> Self {
            self.failing.insert(name.to_string());
            self
        }
        fn check(&self, name: &str) -> Result<(), String> {
            if self.failing.contains(name) {
                Err("servfail".to_string())
            } else {
                Ok(())
            }
        }
    }

    #[async_trait::async_trait]
    impl SpfDns for FakeDns {
        async fn txt(&self, name: &str) -> Result<Vec<String>, String> {
            self.check(name)?;
            Ok(self.txt.get(name).cloned().unwrap_or_default())
        }
        async fn mx_hosts(&self, name: &str) -> Result<Vec<String>, String> {
            self.check(name)?;
            Ok(self.mx.get(name).cloned().unwrap_or_default())
        }
        async fn addrs(&self, name: &str) -> Result<Vec<IpAddr>, String> {
            self.check(name)?;
            Ok(self.addrs.get(name).cloned().unwrap_or_default())
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

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

    #[tokio::test]
    async fn counts_lookups_through_nested_includes_and_flags_the_limit() {
        let dns = FakeDns::default()
            .spf("example.com", "v=spf1 mx a include:a.example.net -all")
            .spf("a.example.net", "v=spf1 a:x.example.net a:y.example.net include:b.example.net ~all")
            .spf("b.example.net", "v=spf1 ip4:192.0.2.0/24 exists:%{i}.e.example.net ptr mx:mx.example.net include:c.example.net ?all")
            .spf("c.example.net", "v=spf1 a:z.example.net redirect=d.example.net")
            .spf("d.example.net", "v=spf1 ip4:198.51.100.0/24 -all")
            .mx("example.com", &["mx1.example.com"])
            .mx("mx.example.net", &["mx9.example.net"])
            .addr("example.com", &["192.0.2.10"])
            .addr("x.example.net", &["192.0.2.11"])
            .addr("y.example.net", &["192.0.2.12"])
            .addr("z.example.net", &["192.0.2.13"]);
        let report = count_lookups("example.com", &dns).await;
        // example.com: mx, a, include = 3; a: a, a, include = 3; b: exists, ptr, mx, include = 4;
        // c: a, redirect = 2 → 12
        assert_eq!(report.total, 12);
        assert!(report.limit_exceeded);
        assert_eq!(report.void_lookups, 0);
        assert!(!report.void_limit_exceeded);
        assert_eq!(
            report.chain,
            strings(&[
                "example.com",
                "a.example.net",
                "b.example.net",
                "c.example.net",
                "d.example.net"
            ])
        );
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(!report.plus_all);
    }

    #[tokio::test]
    async fn counts_within_the_limit_and_reports_plus_all() {
        let dns = FakeDns::default()
            .spf("example.com", "v=spf1 mx include:_spf.example.net +all")
            .spf("_spf.example.net", "v=spf1 ip4:192.0.2.0/24 -all")
            .mx("example.com", &["mx1.example.com"]);
        let report = count_lookups("example.com", &dns).await;
        assert_eq!(report.total, 2);
        assert!(!report.limit_exceeded);
        assert!(report.plus_all);
        assert_eq!(report.chain, strings(&["example.com", "_spf.example.net"]));
    }

    #[tokio::test]
    async fn counting_detects_loops_missing_targets_and_voids() {
        let dns = FakeDns::default()
            .spf("example.com", "v=spf1 include:loop.example.net a:gone1.example.com a:gone2.example.com mx:gone3.example.com include:none.example.org -all")
            .spf("loop.example.net", "v=spf1 include:example.com -all");
        let report = count_lookups("example.com", &dns).await;
        assert!(
            report.errors.contains(&LookupIssue::Loop {
                domain: "example.com".into()
            }),
            "{:?}",
            report.errors
        );
        assert!(report.errors.contains(&LookupIssue::NoRecord {
            domain: "none.example.org".into()
        }));
        // gone1, gone2, gone3 and the empty none.example.org TXT
        assert_eq!(report.void_lookups, 4);
        assert!(report.void_limit_exceeded);
        // include, a, a, mx, include at the top + include inside the loop record
        assert_eq!(report.total, 6);
    }

    #[tokio::test]
    async fn counting_reports_dns_failures_syntax_errors_and_multiple_records() {
        let dns = FakeDns::default()
            .spf("example.com", "v=spf1 include:broken.example.net include:two.example.net include:down.example.net -all")
            .spf("broken.example.net", "v=spf1 ip4:300.1.1.1 -all")
            .spf("two.example.net", "v=spf1 -all")
            .spf("two.example.net", "v=spf1 +all")
            .fail("down.example.net");
        let report = count_lookups("example.com", &dns).await;
        assert_eq!(report.total, 3);
        assert_eq!(report.errors.len(), 3, "{:?}", report.errors);
        assert!(
            matches!(&report.errors[0], LookupIssue::Syntax { domain, .. } if domain == "broken.example.net")
        );
        assert_eq!(
            report.errors[1],
            LookupIssue::MultipleRecords {
                domain: "two.example.net".into(),
                count: 2
            }
        );
        assert!(
            matches!(&report.errors[2], LookupIssue::Dns { name, .. } if name == "down.example.net")
        );
    }

    #[tokio::test]
    async fn counting_stops_at_the_depth_cap() {
        let mut dns = FakeDns::default();
        for i in 0..30 {
            dns = dns.spf(
                &format!("d{i}.example.com"),
                &format!("v=spf1 include:d{}.example.com -all", i + 1),
            );
        }
        let report = count_lookups("d0.example.com", &dns).await;
        assert_eq!(report.chain.len(), MAX_DEPTH);
        assert!(report.limit_exceeded);
        assert!(
            matches!(report.errors.as_slice(), [LookupIssue::TooDeep { .. }]),
            "{:?}",
            report.errors
        );
    }

    #[tokio::test]
    async fn counting_a_missing_top_record() {
        let report = count_lookups("example.com", &FakeDns::default()).await;
        assert_eq!(report.total, 0);
        assert!(report.chain.is_empty());
        assert_eq!(
            report.errors,
            vec![LookupIssue::NoRecord {
                domain: "example.com".into()
            }]
        );
    }

    fn mail_dns() -> FakeDns {
        FakeDns::default()
            .spf(
                "example.com",
                "v=spf1 mx ip4:203.0.113.0/26 include:_spf.provider.example -all",
            )
            .spf(
                "_spf.provider.example",
                "v=spf1 ip6:2001:db8:500::/48 a:relay.provider.example/30 ~all",
            )
            .mx("example.com", &["mx1.example.com", "mx2.example.com"])
            .addr("mx1.example.com", &["192.0.2.25", "2001:db8::25"])
            .addr("mx2.example.com", &["198.51.100.25"])
            .addr("relay.provider.example", &["198.18.7.1"])
    }

    #[tokio::test]
    async fn mx_addresses_are_authorised() {
        let dns = mail_dns();
        for addr in [
            "192.0.2.25",
            "2001:db8::25",
            "198.51.100.25",
            "::ffff:192.0.2.25",
        ] {
            let v = authorizes("example.com", ip(addr), &dns)
                .await
                .expect("evaluates");
            assert!(v.is_pass(), "{addr}: {v:?}");
            assert_eq!(v.matched.as_deref(), Some("mx"));
            assert_eq!(v.matched_in.as_deref(), Some("example.com"));
        }
    }

    #[tokio::test]
    async fn ip_ranges_includes_and_all_decide_other_addresses() {
        let dns = mail_dns();
        let v = authorizes("example.com", ip("203.0.113.63"), &dns)
            .await
            .expect("evaluates");
        assert_eq!(
            (v.result, v.matched.as_deref()),
            (SpfResult::Pass, Some("ip4:203.0.113.0/26"))
        );
        let v = authorizes("example.com", ip("203.0.113.64"), &dns)
            .await
            .expect("evaluates");
        assert_eq!(
            (v.result, v.matched.as_deref()),
            (SpfResult::Fail, Some("-all"))
        );
        let v = authorizes("example.com", ip("2001:db8:500:1::9"), &dns)
            .await
            .expect("evaluates");
        assert_eq!(v.result, SpfResult::Pass);
        assert_eq!(v.matched.as_deref(), Some("include:_spf.provider.example"));
        let v = authorizes("example.com", ip("198.18.7.3"), &dns)
            .await
            .expect("evaluates");
        assert_eq!(v.result, SpfResult::Pass, "a:/30 covers .0-.3");
        // the include's ~all does not match in the parent: evaluation goes on to -all
        let v = authorizes("example.com", ip("198.18.7.4"), &dns)
            .await
            .expect("evaluates");
        assert_eq!(v.result, SpfResult::Fail);
        assert!(v.lookups >= 2);
    }

    #[tokio::test]
    async fn redirect_neutral_none_and_errors() {
        let dns = FakeDns::default()
            .spf("example.com", "v=spf1 redirect=_spf.example.net")
            .spf("_spf.example.net", "v=spf1 ip4:192.0.2.0/24 ~all")
            .spf("neutral.example", "v=spf1 ip4:192.0.2.1")
            .spf("dangling.example", "v=spf1 redirect=nothing.example")
            .spf("tempfail.example", "v=spf1 include:down.example -all")
            .spf(
                "ignored-redirect.example",
                "v=spf1 -all redirect=_spf.example.net",
            )
            .fail("down.example");
        let v = authorizes("example.com", ip("192.0.2.9"), &dns)
            .await
            .expect("evaluates");
        assert_eq!(
            (v.result, v.matched_in.as_deref()),
            (SpfResult::Pass, Some("_spf.example.net"))
        );
        let v = authorizes("example.com", ip("198.51.100.1"), &dns)
            .await
            .expect("evaluates");
        assert_eq!(v.result, SpfResult::SoftFail);
        let v = authorizes("neutral.example", ip("198.51.100.1"), &dns)
            .await
            .expect("evaluates");
        assert_eq!((v.result, v.matched), (SpfResult::Neutral, None));
        let v = authorizes("norecord.example", ip("198.51.100.1"), &dns)
            .await
            .expect("evaluates");
        assert_eq!(v.result, SpfResult::None);
        let e = authorizes("dangling.example", ip("192.0.2.9"), &dns)
            .await
            .expect_err("permerror");
        assert_eq!(e.result(), SpfResult::PermError);
        let e = authorizes("tempfail.example", ip("192.0.2.9"), &dns)
            .await
            .expect_err("temperror");
        assert_eq!(e.result(), SpfResult::TempError);
        let v = authorizes("ignored-redirect.example", ip("192.0.2.9"), &dns)
            .await
            .expect("evaluates");
        assert_eq!(
            v.result,
            SpfResult::Fail,
            "redirect is ignored when all is present"
        );
    }

    #[tokio::test]
    async fn evaluation_enforces_the_lookup_and_void_limits() {
        let mut dns = FakeDns::default().spf(
            "example.com",
            "v=spf1 a:h1.example.com a:h2.example.com a:h3.example.com a:h4.example.com a:h5.example.com \
             a:h6.example.com a:h7.example.com a:h8.example.com a:h9.example.com a:h10.example.com a:h11.example.com -all",
        );
        for i in 1..=11 {
            dns = dns.addr(&format!("h{i}.example.com"), &["198.51.100.1"]);
        }
        let e = authorizes("example.com", ip("192.0.2.1"), &dns)
            .await
            .expect_err("permerror");
        assert_eq!(e, SpfEvalError::LookupLimit);
        let dns = FakeDns::default().spf(
            "example.com",
            "v=spf1 a:v1.example.com a:v2.example.com a:v3.example.com -all",
        );
        let e = authorizes("example.com", ip("192.0.2.1"), &dns)
            .await
            .expect_err("permerror");
        assert_eq!(e, SpfEvalError::VoidLookupLimit);
    }

    #[tokio::test]
    async fn exists_with_macros_is_expanded_against_the_address() {
        let dns = FakeDns::default()
            .spf("example.com", "v=spf1 exists:%{ir}.%{v}._spf.%{d} -all")
            .addr("9.2.0.192.in-addr._spf.example.com", &["127.0.0.2"]);
        let v = authorizes("example.com", ip("192.0.2.9"), &dns)
            .await
            .expect("evaluates");
        assert_eq!(v.result, SpfResult::Pass);
        let v = authorizes("example.com", ip("192.0.2.10"), &dns)
            .await
            .expect("evaluates");
        assert_eq!(v.result, SpfResult::Fail);
    }

    #[test]
    fn macro_transformers() {
        let ctx = MacroContext {
            ip: ip("192.0.2.3"),
            domain: "a.b.example.com",
            sender_domain: "example.com",
        };
        assert_eq!(expand_macros("%{d2}", &ctx).as_deref(), Some("example.com"));
        assert_eq!(
            expand_macros("%{dr}", &ctx).as_deref(),
            Some("com.example.b.a")
        );
        assert_eq!(
            expand_macros("%{ir}.%{l}.%{o}", &ctx).as_deref(),
            Some("3.2.0.192.postmaster.example.com")
        );
        assert_eq!(
            expand_macros("%{s}%%%_%-", &ctx).as_deref(),
            Some("postmaster@example.com% %20")
        );
        assert_eq!(expand_macros("%{d0}", &ctx), None);
        assert_eq!(expand_macros("%{c}", &ctx), None);
        let ctx6 = MacroContext {
            ip: ip("2001:db8::cb01"),
            domain: "example.com",
            sender_domain: "example.com",
        };
        assert_eq!(
            expand_macros("%{i}", &ctx6).as_deref(),
            Some("2.0.0.1.0.d.b.8.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.c.b.0.1")
        );
        assert_eq!(expand_macros("%{v}", &ctx6).as_deref(), Some("ip6"));
    }

    #[test]
    fn prefix_matching_edges() {
        assert!(in_prefix(ip("198.18.1.3"), ip("0.0.0.0"), 0));
        assert!(in_prefix(ip("2001:db8::1"), ip("::"), 0));
        assert!(!in_prefix(ip("198.18.1.3"), ip("2001:db8::"), 0));
        assert!(in_prefix(ip("198.19.255.255"), ip("198.18.0.0"), 15));
        assert!(!in_prefix(ip("198.20.0.0"), ip("198.18.0.0"), 15));
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

        #[test]
        fn expand_never_panics(s in "\\PC{0,40}") {
            let ctx = MacroContext { ip: IpAddr::V4(Ipv4Addr::LOCALHOST), domain: "example.com", sender_domain: "example.com" };
            let _ = expand_macros(&s, &ctx);
        }
    }
}
