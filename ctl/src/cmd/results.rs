//! `mxscopectl results`: raw probe results as stored by the collector, filtered by target, check,
//! agent, region and age, with phase timings in milliseconds and facts with their native types.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use mxscope_proto::pb;
use serde_json::{Map, Value};

use crate::args;
use crate::cli::print;
use crate::client::Client;
use crate::output::{self, Cell, Column, Format, Report};

#[derive(Debug, Args)]
pub(crate) struct ResultsArgs {
    /// Only this target.
    #[arg(long, value_parser = args::target_name)]
    pub target: Option<String>,
    /// Only this check (mx, smtp, imaps, ...).
    #[arg(long, value_parser = args::check)]
    pub check: Option<String>,
    /// Only results of this agent.
    #[arg(long, value_parser = args::agent_id)]
    pub agent: Option<String>,
    /// Only results from this region.
    #[arg(long, value_parser = args::region)]
    pub region: Option<String>,
    /// At most this many results (newest first).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    /// Only results that started within this long before now (e.g. 10m).
    #[arg(long, value_parser = args::duration)]
    pub since: Option<Duration>,
}

impl ResultsArgs {
    fn request(&self, now_us: i64) -> pb::ResultsRequest {
        let since_us = self.since.map_or(0, |d| {
            let back = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
            now_us.saturating_sub(back).max(1)
        });
        pb::ResultsRequest {
            target: self.target.clone().unwrap_or_default(),
            check: self.check.clone().unwrap_or_default(),
            agent_id: self.agent.clone().unwrap_or_default(),
            region: self.region.clone().unwrap_or_default(),
            limit: self.limit,
            since_us,
        }
    }
}

pub(crate) async fn run(
    client: &mut Client,
    a: ResultsArgs,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let req = a.request(mxscope_proto::time::now_us());
    let resp = client.call(|c| c.results(req)).await?;
    print(&report(&resp.results), format, out, "no results match")?;
    if resp.truncated {
        eprintln!(
            "more results matched than fit in one answer; the {} newest are shown \
             (narrow with --target, --check, --agent, --region or --since)",
            resp.results.len()
        );
    }
    Ok(())
}

/// The documented JSON fields of `results`, in order (the README lists the same).
#[cfg(test)]
pub(crate) const FIELDS: &[&str] = &[
    "agent_id",
    "seq",
    "region",
    "target",
    "endpoint",
    "check",
    "start",
    "outcome",
    "error_class",
    "phase",
    "timings",
    "facts",
    "message",
    "stored_at",
];

fn columns() -> Vec<Column> {
    vec![
        Column::text("agent_id", "AGENT"),
        Column::number("seq", "SEQ"),
        Column::text("region", "REGION"),
        Column::text("target", "TARGET"),
        Column::text("endpoint", "ENDPOINT"),
        Column::text("check", "CHECK"),
        Column::text("start", "START"),
        Column::text("outcome", "OUTCOME"),
        Column::text("error_class", "ERROR"),
        Column::text("phase", "PHASE"),
        Column::hidden("timings"),
        Column::hidden("facts"),
        Column::text("message", "MESSAGE").cut(60),
        Column::hidden("stored_at"),
    ]
}

pub(crate) fn report(results: &[pb::StoredResult]) -> Report {
    let mut r = Report::new(columns());
    for stored in results {
        let Some(res) = &stored.result else { continue };
        let endpoint = res
            .endpoint
            .as_ref()
            .map(|e| mxscope_proto::endpoint_label(&e.host, &e.ip, e.port))
            .unwrap_or_default();
        let outcome = mxscope_proto::outcome_from_wire(res.outcome).map(|o| o.name().to_string());
        let total = res
            .timings
            .iter()
            .find(|t| t.phase == "total")
            .map(|t| ms(t.micros));
        let start = output::timestamp_millis(res.start_us);
        r.push(vec![
            Cell::new(res.agent_id.as_str()),
            Cell::new(res.seq),
            Cell::new(stored.region.as_str()),
            Cell::new(res.target.as_str()),
            Cell::new(endpoint),
            Cell::new(res.check.as_str()),
            Cell::opt(start.clone())
                .shown_as(start.unwrap_or_else(|| "-".into()).replace('T', " ")),
            Cell::opt(outcome.clone()).shown_as(match (outcome, total) {
                (Some(o), Some(t)) => format!("{o} {}ms", fmt_ms(t)),
                (Some(o), None) => o,
                (None, _) => "?".into(),
            }),
            Cell::opt(non_empty(&res.error_class)),
            Cell::opt(non_empty(&res.phase)),
            Cell::new(timings(&res.timings)),
            Cell::new(facts(&res.facts)),
            Cell::new(res.message.as_str()),
            Cell::opt(output::timestamp_millis(stored.stored_at_us)),
        ]);
    }
    r
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn ms(micros: u64) -> f64 {
    // Exact for any realistic probe duration (below 2^53 µs).
    micros as f64 / 1000.0
}

fn fmt_ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

/// `{phase: milliseconds}`.
fn timings(list: &[pb::PhaseTiming]) -> Value {
    let mut m = Map::new();
    for t in list {
        m.insert(t.phase.clone(), Cell::float(ms(t.micros)).value);
    }
    Value::Object(m)
}

/// `{key: value}` with numbers as numbers and flags as booleans.
fn facts(list: &[pb::Fact]) -> Value {
    let mut m = Map::new();
    for f in list {
        let v = match &f.value {
            None => Value::Null,
            Some(pb::fact::Value::Text(s)) => Value::String(s.clone()),
            Some(pb::fact::Value::Int(i)) => Value::from(*i),
            Some(pb::fact::Value::Float(x)) => Cell::float(*x).value,
            Some(pb::fact::Value::Flag(b)) => Value::Bool(*b),
        };
        m.insert(f.key.clone(), v);
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored() -> pb::StoredResult {
        pb::StoredResult {
            result: Some(pb::ProbeResult {
                agent_id: "eu1".into(),
                seq: 42,
                target: "example.test".into(),
                endpoint: Some(pb::Endpoint {
                    host: "mx1.example.test".into(),
                    ip: "127.0.0.1".into(),
                    port: 2525,
                    family: pb::AddressFamily::Ipv4 as i32,
                }),
                check: "smtp".into(),
                start_us: 1_700_000_000_123_000,
                outcome: pb::Outcome::Fail as i32,
                error_class: "refused".into(),
                phase: "connect".into(),
                timings: vec![
                    pb::PhaseTiming {
                        phase: "connect".into(),
                        micros: 1_500,
                    },
                    pb::PhaseTiming {
                        phase: "total".into(),
                        micros: 2_250,
                    },
                ],
                facts: vec![
                    pb::Fact {
                        key: "banner".into(),
                        value: Some(pb::fact::Value::Text("220 hi".into())),
                    },
                    pb::Fact {
                        key: "code".into(),
                        value: Some(pb::fact::Value::Int(421)),
                    },
                    pb::Fact {
                        key: "ratio".into(),
                        value: Some(pb::fact::Value::Float(0.5)),
                    },
                    pb::Fact {
                        key: "tls".into(),
                        value: Some(pb::fact::Value::Flag(false)),
                    },
                ],
                message: "connection refused".into(),
                interval_ms: 60_000,
            }),
            region: "eu-west".into(),
            stored_at_us: 1_700_000_001_000_000,
        }
    }

    #[test]
    fn json_fields_and_types() {
        let mut out = Vec::new();
        report(&[stored()]).render(Format::Json, &mut out).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let rows = v.as_array().unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want = FIELDS.to_vec();
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(r["agent_id"], json!("eu1"));
        assert_eq!(r["seq"], json!(42));
        assert_eq!(r["region"], json!("eu-west"));
        assert_eq!(r["endpoint"], json!("mx1.example.test[127.0.0.1]:2525"));
        assert_eq!(r["start"], json!("2023-11-14T22:13:20.123Z"));
        assert_eq!(r["outcome"], json!("fail"));
        assert_eq!(r["error_class"], json!("refused"));
        assert_eq!(r["phase"], json!("connect"));
        assert_eq!(r["timings"], json!({"connect": 1.5, "total": 2.25}));
        assert_eq!(
            r["facts"],
            json!({"banner": "220 hi", "code": 421, "ratio": 0.5, "tls": false})
        );
        assert_eq!(r["stored_at"], json!("2023-11-14T22:13:21.000Z"));
    }

    #[test]
    fn ok_result_has_null_error_and_phase() {
        let mut s = stored();
        if let Some(r) = s.result.as_mut() {
            r.outcome = pb::Outcome::Ok as i32;
            r.error_class.clear();
            r.phase.clear();
        }
        let mut out = Vec::new();
        report(&[s]).render(Format::Json, &mut out).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v[0]["outcome"], json!("ok"));
        assert!(v[0]["error_class"].is_null());
        assert!(v[0]["phase"].is_null());
    }

    #[test]
    fn result_without_body_is_skipped() {
        let r = report(&[pb::StoredResult {
            result: None,
            region: "x".into(),
            stored_at_us: 0,
        }]);
        assert_eq!(r.rows(), 0);
    }

    #[test]
    fn csv_keeps_nested_values_in_one_field() {
        let mut out = Vec::new();
        report(&[stored()]).render(Format::Csv, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0], FIELDS.join(","));
        assert!(
            lines[1].contains(r#","{""connect"":1.5,""total"":2.25}","#),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn request_turns_since_into_a_start_time() {
        let a = ResultsArgs {
            target: None,
            check: Some("smtp".into()),
            agent: Some("eu1".into()),
            region: None,
            limit: 10,
            since: Some(Duration::from_secs(60)),
        };
        let req = a.request(1_000_000_000);
        assert_eq!(req.since_us, 940_000_000);
        assert_eq!(req.agent_id, "eu1");
        assert_eq!(req.limit, 10);
    }
}
