//! The PostgreSQL backend: [`PgStore`], for several collectors on one database (`--db
//! postgres://…`). Each collector runs one writer task that commits requests in batches (see
//! [`writer`] for what keeps several writers exact); reads (and the enrolment tables, see
//! `enrol::db`) use a connection pool; one more connection LISTENs for the state, target and
//! revocation changes every collector announces at commit.

mod read;
mod schema;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use mxscope_proto::pb;
use mxscope_proto::raw::ResultView;
use mxscope_proto::target::Target;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    AgentHello, AgentRow, Filter, Pending, Sample, SeriesId, SeriesRow, Store, StoreError,
    StoreOptions, WriterStats,
};
use crate::analysis::aggregate::Agg;
pub use schema::SCHEMA_VERSION;
use writer::{Msg, Op, Reply, Request};

/// One day in microseconds: the width of a `results` partition.
pub const DAY_US: i64 = 86_400_000_000;
/// Advisory lock keys ("mxscope" and a number): migrations, and partition DDL.
const MIGRATE_LOCK: i64 = 0x6d78_7363_6f70_6501;
const PARTITION_LOCK: i64 = 0x6d78_7363_6f70_6502;
/// `pg_notify` channels: series state changes (payload: the event), central target changes,
/// revocations made online (empty payload: reload them).
const EVENTS_CHANNEL: &str = "mxscope_events";
const TARGETS_CHANNEL: &str = "mxscope_targets";
pub(crate) const REVOCATIONS_CHANNEL: &str = "mxscope_revocations";
/// Capacity of the broadcasts; a slower watcher skips (and is told how many).
const EVENTS_CAPACITY: usize = 1024;
/// Writer tasks per collector, each with its own connection, transaction and rollup rows: a
/// writer's transactions run one after another (statements, then the wait for the WAL flush),
/// so a second overlaps them (BENCHMARKS.md, section 7: one writer stored 0.27 of COPY's rows/s,
/// two collectors of one writer each 1.68 times as much).
pub const WRITERS: usize = 2;
/// How long `connect` waits for the LISTEN connection before it gives up.
const LISTEN_READY: Duration = Duration::from_secs(10);

/// A failure of PostgreSQL or of the way to it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    #[error("--db {url}: {message}")]
    Url { url: String, message: String },
    #[error("cannot connect to PostgreSQL at {url} (is the server running, the database created and the role allowed to log in? check --db)")]
    Connect {
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL: database migration to version {version} failed")]
    Migrate {
        version: i64,
        #[source]
        source: Box<tokio_postgres::Error>,
    },
    #[error("PostgreSQL statement failed")]
    Statement(#[from] tokio_postgres::Error),
    #[error("PostgreSQL commit failed: nothing of the batch is acked (the agents send it again)")]
    Commit(#[source] Arc<tokio_postgres::Error>),
    /// The batch's transaction failed; every request of it gets this (nothing is acked).
    #[error("PostgreSQL transaction failed: nothing of the batch is acked")]
    Batch(#[source] Arc<StoreError>),
    #[error("PostgreSQL connection pool: {0}")]
    Pool(String),
    #[error("TLS to PostgreSQL: {0}")]
    Tls(String),
}

impl PgError {
    /// True when PostgreSQL said its disk is full (SQLSTATE 53100), judged by the error code.
    pub fn is_disk_full(&self) -> bool {
        let full = |e: &tokio_postgres::Error| {
            e.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL)
        };
        match self {
            PgError::Statement(e) => full(e),
            PgError::Commit(e) => full(e),
            PgError::Migrate { source, .. } => full(source),
            PgError::Batch(e) => e.is_disk_full(),
            _ => false,
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        StoreError::Postgres(PgError::Statement(e))
    }
}

/// True when `--db` names a PostgreSQL database rather than a SQLite file.
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// The URL with its password replaced by `***`, for logs and errors.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = tail
        .split('&')
        .map(|kv| match kv.split_once("password=") {
            Some((pre, _)) => format!("{pre}password=***"),
            None => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{scheme}://{authority}{tail}")
}

/// TLS for the connections: rustls with the CA file given (`--db-ca`), else the system's roots.
/// Used when the URL's `sslmode` asks for it (`prefer`, the default, tries it first).
fn tls(ca: Option<&Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let err = |m: String| StoreError::Postgres(PgError::Tls(m));
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| err(format!("cannot read --db-ca {}: {e}", path.display())))?;
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert = cert.map_err(|e| err(format!("--db-ca {}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| err(format!("--db-ca {}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(err(format!(
                    "--db-ca {}: no certificate in this file (expected PEM)",
                    path.display()
                )));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| err(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The URL without its password.
    what: String,
    pool: deadpool_postgres::Pool,
    /// One channel per writer task; an agent's requests always go to the same one.
    tx: Vec<mpsc::UnboundedSender<Msg>>,
    writers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    stats: Arc<WriterStats>,
    events: broadcast::Sender<pb::WatchEvent>,
    targets: broadcast::Sender<()>,
    revocations: broadcast::Sender<()>,
    ids: Arc<RwLock<HashMap<writer::SeriesKey, i64>>>,
    prune_batch: usize,
    stop: CancellationToken,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("db", &self.inner.what)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl PgStore {
    /// Connects to `url` (TLS with the system's roots when the server offers it), migrates the
    /// database and starts the writer and the listener.
    pub async fn connect(url: &str, opts: StoreOptions) -> Result<PgStore, StoreError> {
        PgStore::connect_with_ca(url, opts, None).await
    }

    /// [`connect`](PgStore::connect), trusting the CA certificates in `ca` for TLS.
    pub async fn connect_with_ca(
        url: &str,
        opts: StoreOptions,
        ca: Option<&Path>,
    ) -> Result<PgStore, StoreError> {
        let what = redacted(url);
        let config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            StoreError::Postgres(PgError::Url {
                url: what.clone(),
                message: e.to_string(),
            })
        })?;
        let tls = tls(ca)?;
        let manager = deadpool_postgres::Manager::from_config(
            config.clone(),
            tls.clone(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(opts.readers.max(1) + WRITERS + 1)
            .build()
            .map_err(|e| StoreError::Postgres(PgError::Pool(e.to_string())))?;
        let mut client = pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(source) => {
                StoreError::Postgres(PgError::Connect {
                    url: what.clone(),
                    source,
                })
            }
            other => StoreError::Postgres(PgError::Pool(other.to_string())),
        })?;
        schema::migrate(&mut client, &what).await?;
        let partitions = writer::partitions(&**client).await?;
        drop(client);

        let stats = Arc::new(WriterStats::default());
        let (events, _) = broadcast::channel(EVENTS_CAPACITY);
        let (targets, _) = broadcast::channel(16);
        let (revocations, _) = broadcast::channel(16);
        let stop = CancellationToken::new();
        let (ready_tx, ready) = oneshot::channel();
        let heard = Heard {
            events: events.clone(),
            targets: targets.clone(),
            revocations: revocations.clone(),
        };
        tokio::spawn(listen(config, tls, heard, stop.clone(), ready_tx));
        match tokio::time::timeout(LISTEN_READY, ready).await {
            Ok(Ok(())) => {}
            _ => {
                stop.cancel();
                return Err(StoreError::Postgres(PgError::Pool(format!(
                    "the LISTEN connection to {what} did not start within {LISTEN_READY:?}"
                ))));
            }
        }
        let ids = Arc::new(RwLock::new(HashMap::new()));
        let mut tx = Vec::with_capacity(WRITERS);
        let mut writers = Vec::with_capacity(WRITERS);
        for _ in 0..WRITERS {
            let (sender, rx) = mpsc::unbounded_channel();
            let w = writer::Writer {
                pool: pool.clone(),
                opts: opts.clone(),
                stats: stats.clone(),
                writer_id: rand::random::<i64>(),
                ids: ids.clone(),
                rollups: HashMap::new(),
                partitions: partitions.clone(),
            };
            tx.push(sender);
            writers.push(tokio::spawn(w.run(rx)));
        }
        tracing::info!(db = %what, "PostgreSQL store open");
        Ok(PgStore {
            inner: Arc::new(Inner {
                what,
                pool,
                tx,
                writers: Mutex::new(writers),
                stats,
                events,
                targets,
                revocations,
                ids,
                prune_batch: opts.prune_batch,
                stop,
            }),
        })
    }

    fn submit(&self, op: Op) -> Pending<Reply> {
        let (reply, rx) = oneshot::channel();
        // An agent's requests keep their order on one writer (its batches commit in seq order);
        // target changes and retention rounds go to the first.
        let lane = match &op {
            Op::Hello(h) => lane_of(&h.id),
            Op::Results { agent_id, .. } | Op::Heartbeat { agent_id, .. } => lane_of(agent_id),
            _ => 0,
        };
        let sent =
            self.inner.tx[lane % self.inner.tx.len()].send(Msg::Write(Request { op, reply }));
        Box::pin(async move {
            sent.map_err(|_| StoreError::WriterClosed)?;
            rx.await.map_err(|_| StoreError::WriterClosed)?
        })
    }

    fn read<T, F>(&self, f: F) -> Pending<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(
                &'c deadpool_postgres::Client,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'c>,
            > + Send
            + 'static,
    {
        let pool = self.inner.pool.clone();
        Box::pin(async move {
            let client = pool
                .get()
                .await
                .map_err(|e| StoreError::Postgres(PgError::Pool(e.to_string())))?;
            f(&client).await
        })
    }

    /// Central target changes committed by any collector on this database.
    pub fn target_changes(&self) -> broadcast::Receiver<()> {
        self.inner.targets.subscribe()
    }

    /// Revocations committed by any collector on this database (also sent after the LISTEN
    /// connection was lost and is back: one may have been missed).
    pub fn revocation_changes(&self) -> broadcast::Receiver<()> {
        self.inner.revocations.subscribe()
    }

    /// The connection pool, for the tables beside the store's (enrolment).
    pub fn pool(&self) -> &deadpool_postgres::Pool {
        &self.inner.pool
    }
}

/// Where the LISTEN connection forwards what it hears.
struct Heard {
    events: broadcast::Sender<pb::WatchEvent>,
    targets: broadcast::Sender<()>,
    revocations: broadcast::Sender<()>,
}

/// The LISTEN connection: forwards every collector's state, target and revocation changes; after
/// a lost connection it reconnects and reports a target and a revocation change (one may have
/// been missed).
async fn listen(
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    heard: Heard,
    stop: CancellationToken,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut wait = Duration::from_millis(250);
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut conn)) => {
                let (ntx, mut nrx) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(m) = messages.next().await {
                        match m {
                            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                if ntx.send(n).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "PostgreSQL LISTEN connection lost");
                                return;
                            }
                        }
                    }
                });
                let listening = client
                    .batch_execute(&format!(
                        "LISTEN {EVENTS_CHANNEL}; LISTEN {TARGETS_CHANNEL}; LISTEN {REVOCATIONS_CHANNEL}"
                    ))
                    .await;
                match listening {
                    Ok(()) => {
                        wait = Duration::from_millis(250);
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        } else {
                            let _ = heard.targets.send(());
                            let _ = heard.revocations.send(());
                        }
                        loop {
                            tokio::select! {
                                () = stop.cancelled() => {
                                    driver.abort();
                                    return;
                                }
                                n = nrx.recv() => match n {
                                    None => break,
                                    Some(n) if n.channel() == TARGETS_CHANNEL => {
                                        let _ = heard.targets.send(());
                                    }
                                    Some(n) if n.channel() == REVOCATIONS_CHANNEL => {
                                        let _ = heard.revocations.send(());
                                    }
                                    Some(n) => match writer::decode_event(n.payload()) {
                                        Some(e) => {
                                            let _ = heard.events.send(e);
                                        }
                                        None => tracing::warn!(channel = n.channel(), "unreadable notification skipped"),
                                    },
                                },
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "PostgreSQL LISTEN failed"),
                }
                driver.abort();
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "cannot open the PostgreSQL LISTEN connection")
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

impl Store for PgStore {
    fn subscribe(&self) -> broadcast::Receiver<pb::WatchEvent> {
        self.inner.events.subscribe()
    }
    fn register_agent(&self, hello: AgentHello) -> Pending<u64> {
        let fut = self.submit(Op::Hello(hello));
        Box::pin(async move { seq(fut.await?) })
    }
    fn put_batch(
        &self,
        agent_id: &str,
        region: &str,
        results: &[ResultView<'_>],
        raw: Vec<Bytes>,
        rejected: Vec<u64>,
        at_us: i64,
    ) -> Pending<u64> {
        let prepared = writer::Prepared::of(region, results, &self.inner.ids);
        let fut = self.submit(Op::Results {
            agent_id: agent_id.to_string(),
            prepared,
            raw,
            rejected,
            at_us,
        });
        Box::pin(async move { seq(fut.await?) })
    }
    fn heartbeat(
        &self,
        agent_id: &str,
        spool_depth: u64,
        dropped_total: u64,
        at_us: i64,
    ) -> Pending<()> {
        let fut = self.submit(Op::Heartbeat {
            agent_id: agent_id.to_string(),
            spool_depth,
            dropped_total,
            at_us,
        });
        Box::pin(async move { fut.await.map(|_| ()) })
    }
    fn put_target(&self, target: Target, update: bool, at_us: i64) -> Pending<()> {
        let fut = self.submit(Op::PutTarget {
            target: Box::new(target),
            update,
            at_us,
        });
        Box::pin(async move { fut.await.map(|_| ()) })
    }
    fn remove_target(&self, name: &str) -> Pending<()> {
        let fut = self.submit(Op::RemoveTarget {
            name: name.to_string(),
        });
        Box::pin(async move { fut.await.map(|_| ()) })
    }
    fn target_changes(&self) -> broadcast::Receiver<()> {
        PgStore::target_changes(self)
    }
    fn central_targets(&self) -> Pending<Vec<Target>> {
        self.read(|c| Box::pin(read::central_targets(&***c)))
    }
    fn local_targets(&self) -> Pending<Vec<(String, String, Target)>> {
        self.read(|c| Box::pin(read::local_targets(&***c)))
    }
    fn agents(&self) -> Pending<Vec<AgentRow>> {
        self.read(|c| Box::pin(read::agents(&***c)))
    }
    fn results_per_agent(&self, since_us: i64) -> Pending<BTreeMap<String, u64>> {
        self.read(move |c| Box::pin(read::results_per_agent(&***c, since_us)))
    }
    fn series(&self, filter: Filter) -> Pending<Vec<SeriesRow>> {
        self.read(move |c| Box::pin(async move { read::series(&***c, &filter).await }))
    }
    fn rollups(
        &self,
        filter: Filter,
        since_us: i64,
        now_us: i64,
        phase: Option<String>,
    ) -> Pending<BTreeMap<SeriesId, Agg>> {
        self.read(move |c| {
            Box::pin(async move {
                read::rollups(&***c, &filter, since_us, now_us, phase.as_deref()).await
            })
        })
    }
    fn history(
        &self,
        filter: Filter,
        since_us: i64,
        now_us: i64,
        phase: Option<String>,
    ) -> Pending<Vec<(i64, SeriesId, Agg)>> {
        self.read(move |c| {
            Box::pin(async move {
                read::history(&***c, &filter, since_us, now_us, phase.as_deref()).await
            })
        })
    }
    fn status_input(
        &self,
        filter: Filter,
        since_us: i64,
    ) -> Pending<(Vec<SeriesRow>, Vec<Sample>)> {
        self.read(move |c| {
            Box::pin(async move { read::status_input(&***c, &filter, since_us).await })
        })
    }
    fn changes(&self, target: &str, since_us: i64, limit: u32) -> Pending<Vec<pb::WatchEvent>> {
        let target = target.to_string();
        self.read(move |c| {
            Box::pin(async move { read::changes(&***c, &target, since_us, limit).await })
        })
    }
    fn results(&self, filter: Filter, since_us: i64, limit: u32) -> Pending<Vec<pb::StoredResult>> {
        self.read(move |c| {
            Box::pin(async move { read::results(&***c, &filter, since_us, limit).await })
        })
    }
    fn prune(&self, now_us: i64) -> Pending<u64> {
        let fut = self.submit(Op::Prune { now_us });
        Box::pin(async move {
            match fut.await? {
                Reply::Pruned(n) => Ok(n),
                _ => Err(StoreError::OutOfRange("writer reply")),
            }
        })
    }
    fn prune_batch(&self) -> usize {
        self.inner.prune_batch
    }
    fn stats(&self) -> &WriterStats {
        &self.inner.stats
    }
    fn close(&self) -> Pending<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            for tx in &inner.tx {
                let _ = tx.send(Msg::Close);
            }
            let handles = inner
                .writers
                .lock()
                .map(|mut h| std::mem::take(&mut *h))
                .unwrap_or_default();
            for handle in handles {
                handle.await?;
            }
            inner.stop.cancel();
            Ok(())
        })
    }
}

/// The writer of an agent's requests: a hash of its id (std's SipHash with fixed keys: stable for
/// the process, which is all it needs).
fn lane_of(agent_id: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    agent_id.hash(&mut h);
    h.finish() as usize
}

fn seq(r: Reply) -> Result<u64, StoreError> {
    match r {
        Reply::Seq(n) => Ok(n),
        _ => Err(StoreError::OutOfRange("writer reply")),
    }
}
