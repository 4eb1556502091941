//! `mxscopectl bounce PATH`: reads saved bounces (one message, an mbox, a Maildir or a directory)
//! with the library's explainer ([`mxscope_ctl::bounce`]) and prints one row per recipient, or
//! with `--summary` the counts by kind, reason, soft/hard, recipient domain and remote host.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use mxscope_ctl::bounce::mailbox::{read_limited, read_messages, split_mbox, Message};
use mxscope_ctl::bounce::summary::{kind_name, Summary};
use mxscope_ctl::bounce::{self, BounceReport};

use crate::cli::print;
use crate::output::{Cell, Column, Format, Report};

/// Arguments of `mxscopectl bounce`.
#[derive(Debug, Args)]
pub(crate) struct BounceArgs {
    /// A bounce as saved from the mailbox (RFC 5322, with headers), an mbox file, a Maildir or a
    /// directory of messages; `-` reads one message or an mbox from stdin.
    pub file: PathBuf,
    /// Print counts (by kind, reason, soft/hard, recipient domain, remote host) instead of rows.
    #[arg(long)]
    pub summary: bool,
}

/// One row per recipient: reason, soft/hard, action, status, its RFC 3463 meaning, the remote
/// server and its reply.
pub(crate) fn report(bounces: &[(String, BounceReport)]) -> Report {
    let mut r = Report::new(vec![
        Column::text("recipient", "RECIPIENT"),
        Column::text("reason", "REASON"),
        Column::text("severity", "SOFT/HARD"),
        Column::text("action", "ACTION"),
        Column::text("status", "STATUS"),
        Column::text("meaning", "MEANING").cut(40),
        Column::text("remote_mta", "REMOTE").cut(30),
        Column::text("diagnostic", "REPLY").cut(70),
        Column::hidden("permanence"),
        Column::hidden("status_conflict"),
        Column::hidden("original_recipient"),
        Column::hidden("reporting_mta"),
        Column::hidden("kind"),
        Column::hidden("mta"),
        Column::hidden("forwarded"),
        Column::hidden("source"),
        Column::hidden("message"),
    ]);
    for (origin, bounce) in bounces {
        for rcpt in &bounce.recipients {
            r.push(vec![
                Cell::opt(rcpt.recipient().map(str::to_string)),
                Cell::new(rcpt.reason.as_str()),
                Cell::opt(rcpt.severity.map(|s| s.to_string())),
                Cell::opt(rcpt.action.as_ref().map(ToString::to_string)),
                Cell::opt(rcpt.status.map(|s| s.to_string())),
                Cell::opt(rcpt.meaning.map(str::to_string)),
                Cell::opt(rcpt.remote_mta.clone()),
                Cell::opt(rcpt.diagnostic.clone()),
                Cell::opt(rcpt.permanence.map(|p| p.to_string())),
                Cell::opt(rcpt.status_conflict.clone()),
                Cell::opt(rcpt.original_recipient.clone()),
                Cell::opt(bounce.reporting_mta.clone()),
                Cell::new(kind_name(bounce.kind)),
                Cell::opt(bounce.mta.map(|m| m.as_str())),
                Cell::new(bounce.forwarded),
                Cell::new(bounce.source.as_str()),
                Cell::new(origin.as_str()),
            ]);
        }
    }
    r
}

/// The summary as rows of (group, key, count); `messages` and `unreadable` come first.
pub(crate) fn summary_report(s: &Summary) -> Report {
    let mut r = Report::new(vec![
        Column::text("group", "GROUP"),
        Column::text("key", "KEY"),
        Column::number("count", "COUNT"),
    ]);
    r.push(vec![
        Cell::new("messages"),
        Cell::new("total"),
        Cell::new(s.messages),
    ]);
    r.push(vec![
        Cell::new("messages"),
        Cell::new("unreadable"),
        Cell::new(s.unreadable),
    ]);
    for (group, map) in [
        ("kind", &s.by_kind),
        ("reason", &s.by_reason),
        ("severity", &s.by_severity),
        ("domain", &s.by_domain),
        ("remote", &s.by_remote),
    ] {
        let mut entries: Vec<(&String, &usize)> = map.iter().collect();
        entries.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (key, count) in entries {
            r.push(vec![
                Cell::new(group),
                Cell::new(key.as_str()),
                Cell::new(*count),
            ]);
        }
    }
    r
}

/// Reads the messages at the path (or stdin), explains each and prints rows or the summary.
pub(crate) fn run(args: &BounceArgs, format: Format, out: &mut dyn Write) -> anyhow::Result<()> {
    let messages: Vec<Message> = if args.file.as_os_str() == "-" {
        let raw = read_limited(&args.file).context("read the bounce from stdin")?;
        split_mbox(&raw, "-")
    } else {
        read_messages(&args.file).with_context(|| format!("read {}", args.file.display()))?
    };
    let single = messages.len() == 1;
    let mut summary = Summary::default();
    let mut explained = Vec::new();
    for m in messages {
        match bounce::parse(&m.raw) {
            Ok(b) => {
                summary.add(Some(&b));
                explained.push((m.origin, b));
            }
            // one message that is no bounce is an error; in a mailbox it is counted and skipped
            Err(e) if single && !args.summary => {
                return Err(anyhow::Error::new(e).context(m.origin));
            }
            Err(e) => {
                summary.add(None);
                eprintln!("{}: {e}", m.origin);
            }
        }
    }
    if args.summary {
        print(&summary_report(&summary), format, out, "no messages")
    } else {
        print(
            &report(&explained),
            format,
            out,
            "no recipients in the bounce",
        )
    }
}
