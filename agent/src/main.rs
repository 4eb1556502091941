//! `mxscope-agent`: parse flags, set up logging, load the config and the probe context, run the
//! agent until SIGINT or SIGTERM. A configuration error prints its message and exits with status 2.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use mxscope_agent::config::{log_filter, AgentConfig, Flags, LogFormat};
use mxscope_agent::enrol::{self, StateDir};
use mxscope_agent::probe::resolve::ResolverConfig;
use mxscope_agent::probe::Resolver;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Runtime worker threads at most: probes are mostly waiting on the network, and every thread costs
/// memory (stack, malloc arena); two cores' worth of TLS handshakes is thousands of probes a second.
const MAX_WORKERS: usize = 2;

fn main() -> ExitCode {
    limit_malloc_arenas();
    let mut flags = Flags::parse();
    init_tracing(flags.log_format);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_WORKERS);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mxscope-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = runtime.block_on(use_state_dir(&mut flags)) {
        eprintln!("mxscope-agent: {e}");
        return ExitCode::from(2);
    }
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
    match runtime.block_on(serve(config, roots)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "agent failed");
            ExitCode::FAILURE
        }
    }
}

/// With `--state-dir`: the identity kept there (enrolling first with `--enroll` when there is
/// none yet) becomes the agent's id, region and mTLS files.
async fn use_state_dir(flags: &mut Flags) -> anyhow::Result<()> {
    let Some(dir) = flags.state_dir.clone() else {
        return Ok(());
    };
    let dir = StateDir::new(dir);
    let held = enrol::prepare(
        &flags.collector,
        flags.enroll.as_deref(),
        flags.id.as_deref(),
        flags.region.as_deref(),
        &dir,
    )
    .await?;
    for (flag, given, held) in [
        ("id", &flags.id, &held.id),
        ("region", &flags.region, &held.region),
    ] {
        if let Some(given) = given.as_ref().filter(|g| *g != held) {
            anyhow::bail!(
                "--{flag} {given} differs from the certificate in --state-dir {} ({flag} {held}); \
                 drop --{flag}, or use another --state-dir for another agent",
                dir.dir.display()
            );
        }
    }
    flags.id = Some(held.id);
    flags.region = Some(held.region);
    flags.tls_cert = Some(dir.cert());
    flags.tls_key = Some(dir.key());
    if flags.collector_ca.is_none() {
        flags.collector_ca = Some(dir.ca());
    }
    Ok(())
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

/// glibc gives threads their own malloc arenas (up to 8 per core), each holding freed memory of its
/// own; two are plenty for an agent and keep its RSS down. `MALLOC_ARENA_MAX` still wins if set.
#[allow(unsafe_code)] // mallopt(3): no std API
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
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
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, problem) = log_filter(rust_log.as_deref());
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry.with(layer).init(),
        LogFormat::Json => registry.with(layer.json()).init(),
    }
    if let Some(error) = problem {
        tracing::warn!(rust_log = rust_log.as_deref().unwrap_or_default(), error = %error,
            "RUST_LOG not understood, logging at info");
    }
}
