//! Certificate facts from arbitrary DER (`probe/tls.rs` `read_leaf`, `rfc3339`). Input: the DER.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|der: &[u8]| {
    mxscope_agent::fuzzing::certificate(der);
});
