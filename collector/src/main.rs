//! `mxscope-collector`: flags and environment, logging, signals; everything else is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use mxscope_collector::limits::{parse_byte_rate, parse_rate, Limits};
use mxscope_collector::{check_plaintext, run, Config, HttpOptions, ReadToken, TlsFiles};
use tracing_subscriber::EnvFilter;

/// mimalloc: per-thread free lists, so the ingest tasks, the writer and its dropper thread
/// allocate and free without contending on glibc's arenas.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Receives mail-probe results from mxscope agents and answers mxscopectl.
#[derive(Debug, Parser)]
#[command(name = "mxscope-collector", version)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "MXSCOPE_LISTEN", default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// SQLite database file (created if missing), or a PostgreSQL URL
    /// (`postgres://user:password@host:5432/mxscope?sslmode=require`) that several collectors
    /// share; the database must exist, its tables are created.
    #[arg(long, env = "MXSCOPE_DB", default_value = "./mxscope.db")]
    db: PathBuf,
    /// CA certificates (PEM) to trust for TLS to PostgreSQL (default: the system's roots).
    #[arg(long, env = "MXSCOPE_DB_CA")]
    db_ca: Option<PathBuf>,
    /// This collector's name in `mxscopectl agents` (which collector an agent streams to, when
    /// several share a PostgreSQL database); default `<host name>:<gRPC port>`.
    #[arg(long, env = "MXSCOPE_NAME")]
    name: Option<String>,
    /// Serve plain-text gRPC without client certificates (loopback only; everyone may do anything).
    #[arg(long, env = "MXSCOPE_INSECURE", conflicts_with_all = ["tls_cert", "tls_key", "client_ca"])]
    insecure: bool,
    /// The collector's server certificate (PEM), e.g. collector.pem from `mxscopectl ca init`.
    #[arg(long, env = "MXSCOPE_TLS_CERT", requires_all = ["tls_key", "client_ca"])]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "MXSCOPE_TLS_KEY", requires_all = ["tls_cert", "client_ca"])]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that agent and mxscopectl certificates must chain to; client certificates are required.
    #[arg(long, env = "MXSCOPE_CLIENT_CA", requires_all = ["tls_cert", "tls_key"])]
    client_ca: Option<PathBuf>,
    /// Revocation list: one agent id, serial:HEX or sha256:HEX (of the certificate) a line, `#`
    /// comments (`mxscopectl revoke` appends to it); re-read within a second of a change.
    #[arg(long, env = "MXSCOPE_REVOKED")]
    revoked: Option<PathBuf>,
    /// The CA's private key (PEM, mode 0600); its certificate is --client-ca. With it the
    /// collector signs agent certificates online: enrolment with a token from `mxscopectl token
    /// create`, and renewal. Without it the CA key can stay offline (`mxscopectl enroll`).
    #[arg(long, env = "MXSCOPE_CA_KEY", requires = "client_ca")]
    ca_key: Option<PathBuf>,
    /// Life of the agent certificates the collector signs (renewed at two thirds of it).
    #[arg(long, env = "MXSCOPE_AGENT_CERT_TTL", default_value = "30d", value_parser = positive_duration)]
    agent_cert_ttl: Duration,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "MXSCOPE_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_message_bytes: usize,
    /// Most results in one batch; a larger batch closes the session (ResourceExhausted).
    #[arg(long, env = "MXSCOPE_MAX_BATCH", default_value_t = 5000)]
    max_batch: usize,
    /// Results per agent id (over all its connections), e.g. 5000/s or 600/m; above it the
    /// collector stops reading from the agent until its bucket refills.
    #[arg(long, env = "MXSCOPE_MAX_RATE", default_value = "5000/s", value_parser = parse_rate)]
    max_rate: f64,
    /// Results an agent may send at once above --max-rate.
    #[arg(long, env = "MXSCOPE_RATE_BURST", default_value_t = 10_000.0)]
    rate_burst: f64,
    /// Bytes of results per agent id and second, e.g. 8MiB/s; above it the collector stops
    /// reading from the agent until its bucket refills.
    #[arg(long, env = "MXSCOPE_MAX_BYTES_RATE", default_value = "8MiB/s", value_parser = parse_byte_rate)]
    max_bytes_rate: f64,
    /// Bytes an agent may send at once above --max-bytes-rate.
    #[arg(long, env = "MXSCOPE_BYTES_BURST", default_value = "32MiB", value_parser = parse_byte_rate)]
    bytes_burst: f64,
    /// Most series (target, endpoint, check) one agent may feed; results that would open more
    /// are refused and counted (mxscope_ingest_rejected_results_total{reason="series_cap"}).
    #[arg(long, env = "MXSCOPE_MAX_SERIES_PER_AGENT", default_value_t = 20_000)]
    max_series_per_agent: usize,
    /// A client that has not completed its TLS handshake within this is dropped.
    #[arg(long, env = "MXSCOPE_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    tls_handshake_timeout: Duration,
    /// A query (or a stream's opening) that takes longer is ended (CANCELLED, "Timeout expired").
    #[arg(long, env = "MXSCOPE_REQUEST_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    request_timeout: Duration,
    /// Batches of all agents queued for the database writer at once; above it sessions stop
    /// reading until a batch commits.
    #[arg(long, env = "MXSCOPE_MAX_QUEUED_BATCHES", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    max_queued_batches: u32,
    /// Most `mxscopectl watch` streams one certificate holds open at once.
    #[arg(long, env = "MXSCOPE_MAX_WATCHES", default_value_t = 8)]
    max_watches: usize,
    /// Results whose start time is further ahead than this are rejected.
    #[arg(long, env = "MXSCOPE_MAX_FUTURE", default_value = "10m", value_parser = humantime::parse_duration)]
    max_future: Duration,
    /// Results whose start time is older than this are rejected.
    #[arg(long, env = "MXSCOPE_MAX_AGE", default_value = "14d", value_parser = humantime::parse_duration)]
    max_age: Duration,
    /// Default status window.
    #[arg(long, env = "MXSCOPE_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    window: Duration,
    /// An agent or series silent longer than this is stale.
    #[arg(long, env = "MXSCOPE_STALE_AFTER", default_value = "2m", value_parser = humantime::parse_duration)]
    stale_after: Duration,
    /// Consecutive failed results that turn a series `failing`.
    #[arg(long, env = "MXSCOPE_FAIL_AFTER", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    fail_after: u32,
    /// Consecutive successful results that bring a failing series back to `ok`.
    #[arg(long, env = "MXSCOPE_RECOVER_AFTER", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    recover_after: u32,
    /// Failing regions that make a (target, check) `down`: `majority` (of regions with fresh data) or a number.
    #[arg(long, env = "MXSCOPE_QUORUM", default_value = "majority")]
    quorum: mxscope_collector::analysis::scope::Quorum,
    /// Alert rules (TOML; see README, Alerts); absent: the built-in rules. Re-read on SIGHUP.
    #[arg(long, env = "MXSCOPE_ALERT_RULES")]
    alert_rules: Option<std::path::PathBuf>,
    /// How often the alert engine evaluates (it also does on every state change).
    #[arg(long, env = "MXSCOPE_ALERT_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    alert_interval: Duration,
    /// Base URL of the dashboard in alerts' links (default: http://<--http address>).
    #[arg(long, env = "MXSCOPE_PUBLIC_URL")]
    public_url: Option<String>,
    /// How long raw results are kept.
    #[arg(long, env = "MXSCOPE_RETENTION", default_value = "14d", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// How long week rollups are kept (hour rows live about 3 days and day rows about 3 weeks: as
    /// long as a window reads them).
    #[arg(long, env = "MXSCOPE_ROLLUP_RETENTION", default_value = "400d", value_parser = humantime::parse_duration)]
    rollup_retention: Duration,
    /// Address to serve Prometheus metrics on (`/metrics`); `off` to disable.
    #[arg(long, env = "MXSCOPE_HTTP", default_value = "127.0.0.1:9464", value_parser = parse_http)]
    http: HttpAddr,
    /// Server certificate (PEM) for `/metrics` over TLS; with --http-tls-key and --http-client-ca.
    #[arg(long, env = "MXSCOPE_HTTP_TLS_CERT", requires_all = ["http_tls_key", "http_client_ca"])]
    http_tls_cert: Option<PathBuf>,
    /// Private key (PEM, mode 0600) of --http-tls-cert.
    #[arg(long, env = "MXSCOPE_HTTP_TLS_KEY", requires_all = ["http_tls_cert", "http_client_ca"])]
    http_tls_key: Option<PathBuf>,
    /// CA (PEM) that scrapers' client certificates must chain to; a client without one is
    /// refused at the handshake, an agent certificate gets 403.
    #[arg(long, env = "MXSCOPE_HTTP_CLIENT_CA", requires_all = ["http_tls_cert", "http_tls_key"])]
    http_client_ca: Option<PathBuf>,
    /// A metrics connection must complete its TLS handshake and each request head within this.
    #[arg(long, env = "MXSCOPE_HTTP_HEADER_TIMEOUT", default_value = "5s", value_parser = positive_duration)]
    http_header_timeout: Duration,
    /// A metrics connection on which nothing moves for this long is closed.
    #[arg(long, env = "MXSCOPE_HTTP_IDLE_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    http_idle_timeout: Duration,
    /// Metrics connections served at once; further ones are closed at once (and counted).
    #[arg(long, env = "MXSCOPE_HTTP_MAX_CONNECTIONS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    http_max_connections: u32,
    /// Most (target, check, region) label sets one scrape exports (central targets first).
    #[arg(long, env = "MXSCOPE_HTTP_MAX_SERIES", default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(1..))]
    http_max_series: u32,
    /// File (mode 0600) holding a read token the dashboard and `/api/v1/…` require
    /// (`Authorization: Bearer TOKEN`, or open `/login?token=TOKEN` once in the browser); needed
    /// to serve them in plain HTTP on a non-loopback --http address.
    #[arg(long, env = "MXSCOPE_HTTP_READ_TOKEN_FILE")]
    http_read_token_file: Option<PathBuf>,
    /// Log output format.
    #[arg(long, env = "MXSCOPE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// `--http`: an address, or `off` (`None`).
#[derive(Debug, Clone, Copy)]
struct HttpAddr(Option<SocketAddr>);

fn parse_http(s: &str) -> Result<HttpAddr, String> {
    if s == "off" {
        return Ok(HttpAddr(None));
    }
    s.parse()
        .map(|a| HttpAddr(Some(a)))
        .map_err(|e| format!("'{s}': {e} (expected ADDR:PORT or 'off')"))
}

/// A duration above zero (`5s`, `500ms`).
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d > Duration::ZERO => Ok(d),
        Ok(_) => Err(format!("'{s}': must be above zero")),
        Err(e) => Err(format!("'{s}': {e}")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_format);
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mxscope-collector: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn serve(args: Args) -> anyhow::Result<()> {
    let tls = match (args.tls_cert, args.tls_key, args.client_ca) {
        (Some(cert), Some(key), Some(client_ca)) => Some(TlsFiles {
            cert,
            key,
            client_ca,
        }),
        _ => {
            check_plaintext(args.insecure, args.listen)?;
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another collector running? pick another --listen)",
                args.listen
            )
        })?;
    let mut config = Config::new(args.db);
    config.window = args.window;
    config.stale_after = args.stale_after;
    config.tls_handshake_timeout = args.tls_handshake_timeout;
    config.request_timeout = args.request_timeout;
    config.max_watches_per_identity = args.max_watches;
    config.max_queued_batches = args.max_queued_batches as usize;
    config.store.policy = mxscope_collector::analysis::hysteresis::Policy {
        fail_after: args.fail_after,
        recover_after: args.recover_after,
    };
    config.store.retention = args.retention;
    config.store.rollup_retention = args.rollup_retention.max(args.retention);
    config.quorum = args.quorum;
    config.alert_rules = args.alert_rules;
    config.alert_interval = args.alert_interval.max(Duration::from_millis(100));
    config.public_url = args.public_url.unwrap_or_default();
    config.http = args.http.0;
    let mut http = HttpOptions::default();
    http.header_timeout = args.http_header_timeout;
    http.idle_timeout = args.http_idle_timeout;
    http.max_connections = args.http_max_connections as usize;
    http.max_series = args.http_max_series as usize;
    http.tls = match (args.http_tls_cert, args.http_tls_key, args.http_client_ca) {
        (Some(cert), Some(key), Some(client_ca)) => Some(TlsFiles {
            cert,
            key,
            client_ca,
        }),
        _ => None,
    };
    if let Some(path) = &args.http_read_token_file {
        let bytes = mxscope_proto::secret::read_private(path)?;
        let token = String::from_utf8(bytes)
            .map(|t| t.trim().to_string())
            .ok()
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic() && b != b';'))
            .with_context(|| {
                format!(
                    "--http-read-token-file {}: expected one line of printable ASCII without ';' (e.g. from 'openssl rand -hex 32')",
                    path.display()
                )
            })?;
        http.read_token = Some(ReadToken(token));
    }
    config.http_options = http;
    config.tls = tls;
    config.revoked = args.revoked;
    config.ca_key = args.ca_key;
    config.db_ca = args.db_ca;
    config.name = args.name.unwrap_or_default();
    config.agent_cert_life = args.agent_cert_ttl;
    config.max_message_bytes = args.max_message_bytes;
    config.max_batch_results = args.max_batch;
    let mut limits = Limits::default();
    limits.rate_per_sec = args.max_rate;
    limits.burst = args.rate_burst;
    limits.bytes_per_sec = args.max_bytes_rate;
    limits.bytes_burst = args.bytes_burst;
    limits.max_series_per_agent = args.max_series_per_agent;
    limits.max_future = args.max_future;
    limits.max_age = args.max_age;
    config.limits = limits;
    run(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %err, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for sigterm");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "sigint", "signal received"),
        () = term => tracing::info!(signal = "sigterm", "signal received"),
    }
}
