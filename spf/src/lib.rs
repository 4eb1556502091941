//! SPF (RFC 7208), shared by the agent's `spf` check and `mxscopectl spf check`: record selection
//! and parsing, the static lookup count, and `check_host()` with PTR, macros and explanations.
//! No I/O here: DNS comes in through [`SpfDns`], so every rule is tested against fakes.

mod eval;
mod lookups;
mod macros;
mod record;
#[cfg(test)]
mod testing;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;

pub use mxscope_proto::dns::DnsError;

pub use eval::{
    authorizes, check_domain, check_host, Authorization, Identity, SpfEvalError, SpfResult, Verdict,
};
pub use lookups::{count_lookups, LookupIssue, LookupReport};
pub use record::{
    parse, select_spf, Directive, DualCidr, Mechanism, Qualifier, SpfParseError, SpfRecord,
    SpfSelectError,
};

/// Terms that cause DNS queries may appear at most this many times in one evaluation (§4.6.4).
pub const LOOKUP_LIMIT: usize = 10;
/// Lookups that return no answer (NXDOMAIN or no records) allowed before `permerror` (§4.6.4).
pub const VOID_LOOKUP_LIMIT: usize = 2;
/// An `mx` mechanism may name at most this many exchanges (§4.6.4).
pub const MX_NAME_LIMIT: usize = 10;
/// A `ptr` mechanism or `%{p}` macro looks at no more than this many PTR names (§4.6.4).
pub const PTR_NAME_LIMIT: usize = 10;
/// `include`/`redirect` nesting followed by [`count_lookups`] before it stops descending.
pub const MAX_DEPTH: usize = 12;
/// Upper bound of DNS queries [`count_lookups`] issues, so a hostile tree cannot fan out forever.
pub const MAX_QUERIES: usize = 100;

/// The DNS view SPF needs. Implementations return `Ok(vec![])` for NXDOMAIN and "no records of
/// that type" (void lookups) and `Err` only when the query itself failed (timeout, SERVFAIL), with
/// the resolver's classified [`DnsError`].
#[async_trait::async_trait]
pub trait SpfDns: Send + Sync {
    /// TXT records at `name`, each with its character strings already concatenated.
    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError>;
    /// Exchange host names of the MX records at `name`.
    async fn mx_hosts(&self, name: &str) -> Result<Vec<String>, DnsError>;
    /// A addresses of `name`.
    async fn a(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsError>;
    /// AAAA addresses of `name`.
    async fn aaaa(&self, name: &str) -> Result<Vec<Ipv6Addr>, DnsError>;
    /// PTR names of `ip` (the `in-addr.arpa` or `ip6.arpa` name is the implementation's job).
    async fn ptr(&self, ip: IpAddr) -> Result<Vec<String>, DnsError>;
}

/// A and AAAA addresses of `name` together.
async fn all_addrs<D: SpfDns + ?Sized>(dns: &D, name: &str) -> Result<Vec<IpAddr>, DnsError> {
    let mut out: Vec<IpAddr> = dns.a(name).await?.into_iter().map(IpAddr::V4).collect();
    out.extend(dns.aaaa(name).await?.into_iter().map(IpAddr::V6));
    Ok(out)
}

/// The future of a recursive step (`include` and `redirect` recurse, so it is boxed).
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for; others unchanged.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
