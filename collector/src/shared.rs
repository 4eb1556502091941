//! What the gRPC services share: the collector's settings ([`Config`], filled by the binary from
//! flags) and the live state every session and query sees ([`Shared`]: store, connected agents,
//! schedule version, revocations, rate limiter, counters).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::analysis;
use crate::auth::{Mode, Revoked};
use crate::limits::{Counters, Limits, RateLimiter, SeriesQuota};
use crate::store::{Store, StoreOptions};

/// Collector settings (the binary fills them from flags and `MXSCOPE_*` variables).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// SQLite database file (created if missing), or a `postgres://` URL.
    pub db_path: PathBuf,
    /// CA certificates (PEM) to trust for TLS to PostgreSQL (default: the system's roots).
    pub db_ca: Option<PathBuf>,
    /// How this collector names itself in the agents it takes (`agents` shows it); empty:
    /// `<host name>:<gRPC port>`.
    pub name: String,
    /// Default status window when a request does not set one.
    pub window: Duration,
    /// An agent or series silent longer than this is stale.
    pub stale_after: Duration,
    /// Largest gRPC message accepted (decoded).
    pub max_message_bytes: usize,
    /// Most results in one batch.
    pub max_batch_results: usize,
    /// Batches of one agent being committed at the same time (acks still go out in order).
    pub max_in_flight_batches: usize,
    /// How long an agent may take to send its hello.
    pub hello_timeout: Duration,
    /// How long a client may take to complete its TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// How long a unary request (and a stream's opening) may take, reading its body included.
    pub request_timeout: Duration,
    /// Batches of all sessions queued for the writer or being committed at once.
    pub max_queued_batches: usize,
    /// Most `watch` streams one identity (certificate; everyone in plain text) holds at once.
    pub max_watches_per_identity: usize,
    /// On shutdown, how long open streams get to finish before they are cut.
    pub shutdown_grace: Duration,
    /// Writer batching and reader pool.
    pub store: StoreOptions,
    /// mTLS files; `None` serves plain text (loopback only, no identities: everything allowed).
    pub tls: Option<TlsFiles>,
    /// The revocation list (agent ids, certificate serials and fingerprints), re-read on change.
    pub revoked: Option<PathBuf>,
    /// The CA's private key (its certificate is `tls.client_ca`): the collector signs agent
    /// certificates online (enrolment, renewal) only with it.
    pub ca_key: Option<PathBuf>,
    /// Life of the certificates the collector signs.
    pub agent_cert_life: Duration,
    /// Per-result limits and the per-agent rate.
    pub limits: Limits,
    /// Refusal counters; clone the `Arc` before [`run`] to read them (e.g. for `/metrics`).
    pub counters: Arc<Counters>,
    /// How many failing regions make a (target, check) `down` in the matrix.
    pub quorum: analysis::scope::Quorum,
    /// Where `/metrics` is served (`None`: not served).
    pub http: Option<SocketAddr>,
    /// How `/metrics` is served: timeouts, connection cap, TLS, scrape cache, series cap.
    pub http_options: HttpOptions,
    /// How often the retention job runs.
    pub retention_every: Duration,
    /// The alert rules file (TOML); `None`: the built-in rules. Re-read on SIGHUP.
    pub alert_rules: Option<PathBuf>,
    /// How often the alert engine evaluates (besides on the store's state changes).
    pub alert_interval: Duration,
    /// Base URL of the dashboard in alert links; empty: `http://<--http address>`.
    pub public_url: String,
}

/// The collector's certificate and key, and the CA its clients' certificates must chain to.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// How `/metrics` is served (the binary's `--http-*` flags).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpOptions {
    /// A connection must complete its TLS handshake, and each request its head, within this
    /// (hyper starts the timer whenever it waits for a request, so it also closes a keep-alive
    /// connection that sends no next request).
    pub header_timeout: Duration,
    /// A connection on which no byte moves either way for this long is closed (e.g. a client
    /// that stops reading its answer).
    pub idle_timeout: Duration,
    /// Connections served at once; further ones are closed as soon as they are accepted.
    pub max_connections: usize,
    /// TLS on the metrics port with required client certificates (`None`: plain HTTP).
    pub tls: Option<TlsFiles>,
    /// How long one rendered scrape is served to every scraper.
    pub cache_for: Duration,
    /// Most (target, check, region) label sets one scrape exports; the rest are left out and
    /// counted.
    pub max_series: usize,
    /// The dashboard's read token (`--http-read-token-file`).
    pub read_token: Option<ReadToken>,
}

/// A read token; its `Debug` does not show it.
#[derive(Clone)]
pub struct ReadToken(pub String);

impl std::fmt::Debug for ReadToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadToken(…)")
    }
}

impl Default for HttpOptions {
    fn default() -> HttpOptions {
        HttpOptions {
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_connections: 64,
            tls: None,
            cache_for: Duration::from_secs(5),
            max_series: 50_000,
            read_token: None,
        }
    }
}

impl Config {
    /// Defaults for everything but the database path.
    pub fn new(db_path: impl Into<PathBuf>) -> Config {
        Config {
            db_path: db_path.into(),
            db_ca: None,
            name: String::new(),
            window: Duration::from_secs(5 * 60),
            stale_after: Duration::from_secs(2 * 60),
            max_message_bytes: 4 * 1024 * 1024,
            max_batch_results: 5000,
            max_in_flight_batches: 16,
            hello_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_watches_per_identity: 8,
            max_queued_batches: 128,
            shutdown_grace: Duration::from_secs(10),
            store: StoreOptions::default(),
            tls: None,
            revoked: None,
            ca_key: None,
            agent_cert_life: crate::enrol::DEFAULT_CERT_LIFE,
            limits: Limits::default(),
            counters: Arc::new(Counters::default()),
            quorum: analysis::scope::Quorum::Majority,
            http: None,
            http_options: HttpOptions::default(),
            retention_every: Duration::from_secs(60),
            alert_rules: None,
            alert_interval: Duration::from_secs(5),
            public_url: String::new(),
        }
    }
}

/// State shared by the gRPC services.
pub(crate) struct Shared {
    /// Storage, behind the seam a second backend implements.
    pub store: Arc<dyn Store>,
    pub config: Config,
    /// The one live session of each connected agent id (a newer session replaces it).
    pub connected: Mutex<HashMap<String, LiveSession>>,
    /// Bumped after every committed change of the central targets.
    pub schedule: watch::Sender<u64>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// Whether callers carry certificate identities.
    pub mode: Mode,
    /// Revoked agent ids and certificates (updated live).
    pub revoked: watch::Receiver<Revoked>,
    /// Online signing (with --ca-key), the enrolment tables, and where the revocations come
    /// from (the file and the database; `mxscopectl revoke` adds to them).
    pub enrolment: Arc<crate::enrol::Enrolment>,
    /// Per-agent result rate, shared by all connections of an agent.
    pub limiter: RateLimiter,
    /// Per-agent bytes of results, likewise.
    pub byte_limiter: RateLimiter,
    /// The series each agent feeds (see [`SeriesQuota`]), kept across its sessions.
    pub series: Mutex<HashMap<String, Arc<Mutex<SeriesQuota>>>>,
    /// Write slots: one per batch queued for the writer or being committed (see
    /// `Config::max_queued_batches`).
    pub writes: Arc<tokio::sync::Semaphore>,
    /// Open `watch` streams per identity.
    pub watches: Mutex<HashMap<String, usize>>,
    /// Refusal counters (what `/metrics` exports); the same `Arc` as `config.counters`.
    pub counters: Arc<Counters>,
    /// Mail-level state changes (sent by the mail watch task), merged into `watch` streams.
    pub mail_events: tokio::sync::broadcast::Sender<mxscope_proto::pb::WatchEvent>,
}

/// An agent's live session: which one it is and how to end it when a newer one arrives.
#[derive(Debug)]
pub(crate) struct LiveSession {
    pub generation: u64,
    pub replaced: CancellationToken,
}

impl Shared {
    /// The series quota of agent `id`, shared by its sessions.
    pub(crate) fn series_quota(&self, id: &str) -> Arc<Mutex<SeriesQuota>> {
        let mut all = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.entry(id.to_string()).or_default().clone()
    }

    pub(crate) fn is_connected(&self, id: &str) -> bool {
        self.connected
            .lock()
            .map(|m| m.contains_key(id))
            .unwrap_or(false)
    }
}
