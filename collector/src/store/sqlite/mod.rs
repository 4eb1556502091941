//! The SQLite backend: [`SqliteStore`], in WAL mode. One writer thread owns the write
//! connection and commits requests in batches; reads use a small pool of read-only connections
//! on `spawn_blocking`.
//!
//! Durability: `synchronous=NORMAL` in WAL mode means a commit is durable against a process crash
//! (the WAL is written before COMMIT returns) but the last commits may be lost on power failure.
//! Every write request is answered only after its COMMIT returned, and the ingest acks only then.

mod error;
mod read;
mod schema;
mod target;
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
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{broadcast, oneshot};

use super::rollup;
use super::{
    AgentHello, AgentRow, Filter, Pending, Sample, SeriesId, SeriesRow, Store, StoreError,
    StoreOptions, WriterStats,
};
use crate::analysis::aggregate::Agg;

use error::is_sqlite_full;
pub use error::SqliteError;
// Shared with the PostgreSQL backend: the stored forms of facts and targets.
pub(crate) use read::{facts_text, facts_to_json};
pub use schema::SCHEMA_VERSION;
pub(crate) use target::{
    from_json as target_from_json, to_json as target_to_json, Stored as StoredTarget,
};
use writer::{Op, Reply, Request};

/// Capacity of the state-change broadcast; a slower watcher skips (and is told how many).
const EVENTS_CAPACITY: usize = 1024;

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    tx: std::sync::mpsc::Sender<writer::Msg>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    readers: Arc<read::Pool>,
    stats: Arc<WriterStats>,
    events: broadcast::Sender<pb::WatchEvent>,
    /// Central target changes, sent after their commit.
    targets: broadcast::Sender<()>,
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
            targets: broadcast::channel(16).0,
            prune_batch: opts.prune_batch,
            series_dir,
        })
    }

    /// State changes of series (ok ⇄ failing), sent after their transaction committed.
    pub fn subscribe(&self) -> broadcast::Receiver<pb::WatchEvent> {
        self.events.subscribe()
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

    /// Per bucket and series aggregates of the window (see [`Store::history`]).
    pub async fn history(
        &self,
        filter: Filter,
        since_us: i64,
        now_us: i64,
        phase: Option<String>,
    ) -> Result<Vec<(i64, SeriesId, Agg)>, StoreError> {
        if rollup::plan(since_us, now_us).is_some() {
            self.sync().await?;
        }
        self.read(move |c| read::history(c, &filter, since_us, now_us, phase.as_deref()))
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
    pub fn put_target(&self, target: Target, update: bool, at_us: i64) -> Pending<()> {
        let fut = self.submit(Op::PutTarget {
            target: Box::new(target),
            update,
            at_us,
        });
        let targets = self.targets.clone();
        Box::pin(async move {
            fut.await?;
            let _ = targets.send(());
            Ok(())
        })
    }

    /// Removes a central target; its results stay.
    pub fn remove_target(&self, name: &str) -> Pending<()> {
        let fut = self.submit(Op::RemoveTarget {
            name: name.to_string(),
        });
        let targets = self.targets.clone();
        Box::pin(async move {
            fut.await?;
            let _ = targets.send(());
            Ok(())
        })
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
    pub async fn central_targets(&self) -> Result<Vec<Target>, StoreError> {
        self.read(read::central_targets).await
    }

    /// All agent-local targets as (agent id, region, target).
    pub async fn local_targets(&self) -> Result<Vec<(String, String, Target)>, StoreError> {
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
    open().map_err(|source| {
        StoreError::from(SqliteError::Open {
            path: path.to_path_buf(),
            source,
        })
    })
}

impl Store for SqliteStore {
    fn subscribe(&self) -> broadcast::Receiver<pb::WatchEvent> {
        SqliteStore::subscribe(self)
    }
    fn register_agent(&self, hello: AgentHello) -> Pending<u64> {
        SqliteStore::register_agent(self, hello)
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
        // Row encoding, series keys and rollup aggregation run here, in the caller's task, so
        // the single writer thread only binds, steps and merges.
        let prepared = {
            let dir = self
                .series_dir
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            writer::Prepared::of(region, results, &dir)
        };
        let fut = self.submit(Op::Results {
            agent_id: agent_id.to_string(),
            prepared,
            results: raw,
            rejected,
            at_us,
        });
        Box::pin(async move { fut.await?.seq() })
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
        SqliteStore::put_target(self, target, update, at_us)
    }
    fn remove_target(&self, name: &str) -> Pending<()> {
        SqliteStore::remove_target(self, name)
    }
    fn target_changes(&self) -> broadcast::Receiver<()> {
        self.targets.subscribe()
    }
    fn central_targets(&self) -> Pending<Vec<Target>> {
        let s = self.clone();
        Box::pin(async move { s.central_targets().await })
    }
    fn local_targets(&self) -> Pending<Vec<(String, String, Target)>> {
        let s = self.clone();
        Box::pin(async move { s.local_targets().await })
    }
    fn agents(&self) -> Pending<Vec<AgentRow>> {
        let s = self.clone();
        Box::pin(async move { s.agents().await })
    }
    fn results_per_agent(&self, since_us: i64) -> Pending<BTreeMap<String, u64>> {
        let s = self.clone();
        Box::pin(async move { s.results_per_agent(since_us).await })
    }
    fn series(&self, filter: Filter) -> Pending<Vec<SeriesRow>> {
        let s = self.clone();
        Box::pin(async move { s.series(filter).await })
    }
    fn rollups(
        &self,
        filter: Filter,
        since_us: i64,
        now_us: i64,
        phase: Option<String>,
    ) -> Pending<BTreeMap<SeriesId, Agg>> {
        let s = self.clone();
        Box::pin(async move { s.rollups(filter, since_us, now_us, phase).await })
    }
    fn history(
        &self,
        filter: Filter,
        since_us: i64,
        now_us: i64,
        phase: Option<String>,
    ) -> Pending<Vec<(i64, SeriesId, Agg)>> {
        let s = self.clone();
        Box::pin(async move { s.history(filter, since_us, now_us, phase).await })
    }
    fn status_input(
        &self,
        filter: Filter,
        since_us: i64,
    ) -> Pending<(Vec<SeriesRow>, Vec<Sample>)> {
        let s = self.clone();
        Box::pin(async move { s.status_input(filter, since_us).await })
    }
    fn results(&self, filter: Filter, since_us: i64, limit: u32) -> Pending<Vec<pb::StoredResult>> {
        let s = self.clone();
        Box::pin(async move { s.results(filter, since_us, limit).await })
    }
    fn changes(&self, target: &str, since_us: i64, limit: u32) -> Pending<Vec<pb::WatchEvent>> {
        let s = self.clone();
        let target = target.to_string();
        Box::pin(async move {
            s.read(move |c| read::changes(c, &target, since_us, limit))
                .await
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
        self.prune_batch
    }
    fn stats(&self) -> &WriterStats {
        &self.stats
    }
    fn close(&self) -> Pending<()> {
        let s = self.clone();
        Box::pin(async move { SqliteStore::close(&s).await })
    }
}

/// Adds to a counter (relaxed: statistics only).
fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests;
