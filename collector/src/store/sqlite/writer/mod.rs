//! The single writer: a thread that owns the write connection, takes requests from a channel,
//! applies up to `batch_max` of them (and what arrives within `linger` while the batch is small)
//! in one transaction and answers each request only after COMMIT returned.
//!
//! What results change beside their own rows is buffered: their hour and day rollups and their
//! series' state (hysteresis, latest result) collect in memory and are written (with the week
//! rows derived from the days) every `buffer_flush`, when the buffer is full, before a read of
//! rollups or series and at close. `rollup_mark` records which results they cover; a writer
//! that starts after an unclean stop replays the results stored after the mark.

mod apply;
mod buffer;
mod checkpoint;
mod prepare;
mod series;

use apply::*;
use buffer::*;
use checkpoint::*;

pub(crate) use prepare::*;
/// The writer's maps use the Fx hash (rustc's): they are keyed by series names and ids it stores
/// anyway, not by anything an attacker could use to flood one bucket cheaply enough to matter
/// next to the SQL per result, and SipHash was 5 % of the writer's time.
pub(crate) use rustc_hash::{FxHashMap as FxMap, FxHashSet as FxSet, FxHasher};
pub(crate) use series::*;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use mxscope_proto::pb;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::oneshot;

use tokio::sync::broadcast;

use super::{bump, SqliteError};
use crate::analysis::aggregate::Agg;
use crate::analysis::hysteresis::{Hysteresis, Policy};
use crate::store::rollup::Level;
use crate::store::row::{endpoint_label, state_event, ResultRow};
use crate::store::{AgentHello, StoreError, StoreOptions, WriterStats};
use bytes::Bytes;
use mxscope_proto::raw::ResultView;
use mxscope_proto::target::Target;

/// A write operation.
pub(crate) enum Op {
    Hello(AgentHello),
    Results {
        agent_id: String,
        /// The results as received (each an encoded `ProbeResult`), read again only for a state
        /// change's event and for a batch with duplicates.
        results: Vec<Bytes>,
        /// The per-result work on `results`, done by the caller before the writer sees them.
        prepared: Prepared,
        /// Seqs of the same batch refused by the ingest limits: counted and acked, not stored.
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
        /// Boxed: a target is the largest payload and would size every message.
        target: Box<Target>,
        update: bool,
        at_us: i64,
    },
    RemoveTarget {
        name: String,
    },
    /// Write the buffer now (answered after its COMMIT): readers of rollups and series state
    /// ask first.
    Sync,
    /// One small round of the retention job (see [`prune`]).
    Prune {
        now_us: i64,
    },
}

/// How often the retention's rounds look for series to drop from memory.
const EVICT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// A batch holding this many result rows is committed without waiting `linger` for more.
const LINGER_BELOW_ROWS: usize = 500;

impl Op {
    /// Rows the operation writes, roughly (its results, else one).
    fn rows(&self) -> usize {
        match self {
            Op::Results { results, .. } => results.len().max(1),
            _ => 1,
        }
    }
}

/// What a committed operation returns.
pub(crate) enum Reply {
    /// The agent's stored-up-to seq.
    Seq(u64),
    /// Rows deleted by a prune round.
    Pruned(u64),
    Done,
}

pub(crate) struct Request {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Reply, StoreError>>,
}

pub(crate) enum Msg {
    Write(Request),
    /// Commit what is queued before this message, then stop.
    Close,
}

/// Starts the writer on `conn`, first rolling up any results a previous writer stored but did
/// not roll up (an unclean stop).
pub(crate) fn spawn(
    conn: Connection,
    path: &Path,
    rx: Receiver<Msg>,
    opts: StoreOptions,
    stats: Arc<WriterStats>,
    events: broadcast::Sender<pb::WatchEvent>,
    dir: Arc<std::sync::RwLock<SeriesDir>>,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    let path = path.to_path_buf();
    let (dropper, garbage) = std::sync::mpsc::channel::<Garbage>();
    std::thread::Builder::new()
        .name("mxscope-db-dropper".into())
        .spawn(move || garbage.into_iter().for_each(drop))
        .map_err(|source| StoreError::Thread {
            name: "mxscope-db-dropper",
            source,
        })?;
    let mut w = Writer {
        conn,
        path: path.clone(),
        disk_full: false,
        opts,
        stats,
        events,
        dir,
        series: FxMap::default(),
        buffer: Buffer::default(),
        evicted_at: None,
        dropper,
        checkpointer: Checkpointer::spawn(&path)?,
    };
    w.recover_buffer()?;
    std::thread::Builder::new()
        .name("mxscope-db-writer".into())
        .spawn(move || w.run(rx))
        .map_err(|source| StoreError::Thread {
            name: "mxscope-db-writer",
            source,
        })
}

/// A rollup row's key: level, bucket start, series id.
type LevelKey = (Level, i64, i64);

/// An hour rollup's key: bucket start, series id.
type HourKey = (i64, i64);

struct Writer {
    conn: Connection,
    /// The database file, named in disk-full reports.
    path: PathBuf,
    /// The last transaction failed on a full disk (logged once per episode).
    disk_full: bool,
    opts: StoreOptions,
    stats: Arc<WriterStats>,
    events: broadcast::Sender<pb::WatchEvent>,
    /// Committed series ids (shared with the ingest tasks) and state, loaded from `series` on
    /// first touch (the writer is its only writer).
    dir: Arc<std::sync::RwLock<SeriesDir>>,
    series: FxMap<i64, SeriesMem>,
    /// What committed results changed that is not written yet (rollups, series rows).
    buffer: Buffer,
    /// When idle series were last looked for (at most every [`EVICT_EVERY`]).
    evicted_at: Option<Instant>,
    /// To the thread that drops what a batch leaves behind.
    dropper: std::sync::mpsc::Sender<Garbage>,
    /// Copies the WAL into the database beside the writer.
    checkpointer: Checkpointer,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        let batch_max = self.opts.batch_max.max(1);
        loop {
            // Idle with a buffer: write it when it is due.
            let next = match self.buffer.since {
                Some(since) => {
                    let due = since + self.opts.buffer_flush;
                    match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                        Ok(m) => Ok(m),
                        Err(RecvTimeoutError::Timeout) => {
                            let _ = self.flush_buffer();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => Err(()),
                    }
                }
                None => rx.recv().map_err(|_| ()),
            };
            let first = match next {
                Ok(Msg::Write(r)) => r,
                Ok(Msg::Close) | Err(()) => break,
            };
            let mut rows = first.op.rows();
            let mut batch = vec![first];
            let deadline = Instant::now() + self.opts.linger;
            let mut closing = false;
            while batch.len() < batch_max {
                let next = match rx.try_recv() {
                    Ok(m) => Ok(m),
                    Err(TryRecvError::Disconnected) => Err(()),
                    Err(TryRecvError::Empty) => {
                        // Waiting for more only pays while the batch is small: a big one is
                        // committed at once (the writer idled through every linger otherwise).
                        let now = Instant::now();
                        if now >= deadline || rows >= LINGER_BELOW_ROWS {
                            break;
                        }
                        match rx.recv_timeout(deadline - now) {
                            Ok(m) => Ok(m),
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => Err(()),
                        }
                    }
                };
                match next {
                    Ok(Msg::Write(r)) => {
                        rows += r.op.rows();
                        batch.push(r);
                    }
                    Ok(Msg::Close) | Err(()) => {
                        closing = true;
                        break;
                    }
                }
            }
            // A retention round also drops idle series from memory (before it is answered).
            if let Some(now_us) = batch.iter().find_map(|r| match r.op {
                Op::Prune { now_us } => Some(now_us),
                _ => None,
            }) {
                self.evict_idle(now_us);
            }
            self.commit_batch(batch);
            if closing {
                break;
            }
        }
        if self.flush_buffer().is_err() {
            tracing::error!(db = %self.path.display(),
                "rollups and series state buffered at close could not be written; the next start \
                 replays the results after the last written mark");
        }
        // Its connection closes first, so the writer's close checkpoints and removes the WAL.
        self.checkpointer.stop();
        if let Err((_, err)) = self.conn.close() {
            tracing::warn!(error = %err, "closing the database writer connection failed");
        }
        tracing::debug!("database writer stopped");
    }

    /// Applies each request inside its own savepoint (a failing request does not spoil the
    /// others), writes the batch's series and rollup rows, commits once, then answers every
    /// request and broadcasts the state changes.
    fn commit_batch(&mut self, batch: Vec<Request>) {
        let n = batch.len() as u64;
        let started = Instant::now();
        let mut answers: Vec<(oneshot::Sender<_>, Result<Reply, StoreError>)> =
            Vec::with_capacity(batch.len());
        let mut syncs = Vec::new();
        let mut delta = Delta::default();
        let policy = self.opts.policy;
        let retention = Retention::of(&self.opts);
        let dir_lock = self.dir.clone();
        let dir = dir_lock
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let committed = (&*dir, &self.series);
        let outcome = (|| -> Result<(), BatchError> {
            let mut tx = self.conn.transaction()?;
            let mut requests = batch.into_iter();
            while let Some(Request { op, reply }) = requests.next() {
                if matches!(op, Op::Sync) {
                    syncs.push(reply);
                    continue;
                }
                let mut mine = Delta::default();
                let mut ctx = Ctx {
                    committed,
                    batch: &delta,
                    req: &mut mine,
                    policy,
                    retention,
                };
                let (res, intact) = apply_isolated(&mut tx, op, &mut ctx);
                if res.is_ok() {
                    delta.absorb(mine);
                }
                answers.push((reply, res));
                if !intact {
                    // SQLite rolled the whole transaction back (it does on SQLITE_FULL) or the
                    // savepoint could not be undone: nothing of this batch may commit. The
                    // requests not applied get the batch's error below.
                    answers.extend(requests.map(|r| (r.reply, Ok(Reply::Done))));
                    return Err(BatchError::RolledBack);
                }
            }
            tx.commit()?;
            Ok(())
        })();
        drop(dir);
        bump(&self.stats.transactions, 1);
        bump(&self.stats.requests, n);
        self.checkpointer.nudge();
        bump(
            &self.stats.commit_micros,
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        );
        // A full disk fails single statements (rolled back to their savepoint) or the COMMIT.
        let full = outcome.as_ref().err().is_some_and(BatchError::is_disk_full)
            || answers
                .iter()
                .any(|(_, res)| res.as_ref().err().is_some_and(StoreError::is_disk_full));
        // Only stored results prove there is space again (an empty prune round commits on a full disk).
        self.note_disk_full(full, outcome.is_ok() && delta.stored > 0);
        let answers: Vec<_> = answers
            .into_iter()
            .map(|(reply, res)| (reply, res.map_err(|e| self.classify(e))))
            .collect();
        match outcome {
            Ok(()) => {
                bump(&self.stats.results_stored, delta.stored);
                bump(&self.stats.duplicates, delta.duplicates);
                let learned = std::mem::take(&mut delta.ids);
                if !learned.is_empty() {
                    self.dir
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .absorb(learned);
                }
                let mut touched = Vec::with_capacity(delta.series.len());
                for (id, s) in std::mem::take(&mut delta.series) {
                    touched.push(id);
                    if let Some(old) = self.series.insert(id, s) {
                        delta.garbage.push(Box::new(old));
                    }
                }
                self.stats
                    .series_in_memory
                    .store(self.series.len() as u64, Ordering::Relaxed);
                // Counted before the acks go out: a reader that saw the ack writes them first.
                let spent = self.buffer.add(
                    std::mem::take(&mut delta.hours),
                    touched,
                    delta.last_id,
                    mxscope_proto::time::now_us(),
                );
                delta.garbage.push(Box::new(spent));
                self.stats
                    .buffered
                    .store(self.buffer.len() as u64, Ordering::Relaxed);
                for e in std::mem::take(&mut delta.events) {
                    // No receiver (nobody watching) is fine.
                    let _ = self.events.send(e);
                }
                for (reply, res) in answers {
                    let _ = reply.send(res);
                }
            }
            Err(err) if full => {
                tracing::debug!(error = %err, requests = n, "database transaction failed on a full disk");
                for (reply, res) in answers {
                    let res = res.and(Err(StoreError::DiskFull {
                        path: self.path.clone(),
                    }));
                    let _ = reply.send(res);
                }
            }
            Err(err) => {
                tracing::error!(error = %err, requests = n, "database transaction failed");
                let err = match err {
                    BatchError::Sqlite(e) => Some(Arc::new(e)),
                    BatchError::RolledBack => None,
                };
                for (reply, res) in answers {
                    // Requests that failed on their own keep their error; the rest were rolled back.
                    let res = res.and(Err(match &err {
                        Some(e) => SqliteError::Commit(e.clone()).into(),
                        None => StoreError::RolledBack,
                    }));
                    let _ = reply.send(res);
                }
            }
        }
        // Freed on another thread: at ingest rates the frees of a batch's results, rows and
        // sketches were a third of the writer's time.
        if let Err(back) = self.dropper.send(Box::new(delta)) {
            drop(back);
        }
        let due = self.buffer.len() >= self.opts.buffer_max
            || self
                .buffer
                .since
                .is_some_and(|t| t.elapsed() >= self.opts.buffer_flush);
        if due || !syncs.is_empty() {
            let res = self.flush_buffer();
            for reply in syncs {
                let _ = reply.send(match &res {
                    Ok(()) => Ok(Reply::Done),
                    Err(e) if e.is_disk_full() => Err(StoreError::DiskFull {
                        path: self.path.clone(),
                    }),
                    Err(_) => Err(StoreError::RollupWrite),
                });
            }
        }
    }

    /// Drops from memory the series silent for longer than the raw retention (a removed
    /// target's, an endpoint gone): their rows stay, and a later result of one loads it again.
    /// Only with the buffer written, so nothing of theirs is pending.
    fn evict_idle(&mut self, now_us: i64) {
        if self.evicted_at.is_some_and(|t| t.elapsed() < EVICT_EVERY) {
            return;
        }
        if self.flush_buffer().is_err() {
            return;
        }
        self.evicted_at = Some(Instant::now());
        let retention = i64::try_from(self.opts.retention.as_micros()).unwrap_or(i64::MAX);
        let before = now_us.saturating_sub(retention);
        let idle: FxSet<i64> = self
            .series
            .iter()
            .filter(|(_, s)| s.last_seen_us < before)
            .map(|(id, _)| *id)
            .collect();
        if idle.is_empty() {
            return;
        }
        self.series.retain(|id, _| !idle.contains(id));
        self.dir
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove_ids(&idle);
        bump(&self.stats.series_evicted, idle.len() as u64);
        self.stats
            .series_in_memory
            .store(self.series.len() as u64, Ordering::Relaxed);
        tracing::info!(
            evicted = idle.len(),
            kept = self.series.len(),
            "series silent longer than the retention dropped from memory"
        );
    }

    /// Writes the buffer: its hour and day rollups with the week rows derived from them, the
    /// series rows behind their state in memory, and the mark of the results they cover, in one
    /// transaction. On failure the buffer is kept (and retried after the next interval) and the
    /// error is logged.
    fn flush_buffer(&mut self) -> Result<(), StoreError> {
        if self.buffer.since.is_none() {
            return Ok(());
        }
        let started = Instant::now();
        let through = self.buffer.through_id;
        let outcome = (|| -> Result<(), StoreError> {
            let tx = self.conn.transaction()?;
            write_rollups(&tx, &self.buffer.rows, mxscope_proto::time::now_us())?;
            write_series(&tx, &self.buffer.series, &self.series)?;
            tx.execute("UPDATE rollup_mark SET through_id = ?1", [through])?;
            tx.commit()?;
            Ok(())
        })();
        bump(
            &self.stats.commit_micros,
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        );
        match outcome {
            Ok(()) => {
                bump(&self.stats.buffer_flushes, 1);
                let rows = std::mem::take(&mut self.buffer.rows);
                self.buffer.series.clear();
                self.buffer.since = None;
                self.stats.buffered.store(0, Ordering::Relaxed);
                let _ = self.dropper.send(Box::new(rows));
                Ok(())
            }
            Err(err) => {
                let full = err.is_disk_full();
                self.note_disk_full(full, false);
                if !full {
                    tracing::error!(error = %err, buffered = self.buffer.len(),
                        "writing the buffered rollups and series state failed; kept in memory and retried");
                }
                // Not retried before the next interval.
                self.buffer.since = Some(Instant::now());
                Err(err)
            }
        }
    }

    /// Replays the results stored after `rollup_mark` (a writer that stopped without writing
    /// its buffer) into rollups and series state, and writes them, before the writer takes
    /// requests: as if the results had arrived again, in store order.
    fn recover_buffer(&mut self) -> Result<(), StoreError> {
        let mark: i64 = self
            .conn
            .query_row("SELECT through_id FROM rollup_mark", [], |r| r.get(0))?;
        let mut hours: FxMap<HourKey, Agg> = FxMap::default();
        let mut touched: FxSet<i64> = FxSet::default();
        let mut through = mark;
        let policy = self.opts.policy;
        {
            let mut agents: FxMap<i64, Arc<str>> = FxMap::default();
            let mut st = self.conn.prepare("SELECT num, id FROM agents")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                agents.insert(r.get(0)?, Arc::from(r.get::<_, String>(1)?));
            }
            let mut st = self.conn.prepare(
                "SELECT id, series_id, start_us, outcome, body, agent_num FROM results
                 WHERE id > ?1 ORDER BY id",
            )?;
            let mut rows = st.query([mark])?;
            while let Some(r) = rows.next()? {
                let body =
                    Bytes::copy_from_slice(r.get_ref(4)?.as_blob().map_err(rusqlite::Error::from)?);
                let Ok(mut result) = ResultView::parse(&body) else {
                    tracing::warn!(
                        id = r.get::<_, i64>(0)?,
                        "unreadable stored result skipped by the recovery"
                    );
                    continue;
                };
                let (series, start_us, outcome) = (r.get(1)?, r.get(2)?, r.get(3)?);
                (result.start_us, result.outcome) = (start_us, outcome);
                hours
                    .entry((Level::Hour.bucket(start_us), series))
                    .or_default()
                    .add_view(&result);
                let s = match self.series.entry(series) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(load_series(&self.conn, series)?.unwrap_or_default())
                    }
                };
                let agent = agents
                    .get(&r.get::<_, i64>(5)?)
                    .cloned()
                    .unwrap_or_default();
                let interval = to_i64(result.interval_ms)?;
                s.observe(start_us, outcome, interval, &body, &agent, policy);
                touched.insert(series);
                through = r.get(0)?;
            }
        }
        if through == mark {
            return Ok(());
        }
        tracing::info!(
            results = through - mark,
            "replaying the results stored after the last buffer write into rollups and series state (the collector did not stop cleanly)"
        );
        drop(self.buffer.add(
            hours.into_iter().collect(),
            touched,
            through,
            mxscope_proto::time::now_us(),
        ));
        self.flush_buffer()
    }

    /// A request error as the caller should see it: `SQLITE_FULL` becomes [`StoreError::DiskFull`].
    fn classify(&self, err: StoreError) -> StoreError {
        if err.is_disk_full() {
            StoreError::DiskFull {
                path: self.path.clone(),
            }
        } else {
            err
        }
    }

    /// Logs the start and the end of a disk-full episode once each (not once per batch).
    fn note_disk_full(&mut self, full: bool, stored: bool) {
        if full && !self.disk_full {
            tracing::error!(db = %self.path.display(),
                "database disk full (SQLITE_FULL): ingest paused, nothing is acked, agents keep \
                 their results in their spools and retry; free space on the disk to resume");
            self.disk_full = true;
        } else if !full && stored && self.disk_full {
            tracing::info!(db = %self.path.display(), "database disk has space again, ingest resumed");
            self.disk_full = false;
        }
    }
}

/// Why a batch's transaction stored nothing.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    /// BEGIN or COMMIT failed.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// A failed statement rolled the whole transaction back.
    #[error("transaction rolled back after a failed statement")]
    RolledBack,
}

impl BatchError {
    fn is_disk_full(&self) -> bool {
        matches!(self, BatchError::Sqlite(e) if super::is_sqlite_full(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::{open_write, schema, SCHEMA_VERSION};

    fn request(tx: &std::sync::mpsc::Sender<Msg>, op: Op) -> Result<Reply, StoreError> {
        let (reply, rx) = oneshot::channel();
        tx.send(Msg::Write(Request { op, reply }))
            .expect("writer alive");
        rx.blocking_recv().expect("answered")
    }

    fn results(from: u64, n: u64) -> Op {
        let results: Vec<_> = (from..from + n)
            .map(|seq| pb::ProbeResult {
                agent_id: "a1".into(),
                seq,
                target: "example.test".into(),
                check: "smtp".into(),
                start_us: 1_000_000,
                message: "x".repeat(500),
                ..Default::default()
            })
            .collect();
        let raw: Vec<Bytes> = results
            .iter()
            .map(|r| prost::Message::encode_to_vec(r).into())
            .collect();
        let views: Vec<_> = raw.iter().map(|b| ResultView::parse(b).unwrap()).collect();
        Op::Results {
            agent_id: "a1".into(),
            prepared: Prepared::of("eu", &views, &SeriesDir::default()),
            results: raw.clone(),
            rejected: Vec::new(),
            at_us: 1,
        }
    }

    fn id<'a>(
        region: &'a str,
        target: &'a str,
        check: &'a str,
        host: &'a str,
        ip: &'a str,
        port: u32,
    ) -> Ident<'a> {
        Ident {
            region,
            target,
            check,
            host,
            ip,
            port,
        }
    }

    #[test]
    fn series_dir_finds_exactly_the_ident_it_was_given() {
        let mut dir = SeriesDir::default();
        dir.insert(
            id("eu", "a", "smtp", "mx1", "198.18.0.1", 25).to_owned_ident(),
            7,
        );
        dir.insert(
            id("eu", "a", "smtp", "mx1", "198.18.0.1", 587).to_owned_ident(),
            8,
        );
        assert_eq!(
            dir.get(id("eu", "a", "smtp", "mx1", "198.18.0.1", 25)),
            Some(7)
        );
        assert_eq!(
            dir.get(id("eu", "a", "smtp", "mx1", "198.18.0.1", 587)),
            Some(8)
        );
        // The same bytes split differently are another series.
        assert_eq!(
            dir.get(id("eu", "as", "mtp", "mx1", "198.18.0.1", 25)),
            None
        );
        assert_eq!(
            dir.get(id("us", "a", "smtp", "mx1", "198.18.0.1", 25)),
            None
        );
        // A known ident keeps its first id.
        dir.insert(
            id("eu", "a", "smtp", "mx1", "198.18.0.1", 25).to_owned_ident(),
            9,
        );
        assert_eq!(
            dir.get(id("eu", "a", "smtp", "mx1", "198.18.0.1", 25)),
            Some(7)
        );
    }

    /// SQLite's `max_page_count` answers `SQLITE_FULL` exactly like a full disk.
    #[test]
    fn a_full_database_is_disk_full_nothing_is_stored_and_it_is_retryable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("full.db");
        let mut conn = open_write(&path).expect("open");
        schema::migrate_to(&mut conn, &path, SCHEMA_VERSION).expect("migrate");
        let hello = Op::Hello(AgentHello {
            id: "a1".into(),
            region: "eu".into(),
            ..Default::default()
        });
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("page count");
        conn.pragma_update(None, "max_page_count", pages + 2)
            .expect("cap the file");
        let (tx, rx) = std::sync::mpsc::channel();
        let (events, _) = broadcast::channel(16);
        let handle = spawn(
            conn,
            &path,
            rx,
            StoreOptions::default(),
            Arc::new(WriterStats::default()),
            events,
            Default::default(),
        )
        .expect("writer");
        assert!(matches!(request(&tx, hello), Ok(Reply::Seq(0))));
        let err = match request(&tx, results(1, 200)) {
            Err(e) => e,
            Ok(_) => panic!("200 results of 500 bytes cannot fit in two pages"),
        };
        assert!(err.is_disk_full(), "{err:?}");
        assert!(
            matches!(&err, StoreError::DiskFull { path: p } if *p == path),
            "{err:?}"
        );
        let status = tonic::Status::from(crate::error::ServiceError::from(err));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("disk full"), "{status:?}");
        // Nothing of the failed batch is stored: the high-water mark did not move.
        let hwm: i64 = Connection::open(&path)
            .expect("reader")
            .query_row(
                "SELECT stored_up_to_seq FROM agents WHERE id = 'a1'",
                [],
                |r| r.get(0),
            )
            .expect("agent row");
        assert_eq!(hwm, 0);
        // A batch that fits still commits: the writer keeps going.
        assert!(matches!(request(&tx, results(1, 1)), Ok(Reply::Seq(1))));
        drop(tx);
        handle.join().expect("writer thread");
    }
}
