//! MTA-STS (`probe/policy/mtasts.rs`): the `_mta-sts` TXT record (the whole input, and each line as
//! one of several TXT records) and the policy file (the whole input), then every policy `mx`
//! pattern against every line as an MX host. Input: a record or a policy body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxscope_agent::probe::policy::mtasts;
use mxscope_fuzz::{lines, text};

fuzz_target!(|data: &[u8]| {
    let text = text(data);
    let lines: Vec<String> = lines(&text).into_iter().map(str::to_string).collect();
    if let Ok(r) = mtasts::parse_record(&text) {
        assert!(!r.id.is_empty());
    }
    let _ = mtasts::select_record(&lines);
    if let Ok(policy) = mtasts::parse_policy(&text) {
        assert!(policy.max_age <= mtasts::MAX_AGE_LIMIT);
        let unmatched = mtasts::check_mx_set(&policy, &lines);
        assert!(unmatched.len() <= lines.len());
        for pattern in &policy.mx {
            for host in &lines {
                let _ = mtasts::mx_matches(pattern, host);
            }
        }
    }
});
