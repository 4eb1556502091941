//! RFC 3463 enhanced mail system status codes (`5.1.1`): the one parser the agent's SMTP dialogue
//! and the bounce explainer share. Meanings live with the bounce explainer; this is the syntax.

use std::fmt;

/// An enhanced status code, `class.subject.detail` (class 2, 4 or 5; 1-3 digits each for the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatusCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl StatusCode {
    /// Parses exactly `class.subject.detail`, nothing before or after.
    pub fn parse(s: &str) -> Option<StatusCode> {
        let mut parts = s.split('.');
        let (class, subject, detail) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let num = |p: &str| -> Option<u16> {
            if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let class = match class {
            "2" => 2,
            "4" => 4,
            "5" => 5,
            _ => return None,
        };
        Some(StatusCode {
            class,
            subject: num(subject)?,
            detail: num(detail)?,
        })
    }

    /// The code as the first word of `text`, as an SMTP reply line carries it after the reply
    /// code (`550 5.1.1 user unknown` → the text after `550 `).
    pub fn leading(text: &str) -> Option<StatusCode> {
        StatusCode::parse(text.split_ascii_whitespace().next()?)
    }

    /// The first code standing alone anywhere in `line`: not part of a longer dotted number or a
    /// word (`v1.5.2.3`, `id 4.5.6a` are not codes); a sentence may end right after it (`5.4.4.`).
    pub fn find(line: &str) -> Option<StatusCode> {
        let bytes = line.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            if !matches!(b, b'2' | b'4' | b'5') {
                continue;
            }
            if i > 0
                && bytes
                    .get(i - 1)
                    .is_some_and(|p| p.is_ascii_alphanumeric() || *p == b'.')
            {
                continue;
            }
            let end = bytes
                .get(i..)
                .and_then(|tail| {
                    tail.iter()
                        .position(|c| !(c.is_ascii_digit() || *c == b'.'))
                })
                .map_or(bytes.len(), |p| i + p);
            let candidate = line.get(i..end).unwrap_or_default();
            let candidate = candidate.strip_suffix('.').unwrap_or(candidate);
            if bytes.get(end).is_some_and(|c| c.is_ascii_alphabetic()) {
                continue;
            }
            if let Some(code) = StatusCode::parse(candidate) {
                return Some(code);
            }
        }
        None
    }
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(c: u8, s: u16, d: u16) -> Option<StatusCode> {
        Some(StatusCode {
            class: c,
            subject: s,
            detail: d,
        })
    }

    #[test]
    fn parse_and_leading() {
        assert_eq!(StatusCode::parse("2.0.0"), code(2, 0, 0));
        assert_eq!(StatusCode::parse("4.7.1000"), None);
        assert_eq!(StatusCode::parse("3.1.1"), None);
        assert_eq!(StatusCode::parse("5.1"), None);
        assert_eq!(StatusCode::leading("4.2.0 greylisted"), code(4, 2, 0));
        assert_eq!(StatusCode::leading("user unknown 5.1.1"), None);
        assert_eq!(
            code(5, 7, 26).map(|c| c.to_string()).as_deref(),
            Some("5.7.26")
        );
    }

    #[test]
    fn find_standing_alone() {
        assert_eq!(
            StatusCode::find("host [192.0.2.25] said 550 5.1.1 no"),
            code(5, 1, 1)
        );
        assert_eq!(StatusCode::find("by relay (Exim 4.96) id 4.5.6a"), None);
        assert_eq!(StatusCode::find("v1.5.2.3 and 2.0.2.25"), None);
        assert_eq!(StatusCode::find("failed with 5.4.4."), code(5, 4, 4));
        assert_eq!(StatusCode::find("x5.1.1 5.1"), None);
    }
}
