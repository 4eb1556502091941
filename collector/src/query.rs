//! The `Query` service used by `mxscopectl`: status (see [`crate::analysis::status`] for the
//! semantics), results, agents, target management, and the cross-region views (matrix, latency,
//! diagnose; see [`crate::analysis::cross`]) and the live stream of state changes (watch).

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use mxscope_proto::pb::{self, query_server::Query};
use tonic::{Request, Response, Status};
use tracing::info;

use std::collections::BTreeSet;

use crate::analysis::cross::{self, Metric};
use crate::analysis::status::{status_rows_from_rollups, RAW_WINDOW_MAX_US};
use crate::analysis::{status_rows, StatusParams};
use crate::error::{unknown_target, ServiceError};
use crate::shared::Shared;
use crate::store::{Filter, LOCAL_AGENT_LABEL};
use mxscope_proto::names::{self, TargetName};
use mxscope_proto::target::{validate, Target};
use mxscope_proto::time::now_us;

/// Results returned when a request sets no limit.
pub const DEFAULT_RESULTS_LIMIT: u32 = 100;
/// Most results returned by one request.
pub const MAX_RESULTS_LIMIT: u32 = 10_000;
/// Most bytes of results in one answer: below the 4 MiB a gRPC client decodes by default, so
/// however large the stored results are, an answer always reaches the operator.
pub const MAX_RESULTS_BYTES: usize = 3 << 20;
/// Span over which `results_per_min` of an agent is averaged.
const RATE_SPAN: Duration = Duration::from_secs(5 * 60);
/// An agent whose session is on another collector counts as connected while it was heard from
/// (results or heartbeats, every 10 s) this recently.
const REMOTE_SESSION_FRESH: Duration = Duration::from_secs(30);
/// Window of matrix and latency when a request sets none.
pub const DEFAULT_SINCE: Duration = Duration::from_secs(3600);
/// Label that marks a target as a canary (a reference mail server), with value `true`.
pub const CANARY_LABEL: &str = "canary";

/// Most bytes of any answer's rows: one bad agent's series must never make an answer too large
/// for an operator's client.
pub const MAX_ANSWER_BYTES: usize = MAX_RESULTS_BYTES;

/// Keeps the leading `rows` whose encoded size fits in `max` bytes, and always the first (one
/// row is far below the cap: `proto::limits`); true when it cut.
fn cap_bytes<T: prost::Message>(rows: &mut Vec<T>, max: usize) -> bool {
    let mut total = 0usize;
    let keep = rows
        .iter()
        .position(|r| {
            // Each repeated element also costs its tag and length prefix (at most 6 bytes).
            total += r.encoded_len() + 6;
            total > max
        })
        .unwrap_or(rows.len())
        .max(1)
        .min(rows.len());
    let cut = keep < rows.len();
    if cut {
        tracing::warn!(
            rows = rows.len(),
            kept = keep,
            "answer cut at its byte cap; the client is told to narrow its filter"
        );
    }
    rows.truncate(keep);
    cut
}

/// The page of `rows` from `offset`, cut at the byte cap; the offset of the next page (0 when
/// this is the last).
fn page<T: prost::Message>(rows: &mut Vec<T>, offset: u32) -> (bool, u32) {
    let skip = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(rows.len());
    rows.drain(..skip);
    let truncated = cap_bytes(rows, MAX_ANSWER_BYTES);
    let next = if truncated {
        u32::try_from(skip + rows.len()).unwrap_or(u32::MAX)
    } else {
        0
    };
    (truncated, next)
}

/// The canaries among `central` targets. Only operators define canaries: a failing canary makes
/// an agent's other failures count as its own network's, so an agent-local target (which any
/// enrolled agent can declare in its hello) never is one, whatever its labels.
pub(crate) fn canary_names(central: &[Target]) -> BTreeSet<String> {
    central
        .iter()
        .filter(|t| t.labels.get(CANARY_LABEL).is_some_and(|v| v == "true"))
        .map(|t| t.name.clone())
        .collect()
}

/// gRPC `Query` implementation.
pub struct QueryService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QueryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryService").finish_non_exhaustive()
    }
}

impl QueryService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        QueryService { shared }
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The metric a request names; none means reachability.
fn metric_of(name: &str) -> Result<Metric, ServiceError> {
    match name {
        "" => Ok(Metric::Reachability),
        m => m
            .parse()
            .map_err(|e: mxscope_proto::UnknownName| ServiceError::InvalidArgument(e.to_string())),
    }
}

/// Normalizes a target name for lookups the way [`validate`] stores it.
fn lookup_name(name: &str) -> String {
    match TargetName::parse(name) {
        Some(t) => t.canonical(),
        None => names::normalize_domain(name),
    }
}

impl QueryService {
    fn status_params(&self, now: i64) -> StatusParams {
        StatusParams {
            now_us: now,
            stale_after_us: micros(self.shared.config.stale_after),
        }
    }

    /// Names of the central targets labelled `canary=true` (see [`canary_names`]).
    async fn canaries(&self) -> Result<BTreeSet<String>, ServiceError> {
        Ok(canary_names(&self.shared.store.central_targets().await?))
    }

    /// Every series' analysis view (agent faults need all of them, whatever the request filters).
    async fn views(
        &self,
        now: i64,
    ) -> Result<Vec<crate::analysis::diagnosis::SeriesView>, ServiceError> {
        let series = self.shared.store.series(Filter::default()).await?;
        let canaries = self.canaries().await?;
        Ok(cross::views(&series, &canaries, &self.status_params(now)))
    }
}

fn since_of(since_ms: u64) -> Duration {
    if since_ms == 0 {
        DEFAULT_SINCE
    } else {
        Duration::from_millis(since_ms)
    }
}

type Res<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Query for QueryService {
    type WatchStream = BoxStream<'static, Result<pb::WatchEvent, Status>>;

    async fn status(&self, request: Request<pb::StatusRequest>) -> Res<pb::StatusResponse> {
        let req = request.into_inner();
        let offset = req.offset;
        let window = if req.window_ms == 0 {
            self.shared.config.window
        } else {
            Duration::from_millis(req.window_ms)
        };
        let now = now_us();
        let filter = Filter {
            target: req.target,
            check: req.check,
            region: req.region,
            agent_id: String::new(),
        };
        let since = now.saturating_sub(micros(window));
        let params = self.status_params(now);
        let mut rows = if micros(window) <= RAW_WINDOW_MAX_US {
            let (series, samples) = self
                .shared
                .store
                .status_input(filter, since)
                .await
                .map_err(ServiceError::from)?;
            status_rows(&series, &samples, &params)
        } else {
            let store = &self.shared.store;
            let series = store
                .series(filter.clone())
                .await
                .map_err(ServiceError::from)?;
            let rollups = store
                .rollups(filter, since, now, Some("total".into()))
                .await
                .map_err(ServiceError::from)?;
            status_rows_from_rollups(&series, &rollups, &params)
        };
        let (truncated, next_offset) = page(&mut rows, offset);
        Ok(Response::new(pb::StatusResponse {
            rows,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            truncated,
            next_offset,
        }))
    }

    async fn results(&self, request: Request<pb::ResultsRequest>) -> Res<pb::ResultsResponse> {
        let req = request.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_RESULTS_LIMIT,
            n => n.min(MAX_RESULTS_LIMIT),
        };
        let filter = Filter {
            target: req.target,
            check: req.check,
            region: req.region,
            agent_id: req.agent_id,
        };
        let mut results = self
            .shared
            .store
            .results(filter, req.since_us, limit)
            .await
            .map_err(ServiceError::from)?;
        let truncated = cap_bytes(&mut results, MAX_RESULTS_BYTES);
        Ok(Response::new(pb::ResultsResponse { results, truncated }))
    }

    async fn agents(&self, _request: Request<pb::AgentsRequest>) -> Res<pb::AgentsResponse> {
        let store = &self.shared.store;
        let now = now_us();
        let agents = store.agents().await.map_err(ServiceError::from)?;
        let counts = store
            .results_per_agent(now.saturating_sub(micros(RATE_SPAN)))
            .await
            .map_err(ServiceError::from)?;
        let stale_after = micros(self.shared.config.stale_after);
        let minutes = RATE_SPAN.as_secs_f64() / 60.0;
        let me = &self.shared.config.name;
        let agents = agents
            .into_iter()
            .map(|a| {
                // Connected here, by this collector's own sessions; to another collector sharing
                // the database, by the one its latest session named, while it is heard from.
                let here = self.shared.is_connected(&a.id);
                let elsewhere = !here
                    && !a.collector.is_empty()
                    && a.collector != *me
                    && now.saturating_sub(a.last_seen_us) <= micros(REMOTE_SESSION_FRESH);
                (a, here, elsewhere)
            })
            .map(|(a, here, elsewhere)| pb::AgentInfo {
                collector: match (here, elsewhere) {
                    (true, _) => me.clone(),
                    (false, true) => a.collector.clone(),
                    (false, false) => String::new(),
                },
                connected: here || elsewhere,
                results_per_min: counts.get(&a.id).copied().unwrap_or(0) as f64 / minutes,
                state: if now.saturating_sub(a.last_seen_us) > stale_after {
                    "stale"
                } else {
                    "ok"
                }
                .to_string(),
                labels: a.labels.into_iter().collect(),
                id: a.id,
                region: a.region,
                version: a.version,
                last_seen_us: a.last_seen_us,
                stored_up_to_seq: a.stored_up_to_seq,
                dropped_total: a.dropped_total,
                spool_depth: a.spool_depth,
                cert_not_after_us: a.cert_not_after_us.unwrap_or(0),
            })
            .collect();
        Ok(Response::new(pb::AgentsResponse { agents }))
    }

    /// Targets × regions over `since_ms` (default 1h) from rollups, with a scope per (target,
    /// check) under the collector's `--quorum`; see [`cross::matrix`].
    async fn matrix(&self, request: Request<pb::MatrixRequest>) -> Res<pb::MatrixResponse> {
        let req = request.into_inner();
        let metric = metric_of(&req.metric)?;
        let now = now_us();
        let since = now.saturating_sub(micros(since_of(req.since_ms)));
        let views = self.views(now).await?;
        let filter = Filter {
            check: req.check.clone(),
            ..Filter::default()
        };
        // Decode only the sketches the cells need: none for reachability (no phase is named ""),
        // the check's latency phase when one check is asked for, else all.
        let phase = match metric {
            Metric::Reachability => Some(String::new()),
            _ if !req.check.is_empty() => Some(cross::latency_phase(&req.check).to_string()),
            _ => None,
        };
        let rollups = self
            .shared
            .store
            .rollups(filter, since, now, phase)
            .await
            .map_err(ServiceError::from)?;
        let mut answer = cross::matrix(
            &views,
            &rollups,
            metric,
            self.shared.config.quorum,
            &req.check,
        );
        (answer.truncated, answer.next_offset) = page(&mut answer.rows, req.offset);
        Ok(Response::new(answer))
    }

    /// p50/p95/p99 and count per region and phase of one target over `since_ms` (default 1h).
    async fn latency(&self, request: Request<pb::LatencyRequest>) -> Res<pb::LatencyResponse> {
        let req = request.into_inner();
        if req.target.is_empty() {
            return Err(ServiceError::InvalidArgument("latency needs a target".into()).into());
        }
        let now = now_us();
        let since = now.saturating_sub(micros(since_of(req.since_ms)));
        let filter = Filter {
            target: lookup_name(&req.target),
            check: req.check,
            ..Filter::default()
        };
        let phase = Some(req.phase.clone()).filter(|p| !p.is_empty());
        let rollups = self
            .shared
            .store
            .rollups(filter, since, now, phase)
            .await
            .map_err(ServiceError::from)?;
        let mut rows = cross::latency(&rollups, &req.phase);
        let truncated = cap_bytes(&mut rows, MAX_ANSWER_BYTES);
        Ok(Response::new(pb::LatencyResponse { rows, truncated }))
    }

    /// The first failing layer of a target, where, and the evidence, from the latest state of
    /// every series (`since_ms` is not used: the state already carries the hysteresis).
    async fn diagnose(&self, request: Request<pb::DiagnoseRequest>) -> Res<pb::DiagnoseResponse> {
        let target = lookup_name(&request.into_inner().target);
        if target.is_empty() {
            return Err(ServiceError::InvalidArgument("diagnose needs a target".into()).into());
        }
        let views = self.views(now_us()).await?;
        Ok(Response::new(cross::diagnosis(&target, &views)))
    }

    /// Central targets (source `central`), then agent-local ones (source `local`, one entry per
    /// reporting agent, named in the `mxscope.agent` label, `regions` = that agent's region).
    async fn list_targets(
        &self,
        _request: Request<pb::ListTargetsRequest>,
    ) -> Res<pb::ListTargetsResponse> {
        let store = &self.shared.store;
        let mut targets: Vec<pb::TargetSpec> = store
            .central_targets()
            .await
            .map_err(ServiceError::from)?
            .iter()
            .map(|t| t.to_wire("central"))
            .collect();
        for (agent, region, t) in store.local_targets().await.map_err(ServiceError::from)? {
            let mut spec = t.to_wire("local");
            spec.labels.insert(LOCAL_AGENT_LABEL.to_string(), agent);
            spec.regions = vec![region];
            targets.push(spec);
        }
        let truncated = cap_bytes(&mut targets, MAX_ANSWER_BYTES);
        Ok(Response::new(pb::ListTargetsResponse {
            targets,
            truncated,
        }))
    }

    async fn get_target(&self, request: Request<pb::GetTargetRequest>) -> Res<pb::TargetSpec> {
        let name = lookup_name(&request.into_inner().name);
        let central = self
            .shared
            .store
            .central_targets()
            .await
            .map_err(ServiceError::from)?;
        if let Some(t) = central.iter().find(|t| t.name == name) {
            return Ok(Response::new(t.to_wire("central")));
        }
        let local = self
            .shared
            .store
            .local_targets()
            .await
            .map_err(ServiceError::from)?;
        if let Some((agent, region, t)) = local.into_iter().find(|(_, _, t)| t.name == name) {
            let mut spec = t.to_wire("local");
            spec.labels.insert(LOCAL_AGENT_LABEL.to_string(), agent);
            spec.regions = vec![region];
            return Ok(Response::new(spec));
        }
        Err(ServiceError::NotFound(unknown_target(&name)).into())
    }

    async fn put_target(&self, request: Request<pb::PutTargetRequest>) -> Res<pb::TargetSpec> {
        let req = request.into_inner();
        let Some(spec) = req.target else {
            return Err(ServiceError::InvalidArgument("put target needs a target".into()).into());
        };
        let target = validate(&spec).map_err(ServiceError::from)?;
        let saved = target.to_wire("central");
        self.shared
            .store
            .put_target(target, req.update, now_us())
            .await
            .map_err(ServiceError::from)?;
        info!(target.name = %saved.name, update = req.update, "target saved");
        Ok(Response::new(saved))
    }

    async fn create_token(&self, request: Request<pb::CreateTokenRequest>) -> Res<pb::TokenInfo> {
        let by = caller(request.extensions());
        let info =
            crate::enrol::create_token(&self.shared.enrolment, &by, request.into_inner()).await?;
        Ok(Response::new(info))
    }

    async fn list_tokens(
        &self,
        _request: Request<pb::ListTokensRequest>,
    ) -> Res<pb::ListTokensResponse> {
        Ok(Response::new(
            crate::enrol::list_tokens(&self.shared.enrolment).await?,
        ))
    }

    async fn revoke_token(&self, request: Request<pb::RevokeTokenRequest>) -> Res<pb::TokenInfo> {
        let by = caller(request.extensions());
        let id = request.into_inner().id;
        Ok(Response::new(
            crate::enrol::revoke_token(&self.shared.enrolment, &by, id).await?,
        ))
    }

    async fn revoke(&self, request: Request<pb::RevokeRequest>) -> Res<pb::RevokeResponse> {
        let by = caller(request.extensions());
        let req = request.into_inner();
        Ok(Response::new(
            crate::enrol::revoke(&self.shared.enrolment, &by, req).await?,
        ))
    }

    async fn remove_target(
        &self,
        request: Request<pb::RemoveTargetRequest>,
    ) -> Res<pb::RemoveTargetResponse> {
        let name = lookup_name(&request.into_inner().name);
        self.shared
            .store
            .remove_target(&name)
            .await
            .map_err(ServiceError::from)?;
        info!(target.name = %name, "target removed");
        Ok(Response::new(pb::RemoveTargetResponse {}))
    }

    /// State changes (ok ⇄ failing) as they commit, for one target or all — of endpoints (level
    /// `endpoint`) and of mail flow per domain and region (level `mail`); ends on shutdown, and
    /// with `PermissionDenied` when the caller's certificate is revoked.
    /// A watcher too slow to keep up skips the changes it missed (logged).
    async fn watch(&self, request: Request<pb::WatchRequest>) -> Res<Self::WatchStream> {
        let peer = request.extensions().get::<mxscope_pki::Peer>().cloned();
        let who = peer.as_ref().map_or_else(
            || "plain-text clients".to_string(),
            |p| p.identity.to_string(),
        );
        let slot = WatchSlot::take(self.shared.clone(), who)?;
        let target = lookup_name(&request.into_inner().target);
        let rx = self.shared.store.subscribe();
        let mail_rx = self.shared.mail_events.subscribe();
        let stop = self.shared.shutdown.clone();
        let stream =
            futures::stream::unfold((rx, mail_rx, stop), move |(mut rx, mut mail_rx, stop)| {
                let target = target.clone();
                // Held as long as the stream: dropping it frees the identity's slot.
                let _slot = &slot;
                async move {
                    loop {
                        let next = tokio::select! {
                            () = stop.cancelled() => return None,
                            next = rx.recv() => next,
                            next = mail_rx.recv() => next,
                        };
                        match next {
                            Ok(e) if target.is_empty() || e.target == target => {
                                return Some((Ok(e), (rx, mail_rx, stop)));
                            }
                            Ok(_) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                tracing::warn!(
                                    skipped = n,
                                    "watch client too slow, state changes skipped"
                                );
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                        }
                    }
                }
            });
        let stream = Box::pin(stream);
        Ok(Response::new(match peer {
            Some(peer) => crate::auth::end_when_revoked(
                stream,
                peer,
                self.shared.revoked.clone(),
                self.shared.counters.clone(),
            ),
            None => stream,
        }))
    }
}

/// One of an identity's `watch` streams (at most `max_watches_per_identity`), given back when
/// the stream ends.
struct WatchSlot {
    shared: Arc<Shared>,
    who: String,
}

impl WatchSlot {
    fn take(shared: Arc<Shared>, who: String) -> Result<WatchSlot, Status> {
        let max = shared.config.max_watches_per_identity;
        let mut open = shared
            .watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(who.clone()).or_default();
        if *n >= max {
            tracing::warn!(who = %who, open = *n, "watch refused: too many open for this identity");
            return Err(ServiceError::ResourceExhausted(format!(
                "{who} has {max} watch streams open already (--max-watches); close one first"
            ))
            .into());
        }
        *n += 1;
        drop(open);
        Ok(WatchSlot { shared, who })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self
            .shared
            .watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.who);
            }
        }
    }
}

/// Who makes a call, for audit lines: the certificate's identity, or `insecure` without one.
fn caller(ext: &tonic::codegen::http::Extensions) -> String {
    ext.get::<mxscope_pki::Identity>()
        .map_or_else(|| "insecure".to_string(), ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names() {
        assert_eq!(metric_of("p95").unwrap(), Metric::P95);
        assert_eq!(metric_of("").unwrap(), Metric::Reachability);
        let msg = metric_of("p42").unwrap_err().to_string();
        assert!(msg.contains("p42") && msg.contains("p99"), "{msg}");
    }

    #[test]
    fn lookup_names_match_validated_names() {
        assert_eq!(lookup_name(" Example.TEST. "), "example.test");
        assert_eq!(lookup_name("[::1]"), "::1");
        assert_eq!(lookup_name("127.0.0.1"), "127.0.0.1");
    }

    /// The rules are proto's (`mxscope_proto::target`, tested there); this checks the canonical
    /// form a validated target is stored and answered in.
    #[test]
    fn validated_targets_are_stored_in_canonical_form() {
        use mxscope_proto::{CheckKind, TargetKind};
        let spec = |name: &str, checks: &[&str]| pb::TargetSpec {
            name: name.into(),
            checks: checks.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        let d = validate(&spec("Example.TEST.", &["smtp", "mx", "smtp"])).unwrap();
        assert_eq!(d.name, "example.test");
        assert_eq!(d.kind, TargetKind::Domain);
        assert_eq!(d.checks, vec![CheckKind::Smtp, CheckKind::Mx]);
        let wire = d.to_wire("central");
        assert_eq!(wire.checks, vec!["smtp", "mx"]);
        assert_eq!((wire.interval_ms, wire.timeout_ms), (60_000, 10_000));
        assert_eq!(wire.kind, "domain");
        assert_eq!(lookup_name(" Example.TEST. "), d.name);

        let v6 = validate(&spec("[::1]", &["smtp"])).unwrap();
        assert_eq!((v6.name.as_str(), v6.kind), ("::1", TargetKind::Host));

        let mut s = spec("example.test", &["smtp"]);
        s.interval_ms = 1_000;
        s.timeout_ms = 2_000;
        s.ports.insert("smtp".into(), 2525);
        s.regions = vec!["eu-west".into(), "eu-west".into()];
        s.labels.insert("team".into(), "mail".into());
        s.require_tls = true;
        let d = validate(&s).unwrap();
        assert_eq!(
            (d.interval, d.timeout),
            (Duration::from_secs(1), Duration::from_secs(2))
        );
        assert_eq!(d.ports.get(&CheckKind::Smtp), Some(&2525));
        assert_eq!(d.regions, vec!["eu-west"]);
        assert_eq!(d.labels.get("team").map(String::as_str), Some("mail"));
        assert!(d.require_tls);
        let wire = d.to_wire("central");
        assert_eq!(wire.ports.get("smtp"), Some(&2525));
        assert_eq!(validate(&wire).unwrap(), d);
    }

    #[test]
    fn only_central_targets_are_canaries() {
        let spec = |name: &str, canary: &str| {
            let mut s = pb::TargetSpec {
                name: name.into(),
                checks: vec!["smtp".into()],
                ..Default::default()
            };
            s.labels.insert(CANARY_LABEL.into(), canary.into());
            validate(&s).unwrap()
        };
        let central = [spec("ref.test", "true"), spec("other.test", "false")];
        assert_eq!(
            canary_names(&central).into_iter().collect::<Vec<_>>(),
            vec!["ref.test"]
        );
    }
}
