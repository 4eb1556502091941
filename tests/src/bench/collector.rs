//! The real `mxscope-collector` process for the benchmarks: plain text on a free loopback port,
//! with whatever per-agent rate and timestamp limits it has raised so synthetic load and 30-day-old
//! timestamps are accepted (found in its `--help`, listed in the report).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use mxscope_proto::pb;
use mxscope_tests::binaries::{mxscope_binary, COLLECTOR};
use mxscope_tests::lab::path_str;
use mxscope_tests::net::free_port;
use mxscope_tests::process::{Proc, Spec};
use tonic::transport::Channel;

/// Limit flags the security work adds, and the value that lifts each for a benchmark.
const LIFTS: &[(&str, &str)] = &[
    // Per-agent token bucket (default 5000/s, burst 10,000): synthetic agents send far more.
    ("--max-rate", "100000000/s"),
    ("--rate-burst", "100000000"),
    // Oldest accepted start time (default 14d): the fleet's history spans 30 days.
    ("--max-age", "3650d"),
];

/// Which limit flags this collector has (`--help`), with the values the benchmark passes.
pub(crate) fn limit_flags() -> Result<Vec<(String, String)>> {
    let bin = mxscope_binary(COLLECTOR)?;
    let help = std::process::Command::new(&bin)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    Ok(LIFTS
        .iter()
        .filter(|(flag, _)| {
            help.split(|c: char| c.is_whitespace() || c == ',' || c == '=')
                .any(|w| w == *flag)
        })
        .map(|(f, v)| (f.to_string(), v.to_string()))
        .collect())
}

/// A running collector.
#[derive(Debug)]
pub(crate) struct BenchCollector {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl BenchCollector {
    /// Starts `mxscope-collector --insecure` on a free 127.0.0.1 port with `db`, logging to
    /// `<log_dir>/<name>.log`, and waits until it accepts connections.
    pub(crate) fn start(
        log_dir: &Path,
        name: &str,
        db: &Path,
        extra: &[(String, String)],
    ) -> Result<Self> {
        BenchCollector::start_on(log_dir, name, &path_str(db)?, extra)
    }

    /// [`start`](BenchCollector::start) with `--db` as given: a SQLite path or a `postgres://`
    /// URL.
    pub(crate) fn start_on(
        log_dir: &Path,
        name: &str,
        db: &str,
        extra: &[(String, String)],
    ) -> Result<Self> {
        let bin = mxscope_binary(COLLECTOR)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port(Ipv4Addr::LOCALHOST)?));
        let mut spec = Spec::new(name, bin)
            .args(["--listen", &addr.to_string(), "--db", db, "--insecure"])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1");
        for (flag, value) in extra {
            spec = spec.args([flag.as_str(), value.as_str()]);
        }
        let mut proc = Proc::spawn(spec, log_dir)?;
        proc.wait_listening(addr, Duration::from_secs(120))?;
        Ok(BenchCollector { proc, addr })
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn pid(&self) -> Result<u32> {
        match self.proc.pid() {
            Some(p) => Ok(p),
            None => bail!("collector is not running:\n{}", self.proc.log_tail(30)),
        }
    }

    /// A Query client (large responses allowed: 10,000-row status).
    pub(crate) async fn query(&self) -> Result<pb::query_client::QueryClient<Channel>> {
        let channel = Channel::from_shared(self.url())?.connect().await?;
        Ok(
            pb::query_client::QueryClient::new(channel)
                .max_decoding_message_size(256 * 1024 * 1024),
        )
    }

    /// Stops it (SIGTERM, grace, SIGKILL): the database is closed cleanly.
    pub(crate) fn stop(&mut self) -> Result<()> {
        self.proc.terminate(Duration::from_secs(60))?;
        Ok(())
    }
}

/// `stored_up_to_seq` of one agent, from the `Agents` RPC (0 until it has connected).
pub(crate) async fn stored_up_to(
    client: &mut pb::query_client::QueryClient<Channel>,
    agent_id: &str,
) -> Result<u64> {
    let agents = client
        .agents(pb::AgentsRequest {})
        .await?
        .into_inner()
        .agents;
    Ok(agents
        .iter()
        .find(|a| a.id == agent_id)
        .map_or(0, |a| a.stored_up_to_seq))
}
