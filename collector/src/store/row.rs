//! The stored form of one result: a few integer columns that queries filter and aggregate on, and
//! the rest (phase timings, facts, error class, phase, message, interval) as one protobuf `body`
//! blob, decoded only when a result is shown. The series (target, endpoint, check, region) and
//! the agent are integer ids into `series` and `agents`.

use bytes::Bytes;
use mxscope_proto::pb;
use mxscope_proto::raw::ResultView;
use prost::Message;

/// The columns of a `results` row that do not depend on the database (no ids).
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub seq: i64,
    pub start_us: i64,
    pub outcome: i32,
    /// The `total` phase timing, if the result has one.
    pub total_us: Option<i64>,
    /// Shared with the series' latest result (see the store writer).
    pub body: Bytes,
}

impl ResultRow {
    /// Encodes a result; fields kept elsewhere (agent, seq, target, endpoint, check, start,
    /// outcome) are left out of the body.
    pub fn of(r: &pb::ProbeResult) -> ResultRow {
        let total = r.timings.iter().find(|t| t.phase == "total");
        ResultRow::with_body(
            r.seq,
            r.start_us,
            r.outcome,
            total.map(|t| t.micros),
            encode_body(r),
        )
    }

    /// The row of a result read in place: its body is the result's own encoding of the body
    /// fields, copied as received (what [`encode_body`] makes of the decoded result).
    pub fn of_view(r: &ResultView<'_>) -> ResultRow {
        let total = r.timings.iter().find(|t| t.0 == "total");
        let mut body = Vec::with_capacity(r.body_len());
        r.body(&mut body);
        ResultRow::with_body(r.seq, r.start_us, r.outcome, total.map(|t| t.1), body)
    }

    fn with_body(
        seq: u64,
        start_us: i64,
        outcome: i32,
        total: Option<u64>,
        body: Vec<u8>,
    ) -> ResultRow {
        ResultRow {
            seq: i64::try_from(seq).unwrap_or(i64::MAX),
            start_us,
            outcome,
            total_us: total.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
            body: Bytes::from(body),
        }
    }
}

/// The body: a `ProbeResult` holding only error class, phase, timings, facts, message and interval
/// (field numbers as on the wire, so [`decode_body`] is plain protobuf decoding).
pub fn encode_body(r: &pb::ProbeResult) -> Vec<u8> {
    use prost::encoding::{message, string, uint64};
    let mut out =
        Vec::with_capacity(16 + r.message.len() + 16 * r.timings.len() + 24 * r.facts.len());
    if !r.error_class.is_empty() {
        string::encode(8, &r.error_class, &mut out);
    }
    if !r.phase.is_empty() {
        string::encode(9, &r.phase, &mut out);
    }
    for t in &r.timings {
        message::encode(10, t, &mut out);
    }
    for f in &r.facts {
        message::encode(11, f, &mut out);
    }
    if !r.message.is_empty() {
        string::encode(12, &r.message, &mut out);
    }
    if r.interval_ms != 0 {
        uint64::encode(13, &r.interval_ms, &mut out);
    }
    out
}

/// Reads a body back; `None` when it is not valid protobuf.
pub fn decode_body(b: &[u8]) -> Option<pb::ProbeResult> {
    pb::ProbeResult::decode(b).ok()
}

/// The series' endpoint label of a result (the target's name when it has no endpoint).
pub fn endpoint_label(r: &ResultView<'_>) -> String {
    match &r.endpoint {
        Some(e) => mxscope_proto::endpoint_label(e.host, e.ip, e.port),
        None => r.target.to_string(),
    }
}

/// The persisted state names (`stale` is decided at read time from the clock).
pub fn state_name(failing: bool) -> &'static str {
    if failing {
        mxscope_proto::RegionState::Failing.name()
    } else {
        mxscope_proto::RegionState::Ok.name()
    }
}

/// The event of a series in `region` whose state `r` changed from `was_failing`.
pub fn state_event(r: &ResultView<'_>, region: &str, was_failing: bool) -> pb::WatchEvent {
    use mxscope_proto::raw::FactValue;
    pb::WatchEvent {
        target: r.target.to_string(),
        endpoint: endpoint_label(r),
        check: r.check.to_string(),
        region: region.to_string(),
        old_state: state_name(was_failing).to_string(),
        new_state: state_name(!was_failing).to_string(),
        at_us: r.start_us,
        error_class: r.error_class.to_string(),
        level: "endpoint".to_string(),
        via_mx: r.facts.iter().any(|f| {
            let flag = match f.value {
                Some(FactValue::Flag(b)) => Some(b),
                _ => None,
            };
            mxscope_proto::facts::address::marks_mx_expansion(f.key, flag)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trips_the_fields_it_keeps() {
        let r = pb::ProbeResult {
            agent_id: "a".into(),
            seq: 7,
            target: "example.test".into(),
            check: "smtp".into(),
            start_us: 5,
            outcome: pb::Outcome::Fail as i32,
            error_class: "timeout".into(),
            phase: "banner".into(),
            timings: vec![
                pb::PhaseTiming {
                    phase: "connect".into(),
                    micros: 1200,
                },
                pb::PhaseTiming {
                    phase: "total".into(),
                    micros: 10_000_000,
                },
            ],
            facts: vec![pb::Fact {
                key: "tls_version".into(),
                value: Some(pb::fact::Value::Text("TLSv1.3".into())),
            }],
            message: "no banner within 10s".into(),
            interval_ms: 60_000,
            ..Default::default()
        };
        let row = ResultRow::of(&r);
        let bytes = r.encode_to_vec();
        assert_eq!(
            ResultRow::of_view(&ResultView::parse(&bytes).unwrap()),
            row,
            "read in place, the same row"
        );
        assert_eq!(row.total_us, Some(10_000_000));
        assert_eq!((row.seq, row.start_us), (7, 5));
        let back = decode_body(&row.body).expect("decodes");
        assert_eq!(
            back,
            pb::ProbeResult {
                agent_id: String::new(),
                seq: 0,
                target: String::new(),
                check: String::new(),
                start_us: 0,
                outcome: 0,
                ..r
            }
        );
        assert_eq!(decode_body(&[0xff, 0xff]), None);
    }
}
