//! The single writer: a thread that owns the write connection, takes requests from a channel,
//! applies up to `batch_max` of them (and what arrives within `linger` while the batch is small)
//! in one transaction and answers each request only after COMMIT returned.
//!
//! What results change beside their own rows is buffered: their hour and day rollups and their
//! series' state (hysteresis, latest result) collect in memory and are written (with the week
//! rows derived from the days) every `buffer_flush`, when the buffer is full, before a read of
//! rollups or series and at close. `rollup_mark` records which results they cover; a writer
//! that starts after an unclean stop replays the results stored after the mark.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use mxscope_proto::pb;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::oneshot;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use tokio::sync::broadcast;

use super::rollup::Level;
use super::row::ResultRow;
use super::{bump, AgentHello, StoreError, StoreOptions, TargetDef, WriterStats};
use crate::analysis::aggregate::Agg;
use crate::analysis::hysteresis::{Hysteresis, Policy};
use bytes::Bytes;
use mxscope_proto::raw::ResultView;
use mxscope_proto::RegionState;

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
        def: TargetDef,
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

/// The Fx hash (rustc's): a multiply and a rotate per word. The writer's maps are keyed by
/// series names it stores anyway, not by anything an attacker could use to flood one bucket
/// cheaply enough to matter next to the SQL per result, and SipHash was 5 % of the writer's time.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

const FX_K: u64 = 0xf135_7aea_2e62_a9c5;

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(FX_K);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_i64(&mut self, i: i64) {
        self.add(i as u64);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

pub(crate) type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
type FxSet<K> = std::collections::HashSet<K, BuildHasherDefault<FxHasher>>;

/// A rollup row's key: level, bucket start, series id.
type LevelKey = (Level, i64, i64);

/// An hour rollup's key: bucket start, series id.
type HourKey = (i64, i64);

/// The per-result work on a batch of results that needs no database: row encoding (store::row),
/// the batch's distinct series, and its hour aggregates. Built by [`Prepared::of`] in the ingest
/// session's task (on a tokio worker, beside the writer's thread), so the writer only resolves
/// series ids, binds, steps and merges.
pub(crate) struct Prepared {
    /// The batch's region (the agent's).
    region: String,
    /// Distinct series of the batch: its id when the directory knows it, else its key and the
    /// endpoint parts a new `series` row records.
    series: Vec<SeriesRef>,
    /// Per result: its index into `series`, its row and its interval.
    rows: Vec<(u32, ResultRow, u64)>,
    /// Hour aggregates of all results by (bucket, index into `series`); the writer uses them
    /// when every result of the batch is stored (no duplicate), else it aggregates what it stored.
    hours: Vec<(i64, u32, Agg)>,
    /// Seqs strictly ascending: then "the first seq is above the mark" means "no duplicate".
    ascending: bool,
}

/// A series of a batch: known by id, or to be looked up (and maybe created) by the writer.
enum SeriesRef {
    Known(i64),
    New(SeriesKey, EndpointParts),
}

impl Prepared {
    /// `dir` gives the ids of the series the writer committed already: those need no key.
    pub(crate) fn of(region: &str, results: &[ResultView<'_>], dir: &SeriesDir) -> Prepared {
        // The label is a function of host, ip and port: with target and check they name the
        // series (the region is the batch's), so the label is made once per series, not per result.
        let mut index: FxMap<Ident<'_>, u32> =
            FxMap::with_capacity_and_hasher(results.len(), Default::default());
        let mut series: Vec<SeriesRef> = Vec::new();
        let mut rows = Vec::with_capacity(results.len());
        let mut hours: FxMap<(i64, u32), Agg> =
            FxMap::with_capacity_and_hasher(results.len(), Default::default());
        for r in results {
            let e = r.endpoint.as_ref();
            let ident: Ident<'_> = (
                region,
                r.target,
                r.check,
                e.map_or(r.target, |e| e.host),
                e.map_or("", |e| e.ip),
                e.map_or(0, |e| e.port),
            );
            let k = *index.entry(ident).or_insert_with(|| {
                series.push(match dir.get(ident) {
                    Some(id) => SeriesRef::Known(id),
                    None => {
                        let parts = EndpointParts::of(r);
                        let key = SeriesKey {
                            target: r.target.to_string(),
                            endpoint: endpoint_label(r),
                            check: r.check.to_string(),
                            region: region.to_string(),
                        };
                        SeriesRef::New(key, parts)
                    }
                });
                (series.len() - 1) as u32
            });
            hours
                .entry((Level::Hour.bucket(r.start_us), k))
                .or_default()
                .add_view(r);
            rows.push((k, ResultRow::of_view(r), r.interval_ms));
        }
        let ascending = results.windows(2).all(|w| w[0].seq < w[1].seq);
        Prepared {
            region: region.to_string(),
            series,
            rows,
            hours: hours.into_iter().map(|((b, k), a)| (b, k, a)).collect(),
            ascending,
        }
    }
}

/// The series' endpoint label of a result (the target's name when it has no endpoint).
fn endpoint_label(r: &ResultView<'_>) -> String {
    match &r.endpoint {
        Some(e) => mxscope_proto::endpoint_label(e.host, e.ip, e.port),
        None => r.target.to_string(),
    }
}

/// The parts of a result's endpoint, kept once per series.
#[derive(Debug, Clone, Default)]
struct EndpointParts {
    host: String,
    ip: String,
    port: i64,
    family: i32,
}

impl EndpointParts {
    fn of(r: &ResultView<'_>) -> EndpointParts {
        match &r.endpoint {
            Some(e) => EndpointParts {
                host: e.host.to_string(),
                ip: e.ip.to_string(),
                port: i64::from(e.port),
                family: e.family,
            },
            None => EndpointParts {
                host: r.target.to_string(),
                ..Default::default()
            },
        }
    }
}

/// Identity of a series: (target, endpoint, check, region).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SeriesKey {
    pub target: String,
    pub endpoint: String,
    pub check: String,
    pub region: String,
}

/// What a result names of its series: region, target, check, endpoint host, ip and port.
pub(crate) type Ident<'a> = (&'a str, &'a str, &'a str, &'a str, &'a str, u32);

/// Series ids by [`Ident`], shared by the writer, which adds the series of each commit, and the
/// ingest tasks, which look ids up (by borrowed names: no allocation) so that a batch of known
/// series carries no keys. Series rows are never deleted, so an id once here stays right.
#[derive(Default)]
pub(crate) struct SeriesDir {
    /// By hash of the ident; a bucket holds every ident of that hash.
    map: FxMap<u64, Vec<(OwnedIdent, i64)>>,
}

type OwnedIdent = (Box<str>, Box<str>, Box<str>, Box<str>, Box<str>, u32);

impl SeriesDir {
    fn hash(i: Ident<'_>) -> u64 {
        let mut h = FxHasher::default();
        for s in [i.0, i.1, i.2, i.3, i.4] {
            h.write(s.as_bytes());
            h.write_u8(0xff);
        }
        h.write_u64(u64::from(i.5));
        h.finish()
    }

    pub(crate) fn get(&self, i: Ident<'_>) -> Option<i64> {
        self.map.get(&Self::hash(i))?.iter().find_map(|(o, id)| {
            (*o.0 == *i.0
                && *o.1 == *i.1
                && *o.2 == *i.2
                && *o.3 == *i.3
                && *o.4 == *i.4
                && o.5 == i.5)
                .then_some(*id)
        })
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Adds every ident of `other` this one does not hold.
    fn absorb(&mut self, other: SeriesDir) {
        if self.is_empty() {
            *self = other;
            return;
        }
        for (ident, id) in other.map.into_values().flatten() {
            self.insert(ident, id);
        }
    }

    fn insert(&mut self, o: OwnedIdent, id: i64) {
        let i = borrowed(&o);
        if self.get(i).is_some() {
            return;
        }
        self.map.entry(Self::hash(i)).or_default().push((o, id));
    }
}

fn owned(i: Ident<'_>) -> OwnedIdent {
    (
        i.0.into(),
        i.1.into(),
        i.2.into(),
        i.3.into(),
        i.4.into(),
        i.5,
    )
}

fn borrowed(o: &OwnedIdent) -> Ident<'_> {
    (&o.0, &o.1, &o.2, &o.3, &o.4, o.5)
}

/// The ident of a series the writer resolves by key.
fn ident_of<'a>(key: &'a SeriesKey, parts: &'a EndpointParts) -> Ident<'a> {
    (
        &key.region,
        &key.target,
        &key.check,
        &parts.host,
        &parts.ip,
        u32::try_from(parts.port).unwrap_or(0),
    )
}

/// The writer's view of one `series` row: hysteresis plus the latest result's facts.
#[derive(Debug, Clone, Default)]
struct SeriesMem {
    hyst: Hysteresis,
    state_since_us: i64,
    last_outcome: i32,
    last_seen_us: i64,
    interval_ms: i64,
    /// Shared, so a request's copy of a series costs no string copies.
    latest: Arc<Latest>,
}

impl SeriesMem {
    /// Feeds one stored result to the series, in store order: its hysteresis, and its latest
    /// result unless this one is older. Returns whether the state changed and the latest result
    /// it replaced.
    fn observe(
        &mut self,
        start_us: i64,
        outcome: i32,
        interval_ms: i64,
        body: &Bytes,
        agent: &Arc<str>,
        policy: Policy,
    ) -> (bool, Option<Arc<Latest>>) {
        let ok = matches!(
            pb::Outcome::try_from(outcome),
            Ok(pb::Outcome::Ok | pb::Outcome::Warn)
        );
        let changed = self.hyst.observe(ok, policy);
        if changed {
            self.state_since_us = start_us;
        }
        // A late result (older than the latest) feeds the state but does not replace the facts.
        if start_us < self.last_seen_us {
            return (changed, None);
        }
        self.last_outcome = outcome;
        self.last_seen_us = start_us;
        self.interval_ms = interval_ms;
        let latest = Latest {
            agent_id: agent.clone(),
            body: body.clone(),
        };
        (
            changed,
            Some(std::mem::replace(&mut self.latest, Arc::new(latest))),
        )
    }
}

/// A series' latest result: its agent and its stored body (error class, phase, facts, message;
/// the row's own bytes, shared), read when the series row is written.
#[derive(Debug, Default)]
struct Latest {
    agent_id: Arc<str>,
    body: Bytes,
}

/// Changes made by requests, applied to SQLite once per batch and to the writer's memory once
/// committed.
#[derive(Default)]
struct Delta {
    /// Series ids learned (looked up or inserted) by these requests.
    ids: SeriesDir,
    series: FxMap<i64, SeriesMem>,
    /// Hour aggregates of the stored results (a key may repeat), merged into the writer's
    /// buffer once committed.
    hours: Vec<(HourKey, Agg)>,
    /// `results.id` of the last result stored.
    last_id: i64,
    events: Vec<pb::WatchEvent>,
    stored: u64,
    duplicates: u64,
    /// What the requests leave behind (results, rows, replaced state), dropped by the dropper
    /// thread so the writer spends no time freeing it.
    garbage: Vec<Garbage>,
}

/// Anything the writer hands to the dropper thread.
type Garbage = Box<dyn std::any::Any + Send>;

/// Merges `a` into `map[k]`: moved in when `k` is new, else merged and handed back to be dropped.
#[must_use]
fn merge_into<K: std::hash::Hash + Eq>(map: &mut FxMap<K, Agg>, k: K, a: Agg) -> Option<Agg> {
    match map.entry(k) {
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(a);
            None
        }
        std::collections::hash_map::Entry::Occupied(mut o) => {
            o.get_mut().merge(&a);
            Some(a)
        }
    }
}

impl Delta {
    fn absorb(&mut self, other: Delta) {
        self.ids.absorb(other.ids);
        self.series.extend(other.series);
        if self.hours.is_empty() {
            self.hours = other.hours;
        } else {
            self.hours.extend(other.hours);
        }
        self.last_id = self.last_id.max(other.last_id);
        self.events.extend(other.events);
        self.stored += other.stored;
        self.duplicates += other.duplicates;
        self.garbage.extend(other.garbage);
    }
}
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
    /// To the thread that drops what a batch leaves behind.
    dropper: std::sync::mpsc::Sender<Garbage>,
    /// Copies the WAL into the database beside the writer.
    checkpointer: Checkpointer,
}

/// What committed results changed and the writer has not written yet: their rollups (hour and
/// day rows, a day row holding all of its hours; the week rows are derived when written) and
/// the series whose state they changed (the state itself is in `Writer::series`).
#[derive(Default)]
struct Buffer {
    rows: FxMap<LevelKey, Agg>,
    /// Series whose row in `series` is behind their state in memory.
    series: FxSet<i64>,
    /// `results.id` of the last result whose changes are here (or already written).
    through_id: i64,
    /// When the oldest change here was made.
    since: Option<Instant>,
}

impl Buffer {
    /// Adds committed results' hour aggregates and the series they changed; `last_id` is the
    /// last of those results. An hour no window reads any more (see [`Level::keep_from`]) goes
    /// into its day row only. Returns the aggregates merged into others, to be dropped.
    #[must_use]
    fn add(
        &mut self,
        hours: Vec<(HourKey, Agg)>,
        series: impl IntoIterator<Item = i64>,
        last_id: i64,
        now_us: i64,
    ) -> Vec<Agg> {
        self.series.extend(series);
        if last_id > self.through_id {
            self.through_id = last_id;
            self.since.get_or_insert_with(Instant::now);
        }
        let keep = Level::Hour.keep_from(now_us).unwrap_or(i64::MIN);
        self.rows.reserve(hours.len());
        let mut spent = Vec::with_capacity(hours.len());
        for ((bucket, id), a) in hours {
            let day = (Level::Day, Level::Day.bucket(bucket), id);
            if bucket >= keep {
                self.rows.entry(day).or_default().merge(&a);
                spent.extend(merge_into(&mut self.rows, (Level::Hour, bucket, id), a));
            } else {
                spent.extend(merge_into(&mut self.rows, day, a));
            }
        }
        spent
    }

    /// Rollup rows and series rows waiting.
    fn len(&self) -> usize {
        self.rows.len() + self.series.len()
    }
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
                // Counted before the acks go out: a reader that saw the ack writes them first.
                let spent = self.buffer.add(
                    std::mem::take(&mut delta.hours),
                    touched,
                    delta.last_id,
                    super::now_us(),
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
                        Some(e) => StoreError::Commit(e.clone()),
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
            write_rollups(&tx, &self.buffer.rows, super::now_us())?;
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
            super::now_us(),
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

/// A thread with its own connection that runs passive WAL checkpoints (copying committed pages
/// into the database file and syncing it) a few times a second while the writer commits. The
/// writer's own automatic checkpoint then finds those pages copied already: a 128 MiB copy and
/// fsync no longer stalls ingest every few hundred thousand results, and the copy runs on the
/// other core.
struct Checkpointer {
    wake: std::sync::mpsc::SyncSender<()>,
    handle: std::thread::JoinHandle<()>,
    last: Instant,
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

/// Least time between two nudges of the checkpointer.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

impl Checkpointer {
    fn spawn(path: &Path) -> Result<Checkpointer, StoreError> {
        let open_failed = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open_failed)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_failed)?;
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let handle = std::thread::Builder::new()
            .name("mxscope-db-checkpoint".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    let res: rusqlite::Result<(i64, i64, i64)> =
                        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        });
                    if let Err(err) = res {
                        tracing::debug!(error = %err, "background WAL checkpoint failed; the writer's own checkpoint still runs");
                    }
                }
            })
            .map_err(|source| StoreError::Thread {
                name: "mxscope-db-checkpoint",
                source,
            })?;
        Ok(Checkpointer {
            wake,
            handle,
            last: Instant::now(),
        })
    }

    /// After a commit: wakes the thread if it is idle and was last woken a while ago.
    fn nudge(&mut self) {
        if self.last.elapsed() >= CHECKPOINT_EVERY {
            self.last = Instant::now();
            let _ = self.wake.try_send(());
        }
    }

    fn stop(self) {
        drop(self.wake);
        if self.handle.join().is_err() {
            tracing::error!("WAL checkpoint thread panicked");
        }
    }
}

/// Cut-offs of the retention job, as durations in microseconds.
#[derive(Debug, Clone, Copy)]
struct Retention {
    raw_us: i64,
    rollup_us: i64,
    batch: i64,
}

impl Retention {
    fn of(o: &StoreOptions) -> Retention {
        let us = |d: std::time::Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Retention {
            raw_us: us(o.retention),
            rollup_us: us(o.rollup_retention),
            batch: i64::try_from(o.prune_batch.max(1)).unwrap_or(1000),
        }
    }
}

/// What one request sees: committed state, the batch so far, and its own changes.
struct Ctx<'a> {
    committed: (&'a SeriesDir, &'a FxMap<i64, SeriesMem>),
    batch: &'a Delta,
    req: &'a mut Delta,
    policy: Policy,
    retention: Retention,
}

impl Ctx<'_> {
    /// The id of a series: known, looked up in `series`, or a new row with the endpoint's parts.
    fn series_id(
        &mut self,
        tx: &Connection,
        key: &SeriesKey,
        parts: &EndpointParts,
    ) -> Result<i64, StoreError> {
        let ident = ident_of(key, parts);
        if let Some(id) = self
            .req
            .ids
            .get(ident)
            .or_else(|| self.batch.ids.get(ident))
            .or_else(|| self.committed.0.get(ident))
        {
            return Ok(id);
        }
        let found: Option<i64> = tx
            .prepare_cached(
                "SELECT id FROM series WHERE target = ?1 AND endpoint = ?2 AND check_name = ?3
                     AND region = ?4",
            )?
            .query_row(
                params![key.target, key.endpoint, key.check, key.region],
                |r| r.get(0),
            )
            .optional()?;
        let id = match found {
            Some(id) => id,
            None => {
                tx.prepare_cached(
                    "INSERT INTO series (target, endpoint, check_name, region, host, ip, port, family)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?
                .execute(params![
                    key.target,
                    key.endpoint,
                    key.check,
                    key.region,
                    parts.host,
                    parts.ip,
                    parts.port,
                    parts.family
                ])?;
                let id = tx.last_insert_rowid();
                self.req.series.insert(id, SeriesMem::default());
                id
            }
        };
        self.req.ids.insert(owned(ident), id);
        Ok(id)
    }

    /// The current state of a series (loading it from `series` on first touch).
    fn series(&mut self, tx: &Connection, id: i64) -> Result<&mut SeriesMem, StoreError> {
        if !self.req.series.contains_key(&id) {
            let found = match self
                .batch
                .series
                .get(&id)
                .or_else(|| self.committed.1.get(&id))
            {
                Some(s) => s.clone(),
                None => load_series(tx, id)?.unwrap_or_default(),
            };
            self.req.series.insert(id, found);
        }
        self.req
            .series
            .get_mut(&id)
            .ok_or(StoreError::OutOfRange("series cache"))
    }
}

fn load_series(tx: &Connection, id: i64) -> Result<Option<SeriesMem>, StoreError> {
    let mut st = tx.prepare_cached(
        "SELECT last_outcome, last_error, last_message, last_seen_us, interval_ms, failing, streak,
             state_since_us, agent_id, last_phase, last_facts
         FROM series WHERE id = ?1",
    )?;
    let row = st
        .query_row([id], |r| {
            Ok((
                SeriesMem {
                    last_outcome: r.get(0)?,

                    last_seen_us: r.get(3)?,
                    interval_ms: r.get(4)?,
                    hyst: Hysteresis {
                        failing: r.get::<_, i64>(5)? != 0,
                        streak: u32::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                    },
                    state_since_us: r.get(7)?,
                    latest: Arc::new(Latest {
                        agent_id: Arc::from(r.get::<_, String>(8)?),
                        body: Bytes::new(),
                    }),
                },
                pb::ProbeResult {
                    error_class: r.get(1)?,
                    message: r.get(2)?,
                    phase: r.get(9)?,
                    ..Default::default()
                },
                r.get::<_, String>(10)?,
            ))
        })
        .optional()?;
    let Some((mut s, mut latest, facts)) = row else {
        return Ok(None);
    };
    latest.facts = super::read::facts_from_json(&facts)?;
    if let Some(l) = Arc::get_mut(&mut s.latest) {
        l.body = Bytes::from(super::row::encode_body(&latest));
    }
    Ok(Some(s))
}

/// Writes the rows of the series `ids` from their state in memory, in id order.
fn write_series(
    tx: &Connection,
    ids: &FxSet<i64>,
    state: &FxMap<i64, SeriesMem>,
) -> Result<(), StoreError> {
    let mut st = tx.prepare_cached(
        "UPDATE series SET last_outcome = ?2, last_error = ?3, last_message = ?4, last_seen_us = ?5,
             interval_ms = ?6, failing = ?7, streak = ?8, state_since_us = ?9, agent_id = ?10,
             last_phase = ?11, last_facts = ?12
         WHERE id = ?1",
    )?;
    let mut ids: Vec<i64> = ids.iter().copied().collect();
    ids.sort_unstable();
    for id in ids {
        let Some(s) = state.get(&id) else {
            continue;
        };
        // The body was read when it was stored: it reads again.
        let latest = ResultView::parse(&s.latest.body).unwrap_or_default();
        st.execute(params![
            id,
            s.last_outcome,
            latest.error_class,
            latest.message,
            s.last_seen_us,
            s.interval_ms,
            i64::from(s.hyst.failing),
            i64::from(s.hyst.streak),
            s.state_since_us,
            &*s.latest.agent_id,
            latest.phase,
            super::read::facts_to_json(&latest.facts),
        ])?;
    }
    Ok(())
}

/// Writes buffered hour and day aggregates into `rollups`, with the week rows merged from the
/// days: a new row is inserted, an existing one read, merged and updated in place. Rows no window
/// reads any more (results that arrived late) are not written. Rows are written in key order, so
/// the b-tree is walked forward once.
fn write_rollups(
    tx: &Connection,
    buffered: &FxMap<LevelKey, Agg>,
    now_us: i64,
) -> Result<(), StoreError> {
    let mut weeks: FxMap<LevelKey, Agg> = FxMap::default();
    for (&(level, bucket, id), a) in buffered {
        if level == Level::Day {
            weeks
                .entry((Level::Week, Level::Week.bucket(bucket), id))
                .or_default()
                .merge(a);
        }
    }
    let kept =
        |level: Level, bucket: i64| level.keep_from(now_us).is_none_or(|from| bucket >= from);
    let mut rows: Vec<(LevelKey, &Agg)> = buffered
        .iter()
        .chain(weeks.iter())
        .map(|(&k, a)| (k, a))
        .filter(|((level, bucket, _), _)| kept(*level, *bucket))
        .collect();
    rows.sort_unstable_by_key(|(k, _)| (k.0.code(), k.1, k.2));
    let mut get = tx.prepare_cached(
        "SELECT count, ok, warn, fail, sketches FROM rollups
         WHERE level = ?1 AND bucket_us = ?2 AND series_id = ?3",
    )?;
    let mut ins = tx.prepare_cached(
        "INSERT INTO rollups (level, bucket_us, series_id, count, ok, warn, fail, sketches)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT DO NOTHING",
    )?;
    let mut upd = tx.prepare_cached(
        "UPDATE rollups SET count = ?4, ok = ?5, warn = ?6, fail = ?7, sketches = ?8
         WHERE level = ?1 AND bucket_us = ?2 AND series_id = ?3",
    )?;
    let mut bytes = Vec::with_capacity(256);
    for ((level, bucket, id), add) in rows {
        // Hour rows are usually new: insert first, read only on a conflict. Day and week rows
        // usually exist: read first.
        if level == Level::Hour {
            add.sketches_into(&mut bytes);
            if put_rollup(&mut ins, (level, bucket, id), add, &bytes)? == 1 {
                continue;
            }
        }
        let stored = get
            .query_row(params![level.code(), bucket, id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                ))
            })
            .optional()?;
        let Some((count, ok, warn, fail, blob)) = stored else {
            add.sketches_into(&mut bytes);
            if put_rollup(&mut ins, (level, bucket, id), add, &bytes)? != 1 {
                return Err(StoreError::OutOfRange("rollup row vanished"));
            }
            continue;
        };
        let mut agg = Agg {
            count: unsigned(count),
            ok: unsigned(ok),
            warn: unsigned(warn),
            fail: unsigned(fail),
            // A damaged blob loses its old latency, not the new results.
            phases: Agg::sketches_from_bytes(&blob, None).unwrap_or_else(|| {
                tracing::warn!(
                    level = level.name(),
                    bucket_us = bucket,
                    "damaged rollup sketch replaced"
                );
                Default::default()
            }),
        };
        agg.merge(add);
        agg.sketches_into(&mut bytes);
        put_rollup(&mut upd, (level, bucket, id), &agg, &bytes)?;
    }
    Ok(())
}

/// Runs the rollup INSERT or UPDATE, whose parameters are both (level, bucket, series, counts,
/// sketches); returns the rows changed.
fn put_rollup(
    st: &mut rusqlite::CachedStatement<'_>,
    (level, bucket, id): LevelKey,
    a: &Agg,
    sketches: &[u8],
) -> Result<usize, StoreError> {
    Ok(st.execute(params![
        level.code(),
        bucket,
        id,
        to_i64(a.count)?,
        to_i64(a.ok)?,
        to_i64(a.warn)?,
        to_i64(a.fail)?,
        sketches,
    ])?)
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Applies one request inside a savepoint. The flag is false when the enclosing transaction
/// can no longer be trusted (SQLite rolled it back, or the savepoint could not be undone); the
/// error returned is always the request's own (e.g. `SQLITE_FULL`), not the follow-up one.
fn apply_isolated(
    tx: &mut Transaction<'_>,
    op: Op,
    ctx: &mut Ctx<'_>,
) -> (Result<Reply, StoreError>, bool) {
    let mut sp = match tx.savepoint() {
        Ok(sp) => sp,
        Err(e) => return (Err(e.into()), false),
    };
    match apply(&sp, op, ctx) {
        Ok(r) => match sp.commit() {
            Ok(()) => (Ok(r), true),
            Err(e) => (Err(e.into()), false),
        },
        Err(e) => {
            let intact = sp.rollback().is_ok() && !sp.is_autocommit();
            (Err(e), intact)
        }
    }
}

fn apply(tx: &Connection, op: Op, ctx: &mut Ctx<'_>) -> Result<Reply, StoreError> {
    match op {
        Op::Hello(h) => hello(tx, &h).map(Reply::Seq),
        Op::Results {
            agent_id,
            results,
            prepared,
            rejected,
            at_us,
        } => {
            let before: Option<i64> = tx
                .query_row(
                    "SELECT stored_up_to_seq FROM agents WHERE id = ?1",
                    [&agent_id],
                    |r| r.get(0),
                )
                .optional()?;
            let seq = store_results(tx, ctx, &agent_id, results, prepared, at_us)?;
            skip_rejected(tx, &agent_id, &rejected, before.unwrap_or(0), seq).map(Reply::Seq)
        }
        Op::Prune { now_us } => prune(tx, ctx.retention, now_us).map(Reply::Pruned),
        Op::Heartbeat {
            agent_id,
            spool_depth,
            dropped_total,
            at_us,
        } => {
            let n = tx.execute(
                "UPDATE agents SET spool_depth = ?1, dropped_total = ?2, last_seen_us = max(last_seen_us, ?3)
                 WHERE id = ?4",
                params![to_i64(spool_depth)?, to_i64(dropped_total)?, at_us, agent_id],
            )?;
            if n == 0 {
                return Err(StoreError::UnknownAgent(agent_id));
            }
            Ok(Reply::Done)
        }
        Op::PutTarget { def, update, at_us } => {
            let exists = tx
                .query_row("SELECT 1 FROM targets WHERE name = ?1", [&def.name], |_| {
                    Ok(())
                })
                .optional()?
                .is_some();
            let spec = serde_json::to_string(&def)?;
            match (exists, update) {
                (true, false) => return Err(StoreError::TargetExists(def.name)),
                (false, true) => return Err(StoreError::TargetNotFound(def.name)),
                (false, false) => {
                    tx.execute(
                        "INSERT INTO targets (name, spec, created_us, updated_us) VALUES (?1, ?2, ?3, ?3)",
                        params![def.name, spec, at_us],
                    )?;
                }
                (true, true) => {
                    tx.execute(
                        "UPDATE targets SET spec = ?2, updated_us = ?3 WHERE name = ?1",
                        params![def.name, spec, at_us],
                    )?;
                }
            }
            Ok(Reply::Done)
        }
        Op::RemoveTarget { name } => {
            if tx.execute("DELETE FROM targets WHERE name = ?1", [&name])? == 0 {
                return Err(StoreError::TargetNotFound(name));
            }
            Ok(Reply::Done)
        }
        // Taken out of the batch by `commit_batch`, answered after the rollup write.
        Op::Sync => Ok(Reply::Done),
    }
}

/// Counts refused seqs above the agent's high-water mark before the batch (`before`) and raises
/// the mark (`hwm`, already past the batch's stored results) past them, so the spool moves on.
fn skip_rejected(
    tx: &Connection,
    agent_id: &str,
    rejected: &[u64],
    before: i64,
    hwm: u64,
) -> Result<u64, StoreError> {
    let Some(&last) = rejected.iter().max() else {
        return Ok(hwm);
    };
    // Seqs at or below the mark before this batch were counted when first sent.
    let first_time = rejected
        .iter()
        .filter(|s| i64::try_from(**s).is_ok_and(|s| s > before))
        .count();
    let fresh = i64::try_from(first_time).unwrap_or(i64::MAX);
    let up_to = hwm.max(last);
    tx.execute(
        "UPDATE agents SET rejected_total = rejected_total + ?1, stored_up_to_seq = max(stored_up_to_seq, ?2)
         WHERE id = ?3",
        params![fresh, to_i64(up_to)?, agent_id],
    )?;
    Ok(up_to)
}

fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::OutOfRange("integer above 2^63"))
}

fn hello(tx: &Connection, h: &AgentHello) -> Result<u64, StoreError> {
    let labels = serde_json::to_string(&h.labels)?;
    tx.execute(
        "INSERT INTO agents (id, region, version, labels, first_seen_us, last_seen_us, dropped_total, num)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, (SELECT coalesce(max(num), 0) + 1 FROM agents))
         ON CONFLICT (id) DO UPDATE SET region = excluded.region, version = excluded.version,
             labels = excluded.labels, last_seen_us = max(last_seen_us, excluded.last_seen_us),
             dropped_total = excluded.dropped_total",
        params![h.id, h.region, h.version, labels, h.at_us, to_i64(h.dropped_total)?],
    )?;
    tx.execute("DELETE FROM agent_targets WHERE agent_id = ?1", [&h.id])?;
    let mut ins = tx.prepare_cached(
        "INSERT OR REPLACE INTO agent_targets (agent_id, name, spec, reported_us) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for t in &h.local_targets {
        ins.execute(params![h.id, t.name, serde_json::to_string(t)?, h.at_us])?;
    }
    let hwm: i64 = tx.query_row(
        "SELECT stored_up_to_seq FROM agents WHERE id = ?1",
        [&h.id],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(hwm).unwrap_or(0))
}

/// Inserts the results above the agent's high-water mark, raises the mark, and adds each result
/// to its series' hysteresis and to the in-memory rollups (no per-result SQL beyond the insert).
fn store_results(
    tx: &Connection,
    ctx: &mut Ctx<'_>,
    agent_id: &str,
    results: Vec<Bytes>,
    prepared: Prepared,
    at_us: i64,
) -> Result<u64, StoreError> {
    let agent: Option<(i64, i64)> = tx
        .prepare_cached("SELECT stored_up_to_seq, num FROM agents WHERE id = ?1")?
        .query_row([agent_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((mut hwm, agent_num)) = agent else {
        return Err(StoreError::UnknownAgent(agent_id.to_string()));
    };
    // One copy of the agent's id for every series this batch updates.
    let agent: Arc<str> = Arc::from(agent_id);
    let policy = ctx.policy;
    let Prepared {
        region,
        series,
        rows,
        hours,
        ascending,
    } = prepared;
    if rows.len() != results.len() {
        return Err(StoreError::OutOfRange("prepared results"));
    }
    // A result as sent, read again (it was read when the batch arrived).
    let view = |i: usize| {
        ResultView::parse(&results[i]).map_err(|_| StoreError::OutOfRange("stored result"))
    };
    // No duplicate in the batch: its aggregates, made by the ingest task, are exactly what is
    // stored. Otherwise only the stored results are aggregated, here.
    let all_new = ascending && rows.first().is_none_or(|(_, row, _)| row.seq > hwm);
    let mut ids = Vec::with_capacity(series.len());
    for s in &series {
        ids.push(match s {
            SeriesRef::Known(id) => *id,
            SeriesRef::New(key, parts) => ctx.series_id(tx, key, parts)?,
        });
    }
    if all_new {
        ctx.req.hours.extend(
            hours
                .into_iter()
                .map(|(bucket, k, a)| ((bucket, ids[k as usize]), a)),
        );
    }
    let mut insert = tx.prepare_cached(
        "INSERT INTO results (series_id, agent_num, seq, start_us, outcome, total_us, stored_at_us, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for (i, (k, row, interval_ms)) in rows.iter().enumerate() {
        if row.seq <= hwm {
            ctx.req.duplicates += 1;
            continue;
        }
        let id = ids[*k as usize];
        insert.execute(params![
            id,
            agent_num,
            row.seq,
            row.start_us,
            row.outcome,
            row.total_us,
            at_us,
            &row.body[..],
        ])?;
        ctx.req.last_id = tx.last_insert_rowid();
        if !all_new {
            let mut a = Agg::default();
            a.add_view(&view(i)?);
            ctx.req
                .hours
                .push(((Level::Hour.bucket(row.start_us), id), a));
        }
        let interval = to_i64(*interval_ms)?;
        let s = ctx.series(tx, id)?;
        let was = state_name(s.hyst.failing);
        let (changed, replaced) = s.observe(
            row.start_us,
            row.outcome,
            interval,
            &row.body,
            &agent,
            policy,
        );
        let now = state_name(s.hyst.failing);
        if let Some(old) = replaced {
            ctx.req.garbage.push(Box::new(old));
        }
        if changed {
            let r = view(i)?;
            ctx.req.events.push(pb::WatchEvent {
                target: r.target.to_string(),
                endpoint: endpoint_label(&r),
                check: r.check.to_string(),
                region: region.clone(),
                old_state: was.to_string(),
                new_state: now.to_string(),
                at_us: r.start_us,
                error_class: r.error_class.to_string(),
            });
        }
        ctx.req.stored += 1;
        hwm = row.seq;
    }
    ctx.req.garbage.push(Box::new((results, rows, series, ids)));
    tx.prepare_cached(
        "UPDATE agents SET stored_up_to_seq = ?1, last_seen_us = max(last_seen_us, ?2) WHERE id = ?3",
    )?
    .execute(params![hwm, at_us, agent_id])?;
    Ok(u64::try_from(hwm).unwrap_or(0))
}

/// The persisted state names (`stale` is decided at read time from the clock).
fn state_name(failing: bool) -> &'static str {
    if failing {
        RegionState::Failing.name()
    } else {
        RegionState::Ok.name()
    }
}

/// One round of the retention job: deletes at most `batch` raw results stored before the raw
/// retention (oldest rows first, by rowid, which follows storage time), and at most `batch`
/// rollup rows per level older than the rollup retention or than the level is read for
/// ([`Level::keep_from`]). Returns the number of rows deleted.
fn prune(tx: &Connection, ret: Retention, now_us: i64) -> Result<u64, StoreError> {
    let mut deleted = tx.execute(
        "DELETE FROM results WHERE id IN (SELECT id FROM results ORDER BY id LIMIT ?1)
             AND stored_at_us < ?2",
        params![ret.batch, now_us.saturating_sub(ret.raw_us)],
    )?;
    for level in Level::ALL {
        deleted += tx.execute(
            "DELETE FROM rollups WHERE (level, bucket_us, series_id) IN
                 (SELECT level, bucket_us, series_id FROM rollups
                  WHERE level = ?1 AND bucket_us < ?2 LIMIT ?3)",
            params![
                level.code(),
                level
                    .bucket(now_us.saturating_sub(ret.rollup_us))
                    .max(level.keep_from(now_us).unwrap_or(i64::MIN)),
                ret.batch
            ],
        )?;
    }
    Ok(deleted as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{open_write, schema, SCHEMA_VERSION};

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

    #[test]
    fn series_dir_finds_exactly_the_ident_it_was_given() {
        let mut dir = SeriesDir::default();
        dir.insert(owned(("eu", "a", "smtp", "mx1", "198.18.0.1", 25)), 7);
        dir.insert(owned(("eu", "a", "smtp", "mx1", "198.18.0.1", 587)), 8);
        assert_eq!(
            dir.get(("eu", "a", "smtp", "mx1", "198.18.0.1", 25)),
            Some(7)
        );
        assert_eq!(
            dir.get(("eu", "a", "smtp", "mx1", "198.18.0.1", 587)),
            Some(8)
        );
        // The same bytes split differently are another series.
        assert_eq!(dir.get(("eu", "as", "mtp", "mx1", "198.18.0.1", 25)), None);
        assert_eq!(dir.get(("us", "a", "smtp", "mx1", "198.18.0.1", 25)), None);
        // A known ident keeps its first id.
        dir.insert(owned(("eu", "a", "smtp", "mx1", "198.18.0.1", 25)), 9);
        assert_eq!(
            dir.get(("eu", "a", "smtp", "mx1", "198.18.0.1", 25)),
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
