//! The bounce explainer: a bounce message read per recipient (action, enhanced status, its
//! meaning, remote MTA, reply). RFC 3464 delivery status notifications (Postfix, Exim, Exchange)
//! are read from their delivery-status part; plain-text bounces are scanned for codes instead.

mod dsn;
mod mime;
mod scan;
pub mod status;

use std::fmt;

pub use mxscope_proto::StatusCode;
use serde::Serialize;
use thiserror::Error;

pub use status::{Meaning, Permanence};

use dsn::parse_delivery_status;
use mime::{collect_leaves, header, parse_headers, split_head};
use scan::scan_text;

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
    /// No such part: codes and addresses found by scanning the human-readable text.
    TextScan,
    /// Not even codes: only the `X-Failed-Recipients` header (Exim) named the recipients.
    FailedRecipientsHeader,
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
}

/// Everything read from one bounce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BounceReport {
    pub source: Source,
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
    let (head, body) = split_head(&text);
    let headers = parse_headers(head);
    let subject = header(&headers, "subject").map(str::to_string);
    let mut leaves = Vec::new();
    collect_leaves(&headers, body, 0, &mut leaves);

    if let Some(dsn) = leaves.iter().find(|l| is_delivery_status(&l.mime)) {
        let (reporting_mta, recipients) = parse_delivery_status(&dsn.body);
        if !recipients.is_empty() {
            return Ok(BounceReport {
                source: Source::DeliveryStatus,
                subject,
                reporting_mta,
                recipients,
            });
        }
    }
    let text_parts: Vec<&str> = leaves
        .iter()
        .filter(|l| l.mime == "text/plain")
        .map(|l| l.body.as_str())
        .collect();
    let recipients = scan_text(&text_parts);
    if !recipients.is_empty() {
        return Ok(BounceReport {
            source: Source::TextScan,
            subject,
            reporting_mta: None,
            recipients,
        });
    }
    let failed: Vec<RecipientReport> = header(&headers, "x-failed-recipients")
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(|a| {
                    let mut r = RecipientReport::new(Some(a.to_string()));
                    r.action = Some(Action::Failed);
                    r
                })
                .collect()
        })
        .unwrap_or_default();
    if failed.is_empty() {
        return Err(BounceError::NoStatus);
    }
    Ok(BounceReport {
        source: Source::FailedRecipientsHeader,
        subject,
        reporting_mta: None,
        recipients: failed,
    })
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
