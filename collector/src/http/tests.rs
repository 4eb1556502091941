//! The `/metrics` server and its scrapes, over real TCP on 127.0.0.1.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::store::sqlite::SqliteStore;
use crate::store::{AgentHello, Store, StoreOptions};
use mxscope_proto::model::CheckKind;
use mxscope_proto::pb;
use mxscope_proto::time::now_us;

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
    let state = MetricsState::new(Arc::new(store.clone()), Duration::from_secs(120))
        .with_source(Arc::new(Extra));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
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

fn state_of(store: &SqliteStore) -> MetricsState {
    MetricsState::new(Arc::new(store.clone()), Duration::from_secs(120))
}

// ---- what one scrape reads and says ----

/// A store that counts the reads `render` makes.
#[derive(Debug)]
struct Counting {
    inner: SqliteStore,
    reads: AtomicU64,
}

impl Counting {
    fn read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }
}

impl Store for Counting {
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<pb::WatchEvent> {
        Store::subscribe(&self.inner)
    }
    fn register_agent(&self, hello: AgentHello) -> crate::store::Pending<u64> {
        Store::register_agent(&self.inner, hello)
    }
    fn put_batch(
        &self,
        agent_id: &str,
        region: &str,
        results: &[mxscope_proto::raw::ResultView<'_>],
        raw: Vec<bytes::Bytes>,
        rejected: Vec<u64>,
        at_us: i64,
    ) -> crate::store::Pending<u64> {
        Store::put_batch(&self.inner, agent_id, region, results, raw, rejected, at_us)
    }
    fn heartbeat(
        &self,
        agent_id: &str,
        spool_depth: u64,
        dropped_total: u64,
        at_us: i64,
    ) -> crate::store::Pending<()> {
        Store::heartbeat(&self.inner, agent_id, spool_depth, dropped_total, at_us)
    }
    fn put_target(
        &self,
        target: mxscope_proto::target::Target,
        update: bool,
        at_us: i64,
    ) -> crate::store::Pending<()> {
        Store::put_target(&self.inner, target, update, at_us)
    }
    fn remove_target(&self, name: &str) -> crate::store::Pending<()> {
        Store::remove_target(&self.inner, name)
    }
    fn central_targets(&self) -> crate::store::Pending<Vec<mxscope_proto::target::Target>> {
        self.read();
        Store::central_targets(&self.inner)
    }
    fn local_targets(
        &self,
    ) -> crate::store::Pending<Vec<(String, String, mxscope_proto::target::Target)>> {
        self.read();
        Store::local_targets(&self.inner)
    }
    fn agents(&self) -> crate::store::Pending<Vec<crate::store::AgentRow>> {
        self.read();
        Store::agents(&self.inner)
    }
    fn results_per_agent(&self, since_us: i64) -> crate::store::Pending<BTreeMap<String, u64>> {
        self.read();
        Store::results_per_agent(&self.inner, since_us)
    }
    fn series(
        &self,
        filter: crate::store::Filter,
    ) -> crate::store::Pending<Vec<crate::store::SeriesRow>> {
        self.read();
        Store::series(&self.inner, filter)
    }
    fn rollups(
        &self,
        filter: crate::store::Filter,
        since_us: i64,
        now_us: i64,
        phase: Option<String>,
    ) -> crate::store::Pending<BTreeMap<crate::store::SeriesId, crate::analysis::aggregate::Agg>>
    {
        self.read();
        Store::rollups(&self.inner, filter, since_us, now_us, phase)
    }
    fn status_input(
        &self,
        filter: crate::store::Filter,
        since_us: i64,
    ) -> crate::store::Pending<(Vec<crate::store::SeriesRow>, Vec<crate::store::Sample>)> {
        self.read();
        Store::status_input(&self.inner, filter, since_us)
    }
    fn results(
        &self,
        filter: crate::store::Filter,
        since_us: i64,
        limit: u32,
    ) -> crate::store::Pending<Vec<pb::StoredResult>> {
        self.read();
        Store::results(&self.inner, filter, since_us, limit)
    }
    fn prune(&self, now_us: i64) -> crate::store::Pending<u64> {
        Store::prune(&self.inner, now_us)
    }
    fn prune_batch(&self) -> usize {
        Store::prune_batch(&self.inner)
    }
    fn stats(&self) -> &crate::store::WriterStats {
        Store::stats(&self.inner)
    }
    fn close(&self) -> crate::store::Pending<()> {
        Store::close(&self.inner)
    }
}

#[tokio::test(start_paused = true)]
async fn scrapes_within_the_cache_period_share_one_render() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(Counting {
        inner: fixture(&dir).await,
        reads: AtomicU64::new(0),
    });
    let state = MetricsState::new(store.clone(), Duration::from_secs(120))
        .with_cache_for(Duration::from_secs(5));
    let first = state.scrape().await.unwrap();
    let per_render = store.reads.load(Ordering::Relaxed);
    assert!(per_render > 0);
    // One after another, and side by side: all answered from the one render.
    for _ in 0..3 {
        assert_eq!(state.scrape().await.unwrap(), first);
    }
    let side_by_side = futures::future::join_all((0..4).map(|_| state.scrape())).await;
    assert!(side_by_side.iter().all(|s| s.as_ref().ok() == Some(&first)));
    assert_eq!(store.reads.load(Ordering::Relaxed), per_render);
    // Past the period, the next scrape renders again.
    tokio::time::advance(Duration::from_secs(6)).await;
    state.scrape().await.unwrap();
    assert_eq!(store.reads.load(Ordering::Relaxed), 2 * per_render);
    store.inner.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn concurrent_scrapes_of_an_expired_cache_share_one_render() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(Counting {
        inner: fixture(&dir).await,
        reads: AtomicU64::new(0),
    });
    let state = MetricsState::new(store.clone(), Duration::from_secs(120))
        .with_cache_for(Duration::from_secs(5));
    let answers = futures::future::join_all((0..8).map(|_| state.scrape())).await;
    assert!(answers.iter().all(Result::is_ok));
    let one = store.reads.load(Ordering::Relaxed);
    state.scrape().await.unwrap();
    assert_eq!(store.reads.load(Ordering::Relaxed), one);
    assert!((1..=5).contains(&one), "{one} reads for one render");
    store.inner.close().await.unwrap();
}

/// [`fixture`], plus: agent us1 in us-east with the local target `local.test`, results for it
/// from both regions, a made-up check and an unknown region on a central target.
async fn labels_fixture(dir: &TempDir) -> SqliteStore {
    let store = fixture(dir).await;
    let local = mxscope_proto::target::validate(&pb::TargetSpec {
        name: "local.test".into(),
        checks: vec!["smtp".into()],
        ..Default::default()
    })
    .unwrap();
    store
        .register_agent(AgentHello {
            id: "us1".into(),
            region: "us-east".into(),
            version: "t".into(),
            at_us: now_us(),
            local_targets: vec![local],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut us = result(1, "local.test", true, 1_000);
    us.agent_id = "us1".into();
    store
        .store_results("us1", "us-east", vec![us], now_us())
        .await
        .unwrap();
    let mut made_up = result(10, "ok.test", true, 1_000);
    made_up.check = "made-up-check".into();
    let from_eu = result(11, "local.test", true, 1_000);
    store
        .store_results("eu1", "eu-west", vec![made_up, from_eu], now_us())
        .await
        .unwrap();
    store
        .store_results(
            "eu1",
            "mars",
            vec![result(12, "ok.test", true, 1_000)],
            now_us(),
        )
        .await
        .unwrap();
    store
}

#[tokio::test]
async fn labels_take_only_known_checks_regions_of_agents_and_local_targets_of_their_region() {
    let dir = TempDir::new().unwrap();
    let store = labels_fixture(&dir).await;
    let text = render(&state_of(&store)).await.unwrap();
    let samples = parse(&text);
    let probes: Vec<_> = samples
        .iter()
        .filter(|(n, _, _)| n.starts_with("mxscope_probe_"))
        .collect();
    assert!(!probes.is_empty(), "{text}");
    for (name, l, _) in &probes {
        assert!(l["check"].parse::<CheckKind>().is_ok(), "{name} {l:?}");
        assert!(
            ["eu-west", "us-east"].contains(&l["region"].as_str()),
            "{name} {l:?}"
        );
    }
    assert!(!text.contains("made-up-check"), "{text}");
    assert!(!text.contains("mars"), "{text}");
    let has = |target: &str, region: &str| {
        probes.iter().any(|(n, l, _)| {
            n == "mxscope_probe_success" && l["target"] == target && l["region"] == region
        })
    };
    assert!(has("ok.test", "eu-west"));
    assert!(has("local.test", "us-east"), "{text}");
    assert!(
        !has("local.test", "eu-west"),
        "a local target leaked to another region"
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn the_series_cap_keeps_central_targets_first_and_counts_what_it_left_out() {
    let dir = TempDir::new().unwrap();
    let store = labels_fixture(&dir).await;
    let text = render(&state_of(&store).with_max_series(2)).await.unwrap();
    let samples = parse(&text);
    let targets: BTreeSet<&str> = samples
        .iter()
        .filter(|(n, _, _)| n.starts_with("mxscope_probe_"))
        .map(|(_, l, _)| l["target"].as_str())
        .collect();
    // bad.test < local.test < ok.test by name: the cap must not keep by name alone.
    assert_eq!(targets, BTreeSet::from(["bad.test", "ok.test"]), "{text}");
    let omitted = samples
        .iter()
        .find(|(n, _, _)| n == "mxscope_metrics_series_omitted")
        .map(|s| s.2);
    assert_eq!(omitted, Some(1.0), "{text}");
    store.close().await.unwrap();
}
