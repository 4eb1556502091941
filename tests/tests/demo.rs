//! The demo (`deploy/demo/run` with no domain) runs offline against the private lab servers, its
//! agents joining the collector with enrolment tokens, and prints a status table with rows from
//! all three regions, then cleans up with `--once`.

use std::time::Duration;

use mxscope_tests::binaries::mxscope_binary;
use mxscope_tests::process::{Proc, Spec};
use mxscope_tests::Lab;

#[test]
fn demo_once_prints_status_for_three_regions() {
    let lab = Lab::new("demo-test").expect("lab");
    let demo = mxscope_binary("mxscope-demo").expect("mxscope-demo binary");
    let data = lab.path().join("demo-data");
    let spec = Spec::new("demo", demo).args(["--once", "--dir", data.to_str().expect("utf-8")]);
    let mut proc = Proc::spawn(spec, lab.path()).expect("start demo");
    let status = proc
        .wait_exit(Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("{e}\n{}", proc.log_tail(60)));
    let out = proc.log();
    assert!(status.success(), "demo failed ({status}):\n{out}");

    let header = out
        .lines()
        .find(|l| l.contains("TARGET") && l.contains("REGION"))
        .unwrap_or_else(|| panic!("no status table header in:\n{out}"));
    assert!(header.contains("STATE"), "{header}");
    let rows: Vec<&str> = out.lines().filter(|l| l.contains("demo.test")).collect();
    assert!(!rows.is_empty(), "no demo.test rows:\n{out}");
    for region in ["eu-west", "us-east", "ap-south"] {
        assert!(
            rows.iter().any(|r| r.contains(region)),
            "no row for {region}:\n{out}"
        );
        // The offline servers answer, so every region's smtp row is ok.
        assert!(
            rows.iter()
                .any(|r| r.contains(region) && r.contains(" smtp ") && r.contains(" ok ")),
            "no ok smtp row for {region}:\n{out}"
        );
    }
    assert!(data.join("mxscope.db").exists(), "collector db under --dir");
    // Every agent joined with a token (mTLS, online signing), none with copied certificates.
    for region in ["eu-west", "us-east", "ap-south"] {
        assert!(
            out.contains(&format!(
                "demo: agent-demo-{region} enrolled with its token"
            )),
            "agent in {region} enrolled with a token:\n{out}"
        );
    }
}
