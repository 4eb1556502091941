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
    /// Log output format.
    #[arg(long, env = "MXSCOPE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
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
