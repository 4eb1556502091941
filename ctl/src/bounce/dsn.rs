//! RFC 3464 `message/delivery-status` bodies: the reporting MTA and one report per recipient
//! group (final and original recipient, action, status, remote MTA, diagnostic).

use mxscope_proto::StatusCode;

use super::mime::{header, parse_headers};
use super::{Action, RecipientReport};

/// The reporting MTA and one report per recipient group.
pub(super) fn parse_delivery_status(body: &str) -> (Option<String>, Vec<RecipientReport>) {
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
            .or_else(|| r.diagnostic.as_deref().and_then(StatusCode::find));
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
