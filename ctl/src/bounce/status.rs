//! What enhanced status codes mean: the RFC 3463 table (with later IANA registrations) and
//! whether a code is success, temporary or permanent, over the shared syntax of
//! [`mxscope_proto::StatusCode`].

use std::fmt;

use mxscope_proto::StatusCode;
use serde::{Serialize, Serializer};

/// Whether a status means the message got through, may still get through, or never will.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Permanence {
    /// 2.x.x
    Success,
    /// 4.x.x: persistent transient failure; the sender may retry.
    Temporary,
    /// 5.x.x
    Permanent,
}

/// Meanings of a [`StatusCode`]: the bounce explainer's reading of the shared parser's codes.
pub trait Meaning {
    /// From the class: 2 success, 4 temporary, 5 permanent.
    fn permanence(&self) -> Permanence;
    /// The most specific meaning RFC 3463 (and later registrations) give this code.
    fn meaning(&self) -> &'static str;
}

impl Meaning for StatusCode {
    fn permanence(&self) -> Permanence {
        match self.class {
            2 => Permanence::Success,
            4 => Permanence::Temporary,
            _ => Permanence::Permanent,
        }
    }

    fn meaning(&self) -> &'static str {
        detail_meaning(self.subject, self.detail)
            .or_else(|| subject_meaning(self.subject))
            .unwrap_or_else(|| class_meaning(self.class))
    }
}

impl fmt::Display for Permanence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Permanence::Success => "success",
            Permanence::Temporary => "temporary",
            Permanence::Permanent => "permanent",
        })
    }
}

/// Serializes a code as its text (`"5.1.1"`), `null` when absent.
pub(crate) fn serialize_code<S: Serializer>(
    code: &Option<StatusCode>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match code {
        Some(code) => serializer.collect_str(code),
        None => serializer.serialize_none(),
    }
}

/// RFC 3463 §3.1 classes.
pub fn class_meaning(class: u8) -> &'static str {
    match class {
        2 => "success",
        4 => "persistent transient failure",
        5 => "permanent failure",
        _ => "unknown class",
    }
}

/// RFC 3463 §3.2 subjects.
pub fn subject_meaning(subject: u16) -> Option<&'static str> {
    Some(match subject {
        0 => "other or undefined status",
        1 => "addressing status",
        2 => "mailbox status",
        3 => "mail system status",
        4 => "network and routing status",
        5 => "mail delivery protocol status",
        6 => "message content or media status",
        7 => "security or policy status",
        _ => return None,
    })
}

/// RFC 3463 §3.3-3.10 details, with the IANA registry's later additions (RFC 3886, 4468,
/// 4954, 5248, 6531, 6710, 7293, 7372, 7505, 8098, 8617, 8689).
pub fn detail_meaning(subject: u16, detail: u16) -> Option<&'static str> {
    Some(match (subject, detail) {
        (0, 0) => "other undefined status",
        (1, 0) => "other address status",
        (1, 1) => "bad destination mailbox address",
        (1, 2) => "bad destination system address",
        (1, 3) => "bad destination mailbox address syntax",
        (1, 4) => "destination mailbox address ambiguous",
        (1, 5) => "destination address valid",
        (1, 6) => "destination mailbox has moved, no forwarding address",
        (1, 7) => "bad sender's mailbox address syntax",
        (1, 8) => "bad sender's system address",
        (1, 9) => "message relayed to non-compliant mailer",
        (1, 10) => "recipient address has null MX",
        (2, 0) => "other or undefined mailbox status",
        (2, 1) => "mailbox disabled, not accepting messages",
        (2, 2) => "mailbox full",
        (2, 3) => "message length exceeds administrative limit",
        (2, 4) => "mailing list expansion problem",
        (3, 0) => "other or undefined mail system status",
        (3, 1) => "mail system full",
        (3, 2) => "system not accepting network messages",
        (3, 3) => "system not capable of selected features",
        (3, 4) => "message too big for system",
        (3, 5) => "system incorrectly configured",
        (3, 6) => "requested priority was changed",
        (4, 0) => "other or undefined network or routing status",
        (4, 1) => "no answer from host",
        (4, 2) => "bad connection",
        (4, 3) => "directory server failure",
        (4, 4) => "unable to route",
        (4, 5) => "mail system congestion",
        (4, 6) => "routing loop detected",
        (4, 7) => "delivery time expired",
        (5, 0) => "other or undefined protocol status",
        (5, 1) => "invalid command",
        (5, 2) => "syntax error",
        (5, 3) => "too many recipients",
        (5, 4) => "invalid command arguments",
        (5, 5) => "wrong protocol version",
        (5, 6) => "authentication exchange line is too long",
        (6, 0) => "other or undefined media error",
        (6, 1) => "media not supported",
        (6, 2) => "conversion required and prohibited",
        (6, 3) => "conversion required but not supported",
        (6, 4) => "conversion with loss performed",
        (6, 5) => "conversion failed",
        (6, 6) => "message content not available",
        (6, 7) => "non-ASCII addresses not permitted for that sender/recipient",
        (6, 8) => "UTF-8 string reply is required, but not permitted by the SMTP client",
        (6, 9) => "UTF-8 header message cannot be transferred to one or more recipients",
        (6, 10) => "UTF-8 message cannot be transferred to one or more recipients",
        (7, 0) => "other or undefined security status",
        (7, 1) => "delivery not authorized, message refused",
        (7, 2) => "mailing list expansion prohibited",
        (7, 3) => "security conversion required but not possible",
        (7, 4) => "security features not supported",
        (7, 5) => "cryptographic failure",
        (7, 6) => "cryptographic algorithm not supported",
        (7, 7) => "message integrity failure",
        (7, 8) => "authentication credentials invalid",
        (7, 9) => "authentication mechanism is too weak",
        (7, 10) => "encryption needed",
        (7, 11) => "encryption required for requested authentication mechanism",
        (7, 12) => "a password transition is needed",
        (7, 13) => "user account disabled",
        (7, 14) => "trust relationship required",
        (7, 15) => "priority level is too low",
        (7, 16) => "message is too big for the specified priority",
        (7, 17) => "mailbox owner has changed",
        (7, 18) => "domain owner has changed",
        (7, 19) => "RRVS test cannot be completed",
        (7, 20) => "no passing DKIM signature found",
        (7, 21) => "no acceptable DKIM signature found",
        (7, 22) => "no valid author-matched DKIM signature found",
        (7, 23) => "SPF validation failed",
        (7, 24) => "SPF validation error",
        (7, 25) => "reverse DNS validation failed",
        (7, 26) => "multiple authentication checks failed",
        (7, 27) => "sender address has null MX",
        (7, 28) => "mail flood detected",
        (7, 29) => "ARC validation failure",
        (7, 30) => "REQUIRETLS support required",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: &str) -> Option<StatusCode> {
        StatusCode::parse(s)
    }

    #[test]
    fn status_code_parsing_and_table() {
        assert_eq!(
            status("5.1.1"),
            Some(StatusCode {
                class: 5,
                subject: 1,
                detail: 1
            })
        );
        assert_eq!(
            status("4.7.27"),
            Some(StatusCode {
                class: 4,
                subject: 7,
                detail: 27
            })
        );
        for bad in [
            "3.1.1", "5.1", "5.1.1.1", "5..1", "5.1000.1", "5.a.1", "", "05.1.1",
        ] {
            assert_eq!(status(bad), None, "{bad:?}");
        }
        let meaning = |s: &str| status(s).map(|c| c.meaning());
        assert_eq!(meaning("5.1.1"), Some("bad destination mailbox address"));
        assert_eq!(meaning("4.2.2"), Some("mailbox full"));
        assert_eq!(
            meaning("5.7.1"),
            Some("delivery not authorized, message refused")
        );
        assert_eq!(meaning("4.4.7"), Some("delivery time expired"));
        assert_eq!(
            meaning("5.7.26"),
            Some("multiple authentication checks failed")
        );
        assert_eq!(meaning("5.7.27"), Some("sender address has null MX"));
        assert_eq!(
            meaning("5.7.99"),
            Some("security or policy status"),
            "unknown detail falls back to subject"
        );
        assert_eq!(
            meaning("5.9.9"),
            Some("permanent failure"),
            "unknown subject falls back to class"
        );
        assert_eq!(meaning("2.0.0"), Some("other undefined status"));
        assert_eq!(
            status("2.0.0").map(|c| c.permanence()),
            Some(Permanence::Success)
        );
        assert_eq!(
            status("4.0.0").map(|c| c.to_string()).as_deref(),
            Some("4.0.0")
        );
    }
}
