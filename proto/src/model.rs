//! Domain types shared by agent, collector and ctl: the stable names users type and read (check
//! kinds, outcomes, error classes, phases) and a probe's observation before it gets a seq.

use std::net::IpAddr;
use std::time::Duration;

use crate::pb;

/// A name that is not one of a closed set; the message lists the valid ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} '{given}' (valid: {})", valid.join(", "))]
pub struct UnknownName {
    pub what: &'static str,
    pub given: String,
    pub valid: Vec<&'static str>,
}

named_enum! {
    /// What a probe checks. The names are part of the user interface (config files, ctl flags).
    pub enum CheckKind ("check") {
        Mx => "mx",
        Smtp => "smtp",
        Smtps => "smtps",
        Submission => "submission",
        Imap => "imap",
        Imaps => "imaps",
        Pop3 => "pop3",
        Pop3s => "pop3s",
        Icmp => "icmp",
        Spf => "spf",
        Dmarc => "dmarc",
        Dkim => "dkim",
        MtaSts => "mta-sts",
        Tlsrpt => "tlsrpt",
        Dane => "dane",
        Dnsbl => "dnsbl",
        Delivery => "delivery",
        Queue => "queue",
    }
}

impl CheckKind {
    /// The well-known port of a check that talks to a mail server port.
    pub fn default_port(self) -> Option<u16> {
        Some(match self {
            CheckKind::Smtp => 25,
            CheckKind::Smtps => 465,
            CheckKind::Submission => 587,
            CheckKind::Imap => 143,
            CheckKind::Imaps => 993,
            CheckKind::Pop3 => 110,
            CheckKind::Pop3s => 995,
            _ => return None,
        })
    }

    /// The mail services a check talks to besides its own port: `delivery` submits on the
    /// submission port and reads back over IMAPS, `dane` matches TLSA against the SMTP port's
    /// certificate; port overrides for those services belong to such a check too.
    pub fn services(self) -> &'static [CheckKind] {
        match self {
            CheckKind::Delivery => &[CheckKind::Submission, CheckKind::Imaps],
            CheckKind::Dane => &[CheckKind::Smtp],
            _ => &[],
        }
    }

    /// True when the check talks to each MX address separately (one result per address).
    pub fn per_address(self) -> bool {
        self.default_port().is_some() || self == CheckKind::Icmp
    }

    /// True for ports people's mail clients use, where a certificate problem is a failure.
    pub fn is_client_port(self) -> bool {
        !matches!(self, CheckKind::Smtp) && self.default_port().is_some()
    }
}

named_enum! {
    /// The result of one probe.
    pub enum Outcome ("outcome") {
        Ok => "ok",
        Warn => "warn",
        Fail => "fail",
    }
}

named_enum! {
    /// Why a probe did not end `ok`: a closed set, so regions can be compared and metrics stay bounded.
    pub enum ErrorClass ("error class") {
        DnsNxdomain => "dns_nxdomain",
        DnsNodata => "dns_nodata",
        DnsServfail => "dns_servfail",
        DnsRefused => "dns_refused",
        DnsTimeout => "dns_timeout",
        DnsError => "dns_error",
        Refused => "refused",
        Timeout => "timeout",
        Reset => "reset",
        Unreachable => "unreachable",
        TlsHandshake => "tls_handshake",
        CertExpired => "cert_expired",
        CertUntrusted => "cert_untrusted",
        CertName => "cert_name",
        CertExpiring => "cert_expiring",
        NoStarttls => "no_starttls",
        Reply4xx => "reply_4xx",
        Reply5xx => "reply_5xx",
        Greylisted => "greylisted",
        Protocol => "protocol",
        Policy => "policy",
        Io => "io",
        NotPermitted => "not_permitted",
    }
}

named_enum! {
    /// What a matrix cell or a latency query shows.
    pub enum Metric ("metric") {
        Reachability => "reachability",
        P50 => "p50",
        P95 => "p95",
        P99 => "p99",
    }
}

impl Metric {
    /// The latency quantile the metric reads; `None` for reachability.
    pub fn quantile(self) -> Option<f64> {
        match self {
            Metric::Reachability => None,
            Metric::P50 => Some(0.5),
            Metric::P95 => Some(0.95),
            Metric::P99 => Some(0.99),
        }
    }
}

named_enum! {
    /// How far a problem reaches across regions.
    pub enum Scope ("scope") {
        /// Every region with fresh data sees the target working.
        Up => "up",
        /// Some regions fail, fewer than the quorum.
        Partial => "partial",
        /// At least the quorum of regions fail.
        Down => "down",
        /// No region has fresh data.
        Stale => "stale",
    }
}

named_enum! {
    /// One region's view of a series after hysteresis.
    pub enum RegionState ("region state") {
        Ok => "ok",
        Failing => "failing",
        /// No fresh data (old results or a silent agent).
        Stale => "stale",
        /// The agent's own network is at fault: not counted against the target.
        AgentFault => "agent",
    }
}

named_enum! {
    /// A timed step of a probe.
    pub enum Phase ("phase") {
        Resolve => "resolve",
        Connect => "connect",
        Banner => "banner",
        Greeting => "greeting",
        Ehlo => "ehlo",
        Capability => "capability",
        Starttls => "starttls",
        Tls => "tls",
        Auth => "auth",
        Mail => "mail",
        Rcpt => "rcpt",
        Quit => "quit",
        Echo => "echo",
        Delivery => "delivery",
        Total => "total",
    }
}

/// What one probe talked to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// MX host name, or the target itself.
    pub host: String,
    pub ip: Option<IpAddr>,
    /// 0 when the check has no port (DNS checks, ICMP).
    pub port: u16,
}

impl Endpoint {
    pub fn host(host: impl Into<String>) -> Self {
        Endpoint {
            host: host.into(),
            ip: None,
            port: 0,
        }
    }

    /// Human form: `host`, `host[ip]`, `host[ip]:port` (IPv6 inside the brackets as is).
    pub fn label(&self) -> String {
        match (self.ip, self.port) {
            (None, 0) => self.host.clone(),
            (None, p) => format!("{}:{p}", self.host),
            (Some(ip), 0) => format!("{}[{ip}]", self.host),
            (Some(ip), p) => format!("{}[{ip}]:{p}", self.host),
        }
    }
}

/// A fact value; numbers stay numbers all the way to the database.
#[derive(Debug, Clone, PartialEq)]
pub enum FactValue {
    Text(String),
    Int(i64),
    Float(f64),
    Flag(bool),
}

impl From<&str> for FactValue {
    fn from(v: &str) -> Self {
        FactValue::Text(v.to_string())
    }
}
impl From<String> for FactValue {
    fn from(v: String) -> Self {
        FactValue::Text(v)
    }
}
impl From<i64> for FactValue {
    fn from(v: i64) -> Self {
        FactValue::Int(v)
    }
}
impl From<u16> for FactValue {
    fn from(v: u16) -> Self {
        FactValue::Int(v.into())
    }
}
impl From<u32> for FactValue {
    fn from(v: u32) -> Self {
        FactValue::Int(v.into())
    }
}
impl From<usize> for FactValue {
    fn from(v: usize) -> Self {
        FactValue::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<f64> for FactValue {
    fn from(v: f64) -> Self {
        FactValue::Float(v)
    }
}
impl From<bool> for FactValue {
    fn from(v: bool) -> Self {
        FactValue::Flag(v)
    }
}

/// What a probe saw, before the agent gives it a seq. Probes build these; nothing here knows gRPC.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub target: String,
    pub endpoint: Endpoint,
    pub check: CheckKind,
    /// Start of the probe, microseconds since the Unix epoch.
    pub start_us: i64,
    pub outcome: Outcome,
    pub error_class: Option<ErrorClass>,
    pub phase: Option<Phase>,
    pub timings: Vec<(Phase, Duration)>,
    pub facts: Vec<(String, FactValue)>,
    pub message: String,
    pub interval: Duration,
}

impl Observation {
    /// A fresh `ok` observation to be filled in by a probe.
    pub fn new(target: &str, endpoint: Endpoint, check: CheckKind, start_us: i64) -> Self {
        Observation {
            target: target.to_string(),
            endpoint,
            check,
            start_us,
            outcome: Outcome::Ok,
            error_class: None,
            phase: None,
            timings: Vec::new(),
            facts: Vec::new(),
            message: String::new(),
            interval: Duration::ZERO,
        }
    }

    pub fn timing(&mut self, phase: Phase, took: Duration) -> &mut Self {
        self.timings.push((phase, took));
        self
    }

    pub fn fact(&mut self, key: &str, value: impl Into<FactValue>) -> &mut Self {
        self.facts.push((key.to_string(), value.into()));
        self
    }

    /// Marks the observation failed (or warned) in `phase` with `class`; a worse outcome wins.
    pub fn problem(
        &mut self,
        outcome: Outcome,
        class: ErrorClass,
        phase: Phase,
        message: impl Into<String>,
    ) -> &mut Self {
        let worse =
            outcome > self.outcome || (self.error_class.is_none() && outcome != Outcome::Ok);
        if worse {
            self.outcome = outcome;
            self.error_class = Some(class);
            self.phase = Some(phase);
            self.message = message.into();
        }
        self
    }

    pub fn timing_of(&self, phase: Phase) -> Option<Duration> {
        self.timings
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, d)| *d)
    }

    pub fn fact_of(&self, key: &str) -> Option<&FactValue> {
        self.facts.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The wire form, stamped with the agent's id and the seq the spool gave it.
    pub fn into_wire(self, agent_id: &str, seq: u64) -> pb::ProbeResult {
        pb::ProbeResult {
            agent_id: agent_id.to_string(),
            seq,
            target: self.target,
            endpoint: Some(pb::Endpoint {
                host: self.endpoint.host,
                ip: self
                    .endpoint
                    .ip
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
                port: self.endpoint.port.into(),
                family: match self.endpoint.ip {
                    None => pb::AddressFamily::Unspecified,
                    Some(IpAddr::V4(_)) => pb::AddressFamily::Ipv4,
                    Some(IpAddr::V6(_)) => pb::AddressFamily::Ipv6,
                } as i32,
            }),
            check: self.check.name().to_string(),
            start_us: self.start_us,
            outcome: pb::Outcome::from(self.outcome) as i32,
            error_class: self
                .error_class
                .map(|c| c.name().to_string())
                .unwrap_or_default(),
            phase: self.phase.map(|p| p.name().to_string()).unwrap_or_default(),
            timings: self
                .timings
                .into_iter()
                .map(|(p, d)| pb::PhaseTiming {
                    phase: p.name().to_string(),
                    micros: u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
                })
                .collect(),
            facts: self
                .facts
                .into_iter()
                .map(|(key, v)| pb::Fact {
                    key,
                    value: Some(v.into()),
                })
                .collect(),
            message: self.message,
            interval_ms: u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

impl From<Outcome> for pb::Outcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Ok => pb::Outcome::Ok,
            Outcome::Warn => pb::Outcome::Warn,
            Outcome::Fail => pb::Outcome::Fail,
        }
    }
}

/// Reads a wire outcome; unknown or unspecified values are `None` (never a panic).
pub fn outcome_from_wire(v: i32) -> Option<Outcome> {
    match pb::Outcome::try_from(v).ok()? {
        pb::Outcome::Ok => Some(Outcome::Ok),
        pb::Outcome::Warn => Some(Outcome::Warn),
        pb::Outcome::Fail => Some(Outcome::Fail),
        pb::Outcome::Unspecified => None,
    }
}

impl From<FactValue> for pb::fact::Value {
    fn from(v: FactValue) -> Self {
        match v {
            FactValue::Text(s) => pb::fact::Value::Text(s),
            FactValue::Int(i) => pb::fact::Value::Int(i),
            FactValue::Float(f) => pb::fact::Value::Float(f),
            FactValue::Flag(b) => pb::fact::Value::Flag(b),
        }
    }
}

impl From<pb::fact::Value> for FactValue {
    fn from(v: pb::fact::Value) -> Self {
        match v {
            pb::fact::Value::Text(s) => FactValue::Text(s),
            pb::fact::Value::Int(i) => FactValue::Int(i),
            pb::fact::Value::Float(f) => FactValue::Float(f),
            pb::fact::Value::Flag(b) => FactValue::Flag(b),
        }
    }
}

/// Renders an endpoint from its wire fields (host, ip, port) the same way [`Endpoint::label`] does.
pub fn endpoint_label(host: &str, ip: &str, port: u32) -> String {
    Endpoint {
        host: host.to_string(),
        ip: ip.parse::<IpAddr>().ok(),
        port: u16::try_from(port).unwrap_or(0),
    }
    .label()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_lists_valid() {
        for k in CheckKind::ALL {
            assert_eq!(k.name().parse::<CheckKind>().unwrap(), *k);
        }
        let err = "smpt".parse::<CheckKind>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown check 'smpt'"), "{msg}");
        assert!(msg.contains("smtp") && msg.contains("imaps"), "{msg}");
    }

    #[test]
    fn endpoint_labels() {
        let mut e = Endpoint::host("mx.example.test");
        assert_eq!(e.label(), "mx.example.test");
        e.ip = Some("127.0.0.1".parse().unwrap());
        e.port = 25;
        assert_eq!(e.label(), "mx.example.test[127.0.0.1]:25");
    }

    #[test]
    fn worse_problem_wins() {
        let mut o = Observation::new("t", Endpoint::host("h"), CheckKind::Smtp, 0);
        o.problem(
            Outcome::Warn,
            ErrorClass::NoStarttls,
            Phase::Ehlo,
            "no starttls",
        );
        o.problem(Outcome::Fail, ErrorClass::Timeout, Phase::Quit, "t/o");
        assert_eq!(o.outcome, Outcome::Fail);
        assert_eq!(o.error_class, Some(ErrorClass::Timeout));
        o.problem(Outcome::Warn, ErrorClass::CertName, Phase::Tls, "x");
        assert_eq!(o.error_class, Some(ErrorClass::Timeout));
    }

    #[test]
    fn wire_conversion_keeps_numbers() {
        let mut o = Observation::new("t", Endpoint::host("h"), CheckKind::Mx, 5);
        o.fact("ttl", 300i64)
            .timing(Phase::Resolve, Duration::from_micros(1500));
        let w = o.into_wire("a1", 7);
        assert_eq!(w.seq, 7);
        assert_eq!(w.facts[0].value, Some(pb::fact::Value::Int(300)));
        assert_eq!(w.timings[0].micros, 1500);
        assert_eq!(outcome_from_wire(w.outcome), Some(Outcome::Ok));
        assert_eq!(outcome_from_wire(99), None);
    }
}
