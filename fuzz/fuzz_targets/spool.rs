//! Spool segments and state (`agent/src/spool`): files made from the input in an empty directory,
//! `Spool::open` (which repairs what is damaged), every result read back, one append, a reopen.
//! Input, read with `arbitrary::Unstructured`: the `state` file and the `acked` hint (absent, raw
//! bytes, or well formed with checksums), then up to four segment files of records (well formed,
//! with a byte flipped, cut short) and raw bytes. Mostly the seqs are small and ascend and each
//! segment is named after its first record, as the agent writes them: then no seq is read twice and
//! the appended result is read back after the reopen. Otherwise names and seqs are anything (up to
//! u64::MAX): no panic, and opening never fails on content.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use mxscope_agent::spool::{Spool, SpoolOptions};
use mxscope_proto::{pb, CheckKind, Endpoint, Observation};
use prost::Message;

/// Everything about the files that the checks depend on.
struct Layout {
    /// Seqs ascend and each segment is named after its first record.
    ordered: bool,
}

fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// A record as `spool/format.rs` lays it out: magic, seq, len, crc32(seq ‖ len ‖ payload), payload.
fn record(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(b"MXSR");
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc(&[&seq.to_le_bytes(), &len.to_le_bytes(), payload]).to_le_bytes());
    out.extend_from_slice(payload);
}

/// A seq: small, or when `wide` sometimes anything (up to u64::MAX, where the seq space is spent).
fn any_seq(u: &mut Unstructured<'_>, wide: bool) -> Result<u64> {
    if wide && u.ratio(1, 4)? {
        u.arbitrary()
    } else {
        u.int_in_range(0..=64)
    }
}

fn payload(u: &mut Unstructured<'_>, seq: u64, ordered: bool) -> Result<Vec<u8>> {
    if !ordered && u.ratio(1, 4)? {
        let n = u.int_in_range(0..=64)?;
        return Ok(u.bytes(n)?.to_vec());
    }
    let target: String = u.arbitrary()?;
    Ok(pb::ProbeResult {
        agent_id: "agent-fuzz".to_string(),
        seq,
        target,
        check: "smtp".to_string(),
        start_us: u.arbitrary()?,
        outcome: 1,
        ..Default::default()
    }
    .encode_to_vec())
}

fn state_file(u: &mut Unstructured<'_>, wide: bool) -> Result<Option<Vec<u8>>> {
    Ok(match u.int_in_range(0..=3)? {
        0 => None,
        1 => {
            let n = u.int_in_range(0..=64)?;
            Some(u.bytes(n)?.to_vec())
        }
        _ => {
            let mut b = b"MXST".to_vec();
            for _ in 0..4 {
                b.extend_from_slice(&any_seq(u, wide)?.to_le_bytes());
            }
            let n = u.int_in_range(0u32..=4)?;
            b.extend_from_slice(&n.to_le_bytes());
            for _ in 0..2 * n {
                b.extend_from_slice(&any_seq(u, wide)?.to_le_bytes());
            }
            b.extend_from_slice(&crc(&[&b]).to_le_bytes());
            Some(b)
        }
    })
}

fn acked_file(u: &mut Unstructured<'_>, wide: bool) -> Result<Option<Vec<u8>>> {
    Ok(match u.int_in_range(0..=2)? {
        0 => None,
        1 => {
            let n = u.int_in_range(0..=20)?;
            Some(u.bytes(n)?.to_vec())
        }
        _ => {
            let mut b = b"MXSA".to_vec();
            b.extend_from_slice(&any_seq(u, wide)?.to_le_bytes());
            b.extend_from_slice(&crc(&[&b]).to_le_bytes());
            Some(b)
        }
    })
}

/// Segment files as (name seq, bytes).
fn segments(u: &mut Unstructured<'_>, layout: &Layout) -> Result<Vec<(u64, Vec<u8>)>> {
    let wide = !layout.ordered;
    let mut out = Vec::new();
    let mut next = u.int_in_range(1..=16)?;
    for _ in 0..u.int_in_range(0..=4)? {
        let mut name = None;
        let mut bytes = Vec::new();
        for _ in 0..u.int_in_range(0..=6)? {
            let seq = if layout.ordered {
                next += u.int_in_range(0..=2)?;
                next
            } else {
                any_seq(u, wide)?
            };
            next += 1;
            let start = bytes.len();
            match u.int_in_range(0..=5)? {
                0 => {
                    let n = u.int_in_range(0..=32)?;
                    bytes.extend_from_slice(u.bytes(n)?);
                }
                kind => {
                    name.get_or_insert(seq);
                    let p = payload(u, seq, layout.ordered)?;
                    record(&mut bytes, seq, &p);
                    match kind {
                        // one byte flipped somewhere in the record
                        1 => {
                            let at = u.int_in_range(start..=bytes.len() - 1)?;
                            bytes[at] ^= u.int_in_range(1..=255)?;
                        }
                        // cut short (a torn write)
                        2 => {
                            let keep = u.int_in_range(start..=bytes.len() - 1)?;
                            bytes.truncate(keep);
                        }
                        _ => {}
                    }
                }
            }
        }
        let name = match name {
            Some(n) if layout.ordered => n,
            _ => any_seq(u, wide)?,
        };
        out.push((name, bytes));
    }
    Ok(out)
}

fn observation() -> Observation {
    Observation::new(
        "appended.example.test",
        Endpoint::host("appended.example.test"),
        CheckKind::Smtp,
        1,
    )
}

/// Reads every result after the acked seq; with ordered files, each seq at most once, ascending.
fn read_all(spool: &mut Spool, layout: &Layout) -> Vec<pb::ProbeResult> {
    let depth = spool.depth();
    let results = spool.read_from(0, usize::MAX).expect("read");
    assert!(results.len() as u64 <= depth);
    if layout.ordered {
        assert!(
            results.windows(2).all(|w| w[0].seq < w[1].seq),
            "a seq read twice or out of order"
        );
        assert!(results
            .iter()
            .all(|r| r.seq > spool.acked_seq() && r.seq <= spool.highest_seq()));
    }
    results
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let layout = Layout {
        ordered: !u.ratio(1, 8)?,
    };
    let state = state_file(u, !layout.ordered)?;
    let acked = acked_file(u, !layout.ordered)?;
    let segments = segments(u, &layout)?;
    let opts = SpoolOptions {
        max_bytes: u.int_in_range(1024..=1 << 20)?,
        segment_bytes: u.int_in_range(1024..=1 << 16)?,
    };

    let base = std::path::Path::new("/dev/shm");
    let dir = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    }
    .expect("temp dir");
    if let Some(b) = state {
        std::fs::write(dir.path().join("state"), b).expect("write state");
    }
    if let Some(b) = acked {
        std::fs::write(dir.path().join("acked"), b).expect("write acked");
    }
    for (name, bytes) in &segments {
        std::fs::write(dir.path().join(format!("{name:020}.seg")), bytes).expect("write segment");
    }

    let (mut spool, report) =
        Spool::open_with(dir.path(), opts).expect("open never fails on content");
    assert_eq!(report.depth, spool.depth());
    assert_eq!(report.highest_seq, spool.highest_seq());
    read_all(&mut spool, &layout);
    let before = spool.highest_seq();
    let seqs = spool
        .append("agent-fuzz", vec![observation()])
        .expect("append");
    let [seq] = seqs[..] else {
        panic!("one seq per observation: {seqs:?}");
    };
    assert!(seq == u64::MAX || (seq > before && seq > spool.acked_seq()));
    drop(spool);

    let (mut spool, _) = Spool::open_with(dir.path(), opts).expect("reopen");
    // (the highest seq is one below the next, which stops at u64::MAX)
    assert!(
        spool.highest_seq() >= seq.min(u64::MAX - 1),
        "seq went backwards"
    );
    let results = read_all(&mut spool, &layout);
    // At u64::MAX the seq space is spent (seqs saturate there); below it nothing appended is lost.
    if layout.ordered && seq < u64::MAX {
        assert!(
            results
                .iter()
                .any(|r| r.seq == seq && r.target == "appended.example.test"),
            "the appended result is gone"
        );
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
