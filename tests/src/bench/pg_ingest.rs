//! Benchmark 7, PostgreSQL ingest: the ingest benchmark's agent streams (real gRPC sessions into
//! real collector processes) on a private PostgreSQL cluster with durable commits, with one
//! collector and with two sharing the database, next to PostgreSQL's own limit measured in the
//! same run: binary COPY of the same rows into `results` of the same schema.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use mxscope_collector::store::postgres::{PgStore, DAY_US, WRITERS};
use mxscope_collector::store::{Store, StoreOptions};
use mxscope_tests::postgres::Postgres;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::collector::{limit_flags, BenchCollector};
use super::ingest::{
    live_span_us, load_collectors, RawRows, Run, Segments, BATCH, TARGETS, WINDOW,
};
use super::report::{Section, Verdict};
use super::synth::{self, Shape};
use super::sys::{self, median};
use super::Ctx;

/// What the cluster runs with instead of the test harness's `fsync=off`: every COMMIT waits until
/// its WAL is on the disk, as on a production server. Everything else keeps PostgreSQL's defaults.
const DURABLE: &[(&str, &str)] = &[
    ("fsync", "on"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "on"),
];
/// Settings the report quotes as the server reports them (`SHOW`).
const SHOWN: &[&str] = &[
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "wal_sync_method",
    "shared_buffers",
    "max_wal_size",
    "checkpoint_timeout",
];
/// Rows per transaction of the COPY baseline.
const COPY_TX_ROWS: usize = 10_000;
/// The columns the collector's writer fills in `results`, in the order COPY gets them.
const COPY_SQL: &str = "COPY results (series_id, agent_num, seq, start_us, outcome, total_us, \
                        stored_at_us, body) FROM STDIN (FORMAT binary)";
const COPY_TYPES: [Type; 8] = [
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT4,
    Type::INT8,
    Type::INT8,
    Type::BYTEA,
];
/// Rows per run by default (`--rows N`: a tenth of N, as the ingest benchmark's stream-count runs).
const DEFAULT_ROWS: u64 = 1_000_000;
/// Goals: one collector against COPY; two collectors against one (the total may not fall beyond
/// this machine's run-to-run noise); collector CPU per result, two against one.
const GOAL_VS_COPY: f64 = 0.5;
const GOAL_TWO_VS_ONE: f64 = 0.95;
const GOAL_CPU_TWO_VS_ONE: f64 = 1.10;

/// Sizes of this run.
struct Sizes {
    rows: u64,
    streams: usize,
    reps: usize,
}

fn sizes(ctx: &Ctx) -> Sizes {
    if ctx.mode.is_smoke() {
        Sizes {
            rows: 8_000,
            streams: 4,
            reps: 1,
        }
    } else {
        let streams = synth::REGIONS.len();
        Sizes {
            rows: ctx
                .rows
                .map_or(DEFAULT_ROWS, |n| n / 10)
                .max((streams * BATCH) as u64),
            streams,
            reps: 3,
        }
    }
}

/// One load and what PostgreSQL's processes spent on it.
#[derive(Debug, Clone)]
struct Measured {
    run: Run,
    /// CPU seconds of the postmaster and its children over the run.
    pg_cpu: f64,
    /// Transactions committed in the run's database (`pg_stat_database.xact_commit`).
    commits: u64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.run.rate()
    }

    fn per_row(&self, cpu_s: f64) -> f64 {
        1e6 * cpu_s / self.run.rows.max(1) as f64
    }

    /// Collector CPU µs per result (0 for COPY).
    fn collector_us(&self) -> f64 {
        self.per_row(self.run.server_cpu)
    }

    fn pg_us(&self) -> f64 {
        self.per_row(self.pg_cpu)
    }

    /// The benchmark process's CPU µs per row: the synthetic agents, or the COPY client.
    fn client_us(&self) -> f64 {
        self.per_row(self.run.client_cpu)
    }

    fn rows_per_commit(&self) -> f64 {
        self.run.rows as f64 / self.commits.max(1) as f64
    }

    /// CPU seconds per second of everything measured (of the machine's cores).
    fn busy(&self) -> f64 {
        (self.run.server_cpu + self.pg_cpu + self.run.client_cpu) / self.run.secs.max(1e-9)
    }
}

/// The repetitions of one configuration.
struct Config {
    name: String,
    runs: Vec<Measured>,
}

impl Config {
    fn median(&self, f: impl Fn(&Measured) -> f64) -> f64 {
        median(&self.runs.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0)
    }

    fn rate(&self) -> f64 {
        self.median(Measured::rate)
    }

    fn each_rate(&self) -> String {
        self.runs
            .iter()
            .map(|m| format!("{:.0}", m.rate()))
            .collect::<Vec<_>>()
            .join(" / ")
    }
}

/// CPU seconds of the cluster: the postmaster and its children (backends, WAL writer,
/// checkpointer, background writer, ...).
fn pg_cpu(pg: &Postgres) -> Result<f64> {
    let pid = pg.pid().context("postgres is not running")?;
    sys::tree_cpu_seconds(pid)
}

/// Database `name`, new and empty.
fn fresh_db(pg: &Postgres, name: &str) -> Result<String> {
    tokio::task::block_in_place(|| {
        pg.drop_database(name)?;
        pg.create_database(name)
    })
}

/// Writes out dirty pages, so one run's checkpoint does not land in the next.
fn checkpoint(pg: &Postgres) -> Result<()> {
    tokio::task::block_in_place(|| pg.psql("postgres", "CHECKPOINT")).map(|_| ())
}

/// Transactions committed in `db` so far. Backends report theirs at most once a second and when
/// they exit, so read this after the writers' connections closed.
fn commits(pg: &Postgres, db: &str) -> Result<u64> {
    let sql = format!("SELECT xact_commit FROM pg_stat_database WHERE datname = '{db}'");
    let n = tokio::task::block_in_place(|| pg.psql("postgres", &sql))?;
    n.trim()
        .parse()
        .with_context(|| format!("xact_commit of {db}: {n:?}"))
}

/// Every row sent is stored once.
fn check_stored(pg: &Postgres, db: &str, expected: u64) -> Result<()> {
    let n = tokio::task::block_in_place(|| pg.psql(db, "SELECT count(*) FROM results"))?;
    if n.trim() != expected.to_string() {
        bail!("{db}: {n} rows in results, {expected} sent");
    }
    Ok(())
}

/// PostgreSQL's own limit: the rows of `shapes` (the collector's encoding, in the order they
/// reach a collector) copied in binary into `results` of the collector's schema on a fresh
/// database, [`COPY_TX_ROWS`] per transaction, by one connection of this process.
async fn copy_limit(pg: &Postgres, db: &str, shapes: &[Shape]) -> Result<Measured> {
    let url = fresh_db(pg, db)?;
    // The collector's own migrations.
    let store = PgStore::connect(&url, StoreOptions::default())
        .await
        .context("create the collector's schema")?;
    store.close().await?;
    drop(store);
    let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .context("connect for COPY")?;
    let driver = tokio::spawn(conn);
    // The partitions of today and tomorrow, as the collector's writer creates them before it
    // stores its first batch (`store::postgres::schema::create_partition_sql`).
    let today = sys::now_us().div_euclid(DAY_US) * DAY_US;
    for day in [today, today + DAY_US] {
        client
            .batch_execute(&format!(
                "CREATE TABLE results_d{} PARTITION OF results FOR VALUES FROM ({day}) TO ({})",
                day.div_euclid(DAY_US),
                day + DAY_US
            ))
            .await?;
    }
    checkpoint(pg)?;
    let commits0 = commits(pg, db)?;

    let total: u64 = shapes.iter().map(|s| s.total).sum();
    let mut source = RawRows::new(shapes);
    let pg0 = pg_cpu(pg)?;
    let self0 = sys::cpu_seconds(std::process::id())?;
    let start = Instant::now();
    let mut segments = Segments::new(total, start);
    let mut rows = 0u64;
    let mut exhausted = false;
    while rows < total && !exhausted {
        let tx = client.transaction().await?;
        let sink = tx.copy_in(COPY_SQL).await?;
        let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &COPY_TYPES));
        let mut in_tx = 0usize;
        while in_tx < COPY_TX_ROWS && rows < total {
            let Some((id, agent, row)) = source.next() else {
                exhausted = true;
                break;
            };
            let body: &[u8] = &row.body;
            let stored_at = sys::now_us();
            let values: [&(dyn ToSql + Sync); 8] = [
                &id,
                &agent,
                &row.seq,
                &row.start_us,
                &row.outcome,
                &row.total_us,
                &stored_at,
                &body,
            ];
            writer.as_mut().write(&values).await?;
            in_tx += 1;
            rows += 1;
        }
        writer.as_mut().finish().await?;
        tx.commit().await?;
        segments.observe(rows, Instant::now());
    }
    let secs = start.elapsed().as_secs_f64();
    let mut measured = Measured {
        commits: 0,
        pg_cpu: pg_cpu(pg)? - pg0,
        run: Run {
            rows,
            secs,
            segments: segments.rates,
            server_cpu: 0.0,
            client_cpu: sys::cpu_seconds(std::process::id())? - self0,
        },
    };
    drop(client);
    let _ = driver.await;
    measured.commits = commits(pg, db)?.saturating_sub(commits0);
    check_stored(pg, db, total)?;
    tokio::task::block_in_place(|| pg.drop_database(db))?;
    Ok(measured)
}

/// `collectors` collector processes on a fresh database `db`, the agent streams of `shapes`
/// split between them (agent `i` to collector `i % collectors`).
async fn collectors_run(
    ctx: &Ctx,
    pg: &Postgres,
    db: &str,
    collectors: usize,
    shapes: &[Shape],
    flags: &[(String, String)],
) -> Result<Measured> {
    let url = fresh_db(pg, db)?;
    let mut running = Vec::new();
    for i in 0..collectors {
        // Each collector migrates on start; the second finds the schema in place.
        running.push(BenchCollector::start_on(
            &ctx.dir,
            &format!("collector-{db}-{i}"),
            &url,
            flags,
        )?);
    }
    checkpoint(pg)?;
    let commits0 = commits(pg, db)?;
    let targets = running
        .iter()
        .map(|c| Ok((c.url(), c.pid()?)))
        .collect::<Result<Vec<_>>>()?;
    let total: u64 = shapes.iter().map(|s| s.total).sum();
    let pg0 = pg_cpu(pg)?;
    let run = load_collectors(&targets, shapes, total).await;
    let pg_used = pg_cpu(pg)? - pg0;
    let run = run.with_context(|| {
        running
            .iter()
            .map(|c| format!("{} log:\n{}", c.proc.name(), c.proc.log_tail(20)))
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    for c in &mut running {
        c.stop()?;
    }
    let commits = commits(pg, db)?.saturating_sub(commits0);
    check_stored(pg, db, total)?;
    tokio::task::block_in_place(|| pg.drop_database(db))?;
    Ok(Measured {
        run,
        pg_cpu: pg_used,
        commits,
    })
}

/// Runs benchmark 7.
pub(crate) async fn run(ctx: &Ctx) -> Section {
    let title = "7. PostgreSQL ingest";
    let target = format!(
        "on PostgreSQL with durable commits, one collector ≥ {GOAL_VS_COPY} of PostgreSQL's own binary COPY of the same rows measured in the same run; two collectors on the same database, the same streams split between them, do not lower the total (≥ {GOAL_TWO_VS_ONE} of one collector's: the noise of this shared machine); collector CPU per result with two within 10 % of one's (≤ {GOAL_CPU_TWO_VS_ONE}×)"
    );
    let mut s = Section::new("pg-ingest", title, ctx.command("pg-ingest"), &target);
    if let Err(e) = run_inner(ctx, &mut s).await {
        s.verdict("run", Verdict::Failed(format!("{e:#}")));
    }
    s
}

async fn run_inner(ctx: &Ctx, s: &mut Section) -> Result<()> {
    let z = sizes(ctx);
    let flags = limit_flags()?;
    let pg = tokio::task::spawn_blocking(|| Postgres::start_with(&std::env::temp_dir(), DURABLE))
        .await?
        .context("private PostgreSQL cluster")?;
    let settings = tokio::task::block_in_place(|| {
        SHOWN
            .iter()
            .map(|name| {
                Ok(format!(
                    "{name}={}",
                    pg.psql("postgres", &format!("SHOW {name}"))?
                ))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let span = live_span_us(z.rows);
    let shapes = |prefix: &str| synth::fleet(prefix, z.streams, TARGETS, z.rows, span);

    let mut copy = Config {
        name: "PostgreSQL COPY (binary), one connection".into(),
        runs: Vec::new(),
    };
    let mut one = Config {
        name: format!("1 collector, {} streams", z.streams),
        runs: Vec::new(),
    };
    let mut two = Config {
        name: format!("2 collectors, {} streams each", z.streams / 2),
        runs: Vec::new(),
    };
    // Interleaved repetitions, each on a fresh database: noise from the shared machine spreads
    // over the three configurations alike.
    for r in 1..=z.reps {
        eprintln!("mxscope-bench: pg-ingest repetition {r}/{}: COPY", z.reps);
        copy.runs
            .push(copy_limit(&pg, &format!("copy_{r}"), &shapes(&format!("c{r}"))).await?);
        eprintln!(
            "mxscope-bench: pg-ingest repetition {r}/{}: 1 collector",
            z.reps
        );
        one.runs.push(
            collectors_run(
                ctx,
                &pg,
                &format!("one_{r}"),
                1,
                &shapes(&format!("o{r}")),
                &flags,
            )
            .await?,
        );
        eprintln!(
            "mxscope-bench: pg-ingest repetition {r}/{}: 2 collectors",
            z.reps
        );
        two.runs.push(
            collectors_run(
                ctx,
                &pg,
                &format!("two_{r}"),
                2,
                &shapes(&format!("t{r}")),
                &flags,
            )
            .await?,
        );
    }
    report(ctx, s, &z, &pg, &settings, &flags, [&copy, &one, &two]);
    Ok(())
}

fn report(
    ctx: &Ctx,
    s: &mut Section,
    z: &Sizes,
    pg: &Postgres,
    settings: &[String],
    flags: &[(String, String)],
    [copy, one, two]: [&Config; 3],
) {
    let rows = z.rows;
    s.line(format!(
        "A private PostgreSQL {} cluster (Debian's packages, `initdb` in a temp dir, on 127.0.0.1) started with durable commits instead of the test harness's `fsync=off`: {}; everything else is the server's default. Each run gets a fresh database and a `CHECKPOINT` before it starts; every run's row count is checked afterwards (each result stored once). {} results per run in the live shape (benchmark 1's synthetic `smtp` results: {TARGETS} targets from each of {} agents, every series every 60 s), sent over plain gRPC to the release `mxscope-collector --db postgres://…` in batches of {BATCH} with {WINDOW} batches in flight per stream; a result counts once its ack (sent after COMMIT) arrived. Collector limit flags passed: {}. {} repetitions, interleaved (COPY, one collector, two collectors, then again); figures are medians.",
        pg.version(),
        settings.iter().map(|x| format!("`{x}`")).collect::<Vec<_>>().join(", "),
        rows,
        z.streams,
        if flags.is_empty() {
            "none".to_string()
        } else {
            flags.iter().map(|(f, v)| format!("{f} {v}")).collect::<Vec<_>>().join(", ")
        },
        z.reps,
    ));
    s.line("");
    s.line(format!(
        "PostgreSQL's limit: one connection of the benchmark process copying the same rows (the collector's own `ResultRow::of` encoding, the agents' batches interleaved as they reach a collector; series ids and agent numbers from memory) with `COPY results (series_id, agent_num, seq, start_us, outcome, total_us, stored_at_us, body) FROM STDIN (FORMAT binary)` into the collector's schema (its own migrations, through `PgStore::connect`; the day partitions created as its writer creates them), {COPY_TX_ROWS} rows per transaction; no series state, no rollups, no high-water mark, no gRPC. The COPY client also generates the rows, as the synthetic agents do for the collectors. CPU is read from /proc: the collectors' processes, PostgreSQL's (the postmaster and its children — backends, WAL writer, checkpointer — with the children that exited), and the benchmark's own process (synthetic agents, or the COPY client)."
    ));
    s.line("");
    let mut table = Vec::new();
    for c in [copy, one, two] {
        table.push(vec![
            c.name.clone(),
            format!("{:.0}", c.rate()),
            c.each_rate(),
            if std::ptr::eq(c, copy) {
                "—".into()
            } else {
                format!("{:.1}", c.median(Measured::collector_us))
            },
            format!("{:.1}", c.median(Measured::pg_us)),
            format!("{:.1}", c.median(Measured::client_us)),
            format!("{:.2}", c.median(Measured::busy)),
            format!("{:.0}", c.median(Measured::rows_per_commit)),
        ]);
    }
    s.table(
        &[
            "run",
            "rows/s (median)",
            "each repetition",
            "collector CPU µs per result",
            "PostgreSQL CPU µs per row",
            "benchmark process CPU µs per row (agents / COPY client)",
            "CPU s per s, all of them",
            "rows per commit",
        ],
        &table,
    );
    let vs_copy = one.rate() / copy.rate().max(1e-9);
    let two_vs_one = two.rate() / one.rate().max(1e-9);
    let (cpu1, cpu2) = (
        one.median(Measured::collector_us),
        two.median(Measured::collector_us),
    );
    let cpu_ratio = cpu2 / cpu1.max(1e-9);
    let (pgc, pg1, pg2) = (
        copy.median(Measured::pg_us),
        one.median(Measured::pg_us),
        two.median(Measured::pg_us),
    );
    s.line(format!(
        "Ratios (medians): 1 collector / COPY = {vs_copy:.2} (goal ≥ {GOAL_VS_COPY}); 2 collectors / 1 collector = {two_vs_one:.2} (goal: the total does not fall); collector CPU per result, 2 / 1 = {cpu2:.1} / {cpu1:.1} µs = {cpu_ratio:.2} (goal ≤ {GOAL_CPU_TWO_VS_ONE}); PostgreSQL CPU per row: COPY {pgc:.1} µs, 1 collector {pg1:.1} µs ({:.1}× COPY's), 2 collectors {pg2:.1} µs.",
        pg1 / pgc.max(1e-9)
    ));
    s.line("");
    more_cores(s, copy, one, two);
    s.verdict(
        "1 collector ≥ 0.5 of COPY",
        Verdict::judge(
            ctx.mode,
            vs_copy >= GOAL_VS_COPY,
            format!(
                "{:.0} vs {:.0} rows/s = {vs_copy:.2}",
                one.rate(),
                copy.rate()
            ),
        ),
    );
    s.verdict(
        "2 collectors: total does not fall",
        Verdict::judge(
            ctx.mode,
            two_vs_one >= GOAL_TWO_VS_ONE,
            format!(
                "{:.0} vs {:.0} results/s = {two_vs_one:.2} (repetitions {} vs {})",
                two.rate(),
                one.rate(),
                two.each_rate(),
                one.each_rate()
            ),
        ),
    );
    s.verdict(
        "collector CPU per result, 2 vs 1, within 10 %",
        Verdict::judge(
            ctx.mode,
            cpu_ratio <= GOAL_CPU_TWO_VS_ONE,
            format!("{cpu2:.1} vs {cpu1:.1} µs = {cpu_ratio:.2}"),
        ),
    );
}

/// The paragraph on what a machine with more cores would give, from the measured CPU per row.
fn more_cores(s: &mut Section, copy: &Config, one: &Config, two: &Config) {
    let cores = sys::nproc() as f64;
    let (pgc, pg1, pg2) = (
        copy.median(Measured::pg_us),
        one.median(Measured::pg_us),
        two.median(Measured::pg_us),
    );
    let (cpu1, cpu2) = (
        one.median(Measured::collector_us),
        two.median(Measured::collector_us),
    );
    let (ag1, ag2) = (
        one.median(Measured::client_us),
        two.median(Measured::client_us),
    );
    let (busy1, busy2) = (one.median(Measured::busy), two.median(Measured::busy));
    let all1 = pg1 + cpu1 + ag1;
    let all2 = pg2 + cpu2 + ag2;
    let mut text = format!(
        "What more cores would give. Per result stored through one collector this machine spent {all1:.1} µs of CPU in all: PostgreSQL {pg1:.1}, the collector {cpu1:.1}, the synthetic agents {ag1:.1} (two collectors: {pg2:.1} + {cpu2:.1} + {ag2:.1} = {all2:.1}); on {cores:.0} cores that caps any configuration at ≈ {:.0} results/s. ",
        cores * 1e6 / all1.max(1e-9)
    );
    let saturated = 0.85 * cores;
    if busy1 >= saturated {
        text.push_str(&format!(
            "The one-collector runs kept {busy1:.2} of the {cores:.0} cores busy: CPU-bound, client and server competing for the same cores, so on this machine a second collector can only share out the same CPU (two collectors: {busy2:.2} CPU s per s). "
        ));
    } else {
        text.push_str(&format!(
            "The one-collector runs kept only {busy1:.2} of the {cores:.0} cores busy (this run's processes; other load on the shared machine, average {} now, is not counted), so one collector is not held by CPU alone but by its writers' transaction chains: each of its {WRITERS} writers runs one transaction at a time, its statements one after another on one backend, then the commit's wait for the WAL flush ({:.0} rows per commit); more cores do not shorten a chain. Two collectors run twice the chains: they kept {busy2:.2} CPU s per s busy and stored {:.2}× as much. ",
            sys::load_avg(),
            one.median(Measured::rows_per_commit),
            two.rate() / one.rate().max(1e-9)
        ));
    }
    text.push_str(&format!(
        "PostgreSQL at {pg1:.1} µs of CPU per row saturates one core at ≈ {:.0} rows/s (COPY: {pgc:.1} µs per row, ≈ {:.0} rows/s per core); one collector's {WRITERS} writers use {WRITERS} backends at once, so ≈ {:.0} results/s is about the most one collector can reach on any machine (less the writers' own time between statements; the figure includes the WAL writer and checkpointer, which run beside the backends). With cores for the backends of two collectors (≈ {:.1} cores at that rate, agents elsewhere), two collectors could approach ≈ {:.0} results/s until the one WAL stream and the disk's flushes bind. Sizing from these figures: 100,000 results/s takes ≈ {:.1} cores of PostgreSQL and ≈ {:.1} of collectors, in ≥ {:.0} collectors (writers).",
        1e6 / pg1.max(1e-9),
        1e6 / pgc.max(1e-9),
        WRITERS as f64 * 1e6 / pg1.max(1e-9),
        2.0 * (pg2 + cpu2) / pg2.max(1e-9),
        2e6 / pg2.max(1e-9),
        1e5 * pg2 / 1e6,
        1e5 * cpu2 / 1e6,
        (1e5 * pg2 / 1e6).ceil(),
    ));
    s.line(text);
    s.line("");
}
