//! Fault injection for the delivery-guarantee tests: agents with extra flags (a tiny
//! `--spool-max`), a seeded RNG for crash timing, raw spool records for damaging a spool on disk,
//! a tmpfs that can be filled, and the exactly-once check of what the collector stored.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::binaries::{mxscope_binary, AGENT};
use crate::lab::{path_str, write_file};
use crate::mxscope::{agent_toml, AgentOptions, Ctl, SpoolSummary};
use crate::process::{Proc, Spec};

/// The collector's cap on rows per `results` query; tests stay below it.
pub const RESULTS_LIMIT: u32 = 10_000;

/// A small deterministic RNG (SplitMix64): crash moments are random but replayable from the seed.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    /// Seed from `MXSCOPE_FAULT_SEED` when set (to replay a failure), else `default`.
    pub fn from_env(default: u64) -> SeededRng {
        let seed = std::env::var("MXSCOPE_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default);
        eprintln!("fault seed: {seed} (replay with MXSCOPE_FAULT_SEED={seed})");
        SeededRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> std::time::Duration {
        std::time::Duration::from_millis(lo + self.next_u64() % (hi - lo + 1))
    }
}

/// A running `mxscope-agent` started with extra flags (e.g. `--spool-max`).
#[derive(Debug)]
pub struct FaultAgent {
    proc: Proc,
    id: String,
    spool: PathBuf,
}

impl FaultAgent {
    /// Writes `<dir>/agent-ID.toml` and starts the agent with its spool in `<dir>/spool-ID`.
    pub fn start(dir: &Path, opts: &AgentOptions, extra: &[&str]) -> Result<FaultAgent> {
        let bin = mxscope_binary(AGENT)?;
        let config = dir.join(format!("agent-{}.toml", opts.id));
        write_file(&config, agent_toml(&opts.targets))?;
        let spool = dir.join(format!("spool-{}", opts.id));
        let spec = Spec::new(format!("agent-{}", opts.id), bin)
            .args([
                "--collector",
                &opts.collector_url,
                "--id",
                &opts.id,
                "--region",
                &opts.region,
                "--config",
                &path_str(&config)?,
                "--spool",
                &path_str(&spool)?,
            ])
            .args(extra.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let proc = Proc::spawn(spec, dir)?;
        Ok(FaultAgent {
            proc,
            id: opts.id.clone(),
            spool,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn spool(&self) -> &Path {
        &self.spool
    }

    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn log_tail(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    /// Fails with the log tail if the agent has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if !self.proc.is_running() {
            bail!(
                "agent {} exited ({:?}):\n{}",
                self.id,
                self.proc.exit_status(),
                self.proc.log_tail(40)
            );
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit (the agent drains its spool for up to 5 s first).
    pub fn stop(&mut self) -> Result<()> {
        self.proc.signal(libc::SIGTERM)?;
        let status = self.proc.wait_exit(std::time::Duration::from_secs(30))?;
        ensure!(
            status.success(),
            "agent {} exit: {status}\n{}",
            self.id,
            self.log_tail(30)
        );
        Ok(())
    }

    /// Reads the spool with the agent's own spool code; only after the agent exited. Opening also
    /// repairs, exactly as the agent would on its next start.
    pub fn spool_summary(&mut self) -> Result<SpoolSummary> {
        if self.proc.is_running() {
            bail!("agent {} still running; stop it first", self.id);
        }
        let (spool, _report) = mxscope_agent::spool::Spool::open(&self.spool, 256 << 20)
            .with_context(|| format!("open spool {}", self.spool.display()))?;
        Ok(SpoolSummary {
            highest_seq: spool.highest_seq(),
            acked_seq: spool.acked_seq(),
            depth: spool.depth(),
            dropped_total: spool.dropped_total(),
        })
    }
}

/// One record as found in a spool segment file (format in `agent/src/spool.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub segment: PathBuf,
    pub seq: u64,
    /// Byte offset of the record header in its segment.
    pub offset: u64,
    pub payload_len: u64,
}

/// Spool record header: magic, seq, payload length, crc32.
pub const RECORD_HEADER: u64 = 20;
const RECORD_MAGIC: &[u8; 4] = b"MXSR";

/// Every complete record of every segment in `dir`, by seq. Reads while the agent writes are fine:
/// a record still being written is incomplete and left out.
pub fn spool_records(dir: &Path) -> Result<Vec<RawRecord>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "seg") {
            continue;
        }
        let buf = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let mut off = 0usize;
        while off + RECORD_HEADER as usize <= buf.len() && &buf[off..off + 4] == RECORD_MAGIC {
            let seq = u64::from_le_bytes(buf[off + 4..off + 12].try_into()?);
            let len = u32::from_le_bytes(buf[off + 12..off + 16].try_into()?) as usize;
            let end = off + RECORD_HEADER as usize + len;
            if end > buf.len() {
                break;
            }
            out.push(RawRecord {
                segment: path.clone(),
                seq,
                offset: off as u64,
                payload_len: len as u64,
            });
            off = end;
        }
    }
    out.sort_by_key(|r| r.seq);
    Ok(out)
}

/// Cuts the segment inside `r`'s payload, as a crash in the middle of writing it would.
pub fn tear(r: &RawRecord) -> Result<()> {
    let f = fs::OpenOptions::new().write(true).open(&r.segment)?;
    f.set_len(r.offset + RECORD_HEADER + r.payload_len / 2)?;
    f.sync_all()?;
    Ok(())
}

/// Flips one bit in the middle of `r`'s payload (its checksum no longer matches).
pub fn flip_payload_byte(r: &RawRecord) -> Result<()> {
    let mut buf = fs::read(&r.segment)?;
    let at = (r.offset + RECORD_HEADER + r.payload_len / 2) as usize;
    buf[at] ^= 0x10;
    fs::write(&r.segment, buf)?;
    Ok(())
}

/// The `agents` row of `id` as (stored_up_to_seq, dropped_total), if the collector knows it.
pub fn agent_counts(ctl: &Ctl, id: &str) -> Result<Option<(u64, u64)>> {
    Ok(ctl.agents()?.into_iter().find(|r| r.id == id).map(|r| {
        let dropped = r
            .extra
            .get("dropped_total")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        (r.stored_up_to_seq, dropped)
    }))
}

/// Seqs the collector stored for `id`: fails on a duplicate or if the query cap was reached.
pub fn stored_seqs(ctl: &Ctl, id: &str) -> Result<BTreeSet<u64>> {
    let rows = ctl.results_of(id, RESULTS_LIMIT)?;
    ensure!(
        rows.len() < RESULTS_LIMIT as usize,
        "agent {id}: {} rows reach the per-query cap; the test must produce fewer",
        rows.len()
    );
    let mut seqs = BTreeSet::new();
    for r in &rows {
        ensure!(
            r.agent_id == id,
            "row of agent {} in {id}'s results",
            r.agent_id
        );
        ensure!(seqs.insert(r.seq), "agent {id}: seq {} stored twice", r.seq);
    }
    Ok(seqs)
}

/// Asserts that the collector holds exactly `expected` for `id`, once each, and names the
/// difference when it does not.
pub fn assert_stored_exactly(ctl: &Ctl, id: &str, expected: &BTreeSet<u64>) -> Result<()> {
    ensure!(!expected.is_empty(), "agent {id}: nothing expected");
    let stored = stored_seqs(ctl, id)?;
    let missing: Vec<_> = expected.difference(&stored).collect();
    let unexpected: Vec<_> = stored.difference(expected).collect();
    ensure!(
        missing.is_empty() && unexpected.is_empty(),
        "agent {id}: expected {} seqs ({}..={}), stored {}; missing {missing:?}, unexpected {unexpected:?}",
        expected.len(),
        expected.first().unwrap_or(&0),
        expected.last().unwrap_or(&0),
        stored.len()
    );
    Ok(())
}

/// A tmpfs mounted on a directory of ours; unmounted on drop (lazily if still busy).
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE tmpfs DIR` (root only); `dir` is created.
    pub fn mount(dir: &Path, size: &str) -> Result<Tmpfs> {
        fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .context("run mount")?;
        ensure!(
            out.status.success(),
            "mount tmpfs on {} failed (root needed): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes `name` until the filesystem is full; returns the bytes written.
    pub fn fill(&self, name: &str) -> Result<u64> {
        let path = self.dir.join(name);
        let mut f = fs::File::create(&path)?;
        let chunk = vec![0xa5u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e).context("fill tmpfs"),
            }
        }
        // Whatever is left is smaller than a chunk: take it byte-wise too.
        while let Ok(n) = f.write(&chunk[..1]) {
            if n == 0 {
                break;
            }
            written += 1;
        }
        Ok(written)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Counts the lines of `log` containing every one of `needles`.
pub fn count_lines(log: &str, needles: &[&str]) -> usize {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// The sum of the `key=N` field over the lines of `log` containing `needle`.
pub fn sum_field(log: &str, needle: &str, key: &str) -> u64 {
    let prefix = format!("{key}=");
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(prefix.as_str()))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}
