//! Read side of the PostgreSQL backend: the queries behind status, results, agents and targets,
//! on pooled connections. Rollup rows of several writers are merged here, per series.

use std::collections::{BTreeMap, HashMap};

use mxscope_proto::pb;
use mxscope_proto::target::Target;
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;

use super::writer::unsigned;
use crate::analysis::aggregate::Agg;
use crate::store::rollup::{plan, RAW_BUCKET_US};
use crate::store::row::decode_body;
use crate::store::sqlite::{facts_text, target_from_json, StoredTarget};
use crate::store::{AgentRow, Filter, Sample, SeriesId, SeriesRow, StoreError};

pub(super) async fn central_targets(c: &impl GenericClient) -> Result<Vec<Target>, StoreError> {
    let mut out = Vec::new();
    for r in c
        .query("SELECT spec FROM targets ORDER BY name", &[])
        .await?
    {
        match target_from_json(r.get(0))? {
            StoredTarget::Valid(t) => out.push(t),
            StoredTarget::Refused { name, error } => {
                return Err(StoreError::BadTarget {
                    name,
                    source: error,
                })
            }
        }
    }
    Ok(out)
}

pub(super) async fn local_targets(
    c: &impl GenericClient,
) -> Result<Vec<(String, String, Target)>, StoreError> {
    let mut out = Vec::new();
    for r in c
        .query(
            "SELECT t.agent_id, coalesce(a.region, ''), t.spec FROM agent_targets t
             LEFT JOIN agents a ON a.id = t.agent_id ORDER BY t.name, t.agent_id",
            &[],
        )
        .await?
    {
        let agent: String = r.get(0);
        match target_from_json(r.get(2))? {
            StoredTarget::Valid(t) => out.push((agent, r.get(1), t)),
            StoredTarget::Refused { name, error } => {
                tracing::warn!(agent.id = %agent, target.name = %name, error = %error,
                    "stored local target left out: this collector refuses it");
            }
        }
    }
    Ok(out)
}

pub(super) async fn agents(c: &impl GenericClient) -> Result<Vec<AgentRow>, StoreError> {
    let mut out = Vec::new();
    for r in c
        .query(
            "SELECT id, region, version, labels, first_seen_us, last_seen_us, stored_up_to_seq,
                 dropped_total, spool_depth, collector, cert_not_after_us FROM agents ORDER BY id",
            &[],
        )
        .await?
    {
        out.push(AgentRow {
            id: r.get(0),
            region: r.get(1),
            version: r.get(2),
            labels: serde_json::from_str(r.get(3))?,
            first_seen_us: r.get(4),
            last_seen_us: r.get(5),
            stored_up_to_seq: unsigned(r.get(6)),
            dropped_total: unsigned(r.get(7)),
            spool_depth: unsigned(r.get(8)),
            collector: r.get(9),
            cert_not_after_us: r.get(10),
        });
    }
    Ok(out)
}

pub(super) async fn results_per_agent(
    c: &impl GenericClient,
    since_us: i64,
) -> Result<BTreeMap<String, u64>, StoreError> {
    Ok(c.query(
        "SELECT a.id, n FROM (SELECT agent_num, count(*) AS n FROM results
                 WHERE start_us >= $1 GROUP BY agent_num) r
             JOIN agents a ON a.num = r.agent_num",
        &[&since_us],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), unsigned(r.get(1))))
    .collect())
}

/// `AND column = $n` for the non-empty fields of a filter, numbered after `first` parameters.
fn conditions<'a>(
    f: &'a Filter,
    columns: &[(&str, &str)],
    first: usize,
) -> (String, Vec<&'a (dyn ToSql + Sync)>) {
    let mut sql = String::new();
    let mut args: Vec<&(dyn ToSql + Sync)> = Vec::new();
    for (column, v) in f.set_columns(columns) {
        args.push(v);
        sql.push_str(&format!(" AND {column} = ${}", first + args.len()));
    }
    (sql, args)
}

pub(super) async fn series(
    c: &impl GenericClient,
    f: &Filter,
) -> Result<Vec<SeriesRow>, StoreError> {
    Ok(series_with_ids(c, f)
        .await?
        .into_iter()
        .map(|(_, s)| s)
        .collect())
}

async fn series_with_ids(
    c: &impl GenericClient,
    f: &Filter,
) -> Result<Vec<(i64, SeriesRow)>, StoreError> {
    let (cond, args) = conditions(
        f,
        &[
            ("target", "s.target"),
            ("check", "s.check_name"),
            ("region", "s.region"),
        ],
        0,
    );
    let sql = format!(
        "SELECT s.target, s.endpoint, s.check_name, s.region, s.last_outcome, s.last_error,
             s.last_message, s.last_seen_us, s.interval_ms, s.failing, s.state_since_us, s.agent_id,
             a.last_seen_us, s.last_phase, s.last_facts, s.id
         FROM series s LEFT JOIN agents a ON a.id = s.agent_id
         WHERE true{cond} ORDER BY s.target, s.check_name, s.endpoint, s.region"
    );
    let mut out = Vec::new();
    for r in c.query(&sql, &args).await? {
        out.push((
            r.get(15),
            SeriesRow {
                target: r.get(0),
                endpoint: r.get(1),
                check: r.get(2),
                region: r.get(3),
                last_outcome: r.get(4),
                last_error: r.get(5),
                last_message: r.get(6),
                last_seen_us: r.get(7),
                interval_ms: unsigned(r.get(8)),
                failing: r.get(9),
                state_since_us: r.get(10),
                agent_id: r.get(11),
                agent_last_seen_us: r.get(12),
                last_phase: r.get(13),
                last_facts: facts_text(r.get(14))?,
            },
        ));
    }
    Ok(out)
}

/// The series of the filter by id, each with an empty aggregate.
async fn groups(
    c: &impl GenericClient,
    f: &Filter,
) -> Result<(Vec<(SeriesId, Agg)>, HashMap<i64, usize>), StoreError> {
    let (cond, args) = conditions(
        f,
        &[
            ("target", "target"),
            ("check", "check_name"),
            ("region", "region"),
        ],
        0,
    );
    let sql =
        format!("SELECT id, target, check_name, region, endpoint FROM series WHERE true{cond}");
    let mut groups = Vec::new();
    let mut slot = HashMap::new();
    for r in c.query(&sql, &args).await? {
        slot.insert(r.get::<_, i64>(0), groups.len());
        groups.push((
            SeriesId {
                target: r.get(1),
                check: r.get(2),
                region: r.get(3),
                endpoint: r.get(4),
            },
            Agg::default(),
        ));
    }
    Ok((groups, slot))
}

/// [`Store::history`](crate::store::Store::history) on PostgreSQL: the writers' rows of a
/// bucket merged.
pub(super) async fn history(
    c: &impl GenericClient,
    f: &Filter,
    since_us: i64,
    now_us: i64,
    phase: Option<&str>,
) -> Result<Vec<(i64, SeriesId, Agg)>, StoreError> {
    let (groups, slot) = groups(c, f).await?;
    let counts_only = phase == Some("");
    let mut out: BTreeMap<(usize, i64), Agg> = BTreeMap::new();
    match plan(since_us, now_us) {
        None => {
            let sql = if counts_only {
                "SELECT series_id, start_us, outcome, NULL::bytea FROM results WHERE start_us >= $1"
            } else {
                "SELECT series_id, start_us, outcome, body FROM results WHERE start_us >= $1"
            };
            for r in c.query(sql, &[&since_us]).await? {
                let Some(&g) = slot.get(&r.get::<_, i64>(0)) else {
                    continue;
                };
                let mut result = if counts_only {
                    pb::ProbeResult::default()
                } else {
                    decode_body(r.get::<_, &[u8]>(3))
                        .ok_or(StoreError::OutOfRange("stored result body"))?
                };
                if let Some(p) = phase {
                    result.timings.retain(|t| t.phase == p);
                }
                result.outcome = r.get(2);
                let bucket = r.get::<_, i64>(1).div_euclid(RAW_BUCKET_US) * RAW_BUCKET_US;
                out.entry((g, bucket)).or_default().add(&result);
            }
        }
        Some((level, from)) => {
            let sql = if counts_only {
                "SELECT series_id, bucket_us, count, ok, warn, fail, NULL::bytea FROM rollups
                 WHERE level = $1 AND bucket_us >= $2"
            } else {
                "SELECT series_id, bucket_us, count, ok, warn, fail, sketches FROM rollups
                 WHERE level = $1 AND bucket_us >= $2"
            };
            for r in c.query(sql, &[&(level.code() as i32), &from]).await? {
                let Some(&g) = slot.get(&r.get::<_, i64>(0)) else {
                    continue;
                };
                let phases = if counts_only {
                    Default::default()
                } else {
                    Agg::sketches_from_bytes(r.get::<_, &[u8]>(6), phase)
                        .ok_or(StoreError::OutOfRange("rollup sketch blob"))?
                };
                out.entry((g, r.get(1))).or_default().merge(&Agg {
                    count: unsigned(r.get(2)),
                    ok: unsigned(r.get(3)),
                    warn: unsigned(r.get(4)),
                    fail: unsigned(r.get(5)),
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

/// Aggregates of the window from `since_us`, merged per series: raw results for short windows,
/// else the planned rollup level's rows of every writer.
pub(super) async fn rollups(
    c: &impl GenericClient,
    f: &Filter,
    since_us: i64,
    now_us: i64,
    phase: Option<&str>,
) -> Result<BTreeMap<SeriesId, Agg>, StoreError> {
    let (mut groups, slot) = groups(c, f).await?;
    let mut seen = vec![false; groups.len()];
    let counts_only = phase == Some("");
    match plan(since_us, now_us) {
        None => {
            let sql = if counts_only {
                "SELECT series_id, outcome, NULL::bytea FROM results WHERE start_us >= $1"
            } else {
                "SELECT series_id, outcome, body FROM results WHERE start_us >= $1"
            };
            for r in c.query(sql, &[&since_us]).await? {
                let Some(&g) = slot.get(&r.get::<_, i64>(0)) else {
                    continue;
                };
                let mut result = if counts_only {
                    pb::ProbeResult::default()
                } else {
                    decode_body(r.get::<_, &[u8]>(2))
                        .ok_or(StoreError::OutOfRange("stored result body"))?
                };
                if let Some(p) = phase {
                    result.timings.retain(|t| t.phase == p);
                }
                result.outcome = r.get(1);
                groups[g].1.add(&result);
                seen[g] = true;
            }
        }
        Some((level, from)) => {
            let sql = if counts_only {
                "SELECT series_id, count, ok, warn, fail, NULL::bytea FROM rollups
                 WHERE level = $1 AND bucket_us >= $2"
            } else {
                "SELECT series_id, count, ok, warn, fail, sketches FROM rollups
                 WHERE level = $1 AND bucket_us >= $2"
            };
            for r in c.query(sql, &[&(level.code() as i32), &from]).await? {
                let Some(&g) = slot.get(&r.get::<_, i64>(0)) else {
                    continue;
                };
                let phases = if counts_only {
                    Default::default()
                } else {
                    Agg::sketches_from_bytes(r.get::<_, &[u8]>(5), phase)
                        .ok_or(StoreError::OutOfRange("rollup sketch blob"))?
                };
                let row = Agg {
                    count: unsigned(r.get(1)),
                    ok: unsigned(r.get(2)),
                    warn: unsigned(r.get(3)),
                    fail: unsigned(r.get(4)),
                    phases,
                };
                if seen[g] {
                    groups[g].1.merge(&row);
                } else {
                    groups[g].1 = row;
                    seen[g] = true;
                }
            }
        }
    }
    Ok(groups
        .into_iter()
        .zip(seen)
        .filter_map(|(g, seen)| seen.then_some(g))
        .collect())
}

pub(super) async fn status_input(
    c: &impl GenericClient,
    f: &Filter,
    since_us: i64,
) -> Result<(Vec<SeriesRow>, Vec<Sample>), StoreError> {
    let series = series_with_ids(c, f).await?;
    let slot: HashMap<i64, usize> = series
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id, i))
        .collect();
    let mut samples = Vec::new();
    for r in c
        .query(
            "SELECT series_id, outcome, total_us FROM results WHERE start_us >= $1",
            &[&since_us],
        )
        .await?
    {
        let Some(&i) = slot.get(&r.get::<_, i64>(0)) else {
            continue;
        };
        let s = &series[i].1;
        samples.push(Sample {
            target: s.target.clone(),
            endpoint: s.endpoint.clone(),
            check: s.check.clone(),
            region: s.region.clone(),
            outcome: r.get(1),
            total_us: r.get(2),
        });
    }
    Ok((series.into_iter().map(|(_, s)| s).collect(), samples))
}

pub(super) async fn results(
    c: &impl GenericClient,
    f: &Filter,
    since_us: i64,
    limit: u32,
) -> Result<Vec<pb::StoredResult>, StoreError> {
    let limit = i64::from(limit);
    let (cond, args) = conditions(
        f,
        &[
            ("target", "s.target"),
            ("check", "s.check_name"),
            ("region", "s.region"),
            ("agent_id", "a.id"),
        ],
        2,
    );
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&since_us, &limit];
    params.extend(args);
    let sql = format!(
        "SELECT coalesce(a.id, ''), r.seq, s.region, s.target, s.host, s.ip, s.port, s.family,
             s.check_name, r.start_us, r.outcome, r.body, r.stored_at_us
         FROM results r JOIN series s ON s.id = r.series_id
             LEFT JOIN agents a ON a.num = r.agent_num
         WHERE r.start_us >= $1{cond} ORDER BY r.start_us DESC, r.id DESC LIMIT $2"
    );
    let mut out = Vec::new();
    for r in c.query(&sql, &params).await? {
        let mut result = decode_body(r.get::<_, &[u8]>(11))
            .ok_or(StoreError::OutOfRange("stored result body"))?;
        result.agent_id = r.get(0);
        result.seq = unsigned(r.get(1));
        result.target = r.get(3);
        result.endpoint = Some(pb::Endpoint {
            host: r.get(4),
            ip: r.get(5),
            port: u32::try_from(r.get::<_, i32>(6)).unwrap_or(0),
            family: r.get(7),
        });
        result.check = r.get(8);
        result.start_us = r.get(9);
        result.outcome = r.get(10);
        out.push(pb::StoredResult {
            result: Some(result),
            region: r.get(2),
            stored_at_us: r.get(12),
        });
    }
    Ok(out)
}

/// See [`Store::changes`](crate::store::Store::changes).
pub(super) async fn changes(
    c: &impl GenericClient,
    target: &str,
    since_us: i64,
    limit: u32,
) -> Result<Vec<pb::WatchEvent>, StoreError> {
    let rows = c
        .query(
            "SELECT at_us, target, check_name, region, endpoint, old_state, new_state,
                 error_class, via_mx FROM changes WHERE target = $1 AND at_us >= $2
             ORDER BY at_us DESC, id DESC LIMIT $3",
            &[&target, &since_us, &i64::from(limit)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| pb::WatchEvent {
            at_us: r.get(0),
            target: r.get(1),
            check: r.get(2),
            region: r.get(3),
            endpoint: r.get(4),
            old_state: r.get(5),
            new_state: r.get(6),
            error_class: r.get(7),
            via_mx: r.get(8),
            level: "endpoint".to_string(),
        })
        .collect())
}
