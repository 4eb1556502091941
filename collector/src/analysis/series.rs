//! The rows the analysis reads: a series' latest state ([`SeriesRow`]), a series' identity
//! ([`SeriesId`], as aggregates are keyed) and one result of a status window ([`Sample`]). The
//! store produces them; nothing here knows where they come from.

use std::collections::BTreeMap;

/// One row of `series`: the latest state of a (target, endpoint, check, region).
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesRow {
    pub target: String,
    pub endpoint: String,
    pub check: String,
    pub region: String,
    /// Wire value of `pb::Outcome` (0 = unknown).
    pub last_outcome: i32,
    /// Empty when the last result was ok.
    pub last_error: String,
    pub last_message: String,
    pub last_seen_us: i64,
    pub interval_ms: u64,
    /// Hysteresis state: true once `fail_after` consecutive failures were seen.
    pub failing: bool,
    /// Since when the series is in its current state (0 = since it appeared).
    pub state_since_us: i64,
    /// Agent that sent the latest result, and when that agent was last heard of (`None` when
    /// the agent is unknown).
    pub agent_id: String,
    pub agent_last_seen_us: Option<i64>,
    /// Phase and facts (JSON text) of the latest result.
    pub last_phase: String,
    pub last_facts: BTreeMap<String, String>,
}

/// Identity of a series, as the rollups key it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesId {
    pub target: String,
    pub check: String,
    pub region: String,
    pub endpoint: String,
}

/// One result inside a status window (only what the status computation needs).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub target: String,
    pub endpoint: String,
    pub check: String,
    pub region: String,
    /// Wire value of `pb::Outcome`.
    pub outcome: i32,
    pub total_us: Option<i64>,
}
