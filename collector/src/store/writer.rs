//! The single writer: a thread that owns the write connection, takes requests from a channel,
//! applies up to `batch_max` of them (or what arrives within `linger`) in one transaction and
//! answers each request only after COMMIT returned.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use mxscope_proto::pb;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::oneshot;

use super::{bump, AgentHello, StoreError, StoreOptions, TargetDef, WriterStats};

/// A write operation.
pub(crate) enum Op {
    Hello(AgentHello),
    Results {
        agent_id: String,
        region: String,
        results: Vec<pb::ProbeResult>,
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
}

/// What a committed operation returns.
pub(crate) enum Reply {
    /// The agent's stored-up-to seq.
    Seq(u64),
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

pub(crate) fn spawn(
    conn: Connection,
    rx: Receiver<Msg>,
    opts: StoreOptions,
    stats: Arc<WriterStats>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("mxscope-db-writer".into())
        .spawn(move || run(conn, rx, opts, &stats))
}

fn run(mut conn: Connection, rx: Receiver<Msg>, opts: StoreOptions, stats: &WriterStats) {
    let batch_max = opts.batch_max.max(1);
    loop {
        let first = match rx.recv() {
            Ok(Msg::Write(r)) => r,
            Ok(Msg::Close) | Err(_) => break,
        };
        let mut batch = vec![first];
        let deadline = Instant::now() + opts.linger;
        let mut closing = false;
        while batch.len() < batch_max {
            let next = match rx.try_recv() {
                Ok(m) => Ok(m),
                Err(TryRecvError::Disconnected) => Err(()),
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline {
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
                Ok(Msg::Write(r)) => batch.push(r),
                Ok(Msg::Close) | Err(()) => {
                    closing = true;
                    break;
                }
            }
        }
        commit_batch(&mut conn, batch, stats);
        if closing {
            break;
        }
    }
    if let Err((_, err)) = conn.close() {
        tracing::warn!(error = %err, "closing the database writer connection failed");
    }
    tracing::debug!("database writer stopped");
}

/// Applies each request inside its own savepoint (a failing request does not spoil the others),
/// commits once, then answers every request.
fn commit_batch(conn: &mut Connection, batch: Vec<Request>, stats: &WriterStats) {
    let n = batch.len() as u64;
    let mut answers: Vec<(oneshot::Sender<_>, Result<Reply, StoreError>)> =
        Vec::with_capacity(batch.len());
    let outcome = (|| -> Result<(), rusqlite::Error> {
        let mut tx = conn.transaction()?;
        for Request { op, reply } in batch {
            let res = apply_isolated(&mut tx, op);
            answers.push((reply, res));
        }
        tx.commit()
    })();
    bump(&stats.transactions, 1);
    bump(&stats.requests, n);
    match outcome {
        Ok(()) => {
            for (reply, res) in answers {
                let _ = reply.send(res);
            }
        }
        Err(err) => {
            tracing::error!(error = %err, requests = n, "database transaction failed");
            let err = Arc::new(err);
            for (reply, res) in answers {
                // Requests that failed on their own keep their error; the rest were rolled back.
                let res = res.and(Err(StoreError::Commit(err.clone())));
                let _ = reply.send(res);
            }
        }
    }
}

fn apply_isolated(tx: &mut Transaction<'_>, op: Op) -> Result<Reply, StoreError> {
    let mut sp = tx.savepoint()?;
    match apply(&sp, op) {
        Ok(r) => {
            sp.commit()?;
            Ok(r)
        }
        Err(e) => {
            sp.rollback()?;
            Err(e)
        }
    }
}

fn apply(tx: &Connection, op: Op) -> Result<Reply, StoreError> {
    match op {
        Op::Hello(h) => hello(tx, &h).map(Reply::Seq),
        Op::Results {
            agent_id,
            region,
            results,
            at_us,
        } => store_results(tx, &agent_id, &region, &results, at_us).map(Reply::Seq),
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
    }
}

fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::OutOfRange("integer above 2^63"))
}

fn hello(tx: &Connection, h: &AgentHello) -> Result<u64, StoreError> {
    let labels = serde_json::to_string(&h.labels)?;
    tx.execute(
        "INSERT INTO agents (id, region, version, labels, first_seen_us, last_seen_us, dropped_total)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)
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

/// Inserts the results above the agent's high-water mark, upserts their series, raises the mark.
fn store_results(
    tx: &Connection,
    agent_id: &str,
    region: &str,
    results: &[pb::ProbeResult],
    at_us: i64,
) -> Result<u64, StoreError> {
    let hwm: Option<i64> = tx
        .query_row(
            "SELECT stored_up_to_seq FROM agents WHERE id = ?1",
            [agent_id],
            |r| r.get(0),
        )
        .optional()?;
    let Some(mut hwm) = hwm else {
        return Err(StoreError::UnknownAgent(agent_id.to_string()));
    };
    let mut insert = tx.prepare_cached(
        "INSERT INTO results (agent_id, seq, region, target, endpoint, host, ip, port, family, check_name,
             start_us, outcome, error_class, phase, total_us, timings, facts, message, interval_ms, stored_at_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
    )?;
    let mut series = tx.prepare_cached(
        "INSERT INTO series (target, endpoint, check_name, region, last_outcome, last_error, last_message,
             last_seen_us, interval_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (target, endpoint, check_name, region) DO UPDATE SET
             last_outcome = excluded.last_outcome, last_error = excluded.last_error,
             last_message = excluded.last_message, last_seen_us = excluded.last_seen_us,
             interval_ms = excluded.interval_ms
         WHERE excluded.last_seen_us >= series.last_seen_us",
    )?;
    for r in results {
        let seq = to_i64(r.seq)?;
        if seq <= hwm {
            continue;
        }
        let row = Row::of(r);
        let interval = to_i64(r.interval_ms)?;
        insert.execute(params![
            agent_id,
            seq,
            region,
            r.target,
            row.endpoint,
            row.host,
            row.ip,
            row.port,
            row.family,
            r.check,
            r.start_us,
            r.outcome,
            r.error_class,
            r.phase,
            row.total_us,
            row.timings,
            row.facts,
            r.message,
            interval,
            at_us,
        ])?;
        series.execute(params![
            r.target,
            row.endpoint,
            r.check,
            region,
            r.outcome,
            r.error_class,
            r.message,
            r.start_us,
            interval,
        ])?;
        hwm = seq;
    }
    tx.execute(
        "UPDATE agents SET stored_up_to_seq = ?1, last_seen_us = max(last_seen_us, ?2) WHERE id = ?3",
        params![hwm, at_us, agent_id],
    )?;
    Ok(u64::try_from(hwm).unwrap_or(0))
}

/// The derived columns of a result row.
struct Row {
    endpoint: String,
    host: String,
    ip: String,
    port: i64,
    family: i32,
    total_us: Option<i64>,
    timings: String,
    facts: String,
}

impl Row {
    fn of(r: &pb::ProbeResult) -> Row {
        let (endpoint, host, ip, port, family) = match &r.endpoint {
            Some(e) => (
                mxscope_proto::endpoint_label(e),
                e.host.clone(),
                e.ip.clone(),
                i64::from(e.port),
                e.family,
            ),
            None => (r.target.clone(), r.target.clone(), String::new(), 0, 0),
        };
        let total_us = r
            .timings
            .iter()
            .find(|t| t.phase == "total")
            .map(|t| i64::try_from(t.micros).unwrap_or(i64::MAX));
        let timings: Vec<(&str, u64)> = r
            .timings
            .iter()
            .map(|t| (t.phase.as_str(), t.micros))
            .collect();
        let facts: Vec<(&str, serde_json::Value)> = r
            .facts
            .iter()
            .map(|f| (f.key.as_str(), super::read::fact_to_json(f.value.as_ref())))
            .collect();
        Row {
            endpoint,
            host,
            ip,
            port,
            family,
            total_us,
            // Serializing strings and numbers into a Vec cannot fail; fall back to an empty array.
            timings: serde_json::to_string(&timings).unwrap_or_else(|_| "[]".into()),
            facts: serde_json::to_string(&facts).unwrap_or_else(|_| "[]".into()),
        }
    }
}
