//! Cross-region analysis on the multi-region lab (`deploy/lab/lab`): real Postfix, Dovecot and nsd in the
//! mail namespace, one agent per region namespace, the collector on 198.19.0.1 with mTLS. The
//! latency matrix follows the injected RTTs, the port-25 block is diagnosed as `network` in exactly
//! its region, a stopped Dovecot is `down` everywhere and an expired certificate is `tls` with its date.
//!
//! Needs root, `ip`, `nft` and `/dev/net/tun`; fails (never skips) without them. One lab test or
//! benchmark at a time per machine: the lab is held under an flock on `/run/mxscope-lab.lock`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mxscope_tests::binaries::system_tool;
use mxscope_tests::certs::TestCa;
use mxscope_tests::dovecot::{Dovecot, DovecotConfig, DovecotPorts};
use mxscope_tests::net::is_listening;
use mxscope_tests::netlab::{
    pki_for, require_prerequisites, start_agent, LabAgentOptions, LabCollector, LabQuery, NetLab,
};
use mxscope_tests::nsd::{MailZone, Nsd};
use mxscope_tests::postfix::{Postfix, PostfixConfig, PostfixPorts};
use mxscope_tests::process::run;
use mxscope_tests::Lab;
use serde_json::Value;

const DOMAIN: &str = "lab.test";
const MX_HOST: &str = "mx.lab.test";
const CHECKS: &[&str] = &["mx", "smtp", "submission", "imap", "imaps"];
/// How long the lab test waits for the lab lock (the benchmark may hold it for a while).
const LOCK_WAIT: Duration = Duration::from_secs(900);
/// Deadline for each state the test waits for (a few probe intervals plus hysteresis).
const SETTLE: Duration = Duration::from_secs(90);

fn dovecot_ports() -> DovecotPorts {
    DovecotPorts {
        imap: 143,
        pop3: 110,
        imaps: Some(993),
        pop3s: Some(995),
    }
}

/// The lab's queries, with this test's matrix lookup on top.
struct World<'a>(LabQuery<'a>);

impl<'a> std::ops::Deref for World<'a> {
    type Target = LabQuery<'a>;
    fn deref(&self) -> &LabQuery<'a> {
        &self.0
    }
}

impl World<'_> {
    /// The matrix row of `DOMAIN` for `check`.
    fn matrix_row(&self, check: &str, metric: &str) -> anyhow::Result<Option<Value>> {
        let v = self.json(&[
            "matrix", "--check", check, "--metric", metric, "--since", "15m",
        ])?;
        Ok(row_of(&v, check))
    }
}

fn row_of(matrix: &Value, check: &str) -> Option<Value> {
    matrix
        .as_array()?
        .iter()
        .find(|r| r["target"] == DOMAIN && r["check"] == check)
        .cloned()
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `notAfter` of a PEM certificate as `YYYY-MM-DD`, read with openssl.
fn not_after_date(cert: &Path) -> String {
    let openssl = system_tool("openssl", "openssl").expect("openssl");
    let cert = cert.to_str().expect("utf-8 path");
    let out = run(
        &openssl,
        &[
            "x509", "-in", cert, "-noout", "-enddate", "-dateopt", "iso_8601",
        ],
    )
    .expect("openssl x509 -enddate");
    // notAfter=2025-10-25 07:40:00Z
    let value = out.trim().trim_start_matches("notAfter=");
    value
        .get(..10)
        .unwrap_or_else(|| panic!("unexpected openssl output: {out}"))
        .to_string()
}

#[test]
fn lab_regions_latency_reachability_and_diagnosis() {
    if let Err(e) = require_prerequisites() {
        panic!("the lab test cannot run here: {e:#}");
    }
    let lab = Lab::new("regions").expect("lab dir");
    let state = lab.subdir("lab-state").expect("state dir");
    let net = NetLab::up(
        &state,
        Path::new(env!("CARGO_BIN_EXE_mxscope-delayline")),
        LOCK_WAIT,
    )
    .expect("lab up");
    let mail_ns = net.mail_ns().expect("mail ns").to_string();
    let mail_ip = net.mail_ip().expect("mail ip");
    let regions = net.regions().to_vec();
    assert_eq!(regions.len(), 3, "the lab has three regions: {regions:?}");
    let blocked: Vec<&str> = regions
        .iter()
        .filter(|r| r.block25)
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        blocked,
        ["ap-south"],
        "port 25 blocked in exactly one region"
    );

    // The mail host: nsd, Postfix and Dovecot on their real ports in the mail namespace.
    let ca = TestCa::new(&lab.subdir("probe-ca").expect("ca dir")).expect("test CA");
    let valid = ca.valid_for("mx", MX_HOST).expect("valid cert");
    let expired = ca.expired_for("mx-expired", MX_HOST).expect("expired cert");
    let zone = MailZone::new(DOMAIN).mx(10, "mx", &[mail_ip]).build();
    let dns = SocketAddr::from((mail_ip, 53));
    let nsd = Nsd::start_at(&lab, &[zone], dns, Some(&mail_ns)).expect("nsd in the mail ns");
    let mx = nsd.query(DOMAIN, "MX").expect("dig MX");
    assert!(mx.contains("10 mx.lab.test."), "{mx}");
    let _postfix = Postfix::start(
        &lab,
        "mx",
        PostfixConfig::new(mail_ip, MX_HOST)
            .cert(valid.clone())
            .in_netns(
                &mail_ns,
                PostfixPorts {
                    smtp: 25,
                    submission: 587,
                    smtps: Some(465),
                },
            ),
    )
    .expect("postfix in the mail ns");
    let mut dovecot = Dovecot::start(
        &lab,
        "imap",
        DovecotConfig::new(mail_ip)
            .cert(valid)
            .in_netns(&mail_ns, dovecot_ports()),
    )
    .expect("dovecot in the mail ns");

    // The collector in the root namespace, on the lab side, with mTLS.
    let pki_dir = lab.path().join("pki");
    let collector_ip = net.collector_ip().expect("collector ip");
    let pki = pki_for(&pki_dir, collector_ip).expect("ca init");
    let admin = pki
        .admin(lab.path(), "lab-test", false)
        .expect("admin cert");
    let coll_dir = lab.subdir("collector").expect("collector dir");
    let collector = LabCollector::start(
        &coll_dir,
        collector_ip,
        &pki,
        &["--fail-after", "2", "--recover-after", "2"],
    )
    .expect("collector on the lab address");

    // One agent per region, inside the region's namespace.
    let targets_toml = format!(
        "[[target]]\nname = \"{DOMAIN}\"\nchecks = [{}]\ninterval = \"1s\"\ntimeout = \"4s\"\n",
        CHECKS
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
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
        agents.push(start_agent(&agent_dir, &opts).expect("agent in its region"));
    }
    let world = World(LabQuery {
        collector: &collector,
        admin: &admin,
        procs: agents.iter().collect(),
        settle: SETTLE,
    });

    // 1. Latency: connect medians per region follow the injected RTTs.
    let region_names: Vec<String> = regions.iter().map(|r| r.name.clone()).collect();
    for check in ["submission", "imap"] {
        world.await_json(
            &format!("10 connect samples of {check} from every region"),
            &[
                "latency", DOMAIN, "--check", check, "--phase", "connect", "--by", "region",
                "--since", "15m",
            ],
            |v| {
                let rows = v.as_array()?;
                region_names
                    .iter()
                    .all(|name| {
                        rows.iter().any(|r| {
                            r["region"] == name.as_str() && r["count"].as_u64().unwrap_or(0) >= 10
                        })
                    })
                    .then_some(())
            },
        );
        let row = world
            .matrix_row(check, "p50")
            .expect("matrix p50")
            .unwrap_or_else(|| panic!("no matrix row for {check}\n{}", world.logs()));
        assert_eq!(row["phase"], "connect", "matrix latency phase: {row}");
        let mut measured = Vec::new();
        for r in &regions {
            let p50 = row[r.name.as_str()]
                .as_f64()
                .unwrap_or_else(|| panic!("no p50 for {} in {row}", r.name));
            let allowed = (r.rtt_ms * 0.2).max(3.0);
            eprintln!(
                "{check} connect p50 {}: {p50:.2} ms (injected RTT {} ms, allowed ±{allowed:.1})",
                r.name, r.rtt_ms
            );
            assert!(
                (p50 - r.rtt_ms).abs() <= allowed,
                "{check} p50 connect from {} is {p50:.2} ms, injected RTT {} ms (±{allowed:.1}): {row}",
                r.name,
                r.rtt_ms
            );
            measured.push((p50, r.rtt_ms, r.name.clone()));
        }
        let mut by_p50 = measured.clone();
        by_p50.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut by_rtt = measured;
        by_rtt.sort_by(|a, b| a.1.total_cmp(&b.1));
        let order = |v: &[(f64, f64, String)]| v.iter().map(|m| m.2.clone()).collect::<Vec<_>>();
        assert_eq!(
            order(&by_p50),
            order(&by_rtt),
            "{check}: regions ordered by p50 as by injected RTT"
        );
    }

    // 2. Port 25 dropped from ap-south only: network layer there, submission up there.
    let smtp = world.await_json(
        "smtp partial with only ap-south failing",
        &["matrix", "--check", "smtp", "--since", "15m"],
        |v| {
            let row = row_of(v, "smtp")?;
            (row["scope"] == "partial" && str_list(&row["failing_regions"]) == blocked)
                .then_some(row)
        },
    );
    eprintln!("matrix smtp: {smtp}");
    let finding = world.await_json(
        "diagnose: smtp network finding in ap-south",
        &["diagnose", DOMAIN],
        |v| {
            v["findings"]
                .as_array()?
                .iter()
                .find(|f| f["check"] == "smtp" && f["severity"] == "fail")
                .cloned()
        },
    );
    eprintln!("diagnose smtp: {finding}");
    assert_eq!(finding["layer"], "network", "{finding}");
    assert_eq!(str_list(&finding["regions"]), blocked, "{finding}");
    assert_eq!(finding["scope"], "regions", "{finding}");
    let summary = finding["summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains("only from ap-south (fine from eu-west, us-east)"),
        "{finding}"
    );
    let diag = world.json(&["diagnose", DOMAIN]).expect("diagnose");
    assert_eq!(diag["layer"], "network", "first failing layer: {diag}");
    assert_eq!(str_list(&diag["regions"]), blocked, "{diag}");
    for f in diag["findings"].as_array().expect("findings") {
        assert!(
            f["check"] != "submission" && f["check"] != "imap" && f["check"] != "imaps",
            "nothing wrong with submission or IMAP yet: {f}"
        );
    }
    let submission = world
        .matrix_row("submission", "reachability")
        .expect("matrix")
        .expect("submission row");
    assert_eq!(
        submission["scope"], "up",
        "submission reachable from everywhere: {submission}"
    );
    assert!(
        submission["ap-south"].as_f64().is_some_and(|v| v > 0.99),
        "ap-south reaches submission: {submission}"
    );

    // 3. Dovecot stopped (by PID): imap and imaps down in every region.
    dovecot
        .proc_mut()
        .terminate(Duration::from_secs(10))
        .expect("stop dovecot");
    assert!(
        !is_listening(SocketAddr::from((mail_ip, 143))),
        "imap still answers"
    );
    // A majority already makes `down`; the slowest region needs its two failures too.
    let mut all_regions = region_names.clone();
    all_regions.sort();
    for check in ["imap", "imaps"] {
        let row = world.await_json(
            &format!("{check} down, failing in every region"),
            &["matrix", "--check", check, "--since", "15m"],
            |v| {
                row_of(v, check).filter(|r| {
                    let mut failing = str_list(&r["failing_regions"]);
                    failing.sort();
                    failing == all_regions
                })
            },
        );
        eprintln!("matrix {check} after stopping dovecot: {row}");
        assert_eq!(row["scope"], "down", "{check} down: {row}");
    }
    drop(dovecot);

    // 4. Dovecot back with an expired certificate: the tls layer, with the certificate's date.
    let expired_date = not_after_date(&expired.cert);
    let _dovecot = Dovecot::start(
        &lab,
        "imap-expired",
        DovecotConfig::new(mail_ip)
            .cert(expired)
            .in_netns(&mail_ns, dovecot_ports()),
    )
    .expect("dovecot with an expired certificate");
    // Each region moves from `refused` to `cert_expired` on its next probe.
    let tls = world.await_json(
        "diagnose: imaps tls finding in every region",
        &["diagnose", DOMAIN],
        |v| {
            v["findings"]
                .as_array()?
                .iter()
                .find(|f| {
                    f["check"] == "imaps" && f["layer"] == "tls" && f["scope"] == "everywhere"
                })
                .cloned()
        },
    );
    eprintln!("diagnose imaps: {tls}");
    let mut tls_regions = str_list(&tls["regions"]);
    tls_regions.sort();
    assert_eq!(tls_regions, all_regions, "{tls}");
    let evidence = str_list(&tls["evidence"]);
    assert!(!evidence.is_empty(), "{tls}");
    assert!(
        evidence
            .iter()
            .all(|e| e.contains("cert_expired") && e.contains(&format!("not after {expired_date}"))),
        "every region's evidence names cert_expired and the date {expired_date}: {tls}"
    );
    // Drop order (reverse of declaration) stops agents, collector and servers before `lab down`.
}
