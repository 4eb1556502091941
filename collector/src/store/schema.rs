//! Versioned schema: an ordered list of migration steps, tracked in `PRAGMA user_version`.
//! Each step runs in its own transaction; a database newer than this code is refused.

use std::path::Path;

use rusqlite::Connection;

use super::StoreError;

/// Migration steps, applied in order. Step `i` brings the database to version `i + 1`.
/// Append only: never edit a step that has shipped.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: agents, raw results, per-series summary, central targets.
    r#"
    CREATE TABLE agents (
        id               TEXT PRIMARY KEY,
        region           TEXT NOT NULL,
        version          TEXT NOT NULL,
        labels           TEXT NOT NULL,
        first_seen_us    INTEGER NOT NULL,
        last_seen_us     INTEGER NOT NULL,
        stored_up_to_seq INTEGER NOT NULL DEFAULT 0,
        dropped_total    INTEGER NOT NULL DEFAULT 0,
        spool_depth      INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE results (
        id           INTEGER PRIMARY KEY,
        agent_id     TEXT NOT NULL,
        seq          INTEGER NOT NULL,
        region       TEXT NOT NULL,
        target       TEXT NOT NULL,
        endpoint     TEXT NOT NULL,
        host         TEXT NOT NULL,
        ip           TEXT NOT NULL,
        port         INTEGER NOT NULL,
        family       INTEGER NOT NULL,
        check_name   TEXT NOT NULL,
        start_us     INTEGER NOT NULL,
        outcome      INTEGER NOT NULL,
        error_class  TEXT NOT NULL,
        phase        TEXT NOT NULL,
        total_us     INTEGER,
        timings      TEXT NOT NULL,
        facts        TEXT NOT NULL,
        message      TEXT NOT NULL,
        interval_ms  INTEGER NOT NULL,
        stored_at_us INTEGER NOT NULL
    );
    CREATE TABLE series (
        target       TEXT NOT NULL,
        endpoint     TEXT NOT NULL,
        check_name   TEXT NOT NULL,
        region       TEXT NOT NULL,
        last_outcome INTEGER NOT NULL,
        last_error   TEXT NOT NULL,
        last_message TEXT NOT NULL,
        last_seen_us INTEGER NOT NULL,
        interval_ms  INTEGER NOT NULL,
        PRIMARY KEY (target, endpoint, check_name, region)
    ) WITHOUT ROWID;
    CREATE TABLE targets (
        name       TEXT PRIMARY KEY,
        spec       TEXT NOT NULL,
        created_us INTEGER NOT NULL,
        updated_us INTEGER NOT NULL
    );
    "#,
    // 2: agent-local targets reported in Hello; the one index status and results queries use.
    r#"
    CREATE TABLE agent_targets (
        agent_id    TEXT NOT NULL,
        name        TEXT NOT NULL,
        spec        TEXT NOT NULL,
        reported_us INTEGER NOT NULL,
        PRIMARY KEY (agent_id, name)
    ) WITHOUT ROWID;
    CREATE INDEX results_target_check_start ON results (target, check_name, start_us);
    "#,
    // 3 (security): results refused by the ingest limits, per agent; they are skipped, not stored.
    r#"
    ALTER TABLE agents ADD COLUMN rejected_total INTEGER NOT NULL DEFAULT 0;
    "#,
    // 4 (analysis): hysteresis state and the latest result's agent, phase and facts per series;
    // rollups at three levels (minute, hour, day; see store::rollup) keyed bucket-first so a window
    // over every target is one range scan, and retention deletes a prefix. Earlier results are
    // not rolled up.
    r#"
    ALTER TABLE series ADD COLUMN failing INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE series ADD COLUMN streak INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE series ADD COLUMN state_since_us INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE series ADD COLUMN agent_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE series ADD COLUMN last_phase TEXT NOT NULL DEFAULT '';
    ALTER TABLE series ADD COLUMN last_facts TEXT NOT NULL DEFAULT '[]';
    UPDATE series SET failing = (last_outcome NOT IN (1, 2));
    CREATE TABLE rollups (
        level      INTEGER NOT NULL,
        bucket_us  INTEGER NOT NULL,
        target     TEXT NOT NULL,
        check_name TEXT NOT NULL,
        region     TEXT NOT NULL,
        endpoint   TEXT NOT NULL,
        count      INTEGER NOT NULL,
        ok         INTEGER NOT NULL,
        warn       INTEGER NOT NULL,
        fail       INTEGER NOT NULL,
        sketches   BLOB NOT NULL,
        PRIMARY KEY (level, bucket_us, target, check_name, region, endpoint)
    ) WITHOUT ROWID;
    "#,
    // 5 (performance): week rollups (level 604800) for windows over 21 days. No DDL: the rows
    // go into `rollups`; [`fill_weeks`] derives them from the stored day rows in this step's
    // transaction (sketches are merged in Rust, not in SQL).
    r#"
    -- week rollups: no DDL, rows written by fill_weeks
    "#,
];

/// The step after which [`fill_weeks`] runs.
const WEEKS_STEP: i64 = 5;

/// Writes the week rollups of every stored day rollup (schema step 5).
fn fill_weeks(tx: &Connection) -> Result<(), rusqlite::Error> {
    use super::rollup::{Agg, Level};
    let mut weeks: std::collections::HashMap<(i64, String, String, String, String), Agg> =
        std::collections::HashMap::new();
    {
        let mut st = tx.prepare(
            "SELECT bucket_us, target, check_name, region, endpoint, count, ok, warn, fail, sketches
             FROM rollups WHERE level = ?1",
        )?;
        let mut rows = st.query([Level::Day.code()])?;
        while let Some(r) = rows.next()? {
            let blob: Vec<u8> = r.get(9)?;
            let day = Agg {
                count: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
                ok: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                warn: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
                fail: u64::try_from(r.get::<_, i64>(8)?).unwrap_or(0),
                // A damaged day blob loses its latency in the week row, not its counts.
                phases: Agg::sketches_from_bytes(&blob, None).unwrap_or_default(),
            };
            let key = (
                Level::Week.bucket(r.get(0)?),
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
            );
            weeks.entry(key).or_default().merge(&day);
        }
    }
    let mut put = tx.prepare(
        "INSERT OR REPLACE INTO rollups (level, bucket_us, target, check_name, region, endpoint,
             count, ok, warn, fail, sketches) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for ((bucket, target, check, region, endpoint), a) in &weeks {
        put.execute(rusqlite::params![
            Level::Week.code(),
            bucket,
            target,
            check,
            region,
            endpoint,
            int(a.count),
            int(a.ok),
            int(a.warn),
            int(a.fail),
            a.sketches_to_bytes(),
        ])?;
    }
    Ok(())
}

/// The schema version this code writes and reads.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Current `user_version` of a connection.
pub(crate) fn version(conn: &Connection) -> Result<i64, rusqlite::Error> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Brings `conn` up to `target` (at most [`SCHEMA_VERSION`]), one transaction per step.
pub(crate) fn migrate_to(
    conn: &mut Connection,
    path: &Path,
    target: i64,
) -> Result<(), StoreError> {
    let found = version(conn).map_err(StoreError::Sqlite)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate() {
        let to = i as i64 + 1;
        if to <= found || to > target {
            continue;
        }
        let run = |conn: &mut Connection| -> Result<(), rusqlite::Error> {
            let tx = conn.transaction()?;
            tx.execute_batch(step)?;
            if to == WEEKS_STEP {
                fill_weeks(&tx)?;
            }
            tx.pragma_update(None, "user_version", to)?;
            tx.commit()
        };
        run(conn).map_err(|source| StoreError::Migrate {
            version: to,
            source,
        })?;
        tracing::info!(schema.version = to, "database migrated");
    }
    Ok(())
}
