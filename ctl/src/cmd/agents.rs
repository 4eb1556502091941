//! `mxscopectl agents`: the agents the collector knows, with region, connection state, last
//! contact, throughput and spool figures.

use std::io::Write;

use mxscope_proto::pb;
use serde_json::{Map, Value};

use crate::cli::print;
use crate::client::Client;
use crate::output::{self, Cell, Column, Format, Report};

pub(crate) async fn run(
    client: &mut Client,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let resp = client.call(|c| c.agents(pb::AgentsRequest {})).await?;
    print(
        &report(&resp.agents, mxscope_proto::time::now_us()),
        format,
        out,
        "no agents have connected yet",
    )
}

/// The documented JSON fields of `agents`, in order (the README lists the same).
#[cfg(test)]
pub(crate) const FIELDS: &[&str] = &[
    "id",
    "region",
    "state",
    "connected",
    "collector",
    "version",
    "labels",
    "last_seen",
    "results_per_min",
    "stored_up_to_seq",
    "spool_depth",
    "dropped_total",
    "cert_expires",
];

fn columns() -> Vec<Column> {
    vec![
        Column::text("id", "ID"),
        Column::text("region", "REGION"),
        Column::text("state", "STATE"),
        Column::text("connected", "CONNECTED"),
        Column::text("collector", "COLLECTOR"),
        Column::text("version", "VERSION"),
        Column::text("labels", "LABELS"),
        Column::text("last_seen", "LAST SEEN"),
        Column::number("results_per_min", "RESULTS/MIN"),
        Column::number("stored_up_to_seq", "STORED SEQ"),
        Column::number("spool_depth", "SPOOL"),
        Column::number("dropped_total", "DROPPED"),
        Column::text("cert_expires", "CERT EXPIRES"),
    ]
}

/// Builds the report; `now_us` only feeds the "seen 5s ago" text of tables.
pub(crate) fn report(agents: &[pb::AgentInfo], now_us: i64) -> Report {
    let mut r = Report::new(columns());
    for a in agents {
        let labels: Map<String, Value> = a
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        r.push(vec![
            Cell::new(a.id.as_str()),
            Cell::new(a.region.as_str()),
            Cell::new(a.state.as_str()),
            Cell::new(a.connected),
            Cell::new(a.collector.as_str()),
            Cell::new(a.version.as_str()),
            Cell::new(Value::Object(labels)),
            Cell::opt(output::timestamp_seconds(a.last_seen_us))
                .shown_as(output::age(a.last_seen_us, now_us)),
            Cell::float(a.results_per_min).shown_as(format!("{:.1}", a.results_per_min)),
            Cell::new(a.stored_up_to_seq),
            Cell::new(a.spool_depth),
            Cell::new(a.dropped_total),
            Cell::opt(output::timestamp_seconds(a.cert_not_after_us))
                .shown_as(cert_left(a.cert_not_after_us, now_us)),
        ]);
    }
    r
}

/// `2027-01-04 (31d)`: the expiry date and the days left, `expired` once past, `-` unknown.
fn cert_left(not_after_us: i64, now_us: i64) -> String {
    let Some(at) = output::timestamp_seconds(not_after_us) else {
        return "-".into();
    };
    let date = at.get(..10).unwrap_or(&at);
    if not_after_us <= now_us {
        return format!("{date} (expired)");
    }
    let days = (not_after_us - now_us) / 86_400_000_000;
    format!("{date} ({days}d)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agent(id: &str, last_seen_us: i64) -> pb::AgentInfo {
        pb::AgentInfo {
            id: id.into(),
            region: "us-east".into(),
            version: "0.1.0".into(),
            labels: [("provider".to_string(), "lab".to_string())]
                .into_iter()
                .collect(),
            last_seen_us,
            stored_up_to_seq: 1200,
            dropped_total: 3,
            spool_depth: 7,
            connected: last_seen_us > 0,
            results_per_min: 12.5,
            state: if last_seen_us > 0 { "ok" } else { "stale" }.into(),
            collector: if last_seen_us > 0 { "c1:7443" } else { "" }.into(),
            cert_not_after_us: if last_seen_us > 0 {
                last_seen_us + 30 * 86_400_000_000
            } else {
                0
            },
        }
    }

    #[test]
    fn json_fields_labels_and_never_seen() {
        let mut out = Vec::new();
        report(&[agent("us1", 1_700_000_000_000_000), agent("us2", 0)], 0)
            .render(Format::Json, &mut out)
            .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let rows = v.as_array().unwrap();
        assert_eq!(rows.len(), 2);
        let mut keys: Vec<&str> = rows[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut want = FIELDS.to_vec();
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(rows[0]["labels"], json!({"provider": "lab"}));
        assert_eq!(rows[0]["last_seen"], json!("2023-11-14T22:13:20Z"));
        assert_eq!(rows[0]["connected"], json!(true));
        assert_eq!(rows[0]["stored_up_to_seq"], json!(1200));
        assert_eq!(rows[0]["results_per_min"], json!(12.5));
        assert_eq!(rows[0]["cert_expires"], json!("2023-12-14T22:13:20Z"));
        assert!(rows[1]["cert_expires"].is_null());
        assert!(rows[1]["last_seen"].is_null());
        assert_eq!(rows[1]["state"], json!("stale"));
    }

    #[test]
    fn table_lists_each_agent() {
        let mut out = Vec::new();
        let now = 1_700_000_030_000_000;
        report(&[agent("us1", 1_700_000_000_000_000)], now)
            .render(Format::Table, &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let line = text.lines().nth(1).unwrap();
        for want in [
            "us1",
            "us-east",
            "yes",
            "provider=lab",
            "30s ago",
            "12.5",
            "1200",
            "2023-12-14 (29d)",
        ] {
            assert!(line.contains(want), "{want} missing in {line}");
        }
    }

    #[test]
    fn certificate_expiry_says_days_left_or_expired() {
        let day = 86_400_000_000;
        let at = 1_700_000_000_000_000;
        assert_eq!(cert_left(at, at - 3 * day), "2023-11-14 (3d)");
        assert_eq!(cert_left(at, at + 1), "2023-11-14 (expired)");
        assert_eq!(cert_left(0, at), "-");
    }
}
