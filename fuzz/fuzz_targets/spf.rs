//! SPF (`mxscope-spf`'s `parse`, `select_spf`; `count_lookups` and `authorizes`, macros
//! included, over an in-memory DNS). Input: one DNS record a line, the first line's name being the
//! domain checked: `<name> <TXT string>`, `mx:<name> <exchange>`, `a:<name> <address>`,
//! `err:<name>` (every query of that name fails). Each TXT string is also parsed alone.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use mxscope_agent::probe::resolve::DnsError;
use mxscope_agent::probe::spf::{self, SpfDns};
use mxscope_fuzz::{block_on, lines, text};
use mxscope_proto::ErrorClass;

#[derive(Default)]
struct Zone {
    txt: Vec<(String, String)>,
    mx: Vec<(String, String)>,
    a: Vec<(String, IpAddr)>,
    failing: Vec<String>,
}

impl Zone {
    fn fail(&self, name: &str) -> Result<(), DnsError> {
        if self.failing.iter().any(|f| f.eq_ignore_ascii_case(name)) {
            return Err(DnsError {
                class: ErrorClass::Timeout,
                name: name.to_string(),
                detail: "timed out".to_string(),
            });
        }
        Ok(())
    }
}

fn at<'a, T: Clone>(records: &'a [(String, T)], name: &'a str) -> impl Iterator<Item = T> + 'a {
    let name = name.trim_end_matches('.');
    records
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

#[async_trait::async_trait]
impl SpfDns for Zone {
    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        self.fail(name)?;
        Ok(at(&self.txt, name).collect())
    }
    async fn mx_hosts(&self, name: &str) -> Result<Vec<String>, DnsError> {
        self.fail(name)?;
        Ok(at(&self.mx, name).collect())
    }
    async fn a(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsError> {
        self.fail(name)?;
        Ok(at(&self.a, name)
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect())
    }
    async fn aaaa(&self, name: &str) -> Result<Vec<Ipv6Addr>, DnsError> {
        self.fail(name)?;
        Ok(at(&self.a, name)
            .filter_map(|ip| match ip {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            })
            .collect())
    }
    async fn ptr(&self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        // the names whose addresses include `ip`: every PTR candidate validates
        Ok(self
            .a
            .iter()
            .filter(|(_, a)| *a == ip)
            .map(|(n, _)| n.clone())
            .collect())
    }
}

fuzz_target!(|data: &[u8]| {
    let text = text(data);
    let mut zone = Zone::default();
    let mut domain = None;
    for line in lines(&text) {
        let (name, value) = line.split_once(' ').unwrap_or((line, ""));
        domain.get_or_insert(name);
        if let Some(name) = name.strip_prefix("mx:") {
            zone.mx.push((name.to_string(), value.to_string()));
        } else if let Some(name) = name.strip_prefix("a:") {
            if let Ok(ip) = value.parse() {
                zone.a.push((name.to_string(), ip));
            }
        } else if let Some(name) = name.strip_prefix("err:") {
            zone.failing.push(name.to_string());
        } else {
            if let Ok(record) = spf::parse(value) {
                // Directives print as written: the printed record parses to the same directives.
                let printed: Vec<String> =
                    record.directives.iter().map(|d| d.to_string()).collect();
                let again = spf::parse(&format!("v=spf1 {}", printed.join(" ")));
                assert_eq!(
                    again.map(|r| r.directives),
                    Ok(record.directives),
                    "{value:?}"
                );
            }
            zone.txt.push((name.to_string(), value.to_string()));
        }
    }
    let Some(domain) = domain else { return };
    let at_domain: Vec<String> = at(&zone.txt, domain).collect();
    if let Ok(chosen) = spf::select_spf(&at_domain) {
        assert!(at_domain.contains(&chosen));
    }
    let report = block_on(spf::count_lookups(domain, &zone));
    assert!(report.chain.len() <= spf::MAX_QUERIES);
    let mut clients: Vec<IpAddr> = vec![
        "192.0.2.25".parse().unwrap(),
        "2001:db8::25".parse().unwrap(),
    ];
    clients.extend(zone.a.iter().map(|(_, ip)| *ip).take(4));
    for ip in clients {
        if let Ok(auth) = block_on(spf::authorizes(domain, ip, &zone)) {
            assert!(auth.lookups <= spf::LOOKUP_LIMIT);
        }
    }
});
