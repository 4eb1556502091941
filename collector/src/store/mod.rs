//! Storage, the part every backend shares: the [`Store`] seam the services hold as
//! `Arc<dyn Store>`, its row, filter and error types, and the retention job. The backends live
//! below it: [`sqlite`], the embedded default, and [`postgres`], for several collectors on one
//! database (`--db postgres://…`).

mod api;
pub mod postgres;
mod retention;
pub mod rollup;
pub mod row;
pub mod sqlite;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use mxscope_proto::target::{Target, TargetError};

use crate::analysis::hysteresis::Policy;
pub use crate::analysis::series::{Sample, SeriesId, SeriesRow};

pub use api::{Pending, Store};
pub use retention::{prune_all, retention_job};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite refused to open, migrate, run a statement or commit.
    #[error(transparent)]
    Sqlite(#[from] sqlite::SqliteError),
    /// PostgreSQL refused to connect, migrate, run a statement or commit.
    #[error(transparent)]
    Postgres(#[from] postgres::PgError),
    #[error("database '{}' has schema version {found}, newer than this collector supports ({supported}); upgrade mxscope-collector or use another --db", path.display())]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
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
    /// A stored central target this version refuses (a newer collector or a hand edit wrote it).
    #[error("stored target '{name}' is not a valid target definition for this collector")]
    BadTarget {
        name: String,
        #[source]
        source: TargetError,
    },
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
    /// Series the writer holds in memory (state and latest result).
    pub series_in_memory: AtomicU64,
    /// Series dropped from memory after a retention's silence (their rows stay).
    pub series_evicted: AtomicU64,
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
    /// Validated by the ingest ([`validate_from`](mxscope_proto::target::validate_from)).
    pub local_targets: Vec<Target>,
    pub at_us: i64,
    /// The collector taking the session (its `--name`).
    pub collector: String,
    /// When the session's client certificate expires (µs; `None` without mTLS).
    pub cert_not_after_us: Option<i64>,
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
    /// The collector that took the agent's latest session (its `--name`).
    pub collector: String,
    /// When the certificate of its latest session expires (µs; `None` without mTLS).
    pub cert_not_after_us: Option<i64>,
}

/// Filters shared by status and results queries; empty strings match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub target: String,
    pub check: String,
    pub region: String,
    pub agent_id: String,
}

impl Filter {
    /// The non-empty fields among `columns` (field name, SQL column) as (column, value): what each
    /// backend turns into `AND column = <placeholder>`.
    pub(crate) fn set_columns<'s, 'c>(
        &'s self,
        columns: &[(&str, &'c str)],
    ) -> Vec<(&'c str, &'s String)> {
        columns
            .iter()
            .filter_map(|(field, column)| {
                let v = match *field {
                    "target" => &self.target,
                    "check" => &self.check,
                    "region" => &self.region,
                    "agent_id" => &self.agent_id,
                    _ => return None,
                };
                (!v.is_empty()).then_some((*column, v))
            })
            .collect()
    }
}

impl StoreError {
    /// True when the disk holding the data is full, judged by the backend's error codes.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::DiskFull { .. } => true,
            StoreError::Sqlite(e) => e.is_disk_full(),
            StoreError::Postgres(e) => e.is_disk_full(),
            _ => false,
        }
    }
}
