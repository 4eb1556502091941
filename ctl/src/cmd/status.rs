//! `mxscopectl status`: one row per (target, endpoint, check, region) with state, reachability,
//! latency percentiles and the last error over a window.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use mxscope_proto::pb;

use crate::args;
use crate::cli::print;
use crate::client::Client;
use crate::cmd::MAX_PAGES;
use crate::output::{self, Cell, Column, Format, Report};

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Only this target.
    #[arg(long, value_parser = args::target_name)]
    pub target: Option<String>,
    /// Only this check (mx, smtp, imaps, ...).
    #[arg(long, value_parser = args::check)]
    pub check: Option<String>,
    /// Only this region.
    #[arg(long, value_parser = args::region)]
    pub region: Option<String>,
    /// Window for reachability and latency (default: the collector's --window).
    #[arg(long, value_parser = args::duration)]
    pub window: Option<Duration>,
}

impl StatusArgs {
    fn request(&self) -> pb::StatusRequest {
        pb::StatusRequest {
            window_ms: self.window.map_or(0, mxscope_proto::time::millis),
            target: self.target.clone().unwrap_or_default(),
            check: self.check.clone().unwrap_or_default(),
            region: self.region.clone().unwrap_or_default(),
            offset: 0,
        }
    }
}

pub(crate) async fn run(
    client: &mut Client,
    a: StatusArgs,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut req = a.request();
    let mut resp = client.call(|c| c.status(req.clone())).await?;
    // Further pages while the collector cut the answer (bounded: an answer is at most 3 MiB).
    let mut pages = 1;
    while resp.next_offset != 0 && pages < MAX_PAGES {
        req.offset = resp.next_offset;
        let next = client.call(|c| c.status(req.clone())).await?;
        resp.rows.extend(next.rows);
        (resp.truncated, resp.next_offset) = (next.truncated, next.next_offset);
        pages += 1;
    }
    let report = report(&resp.rows, mxscope_proto::time::now_us());
    print(
        &report,
        format,
        out,
        "no status rows yet (no results in the window, or no matching target)",
    )?;
    if resp.next_offset != 0 {
        eprintln!(
            "more rows matched than {MAX_PAGES} answers hold; the first {} are shown \
             (narrow with --target, --check or --region)",
            resp.rows.len()
        );
    }
    Ok(())
}

/// The documented JSON fields of `status`, in order (the README lists the same).
#[cfg(test)]
pub(crate) const FIELDS: &[&str] = &[
    "target",
    "endpoint",
    "check",
    "region",
    "state",
    "reachability",
    "p50_ms",
    "p95_ms",
    "last_error",
    "last_seen",
    "count",
    "ok_count",
    "last_outcome",
    "last_message",
];

fn columns() -> Vec<Column> {
    vec![
        Column::text("target", "TARGET"),
        Column::text("endpoint", "ENDPOINT"),
        Column::text("check", "CHECK"),
        Column::text("region", "REGION"),
        Column::text("state", "STATE"),
        Column::number("reachability", "REACH"),
        Column::number("p50_ms", "P50 MS"),
        Column::number("p95_ms", "P95 MS"),
        Column::text("last_error", "ERROR"),
        Column::text("last_seen", "LAST SEEN"),
        Column::number("count", "N"),
        Column::hidden("ok_count"),
        Column::hidden("last_outcome"),
        Column::text("last_message", "MESSAGE").cut(50),
    ]
}

/// Builds the report; `now_us` only feeds the "seen 5s ago" text of tables.
pub(crate) fn report(rows: &[pb::StatusRow], now_us: i64) -> Report {
    let mut r = Report::new(columns());
    for row in rows {
        let reach = row.reachability.clamp(0.0, 1.0);
        r.push(vec![
            Cell::new(row.target.as_str()),
            Cell::new(row.endpoint.as_str()),
            Cell::new(row.check.as_str()),
            Cell::new(row.region.as_str()),
            Cell::new(row.state.as_str()),
            Cell::float(reach).shown_as(format!("{:.1}%", reach * 100.0)),
            Cell::opt(row.p50_ms.and_then(finite)).shown_as(millis(row.p50_ms)),
            Cell::opt(row.p95_ms.and_then(finite)).shown_as(millis(row.p95_ms)),
            Cell::opt(row.last_error.clone().filter(|e| !e.is_empty())),
            Cell::opt(output::timestamp_seconds(row.last_seen_us))
                .shown_as(output::age(row.last_seen_us, now_us)),
            Cell::new(row.count),
            Cell::new(row.ok_count),
            Cell::opt(Some(row.last_outcome.clone()).filter(|o| !o.is_empty())),
            Cell::new(row.last_message.as_str()),
        ]);
    }
    r
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

fn millis(v: Option<f64>) -> String {
    match v.and_then(finite) {
        Some(ms) if ms < 10.0 => format!("{ms:.2}"),
        Some(ms) => format!("{ms:.1}"),
        None => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn row(state: &str, err: Option<&str>, p50: Option<f64>) -> pb::StatusRow {
        pb::StatusRow {
            target: "example.test".into(),
            endpoint: "mx1.example.test[127.0.0.1]:2525".into(),
            check: "smtp".into(),
            region: "eu-west".into(),
            state: state.into(),
            reachability: if err.is_some() { 0.5 } else { 1.0 },
            p50_ms: p50,
            p95_ms: p50.map(|v| v * 2.0),
            last_error: err.map(str::to_string),
            last_seen_us: 1_700_000_000_000_000,
            count: 4,
            ok_count: if err.is_some() { 2 } else { 4 },
            last_outcome: if err.is_some() { "fail" } else { "ok" }.into(),
            last_message: err.map(|_| "connection refused").unwrap_or_default().into(),
        }
    }

    fn json_of(rows: &[pb::StatusRow]) -> Value {
        let mut out = Vec::new();
        report(rows, 1_700_000_005_000_000)
            .render(Format::Json, &mut out)
            .unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn json_has_exactly_the_documented_fields() {
        let v = json_of(&[
            row("ok", None, Some(3.25)),
            row("failing", Some("refused"), None),
        ]);
        let rows = v.as_array().unwrap();
        assert_eq!(rows.len(), 2);
        for r in rows {
            let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
            let mut want = FIELDS.to_vec();
            want.sort_unstable();
            let mut got = keys.clone();
            got.sort_unstable();
            assert_eq!(got, want);
        }
        assert_eq!(rows[0]["state"], json!("ok"));
        assert_eq!(rows[0]["reachability"], json!(1.0));
        assert_eq!(rows[0]["p50_ms"], json!(3.25));
        assert_eq!(rows[0]["p95_ms"], json!(6.5));
        assert!(rows[0]["last_error"].is_null());
        assert_eq!(rows[0]["last_seen"], json!("2023-11-14T22:13:20Z"));
        assert_eq!(rows[0]["count"], json!(4));
        assert_eq!(rows[1]["state"], json!("failing"));
        assert_eq!(rows[1]["last_error"], json!("refused"));
        assert!(rows[1]["p50_ms"].is_null() && rows[1]["p95_ms"].is_null());
        assert_eq!(rows[1]["last_outcome"], json!("fail"));
        assert_eq!(rows[1]["last_message"], json!("connection refused"));
    }

    #[test]
    fn empty_error_string_is_null() {
        let v = json_of(&[row("ok", Some(""), None)]);
        assert!(v[0]["last_error"].is_null());
    }

    #[test]
    fn table_shows_percent_and_age() {
        let mut out = Vec::new();
        report(
            &[row("failing", Some("refused"), Some(12.34))],
            1_700_000_005_000_000,
        )
        .render(Format::Table, &mut out)
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let line = text.lines().nth(1).unwrap();
        for want in [
            "example.test",
            "failing",
            "50.0%",
            "12.3",
            "24.7",
            "refused",
            "5s ago",
            "connection refused",
        ] {
            assert!(line.contains(want), "{want} missing in {line}");
        }
    }

    #[test]
    fn request_carries_filters() {
        let a = StatusArgs {
            target: Some("example.test".into()),
            check: Some("imaps".into()),
            region: None,
            window: Some(Duration::from_secs(300)),
        };
        let req = a.request();
        assert_eq!(req.window_ms, 300_000);
        assert_eq!(req.target, "example.test");
        assert_eq!(req.check, "imaps");
        assert_eq!(req.region, "");
    }
}
