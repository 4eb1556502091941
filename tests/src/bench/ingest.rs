//! Benchmark 1, collector ingest: N agent streams of synthetic results over real gRPC into the real
//! collector process and its SQLite store (pipelined: a window of batches in flight per stream,
//! acks awaited), next to the raw limit measured in the same run — a plain rusqlite loop inserting
//! the same rows into the same schema (created by the collector's own migrations).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mxscope_collector::store::row::ResultRow;
use mxscope_proto::pb;
use pb::agent_message::Msg as Up;
use pb::collector_message::Msg as Down;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::collector::{limit_flags, BenchCollector};
use super::report::{Section, Verdict};
use super::synth::{self, Generator, Shape};
use super::sys::{self, fmt, median};
use super::Ctx;

/// Results per batch an agent sends.
pub(crate) const BATCH: usize = 1000;
/// Unacked batches per stream, as the agent's uplink keeps (the collector takes up to 16 of one agent at once).
pub(crate) const WINDOW: usize = 16;
/// Rows per transaction in the raw baseline.
const RAW_TX_ROWS: usize = 10_000;
/// Synthetic history spans 30 days.
pub(crate) const SPAN_US: i64 = 30 * 24 * 3600 * 1_000_000;
/// Targets of the synthetic fleet.
pub(crate) const TARGETS: usize = 1000;

/// How one load went.
#[derive(Debug, Clone, Default)]
pub(crate) struct Run {
    pub rows: u64,
    pub secs: f64,
    /// Results/s of each `segment`-row segment, in order.
    pub segments: Vec<f64>,
    /// CPU seconds of the collector process (or the raw loop's thread) over the run.
    pub server_cpu: f64,
    /// CPU seconds of the benchmark's own process (synthetic agents) over the run.
    pub client_cpu: f64,
}

impl Run {
    pub(crate) fn rate(&self) -> f64 {
        self.rows as f64 / self.secs.max(1e-9)
    }
}

/// Records when a running count crosses each multiple of `segment`.
#[derive(Debug)]
pub(crate) struct Segments {
    segment: u64,
    next: u64,
    last_at: Instant,
    pub rates: Vec<f64>,
}

impl Segments {
    pub(crate) fn new(segment: u64, start: Instant) -> Self {
        Segments {
            segment: segment.max(1),
            next: segment.max(1),
            last_at: start,
            rates: Vec::new(),
        }
    }

    /// Segments completed since the last call share the elapsed time evenly (a sampling tick
    /// that sees two boundaries cannot tell them apart).
    pub(crate) fn observe(&mut self, count: u64, at: Instant) {
        let mut crossed = 0u64;
        while count >= self.next {
            crossed += 1;
            self.next += self.segment;
        }
        if crossed == 0 {
            return;
        }
        let secs = at.duration_since(self.last_at).as_secs_f64().max(1e-6);
        let rate = (crossed * self.segment) as f64 / secs;
        self.rates
            .extend(std::iter::repeat_n(rate, crossed as usize));
        self.last_at = at;
    }
}

/// One agent stream: hello, then batches with up to [`WINDOW`] in flight, until every result is
/// acked. `acked` counts acked results across all streams.
async fn stream_agent(url: String, shape: Shape, acked: Arc<AtomicU64>) -> Result<()> {
    let mut client = pb::ingest_client::IngestClient::connect(url)
        .await
        .context("connect to the collector")?;
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(WINDOW + 2);
    tx.send(pb::AgentMessage {
        msg: Some(Up::Hello(pb::Hello {
            agent_id: shape.agent_id.clone(),
            region: synth::REGIONS[shape.region_index % synth::REGIONS.len()].into(),
            version: "bench".into(),
            highest_seq: shape.total,
            // The collector accepts results only for targets an agent is assigned.
            local_targets: (0..shape.targets)
                .map(|i| pb::TargetSpec {
                    name: synth::target_name(i),
                    checks: vec!["smtp".into()],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })),
    })
    .await
    .context("queue hello")?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .context("open session")?
        .into_inner();
    match inbound.next().await {
        Some(Ok(pb::CollectorMessage {
            msg: Some(Down::Welcome(_)),
        })) => {}
        other => bail!("expected a welcome, got {other:?}"),
    }
    let mut gen = Generator::new(shape.clone());
    let mut in_flight: VecDeque<(u64, u64)> = VecDeque::new();
    let mut done = false;
    loop {
        while !done && in_flight.len() < WINDOW {
            let results = gen.batch(BATCH);
            let Some(last) = results.last().map(|r| r.seq) else {
                done = true;
                break;
            };
            let n = results.len() as u64;
            tx.send(pb::AgentMessage {
                msg: Some(Up::Batch(pb::ResultBatch { results })),
            })
            .await
            .context("collector closed the stream")?;
            in_flight.push_back((last, n));
        }
        if done && in_flight.is_empty() {
            return Ok(());
        }
        match inbound.next().await {
            Some(Ok(pb::CollectorMessage {
                msg: Some(Down::Ack(ack)),
            })) => {
                while let Some(&(last, n)) = in_flight.front() {
                    if last > ack.stored_up_to_seq {
                        break;
                    }
                    in_flight.pop_front();
                    acked.fetch_add(n, Ordering::Relaxed);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(status)) => bail!("agent {}: stream failed: {status}", shape.agent_id),
            None => bail!("agent {}: collector closed the stream", shape.agent_id),
        }
    }
}

/// Streams `shapes` concurrently into the collector at `url`; `pid` is the collector's.
pub(crate) async fn load_collector(
    url: &str,
    pid: u32,
    shapes: &[Shape],
    segment: u64,
) -> Result<Run> {
    load_collectors(&[(url.to_string(), pid)], shapes, segment).await
}

/// Streams `shapes` concurrently into several collectors, given as (URL, PID): agent `i` goes to
/// collector `i % collectors.len()`. The run's `server_cpu` is the collectors' CPU summed.
pub(crate) async fn load_collectors(
    collectors: &[(String, u32)],
    shapes: &[Shape],
    segment: u64,
) -> Result<Run> {
    if collectors.is_empty() {
        bail!("no collector to load");
    }
    let total: u64 = shapes.iter().map(|s| s.total).sum();
    let acked = Arc::new(AtomicU64::new(0));
    let server_cpu = || -> Result<f64> {
        collectors
            .iter()
            .map(|(_, pid)| sys::cpu_seconds(*pid))
            .sum()
    };
    let cpu0 = server_cpu()?;
    let self0 = sys::cpu_seconds(std::process::id())?;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in shapes.iter().enumerate() {
        let url = collectors[i % collectors.len()].0.clone();
        tasks.spawn(stream_agent(url, s.clone(), acked.clone()));
    }
    let mut segments = Segments::new(segment, start);
    let mut failure = None;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => { failure = Some(e); tasks.abort_all(); }
                Some(Err(e)) if e.is_cancelled() => {}
                Some(Err(e)) => { failure = Some(e.into()); tasks.abort_all(); }
            },
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                segments.observe(acked.load(Ordering::Relaxed), Instant::now());
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let end = Instant::now();
    segments.observe(acked.load(Ordering::Relaxed), end);
    let rows = acked.load(Ordering::Relaxed);
    if rows != total {
        bail!("{rows} results acked, {total} sent");
    }
    Ok(Run {
        rows,
        secs: end.duration_since(start).as_secs_f64(),
        segments: segments.rates,
        server_cpu: server_cpu()? - cpu0,
        client_cpu: sys::cpu_seconds(std::process::id())? - self0,
    })
}

/// Creates the collector's schema in `db` through its own store (migrations included).
pub(crate) async fn create_schema(db: &Path) -> Result<()> {
    let path = db.to_path_buf();
    let store = tokio::task::spawn_blocking(move || {
        mxscope_collector::store::sqlite::SqliteStore::open(&path, Default::default())
    })
    .await??;
    store.close().await?;
    Ok(())
}

/// The rows of `shapes` in the order they reach a collector, a batch of [`BATCH`] from each
/// agent in turn, for the raw baselines: (series id, agent number, row). Each row is encoded by
/// the collector's own [`ResultRow::of`](mxscope_collector::store::row::ResultRow::of); series ids
/// (one per region and target) and agent numbers (the agent's index + 1) come from memory, as a
/// plain program would keep them.
pub(crate) struct RawRows {
    gens: Vec<Generator>,
    regions: Vec<usize>,
    series: HashMap<(usize, String), i64>,
    /// The current batch, reversed (popped from the end).
    pending: Vec<pb::ProbeResult>,
    agent: usize,
    next_agent: usize,
}

impl RawRows {
    pub(crate) fn new(shapes: &[Shape]) -> RawRows {
        RawRows {
            gens: shapes.iter().cloned().map(Generator::new).collect(),
            regions: shapes.iter().map(|s| s.region_index).collect(),
            series: HashMap::new(),
            pending: Vec::new(),
            agent: 0,
            next_agent: 0,
        }
    }
}

impl Iterator for RawRows {
    type Item = (i64, i64, ResultRow);

    fn next(&mut self) -> Option<Self::Item> {
        if self.pending.is_empty() {
            // Next agent's next batch, round robin.
            for _ in 0..self.gens.len() {
                self.agent = self.next_agent % self.gens.len();
                self.next_agent += 1;
                self.pending = self.gens[self.agent].batch(BATCH);
                if !self.pending.is_empty() {
                    break;
                }
            }
            self.pending.reverse();
        }
        let r = self.pending.pop()?;
        let next_id = self.series.len() as i64 + 1;
        let id = *self
            .series
            .entry((self.regions[self.agent], r.target.clone()))
            .or_insert(next_id);
        Some((id, self.agent as i64 + 1, ResultRow::of(&r)))
    }
}

/// The raw limit: the same rows inserted into `results` of the collector's schema by one
/// prepared statement, [`RAW_TX_ROWS`] per transaction, WAL, `synchronous=NORMAL` and the page
/// cache of the collector's writer, in the order of [`RawRows`].
pub(crate) fn load_raw(db: &Path, shapes: &[Shape], segment: u64) -> Result<Run> {
    let mut conn = rusqlite::Connection::open(db)?;
    let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "cache_size", -131_072)?;
    let _: i64 = conn.query_row("PRAGMA mmap_size=1073741824", [], |r| r.get(0))?;
    let _: i64 = conn.query_row("PRAGMA wal_autocheckpoint=8192", [], |r| r.get(0))?;
    let sql = "INSERT INTO results (series_id, agent_num, seq, start_us, outcome, total_us,
                   stored_at_us, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
    let mut source = RawRows::new(shapes);
    let total: u64 = shapes.iter().map(|s| s.total).sum();
    let tid = current_thread_cpu;
    let cpu0 = tid();
    let start = Instant::now();
    let mut segments = Segments::new(segment, start);
    let mut rows = 0u64;
    let mut done = false;
    while rows < total && !done {
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare_cached(sql)?;
            let mut in_tx = 0usize;
            while in_tx < RAW_TX_ROWS && rows < total {
                let Some((id, agent, row)) = source.next() else {
                    done = true;
                    break;
                };
                st.execute(rusqlite::params![
                    id,
                    agent,
                    row.seq,
                    row.start_us,
                    row.outcome,
                    row.total_us,
                    sys::now_us(),
                    &row.body[..],
                ])?;
                in_tx += 1;
                rows += 1;
            }
        }
        tx.commit()?;
        segments.observe(rows, Instant::now());
    }
    let end = Instant::now();
    Ok(Run {
        rows,
        secs: end.duration_since(start).as_secs_f64(),
        segments: segments.rates,
        server_cpu: tid() - cpu0,
        client_cpu: 0.0,
    })
}

/// CPU seconds of the calling thread.
#[allow(unsafe_code)] // clock_gettime(CLOCK_THREAD_CPUTIME_ID): no std API
fn current_thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Samples the collector with `perf record` for `secs` and returns the top symbols, if perf works.
async fn profile(pid: u32, secs: u64, out: &Path) -> Option<Vec<String>> {
    let perf = mxscope_tests::binaries::system_tool("perf", "linux-perf").ok()?;
    let status = tokio::process::Command::new(&perf)
        .args(["record", "-F", "499", "-g", "-p", &pid.to_string(), "-o"])
        .arg(out)
        .args(["--", "sleep", &secs.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .ok()?;
    if !status.success() {
        return None;
    }
    let report = tokio::process::Command::new(&perf)
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "symbol",
            "--percent-limit",
            "1.5",
            "-q",
            "-g",
            "none",
            "-i",
        ])
        .arg(out)
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&report.stdout);
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| l.contains('%'))
        .take(20)
        .map(|l| {
            // Drop perf's trailing empty columns ("-  -").
            let words: Vec<&str> = l.split_whitespace().collect();
            let end = words.iter().rposition(|w| *w != "-").map_or(0, |i| i + 1);
            words[..end].join(" ")
        })
        .collect();
    if let Ok(script) = tokio::process::Command::new(&perf)
        .args(["script", "-i"])
        .arg(out)
        .output()
        .await
    {
        let text = String::from_utf8_lossy(&script.stdout);
        let samples = text.split("\n\n").filter(|s| !s.trim().is_empty());
        let (mut all, mut writer) = (0u64, 0u64);
        for sample in samples {
            all += 1;
            if sample.trim_start().starts_with("mxscope-db-writ") {
                writer += 1;
            }
        }
        if all == 0 {
            // perf wrote no sample (the load ended first): no profile rather than an empty one.
            return (!lines.is_empty()).then_some(lines);
        }
        lines.push(String::new());
        lines.push(format!(
            "{:.1}% of the samples are in the single `mxscope-db-writer` thread; by where the sample's stack was:",
            100.0 * writer as f64 / all.max(1) as f64
        ));
        for (share, what) in categorize(&text) {
            lines.push(format!("{share:5.1}%  {what}"));
        }
    }
    (!lines.is_empty()).then_some(lines)
}

/// Shares of `perf script` samples by where their stack was.
fn categorize(script: &str) -> Vec<(f64, &'static str)> {
    let mut counts: Vec<(&'static str, u64)> = Vec::new();
    let mut total = 0u64;
    for sample in script.split("\n\n").filter(|s| !s.trim().is_empty()) {
        let leaf = sample.lines().nth(1).unwrap_or("");
        let has = |x: &str| sample.contains(x);
        let what = if has("readDbPage") || has("__libc_pread") {
            "SQLite reading pages from the OS page cache (pread: its own page cache is too small)"
        } else if has("pwrite") || has("walWriteToLog") || has("sqlite3WalFrames") {
            "WAL writes (pwrite) and commit"
        } else if has("fsync") || has("fdatasync") {
            "fsync"
        } else if ["malloc", "free", "unlink_chunk", "_int_", "realloc"]
            .iter()
            .any(|x| leaf.contains(x))
        {
            "allocator (malloc/free: per-result Strings, keys and maps)"
        } else if leaf.contains("sip::Hasher") {
            "SipHash (HashMap keys of four Strings per result)"
        } else if has("Sketch") || has("aggregate::Agg") || has("aggregate::Phases") {
            "rollup sketches (Agg/Sketch add, merge, encode)"
        } else if has("sqlite3") {
            "SQLite VM and b-trees (other)"
        } else {
            "other (memmove, gRPC decode, tokio, ...)"
        };
        total += 1;
        match counts.iter_mut().find(|(w, _)| *w == what) {
            Some((_, n)) => *n += 1,
            None => counts.push((what, 1)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    counts
        .into_iter()
        .map(|(w, n)| (100.0 * n as f64 / total.max(1) as f64, w))
        .collect()
}

/// Sizes of this run.
struct Sizes {
    streams: Vec<usize>,
    short_rows: u64,
    long_rows: u64,
    segment: u64,
}

fn sizes(ctx: &Ctx) -> Sizes {
    if ctx.mode.is_smoke() {
        Sizes {
            streams: vec![2],
            short_rows: 8_000,
            long_rows: 20_000,
            segment: 10_000,
        }
    } else {
        Sizes {
            streams: vec![4, 8, 16],
            short_rows: ctx.rows.map_or(1_000_000, |n| n / 10),
            long_rows: ctx.rows.unwrap_or(10_000_000),
            segment: ctx.rows.map_or(1_000_000, |n| n / 10),
        }
    }
}

/// Loads the 10-region, 1,000-target, 30-day fleet into a fresh collector db at `db` through the
/// collector itself. Returns the run; the collector is stopped cleanly afterwards.
pub(crate) async fn load_fleet(
    ctx: &Ctx,
    db: &Path,
    rows: u64,
    segment: u64,
    profile_to: Option<PathBuf>,
) -> Result<(Run, Vec<String>, Vec<String>)> {
    let flags = limit_flags()?;
    let mut c = BenchCollector::start(&ctx.dir, "collector-fleet", db, &flags)?;
    let shapes = synth::fleet("fleet", synth::REGIONS.len(), TARGETS, rows, SPAN_US);
    let pid = c.pid()?;
    let url = c.url();
    let prof = profile_to.map(|p| {
        tokio::spawn(async move {
            // Well into the load (a 10M-row load takes about a minute now).
            tokio::time::sleep(Duration::from_secs(20)).await;
            profile(pid, 10, &p).await
        })
    });
    let run = load_collector(&url, pid, &shapes, segment).await;
    let top = match prof {
        Some(h) => {
            if run.is_err() {
                h.abort();
            }
            h.await.ok().flatten().unwrap_or_default()
        }
        None => Vec::new(),
    };
    let run = run.with_context(|| format!("collector log:\n{}", c.proc.log_tail(20)))?;
    c.stop()?;
    let flag_list = flags.iter().map(|(f, v)| format!("{f} {v}")).collect();
    Ok((run, top, flag_list))
}

fn segs(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{:.0}", r / 1000.0))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Runs benchmark 1. Returns the section and the path of the 10M-row collector db (for `query`).
pub(crate) async fn run(ctx: &Ctx) -> (Section, Option<PathBuf>) {
    let title = "1. Collector ingest";
    let target = "≥ 100,000 results/s sustained to 10M rows, and ≥ 0.5 of the raw SQLite insert limit measured in the same run";
    let mut s = Section::new("ingest", title, ctx.command("ingest"), target);
    match run_inner(ctx, &mut s).await {
        Ok(db) => (s, Some(db)),
        Err(e) => {
            s.verdict("run", Verdict::Failed(format!("{e:#}")));
            (s, None)
        }
    }
}

/// Span of `rows` results from [`synth::REGIONS`] agents probing [`TARGETS`] targets each every
/// 60 s (the interval the synthetic results carry): about 16.7 hours for 10M results.
pub(crate) fn live_span_us(rows: u64) -> i64 {
    let rounds = rows / (synth::REGIONS.len() * TARGETS) as u64;
    i64::try_from(rounds.max(1)).unwrap_or(i64::MAX / 60_000_000) * 60_000_000
}

/// The raw limit for `rows` results over `span_us`, on its own fresh database.
async fn raw_limit(ctx: &Ctx, rows: u64, span_us: i64, segment: u64) -> Result<Run> {
    let raw_db = ctx.dir.join("raw.db");
    create_schema(&raw_db).await?;
    let shapes = synth::fleet("fleet", synth::REGIONS.len(), TARGETS, rows, span_us);
    let db2 = raw_db.clone();
    let raw = tokio::task::spawn_blocking(move || load_raw(&db2, &shapes, segment)).await??;
    for f in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{f}", raw_db.display()));
    }
    Ok(raw)
}

/// One time shape's pair of runs.
struct Pair {
    shape: &'static str,
    raw: Run,
    collector: Run,
}

impl Pair {
    fn ratio(&self) -> f64 {
        self.collector.rate() / self.raw.rate()
    }

    fn worst_segment(&self) -> f64 {
        self.collector
            .segments
            .iter()
            .copied()
            .fold(self.collector.rate(), f64::min)
    }

    fn segment_ratios(&self) -> Vec<f64> {
        self.collector
            .segments
            .iter()
            .zip(&self.raw.segments)
            .map(|(c, r)| c / r)
            .collect()
    }
}

async fn run_inner(ctx: &Ctx, s: &mut Section) -> Result<PathBuf> {
    let z = sizes(ctx);
    let flags = limit_flags()?;

    // Raw limit first, to the full size, on its own database with the collector's schema.
    let raw = raw_limit(ctx, z.long_rows, SPAN_US, z.segment).await?;
    let raw_first = raw.segments.first().copied().unwrap_or(raw.rate());

    // Short runs with N streams, each on a fresh database.
    let mut short_rows = Vec::new();
    for &n in &z.streams {
        let db = ctx.dir.join(format!("ingest-{n}.db"));
        let mut c = BenchCollector::start(&ctx.dir, &format!("collector-ingest-{n}"), &db, &flags)?;
        let shapes = synth::fleet(&format!("n{n}"), n, TARGETS, z.short_rows, SPAN_US);
        let run = load_collector(&c.url(), c.pid()?, &shapes, z.segment)
            .await
            .with_context(|| format!("collector log:\n{}", c.proc.log_tail(20)))?;
        c.stop()?;
        for f in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{f}", db.display()));
        }
        short_rows.push(vec![
            n.to_string(),
            run.rows.to_string(),
            format!("{:.0}", run.rate()),
            format!("{:.0}", raw_first),
            format!("{:.2}", run.rate() / raw_first),
            format!("{:.2}", run.server_cpu / run.secs),
            format!("{:.2}", run.client_cpu / run.secs),
        ]);
    }

    // The long runs: 10 agents (one per region) to the full size. First the 30-day history
    // (its db serves `query`), then the same count of results as live agents send them, every
    // series every 60 s, each next to its own raw limit.
    let db = ctx.dir.join("fleet.db");
    let prof = (!ctx.mode.is_smoke()).then(|| ctx.dir.join("ingest.perf.data"));
    let (long, top, flag_list) = load_fleet(ctx, &db, z.long_rows, z.segment, prof).await?;
    let history = Pair {
        shape: "30-day history",
        raw,
        collector: long,
    };
    let live_span = live_span_us(z.long_rows);
    let live_raw = raw_limit(ctx, z.long_rows, live_span, z.segment).await?;
    let live_db = ctx.dir.join("live.db");
    let live = {
        let mut c = BenchCollector::start(&ctx.dir, "collector-live", &live_db, &flags)?;
        let shapes = synth::fleet(
            "live",
            synth::REGIONS.len(),
            TARGETS,
            z.long_rows,
            live_span,
        );
        let run = load_collector(&c.url(), c.pid()?, &shapes, z.segment)
            .await
            .with_context(|| format!("collector log:\n{}", c.proc.log_tail(20)))?;
        c.stop()?;
        run
    };
    for f in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{f}", live_db.display()));
    }
    let live = Pair {
        shape: "live, every series every 60 s",
        raw: live_raw,
        collector: live,
    };
    let pairs = [&history, &live];

    s.line(format!(
        "Synthetic `smtp` results (8 phase timings, 3 facts; ≈ 100 bytes of row plus its time-index entry as stored; each result also updates its series' state and its day and week rollups, and its hour rollup while the hour is within the 3 days that hour rows are read for; series and rollup rows are written by the writer every 2 s and before reads) for {TARGETS} targets from 10 regions, sent by agent streams over plain gRPC to the release `mxscope-collector` on 127.0.0.1 in batches of {BATCH} with {WINDOW} batches in flight per stream; a result counts once its ack (sent after COMMIT) arrived. Collector limit flags passed: {}.",
        if flag_list.is_empty() { "none".to_string() } else { flag_list.join(", ") }
    ));
    s.line("");
    s.line(format!(
        "Two time shapes of the same {} results: **30-day history** (timestamps spread over the last 30 days, one result per series every ≈ 43 min: about 1.4 results per hour and 33 per day rollup row; this database then serves benchmark 3) and **live** (every series every 60 s, as the results' own interval says: {} of probing, 60 results per hour rollup row — what a collector sees from agents that are keeping up).",
        z.long_rows,
        if live_span >= 7_200_000_000 {
            format!("{:.1} hours", live_span as f64 / 3.6e9)
        } else {
            format!("{} minutes", live_span / 60_000_000)
        }
    ));
    s.line("");
    s.line(format!("Raw limit (one per shape, same rows, measured in this run): one rusqlite connection (WAL, synchronous=NORMAL, the collector's page cache), one prepared INSERT into `results` of the collector's own schema (its migrations, so the same index and page size), {RAW_TX_ROWS} rows per transaction, each row encoded by the collector's own `ResultRow::of`, the same rows in the same interleaving; no rollups, no series state, no high-water mark, no gRPC. The loop also generates the synthetic results, as the collector's benchmark agents do."));
    s.line("");
    let mut rows = Vec::new();
    for p in pairs {
        rows.push(vec![
            format!("{}: raw rusqlite", p.shape),
            p.raw.rows.to_string(),
            format!("{:.0}", p.raw.rate()),
            segs(&p.raw.segments),
            format!("{:.2}", p.raw.server_cpu / p.raw.secs),
        ]);
        rows.push(vec![
            format!("{}: collector, {} streams", p.shape, synth::REGIONS.len()),
            p.collector.rows.to_string(),
            format!("{:.0}", p.collector.rate()),
            segs(&p.collector.segments),
            format!(
                "{:.2} (+{:.2} synthetic agents)",
                p.collector.server_cpu / p.collector.secs,
                p.collector.client_cpu / p.collector.secs
            ),
        ]);
    }
    s.table(
        &[
            "run",
            "rows",
            "results/s overall",
            "per-segment results/s (k, each segment = rows/segments)",
            "CPU s of the writer side per s",
        ],
        &rows,
    );
    for p in pairs {
        s.line(format!(
            "{}: collector/raw per segment (same table size) {}; overall {:.2}; collector CPU per result {:.1} µs.",
            p.shape,
            p.segment_ratios()
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" / "),
            p.ratio(),
            1e6 * p.collector.server_cpu / p.collector.rows.max(1) as f64
        ));
        s.line("");
    }
    s.line(format!(
        "Stream count (30-day shape, fresh database each, {} rows, compared with the raw limit's first segment):",
        z.short_rows
    ));
    s.line("");
    s.table(
        &[
            "streams",
            "rows",
            "results/s",
            "raw results/s (first segment)",
            "ratio",
            "collector CPU/s",
            "agents CPU/s",
        ],
        &short_rows,
    );
    if !top.is_empty() {
        s.line("Profile of the collector during the 30-day run (`perf record -F 499 -g -p PID` for 10 s from 20 s in; self time by symbol, ≥ 1.5 %):");
        s.line("");
        s.line("```");
        for l in &top {
            s.line(l);
        }
        s.line("```");
        s.line("");
    }
    let each = |f: &dyn Fn(&Pair) -> String| {
        pairs
            .iter()
            .map(|p| format!("{}: {}", p.shape, f(p)))
            .collect::<Vec<_>>()
            .join("; ")
    };
    s.verdict(
        "≥ 100,000 results/s sustained",
        Verdict::judge(
            ctx.mode,
            pairs
                .iter()
                .all(|p| p.worst_segment() >= 100_000.0 && p.collector.rate() >= 100_000.0),
            each(&|p| {
                format!(
                    "{:.0}/s overall, slowest segment {:.0}/s",
                    p.collector.rate(),
                    p.worst_segment()
                )
            }),
        ),
    );
    s.verdict(
        "≥ 0.5 of the raw limit",
        Verdict::judge(
            ctx.mode,
            pairs.iter().all(|p| p.ratio() >= 0.5),
            each(&|p| {
                format!(
                    "{:.0}/s vs raw {:.0}/s = {:.2} (median per-segment {})",
                    p.collector.rate(),
                    p.raw.rate(),
                    p.ratio(),
                    fmt(median(&p.segment_ratios()), 2)
                )
            }),
        ),
    );
    Ok(db)
}
