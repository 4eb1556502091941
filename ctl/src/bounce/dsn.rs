//! RFC 3464 `message/delivery-status` bodies: the reporting MTA and one report per recipient
//! group (final and original recipient, action, status, remote MTA, diagnostic). A group starts
//! at a blank line or where a field repeats (two recipients run together).

use mxscope_proto::StatusCode;

use super::mime::{header, parse_headers};
use super::scan::specificity;
use super::{Action, RecipientReport};

/// The reporting MTA and one report per recipient group.
pub(super) fn parse_delivery_status(body: &str) -> (Option<String>, Vec<RecipientReport>) {
    let mut reporting_mta = None;
    let mut recipients = Vec::new();
    for block in body.split("\n\n") {
        for fields in split_repeated(parse_headers(block)) {
            if let Some(mta) = header(&fields, "reporting-mta") {
                reporting_mta.get_or_insert_with(|| strip_type(mta));
            }
            let is_recipient = ["final-recipient", "original-recipient", "action", "status"]
                .iter()
                .any(|f| header(&fields, f).is_some());
            if is_recipient {
                recipients.push(recipient(&fields));
            }
        }
    }
    (reporting_mta, recipients)
}

/// Cuts a field list where a name repeats: each cut is one group.
fn split_repeated(fields: Vec<(String, String)>) -> Vec<Vec<(String, String)>> {
    let mut groups: Vec<Vec<(String, String)>> = Vec::new();
    let mut current: Vec<(String, String)> = Vec::new();
    for (name, value) in fields {
        // Original-Recipient may stand before or after Final-Recipient: it starts a new group
        // only once the current one has its Final-Recipient and a status or action.
        let complete = header(&current, "final-recipient").is_some()
            && (header(&current, "status").is_some() || header(&current, "action").is_some());
        let starts_new =
            current.iter().any(|(n, _)| *n == name) || (name == "original-recipient" && complete);
        if starts_new && !current.is_empty() {
            groups.push(std::mem::take(&mut current));
        }
        current.push((name, value));
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

fn recipient(fields: &[(String, String)]) -> RecipientReport {
    let mut r = RecipientReport::new(header(fields, "final-recipient").map(strip_type));
    r.original_recipient = header(fields, "original-recipient").map(strip_type);
    r.action = header(fields, "action").map(Action::parse);
    r.remote_mta = header(fields, "remote-mta").map(strip_type);
    r.diagnostic = header(fields, "diagnostic-code")
        .or_else(|| header(fields, "x-exim-diagnostic"))
        .map(strip_type)
        .filter(|d| !d.is_empty());
    let field = header(fields, "status")
        .and_then(|s| s.split_whitespace().next())
        .and_then(StatusCode::parse);
    let reply = r.diagnostic.as_deref().and_then(StatusCode::find);
    let (status, conflict) = choose_status(field, reply);
    r.set_status(status);
    r.status_conflict = conflict;
    r
}

/// The `Status` field or the code in the reply, whichever is more specific (`5.1.1` over a
/// generic `5.0.0`; the field on a tie), and a note when both are present and differ.
pub(super) fn choose_status(
    field: Option<StatusCode>,
    reply: Option<StatusCode>,
) -> (Option<StatusCode>, Option<String>) {
    match (field, reply) {
        (Some(f), Some(r)) if f != r => {
            let chosen = if specificity(r) > specificity(f) {
                r
            } else {
                f
            };
            (
                Some(chosen),
                Some(format!("status field {f}, reply {r}: {chosen} used")),
            )
        }
        (f, r) => (f.or(r), None),
    }
}

/// `rfc822; <user@example.com>` → `user@example.com`; `dns; mx.example.net` → `mx.example.net`.
pub(super) fn strip_type(value: &str) -> String {
    let v = value.split_once(';').map_or(value, |(_, rest)| rest).trim();
    let v = v
        .strip_prefix('<')
        .and_then(|x| x.strip_suffix('>'))
        .unwrap_or(v);
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: &str) -> Option<StatusCode> {
        StatusCode::parse(s)
    }

    #[test]
    fn two_recipient_groups_without_a_blank_line() {
        let body = "Reporting-MTA: dns; mx.example\n\n\
                    Final-Recipient: rfc822; a@x.example\nAction: failed\nStatus: 5.1.1\n\
                    Final-Recipient: rfc822; b@x.example\nAction: delayed\nStatus: 4.2.2\n";
        let (mta, rs) = parse_delivery_status(body);
        assert_eq!(mta.as_deref(), Some("mx.example"));
        assert_eq!(rs.len(), 2, "{rs:?}");
        assert_eq!(rs[1].recipient(), Some("b@x.example"));
        assert_eq!(rs[1].action, Some(Action::Delayed));
        assert_eq!(rs[1].status, status("4.2.2"));
        let body = "Original-Recipient: rfc822; a@x.example\nFinal-Recipient: rfc822; a@x.example\nStatus: 5.1.1\n\
                    Original-Recipient: rfc822; b@x.example\nFinal-Recipient: rfc822; b@x.example\nStatus: 5.2.2\n";
        let (_, rs) = parse_delivery_status(body);
        let got: Vec<_> = rs
            .iter()
            .map(|r| (r.original_recipient.clone(), r.status))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some("a@x.example".into()), status("5.1.1")),
                (Some("b@x.example".into()), status("5.2.2"))
            ]
        );
    }

    #[test]
    fn specific_reply_code_beats_a_generic_status_field() {
        assert_eq!(
            choose_status(status("5.0.0"), status("5.1.1")),
            (
                status("5.1.1"),
                Some("status field 5.0.0, reply 5.1.1: 5.1.1 used".into())
            )
        );
        assert_eq!(
            choose_status(status("4.4.7"), status("4.4.2")),
            (
                status("4.4.7"),
                Some("status field 4.4.7, reply 4.4.2: 4.4.7 used".into())
            )
        );
        assert_eq!(
            choose_status(status("5.1.1"), status("5.1.1")),
            (status("5.1.1"), None)
        );
        assert_eq!(
            choose_status(None, status("5.7.1")),
            (status("5.7.1"), None)
        );
    }
}
