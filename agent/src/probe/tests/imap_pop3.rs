//! IMAP and POP3 dialogues on fake servers: STARTTLS/STLS, implicit TLS, refusing greetings.

use super::fakes::{imap_server, log_lines, pop3_server, Pki, Validity};
use super::*;

#[tokio::test]
async fn imap_starttls_dialogue_reports_capabilities() {
    let pki = Pki::new("mxscope test CA");
    let leaf = pki.leaf(MX, Validity::DaysLeft(90));
    let (port, log) = imap_server(
        "* OK fake IMAP ready\r\n",
        Some(leaf.server_config()),
        false,
    )
    .await;
    let (o, _) = run_one(
        &spec("example.test", CheckKind::Imap, port),
        &context_with(pki.roots()),
    )
    .await;
    assert_eq!(o.outcome, Outcome::Ok, "{} {:?}", o.message, o.facts);
    assert!(
        flag(&o, "imap.imap4rev1") && flag(&o, "imap.starttls") && flag(&o, "imap.logindisabled")
    );
    assert!(text(&o, "imap.tls.capabilities").contains("IMAP4REV2"));
    assert_eq!(text(&o, "imap.tls.auth"), "PLAIN");
    assert!(flag(&o, "cert.verified"));
    assert_eq!(
        log_lines(&log),
        vec![
            "a1 CAPABILITY",
            "a2 STARTTLS",
            "<tls>",
            "a3 CAPABILITY",
            "a9 LOGOUT"
        ]
    );
    for phase in [
        Phase::Greeting,
        Phase::Capability,
        Phase::Starttls,
        Phase::Tls,
        Phase::Quit,
    ] {
        assert!(o.timing_of(phase).is_some(), "timing of {phase}");
    }
}

#[tokio::test]
async fn imaps_with_expired_certificate_fails() {
    let pki = Pki::new("mxscope test CA");
    let leaf = pki.leaf(MX, Validity::Expired);
    let (port, _) = imap_server("* OK ready\r\n", Some(leaf.server_config()), true).await;
    let (o, _) = run_one(
        &spec("example.test", CheckKind::Imaps, port),
        &context_with(pki.roots()),
    )
    .await;
    assert_problem(&o, Outcome::Fail, ErrorClass::CertExpired, Phase::Tls);
    assert!(
        flag(&o, "imap.imap4rev1"),
        "dialogue still ran over the completed handshake"
    );
}

#[tokio::test]
async fn imap_bye_greeting_is_classified() {
    let (port, _) = imap_server("* BYE too many connections\r\n", None, false).await;
    let (o, _) = run_one(
        &spec("example.test", CheckKind::Imap, port),
        &context_with(rustls::RootCertStore::empty()),
    )
    .await;
    assert_problem(&o, Outcome::Fail, ErrorClass::Reply4xx, Phase::Greeting);
    assert!(text(&o, "imap.greeting").contains("BYE"));
}

#[tokio::test]
async fn imap_without_starttls_warns() {
    let (port, log) = imap_server("* OK ready\r\n", None, false).await;
    let (o, _) = run_one(
        &spec("example.test", CheckKind::Imap, port),
        &context_with(rustls::RootCertStore::empty()),
    )
    .await;
    assert_problem(&o, Outcome::Warn, ErrorClass::NoStarttls, Phase::Capability);
    assert_eq!(log_lines(&log), vec!["a1 CAPABILITY", "a9 LOGOUT"]);
}

#[tokio::test]
async fn pop3_stls_dialogue_reports_capabilities() {
    let pki = Pki::new("mxscope test CA");
    let leaf = pki.leaf(MX, Validity::DaysLeft(90));
    let (port, log) =
        pop3_server("+OK fake POP3 ready\r\n", Some(leaf.server_config()), false).await;
    let (o, _) = run_one(
        &spec("example.test", CheckKind::Pop3, port),
        &context_with(pki.roots()),
    )
    .await;
    assert_eq!(o.outcome, Outcome::Ok, "{} {:?}", o.message, o.facts);
    assert!(flag(&o, "pop3.stls") && !flag(&o, "pop3.user"));
    assert!(text(&o, "pop3.tls.capabilities").contains("USER"));
    assert_eq!(text(&o, "pop3.tls.sasl"), "PLAIN");
    assert_eq!(
        log_lines(&log),
        vec!["CAPA", "STLS", "<tls>", "CAPA", "QUIT"]
    );
}

#[tokio::test]
async fn pop3s_wrong_name_fails_and_err_greeting_is_classified() {
    let pki = Pki::new("mxscope test CA");
    let leaf = pki.leaf("other.example.test", Validity::DaysLeft(90));
    let (port, _) = pop3_server("+OK ready\r\n", Some(leaf.server_config()), true).await;
    let (o, _) = run_one(
        &spec("example.test", CheckKind::Pop3s, port),
        &context_with(pki.roots()),
    )
    .await;
    assert_problem(&o, Outcome::Fail, ErrorClass::CertName, Phase::Tls);

    let (port, _) = pop3_server("-ERR maintenance\r\n", None, false).await;
    let (o, _) = run_one(
        &spec("example.test", CheckKind::Pop3, port),
        &context_with(rustls::RootCertStore::empty()),
    )
    .await;
    assert_problem(&o, Outcome::Fail, ErrorClass::Reply5xx, Phase::Greeting);
}
