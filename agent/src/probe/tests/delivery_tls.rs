//! The delivery check and probe credentials: a password is sent only over TLS whose certificate
//! verified for the server's name. Fake submission and IMAPS servers log every line they receive,
//! so a credential that reached one would show in its log.

use std::collections::BTreeMap;

use super::fakes::{imap_server, log_lines, smtp_server, Leaf, Log, Pki, SmtpScript, Validity};
use super::*;
use crate::credentials::Credentials;

/// A delivery spec for `example.test` whose submission and IMAPS ports are the fakes'.
fn delivery_spec(submission: u16, imaps: u16) -> CheckSpec {
    let mut s = spec("example.test", CheckKind::Delivery, submission);
    s.timeout = Duration::from_secs(5);
    s.options.credentials = Some("probe".into());
    s.options.service_ports = BTreeMap::from([
        (CheckKind::Submission, submission),
        (CheckKind::Imaps, imaps),
    ]);
    s
}

fn context_with_login(roots: rustls::RootCertStore) -> ProbeContext {
    let mut ctx = context_with(roots);
    ctx.credentials = Arc::new(
        Credentials::parse(
            "credentials.toml",
            "[probe]\nuser = \"probe@example.test\"\npassword = \"s3cret-never-sent\"\n",
        )
        .expect("credentials parse"),
    );
    ctx
}

/// A fake submission server offering AUTH over STARTTLS with `leaf`, accepting any message.
async fn submission_server(leaf: &Leaf) -> (u16, Log) {
    smtp_server(SmtpScript {
        extensions: vec!["AUTH PLAIN LOGIN".into()],
        tls: Some(leaf.server_config()),
        accept_mail: true,
        ..SmtpScript::default()
    })
    .await
}

/// True when any logged line carries the password, in clear or in an AUTH PLAIN token.
fn leaked(lines: &[String]) -> bool {
    use base64::Engine as _;
    let plain =
        base64::engine::general_purpose::STANDARD.encode("\0probe@example.test\0s3cret-never-sent");
    lines.iter().any(|l| {
        l.contains("s3cret") || l.contains(&plain) || l.to_ascii_uppercase().starts_with("AUTH")
    })
}

#[tokio::test]
async fn no_password_goes_to_a_submission_server_with_an_untrusted_certificate() {
    let trusted = Pki::new("mxscope test CA");
    let stranger = Pki::new("stranger CA");
    let leaf = stranger.leaf(MX, Validity::DaysLeft(90));
    let (submission, log) = submission_server(&leaf).await;
    let imaps = closed_port().await;
    let (o, _) = run_one(
        &delivery_spec(submission, imaps),
        &context_with_login(trusted.roots()),
    )
    .await;
    assert_problem(&o, Outcome::Fail, ErrorClass::CertUntrusted, Phase::Tls);
    assert!(!flag(&o, "cert.verified"));
    let sent = log_lines(&log);
    assert!(sent.contains(&"<tls>".to_string()), "{sent:?}");
    assert!(!leaked(&sent), "the server saw the credential: {sent:?}");
    assert!(o.fact_of("delivery.auth_mechanism").is_none());
}

#[tokio::test]
async fn no_password_goes_to_a_submission_server_whose_certificate_names_another_host() {
    let pki = Pki::new("mxscope test CA");
    let leaf = pki.leaf("other.example.test", Validity::DaysLeft(90));
    let (submission, log) = submission_server(&leaf).await;
    let imaps = closed_port().await;
    let (o, _) = run_one(
        &delivery_spec(submission, imaps),
        &context_with_login(pki.roots()),
    )
    .await;
    assert_problem(&o, Outcome::Fail, ErrorClass::CertName, Phase::Tls);
    let sent = log_lines(&log);
    assert!(!leaked(&sent), "the server saw the credential: {sent:?}");
}

#[tokio::test]
async fn no_login_goes_to_an_imaps_server_with_an_untrusted_certificate() {
    let trusted = Pki::new("mxscope test CA");
    let good = trusted.leaf(MX, Validity::DaysLeft(90));
    let (submission, smtp_log) = submission_server(&good).await;
    let stranger = Pki::new("stranger CA");
    let bad = stranger.leaf(MX, Validity::DaysLeft(90));
    let (imaps, imap_log) =
        imap_server("* OK fake IMAP ready\r\n", Some(bad.server_config()), true).await;
    let (o, _) = run_one(
        &delivery_spec(submission, imaps),
        &context_with_login(trusted.roots()),
    )
    .await;
    // Submission authenticated over its verified certificate and the message was accepted.
    let smtp_sent = log_lines(&smtp_log);
    assert!(
        smtp_sent.iter().any(|l| l.starts_with("AUTH PLAIN ")),
        "{smtp_sent:?}"
    );
    assert!(smtp_sent.contains(&".".to_string()), "{smtp_sent:?}");
    // The IMAPS server never saw the login.
    assert_problem(&o, Outcome::Fail, ErrorClass::CertUntrusted, Phase::Tls);
    assert!(o.message.starts_with("imaps: "), "{}", o.message);
    // The handshake happened (the probe judged the certificate), and the probe hung up after it.
    assert!(!flag(&o, "imap.cert.verified"), "{:?}", o.facts);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let imap_sent = log_lines(&imap_log);
    assert!(
        !imap_sent
            .iter()
            .any(|l| l.to_ascii_uppercase().contains("LOGIN") || l.contains("s3cret")),
        "the IMAPS server saw the login: {imap_sent:?}"
    );
}
