//! The retention job: raw results and rollups past their retention are deleted in small rounds
//! ([`Store::prune`]), so ingest never waits long behind a delete, whatever the backend.

use std::sync::Arc;
use std::time::Duration;

use mxscope_proto::time::now_us;
use tokio_util::sync::CancellationToken;

use super::{Store, StoreError};

/// Prunes in rounds until a round deletes fewer rows than [`Store::prune_batch`], yielding
/// between rounds so ingest interleaves. Returns the rows deleted.
pub async fn prune_all(store: &dyn Store, now_us: i64) -> Result<u64, StoreError> {
    let batch = store.prune_batch().max(1) as u64;
    let mut total = 0;
    loop {
        let n = store.prune(now_us).await?;
        total += n;
        if n < batch {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

/// Right away and then every `every`, prunes until caught up ([`prune_all`]); stops when `stop`
/// is cancelled or the store closed.
pub async fn retention_job(store: Arc<dyn Store>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match prune_all(&*store, now_us()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "retention: old results and rollups deleted"),
            Err(StoreError::WriterClosed) => return,
            Err(err) => tracing::warn!(error = %err, "retention round failed"),
        }
    }
}
