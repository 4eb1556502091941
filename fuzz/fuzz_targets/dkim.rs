//! DKIM key records (`probe/policy/dkim.rs` `parse`, `key_bits`, `evaluate`). Input: a record
//! (each line is also one of several TXT records at the selector).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxscope_agent::probe::policy::dkim;
use mxscope_fuzz::{lines, text};

fuzz_target!(|data: &[u8]| {
    let text = text(data);
    if let Ok(r) = dkim::parse(&text) {
        let _ = (dkim::key_bits(&r), r.revoked(), r.testing());
    }
    let lines: Vec<String> = lines(&text).into_iter().map(str::to_string).collect();
    let verdict = dkim::evaluate(&lines);
    let worst = verdict.findings.iter().map(|f| f.severity()).max();
    assert!(worst.is_none_or(|w| w <= verdict.outcome));
});
