//! `/metrics` over HTTP/1.1: the server (hyper under a connection cap, header and idle timeouts,
//! optional TLS with client certificates) here; what one scrape says in [`render`], the TLS
//! setup in [`tls`].
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
//! - `mxscope_metrics_series_omitted` (label sets over the series cap in the last render),
//!   `mxscope_http_connections_over_cap_total`, `mxscope_http_timeouts_total`,
//!   `mxscope_http_tls_refused_total`, `mxscope_http_forbidden_total`.
//! - Anything a [`MetricsSource`] registers (the security counters of `limits.rs` plug in here).

mod render;
pub mod tls;
pub mod web;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

pub use render::{render, MetricsSource, MetricsState};
pub use tls::TlsError;

use crate::shared::HttpOptions;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// True when `/metrics` on `addr` can be reached from other hosts by anyone: a non-loopback
/// address without TLS and client certificates.
pub fn exposed(addr: SocketAddr, tls: bool) -> bool {
    !tls && !addr.ip().is_loopback()
}

/// What the metrics server refused or cut off (exported on `/metrics` itself).
#[derive(Debug, Default)]
pub struct HttpCounters {
    /// Connections closed at once because `max_connections` were being served.
    pub over_cap: AtomicU64,
    /// Connections closed for a request head (or TLS handshake) not completed in
    /// `header_timeout`, or for nothing moving in `idle_timeout`.
    pub timeouts: AtomicU64,
    /// TLS handshakes that failed (no client certificate, one from another CA, not TLS).
    pub tls_refused: AtomicU64,
    /// Requests answered 403: the client certificate is an agent's.
    pub forbidden: AtomicU64,
}

impl MetricsSource for HttpCounters {
    fn register(&self, registry: &mut Registry) {
        let counters: [(&str, &str, &AtomicU64); 4] = [
            (
                "mxscope_http_connections_over_cap",
                "Metrics connections closed at once: --http-max-connections were being served",
                &self.over_cap,
            ),
            (
                "mxscope_http_timeouts",
                "Metrics connections closed by --http-header-timeout or --http-idle-timeout",
                &self.timeouts,
            ),
            (
                "mxscope_http_tls_refused",
                "Metrics connections whose TLS handshake failed (e.g. no valid client certificate)",
                &self.tls_refused,
            ),
            (
                "mxscope_http_forbidden",
                "Metrics requests refused because the client certificate is an agent's",
                &self.forbidden,
            ),
        ];
        for (name, help, value) in counters {
            let c = Counter::<u64>::default();
            c.inc_by(value.load(Ordering::Relaxed));
            registry.register(name, help, c);
        }
    }
}

/// The `/metrics` server: what it serves, its limits and (optionally) its TLS acceptor.
#[derive(Clone)]
pub struct Server {
    state: MetricsState,
    header_timeout: Duration,
    idle_timeout: Duration,
    max_connections: usize,
    tls: Option<TlsAcceptor>,
    counters: Arc<HttpCounters>,
    /// Routes served beside `/metrics` (the dashboard).
    routes: Option<Router>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("state", &self.state)
            .field("header_timeout", &self.header_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_connections", &self.max_connections)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server with the limits of `options`, TLS when `tls` is given (see [`tls::acceptor`]);
    /// the scrape cache and series cap of `options` apply to `state`, and the server's own
    /// counters are added to what `/metrics` exports.
    pub fn new(state: MetricsState, options: &HttpOptions, tls: Option<TlsAcceptor>) -> Server {
        let counters = Arc::new(HttpCounters::default());
        let state = state
            .with_cache_for(options.cache_for)
            .with_max_series(options.max_series)
            .with_source(counters.clone());
        Server {
            state,
            header_timeout: options.header_timeout,
            idle_timeout: options.idle_timeout,
            max_connections: options.max_connections.max(1),
            tls,
            counters,
            routes: None,
        }
    }

    /// Serves `routes` beside `/metrics`, under the same limits, TLS and certificate check.
    pub fn with_routes(mut self, routes: Router) -> Server {
        self.routes = Some(routes);
        self
    }

    /// The server's refusal counters.
    pub fn counters(&self) -> Arc<HttpCounters> {
        self.counters.clone()
    }

    /// Serves `/metrics` on an already bound listener until `stop` is cancelled, then lets open
    /// connections finish their request (each is bounded by the timeouts) and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let server = Arc::new(self);
        let mut router = Router::new()
            .route("/metrics", get(metrics))
            .with_state(server.state.clone());
        if let Some(routes) = server.routes.clone() {
            router = router.merge(routes);
        }
        let permits = Arc::new(Semaphore::new(server.max_connections));
        let connections = TaskTracker::new();
        loop {
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(err) => {
                        // Out of file descriptors and the like: wait a little, do not spin.
                        warn!(error = %err, "metrics: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // The cap: a connection beyond it is closed at once (dropped), not queued.
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                server.counters.over_cap.fetch_add(1, Ordering::Relaxed);
                debug!(peer = %peer, "metrics: connection over the cap closed");
                continue;
            };
            connections.spawn(connection(
                server.clone(),
                router.clone(),
                stream,
                peer,
                permit,
                stop.clone(),
            ));
        }
        drop(listener);
        connections.close();
        connections.wait().await;
        Ok(())
    }
}

/// One accepted connection: the TLS handshake under the header timeout, then HTTP/1.1.
async fn connection(
    server: Arc<Server>,
    router: Router,
    stream: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
    stop: CancellationToken,
) {
    let Some(acceptor) = &server.tls else {
        http1(&server, router, stream, peer, true, stop).await;
        return;
    };
    let handshake = tokio::select! {
        () = stop.cancelled() => return,
        done = tokio::time::timeout(server.header_timeout, acceptor.accept(stream)) => done,
    };
    let stream = match handshake {
        Err(_) => {
            server.counters.timeouts.fetch_add(1, Ordering::Relaxed);
            debug!(peer = %peer, "metrics: tls handshake timed out");
            return;
        }
        Ok(Err(err)) => {
            server.counters.tls_refused.fetch_add(1, Ordering::Relaxed);
            debug!(peer = %peer, error = %err, "metrics: tls handshake failed");
            return;
        }
        Ok(Ok(stream)) => stream,
    };
    let allowed = tls::may_scrape(stream.get_ref().1.peer_certificates());
    http1(&server, router, stream, peer, allowed, stop).await;
}

/// Serves HTTP/1.1 on one connection until the client closes it, a timeout fires or `stop`
/// is cancelled (then the request in progress is finished). `allowed = false` answers 403.
async fn http1<I>(
    server: &Server,
    router: Router,
    io: I,
    peer: SocketAddr,
    allowed: bool,
    stop: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = Tracked::new(io);
    let last_active = io.last_active.clone();
    let counters = server.counters.clone();
    let activity = last_active.clone();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let mut router = router.clone();
        let counters = counters.clone();
        let busy = activity.busy();
        async move {
            let _busy = busy;
            if !allowed {
                counters.forbidden.fetch_add(1, Ordering::Relaxed);
                let body = "agent certificates may not scrape metrics (use a reader certificate)\n";
                return Ok::<_, Infallible>((StatusCode::FORBIDDEN, body).into_response());
            }
            // A Router is always ready: calling it without `poll_ready` is allowed.
            tower::Service::call(&mut router, req.map(Body::new)).await
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Slowloris: a request head not complete in time closes the connection (hyper starts
        // this timer whenever it waits for a request, so it also ends idle keep-alives).
        .header_read_timeout(server.header_timeout)
        .keep_alive(true);
    let mut conn = pin!(builder.serve_connection(TokioIo::new(io), service));
    let mut stopping = false;
    loop {
        // While a request is answered, look again after one idle period.
        let idle_until =
            last_active.idle_since().unwrap_or_else(Instant::now) + server.idle_timeout;
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(err) = done {
                    if err.is_timeout() {
                        server.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                        debug!(peer = %peer, "metrics: request head not complete in time");
                    } else {
                        debug!(peer = %peer, error = %err, "metrics: connection ended");
                    }
                }
                return;
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(idle_until) => {
                let idle = last_active.idle_since();
                if idle.is_some_and(|at| at + server.idle_timeout <= Instant::now()) {
                    server.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                    debug!(peer = %peer, "metrics: connection idle, closed");
                    return;
                }
            }
        }
    }
}

async fn metrics(axum::extract::State(state): axum::extract::State<MetricsState>) -> Response {
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

/// When a byte last moved on a connection, and whether a request is being answered (a slow
/// render is not idleness).
#[derive(Debug, Clone)]
struct LastActive(Arc<Mutex<(Instant, usize)>>);

impl LastActive {
    fn new() -> LastActive {
        LastActive(Arc::new(Mutex::new((Instant::now(), 0))))
    }

    fn with<T>(&self, f: impl FnOnce(&mut (Instant, usize)) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// When the connection counts as idle from, `None` while a request is being answered.
    fn idle_since(&self) -> Option<Instant> {
        self.with(|(at, busy)| (*busy == 0).then_some(*at))
    }

    fn touch(&self) {
        self.with(|(at, _)| *at = Instant::now());
    }

    /// Marks a request in progress until the guard is dropped.
    fn busy(&self) -> Busy {
        self.with(|(_, busy)| *busy += 1);
        Busy(self.clone())
    }
}

/// A request in progress on a connection (see [`LastActive::busy`]).
struct Busy(LastActive);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.with(|(at, busy)| {
            *busy = busy.saturating_sub(1);
            *at = Instant::now();
        });
    }
}

/// A connection that notes when a byte last moved in either direction (for the idle timeout).
#[derive(Debug)]
struct Tracked<I> {
    inner: I,
    last_active: LastActive,
}

impl<I> Tracked<I> {
    fn new(inner: I) -> Tracked<I> {
        Tracked {
            inner,
            last_active: LastActive::new(),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.last_active.touch();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.last_active.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.last_active.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
