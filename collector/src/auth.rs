//! Who may call what, decided in one tower layer in front of every gRPC service: the identity in
//! the client certificate (see [`mxscope_pki`]) against the method path. The identity is then put
//! into the request extensions for the services. Every call's certificate is checked against the
//! live revocation list (`--revoked`: serials, fingerprints, agent ids), and open streams end when
//! theirs is revoked. In plain-text `--insecure` mode (loopback only) there are no certificates and
//! so no identities: every call is allowed (agent ids are still checked at an agent's hello).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::future::{Either, Ready};
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tracing::{info, warn};

use crate::error::ServiceError;
use crate::limits::Counters;
use mxscope_pki::{peer_of, BadLine, Entry, Identity, Peer, Revocations};

const INGEST: &str = "/mxscope.v1.Ingest/";
/// The one call that needs no client certificate: its token is its credential.
pub const ENROLL: &str = "/mxscope.v1.Enrollment/Enroll";
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
    if path == ENROLL {
        return Ok(());
    }
    let Some(who) = who else {
        return Err(Status::from(ServiceError::Unauthenticated(
            "no mxscope client certificate: agents get one by enrolling (mxscope-agent --enroll \
             TOKEN --state-dir DIR) or from 'mxscopectl enroll', mxscopectl one from \
             'mxscopectl admin-cert' (pass --tls-cert and --tls-key)"
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

/// The mxscope identity, serial and fingerprint of the connection's client certificate, if any.
pub fn peer_certificate(ext: &http::Extensions) -> Option<Peer> {
    let certs = ext.get::<TlsConnectInfo<TcpConnectInfo>>()?.peer_certs()?;
    peer_of(certs.first()?.as_ref())
}

/// The refusal of a caller the revocation list names: `by` is the entry, `peer` the caller's
/// certificate (none in `--insecure` mode), `ended` says an open stream is being closed rather
/// than a call refused.
pub fn revoked_status(by: &Entry, peer: Option<&Peer>, ended: bool) -> Status {
    let is = if ended { "was" } else { "is" };
    let message = match (by, peer) {
        (Entry::Agent(id), _) => format!("agent '{id}' {is} revoked; enrol it again with a new id"),
        (_, Some(p)) => {
            let fix = match p.identity {
                Identity::Agent { .. } => {
                    "enrol the agent again (mxscopectl token create, then mxscope-agent --enroll), \
                     or issue one with mxscopectl enroll"
                }
                Identity::Admin { .. } | Identity::Reader { .. } => {
                    "issue a new one with mxscopectl admin-cert"
                }
            };
            format!(
                "this certificate (serial {}) {is} revoked; {fix}",
                p.cert.serial
            )
        }
        (_, None) => format!("this certificate {is} revoked"),
    };
    Status::from(ServiceError::PermissionDenied(message))
}

/// The agent id of an identity, if it is an agent's.
fn agent_id(who: &Identity) -> Option<&str> {
    match who {
        Identity::Agent { id, .. } => Some(id),
        Identity::Admin { .. } | Identity::Reader { .. } => None,
    }
}

/// Whether calls are checked against client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain text on loopback: nobody has an identity, everything is allowed.
    Open,
    /// mTLS: every call needs a certificate with a role for its method.
    Certificates,
}

/// The tower layer that refuses revoked certificates and enforces [`authorize`].
#[derive(Debug, Clone)]
pub struct AuthLayer {
    mode: Mode,
    counters: Arc<Counters>,
    revoked: watch::Receiver<Revoked>,
}

impl AuthLayer {
    pub fn new(
        mode: Mode,
        counters: Arc<Counters>,
        revoked: watch::Receiver<Revoked>,
    ) -> AuthLayer {
        AuthLayer {
            mode,
            counters,
            revoked,
        }
    }

    /// Whether the call may go on: a certificate that is ours, not revoked, with a role for `path`.
    fn check(&self, path: &str, peer: Option<&Peer>) -> Result<(), Status> {
        let counters = &self.counters;
        if let Some(peer) = peer {
            let by = self
                .revoked
                .borrow()
                .revoking(agent_id(&peer.identity), Some(&peer.cert));
            if let Some(by) = by {
                let n = Counters::bump(&counters.revoked_refused);
                warn!(method = %path, peer = %peer.identity, cert.serial = %peer.cert.serial,
                    revoked.by = %by, revoked_refused_total = n, "revoked certificate refused");
                return Err(revoked_status(&by, Some(peer), false));
            }
        }
        let who = peer.map(|p| &p.identity);
        authorize(path, who).inspect_err(|status| {
            match status.code() {
                tonic::Code::Unauthenticated => Counters::bump(&counters.unauthenticated),
                _ => Counters::bump(&counters.permission_denied),
            };
            warn!(method = %path, peer = who.map(ToString::to_string).unwrap_or_default(),
                code = ?status.code(), "call refused");
        })
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
            let peer = peer_certificate(req.extensions());
            if let Err(status) = self.layer.check(req.uri().path(), peer.as_ref()) {
                return Either::Left(futures::future::ready(Ok(status.into_http())));
            }
            if let Some(peer) = peer {
                req.extensions_mut().insert(peer.identity.clone());
                req.extensions_mut().insert(peer);
            }
        }
        Either::Right(self.inner.call(req))
    }
}

/// Ends a server stream with `PermissionDenied` as soon as the revocation list names the
/// caller's certificate (within [`REVOKED_POLL`] of the file changing); `counters.revoked_closed`
/// counts it. What `stream` yields until then passes through.
pub fn end_when_revoked<T: Send + 'static>(
    stream: BoxStream<'static, Result<T, Status>>,
    peer: Peer,
    revoked: watch::Receiver<Revoked>,
    counters: Arc<Counters>,
) -> BoxStream<'static, Result<T, Status>> {
    // The state is `None` once the revocation has been sent: the stream is over.
    let state = Some((stream, Some(revoked)));
    futures::stream::unfold(state, move |state| {
        let (peer, counters) = (peer.clone(), counters.clone());
        async move {
            let (mut stream, mut revoked) = state?;
            loop {
                tokio::select! {
                    item = stream.next() => return item.map(|i| (i, Some((stream, revoked)))),
                    still_open = async {
                        match revoked.as_mut() {
                            Some(rx) => rx.changed().await.is_ok(),
                            None => std::future::pending().await,
                        }
                    } => {
                        let Some(rx) = revoked.as_mut().filter(|_| still_open) else {
                            // No revocation list (or the collector is stopping): nothing to watch.
                            revoked = None;
                            continue;
                        };
                        let by = rx
                            .borrow_and_update()
                            .revoking(agent_id(&peer.identity), Some(&peer.cert));
                        if let Some(by) = by {
                            let n = Counters::bump(&counters.revoked_closed);
                            warn!(peer = %peer.identity, cert.serial = %peer.cert.serial, revoked.by = %by,
                                revoked_closed_total = n, "certificate revoked, closing its stream");
                            return Some((Err(revoked_status(&by, Some(&peer), true)), None));
                        }
                    }
                }
            }
        }
    })
    .boxed()
}

/// The revocation list, shared with every session and stream.
pub type Revoked = Arc<Revocations>;

/// The two sources of revocations, the `--revoked` file and the database (`mxscopectl revoke`
/// through the Query API), and the union of both that every call and stream is checked against,
/// published whenever either changes.
#[derive(Debug)]
pub struct RevocationState {
    file: std::sync::Mutex<Revoked>,
    online: std::sync::Mutex<Revocations>,
    tx: watch::Sender<Revoked>,
}

impl RevocationState {
    /// The state with these first lists, and the receiver sessions and streams watch.
    pub fn new(
        file: Revocations,
        online: Revocations,
    ) -> (Arc<RevocationState>, watch::Receiver<Revoked>) {
        let (tx, rx) = watch::channel(Arc::new(file.union(&online)));
        let state = RevocationState {
            file: std::sync::Mutex::new(Arc::new(file)),
            online: std::sync::Mutex::new(online),
            tx,
        };
        (Arc::new(state), rx)
    }

    /// What is revoked now.
    pub fn current(&self) -> Revoked {
        self.tx.borrow().clone()
    }

    fn publish(&self) {
        let file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let online = self
            .online
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.tx.send_replace(Arc::new(file.union(&online)));
    }

    /// The file was (re)read.
    pub fn set_file(&self, list: Revocations) {
        *self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(list);
        self.publish();
    }

    /// An entry was stored in the database.
    pub fn add_online(&self, entry: Entry) {
        self.online
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(entry);
        self.publish();
    }

    /// The database's revocations were reloaded (another collector on it added some); returns
    /// how many entries are new here. Merged, not replaced: revocations made online are never
    /// taken back, and an entry this collector added while the reload read is kept.
    pub fn merge_online(&self, list: Revocations) -> usize {
        let added = {
            let mut online = self
                .online
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let before = online.len();
            *online = online.union(&list);
            online.len() - before
        };
        if added > 0 {
            self.publish();
        }
        added
    }
}

/// How often the revocation file's modification time is checked.
pub const REVOKED_POLL: Duration = Duration::from_secs(1);

/// Why the revocation file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevokedError {
    #[error("cannot read the revocation list {path}: {source} (check --revoked)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("revocation list {path}, {bad} (each line is an agent id, serial:HEX or sha256:HEX; fix or remove it)")]
    Line { path: PathBuf, bad: BadLine },
}

fn stamp(path: &Path) -> Result<(Option<SystemTime>, u64), std::io::Error> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.modified().ok(), meta.len()))
}

/// Reads the revocation file once, at startup: a missing file or a line that is not an entry is
/// an error (later, on reload, such a line is logged and skipped).
pub fn load_revoked(path: &Path) -> Result<Revocations, RevokedError> {
    let text = std::fs::read_to_string(path).map_err(|source| RevokedError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let (list, bad) = Revocations::parse(&text);
    match bad.into_iter().next() {
        Some(bad) => Err(RevokedError::Line {
            path: path.to_path_buf(),
            bad,
        }),
        None => Ok(list),
    }
}

/// Re-reads `path` whenever its modification time or size changes (polled every
/// [`REVOKED_POLL`]) and publishes the new set, until `stop`. A file that disappears or cannot be
/// read keeps the last list and is logged once.
pub async fn watch_revoked(path: PathBuf, state: Arc<RevocationState>, stop: CancellationToken) {
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
                let (list, bad) = Revocations::parse(&text);
                for b in &bad {
                    warn!(path = %path.display(), line = b.line, error = %b.error,
                        "revocation list line skipped (an agent id, serial:HEX or sha256:HEX)");
                }
                info!(path = %path.display(), revoked = list.len(), skipped = bad.len(), "revocation list reloaded");
                state.set_file(list);
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
        // Enrolment is the one call without a certificate: the token is checked by the service.
        assert_eq!(code(ENROLL, None), None);
        assert_eq!(
            code("/mxscope.v1.Enrollment/Other", None),
            Some(Code::Unauthenticated)
        );
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
            // Writes, and the enrolment tokens and revocations: admin work.
            let admin_only = matches!(
                *m,
                "PutTarget"
                    | "RemoveTarget"
                    | "CreateToken"
                    | "ListTokens"
                    | "RevokeToken"
                    | "Revoke"
            );
            assert_eq!(READ_METHODS.contains(m), !admin_only, "{m}");
        }
    }

    /// A real certificate for `who` from a throwaway CA, as the layer sees it.
    fn peer(ca: &mxscope_pki::Ca, who: Identity) -> Peer {
        let issued = ca.issue(&who, mxscope_pki::Validity::default()).unwrap();
        let (_, cert) = mxscope_pki::read_cert_pem(&issued.cert_pem, "test").unwrap();
        Peer {
            identity: who,
            cert,
            not_after_us: issued.not_after.unix_timestamp() * 1_000_000,
        }
    }

    fn layer(list: &str) -> (AuthLayer, watch::Sender<Revoked>) {
        let (list, bad) = Revocations::parse(list);
        assert!(bad.is_empty(), "{bad:?}");
        let (tx, rx) = watch::channel(Arc::new(list));
        let layer = AuthLayer::new(Mode::Certificates, Arc::new(Counters::default()), rx);
        (layer, tx)
    }

    #[test]
    fn revoked_certificates_are_refused_whatever_their_role() {
        let ca = mxscope_pki::Ca::create("test ca").unwrap();
        let ops = peer(&ca, Identity::Admin { name: "ops".into() });
        let ops2 = peer(&ca, Identity::Admin { name: "ops".into() });
        let dash = peer(
            &ca,
            Identity::Reader {
                name: "dash".into(),
            },
        );
        let a1 = peer(&ca, agent());
        let status = "/mxscope.v1.Query/Status";
        let session = "/mxscope.v1.Ingest/Session";
        let (layer, tx) = layer("");
        for (path, p) in [
            (status, &ops),
            (status, &ops2),
            (status, &dash),
            (session, &a1),
        ] {
            assert!(layer.check(path, Some(p)).is_ok(), "{}", p.identity);
        }

        // The list changes live: the layer reads the current one on every call.
        tx.send_replace(Arc::new(
            Revocations::parse(&format!(
                "serial:{}\nsha256:{}\n",
                ops.cert.serial.to_string().to_uppercase(),
                dash.cert.fingerprint
            ))
            .0,
        ));
        let err = layer.check(status, Some(&ops)).expect_err("revoked admin");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(
            err.message(),
            format!(
                "this certificate (serial {}) is revoked; issue a new one with mxscopectl admin-cert",
                ops.cert.serial
            )
        );
        // Another certificate of the same admin name is another certificate.
        assert!(layer.check(status, Some(&ops2)).is_ok());
        let err = layer
            .check(status, Some(&dash))
            .expect_err("revoked reader");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("is revoked"), "{err:?}");
        assert!(layer.check(session, Some(&a1)).is_ok());
        assert_eq!(
            layer
                .counters
                .revoked_refused
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        assert_eq!(
            layer
                .counters
                .permission_denied
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );

        // An agent by fingerprint, another by id.
        tx.send_replace(Arc::new(
            Revocations::parse(&format!("sha256:{}\n", a1.cert.fingerprint)).0,
        ));
        let err = layer.check(session, Some(&a1)).expect_err("revoked agent");
        assert!(
            err.message()
                .ends_with("or issue one with mxscopectl enroll"),
            "{err:?}"
        );
        tx.send_replace(Arc::new(Revocations::parse("a1\n").0));
        let err = layer
            .check(session, Some(&a1))
            .expect_err("revoked agent id");
        assert_eq!(
            err.message(),
            "agent 'a1' is revoked; enrol it again with a new id"
        );
        assert!(
            layer.check(status, Some(&ops)).is_ok(),
            "the list no longer names it"
        );
        // Without a certificate it is still Unauthenticated, revoked or not.
        let err = layer.check(status, None).unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    /// A server stream that yields one item and then waits forever, like a quiet `watch`.
    fn quiet_stream() -> BoxStream<'static, Result<u32, Status>> {
        futures::stream::once(async { Ok(7) })
            .chain(futures::stream::pending())
            .boxed()
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_stream_ends_when_its_certificate_is_revoked() {
        let ca = mxscope_pki::Ca::create("test ca").unwrap();
        let dash = peer(
            &ca,
            Identity::Reader {
                name: "dash".into(),
            },
        );
        let other = peer(
            &ca,
            Identity::Reader {
                name: "other".into(),
            },
        );
        let counters = Arc::new(Counters::default());
        let (tx, rx) = watch::channel(Arc::new(Revocations::default()));
        let mut watched =
            end_when_revoked(quiet_stream(), dash.clone(), rx.clone(), counters.clone());
        let mut bystander = end_when_revoked(quiet_stream(), other, rx, counters.clone());
        assert_eq!(watched.next().await.map(|r| r.ok()), Some(Some(7)));
        assert_eq!(bystander.next().await.map(|r| r.ok()), Some(Some(7)));

        // A list that does not name it changes nothing.
        tx.send_replace(Arc::new(Revocations::parse("serial:1\nsome-agent\n").0));
        let wait = Duration::from_secs(60);
        assert!(
            tokio::time::timeout(wait, watched.next()).await.is_err(),
            "still open"
        );

        tx.send_replace(Arc::new(
            Revocations::parse(&format!("serial:{}\n", dash.cert.serial)).0,
        ));
        let end = tokio::time::timeout(wait, watched.next())
            .await
            .expect("ended at once")
            .expect("with an error")
            .expect_err("PermissionDenied");
        assert_eq!(end.code(), Code::PermissionDenied);
        assert!(end.message().contains("was revoked"), "{end:?}");
        assert!(
            watched.next().await.is_none(),
            "nothing after the revocation"
        );
        assert!(
            tokio::time::timeout(wait, bystander.next()).await.is_err(),
            "others stay open"
        );
        assert_eq!(
            counters
                .revoked_closed
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );

        // No revocation list at all (the sender is gone): the stream goes on as it was.
        let (tx, rx) = watch::channel(Arc::new(Revocations::default()));
        drop(tx);
        let mut free = end_when_revoked(quiet_stream(), dash, rx, counters);
        assert_eq!(free.next().await.map(|r| r.ok()), Some(Some(7)));
        assert!(tokio::time::timeout(wait, free.next()).await.is_err());
    }

    #[test]
    fn a_bad_line_stops_the_collector_at_startup_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked");
        std::fs::write(&path, "# revoked\nag-1\nserial:4F:1A\n").unwrap();
        let list = load_revoked(&path).unwrap();
        assert_eq!(list.len(), 2);
        std::fs::write(&path, "ag-1\n\nserial:xyz # typo\n").unwrap();
        let err = load_revoked(&path).unwrap_err().to_string();
        assert!(err.contains("line 3: invalid serial 'xyz'"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        let missing = load_revoked(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(missing, RevokedError::Read { .. }), "{missing}");
    }

    #[tokio::test]
    async fn revocation_file_is_reloaded_on_change_skipping_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked");
        std::fs::write(&path, "ag-1\n").unwrap();
        let online: Revocations = Revocations::parse("serial:0b\n").0;
        let (state, mut rx) = RevocationState::new(load_revoked(&path).unwrap(), online);
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch_revoked(path.clone(), state.clone(), stop.clone()));
        std::fs::write(&path, "ag-1\nag-22\nserial:nope\nserial:0a\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !rx.borrow_and_update().revokes_agent("ag-22") {
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("reloaded within 5 s");
        let list = rx.borrow().clone();
        assert_eq!(
            list.len(),
            4,
            "the bad line is skipped, the others kept, the database's beside them: {list:?}"
        );
        assert!(list.revokes_agent("ag-1"));
        state.add_online(Entry::Agent("ag-9".into()));
        assert!(rx.borrow().revokes_agent("ag-9") && rx.borrow().revokes_agent("ag-22"));
        let reloaded = Revocations::parse("ag-9\nag-31\n").0;
        assert_eq!(state.merge_online(reloaded.clone()), 1, "only ag-31 is new");
        assert!(rx.borrow().revokes_agent("ag-31") && rx.borrow().revokes_agent("ag-22"));
        assert_eq!(
            state.merge_online(reloaded),
            0,
            "a second reload adds nothing"
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn no_tls_info_means_no_identity() {
        assert_eq!(peer_certificate(&http::Extensions::new()), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn identity_parsing_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024),
                                        path in ".{0,80}") {
            let who = mxscope_pki::identity_of(&bytes);
            let _ = authorize(&path, who.as_ref());
            let _ = peer_of(&bytes);
        }
    }
}
