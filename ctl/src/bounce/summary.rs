//! Counts over many explained bounces: recipients by reason, by soft/hard, by recipient domain
//! and by remote host, and how many messages could not be read.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{BounceReport, Kind};

/// Per-recipient counts over a mailbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub messages: usize,
    /// Messages no recipient could be read from.
    pub unreadable: usize,
    pub by_kind: BTreeMap<String, usize>,
    pub by_reason: BTreeMap<String, usize>,
    pub by_severity: BTreeMap<String, usize>,
    pub by_domain: BTreeMap<String, usize>,
    /// `-` when the notice names no remote host.
    pub by_remote: BTreeMap<String, usize>,
}

impl Summary {
    /// Counts one message: its report, or `None` when it could not be read.
    pub fn add(&mut self, report: Option<&BounceReport>) {
        self.messages += 1;
        let Some(r) = report else {
            self.unreadable += 1;
            return;
        };
        *self
            .by_kind
            .entry(kind_name(r.kind).to_string())
            .or_default() += 1;
        for x in &r.recipients {
            *self.by_reason.entry(x.reason.to_string()).or_default() += 1;
            if let Some(s) = x.severity {
                *self.by_severity.entry(s.to_string()).or_default() += 1;
            }
            let domain = x
                .recipient()
                .and_then(|a| a.rsplit_once('@'))
                .map_or_else(|| "-".to_string(), |(_, d)| d.to_ascii_lowercase());
            *self.by_domain.entry(domain).or_default() += 1;
            let remote = x
                .remote_mta
                .as_deref()
                .map_or_else(|| "-".to_string(), str::to_ascii_lowercase);
            *self.by_remote.entry(remote).or_default() += 1;
        }
    }
}

pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Bounce => "bounce",
        Kind::Delay => "delay",
        Kind::Delivery => "delivery",
        Kind::AutoReply => "auto_reply",
        Kind::Feedback => "feedback",
    }
}
