//! Guards for the processes a test starts: output captured to a log file, signalled by PID only,
//! SIGTERM then SIGKILL on drop so nothing outlives the test, restartable with the same command.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::wait::wait_for;

/// How long a process gets between SIGTERM and SIGKILL when dropped.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// What to run; kept so a stopped process can be started again with the same arguments.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Short name, used for the log file name and in messages.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub current_dir: Option<PathBuf>,
    /// Network namespace to run in: started as `ip netns exec NS PROGRAM ARGS…`, which execs the
    /// program in place, so the PID is still the program's own.
    pub netns: Option<String>,
}

impl Spec {
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        Spec {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            current_dir: None,
            netns: None,
        }
    }

    /// Runs the program inside network namespace `ns` (see [`Spec::netns`]).
    pub fn in_netns(mut self, ns: impl Into<String>) -> Self {
        self.netns = Some(ns.into());
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A child process we started. Its stdout and stderr go to `<log_dir>/<name>.log` (appended
/// across restarts). Dropping the guard stops the process.
#[derive(Debug)]
pub struct Proc {
    spec: Spec,
    log_path: PathBuf,
    child: Option<Child>,
    last_status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `spec`, logging to a file in `log_dir`.
    pub fn spawn(spec: Spec, log_dir: &Path) -> Result<Proc> {
        let log_path = log_dir.join(format!("{}.log", spec.name));
        let mut proc = Proc {
            spec,
            log_path,
            child: None,
            last_status: None,
        };
        proc.start()?;
        Ok(proc)
    }

    fn start(&mut self) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("open log file {}", self.log_path.display()))?;
        let mut cmd = match &self.spec.netns {
            Some(ns) => {
                let mut c = Command::new(crate::binaries::system_tool("ip", "iproute2")?);
                c.args(["netns", "exec", ns.as_str()])
                    .arg(&self.spec.program);
                c
            }
            None => Command::new(&self.spec.program),
        };
        cmd.args(&self.spec.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.spec.env {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.spec.current_dir {
            cmd.current_dir(dir);
        }
        // Own process group: a Ctrl-C in the terminal reaches the harness, which then stops its
        // children in order, instead of hitting every child at once.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().with_context(|| {
            format!("start {} ({})", self.spec.name, self.spec.program.display())
        })?;
        self.child = Some(child);
        self.last_status = None;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// PID of the running process, `None` once it has been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has written so far (lossy UTF-8; empty if the file is unreadable).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log(), n)
    }

    /// Sends `signal` to our child by PID. No-op when it has already exited.
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        send_signal(pid, signal)
    }

    /// True while the child has not exited (reaps it if it has).
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                self.last_status = Some(status);
                self.child = None;
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Exit status once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.is_running();
        self.last_status
    }

    /// Waits up to `timeout` for the process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let name = self.spec.name.clone();
        wait_for(&format!("{name} to exit"), timeout, || {
            Ok(if self.is_running() {
                None
            } else {
                self.last_status
            })
        })
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.exit_status() {
            return Ok(status);
        }
        self.signal(libc::SIGTERM)?;
        match self.wait_exit(grace) {
            Ok(status) => Ok(status),
            Err(_) => self.kill(),
        }
    }

    /// SIGKILL right away (a crash as far as the process is concerned) and reap it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exit_status() {
            return Ok(status);
        }
        self.signal(libc::SIGKILL)?;
        self.wait_exit(Duration::from_secs(10))
    }

    /// Waits until `addr` accepts TCP connections, failing at once (with the log's tail) if the
    /// process exits first.
    pub fn wait_listening(&mut self, addr: std::net::SocketAddr, timeout: Duration) -> Result<()> {
        let name = self.name().to_string();
        wait_for(&format!("{name} listening on {addr}"), timeout, || {
            if !self.is_running() {
                bail!(
                    "{name} exited during startup ({:?}):\n{}",
                    self.exit_status(),
                    self.log_tail(40)
                );
            }
            Ok(crate::net::is_listening(addr).then_some(()))
        })
    }

    /// Starts the same command again; fails if it is still running.
    pub fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            bail!(
                "{} is still running; stop it before restarting",
                self.spec.name
            );
        }
        self.start()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.terminate(STOP_GRACE);
        }
    }
}

/// Sends `signal` to `pid`. Only ever called with PIDs of processes the harness started.
#[allow(unsafe_code)] // kill(2): std has no signal API
pub fn send_signal(pid: u32, signal: i32) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    if pid <= 1 {
        bail!("refusing to signal pid {pid}");
    }
    // SAFETY: kill(2) has no memory-safety preconditions; pid > 1 keeps it to one process.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err).with_context(|| format!("kill({pid}, {signal})"));
        }
    }
    Ok(())
}

/// True while a process with `pid` exists.
#[allow(unsafe_code)] // kill(pid, 0): std has no signal API
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Runs a short command to completion, returning its stdout; a non-zero exit is an error that
/// carries stdout and stderr.
pub fn run(program: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", program.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}{}",
            program.display(),
            args.join(" "),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminate_stops_a_child_and_restart_runs_it_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = Spec::new("sleeper", "/bin/sh").args(["-c", "echo started; exec sleep 60"]);
        let mut p = Proc::spawn(spec, dir.path()).expect("spawn");
        assert!(p.is_running());
        crate::wait_until("log line", Duration::from_secs(5), || {
            p.log().contains("started")
        })
        .expect("child wrote its log");
        let status = p.terminate(Duration::from_secs(5)).expect("terminate");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
        p.restart().expect("restart");
        let pid = p.pid().expect("running again");
        drop(p);
        assert!(!pid_alive(pid), "drop must stop the child");
    }
}
