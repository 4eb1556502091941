//! The DNS policy checks (`spf`, `dmarc`, `dkim`, `tlsrpt`, `dnsbl`) through `run_check` with a
//! fake resolver: facts with numbers as numbers, outcomes and classes.

use super::*;

fn dns_spec(target: &str, check: CheckKind) -> CheckSpec {
    let mut s = spec(target, check, 0);
    s.port = None;
    s
}

fn mail() -> FakeResolver {
    FakeResolver::default()
        .mx("example.test", &[(10, "mx.example.test")])
        .ips("mx.example.test", &["127.0.0.2"])
}

async fn one(ctx: &ProbeContext, s: &CheckSpec) -> Observation {
    let mut out = run_check(s, ctx).await;
    assert_eq!(out.len(), 1, "{out:?}");
    out.remove(0)
}

#[tokio::test]
async fn spf_good_record_authorises_the_mx() {
    let ctx = context(mail().txt("example.test", &["v=spf1 mx -all"]));
    let o = one(&ctx, &dns_spec("example.test", CheckKind::Spf)).await;
    assert_eq!(o.outcome, Outcome::Ok, "{}", o.message);
    assert_eq!(o.fact_of("spf.lookups"), Some(&FactValue::Int(1)));
    assert_eq!(o.fact_of("spf.mx_unauthorised"), Some(&FactValue::Int(0)));
    assert_eq!(
        o.fact_of("spf.mx.127.0.0.2"),
        Some(&FactValue::Text("pass".into()))
    );
}

#[tokio::test]
async fn spf_reports_each_configured_outbound_address() {
    let ctx = context(mail().txt(
        "example.test",
        &["v=spf1 mx ip4:192.0.2.0/28 ~ip4:198.51.100.0/24 -all"],
    ));
    let mut s = dns_spec("example.test", CheckKind::Spf);
    s.options.spf_senders = vec![
        "192.0.2.5".parse().unwrap(),
        "198.51.100.7".parse().unwrap(),
        "203.0.113.1".parse().unwrap(),
    ];
    let o = one(&ctx, &s).await;
    let result = |ip: &str| o.fact_of(&format!("spf.sender.{ip}")).cloned();
    assert_eq!(result("192.0.2.5"), Some(FactValue::Text("pass".into())));
    assert_eq!(
        result("198.51.100.7"),
        Some(FactValue::Text("softfail".into()))
    );
    assert_eq!(result("203.0.113.1"), Some(FactValue::Text("fail".into())));
    assert_eq!(
        o.fact_of("spf.senders_unauthorised"),
        Some(&FactValue::Int(2))
    );
    assert_eq!(o.outcome, Outcome::Fail, "{}", o.message);
    assert!(
        o.message.contains("203.0.113.1 (fail by -all)"),
        "{}",
        o.message
    );
    // the MX address is still judged on its own
    assert_eq!(
        o.fact_of("spf.mx.127.0.0.2"),
        Some(&FactValue::Text("pass".into()))
    );
}

#[tokio::test]
async fn spf_two_records_plus_all_and_unauthorised_mx() {
    let ctx = context(mail().txt("example.test", &["v=spf1 -all", "v=spf1 +all"]));
    let o = one(&ctx, &dns_spec("example.test", CheckKind::Spf)).await;
    assert_eq!(o.outcome, Outcome::Fail);
    assert_eq!(o.error_class, Some(ErrorClass::Policy));
    assert_eq!(o.fact_of("spf.records"), Some(&FactValue::Int(2)));

    let ctx = context(mail().txt("example.test", &["v=spf1 +all"]));
    let o = one(&ctx, &dns_spec("example.test", CheckKind::Spf)).await;
    assert_eq!(o.outcome, Outcome::Fail);
    assert_eq!(o.fact_of("spf.plus_all"), Some(&FactValue::Flag(true)));

    let ctx = context(mail().txt("example.test", &["v=spf1 ip4:192.0.2.1 -all"]));
    let o = one(&ctx, &dns_spec("example.test", CheckKind::Spf)).await;
    assert_eq!(o.outcome, Outcome::Warn, "{}", o.message);
    assert_eq!(o.fact_of("spf.mx_unauthorised"), Some(&FactValue::Int(1)));
}

#[tokio::test]
async fn spf_lookup_limit_and_dns_failure() {
    let mut r = mail();
    let includes: Vec<String> = (0..11)
        .map(|i| format!("include:i{i}.example.test"))
        .collect();
    let top = format!("v=spf1 {} -all", includes.join(" "));
    r = r.txt("example.test", &[top.as_str()]);
    for i in 0..11 {
        r = r.txt(&format!("i{i}.example.test"), &["v=spf1 -all"]);
    }
    let o = one(&context(r), &dns_spec("example.test", CheckKind::Spf)).await;
    assert_eq!(o.outcome, Outcome::Fail);
    assert_eq!(o.fact_of("spf.lookups"), Some(&FactValue::Int(11)));
    assert!(o.message.contains("11 DNS lookups"), "{}", o.message);

    let r = mail().fail("example.test", ErrorClass::DnsServfail);
    let o = one(&context(r), &dns_spec("example.test", CheckKind::Spf)).await;
    assert_eq!(o.error_class, Some(ErrorClass::DnsServfail));
}

#[tokio::test]
async fn spf_dns_failure_inside_the_tree_is_reported_with_its_class() {
    let r = mail()
        .txt(
            "example.test",
            &["v=spf1 include:down.example.test mx -all"],
        )
        .fail("down.example.test", ErrorClass::DnsServfail);
    let o = one(&context(r), &dns_spec("example.test", CheckKind::Spf)).await;
    let issue =
        "dns query for down.example.test failed: dns_servfail for down.example.test: fake failure";
    assert_eq!(text(&o, "spf.issues"), issue);
    assert!(
        o.message.contains(&format!("SPF of example.test: {issue}")),
        "{}",
        o.message
    );
    // evaluation stops at the failing include: temperror for the MX address
    assert_eq!(text(&o, "spf.mx.127.0.0.2"), "temperror");
}

#[tokio::test]
async fn dmarc_grades_p_none_and_missing() {
    let r = mail().txt(
        "_dmarc.example.test",
        &["v=DMARC1; p=none; rua=mailto:d@example.test"],
    );
    let o = one(&context(r), &dns_spec("example.test", CheckKind::Dmarc)).await;
    assert_eq!(o.outcome, Outcome::Warn);
    assert_eq!(o.error_class, Some(ErrorClass::Policy));
    assert_eq!(o.fact_of("dmarc.p"), Some(&FactValue::Text("none".into())));
    assert_eq!(o.fact_of("dmarc.pct"), Some(&FactValue::Int(100)));

    let r = mail().txt(
        "_dmarc.example.test",
        &["v=DMARC1; p=reject; rua=mailto:d@example.test"],
    );
    let o = one(&context(r), &dns_spec("example.test", CheckKind::Dmarc)).await;
    assert_eq!(o.outcome, Outcome::Ok, "{}", o.message);

    let o = one(
        &context(mail()),
        &dns_spec("example.test", CheckKind::Dmarc),
    )
    .await;
    assert_eq!(o.outcome, Outcome::Fail);
}

#[tokio::test]
async fn dkim_short_and_revoked_keys() {
    // 512-bit RSA SubjectPublicKeyInfo.
    let short = "v=DKIM1; k=rsa; p=MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAL5sLbnSb7yAph9GyDadVxRYPYPGdH3fVrNCd7+kjpEoJ4+rsN0xpr2qubrNtstvmNCnYgzJVpxOHpe5dzGHJ+kCAwEAAQ==";
    let r = mail()
        .txt("s1._domainkey.example.test", &[short])
        .txt("old._domainkey.example.test", &["v=DKIM1; p="]);
    let mut s = dns_spec("example.test", CheckKind::Dkim);
    s.options.dkim_selectors = vec!["s1".into(), "old".into()];
    let o = one(&context(r), &s).await;
    assert_eq!(o.outcome, Outcome::Fail);
    assert_eq!(o.fact_of("dkim.s1.bits"), Some(&FactValue::Int(512)));
    assert_eq!(o.fact_of("dkim.old.revoked"), Some(&FactValue::Flag(true)));
}

#[tokio::test]
async fn tlsrpt_present_and_missing() {
    let r = mail().txt(
        "_smtp._tls.example.test",
        &["v=TLSRPTv1; rua=mailto:tls@example.test"],
    );
    let o = one(&context(r), &dns_spec("example.test", CheckKind::Tlsrpt)).await;
    assert_eq!(o.outcome, Outcome::Ok, "{}", o.message);
    assert_eq!(o.fact_of("tlsrpt.rua_count"), Some(&FactValue::Int(1)));
    let o = one(
        &context(mail()),
        &dns_spec("example.test", CheckKind::Tlsrpt),
    )
    .await;
    assert_eq!(o.outcome, Outcome::Fail);
}

#[tokio::test]
async fn dnsbl_listed_clean_and_list_error() {
    let r = mail()
        .ips("2.0.0.127.bl.example.test", &["127.0.0.2"])
        .txt("2.0.0.127.bl.example.test", &["listed for tests"])
        .ips("2.0.0.127.broken.example.test", &["127.255.255.254"]);
    let mut s = dns_spec("example.test", CheckKind::Dnsbl);
    s.options.dnsbl_zones = vec!["bl.example.test".into()];
    let o = one(&context(r.clone()), &s).await;
    assert_eq!(o.outcome, Outcome::Fail);
    assert_eq!(o.fact_of("dnsbl.listed"), Some(&FactValue::Int(1)));
    assert_eq!(
        o.fact_of("dnsbl.bl.example.test.127.0.0.2.reason"),
        Some(&FactValue::Text("listed for tests".into()))
    );

    s.options.dnsbl_zones = vec!["clean.example.test".into()];
    let o = one(&context(r.clone()), &s).await;
    assert_eq!(o.outcome, Outcome::Ok, "{}", o.message);
    assert_eq!(o.fact_of("dnsbl.listed"), Some(&FactValue::Int(0)));

    s.options.dnsbl_zones = vec!["broken.example.test".into()];
    let o = one(&context(r), &s).await;
    assert_eq!(o.outcome, Outcome::Warn);
    assert_eq!(o.fact_of("dnsbl.errors"), Some(&FactValue::Int(1)));
}
