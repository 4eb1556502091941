//! Endpoint expansion for per-address checks: a mail domain becomes its MX hosts by preference
//! (or the implicit MX of RFC 5321 §5.1), each host its A/AAAA addresses, an IP literal itself.

use std::net::IpAddr;
use std::time::Duration;

use mxscope_proto::{facts, ErrorClass, Observation};
use tokio::time::Instant;

use super::resolve::{Answer, DnsError, Resolve};
use super::TargetKind;

/// One address to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Address {
    /// The MX host name (or the target itself); used for SNI.
    pub host: String,
    pub ip: IpAddr,
    /// MX preference when the address came from an MX record.
    pub preference: Option<u16>,
    /// True when the domain has no MX and its own A/AAAA stand in (RFC 5321 §5.1).
    pub implicit_mx: bool,
}

/// A name that could not be turned into addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub host: String,
    pub class: ErrorClass,
    pub message: String,
    /// MX preference when `host` came from an MX record.
    pub preference: Option<u16>,
    /// The domain publishes a null MX (RFC 7505): no host to probe, by design.
    pub null_mx: bool,
}

/// The result of expanding one target.
#[derive(Debug, Clone, Default)]
pub(crate) struct Expansion {
    pub addrs: Vec<Address>,
    pub failures: Vec<Failure>,
    pub took: Duration,
    /// MX hosts left out by [`Fanout::max_mx_hosts`] (the least preferred).
    pub dropped_mx_hosts: usize,
    /// Addresses left out by [`Fanout::max_addresses`] (those of the least preferred hosts).
    pub dropped_addresses: usize,
}

impl Expansion {
    /// Records on `obs` what the fan-out caps left out, if anything.
    pub(crate) fn note_caps(&self, obs: &mut Observation) {
        if self.dropped_mx_hosts > 0 {
            obs.fact(facts::endpoints::MX_HOSTS_DROPPED, self.dropped_mx_hosts);
        }
        if self.dropped_addresses > 0 {
            obs.fact(facts::endpoints::ADDRESSES_DROPPED, self.dropped_addresses);
        }
    }
}

/// How far one target may fan out: a domain with hundreds of MX records or a host with hundreds
/// of addresses must not turn one check into hundreds of connections or lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    /// Most MX hosts of one domain probed, by preference.
    pub max_mx_hosts: usize,
    /// Most addresses of one target probed (over all its MX hosts).
    pub max_addresses: usize,
}

impl Fanout {
    pub const DEFAULT_MAX_MX_HOSTS: usize = 10;
    pub const DEFAULT_MAX_ADDRESSES: usize = 32;
}

impl Default for Fanout {
    fn default() -> Self {
        Fanout {
            max_mx_hosts: Fanout::DEFAULT_MAX_MX_HOSTS,
            max_addresses: Fanout::DEFAULT_MAX_ADDRESSES,
        }
    }
}

/// Strips `[...]` around an address literal and parses it.
pub(crate) fn ip_literal(target: &str) -> Option<IpAddr> {
    let t = target
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(target);
    t.parse().ok()
}

/// Asks `resolver`, turning a missed `deadline` into a `dns_timeout`.
pub(crate) async fn bounded<T>(
    name: &str,
    deadline: Instant,
    fut: impl std::future::Future<Output = Result<T, DnsError>>,
) -> Result<T, DnsError> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(r) => r,
        Err(_) => Err(DnsError {
            class: ErrorClass::DnsTimeout,
            name: name.to_string(),
            detail: "no answer before the probe deadline".to_string(),
        }),
    }
}

/// Expands `target` into addresses, within `fanout`; DNS problems become `failures` (never an
/// `Err`).
pub(crate) async fn expand(
    resolver: &dyn Resolve,
    target: &str,
    kind: TargetKind,
    fanout: Fanout,
    deadline: Instant,
) -> Expansion {
    let started = Instant::now();
    let mut out = Expansion::default();
    if let Some(ip) = ip_literal(target) {
        out.addrs.push(Address {
            host: target.to_string(),
            ip,
            preference: None,
            implicit_mx: false,
        });
        return out;
    }
    match kind {
        TargetKind::Host => host_addrs(resolver, target, None, false, deadline, &mut out).await,
        TargetKind::Domain => match bounded(target, deadline, resolver.mx(target)).await {
            Ok(mx) => {
                let mut hosts: Vec<(u16, String)> = Vec::new();
                for r in mx.records {
                    if r.exchange.is_empty() || r.exchange == "." {
                        continue;
                    }
                    if !hosts
                        .iter()
                        .any(|(_, h)| h.eq_ignore_ascii_case(&r.exchange))
                    {
                        hosts.push((r.preference, r.exchange));
                    }
                }
                if hosts.is_empty() {
                    out.failures.push(Failure {
                        host: target.to_string(),
                        class: ErrorClass::Policy,
                        message: format!("{target} has a null MX (RFC 7505): it accepts no mail"),
                        preference: None,
                        null_mx: true,
                    });
                }
                hosts.sort_by_key(|(p, _)| *p);
                let max_hosts = fanout.max_mx_hosts.max(1);
                if hosts.len() > max_hosts {
                    out.dropped_mx_hosts = hosts.len() - max_hosts;
                    hosts.truncate(max_hosts);
                }
                let lookups = hosts
                    .iter()
                    .map(|(_, h)| bounded(h, deadline, resolver.ips(h)));
                let answers = futures::future::join_all(lookups).await;
                for ((pref, host), answer) in hosts.into_iter().zip(answers) {
                    add_answer(&mut out, &host, Some(pref), false, answer);
                }
            }
            Err(e) if e.class == ErrorClass::DnsNodata => {
                host_addrs(resolver, target, None, true, deadline, &mut out).await;
            }
            Err(e) => out.failures.push(Failure {
                host: target.to_string(),
                class: e.class,
                message: format!("MX lookup for {target}: {e}"),
                preference: None,
                null_mx: false,
            }),
        },
    }
    let max_addrs = fanout.max_addresses.max(1);
    if out.addrs.len() > max_addrs {
        out.dropped_addresses = out.addrs.len() - max_addrs;
        out.addrs.truncate(max_addrs);
    }
    out.took = started.elapsed();
    out
}

async fn host_addrs(
    resolver: &dyn Resolve,
    host: &str,
    preference: Option<u16>,
    implicit_mx: bool,
    deadline: Instant,
    out: &mut Expansion,
) {
    let answer = bounded(host, deadline, resolver.ips(host)).await;
    add_answer(out, host, preference, implicit_mx, answer);
}

fn add_answer(
    out: &mut Expansion,
    host: &str,
    preference: Option<u16>,
    implicit_mx: bool,
    answer: Result<Answer<IpAddr>, DnsError>,
) {
    match answer {
        Ok(a) if a.records.is_empty() => out.failures.push(Failure {
            host: host.to_string(),
            class: ErrorClass::DnsNodata,
            message: if implicit_mx {
                format!("{host} has no MX and no A/AAAA records")
            } else {
                format!("{host} has no A/AAAA records")
            },
            preference,
            null_mx: false,
        }),
        Ok(a) => {
            for ip in a.records {
                out.addrs.push(Address {
                    host: host.to_string(),
                    ip,
                    preference,
                    implicit_mx,
                });
            }
        }
        Err(e) => out.failures.push(Failure {
            host: host.to_string(),
            class: e.class,
            message: format!("address lookup for {host}: {e}"),
            preference,
            null_mx: false,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::testing::FakeResolver;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn domain_expands_by_preference_into_each_address() {
        let r = FakeResolver::default()
            .mx(
                "example.test",
                &[(20, "mx2.example.test"), (10, "mx1.example.test")],
            )
            .ips("mx1.example.test", &["127.0.0.1", "::1"])
            .ips("mx2.example.test", &["127.0.0.2"]);
        let e = expand(
            &r,
            "example.test",
            TargetKind::Domain,
            Fanout::default(),
            far(),
        )
        .await;
        assert!(e.failures.is_empty(), "{:?}", e.failures);
        let got: Vec<_> = e
            .addrs
            .iter()
            .map(|a| (a.host.as_str(), a.ip.to_string(), a.preference))
            .collect();
        assert_eq!(
            got,
            vec![
                ("mx1.example.test", "127.0.0.1".to_string(), Some(10)),
                ("mx1.example.test", "::1".to_string(), Some(10)),
                ("mx2.example.test", "127.0.0.2".to_string(), Some(20)),
            ]
        );
    }

    #[tokio::test]
    async fn no_mx_falls_back_to_implicit_mx() {
        let r = FakeResolver::default().ips("example.test", &["127.0.0.1"]);
        let e = expand(
            &r,
            "example.test",
            TargetKind::Domain,
            Fanout::default(),
            far(),
        )
        .await;
        assert_eq!(e.addrs.len(), 1);
        assert!(e.addrs[0].implicit_mx);
    }

    #[tokio::test]
    async fn dns_failures_are_classified_per_host() {
        let r = FakeResolver::default()
            .mx(
                "example.test",
                &[(10, "gone.example.test"), (20, "mx.example.test")],
            )
            .fail("gone.example.test", ErrorClass::DnsNxdomain)
            .ips("mx.example.test", &["127.0.0.1"]);
        let e = expand(
            &r,
            "example.test",
            TargetKind::Domain,
            Fanout::default(),
            far(),
        )
        .await;
        assert_eq!(e.addrs.len(), 1);
        assert_eq!(e.failures.len(), 1);
        assert_eq!(e.failures[0].host, "gone.example.test");
        assert_eq!(e.failures[0].class, ErrorClass::DnsNxdomain);

        let r = FakeResolver::default().fail("nx.test", ErrorClass::DnsNxdomain);
        let e = expand(&r, "nx.test", TargetKind::Domain, Fanout::default(), far()).await;
        assert!(e.addrs.is_empty());
        assert_eq!(e.failures[0].class, ErrorClass::DnsNxdomain);
    }

    #[tokio::test]
    async fn literals_and_hosts() {
        let r = FakeResolver::default().ips("h.test", &["::1"]);
        let e = expand(
            &r,
            "[127.0.0.1]",
            TargetKind::Domain,
            Fanout::default(),
            far(),
        )
        .await;
        assert_eq!(e.addrs[0].ip.to_string(), "127.0.0.1");
        let e = expand(&r, "h.test", TargetKind::Host, Fanout::default(), far()).await;
        assert_eq!(e.addrs[0].ip.to_string(), "::1");
        assert_eq!(e.addrs[0].preference, None);
    }

    #[tokio::test]
    async fn fan_out_is_capped_by_preference_and_what_was_left_out_is_counted() {
        // 30 MX hosts with 4 addresses each: a hostile zone asking for 120 connections.
        let mut r = FakeResolver::default();
        let mx: Vec<(u16, String)> = (0..30u16)
            .map(|i| (100 - i, format!("mx{i}.example.test")))
            .collect();
        let mx_refs: Vec<(u16, &str)> = mx.iter().map(|(p, h)| (*p, h.as_str())).collect();
        r = r.mx("example.test", &mx_refs);
        for (i, (_, host)) in mx.iter().enumerate() {
            let ips: Vec<String> = (1..=4).map(|j| format!("127.0.{i}.{j}")).collect();
            let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
            r = r.ips(host, &ips);
        }
        let fanout = Fanout {
            max_mx_hosts: 5,
            max_addresses: 12,
        };
        let e = expand(&r, "example.test", TargetKind::Domain, fanout, far()).await;
        assert_eq!(e.dropped_mx_hosts, 25);
        assert_eq!(e.addrs.len(), 12);
        assert_eq!(e.dropped_addresses, 5 * 4 - 12);
        // The most preferred hosts (lowest preference value) are the ones kept.
        assert_eq!(e.addrs[0].host, "mx29.example.test");
        assert!(e.addrs.iter().all(|a| a.preference.unwrap() <= 75));
        let mut obs = Observation::new(
            "example.test",
            mxscope_proto::Endpoint::host("example.test"),
            mxscope_proto::CheckKind::Smtp,
            1,
        );
        e.note_caps(&mut obs);
        assert_eq!(
            obs.fact_of(facts::endpoints::MX_HOSTS_DROPPED),
            Some(&mxscope_proto::FactValue::Int(25))
        );
        assert_eq!(
            obs.fact_of(facts::endpoints::ADDRESSES_DROPPED),
            Some(&mxscope_proto::FactValue::Int(8))
        );
    }
}
