//! In-process tests: the collector's `run` on a port-0 loopback listener, driven by tonic clients
//! acting as an agent (Ingest) and as mxscopectl (Query).

use std::net::SocketAddr;
use std::time::Duration;

use mxscope_proto::pb::{
    self, agent_message, collector_message, ingest_client::IngestClient, query_client::QueryClient,
};
use mxscope_proto::time::now_us;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::support::{declaring, unlimited_rates, Collector, DEADLINE};
use tonic::{Code, Streaming};

struct Agent {
    id: String,
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: Streaming<pb::CollectorMessage>,
}

fn hello(id: &str, region: &str) -> pb::Hello {
    pb::Hello {
        agent_id: id.into(),
        region: region.into(),
        version: "test".into(),
        local_targets: declaring(&["example.test"]),
        ..Default::default()
    }
}

fn up(msg: agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}

fn result(agent: &str, seq: u64) -> pb::ProbeResult {
    pb::ProbeResult {
        agent_id: agent.into(),
        seq,
        target: "example.test".into(),
        endpoint: Some(pb::Endpoint {
            host: "mx.example.test".into(),
            ip: "127.0.0.1".into(),
            port: 25,
            family: 4,
        }),
        check: "smtp".into(),
        start_us: now_us() - 1_000,
        outcome: pb::Outcome::Ok as i32,
        timings: vec![pb::PhaseTiming {
            phase: "total".into(),
            micros: 12_000,
        }],
        interval_ms: 60_000,
        ..Default::default()
    }
}

impl Agent {
    async fn open(addr: SocketAddr, first: pb::AgentMessage) -> Result<Agent, tonic::Status> {
        let mut client = IngestClient::connect(format!("http://{addr}"))
            .await
            .expect("ingest client");
        let (tx, rx) = mpsc::channel(16);
        let id = match &first.msg {
            Some(agent_message::Msg::Hello(h)) => h.agent_id.clone(),
            _ => String::new(),
        };
        tx.send(first).await.expect("queue first message");
        let rx = client.session(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Agent { id, tx, rx })
    }

    async fn connect(addr: SocketAddr, id: &str, region: &str) -> Agent {
        Agent::open(addr, up(agent_message::Msg::Hello(hello(id, region))))
            .await
            .expect("session accepted")
    }

    async fn send_batch(&self, seqs: impl IntoIterator<Item = u64>) {
        let results = seqs.into_iter().map(|s| result(&self.id, s)).collect();
        self.tx
            .send(up(agent_message::Msg::Batch(pb::ResultBatch { results })))
            .await
            .expect("send batch");
    }

    /// The next message, an error status, or `None` at the end of the stream.
    async fn next(&mut self) -> Result<Option<collector_message::Msg>, tonic::Status> {
        let msg = tokio::time::timeout(DEADLINE, self.rx.message())
            .await
            .expect("collector answered in time")?;
        Ok(msg.map(|m| m.msg.expect("message has a body")))
    }

    async fn welcome(&mut self) -> u64 {
        match self.next().await {
            Ok(Some(collector_message::Msg::Welcome(w))) => w.stored_up_to_seq,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Next ack, skipping schedules.
    async fn ack(&mut self) -> u64 {
        loop {
            match self.next().await {
                Ok(Some(collector_message::Msg::Ack(a))) => return a.stored_up_to_seq,
                Ok(Some(collector_message::Msg::Schedule(_))) => continue,
                other => panic!("expected ack, got {other:?}"),
            }
        }
    }

    /// Next schedule within `within`.
    async fn schedule(&mut self, within: Duration) -> pb::Schedule {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.rx.message())
                .await
                .expect("schedule arrived in time")
                .expect("stream ok")
                .expect("stream open");
            if let Some(collector_message::Msg::Schedule(s)) = msg.msg {
                return s;
            }
        }
    }
}

async fn stored_seqs(q: &mut QueryClient<Channel>, agent: &str) -> Vec<u64> {
    let req = pb::ResultsRequest {
        agent_id: agent.into(),
        limit: 1000,
        ..Default::default()
    };
    let mut seqs: Vec<u64> = q
        .results(req)
        .await
        .expect("results")
        .into_inner()
        .results
        .into_iter()
        .filter_map(|r| r.result.map(|r| r.seq))
        .collect();
    seqs.sort_unstable();
    seqs
}

#[tokio::test]
async fn acks_follow_commits_and_resends_are_stored_once() {
    let c = Collector::start(|_| {}).await;
    let mut q = c.query().await;

    let mut a = Agent::connect(c.addr, "eu-1", "eu-west").await;
    assert_eq!(a.welcome().await, 0);
    assert!(a.schedule(DEADLINE).await.targets.is_empty());

    a.send_batch(1..=3).await;
    a.send_batch(4..=5).await;
    assert_eq!(a.ack().await, 3);
    // The ack came after the commit: a reader already sees the rows.
    let seen = stored_seqs(&mut q, "eu-1").await;
    assert!(seen.starts_with(&[1, 2, 3]), "{seen:?}");
    assert_eq!(a.ack().await, 5);
    drop(a);

    // Reconnect and resend an overlapping batch, as an agent does after losing acks.
    let mut a = Agent::connect(c.addr, "eu-1", "eu-west").await;
    assert_eq!(a.welcome().await, 5);
    a.send_batch(3..=7).await;
    assert_eq!(a.ack().await, 7);
    assert_eq!(stored_seqs(&mut q, "eu-1").await, vec![1, 2, 3, 4, 5, 6, 7]);

    // A heartbeat shows up in the agents view.
    let hb = pb::Heartbeat {
        spool_depth: 12,
        dropped_total: 3,
        sent_at_us: now_us(),
    };
    a.tx.send(up(agent_message::Msg::Heartbeat(hb)))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let agent = loop {
        let agents = q
            .agents(pb::AgentsRequest {})
            .await
            .unwrap()
            .into_inner()
            .agents;
        assert_eq!(agents.len(), 1);
        if agents[0].spool_depth == 12 || tokio::time::Instant::now() > deadline {
            break agents[0].clone();
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(
        (agent.id.as_str(), agent.region.as_str()),
        ("eu-1", "eu-west")
    );
    assert_eq!(
        (
            agent.spool_depth,
            agent.dropped_total,
            agent.stored_up_to_seq
        ),
        (12, 3, 7)
    );
    assert!(agent.connected);
    assert_eq!(agent.state, "ok");
    assert!(
        (agent.results_per_min - 7.0 / 5.0).abs() < 1e-9,
        "{}",
        agent.results_per_min
    );

    // Status has one row for the series with all seven results.
    let rows = q
        .status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(
        (r.target.as_str(), r.check.as_str(), r.region.as_str()),
        ("example.test", "smtp", "eu-west")
    );
    assert_eq!(r.endpoint, "mx.example.test[127.0.0.1]:25");
    assert_eq!(
        (r.state.as_str(), r.count, r.ok_count, r.reachability),
        ("ok", 7, 7, 1.0)
    );
    assert_eq!(r.p50_ms, Some(12.0));

    let (res, _dir) = c.shutdown().await;
    res.expect("clean shutdown");
}

#[tokio::test]
async fn schedule_follows_target_changes_within_two_seconds() {
    let c = Collector::start(|_| {}).await;
    let mut q = c.query().await;
    let mut h = hello("eu-1", "eu-west");
    h.local_targets = vec![pb::TargetSpec {
        name: "local.test".into(),
        checks: vec!["imap".into()],
        ..Default::default()
    }];
    let mut a = Agent::open(c.addr, up(agent_message::Msg::Hello(h)))
        .await
        .expect("session");
    assert_eq!(a.welcome().await, 0);
    let first = a.schedule(DEADLINE).await;
    assert!(first.targets.is_empty());

    let spec = pb::TargetSpec {
        name: "Example.TEST".into(),
        checks: vec!["smtp".into(), "mx".into()],
        ..Default::default()
    };
    let saved = q
        .put_target(pb::PutTargetRequest {
            target: Some(spec.clone()),
            update: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            saved.name.as_str(),
            saved.interval_ms,
            saved.source.as_str()
        ),
        ("example.test", 60_000, "central")
    );
    let s = a.schedule(Duration::from_secs(2)).await;
    assert!(s.version > first.version);
    let names: Vec<&str> = s.targets.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, vec!["example.test"]);
    assert_eq!(s.targets[0].source, "central");

    // A target for another region is not sent to this agent.
    let us = pb::TargetSpec {
        name: "us.test".into(),
        checks: vec!["mx".into()],
        regions: vec!["us-east".into()],
        ..Default::default()
    };
    q.put_target(pb::PutTargetRequest {
        target: Some(us),
        update: false,
    })
    .await
    .unwrap();
    let s = a.schedule(Duration::from_secs(2)).await;
    assert_eq!(s.targets.len(), 1);

    // Add twice, update a missing one, bad input.
    let err = q
        .put_target(pb::PutTargetRequest {
            target: Some(spec.clone()),
            update: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let missing = pb::TargetSpec {
        name: "missing.test".into(),
        ..spec.clone()
    };
    let err = q
        .put_target(pb::PutTargetRequest {
            target: Some(missing),
            update: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let bad = pb::TargetSpec {
        checks: vec!["smpt".into()],
        ..spec.clone()
    };
    let err = q
        .put_target(pb::PutTargetRequest {
            target: Some(bad),
            update: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("unknown check 'smpt'"),
        "{}",
        err.message()
    );

    // Central and local targets, marked by source.
    let all = q
        .list_targets(pb::ListTargetsRequest {})
        .await
        .unwrap()
        .into_inner()
        .targets;
    let listed: Vec<(&str, &str)> = all
        .iter()
        .map(|t| (t.name.as_str(), t.source.as_str()))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("example.test", "central"),
            ("us.test", "central"),
            ("local.test", "local")
        ]
    );
    let local = q
        .get_target(pb::GetTargetRequest {
            name: "local.test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(local.regions, vec!["eu-west"]);
    assert_eq!(
        local.labels.get("mxscope.agent").map(String::as_str),
        Some("eu-1")
    );

    // Removing pushes a snapshot without it; removing again names the way out.
    q.remove_target(pb::RemoveTargetRequest {
        name: "example.test".into(),
    })
    .await
    .unwrap();
    let s = a.schedule(Duration::from_secs(2)).await;
    assert!(s.targets.is_empty(), "{s:?}");
    let err = q
        .remove_target(pb::RemoveTargetRequest {
            name: "example.test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.message(),
        "unknown target 'example.test' (see 'mxscopectl target list')"
    );

    // No results yet: the matrix answers, empty (its content is tested in analysis*.rs).
    let m = q
        .matrix(pb::MatrixRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.metric, "reachability");
    assert!(m.rows.is_empty());

    let (res, _dir) = c.shutdown().await;
    res.expect("clean shutdown");
}

#[tokio::test]
async fn bad_hellos_and_batches_are_refused_with_reasons() {
    let c = Collector::start(|cfg| cfg.max_batch_results = 10).await;

    let err = Agent::open(
        c.addr,
        up(agent_message::Msg::Hello(hello("Bad_ID", "eu-west"))),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("agent id 'Bad_ID' is invalid"),
        "{}",
        err.message()
    );

    let batch_first = up(agent_message::Msg::Batch(pb::ResultBatch {
        results: vec![result("eu-1", 1)],
    }));
    let err = Agent::open(c.addr, batch_first)
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("must be a hello"),
        "{}",
        err.message()
    );

    // Too many results in one batch.
    let mut a = Agent::connect(c.addr, "eu-1", "eu-west").await;
    a.welcome().await;
    a.send_batch(1..=11).await;
    let err = loop {
        match a.next().await {
            Ok(Some(collector_message::Msg::Schedule(_))) => continue,
            Err(status) => break status,
            other => panic!("expected an error, got {other:?}"),
        }
    };
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("above the limit of 10"),
        "{}",
        err.message()
    );

    // A result of another agent: the good batch before it is still acked, then the error.
    let mut a = Agent::connect(c.addr, "eu-1", "eu-west").await;
    a.welcome().await;
    a.send_batch([1]).await;
    let foreign = pb::ResultBatch {
        results: vec![result("us-1", 2)],
    };
    a.tx.send(up(agent_message::Msg::Batch(foreign)))
        .await
        .unwrap();
    assert_eq!(a.ack().await, 1);
    let err = a.next().await.expect_err("stream fails");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("names agent 'us-1'"),
        "{}",
        err.message()
    );

    let (res, _dir) = c.shutdown().await;
    res.expect("clean shutdown");
}

#[tokio::test]
async fn shutdown_ends_sessions_and_every_ack_was_committed() {
    let c = Collector::start(|_| {}).await;
    let mut a = Agent::connect(c.addr, "eu-1", "eu-west").await;
    assert_eq!(a.welcome().await, 0);
    a.send_batch(1..=2).await;
    assert_eq!(a.ack().await, 2);
    a.send_batch(3..=4).await;

    let db = c.dir.path().join("mxscope.db");
    let stop = tokio::spawn(c.shutdown());
    // Collect what the collector sends until the stream ends.
    let mut acked = 2;
    loop {
        match a.next().await {
            Ok(Some(collector_message::Msg::Ack(ack))) => acked = ack.stored_up_to_seq,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let (res, dir) = stop.await.expect("shutdown task");
    res.expect("clean shutdown");

    let conn = rusqlite::Connection::open(&db).expect("open db after shutdown");
    let stored: u64 = conn
        .query_row("SELECT count(*) FROM results", [], |r| r.get(0))
        .expect("count");
    assert!(stored >= acked, "acked {acked} but stored {stored}");
    drop(dir);
}

/// One agent floods heartbeats as fast as its stream carries them; another agent's batch is
/// still stored and acked within a second, and the flood costs at most one queued write at a
/// time (heartbeats coalesce per session).
#[tokio::test]
async fn a_heartbeat_flood_does_not_delay_another_agents_results() {
    let c = Collector::start(|_| {}).await;
    let mut flooder = Agent::connect(c.addr, "flood-1", "eu-west").await;
    assert_eq!(flooder.welcome().await, 0);
    let mut good = Agent::connect(c.addr, "good-1", "us-east").await;
    assert_eq!(good.welcome().await, 0);

    const BEATS: u64 = 200_000;
    let tx = flooder.tx.clone();
    let flood = tokio::spawn(async move {
        for i in 0..BEATS {
            let beat = up(agent_message::Msg::Heartbeat(pb::Heartbeat {
                spool_depth: i,
                dropped_total: 0,
                sent_at_us: now_us(),
            }));
            if tx.send(beat).await.is_err() {
                break;
            }
        }
    });
    // Let the flood build up, then time a normal batch of the other agent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    good.send_batch(1..=10).await;
    assert_eq!(good.ack().await, 10);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the good agent's batch waited {took:?} behind the flood"
    );
    flood.abort();
    drop(flooder);
    c.shutdown().await.0.expect("clean shutdown");
}

/// A second session of the same agent id replaces the first: the first ends with `Aborted` once
/// what it had in flight is acked, and the newer one carries on. (Two live sessions of one id
/// would interleave seqs and lose results below the high-water mark.)
#[tokio::test]
async fn a_newer_session_of_the_same_agent_replaces_the_older_one() {
    let c = Collector::start(|_| {}).await;
    let mut old = Agent::connect(c.addr, "twin-1", "eu-west").await;
    assert_eq!(old.welcome().await, 0);
    old.send_batch(1..=5).await;
    assert_eq!(old.ack().await, 5);

    let mut new = Agent::connect(c.addr, "twin-1", "eu-west").await;
    assert_eq!(new.welcome().await, 5);
    let ended = loop {
        match old.next().await {
            Ok(Some(collector_message::Msg::Schedule(_))) => continue,
            other => break other,
        }
    };
    match ended {
        Err(status) => {
            assert_eq!(status.code(), Code::Aborted, "{status:?}");
            assert!(status.message().contains("newer session"), "{status:?}");
        }
        other => panic!("the older session must end, got {other:?}"),
    }
    new.send_batch(6..=8).await;
    assert_eq!(new.ack().await, 8);
    let mut q = c.query().await;
    assert_eq!(
        stored_seqs(&mut q, "twin-1").await,
        (1..=8).collect::<Vec<_>>()
    );
    let agents = q
        .agents(pb::AgentsRequest::default())
        .await
        .expect("agents")
        .into_inner();
    let twin = agents
        .agents
        .iter()
        .find(|a| a.id == "twin-1")
        .expect("listed");
    assert!(
        twin.connected,
        "the newer session keeps the agent connected"
    );
    drop(old);
    drop(new);
    c.shutdown().await.0.expect("clean shutdown");
}

/// Results as large as the limits allow (128 facts of 4 KiB each) still come back to a client
/// with gRPC's default 4 MiB decode limit: the answer is cut below it and says so.
#[tokio::test]
async fn a_results_answer_fits_a_default_client_however_large_the_results() {
    let c = Collector::start(|_| {}).await;
    let mut a = Agent::connect(c.addr, "big-1", "eu-west").await;
    assert_eq!(a.welcome().await, 0);
    let big = |seq: u64| {
        let mut r = result("big-1", seq);
        r.facts = (0..120)
            .map(|i| pb::Fact {
                key: format!("smtp.x{i}"),
                value: Some(pb::fact::Value::Text("y".repeat(4000))),
            })
            .collect();
        r
    };
    for first in [1u64, 4, 7, 10] {
        let results = (first..first + 3).map(big).collect();
        a.tx.send(up(agent_message::Msg::Batch(pb::ResultBatch { results })))
            .await
            .expect("send batch");
        assert_eq!(a.ack().await, first + 2);
    }
    let mut q = c.query().await;
    let answer = q
        .results(pb::ResultsRequest {
            agent_id: "big-1".into(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("a default client decodes the answer")
        .into_inner();
    assert!(answer.truncated, "12 results of ~480 KiB cannot all fit");
    let n = answer.results.len();
    assert!((1..12).contains(&n), "{n} results");
    assert_eq!(
        answer.results[0].result.as_ref().unwrap().seq,
        12,
        "newest first"
    );
    drop(a);
    c.shutdown().await.0.expect("clean shutdown");
}

/// An enrolled agent that makes results up (issue #17, item 2): 100,000 results for targets
/// nobody assigned it and 1,000 endpoints of a target it has are acked but not stored beyond
/// its series quota, counted by reason, and neither the operators' answers nor another agent's
/// results suffer.
#[tokio::test]
async fn made_up_targets_and_endpoints_are_refused_and_bounded() {
    use mxscope_collector::limits::RejectReason;
    let c = Collector::start(|cfg| {
        cfg.limits.max_series_per_agent = 50;
        unlimited_rates(cfg);
    })
    .await;
    let counters = c.counters.clone();
    let mut evil = Agent::connect(c.addr, "evil-1", "eu-west").await;
    assert_eq!(evil.welcome().await, 0);
    let mut good = Agent::connect(c.addr, "good-1", "us-east").await;
    assert_eq!(good.welcome().await, 0);

    let mut seq = 0u64;
    for _ in 0..20 {
        let results = (0..5000)
            .map(|_| {
                seq += 1;
                let mut r = result("evil-1", seq);
                r.target = format!("t{seq}.made-up.test");
                r
            })
            .collect();
        evil.tx
            .send(up(agent_message::Msg::Batch(pb::ResultBatch { results })))
            .await
            .expect("send batch");
        assert_eq!(
            evil.ack().await,
            seq,
            "refused results are acked, not stored"
        );
    }
    let results = (0..1000u64)
        .map(|i| {
            seq += 1;
            let mut r = result("evil-1", seq);
            r.endpoint.as_mut().unwrap().ip = format!("198.18.{}.{}", i / 250, i % 250 + 1);
            r
        })
        .collect();
    evil.tx
        .send(up(agent_message::Msg::Batch(pb::ResultBatch { results })))
        .await
        .expect("send batch");
    assert_eq!(evil.ack().await, seq);
    assert_eq!(counters.rejected(RejectReason::Unassigned), 100_000);
    assert_eq!(counters.rejected(RejectReason::SeriesCap), 950);

    // The other agent is unaffected.
    let started = std::time::Instant::now();
    good.send_batch(1..=10).await;
    assert_eq!(good.ack().await, 10);
    assert!(started.elapsed() < Duration::from_secs(1));

    let mut q = c.query().await;
    let status = q
        .status(pb::StatusRequest::default())
        .await
        .expect("status answers")
        .into_inner();
    assert!(!status.truncated);
    assert_eq!(
        status.rows.len(),
        51,
        "50 series of the evil agent, 1 of the good one"
    );
    assert!(status.rows.iter().all(|r| r.target == "example.test"));
    let stored = stored_seqs(&mut q, "evil-1").await;
    assert_eq!(stored.len(), 50);
    drop((evil, good));
    c.shutdown().await.0.expect("clean shutdown");
}

/// However many series exist, `status` answers a client with gRPC's default 4 MiB decode limit
/// and says it cut the answer.
#[tokio::test]
async fn a_status_answer_fits_a_default_client_however_many_series() {
    let c = Collector::start(unlimited_rates).await;
    let mut a = Agent::connect(c.addr, "wide-1", "eu-west").await;
    assert_eq!(a.welcome().await, 0);
    for first in [1u64, 501, 1001] {
        let results = (first..first + 500)
            .map(|seq| {
                let mut r = result("wide-1", seq);
                r.endpoint.as_mut().unwrap().ip = format!("198.18.{}.{}", seq / 250, seq % 250 + 1);
                r.outcome = pb::Outcome::Fail as i32;
                r.error_class = "timeout".into();
                r.message = "m".repeat(4096);
                r
            })
            .collect();
        a.tx.send(up(agent_message::Msg::Batch(pb::ResultBatch { results })))
            .await
            .expect("send batch");
        assert_eq!(a.ack().await, first + 499);
    }
    let mut q = c.query().await;
    let status = q
        .status(pb::StatusRequest::default())
        .await
        .expect("a default client decodes the answer")
        .into_inner();
    assert!(status.truncated, "1500 rows of 4 KiB cannot all fit");
    assert!(
        (500..1500).contains(&status.rows.len()),
        "{}",
        status.rows.len()
    );
    // The next pages hold the rest, each row once.
    let mut endpoints: Vec<String> = status.rows.iter().map(|r| r.endpoint.clone()).collect();
    let mut next = status.next_offset;
    while next != 0 {
        let page = q
            .status(pb::StatusRequest {
                offset: next,
                ..Default::default()
            })
            .await
            .expect("a page")
            .into_inner();
        endpoints.extend(page.rows.iter().map(|r| r.endpoint.clone()));
        next = page.next_offset;
    }
    assert_eq!(endpoints.len(), 1500);
    endpoints.sort();
    endpoints.dedup();
    assert_eq!(endpoints.len(), 1500, "no row twice");
    drop(a);
    c.shutdown().await.0.expect("clean shutdown");
}

/// One identity holds at most `max_watches_per_identity` watch streams; a closed one frees its
/// slot.
#[tokio::test]
async fn watch_streams_per_identity_are_bounded() {
    let c = Collector::start(|cfg| cfg.max_watches_per_identity = 2).await;
    let mut q = c.query().await;
    let watch = |q: &mut QueryClient<Channel>| {
        let mut q = q.clone();
        async move { q.watch(pb::WatchRequest::default()).await }
    };
    let first = watch(&mut q).await.expect("first watch");
    let _second = watch(&mut q).await.expect("second watch");
    let third = watch(&mut q).await.expect_err("a third is refused");
    assert_eq!(third.code(), Code::ResourceExhausted);
    assert!(third.message().contains("2 watch streams"), "{third:?}");
    drop(first);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match watch(&mut q).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(tokio::time::Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    c.shutdown().await.0.expect("clean shutdown");
}

/// A unary request whose body never ends is ended after the request timeout (tonic answers
/// CANCELLED, "Timeout expired") instead of holding its stream (tonic's own client always sends
/// whole bodies).
#[tokio::test]
async fn a_request_that_never_finishes_its_body_times_out() {
    use http_body_util::StreamBody;
    let c = Collector::start(|cfg| cfg.request_timeout = Duration::from_millis(300)).await;
    let tcp = tokio::net::TcpStream::connect(c.addr)
        .await
        .expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    // Half a gRPC frame header, then nothing (the sender is kept, so the body never ends).
    let (tx, rx) = mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>(1);
    tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(&[
        0, 0,
    ]))))
    .await
    .unwrap();
    let body = StreamBody::new(ReceiverStream::new(rx));
    let req = http::Request::post(format!("http://{}/mxscope.v1.Query/Status", c.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(DEADLINE, send.send_request(req))
        .await
        .expect("answered before the test deadline")
        .expect("a response");
    let took = started.elapsed();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(header("grpc-status").as_deref(), Some("1"), "{resp:?}");
    assert_eq!(
        header("grpc-message").as_deref(),
        Some("Timeout%20expired"),
        "{resp:?}"
    );
    assert!(took >= Duration::from_millis(250), "{took:?}");
    drop(tx);
    c.shutdown().await.0.expect("clean shutdown");
}

/// Bytes per agent are rate limited, not only results: 2 MiB of results at 1 MiB/s (burst
/// 256 KiB) take over a second (the pause after the last batch does not delay its ack), with no
/// limit on the number of results.
#[tokio::test]
async fn an_agents_bytes_are_rate_limited() {
    let c = Collector::start(|cfg| {
        unlimited_rates(cfg);
        cfg.limits.bytes_per_sec = 1024.0 * 1024.0;
        cfg.limits.bytes_burst = 256.0 * 1024.0;
    })
    .await;
    let mut a = Agent::connect(c.addr, "bulky-1", "eu-west").await;
    assert_eq!(a.welcome().await, 0);
    let started = std::time::Instant::now();
    for first in [1u64, 501, 1001, 1501] {
        let results = (first..first + 500)
            .map(|seq| {
                let mut r = result("bulky-1", seq);
                r.message = "m".repeat(1024);
                r
            })
            .collect();
        a.tx.send(up(agent_message::Msg::Batch(pb::ResultBatch { results })))
            .await
            .expect("send batch");
        assert_eq!(a.ack().await, first + 499);
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1000), "2 MiB in {took:?}");
    drop(a);
    c.shutdown().await.0.expect("clean shutdown");
}

/// One connection holds at most 32 streams: a 33rd call on it waits until one ends.
#[tokio::test]
async fn a_connection_holds_at_most_32_streams() {
    let c = Collector::start(|cfg| cfg.max_watches_per_identity = 100).await;
    let q = c.query().await;
    let mut open = Vec::new();
    for _ in 0..32 {
        let mut q = q.clone();
        open.push(
            q.watch(pb::WatchRequest::default())
                .await
                .expect("watch within the cap")
                .into_inner(),
        );
    }
    let mut q33 = q.clone();
    let mut extra = tokio::spawn(async move { q33.status(pb::StatusRequest::default()).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut extra)
            .await
            .is_err(),
        "a 33rd stream on the connection was served at once"
    );
    drop(open.pop());
    let answer = tokio::time::timeout(DEADLINE, extra)
        .await
        .expect("served once a stream ended")
        .expect("task");
    answer.expect("status answers");
    drop(open);
    c.shutdown().await.0.expect("clean shutdown");
}

/// The writer's queue is bounded over all sessions: while four agents flood it (each would keep
/// 16 batches in flight), another agent's batch waits behind at most `max_queued_batches` of
/// theirs and one waiting batch per flooding session, and is acked within a second (issue #17,
/// item 4).
#[tokio::test]
async fn flooding_agents_cannot_queue_ahead_of_another_agent_without_bound() {
    let c = Collector::start(|cfg| {
        cfg.max_queued_batches = 2;
        unlimited_rates(cfg);
    })
    .await;
    let counters = c.counters.clone();
    let mut floods = Vec::new();
    for n in 0..4 {
        let id = format!("flood-{n}");
        let mut a = Agent::connect(c.addr, &id, "eu-west").await;
        assert_eq!(a.welcome().await, 0);
        floods.push(tokio::spawn(async move {
            let mut seq = 0u64;
            for _ in 0..1000 {
                let results = (seq + 1..=seq + 50).map(|s| result(&a.id, s)).collect();
                seq += 50;
                if a.tx
                    .send(up(agent_message::Msg::Batch(pb::ResultBatch { results })))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            a
        }));
    }
    let mut good = Agent::connect(c.addr, "good-1", "us-east").await;
    assert_eq!(good.welcome().await, 0);
    // Until the floods fill the writer's queue (sessions wait for write slots).
    use std::sync::atomic::Ordering::Relaxed;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while counters.write_slot_waits.load(Relaxed) < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the floods never filled the writer's queue"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = std::time::Instant::now();
    good.send_batch(1..=10).await;
    assert_eq!(good.ack().await, 10);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the good agent's batch waited {took:?} behind the floods"
    );
    for f in floods {
        f.abort();
    }
    c.shutdown().await.0.expect("clean shutdown");
}

/// Write slots are taken by batches, not by sessions: more connected agents than slots, all
/// idle, do not keep another agent's batch from being stored.
#[tokio::test]
async fn idle_sessions_hold_no_write_slot() {
    let c = Collector::start(|cfg| cfg.max_queued_batches = 2).await;
    let mut idle = Vec::new();
    for n in 0..5 {
        let mut a = Agent::connect(c.addr, &format!("idle-{n}"), "eu-west").await;
        assert_eq!(a.welcome().await, 0);
        idle.push(a);
    }
    let mut busy = Agent::connect(c.addr, "busy-1", "us-east").await;
    assert_eq!(busy.welcome().await, 0);
    for first in [1u64, 11, 21] {
        busy.send_batch(first..first + 10).await;
        assert_eq!(busy.ack().await, first + 9);
    }
    // The idle ones still get their turn.
    for a in &mut idle {
        a.send_batch(1..=3).await;
        assert_eq!(a.ack().await, 3);
    }
    c.shutdown().await.0.expect("clean shutdown");
}
