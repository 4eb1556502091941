//! mxscope-bench: eight benchmarks, each measured side by side with its baseline in
//! the same run, and the `BENCHMARKS.md` report they produce.

pub(crate) mod agent_cost;
pub(crate) mod collector;
pub(crate) mod dashboard;
pub(crate) mod ingest;
pub(crate) mod latency;
pub(crate) mod pg_ingest;
pub(crate) mod query;
pub(crate) mod report;
pub(crate) mod synth;
pub(crate) mod sys;
pub(crate) mod timing;

use std::path::PathBuf;

/// Sizes of one run: `--smoke` (seconds, no thresholds) or the full benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Smoke,
    Full,
}

impl Mode {
    pub(crate) fn is_smoke(self) -> bool {
        self == Mode::Smoke
    }

    /// `--smoke` for commands shown in the report.
    pub(crate) fn flag(self) -> &'static str {
        match self {
            Mode::Smoke => " --smoke",
            Mode::Full => "",
        }
    }
}

/// What every benchmark gets.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub mode: Mode,
    /// Scratch directory of this run (databases, spools, logs).
    pub dir: PathBuf,
    /// Repository root (for `deploy/lab/lab`).
    pub repo: PathBuf,
    /// `--rows N`: rows of the long ingest run and of the query database instead of 10,000,000
    /// (and a tenth of it for the stream-count runs); for quick comparisons, not for the report.
    pub rows: Option<u64>,
}

impl Ctx {
    /// The command that reproduces one benchmark.
    pub(crate) fn command(&self, name: &str) -> String {
        let rows = self
            .rows
            .map(|n| format!(" --rows {n}"))
            .unwrap_or_default();
        format!(
            "cargo build --release --workspace && cargo run --release -p mxscope-tests --bin mxscope-bench --{}{rows} --only {name}",
            self.mode.flag()
        )
    }
}

/// The benchmark names, in run order (`--only NAME`).
pub(crate) const NAMES: &[&str] = &[
    "ingest",
    "query",
    "latency",
    "agent-cost",
    "timing",
    "pg-ingest",
    "dashboard",
];

/// Proposals for the targets this run missed, from what the profile and the side-by-side figures
/// show (see BENCHMARKS.md). Only sections with a miss get one.
pub(crate) fn proposals(report: &report::Report) -> Vec<String> {
    let missed = |name: &str| {
        report.sections.iter().any(|s| {
            s.name == name
                && s.verdicts
                    .iter()
                    .any(|(_, v)| matches!(v, report::Verdict::Missed(_)))
        })
    };
    let mut out = Vec::new();
    for (name, text) in PROPOSALS {
        if missed(name) {
            out.push(format!("**{name}**: {text}"));
        }
    }
    out
}

/// Per benchmark: what to change where its target is missed. From the profiles of the run
/// recorded in BENCHMARKS.md (collector: `perf record` during the 10M-row load, quoted in section
/// 1; agent: `perf record -p` of the agent during section 4's windows).
const PROPOSALS: &[(&str, &str)] = &[
    ("ingest", "the writer thread is the limit: per result it inserts the row (about what the raw loop does), feeds the \
        series' hysteresis and merges the result's hour aggregate into its day (and, for the last 3 days, hour) rollup; \
        series rows and rollup rows are written every 2 s, not per commit. Next steps: aggregate a batch's results per \
        (day, series) in the ingest task so the writer merges fewer, smaller aggregates; keep an aggregate's sketches in \
        one block (one allocation, one free); bind rollup blobs without SQLite's copy."),
    ("query", "the 30-day queries read week rollup rows keyed by (level, bucket, series id): ≈ 55k rows for 10,000 series. If \
        they creep over 100 ms, keep one running 30-day summary per series, or cache answers keyed by the writer's commit count."),
    ("agent-cost", "about a third of the agent's CPU is its spool, not probing: at 33 probes/s the uplink sends a batch as soon as one result \
        is spooled, each ack rewrites the state file (create tmp, write, fsync, rename, fsync dir: 2 fsyncs and a new inode per ack) and \
        each append fsyncs on its own. The acked seq need not be durable (the collector dedupes by its high-water mark and says \
        `stored_up_to_seq` in Welcome), so write it in place without fsync, at most every second; let the uplink linger up to 100 ms for a \
        fuller batch (probe→query p99 was ≈ 0.1 s, far inside 1 s); group spool appends on a 50 ms timer. That removes most of the ≈ 33 % \
        spool share and brings the agent to ≈ 0.95 CPU s per 1,000 probes, ≈ 0.46× blackbox_exporter. \
        Peak RSS: 20 targets → 9.9 MiB, 1,000 → 17.8 MiB, i.e. ≈ 8 KiB per scheduled (target, check) — a tokio task, interval, \
        CancellationToken, JoinHandle and CheckSpec clone each; one scheduler task over a BinaryHeap of next-due jobs with interned names \
        would cut that to < 1 KiB, and capping the runtime to 2 workers and malloc arenas (`M_ARENA_MAX`) lowers the 9.9 MiB base; \
        blackbox_exporter holds no targets at all (Prometheus does), so ≤ 0.5× means ≤ 10.6 MiB with 1,000 targets."),
    ("latency", "the path is agent spool fsync → uplink batch → collector writer commit → series row; if p99 grows, look at the writer \
        queue first (section 1: the writer is the bottleneck)."),
    ("footprint", "see agent-cost: ≈ 8 KiB per scheduled job; one scheduler task over a heap of jobs instead of one task per job."),
    ("pg-ingest", "one collector on PostgreSQL stays well under half of what a binary COPY of the same rows reaches (section 7; \
        0.20 with one writer and 0.29 with two, side by side on 2026-12-04): PostgreSQL spends ≈ 3× COPY's CPU per row on the \
        collector's path (the multi-row INSERT … unnest, and per transaction the agents' and series' rows locked and updated \
        and the writers' hour/day/week rollup rows upserted), and the collector ≈ 9 µs per result beside it, so on 2 cores \
        client and server together cap it near 0.3 of COPY (which needs ≈ 7 µs in all per row). Next steps, by the CPU they \
        save: buffer the day and week rollup rows in the writers for a few seconds (rebuilt from the hour rows after a crash) \
        instead of upserting three levels per series per transaction, write the results rows with binary COPY instead of \
        INSERT … unnest, pipeline a transaction's statements (tokio-postgres pipelines queries issued together), and reuse \
        the writers' parameter buffers between batches (a profile put ≈ 40 % of the collector's samples in the kernel \
        zeroing fresh pages under mimalloc)."),

    ("dashboard", "the overview fetches two full matrices and builds every row's HTML at once: if it grows past 1 s, page the \
        matrix (the API already pages internally), render only the rows in view, and cache the matrix per commit on the collector."),
    ("timing", "the agent's connect time runs ≈ 0.05 ms above a plain connect(2) from the same namespace (tokio wake-up); the rest is the \
        delay line's own overhead, which the lab measures as ≈ 0.2–0.4 ms."),
];
