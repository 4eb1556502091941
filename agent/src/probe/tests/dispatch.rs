//! run_check dispatch: per-address expansion, DNS failures, refused ports, totals.

use super::*;

#[tokio::test]
async fn refused_port_is_classified_per_address() {
    let port = closed_port().await;
    let ctx = context(
        FakeResolver::default()
            .mx("example.test", &[(10, "mx.example.test")])
            .ips("mx.example.test", &["127.0.0.1"]),
    );
    let started = std::time::Instant::now();
    let out = run_check(&spec("example.test", CheckKind::Smtp, port), &ctx).await;
    assert_eq!(out.len(), 1);
    let o = &out[0];
    assert_eq!(o.outcome, Outcome::Fail);
    assert_eq!(o.error_class, Some(ErrorClass::Refused));
    assert_eq!(o.phase, Some(Phase::Connect));
    assert_eq!(
        o.endpoint.label(),
        format!("mx.example.test[127.0.0.1]:{port}")
    );
    assert!(o.timing_of(Phase::Connect).is_some());
    assert!(o.timing_of(Phase::Total).is_some());
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn dns_failure_is_one_failed_observation_in_resolve() {
    let ctx = context(FakeResolver::default().fail("nx.test", ErrorClass::DnsServfail));
    let out = run_check(&spec("nx.test", CheckKind::Imaps, 993), &ctx).await;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].error_class, Some(ErrorClass::DnsServfail));
    assert_eq!(out[0].phase, Some(Phase::Resolve));
    assert_eq!(out[0].interval, Duration::from_secs(30));
    assert!(out[0].timing_of(Phase::Total).is_some());
}

#[tokio::test]
async fn mx_check_runs_through_dispatch() {
    let ctx = context(
        FakeResolver::default()
            .mx("example.test", &[(10, "mx.example.test")])
            .ips("mx.example.test", &["127.0.0.1"])
            .ptr("127.0.0.1", &["mx.example.test"]),
    );
    let out = run_check(&spec("example.test", CheckKind::Mx, 0), &ctx).await;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].outcome, Outcome::Ok, "{}", out[0].message);
    assert!(out[0].timing_of(Phase::Total).is_some());
}

#[tokio::test]
async fn icmp_echo_to_loopback_or_says_not_permitted() {
    let ctx = context(FakeResolver::default());
    let mut s = spec("127.0.0.1", CheckKind::Icmp, 0);
    s.port = None;
    let out = run_check(&s, &ctx).await;
    assert_eq!(out.len(), 1);
    let o = &out[0];
    assert_eq!(o.endpoint.port, 0);
    match o.fact_of("icmp.permitted") {
        Some(FactValue::Flag(true)) => {
            assert_eq!(o.outcome, Outcome::Ok, "{}", o.message);
            assert_eq!(o.fact_of("icmp.received"), o.fact_of("icmp.sent"));
            assert_eq!(o.fact_of("icmp.loss"), Some(&FactValue::Float(0.0)));
            assert!(o.fact_of("icmp.rtt_avg_ms").is_some());
        }
        Some(FactValue::Flag(false)) => {
            assert_eq!(
                o.error_class,
                Some(ErrorClass::NotPermitted),
                "{}",
                o.message
            );
            assert_eq!(o.phase, Some(Phase::Echo));
            assert!(o.message.contains("ping_group_range"), "{}", o.message);
        }
        other => panic!("icmp.permitted missing: {other:?} {}", o.message),
    }
}

#[tokio::test]
async fn per_host_limit_serialises_connections_to_one_address() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let port = listener.local_addr().expect("local addr").port();
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n, p) = (now.clone(), peak.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (n, p) = (n.clone(), p.clone());
            tokio::spawn(async move {
                p.fetch_max(n.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                let mut s = BufReader::new(stream);
                let _ = s.get_mut().write_all(b"220 ok\r\n").await;
                let mut line = String::new();
                while s.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let quit = line.starts_with("QUIT");
                    let reply: &[u8] = if quit { b"221 bye\r\n" } else { b"250 hi\r\n" };
                    if quit {
                        // Leaving before the client can read the 221 and free its slot.
                        n.fetch_sub(1, Ordering::SeqCst);
                        let _ = s.get_mut().write_all(reply).await;
                        return;
                    }
                    let _ = s.get_mut().write_all(reply).await;
                    line.clear();
                }
                n.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    let mut ctx = context(
        FakeResolver::default()
            .mx(
                "example.test",
                &[(10, "a.example.test"), (20, "b.example.test")],
            )
            .ips("a.example.test", &["127.0.0.1"])
            .ips("b.example.test", &["127.0.0.1"]),
    );
    ctx.host_limits = HostLimits::new(1);
    let out = run_check(&spec("example.test", CheckKind::Smtp, port), &ctx).await;
    assert_eq!(out.len(), 2, "one observation per address");
    for o in &out {
        assert_eq!(o.error_class, Some(ErrorClass::NoStarttls), "{}", o.message);
        assert!(o.timing_of(Phase::Quit).is_some());
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        1,
        "never two connections at once"
    );
}
