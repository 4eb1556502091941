//! In-process cross-region tests: three agents (eu-west, us-east, ap-south) stream results into a
//! real collector; matrix, latency, diagnose, watch and long-window status are asserted over gRPC.

use std::net::SocketAddr;

use mxscope_proto::pb::{self, agent_message, collector_message, ingest_client::IngestClient};
use mxscope_proto::time::now_us;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::{declaring, Collector, DEADLINE};
use tonic::Streaming;

/// Injected connect times per region, in microseconds.
const REGIONS: [(&str, u64); 3] = [
    ("eu-west", 10_000),
    ("us-east", 60_000),
    ("ap-south", 150_000),
];

struct Agent {
    id: String,
    seq: u64,
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: Streaming<pb::CollectorMessage>,
}

fn up(msg: agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}

impl Agent {
    async fn connect(addr: SocketAddr, region: &str) -> Agent {
        let id = format!("agent-{region}");
        let mut client = IngestClient::connect(format!("http://{addr}"))
            .await
            .expect("ingest client");
        let (tx, rx) = mpsc::channel(16);
        let hello = pb::Hello {
            agent_id: id.clone(),
            region: region.into(),
            version: "test".into(),
            local_targets: declaring(&["lab.test", "other.test", "a.test", "b.test", "c.test"]),
            ..Default::default()
        };
        tx.send(up(agent_message::Msg::Hello(hello))).await.unwrap();
        let rx = client
            .session(ReceiverStream::new(rx))
            .await
            .expect("session accepted")
            .into_inner();
        let mut a = Agent { id, seq: 0, tx, rx };
        match a.next().await {
            Some(collector_message::Msg::Welcome(_)) => {}
            other => panic!("expected welcome, got {other:?}"),
        }
        a
    }

    async fn next(&mut self) -> Option<collector_message::Msg> {
        tokio::time::timeout(DEADLINE, self.rx.message())
            .await
            .expect("collector answered in time")
            .expect("stream ok")
            .map(|m| m.msg.expect("message has a body"))
    }

    /// Sends one batch and waits until it is acked (committed).
    async fn send(&mut self, mut results: Vec<pb::ProbeResult>) {
        for r in &mut results {
            self.seq += 1;
            r.seq = self.seq;
            r.agent_id = self.id.clone();
        }
        let want = self.seq;
        self.tx
            .send(up(agent_message::Msg::Batch(pb::ResultBatch { results })))
            .await
            .expect("send batch");
        loop {
            match self.next().await {
                Some(collector_message::Msg::Ack(a)) if a.stored_up_to_seq >= want => return,
                Some(_) => continue,
                None => panic!("stream ended before the ack"),
            }
        }
    }
}

/// A port-check result: ok with resolve/connect/total timings, or a connect timeout.
fn probe(
    target: &str,
    check: &str,
    port: u32,
    connect_us: u64,
    ok: bool,
    at: i64,
) -> pb::ProbeResult {
    let mut timings = vec![pb::PhaseTiming {
        phase: "resolve".into(),
        micros: 800,
    }];
    let (outcome, class, phase, message) = if ok {
        timings.push(pb::PhaseTiming {
            phase: "connect".into(),
            micros: connect_us,
        });
        timings.push(pb::PhaseTiming {
            phase: "total".into(),
            micros: connect_us * 4,
        });
        (pb::Outcome::Ok, "", "", "")
    } else {
        timings.push(pb::PhaseTiming {
            phase: "total".into(),
            micros: 10_000_000,
        });
        (
            pb::Outcome::Fail,
            "timeout",
            "connect",
            "no answer within 10s",
        )
    };
    pb::ProbeResult {
        target: target.into(),
        endpoint: Some(pb::Endpoint {
            host: format!("mx.{target}"),
            ip: "198.18.0.2".into(),
            port,
            family: pb::AddressFamily::Ipv4 as i32,
        }),
        check: check.into(),
        start_us: at,
        outcome: outcome as i32,
        error_class: class.into(),
        phase: phase.into(),
        message: message.into(),
        timings,
        interval_ms: 60_000,
        ..Default::default()
    }
}

async fn next_event(w: &mut Streaming<pb::WatchEvent>) -> pb::WatchEvent {
    tokio::time::timeout(DEADLINE, w.message())
        .await
        .expect("state change in time")
        .expect("watch stream ok")
        .expect("watch stream open")
}

#[tokio::test]
async fn smtp_blocked_from_one_region_is_partial_network_there_and_watched() {
    let c = Collector::start(|_| {}).await;
    let mut q = c.query().await;
    let mut watch = q
        .watch(pb::WatchRequest {
            target: "lab.test".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut agents = Vec::new();
    for (region, _) in REGIONS {
        agents.push(Agent::connect(c.addr, region).await);
    }
    let t0 = now_us() - 60_000_000;
    for round in 0..5i64 {
        for (agent, (region, connect_us)) in agents.iter_mut().zip(REGIONS) {
            let at = t0 + round * 10_000_000;
            let blocked = region == "ap-south";
            agent
                .send(vec![
                    probe("lab.test", "smtp", 25, connect_us, !blocked, at),
                    probe("lab.test", "submission", 587, connect_us, true, at + 1),
                    // Another target: nothing wrong with it, and its events are filtered out.
                    probe(
                        "other.test",
                        "smtp",
                        25,
                        connect_us,
                        round != 2 || blocked,
                        at + 2,
                    ),
                ])
                .await;
        }
    }

    // Watch: exactly the ap-south smtp series turned failing (after two failures), nothing else
    // of lab.test changed.
    let e = next_event(&mut watch).await;
    assert_eq!(
        (e.target.as_str(), e.check.as_str(), e.region.as_str()),
        ("lab.test", "smtp", "ap-south")
    );
    assert_eq!(
        (e.old_state.as_str(), e.new_state.as_str()),
        ("ok", "failing")
    );
    assert_eq!(e.error_class, "timeout");
    assert_eq!(e.at_us, t0 + 10_000_000, "flips on the second failure");

    // Matrix: smtp partial naming ap-south; submission up.
    let m = q
        .matrix(pb::MatrixRequest::default())
        .await
        .expect("matrix")
        .into_inner();
    assert_eq!(m.regions, vec!["ap-south", "eu-west", "us-east"]);
    let row = |m: &pb::MatrixResponse, target: &str, check: &str| {
        m.rows
            .iter()
            .find(|r| r.target == target && r.check == check)
            .cloned()
            .unwrap_or_else(|| panic!("no row {target} {check} in {m:?}"))
    };
    let smtp = row(&m, "lab.test", "smtp");
    assert_eq!(smtp.scope, "partial");
    assert_eq!(smtp.failing_regions, vec!["ap-south"]);
    let cell = |r: &pb::MatrixRow, region: &str| {
        r.cells
            .iter()
            .find(|c| c.region == region)
            .cloned()
            .expect("cell")
    };
    assert_eq!(cell(&smtp, "ap-south").value, Some(0.0));
    assert_eq!(cell(&smtp, "ap-south").state, "failing");
    assert_eq!(cell(&smtp, "eu-west").value, Some(1.0));
    assert_eq!(row(&m, "lab.test", "submission").scope, "up");
    assert_eq!(
        row(&m, "other.test", "smtp").scope,
        "up",
        "one failure does not flip"
    );

    // Matrix of connect p50 for submission orders the regions as the injected delays.
    let m = q
        .matrix(pb::MatrixRequest {
            check: "submission".into(),
            metric: "p50".into(),
            since_ms: 3_600_000,
            offset: 0,
        })
        .await
        .expect("matrix p50")
        .into_inner();
    assert_eq!(m.rows.len(), 1);
    let sub = &m.rows[0];
    assert_eq!(sub.phase, "connect");
    for (region, us) in REGIONS {
        let ms = cell(sub, region).value.expect("p50 value");
        let want = us as f64 / 1000.0;
        assert!((ms - want).abs() <= 0.01 * want, "{region}: {ms} vs {want}");
    }

    // Latency: per region and phase, within the sketch's 1%.
    let l = q
        .latency(pb::LatencyRequest {
            target: "lab.test".into(),
            check: "submission".into(),
            phase: "connect".into(),
            since_ms: 0,
        })
        .await
        .expect("latency")
        .into_inner();
    assert_eq!(l.rows.len(), 3, "{l:?}");
    for r in &l.rows {
        let want = REGIONS.iter().find(|(n, _)| *n == r.region).unwrap().1 as f64 / 1000.0;
        assert_eq!(
            (r.check.as_str(), r.phase.as_str(), r.count),
            ("submission", "connect", 5)
        );
        assert!((r.p50_ms - want).abs() <= 0.01 * want, "{r:?}");
    }
    let all = q
        .latency(pb::LatencyRequest {
            target: "lab.test".into(),
            ..Default::default()
        })
        .await
        .expect("latency all")
        .into_inner();
    // smtp from ap-south never connected: it has resolve but no connect latency.
    assert!(all
        .rows
        .iter()
        .any(|r| r.check == "smtp" && r.region == "ap-south" && r.phase == "resolve"));
    assert!(!all
        .rows
        .iter()
        .any(|r| r.check == "smtp" && r.region == "ap-south" && r.phase == "connect"));

    // Diagnose: network, only in ap-south, with the evidence.
    let d = q
        .diagnose(pb::DiagnoseRequest {
            target: "lab.test".into(),
            since_ms: 0,
        })
        .await
        .expect("diagnose")
        .into_inner();
    assert_eq!(d.layer, "network");
    assert_eq!(d.scope, "regions");
    assert_eq!(d.regions, vec!["ap-south"]);
    assert_eq!(d.check, "smtp");
    assert!(
        d.evidence.iter().any(|e| e.contains("timeout in connect")),
        "{:?}",
        d.evidence
    );
    assert_eq!(d.findings.len(), 1, "submission is fine: {:?}", d.findings);

    // Status over 30 days comes from rollups and counts every result.
    let s = q
        .status(pb::StatusRequest {
            window_ms: 30 * 86_400_000,
            target: "lab.test".into(),
            check: "smtp".into(),
            region: "ap-south".into(),
            offset: 0,
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.rows.len(), 1);
    assert_eq!((s.rows[0].count, s.rows[0].ok_count), (5, 0));
    assert_eq!(s.rows[0].state, "failing");

    c.shutdown().await.0.expect("clean shutdown");
}

#[tokio::test]
async fn an_agent_blocking_port_25_is_its_own_fault_not_the_targets() {
    let c = Collector::start(|_| {}).await;
    let mut q = c.query().await;
    let mut agents = Vec::new();
    for (region, _) in REGIONS {
        agents.push(Agent::connect(c.addr, region).await);
    }
    let t0 = now_us() - 30_000_000;
    for round in 0..3i64 {
        for (agent, (region, connect_us)) in agents.iter_mut().zip(REGIONS) {
            let results = ["a.test", "b.test", "c.test"]
                .iter()
                .map(|t| probe(t, "smtp", 25, connect_us, region != "ap-south", t0 + round))
                .collect();
            agent.send(results).await;
        }
    }
    let m = q
        .matrix(pb::MatrixRequest {
            check: "smtp".into(),
            ..Default::default()
        })
        .await
        .expect("matrix")
        .into_inner();
    assert_eq!(m.rows.len(), 3);
    for r in &m.rows {
        assert_eq!(r.scope, "up", "{r:?}");
        assert!(r.failing_regions.is_empty());
        assert!(
            r.notes.iter().any(|n| n.contains("agent-ap-south")),
            "{:?}",
            r.notes
        );
        let ap = r.cells.iter().find(|c| c.region == "ap-south").unwrap();
        assert_eq!(ap.state, "agent");
    }
    let d = q
        .diagnose(pb::DiagnoseRequest {
            target: "b.test".into(),
            since_ms: 0,
        })
        .await
        .expect("diagnose")
        .into_inner();
    assert_eq!((d.scope.as_str(), d.layer.as_str()), ("agent", "network"));
    assert_eq!(d.regions, vec!["ap-south"]);
    c.shutdown().await.0.expect("clean shutdown");
}

#[tokio::test]
async fn watch_ends_on_shutdown_and_bad_requests_are_refused() {
    let c = Collector::start(|_| {}).await;
    let mut q = c.query().await;
    let err = q
        .matrix(pb::MatrixRequest {
            metric: "p42".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = q.latency(pb::LatencyRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let mut watch = q
        .watch(pb::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    c.shutdown().await.0.expect("clean shutdown");
    let end = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .expect("stream ends in time");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}

/// A port-25 result of one MX host of `target` (an MX-expanded domain: the agent marks it so).
fn mx_probe(target: &str, host: &str, ip: &str, pref: i64, ok: bool, at: i64) -> pb::ProbeResult {
    let mut r = probe(target, "smtp", 25, 10_000, ok, at);
    if let Some(e) = r.endpoint.as_mut() {
        e.host = host.into();
        e.ip = ip.into();
    }
    r.facts = vec![
        pb::Fact {
            key: mxscope_proto::facts::address::VIA_MX.into(),
            value: Some(pb::fact::Value::Flag(true)),
        },
        pb::Fact {
            key: mxscope_proto::facts::mx::PREFERENCE.into(),
            value: Some(pb::fact::Value::Int(pref)),
        },
    ];
    r
}

#[tokio::test]
async fn a_failing_backup_mx_is_redundancy_and_watch_says_when_mail_stops_flowing() {
    let c = Collector::start(|_| {}).await;
    let mut q = c.query().await;
    let mut watch = q
        .watch(pb::WatchRequest {
            target: "a.test".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut agent = Agent::connect(c.addr, "eu-west").await;
    let t0 = now_us() - 60_000_000;
    // Rounds 0-2: the backup refuses, the primary works. Rounds 3-4: the primary fails too.
    for round in 0..5i64 {
        let at = t0 + round * 10_000_000;
        agent
            .send(vec![
                mx_probe("a.test", "mx1.a.test", "198.18.0.2", 10, round < 3, at),
                mx_probe("a.test", "mx2.a.test", "198.18.0.3", 20, false, at + 1),
            ])
            .await;
        if round == 2 {
            let m = q
                .matrix(pb::MatrixRequest {
                    check: "smtp".into(),
                    ..Default::default()
                })
                .await
                .expect("matrix")
                .into_inner();
            let row = &m.rows[0];
            assert_eq!(
                (row.scope.as_str(), row.basis.as_str()),
                ("up", "mail"),
                "{row:?}"
            );
            assert!(
                row.notes.iter().any(|n| n.contains("backup MX mx2.a.test")),
                "{row:?}"
            );
            let d = q
                .diagnose(pb::DiagnoseRequest {
                    target: "a.test".into(),
                    since_ms: 0,
                })
                .await
                .expect("diagnose")
                .into_inner();
            assert_eq!(
                (d.findings[0].kind.as_str(), d.findings[0].severity.as_str()),
                ("redundancy", "warn"),
                "{d:?}"
            );
            assert!(d
                .explanation
                .starts_with("Mail to a.test flows from every region judged"));
        }
    }
    // The backup's endpoint turned failing first (mail still flowing: no mail event), then the
    // primary's, and with it mail stopped flowing from eu-west.
    let mut events = Vec::new();
    while events.len() < 3 {
        events.push(next_event(&mut watch).await);
    }
    let seen: Vec<(String, String, String, String)> = events
        .iter()
        .map(|e| {
            (
                e.level.clone(),
                e.endpoint.clone(),
                e.old_state.clone(),
                e.new_state.clone(),
            )
        })
        .collect();
    let endpoint = |ep: &str| {
        (
            "endpoint".to_string(),
            ep.to_string(),
            "ok".to_string(),
            "failing".to_string(),
        )
    };
    assert_eq!(seen[0], endpoint("mx2.a.test[198.18.0.3]:25"), "{events:?}");
    assert!(
        seen.contains(&endpoint("mx1.a.test[198.18.0.2]:25")),
        "{events:?}"
    );
    assert!(
        seen.contains(&(
            "mail".to_string(),
            String::new(),
            "ok".to_string(),
            "failing".to_string()
        )),
        "{events:?}"
    );
    let m = q
        .matrix(pb::MatrixRequest {
            check: "smtp".into(),
            ..Default::default()
        })
        .await
        .expect("matrix")
        .into_inner();
    assert_eq!(m.rows[0].scope, "down", "{m:?}");
    let d = q
        .diagnose(pb::DiagnoseRequest {
            target: "a.test".into(),
            since_ms: 0,
        })
        .await
        .expect("diagnose")
        .into_inner();
    assert_eq!(d.findings[0].kind, "mail_flow", "{d:?}");
    assert_eq!(d.findings[0].scope, "everywhere", "{d:?}");
}
