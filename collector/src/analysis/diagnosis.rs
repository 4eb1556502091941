//! Diagnosis: walks the layers DNS → network → TLS → protocol → policy over the latest view of every
//! (endpoint, check, region) of a target and names the first layer that fails, where (everywhere,
//! some regions, or one agent's own network) and the evidence. Pure: rows in, findings out.

use std::collections::{BTreeMap, BTreeSet};

use mxscope_proto::facts;

use super::scope::RegionState;

/// The layers in the order a mail operator checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer {
    Dns,
    Network,
    Tls,
    Protocol,
    Policy,
}

impl Layer {
    pub fn name(self) -> &'static str {
        match self {
            Layer::Dns => "dns",
            Layer::Network => "network",
            Layer::Tls => "tls",
            Layer::Protocol => "protocol",
            Layer::Policy => "policy",
        }
    }
}

/// What the collector knows now of one (target, endpoint, check, region).
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesView {
    pub target: String,
    pub endpoint: String,
    pub check: String,
    pub region: String,
    pub agent_id: String,
    /// Ok / Failing (after hysteresis) / Stale.
    pub state: RegionState,
    /// The latest result's outcome: ok, warn or fail.
    pub outcome: String,
    pub error_class: Option<String>,
    pub phase: Option<String>,
    pub message: String,
    /// The latest result's facts, as text.
    pub facts: BTreeMap<String, String>,
    /// The target is a reference mail server (label `canary=true`) that should always work.
    pub canary: bool,
}

/// One finding of a diagnosis.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub layer: Option<Layer>,
    /// `fail` or `warn`.
    pub severity: &'static str,
    /// `everywhere`, `regions`, `agent` or `none`.
    pub scope: &'static str,
    pub regions: Vec<String>,
    pub check: String,
    pub summary: String,
    pub evidence: Vec<String>,
}

/// The layer an error class (seen in `phase` of a `check`) belongs to.
pub fn layer_of(check: &str, error_class: &str, phase: Option<&str>) -> Layer {
    match error_class {
        c if c.starts_with("dns_") => Layer::Dns,
        "refused" | "reset" | "unreachable" | "not_permitted" => Layer::Network,
        // A timeout before the connection stands is the path; after it, the server.
        "timeout" if matches!(phase, None | Some("connect" | "resolve" | "echo")) => Layer::Network,
        "tls_handshake" | "cert_expired" | "cert_untrusted" | "cert_name" | "cert_expiring"
        | "no_starttls" => Layer::Tls,
        "policy" => Layer::Policy,
        _ if matches!(
            check,
            "spf" | "dmarc" | "dkim" | "mta-sts" | "tlsrpt" | "dane" | "dnsbl"
        ) =>
        {
            Layer::Policy
        }
        _ => Layer::Protocol,
    }
}

/// (agent, check) pairs whose failures are the agent's own network: the agent fails the check on
/// at least two targets and on most of its targets, while other agents succeed on most of those;
/// or the agent fails the check on a canary target (a reference server) that another agent
/// reaches fine, which tells it early, from one target.
pub fn agent_faults(rows: &[SeriesView]) -> BTreeSet<(String, String)> {
    /// Targets an agent probes with a check, and those failing.
    #[derive(Default)]
    struct Seen<'a> {
        probed: BTreeSet<&'a str>,
        failing: BTreeSet<&'a str>,
    }
    let mut per_agent: BTreeMap<(&str, &str), Seen<'_>> = BTreeMap::new();
    // (target, check) -> agents with an ok view
    let mut ok_by: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.state != RegionState::Stale) {
        let e = per_agent.entry((&r.agent_id, &r.check)).or_default();
        e.probed.insert(&r.target);
        if r.state == RegionState::Failing {
            e.failing.insert(&r.target);
        } else {
            ok_by
                .entry((&r.target, &r.check))
                .or_default()
                .insert(&r.agent_id);
        }
    }
    let mut faults = BTreeSet::new();
    for r in rows
        .iter()
        .filter(|r| r.canary && r.state == RegionState::Failing)
    {
        let others_ok = ok_by
            .get(&(r.target.as_str(), r.check.as_str()))
            .is_some_and(|a| a.iter().any(|a| *a != r.agent_id));
        if others_ok {
            faults.insert((r.agent_id.clone(), r.check.clone()));
        }
    }
    for ((agent, check), Seen { probed, failing }) in per_agent {
        if failing.len() < 2 || failing.len() * 2 <= probed.len() {
            continue;
        }
        let others_ok = failing
            .iter()
            .filter(|t| {
                ok_by
                    .get(&(**t, check))
                    .is_some_and(|a| a.iter().any(|a| *a != agent))
            })
            .count();
        if others_ok * 2 > failing.len() {
            faults.insert((agent.to_string(), check.to_string()));
        }
    }
    faults
}

fn evidence_of(r: &SeriesView) -> String {
    let mut s = format!(
        "{} {} {}: {}",
        r.region,
        r.check,
        r.endpoint,
        r.error_class.as_deref().unwrap_or("-")
    );
    if let Some(p) = &r.phase {
        s.push_str(&format!(" in {p}"));
    }
    if !r.message.is_empty() {
        s.push_str(&format!(": {}", r.message));
    }
    // The last SMTP reply the dialogue got: RCPT TO, else MAIL FROM, else the banner.
    let code = [
        facts::smtp::step(facts::smtp::RCPT, facts::smtp::field::CODE),
        facts::smtp::step(facts::smtp::MAIL, facts::smtp::field::CODE),
        facts::smtp::BANNER_CODE.to_string(),
    ]
    .iter()
    .find_map(|k| r.facts.get(k));
    if let Some(code) = code {
        s.push_str(&format!(" (reply {code})"));
    }
    if let Some(na) = r.facts.get(facts::cert::NOT_AFTER) {
        let days = r
            .facts
            .get(facts::cert::DAYS_LEFT)
            .map(|d| format!(", {d} days left"))
            .unwrap_or_default();
        s.push_str(&format!(" [certificate not after {na}{days}]"));
    }
    s
}

/// Diagnoses one target from the views of all its series (other targets' rows are used only to
/// tell agent faults). Findings come worst first: failures before warnings, then by layer.
pub fn diagnose(
    target: &str,
    rows: &[SeriesView],
    faults: &BTreeSet<(String, String)>,
) -> Vec<Finding> {
    let mine: Vec<&SeriesView> = rows.iter().filter(|r| r.target == target).collect();
    let mut findings = Vec::new();
    // (severity rank, layer, check) -> problem rows
    let mut groups: BTreeMap<(u8, Layer, &str), Vec<&SeriesView>> = BTreeMap::new();
    let mut agent_groups: BTreeMap<(&str, &str), Vec<&SeriesView>> = BTreeMap::new();
    for r in &mine {
        let fault = faults.contains(&(r.agent_id.clone(), r.check.clone()));
        let severity = match (r.state, r.outcome.as_str()) {
            (RegionState::Failing, _) => 0,
            (RegionState::Ok, "warn") => 1,
            _ => continue,
        };
        let Some(class) = r.error_class.as_deref() else {
            continue;
        };
        if fault && severity == 0 {
            agent_groups
                .entry((&r.agent_id, &r.check))
                .or_default()
                .push(r);
            continue;
        }
        let layer = layer_of(&r.check, class, r.phase.as_deref());
        groups
            .entry((severity, layer, &r.check))
            .or_default()
            .push(r);
    }
    for ((severity, layer, check), problems) in groups {
        let regions: BTreeSet<&str> = problems.iter().map(|r| r.region.as_str()).collect();
        let fresh: BTreeSet<&str> = mine
            .iter()
            .filter(|r| r.check == check && r.state != RegionState::Stale)
            .filter(|r| !faults.contains(&(r.agent_id.clone(), r.check.clone())))
            .map(|r| r.region.as_str())
            .collect();
        let everywhere = regions.is_superset(&fresh);
        let classes: BTreeSet<&str> = problems
            .iter()
            .filter_map(|r| r.error_class.as_deref())
            .collect();
        let classes: Vec<&str> = classes.into_iter().collect();
        // The other fresh regions are fine only if they do not fail this check some other way
        // (e.g. still refused while one region already sees a new certificate).
        let failing_otherwise: BTreeSet<&str> = mine
            .iter()
            .filter(|r| r.check == check && r.state == RegionState::Failing)
            .map(|r| r.region.as_str())
            .filter(|r| fresh.contains(r) && !regions.contains(r))
            .collect();
        let where_ = if everywhere {
            "seen from every region".to_string()
        } else {
            let list = |set: &BTreeSet<&str>| set.iter().copied().collect::<Vec<_>>().join(", ");
            let fine: BTreeSet<&str> = fresh
                .difference(&regions)
                .copied()
                .filter(|r| !failing_otherwise.contains(r))
                .collect();
            let mut s = format!("only from {}", list(&regions));
            if !fine.is_empty() {
                s.push_str(&format!(" (fine from {})", list(&fine)));
            }
            if !failing_otherwise.is_empty() {
                s.push_str(&format!(" ({} fail otherwise)", list(&failing_otherwise)));
            }
            s
        };
        findings.push(Finding {
            layer: Some(layer),
            severity: if severity == 0 { "fail" } else { "warn" },
            scope: if everywhere { "everywhere" } else { "regions" },
            regions: regions.iter().map(|r| r.to_string()).collect(),
            check: check.to_string(),
            summary: format!("{check}: {} {}, {where_}", layer.name(), classes.join("/")),
            evidence: problems.iter().map(|r| evidence_of(r)).collect(),
        });
    }
    for ((agent, check), problems) in agent_groups {
        let regions: BTreeSet<String> = problems.iter().map(|r| r.region.clone()).collect();
        findings.push(Finding {
            layer: problems
                .first()
                .and_then(|r| r.error_class.as_deref().map(|c| layer_of(check, c, r.phase.as_deref()))),
            severity: "fail",
            scope: "agent",
            regions: regions.into_iter().collect(),
            check: check.to_string(),
            summary: format!(
                "{check}: agent {agent} fails this check on most of its targets while other agents succeed: \
                 its own network (e.g. a provider blocking the port), not counted against {target}"
            ),
            evidence: problems.iter().map(|r| evidence_of(r)).collect(),
        });
    }
    findings.extend(consistency(&mine));
    findings.sort_by_key(|f| (f.severity != "fail", f.scope == "agent", f.layer));
    if findings.is_empty() {
        findings.push(Finding {
            layer: None,
            severity: "ok",
            scope: "none",
            regions: Vec::new(),
            check: String::new(),
            summary: if mine.is_empty() {
                format!("no data for {target}")
            } else {
                "every check passes in every region".to_string()
            },
            evidence: Vec::new(),
        });
    }
    findings
}

/// The MX set an `mx` result saw, from its `mx.N.preference`/`mx.N.host`/`mx.N.addrs` facts:
/// `10 mx1.example.test (198.18.0.2); 20 mx2.example.test (198.18.0.3)`.
pub fn mx_set(seen: &BTreeMap<String, String>) -> Option<String> {
    let mut entries = Vec::new();
    for i in 0.. {
        let Some(host) = seen.get(&facts::mx::nth(i, facts::mx::field::HOST)) else {
            break;
        };
        let pref = seen
            .get(&facts::mx::nth(i, facts::mx::field::PREFERENCE))
            .map_or("?", |p| p.as_str());
        let addrs = seen
            .get(&facts::mx::nth(i, facts::mx::field::ADDRS))
            .map_or("", |a| a.as_str());
        let mut addrs: Vec<&str> = addrs.split(',').filter(|a| !a.is_empty()).collect();
        addrs.sort_unstable();
        entries.push(format!("{pref} {host} ({})", addrs.join(", ")));
    }
    entries.sort();
    (!entries.is_empty()).then(|| entries.join("; "))
}

/// Regions that see different MX sets, and endpoints or regions presenting different certificates.
pub fn consistency(rows: &[&SeriesView]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut mx_sets: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r.check == "mx" && r.state != RegionState::Stale)
    {
        if let Some(set) = mx_set(&r.facts) {
            mx_sets.entry(set).or_default().insert(&r.region);
        }
    }
    if mx_sets.len() > 1 {
        let (regions, evidence): (BTreeSet<String>, Vec<String>) = {
            let mut regs = BTreeSet::new();
            let ev = mx_sets
                .iter()
                .map(|(set, rs)| {
                    regs.extend(rs.iter().map(|r| r.to_string()));
                    format!(
                        "{} see MX {set}",
                        rs.iter().copied().collect::<Vec<_>>().join(", ")
                    )
                })
                .collect();
            (regs, ev)
        };
        out.push(Finding {
            layer: Some(Layer::Dns),
            severity: "warn",
            scope: "regions",
            regions: regions.into_iter().collect(),
            check: "mx".into(),
            summary: "regions see different MX sets (split horizon or propagation)".into(),
            evidence,
        });
    }
    // check -> certificate identity -> where seen
    let mut certs: BTreeMap<&str, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.state != RegionState::Stale) {
        let id = r.facts.get(facts::cert::SHA256).cloned().or_else(|| {
            let na = r.facts.get(facts::cert::NOT_AFTER)?;
            Some(format!(
                "{} until {na}",
                r.facts
                    .get(facts::cert::SUBJECT)
                    .map_or("?", |s| s.as_str())
            ))
        });
        if let Some(id) = id {
            certs
                .entry(&r.check)
                .or_default()
                .entry(id)
                .or_default()
                .insert(format!("{} {}", r.region, r.endpoint));
        }
    }
    for (check, ids) in certs.into_iter().filter(|(_, ids)| ids.len() > 1) {
        let regions: BTreeSet<String> = ids
            .values()
            .flatten()
            .filter_map(|w| w.split_once(' ').map(|(r, _)| r.to_string()))
            .collect();
        out.push(Finding {
            layer: Some(Layer::Tls),
            severity: "warn",
            scope: "regions",
            regions: regions.into_iter().collect(),
            check: check.to_string(),
            summary: format!("{check}: addresses or regions present different certificates"),
            evidence: ids
                .iter()
                .map(|(id, seen)| {
                    format!(
                        "{id}: {}",
                        seen.iter().cloned().collect::<Vec<_>>().join(", ")
                    )
                })
                .collect(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        target: &str,
        check: &str,
        region: &str,
        state: RegionState,
        class: Option<&str>,
    ) -> SeriesView {
        SeriesView {
            target: target.into(),
            endpoint: format!("mx.{target}[198.18.0.2]"),
            check: check.into(),
            region: region.into(),
            agent_id: format!("agent-{region}"),
            state,
            outcome: if state == RegionState::Failing {
                "fail"
            } else {
                "ok"
            }
            .into(),
            error_class: class.map(String::from),
            phase: class.map(|_| "connect".to_string()),
            message: String::new(),
            facts: BTreeMap::new(),
            canary: false,
        }
    }

    use RegionState::{Failing, Ok as Fine, Stale};

    #[test]
    fn port_block_in_one_region_is_network_there_only() {
        let rows = vec![
            row("lab.test", "smtp", "eu-west", Fine, None),
            row("lab.test", "smtp", "us-east", Fine, None),
            row("lab.test", "smtp", "ap-south", Failing, Some("timeout")),
            row("lab.test", "submission", "ap-south", Fine, None),
        ];
        let f = diagnose("lab.test", &rows, &agent_faults(&rows));
        assert!(!f.is_empty());
        assert_eq!(f[0].layer, Some(Layer::Network));
        assert_eq!(f[0].scope, "regions");
        assert_eq!(f[0].regions, vec!["ap-south".to_string()]);
        assert_eq!(f[0].check, "smtp");
        assert!(
            f[0].summary.contains("only from ap-south"),
            "{}",
            f[0].summary
        );
        assert_eq!(f.len(), 1, "submission is fine: {f:?}");
    }

    #[test]
    fn evidence_names_the_last_smtp_reply_the_agent_recorded() {
        let mut r = row("t.test", "smtp", "eu-west", Failing, Some("reply_5xx"));
        r.facts
            .insert(facts::smtp::BANNER_CODE.into(), "220".into());
        assert!(
            evidence_of(&r).ends_with("(reply 220)"),
            "{}",
            evidence_of(&r)
        );
        r.facts.insert(
            facts::smtp::step(facts::smtp::MAIL, facts::smtp::field::CODE),
            "250".into(),
        );
        assert!(
            evidence_of(&r).ends_with("(reply 250)"),
            "{}",
            evidence_of(&r)
        );
        r.facts.insert(
            facts::smtp::step(facts::smtp::RCPT, facts::smtp::field::CODE),
            "550".into(),
        );
        assert!(
            evidence_of(&r).ends_with("(reply 550)"),
            "{}",
            evidence_of(&r)
        );
        let plain = row("t.test", "smtp", "eu-west", Failing, Some("timeout"));
        assert!(!evidence_of(&plain).contains("reply"));
    }

    #[test]
    fn first_failing_layer_comes_first_and_everywhere_is_said() {
        let mut expired = row("t.test", "imaps", "eu-west", Failing, Some("cert_expired"));
        expired.phase = Some("tls".into());
        expired
            .facts
            .insert(facts::cert::NOT_AFTER.into(), "2026-10-01T00:00:00Z".into());
        let mut expired2 = expired.clone();
        expired2.region = "us-east".into();
        expired2.agent_id = "agent-us-east".into();
        let rows = vec![
            expired,
            expired2,
            row("t.test", "imap", "eu-west", Failing, Some("refused")),
            row("t.test", "imap", "us-east", Failing, Some("refused")),
        ];
        let f = diagnose("t.test", &rows, &BTreeSet::new());
        assert_eq!(f[0].layer, Some(Layer::Network));
        assert_eq!(f[0].scope, "everywhere");
        assert_eq!(f[1].layer, Some(Layer::Tls));
        assert!(
            f[1].evidence.iter().all(|e| e.contains("2026-10-01")),
            "{:?}",
            f[1].evidence
        );
    }

    #[test]
    fn regions_failing_another_way_are_not_called_fine() {
        // Dovecot came back with an expired certificate: eu-west has probed it already, the
        // others still see the refused connection from before.
        let mut expired = row("t.test", "imaps", "eu-west", Failing, Some("cert_expired"));
        expired.phase = Some("tls".into());
        let rows = vec![
            expired,
            row("t.test", "imaps", "us-east", Failing, Some("refused")),
            row("t.test", "imaps", "ap-south", Failing, Some("refused")),
            row("t.test", "imaps", "sa-east", Fine, None),
        ];
        let f = diagnose("t.test", &rows, &BTreeSet::new());
        let tls = f
            .iter()
            .find(|f| f.layer == Some(Layer::Tls))
            .expect("tls finding");
        assert_eq!(tls.scope, "regions");
        assert_eq!(
            tls.summary,
            "imaps: tls cert_expired, only from eu-west (fine from sa-east) \
             (ap-south, us-east fail otherwise)"
        );
        let net = f
            .iter()
            .find(|f| f.layer == Some(Layer::Network))
            .expect("network finding");
        assert_eq!(
            net.summary,
            "imaps: network refused, only from ap-south, us-east (fine from sa-east) \
             (eu-west fail otherwise)"
        );
    }

    #[test]
    fn agent_blocking_port_is_the_agents_fault() {
        let mut rows = Vec::new();
        for t in ["a.test", "b.test", "c.test"] {
            rows.push(row(t, "smtp", "eu-west", Fine, None));
            rows.push(row(t, "smtp", "us-east", Fine, None));
            rows.push(row(t, "smtp", "ap-south", Failing, Some("timeout")));
        }
        let faults = agent_faults(&rows);
        assert_eq!(faults.len(), 1);
        assert!(faults.contains(&("agent-ap-south".to_string(), "smtp".to_string())));
        let f = diagnose("b.test", &rows, &faults);
        assert_eq!(f[0].scope, "agent");
        assert_eq!(f[0].regions, vec!["ap-south".to_string()]);
        // One failing target is not enough to blame the agent.
        let one: Vec<_> = rows
            .iter()
            .filter(|r| r.target == "a.test")
            .cloned()
            .collect();
        assert!(agent_faults(&one).is_empty());
    }

    #[test]
    fn failing_canary_blames_the_agent_from_one_target() {
        let mut rows = Vec::new();
        for region in ["eu-west", "us-east", "ap-south"] {
            let state = if region == "ap-south" { Failing } else { Fine };
            let mut c = row(
                "canary.test",
                "smtp",
                region,
                state,
                (state == Failing).then_some("timeout"),
            );
            c.canary = true;
            rows.push(c);
        }
        // The same agent fails one ordinary target too: not enough without the canary.
        rows.push(row("a.test", "smtp", "ap-south", Failing, Some("timeout")));
        rows.push(row("a.test", "smtp", "eu-west", Fine, None));
        // ... while it reaches its other targets: no majority of failing targets.
        for t in ["b.test", "c.test"] {
            rows.push(row(t, "smtp", "ap-south", Fine, None));
        }
        let faults = agent_faults(&rows);
        assert_eq!(
            faults.into_iter().collect::<Vec<_>>(),
            vec![("agent-ap-south".to_string(), "smtp".to_string())]
        );
        let f = diagnose("a.test", &rows, &agent_faults(&rows));
        assert_eq!(f[0].scope, "agent");
        // Without the canary label the single failing target is the target's problem.
        for r in &mut rows {
            r.canary = false;
        }
        assert!(agent_faults(&rows).is_empty());
        // A canary failing everywhere is not any one agent's fault.
        let everywhere: Vec<_> = ["eu-west", "us-east"]
            .iter()
            .map(|region| {
                let mut c = row("canary.test", "smtp", region, Failing, Some("timeout"));
                c.canary = true;
                c
            })
            .collect();
        assert!(agent_faults(&everywhere).is_empty());
    }

    #[test]
    fn differing_mx_sets_and_certificates_are_reported() {
        let mut a = row("t.test", "mx", "eu-west", Fine, None);
        a.facts.insert(
            facts::mx::nth(0, facts::mx::field::HOST),
            "mx1.t.test".into(),
        );
        a.facts
            .insert(facts::mx::nth(0, facts::mx::field::PREFERENCE), "10".into());
        a.facts.insert(
            facts::mx::nth(0, facts::mx::field::ADDRS),
            "198.18.0.3,198.18.0.2".into(),
        );
        let mut b = a.clone();
        b.region = "us-east".into();
        b.agent_id = "agent-us-east".into();
        assert_eq!(
            mx_set(&a.facts).as_deref(),
            Some("10 mx1.t.test (198.18.0.2, 198.18.0.3)")
        );
        assert!(diagnose("t.test", &[a.clone(), b.clone()], &BTreeSet::new())[0].scope == "none");
        b.facts.insert(
            facts::mx::nth(0, facts::mx::field::ADDRS),
            "198.18.0.9".into(),
        );
        let mut c = row("t.test", "smtp", "eu-west", Fine, None);
        c.facts.insert(facts::cert::SHA256.into(), "aa".into());
        let mut d = row("t.test", "smtp", "us-east", Fine, None);
        d.facts.insert(facts::cert::SHA256.into(), "bb".into());
        let f = diagnose("t.test", &[a, b, c, d], &BTreeSet::new());
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f
            .iter()
            .any(|f| f.layer == Some(Layer::Dns) && f.summary.contains("different MX")));
        assert!(f
            .iter()
            .any(|f| f.layer == Some(Layer::Tls) && f.summary.contains("different certificates")));
    }

    #[test]
    fn healthy_and_unknown_targets() {
        let rows = vec![
            row("t.test", "smtp", "eu-west", Fine, None),
            row("t.test", "smtp", "x", Stale, None),
        ];
        assert_eq!(diagnose("t.test", &rows, &BTreeSet::new())[0].scope, "none");
        assert!(diagnose("u.test", &rows, &BTreeSet::new())[0]
            .summary
            .contains("no data"));
    }

    #[test]
    fn layers() {
        assert_eq!(layer_of("mx", "dns_nxdomain", None), Layer::Dns);
        assert_eq!(layer_of("smtp", "timeout", Some("connect")), Layer::Network);
        assert_eq!(layer_of("smtp", "timeout", Some("banner")), Layer::Protocol);
        assert_eq!(layer_of("smtp", "cert_name", Some("tls")), Layer::Tls);
        assert_eq!(layer_of("smtp", "reply_4xx", Some("ehlo")), Layer::Protocol);
        assert_eq!(layer_of("spf", "protocol", None), Layer::Policy);
    }
}
