//! A private PostgreSQL cluster for tests, from Debian's packages: `initdb` into a temp dir of its
//! own, `postgres` run as the `postgres` OS user on 127.0.0.1:<free port>, a database per caller.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::lab::path_str;
use crate::net::free_port;
use crate::process::{Proc, Spec};
use crate::wait::wait_for;

/// Where Debian's `postgresql-NN` packages put their programs: `<root>/<version>/bin`.
pub const DEBIAN_ROOT: &str = "/usr/lib/postgresql";
/// The OS user the server runs as (it refuses to run as root); Debian's packages create it.
pub const OS_USER: &str = "postgres";
/// The role the stores connect as; it owns every database [`Postgres::create_database`] makes.
pub const ROLE: &str = "mxscope";
/// The bootstrap superuser `initdb` creates.
const SUPERUSER: &str = "postgres";
/// How long `initdb` plus the server's start may take (two shared cores, a cold disk cache).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// What [`Postgres::start`] runs the server with: no fsync (tests need no durability, and the
/// shared disk is slow).
pub const TEST_SETTINGS: &[(&str, &str)] = &[("fsync", "off")];
/// How long a fast shutdown (SIGINT) may take before the guard falls back to SIGTERM/SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The programs of one installed PostgreSQL version.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The version directory's name, e.g. `15`.
    pub version: String,
    pub initdb: PathBuf,
    pub postgres: PathBuf,
    pub psql: PathBuf,
}

impl Binaries {
    /// The highest version under [`DEBIAN_ROOT`] that has `initdb` and `postgres`.
    pub fn find() -> Result<Binaries> {
        Binaries::find_in(Path::new(DEBIAN_ROOT))
    }

    /// The highest version under `root` (`<root>/<version>/bin/{initdb,postgres}`); `psql` from
    /// the same directory, else from `/usr/bin` (postgresql-client).
    pub fn find_in(root: &Path) -> Result<Binaries> {
        let entries = std::fs::read_dir(root).with_context(|| {
            format!(
                "initdb not found: no {} (apt-get install postgresql)",
                root.display()
            )
        })?;
        let mut versions: Vec<(Vec<u32>, String)> = Vec::new();
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let Some(key) = version_key(&name) else {
                continue;
            };
            let bin = root.join(&name).join("bin");
            if bin.join("initdb").is_file() && bin.join("postgres").is_file() {
                versions.push((key, name));
            }
        }
        let Some((_, version)) = versions.into_iter().max() else {
            bail!(
                "initdb not found: no {}/<version>/bin/initdb and postgres (apt-get install postgresql)",
                root.display()
            );
        };
        let bin = root.join(&version).join("bin");
        let psql = [bin.join("psql"), PathBuf::from("/usr/bin/psql")]
            .into_iter()
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "psql not found in {} or /usr/bin (apt-get install postgresql-client)",
                    bin.display()
                )
            })?;
        Ok(Binaries {
            initdb: bin.join("initdb"),
            postgres: bin.join("postgres"),
            psql,
            version,
        })
    }
}

/// `15` → `[15]`, `9.6` → `[9, 6]`; `None` for a name that is not a version.
fn version_key(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|p| p.parse().ok()).collect()
}

/// A running private cluster. Dropping it stops the server (fast shutdown, by PID) and deletes
/// its directory.
#[derive(Debug)]
pub struct Postgres {
    // Declared first: dropped (the server stopped) before the directory is removed.
    proc: Proc,
    bin: Binaries,
    port: u16,
    dir: TempDir,
}

impl Postgres {
    /// Creates a cluster in a new temp dir (`initdb -A trust --no-sync`), starts it on 127.0.0.1
    /// and a free port with [`TEST_SETTINGS`] (`fsync=off`), waits until it accepts connections
    /// and creates the role [`ROLE`]. Blocking: call it from `spawn_blocking` in async code.
    pub fn start() -> Result<Postgres> {
        Postgres::start_with(&std::env::temp_dir(), TEST_SETTINGS)
    }

    /// Like [`start`](Postgres::start), with the cluster's directory (still removed on drop)
    /// made inside `parent`, which [`OS_USER`] must be able to enter (see
    /// [`os_user_can_enter`]).
    pub fn start_in(parent: &Path) -> Result<Postgres> {
        Postgres::start_with(parent, TEST_SETTINGS)
    }

    /// [`start_in`](Postgres::start_in) with `settings` (`-c name=value`, e.g. `("fsync", "on")`
    /// for a benchmark that must pay for durability) instead of [`TEST_SETTINGS`]; anything not
    /// named keeps the server's default.
    pub fn start_with(parent: &Path, settings: &[(&str, &str)]) -> Result<Postgres> {
        let bin = Binaries::find()?;
        let (uid, gid) = os_user(OS_USER)?;
        let dir = tempfile::Builder::new()
            .prefix("mxscope-pg-")
            .tempdir_in(parent)
            .with_context(|| format!("create the cluster's directory in {}", parent.display()))?;
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
            .with_context(|| format!("chown {} to {OS_USER}", dir.path().display()))?;
        let data = dir.path().join("data");
        let data_s = path_str(&data)?;
        as_os_user(&bin.initdb, dir.path())
            .args(["-D", &data_s, "-A", "trust", "-U", SUPERUSER, "--no-sync"])
            .args(["-E", "UTF8", "--locale=C"])
            .output_ok("initdb")?;

        let ip = Ipv4Addr::LOCALHOST;
        let port = free_port(ip)?;
        let spec = Spec::new("postgres", "/usr/bin/setpriv")
            .args(setpriv_args())
            .arg(path_str(&bin.postgres)?)
            .args(["-D", &data_s])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c".to_string(), format!("port={port}")])
            .args([
                "-c".to_string(),
                format!("unix_socket_directories={}", path_str(dir.path())?),
            ])
            .args(["-c", "max_connections=200"]);
        let spec = settings.iter().fold(spec, |spec, (name, value)| {
            spec.args(["-c".to_string(), format!("{name}={value}")])
        });
        let spec = Spec {
            current_dir: Some(dir.path().to_path_buf()),
            ..spec
        };
        let proc = Proc::spawn(spec, dir.path())?;
        let mut pg = Postgres {
            proc,
            bin,
            port,
            dir,
        };
        pg.wait_ready()?;
        pg.admin(&format!("CREATE ROLE {ROLE} LOGIN SUPERUSER"))?;
        Ok(pg)
    }

    /// Polls with `psql` until the server answers a query, failing at once (with its log) if it
    /// exits first.
    fn wait_ready(&mut self) -> Result<()> {
        let addr = self.addr();
        wait_for(
            &format!("postgres on {addr} to accept queries"),
            START_TIMEOUT,
            || {
                if !self.proc.is_running() {
                    bail!(
                        "postgres exited during startup ({:?}):\n{}",
                        self.proc.exit_status(),
                        self.proc.log_tail(30)
                    );
                }
                Ok(self.admin("SELECT 1").is_ok().then_some(()))
            },
        )
        .with_context(|| format!("postgres log:\n{}", self.proc.log_tail(30)))
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's PID (its backends and background workers are its children); `None`
    /// once it has exited.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// The installed version the cluster runs (its directory name under [`DEBIAN_ROOT`]).
    pub fn version(&self) -> &str {
        &self.bin.version
    }

    /// The cluster's directory (data directory `data/`, the unix socket, the server's log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// `postgres://mxscope@127.0.0.1:PORT/<db>` (no password: the cluster trusts loopback).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` owned by [`ROLE`] and returns its [`url`](Postgres::url).
    /// `name` is lowercase letters, digits and `_`, at most 63 bytes, so it needs no quoting.
    pub fn create_database(&self, name: &str) -> Result<String> {
        plain_name(name)?;
        self.admin(&format!("CREATE DATABASE {name} OWNER {ROLE}"))
            .with_context(|| format!("create database {name}"))?;
        Ok(self.url(name))
    }

    /// Drops database `name` if it exists, ending the sessions still connected to it.
    pub fn drop_database(&self, name: &str) -> Result<()> {
        plain_name(name)?;
        self.admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .with_context(|| format!("drop database {name}"))?;
        Ok(())
    }

    /// Runs `sql` in database `db` as [`ROLE`] over TCP and returns psql's unaligned output
    /// (`-At`: one row a line, columns separated by `|`).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        self.psql_as(&self.url(db), sql)
    }

    /// `sql` as the bootstrap superuser in `postgres` (roles, databases).
    fn admin(&self, sql: &str) -> Result<String> {
        let url = format!("postgres://{SUPERUSER}@127.0.0.1:{}/postgres", self.port);
        self.psql_as(&url, sql)
    }

    fn psql_as(&self, url: &str, sql: &str) -> Result<String> {
        let out = Command::new(&self.bin.psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-d", url, "-c", sql])
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {}", self.bin.psql.display()))?;
        if !out.status.success() {
            bail!(
                "psql {url} -c {sql:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT is the fast shutdown (SIGTERM, which the guard sends, waits for every client to
        // disconnect); the postmaster stops its own backends.
        // If it does not stop in time, the guard's own drop goes on to SIGTERM and SIGKILL.
        if self.proc.signal(libc::SIGINT).is_ok() && self.proc.wait_exit(STOP_TIMEOUT).is_err() {
            eprintln!(
                "postgres did not stop within {STOP_TIMEOUT:?} of SIGINT; log:\n{}",
                self.proc.log_tail(20)
            );
        }
    }
}

/// Refuses a database name that would need quoting: `[a-z_][a-z0-9_]*`, at most 63 bytes.
fn plain_name(name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if !plain {
        bail!("database name {name:?} must be [a-z_][a-z0-9_]*, at most 63 bytes");
    }
    Ok(())
}

/// `setpriv` arguments that run the following program as [`OS_USER`], in place (exec: the PID
/// the guard signals is the program's own).
fn setpriv_args() -> [&'static str; 4] {
    [
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
    ]
}

/// True when [`OS_USER`] can enter `dir` (every directory on the way is searchable to it), so a
/// cluster made inside it can start; a home directory of mode 0700 on the way is the usual "no".
pub fn os_user_can_enter(dir: &Path) -> bool {
    Command::new("/usr/bin/setpriv")
        .args(setpriv_args())
        .args(["/usr/bin/test", "-x"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A command running `program` as [`OS_USER`] in `dir`.
fn as_os_user(program: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new("/usr/bin/setpriv");
    cmd.args(setpriv_args())
        .arg(program)
        .current_dir(dir)
        .stdin(Stdio::null());
    cmd
}

/// Runs a command to completion; a failure carries its output.
trait OutputOk {
    fn output_ok(&mut self, what: &str) -> Result<String>;
}

impl OutputOk for Command {
    fn output_ok(&mut self, what: &str) -> Result<String> {
        let out = self.output().with_context(|| format!("run {what}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {}{}",
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }
}

/// Uid and gid of OS user `name`, from `getent passwd`.
pub fn os_user(name: &str) -> Result<(u32, u32)> {
    let out = Command::new("getent")
        .args(["passwd", name])
        .stdin(Stdio::null())
        .output()
        .context("run getent")?;
    let line = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = line.trim_end().split(':').collect();
    match (out.status.success(), fields.get(2), fields.get(3)) {
        (true, Some(uid), Some(gid)) => Ok((
            uid.parse().context("uid in getent passwd")?,
            gid.parse().context("gid in getent passwd")?,
        )),
        _ => bail!("OS user {name} not found (apt-get install postgresql creates it)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_version(root: &Path, version: &str, programs: &[&str]) {
        let bin = root.join(version).join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        for p in programs {
            std::fs::write(bin.join(p), "").expect("write");
        }
    }

    #[test]
    fn finds_the_highest_complete_version() {
        let root = tempfile::tempdir().expect("temp dir");
        fake_version(root.path(), "9.6", &["initdb", "postgres", "psql"]);
        fake_version(root.path(), "15", &["initdb", "postgres", "psql"]);
        fake_version(root.path(), "13", &["initdb", "postgres", "psql"]);
        // Newer but without a server: a client-only install.
        fake_version(root.path(), "17", &["psql"]);
        std::fs::create_dir_all(root.path().join("lib")).expect("mkdir");
        let b = Binaries::find_in(root.path()).expect("found");
        assert_eq!(b.version, "15");
        assert_eq!(b.initdb, root.path().join("15/bin/initdb"));
        assert_eq!(b.psql, root.path().join("15/bin/psql"));
    }

    #[test]
    fn missing_server_names_the_package() {
        let root = tempfile::tempdir().expect("temp dir");
        fake_version(root.path(), "17", &["psql"]);
        let err = Binaries::find_in(root.path()).expect_err("no server");
        assert!(
            err.to_string().contains("apt-get install postgresql"),
            "{err}"
        );
        let err = Binaries::find_in(&root.path().join("absent")).expect_err("no root");
        assert!(
            format!("{err:#}").contains("initdb not found: no"),
            "{err:#}"
        );
    }

    #[test]
    fn versions_order_numerically() {
        assert!(version_key("10") > version_key("9.6"));
        assert_eq!(version_key("lib"), None);
    }
}
