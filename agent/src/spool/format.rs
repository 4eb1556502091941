//! The spool's on-disk encoding: result records in segment files, the state file and the `acked`
//! hint, each checksummed (crc32), and the durable replacement of the state file.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use super::{io_err, SpoolError};

pub(super) const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"MXSR");
pub(super) const STATE_MAGIC: u32 = u32::from_le_bytes(*b"MXST");
pub(super) const HEADER_LEN: usize = 20;
pub(super) const STATE_FIXED: usize = 4 + 4 * 8 + 4;
/// Lost ranges remembered at most (older ones merge into the first).
pub(super) const MAX_LOST_RANGES: usize = 1024;
/// Upper bound of one record's payload; anything larger in a header is damage.
pub(super) const MAX_RECORD: usize = 4 << 20;
pub(super) const STATE_FILE: &str = "state";
pub(super) const STATE_TMP: &str = "state.tmp";
pub(super) const ACKED_FILE: &str = "acked";
pub(super) const ACKED_MAGIC: u32 = u32::from_le_bytes(*b"MXSA");

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct State {
    pub(super) acked: u64,
    pub(super) dropped_total: u64,
    /// Records up to this seq were dropped (spool full) or acked: gone on purpose.
    pub(super) dropped_through: u64,
    /// Seqs up to this are known to the collector (its Welcome); never assign them again.
    pub(super) seq_floor: u64,
    /// Seq ranges (inclusive, sorted, disjoint) already counted into `dropped_total`.
    pub(super) lost: Vec<(u64, u64)>,
}

impl State {
    pub(super) fn encode(&self) -> Vec<u8> {
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

    pub(super) fn decode(b: &[u8]) -> Option<State> {
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
    pub(super) fn covered(&self) -> u64 {
        self.acked.max(self.dropped_through).max(self.seq_floor)
    }

    /// Counts the seqs `from..=to` as lost, except those counted before; returns how many are new.
    pub(super) fn count_lost(&mut self, from: u64, to: u64) -> u64 {
        if from > to {
            return 0;
        }
        // Saturating: a state file with a valid checksum but overlapping ranges (never written by
        // the agent) must not panic the open.
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
            .fold(0, u64::saturating_add);
        let new = (to - from + 1).saturating_sub(known);
        self.dropped_total = self.dropped_total.saturating_add(new);
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
    pub(super) fn prune(&mut self) {
        let gone = self.acked.max(self.dropped_through);
        self.lost.retain(|&(_, b)| b > gone);
    }
}

pub(super) fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub(super) fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A record at `off` whose header and checksum are valid: (seq, payload len).
pub(super) fn parse_record(buf: &[u8], off: usize) -> Option<(u64, usize)> {
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

pub(super) fn record_crc(seq: u64, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

pub(super) fn encode_record(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&record_crc(seq, len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Replaces the state file atomically and durably: write temp, fsync, rename, fsync directory.
pub(super) fn store_state(dir: &Path, st: &State) -> Result<(), SpoolError> {
    let tmp = dir.join(STATE_TMP);
    let path = dir.join(STATE_FILE);
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&st.encode()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

/// The acked seq in the `acked` hint, if the file is there and intact.
pub(super) fn read_acked_hint(path: &Path) -> Option<u64> {
    let b = fs::read(path).ok()?;
    if b.len() < 16 || le_u32(&b, 0)? != ACKED_MAGIC || crc32fast::hash(&b[..12]) != le_u32(&b, 12)?
    {
        return None;
    }
    le_u64(&b, 4)
}
