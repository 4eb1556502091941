//! DANE TLSA matching (`probe/dane.rs` `matches`). Input: usage, selector, matching type, data
//! length n (one byte each), n bytes of association data, then the certificate's DER.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxscope_agent::probe::resolve::TlsaRecord;

fuzz_target!(|data: &[u8]| {
    let Some(([usage, selector, matching, n], rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let n = usize::from(*n).min(rest.len());
    let (assoc, cert) = rest.split_at(n);
    let record = TlsaRecord {
        usage: *usage,
        selector: *selector,
        matching: *matching,
        data: assoc.to_vec(),
    };
    mxscope_agent::fuzzing::dane(&record, cert);
    mxscope_agent::fuzzing::certificate(cert);
});
