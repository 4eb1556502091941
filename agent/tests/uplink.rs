//! The agent against a fake collector on loopback: ordered delivery, acks trimming the spool,
//! reconnect with resend from the last ack, Welcome moving seq ahead, schedules, clean shutdown;
//! failover between two collectors sharing one database or each with its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mxscope_agent::config::{parse_targets, AgentConfig, LogFormat, Target};
use mxscope_agent::probe::{CheckOptions, CheckSpec, TargetKind};
use mxscope_agent::schedule::Prober;
use mxscope_agent::spool::{Spool, SpoolHandle};
use mxscope_agent::uplink::{Identity, Uplink};
use mxscope_proto::pb::agent_message::Msg as Up;
use mxscope_proto::pb::collector_message::Msg as Down;
use mxscope_proto::pb::ingest_server::{Ingest, IngestServer};
use mxscope_proto::{pb, CheckKind, Endpoint, Observation};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

#[derive(Default)]
struct Seen {
    hellos: Vec<pb::Hello>,
    /// Every result received, in arrival order (duplicates included).
    received: Vec<u64>,
    stored: BTreeMap<u64, pb::ProbeResult>,
    batch_sizes: Vec<usize>,
    sessions: usize,
}

#[derive(Clone, Default)]
struct FakeCollector {
    seen: Arc<Mutex<Seen>>,
    /// Close the first session after its first batch, without acking it.
    drop_first_session: bool,
    /// Close the first session after storing its first batch, without acking it (a collector
    /// killed between its commit and the ack).
    store_then_drop_first_session: bool,
    /// Welcome with this seq instead of what is stored.
    welcome_seq: Option<u64>,
    schedule: Option<pb::Schedule>,
}

impl FakeCollector {
    fn stored_up_to(&self) -> u64 {
        let seen = self.seen.lock().unwrap();
        let mut n = 0;
        while seen.stored.contains_key(&(n + 1)) {
            n += 1;
        }
        n
    }
}

#[tonic::async_trait]
impl Ingest for FakeCollector {
    type SessionStream = ReceiverStream<Result<pb::CollectorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(Some(pb::AgentMessage {
                msg: Some(Up::Hello(hello)),
            })) = inbound.message().await
            else {
                return;
            };
            let session = {
                let mut seen = me.seen.lock().unwrap();
                seen.hellos.push(hello);
                seen.sessions += 1;
                seen.sessions
            };
            let welcome = me.welcome_seq.unwrap_or_else(|| me.stored_up_to());
            let msg = Down::Welcome(pb::Welcome {
                stored_up_to_seq: welcome,
            });
            let _ = tx.send(Ok(pb::CollectorMessage { msg: Some(msg) })).await;
            if let Some(s) = me.schedule.clone() {
                let _ = tx
                    .send(Ok(pb::CollectorMessage {
                        msg: Some(Down::Schedule(s)),
                    }))
                    .await;
            }
            while let Ok(Some(msg)) = inbound.message().await {
                let Some(Up::Batch(batch)) = msg.msg else {
                    continue;
                };
                {
                    let mut seen = me.seen.lock().unwrap();
                    seen.batch_sizes.push(batch.results.len());
                    seen.received.extend(batch.results.iter().map(|r| r.seq));
                    if me.drop_first_session && session == 1 {
                        return;
                    }
                    for r in batch.results {
                        seen.stored.insert(r.seq, r);
                    }
                    if me.store_then_drop_first_session && session == 1 {
                        return;
                    }
                }
                let ack = Down::Ack(pb::Ack {
                    stored_up_to_seq: me.stored_up_to().max(welcome),
                });
                let _ = tx.send(Ok(pb::CollectorMessage { msg: Some(ack) })).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves `fake` on `listener` until `stop`.
fn serve(fake: FakeCollector, listener: TcpListener, stop: CancellationToken) {
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(IngestServer::new(fake))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned())
            .await
    });
}

async fn start(fake: FakeCollector) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    serve(fake, listener, stop.clone());
    (addr, stop)
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn observations(n: usize) -> Vec<Observation> {
    (0..n)
        .map(|i| {
            Observation::new(
                &format!("t{i}.example"),
                Endpoint::host("mx.example"),
                CheckKind::Smtp,
                1,
            )
        })
        .collect()
}

fn spool_with(dir: &std::path::Path, records: usize) -> SpoolHandle {
    let (mut spool, _) = Spool::open(dir, 64 << 20).unwrap();
    for _ in 0..records / 100 {
        spool.append("eu-1", observations(100)).unwrap();
    }
    spool.append("eu-1", observations(records % 100)).unwrap();
    SpoolHandle::spawn(spool, "eu-1".into()).unwrap()
}

fn uplink(
    addr: SocketAddr,
    spool: &SpoolHandle,
) -> (Uplink, watch::Receiver<Option<pb::Schedule>>) {
    uplink_to(&[addr], spool)
}

/// An uplink to the collectors at `addrs`, in this order.
fn uplink_to(
    addrs: &[SocketAddr],
    spool: &SpoolHandle,
) -> (Uplink, watch::Receiver<Option<pb::Schedule>>) {
    let (tx, rx) = watch::channel(None);
    let up = Uplink {
        identity: Identity {
            collectors: addrs.iter().map(|a| format!("http://{a}")).collect(),
            agent_id: "eu-1".into(),
            region: "eu-west".into(),
            labels: [("net".to_string(), "dsl".to_string())]
                .into_iter()
                .collect(),
            local_targets: parse_targets(
                "targets.toml",
                "[[target]]\nname = \"a.example\"\nchecks = [\"smtp\"]\nports = { smtp = 2525 }\n",
            )
            .unwrap()
            .into(),
            tls: None,
        },
        renewal: None,
        spool: spool.clone(),
        schedule: tx,
        drain: Duration::from_secs(3),
    };
    (up, rx)
}

#[tokio::test]
async fn streams_spool_in_order_and_acks_trim_it() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with(dir.path(), 1234);
    let fake = FakeCollector::default();
    let (addr, server) = start(fake.clone()).await;
    let (up, _) = uplink(addr, &spool);
    let stop = CancellationToken::new();
    let task = tokio::spawn(up.run(stop.clone()));

    wait_until("all acked", Duration::from_secs(20), || {
        spool.depth() == 0 && spool.acked_seq() == 1234
    })
    .await;
    {
        let seen = fake.seen.lock().unwrap();
        assert_eq!(
            seen.stored.keys().copied().collect::<Vec<_>>(),
            (1..=1234).collect::<Vec<_>>()
        );
        assert_eq!(
            seen.received,
            (1..=1234).collect::<Vec<_>>(),
            "ascending, each once"
        );
        assert!(!seen.batch_sizes.is_empty());
        assert!(
            seen.batch_sizes.iter().all(|&n| n <= 500),
            "{:?}",
            seen.batch_sizes
        );
        let hello = &seen.hellos[0];
        assert_eq!(hello.agent_id, "eu-1");
        assert_eq!(hello.region, "eu-west");
        assert_eq!(hello.highest_seq, 1234);
        assert_eq!(hello.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hello.labels.get("net").map(String::as_str), Some("dsl"));
        assert_eq!(hello.local_targets.len(), 1);
        let local = &hello.local_targets[0];
        assert_eq!(
            (local.name.as_str(), local.source.as_str()),
            ("a.example", "local")
        );
        assert_eq!(local.checks, vec!["smtp"]);
        assert_eq!(local.ports.get("smtp"), Some(&2525));
        assert_eq!(seen.stored[&7].agent_id, "eu-1");
    }
    // New results flow on the same session.
    spool.append(observations(3)).await.unwrap();
    wait_until("new results acked", Duration::from_secs(10), || {
        spool.acked_seq() == 1237
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    server.cancel();
}

#[tokio::test]
async fn reconnects_and_resends_from_the_last_ack() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with(dir.path(), 700);
    let fake = FakeCollector {
        drop_first_session: true,
        ..Default::default()
    };
    let (addr, server) = start(fake.clone()).await;
    let (up, _) = uplink(addr, &spool);
    let stop = CancellationToken::new();
    let task = tokio::spawn(up.run(stop.clone()));

    wait_until("all acked after reconnect", Duration::from_secs(20), || {
        spool.depth() == 0
    })
    .await;
    {
        let seen = fake.seen.lock().unwrap();
        assert_eq!(seen.sessions, 2);
        assert_eq!(seen.stored.len(), 700);
        let resent = seen.received.iter().filter(|&&s| s == 1).count();
        assert_eq!(resent, 2, "seq 1 resent after the dropped session");
    }
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    server.cancel();
}

/// Runs an uplink over `[a, b]` with a spool of 700 results until all are acked.
async fn fail_over(a: &FakeCollector, b: &FakeCollector, spool: &SpoolHandle) {
    let (addr_a, server_a) = start(a.clone()).await;
    let (addr_b, server_b) = start(b.clone()).await;
    let (up, _) = uplink_to(&[addr_a, addr_b], spool);
    let stop = CancellationToken::new();
    let task = tokio::spawn(up.run(stop.clone()));
    wait_until("all acked after failover", Duration::from_secs(20), || {
        spool.depth() == 0
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    server_a.cancel();
    server_b.cancel();
}

#[tokio::test]
async fn fails_over_to_the_next_collector_and_resends_what_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with(dir.path(), 700);
    // A stores the first batch and dies before acking it; B has a database of its own.
    let a = FakeCollector {
        store_then_drop_first_session: true,
        ..Default::default()
    };
    let b = FakeCollector::default();
    fail_over(&a, &b, &spool).await;
    let (a, b) = (a.seen.lock().unwrap(), b.seen.lock().unwrap());
    assert_eq!(a.sessions, 1, "A is not tried again while B works");
    assert_eq!(a.stored.len(), 500, "A stored its first batch");
    assert_eq!(b.sessions, 1);
    assert_eq!(
        b.stored.len(),
        700,
        "B got everything, A's unacked batch too"
    );
    assert_eq!(b.stored.keys().next(), Some(&1));
    assert_eq!(b.hellos[0].highest_seq, 700);
}

#[tokio::test]
async fn fails_over_within_one_database_without_resending() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with(dir.path(), 700);
    // Both collectors share one database (`seen`): B's Welcome says what A stored unacked.
    let a = FakeCollector {
        store_then_drop_first_session: true,
        ..Default::default()
    };
    let b = FakeCollector {
        seen: a.seen.clone(),
        ..Default::default()
    };
    fail_over(&a, &b, &spool).await;
    let seen = a.seen.lock().unwrap();
    assert_eq!(seen.sessions, 2, "one session with A, one with B");
    assert_eq!(seen.stored.len(), 700);
    assert_eq!(seen.received.len(), 700, "nothing A stored is sent again");
    assert_eq!(seen.received.iter().filter(|&&s| s == 1).count(), 1);
    assert_eq!(spool.acked_seq(), 700);
}

#[tokio::test]
async fn welcome_moves_seq_ahead_and_schedule_is_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with(dir.path(), 3);
    let schedule = pb::Schedule {
        version: 7,
        targets: vec![pb::TargetSpec {
            name: "c.example".into(),
            checks: vec!["mx".into()],
            ..Default::default()
        }],
    };
    let fake = FakeCollector {
        welcome_seq: Some(1000),
        schedule: Some(schedule),
        ..Default::default()
    };
    let (addr, server) = start(fake.clone()).await;
    let (up, mut schedule_rx) = uplink(addr, &spool);
    let stop = CancellationToken::new();
    let task = tokio::spawn(up.run(stop.clone()));

    tokio::time::timeout(
        Duration::from_secs(10),
        schedule_rx.wait_for(|s| s.is_some()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(schedule_rx.borrow().as_ref().map(|s| s.version), Some(7));
    wait_until("welcome applied", Duration::from_secs(10), || {
        spool.acked_seq() == 1000
    })
    .await;
    assert_eq!(spool.depth(), 0);
    assert_eq!(
        spool.append(observations(1)).await.unwrap(),
        vec![1001],
        "seq never goes backwards"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    server.cancel();
}

struct CountingProber(AtomicUsize);

#[async_trait::async_trait]
impl Prober for CountingProber {
    async fn probe(&self, spec: &CheckSpec) -> Vec<Observation> {
        self.0.fetch_add(1, Ordering::SeqCst);
        vec![Observation::new(
            &spec.target,
            Endpoint::host(spec.target.clone()),
            spec.check,
            1,
        )]
    }
}

#[tokio::test]
async fn agent_probes_while_collector_is_down_and_delivers_later() {
    // A free loopback port with nothing listening yet.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = Target {
        def: mxscope_proto::target::Target {
            name: "a.example".into(),
            kind: TargetKind::Domain,
            checks: vec![CheckKind::Mx],
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            ports: BTreeMap::new(),
            regions: Vec::new(),
            labels: BTreeMap::new(),
            require_tls: false,
            spf_senders: Vec::new(),
        },
        options: CheckOptions::default(),
    };
    let config = AgentConfig {
        collectors: vec![format!("http://{addr}")],
        id: "eu-1".into(),
        region: "eu-west".into(),
        targets: vec![target],
        resolver: None,
        ca_file: None,
        collector_tls: None,
        state_dir: None,
        credentials: Default::default(),
        spool_dir: dir.path().join("spool"),
        spool_max: 1 << 20,
        concurrency: 4,
        per_host: 2,
        fanout: Default::default(),
        labels: BTreeMap::new(),
        helo_name: "probe.invalid".into(),
        log_format: LogFormat::Text,
    };
    let prober = Arc::new(CountingProber(AtomicUsize::new(0)));
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(mxscope_agent::run_with(
        config,
        prober.clone(),
        shutdown.clone(),
    ));

    wait_until(
        "probes while the collector is down",
        Duration::from_secs(10),
        || prober.0.load(Ordering::SeqCst) >= 2,
    )
    .await;
    let fake = FakeCollector::default();
    let listener = TcpListener::bind(addr).await.unwrap();
    let server = CancellationToken::new();
    serve(fake.clone(), listener, server.clone());
    wait_until("spooled results delivered", Duration::from_secs(20), || {
        fake.stored_up_to() >= 3
    })
    .await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let probes = prober.0.load(Ordering::SeqCst) as u64;
    assert_eq!(
        fake.stored_up_to(),
        probes,
        "every probe result delivered before exit, no gaps"
    );
    // Restart finds nothing unsent and continues the seq.
    let (spool, report) = Spool::open(&dir.path().join("spool"), 1 << 20).unwrap();
    assert_eq!(report.depth, 0);
    assert_eq!(spool.highest_seq(), probes);
    server.cancel();
}
