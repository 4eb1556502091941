//! Wrappers around the real mxscope binaries: a collector on a free loopback port, agents with a
//! generated target TOML, and `mxscopectl` queries parsed from its JSON output.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::binaries::{mxscope_binary, AGENT, COLLECTOR, CTL};
use crate::lab::{path_str, write_file};
use crate::net::{free_port, is_listening};
use crate::process::{Proc, Spec};
use crate::wait::wait_for;

/// A running `mxscope-collector --listen 127.0.0.1:PORT --db PATH --insecure`.
#[derive(Debug)]
pub struct Collector {
    proc: Proc,
    addr: SocketAddr,
    db: PathBuf,
}

impl Collector {
    /// Starts a collector with its db at `<dir>/mxscope.db` on a free port.
    pub fn start(dir: &Path) -> Result<Collector> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port(Ipv4Addr::LOCALHOST)?));
        Collector::start_at(dir, addr, &dir.join("mxscope.db"))
    }

    /// Starts a collector listening on `addr` with its db at `db`.
    pub fn start_at(log_dir: &Path, addr: SocketAddr, db: &Path) -> Result<Collector> {
        let bin = mxscope_binary(COLLECTOR)?;
        let spec = Spec::new("collector", bin)
            .args([
                "--listen",
                &addr.to_string(),
                "--db",
                &path_str(db)?,
                "--insecure",
                // A free metrics port, so collectors of tests running side by side never collide.
                "--http",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let proc = Proc::spawn(spec, log_dir)?;
        let mut c = Collector {
            proc,
            addr,
            db: db.to_path_buf(),
        };
        c.wait_ready()?;
        Ok(c)
    }

    /// Waits until the gRPC port accepts connections (or fails if the process died).
    pub fn wait_ready(&mut self) -> Result<()> {
        self.proc.wait_listening(self.addr, Duration::from_secs(30))
    }

    /// `http://127.0.0.1:PORT`, for `--collector`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn db(&self) -> &Path {
        &self.db
    }

    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The last `n` lines of the collector's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    /// SIGKILL (a crash), then start again on the same address and db (see [`Self::restart`]).
    pub fn crash_and_restart(&mut self) -> Result<()> {
        self.proc.kill()?;
        self.restart()
    }

    /// Starts the stopped collector again on the same address and db. If the new process cannot
    /// bind yet and exits, it is started again until the deadline.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.restart()?;
        let addr = self.addr;
        let proc = &mut self.proc;
        let mut restarts = 0;
        wait_for(
            &format!("restarted collector listening on {addr}"),
            Duration::from_secs(30),
            || {
                if !proc.is_running() {
                    restarts += 1;
                    if restarts > 20 {
                        bail!(
                            "collector keeps exiting after restart:\n{}",
                            proc.log_tail(40)
                        );
                    }
                    proc.restart()?;
                }
                Ok(is_listening(addr).then_some(()))
            },
        )
    }

    /// A client for `mxscopectl` against this collector.
    pub fn ctl(&self) -> Result<Ctl> {
        Ctl::new(&self.url())
    }
}

/// One `[[target]]` of an agent config.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub name: String,
    pub checks: Vec<String>,
    pub interval: String,
    /// Per-check port overrides (`ports = { smtp = 2525 }`).
    pub ports: BTreeMap<String, u16>,
}

impl TargetConfig {
    pub fn new(name: &str, checks: &[&str]) -> Self {
        TargetConfig {
            name: name.to_string(),
            checks: checks.iter().map(|c| c.to_string()).collect(),
            interval: "2s".to_string(),
            ports: BTreeMap::new(),
        }
    }

    pub fn interval(mut self, interval: &str) -> Self {
        self.interval = interval.to_string();
        self
    }

    pub fn port(mut self, check: &str, port: u16) -> Self {
        self.ports.insert(check.to_string(), port);
        self
    }
}

/// Renders targets as the agent's TOML config.
pub fn agent_toml(targets: &[TargetConfig]) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut out = String::new();
    for t in targets {
        out += "[[target]]\n";
        out += &format!("name = {}\n", q(&t.name));
        let checks: Vec<String> = t.checks.iter().map(|c| q(c)).collect();
        out += &format!("checks = [{}]\n", checks.join(", "));
        out += &format!("interval = {}\n", q(&t.interval));
        if !t.ports.is_empty() {
            let ports: Vec<String> = t.ports.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            out += &format!("ports = {{ {} }}\n", ports.join(", "));
        }
        out += "\n";
    }
    out
}

/// Settings of one agent process.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub id: String,
    pub region: String,
    pub collector_url: String,
    pub resolver: Option<SocketAddr>,
    pub ca_file: Option<PathBuf>,
    pub targets: Vec<TargetConfig>,
}

/// A running `mxscope-agent`.
#[derive(Debug)]
pub struct Agent {
    proc: Proc,
    id: String,
    region: String,
    spool: PathBuf,
}

impl Agent {
    /// Writes `<dir>/agent-ID.toml` and starts the agent with its spool in `<dir>/spool-ID`.
    pub fn start(dir: &Path, opts: &AgentOptions) -> Result<Agent> {
        Agent::start_with_spool(dir, dir, opts)
    }

    /// Like [`Agent::start`], with the spool in `<spool_parent>/spool-ID`.
    pub fn start_with_spool(dir: &Path, spool_parent: &Path, opts: &AgentOptions) -> Result<Agent> {
        Agent::spawn(dir, spool_parent, opts, &[])
    }

    /// Like [`Agent::start`], with `--collector` for `opts.collector_url` and then for each of
    /// `failover`, in this order: the collectors the agent fails over between.
    pub fn start_with_failover(
        dir: &Path,
        opts: &AgentOptions,
        failover: &[String],
    ) -> Result<Agent> {
        Agent::spawn(dir, dir, opts, failover)
    }

    fn spawn(
        dir: &Path,
        spool_parent: &Path,
        opts: &AgentOptions,
        failover: &[String],
    ) -> Result<Agent> {
        let bin = mxscope_binary(AGENT)?;
        let config = dir.join(format!("agent-{}.toml", opts.id));
        write_file(&config, agent_toml(&opts.targets))?;
        let spool = spool_parent.join(format!("spool-{}", opts.id));
        let mut spec =
            Spec::new(format!("agent-{}", opts.id), bin).args(["--collector", &opts.collector_url]);
        for url in failover {
            spec = spec.args(["--collector", url]);
        }
        spec = spec
            .args([
                "--id",
                &opts.id,
                "--region",
                &opts.region,
                "--config",
                &path_str(&config)?,
                "--spool",
                &path_str(&spool)?,
            ])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        if let Some(resolver) = opts.resolver {
            spec = spec.args(["--resolver", &resolver.to_string()]);
        }
        if let Some(ca) = &opts.ca_file {
            spec = spec.args(["--ca-file", &path_str(ca)?]);
        }
        let proc = Proc::spawn(spec, dir)?;
        Ok(Agent {
            proc,
            id: opts.id.clone(),
            region: opts.region.clone(),
            spool,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn spool(&self) -> &Path {
        &self.spool
    }

    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The last `n` lines of the agent's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    /// Reads the agent's spool with the agent's own spool code. Only call after the agent exited.
    pub fn spool_summary(&mut self) -> Result<SpoolSummary> {
        if self.proc.is_running() {
            bail!(
                "agent {} still running; stop it before reading its spool",
                self.id
            );
        }
        let (spool, _report) = mxscope_agent::spool::Spool::open(&self.spool, 256 << 20)
            .with_context(|| format!("open spool {}", self.spool.display()))?;
        Ok(SpoolSummary {
            highest_seq: spool.highest_seq(),
            acked_seq: spool.acked_seq(),
            depth: spool.depth(),
            dropped_total: spool.dropped_total(),
        })
    }

    /// Fails with the log tail if the agent has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if !self.proc.is_running() {
            bail!(
                "agent {} exited ({:?}):\n{}",
                self.id,
                self.proc.exit_status(),
                self.proc.log_tail(40)
            );
        }
        Ok(())
    }
}

/// One row of `mxscopectl status --format json`.
#[derive(Debug, Clone, Deserialize)]
pub struct StatusRow {
    pub target: String,
    pub endpoint: String,
    pub check: String,
    pub region: String,
    pub state: String,
    pub reachability: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub last_error: Option<String>,
    pub last_seen: serde_json::Value,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// One row of `mxscopectl agents --format json`.
#[derive(Debug, Clone, Deserialize)]
pub struct AgentRow {
    pub id: String,
    pub region: String,
    #[serde(default)]
    pub stored_up_to_seq: u64,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// One row of `mxscopectl results --format json`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResultRow {
    pub agent_id: String,
    pub seq: u64,
    pub region: String,
    pub target: String,
    pub check: String,
    pub outcome: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// What an agent's on-disk spool says after the agent has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolSummary {
    /// Highest seq the agent assigned (it numbers results 1, 2, 3, …).
    pub highest_seq: u64,
    /// Highest seq the collector acked.
    pub acked_seq: u64,
    /// Results still waiting to be sent or acked.
    pub depth: u64,
    /// Results the agent dropped (spool full or damaged).
    pub dropped_total: u64,
}

/// `mxscopectl --collector URL …`.
#[derive(Debug, Clone)]
pub struct Ctl {
    bin: PathBuf,
    url: String,
    /// `--tls-cert … --tls-key … --ca-file …` for an https:// collector.
    identity: Vec<String>,
}

impl Ctl {
    pub fn new(collector_url: &str) -> Result<Ctl> {
        Ok(Ctl {
            bin: mxscope_binary(CTL)?,
            url: collector_url.to_string(),
            identity: Vec::new(),
        })
    }

    /// mxscopectl for an mTLS collector, as the holder of `cert`.
    pub fn with_identity(collector_url: &str, cert: &crate::tls::ClientCert) -> Result<Ctl> {
        let mut ctl = Ctl::new(collector_url)?;
        ctl.identity = vec![
            "--tls-cert".into(),
            path_str(&cert.cert)?,
            "--tls-key".into(),
            path_str(&cert.key)?,
            "--ca-file".into(),
            path_str(&cert.ca)?,
        ];
        Ok(ctl)
    }

    /// Runs `mxscopectl --collector URL ARGS…` and returns stdout; non-zero exit is an error.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["--collector", self.url.as_str()];
        all.extend(self.identity.iter().map(String::as_str));
        all.extend_from_slice(args);
        crate::process::run(&self.bin, &all)
    }

    /// `status --format json`, parsed.
    pub fn status(&self) -> Result<Vec<StatusRow>> {
        let out = self.run(&["status", "--format", "json"])?;
        serde_json::from_str(&out).with_context(|| format!("parse status JSON: {out}"))
    }

    /// `agents --format json`, parsed.
    pub fn agents(&self) -> Result<Vec<AgentRow>> {
        let out = self.run(&["agents", "--format", "json"])?;
        serde_json::from_str(&out).with_context(|| format!("parse agents JSON: {out}"))
    }

    /// `results --agent ID --limit N --format json`, parsed (newest first).
    pub fn results_of(&self, agent_id: &str, limit: u32) -> Result<Vec<ResultRow>> {
        let limit = limit.to_string();
        let out = self.run(&[
            "results", "--agent", agent_id, "--limit", &limit, "--format", "json",
        ])?;
        serde_json::from_str(&out).with_context(|| format!("parse results JSON: {out}"))
    }

    /// `status` as the human-readable table.
    pub fn status_table(&self) -> Result<String> {
        self.run(&["status"])
    }
}
