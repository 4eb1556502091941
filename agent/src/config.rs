//! The agent's configuration: command-line flags (each also from `MXSCOPE_*`, flags win) and the
//! TOML targets file. Errors name the file, the line and the key; nothing here touches the network.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mxscope_proto::target::{self, Source, TargetError};
use mxscope_proto::target::{DEFAULT_INTERVAL, DEFAULT_TIMEOUT};
use mxscope_proto::time::millis;
use mxscope_proto::{names, pb, CheckKind, UnknownName};
use serde::Deserialize;
use toml::Spanned;
use tracing_subscriber::filter::Targets;

use crate::probe::{CheckOptions, CheckSpec, TargetKind};

/// Default spool bound.
pub const DEFAULT_SPOOL_MAX: u64 = 256 * 1024 * 1024;

pub use crate::error::ConfigError;

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
    /// `--insecure` collector on loopback.
    #[arg(long, env = "MXSCOPE_COLLECTOR")]
    pub collector: String,
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
    /// Agent id (DNS-label style: lowercase letters, digits, '-').
    #[arg(long, env = "MXSCOPE_ID")]
    pub id: String,
    /// Region this agent probes from.
    #[arg(long, env = "MXSCOPE_REGION")]
    pub region: String,
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

/// One local or central target, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub kind: TargetKind,
    pub checks: Vec<CheckKind>,
    pub interval: Duration,
    pub timeout: Duration,
    pub require_tls: bool,
    pub ports: BTreeMap<CheckKind, u16>,
    pub options: CheckOptions,
}

impl Target {
    /// One probe spec per check.
    pub fn check_specs(&self) -> Vec<CheckSpec> {
        self.checks.iter().map(|&c| self.check_spec(c)).collect()
    }

    /// The probe spec of one check of this target.
    pub fn check_spec(&self, check: CheckKind) -> CheckSpec {
        CheckSpec {
            target: self.name.clone(),
            kind: self.kind,
            check,
            port: self.ports.get(&check).copied(),
            timeout: self.timeout,
            interval: self.interval,
            require_tls: self.require_tls,
            options: self.options.clone(),
        }
    }

    /// Wire form with `source = "local"` (credentials and MAIL FROM stay on the agent).
    pub fn to_local_spec(&self) -> pb::TargetSpec {
        pb::TargetSpec {
            name: self.name.clone(),
            checks: self.checks.iter().map(|c| c.name().to_string()).collect(),
            interval_ms: millis(self.interval),
            timeout_ms: millis(self.timeout),
            regions: Vec::new(),
            labels: Default::default(),
            ports: self
                .ports
                .iter()
                .map(|(c, p)| (c.name().to_string(), u32::from(*p)))
                .collect(),
            source: "local".to_string(),
            require_tls: self.require_tls,
            kind: match self.kind {
                TargetKind::Domain => "domain",
                TargetKind::Host => "host",
            }
            .to_string(),
        }
    }

    /// Reads a central target through proto's one target validator ([`Source::Collector`]):
    /// checks this agent does not know are left out and returned as problems; a target with
    /// nothing runnable or a bad name is an error.
    pub fn from_central(spec: &pb::TargetSpec) -> Result<(Target, Vec<UnknownName>), TargetError> {
        let (core, problems) = target::validate_from(spec, Source::Collector)?;
        let target = Target {
            name: core.name,
            kind: core.kind,
            checks: core.checks,
            interval: core.interval,
            timeout: core.timeout,
            require_tls: core.require_tls,
            options: CheckOptions {
                service_ports: core.ports.clone(),
                ..CheckOptions::default()
            },
            ports: core.ports,
        };
        Ok((target, problems))
    }
}

/// Everything the agent needs to run, validated.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub collector: String,
    pub id: String,
    pub region: String,
    pub targets: Vec<Target>,
    pub resolver: Option<SocketAddr>,
    pub ca_file: Option<PathBuf>,
    /// Client certificate, key and collector CA for an `https://` collector.
    pub collector_tls: Option<crate::trust::CollectorTls>,
    /// Probe logins (passwords print as `***`).
    pub credentials: crate::credentials::Credentials,
    pub spool_dir: PathBuf,
    pub spool_max: u64,
    pub concurrency: usize,
    pub per_host: usize,
    pub labels: BTreeMap<String, String>,
    pub helo_name: String,
    pub log_format: LogFormat,
}

impl AgentConfig {
    /// Validates the flags and loads the targets file they name.
    pub fn from_flags(flags: Flags) -> Result<AgentConfig, ConfigError> {
        let https = validate_collector(&flags.collector)?;
        validate_id(&flags.id)?;
        let collector_tls = crate::trust::collector_tls(
            https,
            flags.tls_cert.as_deref(),
            flags.tls_key.as_deref(),
            flags.collector_ca.as_deref(),
        )?;
        let credentials = match &flags.credentials {
            Some(path) => crate::credentials::Credentials::load(path)?,
            None => Default::default(),
        };
        if flags.region.trim().is_empty() {
            return Err(ConfigError::Flag {
                flag: "region",
                message: "must not be empty".into(),
            });
        }
        let targets = match &flags.config {
            Some(path) => load_targets(path)?,
            None => Vec::new(),
        };
        for t in &targets {
            if let Some(name) = t.options.credentials.as_deref() {
                if credentials.get(name).is_none() {
                    return Err(ConfigError::Flag {
                        flag: "credentials",
                        message: format!(
                            "target '{}' refers to login '{name}', which {}",
                            t.name,
                            match &flags.credentials {
                                Some(p) => format!("is not a [section] of {}", p.display()),
                                None => "needs --credentials FILE".to_string(),
                            }
                        ),
                    });
                }
            }
        }
        let spool_dir = flags
            .spool
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("./mxscope-spool-{}", flags.id)));
        let mut labels = BTreeMap::new();
        for (k, v) in flags.labels {
            labels.insert(k, v);
        }
        Ok(AgentConfig {
            collector: flags.collector,
            id: flags.id,
            region: flags.region,
            targets,
            resolver: flags.resolver,
            ca_file: flags.ca_file,
            collector_tls,
            credentials,
            spool_dir,
            spool_max: flags.spool_max,
            concurrency: flags.concurrency as usize,
            per_host: flags.per_host as usize,
            labels,
            helo_name: flags.helo_name.unwrap_or_else(system_host_name),
            log_format: flags.log_format,
        })
    }
}

/// `https://host:port` (true) or `http://host:port` (false); anything else is refused with the reason.
fn validate_collector(url: &str) -> Result<bool, ConfigError> {
    let err = |m: &str| ConfigError::Flag {
        flag: "collector",
        message: format!("'{url}': {m}"),
    };
    let uri: tonic::transport::Uri = url.parse().map_err(|_| err("not a URL"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(err(
                "expected https://host:port (or http://host:port for --insecure collectors)",
            ))
        }
    };
    if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() {
        return Err(err(
            "expected https://host:port (or http://host:port for --insecure collectors)",
        ));
    }
    Ok(https)
}

/// DNS-label style ([`names::is_label`]).
fn validate_id(id: &str) -> Result<(), ConfigError> {
    if names::is_label(id) {
        Ok(())
    } else {
        Err(ConfigError::Flag {
            flag: "id",
            message: format!(
                "'{id}' is not a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')"
            ),
        })
    }
}

fn validate_target_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if !names::is_domain_name(name) {
        return Err(format!("'{name}' is not a host or domain name"));
    }
    Ok(())
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

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not key=value"))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(format!("'{s}' has an empty key"));
    }
    Ok((k.to_string(), v.trim().to_string()))
}

/// The system host name, or `mxscope-agent.invalid` when it cannot be read.
#[allow(unsafe_code)] // gethostname(2): no std API
pub fn system_host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `buf.len()` bytes; gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(name) = std::str::from_utf8(&buf[..end]) {
            if !name.is_empty() {
                return name.to_string();
            }
        }
    }
    "mxscope-agent.invalid".to_string()
}

// ---------------------------------------------------------------------------------------------
// The targets file.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    target: Vec<Spanned<RawTarget>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Option<Spanned<String>>,
    checks: Option<Spanned<Vec<Spanned<String>>>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    kind: Option<Spanned<String>>,
    require_tls: Option<bool>,
    ports: Option<BTreeMap<Spanned<String>, Spanned<i64>>>,
    mail_from: Option<Spanned<String>>,
    rcpt_to: Option<Spanned<String>>,
    cert_warn_days: Option<Spanned<i64>>,
    cert_fail_days: Option<Spanned<i64>>,
    dkim_selectors: Option<Vec<Spanned<String>>>,
    dnsbl_zones: Option<Vec<Spanned<String>>>,
    queue_config_dir: Option<Spanned<String>>,
    credentials: Option<Spanned<String>>,
    mta_sts_port: Option<Spanned<i64>>,
}

/// Reads and validates a targets file.
pub fn load_targets(path: &Path) -> Result<Vec<Target>, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.display().to_string(),
        source,
    })?;
    parse_targets(&path.display().to_string(), &text)
}

/// Validates the text of a targets file; `file` is used in error messages.
///
/// A file of plain `[[target]]` tables is read one table at a time, so the TOML document of a
/// thousand targets never exists whole (it costs a few MiB of small allocations that the allocator
/// keeps after they are freed). Any problem, and any file that is not that simple, goes through
/// [`parse_whole`], so errors are the same whichever way the file was read.
pub fn parse_targets(file: &str, text: &str) -> Result<Vec<Target>, ConfigError> {
    match target_tables(text) {
        Some(tables) => parse_tables(text, &tables).or_else(|()| parse_whole(file, text)),
        None => parse_whole(file, text),
    }
}

/// Where each `[[target]]` table starts, when the file can be split there without changing its
/// meaning: nothing but blank and comment lines before the first header, and no multi-line string
/// (in which a `[[target]]` line would be text). Headers written another way (`[["target"]]`) are
/// not split at and simply stay in the table before them.
fn target_tables(text: &str) -> Option<Vec<usize>> {
    if text.contains("\"\"\"") || text.contains("'''") {
        return None;
    }
    let mut starts = Vec::new();
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if is_target_header(line) {
            starts.push(at);
        } else if starts.is_empty() {
            let l = line.trim();
            if !(l.is_empty() || l.starts_with('#')) {
                return None;
            }
        }
        at += line.len();
    }
    Some(starts)
}

/// `[[target]]` alone on its line, with optional spaces and a trailing comment.
fn is_target_header(line: &str) -> bool {
    let Some(rest) = line.trim().strip_prefix("[[") else {
        return false;
    };
    let Some(rest) = rest.trim_start().strip_prefix("target") else {
        return false;
    };
    let Some(rest) = rest.trim_start().strip_prefix("]]") else {
        return false;
    };
    let rest = rest.trim_start();
    rest.is_empty() || rest.starts_with('#')
}

/// Reads the tables starting at `starts` one by one; `Err(())` on any problem (the caller then
/// reads the whole file for the error message).
fn parse_tables(text: &str, starts: &[usize]) -> Result<Vec<Target>, ()> {
    let mut targets = Vec::with_capacity(starts.len());
    let mut seen = HashSet::with_capacity(starts.len());
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(text.len());
        let table = &text[start..end];
        let raw: RawFile = toml::from_str(table).map_err(drop)?;
        for t in raw.target {
            let span = t.span();
            let i = targets.len();
            let target = validate_target("", table, i, span.start, t.into_inner()).map_err(drop)?;
            if !seen.insert(target.name.clone()) {
                return Err(());
            }
            targets.push(target);
        }
    }
    Ok(targets)
}

/// Reads the whole file as one TOML document.
fn parse_whole(file: &str, text: &str) -> Result<Vec<Target>, ConfigError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        let index = target_index_at(text, at);
        let mut key = index.map(|i| format!("target[{i}]")).unwrap_or_default();
        let mut message = e.message().trim().replace('\n', "; ");
        if let Some(field) = message
            .strip_prefix("unknown field `")
            .and_then(|m| m.split_once('`'))
            .map(|(f, rest)| (f.to_string(), rest.to_string()))
        {
            key = if key.is_empty() {
                field.0.clone()
            } else {
                format!("{key}.{}", field.0)
            };
            message = format!("unknown key{}", field.1.replace('`', "'"));
        }
        ConfigError::Target {
            file: file.to_string(),
            line: line_of(text, at),
            key,
            message,
        }
    })?;

    let mut targets = Vec::with_capacity(raw.target.len());
    let mut seen = HashSet::new();
    for (i, t) in raw.target.into_iter().enumerate() {
        let span = t.span();
        let target = validate_target(file, text, i, span.start, t.into_inner())?;
        if !seen.insert(target.name.clone()) {
            return Err(ConfigError::Target {
                file: file.to_string(),
                line: line_of(text, span.start),
                key: format!("target[{i}].name"),
                message: format!("duplicate target '{}'", target.name),
            });
        }
        targets.push(target);
    }
    Ok(targets)
}

fn validate_target(
    file: &str,
    text: &str,
    i: usize,
    table_start: usize,
    raw: RawTarget,
) -> Result<Target, ConfigError> {
    let err = |at: usize, key: &str, message: String| ConfigError::Target {
        file: file.to_string(),
        line: line_of(text, at),
        key: format!("target[{i}].{key}"),
        message,
    };

    let name = raw.name.ok_or_else(|| {
        err(
            table_start,
            "name",
            "missing (every target needs a name)".into(),
        )
    })?;
    let name_at = name.span().start;
    let name = names::normalize_domain(&name.into_inner());
    validate_target_name(&name).map_err(|m| err(name_at, "name", m))?;

    let checks_raw = raw.checks.ok_or_else(|| {
        err(
            table_start,
            "checks",
            "missing (e.g. [\"mx\", \"smtp\"])".into(),
        )
    })?;
    let checks_at = checks_raw.span().start;
    let mut checks = Vec::new();
    for c in checks_raw.into_inner() {
        let at = c.span().start;
        let kind: CheckKind = c
            .get_ref()
            .parse()
            .map_err(|e: mxscope_proto::UnknownName| err(at, "checks", e.to_string()))?;
        if checks.contains(&kind) {
            return Err(err(at, "checks", format!("check '{kind}' listed twice")));
        }
        checks.push(kind);
    }
    if checks.is_empty() {
        return Err(err(
            checks_at,
            "checks",
            "must list at least one check".into(),
        ));
    }

    let duration = |v: Option<Spanned<String>>, key: &str, default: Duration| match v {
        None => Ok(default),
        Some(s) => {
            let at = s.span().start;
            let d = humantime::parse_duration(s.get_ref().trim()).map_err(|e| {
                err(
                    at,
                    key,
                    format!("'{}' is not a duration (e.g. 30s, 5m): {e}", s.get_ref()),
                )
            })?;
            if d.is_zero() {
                return Err(err(at, key, "must be greater than zero".into()));
            }
            Ok(d)
        }
    };
    let interval = duration(raw.interval, "interval", DEFAULT_INTERVAL)?;
    let timeout = duration(raw.timeout, "timeout", DEFAULT_TIMEOUT)?;
    if interval < Duration::from_secs(1) {
        return Err(err(table_start, "interval", "must be at least 1s".into()));
    }

    let kind = match raw.kind {
        None => TargetKind::Domain,
        Some(k) => match k.get_ref().as_str() {
            "domain" => TargetKind::Domain,
            "host" => TargetKind::Host,
            other => {
                return Err(err(
                    k.span().start,
                    "kind",
                    format!("unknown kind '{other}' (valid: domain, host)"),
                ))
            }
        },
    };
    // An IP literal is always probed directly.
    let kind = if name.parse::<IpAddr>().is_ok() {
        TargetKind::Host
    } else {
        kind
    };

    let mut ports = BTreeMap::new();
    for (check, port) in raw.ports.unwrap_or_default() {
        let at = check.span().start;
        let kind: CheckKind = check
            .get_ref()
            .parse()
            .map_err(|e: mxscope_proto::UnknownName| err(at, "ports", e.to_string()))?;
        if kind.default_port().is_none() {
            return Err(err(
                at,
                &format!("ports.{kind}"),
                format!("check '{kind}' has no port"),
            ));
        }
        let p = *port.get_ref();
        let p = u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
            err(
                port.span().start,
                &format!("ports.{kind}"),
                format!("port {p} is out of range (1-65535)"),
            )
        })?;
        ports.insert(kind, p);
    }

    // The rules every target shares (name, kind, checks, interval, ports) are proto's, the same
    // for file and central targets; the checks above only give span-precise messages. Ports of
    // checks the target does not list are service ports of delivery and mta-sts, kept out here.
    let core = pb::TargetSpec {
        name: name.clone(),
        checks: checks.iter().map(|c| c.name().to_string()).collect(),
        interval_ms: millis(interval),
        timeout_ms: millis(timeout),
        ports: ports
            .iter()
            .filter(|(c, _)| checks.contains(c))
            .map(|(c, p)| (c.name().to_string(), u32::from(*p)))
            .collect(),
        kind: kind.name().to_string(),
        require_tls: raw.require_tls.unwrap_or(false),
        ..Default::default()
    };
    target::validate(&core).map_err(|e| {
        let at = match e.field() {
            "name" => name_at,
            "checks" => checks_at,
            _ => table_start,
        };
        err(at, e.field(), e.to_string())
    })?;

    let mut options = CheckOptions::default();
    let address = |v: Option<Spanned<String>>, key: &str| match v {
        None => Ok(None),
        Some(s) if s.get_ref().contains('@') && !s.get_ref().contains(char::is_whitespace) => {
            Ok(Some(s.into_inner()))
        }
        Some(s) => Err(err(
            s.span().start,
            key,
            format!("'{}' is not a mail address", s.get_ref()),
        )),
    };
    options.mail_from = address(raw.mail_from, "mail_from")?;
    options.rcpt_to = address(raw.rcpt_to, "rcpt_to")?;
    if options.rcpt_to.is_some() && options.mail_from.is_none() {
        return Err(err(
            table_start,
            "mail_from",
            "required when rcpt_to is set".into(),
        ));
    }
    let days = |v: Option<Spanned<i64>>, key: &str, default: u32| match v {
        None => Ok(default),
        Some(d) => u32::try_from(*d.get_ref()).map_err(|_| {
            err(
                d.span().start,
                key,
                format!("{} is not a number of days", d.get_ref()),
            )
        }),
    };
    options.cert_warn_days = days(raw.cert_warn_days, "cert_warn_days", options.cert_warn_days)?;
    options.cert_fail_days = days(raw.cert_fail_days, "cert_fail_days", options.cert_fail_days)?;
    if options.cert_fail_days > options.cert_warn_days {
        return Err(err(
            table_start,
            "cert_fail_days",
            "must not exceed cert_warn_days".into(),
        ));
    }
    let dns_names = |v: Option<Vec<Spanned<String>>>, key: &str, what: &str| {
        let mut out: Vec<String> = Vec::new();
        for n in v.unwrap_or_default() {
            let name = names::normalize_domain(n.get_ref());
            if !names::is_dns_name(&name) {
                return Err(err(
                    n.span().start,
                    key,
                    format!("'{}' is not a {what}", n.get_ref()),
                ));
            }
            if !out.contains(&name) {
                out.push(name);
            }
        }
        Ok(out)
    };
    options.dkim_selectors = dns_names(raw.dkim_selectors, "dkim_selectors", "DKIM selector")?;
    options.dnsbl_zones = dns_names(raw.dnsbl_zones, "dnsbl_zones", "DNS zone name")?;
    if let Some(dir) = raw.queue_config_dir {
        if !dir.get_ref().starts_with('/') {
            return Err(err(
                dir.span().start,
                "queue_config_dir",
                format!("'{}' is not an absolute directory path", dir.get_ref()),
            ));
        }
        options.postfix_config_dir = Some(dir.into_inner());
    }
    options.service_ports = ports.clone();
    if let Some(name) = raw.credentials {
        let ok = !name.get_ref().is_empty()
            && name
                .get_ref()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            return Err(err(
                name.span().start,
                "credentials",
                format!(
                    "'{}' is not a login name (a [section] of the --credentials file)",
                    name.get_ref()
                ),
            ));
        }
        options.credentials = Some(name.into_inner());
    }
    if checks.contains(&CheckKind::Delivery) && options.credentials.is_none() {
        return Err(err(
            table_start,
            "credentials",
            "required by the 'delivery' check (the name of a login in the --credentials file)"
                .into(),
        ));
    }
    if let Some(p) = raw.mta_sts_port {
        options.mta_sts_port = u16::try_from(*p.get_ref())
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                err(
                    p.span().start,
                    "mta_sts_port",
                    format!("port {} is out of range (1-65535)", p.get_ref()),
                )
            })?;
    }
    for (check, list, key) in [
        (CheckKind::Dkim, &options.dkim_selectors, "dkim_selectors"),
        (CheckKind::Dnsbl, &options.dnsbl_zones, "dnsbl_zones"),
    ] {
        if checks.contains(&check) && list.is_empty() {
            return Err(err(
                table_start,
                key,
                format!("required by the '{check}' check (e.g. {key} = [\"...\"])"),
            ));
        }
    }

    Ok(Target {
        name,
        kind,
        checks,
        interval,
        timeout,
        require_tls: raw.require_tls.unwrap_or(false),
        ports,
        options,
    })
}

/// 1-based line of a byte offset.
fn line_of(text: &str, at: usize) -> usize {
    let at = at.min(text.len());
    text.as_bytes()[..at]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Which `[[target]]` table a byte offset falls in (for errors toml reports without a path).
fn target_index_at(text: &str, at: usize) -> Option<usize> {
    let at = at.min(text.len());
    let headers = text[..at]
        .lines()
        .filter(|l| l.trim_start().starts_with("[[target]]"))
        .count();
    headers.checked_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_targets("targets.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn good_file() {
        let text = r#"
[[target]]
name = "Example.COM."
checks = ["mx", "smtp", "imaps"]
interval = "30s"
timeout = "5s"
require_tls = true
ports = { smtp = 2525 }
mail_from = "probe@example.net"
rcpt_to = "postmaster@example.com"
cert_warn_days = 20
cert_fail_days = 5

[[target]]
name = "127.0.0.1"
checks = ["smtp"]
"#;
        let targets = parse_targets("targets.toml", text).unwrap();
        assert_eq!(targets.len(), 2);
        let t = &targets[0];
        assert_eq!(t.name, "example.com");
        assert_eq!(t.kind, TargetKind::Domain);
        assert_eq!(
            t.checks,
            vec![CheckKind::Mx, CheckKind::Smtp, CheckKind::Imaps]
        );
        assert_eq!(t.interval, Duration::from_secs(30));
        assert_eq!(t.timeout, Duration::from_secs(5));
        assert!(t.require_tls);
        assert_eq!(t.ports.get(&CheckKind::Smtp), Some(&2525));
        assert_eq!(t.options.mail_from.as_deref(), Some("probe@example.net"));
        assert_eq!(t.options.cert_warn_days, 20);
        assert_eq!(t.options.cert_fail_days, 5);
        let specs = t.check_specs();
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[1].port(), Some(2525));
        assert_eq!(specs[2].port(), Some(993));

        let h = &targets[1];
        assert_eq!(h.kind, TargetKind::Host, "an IP literal is always a host");
        assert_eq!(h.interval, DEFAULT_INTERVAL);
        assert_eq!(h.timeout, DEFAULT_TIMEOUT);
        let wire = h.to_local_spec();
        assert_eq!(wire.source, "local");
        assert_eq!(wire.kind, "host");
        assert_eq!(wire.interval_ms, 60_000);
    }

    #[test]
    fn syntax_error_has_line() {
        let text = "[[target]]\nname = \"a.example\"\nchecks = [\"mx\"]\n\n[[target]]\nname = b.example\nchecks = [\"mx\"]\n";
        let e = err(text);
        assert!(e.starts_with("targets.toml:6: target[1]: "), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = "[[target]]\nname = \"a.example\"\nchecks = [\"mx\"]\n\n[[target]]\nname = \"b.example\"\nchecks = [\"mx\"]\nintervall = \"30s\"\n";
        let e = err(text);
        assert!(
            e.starts_with("targets.toml:8: target[1].intervall: unknown key"),
            "{e}"
        );
        assert!(e.contains("interval"), "lists the valid keys: {e}");
    }

    #[test]
    fn unknown_check_lists_valid() {
        let text = "[[target]]\nname = \"a.example\"\nchecks = [\"mx\"]\n\n[[target]]\nname = \"b.example\"\n\nchecks = [\"mx\", \"smpt\"]\n";
        let e = err(text);
        assert!(
            e.starts_with(
                "targets.toml:8: target[1].checks: unknown check 'smpt' (valid: mx, smtp"
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_interval() {
        let e = err("[[target]]\nname = \"a.example\"\nchecks = [\"mx\"]\ninterval = \"soon\"\n");
        assert!(
            e.starts_with("targets.toml:4: target[0].interval: 'soon' is not a duration"),
            "{e}"
        );
        let e = err("[[target]]\nname = \"a.example\"\nchecks = [\"mx\"]\ninterval = \"0s\"\n");
        assert!(
            e.contains("target[0].interval: must be greater than zero"),
            "{e}"
        );
    }

    #[test]
    fn bad_port() {
        let e = err(
            "[[target]]\nname = \"a.example\"\nchecks = [\"smtp\"]\nports = { smtp = 70000 }\n",
        );
        assert!(
            e.starts_with("targets.toml:4: target[0].ports.smtp: port 70000 is out of range"),
            "{e}"
        );
        let e = err(
            "[[target]]\nname = \"a.example\"\nchecks = [\"smtp\"]\nports = { smtp = \"x\" }\n",
        );
        assert!(e.starts_with("targets.toml:4: target[0]"), "{e}");
        let e = err("[[target]]\nname = \"a.example\"\nchecks = [\"mx\"]\nports = { mx = 53 }\n");
        assert!(
            e.contains("target[0].ports.mx: check 'mx' has no port"),
            "{e}"
        );
    }

    #[test]
    fn missing_name() {
        let e = err("[[target]]\nchecks = [\"mx\"]\n\n[[target]]\nchecks = [\"mx\"]\n");
        assert!(e.contains("target[0].name: missing"), "{e}");
        assert!(e.starts_with("targets.toml:"), "{e}");
    }

    #[test]
    fn other_target_errors() {
        let e = err("[[target]]\nname = \"a.example\"\nchecks = []\n");
        assert!(
            e.contains("target[0].checks: must list at least one check"),
            "{e}"
        );
        let e = err("[[target]]\nname = \"a.example\"\nchecks = [\"mx\"]\n[[target]]\nname = \"A.example\"\nchecks = [\"mx\"]\n");
        assert!(
            e.contains("target[1].name: duplicate target 'a.example'"),
            "{e}"
        );
        let e = err("[[target]]\nname = \"a.example\"\nchecks = [\"mx\"]\nkind = \"mailbox\"\n");
        assert!(
            e.starts_with("targets.toml:4: target[0].kind: unknown kind 'mailbox'"),
            "{e}"
        );
        let e = err("[[target]]\nname = \"bad name\"\nchecks = [\"mx\"]\n");
        assert!(e.starts_with("targets.toml:2: target[0].name:"), "{e}");
    }

    #[test]
    fn delivery_and_mta_sts_fields() {
        let text = "[[target]]\nname = \"mail.example.test\"\nkind = \"host\"\nchecks = [\"delivery\", \"mta-sts\"]\ncredentials = \"probe\"\nports = { submission = 2587, imaps = 2993 }\nmta_sts_port = 8443\n";
        let t = &parse_targets("targets.toml", text).unwrap()[0];
        assert_eq!(t.options.credentials.as_deref(), Some("probe"));
        assert_eq!(t.options.mta_sts_port, 8443);
        let spec = &t.check_specs()[0];
        assert_eq!(spec.service_port(CheckKind::Submission), 2587);
        assert_eq!(spec.service_port(CheckKind::Imaps), 2993);
        assert_eq!(spec.service_port(CheckKind::Smtp), 25);
        let e = err("[[target]]\nname = \"a.example\"\nchecks = [\"delivery\"]\n");
        assert!(
            e.contains("target[0].credentials: required by the 'delivery' check"),
            "{e}"
        );
        let e = err("[[target]]\nname = \"a.example\"\nchecks = [\"mx\"]\nmta_sts_port = 0\n");
        assert!(
            e.contains("target[0].mta_sts_port: port 0 is out of range"),
            "{e}"
        );
    }

    #[test]
    fn tables_are_split_only_at_plain_headers() {
        let text = "# targets\n\n[[target]]\nname = \"a.example\"\nchecks = [\"mx\"]\n[ [ target ] ]\n  [[ target ]]  # second\nname = \"b.example\"\n[[target.x]]\n[[targets]]\n[[\"target\"]]\n";
        let starts = target_tables(text).expect("splittable");
        let lines: Vec<&str> = starts
            .iter()
            .map(|&s| text[s..].lines().next().unwrap())
            .collect();
        assert_eq!(lines, vec!["[[target]]", "  [[ target ]]  # second"]);
        assert_eq!(target_tables("[[target]]\nname = \"a\"\n"), Some(vec![0]));
        assert_eq!(target_tables("# only a comment\n"), Some(vec![]));
        // Anything but comments before the first header, or a multi-line string: read whole.
        assert_eq!(target_tables("target = []\n[[target]]\n"), None);
        assert_eq!(target_tables("\u{feff}[[target]]\n"), None);
        assert_eq!(
            target_tables("[[target]]\nname = \"\"\"\n[[target]]\n\"\"\"\n"),
            None
        );
        assert_eq!(target_tables("[[target]]\nname = '''x'''\n"), None);
    }

    #[test]
    fn table_by_table_reads_the_same_as_whole() {
        let text = r#"
# two targets, written in different ways
[[target]]
name = "Example.COM."
checks = ["mx", "smtp", "imaps"]
interval = "30s"
timeout = "5s"
require_tls = true
ports = { smtp = 2525 }
mail_from = "probe@example.net"
rcpt_to = "postmaster@example.com"
cert_warn_days = 20
cert_fail_days = 5

[[target]] # a host
name = "mail.example.test"
kind = "host"
checks = ["delivery", "mta-sts", "dkim", "dnsbl"]
credentials = "probe"
mta_sts_port = 8443
dkim_selectors = ["s1", "S2."]
dnsbl_zones = ["zen.example"]
queue_config_dir = "/etc/postfix"
[target.ports]
submission = 2587
imaps = 2993

[["target"]]
name = "192.0.2.1"
checks = ["smtp"]
"#;
        let starts = target_tables(text).expect("splittable");
        assert_eq!(
            starts.len(),
            2,
            "the quoted header stays in the table before it"
        );
        let tables = parse_tables(text, &starts).expect("every table reads");
        let whole = parse_whole("targets.toml", text).unwrap();
        assert_eq!(whole.len(), 3);
        assert_eq!(tables, whole);
        assert_eq!(parse_targets("targets.toml", text).unwrap(), whole);
        assert_eq!(whole[1].ports.get(&CheckKind::Submission), Some(&2587));
        assert_eq!(whole[1].options.dkim_selectors, vec!["s1", "s2"]);
        assert_eq!(whole[2].kind, TargetKind::Host);

        // The inline-array form is not split and reads the same.
        let inline = "target = [{ name = \"a.example\", checks = [\"mx\"] }]\n";
        assert_eq!(
            parse_targets("t.toml", inline).unwrap()[0].name,
            "a.example"
        );
    }

    #[test]
    fn errors_found_table_by_table_are_reported_as_for_the_whole_file() {
        // A bad check in the first table and a syntax error in the third: reading the whole file
        // stops at the syntax error first, and so must the table-by-table read.
        let text = "[[target]]\nname = \"a.example\"\nchecks = [\"smpt\"]\n\n[[target]]\nname = \"b.example\"\nchecks = [\"mx\"]\n\n[[target]]\nname = c.example\n";
        assert!(target_tables(text).is_some());
        let e = err(text);
        assert!(e.starts_with("targets.toml:10: target[2]: "), "{e}");
        // A duplicate across tables keeps its place and index.
        let dup = "[[target]]\nname = \"a.example\"\nchecks = [\"mx\"]\n\n[[target]]\nname = \"A.example.\"\nchecks = [\"mx\"]\n";
        let e = err(dup);
        assert!(
            e.starts_with("targets.toml:5: target[1].name: duplicate target 'a.example'"),
            "{e}"
        );
    }

    #[test]
    fn log_filter_reads_levels_and_targets() {
        use tracing::Level;
        let enabled = |f: &Targets, target: &str, level: Level| f.would_enable(target, &level);
        for unset in [None, Some(""), Some("  ")] {
            let (f, problem) = log_filter(unset);
            assert!(problem.is_none());
            assert!(enabled(&f, "mxscope_agent::uplink", Level::INFO));
            assert!(!enabled(&f, "mxscope_agent::uplink", Level::DEBUG));
        }
        let (f, problem) = log_filter(Some("warn"));
        assert!(problem.is_none());
        assert!(enabled(&f, "h2::codec", Level::WARN));
        assert!(!enabled(&f, "mxscope_agent", Level::INFO));
        let (f, _) = log_filter(Some("info,h2=off,mxscope_agent::spool=debug"));
        assert!(!enabled(&f, "h2::codec", Level::ERROR));
        assert!(enabled(&f, "mxscope_agent::spool", Level::DEBUG));
        assert!(!enabled(&f, "mxscope_agent::uplink", Level::DEBUG));
        assert!(enabled(&f, "tonic", Level::INFO));
        let (f, problem) = log_filter(Some("mxscope_agent=loud"));
        assert!(problem.is_some(), "a bad level is reported");
        assert!(
            enabled(&f, "mxscope_agent", Level::INFO),
            "and info is used"
        );
        assert!(!enabled(&f, "mxscope_agent", Level::DEBUG));
    }

    #[test]
    fn sizes_and_labels() {
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("1 GB"), Ok(1_000_000_000));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert_eq!(parse_label("asn=64500"), Ok(("asn".into(), "64500".into())));
        assert!(parse_label("novalue").is_err());
    }

    #[test]
    fn flags_validate_and_env_loses_to_flags() {
        let flags = Flags::try_parse_from([
            "mxscope-agent",
            "--collector",
            "http://127.0.0.1:7443",
            "--id",
            "eu-1",
            "--region",
            "eu-west",
            "--label",
            "net=dsl",
            "--label",
            "asn=1",
            "--spool-max",
            "1MiB",
        ])
        .unwrap();
        let cfg = AgentConfig::from_flags(flags).unwrap();
        assert_eq!(cfg.spool_max, 1 << 20);
        assert_eq!(cfg.spool_dir, PathBuf::from("./mxscope-spool-eu-1"));
        assert_eq!(cfg.labels.get("asn").map(String::as_str), Some("1"));
        assert_eq!(cfg.concurrency, 64);
        assert_eq!(cfg.per_host, 2);
        assert!(!cfg.helo_name.is_empty());

        let bad = |args: &[&str]| {
            let mut all = vec!["mxscope-agent", "--region", "r"];
            all.extend_from_slice(args);
            AgentConfig::from_flags(Flags::try_parse_from(all).unwrap())
                .unwrap_err()
                .to_string()
        };
        let e = bad(&["--collector", "http://127.0.0.1:7443", "--id", "Bad_Id"]);
        assert!(e.starts_with("--id: 'Bad_Id' is not a DNS label"), "{e}");
        let e = bad(&["--collector", "127.0.0.1:7443", "--id", "a"]);
        assert!(e.starts_with("--collector:"), "{e}");
        let e = bad(&["--collector", "http://127.0.0.1", "--id", "a"]);
        assert!(e.contains("expected https://host:port"), "{e}");
        let e = bad(&["--collector", "https://127.0.0.1:7443", "--id", "a"]);
        assert!(
            e.contains("--tls-cert") && e.contains("mxscopectl enroll"),
            "{e}"
        );
    }

    #[test]
    fn central_target_conversion() {
        let spec = pb::TargetSpec {
            name: "Mail.Example.".into(),
            checks: vec!["smtp".into(), "bogus".into()],
            interval_ms: 0,
            timeout_ms: 3000,
            ports: [("smtp".to_string(), 2525u32)].into_iter().collect(),
            source: "central".into(),
            kind: "host".into(),
            ..Default::default()
        };
        let (t, problems) = Target::from_central(&spec).unwrap();
        assert_eq!(t.name, "mail.example");
        assert_eq!(t.checks, vec![CheckKind::Smtp]);
        assert_eq!(t.kind, TargetKind::Host);
        assert_eq!(t.interval, DEFAULT_INTERVAL);
        assert_eq!(t.timeout, Duration::from_secs(3));
        assert_eq!(t.ports.get(&CheckKind::Smtp), Some(&2525));
        assert_eq!(problems.len(), 1, "{problems:?}");
        let none = pb::TargetSpec {
            name: "x.example".into(),
            checks: vec!["nope".into()],
            ..Default::default()
        };
        assert!(Target::from_central(&none).is_err());
    }
}
