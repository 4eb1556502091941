//! The demo (`deploy/demo/run` with no domain, `mxscope-demo --once`) runs in the lab: three
//! regions with their own round-trip times, port 25 dropped from ap-south, Postfix and nsd on the
//! mail host, demo.test with a dead backup MX. Its output shows the cross-regional picture:
//! ap-south failing port 25 (its own network) while eu-west and us-east deliver, faster from the
//! nearer region; the backup MX's loss in `diagnose`; the dashboard URL. Then it exits 0 with its
//! lab down.
//!
//! Needs root, `ip`, `nft` and `/dev/net/tun`; fails (never skips) without them. The demo holds
//! the lab flock (`/run/mxscope-lab.lock`) like the other lab tests.

use std::net::SocketAddr;
use std::time::Duration;

use mxscope_tests::binaries::{mxscope_binary, system_tool};
use mxscope_tests::netlab::require_prerequisites;
use mxscope_tests::process::{run, Proc, Spec};
use mxscope_tests::Lab;

/// The demo's own bounds: the lab lock (600 s), the picture (180 s), setup and teardown.
const DEMO_TIMEOUT: Duration = Duration::from_secs(900);
const OTHERS: [&str; 2] = ["eu-west", "us-east"];
const BLOCKED: &str = "ap-south";
const PRIMARY: &str = "mx.demo.test[198.18.0.2]:25";
const BACKUP: &str = "mx2.demo.test[198.18.0.3]:25";

/// The lines under the `== TITLE ==` header, up to the next header or the dashboard line.
fn section<'a>(out: &'a str, title: &str) -> Vec<&'a str> {
    let head = format!("== {title} ==");
    let lines: Vec<&str> = out
        .lines()
        .skip_while(|l| *l != head)
        .skip(1)
        .take_while(|l| !l.starts_with("== ") && !l.starts_with("dashboard: "))
        .collect();
    assert!(!lines.is_empty(), "no `{head}` section in:\n{out}");
    lines
}

/// The status row (whitespace-split cells) of demo.test's `endpoint` smtp from `region`.
fn status_row<'a>(status: &[&'a str], endpoint: &str, region: &str) -> Vec<&'a str> {
    let cells = status
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.len() > 6 && c[..4] == ["demo.test", endpoint, "smtp", region])
        .unwrap_or_else(|| panic!("no status row for {endpoint} smtp {region}: {status:#?}"));
    cells
}

/// The P50 MS cell of a status row (after TARGET ENDPOINT CHECK REGION STATE REACH).
fn p50(row: &[&str]) -> f64 {
    row[6]
        .parse()
        .unwrap_or_else(|_| panic!("no p50 in {row:?}"))
}

#[test]
fn demo_once_shows_the_blocked_region_and_the_lost_backup_mx() {
    if let Err(e) = require_prerequisites() {
        panic!("the demo test needs the lab: {e:#}");
    }
    let lab = Lab::new("demo-test").expect("lab");
    let demo = mxscope_binary("mxscope-demo").expect("mxscope-demo binary");
    let data = lab.path().join("demo-data");
    let spec = Spec::new("demo", demo).args(["--once", "--dir", data.to_str().expect("utf-8")]);
    let mut proc = Proc::spawn(spec, lab.path()).expect("start demo");
    let status = proc
        .wait_exit(DEMO_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", proc.log_tail(80)));
    let out = proc.log();
    assert!(status.success(), "demo failed ({status}):\n{out}");

    // The lab as the demo built it.
    let lab_lines = section(&out, "lab");
    for (region, rtt) in [("eu-west", "10"), ("us-east", "60"), ("ap-south", "150")] {
        let line = lab_lines
            .iter()
            .find(|l| l.starts_with(region))
            .unwrap_or_else(|| panic!("no lab line for {region}:\n{out}"));
        assert!(line.contains(&format!("rtt {rtt:>4} ms")), "{line}");
        assert_eq!(
            line.contains("port 25 blocked"),
            region == BLOCKED,
            "{line}"
        );
    }

    // status: port 25 of the primary MX fails from ap-south only, by timeout (dropped); the
    // backup MX refuses everywhere else.
    let status = section(&out, "mxscopectl status");
    let blocked = status_row(&status, PRIMARY, BLOCKED);
    assert_eq!(blocked[4], "failing", "{blocked:?}");
    assert!(blocked.contains(&"timeout"), "{blocked:?}");
    for region in OTHERS {
        let row = status_row(&status, PRIMARY, region);
        assert_eq!(row[4], "ok", "{row:?}");
        let backup = status_row(&status, BACKUP, region);
        assert_eq!(backup[4], "failing", "{backup:?}");
        assert!(backup.contains(&"refused"), "{backup:?}");
    }
    // The regions' round-trip times show: eu-west (10 ms) answers faster than us-east (60 ms).
    let (eu, us) = (
        p50(&status_row(&status, PRIMARY, "eu-west")),
        p50(&status_row(&status, PRIMARY, "us-east")),
    );
    assert!(
        eu < us,
        "smtp p50 eu-west {eu} ms < us-east {us} ms:\n{status:#?}"
    );

    // matrix: mail to demo.test is up; ap-south's cell is its agent's fault, nothing failing.
    let matrix = section(&out, "mxscopectl matrix");
    let header: Vec<&str> = matrix[0].split_whitespace().collect();
    assert_eq!(
        header[..7],
        ["TARGET", "CHECK", "SCOPE", "FAILING", "AP-SOUTH", "EU-WEST", "US-EAST"],
        "{matrix:#?}"
    );
    let smtp: Vec<&str> = matrix
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.len() > 6 && c[..2] == ["demo.test", "smtp"])
        .unwrap_or_else(|| panic!("no demo.test smtp matrix row: {matrix:#?}"));
    assert_eq!(smtp[2..4], ["up", "-"], "{smtp:?}");
    assert_eq!(
        smtp[5], "(agent)",
        "ap-south's cell is marked as its agent's: {smtp:?}"
    );
    assert!(
        !smtp[6..8]
            .iter()
            .any(|c| c.contains('!') || c.contains('(')),
        "eu-west and us-east are neither failing nor excluded: {smtp:?}"
    );

    // diagnose: the explanation paragraph names the blocked region and the lost backup MX.
    let diagnose = section(&out, "mxscopectl diagnose demo.test");
    let explanation = diagnose
        .iter()
        .take_while(|l| !l.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        explanation
            .starts_with("Mail to demo.test flows from every region judged (eu-west, us-east)."),
        "{explanation}"
    );
    assert!(
        explanation.contains("Not counted: ap-south") && explanation.contains("its own network"),
        "{explanation}"
    );
    assert!(
        explanation
            .contains("Redundancy: smtp: backup MX mx2.demo.test (198.18.0.3, preference 20)"),
        "{explanation}"
    );

    // The dashboard URL of the collector's --http port.
    let url = out
        .lines()
        .find_map(|l| l.strip_prefix("dashboard: "))
        .unwrap_or_else(|| panic!("no dashboard line in:\n{out}"));
    let addr = url
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix('/'))
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("dashboard URL is not http://IP:PORT/: {url}"));
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{url}");

    // Every agent joined with a token (mTLS, online signing), none with copied certificates.
    for region in ["eu-west", "us-east", "ap-south"] {
        assert!(
            out.contains(&format!(
                "demo: agent-demo-{region} enrolled with its token"
            )),
            "agent in {region} enrolled with a token:\n{out}"
        );
    }
    let dbs: Vec<_> = std::fs::read_dir(&data)
        .expect("demo data dir")
        .filter_map(|e| Some(e.ok()?.path().join("mxscope.db")))
        .filter(|db| db.is_file())
        .collect();
    assert_eq!(dbs.len(), 1, "one run's collector db under --dir: {dbs:?}");

    // The lab is down: none of its namespaces is left.
    let prefix = out
        .lines()
        .find_map(|l| l.strip_prefix("demo: lab ")?.split_whitespace().next())
        .unwrap_or_else(|| panic!("the demo named no lab prefix:\n{out}"));
    let ip = system_tool("ip", "iproute2").expect("ip");
    let namespaces = run(&ip, &["netns", "list"]).expect("ip netns list");
    assert!(
        !namespaces.contains(&format!("{prefix}-")),
        "namespaces of lab {prefix} left behind:\n{namespaces}"
    );
}
