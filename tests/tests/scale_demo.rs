//! The scaled demo (`deploy/scale/run`, `mxscope-demo --postgres`) runs offline: a private
//! PostgreSQL cluster, two collectors on one database in it, three agents each given both. With
//! `--once` it prints `agents` and `status` from both collectors, both listing all three agents
//! and the same status rows, then stops collector A and shows every agent streaming to B.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use mxscope_tests::binaries::mxscope_binary;
use mxscope_tests::process::{Proc, Spec};
use mxscope_tests::Lab;

const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];

/// The demo's output cut at its `== collector X (URL): mxscopectl CMD ==` headers: (X, CMD) and
/// the lines up to the next header, in order.
fn sections(out: &str) -> Vec<((String, String), Vec<&str>)> {
    let mut all: Vec<((String, String), Vec<&str>)> = Vec::new();
    for line in out.lines() {
        if let Some(head) = line
            .strip_prefix("== collector ")
            .and_then(|l| l.strip_suffix(" =="))
        {
            let name = head.split_whitespace().next().unwrap_or_default();
            let command = head.rsplit("mxscopectl ").next().unwrap_or_default();
            all.push(((name.to_string(), command.to_string()), Vec::new()));
        } else if let Some((_, lines)) = all.last_mut() {
            lines.push(line);
        }
    }
    all
}

/// The cell of column `column` (e.g. `CONNECTED`, `COLLECTOR`) of each agent row of an `agents`
/// table, by agent id.
fn column(table: &[&str], column: &str) -> BTreeMap<String, String> {
    let header = table
        .iter()
        .find(|l| l.contains("CONNECTED"))
        .unwrap_or_else(|| panic!("no agents table header in {table:?}"));
    let col = header
        .split_whitespace()
        .position(|c| c == column)
        .unwrap_or_else(|| panic!("no {column} column in {header}"));
    table
        .iter()
        .filter(|l| l.starts_with("demo-"))
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            (cells[0].to_string(), cells[col].to_string())
        })
        .collect()
}

/// The gRPC port of collector `name` from the demo's section headers
/// (`== collector A (https://127.0.0.1:PORT): …`).
fn port_of(out: &str, name: &str) -> String {
    let head = format!("== collector {name} (https://");
    let line = out
        .lines()
        .find(|l| l.starts_with(&head))
        .unwrap_or_else(|| panic!("no section of collector {name} in:\n{out}"));
    let url = &line[head.len()..];
    let end = url.find(')').unwrap_or(url.len());
    url[..end]
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// (endpoint, check, region) of the demo.test rows of a `status` table.
fn status_rows(table: &[&str]) -> BTreeSet<(String, String, String)> {
    table
        .iter()
        .filter(|l| l.starts_with("demo.test"))
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (c[1].to_string(), c[2].to_string(), c[3].to_string())
        })
        .collect()
}

#[test]
fn scaled_demo_once_shows_both_collectors_and_a_failover() {
    let lab = Lab::new("scale-demo-test").expect("lab");
    let demo = mxscope_binary("mxscope-demo").expect("mxscope-demo binary");
    let data = lab.path().join("scale-data");
    let spec = Spec::new("scale-demo", demo).args([
        "--postgres",
        "--once",
        "--dir",
        data.to_str().expect("utf-8"),
    ]);
    let mut proc = Proc::spawn(spec, lab.path()).expect("start demo");
    let status = proc
        .wait_exit(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}\n{}", proc.log_tail(80)));
    let out = proc.log();
    assert!(status.success(), "demo failed ({status}):\n{out}");
    assert!(
        out.contains("collectors share postgres://mxscope@127.0.0.1:"),
        "the collectors run on the private PostgreSQL:\n{out}"
    );

    let sections = sections(&out);
    let find = |name: &str, command: &str, nth: usize| {
        sections
            .iter()
            .filter(|((n, c), _)| n == name && c == command)
            .nth(nth)
            .map(|(_, lines)| lines.clone())
            .unwrap_or_else(|| panic!("no {name} {command} section #{nth} in:\n{out}"))
    };

    // Both collectors know all three agents (one database), each as connected, and both name the
    // same collector for it (its `--name`, host:port); each collector has agents streaming to it.
    let (port_a, port_b) = (port_of(&out, "A"), port_of(&out, "B"));
    let ids: BTreeSet<String> = REGIONS.iter().map(|r| format!("demo-{r}")).collect();
    let via = |name: &str, nth: usize| column(&find(name, "agents", nth), "COLLECTOR");
    let (via_a, via_b) = (via("A", 0), via("B", 0));
    for (name, nth) in [("A", 0), ("B", 0)] {
        let connected = column(&find(name, "agents", nth), "CONNECTED");
        let listed: BTreeSet<String> = connected.keys().cloned().collect();
        assert_eq!(listed, ids, "collector {name} lists every agent:\n{out}");
        assert!(
            connected.values().all(|c| c == "yes"),
            "collector {name} sees every agent connected (to it or the other):\n{out}"
        );
    }
    assert_eq!(
        via_a, via_b,
        "A and B name the same collector per agent:\n{out}"
    );
    for (id, c) in &via_a {
        assert!(
            c.ends_with(&format!(":{port_a}")) || c.ends_with(&format!(":{port_b}")),
            "{id} streams to {c}, neither A ({port_a}) nor B ({port_b}):\n{out}"
        );
    }
    for port in [&port_a, &port_b] {
        assert!(
            via_a.values().any(|c| c.ends_with(&format!(":{port}"))),
            "an agent streams to the collector on port {port}:\n{out}"
        );
    }

    // Both show the same status rows, every region's smtp ok (the offline servers answer).
    let (status_a, status_b) = (find("A", "status", 0), find("B", "status", 0));
    let rows_a = status_rows(&status_a);
    assert!(!rows_a.is_empty(), "no demo.test status rows at A:\n{out}");
    assert_eq!(
        rows_a,
        status_rows(&status_b),
        "A and B show the same rows:\n{out}"
    );
    for region in REGIONS {
        for (name, table) in [("A", &status_a), ("B", &status_b)] {
            assert!(
                table.iter().any(|r| r.starts_with("demo.test")
                    && r.contains(region)
                    && r.contains(" smtp ")
                    && r.contains(" ok ")),
                "no ok smtp row for {region} at {name}:\n{out}"
            );
        }
    }

    // Failover: with A stopped, every agent streams to B.
    let after = via("B", 1);
    assert_eq!(after.keys().cloned().collect::<BTreeSet<_>>(), ids, "{out}");
    assert!(
        after.values().all(|c| c.ends_with(&format!(":{port_b}"))),
        "every agent streams to B after A stopped:\n{out}"
    );

    // No SQLite database (PostgreSQL holds everything) and the cluster is gone with the demo.
    assert!(
        !data.join("mxscope.db").exists(),
        "no SQLite db under --dir"
    );
    let left: Vec<_> = std::fs::read_dir(&data)
        .expect("read --dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("mxscope-pg-"))
        .collect();
    assert!(left.is_empty(), "cluster directory left behind: {left:?}");
}
