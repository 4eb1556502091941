//! Benchmark 6, timing accuracy: in a lab region with a known injected RTT (`deploy/lab/lab`, TUN
//! delay line), the agent's `connect` timing of `smtp` probes to a listener on the mail host
//! 198.18.0.2, next to a plain `connect(2)` timed from the same namespace (the delay line's own
//! accuracy). The collector runs inside the region namespace on its loopback, read from its db file.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mxscope_tests::binaries::{mxscope_binary, system_tool, AGENT, COLLECTOR};
use mxscope_tests::lab::{path_str, write_file};
use mxscope_tests::process::{run as run_cmd, Proc, Spec};
use mxscope_tests::wait::{wait_for, wait_until};

use super::report::{Section, Verdict};
use super::sys::{fmt, median};
use super::Ctx;

const MAIL_IP: &str = "198.18.0.2";
const SMTP_PORT: u16 = 2525;
const COLLECTOR_PORT: u16 = 7443;

/// Helper mode `--serve-smtp ADDR`: a tiny SMTP responder (220 banner, 250 to EHLO without
/// STARTTLS, 221 to QUIT). Runs until killed.
pub(crate) fn serve_smtp(addr: &str) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("listening on {addr}");
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            let _ = smtp_session(conn);
        });
    }
    Ok(())
}

fn smtp_session(conn: TcpStream) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = conn.try_clone()?;
    out.write_all(b"220 mail.bench.test ESMTP bench\r\n")?;
    let mut lines = BufReader::new(conn).lines();
    while let Some(Ok(line)) = lines.next() {
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" | "HELO" => out.write_all(b"250 mail.bench.test\r\n")?,
            "QUIT" => {
                out.write_all(b"221 bye\r\n")?;
                return Ok(());
            }
            _ => out.write_all(b"502 not here\r\n")?,
        }
    }
    Ok(())
}

/// Helper mode `--connect-times ADDR N`: N plain connects 100 ms apart; prints each in µs.
pub(crate) fn connect_times(addr: &str, n: usize) -> Result<()> {
    let addr: SocketAddr = addr.parse().context("address")?;
    for _ in 0..n {
        let start = Instant::now();
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        println!("{}", start.elapsed().as_micros());
        drop(s);
        // Spacing between timed connects of a plain measuring loop (no runtime here).
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `lab up` / `lab down` around the benchmark, always down at the end.
struct LabGuard {
    script: PathBuf,
    state: PathBuf,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.script)
            .args(["down", "--state"])
            .arg(&self.state)
            .output();
    }
}

fn lab_env(state: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(state.join("lab.env")).context("read lab.env")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect())
}

/// Runs benchmark 6.
pub(crate) async fn run(ctx: &Ctx) -> Section {
    let mut s = Section::new(
        "timing",
        "6. Timing accuracy",
        ctx.command("timing"),
        "median `connect` time measured by the agent within 1 ms of the RTT injected in the lab region",
    );
    let ctx2 = ctx.clone();
    let res = tokio::task::spawn_blocking(move || run_blocking(&ctx2)).await;
    match res {
        Ok(Ok((rows, verdicts, note))) => {
            s.line(note);
            s.line("");
            s.table(
                &[
                    "region",
                    "injected RTT ms",
                    "plain connect() median ms (n)",
                    "agent connect median ms (n)",
                    "agent − injected ms",
                    "agent p10–p90 ms",
                ],
                &rows,
            );
            for (what, v) in verdicts {
                s.verdict(&what, v);
            }
        }
        Ok(Err(e)) => s.verdict("run", Verdict::Failed(format!("{e:#}"))),
        Err(e) => s.verdict("run", Verdict::Failed(e.to_string())),
    }
    s
}

type Outcome = (Vec<Vec<String>>, Vec<(String, Verdict)>, String);

#[allow(unsafe_code)] // geteuid: no std API
fn run_blocking(ctx: &Ctx) -> Result<Outcome> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (network namespaces and TUN devices)");
    }
    let regions: &[(&str, u32)] = if ctx.mode.is_smoke() {
        &[("b10", 10)]
    } else {
        &[("b10", 10), ("b60", 60)]
    };
    let (baseline_n, probes) = if ctx.mode.is_smoke() {
        (5usize, 4usize)
    } else {
        (40, 40)
    };
    let ip = system_tool("ip", "iproute2")?;
    let script = ctx.repo.join("deploy/lab/lab");
    let delayline = mxscope_binary("mxscope-delayline")?;
    let state = ctx.dir.join("lab-state");
    std::fs::create_dir_all(&state)?;
    let spec: Vec<String> = regions.iter().map(|(n, r)| format!("{n}:{r}")).collect();
    let _guard = LabGuard {
        script: script.clone(),
        state: state.clone(),
    };
    run_cmd(
        &script,
        &[
            "up",
            "--state",
            &path_str(&state)?,
            "--delayline",
            &path_str(&delayline)?,
            "--regions",
            &spec.join(" "),
        ],
    )?;
    let env = lab_env(&state)?;
    let get = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let mail_ns = get("LAB_MAIL_NS").context("LAB_MAIL_NS in lab.env")?;
    let me = std::env::current_exe()?;
    let ip_s = path_str(&ip)?;
    let logs = ctx.dir.join("lab-logs");
    std::fs::create_dir_all(&logs)?;
    let listen = format!("{MAIL_IP}:{SMTP_PORT}");
    let server = Proc::spawn(
        Spec::new("lab-smtp", &ip_s)
            .args(["netns", "exec", &mail_ns])
            .arg(path_str(&me)?)
            .args(["--serve-smtp", &listen]),
        &logs,
    )?;
    wait_until("lab smtp responder", Duration::from_secs(10), || {
        server.log().contains("listening")
    })?;

    let mut rows = Vec::new();
    let mut verdicts = Vec::new();
    for (name, rtt) in regions {
        let ns =
            get(&format!("LAB_NS_{name}")).with_context(|| format!("LAB_NS_{name} in lab.env"))?;
        // Plain connect() from the region: the delay line's own figure.
        let out = run_cmd(
            &ip,
            &[
                "netns",
                "exec",
                &ns,
                &path_str(&me)?,
                "--connect-times",
                &listen,
                &baseline_n.to_string(),
            ],
        )?;
        let plain: Vec<f64> = out
            .lines()
            .filter_map(|l| l.trim().parse::<f64>().ok())
            .map(|us| us / 1000.0)
            .collect();

        let db = ctx.dir.join(format!("lab-{name}.db"));
        let _collector = Proc::spawn(
            Spec::new(format!("lab-collector-{name}"), &ip_s)
                .args(["netns", "exec", &ns])
                .arg(path_str(&mxscope_binary(COLLECTOR)?)?)
                .args([
                    "--listen",
                    &format!("127.0.0.1:{COLLECTOR_PORT}"),
                    "--db",
                    &path_str(&db)?,
                    "--insecure",
                ])
                .env("RUST_LOG", "warn"),
            &logs,
        )?;
        let config = logs.join(format!("agent-{name}.toml"));
        write_file(&config, format!("[[target]]\nname = \"{MAIL_IP}\"\nchecks = [\"smtp\"]\ninterval = \"1s\"\nports = {{ smtp = {SMTP_PORT} }}\n"))?;
        let _agent = Proc::spawn(
            Spec::new(format!("lab-agent-{name}"), &ip_s)
                .args(["netns", "exec", &ns])
                .arg(path_str(&mxscope_binary(AGENT)?)?)
                .args([
                    "--collector",
                    &format!("http://127.0.0.1:{COLLECTOR_PORT}"),
                    "--id",
                    &format!("lab-{name}"),
                    "--region",
                    name,
                ])
                .args([
                    "--config",
                    &path_str(&config)?,
                    "--spool",
                    &path_str(&logs.join(format!("spool-{name}")))?,
                    "--helo-name",
                    "bench.test",
                ])
                .env("RUST_LOG", "warn"),
            &logs,
        )?;
        let connects = wait_for(
            &format!("{probes} smtp results from region {name}"),
            Duration::from_secs(probes as u64 * 2 + 60),
            || {
                let got = read_connects(&db).unwrap_or_default();
                Ok((got.len() >= probes).then_some(got))
            },
        )?;
        let agent_med = median(&connects);
        let plain_med = median(&plain);
        let diff = agent_med.map(|m| m - f64::from(*rtt));
        let mut sorted = connects.clone();
        sorted.sort_by(f64::total_cmp);
        let p = |q: f64| super::sys::quantile(&sorted, q);
        rows.push(vec![
            name.to_string(),
            rtt.to_string(),
            format!("{} ({})", fmt(plain_med, 2), plain.len()),
            format!("{} ({})", fmt(agent_med, 2), connects.len()),
            fmt(diff, 2),
            format!("{}–{}", fmt(p(0.1), 2), fmt(p(0.9), 2)),
        ]);
        let d = diff.unwrap_or(f64::INFINITY);
        verdicts.push((
            format!("region {name} ({rtt} ms)"),
            Verdict::judge(ctx.mode, d.abs() <= 1.0, format!("agent median {} ms, {d:+.2} ms from the injected {rtt} ms (plain connect {} ms)", fmt(agent_med, 2), fmt(plain_med, 2))),
        ));
    }
    drop(server);
    let note = format!(
        "`deploy/lab/lab up --regions \"{}\"` (network namespaces, userspace TUN delay line per region), a tiny SMTP responder on {MAIL_IP}:{SMTP_PORT} in the mail namespace, and per region a collector (plain text on the region's own 127.0.0.1) and the release agent probing `{MAIL_IP}` with `smtp` every second. Agent figures are the `connect` phase timings read from the collector's database; the plain figures are `connect(2)` timed by this benchmark from the same namespace, 100 ms apart.",
        spec.join(" ")
    );
    Ok((rows, verdicts, note))
}

/// `connect` timings (ms) of the stored results, from the collector's database.
fn read_connects(db: &Path) -> Result<Vec<f64>> {
    if !db.exists() {
        return Ok(Vec::new());
    }
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(2))?;
    let mut st = conn.prepare(
        "SELECT r.body FROM results r JOIN series s ON s.id = r.series_id
         WHERE s.check_name = 'smtp' ORDER BY r.start_us",
    )?;
    let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
    let mut out = Vec::new();
    for body in rows {
        let Some(r) = mxscope_collector::store::row::decode_body(&body?) else {
            continue;
        };
        if let Some(t) = r.timings.iter().find(|t| t.phase == "connect") {
            out.push(t.micros as f64 / 1000.0);
        }
    }
    Ok(out)
}
