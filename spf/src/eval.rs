//! `check_host()` (RFC 7208 §4): whether an address may send for an identity (MAIL FROM, or
//! `postmaster@` the HELO name), evaluated through [`SpfDns`] with the §4.6.4 limits, PTR
//! validation (§5.5) and the `exp=` explanation of a `fail` (§6.2).

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

use crate::DnsError;

use super::macros::{expand_macros, truncate_domain, MacroContext, Use};
use super::record::{
    parse, select_spf, Directive, DualCidr, Mechanism, Qualifier, SpfParseError, SpfSelectError,
};
use super::{
    canonical, BoxFuture, SpfDns, LOOKUP_LIMIT, MX_NAME_LIMIT, PTR_NAME_LIMIT, VOID_LOOKUP_LIMIT,
};

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

impl SpfResult {
    /// The lowercase name of RFC 7208 (`pass`, `softfail`, `temperror`, …).
    pub fn name(self) -> &'static str {
        match self {
            SpfResult::None => "none",
            SpfResult::Neutral => "neutral",
            SpfResult::Pass => "pass",
            SpfResult::Fail => "fail",
            SpfResult::SoftFail => "softfail",
            SpfResult::TempError => "temperror",
            SpfResult::PermError => "permerror",
        }
    }
}

impl std::fmt::Display for SpfResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Qualifier {
    /// The result a matching directive with this qualifier gives (§4.6.2).
    fn result(self) -> SpfResult {
        match self {
            Qualifier::Pass => SpfResult::Pass,
            Qualifier::Fail => SpfResult::Fail,
            Qualifier::SoftFail => SpfResult::SoftFail,
            Qualifier::Neutral => SpfResult::Neutral,
        }
    }
}

/// Why evaluation ended in `temperror` or `permerror`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SpfEvalError {
    #[error("dns query for {name} failed: {error}")]
    Dns { name: String, error: DnsError },
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

/// Who is sending: the client address, the MAIL FROM address (empty for a bounce, then the HELO
/// name is checked as `postmaster@<helo>`, §2.4) and the HELO name.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub ip: IpAddr,
    pub mail_from: &'a str,
    pub helo: &'a str,
}

/// What `check_host()` decided and what led there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub result: SpfResult,
    /// The domain checked first (the MAIL FROM domain, or the HELO name).
    pub domain: String,
    /// The directive that matched, as written, if any.
    pub matched: Option<String>,
    /// The domain whose record held the matching directive.
    pub matched_in: Option<String>,
    /// Lookup-counting terms evaluated.
    pub lookups: usize,
    /// For `fail`: the expanded `exp=` text, when the record has one that resolved (§6.2).
    pub explanation: Option<String>,
    /// Why the result is `temperror` or `permerror`.
    pub error: Option<SpfEvalError>,
}

/// The identity's parts the macros read.
struct Sender {
    ip: IpAddr,
    sender: String,
    local: String,
    domain: String,
    helo: String,
    now: u64,
}

struct Eval<'d, D: ?Sized> {
    dns: &'d D,
    who: Sender,
    lookups: usize,
    voids: usize,
}

struct Hit {
    result: SpfResult,
    matched: Option<String>,
    matched_in: Option<String>,
    /// `(domain, exp spec)` of the record that decided, for a `fail`'s explanation.
    exp: Option<(String, String)>,
}

/// A name as queried: without its trailing dot; `None` when it cannot be a DNS name (an empty
/// label or one over 63 octets), which answers as a void lookup without a query.
fn query_name(name: &str) -> Option<&str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| (1..=63).contains(&l.len()));
    ok.then_some(name)
}

/// RFC 7208 §4.3: a domain to check is a fully qualified name (at least two labels, none empty
/// or over 63 octets), not an address literal.
fn valid_domain(domain: &str) -> bool {
    query_name(domain).is_some_and(|d| d.contains('.') && !d.starts_with('[') && d.is_ascii())
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

    fn dns_error(name: &str) -> impl FnOnce(DnsError) -> SpfEvalError + '_ {
        move |error| SpfEvalError::Dns {
            name: name.to_string(),
            error,
        }
    }

    /// Addresses of `name` in the family of the client address (A for IPv4, AAAA for IPv6).
    async fn addrs(&mut self, name: &str, v4: bool) -> Result<Vec<IpAddr>, SpfEvalError> {
        let Some(q) = query_name(name) else {
            self.void(true)?;
            return Ok(Vec::new());
        };
        let a: Vec<IpAddr> = if v4 {
            let r = self.dns.a(q).await.map_err(Self::dns_error(q))?;
            r.into_iter().map(IpAddr::V4).collect()
        } else {
            let r = self.dns.aaaa(q).await.map_err(Self::dns_error(q))?;
            r.into_iter().map(IpAddr::V6).collect()
        };
        self.void(a.is_empty())?;
        Ok(a)
    }

    /// The validated names of the client address (§5.5): at most [`PTR_NAME_LIMIT`] PTR names,
    /// each kept when one of its addresses is the client's; DNS errors drop a name.
    async fn validated_names(&mut self) -> Vec<String> {
        let ip = canonical(self.who.ip);
        let Ok(names) = self.dns.ptr(ip).await else {
            return Vec::new();
        };
        if self.void(names.is_empty()).is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for name in names.into_iter().take(PTR_NAME_LIMIT) {
            let name = name.trim_end_matches('.').to_string();
            if let Ok(addrs) = self.addrs(&name, ip.is_ipv4()).await {
                if addrs.contains(&ip) {
                    out.push(name);
                }
            }
        }
        out
    }

    /// `%{p}`: a validated name equal to or under `domain`, else any validated name (§7.3).
    async fn validated_for(&mut self, domain: &str) -> Option<String> {
        let names = self.validated_names().await;
        names
            .iter()
            .find(|n| under(n, domain))
            .or(names.first())
            .cloned()
    }

    async fn expand_as(&mut self, spec: &str, domain: &str, use_: Use) -> Option<String> {
        let validated = if spec.contains("%{p") || spec.contains("%{P") {
            self.validated_for(domain).await
        } else {
            None
        };
        let w = &self.who;
        let (local, sender_domain) = w
            .sender
            .rsplit_once('@')
            .unwrap_or(("postmaster", &w.domain));
        let local = if local.is_empty() {
            w.local.as_str()
        } else {
            local
        };
        expand_macros(
            spec,
            &MacroContext {
                ip: w.ip,
                sender: &w.sender,
                local,
                sender_domain,
                domain,
                helo: &w.helo,
                validated: validated.as_deref(),
                now: w.now,
            },
            use_,
        )
    }

    /// A domain-spec expanded and cut to 253 characters.
    async fn expand(
        &mut self,
        spec: &str,
        domain: &str,
        term: &str,
    ) -> Result<String, SpfEvalError> {
        match self.expand_as(spec, domain, Use::Domain).await {
            Some(name) => Ok(truncate_domain(name)),
            None => Err(SpfEvalError::BadMacro {
                term: term.to_string(),
            }),
        }
    }

    /// `check_host()` for `domain`; `Ok(None)` when the domain has no SPF record (or cannot
    /// have one, §4.3).
    fn check_host<'a>(
        &'a mut self,
        domain: String,
    ) -> BoxFuture<'a, Result<Option<Hit>, SpfEvalError>> {
        Box::pin(async move {
            if !valid_domain(&domain) {
                return Ok(None);
            }
            let q = query_name(&domain).unwrap_or(&domain).to_string();
            let txt = self.dns.txt(&q).await.map_err(Self::dns_error(&q))?;
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
                        exp: record.exp.clone().map(|e| (domain.clone(), e)),
                    }));
                }
            }
            if let Some(target) = record.effective_redirect() {
                self.count()?;
                let term = format!("redirect={target}");
                let target = self.expand(target, &domain, &term).await?;
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
                exp: None,
            }))
        })
    }

    async fn matches(&mut self, d: &Directive, domain: &str) -> Result<bool, SpfEvalError> {
        let ip = canonical(self.who.ip);
        let term = d.to_string();
        match &d.mechanism {
            Mechanism::All => Ok(true),
            Mechanism::Ip4 { addr, prefix } => Ok(in_prefix(ip, IpAddr::V4(*addr), *prefix)),
            Mechanism::Ip6 { addr, prefix } => Ok(in_prefix(ip, IpAddr::V6(*addr), *prefix)),
            Mechanism::A {
                domain: target,
                cidr,
            } => {
                let name = match target {
                    Some(t) => self.expand(t, domain, &term).await?,
                    None => domain.to_string(),
                };
                let addrs = self.addrs(&name, ip.is_ipv4()).await?;
                Ok(addrs.into_iter().any(|a| cidr_match(ip, a, cidr)))
            }
            Mechanism::Mx {
                domain: target,
                cidr,
            } => {
                let name = match target {
                    Some(t) => self.expand(t, domain, &term).await?,
                    None => domain.to_string(),
                };
                let hosts = match query_name(&name) {
                    Some(q) => self.dns.mx_hosts(q).await.map_err(Self::dns_error(q))?,
                    None => Vec::new(),
                };
                self.void(hosts.is_empty())?;
                if hosts.len() > MX_NAME_LIMIT {
                    return Err(SpfEvalError::TooManyMx { domain: name });
                }
                for host in hosts {
                    let addrs = self.addrs(&host, ip.is_ipv4()).await?;
                    if addrs.into_iter().any(|a| cidr_match(ip, a, cidr)) {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Mechanism::Ptr { domain: target } => {
                let target = match target {
                    Some(t) => self.expand(t, domain, &term).await?,
                    None => domain.to_string(),
                };
                let names = self.validated_names().await;
                Ok(names.iter().any(|n| under(n, &target)))
            }
            Mechanism::Include { domain: target } => {
                let target = self.expand(target, domain, &term).await?;
                match self.check_host(target.clone()).await? {
                    Some(hit) => Ok(hit.result == SpfResult::Pass),
                    None => Err(SpfEvalError::MissingTarget {
                        term,
                        domain: target,
                    }),
                }
            }
            Mechanism::Exists { domain: target } => {
                let name = self.expand(target, domain, &term).await?;
                // exists always asks for A records, whatever the client's family (§5.7)
                let addrs = self.addrs(&name, true).await?;
                Ok(!addrs.is_empty())
            }
        }
    }

    /// The explanation of a `fail` (§6.2): the one TXT record at the expanded `exp=` name, its
    /// macros expanded; `None` on any DNS problem, no or several records, or bad macros.
    async fn explanation(&mut self, domain: &str, spec: &str) -> Option<String> {
        let name = truncate_domain(self.expand_as(spec, domain, Use::Domain).await?);
        let q = query_name(&name)?;
        let txt = self.dns.txt(q).await.ok()?;
        let [text] = txt.as_slice() else {
            return None;
        };
        self.expand_as(text, domain, Use::Explanation).await
    }
}

/// `name` equals `domain` or is a subdomain of it (case-insensitive, trailing dots ignored).
fn under(name: &str, domain: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    name == domain || name.ends_with(&format!(".{domain}"))
}

/// `check_host()` for an identity (§2.4, §4): the MAIL FROM domain, or `postmaster@` the HELO
/// name for an empty MAIL FROM; a malformed domain gives `none` without a query (§4.3).
pub async fn check_host<D: SpfDns + ?Sized>(id: &Identity<'_>, dns: &D) -> Verdict {
    let domain = match id.mail_from.rsplit_once('@') {
        Some((_, d)) => d,
        None if id.mail_from.is_empty() => id.helo,
        None => id.mail_from,
    };
    check_domain(domain, id, dns).await
}

/// `check_host(ip, domain, sender)` with an explicit `domain` (§4.1): the sender's parts still
/// come from the identity (`postmaster@<domain>` when MAIL FROM is empty).
pub async fn check_domain<D: SpfDns + ?Sized>(domain: &str, id: &Identity<'_>, dns: &D) -> Verdict {
    let (local, sender_domain) = match id.mail_from.rsplit_once('@') {
        Some((l, d)) => (l, d),
        None if id.mail_from.is_empty() => ("postmaster", domain),
        None => ("postmaster", id.mail_from),
    };
    let local = if local.is_empty() {
        "postmaster"
    } else {
        local
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut eval = Eval {
        dns,
        who: Sender {
            ip: id.ip,
            sender: format!("{local}@{sender_domain}"),
            local: local.to_string(),
            domain: sender_domain.to_string(),
            helo: id.helo.to_string(),
            now,
        },
        lookups: 0,
        voids: 0,
    };
    let mut verdict = Verdict {
        result: SpfResult::None,
        domain: domain.to_string(),
        matched: None,
        matched_in: None,
        lookups: 0,
        explanation: None,
        error: None,
    };
    match eval.check_host(domain.to_string()).await {
        Ok(None) => {}
        Ok(Some(hit)) => {
            verdict.result = hit.result;
            verdict.matched = hit.matched;
            verdict.matched_in = hit.matched_in;
            if hit.result == SpfResult::Fail {
                if let Some((d, spec)) = hit.exp {
                    verdict.explanation = eval.explanation(&d, &spec).await;
                }
            }
        }
        Err(e) => {
            verdict.result = e.result();
            verdict.error = Some(e);
        }
    }
    verdict.lookups = eval.lookups;
    verdict
}

/// Whether `ip` would get `pass` for mail from `postmaster@domain` with HELO `domain`.
/// `Err` carries `temperror`/`permerror` causes; see [`SpfEvalError::result`].
pub async fn authorizes<D: SpfDns + ?Sized>(
    domain: &str,
    ip: IpAddr,
    dns: &D,
) -> Result<Authorization, SpfEvalError> {
    let mail_from = format!("postmaster@{domain}");
    let v = check_host(
        &Identity {
            ip,
            mail_from: &mail_from,
            helo: domain,
        },
        dns,
    )
    .await;
    match v.error {
        Some(e) => Err(e),
        None => Ok(Authorization {
            result: v.result,
            matched: v.matched,
            matched_in: v.matched_in,
            lookups: v.lookups,
        }),
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

#[cfg(test)]
mod tests {
    use mxscope_proto::ErrorClass;

    use super::*;
    use crate::testing::{ip, FakeDns};

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
        assert!(
            matches!(&e, SpfEvalError::Dns { name, error }
                if name == "down.example" && error.class == ErrorClass::DnsServfail),
            "{e:?}"
        );
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

    #[tokio::test]
    async fn ptr_validates_names_and_exp_explains_a_fail() {
        let dns = FakeDns::default()
            .spf(
                "example.com",
                "v=spf1 ptr:relays.example.com -all exp=why.%{d}",
            )
            .spf(
                "why.example.com",
                "%{l} from %{c} (%{p}) may not send for %{o} via %{h}",
            )
            .ptr("192.0.2.7", &["out.relays.example.com."])
            .addr("out.relays.example.com", &["192.0.2.7"])
            .ptr("192.0.2.8", &["forged.relays.example.com"])
            .addr("forged.relays.example.com", &["198.51.100.1"]);
        let id = |addr: &'static str| Identity {
            ip: ip(addr),
            mail_from: "alice@example.com",
            helo: "mta.example.net",
        };
        let v = check_host(&id("192.0.2.7"), &dns).await;
        assert_eq!(v.result, SpfResult::Pass);
        assert_eq!(v.matched.as_deref(), Some("ptr:relays.example.com"));
        assert_eq!(v.explanation, None);
        // a PTR name whose addresses do not include the client is not validated
        let v = check_host(&id("192.0.2.8"), &dns).await;
        assert_eq!(v.result, SpfResult::Fail);
        assert_eq!(
            v.explanation.as_deref(),
            Some("alice from 192.0.2.8 (unknown) may not send for example.com via mta.example.net")
        );
        // an empty MAIL FROM checks postmaster@ the HELO name
        let v = check_host(
            &Identity {
                ip: ip("192.0.2.8"),
                mail_from: "",
                helo: "example.com",
            },
            &dns,
        )
        .await;
        assert_eq!(
            (v.result, v.domain.as_str()),
            (SpfResult::Fail, "example.com")
        );
        assert!(v
            .explanation
            .is_some_and(|e| e.starts_with("postmaster from")));
        // a malformed domain is none without any query (§4.3)
        let v = check_host(
            &Identity {
                ip: ip("192.0.2.8"),
                mail_from: "bob@localhost",
                helo: "x",
            },
            &dns,
        )
        .await;
        assert_eq!((v.result, v.lookups), (SpfResult::None, 0));
    }

    #[test]
    fn prefix_matching_edges() {
        assert!(in_prefix(ip("198.18.1.3"), ip("0.0.0.0"), 0));
        assert!(in_prefix(ip("2001:db8::1"), ip("::"), 0));
        assert!(!in_prefix(ip("198.18.1.3"), ip("2001:db8::"), 0));
        assert!(in_prefix(ip("198.19.255.255"), ip("198.18.0.0"), 15));
        assert!(!in_prefix(ip("198.20.0.0"), ip("198.18.0.0"), 15));
    }
}
