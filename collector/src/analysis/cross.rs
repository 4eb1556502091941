//! Cross-region views built from stored series and rollups: the matrix (targets × regions with a
//! scope per (target, check)), latency per region and phase, and the diagnosis response. Pure.

use std::collections::{BTreeMap, BTreeSet};

use mxscope_proto::pb;
pub use mxscope_proto::Metric;

use super::aggregate::Agg;
use super::diagnosis::{agent_faults, diagnose_rows, explain, Finding, SeriesView};
use super::mail;
use super::scope::{scope, Quorum, RegionState};
use super::series::{SeriesId, SeriesRow};
use super::status::{is_stale, StatusParams};

/// The phase latency metrics of a check use: how long it takes to reach the service.
/// Port checks: `connect` (the TCP handshake, one round trip: what a path problem changes);
/// `icmp`: `echo`; DNS-only checks: `resolve`; anything else: `total`.
pub fn latency_phase(check: &str) -> &'static str {
    match check {
        "smtp" | "smtps" | "submission" | "imap" | "imaps" | "pop3" | "pop3s" => "connect",
        "icmp" => "echo",
        "mx" | "spf" | "dmarc" | "dkim" | "tlsrpt" | "dane" | "dnsbl" => "resolve",
        _ => "total",
    }
}

/// The analysis view of every series: state after hysteresis, or `Stale` (old data or silent agent).
pub fn views(
    series: &[SeriesRow],
    canaries: &BTreeSet<String>,
    p: &StatusParams,
) -> Vec<SeriesView> {
    series
        .iter()
        .map(|s| {
            let state = if is_stale(s, p) {
                RegionState::Stale
            } else if s.failing {
                RegionState::Failing
            } else {
                RegionState::Ok
            };
            let outcome = match pb::Outcome::try_from(s.last_outcome) {
                Ok(pb::Outcome::Ok) => "ok",
                Ok(pb::Outcome::Warn) => "warn",
                _ => "fail",
            };
            SeriesView {
                target: s.target.clone(),
                endpoint: s.endpoint.clone(),
                check: s.check.clone(),
                region: s.region.clone(),
                agent_id: s.agent_id.clone(),
                state,
                outcome: outcome.to_string(),
                error_class: Some(s.last_error.clone()).filter(|e| !e.is_empty()),
                phase: Some(s.last_phase.clone()).filter(|p| !p.is_empty()),
                message: s.last_message.clone(),
                facts: s.last_facts.clone(),
                canary: canaries.contains(&s.target),
            }
        })
        .collect()
}

/// Builds the matrix. `views` must cover every series (agent faults are judged across all
/// targets and checks); `check` (empty = all) limits the rows. One row per (target, check):
/// - a region is `failing` when one of its fresh endpoints is failing — for port 25 of a domain
///   (basis `mail`, see [`mail`]) when no MX host completes the dialogue there — `agent` when those
///   failures are its agent's own network (not counted), `stale` when all its endpoints are stale;
/// - `scope` combines the regions with the quorum; `failing_regions` names them;
/// - cells hold the metric over the rollups of the window, merged over the region's endpoints;
/// - `notes` name excluded agents, MX hosts failing while mail flows, and the root causes and
///   consistency findings of the target's diagnosis that concern the check.
pub fn matrix(
    views: &[SeriesView],
    rollups: &BTreeMap<SeriesId, Agg>,
    metric: Metric,
    quorum: Quorum,
    check: &str,
) -> pb::MatrixResponse {
    let faults = agent_faults(views);
    let mut groups: BTreeMap<(&str, &str), Vec<&SeriesView>> = BTreeMap::new();
    for v in views
        .iter()
        .filter(|v| check.is_empty() || v.check == check)
    {
        groups
            .entry((v.target.as_str(), v.check.as_str()))
            .or_default()
            .push(v);
    }
    let regions: BTreeSet<&str> = groups
        .values()
        .flatten()
        .map(|v| v.region.as_str())
        .collect();
    let mut aggs: BTreeMap<(&str, &str, &str), Agg> = BTreeMap::new();
    for (id, a) in rollups {
        aggs.entry((id.target.as_str(), id.check.as_str(), id.region.as_str()))
            .or_default()
            .merge(a);
    }
    let mut by_target: BTreeMap<&str, Vec<&SeriesView>> = BTreeMap::new();
    for v in views {
        by_target.entry(v.target.as_str()).or_default().push(v);
    }
    let mut findings: BTreeMap<&str, Vec<Finding>> = BTreeMap::new();
    let mut rows = Vec::new();
    for ((target, chk), vs) in &groups {
        let mail_verdicts = mail::is_mail_group(chk, vs).then(|| mail::by_region(vs, &faults));
        let mut by_region: BTreeMap<&str, Vec<&SeriesView>> = BTreeMap::new();
        for v in vs {
            by_region.entry(v.region.as_str()).or_default().push(v);
        }
        let mut states = Vec::new();
        let mut notes = Vec::new();
        let mut cells = Vec::new();
        for (region, rvs) in &by_region {
            let failing: Vec<&&SeriesView> = rvs
                .iter()
                .filter(|v| v.state == RegionState::Failing)
                .collect();
            let state = match &mail_verdicts {
                Some(m) => m.get(region).map_or(RegionState::Stale, |m| m.state),
                None if rvs.iter().all(|v| v.state == RegionState::Stale) => RegionState::Stale,
                None if failing.is_empty() => RegionState::Ok,
                None if failing
                    .iter()
                    .all(|v| faults.contains(&(v.agent_id.clone(), v.check.clone()))) =>
                {
                    RegionState::AgentFault
                }
                None => RegionState::Failing,
            };
            if state == RegionState::AgentFault {
                let agents: BTreeSet<&str> = failing.iter().map(|v| v.agent_id.as_str()).collect();
                notes.push(format!(
                    "{region}: agent {} fails {chk} on most of its targets while others succeed \
                     (its own network); not counted",
                    agents.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            states.push((region.to_string(), state));
            let agg = aggs.get(&(*target, *chk, *region));
            let phase = latency_phase(chk);
            let value = agg.and_then(|a| match metric.quantile() {
                None => a.reachability(),
                Some(q) => a
                    .phases
                    .get(phase)
                    .and_then(|s| s.quantile(q))
                    .map(|us| us / 1000.0),
            });
            cells.push(pb::MatrixCell {
                region: region.to_string(),
                value,
                state: state.name().to_string(),
            });
        }
        let sc = scope(&states, quorum);
        let found = findings.entry(target).or_insert_with(|| {
            let mine = by_target.get(target).map_or(&[][..], Vec::as_slice);
            diagnose_rows(target, mine, &faults)
        });
        notes.extend(row_notes(found, chk));
        rows.push(pb::MatrixRow {
            target: target.to_string(),
            check: chk.to_string(),
            scope: sc.scope.name().to_string(),
            failing_regions: sc.failing,
            cells,
            notes,
            phase: if metric == Metric::Reachability {
                String::new()
            } else {
                latency_phase(chk).to_string()
            },
            basis: if mail_verdicts.is_some() {
                "mail"
            } else {
                "endpoints"
            }
            .to_string(),
        });
    }
    pb::MatrixResponse {
        regions: regions.into_iter().map(str::to_string).collect(),
        rows,
        metric: metric.name().to_string(),
        truncated: false,
        next_offset: 0,
    }
}

/// The findings worth a note on the matrix row of `check`: redundancy, consistency and the root
/// causes behind the check's failures (the failures themselves are the row's cells).
fn row_notes(findings: &[Finding], check: &str) -> Vec<String> {
    findings
        .iter()
        .enumerate()
        .filter(|(i, f)| {
            let explains_check = findings
                .iter()
                .any(|c| c.caused_by == Some(*i) && c.check == check);
            match f.kind {
                "redundancy" | "consistency" => f.check == check,
                "dns_divergence" | "smtp_altered" | "tls_interception" => {
                    f.check == check || explains_check
                }
                _ => false,
            }
        })
        .map(|(_, f)| {
            if f.kind == "consistency" {
                format!("{}: {}", f.summary, f.evidence.join("; "))
            } else {
                f.summary.clone()
            }
        })
        .collect()
}

/// Where a phase is listed: as a probe walks them (the order of `Phase`), unknown names last.
fn phase_rank(p: &str) -> usize {
    mxscope_proto::Phase::ALL
        .iter()
        .position(|x| x.name() == p)
        .unwrap_or(mxscope_proto::Phase::ALL.len())
}

/// Latency per (check, phase, region) of one target's rollups, merged over endpoints; `phase`
/// (empty = all) limits the phases. Rows by check, phase (probe order), then region.
pub fn latency(rollups: &BTreeMap<SeriesId, Agg>, phase: &str) -> Vec<pb::LatencyRow> {
    let mut merged: BTreeMap<(&str, &str), Agg> = BTreeMap::new();
    for (id, a) in rollups {
        merged
            .entry((id.check.as_str(), id.region.as_str()))
            .or_default()
            .merge(a);
    }
    let mut rows = Vec::new();
    for ((check, region), a) in &merged {
        for (p, s) in a
            .phases
            .iter()
            .filter(|(p, _)| phase.is_empty() || *p == phase)
        {
            let ms = |q: f64| s.quantile(q).map_or(0.0, |us| us / 1000.0);
            if s.is_empty() {
                continue;
            }
            rows.push(pb::LatencyRow {
                region: region.to_string(),
                check: check.to_string(),
                phase: p.to_string(),
                p50_ms: ms(0.5),
                p95_ms: ms(0.95),
                p99_ms: ms(0.99),
                count: s.count(),
            });
        }
    }
    rows.sort_by(|a, b| {
        (
            a.check.as_str(),
            phase_rank(&a.phase),
            a.phase.as_str(),
            a.region.as_str(),
        )
            .cmp(&(
                b.check.as_str(),
                phase_rank(&b.phase),
                b.phase.as_str(),
                b.region.as_str(),
            ))
    });
    rows
}

fn finding_to_wire(f: &Finding) -> pb::Finding {
    pb::Finding {
        layer: f.layer.map_or("none", |l| l.name()).to_string(),
        scope: f.scope.to_string(),
        regions: f.regions.clone(),
        check: f.check.clone(),
        summary: f.summary.clone(),
        evidence: f.evidence.clone(),
        severity: f.severity.to_string(),
        kind: f.kind.to_string(),
        caused_by: f.caused_by.and_then(|i| u32::try_from(i).ok()),
    }
}

/// Diagnoses `target` over every series' view (agent faults judged across all targets), with
/// the paragraph that explains it.
pub fn diagnosis(target: &str, views: &[SeriesView]) -> pb::DiagnoseResponse {
    let faults = agent_faults(views);
    let mine: Vec<&SeriesView> = views.iter().filter(|v| v.target == target).collect();
    let found = diagnose_rows(target, &mine, &faults);
    let explanation = explain(target, &mine, &found, &faults);
    let findings: Vec<pb::Finding> = found.iter().map(finding_to_wire).collect();
    let first = findings.first().cloned().unwrap_or_default();
    pb::DiagnoseResponse {
        target: target.to_string(),
        layer: first.layer,
        scope: first.scope,
        regions: first.regions,
        evidence: first.evidence,
        summary: first.summary,
        check: first.check,
        findings,
        explanation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 10_000_000_000_000;
    const SEC: i64 = 1_000_000;

    fn params() -> StatusParams {
        StatusParams {
            now_us: NOW,
            stale_after_us: 120 * SEC,
        }
    }

    fn series(target: &str, check: &str, region: &str, failing: bool, class: &str) -> SeriesRow {
        SeriesRow {
            target: target.into(),
            endpoint: format!("mx.{target}[198.18.0.2]:25"),
            check: check.into(),
            region: region.into(),
            last_outcome: if failing {
                pb::Outcome::Fail
            } else {
                pb::Outcome::Ok
            } as i32,
            last_error: class.into(),
            last_message: String::new(),
            last_seen_us: NOW - 10 * SEC,
            interval_ms: 60_000,
            failing,
            state_since_us: 0,
            agent_id: format!("agent-{region}"),
            agent_last_seen_us: Some(NOW - 5 * SEC),
            last_phase: if failing {
                "connect".into()
            } else {
                String::new()
            },
            last_facts: BTreeMap::new(),
        }
    }

    fn connect_agg(ms: &[u64], fails: u64) -> Agg {
        let mut a = Agg::default();
        for m in ms {
            a.add(&pb::ProbeResult {
                outcome: pb::Outcome::Ok as i32,
                timings: vec![
                    pb::PhaseTiming {
                        phase: "connect".into(),
                        micros: m * 1000,
                    },
                    pb::PhaseTiming {
                        phase: "total".into(),
                        micros: m * 3000,
                    },
                ],
                ..Default::default()
            });
        }
        for _ in 0..fails {
            a.add(&pb::ProbeResult {
                outcome: pb::Outcome::Fail as i32,
                ..Default::default()
            });
        }
        a
    }

    fn id(target: &str, check: &str, region: &str) -> SeriesId {
        SeriesId {
            target: target.into(),
            check: check.into(),
            region: region.into(),
            endpoint: format!("mx.{target}[198.18.0.2]:25"),
        }
    }

    #[test]
    fn one_failing_region_is_partial_and_named() {
        let rows = vec![
            series("lab.test", "smtp", "eu-west", false, ""),
            series("lab.test", "smtp", "us-east", false, ""),
            series("lab.test", "smtp", "ap-south", true, "timeout"),
            series("lab.test", "submission", "ap-south", false, ""),
        ];
        let v = views(&rows, &BTreeSet::new(), &params());
        let rollups: BTreeMap<_, _> = [
            (
                id("lab.test", "smtp", "eu-west"),
                connect_agg(&[10, 11, 12], 0),
            ),
            (id("lab.test", "smtp", "ap-south"), connect_agg(&[], 4)),
        ]
        .into_iter()
        .collect();
        let m = matrix(&v, &rollups, Metric::Reachability, Quorum::Majority, "");
        assert_eq!(m.regions, vec!["ap-south", "eu-west", "us-east"]);
        assert_eq!(m.rows.len(), 2);
        let smtp = &m.rows[0];
        assert_eq!(
            (smtp.check.as_str(), smtp.scope.as_str()),
            ("smtp", "partial")
        );
        assert_eq!(smtp.failing_regions, vec!["ap-south"]);
        let cell = |r: &pb::MatrixRow, region: &str| {
            r.cells
                .iter()
                .find(|c| c.region == region)
                .cloned()
                .unwrap()
        };
        assert_eq!(cell(smtp, "ap-south").value, Some(0.0));
        assert_eq!(cell(smtp, "ap-south").state, "failing");
        assert_eq!(cell(smtp, "eu-west").value, Some(1.0));
        assert_eq!(
            cell(smtp, "us-east").value,
            None,
            "no rollups in the window"
        );
        assert_eq!(m.rows[1].scope, "up");

        let m = matrix(&v, &rollups, Metric::P50, Quorum::Majority, "smtp");
        assert_eq!(m.rows.len(), 1);
        assert_eq!(m.rows[0].phase, "connect");
        let p50 = cell(&m.rows[0], "eu-west").value.unwrap();
        assert!((p50 - 11.0).abs() <= 0.11, "{p50}");

        // Quorum 1: a single failing region is enough for down.
        let m = matrix(
            &v,
            &rollups,
            Metric::Reachability,
            Quorum::AtLeast(1),
            "smtp",
        );
        assert_eq!(m.rows[0].scope, "down");
    }

    #[test]
    fn agent_faults_are_excluded_and_noted() {
        let mut rows = Vec::new();
        for t in ["a.test", "b.test", "c.test"] {
            rows.push(series(t, "smtp", "eu-west", false, ""));
            rows.push(series(t, "smtp", "us-east", false, ""));
            rows.push(series(t, "smtp", "ap-south", true, "timeout"));
        }
        // b.test also fails from us-east: that one counts against b.test.
        rows[4].failing = true;
        let v = views(&rows, &BTreeSet::new(), &params());
        let m = matrix(
            &v,
            &BTreeMap::new(),
            Metric::Reachability,
            Quorum::Majority,
            "smtp",
        );
        assert_eq!(m.rows.len(), 3);
        let a = &m.rows[0];
        assert_eq!(a.scope, "up", "{a:?}");
        assert!(a.failing_regions.is_empty());
        assert!(
            a.notes
                .iter()
                .any(|n| n.contains("agent-ap-south") && n.contains("not counted")),
            "{:?}",
            a.notes
        );
        let ap = a.cells.iter().find(|c| c.region == "ap-south").unwrap();
        assert_eq!(ap.state, "agent");
        let b = &m.rows[1];
        // Of the two fresh, counted regions one fails: not a majority.
        assert_eq!(
            (b.scope.as_str(), b.failing_regions.clone()),
            ("partial", vec!["us-east".to_string()])
        );
    }

    #[test]
    fn stale_regions_and_silent_agents() {
        let mut rows = vec![
            series("t.test", "imap", "eu-west", false, ""),
            series("t.test", "imap", "us-east", false, ""),
        ];
        rows[0].agent_last_seen_us = Some(NOW - 600 * SEC);
        rows[1].last_seen_us = NOW - 3600 * SEC;
        let v = views(&rows, &BTreeSet::new(), &params());
        let m = matrix(
            &v,
            &BTreeMap::new(),
            Metric::Reachability,
            Quorum::Majority,
            "",
        );
        assert_eq!(m.rows[0].scope, "stale");
        assert!(m.rows[0].cells.iter().all(|c| c.state == "stale"));
    }

    #[test]
    fn different_certificates_are_noted() {
        let mut rows = vec![
            series("t.test", "smtp", "eu-west", false, ""),
            series("t.test", "smtp", "us-east", false, ""),
        ];
        rows[0]
            .last_facts
            .insert(mxscope_proto::facts::cert::SHA256.into(), "aa".into());
        rows[1]
            .last_facts
            .insert(mxscope_proto::facts::cert::SHA256.into(), "bb".into());
        let v = views(&rows, &BTreeSet::new(), &params());
        let m = matrix(
            &v,
            &BTreeMap::new(),
            Metric::Reachability,
            Quorum::Majority,
            "",
        );
        assert_eq!(m.rows[0].scope, "up");
        assert!(
            m.rows[0]
                .notes
                .iter()
                .any(|n| n.contains("different certificates")),
            "{:?}",
            m.rows[0].notes
        );
    }

    #[test]
    fn latency_rows_per_region_and_phase() {
        let rollups: BTreeMap<_, _> = [
            (
                id("t.test", "smtp", "eu-west"),
                connect_agg(&[10, 10, 10], 1),
            ),
            (
                id("t.test", "smtp", "ap-south"),
                connect_agg(&[150, 150], 0),
            ),
        ]
        .into_iter()
        .collect();
        let rows = latency(&rollups, "");
        let got: Vec<(&str, &str, u64)> = rows
            .iter()
            .map(|r| (r.phase.as_str(), r.region.as_str(), r.count))
            .collect();
        assert_eq!(
            got,
            vec![
                ("connect", "ap-south", 2),
                ("connect", "eu-west", 3),
                ("total", "ap-south", 2),
                ("total", "eu-west", 3),
            ]
        );
        assert!((rows[0].p50_ms - 150.0).abs() <= 1.5);
        assert!((rows[1].p99_ms - 10.0).abs() <= 0.1);
        let only = latency(&rollups, "total");
        assert_eq!(only.len(), 2);
        assert!(only.iter().all(|r| r.phase == "total"));
    }

    #[test]
    fn diagnosis_response_lifts_the_first_finding() {
        let rows = vec![
            series("lab.test", "smtp", "eu-west", false, ""),
            series("lab.test", "smtp", "us-east", false, ""),
            series("lab.test", "smtp", "ap-south", true, "timeout"),
        ];
        let d = diagnosis("lab.test", &views(&rows, &BTreeSet::new(), &params()));
        assert_eq!(d.layer, "network");
        assert_eq!(d.scope, "regions");
        assert_eq!(d.regions, vec!["ap-south"]);
        assert_eq!(d.check, "smtp");
        assert_eq!(d.findings[0].severity, "fail");
        assert!(
            d.evidence[0].contains("timeout in connect"),
            "{:?}",
            d.evidence
        );
        let none = diagnosis("other.test", &views(&rows, &BTreeSet::new(), &params()));
        assert_eq!((none.layer.as_str(), none.scope.as_str()), ("none", "none"));
    }

    #[test]
    fn phases_and_metrics() {
        assert_eq!(latency_phase("smtp"), "connect");
        assert_eq!(latency_phase("mx"), "resolve");
        assert_eq!(latency_phase("icmp"), "echo");
        assert_eq!(latency_phase("delivery"), "total");
    }
}
