//! Mail probes: one module per protocol. A probe is an async function of (check spec, context) that
//! returns observations; it knows nothing of gRPC, the spool or the schedule. A problem the probe
//! finds (NXDOMAIN, refused, expired certificate) is an observation, never an `Err`.

pub mod limits;
pub mod resolve;

use std::sync::Arc;
use std::time::Duration;

use mxscope_proto::CheckKind;

pub use limits::HostLimits;
pub use resolve::{Resolve, Resolver};

/// Whether a target names a mail domain (expanded through MX) or one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetKind {
    #[default]
    Domain,
    Host,
}

/// One (target, check) as the scheduler hands it to a probe.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckSpec {
    pub target: String,
    pub kind: TargetKind,
    pub check: CheckKind,
    /// Port override; `None` = the check's well-known port.
    pub port: Option<u16>,
    /// Total deadline of one probe run.
    pub timeout: Duration,
    pub interval: Duration,
    /// STARTTLS missing where it is optional is a failure instead of a warning.
    pub require_tls: bool,
    pub options: CheckOptions,
}

/// Per-target probe options with operator-friendly defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckOptions {
    /// Optional MAIL FROM / RCPT TO test (no DATA) on smtp/submission.
    pub mail_from: Option<String>,
    pub rcpt_to: Option<String>,
    /// Certificate days-left thresholds: below `warn` is a warning, below `fail` a failure.
    pub cert_warn_days: u32,
    pub cert_fail_days: u32,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions { mail_from: None, rcpt_to: None, cert_warn_days: 14, cert_fail_days: 3 }
    }
}

impl CheckSpec {
    pub fn port(&self) -> Option<u16> {
        self.port.or(self.check.default_port())
    }
}

/// What every probe may use: resolver, TLS trust, politeness limits. Shared by all probes of an agent.
#[derive(Clone)]
pub struct ProbeContext {
    pub resolver: Arc<dyn Resolve>,
    /// Roots probe TLS trusts: system roots plus `--ca-file`.
    pub tls_roots: Arc<rustls::RootCertStore>,
    /// Never more than N simultaneous connections to one mail server.
    pub host_limits: HostLimits,
    /// Name sent in EHLO.
    pub helo_name: String,
}

/// True when this agent has a probe for `check` (config rejects the others with a clear message).
pub fn supported(check: CheckKind) -> bool {
    matches!(
        check,
        CheckKind::Mx
            | CheckKind::Smtp
            | CheckKind::Smtps
            | CheckKind::Submission
            | CheckKind::Imap
            | CheckKind::Imaps
            | CheckKind::Pop3
            | CheckKind::Pop3s
    )
}

/// Runs one (target, check): one observation for DNS checks, one per address for port checks.
/// Bounded by `spec.timeout`; never panics on what the network sends.
pub async fn run_check(spec: &CheckSpec, ctx: &ProbeContext) -> Vec<mxscope_proto::Observation> {
    // Replaced by the probe implementation (helper in progress).
    let _ = (spec, ctx);
    Vec::new()
}
