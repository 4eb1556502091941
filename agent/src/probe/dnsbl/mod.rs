//! The `dnsbl` check: every MX address looked up in each configured blocklist zone (reverse-octet
//! query): listed (with the list's TXT reason), not listed, or an error of the list itself.

pub(crate) mod parse;

use mxscope_proto::{facts, CheckKind, Endpoint, ErrorClass, Observation, Outcome, Phase};
use tokio::time::Instant;

use self::parse::{classify_answer, reverse_query_name, DnsblAnswer};
use super::endpoints::{bounded, expand, Fanout};
use super::records::txt_or_empty;
use super::resolve::Resolve;
use super::CheckSpec;

/// Runs `dnsbl` for `spec.target` against `spec.options.dnsbl_zones`.
pub(crate) async fn check(
    spec: &CheckSpec,
    resolver: &dyn Resolve,
    fanout: Fanout,
    start_us: i64,
    deadline: Instant,
) -> Observation {
    let mut obs = Observation::new(
        &spec.target,
        Endpoint::host(&spec.target),
        CheckKind::Dnsbl,
        start_us,
    );
    let started = Instant::now();
    let zones = &spec.options.dnsbl_zones;
    obs.fact(facts::dnsbl::ZONES, zones.len());
    if zones.is_empty() {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Total,
            "no blocklist zones configured (dnsbl_zones in the target)",
        );
        return obs;
    }
    let expansion = expand(resolver, &spec.target, spec.kind, fanout, deadline).await;
    expansion.note_caps(&mut obs);
    for f in &expansion.failures {
        obs.problem(Outcome::Fail, f.class, Phase::Resolve, f.message.clone());
    }
    let mut ips: Vec<_> = expansion.addrs.iter().map(|a| a.ip).collect();
    ips.sort();
    ips.dedup();
    obs.fact(facts::dnsbl::ADDRESSES, ips.len());
    let (mut listed, mut errors) = (0usize, 0usize);
    for ip in &ips {
        for zone in zones {
            let zone = zone.trim_matches('.');
            let name = reverse_query_name(*ip, zone);
            let key = facts::dnsbl::entry(zone, &ip.to_string());
            let detail = |field| facts::dnsbl::listing(zone, &ip.to_string(), field);
            let answer = match bounded(&name, deadline, resolver.ips(&name)).await {
                Ok(a) => classify_answer(&a.records),
                Err(e) if e.class == ErrorClass::DnsNxdomain => DnsblAnswer::NotListed,
                Err(e) => {
                    errors += 1;
                    obs.fact(&key, "error");
                    obs.fact(&detail(facts::dnsbl::field::ERROR), e.class.name());
                    obs.problem(
                        Outcome::Warn,
                        e.class,
                        Phase::Resolve,
                        format!("blocklist {zone} could not be asked about {ip}: {e}"),
                    );
                    continue;
                }
            };
            match answer {
                DnsblAnswer::NotListed => {
                    obs.fact(&key, "not_listed");
                }
                DnsblAnswer::Listed { codes } => {
                    listed += 1;
                    let codes: Vec<String> = codes.iter().map(ToString::to_string).collect();
                    obs.fact(&key, "listed");
                    obs.fact(&detail(facts::dnsbl::field::CODES), codes.join(","));
                    let reason = match txt_or_empty(resolver, &name, deadline).await {
                        Ok(t) if !t.is_empty() => t.join(" "),
                        _ => String::new(),
                    };
                    if !reason.is_empty() {
                        obs.fact(&detail(facts::dnsbl::field::REASON), reason.as_str());
                    }
                    obs.problem(
                        Outcome::Fail,
                        ErrorClass::Policy,
                        Phase::Resolve,
                        if reason.is_empty() {
                            format!("{ip} is listed in {zone} ({})", codes.join(","))
                        } else {
                            format!("{ip} is listed in {zone} ({}): {reason}", codes.join(","))
                        },
                    );
                }
                DnsblAnswer::ListError { kind, answer } => {
                    errors += 1;
                    obs.fact(&key, "error");
                    obs.fact(&detail(facts::dnsbl::field::ANSWER), answer.to_string());
                    obs.problem(
                        Outcome::Warn,
                        ErrorClass::Policy,
                        Phase::Resolve,
                        format!(
                            "blocklist {zone} answered {answer} for {ip}: an error of the list ({kind:?}), not a listing"
                        ),
                    );
                }
            }
        }
    }
    obs.fact(facts::dnsbl::LISTED, listed)
        .fact(facts::dnsbl::ERRORS, errors);
    obs.timing(Phase::Resolve, started.elapsed());
    obs
}
