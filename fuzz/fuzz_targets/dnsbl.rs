//! DNS blocklist answers (`probe/dnsbl/parse.rs` `classify_answer`, `reverse_query_name`). Input:
//! zone length n, n bytes of zone name, then the answer's addresses: a tag byte each (even: the
//! next 4 bytes are an IPv4 address, odd: the next 16 an IPv6 address).
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n).min(rest.len());
    let (zone, mut rest) = rest.split_at(n);
    let zone = String::from_utf8_lossy(zone);
    let mut answers: Vec<IpAddr> = Vec::new();
    while let Some((&tag, after)) = rest.split_first() {
        if tag % 2 == 0 {
            let Some((v4, after)) = after.split_first_chunk::<4>() else {
                break;
            };
            answers.push(IpAddr::from(*v4));
            rest = after;
        } else {
            let Some((v6, after)) = after.split_first_chunk::<16>() else {
                break;
            };
            answers.push(IpAddr::from(*v6));
            rest = after;
        }
    }
    mxscope_agent::fuzzing::dnsbl(&answers, &zone);
});
