//! What SQLite itself refused, as the store reports it: [`SqliteError`], carried by
//! [`StoreError::Sqlite`], so the backend-neutral error names no rusqlite type.

use std::path::PathBuf;
use std::sync::Arc;

use crate::store::StoreError;

/// A failure of SQLite: opening, migrating, a statement, or a batch's COMMIT.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteError {
    #[error("cannot open database '{}' (check that the directory exists and is writable, or pass another --db)", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database migration to version {version} failed")]
    Migrate {
        version: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database error")]
    Statement(#[from] rusqlite::Error),
    /// The batch's transaction failed to begin or to COMMIT; nothing of the batch is stored.
    #[error("database commit failed")]
    Commit(#[source] Arc<rusqlite::Error>),
}

impl SqliteError {
    /// True when SQLite said the disk is full (`SQLITE_FULL`), judged by the error code.
    pub fn is_disk_full(&self) -> bool {
        match self {
            SqliteError::Open { source: e, .. }
            | SqliteError::Migrate { source: e, .. }
            | SqliteError::Statement(e) => is_sqlite_full(e),
            SqliteError::Commit(e) => is_sqlite_full(e),
        }
    }
}

/// A failed statement, so `?` works on rusqlite results in the backend.
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Sqlite(SqliteError::Statement(e))
    }
}

/// `SQLITE_FULL` by its primary result code (never by message text).
pub(super) fn is_sqlite_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}
