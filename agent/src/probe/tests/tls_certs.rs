//! TLS and certificates on fake servers with rcgen-made certificates: facts, verdicts, and the
//! port 25 (warn) versus client port (fail) rule.

use super::fakes::{log_lines, smtp_server, Pki, SmtpScript, Validity};
use super::*;

async fn smtp_with(
    leaf: &super::fakes::Leaf,
    check: CheckKind,
    roots: rustls::RootCertStore,
) -> (Observation, Vec<String>) {
    let implicit = check == CheckKind::Smtps;
    let (port, log) = smtp_server(SmtpScript {
        extensions: vec![
            "PIPELINING".into(),
            "SIZE 10240000".into(),
            "AUTH PLAIN".into(),
        ],
        tls: Some(leaf.server_config()),
        implicit,
        ..SmtpScript::default()
    })
    .await;
    let (o, _) = run_one(&spec("example.test", check, port), &context_with(roots)).await;
    (o, log_lines(&log))
}

#[tokio::test]
async fn valid_certificate_over_starttls_is_ok_with_facts() {
    let pki = Pki::new("mxscope test CA");
    let leaf = pki.leaf(MX, Validity::DaysLeft(90));
    let (o, sent) = smtp_with(&leaf, CheckKind::Smtp, pki.roots()).await;
    assert_eq!(o.outcome, Outcome::Ok, "{} {:?}", o.message, o.facts);
    assert_eq!(
        sent,
        vec![
            "EHLO probe.mxscope.test",
            "STARTTLS",
            "<tls>",
            "EHLO probe.mxscope.test",
            "QUIT"
        ]
    );
    assert_eq!(text(&o, "tls.sni"), MX);
    assert_eq!(text(&o, "tls.version"), "TLSv1.3");
    assert!(text(&o, "tls.cipher").starts_with("TLS13_"));
    assert!(flag(&o, "cert.verified") && flag(&o, "cert.name_match"));
    assert!(text(&o, "cert.subject").contains(MX));
    assert!(text(&o, "cert.issuer").contains("mxscope test CA"));
    assert!(
        (89..=90).contains(&int(&o, "cert.days_left")),
        "{}",
        int(&o, "cert.days_left")
    );
    assert!(int(&o, "cert.not_after_unix") > 0);
    assert!(text(&o, "cert.not_after").ends_with('Z'));
    let digest = ring::digest::digest(&ring::digest::SHA256, &leaf.chain[0]);
    let want: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(want.len(), 64);
    assert_eq!(text(&o, "cert.sha256"), want);
    assert!(flag(&o, "smtp.starttls") && flag(&o, "smtp.pipelining"));
    assert_eq!(int(&o, "smtp.size"), 10_240_000);
    assert_eq!(text(&o, "smtp.auth"), "PLAIN");
    assert_eq!(text(&o, "smtp.banner"), "fake ESMTP");
    assert!(text(&o, "smtp.tls.extensions").contains("PIPELINING"));
    for phase in [
        Phase::Resolve,
        Phase::Connect,
        Phase::Banner,
        Phase::Ehlo,
        Phase::Starttls,
        Phase::Tls,
        Phase::Quit,
        Phase::Total,
    ] {
        assert!(o.timing_of(phase).is_some(), "timing of {phase}");
    }
}

#[tokio::test]
async fn expired_certificate_reports_cert_expired_with_its_date() {
    let pki = Pki::new("mxscope test CA");
    let leaf = pki.leaf(MX, Validity::Expired);
    let (o, _) = smtp_with(&leaf, CheckKind::Smtp, pki.roots()).await;
    assert_problem(&o, Outcome::Fail, ErrorClass::CertExpired, Phase::Tls);
    assert_eq!(text(&o, "cert.not_after"), "2021-01-01T00:00:00Z");
    assert!(o.message.contains("2021-01-01"), "{}", o.message);
    assert!(!flag(&o, "cert.verified"));
    assert!(int(&o, "cert.days_left") < 0);
}

#[tokio::test]
async fn wrong_name_warns_on_port_25_and_fails_on_submission() {
    let pki = Pki::new("mxscope test CA");
    let leaf = pki.leaf("other.example.test", Validity::DaysLeft(90));
    let (o, sent) = smtp_with(&leaf, CheckKind::Smtp, pki.roots()).await;
    assert_problem(&o, Outcome::Warn, ErrorClass::CertName, Phase::Tls);
    assert!(!flag(&o, "cert.name_match"));
    assert!(
        sent.contains(&"<tls>".to_string()),
        "the handshake completed: {sent:?}"
    );
    assert_eq!(sent.last().map(String::as_str), Some("QUIT"));

    let (o, _) = smtp_with(&leaf, CheckKind::Submission, pki.roots()).await;
    assert_eq!(o.outcome, Outcome::Fail, "{}", o.message);
    assert_eq!(o.error_class, Some(ErrorClass::CertName));
}

#[tokio::test]
async fn untrusted_warns_on_port_25_and_fails_on_smtps() {
    let stranger = Pki::new("stranger CA");
    let leaf = stranger.leaf(MX, Validity::DaysLeft(90));
    let trusted = Pki::new("mxscope test CA");
    let (o, _) = smtp_with(&leaf, CheckKind::Smtp, trusted.roots()).await;
    assert_problem(&o, Outcome::Warn, ErrorClass::CertUntrusted, Phase::Tls);
    assert!(flag(&o, "cert.name_match") && !flag(&o, "cert.verified"));

    let (o, _) = smtp_with(&leaf, CheckKind::Smtps, trusted.roots()).await;
    assert_problem(&o, Outcome::Fail, ErrorClass::CertUntrusted, Phase::Tls);
    assert!(flag(&o, "tls.implicit"));
    assert_eq!(
        text(&o, "smtp.banner"),
        "fake ESMTP",
        "greeting read after implicit TLS"
    );
}

#[tokio::test]
async fn expiring_certificate_follows_thresholds() {
    let pki = Pki::new("mxscope test CA");
    let leaf = pki.leaf(MX, Validity::DaysLeft(10));
    let (o, _) = smtp_with(&leaf, CheckKind::Smtp, pki.roots()).await;
    assert_problem(&o, Outcome::Warn, ErrorClass::CertExpiring, Phase::Tls);
    assert_eq!(int(&o, "cert.days_left"), 10);

    let leaf = pki.leaf(MX, Validity::DaysLeft(1));
    let (o, _) = smtp_with(&leaf, CheckKind::Smtps, pki.roots()).await;
    assert_problem(&o, Outcome::Fail, ErrorClass::CertExpiring, Phase::Tls);
}

#[tokio::test]
async fn submission_reports_auth_before_tls() {
    let pki = Pki::new("mxscope test CA");
    let leaf = pki.leaf(MX, Validity::DaysLeft(90));
    let (o, _) = smtp_with(&leaf, CheckKind::Submission, pki.roots()).await;
    assert_problem(&o, Outcome::Warn, ErrorClass::Policy, Phase::Ehlo);
    assert!(flag(&o, "smtp.auth_before_tls"));
    assert!(flag(&o, "smtp.auth_after_tls"));
}
