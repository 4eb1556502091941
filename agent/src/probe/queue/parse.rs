//! The Postfix queue as `postqueue -j` prints it (one JSON object per message per line):
//! counts per queue, the oldest message's age and the top deferral reasons by domain (as qshape).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// Messages per Postfix queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct QueueCounts {
    pub active: u64,
    pub deferred: u64,
    pub hold: u64,
    pub incoming: u64,
    pub maildrop: u64,
    /// A queue name this module does not know.
    pub other: u64,
}

/// Deferred recipients of one destination domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeferralGroup {
    /// Recipient domain, lowercased.
    pub domain: String,
    /// Recipients waiting for this domain.
    pub count: u64,
    /// The reason Postfix gave, from the oldest deferred message of the group.
    pub sample_reason: String,
}

/// What kind of problem a line has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum LineProblem {
    /// Not JSON.
    Syntax,
    /// JSON, but not the shape `postqueue -j` prints (missing field, wrong type).
    Shape,
    /// The line ends in the middle of a value.
    Truncated,
}

/// A line of the output that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {problem:?}: {detail}")]
pub(crate) struct QueueLineError {
    /// 1-based line number.
    pub line: usize,
    pub problem: LineProblem,
    pub detail: String,
}

/// Everything [`summarize`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct QueueSummary {
    pub counts: QueueCounts,
    pub messages: u64,
    pub bytes: u64,
    /// Age of the oldest message in any queue.
    pub oldest_age: Option<Duration>,
    pub oldest_queue_id: Option<String>,
    /// Deferred recipients grouped by domain, largest group first (ties by domain name).
    pub deferrals: Vec<DeferralGroup>,
    pub bad_lines: Vec<QueueLineError>,
}

#[derive(Debug, Deserialize)]
struct Message {
    queue_name: String,
    queue_id: String,
    arrival_time: u64,
    #[serde(default)]
    message_size: u64,
    #[serde(default)]
    recipients: Vec<Recipient>,
}

#[derive(Debug, Deserialize)]
struct Recipient {
    address: String,
    #[serde(default)]
    delay_reason: Option<String>,
}

/// Reads `postqueue -j` output; `now_unix` is the current time in seconds since the epoch.
/// Unreadable lines are reported in `bad_lines` and skipped; an empty output is an empty queue.
pub(crate) fn summarize(output: &str, now_unix: u64) -> QueueSummary {
    let mut s = QueueSummary::default();
    let mut oldest: Option<(u64, String)> = None;
    // domain → (count, arrival of the sample, sample reason)
    let mut groups: BTreeMap<String, (u64, u64, String)> = BTreeMap::new();
    for (index, line) in output.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let msg: Message = match serde_json::from_str(line) {
            Ok(m) => m,
            Err(e) => {
                let problem = match e.classify() {
                    serde_json::error::Category::Data => LineProblem::Shape,
                    serde_json::error::Category::Eof => LineProblem::Truncated,
                    _ => LineProblem::Syntax,
                };
                s.bad_lines.push(QueueLineError {
                    line: index + 1,
                    problem,
                    detail: e.to_string(),
                });
                continue;
            }
        };
        let slot = match msg.queue_name.as_str() {
            "active" => &mut s.counts.active,
            "deferred" => &mut s.counts.deferred,
            "hold" => &mut s.counts.hold,
            "incoming" => &mut s.counts.incoming,
            "maildrop" => &mut s.counts.maildrop,
            _ => &mut s.counts.other,
        };
        *slot += 1;
        s.messages += 1;
        s.bytes = s.bytes.saturating_add(msg.message_size);
        if oldest.as_ref().is_none_or(|(t, _)| msg.arrival_time < *t) {
            oldest = Some((msg.arrival_time, msg.queue_id.clone()));
        }
        for rcpt in &msg.recipients {
            let Some(reason) = rcpt.delay_reason.as_deref().filter(|r| !r.is_empty()) else {
                continue;
            };
            let domain = rcpt
                .address
                .rsplit_once('@')
                .map_or("(no domain)", |(_, d)| d)
                .trim_end_matches('>')
                .to_ascii_lowercase();
            let entry = groups.entry(domain).or_insert((0, u64::MAX, String::new()));
            entry.0 += 1;
            if msg.arrival_time < entry.1 {
                entry.1 = msg.arrival_time;
                entry.2 = reason.to_string();
            }
        }
    }
    if let Some((arrival, id)) = oldest {
        s.oldest_age = Some(Duration::from_secs(now_unix.saturating_sub(arrival)));
        s.oldest_queue_id = Some(id);
    }
    s.deferrals = groups
        .into_iter()
        .map(|(domain, (count, _, sample_reason))| DeferralGroup {
            domain,
            count,
            sample_reason,
        })
        .collect();
    // stable sort keeps BTreeMap's domain order among equal counts
    s.deferrals.sort_by_key(|g| std::cmp::Reverse(g.count));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_741_000_000;

    /// Shaped like `postqueue -j` on Postfix 3.x, one message per line.
    const SAMPLE: &str = r#"{"queue_name": "deferred", "queue_id": "4Q8V3k1TqTz9sWm", "arrival_time": 1740990000, "message_size": 1834, "forced_expire": false, "sender": "alerts@example.com", "recipients": [{"address": "ops@unreachable.example", "delay_reason": "connect to mx.unreachable.example[192.0.2.44]:25: Connection timed out"}, {"address": "dev@unreachable.example", "delay_reason": "connect to mx.unreachable.example[192.0.2.44]:25: Connection timed out"}]}
{"queue_name": "deferred", "queue_id": "4Q8V3k2BcDz9sWn", "arrival_time": 1740980000, "message_size": 2210, "forced_expire": false, "sender": "billing@example.com", "recipients": [{"address": "Finance@Greylist.EXAMPLE", "delay_reason": "host mx.greylist.example[198.51.100.7] said: 450 4.2.0 <finance@greylist.example>: Recipient address rejected: Greylisted (in reply to RCPT TO command)"}]}
{"queue_name": "deferred", "queue_id": "4Q8V3k3XyZz9sWp", "arrival_time": 1740995000, "message_size": 990, "forced_expire": false, "sender": "", "recipients": [{"address": "x@unreachable.example", "delay_reason": "connect to mx.unreachable.example[192.0.2.44]:25: No route to host"}]}
{"queue_name": "active", "queue_id": "4Q8V3k4AaAz9sWq", "arrival_time": 1740999990, "message_size": 512, "forced_expire": false, "sender": "a@example.com", "recipients": [{"address": "b@example.org"}]}
{"queue_name": "hold", "queue_id": "4Q8V3k5HhHz9sWr", "arrival_time": 1740900000, "message_size": 4096, "forced_expire": false, "sender": "spam@example.com", "recipients": [{"address": "c@example.org"}]}
{"queue_name": "incoming", "queue_id": "4Q8V3k6IiIz9sWs", "arrival_time": 1740999999, "message_size": 100, "forced_expire": false, "sender": "d@example.com", "recipients": []}
{"queue_name": "maildrop", "queue_id": "4Q8V3k7MmMz9sWt", "arrival_time": 1740999999, "message_size": 100, "sender": "e@example.com", "recipients": [{"address": "f@example.org"}]}
"#;

    #[test]
    fn counts_messages_per_queue() {
        let s = summarize(SAMPLE, NOW);
        assert_eq!(
            s.counts,
            QueueCounts {
                active: 1,
                deferred: 3,
                hold: 1,
                incoming: 1,
                maildrop: 1,
                other: 0
            }
        );
        assert_eq!(s.messages, 7);
        assert_eq!(s.bytes, 1834 + 2210 + 990 + 512 + 4096 + 100 + 100);
        assert!(s.bad_lines.is_empty());
    }

    #[test]
    fn reports_the_oldest_message() {
        let s = summarize(SAMPLE, NOW);
        assert_eq!(s.oldest_queue_id.as_deref(), Some("4Q8V3k5HhHz9sWr"));
        assert_eq!(s.oldest_age, Some(Duration::from_secs(NOW - 1_740_900_000)));
        // a clock behind the arrival time gives age zero, not an underflow
        let s = summarize(SAMPLE, 0);
        assert_eq!(s.oldest_age, Some(Duration::ZERO));
    }

    #[test]
    fn groups_deferrals_by_domain_largest_first() {
        let s = summarize(SAMPLE, NOW);
        assert_eq!(s.deferrals.len(), 2);
        assert_eq!(s.deferrals[0].domain, "unreachable.example");
        assert_eq!(s.deferrals[0].count, 3);
        // the sample comes from the oldest message of the group
        assert_eq!(
            s.deferrals[0].sample_reason,
            "connect to mx.unreachable.example[192.0.2.44]:25: Connection timed out"
        );
        assert_eq!(s.deferrals[1].domain, "greylist.example");
        assert_eq!(s.deferrals[1].count, 1);
        assert!(s.deferrals[1].sample_reason.contains("450 4.2.0"));
    }

    #[test]
    fn empty_output_is_an_empty_queue() {
        let s = summarize("", NOW);
        assert_eq!(s, QueueSummary::default());
        assert_eq!(s.oldest_age, None);
        assert_eq!(summarize("\n\n", NOW).messages, 0);
    }

    #[test]
    fn bad_lines_are_reported_and_skipped() {
        let out = format!(
            "{}\nnot json\n{{\"queue_name\": \"deferred\"}}\n{{\"queue_name\": \"active\", \"queue_id\": \"X\"\n{{\"queue_name\": \"corrupt\", \"queue_id\": \"Y\", \"arrival_time\": 1}}\n",
            SAMPLE.lines().next().unwrap_or_default()
        );
        let s = summarize(&out, NOW);
        assert_eq!(s.messages, 2);
        assert_eq!((s.counts.deferred, s.counts.other), (1, 1));
        let problems: Vec<(usize, LineProblem)> =
            s.bad_lines.iter().map(|e| (e.line, e.problem)).collect();
        assert_eq!(
            problems,
            vec![
                (2, LineProblem::Syntax),
                (3, LineProblem::Shape),
                (4, LineProblem::Truncated)
            ]
        );
    }

    #[test]
    fn ties_are_ordered_by_domain() {
        let out = r#"{"queue_name":"deferred","queue_id":"A","arrival_time":5,"recipients":[{"address":"a@b.example","delay_reason":"x"},{"address":"a@a.example","delay_reason":"y"},{"address":"noat","delay_reason":"z"}]}"#;
        let s = summarize(out, 10);
        let domains: Vec<&str> = s.deferrals.iter().map(|g| g.domain.as_str()).collect();
        assert_eq!(domains, vec!["(no domain)", "a.example", "b.example"]);
    }

    proptest::proptest! {
        #[test]
        fn summarize_never_panics(s in "\\PC*", now in proptest::num::u64::ANY) {
            let sum = summarize(&s, now);
            proptest::prop_assert_eq!(sum.messages, sum.counts.active + sum.counts.deferred + sum.counts.hold
                + sum.counts.incoming + sum.counts.maildrop + sum.counts.other);
        }
    }
}
