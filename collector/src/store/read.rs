//! Read side: a small pool of read-only connections (WAL lets them read while the writer commits)
//! and the queries behind status, results, agents and targets.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use mxscope_proto::pb;
use rusqlite::types::Value;
use rusqlite::{params_from_iter, Connection, OpenFlags};

use std::hash::{Hash, Hasher};

use super::rollup::{plan, Agg};
use super::writer::{FxHasher, FxMap};
use super::{AgentRow, Filter, Sample, SeriesId, SeriesRow, StoreError, TargetDef};

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
        .map_err(|source| StoreError::Open {
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

pub(crate) fn central_targets(c: &Connection) -> Result<Vec<TargetDef>, StoreError> {
    let mut st = c.prepare_cached("SELECT spec FROM targets ORDER BY name")?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for spec in rows {
        out.push(serde_json::from_str(&spec?)?);
    }
    Ok(out)
}

pub(crate) fn local_targets(
    c: &Connection,
) -> Result<Vec<(String, String, TargetDef)>, StoreError> {
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
        out.push((agent, region, serde_json::from_str(&spec)?));
    }
    Ok(out)
}

pub(crate) fn agents(c: &Connection) -> Result<Vec<AgentRow>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT id, region, version, labels, first_seen_us, last_seen_us, stored_up_to_seq, dropped_total,
             spool_depth FROM agents ORDER BY id",
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

/// Scans the results of the span (no agent index, to keep ingest cheap); fine for minutes, to be
/// replaced by per-minute rollups.
pub(crate) fn results_per_agent(
    c: &Connection,
    since_us: i64,
) -> Result<BTreeMap<String, u64>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT agent_id, count(*) FROM results WHERE start_us >= ?1 GROUP BY agent_id",
    )?;
    let rows = st.query_map([since_us], |r| {
        Ok((r.get::<_, String>(0)?, unsigned(r.get(1)?)))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// SQL `WHERE` fragments for the non-empty fields of a filter.
fn conditions(f: &Filter, columns: &[(&str, &str)]) -> (String, Vec<Value>) {
    let mut sql = String::new();
    let mut args = Vec::new();
    for (field, column) in columns {
        let v = match *field {
            "target" => &f.target,
            "check" => &f.check,
            "region" => &f.region,
            "agent_id" => &f.agent_id,
            _ => continue,
        };
        if !v.is_empty() {
            args.push(Value::Text(v.clone()));
            sql.push_str(&format!(" AND {column} = ?{}", args.len()));
        }
    }
    (sql, args)
}

/// Series matching the filter, with their agent's last-seen time, ordered for status.
pub(crate) fn series(c: &Connection, f: &Filter) -> Result<Vec<SeriesRow>, StoreError> {
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
             a.last_seen_us, s.last_phase, s.last_facts
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
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (mut s, facts) = row?;
        s.last_facts = facts_text(&facts)?;
        out.push(s);
    }
    Ok(out)
}

/// Stored facts (`[[key, value], ...]`) as text: strings as they are, other values as JSON.
fn facts_text(json: &str) -> Result<BTreeMap<String, String>, StoreError> {
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

/// Merges the rollup rows of the planned level from its first bucket on, per series.
pub(crate) fn rollups(
    c: &Connection,
    f: &Filter,
    since_us: i64,
    now_us: i64,
    phase: Option<&str>,
) -> Result<BTreeMap<SeriesId, Agg>, StoreError> {
    let (level, from) = plan(since_us, now_us);
    let (cond, mut args) = conditions(
        f,
        &[
            ("target", "target"),
            ("check", "check_name"),
            ("region", "region"),
        ],
    );
    args.push(Value::Integer(level.code()));
    let lv = args.len();
    args.push(Value::Integer(from));
    let fr = args.len();
    // Without sketches SQLite sums the rows itself: one row per series comes back.
    let counts_only = phase == Some("");
    let sql = if counts_only {
        format!(
            "SELECT target, check_name, region, endpoint, sum(count), sum(ok), sum(warn), sum(fail), NULL
             FROM rollups WHERE level = ?{lv} AND bucket_us >= ?{fr}{cond}
             GROUP BY target, check_name, region, endpoint"
        )
    } else {
        format!(
            "SELECT target, check_name, region, endpoint, count, ok, warn, fail, sketches FROM rollups
             WHERE level = ?{lv} AND bucket_us >= ?{fr}{cond}"
        )
    };
    let mut st = c.prepare_cached(&sql)?;
    let mut rows = st.query(params_from_iter(args))?;
    // Grouped by a hash of the borrowed names (no String per row; a long window reads several
    // rows per series), checked against the names on a hit.
    let mut index: FxMap<u64, Vec<usize>> = FxMap::default();
    let mut groups: Vec<(SeriesId, Agg)> = Vec::new();
    while let Some(r) = rows.next()? {
        let text = |i: usize| -> Result<&str, StoreError> {
            Ok(r.get_ref(i)?.as_str().map_err(rusqlite::Error::from)?)
        };
        let (target, check, region, endpoint) = (text(0)?, text(1)?, text(2)?, text(3)?);
        let hash = {
            let mut h = FxHasher::default();
            (target, check, region, endpoint).hash(&mut h);
            h.finish()
        };
        let slot = index.entry(hash).or_default();
        let found = slot.iter().copied().find(|&g| {
            let id = &groups[g].0;
            id.target == target
                && id.check == check
                && id.region == region
                && id.endpoint == endpoint
        });
        let g = match found {
            Some(g) => g,
            None => {
                groups.push((
                    SeriesId {
                        target: target.to_string(),
                        check: check.to_string(),
                        region: region.to_string(),
                        endpoint: endpoint.to_string(),
                    },
                    Agg::default(),
                ));
                slot.push(groups.len() - 1);
                groups.len() - 1
            }
        };
        let phases = if counts_only {
            BTreeMap::new()
        } else {
            let blob = r.get_ref(8)?.as_blob().map_err(rusqlite::Error::from)?;
            Agg::sketches_from_bytes(blob, phase)
                .ok_or(StoreError::OutOfRange("rollup sketch blob"))?
        };
        let row = Agg {
            count: unsigned(r.get(4)?),
            ok: unsigned(r.get(5)?),
            warn: unsigned(r.get(6)?),
            fail: unsigned(r.get(7)?),
            phases,
        };
        let agg = &mut groups[g].1;
        if agg.count == 0 && agg.phases.is_empty() {
            *agg = row;
        } else {
            agg.merge(&row);
        }
    }
    Ok(groups.into_iter().collect())
}

pub(crate) fn status_input(
    c: &Connection,
    f: &Filter,
    since_us: i64,
) -> Result<(Vec<SeriesRow>, Vec<Sample>), StoreError> {
    let series = series(c, f)?;

    // One indexed range scan per (target, check) of the listed series.
    let pairs: BTreeSet<(&str, &str)> = series
        .iter()
        .map(|s| (s.target.as_str(), s.check.as_str()))
        .collect();
    let mut samples = Vec::new();
    let mut st = c.prepare_cached(
        "SELECT endpoint, region, outcome, total_us FROM results
         WHERE target = ?1 AND check_name = ?2 AND start_us >= ?3",
    )?;
    for (target, check) in pairs {
        let rows = st.query_map(rusqlite::params![target, check, since_us], |r| {
            Ok(Sample {
                target: target.to_string(),
                endpoint: r.get(0)?,
                check: check.to_string(),
                region: r.get(1)?,
                outcome: r.get(2)?,
                total_us: r.get(3)?,
            })
        })?;
        for s in rows {
            let s = s?;
            if f.region.is_empty() || s.region == f.region {
                samples.push(s);
            }
        }
    }
    Ok((series, samples))
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
            ("target", "target"),
            ("check", "check_name"),
            ("region", "region"),
            ("agent_id", "agent_id"),
        ],
    );
    args.push(Value::Integer(since_us));
    let since = args.len();
    args.push(Value::Integer(i64::from(limit)));
    let lim = args.len();
    let sql = format!(
        "SELECT agent_id, seq, region, target, host, ip, port, family, check_name, start_us, outcome,
             error_class, phase, timings, facts, message, interval_ms, stored_at_us
         FROM results WHERE start_us >= ?{since}{cond} ORDER BY start_us DESC, id DESC LIMIT ?{lim}"
    );
    let mut st = c.prepare(&sql)?;
    let rows = st.query_map(params_from_iter(args), |r| {
        let port: i64 = r.get(6)?;
        let timings: String = r.get(13)?;
        let facts: String = r.get(14)?;
        let result = pb::ProbeResult {
            agent_id: r.get(0)?,
            seq: unsigned(r.get(1)?),
            target: r.get(3)?,
            endpoint: Some(pb::Endpoint {
                host: r.get(4)?,
                ip: r.get(5)?,
                port: u32::try_from(port).unwrap_or(0),
                family: r.get(7)?,
            }),
            check: r.get(8)?,
            start_us: r.get(9)?,
            outcome: r.get(10)?,
            error_class: r.get(11)?,
            phase: r.get(12)?,
            timings: Vec::new(),
            facts: Vec::new(),
            message: r.get(15)?,
            interval_ms: unsigned(r.get(16)?),
        };
        Ok((
            result,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(17)?,
            timings,
            facts,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (mut result, region, stored_at_us, timings, facts) = row?;
        let timings: Vec<(String, u64)> = serde_json::from_str(&timings)?;
        result.timings = timings
            .into_iter()
            .map(|(phase, micros)| pb::PhaseTiming { phase, micros })
            .collect();
        let facts: Vec<(String, serde_json::Value)> = serde_json::from_str(&facts)?;
        result.facts = facts
            .into_iter()
            .map(|(key, v)| pb::Fact {
                key,
                value: fact_from_json(v),
            })
            .collect();
        out.push(pb::StoredResult {
            result: Some(result),
            region,
            stored_at_us,
        });
    }
    Ok(out)
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A fact value as compact JSON: text as string, numbers as numbers, flags as booleans.
pub(crate) fn fact_to_json(v: Option<&pb::fact::Value>) -> serde_json::Value {
    match v {
        None => serde_json::Value::Null,
        Some(pb::fact::Value::Text(s)) => serde_json::Value::from(s.as_str()),
        Some(pb::fact::Value::Int(i)) => serde_json::Value::from(*i),
        Some(pb::fact::Value::Float(f)) => serde_json::Value::from(*f),
        Some(pb::fact::Value::Flag(b)) => serde_json::Value::from(*b),
    }
}

fn fact_from_json(v: serde_json::Value) -> Option<pb::fact::Value> {
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
