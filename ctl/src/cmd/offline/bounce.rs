//! `mxscopectl bounce FILE`: reads a saved bounce with the library's explainer
//! ([`mxscope_ctl::bounce`]) and prints one row per recipient.

use std::io::{Read as _, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use mxscope_ctl::bounce::{self, BounceReport, Source};

use crate::cli::print;
use crate::output::{Cell, Column, Format, Report};

/// Arguments of `mxscopectl bounce`.
#[derive(Debug, Args)]
pub(crate) struct BounceArgs {
    /// The bounce message as saved from the mailbox (RFC 5322, with headers); `-` reads stdin.
    pub file: PathBuf,
}

/// One row per recipient: action, status, its RFC 3463 meaning, temporary/permanent, the remote
/// server and its reply.
pub(crate) fn report(bounce: &BounceReport) -> Report {
    let mut r = Report::new(vec![
        Column::text("recipient", "RECIPIENT"),
        Column::text("action", "ACTION"),
        Column::text("status", "STATUS"),
        Column::text("meaning", "MEANING").cut(40),
        Column::text("permanence", "KIND"),
        Column::text("remote_mta", "REMOTE").cut(30),
        Column::text("diagnostic", "REPLY").cut(70),
        Column::hidden("original_recipient"),
        Column::hidden("reporting_mta"),
        Column::hidden("source"),
    ]);
    let source = match bounce.source {
        Source::DeliveryStatus => "delivery_status",
        Source::TextScan => "text_scan",
        Source::FailedRecipientsHeader => "failed_recipients_header",
    };
    for rcpt in &bounce.recipients {
        r.push(vec![
            Cell::opt(rcpt.recipient().map(str::to_string)),
            Cell::opt(rcpt.action.as_ref().map(ToString::to_string)),
            Cell::opt(rcpt.status.map(|s| s.to_string())),
            Cell::opt(rcpt.meaning.map(str::to_string)),
            Cell::opt(rcpt.permanence.map(|p| p.to_string())),
            Cell::opt(rcpt.remote_mta.clone()),
            Cell::opt(rcpt.diagnostic.clone()),
            Cell::opt(rcpt.original_recipient.clone()),
            Cell::opt(bounce.reporting_mta.clone()),
            Cell::new(source),
        ]);
    }
    r
}

/// Reads the file (or stdin), parses it and prints one row per recipient in `format`.
pub(crate) fn run(args: &BounceArgs, format: Format, out: &mut dyn Write) -> anyhow::Result<()> {
    /// Bounces with attachments are small; anything larger is not a bounce worth reading whole.
    const MAX_BYTES: u64 = 16 * 1024 * 1024;
    let mut raw = Vec::new();
    if args.file.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_BYTES)
            .read_to_end(&mut raw)
            .context("read the bounce from stdin")?;
    } else {
        std::fs::File::open(&args.file)
            .and_then(|f| f.take(MAX_BYTES).read_to_end(&mut raw))
            .with_context(|| format!("read {}", args.file.display()))?;
    }
    let bounce = bounce::parse(&raw).with_context(|| format!("{}", args.file.display()))?;
    print(&report(&bounce), format, out, "no recipients in the bounce")
}
