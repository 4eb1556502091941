//! Who may call what, decided in one tower layer in front of every gRPC service: the identity in
//! the client certificate (see [`mxscope_pki`]) against the method path. The identity is then put
//! into the request extensions for the services. In plain-text `--insecure` mode (loopback only)
//! there are no certificates and so no identities: every call is allowed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::future::{Either, Ready};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tracing::{info, warn};

use crate::error::ServiceError;
use crate::limits::Counters;
use mxscope_pki::{identity_of, Identity};

const INGEST: &str = "/mxscope.v1.Ingest/";
const QUERY: &str = "/mxscope.v1.Query/";
/// The Query methods a read-only certificate may call: an allow-list, so a method added later is
/// admin-only until it is put here.
const READ_METHODS: [&str; 9] = [
    "Status",
    "Results",
    "Agents",
    "Matrix",
    "Latency",
    "Diagnose",
    "ListTargets",
    "GetTarget",
    "Watch",
];

/// Decides whether `who` may call the gRPC method at `path`.
pub fn authorize(path: &str, who: Option<&Identity>) -> Result<(), Status> {
    let Some(who) = who else {
        return Err(Status::from(ServiceError::Unauthenticated(
            "no mxscope client certificate: agents need one from 'mxscopectl enroll', \
             mxscopectl one from 'mxscopectl admin-cert' (pass --tls-cert and --tls-key)"
                .into(),
        )));
    };
    if path.starts_with(INGEST) {
        return match who {
            Identity::Agent { .. } => Ok(()),
            other => Err(Status::from(ServiceError::PermissionDenied(format!(
                "only agent certificates may stream results; this is the certificate of {other}"
            )))),
        };
    }
    if let Some(method) = path.strip_prefix(QUERY) {
        return match who {
            Identity::Admin { .. } => Ok(()),
            Identity::Reader { .. } if READ_METHODS.contains(&method) => Ok(()),
            Identity::Reader { .. } if matches!(method, "PutTarget" | "RemoveTarget") => Err(
                Status::from(ServiceError::PermissionDenied("read-only credential cannot change targets".into())),
            ),
            Identity::Reader { .. } => Err(Status::from(ServiceError::PermissionDenied(format!(
                "a read-only credential cannot call {method} (it may call {}); use an admin certificate",
                READ_METHODS.join(", ")
            )))),
            Identity::Agent { .. } => Err(Status::from(ServiceError::PermissionDenied(
                "agent certificates cannot use the Query API; use an admin or read-only certificate".into(),
            ))),
        };
    }
    Err(Status::from(ServiceError::PermissionDenied(format!(
        "no role grants access to {path}"
    ))))
}

/// The mxscope identity of the connection's client certificate, if any.
pub fn peer_identity(ext: &http::Extensions) -> Option<Identity> {
    let certs = ext.get::<TlsConnectInfo<TcpConnectInfo>>()?.peer_certs()?;
    identity_of(certs.first()?.as_ref())
}

/// Whether calls are checked against client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain text on loopback: nobody has an identity, everything is allowed.
    Open,
    /// mTLS: every call needs a certificate with a role for its method.
    Certificates,
}

/// The tower layer that enforces [`authorize`].
#[derive(Debug, Clone)]
pub struct AuthLayer {
    mode: Mode,
    counters: Arc<Counters>,
}

impl AuthLayer {
    pub fn new(mode: Mode, counters: Arc<Counters>) -> AuthLayer {
        AuthLayer { mode, counters }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the gRPC routes.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if self.layer.mode == Mode::Certificates {
            let who = peer_identity(req.extensions());
            if let Err(status) = authorize(req.uri().path(), who.as_ref()) {
                let counters = &self.layer.counters;
                match status.code() {
                    tonic::Code::Unauthenticated => Counters::bump(&counters.unauthenticated),
                    _ => Counters::bump(&counters.permission_denied),
                };
                warn!(method = %req.uri().path(), peer = who.as_ref().map(ToString::to_string).unwrap_or_default(),
                    code = ?status.code(), "call refused");
                return Either::Left(futures::future::ready(Ok(status.into_http())));
            }
            if let Some(who) = who {
                req.extensions_mut().insert(who);
            }
        }
        Either::Right(self.inner.call(req))
    }
}

/// Revoked agent ids, shared with every session.
pub type Revoked = Arc<HashSet<String>>;

/// How often the revocation file's modification time is checked.
pub const REVOKED_POLL: Duration = Duration::from_secs(1);

/// Agent ids, one per line; `#` starts a comment; blank lines are ignored.
pub fn parse_revoked(text: &str) -> HashSet<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Why the revocation file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the revocation list {path}: {source} (check --revoked)")]
pub struct RevokedError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn stamp(path: &Path) -> Result<(Option<SystemTime>, u64), std::io::Error> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.modified().ok(), meta.len()))
}

/// Reads the revocation file once (a missing file is an error at startup).
pub fn load_revoked(path: &Path) -> Result<HashSet<String>, RevokedError> {
    std::fs::read_to_string(path)
        .map(|t| parse_revoked(&t))
        .map_err(|source| RevokedError {
            path: path.to_path_buf(),
            source,
        })
}

/// Re-reads `path` whenever its modification time or size changes (polled every
/// [`REVOKED_POLL`]) and publishes the new set, until `stop`. A file that disappears or cannot be
/// read keeps the last list and is logged once.
pub async fn watch_revoked(path: PathBuf, tx: watch::Sender<Revoked>, stop: CancellationToken) {
    // The first poll always publishes, so a change between the startup read and here is not lost.
    let mut last = None;
    let mut failing = false;
    let mut tick = tokio::time::interval(REVOKED_POLL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let p = path.clone();
        let read = tokio::task::spawn_blocking(move || {
            let before = stamp(&p)?;
            let text = std::fs::read_to_string(&p)?;
            Ok::<_, std::io::Error>((before, text))
        })
        .await;
        match read {
            Ok(Ok((now, text))) => {
                failing = false;
                if last == Some(now) {
                    continue;
                }
                last = Some(now);
                let set = parse_revoked(&text);
                info!(path = %path.display(), revoked = set.len(), "revocation list reloaded");
                tx.send_replace(Arc::new(set));
            }
            Ok(Err(err)) if !failing => {
                failing = true;
                warn!(path = %path.display(), error = %err, "cannot read the revocation list, keeping the last one");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn agent() -> Identity {
        Identity::Agent {
            id: "a1".into(),
            region: "eu".into(),
        }
    }

    #[test]
    fn roles() {
        let admin = Identity::Admin { name: "ops".into() };
        let reader = Identity::Reader {
            name: "dash".into(),
        };
        let session = "/mxscope.v1.Ingest/Session";
        let status = "/mxscope.v1.Query/Status";
        let put = "/mxscope.v1.Query/PutTarget";
        let rm = "/mxscope.v1.Query/RemoveTarget";
        let code =
            |path: &str, who: Option<&Identity>| authorize(path, who).err().map(|s| s.code());

        assert_eq!(code(session, None), Some(Code::Unauthenticated));
        assert_eq!(code(status, None), Some(Code::Unauthenticated));
        assert_eq!(code(session, Some(&agent())), None);
        assert_eq!(code(session, Some(&admin)), Some(Code::PermissionDenied));
        assert_eq!(code(session, Some(&reader)), Some(Code::PermissionDenied));
        assert_eq!(code(status, Some(&admin)), None);
        assert_eq!(code(status, Some(&reader)), None);
        assert_eq!(code(status, Some(&agent())), Some(Code::PermissionDenied));
        assert_eq!(code(put, Some(&admin)), None);
        assert_eq!(code(rm, Some(&admin)), None);
        for path in [put, rm] {
            let err = authorize(path, Some(&reader)).expect_err("reader may not write");
            assert_eq!(err.code(), Code::PermissionDenied);
            assert_eq!(err.message(), "read-only credential cannot change targets");
        }
        assert_eq!(
            code("/grpc.health.v1.Health/Check", Some(&admin)),
            Some(Code::PermissionDenied)
        );
        // The reader's rights are an allow-list: a method not on it (one added later, say) is
        // refused, while every read method is allowed.
        let future = authorize("/mxscope.v1.Query/DropDatabase", Some(&reader))
            .expect_err("unknown method refused for readers");
        assert_eq!(future.code(), Code::PermissionDenied);
        assert!(future.message().contains("may call Status"), "{future:?}");
        assert_eq!(code("/mxscope.v1.Query/DropDatabase", Some(&admin)), None);
        for m in READ_METHODS {
            assert_eq!(code(&format!("{QUERY}{m}"), Some(&reader)), None, "{m}");
        }
    }

    #[test]
    fn the_read_list_names_every_query_method_that_changes_nothing() {
        let proto = include_str!("../../proto/mxscope/v1/mxscope.proto");
        let service = &proto[proto.find("service Query").expect("Query service")..];
        let service = &service[..service.find('}').expect("end of service")];
        let methods: Vec<&str> = service
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .collect();
        assert!(methods.len() >= 11, "{methods:?}");
        for m in &methods {
            let writes = matches!(*m, "PutTarget" | "RemoveTarget");
            assert_eq!(READ_METHODS.contains(m), !writes, "{m}");
        }
    }

    #[test]
    fn revocation_file_format() {
        let set = parse_revoked("# revoked\nag-1\n\n  ag-2  # stolen laptop\n#ag-3\n");
        assert_eq!(set.len(), 2);
        assert!(set.contains("ag-1") && set.contains("ag-2"));
    }

    #[tokio::test]
    async fn revocation_file_is_reloaded_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked");
        std::fs::write(&path, "ag-1\n").unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(load_revoked(&path).unwrap()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch_revoked(path.clone(), tx, stop.clone()));
        std::fs::write(&path, "ag-1\nag-22\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("reloaded within 5 s")
            .unwrap();
        assert!(rx.borrow().contains("ag-22"));
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn no_tls_info_means_no_identity() {
        assert_eq!(peer_identity(&http::Extensions::new()), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn identity_parsing_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024),
                                        path in ".{0,80}") {
            let who = identity_of(&bytes);
            let _ = authorize(&path, who.as_ref());
        }
    }
}
