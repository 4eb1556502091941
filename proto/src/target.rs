//! What a target is and the one validator for target definitions: central targets on `PutTarget`
//! (collector), their copies on agents, agent-local targets files (after TOML parsing) and ctl's
//! pre-flight check all go through [`validate`], so they accept and refuse the same things.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::names::{self, TargetName};
use crate::{pb, CheckKind, UnknownName};

named_enum! {
    /// Whether a target names a mail domain (expanded through MX) or one host, probed directly.
    #[derive(Default)]
    pub enum TargetKind ("target kind") {
        #[default]
        Domain => "domain",
        Host => "host",
    }
}

/// How often a target is probed when it does not say.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// How long one probe may take when the target does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest interval accepted.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest label key or value on a target.
pub const MAX_LABEL_KEY_LEN: usize = 63;

/// Where a target definition comes from; the source decides how unknown checks are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Typed by a user (ctl, a targets file, `PutTarget`): every mistake is an error.
    User,
    /// Received by an agent from its collector: checks this build does not know are left out and
    /// reported, since a newer collector may know more checks than an older agent.
    Collector,
}

/// Why a target definition was refused. Each variant names the field at fault ([`field`]), so a
/// targets file can point at the line.
///
/// [`field`]: TargetError::field
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error("target name '{0}' is not a domain name, host name or IP address")]
    BadName(String),
    #[error("target '{0}' has no checks (give at least one)")]
    NoChecks(String),
    #[error(transparent)]
    UnknownCheck(#[from] UnknownName),
    #[error("interval {0}ms is too short (at least 1s)")]
    IntervalTooShort(u64),
    #[error("unknown target kind '{0}' (valid: domain, host)")]
    BadKind(String),
    #[error("'{0}' is an IP address, so the target kind must be host")]
    IpAsDomain(String),
    #[error("port override for '{check}' must be between 1 and 65535, got {port}")]
    BadPort { check: String, port: u32 },
    #[error("check '{0}' has no port to override")]
    PortlessCheck(String),
    #[error("port override names check '{0}', which the target does not run")]
    PortForAbsentCheck(String),
    #[error("region '{0}' is not a valid region name ({rule}, e.g. eu-west)", rule = names::LABEL_RULE)]
    BadRegion(String),
    #[error("spf sender '{0}' is not an IP address")]
    BadSpfSender(String),
    #[error("spf_senders are given but the target does not run the spf check")]
    SpfSendersWithoutSpf,
    #[error(
        "label key '{0}' is not valid (1-63 letters, digits and '-', '_', '.', '/'; e.g. team=mail)"
    )]
    BadLabelKey(String),
}

impl TargetError {
    /// The field of the definition at fault, as a targets file spells it.
    pub fn field(&self) -> &'static str {
        match self {
            TargetError::BadName(_) => "name",
            TargetError::NoChecks(_) | TargetError::UnknownCheck(_) => "checks",
            TargetError::IntervalTooShort(_) => "interval",
            TargetError::BadKind(_) | TargetError::IpAsDomain(_) => "kind",
            TargetError::BadPort { .. }
            | TargetError::PortlessCheck(_)
            | TargetError::PortForAbsentCheck(_) => "ports",
            TargetError::BadRegion(_) => "regions",
            TargetError::BadLabelKey(_) => "labels",
            TargetError::BadSpfSender(_) | TargetError::SpfSendersWithoutSpf => "spf_senders",
        }
    }
}

/// A valid target definition in canonical form: lowercase name without trailing dot, checks
/// de-duplicated in the given order, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub kind: TargetKind,
    pub checks: Vec<CheckKind>,
    pub interval: Duration,
    pub timeout: Duration,
    pub ports: BTreeMap<CheckKind, u16>,
    /// Empty = every region.
    pub regions: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub require_tls: bool,
    /// Outbound addresses the `spf` check evaluates the domain's policy for, de-duplicated.
    pub spf_senders: Vec<IpAddr>,
}

impl Target {
    /// The wire form, with the given source (`central` or `local`).
    pub fn to_wire(&self, source: &str) -> pb::TargetSpec {
        pb::TargetSpec {
            name: self.name.clone(),
            checks: self.checks.iter().map(|c| c.name().to_string()).collect(),
            interval_ms: crate::time::millis(self.interval),
            timeout_ms: crate::time::millis(self.timeout),
            regions: self.regions.clone(),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ports: self
                .ports
                .iter()
                .map(|(c, p)| (c.name().to_string(), u32::from(*p)))
                .collect(),
            source: source.to_string(),
            require_tls: self.require_tls,
            kind: self.kind.name().to_string(),
            spf_senders: self.spf_senders.iter().map(ToString::to_string).collect(),
        }
    }
}

/// A label key: 1-63 letters, digits and `-`, `_`, `.`, `/`.
pub fn is_label_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_LABEL_KEY_LEN
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

/// Validates a definition typed by a user ([`Source::User`]).
pub fn validate(spec: &pb::TargetSpec) -> Result<Target, TargetError> {
    validate_from(spec, Source::User).map(|(t, _)| t)
}

/// Validates a definition; with [`Source::Collector`] unknown checks (and their port overrides)
/// are left out and returned as problems instead of refusing the target.
pub fn validate_from(
    spec: &pb::TargetSpec,
    source: Source,
) -> Result<(Target, Vec<UnknownName>), TargetError> {
    let parsed =
        TargetName::parse(&spec.name).ok_or_else(|| TargetError::BadName(spec.name.clone()))?;
    let name = parsed.canonical();
    let is_ip = matches!(parsed, TargetName::Ip(_));
    let kind = match (spec.kind.trim(), is_ip) {
        ("", true) | ("host", _) => TargetKind::Host,
        ("", false) | ("domain", false) => TargetKind::Domain,
        ("domain", true) => return Err(TargetError::IpAsDomain(name)),
        (other, _) => return Err(TargetError::BadKind(other.to_string())),
    };
    let mut checks: Vec<CheckKind> = Vec::new();
    let mut unknown = Vec::new();
    for c in &spec.checks {
        match c.trim().parse::<CheckKind>() {
            Ok(kind) => {
                if !checks.contains(&kind) {
                    checks.push(kind);
                }
            }
            Err(e) if source == Source::Collector => unknown.push(e),
            Err(e) => return Err(e.into()),
        }
    }
    if checks.is_empty() {
        return Err(TargetError::NoChecks(name));
    }
    let interval = match spec.interval_ms {
        0 => DEFAULT_INTERVAL,
        ms if Duration::from_millis(ms) < MIN_INTERVAL => {
            return Err(TargetError::IntervalTooShort(ms))
        }
        ms => Duration::from_millis(ms),
    };
    let timeout = match spec.timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(ms),
    };
    let mut ports = BTreeMap::new();
    for (check, port) in &spec.ports {
        let kind: CheckKind = match check.parse() {
            Ok(k) => k,
            Err(_) if source == Source::Collector => continue,
            Err(e) => return Err(TargetError::UnknownCheck(e)),
        };
        if kind.default_port().is_none() {
            return Err(TargetError::PortlessCheck(check.clone()));
        }
        if !checks
            .iter()
            .any(|c| *c == kind || c.services().contains(&kind))
        {
            return Err(TargetError::PortForAbsentCheck(check.clone()));
        }
        let p = u16::try_from(*port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| TargetError::BadPort {
                check: check.clone(),
                port: *port,
            })?;
        ports.insert(kind, p);
    }
    let mut regions: Vec<String> = Vec::new();
    for r in &spec.regions {
        if !names::is_label(r) {
            return Err(TargetError::BadRegion(r.clone()));
        }
        if !regions.contains(r) {
            regions.push(r.clone());
        }
    }
    let mut labels = BTreeMap::new();
    for (k, v) in &spec.labels {
        if !is_label_key(k) {
            return Err(TargetError::BadLabelKey(k.clone()));
        }
        labels.insert(k.clone(), v.clone());
    }
    let mut spf_senders: Vec<IpAddr> = Vec::new();
    for s in &spec.spf_senders {
        let ip = names::parse_ip_literal(s.trim())
            .ok_or_else(|| TargetError::BadSpfSender(s.clone()))?;
        if !spf_senders.contains(&ip) {
            spf_senders.push(ip);
        }
    }
    if !spf_senders.is_empty() && !checks.contains(&CheckKind::Spf) {
        return Err(TargetError::SpfSendersWithoutSpf);
    }
    let target = Target {
        name,
        kind,
        checks,
        interval,
        timeout,
        ports,
        regions,
        labels,
        require_tls: spec.require_tls,
        spf_senders,
    };
    Ok((target, unknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, checks: &[&str]) -> pb::TargetSpec {
        pb::TargetSpec {
            name: name.into(),
            checks: checks.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn spf_senders_are_addresses_of_a_target_with_the_spf_check() {
        let mut s = spec("example.test", &["spf"]);
        s.spf_senders = vec![
            "192.0.2.1".into(),
            "[2001:db8::1]".into(),
            "192.0.2.1".into(),
        ];
        let t = validate(&s).unwrap();
        assert_eq!(
            t.spf_senders,
            vec![
                "192.0.2.1".parse::<IpAddr>().unwrap(),
                "2001:db8::1".parse().unwrap()
            ]
        );
        assert_eq!(validate(&t.to_wire("central")).unwrap(), t);
        s.spf_senders = vec!["mail.example.test".into()];
        let e = validate(&s).unwrap_err();
        assert_eq!(e, TargetError::BadSpfSender("mail.example.test".into()));
        assert_eq!(e.field(), "spf_senders");
        let mut s = spec("example.test", &["mx"]);
        s.spf_senders = vec!["192.0.2.1".into()];
        assert_eq!(validate(&s), Err(TargetError::SpfSendersWithoutSpf));
    }

    #[test]
    fn accepts_domains_hosts_and_ips_with_defaults() {
        let d = validate(&spec("Example.TEST.", &["smtp", "mx", "smtp"])).unwrap();
        assert_eq!(d.name, "example.test");
        assert_eq!(d.kind, TargetKind::Domain);
        assert_eq!(d.checks, vec![CheckKind::Smtp, CheckKind::Mx]);
        assert_eq!((d.interval, d.timeout), (DEFAULT_INTERVAL, DEFAULT_TIMEOUT));
        assert_eq!(
            validate(&spec("localhost", &["imap"])).unwrap().name,
            "localhost"
        );
        let ip = validate(&spec("127.0.0.1", &["smtp"])).unwrap();
        assert_eq!(ip.kind, TargetKind::Host);
        let v6 = validate(&spec("[::1]", &["smtp"])).unwrap();
        assert_eq!((v6.name.as_str(), v6.kind), ("::1", TargetKind::Host));
        let wire = d.to_wire("central");
        assert_eq!(wire.kind, "domain");
        assert_eq!(validate(&wire).unwrap(), d);
    }

    #[test]
    fn refuses_bad_names() {
        for bad in [
            "",
            "-a.test",
            "a-.test",
            "a..test",
            "under score.test",
            "256.1.1.1",
            "a b",
            &"x".repeat(64),
        ] {
            let err = validate(&spec(bad, &["mx"])).unwrap_err();
            assert!(matches!(err, TargetError::BadName(_)), "{bad}: {err}");
            assert_eq!(err.field(), "name");
        }
        assert!(validate(&spec("_dmarc.under_score.test", &["mx"])).is_ok());
    }

    #[test]
    fn unknown_checks_refused_from_users_and_skipped_from_the_collector() {
        let s = spec("example.test", &["smpt", "mx"]);
        let msg = validate(&s).unwrap_err().to_string();
        assert!(
            msg.contains("unknown check 'smpt'") && msg.contains("mta-sts"),
            "{msg}"
        );
        let (t, problems) = validate_from(&s, Source::Collector).unwrap();
        assert_eq!(t.checks, vec![CheckKind::Mx]);
        assert_eq!(problems.len(), 1);
        assert_eq!(
            validate_from(&spec("example.test", &["smpt"]), Source::Collector).unwrap_err(),
            TargetError::NoChecks("example.test".into())
        );
    }

    #[test]
    fn interval_kind_ports_regions_and_labels() {
        let mut s = spec("example.test", &["smtp"]);
        s.interval_ms = 999;
        assert_eq!(
            validate(&s).unwrap_err(),
            TargetError::IntervalTooShort(999)
        );
        s.interval_ms = 1_000;
        s.timeout_ms = 2_000;
        let d = validate(&s).unwrap();
        assert_eq!(
            (d.interval, d.timeout),
            (MIN_INTERVAL, Duration::from_secs(2))
        );
        s.kind = "mailbox".into();
        assert_eq!(
            validate(&s).unwrap_err(),
            TargetError::BadKind("mailbox".into())
        );
        s.kind = "host".into();
        assert_eq!(validate(&s).unwrap().kind, TargetKind::Host);
        let mut ip = spec("127.0.0.2", &["smtp"]);
        ip.kind = "domain".into();
        assert!(matches!(
            validate(&ip).unwrap_err(),
            TargetError::IpAsDomain(_)
        ));

        s.ports.insert("smtp".into(), 2525);
        assert_eq!(
            validate(&s).unwrap().ports.get(&CheckKind::Smtp),
            Some(&2525)
        );
        s.ports.insert("imap".into(), 1143);
        assert_eq!(
            validate(&s).unwrap_err(),
            TargetError::PortForAbsentCheck("imap".into())
        );
        s.ports.remove("imap");
        s.ports.insert("smtp".into(), 70_000);
        assert!(matches!(
            validate(&s).unwrap_err(),
            TargetError::BadPort { .. }
        ));
        s.ports.clear();
        let mut d = spec("example.test", &["delivery"]);
        d.ports.insert("submission".into(), 2587);
        d.ports.insert("imaps".into(), 2993);
        assert_eq!(
            validate(&d).unwrap().ports.len(),
            2,
            "delivery's services take overrides"
        );
        s.checks.push("mx".into());
        s.ports.insert("mx".into(), 53);
        assert_eq!(
            validate(&s).unwrap_err(),
            TargetError::PortlessCheck("mx".into())
        );
        s.ports.clear();

        s.regions = vec!["eu-west".into(), "eu-west".into()];
        assert_eq!(validate(&s).unwrap().regions, vec!["eu-west"]);
        s.regions = vec!["EU West".into()];
        assert_eq!(
            validate(&s).unwrap_err(),
            TargetError::BadRegion("EU West".into())
        );
        s.regions.clear();
        s.labels.insert("team".into(), "mail".into());
        assert!(validate(&s).is_ok());
        s.labels.insert("bad key".into(), "x".into());
        assert_eq!(validate(&s).unwrap_err().field(), "labels");
    }
}
