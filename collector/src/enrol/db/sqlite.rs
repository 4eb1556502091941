//! The enrolment tables in SQLite (schema step 9), on a connection of their own beside the
//! ingest writer: these writes are rare and small. A token's use is one `BEGIN IMMEDIATE`
//! transaction, so two enrolments never spend the same use.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mxscope_pki::Entry;
use mxscope_proto::time::now_us;
use rusqlite::{params, Connection, OptionalExtension};

use super::{CertRow, Enrolling, Spent, TokenRow, TOKEN_COLUMNS};
use crate::store::sqlite::SqliteError;
use crate::store::StoreError;

/// The connection to the enrolment tables.
#[derive(Debug, Clone)]
pub struct SqliteIdentities {
    conn: Arc<Mutex<Connection>>,
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| {
        StoreError::from(SqliteError::Open {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow {
        hash: r.get(0)?,
        id: r.get(1)?,
        region: r.get(2)?,
        agent_id: r.get(3)?,
        id_prefix: r.get(4)?,
        created_us: r.get(5)?,
        expires_us: r.get(6)?,
        uses: r.get(7)?,
        uses_left: r.get(8)?,
        revoked_us: r.get(9)?,
        ca_fingerprint: r.get(10)?,
        created_by: r.get(11)?,
    })
}

impl SqliteIdentities {
    /// Opens the database the store has already migrated.
    pub fn open(path: &Path) -> Result<SqliteIdentities, StoreError> {
        let conn = Connection::open(path).map_err(sqlite(path))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(sqlite(path))?;
        Ok(SqliteIdentities {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection on a blocking thread.
    pub async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut c)
        })
        .await?
    }
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::from(SqliteError::from(e))
}

/// One enrolment with the token `hash` in one `BEGIN IMMEDIATE` transaction; committed only
/// when `e` signs.
pub(super) fn enrol<E: Enrolling>(
    c: &mut Connection,
    hash: &str,
    mut e: E,
) -> Result<Spent, StoreError> {
    let tx = c
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(db)?;
    let Some(stored) = token_by_hash(&tx, hash)? else {
        return Ok(Spent::Unknown);
    };
    let now = now_us();
    let admitted = match e.admit(&stored, now) {
        Ok(a) => a,
        Err(err) => return Ok(Spent::Refused(err)),
    };
    let live = match (&admitted.who, admitted.must_be_new) {
        (mxscope_pki::Identity::Agent { id, .. }, true) => {
            live_serials(&tx, id, now)?.into_iter().next()
        }
        _ => None,
    };
    let (pem, row) = match e.sign(&stored, &admitted, live.as_deref()) {
        Ok(s) => s,
        Err(err) => return Ok(Spent::Refused(err)),
    };
    spend(&tx, hash)?;
    insert_certificate(&tx, &row)?;
    tx.commit().map_err(db)?;
    Ok(Spent::Signed(pem, row))
}

pub(super) fn insert_token(c: &Connection, t: &TokenRow) -> Result<(), StoreError> {
    c.execute(
        &format!("INSERT INTO enrol_tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
        params![
            t.hash,
            t.id,
            t.region,
            t.agent_id,
            t.id_prefix,
            t.created_us,
            t.expires_us,
            t.uses,
            t.uses_left,
            t.revoked_us,
            t.ca_fingerprint,
            t.created_by
        ],
    )
    .map_err(db)?;
    Ok(())
}

pub(super) fn tokens(c: &Connection) -> Result<Vec<TokenRow>, StoreError> {
    let mut st = c
        .prepare(&format!(
            "SELECT {TOKEN_COLUMNS} FROM enrol_tokens ORDER BY created_us, id"
        ))
        .map_err(db)?;
    let rows = st.query_map([], token_row).map_err(db)?;
    rows.collect::<Result<_, _>>().map_err(db)
}

fn token_by_hash(c: &Connection, hash: &str) -> Result<Option<TokenRow>, StoreError> {
    c.query_row(
        &format!("SELECT {TOKEN_COLUMNS} FROM enrol_tokens WHERE hash = ?1"),
        [hash],
        token_row,
    )
    .optional()
    .map_err(db)
}

/// Marks the token `id` revoked (if it is not already); `None` if there is no such token.
pub(super) fn revoke_token(
    c: &Connection,
    id: &str,
    now_us: i64,
) -> Result<Option<TokenRow>, StoreError> {
    c.execute(
        "UPDATE enrol_tokens SET revoked_us = ?2 WHERE id = ?1 AND revoked_us = 0",
        params![id, now_us],
    )
    .map_err(db)?;
    c.query_row(
        &format!("SELECT {TOKEN_COLUMNS} FROM enrol_tokens WHERE id = ?1"),
        [id],
        token_row,
    )
    .optional()
    .map_err(db)
}

/// Spends one use of the token.
fn spend(c: &Connection, hash: &str) -> Result<(), StoreError> {
    c.execute(
        "UPDATE enrol_tokens SET uses_left = uses_left - 1 WHERE hash = ?1 AND uses_left > 0",
        [hash],
    )
    .map_err(db)?;
    Ok(())
}

pub(super) fn insert_certificate(c: &Connection, r: &CertRow) -> Result<(), StoreError> {
    c.execute(
        "INSERT OR REPLACE INTO certificates (serial, agent_id, region, not_after_us, issued_us, how, token_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![r.serial, r.agent_id, r.region, r.not_after_us, r.issued_us, r.how, r.token_id],
    )
    .map_err(db)?;
    Ok(())
}

/// Serials of this agent id's certificates that are still valid at `now_us`.
fn live_serials(c: &Connection, agent_id: &str, now_us: i64) -> Result<Vec<String>, StoreError> {
    let mut st = c
        .prepare("SELECT serial FROM certificates WHERE agent_id = ?1 AND not_after_us > ?2")
        .map_err(db)?;
    let rows = st
        .query_map(params![agent_id, now_us], |r| r.get(0))
        .map_err(db)?;
    rows.collect::<Result<_, _>>().map_err(db)
}

/// Adds a revocation; `false` if the entry was revoked already.
pub(super) fn add_revocation(
    c: &Connection,
    entry: &Entry,
    reason: &str,
    by: &str,
    now_us: i64,
) -> Result<bool, StoreError> {
    let n = c
        .execute(
            "INSERT OR IGNORE INTO revocations (entry, reason, revoked_us, revoked_by) VALUES (?1, ?2, ?3, ?4)",
            params![entry.to_string(), reason, now_us, by],
        )
        .map_err(db)?;
    Ok(n == 1)
}

/// The entries of every revocation made online, as stored.
pub(super) fn revocation_entries(c: &Connection) -> Result<Vec<String>, StoreError> {
    let mut st = c.prepare("SELECT entry FROM revocations").map_err(db)?;
    let entries = st
        .query_map([], |r| r.get(0))
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)?;
    Ok(entries)
}
