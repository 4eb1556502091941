use std::time::Duration;

use mxscope_proto::pb;
use mxscope_proto::time::now_us;
use rusqlite::Connection;
use tempfile::TempDir;

use super::*;

fn opts(linger_ms: u64) -> StoreOptions {
    StoreOptions {
        batch_max: 1000,
        linger: Duration::from_millis(linger_ms),
        readers: 2,
        ..StoreOptions::default()
    }
}

fn open(dir: &TempDir, linger_ms: u64) -> SqliteStore {
    SqliteStore::open(&dir.path().join("t.db"), opts(linger_ms)).expect("open store")
}

fn hello(id: &str) -> AgentHello {
    AgentHello {
        id: id.into(),
        region: "eu-west".into(),
        version: "0.1.0".into(),
        at_us: now_us(),
        ..Default::default()
    }
}

fn result(agent: &str, seq: u64) -> pb::ProbeResult {
    pb::ProbeResult {
        agent_id: agent.into(),
        seq,
        target: "example.test".into(),
        endpoint: Some(pb::Endpoint {
            host: "mx1.example.test".into(),
            ip: "127.0.0.1".into(),
            port: 25,
            family: pb::AddressFamily::Ipv4 as i32,
        }),
        check: "smtp".into(),
        start_us: 1_000_000 + seq as i64,
        outcome: pb::Outcome::Ok as i32,
        timings: vec![pb::PhaseTiming {
            phase: "total".into(),
            micros: 1500,
        }],
        interval_ms: 60_000,
        ..Default::default()
    }
}

/// A target through proto's validator, as `PutTarget` and the ingest store them.
fn target(name: &str, checks: &[&str]) -> Target {
    mxscope_proto::target::validate(&pb::TargetSpec {
        name: name.into(),
        checks: checks.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    })
    .expect("valid target")
}

fn seqs(path: &std::path::Path, agent: &str) -> Vec<i64> {
    let c = Connection::open(path).expect("reader");
    let mut st = c
        .prepare(
            "SELECT r.seq FROM results r JOIN agents a ON a.num = r.agent_num WHERE a.id = ?1
             ORDER BY r.seq",
        )
        .expect("prepare");
    st.query_map([agent], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

#[tokio::test]
async fn batching_commits_many_requests_in_few_transactions() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir, 500);
    store.register_agent(hello("a1")).await.unwrap();
    let before = store.stats().transactions.load(Ordering::Relaxed);

    // All 300 requests are queued before the writer's linger ends.
    let pending: Vec<_> = (1..=300)
        .map(|seq| store.store_results("a1", "eu-west", vec![result("a1", seq)], now_us()))
        .collect();
    let path = dir.path().join("t.db");
    for (i, p) in pending.into_iter().enumerate() {
        let hwm = p.await.expect("committed");
        assert_eq!(hwm, i as u64 + 1);
        // Acked means committed: another connection sees the rows.
        assert!(seqs(&path, "a1").len() as u64 >= hwm);
    }
    let txs = store.stats().transactions.load(Ordering::Relaxed) - before;
    assert!(
        (1..=3).contains(&txs),
        "300 requests took {txs} transactions"
    );
    assert_eq!(seqs(&path, "a1").len(), 300);
    store.close().await.unwrap();
}

#[tokio::test]
async fn resent_results_are_stored_once_and_hwm_allows_gaps() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("t.db");
    let store = open(&dir, 0);
    assert_eq!(store.register_agent(hello("a1")).await.unwrap(), 0);
    // Recent results: every rollup level keeps their rows.
    let t0 = now_us() - 3_600_000_000;
    let batch = |s: &[u64]| {
        s.iter()
            .map(|&q| outcome_result("a1", q, true, t0 + q as i64))
            .collect::<Vec<_>>()
    };

    assert_eq!(
        store
            .store_results("a1", "eu-west", batch(&[1, 2, 3]), now_us())
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        store
            .store_results("a1", "eu-west", batch(&[1, 2, 3]), now_us())
            .await
            .unwrap(),
        3
    );
    assert_eq!(seqs(&path, "a1"), vec![1, 2, 3]);

    // Overlap plus a gap (the agent dropped 5 and 6 from a full spool).
    assert_eq!(
        store
            .store_results("a1", "eu-west", batch(&[2, 3, 4, 7]), now_us())
            .await
            .unwrap(),
        7
    );
    assert_eq!(seqs(&path, "a1"), vec![1, 2, 3, 4, 7]);
    // Below the high-water mark counts as a duplicate.
    assert_eq!(
        store
            .store_results("a1", "eu-west", batch(&[5, 6]), now_us())
            .await
            .unwrap(),
        7
    );
    assert_eq!(seqs(&path, "a1"), vec![1, 2, 3, 4, 7]);
    // Rollups count the stored results only, at every level (duplicates are not aggregated).
    store.sync().await.unwrap();
    let c = Connection::open(&path).expect("reader");
    for level in rollup::Level::ALL {
        let n: i64 = c
            .query_row(
                "SELECT coalesce(sum(count), 0) FROM rollups WHERE level = ?1",
                [level.code()],
                |r| r.get(0),
            )
            .expect("rollup count");
        assert_eq!(n, 5, "{level:?}");
    }

    // A reconnect learns the mark.
    assert_eq!(store.register_agent(hello("a1")).await.unwrap(), 7);
    // Another agent has its own mark.
    store.register_agent(hello("a2")).await.unwrap();
    let b2 = vec![result("a2", 1)];
    assert_eq!(
        store
            .store_results("a2", "eu-west", b2, now_us())
            .await
            .unwrap(),
        1
    );
    // Results of an agent that never said hello are refused.
    let err = store
        .store_results("ghost", "eu-west", vec![result("ghost", 1)], now_us())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::UnknownAgent(_)), "{err}");
    store.close().await.unwrap();
}

#[tokio::test]
async fn one_failing_request_does_not_spoil_its_batch() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir, 100);
    let def = target("example.test", &["mx"]);
    let a = store.put_target(def.clone(), false, 1);
    let b = store.put_target(def.clone(), false, 2);
    let c = store.register_agent(hello("a1"));
    assert!(a.await.is_ok());
    assert!(matches!(b.await, Err(StoreError::TargetExists(n)) if n == "example.test"));
    assert_eq!(c.await.unwrap(), 0);
    assert_eq!(store.central_targets().await.unwrap(), vec![def.clone()]);

    assert!(matches!(
        store
            .put_target(
                Target {
                    name: "other.test".into(),
                    ..def.clone()
                },
                true,
                3
            )
            .await,
        Err(StoreError::TargetNotFound(_))
    ));
    let mut updated = def.clone();
    updated.interval = Duration::from_secs(5);
    store.put_target(updated.clone(), true, 4).await.unwrap();
    assert_eq!(store.central_targets().await.unwrap(), vec![updated]);
    store.remove_target("example.test").await.unwrap();
    assert!(store.central_targets().await.unwrap().is_empty());
    assert!(matches!(
        store.remove_target("example.test").await,
        Err(StoreError::TargetNotFound(_))
    ));
    store.close().await.unwrap();
    assert!(matches!(
        store.register_agent(hello("a1")).await,
        Err(StoreError::WriterClosed)
    ));
}

#[tokio::test]
async fn results_round_trip_numbers_facts_and_series() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir, 0);
    store.register_agent(hello("a1")).await.unwrap();
    let mut r = result("a1", 1);
    r.outcome = pb::Outcome::Fail as i32;
    r.error_class = "refused".into();
    r.phase = "connect".into();
    r.message = "connection refused".into();
    r.timings.insert(
        0,
        pb::PhaseTiming {
            phase: "connect".into(),
            micros: 700,
        },
    );
    r.facts = vec![
        pb::Fact {
            key: "banner".into(),
            value: Some(pb::fact::Value::Text("220 hi".into())),
        },
        pb::Fact {
            key: "code".into(),
            value: Some(pb::fact::Value::Int(421)),
        },
        pb::Fact {
            key: "ratio".into(),
            value: Some(pb::fact::Value::Float(1.0)),
        },
        pb::Fact {
            key: "tls".into(),
            value: Some(pb::fact::Value::Flag(true)),
        },
    ];
    // An unknown outcome and a missing endpoint are stored, not a panic.
    let mut odd = result("a1", 2);
    odd.outcome = 42;
    odd.endpoint = None;
    store
        .store_results("a1", "eu-west", vec![r.clone(), odd], now_us())
        .await
        .unwrap();

    let got = store.results(Filter::default(), 0, 10).await.unwrap();
    assert_eq!(got.len(), 2);
    let back = got
        .iter()
        .find_map(|s| s.result.clone().filter(|r| r.seq == 1))
        .unwrap();
    assert_eq!(back, r);
    assert_eq!(got[0].region, "eu-west");

    let f = Filter {
        target: "example.test".into(),
        check: "smtp".into(),
        ..Default::default()
    };
    let (series, samples) = store.status_input(f, 0).await.unwrap();
    assert_eq!(series.len(), 2, "{series:?}");
    let s = series
        .iter()
        .find(|s| s.endpoint == "mx1.example.test[127.0.0.1]:25")
        .unwrap();
    assert_eq!(
        (s.last_outcome, s.last_error.as_str()),
        (pb::Outcome::Fail as i32, "refused")
    );
    assert_eq!(samples.len(), 2);
    let none = Filter {
        region: "us-east".into(),
        ..Default::default()
    };
    assert!(store.status_input(none, 0).await.unwrap().0.is_empty());
    store.close().await.unwrap();
}

/// The `spec` column keeps the JSON earlier versions wrote (wire names and spellings, sorted
/// maps), so a database still opens on either side of an upgrade.
#[tokio::test]
async fn stored_targets_keep_their_json_and_read_back_as_put() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("t.db");
    let store = SqliteStore::open(&path, opts(0)).unwrap();
    let t = mxscope_proto::target::validate(&pb::TargetSpec {
        name: "Example.TEST.".into(),
        checks: vec!["smtp".into(), "mx".into()],
        interval_ms: 30_000,
        regions: vec!["eu-west".into()],
        labels: [("team", "mail"), ("canary", "true")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ports: [("smtp".to_string(), 2525)].into_iter().collect(),
        require_tls: true,
        ..Default::default()
    })
    .unwrap();
    store.put_target(t.clone(), false, 1).await.unwrap();
    let spec: String = Connection::open(&path)
        .unwrap()
        .query_row("SELECT spec FROM targets", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        spec,
        r#"{"name":"example.test","checks":["smtp","mx"],"interval_ms":30000,"timeout_ms":10000,"regions":["eu-west"],"labels":{"canary":"true","team":"mail"},"ports":{"smtp":2525},"require_tls":true,"kind":"domain"}"#
    );
    assert_eq!(store.central_targets().await.unwrap(), vec![t]);
    store.close().await.unwrap();
}

/// Rows this version cannot take as written: a check it does not know (a newer collector or agent
/// wrote it) is left out, a central target it refuses is an error that names the target, and a
/// local target it refuses is left out.
#[tokio::test]
async fn stored_targets_from_another_version_are_read_or_named() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("t.db");
    let store = SqliteStore::open(&path, opts(0)).unwrap();
    store.register_agent(hello("a1")).await.unwrap();
    let c = Connection::open(&path).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let central = |name: &str, spec: &str| {
        c.execute(
            "INSERT INTO targets (name, spec, created_us, updated_us) VALUES (?1, ?2, 1, 1)",
            [name, spec],
        )
        .unwrap();
    };
    central(
        "newer.test",
        r#"{"name":"newer.test","checks":["mx","carrier-pigeon"],"ports":{"carrier-pigeon":7}}"#,
    );
    assert_eq!(
        store.central_targets().await.unwrap(),
        vec![target("newer.test", &["mx"])]
    );

    for (name, spec) in [
        (
            "odd.test",
            r#"{"name":"odd.test","checks":["smtp"],"kind":"satellite"}"#,
        ),
        ("ok.test", r#"{"name":"ok.test","checks":["imap"]}"#),
    ] {
        c.execute(
            "INSERT INTO agent_targets (agent_id, name, spec, reported_us) VALUES ('a1', ?1, ?2, 1)",
            [name, spec],
        )
        .unwrap();
    }
    let local = store.local_targets().await.unwrap();
    assert_eq!(
        local,
        vec![(
            "a1".to_string(),
            "eu-west".to_string(),
            target("ok.test", &["imap"])
        )]
    );

    central(
        "odd.test",
        r#"{"name":"odd.test","checks":["smtp"],"kind":"satellite"}"#,
    );
    let err = store.central_targets().await.unwrap_err();
    assert!(
        matches!(&err, StoreError::BadTarget { name, .. } if name == "odd.test"),
        "{err}"
    );
    let msg = crate::error::chain(&err);
    assert!(
        msg.contains("'odd.test'") && msg.contains("satellite"),
        "{msg}"
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn migrates_an_old_database_and_keeps_its_data() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("old.db");
    {
        let mut c = Connection::open(&path).unwrap();
        schema::migrate_to(&mut c, &path, 1).unwrap();
        assert_eq!(schema::version(&c).unwrap(), 1);
        c.execute_batch(
            "INSERT INTO agents (id, region, version, labels, first_seen_us, last_seen_us, stored_up_to_seq)
                 VALUES ('old-1', 'eu-west', '0.0.1', '{\"asn\":\"64500\"}', 1, 2, 41);
             INSERT INTO targets (name, spec, created_us, updated_us)
                 VALUES ('example.test', '{\"name\":\"example.test\",\"checks\":[\"mx\"]}', 1, 1);",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path, opts(0)).unwrap();
    let c = Connection::open(&path).unwrap();
    assert_eq!(schema::version(&c).unwrap(), SCHEMA_VERSION);
    const { assert!(SCHEMA_VERSION >= 2) };
    let agents = store.agents().await.unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(
        (agents[0].id.as_str(), agents[0].stored_up_to_seq),
        ("old-1", 41)
    );
    assert_eq!(
        agents[0].labels.get("asn").map(String::as_str),
        Some("64500")
    );
    assert_eq!(
        store.central_targets().await.unwrap()[0].checks,
        vec![mxscope_proto::CheckKind::Mx]
    );
    // The old agent's mark survives; the table added by migration 2 works.
    let mut h = hello("old-1");
    h.local_targets = vec![target("local.test", &["imap"])];
    assert_eq!(store.register_agent(h).await.unwrap(), 41);
    let local = store.local_targets().await.unwrap();
    assert_eq!(local.len(), 1);
    assert_eq!(
        (local[0].0.as_str(), local[0].2.name.as_str()),
        ("old-1", "local.test")
    );
    store.close().await.unwrap();
}

/// Step 5 derives week rollups from the day rollups a version-4 database holds.
#[tokio::test]
async fn migration_fills_week_rollups_from_day_rollups() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("v4.db");
    let day = rollup::Level::Day.width_us();
    let week0 = rollup::Level::Week.bucket(1_700_000_000_000_000);
    {
        let mut c = Connection::open(&path).unwrap();
        schema::migrate_to(&mut c, &path, 4).unwrap();
        let mut put = c
            .prepare(
                "INSERT INTO rollups (level, bucket_us, target, check_name, region, endpoint,
                     count, ok, warn, fail, sketches) VALUES (?1, ?2, 't', 'smtp', 'eu', 'mx', ?3, ?3, 0, 0, ?4)",
            )
            .unwrap();
        // Three days in one week, one in the next.
        for (i, n) in [(0, 2), (1, 3), (6, 4), (7, 5)] {
            let mut a = crate::analysis::aggregate::Agg::default();
            for k in 0..n {
                a.add(&pb::ProbeResult {
                    outcome: pb::Outcome::Ok as i32,
                    timings: vec![pb::PhaseTiming {
                        phase: "total".into(),
                        micros: 1000 + k,
                    }],
                    ..Default::default()
                });
            }
            put.execute(rusqlite::params![
                rollup::Level::Day.code(),
                week0 + i * day,
                n,
                a.sketches_to_bytes()
            ])
            .unwrap();
        }
    }
    let store = SqliteStore::open(&path, opts(0)).unwrap();
    store.close().await.unwrap();
    let c = Connection::open(&path).unwrap();
    let mut st = c
        .prepare("SELECT bucket_us, count, ok, sketches FROM rollups WHERE level = ?1 ORDER BY bucket_us")
        .unwrap();
    let weeks: Vec<(i64, i64, i64, Vec<u8>)> = st
        .query_map([rollup::Level::Week.code()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(weeks.len(), 2);
    assert_eq!((weeks[0].0, weeks[0].1, weeks[0].2), (week0, 9, 9));
    assert_eq!((weeks[1].0, weeks[1].1), (week0 + 7 * day, 5));
    let phases = crate::analysis::aggregate::Agg::sketches_from_bytes(&weeks[0].3, None).unwrap();
    assert_eq!(phases["total"].count(), 9);
}

#[test]
fn refuses_a_database_from_a_newer_version() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("new.db");
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = SqliteStore::open(&path, opts(0)).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    assert!(
        err.to_string()
            .contains("newer than this collector supports"),
        "{err}"
    );
}

#[test]
fn open_names_the_unwritable_path() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("missing-dir").join("x.db");
    let err = SqliteStore::open(&path, opts(0)).unwrap_err();
    assert!(
        matches!(err, StoreError::Sqlite(SqliteError::Open { .. })),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("missing-dir") && msg.contains("writable"),
        "{msg}"
    );
}

fn outcome_result(agent: &str, seq: u64, ok: bool, start_us: i64) -> pb::ProbeResult {
    let mut r = result(agent, seq);
    r.start_us = start_us;
    if !ok {
        r.outcome = pb::Outcome::Fail as i32;
        r.error_class = "refused".into();
        r.phase = "connect".into();
        r.facts = vec![pb::Fact {
            key: mxscope_proto::facts::smtp::BANNER_CODE.into(),
            value: Some(pb::fact::Value::Int(421)),
        }];
    }
    r
}

#[tokio::test]
async fn hysteresis_is_persisted_and_changes_are_broadcast_after_commit() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("t.db");
    let store = open(&dir, 1);
    let mut events = store.subscribe();
    store.register_agent(hello("a1")).await.unwrap();
    let t0 = now_us();
    // ok, fail: one failure is not enough (fail_after = 2).
    for (seq, ok) in [(1, true), (2, false)] {
        store
            .store_results(
                "a1",
                "eu-west",
                vec![outcome_result("a1", seq, ok, t0 + seq as i64)],
                t0,
            )
            .await
            .unwrap();
    }
    let s = store.series(Filter::default()).await.unwrap();
    assert_eq!(s.len(), 1);
    assert!(!s[0].failing, "one failure does not flip the state");
    assert_eq!(s[0].agent_id, "a1");
    assert_eq!(s[0].last_phase, "connect");
    assert_eq!(
        s[0].last_facts
            .get(mxscope_proto::facts::smtp::BANNER_CODE)
            .map(String::as_str),
        Some("421")
    );
    assert!(events.try_recv().is_err(), "no change yet");
    store.close().await.unwrap();

    // The streak survives a restart: one more failure flips it.
    let store = open(&dir, 1);
    let mut events = store.subscribe();
    store
        .store_results(
            "a1",
            "eu-west",
            vec![outcome_result("a1", 3, false, t0 + 3)],
            t0,
        )
        .await
        .unwrap();
    let e = events.try_recv().expect("a state change after the commit");
    assert_eq!(
        (e.old_state.as_str(), e.new_state.as_str()),
        ("ok", "failing")
    );
    assert_eq!(
        (e.target.as_str(), e.check.as_str(), e.region.as_str()),
        ("example.test", "smtp", "eu-west")
    );
    assert_eq!(e.error_class, "refused");
    assert_eq!(e.at_us, t0 + 3);
    // The series row is written with the writer's buffer (reads through the store sync first).
    store.sync().await.unwrap();
    let c = Connection::open(&path).unwrap();
    let (failing, since): (i64, i64) = c
        .query_row("SELECT failing, state_since_us FROM series", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((failing, since), (1, t0 + 3));
    // Two successes bring it back.
    store
        .store_results(
            "a1",
            "eu-west",
            vec![
                outcome_result("a1", 4, true, t0 + 4),
                outcome_result("a1", 5, true, t0 + 5),
            ],
            t0,
        )
        .await
        .unwrap();
    let e = events.try_recv().expect("recovered");
    assert_eq!(
        (e.old_state.as_str(), e.new_state.as_str()),
        ("failing", "ok")
    );
    assert!(events.try_recv().is_err(), "exactly one change per flip");
    store.close().await.unwrap();
}

#[tokio::test]
async fn rollups_of_stored_results_merge_to_the_sketch_of_all_values() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir, 1);
    store.register_agent(hello("a1")).await.unwrap();
    let now = now_us();
    let start = now - 50 * 60 * 1_000_000;
    let mut raw = Vec::new();
    let mut batch = Vec::new();
    for seq in 1..=600u64 {
        let mut r = outcome_result("a1", seq, seq % 10 != 0, start + seq as i64 * 5_000_000);
        let us = 1_000 + (seq * 7919) % 90_000;
        r.timings = vec![pb::PhaseTiming {
            phase: "total".into(),
            micros: us,
        }];
        if seq % 10 != 0 {
            raw.push(us as f64);
        }
        batch.push(r);
        if batch.len() == 50 {
            store
                .store_results("a1", "eu-west", std::mem::take(&mut batch), now)
                .await
                .unwrap();
        }
    }
    let got = store
        .rollups(Filter::default(), start, now, None)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    let agg = got.values().next().unwrap();
    assert_eq!((agg.count, agg.ok, agg.fail), (600, 540, 60));
    let mut want = crate::analysis::sketch::Sketch::new();
    raw.iter().for_each(|v| want.add(*v));
    assert_eq!(agg.phases["total"], want, "the raw window is exact");
    // A day's window reads hour rows: the same counts and the same sketch.
    let hours = store
        .rollups(Filter::default(), now - 86_400_000_000, now, None)
        .await
        .unwrap();
    let hour_agg = hours.values().next().unwrap();
    assert_eq!((hour_agg.count, hour_agg.ok, hour_agg.fail), (600, 540, 60));
    assert_eq!(hour_agg.phases["total"], want, "hour rows merge exactly");
    // Counts only come from the time index.
    let counts = store
        .rollups(Filter::default(), start, now, Some(String::new()))
        .await
        .unwrap();
    let c_agg = counts.values().next().unwrap();
    assert_eq!((c_agg.count, c_agg.ok, c_agg.fail), (600, 540, 60));
    assert!(c_agg.phases.is_empty());
    raw.sort_by(f64::total_cmp);
    for q in [0.5, 0.95, 0.99] {
        let exact = raw[(q * (raw.len() - 1) as f64).floor() as usize];
        let est = agg.phases["total"].quantile(q).unwrap();
        assert!(
            (est - exact).abs() <= crate::analysis::sketch::ALPHA * exact,
            "q={q}"
        );
    }
    // Hour, day and week rows hold the same totals.
    assert_eq!(
        rollup_counts(&dir.path().join("t.db")),
        vec![(3600, 600), (86_400, 600), (604_800, 600)]
    );
    store.close().await.unwrap();
}

/// Every column of every `series` row in the database at `path`, as text.
fn series_rows(path: &std::path::Path) -> Vec<Vec<String>> {
    let c = Connection::open(path).unwrap();
    let mut st = c.prepare("SELECT * FROM series ORDER BY id").unwrap();
    let n = st.column_count();
    st.query_map([], |r| {
        (0..n)
            .map(|i| Ok(format!("{:?}", r.get_ref(i)?)))
            .collect::<Result<Vec<_>, _>>()
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// Sum of `count` per rollup level in the database at `path` (hour, day, week).
fn rollup_counts(path: &std::path::Path) -> Vec<(i64, i64)> {
    let c = Connection::open(path).unwrap();
    let mut st = c
        .prepare("SELECT level, sum(count) FROM rollups GROUP BY level ORDER BY level")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Rollups wait in the writer's buffer, a rollup read writes them first, and results committed
/// but not rolled up when the process died (a copy of the files taken then) are rolled up when
/// the store opens again.
#[tokio::test]
async fn buffered_rollups_are_written_before_reads_and_after_an_unclean_stop() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("t.db");
    let store = SqliteStore::open(
        &path,
        StoreOptions {
            buffer_flush: Duration::from_secs(3600),
            ..opts(1)
        },
    )
    .unwrap();
    store.register_agent(hello("a1")).await.unwrap();
    let now = now_us();
    let hour = 3_600_000_000i64;
    let batch = |seqs: std::ops::RangeInclusive<u64>| -> Vec<pb::ProbeResult> {
        seqs.map(|s| outcome_result("a1", s, s % 5 != 0, now - 20 * hour + s as i64 * hour / 4))
            .collect()
    };
    store
        .store_results("a1", "eu-west", batch(1..=40), now)
        .await
        .unwrap();
    assert_eq!(rollup_counts(&path), vec![], "buffered, not written yet");
    assert!(store.stats().buffered.load(Ordering::Relaxed) > 0);
    let day = store
        .rollups(Filter::default(), now - 24 * hour, now, None)
        .await
        .unwrap();
    let agg = day.values().next().unwrap();
    assert_eq!((agg.count, agg.ok, agg.fail), (40, 32, 8));
    assert_eq!(
        rollup_counts(&path),
        vec![(3600, 40), (86_400, 40), (604_800, 40)]
    );
    assert_eq!(store.stats().buffered.load(Ordering::Relaxed), 0);

    // 40 more, committed and acked but only buffered; the files as a crash would leave them.
    store
        .store_results("a1", "eu-west", batch(41..=80), now)
        .await
        .unwrap();
    let crashed = dir.path().join("crashed.db");
    for ext in ["", "-wal"] {
        std::fs::copy(
            format!("{}{ext}", path.display()),
            format!("{}{ext}", crashed.display()),
        )
        .unwrap();
    }
    assert_eq!(rollup_counts(&crashed)[0], (3600, 40));
    store.close().await.unwrap();
    assert_eq!(
        rollup_counts(&path),
        vec![(3600, 80), (86_400, 80), (604_800, 80)],
        "close writes the buffer"
    );
    assert_ne!(
        series_rows(&crashed),
        series_rows(&path),
        "the copy's series row is behind"
    );

    let reopened = SqliteStore::open(&crashed, opts(1)).unwrap();
    assert_eq!(
        rollup_counts(&crashed),
        vec![(3600, 80), (86_400, 80), (604_800, 80)],
        "the results after the mark are rolled up at open"
    );
    // The series state (hysteresis, latest result) is replayed too: the same row as the store
    // that stopped cleanly wrote.
    assert_eq!(series_rows(&crashed), series_rows(&path));
    let series = reopened.series(Filter::default()).await.unwrap();
    assert_eq!(series[0].last_seen_us, now - 20 * hour + 80 * hour / 4);
    let week = reopened
        .rollups(
            Filter::default(),
            now - 24 * hour,
            now,
            Some("total".into()),
        )
        .await
        .unwrap();
    let mut want = Agg::default();
    batch(1..=80).iter().for_each(|r| want.add(r));
    assert_eq!(week.values().next().unwrap(), &want);
    reopened.close().await.unwrap();
    // Reopening again finds nothing to roll up: nothing is counted twice.
    let again = SqliteStore::open(&crashed, opts(1)).unwrap();
    again.close().await.unwrap();
    assert_eq!(rollup_counts(&crashed)[0], (3600, 80));
}

#[tokio::test]
async fn retention_deletes_old_raw_rows_and_rollups_in_small_rounds() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("t.db");
    let store = SqliteStore::open(
        &path,
        StoreOptions {
            retention: Duration::from_secs(3600),
            rollup_retention: Duration::from_secs(10 * 86_400),
            prune_batch: 7,
            linger: Duration::from_millis(1),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    store.register_agent(hello("a1")).await.unwrap();
    let day = 86_400_000_000i64;
    let now = now_us();
    // 30 results stored 2 hours ago (past raw retention), started 20 days ago (past all; too
    // old for an hour row, which no window would read), and 5 stored now.
    let old: Vec<_> = (1..=30)
        .map(|s| outcome_result("a1", s, true, now - 20 * day + s as i64))
        .collect();
    store
        .store_results("a1", "eu-west", old, now - 2 * 3_600_000_000)
        .await
        .unwrap();
    let new: Vec<_> = (31..=35)
        .map(|s| outcome_result("a1", s, true, now - 1_000 + s as i64))
        .collect();
    store
        .store_results("a1", "eu-west", new, now)
        .await
        .unwrap();
    let count = |sql: &str| -> i64 {
        Connection::open(&path)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    };
    store.sync().await.unwrap();
    assert_eq!(count("SELECT count(*) FROM rollups WHERE level = 86400"), 2);
    assert_eq!(count("SELECT count(*) FROM rollups WHERE level = 3600"), 1);
    // One round deletes at most a batch of raw rows, and the one old day and week row.
    assert_eq!(store.prune(now).await.unwrap(), 7 + 2);
    assert_eq!(count("SELECT count(*) FROM results"), 35 - 7);
    assert_eq!(crate::store::prune_all(&store, now).await.unwrap(), 23);
    assert_eq!(
        count("SELECT count(*) FROM results"),
        5,
        "the fresh rows stay"
    );
    assert_eq!(count("SELECT min(seq) FROM results"), 31);
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM rollups WHERE bucket_us < {}",
            now - 10 * day
        )),
        0
    );
    assert_eq!(
        count("SELECT count(DISTINCT level) FROM rollups"),
        3,
        "today's rows stay"
    );
    assert_eq!(
        crate::store::prune_all(&store, now).await.unwrap(),
        0,
        "caught up"
    );
    store.close().await.unwrap();
}

/// Hour rows are kept about 3 days and day rows about 3 weeks, as long as a window reads them:
/// results that arrive older skip those rows yet every window counts them, and the retention
/// job deletes the rows that aged past their level's windows.
#[tokio::test]
async fn late_results_skip_the_rollup_rows_no_window_reads() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("t.db");
    let store = open(&dir, 1);
    store.register_agent(hello("a1")).await.unwrap();
    let (hour, day) = (3_600_000_000i64, 86_400_000_000i64);
    let now = now_us();
    let ages = [30 * day, 10 * day, 2 * day, hour];
    let results = ages
        .iter()
        .zip(1u64..)
        .map(|(age, seq)| outcome_result("a1", seq, true, now - age))
        .collect();
    store
        .store_results("a1", "eu-west", results, now)
        .await
        .unwrap();
    store.sync().await.unwrap();
    assert_eq!(
        rollup_counts(&path),
        vec![(3600, 2), (86_400, 3), (604_800, 4)],
        "hour rows for the last 3 days, day rows for the last 3 weeks, week rows for all"
    );
    for (since, want) in [(now - 31 * day, 4), (now - 21 * day, 3), (now - 3 * day, 2)] {
        let got = store
            .rollups(Filter::default(), since, now, None)
            .await
            .unwrap();
        assert_eq!(got.values().next().unwrap().count, want, "since {since}");
    }
    // Two days on, the hour row of the result then 4 days old is past every window.
    assert_eq!(store.prune(now + 2 * day).await.unwrap(), 1);
    assert_eq!(
        rollup_counts(&path),
        vec![(3600, 1), (86_400, 3), (604_800, 4)]
    );
    store.close().await.unwrap();
}

/// Step 6 moves a version-5 database's results, series and rollups to integer ids and compact
/// rows: everything reads back as before, and new results join the migrated series.
#[tokio::test]
async fn migration_compacts_results_series_and_rollups() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("v5.db");
    let t0 = 1_700_000_000_000_000i64;
    let label = "mx1.example.test[127.0.0.1]:25";
    {
        let mut c = Connection::open(&path).unwrap();
        schema::migrate_to(&mut c, &path, 5).unwrap();
        c.execute(
            "INSERT INTO agents (id, region, version, labels, first_seen_us, last_seen_us, stored_up_to_seq)
             VALUES ('a1', 'eu-west', '0.0.1', '{}', 1, 2, 2)",
            [],
        )
        .unwrap();
        for seq in 1..=2i64 {
            c.execute(
                "INSERT INTO results (agent_id, seq, region, target, endpoint, host, ip, port, family,
                     check_name, start_us, outcome, error_class, phase, total_us, timings, facts,
                     message, interval_ms, stored_at_us)
                 VALUES ('a1', ?1, 'eu-west', 'example.test', ?2, 'mx1.example.test', '127.0.0.1', 25, 1,
                     'smtp', ?3, 3, 'timeout', 'banner', 9000, '[[\"connect\",700],[\"total\",9000]]',
                     '[[\"tls_version\",\"TLSv1.3\"],[\"cert_days_left\",40]]', 'no banner', 60000, 5)",
                rusqlite::params![seq, label, t0 + seq * 60_000_000],
            )
            .unwrap();
        }
        c.execute(
            "INSERT INTO series (target, endpoint, check_name, region, last_outcome, last_error,
                 last_message, last_seen_us, interval_ms, failing, streak, state_since_us, agent_id,
                 last_phase, last_facts)
             VALUES ('example.test', ?1, 'smtp', 'eu-west', 3, 'timeout', 'no banner', ?2, 60000, 0, 2,
                 0, 'a1', 'banner', '[[\"tls_version\",\"TLSv1.3\"]]')",
            rusqlite::params![label, t0 + 120_000_000],
        )
        .unwrap();
        let mut a = crate::analysis::aggregate::Agg::default();
        a.add(&pb::ProbeResult {
            outcome: pb::Outcome::Ok as i32,
            timings: vec![pb::PhaseTiming {
                phase: "total".into(),
                micros: 1234,
            }],
            ..Default::default()
        });
        c.execute(
            "INSERT INTO rollups (level, bucket_us, target, check_name, region, endpoint,
                 count, ok, warn, fail, sketches) VALUES (3600, ?1, 'example.test', 'smtp', 'eu-west', ?2, 1, 1, 0, 0, ?3)",
            rusqlite::params![rollup::Level::Hour.bucket(t0), label, a.sketches_to_bytes()],
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path, opts(0)).unwrap();
    let results = store.results(Filter::default(), 0, 10).await.unwrap();
    assert_eq!(results.len(), 2);
    let r = results[0].result.as_ref().unwrap();
    assert_eq!((r.agent_id.as_str(), r.seq), ("a1", 2));
    assert_eq!(results[0].region, "eu-west");
    assert_eq!(results[0].stored_at_us, 5);
    assert_eq!(r.start_us, t0 + 120_000_000);
    assert_eq!(
        (r.error_class.as_str(), r.phase.as_str(), r.message.as_str()),
        ("timeout", "banner", "no banner")
    );
    assert_eq!(r.timings.len(), 2);
    assert_eq!(r.timings[0].micros, 700);
    assert_eq!(
        r.facts[1].value,
        Some(pb::fact::Value::Int(40)),
        "numbers stay numbers"
    );
    let e = r.endpoint.as_ref().unwrap();
    assert_eq!(
        (e.host.as_str(), e.ip.as_str(), e.port),
        ("mx1.example.test", "127.0.0.1", 25)
    );
    let series = store.series(Filter::default()).await.unwrap();
    assert_eq!(series.len(), 1);
    assert_eq!(series[0].endpoint, label);
    assert_eq!(series[0].last_facts["tls_version"], "TLSv1.3");
    let roll = store
        .rollups(Filter::default(), t0, t0 + 86_400_000_000, None)
        .await
        .unwrap();
    assert_eq!(roll.len(), 1);
    let (id, agg) = roll.iter().next().unwrap();
    assert_eq!((id.endpoint.as_str(), agg.count), (label, 1));
    assert_eq!(agg.phases["total"].count(), 1);
    // A new result of the same series joins the migrated row.
    store.register_agent(hello("a1")).await.unwrap();
    let mut next = result("a1", 3);
    next.target = "example.test".into();
    assert_eq!(
        store
            .store_results("a1", "eu-west", vec![next], now_us())
            .await
            .unwrap(),
        3
    );
    store.close().await.unwrap();
    let c = Connection::open(&path).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM series", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn series_silent_past_the_retention_leave_memory_and_come_back_on_their_next_result() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = TempDir::new().unwrap();
    let store = SqliteStore::open(
        &dir.path().join("t.db"),
        StoreOptions {
            retention: Duration::from_secs(3600),
            linger: Duration::from_millis(1),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    store.register_agent(hello("a1")).await.unwrap();
    let now = now_us();
    let hour = 3_600_000_000i64;
    // A series last seen two hours ago (a removed target, say) and a fresh one.
    let mut gone = outcome_result("a1", 1, false, now - 2 * hour);
    gone.target = "gone.test".into();
    let fresh = outcome_result("a1", 2, true, now - 1_000);
    store
        .store_results("a1", "eu-west", vec![gone.clone(), fresh], now)
        .await
        .unwrap();
    assert_eq!(store.stats().series_in_memory.load(Relaxed), 2);
    store.prune(now).await.unwrap();
    assert_eq!(store.stats().series_evicted.load(Relaxed), 1);
    assert_eq!(store.stats().series_in_memory.load(Relaxed), 1);
    // Its row stayed; a new result finds it and continues its state.
    let mut back = gone;
    back.seq = 3;
    back.start_us = now;
    store
        .store_results("a1", "eu-west", vec![back], now)
        .await
        .unwrap();
    assert_eq!(store.stats().series_in_memory.load(Relaxed), 2);
    let series = store.series(Filter::default()).await.unwrap();
    let gone: Vec<_> = series.iter().filter(|s| s.target == "gone.test").collect();
    assert_eq!(gone.len(), 1, "one series row, not a second one");
    assert_eq!(gone[0].last_seen_us, now);
    store.close().await.unwrap();
}
