//! Debian packages that cannot be installed next to Postfix (exim4, opensmtpd conflict with it as
//! packages): their `.deb` files, cached in `/var/cache/mxscope-tests/debs`, unpacked with
//! `dpkg -x` into a private root in the lab; and the system users their daemons look up.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::binaries::system_tool;
use crate::lab::Lab;

/// Where downloaded `.deb` files are kept between runs (`MXSCOPE_DEB_CACHE` overrides it);
/// `deploy/test` fills it.
pub const DEB_CACHE: &str = "/var/cache/mxscope-tests/debs";

fn cache_dir() -> PathBuf {
    std::env::var_os("MXSCOPE_DEB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEB_CACHE))
}

/// Unpacks `packages` into `<lab>/<name>` and returns that root. A package missing from the
/// cache is fetched with `apt-get download` first.
pub fn unpack(lab: &Lab, name: &str, packages: &[&str]) -> Result<PathBuf> {
    if packages.is_empty() {
        bail!("nothing to unpack into {name}");
    }
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    let dpkg = system_tool("dpkg", "dpkg")?;
    let root = lab.subdir(name)?;
    for package in packages {
        let deb = match cached_deb(&cache, package)? {
            Some(deb) => deb,
            None => download(&cache, package)?,
        };
        let out = Command::new(&dpkg)
            .arg("-x")
            .arg(&deb)
            .arg(&root)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run dpkg -x {}", deb.display()))?;
        if !out.status.success() {
            bail!(
                "dpkg -x {} {} failed: {}",
                deb.display(),
                root.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(root)
}

/// The newest cached `<package>_<version>_<arch>.deb`, if any.
fn cached_deb(cache: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(cache)
        .with_context(|| format!("read {}", cache.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    Ok(debs.pop())
}

fn download(cache: &Path, package: &str) -> Result<PathBuf> {
    let apt_get = system_tool("apt-get", "apt")?;
    let out = Command::new(&apt_get)
        .args(["-q", "download", package])
        .current_dir(cache)
        .stdin(Stdio::null())
        .output()
        .context("run apt-get download")?;
    if !out.status.success() {
        bail!(
            "apt-get download {package} (into {}) failed: {}\n\
             run deploy/test once with network access to the Debian mirror, or put the .deb there",
            cache.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    cached_deb(cache, package)?.with_context(|| {
        format!(
            "apt-get download {package} left no .deb in {}",
            cache.display()
        )
    })
}

/// Fails, naming the Debian packages to install, when `binary` needs a shared library the system
/// lacks (unpacked binaries bring none of their dependencies).
pub fn check_libraries(binary: &Path, hint: &str) -> Result<()> {
    let ldd = system_tool("ldd", "libc-bin")?;
    let out = Command::new(ldd).arg(binary).output().context("run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("not found"))
        .map(str::trim)
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} needs libraries that are not installed ({}): install {hint} (deploy/test does)",
            binary.display(),
            missing.join(", ")
        );
    }
    Ok(())
}

/// Creates the system user `name` (no home, no login shell) unless it exists: unpacked daemons
/// look up their compiled-in users before reading any config. `deploy/test` creates them too.
pub fn ensure_system_user(name: &str) -> Result<()> {
    if crate::lab::user_ids(name).is_ok() {
        return Ok(());
    }
    let useradd = system_tool("useradd", "passwd")?;
    let out = Command::new(useradd)
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .stdin(Stdio::null())
        .output()
        .context("run useradd")?;
    if !out.status.success() && crate::lab::user_ids(name).is_err() {
        bail!(
            "system user `{name}` is missing and `useradd --system {name}` failed ({}): {}\n\
             run the tests as root, or create it by hand (deploy/test does)",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
