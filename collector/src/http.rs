//! `/metrics` over HTTP (axum): probe state and latency per (target, check, region), agent liveness
//! and the collector's own ingest counters, encoded by `prometheus-client` (OpenMetrics text).
//! Labels come only from bounded sets: configured target names, check kinds, regions, agent ids.
//!
//! Metrics (the README copies these):
//! - `mxscope_probe_success{target,check,region}`: 1 when the series' hysteresis state is ok on
//!   every endpoint, 0 when one is failing; absent while all its endpoints are stale.
//! - `mxscope_probe_duration_seconds{target,check,region,quantile}`: p50 and p95 of the `total`
//!   phase over the last 5 minutes (from the raw results, 1% relative error).
//! - `mxscope_agent_up{agent,region}` (0 once silent past `--stale-after`),
//!   `mxscope_agent_last_seen_seconds{agent,region}` (Unix time).
//! - `mxscope_ingest_results_stored_total`, `mxscope_ingest_duplicates_total`,
//!   `mxscope_store_batches_total`, `mxscope_store_commit_seconds_total`.
//! - Anything a [`MetricsSource`] registers (the security counters of `limits.rs` plug in here).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::analysis::status::{is_stale, StatusParams};
use crate::store::{Filter, Store, StoreError};
use mxscope_proto::time::now_us;

/// Window of the latency gauges.
const LATENCY_WINDOW: Duration = Duration::from_secs(5 * 60);
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
}

impl std::fmt::Debug for MetricsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsState")
            .field("stale_after", &self.stale_after)
            .field("sources", &self.sources.len())
            .finish_non_exhaustive()
    }
}

impl MetricsState {
    pub fn new(store: Arc<dyn Store>, stale_after: Duration) -> Self {
        MetricsState {
            store,
            stale_after,
            sources: Vec::new(),
        }
    }

    /// Adds another exporter (see [`MetricsSource`]).
    pub fn with_source(mut self, source: Arc<dyn MetricsSource>) -> Self {
        self.sources.push(source);
        self
    }
}

/// Serves `/metrics` on an already bound listener until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: MetricsState,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

async fn metrics(State(state): State<MetricsState>) -> Response {
    match render(&state).await {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(err) => {
            tracing::error!(error = %crate::error::chain(&err), "metrics scrape failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error (see the collector log)\n",
            )
                .into_response()
        }
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

/// Reads the store and encodes one scrape.
pub async fn render(state: &MetricsState) -> Result<String, StoreError> {
    let store = &state.store;
    let now = now_us();
    let stale_after_us = i64::try_from(state.stale_after.as_micros()).unwrap_or(i64::MAX);
    let params = StatusParams {
        now_us: now,
        stale_after_us,
    };
    // Only targets the operator configured (centrally or in an agent's file) become label values.
    let mut configured: BTreeSet<String> = store
        .central_targets()
        .await?
        .into_iter()
        .map(|t| t.name)
        .collect();
    configured.extend(
        store
            .local_targets()
            .await?
            .into_iter()
            .map(|(_, _, t)| t.name),
    );
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
    let agents = store.agents().await?;

    let mut reg = Registry::default();
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

    // (target, check, region) -> any fresh endpoint, any failing endpoint
    let mut states: BTreeMap<(&str, &str, &str), (bool, bool)> = BTreeMap::new();
    for s in series.iter().filter(|s| configured.contains(&s.target)) {
        let e = states.entry((&s.target, &s.check, &s.region)).or_default();
        if !is_stale(s, &params) {
            e.0 = true;
            e.1 |= s.failing;
        }
    }
    for ((target, check, region), (fresh, failing)) in &states {
        if *fresh {
            let l = labels(&[("target", target), ("check", check), ("region", region)]);
            success.get_or_create(&l).set(i64::from(!failing));
        }
    }
    let mut merged: BTreeMap<(&str, &str, &str), crate::analysis::sketch::Sketch> = BTreeMap::new();
    for (id, agg) in rollups
        .iter()
        .filter(|(id, _)| configured.contains(&id.target))
    {
        if let Some(s) = agg.phases.get("total") {
            merged
                .entry((&id.target, &id.check, &id.region))
                .or_default()
                .merge(s);
        }
    }
    for ((target, check, region), sketch) in &merged {
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
    use crate::store::sqlite::SqliteStore;
    use crate::store::{AgentHello, StoreOptions};
    use mxscope_proto::pb;
    use tempfile::TempDir;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Parses exposition text back: (name, labels, value) per sample line; panics on anything
    /// that is not a comment, a sample, or the closing `# EOF`.
    fn parse(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
        assert!(text.trim_end().ends_with("# EOF"), "no EOF marker: {text}");
        let mut out = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (head, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line}"));
            let (name, labels) = match head.split_once('{') {
                None => (head.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    let labels = body
                        .split(',')
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').expect("label k=v");
                            let v = v
                                .strip_prefix('"')
                                .and_then(|v| v.strip_suffix('"'))
                                .expect("quoted label value");
                            (k.to_string(), v.to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
            };
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad metric name {name}"
            );
            out.push((name, labels, value));
        }
        out
    }

    fn result(seq: u64, target: &str, ok: bool, total_us: u64) -> pb::ProbeResult {
        pb::ProbeResult {
            agent_id: "eu1".into(),
            seq,
            target: target.into(),
            endpoint: Some(pb::Endpoint {
                host: format!("mx.{target}"),
                ip: "127.0.0.1".into(),
                port: 25,
                family: pb::AddressFamily::Ipv4 as i32,
            }),
            check: "smtp".into(),
            start_us: now_us() - 1_000_000 + seq as i64,
            outcome: if ok {
                pb::Outcome::Ok
            } else {
                pb::Outcome::Fail
            } as i32,
            error_class: if ok { "" } else { "refused" }.into(),
            message: "connection refused by 127.0.0.1 (free text never becomes a label)".into(),
            timings: vec![pb::PhaseTiming {
                phase: "total".into(),
                micros: total_us,
            }],
            interval_ms: 60_000,
            ..Default::default()
        }
    }

    async fn fixture(dir: &TempDir) -> SqliteStore {
        let store = SqliteStore::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
        store
            .register_agent(AgentHello {
                id: "eu1".into(),
                region: "eu-west".into(),
                version: "t".into(),
                at_us: now_us(),
                ..Default::default()
            })
            .await
            .unwrap();
        for name in ["ok.test", "bad.test"] {
            let def = mxscope_proto::target::validate(&pb::TargetSpec {
                name: name.into(),
                checks: vec!["smtp".into()],
                ..Default::default()
            })
            .unwrap();
            store.put_target(def, false, now_us()).await.unwrap();
        }
        let results = vec![
            result(1, "ok.test", true, 20_000),
            result(2, "ok.test", true, 40_000),
            result(3, "bad.test", false, 5_000),
            result(4, "bad.test", false, 5_000),
            // Not a configured target: must not become a label value.
            result(5, "unlisted.test", true, 1_000),
        ];
        store
            .store_results("eu1", "eu-west", results.clone(), now_us())
            .await
            .unwrap();
        // A resent batch counts as duplicates.
        store
            .store_results("eu1", "eu-west", results, now_us())
            .await
            .unwrap();
        store
    }

    #[tokio::test]
    async fn exposition_parses_back_with_state_latency_agents_and_counters() {
        let dir = TempDir::new().unwrap();
        let store = fixture(&dir).await;
        let text = render(&MetricsState::new(
            Arc::new(store.clone()),
            Duration::from_secs(120),
        ))
        .await
        .unwrap();
        let samples = parse(&text);
        assert!(!samples.is_empty());
        let find = |name: &str, want: &[(&str, &str)]| -> Option<f64> {
            samples
                .iter()
                .find(|(n, l, _)| {
                    n == name
                        && want
                            .iter()
                            .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
                })
                .map(|s| s.2)
        };
        let key = |t: &'static str| [("target", t), ("check", "smtp"), ("region", "eu-west")];
        assert_eq!(find("mxscope_probe_success", &key("ok.test")), Some(1.0));
        assert_eq!(find("mxscope_probe_success", &key("bad.test")), Some(0.0));
        let quantile = |q: &'static str| {
            let mut l = key("ok.test").to_vec();
            l.push(("quantile", q));
            find("mxscope_probe_duration_seconds", &l)
        };
        // Two values, 20 ms and 40 ms: the lower median is 20 ms (within the sketch's 1%).
        let p50 = quantile("0.5").expect("p50 gauge");
        assert!((p50 - 0.020).abs() <= 0.0002, "{p50}");
        assert!(quantile("0.95").is_some_and(|v| v >= p50 && v <= 0.0404));
        assert_eq!(
            find(
                "mxscope_agent_up",
                &[("agent", "eu1"), ("region", "eu-west")]
            ),
            Some(1.0)
        );
        assert!(find("mxscope_agent_last_seen_seconds", &[("agent", "eu1")]).unwrap() > 1.6e9);
        assert_eq!(find("mxscope_ingest_results_stored_total", &[]), Some(5.0));
        assert_eq!(find("mxscope_ingest_duplicates_total", &[]), Some(5.0));
        assert!(find("mxscope_store_batches_total", &[]).unwrap() >= 2.0);
        assert!(find("mxscope_store_commit_seconds_total", &[]).unwrap() > 0.0);
        assert!(
            !text.contains("unlisted.test"),
            "unconfigured target leaked"
        );
        assert!(!text.contains("refused by"), "free text leaked into labels");
        store.close().await.unwrap();
    }

    struct Extra;
    impl MetricsSource for Extra {
        fn register(&self, registry: &mut Registry) {
            let c = Counter::<u64>::default();
            c.inc_by(3);
            registry.register("mxscope_ingest_rejected", "test hook", c);
        }
    }

    #[tokio::test]
    async fn serves_metrics_over_http_with_hooks_and_stops() {
        let dir = TempDir::new().unwrap();
        let store = fixture(&dir).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let state = MetricsState::new(Arc::new(store.clone()), Duration::from_secs(120))
            .with_source(Arc::new(Extra));
        let server = tokio::spawn(serve(listener, state, stop.clone()));
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut resp))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp
            .to_lowercase()
            .contains("content-type: application/openmetrics-text"));
        assert!(resp.contains("mxscope_ingest_rejected_total 3"), "{resp}");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
        store.close().await.unwrap();
    }
}
