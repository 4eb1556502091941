//! The durable queue between probes and the uplink: append-only, checksummed segment files plus a
//! small state file. A result is fsynced here before anyone sends it and removed only once acked.
//!
//! On-disk format (all integers little-endian):
//! - segment `NNNNNNNNNNNNNNNNNNNN.seg` (the seq of its first record), a run of records:
//!   `magic u32 = "MXSR" | seq u64 | len u32 | crc32(seq ‖ len ‖ payload) u32 | payload`,
//!   the payload being a prost-encoded `pb::ProbeResult`;
//! - `state`: acked seq, dropped total, dropped-through seq, seq floor, the seq ranges already
//!   counted as lost, crc32; replaced atomically (write temp, fsync, rename, fsync directory);
//! - `acked`: `magic u32 = "MXSA" | acked seq u64 | crc32 u32`, a hint overwritten in place
//!   without fsync; on open it raises the state's acked seq when valid and is ignored otherwise.
//!
//! Fsync policy (group commit): every `append` call writes all its records with one `write` and one
//! `fsync` before it returns, so an assigned seq is durable before the uplink can send it; the
//! [`SpoolHandle`] actor lingers up to [`APPEND_LINGER`] after an append to merge the appends
//! arriving meanwhile into one write and one fsync. Every drop, seq floor and counted loss is
//! fsynced (state file) at once. An ack is kept in memory and written lazily to the `acked` hint
//! (at most every [`ACK_WRITE_INTERVAL`], no fsync): a crash may forget the last acks, and the
//! results are then sent again and deduplicated by the collector, whose Welcome tells the agent
//! what it stored. The acked seq is made durable in the state file before any segment it makes
//! obsolete is deleted, before it moves the next seq ahead, and on [`SpoolHandle::sync`] (clean
//! shutdown). The segment being appended to is kept when fully acked, so a trickle of acks deletes
//! and creates no files. The next seq after a crash is above the acked seq, the last record and the
//! floor, so it never goes backwards.
//!
//! Damage found on open: a torn or damaged tail is truncated to the last good record; if the cut
//! record's header still names its seq, that result is counted as lost and its seq is never given
//! again (bytes without a readable header name no result). A damaged record elsewhere is skipped
//! by scanning for the next valid record, and the records lost are counted exactly from the seq
//! gap. Every loss is logged and added to `dropped_total` once (the state remembers the ranges it
//! counted), so the collector sees it in the next hello or heartbeat.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mxscope_proto::{pb, Observation};
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"MXSR");
const STATE_MAGIC: u32 = u32::from_le_bytes(*b"MXST");
const HEADER_LEN: usize = 20;
const STATE_FIXED: usize = 4 + 4 * 8 + 4;
/// Lost ranges remembered at most (older ones merge into the first).
const MAX_LOST_RANGES: usize = 1024;
/// Upper bound of one record's payload; anything larger in a header is damage.
const MAX_RECORD: usize = 4 << 20;
/// Default segment size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 4 << 20;
/// A batch read never carries more payload bytes than this (keeps gRPC messages small).
pub const READ_BATCH_BYTES: usize = 2 << 20;
const STATE_FILE: &str = "state";
const STATE_TMP: &str = "state.tmp";
const ACKED_FILE: &str = "acked";
const ACKED_MAGIC: u32 = u32::from_le_bytes(*b"MXSA");
/// The `acked` hint is rewritten at most this often (a clean shutdown writes the state durably).
pub const ACK_WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// After an append, the spool thread waits this long for more appends to share its write and fsync.
pub const APPEND_LINGER: Duration = Duration::from_millis(50);

/// A spool failure: the operation did not happen (or, for append, its seqs are counted as dropped).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spool record of {len} bytes is larger than the limit")]
    TooLarge { len: usize },
    #[error("spool is closed")]
    Closed,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Size limits of a spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Bound of all segment files together; beyond it the oldest segments are dropped.
    pub max_bytes: u64,
    /// A new segment is started when the current one would grow beyond this.
    pub segment_bytes: u64,
}

impl SpoolOptions {
    pub fn new(max_bytes: u64) -> Self {
        SpoolOptions {
            max_bytes,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }

    /// Segments small enough that dropping one never throws away most of the spool.
    fn effective_segment_bytes(&self) -> u64 {
        self.segment_bytes.min(self.max_bytes / 4).max(1024)
    }
}

/// What opening found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Records lost to damage found now (already counted into `dropped_total`).
    pub lost_records: u64,
    /// Bytes cut off torn segment tails.
    pub truncated_bytes: u64,
    /// Unacked records held.
    pub depth: u64,
    /// Highest seq assigned so far.
    pub highest_seq: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct State {
    acked: u64,
    dropped_total: u64,
    /// Records up to this seq were dropped (spool full) or acked: gone on purpose.
    dropped_through: u64,
    /// Seqs up to this are known to the collector (its Welcome); never assign them again.
    seq_floor: u64,
    /// Seq ranges (inclusive, sorted, disjoint) already counted into `dropped_total`.
    lost: Vec<(u64, u64)>,
}

impl State {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(STATE_FIXED + self.lost.len() * 16 + 4);
        b.extend_from_slice(&STATE_MAGIC.to_le_bytes());
        for v in [
            self.acked,
            self.dropped_total,
            self.dropped_through,
            self.seq_floor,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(self.lost.len() as u32).to_le_bytes());
        for (from, to) in &self.lost {
            b.extend_from_slice(&from.to_le_bytes());
            b.extend_from_slice(&to.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<State> {
        if b.len() < STATE_FIXED + 4 || le_u32(b, 0)? != STATE_MAGIC {
            return None;
        }
        let body = b.len() - 4;
        if crc32fast::hash(&b[..body]) != le_u32(b, body)? {
            return None;
        }
        let n = le_u32(b, 36)? as usize;
        if body != STATE_FIXED + n * 16 {
            return None;
        }
        let lost = (0..n)
            .map(|i| {
                Some((
                    le_u64(b, STATE_FIXED + i * 16)?,
                    le_u64(b, STATE_FIXED + i * 16 + 8)?,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(State {
            acked: le_u64(b, 4)?,
            dropped_total: le_u64(b, 12)?,
            dropped_through: le_u64(b, 20)?,
            seq_floor: le_u64(b, 28)?,
            lost,
        })
    }

    /// Seqs at or below this are accounted for: acked, dropped or known to the collector.
    fn covered(&self) -> u64 {
        self.acked.max(self.dropped_through).max(self.seq_floor)
    }

    /// Counts the seqs `from..=to` as lost, except those counted before; returns how many are new.
    fn count_lost(&mut self, from: u64, to: u64) -> u64 {
        if from > to {
            return 0;
        }
        let known: u64 = self
            .lost
            .iter()
            .map(|&(a, b)| {
                let (lo, hi) = (a.max(from), b.min(to));
                if lo <= hi {
                    hi - lo + 1
                } else {
                    0
                }
            })
            .sum();
        let new = (to - from + 1) - known;
        self.dropped_total += new;
        self.lost.push((from, to));
        self.lost.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.lost.len());
        for (a, b) in self.lost.drain(..) {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        if merged.len() > MAX_LOST_RANGES {
            let extra = merged.len() - MAX_LOST_RANGES;
            let first = merged[0].0;
            merged.drain(..extra);
            merged[0].0 = first;
        }
        self.lost = merged;
        new
    }

    /// Forgets lost ranges nothing can be found below any more.
    fn prune(&mut self) {
        let gone = self.acked.max(self.dropped_through);
        self.lost.retain(|&(_, b)| b > gone);
    }
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    bytes: u64,
    entries: Vec<Entry>,
}

impl Segment {
    fn last_seq(&self) -> Option<u64> {
        self.entries.last().map(|e| e.seq)
    }

    /// Entries with seq above `acked`.
    fn unacked(&self, acked: u64) -> usize {
        self.entries.len() - self.entries.partition_point(|e| e.seq <= acked)
    }
}

/// A record at `off` whose header and checksum are valid: (seq, payload len).
fn parse_record(buf: &[u8], off: usize) -> Option<(u64, usize)> {
    if le_u32(buf, off)? != RECORD_MAGIC {
        return None;
    }
    let seq = le_u64(buf, off + 4)?;
    let len = le_u32(buf, off + 12)? as usize;
    let crc = le_u32(buf, off + 16)?;
    if len > MAX_RECORD {
        return None;
    }
    let payload = buf.get(off + HEADER_LEN..off + HEADER_LEN + len)?;
    (record_crc(seq, len as u32, payload) == crc).then_some((seq, len))
}

fn record_crc(seq: u64, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn encode_record(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&record_crc(seq, len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// The spool itself: blocking file I/O, owned by one thread (see [`SpoolHandle`]).
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    opts: SpoolOptions,
    segments: VecDeque<Segment>,
    /// Open for appending to the last segment; `None` = the next append starts a new segment.
    writer: Option<File>,
    state: State,
    next_seq: u64,
    /// The acked seq in the state file (durable).
    durable_acked: u64,
    /// The acked seq in the `acked` hint (or in the state file, whichever is higher).
    written_acked: u64,
    /// When the hint was last written.
    acked_written_at: Option<Instant>,
    /// The `acked` hint, opened on first use.
    acked_file: Option<File>,
}

impl Spool {
    /// Opens (or creates) the spool in `dir` with default segment size.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Spool, OpenReport), SpoolError> {
        Spool::open_with(dir, SpoolOptions::new(max_bytes))
    }

    /// Opens (or creates) the spool, repairing damage and reporting what was lost.
    pub fn open_with(dir: &Path, opts: SpoolOptions) -> Result<(Spool, OpenReport), SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let state_path = dir.join(STATE_FILE);
        let state = match fs::read(&state_path) {
            Ok(b) => State::decode(&b).unwrap_or_else(|| {
                warn!(path = %state_path.display(), "spool state damaged, rebuilding from segments");
                State::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_err(&state_path)(e)),
        };
        let mut state = state;
        if let Some(hint) = read_acked_hint(&dir.join(ACKED_FILE)) {
            if hint > state.acked {
                // Acks written lazily before a crash or shutdown: durable before anything relies
                // on them (the scan below deletes segments they made obsolete).
                state.acked = hint;
                state.prune();
                store_state(dir, &state)?;
            }
        }
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(first) = name
                .strip_suffix(".seg")
                .and_then(|n| n.parse::<u64>().ok())
            {
                names.push((first, entry.path()));
            }
        }
        names.sort();

        let mut new_state = state.clone();
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            opts,
            segments: VecDeque::new(),
            writer: None,
            durable_acked: state.acked,
            written_acked: state.acked,
            acked_written_at: None,
            acked_file: None,
            state,
            next_seq: 1,
        };
        let mut report = OpenReport::default();
        let gone = spool.state.acked.max(spool.state.dropped_through);
        let covered = spool.state.covered();
        let mut last_seen = 0u64;
        for (_, path) in names {
            let buf = fs::read(&path).map_err(io_err(&path))?;
            let mut entries = Vec::new();
            let mut off = 0usize;
            let mut damaged_at: Option<usize> = None;
            while off < buf.len() {
                let Some((seq, len)) = parse_record(&buf, off) else {
                    // Resync: the next offset holding a valid record, if any.
                    let next = (off + 1..buf.len().saturating_sub(HEADER_LEN - 1))
                        .find(|&o| parse_record(&buf, o).is_some());
                    match next {
                        Some(o) => {
                            warn!(path = %path.display(), offset = off, skipped_bytes = o - off,
                                "spool record damaged, skipping to the next valid record");
                            off = o;
                            continue;
                        }
                        None => {
                            damaged_at = Some(off);
                            break;
                        }
                    }
                };
                if seq > last_seen {
                    let from = last_seen.max(covered) + 1;
                    let lost = new_state.count_lost(from, seq.saturating_sub(1));
                    if lost > 0 {
                        warn!(path = %path.display(), lost_records = lost, first_lost = seq - lost,
                            "spool records lost to damage");
                        report.lost_records += lost;
                    }
                    last_seen = seq;
                    if seq > gone {
                        entries.push(Entry {
                            seq,
                            offset: off as u64,
                            len: len as u32,
                        });
                    }
                }
                off += HEADER_LEN + len;
            }
            let mut bytes = buf.len() as u64;
            if let Some(at) = damaged_at {
                // A record whose header still names the next seq was given that seq for a finished
                // probe: damaged after its commit or torn while being written, its result is gone.
                // Count it and never give its seq again. Bytes without a readable header (zero
                // fill, a torn header) name no result and are only cut off.
                if let (Some(RECORD_MAGIC), Some(seq)) = (le_u32(&buf, at), le_u64(&buf, at + 4)) {
                    if seq == last_seen.max(covered) + 1 {
                        warn!(path = %path.display(), seq, "last spool record torn or damaged, dropped");
                        report.lost_records += new_state.count_lost(seq, seq);
                        last_seen = seq;
                    }
                }
                let cut = buf.len() - at;
                warn!(path = %path.display(), offset = at, truncated_bytes = cut,
                    "spool segment has a torn tail, truncating to the last good record");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(at as u64).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
                report.truncated_bytes += cut as u64;
                bytes = at as u64;
            }
            let segment = Segment {
                path,
                bytes,
                entries,
            };
            if segment.entries.is_empty() {
                // Fully acked, dropped or empty: nothing to keep.
                fs::remove_file(&segment.path).map_err(io_err(&segment.path))?;
                continue;
            }
            spool.segments.push_back(segment);
        }

        spool.next_seq = covered.max(last_seen).max(gone) + 1;
        if new_state != spool.state {
            spool.write_state(new_state)?;
        }
        sync_dir(dir)?;
        report.depth = spool.depth();
        report.highest_seq = spool.highest_seq();
        Ok((spool, report))
    }

    /// Appends one probe run's observations with contiguous seqs; durable (fsynced) on return.
    pub fn append(
        &mut self,
        agent_id: &str,
        observations: Vec<Observation>,
    ) -> Result<Vec<u64>, SpoolError> {
        let mut seqs = self.append_group(agent_id, vec![observations])?;
        Ok(seqs.pop().unwrap_or_default())
    }

    /// Appends several callers' observations with one write and one fsync (group commit).
    pub fn append_group(
        &mut self,
        agent_id: &str,
        groups: Vec<Vec<Observation>>,
    ) -> Result<Vec<Vec<u64>>, SpoolError> {
        let count: u64 = groups.iter().map(|g| g.len() as u64).sum();
        if count == 0 {
            return Ok(groups.iter().map(|_| Vec::new()).collect());
        }
        let first = self.next_seq;
        let mut buf = Vec::new();
        let mut offsets = Vec::new();
        let mut seqs = Vec::with_capacity(groups.len());
        let mut seq = first;
        for group in groups {
            let mut these = Vec::with_capacity(group.len());
            for obs in group {
                let payload = obs.into_wire(agent_id, seq).encode_to_vec();
                if payload.len() > MAX_RECORD {
                    return Err(SpoolError::TooLarge { len: payload.len() });
                }
                offsets.push((seq, buf.len() as u64, payload.len() as u32));
                encode_record(&mut buf, seq, &payload);
                these.push(seq);
                seq += 1;
            }
            seqs.push(these);
        }

        if let Err(e) = self.write_records(first, &buf, &offsets) {
            // The seqs are burned (a partial write may hold some of them) and counted as dropped.
            self.writer = None;
            self.next_seq = seq;
            let mut st = self.state.clone();
            st.count_lost(first, seq - 1);
            warn!(error = %e, dropped = count, "spool append failed, results dropped");
            if let Err(e2) = self.write_state(st) {
                warn!(error = %e2, "spool state write failed");
            }
            return Err(e);
        }
        self.next_seq = seq;
        self.enforce_bound()?;
        Ok(seqs)
    }

    fn write_records(
        &mut self,
        first: u64,
        buf: &[u8],
        offsets: &[(u64, u64, u32)],
    ) -> Result<(), SpoolError> {
        let seg_bytes = self.opts.effective_segment_bytes();
        let roll = match self.segments.back() {
            Some(s) => {
                self.writer.is_none() || (s.bytes > 0 && s.bytes + buf.len() as u64 > seg_bytes)
            }
            None => true,
        };
        if roll {
            self.writer = None;
            let path = self.dir.join(format!("{first:020}.seg"));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            // An earlier failed append may have left bytes in a file of this name.
            file.set_len(0).map_err(io_err(&path))?;
            sync_dir(&self.dir)?;
            self.segments.push_back(Segment {
                path,
                bytes: 0,
                entries: Vec::new(),
            });
            self.writer = Some(file);
        }
        let (Some(seg), Some(file)) = (self.segments.back_mut(), self.writer.as_mut()) else {
            return Err(SpoolError::Closed);
        };
        file.write_all(buf).map_err(io_err(&seg.path))?;
        file.sync_data().map_err(io_err(&seg.path))?;
        let base = seg.bytes;
        seg.entries
            .extend(offsets.iter().map(|&(seq, off, len)| Entry {
                seq,
                offset: base + off,
                len,
            }));
        seg.bytes += buf.len() as u64;
        Ok(())
    }

    /// Drops the oldest segments while the spool is over its bound; loss is counted and logged.
    fn enforce_bound(&mut self) -> Result<(), SpoolError> {
        while self.total_bytes() > self.opts.max_bytes && self.segments.len() > 1 {
            let Some(seg) = self.segments.front() else {
                break;
            };
            let dropped = seg.unacked(self.state.acked) as u64;
            let last = seg.last_seq();
            let path = seg.path.clone();
            let mut st = self.state.clone();
            st.dropped_total += dropped;
            if let Some(last) = last {
                st.dropped_through = st.dropped_through.max(last);
            }
            let dropped_total = st.dropped_total;
            self.write_state(st)?;
            fs::remove_file(&path).map_err(io_err(&path))?;
            self.segments.pop_front();
            warn!(
                dropped,
                dropped_total,
                max_bytes = self.opts.max_bytes,
                "spool full, dropped the oldest unsent results"
            );
        }
        Ok(())
    }

    /// Up to `max` unacked results with seq above `after_seq`, ascending. A record damaged since open
    /// is skipped, logged and counted as dropped.
    pub fn read_from(
        &mut self,
        after_seq: u64,
        max: usize,
    ) -> Result<Vec<pb::ProbeResult>, SpoolError> {
        let start = after_seq.max(self.state.acked) + 1;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut damaged = Vec::new();
        'segments: for seg in &self.segments {
            if seg.last_seq().is_none_or(|l| l < start) {
                continue;
            }
            let file = File::open(&seg.path).map_err(io_err(&seg.path))?;
            let from = seg.entries.partition_point(|e| e.seq < start);
            for e in &seg.entries[from..] {
                if out.len() >= max || (bytes > 0 && bytes + e.len as usize > READ_BATCH_BYTES) {
                    break 'segments;
                }
                let mut buf = vec![0u8; HEADER_LEN + e.len as usize];
                file.read_exact_at(&mut buf, e.offset)
                    .map_err(io_err(&seg.path))?;
                let decoded = parse_record(&buf, 0)
                    .filter(|&(seq, _)| seq == e.seq)
                    .and_then(|_| pb::ProbeResult::decode(&buf[HEADER_LEN..]).ok());
                match decoded {
                    Some(r) => {
                        bytes += e.len as usize;
                        out.push(r);
                    }
                    None => damaged.push(e.seq),
                }
            }
        }
        if !damaged.is_empty() {
            warn!(
                lost_records = damaged.len(),
                first_lost = damaged[0],
                "spool records damaged on disk, dropped"
            );
            for seg in &mut self.segments {
                seg.entries.retain(|e| !damaged.contains(&e.seq));
            }
            let mut st = self.state.clone();
            for &seq in &damaged {
                st.count_lost(seq, seq);
            }
            self.write_state(st)?;
        }
        Ok(out)
    }

    /// Records that the collector stored everything up to `up_to_seq`; deletes fully acked segments.
    pub fn ack(&mut self, up_to_seq: u64) -> Result<(), SpoolError> {
        if up_to_seq <= self.state.acked {
            return Ok(());
        }
        // Whole segments this ack makes obsolete; the one being appended to stays open.
        let appending = usize::from(self.writer.is_some());
        let obsolete = self
            .segments
            .iter()
            .take(self.segments.len() - appending)
            .take_while(|seg| seg.last_seq().is_none_or(|l| l <= up_to_seq))
            .count();
        if obsolete > 0 || up_to_seq >= self.next_seq {
            // Durable before the records go, and before the collector's seq moves ours ahead.
            let mut st = self.state.clone();
            st.acked = up_to_seq;
            self.write_state(st)?;
        } else {
            self.state.acked = up_to_seq;
            self.write_acked_hint(false);
        }
        // The collector knows this seq, so it must never be given again.
        self.next_seq = self.next_seq.max(up_to_seq + 1);
        for _ in 0..obsolete {
            let Some(seg) = self.segments.front() else {
                break;
            };
            let path = seg.path.clone();
            if self.segments.len() == 1 {
                self.writer = None;
            }
            fs::remove_file(&path).map_err(io_err(&path))?;
            self.segments.pop_front();
        }
        Ok(())
    }

    /// Writes the in-memory acked seq to the `acked` hint (no fsync) if it changed and the last
    /// write is at least [`ACK_WRITE_INTERVAL`] old, or now when `force`. A failure is only logged:
    /// the hint saves resending, nothing depends on it.
    fn write_acked_hint(&mut self, force: bool) {
        if self.state.acked <= self.written_acked {
            return;
        }
        if !force
            && self
                .acked_written_at
                .is_some_and(|at| at.elapsed() < ACK_WRITE_INTERVAL)
        {
            return;
        }
        // Also after a failure: the next try is one interval later, not in a loop.
        self.acked_written_at = Some(Instant::now());
        let path = self.dir.join(ACKED_FILE);
        if self.acked_file.is_none() {
            match OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
            {
                Ok(f) => self.acked_file = Some(f),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "spool acked hint not written");
                    return;
                }
            }
        }
        let Some(file) = self.acked_file.as_ref() else {
            return;
        };
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&ACKED_MAGIC.to_le_bytes());
        b.extend_from_slice(&self.state.acked.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        match file.write_all_at(&b, 0) {
            Ok(()) => self.written_acked = self.state.acked,
            Err(e) => {
                self.acked_file = None;
                warn!(path = %path.display(), error = %e, "spool acked hint not written");
            }
        }
    }

    /// When the lazily kept acked seq is due to be written to the `acked` hint, if it changed.
    pub fn acked_hint_due(&self) -> Option<Instant> {
        (self.state.acked > self.written_acked).then(|| {
            self.acked_written_at
                .map_or_else(Instant::now, |at| at + ACK_WRITE_INTERVAL)
        })
    }

    /// Writes the acked seq to the `acked` hint now if it changed (no fsync).
    pub fn flush_acked_hint(&mut self) {
        self.write_acked_hint(true);
    }

    /// Makes the acked seq durable (state file, fsynced) if it changed since the last durable write.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if self.state.acked > self.durable_acked {
            self.write_state(self.state.clone())?;
        }
        Ok(())
    }

    /// Makes sure every future seq is above `n` (the collector may know a higher seq than we do).
    pub fn ensure_seq_above(&mut self, n: u64) -> Result<(), SpoolError> {
        if n < self.next_seq {
            return Ok(());
        }
        let mut st = self.state.clone();
        st.seq_floor = n;
        self.write_state(st)?;
        info!(
            from = self.next_seq - 1,
            to = n,
            "collector knows a higher seq, moving ahead"
        );
        self.next_seq = n + 1;
        Ok(())
    }

    /// Unacked records held.
    pub fn depth(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.unacked(self.state.acked) as u64)
            .sum()
    }

    /// Results dropped (spool full or damaged) since the spool was created.
    pub fn dropped_total(&self) -> u64 {
        self.state.dropped_total
    }

    /// Highest seq assigned so far (0 = none).
    pub fn highest_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Highest seq the collector acked.
    pub fn acked_seq(&self) -> u64 {
        self.state.acked
    }

    /// Bytes of all segment files.
    pub fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    fn write_state(&mut self, mut st: State) -> Result<(), SpoolError> {
        st.prune();
        store_state(&self.dir, &st)?;
        self.durable_acked = st.acked;
        self.written_acked = self.written_acked.max(st.acked);
        self.state = st;
        Ok(())
    }
}

impl Drop for Spool {
    /// Best effort: the acks held in memory go to the `acked` hint (a clean shutdown calls
    /// [`Spool::sync`] first, which makes them durable).
    fn drop(&mut self) {
        self.write_acked_hint(true);
    }
}

/// Replaces the state file atomically and durably: write temp, fsync, rename, fsync directory.
fn store_state(dir: &Path, st: &State) -> Result<(), SpoolError> {
    let tmp = dir.join(STATE_TMP);
    let path = dir.join(STATE_FILE);
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&st.encode()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

/// The acked seq in the `acked` hint, if the file is there and intact.
fn read_acked_hint(path: &Path) -> Option<u64> {
    let b = fs::read(path).ok()?;
    if b.len() < 16 || le_u32(&b, 0)? != ACKED_MAGIC || crc32fast::hash(&b[..12]) != le_u32(&b, 12)?
    {
        return None;
    }
    le_u64(&b, 4)
}

// ---------------------------------------------------------------------------------------------
// The async face: one thread owns the spool; callers talk to it through a channel.
// ---------------------------------------------------------------------------------------------

/// Counters readable without a round trip to the spool thread.
#[derive(Debug, Default)]
pub struct SpoolStats {
    pub highest_seq: AtomicU64,
    pub acked_seq: AtomicU64,
    pub depth: AtomicU64,
    pub dropped_total: AtomicU64,
}

impl SpoolStats {
    fn update(&self, s: &Spool) {
        self.highest_seq.store(s.highest_seq(), Ordering::Relaxed);
        self.acked_seq.store(s.acked_seq(), Ordering::Relaxed);
        self.depth.store(s.depth(), Ordering::Relaxed);
        self.dropped_total
            .store(s.dropped_total(), Ordering::Relaxed);
    }
}

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

enum Command {
    Append {
        observations: Vec<Observation>,
        reply: Reply<Vec<u64>>,
    },
    ReadFrom {
        after: u64,
        max: usize,
        reply: Reply<Vec<pb::ProbeResult>>,
    },
    Ack {
        up_to: u64,
        reply: Reply<()>,
    },
    EnsureSeqAbove {
        n: u64,
        reply: Reply<()>,
    },
    Sync {
        reply: Reply<()>,
    },
}

/// Cheap-to-clone handle to the spool thread. The thread ends when the last handle drops.
#[derive(Clone)]
pub struct SpoolHandle {
    tx: mpsc::Sender<Command>,
    stats: Arc<SpoolStats>,
    committed: watch::Receiver<u64>,
}

impl std::fmt::Debug for SpoolHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolHandle").finish_non_exhaustive()
    }
}

impl SpoolHandle {
    /// Moves the spool onto its own thread; `agent_id` stamps every appended result.
    pub fn spawn(spool: Spool, agent_id: String) -> Result<SpoolHandle, SpoolError> {
        let (tx, rx) = mpsc::channel(1024);
        let stats = Arc::new(SpoolStats::default());
        stats.update(&spool);
        let (committed_tx, committed) = watch::channel(spool.highest_seq());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("mxscope-spool".into())
            .spawn(move || actor(spool, agent_id, rx, thread_stats, committed_tx))
            .map_err(|source| SpoolError::Io {
                path: PathBuf::from("<spool thread>"),
                source,
            })?;
        Ok(SpoolHandle {
            tx,
            stats,
            committed,
        })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Appends and fsyncs; returns the seqs given, in order.
    pub async fn append(&self, observations: Vec<Observation>) -> Result<Vec<u64>, SpoolError> {
        self.call(|reply| Command::Append {
            observations,
            reply,
        })
        .await
    }

    pub async fn read_from(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<pb::ProbeResult>, SpoolError> {
        self.call(|reply| Command::ReadFrom { after, max, reply })
            .await
    }

    pub async fn ack(&self, up_to: u64) -> Result<(), SpoolError> {
        self.call(|reply| Command::Ack { up_to, reply }).await
    }

    pub async fn ensure_seq_above(&self, n: u64) -> Result<(), SpoolError> {
        self.call(|reply| Command::EnsureSeqAbove { n, reply })
            .await
    }

    /// Makes the acked seq durable (clean shutdown: the next start resends nothing acked).
    pub async fn sync(&self) -> Result<(), SpoolError> {
        self.call(|reply| Command::Sync { reply }).await
    }

    pub fn stats(&self) -> &SpoolStats {
        &self.stats
    }

    pub fn highest_seq(&self) -> u64 {
        self.stats.highest_seq.load(Ordering::Relaxed)
    }

    pub fn acked_seq(&self) -> u64 {
        self.stats.acked_seq.load(Ordering::Relaxed)
    }

    pub fn depth(&self) -> u64 {
        self.stats.depth.load(Ordering::Relaxed)
    }

    pub fn dropped_total(&self) -> u64 {
        self.stats.dropped_total.load(Ordering::Relaxed)
    }

    /// Highest durable seq; changes after every append.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }
}

/// Appends queued together are committed together (at most this many callers per fsync).
const MAX_GROUP: usize = 256;

fn actor(
    mut spool: Spool,
    agent_id: String,
    mut rx: mpsc::Receiver<Command>,
    stats: Arc<SpoolStats>,
    committed: watch::Sender<u64>,
) {
    // A clock for the append linger and the lazy ack write; nothing else runs on it.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            warn!(error = %e, "spool thread has no timer: appends are not lingered, acks written at once");
            None
        }
    };
    // The next command, or `None` when every handle is gone. Waits until `deadline` at most
    // (`Err` = it passed).
    let next = |rx: &mut mpsc::Receiver<Command>, deadline: Option<Instant>| match (deadline, &rt) {
        (Some(at), Some(rt)) => rt.block_on(async {
            tokio::time::timeout_at(tokio::time::Instant::from_std(at), rx.recv())
                .await
                .map_err(|_| ())
        }),
        (Some(_), None) => rx.try_recv().map(Some).map_err(|_| ()),
        (None, _) => Ok(rx.blocking_recv()),
    };
    loop {
        let cmd = match next(&mut rx, spool.acked_hint_due()) {
            Ok(Some(cmd)) => cmd,
            Ok(None) => break,
            Err(()) => {
                spool.flush_acked_hint();
                continue;
            }
        };
        let (observations, reply) = match cmd {
            Command::Append {
                observations,
                reply,
            } => (observations, reply),
            other => {
                handle(&mut spool, other, &stats, &committed);
                continue;
            }
        };
        // Group commit: whatever is appended within the linger shares one write and one fsync;
        // other commands are served meanwhile (the lingering records have no seq yet).
        let mut groups = vec![observations];
        let mut replies = vec![reply];
        let linger_until = Instant::now() + APPEND_LINGER;
        let mut closed = false;
        while replies.len() < MAX_GROUP {
            match next(&mut rx, Some(linger_until)) {
                Ok(Some(Command::Append {
                    observations,
                    reply,
                })) => {
                    groups.push(observations);
                    replies.push(reply);
                }
                Ok(Some(other)) => handle(&mut spool, other, &stats, &committed),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(()) => break,
            }
        }
        let result = spool.append_group(&agent_id, groups);
        // Counters first, so a caller that got its reply never reads older ones.
        publish(&spool, &stats, &committed);
        match result {
            Ok(seqs) => {
                for (reply, seqs) in replies.into_iter().zip(seqs) {
                    let _ = reply.send(Ok(seqs));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let mut first = Some(e);
                for reply in replies {
                    let err = first.take().unwrap_or_else(|| SpoolError::Io {
                        path: spool.dir.clone(),
                        source: io::Error::other(msg.clone()),
                    });
                    let _ = reply.send(Err(err));
                }
            }
        }
        if closed {
            break;
        }
    }
    if let Err(e) = spool.sync() {
        warn!(error = %e, "spool state not written at close");
    }
}

/// Serves one command other than an append.
fn handle(spool: &mut Spool, cmd: Command, stats: &SpoolStats, committed: &watch::Sender<u64>) {
    let (result, reply) = match cmd {
        Command::ReadFrom { after, max, reply } => {
            let result = spool.read_from(after, max);
            publish(spool, stats, committed);
            let _ = reply.send(result);
            return;
        }
        Command::Ack { up_to, reply } => (spool.ack(up_to), reply),
        Command::EnsureSeqAbove { n, reply } => (spool.ensure_seq_above(n), reply),
        Command::Sync { reply } => (spool.sync(), reply),
        Command::Append { reply, .. } => {
            let _ = reply.send(Err(SpoolError::Closed));
            return;
        }
    };
    publish(spool, stats, committed);
    let _ = reply.send(result);
}

fn publish(spool: &Spool, stats: &SpoolStats, committed: &watch::Sender<u64>) {
    stats.update(spool);
    committed.send_replace(spool.highest_seq());
}

#[cfg(test)]
mod tests {
    use super::*;
    use mxscope_proto::{CheckKind, Endpoint};

    fn obs(n: usize) -> Vec<Observation> {
        (0..n)
            .map(|i| {
                let mut o = Observation::new(
                    &format!("t{i}.example"),
                    Endpoint::host("mx.example"),
                    CheckKind::Smtp,
                    1,
                );
                o.message = "x".repeat(40);
                o
            })
            .collect()
    }

    fn small() -> SpoolOptions {
        SpoolOptions {
            max_bytes: 1 << 30,
            segment_bytes: 1024,
        }
    }

    fn seqs(records: &[pb::ProbeResult]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v
    }

    /// Byte offset of the record with `seq` in a segment file.
    fn offset_of(path: &Path, seq: u64) -> usize {
        let buf = fs::read(path).unwrap();
        let mut off = 0;
        while let Some((s, len)) = parse_record(&buf, off) {
            if s == seq {
                return off;
            }
            off += HEADER_LEN + len;
        }
        panic!("seq {seq} not in {}", path.display());
    }

    fn flip(path: &Path, at: usize) {
        let mut buf = fs::read(path).unwrap();
        buf[at] ^= 0x40;
        fs::write(path, buf).unwrap();
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, report) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(report, OpenReport::default());
        assert_eq!(s.append("a1", obs(3)).unwrap(), vec![1, 2, 3]);
        assert_eq!(s.append("a1", obs(2)).unwrap(), vec![4, 5]);
        assert_eq!(s.append("a1", Vec::new()).unwrap(), Vec::<u64>::new());
        let all = s.read_from(0, 100).unwrap();
        assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5]);
        assert_eq!(all[1].agent_id, "a1");
        assert_eq!(all[1].target, "t1.example");
        assert_eq!(all[1].message, "x".repeat(40));
        assert_eq!(seqs(&s.read_from(2, 2).unwrap()), vec![3, 4]);
        assert_eq!(s.depth(), 5);
        assert_eq!(s.highest_seq(), 5);
    }

    #[test]
    fn restart_keeps_seq_and_unacked_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open_with(dir.path(), small()).unwrap();
            s.append("a1", obs(30)).unwrap();
            s.ack(12).unwrap();
        }
        let (mut s, report) = Spool::open_with(dir.path(), small()).unwrap();
        assert_eq!(report.lost_records, 0);
        assert_eq!(report.truncated_bytes, 0);
        assert_eq!(report.depth, 18);
        assert_eq!(s.highest_seq(), 30);
        assert_eq!(s.acked_seq(), 12);
        let rest = s.read_from(0, 100).unwrap();
        assert_eq!(seqs(&rest), (13..=30).collect::<Vec<_>>());
        assert_eq!(s.append("a1", obs(1)).unwrap(), vec![31]);
    }

    #[test]
    fn ack_removes_whole_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open_with(dir.path(), small()).unwrap();
        for _ in 0..20 {
            s.append("a1", obs(3)).unwrap();
        }
        let before = segment_files(dir.path()).len();
        assert!(before > 3, "small segments roll: {before}");
        s.ack(30).unwrap();
        let mid = segment_files(dir.path()).len();
        assert!(mid < before && mid > 0, "{before} -> {mid}");
        assert_eq!(s.depth(), 30);
        assert_eq!(seqs(&s.read_from(0, 1).unwrap()).first(), Some(&31));
        s.ack(60).unwrap();
        // The segment being appended to stays, fully acked, for the next appends.
        assert_eq!(segment_files(dir.path()).len(), 1);
        assert_eq!(s.depth(), 0);
        assert!(s.read_from(0, 10).unwrap().is_empty());
        assert_eq!(s.append("a1", obs(1)).unwrap(), vec![61]);
        drop(s);
        // Reopened, the acked records are gone and appends start a new segment.
        let (mut s, _) = Spool::open_with(dir.path(), small()).unwrap();
        assert_eq!(seqs(&s.read_from(0, 10).unwrap()), vec![61]);
        s.ack(61).unwrap();
        s.append("a1", obs(1)).unwrap();
        assert_eq!(segment_files(dir.path()).len(), 1, "the acked one removed");
    }

    #[test]
    fn torn_tail_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
            s.append("a1", obs(4)).unwrap();
        }
        let seg = &segment_files(dir.path())[0];
        let len = fs::metadata(seg).unwrap().len();
        let last = offset_of(seg, 4) as u64;
        // A crash in the middle of writing record 4.
        let f = OpenOptions::new().write(true).open(seg).unwrap();
        f.set_len(last + 25).unwrap();
        drop(f);
        let (mut s, report) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.truncated_bytes, 25);
        assert_eq!(report.lost_records, 1, "record 4 was given a seq: counted");
        assert_eq!(s.dropped_total(), 1);
        assert_eq!(fs::metadata(seg).unwrap().len(), last);
        assert!(last < len);
        assert_eq!(seqs(&s.read_from(0, 10).unwrap()), vec![1, 2, 3]);
        assert_eq!(
            s.append("a1", obs(1)).unwrap(),
            vec![5],
            "seq 4 is not reused"
        );
        drop(s);
        let (mut s, report) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            report,
            OpenReport {
                depth: 4,
                highest_seq: 5,
                ..Default::default()
            }
        );
        assert_eq!(s.dropped_total(), 1, "counted once");
        assert_eq!(seqs(&s.read_from(0, 10).unwrap()), vec![1, 2, 3, 5]);
    }

    #[test]
    fn torn_header_is_cut_without_counting() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
            s.append("a1", obs(2)).unwrap();
        }
        let seg = &segment_files(dir.path())[0];
        let end = fs::metadata(seg).unwrap().len();
        // A write torn inside the first record's header: no seq can be read.
        let f = OpenOptions::new().append(true).open(seg).unwrap();
        (&f).write_all(&RECORD_MAGIC.to_le_bytes()[..3]).unwrap();
        drop(f);
        let (mut s, report) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.truncated_bytes, 3);
        assert_eq!(report.lost_records, 0);
        assert_eq!(fs::metadata(seg).unwrap().len(), end);
        assert_eq!(s.append("a1", obs(1)).unwrap(), vec![3]);
    }

    #[test]
    fn damaged_last_complete_record_is_counted_and_its_seq_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
            s.append("a1", obs(3)).unwrap();
        }
        let seg = &segment_files(dir.path())[0];
        flip(seg, offset_of(seg, 3) + HEADER_LEN + 5);
        let (mut s, report) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.lost_records, 1);
        assert!(report.truncated_bytes > 0);
        assert_eq!(s.dropped_total(), 1);
        assert_eq!(s.append("a1", obs(1)).unwrap(), vec![4]);
    }

    #[test]
    fn flipped_bytes_in_the_middle_lose_exactly_the_damaged_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
            s.append("a1", obs(10)).unwrap();
        }
        let seg = &segment_files(dir.path())[0];
        // A payload byte of 4, the length field of 7 and the magic of 8.
        let (p4, p7, p8) = (offset_of(seg, 4), offset_of(seg, 7), offset_of(seg, 8));
        flip(seg, p4 + HEADER_LEN + 3);
        flip(seg, p7 + 13);
        flip(seg, p8);
        let (mut s, report) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.lost_records, 3);
        assert_eq!(report.truncated_bytes, 0);
        assert_eq!(s.dropped_total(), 3);
        assert_eq!(
            seqs(&s.read_from(0, 100).unwrap()),
            vec![1, 2, 3, 5, 6, 9, 10]
        );
        assert_eq!(s.depth(), 7);
        assert_eq!(s.append("a1", obs(1)).unwrap(), vec![11]);
        drop(s);
        // Counted once: reopening finds the same gap but does not count it again.
        let (s, report) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.lost_records, 0);
        assert_eq!(s.dropped_total(), 3);
        assert_eq!(s.depth(), 8);
    }

    #[test]
    fn damage_found_while_reading_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append("a1", obs(5)).unwrap();
        let seg = &segment_files(dir.path())[0];
        let at = offset_of(seg, 2) + HEADER_LEN + 1;
        let f = OpenOptions::new().write(true).open(seg).unwrap();
        f.write_all_at(&[0xff, 0xfe], at as u64).unwrap();
        drop(f);
        assert_eq!(seqs(&s.read_from(0, 10).unwrap()), vec![1, 3, 4, 5]);
        assert_eq!(s.dropped_total(), 1);
        assert_eq!(s.depth(), 4);
        drop(s);
        let (s, report) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.lost_records, 0, "already counted");
        assert_eq!(s.dropped_total(), 1);
    }

    #[test]
    fn full_spool_drops_oldest_and_counts_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions {
            max_bytes: 8 * 1024,
            segment_bytes: 2048,
        };
        let (mut s, _) = Spool::open_with(dir.path(), opts).unwrap();
        for _ in 0..100 {
            s.append("a1", obs(2)).unwrap();
        }
        assert!(s.total_bytes() <= opts.max_bytes, "{}", s.total_bytes());
        let held = s.read_from(0, 1000).unwrap();
        assert!(!held.is_empty());
        let first = held[0].seq;
        assert_eq!(
            seqs(&held),
            (first..=200).collect::<Vec<_>>(),
            "newest kept, contiguous"
        );
        assert_eq!(
            s.dropped_total(),
            first - 1,
            "every missing result is counted"
        );
        assert_eq!(s.dropped_total() + s.depth(), 200);
        drop(s);
        let (s, report) = Spool::open_with(dir.path(), opts).unwrap();
        assert_eq!(report.lost_records, 0);
        assert_eq!(s.dropped_total(), first - 1, "persisted");
        assert_eq!(s.highest_seq(), 200);
    }

    #[test]
    fn seq_never_goes_backwards() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open_with(dir.path(), small()).unwrap();
            s.append("a1", obs(5)).unwrap();
            s.ack(5).unwrap();
        }
        {
            let (mut s, _) = Spool::open_with(dir.path(), small()).unwrap();
            assert!(
                segment_files(dir.path()).is_empty(),
                "acked segment removed"
            );
            assert_eq!(s.highest_seq(), 5);
            assert_eq!(s.append("a1", obs(1)).unwrap(), vec![6]);
            s.ensure_seq_above(100).unwrap();
            s.ensure_seq_above(50).unwrap();
            assert_eq!(s.append("a1", obs(2)).unwrap(), vec![101, 102]);
        }
        let (mut s, report) = Spool::open_with(dir.path(), small()).unwrap();
        assert_eq!(
            report.lost_records, 0,
            "the jump to the collector's seq is not a loss"
        );
        assert_eq!(seqs(&s.read_from(0, 10).unwrap()), vec![6, 101, 102]);
        s.ensure_seq_above(100).unwrap();
        s.ack(100).unwrap();
        assert_eq!(seqs(&s.read_from(0, 10).unwrap()), vec![101, 102]);
        // An ack above what we hold (our state was lost) also moves seq ahead.
        s.ack(500).unwrap();
        assert_eq!(s.append("a1", obs(1)).unwrap(), vec![501]);
    }

    #[test]
    fn acks_are_written_lazily_and_made_durable_before_deleting() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open_with(dir.path(), small()).unwrap();
            s.append("a1", obs(10)).unwrap();
            s.ack(2).unwrap(); // first ack: hint written at once
            s.ack(4).unwrap(); // within the interval: memory only
            assert_eq!(s.acked_seq(), 4);
            assert!(s.acked_hint_due().is_some());
            // A crash: nothing runs on the way out.
            std::mem::forget(s);
        }
        {
            let (mut s, _) = Spool::open_with(dir.path(), small()).unwrap();
            assert_eq!(s.acked_seq(), 2, "the hint, not the lost ack");
            assert_eq!(s.highest_seq(), 10, "seq never goes backwards");
            assert_eq!(
                seqs(&s.read_from(0, 100).unwrap()),
                (3..=10).collect::<Vec<_>>()
            );
            s.ack(7).unwrap();
            s.flush_acked_hint();
            assert!(s.acked_hint_due().is_none());
            std::mem::forget(s);
        }
        {
            let (mut s, _) = Spool::open_with(dir.path(), small()).unwrap();
            assert_eq!(s.acked_seq(), 7, "flushed hint");
            // A whole segment made obsolete: durable (state file) before it is deleted.
            for _ in 0..10 {
                s.append("a1", obs(3)).unwrap();
            }
            s.ack(25).unwrap();
            std::mem::forget(s);
        }
        fs::remove_file(dir.path().join(ACKED_FILE)).unwrap();
        let (mut s, report) = Spool::open_with(dir.path(), small()).unwrap();
        assert_eq!(s.acked_seq(), 25, "from the state file alone");
        assert_eq!(report.lost_records, 0);
        assert_eq!(s.highest_seq(), 40);
        s.ack(30).unwrap();
        s.sync().unwrap();
        std::mem::forget(s);
        let _ = fs::remove_file(dir.path().join(ACKED_FILE));
        let (s, _) = Spool::open_with(dir.path(), small()).unwrap();
        assert_eq!(s.acked_seq(), 30, "sync made it durable");
    }

    #[tokio::test]
    async fn handle_commits_concurrent_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        let h = SpoolHandle::spawn(s, "a1".into()).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move { h.append(obs(3)).await.unwrap() }));
        }
        let mut all = Vec::new();
        for t in tasks {
            let seqs = t.await.unwrap();
            assert_eq!(seqs.len(), 3);
            assert_eq!(seqs[1], seqs[0] + 1, "one caller's seqs are contiguous");
            all.extend(seqs);
        }
        all.sort();
        assert_eq!(all, (1..=60).collect::<Vec<_>>());
        assert_eq!(h.highest_seq(), 60);
        assert_eq!(*h.committed().borrow(), 60);
        assert_eq!(h.read_from(50, 100).await.unwrap().len(), 10);
        h.ack(40).await.unwrap();
        assert_eq!(h.depth(), 20);
        assert_eq!(h.acked_seq(), 40);
    }

    mod fuzz {
        //! Property tests: whatever bytes a segment holds (bit rot, a torn write, an attacker with
        //! access to the spool directory), opening and reading never panics, never yields a seq
        //! twice or out of order, and new seqs stay above every seq seen.
        use super::*;
        use proptest::prelude::*;

        /// Opens a damaged spool and checks what must hold whatever the damage; returns the seqs read.
        /// `produced`: the seqs 1..=N written before the damage, when known.
        fn check_invariants(dir: &Path, produced: Option<u64>) -> Vec<u64> {
            let (mut s, report) = Spool::open(dir, 1 << 20).expect("open never fails on bad bytes");
            let got = seqs(&s.read_from(0, 10_000).expect("read"));
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "ascending, unique: {got:?}"
            );
            if let Some(n) = produced {
                assert!(
                    got.iter().all(|q| (1..=n).contains(q)),
                    "only seqs written: {got:?}"
                );
                assert!(
                    report.lost_records + got.len() as u64 <= n,
                    "{report:?} {got:?}"
                );
            }
            let next = s.append("a1", obs(1)).expect("append after repair")[0];
            assert!(
                got.iter().all(|q| *q < next),
                "new seq {next} above {got:?}"
            );
            got
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            #[test]
            fn arbitrary_segment_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
                let dir = tempfile::tempdir().unwrap();
                fs::write(dir.path().join(format!("{:020}.seg", 1)), &bytes).unwrap();
                check_invariants(dir.path(), None);
            }

            #[test]
            fn corrupted_valid_segments_lose_only_damaged_records(
                flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
                cut in any::<prop::sample::Index>(),
                truncate in any::<bool>(),
            ) {
                let dir = tempfile::tempdir().unwrap();
                {
                    let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
                    s.append("a1", obs(20)).unwrap();
                }
                let seg = &segment_files(dir.path())[0];
                let mut buf = fs::read(seg).unwrap();
                // Where each intact record ends, before any damage.
                let mut ends = Vec::new();
                let mut off = 0;
                while let Some((seq, len)) = parse_record(&buf, off) {
                    off += HEADER_LEN + len;
                    ends.push((seq, off));
                }
                prop_assert_eq!(ends.len(), 20);
                let mut first_damage = buf.len();
                for (at, mask) in &flips {
                    let i = at.index(buf.len());
                    buf[i] ^= mask;
                    first_damage = first_damage.min(i);
                }
                if truncate {
                    let c = cut.index(buf.len());
                    buf.truncate(c);
                    first_damage = first_damage.min(c);
                }
                fs::write(seg, &buf).unwrap();
                let got = check_invariants(dir.path(), Some(20));
                for (seq, end) in ends {
                    if end <= first_damage {
                        prop_assert!(got.contains(&seq), "undamaged seq {} lost: {:?}", seq, got);
                    }
                }
            }
        }
    }
}
