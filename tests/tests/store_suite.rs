//! The storage suite: what every [`Store`] backend must do, written only against the public
//! trait (`Arc<dyn Store>`), so one table of cases runs on both backends: SQLite and PostgreSQL
//! (a private cluster, a database per case).
//! Each case gets a fresh, empty store; [`run_suite`] runs them all and names the failures.
//! Also here: a check that the private PostgreSQL cluster of `mxscope_tests::postgres` works.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use mxscope_collector::analysis::aggregate::Agg;
use mxscope_collector::analysis::hysteresis::Policy;
use mxscope_collector::store::postgres::PgStore;
use mxscope_collector::store::sqlite::SqliteStore;
use mxscope_collector::store::{
    AgentHello, Filter, Pending, SeriesId, Store, StoreError, StoreOptions,
};
use mxscope_proto::pb;
use mxscope_proto::raw::ResultView;
use mxscope_proto::target::Target;
use mxscope_proto::time::now_us;
use mxscope_tests::postgres::Postgres;
use prost::Message;
use tokio::sync::broadcast;

const SEC: i64 = 1_000_000;
const MIN: i64 = 60 * SEC;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
/// Longest one case may take (a hung backend fails its case instead of the whole binary).
const CASE_TIMEOUT: Duration = Duration::from_secs(60);

// ---- the table ----------------------------------------------------------------------------

type CaseFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// One behaviour: its name, the options its store is opened with, and the test.
struct Case {
    name: &'static str,
    opts: fn() -> StoreOptions,
    run: fn(Arc<dyn Store>) -> CaseFuture,
}

macro_rules! case {
    ($f:ident) => {
        case!($f, suite_opts)
    };
    ($f:ident, $opts:expr) => {
        Case {
            name: stringify!($f),
            opts: $opts,
            run: |s| Box::pin($f(s)),
        }
    };
}

fn cases() -> Vec<Case> {
    vec![
        case!(case_register_agent_returns_stored_up_to_seq),
        case!(case_put_batch_stores_each_seq_once),
        case!(case_rejected_seqs_advance_the_mark_without_storing),
        case!(case_results_newest_first_with_filters_and_limit),
        case!(
            case_series_state_follows_the_policy_and_changes_are_broadcast,
            || {
                StoreOptions {
                    policy: Policy {
                        fail_after: 3,
                        recover_after: 2,
                    },
                    ..suite_opts()
                }
            }
        ),
        case!(case_heartbeat_updates_the_agent_row),
        case!(case_central_targets_put_update_remove),
        case!(case_local_targets_come_from_the_latest_hello),
        case!(case_results_per_agent_counts_from_since),
        case!(case_rollups_count_every_window_from_raw_and_stored_rollups),
        case!(case_history_has_one_entry_per_bucket_and_series),
        case!(case_status_input_has_series_and_window_samples),
        case!(case_prune_deletes_results_past_retention_in_rounds, || {
            StoreOptions {
                retention: Duration::from_secs(3600),
                prune_batch: 3,
                ..suite_opts()
            }
        }),
        case!(case_close_then_writes_fail_with_writer_closed),
    ]
}

/// Options every case starts from: a short linger, so a lone write commits at once.
fn suite_opts() -> StoreOptions {
    StoreOptions {
        linger: Duration::from_millis(1),
        readers: 2,
        ..StoreOptions::default()
    }
}

/// Runs every case on a store of its own from `open(case name, options)`, closes it, and
/// fails naming each case that failed (with its error chain).
async fn run_suite<F, Fut>(backend: &str, open: F)
where
    F: Fn(&'static str, StoreOptions) -> Fut,
    Fut: Future<Output = Result<Arc<dyn Store>>>,
{
    let cases = cases();
    assert!(!cases.is_empty());
    let started = Instant::now();
    let mut failed = Vec::new();
    for case in &cases {
        let t = Instant::now();
        let outcome = async {
            let store = open(case.name, (case.opts)())
                .await
                .context("open the store")?;
            // Spawned: an assertion's panic fails this case, not the whole run.
            let task = tokio::spawn(tokio::time::timeout(
                CASE_TIMEOUT,
                (case.run)(store.clone()),
            ));
            let run = match task.await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(anyhow::anyhow!("timed out after {CASE_TIMEOUT:?}")),
                Err(e) => Err(anyhow::anyhow!("panicked: {}", panic_text(e))),
            };
            let closed = store.close().await.context("close the store");
            run.and(closed)
        }
        .await;
        match outcome {
            Ok(()) => eprintln!("{backend}: {} ok ({:?})", case.name, t.elapsed()),
            Err(e) => {
                eprintln!("{backend}: {} FAILED: {e:#}", case.name);
                failed.push(format!("{}: {e:#}", case.name));
            }
        }
    }
    eprintln!(
        "{backend}: {} of {} cases passed in {:?}",
        cases.len() - failed.len(),
        cases.len(),
        started.elapsed()
    );
    assert!(
        failed.is_empty(),
        "{backend}: {} of {} cases failed:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
}

/// The message of a spawned case's panic.
fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "(not a string)".into()),
        Err(e) => e.to_string(),
    }
}

// ---- backends -----------------------------------------------------------------------------

/// A fresh SQLite store in `<base>/<case>/store.db`.
async fn open_sqlite(base: &Path, case: &str, opts: StoreOptions) -> Result<Arc<dyn Store>> {
    let dir = base.join(case);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("store.db");
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path, opts)).await??;
    Ok(Arc::new(store))
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_suite_on_sqlite() {
    let base = tempfile::tempdir().expect("temp dir");
    run_suite("sqlite", |case, opts| open_sqlite(base.path(), case, opts)).await;
}

/// A fresh PostgreSQL store: a database of its own (named after the case) in the suite's
/// private cluster.
async fn open_postgres(pg: &Postgres, case: &str, opts: StoreOptions) -> Result<Arc<dyn Store>> {
    // `createdb` through psql is a short blocking call; the suite runs on the multi-thread
    // runtime, where block_in_place lets the other tasks move on meanwhile.
    let url = tokio::task::block_in_place(|| pg.create_database(case))?;
    let store = PgStore::connect(&url, opts)
        .await
        .with_context(|| format!("PgStore::connect {url}"))?;
    Ok(Arc::new(store))
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_suite_on_postgres() {
    let pg = match tokio::task::spawn_blocking(Postgres::start)
        .await
        .expect("join")
    {
        Ok(pg) => pg,
        Err(e) => panic!("private postgres cluster: {e:#}"),
    };
    run_suite("postgres", |case, opts| open_postgres(&pg, case, opts)).await;
    // Stopping the cluster waits for its shutdown: off the runtime's threads.
    tokio::task::spawn_blocking(move || drop(pg))
        .await
        .expect("join");
}

/// The harness the PostgreSQL run of the suite uses: a private cluster starts, a database is
/// created, and the `mxscope` role runs SQL in it over loopback TCP.
#[tokio::test]
async fn private_postgres_cluster_starts_and_serves_sql() {
    let pg = tokio::task::spawn_blocking(|| -> Result<(Postgres, String, String, String)> {
        let pg = Postgres::start()?;
        let url = pg.create_database("harness_check")?;
        let answer = pg.psql(
            "harness_check",
            "SELECT 1 + 1, current_user, current_database()",
        )?;
        let listen = pg.psql("harness_check", "SHOW listen_addresses")?;
        Ok((pg, url, answer, listen))
    })
    .await
    .expect("join");
    let (pg, url, answer, listen) = match pg {
        Ok(v) => v,
        Err(e) => panic!("private postgres cluster: {e:#}"),
    };
    assert_eq!(
        url,
        format!("postgres://mxscope@127.0.0.1:{}/harness_check", pg.port())
    );
    assert_eq!(answer, "2|mxscope|harness_check");
    assert_eq!(listen, "127.0.0.1");
    // A second database is separate, and a bad name is refused before any SQL runs.
    let pg = Arc::new(pg);
    let p = pg.clone();
    let (other, refused) = tokio::task::spawn_blocking(move || {
        let other = p.create_database("harness_other").and_then(|_| {
            p.psql(
                "harness_other",
                "CREATE TABLE t (x int); INSERT INTO t VALUES (7); SELECT sum(x) FROM t",
            )
        });
        (other, p.create_database("Bad-Name"))
    })
    .await
    .expect("join");
    assert_eq!(other.expect("second database"), "7");
    let refused = refused.expect_err("bad name");
    assert!(refused.to_string().contains("Bad-Name"), "{refused}");
    let pid_file = pg.dir().join("data").join("postmaster.pid");
    assert!(
        pid_file.is_file(),
        "the server runs from the cluster's own data directory, not a system cluster's"
    );
    let p = pg.clone();
    let in_first = tokio::task::spawn_blocking(move || {
        p.psql(
            "harness_check",
            "SELECT count(*) FROM pg_tables WHERE tablename = 't'",
        )
    })
    .await
    .expect("join");
    assert_eq!(in_first.expect("query"), "0");
    // Stopped on drop, by PID: nothing listens on its port afterwards.
    let addr = pg.addr();
    let pg = Arc::into_inner(pg).expect("one owner");
    tokio::task::spawn_blocking(move || drop(pg))
        .await
        .expect("join");
    assert!(
        !mxscope_tests::net::is_listening(addr),
        "postgres still listening on {addr} after drop"
    );
}

// ---- helpers ------------------------------------------------------------------------------

fn hello(id: &str, region: &str, at_us: i64) -> AgentHello {
    AgentHello {
        id: id.into(),
        region: region.into(),
        version: "0.1.0".into(),
        at_us,
        ..Default::default()
    }
}

/// A result of `target`'s MX host `mx1.<target>` (127.0.0.1:25), ok or a refused connection.
fn result(
    agent: &str,
    seq: u64,
    target: &str,
    check: &str,
    ok: bool,
    start_us: i64,
) -> pb::ProbeResult {
    let mut r = pb::ProbeResult {
        agent_id: agent.into(),
        seq,
        target: target.into(),
        endpoint: Some(pb::Endpoint {
            host: format!("mx1.{target}"),
            ip: "127.0.0.1".into(),
            port: 25,
            family: pb::AddressFamily::Ipv4 as i32,
        }),
        check: check.into(),
        start_us,
        outcome: pb::Outcome::Ok as i32,
        timings: vec![
            pb::PhaseTiming {
                phase: "connect".into(),
                micros: 300 + seq,
            },
            pb::PhaseTiming {
                phase: "total".into(),
                micros: 1_000 + 37 * seq,
            },
        ],
        interval_ms: 60_000,
        ..Default::default()
    };
    if !ok {
        r.outcome = pb::Outcome::Fail as i32;
        r.error_class = "refused".into();
        r.phase = "connect".into();
        r.message = "connection refused".into();
        r.timings.remove(0);
        r.facts = vec![pb::Fact {
            key: mxscope_proto::facts::smtp::BANNER_CODE.into(),
            value: Some(pb::fact::Value::Int(421)),
        }];
    }
    r
}

/// `example.test`'s smtp result: the series most cases use.
fn smtp(agent: &str, seq: u64, ok: bool, start_us: i64) -> pb::ProbeResult {
    result(agent, seq, "example.test", "smtp", ok, start_us)
}

/// The endpoint label of [`result`]'s endpoint.
fn label(target: &str) -> String {
    mxscope_proto::endpoint_label(&format!("mx1.{target}"), "127.0.0.1", 25)
}

/// Sends a batch as the ingest does: encoded, read in place, with the refused seqs. Queued at
/// the call, like [`Store::put_batch`] itself; the returned future resolves at the commit.
fn put(
    store: &dyn Store,
    agent: &str,
    region: &str,
    results: &[pb::ProbeResult],
    rejected: &[u64],
    at_us: i64,
) -> Pending<u64> {
    let raw: Vec<Bytes> = results
        .iter()
        .map(|r| Bytes::from(r.encode_to_vec()))
        .collect();
    let views: Vec<ResultView<'_>> = raw
        .iter()
        .map(|b| ResultView::parse(b).expect("a result the suite encoded reads back"))
        .collect();
    store.put_batch(agent, region, &views, raw.clone(), rejected.to_vec(), at_us)
}

/// The seqs stored for `agent`, ascending.
async fn stored_seqs(store: &dyn Store, agent: &str) -> Result<Vec<u64>> {
    let filter = Filter {
        agent_id: agent.into(),
        ..Default::default()
    };
    let mut seqs: Vec<u64> = store
        .results(filter, 0, 10_000)
        .await?
        .iter()
        .map(|s| s.result.as_ref().map_or(0, |r| r.seq))
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

fn target(name: &str, checks: &[&str]) -> Target {
    mxscope_proto::target::validate(&pb::TargetSpec {
        name: name.into(),
        checks: checks.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    })
    .expect("valid target")
}

/// The next state change, waiting up to 5 s (a backend may send it just after the ack).
async fn next_event(events: &mut broadcast::Receiver<pb::WatchEvent>) -> Result<pb::WatchEvent> {
    match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
        Ok(Ok(e)) => Ok(e),
        Ok(Err(e)) => bail!("event stream: {e}"),
        Err(_) => bail!("no state change within 5 s"),
    }
}

fn series_id(target: &str, check: &str, region: &str) -> SeriesId {
    SeriesId {
        target: target.into(),
        check: check.into(),
        region: region.into(),
        endpoint: label(target),
    }
}

fn agg_of<'a>(results: impl IntoIterator<Item = &'a pb::ProbeResult>) -> Agg {
    let mut a = Agg::default();
    results.into_iter().for_each(|r| a.add(r));
    a
}

// ---- the cases ----------------------------------------------------------------------------

async fn case_register_agent_returns_stored_up_to_seq(store: Arc<dyn Store>) -> Result<()> {
    let t0 = now_us();
    let mut h = hello("a1", "eu-west", t0);
    h.labels.insert("asn".into(), "64500".into());
    ensure!(
        store.register_agent(h.clone()).await? == 0,
        "a new agent starts at 0"
    );
    let batch: Vec<_> = (1..=3)
        .map(|s| smtp("a1", s, true, t0 + s as i64))
        .collect();
    assert_eq!(put(&*store, "a1", "eu-west", &batch, &[], t0).await?, 3);
    // A reconnect learns the mark; region, version and labels follow the latest hello.
    let mut again = hello("a1", "eu-north", t0 + SEC);
    again.version = "0.2.0".into();
    assert_eq!(store.register_agent(again).await?, 3);
    assert_eq!(store.register_agent(hello("a2", "us-east", t0)).await?, 0);
    let agents = store.agents().await?;
    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["a1", "a2"], "by id");
    let a1 = &agents[0];
    assert_eq!(
        (a1.region.as_str(), a1.version.as_str(), a1.stored_up_to_seq),
        ("eu-north", "0.2.0", 3)
    );
    assert!(a1.labels.is_empty(), "labels replaced: {:?}", a1.labels);
    assert_eq!((a1.first_seen_us, a1.last_seen_us), (t0, t0 + SEC));
    assert_eq!(agents[1].stored_up_to_seq, 0);
    Ok(())
}

async fn case_put_batch_stores_each_seq_once(store: Arc<dyn Store>) -> Result<()> {
    let t0 = now_us() - HOUR;
    store.register_agent(hello("a1", "eu-west", t0)).await?;
    let batch = |seqs: &[u64]| -> Vec<pb::ProbeResult> {
        seqs.iter()
            .map(|&s| smtp("a1", s, true, t0 + s as i64 * SEC))
            .collect()
    };
    assert_eq!(
        put(&*store, "a1", "eu-west", &batch(&[1, 2, 3]), &[], t0).await?,
        3
    );
    // Re-sent as a whole (the ack was lost).
    assert_eq!(
        put(&*store, "a1", "eu-west", &batch(&[1, 2, 3]), &[], t0).await?,
        3
    );
    assert_eq!(stored_seqs(&*store, "a1").await?, [1, 2, 3]);
    // Overlapping, with a gap (the agent's full spool dropped 5 and 6).
    assert_eq!(
        put(&*store, "a1", "eu-west", &batch(&[2, 3, 4, 7]), &[], t0).await?,
        7
    );
    assert_eq!(stored_seqs(&*store, "a1").await?, [1, 2, 3, 4, 7]);
    // At or below the mark: duplicates, even if never stored.
    assert_eq!(
        put(&*store, "a1", "eu-west", &batch(&[5, 6]), &[], t0).await?,
        7
    );
    assert_eq!(stored_seqs(&*store, "a1").await?, [1, 2, 3, 4, 7]);
    assert_eq!(store.agents().await?[0].stored_up_to_seq, 7);
    // Aggregates count stored results only, raw window and hour rows alike.
    let want = agg_of(&batch(&[1, 2, 3, 4, 7]));
    for since in [t0 - MIN, now_us() - DAY] {
        let got = store
            .rollups(Filter::default(), since, now_us(), None)
            .await?;
        assert_eq!(
            got.get(&series_id("example.test", "smtp", "eu-west")),
            Some(&want),
            "since {since}"
        );
    }
    // An agent that never said hello is refused.
    let err = put(&*store, "ghost", "eu-west", &batch(&[8]), &[], t0)
        .await
        .expect_err("unknown agent");
    assert!(
        matches!(&err, StoreError::UnknownAgent(id) if id == "ghost"),
        "{err}"
    );
    assert!(stored_seqs(&*store, "ghost").await?.is_empty());
    Ok(())
}

async fn case_rejected_seqs_advance_the_mark_without_storing(store: Arc<dyn Store>) -> Result<()> {
    let t0 = now_us() - HOUR;
    store.register_agent(hello("a1", "eu-west", t0)).await?;
    let r = |s: u64| smtp("a1", s, true, t0 + s as i64 * SEC);
    assert_eq!(
        put(&*store, "a1", "eu-west", &[r(1), r(2)], &[3], t0).await?,
        3
    );
    // A batch of refusals only.
    assert_eq!(put(&*store, "a1", "eu-west", &[], &[4, 5], t0).await?, 5);
    assert_eq!(stored_seqs(&*store, "a1").await?, [1, 2]);
    assert_eq!(store.register_agent(hello("a1", "eu-west", t0)).await?, 5);
    // Re-sent after the refusal: below the mark, not stored; the new one is.
    assert_eq!(
        put(&*store, "a1", "eu-west", &[r(4), r(5), r(6)], &[], t0).await?,
        6
    );
    assert_eq!(stored_seqs(&*store, "a1").await?, [1, 2, 6]);
    // A refusal below the mark does not move it back.
    assert_eq!(put(&*store, "a1", "eu-west", &[], &[2], t0).await?, 6);
    // A refusal above a stored result: the mark is the highest of both.
    assert_eq!(put(&*store, "a1", "eu-west", &[r(7)], &[9], t0).await?, 9);
    assert_eq!(stored_seqs(&*store, "a1").await?, [1, 2, 6, 7]);
    assert_eq!(store.agents().await?[0].stored_up_to_seq, 9);
    Ok(())
}

async fn case_results_newest_first_with_filters_and_limit(store: Arc<dyn Store>) -> Result<()> {
    let t0 = now_us() - HOUR;
    let at = now_us();
    store.register_agent(hello("a1", "eu-west", t0)).await?;
    store.register_agent(hello("a2", "us-east", t0)).await?;
    // Start times interleave across agents, targets and checks; seq 3 of a1 failed.
    let a1 = vec![
        result("a1", 1, "alpha.test", "smtp", true, t0 + 10 * SEC),
        result("a1", 2, "alpha.test", "imap", true, t0 + 30 * SEC),
        result("a1", 3, "beta.test", "smtp", false, t0 + 50 * SEC),
    ];
    let a2 = vec![
        result("a2", 1, "alpha.test", "smtp", true, t0 + 20 * SEC),
        result("a2", 2, "beta.test", "imap", true, t0 + 40 * SEC),
    ];
    put(&*store, "a1", "eu-west", &a1, &[], at).await?;
    put(&*store, "a2", "us-east", &a2, &[], at + 1).await?;

    let all = store.results(Filter::default(), 0, 100).await?;
    let keys: Vec<(&str, u64)> = all
        .iter()
        .filter_map(|s| s.result.as_ref().map(|r| (r.agent_id.as_str(), r.seq)))
        .collect();
    assert_eq!(
        keys,
        [("a1", 3), ("a2", 2), ("a1", 2), ("a2", 1), ("a1", 1)],
        "newest first"
    );
    // Every field comes back as sent, with the agent's region and the storage time.
    assert_eq!(all[0].result.as_ref(), Some(&a1[2]));
    assert_eq!(
        (all[0].region.as_str(), all[0].stored_at_us),
        ("eu-west", at)
    );
    assert_eq!(all[1].result.as_ref(), Some(&a2[1]));
    assert_eq!(
        (all[1].region.as_str(), all[1].stored_at_us),
        ("us-east", at + 1)
    );

    let pick = |f: Filter, since: i64, limit: u32| {
        let store = store.clone();
        async move {
            let got = store.results(f, since, limit).await?;
            anyhow::Ok(
                got.iter()
                    .filter_map(|s| s.result.as_ref().map(|r| (r.agent_id.clone(), r.seq)))
                    .collect::<Vec<_>>(),
            )
        }
    };
    let k = |a: &str, s: u64| (a.to_string(), s);
    let f = |target: &str, check: &str, region: &str, agent: &str| Filter {
        target: target.into(),
        check: check.into(),
        region: region.into(),
        agent_id: agent.into(),
    };
    assert_eq!(
        pick(f("alpha.test", "", "", ""), 0, 100).await?,
        [k("a1", 2), k("a2", 1), k("a1", 1)]
    );
    assert_eq!(
        pick(f("", "imap", "", ""), 0, 100).await?,
        [k("a2", 2), k("a1", 2)]
    );
    assert_eq!(
        pick(f("", "", "us-east", ""), 0, 100).await?,
        [k("a2", 2), k("a2", 1)]
    );
    assert_eq!(
        pick(f("", "", "", "a1"), 0, 100).await?,
        [k("a1", 3), k("a1", 2), k("a1", 1)]
    );
    assert_eq!(
        pick(f("alpha.test", "smtp", "eu-west", "a1"), 0, 100).await?,
        [k("a1", 1)]
    );
    assert_eq!(
        pick(f("beta.test", "smtp", "us-east", ""), 0, 100).await?,
        []
    );
    assert_eq!(pick(f("", "", "", "nobody"), 0, 100).await?, []);
    // The limit keeps the newest; `since` is inclusive, on the start time.
    assert_eq!(
        pick(Filter::default(), 0, 2).await?,
        [k("a1", 3), k("a2", 2)]
    );
    assert_eq!(pick(f("", "", "", "a1"), 0, 1).await?, [k("a1", 3)]);
    assert_eq!(
        pick(Filter::default(), t0 + 30 * SEC, 100).await?,
        [k("a1", 3), k("a2", 2), k("a1", 2)]
    );
    assert_eq!(pick(Filter::default(), t0 + 51 * SEC, 100).await?, []);
    Ok(())
}

async fn case_series_state_follows_the_policy_and_changes_are_broadcast(
    store: Arc<dyn Store>,
) -> Result<()> {
    // Opened with fail_after = 3, recover_after = 2.
    let mut events = store.subscribe();
    let t0 = now_us() - HOUR;
    store.register_agent(hello("a1", "eu-west", t0)).await?;
    let at = |s: u64| t0 + s as i64 * MIN;
    let send = |s: u64, ok: bool| {
        let store = store.clone();
        async move {
            put(
                &*store,
                "a1",
                "eu-west",
                &[smtp("a1", s, ok, at(s))],
                &[],
                t0 + HOUR,
            )
            .await
        }
    };
    send(1, true).await?;
    send(2, false).await?;
    send(3, false).await?;
    let s = store.series(Filter::default()).await?;
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(!s[0].failing, "two failures of three needed");
    assert_eq!(
        (
            s[0].target.as_str(),
            s[0].endpoint.clone(),
            s[0].check.as_str(),
            s[0].region.as_str()
        ),
        ("example.test", label("example.test"), "smtp", "eu-west")
    );
    assert_eq!(
        (
            s[0].last_outcome,
            s[0].last_error.as_str(),
            s[0].last_message.as_str()
        ),
        (pb::Outcome::Fail as i32, "refused", "connection refused")
    );
    assert_eq!((s[0].last_seen_us, s[0].interval_ms), (at(3), 60_000));
    assert_eq!(
        (s[0].agent_id.as_str(), s[0].agent_last_seen_us),
        ("a1", Some(t0 + HOUR))
    );
    assert_eq!(s[0].last_phase, "connect");
    assert_eq!(
        s[0].last_facts
            .get(mxscope_proto::facts::smtp::BANNER_CODE)
            .map(String::as_str),
        Some("421")
    );

    send(4, false).await?;
    let e = next_event(&mut events).await?;
    assert_eq!(
        (e.old_state.as_str(), e.new_state.as_str(), e.at_us),
        ("ok", "failing", at(4)),
        "the first change is the third failure: {e:?}"
    );
    assert_eq!(
        (
            e.target.as_str(),
            e.endpoint.clone(),
            e.check.as_str(),
            e.region.as_str()
        ),
        ("example.test", label("example.test"), "smtp", "eu-west")
    );
    assert_eq!(
        (e.error_class.as_str(), e.level.as_str()),
        ("refused", "endpoint")
    );
    let s = store.series(Filter::default()).await?;
    assert!(s[0].failing);
    assert_eq!(s[0].state_since_us, at(4));

    send(5, true).await?;
    assert!(
        store.series(Filter::default()).await?[0].failing,
        "one success of two"
    );
    send(6, true).await?;
    let e = next_event(&mut events).await?;
    assert_eq!(
        (e.old_state.as_str(), e.new_state.as_str(), e.at_us),
        ("failing", "ok", at(6))
    );
    assert_eq!(e.error_class, "");
    let s = store.series(Filter::default()).await?;
    assert!(!s[0].failing);
    assert_eq!((s[0].state_since_us, s[0].last_error.as_str()), (at(6), ""));

    // An interrupted streak starts again: fail, ok, then three failures flip at the last.
    for (seq, ok) in [(7, false), (8, true), (9, false), (10, false), (11, false)] {
        send(seq, ok).await?;
    }
    let e = next_event(&mut events).await?;
    assert_eq!(
        (e.old_state.as_str(), e.new_state.as_str(), e.at_us),
        ("ok", "failing", at(11)),
        "no change before the third failure in a row: {e:?}"
    );
    // Every change is stored too, newest first, from a point in time and bounded in count.
    let stored = store.changes("example.test", t0, 10).await?;
    let flips: Vec<(&str, &str, i64)> = stored
        .iter()
        .map(|e| (e.old_state.as_str(), e.new_state.as_str(), e.at_us))
        .collect();
    assert_eq!(
        flips,
        [
            ("ok", "failing", at(11)),
            ("failing", "ok", at(6)),
            ("ok", "failing", at(4))
        ],
        "{stored:?}"
    );
    assert_eq!(
        (
            stored[2].check.as_str(),
            stored[2].region.as_str(),
            stored[2].error_class.as_str()
        ),
        ("smtp", "eu-west", "refused")
    );
    assert_eq!(store.changes("example.test", at(5), 10).await?.len(), 2);
    assert_eq!(store.changes("example.test", t0, 1).await?.len(), 1);
    assert!(store.changes("other.test", t0, 10).await?.is_empty());
    // A filter on another region or target matches no series.
    for f in [
        Filter {
            region: "us-east".into(),
            ..Default::default()
        },
        Filter {
            target: "other.test".into(),
            ..Default::default()
        },
        Filter {
            check: "imap".into(),
            ..Default::default()
        },
    ] {
        assert!(store.series(f.clone()).await?.is_empty(), "{f:?}");
    }
    assert_eq!(
        store
            .series(Filter {
                target: "example.test".into(),
                check: "smtp".into(),
                region: "eu-west".into(),
                ..Default::default()
            })
            .await?
            .len(),
        1
    );
    Ok(())
}

async fn case_heartbeat_updates_the_agent_row(store: Arc<dyn Store>) -> Result<()> {
    let t0 = now_us();
    let mut h = hello("a1", "eu-west", t0);
    h.dropped_total = 4;
    h.cert_not_after_us = Some(t0 + 90 * 86_400 * SEC);
    store.register_agent(h).await?;
    let a = &store.agents().await?[0];
    assert_eq!((a.spool_depth, a.dropped_total, a.last_seen_us), (0, 4, t0));
    assert_eq!(
        a.cert_not_after_us,
        Some(t0 + 90 * 86_400 * SEC),
        "the session's certificate expiry"
    );
    store.heartbeat("a1", 17, 9, t0 + 5 * SEC).await?;
    let a = &store.agents().await?[0];
    assert_eq!(
        (
            a.spool_depth,
            a.dropped_total,
            a.first_seen_us,
            a.last_seen_us
        ),
        (17, 9, t0, t0 + 5 * SEC)
    );
    // A late heartbeat (sent before the last one) does not move last-seen back.
    store.heartbeat("a1", 3, 10, t0 + 2 * SEC).await?;
    let a = &store.agents().await?[0];
    assert_eq!(
        (a.spool_depth, a.dropped_total, a.last_seen_us),
        (3, 10, t0 + 5 * SEC)
    );
    let err = store
        .heartbeat("ghost", 1, 1, t0)
        .await
        .expect_err("unknown agent");
    assert!(
        matches!(&err, StoreError::UnknownAgent(id) if id == "ghost"),
        "{err}"
    );
    assert_eq!(store.agents().await?.len(), 1);
    Ok(())
}

async fn case_central_targets_put_update_remove(store: Arc<dyn Store>) -> Result<()> {
    assert!(store.central_targets().await?.is_empty());
    let full = mxscope_proto::target::validate(&pb::TargetSpec {
        name: "zulu.test".into(),
        checks: vec!["smtp".into(), "mx".into()],
        interval_ms: 30_000,
        regions: vec!["eu-west".into()],
        labels: [("team".to_string(), "mail".to_string())]
            .into_iter()
            .collect(),
        ports: [("smtp".to_string(), 2525)].into_iter().collect(),
        require_tls: true,
        ..Default::default()
    })?;
    let alpha = target("alpha.test", &["mx"]);
    store.put_target(full.clone(), false, 1).await?;
    store.put_target(alpha.clone(), false, 2).await?;
    assert_eq!(
        store.central_targets().await?,
        [alpha.clone(), full.clone()],
        "by name"
    );

    let err = store
        .put_target(alpha.clone(), false, 3)
        .await
        .expect_err("exists");
    assert!(
        matches!(&err, StoreError::TargetExists(n) if n == "alpha.test"),
        "{err}"
    );
    let err = store
        .put_target(target("missing.test", &["mx"]), true, 3)
        .await
        .expect_err("update of a missing target");
    assert!(
        matches!(&err, StoreError::TargetNotFound(n) if n == "missing.test"),
        "{err}"
    );
    assert_eq!(
        store.central_targets().await?.len(),
        2,
        "neither error wrote"
    );

    let updated = mxscope_proto::target::validate(&pb::TargetSpec {
        name: "alpha.test".into(),
        checks: vec!["mx".into(), "smtp".into()],
        interval_ms: 5_000,
        ..Default::default()
    })?;
    store.put_target(updated.clone(), true, 4).await?;
    assert_eq!(store.central_targets().await?, [updated, full.clone()]);

    store.remove_target("alpha.test").await?;
    assert_eq!(store.central_targets().await?, [full]);
    let err = store
        .remove_target("alpha.test")
        .await
        .expect_err("removed already");
    assert!(
        matches!(&err, StoreError::TargetNotFound(n) if n == "alpha.test"),
        "{err}"
    );
    // Put again after a remove: a new target.
    store.put_target(alpha.clone(), false, 5).await?;
    assert_eq!(store.central_targets().await?.len(), 2);
    Ok(())
}

async fn case_local_targets_come_from_the_latest_hello(store: Arc<dyn Store>) -> Result<()> {
    let t0 = now_us();
    let sorted = |mut v: Vec<(String, String, Target)>| {
        v.sort_by(|a, b| (&a.2.name, &a.0).cmp(&(&b.2.name, &b.0)));
        v
    };
    let row = |a: &str, r: &str, t: &Target| (a.to_string(), r.to_string(), t.clone());
    let (x1, y1, x2, z1) = (
        target("x.test", &["imap"]),
        target("y.test", &["smtp", "mx"]),
        target("x.test", &["mx"]),
        target("z.test", &["pop3"]),
    );
    let mut h1 = hello("a1", "eu-west", t0);
    h1.local_targets = vec![x1.clone(), y1.clone()];
    let mut h2 = hello("a2", "us-east", t0);
    h2.local_targets = vec![x2.clone()];
    store.register_agent(h1.clone()).await?;
    store.register_agent(h2).await?;
    assert_eq!(
        sorted(store.local_targets().await?),
        [
            row("a1", "eu-west", &x1),
            row("a2", "us-east", &x2),
            row("a1", "eu-west", &y1)
        ]
    );
    assert!(
        store.central_targets().await?.is_empty(),
        "local targets are not central"
    );
    // The next hello replaces the agent's list (and its region), not the other agent's.
    h1.local_targets = vec![z1.clone()];
    h1.region = "eu-north".into();
    store.register_agent(h1.clone()).await?;
    assert_eq!(
        sorted(store.local_targets().await?),
        [row("a2", "us-east", &x2), row("a1", "eu-north", &z1)]
    );
    h1.local_targets.clear();
    store.register_agent(h1).await?;
    assert_eq!(store.local_targets().await?, [row("a2", "us-east", &x2)]);
    Ok(())
}

async fn case_results_per_agent_counts_from_since(store: Arc<dyn Store>) -> Result<()> {
    let t0 = now_us() - HOUR;
    for (id, region) in [("a1", "eu-west"), ("a2", "us-east"), ("a3", "ap-south")] {
        store.register_agent(hello(id, region, t0)).await?;
    }
    let a1: Vec<_> = (1..=4)
        .map(|s| smtp("a1", s, s != 2, t0 + s as i64 * MIN))
        .collect();
    let a2: Vec<_> = (1..=2)
        .map(|s| smtp("a2", s, true, t0 + 10 * s as i64 * MIN))
        .collect();
    put(&*store, "a1", "eu-west", &a1, &[], t0).await?;
    put(&*store, "a2", "us-east", &a2, &[], t0).await?;
    let counts = |since: i64| {
        let store = store.clone();
        async move {
            let mut got = store.results_per_agent(since).await?;
            // An agent without results in the window may be listed with 0 or left out.
            got.retain(|_, n| *n > 0);
            anyhow::Ok(got)
        }
    };
    let want = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
        pairs.iter().map(|(a, n)| (a.to_string(), *n)).collect()
    };
    assert_eq!(counts(0).await?, want(&[("a1", 4), ("a2", 2)]));
    // Inclusive at `since`: a1's seqs 3 and 4, a2's seq 1 and 2 (at +10 and +20 minutes).
    assert_eq!(counts(t0 + 3 * MIN).await?, want(&[("a1", 2), ("a2", 2)]));
    assert_eq!(counts(t0 + 5 * MIN).await?, want(&[("a2", 2)]));
    assert_eq!(counts(t0 + 20 * MIN).await?, want(&[("a2", 1)]));
    assert_eq!(counts(t0 + 21 * MIN).await?, want(&[]));
    Ok(())
}

async fn case_rollups_count_every_window_from_raw_and_stored_rollups(
    store: Arc<dyn Store>,
) -> Result<()> {
    let now = now_us();
    store.register_agent(hello("a1", "eu-west", now)).await?;
    // One series at ages from half an hour to 25 days, and a second series (another target).
    let ages = [
        (30 * MIN, true),
        (2 * HOUR, false),
        (5 * HOUR, true),
        (2 * DAY, true),
        (10 * DAY, true),
        (25 * DAY, false),
    ];
    let main: Vec<_> = ages
        .iter()
        .zip(1u64..)
        .map(|((age, ok), seq)| smtp("a1", seq, *ok, now - age))
        .collect();
    let other = vec![
        result("a1", 7, "other.test", "smtp", true, now - 20 * MIN),
        result("a1", 8, "other.test", "smtp", true, now - 6 * HOUR),
    ];
    put(&*store, "a1", "eu-west", &main, &[], now).await?;
    put(&*store, "a1", "eu-west", &other, &[], now).await?;
    let id = series_id("example.test", "smtp", "eu-west");
    let other_id = series_id("other.test", "smtp", "eu-west");

    // Window → how many of `main`'s newest results it holds. Up to 3 h reads raw results; 1 and
    // 7 days read hour and day rows; 21 days day rows; 30 days week rows (store::rollup::plan).
    // No result sits within a bucket width before a window's start, so each count is exact.
    for (span, n_main, n_other) in [
        (HOUR, 1, 1),
        (3 * HOUR, 2, 1),
        (DAY, 3, 2),
        (7 * DAY, 4, 2),
        (21 * DAY, 5, 2),
        (30 * DAY, 6, 2),
    ] {
        let got = store
            .rollups(Filter::default(), now - span, now, None)
            .await?;
        assert_eq!(
            got.keys().cloned().collect::<Vec<_>>(),
            [id.clone(), other_id.clone()],
            "span {span}"
        );
        assert_eq!(got[&id], agg_of(&main[..n_main]), "span {} h", span / HOUR);
        assert_eq!(
            got[&other_id],
            agg_of(&other[..n_other]),
            "span {} h",
            span / HOUR
        );
        // Counts only: the same counts, no sketches.
        let counts = store
            .rollups(Filter::default(), now - span, now, Some(String::new()))
            .await?;
        let (c, want) = (&counts[&id], agg_of(&main[..n_main]));
        assert_eq!(
            (c.count, c.ok, c.warn, c.fail),
            (want.count, want.ok, want.warn, want.fail)
        );
        assert!(c.phases.is_empty(), "span {span}: {:?}", c.phases);
        // One phase: only that phase's sketch.
        let one = store
            .rollups(Filter::default(), now - span, now, Some("connect".into()))
            .await?;
        let keys: Vec<&str> = one[&id].phases.keys().collect();
        assert_eq!(keys, ["connect"], "span {span}");
        assert_eq!(
            one[&id].phases["connect"],
            *want.phases.get("connect").context("connect")?
        );
    }
    // A filter narrows the series; a window with no result has no entry.
    let f = Filter {
        target: "other.test".into(),
        ..Default::default()
    };
    let got = store.rollups(f, now - DAY, now, None).await?;
    assert_eq!(got.keys().collect::<Vec<_>>(), [&other_id]);
    let f = Filter {
        region: "us-east".into(),
        ..Default::default()
    };
    assert!(store
        .rollups(f, now - 30 * DAY, now, None)
        .await?
        .is_empty());
    assert!(store
        .rollups(Filter::default(), now - 10 * MIN, now, None)
        .await?
        .is_empty());
    Ok(())
}

async fn case_history_has_one_entry_per_bucket_and_series(store: Arc<dyn Store>) -> Result<()> {
    let now = now_us();
    store.register_agent(hello("a1", "eu-west", now)).await?;
    // Two results in one minute 40 minutes ago, one ten minutes before; two in older days.
    let m = (now - 40 * MIN).div_euclid(MIN) * MIN;
    let recent = vec![
        smtp("a1", 1, true, m - 10 * MIN),
        smtp("a1", 2, false, m + 1_000_000),
        smtp("a1", 3, true, m + 2_000_000),
    ];
    let old = vec![
        smtp("a1", 4, true, now - 5 * DAY),
        smtp("a1", 5, true, now - 2 * DAY),
    ];
    put(&*store, "a1", "eu-west", &recent, &[], now).await?;
    put(&*store, "a1", "eu-west", &old, &[], now).await?;
    let id = series_id("example.test", "smtp", "eu-west");

    // An hour: minute buckets of the raw results, oldest first.
    let got = store
        .history(Filter::default(), now - HOUR, now, None)
        .await?;
    let want = vec![
        (m - 10 * MIN, id.clone(), agg_of(&recent[..1])),
        (m, id.clone(), agg_of(&recent[1..])),
    ];
    ensure!(got == want, "1 h history: {got:?}");
    // Seven days: day rows, one per day that holds results.
    let day = |t: i64| t.div_euclid(DAY) * DAY;
    let got = store
        .history(Filter::default(), now - 7 * DAY, now, Some(String::new()))
        .await?;
    let buckets: Vec<(i64, u64)> = got.iter().map(|(b, _, a)| (*b, a.count)).collect();
    let mut want: BTreeMap<i64, u64> = BTreeMap::new();
    for t in [now - 5 * DAY, now - 2 * DAY, m - 10 * MIN, m, m] {
        *want.entry(day(t)).or_default() += 1;
    }
    ensure!(
        buckets == want.into_iter().collect::<Vec<_>>(),
        "7 d history: {buckets:?}"
    );
    ensure!(got.iter().all(|(_, s, _)| *s == id), "one series: {got:?}");
    // A filter that matches nothing: nothing.
    let f = Filter {
        region: "us-east".into(),
        ..Default::default()
    };
    ensure!(store.history(f, now - HOUR, now, None).await?.is_empty());
    Ok(())
}

async fn case_status_input_has_series_and_window_samples(store: Arc<dyn Store>) -> Result<()> {
    let t0 = now_us() - HOUR;
    store.register_agent(hello("a1", "eu-west", t0)).await?;
    store.register_agent(hello("a2", "us-east", t0)).await?;
    let a1 = vec![
        smtp("a1", 1, true, t0 + MIN),
        smtp("a1", 2, false, t0 + 2 * MIN),
        result("a1", 3, "other.test", "imap", true, t0 + 3 * MIN),
    ];
    let a2 = vec![smtp("a2", 1, true, t0 + 4 * MIN)];
    put(&*store, "a1", "eu-west", &a1, &[], t0).await?;
    put(&*store, "a2", "us-east", &a2, &[], t0).await?;

    let f = Filter {
        target: "example.test".into(),
        ..Default::default()
    };
    let (series, mut samples) = store.status_input(f, t0 + 2 * MIN).await?;
    let mut regions: Vec<&str> = series.iter().map(|s| s.region.as_str()).collect();
    regions.sort_unstable();
    assert_eq!(
        regions,
        ["eu-west", "us-east"],
        "both regions' series, the whole history"
    );
    samples.sort_by_key(|s| (s.region.clone(), s.outcome));
    let got: Vec<_> = samples
        .iter()
        .map(|s| {
            (
                s.target.as_str(),
                s.endpoint.clone(),
                s.check.as_str(),
                s.region.as_str(),
                s.outcome,
                s.total_us,
            )
        })
        .collect();
    let ep = label("example.test");
    assert_eq!(
        got,
        [
            (
                "example.test",
                ep.clone(),
                "smtp",
                "eu-west",
                pb::Outcome::Fail as i32,
                Some(1_074)
            ),
            (
                "example.test",
                ep,
                "smtp",
                "us-east",
                pb::Outcome::Ok as i32,
                Some(1_037)
            ),
        ],
        "samples from `since` on, of the filter's series"
    );
    let (series, samples) = store.status_input(Filter::default(), 0).await?;
    assert_eq!((series.len(), samples.len()), (3, 4));
    let f = Filter {
        region: "ap-south".into(),
        ..Default::default()
    };
    let (series, samples) = store.status_input(f, 0).await?;
    assert!(series.is_empty() && samples.is_empty());
    Ok(())
}

async fn case_prune_deletes_results_past_retention_in_rounds(store: Arc<dyn Store>) -> Result<()> {
    // Opened with a 1 h retention and 3 rows per table per round.
    assert_eq!(store.prune_batch(), 3);
    let now = now_us();
    store.register_agent(hello("a1", "eu-west", now)).await?;
    // Four results started and stored two hours ago, three now. Rollups of both are recent,
    // far inside the rollup retention: only raw rows are deleted.
    let old: Vec<_> = (1..=4)
        .map(|s| smtp("a1", s, true, now - 2 * HOUR - 10 * SEC + s as i64))
        .collect();
    let new: Vec<_> = (5..=7)
        .map(|s| smtp("a1", s, true, now - 10 * SEC + s as i64))
        .collect();
    put(&*store, "a1", "eu-west", &old, &[], now - 2 * HOUR).await?;
    put(&*store, "a1", "eu-west", &new, &[], now).await?;
    let day_before = store
        .rollups(Filter::default(), now - DAY, now, None)
        .await?;
    assert_eq!(day_before.values().map(|a| a.count).sum::<u64>(), 7);

    // A round deletes at most prune_batch rows one by one; a backend that partitions by day
    // (PostgreSQL) drops a day wholly past the retention at once, which happens here when the
    // two hours straddle midnight. Either way the rounds catch up with the four old rows.
    let first = store.prune(now).await?;
    ensure!(
        first == 3 || first == 4,
        "first round deleted {first}, want the batch (3) or the old day (4)"
    );
    assert_eq!(
        first + mxscope_collector::store::prune_all(&*store, now).await?,
        4
    );
    assert_eq!(store.prune(now).await?, 0, "caught up");
    assert_eq!(
        stored_seqs(&*store, "a1").await?,
        [5, 6, 7],
        "the fresh rows stay"
    );
    // The rollups keep counting what was pruned; the mark is unchanged.
    let day_after = store
        .rollups(Filter::default(), now - DAY, now, None)
        .await?;
    assert_eq!(day_after, day_before);
    assert_eq!(store.agents().await?[0].stored_up_to_seq, 7);
    // Two hours on, the rest is past the retention too; prune_all runs rounds until one is short.
    assert_eq!(
        mxscope_collector::store::prune_all(&*store, now + 2 * HOUR).await?,
        3
    );
    assert!(stored_seqs(&*store, "a1").await?.is_empty());
    Ok(())
}

async fn case_close_then_writes_fail_with_writer_closed(store: Arc<dyn Store>) -> Result<()> {
    let t0 = now_us();
    store.register_agent(hello("a1", "eu-west", t0)).await?;
    let committed = put(
        &*store,
        "a1",
        "eu-west",
        &[smtp("a1", 1, true, t0)],
        &[],
        t0,
    );
    store.close().await?;
    // A write queued before close is committed, not lost.
    assert_eq!(committed.await?, 1);
    let closed = |r: Result<(), StoreError>, what: &str| match r {
        Err(StoreError::WriterClosed) => Ok(()),
        other => bail!("{what} after close: {other:?}, want WriterClosed"),
    };
    closed(
        store
            .register_agent(hello("a1", "eu-west", t0))
            .await
            .map(|_| ()),
        "register_agent",
    )?;
    closed(
        put(
            &*store,
            "a1",
            "eu-west",
            &[smtp("a1", 2, true, t0)],
            &[],
            t0,
        )
        .await
        .map(|_| ()),
        "put_batch",
    )?;
    closed(store.heartbeat("a1", 1, 0, t0).await, "heartbeat")?;
    closed(
        store.put_target(target("a.test", &["mx"]), false, t0).await,
        "put_target",
    )?;
    closed(store.remove_target("a.test").await, "remove_target")?;
    closed(store.prune(t0).await.map(|_| ()), "prune")?;
    Ok(())
}
