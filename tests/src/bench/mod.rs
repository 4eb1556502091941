//! mxscope-bench: the six benchmarks of issue 9, each measured side by side with its baseline in
//! the same run, and the `BENCHMARKS.md` report they produce.

pub mod agent_cost;
pub mod collector;
pub mod ingest;
pub mod latency;
pub mod query;
pub mod report;
pub mod synth;
pub mod sys;
pub mod timing;

use std::path::PathBuf;

/// Sizes of one run: `--smoke` (seconds, no thresholds) or the full benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Smoke,
    Full,
}

impl Mode {
    pub fn is_smoke(self) -> bool {
        self == Mode::Smoke
    }

    /// `--smoke` for commands shown in the report.
    pub fn flag(self) -> &'static str {
        match self {
            Mode::Smoke => " --smoke",
            Mode::Full => "",
        }
    }
}

/// What every benchmark gets.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub mode: Mode,
    /// Scratch directory of this run (databases, spools, logs).
    pub dir: PathBuf,
    /// Repository root (for `deploy/lab/lab`).
    pub repo: PathBuf,
}

impl Ctx {
    /// The command that reproduces one benchmark.
    pub fn command(&self, name: &str) -> String {
        format!(
            "cargo build --release --workspace && cargo run --release -p mxscope-tests --bin mxscope-bench --{} --only {name}",
            self.mode.flag()
        )
    }
}

/// The benchmark names, in run order (`--only NAME`).
pub const NAMES: &[&str] = &[
    "ingest",
    "query",
    "latency",
    "agent-cost",
    "timing",
];

/// Proposals for the targets this run missed, from what the profile and the side-by-side figures
/// show (see BENCHMARKS.md). Only sections with a miss get one.
pub fn proposals(report: &report::Report) -> Vec<String> {
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

/// Per benchmark: what to change where its target is missed.
const PROPOSALS: &[(&str, &str)] = &[];
