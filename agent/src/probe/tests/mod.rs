//! Probe tests against fake servers on 127.0.0.1:0: misbehaving SMTP servers, TLS certificates made
//! with rcgen (valid, expired, wrong name, untrusted), IMAP and POP3 dialogues, and dispatch.

mod delivery_tls;
mod dispatch;
mod dns;
mod fakes;
mod imap_pop3;
mod misbehaving;
mod policy_checks;
mod tls_certs;

use std::sync::Arc;
use std::time::Duration;

use mxscope_proto::{CheckKind, ErrorClass, FactValue, Observation, Outcome, Phase};

use super::testing::FakeResolver;
use super::{run_check, CheckOptions, CheckSpec, HostLimits, ProbeContext, TargetKind};

/// The MX host every fake test resolves to 127.0.0.1.
const MX: &str = "mx.example.test";

/// A context whose resolver knows `example.test` → `mx.example.test` → 127.0.0.1.
fn context_with(roots: rustls::RootCertStore) -> ProbeContext {
    ProbeContext {
        resolver: Arc::new(
            FakeResolver::default()
                .mx("example.test", &[(10, MX)])
                .ips(MX, &["127.0.0.1"]),
        ),
        tls_roots: Arc::new(roots),
        host_limits: HostLimits::new(2),
        helo_name: "probe.mxscope.test".to_string(),
        credentials: Default::default(),
        fanout: Default::default(),
    }
}

fn context(resolver: FakeResolver) -> ProbeContext {
    ProbeContext {
        resolver: Arc::new(resolver),
        tls_roots: Arc::new(rustls::RootCertStore::empty()),
        host_limits: HostLimits::new(2),
        helo_name: "probe.mxscope.test".to_string(),
        credentials: Default::default(),
        fanout: Default::default(),
    }
}

fn spec(target: &str, check: CheckKind, port: u16) -> CheckSpec {
    CheckSpec {
        target: target.to_string(),
        kind: TargetKind::Domain,
        check,
        port: Some(port),
        timeout: Duration::from_secs(3),
        interval: Duration::from_secs(30),
        require_tls: false,
        options: CheckOptions::default(),
    }
}

/// A loopback port nobody listens on: bind, note the port, close.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    l.local_addr().expect("local addr").port()
}

/// Runs `spec` and returns its single observation plus how long the run took.
async fn run_one(spec: &CheckSpec, ctx: &ProbeContext) -> (Observation, Duration) {
    let started = std::time::Instant::now();
    let mut out = run_check(spec, ctx).await;
    let took = started.elapsed();
    assert_eq!(out.len(), 1, "one address, one observation: {out:?}");
    (out.remove(0), took)
}

/// Asserts outcome, class and failing phase, showing the observation when they differ.
#[track_caller]
fn assert_problem(o: &Observation, outcome: Outcome, class: ErrorClass, phase: Phase) {
    assert_eq!(
        (o.outcome, o.error_class, o.phase),
        (outcome, Some(class), Some(phase)),
        "message: {} facts: {:?}",
        o.message,
        o.facts
    );
}

fn text(o: &Observation, key: &str) -> String {
    match o.fact_of(key) {
        Some(FactValue::Text(s)) => s.clone(),
        other => panic!("fact {key} is not text: {other:?} in {:?}", o.facts),
    }
}

fn int(o: &Observation, key: &str) -> i64 {
    match o.fact_of(key) {
        Some(FactValue::Int(i)) => *i,
        other => panic!("fact {key} is not an int: {other:?} in {:?}", o.facts),
    }
}

fn flag(o: &Observation, key: &str) -> bool {
    match o.fact_of(key) {
        Some(FactValue::Flag(b)) => *b,
        other => panic!("fact {key} is not a flag: {other:?} in {:?}", o.facts),
    }
}
