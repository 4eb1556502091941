//! A private OpenSMTPD (Debian's `opensmtpd`, unpacked, see [`crate::debroot`]) that relays every
//! domain by SMTP to IP literals, in the foreground (`smtpd -d -f FILE`) as our own PID.
//!
//! What it takes (OpenSMTPD 6.8.0p2, as root): the compiled-in users `opensmtpd` and `opensmtpq`
//! must exist; the queue (`/var/spool/smtpd`), the control socket (`/var/run/smtpd.sock`) and
//! the privsep chroot (`/var/lib/opensmtpd/empty`) are fixed at build time, so smtpd runs in its
//! own mount namespace (`unshare -m --propagation private`) with `<lab>/opensmtpd-<name>/var`
//! bound over `/var` — the real `/var` never sees it. It looks up the reverse name of every
//! client, so it must run in a network namespace whose resolver stays inside it ([`crate::netns`]).
//! A refused connection disables the route to that *address* (any port) for a while, so a closed
//! port used for refusals needs an address of its own.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::binaries::system_tool;
use crate::debroot;
use crate::lab::{path_str, write_file, Lab};
use crate::process::{Proc, Spec};
use crate::wait::wait_for;

/// The Debian packages unpacked for OpenSMTPD.
pub const PACKAGES: &[&str] = &["opensmtpd"];
/// Its compiled-in users.
pub const USERS: &[&str] = &["opensmtpd", "opensmtpq"];

/// How to set up the instance.
#[derive(Debug, Clone)]
pub struct OpensmtpdConfig {
    /// Listen address and port inside the namespace.
    pub addr: SocketAddr,
    /// Network namespace to run in (see the module doc).
    pub netns: String,
    /// Mail for a domain is relayed to an address and port (IP literals, no DNS).
    pub routes: Vec<(String, SocketAddr)>,
    /// `queue ttl`: how long a temporary failure is retried, e.g. `15s`.
    pub queue_ttl: String,
    /// `bounce warn-interval`: when a delay warning goes out, e.g. `4s`.
    pub warn_interval: String,
}

/// A running smtpd; SIGTERM (then SIGKILL) to its PID on drop.
#[derive(Debug)]
pub struct Opensmtpd {
    proc: Proc,
    addr: SocketAddr,
}

impl Opensmtpd {
    pub fn start(lab: &Lab, name: &str, cfg: OpensmtpdConfig) -> Result<Opensmtpd> {
        for user in USERS {
            debroot::ensure_system_user(user)?;
        }
        let dir_name = format!("opensmtpd-{name}");
        let root = debroot::unpack(lab, &format!("{dir_name}/root"), PACKAGES)?;
        let bin = root.join("usr/sbin/smtpd");
        if !bin.is_file() {
            bail!("{} is missing after unpacking {PACKAGES:?}", bin.display());
        }
        debroot::check_libraries(&bin, "libevent-2.1-7")?;
        // the private /var: queue (root, 0711, smtpd makes the rest), socket dir, privsep chroot
        let var = lab.subdir(&format!("{dir_name}/var"))?;
        let queue = lab.subdir(&format!("{dir_name}/var/spool/smtpd"))?;
        std::fs::set_permissions(&queue, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        for sub in ["run", "lib/opensmtpd/empty", "tmp", "mail"] {
            lab.subdir(&format!("{dir_name}/var/{sub}"))?;
        }
        let dir = lab.path().join(&dir_name);
        let conf = dir.join("smtpd.conf");
        write_file(&conf, render_config(&cfg))?;
        let unshare = system_tool("unshare", "util-linux")?;
        let script = format!(
            "mount --bind '{}' /var && exec '{}' -d -f '{}'",
            path_str(&var)?,
            path_str(&bin)?,
            path_str(&conf)?
        );
        let spec = Spec::new(dir_name.clone(), unshare)
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .in_netns(&cfg.netns);
        let mut proc = Proc::spawn(spec, &dir)?;
        let addr = cfg.addr;
        let ns = cfg.netns.clone();
        wait_for(
            &format!("smtpd listening on {addr} in {ns}"),
            Duration::from_secs(20),
            || {
                if !proc.is_running() {
                    bail!(
                        "smtpd exited during startup ({:?}):\n{}",
                        proc.exit_status(),
                        proc.log_tail(40)
                    );
                }
                let up = crate::netns::in_netns(&ns, move || crate::net::is_listening(addr))?;
                Ok(up.then_some(()))
            },
        )?;
        Ok(Opensmtpd { proc, addr })
    }

    pub fn smtp_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The tail of smtpd's log (it logs to stderr with `-d`).
    pub fn log_tail(&self) -> String {
        self.proc.log_tail(40)
    }
}

fn render_config(cfg: &OpensmtpdConfig) -> String {
    let mut conf = format!(
        "queue ttl {}\nbounce warn-interval {}\nlisten on {} port {}\n",
        cfg.queue_ttl,
        cfg.warn_interval,
        cfg.addr.ip(),
        cfg.addr.port()
    );
    for (i, (_, to)) in cfg.routes.iter().enumerate() {
        conf += &format!(
            "action \"route{i}\" relay host smtp://{}:{}\n",
            to.ip(),
            to.port()
        );
    }
    for (i, (domain, _)) in cfg.routes.iter().enumerate() {
        conf += &format!("match from any for domain \"{domain}\" action \"route{i}\"\n");
    }
    conf
}
