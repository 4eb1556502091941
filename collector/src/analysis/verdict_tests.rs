//! The mail-level verdicts and root causes on the scenarios of the lab (`tests/tests/mail_verdicts.rs`
//! runs them end to end): views in, matrix rows and diagnoses out.

use std::collections::BTreeMap;

use mxscope_proto::{facts, pb, Metric};

use super::cross::{diagnosis, matrix};
use super::diagnosis::{agent_faults, SeriesView};
use super::scope::{Quorum, RegionState};

const REGIONS: [&str; 4] = ["ap-south", "eu-west", "sa-east", "us-east"];

/// One series' view; `class` set means failing (or warning with `warn`).
struct V {
    view: SeriesView,
}

impl V {
    fn smtp(target: &str, host: &str, ip: &str, pref: u16, region: &str) -> V {
        V {
            view: SeriesView {
                target: target.into(),
                endpoint: format!("{host}[{ip}]:25"),
                check: "smtp".into(),
                region: region.into(),
                agent_id: format!("agent-{region}"),
                state: RegionState::Ok,
                outcome: "ok".into(),
                error_class: None,
                phase: None,
                message: String::new(),
                facts: [
                    (facts::mx::PREFERENCE.to_string(), pref.to_string()),
                    (facts::address::VIA_MX.to_string(), "true".to_string()),
                    (
                        facts::smtp::BANNER.to_string(),
                        format!("{host} ESMTP Postfix"),
                    ),
                    (
                        facts::smtp::under(facts::smtp::PREFIX, "extensions"),
                        "PIPELINING SIZE STARTTLS ENHANCEDSTATUSCODES 8BITMIME".to_string(),
                    ),
                    (facts::cert::SHA256.to_string(), "aa".repeat(32)),
                    (facts::cert::ISSUER.to_string(), "CN=lab CA".to_string()),
                ]
                .into_iter()
                .collect(),
                canary: false,
            },
        }
    }

    fn mx(target: &str, hosts: &[(u16, &str, &str)], region: &str) -> V {
        let mut v = V::smtp(target, target, "", 0, region);
        v.view.endpoint = target.to_string();
        v.view.check = "mx".into();
        v.view.facts.clear();
        for (i, (pref, host, addrs)) in hosts.iter().enumerate() {
            let f = &mut v.view.facts;
            f.insert(facts::mx::nth(i, facts::mx::field::HOST), host.to_string());
            f.insert(
                facts::mx::nth(i, facts::mx::field::PREFERENCE),
                pref.to_string(),
            );
            f.insert(
                facts::mx::nth(i, facts::mx::field::ADDRS),
                addrs.to_string(),
            );
        }
        v
    }

    fn fails(mut self, class: &str, phase: &str) -> V {
        self.view.state = RegionState::Failing;
        self.view.outcome = "fail".into();
        self.view.error_class = Some(class.into());
        self.view.phase = Some(phase.into());
        if phase == "connect" {
            for k in [
                facts::smtp::BANNER,
                facts::cert::SHA256,
                facts::cert::ISSUER,
            ] {
                self.view.facts.remove(k);
            }
            self.view
                .facts
                .remove(&facts::smtp::under(facts::smtp::PREFIX, "extensions"));
        }
        self
    }

    fn warns(mut self, class: &str, phase: &str) -> V {
        self.view.outcome = "warn".into();
        self.view.error_class = Some(class.into());
        self.view.phase = Some(phase.into());
        self
    }

    fn fact(mut self, key: &str, value: &str) -> V {
        self.view.facts.insert(key.into(), value.into());
        self
    }

    fn without(mut self, key: &str) -> V {
        self.view.facts.remove(key);
        self
    }
}

/// ap-south cannot reach port 25 anywhere (its agent's own network): every smtp view there
/// fails with a connect timeout, and it probes two other targets that fail the same way.
fn with_blocked_ap(mut views: Vec<V>) -> Vec<SeriesView> {
    let ap: Vec<V> = views
        .iter()
        .filter(|v| v.view.check == "smtp" && v.view.region == "eu-west")
        .map(|v| {
            let mut c = V {
                view: v.view.clone(),
            };
            c.view.region = "ap-south".into();
            c.view.agent_id = "agent-ap-south".into();
            c.fails("timeout", "connect")
        })
        .collect();
    views.extend(ap);
    for t in ["other1.test", "other2.test"] {
        for r in REGIONS {
            let v = V::smtp(t, &format!("mx.{t}"), "198.18.0.2", 10, r);
            views.push(if r == "ap-south" {
                v.fails("timeout", "connect")
            } else {
                v
            });
        }
    }
    views.into_iter().map(|v| v.view).collect()
}

fn row(views: &[SeriesView], target: &str) -> pb::MatrixRow {
    let m = matrix(
        views,
        &BTreeMap::new(),
        Metric::Reachability,
        Quorum::Majority,
        "smtp",
    );
    m.rows
        .into_iter()
        .find(|r| r.target == target)
        .expect("a matrix row")
}

fn state_of(row: &pb::MatrixRow, region: &str) -> String {
    row.cells
        .iter()
        .find(|c| c.region == region)
        .map(|c| c.state.clone())
        .unwrap_or_default()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Both MX hosts per counted region, the second one failing as `fail`.
fn two_mx(target: &str, failing_pref: u16) -> Vec<V> {
    let mut out = Vec::new();
    for r in ["eu-west", "sa-east", "us-east"] {
        let (a, b) = if failing_pref == 20 {
            (
                V::smtp(target, "mx.lab.test", "198.18.0.2", 10, r),
                V::smtp(target, &format!("mx2.{target}"), "198.18.0.3", 20, r)
                    .fails("refused", "connect"),
            )
        } else {
            (
                V::smtp(target, &format!("mx1.{target}"), "198.18.0.3", 10, r)
                    .fails("refused", "connect"),
                V::smtp(target, "mx.lab.test", "198.18.0.2", 20, r),
            )
        };
        out.extend([a, b]);
    }
    out
}

#[test]
fn a_refusing_backup_mx_is_redundancy_not_down() {
    let views = with_blocked_ap(two_mx("backup.test", 20));
    let r = row(&views, "backup.test");
    assert_eq!((r.scope.as_str(), r.basis.as_str()), ("up", "mail"));
    assert!(r.failing_regions.is_empty());
    assert_eq!(state_of(&r, "ap-south"), "agent");
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("backup MX mx2.backup.test")),
        "{:?}",
        r.notes
    );
    let d = diagnosis("backup.test", &views);
    let f = &d.findings[0];
    assert_eq!(
        (f.kind.as_str(), f.severity.as_str(), f.layer.as_str()),
        ("redundancy", "warn", "network"),
        "{d:#?}"
    );
    assert_eq!(f.scope, "everywhere");
    assert_eq!(f.regions, strs(&["eu-west", "sa-east", "us-east"]));
    assert!(
        f.summary
            .contains("backup MX mx2.backup.test (198.18.0.3, preference 20)"),
        "{}",
        f.summary
    );
    assert!(f.summary.contains("through mx.lab.test"), "{}", f.summary);
    assert!(!d.findings.iter().any(|f| f.kind == "mail_flow"), "{d:#?}");
    assert!(d
        .findings
        .iter()
        .any(|f| f.kind == "agent_network" && f.regions == strs(&["ap-south"])));
    assert!(
        d.explanation.starts_with(
            "Mail to backup.test flows from every region judged (eu-west, sa-east, us-east)."
        ),
        "{}",
        d.explanation
    );
    assert!(
        d.explanation.contains("Not counted: ap-south"),
        "{}",
        d.explanation
    );
    assert!(
        d.explanation
            .contains("Check next: whether the service runs"),
        "{}",
        d.explanation
    );
}

#[test]
fn a_refusing_primary_with_a_working_backup_is_redundancy() {
    let views = with_blocked_ap(two_mx("primary.test", 10));
    assert_eq!(row(&views, "primary.test").scope, "up");
    let d = diagnosis("primary.test", &views);
    let f = &d.findings[0];
    assert_eq!(
        (f.kind.as_str(), f.severity.as_str()),
        ("redundancy", "warn")
    );
    assert!(
        f.summary.contains("primary MX mx1.primary.test"),
        "{}",
        f.summary
    );
}

#[test]
fn every_mx_unreachable_from_one_region_is_mail_not_flowing_there() {
    let mut views = Vec::new();
    for r in ["eu-west", "sa-east", "us-east"] {
        let a = V::smtp("geo.test", "mx1.geo.test", "198.18.0.4", 10, r);
        let b = V::smtp("geo.test", "mx2.geo.test", "198.18.0.10", 20, r);
        if r == "us-east" {
            views.extend([a.fails("timeout", "connect"), b.fails("timeout", "connect")]);
        } else {
            views.extend([a, b]);
        }
    }
    let views = with_blocked_ap(views);
    let r = row(&views, "geo.test");
    assert_eq!(r.scope, "partial");
    assert_eq!(r.failing_regions, strs(&["us-east"]));
    let d = diagnosis("geo.test", &views);
    let f = &d.findings[0];
    assert_eq!(
        (
            f.kind.as_str(),
            f.severity.as_str(),
            f.layer.as_str(),
            f.scope.as_str()
        ),
        ("mail_flow", "fail", "network", "regions"),
        "{d:#?}"
    );
    assert_eq!(f.regions, strs(&["us-east"]));
    assert!(f.evidence.iter().any(|e| e.contains("mx1.geo.test")));
    assert!(f.evidence.iter().any(|e| e.contains("mx2.geo.test")));
    assert!(
        d.explanation.starts_with(
            "Mail to geo.test flows from eu-west, sa-east; it does not flow from us-east."
        ),
        "{}",
        d.explanation
    );
    // The same failure in every counted region is down.
    let mut all: Vec<SeriesView> = views.clone();
    for v in all.iter_mut().filter(|v| v.target == "geo.test") {
        v.state = RegionState::Failing;
        v.error_class = Some("timeout".into());
        v.phase = Some("connect".into());
    }
    assert_eq!(row(&all, "geo.test").scope, "down");
}

#[test]
fn dns_answers_rewritten_for_one_region_come_first_with_their_consequences() {
    let mut views = Vec::new();
    for r in REGIONS {
        let ip = if r == "sa-east" {
            "198.18.0.9"
        } else {
            "198.18.0.2"
        };
        let serial = if r == "sa-east" { "2" } else { "1" };
        views.push(
            V::mx("dnsrw.test", &[(10, "mx.dnsrw.test", ip)], r)
                .fact(facts::mx::SOA_SERIAL, serial),
        );
        let s = V::smtp("dnsrw.test", "mx.dnsrw.test", ip, 10, r);
        views.push(if r == "sa-east" {
            s.fails("refused", "connect")
        } else {
            s
        });
    }
    let views = with_blocked_ap(views);
    let r = row(&views, "dnsrw.test");
    assert_eq!(
        (r.scope.as_str(), r.failing_regions.clone()),
        ("partial", strs(&["sa-east"]))
    );
    assert!(
        r.notes.iter().any(|n| n.contains("different DNS answers")),
        "{:?}",
        r.notes
    );
    let d = diagnosis("dnsrw.test", &views);
    let f = &d.findings[0];
    assert_eq!(
        (
            f.kind.as_str(),
            f.layer.as_str(),
            f.scope.as_str(),
            f.severity.as_str()
        ),
        ("dns_divergence", "dns", "regions", "fail"),
        "{d:#?}"
    );
    assert_eq!(f.regions, strs(&["sa-east"]));
    assert!(
        f.summary.contains("198.18.0.9") && f.summary.contains("198.18.0.2"),
        "{}",
        f.summary
    );
    assert!(
        f.evidence
            .iter()
            .any(|e| e.contains("zone serial 2 there, 1 elsewhere")),
        "{:?}",
        f.evidence
    );
    let caused: Vec<&pb::Finding> = d
        .findings
        .iter()
        .filter(|f| f.caused_by == Some(0))
        .collect();
    assert!(
        caused
            .iter()
            .any(|c| c.kind == "mail_flow" && c.regions == strs(&["sa-east"])),
        "{d:#?}"
    );
    assert!(
        !d.findings
            .iter()
            .skip(1)
            .any(|f| f.caused_by.is_none() && f.regions.contains(&"sa-east".to_string())),
        "sa-east's failure is listed only as a consequence: {d:#?}"
    );
    assert!(
        d.explanation.contains("Root cause for sa-east"),
        "{}",
        d.explanation
    );
    assert!(
        d.explanation
            .contains("Check next: the resolvers sa-east uses"),
        "{}",
        d.explanation
    );
}

#[test]
fn the_smtp_dialogue_altered_on_one_path_is_named_with_its_signature() {
    let mut views = Vec::new();
    for r in ["eu-west", "sa-east", "us-east"] {
        let v = V::smtp("alt.test", "mx.alt.test", "198.18.0.5", 10, r);
        views.push(if r == "eu-west" {
            v.fact(facts::smtp::BANNER, "*****************************")
                .fact(
                    &facts::smtp::under(facts::smtp::PREFIX, "extensions"),
                    "PIPELINING SIZE XXXXXXXA ENHANCEDSTATUSCODES 8BITMIME",
                )
                .without(facts::cert::SHA256)
                .warns("no_starttls", "ehlo")
        } else {
            v
        });
    }
    let views = with_blocked_ap(views);
    assert_eq!(
        row(&views, "alt.test").scope,
        "up",
        "mail flows, in plain text"
    );
    let d = diagnosis("alt.test", &views);
    let f = &d.findings[0];
    assert_eq!(
        (f.kind.as_str(), f.scope.as_str(), f.regions.clone()),
        ("smtp_altered", "regions", strs(&["eu-west"])),
        "{d:#?}"
    );
    assert!(f.summary.contains("STARTTLS missing"), "{}", f.summary);
    assert!(f.summary.contains("XXXXXXXA in its place"), "{}", f.summary);
    assert!(f.summary.contains("banner masked"), "{}", f.summary);
    assert!(f.summary.contains("SMTP inspection"), "{}", f.summary);
    assert!(
        d.findings
            .iter()
            .any(|c| c.caused_by == Some(0) && c.summary.contains("no_starttls")),
        "{d:#?}"
    );
}

#[test]
fn a_certificate_of_another_issuer_in_one_region_is_tls_interception() {
    let mut views = Vec::new();
    for r in ["eu-west", "sa-east", "us-east"] {
        let v = V::smtp("tls.test", "mx.tls.test", "198.18.0.6", 10, r);
        views.push(if r == "us-east" {
            v.fact(facts::cert::SHA256, &"bb".repeat(32))
                .fact(facts::cert::ISSUER, "CN=Inspection CA")
                .fact(facts::smtp::BANNER, "proxy.example ESMTP")
                .warns("cert_untrusted", "tls")
        } else {
            v
        });
    }
    let views = with_blocked_ap(views);
    assert_eq!(row(&views, "tls.test").scope, "up");
    let d = diagnosis("tls.test", &views);
    let f = &d.findings[0];
    assert_eq!(
        (f.kind.as_str(), f.layer.as_str(), f.regions.clone()),
        ("tls_interception", "tls", strs(&["us-east"])),
        "{d:#?}"
    );
    assert!(
        f.summary
            .contains("'CN=Inspection CA' there, by 'CN=lab CA'"),
        "{}",
        f.summary
    );
    assert!(d
        .findings
        .iter()
        .any(|c| c.caused_by == Some(0) && c.summary.contains("cert_untrusted")));
    // The other server's banner is evidence of the same cause, not a second root.
    assert!(
        !d.findings.iter().any(|f| f.kind == "smtp_altered"),
        "{d:#?}"
    );
    assert!(
        f.evidence
            .iter()
            .any(|e| e.contains("banner 'proxy.example ESMTP'")),
        "{:?}",
        f.evidence
    );
    // The same issuer with another fingerprint is no interception: a consistency warning.
    let mut same_issuer = views.clone();
    for v in same_issuer.iter_mut().filter(|v| v.region == "us-east") {
        v.facts
            .insert(facts::cert::ISSUER.into(), "CN=lab CA".into());
    }
    let d = diagnosis("tls.test", &same_issuer);
    assert!(
        !d.findings.iter().any(|f| f.kind == "tls_interception"),
        "{d:#?}"
    );
    assert!(d.findings.iter().any(|f| f.kind == "consistency"), "{d:#?}");
}

#[test]
fn a_failing_address_of_a_working_host_is_redundancy_of_that_address() {
    let mut views = Vec::new();
    for r in ["eu-west", "sa-east", "us-east"] {
        views.push(V::smtp("v6.test", "mx.v6.test", "198.18.0.2", 10, r));
        views.push(V::smtp("v6.test", "mx.v6.test", "fd00::2", 10, r).fails("timeout", "connect"));
    }
    let views: Vec<SeriesView> = views.into_iter().map(|v| v.view).collect();
    let d = diagnosis("v6.test", &views);
    let f = &d.findings[0];
    assert_eq!(
        (f.kind.as_str(), f.severity.as_str()),
        ("redundancy", "warn")
    );
    assert!(
        f.summary.contains("address fd00::2 of MX mx.v6.test"),
        "{}",
        f.summary
    );
    assert_eq!(row(&views, "v6.test").scope, "up");
}

#[test]
fn null_mx_accepts_no_mail_by_design() {
    let views: Vec<SeriesView> = ["eu-west", "us-east"]
        .iter()
        .map(|r| {
            let mut v = V::smtp("null.test", "null.test", "", 0, r)
                .fact(facts::mx::NULL, "true")
                .fails("policy", "resolve")
                .view;
            v.endpoint = "null.test:25".into();
            v.facts.remove(facts::mx::PREFERENCE);
            v
        })
        .collect();
    assert_eq!(row(&views, "null.test").scope, "up");
    let d = diagnosis("null.test", &views);
    assert!(
        d.explanation
            .contains("null MX (RFC 7505): it accepts no mail, by design"),
        "{}",
        d.explanation
    );
}

#[test]
fn client_services_and_host_targets_keep_endpoint_verdicts() {
    // Submission of a domain: one failing endpoint fails the region (clients do not fail over).
    let mut views = Vec::new();
    for r in ["eu-west", "us-east", "sa-east"] {
        let mut a = V::smtp("c.test", "mx1.c.test", "198.18.0.2", 10, r);
        a.view.check = "submission".into();
        let mut b =
            V::smtp("c.test", "mx2.c.test", "198.18.0.3", 20, r).fails("refused", "connect");
        b.view.check = "submission".into();
        views.extend([a.view, b.view]);
    }
    let m = matrix(
        &views,
        &BTreeMap::new(),
        Metric::Reachability,
        Quorum::Majority,
        "submission",
    );
    assert_eq!(
        (m.rows[0].scope.as_str(), m.rows[0].basis.as_str()),
        ("down", "endpoints")
    );
    let d = diagnosis("c.test", &views);
    assert_eq!(d.findings[0].kind, "endpoint");
}

#[test]
fn a_failing_backup_on_most_targets_does_not_make_the_agent_at_fault() {
    // us-east reaches every primary but no backup (say its path to the backups' network is
    // cut): mail flows to every domain, so its agent's network is not to blame for the rest.
    let mut views = Vec::new();
    for t in ["a.test", "b.test", "c.test"] {
        for r in ["eu-west", "us-east", "sa-east"] {
            views.push(V::smtp(t, &format!("mx1.{t}"), "198.18.0.2", 10, r).view);
            let b = V::smtp(t, &format!("mx2.{t}"), "198.18.0.3", 20, r);
            views.push(if r == "us-east" {
                b.fails("timeout", "connect").view
            } else {
                b.view
            });
        }
    }
    assert!(agent_faults(&views).is_empty());
    let d = diagnosis("a.test", &views);
    assert_eq!(
        (d.findings[0].kind.as_str(), d.findings[0].regions.clone()),
        ("redundancy", strs(&["us-east"]))
    );
}

#[test]
fn addresses_that_differ_by_region_but_work_are_geo_dns_not_a_fault() {
    let mut views = Vec::new();
    for (r, ip) in [
        ("eu-west", "198.18.0.2"),
        ("us-east", "198.18.0.2"),
        ("sa-east", "198.18.0.7"),
    ] {
        views.push(V::mx("geo.test", &[(10, "mx.geo.test", ip)], r).view);
        views.push(V::smtp("geo.test", "mx.geo.test", ip, 10, r).view);
    }
    let d = diagnosis("geo.test", &views);
    assert_eq!(d.findings[0].kind, "none", "{d:#?}");
    let note = d
        .findings
        .iter()
        .find(|f| f.kind == "dns_divergence")
        .expect("the difference is still said");
    assert_eq!(note.severity, "ok");
    assert!(note.summary.contains("geo DNS"), "{}", note.summary);
    assert!(
        d.explanation.contains("Note: sa-east gets"),
        "{}",
        d.explanation
    );
}
