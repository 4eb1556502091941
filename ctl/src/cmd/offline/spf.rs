//! `mxscopectl spf check DOMAIN --ip IP`: evaluates SPF (RFC 7208 `check_host()`, the shared
//! `mxscope-spf` evaluator) for an address and identity, resolving itself with hickory.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use futures::StreamExt as _;
use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts, ResolverConfig};
use hickory_resolver::name_server::{NameServerPool, TokioConnectionProvider};
use hickory_resolver::proto::op::{Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::proto::xfer::{DnsHandle as _, DnsRequestOptions};
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{ResolveErrorKind, TokioResolver};
use mxscope_proto::dns::DnsError;
use mxscope_proto::{names, ErrorClass};
use mxscope_spf::{check_domain, Identity, SpfDns, Verdict};

use crate::output::{Cell, Column, Format, Report};

/// `mxscopectl spf …`
#[derive(Debug, Subcommand)]
pub(crate) enum SpfCommand {
    /// Would DOMAIN's SPF policy let --ip send? Prints the result, the mechanism that matched,
    /// the DNS lookups used and the explanation (offline: resolves itself, no collector).
    Check(CheckArgs),
}

/// Arguments of `mxscopectl spf check`.
#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The domain whose policy is checked (the MAIL FROM domain, or the HELO name).
    pub domain: String,
    /// The client address that connects to the receiver.
    #[arg(long)]
    pub ip: IpAddr,
    /// The MAIL FROM address (`%{s}`, `%{l}`, `%{o}`); default `postmaster@DOMAIN`.
    #[arg(long)]
    pub sender: Option<String>,
    /// The HELO/EHLO name (`%{h}`); default DOMAIN.
    #[arg(long)]
    pub helo: Option<String>,
    /// Ask this DNS server (IP:PORT, UDP and TCP) instead of the system's resolvers.
    #[arg(long)]
    pub resolver: Option<SocketAddr>,
}

/// Checks the arguments, evaluates and prints one record.
pub(crate) async fn run(
    cmd: &SpfCommand,
    format: Format,
    timeout: Duration,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let SpfCommand::Check(a) = cmd;
    let domain = names::normalize_domain(&a.domain);
    if !names::is_dns_name(&domain) || !domain.contains('.') {
        bail!("{:?} is not a fully qualified domain name", a.domain);
    }
    let sender = match &a.sender {
        Some(s) => {
            let Some((_, d)) = s.rsplit_once('@') else {
                bail!("--sender {s:?} is not an address (local@domain)");
            };
            if !names::is_dns_name(d) {
                bail!("--sender {s:?}: {d:?} is not a domain name");
            }
            s.clone()
        }
        None => format!("postmaster@{domain}"),
    };
    let helo = a.helo.clone().unwrap_or_else(|| domain.clone());
    let dns = HickoryDns::new(a.resolver, timeout)?;
    let id = Identity {
        ip: a.ip,
        mail_from: &sender,
        helo: &helo,
    };
    let verdict = check_domain(&domain, &id, &dns).await;
    report(&verdict, &id)
        .render_one(format, out)
        .context("write the result")
}

fn report(v: &Verdict, id: &Identity<'_>) -> Report {
    let mut r = Report::new(vec![
        Column::text("domain", "DOMAIN"),
        Column::text("ip", "IP"),
        Column::text("sender", "SENDER"),
        Column::text("helo", "HELO"),
        Column::text("result", "RESULT"),
        Column::text("mechanism", "MECHANISM"),
        Column::text("matched_in", "IN"),
        Column::number("lookups", "LOOKUPS"),
        Column::text("explanation", "EXPLANATION"),
        Column::text("error", "ERROR"),
    ]);
    r.push(vec![
        Cell::new(v.domain.clone()),
        Cell::new(id.ip.to_string()),
        Cell::new(id.mail_from.to_string()),
        Cell::new(id.helo.to_string()),
        Cell::new(v.result.name()),
        Cell::opt(v.matched.clone()),
        Cell::opt(v.matched_in.clone()),
        Cell::new(v.lookups),
        Cell::opt(v.explanation.clone()),
        Cell::opt(v.error.as_ref().map(ToString::to_string)),
    ]);
    r
}

/// SPF's DNS view through hickory: void answers (NXDOMAIN, no data) are empty lists, other
/// failures a classified [`DnsError`].
struct HickoryDns {
    inner: TokioResolver,
    /// The same servers without hickory's RFC 6761 shortcuts (it answers every PTR under
    /// `127.in-addr.arpa` with `localhost` itself); used for PTR queries.
    pool: NameServerPool<TokioConnectionProvider>,
    timeout: Duration,
}

impl std::fmt::Debug for HickoryDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HickoryDns").finish_non_exhaustive()
    }
}

impl HickoryDns {
    fn new(server: Option<SocketAddr>, timeout: Duration) -> anyhow::Result<HickoryDns> {
        let provider = TokioConnectionProvider::default();
        let mut builder = match server {
            Some(server) => {
                let group =
                    NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
                let mut b = TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], group),
                    provider,
                );
                b.options_mut().use_hosts_file = ResolveHosts::Never;
                b
            }
            None => TokioResolver::builder(provider)
                .context("read the system resolver configuration (or give --resolver)")?,
        };
        let opts = builder.options_mut();
        opts.ndots = 0;
        opts.timeout = timeout;
        opts.attempts = 2;
        let inner = builder.build();
        let pool = NameServerPool::from_config(
            inner.config().name_servers().to_vec().into(),
            inner.options().clone(),
            TokioConnectionProvider::default(),
        );
        Ok(HickoryDns {
            inner,
            pool,
            timeout: timeout * 3,
        })
    }

    async fn lookup(&self, name: &str, rtype: RecordType) -> Result<Vec<RData>, DnsError> {
        let err = |class: ErrorClass, detail: String| DnsError {
            class,
            name: name.to_string(),
            detail,
        };
        // raw labels: macro-expanded names may hold any octet DNS allows
        let trimmed = name.strip_suffix('.').unwrap_or(name);
        let mut qname = Name::from_labels(trimmed.split('.').map(str::as_bytes))
            .map_err(|e| err(ErrorClass::DnsError, format!("bad query name: {e}")))?;
        qname.set_fqdn(true);
        match self.inner.lookup(qname, rtype).await {
            Ok(l) => Ok(l.record_iter().map(|r| r.data().clone()).collect()),
            Err(e) => {
                let class = match e.kind() {
                    ResolveErrorKind::Proto(p) => match p.kind() {
                        ProtoErrorKind::NoRecordsFound { .. } => return Ok(Vec::new()),
                        ProtoErrorKind::Timeout => ErrorClass::DnsTimeout,
                        _ => ErrorClass::DnsError,
                    },
                    _ => ErrorClass::DnsError,
                };
                Err(err(class, e.to_string()))
            }
        }
    }
}

#[async_trait::async_trait]
impl SpfDns for HickoryDns {
    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let records = self.lookup(name, RecordType::TXT).await?;
        Ok(records
            .iter()
            .filter_map(|r| match r {
                RData::TXT(t) => Some(
                    t.txt_data()
                        .iter()
                        .map(|s| String::from_utf8_lossy(s))
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }

    async fn mx_hosts(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let records = self.lookup(name, RecordType::MX).await?;
        Ok(records
            .iter()
            .filter_map(|r| match r {
                RData::MX(mx) => Some(mx.exchange().to_ascii().trim_end_matches('.').to_string()),
                _ => None,
            })
            .collect())
    }

    async fn a(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsError> {
        let records = self.lookup(name, RecordType::A).await?;
        Ok(records
            .iter()
            .filter_map(|r| match r {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect())
    }

    async fn aaaa(&self, name: &str) -> Result<Vec<Ipv6Addr>, DnsError> {
        let records = self.lookup(name, RecordType::AAAA).await?;
        Ok(records
            .iter()
            .filter_map(|r| match r {
                RData::AAAA(a) => Some(a.0),
                _ => None,
            })
            .collect())
    }

    async fn ptr(&self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        let qname = Name::from(ip);
        let err = |class: ErrorClass, detail: String| DnsError {
            class,
            name: qname.to_ascii(),
            detail,
        };
        let mut opts = DnsRequestOptions::default();
        opts.use_edns = true;
        let mut responses = self
            .pool
            .lookup(Query::query(qname.clone(), RecordType::PTR), opts);
        let response = match tokio::time::timeout(self.timeout, responses.next()).await {
            Err(_) => return Err(err(ErrorClass::DnsTimeout, "no answer".to_string())),
            Ok(None) => return Err(err(ErrorClass::DnsError, "no response".to_string())),
            Ok(Some(Err(e))) => {
                if let ProtoErrorKind::NoRecordsFound { .. } = e.kind() {
                    return Ok(Vec::new());
                }
                return Err(err(ErrorClass::DnsError, e.to_string()));
            }
            Ok(Some(Ok(r))) => r,
        };
        let code = response.response_code();
        if !matches!(code, ResponseCode::NoError | ResponseCode::NXDomain) {
            return Err(err(ErrorClass::DnsServfail, format!("{code}")));
        }
        Ok(response
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::PTR(p) => Some(p.0.to_ascii().trim_end_matches('.').to_string()),
                _ => None,
            })
            .collect())
    }
}
