//! The dashboard on the `/metrics` listener: the page and its script (embedded at build time,
//! nothing is fetched from elsewhere), the JSON API under `/api/v1/…` the page reads (the Query
//! API's answers as JSON, plus latency history and the series' facts) and the live stream of
//! state changes as server-sent events (`/api/v1/events`, what `mxscopectl watch` gets).
//!
//! Who may read it: on TLS, the client certificates `/metrics` takes (see [`super::tls`]); in
//! plain HTTP only from a loopback listener, unless a read token is set (`--http-read-token-file`),
//! which every request must then carry (`Authorization: Bearer …`, or the cookie `/login?token=…`
//! sets for the browser).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query as Params, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::Stream;
use mxscope_proto::pb::{self, query_server::Query};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tonic::Code;

use crate::analysis::aggregate::Agg;
use crate::query::QueryService;
use crate::shared::Shared;
use crate::store::rollup::{plan, RAW_BUCKET_US};
use crate::store::Filter;
use mxscope_proto::time::now_us;

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const APP_CSS: &str = include_str!("web/app.css");
/// The cookie `/login` sets.
const TOKEN_COOKIE: &str = "mxscope_read";
/// Keep-alive comments on the event stream, so proxies and browsers see it is alive.
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Longest window a history or a matrix may ask for (the rollups' retention is longer, but no
/// page asks for more).
const MAX_WINDOW: Duration = Duration::from_secs(400 * 86_400);

/// Who may read the dashboard (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// A read token every request must carry.
    pub token: Option<String>,
    /// Plain HTTP on a non-loopback listener: refused unless a token is set.
    pub plain_exposed: bool,
}

#[derive(Clone)]
struct Web {
    query: Arc<QueryService>,
    shared: Arc<Shared>,
    access: Arc<Access>,
}

/// The dashboard's routes (`/`, its assets, `/login`, `/api/v1/…`), guarded by `access`.
pub(crate) fn router(shared: Arc<Shared>, access: Access) -> Router {
    let web = Web {
        query: Arc::new(QueryService::new(shared.clone())),
        shared,
        access: Arc::new(access),
    };
    Router::new()
        .route(
            "/",
            get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/app.css",
            get(|| async { page(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route("/api/v1/status", get(status))
        .route("/api/v1/matrix", get(matrix))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/diagnose/{target}", get(diagnose))
        .route("/api/v1/latency/{target}", get(latency))
        .route("/api/v1/history/{target}", get(history))
        .route("/api/v1/target/{target}", get(target))
        .route("/api/v1/events", get(events))
        .route_layer(middleware::from_fn_with_state(web.clone(), guard))
        // `/login` checks the token itself (it is how the browser gets the cookie).
        .route("/login", get(login))
        .with_state(web)
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            // Nothing the page loads may come from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'",
            ),
        ],
        body,
    )
        .into_response()
}

/// An API error: a status and `{"error": "…"}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> ApiError {
        let code = match s.code() {
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, s.message().to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        tracing::error!(error = %crate::error::chain(&e), "dashboard: store read failed");
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store read failed (see the collector log)".into(),
        )
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn token_of(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return v.strip_prefix("Bearer ").map(str::trim);
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == TOKEN_COOKIE)
        .map(|(_, v)| v)
}

/// Equal in time independent of where the first difference is.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn guard(
    State(web): State<Web>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    match &web.access.token {
        Some(token) if !token_of(&headers).is_some_and(|t| same(t, token)) => {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "this dashboard needs the read token: open /login?token=… once, or send \
                 Authorization: Bearer …"
                    .into(),
            )
            .into_response();
        }
        Some(_) => {}
        None if web.access.plain_exposed => {
            return ApiError(
                StatusCode::FORBIDDEN,
                "the dashboard is served in plain HTTP only on a loopback --http address: bind \
                 --http to 127.0.0.1, pass --http-tls-cert/--http-tls-key/--http-client-ca, or \
                 set --http-read-token-file"
                    .into(),
            )
            .into_response();
        }
        None => {}
    }
    next.run(request).await
}

#[derive(Deserialize)]
struct LoginParams {
    token: String,
}

async fn login(State(web): State<Web>, Params(p): Params<LoginParams>) -> Response {
    match &web.access.token {
        Some(token) if same(&p.token, token) => {
            let cookie = format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Some(_) => ApiError(StatusCode::UNAUTHORIZED, "wrong read token".into()).into_response(),
        None => Redirect::to("/").into_response(),
    }
}

/// A window like `5m`, `24h` or `7d`; `None` when absent or empty.
fn window(text: Option<&str>, what: &str) -> Result<Option<Duration>, ApiError> {
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let d = humantime::parse_duration(text).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{what}={text:?}: {e} (e.g. 1h, 24h, 7d)"),
        )
    })?;
    if d > MAX_WINDOW || d.is_zero() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{what}={text:?}: between 1s and 400d"),
        ));
    }
    Ok(Some(d))
}

fn millis(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Deserialize, Default)]
struct StatusParams {
    target: Option<String>,
    check: Option<String>,
    region: Option<String>,
    window: Option<String>,
}

/// Every row of `status` (all pages).
async fn status(
    State(web): State<Web>,
    Params(p): Params<StatusParams>,
) -> ApiResult<pb::StatusResponse> {
    let mut request = pb::StatusRequest {
        window_ms: millis(window(p.window.as_deref(), "window")?),
        target: p.target.unwrap_or_default(),
        check: p.check.unwrap_or_default(),
        region: p.region.unwrap_or_default(),
        offset: 0,
    };
    let mut all = pb::StatusResponse::default();
    loop {
        let page = web
            .query
            .status(tonic::Request::new(request.clone()))
            .await?
            .into_inner();
        all.window_ms = page.window_ms;
        all.rows.extend(page.rows);
        if !page.truncated || page.next_offset <= request.offset {
            break;
        }
        request.offset = page.next_offset;
    }
    Ok(Json(all))
}

#[derive(Deserialize, Default)]
struct MatrixParams {
    check: Option<String>,
    metric: Option<String>,
    since: Option<String>,
}

/// Every row of `matrix` (all pages).
async fn matrix(
    State(web): State<Web>,
    Params(p): Params<MatrixParams>,
) -> ApiResult<pb::MatrixResponse> {
    let mut request = pb::MatrixRequest {
        check: p.check.unwrap_or_default(),
        metric: p.metric.unwrap_or_default(),
        since_ms: millis(window(p.since.as_deref(), "since")?),
        offset: 0,
    };
    let mut all = pb::MatrixResponse::default();
    loop {
        let page = web
            .query
            .matrix(tonic::Request::new(request.clone()))
            .await?
            .into_inner();
        all.metric = page.metric;
        for r in page.regions {
            if !all.regions.contains(&r) {
                all.regions.push(r);
            }
        }
        all.rows.extend(page.rows);
        if !page.truncated || page.next_offset <= request.offset {
            break;
        }
        request.offset = page.next_offset;
    }
    all.regions.sort();
    Ok(Json(all))
}

async fn agents(State(web): State<Web>) -> ApiResult<pb::AgentsResponse> {
    Ok(Json(
        web.query
            .agents(tonic::Request::new(pb::AgentsRequest {}))
            .await?
            .into_inner(),
    ))
}

async fn diagnose(
    State(web): State<Web>,
    Path(target): Path<String>,
) -> ApiResult<pb::DiagnoseResponse> {
    Ok(Json(
        web.query
            .diagnose(tonic::Request::new(pb::DiagnoseRequest {
                target,
                since_ms: 0,
            }))
            .await?
            .into_inner(),
    ))
}

#[derive(Deserialize, Default)]
struct LatencyParams {
    check: Option<String>,
    phase: Option<String>,
    since: Option<String>,
}

async fn latency(
    State(web): State<Web>,
    Path(target): Path<String>,
    Params(p): Params<LatencyParams>,
) -> ApiResult<pb::LatencyResponse> {
    Ok(Json(
        web.query
            .latency(tonic::Request::new(pb::LatencyRequest {
                target,
                check: p.check.unwrap_or_default(),
                phase: p.phase.unwrap_or_default(),
                since_ms: millis(window(p.since.as_deref(), "since")?),
            }))
            .await?
            .into_inner(),
    ))
}

/// `[bucket start (Unix ms), p50 ms, p95 ms, results]`.
type Point = (i64, Option<f64>, Option<f64>, u64);

/// One line of a history chart: a (check, region, phase) and its points.
#[derive(Serialize)]
struct Line {
    check: String,
    region: String,
    phase: String,
    points: Vec<Point>,
}

/// Reachability over time of a (check, region).
#[derive(Serialize)]
struct Reach {
    check: String,
    region: String,
    /// `[bucket start (Unix ms), ok + warn share, results]`.
    points: Vec<(i64, Option<f64>, u64)>,
}

#[derive(Serialize)]
struct History {
    target: String,
    since_ms: i64,
    /// Width of a bucket: a minute on raw results, else the rollup level's.
    bucket_ms: i64,
    source: &'static str,
    latency: Vec<Line>,
    reachability: Vec<Reach>,
}

#[derive(Deserialize, Default)]
struct HistoryParams {
    since: Option<String>,
    check: Option<String>,
}

/// Latency (p50/p95 per phase) and reachability per region over time, from the raw results
/// (windows up to 3 hours, minute buckets) or the rollups (hour, day, week rows), endpoints of
/// one (check, region) merged.
async fn history(
    State(web): State<Web>,
    Path(target): Path<String>,
    Params(p): Params<HistoryParams>,
) -> ApiResult<History> {
    let since = window(p.since.as_deref(), "since")?.unwrap_or(Duration::from_secs(3600));
    let now = now_us();
    let since_us = now.saturating_sub(i64::try_from(since.as_micros()).unwrap_or(i64::MAX));
    let (source, bucket_us) = match plan(since_us, now) {
        None => ("results", RAW_BUCKET_US),
        Some((level, _)) => (level.name(), level.width_us()),
    };
    let filter = Filter {
        target: target.clone(),
        check: p.check.unwrap_or_default(),
        ..Filter::default()
    };
    let rows = web
        .shared
        .store
        .history(filter, since_us, now, None)
        .await?;
    let mut merged: BTreeMap<(String, String), BTreeMap<i64, Agg>> = BTreeMap::new();
    for (bucket, id, agg) in rows {
        merged
            .entry((id.check, id.region))
            .or_default()
            .entry(bucket)
            .or_default()
            .merge(&agg);
    }
    let mut latency = Vec::new();
    let mut reachability = Vec::new();
    for ((check, region), buckets) in merged {
        let mut phases: BTreeMap<String, Vec<Point>> = BTreeMap::new();
        let mut reach = Vec::with_capacity(buckets.len());
        for (bucket, agg) in &buckets {
            let t = bucket / 1000;
            reach.push((t, agg.reachability(), agg.count));
            for (phase, sketch) in agg.phases.iter() {
                let ms = |q: f64| sketch.quantile(q).map(|us| us / 1000.0);
                phases.entry(phase.to_string()).or_default().push((
                    t,
                    ms(0.5),
                    ms(0.95),
                    sketch.count(),
                ));
            }
        }
        for (phase, points) in phases {
            latency.push(Line {
                check: check.clone(),
                region: region.clone(),
                phase,
                points,
            });
        }
        reachability.push(Reach {
            check,
            region,
            points: reach,
        });
    }
    Ok(Json(History {
        target,
        since_ms: since_us / 1000,
        bucket_ms: bucket_us / 1000,
        source,
        latency,
        reachability,
    }))
}

/// How far back the target page's timeline reaches, and how many changes it shows at most.
const TIMELINE_DAYS: i64 = 30;
const TIMELINE_LIMIT: u32 = 500;

/// Every series of a target with its state, the facts of its latest result (certificates,
/// policy records) and its stored state changes (newest first), as the page shows them.
async fn target(
    State(web): State<Web>,
    Path(target): Path<String>,
) -> ApiResult<serde_json::Value> {
    let rows = web
        .shared
        .store
        .series(Filter {
            target: target.clone(),
            ..Filter::default()
        })
        .await?;
    if rows.is_empty() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no results for target {target:?} yet (mxscopectl targets lists the targets)"),
        ));
    }
    let series: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|s| {
            json!({
                "endpoint": s.endpoint,
                "check": s.check,
                "region": s.region,
                "failing": s.failing,
                "state_since_us": s.state_since_us,
                "last_seen_us": s.last_seen_us,
                "last_error": s.last_error,
                "last_message": s.last_message,
                "agent_id": s.agent_id,
                "facts": s.last_facts,
            })
        })
        .collect();
    // The stored timeline: state changes of the last TIMELINE_DAYS, from every collector.
    let since = now_us() - TIMELINE_DAYS * 86_400_000_000;
    let changes = web
        .shared
        .store
        .changes(&target, since, TIMELINE_LIMIT)
        .await?;
    Ok(Json(
        json!({ "target": target, "series": series, "changes": changes }),
    ))
}

/// State changes as server-sent events (`event: state`, the JSON of a `watch` event), from
/// every collector on the database, until the client goes or the collector stops.
async fn events(State(web): State<Web>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = web.shared.store.subscribe();
    let mail_rx = web.shared.mail_events.subscribe();
    let stop = web.shared.shutdown.clone();
    let stream = futures::stream::unfold(
        (rx, mail_rx, stop),
        |(mut rx, mut mail_rx, stop)| async move {
            let next = tokio::select! {
                () = stop.cancelled() => return None,
                next = rx.recv() => next,
                next = mail_rx.recv() => next,
            };
            let event = match next {
                Ok(e) => Event::default()
                    .event("state")
                    .json_data(&e)
                    .unwrap_or_else(|_| Event::default().comment("unencodable event")),
                // The page reloads what it shows on this event.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    Event::default().event("lagged").data(n.to_string())
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            Some((Ok(event), (rx, mail_rx, stop)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
}
