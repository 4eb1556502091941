//! Storage: the [`Store`] seam the services hold (speaking domain rows, so a PostgreSQL backend
//! can slot in later) and its SQLite implementation, [`SqliteStore`], in WAL mode. One writer
//! thread owns the write connection and commits
//! requests in batches; reads use a small pool of read-only connections on `spawn_blocking`.
//!
//! Durability: `synchronous=NORMAL` in WAL mode means a commit is durable against a process crash
//! (the WAL is written before COMMIT returns) but the last commits may be lost on power failure.
//! Every write request is answered only after its COMMIT returned, and the ingest acks only then.

mod api;
mod read;
pub mod rollup;
pub mod row;
pub(crate) mod schema;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mxscope_proto::pb;
use mxscope_proto::raw::ResultView;
use mxscope_proto::target::Target;
use mxscope_proto::time::{millis, now_us};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};

use crate::analysis::aggregate::Agg;
use crate::analysis::hysteresis::Policy;
pub use crate::analysis::series::{Sample, SeriesId, SeriesRow};

pub use api::{Pending, Store};
pub use schema::SCHEMA_VERSION;
use writer::{Op, Reply, Request};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("cannot open database '{}' (check that the directory exists and is writable, or pass another --db)", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database '{}' has schema version {found}, newer than this collector supports ({supported}); upgrade mxscope-collector or use another --db", path.display())]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("database migration to version {version} failed")]
    Migrate {
        version: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    /// The batch's transaction failed to begin or to COMMIT; nothing of the batch is stored.
    #[error("database commit failed")]
    Commit(#[source] Arc<rusqlite::Error>),
    /// SQLite rolled the batch's transaction back after a failed statement (it does on
    /// `SQLITE_FULL`), or a savepoint could not be undone: nothing of the batch is stored.
    #[error("database transaction rolled back after a failed statement")]
    RolledBack,
    /// The store's own threads (writer, checkpointer, dropper) could not be started.
    #[error("cannot start the database thread '{name}'")]
    Thread {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("stored json is malformed")]
    Json(#[from] serde_json::Error),
    #[error("value out of range: {0}")]
    OutOfRange(&'static str),
    #[error("unknown agent '{0}'")]
    UnknownAgent(String),
    #[error("target '{0}' already exists")]
    TargetExists(String),
    #[error("unknown target '{0}'")]
    TargetNotFound(String),
    /// The disk holding the database is full (`SQLITE_FULL`): nothing was stored, so nothing may
    /// be acked; the write can be retried once space is back.
    #[error("database '{}' is on a full disk (SQLITE_FULL): nothing is stored until space is freed", path.display())]
    DiskFull { path: PathBuf },
    #[error("database writer has stopped")]
    WriterClosed,
    #[error("writing the buffered rollups failed (the collector log says why)")]
    RollupWrite,
    #[error("database task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// Tuning of the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most write requests committed in one transaction.
    pub batch_max: usize,
    /// How long the writer waits for more requests after the first one before committing.
    pub linger: Duration,
    /// Idle read connections kept open.
    pub readers: usize,
    /// Consecutive failures / successes that flip a series' state (`--fail-after`, `--recover-after`).
    pub policy: Policy,
    /// Raw results older than this are deleted (`--retention`).
    pub retention: Duration,
    /// Rollups older than this are deleted (`--rollup-retention`).
    pub rollup_retention: Duration,
    /// Most rows per table one prune round deletes (small, so ingest never waits long).
    pub prune_batch: usize,
    /// How long committed results' rollups and series state may wait in the writer's buffer
    /// before they are written (reads of either write them first, so no reader misses them).
    pub buffer_flush: Duration,
    /// Most rollup and series rows buffered before they are written regardless of `buffer_flush`.
    pub buffer_max: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            batch_max: 512,
            linger: Duration::from_millis(2),
            readers: 4,
            policy: Policy::default(),
            retention: Duration::from_secs(14 * 86_400),
            rollup_retention: Duration::from_secs(400 * 86_400),
            prune_batch: 2000,
            buffer_flush: Duration::from_secs(2),
            buffer_max: 50_000,
        }
    }
}

/// Counters of the writer, for tests and `/metrics`.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Committed (or failed) transactions: one per batch.
    pub transactions: AtomicU64,
    pub requests: AtomicU64,
    /// Results inserted (committed).
    pub results_stored: AtomicU64,
    /// Results skipped as already stored (seq at or below the agent's high-water mark).
    pub duplicates: AtomicU64,
    /// Time spent applying and committing batches, in microseconds.
    pub commit_micros: AtomicU64,
    /// Transactions that wrote the writer's buffer (rollups and series rows).
    pub buffer_flushes: AtomicU64,
    /// Rollup rows and series rows the writer holds, not yet written.
    pub buffered: AtomicU64,
}

/// Capacity of the state-change broadcast; a slower watcher skips (and is told how many).
const EVENTS_CAPACITY: usize = 1024;

/// A central or agent-local target as stored (JSON in the `spec` column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct TargetDef {
    pub name: String,
    pub checks: Vec<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub regions: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub ports: BTreeMap<String, u32>,
    pub require_tls: bool,
    pub kind: String,
}

impl TargetDef {
    /// The stored form of a target [`validate`](mxscope_proto::target::validate)d into canonical
    /// form (names as the wire spells them).
    pub fn from_target(t: &Target) -> Self {
        TargetDef {
            name: t.name.clone(),
            checks: t.checks.iter().map(|c| c.name().to_string()).collect(),
            interval_ms: millis(t.interval),
            timeout_ms: millis(t.timeout),
            regions: t.regions.clone(),
            labels: t.labels.clone(),
            ports: t
                .ports
                .iter()
                .map(|(c, p)| (c.name().to_string(), u32::from(*p)))
                .collect(),
            require_tls: t.require_tls,
            kind: t.kind.name().to_string(),
        }
    }

    /// Reads the wire form (the `source` field is not stored).
    pub fn from_wire(t: &pb::TargetSpec) -> Self {
        TargetDef {
            name: t.name.clone(),
            checks: t.checks.clone(),
            interval_ms: t.interval_ms,
            timeout_ms: t.timeout_ms,
            regions: t.regions.clone(),
            labels: t
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ports: t.ports.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            require_tls: t.require_tls,
            kind: t.kind.clone(),
        }
    }

    /// The wire form, marked with its source (`central` or `local`).
    pub fn to_wire(&self, source: &str) -> pb::TargetSpec {
        pb::TargetSpec {
            name: self.name.clone(),
            checks: self.checks.clone(),
            interval_ms: self.interval_ms,
            timeout_ms: self.timeout_ms,
            regions: self.regions.clone(),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ports: self.ports.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            source: source.to_string(),
            require_tls: self.require_tls,
            kind: self.kind.clone(),
        }
    }
}

/// Label key that names the reporting agent on a listed local target.
pub const LOCAL_AGENT_LABEL: &str = "mxscope.agent";

/// What an agent says when it connects.
#[derive(Debug, Clone, Default)]
pub struct AgentHello {
    pub id: String,
    pub region: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    pub dropped_total: u64,
    pub local_targets: Vec<TargetDef>,
    pub at_us: i64,
}

/// One row of `agents`.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRow {
    pub id: String,
    pub region: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    pub first_seen_us: i64,
    pub last_seen_us: i64,
    pub stored_up_to_seq: u64,
    pub dropped_total: u64,
    pub spool_depth: u64,
}

/// Filters shared by status and results queries; empty strings match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub target: String,
    pub check: String,
    pub region: String,
    pub agent_id: String,
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    tx: std::sync::mpsc::Sender<writer::Msg>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    readers: Arc<read::Pool>,
    stats: Arc<WriterStats>,
    events: broadcast::Sender<pb::WatchEvent>,
    prune_batch: usize,
    /// Series ids the writer committed, for [`writer::Prepared::of`].
    series_dir: Arc<std::sync::RwLock<writer::SeriesDir>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates the database, then starts the writer thread.
    /// Blocking: call it from `spawn_blocking` in async code.
    pub fn open(path: &Path, opts: StoreOptions) -> Result<SqliteStore, StoreError> {
        let mut conn = open_write(path)?;
        schema::migrate_to(&mut conn, path, SCHEMA_VERSION)?;
        let stats = Arc::new(WriterStats::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let (events, _) = broadcast::channel(EVENTS_CAPACITY);
        let series_dir = Arc::new(std::sync::RwLock::new(writer::SeriesDir::default()));
        let handle = writer::spawn(
            conn,
            path,
            rx,
            opts.clone(),
            stats.clone(),
            events.clone(),
            series_dir.clone(),
        )?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            tx,
            writer: Arc::new(Mutex::new(Some(handle))),
            readers: Arc::new(read::Pool::new(path.to_path_buf(), opts.readers)),
            stats,
            events,
            prune_batch: opts.prune_batch,
            series_dir,
        })
    }

    /// State changes of series (ok ⇄ failing), sent after their transaction committed.
    pub fn subscribe(&self) -> broadcast::Receiver<pb::WatchEvent> {
        self.events.subscribe()
    }

    /// One round of the retention job; resolves to the rows deleted (a full round deletes
    /// `prune_batch` rows from some table: call again).
    pub fn prune(&self, now_us: i64) -> Pending<u64> {
        let fut = self.submit(Op::Prune { now_us });
        Box::pin(async move {
            match fut.await? {
                Reply::Pruned(n) => Ok(n),
                _ => Err(StoreError::OutOfRange("writer reply")),
            }
        })
    }

    /// Prunes in rounds until a round deletes less than a full batch per table, yielding between
    /// rounds so ingest interleaves. Returns the rows deleted.
    pub async fn prune_all(&self, now_us: i64, batch: usize) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let n = self.prune(now_us).await?;
            total += n;
            if n < batch.max(1) as u64 {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Every series with its hysteresis state, latest facts and its agent's last-seen time.
    pub async fn series(&self, filter: Filter) -> Result<Vec<SeriesRow>, StoreError> {
        self.sync().await?;
        self.read(move |c| read::series(c, &filter)).await
    }

    /// Rollups of the window starting at `since_us` (see [`rollup::plan`]) merged per series;
    /// `phase` limits which sketches are decoded (`None`: all; `Some("")`: none, counts only).
    pub async fn rollups(
        &self,
        filter: Filter,
        since_us: i64,
        now_us: i64,
        phase: Option<String>,
    ) -> Result<BTreeMap<SeriesId, Agg>, StoreError> {
        if rollup::plan(since_us, now_us).is_some() {
            self.sync().await?;
        }
        self.read(move |c| read::rollups(c, &filter, since_us, now_us, phase.as_deref()))
            .await
    }

    /// Writes the rollups and series state of every committed result that the writer still
    /// buffers (no-op when it buffers none). The reads of either do this themselves.
    pub async fn sync(&self) -> Result<(), StoreError> {
        if self.stats.buffered.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        match self.submit(Op::Sync).await? {
            Reply::Done => Ok(()),
            _ => Err(StoreError::OutOfRange("writer reply")),
        }
    }

    /// Writer counters.
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Commits everything queued so far, stops the writer thread and waits for it. Later writes fail
    /// with [`StoreError::WriterClosed`].
    pub async fn close(&self) -> Result<(), StoreError> {
        let _ = self.tx.send(writer::Msg::Close);
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            tokio::task::spawn_blocking(move || {
                if handle.join().is_err() {
                    tracing::error!("database writer thread panicked");
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Queues a write now; the returned future resolves after its transaction committed.
    fn submit(&self, op: Op) -> Pending<Reply> {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(writer::Msg::Write(Request { op, reply }));
        Box::pin(async move {
            sent.map_err(|_| StoreError::WriterClosed)?;
            rx.await.map_err(|_| StoreError::WriterClosed)?
        })
    }

    /// Records a connecting agent and its local targets; resolves to its stored-up-to seq.
    pub fn register_agent(&self, hello: AgentHello) -> Pending<u64> {
        let fut = self.submit(Op::Hello(hello));
        Box::pin(async move { fut.await?.seq() })
    }

    /// Queues results of one agent (ascending seq; seq <= the agent's high-water mark are skipped
    /// as duplicates). Resolves to the high-water mark after the commit.
    pub fn store_results(
        &self,
        agent_id: &str,
        region: &str,
        results: Vec<pb::ProbeResult>,
        at_us: i64,
    ) -> Pending<u64> {
        let raw: Vec<Bytes> = results
            .iter()
            .map(|r| Bytes::from(prost::Message::encode_to_vec(r)))
            .collect();
        let views = raw
            .iter()
            .map(|b| ResultView::parse(b))
            .collect::<Result<Vec<_>, _>>();
        match views {
            Ok(views) => Store::put_batch(
                self,
                agent_id,
                region,
                &views,
                raw.clone(),
                Vec::new(),
                at_us,
            ),
            Err(_) => Box::pin(async { Err(StoreError::OutOfRange("encoded result")) }),
        }
    }

    /// Adds (`update = false`) or replaces (`update = true`) a central target.
    pub fn put_target(&self, def: TargetDef, update: bool, at_us: i64) -> Pending<()> {
        let fut = self.submit(Op::PutTarget { def, update, at_us });
        Box::pin(async move { fut.await.map(|_| ()) })
    }

    /// Removes a central target; its results stay.
    pub fn remove_target(&self, name: &str) -> Pending<()> {
        let fut = self.submit(Op::RemoveTarget {
            name: name.to_string(),
        });
        Box::pin(async move { fut.await.map(|_| ()) })
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || pool.with(f)).await?
    }

    /// All central targets, by name.
    pub async fn central_targets(&self) -> Result<Vec<TargetDef>, StoreError> {
        self.read(read::central_targets).await
    }

    /// All agent-local targets as (agent id, region, target).
    pub async fn local_targets(&self) -> Result<Vec<(String, String, TargetDef)>, StoreError> {
        self.read(read::local_targets).await
    }

    /// All agents, by id.
    pub async fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        self.read(read::agents).await
    }

    /// Count of results per agent that started at or after `since_us`.
    pub async fn results_per_agent(
        &self,
        since_us: i64,
    ) -> Result<BTreeMap<String, u64>, StoreError> {
        self.read(move |c| read::results_per_agent(c, since_us))
            .await
    }

    /// Series matching the filter and the samples of their windows (results since `since_us`).
    pub async fn status_input(
        &self,
        filter: Filter,
        since_us: i64,
    ) -> Result<(Vec<SeriesRow>, Vec<Sample>), StoreError> {
        self.sync().await?;
        self.read(move |c| read::status_input(c, &filter, since_us))
            .await
    }

    /// Stored results, newest first.
    pub async fn results(
        &self,
        filter: Filter,
        since_us: i64,
        limit: u32,
    ) -> Result<Vec<pb::StoredResult>, StoreError> {
        self.read(move |c| read::results(c, &filter, since_us, limit))
            .await
    }
}

impl StoreError {
    /// True when SQLite said the disk is full (`SQLITE_FULL`), judged by the error code.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::DiskFull { .. } => true,
            StoreError::Sqlite(e) | StoreError::Open { source: e, .. } => is_sqlite_full(e),
            StoreError::Migrate { source, .. } => is_sqlite_full(source),
            StoreError::Commit(e) => is_sqlite_full(e),
            _ => false,
        }
    }
}

/// `SQLITE_FULL` by its primary result code (never by message text).
pub(crate) fn is_sqlite_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

impl Reply {
    fn seq(self) -> Result<u64, StoreError> {
        match self {
            Reply::Seq(n) => Ok(n),
            Reply::Pruned(_) | Reply::Done => Err(StoreError::OutOfRange("writer reply")),
        }
    }
}

/// Opens the write connection: WAL, `synchronous=NORMAL` (see the module docs), busy timeout.
fn open_write(path: &Path) -> Result<Connection, StoreError> {
    let open = || -> Result<Connection, rusqlite::Error> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // 16 KiB pages for a new database (an existing one keeps its own): shallower b-trees and
        // fewer page splits for the appends of ingest, ≈ 20 % more inserts/s measured with this
        // schema's rows. Must precede the first write, so it comes before the journal mode.
        conn.pragma_update(None, "page_size", 16_384)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(journal_mode = %mode, "database is not in wal mode");
        }
        // NORMAL in WAL mode: COMMIT returns once the transaction is in the WAL (fsync at
        // checkpoints only), so it survives a process crash; acks are sent only after COMMIT
        // returned, so an acked result is never lost to a collector crash (see the module docs).
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Ingest-sized caches: a 128 MiB page cache keeps the b-tree pages the inserts and rollup
        // upserts touch (the 2 MiB default re-read them from the OS on every batch), reads of the
        // main file go through a shared mapping, temp b-trees stay in memory, and the WAL is
        // checkpointed every 32 MiB instead of every 4 MiB. None of these affects durability.
        conn.pragma_update(None, "cache_size", -131_072)?;
        let _: i64 = conn.query_row("PRAGMA mmap_size=1073741824", [], |r| r.get(0))?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        let _: i64 = conn.query_row("PRAGMA wal_autocheckpoint=8192", [], |r| r.get(0))?;
        // A write proves the file is writable now, not at the first batch.
        conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")?;
        Ok(conn)
    };
    open().map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// The retention job: right away and then every `every`, prunes in small rounds until caught up
/// (see [`SqliteStore::prune_all`]); stops when `stop` is cancelled or the store closed.
pub async fn retention_job(
    store: SqliteStore,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let batch = store.prune_batch;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.prune_all(now_us(), batch).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "retention: old results and rollups deleted"),
            Err(StoreError::WriterClosed) => return,
            Err(err) => tracing::warn!(error = %err, "retention round failed"),
        }
    }
}

/// Adds to a counter (relaxed: statistics only).
fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests;
