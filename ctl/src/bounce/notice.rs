//! Who wrote a notice: the MTA or hosted service recognised by the fixed wording of its
//! notices (and a few headers), and whether the notice announces a delay or a final failure.

use serde::Serialize;

/// The software or service whose notice format was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Mta {
    Postfix,
    Sendmail,
    Exim,
    Qmail,
    Courier,
    Exchange2003,
    /// Exchange 2007 and later on premises.
    Exchange2007,
    Office365,
    Gmail,
    GoogleGroups,
    Yahoo,
    AmazonSes,
    Domino,
    OpenSmtpd,
    /// Oracle Communications Messaging Server (formerly Sun/iPlanet).
    OracleMessaging,
    /// Only the RFC 3464 report, no known wording.
    Rfc3464,
}

impl Mta {
    pub fn as_str(self) -> &'static str {
        match self {
            Mta::Postfix => "postfix",
            Mta::Sendmail => "sendmail",
            Mta::Exim => "exim",
            Mta::Qmail => "qmail",
            Mta::Courier => "courier",
            Mta::Exchange2003 => "exchange2003",
            Mta::Exchange2007 => "exchange2007",
            Mta::Office365 => "office365",
            Mta::Gmail => "gmail",
            Mta::GoogleGroups => "google_groups",
            Mta::Yahoo => "yahoo",
            Mta::AmazonSes => "amazon_ses",
            Mta::Domino => "domino",
            Mta::OpenSmtpd => "opensmtpd",
            Mta::OracleMessaging => "oracle_messaging",
            Mta::Rfc3464 => "rfc3464",
        }
    }
}

/// Signatures, tried in order (hosted services before the software they run on); each is a
/// lowercase phrase that must occur in the headers or notice text.
const SIGNATURES: &[(Mta, &[&str])] = &[
    (
        Mta::GoogleGroups,
        &["googlegroups.com", "the group you tried to contact"],
    ),
    (Mta::AmazonSes, &["amazonses.com"]),
    (
        Mta::Office365,
        &[
            "outlook.com",
            "protection.outlook",
            "office 365",
            "microsoft 365",
        ],
    ),
    (
        Mta::Gmail,
        &[
            "mailer-daemon@googlemail.com",
            "the response from the remote server was",
            "wasn't delivered to",
            "** address not found **",
        ],
    ),
    (
        Mta::Yahoo,
        &["yahoo.com", "sorry, we were unable to deliver your message"],
    ),
    (
        Mta::Domino,
        &["lotus domino", "domino directory", "was not delivered to:"],
    ),
    (
        Mta::OracleMessaging,
        &[
            "this report relates to a message you sent",
            "messaging server",
            "iplanet",
        ],
    ),
    (
        Mta::OpenSmtpd,
        &[
            "this is the mailer-daemon, please do not reply",
            "opensmtpd",
        ],
    ),
    (
        Mta::Exchange2003,
        &[
            "did not reach the following recipient",
            "your message did not reach some or all",
        ],
    ),
    (
        Mta::Exchange2007,
        &[
            "delivery has failed to these recipients",
            "diagnostic information for administrators",
            "microsoft exchange",
        ],
    ),
    (Mta::Qmail, &["this is the qmail-send program", "qmail"]),
    (
        Mta::Courier,
        &[
            "courier mail server",
            "courier-mta",
            "this is a delivery status notification from",
        ],
    ),
    (
        Mta::Exim,
        &[
            "(exim ",
            "the following address(es) failed",
            "x-failed-recipients",
            "this message was created automatically by mail delivery software",
        ],
    ),
    (
        Mta::Postfix,
        &["this is the mail system at host", "(postfix)", "x-postfix"],
    ),
    (
        Mta::Sendmail,
        &[
            "----- transcript of session follows -----",
            "the following addresses had permanent fatal errors",
            "sendmail",
        ],
    ),
];

/// The first signature found in `haystack` (headers and notice text, lowercased by the caller).
pub(super) fn detect(haystack_lower: &str) -> Option<Mta> {
    SIGNATURES
        .iter()
        .find(|(_, phrases)| phrases.iter().any(|p| haystack_lower.contains(p)))
        .map(|(m, _)| *m)
}

/// A warning that the message is still queued.
pub(super) fn is_delay_notice(subject_and_text_lower: &str) -> bool {
    [
        "delayed",
        "delay",
        "not yet been delivered",
        "will continue to try",
        "will keep trying",
        "still trying",
        "will be retried",
        "no action is required on your part",
    ]
    .iter()
    .any(|p| subject_and_text_lower.contains(p))
}

/// Headers and subjects of auto-replies (vacation, out of office).
pub(super) fn is_auto_reply(
    headers: &[(String, String)],
    subject_lower: &str,
    from_lower: &str,
) -> bool {
    let daemon = ["mailer-daemon", "postmaster", "mail delivery"]
        .iter()
        .any(|d| from_lower.contains(d));
    let failure_subject = [
        "undeliver",
        "failure",
        "failed",
        "returned",
        "delivery status",
        "not delivered",
    ]
    .iter()
    .any(|w| subject_lower.contains(w));
    if daemon || failure_subject {
        return false;
    }
    let by_header = headers.iter().any(|(n, v)| {
        let v = v.to_ascii_lowercase();
        (n == "auto-submitted" && v.starts_with("auto-replied"))
            || n == "x-autoreply"
            || n == "x-autorespond"
            || (n == "precedence" && v.contains("auto_reply"))
    });
    let by_subject = [
        "out of office",
        "automatic reply",
        "auto:",
        "autoreply",
        "auto-reply",
        "vacation",
        "abwesenheit",
    ]
    .iter()
    .any(|w| subject_lower.contains(w));
    by_header || by_subject
}
