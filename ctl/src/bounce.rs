//! Bounce messages: RFC 3464 delivery status notifications (Postfix, Exim, Exchange) read per
//! recipient, with the RFC 3463 status table; plain-text bounces are scanned for codes instead.

use std::fmt;

use base64::Engine as _;
use serde::{Serialize, Serializer};
use thiserror::Error;

/// Nested multiparts followed at most this deep.
const MAX_DEPTH: usize = 8;

/// An RFC 3463 enhanced status code, `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

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

impl StatusCode {
    /// Parses `class.subject.detail` (class 2, 4 or 5; 1-3 digits each for the others).
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

    pub fn permanence(&self) -> Permanence {
        match self.class {
            2 => Permanence::Success,
            4 => Permanence::Temporary,
            _ => Permanence::Permanent,
        }
    }

    /// The most specific meaning RFC 3463 (and later registrations) give this code.
    pub fn meaning(&self) -> &'static str {
        detail_meaning(self.subject, self.detail)
            .or_else(|| subject_meaning(self.subject))
            .unwrap_or_else(|| class_meaning(self.class))
    }
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl Serialize for StatusCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
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
    fn parse(v: &str) -> Action {
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
    fn new(final_recipient: Option<String>) -> RecipientReport {
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

    fn set_status(&mut self, status: Option<StatusCode>) {
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

// ---------------------------------------------------------------------------------------------
// MIME
// ---------------------------------------------------------------------------------------------

/// A non-multipart body part, decoded.
struct Leaf {
    /// `type/subtype`, lowercased; `text/plain` when absent.
    mime: String,
    body: String,
}

/// Splits at the first empty line; a message without one is all headers.
fn split_head(text: &str) -> (&str, &str) {
    if text.starts_with('\n') {
        return ("", text.get(1..).unwrap_or_default());
    }
    match text.find("\n\n") {
        Some(pos) => (
            text.get(..pos).unwrap_or_default(),
            text.get(pos + 2..).unwrap_or_default(),
        ),
        None => (text, ""),
    }
}

/// Header fields as (lowercased name, unfolded value); lines that are not fields are skipped.
fn parse_headers(block: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in block.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = out.last_mut() {
                let more = line.trim();
                if !more.is_empty() {
                    if !value.is_empty() {
                        value.push(' ');
                    }
                    value.push_str(more);
                }
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            if !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()) {
                out.push((name.to_ascii_lowercase(), value.trim().to_string()));
            }
        }
    }
    out
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// `type/subtype` lowercased, and the `boundary` parameter if any.
fn content_type(headers: &[(String, String)]) -> (String, Option<String>) {
    let Some(value) = header(headers, "content-type") else {
        return ("text/plain".to_string(), None);
    };
    let mut items = value.split(';');
    let mime = items.next().unwrap_or_default().trim().to_ascii_lowercase();
    let boundary = items.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
    });
    let mime = if mime.is_empty() {
        "text/plain".to_string()
    } else {
        mime
    };
    (mime, boundary.filter(|b| !b.is_empty()))
}

fn collect_leaves(headers: &[(String, String)], body: &str, depth: usize, out: &mut Vec<Leaf>) {
    let (mime, boundary) = content_type(headers);
    if mime.starts_with("multipart/") && depth < MAX_DEPTH {
        if let Some(parts) = boundary.as_deref().and_then(|b| split_multipart(body, b)) {
            for part in parts {
                let (head, body) = split_head(part);
                let part_headers = parse_headers(head);
                collect_leaves(&part_headers, body, depth + 1, out);
            }
            return;
        }
    }
    let encoding = header(headers, "content-transfer-encoding")
        .unwrap_or("7bit")
        .to_ascii_lowercase();
    let body = match encoding.trim() {
        "base64" => decode_base64(body),
        "quoted-printable" => decode_quoted_printable(body),
        _ => body.to_string(),
    };
    // a multipart without a usable boundary is read as text
    let mime = if mime.starts_with("multipart/") {
        "text/plain".to_string()
    } else {
        mime
    };
    out.push(Leaf { mime, body });
}

/// The parts between `--boundary` lines, up to `--boundary--`; `None` if no delimiter occurs.
fn split_multipart<'a>(body: &'a str, boundary: &str) -> Option<Vec<&'a str>> {
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut start: Option<usize> = None;
    let mut offset: usize = 0;
    for line in body.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if let Some(rest) = trimmed.strip_prefix(delimiter.as_str()) {
            let closing = rest.starts_with("--");
            if rest.is_empty() || closing {
                if let Some(s) = start {
                    // the newline before a delimiter belongs to the delimiter
                    let end = offset.saturating_sub(1).max(s);
                    parts.push(body.get(s..end).unwrap_or_default());
                }
                if closing {
                    return Some(parts);
                }
                start = Some(offset + line.len());
            }
        }
        offset += line.len();
    }
    let s = start?;
    parts.push(body.get(s..).unwrap_or_default());
    Some(parts)
}

fn decode_base64(body: &str) -> String {
    let compact: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    match base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => body.to_string(),
    }
}

fn decode_quoted_printable(body: &str) -> String {
    let mut out = Vec::with_capacity(body.len());
    let bytes = body.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'=' {
            out.push(b);
            i += 1;
            continue;
        }
        // soft line break: `=` then optional trailing whitespace then newline
        let mut j = i + 1;
        while matches!(bytes.get(j), Some(b' ' | b'\t')) {
            j += 1;
        }
        if bytes.get(j) == Some(&b'\n') {
            i = j + 1;
            continue;
        }
        let hex = |x: Option<&u8>| x.and_then(|c| (*c as char).to_digit(16));
        match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            _ => {
                out.push(b'=');
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// message/delivery-status
// ---------------------------------------------------------------------------------------------

/// The reporting MTA and one report per recipient group.
fn parse_delivery_status(body: &str) -> (Option<String>, Vec<RecipientReport>) {
    let mut reporting_mta = None;
    let mut recipients = Vec::new();
    for group in body.split("\n\n") {
        let fields = parse_headers(group);
        if fields.is_empty() {
            continue;
        }
        if let Some(mta) = header(&fields, "reporting-mta") {
            reporting_mta.get_or_insert_with(|| strip_type(mta));
        }
        let is_recipient = ["final-recipient", "original-recipient", "action", "status"]
            .iter()
            .any(|f| header(&fields, f).is_some());
        if !is_recipient {
            continue;
        }
        let mut r = RecipientReport::new(header(&fields, "final-recipient").map(strip_type));
        r.original_recipient = header(&fields, "original-recipient").map(strip_type);
        r.action = header(&fields, "action").map(Action::parse);
        r.remote_mta = header(&fields, "remote-mta").map(strip_type);
        r.diagnostic = header(&fields, "diagnostic-code")
            .or_else(|| header(&fields, "x-exim-diagnostic"))
            .map(strip_type)
            .filter(|d| !d.is_empty());
        let status = header(&fields, "status")
            .and_then(|s| s.split_whitespace().next())
            .and_then(StatusCode::parse)
            .or_else(|| r.diagnostic.as_deref().and_then(find_enhanced_code));
        r.set_status(status);
        recipients.push(r);
    }
    (reporting_mta, recipients)
}

/// `rfc822; <user@example.com>` → `user@example.com`; `dns; mx.example.net` → `mx.example.net`.
fn strip_type(value: &str) -> String {
    let v = value.split_once(';').map_or(value, |(_, rest)| rest).trim();
    let v = v
        .strip_prefix('<')
        .and_then(|x| x.strip_suffix('>'))
        .unwrap_or(v);
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// Plain-text fallback
// ---------------------------------------------------------------------------------------------

/// Lines after which a bounce quotes the original message, which must not be scanned.
const QUOTE_MARKERS: &[&str] = &[
    "------ this is a copy of the message",
    "------ this is a copy of your message",
    "original message headers:",
    "----- original message -----",
    "--- below this line is a copy of the message",
];

fn scan_text(parts: &[&str]) -> Vec<RecipientReport> {
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
            let code = find_enhanced_code(line).or_else(|| basic_reply_code(line));
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

/// The first `4.x.x` or `5.x.x` (or `2.x.x`) code standing alone in `line`.
fn find_enhanced_code(line: &str) -> Option<StatusCode> {
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
        // a sentence may end right after the code: "failed with 5.1.1."
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
        if !out.contains(&address) {
            out.push(address);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The `mxscopectl bounce FILE` command
// ---------------------------------------------------------------------------------------------

/// Arguments of `mxscopectl bounce`.
#[derive(Debug, clap::Args)]
pub struct BounceArgs {
    /// The bounce message as saved from the mailbox (RFC 5322, with headers); `-` reads stdin.
    pub file: std::path::PathBuf,
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

/// One row per recipient: action, status, its RFC 3463 meaning, temporary/permanent, the remote
/// server and its reply.
pub fn report(bounce: &BounceReport) -> crate::output::Report {
    use crate::output::{Cell, Column, Report};
    let mut r = Report::new(vec![
        Column::text("recipient", "RECIPIENT"),
        Column::text("action", "ACTION"),
        Column::text("status", "STATUS"),
        Column::text("meaning", "MEANING").cut(40),
        Column::text("permanence", "KIND"),
        Column::text("remote_mta", "REMOTE").cut(30),
        Column::text("diagnostic", "REPLY").cut(70),
        Column::hidden("original_recipient"),
        Column::hidden("reporting_mta"),
        Column::hidden("source"),
    ]);
    let source = match bounce.source {
        Source::DeliveryStatus => "delivery_status",
        Source::TextScan => "text_scan",
        Source::FailedRecipientsHeader => "failed_recipients_header",
    };
    for rcpt in &bounce.recipients {
        r.push(vec![
            Cell::opt(rcpt.recipient().map(str::to_string)),
            Cell::opt(rcpt.action.as_ref().map(ToString::to_string)),
            Cell::opt(rcpt.status.map(|s| s.to_string())),
            Cell::opt(rcpt.meaning.map(str::to_string)),
            Cell::opt(rcpt.permanence.map(|p| p.to_string())),
            Cell::opt(rcpt.remote_mta.clone()),
            Cell::opt(rcpt.diagnostic.clone()),
            Cell::opt(rcpt.original_recipient.clone()),
            Cell::opt(bounce.reporting_mta.clone()),
            Cell::new(source),
        ]);
    }
    r
}

/// Reads the file (or stdin), parses it and prints one row per recipient in `format`.
pub fn run(
    args: &BounceArgs,
    format: crate::output::Format,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Read as _;
    /// Bounces with attachments are small; anything larger is not a bounce worth reading whole.
    const MAX_BYTES: u64 = 16 * 1024 * 1024;
    let mut raw = Vec::new();
    if args.file.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_BYTES)
            .read_to_end(&mut raw)
            .context("read the bounce from stdin")?;
    } else {
        std::fs::File::open(&args.file)
            .and_then(|f| f.take(MAX_BYTES).read_to_end(&mut raw))
            .with_context(|| format!("read {}", args.file.display()))?;
    }
    let bounce = parse(&raw).with_context(|| format!("{}", args.file.display()))?;
    crate::cli::print(&report(&bounce), format, out, "no recipients in the bounce")
}

#[cfg(test)]
mod tests {
    use super::*;

    const POSTFIX: &str = include_str!("../tests/fixtures/bounces/postfix-dsn.eml");
    const EXIM: &str = include_str!("../tests/fixtures/bounces/exim-plain.eml");
    const EXCHANGE: &str = include_str!("../tests/fixtures/bounces/exchange-ndr.eml");

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

    #[test]
    fn code_finder_ignores_addresses_versions_and_words() {
        assert_eq!(
            find_enhanced_code("host [192.0.2.25] said 550 5.1.1 no"),
            status("5.1.1")
        );
        assert_eq!(find_enhanced_code("by relay (Exim 4.96) id 4.5.6a"), None);
        assert_eq!(find_enhanced_code("v1.5.2.3 and 2.0.2.25"), None);
        assert_eq!(find_enhanced_code("failed with 5.4.4."), status("5.4.4"));
        assert_eq!(find_enhanced_code("x5.1.1 5.1"), None);
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

    #[test]
    fn quoted_printable_decoding() {
        assert_eq!(
            decode_quoted_printable("recipien=\nt's =3D ok=20\n"),
            "recipient's = ok \n"
        );
        assert_eq!(
            decode_quoted_printable("bad =ZZ and end ="),
            "bad =ZZ and end ="
        );
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
            let _ = find_addresses(&s);
            let _ = find_enhanced_code(&s);
            let _ = decode_quoted_printable(&s);
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
