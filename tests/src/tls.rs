//! mTLS helpers for the security tests: a CA made with the real `mxscopectl ca init`, certificates
//! from `enroll` / `admin-cert`, a collector with `--tls-cert/--tls-key/--client-ca`, agents and
//! ctl runs with client certificates, and a raw tonic Ingest session for hostile clients.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mxscope_proto::pb;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::binaries::{mxscope_binary, AGENT, COLLECTOR, CTL};
use crate::lab::{path_str, write_file};
use crate::mxscope::{agent_toml, TargetConfig};
use crate::net::free_port;
use crate::process::{Proc, Spec};

/// A client certificate, its key and the CA that issued the collector's certificate.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl ClientCert {
    /// A tonic client configuration with this identity, trusting `ca`.
    pub fn tonic(&self) -> Result<ClientTlsConfig> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?)))
    }
}

/// A CA directory created by `mxscopectl ca init`.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

/// Runs `mxscopectl ARGS` and fails with its output on a non-zero exit.
fn ctl_ok(args: &[&str]) -> Result<String> {
    let out = ctl_output(args)?;
    if out.code != 0 {
        bail!(
            "mxscopectl {} exited {}: {}{}",
            args.join(" "),
            out.code,
            out.stdout,
            out.stderr
        );
    }
    Ok(out.stdout)
}

impl Pki {
    /// `mxscopectl ca init <parent>/<name>`.
    pub fn init(parent: &Path, name: &str) -> Result<Pki> {
        let dir = parent.join(name);
        ctl_ok(&["ca", "init", &path_str(&dir)?])?;
        for f in ["ca.pem", "ca.key", "collector.pem", "collector.key"] {
            if !dir.join(f).is_file() {
                bail!("ca init did not write {f} in {}", dir.display());
            }
        }
        Ok(Pki { dir })
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `mxscopectl enroll --id ID --region REGION --out <parent>/agent-ID [EXTRA…]`.
    pub fn enroll(
        &self,
        parent: &Path,
        id: &str,
        region: &str,
        extra: &[&str],
    ) -> Result<ClientCert> {
        let out = parent.join(format!("agent-{id}-{region}-certs"));
        let mut args = vec!["enroll", "--id", id, "--region", region, "--ca"];
        let ca = path_str(&self.dir)?;
        let out_s = path_str(&out)?;
        args.extend([ca.as_str(), "--out", out_s.as_str()]);
        args.extend_from_slice(extra);
        ctl_ok(&args)?;
        Ok(ClientCert {
            cert: out.join("agent.pem"),
            key: out.join("agent.key"),
            ca: out.join("ca.pem"),
        })
    }

    /// `mxscopectl admin-cert --name NAME [--read-only] --out <parent>/admin-NAME`.
    pub fn admin(&self, parent: &Path, name: &str, read_only: bool) -> Result<ClientCert> {
        let out = parent.join(format!("admin-{name}-certs"));
        let ca = path_str(&self.dir)?;
        let out_s = path_str(&out)?;
        let mut args = vec!["admin-cert", "--name", name, "--ca", &ca, "--out", &out_s];
        if read_only {
            args.push("--read-only");
        }
        ctl_ok(&args)?;
        Ok(ClientCert {
            cert: out.join("admin.pem"),
            key: out.join("admin.key"),
            ca: out.join("ca.pem"),
        })
    }
}

/// A running collector with mTLS on a free loopback port.
#[derive(Debug)]
pub struct TlsCollector {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl TlsCollector {
    /// Starts `mxscope-collector` with the CA's collector certificate and `extra` flags.
    pub fn start(dir: &Path, pki: &Pki, extra: &[&str]) -> Result<TlsCollector> {
        TlsCollector::start_with_db(dir, &dir.join("mxscope-tls.db"), pki, extra)
    }

    /// Like [`TlsCollector::start`] with the database at `db` (the log stays in `dir`).
    pub fn start_with_db(dir: &Path, db: &Path, pki: &Pki, extra: &[&str]) -> Result<TlsCollector> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port(Ipv4Addr::LOCALHOST)?));
        let spec = Spec::new("collector-tls", mxscope_binary(COLLECTOR)?)
            .args([
                "--listen".to_string(),
                addr.to_string(),
                "--db".to_string(),
                path_str(db)?,
                "--tls-cert".to_string(),
                path_str(&pki.dir.join("collector.pem"))?,
                "--tls-key".to_string(),
                path_str(&pki.dir.join("collector.key"))?,
                "--client-ca".to_string(),
                path_str(&pki.ca_pem())?,
            ])
            .args(extra.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let mut proc = Proc::spawn(spec, dir)?;
        proc.wait_listening(addr, Duration::from_secs(30))?;
        Ok(TlsCollector { proc, addr })
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}

/// What a finished `mxscopectl` run printed.
#[derive(Debug, Clone)]
pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `mxscopectl ARGS…` to completion without checking its exit code.
pub fn ctl_output(args: &[&str]) -> Result<CtlOutput> {
    let out = Command::new(mxscope_binary(CTL)?)
        .args(args)
        .env_remove("MXSCOPE_TLS_CERT")
        .env_remove("MXSCOPE_TLS_KEY")
        .env_remove("MXSCOPE_CA_FILE")
        .env_remove("MXSCOPE_CA_DIR")
        .env_remove("MXSCOPE_COLLECTOR")
        .stdin(Stdio::null())
        .output()
        .context("run mxscopectl")?;
    Ok(CtlOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `mxscopectl --collector URL [--tls-cert --tls-key --ca-file] ARGS…`.
pub fn ctl_as(url: &str, who: Option<&ClientCert>, args: &[&str]) -> Result<CtlOutput> {
    let mut all: Vec<String> = vec!["--collector".into(), url.into()];
    if let Some(c) = who {
        all.extend([
            "--tls-cert".into(),
            path_str(&c.cert)?,
            "--tls-key".into(),
            path_str(&c.key)?,
            "--ca-file".into(),
            path_str(&c.ca)?,
        ]);
    }
    all.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    ctl_output(&refs)
}

/// Starts `mxscopectl --collector URL [--tls-cert --tls-key --ca-file] ARGS…` as a process that
/// keeps running (`watch`), its output in `<dir>/<name>.log`.
pub fn spawn_ctl_as(
    dir: &Path,
    name: &str,
    url: &str,
    who: Option<&ClientCert>,
    args: &[&str],
) -> Result<Proc> {
    let mut spec = Spec::new(name, mxscope_binary(CTL)?).args(["--collector", url]);
    if let Some(c) = who {
        spec = spec.args([
            "--tls-cert".to_string(),
            path_str(&c.cert)?,
            "--tls-key".into(),
            path_str(&c.key)?,
            "--ca-file".into(),
            path_str(&c.ca)?,
        ]);
    }
    Proc::spawn(spec.args(args.iter().copied()), dir)
}

/// `results --agent ID --format json` as an admin: the seqs stored for that agent.
pub fn stored_seqs(url: &str, admin: &ClientCert, agent: &str) -> Result<Vec<u64>> {
    let out = ctl_as(
        url,
        Some(admin),
        &[
            "results", "--agent", agent, "--limit", "10000", "--format", "json",
        ],
    )?;
    if out.code != 0 {
        bail!(
            "results --agent {agent} failed ({}): {}",
            out.code,
            out.stderr
        );
    }
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&out.stdout).with_context(|| format!("parse: {}", out.stdout))?;
    let mut seqs: Vec<u64> = rows.iter().filter_map(|r| r["seq"].as_u64()).collect();
    seqs.sort_unstable();
    Ok(seqs)
}

/// Agent ids the collector knows (`agents --format json` as an admin).
pub fn known_agents(url: &str, admin: &ClientCert) -> Result<Vec<String>> {
    let out = ctl_as(url, Some(admin), &["agents", "--format", "json"])?;
    if out.code != 0 {
        bail!("agents failed ({}): {}", out.code, out.stderr);
    }
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&out.stdout).with_context(|| format!("parse: {}", out.stdout))?;
    Ok(rows
        .iter()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect())
}

/// Starts `mxscope-agent` (log `<dir>/<name>.log`) probing smtp on a closed loopback port every
/// second, so it produces a steady stream of `refused` results without any mail server.
pub fn start_agent(
    dir: &Path,
    name: &str,
    url: &str,
    id: &str,
    region: &str,
    cert: Option<&ClientCert>,
) -> Result<Proc> {
    let closed = free_port(Ipv4Addr::LOCALHOST)?;
    let config = dir.join(format!("{name}.toml"));
    write_file(
        &config,
        agent_toml(&[TargetConfig::new("127.0.0.1", &["smtp"])
            .interval("1s")
            .port("smtp", closed)]),
    )?;
    let mut spec = Spec::new(name, mxscope_binary(AGENT)?)
        .args([
            "--collector".to_string(),
            url.to_string(),
            "--id".into(),
            id.into(),
            "--region".into(),
            region.into(),
            "--config".into(),
            path_str(&config)?,
            "--spool".into(),
            path_str(&dir.join(format!("spool-{name}")))?,
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    if let Some(c) = cert {
        spec = spec.args([
            "--tls-cert".to_string(),
            path_str(&c.cert)?,
            "--tls-key".into(),
            path_str(&c.key)?,
            "--collector-ca".into(),
            path_str(&c.ca)?,
        ]);
    }
    Proc::spawn(spec, dir)
}

/// How a raw Ingest session went: what the collector sent and how the stream ended.
#[derive(Debug)]
pub struct RawSession {
    pub received: Vec<pb::CollectorMessage>,
    /// The error that ended the session (connect, call or stream), if any.
    pub error: Option<tonic::Status>,
}

impl RawSession {
    /// The highest ack (or welcome) seen.
    pub fn acked(&self) -> u64 {
        self.received
            .iter()
            .filter_map(|m| match &m.msg {
                Some(pb::collector_message::Msg::Ack(a)) => Some(a.stored_up_to_seq),
                Some(pb::collector_message::Msg::Welcome(w)) => Some(w.stored_up_to_seq),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
}

/// Opens an Ingest session (TLS when `tls` is set), sends `messages`, and reads until the
/// collector acks `until_ack`, ends the stream, or `timeout` passes.
pub async fn raw_session(
    url: &str,
    tls: Option<ClientTlsConfig>,
    messages: Vec<pb::AgentMessage>,
    until_ack: u64,
    timeout: Duration,
) -> RawSession {
    let mut session = RawSession {
        received: Vec::new(),
        error: None,
    };
    let endpoint = match Endpoint::from_shared(url.to_string()) {
        Ok(e) => e.connect_timeout(Duration::from_secs(5)),
        Err(e) => {
            session.error = Some(tonic::Status::invalid_argument(e.to_string()));
            return session;
        }
    };
    let endpoint = match tls {
        Some(tls) => match endpoint.tls_config(tls) {
            Ok(e) => e,
            Err(e) => {
                session.error = Some(tonic::Status::unavailable(format!("{e:?}")));
                return session;
            }
        },
        None => endpoint,
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => {
            session.error = Some(tonic::Status::unavailable(format!("{e:?}")));
            return session;
        }
    };
    let mut client =
        pb::ingest_client::IngestClient::new(channel).max_encoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = tokio::sync::mpsc::channel(messages.len().max(1));
    for m in messages {
        // The channel holds them all: capacity is the message count.
        let _ = tx.try_send(m);
    }
    let run = async {
        let mut inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        loop {
            match inbound.message().await? {
                Some(m) => {
                    session.received.push(m);
                    if until_ack > 0 && session.acked() >= until_ack {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            }
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(())) => {}
        Ok(Err(status)) => session.error = Some(status),
        Err(_) => session.error = Some(tonic::Status::deadline_exceeded("test timeout")),
    }
    drop(tx);
    session
}

/// A hello for a raw session; it announces the local target `raw.example` (smtp) that
/// [`batch`]'s results are for.
pub fn hello(id: &str, region: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            agent_id: id.into(),
            region: region.into(),
            version: "raw-test".into(),
            local_targets: vec![pb::TargetSpec {
                name: "raw.example".into(),
                checks: vec!["smtp".into()],
                ..Default::default()
            }],
            ..Default::default()
        })),
    }
}

/// A batch of plausible results `seqs` for `id`, started now.
pub fn batch(id: &str, seqs: impl IntoIterator<Item = u64>) -> pb::AgentMessage {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let results = seqs
        .into_iter()
        .map(|seq| pb::ProbeResult {
            agent_id: id.into(),
            seq,
            target: "raw.example".into(),
            check: "smtp".into(),
            start_us: now,
            outcome: pb::Outcome::Ok as i32,
            interval_ms: 60_000,
            ..Default::default()
        })
        .collect();
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Batch(pb::ResultBatch { results })),
    }
}
