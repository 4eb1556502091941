//! The spool itself: segment files and state on disk, blocking I/O, owned by one thread (the
//! actor in `actor.rs`). Opening repairs damage and counts what it lost.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mxscope_proto::{pb, Observation};
use prost::Message;
use tracing::{info, warn};

use super::format::{
    encode_record, le_u32, le_u64, parse_record, read_acked_hint, store_state, sync_dir, State,
    ACKED_FILE, ACKED_MAGIC, HEADER_LEN, MAX_RECORD, RECORD_MAGIC, STATE_FILE,
};
use super::{io_err, OpenReport, SpoolError, SpoolOptions, ACK_WRITE_INTERVAL, READ_BATCH_BYTES};

#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    seq: u64,
    offset: u64,
    len: u32,
}

#[derive(Debug)]
pub(super) struct Segment {
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
    /// The directory the spool lives in.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

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
            // `N.seg.moving`: a segment being renamed to `N.seg` when the agent stopped (see
            // `name_segments`); it is that segment.
            let base = name.strip_suffix(MOVING).unwrap_or(name);
            if let Some(first) = base
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
                    let from = last_seen.max(covered).saturating_add(1);
                    let lost = new_state.count_lost(from, seq.saturating_sub(1));
                    if lost > 0 {
                        warn!(path = %path.display(), lost_records = lost, first_lost = seq.saturating_sub(lost),
                            "spool records lost to damage");
                        report.lost_records = report.lost_records.saturating_add(lost);
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
                    if seq == last_seen.max(covered).saturating_add(1) {
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

        spool.next_seq = covered.max(last_seen).max(gone).saturating_add(1);
        spool.name_segments()?;
        if new_state != spool.state {
            spool.write_state(new_state)?;
        }
        sync_dir(dir)?;
        report.depth = spool.depth();
        report.highest_seq = spool.highest_seq();
        Ok((spool, report))
    }

    /// Renames every kept segment after its first live record, as the writer names the segments
    /// it starts: then the names ascend with the records and stay below the next seq, so a new
    /// segment never takes the name of a kept one (a file misnamed by hand or by damage would
    /// otherwise be truncated by it, or sort after it and have its records skipped). In two
    /// steps through `N.seg.moving`, which `open_with` reads as `N.seg`, so a stop in between
    /// loses nothing and no rename overwrites a segment not yet moved.
    fn name_segments(&mut self) -> Result<(), SpoolError> {
        let mut moved = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            let Some(first) = seg.entries.first() else {
                continue;
            };
            let want = self.dir.join(format!("{:020}.seg", first.seq));
            if seg.path != want {
                let moving = self.dir.join(format!("{:020}.seg{MOVING}", first.seq));
                fs::rename(&seg.path, &moving).map_err(io_err(&seg.path))?;
                moved.push((i, moving, want));
            }
        }
        if moved.is_empty() {
            return Ok(());
        }
        sync_dir(&self.dir)?;
        for (i, moving, want) in moved {
            fs::rename(&moving, &want).map_err(io_err(&moving))?;
            warn!(path = %want.display(), "spool segment renamed after its first record");
            if let Some(seg) = self.segments.get_mut(i) {
                seg.path = want;
            }
        }
        sync_dir(&self.dir)
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
                seq = seq.saturating_add(1);
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
            st.dropped_total = st.dropped_total.saturating_add(dropped);
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
        let start = after_seq.max(self.state.acked).saturating_add(1);
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
        self.next_seq = self.next_seq.max(up_to_seq.saturating_add(1));
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
        self.next_seq = n.saturating_add(1);
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

/// Suffix of a segment file while `name_segments` renames it.
const MOVING: &str = ".moving";
