//! `mxscope-agent`'s command-line flags (clap, each also from `MXSCOPE_*`), their value parsers
//! and the log filter. Validation beyond syntax is [`super::AgentConfig::from_flags`]'s.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use tracing_subscriber::filter::Targets;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The log filter from `RUST_LOG`: comma-separated `target=level` directives and a bare default
/// level (`warn`, `info,h2=off`, `mxscope_agent=debug`); unset or empty means `info`. Anything
/// else also means `info`, and the parse error comes back for a warning. (tracing-subscriber's
/// `EnvFilter` also takes span and field filters, but links a regex engine: ~0.4 MiB of code that
/// stays resident in every agent.)
pub fn log_filter(rust_log: Option<&str>) -> (Targets, Option<String>) {
    let info = || Targets::new().with_default(tracing::Level::INFO);
    match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        None => (info(), None),
        Some(spec) => match spec.parse::<Targets>() {
            Ok(targets) => (targets, None),
            Err(e) => (info(), Some(e.to_string())),
        },
    }
}

/// Command-line flags of `mxscope-agent`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "mxscope-agent",
    version,
    about = "mxscope agent: mail probes, spooled and streamed to the collector"
)]
pub struct Flags {
    /// Collector address: `https://host:port` (mTLS), or `http://host:port` for a plain-text
    /// `--insecure` collector on loopback. Repeat it (or give a comma-separated list) for several
    /// collectors: the agent streams to one at a time and fails over to the next in order.
    #[arg(long, env = "MXSCOPE_COLLECTOR", required = true, value_delimiter = ',', value_parser = parse_trimmed)]
    pub collector: Vec<String>,
    /// This agent's certificate (PEM) for the collector, from `mxscopectl enroll`.
    #[arg(long, env = "MXSCOPE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, env = "MXSCOPE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) of the collector's server certificate (default: the system roots). Not `--ca-file`,
    /// which is for probe TLS.
    #[arg(long, env = "MXSCOPE_COLLECTOR_CA")]
    pub collector_ca: Option<PathBuf>,
    /// Probe credentials (TOML: `[name]` with `user` and `password`), mode 0600.
    #[arg(long, env = "MXSCOPE_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// Agent id (DNS-label style: lowercase letters, digits, '-'). With --state-dir it comes from
    /// the enrolled certificate (or, at enrolment, is the id asked for within the token's prefix).
    #[arg(long, env = "MXSCOPE_ID")]
    pub id: Option<String>,
    /// Region this agent probes from. With --state-dir it comes from the certificate.
    #[arg(long, env = "MXSCOPE_REGION")]
    pub region: Option<String>,
    /// Enrolment token from `mxscopectl token create`, used once on the first start: the agent
    /// makes its key, gets its certificate from the collector and keeps both in --state-dir.
    #[arg(
        long,
        env = "MXSCOPE_ENROLL_TOKEN",
        requires = "state_dir",
        hide_env_values = true
    )]
    pub enroll: Option<String>,
    /// Where the agent keeps its key (agent.key, mode 0600), certificate (agent.pem, renewed
    /// automatically), the collector's CA (ca.pem) and, unless --spool says otherwise, its spool.
    #[arg(long, env = "MXSCOPE_STATE_DIR", conflicts_with_all = ["tls_cert", "tls_key"])]
    pub state_dir: Option<PathBuf>,
    /// Local targets file (TOML).
    #[arg(long, env = "MXSCOPE_CONFIG")]
    pub config: Option<PathBuf>,
    /// DNS server for all probes, `IP:PORT` (default: the system configuration).
    #[arg(long, env = "MXSCOPE_RESOLVER")]
    pub resolver: Option<SocketAddr>,
    /// Extra CA certificates (PEM) probe TLS trusts, in addition to the system roots.
    #[arg(long, env = "MXSCOPE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Spool directory (default `./mxscope-spool-<id>`).
    #[arg(long, env = "MXSCOPE_SPOOL")]
    pub spool: Option<PathBuf>,
    /// Spool bound in bytes; suffixes KiB, MiB, GiB, KB, MB, GB accepted.
    #[arg(long, env = "MXSCOPE_SPOOL_MAX", default_value = "256MiB", value_parser = parse_bytes)]
    pub spool_max: u64,
    /// Global limit of simultaneous probes.
    #[arg(long, env = "MXSCOPE_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Limit of simultaneous connections to one mail server.
    #[arg(long, env = "MXSCOPE_PER_HOST", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub per_host: u32,
    /// Most MX hosts of one domain probed, by preference (the rest are counted, not probed).
    #[arg(long, env = "MXSCOPE_MAX_MX_HOSTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_mx_hosts: u32,
    /// Most addresses of one target probed, over all its MX hosts (the rest are counted).
    #[arg(long, env = "MXSCOPE_MAX_ADDRESSES", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub max_addresses: u32,
    /// Free label `key=value` sent to the collector (repeatable).
    #[arg(long = "label", env = "MXSCOPE_LABEL", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Name sent in EHLO (default: the system host name).
    #[arg(long, env = "MXSCOPE_HELO_NAME")]
    pub helo_name: Option<String>,
    /// Log format.
    #[arg(long, env = "MXSCOPE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Parses `256MiB`, `1GB`, `4096`, `64 KiB`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 256MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit '{other}' (valid: B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// The value without the blanks around it (`a:7443, b:7443` in `MXSCOPE_COLLECTOR`).
fn parse_trimmed(s: &str) -> Result<String, String> {
    Ok(s.trim().to_string())
}

pub(super) fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not key=value"))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(format!("'{s}' has an empty key"));
    }
    Ok((k.to_string(), v.trim().to_string()))
}
