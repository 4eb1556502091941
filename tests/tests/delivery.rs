//! Mail flow checks against a real Postfix: the `delivery` round trip (submission with Dovecot
//! SASL → LMTP → Dovecot Maildir → IMAPS) and its timeout, and the `queue` check on deferred mail.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mxscope_agent::credentials::Credentials;
use mxscope_agent::probe::{CheckSpec, ProbeContext, TargetKind};
use mxscope_proto::{CheckKind, ErrorClass, FactValue, Observation, Outcome, Phase};
use mxscope_tests::binaries::system_tool;
use mxscope_tests::certs::TestCa;
use mxscope_tests::dovecot::{Dovecot, DovecotConfig};
use mxscope_tests::net::{free_port, unique_loopback};
use mxscope_tests::nsd::{MailZone, Nsd};
use mxscope_tests::postfix::{Postfix, PostfixConfig};
use mxscope_tests::probes::{context, run_one, spec};
use mxscope_tests::process::run;
use mxscope_tests::wait::wait_for;
use mxscope_tests::{smtp_send, Lab};

const USER: &str = "probe@deliver.test";
const PASSWORD: &str = "pr0be-S3cret-never-shown";
const HOST: &str = "mail.deliver.test";

/// Postfix (submission with SASL from `auth`, LMTP to `lmtp`) and the DNS and probe context to
/// reach it; `imap` is the Dovecot whose IMAPS port the probe polls.
struct MailWorld {
    _nsd: Nsd,
    pf: Postfix,
    ctx: ProbeContext,
    spec: CheckSpec,
}

fn mail_world(
    lab: &Lab,
    ca: &TestCa,
    ip: std::net::Ipv4Addr,
    auth_and_imap: &Dovecot,
    lmtp: &Dovecot,
) -> MailWorld {
    let cert = ca.valid_for("postfix", HOST).expect("postfix cert");
    let mut pcfg = PostfixConfig::new(ip, HOST).cert(cert);
    pcfg.lmtp = Some(("deliver.test".into(), lmtp.lmtp_socket()));
    pcfg.sasl_socket = Some(auth_and_imap.auth_socket());
    let pf = Postfix::start(lab, "mail", pcfg).expect("postfix");
    let zone = MailZone::new("deliver.test").mx(10, "mail", &[ip]).build();
    let nsd = Nsd::start(lab, &[zone]).expect("nsd");
    let mut ctx = context(nsd.addr(), Some(ca.ca_file())).expect("probe context");
    let creds = format!("[probe]\nuser = \"{USER}\"\npassword = \"{PASSWORD}\"\n");
    ctx.credentials = Arc::new(Credentials::parse("creds.toml", &creds).expect("credentials"));
    let mut s = spec(HOST, CheckKind::Delivery);
    s.kind = TargetKind::Host;
    s.timeout = Duration::from_secs(30);
    s.options.credentials = Some("probe".into());
    s.options
        .service_ports
        .insert(CheckKind::Submission, pf.ports().submission);
    s.options.service_ports.insert(
        CheckKind::Imaps,
        auth_and_imap.ports().imaps.expect("imaps port"),
    );
    MailWorld {
        _nsd: nsd,
        pf,
        ctx,
        spec: s,
    }
}

fn dovecot(lab: &Lab, ca: &TestCa, ip: std::net::Ipv4Addr, name: &str) -> Dovecot {
    let cert = ca
        .valid_for(&format!("dovecot-{name}"), HOST)
        .expect("dovecot cert");
    let mut cfg = DovecotConfig::new(ip).cert(cert);
    cfg.users = vec![(USER.to_string(), PASSWORD.to_string())];
    Dovecot::start(lab, name, cfg).expect("dovecot")
}

fn text(o: &Observation, key: &str) -> String {
    match o.fact_of(key) {
        Some(FactValue::Text(t)) => t.clone(),
        other => panic!("fact {key} is {other:?} in {:?}", o.facts),
    }
}

/// Files in a Maildir's `new` and `cur` whose content mentions `needle`.
fn maildir_files_with(maildir: &Path, needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(dir) = std::fs::read_dir(maildir.join(sub)) else {
            continue;
        };
        for entry in dir.flatten() {
            let content = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if content.contains(needle) {
                out.push(entry.path().display().to_string());
            }
        }
    }
    out
}

/// Neither the context, the observation nor its wire form may show the password.
fn assert_no_secret(ctx: &ProbeContext, o: &Observation) {
    for shown in [
        format!("{ctx:?}"),
        format!("{o:?}"),
        format!("{:?}", o.clone().into_wire("agent", 1)),
    ] {
        assert!(!shown.contains(PASSWORD), "password leaked: {shown}");
    }
    assert!(format!("{ctx:?}").contains("***"), "{ctx:?}");
}

#[test]
fn delivery_round_trip_through_postfix_and_dovecot() {
    let lab = Lab::new("delivery-ok").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let ip = unique_loopback();
    let dv = dovecot(&lab, &ca, ip, "mail");
    let w = mail_world(&lab, &ca, ip, &dv, &dv);

    let o = run_one(&w.ctx, &w.spec).expect("one observation");
    let logs = || {
        format!(
            "postfix:\n{}\ndovecot:\n{}",
            w.pf.maillog_tail(),
            dv.log_tail()
        )
    };
    assert_eq!(
        o.outcome,
        Outcome::Ok,
        "{}: {:?}\n{}",
        o.message,
        o.facts,
        logs()
    );
    let took = o.timing_of(Phase::Delivery).expect("delivery timing");
    let total = o.timing_of(Phase::Total).expect("total timing");
    assert!(
        took > Duration::ZERO && took <= total,
        "{took:?} of {total:?}"
    );
    assert!(o.timing_of(Phase::Auth).is_some(), "{:?}", o.timings);
    assert!(o.timing_of(Phase::Tls).is_some(), "{:?}", o.timings);
    assert!(matches!(o.fact_of("delivery.submit_us"), Some(FactValue::Int(n)) if *n > 0));
    assert_eq!(text(&o, "delivery.auth_mechanism"), "PLAIN");
    assert!(
        text(&o, "delivery.last_smtp_reply").starts_with("250 "),
        "{:?}",
        o.facts
    );
    assert_eq!(
        o.fact_of("imap.deleted"),
        Some(&FactValue::Flag(true)),
        "{:?}",
        o.facts
    );
    assert_eq!(o.endpoint.port, w.pf.ports().submission);

    // Postfix really took this message (its Message-ID carries the tag) and delivered it...
    let tag = text(&o, "delivery.tag");
    let maillog = std::fs::read_to_string(w.pf.maillog_path()).unwrap_or_default();
    assert!(
        maillog.contains(&tag),
        "tag {tag} not in the maillog:\n{maillog}"
    );
    assert!(maillog.contains("status=sent"), "{maillog}");
    // ...and it is gone from the Maildir afterwards.
    let maildir = dv.maildir(USER);
    assert!(
        maildir.join("cur").is_dir() || maildir.join("new").is_dir(),
        "no Maildir at {}",
        maildir.display()
    );
    assert!(
        maildir_files_with(&maildir, &tag).is_empty(),
        "probe message left behind"
    );
    assert_no_secret(&w.ctx, &o);
}

#[test]
fn delivery_times_out_when_dovecot_lmtp_is_stopped() {
    let lab = Lab::new("delivery-timeout").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let ip = unique_loopback();
    // One Dovecot for SASL and IMAPS, another for LMTP delivery; the latter is stopped, so the
    // message is accepted on submission but never reaches the mailbox the probe polls.
    let front = dovecot(&lab, &ca, ip, "front");
    let mut back = dovecot(&lab, &ca, ip, "back");
    let mut w = mail_world(&lab, &ca, ip, &front, &back);
    let pid = back.proc_mut().pid().expect("dovecot pid");
    back.proc_mut()
        .terminate(Duration::from_secs(10))
        .expect("stop the lmtp dovecot");
    assert!(
        !mxscope_tests::process::pid_alive(pid),
        "dovecot {pid} still running"
    );
    w.spec.timeout = Duration::from_secs(8);

    let o = run_one(&w.ctx, &w.spec).expect("one observation");
    assert_eq!(
        (o.outcome, o.error_class, o.phase),
        (
            Outcome::Fail,
            Some(ErrorClass::Timeout),
            Some(Phase::Delivery)
        ),
        "{}: {:?}\npostfix:\n{}",
        o.message,
        o.facts,
        w.pf.maillog_tail()
    );
    assert!(o.message.contains("did not arrive"), "{}", o.message);
    assert!(o.message.contains("last SMTP reply: 250 "), "{}", o.message);
    assert!(o.message.contains("queued as"), "{}", o.message);
    assert!(text(&o, "delivery.last_smtp_reply").contains("queued as"));
    assert!(o.timing_of(Phase::Delivery).is_none());
    assert!(
        matches!(o.fact_of("imap.polls"), Some(FactValue::Int(n)) if *n > 1),
        "{:?}",
        o.facts
    );
    // The message is stuck in Postfix: LMTP to the stopped Dovecot fails.
    let maillog = wait_for(
        "postfix to defer the lmtp delivery",
        Duration::from_secs(20),
        || {
            let log = std::fs::read_to_string(w.pf.maillog_path()).unwrap_or_default();
            Ok(log.contains("status=deferred").then_some(log))
        },
    )
    .expect("deferred in the maillog");
    assert!(maillog.contains(&text(&o, "delivery.tag")), "{maillog}");
    assert_no_secret(&w.ctx, &o);
}

#[test]
fn delivery_without_a_login_fails_before_connecting() {
    let ctx = context("127.0.0.1:9".parse().expect("addr"), None).expect("context");
    let mut s = spec("mail.nowhere.test", CheckKind::Delivery);
    s.options.credentials = Some("missing".into());
    let o = run_one(&ctx, &s).expect("one observation");
    assert_eq!(
        (o.outcome, o.error_class),
        (Outcome::Fail, Some(ErrorClass::Policy))
    );
    assert!(
        o.message.contains("no login named 'missing'"),
        "{}",
        o.message
    );
}

#[test]
fn queue_reports_deferred_mail_for_an_unreachable_domain() {
    let lab = Lab::new("queue").expect("lab");
    let ip = unique_loopback();
    let pf = Postfix::start(&lab, "q", PostfixConfig::new(ip, "mx.queue.test")).expect("postfix");
    // Everything relays to a loopback port nobody listens on: deliveries are deferred.
    let closed = free_port(ip).expect("free port");
    let dir = pf.config_dir().to_str().expect("utf-8 path").to_string();
    let postconf = system_tool("postconf", "postfix").expect("postconf");
    run(
        &postconf,
        &["-c", &dir, "-e", &format!("relayhost = [{ip}]:{closed}")],
    )
    .expect("postconf");
    let postfix = system_tool("postfix", "postfix").expect("postfix");
    run(&postfix, &["-c", &dir, "reload"]).expect("postfix reload");
    for n in 0..2 {
        smtp_send::send(
            pf.smtp_addr(),
            "probe@queue.test",
            &format!("user{n}@unreachable.test"),
            &format!("Subject: queued {n}\n\nhello\n"),
        )
        .expect("submit test mail");
    }

    // No DNS is needed: the queue check only runs postqueue.
    let ctx = context("127.0.0.1:9".parse().expect("addr"), None).expect("context");
    let mut s = spec("mx.queue.test", CheckKind::Queue);
    s.options.postfix_config_dir = Some(dir.clone());
    let o = wait_for(
        "two deferred messages in postqueue -j",
        Duration::from_secs(60),
        || {
            let o = run_one(&ctx, &s)?;
            Ok((o.fact_of("queue.deferred") == Some(&FactValue::Int(2))).then_some(o))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\nmaillog:\n{}", pf.maillog_tail()));
    assert_eq!(o.outcome, Outcome::Warn, "{}", o.message);
    assert_eq!(o.fact_of("queue.messages"), Some(&FactValue::Int(2)));
    assert_eq!(
        o.fact_of("queue.deferral.0.domain"),
        Some(&FactValue::Text("unreachable.test".into()))
    );
    assert_eq!(
        o.fact_of("queue.deferral.0.count"),
        Some(&FactValue::Int(2))
    );
    match o.fact_of("queue.deferral.0.reason") {
        Some(FactValue::Text(r)) => assert!(r.contains("refused"), "{r}"),
        other => panic!("no reason: {other:?}"),
    }
    assert!(matches!(
        o.fact_of("queue.oldest_age_s"),
        Some(FactValue::Int(_))
    ));
    assert!(o.message.contains("unreachable.test"), "{}", o.message);
}
