//! The `mx` check: the MX set with preferences and TTL, the A/AAAA addresses (and TTL) of each MX
//! host, null MX, CNAME and IP-literal exchanges, forward-confirmed reverse DNS; one observation.

use mxscope_proto::{facts, Endpoint, ErrorClass, Observation, Outcome, Phase};
use tokio::time::Instant;

use super::endpoints::{bounded, ip_literal};
use super::resolve::Resolve;

/// Runs the `mx` check for `target` against `resolver`, answering before `deadline`.
pub(crate) async fn check(
    resolver: &dyn Resolve,
    target: &str,
    start_us: i64,
    deadline: Instant,
) -> Observation {
    let mut obs = Observation::new(
        target,
        Endpoint::host(target),
        mxscope_proto::CheckKind::Mx,
        start_us,
    );
    let started = Instant::now();
    // The zone's serial tells a region served an older copy (propagation) from one served other
    // data under the same serial (split horizon, interception); asked beside the MX lookup.
    let (mx, soa) = tokio::join!(
        bounded(target, deadline, resolver.mx(target)),
        bounded(target, deadline, resolver.soa_serial(target))
    );
    if let Some(serial) = soa.ok().and_then(|a| a.records.first().copied()) {
        obs.fact(facts::mx::SOA_SERIAL, i64::from(serial));
    }
    let hosts: Vec<(u16, String)> = match mx {
        Ok(answer) => {
            obs.fact(facts::mx::TTL, answer.ttl)
                .fact(facts::mx::COUNT, answer.records.len());
            obs.fact(facts::mx::IMPLICIT, false);
            answer
                .records
                .into_iter()
                .map(|r| (r.preference, r.exchange))
                .collect()
        }
        Err(e) if e.class == ErrorClass::DnsNodata => {
            // RFC 5321 §5.1: without MX the domain itself is the mail host.
            obs.fact(facts::mx::COUNT, 0usize)
                .fact(facts::mx::IMPLICIT, true);
            vec![(0, target.to_string())]
        }
        Err(e) => {
            obs.timing(Phase::Resolve, started.elapsed());
            obs.problem(
                Outcome::Fail,
                e.class,
                Phase::Resolve,
                format!("MX lookup for {target}: {e}"),
            );
            return obs;
        }
    };
    if hosts.iter().any(|(_, h)| h.is_empty() || h == ".") {
        obs.fact(facts::mx::NULL, true);
        obs.timing(Phase::Resolve, started.elapsed());
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Resolve,
            format!("{target} has a null MX (RFC 7505): it accepts no mail"),
        );
        return obs;
    }
    let lookups = hosts
        .iter()
        .map(|(_, h)| bounded(h, deadline, resolver.ips(h)));
    let answers = futures::future::join_all(lookups).await;
    let aliases = hosts
        .iter()
        .map(|(_, h)| bounded(h, deadline, resolver.cname(h)));
    let aliases = futures::future::join_all(aliases).await;
    for (i, ((_, host), alias)) in hosts.iter().zip(aliases).enumerate() {
        if ip_literal(host).is_some() {
            obs.fact(&facts::mx::nth(i, facts::mx::field::IP_LITERAL), true);
            obs.problem(
                Outcome::Fail,
                ErrorClass::Policy,
                Phase::Resolve,
                format!("MX host {host} is an IP address literal; an MX must name a host"),
            );
        }
        if let Ok(Some(target)) = alias {
            obs.fact(&facts::mx::nth(i, facts::mx::field::CNAME), target.as_str());
            obs.problem(
                Outcome::Warn,
                ErrorClass::Policy,
                Phase::Resolve,
                format!("MX host {host} is a CNAME (to {target}); RFC 2181 forbids it"),
            );
        }
    }

    let (mut v4, mut v6) = (0usize, 0usize);
    for (i, ((pref, host), answer)) in hosts.iter().zip(answers).enumerate() {
        obs.fact(&facts::mx::nth(i, facts::mx::field::HOST), host.as_str());
        obs.fact(&facts::mx::nth(i, facts::mx::field::PREFERENCE), *pref);
        match answer {
            Ok(a) => {
                let addrs: Vec<String> = a.records.iter().map(|ip| ip.to_string()).collect();
                let n4 = a.records.iter().filter(|ip| ip.is_ipv4()).count();
                v4 += n4;
                v6 += a.records.len() - n4;
                obs.fact(&facts::mx::nth(i, facts::mx::field::ADDRS), addrs.join(","));
                obs.fact(&facts::mx::nth(i, facts::mx::field::IPV4), n4);
                obs.fact(
                    &facts::mx::nth(i, facts::mx::field::IPV6),
                    a.records.len() - n4,
                );
                if a.records.is_empty() {
                    obs.problem(
                        Outcome::Fail,
                        ErrorClass::DnsNodata,
                        Phase::Resolve,
                        format!("MX host {host} has no A/AAAA records"),
                    );
                } else {
                    obs.fact(&facts::mx::nth(i, facts::mx::field::TTL), a.ttl);
                    fcrdns(resolver, &mut obs, i, host, &a.records, deadline).await;
                }
            }
            Err(e) => {
                obs.fact(&facts::mx::nth(i, facts::mx::field::ERROR), e.class.name());
                obs.problem(
                    Outcome::Fail,
                    e.class,
                    Phase::Resolve,
                    format!("MX host {host}: {e}"),
                );
            }
        }
    }
    obs.timing(Phase::Resolve, started.elapsed());
    obs.fact(facts::mx::HOSTS, hosts.len())
        .fact(facts::mx::IPV4_COUNT, v4)
        .fact(facts::mx::IPV6_COUNT, v6);
    obs
}

/// Forward-confirmed reverse DNS of each address of MX host `i`: a PTR name that resolves back
/// to the address. Facts `mx.<i>.ptr` (`ip=name` pairs) and `mx.<i>.fcrdns`; a mismatch warns.
async fn fcrdns(
    resolver: &dyn Resolve,
    obs: &mut Observation,
    i: usize,
    host: &str,
    addrs: &[std::net::IpAddr],
    deadline: Instant,
) {
    let mut pairs = Vec::new();
    let mut confirmed_all = true;
    for ip in addrs {
        let names = match bounded(&ip.to_string(), deadline, resolver.reverse(*ip)).await {
            Ok(a) => a.records,
            Err(_) => Vec::new(),
        };
        let mut confirmed = false;
        for name in &names {
            if let Ok(fwd) = bounded(name, deadline, resolver.ips(name)).await {
                if fwd.records.contains(ip) {
                    confirmed = true;
                    break;
                }
            }
        }
        pairs.push(format!(
            "{ip}={}",
            if names.is_empty() {
                "-".to_string()
            } else {
                names.join("|")
            }
        ));
        if !confirmed {
            confirmed_all = false;
            let why = if names.is_empty() {
                "has no PTR record".to_string()
            } else {
                format!(
                    "has PTR {} which does not resolve back to it",
                    names.join(", ")
                )
            };
            obs.problem(
                Outcome::Warn,
                ErrorClass::Policy,
                Phase::Resolve,
                format!("MX host {host} address {ip} {why} (no forward-confirmed reverse DNS)"),
            );
        }
    }
    obs.fact(&facts::mx::nth(i, facts::mx::field::PTR), pairs.join(","));
    obs.fact(&facts::mx::nth(i, facts::mx::field::FCRDNS), confirmed_all);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mxscope_proto::FactValue;

    use super::*;
    use crate::probe::testing::FakeResolver;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn reports_mx_set_with_numbers_as_numbers() {
        let r = FakeResolver::default()
            .mx(
                "example.test",
                &[(10, "mx1.example.test"), (20, "mx2.example.test")],
            )
            .ips("mx1.example.test", &["127.0.0.1", "::1"])
            .ips("mx2.example.test", &["127.0.0.2"])
            .ptr("127.0.0.1", &["mx1.example.test"])
            .ptr("::1", &["mx1.example.test"])
            .ptr("127.0.0.2", &["mx2.example.test"]);
        let o = check(&r, "example.test", 0, far()).await;
        assert_eq!(o.outcome, Outcome::Ok, "{}", o.message);
        assert_eq!(o.fact_of("mx.0.fcrdns"), Some(&FactValue::Flag(true)));
        assert_eq!(o.fact_of("mx.count"), Some(&FactValue::Int(2)));
        assert_eq!(o.fact_of("mx.ttl"), Some(&FactValue::Int(300)));
        assert_eq!(
            o.fact_of("mx.0.host"),
            Some(&FactValue::Text("mx1.example.test".into()))
        );
        assert_eq!(o.fact_of("mx.0.preference"), Some(&FactValue::Int(10)));
        assert_eq!(
            o.fact_of("mx.0.addrs"),
            Some(&FactValue::Text("127.0.0.1,::1".into()))
        );
        assert_eq!(o.fact_of("mx.0.ttl"), Some(&FactValue::Int(60)));
        assert_eq!(o.fact_of("mx.ipv6_count"), Some(&FactValue::Int(1)));
        assert!(o.timing_of(Phase::Resolve).is_some());
    }

    #[tokio::test]
    async fn mx_host_without_addresses_fails_naming_it() {
        let r = FakeResolver::default()
            .mx(
                "example.test",
                &[(10, "mx1.example.test"), (20, "bad.example.test")],
            )
            .ips("mx1.example.test", &["127.0.0.1"]);
        let o = check(&r, "example.test", 0, far()).await;
        assert_eq!(o.outcome, Outcome::Fail);
        assert_eq!(o.error_class, Some(ErrorClass::DnsNodata));
        assert_eq!(o.phase, Some(Phase::Resolve));
        assert!(o.message.contains("bad.example.test"), "{}", o.message);
    }

    #[tokio::test]
    async fn ptr_mismatch_cname_and_ip_literal_are_flagged() {
        let r = FakeResolver::default()
            .mx("example.test", &[(10, "mx1.example.test")])
            .ips("mx1.example.test", &["127.0.0.1"])
            .ips("other.test", &["127.0.0.9"])
            .ptr("127.0.0.1", &["other.test"]);
        let o = check(&r, "example.test", 0, far()).await;
        assert_eq!(o.outcome, Outcome::Warn);
        assert_eq!(o.error_class, Some(ErrorClass::Policy));
        assert_eq!(o.fact_of("mx.0.fcrdns"), Some(&FactValue::Flag(false)));
        assert_eq!(
            o.fact_of("mx.0.ptr"),
            Some(&FactValue::Text("127.0.0.1=other.test".into()))
        );

        let r = FakeResolver::default()
            .mx("example.test", &[(10, "alias.example.test")])
            .cname("alias.example.test", "real.example.test")
            .ips("alias.example.test", &["127.0.0.1"])
            .ptr("127.0.0.1", &["alias.example.test"]);
        let o = check(&r, "example.test", 0, far()).await;
        assert_eq!(o.outcome, Outcome::Warn, "{}", o.message);
        assert!(o.message.contains("CNAME"), "{}", o.message);

        let r = FakeResolver::default()
            .mx("example.test", &[(10, "127.0.0.1")])
            .fail("127.0.0.1", ErrorClass::DnsNxdomain);
        let o = check(&r, "example.test", 0, far()).await;
        assert_eq!(o.outcome, Outcome::Fail);
        assert_eq!(o.fact_of("mx.0.ip_literal"), Some(&FactValue::Flag(true)));
    }

    #[tokio::test]
    async fn nxdomain_and_implicit_mx() {
        let r = FakeResolver::default().fail("nx.test", ErrorClass::DnsNxdomain);
        let o = check(&r, "nx.test", 0, far()).await;
        assert_eq!(o.error_class, Some(ErrorClass::DnsNxdomain));
        let r = FakeResolver::default()
            .ips("plain.test", &["127.0.0.1"])
            .ptr("127.0.0.1", &["plain.test"]);
        let o = check(&r, "plain.test", 0, far()).await;
        assert_eq!(o.outcome, Outcome::Ok);
        assert_eq!(o.fact_of("mx.implicit"), Some(&FactValue::Flag(true)));
    }
}
