//! The static lookup count: walks a domain's SPF tree through every `include` and `redirect`,
//! counting DNS-querying terms and void lookups against the limits of RFC 7208 §4.6.4.

use thiserror::Error;

use mxscope_proto::dns::DnsError;

use super::record::{parse, select_spf, Mechanism, SpfParseError, SpfRecord, SpfSelectError};
use super::{
    BoxFuture, SpfDns, LOOKUP_LIMIT, MAX_DEPTH, MAX_QUERIES, MX_NAME_LIMIT, VOID_LOOKUP_LIMIT,
};

/// Something wrong found while walking the include/redirect tree.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LookupIssue {
    #[error("dns query for {name} failed: {error}")]
    Dns { name: String, error: DnsError },
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
            Err(error) => {
                self.report.errors.push(LookupIssue::Dns {
                    name: domain.to_string(),
                    error,
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
        match super::all_addrs(self.dns, name).await {
            Ok(a) if a.is_empty() => self.report.void_lookups += 1,
            Ok(_) => {}
            Err(error) => self.report.errors.push(LookupIssue::Dns {
                name: name.to_string(),
                error,
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
            Err(error) => self.report.errors.push(LookupIssue::Dns {
                name: name.to_string(),
                error,
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

#[cfg(test)]
mod tests {
    use mxscope_proto::ErrorClass;

    use super::*;
    use crate::testing::{strings, FakeDns};

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
        assert!(matches!(&report.errors[2], LookupIssue::Dns { name, error }
                if name == "down.example.net" && error.class == ErrorClass::DnsServfail));
        assert_eq!(
            report.errors[2].to_string(),
            "dns query for down.example.net failed: dns_servfail for down.example.net: servfail"
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
}
