//! The command line: global options (collector URL, format, timeout) and the command groups,
//! and `run`, which connects to the collector and hands each command its client and format.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::client::{Client, Target};
use crate::output::{Format, Report};
use crate::{agents, args, results, status, target};

/// mxscopectl: query an mxscope collector and manage its targets.
#[derive(Debug, Parser)]
#[command(name = "mxscopectl", version, about, max_term_width = 100)]
pub struct Cli {
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

    /// How long to wait for the connection and for each answer (give it before the command;
    /// after `target add|update`, --timeout is the probe timeout).
    #[arg(long, env = "MXSCOPE_TIMEOUT", default_value = "10s", value_parser = args::duration)]
    pub timeout: Duration,

    /// Extra CA certificate (PEM) to trust for an https:// collector.
    #[arg(long, global = true, env = "MXSCOPE_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the agents the collector knows, with their region, state and spool.
    Agents,
    /// Show raw probe results, newest first.
    Results(results::ResultsArgs),
    /// Show state, reachability and latency per target, endpoint, check and region.
    Status(status::StatusArgs),
    /// Manage the targets the collector hands to agents.
    #[command(subcommand)]
    Target(target::TargetCommand),
}

/// Runs the parsed command against the collector and writes its answer to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    let conn = Target {
        url: cli.collector.clone(),
        timeout: cli.timeout,
        ca_file: cli.ca_file.clone(),
    };
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
    }
}

/// Writes a report, saying on stderr when a table has no rows (JSON and CSV stay machine-clean).
pub fn print(
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
            "--timeout",
            "7s",
        ])
        .unwrap();
        assert_eq!(cli.timeout, Duration::from_secs(2));
        let Command::Target(target::TargetCommand::Add(a)) = cli.command else {
            panic!("not target add")
        };
        assert_eq!(a.spec.timeout, Some(Duration::from_secs(7)));
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
}
