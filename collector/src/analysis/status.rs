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
//!   `--stale-after`) ago; else `failing` when the last outcome is `fail` (or unknown); else `ok`.
//! - **last_error**: the error class of the latest result when it was not `ok` (null otherwise).
//! - **last_seen_us**, **last_outcome**, **last_message**: of the latest result (by start time).

use std::collections::HashMap;

use mxscope_proto::{outcome_from_wire, pb, Outcome};

use crate::store::{Sample, SeriesRow};

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

/// Computes status rows, in the order of `series`, from the series and the results of the window.
pub fn status_rows(series: &[SeriesRow], samples: &[Sample], p: &StatusParams) -> Vec<pb::StatusRow> {
    let mut windows: HashMap<Key<'_>, Window> = HashMap::new();
    for s in samples {
        let w = windows
            .entry((s.target.as_str(), s.endpoint.as_str(), s.check.as_str(), s.region.as_str()))
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
            let key = (s.target.as_str(), s.endpoint.as_str(), s.check.as_str(), s.region.as_str());
            let mut w = windows.remove(&key).unwrap_or_default();
            w.totals_ms.sort_by(f64::total_cmp);
            let last = outcome_from_wire(s.last_outcome);
            pb::StatusRow {
                target: s.target.clone(),
                endpoint: s.endpoint.clone(),
                check: s.check.clone(),
                region: s.region.clone(),
                state: state(s, last, p).to_string(),
                reachability: if w.count == 0 { 0.0 } else { (w.ok + w.warn) as f64 / w.count as f64 },
                p50_ms: percentile(&w.totals_ms, 50.0),
                p95_ms: percentile(&w.totals_ms, 95.0),
                last_error: match last {
                    Some(Outcome::Ok) => None,
                    _ if s.last_error.is_empty() => None,
                    _ => Some(s.last_error.clone()),
                },
                last_seen_us: s.last_seen_us,
                count: w.count,
                ok_count: w.ok,
                last_outcome: last.map_or("unknown", Outcome::name).to_string(),
                last_message: s.last_message.clone(),
            }
        })
        .collect()
}

/// `stale` | `failing` | `ok` (see the module docs).
fn state(s: &SeriesRow, last: Option<Outcome>, p: &StatusParams) -> &'static str {
    let interval_us = i64::try_from(s.interval_ms).unwrap_or(i64::MAX / 4000).saturating_mul(1000);
    let fresh_for = interval_us.saturating_mul(3).max(p.stale_after_us);
    if p.now_us.saturating_sub(s.last_seen_us) > fresh_for {
        "stale"
    } else if matches!(last, Some(Outcome::Ok | Outcome::Warn)) {
        "ok"
    } else {
        "failing"
    }
}
