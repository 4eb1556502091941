//! `mxscope-agent`: parse flags, set up logging, load the config and the probe context, run the
//! agent until SIGINT or SIGTERM. A configuration error prints its message and exits with status 2.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use mxscope_agent::config::{AgentConfig, Flags, LogFormat};
use mxscope_agent::probe::resolve::ResolverConfig;
use mxscope_agent::probe::Resolver;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let flags = Flags::parse();
    init_tracing(flags.log_format);
    let config = match AgentConfig::from_flags(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mxscope-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let roots = match mxscope_agent::trust::probe_roots(config.ca_file.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mxscope-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mxscope-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, roots)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "agent failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: AgentConfig, roots: rustls::RootCertStore) -> anyhow::Result<()> {
    let resolver = Resolver::new(ResolverConfig {
        server: config.resolver,
        timeout: None,
    })
    .context("building the DNS resolver")?;
    let ctx = mxscope_agent::probe_context(&config, Arc::new(resolver), Arc::new(roots));
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    mxscope_agent::run(config, ctx, shutdown)
        .await
        .context("running the agent")
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM.
async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received, shutting down");
    shutdown.cancel();
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
