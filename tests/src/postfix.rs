//! A private Postfix instance: main.cf/master.cf written into `<lab>/postfix-<name>/etc`, its own
//! queue and data directories, started with `postfix -c DIR start`; never the system instance.
//!
//! What it takes (Postfix 3.7, as root): no `alternate_config_directories` entry is needed;
//! `inet_interfaces` must name an address that is configured on an interface, so it stays
//! `127.0.0.1` and each smtpd service binds its own `ADDR:PORT` in master.cf; `data_directory`
//! must be owned by `postfix`; `maillog_file` (with `maillog_file_prefixes` allowing the
//! instance dir and a `postlog` service) replaces the absent syslog.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::binaries::system_tool;
use crate::certs::CertFiles;
use crate::lab::{chown_to_user, path_str, read_tail, write_file, Lab};
use crate::net::{free_ports, read_greeting};
use crate::process::{pid_alive, send_signal};
use crate::wait::{wait_for, wait_until};

/// How to set up a Postfix instance.
#[derive(Debug, Clone)]
pub struct PostfixConfig {
    /// Loopback address all services bind.
    pub ip: Ipv4Addr,
    /// More addresses the plain SMTP service (port-25 role) also binds, e.g. the addresses of
    /// several MX hosts served by one instance in the lab.
    pub extra_smtp_ips: Vec<Ipv4Addr>,
    /// `myhostname`, shown in the banner.
    pub hostname: String,
    /// Certificate for STARTTLS and implicit TLS; without it STARTTLS is not offered.
    pub cert: Option<CertFiles>,
    /// Deliver mail for this domain over LMTP to this socket (e.g. Dovecot's).
    pub lmtp: Option<(String, PathBuf)>,
    /// Dovecot auth socket for SASL AUTH on submission/smtps (offered only after TLS).
    pub sasl_socket: Option<PathBuf>,
    /// Submission offers AUTH before TLS too (`smtpd_tls_auth_only = no`): the lax setup a
    /// probe warns about.
    pub auth_before_tls: bool,
    /// Extra `main.cf` lines, written last (so they win over the defaults above them).
    pub extra_main_cf: Vec<String>,
    /// Network namespace to start the instance in (`ip netns exec`); `ip` is then an address of
    /// that namespace, and fixed [`PostfixConfig::ports`] are needed (free ports cannot be
    /// picked from outside it).
    pub netns: Option<String>,
    /// Fixed ports instead of free ones (e.g. the real 25 and 587 inside a lab namespace).
    pub ports: Option<PostfixPorts>,
}

impl PostfixConfig {
    pub fn new(ip: Ipv4Addr, hostname: &str) -> Self {
        PostfixConfig {
            ip,
            extra_smtp_ips: Vec::new(),
            hostname: hostname.to_string(),
            cert: None,
            lmtp: None,
            sasl_socket: None,
            auth_before_tls: false,
            extra_main_cf: Vec::new(),
            netns: None,
            ports: None,
        }
    }

    /// Starts the instance inside network namespace `ns` on fixed `ports`.
    pub fn in_netns(mut self, ns: &str, ports: PostfixPorts) -> Self {
        self.netns = Some(ns.to_string());
        self.ports = Some(ports);
        self
    }

    /// The SMTP service also listens on `ips` (same port as on [`PostfixConfig::ip`]).
    pub fn smtp_also_on(mut self, ips: &[Ipv4Addr]) -> Self {
        self.extra_smtp_ips.extend_from_slice(ips);
        self
    }

    pub fn cert(mut self, cert: CertFiles) -> Self {
        self.cert = Some(cert);
        self
    }
}

/// Ports of a running instance.
#[derive(Debug, Clone, Copy)]
pub struct PostfixPorts {
    /// Plain SMTP with STARTTLS (port-25 role).
    pub smtp: u16,
    /// Submission with STARTTLS (port-587 role).
    pub submission: u16,
    /// Implicit TLS (port-465 role); only when a certificate is configured.
    pub smtps: Option<u16>,
}

/// A running private Postfix; `postfix -c DIR stop` (then SIGKILL of its master) on drop.
#[derive(Debug)]
pub struct Postfix {
    postfix_bin: PathBuf,
    dir: PathBuf,
    config_dir: PathBuf,
    ip: Ipv4Addr,
    ports: PostfixPorts,
    netns: Option<String>,
    stopped: bool,
}

impl Postfix {
    /// Writes the instance into `<lab>/postfix-<name>`, starts it and waits for the `220`
    /// banner on every service port.
    pub fn start(lab: &Lab, name: &str, cfg: PostfixConfig) -> Result<Postfix> {
        let postfix_bin = system_tool("postfix", "postfix")?;
        let dir = lab.subdir(&format!("postfix-{name}"))?;
        let config_dir = lab.subdir(&format!("postfix-{name}/etc"))?;
        let queue = lab.subdir(&format!("postfix-{name}/queue"))?;
        let data = lab.subdir(&format!("postfix-{name}/data"))?;
        chown_to_user(&data, "postfix")?;
        let ports = match cfg.ports {
            Some(ports) => ports,
            None if cfg.netns.is_some() => {
                bail!("a postfix in a network namespace needs fixed ports")
            }
            None => {
                let [smtp, submission, smtps] = free_ports::<3>(cfg.ip)?;
                PostfixPorts {
                    smtp,
                    submission,
                    smtps: cfg.cert.is_some().then_some(smtps),
                }
            }
        };
        write_file(
            &config_dir.join("main.cf"),
            main_cf(&cfg, &dir, &queue, &data, lab.run_id())?,
        )?;
        write_file(&config_dir.join("master.cf"), master_cf(&cfg, &ports))?;
        let pf = Postfix {
            postfix_bin,
            dir,
            config_dir,
            ip: cfg.ip,
            ports,
            netns: cfg.netns.clone(),
            stopped: false,
        };
        pf.postfix_cmd("start")?;
        for port in [Some(ports.smtp), Some(ports.submission), ports.smtps]
            .into_iter()
            .flatten()
        {
            let addr = SocketAddr::from((cfg.ip, port));
            let tls = Some(port) == ports.smtps;
            pf.wait_ready(addr, tls)?;
        }
        for ip in &cfg.extra_smtp_ips {
            pf.wait_ready(SocketAddr::from((*ip, ports.smtp)), false)?;
        }
        Ok(pf)
    }

    fn wait_ready(&self, addr: SocketAddr, implicit_tls: bool) -> Result<()> {
        let what = format!("postfix banner 220 on {addr}");
        let res = wait_for(&what, Duration::from_secs(30), || {
            if implicit_tls {
                // A TLS port answers no plain banner; a completed TCP accept is enough here,
                // lab_smoke checks the TLS greeting with openssl.
                return Ok(crate::net::is_listening(addr).then_some(()));
            }
            let greeting = match &self.netns {
                // from inside the namespace: its addresses need not be routed to from here
                Some(ns) => crate::netns::in_netns(ns, move || {
                    read_greeting(addr, Duration::from_secs(2)).ok()
                })?,
                None => read_greeting(addr, Duration::from_secs(2)).ok(),
            };
            Ok(greeting.filter(|l| l.starts_with("220")).map(|_| ()))
        });
        res.with_context(|| format!("postfix maillog:\n{}", self.maillog_tail()))
    }

    fn postfix_cmd(&self, action: &str) -> Result<()> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = std::process::Command::new(system_tool("ip", "iproute2")?);
                c.args(["netns", "exec", ns.as_str()])
                    .arg(&self.postfix_bin);
                c
            }
            None => std::process::Command::new(&self.postfix_bin),
        };
        let out = cmd
            .arg("-c")
            .arg(&self.config_dir)
            .arg(action)
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("run postfix -c {} {action}", self.config_dir.display()))?;
        if !out.status.success() {
            bail!(
                "postfix -c {} {action} failed ({}): {}{}\nmaillog:\n{}",
                self.config_dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.maillog_tail()
            );
        }
        Ok(())
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn ports(&self) -> PostfixPorts {
        self.ports
    }

    pub fn smtp_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.ports.smtp))
    }

    pub fn submission_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.ports.submission))
    }

    pub fn smtps_addr(&self) -> Option<SocketAddr> {
        self.ports.smtps.map(|p| SocketAddr::from((self.ip, p)))
    }

    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    pub fn maillog_path(&self) -> PathBuf {
        self.dir.join("maillog")
    }

    pub fn maillog_tail(&self) -> String {
        read_tail(&self.maillog_path())
    }

    /// PID of the master process, from its pid file.
    pub fn master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("queue/pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops the instance: `postfix -c DIR stop`, falling back to SIGKILL of our master PID.
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let pid = self.master_pid();
        let stop = self.postfix_cmd("stop");
        if let Some(pid) = pid {
            let gone = wait_until("postfix master to exit", Duration::from_secs(15), || {
                !pid_alive(pid)
            });
            if gone.is_err() {
                send_signal(pid, libc::SIGKILL)?;
            }
        }
        stop
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn main_cf(
    cfg: &PostfixConfig,
    dir: &Path,
    queue: &Path,
    data: &Path,
    run_id: &str,
) -> Result<String> {
    let mut lines = vec![
        "compatibility_level = 3.6".to_string(),
        format!("myhostname = {}", cfg.hostname),
        "mydomain = mxscope.test".to_string(),
        "myorigin = $myhostname".to_string(),
        "mydestination =".to_string(),
        "inet_interfaces = 127.0.0.1".to_string(),
        "inet_protocols = ipv4".to_string(),
        "mynetworks = 127.0.0.0/8".to_string(),
        format!("queue_directory = {}", path_str(queue)?),
        format!("data_directory = {}", path_str(data)?),
        format!("maillog_file = {}", path_str(&dir.join("maillog"))?),
        format!("maillog_file_prefixes = {}", path_str(dir)?),
        format!("syslog_name = postfix-mxscope-{run_id}"),
        "mail_owner = postfix".to_string(),
        "setgid_group = postdrop".to_string(),
        "alias_maps =".to_string(),
        "alias_database =".to_string(),
        "local_recipient_maps =".to_string(),
        "biff = no".to_string(),
        "smtpd_banner = $myhostname ESMTP mxscope-lab".to_string(),
        "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination".to_string(),
        "smtp_dns_support_level = disabled".to_string(),
        "smtpd_tls_loglevel = 1".to_string(),
    ];
    if let Some(cert) = &cfg.cert {
        lines.push("smtpd_tls_security_level = may".to_string());
        lines.push(format!("smtpd_tls_cert_file = {}", path_str(&cert.cert)?));
        lines.push(format!("smtpd_tls_key_file = {}", path_str(&cert.key)?));
    } else {
        lines.push("smtpd_tls_security_level = none".to_string());
    }
    if let Some((domain, socket)) = &cfg.lmtp {
        lines.push(format!("virtual_mailbox_domains = {domain}"));
        lines.push(format!(
            "virtual_transport = lmtp:unix:{}",
            path_str(socket)?
        ));
    }
    lines.extend(cfg.extra_main_cf.iter().cloned());
    Ok(lines.join("\n") + "\n")
}

fn master_cf(cfg: &PostfixConfig, ports: &PostfixPorts) -> String {
    let ip = cfg.ip;
    let mut m = format!("{ip}:{} inet n - n - - smtpd\n", ports.smtp);
    for extra in &cfg.extra_smtp_ips {
        m += &format!("{extra}:{} inet n - n - - smtpd\n", ports.smtp);
    }
    let sasl = cfg.sasl_socket.as_ref().map(|s| {
        format!(
            "  -o smtpd_sasl_auth_enable=yes\n  -o smtpd_sasl_type=dovecot\n  -o smtpd_sasl_path={}\n",
            s.display()
        )
    });
    m += &format!(
        "{ip}:{} inet n - n - - smtpd\n  -o syslog_name=postfix/submission\n  -o smtpd_tls_auth_only={}\n{}",
        ports.submission,
        if cfg.auth_before_tls { "no" } else { "yes" },
        sasl.clone().unwrap_or_default()
    );
    if let Some(port) = ports.smtps {
        m += &format!(
            "{ip}:{port} inet n - n - - smtpd\n  -o syslog_name=postfix/smtps\n  -o smtpd_tls_wrappermode=yes\n{}",
            sasl.unwrap_or_default()
        );
    }
    m += MASTER_CF_INTERNAL;
    m
}

/// The internal services, all outside chroot (the instance lives in a temp dir).
const MASTER_CF_INTERNAL: &str = "\
postlog   unix-dgram n - n - 1 postlogd
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
tlsmgr    unix - - n 1000? 1 tlsmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
local     unix - n n - - local
virtual   unix - n n - - virtual
lmtp      unix - - n - - lmtp
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
";
