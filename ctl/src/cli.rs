//! The command line: global options (collector URL, format, timeout) and the command groups,
//! and `run`, which connects to the collector and hands each command its client and format.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::args;
use crate::client::{Client, Target};
use crate::cmd::offline::bounce;
use crate::cmd::offline::{pki, spf};
use crate::cmd::{
    agents, diagnose, latency, matrix, results, revoke, status, target, token, watch,
};
use crate::output::{Format, Report};

/// mxscopectl: query an mxscope collector and manage its targets.
#[derive(Debug, Parser)]
#[command(name = "mxscopectl", version, about, max_term_width = 100)]
pub(crate) struct Cli {
    /// URL of the collector's gRPC Query API.
    #[arg(
        long,
        global = true,
        env = "MXSCOPE_COLLECTOR",
        default_value = "http://127.0.0.1:7443",
        value_parser = args::collector_url
    )]
    pub collector: String,

    /// Output format.
    #[arg(long, global = true, env = "MXSCOPE_FORMAT", value_enum, default_value_t = Format::Table)]
    pub format: Format,

    /// How long to wait for the connection and for each answer (give it before the command; the
    /// probe timeout of `target add|update` is --probe-timeout).
    #[arg(long, env = "MXSCOPE_TIMEOUT", default_value = "10s", value_parser = args::duration)]
    pub timeout: Duration,

    /// Extra CA certificate (PEM) to trust for an https:// collector.
    #[arg(long, global = true, env = "MXSCOPE_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for an https:// collector, from `mxscopectl admin-cert`.
    #[arg(long, global = true, env = "MXSCOPE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "MXSCOPE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// List the agents the collector knows, with their region, state and spool.
    Agents,
    /// Show raw probe results, newest first.
    Results(results::ResultsArgs),
    /// Show state, reachability and latency per target, endpoint, check and region.
    Status(status::StatusArgs),
    /// Manage the targets the collector hands to agents.
    #[command(subcommand)]
    Target(target::TargetCommand),
    /// Targets × regions: a scope per (target, check) and reachability or latency per region.
    Matrix(matrix::MatrixArgs),
    /// Latency percentiles of a target per region and phase.
    Latency(latency::LatencyArgs),
    /// Name the first failing layer of a target, where it fails, and the evidence.
    Diagnose(diagnose::DiagnoseArgs),
    /// Print state changes (ok ⇄ failing) as they happen, until Ctrl-C.
    Watch(watch::WatchArgs),
    /// Explain a bounce (RFC 3464 DSN) per recipient: action, status and its meaning, reply (offline).
    Bounce(bounce::BounceArgs),
    /// Certificate authority for mTLS (offline, on the CA directory).
    #[command(subcommand)]
    Ca(pki::CaCommand),
    /// Issue an agent certificate bound to its id and region (offline).
    Enroll(pki::EnrollArgs),
    /// Issue a certificate for mxscopectl: admin (30 days by default), or --read-only (offline).
    AdminCert(pki::AdminCertArgs),
    /// Revoke a certificate (by --cert, --serial or --fingerprint) or an agent id: in the
    /// collector's database (admin certificate), or offline in its --revoked file with --list.
    Revoke(revoke::RevokeArgs),
    /// Enrolment tokens: create one for a region, list them, revoke one (admin certificate).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Evaluate SPF for an address (offline: resolves DNS itself, no collector).
    #[command(subcommand)]
    Spf(spf::SpfCommand),
}

/// Runs the parsed command against the collector and writes its answer to `out`.
pub(crate) async fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    let conn = Target {
        url: cli.collector.clone(),
        timeout: cli.timeout,
        ca_file: cli.ca_file.clone(),
        tls_cert: cli.tls_cert.clone(),
        tls_key: cli.tls_key.clone(),
    };
    // Certificate commands work on files only, no connection.
    if let Command::Ca(_) | Command::Enroll(_) | Command::AdminCert(_) = cli.command {
        return pki::run(cli.command, out);
    }
    // Reading a bounce file or appending to the revocation list needs no collector.
    if let Command::Bounce(a) = &cli.command {
        return bounce::run(a, cli.format, out);
    }
    if let Command::Revoke(a @ revoke::RevokeArgs { list: Some(_), .. }) = &cli.command {
        return revoke::run(a, out);
    }
    if let Command::Spf(cmd) = &cli.command {
        return spf::run(cmd, cli.format, cli.timeout, out).await;
    }
    // Arguments that only make sense together are checked before any connection is made.
    if let Command::Target(cmd) = &cli.command {
        cmd.check()?;
    }
    let mut client = Client::connect(&conn).await?;
    match cli.command {
        Command::Agents => agents::run(&mut client, cli.format, out).await,
        Command::Results(a) => results::run(&mut client, a, cli.format, out).await,
        Command::Status(a) => status::run(&mut client, a, cli.format, out).await,
        Command::Target(cmd) => target::run(&mut client, cmd, cli.format, out).await,
        Command::Matrix(a) => matrix::run(&mut client, a, cli.format, out).await,
        Command::Latency(a) => latency::run(&mut client, a, cli.format, out).await,
        Command::Diagnose(a) => diagnose::run(&mut client, a, cli.format, out).await,
        Command::Watch(a) => watch::run(&mut client, a, cli.format, out).await,
        Command::Bounce(a) => bounce::run(&a, cli.format, out),
        Command::Revoke(a) => revoke::run_online(&mut client, &a, out).await,
        Command::Token(cmd) => token::run(&mut client, cmd, cli.format, out).await,
        Command::Spf(cmd) => spf::run(&cmd, cli.format, cli.timeout, out).await,
        cmd @ (Command::Ca(_) | Command::Enroll(_) | Command::AdminCert(_)) => pki::run(cmd, out),
    }
}

/// Writes a report, saying on stderr when a table has no rows (JSON and CSV stay machine-clean).
pub(crate) fn print(
    report: &Report,
    format: Format,
    out: &mut dyn Write,
    empty_note: &str,
) -> anyhow::Result<()> {
    report.render(format, out)?;
    if report.rows() == 0 && format == Format::Table {
        eprintln!("{empty_note}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_defaults() {
        let cli = Cli::try_parse_from(["mxscopectl", "agents"]).unwrap();
        assert_eq!(cli.format, Format::Table);
        assert_eq!(cli.timeout, Duration::from_secs(10));
        // MXSCOPE_COLLECTOR may be set in the environment running the tests.
        if std::env::var_os("MXSCOPE_COLLECTOR").is_none() {
            assert_eq!(cli.collector, "http://127.0.0.1:7443");
        }
    }

    #[test]
    fn global_flags_work_after_the_command() {
        let cli = Cli::try_parse_from([
            "mxscopectl",
            "--timeout",
            "3s",
            "status",
            "--format",
            "json",
            "--collector",
            "http://127.0.0.2:9000",
        ])
        .unwrap();
        assert_eq!(cli.format, Format::Json);
        assert_eq!(cli.collector, "http://127.0.0.2:9000");
        assert_eq!(cli.timeout, Duration::from_secs(3));
    }

    #[test]
    fn request_timeout_and_probe_timeout_are_distinct() {
        let cli = Cli::try_parse_from([
            "mxscopectl",
            "--timeout",
            "2s",
            "target",
            "add",
            "example.com",
            "--checks",
            "mx",
            "--probe-timeout",
            "7s",
        ])
        .unwrap();
        assert_eq!(cli.timeout, Duration::from_secs(2));
        let Command::Target(target::TargetCommand::Add(a)) = cli.command else {
            panic!("not target add")
        };
        assert_eq!(a.spec.probe_timeout, Some(Duration::from_secs(7)));
        // `--timeout` after the command is refused, not silently read as the other timeout
        let err = Cli::try_parse_from([
            "mxscopectl",
            "target",
            "add",
            "example.com",
            "--checks",
            "mx",
            "--timeout",
            "7s",
        ])
        .unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        assert!(err.to_string().contains("--probe-timeout"), "{err}");
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for argv in [
            vec!["mxscopectl", "--format", "xml", "agents"],
            vec!["mxscopectl", "--timeout", "forever", "agents"],
            vec!["mxscopectl", "--collector", "127.0.0.1:7443", "agents"],
            vec!["mxscopectl", "status", "--window", "5 parsecs"],
            vec!["mxscopectl", "results", "--limit", "-3"],
        ] {
            let err = Cli::try_parse_from(&argv).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{argv:?}: {err}");
        }
    }

    mod end_to_end {
        //! Commands run through real gRPC against the in-process fake collector.
        use super::*;
        use crate::client::exit_code;
        use crate::fake::FakeQuery;
        use mxscope_proto::pb;
        use serde_json::{json, Value};

        async fn ctl(url: &str, argv: &[&str]) -> (anyhow::Result<()>, String) {
            let mut full = vec!["mxscopectl", "--collector", url];
            full.extend_from_slice(argv);
            let cli = Cli::try_parse_from(&full).unwrap_or_else(|e| panic!("{full:?}: {e}"));
            let mut out = Vec::new();
            let res = run(cli, &mut out).await;
            (res, String::from_utf8(out).expect("utf-8 output"))
        }

        async fn ok_json(url: &str, argv: &[&str]) -> Value {
            let (res, out) = ctl(url, argv).await;
            if let Err(e) = res {
                panic!("{argv:?} failed: {e:#}");
            }
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{argv:?}: not JSON ({e}): {out}"))
        }

        #[tokio::test]
        async fn target_lifecycle_through_grpc() {
            let fake = FakeQuery::default();
            let url = fake.serve().await;

            let added = ok_json(
                &url,
                &[
                    "--format",
                    "json",
                    "target",
                    "add",
                    "Example.test",
                    "--checks",
                    "mx,smtp",
                    "--port",
                    "smtp=2525",
                ],
            )
            .await;
            assert_eq!(added["name"], json!("example.test"));
            assert_eq!(added["ports"], json!({"smtp": 2525}));

            let (res, _) = ctl(&url, &["target", "add", "example.test", "--checks", "mx"]).await;
            let err = res.expect_err("second add must fail");
            assert_eq!(exit_code(&err), 1);
            assert_eq!(err.to_string(), "target 'example.test' exists");

            let list = ok_json(&url, &["--format", "json", "target", "list"]).await;
            assert_eq!(list.as_array().map(Vec::len), Some(1));

            let updated = ok_json(
                &url,
                &[
                    "--format",
                    "json",
                    "target",
                    "update",
                    "example.test",
                    "--every",
                    "2m",
                ],
            )
            .await;
            assert_eq!(updated["interval_ms"], json!(120_000));
            assert_eq!(updated["checks"], json!(["mx", "smtp"]), "checks kept");
            assert_eq!(updated["ports"], json!({"smtp": 2525}), "ports kept");

            let (res, out) = ctl(&url, &["target", "rm", "example.test"]).await;
            assert!(res.is_ok(), "{res:?}");
            assert_eq!(out.trim(), "removed  example.test");

            let (res, out) = ctl(&url, &["target", "show", "example.test"]).await;
            let err = res.expect_err("show after rm must fail");
            assert_eq!(exit_code(&err), 1);
            assert_eq!(err.to_string(), "unknown target 'example.test'");
            assert!(out.is_empty(), "nothing on stdout on error: {out}");

            let (res, _) = ctl(&url, &["target", "update", "nope.test", "--every", "1m"]).await;
            assert_eq!(
                res.map_err(|e| (exit_code(&e), e.to_string())),
                Err((1, "unknown target 'nope.test'".into()))
            );
        }

        #[tokio::test]
        async fn status_json_through_grpc() {
            let fake = FakeQuery::default();
            fake.state.lock().unwrap().status = vec![pb::StatusRow {
                target: "example.test".into(),
                endpoint: "mx1.example.test[127.0.0.1]:2526".into(),
                check: "smtp".into(),
                region: "us-east".into(),
                state: "failing".into(),
                reachability: 0.0,
                p50_ms: None,
                p95_ms: None,
                last_error: Some("refused".into()),
                last_seen_us: 1_700_000_000_000_000,
                count: 3,
                ok_count: 0,
                last_outcome: "fail".into(),
                last_message: "connection refused".into(),
            }];
            let url = fake.serve().await;
            let v = ok_json(
                &url,
                &[
                    "status", "--format", "json", "--region", "us-east", "--window", "10m",
                ],
            )
            .await;
            let rows = v.as_array().expect("array");
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0]["state"], json!("failing"));
            assert_eq!(rows[0]["last_error"], json!("refused"));
            assert_eq!(rows[0]["reachability"], json!(0.0));
            assert!(rows[0]["p95_ms"].is_null());
            let req = fake
                .state
                .lock()
                .unwrap()
                .last_status
                .clone()
                .expect("status request seen");
            assert_eq!(req.region, "us-east");
            assert_eq!(req.window_ms, 600_000);
        }

        /// A `status` answer the collector cuts into pages is fetched whole, in order.
        #[tokio::test]
        async fn status_follows_the_pages_of_a_cut_answer() {
            let fake = FakeQuery::default();
            {
                let mut s = fake.state.lock().unwrap();
                s.status = (0..25)
                    .map(|i| pb::StatusRow {
                        target: format!("t{i:02}.test"),
                        state: "ok".into(),
                        ..Default::default()
                    })
                    .collect();
                s.status_page = 10;
            }
            let url = fake.serve().await;
            let v = ok_json(&url, &["status", "--format", "json"]).await;
            let targets: Vec<&str> = v
                .as_array()
                .expect("array")
                .iter()
                .map(|r| r["target"].as_str().unwrap_or_default())
                .collect();
            let want: Vec<String> = (0..25).map(|i| format!("t{i:02}.test")).collect();
            assert_eq!(targets, want);
            let last = fake.state.lock().unwrap().last_status.clone().unwrap();
            assert_eq!(last.offset, 20, "three pages were asked for");
        }

        #[tokio::test]
        async fn results_and_agents_through_grpc() {
            let fake = FakeQuery::default();
            fake.state.lock().unwrap().agents = vec![pb::AgentInfo {
                id: "ap1".into(),
                region: "ap-south".into(),
                connected: true,
                state: "ok".into(),
                ..Default::default()
            }];
            let url = fake.serve().await;
            let v = ok_json(
                &url,
                &[
                    "--format", "json", "results", "--since", "5m", "--limit", "7", "--check",
                    "imaps",
                ],
            )
            .await;
            assert_eq!(v, json!([]));
            let req = fake
                .state
                .lock()
                .unwrap()
                .last_results
                .clone()
                .expect("results request seen");
            assert_eq!(req.limit, 7);
            assert_eq!(req.check, "imaps");
            let age_us = mxscope_proto::time::now_us() - req.since_us;
            assert!(
                (299_000_000..=310_000_000).contains(&age_us),
                "since is 5m ago, got {age_us}us"
            );

            let (res, out) = ctl(&url, &["--format", "csv", "agents"]).await;
            assert!(res.is_ok(), "{res:?}");
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 2, "{out}");
            assert!(lines[0].starts_with("id,region,state,connected"), "{out}");
            assert!(lines[1].starts_with("ap1,ap-south,ok,true"), "{out}");
        }

        #[tokio::test]
        async fn local_validation_fails_before_connecting() {
            // Nothing listens at this URL; a usage error must be reported, not "cannot reach".
            let (res, _) = ctl(
                "http://127.0.0.1:9",
                &[
                    "target",
                    "add",
                    "example.test",
                    "--checks",
                    "mx",
                    "--port",
                    "smtp=25",
                ],
            )
            .await;
            let err = res.expect_err("must fail");
            assert_eq!(exit_code(&err), 2);
            assert!(err.to_string().contains("does not run that check"), "{err}");
        }
    }
}
