//! Runs agent probes in-process through `run_check` with the real hickory `Resolver` pointed at a
//! lab nsd and probe TLS roots from the lab CA, for tests that assert on observations directly.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use mxscope_agent::probe::resolve::ResolverConfig;
use mxscope_agent::probe::{
    run_check, CheckOptions, CheckSpec, HostLimits, ProbeContext, Resolver, TargetKind,
};
use mxscope_proto::{CheckKind, Observation};

/// A probe context whose DNS all goes to `dns` and whose TLS trusts `ca_file` (plus system roots).
pub fn context(dns: SocketAddr, ca_file: Option<&Path>) -> Result<ProbeContext> {
    let resolver = Resolver::new(ResolverConfig {
        server: Some(dns),
        timeout: Some(Duration::from_secs(2)),
    })
    .map_err(|e| anyhow::anyhow!("build resolver: {e}"))?;
    let roots = mxscope_agent::trust::probe_roots(ca_file).context("probe trust roots")?;
    Ok(ProbeContext {
        resolver: Arc::new(resolver),
        tls_roots: Arc::new(roots),
        host_limits: HostLimits::new(4),
        helo_name: "probe.mxscope.test".to_string(),
        credentials: Default::default(),
        fanout: Default::default(),
    })
}

/// A spec for `check` on domain `target` with default options and a generous deadline.
pub fn spec(target: &str, check: CheckKind) -> CheckSpec {
    CheckSpec {
        target: target.to_string(),
        kind: TargetKind::Domain,
        check,
        port: None,
        timeout: Duration::from_secs(20),
        interval: Duration::from_secs(60),
        require_tls: false,
        options: CheckOptions::default(),
    }
}

/// Runs one check to completion on a fresh runtime.
pub fn run(ctx: &ProbeContext, spec: &CheckSpec) -> Result<Vec<Observation>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build tokio runtime")?;
    Ok(rt.block_on(run_check(spec, ctx)))
}

/// Runs a check that yields exactly one observation (DNS checks) and returns it.
pub fn run_one(ctx: &ProbeContext, spec: &CheckSpec) -> Result<Observation> {
    let mut out = run(ctx, spec)?;
    anyhow::ensure!(out.len() == 1, "expected one observation, got {out:?}");
    Ok(out.remove(0))
}
