//! Renders every command's answer as an aligned table, JSON or CSV. Commands build a [`Report`]
//! (columns plus rows of JSON values, with optional table text); only this module writes formats.

use std::io::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::Value;

/// How a command prints its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON array of objects (one object for `target show`).
    Json,
    /// A header line and one line per row.
    Csv,
}

/// Where a column's cells sit in a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Right,
}

/// One field of a report.
#[derive(Debug, Clone)]
pub(crate) struct Column {
    /// JSON key and CSV header.
    pub key: &'static str,
    /// Table header; `None` leaves the column out of tables (JSON and CSV always have it).
    pub header: Option<&'static str>,
    pub align: Align,
    /// Longer table cells are cut with '…'.
    pub max_width: Option<usize>,
}

impl Column {
    pub(crate) const fn text(key: &'static str, header: &'static str) -> Self {
        Column {
            key,
            header: Some(header),
            align: Align::Left,
            max_width: None,
        }
    }
    pub(crate) const fn number(key: &'static str, header: &'static str) -> Self {
        Column {
            key,
            header: Some(header),
            align: Align::Right,
            max_width: None,
        }
    }
    pub(crate) const fn hidden(key: &'static str) -> Self {
        Column {
            key,
            header: None,
            align: Align::Left,
            max_width: None,
        }
    }
    pub(crate) const fn cut(mut self, width: usize) -> Self {
        self.max_width = Some(width);
        self
    }
}

/// One value: the JSON/CSV value and, when people should see something else, the table text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Cell {
    pub value: Value,
    pub text: Option<String>,
}

impl Cell {
    pub(crate) fn new(value: impl Into<Value>) -> Self {
        Cell {
            value: value.into(),
            text: None,
        }
    }
    pub(crate) fn null() -> Self {
        Cell {
            value: Value::Null,
            text: None,
        }
    }
    /// `None` becomes JSON null (and `-` in tables, an empty CSV field).
    pub(crate) fn opt<T: Into<Value>>(v: Option<T>) -> Self {
        v.map_or_else(Cell::null, Cell::new)
    }
    /// A float; NaN and infinities become null, as JSON has no such numbers.
    pub(crate) fn float(v: f64) -> Self {
        Cell::new(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    /// Sets the text tables show instead of the value.
    pub(crate) fn shown_as(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }
}

/// Rows of one command's answer, in the order the collector sent them.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    columns: Vec<Column>,
    rows: Vec<Vec<Cell>>,
}

impl Report {
    pub(crate) fn new(columns: Vec<Column>) -> Self {
        Report {
            columns,
            rows: Vec::new(),
        }
    }

    /// Adds a row; its cells are in column order.
    pub(crate) fn push(&mut self, row: Vec<Cell>) {
        assert_eq!(
            row.len(),
            self.columns.len(),
            "row does not match the report's columns"
        );
        self.rows.push(row);
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Writes the whole report: a table, one JSON array, or CSV with a header line.
    pub(crate) fn render(&self, format: Format, out: &mut dyn Write) -> io::Result<()> {
        match format {
            Format::Table => self.table(out),
            Format::Json => {
                serde_json::to_writer_pretty(&mut *out, &JsonRows(self))?;
                writeln!(out)
            }
            Format::Csv => self.csv(out),
        }
    }

    /// Writes a report of one record: `field  value` lines as a table, a single JSON object, or CSV.
    pub(crate) fn render_one(&self, format: Format, out: &mut dyn Write) -> io::Result<()> {
        let Some(row) = self.rows.first() else {
            return self.render(format, out);
        };
        match format {
            Format::Table => {
                let mut fields = Report::new(vec![
                    Column::text("field", "FIELD"),
                    Column::text("value", "VALUE"),
                ]);
                for (col, cell) in self.columns.iter().zip(row) {
                    let text = cell.text.clone().unwrap_or_else(|| table_text(&cell.value));
                    fields.push(vec![Cell::new(col.key), Cell::new(text)]);
                }
                fields.table_body(out, false)
            }
            Format::Json => {
                serde_json::to_writer_pretty(
                    &mut *out,
                    &JsonRow {
                        columns: &self.columns,
                        row,
                    },
                )?;
                writeln!(out)
            }
            Format::Csv => self.csv(out),
        }
    }

    fn table(&self, out: &mut dyn Write) -> io::Result<()> {
        self.table_body(out, true)
    }

    fn table_body(&self, out: &mut dyn Write, header: bool) -> io::Result<()> {
        let shown: Vec<usize> = (0..self.columns.len())
            .filter(|&i| self.columns[i].header.is_some())
            .collect();
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| {
                shown
                    .iter()
                    .map(|&i| {
                        let cell = &row[i];
                        let text = cell.text.clone().unwrap_or_else(|| table_text(&cell.value));
                        cut(&one_line(&text), self.columns[i].max_width)
                    })
                    .collect()
            })
            .collect();
        let heads: Vec<&str> = shown
            .iter()
            .map(|&i| self.columns[i].header.unwrap_or_default())
            .collect();
        let mut widths: Vec<usize> = if header {
            heads.iter().map(|h| width(h)).collect()
        } else {
            vec![0; shown.len()]
        };
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(c));
            }
        }
        let aligns: Vec<Align> = shown.iter().map(|&i| self.columns[i].align).collect();
        if header {
            let head: Vec<String> = heads.iter().map(|h| (*h).to_string()).collect();
            write_line(out, &head, &widths, &aligns)?;
        }
        for row in &cells {
            write_line(out, row, &widths, &aligns)?;
        }
        Ok(())
    }

    fn csv(&self, out: &mut dyn Write) -> io::Result<()> {
        let head: Vec<String> = self.columns.iter().map(|c| csv_field(c.key)).collect();
        writeln!(out, "{}", head.join(","))?;
        for row in &self.rows {
            let fields: Vec<String> = row.iter().map(|c| csv_field(&csv_text(&c.value))).collect();
            writeln!(out, "{}", fields.join(","))?;
        }
        Ok(())
    }
}

fn write_line(
    out: &mut dyn Write,
    cells: &[String],
    widths: &[usize],
    aligns: &[Align],
) -> io::Result<()> {
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        let last = i + 1 == cells.len();
        let pad = widths[i].saturating_sub(width(cell));
        if i > 0 {
            line.push_str("  ");
        }
        match aligns[i] {
            Align::Right => {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            }
            Align::Left => {
                line.push_str(cell);
                if !last {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
    }
    writeln!(out, "{}", line.trim_end())
}

/// Display width in characters (good enough for the ASCII and Latin text the collector sends).
fn width(s: &str) -> usize {
    s.chars().count()
}

/// `s` with every control character (escape sequences, line breaks) shown as a space.
pub(crate) fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn cut(s: &str, max: Option<usize>) -> String {
    match max {
        Some(max) if width(s) > max && max > 0 => {
            let mut t: String = s.chars().take(max - 1).collect();
            t.push('…');
            t
        }
        _ => s.to_string(),
    }
}

/// Table text of a value: `-` for null and empty lists, `a,b` for lists, `k=v k=v` for objects.
fn table_text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format_float(f),
            _ => n.to_string(),
        },
        Value::String(s) if s.is_empty() => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".to_string(),
        Value::Array(a) => a.iter().map(table_text).collect::<Vec<_>>().join(","),
        Value::Object(o) if o.is_empty() => "-".to_string(),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| format!("{k}={}", table_text(v)))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn format_float(f: f64) -> String {
    let s = format!("{f:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// CSV text of a value: empty for null, plain scalars, compact JSON for lists and objects.
fn csv_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(_) | Value::Object(_) => v.to_string(),
    }
}

/// Quotes a field when it holds a comma, quote, line break or edge space (RFC 4180).
fn csv_field(s: &str) -> String {
    let needs = s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ');
    if needs {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

struct JsonRows<'a>(&'a Report);

impl Serialize for JsonRows<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.rows.len()))?;
        for row in &self.0.rows {
            seq.serialize_element(&JsonRow {
                columns: &self.0.columns,
                row,
            })?;
        }
        seq.end()
    }
}

/// One row as a JSON object whose keys keep the column order.
struct JsonRow<'a> {
    columns: &'a [Column],
    row: &'a [Cell],
}

impl Serialize for JsonRow<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.columns.len()))?;
        for (col, cell) in self.columns.iter().zip(self.row) {
            map.serialize_entry(col.key, &cell.value)?;
        }
        map.end()
    }
}

/// Microseconds since the epoch as an RFC 3339 UTC string with millisecond precision; `None`
/// for zero, negative or out-of-range values (the collector sends 0 for "never").
pub(crate) fn timestamp_millis(us: i64) -> Option<String> {
    let t = time_of(us)?;
    Some(humantime::format_rfc3339_millis(t).to_string())
}

/// Microseconds since the epoch as an RFC 3339 UTC string with second precision (see above).
pub(crate) fn timestamp_seconds(us: i64) -> Option<String> {
    let t = time_of(us)?;
    Some(humantime::format_rfc3339_seconds(t).to_string())
}

/// Last year humantime formats is 9999.
const MAX_US: i64 = 253_402_300_799_000_000;

fn time_of(us: i64) -> Option<SystemTime> {
    if us <= 0 || us > MAX_US {
        return None;
    }
    let us = u64::try_from(us).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_micros(us))
}

/// How long ago `us` was, relative to `now_us`, for tables: `42s ago`, `3m ago`, `2h ago`, `5d ago`.
pub(crate) fn age(us: i64, now_us: i64) -> String {
    if us <= 0 {
        return "never".to_string();
    }
    let secs = (now_us - us) / 1_000_000;
    if secs < 0 {
        return "in the future".to_string();
    }
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7_199 => format!("{}m ago", secs / 60),
        7_200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// A duration the way people type it: `60s`, `5m`, `1h30m`, `250ms`.
pub(crate) fn duration_text(ms: u64) -> String {
    if ms == 0 {
        return "-".to_string();
    }
    humantime::format_duration(Duration::from_millis(ms))
        .to_string()
        .replace(' ', "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Report {
        let mut r = Report::new(vec![
            Column::text("target", "TARGET"),
            Column::number("p50_ms", "P50"),
            Column::text("last_error", "ERROR"),
            Column::hidden("note"),
        ]);
        r.push(vec![
            Cell::new("example.com"),
            Cell::float(12.5),
            Cell::null(),
            Cell::new("a, \"b\""),
        ]);
        r.push(vec![
            Cell::new("x.test"),
            Cell::float(1234.0),
            Cell::new("refused"),
            Cell::new("line1\nline2"),
        ]);
        r
    }

    fn render(r: &Report, f: Format) -> String {
        let mut out = Vec::new();
        r.render(f, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn table_aligns_columns_and_hides_hidden() {
        let text = render(&sample(), Format::Table);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "TARGET        P50  ERROR");
        assert_eq!(lines[1], "example.com  12.5  -");
        assert_eq!(lines[2], "x.test       1234  refused");
        assert!(!text.contains("line1"), "hidden column leaked: {text}");
        // Every column starts at the same offset in every line.
        let at = |l: &str, pat: &str| l.find(pat).unwrap();
        assert_eq!(at(lines[0], "ERROR"), at(lines[2], "refused"));
        // Right-aligned numbers end at the same offset.
        assert_eq!(at(lines[0], "P50") + 3, at(lines[2], "1234") + 4);
    }

    #[test]
    fn table_cuts_long_cells_and_flattens_newlines() {
        let mut r = Report::new(vec![
            Column::text("m", "MSG").cut(8),
            Column::text("n", "N"),
        ]);
        r.push(vec![Cell::new("0123456789abc"), Cell::new("a\nb")]);
        let text = render(&r, Format::Table);
        assert_eq!(text.lines().nth(1), Some("0123456…  a b"), "{text}");
    }

    #[test]
    fn table_uses_shown_text_and_formats_nested_values() {
        let mut r = Report::new(vec![
            Column::text("seen", "SEEN"),
            Column::text("labels", "LABELS"),
            Column::text("ok", "OK"),
        ]);
        r.push(vec![
            Cell::new("2024-01-01T00:00:00Z").shown_as("5s ago"),
            Cell::new(json!({"a": "1", "b": 2})),
            Cell::new(true),
        ]);
        let text = render(&r, Format::Table);
        assert_eq!(text.lines().nth(1), Some("5s ago  a=1 b=2  yes"), "{text}");
    }

    #[test]
    fn json_is_one_array_with_every_field_and_nulls() {
        let text = render(&sample(), Format::Json);
        let v: Value = serde_json::from_str(&text).unwrap();
        let rows = v.as_array().expect("an array");
        assert_eq!(rows.len(), 2);
        let first = rows[0].as_object().unwrap();
        let keys: Vec<&str> = first.keys().map(String::as_str).collect();
        let mut want = vec!["target", "p50_ms", "last_error", "note"];
        want.sort_unstable();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort_unstable();
        assert_eq!(keys_sorted, want);
        assert_eq!(first["p50_ms"], json!(12.5));
        assert!(first["last_error"].is_null());
        assert_eq!(rows[1]["last_error"], json!("refused"));
        assert_eq!(rows[1]["note"], json!("line1\nline2"));
        // Keys keep column order in the text.
        assert!(text.find("\"target\"").unwrap() < text.find("\"p50_ms\"").unwrap());
    }

    #[test]
    fn json_of_nothing_is_an_empty_array() {
        let r = Report::new(vec![Column::text("a", "A")]);
        assert_eq!(render(&r, Format::Json).trim(), "[]");
    }

    #[test]
    fn non_finite_floats_become_null() {
        assert_eq!(Cell::float(f64::NAN).value, Value::Null);
        assert_eq!(Cell::float(f64::INFINITY).value, Value::Null);
        assert_eq!(Cell::opt(None::<String>).value, Value::Null);
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let text = render(&sample(), Format::Csv);
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines[0], "target,p50_ms,last_error,note");
        assert_eq!(lines[1], "example.com,12.5,,\"a, \"\"b\"\"\"");
        // The embedded newline stays inside one quoted field.
        assert_eq!(lines[2], "x.test,1234.0,refused,\"line1");
        assert_eq!(lines[3], "line2\"");
        assert_eq!(csv_field(" lead"), "\" lead\"");
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_text(&json!({"k": 1})), "{\"k\":1}");
    }

    #[test]
    fn render_one_prints_fields_or_one_object() {
        let mut r = Report::new(vec![Column::text("name", "NAME"), Column::hidden("checks")]);
        r.push(vec![
            Cell::new("example.com"),
            Cell::new(json!(["mx", "smtp"])),
        ]);
        let mut out = Vec::new();
        r.render_one(Format::Json, &mut out).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, json!({"name": "example.com", "checks": ["mx", "smtp"]}));
        let mut out = Vec::new();
        r.render_one(Format::Table, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, "name    example.com\nchecks  mx,smtp\n");
    }

    #[test]
    fn timestamps_and_ages() {
        assert_eq!(
            timestamp_millis(1_700_000_000_123_456).as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
        assert_eq!(
            timestamp_seconds(1_700_000_000_999_999).as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
        assert_eq!(timestamp_seconds(0), None);
        assert_eq!(timestamp_seconds(-5), None);
        assert_eq!(timestamp_seconds(i64::MAX), None);
        let now = 1_700_000_000_000_000;
        assert_eq!(age(now - 42_000_000, now), "42s ago");
        assert_eq!(age(now - 600_000_000, now), "10m ago");
        assert_eq!(age(0, now), "never");
        assert_eq!(duration_text(60_000), "1m");
        assert_eq!(duration_text(90_000), "1m30s");
        assert_eq!(duration_text(250), "250ms");
    }
}
