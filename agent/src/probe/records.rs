//! DNS policy record checks: `spf`, `dmarc`, `dkim` and `tlsrpt`. Each fetches its TXT records
//! through `Resolve`, grades them with the pure `policy` parsers and returns one observation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use mxscope_proto::{facts, CheckKind, Endpoint, ErrorClass, Observation, Outcome, Phase};
use tokio::time::Instant;

use super::endpoints::{bounded, expand, Fanout};
use super::policy::{dkim, dmarc, tlsrpt};
use super::resolve::{Answer, DnsError, Resolve};
use super::spf;
use super::{CheckSpec, TargetKind};

/// TXT strings at `name`; NXDOMAIN and no-data are an empty list, other failures an `Err`.
pub(crate) async fn txt_or_empty(
    resolver: &dyn Resolve,
    name: &str,
    deadline: Instant,
) -> Result<Vec<String>, DnsError> {
    void_or(bounded(name, deadline, resolver.txt(name)).await)
}

fn is_void(e: &DnsError) -> bool {
    matches!(e.class, ErrorClass::DnsNxdomain | ErrorClass::DnsNodata)
}

/// The records of an answer; a void answer (NXDOMAIN, no data) is an empty list.
fn void_or<T>(r: Result<Answer<T>, DnsError>) -> Result<Vec<T>, DnsError> {
    match r {
        Ok(a) => Ok(a.records),
        Err(e) if is_void(&e) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// SPF's view of DNS on top of our `Resolve`, bounded by the probe deadline.
struct SpfView<'a> {
    resolver: &'a dyn Resolve,
    deadline: Instant,
}

#[async_trait::async_trait]
impl spf::SpfDns for SpfView<'_> {
    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        txt_or_empty(self.resolver, name, self.deadline).await
    }

    async fn mx_hosts(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let r = bounded(name, self.deadline, self.resolver.mx(name)).await;
        void_or(r).map(|v| v.into_iter().map(|m| m.exchange).collect())
    }

    async fn a(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsError> {
        let ips = void_or(bounded(name, self.deadline, self.resolver.ips(name)).await)?;
        Ok(ips
            .into_iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect())
    }

    async fn aaaa(&self, name: &str) -> Result<Vec<Ipv6Addr>, DnsError> {
        let ips = void_or(bounded(name, self.deadline, self.resolver.ips(name)).await)?;
        Ok(ips
            .into_iter()
            .filter_map(|ip| match ip {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            })
            .collect())
    }

    async fn ptr(&self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        let name = ip.to_string();
        void_or(bounded(&name, self.deadline, self.resolver.reverse(ip)).await)
    }
}

fn observation(spec: &CheckSpec, check: CheckKind, start_us: i64) -> Observation {
    Observation::new(&spec.target, Endpoint::host(&spec.target), check, start_us)
}

/// Records a DNS failure of the record lookup itself.
/// The TXT records at `name`, timed as the `resolve` phase; `None` after recording a DNS problem
/// with `what` (the record kind) in the observation.
async fn timed_txt(
    obs: &mut Observation,
    resolver: &dyn Resolve,
    name: &str,
    deadline: Instant,
    what: &str,
) -> Option<Vec<String>> {
    let started = Instant::now();
    let txt = txt_or_empty(resolver, name, deadline).await;
    obs.timing(Phase::Resolve, started.elapsed());
    txt.map_err(|e| dns_problem(obs, what, &e)).ok()
}

fn dns_problem(obs: &mut Observation, what: &str, e: &DnsError) {
    obs.problem(
        Outcome::Fail,
        e.class,
        Phase::Resolve,
        format!("{what} lookup: {e}"),
    );
}

/// `spf`: exactly one valid record, the recursive lookup count, `+all`, whether every MX
/// address of the domain is authorised by it, and the result for each configured outbound
/// address (`spf_senders`).
pub(crate) async fn spf_check(
    spec: &CheckSpec,
    resolver: &dyn Resolve,
    fanout: Fanout,
    start_us: i64,
    deadline: Instant,
) -> Observation {
    let mut obs = observation(spec, CheckKind::Spf, start_us);
    let domain = spec.target.as_str();
    let started = Instant::now();
    let txt = match txt_or_empty(resolver, domain, deadline).await {
        Ok(t) => t,
        Err(e) => {
            obs.timing(Phase::Resolve, started.elapsed());
            dns_problem(&mut obs, "SPF", &e);
            return obs;
        }
    };
    let spf_count = txt
        .iter()
        .filter(|t| spf::select_spf(std::slice::from_ref(t)).is_ok())
        .count();
    obs.fact(facts::spf::RECORDS, spf_count);
    let record = match spf::select_spf(&txt) {
        Ok(r) => r,
        Err(e) => {
            obs.timing(Phase::Resolve, started.elapsed());
            obs.problem(
                Outcome::Fail,
                ErrorClass::Policy,
                Phase::Resolve,
                format!("SPF for {domain}: {e}"),
            );
            return obs;
        }
    };
    obs.fact(facts::spf::RECORD, record.as_str());
    let parsed = match spf::parse(&record) {
        Ok(p) => p,
        Err(e) => {
            obs.timing(Phase::Resolve, started.elapsed());
            obs.fact(facts::spf::VALID, false);
            obs.problem(
                Outcome::Fail,
                ErrorClass::Policy,
                Phase::Resolve,
                format!("SPF record of {domain} does not parse: {e}"),
            );
            return obs;
        }
    };
    obs.fact(facts::spf::VALID, true);
    if let Some(q) = parsed.all_qualifier() {
        obs.fact(facts::spf::ALL, format!("{q:?}").to_ascii_lowercase());
    }
    let view = SpfView { resolver, deadline };
    let report = spf::count_lookups(domain, &view).await;
    obs.fact(facts::spf::LOOKUPS, report.total)
        .fact(facts::spf::LOOKUP_LIMIT, spf::LOOKUP_LIMIT)
        .fact(facts::spf::VOID_LOOKUPS, report.void_lookups)
        .fact(facts::spf::PLUS_ALL, report.plus_all || parsed.plus_all());
    if report.chain.len() > 1 {
        obs.fact(facts::spf::INCLUDES, report.chain[1..].join(","));
    }
    if !report.errors.is_empty() {
        let issues: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
        obs.fact(facts::spf::ISSUES, issues.join("; "));
        obs.problem(
            Outcome::Warn,
            ErrorClass::Policy,
            Phase::Resolve,
            format!("SPF of {domain}: {}", issues.join("; ")),
        );
    }
    if report.limit_exceeded {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Resolve,
            format!(
                "SPF of {domain} needs {} DNS lookups, more than the limit of {}: receivers return permerror",
                report.total,
                spf::LOOKUP_LIMIT
            ),
        );
    }
    if report.void_limit_exceeded {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Resolve,
            format!(
                "SPF of {domain} has {} void lookups, more than {}",
                report.void_lookups,
                spf::VOID_LOOKUP_LIMIT
            ),
        );
    }
    if report.plus_all || parsed.plus_all() {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Resolve,
            format!("SPF of {domain} ends in +all: every host on the internet may send as it"),
        );
    }

    // Is each MX address authorised to send for the domain?
    let expansion = expand(resolver, domain, TargetKind::Domain, fanout, deadline).await;
    expansion.note_caps(&mut obs);
    obs.fact(facts::spf::MX_ADDRESSES, expansion.addrs.len());
    let mut unauthorised = Vec::new();
    for a in &expansion.addrs {
        let verdict = spf::authorizes(domain, a.ip, &view).await;
        let result = match &verdict {
            Ok(auth) => format!("{:?}", auth.result),
            Err(e) => format!("{:?}", e.result()),
        };
        obs.fact(
            &facts::spf::mx_address(&a.ip.to_string()),
            result.to_ascii_lowercase().as_str(),
        );
        if !verdict.as_ref().is_ok_and(spf::Authorization::is_pass) {
            unauthorised.push(format!("{} ({})", a.ip, result.to_ascii_lowercase()));
        }
    }
    obs.fact(facts::spf::MX_UNAUTHORISED, unauthorised.len());
    if !unauthorised.is_empty() {
        obs.problem(
            Outcome::Warn,
            ErrorClass::Policy,
            Phase::Resolve,
            format!(
                "SPF of {domain} does not authorise MX address(es) {}",
                unauthorised.join(", ")
            ),
        );
    }

    // Is each configured outbound address (`spf_senders`) authorised? A sender that does not
    // pass is a failure: mail it sends for the domain is refused or marked.
    let mut refused = Vec::new();
    for ip in &spec.options.spf_senders {
        let mail_from = format!("postmaster@{domain}");
        let verdict = spf::check_host(
            &spf::Identity {
                ip: *ip,
                mail_from: &mail_from,
                helo: domain,
            },
            &view,
        )
        .await;
        let result = verdict.result.name();
        obs.fact(&facts::spf::sender_address(&ip.to_string()), result);
        if verdict.result != spf::SpfResult::Pass {
            let why = match (&verdict.matched, &verdict.error) {
                (_, Some(e)) => format!("{ip} ({result}: {e})"),
                (Some(m), None) => format!("{ip} ({result} by {m})"),
                (None, None) => format!("{ip} ({result})"),
            };
            refused.push(why);
        }
    }
    if !spec.options.spf_senders.is_empty() {
        obs.fact(facts::spf::SENDERS_UNAUTHORISED, refused.len());
    }
    if !refused.is_empty() {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Resolve,
            format!(
                "SPF of {domain} does not authorise outbound address(es) {}",
                refused.join(", ")
            ),
        );
    }
    obs.timing(Phase::Resolve, started.elapsed());
    obs
}

fn dmarc_finding(f: &dmarc::DmarcFinding) -> String {
    use dmarc::DmarcFinding as F;
    match f {
        F::NoRecord => "no DMARC record".to_string(),
        F::MultipleRecords { count } => format!("{count} DMARC records (exactly one allowed)"),
        F::Invalid(e) => format!("invalid DMARC record: {e}"),
        F::PolicyNone => "p=none: receivers only monitor, nothing is rejected".to_string(),
        F::SubdomainPolicyNone => "sp=none: subdomains are not protected".to_string(),
        F::PartialPct { pct } => format!("pct={pct}: the policy applies to part of the mail"),
        F::NoAggregateReports => "no rua: nobody receives aggregate reports".to_string(),
    }
}

fn policy_name(p: dmarc::Policy) -> &'static str {
    match p {
        dmarc::Policy::None => "none",
        dmarc::Policy::Quarantine => "quarantine",
        dmarc::Policy::Reject => "reject",
    }
}

fn alignment_name(a: dmarc::Alignment) -> &'static str {
    match a {
        dmarc::Alignment::Relaxed => "r",
        dmarc::Alignment::Strict => "s",
    }
}

/// `dmarc`: the `_dmarc` record parsed and graded (`p=none` is a warning).
pub(crate) async fn dmarc_check(
    spec: &CheckSpec,
    resolver: &dyn Resolve,
    start_us: i64,
    deadline: Instant,
) -> Observation {
    let mut obs = observation(spec, CheckKind::Dmarc, start_us);
    let name = format!("_dmarc.{}", spec.target);
    let Some(txt) = timed_txt(&mut obs, resolver, &name, deadline, "DMARC").await else {
        return obs;
    };
    let verdict = dmarc::evaluate(&txt);
    if let Some(r) = &verdict.record {
        obs.fact(facts::dmarc::P, policy_name(r.policy));
        if let Some(sp) = r.subdomain_policy {
            obs.fact(facts::dmarc::SP, policy_name(sp));
        }
        obs.fact(facts::dmarc::PCT, u32::from(r.pct))
            .fact(facts::dmarc::ADKIM, alignment_name(r.adkim))
            .fact(facts::dmarc::ASPF, alignment_name(r.aspf))
            .fact(facts::dmarc::RUA_COUNT, r.rua.len())
            .fact(facts::dmarc::RUF_COUNT, r.ruf.len());
        if !r.rua.is_empty() {
            let rua: Vec<&str> = r.rua.iter().map(|u| u.uri.as_str()).collect();
            obs.fact(facts::dmarc::RUA, rua.join(","));
        }
    }
    if let [one] = txt.as_slice() {
        obs.fact(facts::dmarc::RECORD, one.as_str());
    }
    let messages: Vec<String> = verdict.findings.iter().map(dmarc_finding).collect();
    if !messages.is_empty() {
        obs.fact(facts::dmarc::FINDINGS, messages.join("; "));
    }
    if verdict.outcome != Outcome::Ok {
        let worst: Vec<String> = verdict
            .findings
            .iter()
            .filter(|f| f.severity() == verdict.outcome)
            .map(dmarc_finding)
            .collect();
        obs.problem(
            verdict.outcome,
            ErrorClass::Policy,
            Phase::Resolve,
            format!("DMARC of {}: {}", spec.target, worst.join("; ")),
        );
    }
    obs
}

fn dkim_finding(f: &dkim::DkimFinding) -> String {
    use dkim::DkimFinding as F;
    match f {
        F::NoRecord => "no key record".to_string(),
        F::MultipleRecords { count } => format!("{count} key records"),
        F::Invalid(e) => format!("invalid key record: {e}"),
        F::Revoked => "key revoked (empty p=)".to_string(),
        F::BadKey(e) => format!("unusable key: {e}"),
        F::WeakKey { bits } => format!("{bits}-bit key, under 1024 bits: verifiers reject it"),
        F::ShortKey { bits } => format!("{bits}-bit key, under 2048 bits"),
        F::Testing => "t=y: testing mode".to_string(),
        F::Sha1Only => "h= allows only sha1".to_string(),
    }
}

/// `dkim`: each configured selector's key record, graded; the worst selector decides.
pub(crate) async fn dkim_check(
    spec: &CheckSpec,
    resolver: &dyn Resolve,
    start_us: i64,
    deadline: Instant,
) -> Observation {
    let mut obs = observation(spec, CheckKind::Dkim, start_us);
    let started = Instant::now();
    let selectors = &spec.options.dkim_selectors;
    obs.fact(facts::dkim::SELECTORS, selectors.len());
    if selectors.is_empty() {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Total,
            "no DKIM selectors configured (dkim_selectors in the target)",
        );
        return obs;
    }
    for sel in selectors {
        let name = format!("{sel}._domainkey.{}", spec.target);
        let txt = match txt_or_empty(resolver, &name, deadline).await {
            Ok(t) => t,
            Err(e) => {
                obs.fact(
                    &facts::dkim::selector(sel, facts::dkim::field::ERROR),
                    e.class.name(),
                );
                dns_problem(&mut obs, &format!("DKIM selector {sel}"), &e);
                continue;
            }
        };
        let v = dkim::evaluate(&txt);
        if let Some(bits) = v.bits {
            obs.fact(&facts::dkim::selector(sel, facts::dkim::field::BITS), bits);
        }
        if let Some(r) = &v.record {
            obs.fact(
                &facts::dkim::selector(sel, facts::dkim::field::KEY_TYPE),
                format!("{:?}", r.key_type).to_ascii_lowercase(),
            );
            obs.fact(
                &facts::dkim::selector(sel, facts::dkim::field::REVOKED),
                r.revoked(),
            );
            obs.fact(&facts::dkim::selector(sel, "testing"), r.testing());
        }
        let messages: Vec<String> = v.findings.iter().map(dkim_finding).collect();
        obs.fact(
            &facts::dkim::selector(sel, facts::dkim::field::OUTCOME),
            v.outcome.name(),
        );
        if !messages.is_empty() {
            obs.fact(
                &facts::dkim::selector(sel, facts::dkim::field::FINDINGS),
                messages.join("; "),
            );
        }
        if v.outcome != Outcome::Ok {
            let worst: Vec<String> = v
                .findings
                .iter()
                .filter(|f| f.severity() == v.outcome)
                .map(dkim_finding)
                .collect();
            obs.problem(
                v.outcome,
                ErrorClass::Policy,
                Phase::Resolve,
                format!("DKIM selector {sel}: {}", worst.join("; ")),
            );
        }
    }
    obs.timing(Phase::Resolve, started.elapsed());
    obs
}

/// `tlsrpt`: the `_smtp._tls` record present and parsed, with its report destinations.
pub(crate) async fn tlsrpt_check(
    spec: &CheckSpec,
    resolver: &dyn Resolve,
    start_us: i64,
    deadline: Instant,
) -> Observation {
    let mut obs = observation(spec, CheckKind::Tlsrpt, start_us);
    let name = format!("_smtp._tls.{}", spec.target);
    let Some(txt) = timed_txt(&mut obs, resolver, &name, deadline, "TLS-RPT").await else {
        return obs;
    };
    match tlsrpt::select(&txt) {
        Ok(r) => {
            let rua: Vec<String> = r
                .rua
                .iter()
                .map(|u| match u {
                    tlsrpt::ReportUri::Mailto(a) => format!("mailto:{a}"),
                    tlsrpt::ReportUri::Https(u) => u.clone(),
                })
                .collect();
            obs.fact(facts::tlsrpt::RUA_COUNT, rua.len())
                .fact(facts::tlsrpt::RUA, rua.join(","));
        }
        Err(e) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::Policy,
                Phase::Resolve,
                format!("TLS-RPT of {}: {e}", spec.target),
            );
        }
    }
    obs
}
