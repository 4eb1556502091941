//! Versioned schema: an ordered list of migration steps, tracked in `PRAGMA user_version`.
//! Each step runs in its own transaction; a database newer than this code is refused.

use std::path::Path;

use rusqlite::Connection;

use super::SqliteError;
use crate::store::StoreError;

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
    // 6 (performance): integer ids and time-ordered keys, so ingest appends instead of seeking.
    // `series` gets an integer id (its names keep a unique index) and the endpoint's parts;
    // `results` rows become a few integer columns plus a protobuf body (store::row), keyed by
    // series and agent number, with one index that starts with the probe's time; `rollups` are
    // keyed by (level, bucket, series id). [`compact_results`] copies the rows in this step's
    // transaction, then the old tables are dropped.
    r#"
    ALTER TABLE agents ADD COLUMN num INTEGER;
    UPDATE agents SET num = rowid;
    CREATE UNIQUE INDEX agents_num ON agents (num);
    CREATE TABLE series_v6 (
        id             INTEGER PRIMARY KEY,
        target         TEXT NOT NULL,
        endpoint       TEXT NOT NULL,
        check_name     TEXT NOT NULL,
        region         TEXT NOT NULL,
        host           TEXT NOT NULL DEFAULT '',
        ip             TEXT NOT NULL DEFAULT '',
        port           INTEGER NOT NULL DEFAULT 0,
        family         INTEGER NOT NULL DEFAULT 0,
        last_outcome   INTEGER NOT NULL DEFAULT 0,
        last_error     TEXT NOT NULL DEFAULT '',
        last_message   TEXT NOT NULL DEFAULT '',
        last_seen_us   INTEGER NOT NULL DEFAULT 0,
        interval_ms    INTEGER NOT NULL DEFAULT 0,
        failing        INTEGER NOT NULL DEFAULT 0,
        streak         INTEGER NOT NULL DEFAULT 0,
        state_since_us INTEGER NOT NULL DEFAULT 0,
        agent_id       TEXT NOT NULL DEFAULT '',
        last_phase     TEXT NOT NULL DEFAULT '',
        last_facts     TEXT NOT NULL DEFAULT '[]'
    );
    CREATE UNIQUE INDEX series_names ON series_v6 (target, endpoint, check_name, region);
    INSERT INTO series_v6 (target, endpoint, check_name, region, last_outcome, last_error,
        last_message, last_seen_us, interval_ms, failing, streak, state_since_us, agent_id,
        last_phase, last_facts)
    SELECT target, endpoint, check_name, region, last_outcome, last_error, last_message,
        last_seen_us, interval_ms, failing, streak, state_since_us, agent_id, last_phase, last_facts
    FROM series ORDER BY target, check_name, endpoint, region;
    INSERT OR IGNORE INTO series_v6 (target, endpoint, check_name, region)
        SELECT DISTINCT target, endpoint, check_name, region FROM results;
    INSERT OR IGNORE INTO series_v6 (target, endpoint, check_name, region)
        SELECT DISTINCT target, endpoint, check_name, region FROM rollups;
    CREATE TABLE results_v6 (
        id           INTEGER PRIMARY KEY,
        series_id    INTEGER NOT NULL,
        agent_num    INTEGER NOT NULL,
        seq          INTEGER NOT NULL,
        start_us     INTEGER NOT NULL,
        outcome      INTEGER NOT NULL,
        total_us     INTEGER,
        stored_at_us INTEGER NOT NULL,
        body         BLOB NOT NULL
    );
    CREATE TABLE rollups_v6 (
        level     INTEGER NOT NULL,
        bucket_us INTEGER NOT NULL,
        series_id INTEGER NOT NULL,
        count     INTEGER NOT NULL,
        ok        INTEGER NOT NULL,
        warn      INTEGER NOT NULL,
        fail      INTEGER NOT NULL,
        sketches  BLOB NOT NULL,
        PRIMARY KEY (level, bucket_us, series_id)
    ) WITHOUT ROWID;
    INSERT INTO rollups_v6 (level, bucket_us, series_id, count, ok, warn, fail, sketches)
    SELECT r.level, r.bucket_us, s.id, r.count, r.ok, r.warn, r.fail, r.sketches
    FROM rollups r JOIN series_v6 s ON s.target = r.target AND s.endpoint = r.endpoint
        AND s.check_name = r.check_name AND s.region = r.region;
    "#,
    // 7 (performance): no minute rollups (store::rollup says why); windows up to 3 hours read
    // the raw results.
    r#"
    DELETE FROM rollups WHERE level = 60;
    "#,
    // 8 (performance): rollups are buffered in the writer and written every few seconds (see
    // store::writer); this row says up to which result (`results.id`) they are complete, so a
    // writer that stopped uncleanly rolls up the results after it when it starts. Every stored
    // result is rolled up at this step.
    r#"
    CREATE TABLE rollup_mark (
        one        INTEGER PRIMARY KEY CHECK (one = 1),
        through_id INTEGER NOT NULL
    );
    INSERT INTO rollup_mark (one, through_id) SELECT 1, coalesce(max(id), 0) FROM results;
    "#,
    // 9 (enrolment, see the collector's `enrol` module): tokens by the SHA-256 of their secret (the secret is never
    // stored), the certificates this collector signed, and revocations made through the Query API.
    r#"
    CREATE TABLE enrol_tokens (
        hash           TEXT PRIMARY KEY,
        id             TEXT NOT NULL UNIQUE,
        region         TEXT NOT NULL,
        agent_id       TEXT NOT NULL,
        id_prefix      TEXT NOT NULL,
        created_us     INTEGER NOT NULL,
        expires_us     INTEGER NOT NULL,
        uses           INTEGER NOT NULL,
        uses_left      INTEGER NOT NULL,
        revoked_us     INTEGER NOT NULL DEFAULT 0,
        ca_fingerprint TEXT NOT NULL,
        created_by     TEXT NOT NULL
    );
    CREATE TABLE certificates (
        serial        TEXT PRIMARY KEY,
        agent_id      TEXT NOT NULL,
        region        TEXT NOT NULL,
        not_after_us  INTEGER NOT NULL,
        issued_us     INTEGER NOT NULL,
        how           TEXT NOT NULL,
        token_id      TEXT NOT NULL
    );
    CREATE INDEX certificates_agent ON certificates (agent_id, not_after_us);
    CREATE TABLE revocations (
        entry      TEXT PRIMARY KEY,
        reason     TEXT NOT NULL,
        revoked_us INTEGER NOT NULL,
        revoked_by TEXT NOT NULL
    );
    "#,
    // 10 (scale-out): the collector that took each agent's latest session.
    r#"
    ALTER TABLE agents ADD COLUMN collector TEXT NOT NULL DEFAULT '';
    "#,
    // 11 (dashboard): the expiry of the certificate of each agent's latest session (NULL
    // without mTLS), and the series' state changes as they committed (the target page's
    // timeline), newest read first.
    r#"
    ALTER TABLE agents ADD COLUMN cert_not_after_us INTEGER;
    CREATE TABLE changes (
        id          INTEGER PRIMARY KEY,
        at_us       INTEGER NOT NULL,
        target      TEXT NOT NULL,
        check_name  TEXT NOT NULL,
        region      TEXT NOT NULL,
        endpoint    TEXT NOT NULL,
        old_state   TEXT NOT NULL,
        new_state   TEXT NOT NULL,
        error_class TEXT NOT NULL,
        via_mx      INTEGER NOT NULL
    );
    CREATE INDEX changes_target ON changes (target, at_us);
    "#,
];

/// The step after which [`compact_results`] runs.
const COMPACT_STEP: i64 = 6;

/// Schema step 6: copies every result into the compact table (body encoded in Rust), notes each
/// series' endpoint parts, then swaps the new tables in.
fn compact_results(tx: &Connection) -> Result<(), rusqlite::Error> {
    use mxscope_proto::pb;
    {
        let mut read = tx.prepare(
            "SELECT r.id, s.id, coalesce(a.num, 0), r.seq, r.start_us, r.outcome, r.stored_at_us,
                 r.error_class, r.phase, r.timings, r.facts, r.message, r.interval_ms,
                 r.host, r.ip, r.port, r.family
             FROM results r
             JOIN series_v6 s ON s.target = r.target AND s.endpoint = r.endpoint
                 AND s.check_name = r.check_name AND s.region = r.region
             LEFT JOIN agents a ON a.id = r.agent_id
             ORDER BY r.id",
        )?;
        let mut put = tx.prepare(
            "INSERT INTO results_v6 (id, series_id, agent_num, seq, start_us, outcome, total_us,
                 stored_at_us, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        let mut endpoint = tx.prepare(
            "UPDATE series_v6 SET host = ?2, ip = ?3, port = ?4, family = ?5 WHERE id = ?1",
        )?;
        let mut seen = std::collections::HashSet::new();
        let mut rows = read.query([])?;
        while let Some(r) = rows.next()? {
            let series: i64 = r.get(1)?;
            // Unreadable JSON keeps the row with no timings or facts rather than failing the step.
            let timings: Vec<(String, u64)> =
                serde_json::from_str(&r.get::<_, String>(9)?).unwrap_or_default();
            let facts: Vec<(String, serde_json::Value)> =
                serde_json::from_str(&r.get::<_, String>(10)?).unwrap_or_default();
            let result = pb::ProbeResult {
                seq: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                start_us: r.get(4)?,
                outcome: r.get(5)?,
                error_class: r.get(7)?,
                phase: r.get(8)?,
                timings: timings
                    .into_iter()
                    .map(|(phase, micros)| pb::PhaseTiming { phase, micros })
                    .collect(),
                facts: facts
                    .into_iter()
                    .map(|(key, v)| pb::Fact {
                        key,
                        value: super::read::fact_from_json(v),
                    })
                    .collect(),
                message: r.get(11)?,
                interval_ms: u64::try_from(r.get::<_, i64>(12)?).unwrap_or(0),
                ..Default::default()
            };
            let row = crate::store::row::ResultRow::of(&result);
            put.execute(rusqlite::params![
                r.get::<_, i64>(0)?,
                series,
                r.get::<_, i64>(2)?,
                row.seq,
                row.start_us,
                row.outcome,
                row.total_us,
                r.get::<_, i64>(6)?,
                &row.body[..],
            ])?;
            if seen.insert(series) {
                endpoint.execute(rusqlite::params![
                    series,
                    r.get::<_, String>(13)?,
                    r.get::<_, String>(14)?,
                    r.get::<_, i64>(15)?,
                    r.get::<_, i64>(16)?,
                ])?;
            }
        }
    }
    tx.execute_batch(
        "DROP TABLE results;
         DROP TABLE series;
         DROP TABLE rollups;
         ALTER TABLE results_v6 RENAME TO results;
         ALTER TABLE series_v6 RENAME TO series;
         ALTER TABLE rollups_v6 RENAME TO rollups;
         CREATE INDEX results_time ON results (start_us, series_id, outcome, total_us);",
    )
}

/// The step after which [`fill_weeks`] runs.
const WEEKS_STEP: i64 = 5;

/// Writes the week rollups of every stored day rollup (schema step 5).
fn fill_weeks(tx: &Connection) -> Result<(), rusqlite::Error> {
    use crate::analysis::aggregate::Agg;
    use crate::store::rollup::Level;
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
    let found = version(conn)?;
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
            if to == COMPACT_STEP {
                compact_results(&tx)?;
            }
            tx.pragma_update(None, "user_version", to)?;
            tx.commit()
        };
        run(conn).map_err(|source| SqliteError::Migrate {
            version: to,
            source,
        })?;
        tracing::info!(schema.version = to, "database migrated");
    }
    Ok(())
}
