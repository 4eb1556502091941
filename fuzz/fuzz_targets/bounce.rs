//! The bounce explainer (`ctl/src/bounce`: MIME walk, RFC 3464 delivery-status fields, text scan)
//! on an arbitrary message, and its report as `mxscopectl bounce --json` prints it. Input: the
//! message as received.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxscope_ctl::bounce;

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = bounce::parse(data) {
        assert!(!report.recipients.is_empty());
        for r in &report.recipients {
            assert_eq!(r.meaning.is_some(), r.status.is_some());
        }
        serde_json::to_string(&report).expect("report serialises");
    }
});
