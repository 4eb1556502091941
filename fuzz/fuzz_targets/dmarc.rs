//! DMARC records (`probe/policy/dmarc.rs` `parse`, `evaluate`). Input: a record (each line is also
//! one of several TXT records at `_dmarc`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxscope_agent::probe::policy::dmarc;
use mxscope_fuzz::{lines, text};

fuzz_target!(|data: &[u8]| {
    let text = text(data);
    if let Ok(r) = dmarc::parse(&text) {
        assert!(r.pct <= 100);
    }
    let lines: Vec<String> = lines(&text).into_iter().map(str::to_string).collect();
    let verdict = dmarc::evaluate(&lines);
    let worst = verdict.findings.iter().map(|f| f.severity()).max();
    assert!(worst.is_none_or(|w| w <= verdict.outcome));
});
