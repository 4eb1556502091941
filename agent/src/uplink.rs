//! The one long-lived gRPC stream to the collector: hello, then spooled results in ascending seq
//! with a bounded window of unacked batches; acks trim the spool, schedules go to the scheduler.
//! With several collectors a session goes to one at a time; any failure moves to the next in the
//! list at once, and only a whole round of failures waits out the capped, jittered exponential
//! backoff ([`Rotation`]). Each session resends from what its collector's Welcome says is stored.
//! When results trickle in, a batch waits up to [`LINGER`] for more (a full batch goes at once), so
//! a fleet at tens of probes per second sends a few batches and gets a few acks per second, not one
//! per result.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use mxscope_proto::pb;
use mxscope_proto::time::now_us;
use pb::agent_message::Msg as Up;
use pb::collector_message::Msg as Down;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

use crate::config::Target;
use crate::spool::{SpoolError, SpoolHandle};

/// Results per batch.
pub const BATCH_RECORDS: usize = 500;
/// Unacked batches in flight.
pub const WINDOW: usize = 16;
/// How long a partial batch waits for more results before it is sent.
pub const LINGER: Duration = Duration::from_millis(100);
/// Heartbeat period.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A session that lasted this long after its Welcome resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UplinkError {
    #[error("cannot connect to the collector")]
    Connect(#[from] tonic::transport::Error),
    #[error("rpc: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("stream closed by the collector")]
    Closed,
    #[error("no welcome within {0:?}")]
    NoWelcome(Duration),
    #[error("protocol: {0}")]
    Protocol(&'static str),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The certificate was renewed and every batch sent with the old one is acked: the next
    /// session uses the new one, at once.
    #[error("certificate renewed")]
    Renewed,
}

/// How long after a refused or failed renewal the agent asks again.
const RENEW_RETRY: Duration = Duration::from_secs(30);

/// Who this agent is, as told in Hello, and where it sends.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The collectors, in failover order (at least one).
    pub collectors: Vec<String>,
    pub agent_id: String,
    pub region: String,
    pub labels: BTreeMap<String, String>,
    /// The local targets, sent as `source = "local"` specs (built per Hello, not kept).
    pub local_targets: Arc<[Target]>,
    /// mTLS to an `https://` collector.
    pub tls: Option<crate::trust::CollectorTls>,
}

pub use crate::error::chain;

/// Capped exponential backoff with jitter: 0.5 s doubling to 30 s, each wait drawn from [d/2, d].
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    base: Duration,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            next: base,
            base,
            cap,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        d.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    pub fn reset(&mut self) {
        self.next = self.base;
    }
}

/// Which collector the next session goes to and how long to wait before it: round robin over the
/// list; after a failure the next collector is tried at once, and the [`Backoff`] is waited out
/// only when every collector failed in a row (one full round). A healthy session resets both.
#[derive(Debug, Clone)]
pub struct Rotation {
    collectors: usize,
    current: usize,
    /// Sessions that failed in a row in this round.
    failed: usize,
    backoff: Backoff,
}

impl Rotation {
    /// A rotation over `collectors` collectors (at least one), starting at the first.
    pub fn new(collectors: usize, backoff: Backoff) -> Self {
        Rotation {
            collectors: collectors.max(1),
            current: 0,
            failed: 0,
            backoff,
        }
    }

    /// The index of the collector the next session goes to.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The session with the current collector failed or ended; `healthy` when it had lasted
    /// [`HEALTHY_AFTER`] after its Welcome. Moves to the next collector and returns how long to
    /// wait before connecting to it: nothing within a round, the backoff after a whole one.
    pub fn failed(&mut self, healthy: bool) -> Duration {
        if healthy {
            self.backoff.reset();
            self.failed = 0;
        }
        self.current = (self.current + 1) % self.collectors;
        self.failed += 1;
        if self.failed < self.collectors {
            return Duration::ZERO;
        }
        self.failed = 0;
        self.backoff.next_delay()
    }

    /// The session ended for a renewed certificate: the same collector again, at once.
    pub fn renewed(&mut self) {
        self.backoff.reset();
        self.failed = 0;
    }
}

/// The uplink task.
pub struct Uplink {
    pub identity: Identity,
    /// An enrolled agent's certificate renewal (its mTLS settings are then taken from here).
    pub renewal: Option<Arc<crate::enrol::Renewal>>,
    pub spool: SpoolHandle,
    /// Latest central schedule, for the scheduler.
    pub schedule: watch::Sender<Option<pb::Schedule>>,
    /// After `stop`, how long to keep trying to get the rest acked.
    pub drain: Duration,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink").finish_non_exhaustive()
    }
}

impl Uplink {
    /// Streams the spool until `stop`; then keeps going until everything is acked or `drain` passes.
    pub async fn run(self, stop: CancellationToken) {
        let deadline = CancellationToken::new();
        let _deadline_guard = deadline.clone().drop_guard();
        {
            let (stop, deadline, drain) = (stop.clone(), deadline.clone(), self.drain);
            tokio::spawn(async move {
                tokio::select! {
                    _ = deadline.cancelled() => {}
                    _ = async { stop.cancelled().await; tokio::time::sleep(drain).await } => deadline.cancel(),
                }
            });
        }
        let collectors = &self.identity.collectors;
        let mut rotation = Rotation::new(collectors.len(), Backoff::default());
        loop {
            if stop.is_cancelled() && self.spool.depth() == 0 {
                return;
            }
            let collector = collectors[rotation.current()].as_str();
            let mut welcomed_at = None;
            let result = tokio::select! {
                r = self.session(collector, &stop, &mut welcomed_at) => r,
                _ = deadline.cancelled() => Err(UplinkError::Protocol("shutdown deadline")),
            };
            match result {
                Ok(()) => return,
                Err(UplinkError::Renewed) => {
                    info!(collector = %collector, "reconnecting with the renewed certificate");
                    rotation.renewed();
                    continue;
                }
                Err(e) if deadline.is_cancelled() => {
                    warn!(collector = %collector, error = %chain(&e), unsent = self.spool.depth(),
                        "shutdown deadline reached with results not acked, they stay in the spool");
                    return;
                }
                // Only a failed connection is "unreachable": a collector that answers and refuses
                // (full disk, limits, identity) must not be reported as a network problem.
                Err(e @ UplinkError::Connect(_)) => {
                    warn!(collector = %collector, error = %chain(&e), "collector unreachable, retrying")
                }
                Err(e) => {
                    warn!(collector = %collector, error = %chain(&e), "collector session failed, retrying")
                }
            }
            let healthy = welcomed_at.is_some_and(|at: Instant| at.elapsed() >= HEALTHY_AFTER);
            let delay = rotation.failed(healthy);
            debug!(collector = %collectors[rotation.current()], delay = ?delay, "reconnecting");
            if delay.is_zero() {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = deadline.cancelled() => {
                    warn!(unsent = self.spool.depth(), "shutdown deadline reached with results not acked, they stay in the spool");
                    return;
                }
                // On shutdown, try once more right away instead of waiting out the backoff.
                _ = stop.cancelled(), if !stop.is_cancelled() => {}
            }
        }
    }

    /// Keeps a renewed certificate; `true` when the session should now drain and reconnect.
    fn renewed(&self, renewal: &crate::enrol::Renewal, key: &str, r: pb::Renewed) -> bool {
        if !r.error.is_empty() || r.cert_pem.is_empty() {
            warn!(error = %r.error, retry_in_s = RENEW_RETRY.as_secs(), "the collector did not renew the certificate");
            renewal.retry_in(RENEW_RETRY);
            return false;
        }
        match renewal.install(key, &r.cert_pem) {
            Ok(next) => {
                info!(cert.serial = %r.serial, next_renewal = %humantime::format_rfc3339_seconds(next),
                    "certificate renewed; reconnecting with it once the batches in flight are acked");
                true
            }
            Err(e) => {
                warn!(error = %e, retry_in_s = RENEW_RETRY.as_secs(), "cannot keep the renewed certificate");
                renewal.retry_in(RENEW_RETRY);
                false
            }
        }
    }

    fn hello(&self) -> pb::AgentMessage {
        pb::AgentMessage {
            msg: Some(Up::Hello(pb::Hello {
                agent_id: self.identity.agent_id.clone(),
                region: self.identity.region.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                highest_seq: self.spool.highest_seq(),
                labels: self.identity.labels.clone().into_iter().collect(),
                dropped_total: self.spool.dropped_total(),
                local_targets: self
                    .identity
                    .local_targets
                    .iter()
                    .map(Target::to_local_spec)
                    .collect(),
            })),
        }
    }

    /// One session with `collector`; `Ok` only when stopped and everything is acked.
    async fn session(
        &self,
        collector: &str,
        stop: &CancellationToken,
        welcomed_at: &mut Option<Instant>,
    ) -> Result<(), UplinkError> {
        let mut endpoint = Endpoint::from_shared(collector.to_string())?;
        let tls = match &self.renewal {
            Some(r) => Some(r.current_tls()),
            None => self.identity.tls.clone(),
        };
        if let Some(tls) = &tls {
            endpoint = endpoint.tls_config(tls.client_config())?;
        }
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect()
            .await?;
        let mut client = pb::ingest_client::IngestClient::new(channel);
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(WINDOW + 4);
        tx.send(self.hello())
            .await
            .map_err(|_| UplinkError::Closed)?;
        let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();

        let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.next())
            .await
            .map_err(|_| UplinkError::NoWelcome(WELCOME_TIMEOUT))?;
        let stored = match first {
            Some(Ok(pb::CollectorMessage {
                msg: Some(Down::Welcome(w)),
            })) => w.stored_up_to_seq,
            Some(Ok(_)) => return Err(UplinkError::Protocol("first message was not a welcome")),
            Some(Err(status)) => return Err(status.into()),
            None => return Err(UplinkError::Closed),
        };
        *welcomed_at = Some(Instant::now());
        // What this collector has stored counts as acked: one sharing the database of the last
        // one may hold more than that one acked (committed, ack lost), and it is not sent again.
        // Sending goes on from the higher of that and our own ack, so a collector with a database
        // of its own (stored below our ack) gets everything still in the spool; what another
        // collector acked is no longer there to resend.
        self.spool.ensure_seq_above(stored).await?;
        self.spool.ack(stored).await?;
        info!(collector = %collector, stored_up_to_seq = stored,
            unsent = self.spool.depth(), "connected to collector");

        let mut sent = self.spool.acked_seq();
        let mut in_flight: VecDeque<u64> = VecDeque::new();
        let mut committed = self.spool.committed();
        let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
        // When the oldest unsent result may go in a partial batch; the backlog found at connect
        // goes at once.
        let mut send_after: Option<Instant> = Some(Instant::now());
        // The key of a renewal asked for and not yet answered; set `draining` once the new
        // certificate is kept: nothing more is sent, and the session ends when all is acked.
        let mut renewing: Option<String> = None;
        let mut draining = false;
        loop {
            if draining && in_flight.is_empty() {
                return Err(UplinkError::Renewed);
            }
            let renew_due = self
                .renewal
                .as_ref()
                .filter(|_| renewing.is_none() && !draining)
                .map(|r| {
                    let wait = r
                        .due()
                        .duration_since(std::time::SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    Instant::now() + wait
                });
            if stop.is_cancelled() && self.spool.depth() == 0 {
                info!(collector = %collector, "all results acked");
                return Ok(());
            }
            let highest = self.spool.highest_seq();
            if highest <= sent {
                send_after = None;
            } else if send_after.is_none() {
                send_after = Some(Instant::now() + LINGER);
            }
            let lingering = highest - sent.min(highest) < BATCH_RECORDS as u64
                && !stop.is_cancelled()
                && send_after.is_some_and(|at| Instant::now() < at);
            let can_send = in_flight.len() < WINDOW && highest > sent && !lingering && !draining;
            let linger_until = send_after.filter(|_| lingering && in_flight.len() < WINDOW);
            tokio::select! {
                biased;
                msg = inbound.next() => match msg {
                    Some(Ok(pb::CollectorMessage { msg: Some(Down::Ack(ack)) })) => {
                        let n = ack.stored_up_to_seq;
                        self.spool.ack(n).await?;
                        in_flight.retain(|last| *last > n);
                        sent = sent.max(n);
                    }
                    Some(Ok(pb::CollectorMessage { msg: Some(Down::Schedule(s)) })) => {
                        info!(collector = %collector, version = s.version, targets = s.targets.len(), "central schedule received");
                        self.schedule.send_replace(Some(s));
                    }
                    Some(Ok(pb::CollectorMessage { msg: Some(Down::Welcome(_)) })) => {
                        return Err(UplinkError::Protocol("second welcome"));
                    }
                    Some(Ok(pb::CollectorMessage { msg: Some(Down::Renewed(r)) })) => {
                        if let (Some(renewal), Some(key)) = (&self.renewal, renewing.take()) {
                            draining = self.renewed(renewal, &key, r);
                        }
                    }
                    Some(Ok(pb::CollectorMessage { msg: None })) => {}
                    Some(Err(status)) => return Err(status.into()),
                    None => return Err(UplinkError::Closed),
                },
                _ = std::future::ready(()), if can_send => {
                    let highest = self.spool.highest_seq();
                    let results = self.spool.read_from(sent, BATCH_RECORDS).await?;
                    match results.last().map(|r| r.seq) {
                        None => sent = sent.max(highest),
                        Some(last) => {
                            let batch = pb::AgentMessage { msg: Some(Up::Batch(pb::ResultBatch { results })) };
                            tx.send(batch).await.map_err(|_| UplinkError::Closed)?;
                            in_flight.push_back(last);
                            sent = last;
                        }
                    }
                    // What is left (more than a batch, or appended meanwhile) lingers anew.
                    send_after = None;
                }
                _ = tokio::time::sleep_until(linger_until.unwrap_or_else(Instant::now)), if linger_until.is_some() => {}
                _ = tokio::time::sleep_until(renew_due.unwrap_or_else(Instant::now)), if renew_due.is_some() => {
                    match mxscope_pki::new_csr() {
                        Ok((csr_pem, key)) => {
                            info!(collector = %collector, "asking the collector to renew this agent's certificate");
                            tx.send(pb::AgentMessage { msg: Some(Up::Renew(pb::RenewRequest { csr_pem })) })
                                .await
                                .map_err(|_| UplinkError::Closed)?;
                            renewing = Some(key);
                        }
                        Err(e) => {
                            warn!(error = %e, "cannot make a key for the renewal, trying again later");
                            if let Some(r) = &self.renewal {
                                r.retry_in(RENEW_RETRY);
                            }
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    let hb = pb::Heartbeat {
                        spool_depth: self.spool.depth(),
                        dropped_total: self.spool.dropped_total(),
                        sent_at_us: now_us(),
                    };
                    tx.send(pb::AgentMessage { msg: Some(Up::Heartbeat(hb)) }).await.map_err(|_| UplinkError::Closed)?;
                }
                changed = committed.changed() => {
                    if changed.is_err() {
                        return Err(UplinkError::Spool(SpoolError::Closed));
                    }
                }
                _ = stop.cancelled(), if !stop.is_cancelled() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::default();
        let mut caps = Vec::new();
        for _ in 0..10 {
            caps.push(b.next);
            let d = b.next_delay();
            let cap = *caps.last().unwrap();
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} within [{:?}, {cap:?}]",
                cap / 2
            );
        }
        assert_eq!(caps[0], Duration::from_millis(500));
        assert_eq!(caps[1], Duration::from_secs(1));
        assert_eq!(caps[7], Duration::from_secs(30), "capped");
        assert_eq!(caps[9], Duration::from_secs(30));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(500));
    }

    /// For each session outcome in turn: the collector tried next and the wait before it.
    fn waits(r: &mut Rotation, outcomes: &[bool]) -> Vec<(usize, Duration)> {
        outcomes
            .iter()
            .map(|&healthy| {
                let d = r.failed(healthy);
                (r.current(), d)
            })
            .collect()
    }

    #[test]
    fn rotation_tries_every_collector_at_once_then_backs_off_per_round() {
        let mut r = Rotation::new(3, Backoff::default());
        assert_eq!(r.current(), 0);
        let got = waits(&mut r, &[false; 9]);
        let order: Vec<usize> = got.iter().map(|(c, _)| *c).collect();
        assert_eq!(order, [1, 2, 0, 1, 2, 0, 1, 2, 0], "round robin");
        for (i, (_, d)) in got.iter().enumerate() {
            let round_end = i % 3 == 2;
            assert_eq!(d.is_zero(), !round_end, "attempt {i}: {d:?}");
        }
        // The backoff grows per round: 0.5 s, 1 s, 2 s caps.
        let ends: Vec<Duration> = got
            .iter()
            .map(|(_, d)| *d)
            .filter(|d| !d.is_zero())
            .collect();
        assert_eq!(ends.len(), 3);
        assert!(ends[0] <= Duration::from_millis(500), "{ends:?}");
        assert!(
            ends[1] >= Duration::from_millis(500) && ends[1] <= Duration::from_secs(1),
            "{ends:?}"
        );
        assert!(
            ends[2] >= Duration::from_secs(1) && ends[2] <= Duration::from_secs(2),
            "{ends:?}"
        );
    }

    #[test]
    fn rotation_after_a_healthy_session_goes_to_the_next_at_once_and_resets_the_backoff() {
        let mut r = Rotation::new(2, Backoff::default());
        // Two full rounds of failures: the backoff is at 2 s now.
        waits(&mut r, &[false; 4]);
        assert_eq!(r.current(), 0);
        // A healthy session on collector 0 ends (it was SIGKILLed): collector 1 at once.
        assert_eq!(r.failed(true), Duration::ZERO);
        assert_eq!(r.current(), 1);
        // Collector 1 is down too: the round is over, and the wait starts from the base again.
        let d = r.failed(false);
        assert!(!d.is_zero() && d <= Duration::from_millis(500), "{d:?}");
        assert_eq!(r.current(), 0);
    }

    #[test]
    fn rotation_failing_within_a_round_after_a_healthy_session_counts_the_round_anew() {
        let mut r = Rotation::new(3, Backoff::default());
        assert_eq!(r.failed(false), Duration::ZERO); // 0 failed
        assert_eq!(r.failed(true), Duration::ZERO); // 1 was healthy, then ended
        assert_eq!(r.current(), 2);
        // The round starts with the healthy one's end: 2 and 0 fail at once, then a wait for 1.
        assert_eq!(r.failed(false), Duration::ZERO);
        assert!(!r.failed(false).is_zero());
        assert_eq!(r.current(), 1);
    }

    #[test]
    fn rotation_over_one_collector_is_the_plain_backoff() {
        let mut r = Rotation::new(1, Backoff::default());
        let caps = [500, 1000, 2000, 4000];
        for cap in caps {
            let d = r.failed(false);
            assert_eq!(r.current(), 0);
            assert!(
                !d.is_zero() && d <= Duration::from_millis(cap),
                "{d:?} <= {cap} ms"
            );
            assert!(
                d >= Duration::from_millis(cap / 2),
                "{d:?} >= {} ms",
                cap / 2
            );
        }
        let d = r.failed(true);
        assert!(
            d <= Duration::from_millis(500),
            "reset after a healthy session: {d:?}"
        );
        r.renewed();
        assert_eq!(r.current(), 0, "a renewal reconnects to the same collector");
        assert!(r.failed(false) <= Duration::from_millis(500));
    }
}
