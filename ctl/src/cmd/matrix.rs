//! `mxscopectl matrix`: targets × regions for one check or all, with a scope per (target, check)
//! (`up`, `partial` naming the failing regions, `down`, `stale`) and the metric in each cell.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use mxscope_proto::time::millis;
use mxscope_proto::{pb, Metric, RegionState};

use crate::args;
use crate::cli::print;
use crate::client::Client;
use crate::cmd::MAX_PAGES;
use crate::output::{Cell, Column, Format, Report};

#[derive(Debug, Args)]
pub(crate) struct MatrixArgs {
    /// Only this check (mx, smtp, imaps, ...).
    #[arg(long, value_parser = args::check)]
    pub check: Option<String>,
    /// What the cells show: reachability (share of ok or warn results) or a latency percentile
    /// (p50, p95, p99 in ms); latency uses connect for port checks, resolve for DNS checks, echo
    /// for icmp, total otherwise.
    #[arg(long, value_parser = args::metric(), default_value = "reachability")]
    pub metric: Metric,
    /// Window (default: 1h).
    #[arg(long, value_parser = args::duration)]
    pub since: Option<Duration>,
}

impl MatrixArgs {
    fn request(&self) -> pb::MatrixRequest {
        pb::MatrixRequest {
            check: self.check.clone().unwrap_or_default(),
            metric: self.metric.name().to_string(),
            since_ms: self.since.map_or(0, millis),
            offset: 0,
        }
    }
}

pub(crate) async fn run(
    client: &mut Client,
    a: MatrixArgs,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut req = a.request();
    let mut resp = client.call(|c| c.matrix(req.clone())).await?;
    // Further pages while the collector cut the answer (bounded: an answer is at most 3 MiB).
    let mut pages = 1;
    while resp.next_offset != 0 && pages < MAX_PAGES {
        req.offset = resp.next_offset;
        let next = client.call(|c| c.matrix(req.clone())).await?;
        resp.rows.extend(next.rows);
        (resp.truncated, resp.next_offset) = (next.truncated, next.next_offset);
        pages += 1;
    }
    print(
        &report(&resp),
        format,
        out,
        "no rows yet (no series stored, or none for this check)",
    )?;
    if resp.next_offset != 0 {
        eprintln!(
            "more rows matched than {MAX_PAGES} answers hold; the first {} are shown (narrow with --check)",
            resp.rows.len()
        );
    }
    Ok(())
}

/// Fixed fields of a row; then one field per region holding the metric (null without data).
#[cfg(test)]
pub(crate) const FIELDS: &[&str] = &[
    "target",
    "check",
    "scope",
    "failing_regions",
    "phase",
    "notes",
];

/// A region name as a column key. Column keys are `&'static str`; the handful of region names of
/// one answer live until the command exits, so leaking them is the simple, bounded choice.
fn key_of(region: &str) -> &'static str {
    Box::leak(region.to_string().into_boxed_str())
}

/// Builds the report: rows in the collector's order, region columns in its `regions` order.
pub(crate) fn report(m: &pb::MatrixResponse) -> Report {
    let mut columns = vec![
        Column::text("target", "TARGET"),
        Column::text("check", "CHECK"),
        Column::text("scope", "SCOPE"),
        Column::text("failing_regions", "FAILING"),
        Column::hidden("phase"),
        Column::hidden("basis"),
        Column::hidden("states"),
    ];
    for r in &m.regions {
        columns.push(Column::number(key_of(r), key_of(&r.to_uppercase())));
    }
    columns.push(Column::text("notes", "NOTES").cut(60));
    let latency = m.metric.parse::<Metric>() != Ok(Metric::Reachability);
    let mut rep = Report::new(columns);
    for row in &m.rows {
        let mut cells = vec![
            Cell::new(row.target.as_str()),
            Cell::new(row.check.as_str()),
            Cell::new(row.scope.as_str()),
            Cell::new(row.failing_regions.clone()),
            Cell::opt(Some(row.phase.clone()).filter(|p| !p.is_empty())),
            Cell::new(row.basis.as_str()),
            Cell::new(
                row.cells
                    .iter()
                    .map(|c| (c.region.clone(), serde_json::Value::from(c.state.as_str())))
                    .collect::<serde_json::Map<String, serde_json::Value>>(),
            ),
        ];
        for region in &m.regions {
            let cell = row.cells.iter().find(|c| &c.region == region);
            let value = cell.and_then(|c| c.value).filter(|v| v.is_finite());
            let state = cell.map_or("", |c| c.state.as_str());
            let text = match value {
                Some(v) if latency => format!("{v:.1}"),
                Some(v) => format!("{:.1}%", v * 100.0),
                None => "-".to_string(),
            };
            let mark = match state.parse::<RegionState>() {
                Ok(RegionState::Failing) => " !",
                Ok(RegionState::AgentFault) => " (agent)",
                Ok(RegionState::Stale) => " (stale)",
                Ok(RegionState::Ok) | Err(_) => "",
            };
            let c = match value {
                Some(v) => Cell::float(v),
                None => Cell::null(),
            };
            cells.push(c.shown_as(format!("{text}{mark}")));
        }
        cells.push(Cell::new(row.notes.clone()).shown_as(row.notes.join("; ")));
        rep.push(cells);
    }
    rep
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn sample(metric: &str) -> pb::MatrixResponse {
        let cell = |region: &str, value: Option<f64>, state: &str| pb::MatrixCell {
            region: region.into(),
            value,
            state: state.into(),
        };
        pb::MatrixResponse {
            regions: vec!["ap-south".into(), "eu-west".into(), "us-east".into()],
            metric: metric.into(),
            truncated: false,
            next_offset: 0,
            rows: vec![
                pb::MatrixRow {
                    target: "lab.test".into(),
                    check: "smtp".into(),
                    scope: "partial".into(),
                    failing_regions: vec!["ap-south".into()],
                    cells: vec![
                        cell("ap-south", Some(0.0), "failing"),
                        cell("eu-west", Some(1.0), "ok"),
                        cell("us-east", Some(0.995), "ok"),
                    ],
                    notes: vec![],
                    phase: if metric == "reachability" {
                        ""
                    } else {
                        "connect"
                    }
                    .into(),
                    basis: "mail".into(),
                },
                pb::MatrixRow {
                    target: "lab.test".into(),
                    check: "submission".into(),
                    scope: "up".into(),
                    failing_regions: vec![],
                    cells: vec![cell("eu-west", Some(1.0), "ok")],
                    notes: vec!["smtp: addresses or regions present different certificates".into()],
                    phase: String::new(),
                    basis: "endpoints".into(),
                },
            ],
        }
    }

    fn render(m: &pb::MatrixResponse, f: Format) -> String {
        let mut out = Vec::new();
        report(m).render(f, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn table_has_a_column_per_region_and_marks_failures() {
        let text = render(&sample("reachability"), Format::Table);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        for h in [
            "TARGET", "SCOPE", "FAILING", "AP-SOUTH", "EU-WEST", "US-EAST", "NOTES",
        ] {
            assert!(lines[0].contains(h), "{h} missing: {}", lines[0]);
        }
        assert!(lines[1].contains("partial"), "{}", lines[1]);
        assert!(lines[1].contains("0.0% !"), "{}", lines[1]);
        assert!(lines[1].contains("99.5%"), "{}", lines[1]);
        assert!(lines[2].contains("different certificates"), "{}", lines[2]);
        // us-east has no cell for submission.
        assert!(lines[2].contains(" - "), "{}", lines[2]);
    }

    #[test]
    fn json_has_fixed_fields_and_one_value_per_region() {
        let v: Value = serde_json::from_str(&render(&sample("p95"), Format::Json)).unwrap();
        let rows = v.as_array().unwrap();
        assert_eq!(rows.len(), 2);
        let keys: Vec<&str> = rows[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for f in FIELDS.iter().chain(&["ap-south", "eu-west", "us-east"]) {
            assert!(keys.contains(f), "{f} missing in {keys:?}");
        }
        assert_eq!(rows[0]["failing_regions"], json!(["ap-south"]));
        assert_eq!(rows[0]["phase"], json!("connect"));
        assert_eq!(rows[0]["us-east"], json!(0.995));
        assert!(rows[1]["us-east"].is_null());
        let text = render(&sample("p95"), Format::Table);
        assert!(
            text.contains("1.0"),
            "latency shown in ms, not percent: {text}"
        );
        assert!(!text.contains('%'), "{text}");
    }

    #[test]
    fn csv_header_lists_regions() {
        let text = render(&sample("reachability"), Format::Csv);
        assert_eq!(
            text.lines().next(),
            Some("target,check,scope,failing_regions,phase,basis,states,ap-south,eu-west,us-east,notes")
        );
    }

    #[test]
    fn request_carries_arguments() {
        let a = MatrixArgs {
            check: Some("smtp".into()),
            metric: Metric::P99,
            since: Some(Duration::from_secs(86_400)),
        };
        let r = a.request();
        assert_eq!(
            (r.check.as_str(), r.metric.as_str(), r.since_ms),
            ("smtp", "p99", 86_400_000)
        );
    }
}
