//! The validated settings the agent runs with, built from its flags: collector URLs and TLS,
//! identity, credentials, spool, concurrency and the targets file they name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use mxscope_proto::names;

use super::flags::{Flags, LogFormat};
use super::targets::{load_targets, Target};
use super::ConfigError;

/// Default spool bound.
pub const DEFAULT_SPOOL_MAX: u64 = 256 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The collectors in the order given (at least one, all of one scheme); the uplink fails
    /// over between them.
    pub collectors: Vec<String>,
    pub id: String,
    pub region: String,
    pub targets: Vec<Target>,
    pub resolver: Option<SocketAddr>,
    pub ca_file: Option<PathBuf>,
    /// Client certificate, key and collector CA for an `https://` collector.
    pub collector_tls: Option<crate::trust::CollectorTls>,
    /// Probe logins (passwords print as `***`).
    pub credentials: crate::credentials::Credentials,
    pub spool_dir: PathBuf,
    /// The state directory of an enrolled agent (its certificate is renewed there).
    pub state_dir: Option<PathBuf>,
    pub spool_max: u64,
    pub concurrency: usize,
    pub per_host: usize,
    /// MX host and address caps of one target.
    pub fanout: crate::probe::Fanout,
    pub labels: BTreeMap<String, String>,
    pub helo_name: String,
    pub log_format: LogFormat,
}

impl AgentConfig {
    /// Validates the flags and loads the targets file they name.
    pub fn from_flags(flags: Flags) -> Result<AgentConfig, ConfigError> {
        let https = validate_collectors(&flags.collector)?;
        let required = |flag: &'static str| ConfigError::Flag {
            flag,
            message: "is required (or --state-dir DIR of an enrolled agent, or --enroll TOKEN \
                      --state-dir DIR for the first start)"
                .into(),
        };
        let id = flags.id.clone().ok_or_else(|| required("id"))?;
        let region = flags.region.clone().ok_or_else(|| required("region"))?;
        validate_id(&id)?;
        let collector_tls = crate::trust::collector_tls(
            https,
            flags.tls_cert.as_deref(),
            flags.tls_key.as_deref(),
            flags.collector_ca.as_deref(),
        )?;
        let credentials = match &flags.credentials {
            Some(path) => crate::credentials::Credentials::load(path)?,
            None => Default::default(),
        };
        if region.trim().is_empty() {
            return Err(ConfigError::Flag {
                flag: "region",
                message: "must not be empty".into(),
            });
        }
        let targets = match &flags.config {
            Some(path) => load_targets(path)?,
            None => Vec::new(),
        };
        for t in &targets {
            if let Some(name) = t.options.credentials.as_deref() {
                if credentials.get(name).is_none() {
                    return Err(ConfigError::Flag {
                        flag: "credentials",
                        message: format!(
                            "target '{}' refers to login '{name}', which {}",
                            t.def.name,
                            match &flags.credentials {
                                Some(p) => format!("is not a [section] of {}", p.display()),
                                None => "needs --credentials FILE".to_string(),
                            }
                        ),
                    });
                }
            }
        }
        let spool_dir = match (&flags.spool, &flags.state_dir) {
            (Some(spool), _) => spool.clone(),
            (None, Some(state)) => state.join("spool"),
            (None, None) => PathBuf::from(format!("./mxscope-spool-{id}")),
        };
        let mut labels = BTreeMap::new();
        for (k, v) in flags.labels {
            labels.insert(k, v);
        }
        Ok(AgentConfig {
            collectors: flags.collector,
            id,
            region,
            targets,
            resolver: flags.resolver,
            ca_file: flags.ca_file,
            collector_tls,
            credentials,
            spool_dir,
            state_dir: flags.state_dir,
            spool_max: flags.spool_max,
            concurrency: flags.concurrency as usize,
            per_host: flags.per_host as usize,
            fanout: crate::probe::Fanout {
                max_mx_hosts: flags.max_mx_hosts as usize,
                max_addresses: flags.max_addresses as usize,
            },
            labels,
            helo_name: flags.helo_name.unwrap_or_else(system_host_name),
            log_format: flags.log_format,
        })
    }
}

/// Every `--collector` valid ([`validate_collector`]), none given twice, all with one scheme (one
/// set of TLS settings serves them all): whether that is https.
fn validate_collectors(urls: &[String]) -> Result<bool, ConfigError> {
    let err = |message: String| ConfigError::Flag {
        flag: "collector",
        message,
    };
    let Some(first) = urls.first() else {
        return Err(err("is required".into()));
    };
    let https = validate_collector(first)?;
    for (i, url) in urls.iter().enumerate().skip(1) {
        if urls[..i].contains(url) {
            return Err(err(format!("'{url}' is given twice")));
        }
        if validate_collector(url)? != https {
            return Err(err(format!(
                "'{first}' and '{url}' mix http:// and https://: all collectors must use the same \
                 scheme (the agent has one set of TLS settings for them all)"
            )));
        }
    }
    Ok(https)
}

/// `https://host:port` (true) or `http://host:port` (false); anything else is refused with the reason.
fn validate_collector(url: &str) -> Result<bool, ConfigError> {
    let err = |m: &str| ConfigError::Flag {
        flag: "collector",
        message: format!("'{url}': {m}"),
    };
    let uri: tonic::transport::Uri = url.parse().map_err(|_| err("not a URL"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(err(
                "expected https://host:port (or http://host:port for --insecure collectors)",
            ))
        }
    };
    if uri.host().is_none_or(str::is_empty) || uri.port_u16().is_none() {
        return Err(err(
            "expected https://host:port (or http://host:port for --insecure collectors)",
        ));
    }
    if !https && !is_loopback_host(uri.host().unwrap_or_default()) {
        return Err(err(
            "plain-text http:// is allowed only to a collector on this machine (127.0.0.1, \
             [::1], localhost); anything else would send results and the agent's identity \
             unprotected: use https://host:port with --tls-cert and --tls-key",
        ));
    }
    Ok(https)
}

/// A loopback address or `localhost` (the host part of a URL; IPv6 in brackets).
fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// DNS-label style ([`names::is_label`]).
fn validate_id(id: &str) -> Result<(), ConfigError> {
    if names::is_label(id) {
        Ok(())
    } else {
        Err(ConfigError::Flag {
            flag: "id",
            message: format!(
                "'{id}' is not a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')"
            ),
        })
    }
}

/// The system host name, or `mxscope-agent.invalid` when it cannot be read.
#[allow(unsafe_code)] // gethostname(2): no std API
pub fn system_host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `buf.len()` bytes; gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(name) = std::str::from_utf8(&buf[..end]) {
            if !name.is_empty() {
                return name.to_string();
            }
        }
    }
    "mxscope-agent.invalid".to_string()
}
