//! IMAP responses (`probe/imap.rs`: capability lists, status words, quoting) and POP3 `CAPA` lists
//! (`probe/pop3.rs` `parse_capa`). Input: response lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxscope_fuzz::{lines, text};

fuzz_target!(|data: &[u8]| {
    let text = text(data);
    let lines = lines(&text);
    mxscope_agent::fuzzing::imap_response(&lines);
    mxscope_agent::fuzzing::pop3_capa(&lines);
});
