//! Policy checks against a real nsd serving good and broken records of each kind: SPF (too many
//! lookups, two records, +all), DMARC p=none, short/revoked DKIM keys, null MX, CNAME MX, PTR
//! mismatch (a 127.in-addr.arpa zone), a blocklist zone with a listed address, MTA-STS policies
//! served by a real nginx, and DANE TLSA records for a real Postfix's certificate.

use mxscope_proto::{CheckKind, ErrorClass, FactValue, Observation, Outcome};
use mxscope_tests::certs::TestCa;
use mxscope_tests::net::unique_loopback;
use mxscope_tests::nginx::{Nginx, Site};
use mxscope_tests::nsd::{MailZone, Nsd, Zone};
use mxscope_tests::probes::{context, run_one, spec};
use mxscope_tests::Lab;
use std::time::Duration;

/// 2048-bit RSA key (split into TXT strings of at most 255 bytes).
const DKIM_GOOD: &str = r#""v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAntnO0WqQfnLHzBbXwf+suwPRV6r2scOwTiffy5bhqA4g4H08G6od/BRIePcoklnau17EyVhPgxzUJhJpFv7ual+41+z1JuPsWmj+ZL19fSokuIIrjX9DHsPU1/dsFKWZGTTaow0koTBj/1Gdaltne9a6zdi7" "36XKMgO5ie3gesdyN7L/65ZhLA127DGGDoZFXHnHb+7m5sa5OIQY+Cg1IWtDw23OKNdTp/bl72IaLbQLXNOu9An/mOjrQg5s9pAUO+bC96dRFh9XUT1lX9r+DG3DWxkhHczPtAWjiGsnZBCghvWlyywmlitUCkOeVYGdQxTjFk+RFRub5pN1fvIblQIDAQAB""#;
/// 512-bit RSA key: verifiers reject it.
const DKIM_SHORT: &str = "MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAK1TgHIhY3as5/sA758AgBFEHwTKwV0VRdEzUqF8qDu0hUjNIEuWNDjIuVmFFZfi9yjXfmbYyeOLHYfg4+UDFQcCAwEAAQ==";

fn zones() -> Vec<Zone> {
    let includes: Vec<String> = (0..11)
        .map(|i| format!("include:i{i}.lookups.test"))
        .collect();
    let mut lookups = MailZone::new("lookups.test")
        .mx(10, "mx", &["127.0.0.2".parse().unwrap()])
        // Over 255 bytes: two character strings, which SPF joins without a space.
        .record(&format!(
            "@ IN TXT \"v=spf1 {} \" \"{} -all\"",
            includes[..6].join(" "),
            includes[6..].join(" ")
        ));
    for i in 0..11 {
        lookups = lookups.record(&format!("i{i} IN TXT \"v=spf1 ip4:192.0.2.{i} -all\""));
    }
    vec![
        MailZone::new("good.test")
            .mx(10, "mx", &["127.0.0.2".parse().unwrap()])
            .record("@ IN TXT \"v=spf1 mx -all\"")
            .record("_dmarc IN TXT \"v=DMARC1; p=reject; rua=mailto:dmarc@good.test\"")
            .record(&format!("s1._domainkey IN TXT {DKIM_GOOD}"))
            .record("_smtp._tls IN TXT \"v=TLSRPTv1; rua=mailto:tls@good.test\"")
            .build(),
        MailZone::new("bad.test")
            .mx(10, "mx", &["127.0.0.3".parse().unwrap()])
            .record("@ IN TXT \"v=spf1 mx -all\"")
            .record("@ IN TXT \"v=spf1 +all\"")
            .record("elsewhere IN A 127.0.0.9")
            .record("_dmarc IN TXT \"v=DMARC1; p=none\"")
            .record(&format!(
                "s1._domainkey IN TXT \"v=DKIM1; k=rsa; p={DKIM_SHORT}\""
            ))
            .record("old._domainkey IN TXT \"v=DKIM1; k=rsa; p=\"")
            .build(),
        MailZone::new("open.test")
            .mx(10, "mx", &["127.0.0.2".parse().unwrap()])
            .record("@ IN TXT \"v=spf1 +all\"")
            .build(),
        lookups.build(),
        MailZone::new("null.test").record("@ IN MX 0 .").build(),
        MailZone::new("alias.test")
            .record("@ IN MX 10 mail.alias.test.")
            .record("mail IN CNAME real.alias.test.")
            .record("real IN A 127.0.0.2")
            .build(),
        MailZone::new("bl.test")
            .record("2.0.0.127 IN A 127.0.0.2")
            .record("2.0.0.127 IN TXT \"listed for testing, see https://bl.test/127.0.0.2\"")
            .record("9.0.0.127 IN A 127.255.255.254")
            .build(),
        Zone {
            name: "0.0.127.in-addr.arpa".to_string(),
            text: "$ORIGIN 0.0.127.in-addr.arpa.\n$TTL 300\n\
                   @ IN SOA ns1.good.test. hostmaster.good.test. 1 3600 600 86400 300\n\
                   @ IN NS ns1.good.test.\n\
                   2 IN PTR mx.good.test.\n\
                   3 IN PTR elsewhere.bad.test.\n"
                .to_string(),
        },
    ]
}

struct World {
    _lab: Lab,
    nsd: Nsd,
}

fn world(name: &str) -> World {
    let lab = Lab::new(name).expect("lab");
    let nsd = Nsd::start(&lab, &zones()).expect("nsd with the policy zones");
    World { _lab: lab, nsd }
}

fn check(
    w: &World,
    target: &str,
    kind: CheckKind,
    f: impl FnOnce(&mut mxscope_agent::probe::CheckSpec),
) -> Observation {
    let ctx = context(w.nsd.addr(), None).expect("probe context");
    let mut s = spec(target, kind);
    f(&mut s);
    run_one(&ctx, &s).expect("one observation")
}

fn text(o: &Observation, key: &str) -> String {
    match o.fact_of(key) {
        Some(FactValue::Text(t)) => t.clone(),
        other => panic!("fact {key} is {other:?} in {:?}", o.facts),
    }
}

fn int(o: &Observation, key: &str) -> i64 {
    match o.fact_of(key) {
        Some(FactValue::Int(i)) => *i,
        other => panic!("fact {key} is {other:?} in {:?}", o.facts),
    }
}

fn flag(o: &Observation, key: &str) -> bool {
    match o.fact_of(key) {
        Some(FactValue::Flag(b)) => *b,
        other => panic!("fact {key} is {other:?} in {:?}", o.facts),
    }
}

fn assert_problem(o: &Observation, outcome: Outcome, class: ErrorClass, needle: &str) {
    assert_eq!(o.outcome, outcome, "{}: {:?}", o.message, o.facts);
    assert_eq!(o.error_class, Some(class), "{}", o.message);
    assert!(
        o.message.contains(needle),
        "message {:?} lacks {needle:?}",
        o.message
    );
}

#[test]
fn spf_against_real_dns() {
    let w = world("policy-spf");
    let o = check(&w, "good.test", CheckKind::Spf, |_| {});
    assert_eq!(o.outcome, Outcome::Ok, "{}", o.message);
    assert_eq!(int(&o, "spf.records"), 1);
    assert_eq!(int(&o, "spf.lookups"), 1);
    assert_eq!(text(&o, "spf.mx.127.0.0.2"), "pass");
    assert_eq!(int(&o, "spf.mx_unauthorised"), 0);

    let o = check(&w, "bad.test", CheckKind::Spf, |_| {});
    assert_problem(&o, Outcome::Fail, ErrorClass::Policy, "multiple");
    assert_eq!(int(&o, "spf.records"), 2);

    let o = check(&w, "lookups.test", CheckKind::Spf, |_| {});
    assert_problem(&o, Outcome::Fail, ErrorClass::Policy, "11 DNS lookups");
    assert_eq!(int(&o, "spf.lookups"), 11);
    assert_eq!(text(&o, "spf.mx.127.0.0.2"), "permerror");

    let o = check(&w, "open.test", CheckKind::Spf, |_| {});
    assert_problem(&o, Outcome::Fail, ErrorClass::Policy, "+all");
    assert!(flag(&o, "spf.plus_all"));

    let o = check(&w, "missing.test", CheckKind::Spf, |_| {});
    assert_eq!(o.outcome, Outcome::Fail, "{}", o.message);
}

#[test]
fn dmarc_dkim_and_tlsrpt_against_real_dns() {
    let w = world("policy-dmarc");
    let o = check(&w, "good.test", CheckKind::Dmarc, |_| {});
    assert_eq!(o.outcome, Outcome::Ok, "{}", o.message);
    assert_eq!(text(&o, "dmarc.p"), "reject");
    assert_eq!(int(&o, "dmarc.pct"), 100);
    assert_eq!(int(&o, "dmarc.rua_count"), 1);

    let o = check(&w, "bad.test", CheckKind::Dmarc, |_| {});
    assert_problem(&o, Outcome::Warn, ErrorClass::Policy, "p=none");
    assert_eq!(text(&o, "dmarc.p"), "none");

    let o = check(&w, "null.test", CheckKind::Dmarc, |_| {});
    assert_problem(&o, Outcome::Fail, ErrorClass::Policy, "no DMARC record");

    let o = check(&w, "good.test", CheckKind::Dkim, |s| {
        s.options.dkim_selectors = vec!["s1".into()]
    });
    assert_eq!(o.outcome, Outcome::Ok, "{}", o.message);
    assert_eq!(int(&o, "dkim.s1.bits"), 2048);

    let o = check(&w, "bad.test", CheckKind::Dkim, |s| {
        s.options.dkim_selectors = vec!["s1".into(), "old".into()]
    });
    assert_problem(&o, Outcome::Fail, ErrorClass::Policy, "DKIM selector");
    assert_eq!(int(&o, "dkim.s1.bits"), 512);
    assert!(flag(&o, "dkim.old.revoked"));
    assert!(text(&o, "dkim.s1.findings").contains("under 1024"));

    let o = check(&w, "good.test", CheckKind::Tlsrpt, |_| {});
    assert_eq!(o.outcome, Outcome::Ok, "{}", o.message);
    assert_eq!(text(&o, "tlsrpt.rua"), "mailto:tls@good.test");
    let o = check(&w, "bad.test", CheckKind::Tlsrpt, |_| {});
    assert_eq!(o.outcome, Outcome::Fail, "{}", o.message);
}

#[test]
fn mx_null_cname_and_reverse_dns_against_real_dns() {
    let w = world("policy-mx");
    let o = check(&w, "good.test", CheckKind::Mx, |_| {});
    assert_eq!(o.outcome, Outcome::Ok, "{}", o.message);
    assert!(flag(&o, "mx.0.fcrdns"));
    assert_eq!(text(&o, "mx.0.ptr"), "127.0.0.2=mx.good.test");

    let o = check(&w, "bad.test", CheckKind::Mx, |_| {});
    assert_problem(&o, Outcome::Warn, ErrorClass::Policy, "forward-confirmed");
    assert!(!flag(&o, "mx.0.fcrdns"));
    assert_eq!(text(&o, "mx.0.ptr"), "127.0.0.3=elsewhere.bad.test");

    let o = check(&w, "null.test", CheckKind::Mx, |_| {});
    assert_problem(&o, Outcome::Fail, ErrorClass::Policy, "accepts no mail");
    assert!(flag(&o, "mx.null"));

    let o = check(&w, "alias.test", CheckKind::Mx, |_| {});
    assert_problem(&o, Outcome::Warn, ErrorClass::Policy, "CNAME");
    assert_eq!(text(&o, "mx.0.cname"), "real.alias.test");
}

#[test]
fn dnsbl_against_a_real_blocklist_zone() {
    let w = world("policy-dnsbl");
    let o = check(&w, "good.test", CheckKind::Dnsbl, |s| {
        s.options.dnsbl_zones = vec!["bl.test".into()]
    });
    assert_problem(
        &o,
        Outcome::Fail,
        ErrorClass::Policy,
        "127.0.0.2 is listed in bl.test",
    );
    assert_eq!(int(&o, "dnsbl.listed"), 1);
    assert_eq!(text(&o, "dnsbl.bl.test.127.0.0.2"), "listed");
    assert_eq!(text(&o, "dnsbl.bl.test.127.0.0.2.codes"), "127.0.0.2");
    assert!(text(&o, "dnsbl.bl.test.127.0.0.2.reason").contains("listed for testing"));

    let o = check(&w, "bad.test", CheckKind::Dnsbl, |s| {
        s.options.dnsbl_zones = vec!["bl.test".into()]
    });
    assert_eq!(o.outcome, Outcome::Ok, "{}", o.message);
    assert_eq!(int(&o, "dnsbl.addresses"), 1);
    assert_eq!(text(&o, "dnsbl.bl.test.127.0.0.3"), "not_listed");
}

/// An MTA-STS policy for `mx` patterns in enforce mode.
fn sts_policy(mx: &[&str]) -> String {
    let mut p = "version: STSv1\r\nmode: enforce\r\n".to_string();
    for m in mx {
        p += &format!("mx: {m}\r\n");
    }
    p + "max_age: 604800\r\n"
}

#[test]
fn mta_sts_policy_served_by_a_real_nginx() {
    let lab = Lab::new("policy-mta-sts").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let web = unique_loopback();
    let site = |domain: &str, mx: &[&str]| {
        let host = format!("mta-sts.{domain}");
        let cert = ca.valid_for(&host, &host).expect("policy host cert");
        Site::new(&host, cert).file("/.well-known/mta-sts.txt", &sts_policy(mx))
    };
    let nginx = Nginx::start(
        &lab,
        "sts",
        web,
        &[
            // mx2 is missing from this policy.
            site("sts-bad.test", &["mx1.sts-bad.test"]),
            site(
                "sts-good.test",
                &["mx1.sts-good.test", "*.backup.sts-good.test"],
            ),
        ],
    )
    .expect("nginx");
    let zone = |domain: &str, second: &str| {
        MailZone::new(domain)
            .mx(10, "mx1", &["127.0.0.2".parse().unwrap()])
            .mx(20, second, &["127.0.0.3".parse().unwrap()])
            .record("_mta-sts IN TXT \"v=STSv1; id=20250301T000000\"")
            .record(&format!("mta-sts IN A {web}"))
            .build()
    };
    let nsd = Nsd::start(
        &lab,
        &[
            zone("sts-bad.test", "mx2"),
            zone("sts-good.test", "mx2.backup"),
        ],
    )
    .expect("nsd");
    let ctx = context(nsd.addr(), Some(ca.ca_file())).expect("probe context");
    let run = |domain: &str| {
        let mut s = spec(domain, CheckKind::MtaSts);
        s.options.mta_sts_port = nginx.addr().port();
        run_one(&ctx, &s).expect("one observation")
    };

    let o = run("sts-bad.test");
    assert_problem(&o, Outcome::Fail, ErrorClass::Policy, "mx2.sts-bad.test");
    assert!(o.message.contains("mode enforce"), "{}", o.message);
    assert_eq!(text(&o, "mta_sts.mx_uncovered"), "mx2.sts-bad.test");
    assert_eq!(text(&o, "mta_sts.mode"), "enforce");
    assert_eq!(text(&o, "mta_sts.id"), "20250301T000000");
    assert_eq!(int(&o, "mta_sts.max_age"), 604_800);
    assert_eq!(int(&o, "mta_sts.http_status"), 200);
    assert!(flag(&o, "cert.verified"));

    let o = run("sts-good.test");
    assert_eq!(o.outcome, Outcome::Ok, "{}: {:?}", o.message, o.facts);
    assert_eq!(
        text(&o, "mta_sts.mx"),
        "mx1.sts-good.test,*.backup.sts-good.test"
    );
    assert_eq!(text(&o, "mta_sts.mx_uncovered"), "");
    assert_eq!(text(&o, "mta_sts.content_type"), "text/plain");
    assert_eq!(o.endpoint.ip, Some(std::net::IpAddr::V4(web)));

    // Both policies really came from nginx (which logs a request after answering it).
    let fetched = |log: &str| log.matches("GET /.well-known/mta-sts.txt").count();
    let logged = mxscope_tests::wait::wait_until(
        "nginx logs both policy fetches",
        Duration::from_secs(5),
        || fetched(&nginx.access_log()) >= 2,
    );
    let log = nginx.access_log();
    assert!(logged.is_ok(), "{log}");
    assert_eq!(fetched(&log), 2, "{log}");
}

/// The hex digest `openssl dgst -r` prints for a shell pipeline ending in it.
fn openssl_hex(pipeline: &str) -> String {
    let sh = mxscope_tests::binaries::system_tool("sh", "dash").expect("sh");
    mxscope_tests::binaries::system_tool("openssl", "openssl").expect("openssl");
    let out = mxscope_tests::process::run(&sh, &["-c", pipeline]).expect("openssl pipeline");
    let hex = out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(hex.len(), 64, "not a SHA-256 digest: {out}");
    hex
}

#[test]
fn dane_tlsa_against_a_real_postfix_certificate() {
    let lab = Lab::new("policy-dane").expect("lab");
    let ca = TestCa::new(lab.path()).expect("ca");
    let ip = unique_loopback();
    let names = [
        "mx.dane-ok.test",
        "mx.dane-ta.test",
        "mx.dane-bad.test",
        "mx.dane-none.test",
    ];
    let leaf = ca
        .issue("mx-dane", &names, mxscope_tests::certs::Validity::Valid)
        .expect("mx cert");
    // Postfix presents leaf + CA, so a DANE-TA record finds its anchor in the chain.
    let mut served = leaf.clone();
    served.cert = lab.path().join("mx-dane-chain.crt");
    let chain = std::fs::read_to_string(&leaf.cert).expect("leaf pem")
        + &std::fs::read_to_string(ca.ca_file()).expect("ca pem");
    std::fs::write(&served.cert, chain).expect("write chain");
    let pf = mxscope_tests::postfix::Postfix::start(
        &lab,
        "dane",
        mxscope_tests::postfix::PostfixConfig::new(ip, "mx.dane-ok.test").cert(served),
    )
    .expect("postfix");

    // Digests computed by openssl, independently of the probe's code.
    let spki = openssl_hex(&format!(
        "openssl x509 -in {} -noout -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256 -r",
        leaf.cert.display()
    ));
    let ca_cert = openssl_hex(&format!(
        "openssl x509 -in {} -outform DER | openssl dgst -sha256 -r",
        ca.ca_file().display()
    ));
    let zone = |domain: &str, tlsa: Option<String>| {
        let z = MailZone::new(domain).mx(10, "mx", &[ip]);
        match tlsa {
            Some(t) => z.record(&format!("_25._tcp.mx IN TLSA {t}")),
            None => z,
        }
        .build()
    };
    let nsd = Nsd::start(
        &lab,
        &[
            zone("dane-ok.test", Some(format!("3 1 1 {spki}"))),
            zone("dane-ta.test", Some(format!("2 0 1 {ca_cert}"))),
            zone("dane-bad.test", Some(format!("3 1 1 {}", "00".repeat(32)))),
            zone("dane-none.test", None),
        ],
    )
    .expect("nsd");
    // No CA for probe TLS: DANE-EE needs no public trust.
    let ctx = context(nsd.addr(), None).expect("probe context");
    let run = |domain: &str| {
        let mut s = spec(domain, CheckKind::Dane);
        s.options
            .service_ports
            .insert(CheckKind::Smtp, pf.ports().smtp);
        run_one(&ctx, &s).expect("one observation")
    };
    let at = format!("dane.0.{ip}");

    let o = run("dane-ok.test");
    assert_eq!(o.outcome, Outcome::Ok, "{}: {:?}", o.message, o.facts);
    assert!(flag(&o, "dane.present"));
    assert!(flag(&o, &format!("{at}.match")), "{:?}", o.facts);
    assert_eq!(text(&o, &format!("{at}.matched")), format!("3 1 1 {spki}"));
    assert_eq!(text(&o, "dane.dnssec"), "unknown");
    assert_eq!(text(&o, "dane.0.host"), "mx.dane-ok.test");

    let o = run("dane-ta.test");
    assert_eq!(o.outcome, Outcome::Ok, "{}: {:?}", o.message, o.facts);
    assert_eq!(
        text(&o, &format!("{at}.matched")),
        format!("2 0 1 {ca_cert}")
    );

    let o = run("dane-bad.test");
    assert_problem(
        &o,
        Outcome::Fail,
        ErrorClass::Policy,
        "no TLSA record at _25._tcp.mx.dane-bad.test matches",
    );
    assert!(!flag(&o, &format!("{at}.match")));

    let o = run("dane-none.test");
    assert_eq!(o.outcome, Outcome::Ok, "{}: {:?}", o.message, o.facts);
    assert!(!flag(&o, "dane.present"));
    assert!(!flag(&o, "dane.0.present"));
}
