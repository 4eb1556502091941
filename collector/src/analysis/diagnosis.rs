//! Diagnosis of one target from the latest view of every (endpoint, check, region): root causes
//! first (from [`super::roots`], the agent's own network) with the findings they explain, then the
//! symptoms by layer (DNS → network → TLS → protocol → policy), mail flow and redundancy for port
//! 25 of a domain; and the paragraph that sums it up. Pure: rows in, findings out.

use std::collections::{BTreeMap, BTreeSet};

use mxscope_proto::facts;

use super::mail::{self, RegionMail};
use super::roots::{self, Root};
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
    /// `everywhere`, `regions`, `agent`, `stale` or `none`.
    pub scope: &'static str,
    pub regions: Vec<String>,
    pub check: String,
    pub summary: String,
    pub evidence: Vec<String>,
    /// What was recognised (see the wire `Finding.kind`).
    pub kind: &'static str,
    /// Index of the root finding that explains this one.
    pub caused_by: Option<usize>,
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
    // (agent, check, target) -> (some view ok, some view failing, every view via MX)
    let mut per_target: BTreeMap<(&str, &str, &str), (bool, bool, bool)> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.state != RegionState::Stale) {
        let e = per_target
            .entry((&r.agent_id, &r.check, &r.target))
            .or_insert((false, false, true));
        e.0 |= r.state != RegionState::Failing;
        e.1 |= r.state == RegionState::Failing;
        e.2 &= mail::via_mx(r);
        if r.state != RegionState::Failing {
            ok_by
                .entry((&r.target, &r.check))
                .or_default()
                .insert(&r.agent_id);
        }
    }
    for ((agent, check, target), (ok, failing, via_mx)) in per_target {
        let e = per_agent.entry((agent, check)).or_default();
        e.probed.insert(target);
        // Port 25 of a domain fails for an agent only when no MX host works from it.
        let mail = via_mx && mail::judged_as_mail(check);
        if failing && !(mail && ok) {
            e.failing.insert(target);
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
/// tell agent faults). See [`diagnose_rows`].
pub fn diagnose(
    target: &str,
    rows: &[SeriesView],
    faults: &BTreeSet<(String, String)>,
) -> Vec<Finding> {
    let mine: Vec<&SeriesView> = rows.iter().filter(|r| r.target == target).collect();
    diagnose_rows(target, &mine, faults)
}

/// A problem row: a fresh series failing after hysteresis (severity 0) or warning (1).
struct Problem<'a> {
    row: &'a SeriesView,
    severity: u8,
    layer: Layer,
}

/// Diagnoses one target from its own views (`mine`). Root causes come first, each followed by
/// the findings it explains (`caused_by` = the root's index): a region's different DNS answers,
/// its altered SMTP dialogue, a certificate of another issuer, its agent's own network. The
/// rest are symptoms: for port 25 of a domain, where mail does not flow (`mail_flow`) and which
/// MX hosts or addresses fail while it does (`redundancy`); for other checks, the failing
/// endpoints by layer (`endpoint`). Worst first: failures before warnings, then by layer.
pub fn diagnose_rows(
    target: &str,
    mine: &[&SeriesView],
    faults: &BTreeSet<(String, String)>,
) -> Vec<Finding> {
    if mine.is_empty() {
        return vec![Finding::none(format!("no data for {target}"))];
    }
    let stale: BTreeSet<&str> = regions_where(mine, |r| r.state == RegionState::Stale);
    let fresh_regions: BTreeSet<&str> = regions_where(mine, |r| r.state != RegionState::Stale);
    if fresh_regions.is_empty() {
        return vec![Finding {
            layer: None,
            severity: "warn",
            scope: "stale",
            regions: stale.iter().map(|r| r.to_string()).collect(),
            check: String::new(),
            summary: format!(
                "no fresh results for {target} from any region: the verdict is unknown \
                 (its agents are silent or its results are older than the stale limit)"
            ),
            evidence: Vec::new(),
            kind: "stale",
            caused_by: None,
        }];
    }

    let mut roots: Vec<Root> = Vec::new();
    let mut tops: Vec<Finding> = Vec::new();
    let (dns, unsettled) = roots::dns_divergence(target, mine);
    roots.extend(dns);
    tops.extend(unsettled);
    roots.extend(roots::smtp_altered(target, mine));
    let (tls, differing) = roots::tls_interception(mine);
    roots.extend(tls);
    tops.extend(differing);
    tops.extend(roots::certificates_across_addresses(mine));
    roots::fold_banner_into_interception(&mut roots);

    // Problems, each to the root explaining it (the agent's network first), else unexplained.
    let mut agent_rows: BTreeMap<(&str, &str), Vec<&SeriesView>> = BTreeMap::new();
    let mut explained: Vec<Vec<Problem<'_>>> = roots.iter().map(|_| Vec::new()).collect();
    let mut unexplained: Vec<Problem<'_>> = Vec::new();
    for r in mine {
        let severity = match (r.state, r.outcome.as_str()) {
            (RegionState::Failing, _) => 0,
            (RegionState::Ok, "warn") => 1,
            _ => continue,
        };
        let Some(class) = r.error_class.as_deref() else {
            continue;
        };
        if severity == 0 && faults.contains(&(r.agent_id.clone(), r.check.clone())) {
            agent_rows
                .entry((&r.agent_id, &r.check))
                .or_default()
                .push(r);
            continue;
        }
        let p = Problem {
            row: r,
            severity,
            layer: layer_of(&r.check, class, r.phase.as_deref()),
        };
        match roots
            .iter()
            .position(|root| root.explains.covers(r, p.layer))
        {
            Some(i) => explained[i].push(p),
            None => unexplained.push(p),
        }
    }
    let mail = MailGroups::new(mine, faults);
    tops.extend(symptoms(target, &unexplained, mine, &mail));
    for ((agent, check), problems) in &agent_rows {
        tops.push(agent_network(target, agent, check, problems));
    }
    // Roots take the severity of the worst thing they explain.
    let mut rooted: Vec<(Finding, Vec<Finding>)> = Vec::new();
    for (mut root, problems) in roots.into_iter().zip(explained) {
        let consequences = symptoms(target, &problems, mine, &mail);
        if consequences.iter().any(|f| f.severity == "fail") {
            root.finding.severity = "fail";
        } else if consequences.is_empty() && root.addresses_only {
            // Other addresses that work from where they are given out: geo DNS, not a fault.
            root.finding.severity = "ok";
            root.finding.summary.push_str(
                " (every region's answer works: geo DNS or split horizon, nothing to fix)",
            );
        }
        rooted.push((root.finding, consequences));
    }
    let mut all: Vec<(Finding, Vec<Finding>)> = rooted;
    all.extend(tops.into_iter().map(|f| (f, Vec::new())));
    if !stale.is_empty() {
        let only: Vec<&str> = stale.difference(&fresh_regions).copied().collect();
        if !only.is_empty() {
            all.push((
                Finding {
                    layer: None,
                    severity: "warn",
                    scope: "stale",
                    regions: only.iter().map(|r| r.to_string()).collect(),
                    check: String::new(),
                    summary: format!(
                        "no fresh results from {}: those regions are not judged",
                        only.join(", ")
                    ),
                    evidence: Vec::new(),
                    kind: "stale",
                    caused_by: None,
                },
                Vec::new(),
            ));
        }
    }
    all.sort_by_key(|(f, consequences)| {
        (
            f.kind == "stale",
            // The agent's own network is the monitoring's problem, not the target's.
            f.scope == "agent",
            match f.severity {
                "fail" => 0,
                "warn" => 1,
                _ => 2,
            },
            consequences.is_empty() && !is_root_kind(f.kind),
            f.layer,
        )
    });
    let mut findings = Vec::new();
    for (root, mut consequences) in all {
        let at = findings.len();
        findings.push(root);
        consequences.sort_by_key(|f| (f.severity != "fail", f.layer));
        for mut c in consequences {
            c.caused_by = Some(at);
            findings.push(c);
        }
    }
    if findings
        .iter()
        .all(|f| f.kind == "stale" || f.severity == "ok")
    {
        let fresh: Vec<&str> = fresh_regions.iter().copied().collect();
        let summary = if !findings.iter().any(|f| f.kind == "stale") {
            "every check passes in every region".to_string()
        } else {
            format!(
                "every check passes in the regions with fresh results ({})",
                fresh.join(", ")
            )
        };
        findings.insert(0, Finding::none(summary));
    }
    findings
}

/// Kinds that name a cause (listed before the symptoms of the same severity).
fn is_root_kind(kind: &str) -> bool {
    matches!(
        kind,
        "dns_divergence" | "smtp_altered" | "tls_interception" | "agent_network"
    )
}

fn regions_where<'a>(
    rows: &[&'a SeriesView],
    pick: impl Fn(&SeriesView) -> bool,
) -> BTreeSet<&'a str> {
    rows.iter()
        .filter(|r| pick(r))
        .map(|r| r.region.as_str())
        .collect()
}

impl Finding {
    fn none(summary: String) -> Finding {
        Finding {
            layer: None,
            severity: "ok",
            scope: "none",
            regions: Vec::new(),
            check: String::new(),
            summary,
            evidence: Vec::new(),
            kind: "none",
            caused_by: None,
        }
    }
}

/// The mail verdicts per region of a target's port-25 checks judged as mail.
pub(crate) struct MailGroups<'a> {
    /// check -> region -> verdict
    pub by_check: BTreeMap<&'a str, BTreeMap<&'a str, RegionMail<'a>>>,
}

impl<'a> MailGroups<'a> {
    pub(crate) fn new(mine: &[&'a SeriesView], faults: &BTreeSet<(String, String)>) -> Self {
        let mut per: BTreeMap<&str, Vec<&SeriesView>> = BTreeMap::new();
        for r in mine {
            per.entry(r.check.as_str()).or_default().push(r);
        }
        let by_check = per
            .into_iter()
            .filter(|(check, rows)| mail::is_mail_group(check, rows))
            .map(|(check, rows)| (check, mail::by_region(&rows, faults)))
            .collect();
        MailGroups { by_check }
    }

    fn state(&self, check: &str, region: &str) -> Option<RegionState> {
        Some(self.by_check.get(check)?.get(region)?.state)
    }
}

fn agent_network(target: &str, agent: &str, check: &str, problems: &[&SeriesView]) -> Finding {
    let regions: BTreeSet<String> = problems.iter().map(|r| r.region.clone()).collect();
    Finding {
        layer: problems.first().and_then(|r| {
            r.error_class
                .as_deref()
                .map(|c| layer_of(check, c, r.phase.as_deref()))
        }),
        severity: "fail",
        scope: "agent",
        regions: regions.into_iter().collect(),
        check: check.to_string(),
        summary: format!(
            "{check}: agent {agent} fails this check on most of its targets while other agents \
             succeed: its own network (e.g. a provider blocking the port), not counted against \
             {target}"
        ),
        evidence: problems.iter().map(|r| evidence_of(r)).collect(),
        kind: "agent_network",
        caused_by: None,
    }
}

/// "only from a, b (fine from c) (d fail otherwise)" or "seen from every region".
fn where_of(
    regions: &BTreeSet<&str>,
    check: &str,
    mine: &[&SeriesView],
    counted: &BTreeSet<&str>,
) -> (bool, String) {
    let everywhere = regions.is_superset(counted);
    if everywhere {
        return (true, "seen from every region".to_string());
    }
    // The other regions are fine only if they do not fail this check some other way.
    let failing_otherwise: BTreeSet<&str> = mine
        .iter()
        .filter(|r| r.check == check && r.state == RegionState::Failing)
        .map(|r| r.region.as_str())
        .filter(|r| counted.contains(r) && !regions.contains(r))
        .collect();
    let list = |set: &BTreeSet<&str>| set.iter().copied().collect::<Vec<_>>().join(", ");
    let fine: BTreeSet<&str> = counted
        .difference(regions)
        .copied()
        .filter(|r| !failing_otherwise.contains(r))
        .collect();
    let mut s = format!("only from {}", list(regions));
    if !fine.is_empty() {
        s.push_str(&format!(" (fine from {})", list(&fine)));
    }
    if !failing_otherwise.is_empty() {
        s.push_str(&format!(" ({} fail otherwise)", list(&failing_otherwise)));
    }
    (false, s)
}

/// Regions with fresh, counted data for `check` (not stale, not the agent's own network).
fn counted_regions<'a>(
    check: &str,
    mine: &[&'a SeriesView],
    mail: &MailGroups<'_>,
) -> BTreeSet<&'a str> {
    mine.iter()
        .filter(|r| r.check == check && r.state != RegionState::Stale)
        .filter(|r| mail.state(check, &r.region) != Some(RegionState::AgentFault))
        .map(|r| r.region.as_str())
        .collect()
}

/// `network refused`, or `policy` alone when the class is the layer's own name; with the message
/// when every row says the same.
fn layer_and_classes(layer: Layer, problems: &[&Problem<'_>]) -> String {
    let classes = classes_of(problems);
    let mut s = if classes == layer.name() {
        classes
    } else {
        format!("{} {classes}", layer.name())
    };
    let messages: BTreeSet<&str> = problems.iter().map(|p| p.row.message.as_str()).collect();
    if let [only] = messages.into_iter().collect::<Vec<_>>()[..] {
        if !only.is_empty() && only.len() <= 200 {
            s.push_str(&format!(" ({only})"));
        }
    }
    s
}

fn classes_of(problems: &[&Problem<'_>]) -> String {
    let classes: BTreeSet<&str> = problems
        .iter()
        .filter_map(|p| p.row.error_class.as_deref())
        .collect();
    classes.into_iter().collect::<Vec<_>>().join("/")
}

/// Findings for a set of problem rows: mail flow and redundancy for port 25 of a domain, the
/// failing endpoints by (severity, layer, check) for everything else.
fn symptoms(
    target: &str,
    problems: &[Problem<'_>],
    mine: &[&SeriesView],
    mail: &MailGroups<'_>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut endpoint_groups: BTreeMap<(u8, Layer, &str), Vec<&Problem<'_>>> = BTreeMap::new();
    // check -> rows in regions where no MX host works
    let mut no_flow: BTreeMap<&str, Vec<&Problem<'_>>> = BTreeMap::new();
    // (check, host, address or "" for the whole host) -> rows where mail still flows
    let mut redundancy: BTreeMap<(&str, &str, &str), Vec<&Problem<'_>>> = BTreeMap::new();
    for p in problems {
        let r = p.row;
        match (p.severity, mail.state(&r.check, &r.region)) {
            (0, Some(RegionState::Failing)) => no_flow.entry(&r.check).or_default().push(p),
            (0, Some(RegionState::Ok)) => {
                let verdict = &mail.by_check[r.check.as_str()][r.region.as_str()];
                let (host, ip) = mail::endpoint_parts(&r.endpoint);
                let whole = verdict.hosts.iter().any(|h| h.name == host && !h.works);
                let key = if whole { "" } else { ip.unwrap_or("") };
                redundancy.entry((&r.check, host, key)).or_default().push(p);
            }
            _ => endpoint_groups
                .entry((p.severity, p.layer, &r.check))
                .or_default()
                .push(p),
        }
    }
    for (check, ps) in no_flow {
        let regions: BTreeSet<&str> = ps.iter().map(|p| p.row.region.as_str()).collect();
        let counted = counted_regions(check, mine, mail);
        let (everywhere, where_) = where_of(&regions, check, mine, &counted);
        let layer = ps.iter().map(|p| p.layer).min();
        let mut hosts: Vec<String> = Vec::new();
        for region in &regions {
            for h in &mail.by_check[check][region].hosts {
                let d = h.describe();
                if !hosts.contains(&d) {
                    hosts.push(d);
                }
            }
        }
        out.push(Finding {
            layer,
            severity: "fail",
            scope: if everywhere { "everywhere" } else { "regions" },
            regions: regions.iter().map(|r| r.to_string()).collect(),
            check: check.to_string(),
            summary: format!(
                "mail to {target} does not flow ({check}: no MX host completes the dialogue; {} {}), {where_}; tried {}",
                layer.map_or("-", Layer::name),
                classes_of(&ps),
                hosts.join(", ")
            ),
            evidence: ps.iter().map(|p| evidence_of(p.row)).collect(),
            kind: "mail_flow",
            caused_by: None,
        });
    }
    for ((check, host, ip), ps) in redundancy {
        let regions: BTreeSet<&str> = ps.iter().map(|p| p.row.region.as_str()).collect();
        let flowing: BTreeSet<&str> = mail.by_check[check]
            .iter()
            .filter(|(_, m)| m.state == RegionState::Ok)
            .map(|(r, _)| *r)
            .collect();
        let everywhere = regions.is_superset(&flowing);
        let where_ = if everywhere {
            "from every region".to_string()
        } else {
            format!(
                "from {}",
                regions.iter().copied().collect::<Vec<_>>().join(", ")
            )
        };
        let layer = ps.iter().map(|p| p.layer).min();
        let how = format!("{} {}", layer.map_or("-", Layer::name), classes_of(&ps));
        // Described as the first region that sees it does.
        let verdict = &mail.by_check[check][ps[0].row.region.as_str()];
        let summary = if ip.is_empty() {
            let h = verdict.hosts.iter().find(|h| h.name == host);
            let role = match (h, verdict.hosts.first()) {
                (Some(h), Some(first)) if h.name == first.name => "primary MX",
                _ => "backup MX",
            };
            let via = verdict
                .delivering_host()
                .map_or_else(|| "another host".to_string(), |d| d.describe());
            format!(
                "{check}: {role} {} fails {where_} ({how}); mail to {target} still flows, through {via}, \
                 without that host's redundancy",
                h.map_or_else(|| host.to_string(), |h| h.describe())
            )
        } else {
            format!(
                "{check}: address {ip} of MX {host} fails {where_} ({how}); its other addresses work, \
                 so mail to {target} flows, but senders that reach {ip} first wait or retry"
            )
        };
        out.push(Finding {
            layer,
            severity: "warn",
            scope: if everywhere { "everywhere" } else { "regions" },
            regions: regions.iter().map(|r| r.to_string()).collect(),
            check: check.to_string(),
            summary,
            evidence: ps.iter().map(|p| evidence_of(p.row)).collect(),
            kind: "redundancy",
            caused_by: None,
        });
    }
    for ((severity, layer, check), ps) in endpoint_groups {
        let regions: BTreeSet<&str> = ps.iter().map(|p| p.row.region.as_str()).collect();
        let counted = counted_regions(check, mine, mail);
        let (everywhere, where_) = where_of(&regions, check, mine, &counted);
        out.push(Finding {
            layer: Some(layer),
            severity: if severity == 0 { "fail" } else { "warn" },
            scope: if everywhere { "everywhere" } else { "regions" },
            regions: regions.iter().map(|r| r.to_string()).collect(),
            check: check.to_string(),
            summary: format!("{check}: {}, {where_}", layer_and_classes(layer, &ps)),
            evidence: ps.iter().map(|p| evidence_of(p.row)).collect(),
            kind: "endpoint",
            caused_by: None,
        });
    }
    out
}

/// A paragraph a mail operator can paste into a ticket: where mail to `target` flows and where
/// not, the root cause per region, and what to check next; from [`diagnose_rows`]' findings.
pub fn explain(
    target: &str,
    mine: &[&SeriesView],
    findings: &[Finding],
    faults: &BTreeSet<(String, String)>,
) -> String {
    let join = |v: &[&str]| v.join(", ");
    let mut s = String::new();
    let mail = MailGroups::new(mine, faults);
    if let Some(by_region) = mail.by_check.get("smtp") {
        let pick = |st: RegionState| -> Vec<&str> {
            by_region
                .iter()
                .filter(|(_, m)| m.state == st)
                .map(|(r, _)| *r)
                .collect()
        };
        let (flows, failing) = (pick(RegionState::Ok), pick(RegionState::Failing));
        let (agent, stale) = (pick(RegionState::AgentFault), pick(RegionState::Stale));
        if by_region.values().any(|m| m.null_mx) {
            s.push_str(&format!(
                "Mail to {target}: the domain publishes a null MX (RFC 7505): it accepts no mail, \
                 by design."
            ));
        } else if failing.is_empty() && !flows.is_empty() {
            s.push_str(&format!(
                "Mail to {target} flows from every region judged ({}).",
                join(&flows)
            ));
        } else if flows.is_empty() && !failing.is_empty() {
            s.push_str(&format!(
                "Mail to {target} does not flow from any region judged ({}).",
                join(&failing)
            ));
        } else if !flows.is_empty() {
            s.push_str(&format!(
                "Mail to {target} flows from {}; it does not flow from {}.",
                join(&flows),
                join(&failing)
            ));
        } else {
            s.push_str(&format!(
                "Mail to {target}: no region has fresh, counted results: unknown."
            ));
        }
        if !agent.is_empty() {
            s.push_str(&format!(
                " Not counted: {} (the agent there cannot connect to port 25 of most targets: its \
                 own network).",
                join(&agent)
            ));
        }
        if !stale.is_empty() {
            s.push_str(&format!(" No fresh results from {}.", join(&stale)));
        }
    } else {
        s.push_str(&format!(
            "{target} is not judged as a mail domain (no port-25 check of its MX hosts);"
        ));
        match findings.first() {
            Some(f) if f.kind == "none" => s.push_str(&format!(" {}.", f.summary)),
            _ => s.push_str(" by its endpoints:"),
        }
    }
    let tops: Vec<(usize, &Finding)> = findings
        .iter()
        .enumerate()
        .filter(|(_, f)| f.caused_by.is_none())
        .filter(|(_, f)| !matches!(f.kind, "none" | "stale" | "agent_network"))
        .collect();
    for (i, f) in tops.iter().take(3) {
        let label = match f.kind {
            _ if f.severity == "ok" => "Note".to_string(),
            k if is_root_kind(k) => format!("Root cause for {}", f.regions.join(", ")),
            "redundancy" => "Redundancy".to_string(),
            "mail_flow" => "Not flowing".to_string(),
            _ if f.severity == "fail" => "Failing".to_string(),
            _ => "Also".to_string(),
        };
        s.push_str(&format!(" {label}: {}.", f.summary));
        let follow = findings.iter().filter(|c| c.caused_by == Some(*i)).count();
        if follow > 0 {
            s.push_str(&format!(
                " {follow} other finding{} follow{} from it.",
                if follow == 1 { "" } else { "s" },
                if follow == 1 { "s" } else { "" }
            ));
        }
    }
    if tops.len() > 3 {
        s.push_str(&format!(" And {} more findings.", tops.len() - 3));
    }
    let next = tops
        .first()
        .map(|(_, f)| *f)
        .or_else(|| findings.iter().find(|f| f.kind == "agent_network"));
    if let Some(f) = next {
        s.push_str(&format!(" Check next: {}.", next_step(f, mine)));
    }
    s
}

/// What to look at first for a finding.
fn next_step(f: &Finding, mine: &[&SeriesView]) -> String {
    let regions = f.regions.join(", ");
    let classes: BTreeSet<&str> = mine
        .iter()
        .filter(|r| r.check == f.check && f.regions.contains(&r.region))
        .filter(|r| r.state == RegionState::Failing)
        .filter_map(|r| r.error_class.as_deref())
        .collect();
    match (f.kind, f.layer) {
        ("dns_divergence", _) => format!(
            "the resolvers {regions} uses: compare their answers with the authoritative servers' \
             (split-horizon views, a DNS-rewriting middlebox on the path, or a secondary serving an \
             old zone)"
        ),
        ("smtp_altered", _) => format!(
            "the firewall or proxy on the path of {regions}: turn its SMTP inspection off (it hides \
             STARTTLS, so mail crosses it in plain text)"
        ),
        ("tls_interception", _) => format!(
            "the TLS-inspecting proxy on the path of {regions}, or which server answers that \
             region on this address"
        ),
        ("agent_network", _) => format!(
            "the agent's own network in {regions} (a provider blocking the port); the target \
             itself looks fine from the other regions"
        ),
        ("consistency", _) => {
            "why the regions or addresses disagree (rollout in progress, several servers behind \
             one name)"
                .to_string()
        }
        (_, Some(Layer::Network)) if classes.contains("refused") => {
            "whether the service runs and listens on the failing addresses, and firewall rules \
             that reject the connection"
                .to_string()
        }
        (_, Some(Layer::Network)) => format!(
            "firewalls and routes that drop the traffic towards the failing addresses from \
             {regions}"
        ),
        (_, Some(Layer::Dns)) => {
            "the DNS records of the domain and its MX hosts (and the authoritative servers)"
                .to_string()
        }
        (_, Some(Layer::Tls)) => {
            "the certificate on the failing hosts (dates, names, chain) and their TLS settings"
                .to_string()
        }
        (_, Some(Layer::Protocol)) => {
            "the server's log for the rejected or broken dialogue".to_string()
        }
        (_, Some(Layer::Policy)) => "the published policy records".to_string(),
        (_, None) => "nothing: no problem found".to_string(),
    }
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
        // Two regions, two answers: no majority to call one of them the odd one.
        assert!(
            f.iter().any(|f| f.layer == Some(Layer::Dns)
                && f.kind == "consistency"
                && f.summary.contains("no answer has a majority")),
            "{f:?}"
        );
        assert!(
            f.iter().any(|f| f.layer == Some(Layer::Tls)
                && f.kind == "consistency"
                && f.summary.contains("different certificates")),
            "{f:?}"
        );
    }

    #[test]
    fn healthy_and_unknown_targets() {
        let rows = vec![
            row("t.test", "smtp", "eu-west", Fine, None),
            row("t.test", "smtp", "x", Stale, None),
        ];
        let f = diagnose("t.test", &rows, &BTreeSet::new());
        assert_eq!(f[0].scope, "none");
        assert!(f[0].summary.contains("fresh results (eu-west)"), "{f:?}");
        assert_eq!(
            (f[1].kind, f[1].regions.clone()),
            ("stale", vec!["x".to_string()])
        );
        let all_stale = vec![row("t.test", "smtp", "x", Stale, None)];
        let f = diagnose("t.test", &all_stale, &BTreeSet::new());
        assert_eq!((f.len(), f[0].kind, f[0].scope), (1, "stale", "stale"));
        assert!(f[0].summary.contains("unknown"), "{f:?}");
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
