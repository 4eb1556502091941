//! `mxscopectl revoke`: a certificate's serial, a fingerprint or an agent id refused from now on.
//! Without `--list` it asks the collector (admin certificate), which keeps the entry in its
//! database; with `--list FILE` it appends the entry with a dated comment to the collector's
//! `--revoked FILE` and needs no connection. Either way the collector refuses the certificate
//! within a second and ends its open sessions and streams.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{ArgGroup, Args};
use mxscope_pki::{read_cert_pem, Entry, Fingerprint, Revocations, Serial};

use crate::args;

/// `mxscopectl revoke`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["cert", "serial", "fingerprint", "agent"])))]
pub(crate) struct RevokeArgs {
    /// Append to this revocation list (the collector's --revoked FILE; created, readable by its
    /// owner only, if missing) instead of asking the collector.
    #[arg(long, env = "MXSCOPE_REVOKED", value_name = "FILE")]
    pub list: Option<PathBuf>,
    /// Revoke this certificate (PEM, e.g. admin.pem or agent.pem): its serial is read from it.
    #[arg(long, value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// Revoke the certificate with this serial (hex; case and colons do not matter).
    #[arg(long, value_name = "HEX", value_parser = args::serial)]
    pub serial: Option<Serial>,
    /// Revoke the certificate with this SHA-256 fingerprint of its DER (64 hex digits).
    #[arg(long, value_name = "HEX", value_parser = args::fingerprint)]
    pub fingerprint: Option<Fingerprint>,
    /// Revoke every certificate of this agent id.
    #[arg(long, value_name = "ID", value_parser = args::agent_id)]
    pub agent: Option<String>,
    /// Why, written into the list as a comment beside the date.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

/// What is revoked, and how to describe it to the operator.
struct Revocation {
    entry: Entry,
    /// e.g. "admin ops (serial 4f1a…)".
    what: String,
}

fn revocation(a: &RevokeArgs) -> anyhow::Result<Revocation> {
    if let Some(path) = &a.cert {
        let shown = path.display().to_string();
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the certificate {shown}"))?;
        let (who, id) = read_cert_pem(&pem, &shown)?;
        let who = who.map_or_else(|| "the certificate".to_string(), |w| w.to_string());
        return Ok(Revocation {
            what: format!(
                "{who} of {shown} (serial {}, sha256 {})",
                id.serial, id.fingerprint
            ),
            entry: Entry::Serial(id.serial),
        });
    }
    let entry = match (&a.serial, &a.fingerprint, &a.agent) {
        (Some(s), _, _) => Entry::Serial(s.clone()),
        (_, Some(fp), _) => Entry::Fingerprint(fp.clone()),
        (_, _, Some(id)) => Entry::Agent(id.clone()),
        // clap's group requires one of them.
        _ => bail!("say what to revoke: --cert, --serial, --fingerprint or --agent"),
    };
    let what = match &entry {
        Entry::Serial(s) => format!("the certificate with serial {s}"),
        Entry::Fingerprint(fp) => format!("the certificate with sha256 {fp}"),
        Entry::Agent(id) => format!("every certificate of agent '{id}'"),
    };
    Ok(Revocation { entry, what })
}

/// The comment line: `# <date> <reason>`, with the subject for a --cert revocation.
fn comment(reason: Option<&str>, now: std::time::SystemTime) -> anyhow::Result<String> {
    let reason = reason.map(str::trim).unwrap_or("");
    if reason.chars().any(char::is_control) {
        // A newline would start a line of its own: an entry nobody asked for.
        bail!("--reason must be one line of text without control characters");
    }
    let date = humantime::format_rfc3339_seconds(now);
    Ok(if reason.is_empty() {
        format!("# {date}")
    } else {
        format!("# {date} {reason}")
    })
}

/// Asks the collector to revoke (it keeps the entry in its database).
pub(crate) async fn run_online(
    client: &mut crate::client::Client,
    a: &RevokeArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let r = revocation(a)?;
    let reason = a.reason.as_deref().map(str::trim).unwrap_or("").to_string();
    if reason.chars().any(char::is_control) {
        bail!("--reason must be one line of text without control characters");
    }
    let mut req = mxscope_proto::pb::RevokeRequest {
        reason,
        ..Default::default()
    };
    match &r.entry {
        Entry::Serial(s) => req.serial = s.to_string(),
        Entry::Fingerprint(fp) => req.fingerprint = fp.to_string(),
        Entry::Agent(id) => req.agent_id = id.clone(),
    }
    let resp = client.call(|c| c.revoke(req)).await?;
    if resp.added {
        writeln!(out, "revoked {} ({})", r.what, resp.entry)?;
        writeln!(
            out,
            "the collector refuses it from now on and has ended its open sessions and watch streams"
        )?;
    } else {
        writeln!(out, "{} was already revoked ({})", r.what, resp.entry)?;
    }
    Ok(())
}

/// Appends to the revocation list `--list` (no collector connection).
pub(crate) fn run(a: &RevokeArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let r = revocation(a)?;
    let comment = comment(a.reason.as_deref(), std::time::SystemTime::now())?;
    let Some(list) = &a.list else {
        bail!("no --list FILE: without it, revoke asks the collector");
    };
    let existing = match std::fs::read_to_string(list) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the revocation list {}", list.display()))
        }
    };
    if let Some(text) = &existing {
        let (current, bad) = Revocations::parse(text);
        for b in &bad {
            eprintln!(
                "warning: {}: {b} (the collector skips it, and will not start with it)",
                list.display()
            );
        }
        if current.contains(&r.entry) {
            writeln!(out, "{} is already revoked in {}", r.what, list.display())?;
            return Ok(());
        }
    }
    // One write, so the collector never reads half an entry; a list not ending in a newline
    // gets one first.
    let sep = match &existing {
        Some(text) if !text.is_empty() && !text.ends_with('\n') => "\n",
        _ => "",
    };
    append(list, &format!("{sep}{comment}\n{}\n", r.entry))?;
    writeln!(out, "revoked {} in {}", r.what, list.display())?;
    writeln!(
        out,
        "a collector running with --revoked {} refuses it within a second, and ends its open \
         sessions and watch streams",
        list.display()
    )?;
    Ok(())
}

/// Appends `text` to `path`, creating it with mode 0600 if missing.
fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open the revocation list {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write the revocation list {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use mxscope_pki::{Ca, Identity, Validity};
    use std::os::unix::fs::PermissionsExt;

    fn ctl(argv: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["mxscopectl", "revoke"];
        full.extend_from_slice(argv);
        let cli = Cli::try_parse_from(&full)?;
        let Command::Revoke(a) = cli.command else {
            panic!("not revoke")
        };
        let mut out = Vec::new();
        run(&a, &mut out)?;
        Ok(String::from_utf8(out)?)
    }

    /// The entries of the list, and that it has no bad lines.
    fn read(list: &Path) -> (String, Revocations) {
        let text = std::fs::read_to_string(list).unwrap();
        let (parsed, bad) = Revocations::parse(&text);
        assert!(bad.is_empty(), "{bad:?}\n{text}");
        (text, parsed)
    }

    #[test]
    fn revoking_a_certificate_file_appends_its_serial_to_an_owner_only_list() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::create("test ca").unwrap();
        let who = Identity::Admin { name: "ops".into() };
        let issued = ca.issue(&who, Validity::default()).unwrap();
        let pem = tmp.path().join("admin.pem");
        std::fs::write(&pem, &issued.cert_pem).unwrap();
        let id = issued.cert_id().unwrap();
        let list = tmp.path().join("revoked.txt");
        let list_s = list.to_str().unwrap();

        let out = ctl(&[
            "--list",
            list_s,
            "--cert",
            pem.to_str().unwrap(),
            "--reason",
            "laptop lost",
        ])
        .unwrap();
        assert!(
            out.contains("revoked admin ops") && out.contains(&id.serial.to_string()),
            "{out}"
        );
        assert!(out.contains("within a second"), "{out}");
        let mode = std::fs::metadata(&list).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (text, parsed) = read(&list);
        assert_eq!(parsed.len(), 1);
        assert!(parsed.revoking(None, Some(&id)).is_some(), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with("# 20") && lines[0].ends_with("Z laptop lost"),
            "{text}"
        );
        assert_eq!(lines[1], format!("serial:{}", id.serial));

        // Twice: nothing added.
        let again = ctl(&["--list", list_s, "--cert", pem.to_str().unwrap()]).unwrap();
        assert!(again.contains("already revoked"), "{again}");
        assert_eq!(read(&list).0, text);

        // The other forms append below, and an existing list keeps its mode.
        std::fs::set_permissions(&list, std::fs::Permissions::from_mode(0o640)).unwrap();
        let fp = "AB:".repeat(31) + "AB";
        ctl(&["--list", list_s, "--fingerprint", &fp]).unwrap();
        ctl(&["--list", list_s, "--serial", "00:4F:1A"]).unwrap();
        ctl(&["--list", list_s, "--agent", "eu-west-1"]).unwrap();
        let (text, parsed) = read(&list);
        assert_eq!(parsed.len(), 4, "{text}");
        assert!(
            text.contains(&format!("\nsha256:{}\n", "ab".repeat(32))),
            "{text}"
        );
        assert!(
            text.contains("\nserial:4f1a\n") && text.ends_with("\neu-west-1\n"),
            "{text}"
        );
        assert!(parsed.revokes_agent("eu-west-1"));
        let mode = std::fs::metadata(&list).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn a_list_without_a_final_newline_gets_one_before_the_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let list = tmp.path().join("revoked.txt");
        std::fs::write(&list, "ag-1").unwrap();
        ctl(&["--list", list.to_str().unwrap(), "--agent", "ag-2"]).unwrap();
        let (text, parsed) = read(&list);
        assert!(text.starts_with("ag-1\n# "), "{text}");
        assert!(
            parsed.revokes_agent("ag-1") && parsed.revokes_agent("ag-2"),
            "{text}"
        );
    }

    #[test]
    fn bad_input_is_refused_and_nothing_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let list = tmp.path().join("revoked.txt");
        let list_s = list.to_str().unwrap();
        // Usage errors (exit 2) with the rule in the message.
        for (argv, says) in [
            (vec!["--serial", "xyz"], "invalid serial 'xyz'"),
            (vec!["--serial", ""], "invalid serial"),
            (vec!["--fingerprint", "abcd"], "SHA-256"),
            (vec!["--agent", "Not An Id"], "invalid agent id"),
            (
                vec!["--serial", "ab", "--agent", "a1"],
                "cannot be used with",
            ),
            (vec![], "required"),
        ] {
            let mut full = vec!["mxscopectl", "revoke", "--list", list_s];
            full.extend_from_slice(&argv);
            let err = Cli::try_parse_from(&full).expect_err("usage error");
            assert_eq!(err.exit_code(), 2, "{argv:?}");
            assert!(err.to_string().contains(says), "{argv:?}: {err}");
        }
        let missing = tmp.path().join("nope.pem");
        let err = ctl(&["--list", list_s, "--cert", missing.to_str().unwrap()]).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot read the certificate"),
            "{err:#}"
        );
        let not_pem = tmp.path().join("key.pem");
        std::fs::write(
            &not_pem,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = ctl(&["--list", list_s, "--cert", not_pem.to_str().unwrap()]).unwrap_err();
        assert!(
            err.to_string().contains("no PEM block 'BEGIN CERTIFICATE'"),
            "{err:#}"
        );
        let err = ctl(&["--list", list_s, "--agent", "a1", "--reason", "x\nag-2"]).unwrap_err();
        assert!(err.to_string().contains("--reason"), "{err:#}");
        assert!(!list.exists(), "nothing written on refusal");
    }
}
