//! The collector's writer task on PostgreSQL: takes write requests from a channel, applies up to
//! `batch_max` of them in one transaction and answers each only after COMMIT returned.
//!
//! What makes several collectors on one database safe, in each transaction: the agents' rows are
//! locked (`FOR UPDATE`, in id order) before their high-water marks are read, so a batch an agent
//! re-sends through another collector waits for the first commit and then skips what it stored;
//! the series rows are locked the same way before their hysteresis is read and written; rollup
//! rows belong to one writer (a random id per collector process), so their sketches are merged
//! in this task's memory and upserted whole, and reads merge the writers' rows. State changes and
//! target changes are sent with `pg_notify`, delivered to every collector at commit.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use deadpool_postgres::Transaction;
use mxscope_proto::pb;
use mxscope_proto::raw::ResultView;
use mxscope_proto::target::Target;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;

use super::{schema, PgError, DAY_US, EVENTS_CHANNEL, PARTITION_LOCK, TARGETS_CHANNEL};
use crate::analysis::aggregate::Agg;
use crate::analysis::hysteresis::{Hysteresis, Policy};
use crate::store::rollup::Level;
use crate::store::row::{endpoint_label, state_event, ResultRow};
use crate::store::sqlite::{facts_to_json, target_to_json};
use crate::store::{AgentHello, StoreError, StoreOptions, WriterStats};

/// A write operation.
pub(super) enum Op {
    Hello(AgentHello),
    Results {
        agent_id: String,
        prepared: Prepared,
        /// The results as received, read again for a state change's event and for a batch
        /// with duplicates.
        raw: Vec<Bytes>,
        rejected: Vec<u64>,
        at_us: i64,
    },
    Heartbeat {
        agent_id: String,
        spool_depth: u64,
        dropped_total: u64,
        at_us: i64,
    },
    PutTarget {
        target: Box<Target>,
        update: bool,
        at_us: i64,
    },
    RemoveTarget {
        name: String,
    },
    Prune {
        now_us: i64,
    },
}

impl Op {
    fn rows(&self) -> usize {
        match self {
            Op::Results { raw, .. } => raw.len().max(1),
            _ => 1,
        }
    }
}

pub(super) enum Reply {
    Seq(u64),
    Pruned(u64),
    Done,
}

pub(super) struct Request {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Reply, StoreError>>,
}

pub(super) enum Msg {
    Write(Request),
    Close,
}

/// A batch holding this many result rows is committed without waiting `linger` for more.
const LINGER_BELOW_ROWS: usize = 500;
/// Whole-batch retries after PostgreSQL aborted the transaction to break a deadlock.
const DEADLOCK_RETRIES: usize = 3;

/// A series' names, the key of `series`' unique index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct SeriesKey {
    pub target: String,
    pub endpoint: String,
    pub check: String,
    pub region: String,
}

/// A series of a batch: its id when known, else its key and endpoint parts.
pub(super) enum SeriesRef {
    Known(i64),
    New {
        key: SeriesKey,
        host: String,
        ip: String,
        port: i32,
        family: i32,
    },
}

/// The per-result work that needs no database, done in the caller's task.
pub(super) struct Prepared {
    pub region: String,
    pub series: Vec<SeriesRef>,
    /// Per result: index into `series`, its row, its interval.
    pub rows: Vec<(u32, ResultRow, u64)>,
    /// Hour aggregates of all results by (bucket, index into `series`).
    pub hours: Vec<(i64, u32, Agg)>,
    pub ascending: bool,
}

impl Prepared {
    pub(super) fn of(
        region: &str,
        results: &[ResultView<'_>],
        ids: &RwLock<HashMap<SeriesKey, i64>>,
    ) -> Prepared {
        let ids = ids
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut index: HashMap<SeriesKey, u32> = HashMap::new();
        let mut series = Vec::new();
        let mut rows = Vec::with_capacity(results.len());
        let mut hours: HashMap<(i64, u32), Agg> = HashMap::new();
        for r in results {
            let key = SeriesKey {
                target: r.target.to_string(),
                endpoint: endpoint_label(r),
                check: r.check.to_string(),
                region: region.to_string(),
            };
            let k = match index.get(&key) {
                Some(k) => *k,
                None => {
                    let k = series.len() as u32;
                    series.push(match ids.get(&key) {
                        Some(id) => SeriesRef::Known(*id),
                        None => {
                            let e = r.endpoint.as_ref();
                            SeriesRef::New {
                                key: key.clone(),
                                host: e.map_or(r.target, |e| e.host).to_string(),
                                ip: e.map_or("", |e| e.ip).to_string(),
                                port: e.map_or(0, |e| i32::try_from(e.port).unwrap_or(0)),
                                family: e.map_or(0, |e| e.family),
                            }
                        }
                    });
                    index.insert(key, k);
                    k
                }
            };
            hours
                .entry((Level::Hour.bucket(r.start_us), k))
                .or_default()
                .add_view(r);
            rows.push((k, ResultRow::of_view(r), r.interval_ms));
        }
        Prepared {
            region: region.to_string(),
            series,
            rows,
            hours: hours.into_iter().map(|((b, k), a)| (b, k, a)).collect(),
            ascending: results.windows(2).all(|w| w[0].seq < w[1].seq),
        }
    }
}

/// One series row's state, read under its row lock.
#[derive(Debug, Clone, Default)]
struct SeriesState {
    hyst: Hysteresis,
    state_since_us: i64,
    last_outcome: i32,
    last_seen_us: i64,
    interval_ms: i64,
    agent_id: String,
    last_error: String,
    last_message: String,
    last_phase: String,
    last_facts: String,
}

/// A rollup row's key: level, bucket start, series id.
type RollupKey = (Level, i64, i64);

pub(super) struct Writer {
    pub pool: deadpool_postgres::Pool,
    pub opts: StoreOptions,
    pub stats: Arc<WriterStats>,
    pub writer_id: i64,
    pub ids: Arc<RwLock<HashMap<SeriesKey, i64>>>,
    /// This writer's rollup rows (it is their only writer), as last committed.
    pub rollups: HashMap<RollupKey, Agg>,
    /// Days whose `results` partition exists.
    pub partitions: BTreeSet<i64>,
}

/// What one transaction changed that the writer keeps after COMMIT.
#[derive(Default)]
struct Delta {
    ids: Vec<(SeriesKey, i64)>,
    rollups: HashMap<RollupKey, Agg>,
    stored: u64,
    duplicates: u64,
}

impl Writer {
    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let batch_max = self.opts.batch_max.max(1);
        let mut closing = false;
        while !closing {
            let first = match rx.recv().await {
                Some(Msg::Write(r)) => r,
                Some(Msg::Close) | None => break,
            };
            let mut rows = first.op.rows();
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + self.opts.linger;
            while batch.len() < batch_max {
                let next = match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                    Err(mpsc::error::TryRecvError::Empty) if rows >= LINGER_BELOW_ROWS => break,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(m) => m,
                            Err(_) => break,
                        }
                    }
                };
                match next {
                    Some(Msg::Write(r)) => {
                        rows += r.op.rows();
                        batch.push(r);
                    }
                    Some(Msg::Close) | None => {
                        closing = true;
                        break;
                    }
                }
            }
            self.commit(batch).await;
        }
    }

    async fn commit(&mut self, batch: Vec<Request>) {
        let started = Instant::now();
        let (prunes, writes): (Vec<Request>, Vec<Request>) = batch
            .into_iter()
            .partition(|r| matches!(r.op, Op::Prune { .. }));
        if !writes.is_empty() {
            self.stats
                .requests
                .fetch_add(writes.len() as u64, Ordering::Relaxed);
            let (ops, replies): (Vec<Op>, Vec<_>) =
                writes.into_iter().map(|r| (r.op, r.reply)).unzip();
            match self.write(&ops).await {
                Ok((answers, delta)) => {
                    self.keep(delta);
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(answer);
                    }
                }
                Err(e) => {
                    // The requests get the error and their callers log its chain; here its detail.
                    tracing::warn!(error = ?e, "PostgreSQL transaction failed: nothing of the batch is acked");
                    // A COMMIT whose answer was lost may still have committed: this writer's
                    // rollup rows are read back from the database before their next write.
                    self.rollups.clear();
                    let e = Arc::new(e);
                    for reply in replies {
                        let _ = reply.send(Err(StoreError::Postgres(PgError::Batch(e.clone()))));
                    }
                }
            }
            self.stats.transactions.fetch_add(1, Ordering::Relaxed);
        }
        for r in prunes {
            let Op::Prune { now_us } = r.op else {
                continue;
            };
            let _ = r.reply.send(self.prune(now_us).await.map(Reply::Pruned));
        }
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats
            .commit_micros
            .fetch_add(micros, Ordering::Relaxed);
    }

    /// After COMMIT: the new series ids and this writer's rollup rows; memory of buckets no
    /// late result is likely to reach is dropped (a late one reads its row back).
    fn keep(&mut self, delta: Delta) {
        self.stats
            .results_stored
            .fetch_add(delta.stored, Ordering::Relaxed);
        self.stats
            .duplicates
            .fetch_add(delta.duplicates, Ordering::Relaxed);
        if !delta.ids.is_empty() {
            let mut ids = self
                .ids
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            ids.extend(delta.ids);
            self.stats
                .series_in_memory
                .store(ids.len() as u64, Ordering::Relaxed);
        }
        self.rollups.extend(delta.rollups);
        if self.rollups.len() > self.opts.buffer_max {
            let now = mxscope_proto::time::now_us();
            self.rollups
                .retain(|(level, bucket, _), _| *bucket >= level.bucket(now) - level.width_us());
        }
    }

    /// Runs the batch's transaction, retried whole when PostgreSQL broke a deadlock by aborting it.
    async fn write(
        &mut self,
        ops: &[Op],
    ) -> Result<(Vec<Result<Reply, StoreError>>, Delta), StoreError> {
        self.ensure_partitions(ops).await?;
        let mut attempt = 0;
        loop {
            let mut client = self.client().await?;
            match self.transaction(&mut client, ops).await {
                Err(StoreError::Postgres(PgError::Statement(e)))
                    if attempt < DEADLOCK_RETRIES
                        && matches!(e.code(), Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
                            || *c == SqlState::T_R_SERIALIZATION_FAILURE) =>
                {
                    attempt += 1;
                    tracing::debug!(attempt, "transaction aborted to break a deadlock, retrying");
                }
                other => return other,
            }
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Postgres(PgError::Pool(e.to_string())))
    }

    /// Creates the partitions of the days the batch's results are stored on (and the next day),
    /// in their own transaction under an advisory lock, once per day and process.
    async fn ensure_partitions(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        let mut days = BTreeSet::new();
        for op in ops {
            if let Op::Results { at_us, .. } = op {
                let day = at_us.div_euclid(DAY_US) * DAY_US;
                days.insert(day);
                days.insert(day + DAY_US);
            }
        }
        days.retain(|d| !self.partitions.contains(d));
        if days.is_empty() {
            return Ok(());
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
            .await?;
        for &day in &days {
            tx.batch_execute(&schema::create_partition_sql(day)).await?;
            tx.execute(
                "INSERT INTO result_partitions (day_us, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&day, &schema::partition_name(day)],
            )
            .await?;
        }
        tx.commit().await?;
        self.partitions.extend(days);
        Ok(())
    }

    async fn transaction(
        &self,
        client: &mut deadpool_postgres::Object,
        ops: &[Op],
    ) -> Result<(Vec<Result<Reply, StoreError>>, Delta), StoreError> {
        let tx = client.transaction().await?;
        let mut delta = Delta::default();

        // Agents first, in id order: every collector takes these locks in the same order.
        let mut agent_ids: Vec<&str> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Results { agent_id, .. } | Op::Heartbeat { agent_id, .. } => {
                    Some(agent_id.as_str())
                }
                Op::Hello(h) => Some(h.id.as_str()),
                _ => None,
            })
            .collect();
        agent_ids.sort_unstable();
        agent_ids.dedup();
        let mut agents: HashMap<String, (i64, i64)> = HashMap::new();
        if !agent_ids.is_empty() {
            for r in tx
                .query(
                    &tx.prepare_cached(
                        "SELECT id, num, stored_up_to_seq FROM agents WHERE id = ANY($1)
                     ORDER BY id FOR UPDATE",
                    )
                    .await?,
                    &[&agent_ids],
                )
                .await?
            {
                agents.insert(r.get(0), (r.get(1), r.get(2)));
            }
        }

        // Series: the batch's new ones created (sorted by key), then every one locked in id
        // order and its state read.
        let mut new_keys: Vec<&SeriesRef> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Results { prepared, .. } => Some(prepared.series.iter()),
                _ => None,
            })
            .flatten()
            .filter(|s| matches!(s, SeriesRef::New { .. }))
            .collect();
        new_keys.sort_by(|a, b| key_of(a).cmp(&key_of(b)));
        new_keys.dedup_by(|a, b| key_of(a) == key_of(b));
        let mut resolved: HashMap<SeriesKey, i64> = HashMap::new();
        if !new_keys.is_empty() {
            resolved = create_series(&tx, &new_keys).await?;
            delta.ids = resolved.iter().map(|(k, v)| (k.clone(), *v)).collect();
        }
        let ids_of = |p: &Prepared| -> Result<Vec<i64>, StoreError> {
            p.series
                .iter()
                .map(|s| match s {
                    SeriesRef::Known(id) => Ok(*id),
                    SeriesRef::New { key, .. } => resolved
                        .get(key)
                        .copied()
                        .ok_or(StoreError::OutOfRange("series id")),
                })
                .collect()
        };
        let mut batch_ids: Vec<Vec<i64>> = Vec::new();
        let mut all_ids: Vec<i64> = Vec::new();
        for op in ops {
            if let Op::Results { prepared, .. } = op {
                let ids = ids_of(prepared)?;
                all_ids.extend(&ids);
                batch_ids.push(ids);
            }
        }
        all_ids.sort_unstable();
        all_ids.dedup();
        let mut state = lock_series(&tx, &all_ids).await?;

        let mut answers = Vec::with_capacity(ops.len());
        let mut events: Vec<pb::WatchEvent> = Vec::new();
        let mut touched: BTreeSet<i64> = BTreeSet::new();
        let mut targets_changed = false;
        let mut batch_ids = batch_ids.into_iter();
        for op in ops {
            let answer = match op {
                Op::Hello(h) => {
                    let (num, hwm) = hello(&tx, h).await?;
                    agents.insert(h.id.clone(), (num, hwm));
                    Ok(Reply::Seq(unsigned(hwm)))
                }
                Op::Results {
                    agent_id,
                    prepared,
                    raw,
                    rejected,
                    at_us,
                } => {
                    let ids = batch_ids.next().unwrap_or_default();
                    match agents.get_mut(agent_id.as_str()) {
                        None => Err(StoreError::UnknownAgent(agent_id.clone())),
                        Some(agent) => {
                            let mut batch = Batch {
                                state: &mut state,
                                touched: &mut touched,
                                events: &mut events,
                                rollups: &mut delta.rollups,
                                stored: 0,
                                duplicates: 0,
                            };
                            let seq = store_results(
                                &tx,
                                &mut batch,
                                (agent_id, agent),
                                (prepared, raw, &ids, rejected),
                                *at_us,
                                self.opts.policy,
                            )
                            .await?;
                            delta.stored += batch.stored;
                            delta.duplicates += batch.duplicates;
                            Ok(Reply::Seq(seq))
                        }
                    }
                }
                Op::Heartbeat {
                    agent_id,
                    spool_depth,
                    dropped_total,
                    at_us,
                } => {
                    let n = tx
                        .execute(
                            &tx.prepare_cached(
                                "UPDATE agents SET spool_depth = $1, dropped_total = $2,
                                 last_seen_us = GREATEST(last_seen_us, $3) WHERE id = $4",
                            )
                            .await?,
                            &[
                                &to_i64(*spool_depth)?,
                                &to_i64(*dropped_total)?,
                                at_us,
                                agent_id,
                            ],
                        )
                        .await?;
                    if n == 0 {
                        Err(StoreError::UnknownAgent(agent_id.clone()))
                    } else {
                        Ok(Reply::Done)
                    }
                }
                Op::PutTarget {
                    target,
                    update,
                    at_us,
                } => {
                    let r = put_target(&tx, target, *update, *at_us).await?;
                    targets_changed |= r.is_ok();
                    r
                }
                Op::RemoveTarget { name } => {
                    let n = tx
                        .execute(
                            &tx.prepare_cached("DELETE FROM targets WHERE name = $1")
                                .await?,
                            &[name],
                        )
                        .await?;
                    if n == 0 {
                        Err(StoreError::TargetNotFound(name.clone()))
                    } else {
                        targets_changed = true;
                        Ok(Reply::Done)
                    }
                }
                Op::Prune { .. } => Err(StoreError::OutOfRange("prune in a write batch")),
            };
            answers.push(answer);
        }
        write_series(&tx, &touched, &state).await?;
        self.write_rollups(&tx, &mut delta.rollups).await?;
        if !events.is_empty() {
            write_changes(&tx, &events).await?;
            let encoded: Vec<String> = events.iter().map(encode_event).collect();
            tx.execute(
                &tx.prepare_cached("SELECT pg_notify($1, e) FROM unnest($2::text[]) AS e")
                    .await?,
                &[&EVENTS_CHANNEL, &encoded],
            )
            .await?;
        }
        if targets_changed {
            tx.execute(
                &tx.prepare_cached("SELECT pg_notify($1, '')").await?,
                &[&TARGETS_CHANNEL],
            )
            .await?;
        }
        tx.commit()
            .await
            .map_err(|e| StoreError::Postgres(PgError::Commit(Arc::new(e))))?;
        Ok((answers, delta))
    }

    /// Adds the batch's aggregates (`add`, by key) to this writer's rows and upserts them whole;
    /// on return `add` holds the rows as written. Rows not in memory are read back first (a
    /// late result for a bucket memory dropped); rows no window will read are not written.
    async fn write_rollups(
        &self,
        tx: &Transaction<'_>,
        add: &mut HashMap<RollupKey, Agg>,
    ) -> Result<(), StoreError> {
        let now = mxscope_proto::time::now_us();
        add.retain(|(level, bucket, _), _| level.keep_from(now).is_none_or(|from| *bucket >= from));
        if add.is_empty() {
            return Ok(());
        }
        let missing: Vec<RollupKey> = add
            .keys()
            .filter(|k| !self.rollups.contains_key(k))
            .copied()
            .collect();
        let mut stored: HashMap<RollupKey, Agg> = HashMap::new();
        if !missing.is_empty() {
            let levels: Vec<i32> = missing.iter().map(|k| k.0.code() as i32).collect();
            let buckets: Vec<i64> = missing.iter().map(|k| k.1).collect();
            let series: Vec<i64> = missing.iter().map(|k| k.2).collect();
            for r in tx
                .query(
&tx.prepare_cached("SELECT r.level, r.bucket_us, r.series_id, r.count, r.ok, r.warn, r.fail, r.sketches
                     FROM rollups r JOIN unnest($1::int[], $2::bigint[], $3::bigint[]) AS k(l, b, s)
                         ON r.level = k.l AND r.bucket_us = k.b AND r.series_id = k.s
                     WHERE r.writer = $4").await?,
                    &[&levels, &buckets, &series, &self.writer_id],
                )
                .await?
            {
                let Some(level) = level_of(r.get::<_, i32>(0)) else {
                    continue;
                };
                let blob: &[u8] = r.get(7);
                stored.insert(
                    (level, r.get(1), r.get(2)),
                    Agg {
                        count: unsigned(r.get(3)),
                        ok: unsigned(r.get(4)),
                        warn: unsigned(r.get(5)),
                        fail: unsigned(r.get(6)),
                        phases: Agg::sketches_from_bytes(blob, None).unwrap_or_default(),
                    },
                );
            }
        }
        let n = add.len();
        let (mut levels, mut buckets, mut series) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut counts, mut oks, mut warns, mut fails, mut blobs) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut keys: Vec<RollupKey> = add.keys().copied().collect();
        keys.sort_unstable_by_key(|k| (k.0.code(), k.1, k.2));
        for key in keys {
            let Some(a) = add.get_mut(&key) else {
                continue;
            };
            let mut whole = self
                .rollups
                .get(&key)
                .cloned()
                .or_else(|| stored.remove(&key))
                .unwrap_or_default();
            whole.merge(a);
            levels.push(key.0.code() as i32);
            buckets.push(key.1);
            series.push(key.2);
            counts.push(to_i64(whole.count)?);
            oks.push(to_i64(whole.ok)?);
            warns.push(to_i64(whole.warn)?);
            fails.push(to_i64(whole.fail)?);
            blobs.push(whole.sketches_to_bytes());
            *a = whole;
        }
        tx.execute(
&tx.prepare_cached("INSERT INTO rollups (level, bucket_us, series_id, writer, count, ok, warn, fail, sketches)
             SELECT l, b, s, $9, c, o, w, f, k
             FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                         $6::bigint[], $7::bigint[], $8::bytea[]) AS u(l, b, s, c, o, w, f, k)
             ON CONFLICT (level, bucket_us, series_id, writer) DO UPDATE SET count = excluded.count,
                 ok = excluded.ok, warn = excluded.warn, fail = excluded.fail,
                 sketches = excluded.sketches").await?,
            &[
                &levels,
                &buckets,
                &series,
                &counts,
                &oks,
                &warns,
                &fails,
                &blobs,
                &self.writer_id,
            ],
        )
        .await?;
        Ok(())
    }

    /// One retention round: drops the partitions stored wholly before the raw retention, deletes
    /// at most `prune_batch` older rows of the partition the cut-off falls in, and at most
    /// `prune_batch` rollup rows per level past their retention. Returns the rows removed.
    async fn prune(&mut self, now_us: i64) -> Result<u64, StoreError> {
        let us = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        let cutoff = now_us.saturating_sub(us(self.opts.retention));
        let rollup_cutoff = now_us.saturating_sub(us(self.opts.rollup_retention));
        let batch = i64::try_from(self.opts.prune_batch.max(1)).unwrap_or(1000);
        let mut client = self.client().await?;
        let mut deleted: u64 = 0;
        let old = client
            .query(
                "SELECT day_us, name FROM result_partitions WHERE day_us + $1 <= $2 ORDER BY day_us",
                &[&DAY_US, &cutoff],
            )
            .await?;
        for r in old {
            let day: i64 = r.get(0);
            let name: String = r.get(1);
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
                .await?;
            let gone = tx
                .query_opt("SELECT 1 FROM result_partitions WHERE day_us = $1", &[&day])
                .await?
                .is_none();
            if !gone {
                let rows: i64 = tx
                    .query_one(&format!("SELECT count(*) FROM {name}"), &[])
                    .await?
                    .get(0);
                tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                    .await?;
                tx.execute("DELETE FROM result_partitions WHERE day_us = $1", &[&day])
                    .await?;
                tx.commit().await?;
                deleted += unsigned(rows);
                tracing::info!(partition = %name, rows, "retention: results partition dropped");
            }
            self.partitions.remove(&day);
        }
        deleted += client
            .execute(
                "DELETE FROM results WHERE (stored_at_us, id) IN (
                     SELECT stored_at_us, id FROM results WHERE stored_at_us < $1
                     ORDER BY stored_at_us LIMIT $2)",
                &[&cutoff, &batch],
            )
            .await?;
        for level in Level::ALL {
            let from = level
                .bucket(rollup_cutoff)
                .max(level.keep_from(now_us).unwrap_or(i64::MIN));
            deleted += client
                .execute(
                    "DELETE FROM rollups WHERE (level, bucket_us, series_id, writer) IN (
                         SELECT level, bucket_us, series_id, writer FROM rollups
                         WHERE level = $1 AND bucket_us < $2 LIMIT $3)",
                    &[&(level.code() as i32), &from, &batch],
                )
                .await?;
            self.rollups
                .retain(|(l, b, _), _| *l != level || *b >= from);
        }
        // State changes are the timeline of the rollups' span.
        deleted += client
            .execute(
                "DELETE FROM changes WHERE id IN (
                     SELECT id FROM changes WHERE at_us < $1 LIMIT $2)",
                &[&rollup_cutoff, &batch],
            )
            .await?;
        Ok(deleted)
    }
}

fn key_of(s: &SeriesRef) -> Option<&SeriesKey> {
    match s {
        SeriesRef::New { key, .. } => Some(key),
        SeriesRef::Known(_) => None,
    }
}

fn level_of(code: i32) -> Option<Level> {
    Level::ALL.into_iter().find(|l| l.code() == i64::from(code))
}

/// Inserts the series `new` (sorted by key) unless another collector did, and returns the ids
/// of all of them.
async fn create_series(
    tx: &Transaction<'_>,
    new: &[&SeriesRef],
) -> Result<HashMap<SeriesKey, i64>, StoreError> {
    let n = new.len();
    let (mut t, mut e, mut c, mut r) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut host, mut ip, mut port, mut family) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for s in new {
        if let SeriesRef::New {
            key,
            host: h,
            ip: i,
            port: p,
            family: f,
        } = s
        {
            t.push(key.target.as_str());
            e.push(key.endpoint.as_str());
            c.push(key.check.as_str());
            r.push(key.region.as_str());
            host.push(h.as_str());
            ip.push(i.as_str());
            port.push(*p);
            family.push(*f);
        }
    }
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO series (target, endpoint, check_name, region, host, ip, port, family)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::int[], $8::int[])
         ON CONFLICT DO NOTHING",
        )
        .await?,
        &[&t, &e, &c, &r, &host, &ip, &port, &family],
    )
    .await?;
    let mut out = HashMap::with_capacity(n);
    for row in tx
        .query(
            &tx.prepare_cached(
                "SELECT s.id, s.target, s.endpoint, s.check_name, s.region FROM series s
             JOIN unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS k(t, e, c, r)
                 ON s.target = k.t AND s.endpoint = k.e AND s.check_name = k.c AND s.region = k.r",
            )
            .await?,
            &[&t, &e, &c, &r],
        )
        .await?
    {
        out.insert(
            SeriesKey {
                target: row.get(1),
                endpoint: row.get(2),
                check: row.get(3),
                region: row.get(4),
            },
            row.get(0),
        );
    }
    Ok(out)
}

/// Locks the rows of `ids` (sorted) and reads their state.
async fn lock_series(
    tx: &Transaction<'_>,
    ids: &[i64],
) -> Result<HashMap<i64, SeriesState>, StoreError> {
    let mut out = HashMap::with_capacity(ids.len());
    if ids.is_empty() {
        return Ok(out);
    }
    for r in tx
        .query(
&tx.prepare_cached("SELECT id, failing, streak, state_since_us, last_outcome, last_seen_us, interval_ms,
                 agent_id, last_error, last_message, last_phase, last_facts
             FROM series WHERE id = ANY($1) ORDER BY id FOR UPDATE").await?,
            &[&ids],
        )
        .await?
    {
        out.insert(
            r.get(0),
            SeriesState {
                hyst: Hysteresis {
                    failing: r.get(1),
                    streak: u32::try_from(r.get::<_, i32>(2)).unwrap_or(0),
                },
                state_since_us: r.get(3),
                last_outcome: r.get(4),
                last_seen_us: r.get(5),
                interval_ms: r.get(6),
                agent_id: r.get(7),
                last_error: r.get(8),
                last_message: r.get(9),
                last_phase: r.get(10),
                last_facts: r.get(11),
            },
        );
    }
    Ok(out)
}

/// Writes the touched series rows from their state, in id order.
async fn write_series(
    tx: &Transaction<'_>,
    touched: &BTreeSet<i64>,
    state: &HashMap<i64, SeriesState>,
) -> Result<(), StoreError> {
    if touched.is_empty() {
        return Ok(());
    }
    let rows: Vec<(i64, &SeriesState)> = touched
        .iter()
        .filter_map(|id| state.get(id).map(|s| (*id, s)))
        .collect();
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let col = |f: fn(&SeriesState) -> &str| rows.iter().map(|r| f(r.1)).collect::<Vec<&str>>();
    let outcome: Vec<i32> = rows.iter().map(|r| r.1.last_outcome).collect();
    let seen: Vec<i64> = rows.iter().map(|r| r.1.last_seen_us).collect();
    let interval: Vec<i64> = rows.iter().map(|r| r.1.interval_ms).collect();
    let failing: Vec<bool> = rows.iter().map(|r| r.1.hyst.failing).collect();
    let streak: Vec<i32> = rows
        .iter()
        .map(|r| i32::try_from(r.1.hyst.streak).unwrap_or(i32::MAX))
        .collect();
    let since: Vec<i64> = rows.iter().map(|r| r.1.state_since_us).collect();
    let (agent, error, message, phase, facts) = (
        col(|s| &s.agent_id),
        col(|s| &s.last_error),
        col(|s| &s.last_message),
        col(|s| &s.last_phase),
        col(|s| &s.last_facts),
    );
    let params: [&(dyn ToSql + Sync); 12] = [
        &ids, &outcome, &error, &message, &seen, &interval, &failing, &streak, &since, &agent,
        &phase, &facts,
    ];
    tx.execute(
        &tx.prepare_cached(
            "UPDATE series s SET last_outcome = u.lo, last_error = u.le, last_message = u.lm,
             last_seen_us = u.ls, interval_ms = u.im, failing = u.f, streak = u.st,
             state_since_us = u.ss, agent_id = u.ag, last_phase = u.lp, last_facts = u.lf
         FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::bigint[], $6::bigint[],
                     $7::bool[], $8::int[], $9::bigint[], $10::text[], $11::text[], $12::text[])
             AS u(id, lo, le, lm, ls, im, f, st, ss, ag, lp, lf)
         WHERE s.id = u.id",
        )
        .await?,
        &params,
    )
    .await?;
    Ok(())
}

/// Keeps the batch's state changes (the dashboard's timeline, `Store::changes`).
async fn write_changes(tx: &Transaction<'_>, events: &[pb::WatchEvent]) -> Result<(), StoreError> {
    let col = |f: fn(&pb::WatchEvent) -> &str| -> Vec<&str> { events.iter().map(f).collect() };
    let at: Vec<i64> = events.iter().map(|e| e.at_us).collect();
    let via_mx: Vec<bool> = events.iter().map(|e| e.via_mx).collect();
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO changes (at_us, target, check_name, region, endpoint, old_state, new_state,
                 error_class, via_mx)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                 $6::text[], $7::text[], $8::text[], $9::bool[])",
        )
        .await?,
        &[
            &at,
            &col(|e| &e.target),
            &col(|e| &e.check),
            &col(|e| &e.region),
            &col(|e| &e.endpoint),
            &col(|e| &e.old_state),
            &col(|e| &e.new_state),
            &col(|e| &e.error_class),
            &via_mx,
        ],
    )
    .await?;
    Ok(())
}

/// What a results request changes beside its rows, shared by the batch's requests.
struct Batch<'a> {
    state: &'a mut HashMap<i64, SeriesState>,
    touched: &'a mut BTreeSet<i64>,
    events: &'a mut Vec<pb::WatchEvent>,
    rollups: &'a mut HashMap<RollupKey, Agg>,
    stored: u64,
    duplicates: u64,
}

impl Batch<'_> {
    /// Adds an hour aggregate to its hour, day and week rows.
    fn roll(&mut self, hour: i64, series: i64, a: &Agg) {
        for level in Level::ALL {
            self.rollups
                .entry((level, level.bucket(hour), series))
                .or_default()
                .merge(a);
        }
    }
}

/// Inserts the results above the agent's high-water mark (`agent`: its number and mark, raised
/// here), counts the refused seqs and raises the mark past them, feeds each stored result to
/// its series' hysteresis and to the rollups. Returns the new mark.
async fn store_results(
    tx: &Transaction<'_>,
    b: &mut Batch<'_>,
    (agent_id, agent): (&str, &mut (i64, i64)),
    (p, raw, ids, rejected): (&Prepared, &[Bytes], &[i64], &[u64]),
    at_us: i64,
    policy: Policy,
) -> Result<u64, StoreError> {
    let (num, before) = *agent;
    if p.rows.len() != raw.len() || ids.len() != p.series.len() {
        return Err(StoreError::OutOfRange("prepared results"));
    }
    let view =
        |i: usize| ResultView::parse(&raw[i]).map_err(|_| StoreError::OutOfRange("stored result"));
    let all_new = p.ascending && p.rows.first().is_none_or(|(_, row, _)| row.seq > before);
    if all_new {
        for (hour, k, a) in &p.hours {
            b.roll(*hour, ids[*k as usize], a);
        }
    }
    let mut hwm = before;
    let n = p.rows.len();
    let (mut series, mut seqs, mut starts, mut outcomes, mut totals, mut bodies) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (i, (k, row, interval_ms)) in p.rows.iter().enumerate() {
        if row.seq <= hwm {
            b.duplicates += 1;
            continue;
        }
        let id = ids[*k as usize];
        series.push(id);
        seqs.push(row.seq);
        starts.push(row.start_us);
        outcomes.push(row.outcome);
        totals.push(row.total_us);
        bodies.push(&row.body[..]);
        if !all_new {
            let mut a = Agg::default();
            a.add_view(&view(i)?);
            b.roll(Level::Hour.bucket(row.start_us), id, &a);
        }
        let s = b.state.entry(id).or_default();
        let was_failing = s.hyst.failing;
        let ok = matches!(
            pb::Outcome::try_from(row.outcome),
            Ok(pb::Outcome::Ok | pb::Outcome::Warn)
        );
        let changed = s.hyst.observe(ok, policy);
        if changed {
            s.state_since_us = row.start_us;
        }
        // A late result (older than the latest) feeds the state but does not replace the facts.
        if row.start_us >= s.last_seen_us {
            let r = view(i)?;
            s.last_outcome = row.outcome;
            s.last_seen_us = row.start_us;
            s.interval_ms = to_i64(*interval_ms)?;
            s.agent_id = agent_id.to_string();
            s.last_error = r.error_class.to_string();
            s.last_message = r.message.to_string();
            s.last_phase = r.phase.to_string();
            s.last_facts = facts_to_json(&r.facts);
        }
        b.touched.insert(id);
        if changed {
            b.events
                .push(state_event(&view(i)?, &p.region, was_failing));
        }
        b.stored += 1;
        hwm = row.seq;
    }
    if !series.is_empty() {
        let nums = vec![num; series.len()];
        let stored_at = vec![at_us; series.len()];
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO results (series_id, agent_num, seq, start_us, outcome, total_us,
                 stored_at_us, body)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                                  $5::int[], $6::bigint[], $7::bigint[], $8::bytea[])",
            )
            .await?,
            &[
                &series, &nums, &seqs, &starts, &outcomes, &totals, &stored_at, &bodies,
            ],
        )
        .await?;
    }
    // Refused seqs above the mark before this batch are counted once, and the mark moves past
    // them so the spool moves on.
    let fresh = rejected
        .iter()
        .filter(|s| i64::try_from(**s).is_ok_and(|s| s > before))
        .count();
    let up_to = match rejected.iter().max() {
        Some(&last) => hwm.max(to_i64(last)?),
        None => hwm,
    };
    tx.execute(
        &tx.prepare_cached(
            "UPDATE agents SET stored_up_to_seq = GREATEST(stored_up_to_seq, $1),
             last_seen_us = GREATEST(last_seen_us, $2), rejected_total = rejected_total + $3
         WHERE id = $4",
        )
        .await?,
        &[
            &up_to,
            &at_us,
            &i64::try_from(fresh).unwrap_or(i64::MAX),
            &agent_id,
        ],
    )
    .await?;
    agent.1 = up_to;
    Ok(unsigned(up_to))
}

/// Records an agent and replaces its local targets; returns its number and high-water mark.
async fn hello(tx: &Transaction<'_>, h: &AgentHello) -> Result<(i64, i64), StoreError> {
    let labels = serde_json::to_string(&h.labels)?;
    let row = tx
        .query_one(
&tx.prepare_cached("INSERT INTO agents (id, region, version, labels, first_seen_us, last_seen_us, dropped_total,
                 collector, cert_not_after_us)
             VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8)
             ON CONFLICT (id) DO UPDATE SET region = excluded.region, version = excluded.version,
                 labels = excluded.labels,
                 last_seen_us = GREATEST(agents.last_seen_us, excluded.last_seen_us),
                 dropped_total = excluded.dropped_total, collector = excluded.collector,
                 cert_not_after_us = excluded.cert_not_after_us
             RETURNING num, stored_up_to_seq").await?,
            &[
                &h.id,
                &h.region,
                &h.version,
                &labels,
                &h.at_us,
                &to_i64(h.dropped_total)?,
                &h.collector,
                &h.cert_not_after_us,
            ],
        )
        .await?;
    tx.execute(
        &tx.prepare_cached("DELETE FROM agent_targets WHERE agent_id = $1")
            .await?,
        &[&h.id],
    )
    .await?;
    if !h.local_targets.is_empty() {
        let mut names = Vec::new();
        let mut specs = Vec::new();
        for t in &h.local_targets {
            names.push(t.name.as_str());
            specs.push(target_to_json(t)?);
        }
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO agent_targets (agent_id, name, spec, reported_us)
             SELECT $1, n, s, $4 FROM unnest($2::text[], $3::text[]) AS u(n, s)
             ON CONFLICT (agent_id, name) DO UPDATE SET spec = excluded.spec,
                 reported_us = excluded.reported_us",
            )
            .await?,
            &[&h.id, &names, &specs, &h.at_us],
        )
        .await?;
    }
    Ok((row.get(0), row.get(1)))
}

async fn put_target(
    tx: &Transaction<'_>,
    target: &Target,
    update: bool,
    at_us: i64,
) -> Result<Result<Reply, StoreError>, StoreError> {
    let exists = tx
        .query_opt(
            &tx.prepare_cached("SELECT 1 FROM targets WHERE name = $1 FOR UPDATE")
                .await?,
            &[&target.name],
        )
        .await?
        .is_some();
    let spec = target_to_json(target)?;
    match (exists, update) {
        (true, false) => return Ok(Err(StoreError::TargetExists(target.name.clone()))),
        (false, true) => return Ok(Err(StoreError::TargetNotFound(target.name.clone()))),
        (false, false) => {
            // Another collector may add the same name at once: its row wins, this one is told.
            let n = tx
                .execute(
&tx.prepare_cached("INSERT INTO targets (name, spec, created_us, updated_us) VALUES ($1, $2, $3, $3)
                     ON CONFLICT (name) DO NOTHING").await?,
                    &[&target.name, &spec, &at_us],
                )
                .await?;
            if n == 0 {
                return Ok(Err(StoreError::TargetExists(target.name.clone())));
            }
        }
        (true, true) => {
            tx.execute(
                &tx.prepare_cached("UPDATE targets SET spec = $2, updated_us = $3 WHERE name = $1")
                    .await?,
                &[&target.name, &spec, &at_us],
            )
            .await?;
        }
    }
    Ok(Ok(Reply::Done))
}

/// A state change as a `pg_notify` payload: the protobuf encoding in base64 (payloads are text).
pub(super) fn encode_event(e: &pb::WatchEvent) -> String {
    base64::engine::general_purpose::STANDARD.encode(prost::Message::encode_to_vec(e))
}

/// Reads [`encode_event`] back.
pub(super) fn decode_event(payload: &str) -> Option<pb::WatchEvent> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .ok()?;
    prost::Message::decode(&bytes[..]).ok()
}

fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::OutOfRange("integer above 2^63"))
}

pub(super) fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Loads the days whose partition exists.
pub(super) async fn partitions(client: &impl GenericClient) -> Result<BTreeSet<i64>, StoreError> {
    Ok(client
        .query("SELECT day_us FROM result_partitions", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}
