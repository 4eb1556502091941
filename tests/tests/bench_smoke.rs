//! CI keeps the benchmarks from rotting: `mxscope-bench --smoke` (tiny sizes, no thresholds) runs
//! every benchmark against the real binaries (PostgreSQL ingest on a private cluster of Debian's
//! `postgresql`) and writes a report with every section.

use std::process::Command;

#[test]
fn bench_smoke_writes_a_report_with_every_section() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("BENCHMARKS.md");
    let run = Command::new(env!("CARGO_BIN_EXE_mxscope-bench"))
        .arg("--smoke")
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run mxscope-bench --smoke");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "mxscope-bench --smoke failed:\n{stderr}"
    );
    let report = std::fs::read_to_string(&out).expect("report written");
    let sections = [
        "## 1. Collector ingest",
        "## 2. Probe → queryable latency",
        "## 3. Query latency",
        "## 4. Agent cost",
        "## 5. Agent footprint",
        "## 6. Timing accuracy",
        "## 7. PostgreSQL ingest",
        "## 8. Dashboard overview in a browser",
    ];
    for s in sections {
        assert!(report.contains(s), "report lacks '{s}':\n{report}");
    }
    // Every benchmark measured something: no section says it did not run.
    assert!(!report.contains("did not run"), "{report}");
    assert!(
        report.contains("30-day history: raw rusqlite |"),
        "{report}"
    );
    assert!(
        report.contains("live, every series every 60 s: collector"),
        "{report}"
    );
    assert!(report.contains("blackbox_exporter"), "{report}");
    // PostgreSQL ingest measured all three configurations side by side.
    for row in [
        "| PostgreSQL COPY (binary), one connection |",
        "| 1 collector, 4 streams |",
        "| 2 collectors, 2 streams each |",
    ] {
        assert!(report.contains(row), "report lacks '{row}':\n{report}");
    }
}
