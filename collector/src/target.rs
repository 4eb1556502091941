//! Validation of central targets on `PutTarget`: name, checks, ports, regions, kind and timing
//! defaults. Produces the normalized [`TargetDef`] the store keeps and agents receive.

use std::net::IpAddr;

use mxscope_proto::{pb, CheckKind, UnknownName};

use crate::store::TargetDef;

/// Interval used when a target does not set one.
pub const DEFAULT_INTERVAL_MS: u64 = 60_000;
/// Timeout used when a target does not set one.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Shortest interval accepted.
pub const MIN_INTERVAL_MS: u64 = 1_000;

/// Why a target was refused; the message tells the user what to change.
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
    #[error("port override names check '{0}', which the target does not run")]
    PortForAbsentCheck(String),
    #[error(
        "region '{0}' is not a valid region name (lowercase letters, digits and '-', up to 63)"
    )]
    BadRegion(String),
}

/// True for DNS-label style names: `[a-z0-9-]{1,63}` (used for agent ids and regions).
pub fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A host or domain name: dot-separated labels of letters, digits, inner hyphens and underscores
/// (as in `_dmarc`-style names, which ctl and the agent accept too), at most 253 characters, last
/// label not all digits. One trailing dot is allowed.
pub fn is_domain_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = s.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|l| !l.bytes().all(|b| b.is_ascii_digit()))
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    let inner = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s);
    inner.parse().ok()
}

/// Validates and normalizes a central target (lowercase name without trailing dot, defaults
/// filled in, checks de-duplicated in the given order).
pub fn validate(spec: &pb::TargetSpec) -> Result<TargetDef, TargetError> {
    let raw = spec.name.trim();
    let ip = parse_ip(raw);
    let name = match ip {
        Some(ip) => ip.to_string(),
        None if is_domain_name(raw) => raw.trim_end_matches('.').to_ascii_lowercase(),
        None => return Err(TargetError::BadName(spec.name.clone())),
    };
    let kind = match (spec.kind.as_str(), ip) {
        ("", Some(_)) | ("host", _) => "host",
        ("", None) | ("domain", None) => "domain",
        ("domain", Some(_)) => return Err(TargetError::IpAsDomain(name)),
        (other, _) => return Err(TargetError::BadKind(other.to_string())),
    };
    let mut checks: Vec<String> = Vec::new();
    for c in &spec.checks {
        let kind: CheckKind = c.trim().parse()?;
        if !checks.iter().any(|k| k == kind.name()) {
            checks.push(kind.name().to_string());
        }
    }
    if checks.is_empty() {
        return Err(TargetError::NoChecks(name));
    }
    let interval_ms = match spec.interval_ms {
        0 => DEFAULT_INTERVAL_MS,
        ms if ms < MIN_INTERVAL_MS => return Err(TargetError::IntervalTooShort(ms)),
        ms => ms,
    };
    let timeout_ms = if spec.timeout_ms == 0 {
        DEFAULT_TIMEOUT_MS
    } else {
        spec.timeout_ms
    };
    for (check, port) in &spec.ports {
        let kind: CheckKind = check.parse()?;
        if !checks.iter().any(|c| c == kind.name()) {
            return Err(TargetError::PortForAbsentCheck(check.clone()));
        }
        if *port == 0 || *port > 65535 {
            return Err(TargetError::BadPort {
                check: check.clone(),
                port: *port,
            });
        }
    }
    let mut regions: Vec<String> = Vec::new();
    for r in &spec.regions {
        if !is_label(r) {
            return Err(TargetError::BadRegion(r.clone()));
        }
        if !regions.contains(r) {
            regions.push(r.clone());
        }
    }
    let mut def = TargetDef::from_wire(spec);
    def.name = name;
    def.kind = kind.to_string();
    def.checks = checks;
    def.interval_ms = interval_ms;
    def.timeout_ms = timeout_ms;
    def.regions = regions;
    Ok(def)
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
    fn accepts_domains_hosts_and_ips_with_defaults() {
        let d = validate(&spec("Example.TEST.", &["smtp", "mx", "smtp"])).unwrap();
        assert_eq!(d.name, "example.test");
        assert_eq!(d.kind, "domain");
        assert_eq!(d.checks, vec!["smtp", "mx"]);
        assert_eq!(d.interval_ms, 60_000);
        assert_eq!(d.timeout_ms, 10_000);

        let h = validate(&spec("localhost", &["imap"])).unwrap();
        assert_eq!(h.name, "localhost");

        let ip = validate(&spec("127.0.0.1", &["smtp"])).unwrap();
        assert_eq!(ip.kind, "host");
        let v6 = validate(&spec("[::1]", &["smtp"])).unwrap();
        assert_eq!(v6.name, "::1");
        assert_eq!(v6.kind, "host");
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
        }
        // Underscores are accepted, as ctl and the agent's config accept them.
        assert!(validate(&spec("_dmarc.under_score.test", &["mx"])).is_ok());
        let msg = validate(&spec("bad name", &["mx"]))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("not a domain name, host name or IP address"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_check_lists_valid_names() {
        let msg = validate(&spec("example.test", &["smpt"]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("unknown check 'smpt'"), "{msg}");
        assert!(
            msg.contains("submission") && msg.contains("mta-sts"),
            "{msg}"
        );
        assert_eq!(
            validate(&spec("example.test", &[])).unwrap_err(),
            TargetError::NoChecks("example.test".into())
        );
    }

    #[test]
    fn interval_kind_ports_and_regions() {
        let mut s = spec("example.test", &["smtp"]);
        s.interval_ms = 999;
        assert_eq!(
            validate(&s).unwrap_err(),
            TargetError::IntervalTooShort(999)
        );
        s.interval_ms = 1_000;
        s.timeout_ms = 2_000;
        let d = validate(&s).unwrap();
        assert_eq!((d.interval_ms, d.timeout_ms), (1_000, 2_000));

        s.kind = "mailbox".into();
        assert_eq!(
            validate(&s).unwrap_err(),
            TargetError::BadKind("mailbox".into())
        );
        s.kind = "host".into();
        assert_eq!(validate(&s).unwrap().kind, "host");
        let mut ip = spec("127.0.0.2", &["smtp"]);
        ip.kind = "domain".into();
        assert!(matches!(
            validate(&ip).unwrap_err(),
            TargetError::IpAsDomain(_)
        ));

        s.ports.insert("smtp".into(), 2525);
        assert_eq!(validate(&s).unwrap().ports.get("smtp"), Some(&2525));
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

        s.regions = vec!["eu-west".into(), "eu-west".into()];
        assert_eq!(validate(&s).unwrap().regions, vec!["eu-west"]);
        s.regions = vec!["EU West".into()];
        assert_eq!(
            validate(&s).unwrap_err(),
            TargetError::BadRegion("EU West".into())
        );
    }

    #[test]
    fn labels() {
        assert!(is_label("eu-west-1"));
        assert!(!is_label(""));
        assert!(!is_label("Eu"));
        assert!(!is_label(&"a".repeat(64)));
        assert!(!is_label("a.b"));
    }
}
