//! Debian's chromium driven by Playwright (`playwright-core` from npm, `tests/browser/`) for the
//! dashboard tests: a Node process speaking `tests/browser/driver.mjs`'s line protocol, one JSON
//! command and one JSON answer per line, killed on drop.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Where Debian's chromium package puts the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// The driver's directory in the source tree.
pub fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Installs `playwright-core` into `tests/browser/node_modules` from its lock file when it is
/// not there yet (`npm ci`); fails naming what is missing (node, npm, chromium).
pub fn install() -> Result<()> {
    if !Path::new(CHROMIUM).exists() {
        bail!("{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; deploy/test does)");
    }
    let dir = driver_dir();
    if dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return Ok(());
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .output()
        .context("run npm (install Debian's npm: apt-get install npm)")?;
    if !out.status.success() {
        bail!(
            "npm ci in {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One headless chromium with one page.
#[derive(Debug)]
pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Browser {
    pub fn start() -> Result<Browser> {
        install()?;
        let mut child = Command::new("node")
            .arg(driver_dir().join("driver.mjs"))
            .current_dir(driver_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("run node (install Debian's nodejs)")?;
        let stdin = child.stdin.take().context("driver stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("driver stdout")?);
        Ok(Browser {
            child,
            stdin,
            stdout,
        })
    }

    /// Sends one command and returns its answer's value.
    pub fn call(&mut self, command: Value) -> Result<Value> {
        let line = serde_json::to_string(&command)?;
        writeln!(self.stdin, "{line}").context("write to the browser driver")?;
        self.stdin.flush()?;
        let mut answer = String::new();
        if self.stdout.read_line(&mut answer)? == 0 {
            bail!("the browser driver exited (command {line})");
        }
        let v: Value = serde_json::from_str(&answer)
            .with_context(|| format!("browser driver answer {answer:?}"))?;
        if let Some(e) = v.get("error") {
            bail!("browser: {line}: {e}");
        }
        Ok(v.get("ok").cloned().unwrap_or(Value::Null))
    }

    pub fn goto(&mut self, url: &str) -> Result<()> {
        self.call(json!({"op": "goto", "url": url})).map(drop)
    }

    /// Waits until `selector` matches (attached).
    pub fn wait(&mut self, selector: &str, timeout: Duration) -> Result<()> {
        self.call(
            json!({"op": "wait", "selector": selector, "timeout_ms": timeout.as_millis() as u64}),
        )
        .map(drop)
    }

    /// Waits until the JavaScript expression `js` is truthy in the page.
    pub fn wait_fn(&mut self, js: &str, timeout: Duration) -> Result<()> {
        self.call(json!({"op": "wait_fn", "js": js, "timeout_ms": timeout.as_millis() as u64}))
            .map(drop)
    }

    /// The value of the JavaScript expression `js` (awaited) in the page.
    pub fn eval(&mut self, js: &str) -> Result<Value> {
        self.call(json!({"op": "eval", "js": js}))
    }

    /// A full-page PNG at `path`, for a person to look at.
    pub fn screenshot(&mut self, path: &Path) -> Result<()> {
        self.call(json!({"op": "screenshot", "path": path}))
            .map(drop)
    }

    /// Uncaught errors the page threw so far.
    pub fn page_errors(&mut self) -> Result<Vec<String>> {
        let v = self.call(json!({"op": "errors"}))?;
        Ok(serde_json::from_value(v)?)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
