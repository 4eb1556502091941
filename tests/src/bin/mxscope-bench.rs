//! `mxscope-bench`: runs mxscope's benchmarks (collector ingest vs the raw SQLite limit, probe →
//! queryable latency, query latency, agent cost vs blackbox_exporter, agent footprint, timing
//! accuracy in the lab, PostgreSQL ingest vs COPY) and writes `BENCHMARKS.md`.
//!
//!   cargo build --release --workspace
//!   cargo run --release -p mxscope-tests --bin mxscope-bench -- [--smoke] [--only NAME] [--out FILE]

#[path = "../bench/mod.rs"]
mod bench;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bench::report::{Report, Verdict};
use bench::{Ctx, Mode, NAMES};

struct Args {
    mode: Mode,
    only: Option<String>,
    out: PathBuf,
    rows: Option<u64>,
}

fn parse_args(argv: &[String]) -> Result<Args> {
    let mut args = Args {
        mode: Mode::Full,
        only: None,
        out: PathBuf::from("BENCHMARKS.md"),
        rows: None,
    };
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--smoke" => args.mode = Mode::Smoke,
            "--only" => {
                let name = it.next().context("--only needs a benchmark name")?;
                if !NAMES.contains(&name.as_str()) {
                    bail!("unknown benchmark '{name}' (one of: {})", NAMES.join(", "));
                }
                args.only = Some(name.clone());
            }
            "--rows" => {
                let n = it.next().context("--rows needs a number")?;
                args.rows = Some(
                    n.parse()
                        .with_context(|| format!("--rows {n}: not a number"))?,
                );
            }
            "--out" => args.out = PathBuf::from(it.next().context("--out needs a file")?),
            "-h" | "--help" => {
                println!(
                    "usage: mxscope-bench [--smoke] [--rows N] [--only {}] [--out BENCHMARKS.md]\n\
                     Build the release binaries first: cargo build --release --workspace",
                    NAMES.join("|")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument '{other}' (see --help)"),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // Helper modes, run inside lab namespaces by the timing benchmark.
    let helper = match argv.first().map(String::as_str) {
        Some("--serve-smtp") => Some(bench::timing::serve_smtp(
            argv.get(1).map_or("", String::as_str),
        )),
        Some("--connect-times") => Some(
            argv.get(2)
                .context("--connect-times ADDR N")
                .and_then(|n| n.parse::<usize>().context("count"))
                .and_then(|n| {
                    bench::timing::connect_times(argv.get(1).map_or("", String::as_str), n)
                }),
        ),
        _ => None,
    };
    if let Some(res) = helper {
        return match res {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mxscope-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mxscope-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mxscope-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mxscope-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn git_commit(repo: &std::path::Path) -> String {
    std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

async fn run(args: Args) -> Result<()> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("repository root")?
        .to_path_buf();
    let scratch = tempfile::Builder::new()
        .prefix("mxscope-bench-")
        .tempdir()
        .context("create scratch dir")?;
    let ctx = Ctx {
        mode: args.mode,
        dir: scratch.path().to_path_buf(),
        repo: repo.clone(),
        rows: args.rows,
    };
    let wanted = |name: &str| args.only.as_deref().is_none_or(|o| o == name);
    let mut report = Report::new(args.mode, &git_commit(&repo));
    eprintln!("mxscope-bench: scratch dir {}", ctx.dir.display());

    let mut fleet_db = None;
    if wanted("ingest") {
        eprintln!("mxscope-bench: ingest");
        let (s, db) = bench::ingest::run(&ctx).await;
        fleet_db = db;
        report.sections.push(s);
    }
    if wanted("query") {
        eprintln!("mxscope-bench: query");
        report
            .sections
            .push(bench::query::run(&ctx, fleet_db.take()).await);
    }
    if wanted("latency") {
        eprintln!("mxscope-bench: latency");
        report.sections.push(bench::latency::run(&ctx).await);
    }
    if wanted("agent-cost") {
        eprintln!("mxscope-bench: agent cost and footprint");
        let (cost, foot) = bench::agent_cost::run(&ctx).await;
        report.sections.push(cost);
        report.sections.push(foot);
    }
    if wanted("timing") {
        eprintln!("mxscope-bench: timing accuracy");
        report.sections.push(bench::timing::run(&ctx).await);
    }
    if wanted("pg-ingest") {
        eprintln!("mxscope-bench: PostgreSQL ingest");
        report.sections.push(bench::pg_ingest::run(&ctx).await);
    }
    if wanted("dashboard") {
        eprintln!("mxscope-bench: dashboard in a browser");
        report.sections.push(bench::dashboard::run(&ctx).await);
    }
    report.proposals = bench::proposals(&report);

    let text = report.render();
    println!("{text}");
    std::fs::write(&args.out, &text).with_context(|| format!("write {}", args.out.display()))?;
    eprintln!("mxscope-bench: wrote {}", args.out.display());
    let failed = report
        .sections
        .iter()
        .flat_map(|s| &s.verdicts)
        .any(|(_, v)| matches!(v, Verdict::Failed(_)));
    if failed && args.mode == Mode::Smoke {
        bail!("a benchmark did not run (see the report)");
    }
    Ok(())
}
