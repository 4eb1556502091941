//! A lab is one test's private world: a temp directory (removed on drop) holding every config,
//! log, database and spool, and a unique run id for names. Servers started in it live as long as it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// One test's temp directory and run id.
#[derive(Debug)]
pub struct Lab {
    dir: tempfile::TempDir,
    run_id: String,
}

impl Lab {
    /// Creates `/tmp/mxscope-lab-<test>-XXXX`, world-traversable (mode 0755) because Postfix
    /// and Dovecot drop privileges and must still reach their directories inside it.
    pub fn new(test_name: &str) -> Result<Lab> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("mxscope-lab-{test_name}-"))
            .tempdir()
            .context("create lab temp dir")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .context("chmod lab temp dir")?;
        let run_id = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.rsplit('-').next().unwrap_or(n).to_lowercase())
            .unwrap_or_else(|| std::process::id().to_string());
        Ok(Lab { dir, run_id })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A unique short id for this run (usable in names).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Creates (if needed) and returns `<lab>/<name>`, mode 0755.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", p.display()))?;
        Ok(p)
    }

    /// Keeps the directory after the test (for post-mortems); returns its path.
    pub fn keep(mut self) -> PathBuf {
        self.dir.disable_cleanup(true);
        self.dir.path().to_path_buf()
    }
}

impl Drop for Lab {
    /// A failing test (or `MXSCOPE_KEEP_LAB=1`) keeps its directory, with every log, for a look.
    /// The servers living in it are dropped (stopped) before the lab itself.
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("MXSCOPE_KEEP_LAB").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("lab kept for inspection: {}", self.dir.path().display());
        }
    }
}

/// Writes `contents` to `path`, naming the file on error.
pub fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("write {}", path.display()))
}

/// Changes the owner of `path` to the system user `user` (and its primary group).
pub fn chown_to_user(path: &Path, user: &str) -> Result<()> {
    let (uid, gid) = user_ids(user)?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {} to {user}", path.display()))
}

/// uid and primary gid of a system user, from `/etc/passwd`.
pub fn user_ids(user: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&user))
        .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
        .with_context(|| format!("system user `{user}` not found in /etc/passwd"))
}

/// `path` as `&str` for command lines and config files (lab paths are always UTF-8).
pub fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .with_context(|| format!("path is not UTF-8: {}", path.display()))
}

/// The last 30 lines of a log file, or an empty string if it cannot be read.
pub fn read_tail(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| crate::process::tail(&s, 30))
        .unwrap_or_default()
}
