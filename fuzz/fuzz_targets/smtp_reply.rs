//! SMTP reply lines (`agent/src/probe/dialogue.rs` `parse_reply_line`, `parse_reply`) and the EHLO
//! keywords of a reply (`probe/smtp.rs` `parse_ehlo`). Input: the reply's lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxscope_fuzz::{lines, text};

fuzz_target!(|data: &[u8]| {
    let text = text(data);
    mxscope_agent::fuzzing::smtp_reply(&lines(&text));
});
