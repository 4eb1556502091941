//! Value parsers for command-line arguments: check lists, region selectors, labels, ports,
//! durations, target names and the collector URL. Each returns a message clap prints as a usage error.

use std::collections::BTreeSet;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use mxscope_proto::names::{self, TargetName};
use mxscope_proto::{target, CheckKind, Metric, TargetKind};
use tonic::transport::Uri;

/// A list of checks given as one comma-separated argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckList(pub Vec<CheckKind>);

impl CheckList {
    pub(crate) fn names(&self) -> Vec<String> {
        self.0.iter().map(|c| c.name().to_string()).collect()
    }
}

/// `--checks mx,smtp,imaps`: at least one check, each a known name, duplicates removed, order kept.
pub(crate) fn checks(s: &str) -> Result<CheckList, String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        if part.is_empty() {
            continue;
        }
        let kind: CheckKind = part
            .parse()
            .map_err(|e: mxscope_proto::UnknownName| e.to_string())?;
        if seen.insert(kind) {
            out.push(kind);
        }
    }
    if out.is_empty() {
        return Err("give at least one check, e.g. mx,smtp,imaps".to_string());
    }
    Ok(CheckList(out))
}

/// `--check smtp`: one known check name.
pub(crate) fn check(s: &str) -> Result<String, String> {
    let kind: CheckKind = s
        .trim()
        .parse()
        .map_err(|e: mxscope_proto::UnknownName| e.to_string())?;
    Ok(kind.name().to_string())
}

/// Which regions probe a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Regions {
    All,
    Only(Vec<String>),
}

impl Regions {
    /// The wire form: an empty list means all regions.
    pub(crate) fn into_wire(self) -> Vec<String> {
        match self {
            Regions::All => Vec::new(),
            Regions::Only(list) => list,
        }
    }
}

/// `--regions eu-west,us-east` or `--regions all`.
pub(crate) fn regions(s: &str) -> Result<Regions, String> {
    let parts: Vec<&str> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() {
        return Err("give region names separated by commas, or 'all'".to_string());
    }
    if parts.contains(&"all") {
        if parts.len() > 1 {
            return Err("'all' cannot be combined with region names".to_string());
        }
        return Ok(Regions::All);
    }
    let mut out: Vec<String> = Vec::new();
    for p in parts {
        let name = region(p)?;
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(Regions::Only(out))
}

/// A region name: a DNS-label style word (`eu-west`, `dc1`).
pub(crate) fn region(s: &str) -> Result<String, String> {
    label_name(s, "region")
}

/// An agent id: a DNS label, like the agent requires.
pub(crate) fn agent_id(s: &str) -> Result<String, String> {
    label_name(s, "agent id")
}

/// A certificate serial (`mxscopectl revoke --serial`): hex, case and colons do not matter.
pub(crate) fn serial(s: &str) -> Result<mxscope_pki::Serial, String> {
    s.parse().map_err(|e: mxscope_pki::PkiError| e.to_string())
}

/// A certificate's SHA-256 fingerprint (`mxscopectl revoke --fingerprint`).
pub(crate) fn fingerprint(s: &str) -> Result<mxscope_pki::Fingerprint, String> {
    s.parse().map_err(|e: mxscope_pki::PkiError| e.to_string())
}

/// A name following [`names::is_label`]; `what` names it in the message.
fn label_name(s: &str, what: &str) -> Result<String, String> {
    if names::is_label(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid {what} '{s}': use lowercase letters, digits and '-' (at most 63 characters)"
        ))
    }
}

/// `--label key=value`; the value may be empty (in `target update` that removes the label).
pub(crate) fn label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid label '{s}': expected key=value"))?;
    let k = k.trim();
    if !target::is_label_key(k) {
        return Err(format!(
            "invalid label key '{k}': use letters, digits, '-', '_', '.', '/' (at most 63 characters)"
        ));
    }
    Ok((k.to_string(), v.trim().to_string()))
}

/// `--port smtp=2525`: a check that talks to a port, and a port number. An empty port
/// (`smtp=`) is `None`: in `target update` it removes the override.
pub(crate) fn port(s: &str) -> Result<(CheckKind, Option<u16>), String> {
    let (c, p) = s.split_once('=').ok_or_else(|| {
        format!("invalid port override '{s}': expected check=port, e.g. smtp=2525")
    })?;
    let check: CheckKind = c
        .trim()
        .parse()
        .map_err(|e: mxscope_proto::UnknownName| e.to_string())?;
    if check.default_port().is_none() {
        let with_ports: Vec<&str> = CheckKind::ALL
            .iter()
            .filter(|k| k.default_port().is_some())
            .map(|k| k.name())
            .collect();
        return Err(format!(
            "check '{check}' has no port (checks with ports: {})",
            with_ports.join(", ")
        ));
    }
    let p = p.trim();
    if p.is_empty() {
        return Ok((check, None));
    }
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok((check, Some(n))),
        _ => Err(format!("invalid port '{p}': expected 1..65535")),
    }
}

/// A positive duration such as `30s`, `5m`, `1h30m`, `500ms`.
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration '{s}': {e} (examples: 500ms, 30s, 5m, 1h)"))?;
    if d.is_zero() {
        return Err(format!("invalid duration '{s}': must be greater than zero"));
    }
    Ok(d)
}

/// A target name: a domain or host name (letters, digits, '-', '_', dots) or an IP address. Names
/// are lowercased and a trailing dot is dropped, so `Example.COM.` and `example.com` are one target.
pub(crate) fn target_name(s: &str) -> Result<String, String> {
    TargetName::parse(s)
        .map(|name| name.canonical())
        .ok_or_else(|| {
            format!(
                "invalid target name '{}' (expected a domain, a host name or an IP address)",
                s.trim()
            )
        })
}

/// `--kind domain|host`, listing the valid values in help and errors.
pub(crate) fn target_kind() -> impl TypedValueParser<Value = TargetKind> {
    PossibleValuesParser::new(TargetKind::ALL.iter().map(|k| k.name()))
        .try_map(|s| s.parse::<TargetKind>())
}

/// `--metric reachability|p50|p95|p99`, listing the valid values in help and errors.
pub(crate) fn metric() -> impl TypedValueParser<Value = Metric> {
    PossibleValuesParser::new(Metric::ALL.iter().map(|m| m.name())).try_map(|s| s.parse::<Metric>())
}

/// `--collector URL`: `http://host:port` or `https://host:port`.
pub(crate) fn collector_url(s: &str) -> Result<String, String> {
    let uri: Uri = s
        .parse()
        .map_err(|e| format!("invalid collector URL '{s}': {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(format!(
                "invalid collector URL '{s}': use http://HOST:PORT or https://HOST:PORT"
            ))
        }
    }
    if uri.authority().is_none() {
        return Err(format!("invalid collector URL '{s}': no host"));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_list_parses_dedupes_and_keeps_order() {
        let got = checks("mx, smtp,imaps,smtp").unwrap();
        assert_eq!(
            got.0,
            vec![CheckKind::Mx, CheckKind::Smtp, CheckKind::Imaps]
        );
        assert_eq!(got.names(), vec!["mx", "smtp", "imaps"]);
        assert_eq!(checks("mta-sts").unwrap().0, vec![CheckKind::MtaSts]);
    }

    #[test]
    fn unknown_check_lists_the_valid_names() {
        let err = checks("mx,smpt").unwrap_err();
        assert!(err.contains("unknown check 'smpt'"), "{err}");
        for k in CheckKind::ALL {
            assert!(err.contains(k.name()), "{err} misses {k}");
        }
        assert!(checks(" , ").is_err());
    }

    #[test]
    fn regions_all_and_lists() {
        assert_eq!(regions("all").unwrap(), Regions::All);
        assert_eq!(regions("all").unwrap().into_wire(), Vec::<String>::new());
        assert_eq!(
            regions("eu-west,us-east,eu-west").unwrap(),
            Regions::Only(vec!["eu-west".into(), "us-east".into()])
        );
        assert!(regions("all,eu-west").unwrap_err().contains("'all'"));
        assert!(regions("EU West").is_err());
        assert!(regions("").is_err());
    }

    #[test]
    fn labels_split_on_first_equals() {
        assert_eq!(label("team=mail").unwrap(), ("team".into(), "mail".into()));
        assert_eq!(label("url=a=b").unwrap(), ("url".into(), "a=b".into()));
        assert_eq!(label("gone=").unwrap(), ("gone".into(), String::new()));
        assert!(label("novalue").unwrap_err().contains("key=value"));
        assert!(label("=x").is_err());
        assert!(label("bad key=x").is_err());
    }

    #[test]
    fn port_overrides() {
        assert_eq!(port("smtp=2525").unwrap(), (CheckKind::Smtp, Some(2525)));
        assert_eq!(port("imaps=").unwrap(), (CheckKind::Imaps, None));
        assert!(port("smtp=0").is_err());
        assert!(port("smtp=70000").is_err());
        assert!(port("mx=53").unwrap_err().contains("has no port"));
        assert!(port("smpt=25").unwrap_err().contains("unknown check"));
        assert!(port("smtp").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(duration("0s").unwrap_err().contains("greater than zero"));
        assert!(duration("soon")
            .unwrap_err()
            .contains("invalid duration 'soon'"));
        assert!(duration("60").is_err());
    }

    #[test]
    fn target_names() {
        assert_eq!(target_name("Example.COM.").unwrap(), "example.com");
        assert_eq!(
            target_name("mx1.mail.example.test").unwrap(),
            "mx1.mail.example.test"
        );
        assert_eq!(target_name("localhost").unwrap(), "localhost");
        assert_eq!(
            target_name("mail_1.example.com").unwrap(),
            "mail_1.example.com"
        );
        assert_eq!(target_name("127.0.0.1").unwrap(), "127.0.0.1");
        assert_eq!(target_name("::1").unwrap(), "::1");
        for bad in [
            "",
            "exa mple.com",
            "-bad.com",
            "bad-.com",
            "a..b",
            "-under_score.com",
            "1.2.3.999",
            "a@b.c",
        ] {
            assert!(target_name(bad).is_err(), "accepted {bad:?}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(target_name(&long_label).is_err());
    }

    #[test]
    fn collector_urls() {
        assert!(collector_url("http://127.0.0.1:7443").is_ok());
        assert!(collector_url("https://collector.example.net:7443").is_ok());
        assert!(collector_url("127.0.0.1:7443").is_err());
        assert!(collector_url("ftp://x:1").is_err());
        assert!(collector_url("http://").is_err());
    }
}
