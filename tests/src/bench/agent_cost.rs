//! Benchmarks 4 and 5, agent cost and footprint: the release `mxscope-agent` with 1,000 host
//! targets (names from a private nsd, all the same private Postfix with a test-CA certificate) doing
//! `smtp` STARTTLS probes and sending them to a collector, side by side with Prometheus
//! `blackbox_exporter` doing the same dialogue through its `tcp` prober via `/probe`, at the same
//! rate, against the same Postfix. CPU from `/proc/PID/stat`, peak RSS from `VmHWM`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mxscope_proto::pb;
use mxscope_tests::binaries::{mxscope_binary, system_tool, AGENT};
use mxscope_tests::certs::{TestCa, Validity};
use mxscope_tests::lab::{path_str, write_file};
use mxscope_tests::net::{free_port, is_listening, unique_loopback};
use mxscope_tests::nsd::{MailZone, Nsd};
use mxscope_tests::postfix::{Postfix, PostfixConfig};
use mxscope_tests::process::{Proc, Spec};
use mxscope_tests::wait::wait_for;
use mxscope_tests::Lab;

use super::collector::{limit_flags, stored_up_to, BenchCollector};
use super::report::{Section, Verdict};
use super::sys::{self, fmt, median};
use super::Ctx;

const AGENT_ID: &str = "bench-cost";

struct Sizes {
    targets: usize,
    interval_s: u64,
    probes: u64,
    windows: usize,
    idle_sample: Duration,
}

/// Runs benchmarks 4 and 5 (one agent process serves both).
pub(crate) async fn run(ctx: &Ctx) -> (Section, Section) {
    let mut cost = Section::new(
        "agent-cost",
        "4. Agent cost per 1,000 smtp STARTTLS probes, vs blackbox_exporter",
        ctx.command("agent-cost"),
        "≤ half of blackbox_exporter's CPU per probe and ≤ half its peak RSS, same server, same dialogue, same number of probes, same run",
    );
    let mut foot = Section::new(
        "footprint",
        "5. Agent footprint",
        ctx.command("agent-cost"),
        "RSS of `mxscope-agent` with 1,000 targets scheduled, between rounds (after the first round) < 30 MiB",
    );
    if let Err(e) = run_inner(ctx, &mut cost, &mut foot).await {
        cost.verdict("run", Verdict::Failed(format!("{e:#}")));
        foot.verdict("run", Verdict::Failed(format!("{e:#}")));
    }
    (cost, foot)
}

fn blackbox_config(ca: &Path) -> Result<String> {
    Ok(format!(
        r#"modules:
  smtp_starttls:
    prober: tcp
    timeout: 5s
    tcp:
      preferred_ip_protocol: ip4
      query_response:
        - expect: "^220"
        - send: "EHLO bench.test\r"
        - expect: "^250-STARTTLS"
        - send: "STARTTLS\r"
        - expect: "^220"
        - starttls: true
        - send: "EHLO bench.test\r"
        - expect: "^250 "
        - send: "QUIT\r"
        - expect: "^221"
      tls_config:
        ca_file: "{}"
        server_name: mx.bench.test
"#,
        path_str(ca)?
    ))
}

/// One `/probe` request to blackbox_exporter; true when it reports `probe_success 1`.
fn blackbox_probe(exporter: SocketAddr, target: SocketAddr) -> Result<bool> {
    let mut s = TcpStream::connect_timeout(&exporter, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    write!(
        s,
        "GET /probe?module=smtp_starttls&target={target} HTTP/1.0\r\nHost: {exporter}\r\n\r\n"
    )?;
    let mut body = String::new();
    s.take(1 << 20).read_to_string(&mut body)?;
    Ok(body.lines().any(|l| l.trim() == "probe_success 1"))
}

/// `count` probes through blackbox_exporter at `rate` per second; returns (CPU s, successes).
async fn blackbox_batch(
    pid: u32,
    exporter: SocketAddr,
    target: SocketAddr,
    count: u64,
    rate: f64,
) -> Result<(f64, u64, f64)> {
    let cpu0 = sys::cpu_seconds(pid)?;
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        ticker.tick().await;
        tasks.spawn_blocking(move || blackbox_probe(exporter, target));
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        if matches!(r, Ok(Ok(true))) {
            ok += 1;
        }
    }
    Ok((
        sys::cpu_seconds(pid)? - cpu0,
        ok,
        start.elapsed().as_secs_f64(),
    ))
}

async fn run_inner(ctx: &Ctx, cost: &mut Section, foot: &mut Section) -> Result<()> {
    let z = if ctx.mode.is_smoke() {
        Sizes {
            targets: 20,
            interval_s: 2,
            probes: 20,
            windows: 1,
            idle_sample: Duration::from_secs(2),
        }
    } else {
        Sizes {
            targets: 1000,
            interval_s: 30,
            probes: 1000,
            windows: 2,
            idle_sample: Duration::from_secs(10),
        }
    };
    let rate = z.targets as f64 / z.interval_s as f64;
    let exporter_bin = system_tool(
        "prometheus-blackbox-exporter",
        "prometheus-blackbox-exporter",
    )?;
    let lab = Lab::new("bench-agent")?;
    let ca = TestCa::new(lab.path())?;
    let cert = ca.issue("mx", &["mx.bench.test", "*.bench.test"], Validity::Valid)?;
    let ip = unique_loopback();
    let postfix = Postfix::start(
        &lab,
        "mx",
        PostfixConfig::new(ip, "mx.bench.test").cert(cert),
    )?;
    let smtp = postfix.smtp_addr();
    let mut zone = MailZone::new("bench.test").record(&format!("mx IN A {ip}"));
    for i in 0..z.targets {
        zone = zone.record(&format!("h{i:04} IN A {ip}"));
    }
    let nsd = Nsd::start(&lab, &[zone.build()])?;

    let flags = limit_flags()?;
    let c = BenchCollector::start(
        lab.path(),
        "collector-agent-cost",
        &lab.path().join("cost.db"),
        &flags,
    )?;
    let mut client = c.query().await?;

    let mut toml = String::new();
    for i in 0..z.targets {
        toml += &format!(
            "[[target]]\nname = \"h{i:04}.bench.test\"\nkind = \"host\"\nchecks = [\"smtp\"]\ninterval = \"{}s\"\nports = {{ smtp = {} }}\n\n",
            z.interval_s,
            smtp.port()
        );
    }
    let config = lab.path().join("agent-cost.toml");
    write_file(&config, toml)?;
    let spec = Spec::new("agent-cost", mxscope_binary(AGENT)?)
        .args([
            "--collector",
            &c.url(),
            "--id",
            AGENT_ID,
            "--region",
            "eu-west",
        ])
        .args([
            "--config",
            &path_str(&config)?,
            "--spool",
            &path_str(&lab.path().join("spool-cost"))?,
        ])
        .args([
            "--resolver",
            &nsd.addr().to_string(),
            "--ca-file",
            &path_str(ca.ca_file())?,
        ])
        .args(["--per-host", "8", "--helo-name", "bench.test"])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1");
    let mut agent = Proc::spawn(spec, lab.path())?;
    let pid = agent.pid().context("agent pid")?;

    // First round: every target probed once.
    let first = z.targets as u64;
    let round_deadline = Instant::now() + Duration::from_secs(3 * z.interval_s + 60);
    loop {
        if !agent.is_running() {
            bail!("agent exited:\n{}", agent.log_tail(30));
        }
        if stored_up_to(&mut client, AGENT_ID).await? >= first {
            break;
        }
        if Instant::now() > round_deadline {
            bail!(
                "first round of {first} probes not stored in time:\n{}",
                agent.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Footprint: RSS between rounds of the first.
    let mut rss = Vec::new();
    let until = Instant::now() + z.idle_sample;
    while Instant::now() < until {
        rss.push(sys::rss_mib(pid)?);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // blackbox_exporter, started now so both are measured in the same conditions.
    let bb_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port(Ipv4Addr::LOCALHOST)?));
    let bb_conf = lab.path().join("blackbox.yml");
    write_file(&bb_conf, blackbox_config(ca.ca_file())?)?;
    let mut bb = Proc::spawn(
        Spec::new("blackbox", exporter_bin)
            .arg(format!("--config.file={}", path_str(&bb_conf)?))
            .arg(format!("--web.listen-address={bb_addr}")),
        lab.path(),
    )?;
    wait_for(
        "blackbox_exporter listening",
        Duration::from_secs(30),
        || {
            if !bb.is_running() {
                bail!("blackbox_exporter exited:\n{}", bb.log_tail(20));
            }
            Ok(is_listening(bb_addr).then_some(()))
        },
    )?;
    let bb_pid = bb.pid().context("blackbox pid")?;
    if !tokio::task::spawn_blocking(move || blackbox_probe(bb_addr, smtp)).await?? {
        bail!(
            "blackbox_exporter's STARTTLS probe does not succeed (see {})",
            bb.log_path().display()
        );
    }

    let mut rows = Vec::new();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for w in 0..z.windows {
        let seq0 = stored_up_to(&mut client, AGENT_ID).await?;
        let cpu0 = sys::cpu_seconds(pid)?;
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(3 * z.interval_s + 60);
        let seq1 = loop {
            let s = stored_up_to(&mut client, AGENT_ID).await?;
            if s >= seq0 + z.probes {
                break s;
            }
            if Instant::now() > deadline || !agent.is_running() {
                bail!(
                    "agent did not finish {} probes in time:\n{}",
                    z.probes,
                    agent.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let a_cpu = sys::cpu_seconds(pid)? - cpu0;
        let a_per_k = a_cpu * 1000.0 / (seq1 - seq0) as f64;
        let a_secs = t0.elapsed().as_secs_f64();
        let (b_cpu, b_ok, b_secs) = blackbox_batch(bb_pid, bb_addr, smtp, z.probes, rate).await?;
        let b_per_k = b_cpu * 1000.0 / z.probes as f64;
        ours.push(a_per_k);
        theirs.push(b_per_k);
        rows.push(vec![
            format!("{}", w + 1),
            format!("{} in {:.1} s", seq1 - seq0, a_secs),
            format!("{a_per_k:.3}"),
            format!("{b_ok}/{} ok in {:.1} s", z.probes, b_secs),
            format!("{b_per_k:.3}"),
            format!("{:.2}", a_per_k / b_per_k.max(1e-9)),
        ]);
    }
    // What the agent's probes found (they must be real STARTTLS successes).
    let recent = client
        .results(pb::ResultsRequest {
            agent_id: AGENT_ID.into(),
            limit: 200,
            ..Default::default()
        })
        .await?
        .into_inner()
        .results;
    let ok = recent
        .iter()
        .filter(|r| {
            r.result
                .as_ref()
                .is_some_and(|r| r.outcome == pb::Outcome::Ok as i32)
        })
        .count();
    let a_hwm = sys::peak_rss_mib(pid)?;
    let b_hwm = sys::peak_rss_mib(bb_pid)?;
    drop(bb);
    drop(agent);
    drop(c);
    drop(nsd);
    drop(postfix);

    let a_med = median(&ours).unwrap_or(f64::NAN);
    let b_med = median(&theirs).unwrap_or(f64::NAN);
    cost.line(format!(
        "Agent: release `mxscope-agent`, {} host targets `h*.bench.test` (private nsd) every {} s = {:.0} probes/s, `smtp` check (banner, EHLO, STARTTLS, TLS 1.3 with certificate verification against the test CA, EHLO, QUIT) against a private Postfix on {ip}, results spooled (fsync) and streamed to a collector whose CPU is not counted; CPU counted over windows of {} stored results after the first round. blackbox_exporter: `tcp` prober, `query_response` expect ^220 / EHLO / expect ^250-STARTTLS / STARTTLS / expect ^220 / starttls / EHLO / expect ^250 / QUIT / expect ^221, CA-verified, driven through `GET /probe?module=smtp_starttls&target={smtp}` on loopback at the same rate. {ok} of the agent's last {} results were ok.",
        z.targets, z.interval_s, rate, z.probes, recent.len()
    ));
    cost.line("");
    cost.table(
        &[
            "window",
            "agent probes",
            "agent CPU s / 1,000",
            "blackbox probes",
            "blackbox CPU s / 1,000",
            "agent / blackbox",
        ],
        &rows,
    );
    cost.table(
        &["", "mxscope-agent", "blackbox_exporter", "ratio"],
        &[
            vec![
                "CPU s per 1,000 probes (median)".into(),
                format!("{a_med:.3}"),
                format!("{b_med:.3}"),
                format!("{:.2}", a_med / b_med),
            ],
            vec![
                "peak RSS (VmHWM) MiB".into(),
                format!("{a_hwm:.1}"),
                format!("{b_hwm:.1}"),
                format!("{:.2}", a_hwm / b_hwm),
            ],
        ],
    );
    cost.verdict(
        "CPU ≤ 0.5 × blackbox",
        Verdict::judge(
            ctx.mode,
            a_med <= 0.5 * b_med,
            format!(
                "{a_med:.3} vs {b_med:.3} CPU s per 1,000 probes = {:.2}×",
                a_med / b_med
            ),
        ),
    );
    cost.verdict(
        "peak RSS ≤ 0.5 × blackbox",
        Verdict::judge(ctx.mode, a_hwm <= 0.5 * b_hwm, format!("{a_hwm:.1} MiB vs {b_hwm:.1} MiB = {:.2}× (the agent holds {} scheduled targets, blackbox none)", a_hwm / b_hwm, z.targets)),
    );

    let rss_med = median(&rss);
    let rss_max = rss.iter().copied().reduce(f64::max);
    foot.line(format!(
        "The same agent process: {} targets scheduled every {} s (start offsets spread over the interval, so between rounds it runs {:.0} probes/s in a trickle, each ~ms long). VmRSS sampled every 500 ms for {:?} right after the first round was stored.",
        z.targets, z.interval_s, rate, z.idle_sample
    ));
    foot.line("");
    foot.table(
        &[
            "samples",
            "VmRSS median MiB",
            "VmRSS max MiB",
            "VmHWM (whole run) MiB",
        ],
        &[vec![
            rss.len().to_string(),
            fmt(rss_med, 1),
            fmt(rss_max, 1),
            format!("{a_hwm:.1}"),
        ]],
    );
    let m = rss_med.unwrap_or(f64::INFINITY);
    foot.verdict(
        "RSS < 30 MiB",
        Verdict::judge(
            ctx.mode,
            m < 30.0,
            format!("median {m:.1} MiB, max {} MiB", fmt(rss_max, 1)),
        ),
    );
    Ok(())
}
