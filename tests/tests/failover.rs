//! Failover between collectors. One agent is given two collectors, A and B, each with a database
//! of its own; it probes a closed loopback port every second. Its results go to A; when A is
//! SIGKILLed and B started they go to B within seconds; with A back and B SIGKILLed they go to A
//! again. At the end the two databases together hold every seq the agent gave, none missing.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use mxscope_tests::mxscope::{Agent, AgentOptions, Collector, Ctl, TargetConfig};
use mxscope_tests::net::free_ports;
use mxscope_tests::wait::wait_for;
use mxscope_tests::Lab;

const AGENT_ID: &str = "failover-1";
/// Bound for the agent to reach the other collector: a few backoff rounds at most while the other
/// is starting, on a shared, loaded machine.
const FAILOVER: Duration = Duration::from_secs(15);
/// Bound for the first results after the agent starts.
const FIRST_RESULTS: Duration = Duration::from_secs(30);
/// Far above the results this test makes (one a second).
const RESULTS_LIMIT: u32 = 10_000;

/// The seqs of this agent's results stored by the collector `ctl` asks.
fn seqs(ctl: &Ctl) -> Result<BTreeSet<u64>> {
    Ok(ctl
        .results_of(AGENT_ID, RESULTS_LIMIT)?
        .into_iter()
        .filter(|r| r.agent_id == AGENT_ID)
        .map(|r| r.seq)
        .collect())
}

/// Waits until the collector `ctl` asks holds a result of the agent with a seq above `above`
/// (the agent and the collector alive on every poll); the highest seq stored then.
fn wait_seq_above(
    what: &str,
    ctl: &Ctl,
    collector: &mut Collector,
    agent: &mut Agent,
    above: u64,
    timeout: Duration,
) -> u64 {
    let got = wait_for(what, timeout, || {
        agent.ensure_running()?;
        if !collector.proc_mut().is_running() {
            anyhow::bail!("collector exited:\n{}", collector.log_tail(30));
        }
        // A collector that just started may not answer yet: poll again.
        Ok(seqs(ctl)
            .ok()
            .and_then(|s| s.last().copied())
            .filter(|&top| top > above))
    });
    match got {
        Ok(top) => top,
        Err(e) => panic!(
            "{e}\ncollector log:\n{}\nagent log:\n{}",
            collector.log_tail(30),
            agent.log_tail(40)
        ),
    }
}

fn start_collector(dir: &Path, addr: SocketAddr) -> Collector {
    Collector::start_at(dir, addr, &dir.join("mxscope.db")).expect("start collector")
}

#[test]
fn agent_fails_over_between_collectors_and_back() {
    let lab = Lab::new("failover").expect("lab");
    let (dir_a, dir_b) = (lab.subdir("a").expect("dir"), lab.subdir("b").expect("dir"));
    let agent_dir = lab.subdir("agent").expect("dir");
    let [port_a, port_b, closed] = free_ports::<3>(Ipv4Addr::LOCALHOST).expect("free ports");
    let addr_a = SocketAddr::from((Ipv4Addr::LOCALHOST, port_a));
    let addr_b = SocketAddr::from((Ipv4Addr::LOCALHOST, port_b));

    // A runs; B is given to the agent but not started yet.
    let mut a = start_collector(&dir_a, addr_a);
    let ctl_a = a.ctl().expect("mxscopectl");
    let opts = AgentOptions {
        id: AGENT_ID.to_string(),
        region: "eu-west".to_string(),
        collector_url: a.url(),
        resolver: None,
        ca_file: None,
        targets: vec![TargetConfig::new("127.0.0.1", &["smtp"])
            .interval("1s")
            .port("smtp", closed)],
    };
    let mut agent = Agent::start_with_failover(&agent_dir, &opts, &[format!("http://{addr_b}")])
        .expect("start agent");

    let at_a = wait_seq_above("results at A", &ctl_a, &mut a, &mut agent, 2, FIRST_RESULTS);

    // A crashes and B comes up: the agent's new results arrive at B.
    let a_before_kill = seqs(&ctl_a)
        .expect("results at A")
        .last()
        .copied()
        .unwrap_or(at_a);
    a.proc_mut().kill().expect("SIGKILL A");
    let mut b = start_collector(&dir_b, addr_b);
    let ctl_b = b.ctl().expect("mxscopectl");
    let since = Instant::now();
    wait_seq_above(
        "new results at B",
        &ctl_b,
        &mut b,
        &mut agent,
        a_before_kill,
        FAILOVER,
    );
    eprintln!("failover to B after B was ready: {:?}", since.elapsed());
    let agents_b = b.ctl().and_then(|c| c.agents()).expect("agents at B");
    assert!(
        agents_b
            .iter()
            .any(|r| r.id == AGENT_ID && r.stored_up_to_seq > a_before_kill),
        "B knows the agent: {agents_b:?}"
    );
    // Let B hold more than A ever had, so results back at A are new ones.
    let at_b = wait_seq_above(
        "more results at B",
        &ctl_b,
        &mut b,
        &mut agent,
        a_before_kill + 2,
        FAILOVER,
    );

    // A comes back while B runs (the agent stays with B), then B crashes: back to A at once.
    a.restart().expect("restart A");
    let b_before_kill = seqs(&ctl_b)
        .expect("results at B")
        .last()
        .copied()
        .unwrap_or(at_b);
    b.proc_mut().kill().expect("SIGKILL B");
    let since = Instant::now();
    wait_seq_above(
        "new results back at A",
        &ctl_a,
        &mut a,
        &mut agent,
        b_before_kill,
        FAILOVER,
    );
    eprintln!(
        "failover back to A, which was running: {:?}",
        since.elapsed()
    );

    // Nothing lost on the way: A's and B's databases together hold every seq up to A's newest.
    b.restart().expect("restart B to read its database");
    let (in_a, in_b) = (seqs(&ctl_a).expect("A"), seqs(&ctl_b).expect("B"));
    assert!(
        !in_a.is_empty() && !in_b.is_empty(),
        "A {in_a:?}, B {in_b:?}"
    );
    let top = *in_a.last().expect("not empty");
    let missing: Vec<u64> = (1..=top)
        .filter(|s| !in_a.contains(s) && !in_b.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "seqs in neither database: {missing:?}\nA {in_a:?}\nB {in_b:?}"
    );
    assert!(
        in_b.iter().any(|s| !in_a.contains(s)),
        "B holds results A never had: {in_b:?}"
    );

    agent
        .proc_mut()
        .terminate(Duration::from_secs(15))
        .expect("stop agent");
}
