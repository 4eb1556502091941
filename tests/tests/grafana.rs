//! The Grafana dashboard `deploy/grafana/mxscope.json` against a real collector: every PromQL
//! expression in it (panels, panels nested in rows, template variable queries) parses, and names
//! only metrics and labels that the collector's `/metrics` really exports.
//!
//! The collector is the real binary; a real agent (eu-west) probes a closed local port and a raw
//! gRPC session (us-east) sends one MX-expanded smtp result, so that every labelled family —
//! per (target, check, region), per (domain, region), per agent, per refusal reason — has samples
//! whose label names the scrape shows.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use mxscope_proto::pb;
use mxscope_tests::mxscope::{Agent, AgentOptions, Collector, TargetConfig};
use mxscope_tests::net::free_port;
use mxscope_tests::tls::raw_session;
use mxscope_tests::wait::wait_for;
use mxscope_tests::Lab;
use promql_parser::label::MatchOp;
use promql_parser::parser::{self, Expr, LabelModifier, VectorMatchCardinality, VectorSelector};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
/// Labels the Prometheus that scrapes a collector adds to every series.
const SCRAPE_LABELS: [&str; 2] = ["job", "instance"];
/// What a dashboard variable becomes before parsing; a matcher value starting with it came from
/// a variable, so its value is not checked against the scrape.
const VAR_VALUE: &str = "mxscope-var-";
/// The datasource every panel, target and variable query must use.
const DATASOURCE: &str = "${datasource}";

fn dashboard_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/mxscope.json")
}

fn load_dashboard() -> Value {
    let path = dashboard_path();
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Metric names and label names (and values) of the samples of one scrape.
#[derive(Debug, Default)]
struct Exported {
    /// Sample name (counters with their `_total`) → label names on its samples.
    labels: BTreeMap<String, BTreeSet<String>>,
    /// (sample name, label) → values seen.
    values: BTreeMap<(String, String), BTreeSet<String>>,
}

impl Exported {
    /// Reads the sample lines of a Prometheus/OpenMetrics text exposition.
    fn parse(text: &str) -> Result<Exported, String> {
        let mut out = Exported::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, pairs) = sample(line).map_err(|e| format!("{e} in line {line:?}"))?;
            let labels = out.labels.entry(name.clone()).or_default();
            for (k, v) in pairs {
                labels.insert(k.clone());
                out.values.entry((name.clone(), k)).or_default().insert(v);
            }
        }
        Ok(out)
    }
}

/// The name and label pairs of one sample line `name{a="x",b="y"} value`.
fn sample(line: &str) -> Result<(String, Vec<(String, String)>), String> {
    let end = line.find(['{', ' ']).ok_or("no value")?;
    let name = line[..end].to_string();
    let mut pairs = Vec::new();
    if line[end..].starts_with('{') {
        let mut chars = line[end + 1..].chars();
        loop {
            let mut key = String::new();
            for c in chars.by_ref() {
                match c {
                    '=' => break,
                    '}' if key.is_empty() => return Ok((name, pairs)),
                    c => key.push(c),
                }
            }
            if chars.next() != Some('"') {
                return Err(format!("label {key} without a quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")? {
                    '\\' => value.push(chars.next().ok_or("dangling escape")?),
                    '"' => break,
                    c => value.push(c),
                }
            }
            pairs.push((key.trim().to_string(), value));
            match chars.next() {
                Some(',') => continue,
                Some('}') => break,
                other => return Err(format!("unexpected {other:?} after a label")),
            }
        }
    }
    Ok((name, pairs))
}

/// One problem of the dashboard: where, which expression, what is wrong.
#[derive(Debug)]
struct Finding {
    panel: String,
    expr: String,
    problem: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "panel {:?}: `{}`: {}",
            self.panel, self.expr, self.problem
        )
    }
}

/// What checking a dashboard found and saw.
#[derive(Debug, Default)]
struct Report {
    findings: Vec<Finding>,
    /// Panels walked (rows and the panels nested in them included).
    panels: usize,
    /// PromQL expressions parsed and checked (targets and variable queries).
    exprs: usize,
    /// Metric names the expressions select.
    metrics: BTreeSet<String>,
    /// Titles of panels that group or filter by `region`.
    region_panels: BTreeSet<String>,
}

/// What one expression selects and which labels it names.
#[derive(Debug, Default)]
struct Uses {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
    problems: Vec<String>,
}

/// Replaces Grafana's variables (`$x`, `${x}`, `${x:format}`) so the text parses as PromQL: the
/// interval variables by durations, the dashboard's own by `mxscope-var-NAME`.
fn substitute(expr: &str, vars: &BTreeSet<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(inner) = after.strip_prefix('{') {
            let close = inner.find('}').ok_or("unclosed ${")?;
            let name = inner[..close].split(':').next().unwrap_or_default();
            (name, close + 2)
        } else {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..len], len)
        };
        let value = match name {
            "__rate_interval" | "__interval" => "1m".to_string(),
            "__range" => "6h".to_string(),
            "__interval_ms" => "60000".to_string(),
            "__range_s" => "21600".to_string(),
            "__range_ms" => "21600000".to_string(),
            n if vars.contains(n) => format!("{VAR_VALUE}{n}"),
            n => return Err(format!("unknown variable `${n}`")),
        };
        out.push_str(&value);
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A matrix or vector selector: the metric must be exported, its matchers must name its labels.
fn selector(vs: &VectorSelector, ex: &Exported, uses: &mut Uses) -> BTreeSet<String> {
    let name = vs.name.clone().or_else(|| {
        vs.matchers
            .matchers
            .iter()
            .find(|m| m.name == "__name__" && matches!(m.op, MatchOp::Equal))
            .map(|m| m.value.clone())
    });
    let Some(name) = name else {
        uses.problems
            .push(format!("selector `{vs}` has no metric name to check"));
        return BTreeSet::new();
    };
    uses.metrics.insert(name.clone());
    let Some(exported) = ex.labels.get(&name) else {
        uses.problems.push(format!(
            "unknown metric `{name}`: the collector does not export it"
        ));
        return BTreeSet::new();
    };
    let mut labels: BTreeSet<String> = exported.clone();
    labels.extend(SCRAPE_LABELS.map(String::from));
    let matchers = vs
        .matchers
        .matchers
        .iter()
        .chain(vs.matchers.or_matchers.iter().flatten());
    for m in matchers.filter(|m| m.name != "__name__") {
        uses.labels.insert(m.name.clone());
        if !labels.contains(&m.name) {
            uses.problems.push(format!(
                "unknown label `{}` on `{name}` (it has {exported:?})",
                m.name
            ));
        } else if matches!(m.op, MatchOp::Equal)
            && !m.value.starts_with(VAR_VALUE)
            && !SCRAPE_LABELS.contains(&m.name.as_str())
        {
            let seen = ex.values.get(&(name.clone(), m.name.clone()));
            if !seen.is_some_and(|s| s.contains(&m.value)) {
                uses.problems.push(format!(
                    "no `{name}` series has {}=\"{}\" (seen {seen:?})",
                    m.name, m.value
                ));
            }
        }
    }
    labels
}

/// The labels `label_names` must find on `have`, for the problem text of `what`.
fn require(label_names: &[String], have: &BTreeSet<String>, what: &str, uses: &mut Uses) {
    for l in label_names {
        uses.labels.insert(l.clone());
        if !have.contains(l) {
            uses.problems.push(format!(
                "unknown label `{l}` in {what}: the expression it applies to has {have:?}"
            ));
        }
    }
}

fn string_arg(e: &Expr) -> Option<&str> {
    match e {
        Expr::StringLiteral(s) => Some(&s.val),
        Expr::Paren(p) => string_arg(&p.expr),
        _ => None,
    }
}

/// Checks `e` and returns the labels its result can carry.
fn labels_of(e: &Expr, ex: &Exported, uses: &mut Uses) -> BTreeSet<String> {
    match e {
        Expr::VectorSelector(vs) => selector(vs, ex, uses),
        Expr::MatrixSelector(ms) => selector(&ms.vs, ex, uses),
        Expr::Paren(p) => labels_of(&p.expr, ex, uses),
        Expr::Unary(u) => labels_of(&u.expr, ex, uses),
        Expr::Subquery(s) => labels_of(&s.expr, ex, uses),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) => BTreeSet::new(),
        Expr::Aggregate(a) => {
            let inner = labels_of(&a.expr, ex, uses);
            if let Some(p) = &a.param {
                labels_of(p, ex, uses);
            }
            let op = a.op.to_string();
            let by = |labels: &[String]| labels.iter().cloned().collect::<BTreeSet<_>>();
            let mut out = match &a.modifier {
                Some(LabelModifier::Include(l)) => {
                    require(&l.labels, &inner, &format!("{op} by (…)"), uses);
                    by(&l.labels)
                }
                Some(LabelModifier::Exclude(l)) => {
                    require(&l.labels, &inner, &format!("{op} without (…)"), uses);
                    inner.difference(&by(&l.labels)).cloned().collect()
                }
                None => BTreeSet::new(),
            };
            match op.as_str() {
                "topk" | "bottomk" | "limitk" | "limit_ratio" => out = inner,
                "count_values" => {
                    out.extend(a.param.as_deref().and_then(string_arg).map(String::from))
                }
                _ => {}
            }
            out
        }
        Expr::Binary(b) => {
            let l = labels_of(&b.lhs, ex, uses);
            let r = labels_of(&b.rhs, ex, uses);
            let vectors = |e: &Expr| !matches!(e.value_type(), parser::value::ValueType::Scalar);
            if !(vectors(&b.lhs) && vectors(&b.rhs)) {
                return if vectors(&b.lhs) { l } else { r };
            }
            let mut out = match b.op.to_string().as_str() {
                "or" => l.union(&r).cloned().collect(),
                _ => l.clone(),
            };
            if let Some(m) = &b.modifier {
                if let Some(matching) = &m.matching {
                    let both: BTreeSet<String> = l.intersection(&r).cloned().collect();
                    let (labels, what) = match matching {
                        LabelModifier::Include(ls) => (&ls.labels, "on (…)"),
                        LabelModifier::Exclude(ls) => (&ls.labels, "ignoring (…)"),
                    };
                    require(labels, &both, &format!("{what} (on both sides)"), uses);
                    if !b.op.is_comparison_operator() || m.return_bool {
                        if let LabelModifier::Include(ls) = matching {
                            if !b.op.is_set_operator() {
                                out = ls.labels.iter().cloned().collect();
                            }
                        }
                    }
                }
                match &m.card {
                    VectorMatchCardinality::ManyToOne(ls) => {
                        require(&ls.labels, &r, "group_left (…)", uses);
                        out = l
                            .union(&ls.labels.iter().cloned().collect())
                            .cloned()
                            .collect();
                    }
                    VectorMatchCardinality::OneToMany(ls) => {
                        require(&ls.labels, &l, "group_right (…)", uses);
                        out = r
                            .union(&ls.labels.iter().cloned().collect())
                            .cloned()
                            .collect();
                    }
                    _ => {}
                }
            }
            out
        }
        Expr::Call(c) => {
            let args: Vec<&Expr> = c.args.args.iter().map(|a| a.as_ref()).collect();
            let inner: Vec<BTreeSet<String>> =
                args.iter().map(|a| labels_of(a, ex, uses)).collect();
            let strings: Vec<Option<&str>> = args.iter().map(|a| string_arg(a)).collect();
            let first = inner.first().cloned().unwrap_or_default();
            match c.func.name {
                "label_replace" => {
                    if let Some(src) = strings.get(3).copied().flatten() {
                        if !src.is_empty() {
                            require(&[src.to_string()], &first, "label_replace", uses);
                        }
                    }
                    let mut out = first;
                    out.extend(strings.get(1).copied().flatten().map(String::from));
                    out
                }
                "label_join" => {
                    let srcs: Vec<String> = strings
                        .iter()
                        .skip(3)
                        .flatten()
                        .map(|s| s.to_string())
                        .collect();
                    require(&srcs, &first, "label_join", uses);
                    let mut out = first;
                    out.extend(strings.get(1).copied().flatten().map(String::from));
                    out
                }
                "vector" | "time" | "scalar" | "absent" | "absent_over_time" => BTreeSet::new(),
                _ => inner.into_iter().flatten().collect(),
            }
        }
        Expr::Extension(_) => {
            uses.problems
                .push("extension expressions are not PromQL".to_string());
            BTreeSet::new()
        }
    }
}

/// Parses and checks one PromQL expression of panel `panel`.
fn check_expr(
    panel: &str,
    expr: &str,
    vars: &BTreeSet<String>,
    ex: &Exported,
    report: &mut Report,
) -> Uses {
    let mut uses = Uses::default();
    report.exprs += 1;
    match substitute(expr, vars) {
        Err(e) => uses.problems.push(e),
        Ok(text) => match parser::parse(&text) {
            Err(e) => uses
                .problems
                .push(format!("does not parse as PromQL ({text}): {e}")),
            Ok(ast) => {
                labels_of(&ast, ex, &mut uses);
            }
        },
    }
    for problem in uses.problems.drain(..) {
        report.findings.push(Finding {
            panel: panel.to_string(),
            expr: expr.to_string(),
            problem,
        });
    }
    report.metrics.extend(uses.metrics.iter().cloned());
    uses
}

/// The `uid` of a `datasource` field (an object, or the old plain string).
fn datasource_uid(v: &Value) -> Option<&str> {
    match v.get("datasource")? {
        Value::String(s) => Some(s),
        d => d.get("uid")?.as_str(),
    }
}

/// `label_values(SELECTOR, LABEL)` or `label_values(LABEL)`: the selector and the label.
fn label_values(query: &str) -> Option<(Option<&str>, &str)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    match inner.rsplit_once(',') {
        Some((sel, label)) => Some((Some(sel.trim()), label.trim())),
        None => Some((None, inner.trim())),
    }
}

fn panel_walk(p: &Value, vars: &BTreeSet<String>, ex: &Exported, report: &mut Report) {
    report.panels += 1;
    let title = p["title"].as_str().unwrap_or("(untitled)").to_string();
    let kind = p["type"].as_str().unwrap_or_default();
    let problem = |report: &mut Report, expr: &str, problem: String| {
        report.findings.push(Finding {
            panel: title.clone(),
            expr: expr.to_string(),
            problem,
        });
    };
    if datasource_uid(p) != Some(DATASOURCE) {
        problem(
            report,
            "",
            format!(
                "panel datasource is {:?}, not {DATASOURCE}",
                p.get("datasource")
            ),
        );
    }
    let targets = p["targets"].as_array().cloned().unwrap_or_default();
    if kind != "row" && !targets.iter().any(|t| t["expr"].is_string()) {
        problem(report, "", "panel has no PromQL target".to_string());
    }
    for t in &targets {
        let expr = t["expr"].as_str().unwrap_or_default();
        if datasource_uid(t) != Some(DATASOURCE) {
            problem(
                report,
                expr,
                format!(
                    "target datasource is {:?}, not {DATASOURCE}",
                    t.get("datasource")
                ),
            );
        }
        if expr.trim().is_empty() {
            problem(report, expr, "target without an expression".to_string());
            continue;
        }
        let uses = check_expr(&title, expr, vars, ex, report);
        if uses.labels.contains("region") {
            report.region_panels.insert(title.clone());
        }
    }
    for nested in p["panels"].as_array().into_iter().flatten() {
        panel_walk(nested, vars, ex, report);
    }
}

/// Checks every panel (rows' nested panels too), every target and every variable query of
/// `dash` against what `ex` says the collector exports.
fn check_dashboard(dash: &Value, ex: &Exported) -> Report {
    let mut report = Report::default();
    let list = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let vars: BTreeSet<String> = list
        .iter()
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect();
    let templating = |report: &mut Report, name: &str, expr: &str, problem: String| {
        report.findings.push(Finding {
            panel: format!("variable {name}"),
            expr: expr.to_string(),
            problem,
        });
    };
    match list.iter().find(|v| v["name"] == "datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        other => templating(
            &mut report,
            "datasource",
            "",
            format!("no datasource variable of type prometheus: {other:?}"),
        ),
    }
    for name in ["target", "check", "region"] {
        match list.iter().find(|v| v["name"] == name) {
            Some(v) if v["multi"] == true && v["includeAll"] == true => {}
            other => templating(
                &mut report,
                name,
                "",
                format!("missing, or not multi-value with All: {other:?}"),
            ),
        }
    }
    for v in list.iter().filter(|v| v["type"] == "query") {
        let name = v["name"].as_str().unwrap_or_default();
        let query = match &v["query"] {
            Value::String(s) => s.as_str(),
            q => q["query"].as_str().unwrap_or_default(),
        };
        if datasource_uid(v) != Some(DATASOURCE) {
            templating(
                &mut report,
                name,
                query,
                format!("query datasource is not {DATASOURCE}"),
            );
        }
        let Some((sel, label)) = label_values(query) else {
            templating(
                &mut report,
                name,
                query,
                "not a label_values(…) query".to_string(),
            );
            continue;
        };
        let Some(sel) = sel else {
            templating(
                &mut report,
                name,
                query,
                "label_values without a metric: any series' label would do".to_string(),
            );
            continue;
        };
        // The variable's query as PromQL: the selector, grouped by the label it lists.
        let promql = format!("count by ({label}) ({sel})");
        let title = format!("variable {name}");
        let mut sub = Report::default();
        check_expr(&title, &promql, &vars, ex, &mut sub);
        report.exprs += sub.exprs;
        report.metrics.extend(sub.metrics);
        report
            .findings
            .extend(sub.findings.into_iter().map(|f| Finding {
                expr: query.to_string(),
                ..f
            }));
    }
    for p in dash["panels"].as_array().into_iter().flatten() {
        panel_walk(p, &vars, ex, &mut report);
    }
    report
}

/// `GET /metrics` over HTTP/1.0 (so the body is not chunked): the body.
fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: mxscope\r\n\r\n")?;
    let mut resp = String::new();
    conn.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no end of headers in {resp:?}"))?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    Ok(body.to_string())
}

/// The `/metrics` address in the collector's `serving /metrics` log line (it binds port 0).
fn metrics_addr(collector: &mut Collector) -> SocketAddr {
    wait_for("the collector's /metrics address", WAIT, || {
        let log = collector.proc_mut().log();
        Ok(log
            .lines()
            .filter(|l| l.contains("serving /metrics"))
            .flat_map(|l| l.split_whitespace())
            .find_map(|w| w.strip_prefix("http=")?.parse().ok()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", collector.log_tail(20)))
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A raw agent `mx-us` in us-east: one ok smtp result for port 25 of an MX host of the local
/// domain `mail.test` (MX-expanded), so the per-domain mail metrics have a series.
fn raw_mx_session(url: &str) {
    let hello = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            agent_id: "mx-us".into(),
            region: "us-east".into(),
            version: "grafana-test".into(),
            local_targets: vec![pb::TargetSpec {
                name: "mail.test".into(),
                checks: vec!["smtp".into()],
                ..Default::default()
            }],
            ..Default::default()
        })),
    };
    let result = pb::ProbeResult {
        agent_id: "mx-us".into(),
        seq: 1,
        target: "mail.test".into(),
        check: "smtp".into(),
        endpoint: Some(pb::Endpoint {
            host: "mx1.mail.test".into(),
            ip: "192.0.2.25".into(),
            port: 25,
            family: pb::AddressFamily::Ipv4 as i32,
        }),
        start_us: now_us(),
        outcome: pb::Outcome::Ok as i32,
        timings: vec![pb::PhaseTiming {
            phase: "total".into(),
            micros: 42_000,
        }],
        facts: vec![pb::Fact {
            key: mxscope_proto::facts::address::VIA_MX.into(),
            value: Some(pb::fact::Value::Flag(true)),
        }],
        interval_ms: 600_000,
        ..Default::default()
    };
    let batch = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Batch(pb::ResultBatch {
            results: vec![result],
        })),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let s = rt.block_on(raw_session(
        url,
        None,
        vec![hello, batch],
        1,
        Duration::from_secs(30),
    ));
    assert_eq!(s.acked(), 1, "the raw result is acked: {:?}", s.error);
}

/// True when `ex` has a sample of `metric` with `label="value"`.
fn has(ex: &Exported, metric: &str, label: &str, value: &str) -> bool {
    ex.values
        .get(&(metric.to_string(), label.to_string()))
        .is_some_and(|v| v.contains(value))
}

#[test]
fn dashboard_queries_only_what_a_real_collector_exports() {
    let lab = Lab::new("grafana").expect("lab dir");
    let dir = lab.subdir("mxscope").expect("mxscope dir");
    let mut collector = Collector::start(&dir).expect("start collector");
    let http = metrics_addr(&mut collector);

    // A real agent in eu-west probing smtp on a closed local port: failing, with a duration.
    let closed = free_port(Ipv4Addr::LOCALHOST).expect("a closed port");
    let mut agent = Agent::start(
        &dir,
        &AgentOptions {
            id: "agent-eu".into(),
            region: "eu-west".into(),
            collector_url: collector.url(),
            resolver: None,
            ca_file: None,
            targets: vec![TargetConfig::new("127.0.0.1", &["smtp"])
                .interval("1s")
                .port("smtp", closed)],
        },
    )
    .expect("start agent");
    raw_mx_session(&collector.url());

    // The scrape is rendered at most every 5 s: wait for one with every labelled family.
    let mut last = String::new();
    let exported = wait_for("every labelled family on /metrics", WAIT, || {
        agent.ensure_running()?;
        last = scrape(http)?;
        let ex = Exported::parse(&last).map_err(anyhow::Error::msg)?;
        let ready = has(&ex, "mxscope_probe_success", "region", "eu-west")
            && has(&ex, "mxscope_probe_success", "region", "us-east")
            && has(&ex, "mxscope_probe_duration_seconds", "quantile", "0.95")
            && has(&ex, "mxscope_agent_up", "agent", "agent-eu")
            && has(&ex, "mxscope_agent_last_seen_seconds", "agent", "mx-us")
            && has(&ex, "mxscope_domain_mail_flows", "target", "mail.test")
            && has(&ex, "mxscope_domain_mx_hosts_working", "region", "us-east");
        Ok(ready.then_some(ex))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nlast scrape:\n{last}\ncollector log:\n{}\nagent log:\n{}",
            collector.log_tail(30),
            agent.log_tail(30)
        )
    });
    assert!(
        exported.labels["mxscope_probe_success"]
            == ["check", "region", "target"].map(String::from).into(),
        "{:?}",
        exported.labels["mxscope_probe_success"]
    );
    assert!(
        exported
            .labels
            .contains_key("mxscope_ingest_results_stored_total"),
        "counters carry _total on the scrape:\n{last}"
    );

    let dash = load_dashboard();
    assert!(
        dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion {:?}",
        dash["schemaVersion"]
    );
    let report = check_dashboard(&dash, &exported);
    let findings: Vec<String> = report.findings.iter().map(|f| f.to_string()).collect();
    assert!(
        findings.is_empty(),
        "{} problems in {}:\n{}",
        findings.len(),
        dashboard_path().display(),
        findings.join("\n")
    );
    assert!(report.panels >= 10, "panels walked: {}", report.panels);
    assert!(report.exprs >= 10, "expressions checked: {}", report.exprs);
    assert!(
        report.region_panels.len() >= 5,
        "panels comparing regions: {:?}",
        report.region_panels
    );
    for m in [
        "mxscope_probe_success",
        "mxscope_probe_duration_seconds",
        "mxscope_agent_up",
        "mxscope_agent_last_seen_seconds",
        "mxscope_ingest_results_stored_total",
        "mxscope_ingest_duplicates_total",
        "mxscope_store_commit_seconds_total",
        "mxscope_http_tls_refused_total",
        "mxscope_ingest_rejected_results_total",
    ] {
        assert!(report.metrics.contains(m), "the dashboard does not use {m}");
    }
    eprintln!(
        "dashboard: {} panels, {} expressions, metrics used: {:?}",
        report.panels, report.exprs, report.metrics
    );

    let status = collector
        .proc_mut()
        .terminate(Duration::from_secs(20))
        .expect("stop collector");
    assert!(status.success(), "collector exit: {status}");
}

/// The validator itself: a wrong metric, a wrong label, a foreign datasource and an unknown
/// variable are each reported with the panel title, the expression and the unknown name, while
/// the correct panel beside them is not.
#[test]
fn validator_reports_unknown_names() {
    let scrape = "# TYPE mxscope_agent_up gauge\n\
                  mxscope_agent_up{agent=\"a\",region=\"eu-west\"} 1\n\
                  mxscope_probe_duration_seconds{target=\"t\",check=\"smtp\",region=\"eu-west\",quantile=\"0.5\"} 0.1\n\
                  # TYPE mxscope_ingest_duplicates counter\n\
                  mxscope_ingest_duplicates_total 0\n\
                  # EOF\n";
    let ex = Exported::parse(scrape).expect("parse scrape");
    assert_eq!(ex.labels.len(), 3, "{ex:?}");
    let ds = serde_json::json!({ "type": "prometheus", "uid": DATASOURCE });
    let panel = |title: &str, expr: &str| {
        serde_json::json!({
            "type": "timeseries", "title": title, "datasource": ds,
            "targets": [{ "refId": "A", "datasource": ds, "expr": expr }],
        })
    };
    let var = |name: &str, query: &str| {
        serde_json::json!({
            "name": name, "type": "query", "datasource": ds, "multi": true, "includeAll": true,
            "query": { "query": query, "refId": "V" },
        })
    };
    let dash = serde_json::json!({
        "templating": { "list": [
            { "name": "datasource", "type": "datasource", "query": "prometheus" },
            var("region", "label_values(mxscope_agent_up, region)"),
            var("target", "label_values(mxscope_probe_duration_seconds, target)"),
            var("check", "label_values(mxscope_agent_up, check)"),
        ]},
        "panels": [
            panel("Fine", "sum by (region) (mxscope_agent_up{region=~\"$region\"})"),
            { "type": "row", "title": "Row", "datasource": ds, "panels": [
                panel("Made-up metric", "rate(mxscope_made_up_total[$__rate_interval])"),
                panel("Bad grouping", "sum by (zone) (mxscope_agent_up)"),
                panel("Bad quantile", "mxscope_probe_duration_seconds{quantile=\"0.99\"}"),
                panel("Unknown variable", "mxscope_agent_up{region=~\"$zone\"}"),
                panel("Counter without _total", "rate(mxscope_ingest_duplicates[5m])"),
            ]},
            {
                "type": "stat", "title": "Foreign datasource",
                "datasource": { "type": "prometheus", "uid": "prod" },
                "targets": [{ "refId": "A", "datasource": { "uid": "prod" },
                              "expr": "max(mxscope_agent_up)" }],
            },
        ],
    });
    let report = check_dashboard(&dash, &ex);
    let found: Vec<String> = report.findings.iter().map(|f| f.to_string()).collect();
    assert!(!found.is_empty(), "the validator reports nothing");
    let expect = [
        ("Made-up metric", "mxscope_made_up_total"),
        ("Bad grouping", "`zone`"),
        ("Bad quantile", "quantile=\"0.99\""),
        ("Unknown variable", "$zone"),
        ("Counter without _total", "mxscope_ingest_duplicates`"),
        ("Foreign datasource", "not ${datasource}"),
        ("variable check", "`check`"),
    ];
    for (title, name) in expect {
        assert!(
            found
                .iter()
                .any(|f| f.starts_with(&format!("panel {title:?}:")) && f.contains(name)),
            "no finding for {title:?} naming {name}: {found:#?}"
        );
    }
    // The expression is named in the finding.
    assert!(
        found
            .iter()
            .any(|f| f.contains("`rate(mxscope_made_up_total[$__rate_interval])`")),
        "{found:#?}"
    );
    assert!(
        !found.iter().any(|f| f.contains("\"Fine\"")
            || f.contains("\"Row\"")
            || f.contains("variable region")
            || f.contains("variable target")),
        "correct parts reported: {found:#?}"
    );
    assert_eq!(found.len(), expect.len() + 1, "{found:#?}");
    assert_eq!(report.panels, 8);
    assert_eq!(report.region_panels, ["Fine"].map(String::from).into());
}
