//! The alert rules: what the rules file (`--alert-rules`, TOML) says, validated with `file:line`
//! errors, and the built-in defaults used when there is no file. A rule names a condition kind
//! (closed set, [`Kind`]) and its thresholds, severity and labels.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The conditions a rule can watch (closed set: they are also `/metrics` label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// The mail-level verdict of (target, check) is `down`: no answering region receives mail.
    Down,
    /// Some regions fail, others work, for at least `for`.
    Partial,
    /// A backup MX (not the preferred one) fails while mail is still received.
    Redundancy,
    /// A certificate (any region, any MX, any port) expires within `days`.
    CertExpiry,
    /// An SPF/DMARC/MTA-STS/DANE finding that was not there before.
    Policy,
    /// MX set, MX addresses, SPF/DMARC/MTA-STS/TLSA text or certificate fingerprint changed.
    Drift,
    /// An agent stopped reporting (stale).
    AgentDown,
    /// An agent's failures are its own network (`analysis::diagnosis::agent_faults`).
    AgentNetwork,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Down,
        Kind::Partial,
        Kind::Redundancy,
        Kind::CertExpiry,
        Kind::Policy,
        Kind::Drift,
        Kind::AgentDown,
        Kind::AgentNetwork,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Down => "down",
            Kind::Partial => "partial",
            Kind::Redundancy => "redundancy",
            Kind::CertExpiry => "cert-expiry",
            Kind::Policy => "policy",
            Kind::Drift => "drift",
            Kind::AgentDown => "agent-down",
            Kind::AgentNetwork => "agent-network",
        }
    }

    /// Whether the alert is about an agent rather than a target.
    pub fn about_agent(self) -> bool {
        matches!(self, Kind::AgentDown | Kind::AgentNetwork)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s).ok_or(())
    }
}

/// One validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Unique in the file; the alert's `alertname`.
    pub name: String,
    pub kind: Kind,
    /// How long the condition must hold (after confirmation) before the alert fires.
    pub for_: Duration,
    /// `cert-expiry` only: fire when a certificate expires within this many days.
    pub days: u32,
    pub severity: String,
    pub labels: BTreeMap<String, String>,
    /// Only these targets (empty: all).
    pub targets: Vec<String>,
    /// Only these checks (empty: all the kind applies to).
    pub checks: Vec<String>,
    /// Re-send a firing alert this often (0: never).
    pub repeat: Duration,
}

impl Rule {
    /// Whether the rule looks at this (target, check).
    pub fn applies(&self, target: &str, check: &str) -> bool {
        (self.targets.is_empty() || self.targets.iter().any(|t| t == target))
            && (self.checks.is_empty() || self.checks.iter().any(|c| c == check))
    }
}

/// The rules in force and the engine's settings from the same file.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub rules: Vec<Rule>,
    /// How long to wait for the answers of the regions asked to confirm, at most.
    pub confirm_wait: Duration,
}

impl Rules {
    pub fn get(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }
}

/// The repeat interval when a rule and the file's `[defaults]` say nothing.
pub const DEFAULT_REPEAT: Duration = Duration::from_secs(4 * 3600);
/// The confirmation wait when the file says nothing.
pub const DEFAULT_CONFIRM_WAIT: Duration = Duration::from_secs(60);

impl Default for Rules {
    /// Alerts with no file at all: every kind once, with thresholds an operator would pick.
    fn default() -> Self {
        let rule = |name: &str, kind, for_secs, severity: &str| Rule {
            name: name.into(),
            kind,
            for_: Duration::from_secs(for_secs),
            days: if kind == Kind::CertExpiry { 14 } else { 0 },
            severity: severity.into(),
            labels: BTreeMap::new(),
            targets: Vec::new(),
            checks: Vec::new(),
            repeat: DEFAULT_REPEAT,
        };
        Rules {
            rules: vec![
                rule("down", Kind::Down, 60, "critical"),
                rule("partial", Kind::Partial, 600, "warning"),
                rule("redundancy", Kind::Redundancy, 300, "warning"),
                rule("cert-expiry", Kind::CertExpiry, 0, "warning"),
                rule("policy", Kind::Policy, 0, "warning"),
                rule("drift", Kind::Drift, 0, "info"),
                rule("agent-down", Kind::AgentDown, 120, "warning"),
                rule("agent-network", Kind::AgentNetwork, 300, "warning"),
            ],
            confirm_wait: DEFAULT_CONFIRM_WAIT,
        }
    }
}

/// Why a rules file was refused: where, and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RulesError {
    pub file: String,
    /// 1-based; 0 when the file could not be read at all.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file, self.message),
            line => write!(f, "{}:{line}: {}", self.file, self.message),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: Option<RawDefaults>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    /// The notifiers' table (`notify::NotifyConfig`), read by the notifier module.
    #[serde(default)]
    notify: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    repeat: Option<Spanned<String>>,
    confirm_wait: Option<Spanned<String>>,
    /// Leave the built-in rules out (only the file's rules apply).
    builtin: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    kind: Option<Spanned<String>>,
    #[serde(rename = "for")]
    for_: Option<Spanned<String>>,
    days: Option<Spanned<i64>>,
    severity: Option<Spanned<String>>,
    #[serde(default)]
    labels: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    targets: Vec<Spanned<String>>,
    #[serde(default)]
    checks: Vec<Spanned<String>>,
    repeat: Option<Spanned<String>>,
}

/// 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// Reads and validates a rules file.
pub fn load(path: &std::path::Path) -> Result<Rules, RulesError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| RulesError {
        file: file.clone(),
        line: 0,
        message: format!("cannot read the alert rules file: {e}"),
    })?;
    parse(&file, &text)
}

/// Validates the text of a rules file; `file` names it in errors. A rule of the file with the name
/// of a built-in one replaces it; the other built-in rules stay unless `[defaults] builtin = false`.
pub fn parse(file: &str, text: &str) -> Result<Rules, RulesError> {
    let err = |at: usize, message: String| RulesError {
        file: file.to_string(),
        line: line_of(text, at),
        message,
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        err(at, e.message().to_string())
    })?;
    let _ = &raw.notify;
    let duration = |s: &Spanned<String>, what: &str| {
        humantime::parse_duration(s.get_ref()).map_err(|e| {
            err(
                s.span().start,
                format!("{what} '{}': {e} (write e.g. 90s, 5m, 4h)", s.get_ref()),
            )
        })
    };
    let mut repeat = DEFAULT_REPEAT;
    let mut confirm_wait = DEFAULT_CONFIRM_WAIT;
    let mut builtin = true;
    if let Some(d) = &raw.defaults {
        if let Some(r) = &d.repeat {
            repeat = duration(r, "repeat")?;
        }
        if let Some(w) = &d.confirm_wait {
            confirm_wait = duration(w, "confirm_wait")?;
            if confirm_wait.is_zero() {
                return Err(err(w.span().start, "confirm_wait must be above 0".into()));
            }
        }
        builtin = d.builtin.unwrap_or(true);
    }
    let mut rules: Vec<Rule> = if builtin {
        Rules::default()
            .rules
            .into_iter()
            .map(|r| Rule { repeat, ..r })
            .collect()
    } else {
        Vec::new()
    };
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for r in &raw.rule {
        let at = r.span().start;
        let r = r.get_ref();
        let Some(kind_s) = &r.kind else {
            return Err(err(
                at,
                format!(
                    "rule without kind: add kind = one of {}",
                    Kind::ALL.map(Kind::as_str).join(", ")
                ),
            ));
        };
        let kind: Kind = kind_s.get_ref().parse().map_err(|()| {
            err(
                kind_s.span().start,
                format!(
                    "unknown rule kind '{}': one of {}",
                    kind_s.get_ref(),
                    Kind::ALL.map(Kind::as_str).join(", ")
                ),
            )
        })?;
        let name = match &r.name {
            Some(n) => {
                if !mxscope_proto::names::is_label(n.get_ref()) {
                    return Err(err(
                        n.span().start,
                        format!(
                            "rule name '{}': use lowercase letters, digits and '-'",
                            n.get_ref()
                        ),
                    ));
                }
                if let Some(line) = seen.get(n.get_ref()) {
                    return Err(err(
                        n.span().start,
                        format!(
                            "rule '{}' is already defined at line {line}: give each rule its own name",
                            n.get_ref()
                        ),
                    ));
                }
                seen.insert(n.get_ref().clone(), line_of(text, n.span().start));
                n.get_ref().clone()
            }
            None => return Err(err(at, "rule without name: add name = \"...\"".into())),
        };
        let for_ = match &r.for_ {
            Some(f) => duration(f, "for")?,
            None => Duration::ZERO,
        };
        let days = match (&r.days, kind) {
            (Some(d), Kind::CertExpiry) => match u32::try_from(*d.get_ref()) {
                Ok(v) if (1..=3650).contains(&v) => v,
                _ => {
                    return Err(err(
                        d.span().start,
                        format!("days {} out of range: 1 to 3650", d.get_ref()),
                    ))
                }
            },
            (Some(d), _) => {
                return Err(err(
                    d.span().start,
                    format!("days applies only to kind = \"cert-expiry\", not '{kind}'"),
                ))
            }
            (None, Kind::CertExpiry) => 14,
            (None, _) => 0,
        };
        let severity = match &r.severity {
            Some(s) if s.get_ref().trim().is_empty() => {
                return Err(err(s.span().start, "severity is empty".into()))
            }
            Some(s) => s.get_ref().clone(),
            None => "warning".into(),
        };
        let mut labels = BTreeMap::new();
        for (k, v) in &r.labels {
            let ok = !k.get_ref().is_empty()
                && k.get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !k.get_ref().starts_with(|c: char| c.is_ascii_digit());
            if !ok {
                return Err(err(
                    k.span().start,
                    format!(
                        "label name '{}': letters, digits and '_' (Prometheus label syntax)",
                        k.get_ref()
                    ),
                ));
            }
            labels.insert(k.get_ref().clone(), v.get_ref().clone());
        }
        let mut checks = Vec::new();
        for c in &r.checks {
            if c.get_ref()
                .parse::<mxscope_proto::model::CheckKind>()
                .is_err()
            {
                return Err(err(
                    c.span().start,
                    format!("unknown check '{}'", c.get_ref()),
                ));
            }
            checks.push(c.get_ref().clone());
        }
        let rule_repeat = match &r.repeat {
            Some(x) => duration(x, "repeat")?,
            None => repeat,
        };
        let rule = Rule {
            name,
            kind,
            for_,
            days,
            severity,
            labels,
            targets: r.targets.iter().map(|t| t.get_ref().clone()).collect(),
            checks,
            repeat: rule_repeat,
        };
        match rules.iter_mut().find(|x| x.name == rule.name) {
            Some(x) => *x = rule,
            None => rules.push(rule),
        }
    }
    Ok(Rules {
        rules,
        confirm_wait,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_cover_every_kind() {
        let r = Rules::default();
        assert!(!r.rules.is_empty());
        for k in Kind::ALL {
            assert!(r.rules.iter().any(|x| x.kind == k), "{k}");
        }
        assert_eq!(parse("r.toml", "").unwrap(), r);
    }

    #[test]
    fn a_rule_replaces_the_builtin_of_its_name_and_adds_others() {
        let text = r#"
[defaults]
repeat = "1h"

[[rule]]
name = "down"
kind = "down"
for = "2m"
severity = "page"
labels = { team = "mail" }

[[rule]]
name = "certs-soon"
kind = "cert-expiry"
days = 30
targets = ["example.com"]
checks = ["smtp"]
"#;
        let r = parse("r.toml", text).unwrap();
        let down = r.get("down").unwrap();
        assert_eq!(down.for_, Duration::from_secs(120));
        assert_eq!(down.severity, "page");
        assert_eq!(down.labels["team"], "mail");
        assert_eq!(down.repeat, Duration::from_secs(3600));
        let c = r.get("certs-soon").unwrap();
        assert_eq!((c.kind, c.days), (Kind::CertExpiry, 30));
        assert!(c.applies("example.com", "smtp"));
        assert!(!c.applies("example.org", "smtp"));
        assert!(!c.applies("example.com", "imap"));
        assert_eq!(r.get("partial").unwrap().repeat, Duration::from_secs(3600));
    }

    #[test]
    fn builtin_false_keeps_only_the_files_rules() {
        let text = "[defaults]\nbuiltin = false\n[[rule]]\nname = \"d\"\nkind = \"drift\"\n";
        let r = parse("r.toml", text).unwrap();
        assert_eq!(r.rules.len(), 1);
        assert_eq!(r.rules[0].kind, Kind::Drift);
    }

    fn error(text: &str) -> RulesError {
        parse("alerts.toml", text).unwrap_err()
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = error("[[rule]]\nname = \"x\"\nkind = \"downn\"\n");
        assert_eq!(e.line, 3, "{e}");
        assert!(
            e.to_string()
                .starts_with("alerts.toml:3: unknown rule kind 'downn'"),
            "{e}"
        );

        let e = error("[[rule]]\nname = \"x\"\nkind = \"down\"\nfor = \"soon\"\n");
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("for 'soon'"), "{e}");

        let e = error("\n\n[[rule]]\nname = \"x\"\nkind = \"down\"\ndays = 3\n");
        assert_eq!(e.line, 6, "{e}");
        assert!(e.message.contains("cert-expiry"), "{e}");

        let e = error(
            "[[rule]]\nname = \"a\"\nkind = \"down\"\n[[rule]]\nname = \"a\"\nkind = \"drift\"\n",
        );
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("already defined at line 2"), "{e}");

        let e = error("[[rule]]\nname = \"a\"\nkind = \"down\"\nsevrity = \"x\"\n");
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("sevrity"), "{e}");

        let e = error("[[rule]]\nname = \"a\"\n");
        assert_eq!(e.line, 1, "{e}");
        assert!(e.message.contains("without kind"), "{e}");

        let e = error("[[rule]]\nname = \"a\"\nkind = \"down\"\nchecks = [\"smtpp\"]\n");
        assert_eq!(e.line, 4, "{e}");

        let e =
            error("[[rule]]\nname = \"a\"\nkind = \"down\"\nlabels = { \"bad-label\" = \"x\" }\n");
        assert_eq!(e.line, 4, "{e}");

        let e = error("[[rule]\n");
        assert_eq!(e.line, 1, "{e}");
    }
}
