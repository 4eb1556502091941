//! `mxscopectl target add|list|show|update|rm`: the central target list the collector hands to
//! agents. Flags are validated here before any call; `update` merges into the stored spec.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use clap::{Args, Subcommand};
use mxscope_proto::names::parse_ip_literal;
use mxscope_proto::target::{self, TargetError, DEFAULT_INTERVAL, DEFAULT_TIMEOUT};
use mxscope_proto::time::millis;
use mxscope_proto::{pb, CheckKind, TargetKind};
use serde_json::{Map, Value};

use crate::args::{self, CheckList, Regions};
use crate::cli::print;
use crate::client::{Client, Failure};
use crate::output::{self, Cell, Column, Format, Report};

#[derive(Debug, Subcommand)]
pub(crate) enum TargetCommand {
    /// Add a target: every agent in the chosen regions starts probing it.
    Add(AddArgs),
    /// List all targets, central and agent-local.
    #[command(visible_alias = "ls")]
    List,
    /// Show one target.
    Show {
        #[arg(value_parser = args::target_name)]
        name: String,
    },
    /// Change a target: only the flags given change, the rest is kept.
    Update(UpdateArgs),
    /// Remove a target: its probes stop, its history stays queryable.
    #[command(visible_alias = "remove")]
    Rm {
        #[arg(value_parser = args::target_name)]
        name: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct AddArgs {
    /// Domain, host name or IP address.
    #[arg(value_parser = args::target_name)]
    pub name: String,
    /// Checks to run, comma-separated (e.g. mx,smtp,imaps).
    #[arg(long, required = true, value_parser = args::checks)]
    pub checks: CheckList,
    #[command(flatten)]
    pub spec: SpecArgs,
}

#[derive(Debug, Args)]
pub(crate) struct UpdateArgs {
    /// The target to change.
    #[arg(value_parser = args::target_name)]
    pub name: String,
    /// Replace the checks (comma-separated).
    #[arg(long, value_parser = args::checks)]
    pub checks: Option<CheckList>,
    #[command(flatten)]
    pub spec: SpecArgs,
}

/// Flags shared by `add` and `update`; in `update` every one is optional and merges.
#[derive(Debug, Args)]
pub(crate) struct SpecArgs {
    /// Probe interval [add default: 60s].
    #[arg(long, visible_alias = "interval", value_parser = args::duration)]
    pub every: Option<Duration>,
    /// Regions whose agents probe it: names separated by commas, or 'all' [add default: all].
    #[arg(long, value_parser = args::regions)]
    pub regions: Option<Regions>,
    /// Deadline of one probe [add default: 10s] (the global --timeout is the RPC deadline).
    #[arg(long, value_parser = args::duration)]
    pub probe_timeout: Option<Duration>,
    /// The old name of --probe-timeout, refused with a hint (never set).
    #[arg(long = "timeout", hide = true, value_name = "DUR", value_parser = moved_timeout)]
    pub moved_timeout: Option<Duration>,
    /// A label key=value (repeatable); in update, key= removes the label.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = args::label)]
    pub labels: Vec<(String, String)>,
    /// A port override check=port, e.g. smtp=2525 (repeatable); in update, check= removes it.
    #[arg(long = "port", value_name = "CHECK=PORT", value_parser = args::port)]
    pub ports: Vec<(CheckKind, Option<u16>)>,
    /// domain (expand MX hosts) or host (probe the name directly) [add default: domain, host for IPs].
    #[arg(long, value_parser = args::target_kind())]
    pub kind: Option<TargetKind>,
    /// Fail when STARTTLS is missing on 25/587/143/110 (--require-tls=false turns it off).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub require_tls: Option<bool>,
    /// Outbound addresses the spf check evaluates the policy for, comma-separated; in update,
    /// replaces the list ('' clears it).
    #[arg(long, value_name = "IP,IP")]
    pub spf_senders: Option<String>,
}

/// The addresses of `--spf-senders`, as typed (the validator checks them).
fn sender_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}

/// `target add|update --timeout`: refused, so the old spelling does not silently become the RPC
/// deadline or go missing.
fn moved_timeout(_: &str) -> Result<Duration, String> {
    Err("the probe timeout is --probe-timeout; --timeout (the RPC deadline) goes before the command"
        .to_string())
}

impl TargetCommand {
    /// Checks what clap cannot: combinations of flags. Runs before connecting.
    pub(crate) fn check(&self) -> Result<(), Failure> {
        match self {
            TargetCommand::Add(a) => {
                if let Some((k, _)) = a.spec.labels.iter().find(|(_, v)| v.is_empty()) {
                    return Err(Failure::Usage(format!(
                        "label '{k}' has no value (use --label {k}=VALUE)"
                    )));
                }
                if let Some((c, _)) = a.spec.ports.iter().find(|(_, p)| p.is_none()) {
                    return Err(Failure::Usage(format!(
                        "port override for '{c}' has no port (use --port {c}=PORT)"
                    )));
                }
                let spec = new_spec(a);
                validate(&spec)
            }
            TargetCommand::Update(u) => {
                if parse_ip_literal(&u.name).is_some() && u.spec.kind == Some(TargetKind::Domain) {
                    return Err(ip_domain(&u.name));
                }
                Ok(())
            }
            TargetCommand::List | TargetCommand::Show { .. } | TargetCommand::Rm { .. } => Ok(()),
        }
    }
}

fn ip_domain(name: &str) -> Failure {
    Failure::Usage(format!(
        "'{name}' is an IP address, so it cannot be probed as a mail domain (use --kind host)"
    ))
}

/// Rules for a complete spec, applied to `add` and to the merged result of `update`: the one
/// target validator of `mxscope_proto::target`, with ctl's hints for the mistakes users make with
/// flags (a port override for a check the target does not run lists every such override).
fn validate(spec: &pb::TargetSpec) -> Result<(), Failure> {
    let err = match target::validate(spec) {
        Ok(_) => return Ok(()),
        Err(err) => err,
    };
    Err(match err {
        TargetError::IpAsDomain(_) => ip_domain(&spec.name),
        TargetError::NoChecks(_) => Failure::Usage("a target needs at least one check".into()),
        TargetError::PortForAbsentCheck(_) => {
            let mut orphans: Vec<&str> = spec
                .ports
                .keys()
                .filter(|c| !spec.checks.contains(c))
                .map(String::as_str)
                .collect();
            orphans.sort_unstable();
            Failure::Usage(format!(
                "port override for {} but the target does not run that check (checks: {}); \
                 drop it with {}",
                orphans.join(", "),
                spec.checks.join(","),
                orphans
                    .iter()
                    .map(|c| format!("--port {c}="))
                    .collect::<Vec<_>>()
                    .join(" ")
            ))
        }
        other => Failure::Usage(other.to_string()),
    })
}

/// The spec `target add` sends.
fn new_spec(a: &AddArgs) -> pb::TargetSpec {
    let s = &a.spec;
    let is_ip = parse_ip_literal(&a.name).is_some();
    let kind = s.kind.unwrap_or(if is_ip {
        TargetKind::Host
    } else {
        TargetKind::Domain
    });
    pb::TargetSpec {
        name: a.name.clone(),
        checks: a.checks.names(),
        interval_ms: millis(s.every.unwrap_or(DEFAULT_INTERVAL)),
        timeout_ms: millis(s.probe_timeout.unwrap_or(DEFAULT_TIMEOUT)),
        regions: s.regions.clone().unwrap_or(Regions::All).into_wire(),
        labels: s.labels.iter().cloned().collect(),
        ports: s
            .ports
            .iter()
            .filter_map(|(c, p)| p.map(|p| (c.name().to_string(), u32::from(p))))
            .collect(),
        source: "central".to_string(),
        require_tls: s.require_tls.unwrap_or(false),
        kind: kind.name().to_string(),
        spf_senders: s
            .spf_senders
            .as_deref()
            .map(sender_list)
            .unwrap_or_default(),
    }
}

/// `target update`: the stored spec with the given flags applied.
fn merged(mut spec: pb::TargetSpec, u: &UpdateArgs) -> pb::TargetSpec {
    let s = &u.spec;
    if let Some(checks) = &u.checks {
        spec.checks = checks.names();
    }
    if let Some(every) = s.every {
        spec.interval_ms = millis(every);
    }
    if let Some(timeout) = s.probe_timeout {
        spec.timeout_ms = millis(timeout);
    }
    if let Some(regions) = &s.regions {
        spec.regions = regions.clone().into_wire();
    }
    for (k, v) in &s.labels {
        if v.is_empty() {
            spec.labels.remove(k);
        } else {
            spec.labels.insert(k.clone(), v.clone());
        }
    }
    for (c, p) in &s.ports {
        match p {
            Some(p) => spec.ports.insert(c.name().to_string(), u32::from(*p)),
            None => spec.ports.remove(c.name()),
        };
    }
    if let Some(kind) = s.kind {
        spec.kind = kind.name().to_string();
    }
    if let Some(tls) = s.require_tls {
        spec.require_tls = tls;
    }
    if let Some(senders) = &s.spf_senders {
        spec.spf_senders = sender_list(senders);
    }
    spec
}

pub(crate) async fn run(
    client: &mut Client,
    cmd: TargetCommand,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match cmd {
        TargetCommand::Add(a) => {
            let spec = new_spec(&a);
            let req = pb::PutTargetRequest {
                target: Some(spec),
                update: false,
            };
            let stored = client.call(|c| c.put_target(req)).await?;
            report(&[stored]).render_one(format, out)?;
        }
        TargetCommand::List => {
            let resp = client
                .call(|c| c.list_targets(pb::ListTargetsRequest {}))
                .await?;
            print(
                &report(&resp.targets),
                format,
                out,
                "no targets (add one with: mxscopectl target add NAME --checks mx,smtp)",
            )?;
            if resp.truncated {
                eprintln!(
                    "more targets exist than fit in one answer; the first {} are shown \
                     (central ones first; 'mxscopectl target show NAME' shows any one)",
                    resp.targets.len()
                );
            }
        }
        TargetCommand::Show { name } => {
            let spec = client
                .call(|c| c.get_target(pb::GetTargetRequest { name }))
                .await?;
            report(&[spec]).render_one(format, out)?;
        }
        TargetCommand::Update(u) => {
            let name = u.name.clone();
            let current = client
                .call(|c| c.get_target(pb::GetTargetRequest { name }))
                .await?;
            let spec = merged(current, &u);
            validate(&spec)?;
            let req = pb::PutTargetRequest {
                target: Some(spec),
                update: true,
            };
            let stored = client.call(|c| c.put_target(req)).await?;
            report(&[stored]).render_one(format, out)?;
        }
        TargetCommand::Rm { name } => {
            let req = pb::RemoveTargetRequest { name: name.clone() };
            client.call(|c| c.remove_target(req)).await?;
            let mut r = Report::new(vec![Column::text("removed", "REMOVED")]);
            r.push(vec![Cell::new(name)]);
            r.render_one(format, out)?;
        }
    }
    Ok(())
}

/// The documented JSON fields of a target, in order (the README lists the same).
#[cfg(test)]
pub(crate) const FIELDS: &[&str] = &[
    "name",
    "source",
    "kind",
    "checks",
    "interval_ms",
    "timeout_ms",
    "regions",
    "labels",
    "ports",
    "require_tls",
];

fn columns() -> Vec<Column> {
    vec![
        Column::text("name", "NAME"),
        Column::text("source", "SOURCE"),
        Column::text("kind", "KIND"),
        Column::text("checks", "CHECKS"),
        Column::number("interval_ms", "EVERY"),
        Column::number("timeout_ms", "TIMEOUT"),
        Column::text("regions", "REGIONS"),
        Column::text("labels", "LABELS"),
        Column::text("ports", "PORTS"),
        Column::text("require_tls", "REQUIRE TLS"),
    ]
}

pub(crate) fn report(specs: &[pb::TargetSpec]) -> Report {
    let mut r = Report::new(columns());
    for s in specs {
        let labels: Map<String, Value> = sorted(&s.labels)
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let ports: Map<String, Value> = sorted(&s.ports)
            .map(|(k, v)| (k.clone(), Value::from(*v)))
            .collect();
        let regions = if s.regions.is_empty() {
            "all".to_string()
        } else {
            s.regions.join(",")
        };
        r.push(vec![
            Cell::new(s.name.as_str()),
            Cell::opt(Some(s.source.clone()).filter(|v| !v.is_empty())),
            Cell::new(if s.kind.is_empty() {
                TargetKind::Domain.name()
            } else {
                s.kind.as_str()
            }),
            Cell::new(s.checks.clone()),
            Cell::new(s.interval_ms).shown_as(output::duration_text(s.interval_ms)),
            Cell::new(s.timeout_ms).shown_as(output::duration_text(s.timeout_ms)),
            Cell::new(s.regions.clone()).shown_as(regions),
            Cell::new(Value::Object(labels)),
            Cell::new(Value::Object(ports)),
            Cell::new(s.require_tls),
        ]);
    }
    r
}

fn sorted<V>(m: &HashMap<String, V>) -> impl Iterator<Item = (&String, &V)> {
    let mut v: Vec<(&String, &V)> = m.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use serde_json::json;

    fn parse(argv: &[&str]) -> Result<TargetCommand, clap::Error> {
        let mut full = vec!["mxscopectl", "target"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full)?.command {
            Command::Target(t) => Ok(t),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn add(argv: &[&str]) -> AddArgs {
        match parse(argv).unwrap() {
            TargetCommand::Add(a) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn add_with_every_flag() {
        let a = add(&[
            "add",
            "Example.com",
            "--checks",
            "mx,smtp,imaps",
            "--every",
            "30s",
            "--regions",
            "eu-west,us-east",
            "--probe-timeout",
            "5s",
            "--label",
            "team=mail",
            "--label",
            "tier=1",
            "--port",
            "smtp=2525",
            "--require-tls",
        ]);
        let spec = new_spec(&a);
        assert_eq!(spec.name, "example.com");
        assert_eq!(spec.checks, vec!["mx", "smtp", "imaps"]);
        assert_eq!(spec.interval_ms, 30_000);
        assert_eq!(spec.timeout_ms, 5_000);
        assert_eq!(spec.regions, vec!["eu-west", "us-east"]);
        assert_eq!(spec.labels.get("team").map(String::as_str), Some("mail"));
        assert_eq!(spec.labels.len(), 2);
        assert_eq!(spec.ports.get("smtp"), Some(&2525));
        assert!(spec.require_tls);
        assert_eq!(spec.kind, "domain");
        assert_eq!(spec.source, "central");
        assert!(TargetCommand::Add(a).check().is_ok());
    }

    #[test]
    fn add_defaults() {
        let spec = new_spec(&add(&["add", "example.com", "--checks", "mx"]));
        assert_eq!(spec.interval_ms, 60_000);
        assert_eq!(spec.timeout_ms, 10_000);
        assert!(spec.regions.is_empty(), "all regions is the empty list");
        assert!(!spec.require_tls);
        assert_eq!(spec.kind, "domain");
        let spec = new_spec(&add(&[
            "add",
            "127.0.0.1",
            "--checks",
            "smtp",
            "--regions",
            "all",
        ]));
        assert_eq!(spec.kind, "host");
        assert!(spec.regions.is_empty());
    }

    #[test]
    fn add_usage_errors_exit_2() {
        for argv in [
            &["add", "example.com"][..],
            &["add", "example.com", "--checks", "mx,smpt"],
            &["add", "exa mple.com", "--checks", "mx"],
            &["add", "example.com", "--checks", "mx", "--every", "often"],
            &[
                "add",
                "example.com",
                "--checks",
                "mx",
                "--regions",
                "all,eu-west",
            ],
            &["add", "example.com", "--checks", "mx", "--label", "novalue"],
            &["add", "example.com", "--checks", "mx", "--kind", "cluster"],
        ] {
            let err = parse(argv)
                .err()
                .unwrap_or_else(|| panic!("accepted {argv:?}"));
            assert_eq!(err.exit_code(), 2, "{argv:?}");
        }
        let err = parse(&["add", "example.com", "--checks", "mx,smpt"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown check 'smpt'") && err.contains("imaps"),
            "{err}"
        );
    }

    #[test]
    fn add_combination_errors() {
        let cases = [
            (
                &["add", "127.0.0.1", "--checks", "smtp", "--kind", "domain"][..],
                "IP address",
            ),
            (
                &[
                    "add",
                    "example.com",
                    "--checks",
                    "mx",
                    "--port",
                    "smtp=2525",
                ],
                "does not run that check",
            ),
            (
                &["add", "example.com", "--checks", "mx", "--label", "k="],
                "has no value",
            ),
            (
                &["add", "example.com", "--checks", "smtp", "--port", "smtp="],
                "has no port",
            ),
        ];
        for (argv, want) in cases {
            let err = parse(argv).unwrap().check().unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains(want), "{argv:?}: {err}");
        }
    }

    #[test]
    fn update_merges_only_given_flags() {
        let stored = new_spec(&add(&[
            "add",
            "example.com",
            "--checks",
            "mx,smtp",
            "--label",
            "team=mail",
            "--label",
            "old=1",
            "--port",
            "smtp=2525",
            "--regions",
            "eu-west",
        ]));
        let TargetCommand::Update(u) = parse(&[
            "update",
            "example.com",
            "--checks",
            "mx,imaps",
            "--every",
            "2m",
            "--label",
            "old=",
            "--label",
            "new=2",
            "--port",
            "smtp=",
            "--port",
            "imaps=1993",
            "--require-tls=true",
        ])
        .unwrap() else {
            panic!("not an update")
        };
        let m = merged(stored.clone(), &u);
        assert_eq!(m.checks, vec!["mx", "imaps"]);
        assert_eq!(m.interval_ms, 120_000);
        assert_eq!(m.timeout_ms, stored.timeout_ms, "timeout not given, kept");
        assert_eq!(m.regions, vec!["eu-west"], "regions not given, kept");
        assert_eq!(m.labels.get("team").map(String::as_str), Some("mail"));
        assert_eq!(m.labels.get("new").map(String::as_str), Some("2"));
        assert!(!m.labels.contains_key("old"));
        assert_eq!(m.ports.get("imaps"), Some(&1993));
        assert!(!m.ports.contains_key("smtp"));
        assert!(m.require_tls);
        assert!(validate(&m).is_ok());

        let TargetCommand::Update(u) = parse(&[
            "update",
            "example.com",
            "--regions",
            "all",
            "--require-tls=false",
        ])
        .unwrap() else {
            panic!("not an update")
        };
        let m2 = merged(m, &u);
        assert!(m2.regions.is_empty());
        assert!(!m2.require_tls);
        assert_eq!(m2.checks, vec!["mx", "imaps"]);
    }

    #[test]
    fn update_that_orphans_a_port_is_refused() {
        let stored = new_spec(&add(&[
            "add",
            "example.com",
            "--checks",
            "mx,smtp",
            "--port",
            "smtp=2525",
        ]));
        let TargetCommand::Update(u) = parse(&["update", "example.com", "--checks", "mx"]).unwrap()
        else {
            panic!("not an update")
        };
        let err = validate(&merged(stored, &u)).unwrap_err();
        assert!(err.to_string().contains("port override for smtp"), "{err}");
    }

    #[test]
    fn json_of_a_target() {
        let spec = new_spec(&add(&[
            "add",
            "example.com",
            "--checks",
            "mx,smtp",
            "--port",
            "smtp=2525",
            "--label",
            "a=b",
        ]));
        let mut out = Vec::new();
        report(&[spec]).render_one(Format::Json, &mut out).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want = FIELDS.to_vec();
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(v["checks"], json!(["mx", "smtp"]));
        assert_eq!(v["ports"], json!({"smtp": 2525}));
        assert_eq!(v["labels"], json!({"a": "b"}));
        assert_eq!(v["regions"], json!([]));
        assert_eq!(v["interval_ms"], json!(60_000));
    }

    #[test]
    fn table_of_targets_says_all_regions_and_durations() {
        let spec = new_spec(&add(&[
            "add",
            "example.com",
            "--checks",
            "mx",
            "--every",
            "90s",
        ]));
        let mut out = Vec::new();
        report(&[spec]).render(Format::Table, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let line = text.lines().nth(1).unwrap();
        for want in ["example.com", "central", "domain", "1m30s", "10s", "all"] {
            assert!(line.contains(want), "{want} missing in {line}");
        }
    }
}
