//! Two collectors on one PostgreSQL database (a private cluster of Debian's `postgresql`), three
//! agents in the lab's regions, each given both collectors. A central target added through
//! collector A reaches an agent connected to B within 2 s (LISTEN/NOTIFY); A is SIGKILLed and
//! restarted while its agents fail over to B, then B the same way; at the end every agent's
//! results are stored exactly once: seqs 1..=N, no gap, no duplicate, N the agent's last seq.
//!
//! Needs root, `ip`, `nft` and `/dev/net/tun`; fails (never skips) without them. The lab is held
//! under an flock (one lab test at a time per machine).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use mxscope_tests::netlab::{
    pki_for, require_prerequisites, start_agent, LabAgentOptions, LabCollector, NetLab,
};
use mxscope_tests::nsd::{MailZone, Nsd};
use mxscope_tests::postfix::{Postfix, PostfixConfig, PostfixPorts};
use mxscope_tests::postgres::Postgres;
use mxscope_tests::process::Proc;
use mxscope_tests::tls::ClientCert;
use mxscope_tests::wait::wait_for;
use mxscope_tests::Lab;

const DOMAIN: &str = "lab.test";
const MX_HOST: &str = "mx.lab.test";
const LOCK_WAIT: Duration = Duration::from_secs(900);
/// Bound for results to show up after a start or a failover, on a loaded 2-core machine.
const SETTLE: Duration = Duration::from_secs(60);
/// The bound: a target added on one collector reaches an agent on the other.
const TARGET_REACH: Duration = Duration::from_secs(2);

/// `mxscopectl … --format json` against `collector` as `admin`.
fn json(collector: &LabCollector, admin: &ClientCert, args: &[&str]) -> serde_json::Value {
    collector
        .ctl_json(admin, args)
        .unwrap_or_else(|e| panic!("mxscopectl {args:?}: {e:#}"))
}

/// Highest seq per agent that `collector` reports stored (`agents`), polled once.
fn marks(collector: &LabCollector, admin: &ClientCert) -> anyhow::Result<BTreeMap<String, u64>> {
    let v = collector.ctl_json(admin, &["agents"])?;
    Ok(v.as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| {
                    Some((
                        r["id"].as_str()?.to_string(),
                        r["stored_up_to_seq"].as_u64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Results each agent must add after a start or failover before the test moves on.
const PROGRESS: u64 = 3;

/// Waits until every agent's mark at `collector` is [`PROGRESS`] above its value in `above`.
fn await_progress(
    what: &str,
    collector: &LabCollector,
    admin: &ClientCert,
    ids: &[String],
    above: &BTreeMap<String, u64>,
    agents: &[Proc],
) -> BTreeMap<String, u64> {
    wait_for(what, SETTLE, || {
        let Ok(now) = marks(collector, admin) else {
            return Ok(None);
        };
        Ok(ids
            .iter()
            .all(|id| {
                now.get(id).copied().unwrap_or(0) >= above.get(id).copied().unwrap_or(0) + PROGRESS
            })
            .then_some(now))
    })
    .unwrap_or_else(|e| {
        let logs: String = agents
            .iter()
            .map(|p| format!("{} log:\n{}\n", p.name(), p.log_tail(15)))
            .collect();
        panic!(
            "{e}\ncollector log:\n{}\n{logs}",
            collector.proc.log_tail(30)
        )
    })
}

#[test]
fn two_collectors_on_postgres_agents_fail_over_and_every_result_is_stored_once() {
    if let Err(e) = require_prerequisites() {
        panic!("the lab test cannot run here: {e:#}");
    }
    let lab = Lab::new("pg-e2e").expect("lab dir");
    let pg = Postgres::start().expect("private postgres cluster");
    let db = pg.create_database("scale").expect("database");
    let state = lab.subdir("lab-state").expect("state dir");
    let net = NetLab::up(
        &state,
        Path::new(env!("CARGO_BIN_EXE_mxscope-delayline")),
        LOCK_WAIT,
    )
    .expect("lab up");
    let mail_ns = net.mail_ns().expect("mail ns").to_string();
    let mail_ip = net.mail_ip().expect("mail ip");
    let regions = net.regions().to_vec();
    assert_eq!(regions.len(), 3, "{regions:?}");

    let zone = MailZone::new(DOMAIN).mx(10, "mx", &[mail_ip]).build();
    let dns = SocketAddr::from((mail_ip, 53));
    let _nsd = Nsd::start_at(&lab, &[zone], dns, Some(&mail_ns)).expect("nsd in the mail ns");
    let _postfix = Postfix::start(
        &lab,
        "mx",
        PostfixConfig::new(mail_ip, MX_HOST).in_netns(
            &mail_ns,
            PostfixPorts {
                smtp: 25,
                submission: 587,
                smtps: None,
            },
        ),
    )
    .expect("postfix in the mail ns");

    // Two collectors on the lab address, one database.
    let collector_ip = net.collector_ip().expect("collector ip");
    let pki = pki_for(&lab.path().join("pki"), collector_ip).expect("ca init");
    let admin = pki.admin(lab.path(), "pg-e2e", false).expect("admin cert");
    let mut a = LabCollector::start_with_db(
        &lab.subdir("collector-a").expect("dir"),
        collector_ip,
        &pki,
        &db,
        &[],
    )
    .expect("collector A");
    let mut b = LabCollector::start_with_db(
        &lab.subdir("collector-b").expect("dir"),
        collector_ip,
        &pki,
        &db,
        &[],
    )
    .expect("collector B");

    // Agents 1 and 2 prefer A, agent 3 prefers B; each is given both.
    let targets_toml = format!(
        "[[target]]\nname = \"{DOMAIN}\"\nchecks = [\"mx\", \"smtp\", \"submission\"]\n\
         interval = \"1s\"\ntimeout = \"3s\"\n"
    );
    let agent_dir = lab.subdir("agents").expect("agents dir");
    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for (i, r) in regions.iter().enumerate() {
        let id = format!("agent-{}", r.name);
        let cert = pki.enroll(lab.path(), &id, &r.name, &[]).expect("enroll");
        let (first, second) = if i < 2 { (&a, &b) } else { (&b, &a) };
        let opts = LabAgentOptions {
            id: id.clone(),
            region: r.clone(),
            collector_url: first.url(),
            cert,
            resolver: dns,
            probe_ca: pki.ca_pem(),
            targets_toml: targets_toml.clone(),
            extra: vec!["--collector".into(), second.url()],
        };
        agents.push(start_agent(&agent_dir, &opts).expect("agent in its region"));
        ids.push(id);
    }
    let none = BTreeMap::new();
    let start = await_progress("results of every agent", &a, &admin, &ids, &none, &agents);
    // Both collectors answer from the one database.
    let at_b = await_progress(
        "the same agents seen by B",
        &b,
        &admin,
        &ids,
        &none,
        &agents,
    );
    assert_eq!(
        at_b.keys().collect::<Vec<_>>(),
        start.keys().collect::<Vec<_>>()
    );

    // Each collector lists every agent as connected, naming the collector it streams to.
    for (asked, name) in [(&a, "A"), (&b, "B")] {
        let listed = json(asked, &admin, &["agents"]);
        for (i, id) in ids.iter().enumerate() {
            let row = listed
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["id"] == id.as_str()))
                .unwrap_or_else(|| panic!("{id} not listed by {name}: {listed}"));
            let via = if i < 2 { &a } else { &b };
            assert_eq!(row["connected"], true, "{name}: {row}");
            let collector = row["collector"].as_str().unwrap_or_default();
            assert!(
                collector.ends_with(&format!(":{}", via.addr.port())),
                "{name} lists {id} on {collector}, want the collector on port {}: {row}",
                via.addr.port()
            );
        }
    }

    // A central target added through A reaches the agent connected to B within 2 s.
    let third = agents.last().expect("three agents");
    let before = third.log();
    let marker = format!("collector={} ", b.url());
    let received = |log: &str| {
        log.lines()
            .filter(|l| l.contains("central schedule received") && l.contains(&marker))
            .filter(|l| l.contains("targets=1"))
            .count()
    };
    let seen_before = received(&before);
    let added = Instant::now();
    json(
        &a,
        &admin,
        &["target", "add", "central.lab.test", "--checks", "mx"],
    );
    let reached = wait_for("the new schedule at the agent on B", SETTLE, || {
        Ok((received(&third.log()) > seen_before).then(|| added.elapsed()))
    })
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", third.log_tail(20)));
    eprintln!("target added on A reached the agent on B after {reached:?}");
    assert!(
        reached <= TARGET_REACH,
        "target change took {reached:?}, want at most {TARGET_REACH:?}"
    );

    // A dies: its agents fail over to B and go on storing there.
    let marks_a = marks(&a, &admin).expect("marks before killing A");
    a.proc.kill().expect("SIGKILL A");
    let killed = Instant::now();
    let after_a = await_progress(
        "new results of every agent through B",
        &b,
        &admin,
        &ids,
        &marks_a,
        &agents,
    );
    eprintln!(
        "every agent stored through B {:?} after A's SIGKILL",
        killed.elapsed()
    );
    a.restart().expect("restart A");

    // B dies: every agent goes on through A.
    b.proc.kill().expect("SIGKILL B");
    let killed = Instant::now();
    await_progress(
        "new results of every agent through A",
        &a,
        &admin,
        &ids,
        &after_a,
        &agents,
    );
    eprintln!(
        "every agent stored through A {:?} after B's SIGKILL",
        killed.elapsed()
    );
    b.restart().expect("restart B");

    // Stop the agents (each drains its spool), then audit the database.
    for p in &mut agents {
        p.terminate(Duration::from_secs(20)).expect("stop agent");
    }
    let audit = pg
        .psql(
            "scale",
            "SELECT a.id, a.stored_up_to_seq, count(r.seq), count(DISTINCT r.seq),
                 coalesce(min(r.seq), 0), coalesce(max(r.seq), 0), a.dropped_total
             FROM agents a LEFT JOIN results r ON r.agent_num = a.num
             GROUP BY a.id, a.stored_up_to_seq, a.dropped_total ORDER BY a.id",
        )
        .expect("audit query");
    eprintln!("audit (id|mark|rows|distinct|min|max|dropped):\n{audit}");
    let rows: Vec<Vec<&str>> = audit.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows.len(), 3, "{audit}");
    for row in &rows {
        let n = |i: usize| row[i].parse::<u64>().expect("number");
        let (mark, count, distinct, min, max, dropped) = (n(1), n(2), n(3), n(4), n(5), n(6));
        assert_eq!(dropped, 0, "no spool drops: {row:?}");
        assert_eq!(count, distinct, "no result stored twice: {row:?}");
        assert_eq!(min, 1, "{row:?}");
        assert_eq!(max, mark, "{row:?}");
        assert_eq!(count, max, "no gap in 1..={max}: {row:?}");
    }
    for (p, id) in agents.iter().zip(&ids) {
        let spool = agent_dir.join(format!("spool-{id}"));
        let (spool, _) =
            mxscope_agent::spool::Spool::open(&spool, 256 << 20).expect("open the agent's spool");
        let stored = rows
            .iter()
            .find(|r| r[0] == id)
            .map(|r| r[1].parse::<u64>().expect("number"))
            .expect("agent in the audit");
        assert_eq!(
            spool.highest_seq(),
            stored,
            "{id}: every seq it made is stored\n{}",
            p.log_tail(10)
        );
        assert_eq!(spool.depth(), 0, "{id}: nothing left unacked");
    }
    let collectors_logs = format!("{}\n{}", a.proc.log(), b.proc.log());
    assert!(
        !collectors_logs.contains("panicked"),
        "a collector panicked:\n{collectors_logs}"
    );
}
