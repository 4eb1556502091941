//! Input limits on what agents send (string lengths, list sizes, timestamps, per-agent result rate)
//! and the counters of everything refused, which `/metrics` reads through [`Counters`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use mxscope_proto::raw::{FactValue, ResultView};
use mxscope_proto::{limits, pb, CheckKind, ErrorClass, Phase};
use tokio::time::Instant;

/// Limits applied to every result and to each agent's result rate. The size defaults are
/// `proto::limits`, the same numbers agents clamp their results to.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Longest target and endpoint host name (a DNS name).
    pub max_name_len: usize,
    /// Longest result message.
    pub max_message_len: usize,
    /// Longest fact key (and timing phase name).
    pub max_fact_key_len: usize,
    /// Longest text fact.
    pub max_fact_text_len: usize,
    /// Most facts in one result.
    pub max_facts: usize,
    /// Most phase timings in one result.
    pub max_timings: usize,
    /// Longest short field: check, error class, phase, ip.
    pub max_short_len: usize,
    /// A start time further in the future than this is refused.
    pub max_future: Duration,
    /// A start time older than this is refused.
    pub max_age: Duration,
    /// Results per second one agent id may send, over all its connections.
    pub rate_per_sec: f64,
    /// Results an agent may send at once above the rate.
    pub burst: f64,
    /// Bytes per second of results one agent id may send (their encoded size), and at once
    /// above that rate: a cap on stored bytes, not only on results.
    pub bytes_per_sec: f64,
    pub bytes_burst: f64,
    /// Most series (target, endpoint, check) one agent may feed; results that would open more
    /// are refused.
    pub max_series_per_agent: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_name_len: limits::MAX_NAME_LEN,
            max_message_len: limits::MAX_MESSAGE_LEN,
            max_fact_key_len: limits::MAX_FACT_KEY_LEN,
            max_fact_text_len: limits::MAX_FACT_TEXT_LEN,
            max_facts: limits::MAX_FACTS,
            max_timings: limits::MAX_TIMINGS,
            max_short_len: limits::MAX_SHORT_LEN,
            max_future: Duration::from_secs(10 * 60),
            max_age: Duration::from_secs(14 * 24 * 3600),
            rate_per_sec: 5000.0,
            burst: 10_000.0,
            bytes_per_sec: 8.0 * 1024.0 * 1024.0,
            bytes_burst: 32.0 * 1024.0 * 1024.0,
            max_series_per_agent: 20_000,
        }
    }
}

/// Why one result was refused. A bounded set: usable as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    StringTooLong,
    TooManyFacts,
    TooManyTimings,
    InFuture,
    TooOld,
    UnknownEnum,
    /// A check, phase or error class outside proto's closed sets.
    UnknownName,
    /// A target (or a check of it) the agent is not assigned.
    Unassigned,
    /// The agent feeds [`Limits::max_series_per_agent`] series already.
    SeriesCap,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::StringTooLong,
        RejectReason::TooManyFacts,
        RejectReason::TooManyTimings,
        RejectReason::InFuture,
        RejectReason::TooOld,
        RejectReason::UnknownEnum,
        RejectReason::UnknownName,
        RejectReason::Unassigned,
        RejectReason::SeriesCap,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::StringTooLong => "string_too_long",
            RejectReason::TooManyFacts => "too_many_facts",
            RejectReason::TooManyTimings => "too_many_timings",
            RejectReason::InFuture => "in_future",
            RejectReason::TooOld => "too_old",
            RejectReason::UnknownEnum => "unknown_enum",
            RejectReason::UnknownName => "unknown_name",
            RejectReason::Unassigned => "unassigned",
            RejectReason::SeriesCap => "series_cap",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused result: the reason class and the detail for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejected {
    pub reason: RejectReason,
    pub detail: String,
}

fn too_long(field: &str, len: usize, max: usize) -> Rejected {
    Rejected {
        reason: RejectReason::StringTooLong,
        detail: format!("{field} is {len} bytes, the limit is {max}"),
    }
}

impl Limits {
    /// Checks one result against the limits; `now_us` is the collector's clock.
    pub fn check_result(&self, r: &ResultView<'_>, now_us: i64) -> Result<(), Rejected> {
        let len = |field: &str, s: &str, max: usize| {
            if s.len() > max {
                Err(too_long(field, s.len(), max))
            } else {
                Ok(())
            }
        };
        len("target", r.target, self.max_name_len)?;
        len("message", r.message, self.max_message_len)?;
        len("check", r.check, self.max_short_len)?;
        len("error_class", r.error_class, self.max_short_len)?;
        len("phase", r.phase, self.max_short_len)?;
        if let Some(e) = &r.endpoint {
            len("endpoint.host", e.host, self.max_name_len)?;
            len("endpoint.ip", e.ip, self.max_short_len)?;
            if pb::AddressFamily::try_from(e.family).is_err() {
                return Err(Rejected {
                    reason: RejectReason::UnknownEnum,
                    detail: format!("endpoint.family {} is not a known address family", e.family),
                });
            }
        }
        if pb::Outcome::try_from(r.outcome).is_err() {
            return Err(Rejected {
                reason: RejectReason::UnknownEnum,
                detail: format!("outcome {} is not a known outcome", r.outcome),
            });
        }
        if r.facts.len() > self.max_facts {
            return Err(Rejected {
                reason: RejectReason::TooManyFacts,
                detail: format!("{} facts, the limit is {}", r.facts.len(), self.max_facts),
            });
        }
        if r.timings.len() > self.max_timings {
            return Err(Rejected {
                reason: RejectReason::TooManyTimings,
                detail: format!(
                    "{} timings, the limit is {}",
                    r.timings.len(),
                    self.max_timings
                ),
            });
        }
        for f in &r.facts {
            len("fact key", f.key, self.max_fact_key_len)?;
            if let Some(FactValue::Text(t)) = f.value {
                len("fact text", t, self.max_fact_text_len)?;
            }
        }
        for (phase, _) in &r.timings {
            len("timing phase", phase, self.max_fact_key_len)?;
        }
        check_names(r)?;
        let future = micros(self.max_future);
        let age = micros(self.max_age);
        if r.start_us > now_us.saturating_add(future) {
            return Err(Rejected {
                reason: RejectReason::InFuture,
                detail: format!(
                    "start time is {} s ahead of the collector's clock (limit {} s)",
                    r.start_us.saturating_sub(now_us) / 1_000_000,
                    self.max_future.as_secs()
                ),
            });
        }
        if r.start_us < now_us.saturating_sub(age) {
            return Err(Rejected {
                reason: RejectReason::TooOld,
                detail: format!(
                    "start time is {} s in the past (limit {} s)",
                    now_us.saturating_sub(r.start_us) / 1_000_000,
                    self.max_age.as_secs()
                ),
            });
        }
        Ok(())
    }
}

/// The check, phase, error class and timing phases of `r` are names from proto's closed sets
/// (an empty phase or error class is a result without a problem): they become series, rollup
/// and metric keys, so nothing else may.
fn check_names(r: &ResultView<'_>) -> Result<(), Rejected> {
    fn unknown(field: &str, value: &str) -> Rejected {
        Rejected {
            reason: RejectReason::UnknownName,
            detail: format!(
                "{field} '{}' is not one this collector knows (upgrade the collector before \
                 its agents)",
                value.escape_debug()
            ),
        }
    }
    if r.check.parse::<CheckKind>().is_err() {
        return Err(unknown("check", r.check));
    }
    if !r.phase.is_empty() && r.phase.parse::<Phase>().is_err() {
        return Err(unknown("phase", r.phase));
    }
    if !r.error_class.is_empty() && r.error_class.parse::<ErrorClass>().is_err() {
        return Err(unknown("error class", r.error_class));
    }
    if let Some((phase, _)) = r.timings.iter().find(|(p, _)| p.parse::<Phase>().is_err()) {
        return Err(unknown("timing phase", phase));
    }
    Ok(())
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Everything refused or limited since start. Read-only for everyone but the collector; the
/// `/metrics` endpoint reads it through `Collector::counters()` / `counters()` on shared state.
#[derive(Debug, Default)]
pub struct Counters {
    /// Results refused, by [`RejectReason`] (index = declaration order).
    rejected: [AtomicU64; RejectReason::ALL.len()],
    /// Messages above the gRPC decode limit (the session is closed).
    pub oversize_messages: AtomicU64,
    /// Batches above the result-count limit (the session is closed).
    pub oversize_batches: AtomicU64,
    /// Messages that did not decode as protobuf (the session is closed).
    pub malformed_messages: AtomicU64,
    /// Times an agent's session was paused because it was above its result rate.
    pub rate_limited: AtomicU64,
    /// Total time sessions spent paused by the rate limit, in milliseconds.
    pub rate_limited_ms: AtomicU64,
    /// Requests without a (usable) client certificate.
    pub unauthenticated: AtomicU64,
    /// Requests whose certificate has no right to the method.
    pub permission_denied: AtomicU64,
    /// Hellos whose id or region differs from the certificate.
    pub identity_mismatch: AtomicU64,
    /// Calls (and hellos) refused because their certificate or agent id is revoked.
    pub revoked_refused: AtomicU64,
    /// Open sessions and watch streams closed because their certificate or agent was revoked.
    pub revoked_closed: AtomicU64,
    /// Heartbeats replaced by a newer one of the same session before they were written.
    pub heartbeats_coalesced: AtomicU64,
    /// Sessions closed because the same agent id opened a newer one.
    pub sessions_replaced: AtomicU64,
    /// Times a session waited for a write slot (the writer's queue was full).
    pub write_slot_waits: AtomicU64,
    /// Agents enrolled with a token.
    pub enrolled: AtomicU64,
    /// Enrolment attempts refused (bad, expired, used-up or revoked token, id or region outside
    /// it, rate limit).
    pub enrol_refused: AtomicU64,
    /// Certificates renewed over agents' sessions.
    pub renewed: AtomicU64,
}

impl Counters {
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()].load(Ordering::Relaxed)
    }

    pub fn rejected_total(&self) -> u64 {
        RejectReason::ALL.iter().map(|r| self.rejected(*r)).sum()
    }

    pub(crate) fn reject(&self, reason: RejectReason) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn bump(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The series (target, endpoint, check) one agent feeds, shared by its sessions, so that no
/// agent opens more than [`Limits::max_series_per_agent`] of them. A series silent for
/// [`SeriesQuota::IDLE`] gives its place up when the quota is full (endpoints change).
#[derive(Debug, Default)]
pub struct SeriesQuota {
    /// Hash of the series' names → when a result of it was last admitted.
    seen: rustc_hash::FxHashMap<u64, i64>,
}

impl SeriesQuota {
    /// How long an unused series keeps its place.
    pub const IDLE: Duration = Duration::from_secs(24 * 3600);

    /// Admits `r` if its series is one the agent feeds already or there is room for it.
    pub fn admit(&mut self, r: &ResultView<'_>, now_us: i64, max: usize) -> Result<(), Rejected> {
        let key = Self::key(r);
        if let Some(at) = self.seen.get_mut(&key) {
            *at = now_us;
            return Ok(());
        }
        if self.seen.len() >= max {
            let idle = now_us.saturating_sub(micros(Self::IDLE));
            self.seen.retain(|_, at| *at >= idle);
        }
        if self.seen.len() >= max {
            return Err(Rejected {
                reason: RejectReason::SeriesCap,
                detail: format!(
                    "the agent feeds {max} series already (--max-series-per-agent); a new \
                     endpoint '{}' of '{}' is refused",
                    r.endpoint.map(|e| e.ip).unwrap_or_default().escape_debug(),
                    r.target.escape_debug()
                ),
            });
        }
        self.seen.insert(key, now_us);
        Ok(())
    }

    /// Series this agent feeds.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn key(r: &ResultView<'_>) -> u64 {
        use std::hash::Hasher;
        let mut h = rustc_hash::FxHasher::default();
        let e = r.endpoint.unwrap_or_default();
        for s in [r.target, r.check, e.host, e.ip] {
            h.write(s.as_bytes());
            h.write_u8(0xff);
        }
        h.write_u32(e.port);
        h.finish()
    }
}

/// Token buckets keyed by agent id, shared by all of an agent's connections.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    pub fn new(rate_per_sec: f64, burst: f64) -> RateLimiter {
        RateLimiter {
            rate: rate_per_sec.max(f64::MIN_POSITIVE),
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `n` results from `agent`'s bucket (it may go into debt) and says how long the caller
    /// must wait before reading more from that agent. Zero when within the rate.
    pub fn reserve(&self, agent: &str, n: usize) -> Duration {
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else {
            return Duration::ZERO;
        };
        let b = buckets.entry(agent.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        b.tokens -= n as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((-b.tokens / self.rate).min(3600.0))
        }
    }
}

/// Why a rate (`--max-rate`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateError {
    #[error("unknown unit '{0}': use /s, /m or /h for results, B, KiB, MiB or GiB (per second) for bytes")]
    Unit(String),
    #[error("'{0}' is not a rate like 5000/s")]
    NotARate(String),
    #[error("'{0}': the rate must be above zero")]
    NotPositive(String),
}

/// `5000/s`, `300/m`, or a bare number per second.
pub fn parse_rate(s: &str) -> Result<f64, RateError> {
    let (n, per) = match s.split_once('/') {
        Some((n, unit)) => {
            let per = match unit.trim() {
                "s" | "sec" => 1.0,
                "m" | "min" => 60.0,
                "h" => 3600.0,
                other => return Err(RateError::Unit(other.to_string())),
            };
            (n, per)
        }
        None => (s, 1.0),
    };
    let n: f64 = n
        .trim()
        .parse()
        .map_err(|_| RateError::NotARate(s.to_string()))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(RateError::NotPositive(s.to_string()));
    }
    Ok(n / per)
}

/// `8MiB/s`, `512KiB/s`, `1GB/s` or a bare number of bytes per second.
pub fn parse_byte_rate(s: &str) -> Result<f64, RateError> {
    let amount = s.trim().strip_suffix("/s").unwrap_or(s.trim()).trim();
    let split = amount
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(amount.len());
    let (n, unit) = amount.split_at(split);
    let scale = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KB" => 1e3,
        "KiB" => 1024.0,
        "M" | "MB" => 1e6,
        "MiB" => 1024.0 * 1024.0,
        "G" | "GB" => 1e9,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(RateError::Unit(other.to_string())),
    };
    let n: f64 = n.parse().map_err(|_| RateError::NotARate(s.to_string()))?;
    if n <= 0.0 || !n.is_finite() {
        return Err(RateError::NotPositive(s.to_string()));
    }
    Ok(n * scale)
}

impl Counters {
    /// Registers every refusal counter for `/metrics` (reasons are a closed set, so labels stay
    /// bounded); `http` exports them through its `MetricsSource`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        use prometheus_client::metrics::{counter::Counter, family::Family};
        let rejected = Family::<Vec<(String, String)>, Counter>::default();
        for reason in RejectReason::ALL {
            rejected
                .get_or_create(&vec![("reason".to_string(), reason.as_str().to_string())])
                .inc_by(self.rejected(reason));
        }
        registry.register(
            "mxscope_ingest_rejected_results",
            "Results refused by the input limits (skipped and acked), by reason",
            rejected,
        );
        let plain: [(&str, &str, &AtomicU64); 16] = [
            (
                "mxscope_ingest_oversize_messages",
                "Messages above the gRPC size limit (session closed)",
                &self.oversize_messages,
            ),
            (
                "mxscope_ingest_oversize_batches",
                "Batches above the result-count limit (session closed)",
                &self.oversize_batches,
            ),
            (
                "mxscope_ingest_malformed_messages",
                "Messages that did not decode (session closed)",
                &self.malformed_messages,
            ),
            (
                "mxscope_ingest_rate_limited",
                "Times an agent's session paused at its result rate",
                &self.rate_limited,
            ),
            (
                "mxscope_ingest_rate_limited_milliseconds",
                "Time sessions spent paused by the rate limit",
                &self.rate_limited_ms,
            ),
            (
                "mxscope_auth_unauthenticated",
                "Requests without a usable client certificate",
                &self.unauthenticated,
            ),
            (
                "mxscope_auth_permission_denied",
                "Requests whose certificate has no right to the method",
                &self.permission_denied,
            ),
            (
                "mxscope_auth_identity_mismatch",
                "Hellos claiming another id or region than the certificate",
                &self.identity_mismatch,
            ),
            (
                "mxscope_auth_revoked_refused",
                "Calls and hellos refused because their certificate or agent id is revoked",
                &self.revoked_refused,
            ),
            (
                "mxscope_auth_revoked_closed",
                "Open sessions and watch streams closed because their certificate or agent was revoked",
                &self.revoked_closed,
            ),
            (
                "mxscope_ingest_heartbeats_coalesced",
                "Heartbeats replaced by a newer one of the same session before they were written",
                &self.heartbeats_coalesced,
            ),
            (
                "mxscope_ingest_sessions_replaced",
                "Sessions closed because the same agent id opened a newer one",
                &self.sessions_replaced,
            ),
            (
                "mxscope_ingest_write_slot_waits",
                "Times a session waited for a write slot (--max-queued-batches reached)",
                &self.write_slot_waits,
            ),
            (
                "mxscope_enrol_enrolled",
                "Agents enrolled with a token",
                &self.enrolled,
            ),
            (
                "mxscope_enrol_refused",
                "Enrolment attempts refused (token, id, region or rate limit)",
                &self.enrol_refused,
            ),
            (
                "mxscope_enrol_renewed",
                "Agent certificates renewed over their sessions",
                &self.renewed,
            ),
        ];
        for (name, help, value) in plain {
            let c = Counter::<u64>::default();
            c.inc_by(value.load(Ordering::Relaxed));
            registry.register(name, help, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counters_are_exported_for_metrics() {
        let c = Counters::default();
        c.rejected[RejectReason::TooOld.index()].fetch_add(2, Ordering::Relaxed);
        c.oversize_batches.fetch_add(1, Ordering::Relaxed);
        let mut registry = prometheus_client::registry::Registry::default();
        c.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("mxscope_ingest_rejected_results_total{reason=\"too_old\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("mxscope_ingest_rejected_results_total{reason=\"in_future\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("mxscope_ingest_oversize_batches_total 1"),
            "{text}"
        );
        assert!(
            text.contains("mxscope_auth_revoked_closed_total 0"),
            "{text}"
        );
    }

    const NOW: i64 = 1_700_000_000_000_000;

    /// [`Limits::check_result`] of `r` as the collector reads it off the wire.
    fn check(l: &Limits, r: &pb::ProbeResult, now: i64) -> Result<(), Rejected> {
        let bytes = prost::Message::encode_to_vec(r);
        let view = ResultView::parse(&bytes).expect("parses");
        l.check_result(&view, now)
    }

    fn ok_result() -> pb::ProbeResult {
        pb::ProbeResult {
            agent_id: "a".into(),
            seq: 1,
            target: "example.com".into(),
            check: "smtp".into(),
            start_us: NOW - 1_000_000,
            outcome: pb::Outcome::Ok as i32,
            ..Default::default()
        }
    }

    #[test]
    fn each_limit_rejects_with_its_reason() {
        let l = Limits::default();
        assert_eq!(check(&l, &ok_result(), NOW), Ok(()));
        let cases: Vec<(pb::ProbeResult, RejectReason)> = vec![
            (
                pb::ProbeResult {
                    target: "a".repeat(254),
                    ..ok_result()
                },
                RejectReason::StringTooLong,
            ),
            (
                pb::ProbeResult {
                    message: "m".repeat(4097),
                    ..ok_result()
                },
                RejectReason::StringTooLong,
            ),
            (
                pb::ProbeResult {
                    facts: vec![pb::Fact::default(); 129],
                    ..ok_result()
                },
                RejectReason::TooManyFacts,
            ),
            (
                pb::ProbeResult {
                    facts: vec![pb::Fact {
                        key: "k".into(),
                        value: Some(pb::fact::Value::Text("x".repeat(4097))),
                    }],
                    ..ok_result()
                },
                RejectReason::StringTooLong,
            ),
            (
                pb::ProbeResult {
                    timings: vec![pb::PhaseTiming::default(); 65],
                    ..ok_result()
                },
                RejectReason::TooManyTimings,
            ),
            (
                pb::ProbeResult {
                    start_us: NOW + 11 * 60 * 1_000_000,
                    ..ok_result()
                },
                RejectReason::InFuture,
            ),
            (
                pb::ProbeResult {
                    start_us: NOW - 15 * 24 * 3600 * 1_000_000,
                    ..ok_result()
                },
                RejectReason::TooOld,
            ),
            (
                pb::ProbeResult {
                    outcome: 77,
                    ..ok_result()
                },
                RejectReason::UnknownEnum,
            ),
            (
                pb::ProbeResult {
                    check: "carrier-pigeon".into(),
                    ..ok_result()
                },
                RejectReason::UnknownName,
            ),
            (
                pb::ProbeResult {
                    phase: "made-up".into(),
                    ..ok_result()
                },
                RejectReason::UnknownName,
            ),
            (
                pb::ProbeResult {
                    error_class: "weird\u{1b}[2J".into(),
                    ..ok_result()
                },
                RejectReason::UnknownName,
            ),
            (
                pb::ProbeResult {
                    timings: vec![pb::PhaseTiming {
                        phase: "x1".into(),
                        micros: 1,
                    }],
                    ..ok_result()
                },
                RejectReason::UnknownName,
            ),
        ];
        assert!(!cases.is_empty());
        for (r, reason) in cases {
            let got = check(&l, &r, NOW).expect_err("must be rejected");
            assert_eq!(got.reason, reason, "{got}");
        }
        // Exactly at the limits is accepted.
        let edge = pb::ProbeResult {
            target: "a".repeat(253),
            message: "m".repeat(4096),
            start_us: NOW + 10 * 60 * 1_000_000,
            phase: "tls".into(),
            error_class: "cert_name".into(),
            timings: vec![pb::PhaseTiming {
                phase: "total".into(),
                micros: 5,
            }],
            ..ok_result()
        };
        assert_eq!(check(&l, &edge, NOW), Ok(()));
    }

    #[test]
    fn series_quota_admits_known_series_and_refuses_new_ones_above_the_cap() {
        let mut q = SeriesQuota::default();
        let at = |ip: &str| pb::ProbeResult {
            endpoint: Some(pb::Endpoint {
                host: "mx.example.com".into(),
                ip: ip.into(),
                port: 25,
                family: 1,
            }),
            ..ok_result()
        };
        let admit = |q: &mut SeriesQuota, r: &pb::ProbeResult, now: i64| {
            let bytes = prost::Message::encode_to_vec(r);
            let verdict = q.admit(&ResultView::parse(&bytes).unwrap(), now, 2);
            verdict
        };
        assert_eq!(admit(&mut q, &at("198.18.0.1"), NOW), Ok(()));
        assert_eq!(admit(&mut q, &at("198.18.0.2"), NOW), Ok(()));
        let refused = admit(&mut q, &at("198.18.0.3"), NOW).expect_err("above the cap");
        assert_eq!(refused.reason, RejectReason::SeriesCap);
        assert!(refused.detail.contains("198.18.0.3"), "{refused}");
        // A series it feeds already is still admitted.
        assert_eq!(admit(&mut q, &at("198.18.0.2"), NOW + 1), Ok(()));
        assert_eq!(q.len(), 2);
        // Once one has been silent a day, a new endpoint takes its place.
        let later = NOW + micros(SeriesQuota::IDLE);
        assert_eq!(admit(&mut q, &at("198.18.0.2"), later), Ok(()));
        assert_eq!(admit(&mut q, &at("198.18.0.3"), later + 1), Ok(()));
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn counters_by_reason() {
        let c = Counters::default();
        c.reject(RejectReason::TooOld);
        c.reject(RejectReason::TooOld);
        c.reject(RejectReason::InFuture);
        assert_eq!(c.rejected(RejectReason::TooOld), 2);
        assert_eq!(c.rejected_total(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_is_shared_per_agent_id_and_refills() {
        let r = RateLimiter::new(100.0, 200.0);
        assert_eq!(r.reserve("a", 150), Duration::ZERO);
        // A second connection of the same agent shares the bucket: 50 left, 100 more is 50 in debt.
        assert_eq!(r.reserve("a", 100), Duration::from_millis(500));
        // Another agent has its own bucket.
        assert_eq!(r.reserve("b", 200), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(1)).await;
        // 1 s refills 100: the debt of 50 is paid, 50 left.
        assert_eq!(r.reserve("a", 50), Duration::ZERO);
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("5000/s"), Ok(5000.0));
        assert_eq!(parse_rate("600/m"), Ok(10.0));
        assert_eq!(parse_rate("20"), Ok(20.0));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("5/fortnight").is_err());
        assert!(parse_rate("lots").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic_decode_or_validation(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            use prost::Message;
            let limits = Limits::default();
            if let Ok(msg) = pb::raw::AgentMessage::decode(bytes.as_slice()) {
                if let Some(pb::raw::agent_message::Msg::Batch(b)) = msg.msg {
                    let views: Vec<_> = b.results.iter().filter_map(|r| ResultView::parse(r).ok()).collect();
                    for r in &views {
                        let _ = limits.check_result(r, NOW);
                    }
                    let _ = crate::ingest::validate_batch(&views, "a", 5000);
                }
            }
            if let Ok(r) = ResultView::parse(&bytes) {
                let _ = limits.check_result(&r, NOW);
                let _ = limits.check_result(&r, i64::MIN);
                let _ = limits.check_result(&r, i64::MAX);
            }
        }

        #[test]
        fn arbitrary_results_never_panic(
            target in ".{0,300}", message in ".{0,50}", outcome in any::<i32>(),
            family in any::<i32>(), start in any::<i64>(), nfacts in 0usize..200,
        ) {
            let r = pb::ProbeResult {
                target,
                message,
                outcome,
                start_us: start,
                endpoint: Some(pb::Endpoint { family, ..Default::default() }),
                facts: vec![pb::Fact::default(); nfacts],
                ..Default::default()
            };
            let _ = check(&Limits::default(), &r, NOW);
        }
    }
}
