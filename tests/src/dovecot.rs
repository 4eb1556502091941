//! A private Dovecot instance (`dovecot -c FILE -F`, own base_dir/state_dir/log) with IMAP,
//! IMAPS, POP3, POP3S on chosen ports, a passwd-file user with a Maildir, and an LMTP socket.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::binaries::system_tool;
use crate::certs::CertFiles;
use crate::lab::{chown_to_user, path_str, read_tail, user_ids, write_file, Lab};
use crate::net::{free_ports, is_listening, read_greeting};
use crate::process::{Proc, Spec};
use crate::wait::wait_for;

/// The system user that owns test mailboxes (Dovecot refuses uid 0 for mail).
pub const MAIL_USER: &str = "nobody";

/// How to set up a Dovecot instance.
#[derive(Debug, Clone)]
pub struct DovecotConfig {
    pub ip: Ipv4Addr,
    /// Certificate for STARTTLS/STLS and implicit TLS; without it only plain ports run.
    pub cert: Option<CertFiles>,
    /// Test users: (login, password). Login may be `user@domain`.
    pub users: Vec<(String, String)>,
    /// Network namespace to run in (`ip netns exec`); `ip` is then an address of that namespace
    /// and fixed [`DovecotConfig::ports`] are needed.
    pub netns: Option<String>,
    /// Fixed ports instead of free ones (e.g. the real 143 and 993 inside a lab namespace).
    pub ports: Option<DovecotPorts>,
}

impl DovecotConfig {
    pub fn new(ip: Ipv4Addr) -> Self {
        DovecotConfig {
            ip,
            cert: None,
            users: vec![("alice@example.test".to_string(), "alice-secret".to_string())],
            netns: None,
            ports: None,
        }
    }

    /// Runs the instance inside network namespace `ns` on fixed `ports`.
    pub fn in_netns(mut self, ns: &str, ports: DovecotPorts) -> Self {
        self.netns = Some(ns.to_string());
        self.ports = Some(ports);
        self
    }

    pub fn cert(mut self, cert: CertFiles) -> Self {
        self.cert = Some(cert);
        self
    }
}

/// Ports of a running instance (TLS ports only with a certificate).
#[derive(Debug, Clone, Copy)]
pub struct DovecotPorts {
    pub imap: u16,
    pub pop3: u16,
    pub imaps: Option<u16>,
    pub pop3s: Option<u16>,
}

/// A running private Dovecot, stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Dovecot {
    proc: Proc,
    dir: PathBuf,
    ip: Ipv4Addr,
    ports: DovecotPorts,
}

impl Dovecot {
    /// Writes the instance into `<lab>/dovecot-<name>`, starts it in the foreground and waits
    /// for the `* OK` / `+OK` greetings.
    pub fn start(lab: &Lab, name: &str, cfg: DovecotConfig) -> Result<Dovecot> {
        let bin = system_tool("dovecot", "dovecot-core")?;
        let dir = lab.subdir(&format!("dovecot-{name}"))?;
        let base = lab.subdir(&format!("dovecot-{name}/run"))?;
        let state = lab.subdir(&format!("dovecot-{name}/state"))?;
        let mail = lab.subdir(&format!("dovecot-{name}/mail"))?;
        chown_to_user(&mail, MAIL_USER)?;
        let (uid, gid) = user_ids(MAIL_USER)?;
        let ports = match cfg.ports {
            Some(ports) => ports,
            None if cfg.netns.is_some() => {
                bail!("a dovecot in a network namespace needs fixed ports")
            }
            None => {
                let [imap, pop3, imaps, pop3s] = free_ports::<4>(cfg.ip)?;
                let tls = cfg.cert.is_some();
                DovecotPorts {
                    imap,
                    pop3,
                    imaps: tls.then_some(imaps),
                    pop3s: tls.then_some(pop3s),
                }
            }
        };
        let passwd = dir.join("passwd");
        let mut users = String::new();
        for (login, password) in &cfg.users {
            let home = mail.join(login);
            users += &format!(
                "{login}:{{PLAIN}}{password}:{uid}:{gid}::{}\n",
                path_str(&home)?
            );
        }
        write_file(&passwd, users)?;
        let conf = dir.join("dovecot.conf");
        write_file(
            &conf,
            render_config(&cfg, &ports, &dir, &base, &state, &passwd, lab.run_id())?,
        )?;
        let mut spec = Spec::new("dovecot", &bin).args(["-F", "-c", &path_str(&conf)?]);
        if let Some(ns) = &cfg.netns {
            spec = spec.in_netns(ns.as_str());
        }
        let proc = Proc::spawn(spec, &dir)?;
        let mut dv = Dovecot {
            proc,
            dir,
            ip: cfg.ip,
            ports,
        };
        dv.wait_ready(ports.imap, "* OK")?;
        dv.wait_ready(ports.pop3, "+OK")?;
        for port in [ports.imaps, ports.pop3s].into_iter().flatten() {
            dv.wait_ready(port, "")?;
        }
        Ok(dv)
    }

    fn wait_ready(&mut self, port: u16, greeting: &str) -> Result<()> {
        let addr = SocketAddr::from((self.ip, port));
        let log = self.dir.join("dovecot.log");
        let proc = &mut self.proc;
        wait_for(
            &format!("dovecot greeting `{greeting}` on {addr}"),
            Duration::from_secs(30),
            || {
                if !proc.is_running() {
                    bail!(
                        "dovecot exited during startup ({:?}):\n{}\n{}",
                        proc.exit_status(),
                        proc.log_tail(30),
                        read_tail(&log)
                    );
                }
                if greeting.is_empty() {
                    // Implicit-TLS port: accepting is enough here (lab_smoke checks TLS).
                    return Ok(is_listening(addr).then_some(()));
                }
                Ok(read_greeting(addr, Duration::from_secs(2))
                    .ok()
                    .filter(|l| l.starts_with(greeting))
                    .map(|_| ()))
            },
        )
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn ports(&self) -> DovecotPorts {
        self.ports
    }

    pub fn imap_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.ports.imap))
    }

    pub fn pop3_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.ports.pop3))
    }

    pub fn imaps_addr(&self) -> Option<SocketAddr> {
        self.ports.imaps.map(|p| SocketAddr::from((self.ip, p)))
    }

    pub fn pop3s_addr(&self) -> Option<SocketAddr> {
        self.ports.pop3s.map(|p| SocketAddr::from((self.ip, p)))
    }

    /// Unix socket Postfix can deliver to (`lmtp:unix:PATH`).
    pub fn lmtp_socket(&self) -> PathBuf {
        self.dir.join("run/lmtp")
    }

    /// Unix socket for Postfix SASL (`smtpd_sasl_type = dovecot`).
    pub fn auth_socket(&self) -> PathBuf {
        self.dir.join("run/auth-postfix")
    }

    /// Maildir of a test user.
    pub fn maildir(&self, login: &str) -> PathBuf {
        self.dir.join("mail").join(login).join("Maildir")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_tail(&self) -> String {
        read_tail(&self.dir.join("dovecot.log"))
    }

    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

fn render_config(
    cfg: &DovecotConfig,
    ports: &DovecotPorts,
    dir: &Path,
    base: &Path,
    state: &Path,
    passwd: &Path,
    run_id: &str,
) -> Result<String> {
    let (uid, _) = user_ids(MAIL_USER)?;
    let passwd = path_str(passwd)?;
    let mut c = format!(
        "protocols = imap pop3 lmtp\n\
         listen = {ip}\n\
         base_dir = {base}\n\
         state_dir = {state}\n\
         instance_name = mxscope-{run_id}\n\
         log_path = {log}\n\
         auth_mechanisms = plain login\n\
         disable_plaintext_auth = yes\n\
         first_valid_uid = {uid}\n\
         last_valid_uid = {uid}\n\
         mail_location = maildir:~/Maildir\n\
         passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN {passwd}\n}}\n\
         userdb {{\n  driver = passwd-file\n  args = {passwd}\n}}\n\
         service lmtp {{\n  unix_listener lmtp {{\n    mode = 0666\n  }}\n}}\n\
         service auth {{\n  unix_listener auth-postfix {{\n    mode = 0666\n  }}\n}}\n",
        ip = cfg.ip,
        base = path_str(base)?,
        state = path_str(state)?,
        log = path_str(&dir.join("dovecot.log"))?,
    );
    match &cfg.cert {
        Some(cert) => {
            c += &format!(
                "ssl = yes\nssl_cert = <{}\nssl_key = <{}\n",
                path_str(&cert.cert)?,
                path_str(&cert.key)?
            );
        }
        None => c += "ssl = no\n",
    }
    let listener = |name: &str, port: Option<u16>, ssl: bool| -> String {
        match port {
            Some(port) => format!(
                "  inet_listener {name} {{\n    port = {port}\n    ssl = {}\n  }}\n",
                if ssl { "yes" } else { "no" }
            ),
            // Port 0 disables a default listener.
            None => format!("  inet_listener {name} {{\n    port = 0\n  }}\n"),
        }
    };
    c += &format!(
        "service imap-login {{\n{}{}}}\n",
        listener("imap", Some(ports.imap), false),
        listener("imaps", ports.imaps, true)
    );
    c += &format!(
        "service pop3-login {{\n{}{}}}\n",
        listener("pop3", Some(ports.pop3), false),
        listener("pop3s", ports.pop3s, true)
    );
    Ok(c)
}
