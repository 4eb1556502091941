//! The checkpoint thread: passive WAL checkpoints on their own connection beside the writer.

use super::*;

/// A thread with its own connection that runs passive WAL checkpoints (copying committed pages
/// into the database file and syncing it) a few times a second while the writer commits. The
/// writer's own automatic checkpoint then finds those pages copied already: a 128 MiB copy and
/// fsync no longer stalls ingest every few hundred thousand results, and the copy runs on the
/// other core.
pub(super) struct Checkpointer {
    pub(super) wake: std::sync::mpsc::SyncSender<()>,
    pub(super) handle: std::thread::JoinHandle<()>,
    pub(super) last: Instant,
}

/// Least time between two nudges of the checkpointer.
pub(super) const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

impl Checkpointer {
    pub(super) fn spawn(path: &Path) -> Result<Checkpointer, StoreError> {
        let open_failed = |source| SqliteError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open_failed)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_failed)?;
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let handle = std::thread::Builder::new()
            .name("mxscope-db-checkpoint".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    let res: rusqlite::Result<(i64, i64, i64)> =
                        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        });
                    if let Err(err) = res {
                        tracing::debug!(error = %err, "background WAL checkpoint failed; the writer's own checkpoint still runs");
                    }
                }
            })
            .map_err(|source| StoreError::Thread {
                name: "mxscope-db-checkpoint",
                source,
            })?;
        Ok(Checkpointer {
            wake,
            handle,
            last: Instant::now(),
        })
    }

    /// After a commit: wakes the thread if it is idle and was last woken a while ago.
    pub(super) fn nudge(&mut self) {
        if self.last.elapsed() >= CHECKPOINT_EVERY {
            self.last = Instant::now();
            let _ = self.wake.try_send(());
        }
    }

    pub(super) fn stop(self) {
        drop(self.wake);
        if self.handle.join().is_err() {
            tracing::error!("WAL checkpoint thread panicked");
        }
    }
}
