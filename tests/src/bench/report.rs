//! The report: one section per benchmark (command, target, verdict, measured tables, findings),
//! rendered as Markdown for `BENCHMARKS.md` and printed as it is.

use std::fmt::Write as _;

use super::sys;
use super::Mode;

/// Whether a benchmark met its target.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    Met(String),
    Missed(String),
    /// Smoke runs have no thresholds.
    NotJudged,
    /// The benchmark could not run; the text says why.
    Failed(String),
    /// What it measures is not implemented yet (e.g. an RPC answering Unimplemented).
    Pending(String),
}

impl Verdict {
    fn render(&self) -> String {
        match self {
            Verdict::Met(why) => format!("**met** — {why}"),
            Verdict::Missed(why) => format!("**missed** — {why}"),
            Verdict::NotJudged => "not judged (smoke run: tiny sizes, no thresholds)".into(),
            Verdict::Failed(why) => format!("**did not run** — {why}"),
            Verdict::Pending(why) => format!("**not measurable yet** — {why}"),
        }
    }

    /// `met` when `ok`, else `missed`, with the same explanation; smoke runs are not judged.
    pub(crate) fn judge(mode: Mode, ok: bool, why: String) -> Verdict {
        match (mode, ok) {
            (Mode::Smoke, _) => Verdict::NotJudged,
            (Mode::Full, true) => Verdict::Met(why),
            (Mode::Full, false) => Verdict::Missed(why),
        }
    }
}

/// One benchmark's part of the report.
#[derive(Debug, Clone)]
pub(crate) struct Section {
    /// `--only` name.
    pub name: String,
    pub title: String,
    pub command: String,
    pub target: String,
    pub verdicts: Vec<(String, Verdict)>,
    /// Markdown body: tables and notes.
    pub body: String,
}

impl Section {
    pub(crate) fn new(name: &str, title: &str, command: String, target: &str) -> Section {
        Section {
            name: name.into(),
            title: title.into(),
            command,
            target: target.into(),
            verdicts: Vec::new(),
            body: String::new(),
        }
    }

    pub(crate) fn verdict(&mut self, what: &str, v: Verdict) {
        self.verdicts.push((what.into(), v));
    }

    /// Appends a line of Markdown.
    pub(crate) fn line(&mut self, text: impl AsRef<str>) {
        self.body.push_str(text.as_ref());
        self.body.push('\n');
    }

    /// Appends a Markdown table.
    pub(crate) fn table(&mut self, header: &[&str], rows: &[Vec<String>]) {
        self.line(format!("| {} |", header.join(" | ")));
        self.line(format!(
            "|{}|",
            header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
        ));
        for r in rows {
            self.line(format!("| {} |", r.join(" | ")));
        }
        self.line("");
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "## {}\n", self.title);
        let _ = writeln!(out, "Reproduce: `{}`\n", self.command);
        let _ = writeln!(out, "Target: {}\n", self.target);
        for (what, v) in &self.verdicts {
            let _ = writeln!(out, "- {what}: {}", v.render());
        }
        let _ = writeln!(out);
        out.push_str(&self.body);
        let _ = writeln!(out);
    }
}

/// The whole report.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub header: Vec<String>,
    pub sections: Vec<Section>,
    pub proposals: Vec<String>,
}

impl Report {
    pub(crate) fn new(mode: Mode, commit: &str) -> Report {
        let header = vec![
            format!(
                "Machine: {} cores ({}), {:.1} GiB memory, load average {} at start; shared with other engineers' builds, so figures are noisy — every comparison below was measured side by side in this run.",
                sys::nproc(),
                sys::cpu_model(),
                sys::mem_total_gib(),
                sys::load_avg()
            ),
            format!("Commit: {commit}. Mode: {}.", match mode {
                Mode::Smoke => "smoke (tiny sizes, no thresholds)",
                Mode::Full => "full",
            }),
            "Build first: `cargo build --release --workspace` (the benchmark drives the release `mxscope-collector` and `mxscope-agent` next to itself), then `cargo run --release -p mxscope-tests --bin mxscope-bench -- [--smoke] [--only NAME] [--out BENCHMARKS.md]`.".into(),
        ];
        Report {
            header,
            sections: Vec::new(),
            proposals: Vec::new(),
        }
    }

    pub(crate) fn render(&self) -> String {
        let mut out = String::from("# mxscope benchmarks\n\n");
        for h in &self.header {
            let _ = writeln!(out, "{h}\n");
        }
        let _ = writeln!(out, "## Summary\n");
        let _ = writeln!(out, "| benchmark | check | verdict |");
        let _ = writeln!(out, "|---|---|---|");
        for s in &self.sections {
            for (what, v) in &s.verdicts {
                let short = match v {
                    Verdict::Met(_) => "met",
                    Verdict::Missed(_) => "missed",
                    Verdict::NotJudged => "not judged",
                    Verdict::Failed(_) => "did not run",
                    Verdict::Pending(_) => "not implemented yet",
                };
                let _ = writeln!(out, "| {} | {what} | {short} |", s.name);
            }
        }
        let _ = writeln!(out);
        let mut sections: Vec<&Section> = self.sections.iter().collect();
        sections.sort_by(|a, b| a.title.cmp(&b.title));
        for s in sections {
            s.render(&mut out);
        }
        if !self.proposals.is_empty() {
            let _ = writeln!(out, "## Proposals for the misses\n");
            for p in &self.proposals {
                let _ = writeln!(out, "- {p}");
            }
            let _ = writeln!(out);
        }
        out
    }
}
