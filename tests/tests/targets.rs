//! Central targets. A collector and three agents (eu-west, us-east,
//! ap-south) against a private Postfix and nsd; `mxscopectl target add` for two regions reaches
//! exactly those agents, `target update` swaps a check, a collector restart keeps the target and
//! reconnected agents hold the current schedule, `target rm` stops the probes while the history
//! stays queryable, and `target list` marks central and agent-local targets by source.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use mxscope_tests::certs::TestCa;
use mxscope_tests::mxscope::{Agent, AgentOptions, Collector, Ctl, ResultRow, TargetConfig};
use mxscope_tests::net::unique_loopback;
use mxscope_tests::nsd::{MailZone, Nsd};
use mxscope_tests::postfix::{Postfix, PostfixConfig};
use mxscope_tests::wait::wait_for;
use mxscope_tests::Lab;

const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];
/// The central target, added for eu-west and us-east only.
const CENTRAL: &str = "example.test";
/// ap-south's agent-local target (from its TOML file).
const LOCAL: &str = "local.test";
/// How long a change may take to reach connected agents.
const PROPAGATION: Duration = Duration::from_secs(2);
/// The central target's interval; results are awaited for a few of these.
const EVERY: Duration = Duration::from_secs(1);
/// Bound for anything expected "within a few intervals" on a shared, loaded machine.
const FEW_INTERVALS: Duration = Duration::from_secs(20);
/// The collector's cap on results per query; the test stays far below it.
const RESULTS_LIMIT: u32 = 10_000;

/// Milliseconds since the Unix epoch of `mxscopectl`'s `start` (`2023-11-14T22:13:20.123Z`).
fn start_ms(row: &ResultRow) -> Result<i64> {
    let s = row
        .extra
        .get("start")
        .and_then(|v| v.as_str())
        .with_context(|| format!("result without a start time: {row:?}"))?;
    let field = |range: std::ops::Range<usize>| -> Result<i64> {
        s.get(range)
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("unexpected start time '{s}'"))
    };
    if s.len() != 24 || !s.ends_with('Z') {
        bail!("unexpected start time '{s}'");
    }
    let (y, m, d) = (field(0..4)?, field(5..7)?, field(8..10)?);
    let (hh, mm, ss, ms) = (
        field(11..13)?,
        field(14..16)?,
        field(17..19)?,
        field(20..23)?,
    );
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms)
}

fn now_ms() -> i64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(d.as_millis()).expect("millis fit i64")
}

/// `results --target NAME --format json` (newest first).
fn results(ctl: &Ctl, target: &str) -> Result<Vec<ResultRow>> {
    let limit = RESULTS_LIMIT.to_string();
    let out = ctl.run(&[
        "results", "--target", target, "--limit", &limit, "--format", "json",
    ])?;
    let rows: Vec<ResultRow> =
        serde_json::from_str(&out).with_context(|| format!("parse results JSON: {out}"))?;
    if rows.len() >= RESULTS_LIMIT as usize {
        bail!("results hit the query limit; the test must stay below it");
    }
    Ok(rows)
}

/// Regions with at least one result of `check` that started at or after `since_ms`.
fn regions_with(rows: &[ResultRow], check: &str, since_ms: i64) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for r in rows.iter().filter(|r| r.check == check) {
        if start_ms(r)? >= since_ms {
            out.insert(r.region.clone());
        }
    }
    Ok(out)
}

/// The JSON of `target list`, as (name, source, regions) per target.
fn target_list(ctl: &Ctl) -> Result<Vec<serde_json::Value>> {
    let out = ctl.run(&["target", "list", "--format", "json"])?;
    serde_json::from_str(&out).with_context(|| format!("parse target list JSON: {out}"))
}

/// A running collector and its agents, checked for liveness on every poll.
struct World {
    collector: Collector,
    agents: Vec<Agent>,
    ctl: Ctl,
}

impl World {
    fn alive(&mut self) -> Result<()> {
        for a in &mut self.agents {
            a.ensure_running()?;
        }
        if !self.collector.proc_mut().is_running() {
            bail!("collector exited:\n{}", self.collector.log_tail(30));
        }
        Ok(())
    }

    /// Polls `results --target` until `done` holds, with every process alive.
    fn wait_results(
        &mut self,
        what: &str,
        target: &str,
        timeout: Duration,
        mut done: impl FnMut(&[ResultRow]) -> Result<bool>,
    ) -> Vec<ResultRow> {
        let mut last = String::new();
        let got = wait_for(what, timeout, || {
            self.alive()?;
            match results(&self.ctl, target) {
                Ok(rows) => {
                    last = format!("{} rows", rows.len());
                    Ok(done(&rows)?.then_some(rows))
                }
                Err(e) => {
                    last = format!("{e:#}");
                    Ok(None)
                }
            }
        });
        got.unwrap_or_else(|e| panic!("{e}\nlast results: {last}\n{}", self.logs()))
    }

    /// Keeps running for `span` while every process stays alive.
    fn run_for(&mut self, span: Duration) {
        let until = Instant::now() + span;
        wait_for("scenario span with all processes alive", span * 2, || {
            self.alive()?;
            Ok((Instant::now() >= until).then_some(()))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }

    fn logs(&self) -> String {
        let mut out = format!("collector log:\n{}\n", self.collector.log_tail(30));
        for a in &self.agents {
            out += &format!("agent {} log:\n{}\n", a.id(), a.log_tail(20));
        }
        out
    }
}

#[test]
fn central_targets_reach_exactly_their_regions_and_follow_every_change() {
    let lab = Lab::new("targets").expect("lab dir");
    let ca = TestCa::new(lab.path()).expect("test CA");

    let mx_ip = unique_loopback();
    let cert = ca.valid_for("mx1", "mx1.example.test").expect("mx1 cert");
    let postfix = Postfix::start(
        &lab,
        "mx1",
        PostfixConfig::new(mx_ip, "mx1.example.test").cert(cert),
    )
    .expect("start private postfix");
    let ports = postfix.ports();
    let zones = [
        MailZone::new(CENTRAL).mx(10, "mx1", &[mx_ip]).build(),
        MailZone::new(LOCAL).mx(10, "mx1", &[mx_ip]).build(),
    ];
    let nsd = Nsd::start(&lab, &zones).expect("start private nsd");

    let dir = lab.subdir("mxscope").expect("mxscope dir");
    let collector = Collector::start(&dir).expect("start collector");
    let ctl = collector.ctl().expect("mxscopectl");

    // Three agents with no targets of their own, except ap-south's one local target.
    let local = TargetConfig::new(LOCAL, &["smtp"])
        .interval("1s")
        .port("smtp", ports.smtp);
    let agents: Vec<Agent> = REGIONS
        .iter()
        .map(|region| {
            let opts = AgentOptions {
                id: format!("agent-{region}"),
                region: region.to_string(),
                collector_url: collector.url(),
                resolver: Some(nsd.addr()),
                ca_file: Some(ca.ca_file().to_path_buf()),
                targets: if *region == "ap-south" {
                    vec![local.clone()]
                } else {
                    vec![]
                },
            };
            Agent::start(&dir, &opts).expect("start agent")
        })
        .collect();
    let mut w = World {
        collector,
        agents,
        ctl,
    };
    let pids: Vec<Option<u32>> = w.agents.iter_mut().map(|a| a.proc_mut().pid()).collect();

    // ap-south is connected and probing its local target before anything central exists.
    w.wait_results("ap-south's local results", LOCAL, FEW_INTERVALS, |rows| {
        Ok(rows.iter().any(|r| r.region == "ap-south"))
    });

    // Names and checks are validated before anything is stored.
    let err = w
        .ctl
        .run(&["target", "add", "bad name!", "--checks", "mx"])
        .expect_err("invalid name refused");
    assert!(
        format!("{err:#}").contains("invalid target name 'bad name!'"),
        "{err:#}"
    );
    let err = w
        .ctl
        .run(&["target", "add", CENTRAL, "--checks", "mx,smpt"])
        .expect_err("unknown check refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("unknown check 'smpt'") && msg.contains("valid: mx, smtp"),
        "{msg}"
    );

    // Add for two regions: both report mx and smtp within a few intervals, ap-south never does.
    let smtp_port = format!("smtp={}", ports.smtp);
    let every = format!("{}s", EVERY.as_secs());
    w.ctl
        .run(&[
            "target",
            "add",
            CENTRAL,
            "--checks",
            "mx,smtp",
            "--regions",
            "eu-west,us-east",
            "--every",
            &every,
            "--probe-timeout",
            "5s",
            "--port",
            &smtp_port,
        ])
        .expect("target add");
    let added_at = now_ms();
    let both: BTreeSet<String> = ["eu-west", "us-east"].map(String::from).into();
    w.wait_results(
        "mx and smtp results from eu-west and us-east",
        CENTRAL,
        FEW_INTERVALS,
        |rows| {
            Ok(regions_with(rows, "mx", added_at)? == both
                && regions_with(rows, "smtp", added_at)? == both)
        },
    );
    w.run_for(EVERY * 3);
    let rows = results(&w.ctl, CENTRAL).expect("results after add");
    assert!(!rows.is_empty());
    let regions: BTreeSet<String> = rows.iter().map(|r| r.region.clone()).collect();
    assert_eq!(regions, both, "only the selected regions probe the target");
    for r in rows.iter().filter(|r| r.check == "smtp") {
        let endpoint = r.extra.get("endpoint").and_then(|v| v.as_str());
        assert!(
            endpoint.is_some_and(|e| e.ends_with(&format!(":{}", ports.smtp))),
            "smtp probes use the port override: {r:?}"
        );
        assert_eq!(r.outcome, "ok", "smtp against the private Postfix: {r:?}");
    }
    let local_rows = results(&w.ctl, LOCAL).expect("local results");
    assert!(
        local_rows
            .iter()
            .any(|r| r.region == "ap-south" && start_ms(r).unwrap() >= added_at),
        "ap-south is alive and probing its local target meanwhile"
    );

    // `target list` shows both, marked by source.
    let list = target_list(&w.ctl).expect("target list");
    assert_eq!(list.len(), 2, "{list:#?}");
    let central = list
        .iter()
        .find(|t| t["name"] == CENTRAL)
        .expect("central target listed");
    assert_eq!(central["source"], "central", "{central}");
    assert_eq!(
        central["regions"],
        serde_json::json!(["eu-west", "us-east"]),
        "{central}"
    );
    let local_t = list
        .iter()
        .find(|t| t["name"] == LOCAL)
        .expect("local target listed");
    assert_eq!(local_t["source"], "local", "{local_t}");
    assert_eq!(
        local_t["regions"],
        serde_json::json!(["ap-south"]),
        "{local_t}"
    );
    assert_eq!(
        local_t["labels"]["mxscope.agent"], "agent-ap-south",
        "{local_t}"
    );

    // Update the checks: submission starts, smtp stops once the change has propagated.
    let submission_port = format!("submission={}", ports.submission);
    w.ctl
        .run(&[
            "target",
            "update",
            CENTRAL,
            "--checks",
            "mx,submission",
            "--port",
            "smtp=",
            "--port",
            &submission_port,
        ])
        .expect("target update");
    let updated_at = now_ms();
    w.wait_results(
        "submission results from eu-west and us-east",
        CENTRAL,
        FEW_INTERVALS,
        |rows| Ok(regions_with(rows, "submission", updated_at)? == both),
    );
    w.run_for(EVERY * 3);
    let rows = results(&w.ctl, CENTRAL).expect("results after update");
    let cutoff = updated_at + PROPAGATION.as_millis() as i64;
    let late_smtp: Vec<&ResultRow> = rows
        .iter()
        .filter(|r| r.check == "smtp" && start_ms(r).unwrap() >= cutoff)
        .collect();
    assert!(
        late_smtp.is_empty(),
        "smtp probes started more than {PROPAGATION:?} after the update: {late_smtp:#?}"
    );
    assert_eq!(
        regions_with(&rows, "mx", cutoff).expect("mx rows"),
        both,
        "the kept check keeps running"
    );
    assert!(
        rows.iter().all(|r| r.region != "ap-south"),
        "ap-south still excluded"
    );

    // A collector crash keeps the target; right after the restart the regions move to
    // us-east and ap-south, and every agent, reconnected, holds exactly that schedule.
    w.collector.proc_mut().kill().expect("SIGKILL collector");
    w.collector
        .crash_and_restart()
        .expect("restart collector on the same db and port");
    let shown = w
        .ctl
        .run(&["target", "show", CENTRAL, "--format", "json"])
        .expect("target show after restart");
    let shown: serde_json::Value = serde_json::from_str(&shown).expect("target show JSON");
    assert_eq!(
        shown["checks"],
        serde_json::json!(["mx", "submission"]),
        "persisted: {shown}"
    );
    w.ctl
        .run(&["target", "update", CENTRAL, "--regions", "us-east,ap-south"])
        .expect("target update regions");
    let moved_at = now_ms();
    let moved: BTreeSet<String> = ["ap-south", "us-east"].map(String::from).into();
    w.wait_results(
        "submission results from us-east and ap-south after the restart",
        CENTRAL,
        FEW_INTERVALS,
        // Both moved regions report; eu-west may still start a probe between the update and its
        // reconnect (it cannot hear of the change while disconnected): that it stops once
        // reconnected, and exactly these two regions go on, is asserted below.
        |rows| Ok(moved.is_subset(&regions_with(rows, "submission", moved_at)?)),
    );
    // Once every agent has its session back, eu-west holds the new schedule too: nothing of
    // the target starts there later than the propagation bound (results it spooled while the
    // collector was down started before).
    wait_for("all three agents reconnected", FEW_INTERVALS, || {
        w.alive()?;
        let rows = w.ctl.agents().unwrap_or_default();
        let connected = rows
            .iter()
            .filter(|a| a.extra.get("connected") == Some(&serde_json::Value::Bool(true)))
            .count();
        Ok((connected == REGIONS.len()).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
    let cutoff = now_ms().max(moved_at) + PROPAGATION.as_millis() as i64;
    w.run_for(EVERY * 4);
    let rows = results(&w.ctl, CENTRAL).expect("results after move");
    let late_eu: Vec<&ResultRow> = rows
        .iter()
        .filter(|r| r.region == "eu-west" && start_ms(r).unwrap() >= cutoff)
        .collect();
    assert!(
        late_eu.is_empty(),
        "eu-west kept probing after it reconnected: {late_eu:#?}"
    );
    assert_eq!(
        regions_with(&rows, "submission", cutoff).expect("rows"),
        moved,
        "us-east and ap-south keep probing"
    );

    // Remove: probes stop everywhere, the history stays queryable, the local target stays.
    let before_rm = results(&w.ctl, CENTRAL).expect("results before rm");
    w.ctl.run(&["target", "rm", CENTRAL]).expect("target rm");
    let removed_at = now_ms();
    let local_seen = local_rows.len();
    w.wait_results(
        "local results keep arriving after the removal",
        LOCAL,
        FEW_INTERVALS,
        |rows| Ok(rows.len() > local_seen + 3),
    );
    w.run_for(EVERY * 3);
    let after_rm = results(&w.ctl, CENTRAL).expect("history after rm");
    let cutoff = removed_at + PROPAGATION.as_millis() as i64;
    let late: Vec<&ResultRow> = after_rm
        .iter()
        .filter(|r| start_ms(r).unwrap() >= cutoff)
        .collect();
    assert!(
        late.is_empty(),
        "probes started more than {PROPAGATION:?} after the removal: {late:#?}"
    );
    assert!(
        after_rm.len() >= before_rm.len(),
        "history kept: {} rows before rm, {} after",
        before_rm.len(),
        after_rm.len()
    );
    let checks: BTreeSet<&str> = after_rm.iter().map(|r| r.check.as_str()).collect();
    assert_eq!(
        checks,
        ["mx", "smtp", "submission"].into(),
        "every check's history is kept"
    );
    let regions: BTreeSet<&str> = after_rm.iter().map(|r| r.region.as_str()).collect();
    assert_eq!(regions, REGIONS.into(), "every region's history is kept");
    let err = w
        .ctl
        .run(&["target", "show", CENTRAL])
        .expect_err("removed target is gone");
    assert!(format!("{err:#}").contains("unknown target"), "{err:#}");
    let list = target_list(&w.ctl).expect("target list after rm");
    let names: Vec<&str> = list.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, [LOCAL], "only the local target is left: {list:#?}");

    // Nothing was restarted for any of this.
    let now: Vec<Option<u32>> = w.agents.iter_mut().map(|a| a.proc_mut().pid()).collect();
    assert_eq!(now, pids, "agents were never restarted");
    w.alive().expect("all processes alive at the end");
}
