//! Spool tests: durability, damage repair, loss counting and the actor.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use mxscope_proto::{pb, CheckKind, Endpoint, Observation};

use super::format::*;
use super::*;

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

#[test]
fn seqs_from_a_collector_at_the_top_of_the_range_do_not_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open_with(dir.path(), small()).unwrap();
    spool.append("a", obs(2)).unwrap();
    // A collector's Welcome or Ack may carry any u64; the spool must neither panic nor wrap.
    spool.ensure_seq_above(u64::MAX).unwrap();
    spool.ack(u64::MAX).unwrap();
    assert_eq!(spool.acked_seq(), u64::MAX);
    assert_eq!(spool.depth(), 0);
    assert!(spool.read_from(u64::MAX, 10).unwrap().is_empty());
}

#[test]
fn a_spool_moved_to_the_top_of_the_seq_range_reopens_and_appends() {
    // Found by fuzz/ (target spool): the seq floor a collector's Welcome put at u64::MAX is durable,
    // and the next open overflowed computing the next seq (panic, or seq 0 in a release build).
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open_with(dir.path(), small()).unwrap();
        spool.append("a", obs(1)).unwrap();
        spool.ensure_seq_above(u64::MAX).unwrap();
    }
    let (mut spool, report) = Spool::open_with(dir.path(), small()).unwrap();
    assert_eq!(report.highest_seq, u64::MAX - 1);
    assert_eq!(report.depth, 1, "the unacked result is kept");
    let appended = spool.append("a", obs(2)).unwrap();
    assert!(appended.iter().all(|&s| s == u64::MAX), "{appended:?}");
    assert_eq!(spool.highest_seq(), u64::MAX - 1);
}

#[test]
fn a_checksummed_state_with_overlapping_lost_ranges_opens() {
    // Found by fuzz/ (target spool): a state file whose checksum holds but whose lost ranges
    // overlap (the agent never writes one) made counting a newly lost seq underflow on open.
    let dir = tempfile::tempdir().unwrap();
    let st = State {
        acked: 0,
        dropped_total: 3,
        dropped_through: 0,
        seq_floor: 0,
        lost: vec![(1, 3), (2, 3), (2, 3)],
    };
    fs::write(dir.path().join(STATE_FILE), st.encode()).unwrap();
    let mut seg = Vec::new();
    encode_record(&mut seg, 4, b"");
    fs::write(dir.path().join(format!("{:020}.seg", 4)), seg).unwrap();
    let (spool, report) = Spool::open_with(dir.path(), small()).unwrap();
    assert_eq!(report.lost_records, 0, "seqs 1 to 3 were counted before");
    assert_eq!(spool.dropped_total(), 3);
    assert_eq!(spool.highest_seq(), 4);
}

#[test]
fn a_dropped_total_at_the_top_of_the_range_saturates_when_the_bound_drops_more() {
    // Found by fuzz/ (target spool, in a clean-clone CI run): a checksummed state whose dropped
    // total is near u64::MAX made dropping the oldest segment (spool over its bound) overflow.
    let dir = tempfile::tempdir().unwrap();
    let st = State {
        acked: 0,
        dropped_total: u64::MAX - 1,
        dropped_through: 0,
        seq_floor: 0,
        lost: Vec::new(),
    };
    fs::write(dir.path().join(STATE_FILE), st.encode()).unwrap();
    let opts = SpoolOptions {
        max_bytes: 4096,
        segment_bytes: 1024,
    };
    let (mut spool, _) = Spool::open_with(dir.path(), opts).unwrap();
    for _ in 0..20 {
        spool.append("a", obs(5)).unwrap();
    }
    assert_eq!(spool.dropped_total(), u64::MAX);
    assert!(spool.depth() > 0, "the newest results are kept");
}

/// A segment named above its records (by hand, or a name that damage left) is renamed after its
/// first record on open: the next segment never takes its name (which truncated it, and with it
/// the records and then the new one: the fuzz target's "seq went backwards"), and nothing sorts
/// wrongly after it.
#[test]
fn a_misnamed_segment_is_renamed_so_new_segments_never_take_its_name() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append("a1", obs(10)).unwrap();
    }
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    // Named after the next seq the spool will give, 11.
    fs::rename(&files[0], dir.path().join(format!("{:020}.seg", 11))).unwrap();
    let (mut s, report) = Spool::open(dir.path(), 1 << 20).unwrap();
    assert_eq!((report.depth, report.highest_seq), (10, 10));
    assert_eq!(
        segment_files(dir.path()),
        [dir.path().join(format!("{:020}.seg", 1))]
    );
    assert_eq!(s.append("a1", obs(1)).unwrap(), [11]);
    drop(s);
    let (mut s, report) = Spool::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(report.highest_seq, 11);
    assert_eq!(
        seqs(&s.read_from(0, 100).unwrap()),
        (1..=11).collect::<Vec<u64>>()
    );
}

/// A stop between the two renames leaves `N.seg.moving`, which the next open reads as `N.seg`.
#[test]
fn a_segment_left_moving_is_read_as_its_name() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append("a1", obs(3)).unwrap();
    }
    let files = segment_files(dir.path());
    let moving = dir.path().join(format!("{:020}.seg.moving", 1));
    fs::rename(&files[0], &moving).unwrap();
    let (mut s, report) = Spool::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(report.highest_seq, 3);
    assert_eq!(seqs(&s.read_from(0, 10).unwrap()), vec![1, 2, 3]);
    assert!(!moving.exists());
    assert_eq!(
        segment_files(dir.path()),
        [dir.path().join(format!("{:020}.seg", 1))]
    );
}
