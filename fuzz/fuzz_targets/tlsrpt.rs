//! TLS-RPT records (`probe/policy/tlsrpt.rs` `parse`, `select`). Input: a record (each line is also
//! one of several TXT records at `_smtp._tls`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxscope_agent::probe::policy::tlsrpt;
use mxscope_fuzz::{lines, text};

fuzz_target!(|data: &[u8]| {
    let text = text(data);
    if let Ok(r) = tlsrpt::parse(&text) {
        assert!(!r.rua.is_empty());
    }
    let lines: Vec<String> = lines(&text).into_iter().map(str::to_string).collect();
    let _ = tlsrpt::select(&lines);
});
