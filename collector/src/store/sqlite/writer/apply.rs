//! The SQL work of each write request inside the batch's transaction: hello, results (with
//! rollups and series state), targets, flushes of the buffer and retention rounds.

use super::*;
use crate::store::sqlite::target::to_json;

/// Cut-offs of the retention job, as durations in microseconds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Retention {
    pub(super) raw_us: i64,
    pub(super) rollup_us: i64,
    pub(super) batch: i64,
}

impl Retention {
    pub(super) fn of(o: &StoreOptions) -> Retention {
        let us = |d: std::time::Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Retention {
            raw_us: us(o.retention),
            rollup_us: us(o.rollup_retention),
            batch: i64::try_from(o.prune_batch.max(1)).unwrap_or(1000),
        }
    }
}

/// What one request sees: committed state, the batch so far, and its own changes.
pub(super) struct Ctx<'a> {
    pub(super) committed: (&'a SeriesDir, &'a FxMap<i64, SeriesMem>),
    pub(super) batch: &'a Delta,
    pub(super) req: &'a mut Delta,
    pub(super) policy: Policy,
    pub(super) retention: Retention,
}

impl Ctx<'_> {
    /// The id of a series: known, looked up in `series`, or a new row with the endpoint's parts.
    pub(super) fn series_id(
        &mut self,
        tx: &Connection,
        key: &SeriesKey,
        parts: &EndpointParts,
    ) -> Result<i64, StoreError> {
        let ident = Ident::of(key, parts);
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
        self.req.ids.insert(ident.to_owned_ident(), id);
        Ok(id)
    }

    /// The current state of a series (loading it from `series` on first touch).
    pub(super) fn series(
        &mut self,
        tx: &Connection,
        id: i64,
    ) -> Result<&mut SeriesMem, StoreError> {
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

pub(super) fn load_series(tx: &Connection, id: i64) -> Result<Option<SeriesMem>, StoreError> {
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
    latest.facts = crate::store::sqlite::read::facts_from_json(&facts)?;
    if let Some(l) = Arc::get_mut(&mut s.latest) {
        l.body = Bytes::from(crate::store::row::encode_body(&latest));
    }
    Ok(Some(s))
}

/// Writes the rows of the series `ids` from their state in memory, in id order.
pub(super) fn write_series(
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
            crate::store::sqlite::read::facts_to_json(&latest.facts),
        ])?;
    }
    Ok(())
}

/// Writes buffered hour and day aggregates into `rollups`, with the week rows merged from the
/// days: a new row is inserted, an existing one read, merged and updated in place. Rows no window
/// reads any more (results that arrived late) are not written. Rows are written in key order, so
/// the b-tree is walked forward once.
pub(super) fn write_rollups(
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
pub(super) fn put_rollup(
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

pub(super) fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Applies one request inside a savepoint. The flag is false when the enclosing transaction
/// can no longer be trusted (SQLite rolled it back, or the savepoint could not be undone); the
/// error returned is always the request's own (e.g. `SQLITE_FULL`), not the follow-up one.
pub(super) fn apply_isolated(
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

pub(super) fn apply(tx: &Connection, op: Op, ctx: &mut Ctx<'_>) -> Result<Reply, StoreError> {
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
        Op::PutTarget {
            target,
            update,
            at_us,
        } => {
            let exists = tx
                .query_row(
                    "SELECT 1 FROM targets WHERE name = ?1",
                    [&target.name],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            let spec = to_json(&target)?;
            match (exists, update) {
                (true, false) => return Err(StoreError::TargetExists(target.name)),
                (false, true) => return Err(StoreError::TargetNotFound(target.name)),
                (false, false) => {
                    tx.execute(
                        "INSERT INTO targets (name, spec, created_us, updated_us) VALUES (?1, ?2, ?3, ?3)",
                        params![target.name, spec, at_us],
                    )?;
                }
                (true, true) => {
                    tx.execute(
                        "UPDATE targets SET spec = ?2, updated_us = ?3 WHERE name = ?1",
                        params![target.name, spec, at_us],
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
pub(super) fn skip_rejected(
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

pub(super) fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::OutOfRange("integer above 2^63"))
}

pub(super) fn hello(tx: &Connection, h: &AgentHello) -> Result<u64, StoreError> {
    let labels = serde_json::to_string(&h.labels)?;
    tx.execute(
        "INSERT INTO agents (id, region, version, labels, first_seen_us, last_seen_us, dropped_total, num,
             collector, cert_not_after_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, (SELECT coalesce(max(num), 0) + 1 FROM agents), ?7, ?8)
         ON CONFLICT (id) DO UPDATE SET region = excluded.region, version = excluded.version,
             labels = excluded.labels, last_seen_us = max(last_seen_us, excluded.last_seen_us),
             dropped_total = excluded.dropped_total, collector = excluded.collector,
             cert_not_after_us = excluded.cert_not_after_us",
        params![
            h.id,
            h.region,
            h.version,
            labels,
            h.at_us,
            to_i64(h.dropped_total)?,
            h.collector,
            h.cert_not_after_us
        ],
    )?;
    tx.execute("DELETE FROM agent_targets WHERE agent_id = ?1", [&h.id])?;
    let mut ins = tx.prepare_cached(
        "INSERT OR REPLACE INTO agent_targets (agent_id, name, spec, reported_us) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for t in &h.local_targets {
        ins.execute(params![h.id, t.name, to_json(t)?, h.at_us])?;
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
pub(super) fn store_results(
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
        let was_failing = s.hyst.failing;
        let (changed, replaced) = s.observe(
            row.start_us,
            row.outcome,
            interval,
            &row.body,
            &agent,
            policy,
        );
        if let Some(old) = replaced {
            ctx.req.garbage.push(Box::new(old));
        }
        if changed {
            let e = state_event(&view(i)?, &region, was_failing);
            tx.prepare_cached(
                "INSERT INTO changes (at_us, target, check_name, region, endpoint, old_state,
                     new_state, error_class, via_mx) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                e.at_us,
                e.target,
                e.check,
                e.region,
                e.endpoint,
                e.old_state,
                e.new_state,
                e.error_class,
                e.via_mx
            ])?;
            ctx.req.events.push(e);
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

/// One round of the retention job: deletes at most `batch` raw results stored before the raw
/// retention (oldest rows first, by rowid, which follows storage time), and at most `batch`
/// rollup rows per level older than the rollup retention or than the level is read for
/// ([`Level::keep_from`]). Returns the number of rows deleted.
pub(super) fn prune(tx: &Connection, ret: Retention, now_us: i64) -> Result<u64, StoreError> {
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
    // State changes are the timeline of the rollups' span.
    deleted += tx.execute(
        "DELETE FROM changes WHERE id IN
             (SELECT id FROM changes WHERE at_us < ?1 LIMIT ?2)",
        params![now_us.saturating_sub(ret.rollup_us), ret.batch],
    )?;
    Ok(deleted as u64)
}
