//! `mxscopectl spf check` against a real nsd on loopback serving one SPF policy that uses `a`,
//! `mx`, `include`, `ptr` and `exp=`: each client address gets its result, the mechanism that
//! matched and, for `fail`, the expanded explanation; bad input exits non-zero with a message.

use std::process::{Command, Output};

use mxscope_tests::binaries::{mxscope_binary, CTL};
use mxscope_tests::nsd::{MailZone, Nsd, Zone};
use mxscope_tests::Lab;
use serde_json::Value;

fn zones() -> Vec<Zone> {
    vec![
        MailZone::new("spf.test")
            .mx(10, "mx", &["127.0.0.21".parse().unwrap()])
            .record("@ IN A 127.0.0.20")
            .record(
                "@ IN TXT \"v=spf1 a mx include:partner.test ptr:relays.spf.test \
                 -ip4:127.0.9.0/24 ~all exp=why.%{d}\"",
            )
            .record("why IN TXT \"%{i} may not send for %{d} (sender %{s}, helo %{h})\"")
            .record("out.relays IN A 127.0.0.23")
            // a PTR name that does not resolve back to the address is not validated
            .record("forged.relays IN A 127.0.0.1")
            .build(),
        MailZone::new("partner.test")
            .record("@ IN TXT \"v=spf1 ip4:127.0.0.22 -all\"")
            .build(),
        Zone {
            name: "0.0.127.in-addr.arpa".to_string(),
            text: "$ORIGIN 0.0.127.in-addr.arpa.\n$TTL 300\n\
                   @ IN SOA ns1.spf.test. hostmaster.spf.test. 1 3600 600 86400 300\n\
                   @ IN NS ns1.spf.test.\n\
                   23 IN PTR out.relays.spf.test.\n\
                   24 IN PTR forged.relays.spf.test.\n"
                .to_string(),
        },
    ]
}

fn ctl(nsd: &Nsd, args: &[&str]) -> Output {
    let resolver = nsd.addr().to_string();
    let mut full = vec!["spf", "check"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--resolver", &resolver]);
    Command::new(mxscope_binary(CTL).expect("mxscopectl built"))
        .args(&full)
        .output()
        .expect("run mxscopectl")
}

fn check_json(nsd: &Nsd, ip: &str) -> Value {
    let out = ctl(
        nsd,
        &[
            "spf.test",
            "--ip",
            ip,
            "--sender",
            "alice@spf.test",
            "--helo",
            "mta.example.net",
            "--format",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "{ip}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{ip}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn spf_check_answers_per_address_with_mechanism_and_explanation() {
    let lab = Lab::new("spf-check").expect("lab");
    let nsd = Nsd::start(&lab, &zones()).expect("nsd with the spf zones");

    let cases = [
        ("127.0.0.20", "pass", Some("a")),
        ("127.0.0.21", "pass", Some("mx")),
        ("127.0.0.22", "pass", Some("include:partner.test")),
        ("127.0.0.23", "pass", Some("ptr:relays.spf.test")),
        ("127.0.0.24", "softfail", Some("~all")),
        ("127.0.9.5", "fail", Some("-ip4:127.0.9.0/24")),
    ];
    assert!(!cases.is_empty());
    for (ip, result, mechanism) in cases {
        let v = check_json(&nsd, ip);
        assert_eq!(v["result"], result, "{ip}: {v}");
        assert_eq!(v["mechanism"].as_str(), mechanism, "{ip}: {v}");
        assert_eq!(v["domain"], "spf.test", "{ip}: {v}");
        assert!(v["lookups"].as_u64().is_some_and(|n| n >= 1), "{ip}: {v}");
        if result == "fail" {
            assert_eq!(
                v["explanation"],
                "127.0.9.5 may not send for spf.test (sender alice@spf.test, helo mta.example.net)",
                "{v}"
            );
        } else {
            assert!(v["explanation"].is_null(), "{ip}: {v}");
        }
    }
    // the include is evaluated in the partner's record but matched in the parent's
    let v = check_json(&nsd, "127.0.0.22");
    assert_eq!(v["matched_in"], "spf.test", "{v}");

    // the table names the result and the mechanism too
    let out = ctl(&nsd, &["spf.test", "--ip", "127.0.0.23"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("pass") && text.contains("ptr:relays.spf.test"),
        "{text}"
    );
}

#[test]
fn spf_check_refuses_bad_input_with_a_message() {
    let lab = Lab::new("spf-check-bad").expect("lab");
    let nsd = Nsd::start(&lab, &zones()).expect("nsd");
    let cases: [(&[&str], &str); 3] = [
        (
            &["localhost", "--ip", "127.0.0.1"],
            "not a fully qualified domain name",
        ),
        (&["spf.test", "--ip", "127.0.0.300"], "invalid value"),
        (
            &["spf.test", "--ip", "127.0.0.1", "--sender", "nobody"],
            "not an address",
        ),
    ];
    for (args, message) in cases {
        let out = ctl(&nsd, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(message), "{args:?}: {err}");
    }
}
