//! The prose reader: the human-readable part of a notice cut into one block per recipient. A
//! recipient is an address that starts a line (`<bob@x>:`, `bob@x on 3/4/2025`, `Recipient
//! address: bob@x`) or follows "delivered to"; addresses quoted inside a reply never are.

use mxscope_proto::StatusCode;

/// Lines after which a notice quotes the original message, which must not be read.
const QUOTE_MARKERS: &[&str] = &[
    "------ this is a copy of the message",
    "------ this is a copy of your message",
    "original message headers:",
    "----- original message -----",
    "-----original message-----",
    "--- below this line is a copy of the message",
    "below is a copy of the original message",
    "----- unsent message follows -----",
    "----- original message follows -----",
    "--- original message follows",
    "------ original message ------",
    "----- message header follows -----",
    "original message follows",
];

/// Words before an address inside a sentence that make it the recipient.
const LEAD_INS: &[&str] = &[
    "wasn't delivered to ",
    "was not delivered to ",
    "couldn't be delivered to ",
    "could not be delivered to ",
    "delivery to the following recipient failed permanently: ",
    "delivery to ",
];

/// Prefixes that may stand before the recipient at the start of a line.
const LINE_PREFIXES: &[&str] = &["recipient address:", "failed recipient:", "recipient:"];

/// One recipient's block of prose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Block {
    pub(super) recipient: String,
    /// The most specific code in the block (enhanced beats a bare reply code).
    pub(super) status: Option<StatusCode>,
    /// The reply: the first line with a code and its continuations, else the first line of prose.
    pub(super) diagnostic: Option<String>,
    /// The remote host named in the block (`host mx.example.net[…]`, `while talking to …`).
    pub(super) remote_mta: Option<String>,
    /// All the block's text, for the wording rules.
    pub(super) text: String,
}

/// The notice's text up to the first quote marker.
pub(super) fn notice_text(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let lower = line.trim().to_ascii_lowercase();
        if QUOTE_MARKERS.iter().any(|m| lower.starts_with(m)) {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// One block per recipient (merged when a recipient appears twice, as in Exchange's
/// "diagnostic information for administrators"); blocks without a code and without any
/// failure wording are dropped by the caller.
pub(super) fn scan_blocks(parts: &[&str]) -> Vec<Block> {
    let mut out: Vec<Block> = Vec::new();
    for text in parts {
        let text = notice_text(text);
        let mut current: Option<usize> = None;
        for line in text.lines() {
            let trimmed = line.trim();
            // an SMTP transcript's command line names addresses, not recipients
            if trimmed.starts_with(">>>") {
                continue;
            }
            let (recipient, rest) = match recipient_of(trimmed) {
                Some((r, rest)) => (Some(r), rest),
                None => (None, trimmed),
            };
            if let Some(r) = recipient {
                let idx = match out
                    .iter()
                    .position(|b| b.recipient.eq_ignore_ascii_case(&r))
                {
                    Some(i) => i,
                    None => {
                        out.push(Block {
                            recipient: r,
                            status: None,
                            diagnostic: None,
                            remote_mta: None,
                            text: String::new(),
                        });
                        out.len() - 1
                    }
                };
                current = Some(idx);
            }
            let Some(block) = current.and_then(|i| out.get_mut(i)) else {
                continue;
            };
            add_detail(block, rest);
        }
    }
    out
}

fn add_detail(block: &mut Block, line: &str) {
    let line = line
        .trim()
        .trim_start_matches("<<<")
        .trim_start_matches('#')
        .trim();
    if line.is_empty() {
        return;
    }
    block.text.push_str(line);
    block.text.push('\n');
    if block.remote_mta.is_none() {
        block.remote_mta = remote_host(line);
    }
    let enhanced = StatusCode::find(line);
    let code = enhanced
        .or_else(|| reply_code(line))
        .filter(|c| c.class != 2);
    match code {
        Some(c) => {
            let better = match block.status {
                None => true,
                Some(old) => specificity(c) > specificity(old),
            };
            let continues = block.status == Some(c) && is_reply_continuation(line);
            if better {
                block.status = Some(c);
                block.diagnostic = Some(reply_from(line).to_string());
            } else if continues {
                if let Some(d) = block.diagnostic.as_mut() {
                    d.push(' ');
                    d.push_str(strip_reply_prefix(line));
                }
            }
        }
        None => {
            if block.diagnostic.is_none() && !is_label(line) {
                block.diagnostic = Some(line.to_string());
            }
        }
    }
}

/// 0 for `x.0.0` (or a bare reply code), 1 for `x.y.0`, 2 for `x.y.z`.
pub(super) fn specificity(c: StatusCode) -> u8 {
    match (c.subject, c.detail) {
        (0, 0) => 0,
        (_, 0) => 1,
        _ => 2,
    }
}

/// Lines that only introduce what follows (`because:`, `host mx said:`), not a reply.
fn is_label(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    line.ends_with(':')
        || lower.starts_with("host ")
        || lower.starts_with("generating server")
        || lower.starts_with("remote system")
        || lower.starts_with("original address")
        || lower.starts_with("reason:")
        || lower.starts_with("smtp error from remote")
}

fn is_reply_continuation(line: &str) -> bool {
    reply_code(line).is_some()
}

/// The reply starting at its code: `… said: 550 5.1.1 text` → `550 5.1.1 text`.
fn reply_from(line: &str) -> &str {
    for marker in ["said: ", "returned '", "(reason: ", "reason: "] {
        if let Some(pos) = line.to_ascii_lowercase().find(marker) {
            let tail = line.get(pos + marker.len()..).unwrap_or(line);
            return tail.trim_end_matches(['\'', ')']).trim();
        }
    }
    line.trim_start_matches("(reason:")
        .trim()
        .trim_end_matches(')')
}

/// `550-5.1.1 text` or `550 text` → `text`.
fn strip_reply_prefix(line: &str) -> &str {
    let mut rest = line;
    for _ in 0..2 {
        if let Some((first, tail)) = rest.split_once([' ', '-']) {
            let is_code = (first.len() == 3 && first.bytes().all(|b| b.is_ascii_digit()))
                || StatusCode::parse(first).is_some();
            if is_code {
                rest = tail.trim_start();
            }
        }
    }
    rest
}

/// A line starting with a bare SMTP reply code (`550 Unrouteable address`, `554: …`) → `5.0.0`.
pub(super) fn reply_code(line: &str) -> Option<StatusCode> {
    let t = line.trim_start();
    let code = t.get(..3)?;
    let next = t.get(3..4);
    let digits = code.as_bytes();
    let class = match digits.first()? {
        b'4' => 4,
        b'5' => 5,
        _ => return None,
    };
    let valid =
        digits.iter().all(u8::is_ascii_digit) && matches!(next, None | Some(" " | "-" | ":"));
    valid.then_some(StatusCode {
        class,
        subject: 0,
        detail: 0,
    })
}

/// The recipient a line names and the rest of the line after it.
fn recipient_of(line: &str) -> Option<(String, &str)> {
    let lower = line.to_ascii_lowercase();
    let mut start = line;
    for p in LINE_PREFIXES {
        if lower.starts_with(p) {
            start = line.get(p.len()..).unwrap_or_default().trim_start();
            break;
        }
    }
    if let Some((addr, rest)) = leading_address(start) {
        return Some((addr, rest));
    }
    for lead in LEAD_INS {
        if let Some(pos) = lower.find(lead) {
            let tail = line.get(pos + lead.len()..).unwrap_or_default();
            if let Some((addr, rest)) = leading_address(tail) {
                return Some((addr, rest));
            }
        }
    }
    None
}

/// An address at the very start of `s` (after `<`, `"` or `mailto:`), and what follows it.
fn leading_address(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start_matches(['<', '"', '\'']);
    let s = s.strip_prefix("mailto:").unwrap_or(s);
    let end = s
        .find(|c: char| c.is_whitespace() || "<>\"'(),;[]".contains(c))
        .unwrap_or(s.len());
    let word = s.get(..end)?;
    let word = word.trim_end_matches([':', '.']);
    let (local, domain) = word.rsplit_once('@')?;
    let local_ok = !local.is_empty()
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._%+-=!#$&'*/?^`{|}~".contains(c));
    let domain_ok = domain.contains('.')
        && !domain.starts_with('.')
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if !(local_ok && domain_ok) {
        return None;
    }
    let mut rest = s.get(end..).unwrap_or_default();
    // `bob@x<mailto:bob@x>` (Office 365 text parts)
    if let Some(r) = rest.strip_prefix("<mailto:") {
        rest = r.split_once('>').map_or("", |(_, t)| t);
    }
    let rest = rest
        .trim_start_matches(['>', '"', '\''])
        .trim_start_matches("...")
        .trim_start_matches(':')
        .trim();
    Some((word.to_string(), rest))
}

/// The remote host a line names.
fn remote_host(line: &str) -> Option<String> {
    let lower = line.to_ascii_lowercase();
    for marker in [
        "host ",
        "while talking to ",
        "remote system: dns;",
        "remote server: ",
    ] {
        let Some(pos) = lower.find(marker) else {
            continue;
        };
        let tail = lower
            .get(pos + marker.len()..)
            .unwrap_or_default()
            .trim_start();
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
            .unwrap_or(tail.len());
        let name = tail.get(..end).unwrap_or_default().trim_end_matches('.');
        if name.contains('.') && name.chars().any(|c| c.is_ascii_alphabetic()) {
            return Some(name.to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: &str) -> Option<StatusCode> {
        StatusCode::parse(s)
    }

    #[test]
    fn bare_reply_codes_become_class_x_0_0() {
        assert_eq!(reply_code("   550 Unrouteable address"), status("5.0.0"));
        assert_eq!(reply_code("550-first line"), status("5.0.0"));
        assert_eq!(reply_code("554: delivery error"), status("5.0.0"));
        assert_eq!(reply_code("5500 things"), None);
        assert_eq!(reply_code("250 ok"), None);
    }

    #[test]
    fn recipients_start_a_line_or_follow_a_lead_in() {
        let r = |l: &str| recipient_of(l).map(|(a, rest)| (a, rest.to_string()));
        assert_eq!(
            r("<bob@x.example>: host mx said: 550 <eve@y.example> rejected"),
            Some((
                "bob@x.example".into(),
                "host mx said: 550 <eve@y.example> rejected".into()
            ))
        );
        assert_eq!(
            r("bob@x.example on 3/4/2025 10:00 AM").map(|x| x.0),
            Some("bob@x.example".into())
        );
        assert_eq!(
            r("Recipient address: bob@x.example").map(|x| x.0),
            Some("bob@x.example".into())
        );
        assert_eq!(
            r("Your message wasn't delivered to bob@x.example because the address couldn't be found")
                .map(|x| x.0),
            Some("bob@x.example".into())
        );
        assert_eq!(
            r("bob@x.example<mailto:bob@x.example>").map(|x| x.0),
            Some("bob@x.example".into())
        );
        assert_eq!(r("550 5.1.1 <eve@y.example>: unknown"), None);
        assert_eq!(
            r("SMTP error from remote mail server after RCPT TO:<bob@x.example>:"),
            None
        );
        assert_eq!(r("user@localhost: nope"), None);
    }

    #[test]
    fn an_address_quoted_in_the_reply_is_not_a_recipient() {
        let text = "The following address(es) failed:\n\n  bob@x.example\n    host mx.x.example [192.0.2.1]\n    \
                    SMTP error from remote mail server after RCPT TO:<bob@x.example>:\n    \
                    550 5.7.1 <alice@sender.example>: Sender address rejected: Access denied\n";
        let blocks = scan_blocks(&[text]);
        assert_eq!(blocks.len(), 1, "{blocks:?}");
        let b = &blocks[0];
        assert_eq!(b.recipient, "bob@x.example");
        assert_eq!(b.status, status("5.7.1"));
        assert_eq!(b.remote_mta.as_deref(), Some("mx.x.example"));
        assert_eq!(
            b.diagnostic.as_deref(),
            Some("550 5.7.1 <alice@sender.example>: Sender address rejected: Access denied")
        );
    }

    #[test]
    fn quote_marker_ends_the_notice() {
        let text = "bob@x.example: 550 5.1.1 unknown\n------ This is a copy of the message\n\ncarol@y.example: 550 5.2.2 full\n";
        let blocks = scan_blocks(&[text]);
        assert_eq!(blocks.len(), 1);
    }

    proptest::proptest! {
        #[test]
        fn scanner_never_panics(s in "\\PC*") {
            let _ = scan_blocks(&[s.as_str()]);
            let _ = recipient_of(&s);
            let _ = remote_host(&s);
        }
    }
}
