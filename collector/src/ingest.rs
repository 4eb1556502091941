//! The `Ingest` service: one bidirectional `Session` per agent. Validates the hello, answers with
//! `Welcome` and schedule snapshots, hands result batches to the store writer and acks each batch
//! only after its transaction committed, in order, without waiting before reading the next batch.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::stream::FuturesOrdered;
use futures::{Future, StreamExt};
use mxscope_proto::pb::collector_message::Msg as Down;
use mxscope_proto::pb::raw::agent_message::Msg as Up;
use mxscope_proto::pb::{self, raw::ingest_server::Ingest};
use mxscope_proto::raw::ResultView;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::{revoked_status, Mode, Revoked};
use crate::error::{chain, ServiceError};
use crate::limits::{Counters, RejectReason, Rejected, SeriesQuota};
use crate::shared::{LiveSession, Shared};
use crate::store::{AgentHello, StoreError};
use mxscope_pki::{Identity, Peer};
use mxscope_proto::names::is_label;
use mxscope_proto::target::{self, Target};
use mxscope_proto::time::now_us;
use mxscope_proto::CheckKind;

/// Most agent-local targets kept from one hello.
const MAX_LOCAL_TARGETS: usize = 10_000;
/// Most labels in one hello, and the longest label key or value and version string.
const MAX_LABELS: usize = 64;
const MAX_LABEL_LEN: usize = 256;

/// gRPC `Ingest` implementation.
pub struct IngestService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for IngestService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestService").finish_non_exhaustive()
    }
}

impl IngestService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        IngestService { shared }
    }
}

type Out = mpsc::Sender<Result<pb::CollectorMessage, Status>>;

/// Checks the hello: id and region are DNS-label style.
pub fn validate_hello(h: &pb::Hello) -> Result<(), ServiceError> {
    if !is_label(&h.agent_id) {
        return Err(ServiceError::InvalidArgument(format!(
            "agent id '{}' is invalid: use 1-63 lowercase letters, digits and '-'",
            h.agent_id
        )));
    }
    if !is_label(&h.region) {
        return Err(ServiceError::InvalidArgument(format!(
            "region '{}' is invalid: use 1-63 lowercase letters, digits and '-'",
            h.region
        )));
    }
    if h.labels.len() > MAX_LABELS
        || h.version.len() > MAX_LABEL_LEN
        || h.labels
            .iter()
            .any(|(k, v)| k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN)
    {
        return Err(ServiceError::ResourceExhausted(format!(
            "hello labels or version above the limits ({MAX_LABELS} labels of at most \
             {MAX_LABEL_LEN} bytes)"
        )));
    }
    if h.local_targets.len() > MAX_LOCAL_TARGETS {
        return Err(ServiceError::ResourceExhausted(format!(
            "hello lists {} local targets, more than the limit of {MAX_LOCAL_TARGETS}",
            h.local_targets.len()
        )));
    }
    Ok(())
}

/// An agent's local targets through proto's validator. The agent validated them itself, but it may
/// be newer than this collector: as an agent does with its collector's targets
/// ([`Source::Collector`](target::Source::Collector)), checks this build does not know are left
/// out, and so is a target this build refuses; both are logged.
fn local_targets(agent_id: &str, specs: &[pb::TargetSpec]) -> Vec<Target> {
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        match target::validate_from(spec, target::Source::Collector) {
            Ok((t, unknown)) => {
                for u in unknown {
                    warn!(agent.id = %agent_id, target.name = %t.name, check = %u.given,
                        "local target names a check this collector does not know; left out");
                }
                out.push(t);
            }
            Err(err) => {
                warn!(agent.id = %agent_id, target.name = %spec.name, error = %err,
                    "local target left out: this collector refuses it");
            }
        }
    }
    out
}

/// What one agent may send results for: the central targets of its region and the local
/// targets its hello announced, each with its checks. Everything else is refused, so the series
/// an agent can open are bounded by what the operator configured.
#[derive(Debug, Default)]
struct Assigned {
    central: HashMap<String, Vec<CheckKind>>,
    local: HashMap<String, Vec<CheckKind>>,
}

impl Assigned {
    fn checks(targets: &[Target]) -> HashMap<String, Vec<CheckKind>> {
        targets
            .iter()
            .map(|t| (t.name.clone(), t.checks.clone()))
            .collect()
    }

    fn check(&self, r: &ResultView<'_>, region: &str) -> Result<(), Rejected> {
        // The check's name was parsed already (`Limits::check_result`); compared by name here.
        let assigned = [&self.central, &self.local].iter().any(|m| {
            m.get(r.target)
                .is_some_and(|checks| checks.iter().any(|k| k.name() == r.check))
        });
        if assigned {
            return Ok(());
        }
        Err(Rejected {
            reason: RejectReason::Unassigned,
            detail: format!(
                "target '{}' check '{}' is not assigned to this agent: neither a central target \
                 of region '{region}' nor a local target of its hello",
                r.target.escape_debug(),
                r.check.escape_debug()
            ),
        })
    }
}

/// Refuses a batch of more than `max` results.
fn check_batch_size(n: usize, max: usize) -> Result<(), ServiceError> {
    if n > max {
        return Err(ServiceError::ResourceExhausted(format!(
            "batch of {n} results is above the limit of {max}; send smaller batches"
        )));
    }
    Ok(())
}

/// Reads each result of a batch in place; names the first that is not a valid `ProbeResult`.
pub fn read_batch(raw: &[bytes::Bytes]) -> Result<Vec<ResultView<'_>>, ServiceError> {
    raw.iter()
        .enumerate()
        .map(|(i, b)| {
            ResultView::parse(b).map_err(|e| {
                ServiceError::InvalidArgument(format!(
                    "result {} of the batch is not a valid ProbeResult: {e}",
                    i + 1
                ))
            })
        })
        .collect()
}

/// Checks a batch against the stream's agent: size limit, agent id, seq >= 1 and strictly ascending.
pub fn validate_batch(
    results: &[ResultView<'_>],
    agent_id: &str,
    max: usize,
) -> Result<(), ServiceError> {
    check_batch_size(results.len(), max)?;
    let mut prev = 0u64;
    for r in results {
        if r.agent_id != agent_id {
            return Err(ServiceError::InvalidArgument(format!(
                "result seq {} names agent '{}', but this stream belongs to agent '{agent_id}'",
                r.seq, r.agent_id
            )));
        }
        if r.seq == 0 || i64::try_from(r.seq).is_err() {
            return Err(ServiceError::InvalidArgument(format!(
                "result seq {} is out of range (1 to 2^63-1)",
                r.seq
            )));
        }
        if r.seq <= prev {
            return Err(ServiceError::InvalidArgument(format!(
                "result seq {} follows seq {prev}: results in a batch must be in ascending seq order",
                r.seq
            )));
        }
        prev = r.seq;
    }
    Ok(())
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type SessionStream = ReceiverStream<Result<pb::CollectorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::raw::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let cert = request.extensions().get::<Identity>().cloned();
        let peer = request.extensions().get::<Peer>().cloned();
        let mut inbound = request.into_inner();
        let shared = &self.shared;
        let first = match tokio::time::timeout(shared.config.hello_timeout, inbound.message()).await
        {
            Err(_) => {
                return Err(Status::from(ServiceError::DeadlineExceeded(
                    "no hello within the hello timeout".into(),
                )));
            }
            Ok(res) => res.map_err(|s| count_stream_error(&shared.counters, "-", s))?,
        };
        let Some(pb::raw::AgentMessage {
            msg: Some(Up::Hello(hello)),
        }) = first
        else {
            return Err(ServiceError::InvalidArgument(
                "the first message on a session must be a hello".into(),
            )
            .into());
        };
        validate_hello(&hello)?;
        check_identity(shared.mode, cert.as_ref(), &hello, &shared.counters)?;
        if shared.revoked.borrow().revokes_agent(&hello.agent_id) {
            Counters::bump(&shared.counters.revoked_refused);
            warn!(agent.id = %hello.agent_id, "revoked agent refused");
            return Err(Status::from(ServiceError::PermissionDenied(format!(
                "agent '{}' is revoked; enrol it again with a new id",
                hello.agent_id
            ))));
        }
        let local = local_targets(&hello.agent_id, &hello.local_targets);
        let assigned = Assigned {
            central: HashMap::new(),
            local: Assigned::checks(&local),
        };
        let stored = shared
            .store
            .register_agent(AgentHello {
                id: hello.agent_id.clone(),
                region: hello.region.clone(),
                version: hello.version.clone(),
                labels: hello.labels.clone().into_iter().collect::<BTreeMap<_, _>>(),
                dropped_total: hello.dropped_total,
                local_targets: local,
                at_us: now_us(),
                collector: shared.config.name.clone(),
                cert_not_after_us: peer.as_ref().map(|p| p.not_after_us),
            })
            .await
            .map_err(|err| {
                warn!(agent.id = %hello.agent_id, error = %chain(&err), "registering the agent failed");
                ServiceError::from(err)
            })?;
        if hello.highest_seq < stored {
            warn!(agent.id = %hello.agent_id, highest_seq = hello.highest_seq, stored_up_to_seq = stored,
                "agent reports a highest seq below what is stored; results up to the stored seq will be skipped");
        }
        info!(agent.id = %hello.agent_id, region = %hello.region, version = %hello.version,
            stored_up_to_seq = stored, "agent connected");

        let (out, rx) = mpsc::channel(64);
        let welcome = Down::Welcome(pb::Welcome {
            stored_up_to_seq: stored,
        });
        out.send(Ok(pb::CollectorMessage { msg: Some(welcome) }))
            .await
            .map_err(|_| Status::from(ServiceError::Cancelled("agent went away".into())))?;

        let session = Session {
            connection: Connection::open(shared.clone(), &hello.agent_id),
            series: shared.series_quota(&hello.agent_id),
            assigned,
            shared: shared.clone(),
            agent_id: hello.agent_id,
            region: hello.region,
            schedule: shared.schedule.subscribe(),
            revoked: shared.revoked.clone(),
            peer,
            out,
        };
        shared.tasks.spawn(session.run(inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// With certificates, the hello must name the certificate's agent id and region: results are
/// attributed to the certificate, an agent claiming another identity is refused and logged.
fn check_identity(
    mode: Mode,
    cert: Option<&Identity>,
    hello: &pb::Hello,
    counters: &Counters,
) -> Result<(), Status> {
    if mode == Mode::Open {
        return Ok(());
    }
    let Some(Identity::Agent { id, region }) = cert else {
        return Err(Status::from(ServiceError::Unauthenticated(
            "an agent certificate is required (mxscopectl enroll)".into(),
        )));
    };
    if *id != hello.agent_id || *region != hello.region {
        Counters::bump(&counters.identity_mismatch);
        warn!(cert.id = %id, cert.region = %region, hello.id = %hello.agent_id,
            hello.region = %hello.region, "agent claims another identity");
        return Err(Status::from(ServiceError::PermissionDenied(format!(
            "the certificate is for agent '{id}' in region '{region}', but the hello claims \
             agent '{}' in region '{}'",
            hello.agent_id, hello.region
        ))));
    }
    Ok(())
}

/// Counts a failed read of the agent's stream (oversize or undecodable message) and returns the
/// status to answer with.
fn count_stream_error(counters: &Counters, agent: &str, status: Status) -> Status {
    match status.code() {
        // tonic: "decoded message length too large".
        Code::OutOfRange | Code::ResourceExhausted => {
            let n = Counters::bump(&counters.oversize_messages);
            warn!(agent.id = %agent, error = %status.message(), oversize_total = n, "oversize message refused");
            Status::from(ServiceError::ResourceExhausted(format!(
                "message refused: {} (send smaller batches)",
                status.message()
            )))
        }
        // tonic: "failed to decode Protobuf message".
        Code::Internal => {
            let n = Counters::bump(&counters.malformed_messages);
            warn!(agent.id = %agent, error = %status.message(), malformed_total = n, "malformed message refused");
            Status::from(ServiceError::InvalidArgument(format!(
                "malformed message: {}",
                status.message()
            )))
        }
        _ => status,
    }
}

/// An agent's one session while alive: opening it ends the agent's older session, if any (two
/// live sessions of one id would interleave seqs and lose results below the high-water mark).
struct Connection {
    shared: Arc<Shared>,
    id: String,
    generation: u64,
    /// Cancelled when a newer session of the same agent opens.
    replaced: CancellationToken,
}

impl Connection {
    fn open(shared: Arc<Shared>, id: &str) -> Connection {
        static GENERATION: AtomicU64 = AtomicU64::new(1);
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let replaced = CancellationToken::new();
        if let Ok(mut m) = shared.connected.lock() {
            let live = LiveSession {
                generation,
                replaced: replaced.clone(),
            };
            if let Some(old) = m.insert(id.to_string(), live) {
                old.replaced.cancel();
                let n = Counters::bump(&shared.counters.sessions_replaced);
                warn!(agent.id = %id, sessions_replaced_total = n,
                    "a newer session of this agent replaces its open one (two agents with one id?)");
            }
        }
        Connection {
            shared,
            id: id.to_string(),
            generation,
            replaced,
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Ok(mut m) = self.shared.connected.lock() {
            if m.get(&self.id)
                .is_some_and(|l| l.generation == self.generation)
            {
                m.remove(&self.id);
            }
        }
    }
}

type Commit = Pin<Box<dyn Future<Output = Result<u64, StoreError>> + Send>>;
type Slot =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + Send>>;
type Beat = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// What one agent message asks of the session.
enum Handled {
    Nothing,
    /// A batch: the future of its commit, its number of results and their bytes.
    Batch(Commit, usize, usize),
    /// A heartbeat's spool depth and dropped total.
    Heartbeat(u64, u64),
    /// A certificate renewal's CSR.
    Renew(String),
}

/// Shortest time between two renewals of one session (an agent renews at two thirds of its
/// certificate's life, so this only stops a loop).
const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

struct Session {
    connection: Connection,
    /// What this agent may send results for (central part refreshed with each schedule).
    assigned: Assigned,
    /// The series this agent feeds, shared by its sessions.
    series: Arc<Mutex<SeriesQuota>>,
    shared: Arc<Shared>,
    agent_id: String,
    region: String,
    schedule: watch::Receiver<u64>,
    revoked: watch::Receiver<Revoked>,
    /// The session's certificate (serial and fingerprint are checked against revocations too).
    peer: Option<Peer>,
    out: Out,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<pb::raw::AgentMessage>) {
        let max_in_flight = self.shared.config.max_in_flight_batches.max(1);
        let mut pending: FuturesOrdered<Commit> = FuturesOrdered::new();
        // Heartbeats coalesce: at most one is being written for this session; a newer one
        // arriving meanwhile replaces the one waiting, so a flood costs one queued write.
        let mut beat: Option<Beat> = None;
        let mut next_beat: Option<(u64, u64)> = None;
        let mut reading = true;
        let mut failure: Option<Status> = None;
        let mut schedule_open = true;
        let mut revoked_open = true;
        // Set while the agent is above its result rate: no reading until then (backpressure).
        let mut resume_at: Option<Instant> = None;
        // Each batch takes a write slot before it goes to the writer, whose queue so holds at
        // most `max_queued_batches` batches of all sessions; a batch that finds none waits here
        // and the session reads nothing more until it has one (backpressure). The slot is given
        // back when the batch committed.
        let mut waiting: Option<(pb::raw::AgentMessage, Slot)> = None;
        let mut last_renewal: Option<Instant> = None;

        if self.send_schedule().await.is_err() {
            return;
        }
        loop {
            if !reading && pending.is_empty() && beat.is_none() && waiting.is_none() {
                break;
            }
            // A message read (with its write slot, for a batch) is handled after the select.
            let mut ready: Option<(pb::raw::AgentMessage, Option<OwnedSemaphorePermit>)> = None;
            tokio::select! {
                biased;
                Some(res) = pending.next(), if !pending.is_empty() => match res {
                    Ok(seq) => {
                        if self.send(Down::Ack(pb::Ack { stored_up_to_seq: seq })).await.is_err() {
                            break;
                        }
                    }
                    Err(err) => {
                        warn!(agent.id = %self.agent_id, error = %chain(&err), "storing a batch failed");
                        failure = Some(ServiceError::from(err).into());
                        break;
                    }
                },
                res = async { beat.as_mut().expect("guarded").await }, if beat.is_some() => {
                    beat = None;
                    if let Err(err) = res {
                        warn!(agent.id = %self.agent_id, error = %chain(&err), "storing a heartbeat failed");
                    }
                    if let Some((depth, dropped)) = next_beat.take() {
                        beat = Some(self.heartbeat(depth, dropped));
                    }
                }
                () = self.connection.replaced.cancelled(), if reading => {
                    // Stop reading; what is in flight still commits and is acked.
                    failure = Some(Status::from(ServiceError::Aborted(format!(
                        "agent '{}' opened a newer session; this one is closed", self.agent_id
                    ))));
                    reading = false;
                }
                () = self.shared.shutdown.cancelled(), if reading => {
                    debug!(agent.id = %self.agent_id, in_flight = pending.len(), "draining session on shutdown");
                    reading = false;
                }
                changed = self.revoked.changed(), if revoked_open && reading => {
                    if changed.is_err() {
                        revoked_open = false;
                    } else if let Some(by) = self.revoked.borrow_and_update()
                        .revoking(Some(&self.agent_id), self.peer.as_ref().map(|p| &p.cert)) {
                        let n = Counters::bump(&self.shared.counters.revoked_closed);
                        warn!(agent.id = %self.agent_id, revoked.by = %by, revoked_closed_total = n, "agent revoked, closing its session");
                        failure = Some(revoked_status(&by, self.peer.as_ref(), true));
                        reading = false;
                    }
                }
                res = async { (&mut waiting.as_mut().expect("guarded").1).await }, if waiting.is_some() => {
                    // The semaphore is never closed.
                    if let (Some((m, _)), Ok(permit)) = (waiting.take(), res) {
                        ready = Some((m, Some(permit)));
                    }
                }
                () = tokio::time::sleep_until(resume_at.unwrap_or_else(Instant::now)), if resume_at.is_some() => {
                    resume_at = None;
                }
                changed = self.schedule.changed(), if schedule_open && reading => {
                    if changed.is_err() {
                        schedule_open = false;
                    } else if self.send_schedule().await.is_err() {
                        break;
                    }
                }
                msg = inbound.message(), if reading && waiting.is_none() && resume_at.is_none() && pending.len() < max_in_flight => match msg {
                    Ok(Some(m)) if matches!(m.msg, Some(Up::Batch(_))) => {
                        match self.shared.writes.clone().try_acquire_owned() {
                            Ok(permit) => ready = Some((m, Some(permit))),
                            Err(_) => {
                                Counters::bump(&self.shared.counters.write_slot_waits);
                                waiting = Some((m, Box::pin(self.shared.writes.clone().acquire_owned())));
                            }
                        }
                    }
                    Ok(Some(m)) => ready = Some((m, None)),
                    Ok(None) => {
                        debug!(agent.id = %self.agent_id, "agent closed its stream");
                        reading = false;
                    }
                    Err(status) => {
                        debug!(agent.id = %self.agent_id, error = %status, "agent stream failed");
                        let answer = count_stream_error(&self.shared.counters, &self.agent_id, status);
                        if answer.code() != Code::Unknown && answer.code() != Code::Cancelled {
                            failure = Some(answer);
                        }
                        reading = false;
                    }
                },
            }
            let Some((m, permit)) = ready else {
                continue;
            };
            match self.handle(m) {
                Ok(Handled::Batch(commit, results, bytes)) => {
                    pending.push_back(Box::pin(async move {
                        let stored = commit.await;
                        drop(permit);
                        stored
                    }));
                    resume_at = self.throttle(results, bytes);
                }
                Ok(Handled::Heartbeat(depth, dropped)) => {
                    if beat.is_none() {
                        beat = Some(self.heartbeat(depth, dropped));
                    } else if next_beat.replace((depth, dropped)).is_some() {
                        Counters::bump(&self.shared.counters.heartbeats_coalesced);
                    }
                }
                Ok(Handled::Renew(csr)) => {
                    let answer = match (&self.peer, last_renewal) {
                        (None, _) => pb::Renewed {
                            error: "certificates are renewed only over mTLS sessions".into(),
                            ..Default::default()
                        },
                        (Some(_), Some(at)) if at.elapsed() < RENEW_EVERY => pb::Renewed {
                            error: format!(
                                "renewals come at most every {} s",
                                RENEW_EVERY.as_secs()
                            ),
                            ..Default::default()
                        },
                        (Some(peer), _) => {
                            last_renewal = Some(Instant::now());
                            crate::enrol::renew(&self.shared.enrolment, &peer.identity, csr).await
                        }
                    };
                    if !answer.error.is_empty() {
                        warn!(agent.id = %self.agent_id, error = %answer.error, "certificate renewal refused");
                    }
                    if self.send(Down::Renewed(answer)).await.is_err() {
                        break;
                    }
                }
                Ok(Handled::Nothing) => {}
                Err(err) => {
                    warn!(agent.id = %self.agent_id, error = %err, "closing session on bad input");
                    failure = Some(err.into());
                    reading = false;
                }
            }
        }
        if let Some(status) = failure {
            let _ = self.out.send(Err(status)).await;
        }
        info!(agent.id = %self.agent_id, region = %self.region, "agent disconnected");
        drop(self.connection);
    }

    /// Takes `results` and their `bytes` from the agent's rate buckets; when it is in debt, says
    /// until when to stop reading from this session (the agent's window fills and it waits:
    /// backpressure).
    fn throttle(&self, results: usize, bytes: usize) -> Option<Instant> {
        let wait = self
            .shared
            .limiter
            .reserve(&self.agent_id, results)
            .max(self.shared.byte_limiter.reserve(&self.agent_id, bytes));
        if wait.is_zero() {
            return None;
        }
        let counters = &self.shared.counters;
        let n = Counters::bump(&counters.rate_limited);
        counters.rate_limited_ms.fetch_add(
            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        debug!(agent.id = %self.agent_id, pause_ms = wait.as_millis() as u64, rate_limited_total = n,
            "agent above its result rate, pausing reads");
        Some(Instant::now() + wait)
    }

    /// Queues one heartbeat's write.
    fn heartbeat(&self, spool_depth: u64, dropped_total: u64) -> Beat {
        self.shared
            .store
            .heartbeat(&self.agent_id, spool_depth, dropped_total, now_us())
    }

    /// Handles one message: a batch yields the future of its commit, a heartbeat its values.
    fn handle(&self, m: pb::raw::AgentMessage) -> Result<Handled, ServiceError> {
        match m.msg {
            None => Ok(Handled::Nothing),
            Some(Up::Hello(_)) => Err(ServiceError::InvalidArgument(
                "hello was already sent on this session".into(),
            )),
            Some(Up::Batch(batch)) => {
                let raw = batch.results;
                let max = self.shared.config.max_batch_results;
                let views = check_batch_size(raw.len(), max)
                    .and_then(|()| read_batch(&raw))
                    .and_then(|views| validate_batch(&views, &self.agent_id, max).map(|()| views));
                let views = match views {
                    Ok(views) => views,
                    Err(err) => {
                        if matches!(err, ServiceError::ResourceExhausted(_)) {
                            let n = Counters::bump(&self.shared.counters.oversize_batches);
                            warn!(agent.id = %self.agent_id, results = raw.len(),
                                oversize_batches_total = n, "oversize batch refused");
                        }
                        return Err(err);
                    }
                };
                let n = views.len();
                let bytes: usize = raw.iter().map(bytes::Bytes::len).sum();
                debug!(agent.id = %self.agent_id, results = n, bytes, "batch received");
                let now = now_us();
                let limits = &self.shared.config.limits;
                let mut rejected = Vec::new();
                // Per reason: how many, and the first one (seq and why).
                let mut why: Vec<(usize, u64, Rejected)> = Vec::new();
                {
                    let mut series = self
                        .series
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    for r in &views {
                        let verdict = limits
                            .check_result(r, now)
                            .and_then(|()| self.assigned.check(r, &self.region))
                            .and_then(|()| series.admit(r, now, limits.max_series_per_agent));
                        if let Err(refused) = verdict {
                            self.shared.counters.reject(refused.reason);
                            rejected.push(r.seq);
                            match why.iter_mut().find(|(_, _, w)| w.reason == refused.reason) {
                                Some((count, _, _)) => *count += 1,
                                None => why.push((1, r.seq, refused)),
                            }
                        }
                    }
                }
                // One line per reason and batch, however many of its results were refused.
                for (count, seq, w) in why {
                    warn!(agent.id = %self.agent_id, rejected = count, results = n,
                        first_seq = seq, reason = %w.reason, detail = %w.detail,
                        "results rejected");
                }
                let (views, kept): (Vec<_>, Vec<_>) = if rejected.is_empty() {
                    (views, raw.clone())
                } else {
                    views
                        .into_iter()
                        .zip(raw.iter().cloned())
                        // Both in ascending seq order (checked above).
                        .filter(|(v, _)| rejected.binary_search(&v.seq).is_err())
                        .unzip()
                };
                let commit = self.shared.store.put_batch(
                    &self.agent_id,
                    &self.region,
                    &views,
                    kept,
                    rejected,
                    now,
                );
                Ok(Handled::Batch(commit, n, bytes))
            }
            Some(Up::Heartbeat(hb)) => Ok(Handled::Heartbeat(hb.spool_depth, hb.dropped_total)),
            Some(Up::Renew(r)) => Ok(Handled::Renew(r.csr_pem)),
        }
    }

    async fn send(&self, msg: Down) -> Result<(), ()> {
        self.out
            .send(Ok(pb::CollectorMessage { msg: Some(msg) }))
            .await
            .map_err(|_| ())
    }

    /// Sends the central targets for this agent's region (a full snapshot).
    async fn send_schedule(&mut self) -> Result<(), ()> {
        let version = *self.schedule.borrow_and_update();
        let targets = match self.shared.store.central_targets().await {
            Ok(t) => t,
            Err(err) => {
                warn!(agent.id = %self.agent_id, error = %chain(&err), "loading the schedule failed");
                return Ok(());
            }
        };
        let mine: Vec<Target> = targets
            .into_iter()
            .filter(|t| t.regions.is_empty() || t.regions.contains(&self.region))
            .collect();
        self.assigned.central = Assigned::checks(&mine);
        let targets = mine.iter().map(|t| t.to_wire("central")).collect();
        debug!(agent.id = %self.agent_id, schedule.version = version, "sending schedule");
        self.send(Down::Schedule(pb::Schedule { version, targets }))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(agent: &str, seq: u64) -> pb::ProbeResult {
        pb::ProbeResult {
            agent_id: agent.into(),
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn hello_validation() {
        let mut h = pb::Hello {
            agent_id: "eu-1".into(),
            region: "eu-west".into(),
            ..Default::default()
        };
        assert!(validate_hello(&h).is_ok());
        h.agent_id = "EU_1".into();
        let msg = validate_hello(&h).unwrap_err().to_string();
        assert!(msg.contains("agent id 'EU_1' is invalid"), "{msg}");
        h.agent_id = "eu-1".into();
        h.region = String::new();
        let msg = validate_hello(&h).unwrap_err().to_string();
        assert!(msg.contains("region '' is invalid"), "{msg}");
    }

    #[test]
    fn local_targets_are_validated_and_tolerate_a_newer_agent() {
        let spec = |name: &str, checks: &[&str], kind: &str| pb::TargetSpec {
            name: name.into(),
            checks: checks.iter().map(|c| c.to_string()).collect(),
            kind: kind.into(),
            ..Default::default()
        };
        let got = local_targets(
            "eu-1",
            &[
                spec("Local.TEST.", &["imap"], ""),
                // A check a newer agent knows: left out, its target kept.
                spec("newer.test", &["smtp", "carrier-pigeon"], ""),
                // Refused by this build (a kind it does not know, no check it knows): left out.
                spec("odd.test", &["smtp"], "satellite"),
                spec("unknown-only.test", &["carrier-pigeon"], ""),
            ],
        );
        assert!(!got.is_empty());
        let names: Vec<&str> = got.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, vec!["local.test", "newer.test"]);
        assert_eq!(got[0].checks, vec![mxscope_proto::CheckKind::Imap]);
        assert_eq!(got[0].interval, target::DEFAULT_INTERVAL);
        assert_eq!(got[1].checks, vec![mxscope_proto::CheckKind::Smtp]);
    }

    /// `results` as the collector reads them off the wire, checked.
    fn validate(results: &[pb::ProbeResult], agent: &str, max: usize) -> Result<(), ServiceError> {
        let raw: Vec<bytes::Bytes> = results
            .iter()
            .map(|r| prost::Message::encode_to_vec(r).into())
            .collect();
        let views = read_batch(&raw)?;
        validate_batch(&views, agent, max)
    }

    #[test]
    fn batch_validation() {
        assert!(validate(&[result("a", 1), result("a", 5)], "a", 10).is_ok());
        assert!(validate(&[result("b", 1)], "a", 10)
            .unwrap_err()
            .to_string()
            .contains("names agent 'b'"));
        assert!(validate(&[result("a", 2), result("a", 2)], "a", 10)
            .unwrap_err()
            .to_string()
            .contains("ascending"));
        assert!(validate(&[result("a", 0)], "a", 10).is_err());
        let big: Vec<_> = (1..=11).map(|s| result("a", s)).collect();
        assert!(matches!(
            validate(&big, "a", 10),
            Err(ServiceError::ResourceExhausted(_))
        ));
        // A result that is not a ProbeResult is named.
        let garbage = [bytes::Bytes::from_static(&[0xff, 0xff])];
        assert!(read_batch(&garbage)
            .unwrap_err()
            .to_string()
            .contains("result 1 of the batch is not a valid ProbeResult"));
    }
}
