//! One scrape: probe state and latency per (target, check, region), agent liveness and the
//! collector's own counters, encoded by `prometheus-client` (OpenMetrics text), rendered at most
//! once per cache period however many scrapers ask.
//!
//! Every label value comes from a bounded set: targets the operator configured (central targets,
//! or an agent's local targets for that agent's region only), check kinds from the closed set
//! `CheckKind`, regions of registered agents, agent ids of registered agents; and at most
//! `max_series` (target, check, region) label sets are exported, central targets first.
//!
//! What one render reads (four store calls): the central and local target lists and the agents
//! (sizes the operator and enrolment control; a hello carries at most 10,000 local targets),
//! every series row (one per target × check × endpoint × region: the store's series cap bounds
//! them) and the results of the last 5 minutes for their `total` timing (at most the sum of the
//! agents' `--max-rate` × 5 minutes; memory stays one sketch per series) — never older results.
//! The cache keeps that to one render per period, however many scrapers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mxscope_proto::model::CheckKind;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::analysis::cross;
use crate::analysis::diagnosis::{agent_faults, SeriesView};
use crate::analysis::mail;
use crate::analysis::scope::RegionState;
use crate::analysis::series::SeriesRow;
use crate::analysis::sketch::Sketch;
use crate::analysis::status::{is_stale, StatusParams};
use crate::store::{Filter, Store, StoreError};
use mxscope_proto::time::now_us;

/// Window of the latency gauges.
const LATENCY_WINDOW: Duration = Duration::from_secs(5 * 60);

/// Something else that exports metrics on `/metrics` (e.g. the ingest limits' refusal counters):
/// it registers its metrics into the scrape's registry. Register through
/// [`MetricsState::with_source`].
pub trait MetricsSource: Send + Sync {
    fn register(&self, registry: &mut Registry);
}

/// The ingest limits' refusal counters.
impl MetricsSource for crate::limits::Counters {
    fn register(&self, registry: &mut Registry) {
        self.register_metrics(registry);
    }
}

/// What the `/metrics` handler reads.
#[derive(Clone)]
pub struct MetricsState {
    store: Arc<dyn Store>,
    stale_after: Duration,
    sources: Vec<Arc<dyn MetricsSource>>,
    cache_for: Duration,
    max_series: usize,
    /// The last render and when it was made; the lock is held while rendering, so scrapes that
    /// arrive meanwhile wait for that render instead of starting their own.
    cache: Arc<Mutex<Option<(Instant, Bytes)>>>,
}

impl std::fmt::Debug for MetricsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsState")
            .field("stale_after", &self.stale_after)
            .field("sources", &self.sources.len())
            .field("cache_for", &self.cache_for)
            .field("max_series", &self.max_series)
            .finish_non_exhaustive()
    }
}

impl MetricsState {
    /// No cache (every scrape renders) and a cap of 50,000 label sets.
    pub fn new(store: Arc<dyn Store>, stale_after: Duration) -> Self {
        MetricsState {
            store,
            stale_after,
            sources: Vec::new(),
            cache_for: Duration::ZERO,
            max_series: 50_000,
            cache: Arc::new(Mutex::new(None)),
        }
    }

    /// Adds another exporter (see [`MetricsSource`]).
    pub fn with_source(mut self, source: Arc<dyn MetricsSource>) -> Self {
        self.sources.push(source);
        self
    }

    /// Serves one render to every scrape for this long.
    pub fn with_cache_for(mut self, cache_for: Duration) -> Self {
        self.cache_for = cache_for;
        self
    }

    /// Exports at most this many (target, check, region) label sets.
    pub fn with_max_series(mut self, max_series: usize) -> Self {
        self.max_series = max_series;
        self
    }

    /// The text of one scrape: the cached render while it is fresh, else a new one (a failed
    /// render is not cached).
    pub async fn scrape(&self) -> Result<Bytes, StoreError> {
        let mut cache = self.cache.lock().await;
        if let Some((at, text)) = cache.as_ref() {
            if at.elapsed() < self.cache_for {
                return Ok(text.clone());
            }
        }
        let text = Bytes::from(render(self).await?);
        *cache = Some((Instant::now(), text.clone()));
        Ok(text)
    }
}

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// Which targets and regions may become label values, and in which order label sets are kept
/// under the cap.
struct Allowed {
    central: BTreeSet<String>,
    /// An agent's local target, for its own region: target -> regions.
    local: BTreeMap<String, BTreeSet<String>>,
    /// Regions of registered agents.
    regions: BTreeSet<String>,
}

/// Central targets are kept before local ones when the cap bites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    Central,
    Local,
}

impl Allowed {
    /// The rank of a (target, check, region) label set, `None` when one of its values is not in
    /// a bounded set.
    fn rank(&self, target: &str, check: &str, region: &str) -> Option<Rank> {
        if check.parse::<CheckKind>().is_err() || !self.regions.contains(region) {
            return None;
        }
        if self.central.contains(target) {
            Some(Rank::Central)
        } else if self.local.get(target).is_some_and(|r| r.contains(region)) {
            Some(Rank::Local)
        } else {
            None
        }
    }
}

/// A (target, check, region) label set, ordered for the cap.
type Key<'a> = (Rank, &'a str, &'a str, &'a str);

/// The mail-level gauges of port 25 of MX-expanded domains, per (domain, region): whether mail
/// flows (at least one MX host completes the dialogue), and how many MX hosts work of those seen.
/// Absent when the region is stale or its agent's own network fails (not counted).
fn register_domain_metrics(
    reg: &mut Registry,
    series: &[SeriesRow],
    canaries: &BTreeSet<String>,
    params: &StatusParams,
    allowed: &Allowed,
    kept: &BTreeSet<Key<'_>>,
) {
    let views = cross::views(series, canaries, params);
    let faults = agent_faults(&views);
    let mut groups: BTreeMap<(&str, &str), Vec<&SeriesView>> = BTreeMap::new();
    for v in views.iter().filter(|v| mail::judged_as_mail(&v.check)) {
        groups
            .entry((v.target.as_str(), v.check.as_str()))
            .or_default()
            .push(v);
    }
    let flows = Family::<Labels, Gauge>::default();
    let working = Family::<Labels, Gauge>::default();
    let hosts = Family::<Labels, Gauge>::default();
    reg.register(
        "mxscope_domain_mail_flows",
        "1 when at least one MX host of the domain completes the SMTP dialogue from the region \
         (mail flows), 0 when none does; absent when stale or the agent's own network fails",
        flows.clone(),
    );
    reg.register(
        "mxscope_domain_mx_hosts_working",
        "MX hosts of the domain with at least one address completing the dialogue from the region",
        working.clone(),
    );
    reg.register(
        "mxscope_domain_mx_hosts",
        "MX hosts of the domain the region's agent probed",
        hosts.clone(),
    );
    for ((target, check), rows) in groups {
        if !mail::is_mail_group(check, &rows) {
            continue;
        }
        for (region, m) in mail::by_region(&rows, &faults) {
            let Some(rank) = allowed.rank(target, check, region) else {
                continue;
            };
            if !kept.contains(&(rank, target, check, region)) {
                continue;
            }
            let flowing = match m.state {
                RegionState::Ok => 1,
                RegionState::Failing => 0,
                _ => continue,
            };
            let l = labels(&[("target", target), ("region", region)]);
            flows.get_or_create(&l).set(flowing);
            let n = i64::try_from(m.hosts.len()).unwrap_or(i64::MAX);
            let ok = i64::try_from(m.hosts.iter().filter(|h| h.works).count()).unwrap_or(0);
            working.get_or_create(&l).set(ok);
            hosts.get_or_create(&l).set(n);
        }
    }
}

/// Reads the store and encodes one scrape.
pub async fn render(state: &MetricsState) -> Result<String, StoreError> {
    let store = &state.store;
    let now = now_us();
    let stale_after_us = i64::try_from(state.stale_after.as_micros()).unwrap_or(i64::MAX);
    let params = StatusParams {
        now_us: now,
        stale_after_us,
    };
    let agents = store.agents().await?;
    let central = store.central_targets().await?;
    let canaries = crate::query::canary_names(&central);
    let allowed = Allowed {
        central: central.into_iter().map(|t| t.name).collect(),
        local: store.local_targets().await?.into_iter().fold(
            BTreeMap::new(),
            |mut local: BTreeMap<String, BTreeSet<String>>, (_, region, t)| {
                local.entry(t.name).or_default().insert(region);
                local
            },
        ),
        regions: agents.iter().map(|a| a.region.clone()).collect(),
    };
    let series = store.series(Filter::default()).await?;
    let window = i64::try_from(LATENCY_WINDOW.as_micros()).unwrap_or(i64::MAX);
    let rollups = store
        .rollups(
            Filter::default(),
            now.saturating_sub(window),
            now,
            Some("total".into()),
        )
        .await?;

    // (target, check, region) -> any fresh endpoint, any failing endpoint
    let mut states: BTreeMap<Key<'_>, (bool, bool)> = BTreeMap::new();
    for s in &series {
        let Some(rank) = allowed.rank(&s.target, &s.check, &s.region) else {
            continue;
        };
        let e = states
            .entry((rank, &s.target, &s.check, &s.region))
            .or_default();
        if !is_stale(s, &params) {
            e.0 = true;
            e.1 |= s.failing;
        }
    }
    let mut merged: BTreeMap<Key<'_>, Sketch> = BTreeMap::new();
    for (id, agg) in &rollups {
        let Some(rank) = allowed.rank(&id.target, &id.check, &id.region) else {
            continue;
        };
        if let Some(s) = agg.phases.get("total") {
            merged
                .entry((rank, &id.target, &id.check, &id.region))
                .or_default()
                .merge(s);
        }
    }
    // The cap: the first `max_series` label sets in key order (central targets first).
    let keys: BTreeSet<Key<'_>> = states.keys().chain(merged.keys()).copied().collect();
    let kept: BTreeSet<Key<'_>> = keys.iter().take(state.max_series).copied().collect();
    let omitted = keys.len() - kept.len();
    if omitted > 0 {
        tracing::warn!(
            exported = kept.len(),
            omitted,
            max_series = state.max_series,
            "metrics: more (target, check, region) label sets than the cap, the rest left out"
        );
    }

    let mut reg = Registry::default();
    register_domain_metrics(&mut reg, &series, &canaries, &params, &allowed, &kept);
    let success = Family::<Labels, Gauge>::default();
    let duration = Family::<Labels, FloatGauge>::default();
    reg.register(
        "mxscope_probe_success",
        "1 when the (target, check, region) is ok after hysteresis, 0 when failing; absent when stale",
        success.clone(),
    );
    reg.register(
        "mxscope_probe_duration_seconds",
        "Quantiles of the total probe duration over the last 5 minutes",
        duration.clone(),
    );
    for (key @ (_, target, check, region), (fresh, failing)) in &states {
        if *fresh && kept.contains(key) {
            let l = labels(&[("target", target), ("check", check), ("region", region)]);
            success.get_or_create(&l).set(i64::from(!failing));
        }
    }
    for (key @ (_, target, check, region), sketch) in &merged {
        if !kept.contains(key) {
            continue;
        }
        for (q, name) in [(0.5, "0.5"), (0.95, "0.95")] {
            if let Some(us) = sketch.quantile(q) {
                let l = labels(&[
                    ("target", target),
                    ("check", check),
                    ("region", region),
                    ("quantile", name),
                ]);
                duration.get_or_create(&l).set(us / 1_000_000.0);
            }
        }
    }
    let omitted_gauge = Gauge::<i64>::default();
    omitted_gauge.set(i64::try_from(omitted).unwrap_or(i64::MAX));
    reg.register(
        "mxscope_metrics_series_omitted",
        "(target, check, region) label sets left out of this scrape by the series cap",
        omitted_gauge,
    );

    let up = Family::<Labels, Gauge>::default();
    let last_seen = Family::<Labels, FloatGauge>::default();
    reg.register(
        "mxscope_agent_up",
        "1 while the agent has been heard from within --stale-after",
        up.clone(),
    );
    reg.register(
        "mxscope_agent_last_seen_seconds",
        "When the agent was last heard from (Unix time)",
        last_seen.clone(),
    );
    for a in &agents {
        let l = labels(&[("agent", &a.id), ("region", &a.region)]);
        let fresh = now.saturating_sub(a.last_seen_us) <= stale_after_us;
        up.get_or_create(&l).set(i64::from(fresh));
        last_seen
            .get_or_create(&l)
            .set(a.last_seen_us as f64 / 1_000_000.0);
    }

    let stats = store.stats();
    let counter = |reg: &mut Registry, name: &str, help: &str, v: &AtomicU64| {
        let c = Counter::<u64>::default();
        c.inc_by(v.load(Ordering::Relaxed));
        reg.register(name, help, c);
    };
    counter(
        &mut reg,
        "mxscope_ingest_results_stored",
        "Results committed to the store",
        &stats.results_stored,
    );
    counter(
        &mut reg,
        "mxscope_ingest_duplicates",
        "Results skipped as already stored (resent after a lost ack)",
        &stats.duplicates,
    );
    counter(
        &mut reg,
        "mxscope_store_batches",
        "Write transactions (one per batch of requests)",
        &stats.transactions,
    );
    let commit = Counter::<f64, AtomicU64>::default();
    commit.inc_by(stats.commit_micros.load(Ordering::Relaxed) as f64 / 1_000_000.0);
    reg.register(
        "mxscope_store_commit_seconds",
        "Time spent applying and committing write batches",
        commit,
    );

    for source in &state.sources {
        source.register(&mut reg);
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)
        .map_err(|_| StoreError::OutOfRange("metrics encoding"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mxscope_proto::facts;

    fn row(host: &str, ip: &str, region: &str, failing: bool) -> SeriesRow {
        SeriesRow {
            target: "d.test".into(),
            endpoint: format!("{host}[{ip}]:25"),
            check: "smtp".into(),
            region: region.into(),
            last_outcome: 1,
            last_error: if failing {
                "refused".into()
            } else {
                String::new()
            },
            last_message: String::new(),
            last_seen_us: 1_000_000_000,
            interval_ms: 60_000,
            failing,
            state_since_us: 0,
            agent_id: format!("agent-{region}"),
            agent_last_seen_us: Some(1_000_000_000),
            last_phase: String::new(),
            last_facts: [(facts::address::VIA_MX.to_string(), "true".to_string())]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn domain_metrics_follow_the_mail_verdict() {
        let series = vec![
            row("mx1.d.test", "198.18.0.2", "eu", false),
            row("mx2.d.test", "198.18.0.3", "eu", true),
            row("mx1.d.test", "198.18.0.2", "us", true),
            row("mx2.d.test", "198.18.0.3", "us", true),
        ];
        let allowed = Allowed {
            central: ["d.test".to_string()].into_iter().collect(),
            local: BTreeMap::new(),
            regions: ["eu".to_string(), "us".to_string()].into_iter().collect(),
        };
        let kept: BTreeSet<Key<'_>> = [
            (Rank::Central, "d.test", "smtp", "eu"),
            (Rank::Central, "d.test", "smtp", "us"),
        ]
        .into_iter()
        .collect();
        let params = StatusParams {
            now_us: 1_000_000_000,
            stale_after_us: 120_000_000,
        };
        let mut reg = Registry::default();
        register_domain_metrics(
            &mut reg,
            &series,
            &BTreeSet::new(),
            &params,
            &allowed,
            &kept,
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        for line in [
            r#"mxscope_domain_mail_flows{target="d.test",region="eu"} 1"#,
            r#"mxscope_domain_mail_flows{target="d.test",region="us"} 0"#,
            r#"mxscope_domain_mx_hosts_working{target="d.test",region="eu"} 1"#,
            r#"mxscope_domain_mx_hosts{target="d.test",region="us"} 2"#,
        ] {
            assert!(out.contains(line), "{line} missing in\n{out}");
        }
    }
}
