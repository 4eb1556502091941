//! The one long-lived gRPC stream to the collector: hello, then spooled results in ascending seq
//! with a bounded window of unacked batches; acks trim the spool, schedules go to the scheduler.
//! Any failure reconnects with capped, jittered exponential backoff and resends from the last ack.
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

/// Who this agent is, as told in Hello.
#[derive(Debug, Clone)]
pub struct Identity {
    pub collector: String,
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
        let mut backoff = Backoff::default();
        loop {
            if stop.is_cancelled() && self.spool.depth() == 0 {
                return;
            }
            let mut welcomed_at = None;
            let result = tokio::select! {
                r = self.session(&stop, &mut welcomed_at) => r,
                _ = deadline.cancelled() => Err(UplinkError::Protocol("shutdown deadline")),
            };
            match result {
                Ok(()) => return,
                Err(UplinkError::Renewed) => {
                    info!(collector = %self.identity.collector, "reconnecting with the renewed certificate");
                    backoff.reset();
                    continue;
                }
                Err(e) if deadline.is_cancelled() => {
                    warn!(collector = %self.identity.collector, error = %chain(&e), unsent = self.spool.depth(),
                        "shutdown deadline reached with results not acked, they stay in the spool");
                    return;
                }
                // Only a failed connection is "unreachable": a collector that answers and refuses
                // (full disk, limits, identity) must not be reported as a network problem.
                Err(e @ UplinkError::Connect(_)) => {
                    warn!(collector = %self.identity.collector, error = %chain(&e), "collector unreachable, retrying")
                }
                Err(e) => {
                    warn!(collector = %self.identity.collector, error = %chain(&e), "collector session failed, retrying")
                }
            }
            if welcomed_at.is_some_and(|at: Instant| at.elapsed() >= HEALTHY_AFTER) {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            debug!(delay = ?delay, "reconnecting");
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

    /// One session; `Ok` only when stopped and everything is acked.
    async fn session(
        &self,
        stop: &CancellationToken,
        welcomed_at: &mut Option<Instant>,
    ) -> Result<(), UplinkError> {
        let mut endpoint = Endpoint::from_shared(self.identity.collector.clone())?;
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
        self.spool.ensure_seq_above(stored).await?;
        self.spool.ack(stored).await?;
        info!(collector = %self.identity.collector, stored_up_to_seq = stored,
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
                info!("all results acked");
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
                        info!(version = s.version, targets = s.targets.len(), "central schedule received");
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
                            info!("asking the collector to renew this agent's certificate");
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
}
