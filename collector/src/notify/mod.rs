//! Alert notifications: what the alert engine hands over ([`Notice`]) and the seam it hands it
//! through ([`Notify`]). The notifiers behind it (Prometheus Alertmanager, signed webhooks, email
//! through an SMTP submission server) queue, retry and count on their own; the engine never waits.

use std::collections::BTreeMap;

/// Whether an alert starts (or repeats) or ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NoticeStatus {
    Firing,
    Resolved,
}

/// One alert notification, the same for every notifier.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Notice {
    /// Stable key of the alert: its rule and what it is about (`down/example.com/smtp`), the same
    /// for its firing, repeats and resolve (Alertmanager's fingerprint comes from the labels).
    pub key: String,
    /// The rule's name.
    pub rule: String,
    pub status: NoticeStatus,
    /// The rule's severity (`critical`, `warning`, `info`, or the rules file's own words).
    pub severity: String,
    /// `alertname` (= rule), `severity`, `target`, `check`, and when they apply `region`, `mx`,
    /// `agent`, plus the rule's labels.
    pub labels: BTreeMap<String, String>,
    /// One line for a pager.
    pub summary: String,
    /// The `diagnose` explanation and evidence, one line each.
    pub evidence: Vec<String>,
    /// For drift: the value before and after.
    pub before: Option<String>,
    pub after: Option<String>,
    pub starts_at_us: i64,
    /// Set on `Resolved`.
    pub ends_at_us: Option<i64>,
    /// Where a person looks next: the dashboard's target page.
    pub generator_url: String,
    /// Sent by `mxscopectl alert test`, not by a real condition.
    pub test: bool,
}

/// Where the alert engine sends its notices. `send` never blocks: each notifier keeps a bounded
/// retry queue, and what it must drop is counted.
pub trait Notify: Send + Sync + std::fmt::Debug {
    fn send(&self, notice: Notice);
}
