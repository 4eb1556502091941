//! Why a recipient bounced: the closed set of [`Reason`]s and the one place that maps a status
//! code and a server's wording to a reason and to soft or hard. Status codes decide first; broad
//! codes (`x.0.0`, `x.7.1`, …) and notices without a code are decided by wording (README lists the rules).

use std::fmt;

use mxscope_proto::StatusCode;
use serde::Serialize;

use super::Action;

/// Why a message did not reach a recipient — or that it did, or that the notice is no bounce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No such mailbox (`x.1.1`, "user unknown", "does not exist").
    UserUnknown,
    /// Mailbox over quota (`x.2.2`).
    MailboxFull,
    /// The recipient domain or its mail host cannot be found (`x.1.2`, `x.4.4`, NXDOMAIN).
    HostUnknown,
    /// The sending IP or domain is on a block list or has a poor reputation.
    BlockedReputation,
    /// The content was judged spam, a virus or malware.
    SpamOrVirus,
    /// Refused by a policy: SPF/DKIM/DMARC, sender or recipient restrictions (`x.7.x`).
    Policy,
    /// Too big for the server or mailbox (`x.2.3`, `x.3.4`).
    MessageTooBig,
    /// The sender gave up after retrying (`x.4.7`, "retry timeout exceeded").
    Expired,
    /// The server is not the recipient's and does not relay.
    RelayingDenied,
    /// Too many messages, connections or recipients (`x.7.28`, "rate limit").
    RateLimited,
    /// The sending IP needs reverse DNS (`x.7.25`, "cannot find your hostname").
    RequiresPtr,
    /// The mailbox exists but is disabled or suspended (`x.2.1`, `x.7.13`).
    MailboxDisabled,
    /// The server wants SMTP AUTH first (`x.7.0` "authentication required", `x.7.57`).
    AuthRequired,
    /// Connection refused, timed out or lost (`x.4.1`, `x.4.2`).
    Network,
    /// A failure none of the above describes.
    Other,
    /// Not a bounce: a success DSN (`Action: delivered`, `relayed`, `expanded`).
    Delivered,
    /// Not a bounce: an auto-reply (vacation, out of office).
    Vacation,
    /// Not a bounce: an ARF feedback (abuse) report.
    Feedback,
}

impl Reason {
    /// Every reason, in documentation order.
    pub const ALL: [Reason; 18] = [
        Reason::UserUnknown,
        Reason::MailboxFull,
        Reason::HostUnknown,
        Reason::BlockedReputation,
        Reason::SpamOrVirus,
        Reason::Policy,
        Reason::MessageTooBig,
        Reason::Expired,
        Reason::RelayingDenied,
        Reason::RateLimited,
        Reason::RequiresPtr,
        Reason::MailboxDisabled,
        Reason::AuthRequired,
        Reason::Network,
        Reason::Other,
        Reason::Delivered,
        Reason::Vacation,
        Reason::Feedback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UserUnknown => "user_unknown",
            Reason::MailboxFull => "mailbox_full",
            Reason::HostUnknown => "host_unknown",
            Reason::BlockedReputation => "blocked_reputation",
            Reason::SpamOrVirus => "spam_or_virus",
            Reason::Policy => "policy",
            Reason::MessageTooBig => "message_too_big",
            Reason::Expired => "expired",
            Reason::RelayingDenied => "relaying_denied",
            Reason::RateLimited => "rate_limited",
            Reason::RequiresPtr => "requires_ptr",
            Reason::MailboxDisabled => "mailbox_disabled",
            Reason::AuthRequired => "auth_required",
            Reason::Network => "network",
            Reason::Other => "other",
            Reason::Delivered => "delivered",
            Reason::Vacation => "vacation",
            Reason::Feedback => "feedback",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether the notice reports a failure or delay at all (not delivered, vacation, feedback).
    pub fn is_bounce(self) -> bool {
        !matches!(
            self,
            Reason::Delivered | Reason::Vacation | Reason::Feedback
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the sender should make of the recipient address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Temporary: a retry later may succeed; keep the address.
    Soft,
    /// Permanent: this address will not take the message.
    Hard,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Soft => "soft",
            Severity::Hard => "hard",
        })
    }
}

/// The reason for one recipient: a decisive status code first, then the wording of the reply
/// and notice (`text`), then the code's subject, then `other`.
pub fn classify(status: Option<StatusCode>, action: Option<&Action>, text: &str) -> Reason {
    if matches!(
        action,
        Some(Action::Delivered | Action::Relayed | Action::Expanded)
    ) || status.is_some_and(|s| s.class == 2)
    {
        return Reason::Delivered;
    }
    if let Some(r) = status.and_then(decisive_code) {
        return r;
    }
    // RFC 3464: a failure with a temporary status is one the sender stopped retrying
    if matches!(action, Some(Action::Failed)) && status.is_some_and(|s| s.class == 4) {
        return Reason::Expired;
    }
    if let Some(r) = by_wording(text) {
        return r;
    }
    status.and_then(subject_default).unwrap_or(Reason::Other)
}

/// Soft or hard; `None` for notices that are not bounces. Soft: a delay, a `4.x.x` status, or a
/// reason that passes (mailbox full — RFC 3463 calls X.2.2 transient even with class 5 —, rate
/// limit, network, expiry). Everything else is hard.
pub fn severity(
    reason: Reason,
    status: Option<StatusCode>,
    action: Option<&Action>,
) -> Option<Severity> {
    if !reason.is_bounce() {
        return None;
    }
    let soft = matches!(action, Some(Action::Delayed))
        || status.is_some_and(|s| s.class == 4)
        || matches!(
            reason,
            Reason::MailboxFull | Reason::RateLimited | Reason::Network | Reason::Expired
        );
    Some(if soft { Severity::Soft } else { Severity::Hard })
}

/// Codes that name one reason whatever the text says.
fn decisive_code(s: StatusCode) -> Option<Reason> {
    Some(match (s.subject, s.detail) {
        (1, 1 | 3 | 6 | 10) => Reason::UserUnknown,
        (1, 2) | (4, 4) => Reason::HostUnknown,
        (2, 1) | (7, 13) => Reason::MailboxDisabled,
        (2, 2) => Reason::MailboxFull,
        (2, 3) | (3, 4) => Reason::MessageTooBig,
        (4, 7) => Reason::Expired,
        (5, 3) | (7, 28) => Reason::RateLimited,
        (7, 25) => Reason::RequiresPtr,
        (7, 8 | 57) => Reason::AuthRequired,
        (7, 20..=24 | 26 | 27) => Reason::Policy,
        _ => return None,
    })
}

/// What a broad code means when the wording names nothing.
fn subject_default(s: StatusCode) -> Option<Reason> {
    Some(match (s.subject, s.detail) {
        (4, 1 | 2) => Reason::Network,
        (4, 3) => Reason::HostUnknown,
        (1, _) => Reason::UserUnknown,
        (7, _) => Reason::Policy,
        _ => return None,
    })
}

/// Wording rules, tried in this order; the first reason with a phrase in the text wins.
pub const WORDING: &[(Reason, &[&str])] = &[
    (
        Reason::RelayingDenied,
        &[
            "relay access denied",
            "relaying denied",
            "relay not permitted",
            "not permitted to relay",
            "unable to relay",
            "relaying not allowed",
            "relaying is not allowed",
            "we do not relay",
            "relay denied",
        ],
    ),
    (
        Reason::AuthRequired,
        &[
            "authentication required",
            "authentication is required",
            "must authenticate",
            "client was not authenticated",
            "sender not authenticated",
            "smtp auth required",
        ],
    ),
    (
        Reason::RequiresPtr,
        &[
            "reverse dns",
            "cannot find your hostname",
            "cannot find your reverse hostname",
            "no ptr",
            "ptr record",
            "reverse lookup",
            "rdns",
        ],
    ),
    (
        Reason::MailboxFull,
        &[
            "mailbox full",
            "mailbox is full",
            "inbox is full",
            "over quota",
            "over its quota",
            "quota exceeded",
            "exceeded its quota",
            "mailbox size limit exceeded",
            "exceeded storage",
            "out of storage",
            "insufficient storage",
            "storage allocation",
            "full mailbox",
        ],
    ),
    (
        Reason::MailboxDisabled,
        &[
            "account disabled",
            "account is disabled",
            "account has been disabled",
            "mailbox disabled",
            "mailbox is disabled",
            "is disabled",
            "account suspended",
            "account is suspended",
            "account has been suspended",
            "deactivated",
            "inactive",
            "no longer active",
            "account is locked",
        ],
    ),
    (
        Reason::HostUnknown,
        &[
            "host not found",
            "host or domain name not found",
            "domain not found",
            "domain name not found",
            "name service error",
            "unrouteable",
            "unroutable",
            "no mx",
            "domain does not exist",
            "no such domain",
            "unknown domain",
            "nxdomain",
            "dns error",
            "couldn't find the domain",
            "could not find the domain",
            "domain couldn't be found",
            "domain could not be found",
            "unknown host",
        ],
    ),
    (
        Reason::UserUnknown,
        &[
            "user unknown",
            "unknown user",
            "no such user",
            "no such recipient",
            "no such mailbox",
            "no such address",
            "unknown recipient",
            "invalid recipient",
            "recipient not found",
            "recipnotfound",
            "recipientnotfound",
            "user not found",
            "address not found",
            "mailbox not found",
            "mailbox unavailable",
            "mailbox not available",
            "no mailbox here",
            "invalid mailbox",
            "not a valid mailbox",
            "does not exist",
            "doesn't exist",
            "not exist",
            "doesn't have a",
            "couldn't be found",
            "could not be found",
            "not listed in",
            "addressee unknown",
            "unknown address",
            "bad destination mailbox",
        ],
    ),
    (
        Reason::BlockedReputation,
        &[
            "blocked using",
            "blacklist",
            "blocklist",
            "block list",
            "black list",
            "spamhaus",
            "spamcop",
            "dnsbl",
            "rbl",
            "is listed",
            "listed on",
            "listed at",
            "reputation",
            "banned sending ip",
        ],
    ),
    (
        Reason::SpamOrVirus,
        &[
            "spam",
            "virus",
            "malware",
            "infected",
            "phish",
            "junk",
            "unsolicited",
            "content rejected",
        ],
    ),
    (
        Reason::MessageTooBig,
        &[
            "too big",
            "too large",
            "size limit",
            "message size",
            "maximum size",
            "exceeds the maximum",
        ],
    ),
    (
        Reason::RateLimited,
        &[
            "rate limit",
            "ratelimit",
            "rate-limit",
            "too many",
            "throttl",
            "unusual rate",
            "sending limit",
        ],
    ),
    (
        Reason::Expired,
        &[
            "retry timeout exceeded",
            "retry time not reached for any host after a long failure",
            "expired",
            "too long in queue",
            "giving up",
            "could not be delivered for",
            "gave up",
        ],
    ),
    (
        Reason::Network,
        &[
            // OpenSMTPD: "Network error on destination MXs"
            "network error",
            "connection refused",
            "connection timed out",
            "timed out",
            "timeout",
            "no route to host",
            "network is unreachable",
            "host unreachable",
            "lost connection",
            "connection reset",
            "connection closed",
            "could not connect",
            "couldn't connect",
            "unable to connect",
            "failed to connect",
        ],
    ),
    (
        Reason::Policy,
        &[
            "policy",
            "not allowed",
            "not permitted",
            "not authorized",
            "access denied",
            "administrative prohibition",
            "prohibited",
            "denied",
            "rejected",
            "refused",
            "blocked",
            "dmarc",
            "spf",
            "dkim",
            "unauthenticated",
            "permission",
        ],
    ),
];

/// The first wording rule whose phrase occurs in `text` (case-insensitive).
pub fn by_wording(text: &str) -> Option<Reason> {
    let lower = text.to_ascii_lowercase();
    WORDING
        .iter()
        .find(|(_, phrases)| phrases.iter().any(|p| lower.contains(p)))
        .map(|(r, _)| *r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(s: &str) -> Option<StatusCode> {
        StatusCode::parse(s)
    }

    #[test]
    fn decisive_codes_win_over_wording() {
        let failed = Some(&Action::Failed);
        assert_eq!(classify(code("5.1.1"), failed, "spam"), Reason::UserUnknown);
        assert_eq!(classify(code("5.2.2"), failed, ""), Reason::MailboxFull);
        assert_eq!(classify(code("5.4.4"), failed, ""), Reason::HostUnknown);
        assert_eq!(
            classify(code("4.4.7"), failed, "connection refused"),
            Reason::Expired
        );
        assert_eq!(classify(code("5.7.25"), failed, ""), Reason::RequiresPtr);
        assert_eq!(classify(code("4.7.28"), failed, ""), Reason::RateLimited);
        assert_eq!(classify(code("5.3.4"), failed, ""), Reason::MessageTooBig);
        assert_eq!(classify(code("5.2.1"), failed, ""), Reason::MailboxDisabled);
        assert_eq!(classify(code("5.7.26"), failed, ""), Reason::Policy);
        assert_eq!(classify(code("5.7.57"), failed, ""), Reason::AuthRequired);
    }

    #[test]
    fn broad_codes_are_read_by_wording_then_subject() {
        let failed = Some(&Action::Failed);
        let cases = [
            ("5.7.1", "Relay access denied", Reason::RelayingDenied),
            (
                "5.7.1",
                "Client host [192.0.2.1] blocked using zen.spamhaus.org",
                Reason::BlockedReputation,
            ),
            ("5.7.1", "Message rejected as spam", Reason::SpamOrVirus),
            ("5.7.1", "rejected by local policy", Reason::Policy),
            ("5.7.1", "no words", Reason::Policy),
            ("5.0.0", "User unknown", Reason::UserUnknown),
            ("5.0.0", "no words", Reason::Other),
            ("4.4.1", "no words", Reason::Network),
            (
                "4.4.1",
                "connect to x[127.0.0.1]:25: Connection refused",
                Reason::Network,
            ),
            ("4.7.0", "Authentication required", Reason::AuthRequired),
            (
                "5.7.1",
                "Client host rejected: cannot find your hostname",
                Reason::RequiresPtr,
            ),
            (
                "5.5.0",
                "Requested action not taken: mailbox unavailable",
                Reason::UserUnknown,
            ),
            ("4.3.0", "Mailbox is full", Reason::MailboxFull),
            ("5.0.0", "retry timeout exceeded", Reason::Expired),
            (
                "5.0.0",
                "User bob (bob@x.example) not listed in Domino Directory",
                Reason::UserUnknown,
            ),
            (
                "5.0.0",
                "message size exceeds fixed limit",
                Reason::MessageTooBig,
            ),
        ];
        for (c, text, want) in cases {
            // a class-4 code is read as a delay here; failed with class 4 is expired (below)
            let action = if c.starts_with('4') {
                Some(&Action::Delayed)
            } else {
                failed
            };
            assert_eq!(classify(code(c), action, text), want, "{c} {text}");
        }
        assert_eq!(
            classify(None, failed, "Host or domain name not found"),
            Reason::HostUnknown
        );
        assert_eq!(
            classify(None, failed, "Sorry, no mailbox here by that name."),
            Reason::UserUnknown
        );
        assert_eq!(classify(None, failed, ""), Reason::Other);
    }

    #[test]
    fn success_is_delivered_and_has_no_severity() {
        assert_eq!(classify(code("2.0.0"), None, ""), Reason::Delivered);
        assert_eq!(
            classify(None, Some(&Action::Relayed), "user unknown"),
            Reason::Delivered
        );
        assert_eq!(severity(Reason::Delivered, code("2.0.0"), None), None);
        assert_eq!(severity(Reason::Vacation, None, None), None);
        assert_eq!(severity(Reason::Feedback, None, None), None);
    }

    #[test]
    fn soft_and_hard() {
        let failed = Some(&Action::Failed);
        let soft = Some(Severity::Soft);
        let hard = Some(Severity::Hard);
        assert_eq!(severity(Reason::UserUnknown, code("5.1.1"), failed), hard);
        assert_eq!(severity(Reason::MailboxFull, code("5.2.2"), failed), soft);
        assert_eq!(severity(Reason::Network, code("4.4.1"), failed), soft);
        assert_eq!(
            severity(Reason::Policy, code("5.7.1"), Some(&Action::Delayed)),
            soft
        );
        assert_eq!(severity(Reason::Policy, code("4.7.1"), failed), soft);
        assert_eq!(severity(Reason::HostUnknown, None, failed), hard);
        assert_eq!(severity(Reason::Expired, None, failed), soft);
    }

    #[test]
    fn a_failure_with_a_temporary_status_expired() {
        let refused = "connect to 127.0.0.1[127.0.0.1]:2525: Connection refused";
        assert_eq!(
            classify(code("4.4.1"), Some(&Action::Failed), refused),
            Reason::Expired
        );
        assert_eq!(
            classify(code("4.4.1"), Some(&Action::Delayed), refused),
            Reason::Network
        );
        assert_eq!(
            classify(code("4.2.2"), Some(&Action::Failed), ""),
            Reason::MailboxFull
        );
    }

    #[test]
    fn names_round_trip_and_every_bounce_reason_has_wording_or_a_code() {
        assert!(!Reason::ALL.is_empty());
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
            assert_eq!(
                serde_json::to_value(r).ok(),
                Some(serde_json::Value::from(r.as_str()))
            );
        }
        for (r, phrases) in WORDING {
            assert!(!phrases.is_empty(), "{r}");
            for p in *phrases {
                assert_eq!(p.to_ascii_lowercase(), *p, "phrases are lowercase");
            }
        }
    }
}
