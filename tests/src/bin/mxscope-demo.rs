//! The demo behind `deploy/demo/run`: a collector with mTLS and online signing, and three agents
//! (eu-west, us-east, ap-south) that join it with enrolment tokens, probing the given mail
//! domains, or a private Postfix + Dovecot + nsd on loopback when none.

use std::net::SocketAddr;
use std::path::PathBuf;
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
use mxscope_tests::process::{Proc, Spec};
use mxscope_tests::tls::{Pki, TlsCollector};
use mxscope_tests::wait::wait_for;
use mxscope_tests::Lab;

const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];
const DEMO_DOMAIN: &str = "demo.test";
const CHECKS: [&str; 4] = ["mx", "smtp", "submission", "imaps"];
const REPRINT_EVERY: Duration = Duration::from_secs(30);
const FIRST_RESULTS_TIMEOUT: Duration = Duration::from_secs(120);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

const USAGE: &str = "usage: mxscope-demo [--once] [--dir DIR] [DOMAIN…]

Starts a collector (SQLite under DIR, default ./.demo; a new CA per run, mTLS, online signing)
and three agents labelled eu-west, us-east and ap-south that join it with enrolment tokens
(mxscopectl token create, mxscope-agent --enroll), probing DOMAIN… with the checks mx, smtp,
submission, imaps. With no
domain it starts a private Postfix, Dovecot and nsd on loopback serving demo.test and probes
that. Prints `mxscopectl status` once results from all three regions are in, then every 30 s
until Ctrl-C (or exits right away with --once), stopping everything it started.";

#[derive(Debug)]
struct Args {
    once: bool,
    dir: PathBuf,
    domains: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        once: false,
        dir: PathBuf::from(".demo"),
        domains: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--once" => args.once = true,
            "--dir" => args.dir = it.next().context("--dir needs a value")?.into(),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            s if s.starts_with('-') => bail!("unknown option {s}\n{USAGE}"),
            s => args.domains.push(s.trim_end_matches('.').to_lowercase()),
        }
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

fn run(args: Args) -> Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let logs = dir.join(format!("logs-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;

    // Servers first so they outlive the agents that probe them (drop order is reverse).
    let local = if args.domains.is_empty() {
        Some(start_local_mail()?)
    } else {
        None
    };
    let (targets, resolver, ca_file): (Vec<TargetConfig>, Option<SocketAddr>, Option<PathBuf>) =
        match &local {
            Some(l) => (
                vec![l.target.clone()],
                Some(l.nsd.addr()),
                Some(l.ca_file.clone()),
            ),
            None => (
                args.domains
                    .iter()
                    .map(|d| TargetConfig::new(d, &CHECKS).interval("30s"))
                    .collect(),
                None,
                None,
            ),
        };

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
    write_file(&config, agent_toml(&targets))?;
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
        let mut spec = Spec::new(format!("agent-{id}"), mxscope_binary(AGENT)?)
            .args([
                "--collector".to_string(),
                collector.url(),
                "--enroll".into(),
                token.to_string(),
                "--state-dir".into(),
                path_str(&state)?,
                "--config".into(),
                path_str(&config)?,
            ])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        if let Some(resolver) = resolver {
            spec = spec.args(["--resolver", &resolver.to_string()]);
        }
        if let Some(ca) = &ca_file {
            spec = spec.args(["--ca-file", &path_str(ca)?]);
        }
        agents.push(Proc::spawn(spec, &logs)?);
    }

    eprintln!("demo: waiting for results from {}", REGIONS.join(", "));
    let complete = REGIONS.len() * CHECKS.len();
    let waited = wait_for(
        "every check from all three regions",
        FIRST_RESULTS_TIMEOUT,
        || {
            if STOP.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            for a in agents.iter_mut() {
                if !a.is_running() {
                    let status = a.exit_status();
                    bail!("{} exited ({status:?}):\n{}", a.name(), a.log_tail(40));
                }
            }
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
                break;
            }
            next += REPRINT_EVERY;
            print_status(&ctl)?;
        }
    }

    eprintln!("demo: stopping agents, collector and servers");
    for a in agents.iter_mut() {
        let _ = a.signal(libc::SIGTERM);
    }
    for mut a in agents {
        let _ = a.terminate(Duration::from_secs(15));
    }
    let _ = collector.proc.terminate(Duration::from_secs(15));
    drop(local);
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
