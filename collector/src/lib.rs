//! mxscope collector: accepts agents' result streams over gRPC (`Ingest`), stores them in SQLite
//! through a single batching writer, and answers `mxscopectl` (`Query`).
//!
//! Like mini-redis, [`run`] takes an already bound listener and a shutdown future, so tests bind
//! port 0 and stop the collector on demand.

pub mod alert;
pub mod analysis;
pub mod auth;
pub mod confirm;
pub mod enrol;
pub mod error;
pub mod http;
pub mod ingest;
pub mod limits;
pub mod mailwatch;
pub mod notify;
pub mod query;
mod shared;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mxscope_proto::pb::enrollment_server::EnrollmentServer;
use mxscope_proto::pb::query_server::QueryServer;
use mxscope_proto::pb::raw::ingest_server::IngestServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Certificate, Identity as TlsIdentity, ServerTlsConfig};
use tracing::{info, warn};

use crate::auth::{AuthLayer, Mode, RevocationState, RevokedError};
use crate::enrol::db::IdentityDb;
use crate::enrol::{Enrolment, Signer};
use crate::limits::RateLimiter;
use crate::store::StoreError;
use shared::Shared;
pub use shared::{Config, HttpOptions, ReadToken, TlsFiles};

/// Why the collector could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("TLS not configured: pass --tls-cert, --tls-key and --client-ca (see 'mxscopectl ca init'), or --insecure to serve plain text on loopback")]
    TlsNotConfigured,
    #[error("{path}: {message}")]
    TlsFile { path: PathBuf, message: String },
    #[error("invalid TLS configuration (check --tls-cert, --tls-key and --client-ca)")]
    Tls(#[source] tonic::transport::Error),
    #[error(transparent)]
    Revoked(#[from] RevokedError),
    #[error("--ca-key needs mTLS: pass --tls-cert, --tls-key and --client-ca (the CA certificate of that key)")]
    CaKeyWithoutTls,
    #[error("--ca-key {path}: {message}")]
    CaKey { path: PathBuf, message: String },
    #[error(
        "refusing to serve plain text on non-loopback address {0}; listen on 127.0.0.1 or ::1"
    )]
    InsecureNotLoopback(SocketAddr),
    #[error("cannot read the listener address")]
    Listener(#[source] std::io::Error),
    #[error("cannot serve metrics on {0} (is another collector running? pick another --http)")]
    Http(SocketAddr, #[source] std::io::Error),
    #[error("cannot serve metrics over TLS")]
    HttpTls(#[from] http::TlsError),
    /// The message names the file and line; no source, so it is said once.
    #[error("--alert-rules {0}")]
    AlertRules(alert::rules::RulesError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("grpc server failed")]
    Serve(#[from] tonic::transport::Error),
}

/// Plain-text gRPC is allowed only when asked for (`insecure`) and only on loopback.
pub fn check_plaintext(insecure: bool, addr: SocketAddr) -> Result<(), RunError> {
    if !insecure {
        return Err(RunError::TlsNotConfigured);
    }
    if !addr.ip().is_loopback() {
        return Err(RunError::InsecureNotLoopback(addr));
    }
    Ok(())
}

/// Reads one PEM file for the TLS setup, checking it holds what it should.
fn read_pem(path: &std::path::Path, marker: &str, what: &str) -> Result<Vec<u8>, RunError> {
    let pem = std::fs::read(path).map_err(|e| RunError::TlsFile {
        path: path.to_path_buf(),
        message: format!("cannot read {what}: {e}"),
    })?;
    if !String::from_utf8_lossy(&pem).contains(marker) {
        return Err(RunError::TlsFile {
            path: path.to_path_buf(),
            message: format!("no {what} in this file (expected a PEM block with '{marker}')"),
        });
    }
    Ok(pem)
}

/// The server side of mTLS: our certificate, and client certificates from `client_ca`; a client
/// that has not completed its handshake within `handshake` is dropped. With a `signer` a client
/// may come without a certificate (to enrol; every other call is refused in [`auth`]), and the
/// CA certificate follows ours in the chain, so that an enrolling agent can pin it.
pub fn server_tls(
    files: &TlsFiles,
    handshake: Duration,
    signer: Option<&Signer>,
) -> Result<ServerTlsConfig, RunError> {
    let mut cert = read_pem(&files.cert, "CERTIFICATE", "certificate")?;
    let key = read_pem(&files.key, "PRIVATE KEY", "private key")?;
    let ca = read_pem(&files.client_ca, "CERTIFICATE", "CA certificate")?;
    if let Some(signer) = signer {
        if !cert.ends_with(b"\n") {
            cert.push(b'\n');
        }
        cert.extend_from_slice(signer.ca_pem().as_bytes());
    }
    Ok(ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(signer.is_some())
        .timeout(handshake))
}

/// The CA the collector signs with: `--ca-key` and its certificate, the `--client-ca` file.
fn load_signer(config: &Config) -> Result<Option<Signer>, RunError> {
    let Some(key_path) = &config.ca_key else {
        return Ok(None);
    };
    let files = config.tls.as_ref().ok_or(RunError::CaKeyWithoutTls)?;
    let err = |message: String| RunError::CaKey {
        path: key_path.clone(),
        message,
    };
    let key = mxscope_proto::secret::read_private(key_path).map_err(|e| err(e.to_string()))?;
    let key = String::from_utf8(key).map_err(|_| err("not a PEM file".into()))?;
    let cert = std::fs::read_to_string(&files.client_ca).map_err(|e| {
        err(format!(
            "cannot read its certificate {}: {e}",
            files.client_ca.display()
        ))
    })?;
    let what = files.client_ca.display().to_string();
    let ca = mxscope_pki::Ca::from_pems(&cert, &key, &what)
        .map_err(|e| err(format!("{e} (its certificate is --client-ca {what})")))?;
    info!(ca.fingerprint = %ca.fingerprint(), agent_cert_life = ?config.agent_cert_life, "signing agent certificates online (--ca-key)");
    Ok(Some(Signer::new(ca, config.agent_cert_life)))
}

/// `<host name>:<port>`: the collector's name when `--name` is not given.
fn default_name(addr: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| addr.ip().to_string());
    format!("{host}:{}", addr.port())
}

/// Streams (and requests in flight) one client connection may hold.
const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// Serves gRPC (Ingest and Query) with mTLS when `config.tls` is set, else plain text on loopback, on `listener` until `shutdown` completes. Then it stops
/// accepting, lets open sessions commit and ack their in-flight batches (up to
/// `config.shutdown_grace`), closes the database writer and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let addr = listener.local_addr().map_err(RunError::Listener)?;
    let mut config = config;
    if config.name.is_empty() {
        config.name = default_name(addr);
    }
    let signer = load_signer(&config)?;
    // A bad rules file is a configuration error: refuse to start, naming file and line.
    let alert_rules = match &config.alert_rules {
        Some(path) => alert::rules::load(path).map_err(RunError::AlertRules)?,
        None => alert::rules::Rules::default(),
    };
    let tls = match &config.tls {
        Some(files) => Some(server_tls(
            files,
            config.tls_handshake_timeout,
            signer.as_ref(),
        )?),
        None => {
            check_plaintext(true, addr)?;
            warn!(listen = %addr, "serving plain text without client certificates: every caller may ingest, read and change targets (--insecure)");
            None
        }
    };
    let mode = if tls.is_some() {
        Mode::Certificates
    } else {
        Mode::Open
    };
    let revoked_initial = match &config.revoked {
        Some(path) => auth::load_revoked(path)?,
        None => Default::default(),
    };
    // Bad TLS files for the metrics port are a configuration error: refuse to start.
    let http_tls = match (&config.http, &config.http_options.tls) {
        (Some(_), Some(files)) => Some(http::tls::acceptor(files)?),
        _ => None,
    };

    let db = config.db_path.to_string_lossy().into_owned();
    let on_postgres = store::postgres::is_postgres_url(&db);
    // The enrolment tables are in the store's database, on PostgreSQL through its pool.
    let (store, identities): (Arc<dyn store::Store>, IdentityDb) = if on_postgres {
        let pg = store::postgres::PgStore::connect_with_ca(
            &db,
            config.store.clone(),
            config.db_ca.as_deref(),
        )
        .await?;
        let identities = IdentityDb::postgres(&pg);
        (Arc::new(pg), identities)
    } else {
        let (path, opts) = (config.db_path.clone(), config.store.clone());
        let store =
            tokio::task::spawn_blocking(move || store::sqlite::SqliteStore::open(&path, opts))
                .await??;
        (Arc::new(store), IdentityDb::open(&config.db_path)?)
    };
    // Subscribed before the first read, so a revocation committed in between is reloaded.
    let revocation_changes = identities.revocation_changes();
    let online_revoked = identities.revocations().await?;
    let db_shown = if on_postgres {
        store::postgres::redacted(&db)
    } else {
        db.clone()
    };

    let token = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (schedule, _) = watch::channel(1u64);
    let grace = config.shutdown_grace;
    let request_timeout = config.request_timeout;
    let max_queued = config.max_queued_batches.max(1);
    let max_message = config.max_message_bytes;
    let (revocations, revoked) = RevocationState::new(revoked_initial, online_revoked);
    if let Some(path) = config.revoked.clone() {
        tasks.spawn(auth::watch_revoked(
            path,
            revocations.clone(),
            token.clone(),
        ));
    }
    // Revocations made through the other collectors on the database.
    if let Some(changes) = revocation_changes {
        tasks.spawn(enrol::follow_revocations(
            identities.clone(),
            changes,
            revocations.clone(),
            token.clone(),
        ));
    }
    let enrolment = Arc::new(Enrolment::new(
        signer,
        identities,
        revocations.clone(),
        config.counters.clone(),
    ));
    let counters = config.counters.clone();
    let limiter = RateLimiter::new(config.limits.rate_per_sec, config.limits.burst);
    let byte_limiter = RateLimiter::new(config.limits.bytes_per_sec, config.limits.bytes_burst);
    let shared = Arc::new(Shared {
        store: store.clone(),
        config,
        connected: Mutex::new(HashMap::new()),
        schedule,
        shutdown: token.clone(),
        tasks: tasks.clone(),
        mode,
        revoked,
        enrolment: enrolment.clone(),
        limiter,
        byte_limiter,
        series: Mutex::new(HashMap::new()),
        watches: Mutex::new(HashMap::new()),
        writes: Arc::new(tokio::sync::Semaphore::new(max_queued)),
        counters: counters.clone(),
        mail_events: tokio::sync::broadcast::channel(1024).0,
    });
    // Central target changes (on PostgreSQL: of every collector) make sessions resend schedules.
    let mut target_changes = shared.store.target_changes();
    let schedule_bump = shared.clone();
    let stop_bumps = token.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                () = stop_bumps.cancelled() => return,
                changed = target_changes.recv() => match changed {
                    Ok(()) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        schedule_bump.schedule.send_modify(|v| *v += 1);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    tasks.spawn(mailwatch::run(
        shared.store.clone(),
        shared.config.stale_after,
        shared.mail_events.clone(),
        token.clone(),
    ));

    let alert_counts = Arc::new(alert::AlertCounts::default());
    // Metrics (when asked for) and the retention job run until shutdown.
    // A taken metrics port must not keep the collector (and its agents' data) down: say it loudly.
    let http_listener = match shared.config.http {
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(err) => {
                let err = RunError::Http(addr, err);
                tracing::error!(error = %error::chain(&err), "metrics disabled");
                None
            }
        },
        None => None,
    };
    if let Some(http_listener) = http_listener {
        let bound = http_listener.local_addr().map_err(RunError::Listener)?;
        let tls = http_tls.is_some();
        let state = http::MetricsState::new(store.clone(), shared.config.stale_after)
            .with_source(shared.counters.clone())
            .with_source(alert_counts.clone());
        let access = http::web::Access {
            token: shared.config.http_options.read_token.clone().map(|t| t.0),
            plain_exposed: http::exposed(bound, tls),
        };
        if access.plain_exposed && access.token.is_none() {
            warn!(http = %bound, "the dashboard and /api/v1 answer 403 on this plain-HTTP non-loopback address: pass --http-read-token-file, or TLS, to serve them");
        }
        let metrics = http::Server::new(state, &shared.config.http_options, http_tls)
            .with_routes(http::web::router(shared.clone(), access));
        if http::exposed(bound, tls) {
            warn!(http = %bound, "/metrics is served in plain text without client certificates on a non-loopback address: anyone who reaches it reads every target's state; bind --http to 127.0.0.1, or pass --http-tls-cert, --http-tls-key and --http-client-ca");
        }
        let stop = token.clone();
        tasks.spawn(async move {
            if let Err(err) = metrics.serve(http_listener, stop).await {
                warn!(error = %err, "metrics server failed");
            }
        });
        info!(http = %bound, tls, "serving /metrics and the dashboard (/)");
    }
    let public_url = match (&shared.config.public_url, shared.config.http) {
        (u, _) if !u.is_empty() => u.clone(),
        (_, Some(addr)) => format!("http://{addr}"),
        (_, None) => String::new(),
    };
    let engine = alert::Engine::new(
        alert_rules,
        alert::Settings {
            stale_after: shared.config.stale_after,
            quorum: shared.config.quorum,
            public_url,
        },
        None,
        Arc::new(alert::LogNotify),
    )
    .with_counts(alert_counts);
    tasks.spawn(alert::run(
        store.clone(),
        engine,
        shared.config.alert_interval,
        shared.config.alert_rules.clone(),
        token.clone(),
    ));
    tasks.spawn(store::retention_job(
        store.clone(),
        shared.config.retention_every,
        token.clone(),
    ));

    let ingest = IngestServer::new(ingest::IngestService::new(shared.clone()))
        .max_decoding_message_size(max_message);
    let query = QueryServer::new(query::QueryService::new(shared.clone()))
        .max_decoding_message_size(max_message);
    // A CSR and a token: a few KiB.
    let enrollment = EnrollmentServer::new(enrol::EnrollmentService::new(enrolment.clone()))
        .max_decoding_message_size(64 * 1024);
    let stop = token.clone();
    let signal = async move {
        shutdown.await;
        info!("shutting down: no new connections, draining sessions");
        stop.cancel();
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        // mTLS: a client certificate chaining to --client-ca is required for every connection.
        builder = builder.tls_config(tls).map_err(RunError::Tls)?;
    }
    let server = builder
        // HTTP/2 keepalive: notice dead agents behind silent NATs.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // One connection cannot hold more than this many streams or requests at once: an agent
        // needs one session stream, mxscopectl a few calls.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
        // A unary call (its body read included) and a stream's opening; a session's hello has
        // its own, shorter timeout.
        .timeout(request_timeout)
        // Roles: the certificate's identity against the method, and the certificate against the
        // live revocation list (auth.rs), the one place both are checked.
        .layer(AuthLayer::new(mode, counters, shared.revoked.clone()))
        .add_service(ingest)
        .add_service(query)
        .add_service(enrollment)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
    info!(listen = %addr, db = %db_shown, tls = (mode == Mode::Certificates), "collector listening");

    let mut server = std::pin::pin!(server);
    let served = tokio::select! {
        res = &mut server => res,
        () = token.cancelled() => match tokio::time::timeout(grace, &mut server).await {
            Ok(res) => res,
            Err(_) => {
                warn!(grace_ms = grace.as_millis() as u64, "shutdown grace period over, closing open streams");
                Ok(())
            }
        },
    };
    token.cancel();
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        warn!("session tasks did not finish within the grace period");
    }
    drop(shared);
    store.close().await?;
    info!("database closed");
    served?;
    Ok(())
}
