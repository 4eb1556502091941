//! Mail semantics for domain targets (RFC 5321 §5): a sender tries the MX hosts in preference
//! order and every address of each, so a domain receives mail from a region when at least one MX
//! host completes the dialogue there. Judges the port-25 (`smtp`) series of MX-expanded targets
//! per region, and names the MX hosts and addresses that fail while mail still flows. Pure.

use std::collections::{BTreeMap, BTreeSet};

use mxscope_proto::facts;

use super::diagnosis::SeriesView;
use super::scope::RegionState;

/// Checks judged as mail delivery on a domain: only port 25, where senders fail over between MX
/// hosts. Client services (submission, imap(s), pop3(s)) are judged per endpoint: a mail client is
/// configured with one host and does not move on to another when it fails.
pub fn judged_as_mail(check: &str) -> bool {
    check == "smtp"
}

/// The host and address of an endpoint label `host[ip]:port` (`host:port` when the name did
/// not resolve).
pub fn endpoint_parts(label: &str) -> (&str, Option<&str>) {
    match label.split_once('[') {
        Some((host, rest)) => (host, rest.split_once(']').map(|(ip, _)| ip)),
        None => (label.rsplit_once(':').map_or(label, |(h, _)| h), None),
    }
}

/// True when the view comes from the MX expansion of a domain (the agent records the MX
/// preference, the implicit MX or the null MX on such results).
pub fn via_mx(v: &SeriesView) -> bool {
    v.facts
        .iter()
        .any(|(k, value)| facts::address::marks_mx_expansion(k, value.parse::<bool>().ok()))
}

fn flag(v: &SeriesView, key: &str) -> bool {
    v.facts.get(key).is_some_and(|x| x == "true")
}

/// One MX host as one region sees it.
#[derive(Debug, Clone)]
pub struct HostView<'a> {
    pub name: &'a str,
    pub preference: Option<u16>,
    /// The domain has no MX and its own A/AAAA stand in.
    pub implicit: bool,
    /// Fresh series of the host's addresses (or its failed resolution), by address.
    pub addrs: Vec<&'a SeriesView>,
    /// At least one address completes the dialogue.
    pub works: bool,
}

impl HostView<'_> {
    /// Addresses of the host, as seen (`-` when it did not resolve).
    pub fn address_list(&self) -> String {
        let ips: Vec<&str> = self
            .addrs
            .iter()
            .filter_map(|v| endpoint_parts(&v.endpoint).1)
            .collect();
        if ips.is_empty() {
            "-".to_string()
        } else {
            ips.join(", ")
        }
    }

    /// `mx2.example.test (198.51.100.3, preference 20)`.
    pub fn describe(&self) -> String {
        let pref = match (self.preference, self.implicit) {
            (_, true) => ", implicit MX".to_string(),
            (Some(p), _) => format!(", preference {p}"),
            (None, _) => String::new(),
        };
        format!("{} ({}{pref})", self.name, self.address_list())
    }

    /// Addresses that fail while another address of the same host works.
    pub fn failing_addrs(&self) -> Vec<&SeriesView> {
        if !self.works {
            return Vec::new();
        }
        self.addrs
            .iter()
            .copied()
            .filter(|v| v.state == RegionState::Failing)
            .collect()
    }
}

/// The mail verdict of one (domain, check, region).
#[derive(Debug, Clone)]
pub struct RegionMail<'a> {
    pub region: &'a str,
    /// `Ok`: at least one MX host completes the dialogue (or null MX); `Failing`: none does;
    /// `AgentFault`: none does, and every failure is the agent's own network; `Stale`: no fresh
    /// data.
    pub state: RegionState,
    /// The domain publishes a null MX (RFC 7505): it accepts no mail, by design.
    pub null_mx: bool,
    /// MX hosts by preference (then name).
    pub hosts: Vec<HostView<'a>>,
}

impl RegionMail<'_> {
    /// Hosts that fail from this region while mail still flows through another.
    pub fn failing_hosts(&self) -> impl Iterator<Item = &HostView<'_>> {
        let flows = self.state == RegionState::Ok;
        self.hosts.iter().filter(move |h| flows && !h.works)
    }

    /// The preferred host that works, through which mail goes.
    pub fn delivering_host(&self) -> Option<&HostView<'_>> {
        self.hosts.iter().find(|h| h.works)
    }
}

/// The mail verdict of one region from its series of one (domain, check); `rows` are that
/// region's views (any state), `faults` the (agent, check) pairs at fault.
pub fn region_mail<'a>(
    region: &'a str,
    rows: &[&'a SeriesView],
    faults: &BTreeSet<(String, String)>,
) -> RegionMail<'a> {
    let fresh: Vec<&SeriesView> = rows
        .iter()
        .copied()
        .filter(|v| v.state != RegionState::Stale)
        .collect();
    let null_mx = fresh.iter().any(|v| flag(v, facts::mx::NULL));
    let mut by_host: BTreeMap<&str, HostView<'a>> = BTreeMap::new();
    for v in &fresh {
        let (name, _) = endpoint_parts(&v.endpoint);
        let h = by_host.entry(name).or_insert_with(|| HostView {
            name,
            preference: None,
            implicit: false,
            addrs: Vec::new(),
            works: false,
        });
        h.preference = h.preference.or_else(|| {
            v.facts
                .get(facts::mx::PREFERENCE)
                .and_then(|p| p.parse().ok())
        });
        h.implicit |= flag(v, facts::mx::IMPLICIT);
        h.works |= v.state == RegionState::Ok;
        h.addrs.push(v);
    }
    let mut hosts: Vec<HostView<'a>> = by_host.into_values().collect();
    hosts.sort_by_key(|h| (h.preference.unwrap_or(u16::MAX), h.name));
    let state = if fresh.is_empty() {
        RegionState::Stale
    } else if null_mx || hosts.iter().any(|h| h.works) {
        RegionState::Ok
    } else if fresh
        .iter()
        .all(|v| faults.contains(&(v.agent_id.clone(), v.check.clone())))
    {
        RegionState::AgentFault
    } else {
        RegionState::Failing
    };
    RegionMail {
        region,
        state,
        null_mx,
        hosts,
    }
}

/// True when the (target, check) of `rows` is judged as mail delivery: port 25 of a domain
/// expanded through its MX records.
pub fn is_mail_group(check: &str, rows: &[&SeriesView]) -> bool {
    judged_as_mail(check) && !rows.is_empty() && rows.iter().all(|v| via_mx(v))
}

/// The mail verdict per region of one (target, check) whose views are `rows`.
pub fn by_region<'a>(
    rows: &[&'a SeriesView],
    faults: &BTreeSet<(String, String)>,
) -> BTreeMap<&'a str, RegionMail<'a>> {
    let mut per: BTreeMap<&str, Vec<&SeriesView>> = BTreeMap::new();
    for v in rows {
        per.entry(v.region.as_str()).or_default().push(v);
    }
    per.into_iter()
        .map(|(region, rs)| (region, region_mail(region, &rs, faults)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn mx_row(
        target: &str,
        host: &str,
        ip: &str,
        pref: u16,
        region: &str,
        state: RegionState,
    ) -> SeriesView {
        let failing = state == RegionState::Failing;
        SeriesView {
            target: target.into(),
            endpoint: format!("{host}[{ip}]:25"),
            check: "smtp".into(),
            region: region.into(),
            agent_id: format!("agent-{region}"),
            state,
            outcome: if failing { "fail" } else { "ok" }.into(),
            error_class: failing.then(|| "refused".to_string()),
            phase: failing.then(|| "connect".to_string()),
            message: String::new(),
            facts: [(facts::mx::PREFERENCE.to_string(), pref.to_string())]
                .into_iter()
                .collect(),
            canary: false,
        }
    }

    use RegionState::{Failing, Ok as Fine, Stale};

    #[test]
    fn endpoint_labels_split_into_host_and_address() {
        assert_eq!(
            endpoint_parts("mx.example.test[198.18.0.2]:25"),
            ("mx.example.test", Some("198.18.0.2"))
        );
        assert_eq!(
            endpoint_parts("mx.example.test[2001:db8::1]:25"),
            ("mx.example.test", Some("2001:db8::1"))
        );
        assert_eq!(
            endpoint_parts("mx.example.test:25"),
            ("mx.example.test", None)
        );
        assert_eq!(endpoint_parts("example.test"), ("example.test", None));
    }

    #[test]
    fn one_working_mx_host_is_enough_for_mail_to_flow() {
        let rows = [
            mx_row("d.test", "mx1.d.test", "198.18.0.2", 10, "eu", Fine),
            mx_row("d.test", "mx2.d.test", "198.18.0.3", 20, "eu", Failing),
        ];
        let refs: Vec<&SeriesView> = rows.iter().collect();
        let m = region_mail("eu", &refs, &BTreeSet::new());
        assert_eq!(m.state, Fine);
        let failing: Vec<String> = m.failing_hosts().map(|h| h.describe()).collect();
        assert_eq!(failing, vec!["mx2.d.test (198.18.0.3, preference 20)"]);
        assert_eq!(m.delivering_host().map(|h| h.name), Some("mx1.d.test"));

        // The primary failing, the backup working: mail flows through the backup.
        let rows = [
            mx_row("d.test", "mx1.d.test", "198.18.0.2", 10, "eu", Failing),
            mx_row("d.test", "mx2.d.test", "198.18.0.3", 20, "eu", Fine),
        ];
        let refs: Vec<&SeriesView> = rows.iter().collect();
        let m = region_mail("eu", &refs, &BTreeSet::new());
        assert_eq!(m.state, Fine);
        assert_eq!(m.hosts[0].name, "mx1.d.test", "by preference");
        assert_eq!(m.delivering_host().map(|h| h.name), Some("mx2.d.test"));
    }

    #[test]
    fn no_working_mx_host_fails_unless_it_is_the_agents_network_or_stale() {
        let rows = [
            mx_row("d.test", "mx1.d.test", "198.18.0.2", 10, "ap", Failing),
            mx_row("d.test", "mx2.d.test", "198.18.0.3", 20, "ap", Failing),
        ];
        let refs: Vec<&SeriesView> = rows.iter().collect();
        assert_eq!(region_mail("ap", &refs, &BTreeSet::new()).state, Failing);
        let faults = [("agent-ap".to_string(), "smtp".to_string())]
            .into_iter()
            .collect();
        assert_eq!(
            region_mail("ap", &refs, &faults).state,
            RegionState::AgentFault
        );
        let stale = [mx_row(
            "d.test",
            "mx1.d.test",
            "198.18.0.2",
            10,
            "ap",
            Stale,
        )];
        let refs: Vec<&SeriesView> = stale.iter().collect();
        assert_eq!(region_mail("ap", &refs, &BTreeSet::new()).state, Stale);
    }

    #[test]
    fn a_working_host_with_a_failing_address_keeps_mail_flowing_and_names_the_address() {
        let rows = [
            mx_row("d.test", "mx1.d.test", "198.18.0.2", 10, "eu", Fine),
            mx_row("d.test", "mx1.d.test", "2001:db8::2", 10, "eu", Failing),
        ];
        let refs: Vec<&SeriesView> = rows.iter().collect();
        let m = region_mail("eu", &refs, &BTreeSet::new());
        assert_eq!(m.state, Fine);
        assert_eq!(m.failing_hosts().count(), 0);
        let bad: Vec<&str> = m.hosts[0]
            .failing_addrs()
            .iter()
            .map(|v| v.endpoint.as_str())
            .collect();
        assert_eq!(bad, vec!["mx1.d.test[2001:db8::2]:25"]);
    }

    #[test]
    fn null_mx_accepts_no_mail_by_design_and_is_not_a_failure() {
        let mut null = mx_row("d.test", "d.test", "", 0, "eu", Failing);
        null.endpoint = "d.test:25".into();
        null.facts = [(facts::mx::NULL.to_string(), "true".to_string())]
            .into_iter()
            .collect();
        let refs = vec![&null];
        assert!(is_mail_group("smtp", &refs));
        let m = region_mail("eu", &refs, &BTreeSet::new());
        assert_eq!((m.state, m.null_mx), (Fine, true));
    }

    #[test]
    fn only_port_25_of_mx_expanded_targets_is_judged_as_mail() {
        let a = mx_row("d.test", "mx1.d.test", "198.18.0.2", 10, "eu", Fine);
        assert!(is_mail_group("smtp", &[&a]));
        assert!(!is_mail_group("submission", &[&a]));
        let mut host = a.clone();
        host.facts.clear();
        assert!(!is_mail_group("smtp", &[&a, &host]), "a host target");
        assert!(!is_mail_group("smtp", &[]));
    }
}
