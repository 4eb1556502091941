//! What only the PostgreSQL backend has to get right, against a private cluster of Debian's
//! `postgresql`: several collectors' stores on one database (exact dedupe when an agent's
//! batches go through both at once, state and target changes reaching every store), migrations
//! run once by collectors starting together, a newer schema refused, and retention dropping
//! whole day partitions of `results`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use mxscope_collector::store::postgres::{PgStore, DAY_US};
use mxscope_collector::store::{AgentHello, Filter, Pending, Store, StoreError, StoreOptions};
use mxscope_proto::pb;
use mxscope_proto::raw::ResultView;
use mxscope_proto::time::now_us;
use mxscope_tests::postgres::Postgres;
use prost::Message;

async fn cluster() -> Result<Postgres> {
    tokio::task::spawn_blocking(Postgres::start)
        .await?
        .context("private postgres cluster")
}

async fn create(pg: &Postgres, name: &str) -> Result<String> {
    tokio::task::block_in_place(|| pg.create_database(name))
}

fn psql(pg: &Postgres, db: &str, sql: &str) -> Result<String> {
    tokio::task::block_in_place(|| pg.psql(db, sql))
}

fn hello(id: &str, region: &str) -> AgentHello {
    AgentHello {
        id: id.into(),
        region: region.into(),
        version: "0.1.0".into(),
        at_us: now_us(),
        ..Default::default()
    }
}

fn result(agent: &str, seq: u64, ok: bool, start_us: i64) -> pb::ProbeResult {
    pb::ProbeResult {
        agent_id: agent.into(),
        seq,
        target: "example.test".into(),
        endpoint: Some(pb::Endpoint {
            host: "mx1.example.test".into(),
            ip: "198.18.0.25".into(),
            port: 25,
            family: pb::AddressFamily::Ipv4 as i32,
        }),
        check: "smtp".into(),
        start_us,
        outcome: if ok {
            pb::Outcome::Ok as i32
        } else {
            pb::Outcome::Fail as i32
        },
        error_class: if ok { "" } else { "refused" }.into(),
        timings: vec![pb::PhaseTiming {
            phase: "total".into(),
            micros: 1_000 + seq,
        }],
        interval_ms: 60_000,
        ..Default::default()
    }
}

fn put(store: &dyn Store, agent: &str, results: &[pb::ProbeResult], at_us: i64) -> Pending<u64> {
    let raw: Vec<Bytes> = results
        .iter()
        .map(|r| Bytes::from(r.encode_to_vec()))
        .collect();
    let views: Vec<ResultView<'_>> = raw
        .iter()
        .map(|b| ResultView::parse(b).expect("an encoded result reads back"))
        .collect();
    store.put_batch(agent, "eu-west", &views, raw.clone(), Vec::new(), at_us)
}

async fn seqs_of(store: &dyn Store, agent: &str) -> Result<Vec<u64>> {
    let filter = Filter {
        agent_id: agent.into(),
        ..Default::default()
    };
    let mut seqs: Vec<u64> = store
        .results(filter, 0, 100_000)
        .await?
        .iter()
        .map(|s| s.result.as_ref().map_or(0, |r| r.seq))
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

/// Two stores on one database (two collectors) get the same agent's overlapping batches at
/// once, as when an agent fails over and re-sends what it has not seen acked: every seq is
/// stored exactly once, and every result the stores counted is either stored or a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_on_one_database_store_each_seq_exactly_once() -> Result<()> {
    let pg = cluster().await?;
    let url = create(&pg, "dedupe").await?;
    let opts = StoreOptions::default();
    let (a, b) = tokio::try_join!(
        PgStore::connect(&url, opts.clone()),
        PgStore::connect(&url, opts.clone())
    )?;
    let (a, b): (Arc<dyn Store>, Arc<dyn Store>) = (Arc::new(a), Arc::new(b));
    a.register_agent(hello("ag-1", "eu-west")).await?;
    b.register_agent(hello("ag-1", "eu-west")).await?;
    let t0 = now_us() - 600 * 1_000_000;
    let all: Vec<pb::ProbeResult> = (1..=600)
        .map(|s| result("ag-1", s, s % 7 != 0, t0 + s as i64 * 1_000))
        .collect();
    // A sends in chunks of 10, B in chunks of 7, each in order and both at once.
    let mut pending = Vec::new();
    let mut a_chunks = all.chunks(10);
    let mut b_chunks = all.chunks(7);
    loop {
        let (x, y) = (a_chunks.next(), b_chunks.next());
        if x.is_none() && y.is_none() {
            break;
        }
        if let Some(c) = x {
            pending.push(tokio::spawn(put(&*a, "ag-1", c, now_us())));
        }
        if let Some(c) = y {
            pending.push(tokio::spawn(put(&*b, "ag-1", c, now_us())));
        }
    }
    let mut marks = Vec::new();
    for p in pending {
        marks.push(p.await??);
    }
    assert_eq!(marks.iter().max(), Some(&600));
    let seqs = seqs_of(&*a, "ag-1").await?;
    assert_eq!(
        seqs,
        (1..=600).collect::<Vec<u64>>(),
        "every seq exactly once"
    );
    let stored = a
        .stats()
        .results_stored
        .load(std::sync::atomic::Ordering::Relaxed)
        + b.stats()
            .results_stored
            .load(std::sync::atomic::Ordering::Relaxed);
    let duplicates = a
        .stats()
        .duplicates
        .load(std::sync::atomic::Ordering::Relaxed)
        + b.stats()
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(stored, 600);
    assert_eq!(duplicates, 600, "each result was sent twice");
    let agents = b.agents().await?;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].stored_up_to_seq, 600);
    // Both stores wrote rollup rows of their own; a read merges them: 600 results in the day.
    let day = a
        .rollups(Filter::default(), now_us() - DAY_US, now_us(), None)
        .await?;
    assert_eq!(day.values().map(|g| g.count).sum::<u64>(), 600);
    assert_eq!(
        day.values().map(|g| g.fail).sum::<u64>(),
        (1..=600).filter(|s| s % 7 == 0).count() as u64
    );
    // Each store that stored a result wrote rollup rows of its own (one whose batches all came
    // second stored none).
    let storing = [&a, &b]
        .iter()
        .filter(|s| {
            s.stats()
                .results_stored
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        })
        .count();
    let writers = psql(&pg, "dedupe", "SELECT count(DISTINCT writer) FROM rollups")?;
    assert_eq!(
        writers,
        storing.to_string(),
        "each store owns its rollup rows"
    );
    a.close().await?;
    b.close().await?;
    Ok(())
}

/// A state change committed through one store reaches the watchers of the other, and a central
/// target added through one is announced to the other within 2 s.
#[tokio::test(flavor = "multi_thread")]
async fn state_and_target_changes_reach_every_store() -> Result<()> {
    let pg = cluster().await?;
    let url = create(&pg, "notify").await?;
    let a = PgStore::connect(&url, StoreOptions::default()).await?;
    let b = PgStore::connect(&url, StoreOptions::default()).await?;
    let mut events = a.subscribe();
    let mut targets = a.target_changes();
    b.register_agent(hello("ag-2", "ap-south")).await?;
    let t0 = now_us();
    // fail_after 2: the second failure turns the series failing.
    put(
        &b,
        "ag-2",
        &[
            result("ag-2", 1, false, t0),
            result("ag-2", 2, false, t0 + 1),
        ],
        t0,
    )
    .await?;
    let e = tokio::time::timeout(Duration::from_secs(2), events.recv())
        .await
        .context("no state change at the other store within 2 s")??;
    assert_eq!(
        (
            e.target.as_str(),
            e.old_state.as_str(),
            e.new_state.as_str()
        ),
        ("example.test", "ok", "failing")
    );
    assert_eq!(e.region, "eu-west");
    let target = mxscope_proto::target::validate(&pb::TargetSpec {
        name: "new.test".into(),
        checks: vec!["mx".into()],
        ..Default::default()
    })?;
    let added = std::time::Instant::now();
    b.put_target(target, false, now_us()).await?;
    tokio::time::timeout(Duration::from_secs(2), targets.recv())
        .await
        .context("target change not announced to the other store within 2 s")??;
    eprintln!(
        "target change seen by the other store after {:?}",
        added.elapsed()
    );
    let names: Vec<String> = a
        .central_targets()
        .await?
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["new.test"]);
    // The same name added through the other store is refused, not doubled.
    let again = mxscope_proto::target::validate(&pb::TargetSpec {
        name: "new.test".into(),
        checks: vec!["mx".into()],
        ..Default::default()
    })?;
    match a.put_target(again, false, now_us()).await {
        Err(StoreError::TargetExists(n)) => assert_eq!(n, "new.test"),
        other => bail!("second add: {other:?}"),
    }
    a.close().await?;
    b.close().await?;
    Ok(())
}

/// Four collectors starting at once migrate the database once; a database a newer version
/// migrated is refused with both versions named; a database that does not exist is named.
#[tokio::test(flavor = "multi_thread")]
async fn migrations_run_once_and_a_newer_schema_is_refused() -> Result<()> {
    let pg = cluster().await?;
    let url = create(&pg, "migrate").await?;
    let opts = StoreOptions::default();
    let starting: Vec<_> = (0..4)
        .map(|_| {
            let (url, opts) = (url.clone(), opts.clone());
            tokio::spawn(async move { PgStore::connect(&url, opts).await })
        })
        .collect();
    let mut stores = Vec::new();
    for s in starting {
        stores.push(s.await??);
    }
    assert_eq!(
        psql(&pg, "migrate", "SELECT version FROM mxscope_schema")?,
        mxscope_collector::store::postgres::SCHEMA_VERSION.to_string()
    );
    let tables = psql(
        &pg,
        "migrate",
        "SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class
         WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p')
           AND relname NOT LIKE 'results_d%'",
    )?;
    assert_eq!(
        tables,
        "agent_targets,agents,certificates,changes,enrol_tokens,mxscope_schema,result_partitions,results,\
         revocations,rollups,series,targets"
    );
    assert_eq!(
        psql(
            &pg,
            "migrate",
            "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'results'::regclass"
        )?,
        "r",
        "results is range-partitioned"
    );
    for s in stores {
        Store::close(&s).await?;
    }
    psql(&pg, "migrate", "UPDATE mxscope_schema SET version = 99")?;
    let err = PgStore::connect(&url, opts.clone())
        .await
        .expect_err("a newer schema must be refused");
    let text = mxscope_collector::error::chain(&err);
    ensure!(
        text.contains("99") && text.contains("upgrade mxscope-collector"),
        "{text}"
    );
    let missing = pg.url("no_such_db");
    let err = PgStore::connect(&missing, opts)
        .await
        .expect_err("a missing database must be an error");
    let text = mxscope_collector::error::chain(&err);
    ensure!(
        text.contains("no_such_db") && text.contains("check --db"),
        "{text}"
    );
    Ok(())
}

/// Results go into the partition of the day they were stored; a retention round drops the
/// partitions wholly past the retention (the rows are gone, the table too) and keeps the rest.
#[tokio::test(flavor = "multi_thread")]
async fn retention_drops_whole_day_partitions() -> Result<()> {
    let pg = cluster().await?;
    let url = create(&pg, "retention").await?;
    let opts = StoreOptions {
        retention: Duration::from_secs(2 * 86_400),
        ..StoreOptions::default()
    };
    let store = PgStore::connect(&url, opts).await?;
    store.register_agent(hello("ag-3", "eu-west")).await?;
    let today = now_us().div_euclid(DAY_US) * DAY_US;
    let mut seq = 0;
    for day in [5, 4, 1, 0] {
        let at = today - day * DAY_US + 3_600_000_000;
        let batch: Vec<_> = (0..5)
            .map(|_| {
                seq += 1;
                result("ag-3", seq, true, at)
            })
            .collect();
        put(&store, "ag-3", &batch, at).await?;
    }
    let partitions = |pg: &Postgres| -> Result<Vec<String>> {
        Ok(psql(
            pg,
            "retention",
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'results'::regclass ORDER BY c.relname",
        )?
        .lines()
        .map(str::to_string)
        .collect())
    };
    let before = partitions(&pg)?;
    let day_no = |d: i64| format!("results_d{}", (today - d * DAY_US) / DAY_US);
    for d in [5, 4, 1, 0] {
        ensure!(before.contains(&day_no(d)), "{} in {before:?}", day_no(d));
    }
    let deleted = mxscope_collector::store::prune_all(&store, now_us()).await?;
    assert_eq!(deleted, 10, "the two days past the 2-day retention");
    let after = partitions(&pg)?;
    ensure!(
        !after.contains(&day_no(5)) && !after.contains(&day_no(4)),
        "{after:?}"
    );
    ensure!(
        after.contains(&day_no(1)) && after.contains(&day_no(0)),
        "{after:?}"
    );
    assert_eq!(
        seqs_of(&store, "ag-3").await?,
        (11..=20).collect::<Vec<u64>>()
    );
    Store::close(&store).await?;
    Ok(())
}

/// TLS to PostgreSQL: with the server's CA given (`--db-ca`) and `sslmode=require`, every
/// connection of the store is encrypted and the certificate is checked; a store given another CA
/// is refused with a TLS error instead of falling back to plain text.
#[tokio::test(flavor = "multi_thread")]
async fn tls_to_postgres_with_the_servers_ca_and_refused_with_another() -> Result<()> {
    use std::os::unix::fs::{chown, PermissionsExt};
    let pg = cluster().await?;
    let url = create(&pg, "tls").await?;
    let ca = mxscope_tests::certs::TestCa::new(pg.dir())?;
    let server = ca.issue(
        "server",
        &["127.0.0.1"],
        mxscope_tests::certs::Validity::Valid,
    )?;
    let postgres = mxscope_tests::postgres::os_user("postgres")?;
    for f in [&server.cert, &server.key] {
        chown(f, Some(postgres.0), Some(postgres.1))?;
    }
    std::fs::set_permissions(&server.key, std::fs::Permissions::from_mode(0o600))?;
    for sql in [
        format!(
            "ALTER SYSTEM SET ssl_cert_file = '{}'",
            server.cert.display()
        ),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", server.key.display()),
        "ALTER SYSTEM SET ssl = on".to_string(),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        psql(&pg, "tls", &sql)?;
    }
    let tls_url = format!("{url}?sslmode=require");
    let store =
        mxscope_tests::wait::wait_for("PostgreSQL to serve TLS", Duration::from_secs(10), || {
            let got = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(PgStore::connect_with_ca(
                    &tls_url,
                    StoreOptions::default(),
                    Some(ca.ca_file()),
                ))
            });
            Ok(got.ok())
        })?;
    store.register_agent(hello("ag-tls", "eu-west")).await?;
    let encrypted = psql(
        &pg,
        "tls",
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid
         WHERE s.ssl AND a.datname = 'tls'",
    )?;
    ensure!(
        encrypted.parse::<u32>()? >= 2,
        "the store's pool and LISTEN connections use TLS: {encrypted}"
    );
    std::fs::create_dir_all(pg.dir().join("other"))?;
    let other = mxscope_tests::certs::TestCa::named(&pg.dir().join("other"), "other CA")?;
    let err = PgStore::connect_with_ca(&tls_url, StoreOptions::default(), Some(other.ca_file()))
        .await
        .expect_err("a server certificate from another CA must be refused");
    let text = mxscope_collector::error::chain(&err);
    ensure!(
        text.contains("cannot connect to PostgreSQL")
            && text.to_lowercase().contains("certificate"),
        "{text}"
    );
    Store::close(&store).await?;
    Ok(())
}
