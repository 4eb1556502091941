//! Mail flow checks against a real Postfix: the `queue` check reading `postqueue -j` of a private
//! instance that holds deferred mail for an unreachable domain.

use std::time::Duration;

use mxscope_proto::{CheckKind, FactValue, Outcome};
use mxscope_tests::binaries::system_tool;
use mxscope_tests::net::{free_port, unique_loopback};
use mxscope_tests::postfix::{Postfix, PostfixConfig};
use mxscope_tests::probes::{context, run_one, spec};
use mxscope_tests::process::run;
use mxscope_tests::wait::wait_for;
use mxscope_tests::{smtp_send, Lab};

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
