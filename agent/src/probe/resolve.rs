//! DNS behind our own small trait: hickory's error types change between releases, and a fake
//! resolver makes pure probe tests possible. Errors are classified into `ErrorClass` here, once.

use std::net::IpAddr;
use std::time::Duration;

use mxscope_proto::ErrorClass;

pub use mxscope_proto::dns::DnsError;

/// One MX record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxRecord {
    pub preference: u16,
    /// Exchange host name without the trailing dot.
    pub exchange: String,
}

/// One TLSA record (RFC 6698): certificate usage, selector, matching type and association data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsaRecord {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

/// Records with the TTL of the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer<T> {
    pub records: Vec<T>,
    pub ttl: u32,
}

/// The DNS questions probes ask.
#[async_trait::async_trait]
pub trait Resolve: Send + Sync + 'static {
    async fn mx(&self, name: &str) -> Result<Answer<MxRecord>, DnsError>;
    /// A and AAAA together; an empty answer (no error) when the name has neither.
    async fn ips(&self, name: &str) -> Result<Answer<IpAddr>, DnsError>;
    async fn txt(&self, name: &str) -> Result<Answer<String>, DnsError>;
    /// PTR names of an address (reverse DNS), without trailing dots.
    async fn reverse(&self, ip: IpAddr) -> Result<Answer<String>, DnsError>;
    /// TLSA records at `name` (e.g. `_25._tcp.mx.example.test`).
    async fn tlsa(&self, name: &str) -> Result<Answer<TlsaRecord>, DnsError>;
    /// The CNAME target of `name` when `name` is an alias; `Ok(None)` when it is not.
    async fn cname(&self, name: &str) -> Result<Option<String>, DnsError>;
    /// The serial of the SOA record at `name` (a zone apex); `dns_nodata` elsewhere.
    async fn soa_serial(&self, name: &str) -> Result<Answer<u32>, DnsError> {
        Err(DnsError {
            class: ErrorClass::DnsNodata,
            name: name.to_string(),
            detail: "this resolver does not ask for SOA records".to_string(),
        })
    }
}

/// The PTR query name of an address: `d.c.b.a.in-addr.arpa` or the nibbles under `ip6.arpa`.
pub fn reverse_name(ip: IpAddr) -> String {
    let zone = if ip.is_ipv4() || matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) {
        "in-addr.arpa"
    } else {
        "ip6.arpa"
    };
    super::dnsbl::parse::reverse_query_name(ip, zone)
}

/// Settings for the hickory-backed resolver.
#[derive(Debug, Clone, Default)]
pub struct ResolverConfig {
    /// All DNS goes to this server (`--resolver IP:PORT`); `None` = the system configuration.
    pub server: Option<std::net::SocketAddr>,
    pub timeout: Option<Duration>,
}

/// The real resolver (hickory), built once per agent. It keeps no cache (monitoring wants live
/// answers and the TTLs the servers send) and asks fully qualified names only (no search list).
pub struct Resolver {
    inner: hickory_resolver::TokioResolver,
    /// The same servers without hickory's RFC 6761 shortcuts (it answers every PTR under
    /// `127.in-addr.arpa` with `localhost` itself); used for reverse lookups.
    pool: hickory_resolver::name_server::NameServerPool<
        hickory_resolver::name_server::TokioConnectionProvider,
    >,
    /// Our own bound on one question, on top of hickory's per-attempt timeout.
    deadline: Duration,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// Builds the resolver; fails (with the reason) when the system configuration cannot be read.
    pub fn new(config: ResolverConfig) -> Result<Self, DnsError> {
        use hickory_resolver::config::{
            NameServerConfigGroup, ResolveHosts, ResolverConfig as HickoryConfig,
        };
        use hickory_resolver::name_server::TokioConnectionProvider;

        let provider = TokioConnectionProvider::default();
        let mut builder = match config.server {
            Some(server) => {
                // All DNS (UDP and TCP) to this one server, no search domains, no hosts file.
                let group =
                    NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
                let mut b = hickory_resolver::TokioResolver::builder_with_config(
                    HickoryConfig::from_parts(None, vec![], group),
                    provider,
                );
                b.options_mut().use_hosts_file = ResolveHosts::Never;
                b
            }
            None => hickory_resolver::TokioResolver::builder(provider).map_err(|e| DnsError {
                class: ErrorClass::DnsError,
                name: "/etc/resolv.conf".to_string(),
                detail: format!("cannot read the system resolver configuration: {e}"),
            })?,
        };
        let opts = builder.options_mut();
        opts.cache_size = 0;
        opts.ndots = 0;
        opts.preserve_intermediates = false;
        let per_attempt = config.timeout.unwrap_or(Duration::from_secs(3));
        opts.timeout = per_attempt;
        opts.attempts = 2;
        let deadline = per_attempt * 3;
        let inner = builder.build();
        let pool = hickory_resolver::name_server::NameServerPool::from_config(
            inner.config().name_servers().to_vec().into(),
            inner.options().clone(),
            TokioConnectionProvider::default(),
        );
        Ok(Resolver {
            inner,
            pool,
            deadline,
        })
    }

    async fn lookup(
        &self,
        name: &str,
        rtype: hickory_resolver::proto::rr::RecordType,
    ) -> Result<hickory_resolver::lookup::Lookup, DnsError> {
        let qname = raw_name(name).map_err(|e| DnsError {
            class: ErrorClass::DnsError,
            name: name.to_string(),
            detail: format!("bad query name: {e}"),
        })?;
        match tokio::time::timeout(self.deadline, self.inner.lookup(qname, rtype)).await {
            Ok(Ok(lookup)) => Ok(lookup),
            Ok(Err(e)) => Err(DnsError {
                class: classify(&e),
                name: name.to_string(),
                detail: e.to_string(),
            }),
            Err(_) => Err(DnsError {
                class: ErrorClass::DnsTimeout,
                name: name.to_string(),
                detail: format!("no answer within {:?}", self.deadline),
            }),
        }
    }

    /// One address family; `Ok(None)` when the name exists but has no such records.
    async fn family(
        &self,
        name: &str,
        rtype: hickory_resolver::proto::rr::RecordType,
    ) -> Result<Option<Answer<IpAddr>>, DnsError> {
        use hickory_resolver::proto::rr::RData;
        match self.lookup(name, rtype).await {
            Ok(lookup) => {
                let mut ttl = u32::MAX;
                let mut records = Vec::new();
                for r in lookup.records() {
                    let ip = match r.data() {
                        RData::A(a) => IpAddr::V4(a.0),
                        RData::AAAA(a) => IpAddr::V6(a.0),
                        _ => continue,
                    };
                    ttl = ttl.min(r.ttl());
                    records.push(ip);
                }
                if records.is_empty() {
                    return Ok(None);
                }
                Ok(Some(Answer { records, ttl }))
            }
            Err(e) if e.class == ErrorClass::DnsNodata => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The name as an absolute DNS name, so no search domain is ever appended.
/// `name` as a fully qualified DNS name, its labels taken as raw octets: names that SPF macros
/// expand to may hold any octet DNS allows (`%`, spaces, `_`), not only host-name characters.
fn raw_name(
    name: &str,
) -> Result<hickory_resolver::proto::rr::Name, hickory_resolver::proto::ProtoError> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.split('.').any(str::is_empty) {
        return Err(format!("empty label in {name:?}").into());
    }
    let mut n =
        hickory_resolver::proto::rr::Name::from_labels(trimmed.split('.').map(str::as_bytes))?;
    n.set_fqdn(true);
    Ok(n)
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// Classifies a hickory error by its kind and response code (never by its text).
fn classify(err: &hickory_resolver::ResolveError) -> ErrorClass {
    use hickory_resolver::ResolveErrorKind;

    let ResolveErrorKind::Proto(proto) = err.kind() else {
        return ErrorClass::DnsError;
    };
    classify_proto(proto)
}

/// Classifies a hickory protocol error by its kind and response code.
fn classify_proto(proto: &hickory_resolver::proto::ProtoError) -> ErrorClass {
    use hickory_resolver::proto::ProtoErrorKind;
    match proto.kind() {
        ProtoErrorKind::NoRecordsFound { response_code, .. } => classify_rcode(*response_code),
        ProtoErrorKind::Timeout => ErrorClass::DnsTimeout,
        ProtoErrorKind::RequestRefused => ErrorClass::DnsRefused,
        ProtoErrorKind::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            ErrorClass::DnsTimeout
        }
        _ => ErrorClass::DnsError,
    }
}

/// Maps a DNS response code to our class.
fn classify_rcode(code: hickory_resolver::proto::op::ResponseCode) -> ErrorClass {
    use hickory_resolver::proto::op::ResponseCode;
    match code {
        ResponseCode::NXDomain => ErrorClass::DnsNxdomain,
        ResponseCode::NoError => ErrorClass::DnsNodata,
        ResponseCode::ServFail => ErrorClass::DnsServfail,
        ResponseCode::Refused => ErrorClass::DnsRefused,
        _ => ErrorClass::DnsError,
    }
}

#[async_trait::async_trait]
impl Resolve for Resolver {
    async fn mx(&self, name: &str) -> Result<Answer<MxRecord>, DnsError> {
        use hickory_resolver::proto::rr::{RData, RecordType};
        let lookup = self.lookup(name, RecordType::MX).await?;
        let mut ttl = u32::MAX;
        let mut records = Vec::new();
        for r in lookup.records() {
            if let RData::MX(mx) = r.data() {
                ttl = ttl.min(r.ttl());
                let exchange = mx.exchange().to_ascii();
                let exchange = exchange.trim_end_matches('.').to_string();
                records.push(MxRecord {
                    preference: mx.preference(),
                    exchange,
                });
            }
        }
        if records.is_empty() {
            return Err(DnsError {
                class: ErrorClass::DnsNodata,
                name: name.to_string(),
                detail: "no MX records in the answer".to_string(),
            });
        }
        records.sort_by(|a, b| {
            a.preference
                .cmp(&b.preference)
                .then(a.exchange.cmp(&b.exchange))
        });
        Ok(Answer { records, ttl })
    }

    async fn ips(&self, name: &str) -> Result<Answer<IpAddr>, DnsError> {
        use hickory_resolver::proto::rr::RecordType;
        let (v4, v6) = tokio::join!(
            self.family(name, RecordType::A),
            self.family(name, RecordType::AAAA)
        );
        merge_families(name, v4, v6)
    }

    async fn txt(&self, name: &str) -> Result<Answer<String>, DnsError> {
        use hickory_resolver::proto::rr::{RData, RecordType};
        let lookup = self.lookup(name, RecordType::TXT).await?;
        let mut ttl = u32::MAX;
        let mut records = Vec::new();
        for r in lookup.records() {
            if let RData::TXT(txt) = r.data() {
                ttl = ttl.min(r.ttl());
                let text: String = txt
                    .txt_data()
                    .iter()
                    .map(|part| String::from_utf8_lossy(part))
                    .collect();
                records.push(text);
            }
        }
        if records.is_empty() {
            return Err(DnsError {
                class: ErrorClass::DnsNodata,
                name: name.to_string(),
                detail: "no TXT records in the answer".to_string(),
            });
        }
        Ok(Answer { records, ttl })
    }

    async fn reverse(&self, ip: IpAddr) -> Result<Answer<String>, DnsError> {
        use futures::StreamExt as _;
        use hickory_resolver::proto::op::Query;
        use hickory_resolver::proto::rr::{Name, RData, RecordType};
        use hickory_resolver::proto::xfer::{DnsHandle as _, DnsRequestOptions};

        let name = reverse_name(ip);
        let err = |class: ErrorClass, detail: String| DnsError {
            class,
            name: name.clone(),
            detail,
        };
        let qname = Name::from_ascii(fqdn(&name))
            .map_err(|e| err(ErrorClass::DnsError, format!("bad query name: {e}")))?;
        let mut opts = DnsRequestOptions::default();
        opts.use_edns = true;
        let mut responses = self.pool.lookup(Query::query(qname, RecordType::PTR), opts);
        let response = match tokio::time::timeout(self.deadline, responses.next()).await {
            Err(_) => {
                return Err(err(
                    ErrorClass::DnsTimeout,
                    format!("no answer within {:?}", self.deadline),
                ))
            }
            Ok(None) => return Err(err(ErrorClass::DnsError, "no response".to_string())),
            Ok(Some(Err(e))) => return Err(err(classify_proto(&e), e.to_string())),
            Ok(Some(Ok(r))) => r,
        };
        let code = response.response_code();
        let mut ttl = u32::MAX;
        let mut records = Vec::new();
        for r in response.answers() {
            if let RData::PTR(p) = r.data() {
                ttl = ttl.min(r.ttl());
                records.push(p.0.to_ascii().trim_end_matches('.').to_string());
            }
        }
        if records.is_empty() {
            return Err(err(
                classify_rcode(code),
                format!("no PTR records ({code})"),
            ));
        }
        Ok(Answer { records, ttl })
    }

    async fn soa_serial(&self, name: &str) -> Result<Answer<u32>, DnsError> {
        use hickory_resolver::proto::rr::{RData, RecordType};
        self.records(name, RecordType::SOA, |d| match d {
            RData::SOA(soa) => Some(soa.serial()),
            _ => None,
        })
        .await
    }

    async fn tlsa(&self, name: &str) -> Result<Answer<TlsaRecord>, DnsError> {
        use hickory_resolver::proto::rr::{RData, RecordType};
        self.records(name, RecordType::TLSA, |d| match d {
            RData::TLSA(t) => Some(TlsaRecord {
                usage: t.cert_usage().into(),
                selector: t.selector().into(),
                matching: t.matching().into(),
                data: t.cert_data().to_vec(),
            }),
            _ => None,
        })
        .await
    }

    async fn cname(&self, name: &str) -> Result<Option<String>, DnsError> {
        use hickory_resolver::proto::rr::{RData, RecordType};
        let found = self
            .records(name, RecordType::CNAME, |d| match d {
                RData::CNAME(c) => Some(c.0.to_ascii().trim_end_matches('.').to_string()),
                _ => None,
            })
            .await;
        match found {
            Ok(a) => Ok(a.records.into_iter().next()),
            Err(e) if e.class == ErrorClass::DnsNodata => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Resolver {
    /// Records of one type as `(ttl, data)`; an answer without any is `dns_nodata`.
    async fn records<T>(
        &self,
        name: &str,
        rtype: hickory_resolver::proto::rr::RecordType,
        pick: impl Fn(&hickory_resolver::proto::rr::RData) -> Option<T>,
    ) -> Result<Answer<T>, DnsError> {
        let lookup = self.lookup(name, rtype).await?;
        let mut ttl = u32::MAX;
        let mut records = Vec::new();
        for r in lookup.records() {
            if let Some(v) = pick(r.data()) {
                ttl = ttl.min(r.ttl());
                records.push(v);
            }
        }
        if records.is_empty() {
            return Err(DnsError {
                class: ErrorClass::DnsNodata,
                name: name.to_string(),
                detail: format!("no {rtype} records in the answer"),
            });
        }
        Ok(Answer { records, ttl })
    }
}

/// Joins the A and AAAA answers: any addresses win; both empty is an empty answer; otherwise the
/// most telling error (NXDOMAIN before the others).
fn merge_families(
    name: &str,
    v4: Result<Option<Answer<IpAddr>>, DnsError>,
    v6: Result<Option<Answer<IpAddr>>, DnsError>,
) -> Result<Answer<IpAddr>, DnsError> {
    let mut records = Vec::new();
    let mut ttl = u32::MAX;
    let mut errors = Vec::new();
    for part in [v4, v6] {
        match part {
            Ok(Some(a)) => {
                ttl = ttl.min(a.ttl);
                records.extend(a.records);
            }
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    if !records.is_empty() {
        return Ok(Answer { records, ttl });
    }
    if errors.is_empty() {
        return Ok(Answer { records, ttl: 0 });
    }
    errors.sort_by_key(|e| e.class != ErrorClass::DnsNxdomain);
    let mut first = errors.swap_remove(0);
    first.name = name.to_string();
    Err(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(class: ErrorClass) -> DnsError {
        DnsError {
            class,
            name: "x".into(),
            detail: String::new(),
        }
    }

    #[test]
    fn rcodes_map_to_classes() {
        use hickory_resolver::proto::op::ResponseCode;
        assert_eq!(
            classify_rcode(ResponseCode::NXDomain),
            ErrorClass::DnsNxdomain
        );
        assert_eq!(classify_rcode(ResponseCode::NoError), ErrorClass::DnsNodata);
        assert_eq!(
            classify_rcode(ResponseCode::ServFail),
            ErrorClass::DnsServfail
        );
        assert_eq!(
            classify_rcode(ResponseCode::Refused),
            ErrorClass::DnsRefused
        );
        assert_eq!(classify_rcode(ResponseCode::FormErr), ErrorClass::DnsError);
    }

    #[test]
    fn families_merge() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = Answer {
            records: vec![ip],
            ttl: 60,
        };
        let got = merge_families("h", Ok(Some(a)), Err(err(ErrorClass::DnsServfail))).unwrap();
        assert_eq!(got.records, vec![ip]);
        assert_eq!(got.ttl, 60);
        let empty = merge_families("h", Ok(None), Ok(None)).unwrap();
        assert!(empty.records.is_empty());
        let e = merge_families(
            "h",
            Err(err(ErrorClass::DnsServfail)),
            Err(err(ErrorClass::DnsNxdomain)),
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::DnsNxdomain);
        assert_eq!(e.name, "h");
    }

    #[test]
    fn names_are_made_absolute() {
        assert_eq!(fqdn("example.test"), "example.test.");
        let odd = raw_name("macro%percent  space%20url-space.example.com").expect("legal in DNS");
        assert_eq!(odd.num_labels(), 3);
        assert!(odd.is_fqdn());
        assert!(raw_name("a..example.com").is_err());
        assert!(raw_name(&format!("{}.example.com", "a".repeat(64))).is_err());
        assert_eq!(fqdn("example.test."), "example.test.");
    }
}
