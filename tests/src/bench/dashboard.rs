//! Benchmark 8, the dashboard's overview in a real browser: a collector's database seeded by
//! benchmark 1's synthetic agents (real gRPC sessions: 1,000 targets from each of 10 regions),
//! then Debian's chromium (through playwright-core, `tests/browser/`) opens `/` and the time from
//! navigation start to the finished grid (both matrix requests answered, the 10,000 cells in the
//! DOM) is read from the page's `performance.now()`.

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use mxscope_tests::browser::Browser;
use mxscope_tests::net::free_port;

use super::collector::{limit_flags, BenchCollector};
use super::ingest::{load_collectors, TARGETS};
use super::report::{Section, Verdict};
use super::synth;
use super::sys::median;
use super::Ctx;

/// The goal: the overview of 1,000 targets × 10 regions drawn within this.
const GOAL_MS: f64 = 1000.0;
/// Page loads measured (the first one included: nothing is cached, the page says no-cache).
const LOADS: usize = 5;

pub(crate) async fn run(ctx: &Ctx) -> Section {
    let title = "8. Dashboard overview in a browser";
    let target = format!(
        "the overview of {TARGETS} targets × {} regions (seeded database) drawn in chromium within {GOAL_MS} ms of navigation start (median of {LOADS} loads)",
        synth::REGIONS.len()
    );
    let mut s = Section::new("dashboard", title, ctx.command("dashboard"), &target);
    if let Err(e) = run_inner(ctx, &mut s).await {
        s.verdict("run", Verdict::Failed(format!("{e:#}")));
    }
    s
}

async fn run_inner(ctx: &Ctx, s: &mut Section) -> Result<()> {
    let targets = if ctx.mode.is_smoke() { 20 } else { TARGETS };
    let regions = synth::REGIONS.len();
    let http = format!("127.0.0.1:{}", free_port(Ipv4Addr::LOCALHOST)?);
    let mut flags = limit_flags()?;
    flags.push(("--http".into(), http.clone()));
    let db = ctx.dir.join("dashboard.db");
    let mut collector = BenchCollector::start(&ctx.dir, "collector-dashboard", &db, &flags)?;
    // Three results per series over the last 3 minutes: every cell has a value in the 1 h window.
    let total = (targets * regions * 3) as u64;
    let shapes = synth::fleet("dash", regions, targets, total, 3 * 60_000_000);
    load_collectors(&[(collector.url(), collector.pid()?)], &shapes, total)
        .await
        .context("seed the dashboard's database")?;
    let rows = targets;
    let loads = tokio::task::block_in_place(|| -> Result<Vec<(f64, f64)>> {
        let mut b = Browser::start()?;
        let mut out = Vec::new();
        for i in 0..LOADS {
            // A fresh document each time (the fragment differs, so goto navigates).
            b.goto(&format!("http://{http}/?load={i}#/"))?;
            b.wait_fn(
                &format!("window.mxscope.renderedAt > 0 && window.mxscope.rows === {rows}"),
                std::time::Duration::from_secs(30),
            )?;
            let v = b.eval("[window.mxscope.renderedAt, window.mxscope.lastRenderMs, document.querySelectorAll('#grid td.cell').length]")?;
            let at = v[0].as_f64().context("renderedAt")?;
            let dom = v[1].as_f64().context("lastRenderMs")?;
            let cells = v[2].as_u64().context("cells")?;
            if cells != (rows * regions) as u64 {
                bail!("the grid has {cells} cells, expected {}", rows * regions);
            }
            out.push((at, dom));
        }
        let shots = ctx.dir.join("dashboard-overview.png");
        b.screenshot(&shots)?;
        Ok(out)
    })?;
    collector.stop()?;
    let at: Vec<f64> = loads.iter().map(|l| l.0).collect();
    let dom: Vec<f64> = loads.iter().map(|l| l.1).collect();
    let (at_med, dom_med) = (
        median(&at).context("no load measured")?,
        median(&dom).context("no load measured")?,
    );
    s.line(format!(
        "Seeded through {regions} synthetic agents over gRPC: {total} results, {rows} targets × {regions} regions (`smtp`), then `/` opened {LOADS} times in Debian's chromium (headless, playwright-core); the page fetches `/api/v1/matrix` twice (reachability and p95) and builds the grid."
    ));
    s.table(
        &["figure", "median", "each load"],
        &[
            vec![
                "navigation start → grid drawn, ms".into(),
                format!("{at_med:.0}"),
                loads
                    .iter()
                    .map(|l| format!("{:.0}", l.0))
                    .collect::<Vec<_>>()
                    .join(" / "),
            ],
            vec![
                "of which building the grid's DOM, ms".into(),
                format!("{dom_med:.0}"),
                loads
                    .iter()
                    .map(|l| format!("{:.0}", l.1))
                    .collect::<Vec<_>>()
                    .join(" / "),
            ],
        ],
    );
    s.verdict(
        "overview drawn within 1 s",
        Verdict::judge(
            ctx.mode,
            at_med < GOAL_MS,
            format!(
                "{at_med:.0} ms (median of {LOADS}) for {} cells",
                rows * regions
            ),
        ),
    );
    Ok(())
}
