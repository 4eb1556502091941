//! The `Status` view: one row per (target, endpoint label, check, region) known in `series`.
//!
//! Semantics (the README copies these):
//! - **window**: the collector's `--window` (default 5m) unless the request sets `window_ms`;
//!   it ends now.
//! - **count** / **ok_count**: results in the window / those with outcome `ok`.
//! - **reachability**: (`ok` + `warn`) / count over the window; 0 when count is 0.
//! - **p50_ms** / **p95_ms**: nearest-rank percentiles of the `total` phase duration of the
//!   results in the window whose outcome is not `fail` (and that carry a `total` timing); null if
//!   there are none.
//! - **state**: `stale` when the last result started more than max(3 × the check interval,
//!   `--stale-after`) ago, or when the agent that sent it has been silent longer than
//!   `--stale-after`; else `failing` when the series' hysteresis says so (`--fail-after`
//!   consecutive failures, `--recover-after` successes to come back); else `ok`.
//! - Windows longer than [`RAW_WINDOW_MAX_US`] come from rollups (counts exact, p50/p95 from the
//!   `total` sketch within 1%, window start rounded down to the rollup bucket), never raw rows.
//! - **last_error**: the error class of the latest result when it was not `ok` (null otherwise).
//! - **last_seen_us**, **last_outcome**, **last_message**: of the latest result (by start time).

use std::collections::HashMap;

use mxscope_proto::{outcome_from_wire, pb, Outcome, Phase};

use super::aggregate::Agg;
use super::series::{Sample, SeriesId, SeriesRow};

/// Longest status window computed from raw results (exact nearest-rank percentiles).
pub const RAW_WINDOW_MAX_US: i64 = 3_600_000_000;

/// Inputs of the status computation besides the rows.
#[derive(Debug, Clone, Copy)]
pub struct StatusParams {
    pub now_us: i64,
    pub stale_after_us: i64,
}

/// Nearest-rank percentile (`p` in 0..=100) of ascending `sorted` values; `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

type Key<'a> = (&'a str, &'a str, &'a str, &'a str);

#[derive(Default)]
struct Window {
    count: u64,
    ok: u64,
    warn: u64,
    totals_ms: Vec<f64>,
}

/// Computes status rows, in the order of `series`, from the series and rollups of the window.
pub fn status_rows_from_rollups(
    series: &[SeriesRow],
    rollups: &std::collections::BTreeMap<SeriesId, Agg>,
    p: &StatusParams,
) -> Vec<pb::StatusRow> {
    series
        .iter()
        .map(|s| {
            let id = SeriesId {
                target: s.target.clone(),
                check: s.check.clone(),
                region: s.region.clone(),
                endpoint: s.endpoint.clone(),
            };
            let a = rollups.get(&id).cloned().unwrap_or_default();
            let total = a.phases.get(Phase::Total.name());
            let ms = |q: f64| total.and_then(|t| t.quantile(q)).map(|us| us / 1000.0);
            row(s, a.count, a.ok, a.warn, ms(0.5), ms(0.95), p)
        })
        .collect()
}

/// Computes status rows, in the order of `series`, from the series and the results of the window.
pub fn status_rows(
    series: &[SeriesRow],
    samples: &[Sample],
    p: &StatusParams,
) -> Vec<pb::StatusRow> {
    let mut windows: HashMap<Key<'_>, Window> = HashMap::new();
    for s in samples {
        let w = windows
            .entry((
                s.target.as_str(),
                s.endpoint.as_str(),
                s.check.as_str(),
                s.region.as_str(),
            ))
            .or_default();
        w.count += 1;
        let outcome = outcome_from_wire(s.outcome);
        match outcome {
            Some(Outcome::Ok) => w.ok += 1,
            Some(Outcome::Warn) => w.warn += 1,
            _ => {}
        }
        let usable = matches!(outcome, Some(Outcome::Ok | Outcome::Warn));
        if let (true, Some(total)) = (usable, s.total_us) {
            w.totals_ms.push(total as f64 / 1000.0);
        }
    }

    series
        .iter()
        .map(|s| {
            let key = (
                s.target.as_str(),
                s.endpoint.as_str(),
                s.check.as_str(),
                s.region.as_str(),
            );
            let mut w = windows.remove(&key).unwrap_or_default();
            w.totals_ms.sort_by(f64::total_cmp);
            let (p50, p95) = (
                percentile(&w.totals_ms, 50.0),
                percentile(&w.totals_ms, 95.0),
            );
            row(s, w.count, w.ok, w.warn, p50, p95, p)
        })
        .collect()
}

fn row(
    s: &SeriesRow,
    count: u64,
    ok: u64,
    warn: u64,
    p50_ms: Option<f64>,
    p95_ms: Option<f64>,
    p: &StatusParams,
) -> pb::StatusRow {
    let last = outcome_from_wire(s.last_outcome);
    pb::StatusRow {
        target: s.target.clone(),
        endpoint: s.endpoint.clone(),
        check: s.check.clone(),
        region: s.region.clone(),
        state: state(s, p).to_string(),
        reachability: if count == 0 {
            0.0
        } else {
            (ok + warn) as f64 / count as f64
        },
        p50_ms,
        p95_ms,
        last_error: match last {
            Some(Outcome::Ok) => None,
            _ if s.last_error.is_empty() => None,
            _ => Some(s.last_error.clone()),
        },
        last_seen_us: s.last_seen_us,
        count,
        ok_count: ok,
        last_outcome: last.map_or("unknown", Outcome::name).to_string(),
        last_message: s.last_message.clone(),
    }
}

/// Whether a series has no fresh data: its last result is older than max(3 × interval,
/// `stale_after`), or its agent has been silent longer than `stale_after`.
pub fn is_stale(s: &SeriesRow, p: &StatusParams) -> bool {
    let interval_us = i64::try_from(s.interval_ms)
        .unwrap_or(i64::MAX / 4000)
        .saturating_mul(1000);
    let fresh_for = interval_us.saturating_mul(3).max(p.stale_after_us);
    let agent_silent = s
        .agent_last_seen_us
        .is_some_and(|seen| p.now_us.saturating_sub(seen) > p.stale_after_us);
    p.now_us.saturating_sub(s.last_seen_us) > fresh_for || agent_silent
}

/// `stale` | `failing` | `ok` (see the module docs).
pub fn state(s: &SeriesRow, p: &StatusParams) -> &'static str {
    if is_stale(s, p) {
        "stale"
    } else if s.failing {
        "failing"
    } else {
        "ok"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 10_000_000_000;
    const SEC: i64 = 1_000_000;

    fn params() -> StatusParams {
        StatusParams {
            now_us: NOW,
            stale_after_us: 120 * SEC,
        }
    }

    fn series(
        endpoint: &str,
        region: &str,
        last: pb::Outcome,
        error: &str,
        age_s: i64,
        interval_ms: u64,
    ) -> SeriesRow {
        SeriesRow {
            target: "example.test".into(),
            endpoint: endpoint.into(),
            check: "smtp".into(),
            region: region.into(),
            last_outcome: last as i32,
            last_error: error.into(),
            last_message: format!("last via {endpoint}"),
            last_seen_us: NOW - age_s * SEC,
            interval_ms,
            failing: !matches!(last, pb::Outcome::Ok | pb::Outcome::Warn),
            state_since_us: 0,
            agent_id: format!("agent-{region}"),
            agent_last_seen_us: Some(NOW - SEC),
            last_phase: String::new(),
            last_facts: Default::default(),
        }
    }

    fn sample(endpoint: &str, region: &str, outcome: pb::Outcome, total_ms: Option<i64>) -> Sample {
        Sample {
            target: "example.test".into(),
            endpoint: endpoint.into(),
            check: "smtp".into(),
            region: region.into(),
            outcome: outcome as i32,
            total_us: total_ms.map(|ms| ms * 1000),
        }
    }

    #[test]
    fn percentiles_nearest_rank() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 95.0), Some(7.0));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 95.0), Some(95.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.0), Some(1.0));
    }

    #[test]
    fn reachability_counts_and_latency_skip_failures() {
        let s = vec![series("mx1", "eu-west", pb::Outcome::Ok, "", 10, 60_000)];
        let samples = vec![
            sample("mx1", "eu-west", pb::Outcome::Ok, Some(10)),
            sample("mx1", "eu-west", pb::Outcome::Ok, Some(30)),
            sample("mx1", "eu-west", pb::Outcome::Warn, Some(20)),
            // A failure counts against reachability but its (timeout) duration is not latency.
            sample("mx1", "eu-west", pb::Outcome::Fail, Some(10_000)),
            // Another region's sample belongs to another row.
            sample("mx1", "us-east", pb::Outcome::Fail, None),
        ];
        let rows = status_rows(&s, &samples, &params());
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.count, r.ok_count), (4, 2));
        assert!((r.reachability - 0.75).abs() < 1e-9, "{}", r.reachability);
        assert_eq!(r.p50_ms, Some(20.0));
        assert_eq!(r.p95_ms, Some(30.0));
        assert_eq!(r.state, "ok");
        assert_eq!(r.last_error, None);
        assert_eq!(r.last_outcome, "ok");
        assert_eq!(r.last_message, "last via mx1");
        assert_eq!(r.last_seen_us, NOW - 10 * SEC);
    }

    #[test]
    fn empty_window_has_zero_reachability_and_no_latency() {
        let s = vec![series(
            "mx1",
            "eu-west",
            pb::Outcome::Fail,
            "refused",
            10,
            60_000,
        )];
        let only_failures = vec![sample("mx1", "eu-west", pb::Outcome::Fail, Some(5))];
        let r = &status_rows(&s, &[], &params())[0];
        assert_eq!(
            (r.count, r.reachability, r.p50_ms, r.p95_ms),
            (0, 0.0, None, None)
        );
        let r = &status_rows(&s, &only_failures, &params())[0];
        assert_eq!((r.count, r.reachability, r.p50_ms), (1, 0.0, None));
    }

    #[test]
    fn states_ok_failing_stale() {
        let s = vec![
            series(
                "fresh-fail",
                "eu-west",
                pb::Outcome::Fail,
                "timeout",
                30,
                60_000,
            ),
            series(
                "fresh-warn",
                "eu-west",
                pb::Outcome::Warn,
                "cert_expiring",
                30,
                60_000,
            ),
            // 150 s old, interval 60 s: max(3 × 60 s, 120 s) = 180 s, still fresh.
            series("slow-interval", "eu-west", pb::Outcome::Ok, "", 150, 60_000),
            // 130 s old, interval 10 s: max(30 s, 120 s) = 120 s, stale even though it failed.
            series(
                "silent",
                "eu-west",
                pb::Outcome::Fail,
                "refused",
                130,
                10_000,
            ),
            // 10 min old with a 5 min interval: 3 × 5 min = 15 min, fresh.
            series(
                "long-interval",
                "eu-west",
                pb::Outcome::Ok,
                "",
                600,
                300_000,
            ),
            series(
                "unknown",
                "eu-west",
                pb::Outcome::Unspecified,
                "",
                1,
                60_000,
            ),
        ];
        let rows = status_rows(&s, &[], &params());
        let got: Vec<(&str, &str, Option<&str>)> = rows
            .iter()
            .map(|r| {
                (
                    r.endpoint.as_str(),
                    r.state.as_str(),
                    r.last_error.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("fresh-fail", "failing", Some("timeout")),
                ("fresh-warn", "ok", Some("cert_expiring")),
                ("slow-interval", "ok", None),
                ("silent", "stale", Some("refused")),
                ("long-interval", "ok", None),
                ("unknown", "failing", None),
            ]
        );
        assert_eq!(rows[5].last_outcome, "unknown");
    }

    #[test]
    fn hysteresis_and_silent_agents_decide_the_state() {
        // One failure after successes: the hysteresis has not flipped yet, so still ok.
        let mut pending = series("mx1", "eu-west", pb::Outcome::Fail, "timeout", 5, 60_000);
        pending.failing = false;
        // Recovering: the last result is ok but the series still needs more successes.
        let mut recovering = series("mx1", "us-east", pb::Outcome::Ok, "", 5, 60_000);
        recovering.failing = true;
        // A fresh series whose agent has been silent past --stale-after is stale, not ok.
        let mut silent = series("mx1", "ap-south", pb::Outcome::Ok, "", 60, 300_000);
        silent.agent_last_seen_us = Some(NOW - 200 * SEC);
        let rows = status_rows(&[pending, recovering, silent], &[], &params());
        let states: Vec<&str> = rows.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, vec!["ok", "failing", "stale"]);
        assert_eq!(rows[0].last_error.as_deref(), Some("timeout"));
    }

    #[test]
    fn long_windows_come_from_rollups() {
        let s = vec![series("mx1", "eu-west", pb::Outcome::Ok, "", 10, 60_000)];
        let mut agg = Agg::default();
        for ms in [10u64, 20, 30, 40] {
            agg.add(&pb::ProbeResult {
                outcome: pb::Outcome::Ok as i32,
                timings: vec![pb::PhaseTiming {
                    phase: "total".into(),
                    micros: ms * 1000,
                }],
                ..Default::default()
            });
        }
        agg.add(&pb::ProbeResult {
            outcome: pb::Outcome::Fail as i32,
            ..Default::default()
        });
        let id = SeriesId {
            target: "example.test".into(),
            check: "smtp".into(),
            region: "eu-west".into(),
            endpoint: "mx1".into(),
        };
        let rows = status_rows_from_rollups(&s, &[(id, agg)].into_iter().collect(), &params());
        let r = &rows[0];
        assert_eq!((r.count, r.ok_count), (5, 4));
        assert!((r.reachability - 0.8).abs() < 1e-9);
        let p50 = r.p50_ms.expect("p50");
        assert!((p50 - 20.0).abs() <= 0.2 + 1e-9, "{p50}");
    }
}
