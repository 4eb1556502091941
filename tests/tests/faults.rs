//! No result lost, none stored twice, under faults. Real collector and
//! agent binaries probe a private Postfix and closed loopback ports every second; the collector
//! and the agents are SIGKILLed at seeded random moments, the collector is stopped, spools are torn,
//! damaged and overfilled, and the collector's disk fills up. At the end, what each agent produced
//! (read from its spool with the agent's own code) is compared seq by seq with what the collector
//! stored.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use mxscope_tests::faults::{
    agent_counts, assert_stored_exactly, count_lines, flip_payload_byte, spool_records, sum_field,
    tear, FaultAgent, SeededRng, Tmpfs,
};
use mxscope_tests::mxscope::{AgentOptions, Collector, Ctl, TargetConfig};
use mxscope_tests::net::{free_port, unique_loopback};
use mxscope_tests::postfix::{Postfix, PostfixConfig};
use mxscope_tests::wait::wait_for;
use mxscope_tests::Lab;

/// Checks probed against closed ports: each run ends in `refused` within a millisecond.
const CLOSED_CHECKS: [&str; 4] = ["smtp", "submission", "imap", "pop3"];

/// One host target on `ip` whose checks all hit closed ports: 4 results a second per agent.
fn closed_ports_target(ip: Ipv4Addr) -> TargetConfig {
    let mut t = TargetConfig::new(&ip.to_string(), &CLOSED_CHECKS).interval("1s");
    for check in CLOSED_CHECKS {
        t = t.port(check, free_port(ip).expect("pick a closed port"));
    }
    t
}

fn options(id: &str, collector_url: &str, targets: Vec<TargetConfig>) -> AgentOptions {
    AgentOptions {
        id: id.to_string(),
        region: format!("r-{id}"),
        collector_url: collector_url.to_string(),
        resolver: None,
        ca_file: None,
        targets,
    }
}

/// Lets `span` pass while every agent stays alive (a bounded wait, not synchronisation).
fn run_for(span: Duration, agents: &mut [FaultAgent]) -> Result<()> {
    let until = Instant::now() + span;
    wait_for("time to pass with all agents alive", span * 2, || {
        for a in agents.iter_mut() {
            a.ensure_running()?;
        }
        Ok((Instant::now() >= until).then_some(()))
    })
}

fn stored_up_to(ctl: &Ctl, id: &str) -> u64 {
    agent_counts(ctl, id)
        .ok()
        .flatten()
        .map(|(s, _)| s)
        .unwrap_or(0)
}

/// Waits until every agent's stored seq is above `above` (its own floor), agents alive.
fn wait_stored_above(
    what: &str,
    ctl: &Ctl,
    agents: &mut [FaultAgent],
    above: &[u64],
    timeout: Duration,
) -> Result<()> {
    wait_for(what, timeout, || {
        for a in agents.iter_mut() {
            a.ensure_running()?;
        }
        Ok(agents
            .iter()
            .zip(above)
            .all(|(a, &floor)| stored_up_to(ctl, a.id()) > floor)
            .then_some(()))
    })
}

/// Stops each agent with SIGTERM, then checks it produced results, dropped none, left nothing
/// unsent, and that the collector stored exactly 1..=highest seq, once each. Returns the
/// highest seqs.
fn stop_and_check_exactly_once(ctl: &Ctl, agents: &mut [FaultAgent]) -> Result<Vec<u64>> {
    for a in agents.iter_mut() {
        a.stop()?;
    }
    let mut highest = Vec::new();
    for a in agents.iter_mut() {
        let s = a.spool_summary()?;
        ensure!(s.highest_seq > 0, "agent {} produced nothing", a.id());
        ensure!(s.dropped_total == 0, "agent {} dropped: {s:?}", a.id());
        ensure!(s.depth == 0, "agent {} left unsent results: {s:?}", a.id());
        assert_stored_exactly(ctl, a.id(), &(1..=s.highest_seq).collect())?;
        ensure!(
            stored_up_to(ctl, a.id()) == s.highest_seq,
            "agent {}: stored_up_to_seq {} != highest seq {}",
            a.id(),
            stored_up_to(ctl, a.id()),
            s.highest_seq
        );
        highest.push(s.highest_seq);
    }
    Ok(highest)
}

/// Every stored result is in the rollups exactly once, at every level, although each SIGKILL
/// lost the rollups the collector still buffered: a 24-hour matrix (read from hour rollups) makes
/// the collector write its buffer, then the rows are summed in the database.
fn check_rollups_cover_every_result(ctl: &Ctl, db: &Path) -> Result<()> {
    ctl.run(&["matrix", "--since", "24h"])?;
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let results: i64 = c.query_row("SELECT count(*) FROM results", [], |r| r.get(0))?;
    ensure!(results > 0, "no results stored");
    for level in [3600, 86_400, 604_800] {
        let rolled: i64 = c.query_row(
            "SELECT coalesce(sum(count), 0) FROM rollups WHERE level = ?1",
            [level],
            |r| r.get(0),
        )?;
        ensure!(
            rolled == results,
            "level {level}: rollups count {rolled} results, {results} are stored"
        );
    }
    eprintln!("rollups at every level count all {results} stored results");
    Ok(())
}

fn fail_with_logs(e: anyhow::Error, collector: &Collector, agents: &[FaultAgent]) -> ! {
    let mut msg = format!("{e:#}\ncollector log:\n{}", collector.log_tail(30));
    for a in agents {
        msg += &format!("\nagent {} log:\n{}", a.id(), a.log_tail(15));
    }
    panic!("{msg}");
}

#[test]
fn three_agents_survive_six_collector_sigkills_at_random_moments() {
    let lab = Lab::new("faults-crash").expect("lab dir");
    let ip = unique_loopback();
    let postfix = Postfix::start(&lab, "mx1", PostfixConfig::new(ip, "mx1.example.test"))
        .expect("start private postfix");
    let dir = lab.subdir("mxscope").expect("mxscope dir");
    let mut collector = Collector::start(&dir).expect("start collector");
    let ctl = collector.ctl().expect("mxscopectl");

    // Postfix's real smtp port plus three closed ports: 4 results a second per agent.
    let target = TargetConfig::new(&ip.to_string(), &["smtp", "submission", "imap", "pop3"])
        .interval("1s")
        .port("smtp", postfix.ports().smtp)
        .port("submission", free_port(ip).expect("port"))
        .port("imap", free_port(ip).expect("port"))
        .port("pop3", free_port(ip).expect("port"));
    let mut agents: Vec<FaultAgent> = ["crash-a", "crash-b", "crash-c"]
        .iter()
        .map(|id| {
            FaultAgent::start(
                &dir,
                &options(id, &collector.url(), vec![target.clone()]),
                &[],
            )
            .expect("start agent")
        })
        .collect();

    let outcome = (|| -> Result<(u32, Vec<u64>)> {
        wait_stored_above(
            "first results from all agents",
            &ctl,
            &mut agents,
            &[0, 0, 0],
            Duration::from_secs(60),
        )?;
        let mut rng = SeededRng::from_env(0x6d78_7363_6f70_6506);
        let mut crashes = 0;
        for _ in 0..6 {
            // Random moment to crash, random downtime before the restart.
            run_for(rng.millis(300, 2500), &mut agents)?;
            collector.proc_mut().kill()?;
            crashes += 1;
            run_for(rng.millis(0, 1500), &mut agents)?;
            collector.crash_and_restart()?;
        }
        // Each agent reconnected (its backoff may have grown to 30 s) and stored well past the
        // last restart, so its spool is flowing again.
        let floors: Vec<u64> = agents
            .iter()
            .map(|a| stored_up_to(&ctl, a.id()) + 8)
            .collect();
        wait_stored_above(
            "agents to catch up after the last restart",
            &ctl,
            &mut agents,
            &floors,
            Duration::from_secs(90),
        )?;
        let highest = stop_and_check_exactly_once(&ctl, &mut agents)?;
        check_rollups_cover_every_result(&ctl, collector.db())?;
        Ok((crashes, highest))
    })();
    match outcome {
        Ok((crashes, highest)) => {
            assert!(crashes >= 5);
            eprintln!(
                "collector SIGKILLs: {crashes}; results per agent (1..=H, each stored once): {highest:?}"
            );
            assert!(
                highest.iter().all(|&h| h >= 40),
                "steady production: {highest:?}"
            );
        }
        Err(e) => fail_with_logs(e, &collector, &agents),
    }
}

#[test]
fn agent_sigkilled_mid_stream_loses_and_duplicates_nothing() {
    let lab = Lab::new("faults-agent-kill").expect("lab dir");
    let dir = lab.subdir("mxscope").expect("mxscope dir");
    let collector = Collector::start(&dir).expect("start collector");
    let ctl = collector.ctl().expect("mxscopectl");
    let target = closed_ports_target(unique_loopback());
    let mut agents = vec![FaultAgent::start(
        &dir,
        &options("killed", &collector.url(), vec![target]),
        &[],
    )
    .expect("start agent")];

    let outcome = (|| -> Result<(u32, Vec<u64>)> {
        wait_stored_above(
            "first results",
            &ctl,
            &mut agents,
            &[0],
            Duration::from_secs(60),
        )?;
        let mut rng = SeededRng::from_env(0x6b69_6c6c);
        let mut kills = 0;
        for _ in 0..5 {
            run_for(rng.millis(500, 2500), &mut agents)?;
            agents[0].proc_mut().kill()?;
            kills += 1;
            agents[0].proc_mut().restart()?;
        }
        let floor = stored_up_to(&ctl, agents[0].id()) + 8;
        wait_stored_above(
            "agent to stream after its last restart",
            &ctl,
            &mut agents,
            &[floor],
            Duration::from_secs(60),
        )?;
        Ok((kills, stop_and_check_exactly_once(&ctl, &mut agents)?))
    })();
    match outcome {
        Ok((kills, highest)) => {
            eprintln!("agent SIGKILLs: {kills}; results (1..=H, each stored once): {highest:?}")
        }
        Err(e) => fail_with_logs(e, &collector, &agents),
    }
}

#[test]
fn everything_produced_while_the_collector_is_down_arrives() {
    let lab = Lab::new("faults-outage").expect("lab dir");
    let dir = lab.subdir("mxscope").expect("mxscope dir");
    let mut collector = Collector::start(&dir).expect("start collector");
    let ctl = collector.ctl().expect("mxscopectl");
    let target = closed_ports_target(unique_loopback());
    let mut agents: Vec<FaultAgent> = ["outage-a", "outage-b"]
        .iter()
        .map(|id| {
            FaultAgent::start(
                &dir,
                &options(id, &collector.url(), vec![target.clone()]),
                &[],
            )
            .expect("start agent")
        })
        .collect();

    let outcome = (|| -> Result<(Vec<u64>, Vec<u64>)> {
        wait_stored_above(
            "first results",
            &ctl,
            &mut agents,
            &[0, 0],
            Duration::from_secs(60),
        )?;
        // Stopped, not crashed: the collector is simply unreachable for a stretch.
        let before: Vec<u64> = agents.iter().map(|a| stored_up_to(&ctl, a.id())).collect();
        let status = collector.proc_mut().terminate(Duration::from_secs(20))?;
        ensure!(status.success(), "collector stop: {status}");
        run_for(Duration::from_secs(8), &mut agents)?;
        collector.proc_mut().restart()?;
        collector.wait_ready()?;
        // At 4 results a second, 8 s of outage is 30+ results per agent.
        let floors: Vec<u64> = before.iter().map(|b| b + 30).collect();
        wait_stored_above(
            "the outage's results to arrive",
            &ctl,
            &mut agents,
            &floors,
            Duration::from_secs(60),
        )?;
        Ok((before, stop_and_check_exactly_once(&ctl, &mut agents)?))
    })();
    match outcome {
        Ok((before, highest)) => eprintln!(
            "stored before the outage: {before:?}; results per agent after it (1..=H, each once): {highest:?}"
        ),
        Err(e) => fail_with_logs(e, &collector, &agents),
    }
}

/// Waits until the spool in `dir` holds at least `n` complete records (the agent is writing).
fn wait_records(dir: &Path, n: usize, agents: &mut [FaultAgent]) -> Result<()> {
    wait_for(
        &format!("{n} records in {}", dir.display()),
        Duration::from_secs(60),
        || {
            for a in agents.iter_mut() {
                a.ensure_running()?;
            }
            Ok((spool_records(dir)?.len() >= n).then_some(()))
        },
    )
}

#[test]
fn torn_and_flipped_spool_records_are_counted_exactly_and_the_rest_delivered() {
    let lab = Lab::new("faults-damage").expect("lab dir");
    let dir = lab.subdir("mxscope").expect("mxscope dir");
    let mut collector = Collector::start(&dir).expect("start collector");
    let ctl = collector.ctl().expect("mxscopectl");
    // Collector down from the start: everything stays in the spools.
    let status = collector
        .proc_mut()
        .terminate(Duration::from_secs(20))
        .expect("stop collector");
    assert!(status.success());
    let target = closed_ports_target(unique_loopback());
    let mut agents: Vec<FaultAgent> = ["torn", "flipped"]
        .iter()
        .map(|id| {
            FaultAgent::start(
                &dir,
                &options(id, &collector.url(), vec![target.clone()]),
                &[],
            )
            .expect("start agent")
        })
        .collect();

    let outcome = (|| -> Result<Vec<(u64, u64)>> {
        for i in 0..agents.len() {
            let spool = agents[i].spool().to_path_buf();
            wait_records(&spool, 12, &mut agents)?;
        }
        for a in agents.iter_mut() {
            a.stop()?;
        }
        // Damage on disk: the torn agent's last record is cut in half, the flipped agent gets one
        // bit flipped in a record in the middle.
        let mut lost = Vec::new();
        for (i, a) in agents.iter_mut().enumerate() {
            let s = a.spool_summary()?;
            let records = spool_records(a.spool())?;
            ensure!(
                records.len() as u64 == s.highest_seq && s.depth == s.highest_seq,
                "agent {}: nothing acked yet, all on disk: {s:?}, {} records",
                a.id(),
                records.len()
            );
            let victim = if i == 0 {
                records.last().cloned()
            } else {
                records.get(records.len() / 2).cloned()
            };
            let victim = victim.ok_or_else(|| anyhow::anyhow!("no records"))?;
            if i == 0 {
                tear(&victim)?;
            } else {
                flip_payload_byte(&victim)?;
            }
            lost.push((s.highest_seq, victim.seq));
        }

        collector.proc_mut().restart()?;
        collector.wait_ready()?;
        for a in agents.iter_mut() {
            a.proc_mut().restart()?;
        }
        // Each agent says how many records it lost, on start and to the collector.
        for a in agents.iter_mut() {
            let id = a.id().to_string();
            wait_for(
                &format!("agent {id} to report its spool repair"),
                Duration::from_secs(30),
                || {
                    a.ensure_running()?;
                    Ok((count_lines(&a.log(), &["spool repaired on open"]) > 0).then_some(()))
                },
            )?;
            let log = a.log();
            ensure!(
                count_lines(&log, &["spool repaired on open", "lost_records=1 "]) == 1,
                "agent {id} reports exactly one lost record:\n{}",
                a.log_tail(20)
            );
        }
        for (a, (highest, _)) in agents.iter().zip(&lost) {
            wait_for(
                &format!("agent {} caught up with dropped_total=1", a.id()),
                Duration::from_secs(60),
                || {
                    Ok(agent_counts(&ctl, a.id())?
                        .is_some_and(|(stored, dropped)| stored > *highest && dropped == 1)
                        .then_some(()))
                },
            )?;
        }
        let mut figures = Vec::new();
        for (a, (highest, victim)) in agents.iter_mut().zip(&lost) {
            a.stop()?;
            let s = a.spool_summary()?;
            ensure!(s.dropped_total == 1 && s.depth == 0, "{}: {s:?}", a.id());
            ensure!(
                s.highest_seq > *highest,
                "{}: new results after the restart",
                a.id()
            );
            // Every record before (and after) the damaged one arrived; the damaged seq never
            // existed at the collector and was not given to a new result.
            let expected: BTreeSet<u64> = (1..=s.highest_seq).filter(|q| q != victim).collect();
            assert_stored_exactly(&ctl, a.id(), &expected)?;
            let (_, dropped) = agent_counts(&ctl, a.id())?.unwrap_or_default();
            ensure!(
                dropped == 1,
                "{}: dropped_total at the collector {dropped}",
                a.id()
            );
            figures.push((s.highest_seq, *victim));
        }
        Ok(figures)
    })();
    match outcome {
        Ok(figures) => eprintln!(
            "(highest seq, lost seq) torn tail then flipped byte: {figures:?}; 1 lost each, rest stored once"
        ),
        Err(e) => fail_with_logs(e, &collector, &agents),
    }
}

#[test]
fn full_spool_drops_the_oldest_and_counts_every_one() {
    let lab = Lab::new("faults-full-spool").expect("lab dir");
    let dir = lab.subdir("mxscope").expect("mxscope dir");
    let mut collector = Collector::start(&dir).expect("start collector");
    let ctl = collector.ctl().expect("mxscopectl");
    let status = collector
        .proc_mut()
        .terminate(Duration::from_secs(20))
        .expect("stop collector");
    assert!(status.success());
    let target = closed_ports_target(unique_loopback());
    // 4 KiB: segments of 1 KiB, a handful of records each.
    let mut agents = vec![FaultAgent::start(
        &dir,
        &options("tiny", &collector.url(), vec![target]),
        &["--spool-max", "4KiB"],
    )
    .expect("start agent")];
    const FULL: &str = "spool full, dropped the oldest unsent results";

    let outcome = (|| -> Result<(u64, u64)> {
        wait_for("the spool to drop twice", Duration::from_secs(60), || {
            agents[0].ensure_running()?;
            Ok((count_lines(&agents[0].log(), &[FULL]) >= 2).then_some(()))
        })?;
        agents[0].stop()?;
        let offline = agents[0].spool_summary()?;
        ensure!(offline.dropped_total > 0, "{offline:?}");
        ensure!(
            offline.dropped_total + offline.depth == offline.highest_seq,
            "every result is either held or counted as dropped: {offline:?}"
        );

        collector.proc_mut().restart()?;
        collector.wait_ready()?;
        agents[0].proc_mut().restart()?;
        wait_stored_above(
            "held results to arrive",
            &ctl,
            &mut agents,
            &[offline.highest_seq],
            Duration::from_secs(60),
        )?;
        let a = &mut agents[0];
        a.stop()?;
        let s = a.spool_summary()?;
        let dropped = s.dropped_total;
        ensure!(s.depth == 0, "{s:?}");
        ensure!(dropped >= offline.dropped_total, "{s:?}");
        // The loss in the log, in the spool and at the collector is the same number.
        let logged = sum_field(&a.log(), FULL, "dropped");
        ensure!(
            logged == dropped,
            "log says {logged} dropped, spool {dropped}"
        );
        let (_, at_collector) = agent_counts(&ctl, a.id())?.unwrap_or_default();
        ensure!(
            at_collector == dropped,
            "mxscopectl agents dropped_total {at_collector}, spool {dropped}"
        );
        // The oldest were dropped: what is stored is exactly the newest produced − dropped.
        let expected: BTreeSet<u64> = (dropped + 1..=s.highest_seq).collect();
        assert_stored_exactly(&ctl, a.id(), &expected)?;
        Ok((s.highest_seq, dropped))
    })();
    match outcome {
        Ok((produced, dropped)) => eprintln!(
            "full spool: produced {produced}, dropped (oldest) {dropped}, stored {}",
            produced - dropped
        ),
        Err(e) => fail_with_logs(e, &collector, &agents),
    }
}

#[test]
fn collector_disk_full_stops_acks_and_resumes_by_itself() {
    let lab = Lab::new("faults-disk-full").expect("lab dir");
    let dir = lab.subdir("mxscope").expect("mxscope dir");
    // The database alone on a small tmpfs; logs and spools stay outside it.
    let tmpfs = Tmpfs::mount(&lab.path().join("dbfs"), "24m").expect("mount tmpfs");
    let db = tmpfs.path().join("mxscope.db");
    let addr = std::net::SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        free_port(Ipv4Addr::LOCALHOST).expect("port"),
    ));
    let mut collector = Collector::start_at(&dir, addr, &db).expect("start collector");
    let ctl = collector.ctl().expect("mxscopectl");
    let target = closed_ports_target(unique_loopback());
    let mut agents: Vec<FaultAgent> = ["full-a", "full-b"]
        .iter()
        .map(|id| {
            FaultAgent::start(
                &dir,
                &options(id, &collector.url(), vec![target.clone()]),
                &[],
            )
            .expect("start agent")
        })
        .collect();
    let db_name = db.display().to_string();

    let outcome = (|| -> Result<(u64, Vec<u64>)> {
        wait_stored_above(
            "first results",
            &ctl,
            &mut agents,
            &[0, 0],
            Duration::from_secs(60),
        )?;
        let filled = tmpfs.fill("filler")?;
        // The writer says once, naming the database, that its disk is full.
        wait_for(
            "the collector to report a full disk",
            Duration::from_secs(90),
            || {
                for a in agents.iter_mut() {
                    a.ensure_running()?;
                }
                ensure!(collector.proc_mut().is_running(), "collector exited");
                Ok((count_lines(
                    &collector.proc_mut().log(),
                    &["disk full", "SQLITE_FULL", &db_name],
                ) > 0)
                    .then_some(()))
            },
        )?;
        // Acks stop: the agents are told (a retryable status naming the full disk) and retry,
        // while the stored seqs stand still.
        let frozen: Vec<u64> = agents.iter().map(|a| stored_up_to(&ctl, a.id())).collect();
        let told: Vec<usize> = agents
            .iter()
            .map(|a| {
                count_lines(
                    &a.log(),
                    &["collector session failed, retrying", "disk full"],
                )
            })
            .collect();
        wait_for(
            "each agent to be refused twice more",
            Duration::from_secs(60),
            || {
                for a in agents.iter_mut() {
                    a.ensure_running()?;
                }
                Ok(agents
                    .iter()
                    .zip(&told)
                    .all(|(a, &n)| {
                        count_lines(
                            &a.log(),
                            &["collector session failed, retrying", "disk full"],
                        ) >= n + 2
                    })
                    .then_some(()))
            },
        )?;
        let still: Vec<u64> = agents.iter().map(|a| stored_up_to(&ctl, a.id())).collect();
        ensure!(
            frozen == still,
            "stored seqs moved on a full disk: {frozen:?} -> {still:?}"
        );
        ensure!(
            count_lines(&collector.log_tail(400), &["ingest resumed"]) == 0,
            "resumed before space came back"
        );

        // Space back: ingest resumes by itself, every held result arrives once.
        std::fs::remove_file(tmpfs.path().join("filler"))?;
        let floors: Vec<u64> = still.iter().map(|s| s + 10).collect();
        wait_stored_above(
            "ingest to resume",
            &ctl,
            &mut agents,
            &floors,
            Duration::from_secs(90),
        )?;
        ensure!(
            count_lines(&collector.proc_mut().log(), &["ingest resumed", &db_name]) > 0,
            "the collector says it resumed"
        );
        Ok((filled, stop_and_check_exactly_once(&ctl, &mut agents)?))
    })();
    match outcome {
        Ok((filled, highest)) => eprintln!(
            "disk full: filler {filled} bytes; results per agent after space came back (1..=H, each once): {highest:?}"
        ),
        Err(e) => fail_with_logs(e, &collector, &agents),
    }
    // Stop the collector before the tmpfs guard unmounts its directory.
    drop(agents);
    drop(collector);
}
