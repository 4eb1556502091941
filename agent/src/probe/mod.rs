//! Mail probes: one module per protocol. A probe is an async function of (check spec, context) that
//! returns observations; it knows nothing of gRPC, the spool or the schedule. A problem the probe
//! finds (NXDOMAIN, refused, expired certificate) is an observation, never an `Err`.

mod dane;
mod delivery;
mod dialogue;
mod dnsbl;
mod endpoints;
mod icmp;
mod imap;
pub mod limits;
mod mtasts;
mod mx;
pub mod policy;
mod pop3;
mod queue;
mod records;
pub mod resolve;
mod smtp;
pub use mxscope_spf as spf;
mod tcp;
#[cfg(test)]
mod testing;
mod tls;

/// The crate-private parsers that `crate::fuzzing` hands fuzzer input to, re-exported only with the
/// `fuzzing` feature (a path from the crate root; their own visibility is unchanged).
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzz_surface {
    pub(crate) use super::dane::matches as dane_matches;
    pub(crate) use super::dialogue::{parse_reply, parse_reply_line, Bounds, Dialogue};
    pub(crate) use super::dnsbl::parse::{classify_answer, reverse_query_name, DnsblAnswer};
    pub(crate) use super::imap::{check_status, parse_capability_line, quoted, status_of, tagged};
    pub(crate) use super::pop3::parse_capa;
    pub(crate) use super::queue::parse::summarize;
    pub(crate) use super::smtp::parse_ehlo;
    pub(crate) use super::tls::{read_leaf, rfc3339};
}

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mxscope_proto::time::now_us;
use mxscope_proto::{facts, CheckKind, Endpoint, ErrorClass, Observation, Outcome, Phase};
use tokio::time::Instant;

pub use endpoints::Fanout;
pub use limits::HostLimits;
pub use resolve::{Resolve, Resolver};

pub use mxscope_proto::TargetKind;

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
    /// DKIM selectors the `dkim` check reads (`<selector>._domainkey.<domain>`).
    pub dkim_selectors: Vec<String>,
    /// Outbound addresses the `spf` check evaluates the policy for (the target's `spf_senders`).
    pub spf_senders: Vec<std::net::IpAddr>,
    /// DNS blocklist zones the `dnsbl` check asks about each MX address.
    pub dnsbl_zones: Vec<String>,
    /// `queue`: Postfix configuration directory (`postqueue -c DIR`); `None` = the default.
    pub postfix_config_dir: Option<String>,
    /// `queue`: the `postqueue` program; `None` = `postqueue` from `PATH`.
    pub postqueue: Option<String>,
    /// `delivery`: name of the login in the agent's `--credentials` file (never the secret itself).
    pub credentials: Option<String>,
    /// The target's port overrides for the services a compound check talks to (`delivery`:
    /// submission and imaps; `dane`: smtp).
    pub service_ports: BTreeMap<CheckKind, u16>,
    /// `mta-sts`: HTTPS port of the policy host (443 in the real world).
    pub mta_sts_port: u16,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            mail_from: None,
            rcpt_to: None,
            cert_warn_days: 14,
            cert_fail_days: 3,
            dkim_selectors: Vec::new(),
            spf_senders: Vec::new(),
            dnsbl_zones: Vec::new(),
            postfix_config_dir: None,
            postqueue: None,
            credentials: None,
            service_ports: BTreeMap::new(),
            mta_sts_port: 443,
        }
    }
}

impl CheckSpec {
    pub fn port(&self) -> Option<u16> {
        self.port.or(self.check.default_port())
    }

    /// The port of another service of the same target (`ports = { submission = 2587 }`), else
    /// that service's well-known port.
    pub fn service_port(&self, service: CheckKind) -> u16 {
        self.options
            .service_ports
            .get(&service)
            .copied()
            .or(service.default_port())
            .unwrap_or(0)
    }

    /// This spec re-aimed at `service` (its port override, its own certificate strictness), for
    /// compound checks that run another check's dialogue.
    pub(crate) fn for_service(&self, service: CheckKind) -> CheckSpec {
        CheckSpec {
            check: service,
            port: Some(self.service_port(service)),
            ..self.clone()
        }
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
    /// Logins from `--credentials` that probes refer to by name (passwords print as `***`).
    pub credentials: Arc<crate::credentials::Credentials>,
    /// How many MX hosts and addresses one target may fan out to.
    pub fanout: Fanout,
}

impl std::fmt::Debug for ProbeContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeContext")
            .field("tls_roots", &self.tls_roots.len())
            .field("helo_name", &self.helo_name)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

/// A duration as an integer fact in microseconds (`FactValue` has no `u64`).
pub(crate) fn fact_us(d: Duration) -> i64 {
    i64::try_from(mxscope_proto::time::micros(d)).unwrap_or(i64::MAX)
}

/// Longest wait for a TCP connect.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra time past the total deadline before a stuck probe is abandoned (a safety net only).
pub(crate) const GRACE: Duration = Duration::from_millis(500);

/// One address of one check, as a per-address probe sees it.
pub(crate) struct Target<'a> {
    pub spec: &'a CheckSpec,
    pub ctx: &'a ProbeContext,
    /// MX host name (SNI) or the target itself.
    pub host: &'a str,
    pub addr: SocketAddr,
    /// End of the whole probe run.
    pub deadline: Instant,
    /// When set, a TLS handshake stores the peer's certificate chain (leaf first, DER) here.
    pub peer_chain: Option<&'a std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl Target<'_> {
    /// The deadline of a phase allowed `limit`: never past the total deadline.
    pub(crate) fn phase_deadline(&self, limit: Duration) -> Instant {
        (Instant::now() + limit).min(self.deadline)
    }
}

/// Runs one (target, check): one observation for DNS checks, one per address for port checks.
/// Bounded by `spec.timeout`; never panics on what the network sends; every observation is
/// within `proto::limits` (cut and marked when the server sent too much).
pub async fn run_check(spec: &CheckSpec, ctx: &ProbeContext) -> Vec<Observation> {
    let started = Instant::now();
    let deadline = started + spec.timeout;
    let start_us = now_us();
    let resolver = ctx.resolver.as_ref();
    let mut out = match spec.check {
        CheckKind::Mx => {
            vec![mx::check(ctx.resolver.as_ref(), &spec.target, start_us, deadline).await]
        }
        CheckKind::Spf => {
            vec![records::spf_check(spec, resolver, ctx.fanout, start_us, deadline).await]
        }
        CheckKind::Dmarc => vec![records::dmarc_check(spec, resolver, start_us, deadline).await],
        CheckKind::Dkim => vec![records::dkim_check(spec, resolver, start_us, deadline).await],
        CheckKind::Tlsrpt => vec![records::tlsrpt_check(spec, resolver, start_us, deadline).await],
        CheckKind::Dnsbl => {
            vec![dnsbl::check(spec, resolver, ctx.fanout, start_us, deadline).await]
        }
        CheckKind::Queue => vec![queue::check(spec, start_us, deadline).await],
        CheckKind::Delivery => vec![delivery::check(spec, ctx, start_us, deadline).await],
        CheckKind::MtaSts => vec![mtasts::check(spec, ctx, start_us, deadline).await],
        CheckKind::Dane => vec![dane::check(spec, ctx, start_us, deadline).await],
        CheckKind::Smtp
        | CheckKind::Smtps
        | CheckKind::Submission
        | CheckKind::Imap
        | CheckKind::Imaps
        | CheckKind::Pop3
        | CheckKind::Pop3s
        | CheckKind::Icmp => per_address(spec, ctx, start_us, deadline).await,
    };
    for obs in &mut out {
        obs.interval = spec.interval;
        if obs.timing_of(Phase::Total).is_none() {
            obs.timing(Phase::Total, started.elapsed());
        }
        let cut = mxscope_proto::limits::clamp(obs);
        if cut.any() {
            tracing::warn!(
                target = %spec.target,
                check = %spec.check,
                strings = cut.strings,
                facts = cut.facts,
                timings = cut.timings,
                "result cut to the collector's size limits (the server answered with too much)"
            );
        }
    }
    out
}

/// Expands the target and probes every address concurrently (each under the per-host limit).
async fn per_address(
    spec: &CheckSpec,
    ctx: &ProbeContext,
    start_us: i64,
    deadline: Instant,
) -> Vec<Observation> {
    let started = Instant::now();
    let port = spec.port().unwrap_or(0);
    let expansion = endpoints::expand(
        ctx.resolver.as_ref(),
        &spec.target,
        spec.kind,
        ctx.fanout,
        deadline,
    )
    .await;
    let mut out = Vec::new();
    for f in &expansion.failures {
        let endpoint = Endpoint {
            host: f.host.clone(),
            ip: None,
            port,
        };
        let mut obs = Observation::new(&spec.target, endpoint, spec.check, start_us);
        obs.timing(Phase::Resolve, expansion.took);
        if spec.kind == TargetKind::Domain {
            obs.fact(facts::address::VIA_MX, true);
        }
        if let Some(p) = f.preference {
            obs.fact(facts::mx::PREFERENCE, p);
        }
        if f.null_mx {
            obs.fact(facts::mx::NULL, true);
        }
        obs.problem(Outcome::Fail, f.class, Phase::Resolve, f.message.clone());
        out.push(obs);
    }
    let probes = expansion.addrs.iter().map(|a| {
        let endpoint = Endpoint {
            host: a.host.clone(),
            ip: Some(a.ip),
            port,
        };
        let mut obs = Observation::new(&spec.target, endpoint, spec.check, start_us);
        obs.timing(Phase::Resolve, expansion.took);
        expansion.note_caps(&mut obs);
        obs.fact(
            facts::address::FAMILY,
            if a.ip.is_ipv4() { "ipv4" } else { "ipv6" },
        );
        if spec.kind == TargetKind::Domain {
            obs.fact(facts::address::VIA_MX, true);
        }
        if let Some(p) = a.preference {
            obs.fact(facts::mx::PREFERENCE, p);
        }
        if a.implicit_mx {
            obs.fact(facts::mx::IMPLICIT, true);
        }
        let target = Target {
            spec,
            ctx,
            host: &a.host,
            addr: SocketAddr::new(a.ip, port),
            deadline,
            peer_chain: None,
        };
        async move {
            if overran(deadline, probe_address(&target, &mut obs)).await {
                mark_overrun(&mut obs);
            }
            obs.timing(Phase::Total, started.elapsed());
            obs
        }
    });
    out.extend(futures::future::join_all(probes).await);
    out
}

/// Awaits a probe's work until `deadline` plus [`GRACE`]; true when it had to be abandoned (its
/// bounded phases normally end it long before).
pub(crate) async fn overran(
    deadline: Instant,
    work: impl std::future::Future<Output = ()>,
) -> bool {
    tokio::time::timeout_at(deadline + GRACE, work)
        .await
        .is_err()
}

/// Runs a whole-target check: one observation of `spec.target`, filled in by `run` and marked
/// as overrun when `run` outlives the deadline (plus [`GRACE`]).
pub(crate) async fn observe(
    spec: &CheckSpec,
    check: CheckKind,
    start_us: i64,
    deadline: Instant,
    run: impl AsyncFnOnce(&mut Observation),
) -> Observation {
    let mut obs = Observation::new(&spec.target, Endpoint::host(&spec.target), check, start_us);
    if overran(deadline, run(&mut obs)).await {
        mark_overrun(&mut obs);
    }
    obs
}

/// Marks an observation whose probe was abandoned by [`overran`].
pub(crate) fn mark_overrun(obs: &mut Observation) {
    obs.problem(
        Outcome::Fail,
        ErrorClass::Timeout,
        Phase::Total,
        "probe overran its deadline",
    );
}

/// Probes one address under the per-host connection limit.
async fn probe_address(target: &Target<'_>, obs: &mut Observation) {
    let key = target.addr.ip().to_string();
    let Ok(_permit) =
        tokio::time::timeout_at(target.deadline, target.ctx.host_limits.acquire(&key)).await
    else {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Timeout,
            Phase::Connect,
            "no free connection slot for this host before the deadline",
        );
        return;
    };
    match target.spec.check {
        CheckKind::Smtp | CheckKind::Submission | CheckKind::Smtps => {
            smtp::probe(target, obs).await
        }
        CheckKind::Imap | CheckKind::Imaps => imap::probe(target, obs).await,
        CheckKind::Pop3 | CheckKind::Pop3s => pop3::probe(target, obs).await,
        CheckKind::Icmp => icmp::probe(target, obs).await,
        _ => {
            if let Some(stream) =
                tcp::connect(obs, target.addr, target.phase_deadline(CONNECT_TIMEOUT)).await
            {
                drop(stream);
            }
        }
    }
}

#[cfg(test)]
mod tests;
