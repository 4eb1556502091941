//! `mxscopectl latency TARGET`: p50/p95/p99 and count per region and phase over a window, from the
//! collector's mergeable sketches (within 1% of the true values).

use std::io::Write;
use std::time::Duration;

use clap::{Args, ValueEnum};
use mxscope_proto::pb;
use mxscope_proto::time::millis;

use crate::args;
use crate::cli::print;
use crate::client::Client;
use crate::output::{Cell, Column, Format, Report};

/// How rows are grouped (one row per region and phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum By {
    Region,
}

#[derive(Debug, Args)]
pub(crate) struct LatencyArgs {
    /// The target (domain or host).
    #[arg(value_parser = args::target_name)]
    pub target: String,
    /// Only this check (mx, smtp, imaps, ...).
    #[arg(long, value_parser = args::check)]
    pub check: Option<String>,
    /// Only this phase (resolve, connect, tls, ehlo, total, ...).
    #[arg(long)]
    pub phase: Option<String>,
    /// Window (default: 1h).
    #[arg(long, value_parser = args::duration)]
    pub since: Option<Duration>,
    /// Grouping of the rows.
    #[arg(long, value_enum, default_value_t = By::Region)]
    pub by: By,
}

impl LatencyArgs {
    fn request(&self) -> pb::LatencyRequest {
        pb::LatencyRequest {
            target: self.target.clone(),
            check: self.check.clone().unwrap_or_default(),
            phase: self.phase.clone().unwrap_or_default(),
            since_ms: self.since.map_or(0, millis),
        }
    }
}

pub(crate) async fn run(
    client: &mut Client,
    a: LatencyArgs,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let req = a.request();
    let resp = client.call(|c| c.latency(req)).await?;
    print(
        &report(&resp.rows),
        format,
        out,
        "no latency in the window (no results, or no matching check or phase)",
    )?;
    if resp.truncated {
        eprintln!(
            "more rows matched than fit in one answer; the first {} are shown \
             (narrow with --check or --phase)",
            resp.rows.len()
        );
    }
    Ok(())
}

/// The JSON fields of `latency`, in order.
#[cfg(test)]
pub(crate) const FIELDS: &[&str] = &[
    "check", "phase", "region", "p50_ms", "p95_ms", "p99_ms", "count",
];

pub(crate) fn report(rows: &[pb::LatencyRow]) -> Report {
    let mut r = Report::new(vec![
        Column::text("check", "CHECK"),
        Column::text("phase", "PHASE"),
        Column::text("region", "REGION"),
        Column::number("p50_ms", "P50 MS"),
        Column::number("p95_ms", "P95 MS"),
        Column::number("p99_ms", "P99 MS"),
        Column::number("count", "N"),
    ]);
    for row in rows {
        let ms = |v: f64| Cell::float(v).shown_as(format!("{v:.1}"));
        r.push(vec![
            Cell::new(row.check.as_str()),
            Cell::new(row.phase.as_str()),
            Cell::new(row.region.as_str()),
            ms(row.p50_ms),
            ms(row.p95_ms),
            ms(row.p99_ms),
            Cell::new(row.count),
        ]);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::{json, Value};

    fn rows() -> Vec<pb::LatencyRow> {
        ["eu-west", "ap-south"]
            .iter()
            .zip([10.04, 150.5])
            .map(|(region, p50)| pb::LatencyRow {
                region: (*region).into(),
                check: "smtp".into(),
                phase: "connect".into(),
                p50_ms: p50,
                p95_ms: p50 * 1.2,
                p99_ms: p50 * 1.5,
                count: 60,
            })
            .collect()
    }

    #[test]
    fn json_and_table() {
        let mut out = Vec::new();
        report(&rows()).render(Format::Json, &mut out).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let rows_v = v.as_array().unwrap();
        assert_eq!(rows_v.len(), 2);
        let keys: Vec<&str> = rows_v[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let (mut k, mut f) = (keys.clone(), FIELDS.to_vec());
        k.sort_unstable();
        f.sort_unstable();
        assert_eq!(k, f);
        assert_eq!(rows_v[1]["p50_ms"], json!(150.5));
        assert_eq!(rows_v[1]["count"], json!(60));
        let mut out = Vec::new();
        report(&rows()).render(Format::Table, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let line = text.lines().nth(1).unwrap();
        assert!(
            line.contains("connect") && line.contains("eu-west") && line.contains("10.0"),
            "{line}"
        );
    }

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: LatencyArgs,
    }

    #[test]
    fn arguments() {
        let t = T::try_parse_from([
            "t", "Lab.TEST", "--check", "smtp", "--phase", "connect", "--since", "30m", "--by",
            "region",
        ])
        .unwrap();
        let r = t.a.request();
        assert_eq!(r.target, "lab.test");
        assert_eq!(
            (r.check.as_str(), r.phase.as_str(), r.since_ms),
            ("smtp", "connect", 1_800_000)
        );
        assert!(T::try_parse_from(["t", "lab.test", "--by", "agent"]).is_err());
    }
}
