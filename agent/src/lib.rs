//! The mxscope agent: runs mail probes on a schedule, appends every result to a durable spool and
//! streams the spool to the collector over one gRPC stream, removing results only once acked.

pub mod config;
pub mod credentials;
pub mod enrol;
pub mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod probe;
pub mod schedule;
pub mod spool;
pub mod trust;
pub mod uplink;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{AgentConfig, Target};
use crate::probe::{HostLimits, ProbeContext, Resolve};
use crate::schedule::{LiveProber, Prober, Scheduler};
use crate::spool::{Spool, SpoolError, SpoolHandle, SpoolOptions};
use crate::uplink::{Identity, Uplink};

/// How long the uplink keeps trying to get the last results acked after shutdown.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("spool task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The probe context for this agent: the resolver, probe TLS roots, `--per-host` limits and the
/// `--credentials` logins.
pub fn probe_context(
    config: &AgentConfig,
    resolver: Arc<dyn Resolve>,
    tls_roots: Arc<rustls::RootCertStore>,
) -> ProbeContext {
    ProbeContext {
        resolver,
        tls_roots,
        host_limits: HostLimits::new(config.per_host),
        helo_name: config.helo_name.clone(),
        credentials: Arc::new(config.credentials.clone()),
        fanout: config.fanout,
    }
}

/// The renewal state of an enrolled agent (state directory and mTLS), `None` otherwise.
fn renewal(config: &AgentConfig) -> Option<Arc<enrol::Renewal>> {
    let (dir, tls) = (config.state_dir.as_ref()?, config.collector_tls.clone()?);
    let dir = enrol::StateDir::new(dir);
    let held = match dir.load() {
        Ok(Some(held)) => held,
        Ok(None) => return None,
        Err(e) => {
            warn!(error = %e, "cannot read the certificate for renewal; it will not be renewed");
            return None;
        }
    };
    Some(Arc::new(enrol::Renewal {
        renew_at: std::sync::Mutex::new(held.renew_at()),
        tls: std::sync::Mutex::new(tls),
        dir,
    }))
}

/// Runs the agent with the real probes until `shutdown`.
pub async fn run(
    config: AgentConfig,
    ctx: ProbeContext,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    run_with(config, Arc::new(LiveProber { ctx }), shutdown).await
}

/// Runs the agent with any prober (tests use fakes). On `shutdown`: no new probes, in-flight probes
/// finish (grace: the longest probe timeout plus a margin) and are spooled, then the uplink tries for
/// [`DRAIN`] to get the rest acked. An unreachable collector is never fatal.
pub async fn run_with(
    mut config: AgentConfig,
    prober: Arc<dyn Prober>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let dir = config.spool_dir.clone();
    let opts = SpoolOptions::new(config.spool_max);
    let (spool, report) =
        tokio::task::spawn_blocking(move || Spool::open_with(&dir, opts)).await??;
    if report.lost_records > 0 || report.truncated_bytes > 0 {
        warn!(
            lost_records = report.lost_records,
            truncated_bytes = report.truncated_bytes,
            "spool repaired on open"
        );
    }
    info!(agent.id = %config.id, region = %config.region, spool = %config.spool_dir.display(),
        unsent = report.depth, highest_seq = report.highest_seq, targets = config.targets.len(),
        "agent starting");
    let spool = SpoolHandle::spawn(spool, config.id.clone())?;

    let (schedule_tx, schedule_rx) = watch::channel(None);
    let tracker = TaskTracker::new();
    let probes_stop = shutdown.child_token();
    let uplink_stop = CancellationToken::new();

    // One copy of the local targets, shared by the scheduler and the uplink's Hello.
    let targets: Arc<[Target]> = std::mem::take(&mut config.targets).into();
    let grace = targets
        .iter()
        .map(|t| t.def.timeout)
        .max()
        .unwrap_or(mxscope_proto::target::DEFAULT_TIMEOUT)
        + Duration::from_secs(10);
    let scheduler = Scheduler {
        agent_id: config.id.clone(),
        region: config.region.clone(),
        local: targets.clone(),
        central: schedule_rx,
        prober,
        sink: Arc::new(spool.clone()),
        concurrency: config.concurrency,
        grace,
    };
    let scheduler_done = tracker.spawn(scheduler.run(probes_stop.clone()));

    let uplink = Uplink {
        identity: Identity {
            collectors: config.collectors.clone(),
            agent_id: config.id.clone(),
            region: config.region.clone(),
            labels: config.labels.clone(),
            local_targets: targets,
            tls: config.collector_tls.clone(),
        },
        renewal: renewal(&config),
        spool: spool.clone(),
        schedule: schedule_tx,
        drain: DRAIN,
    };
    tracker.spawn(uplink.run(uplink_stop.clone()));
    tracker.close();

    shutdown.cancelled().await;
    info!("shutting down: finishing probes in flight");
    if let Err(e) = scheduler_done.await {
        warn!(error = %e, "scheduler task failed");
    }
    // Every finished probe is in the spool now; the uplink sends what is left, then stops.
    uplink_stop.cancel();
    if tokio::time::timeout(DRAIN + Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        warn!("agent tasks did not stop in time");
    }
    // The acks are kept in memory and written lazily: make them durable before exiting.
    if let Err(e) = spool.sync().await {
        warn!(error = %e, "spool state not written at shutdown");
    }
    info!(
        unsent = spool.depth(),
        dropped_total = spool.dropped_total(),
        "agent stopped"
    );
    Ok(())
}
