//! `/metrics` over HTTP (axum) here; what one scrape says in [`render`].
//!
//! Metrics (the README copies these):
//! - `mxscope_probe_success{target,check,region}`: 1 when the series' hysteresis state is ok on
//!   every endpoint, 0 when one is failing; absent while all its endpoints are stale.
//! - `mxscope_probe_duration_seconds{target,check,region,quantile}`: p50 and p95 of the `total`
//!   phase over the last 5 minutes (from the raw results, 1% relative error).
//! - `mxscope_agent_up{agent,region}` (0 once silent past `--stale-after`),
//!   `mxscope_agent_last_seen_seconds{agent,region}` (Unix time).
//! - `mxscope_ingest_results_stored_total`, `mxscope_ingest_duplicates_total`,
//!   `mxscope_store_batches_total`, `mxscope_store_commit_seconds_total`.
//! - `mxscope_metrics_series_omitted` (label sets over the series cap in the last render).
//! - Anything a [`MetricsSource`] registers (the security counters of `limits.rs` plug in here).

mod render;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

pub use render::{render, MetricsSource, MetricsState};

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `/metrics` on an already bound listener until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: MetricsState,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

async fn metrics(State(state): State<MetricsState>) -> Response {
    match state.scrape().await {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], Body::from(text)).into_response(),
        Err(err) => {
            tracing::error!(error = %crate::error::chain(&err), "metrics scrape failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error (see the collector log)\n",
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests;
