//! The connection to the collector's Query API: connects with a deadline, runs each call under the
//! `--timeout`, and turns transport and gRPC failures into [`Failure`]s that carry an exit code.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use mxscope_proto::pb::query_client::QueryClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

/// Why a command failed, with the exit code it maps to. Anything else is exit 1.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No connection to the collector (refused, unresolvable, timed out while connecting): exit 2.
    Unreachable { url: String, reason: String },
    /// The collector answered with an error; its message is shown as is: exit 1.
    Server { code: Code, message: String },
    /// The collector did not answer within `--timeout`: exit 1.
    Timeout { url: String, after: Duration },
    /// Arguments that parse but do not fit together: exit 2.
    Usage(String),
}

impl Failure {
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Failure::Unreachable { .. } | Failure::Usage(_) => 2,
            Failure::Server { .. } | Failure::Timeout { .. } => 1,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Unreachable { url, reason } if url.starts_with("http://") => write!(
                f,
                "cannot reach the collector at {url}: {reason} \
                 (is mxscope-collector running? set --collector or MXSCOPE_COLLECTOR; \
                 a collector with TLS needs https:// and --tls-cert, --tls-key, --ca-file)"
            ),
            Failure::Unreachable { url, reason } => write!(
                f,
                "cannot reach the collector at {url}: {reason} \
                 (is mxscope-collector running? set --collector or MXSCOPE_COLLECTOR)"
            ),
            Failure::Server { code, message } if message.is_empty() => {
                write!(
                    f,
                    "the collector failed the request: {}",
                    code.description()
                )
            }
            Failure::Server { message, .. } => f.write_str(message),
            Failure::Timeout { url, after } => write!(
                f,
                "the collector at {url} did not answer within {} (raise --timeout?)",
                humantime::format_duration(*after)
            ),
            Failure::Usage(msg) => f.write_str(msg),
        }
    }
}

impl StdError for Failure {}

/// The exit code for any error a command returns: a [`Failure`]'s own, otherwise 1.
pub(crate) fn exit_code(err: &anyhow::Error) -> u8 {
    err.downcast_ref::<Failure>().map_or(1, Failure::exit_code)
}

/// How to reach the collector.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub url: String,
    pub timeout: Duration,
    /// Extra CA (PEM) trusted for an `https://` collector.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for an `https://` collector.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// A connected Query client that remembers where it points and how long calls may take.
pub(crate) struct Client {
    inner: QueryClient<Channel>,
    url: String,
    timeout: Duration,
}

impl Client {
    /// Connects now, so an unreachable collector is reported before any request.
    pub(crate) async fn connect(target: &Target) -> Result<Client, Failure> {
        let unreachable = |reason: String| Failure::Unreachable {
            url: target.url.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(target.url.clone())
            .map_err(|e| Failure::Usage(format!("invalid collector URL '{}': {e}", target.url)))?
            .connect_timeout(target.timeout);
        if target.url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(path) = &target.ca_file {
                let pem = std::fs::read(path).map_err(|e| {
                    Failure::Usage(format!("cannot read --ca-file {}: {e}", path.display()))
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            let (Some(cert), Some(key)) = (&target.tls_cert, &target.tls_key) else {
                return Err(Failure::Usage(
                    "an https:// collector requires a client certificate: pass --tls-cert and \
                     --tls-key (or MXSCOPE_TLS_CERT and MXSCOPE_TLS_KEY) from 'mxscopectl admin-cert'"
                        .to_string(),
                ));
            };
            let read = |flag: &str, path: &PathBuf| {
                std::fs::read(path).map_err(|e| {
                    Failure::Usage(format!("cannot read {flag} {}: {e}", path.display()))
                })
            };
            let key = mxscope_proto::secret::read_private(key)
                .map_err(|e| Failure::Usage(format!("--tls-key: {e}")))?;
            tls = tls.identity(Identity::from_pem(read("--tls-cert", cert)?, key));
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| unreachable(chain(&e)))?;
        }
        let channel = match tokio::time::timeout(target.timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(unreachable(chain(&e))),
            Err(_) => {
                let after = humantime::format_duration(target.timeout);
                return Err(unreachable(format!("no connection within {after}")));
            }
        };
        Ok(Client {
            inner: QueryClient::new(channel),
            url: target.url.clone(),
            timeout: target.timeout,
        })
    }

    /// Runs one call on the client under the timeout and maps its failure.
    pub(crate) async fn call<'a, T, F, Fut>(&'a mut self, f: F) -> Result<T, Failure>
    where
        F: FnOnce(&'a mut QueryClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>> + 'a,
    {
        let url = self.url.clone();
        let after = self.timeout;
        match tokio::time::timeout(after, f(&mut self.inner)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(from_status(&url, &status)),
            Err(_) => Err(Failure::Timeout { url, after }),
        }
    }
}

/// A gRPC status as a failure: a lost connection is "unreachable", everything else the server's word.
fn from_status(url: &str, status: &Status) -> Failure {
    // A transport failure (not a status the server sent) carries its cause as the source: e.g.
    // an HTTP/2 protocol error when talking plain text to a TLS collector. tonic maps such errors
    // to Unknown, Internal or Cancelled depending on which bytes arrived first, so the source, not
    // the code, tells them apart; a status decoded from the server's trailers never has one.
    let transport = status.source().is_some();
    match status.code() {
        code if code == Code::Unavailable || transport => {
            let mut reason = status.message().to_string();
            if let Some(src) = status.source() {
                reason = chain(src);
            }
            if reason.is_empty() {
                reason = "connection lost".to_string();
            }
            Failure::Unreachable {
                url: url.to_string(),
                reason,
            }
        }
        code => Failure::Server {
            code,
            message: status.message().to_string(),
        },
    }
}

/// An error and its sources joined with ": ", skipping tonic's generic "transport error" and repeats.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        let text = e.to_string();
        let generic = text == "transport error" || text.is_empty();
        if !generic && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = e.source();
    }
    if parts.is_empty() {
        "transport error".to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let u = Failure::Unreachable {
            url: "http://127.0.0.1:1".into(),
            reason: "refused".into(),
        };
        assert_eq!(u.exit_code(), 2);
        assert_eq!(Failure::Usage("x".into()).exit_code(), 2);
        let s = Failure::Server {
            code: Code::NotFound,
            message: "unknown target 'x.test'".into(),
        };
        assert_eq!(s.exit_code(), 1);
        assert_eq!(s.to_string(), "unknown target 'x.test'");
        let t = Failure::Timeout {
            url: "http://h:1".into(),
            after: Duration::from_secs(3),
        };
        assert_eq!(t.exit_code(), 1);
    }

    #[test]
    fn unreachable_message_tells_what_to_do() {
        let u = Failure::Unreachable {
            url: "http://127.0.0.1:1".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(
            u.to_string(),
            "cannot reach the collector at http://127.0.0.1:1: connection refused \
             (is mxscope-collector running? set --collector or MXSCOPE_COLLECTOR; \
             a collector with TLS needs https:// and --tls-cert, --tls-key, --ca-file)"
        );
    }

    #[test]
    fn unavailable_status_is_unreachable_others_are_server_errors() {
        let f = from_status("http://h:1", &Status::unavailable("connection reset"));
        assert!(
            matches!(f, Failure::Unreachable { ref reason, .. } if reason == "connection reset"),
            "{f:?}"
        );
        let f = from_status("http://h:1", &Status::not_found("unknown target 'a.test'"));
        assert!(matches!(
            f,
            Failure::Server {
                code: Code::NotFound,
                ..
            }
        ));
        assert_eq!(f.to_string(), "unknown target 'a.test'");
        let f = from_status("http://h:1", &Status::internal(""));
        assert_eq!(
            f.to_string(),
            "the collector failed the request: Internal error"
        );
        // A local transport failure mapped to Internal (an h2 PROTOCOL_ERROR from a TLS port
        // spoken to in plain text) is unreachable, whatever its code.
        let mut local = Status::internal("h2 protocol error: frame with invalid size");
        local.set_source(std::sync::Arc::new(std::io::Error::other(
            "frame with invalid size",
        )));
        let f = from_status("http://h:1", &local);
        assert!(matches!(f, Failure::Unreachable { .. }), "{f:?}");
        assert_eq!(f.exit_code(), 2);
        assert!(f.to_string().contains("needs https://"), "{f}");
    }

    #[tokio::test]
    async fn closed_port_is_reported_unreachable() {
        // Bind then drop a listener: the port is free and nothing listens on it.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let target = Target {
            url: format!("http://127.0.0.1:{port}"),
            timeout: Duration::from_secs(5),
            ca_file: None,
            tls_cert: None,
            tls_key: None,
        };
        let err = Client::connect(&target)
            .await
            .err()
            .expect("must not connect");
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot reach the collector at http://127.0.0.1:{port}: "
            )),
            "{msg}"
        );
        assert!(msg.to_lowercase().contains("refused"), "{msg}");
    }

    #[tokio::test]
    async fn a_key_file_others_can_read_is_refused_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("admin.pem"), dir.path().join("admin.key"));
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\n").unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let target = Target {
            url: "https://127.0.0.1:1".into(),
            timeout: Duration::from_secs(5),
            ca_file: None,
            tls_cert: Some(cert),
            tls_key: Some(key),
        };
        let err = Client::connect(&target).await.err().expect("must refuse");
        let msg = err.to_string();
        assert!(
            msg.contains("admin.key") && msg.contains("chmod 600"),
            "{msg}"
        );
        assert_eq!(err.exit_code(), 2, "{msg}");
    }
}
