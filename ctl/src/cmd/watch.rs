//! `mxscopectl watch [TARGET]`: prints each state change (ok ⇄ failing) as the collector commits
//! it — of an endpoint, or of whether mail to a domain flows from a region — one line each (one
//! JSON object per line with `--format json`), until Ctrl-C.

use std::future::Future;
use std::io::Write;

use clap::Args;
use mxscope_proto::pb;
use serde_json::json;
use tonic::Streaming;

use crate::args;
use crate::client::{Client, Failure};
use crate::output::{self, Format};

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// Only this target (default: all).
    #[arg(value_parser = args::target_name)]
    pub target: Option<String>,
}

pub(crate) async fn run(
    client: &mut Client,
    a: WatchArgs,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let req = pb::WatchRequest {
        target: a.target.unwrap_or_default(),
    };
    let stream = client.call(|c| c.watch(req)).await?;
    let stop = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    follow(stream, format, out, stop).await
}

/// Writes events until `stop` completes (Ok) or the collector ends the stream.
pub(crate) async fn follow(
    mut stream: Streaming<pb::WatchEvent>,
    format: Format,
    out: &mut dyn Write,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    if format == Format::Csv {
        writeln!(
            out,
            "time,target,endpoint,check,region,old_state,new_state,error_class,level"
        )?;
    }
    let mut stop = std::pin::pin!(stop);
    loop {
        let next = tokio::select! {
            () = &mut stop => return Ok(()),
            next = stream.message() => next,
        };
        match next {
            Ok(Some(e)) => {
                writeln!(out, "{}", line(&e, format))?;
                out.flush()?;
            }
            Ok(None) => {
                eprintln!("the collector ended the stream (shutting down?)");
                return Ok(());
            }
            Err(status) => {
                return Err(Failure::Server {
                    code: status.code(),
                    message: status.message().to_string(),
                }
                .into())
            }
        }
    }
}

/// One event as a line of the format.
pub(crate) fn line(e: &pb::WatchEvent, format: Format) -> String {
    let time = output::timestamp_seconds(e.at_us).unwrap_or_else(|| "-".to_string());
    let level = if e.level.is_empty() {
        "endpoint"
    } else {
        e.level.as_str()
    };
    let endpoint = if level == "mail" {
        "(mail flow)"
    } else {
        e.endpoint.as_str()
    };
    match format {
        Format::Table => {
            let why = if e.error_class.is_empty() {
                String::new()
            } else {
                format!("  ({})", e.error_class)
            };
            // Every field comes from agents through the collector: no control character may
            // reach the terminal (escape sequences, carriage returns), as in the other tables.
            output::one_line(&format!(
                "{time}  {} {} {} {}  {} -> {}{why}",
                e.target, e.check, e.region, endpoint, e.old_state, e.new_state
            ))
        }
        Format::Json => json!({
            "time": time,
            "target": e.target,
            "endpoint": e.endpoint,
            "check": e.check,
            "region": e.region,
            "old_state": e.old_state,
            "new_state": e.new_state,
            "error_class": Some(&e.error_class).filter(|c| !c.is_empty()),
            "level": level,
        })
        .to_string(),
        Format::Csv => [
            time.as_str(),
            &e.target,
            &e.endpoint,
            &e.check,
            &e.region,
            &e.old_state,
            &e.new_state,
            &e.error_class,
            level,
        ]
        .iter()
        .map(|f| {
            if f.contains([',', '"', '\n']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(","),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn event() -> pb::WatchEvent {
        pb::WatchEvent {
            target: "lab.test".into(),
            endpoint: "mx.lab.test[198.18.0.2]:25".into(),
            check: "smtp".into(),
            region: "ap-south".into(),
            old_state: "ok".into(),
            new_state: "failing".into(),
            at_us: 1_700_000_000_000_000,
            error_class: "timeout".into(),
            level: "endpoint".into(),
            via_mx: true,
        }
    }

    #[test]
    fn lines_in_each_format() {
        assert_eq!(
            line(&event(), Format::Table),
            "2023-11-14T22:13:20Z  lab.test smtp ap-south mx.lab.test[198.18.0.2]:25  ok -> failing  (timeout)"
        );
        let v: Value = serde_json::from_str(&line(&event(), Format::Json)).unwrap();
        assert_eq!(v["new_state"], "failing");
        assert_eq!(v["error_class"], "timeout");
        let mut back = event();
        back.old_state = "failing".into();
        back.new_state = "ok".into();
        back.error_class.clear();
        let v: Value = serde_json::from_str(&line(&back, Format::Json)).unwrap();
        assert!(v["error_class"].is_null());
        assert!(!line(&back, Format::Table).contains('('));
        assert_eq!(
            line(&event(), Format::Csv),
            "2023-11-14T22:13:20Z,lab.test,mx.lab.test[198.18.0.2]:25,smtp,ap-south,ok,failing,timeout,endpoint"
        );
        let mut mail = event();
        mail.level = "mail".into();
        mail.endpoint.clear();
        assert_eq!(
            line(&mail, Format::Table),
            "2023-11-14T22:13:20Z  lab.test smtp ap-south (mail flow)  ok -> failing  (timeout)"
        );
        let v: Value = serde_json::from_str(&line(&mail, Format::Json)).unwrap();
        assert_eq!(v["level"], "mail");
    }

    #[test]
    fn table_lines_carry_no_control_characters() {
        let mut e = event();
        e.target = "evil.test\x1b[2J\rspoofed".into();
        e.error_class = "x\x07\n".into();
        let l = line(&e, Format::Table);
        assert!(!l.chars().any(char::is_control), "{l:?}");
        assert!(l.contains("evil.test"), "{l}");
    }
}
