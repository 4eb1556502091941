//! The OpenSPF conformance suites (`rfc7208-tests.yml`, `rfc4408-tests.yml`, shipped in the
//! pyspf source distribution) run over `check_host`, their zone data served by a fake [`SpfDns`].
//! `deploy/spf-suite` downloads and checks the files; without them this test fails, never skips.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use mxscope_proto::ErrorClass;
use mxscope_spf::{check_host, DnsError, Identity, SpfDns, SpfResult};
use serde::Deserialize;
use serde_norway::Value;

/// Where `deploy/spf-suite` unpacks the suite unless `MXSCOPE_SPF_SUITE` names another folder.
fn suite_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MXSCOPE_SPF_SUITE") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache.join("mxscope/pyspf-2.0.14/test")
}

fn read_suite(file: &str) -> String {
    let path = suite_dir().join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the OpenSPF suite at {} ({e}): run deploy/spf-suite, which downloads \
             pyspf==2.0.14 from PyPI, checks its SHA-256 and unpacks it there, or set \
             MXSCOPE_SPF_SUITE to a folder holding {file}",
            path.display()
        )
    })
}

#[derive(Debug, Deserialize)]
struct Scenario {
    description: String,
    tests: HashMap<String, Case>,
    #[serde(default)]
    zonedata: HashMap<String, Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct Case {
    #[serde(default)]
    helo: String,
    host: String,
    #[serde(default)]
    mailfrom: String,
    result: OneOrMany,
    explanation: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn accepts(&self, got: &str) -> bool {
        match self {
            OneOrMany::One(r) => r == got,
            OneOrMany::Many(rs) => rs.iter().any(|r| r == got),
        }
    }
}

/// One resource record of the zone data, or a timeout.
#[derive(Debug, Clone)]
enum Rr {
    Timeout,
    Typed { qtype: String, data: RrData },
}

#[derive(Debug, Clone)]
enum RrData {
    Timeout,
    Text(String),
    Mx(String),
}

/// The zone data of one scenario, answered the way pyspf's test driver answers it: a bare
/// `TIMEOUT` times out every query type with no record before it; `TYPE: TIMEOUT` times out that
/// type; SPF records stand in for TXT where a name has no TXT entries (`TXT: NONE` means none);
/// a CNAME is followed; names starting with `error.` that are not in the zone time out.
#[derive(Debug, Default)]
struct Zone {
    names: HashMap<String, Vec<Rr>>,
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Sequence(parts) => parts.iter().map(text_of).collect(),
        Value::Number(n) => n.to_string(),
        other => panic!("unexpected zone value {other:?}"),
    }
}

impl Zone {
    fn new(data: &HashMap<String, Vec<Value>>) -> Zone {
        let mut names = HashMap::new();
        for (name, entries) in data {
            let mut rrs = Vec::new();
            let mut spf_txt = Vec::new();
            let mut has_txt = false;
            for e in entries {
                match e {
                    Value::String(s) if s == "TIMEOUT" => rrs.push(Rr::Timeout),
                    Value::Mapping(m) => {
                        for (k, v) in m {
                            let qtype = k.as_str().expect("record type").to_string();
                            let data = match (qtype.as_str(), v) {
                                (_, Value::String(s)) if s == "TIMEOUT" => RrData::Timeout,
                                ("MX", Value::Sequence(pair)) => RrData::Mx(text_of(&pair[1])),
                                _ => RrData::Text(text_of(v)),
                            };
                            if qtype == "TXT" {
                                has_txt = true;
                                if matches!(&data, RrData::Text(t) if t == "NONE") {
                                    continue;
                                }
                            }
                            if qtype == "SPF" {
                                spf_txt.push(Rr::Typed {
                                    qtype: "TXT".into(),
                                    data: data.clone(),
                                });
                            }
                            rrs.push(Rr::Typed { qtype, data });
                        }
                    }
                    other => panic!("unexpected zone entry {other:?} at {name}"),
                }
            }
            if !has_txt {
                rrs.extend(spf_txt);
            }
            names.insert(name.to_ascii_lowercase(), rrs);
        }
        Zone { names }
    }

    fn timeout(name: &str) -> DnsError {
        DnsError {
            class: ErrorClass::DnsTimeout,
            name: name.to_string(),
            detail: "timed out".into(),
        }
    }

    /// The records of `qtype` at `name` (CNAMEs followed), or a timeout.
    fn lookup(&self, name: &str, qtype: &str, depth: usize) -> Result<Vec<RrData>, DnsError> {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        let Some(rrs) = self.names.get(&key) else {
            if key.starts_with("error.") {
                return Err(Zone::timeout(name));
            }
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for rr in rrs {
            match rr {
                Rr::Timeout if out.is_empty() => return Err(Zone::timeout(name)),
                Rr::Timeout => return Ok(out),
                Rr::Typed { qtype: t, data } if t == qtype => match data {
                    RrData::Timeout => return Err(Zone::timeout(name)),
                    d => out.push(d.clone()),
                },
                Rr::Typed { qtype: t, data } if t == "CNAME" && qtype != "CNAME" => {
                    if depth >= 8 {
                        return Err(DnsError {
                            class: ErrorClass::DnsServfail,
                            name: name.to_string(),
                            detail: "cname loop".into(),
                        });
                    }
                    if let RrData::Text(target) = data {
                        out.extend(self.lookup(target, qtype, depth + 1)?);
                    }
                }
                Rr::Typed { .. } => {}
            }
        }
        Ok(out)
    }

    fn texts(&self, name: &str, qtype: &str) -> Result<Vec<String>, DnsError> {
        Ok(self
            .lookup(name, qtype, 0)?
            .into_iter()
            .filter_map(|d| match d {
                RrData::Text(t) | RrData::Mx(t) => Some(t),
                RrData::Timeout => None,
            })
            .collect())
    }
}

fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut labels: Vec<String> = v6
                .octets()
                .iter()
                .flat_map(|b| [b >> 4, b & 0x0f])
                .map(|n| format!("{n:x}"))
                .collect();
            labels.reverse();
            format!("{}.ip6.arpa", labels.join("."))
        }
    }
}

#[async_trait::async_trait]
impl SpfDns for Zone {
    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        self.texts(name, "TXT")
    }

    async fn mx_hosts(&self, name: &str) -> Result<Vec<String>, DnsError> {
        self.texts(name, "MX")
    }

    async fn a(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsError> {
        Ok(self
            .texts(name, "A")?
            .iter()
            .map(|t| t.parse().expect("zone A record"))
            .collect())
    }

    async fn aaaa(&self, name: &str) -> Result<Vec<Ipv6Addr>, DnsError> {
        Ok(self
            .texts(name, "AAAA")?
            .iter()
            .map(|t| t.parse().expect("zone AAAA record"))
            .collect())
    }

    async fn ptr(&self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        self.texts(&reverse_name(ip), "PTR")
    }
}

/// Runs every case of a suite file; returns (passed, failures).
async fn run_suite(file: &str) -> (usize, Vec<String>) {
    let text = read_suite(file);
    let mut passed = 0;
    let mut failures = Vec::new();
    let mut cases = 0;
    for doc in serde_norway::Deserializer::from_str(&text) {
        let scenario = Scenario::deserialize(doc).expect("suite scenario parses");
        let zone = Zone::new(&scenario.zonedata);
        let mut names: Vec<&String> = scenario.tests.keys().collect();
        names.sort();
        for name in names {
            let case = &scenario.tests[name];
            cases += 1;
            let ip: IpAddr = case.host.parse().expect("test host address");
            let verdict = check_host(
                &Identity {
                    ip,
                    mail_from: &case.mailfrom,
                    helo: &case.helo,
                },
                &zone,
            )
            .await;
            let got = verdict.result.name();
            let explanation = if verdict.result == SpfResult::Fail {
                Some(
                    verdict
                        .explanation
                        .clone()
                        .unwrap_or_else(|| "DEFAULT".into()),
                )
            } else {
                None
            };
            let result_ok = case.result.accepts(got);
            let exp_ok = case.explanation.is_none() || case.explanation == explanation;
            if result_ok && exp_ok {
                passed += 1;
            } else {
                failures.push(format!(
                    "{file} [{}] {name}: expected {:?} exp {:?}, got {got} exp {explanation:?} ({:?})",
                    scenario.description, case.result, case.explanation, verdict.error
                ));
            }
        }
    }
    assert!(cases > 0, "{file} holds no test cases");
    (passed, failures)
}

#[tokio::test]
async fn rfc7208_suite_passes_entirely() {
    let (passed, failures) = run_suite("rfc7208-tests.yml").await;
    eprintln!("rfc7208: {passed} passed, {} failed", failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(passed, 203, "every case of the RFC 7208 suite runs");
}

/// The RFC 4408 file runs whole: where RFC 7208 changed an outcome (e.g. more than 10 MX names
/// is `permerror` now), the 2009.10 release of that file already accepts both results.
#[tokio::test]
async fn rfc4408_suite_passes_entirely() {
    let (passed, failures) = run_suite("rfc4408-tests.yml").await;
    eprintln!("rfc4408: {passed} passed, {} failed", failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(passed, 191, "every case of the RFC 4408 suite runs");
}
