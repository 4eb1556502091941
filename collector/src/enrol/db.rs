//! The enrolment tables: tokens (by the hash of their secret), the certificates the collectors
//! signed, and revocations made online. [`IdentityDb`] is the seam, in the collector's database
//! whichever it is: [`sqlite`] (schema step 9, a connection of its own beside the writer) or
//! [`postgres`] (schema step 2, the store's pool; several collectors share the tables).
//!
//! A token's use is spent in one transaction that holds the token: `BEGIN IMMEDIATE` on SQLite,
//! `SELECT … FOR UPDATE` of its row on PostgreSQL, so two enrolments (through one collector or
//! two) never spend the same use.

pub mod postgres;
pub mod sqlite;

use std::path::Path;

use mxscope_pki::{Entry, Identity, Revocations};
use tokio::sync::broadcast;

use crate::error::ServiceError;
use crate::store::postgres::PgStore;
use crate::store::StoreError;

/// One token as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub hash: String,
    pub id: String,
    pub region: String,
    /// Exactly this id, or empty.
    pub agent_id: String,
    /// Ids starting with this, when `agent_id` is empty.
    pub id_prefix: String,
    pub created_us: i64,
    pub expires_us: i64,
    pub uses: u32,
    pub uses_left: u32,
    /// 0 = not revoked.
    pub revoked_us: i64,
    pub ca_fingerprint: String,
    pub created_by: String,
}

impl TokenRow {
    /// `active`, `expired`, `used` or `revoked`, at `now_us`.
    pub fn state(&self, now_us: i64) -> &'static str {
        if self.revoked_us != 0 {
            "revoked"
        } else if self.uses_left == 0 {
            "used"
        } else if now_us >= self.expires_us {
            "expired"
        } else {
            "active"
        }
    }
}

/// A certificate a collector signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRow {
    pub serial: String,
    pub agent_id: String,
    pub region: String,
    pub not_after_us: i64,
    pub issued_us: i64,
    /// `enrol` or `renew`.
    pub how: &'static str,
    pub token_id: String,
}

/// Whom a token admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub who: Identity,
    /// The id must not hold a live certificate yet: a prefix token must not take over an agent
    /// that is enrolled already (an exact token is the admin's word for its id).
    pub must_be_new: bool,
}

/// What one enrolment decides inside its token's transaction, the token held: who the agent
/// becomes, then its certificate. A refusal at either step stores nothing and spends no use.
pub trait Enrolling: Send + 'static {
    /// Whom `token` admits at `now_us`, or why not.
    fn admit(&mut self, token: &TokenRow, now_us: i64) -> Result<Admitted, ServiceError>;
    /// The certificate (PEM, and its row to record) for `admitted`; `live` is the serial of a
    /// live certificate its id holds, looked up when `must_be_new`.
    fn sign(
        &mut self,
        token: &TokenRow,
        admitted: &Admitted,
        live: Option<&str>,
    ) -> Result<(String, CertRow), ServiceError>;
}

/// How an enrolment's transaction ended.
#[derive(Debug)]
pub enum Spent {
    /// One use spent, the certificate recorded: its PEM and row.
    Signed(String, CertRow),
    /// No token has this hash.
    Unknown,
    /// [`Enrolling`] refused: nothing is stored.
    Refused(ServiceError),
}

/// The enrolment tables of the collector's database; cheap to clone.
#[derive(Debug, Clone)]
pub enum IdentityDb {
    Sqlite(sqlite::SqliteIdentities),
    Postgres(postgres::PgIdentities),
}

impl IdentityDb {
    /// The tables in the SQLite file at `path`, which the store has already migrated.
    pub fn open(path: &Path) -> Result<IdentityDb, StoreError> {
        Ok(IdentityDb::Sqlite(sqlite::SqliteIdentities::open(path)?))
    }

    /// The tables in `store`'s PostgreSQL database (migrated when it connected), through its
    /// pool.
    pub fn postgres(store: &PgStore) -> IdentityDb {
        IdentityDb::Postgres(postgres::PgIdentities::new(store))
    }

    /// Revocations committed by any collector on the database, when other collectors may share
    /// it (PostgreSQL): each message says to reload [`revocations`](IdentityDb::revocations).
    /// `None` on SQLite, whose revocations are this collector's alone.
    pub fn revocation_changes(&self) -> Option<broadcast::Receiver<()>> {
        match self {
            IdentityDb::Sqlite(_) => None,
            IdentityDb::Postgres(p) => Some(p.revocation_changes()),
        }
    }

    pub async fn insert_token(&self, t: TokenRow) -> Result<(), StoreError> {
        match self {
            IdentityDb::Sqlite(s) => s.with(move |c| sqlite::insert_token(c, &t)).await,
            IdentityDb::Postgres(p) => p.insert_token(&t).await,
        }
    }

    /// Every token, oldest first.
    pub async fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        match self {
            IdentityDb::Sqlite(s) => s.with(|c| sqlite::tokens(c)).await,
            IdentityDb::Postgres(p) => p.tokens().await,
        }
    }

    /// Marks the token `id` revoked (if it is not already); `None` if there is no such token.
    pub async fn revoke_token(
        &self,
        id: String,
        now_us: i64,
    ) -> Result<Option<TokenRow>, StoreError> {
        match self {
            IdentityDb::Sqlite(s) => s.with(move |c| sqlite::revoke_token(c, &id, now_us)).await,
            IdentityDb::Postgres(p) => p.revoke_token(&id, now_us).await,
        }
    }

    /// One enrolment with the token `hash`, in one transaction holding the token: the use is
    /// spent and the certificate recorded only if `e` signs.
    pub async fn enrol<E: Enrolling>(&self, hash: String, e: E) -> Result<Spent, StoreError> {
        match self {
            IdentityDb::Sqlite(s) => s.with(move |c| sqlite::enrol(c, &hash, e)).await,
            IdentityDb::Postgres(p) => p.enrol(&hash, e).await,
        }
    }

    /// Records a certificate (a renewal's); one with the same serial is replaced.
    pub async fn insert_certificate(&self, r: CertRow) -> Result<(), StoreError> {
        match self {
            IdentityDb::Sqlite(s) => s.with(move |c| sqlite::insert_certificate(c, &r)).await,
            IdentityDb::Postgres(p) => p.insert_certificate(&r).await,
        }
    }

    /// Adds a revocation (on PostgreSQL announcing it to every collector); `false` if the entry
    /// was revoked already.
    pub async fn add_revocation(
        &self,
        entry: Entry,
        reason: String,
        by: String,
        now_us: i64,
    ) -> Result<bool, StoreError> {
        match self {
            IdentityDb::Sqlite(s) => {
                s.with(move |c| sqlite::add_revocation(c, &entry, &reason, &by, now_us))
                    .await
            }
            IdentityDb::Postgres(p) => p.add_revocation(&entry, &reason, &by, now_us).await,
        }
    }

    /// Every revocation made online. An entry this version cannot read is skipped with a warning.
    pub async fn revocations(&self) -> Result<Revocations, StoreError> {
        let entries = match self {
            IdentityDb::Sqlite(s) => s.with(|c| sqlite::revocation_entries(c)).await?,
            IdentityDb::Postgres(p) => p.revocation_entries().await?,
        };
        Ok(parse_revocations(entries))
    }
}

fn parse_revocations(entries: Vec<String>) -> Revocations {
    let mut list = Revocations::default();
    for e in entries {
        match e.parse::<Entry>() {
            Ok(entry) => {
                list.insert(entry);
            }
            Err(err) => tracing::warn!(entry = %e, error = %err, "stored revocation skipped"),
        }
    }
    list
}

const TOKEN_COLUMNS: &str = "hash, id, region, agent_id, id_prefix, created_us, expires_us, uses, \
                             uses_left, revoked_us, ca_fingerprint, created_by";
