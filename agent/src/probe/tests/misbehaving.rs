//! Misbehaving SMTP servers: each yields a classified failure in the right phase within the deadline.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::fakes::{log_lines, serve, smtp_server, Pki, SmtpScript, Validity};
use super::*;

/// The deadline these tests give a probe, and the slack allowed past it.
const DEADLINE: Duration = Duration::from_millis(1500);
const SLACK: Duration = Duration::from_millis(700);

fn smtp_spec(port: u16) -> CheckSpec {
    let mut s = spec("example.test", CheckKind::Smtp, port);
    s.timeout = DEADLINE;
    s
}

#[tokio::test]
async fn slow_banner_times_out_in_banner_phase() {
    let port = serve(|mut s| async move {
        // One byte per second, forever: every read succeeds, the reply never completes.
        for b in b"220 this banner takes a very long time to arrive\r\n"
            .iter()
            .cycle()
        {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
    .await;
    let (o, took) = run_one(
        &smtp_spec(port),
        &context_with(rustls::RootCertStore::empty()),
    )
    .await;
    assert_problem(&o, Outcome::Fail, ErrorClass::Timeout, Phase::Banner);
    assert!(took < DEADLINE + SLACK, "took {took:?}");
    assert!(o.timing_of(Phase::Connect).is_some() && o.timing_of(Phase::Banner).is_some());
}

#[tokio::test]
async fn endless_multiline_reply_is_a_protocol_error() {
    let port = serve(|mut s| async move {
        loop {
            if s.write_all(b"220-still greeting you\r\n").await.is_err() {
                return;
            }
        }
    })
    .await;
    let (o, took) = run_one(
        &smtp_spec(port),
        &context_with(rustls::RootCertStore::empty()),
    )
    .await;
    assert_problem(&o, Outcome::Fail, ErrorClass::Protocol, Phase::Banner);
    assert!(o.message.contains("lines"), "{}", o.message);
    assert!(took < DEADLINE + SLACK, "took {took:?}");
}

#[tokio::test]
async fn garbage_greeting_is_a_protocol_error() {
    let port = serve(|mut s| async move {
        let _ = s
            .write_all(b"\x00\xff\xfeHTTP/1.1 400 Bad Request\r\n")
            .await;
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink).await;
    })
    .await;
    let (o, took) = run_one(
        &smtp_spec(port),
        &context_with(rustls::RootCertStore::empty()),
    )
    .await;
    assert_problem(&o, Outcome::Fail, ErrorClass::Protocol, Phase::Banner);
    assert!(took < DEADLINE + SLACK, "took {took:?}");
}

#[tokio::test]
async fn endless_line_without_newline_is_bounded() {
    let port = serve(|mut s| async move {
        let junk = [b'x'; 1024];
        while s.write_all(&junk).await.is_ok() {}
    })
    .await;
    let (o, took) = run_one(
        &smtp_spec(port),
        &context_with(rustls::RootCertStore::empty()),
    )
    .await;
    assert_problem(&o, Outcome::Fail, ErrorClass::Protocol, Phase::Banner);
    assert!(o.message.contains("longer than"), "{}", o.message);
    assert!(took < DEADLINE + SLACK, "took {took:?}");
}

#[tokio::test]
async fn tls_reset_mid_handshake_is_a_reset_in_tls_phase() {
    let port = serve(|mut s| async move {
        // Read the ClientHello, then abort the connection with a RST.
        let mut hello = [0u8; 16];
        let _ = s.read(&mut hello).await;
        // A zero linger sends the RST at once, so the drop does not block.
        #[allow(deprecated)]
        let _ = s.set_linger(Some(Duration::ZERO));
        drop(s);
    })
    .await;
    let mut sp = smtp_spec(port);
    sp.check = CheckKind::Smtps;
    let (o, took) = run_one(&sp, &context_with(rustls::RootCertStore::empty())).await;
    assert_problem(&o, Outcome::Fail, ErrorClass::Reset, Phase::Tls);
    assert!(o.timing_of(Phase::Tls).is_some());
    assert!(took < DEADLINE + SLACK, "took {took:?}");
}

#[tokio::test]
async fn reply_421_after_ehlo_fails_without_quit() {
    let (port, log) = smtp_server(SmtpScript {
        ehlo_reply: Some("421 4.3.2 System shutting down\r\n".to_string()),
        ..SmtpScript::default()
    })
    .await;
    let (o, took) = run_one(
        &smtp_spec(port),
        &context_with(rustls::RootCertStore::empty()),
    )
    .await;
    assert_problem(&o, Outcome::Fail, ErrorClass::Reply4xx, Phase::Ehlo);
    assert!(o.message.contains("421"), "{}", o.message);
    let sent = log_lines(&log);
    assert_eq!(
        sent,
        vec!["EHLO probe.mxscope.test"],
        "nothing after the 421"
    );
    assert!(took < DEADLINE + SLACK, "took {took:?}");
}

#[tokio::test]
async fn greylisting_reply_to_rcpt_is_a_warning() {
    let pki = Pki::new("mxscope test CA");
    let leaf = pki.leaf(MX, Validity::DaysLeft(90));
    let (port, log) = smtp_server(SmtpScript {
        extensions: vec!["PIPELINING".into()],
        tls: Some(leaf.server_config()),
        rcpt_reply: Some(
            "450 4.7.1 <rcpt@example.test>: Recipient address rejected: Greylisted\r\n".into(),
        ),
        ..SmtpScript::default()
    })
    .await;
    let mut sp = smtp_spec(port);
    sp.options.rcpt_to = Some("rcpt@example.test".into());
    sp.options.mail_from = Some("probe@mxscope.test".into());
    let (o, took) = run_one(&sp, &context_with(pki.roots())).await;
    assert_problem(&o, Outcome::Warn, ErrorClass::Greylisted, Phase::Rcpt);
    assert_eq!(int(&o, "smtp.rcpt.code"), 450);
    assert_eq!(text(&o, "smtp.rcpt.enhanced"), "4.7.1");
    assert_eq!(int(&o, "smtp.mail.code"), 250);
    assert_eq!(text(&o, "smtp.mail.enhanced"), "2.1.0");
    let sent = log_lines(&log);
    assert_eq!(
        sent,
        vec![
            "EHLO probe.mxscope.test",
            "STARTTLS",
            "<tls>",
            "EHLO probe.mxscope.test",
            "MAIL FROM:<probe@mxscope.test>",
            "RCPT TO:<rcpt@example.test>",
            "QUIT",
        ],
        "never DATA, always QUIT"
    );
    assert!(o.timing_of(Phase::Mail).is_some() && o.timing_of(Phase::Rcpt).is_some());
    assert!(took < DEADLINE + SLACK, "took {took:?}");
}

#[tokio::test]
async fn greeting_554_is_a_5xx_in_banner_phase() {
    let (port, log) = smtp_server(SmtpScript {
        banner: Some("554 5.7.1 go away\r\n".into()),
        ..SmtpScript::default()
    })
    .await;
    let (o, _) = run_one(
        &smtp_spec(port),
        &context_with(rustls::RootCertStore::empty()),
    )
    .await;
    assert_problem(&o, Outcome::Fail, ErrorClass::Reply5xx, Phase::Banner);
    assert_eq!(
        log_lines(&log),
        vec!["QUIT"],
        "only QUIT after a 554 greeting"
    );
}

#[tokio::test]
async fn no_starttls_warns_unless_required() {
    let (port, log) = smtp_server(SmtpScript::default()).await;
    let (o, _) = run_one(
        &smtp_spec(port),
        &context_with(rustls::RootCertStore::empty()),
    )
    .await;
    assert_problem(&o, Outcome::Warn, ErrorClass::NoStarttls, Phase::Ehlo);
    assert!(!flag(&o, "smtp.starttls"));
    assert_eq!(log_lines(&log), vec!["EHLO probe.mxscope.test", "QUIT"]);
    assert!(o.timing_of(Phase::Quit).is_some());

    let (port, _) = smtp_server(SmtpScript::default()).await;
    let mut sp = smtp_spec(port);
    sp.require_tls = true;
    let (o, _) = run_one(&sp, &context_with(rustls::RootCertStore::empty())).await;
    assert_problem(&o, Outcome::Fail, ErrorClass::NoStarttls, Phase::Ehlo);
}

#[tokio::test]
async fn a_server_that_answers_with_too_much_gets_a_result_cut_to_the_limits_not_lost() {
    use mxscope_proto::limits;
    // 200 EHLO keywords (within the dialogue's bounds): their list is a text fact far longer
    // than a fact may be.
    let extensions: Vec<String> = (0..200)
        .map(|i| format!("X-{}-{i} {}", "K".repeat(40), "v".repeat(20)))
        .collect();
    let (port, _log) = smtp_server(SmtpScript {
        banner: Some(format!("220 {}\r\n", "b".repeat(900))),
        extensions,
        ..SmtpScript::default()
    })
    .await;
    let (o, _) = run_one(
        &smtp_spec(port),
        &context_with(rustls::RootCertStore::empty()),
    )
    .await;
    assert!(flag(&o, "result.truncated"), "{:?}", o.facts.len());
    assert!(o.facts.len() <= limits::MAX_FACTS, "{}", o.facts.len());
    assert!(o.message.len() <= limits::MAX_MESSAGE_LEN);
    assert!(o
        .facts
        .iter()
        .all(|(k, v)| k.len() <= limits::MAX_FACT_KEY_LEN
            && !matches!(v, FactValue::Text(t) if t.len() > limits::MAX_FACT_TEXT_LEN)));
    assert!(o.timings.len() <= limits::MAX_TIMINGS);
    // The dialogue's verdict survives the cut.
    assert!(o.fact_of("smtp.banner_code").is_some(), "{:?}", o.facts);
}
