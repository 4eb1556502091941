//! The bounce explainer: a bounce message read per recipient (action, enhanced status, its
//! meaning, remote MTA, reply, and why: a [`Reason`], soft or hard). Every part is read: the
//! RFC 3464 delivery-status part, the prose of the notice, a DSN forwarded inside a message.

mod dsn;
pub mod mailbox;
mod mime;
mod notice;
pub mod reason;
mod scan;
pub mod status;
pub mod summary;

use std::fmt;

pub use mxscope_proto::StatusCode;
use serde::Serialize;
use thiserror::Error;

pub use notice::Mta;
pub use reason::{Reason, Severity};
pub use status::{Meaning, Permanence};

use dsn::{parse_delivery_status, strip_type};
use mime::{collect_leaves, header, parse_headers, split_head, Leaf};
use scan::{notice_text, scan_blocks, specificity, Block};

/// Forwarded messages followed at most this deep.
const MAX_FORWARD_DEPTH: usize = 3;

/// The `Action` field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
    /// A value outside RFC 3464, lowercased.
    Other(String),
}

impl Action {
    pub(crate) fn parse(v: &str) -> Action {
        let word = v
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match word.as_str() {
            "failed" => Action::Failed,
            "delayed" => Action::Delayed,
            "delivered" => Action::Delivered,
            "relayed" => Action::Relayed,
            "expanded" => Action::Expanded,
            _ => Action::Other(word),
        }
    }
}

/// Where the per-recipient facts came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A `message/delivery-status` part (RFC 3464).
    DeliveryStatus,
    /// No such part: recipients and codes read from the notice's prose.
    TextScan,
    /// Only the `X-Failed-Recipients` header named the recipients; the reason is the notice's wording.
    FailedRecipientsHeader,
    /// An auto-reply recognised by its headers and subject.
    AutoReplyHeaders,
    /// A `message/feedback-report` part (ARF, RFC 5965).
    FeedbackReport,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::DeliveryStatus => "delivery_status",
            Source::TextScan => "text_scan",
            Source::FailedRecipientsHeader => "failed_recipients_header",
            Source::AutoReplyHeaders => "auto_reply_headers",
            Source::FeedbackReport => "feedback_report",
        }
    }
}

/// What the whole notice is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// At least one recipient failed.
    Bounce,
    /// Only delays: the sender still retries.
    Delay,
    /// A success DSN.
    Delivery,
    /// Vacation or out-of-office reply.
    AutoReply,
    /// An abuse / feedback report.
    Feedback,
}

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecipientReport {
    pub final_recipient: Option<String>,
    pub original_recipient: Option<String>,
    pub action: Option<Action>,
    #[serde(serialize_with = "status::serialize_code")]
    pub status: Option<StatusCode>,
    /// The RFC 3463 meaning of `status`.
    pub meaning: Option<&'static str>,
    /// From the status class; `None` without a status. An `Action: failed` with a 4.x.x status
    /// (Exchange's 4.4.7 "expired") is a temporary condition the sender stopped retrying.
    pub permanence: Option<Permanence>,
    /// Why (see [`reason::classify`]).
    pub reason: Reason,
    /// Soft or hard; `None` for deliveries, auto-replies and feedback.
    pub severity: Option<Severity>,
    /// Set when the `Status` field and the reply's code differ: which was used.
    pub status_conflict: Option<String>,
    pub remote_mta: Option<String>,
    /// The remote server's reply, unfolded, without the `smtp;` type.
    pub diagnostic: Option<String>,
}

impl RecipientReport {
    pub(crate) fn new(final_recipient: Option<String>) -> RecipientReport {
        RecipientReport {
            final_recipient,
            original_recipient: None,
            action: None,
            status: None,
            meaning: None,
            permanence: None,
            reason: Reason::Other,
            severity: None,
            status_conflict: None,
            remote_mta: None,
            diagnostic: None,
        }
    }

    pub(crate) fn set_status(&mut self, status: Option<StatusCode>) {
        self.status = status;
        self.meaning = status.map(|s| s.meaning());
        self.permanence = status.map(|s| s.permanence());
    }

    /// The final recipient, or the original one when the final is absent.
    pub fn recipient(&self) -> Option<&str> {
        self.final_recipient
            .as_deref()
            .or(self.original_recipient.as_deref())
    }

    /// Sets reason and severity from status, action and `text` (reply and notice wording).
    fn explain(&mut self, text: &str) {
        self.reason = reason::classify(self.status, self.action.as_ref(), text);
        self.severity = reason::severity(self.reason, self.status, self.action.as_ref());
    }
}

/// Everything read from one bounce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BounceReport {
    pub kind: Kind,
    pub source: Source,
    /// The notice format recognised by its wording, if any.
    pub mta: Option<Mta>,
    /// The report was found inside a forwarded message (`message/rfc822`).
    pub forwarded: bool,
    pub subject: Option<String>,
    pub reporting_mta: Option<String>,
    pub recipients: Vec<RecipientReport>,
}

/// Why no per-recipient status could be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BounceError {
    #[error("message is empty")]
    Empty,
    #[error("no delivery-status part and no status code with a recipient in the text")]
    NoStatus,
}

/// Parses a bounce message given as raw bytes (any charset; non-UTF-8 bytes are replaced).
pub fn parse(raw: &[u8]) -> Result<BounceReport, BounceError> {
    let text = String::from_utf8_lossy(raw).replace("\r\n", "\n");
    if text.trim().is_empty() {
        return Err(BounceError::Empty);
    }
    parse_message(&text, 0)
}

fn parse_message(text: &str, depth: usize) -> Result<BounceReport, BounceError> {
    let (head, body) = split_head(text);
    let headers = parse_headers(head);
    let subject = header(&headers, "subject").map(str::to_string);
    let mut leaves = Vec::new();
    collect_leaves(&headers, body, 0, &mut leaves);

    let text_parts: Vec<&str> = leaves
        .iter()
        .filter(|l| l.mime == "text/plain")
        .map(|l| l.body.as_str())
        .collect();
    let notice: String = text_parts.iter().map(|t| notice_text(t)).collect();
    let subject_lower = subject.as_deref().unwrap_or_default().to_ascii_lowercase();
    let mut haystack = head.to_ascii_lowercase();
    haystack.push('\n');
    haystack.push_str(&notice.to_ascii_lowercase());
    let mut mta = notice::detect(&haystack);
    let delay_notice =
        notice::is_delay_notice(&format!("{subject_lower}\n{}", notice.to_ascii_lowercase()));
    let blocks: Vec<Block> = scan_blocks(&text_parts)
        .into_iter()
        .filter(|b| b.status.is_some() || reason::by_wording(&b.text).is_some())
        .collect();
    let report = |source, mta, reporting_mta, recipients| BounceReport {
        kind: Kind::Bounce,
        source,
        mta,
        forwarded: false,
        subject: subject.clone(),
        reporting_mta,
        recipients,
    };

    if let Some(fb) = feedback(&headers, &leaves) {
        return Ok(finish(report(Source::FeedbackReport, mta, None, vec![fb])));
    }

    if let Some(dsn) = leaves.iter().find(|l| is_delivery_status(&l.mime)) {
        let (reporting_mta, mut recipients) = parse_delivery_status(&dsn.body);
        if !recipients.is_empty() {
            for r in &mut recipients {
                let block = r
                    .recipient()
                    .and_then(|a| blocks.iter().find(|b| b.recipient.eq_ignore_ascii_case(a)));
                let mut text = r.diagnostic.clone().unwrap_or_default();
                if let Some(b) = block {
                    merge_block(r, b);
                    text.push('\n');
                    text.push_str(&b.text);
                }
                expiry_reported_as_delay(r);
                r.explain(&text);
            }
            return Ok(finish(report(
                Source::DeliveryStatus,
                mta.or(Some(Mta::Rfc3464)),
                reporting_mta,
                recipients,
            )));
        }
    }

    let from_lower = header(&headers, "from")
        .unwrap_or_default()
        .to_ascii_lowercase();
    if notice::is_auto_reply(&headers, &subject_lower, &from_lower) {
        let from = header(&headers, "from").and_then(address_in);
        let mut r = RecipientReport::new(from);
        r.reason = Reason::Vacation;
        r.diagnostic = subject.clone();
        return Ok(finish(report(
            Source::AutoReplyHeaders,
            None,
            None,
            vec![r],
        )));
    }

    let failed_header: Vec<String> = header(&headers, "x-failed-recipients")
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();

    if !blocks.is_empty() {
        let mut recipients: Vec<RecipientReport> =
            blocks.iter().map(|b| from_block(b, delay_notice)).collect();
        // recipients the header names but the prose does not: the notice's wording
        for a in &failed_header {
            if !recipients
                .iter()
                .any(|r| r.recipient().is_some_and(|x| x.eq_ignore_ascii_case(a)))
            {
                recipients.push(from_notice(a, &notice));
            }
        }
        return Ok(finish(report(Source::TextScan, mta, None, recipients)));
    }

    if depth < MAX_FORWARD_DEPTH {
        for leaf in leaves.iter().filter(|l| l.mime == "message/rfc822") {
            if let Ok(mut inner) = parse_message(&leaf.body, depth + 1) {
                if inner.kind != Kind::AutoReply {
                    inner.forwarded = true;
                    return Ok(inner);
                }
            }
        }
    }

    if failed_header.is_empty() {
        return Err(BounceError::NoStatus);
    }
    if mta.is_none() {
        mta = Some(Mta::Exim);
    }
    let recipients = failed_header
        .iter()
        .map(|a| from_notice(a, &notice))
        .collect();
    Ok(finish(report(
        Source::FailedRecipientsHeader,
        mta,
        None,
        recipients,
    )))
}

/// `Action: delayed` with `x.4.7` (delivery time expired) is a failure: the sender has given
/// up and dropped the message. OpenSMTPD 6.8 words its expiry notices as delays ("Envelope
/// expired", "only a temporary failure report") although the envelope is gone.
fn expiry_reported_as_delay(r: &mut RecipientReport) {
    if r.action == Some(Action::Delayed)
        && r.status.is_some_and(|s| (s.subject, s.detail) == (4, 7))
    {
        r.action = Some(Action::Failed);
    }
}

/// Takes a more specific code, the reply and the remote host from the prose block.
fn merge_block(r: &mut RecipientReport, b: &Block) {
    if let Some(bs) = b.status {
        if r.status.is_none_or(|s| specificity(bs) > specificity(s)) {
            if let Some(old) = r.status {
                r.status_conflict =
                    Some(format!("status field {old}, notice text {bs}: {bs} used"));
            }
            r.set_status(Some(bs));
            if r.diagnostic.is_none() {
                r.diagnostic.clone_from(&b.diagnostic);
            }
        }
    }
    if r.diagnostic.is_none() {
        r.diagnostic.clone_from(&b.diagnostic);
    }
    if r.remote_mta.is_none() {
        r.remote_mta.clone_from(&b.remote_mta);
    }
}

fn from_block(b: &Block, delay_notice: bool) -> RecipientReport {
    let mut r = RecipientReport::new(Some(b.recipient.clone()));
    r.action = Some(match b.status {
        Some(s) if s.class == 4 && delay_notice => Action::Delayed,
        _ => Action::Failed,
    });
    r.set_status(b.status);
    r.diagnostic.clone_from(&b.diagnostic);
    r.remote_mta.clone_from(&b.remote_mta);
    r.explain(&b.text);
    r
}

/// A recipient known only by address: status and reason from the whole notice.
fn from_notice(address: &str, notice: &str) -> RecipientReport {
    let mut r = RecipientReport::new(Some(address.to_string()));
    r.action = Some(Action::Failed);
    let code = notice.lines().find_map(StatusCode::find);
    r.set_status(code);
    r.diagnostic = notice
        .lines()
        .map(str::trim)
        .find(|l| reason::by_wording(l).is_some())
        .map(str::to_string);
    r.explain(notice);
    r
}

/// An ARF report: the recipient is `Original-Rcpt-To`, else `To` of the reported message.
fn feedback(headers: &[(String, String)], leaves: &[Leaf]) -> Option<RecipientReport> {
    let is_arf = header(headers, "content-type").is_some_and(|v| {
        v.to_ascii_lowercase()
            .contains("report-type=feedback-report")
    });
    let part = leaves.iter().find(|l| l.mime == "message/feedback-report");
    if !is_arf && part.is_none() {
        return None;
    }
    let fields = part.map(|p| parse_headers(&p.body)).unwrap_or_default();
    let original_to = leaves
        .iter()
        .find(|l| l.mime == "message/rfc822" || l.mime == "text/rfc822-headers")
        .and_then(|l| {
            let h = parse_headers(split_head(&l.body).0);
            header(&h, "to").and_then(address_in)
        });
    let rcpt = header(&fields, "original-rcpt-to")
        .map(strip_type)
        .or(original_to);
    let mut r = RecipientReport::new(rcpt);
    r.reason = Reason::Feedback;
    r.diagnostic = header(&fields, "feedback-type").map(|t| format!("feedback-type: {t}"));
    r.remote_mta = header(&fields, "reporting-mta").map(strip_type);
    Some(r)
}

/// `Name <a@b.example>` or `a@b.example (Name)` → `a@b.example`.
fn address_in(value: &str) -> Option<String> {
    let inner = value
        .rsplit_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map_or(value, |(a, _)| a);
    inner.split_whitespace().find(|w| w.contains('@')).map(|w| {
        w.trim_matches(|c| c == '"' || c == ',' || c == '(' || c == ')')
            .to_string()
    })
}

/// The notice's kind from its recipients.
fn finish(mut r: BounceReport) -> BounceReport {
    let reasons = || r.recipients.iter().map(|x| x.reason);
    r.kind = if reasons().any(|x| x == Reason::Feedback) {
        Kind::Feedback
    } else if reasons().any(|x| x == Reason::Vacation) {
        Kind::AutoReply
    } else if r
        .recipients
        .iter()
        .any(|x| x.reason.is_bounce() && x.action != Some(Action::Delayed))
    {
        Kind::Bounce
    } else if r
        .recipients
        .iter()
        .any(|x| x.action == Some(Action::Delayed))
    {
        Kind::Delay
    } else {
        Kind::Delivery
    };
    r
}

fn is_delivery_status(mime: &str) -> bool {
    mime == "message/delivery-status" || mime == "message/global-delivery-status"
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
            Action::Expanded => "expanded",
            Action::Other(word) => word,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    const POSTFIX: &str = include_str!("../../tests/fixtures/bounces/postfix-dsn.eml");
    const EXIM: &str = include_str!("../../tests/fixtures/bounces/exim-plain.eml");
    const EXCHANGE: &str = include_str!("../../tests/fixtures/bounces/exchange-ndr.eml");

    fn status(s: &str) -> Option<StatusCode> {
        StatusCode::parse(s)
    }

    #[test]
    fn postfix_dsn_reports_each_recipient() {
        let r = parse(POSTFIX.as_bytes()).expect("parses");
        assert_eq!(r.source, Source::DeliveryStatus);
        assert_eq!(r.reporting_mta.as_deref(), Some("mail.example.com"));
        assert_eq!(
            r.subject.as_deref(),
            Some("Undelivered Mail Returned to Sender")
        );
        assert_eq!(
            r.recipients.len(),
            2,
            "the decoy inside message/rfc822 is not read"
        );
        let a = &r.recipients[0];
        assert_eq!(a.final_recipient.as_deref(), Some("nobody@example.net"));
        assert_eq!(a.original_recipient.as_deref(), Some("nobody@example.net"));
        assert_eq!(a.action, Some(Action::Failed));
        assert_eq!(a.status, status("5.1.1"));
        assert_eq!(a.meaning, Some("bad destination mailbox address"));
        assert_eq!(a.permanence, Some(Permanence::Permanent));
        assert_eq!(a.remote_mta.as_deref(), Some("mx.example.net"));
        assert_eq!(
            a.diagnostic.as_deref(),
            Some("550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown in virtual mailbox table")
        );
        let b = &r.recipients[1];
        assert_eq!(b.recipient(), Some("ceo@example.org"));
        assert_eq!(b.status, status("5.7.1"));
        assert_eq!(b.meaning, Some("delivery not authorized, message refused"));
        assert!(b
            .diagnostic
            .as_deref()
            .is_some_and(|d| d.ends_with("blocked using zen.spamhaus.org")));
    }

    #[test]
    fn postfix_dsn_with_crlf_line_endings() {
        let crlf = POSTFIX.replace('\n', "\r\n");
        assert_eq!(parse(crlf.as_bytes()), parse(POSTFIX.as_bytes()));
    }

    #[test]
    fn exchange_ndr_with_nested_multipart_and_crlf() {
        assert!(EXCHANGE.contains("\r\n"), "fixture keeps Exchange's CRLF");
        let r = parse(EXCHANGE.as_bytes()).expect("parses");
        assert_eq!(r.source, Source::DeliveryStatus);
        assert_eq!(r.reporting_mta.as_deref(), Some("EX01.contoso.example"));
        assert_eq!(r.subject.as_deref(), Some("Undeliverable: Project kickoff"));
        assert_eq!(r.recipients.len(), 2);
        let jane = &r.recipients[0];
        assert_eq!(
            jane.final_recipient.as_deref(),
            Some("jane@fabrikam.example")
        );
        assert_eq!(jane.status, status("5.1.10"));
        // the IANA meaning of X.1.10; Exchange reuses the code for "recipient not found"
        assert_eq!(jane.meaning, Some("recipient address has null MX"));
        assert_eq!(jane.remote_mta, None);
        assert_eq!(
            jane.diagnostic.as_deref(),
            Some("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup")
        );
        let ops = &r.recipients[1];
        assert_eq!(ops.action, Some(Action::Failed));
        assert_eq!(ops.status, status("4.4.7"));
        assert_eq!(ops.meaning, Some("delivery time expired"));
        assert_eq!(ops.permanence, Some(Permanence::Temporary));
        assert_eq!(ops.remote_mta.as_deref(), Some("mail.northwind.example"));
    }

    #[test]
    fn exim_plain_text_bounce_is_scanned() {
        let r = parse(EXIM.as_bytes()).expect("parses");
        assert_eq!(r.source, Source::TextScan);
        assert_eq!(
            r.subject.as_deref(),
            Some("Mail delivery failed: returning message to sender")
        );
        assert_eq!(
            r.recipients.len(),
            2,
            "the quoted original (dave@example.org, 5.9.9) is not scanned"
        );
        let bob = &r.recipients[0];
        assert_eq!(bob.final_recipient.as_deref(), Some("bob@gone.example"));
        assert_eq!(bob.status, status("5.1.1"));
        assert_eq!(bob.action, Some(Action::Failed));
        assert_eq!(bob.permanence, Some(Permanence::Permanent));
        assert_eq!(
            bob.diagnostic.as_deref(),
            Some(
                "550-5.1.1 The email account that you tried to reach does not exist. Please try \
                 double-checking the recipient's email address for typos or unnecessary spaces."
            )
        );
        let carol = &r.recipients[1];
        assert_eq!(carol.final_recipient.as_deref(), Some("carol@full.example"));
        assert_eq!(carol.status, status("5.2.2"));
        assert_eq!(carol.meaning, Some("mailbox full"));
        assert_eq!(carol.diagnostic.as_deref(), Some("552 5.2.2 Mailbox full"));
    }

    #[test]
    fn text_scan_handles_bare_reply_codes_and_delays() {
        let msg = "Subject: Warning: message delayed\n\n\
                   The following address has not yet been delivered:\n\n  \
                   eve@slow.example\n    451 Temporary local problem - please try later\n\n\
                   frank@other.example: 421 4.4.2 connection dropped\n";
        let r = parse(msg.as_bytes()).expect("parses");
        assert_eq!(r.source, Source::TextScan);
        assert_eq!(r.recipients.len(), 2);
        assert_eq!(
            r.recipients[0].final_recipient.as_deref(),
            Some("eve@slow.example")
        );
        assert_eq!(r.recipients[0].status, status("4.0.0"));
        assert_eq!(r.recipients[0].action, Some(Action::Delayed));
        assert_eq!(r.recipients[0].permanence, Some(Permanence::Temporary));
        assert_eq!(r.recipients[1].status, status("4.4.2"));
        assert_eq!(r.recipients[1].meaning, Some("bad connection"));
    }

    /// Trimmed from a real OpenSMTPD 6.8.0p2 notice (tests/tests/bounce.rs makes them).
    fn opensmtpd_notice(prose: &str, status: &str) -> String {
        format!(
            "Subject: Delivery status notification: delayed\nFrom: Mailer Daemon <MAILER-DAEMON@vm>\n\
             MIME-Version: 1.0\nContent-Type: multipart/mixed;boundary=\"b/vm\"\n\n\
             This is a MIME-encapsulated message.\n\n--b/vm\nContent-Description: Notification\n\
             Content-Type: text/plain; charset=us-ascii\n\n    Hi!\n\n    This is the MAILER-DAEMON, please DO NOT REPLY to this email.\n\n\
             \x20   A message is delayed for more than 4 seconds for the following\n    list of recipients:\n\n\
             someone@refused.test: {prose}\n\n    Please note that this is only a temporary failure report.\n\n\
             --b/vm\nContent-Description: Delivery Report\nContent-Type: message/delivery-status\n\n\
             Reporting-MTA: dns; vm\n\nFinal-Recipient: rfc822; someone@refused.test\nAction: delayed\n\
             Status: {status}\n\n--b/vm--\n"
        )
    }

    #[test]
    fn opensmtpd_expiry_worded_as_a_delay_is_a_failure() {
        let r = parse(opensmtpd_notice("Envelope expired", "4.4.7").as_bytes()).expect("parses");
        assert_eq!(r.mta, Some(Mta::OpenSmtpd));
        assert_eq!(r.kind, Kind::Bounce);
        let x = r.recipients.first().expect("one recipient");
        assert_eq!(x.action, Some(Action::Failed));
        assert_eq!(x.reason, Reason::Expired);
        assert_eq!(x.severity, Some(Severity::Soft));

        // its real delay warning stays a delay, explained by the prose
        let r = parse(opensmtpd_notice("Network error on destination MXs", "4.0.0").as_bytes())
            .expect("parses");
        assert_eq!(r.kind, Kind::Delay);
        let x = r.recipients.first().expect("one recipient");
        assert_eq!(x.action, Some(Action::Delayed));
        assert_eq!(x.reason, Reason::Network);
    }

    #[test]
    fn failed_recipients_header_is_the_last_resort() {
        let msg = "X-Failed-Recipients: a@example.net, b@example.net\nSubject: failure\n\nretry timeout exceeded\n";
        let r = parse(msg.as_bytes()).expect("parses");
        assert_eq!(r.source, Source::FailedRecipientsHeader);
        let got: Vec<Option<&str>> = r
            .recipients
            .iter()
            .map(RecipientReport::recipient)
            .collect();
        assert_eq!(got, vec![Some("a@example.net"), Some("b@example.net")]);
        assert!(r
            .recipients
            .iter()
            .all(|x| x.status.is_none() && x.action == Some(Action::Failed)));
    }

    #[test]
    fn no_status_and_empty_inputs_are_errors() {
        assert_eq!(parse(b""), Err(BounceError::Empty));
        assert_eq!(parse(b" \r\n\r\n"), Err(BounceError::Empty));
        assert_eq!(
            parse(b"Subject: hello\n\nJust a normal message to bob@example.com.\n"),
            Err(BounceError::NoStatus)
        );
        // a code without any recipient address is not enough
        assert_eq!(
            parse(b"Subject: x\n\n550 5.1.1 user unknown\n"),
            Err(BounceError::NoStatus)
        );
    }

    #[test]
    fn dsn_fields_are_case_insensitive_folded_and_typed() {
        let msg = "MIME-Version: 1.0\nCONTENT-TYPE: Multipart/Report; Report-Type=delivery-status;\n BOUNDARY=xyz\n\n\
                   preamble\n--xyz\nContent-Type: text/plain\n\nhello\n--xyz  \ncontent-type: Message/Delivery-Status\n\n\
                   reporting-mta: dns;\n  relay.example.com\n\n\n\
                   final-recipient: RFC822; <Someone@Example.COM>\nACTION: Delayed (still trying)\nstatus: 4.2.2 (mailbox full)\n\
                   diagnostic-code: smtp; 452-4.2.2 The email account that you tried to reach is over quota\n\
                   \t452 4.2.2 and inactive.\nwill-retry-until: Fri, 7 Mar 2025 09:00:00 +0000\n\
                   --xyz--\nepilogue 5.5.5 nobody@example.com\n";
        let r = parse(msg.as_bytes()).expect("parses");
        assert_eq!(r.source, Source::DeliveryStatus);
        assert_eq!(r.reporting_mta.as_deref(), Some("relay.example.com"));
        let x = r.recipients.first().expect("one recipient");
        assert_eq!(x.final_recipient.as_deref(), Some("Someone@Example.COM"));
        assert_eq!(x.action, Some(Action::Delayed));
        assert_eq!(x.status, status("4.2.2"));
        assert_eq!(
            x.diagnostic.as_deref(),
            Some("452-4.2.2 The email account that you tried to reach is over quota 452 4.2.2 and inactive.")
        );
    }

    #[test]
    fn missing_status_is_taken_from_the_diagnostic() {
        let msg = "Content-Type: multipart/report; boundary=\"b\"\n\n--b\nContent-Type: message/delivery-status\n\n\
                   Final-Recipient: rfc822; x@example.org\nAction: failed\nStatus: unknown\n\
                   Diagnostic-Code: smtp; 550 5.7.26 Unauthenticated email from example.com is not accepted\n--b--\n";
        let r = parse(msg.as_bytes()).expect("parses");
        let x = r.recipients.first().expect("one recipient");
        assert_eq!(x.status, status("5.7.26"));
        assert_eq!(x.meaning, Some("multiple authentication checks failed"));
    }

    #[test]
    fn base64_delivery_status_part_is_decoded() {
        let dsn = "Final-Recipient: rfc822; y@example.org\nAction: failed\nStatus: 5.2.1\n";
        let encoded = base64::engine::general_purpose::STANDARD.encode(dsn);
        let msg = format!(
            "Content-Type: multipart/report; boundary=b\n\n--b\nContent-Type: message/delivery-status\n\
             Content-Transfer-Encoding: base64\n\n{encoded}\n--b--\n"
        );
        let r = parse(msg.as_bytes()).expect("parses");
        assert_eq!(r.recipients.first().and_then(|x| x.status), status("5.2.1"));
    }

    #[test]
    fn multipart_without_closing_boundary_or_with_unknown_boundary() {
        let truncated = "Content-Type: multipart/report; boundary=b\n\n--b\nContent-Type: message/delivery-status\n\n\
                         Final-Recipient: rfc822; z@example.org\nAction: failed\nStatus: 5.3.4\n";
        let r = parse(truncated.as_bytes()).expect("parses");
        assert_eq!(r.recipients.first().and_then(|x| x.status), status("5.3.4"));
        let wrong = "Content-Type: multipart/mixed; boundary=nope\n\nz@example.org: 554 5.6.0 bad content\n";
        let r = parse(wrong.as_bytes()).expect("read as text");
        assert_eq!(r.source, Source::TextScan);
        assert_eq!(r.recipients.first().and_then(|x| x.status), status("5.6.0"));
    }

    #[test]
    fn report_serializes_to_json() {
        let r = parse(POSTFIX.as_bytes()).expect("parses");
        let json = serde_json::to_value(&r).expect("serializes");
        assert_eq!(json["source"], "delivery_status");
        assert_eq!(json["recipients"][0]["status"], "5.1.1");
        assert_eq!(json["recipients"][0]["action"], "failed");
        assert_eq!(json["recipients"][0]["permanence"], "permanent");
        assert_eq!(
            json["recipients"][1]["meaning"],
            "delivery not authorized, message refused"
        );
    }

    /// The provider-style samples written for the project and their expected readings.
    #[test]
    fn provider_samples_match_the_expected_table() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/bounces/providers");
        let table = std::fs::read_to_string(dir.join("expected.tsv")).expect("expected.tsv");
        let rows: Vec<Vec<&str>> = table
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| l.split('\t').collect())
            .collect();
        assert!(rows.len() >= 20, "the table lists the samples");
        let opt = |s: &str| (s != "-").then(|| s.to_string());
        let mut files: Vec<&str> = rows.iter().map(|r| r[0]).collect();
        files.dedup();
        let mut failures = Vec::new();
        for file in &files {
            let raw = std::fs::read(dir.join(file)).expect("sample");
            let report = match parse(&raw) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{file}: {e}"));
                    continue;
                }
            };
            let expected: Vec<&Vec<&str>> = rows.iter().filter(|r| r[0] == *file).collect();
            let got_rows: Vec<Vec<Option<String>>> = report
                .recipients
                .iter()
                .map(|x| {
                    vec![
                        report.mta.map(|m| m.as_str().to_string()),
                        Some(summary::kind_name(report.kind).to_string()),
                        x.recipient().map(str::to_string),
                        x.status.map(|s| s.to_string()),
                        Some(x.reason.to_string()),
                        x.severity.map(|s| s.to_string()),
                    ]
                })
                .collect();
            let want_rows: Vec<Vec<Option<String>>> = expected
                .iter()
                .map(|r| r[1..7].iter().map(|c| opt(c)).collect())
                .collect();
            if got_rows != want_rows {
                failures.push(format!(
                    "{file}:\n  want {want_rows:?}\n  got  {got_rows:?}"
                ));
            }
        }
        let on_disk = std::fs::read_dir(&dir)
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
            .count();
        assert_eq!(
            on_disk,
            files.len(),
            "every sample has a row in expected.tsv"
        );
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn forwarded_dsn_and_status_conflicts_are_reported() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/bounces/providers");
        let fwd =
            parse(&std::fs::read(dir.join("forwarded-dsn.eml")).expect("sample")).expect("parses");
        assert!(fwd.forwarded);
        assert_eq!(fwd.reporting_mta.as_deref(), Some("mail.example.com"));
        let ses =
            parse(&std::fs::read(dir.join("amazon-ses.eml")).expect("sample")).expect("parses");
        assert_eq!(
            ses.recipients[0].status_conflict.as_deref(),
            Some("status field 5.0.0, reply 5.1.1: 5.1.1 used")
        );
        let exim = parse(&std::fs::read(dir.join("exim-quoted-sender.eml")).expect("sample"))
            .expect("parses");
        assert_eq!(
            exim.recipients.len(),
            1,
            "alice@example.com quoted in the reply is no recipient"
        );
        assert_eq!(
            exim.recipients[0].remote_mta.as_deref(),
            Some("mx.exim-dest.example")
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = parse(s.as_bytes());
        }

        #[test]
        fn parse_never_panics_on_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_mime_soup(lines in proptest::collection::vec(
            "(--b|--b--|Content-Type: (multipart/report; boundary=b|message/delivery-status)|Status: [245]\\.[0-9]\\.[0-9]|Action: failed|Final-Recipient: rfc822; a@b\\.c|[ \\t]folded|=|)\r?",
            0..30,
        )) {
            let msg = format!("Content-Type: multipart/report; boundary=b\n\n{}", lines.join("\n"));
            let _ = parse(msg.as_bytes());
        }
    }
}
