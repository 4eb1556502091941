//! The plain-text fallback: bounces without a delivery-status part (Exim's plain ones) scanned
//! line by line for recipient addresses and the status or reply codes next to them, stopping where
//! the original message is quoted.

use mxscope_proto::StatusCode;

use super::{Action, RecipientReport};

/// Lines after which a bounce quotes the original message, which must not be scanned.
const QUOTE_MARKERS: &[&str] = &[
    "------ this is a copy of the message",
    "------ this is a copy of your message",
    "original message headers:",
    "----- original message -----",
    "--- below this line is a copy of the message",
];

pub(super) fn scan_text(parts: &[&str]) -> Vec<RecipientReport> {
    let mut out: Vec<RecipientReport> = Vec::new();
    for text in parts {
        let mut current: Option<String> = None;
        let mut previous_was_code = false;
        for line in text.lines() {
            let lower = line.trim().to_ascii_lowercase();
            if QUOTE_MARKERS.iter().any(|m| lower.starts_with(m)) {
                break;
            }
            let addresses = find_addresses(line);
            let code = StatusCode::find(line).or_else(|| basic_reply_code(line));
            let Some(code) = code.filter(|c| c.class != 2) else {
                if let Some(a) = addresses.first() {
                    current = Some(a.clone());
                }
                previous_was_code = false;
                continue;
            };
            let Some(recipient) = addresses.first().cloned().or_else(|| current.clone()) else {
                previous_was_code = false;
                continue;
            };
            current = Some(recipient.clone());
            let continued = out.last_mut().filter(|last| {
                previous_was_code
                    && last.status == Some(code)
                    && last.final_recipient.as_deref() == Some(&recipient)
            });
            if let Some(last) = continued {
                let more = strip_reply_prefix(line.trim());
                if let Some(d) = last.diagnostic.as_mut() {
                    d.push(' ');
                    d.push_str(more);
                }
            } else if !out
                .iter()
                .any(|r| r.final_recipient.as_deref() == Some(&recipient))
            {
                let mut r = RecipientReport::new(Some(recipient));
                r.action = Some(if code.class == 5 {
                    Action::Failed
                } else {
                    Action::Delayed
                });
                r.set_status(Some(code));
                r.diagnostic = Some(line.trim().to_string());
                out.push(r);
            }
            previous_was_code = true;
        }
    }
    out
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

/// A line starting with a bare SMTP reply code (`550 Unrouteable address`) → `5.0.0`.
fn basic_reply_code(line: &str) -> Option<StatusCode> {
    let t = line.trim_start();
    let code = t.get(..3)?;
    let next = t.get(3..4);
    let digits = code.as_bytes();
    let class = match digits.first()? {
        b'4' => 4,
        b'5' => 5,
        _ => return None,
    };
    let valid = digits.iter().all(u8::is_ascii_digit) && matches!(next, None | Some(" " | "-"));
    valid.then_some(StatusCode {
        class,
        subject: 0,
        detail: 0,
    })
}

/// E-mail addresses in a line, `mailto:` and angle brackets removed, in order of appearance.
fn find_addresses(line: &str) -> Vec<String> {
    let is_local = |c: char| c.is_ascii_alphanumeric() || "._%+-=!#$&'*/?^`{|}~".contains(c);
    let is_domain = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '-';
    let mut out: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (at, _) in line.match_indices('@') {
        let before = line.get(..at).unwrap_or_default();
        let after = line.get(at + 1..).unwrap_or_default();
        let local_start = before.rfind(|c: char| !is_local(c)).map_or(0, |p| p + 1);
        let local = before.get(local_start..).unwrap_or_default();
        let local = local.rsplit_once(':').map_or(local, |(_, l)| l);
        let domain_end = after.find(|c: char| !is_domain(c)).unwrap_or(after.len());
        let domain = after
            .get(..domain_end)
            .unwrap_or_default()
            .trim_end_matches(['.', '-']);
        if local.is_empty() || !domain.contains('.') || domain.starts_with('.') {
            continue;
        }
        let address = format!("{local}@{domain}");
        if seen.insert(address.clone()) {
            out.push(address);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: &str) -> Option<StatusCode> {
        StatusCode::parse(s)
    }

    #[test]
    fn bare_reply_codes_become_class_x_0_0() {
        // the enhanced-code finder itself is mxscope_proto::StatusCode::find, tested there
        assert_eq!(
            basic_reply_code("   550 Unrouteable address"),
            status("5.0.0")
        );
        assert_eq!(basic_reply_code("550-first line"), status("5.0.0"));
        assert_eq!(basic_reply_code("5500 things"), None);
        assert_eq!(basic_reply_code("250 ok"), None);
    }

    #[test]
    fn address_finder() {
        assert_eq!(
            find_addresses("RCPT TO:<bob@gone.example>: and mailto:x.y+z@sub.example.org."),
            vec![
                "bob@gone.example".to_string(),
                "x.y+z@sub.example.org".to_string()
            ]
        );
        assert!(find_addresses("user@localhost and @example.com").is_empty());
    }

    proptest::proptest! {
        #[test]
        fn finders_never_panic(s in "\\PC*") {
            let _ = find_addresses(&s);
            let _ = scan_text(&[s.as_str()]);
        }
    }
}
