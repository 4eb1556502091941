//! DNS behind our own small trait: hickory's error types change between releases, and a fake
//! resolver makes pure probe tests possible. Errors are classified into `ErrorClass` here, once.

use std::net::IpAddr;
use std::time::Duration;

use mxscope_proto::ErrorClass;

/// A DNS failure, already classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class} for {name}: {detail}")]
pub struct DnsError {
    pub class: ErrorClass,
    pub name: String,
    pub detail: String,
}

/// One MX record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxRecord {
    pub preference: u16,
    /// Exchange host name without the trailing dot.
    pub exchange: String,
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
}

/// Settings for the hickory-backed resolver.
#[derive(Debug, Clone, Default)]
pub struct ResolverConfig {
    /// All DNS goes to this server (`--resolver IP:PORT`); `None` = the system configuration.
    pub server: Option<std::net::SocketAddr>,
    pub timeout: Option<Duration>,
}

/// The real resolver (hickory), built once per agent.
pub struct Resolver {
    // Filled in by the probe implementation.
    _config: ResolverConfig,
}

impl Resolver {
    /// Builds the resolver; fails (with the reason) when the system configuration cannot be read.
    pub fn new(config: ResolverConfig) -> Result<Self, DnsError> {
        Ok(Resolver { _config: config })
    }
}
