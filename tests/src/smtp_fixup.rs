//! The `mxscope-smtp-fixup` relay as a lab fixture: started by PID in the router namespace, where
//! a DNAT sends one region's port-25 traffic to it; stopped by PID when the guard drops.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::lab::path_str;
use crate::process::{Proc, Spec};
use crate::wait::wait_for;

/// A running relay that masks the SMTP greeting and turns `STARTTLS` into `XXXXXXXA`.
#[derive(Debug)]
pub struct SmtpFixup {
    pub proc: Proc,
    pub listen: SocketAddr,
}

impl SmtpFixup {
    /// Starts `bin --listen LISTEN --upstream UPSTREAM` inside `netns`, log and ready file in
    /// `dir`, and waits until it listens.
    pub fn start(
        bin: &Path,
        dir: &Path,
        netns: &str,
        listen: SocketAddr,
        upstream: SocketAddr,
    ) -> Result<SmtpFixup> {
        let ready = dir.join("smtp-fixup.ready");
        let _ = std::fs::remove_file(&ready);
        let spec = Spec::new("smtp-fixup", bin).in_netns(netns).args([
            "--listen".to_string(),
            listen.to_string(),
            "--upstream".to_string(),
            upstream.to_string(),
            "--ready-file".to_string(),
            path_str(&ready)?,
            "--max-seconds".to_string(),
            "1800".to_string(),
        ]);
        let mut proc = Proc::spawn(spec, dir)?;
        wait_for("smtp-fixup to listen", Duration::from_secs(20), || {
            if !proc.is_running() {
                bail!("smtp-fixup exited during startup: {}", proc.log_tail(20));
            }
            Ok(ready.exists().then_some(()))
        })?;
        Ok(SmtpFixup { proc, listen })
    }
}
