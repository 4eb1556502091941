//! Postfix queue JSON as `postqueue -j` prints it, one object a line (`probe/queue/parse.rs`
//! `summarize`). Input: the program's output.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxscope_fuzz::text;

fuzz_target!(|data: &[u8]| {
    let text = text(data);
    mxscope_agent::fuzzing::postqueue(&text, 1_741_000_000);
    mxscope_agent::fuzzing::postqueue(&text, 0);
});
