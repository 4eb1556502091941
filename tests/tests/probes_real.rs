//! The mail protocol probes (`run_check`) against real Postfix and Dovecot from Debian packages,
//! found through MX records in a real nsd: smtp/submission (STARTTLS), smtps, imap/pop3
//! (STARTTLS/STLS), imaps/pop3s, with certificates from a test CA that is valid, expired, issued
//! for another name or not trusted at all; missing STARTTLS, AUTH before TLS, a RCPT TO test
//! and a stopped server. Every phase, fact and error class the probes promise is asserted.

use std::net::Ipv4Addr;
use std::time::Duration;

use mxscope_agent::probe::{CheckSpec, ProbeContext};
use mxscope_proto::{CheckKind, ErrorClass, FactValue, Observation, Outcome, Phase};
use mxscope_tests::certs::{CertFiles, TestCa};
use mxscope_tests::dovecot::{Dovecot, DovecotConfig};
use mxscope_tests::net::unique_loopback;
use mxscope_tests::nsd::{MailZone, Nsd};
use mxscope_tests::postfix::{Postfix, PostfixConfig};
use mxscope_tests::probes::{context, run, spec};
use mxscope_tests::{wait_until, Lab};

/// Deadline of every probe run; each observation must end within it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// The agent's safety net past a probe's deadline.
const GRACE: Duration = Duration::from_millis(500);

/// The SMTP dialogue of a STARTTLS port, in order.
const SMTP_STARTTLS_PHASES: &[Phase] = &[
    Phase::Resolve,
    Phase::Connect,
    Phase::Banner,
    Phase::Ehlo,
    Phase::Starttls,
    Phase::Tls,
    Phase::Quit,
    Phase::Total,
];
/// Implicit TLS: the handshake comes before the banner, there is no STARTTLS.
const SMTPS_PHASES: &[Phase] = &[
    Phase::Resolve,
    Phase::Connect,
    Phase::Tls,
    Phase::Banner,
    Phase::Ehlo,
    Phase::Quit,
    Phase::Total,
];
/// IMAP and POP3 with STARTTLS/STLS (LOGOUT and QUIT are timed as `quit`).
const MAILBOX_STARTTLS_PHASES: &[Phase] = &[
    Phase::Resolve,
    Phase::Connect,
    Phase::Greeting,
    Phase::Capability,
    Phase::Starttls,
    Phase::Tls,
    Phase::Quit,
    Phase::Total,
];
const MAILBOX_IMPLICIT_PHASES: &[Phase] = &[
    Phase::Resolve,
    Phase::Connect,
    Phase::Tls,
    Phase::Greeting,
    Phase::Capability,
    Phase::Quit,
    Phase::Total,
];

// ---- probing and reading observations ------------------------------------------------------

/// Runs `check` on `domain` (MX-expanded through nsd) at `port`, after `tweak` adjusts the spec.
/// Asserts exactly one observation (one MX with one address), labelled with that address and
/// family, that ended within its deadline.
fn probe(
    ctx: &ProbeContext,
    domain: &str,
    ip: Ipv4Addr,
    check: CheckKind,
    port: u16,
    tweak: impl FnOnce(&mut CheckSpec),
) -> Observation {
    let mut s = spec(domain, check);
    s.port = Some(port);
    s.timeout = PROBE_TIMEOUT;
    tweak(&mut s);
    let started = std::time::Instant::now();
    let mut out = run(ctx, &s).expect("run probe");
    let took = started.elapsed();
    assert_eq!(out.len(), 1, "{check} on {domain}: {out:#?}");
    let o = out.remove(0);
    assert!(
        took < PROBE_TIMEOUT + GRACE,
        "{check} on {domain} took {took:?}"
    );
    let total = o.timing_of(Phase::Total).expect("total timing");
    assert!(total < PROBE_TIMEOUT + GRACE, "{check}: total {total:?}");
    assert_eq!(o.check, check);
    assert_eq!(o.endpoint.ip, Some(ip.into()), "{o:#?}");
    assert_eq!(o.endpoint.port, port, "{o:#?}");
    assert_eq!(o.endpoint.host, format!("mx.{domain}"), "{o:#?}");
    assert_eq!(text(&o, "address.family"), "ipv4");
    assert_eq!(int(&o, "mx.preference"), 10);
    o
}

fn text(o: &Observation, key: &str) -> String {
    match o.fact_of(key) {
        Some(FactValue::Text(t)) => t.clone(),
        other => panic!("fact {key} is {other:?} in {o:#?}"),
    }
}

fn int(o: &Observation, key: &str) -> i64 {
    match o.fact_of(key) {
        Some(FactValue::Int(i)) => *i,
        other => panic!("fact {key} is {other:?} in {o:#?}"),
    }
}

fn flag(o: &Observation, key: &str) -> bool {
    match o.fact_of(key) {
        Some(FactValue::Flag(b)) => *b,
        other => panic!("fact {key} is {other:?} in {o:#?}"),
    }
}

/// The space-separated words of a text fact.
fn words(o: &Observation, key: &str) -> Vec<String> {
    text(o, key)
        .split_ascii_whitespace()
        .map(str::to_string)
        .collect()
}

fn assert_ok(o: &Observation) {
    assert_eq!(
        (o.outcome, o.error_class, o.phase),
        (Outcome::Ok, None, None),
        "{o:#?}"
    );
}

fn assert_problem(o: &Observation, outcome: Outcome, class: ErrorClass, phase: Phase) {
    assert_eq!(
        (o.outcome, o.error_class, o.phase),
        (outcome, Some(class), Some(phase)),
        "{o:#?}"
    );
    assert!(!o.message.is_empty(), "a problem says why: {o:#?}");
}

/// Exactly these phases were timed, in this order.
fn assert_phases(o: &Observation, phases: &[Phase]) {
    let got: Vec<Phase> = o.timings.iter().map(|(p, _)| *p).collect();
    assert_eq!(got, phases, "{o:#?}");
}

/// The TLS facts of a handshake with `host`'s server, whatever the certificate's verdict.
fn assert_tls_facts(o: &Observation, host: &str, implicit: bool) {
    assert_eq!(flag(o, "tls.implicit"), implicit, "{o:#?}");
    assert_eq!(text(o, "tls.sni"), host);
    assert_eq!(text(o, "tls.version"), "TLSv1.3", "{o:#?}");
    let cipher = text(o, "tls.cipher");
    assert!(cipher.starts_with("TLS13_"), "cipher {cipher}");
    // Mail servers negotiate no ALPN; the probe does not claim one.
    assert!(o.fact_of("tls.alpn").is_none(), "{o:#?}");
    assert!(
        text(o, "cert.issuer").contains("CN=mxscope test CA"),
        "{o:#?}"
    );
    let not_after = text(o, "cert.not_after");
    assert!(
        not_after.len() == 20 && not_after.ends_with('Z') && not_after.as_bytes()[10] == b'T',
        "RFC 3339 not_after: {not_after}"
    );
    let unix = int(o, "cert.not_after_unix");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    assert_eq!(int(o, "cert.days_left"), (unix - now).div_euclid(86_400));
}

/// A certificate from the test CA, valid for `host` for 90 days, accepted on every count.
fn assert_good_cert(o: &Observation, host: &str, implicit: bool) {
    assert_tls_facts(o, host, implicit);
    assert_eq!(text(o, "cert.subject"), format!("CN={host}"));
    assert!(flag(o, "cert.verified"), "{o:#?}");
    assert!(flag(o, "cert.name_match"), "{o:#?}");
    let days = int(o, "cert.days_left");
    assert!((88..=90).contains(&days), "days_left {days}");
    assert!(o.fact_of("cert.error").is_none(), "{o:#?}");
}

// ---- the servers ---------------------------------------------------------------------------

/// Postfix and Dovecot on one loopback address with one certificate, reached as
/// `mx.<domain>` through nsd. Servers are declared before the lab so they stop first.
struct MailHost {
    domain: String,
    host: String,
    ip: Ipv4Addr,
    pf: Postfix,
    dv: Dovecot,
}

impl MailHost {
    /// Starts Dovecot (imap, pop3 and with a certificate imaps, pop3s, plus SASL for Postfix) and
    /// Postfix (smtp, submission with Dovecot SASL and with a certificate smtps) for `domain`.
    fn start(
        lab: &Lab,
        domain: &str,
        cert: Option<CertFiles>,
        tweak: impl FnOnce(&mut PostfixConfig),
    ) -> MailHost {
        let host = format!("mx.{domain}");
        let ip = unique_loopback();
        let mut dcfg = DovecotConfig::new(ip);
        dcfg.cert = cert.clone();
        let dv = Dovecot::start(lab, domain, dcfg).expect("start dovecot");
        let mut pcfg = PostfixConfig::new(ip, &host);
        pcfg.cert = cert;
        pcfg.sasl_socket = Some(dv.auth_socket());
        tweak(&mut pcfg);
        let pf = Postfix::start(lab, domain, pcfg).expect("start postfix");
        MailHost {
            domain: domain.to_string(),
            host,
            ip,
            pf,
            dv,
        }
    }

    fn zone(&self) -> mxscope_tests::nsd::Zone {
        MailZone::new(&self.domain).mx(10, "mx", &[self.ip]).build()
    }

    /// The port of each mail check on this host.
    fn port(&self, check: CheckKind) -> u16 {
        let pf = self.pf.ports();
        let dv = self.dv.ports();
        match check {
            CheckKind::Smtp => pf.smtp,
            CheckKind::Submission => pf.submission,
            CheckKind::Smtps => pf.smtps.expect("smtps port (postfix has a certificate)"),
            CheckKind::Imap => dv.imap,
            CheckKind::Pop3 => dv.pop3,
            CheckKind::Imaps => dv.imaps.expect("imaps port (dovecot has a certificate)"),
            CheckKind::Pop3s => dv.pop3s.expect("pop3s port (dovecot has a certificate)"),
            other => panic!("no port for {other}"),
        }
    }

    fn probe(&self, ctx: &ProbeContext, check: CheckKind) -> Observation {
        self.probe_with(ctx, check, |_| {})
    }

    fn probe_with(
        &self,
        ctx: &ProbeContext,
        check: CheckKind,
        tweak: impl FnOnce(&mut CheckSpec),
    ) -> Observation {
        probe(ctx, &self.domain, self.ip, check, self.port(check), tweak)
    }
}

/// Every mail check with TLS (STARTTLS where it is not implicit).
const TLS_CHECKS: [CheckKind; 7] = [
    CheckKind::Smtp,
    CheckKind::Submission,
    CheckKind::Smtps,
    CheckKind::Imap,
    CheckKind::Imaps,
    CheckKind::Pop3,
    CheckKind::Pop3s,
];

/// The phases of a complete dialogue of `check`.
fn full_phases(check: CheckKind) -> &'static [Phase] {
    match check {
        CheckKind::Smtp | CheckKind::Submission => SMTP_STARTTLS_PHASES,
        CheckKind::Smtps => SMTPS_PHASES,
        CheckKind::Imap | CheckKind::Pop3 => MAILBOX_STARTTLS_PHASES,
        _ => MAILBOX_IMPLICIT_PHASES,
    }
}

fn implicit_tls(check: CheckKind) -> bool {
    matches!(
        check,
        CheckKind::Smtps | CheckKind::Imaps | CheckKind::Pop3s
    )
}

// ---- tests ---------------------------------------------------------------------------------

#[test]
fn smtp_submission_and_smtps_with_a_valid_certificate() {
    let lab = Lab::new("probes-smtp").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let cert = ca.valid_for("valid", "mx.valid.test").expect("cert");
    let mx = MailHost::start(&lab, "valid.test", Some(cert), |p| {
        // Recipients Postfix knows, so an unknown one is refused at RCPT with 5.1.1, and two that
        // an access map answers with a temporary failure: greylisting and a full mailbox.
        p.extra_main_cf = vec![
            "virtual_mailbox_domains = valid.test".to_string(),
            "virtual_mailbox_maps = inline:{ alice@valid.test=alice/ }".to_string(),
            "smtpd_recipient_restrictions = check_recipient_access inline:{ \
             { grey@valid.test = 450 4.7.1 Greylisted, try again later }, \
             { full@valid.test = 450 4.2.2 Mailbox full } }"
                .to_string(),
        ];
    });
    let nsd = Nsd::start(&lab, &[mx.zone()]).expect("nsd");
    let ctx = context(nsd.addr(), Some(ca.ca_file())).expect("context");
    let host = mx.host.as_str();

    // Port 25: banner, EHLO extensions, STARTTLS, TLS, EHLO again, QUIT.
    let o = mx.probe(&ctx, CheckKind::Smtp);
    assert_ok(&o);
    assert_phases(&o, SMTP_STARTTLS_PHASES);
    assert_eq!(text(&o, "smtp.banner"), format!("{host} ESMTP mxscope-lab"));
    assert_eq!(int(&o, "smtp.banner_code"), 220);
    let ext = words(&o, "smtp.extensions");
    for kw in ["PIPELINING", "SIZE", "STARTTLS", "8BITMIME", "SMTPUTF8"] {
        assert!(ext.contains(&kw.to_string()), "{kw} missing from {ext:?}");
    }
    assert!(flag(&o, "smtp.starttls"));
    assert!(flag(&o, "smtp.pipelining"));
    assert!(flag(&o, "smtp.8bitmime"));
    assert!(flag(&o, "smtp.smtputf8"));
    // Postfix's default message_size_limit.
    assert_eq!(int(&o, "smtp.size"), 10_240_000);
    // The second EHLO ran over TLS: Postfix no longer offers STARTTLS there.
    let after = words(&o, "smtp.tls.extensions");
    assert!(after.contains(&"PIPELINING".to_string()), "{after:?}");
    assert!(!after.contains(&"STARTTLS".to_string()), "{after:?}");
    assert!(int(&o, "smtp.tls.ehlo_us") > 0);
    assert_good_cert(&o, host, false);

    // Submission: AUTH (Dovecot SASL) only after TLS.
    let o = mx.probe(&ctx, CheckKind::Submission);
    assert_ok(&o);
    assert_phases(&o, SMTP_STARTTLS_PHASES);
    assert!(!flag(&o, "smtp.auth_before_tls"));
    assert_eq!(text(&o, "smtp.auth"), "");
    assert!(flag(&o, "smtp.auth_after_tls"));
    let mechs = words(&o, "smtp.tls.auth");
    assert!(mechs.contains(&"PLAIN".to_string()), "{mechs:?}");
    assert_good_cert(&o, host, false);

    // Implicit TLS: handshake, then the banner.
    let o = mx.probe(&ctx, CheckKind::Smtps);
    assert_ok(&o);
    assert_phases(&o, SMTPS_PHASES);
    assert!(text(&o, "smtp.banner").starts_with(host));
    assert!(flag(&o, "smtp.auth_after_tls"));
    assert!(words(&o, "smtp.auth").contains(&"PLAIN".to_string()));
    assert_good_cert(&o, host, true);

    // Requiring TLS changes nothing when TLS is there.
    let o = mx.probe_with(&ctx, CheckKind::Smtp, |s| s.require_tls = true);
    assert_ok(&o);

    // A known recipient: MAIL and RCPT accepted, with their enhanced codes.
    let o = mx.probe_with(&ctx, CheckKind::Smtp, |s| {
        s.options.mail_from = Some("probe@mxscope.test".into());
        s.options.rcpt_to = Some("alice@valid.test".into());
    });
    assert_ok(&o);
    assert_phases(
        &o,
        &[
            Phase::Resolve,
            Phase::Connect,
            Phase::Banner,
            Phase::Ehlo,
            Phase::Starttls,
            Phase::Tls,
            Phase::Mail,
            Phase::Rcpt,
            Phase::Quit,
            Phase::Total,
        ],
    );
    assert_eq!(int(&o, "smtp.mail.code"), 250);
    assert_eq!(text(&o, "smtp.mail.enhanced"), "2.1.0");
    assert_eq!(int(&o, "smtp.rcpt.code"), 250);
    assert_eq!(text(&o, "smtp.rcpt.enhanced"), "2.1.5");

    // An unknown recipient: Postfix's reject_unlisted_recipient answers 550 5.1.1.
    let o = mx.probe_with(&ctx, CheckKind::Smtp, |s| {
        s.options.mail_from = Some("probe@mxscope.test".into());
        s.options.rcpt_to = Some("nobody@valid.test".into());
    });
    assert_problem(&o, Outcome::Fail, ErrorClass::Reply5xx, Phase::Rcpt);
    assert_eq!(int(&o, "smtp.rcpt.code"), 550);
    assert_eq!(text(&o, "smtp.rcpt.enhanced"), "5.1.1");
    assert!(
        text(&o, "smtp.rcpt.text").contains("User unknown"),
        "{o:#?}"
    );
    assert!(o.timing_of(Phase::Quit).is_some(), "QUIT after a rejection");

    // Postfix's own account of that session: RCPT refused, QUIT sent, never DATA.
    let maillog = mx.pf.maillog_path();
    let mut line = String::new();
    wait_until(
        "postfix to log the rejected-recipient session",
        Duration::from_secs(10),
        || {
            let log = std::fs::read_to_string(&maillog).unwrap_or_default();
            match log.lines().find(|l| l.contains("rcpt=0/1")) {
                Some(l) => {
                    line = l.to_string();
                    true
                }
                None => false,
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mx.pf.maillog_tail()));
    assert!(line.contains("disconnect from"), "{line}");
    assert!(line.contains("mail=1") && line.contains("quit=1"), "{line}");
    assert!(
        !line.contains("data="),
        "the probe never sends DATA: {line}"
    );
    // Polite: smtpd saw no command before its greeting or before a reply.
    let log = std::fs::read_to_string(&maillog).expect("postfix maillog");
    assert!(
        !log.contains("improper command pipelining"),
        "the probe talked out of turn:\n{log}"
    );

    // Greylisting at RCPT is recognised as such and is only a warning.
    let rcpt = |to: &str| {
        let to = to.to_string();
        mx.probe_with(&ctx, CheckKind::Smtp, move |s| {
            s.options.mail_from = Some("probe@mxscope.test".into());
            s.options.rcpt_to = Some(to);
        })
    };
    let o = rcpt("grey@valid.test");
    assert_problem(&o, Outcome::Warn, ErrorClass::Greylisted, Phase::Rcpt);
    assert_eq!(int(&o, "smtp.rcpt.code"), 450);
    assert_eq!(text(&o, "smtp.rcpt.enhanced"), "4.7.1");
    // Another temporary failure is a 4xx failure.
    let o = rcpt("full@valid.test");
    assert_problem(&o, Outcome::Fail, ErrorClass::Reply4xx, Phase::Rcpt);
    assert_eq!(int(&o, "smtp.rcpt.code"), 450);
    assert_eq!(text(&o, "smtp.rcpt.enhanced"), "4.2.2");

    // Days-left thresholds are the target's: the same 89-day certificate warns, then fails.
    let o = mx.probe_with(&ctx, CheckKind::Smtp, |s| s.options.cert_warn_days = 120);
    assert_problem(&o, Outcome::Warn, ErrorClass::CertExpiring, Phase::Tls);
    assert!(o.message.contains(&text(&o, "cert.not_after")), "{o:#?}");
    let o = mx.probe_with(&ctx, CheckKind::Submission, |s| {
        s.options.cert_warn_days = 200;
        s.options.cert_fail_days = 120;
    });
    assert_problem(&o, Outcome::Fail, ErrorClass::CertExpiring, Phase::Tls);
}

#[test]
fn submission_offering_auth_before_tls_is_a_warning() {
    let lab = Lab::new("probes-authplain").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let cert = ca.valid_for("lax", "mx.lax.test").expect("cert");
    let mx = MailHost::start(&lab, "lax.test", Some(cert), |p| p.auth_before_tls = true);
    let nsd = Nsd::start(&lab, &[mx.zone()]).expect("nsd");
    let ctx = context(nsd.addr(), Some(ca.ca_file())).expect("context");

    let o = mx.probe(&ctx, CheckKind::Submission);
    assert_problem(&o, Outcome::Warn, ErrorClass::Policy, Phase::Ehlo);
    assert!(o.message.contains("AUTH"), "{o:#?}");
    assert!(flag(&o, "smtp.auth_before_tls"));
    assert!(
        words(&o, "smtp.auth").contains(&"PLAIN".to_string()),
        "{o:#?}"
    );
    // The dialogue still went through TLS, which is fine.
    assert_phases(&o, SMTP_STARTTLS_PHASES);
    assert!(flag(&o, "smtp.auth_after_tls"));
    assert_good_cert(&o, &mx.host, false);
}

#[test]
fn imap_pop3_imaps_pop3s_with_a_valid_certificate() {
    let lab = Lab::new("probes-mailbox").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let cert = ca.valid_for("box", "mx.box.test").expect("cert");
    let mx = MailHost::start(&lab, "box.test", Some(cert), |_| {});
    let nsd = Nsd::start(&lab, &[mx.zone()]).expect("nsd");
    let ctx = context(nsd.addr(), Some(ca.ca_file())).expect("context");
    let host = mx.host.as_str();

    // IMAP: * OK → CAPABILITY (LOGINDISABLED in clear) → STARTTLS → TLS → CAPABILITY.
    let o = mx.probe(&ctx, CheckKind::Imap);
    assert_ok(&o);
    assert_phases(&o, MAILBOX_STARTTLS_PHASES);
    assert!(text(&o, "imap.greeting").starts_with("* OK"), "{o:#?}");
    assert!(flag(&o, "imap.imap4rev1"));
    assert!(flag(&o, "imap.starttls"));
    assert!(flag(&o, "imap.logindisabled"), "disable_plaintext_auth");
    assert!(!flag(&o, "imap.tls.logindisabled"));
    let caps = words(&o, "imap.tls.capabilities");
    assert!(caps.contains(&"IMAP4REV1".to_string()), "{caps:?}");
    assert!(!caps.contains(&"STARTTLS".to_string()), "{caps:?}");
    assert!(words(&o, "imap.tls.auth").contains(&"PLAIN".to_string()));
    assert!(int(&o, "imap.tls.capability_us") > 0);
    assert_good_cert(&o, host, false);

    // IMAPS: TLS first, then the greeting; login is allowed there.
    let o = mx.probe(&ctx, CheckKind::Imaps);
    assert_ok(&o);
    assert_phases(&o, MAILBOX_IMPLICIT_PHASES);
    assert!(text(&o, "imap.greeting").starts_with("* OK"), "{o:#?}");
    assert!(flag(&o, "imap.imap4rev1"));
    assert!(!flag(&o, "imap.logindisabled"));
    assert!(words(&o, "imap.auth").contains(&"PLAIN".to_string()));
    assert_good_cert(&o, host, true);

    // POP3: +OK → CAPA → STLS → TLS → CAPA.
    let o = mx.probe(&ctx, CheckKind::Pop3);
    assert_ok(&o);
    assert_phases(&o, MAILBOX_STARTTLS_PHASES);
    assert!(text(&o, "pop3.greeting").starts_with("+OK"), "{o:#?}");
    assert!(flag(&o, "pop3.capa"));
    assert!(flag(&o, "pop3.stls"));
    // disable_plaintext_auth: USER and SASL mechanisms only after TLS.
    assert!(!flag(&o, "pop3.user"));
    assert_eq!(text(&o, "pop3.sasl"), "");
    let caps = words(&o, "pop3.tls.capabilities");
    assert!(caps.contains(&"UIDL".to_string()), "{caps:?}");
    assert!(!caps.contains(&"STLS".to_string()), "{caps:?}");
    assert!(words(&o, "pop3.tls.sasl").contains(&"PLAIN".to_string()));
    assert!(flag(&o, "pop3.tls.user"));
    assert!(int(&o, "pop3.tls.capa_us") > 0);
    assert_good_cert(&o, host, false);

    // POP3S.
    let o = mx.probe(&ctx, CheckKind::Pop3s);
    assert_ok(&o);
    assert_phases(&o, MAILBOX_IMPLICIT_PHASES);
    assert!(text(&o, "pop3.greeting").starts_with("+OK"), "{o:#?}");
    assert!(words(&o, "pop3.sasl").contains(&"PLAIN".to_string()));
    assert_good_cert(&o, host, true);
}

#[test]
fn untrusted_certificate_warns_on_port_25_and_fails_on_client_ports() {
    let lab = Lab::new("probes-untrusted").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let cert = ca.valid_for("anon", "mx.anon.test").expect("cert");
    let mx = MailHost::start(&lab, "anon.test", Some(cert), |_| {});
    let nsd = Nsd::start(&lab, &[mx.zone()]).expect("nsd");
    // System roots only: the lab CA is unknown.
    let ctx = context(nsd.addr(), None).expect("context");

    for check in TLS_CHECKS {
        let o = mx.probe(&ctx, check);
        let outcome = if check == CheckKind::Smtp {
            Outcome::Warn
        } else {
            Outcome::Fail
        };
        assert_problem(&o, outcome, ErrorClass::CertUntrusted, Phase::Tls);
        // The facts are kept and the dialogue went on past the handshake.
        assert_phases(&o, full_phases(check));
        assert_tls_facts(&o, &mx.host, implicit_tls(check));
        assert!(!flag(&o, "cert.verified"), "{o:#?}");
        assert!(flag(&o, "cert.name_match"), "{o:#?}");
        assert_eq!(text(&o, "cert.error"), "cert_untrusted");
    }
    // Port 25 with TLS required: a failure too.
    let o = mx.probe_with(&ctx, CheckKind::Smtp, |s| s.require_tls = true);
    assert_problem(&o, Outcome::Fail, ErrorClass::CertUntrusted, Phase::Tls);
}

#[test]
fn expired_certificate_is_cert_expired_on_every_port() {
    let lab = Lab::new("probes-expired").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let cert = ca.expired_for("old", "mx.old.test").expect("cert");
    let mx = MailHost::start(&lab, "old.test", Some(cert), |_| {});
    let nsd = Nsd::start(&lab, &[mx.zone()]).expect("nsd");
    let ctx = context(nsd.addr(), Some(ca.ca_file())).expect("context");

    for check in TLS_CHECKS {
        let o = mx.probe(&ctx, check);
        assert_problem(&o, Outcome::Fail, ErrorClass::CertExpired, Phase::Tls);
        assert_phases(&o, full_phases(check));
        assert_tls_facts(&o, &mx.host, implicit_tls(check));
        let not_after = text(&o, "cert.not_after");
        assert!(o.message.contains(&not_after), "{o:#?}");
        // Issued to have expired 30 days ago.
        let days = int(&o, "cert.days_left");
        assert!((-31..=-30).contains(&days), "days_left {days}");
        assert!(!flag(&o, "cert.verified"));
        assert!(flag(&o, "cert.name_match"));
        assert_eq!(text(&o, "cert.error"), "cert_expired");
        assert_eq!(text(&o, "cert.subject"), "CN=mx.old.test");
    }
}

#[test]
fn wrong_name_warns_on_port_25_and_fails_on_client_ports() {
    let lab = Lab::new("probes-wrongname").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let cert = ca.wrong_name_for("other", "mx.other.test").expect("cert");
    let mx = MailHost::start(&lab, "other.test", Some(cert), |_| {});
    let nsd = Nsd::start(&lab, &[mx.zone()]).expect("nsd");
    let ctx = context(nsd.addr(), Some(ca.ca_file())).expect("context");

    for check in TLS_CHECKS {
        let o = mx.probe(&ctx, check);
        let outcome = if check == CheckKind::Smtp {
            Outcome::Warn
        } else {
            Outcome::Fail
        };
        assert_problem(&o, outcome, ErrorClass::CertName, Phase::Tls);
        assert!(o.message.contains("mx.other.test"), "{o:#?}");
        assert_phases(&o, full_phases(check));
        assert_tls_facts(&o, &mx.host, implicit_tls(check));
        assert_eq!(text(&o, "cert.subject"), "CN=not-mx.other.test");
        assert!(!flag(&o, "cert.verified"));
        assert!(!flag(&o, "cert.name_match"));
        assert_eq!(text(&o, "cert.error"), "cert_name");
        let days = int(&o, "cert.days_left");
        assert!((88..=90).contains(&days), "days_left {days}");
    }
    let o = mx.probe_with(&ctx, CheckKind::Smtp, |s| s.require_tls = true);
    assert_problem(&o, Outcome::Fail, ErrorClass::CertName, Phase::Tls);
}

#[test]
fn missing_starttls_warns_unless_tls_is_required() {
    let lab = Lab::new("probes-plain").expect("lab");
    let mx = MailHost::start(&lab, "plain.test", None, |_| {});
    let nsd = Nsd::start(&lab, &[mx.zone()]).expect("nsd");
    let ctx = context(nsd.addr(), None).expect("context");

    for check in [CheckKind::Smtp, CheckKind::Submission] {
        let o = mx.probe(&ctx, check);
        assert_problem(&o, Outcome::Warn, ErrorClass::NoStarttls, Phase::Ehlo);
        assert_phases(
            &o,
            &[
                Phase::Resolve,
                Phase::Connect,
                Phase::Banner,
                Phase::Ehlo,
                Phase::Quit,
                Phase::Total,
            ],
        );
        assert!(!flag(&o, "smtp.starttls"));
        assert!(!words(&o, "smtp.extensions").contains(&"STARTTLS".to_string()));
        assert!(o.fact_of("tls.version").is_none(), "{o:#?}");
        let o = mx.probe_with(&ctx, check, |s| s.require_tls = true);
        assert_problem(&o, Outcome::Fail, ErrorClass::NoStarttls, Phase::Ehlo);
    }
    for (check, key) in [
        (CheckKind::Imap, "imap.starttls"),
        (CheckKind::Pop3, "pop3.stls"),
    ] {
        let o = mx.probe(&ctx, check);
        assert_problem(&o, Outcome::Warn, ErrorClass::NoStarttls, Phase::Capability);
        assert_phases(
            &o,
            &[
                Phase::Resolve,
                Phase::Connect,
                Phase::Greeting,
                Phase::Capability,
                Phase::Quit,
                Phase::Total,
            ],
        );
        assert!(!flag(&o, key), "{o:#?}");
        let o = mx.probe_with(&ctx, check, |s| s.require_tls = true);
        assert_problem(&o, Outcome::Fail, ErrorClass::NoStarttls, Phase::Capability);
    }
}

#[test]
fn stopped_server_is_refused_in_connect() {
    let lab = Lab::new("probes-stopped").expect("lab");
    let mut mx = MailHost::start(&lab, "gone.test", None, |_| {});
    let nsd = Nsd::start(&lab, &[mx.zone()]).expect("nsd");
    let ctx = context(nsd.addr(), None).expect("context");

    // Running: the banner arrives.
    let o = mx.probe(&ctx, CheckKind::Smtp);
    assert_eq!(int(&o, "smtp.banner_code"), 220);

    mx.pf.stop().expect("stop postfix");
    let o = mx.probe(&ctx, CheckKind::Smtp);
    assert_problem(&o, Outcome::Fail, ErrorClass::Refused, Phase::Connect);
    assert_phases(&o, &[Phase::Resolve, Phase::Connect, Phase::Total]);
    assert!(o.fact_of("smtp.banner").is_none(), "{o:#?}");
}
