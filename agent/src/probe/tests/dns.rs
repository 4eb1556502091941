//! The hickory-backed `Resolver` against a fake authoritative DNS server on 127.0.0.1:0 (UDP):
//! answers with TTLs, and NXDOMAIN / nodata / SERVFAIL / REFUSED / silence classified by rcode.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, MX};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

use super::*;
use crate::probe::resolve::{DnsError, Resolve, Resolver, ResolverConfig};

/// The class of a failed lookup (panics on success: the test expected a failure).
fn class<T: std::fmt::Debug>(res: Result<T, DnsError>) -> ErrorClass {
    res.expect_err("lookup should fail").class
}

/// The fake zone's answer to one question.
fn answer(query: &Message) -> Option<Message> {
    let q = query.queries().first()?.clone();
    let name = q.name().to_ascii().to_ascii_lowercase();
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_authoritative(true)
        .set_recursion_available(true)
        .add_query(q.clone());
    let owner = q.name().clone();
    match (name.as_str(), q.query_type()) {
        ("example.test.", RecordType::MX) => {
            let exchange = Name::from_ascii("mx.example.test.").ok()?;
            m.add_answer(Record::from_rdata(
                owner,
                300,
                RData::MX(MX::new(10, exchange)),
            ));
        }
        ("mx.example.test.", RecordType::A) => {
            m.add_answer(Record::from_rdata(
                owner,
                60,
                RData::A(A(Ipv4Addr::LOCALHOST)),
            ));
        }
        ("example.test." | "mx.example.test.", _) => {}
        ("fail.test.", _) => {
            m.set_response_code(ResponseCode::ServFail);
        }
        ("refused.test.", _) => {
            m.set_response_code(ResponseCode::Refused);
        }
        ("silent.test.", _) => return None,
        _ => {
            m.set_response_code(ResponseCode::NXDomain);
        }
    }
    Some(m)
}

/// Serves the fake zone until the test ends.
async fn dns_server() -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = socket.local_addr().expect("local addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if let Some(reply) = answer(&query).and_then(|m| m.to_vec().ok()) {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
    });
    addr
}

async fn resolver() -> Resolver {
    let server = dns_server().await;
    Resolver::new(ResolverConfig {
        server: Some(server),
        timeout: Some(Duration::from_millis(300)),
    })
    .expect("resolver with explicit server")
}

#[tokio::test]
async fn answers_carry_records_and_ttls() {
    let r = resolver().await;
    let mx = r.mx("example.test").await.expect("mx answer");
    assert_eq!(mx.ttl, 300);
    assert_eq!(mx.records.len(), 1);
    assert_eq!(
        (mx.records[0].preference, mx.records[0].exchange.as_str()),
        (10, "mx.example.test")
    );
    let ips = r.ips("mx.example.test").await.expect("address answer");
    assert_eq!(
        ips.records,
        vec![std::net::IpAddr::from(Ipv4Addr::LOCALHOST)]
    );
    assert_eq!(ips.ttl, 60);
}

#[tokio::test]
async fn failures_classify_by_response_code() {
    let r = resolver().await;
    assert_eq!(class(r.mx("nx.test").await), ErrorClass::DnsNxdomain);
    assert_eq!(class(r.mx("mx.example.test").await), ErrorClass::DnsNodata);
    assert_eq!(class(r.mx("fail.test").await), ErrorClass::DnsServfail);
    assert_eq!(class(r.mx("refused.test").await), ErrorClass::DnsRefused);
    assert_eq!(class(r.ips("nx.test").await), ErrorClass::DnsNxdomain);
    let started = std::time::Instant::now();
    assert_eq!(class(r.mx("silent.test").await), ErrorClass::DnsTimeout);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // A name with no A/AAAA at all is an empty answer, not an error.
    assert!(r
        .ips("example.test")
        .await
        .expect("empty answer")
        .records
        .is_empty());
}

#[tokio::test]
async fn mx_check_through_real_resolver() {
    let ctx = ProbeContext {
        resolver: std::sync::Arc::new(resolver().await),
        ..context(FakeResolver::default())
    };
    let out = run_check(&spec("example.test", CheckKind::Mx, 0), &ctx).await;
    // The fake server has no reverse zone: only the missing PTR is reported (a warning).
    assert_eq!(out[0].outcome, Outcome::Warn, "{}", out[0].message);
    assert_eq!(out[0].error_class, Some(ErrorClass::Policy));
    assert!(out[0].message.contains("no PTR"), "{}", out[0].message);
    assert_eq!(int(&out[0], "mx.ttl"), 300);
    assert_eq!(text(&out[0], "mx.0.addrs"), "127.0.0.1");
    let out = run_check(&spec("nx.test", CheckKind::Smtp, 25), &ctx).await;
    assert_problem(
        &out[0],
        Outcome::Fail,
        ErrorClass::DnsNxdomain,
        Phase::Resolve,
    );
}
