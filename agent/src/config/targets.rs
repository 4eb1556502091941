//! Targets: one agent [`Target`] (proto's validated definition plus the agent-only options), read
//! from the TOML targets file with span-precise errors, or from a central target the collector
//! sent. Both go through proto's one target validator.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use mxscope_proto::names::{self, TargetName};
use mxscope_proto::target::{self, Source, TargetError};
use mxscope_proto::target::{DEFAULT_INTERVAL, DEFAULT_TIMEOUT};
use mxscope_proto::time::millis;
use mxscope_proto::{pb, CheckKind, UnknownName};
use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use crate::probe::{CheckOptions, CheckSpec, TargetKind};

/// One local or central target, validated: proto's definition (the same type the collector keeps
/// and ctl checks) and the options only the agent has, which never leave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub def: target::Target,
    pub options: CheckOptions,
}

impl Target {
    /// One probe spec per check.
    pub fn check_specs(&self) -> Vec<CheckSpec> {
        self.def
            .checks
            .iter()
            .map(|&c| self.check_spec(c))
            .collect()
    }

    /// The probe spec of one check of this target.
    pub fn check_spec(&self, check: CheckKind) -> CheckSpec {
        let def = &self.def;
        CheckSpec {
            target: def.name.clone(),
            kind: def.kind,
            check,
            port: def.ports.get(&check).copied(),
            timeout: def.timeout,
            interval: def.interval,
            require_tls: def.require_tls,
            options: CheckOptions {
                spf_senders: def.spf_senders.clone(),
                ..self.options.clone()
            },
        }
    }

    /// Wire form with `source = "local"` (credentials and MAIL FROM stay on the agent).
    pub fn to_local_spec(&self) -> pb::TargetSpec {
        self.def.to_wire("local")
    }

    /// Reads a central target through proto's one target validator ([`Source::Collector`]):
    /// checks this agent does not know are left out and returned as problems; a target with
    /// nothing runnable or a bad name is an error.
    pub fn from_central(spec: &pb::TargetSpec) -> Result<(Target, Vec<UnknownName>), TargetError> {
        let (def, problems) = target::validate_from(spec, Source::Collector)?;
        let options = CheckOptions {
            service_ports: def.ports.clone(),
            ..CheckOptions::default()
        };
        let target = Target { def, options };
        Ok((target, problems))
    }
}

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
    spf_senders: Option<Vec<Spanned<String>>>,
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
pub(super) fn target_tables(text: &str) -> Option<Vec<usize>> {
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
pub(super) fn parse_tables(text: &str, starts: &[usize]) -> Result<Vec<Target>, ()> {
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
            if !seen.insert(target.def.name.clone()) {
                return Err(());
            }
            targets.push(target);
        }
    }
    Ok(targets)
}

/// Reads the whole file as one TOML document.
pub(super) fn parse_whole(file: &str, text: &str) -> Result<Vec<Target>, ConfigError> {
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
        if !seen.insert(target.def.name.clone()) {
            return Err(ConfigError::Target {
                file: file.to_string(),
                line: line_of(text, span.start),
                key: format!("target[{i}].name"),
                message: format!("duplicate target '{}'", target.def.name),
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
    if TargetName::parse(&name).is_none() {
        return Err(err(name_at, "name", TargetError::BadName(name).to_string()));
    }

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
    // checks the target neither lists nor uses as a service stay agent-only (`service_ports`).
    let core = pb::TargetSpec {
        name: name.clone(),
        checks: checks.iter().map(|c| c.name().to_string()).collect(),
        interval_ms: millis(interval),
        timeout_ms: millis(timeout),
        ports: ports
            .iter()
            .filter(|(c, _)| checks.iter().any(|k| k == *c || k.services().contains(c)))
            .map(|(c, p)| (c.name().to_string(), u32::from(*p)))
            .collect(),
        kind: kind.name().to_string(),
        require_tls: raw.require_tls.unwrap_or(false),
        spf_senders: raw
            .spf_senders
            .iter()
            .flatten()
            .map(|s| s.get_ref().clone())
            .collect(),
        ..Default::default()
    };
    let def = target::validate(&core).map_err(|e| {
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

    Ok(Target { def, options })
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
