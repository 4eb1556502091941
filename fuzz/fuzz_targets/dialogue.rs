//! The dialogue line reader (`probe/dialogue.rs` `Dialogue`) on an arbitrary server byte stream,
//! read as the SMTP, IMAP or POP3 probe reads it (`probe/imap.rs` `tagged`, `parse_ehlo`,
//! `parse_capa`). Input: 5 header bytes, then what the server sends:
//! `[0]` protocol (`S`, `I`, `P`, else by value mod 3), `[1]` read size (0 = whole reads),
//! `[2]` longest line = 8 + 4 × value, `[3]` most lines = 1 + value mod 64,
//! `[4]` most bytes = 64 × (1 + value).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxscope_agent::fuzzing::{dialogue, Protocol};

fuzz_target!(|data: &[u8]| {
    let Some((head, stream)) = data.split_first_chunk::<5>() else {
        return;
    };
    let protocol = match head[0] {
        b'S' => Protocol::Smtp,
        b'I' => Protocol::Imap,
        b'P' => Protocol::Pop3,
        n => [Protocol::Smtp, Protocol::Imap, Protocol::Pop3][usize::from(n % 3)],
    };
    dialogue(
        protocol,
        stream,
        usize::from(head[1]),
        8 + 4 * usize::from(head[2]),
        1 + usize::from(head[3] % 64),
        64 * (1 + usize::from(head[4])),
    );
});
