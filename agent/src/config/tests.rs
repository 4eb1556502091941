//! Config tests: targets files, central targets, flags and their errors.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mxscope_proto::target::{DEFAULT_INTERVAL, DEFAULT_TIMEOUT};
use mxscope_proto::{pb, CheckKind};
use tracing_subscriber::filter::Targets;

use super::flags::parse_label;
use super::targets::{parse_tables, parse_whole, target_tables};
use super::*;
use crate::probe::TargetKind;

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
    assert_eq!(t.def.name, "example.com");
    assert_eq!(t.def.kind, TargetKind::Domain);
    assert_eq!(
        t.def.checks,
        vec![CheckKind::Mx, CheckKind::Smtp, CheckKind::Imaps]
    );
    assert_eq!(t.def.interval, Duration::from_secs(30));
    assert_eq!(t.def.timeout, Duration::from_secs(5));
    assert!(t.def.require_tls);
    assert_eq!(t.def.ports.get(&CheckKind::Smtp), Some(&2525));
    assert_eq!(t.options.mail_from.as_deref(), Some("probe@example.net"));
    assert_eq!(t.options.cert_warn_days, 20);
    assert_eq!(t.options.cert_fail_days, 5);
    let specs = t.check_specs();
    assert_eq!(specs.len(), 3);
    assert_eq!(specs[1].port(), Some(2525));
    assert_eq!(specs[2].port(), Some(993));

    let h = &targets[1];
    assert_eq!(
        h.def.kind,
        TargetKind::Host,
        "an IP literal is always a host"
    );
    assert_eq!(h.def.interval, DEFAULT_INTERVAL);
    assert_eq!(h.def.timeout, DEFAULT_TIMEOUT);
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
        e.starts_with("targets.toml:8: target[1].checks: unknown check 'smpt' (valid: mx, smtp"),
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
    let e =
        err("[[target]]\nname = \"a.example\"\nchecks = [\"smtp\"]\nports = { smtp = 70000 }\n");
    assert!(
        e.starts_with("targets.toml:4: target[0].ports.smtp: port 70000 is out of range"),
        "{e}"
    );
    let e =
        err("[[target]]\nname = \"a.example\"\nchecks = [\"smtp\"]\nports = { smtp = \"x\" }\n");
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
    assert_eq!(whole[1].def.ports.get(&CheckKind::Submission), Some(&2587));
    assert_eq!(whole[1].options.dkim_selectors, vec!["s1", "s2"]);
    assert_eq!(whole[2].def.kind, TargetKind::Host);

    // spf_senders go through proto's validator and reach the spf check's options
    let senders =
        "[[target]]\nname = \"example.test\"\nchecks = [\"spf\"]\nspf_senders = [\"192.0.2.25\"]\n";
    let t = &parse_targets("t.toml", senders).unwrap()[0];
    let ip: std::net::IpAddr = "192.0.2.25".parse().unwrap();
    assert_eq!(t.def.spf_senders, vec![ip]);
    assert_eq!(t.check_spec(CheckKind::Spf).options.spf_senders, vec![ip]);
    assert!(parse_targets("t.toml", &senders.replace("192.0.2.25", "nope")).is_err());

    // The inline-array form is not split and reads the same.
    let inline = "target = [{ name = \"a.example\", checks = [\"mx\"] }]\n";
    assert_eq!(
        parse_targets("t.toml", inline).unwrap()[0].def.name,
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
    // Plain text only to this machine: results and identity never cross a network unprotected.
    for url in [
        "http://198.18.0.1:7443",
        "http://collector.example.net:7443",
        "http://[2001:db8::1]:7443",
    ] {
        let e = bad(&["--collector", url, "--id", "a"]);
        assert!(
            e.contains("only to a collector on this machine") && e.contains("https://"),
            "{url}: {e}"
        );
    }
    for url in [
        "http://localhost:7443",
        "http://[::1]:7443",
        "http://127.0.0.2:7443",
    ] {
        let flags = Flags::try_parse_from([
            "mxscope-agent",
            "--collector",
            url,
            "--id",
            "a",
            "--region",
            "r",
        ])
        .unwrap();
        assert!(AgentConfig::from_flags(flags).is_ok(), "{url}");
    }
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
    assert_eq!(t.def.name, "mail.example");
    assert_eq!(t.def.checks, vec![CheckKind::Smtp]);
    assert_eq!(t.def.kind, TargetKind::Host);
    assert_eq!(t.def.interval, DEFAULT_INTERVAL);
    assert_eq!(t.def.timeout, Duration::from_secs(3));
    assert_eq!(t.def.ports.get(&CheckKind::Smtp), Some(&2525));
    assert_eq!(problems.len(), 1, "{problems:?}");
    let none = pb::TargetSpec {
        name: "x.example".into(),
        checks: vec!["nope".into()],
        ..Default::default()
    };
    assert!(Target::from_central(&none).is_err());
}

#[test]
fn several_collectors_are_validated_together() {
    let parse = |args: &[&str]| {
        let mut all = vec!["mxscope-agent", "--id", "a", "--region", "r"];
        all.extend_from_slice(args);
        Flags::try_parse_from(all)
    };
    let config = |args: &[&str]| AgentConfig::from_flags(parse(args).unwrap());

    let cfg = config(&[
        "--collector",
        "http://127.0.0.1:7443",
        "--collector",
        "http://[::1]:7444",
    ])
    .unwrap();
    assert_eq!(
        cfg.collectors,
        ["http://127.0.0.1:7443", "http://[::1]:7444"]
    );
    // A comma-separated list (as MXSCOPE_COLLECTOR gives it), blanks around the commas dropped.
    let cfg = config(&[
        "--collector",
        "http://127.0.0.1:7443, http://localhost:7444",
    ])
    .unwrap();
    assert_eq!(
        cfg.collectors,
        ["http://127.0.0.1:7443", "http://localhost:7444"]
    );

    // Every URL is checked, not only the first.
    let e = config(&[
        "--collector",
        "http://127.0.0.1:7443",
        "--collector",
        "http://198.18.0.1:7443",
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("--collector: 'http://198.18.0.1:7443'")
            && e.contains("only to a collector on this machine"),
        "{e}"
    );
    let e = config(&[
        "--collector",
        "http://127.0.0.1:7443",
        "--collector",
        "127.0.0.1:7444",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("--collector: '127.0.0.1:7444'"), "{e}");
    // One scheme for all: the error names both URLs.
    for (first, second) in [
        ("http://127.0.0.1:7443", "https://127.0.0.1:7444"),
        ("https://127.0.0.1:7444", "http://127.0.0.1:7443"),
    ] {
        let e = config(&["--collector", first, "--collector", second])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--collector:")
                && e.contains(first)
                && e.contains(second)
                && e.contains("same scheme"),
            "{e}"
        );
    }
    let e = config(&[
        "--collector",
        "http://127.0.0.1:7443",
        "--collector",
        "http://127.0.0.1:7443",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("given twice"), "{e}");

    // None at all: clap's own usage error names the flag. (No other test leaves --collector out,
    // so the environment set below cannot leak into them.)
    let e = parse(&[]).unwrap_err();
    assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    assert!(e.to_string().contains("--collector"), "{e}");
    std::env::set_var(
        "MXSCOPE_COLLECTOR",
        "http://127.0.0.1:7443,http://127.0.0.1:7444",
    );
    let from_env = parse(&[]).map(|f| f.collector);
    std::env::remove_var("MXSCOPE_COLLECTOR");
    assert_eq!(
        from_env.unwrap(),
        ["http://127.0.0.1:7443", "http://127.0.0.1:7444"]
    );
}
