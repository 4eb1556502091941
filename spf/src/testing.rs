//! Test support for the SPF tests: a fake [`SpfDns`] built from literal tables, and small helpers.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use mxscope_proto::ErrorClass;

use super::SpfDns;
use mxscope_proto::dns::DnsError;

/// A fake DNS built from literal tables; unknown names answer empty (NXDOMAIN), names marked with
/// [`FakeDns::fail`] fail with `dns_servfail`.
#[derive(Debug, Default)]
pub(super) struct FakeDns {
    txt: HashMap<String, Vec<String>>,
    mx: HashMap<String, Vec<String>>,
    addrs: HashMap<String, Vec<IpAddr>>,
    failing: HashSet<String>,
    ptr: HashMap<IpAddr, Vec<String>>,
}

impl FakeDns {
    pub(super) fn spf(mut self, name: &str, record: &str) -> Self {
        self.txt
            .entry(name.to_string())
            .or_default()
            .push(record.to_string());
        self
    }

    pub(super) fn mx(mut self, name: &str, hosts: &[&str]) -> Self {
        self.mx.insert(
            name.to_string(),
            hosts.iter().map(|h| h.to_string()).collect(),
        );
        self
    }

    pub(super) fn addr(mut self, name: &str, ips: &[&str]) -> Self {
        let ips = ips
            .iter()
            .map(|i| i.parse().expect("test address"))
            .collect();
        self.addrs.insert(name.to_string(), ips);
        self
    }

    pub(super) fn ptr(mut self, addr: &str, names: &[&str]) -> Self {
        self.ptr.insert(
            addr.parse().expect("test address"),
            names.iter().map(|n| n.to_string()).collect(),
        );
        self
    }

    pub(super) fn fail(mut self, name: &str) -> Self {
        self.failing.insert(name.to_string());
        self
    }

    fn check(&self, name: &str) -> Result<(), DnsError> {
        if self.failing.contains(name) {
            Err(DnsError {
                class: ErrorClass::DnsServfail,
                name: name.to_string(),
                detail: "servfail".to_string(),
            })
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl SpfDns for FakeDns {
    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        self.check(name)?;
        Ok(self.txt.get(name).cloned().unwrap_or_default())
    }

    async fn mx_hosts(&self, name: &str) -> Result<Vec<String>, DnsError> {
        self.check(name)?;
        Ok(self.mx.get(name).cloned().unwrap_or_default())
    }

    async fn a(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsError> {
        self.check(name)?;
        let all = self.addrs.get(name).cloned().unwrap_or_default();
        Ok(all
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect())
    }

    async fn aaaa(&self, name: &str) -> Result<Vec<Ipv6Addr>, DnsError> {
        self.check(name)?;
        let all = self.addrs.get(name).cloned().unwrap_or_default();
        Ok(all
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            })
            .collect())
    }

    async fn ptr(&self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        Ok(self.ptr.get(&ip).cloned().unwrap_or_default())
    }
}

/// A test address from its text.
pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// Owned strings from literals.
pub(super) fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}
