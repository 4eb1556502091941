//! `check_host()` (RFC 7208 §4): whether an address passes for a domain, evaluated against live
//! DNS through [`SpfDns`] with the lookup and void-lookup limits enforced.

use std::net::IpAddr;

use thiserror::Error;

use crate::probe::resolve::DnsError;

use super::macros::{expand_macros, MacroContext};
use super::record::{
    parse, select_spf, Directive, DualCidr, Mechanism, Qualifier, SpfParseError, SpfSelectError,
};
use super::{canonical, BoxFuture, SpfDns, LOOKUP_LIMIT, MX_NAME_LIMIT, VOID_LOOKUP_LIMIT};

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
            .map_err(|error| SpfEvalError::Dns {
                name: name.to_string(),
                error,
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
                .map_err(|error| SpfEvalError::Dns {
                    name: domain.clone(),
                    error,
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
                let hosts = self
                    .dns
                    .mx_hosts(&name)
                    .await
                    .map_err(|error| SpfEvalError::Dns {
                        name: name.clone(),
                        error,
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
    use crate::probe::spf::testing::{ip, FakeDns};

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

    #[test]
    fn prefix_matching_edges() {
        assert!(in_prefix(ip("198.18.1.3"), ip("0.0.0.0"), 0));
        assert!(in_prefix(ip("2001:db8::1"), ip("::"), 0));
        assert!(!in_prefix(ip("198.18.1.3"), ip("2001:db8::"), 0));
        assert!(in_prefix(ip("198.19.255.255"), ip("198.18.0.0"), 15));
        assert!(!in_prefix(ip("198.20.0.0"), ip("198.18.0.0"), 15));
    }
}
