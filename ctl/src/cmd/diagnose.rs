//! `mxscopectl diagnose TARGET`: the first failing layer (DNS → network → TLS → protocol → policy),
//! where (everywhere, some regions, one agent's network) and the evidence; text, JSON or CSV.

use std::io::Write;

use clap::Args;
use mxscope_proto::pb;
use serde_json::json;

use crate::args;
use crate::client::Client;
use crate::output::{Cell, Column, Format, Report};

#[derive(Debug, Args)]
pub(crate) struct DiagnoseArgs {
    /// The target (domain or host).
    #[arg(value_parser = args::target_name)]
    pub target: String,
}

pub(crate) async fn run(
    client: &mut Client,
    a: DiagnoseArgs,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let req = pb::DiagnoseRequest {
        target: a.target,
        since_ms: 0,
    };
    let resp = client.call(|c| c.diagnose(req)).await?;
    match format {
        Format::Table => out.write_all(text(&resp).as_bytes())?,
        Format::Json => summary(&resp).render_one(Format::Json, out)?,
        Format::Csv => findings(&resp.findings).render(Format::Csv, out)?,
    }
    Ok(())
}

/// Where a finding applies, in words.
fn place(f: &pb::Finding) -> String {
    match f.scope.as_str() {
        "everywhere" => "in every region".to_string(),
        "agent" => format!("from the agent's own network in {}", f.regions.join(", ")),
        "none" => String::new(),
        _ => format!("only in {}", f.regions.join(", ")),
    }
}

/// Human text: the explanation paragraph, a headline naming the first finding's layer and where,
/// its evidence, then the rest (consequences indented under the finding that causes them).
pub(crate) fn text(d: &pb::DiagnoseResponse) -> String {
    let mut s = String::new();
    if !d.explanation.is_empty() {
        s.push_str(&wrap(&d.explanation, 100));
        s.push('\n');
    }
    let Some(first) = d.findings.first() else {
        s.push_str(&format!("{}: no findings\n", d.target));
        return s;
    };
    if first.layer == "none" {
        s.push_str(&format!("{}: {}\n", d.target, first.summary));
        return s;
    }
    let what = if first.severity == "fail" {
        "fails"
    } else {
        "warns"
    };
    s.push_str(&format!(
        "{}: {} layer {what} for {} {}\n",
        d.target,
        first.layer,
        first.check,
        place(first)
    ));
    s.push_str(&format!("  {}\n", first.summary));
    for e in &first.evidence {
        s.push_str(&format!("    {e}\n"));
    }
    if d.findings.len() > 1 {
        s.push_str("also:\n");
        for (i, f) in d.findings.iter().enumerate().skip(1) {
            let (indent, because) = match f.caused_by {
                Some(0) => ("  ", " (caused by the first finding)".to_string()),
                Some(root) => ("    ", format!(" (caused by finding {})", root + 1)),
                None => ("  ", String::new()),
            };
            s.push_str(&format!(
                "{indent}{}. [{}] {}: {}{because}\n",
                i + 1,
                f.severity,
                f.layer,
                f.summary
            ));
            for e in &f.evidence {
                s.push_str(&format!("{indent}    {e}\n"));
            }
        }
    }
    s
}

fn finding_json(f: &pb::Finding) -> serde_json::Value {
    json!({
        "layer": f.layer,
        "severity": f.severity,
        "scope": f.scope,
        "regions": f.regions,
        "check": f.check,
        "summary": f.summary,
        "evidence": f.evidence,
        "kind": f.kind,
        "caused_by": f.caused_by,
    })
}

/// `text` broken into lines of at most `width` characters at spaces.
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The JSON object: the first finding lifted to the top, and every finding.
pub(crate) fn summary(d: &pb::DiagnoseResponse) -> Report {
    let mut r = Report::new(vec![
        Column::text("target", "TARGET"),
        Column::text("layer", "LAYER"),
        Column::text("scope", "SCOPE"),
        Column::text("regions", "REGIONS"),
        Column::text("check", "CHECK"),
        Column::text("summary", "SUMMARY"),
        Column::text("evidence", "EVIDENCE"),
        Column::hidden("explanation"),
        Column::hidden("findings"),
    ]);
    r.push(vec![
        Cell::new(d.target.as_str()),
        Cell::new(d.layer.as_str()),
        Cell::new(d.scope.as_str()),
        Cell::new(d.regions.clone()),
        Cell::new(d.check.as_str()),
        Cell::new(d.summary.as_str()),
        Cell::new(d.evidence.clone()),
        Cell::new(d.explanation.as_str()),
        Cell::new(d.findings.iter().map(finding_json).collect::<Vec<_>>()),
    ]);
    r
}

/// One row per finding (CSV).
pub(crate) fn findings(fs: &[pb::Finding]) -> Report {
    let mut r = Report::new(vec![
        Column::text("severity", "SEVERITY"),
        Column::text("layer", "LAYER"),
        Column::text("scope", "SCOPE"),
        Column::text("regions", "REGIONS"),
        Column::text("check", "CHECK"),
        Column::text("summary", "SUMMARY"),
        Column::text("evidence", "EVIDENCE"),
        Column::text("kind", "KIND"),
        Column::text("caused_by", "CAUSED BY"),
    ]);
    for f in fs {
        r.push(vec![
            Cell::new(f.severity.as_str()),
            Cell::new(f.layer.as_str()),
            Cell::new(f.scope.as_str()),
            Cell::new(f.regions.clone()),
            Cell::new(f.check.as_str()),
            Cell::new(f.summary.as_str()),
            Cell::new(f.evidence.clone()),
            Cell::new(f.kind.as_str()),
            Cell::opt(f.caused_by),
        ]);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn response() -> pb::DiagnoseResponse {
        let network = pb::Finding {
            layer: "network".into(),
            scope: "regions".into(),
            regions: vec!["ap-south".into()],
            check: "smtp".into(),
            summary: "smtp: network timeout, only from ap-south (fine from eu-west, us-east)"
                .into(),
            evidence: vec!["ap-south smtp mx.lab.test[198.18.0.2]:25: timeout in connect".into()],
            severity: "fail".into(),
            kind: "mail_flow".into(),
            caused_by: None,
        };
        let cert = pb::Finding {
            layer: "tls".into(),
            scope: "everywhere".into(),
            regions: vec!["eu-west".into(), "us-east".into()],
            check: "imaps".into(),
            summary: "imaps: tls cert_expiring, seen from every region".into(),
            evidence: vec![
                "eu-west imaps ...: cert_expiring [certificate not after 2026-10-01]".into(),
            ],
            severity: "warn".into(),
            kind: "endpoint".into(),
            caused_by: None,
        };
        pb::DiagnoseResponse {
            target: "lab.test".into(),
            layer: network.layer.clone(),
            scope: network.scope.clone(),
            regions: network.regions.clone(),
            evidence: network.evidence.clone(),
            summary: network.summary.clone(),
            check: network.check.clone(),
            findings: vec![network, cert],
            explanation: String::new(),
        }
    }

    #[test]
    fn text_names_layer_place_and_evidence_first() {
        let t = text(&response());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "lab.test: network layer fails for smtp only in ap-south"
        );
        assert!(lines[2].contains("timeout in connect"), "{t}");
        assert_eq!(lines[3], "also:");
        assert!(lines[4].starts_with("  2. [warn] tls: imaps"), "{t}");
        assert!(t.contains("2026-10-01"));
        let healthy = pb::DiagnoseResponse {
            target: "ok.test".into(),
            findings: vec![pb::Finding {
                layer: "none".into(),
                scope: "none".into(),
                summary: "every check passes in every region".into(),
                severity: "ok".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            text(&healthy),
            "ok.test: every check passes in every region\n"
        );
    }

    #[test]
    fn text_starts_with_the_explanation_and_nests_consequences() {
        let mut d = response();
        d.explanation = format!(
            "Mail to lab.test flows from eu-west. {}",
            "word ".repeat(40)
        );
        d.findings[1].caused_by = Some(0);
        let t = text(&d);
        assert!(t.starts_with("Mail to lab.test flows from eu-west."), "{t}");
        assert!(t.lines().all(|l| l.chars().count() <= 100), "{t}");
        assert!(
            t.contains("  2. [warn] tls: imaps: tls cert_expiring, seen from every region (caused by the first finding)"),
            "{t}"
        );
        let mut out = Vec::new();
        summary(&d).render_one(Format::Json, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["explanation"]
            .as_str()
            .unwrap()
            .starts_with("Mail to lab.test"));
        assert_eq!(v["findings"][1]["caused_by"], json!(0));
        assert_eq!(v["findings"][0]["caused_by"], json!(null));
        assert_eq!(v["findings"][0]["kind"], json!("mail_flow"));
    }

    #[test]
    fn json_has_layer_scope_regions_evidence_and_findings() {
        let mut out = Vec::new();
        summary(&response())
            .render_one(Format::Json, &mut out)
            .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["layer"], json!("network"));
        assert_eq!(v["scope"], json!("regions"));
        assert_eq!(v["regions"], json!(["ap-south"]));
        assert_eq!(v["evidence"].as_array().map(Vec::len), Some(1));
        let f = v["findings"].as_array().unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[1]["severity"], json!("warn"));
        assert_eq!(f[1]["layer"], json!("tls"));
    }

    #[test]
    fn csv_one_line_per_finding() {
        let mut out = Vec::new();
        findings(&response().findings)
            .render(Format::Csv, &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("fail,network,regions,"));
    }
}
