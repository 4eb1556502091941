//! Each lab service starts from its private config and answers like the real thing: Postfix
//! banner/EHLO/STARTTLS/implicit TLS, Dovecot greetings, nsd MX answers, certificate variants.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use mxscope_tests::binaries::system_tool;
use mxscope_tests::certs::TestCa;
use mxscope_tests::dovecot::{Dovecot, DovecotConfig};
use mxscope_tests::net::{read_greeting, unique_loopback};
use mxscope_tests::nsd::{MailZone, Nsd};
use mxscope_tests::postfix::{Postfix, PostfixConfig};
use mxscope_tests::{wait_until, Lab};

/// Runs `openssl s_client` against `addr` (optionally with `-starttls PROTO`), verifying the chain
/// against `ca` and the name `host`; returns the combined output.
fn s_client(
    addr: SocketAddr,
    starttls: Option<&str>,
    ca: &Path,
    host: &str,
    input: &str,
) -> String {
    let openssl = system_tool("openssl", "openssl").expect("openssl");
    let mut cmd = Command::new(openssl);
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        host,
    ])
    .args([
        "-verify_hostname",
        host,
        "-verify_return_error",
        "-ign_eof",
        "-CAfile",
    ])
    .arg(ca)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(proto) = starttls {
        cmd.args(["-starttls", proto]);
    }
    let mut child = cmd.spawn().expect("spawn openssl s_client");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().expect("openssl s_client output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn postfix_private_instance_offers_starttls_and_implicit_tls() {
    let lab = Lab::new("smoke-postfix").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let host = "mx1.smoke.test";
    let cert = ca.valid_for("mx1", host).expect("cert");
    let ip = unique_loopback();
    let pf = Postfix::start(&lab, "mx1", PostfixConfig::new(ip, host).cert(cert))
        .expect("start private postfix");

    let banner = read_greeting(pf.smtp_addr(), Duration::from_secs(5)).expect("banner");
    assert!(banner.starts_with("220 "), "banner: {banner}");
    assert!(banner.contains(host), "banner names the host: {banner}");

    let swaks = system_tool("swaks", "swaks").expect("swaks");
    for addr in [pf.smtp_addr(), pf.submission_addr()] {
        let out = Command::new(&swaks)
            .args(["--server", &addr.to_string(), "--quit-after", "EHLO"])
            .args(["--ehlo", "probe.smoke.test"])
            .output()
            .expect("run swaks");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("250-STARTTLS"),
            "EHLO on {addr} offers STARTTLS:\n{text}"
        );
    }

    let starttls = s_client(pf.smtp_addr(), Some("smtp"), ca.ca_file(), host, "QUIT\r\n");
    assert!(
        starttls.contains("Verify return code: 0 (ok)"),
        "{starttls}"
    );
    let smtps = pf.smtps_addr().expect("smtps port");
    let implicit = s_client(smtps, None, ca.ca_file(), host, "QUIT\r\n");
    assert!(
        implicit.contains("Verify return code: 0 (ok)"),
        "{implicit}"
    );
    assert!(implicit.contains("220 "), "greeting inside TLS: {implicit}");
}

#[test]
fn postfix_stop_leaves_no_master_behind() {
    let lab = Lab::new("smoke-postfix-stop").expect("lab");
    let mut pf = Postfix::start(
        &lab,
        "mx",
        PostfixConfig::new(unique_loopback(), "mx.stop.test"),
    )
    .expect("start private postfix");
    let pid = pf.master_pid().expect("master pid file");
    assert!(mxscope_tests::process::pid_alive(pid));
    pf.stop().expect("postfix stop");
    assert!(
        !mxscope_tests::process::pid_alive(pid),
        "master {pid} still running"
    );
}

#[test]
fn dovecot_private_instance_greets_on_all_ports() {
    let lab = Lab::new("smoke-dovecot").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let host = "imap.smoke.test";
    let cert = ca.valid_for("imap", host).expect("cert");
    let dv = Dovecot::start(
        &lab,
        "imap",
        DovecotConfig::new(unique_loopback()).cert(cert),
    )
    .expect("start private dovecot");

    let imap = read_greeting(dv.imap_addr(), Duration::from_secs(5)).expect("imap greeting");
    assert!(imap.starts_with("* OK"), "{imap}");
    assert!(imap.contains("STARTTLS"), "{imap}");
    let pop3 = read_greeting(dv.pop3_addr(), Duration::from_secs(5)).expect("pop3 greeting");
    assert!(pop3.starts_with("+OK"), "{pop3}");

    let imaps = s_client(
        dv.imaps_addr().expect("imaps"),
        None,
        ca.ca_file(),
        host,
        "a LOGOUT\r\n",
    );
    assert!(imaps.contains("Verify return code: 0 (ok)"), "{imaps}");
    assert!(imaps.contains("* OK"), "{imaps}");
    let pop3s = s_client(
        dv.pop3s_addr().expect("pop3s"),
        None,
        ca.ca_file(),
        host,
        "QUIT\r\n",
    );
    assert!(pop3s.contains("+OK"), "{pop3s}");
    let stls = s_client(
        dv.imap_addr(),
        Some("imap"),
        ca.ca_file(),
        host,
        "a LOGOUT\r\n",
    );
    assert!(stls.contains("Verify return code: 0 (ok)"), "{stls}");
    assert!(
        dv.lmtp_socket().exists(),
        "lmtp socket at {}",
        dv.lmtp_socket().display()
    );
}

#[test]
fn nsd_private_instance_answers_mx_and_a() {
    let lab = Lab::new("smoke-nsd").expect("lab");
    let a1 = unique_loopback();
    let a2 = unique_loopback();
    let zone = MailZone::new("example.test")
        .mx(10, "mx1", &[a1])
        .mx(20, "mx2", &[a2])
        .build();
    let nsd = Nsd::start(&lab, &[zone]).expect("start private nsd");
    let mx = nsd.query("example.test", "MX").expect("dig MX");
    assert!(mx.contains("10 mx1.example.test."), "{mx}");
    assert!(mx.contains("20 mx2.example.test."), "{mx}");
    let a = nsd.query("mx2.example.test", "A").expect("dig A");
    assert_eq!(a.trim(), a2.to_string());
}

#[test]
fn delivery_goes_through_postfix_lmtp_into_dovecot_maildir() {
    let lab = Lab::new("smoke-delivery").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let cert = ca.valid_for("mail", "mail.deliver.test").expect("cert");
    let ip = unique_loopback();
    let mut dcfg = DovecotConfig::new(ip).cert(cert.clone());
    dcfg.users = vec![("bob@deliver.test".into(), "bob-secret".into())];
    let dv = Dovecot::start(&lab, "mail", dcfg).expect("dovecot");
    let mut pcfg = PostfixConfig::new(ip, "mail.deliver.test").cert(cert);
    pcfg.lmtp = Some(("deliver.test".into(), dv.lmtp_socket()));
    pcfg.sasl_socket = Some(dv.auth_socket());
    let pf = Postfix::start(&lab, "mail", pcfg).expect("postfix");

    let swaks = system_tool("swaks", "swaks").expect("swaks");
    let out = Command::new(&swaks)
        .args(["--server", &pf.smtp_addr().to_string()])
        .args(["--from", "probe@mxscope.test", "--to", "bob@deliver.test"])
        .args(["--header", "Subject: mxscope lab delivery"])
        .output()
        .expect("run swaks");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "swaks failed:\n{text}");
    let new = dv.maildir("bob@deliver.test").join("new");
    wait_until("mail in bob's Maildir/new", Duration::from_secs(30), || {
        std::fs::read_dir(&new)
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\npostfix:\n{}\ndovecot:\n{}",
            pf.maillog_tail(),
            dv.log_tail()
        )
    });

    // Submission AUTH through Dovecot SASL, only after STARTTLS.
    let auth = Command::new(&swaks)
        .args(["--server", &pf.submission_addr().to_string(), "--tls"])
        .args(["--auth", "PLAIN", "--auth-user", "bob@deliver.test"])
        .args(["--auth-password", "bob-secret", "--quit-after", "AUTH"])
        .output()
        .expect("run swaks auth");
    let text = String::from_utf8_lossy(&auth.stdout);
    assert!(
        text.contains("235 "),
        "AUTH accepted:\n{text}\n{}",
        pf.maillog_tail()
    );
}

#[test]
fn certificates_valid_expired_and_wrong_name() {
    let lab = Lab::new("smoke-certs").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let host = "mx.certs.test";
    let openssl = system_tool("openssl", "openssl").expect("openssl");
    let verify = |cert: &Path| {
        let out = Command::new(&openssl)
            .args(["verify", "-verify_hostname", host, "-CAfile"])
            .arg(ca.ca_file())
            .arg(cert)
            .output()
            .expect("openssl verify");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let valid = ca.valid_for("valid", host).expect("valid");
    assert!(
        verify(&valid.cert).contains(": OK"),
        "{}",
        verify(&valid.cert)
    );
    let expired = ca.expired_for("expired", host).expect("expired");
    assert!(
        verify(&expired.cert).contains("expired"),
        "{}",
        verify(&expired.cert)
    );
    let wrong = ca.wrong_name_for("wrong", host).expect("wrong");
    assert!(
        verify(&wrong.cert).contains("hostname mismatch"),
        "{}",
        verify(&wrong.cert)
    );
}
