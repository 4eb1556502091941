//! Root causes recognised by signature across the regions of one target: one region (or a
//! minority) gets different DNS answers, sees the SMTP dialogue altered on its path, or is shown
//! a certificate of another issuer. Each root says which problem rows it explains, so the
//! diagnosis lists those as its consequences instead of as findings of their own. Pure.

use std::collections::{BTreeMap, BTreeSet};

use mxscope_proto::facts;

use super::diagnosis::{mx_set, Finding, Layer, SeriesView};
use super::mail::endpoint_parts;
use super::scope::RegionState;

/// A root finding and the problem rows it explains.
#[derive(Debug, Clone)]
pub struct Root {
    pub finding: Finding,
    pub explains: Explains,
    /// An `smtp_altered` root whose only sign is a rewritten banner.
    pub banner_only: bool,
    /// A `dns_divergence` root in which only MX hosts' addresses differ (geo DNS does that).
    pub addresses_only: bool,
}

/// Which problem rows a root explains: rows of these regions, limited to some checks, one
/// endpoint and some layers when set.
#[derive(Debug, Clone, Default)]
pub struct Explains {
    pub regions: BTreeSet<String>,
    pub checks: Option<BTreeSet<String>>,
    pub endpoint: Option<String>,
    pub layers: Option<BTreeSet<Layer>>,
}

impl Explains {
    pub fn covers(&self, r: &SeriesView, layer: Layer) -> bool {
        self.regions.contains(&r.region)
            && self.checks.as_ref().is_none_or(|c| c.contains(&r.check))
            && self.endpoint.as_ref().is_none_or(|e| *e == r.endpoint)
            && self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }
}

/// Regions by the value they see, and the value more than half of them see (if one does).
struct Split<'a> {
    by_value: BTreeMap<&'a str, BTreeSet<&'a str>>,
    majority: Option<&'a str>,
}

impl<'a> Split<'a> {
    fn of(seen: &BTreeMap<&'a str, &'a str>) -> Split<'a> {
        let mut by_value: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (region, value) in seen {
            by_value.entry(value).or_default().insert(region);
        }
        let majority = by_value
            .iter()
            .find(|(_, rs)| rs.len() * 2 > seen.len())
            .map(|(v, _)| *v);
        Split { by_value, majority }
    }

    fn differs(&self) -> bool {
        self.by_value.len() > 1
    }

    /// Regions that see something else than the majority.
    fn minority(&self) -> BTreeSet<&'a str> {
        self.by_value
            .iter()
            .filter(|(v, _)| Some(**v) != self.majority)
            .flat_map(|(_, rs)| rs.iter().copied())
            .collect()
    }

    fn majority_regions(&self) -> BTreeSet<&'a str> {
        self.majority
            .and_then(|m| self.by_value.get(m).cloned())
            .unwrap_or_default()
    }
}

fn list<'a>(set: impl IntoIterator<Item = &'a str>) -> String {
    set.into_iter().collect::<Vec<_>>().join(", ")
}

fn fresh<'a, 'b>(rows: &'b [&'a SeriesView]) -> impl Iterator<Item = &'a SeriesView> + 'b {
    rows.iter()
        .copied()
        .filter(|r| r.state != RegionState::Stale)
}

/// What each region's DNS answers were for one target, by question: the MX set, each MX host's
/// addresses (from the `mx` check and from the endpoints probed), TLSA and policy records.
fn dns_answers<'a>(rows: &[&'a SeriesView]) -> BTreeMap<String, BTreeMap<&'a str, String>> {
    let mut out: BTreeMap<String, BTreeMap<&str, String>> = BTreeMap::new();
    // (region, host) -> addresses
    let mut addrs: BTreeMap<(&str, String), BTreeSet<String>> = BTreeMap::new();
    for r in fresh(rows) {
        let region = r.region.as_str();
        match r.check.as_str() {
            "mx" => {
                let set = match (&r.error_class, mx_set(&r.facts)) {
                    (_, Some(_)) => {
                        let mut hosts = Vec::new();
                        for i in 0.. {
                            let Some(h) = r.facts.get(&facts::mx::nth(i, facts::mx::field::HOST))
                            else {
                                break;
                            };
                            let p = r
                                .facts
                                .get(&facts::mx::nth(i, facts::mx::field::PREFERENCE))
                                .map_or("?", |p| p.as_str());
                            hosts.push(format!("{p} {h}"));
                            let a = r
                                .facts
                                .get(&facts::mx::nth(i, facts::mx::field::ADDRS))
                                .map_or("", |a| a.as_str());
                            addrs
                                .entry((region, h.to_string()))
                                .or_default()
                                .extend(a.split(',').filter(|a| !a.is_empty()).map(String::from));
                        }
                        hosts.sort();
                        hosts.join(", ")
                    }
                    (Some(class), None) if class.starts_with("dns_") => {
                        format!("no answer ({class})")
                    }
                    _ => continue,
                };
                out.entry(format!("MX of {}", r.target))
                    .or_default()
                    .insert(region, set);
            }
            "spf" | "dmarc" | "mta-sts" | "tlsrpt" => {
                let (key, name) = match r.check.as_str() {
                    "spf" => (facts::spf::RECORD, "SPF record"),
                    "dmarc" => (facts::dmarc::RECORD, "DMARC record"),
                    "mta-sts" => (facts::mta_sts::ID, "MTA-STS id"),
                    _ => (facts::tlsrpt::RUA, "TLS-RPT rua"),
                };
                if let Some(v) = r.facts.get(key) {
                    out.entry(name.to_string())
                        .or_default()
                        .insert(region, v.clone());
                }
            }
            "dane" => {
                for i in 0.. {
                    let Some(h) = r.facts.get(&facts::dane::nth(i, facts::dane::field::HOST))
                    else {
                        break;
                    };
                    let tlsa = r
                        .facts
                        .get(&facts::dane::nth(i, facts::dane::field::TLSA))
                        .cloned()
                        .unwrap_or_else(|| "none".into());
                    out.entry(format!("TLSA of {h}"))
                        .or_default()
                        .insert(region, tlsa);
                }
            }
            _ => {
                let (host, ip) = endpoint_parts(&r.endpoint);
                if let Some(ip) = ip {
                    addrs
                        .entry((region, host.to_string()))
                        .or_default()
                        .insert(ip.to_string());
                }
            }
        }
    }
    for ((region, host), ips) in addrs {
        out.entry(format!("addresses of {host}"))
            .or_default()
            .insert(region, ips.into_iter().collect::<Vec<_>>().join(", "));
    }
    out
}

/// Regions that get DNS answers different from what most regions get (a root), or regions that
/// disagree without a majority (a `consistency` warning, explaining nothing).
pub fn dns_divergence(target: &str, rows: &[&SeriesView]) -> (Option<Root>, Vec<Finding>) {
    let answers = dns_answers(rows);
    let mut minority: BTreeSet<&str> = BTreeSet::new();
    let mut majority: BTreeSet<&str> = BTreeSet::new();
    let mut evidence = Vec::new();
    let mut headline = None;
    let mut unsettled = Vec::new();
    let mut addresses_only = true;
    for (question, seen) in &answers {
        let seen: BTreeMap<&str, &str> = seen.iter().map(|(r, v)| (*r, v.as_str())).collect();
        let split = Split::of(&seen);
        if !split.differs() {
            continue;
        }
        let Some(common) = split.majority else {
            unsettled.push((question.clone(), split.by_value.clone()));
            continue;
        };
        let odd = split.minority();
        addresses_only &= question.starts_with("addresses of ");
        for (value, regions) in split.by_value.iter().filter(|(v, _)| **v != common) {
            evidence.push(format!(
                "{question}: {} get {value}",
                list(regions.iter().copied())
            ));
            headline.get_or_insert_with(|| {
                format!(
                    "{question}: {value} from {}, {common} from {}",
                    list(regions.iter().copied()),
                    list(split.majority_regions())
                )
            });
        }
        evidence.push(format!(
            "{question}: {} get {common}",
            list(split.majority_regions())
        ));
        minority.extend(odd);
        majority.extend(split.majority_regions());
    }
    let mut others = Vec::new();
    if !unsettled.is_empty() {
        let regions: BTreeSet<String> = unsettled
            .iter()
            .flat_map(|(_, by)| by.values().flatten().map(|r| r.to_string()))
            .collect();
        others.push(Finding {
            layer: Some(Layer::Dns),
            severity: "warn",
            scope: "regions",
            regions: regions.into_iter().collect(),
            check: "mx".into(),
            summary: "regions get different DNS answers and no answer has a majority \
                      (split horizon or propagation)"
                .into(),
            evidence: unsettled
                .iter()
                .flat_map(|(q, by)| {
                    by.iter()
                        .map(move |(v, rs)| format!("{q}: {} get {v}", list(rs.iter().copied())))
                })
                .collect(),
            kind: "consistency",
            caused_by: None,
        });
    }
    let Some(headline) = headline else {
        return (None, others);
    };
    majority.retain(|r| !minority.contains(r));
    evidence.push(serial_evidence(rows, &minority, &majority));
    let root = Root {
        finding: Finding {
            layer: Some(Layer::Dns),
            severity: "warn",
            scope: "regions",
            regions: minority.iter().map(|r| r.to_string()).collect(),
            check: "mx".into(),
            summary: format!(
                "{} {} different DNS answers for {target} than the other regions: {headline}",
                list(minority.iter().copied()),
                if minority.len() == 1 { "gets" } else { "get" }
            ),
            evidence,
            kind: "dns_divergence",
            caused_by: None,
        },
        explains: Explains {
            regions: minority.iter().map(|r| r.to_string()).collect(),
            ..Explains::default()
        },
        banner_only: false,
        addresses_only,
    };
    (Some(root), others)
}

/// What the zone serials say about a DNS divergence: an older serial is propagation, the same
/// serial with other data is split horizon or interception on the path.
fn serial_evidence(
    rows: &[&SeriesView],
    minority: &BTreeSet<&str>,
    majority: &BTreeSet<&str>,
) -> String {
    let serials = |set: &BTreeSet<&str>| -> BTreeSet<u64> {
        fresh(rows)
            .filter(|r| r.check == "mx" && set.contains(r.region.as_str()))
            .filter_map(|r| r.facts.get(facts::mx::SOA_SERIAL)?.parse().ok())
            .collect()
    };
    let (odd, common) = (serials(minority), serials(majority));
    let show = |s: &BTreeSet<u64>| s.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    match (odd.iter().max(), common.iter().min()) {
        (Some(o), Some(c)) if o < c => format!(
            "zone serial {} there, {} elsewhere: an older copy of the zone (propagation, a lagging secondary)",
            show(&odd),
            show(&common)
        ),
        (Some(_), Some(_)) if odd == common => format!(
            "same zone serial {} everywhere with different data: split-horizon DNS or DNS \
             interception on that region's path",
            show(&odd)
        ),
        (Some(_), Some(_)) => format!(
            "zone serial {} there, {} elsewhere: another copy of the zone (a different \
             authoritative server answers that region: split horizon or DNS interception)",
            show(&odd),
            show(&common)
        ),
        _ => "no zone serial recorded (the domain is not a zone apex): propagation cannot be told \
              from interception"
            .to_string(),
    }
}

/// EHLO keywords as a set, from `smtp.extensions` (space-separated, upper case).
fn keywords(v: &SeriesView) -> Option<BTreeSet<String>> {
    let text = v
        .facts
        .get(&facts::smtp::under(facts::smtp::PREFIX, "extensions"))?;
    Some(
        text.split_whitespace()
            .map(str::to_ascii_uppercase)
            .collect(),
    )
}

/// A banner masked by a firewall's SMTP inspection: the text is (mostly) asterisks.
fn masked(banner: &str) -> bool {
    let text = banner.trim();
    let stars = text.chars().filter(|c| *c == '*').count();
    stars >= 3 && stars * 2 >= text.chars().filter(|c| !c.is_whitespace()).count()
}

/// Per (check, endpoint) seen from several regions: a region whose SMTP dialogue differs from the
/// majority's (keywords missing or replaced, the banner masked or rewritten) — what a firewall's
/// SMTP inspection does on that region's path.
pub fn smtp_altered(target: &str, rows: &[&SeriesView]) -> Vec<Root> {
    let mut per: BTreeMap<(&str, &str), Vec<&SeriesView>> = BTreeMap::new();
    for r in fresh(rows).filter(|r| matches!(r.check.as_str(), "smtp" | "submission")) {
        per.entry((r.check.as_str(), r.endpoint.as_str()))
            .or_default()
            .push(r);
    }
    let mut roots = Vec::new();
    for ((check, endpoint), rs) in per {
        let ext: BTreeMap<&str, String> = rs
            .iter()
            .filter_map(|r| {
                Some((
                    r.region.as_str(),
                    keywords(r)?.into_iter().collect::<Vec<_>>().join(" "),
                ))
            })
            .collect();
        let banners: BTreeMap<&str, &str> = rs
            .iter()
            .filter_map(|r| {
                Some((
                    r.region.as_str(),
                    r.facts.get(facts::smtp::BANNER)?.as_str(),
                ))
            })
            .collect();
        let ext_refs: BTreeMap<&str, &str> = ext.iter().map(|(r, v)| (*r, v.as_str())).collect();
        let by_ext = Split::of(&ext_refs);
        let by_banner = Split::of(&banners);
        let mut odd: BTreeSet<&str> = BTreeSet::new();
        let mut evidence = Vec::new();
        let mut what = Vec::new();
        if let (true, Some(common)) = (by_ext.differs(), by_ext.majority) {
            let common_set: BTreeSet<&str> = common.split_whitespace().collect();
            for (value, regions) in by_ext.by_value.iter().filter(|(v, _)| **v != common) {
                let theirs: BTreeSet<&str> = value.split_whitespace().collect();
                let missing: Vec<&str> = common_set.difference(&theirs).copied().collect();
                let added: Vec<&str> = theirs.difference(&common_set).copied().collect();
                let mut change = Vec::new();
                if !missing.is_empty() {
                    change.push(format!("{} missing", missing.join(" ")));
                }
                if !added.is_empty() {
                    change.push(format!("{} in its place", added.join(" ")));
                }
                what.push(format!("EHLO keywords altered ({})", change.join(", ")));
                evidence.push(format!(
                    "{} {endpoint}: EHLO keywords {value}",
                    list(regions.iter().copied())
                ));
                odd.extend(regions.iter().copied());
            }
            evidence.push(format!(
                "{} {endpoint}: EHLO keywords {common}",
                list(by_ext.majority_regions())
            ));
        }
        if let (true, Some(common)) = (by_banner.differs(), by_banner.majority) {
            for (value, regions) in by_banner.by_value.iter().filter(|(v, _)| **v != common) {
                what.push(if masked(value) {
                    "banner masked".to_string()
                } else {
                    "banner rewritten".to_string()
                });
                evidence.push(format!(
                    "{} {endpoint}: banner '{value}'",
                    list(regions.iter().copied())
                ));
                odd.extend(regions.iter().copied());
            }
            evidence.push(format!(
                "{} {endpoint}: banner '{common}'",
                list(by_banner.majority_regions())
            ));
        }
        if odd.is_empty() {
            continue;
        }
        what.sort();
        what.dedup();
        let banner_only = what == ["banner rewritten"];
        let signature = if evidence.iter().any(|e| e.contains("XXXXXXXA"))
            || banners.values().any(|b| masked(b))
        {
            " (the signature of a firewall's SMTP inspection, e.g. Cisco ESMTP fixup)"
        } else {
            ""
        };
        roots.push(Root {
            finding: Finding {
                layer: Some(Layer::Protocol),
                severity: "warn",
                scope: "regions",
                regions: odd.iter().map(|r| r.to_string()).collect(),
                check: check.to_string(),
                summary: format!(
                    "{check}: the SMTP dialogue with {endpoint} ({target}) is altered on the path of {}: {}{signature}",
                    list(odd.iter().copied()),
                    what.join(", ")
                ),
                evidence,
                kind: "smtp_altered",
                caused_by: None,
            },
            explains: Explains {
                regions: odd.iter().map(|r| r.to_string()).collect(),
                checks: Some([check.to_string()].into_iter().collect()),
                endpoint: Some(endpoint.to_string()),
                layers: None,
            },
            banner_only,
            addresses_only: false,
        });
    }
    roots
}

/// A rewritten banner alone, from the regions and endpoint where a certificate of another
/// issuer is presented, is the same cause (another server or a proxy answers there): its
/// evidence joins the interception root instead of standing as a root of its own.
pub fn fold_banner_into_interception(roots: &mut Vec<Root>) {
    let mut i = 0;
    while i < roots.len() {
        let r = &roots[i];
        let host = (r.banner_only && r.finding.kind == "smtp_altered").then(|| {
            roots.iter().position(|t| {
                t.finding.kind == "tls_interception"
                    && t.explains.endpoint == r.explains.endpoint
                    && t.explains.checks == r.explains.checks
                    && r.explains.regions.is_subset(&t.explains.regions)
            })
        });
        match host.flatten() {
            Some(t) => {
                let folded = roots.remove(i);
                let t = if t > i { t - 1 } else { t };
                roots[t].finding.evidence.extend(folded.finding.evidence);
                roots[t].explains.layers = None;
            }
            None => i += 1,
        }
    }
}

/// Per (check, endpoint): a region shown a certificate whose fingerprint and issuer differ from
/// what most regions see — TLS interception on that region's path. Different certificates with no
/// majority, or from the same issuer, are a `consistency` warning.
pub fn tls_interception(rows: &[&SeriesView]) -> (Vec<Root>, Vec<Finding>) {
    let mut per: BTreeMap<(&str, &str), Vec<&SeriesView>> = BTreeMap::new();
    for r in fresh(rows).filter(|r| r.facts.contains_key(facts::cert::SHA256)) {
        per.entry((r.check.as_str(), r.endpoint.as_str()))
            .or_default()
            .push(r);
    }
    let mut roots = Vec::new();
    let mut others = Vec::new();
    for ((check, endpoint), rs) in per {
        let fp: BTreeMap<&str, &str> = rs
            .iter()
            .filter_map(|r| {
                Some((
                    r.region.as_str(),
                    r.facts.get(facts::cert::SHA256)?.as_str(),
                ))
            })
            .collect();
        let issuer_of = |fingerprint: &str| {
            rs.iter()
                .find(|r| r.facts.get(facts::cert::SHA256).map(String::as_str) == Some(fingerprint))
                .and_then(|r| r.facts.get(facts::cert::ISSUER))
                .map_or("?", |s| s.as_str())
        };
        let split = Split::of(&fp);
        if !split.differs() {
            continue;
        }
        let short = |f: &str| f.get(..16).unwrap_or(f).to_string();
        let chain_of = |fingerprint: &str| {
            rs.iter()
                .find(|r| r.facts.get(facts::cert::SHA256).map(String::as_str) == Some(fingerprint))
                .and_then(|r| r.facts.get(facts::cert::CHAIN))
                .map(|c| format!(", chain {c}"))
                .unwrap_or_default()
        };
        let evidence: Vec<String> = split
            .by_value
            .iter()
            .map(|(f, regions)| {
                format!(
                    "{} {endpoint}: certificate {}… issued by '{}'{}",
                    list(regions.iter().copied()),
                    short(f),
                    issuer_of(f),
                    chain_of(f)
                )
            })
            .collect();
        let intercepted: BTreeSet<&str> = match split.majority {
            Some(common) => split
                .by_value
                .iter()
                .filter(|(f, _)| **f != common && issuer_of(f) != issuer_of(common))
                .flat_map(|(_, rs)| rs.iter().copied())
                .collect(),
            None => BTreeSet::new(),
        };
        if intercepted.is_empty() {
            others.push(Finding {
                layer: Some(Layer::Tls),
                severity: "warn",
                scope: "regions",
                regions: fp.keys().map(|r| r.to_string()).collect(),
                check: check.to_string(),
                summary: format!(
                    "{check}: regions are shown different certificates for {endpoint} (several \
                     servers behind one address, or a certificate rollout in progress)"
                ),
                evidence,
                kind: "consistency",
                caused_by: None,
            });
            continue;
        }
        let common = split.majority.unwrap_or_default();
        let odd_issuers: BTreeSet<&str> = fp
            .iter()
            .filter(|(r, _)| intercepted.contains(*r))
            .map(|(_, f)| issuer_of(f))
            .collect();
        roots.push(Root {
            finding: Finding {
                layer: Some(Layer::Tls),
                severity: "warn",
                scope: "regions",
                regions: intercepted.iter().map(|r| r.to_string()).collect(),
                check: check.to_string(),
                summary: format!(
                    "{check}: TLS interception on the path of {}: {endpoint} presents a \
                     certificate issued by '{}' there, by '{}' to {} (a TLS-inspecting proxy or \
                     another server answering that region)",
                    list(intercepted.iter().copied()),
                    list(odd_issuers.iter().copied()),
                    issuer_of(common),
                    list(split.majority_regions())
                ),
                evidence,
                kind: "tls_interception",
                caused_by: None,
            },
            explains: Explains {
                regions: intercepted.iter().map(|r| r.to_string()).collect(),
                checks: Some([check.to_string()].into_iter().collect()),
                endpoint: Some(endpoint.to_string()),
                layers: Some([Layer::Tls].into_iter().collect()),
            },
            banner_only: false,
            addresses_only: false,
        });
    }
    (roots, others)
}

/// Different certificates on the addresses of one MX host within one region (a certificate not
/// deployed everywhere): a `consistency` warning.
pub fn certificates_across_addresses(rows: &[&SeriesView]) -> Vec<Finding> {
    // (check, region, host) -> fingerprint -> addresses
    let mut per: BTreeMap<(&str, &str, &str), BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for r in fresh(rows) {
        let Some(fp) = r.facts.get(facts::cert::SHA256) else {
            continue;
        };
        let (host, ip) = endpoint_parts(&r.endpoint);
        per.entry((r.check.as_str(), r.region.as_str(), host))
            .or_default()
            .entry(fp.as_str())
            .or_default()
            .push(ip.unwrap_or("-"));
    }
    /// Regions where a host's addresses disagree, and the evidence.
    type Seen<'a> = (BTreeSet<&'a str>, Vec<String>);
    // (check, host) -> what was seen
    let mut found: BTreeMap<(&str, &str), Seen<'_>> = BTreeMap::new();
    for ((check, region, host), fps) in per.iter().filter(|(_, f)| f.len() > 1) {
        let e = found.entry((check, host)).or_default();
        e.0.insert(region);
        for (fp, ips) in fps {
            e.1.push(format!(
                "{region} {host}: certificate {}… on {}",
                fp.get(..16).unwrap_or(fp),
                ips.join(", ")
            ));
        }
    }
    found
        .into_iter()
        .map(|((check, host), (regions, evidence))| Finding {
            layer: Some(Layer::Tls),
            severity: "warn",
            scope: "regions",
            regions: regions.iter().map(|r| r.to_string()).collect(),
            check: check.to_string(),
            summary: format!(
                "{check}: the addresses of {host} present different certificates (one not renewed \
                 or deployed everywhere)"
            ),
            evidence,
            kind: "consistency",
            caused_by: None,
        })
        .collect()
}
