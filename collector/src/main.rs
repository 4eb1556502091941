//! `mxscope-collector`: flags and environment, logging, signals; everything else is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use mxscope_collector::{check_plaintext, run, Config};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Receives mail-probe results from mxscope agents and answers mxscopectl.
#[derive(Debug, Parser)]
#[command(name = "mxscope-collector", version)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "MXSCOPE_LISTEN", default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// SQLite database file (created if missing).
    #[arg(long, env = "MXSCOPE_DB", default_value = "./mxscope.db")]
    db: PathBuf,
    /// Serve plain-text gRPC (loopback only; required until mTLS is configured).
    #[arg(long, env = "MXSCOPE_INSECURE")]
    insecure: bool,
    /// Default status window.
    #[arg(long, env = "MXSCOPE_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    window: Duration,
    /// An agent or series silent longer than this is stale.
    #[arg(long, env = "MXSCOPE_STALE_AFTER", default_value = "2m", value_parser = humantime::parse_duration)]
    stale_after: Duration,
    /// Consecutive failed results that turn a series `failing`.
    #[arg(long, env = "MXSCOPE_FAIL_AFTER", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    fail_after: u32,
    /// Consecutive successful results that bring a failing series back to `ok`.
    #[arg(long, env = "MXSCOPE_RECOVER_AFTER", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    recover_after: u32,
    /// Failing regions that make a (target, check) `down`: `majority` (of regions with fresh data) or a number.
    #[arg(long, env = "MXSCOPE_QUORUM", default_value = "majority")]
    quorum: mxscope_collector::analysis::scope::Quorum,
    /// How long raw results (and minute rollups) are kept.
    #[arg(long, env = "MXSCOPE_RETENTION", default_value = "14d", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// How long hour and day rollups are kept.
    #[arg(long, env = "MXSCOPE_ROLLUP_RETENTION", default_value = "400d", value_parser = humantime::parse_duration)]
    rollup_retention: Duration,
    /// Address to serve Prometheus metrics on (`/metrics`); `off` to disable.
    #[arg(long, env = "MXSCOPE_HTTP", default_value = "127.0.0.1:9464", value_parser = parse_http)]
    http: HttpAddr,
    /// Log output format.
    #[arg(long, env = "MXSCOPE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// `--http`: an address, or `off` (`None`).
#[derive(Debug, Clone, Copy)]
struct HttpAddr(Option<SocketAddr>);

fn parse_http(s: &str) -> Result<HttpAddr, String> {
    if s == "off" {
        return Ok(HttpAddr(None));
    }
    s.parse()
        .map(|a| HttpAddr(Some(a)))
        .map_err(|e| format!("'{s}': {e} (expected ADDR:PORT or 'off')"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_format);
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mxscope-collector: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn serve(args: Args) -> anyhow::Result<()> {
    check_plaintext(args.insecure, args.listen)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another collector running? pick another --listen)",
                args.listen
            )
        })?;
    let mut config = Config::new(args.db);
    config.window = args.window;
    config.stale_after = args.stale_after;
    config.store.policy = mxscope_collector::analysis::hysteresis::Policy {
        fail_after: args.fail_after,
        recover_after: args.recover_after,
    };
    config.store.retention = args.retention;
    config.store.rollup_retention = args.rollup_retention.max(args.retention);
    config.quorum = args.quorum;
    config.http = args.http.0;
    run(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %err, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for sigterm");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "sigint", "signal received"),
        () = term => tracing::info!(signal = "sigterm", "signal received"),
    }
}
