//! Benchmark 2, probe → queryable latency: an in-process agent (`mxscope_agent::run_with`, so the
//! real scheduler, spool with fsync and uplink) with a fake prober emitting results at a fixed rate
//! into the real collector process; pollers watch `Status` of sampled targets and record, for each
//! new result, how long after its probe finished it became visible.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use mxscope_agent::config::{parse_targets, AgentConfig, Flags};
use mxscope_agent::probe::CheckSpec;
use mxscope_agent::schedule::Prober;
use mxscope_proto::{pb, CheckKind, Endpoint, Observation, Phase};
use mxscope_tests::lab::path_str;
use tokio_util::sync::CancellationToken;

use super::collector::{limit_flags, stored_up_to, BenchCollector};
use super::report::{Section, Verdict};
use super::sys::{self, fmt, quantile};
use super::Ctx;

/// Emits `per_probe` ok observations (one per "MX address") the moment it is called.
struct FakeProber {
    per_probe: usize,
}

#[async_trait::async_trait]
impl Prober for FakeProber {
    async fn probe(&self, spec: &CheckSpec) -> Vec<Observation> {
        let now = sys::now_us();
        (0..self.per_probe)
            .map(|k| {
                let mut o = Observation::new(
                    &spec.target,
                    Endpoint {
                        host: format!("mx{k}.{}", spec.target),
                        ip: format!("198.18.{}.{}", 200 + k / 250, 1 + k % 250)
                            .parse()
                            .ok(),
                        port: 25,
                    },
                    CheckKind::Smtp,
                    now,
                );
                o.timing(Phase::Connect, Duration::from_micros(900));
                o.timing(Phase::Total, Duration::from_micros(7_000));
                o.message = "221 2.0.0 Bye".into();
                o
            })
            .collect()
    }
}

struct Sizes {
    targets: usize,
    per_probe: usize,
    run: Duration,
    warmup: Duration,
    tracked: usize,
}

/// Runs benchmark 2.
pub(crate) async fn run(ctx: &Ctx) -> Section {
    let title = "2. Probe → queryable latency";
    let target = "at 10,000 results/s, p99 of (result visible through the Query API − probe finished on the agent) < 1 s";
    let mut s = Section::new("latency", title, ctx.command("latency"), target);
    if let Err(e) = run_inner(ctx, &mut s).await {
        s.verdict("run", Verdict::Failed(format!("{e:#}")));
    }
    s
}

async fn run_inner(ctx: &Ctx, s: &mut Section) -> Result<()> {
    let z = if ctx.mode.is_smoke() {
        Sizes {
            targets: 50,
            per_probe: 2,
            run: Duration::from_secs(5),
            warmup: Duration::from_secs(2),
            tracked: 4,
        }
    } else {
        Sizes {
            targets: 1000,
            per_probe: 10,
            run: Duration::from_secs(45),
            warmup: Duration::from_secs(5),
            tracked: 8,
        }
    };
    let nominal = (z.targets * z.per_probe) as f64;
    let flags = limit_flags()?;
    let db = ctx.dir.join("latency.db");
    let c = BenchCollector::start(&ctx.dir, "collector-latency", &db, &flags)?;
    let collector_pid = c.pid()?;
    let agent_id = "bench-latency".to_string();
    let mut toml = String::new();
    for i in 0..z.targets {
        toml += &format!(
            "[[target]]\nname = \"l{i:04}.bench.test\"\nchecks = [\"smtp\"]\ninterval = \"1s\"\n\n"
        );
    }
    let targets = parse_targets("bench-latency.toml", &toml)?;
    let spool = ctx.dir.join("spool-latency");
    let flags_argv = [
        "mxscope-agent".to_string(),
        "--collector".into(),
        c.url(),
        "--id".into(),
        agent_id.clone(),
        "--region".into(),
        "eu-west".into(),
        "--spool".into(),
        path_str(&spool)?,
        "--concurrency".into(),
        "256".into(),
        "--helo-name".into(),
        "bench.test".into(),
    ];
    let mut config = AgentConfig::from_flags(Flags::try_parse_from(flags_argv)?)?;
    config.targets = targets;
    let stop = CancellationToken::new();
    let agent = tokio::spawn(mxscope_agent::run_with(
        config,
        Arc::new(FakeProber {
            per_probe: z.per_probe,
        }),
        stop.clone(),
    ));

    let mut client = c.query().await?;
    let t0 = Instant::now();
    tokio::time::sleep(z.warmup).await;
    let seq0 = stored_up_to(&mut client, &agent_id).await?;
    let cpu0 = sys::cpu_seconds(collector_pid)?;
    let self0 = sys::cpu_seconds(std::process::id())?;
    let measure_start = Instant::now();
    let deadline = measure_start + z.run;

    // One poller per tracked target: Status(target) with a 2 s window (keeps each poll small).
    let mut pollers = tokio::task::JoinSet::new();
    for k in 0..z.tracked {
        let target = format!("l{:04}.bench.test", k * (z.targets / z.tracked.max(1)));
        let mut cl = client.clone();
        pollers.spawn(async move {
            let mut last_seen = 0i64;
            let mut samples = Vec::new();
            let mut polls = 0u64;
            while Instant::now() < deadline {
                let resp = cl
                    .status(pb::StatusRequest {
                        window_ms: 2_000,
                        target: target.clone(),
                        check: "smtp".into(),
                        region: String::new(),
                        offset: 0,
                    })
                    .await;
                let seen_at = sys::now_us();
                polls += 1;
                if let Ok(resp) = resp {
                    let newest = resp
                        .into_inner()
                        .rows
                        .iter()
                        .map(|r| r.last_seen_us)
                        .max()
                        .unwrap_or(0);
                    if newest > last_seen {
                        // The first observation only establishes where we are.
                        if last_seen != 0 {
                            samples.push((seen_at - newest) as f64 / 1000.0);
                        }
                        last_seen = newest;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (samples, polls)
        });
    }
    let mut samples = Vec::new();
    let mut polls = 0u64;
    while let Some(r) = pollers.join_next().await {
        let (s, p) = r?;
        samples.extend(s);
        polls += p;
    }
    let secs = measure_start.elapsed().as_secs_f64();
    let seq1 = stored_up_to(&mut client, &agent_id).await?;
    let cpu = sys::cpu_seconds(collector_pid)? - cpu0;
    let self_cpu = sys::cpu_seconds(std::process::id())? - self0;
    stop.cancel();
    match tokio::time::timeout(Duration::from_secs(30), agent).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => bail!("agent failed: {e}"),
        Ok(Err(e)) => bail!("agent task failed: {e}"),
        Err(_) => bail!("agent did not stop within 30 s"),
    }
    drop(c);
    let _ = t0;
    if samples.is_empty() {
        bail!("no result became visible during the run");
    }
    let achieved = (seq1.saturating_sub(seq0)) as f64 / secs;
    let p50 = quantile(&samples, 0.5);
    let p99 = quantile(&samples, 0.99);
    let max = quantile(&samples, 1.0);
    s.line(format!(
        "An in-process agent (`mxscope_agent::run_with`: the real scheduler, spool with group-commit fsync and uplink) with {} targets at a 1 s interval and a fake prober returning {} observations per probe ({:.0} results/s nominal) streams to the release collector; {} pollers call `Status(target, smtp, window 2 s)` every 20 ms and time, for each new `last_seen_us` (the probe's start = finish, the fake prober returns at once), the wall clock when it first became visible. Each sample is an upper bound: it includes up to one poll period (20 ms + the RPC).",
        z.targets, z.per_probe, nominal, z.tracked
    ));
    s.line("");
    s.table(
        &[
            "results/s stored (achieved)",
            "samples",
            "polls",
            "p50 ms",
            "p99 ms",
            "max ms",
            "collector CPU/s",
            "agent + pollers CPU/s",
        ],
        &[vec![
            format!("{achieved:.0}"),
            samples.len().to_string(),
            polls.to_string(),
            fmt(p50, 1),
            fmt(p99, 1),
            fmt(max, 1),
            format!("{:.2}", cpu / secs),
            format!("{:.2}", self_cpu / secs),
        ]],
    );
    let p99v = p99.unwrap_or(f64::INFINITY);
    let rate_ok = achieved >= 0.95 * nominal;
    s.verdict(
        "p99 < 1 s at 10,000 results/s",
        Verdict::judge(
            ctx.mode,
            p99v < 1000.0 && rate_ok,
            format!(
                "p50 {} ms, p99 {} ms at {achieved:.0} results/s achieved{}",
                fmt(p50, 1),
                fmt(p99, 1),
                if rate_ok {
                    String::new()
                } else {
                    format!(" — below the {nominal:.0}/s asked for")
                }
            ),
        ),
    );
    Ok(())
}
