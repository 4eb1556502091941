//! The storage seam: [`Store`], the operations the services (ingest, query, `/metrics`) and the
//! retention job use, implemented by [`SqliteStore`](super::sqlite::SqliteStore) and
//! [`PgStore`](super::postgres::PgStore).
//! Every operation returns a boxed future ([`Pending`]): the trait is object safe, and a write's
//! future is the one the SQLite writer hands out anyway.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use mxscope_proto::pb;
use mxscope_proto::raw::ResultView;
use mxscope_proto::target::Target;
use tokio::sync::broadcast;

use super::{AgentHello, AgentRow, Filter, Sample, SeriesId, SeriesRow, StoreError, WriterStats};
use crate::analysis::aggregate::Agg;

/// A store operation under way; resolves once done (for a write: once durable).
pub type Pending<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// What the collector's services need from storage.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// State changes of series, as they commit.
    fn subscribe(&self) -> broadcast::Receiver<pb::WatchEvent>;
    /// Records a connecting agent and its local targets; resolves to its stored-up-to seq.
    fn register_agent(&self, hello: AgentHello) -> Pending<u64>;
    /// Stores a batch of one agent as received (`raw` encoded, `results` the same read in place;
    /// `rejected` the seqs the ingest limits refused). Resolves to the agent's high-water mark.
    fn put_batch(
        &self,
        agent_id: &str,
        region: &str,
        results: &[ResultView<'_>],
        raw: Vec<Bytes>,
        rejected: Vec<u64>,
        at_us: i64,
    ) -> Pending<u64>;
    /// Records a heartbeat.
    fn heartbeat(
        &self,
        agent_id: &str,
        spool_depth: u64,
        dropped_total: u64,
        at_us: i64,
    ) -> Pending<()>;
    /// Adds (`update = false`) or replaces (`update = true`) a central target.
    fn put_target(&self, target: Target, update: bool, at_us: i64) -> Pending<()>;
    /// Removes a central target; its results stay.
    fn remove_target(&self, name: &str) -> Pending<()>;
    /// Central target changes as they commit (on PostgreSQL: those of every collector on the
    /// database), so sessions resend their agents' schedules.
    fn target_changes(&self) -> broadcast::Receiver<()>;
    /// All central targets, by name.
    fn central_targets(&self) -> Pending<Vec<Target>>;
    /// All agent-local targets as (agent id, region, target).
    fn local_targets(&self) -> Pending<Vec<(String, String, Target)>>;
    /// All agents, by id.
    fn agents(&self) -> Pending<Vec<AgentRow>>;
    /// Count of results per agent that started at or after `since_us`.
    fn results_per_agent(&self, since_us: i64) -> Pending<BTreeMap<String, u64>>;
    /// Every series matching the filter with its state and latest facts.
    fn series(&self, filter: Filter) -> Pending<Vec<SeriesRow>>;
    /// Aggregates of the window from `since_us` merged per series; `phase` limits which
    /// sketches are decoded (`None`: all; `Some("")`: none).
    fn rollups(
        &self,
        filter: Filter,
        since_us: i64,
        now_us: i64,
        phase: Option<String>,
    ) -> Pending<BTreeMap<SeriesId, Agg>>;
    /// The window from `since_us` per bucket and series, oldest bucket first: minute buckets of
    /// the raw results for windows up to 3 hours, else the rows of the level [`plan`] reads
    /// (hour, day or week). `phase` as for [`rollups`](Store::rollups).
    ///
    /// [`plan`]: super::rollup::plan
    fn history(
        &self,
        filter: Filter,
        since_us: i64,
        now_us: i64,
        phase: Option<String>,
    ) -> Pending<Vec<(i64, SeriesId, Agg)>>;
    /// Series matching the filter and the samples of their windows (results since `since_us`).
    fn status_input(&self, filter: Filter, since_us: i64)
        -> Pending<(Vec<SeriesRow>, Vec<Sample>)>;
    /// Stored results, newest first.
    fn results(&self, filter: Filter, since_us: i64, limit: u32) -> Pending<Vec<pb::StoredResult>>;
    /// The state changes of `target`'s series from `since_us`, newest first, at most `limit`
    /// (kept as long as the rollups).
    fn changes(&self, target: &str, since_us: i64, limit: u32) -> Pending<Vec<pb::WatchEvent>>;
    /// One round of the retention job: deletes raw results and rollups past their retention,
    /// at most [`prune_batch`](Store::prune_batch) rows per table; resolves to the rows deleted.
    fn prune(&self, now_us: i64) -> Pending<u64>;
    /// Most rows per table one [`prune`](Store::prune) round deletes: a round that deletes fewer
    /// rows in all has caught up.
    fn prune_batch(&self) -> usize;
    /// Counters of the write path, for `/metrics`.
    fn stats(&self) -> &WriterStats;
    /// Commits everything queued so far and stops the backend's threads; later writes fail with
    /// [`StoreError::WriterClosed`].
    fn close(&self) -> Pending<()>;
}
