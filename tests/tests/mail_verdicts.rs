//! Verdicts for mail domains on the multi-region lab (`deploy/lab/lab`, four regions): whether mail
//! is delivered, judged the way a sending MTA would, and root causes named per region. One lab run
//! holds six domains, each a fixture of a real failure (deploy/lab/README.md, "Scenario fixtures"):
//! a dead backup MX, a dead primary MX, every MX unreachable from us-east, DNS answers rewritten
//! for sa-east, the SMTP dialogue altered on eu-west's path, TLS intercepted on us-east's path.
//! ap-south keeps its port-25 block: its agent's own network, not the domains' fault.
//!
//! The raw probe results are asserted first (they hold on any mxscope that stores them), then the
//! verdicts of `matrix` and `diagnose`. Needs root, `ip`, `nft` and `/dev/net/tun`; fails (never
//! skips) without them. Held under the lab flock like `lab.rs`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use mxscope_tests::certs::{TestCa, Validity};
use mxscope_tests::net::read_greeting;
use mxscope_tests::netlab::{
    pki_for, require_prerequisites, start_agent, LabAgentOptions, LabCollector, LabQuery, NetLab,
};
use mxscope_tests::nsd::{MailZone, Nsd, Zone};
use mxscope_tests::postfix::{Postfix, PostfixConfig, PostfixPorts};
use mxscope_tests::process::Proc;
use mxscope_tests::smtp_fixup::SmtpFixup;
use mxscope_tests::Lab;
use serde_json::Value;

const REGIONS: &str = "eu-west:10 us-east:60 ap-south:150:block25 sa-east:100";
const LOCK_WAIT: Duration = Duration::from_secs(900);
const SETTLE: Duration = Duration::from_secs(90);

const BACKUP: &str = "backup.lab.test";
const PRIMARY: &str = "primary.lab.test";
const GEO: &str = "geo.lab.test";
const DNSRW: &str = "dnsrw.lab.test";
const SMTPALT: &str = "smtpalt.lab.test";
const TLSINT: &str = "tlsint.lab.test";
const DOMAINS: [&str; 6] = [BACKUP, PRIMARY, GEO, DNSRW, SMTPALT, TLSINT];

/// The mail host's own address: nsd and the main Postfix (mx.lab.test).
const MAIL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Configured on the mail host, nothing listens on 25: connection refused.
const REFUSED: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const GEO_MX1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const GEO_MX2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const SMTPALT_MX: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 5);
const TLSINT_MX: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 6);
/// The second Postfix, with a certificate from the "Inspection CA".
const INSPECTOR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 7);
/// What the second nsd answers for mx.dnsrw.lab.test; configured, nothing listens: refused.
const DNSRW_WRONG: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);
/// The second nsd (the rewritten DNS answers).
const NSD2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 53);
/// Where the SMTP fix-up relay listens in the router namespace.
const FIXUP_PORT: u16 = 10025;
const INSPECTION_CA: &str = "Inspection CA";
const LAB_CA: &str = "mxscope test CA";

/// Every MX name the main Postfix answers for (its certificate's SANs).
const MAIN_MX_NAMES: &[&str] = &[
    "mx.lab.test",
    "mx1.geo.lab.test",
    "mx2.geo.lab.test",
    "mx.smtpalt.lab.test",
    "mx.tlsint.lab.test",
    "mx.dnsrw.lab.test",
];

/// The zones both nsd instances serve; `rewritten` is the second instance's view.
fn zones(rewritten: bool) -> Vec<Zone> {
    let dnsrw = if rewritten {
        MailZone::new(DNSRW).mx(10, "mx", &[DNSRW_WRONG]).serial(2)
    } else {
        MailZone::new(DNSRW).mx(10, "mx", &[MAIL])
    };
    vec![
        MailZone::new("lab.test").mx(10, "mx", &[MAIL]).build(),
        MailZone::new(BACKUP)
            .mx_host(10, "mx.lab.test")
            .mx(20, "mx2", &[REFUSED])
            .build(),
        MailZone::new(PRIMARY)
            .mx(10, "mx1", &[REFUSED])
            .mx_host(20, "mx.lab.test")
            .build(),
        MailZone::new(GEO)
            .mx(10, "mx1", &[GEO_MX1])
            .mx(20, "mx2", &[GEO_MX2])
            .build(),
        dnsrw.build(),
        MailZone::new(SMTPALT).mx(10, "mx", &[SMTPALT_MX]).build(),
        MailZone::new(TLSINT).mx(10, "mx", &[TLSINT_MX]).build(),
    ]
}

fn smtp_ports() -> PostfixPorts {
    PostfixPorts {
        smtp: 25,
        submission: 587,
        smtps: None,
    }
}

/// The lab's queries, with this test's waits on top.
struct World<'a>(LabQuery<'a>);

impl<'a> std::ops::Deref for World<'a> {
    type Target = LabQuery<'a>;
    fn deref(&self) -> &LabQuery<'a> {
        &self.0
    }
}

impl World<'_> {
    /// The newest smtp result of `domain` from `region` whose facts satisfy `pick`.
    fn await_result(
        &self,
        what: &str,
        domain: &str,
        region: &str,
        mut pick: impl FnMut(&Value) -> bool,
    ) -> Value {
        self.await_json(
            what,
            &[
                "results", "--target", domain, "--check", "smtp", "--region", region, "--since",
                "5m", "--limit", "20",
            ],
            |v| v.as_array()?.iter().find(|r| pick(r)).cloned(),
        )
    }

    /// Waits for the smtp matrix row of `domain` to satisfy `pred` (never `down` meanwhile
    /// counts as a failure only at the end: the row is returned for more assertions).
    fn await_row(&self, domain: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let row = self.await_json(
            &format!("{domain}: {what}"),
            &["matrix", "--check", "smtp", "--since", "15m"],
            |v| {
                v.as_array()?
                    .iter()
                    .find(|r| r["target"] == domain && r["check"] == "smtp")
                    .filter(|r| pred(r))
                    .cloned()
            },
        );
        eprintln!("matrix smtp {domain}: {row}");
        assert_ne!(row["scope"], "down", "{domain} is never down: {row}");
        assert_eq!(row["basis"], "mail", "{domain} judged by mail flow: {row}");
        row
    }

    /// Waits for `diagnose domain` whose first finding satisfies `first`; checks the explanation.
    fn await_diagnosis(&self, domain: &str, what: &str, first: impl Fn(&Value) -> bool) -> Value {
        let diag = self.await_json(
            &format!("{domain}: diagnose {what}"),
            &["diagnose", domain],
            |v| {
                let f0 = v["findings"].as_array()?.first()?;
                first(f0).then(|| v.clone())
            },
        );
        eprintln!(
            "diagnose {domain}: {}",
            serde_json::to_string_pretty(&diag).unwrap_or_default()
        );
        let explanation = diag["explanation"].as_str().unwrap_or_default();
        assert!(
            explanation.starts_with(&format!("Mail to {domain}")),
            "explanation of {domain}: {diag}"
        );
        diag
    }
}

fn str_list(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Summary and evidence of a finding as one string, for "mentions" assertions.
fn words(f: &Value) -> String {
    format!(
        "{} {}",
        text(&f["summary"]),
        str_list(&f["evidence"]).join(" ")
    )
}

fn findings(diag: &Value) -> Vec<Value> {
    let list = diag["findings"].as_array().cloned().unwrap_or_default();
    assert!(!list.is_empty(), "diagnose has findings: {diag}");
    list
}

/// A region is "up" everywhere that counts: no failing region, ap-south's agent not counted.
fn up_with_agent_fault(r: &Value) -> bool {
    r["scope"] == "up"
        && str_list(&r["failing_regions"]).is_empty()
        && r["basis"] == "mail"
        && r["states"]["ap-south"] == "agent"
}

/// Backup and primary: a dead MX next to a working one is a redundancy warning.
fn assert_redundancy(world: &World<'_>, domain: &str, dead_host: &str) {
    world.await_row(domain, "up, ap-south an agent fault", up_with_agent_fault);
    let diag = world.await_diagnosis(domain, "redundancy warning first", |f| {
        f["kind"] == "redundancy"
    });
    let all = findings(&diag);
    let f0 = &all[0];
    assert_eq!(f0["severity"], "warn", "{f0}");
    assert_eq!(f0["layer"], "network", "{f0}");
    assert_eq!(
        str_list(&f0["regions"]),
        ["eu-west", "sa-east", "us-east"],
        "{f0}"
    );
    let summary = text(&f0["summary"]);
    assert!(
        summary.contains(dead_host) && summary.contains(&REFUSED.to_string()),
        "{domain}: the summary names {dead_host} at {REFUSED}: {f0}"
    );
    assert!(
        all.iter().all(|f| f["kind"] != "mail_flow"),
        "{domain}: mail flows, no mail_flow finding: {diag}"
    );
    assert!(
        all.iter()
            .any(|f| f["kind"] == "agent_network" && str_list(&f["regions"]) == ["ap-south"]),
        "{domain}: ap-south's own network is named: {diag}"
    );
}

#[test]
fn mail_verdicts_follow_delivery_and_name_root_causes() {
    if let Err(e) = require_prerequisites() {
        panic!("the lab test cannot run here: {e:#}");
    }
    let lab = Lab::new("mail-verdicts").expect("lab dir");
    let state = lab.subdir("lab-state").expect("state dir");
    let net = NetLab::up_with(
        &state,
        Path::new(env!("CARGO_BIN_EXE_mxscope-delayline")),
        LOCK_WAIT,
        REGIONS,
    )
    .expect("lab up");
    let mail_ns = net.mail_ns().expect("mail ns").to_string();
    let router_ns = net.router_ns().expect("router ns").to_string();
    assert_eq!(net.mail_ip().expect("mail ip"), MAIL);
    let regions = net.regions().to_vec();
    assert_eq!(regions.len(), 4, "four regions: {regions:?}");
    let ip_of = |name: &str| net.region(name).expect("region").ip;
    let (eu_west, us_east, sa_east) = (ip_of("eu-west"), ip_of("us-east"), ip_of("sa-east"));
    assert!(net.region("ap-south").expect("ap-south").block25);

    // The mail host's extra addresses (real interface addresses: closed ports answer refused).
    for ip in [
        REFUSED,
        GEO_MX1,
        SMTPALT_MX,
        TLSINT_MX,
        INSPECTOR,
        DNSRW_WRONG,
        GEO_MX2,
        NSD2,
    ] {
        net.add_mail_addr(ip).expect("mail host address");
    }

    // DNS: the real zones on 198.18.0.2, the rewritten view on 198.18.0.53.
    let dns = SocketAddr::from((MAIL, 53));
    let nsd = Nsd::start_at(&lab, &zones(false), dns, Some(&mail_ns)).expect("nsd");
    let nsd2 = Nsd::start_named(
        &lab,
        "nsd-rewritten",
        &zones(true),
        SocketAddr::from((NSD2, 53)),
        Some(&mail_ns),
    )
    .expect("second nsd");
    let a = nsd.query("mx.dnsrw.lab.test", "A").expect("dig");
    assert_eq!(a.trim(), MAIL.to_string(), "real answer");
    let a = nsd2.query("mx.dnsrw.lab.test", "A").expect("dig");
    assert_eq!(a.trim(), DNSRW_WRONG.to_string(), "rewritten answer");
    let mx = nsd.query(BACKUP, "MX").expect("dig MX");
    assert!(
        mx.contains("10 mx.lab.test.") && mx.contains("20 mx2.backup.lab.test."),
        "{mx}"
    );

    // Postfix: the main instance serves every working MX; the inspector shows another CA's cert.
    let ca = TestCa::new(&lab.subdir("probe-ca").expect("ca dir")).expect("lab CA");
    let main_cert = ca
        .issue("mx", MAIN_MX_NAMES, Validity::Valid)
        .expect("main cert");
    let inspection_ca = TestCa::named(&lab.subdir("inspection-ca").expect("dir"), INSPECTION_CA)
        .expect("inspection CA");
    let inspected = inspection_ca
        .valid_for("mx-tlsint", "mx.tlsint.lab.test")
        .expect("inspection cert");
    let _postfix = Postfix::start(
        &lab,
        "mx",
        PostfixConfig::new(MAIL, "mx.lab.test")
            .smtp_also_on(&[GEO_MX1, GEO_MX2, SMTPALT_MX, TLSINT_MX])
            .cert(main_cert)
            .in_netns(&mail_ns, smtp_ports()),
    )
    .expect("main postfix");
    let _inspector = Postfix::start(
        &lab,
        "inspector",
        PostfixConfig::new(INSPECTOR, "mx.tlsint.lab.test")
            .cert(inspected)
            .in_netns(&mail_ns, smtp_ports()),
    )
    .expect("inspecting postfix");

    // The path fixtures in the router, all before the first agent packet (NAT is per flow).
    let fixup_addr = SocketAddr::from((net.router_mail_ip(), FIXUP_PORT));
    let fixup_dir = lab.subdir("smtp-fixup").expect("fixup dir");
    let fixup = SmtpFixup::start(
        Path::new(env!("CARGO_BIN_EXE_mxscope-smtp-fixup")),
        &fixup_dir,
        &router_ns,
        fixup_addr,
        SocketAddr::from((SMTPALT_MX, 25)),
    )
    .expect("smtp fix-up relay");
    let greeting = read_greeting(fixup_addr, Duration::from_secs(5)).expect("relay greeting");
    assert!(
        greeting.starts_with("220 ") && greeting[4..].trim_end().bytes().all(|b| b == b'*'),
        "the relay masks the greeting: {greeting:?}"
    );
    net.drop_tcp(us_east, &[GEO_MX1, GEO_MX2], 25)
        .expect("geo drop");
    for proto in ["udp", "tcp"] {
        net.dnat(proto, sa_east, dns, &NSD2.to_string())
            .expect("dns dnat");
    }
    net.dnat(
        "tcp",
        eu_west,
        SocketAddr::from((SMTPALT_MX, 25)),
        &fixup_addr.to_string(),
    )
    .expect("smtp fix-up dnat");
    net.dnat(
        "tcp",
        us_east,
        SocketAddr::from((TLSINT_MX, 25)),
        &INSPECTOR.to_string(),
    )
    .expect("tls interception dnat");

    // The collector and one agent per region, every domain with mx and smtp.
    let collector_ip = net.collector_ip().expect("collector ip");
    let pki = pki_for(&lab.path().join("pki"), collector_ip).expect("ca init");
    let admin = pki.admin(lab.path(), "verdicts", false).expect("admin");
    let coll_dir = lab.subdir("collector").expect("collector dir");
    let collector = LabCollector::start(
        &coll_dir,
        collector_ip,
        &pki,
        &["--fail-after", "2", "--recover-after", "2"],
    )
    .expect("collector");
    let targets_toml: String = DOMAINS
        .iter()
        .map(|d| {
            format!(
                "[[target]]\nname = \"{d}\"\nchecks = [\"mx\", \"smtp\"]\ninterval = \"1s\"\n\
                 timeout = \"4s\"\n\n"
            )
        })
        .collect();
    let agent_dir = lab.subdir("agents").expect("agents dir");
    let mut agents = Vec::new();
    for r in &regions {
        let id = format!("agent-{}", r.name);
        let cert = pki.enroll(lab.path(), &id, &r.name, &[]).expect("enroll");
        let opts = LabAgentOptions {
            id,
            region: r.clone(),
            collector_url: collector.url(),
            cert,
            resolver: dns,
            probe_ca: ca.ca_file().to_path_buf(),
            targets_toml: targets_toml.clone(),
            extra: Vec::new(),
        };
        agents.push(start_agent(&agent_dir, &opts).expect("agent"));
    }
    let mut procs: Vec<&Proc> = agents.iter().collect();
    procs.push(&fixup.proc);
    let world = World(LabQuery {
        collector: &collector,
        admin: &admin,
        procs,
        settle: SETTLE,
    });

    // Raw facts: what each region's path really did.
    let alt = world.await_result(
        "eu-west's smtpalt result with a banner",
        SMTPALT,
        "eu-west",
        |r| r["facts"]["smtp.banner"].is_string(),
    );
    eprintln!("eu-west smtpalt result: {alt}");
    let banner = text(&alt["facts"]["smtp.banner"]);
    assert!(
        !banner.is_empty() && banner.bytes().all(|b| b == b'*'),
        "banner masked on eu-west's path: {alt}"
    );
    let ext = text(&alt["facts"]["smtp.extensions"]);
    let keywords: Vec<&str> = ext.split_whitespace().collect();
    assert!(
        keywords.contains(&"XXXXXXXA") && !keywords.contains(&"STARTTLS"),
        "STARTTLS masked on eu-west's path: {alt}"
    );
    let plain = world.await_result(
        "us-east's smtpalt result with a banner",
        SMTPALT,
        "us-east",
        |r| r["facts"]["smtp.banner"].is_string(),
    );
    assert!(
        text(&plain["facts"]["smtp.banner"]).contains("ESMTP"),
        "{plain}"
    );

    let intercepted = world.await_result(
        "us-east's tlsint result with a certificate",
        TLSINT,
        "us-east",
        |r| r["facts"]["cert.issuer"].is_string(),
    );
    eprintln!("us-east tlsint result: {intercepted}");
    assert!(
        text(&intercepted["facts"]["cert.issuer"]).contains(INSPECTION_CA),
        "us-east sees the inspection CA: {intercepted}"
    );
    let direct = world.await_result(
        "eu-west's tlsint result with a certificate",
        TLSINT,
        "eu-west",
        |r| r["facts"]["cert.issuer"].is_string(),
    );
    eprintln!("eu-west tlsint result: {direct}");
    assert!(
        text(&direct["facts"]["cert.issuer"]).contains(LAB_CA),
        "eu-west sees the lab CA: {direct}"
    );

    let rewritten = world.await_result("sa-east's dnsrw smtp result", DNSRW, "sa-east", |r| {
        r["endpoint"].is_string()
    });
    eprintln!("sa-east dnsrw result: {rewritten}");
    assert!(
        text(&rewritten["endpoint"]).contains(&format!("[{DNSRW_WRONG}]")),
        "sa-east is sent to the rewritten address: {rewritten}"
    );
    let geo = world.await_result("us-east's geo smtp result", GEO, "us-east", |r| {
        r["outcome"].is_string()
    });
    assert_ne!(geo["outcome"], "ok", "us-east cannot reach geo's MX: {geo}");

    // Verdicts.
    // 1, 2: a dead backup or primary MX next to a working one.
    assert_redundancy(&world, BACKUP, "mx2.backup.lab.test");
    assert_redundancy(&world, PRIMARY, "mx1.primary.lab.test");

    // 3: every MX unreachable from us-east only.
    world.await_row(GEO, "partial, us-east failing", |r| {
        r["scope"] == "partial" && str_list(&r["failing_regions"]) == ["us-east"]
    });
    let diag = world.await_diagnosis(GEO, "mail_flow in us-east first", |f| {
        f["kind"] == "mail_flow"
    });
    let f0 = &findings(&diag)[0];
    assert_eq!(f0["severity"], "fail", "{f0}");
    assert_eq!(f0["layer"], "network", "{f0}");
    assert_eq!(f0["scope"], "regions", "{f0}");
    assert_eq!(str_list(&f0["regions"]), ["us-east"], "{f0}");
    let evidence = str_list(&f0["evidence"]).join(" ");
    assert!(
        evidence.contains("mx1.geo.lab.test") && evidence.contains("mx2.geo.lab.test"),
        "the evidence names both MX hosts: {f0}"
    );

    // 4: DNS answers rewritten for sa-east; its smtp failure is caused by that.
    world.await_row(DNSRW, "partial, sa-east failing", |r| {
        r["scope"] == "partial" && str_list(&r["failing_regions"]) == ["sa-east"]
    });
    let diag = world.await_diagnosis(DNSRW, "dns_divergence first", |f| {
        f["kind"] == "dns_divergence"
    });
    let all = findings(&diag);
    let f0 = &all[0];
    assert_eq!(f0["layer"], "dns", "{f0}");
    assert_eq!(f0["scope"], "regions", "{f0}");
    assert_eq!(str_list(&f0["regions"]), ["sa-east"], "{f0}");
    let summary = text(&f0["summary"]);
    assert!(
        summary.contains(&DNSRW_WRONG.to_string()) && summary.contains(&MAIL.to_string()),
        "the summary names both answers: {f0}"
    );
    assert!(
        words(f0).contains("zone serial"),
        "the zone serials tell interception from propagation: {f0}"
    );
    assert!(
        all[1..]
            .iter()
            .any(|f| str_list(&f["regions"]) == ["sa-east"] && f["caused_by"] == 0),
        "a consequence in sa-east points to the DNS finding: {diag}"
    );
    for f in &all[1..] {
        assert!(
            !(f["caused_by"].is_null()
                && f["layer"] == "network"
                && str_list(&f["regions"]).iter().any(|r| r == "sa-east")),
            "no second root cause in sa-east's network: {f}"
        );
    }

    // 5: the SMTP dialogue altered on eu-west's path; mail still flows, in plain text.
    world.await_row(SMTPALT, "up", |r| r["scope"] == "up");
    let diag = world.await_diagnosis(SMTPALT, "smtp_altered first", |f| {
        f["kind"] == "smtp_altered"
    });
    let f0 = &findings(&diag)[0];
    assert_eq!(f0["scope"], "regions", "{f0}");
    assert_eq!(str_list(&f0["regions"]), ["eu-west"], "{f0}");
    assert!(text(&f0["summary"]).contains("STARTTLS"), "{f0}");
    assert!(
        str_list(&f0["evidence"]).join(" ").contains("XXXXXXXA"),
        "{f0}"
    );

    // 6: TLS intercepted on us-east's path: a warning on port 25, mail flows.
    world.await_row(TLSINT, "up", |r| r["scope"] == "up");
    let diag = world.await_diagnosis(TLSINT, "tls_interception first", |f| {
        f["kind"] == "tls_interception"
    });
    let f0 = &findings(&diag)[0];
    assert_eq!(f0["layer"], "tls", "{f0}");
    assert_eq!(f0["scope"], "regions", "{f0}");
    assert_eq!(str_list(&f0["regions"]), ["us-east"], "{f0}");
    assert!(words(f0).contains(INSPECTION_CA), "{f0}");
    // The other server's banner is the same cause, not a second root; the untrusted
    // certificate is a consequence.
    let all = findings(&diag);
    assert!(
        !all.iter().any(|f| f["kind"] == "smtp_altered"),
        "one root for us-east: {diag}"
    );
    assert!(
        all[1..]
            .iter()
            .any(|f| f["caused_by"] == 0 && words(f).contains("cert_untrusted")),
        "{diag}"
    );
    // Every diagnosis starts with the paragraph for the ticket.
    for domain in [BACKUP, PRIMARY, GEO, DNSRW, SMTPALT, TLSINT] {
        let d = world.json(&["diagnose", domain]).expect("diagnose");
        assert!(
            text(&d["explanation"]).starts_with(&format!("Mail to {domain} ")),
            "{d}"
        );
    }
    // Drop order (reverse of declaration) stops agents, relay, collector and servers before
    // `lab down`.
}
