//! Finding executables: the mxscope binaries in the cargo target dir next to the running test,
//! and the system tools (postfix, dovecot, nsd, dig) with a clear message when one is missing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The mxscope binaries the tests drive.
pub const COLLECTOR: &str = "mxscope-collector";
pub const AGENT: &str = "mxscope-agent";
pub const CTL: &str = "mxscopectl";

/// Path of an mxscope binary built by cargo in the same profile dir as the running executable
/// (`target/debug/deps/test-…` → `target/debug/NAME`, or `target/debug/mxscope-demo` →
/// `target/debug/NAME`). `MXSCOPE_BIN_DIR` overrides the directory.
pub fn mxscope_binary(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("MXSCOPE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => profile_dir()?,
    };
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{name} not found at {}: build the workspace first with `cargo build --workspace` \
             (or run the tests with `cargo test --workspace`)",
            path.display()
        );
    }
    Ok(path)
}

fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locate the running executable")?;
    let mut dir = exe
        .parent()
        .context("running executable has no parent directory")?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Locates a system tool on `PATH` or in the sbin directories (which root's PATH may lack in CI).
pub fn system_tool(name: &str, package: &str) -> Result<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path_var).collect();
    for extra in ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"] {
        dirs.push(PathBuf::from(extra));
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
        .with_context(|| {
            format!(
                "required program `{name}` not found: install the Debian package `{package}` \
                 (see LAB.md; `.ci/run` installs it)"
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_the_package() {
        let err = system_tool("mxscope-no-such-tool", "no-such-package").expect_err("missing");
        assert!(err.to_string().contains("no-such-package"), "{err}");
    }

    #[test]
    fn finds_sh() {
        assert!(system_tool("sh", "dash").expect("sh exists").is_file());
    }
}
