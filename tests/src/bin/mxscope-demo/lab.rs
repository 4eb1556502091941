//! The default demo: the project's lab (`deploy/lab/lab`, three regions with their own round-trip
//! times, port 25 dropped from ap-south at the router), Postfix and nsd in the lab's mail host,
//! `demo.test` with a primary MX that works and a backup MX that is down, a collector with mTLS,
//! online signing and an HTTP port, one agent per region joining with a token; then `status`,
//! `matrix` and `diagnose demo.test` once the cross-regional picture is in.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mxscope_tests::binaries::{mxscope_binary, AGENT};
use mxscope_tests::certs::{TestCa, Validity};
use mxscope_tests::lab::path_str;
use mxscope_tests::mxscope::Ctl;
use mxscope_tests::net::{free_port, is_listening};
use mxscope_tests::netlab::{pki_for, require_prerequisites, LabCollector, NetLab, Region};
use mxscope_tests::nsd::{MailZone, Nsd, Zone};
use mxscope_tests::postfix::{Postfix, PostfixConfig, PostfixPorts};
use mxscope_tests::process::{Proc, Spec};
use mxscope_tests::wait::wait_for;
use mxscope_tests::Lab;
use serde_json::Value;

use super::{agents_running, reprint_until_stopped, Args, STOP_GRACE};

/// The lab's regions: `name:rtt_ms[:block25]` (deploy/lab/lab `--regions`).
const REGIONS: &str = "eu-west:10 us-east:60 ap-south:150:block25";
/// The region whose provider blocks outbound port 25 (the `block25` above).
const BLOCKED: &str = "ap-south";
const DOMAIN: &str = "demo.test";
const PRIMARY_MX: &str = "mx.demo.test";
const BACKUP_MX: &str = "mx2.demo.test";
/// A reference mail domain served by the same Postfix, labelled `canary=true`: a region that
/// cannot reach it either is told apart as its agent's own network.
const CANARY: &str = "canary.test";
/// The lab's mail host: nsd and Postfix.
const MAIL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The backup MX: an address of the mail host where nothing listens (connection refused).
const BACKUP_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// Bound for the lab lock when another lab test or benchmark holds it.
const LOCK_WAIT: Duration = Duration::from_secs(600);
/// Bound for the picture: first results, two failures per series (`--fail-after 2`), the
/// canary's verdict on ap-south.
const PICTURE_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs the lab demo until Ctrl-C (or once with `--once`); everything it started is stopped and
/// the lab brought down when it returns, also on error (drop order: agents, collector, servers,
/// lab, temp dir).
pub(crate) fn run(args: &Args, dir: &Path) -> Result<()> {
    if let Err(e) = require_prerequisites() {
        bail!(
            "the demo's lab (deploy/lab/lab) cannot be built here: {e:#}\n(deploy/demo/run \
             installs the Debian packages it needs; to probe real domains from this host \
             instead, without the lab: deploy/demo/run DOMAIN…)"
        );
    }
    let delayline = mxscope_binary("mxscope-delayline")?;
    // This run's CA, database, agent state and logs.
    let run_dir = dir.join(format!("run-{}", std::process::id()));
    let logs = &run_dir.join("logs");
    std::fs::create_dir_all(logs)?;

    // Server files in /tmp (world-traversable: Postfix drops privileges), removed at the end.
    let tmp = Lab::new("demo")?;
    let state = tmp.subdir("lab-state")?;
    eprintln!("demo: deploy/lab/lab up --regions \"{REGIONS}\" (waits for other labs to go down)");
    let net = NetLab::up_with(&state, &delayline, LOCK_WAIT, REGIONS)?;
    eprintln!(
        "demo: lab {} is up: namespaces {}-* (deploy/lab/lab env --state {})",
        net.env("LAB_PREFIX")?,
        net.env("LAB_PREFIX")?,
        state.display()
    );
    interrupted()?;
    let mail_ns = net.mail_ns()?.to_string();
    if net.mail_ip()? != MAIL {
        bail!("the lab's mail host is {}, not {MAIL}", net.mail_ip()?);
    }
    net.add_mail_addr(BACKUP_IP)?;

    eprintln!("demo: starting nsd on {MAIL}:53 in the mail namespace ({DOMAIN}, {CANARY})");
    let dns = SocketAddr::from((MAIL, 53));
    let _nsd = Nsd::start_at(&tmp, &zones(), dns, Some(&mail_ns))?;
    let probe_ca = TestCa::new(&tmp.subdir("probe-ca")?)?;
    let cert = probe_ca.issue("mx", &[PRIMARY_MX], Validity::Valid)?;
    eprintln!("demo: starting postfix on {MAIL}:25 and :587 in the mail namespace ({PRIMARY_MX})");
    let _postfix = Postfix::start(
        &tmp,
        "mx",
        PostfixConfig::new(MAIL, PRIMARY_MX).cert(cert).in_netns(
            &mail_ns,
            PostfixPorts {
                smtp: 25,
                submission: 587,
                smtps: None,
            },
        ),
    )?;
    interrupted()?;

    // The collector on the lab side of the root namespace: mTLS, online signing, HTTP.
    let collector_ip = net.collector_ip()?;
    let pki = pki_for(&run_dir.join("ca"), collector_ip)?;
    let admin = pki.admin(&run_dir, "demo", false)?;
    let http = match args.http {
        Some(addr) => addr,
        None => SocketAddr::from((Ipv4Addr::LOCALHOST, free_port(Ipv4Addr::LOCALHOST)?)),
    };
    let db = run_dir.join("mxscope.db");
    eprintln!(
        "demo: starting collector on {collector_ip} with mTLS and online signing, --http {http} \
         (db {})",
        db.display()
    );
    let ca_key = path_str(&pki.dir.join("ca.key"))?;
    let http_arg = http.to_string();
    let mut collector = LabCollector::start_with_db(
        logs,
        collector_ip,
        &pki,
        &path_str(&db)?,
        &[
            "--ca-key",
            &ca_key,
            "--http",
            &http_arg,
            "--fail-after",
            "2",
            "--recover-after",
            "2",
        ],
    )?;
    wait_for(
        &format!("the collector's HTTP port {http}"),
        Duration::from_secs(30),
        || Ok(is_listening(http).then_some(())),
    )?;
    let ctl = Ctl::with_identity(&collector.url(), &admin)?;

    // Central targets, pushed to every agent.
    for add in [
        vec![
            "target",
            "add",
            DOMAIN,
            "--checks",
            "mx,smtp",
            "--every",
            "2s",
            "--probe-timeout",
            "3s",
        ],
        vec![
            "target",
            "add",
            CANARY,
            "--checks",
            "smtp",
            "--every",
            "2s",
            "--probe-timeout",
            "3s",
            "--label",
            "canary=true",
        ],
    ] {
        eprintln!("demo: mxscopectl {}", add.join(" "));
        ctl.run(&add)?;
    }

    let mut agents = Vec::new();
    for region in net.regions() {
        agents.push(start_agent(
            &ctl, &collector, region, &run_dir, logs, dns, &probe_ca,
        )?);
    }

    eprintln!(
        "demo: waiting for the cross-regional picture: {BLOCKED} failing port 25, the others \
         ok, the backup MX {BACKUP_MX} down"
    );
    let mut last = Picture::default();
    let waited = wait_for("the cross-regional picture", PICTURE_TIMEOUT, || {
        agents_running(&mut agents)?;
        if !collector.proc.is_running() {
            bail!("the collector exited:\n{}", collector.proc.log_tail(30));
        }
        last = Picture::read(&ctl);
        Ok(last.complete().then_some(()))
    });
    for a in &agents {
        if a.log().contains("enrolled with the collector") {
            eprintln!("demo: {} enrolled with its token", a.name());
        }
    }
    let print = || print_all(&net, &ctl, http);
    match waited {
        Ok(()) => print()?,
        Err(e) if stop_requested() => return Err(e),
        Err(e) => {
            print()?;
            let missing = last.missing().join("; ");
            if args.once {
                bail!(
                    "{e:#}: {missing}\ncollector log:\n{}",
                    collector.proc.log_tail(20)
                );
            }
            eprintln!("demo: {e:#} ({missing}); showing what is in");
        }
    }

    if !args.once {
        reprint_until_stopped(print)?;
    }

    eprintln!("demo: stopping agents, collector and servers, then the lab");
    for a in agents.iter_mut() {
        let _ = a.signal(libc::SIGTERM);
    }
    for mut a in agents {
        let _ = a.terminate(STOP_GRACE);
    }
    let _ = collector.proc.terminate(STOP_GRACE);
    // The servers, then `lab down` (NetLab), then the temp dir, in reverse order of creation.
    Ok(())
}

/// True once Ctrl-C (or SIGTERM) arrived.
fn stop_requested() -> bool {
    super::STOP.load(std::sync::atomic::Ordering::SeqCst)
}

/// Fails when Ctrl-C arrived, so the setup stops at the next step and tears down what it made.
fn interrupted() -> Result<()> {
    if stop_requested() {
        bail!("interrupted");
    }
    Ok(())
}

/// `demo.test` (MX 10 the Postfix, MX 20 an address that refuses), the canary (MX the same
/// Postfix) and the reverse zone of the mail host's addresses.
fn zones() -> Vec<Zone> {
    let reverse = "0.18.198.in-addr.arpa";
    vec![
        MailZone::new(DOMAIN)
            .mx(10, "mx", &[MAIL])
            .mx(20, "mx2", &[BACKUP_IP])
            .build(),
        MailZone::new(CANARY).mx_host(10, PRIMARY_MX).build(),
        Zone {
            name: reverse.to_string(),
            text: format!(
                "$ORIGIN {reverse}.\n$TTL 300\n\
                 @ IN SOA ns1.{DOMAIN}. hostmaster.{DOMAIN}. 1 3600 600 86400 300\n\
                 @ IN NS ns1.{DOMAIN}.\n\
                 2 IN PTR {PRIMARY_MX}.\n\
                 3 IN PTR {BACKUP_MX}.\n"
            ),
        },
    ]
}

/// `mxscopectl token create` for the region, then `mxscope-agent --enroll TOKEN` inside the
/// region's namespace, resolving with the lab's nsd and trusting the lab's mail CA.
fn start_agent(
    ctl: &Ctl,
    collector: &LabCollector,
    region: &Region,
    run_dir: &Path,
    logs: &Path,
    dns: SocketAddr,
    probe_ca: &TestCa,
) -> Result<Proc> {
    let id = format!("demo-{}", region.name);
    let token: Value = serde_json::from_str(&ctl.run(&[
        "token",
        "create",
        "--region",
        &region.name,
        "--id",
        &id,
        "--ttl",
        "10m",
        "--format",
        "json",
    ])?)?;
    let token = token["token"]
        .as_str()
        .context("token create printed no token")?;
    let state: PathBuf = run_dir.join(format!("state-{id}"));
    eprintln!(
        "demo: in {} ({}, {} ms{}): mxscope-agent --enroll <token> --state-dir {}",
        region.name,
        region.ip,
        region.rtt_ms,
        if region.block25 {
            ", port 25 blocked"
        } else {
            ""
        },
        state.display()
    );
    let spec = Spec::new(format!("agent-{id}"), mxscope_binary(AGENT)?)
        .in_netns(region.ns.as_str())
        .args([
            "--collector".to_string(),
            collector.url(),
            "--enroll".into(),
            token.to_string(),
            "--state-dir".into(),
            path_str(&state)?,
            "--resolver".into(),
            dns.to_string(),
            "--ca-file".into(),
            path_str(probe_ca.ca_file())?,
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    Proc::spawn(spec, logs)
}

/// What the collector says about the demo domain, as far as the demo waits for it.
#[derive(Debug, Default)]
struct Picture {
    /// Region → state of `demo.test`'s smtp matrix row (mail flow).
    states: Vec<(String, String)>,
    /// A `redundancy` finding names the backup MX.
    backup_down: bool,
    /// The blocked region is named: as its agent's own network, or as not flowing.
    blocked_named: bool,
}

impl Picture {
    /// One look at `matrix --check smtp` and `diagnose demo.test`; what fails to answer is empty.
    fn read(ctl: &Ctl) -> Picture {
        let json = |args: &[&str]| -> Option<Value> {
            let mut all = args.to_vec();
            all.extend(["--format", "json"]);
            serde_json::from_str(&ctl.run(&all).ok()?).ok()
        };
        let mut p = Picture::default();
        if let Some(m) = json(&["matrix", "--check", "smtp"]) {
            let row = m.as_array().and_then(|rows| {
                rows.iter()
                    .find(|r| r["target"] == DOMAIN && r["check"] == "smtp")
            });
            if let Some(states) = row.and_then(|r| r["states"].as_object()) {
                p.states = states
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
            }
        }
        if let Some(d) = json(&["diagnose", DOMAIN]) {
            let findings = d["findings"].as_array().cloned().unwrap_or_default();
            let names_region = |f: &Value| {
                f["regions"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r == BLOCKED))
            };
            p.backup_down = findings.iter().any(|f| {
                f["kind"] == "redundancy"
                    && f["summary"].as_str().is_some_and(|s| s.contains(BACKUP_MX))
            });
            p.blocked_named = findings.iter().any(|f| {
                matches!(f["kind"].as_str(), Some("agent_network" | "mail_flow")) && names_region(f)
            });
        }
        p
    }

    fn state(&self, region: &str) -> &str {
        self.states
            .iter()
            .find(|(r, _)| r == region)
            .map_or("", |(_, s)| s.as_str())
    }

    /// The blocked region's agent at fault (the canary tells), every other region's mail
    /// flowing, the backup MX's loss and the blocked region named by `diagnose`.
    fn complete(&self) -> bool {
        self.missing().is_empty()
    }

    fn missing(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.states.len() < 3 {
            out.push(format!(
                "smtp of {DOMAIN} has results from {} of 3 regions",
                self.states.len()
            ));
        }
        for (region, state) in &self.states {
            let want = if region == BLOCKED { "agent" } else { "ok" };
            if state != want {
                out.push(format!("{region} is {state}, not yet {want}"));
            }
        }
        if !self.backup_down {
            out.push(format!("no redundancy finding for {BACKUP_MX} yet"));
        }
        if !self.blocked_named {
            out.push(format!("diagnose does not name {BLOCKED} yet"));
        }
        if self.state(BLOCKED).is_empty() {
            out.push(format!("no smtp results from {BLOCKED} yet"));
        }
        out
    }
}

/// The lab, `status`, `matrix`, `diagnose demo.test` (explanation first) and the dashboard URL.
fn print_all(net: &NetLab, ctl: &Ctl, http: SocketAddr) -> Result<()> {
    println!("== lab ==");
    for r in net.regions() {
        println!(
            "{:<9} {:<11} rtt {:>4} ms{}",
            r.name,
            r.ip,
            r.rtt_ms,
            if r.block25 {
                "  port 25 blocked at the router (an ISP block)"
            } else {
                ""
            }
        );
    }
    println!(
        "{DOMAIN}: MX 10 {PRIMARY_MX} ({MAIL}, Postfix), MX 20 {BACKUP_MX} ({BACKUP_IP}, down: \
         nothing listens); {CANARY}: MX 10 {PRIMARY_MX}, labelled canary=true"
    );
    println!("== mxscopectl status ==");
    println!("{}", ctl.status_table()?);
    println!("== mxscopectl matrix ==");
    println!("{}", ctl.run(&["matrix"])?);
    println!("== mxscopectl diagnose {DOMAIN} ==");
    println!("{}", ctl.run(&["diagnose", DOMAIN])?);
    println!("dashboard: http://{http}/");
    Ok(())
}
