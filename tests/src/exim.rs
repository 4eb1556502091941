//! A private Exim 4 (Debian's `exim4-daemon-light`, unpacked, see [`crate::debroot`]): its own
//! config (`exim4 -C FILE`), spool, logs and the sender's Maildir in `<lab>/exim-<name>`, listening
//! on one loopback address and port, running in the foreground (`-bdf -q1s`) as our own PID.
//!
//! What it takes (Exim 4.96, as root): the compiled-in user `Debian-exim` must exist before the
//! config is read; `exim_path` must point at the unpacked binary (the daemon re-executes itself
//! for queue runs); a `-C` config makes Exim drop root privilege ("exim user lost privilege"),
//! which is fine since every delivery runs as `Debian-exim`; Maildir paths must not come from
//! `$local_part` (tainted data); `host_lookup` and `rfc1413_hosts` are emptied so Exim never asks
//! the resolver, and routes name IP literals.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::debroot;
use crate::lab::{chown_to_user, path_str, read_tail, write_file, Lab};
use crate::net::free_port;
use crate::process::{Proc, Spec};

/// The Debian packages unpacked for Exim.
pub const PACKAGES: &[&str] = &["exim4-daemon-light"];
/// Its compiled-in user.
pub const USER: &str = "Debian-exim";

/// How to set up the instance.
#[derive(Debug, Clone)]
pub struct EximConfig {
    pub ip: Ipv4Addr,
    /// `primary_hostname`, the Reporting-MTA of its DSNs.
    pub hostname: String,
    /// The local domain; mail to `sender@<domain>` (bounces included) lands in
    /// [`Exim::maildir`], any other local part is unrouteable.
    pub domain: String,
    /// Mail for a domain goes by SMTP to an address and port (IP literals, no DNS).
    pub routes: Vec<(String, SocketAddr)>,
    /// The retry rule for every domain, e.g. `F,12s,2s`: retry every 2 s, give up after 12 s.
    pub retry: String,
    /// `delay_warning`, e.g. `4s:1h` (one warning after 4 s).
    pub delay_warning: String,
}

/// A running Exim daemon; SIGTERM (then SIGKILL) to its PID on drop.
#[derive(Debug)]
pub struct Exim {
    proc: Proc,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Exim {
    pub fn start(lab: &Lab, name: &str, cfg: EximConfig) -> Result<Exim> {
        debroot::ensure_system_user(USER)?;
        let root = debroot::unpack(lab, &format!("exim-{name}/root"), PACKAGES)?;
        let bin = root.join("usr/sbin/exim4");
        if !bin.is_file() {
            bail!("{} is missing after unpacking {PACKAGES:?}", bin.display());
        }
        debroot::check_libraries(&bin, "libidn12 libgnutls-dane0")?;
        let dir = lab.path().join(format!("exim-{name}"));
        for sub in ["spool", "log", "mail"] {
            chown_to_user(&lab.subdir(&format!("exim-{name}/{sub}"))?, USER)?;
        }
        let addr = SocketAddr::from((cfg.ip, free_port(cfg.ip)?));
        let conf = dir.join("exim.conf");
        write_file(&conf, render_config(&cfg, &dir, &bin, addr)?)?;
        let spec = Spec::new(format!("exim-{name}"), &bin).args([
            "-C".to_string(),
            path_str(&conf)?,
            "-bdf".into(),
            "-q1s".into(),
        ]);
        let mut proc = Proc::spawn(spec, &dir)?;
        if let Err(e) = proc.wait_listening(addr, Duration::from_secs(20)) {
            bail!(
                "{e:#}\nexim mainlog:\n{}",
                read_tail(&dir.join("log/mainlog"))
            );
        }
        Ok(Exim { proc, dir, addr })
    }

    pub fn smtp_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The Maildir of `sender@<domain>`, where its bounces land.
    pub fn maildir(&self) -> PathBuf {
        self.dir.join("mail/sender/Maildir")
    }

    /// The tail of the main log and the panic log, for failure messages.
    pub fn log_tail(&self) -> String {
        format!(
            "{}\n{}\n{}",
            read_tail(&self.dir.join("log/mainlog")),
            read_tail(&self.dir.join("log/paniclog")),
            self.proc.log_tail(20)
        )
    }
}

fn render_config(cfg: &EximConfig, dir: &Path, bin: &Path, addr: SocketAddr) -> Result<String> {
    let d = path_str(dir)?;
    let mut routers = String::new();
    let mut transports = String::new();
    for (i, (domain, to)) in cfg.routes.iter().enumerate() {
        routers += &format!(
            "route{i}:\n  driver = manualroute\n  domains = {domain}\n  \
             route_list = * {ip}\n  transport = smtp{i}\n  self = send\n",
            ip = to.ip()
        );
        transports += &format!(
            "smtp{i}:\n  driver = smtp\n  port = {port}\n  allow_localhost\n  hosts_max_try = 1\n",
            port = to.port()
        );
    }
    Ok(format!(
        "exim_path = {bin}\n\
         keep_environment =\n\
         tls_advertise_hosts =\n\
         primary_hostname = {host}\n\
         qualify_domain = {domain}\n\
         domainlist local_domains = {domain}\n\
         exim_user = {USER}\n\
         exim_group = {USER}\n\
         spool_directory = {d}/spool\n\
         log_file_path = {d}/log/%slog\n\
         pid_file_path = {d}/exim.pid\n\
         local_interfaces = <; {ip}.{port}\n\
         host_lookup =\n\
         rfc1413_hosts =\n\
         disable_ipv6 = true\n\
         acl_smtp_rcpt = acl_check_rcpt\n\
         delay_warning = {warn}\n\
         timeout_frozen_after = 5m\n\
         \n\
         begin acl\n\
         acl_check_rcpt:\n  accept\n\
         \n\
         begin routers\n\
         {routers}\
         local_sender:\n  driver = accept\n  domains = +local_domains\n  local_parts = sender\n  \
         transport = maildir\n\
         \n\
         begin transports\n\
         {transports}\
         maildir:\n  driver = appendfile\n  directory = {d}/mail/sender/Maildir\n  maildir_format\n  \
         create_directory\n  user = {USER}\n  group = {USER}\n  envelope_to_add\n  return_path_add\n\
         \n\
         begin retry\n\
         * * {retry}\n\
         \n\
         begin rewrite\n",
        bin = path_str(bin)?,
        host = cfg.hostname,
        domain = cfg.domain,
        ip = addr.ip(),
        port = addr.port(),
        warn = cfg.delay_warning,
        retry = cfg.retry,
    ))
}
