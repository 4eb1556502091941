//! Certificate commands that work offline on the CA directory: `ca init` (CA and collector server
//! certificate), `enroll` (an agent certificate carrying id and region) and `admin-cert` (ctl;
//! admin certificates live 30 days unless `--days` says otherwise).
//! Private keys are written with mode 0600 and nothing is ever overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use mxscope_pki::{write_private, Ca, Identity, Issued, Validity};

use crate::cli::Command;

/// `mxscopectl ca …`.
#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Create a CA (DIR/ca.pem, DIR/ca.key) and the collector's server certificate
    /// (DIR/collector.pem, DIR/collector.key).
    Init(CaInitArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CaInitArgs {
    /// Directory to create the CA in (refuses to overwrite).
    pub dir: PathBuf,
    /// DNS name or IP address agents and ctl use to reach the collector (repeatable;
    /// default localhost and 127.0.0.1).
    #[arg(long = "server-name")]
    pub server_names: Vec<String>,
}

/// Where the CA is and how long certificates live.
#[derive(Debug, Args)]
pub(crate) struct IssueArgs {
    /// CA directory (from `mxscopectl ca init`).
    #[arg(long, env = "MXSCOPE_CA_DIR", default_value = "./mxscope-ca")]
    pub ca: PathBuf,
    /// Directory to write the certificate, its key and ca.pem to.
    #[arg(long)]
    pub out: PathBuf,
    /// Days the certificate is valid [default: 30 for admin certificates, 825 for agents and
    /// --read-only].
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..=3650))]
    pub days: Option<i64>,
    /// Start of validity, in days before now (tests use it to make expired certificates).
    #[arg(long, default_value_t = 1, hide = true, allow_negative_numbers = true)]
    pub valid_from_days_ago: i64,
}

impl IssueArgs {
    /// The validity asked for, or the default for `who` (short for admins).
    fn validity(&self, who: &Identity) -> Validity {
        Validity {
            from_days_ago: self.valid_from_days_ago,
            days: self.days.unwrap_or(Validity::default_for(who).days),
        }
    }
}

/// `mxscopectl enroll`.
#[derive(Debug, Args)]
pub(crate) struct EnrollArgs {
    /// Agent id (the collector attributes results to it).
    #[arg(long)]
    pub id: String,
    /// Region the agent probes from (bound into the certificate).
    #[arg(long)]
    pub region: String,
    #[command(flatten)]
    pub issue: IssueArgs,
}

/// `mxscopectl admin-cert`.
#[derive(Debug, Args)]
pub(crate) struct AdminCertArgs {
    /// Name of the person or tool the certificate is for.
    #[arg(long)]
    pub name: String,
    /// Only reading (status, results, …); target changes are refused.
    #[arg(long)]
    pub read_only: bool,
    #[command(flatten)]
    pub issue: IssueArgs,
}

/// Runs a certificate command (no collector connection).
pub(crate) fn run(cmd: Command, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        Command::Ca(CaCommand::Init(a)) => ca_init(&a, out),
        Command::Enroll(a) => {
            let who = Identity::Agent {
                id: a.id.clone(),
                region: a.region.clone(),
            };
            let (files, issued) = issue(&a.issue, &who, "agent")?;
            writeln!(out, "enrolled agent {} in region {}", a.id, a.region)?;
            describe(&issued, &a.issue, &who, out)?;
            writeln!(
                out,
                "run it with: mxscope-agent --id {} --region {} --tls-cert {} --tls-key {} \
                 --collector-ca {} --collector https://COLLECTOR:7443",
                a.id,
                a.region,
                files[0].display(),
                files[1].display(),
                files[2].display()
            )?;
            Ok(())
        }
        Command::AdminCert(a) => {
            let who = if a.read_only {
                Identity::Reader {
                    name: a.name.clone(),
                }
            } else {
                Identity::Admin {
                    name: a.name.clone(),
                }
            };
            let (files, issued) = issue(&a.issue, &who, "admin")?;
            writeln!(out, "issued a certificate for {who}")?;
            describe(&issued, &a.issue, &who, out)?;
            writeln!(
                out,
                "use it with: mxscopectl --collector https://COLLECTOR:7443 --tls-cert {} \
                 --tls-key {} --ca-file {} status",
                files[0].display(),
                files[1].display(),
                files[2].display()
            )?;
            Ok(())
        }
        other => bail!("not a certificate command: {other:?}"),
    }
}

fn refuse_existing(paths: &[&Path]) -> anyhow::Result<()> {
    for p in paths {
        if p.exists() {
            bail!(
                "{} already exists: refusing to overwrite (pick another directory or remove it)",
                p.display()
            );
        }
    }
    Ok(())
}

fn ca_init(a: &CaInitArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let names = if a.server_names.is_empty() {
        vec!["localhost".to_string(), "127.0.0.1".to_string()]
    } else {
        a.server_names.clone()
    };
    let dir = &a.dir;
    let files = ["ca.pem", "ca.key", "collector.pem", "collector.key"].map(|f| dir.join(f));
    refuse_existing(&files.iter().map(PathBuf::as_path).collect::<Vec<_>>())?;
    let ca = Ca::create("mxscope CA").context("creating the CA")?;
    let server = ca
        .issue_server(&names, Validity::default())
        .context("issuing the collector's server certificate")?;
    ca.save(dir)?;
    write_pair(dir, "collector", &server)?;
    writeln!(
        out,
        "created CA {} and the collector certificate for {}",
        dir.display(),
        names.join(", ")
    )?;
    writeln!(
        out,
        "run the collector with: mxscope-collector --tls-cert {} --tls-key {} --client-ca {}",
        files[2].display(),
        files[3].display(),
        files[0].display()
    )?;
    Ok(())
}

/// Writes `<stem>.pem` and `<stem>.key` (0600) into `dir`, refusing to overwrite.
fn write_pair(dir: &Path, stem: &str, issued: &Issued) -> anyhow::Result<[PathBuf; 2]> {
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    refuse_existing(&[&cert, &key])?;
    write_private(&key, &issued.key_pem)?;
    std::fs::write(&cert, &issued.cert_pem)
        .with_context(|| format!("cannot write {}", cert.display()))?;
    Ok([cert, key])
}

/// Prints a new certificate's serial (what `mxscopectl revoke` names) and expiry.
fn describe(
    issued: &Issued,
    args: &IssueArgs,
    who: &Identity,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let id = issued.cert_id()?;
    let days = args.validity(who).days;
    writeln!(out, "serial {}", id.serial)?;
    write!(out, "valid until {} ({days} days", issued.expires())?;
    if args.days.is_none() && matches!(who, Identity::Admin { .. }) {
        write!(out, ", the admin default; --days N for another")?;
    }
    writeln!(out, ")")?;
    Ok(())
}

/// Issues a client certificate from the CA in `args.ca` into `args.out`: `<stem>.pem`,
/// `<stem>.key` and `ca.pem`. Returns the three paths and the certificate.
fn issue(args: &IssueArgs, who: &Identity, stem: &str) -> anyhow::Result<([PathBuf; 3], Issued)> {
    let ca = Ca::load(&args.ca).with_context(|| {
        format!(
            "cannot load the CA from {} (create one with 'mxscopectl ca init DIR', point --ca \
             or MXSCOPE_CA_DIR at it)",
            args.ca.display()
        )
    })?;
    let issued = ca.issue(who, args.validity(who))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let ca_pem = args.out.join("ca.pem");
    let ca_cert = ca.cert_pem();
    match std::fs::read_to_string(&ca_pem) {
        Ok(existing) if existing != ca_cert => bail!(
            "{} holds another CA: refusing to overwrite (pick another --out)",
            ca_pem.display()
        ),
        Ok(_) => {}
        Err(_) => {
            refuse_existing(&[&args.out.join(format!("{stem}.pem"))])?;
        }
    }
    let [cert, key] = write_pair(&args.out, stem, &issued)?;
    if !ca_pem.exists() {
        std::fs::write(&ca_pem, &ca_cert)
            .with_context(|| format!("cannot write {}", ca_pem.display()))?;
    }
    Ok(([cert, key, ca_pem], issued))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;
    use std::os::unix::fs::PermissionsExt;

    fn ctl(argv: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["mxscopectl"];
        full.extend_from_slice(argv);
        let cli = Cli::try_parse_from(&full)?;
        let mut out = Vec::new();
        run(cli.command, &mut out)?;
        Ok(String::from_utf8(out)?)
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn ca_init_enroll_and_admin_cert() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        let ca_s = ca.to_str().unwrap();
        let out = ctl(&["ca", "init", ca_s]).unwrap();
        assert!(out.contains("localhost, 127.0.0.1"), "{out}");
        assert_eq!(mode(&ca.join("ca.key")), 0o600);
        assert_eq!(mode(&ca.join("collector.key")), 0o600);
        let again = ctl(&["ca", "init", ca_s]).unwrap_err().to_string();
        assert!(again.contains("refusing to overwrite"), "{again}");

        let agent = tmp.path().join("agent");
        let agent_s = agent.to_str().unwrap();
        ctl(&[
            "enroll", "--id", "ag-1", "--region", "eu-west", "--out", agent_s, "--ca", ca_s,
        ])
        .unwrap();
        assert_eq!(mode(&agent.join("agent.key")), 0o600);
        let pem = std::fs::read_to_string(agent.join("agent.pem")).unwrap();
        let der = rustls_pemfile_der(&pem);
        assert_eq!(
            mxscope_pki::identity_of(&der),
            Some(Identity::Agent {
                id: "ag-1".into(),
                region: "eu-west".into()
            })
        );
        let twice = ctl(&[
            "enroll", "--id", "ag-1", "--region", "eu-west", "--out", agent_s, "--ca", ca_s,
        ])
        .unwrap_err()
        .to_string();
        assert!(twice.contains("refusing to overwrite"), "{twice}");

        let reader = tmp.path().join("reader");
        ctl(&[
            "admin-cert",
            "--name",
            "dash",
            "--read-only",
            "--out",
            reader.to_str().unwrap(),
            "--ca",
            ca_s,
        ])
        .unwrap();
        let pem = std::fs::read_to_string(reader.join("admin.pem")).unwrap();
        assert_eq!(
            mxscope_pki::identity_of(&rustls_pemfile_der(&pem)),
            Some(Identity::Reader {
                name: "dash".into()
            })
        );
        let missing = ctl(&[
            "admin-cert",
            "--name",
            "x",
            "--out",
            tmp.path().join("x").to_str().unwrap(),
            "--ca",
            tmp.path().join("nope").to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(
            format!("{missing:#}").contains("mxscopectl ca init"),
            "{missing:#}"
        );
    }

    #[test]
    fn admin_certificates_default_to_30_days_and_say_when_they_expire() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        let ca_s = ca.to_str().unwrap();
        ctl(&["ca", "init", ca_s]).unwrap();
        // Issued from a day ago (so clocks a little behind still accept it): 29 days from now.
        let date_in = |days: u64| {
            let t = std::time::SystemTime::now() + std::time::Duration::from_secs(days * 86_400);
            humantime::format_rfc3339_seconds(t).to_string()[..10].to_string()
        };
        let issue = |name: &str, extra: &[&str]| {
            let out_dir = tmp.path().join(name);
            let mut argv = vec!["admin-cert", "--name", name, "--ca", ca_s];
            argv.extend(["--out", out_dir.to_str().unwrap()]);
            argv.extend_from_slice(extra);
            let (before, out, after) = (date_in(0), ctl(&argv).unwrap(), date_in(0));
            assert_eq!(before, after, "the test ran across midnight");
            let pem = std::fs::read_to_string(out_dir.join("admin.pem")).unwrap();
            (out, pem)
        };
        let (out, pem) = issue("ops", &[]);
        assert!(
            out.contains(&format!("valid until {}", date_in(29))) && out.contains("(30 days"),
            "{out}"
        );
        let serial = mxscope_pki::read_cert_pem(&pem, "admin.pem")
            .unwrap()
            .1
            .serial;
        assert!(out.contains(&format!("serial {serial}")), "{out}");
        let valid = |out: &str, days: u64| {
            out.contains(&format!("valid until {} ", date_in(days - 1)))
                && out.contains(&format!(" UTC ({days} days)"))
        };
        let (out, _) = issue("ops-long", &["--days", "90"]);
        assert!(valid(&out, 90), "{out}");
        let (out, _) = issue("dash", &["--read-only"]);
        assert!(valid(&out, 825), "{out}");
        let agent = tmp.path().join("agent");
        let out = ctl(&[
            "enroll",
            "--id",
            "ag-1",
            "--region",
            "eu",
            "--ca",
            ca_s,
            "--out",
            agent.to_str().unwrap(),
        ])
        .unwrap();
        assert!(valid(&out, 825), "{out}");
    }

    /// The DER of the first certificate in a PEM text.
    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        let mut r = pem.as_bytes();
        let der = rustls_pemfile::certs(&mut r)
            .next()
            .expect("a certificate")
            .expect("valid PEM");
        der.to_vec()
    }
}
