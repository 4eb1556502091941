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

mod actor;
mod disk;
mod format;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use actor::{SpoolHandle, SpoolStats};
pub use disk::Spool;

/// Default segment size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 4 << 20;
/// A batch read never carries more payload bytes than this (keeps gRPC messages small).
pub const READ_BATCH_BYTES: usize = 2 << 20;
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
