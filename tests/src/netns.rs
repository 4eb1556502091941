//! A bare network namespace for one test: only loopback, up, and its own resolver file
//! (`/etc/netns/<ns>/resolv.conf`, which `ip netns exec` mounts over `/etc/resolv.conf`), so the
//! processes in it resolve through a server the test starts there and reach nothing else.
//! Deleted, with its resolver file, on drop.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

use crate::binaries::system_tool;
use crate::lab::write_file;
use crate::process::run;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace we created; `ip netns del` on drop (drop the processes in it first).
#[derive(Debug)]
pub struct Netns {
    name: String,
    ip_bin: PathBuf,
}

impl Netns {
    /// Creates `mxs-<prefix>-<pid>-<n>` with loopback up and `resolv.conf` as its resolver file.
    pub fn create(prefix: &str, resolv_conf: &str) -> Result<Netns> {
        let ip_bin = system_tool("ip", "iproute2")?;
        let name = format!(
            "mxs-{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&ip_bin, &["netns", "add", &name])
            .context("ip netns add (needs root and a kernel with network namespaces)")?;
        let ns = Netns { name, ip_bin };
        run(&ns.ip_bin, &["-n", &ns.name, "link", "set", "lo", "up"])?;
        let etc = ns.etc_dir();
        std::fs::create_dir_all(&etc).with_context(|| format!("create {}", etc.display()))?;
        write_file(&etc.join("resolv.conf"), resolv_conf)?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn etc_dir(&self) -> PathBuf {
        PathBuf::from("/etc/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&self.ip_bin, &["netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(self.etc_dir());
    }
}

/// Runs `f` on a thread that has joined network namespace `ns` (`/run/netns/<ns>`): sockets it
/// opens live there, so a test can reach a server listening inside the namespace.
#[allow(unsafe_code)] // setns(2): std has no namespace API
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("open {path}"))?;
    let joined = std::thread::spawn(move || {
        // SAFETY: setns(2) on a valid namespace fd; it only changes this thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    })
    .join();
    match joined {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e).with_context(|| format!("setns into {path}")),
        Err(_) => bail!("the thread in {path} panicked"),
    }
}
