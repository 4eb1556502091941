//! The collector's dashboard in a real browser (Debian's chromium through Playwright) against a
//! real collector fed by real agents in the lab: the overview's cells carry the lab's verdicts
//! and colours (port 25 blocked in ap-south), a state change (Dovecot stopped) appears without a
//! reload, the target page draws one latency line per region, the agents page lists every agent;
//! the JSON API answers the same. Screenshots go to `target/dashboard-screenshots/`.
//!
//! Needs root, `ip`, `nft`, `/dev/net/tun`, chromium and npm; fails (never skips) without them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mxscope_tests::browser::Browser;
use mxscope_tests::certs::TestCa;
use mxscope_tests::dovecot::{Dovecot, DovecotConfig, DovecotPorts};
use mxscope_tests::net::free_port;
use mxscope_tests::netlab::{
    pki_for, require_prerequisites, start_agent, LabAgentOptions, LabCollector, LabQuery, NetLab,
};
use mxscope_tests::nsd::{MailZone, Nsd};
use mxscope_tests::postfix::{Postfix, PostfixConfig, PostfixPorts};
use mxscope_tests::Lab;
use serde_json::Value;

const DOMAIN: &str = "lab.test";
const MX_HOST: &str = "mx.lab.test";
const LOCK_WAIT: Duration = Duration::from_secs(900);
const SETTLE: Duration = Duration::from_secs(90);
/// How long the page may take to show what the collector already answers.
const PAGE: Duration = Duration::from_secs(20);

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// The selector of the overview cell of (check, region).
fn cell(check: &str, region: &str) -> String {
    format!(r#"tr[data-target="{DOMAIN}"][data-check="{check}"] td[data-region="{region}"]"#)
}

fn http_get(url: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", url])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn dashboard_shows_the_labs_verdicts_live_in_a_real_browser() {
    if let Err(e) = require_prerequisites() {
        panic!("the dashboard lab test cannot run here: {e:#}");
    }
    let lab = Lab::new("dashboard").expect("lab dir");
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
    let blocked: Vec<String> = regions
        .iter()
        .filter(|r| r.block25)
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(blocked, ["ap-south"], "port 25 blocked in one region");

    let ca = TestCa::new(&lab.subdir("probe-ca").expect("ca dir")).expect("test CA");
    let valid = ca.valid_for("mx", MX_HOST).expect("valid cert");
    let zone = MailZone::new(DOMAIN).mx(10, "mx", &[mail_ip]).build();
    let dns = SocketAddr::from((mail_ip, 53));
    let _nsd = Nsd::start_at(&lab, &[zone], dns, Some(&mail_ns)).expect("nsd");
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
                    smtps: None,
                },
            ),
    )
    .expect("postfix");
    let mut dovecot = Dovecot::start(
        &lab,
        "imap",
        DovecotConfig::new(mail_ip).cert(valid).in_netns(
            &mail_ns,
            DovecotPorts {
                imap: 143,
                pop3: 110,
                imaps: None,
                pop3s: None,
            },
        ),
    )
    .expect("dovecot");

    let pki = pki_for(&lab.path().join("pki"), net.collector_ip().expect("ip")).expect("pki");
    let admin = pki.admin(lab.path(), "dash-test", false).expect("admin");
    let http = SocketAddr::from((
        [127, 0, 0, 1],
        free_port([127, 0, 0, 1].into()).expect("port"),
    ));
    let http_flag = http.to_string();
    let collector = LabCollector::start(
        &lab.subdir("collector").expect("dir"),
        net.collector_ip().expect("ip"),
        &pki,
        &[
            "--fail-after",
            "2",
            "--recover-after",
            "2",
            "--http",
            &http_flag,
        ],
    )
    .expect("collector");
    let targets = format!(
        "[[target]]\nname = \"{DOMAIN}\"\nchecks = [\"mx\", \"smtp\", \"imap\"]\ninterval = \"1s\"\ntimeout = \"3s\"\n"
    );
    let agent_dir = lab.subdir("agents").expect("agents dir");
    let mut agents = Vec::new();
    for r in &regions {
        let id = format!("agent-{}", r.name);
        let cert = pki.enroll(lab.path(), &id, &r.name, &[]).expect("enroll");
        agents.push(
            start_agent(
                &agent_dir,
                &LabAgentOptions {
                    id,
                    region: r.clone(),
                    collector_url: collector.url(),
                    cert,
                    resolver: dns,
                    probe_ca: ca.ca_file().to_path_buf(),
                    targets_toml: targets.clone(),
                    extra: Vec::new(),
                },
            )
            .expect("agent"),
        );
    }
    let world = LabQuery {
        collector: &collector,
        admin: &admin,
        procs: agents.iter().collect(),
        settle: SETTLE,
    };
    // The collector's own view first: smtp failing in ap-south only, imap ok everywhere.
    world.await_json(
        "smtp failing in ap-south only, imap ok everywhere",
        &["matrix", "--since", "15m"],
        |v| {
            let rows = v.as_array()?;
            let row = |check: &str| {
                rows.iter()
                    .find(|r| r["target"] == DOMAIN && r["check"] == check)
            };
            let smtp = row("smtp")?;
            let imap = row("imap")?;
            (smtp["failing_regions"] == serde_json::json!(["ap-south"])
                && imap["scope"] == "up"
                && regions
                    .iter()
                    .all(|r| imap[r.name.as_str()].as_f64().is_some()))
            .then_some(())
        },
    );

    // The JSON API answers what the pages read.
    let base = format!("http://{http}");
    let (code, body) = http_get(&format!("{base}/api/v1/matrix?since=15m"));
    assert_eq!(code, 200, "{body}");
    let matrix: Value = serde_json::from_str(&body).expect("matrix JSON");
    assert_eq!(
        matrix["regions"],
        serde_json::json!(["ap-south", "eu-west", "us-east"]),
        "{matrix}"
    );
    let (code, body) = http_get(&format!("{base}/api/v1/diagnose/{DOMAIN}"));
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("ap-south"),
        "diagnose names the blocked region: {body}"
    );
    let (code, body) = http_get(&format!("{base}/api/v1/agents"));
    assert_eq!(code, 200, "{body}");
    let (code, body) = http_get(&format!("{base}/api/v1/diagnose/"));
    assert_eq!(code, 404, "a missing target is a 404: {body}");
    let (code, body) = http_get(&format!("{base}/api/v1/history/{DOMAIN}?since=soon"));
    assert_eq!(code, 400, "a bad window is refused: {body}");
    assert!(body.contains("since=\\\"soon\\\""), "{body}");

    let shots = screenshots();
    let mut b = Browser::start().expect("chromium through playwright-core");
    // 1. Overview: the cells carry the lab's verdicts and colours.
    b.goto(&format!("{base}/")).expect("open the dashboard");
    b.wait(
        &format!(r#"{}[data-state="failing"]"#, cell("smtp", "ap-south")),
        PAGE,
    )
    .expect("smtp from ap-south shown failing");
    let colour = |b: &mut Browser, sel: &str| -> String {
        b.eval(&format!(
            "getComputedStyle(document.querySelector({sel:?})).backgroundColor"
        ))
        .expect("colour")
        .as_str()
        .unwrap_or_default()
        .to_string()
    };
    assert_eq!(
        colour(&mut b, &cell("smtp", "ap-south")),
        "rgb(210, 60, 60)",
        "down is red"
    );
    for r in ["eu-west", "us-east"] {
        let state = b
            .eval(&format!(
                "document.querySelector({:?}).dataset.state",
                cell("smtp", r)
            ))
            .expect("state");
        assert_eq!(state, "ok", "smtp from {r}");
        assert_eq!(
            colour(&mut b, &cell("smtp", r)),
            "rgb(46, 158, 79)",
            "up is green"
        );
    }
    let scope = b
        .eval(&format!(
            r#"document.querySelector('tr[data-target="{DOMAIN}"][data-check="smtp"]').dataset.scope"#
        ))
        .expect("scope");
    assert_eq!(scope, "partial", "smtp row: partial");
    b.screenshot(&shots.join("overview.png"))
        .expect("screenshot");

    // 2. A state change appears without a reload: Dovecot stopped, imap turns failing.
    b.eval("(window.__sameDocument = true)")
        .expect("mark the document");
    dovecot
        .proc_mut()
        .terminate(Duration::from_secs(10))
        .expect("stop dovecot");
    b.wait_fn(
        &format!(
            "[...document.querySelectorAll('tr[data-target=\"{DOMAIN}\"][data-check=\"imap\"] td[data-region]')].every(c => c.dataset.state === 'failing')"
        ),
        SETTLE,
    )
    .unwrap_or_else(|e| panic!("imap failing everywhere on the open page: {e:#}\n{}", world.logs()));
    assert_eq!(
        b.eval("window.__sameDocument === true").expect("marker"),
        Value::Bool(true),
        "the page was not reloaded"
    );
    assert!(
        b.eval("window.mxscope.events")
            .expect("events")
            .as_u64()
            .unwrap_or(0)
            > 0,
        "the change came through the event stream"
    );
    b.screenshot(&shots.join("overview-imap-down.png"))
        .expect("screenshot");

    // 3. The target page: one latency line per region.
    b.goto(&format!("{base}/#/target/{DOMAIN}"))
        .expect("target page");
    let chart = r#"[data-chart="latency"][data-key="imap · connect"]"#;
    b.wait(&format!("{chart} path.series"), PAGE)
        .expect("latency chart");
    let drawn = b
        .eval(&format!(
            "[...document.querySelectorAll('{chart} path.series')].map(p => p.dataset.region).sort()"
        ))
        .expect("lines");
    assert_eq!(
        drawn,
        serde_json::json!(["ap-south", "eu-west", "us-east"]),
        "one connect latency line per region"
    );
    let explanation = b
        .eval("document.getElementById('explanation').textContent")
        .expect("explanation");
    assert!(
        explanation.as_str().is_some_and(|t| !t.is_empty()),
        "the diagnosis is shown: {explanation}"
    );
    let days = b
        .eval("[...document.querySelectorAll('#certs tbody tr td:nth-child(4)')].map(td => td.textContent)")
        .expect("certificate days");
    assert!(
        days.as_array().is_some_and(|d| d
            .iter()
            .any(|t| t.as_str().is_some_and(|t| t.parse::<u32>().is_ok()))),
        "the certificates table shows days left: {days}\nsmtp series: {:?}",
        serde_json::from_str::<Value>(&http_get(&format!("{base}/api/v1/target/{DOMAIN}")).1)
            .ok()
            .and_then(|v| v["series"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s["check"] == "smtp")
            .map(|s| s["facts"].clone())
            .collect::<Vec<_>>()
    );
    // The timeline comes from the stored changes, not only from what the page saw live.
    let (code, body) = http_get(&format!("{base}/api/v1/target/{DOMAIN}"));
    assert_eq!(code, 200, "{body}");
    let stored: Value = serde_json::from_str(&body).expect("target JSON");
    let imap_changes: Vec<&Value> = stored["changes"]
        .as_array()
        .map(|c| c.iter().filter(|e| e["check"] == "imap").collect())
        .unwrap_or_default();
    assert!(
        regions.iter().all(|r| imap_changes
            .iter()
            .any(|e| e["region"] == r.name.as_str() && e["new_state"] != e["old_state"])),
        "a stored imap state change per region: {}",
        stored["changes"]
    );
    let shown = b
        .eval("[...document.querySelectorAll('#timeline li.change')].map(li => li.textContent)")
        .expect("timeline");
    assert!(
        shown.as_array().is_some_and(|l| l
            .iter()
            .any(|t| t.as_str().is_some_and(|t| t.contains("imap")))),
        "the timeline shows the imap changes: {shown}"
    );
    b.screenshot(&shots.join("target.png")).expect("screenshot");

    // 4. The agents page lists every agent.
    b.goto(&format!("{base}/#/agents")).expect("agents page");
    b.wait("tr[data-agent]", PAGE).expect("agents table");
    let listed = b
        .eval("[...document.querySelectorAll('tr[data-agent]')].map(r => r.dataset.agent).sort()")
        .expect("agents");
    assert_eq!(
        listed,
        serde_json::json!(["agent-ap-south", "agent-eu-west", "agent-us-east"])
    );
    // Every agent has an mTLS certificate from the lab's PKI: its expiry is shown, days ahead.
    let left = b
        .eval("[...document.querySelectorAll('tr[data-agent] td.cert')].map(td => td.dataset.leftDays)")
        .expect("certificate expiry");
    assert!(
        left.as_array().is_some_and(|l| l.len() == 3
            && l.iter().all(|d| d
                .as_str()
                .and_then(|d| d.parse::<i64>().ok())
                .is_some_and(|d| d > 0))),
        "each agent's certificate expiry is shown: {left}"
    );
    b.screenshot(&shots.join("agents.png")).expect("screenshot");
    assert_eq!(b.page_errors().expect("errors"), Vec::<String>::new());
    eprintln!("screenshots in {}", shots.display());
}
