//! The demo behind `deploy/demo/run`. With no domain it runs in the project's lab
//! (`deploy/lab/lab`, see [`lab`]): three regions with their own round-trip times, one of them
//! behind a port-25 block, real Postfix and nsd, a domain whose backup MX is down, a collector
//! and one agent per region joining with enrolment tokens. Given mail domains it probes those
//! from this host with three agents labelled eu-west, us-east and ap-south. With `--postgres` it
//! is the scaled setup behind `deploy/scale/run`: a private PostgreSQL cluster, two collectors on
//! it and the three agents, each given both collectors, enrolled offline.

// The lab scenario lives next to this file (a crate root has no directory of its own).
#[path = "mxscope-demo/lab.rs"]
mod lab;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mxscope_tests::binaries::{mxscope_binary, AGENT};
use mxscope_tests::certs::TestCa;
use mxscope_tests::dovecot::{Dovecot, DovecotConfig};
use mxscope_tests::lab::{path_str, write_file};
use mxscope_tests::mxscope::{agent_toml, Ctl, TargetConfig};
use mxscope_tests::net::unique_loopback;
use mxscope_tests::nsd::{MailZone, Nsd, Zone};
use mxscope_tests::postfix::{Postfix, PostfixConfig};
use mxscope_tests::postgres::{os_user_can_enter, Postgres, OS_USER};
use mxscope_tests::process::{Proc, Spec};
use mxscope_tests::tls::{Pki, TlsCollector};
use mxscope_tests::wait::wait_for;
use mxscope_tests::Lab;

const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];
const DEMO_DOMAIN: &str = "demo.test";
const CHECKS: [&str; 4] = ["mx", "smtp", "submission", "imaps"];
const REPRINT_EVERY: Duration = Duration::from_secs(30);
const FIRST_RESULTS_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound for every agent to stream to collector B once A is stopped (a few reconnect rounds).
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(15);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

const USAGE: &str = "usage: mxscope-demo [--once] [--dir DIR] [--http ADDR] [DOMAIN…]
       mxscope-demo --postgres [--once] [--dir DIR] [DOMAIN…]

With no domain (needs root, nft and /dev/net/tun): brings up the lab (deploy/lab/lab) with
eu-west 10 ms, us-east 60 ms and ap-south 150 ms round-trip time, TCP 25 from ap-south dropped
at the router (an ISP block); Postfix and nsd on the lab's mail host serving demo.test (MX 10
mx.demo.test works, MX 20 mx2.demo.test is down) and canary.test (a reference domain labelled
canary=true); a collector (SQLite under DIR/run-PID, a new CA, mTLS, online signing, --http
ADDR, default 127.0.0.1 and a free port) and an agent in each region joining with an enrolment
token. Prints the lab, `mxscopectl status`, `matrix` and `diagnose demo.test` and the dashboard
URL once ap-south fails port 25 while the others deliver and the backup MX's loss is found,
then every 30 s until Ctrl-C (or exits with --once), stopping everything and bringing the lab
down.

With DOMAIN…: a collector (SQLite under DIR, default ./.demo) and three agents labelled
eu-west, us-east and ap-south on this host that join it with enrolment tokens, probing DOMAIN…
with the checks mx, smtp, submission, imaps; prints `mxscopectl status` once results from all
three regions are in (all three share this host's network: no regional differences).

With --postgres (deploy/scale/run; DIR defaults to ./.scale) it starts a private PostgreSQL
cluster (initdb in DIR, loopback, as the postgres user), two collectors A and B on that one
database (mTLS, no online signing: PostgreSQL has no token enrolment yet) and the three agents,
enrolled offline (mxscopectl enroll), each given both collectors (--collector A --collector B;
us-east has B first, so both collectors have agents), probing DOMAIN… or, with none, a private
Postfix, Dovecot and nsd on loopback. It prints `mxscopectl agents` and `status` from both
collectors, then stops A and shows every agent streaming to B (with --once it exits there;
otherwise A is started again and both are reprinted every 30 s until Ctrl-C).";

#[derive(Debug)]
struct Args {
    once: bool,
    /// The scaled setup: PostgreSQL, two collectors.
    postgres: bool,
    dir: PathBuf,
    /// `--http` of the lab demo's collector (its dashboard); a free loopback port when unset.
    http: Option<SocketAddr>,
    domains: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        once: false,
        postgres: false,
        dir: PathBuf::new(),
        http: None,
        domains: Vec::new(),
    };
    let mut dir = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--once" => args.once = true,
            "--postgres" => args.postgres = true,
            "--dir" => dir = Some(it.next().context("--dir needs a value")?.into()),
            "--http" => {
                let addr = it.next().context("--http needs an address (IP:PORT)")?;
                args.http = Some(addr.parse().with_context(|| format!("--http {addr}"))?);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            s if s.starts_with('-') => bail!("unknown option {s}\n{USAGE}"),
            s => args.domains.push(s.trim_end_matches('.').to_lowercase()),
        }
    }
    args.dir = dir.unwrap_or_else(|| PathBuf::from(if args.postgres { ".scale" } else { ".demo" }));
    if args.http.is_some() && (args.postgres || !args.domains.is_empty()) {
        bail!("--http is for the lab demo (no --postgres, no DOMAIN)\n{USAGE}");
    }
    Ok(args)
}

/// The private mail servers of the offline demo; dropped (stopped) when the demo ends.
struct LocalMail {
    // Field order is drop order: servers first, then the lab dir holding their files.
    _postfix: Postfix,
    _dovecot: Dovecot,
    nsd: Nsd,
    ca_file: PathBuf,
    target: TargetConfig,
    _lab: Lab,
}

fn start_local_mail() -> Result<LocalMail> {
    let lab = Lab::new("demo")?;
    let ca = TestCa::new(lab.path())?;
    let ip = unique_loopback();
    let host = format!("mx1.{DEMO_DOMAIN}");
    let cert = ca.valid_for("mx1", &host)?;
    eprintln!("demo: starting private dovecot on {ip}");
    let dovecot = Dovecot::start(&lab, "mx1", DovecotConfig::new(ip).cert(cert.clone()))?;
    eprintln!("demo: starting private postfix on {ip}");
    let mut pcfg = PostfixConfig::new(ip, &host).cert(cert);
    pcfg.lmtp = Some((DEMO_DOMAIN.to_string(), dovecot.lmtp_socket()));
    pcfg.sasl_socket = Some(dovecot.auth_socket());
    let postfix = Postfix::start(&lab, "mx1", pcfg)?;
    eprintln!("demo: starting private nsd serving {DEMO_DOMAIN}");
    let zone = MailZone::new(DEMO_DOMAIN).mx(10, "mx1", &[ip]).build();
    // A PTR for the MX address too, so the `mx` check's reverse-DNS confirmation holds.
    let reverse = Zone::reverse_v4(ip, &host);
    let nsd = Nsd::start(&lab, &[zone, reverse])?;
    let ports = postfix.ports();
    let target = TargetConfig::new(DEMO_DOMAIN, &CHECKS)
        .interval("10s")
        .port("smtp", ports.smtp)
        .port("submission", ports.submission)
        .port(
            "imaps",
            dovecot.ports().imaps.context("dovecot has no imaps port")?,
        );
    Ok(LocalMail {
        _postfix: postfix,
        _dovecot: dovecot,
        nsd,
        ca_file: ca.ca_file().to_path_buf(),
        target,
        _lab: lab,
    })
}

/// What the agents probe: the given domains, or the private servers (running while this lives).
struct Probed {
    targets: Vec<TargetConfig>,
    resolver: Option<SocketAddr>,
    ca_file: Option<PathBuf>,
    _local: Option<LocalMail>,
}

impl Probed {
    /// `domains` with the demo's checks, or the private servers when there are none.
    fn start(domains: &[String]) -> Result<Probed> {
        if domains.is_empty() {
            let local = start_local_mail()?;
            return Ok(Probed {
                targets: vec![local.target.clone()],
                resolver: Some(local.nsd.addr()),
                ca_file: Some(local.ca_file.clone()),
                _local: Some(local),
            });
        }
        Ok(Probed {
            targets: domains
                .iter()
                .map(|d| TargetConfig::new(d, &CHECKS).interval("30s"))
                .collect(),
            resolver: None,
            ca_file: None,
            _local: None,
        })
    }

    /// `spec` with the agent's target file (`config`, written from `targets`), the private
    /// resolver and CA when there are, and the log settings.
    fn agent_args(&self, spec: Spec, config: &Path) -> Result<Spec> {
        let mut spec = spec
            .args(["--config".to_string(), path_str(config)?])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        if let Some(resolver) = self.resolver {
            spec = spec.args(["--resolver", &resolver.to_string()]);
        }
        if let Some(ca) = &self.ca_file {
            spec = spec.args(["--ca-file", &path_str(ca)?]);
        }
        Ok(spec)
    }
}

/// How far the first results are: (regions with any row, (region, check) pairs with a row).
fn coverage(ctl: &Ctl) -> (usize, usize) {
    let Ok(rows) = ctl.status() else {
        return (0, 0);
    };
    let has = |region: &str, check: Option<&str>| {
        rows.iter()
            .any(|r| r.region == region && check.is_none_or(|c| r.check == c))
    };
    let regions = REGIONS.iter().filter(|r| has(r, None)).count();
    let pairs = REGIONS
        .iter()
        .map(|r| CHECKS.iter().filter(|c| has(r, Some(c))).count())
        .sum();
    (regions, pairs)
}

fn print_status(ctl: &Ctl) -> Result<()> {
    let table = ctl.status_table()?;
    println!("{table}");
    Ok(())
}

/// Calls `print` every [`REPRINT_EVERY`] until Ctrl-C.
fn reprint_until_stopped(mut print: impl FnMut() -> Result<()>) -> Result<()> {
    eprintln!(
        "demo: reprinting every {}s; Ctrl-C stops everything",
        REPRINT_EVERY.as_secs()
    );
    let mut next = Instant::now() + REPRINT_EVERY;
    loop {
        let stopped = wait_for("ctrl-c or the next reprint", REPRINT_EVERY * 2, || {
            Ok(if STOP.load(Ordering::SeqCst) {
                Some(true)
            } else if Instant::now() >= next {
                Some(false)
            } else {
                None
            })
        })?;
        if stopped {
            return Ok(());
        }
        next += REPRINT_EVERY;
        print()?;
    }
}

/// Fails on Ctrl-C, or with its log when an agent has exited.
fn agents_running(agents: &mut [Proc]) -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    for a in agents.iter_mut() {
        if !a.is_running() {
            let status = a.exit_status();
            bail!("{} exited ({status:?}):\n{}", a.name(), a.log_tail(40));
        }
    }
    Ok(())
}

fn run(args: Args) -> Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    if !args.postgres && args.domains.is_empty() {
        return lab::run(&args, &dir);
    }
    let logs = dir.join(format!("logs-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;

    // Servers first so they outlive the agents that probe them (drop order is reverse).
    let probed = Probed::start(&args.domains)?;
    if args.postgres {
        return run_scaled(&args, &dir, &logs, probed);
    }

    // A CA of this run (the collector signs with its key), an admin certificate for mxscopectl.
    let run_dir = dir.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let pki = Pki::init(&run_dir, "ca")?;
    let admin = pki.admin(&run_dir, "demo", false)?;
    let db = dir.join("mxscope.db");
    eprintln!(
        "demo: starting collector with mTLS and online signing (db {})",
        db.display()
    );
    let ca_key = path_str(&pki.dir.join("ca.key"))?;
    let mut collector = TlsCollector::start_with_db(
        &logs,
        &db,
        &pki,
        &["--ca-key", &ca_key, "--http", "127.0.0.1:0"],
    )?;
    let ctl = Ctl::with_identity(&collector.url(), &admin)?;
    let config = run_dir.join("targets.toml");
    write_file(&config, agent_toml(&probed.targets))?;
    let mut agents = Vec::new();
    for region in REGIONS {
        let id = format!("demo-{region}");
        let token: serde_json::Value = serde_json::from_str(&ctl.run(&[
            "token", "create", "--region", region, "--id", &id, "--ttl", "10m", "--format", "json",
        ])?)?;
        let token = token["token"]
            .as_str()
            .context("token create printed no token")?;
        let state = run_dir.join(format!("state-{id}"));
        eprintln!(
            "demo: mxscope-agent --enroll <token> --state-dir {} ({id} in {region})",
            state.display()
        );
        let spec = Spec::new(format!("agent-{id}"), mxscope_binary(AGENT)?).args([
            "--collector".to_string(),
            collector.url(),
            "--enroll".into(),
            token.to_string(),
            "--state-dir".into(),
            path_str(&state)?,
        ]);
        agents.push(Proc::spawn(probed.agent_args(spec, &config)?, &logs)?);
    }

    eprintln!("demo: waiting for results from {}", REGIONS.join(", "));
    let complete = REGIONS.len() * CHECKS.len();
    let waited = wait_for(
        "every check from all three regions",
        FIRST_RESULTS_TIMEOUT,
        || {
            agents_running(&mut agents)?;
            Ok((coverage(&ctl).1 == complete).then_some(()))
        },
    );
    if let Err(e) = waited {
        // Some checks may simply not have reported yet; all three regions are the minimum.
        if coverage(&ctl).0 < REGIONS.len() {
            bail!("{e}\ncollector log:\n{}", collector.proc.log_tail(20));
        }
        eprintln!("demo: {e:#}; showing what is in");
    }
    for a in &agents {
        if a.log().contains("enrolled with the collector") {
            eprintln!("demo: {} enrolled with its token", a.name());
        }
    }
    print_status(&ctl)?;

    if !args.once {
        reprint_until_stopped(|| print_status(&ctl))?;
    }

    eprintln!("demo: stopping agents, collector and servers");
    for a in agents.iter_mut() {
        let _ = a.signal(libc::SIGTERM);
    }
    for mut a in agents {
        let _ = a.terminate(Duration::from_secs(15));
    }
    let _ = collector.proc.terminate(Duration::from_secs(15));
    drop(probed);
    Ok(())
}

/// One collector of the scaled setup and mxscopectl (admin) for it.
struct Node {
    name: &'static str,
    collector: TlsCollector,
    ctl: Ctl,
}

impl Node {
    /// `mxscopectl agents` and `status` of this collector, each under a header line.
    fn print(&self) -> Result<()> {
        self.print_agents()?;
        println!("{}", self.header("status"));
        print_status(&self.ctl)
    }

    fn print_agents(&self) -> Result<()> {
        println!("{}", self.header("agents"));
        println!("{}", self.ctl.run(&["agents"])?);
        Ok(())
    }

    fn header(&self, command: &str) -> String {
        format!(
            "== collector {} ({}): mxscopectl {command} ==",
            self.name,
            self.collector.url()
        )
    }

    /// The (target, endpoint, check, region) rows of `status`.
    fn series(&self) -> Result<BTreeSet<(String, String, String, String)>> {
        Ok(self
            .ctl
            .status()?
            .into_iter()
            .map(|r| (r.target, r.endpoint, r.check, r.region))
            .collect())
    }

    /// The agents holding a stream to this collector now: connected, and the collector they
    /// stream to is this one (its default `--name` ends with its port).
    fn connected(&self) -> Result<BTreeSet<String>> {
        let me = format!(":{}", self.collector.addr.port());
        Ok(self
            .ctl
            .agents()?
            .into_iter()
            .filter(|a| a.extra.get("connected") == Some(&serde_json::Value::Bool(true)))
            .filter(|a| {
                a.extra
                    .get("collector")
                    .and_then(|c| c.as_str())
                    .is_some_and(|c| c.ends_with(&me))
            })
            .map(|a| a.id)
            .collect())
    }

    fn ensure_running(&mut self) -> Result<()> {
        if !self.collector.proc.is_running() {
            bail!(
                "collector {} exited:\n{}",
                self.name,
                self.collector.proc.log_tail(30)
            );
        }
        Ok(())
    }
}

/// `--postgres`: a private PostgreSQL cluster, collectors A and B on one database in it, the
/// three agents enrolled offline and given both collectors; then a failover from A to B.
fn run_scaled(args: &Args, dir: &Path, logs: &Path, probed: Probed) -> Result<()> {
    let run_dir = dir.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;

    // The cluster lives in DIR when the postgres user can reach it (not under a 0700 home).
    let pg_parent = if os_user_can_enter(dir) {
        dir.to_path_buf()
    } else {
        let tmp = std::env::temp_dir();
        eprintln!(
            "demo: the {OS_USER} user cannot enter {}; the cluster goes to {}",
            dir.display(),
            tmp.display()
        );
        tmp
    };
    eprintln!(
        "demo: starting a private PostgreSQL cluster in {} (initdb, 127.0.0.1, as {OS_USER})",
        pg_parent.display()
    );
    let pg = Postgres::start_in(&pg_parent)?;
    let db = pg.create_database("mxscope")?;
    eprintln!(
        "demo: PostgreSQL {} ready, collectors share {db}",
        pg.version()
    );

    // A CA of this run without online signing: token enrolment needs a SQLite --db for now.
    let pki = Pki::init(&run_dir, "ca")?;
    let admin = pki.admin(&run_dir, "demo", false)?;
    let mut nodes = Vec::new();
    for name in ["A", "B"] {
        let log_dir = logs.join(format!("collector-{}", name.to_lowercase()));
        std::fs::create_dir_all(&log_dir)?;
        eprintln!("demo: starting collector {name}: mxscope-collector --db {db} with mTLS");
        let collector =
            TlsCollector::start_with_db(&log_dir, Path::new(&db), &pki, &["--http", "127.0.0.1:0"])
                .with_context(|| format!("collector {name}"))?;
        let ctl = Ctl::with_identity(&collector.url(), &admin)?;
        nodes.push(Node {
            name,
            collector,
            ctl,
        });
    }

    let config = run_dir.join("targets.toml");
    write_file(&config, agent_toml(&probed.targets))?;
    let urls: Vec<String> = nodes.iter().map(|n| n.collector.url()).collect();
    let mut agents = Vec::new();
    for (i, region) in REGIONS.iter().enumerate() {
        let id = format!("demo-{region}");
        let cert = pki.enroll(&run_dir, &id, region, &[])?;
        // Both collectors, in turns A or B first, so both have agents streaming to them.
        let order: Vec<&String> = urls.iter().cycle().skip(i).take(urls.len()).collect();
        let flags: Vec<String> = order.iter().map(|u| format!("--collector {u}")).collect();
        eprintln!(
            "demo: mxscope-agent {} --id {id} --region {region} (certificate from mxscopectl enroll)",
            flags.join(" ")
        );
        let mut spec = Spec::new(format!("agent-{id}"), mxscope_binary(AGENT)?);
        for url in order {
            spec = spec.args(["--collector", url]);
        }
        let spec = spec.args([
            "--id".to_string(),
            id.clone(),
            "--region".into(),
            region.to_string(),
            "--tls-cert".into(),
            path_str(&cert.cert)?,
            "--tls-key".into(),
            path_str(&cert.key)?,
            "--collector-ca".into(),
            path_str(&cert.ca)?,
            "--spool".into(),
            path_str(&run_dir.join(format!("spool-{id}")))?,
        ]);
        agents.push(Proc::spawn(probed.agent_args(spec, &config)?, logs)?);
    }

    eprintln!(
        "demo: waiting for results from {} at both collectors",
        REGIONS.join(", ")
    );
    let complete = REGIONS.len() * CHECKS.len();
    let waited = wait_for(
        "every check from all three regions at both collectors",
        FIRST_RESULTS_TIMEOUT,
        || {
            agents_running(&mut agents)?;
            for n in nodes.iter_mut() {
                n.ensure_running()?;
            }
            Ok(nodes
                .iter()
                .all(|n| coverage(&n.ctl).1 == complete)
                .then_some(()))
        },
    );
    if let Err(e) = waited {
        if nodes.iter().any(|n| coverage(&n.ctl).0 < REGIONS.len()) {
            let logs: Vec<String> = nodes
                .iter()
                .map(|n| {
                    format!(
                        "collector {} log:\n{}",
                        n.name,
                        n.collector.proc.log_tail(20)
                    )
                })
                .collect();
            bail!("{e}\n{}", logs.join("\n"));
        }
        eprintln!("demo: {e:#}; showing what is in");
    }
    for n in &nodes {
        n.print()?;
    }
    let (a, b) = (nodes[0].series()?, nodes[1].series()?);
    if a == b {
        eprintln!(
            "demo: collectors A and B show the same {} status rows from one database",
            a.len()
        );
    } else {
        eprintln!(
            "demo: collector A shows {} status rows, B {} ({} in common)",
            a.len(),
            b.len(),
            a.intersection(&b).count()
        );
    }

    // Failover: A goes away; its agents move to B, the next collector they were given.
    eprintln!("demo: stopping collector A (SIGTERM) to show the agents failing over to B");
    let since = Instant::now();
    let _ = nodes[0].collector.proc.terminate(STOP_GRACE);
    let ids: BTreeSet<String> = REGIONS.iter().map(|r| format!("demo-{r}")).collect();
    let b = &mut nodes[1];
    wait_for(
        "every agent streaming to collector B",
        FAILOVER_TIMEOUT,
        || {
            agents_running(&mut agents)?;
            b.ensure_running()?;
            Ok(b.connected().ok().filter(|c| ids.is_subset(c)).map(|_| ()))
        },
    )?;
    eprintln!(
        "demo: every agent streams to collector B, {:.1}s after stopping A",
        since.elapsed().as_secs_f64()
    );
    b.print_agents()?;

    if !args.once {
        let a = &mut nodes[0];
        a.collector.proc.restart()?;
        a.collector
            .proc
            .wait_listening(a.collector.addr, Duration::from_secs(30))?;
        eprintln!("demo: collector A is back; agents stay with B until it fails");
        reprint_until_stopped(|| {
            for n in &nodes {
                n.print()?;
            }
            Ok(())
        })?;
    }

    eprintln!("demo: stopping agents, collectors, PostgreSQL and servers");
    for a in agents.iter_mut() {
        let _ = a.signal(libc::SIGTERM);
    }
    for mut a in agents {
        let _ = a.terminate(STOP_GRACE);
    }
    for mut n in nodes {
        let _ = n.collector.proc.terminate(STOP_GRACE);
    }
    drop(pg);
    drop(probed);
    Ok(())
}

#[allow(unsafe_code)] // signal(2) for SIGINT/SIGTERM: no std API
fn main() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    let result = parse_args().and_then(run);
    if let Err(e) = result {
        eprintln!("mxscope-demo: {e:#}");
        std::process::exit(1);
    }
}
