//! Test support for probe tests: a fake resolver built with a small builder.

use std::collections::HashMap;
use std::net::IpAddr;

use mxscope_proto::ErrorClass;

use super::resolve::{Answer, DnsError, MxRecord, Resolve, TlsaRecord};

/// Answers from tables; unknown names have no MX (nodata) and no addresses.
#[derive(Debug, Default, Clone)]
pub(crate) struct FakeResolver {
    mx: HashMap<String, Vec<MxRecord>>,
    ips: HashMap<String, Vec<IpAddr>>,
    fail: HashMap<String, ErrorClass>,
    txt: HashMap<String, Vec<String>>,
    ptr: HashMap<IpAddr, Vec<String>>,
    tlsa: HashMap<String, Vec<TlsaRecord>>,
    cname: HashMap<String, String>,
}

impl FakeResolver {
    pub(crate) fn mx(mut self, name: &str, records: &[(u16, &str)]) -> Self {
        let records = records
            .iter()
            .map(|(p, h)| MxRecord {
                preference: *p,
                exchange: h.to_string(),
            })
            .collect();
        self.mx.insert(name.to_string(), records);
        self
    }

    pub(crate) fn ips(mut self, name: &str, ips: &[&str]) -> Self {
        let ips = ips
            .iter()
            .map(|s| s.parse().expect("test address"))
            .collect();
        self.ips.insert(name.to_string(), ips);
        self
    }

    pub(crate) fn txt(mut self, name: &str, records: &[&str]) -> Self {
        let records = records.iter().map(|r| r.to_string()).collect();
        self.txt.insert(name.to_string(), records);
        self
    }

    pub(crate) fn ptr(mut self, ip: &str, names: &[&str]) -> Self {
        let names = names.iter().map(|n| n.to_string()).collect();
        self.ptr.insert(ip.parse().expect("test address"), names);
        self
    }

    #[allow(dead_code)] // for the dane tests
    pub(crate) fn tlsa(mut self, name: &str, records: Vec<TlsaRecord>) -> Self {
        self.tlsa.insert(name.to_string(), records);
        self
    }

    pub(crate) fn cname(mut self, name: &str, target: &str) -> Self {
        self.cname.insert(name.to_string(), target.to_string());
        self
    }

    pub(crate) fn fail(mut self, name: &str, class: ErrorClass) -> Self {
        self.fail.insert(name.to_string(), class);
        self
    }

    fn failure(&self, name: &str) -> Option<DnsError> {
        self.fail.get(name).map(|class| DnsError {
            class: *class,
            name: name.to_string(),
            detail: "fake failure".to_string(),
        })
    }
}

#[async_trait::async_trait]
impl Resolve for FakeResolver {
    async fn mx(&self, name: &str) -> Result<Answer<MxRecord>, DnsError> {
        if let Some(e) = self.failure(name) {
            return Err(e);
        }
        match self.mx.get(name) {
            Some(records) => Ok(Answer {
                records: records.clone(),
                ttl: 300,
            }),
            None => Err(DnsError {
                class: ErrorClass::DnsNodata,
                name: name.to_string(),
                detail: "no MX".to_string(),
            }),
        }
    }

    async fn ips(&self, name: &str) -> Result<Answer<IpAddr>, DnsError> {
        if let Some(e) = self.failure(name) {
            return Err(e);
        }
        Ok(Answer {
            records: self.ips.get(name).cloned().unwrap_or_default(),
            ttl: 60,
        })
    }

    async fn txt(&self, name: &str) -> Result<Answer<String>, DnsError> {
        if let Some(e) = self.failure(name) {
            return Err(e);
        }
        found(name, self.txt.get(name))
    }

    async fn reverse(&self, ip: IpAddr) -> Result<Answer<String>, DnsError> {
        let name = super::resolve::reverse_name(ip);
        if let Some(e) = self.failure(&name) {
            return Err(e);
        }
        found(&name, self.ptr.get(&ip))
    }

    async fn tlsa(&self, name: &str) -> Result<Answer<TlsaRecord>, DnsError> {
        if let Some(e) = self.failure(name) {
            return Err(e);
        }
        found(name, self.tlsa.get(name))
    }

    async fn cname(&self, name: &str) -> Result<Option<String>, DnsError> {
        if let Some(e) = self.failure(name) {
            return Err(e);
        }
        Ok(self.cname.get(name).cloned())
    }
}

/// A table entry as an answer; a missing entry is `dns_nodata`.
fn found<T: Clone>(name: &str, records: Option<&Vec<T>>) -> Result<Answer<T>, DnsError> {
    match records {
        Some(r) if !r.is_empty() => Ok(Answer {
            records: r.clone(),
            ttl: 300,
        }),
        _ => Err(DnsError {
            class: ErrorClass::DnsNodata,
            name: name.to_string(),
            detail: "no records".to_string(),
        }),
    }
}
