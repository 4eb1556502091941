//! The first end-to-end path: real Postfix + nsd on loopback, a collector and three agents in
//! three regions; status shows ok/refused correctly, and a collector crash loses and duplicates nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use mxscope_tests::certs::TestCa;
use mxscope_tests::mxscope::{Agent, AgentOptions, Collector, Ctl, StatusRow, TargetConfig};
use mxscope_tests::net::{free_port, unique_loopback};
use mxscope_tests::nsd::{MailZone, Nsd};
use mxscope_tests::postfix::{Postfix, PostfixConfig};
use mxscope_tests::wait::wait_for;
use mxscope_tests::Lab;

const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];
const DOMAIN: &str = "example.test";
/// The collector's cap on results per query; the test stays far below it.
const RESULTS_LIMIT: u32 = 10_000;

fn rows_for<'a>(rows: &'a [StatusRow], check: &str, region: &str) -> Vec<&'a StatusRow> {
    rows.iter()
        .filter(|r| r.check == check && r.region == region)
        .collect()
}

/// True when every region has: an `ok` mx row, an `ok` smtp row with reachability 1.0, and a
/// `failing` imap row whose last error is `refused`.
fn status_settled(rows: &[StatusRow]) -> bool {
    REGIONS.iter().all(|region| {
        let mx = rows_for(rows, "mx", region);
        let smtp = rows_for(rows, "smtp", region);
        let imap = rows_for(rows, "imap", region);
        !mx.is_empty()
            && !smtp.is_empty()
            && !imap.is_empty()
            && smtp
                .iter()
                .all(|r| r.state == "ok" && r.reachability == 1.0)
            && imap
                .iter()
                .all(|r| r.state == "failing" && r.last_error.as_deref() == Some("refused"))
    })
}

/// Keeps the scenario running for `span` while checking that every agent stays alive.
fn run_for(span: Duration, agents: &mut [Agent]) {
    let until = Instant::now() + span;
    wait_for(
        "scenario span to pass with all agents alive",
        span * 2,
        || {
            for a in agents.iter_mut() {
                a.ensure_running()?;
            }
            Ok((Instant::now() >= until).then_some(()))
        },
    )
    .expect("agents keep running");
}

fn stored_up_to(ctl: &Ctl) -> BTreeMap<String, u64> {
    ctl.agents()
        .map(|rows| {
            rows.into_iter()
                .map(|r| (r.id, r.stored_up_to_seq))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn three_regions_report_status_and_survive_a_collector_crash() {
    let lab = Lab::new("skeleton").expect("lab dir");
    let ca = TestCa::new(lab.path()).expect("test CA");

    // Postfix on its own loopback address; a port on the same address where nothing listens.
    let mx_ip = unique_loopback();
    let cert = ca.valid_for("mx1", "mx1.example.test").expect("mx1 cert");
    let postfix = Postfix::start(
        &lab,
        "mx1",
        PostfixConfig::new(mx_ip, "mx1.example.test").cert(cert),
    )
    .expect("start private postfix");
    let closed_port = free_port(mx_ip).expect("pick a closed port");

    let zone = MailZone::new(DOMAIN).mx(10, "mx1", &[mx_ip]).build();
    let nsd = Nsd::start(&lab, &[zone]).expect("start private nsd");

    let dir = lab.subdir("mxscope").expect("mxscope dir");
    let mut collector = Collector::start(&dir).expect("start collector");
    let ctl = collector.ctl().expect("mxscopectl");

    let target = TargetConfig::new(DOMAIN, &["mx", "smtp", "imap"])
        .interval("1s")
        .port("smtp", postfix.ports().smtp)
        .port("imap", closed_port);
    let mut agents: Vec<Agent> = REGIONS
        .iter()
        .map(|region| {
            let opts = AgentOptions {
                id: format!("agent-{region}"),
                region: region.to_string(),
                collector_url: collector.url(),
                resolver: Some(nsd.addr()),
                ca_file: Some(ca.ca_file().to_path_buf()),
                targets: vec![target.clone()],
            };
            Agent::start(&dir, &opts).expect("start agent")
        })
        .collect();

    // Results from all three regions arrive and status settles.
    let mut last = String::new();
    let settled = wait_for(
        "status from all three regions",
        Duration::from_secs(90),
        || {
            for a in agents.iter_mut() {
                a.ensure_running()?;
            }
            if !collector.proc_mut().is_running() {
                anyhow::bail!("collector exited:\n{}", collector.log_tail(30));
            }
            match ctl.status() {
                Ok(rows) => {
                    last = format!("{rows:#?}");
                    Ok(status_settled(&rows).then_some(()))
                }
                Err(e) => {
                    last = format!("{e:#}");
                    Ok(None)
                }
            }
        },
    );
    if let Err(e) = settled {
        panic!(
            "{e}\nlast status: {last}\ncollector log:\n{}\nagent log:\n{}",
            collector.log_tail(30),
            agents[0].log_tail(30)
        );
    }
    let rows = ctl.status().expect("status json");
    assert!(!rows.is_empty());
    let regions: BTreeSet<&str> = rows.iter().map(|r| r.region.as_str()).collect();
    assert_eq!(
        regions,
        REGIONS.iter().copied().collect(),
        "regions in status"
    );
    for region in REGIONS {
        for r in rows_for(&rows, "smtp", region) {
            assert_eq!(r.state, "ok", "{r:?}");
            assert_eq!(r.reachability, 1.0, "{r:?}");
            assert!(r.p50_ms.is_some(), "latency for a reachable port: {r:?}");
            assert!(
                r.endpoint.contains(&postfix.ports().smtp.to_string()),
                "{r:?}"
            );
        }
        for r in rows_for(&rows, "imap", region) {
            assert_eq!(r.state, "failing", "{r:?}");
            assert_eq!(r.last_error.as_deref(), Some("refused"), "{r:?}");
            assert_eq!(r.reachability, 0.0, "{r:?}");
        }
    }

    // Crash the collector mid-run (twice, to hit different points of the stream); agents keep
    // probing into their spools meanwhile and resend what was not acked.
    for crash in 1..=2 {
        let before_crash = stored_up_to(&ctl);
        assert_eq!(
            before_crash.len(),
            REGIONS.len(),
            "agents known before crash {crash}"
        );
        collector.proc_mut().kill().expect("SIGKILL collector");
        run_for(Duration::from_secs(4), &mut agents);
        collector
            .crash_and_restart()
            .expect("restart collector on the same db and port");

        // Every agent's stored seq moves well past where it was before the crash: the results
        // spooled during the outage went through.
        wait_for(
            &format!("agents to catch up after restart {crash}"),
            Duration::from_secs(60),
            || {
                for a in agents.iter_mut() {
                    a.ensure_running()?;
                }
                let now = stored_up_to(&ctl);
                Ok(agents
                    .iter()
                    .all(|a| {
                        let before = before_crash.get(a.id()).copied().unwrap_or(0);
                        now.get(a.id()).is_some_and(|&n| n > before + 5)
                    })
                    .then_some(()))
            },
        )
        .unwrap_or_else(|e| panic!("{e}\ncollector log:\n{}", collector.log_tail(40)));
    }

    // Stop agents gracefully; each flushes its spool before exiting.
    for a in agents.iter_mut() {
        a.proc_mut().signal(libc::SIGTERM).expect("SIGTERM agent");
    }
    for a in agents.iter_mut() {
        let status = a
            .proc_mut()
            .wait_exit(Duration::from_secs(30))
            .expect("agent exits after SIGTERM");
        assert!(
            status.success(),
            "agent {} exit: {status}\n{}",
            a.id(),
            a.log_tail(30)
        );
    }

    // Per agent: what the agent produced (its spool) equals what the collector stored, once each.
    let stored_view = stored_up_to(&ctl);
    for a in agents.iter_mut() {
        let spool = a.spool_summary().expect("read agent spool");
        assert!(spool.highest_seq > 0, "agent {} produced results", a.id());
        assert_eq!(spool.dropped_total, 0, "agent {} dropped results", a.id());
        assert_eq!(
            spool.depth,
            0,
            "agent {} left unsent results: {spool:?}",
            a.id()
        );
        let rows = ctl
            .results_of(a.id(), RESULTS_LIMIT)
            .expect("results of agent");
        assert!(!rows.is_empty());
        assert!(
            rows.len() < RESULTS_LIMIT as usize,
            "more results than one query returns"
        );
        let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            seqs.len(),
            "agent {}: duplicated results",
            a.id()
        );
        let expected: BTreeSet<u64> = (1..=spool.highest_seq).collect();
        let missing: Vec<_> = expected.difference(&distinct).collect();
        let unexpected: Vec<_> = distinct.difference(&expected).collect();
        assert!(
            missing.is_empty() && unexpected.is_empty(),
            "agent {}: produced 1..={}, missing {missing:?}, unexpected {unexpected:?}",
            a.id(),
            spool.highest_seq
        );
        assert_eq!(
            stored_view.get(a.id()),
            Some(&spool.highest_seq),
            "stored_up_to_seq"
        );
        assert!(rows
            .iter()
            .all(|r| r.agent_id == a.id() && r.region == a.region()));
    }

    // Graceful collector stop exits 0.
    let status = collector
        .proc_mut()
        .terminate(Duration::from_secs(20))
        .expect("stop collector");
    assert!(status.success(), "collector exit: {status}");
}
