//! Benchmark 3, query latency: `Status` and `Matrix` over 30 days on the 10M-result fleet
//! (1,000 targets × 10 regions) that benchmark 1 loaded, through the real collector's Query API.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use mxscope_proto::pb;

use super::collector::{limit_flags, BenchCollector};
use super::ingest;
use super::report::{Section, Verdict};
use super::sys::{fmt, median};
use super::Ctx;

const DAYS_30_MS: u64 = 30 * 24 * 3600 * 1000;
/// One query may take this long before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Timings of one kind of query.
struct Timed {
    name: String,
    ms: Vec<f64>,
    rows: usize,
    error: Option<String>,
}

async fn time_calls<F, Fut>(name: &str, runs: usize, mut call: F) -> Timed
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<usize, tonic::Status>>,
{
    let mut t = Timed {
        name: name.into(),
        ms: Vec::new(),
        rows: 0,
        error: None,
    };
    for i in 0..runs {
        let start = Instant::now();
        match tokio::time::timeout(CALL_TIMEOUT, call()).await {
            Ok(Ok(rows)) => {
                let ms = start.elapsed().as_secs_f64() * 1000.0;
                t.ms.push(ms);
                t.rows = rows;
                // Slow queries: three runs are enough for a median.
                if ms > 5_000.0 && i >= 2 {
                    break;
                }
            }
            Ok(Err(status)) => {
                t.error = Some(format!("{:?}: {}", status.code(), status.message()));
                break;
            }
            Err(_) => {
                t.error = Some(format!("no answer within {CALL_TIMEOUT:?}"));
                break;
            }
        }
    }
    t
}

/// Runs benchmark 3 on `fleet_db` (from `ingest`), or loads a fleet itself when it is `None`.
pub(crate) async fn run(ctx: &Ctx, fleet_db: Option<PathBuf>) -> Section {
    let title = "3. Query latency";
    let target = "`status` and `matrix` over 30 days with 10 million stored results (1,000 targets × 10 regions) answer in < 100 ms each (median), from rollups";
    let mut s = Section::new("query", title, ctx.command("query"), target);
    if let Err(e) = run_inner(ctx, fleet_db, &mut s).await {
        s.verdict("run", Verdict::Failed(format!("{e:#}")));
    }
    s
}

async fn run_inner(ctx: &Ctx, fleet_db: Option<PathBuf>, s: &mut Section) -> Result<()> {
    let rows = if ctx.mode.is_smoke() {
        20_000
    } else {
        ctx.rows.unwrap_or(10_000_000)
    };
    let db = match fleet_db {
        Some(db) => {
            s.line(format!("Data: the database benchmark 1 filled through the collector ({rows} results, 10 agents in 10 regions × 1,000 targets, timestamps spread over 30 days), served by a freshly started collector."));
            db
        }
        None => {
            let db = ctx.dir.join("fleet-query.db");
            let started = Instant::now();
            let (run, _, _) = ingest::load_fleet(ctx, &db, rows, rows / 10, None).await?;
            s.line(format!("Data: {} results loaded through the collector's ingest in {:.0} s (10 agents in 10 regions × 1,000 targets, timestamps spread over 30 days), served by a freshly started collector.", run.rows, started.elapsed().as_secs_f64()));
            db
        }
    };
    s.line("");
    measure(ctx, &db, s).await
}

async fn measure(ctx: &Ctx, db: &Path, s: &mut Section) -> Result<()> {
    let flags = limit_flags()?;
    let c = BenchCollector::start(&ctx.dir, "collector-query", db, &flags)?;
    let client = c.query().await?;
    let runs = if ctx.mode.is_smoke() { 2 } else { 7 };
    let mut timed = Vec::new();

    let status = |window_ms: u64| {
        let mut cl = client.clone();
        move || {
            let mut cl2 = cl.clone();
            cl = cl.clone();
            async move {
                let r = cl2
                    .status(pb::StatusRequest {
                        window_ms,
                        ..Default::default()
                    })
                    .await?;
                Ok(r.into_inner().rows.len())
            }
        }
    };
    let matrix = |metric: &'static str| {
        let cl = client.clone();
        move || {
            let mut cl2 = cl.clone();
            async move {
                let r = cl2
                    .matrix(pb::MatrixRequest {
                        check: "smtp".into(),
                        metric: metric.into(),
                        since_ms: DAYS_30_MS,
                        offset: 0,
                    })
                    .await?;
                Ok(r.into_inner().rows.len())
            }
        }
    };
    // Warm the page cache and connection once; not counted.
    let _ = time_calls("warm-up", 1, status(0)).await;
    timed.push(time_calls("status, 30-day window", runs, status(DAYS_30_MS)).await);
    timed.push(time_calls("matrix reachability, 30 days", runs, matrix("reachability")).await);
    timed.push(time_calls("matrix p95, 30 days", runs, matrix("p95")).await);
    timed.push(time_calls("status, default window (5 min, reference)", runs, status(0)).await);
    drop(client);
    drop(c);

    let mut rows = Vec::new();
    for t in &timed {
        rows.push(vec![
            t.name.clone(),
            t.ms.len().to_string(),
            fmt(median(&t.ms), 1),
            fmt(t.ms.iter().copied().reduce(f64::min), 1),
            fmt(t.ms.iter().copied().reduce(f64::max), 1),
            t.rows.to_string(),
            t.error.clone().unwrap_or_default(),
        ]);
    }
    s.table(
        &[
            "query (Query API over gRPC, loopback)",
            "runs",
            "median ms",
            "min ms",
            "max ms",
            "rows returned",
            "error",
        ],
        &rows,
    );
    for t in timed.iter().take(3) {
        let what = t.name.clone();
        let v = match (&t.error, median(&t.ms)) {
            (Some(err), _) if err.starts_with("Unimplemented") => Verdict::Pending(format!(
                "the collector does not implement it yet ({err}); rerun `--only query` when it lands"
            )),
            (Some(err), _) => Verdict::Failed(err.clone()),
            (None, None) => Verdict::Failed("no measurement".into()),
            (None, Some(m)) => Verdict::judge(
                ctx.mode,
                m < 100.0,
                if m < 100.0 {
                    format!("median {m:.1} ms")
                } else {
                    format!("median {m:.1} ms, {:.1}× the 100 ms budget", m / 100.0)
                },
            ),
        };
        s.verdict(&what, v);
    }
    Ok(())
}
