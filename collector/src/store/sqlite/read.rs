//! Read side: a small pool of read-only connections (WAL lets them read while the writer commits)
//! and the queries behind status, results, agents and targets.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use mxscope_proto::pb;
use mxscope_proto::raw::{FactValue, FactView};
use mxscope_proto::target::Target;
use rusqlite::types::Value;
use rusqlite::{params_from_iter, Connection, OpenFlags};

use super::target::{self, Stored};
use super::writer::FxMap;
use super::SqliteError;
use crate::analysis::aggregate::Agg;
use crate::store::rollup::{plan, RAW_BUCKET_US};
use crate::store::row::decode_body;
use crate::store::{AgentRow, Filter, Sample, SeriesId, SeriesRow, StoreError};

/// Idle read connections, reused; a new one is opened when none is idle.
pub(crate) struct Pool {
    path: PathBuf,
    max_idle: usize,
    idle: Mutex<Vec<Connection>>,
}

impl Pool {
    pub(crate) fn new(path: PathBuf, max_idle: usize) -> Pool {
        Pool {
            path,
            max_idle,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on an idle or new connection (blocking).
    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.idle.lock().ok().and_then(|mut v| v.pop());
        let conn = match conn {
            Some(c) => c,
            None => self.open()?,
        };
        let res = f(&conn);
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.max_idle {
                idle.push(conn);
            }
        }
        res
    }

    fn open(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| SqliteError::Open {
            path: self.path.clone(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // Long-window queries scan rollups: a larger cache and a shared mapping of the file.
        conn.pragma_update(None, "cache_size", -32_768)?;
        let _: i64 = conn.query_row("PRAGMA mmap_size=1073741824", [], |r| r.get(0))?;
        Ok(conn)
    }
}

/// The central targets; one this version refuses is an error that names it (they were validated
/// when put, so only a newer collector or a hand edit leaves such a row).
pub(crate) fn central_targets(c: &Connection) -> Result<Vec<Target>, StoreError> {
    let mut st = c.prepare_cached("SELECT spec FROM targets ORDER BY name")?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for spec in rows {
        match target::from_json(&spec?)? {
            Stored::Valid(t) => out.push(t),
            Stored::Refused { name, error } => {
                return Err(StoreError::BadTarget {
                    name,
                    source: error,
                })
            }
        }
    }
    Ok(out)
}

/// The agent-local targets as (agent id, region, target). One this version refuses is left out and
/// logged: earlier versions stored what agents reported without validating it, and the agent's
/// next hello replaces the row.
pub(crate) fn local_targets(c: &Connection) -> Result<Vec<(String, String, Target)>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT t.agent_id, coalesce(a.region, ''), t.spec FROM agent_targets t
         LEFT JOIN agents a ON a.id = t.agent_id ORDER BY t.name, t.agent_id",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (agent, region, spec) = row?;
        match target::from_json(&spec)? {
            Stored::Valid(t) => out.push((agent, region, t)),
            Stored::Refused { name, error } => {
                tracing::warn!(agent.id = %agent, target.name = %name, error = %error,
                    "stored local target left out: this collector refuses it");
            }
        }
    }
    Ok(out)
}

pub(crate) fn agents(c: &Connection) -> Result<Vec<AgentRow>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT id, region, version, labels, first_seen_us, last_seen_us, stored_up_to_seq, dropped_total,
             spool_depth, collector, cert_not_after_us FROM agents ORDER BY id",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            AgentRow {
                id: r.get(0)?,
                region: r.get(1)?,
                version: r.get(2)?,
                labels: BTreeMap::new(),
                first_seen_us: r.get(4)?,
                last_seen_us: r.get(5)?,
                stored_up_to_seq: unsigned(r.get(6)?),
                dropped_total: unsigned(r.get(7)?),
                spool_depth: unsigned(r.get(8)?),
                collector: r.get(9)?,
                cert_not_after_us: r.get(10)?,
            },
            r.get::<_, String>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (mut a, labels) = row?;
        a.labels = serde_json::from_str(&labels)?;
        out.push(a);
    }
    Ok(out)
}

/// Results per agent that started at or after `since_us` (a range of the time index).
pub(crate) fn results_per_agent(
    c: &Connection,
    since_us: i64,
) -> Result<BTreeMap<String, u64>, StoreError> {
    let mut names: FxMap<i64, String> = FxMap::default();
    let mut st = c.prepare_cached("SELECT num, id FROM agents")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        names.insert(r.get::<_, Option<i64>>(0)?.unwrap_or(0), r.get(1)?);
    }
    let mut st = c.prepare_cached(
        "SELECT agent_num, count(*) FROM results WHERE start_us >= ?1 GROUP BY agent_num",
    )?;
    let mut rows = st.query([since_us])?;
    let mut out = BTreeMap::new();
    while let Some(r) = rows.next()? {
        if let Some(name) = names.get(&r.get::<_, i64>(0)?) {
            out.insert(name.clone(), unsigned(r.get(1)?));
        }
    }
    Ok(out)
}

/// SQL `WHERE` fragments for the non-empty fields of a filter.
fn conditions(f: &Filter, columns: &[(&str, &str)]) -> (String, Vec<Value>) {
    let mut sql = String::new();
    let mut args = Vec::new();
    for (column, v) in f.set_columns(columns) {
        args.push(Value::Text(v.clone()));
        sql.push_str(&format!(" AND {column} = ?{}", args.len()));
    }
    (sql, args)
}

/// Series matching the filter, with their agent's last-seen time, ordered for status.
pub(crate) fn series(c: &Connection, f: &Filter) -> Result<Vec<SeriesRow>, StoreError> {
    Ok(series_with_ids(c, f)?.into_iter().map(|(_, s)| s).collect())
}

/// [`series`] with each series' id.
fn series_with_ids(c: &Connection, f: &Filter) -> Result<Vec<(i64, SeriesRow)>, StoreError> {
    let (cond, args) = conditions(
        f,
        &[
            ("target", "s.target"),
            ("check", "s.check_name"),
            ("region", "s.region"),
        ],
    );
    let sql = format!(
        "SELECT s.target, s.endpoint, s.check_name, s.region, s.last_outcome, s.last_error,
             s.last_message, s.last_seen_us, s.interval_ms, s.failing, s.state_since_us, s.agent_id,
             a.last_seen_us, s.last_phase, s.last_facts, s.id
         FROM series s LEFT JOIN agents a ON a.id = s.agent_id
         WHERE 1 = 1{cond} ORDER BY s.target, s.check_name, s.endpoint, s.region"
    );
    let mut st = c.prepare_cached(&sql)?;
    let rows = st.query_map(params_from_iter(args), |r| {
        Ok((
            SeriesRow {
                target: r.get(0)?,
                endpoint: r.get(1)?,
                check: r.get(2)?,
                region: r.get(3)?,
                last_outcome: r.get(4)?,
                last_error: r.get(5)?,
                last_message: r.get(6)?,
                last_seen_us: r.get(7)?,
                interval_ms: unsigned(r.get(8)?),
                failing: r.get::<_, i64>(9)? != 0,
                state_since_us: r.get(10)?,
                agent_id: r.get(11)?,
                agent_last_seen_us: r.get(12)?,
                last_phase: r.get(13)?,
                last_facts: BTreeMap::new(),
            },
            r.get::<_, String>(14)?,
            r.get::<_, i64>(15)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (mut s, facts, id) = row?;
        s.last_facts = facts_text(&facts)?;
        out.push((id, s));
    }
    Ok(out)
}

/// Facts as stored in `series.last_facts`: `[[key, value], ...]` in compact JSON (text as
/// string, numbers as numbers, flags as booleans).
pub(crate) fn facts_to_json(facts: &[FactView<'_>]) -> String {
    let facts: Vec<(&str, serde_json::Value)> = facts
        .iter()
        .map(|f| {
            let v = match f.value {
                None => serde_json::Value::Null,
                Some(FactValue::Text(s)) => serde_json::Value::from(s),
                Some(FactValue::Int(i)) => serde_json::Value::from(i),
                Some(FactValue::Float(x)) => serde_json::Value::from(x),
                Some(FactValue::Flag(b)) => serde_json::Value::from(b),
            };
            (f.key, v)
        })
        .collect();
    // Serializing strings and numbers into a Vec cannot fail; fall back to an empty array.
    serde_json::to_string(&facts).unwrap_or_else(|_| "[]".into())
}

/// Reads [`facts_to_json`] back.
pub(crate) fn facts_from_json(json: &str) -> Result<Vec<pb::Fact>, StoreError> {
    let facts: Vec<(String, serde_json::Value)> = serde_json::from_str(json)?;
    Ok(facts
        .into_iter()
        .map(|(key, v)| pb::Fact {
            key,
            value: fact_from_json(v),
        })
        .collect())
}

/// Stored facts (`[[key, value], ...]`) as text: strings as they are, other values as JSON.
pub(crate) fn facts_text(json: &str) -> Result<BTreeMap<String, String>, StoreError> {
    let facts: Vec<(String, serde_json::Value)> = serde_json::from_str(json)?;
    Ok(facts
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, text)
        })
        .collect())
}

/// Series with their (so far empty) aggregates.
type Groups = Vec<(SeriesId, Agg)>;

/// The series of the filter as empty groups, and each one's slot by series id (rows of other
/// series are skipped).
fn series_groups(c: &Connection, f: &Filter) -> Result<(Groups, FxMap<i64, usize>), StoreError> {
    let (cond, args) = conditions(
        f,
        &[
            ("target", "target"),
            ("check", "check_name"),
            ("region", "region"),
        ],
    );
    let sql =
        format!("SELECT id, target, check_name, region, endpoint FROM series WHERE 1 = 1{cond}");
    let mut groups: Vec<(SeriesId, Agg)> = Vec::new();
    let mut slot: FxMap<i64, usize> = FxMap::default();
    {
        let mut st = c.prepare_cached(&sql)?;
        let mut rows = st.query(params_from_iter(args))?;
        while let Some(r) = rows.next()? {
            slot.insert(r.get(0)?, groups.len());
            groups.push((
                SeriesId {
                    target: r.get(1)?,
                    check: r.get(2)?,
                    region: r.get(3)?,
                    endpoint: r.get(4)?,
                },
                Agg::default(),
            ));
        }
    }
    Ok((groups, slot))
}

/// [`Store::history`](crate::store::Store::history) on SQLite.
pub(crate) fn history(
    c: &Connection,
    f: &Filter,
    since_us: i64,
    now_us: i64,
    phase: Option<&str>,
) -> Result<Vec<(i64, SeriesId, Agg)>, StoreError> {
    let (groups, slot) = series_groups(c, f)?;
    let counts_only = phase == Some("");
    let mut out: BTreeMap<(usize, i64), Agg> = BTreeMap::new();
    match plan(since_us, now_us) {
        None => {
            let sql = if counts_only {
                "SELECT series_id, start_us, outcome, NULL FROM results WHERE start_us >= ?1"
            } else {
                "SELECT series_id, start_us, outcome, body FROM results WHERE start_us >= ?1"
            };
            let mut st = c.prepare_cached(sql)?;
            let mut rows = st.query([since_us])?;
            while let Some(r) = rows.next()? {
                let Some(&g) = slot.get(&r.get::<_, i64>(0)?) else {
                    continue;
                };
                let mut result = if counts_only {
                    pb::ProbeResult::default()
                } else {
                    let body = r.get_ref(3)?.as_blob().map_err(rusqlite::Error::from)?;
                    decode_body(body).ok_or(StoreError::OutOfRange("stored result body"))?
                };
                if let Some(p) = phase {
                    result.timings.retain(|t| t.phase == p);
                }
                result.outcome = r.get(2)?;
                let bucket = r.get::<_, i64>(1)?.div_euclid(RAW_BUCKET_US) * RAW_BUCKET_US;
                out.entry((g, bucket)).or_default().add(&result);
            }
        }
        Some((level, from)) => {
            let sql = if counts_only {
                "SELECT series_id, bucket_us, count, ok, warn, fail, NULL FROM rollups
                 WHERE level = ?1 AND bucket_us >= ?2"
            } else {
                "SELECT series_id, bucket_us, count, ok, warn, fail, sketches FROM rollups
                 WHERE level = ?1 AND bucket_us >= ?2"
            };
            let mut st = c.prepare_cached(sql)?;
            let mut rows = st.query(rusqlite::params![level.code(), from])?;
            while let Some(r) = rows.next()? {
                let Some(&g) = slot.get(&r.get::<_, i64>(0)?) else {
                    continue;
                };
                let phases = if counts_only {
                    Default::default()
                } else {
                    let blob = r.get_ref(6)?.as_blob().map_err(rusqlite::Error::from)?;
                    Agg::sketches_from_bytes(blob, phase)
                        .ok_or(StoreError::OutOfRange("rollup sketch blob"))?
                };
                out.entry((g, r.get(1)?)).or_default().merge(&Agg {
                    count: unsigned(r.get(2)?),
                    ok: unsigned(r.get(3)?),
                    warn: unsigned(r.get(4)?),
                    fail: unsigned(r.get(5)?),
                    phases,
                });
            }
        }
    }
    let mut rows: Vec<(i64, SeriesId, Agg)> = out
        .into_iter()
        .map(|((g, bucket), a)| (bucket, groups[g].0.clone(), a))
        .collect();
    rows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Ok(rows)
}

/// Merges the rollup rows of the planned level from its first bucket on, per series.
pub(crate) fn rollups(
    c: &Connection,
    f: &Filter,
    since_us: i64,
    now_us: i64,
    phase: Option<&str>,
) -> Result<BTreeMap<SeriesId, Agg>, StoreError> {
    let source = plan(since_us, now_us);
    let (mut groups, slot) = series_groups(c, f)?;
    let mut seen = vec![false; groups.len()];
    // `Some("")`: counts only, no sketch is read.
    let counts_only = phase == Some("");
    let Some((level, from)) = source else {
        raw_window(c, since_us, phase, &slot, &mut groups, &mut seen)?;
        return Ok(collect_seen(groups, seen));
    };
    // Summed here, not by SQL: a GROUP BY series over rows ordered by bucket first sorts them,
    // which made the counts-only query slower than the one that decodes sketches.
    let sql = if counts_only {
        "SELECT series_id, count, ok, warn, fail, NULL FROM rollups
         WHERE level = ?1 AND bucket_us >= ?2"
    } else {
        "SELECT series_id, count, ok, warn, fail, sketches FROM rollups
         WHERE level = ?1 AND bucket_us >= ?2"
    };
    let mut st = c.prepare_cached(sql)?;
    let mut rows = st.query(rusqlite::params![level.code(), from])?;
    while let Some(r) = rows.next()? {
        let Some(&g) = slot.get(&r.get::<_, i64>(0)?) else {
            continue;
        };
        let phases = if counts_only {
            Default::default()
        } else {
            let blob = r.get_ref(5)?.as_blob().map_err(rusqlite::Error::from)?;
            Agg::sketches_from_bytes(blob, phase)
                .ok_or(StoreError::OutOfRange("rollup sketch blob"))?
        };
        let row = Agg {
            count: unsigned(r.get(1)?),
            ok: unsigned(r.get(2)?),
            warn: unsigned(r.get(3)?),
            fail: unsigned(r.get(4)?),
            phases,
        };
        if seen[g] {
            groups[g].1.merge(&row);
        } else {
            groups[g].1 = row;
            seen[g] = true;
        }
    }
    Ok(collect_seen(groups, seen))
}

/// The groups that got at least one row.
fn collect_seen(groups: Vec<(SeriesId, Agg)>, seen: Vec<bool>) -> BTreeMap<SeriesId, Agg> {
    groups
        .into_iter()
        .zip(seen)
        .filter_map(|(g, seen)| seen.then_some(g))
        .collect()
}

/// Aggregates the raw results from `since_us` on into `groups` (short windows: exact, no
/// rollup). Counts only come from the time index alone; sketches need each result's body.
fn raw_window(
    c: &Connection,
    since_us: i64,
    phase: Option<&str>,
    slot: &FxMap<i64, usize>,
    groups: &mut [(SeriesId, Agg)],
    seen: &mut [bool],
) -> Result<(), StoreError> {
    let counts_only = phase == Some("");
    let sql = if counts_only {
        "SELECT series_id, outcome, NULL FROM results WHERE start_us >= ?1"
    } else {
        "SELECT series_id, outcome, body FROM results WHERE start_us >= ?1"
    };
    let mut st = c.prepare_cached(sql)?;
    let mut rows = st.query([since_us])?;
    while let Some(r) = rows.next()? {
        let Some(&g) = slot.get(&r.get::<_, i64>(0)?) else {
            continue;
        };
        let mut result = if counts_only {
            pb::ProbeResult::default()
        } else {
            let body = r.get_ref(2)?.as_blob().map_err(rusqlite::Error::from)?;
            decode_body(body).ok_or(StoreError::OutOfRange("stored result body"))?
        };
        if let Some(p) = phase {
            result.timings.retain(|t| t.phase == p);
        }
        result.outcome = r.get(1)?;
        groups[g].1.add(&result);
        seen[g] = true;
    }
    Ok(())
}

pub(crate) fn status_input(
    c: &Connection,
    f: &Filter,
    since_us: i64,
) -> Result<(Vec<SeriesRow>, Vec<Sample>), StoreError> {
    let series = series_with_ids(c, f)?;
    let slot: FxMap<i64, usize> = series
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id, i))
        .collect();
    // One range of the time index, which holds every column needed here.
    let mut st =
        c.prepare_cached("SELECT series_id, outcome, total_us FROM results WHERE start_us >= ?1")?;
    let mut rows = st.query([since_us])?;
    let mut samples = Vec::new();
    while let Some(r) = rows.next()? {
        let Some(&i) = slot.get(&r.get::<_, i64>(0)?) else {
            continue;
        };
        let s = &series[i].1;
        samples.push(Sample {
            target: s.target.clone(),
            endpoint: s.endpoint.clone(),
            check: s.check.clone(),
            region: s.region.clone(),
            outcome: r.get(1)?,
            total_us: r.get(2)?,
        });
    }
    Ok((series.into_iter().map(|(_, s)| s).collect(), samples))
}

pub(crate) fn results(
    c: &Connection,
    f: &Filter,
    since_us: i64,
    limit: u32,
) -> Result<Vec<pb::StoredResult>, StoreError> {
    let (cond, mut args) = conditions(
        f,
        &[
            ("target", "s.target"),
            ("check", "s.check_name"),
            ("region", "s.region"),
            ("agent_id", "a.id"),
        ],
    );
    args.push(Value::Integer(since_us));
    let since = args.len();
    args.push(Value::Integer(i64::from(limit)));
    let lim = args.len();
    // CROSS JOIN keeps `results` the outer loop: newest first along the time index, each row's
    // series and agent looked up by id (no index on results.series_id goes the other way).
    let sql = format!(
        "SELECT coalesce(a.id, ''), r.seq, s.region, s.target, s.host, s.ip, s.port, s.family,
             s.check_name, r.start_us, r.outcome, r.body, r.stored_at_us
         FROM results r CROSS JOIN series s ON s.id = r.series_id
             LEFT JOIN agents a ON a.num = r.agent_num
         WHERE r.start_us >= ?{since}{cond} ORDER BY r.start_us DESC, r.id DESC LIMIT ?{lim}"
    );
    let mut st = c.prepare(&sql)?;
    let mut rows = st.query(params_from_iter(args))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let body = r.get_ref(11)?.as_blob().map_err(rusqlite::Error::from)?;
        let mut result = decode_body(body).ok_or(StoreError::OutOfRange("stored result body"))?;
        let port: i64 = r.get(6)?;
        result.agent_id = r.get(0)?;
        result.seq = unsigned(r.get(1)?);
        result.target = r.get(3)?;
        result.endpoint = Some(pb::Endpoint {
            host: r.get(4)?,
            ip: r.get(5)?,
            port: u32::try_from(port).unwrap_or(0),
            family: r.get(7)?,
        });
        result.check = r.get(8)?;
        result.start_us = r.get(9)?;
        result.outcome = r.get(10)?;
        out.push(pb::StoredResult {
            result: Some(result),
            region: r.get(2)?,
            stored_at_us: r.get(12)?,
        });
    }
    Ok(out)
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn fact_from_json(v: serde_json::Value) -> Option<pb::fact::Value> {
    match v {
        serde_json::Value::String(s) => Some(pb::fact::Value::Text(s)),
        serde_json::Value::Bool(b) => Some(pb::fact::Value::Flag(b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Some(pb::fact::Value::Int(i)),
            None => n.as_f64().map(pb::fact::Value::Float),
        },
        _ => None,
    }
}

/// See [`Store::changes`](crate::store::Store::changes).
pub(crate) fn changes(
    c: &Connection,
    target: &str,
    since_us: i64,
    limit: u32,
) -> Result<Vec<pb::WatchEvent>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT at_us, target, check_name, region, endpoint, old_state, new_state, error_class,
             via_mx FROM changes WHERE target = ?1 AND at_us >= ?2
         ORDER BY at_us DESC, id DESC LIMIT ?3",
    )?;
    let rows = st.query_map(rusqlite::params![target, since_us, limit], |r| {
        Ok(pb::WatchEvent {
            at_us: r.get(0)?,
            target: r.get(1)?,
            check: r.get(2)?,
            region: r.get(3)?,
            endpoint: r.get(4)?,
            old_state: r.get(5)?,
            new_state: r.get(6)?,
            error_class: r.get(7)?,
            via_mx: r.get(8)?,
            level: "endpoint".to_string(),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
