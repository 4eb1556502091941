//! The enrolment tables in PostgreSQL (schema step 2), through the store's pool, shared by every
//! collector on the database. A token's use is spent in one transaction that locks the token's
//! row (`SELECT … FOR UPDATE`): a second enrolment with it, on any collector, waits and then
//! reads the use as spent. A revocation notifies [`REVOCATIONS_CHANNEL`] in its transaction, so
//! every collector hears of it once it is committed.

use deadpool_postgres::{Object, Pool};
use mxscope_pki::{Entry, Identity};
use mxscope_proto::time::now_us;
use tokio::sync::broadcast;
use tokio_postgres::Row;

use super::{CertRow, Enrolling, Spent, TokenRow, TOKEN_COLUMNS};
use crate::store::postgres::{PgError, PgStore, REVOCATIONS_CHANNEL};
use crate::store::StoreError;

/// The pool to the enrolment tables, and the store's announcements of revocations.
#[derive(Clone)]
pub struct PgIdentities {
    pool: Pool,
    store: PgStore,
}

impl std::fmt::Debug for PgIdentities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgIdentities")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

fn token_row(r: &Row) -> Result<TokenRow, StoreError> {
    let count = |i: usize| {
        u32::try_from(r.try_get::<_, i32>(i)?).map_err(|_| StoreError::OutOfRange("token uses"))
    };
    Ok(TokenRow {
        hash: r.try_get(0)?,
        id: r.try_get(1)?,
        region: r.try_get(2)?,
        agent_id: r.try_get(3)?,
        id_prefix: r.try_get(4)?,
        created_us: r.try_get(5)?,
        expires_us: r.try_get(6)?,
        uses: count(7)?,
        uses_left: count(8)?,
        revoked_us: r.try_get(9)?,
        ca_fingerprint: r.try_get(10)?,
        created_by: r.try_get(11)?,
    })
}

fn count_param(n: u32) -> Result<i32, StoreError> {
    i32::try_from(n).map_err(|_| StoreError::OutOfRange("token uses"))
}

const INSERT_CERTIFICATE: &str = "INSERT INTO certificates \
     (serial, agent_id, region, not_after_us, issued_us, how, token_id) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (serial) DO UPDATE SET agent_id = EXCLUDED.agent_id, region = EXCLUDED.region, \
     not_after_us = EXCLUDED.not_after_us, issued_us = EXCLUDED.issued_us, how = EXCLUDED.how, \
     token_id = EXCLUDED.token_id";

impl PgIdentities {
    pub fn new(store: &PgStore) -> PgIdentities {
        PgIdentities {
            pool: store.pool().clone(),
            store: store.clone(),
        }
    }

    pub fn revocation_changes(&self) -> broadcast::Receiver<()> {
        self.store.revocation_changes()
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Postgres(PgError::Pool(e.to_string())))
    }

    pub async fn insert_token(&self, t: &TokenRow) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                &format!(
                    "INSERT INTO enrol_tokens ({TOKEN_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
                ),
                &[
                    &t.hash,
                    &t.id,
                    &t.region,
                    &t.agent_id,
                    &t.id_prefix,
                    &t.created_us,
                    &t.expires_us,
                    &count_param(t.uses)?,
                    &count_param(t.uses_left)?,
                    &t.revoked_us,
                    &t.ca_fingerprint,
                    &t.created_by,
                ],
            )
            .await?;
        Ok(())
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {TOKEN_COLUMNS} FROM enrol_tokens ORDER BY created_us, id"),
                &[],
            )
            .await?;
        rows.iter().map(token_row).collect()
    }

    pub async fn revoke_token(
        &self,
        id: &str,
        now_us: i64,
    ) -> Result<Option<TokenRow>, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE enrol_tokens SET revoked_us = $2 WHERE id = $1 AND revoked_us = 0",
                &[&id, &now_us],
            )
            .await?;
        client
            .query_opt(
                &format!("SELECT {TOKEN_COLUMNS} FROM enrol_tokens WHERE id = $1"),
                &[&id],
            )
            .await?
            .as_ref()
            .map(token_row)
            .transpose()
    }

    /// One enrolment with the token `hash`: its row locked until the transaction ends, which
    /// commits only when `e` signs.
    pub async fn enrol<E: Enrolling>(&self, hash: &str, mut e: E) -> Result<Spent, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let stored = tx
            .query_opt(
                &format!("SELECT {TOKEN_COLUMNS} FROM enrol_tokens WHERE hash = $1 FOR UPDATE"),
                &[&hash],
            )
            .await?;
        // Dropping `tx` without a commit rolls it back (and unlocks the row).
        let Some(stored) = stored.as_ref().map(token_row).transpose()? else {
            return Ok(Spent::Unknown);
        };
        let now = now_us();
        let admitted = match e.admit(&stored, now) {
            Ok(a) => a,
            Err(err) => return Ok(Spent::Refused(err)),
        };
        let live: Option<String> = match (&admitted.who, admitted.must_be_new) {
            (Identity::Agent { id, .. }, true) => tx
                .query_opt(
                    "SELECT serial FROM certificates WHERE agent_id = $1 AND not_after_us > $2 \
                     LIMIT 1",
                    &[id, &now],
                )
                .await?
                .map(|r| r.try_get(0))
                .transpose()?,
            _ => None,
        };
        let (pem, row) = match e.sign(&stored, &admitted, live.as_deref()) {
            Ok(s) => s,
            Err(err) => return Ok(Spent::Refused(err)),
        };
        tx.execute(
            "UPDATE enrol_tokens SET uses_left = uses_left - 1 WHERE hash = $1 AND uses_left > 0",
            &[&hash],
        )
        .await?;
        tx.execute(INSERT_CERTIFICATE, &cert_params(&row)).await?;
        tx.commit().await?;
        Ok(Spent::Signed(pem, row))
    }

    pub async fn insert_certificate(&self, r: &CertRow) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(INSERT_CERTIFICATE, &cert_params(r))
            .await?;
        Ok(())
    }

    /// Adds a revocation and, when it is new, notifies every collector at commit.
    pub async fn add_revocation(
        &self,
        entry: &Entry,
        reason: &str,
        by: &str,
        now_us: i64,
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let n = tx
            .execute(
                "INSERT INTO revocations (entry, reason, revoked_us, revoked_by) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (entry) DO NOTHING",
                &[&entry.to_string(), &reason, &now_us, &by],
            )
            .await?;
        if n == 1 {
            tx.execute("SELECT pg_notify($1, '')", &[&REVOCATIONS_CHANNEL])
                .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    pub async fn revocation_entries(&self) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client()
            .await?
            .query("SELECT entry FROM revocations", &[])
            .await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(StoreError::from))
            .collect()
    }
}

fn cert_params(r: &CertRow) -> [&(dyn tokio_postgres::types::ToSql + Sync); 7] {
    [
        &r.serial,
        &r.agent_id,
        &r.region,
        &r.not_after_us,
        &r.issued_us,
        &r.how,
        &r.token_id,
    ]
}
