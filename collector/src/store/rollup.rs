//! Rollups: per (level, bucket, series) counts and one DDSketch per phase, aggregated in memory
//! (the batch's part by the ingest task) and upserted once per batch; queries merge them per window.
//!
//! Levels and why: `hour`, `day` and `week` rows are written together (three upserts per touched
//! series per batch, none per result), so a 30-day query merges 5 or 6 week rows per series
//! instead of 43,200 results. There is no minute level (schema step 7 dropped it): with probes
//! every 60 s or slower a minute row holds one result, so it doubled the writes and the disk of
//! the raw row without making a read cheaper; windows up to 3 hours read the raw results, exactly.
//! [`plan`] picks the source.

use std::borrow::Cow;
use std::collections::BTreeMap;

use mxscope_proto::pb;

use crate::analysis::sketch::{get_varint, put_varint, Sketch};

/// A rollup granularity; the number is its width in seconds and is stored in `rollups.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Hour = 3600,
    Day = 86_400,
    /// Buckets aligned to the Unix epoch (they start on Thursdays, 00:00 UTC).
    Week = 604_800,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Hour, Level::Day, Level::Week];

    pub fn width_us(self) -> i64 {
        self as i64 * 1_000_000
    }

    pub fn code(self) -> i64 {
        self as i64
    }

    /// Start of the bucket holding `t_us`.
    pub fn bucket(self, t_us: i64) -> i64 {
        t_us.div_euclid(self.width_us()) * self.width_us()
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Hour => "hour",
            Level::Day => "day",
            Level::Week => "week",
        }
    }
}

/// Where a window `[since_us, now_us]` is read from: `None` for raw results from `since_us` on
/// (windows up to 3 hours), else the rollup level and its first bucket.
///
/// Windows up to 3 days use hour rows, up to 21 days day rows, longer ones week rows: at most
/// about 72 rows per series, and the first bucket may start up to one bucket width (an hour, a
/// day, a week: at most about 1/3 of the window) before `since`.
pub fn plan(since_us: i64, now_us: i64) -> Option<(Level, i64)> {
    let span = now_us.saturating_sub(since_us);
    let level = if span <= 3 * Level::Hour.width_us() {
        return None;
    } else if span <= 3 * Level::Day.width_us() {
        Level::Hour
    } else if span <= 3 * Level::Week.width_us() {
        Level::Day
    } else {
        Level::Week
    };
    Some((level, level.bucket(since_us)))
}

/// A phase name: the probes' own names are borrowed from a static list, so aggregating a result
/// allocates no string.
pub type PhaseName = Cow<'static, str>;

/// Phase names the probes report (`mxscope_proto::Phase` when this was written), shared instead
/// of copied per aggregate. A name's position + 1 is its code in rollup blobs (format 2), so this
/// list is the storage format's own and append-only: never reorder or remove a name.
const KNOWN_PHASES: &[&str] = &[
    "resolve",
    "connect",
    "banner",
    "greeting",
    "ehlo",
    "capability",
    "starttls",
    "tls",
    "auth",
    "mail",
    "rcpt",
    "quit",
    "echo",
    "delivery",
    "total",
];

/// Code of a known phase in format-2 blobs (0: not known, the name follows).
fn phase_code(name: &str) -> u8 {
    KNOWN_PHASES
        .iter()
        .position(|p| *p == name)
        .map_or(0, |i| i as u8 + 1)
}

/// `name` as a [`PhaseName`], borrowed when it is a known phase.
pub fn phase_name(name: &str) -> PhaseName {
    match phase_code(name) {
        0 => Cow::Owned(name.to_string()),
        c => Cow::Borrowed(KNOWN_PHASES[usize::from(c) - 1]),
    }
}

/// Counts and latency sketches of some results.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Agg {
    pub count: u64,
    pub ok: u64,
    pub warn: u64,
    pub fail: u64,
    /// Phase name → sketch of its durations in microseconds.
    pub phases: BTreeMap<PhaseName, Sketch>,
}

impl Agg {
    /// Adds one result. Every phase timing of an ok or warn result is latency; of a failed result
    /// only the phases that completed (not the failing phase, and not `total`, which then measures
    /// how long it took to fail, e.g. a timeout).
    pub fn add(&mut self, r: &pb::ProbeResult) {
        self.count += 1;
        let failed = match pb::Outcome::try_from(r.outcome) {
            Ok(pb::Outcome::Ok) => {
                self.ok += 1;
                false
            }
            Ok(pb::Outcome::Warn) => {
                self.warn += 1;
                false
            }
            _ => {
                self.fail += 1;
                true
            }
        };
        for t in &r.timings {
            if failed && (t.phase == r.phase || t.phase == "total") {
                continue;
            }
            let v = t.micros as f64;
            match self.phases.get_mut(t.phase.as_str()) {
                Some(s) => s.add(v),
                None => self.phases.entry(phase_name(&t.phase)).or_default().add(v),
            }
        }
    }

    /// Adds everything of `other` (exactly as if its results had been added here).
    pub fn merge(&mut self, other: &Agg) {
        self.count += other.count;
        self.ok += other.ok;
        self.warn += other.warn;
        self.fail += other.fail;
        for (p, s) in &other.phases {
            match self.phases.get_mut(p.as_ref()) {
                Some(have) => have.merge(s),
                None => {
                    self.phases.insert(p.clone(), s.clone());
                }
            }
        }
    }

    /// (ok + warn) / count, `None` without results.
    pub fn reachability(&self) -> Option<f64> {
        (self.count > 0).then(|| (self.ok + self.warn) as f64 / self.count as f64)
    }

    /// Sketches as one blob: format byte (2), phase count, then per phase its code (a known
    /// phase) or 0 and the name with a varint length, and the sketch with a varint length.
    /// Format 1 (names always spelled out) is still read.
    pub fn sketches_to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 24 * self.phases.len());
        self.sketches_into(&mut out);
        out
    }

    /// [`Agg::sketches_to_bytes`] into `out` (cleared first), reusing its allocation.
    pub fn sketches_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.push(2u8);
        put_varint(out, self.phases.len() as u64);
        let mut sketch = Vec::with_capacity(64);
        for (name, s) in &self.phases {
            let code = phase_code(name);
            out.push(code);
            if code == 0 {
                put_varint(out, name.len() as u64);
                out.extend_from_slice(name.as_bytes());
            }
            sketch.clear();
            s.write_to(&mut sketch);
            put_varint(out, sketch.len() as u64);
            out.extend_from_slice(&sketch);
        }
    }

    /// Reads [`Agg::sketches_to_bytes`] into `phases`; `wanted` limits which phases are decoded.
    /// `None` when the blob is malformed.
    pub fn sketches_from_bytes(
        mut b: &[u8],
        wanted: Option<&str>,
    ) -> Option<BTreeMap<PhaseName, Sketch>> {
        let (&format, rest) = b.split_first()?;
        if format != 1 && format != 2 {
            return None;
        }
        b = rest;
        let n = get_varint(&mut b)?;
        let mut out = BTreeMap::new();
        for _ in 0..n {
            let code = if format == 2 {
                let (&c, rest) = b.split_first()?;
                b = rest;
                c
            } else {
                0
            };
            let name = if code == 0 {
                let len = usize::try_from(get_varint(&mut b)?).ok()?;
                let name = std::str::from_utf8(b.get(..len)?).ok()?;
                b = &b[len..];
                name
            } else {
                KNOWN_PHASES.get(usize::from(code) - 1)?
            };
            let len = usize::try_from(get_varint(&mut b)?).ok()?;
            let sk = b.get(..len)?;
            b = &b[len..];
            if wanted.is_none_or(|w| w == name) {
                out.insert(phase_name(name), Sketch::from_bytes(sk)?);
            }
        }
        b.is_empty().then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::sketch::ALPHA;

    fn result(outcome: pb::Outcome, phase: &str, timings: &[(&str, u64)]) -> pb::ProbeResult {
        pb::ProbeResult {
            outcome: outcome as i32,
            phase: phase.into(),
            timings: timings
                .iter()
                .map(|(p, us)| pb::PhaseTiming {
                    phase: (*p).into(),
                    micros: *us,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn failed_results_keep_only_completed_phases() {
        let mut a = Agg::default();
        a.add(&result(
            pb::Outcome::Ok,
            "",
            &[("connect", 1000), ("total", 5000)],
        ));
        a.add(&result(
            pb::Outcome::Fail,
            "tls",
            &[("connect", 2000), ("tls", 9000), ("total", 9500)],
        ));
        a.add(&result(pb::Outcome::Warn, "tls", &[("connect", 3000)]));
        assert_eq!((a.count, a.ok, a.warn, a.fail), (3, 1, 1, 1));
        assert_eq!(a.phases["connect"].count(), 3);
        assert_eq!(
            a.phases["total"].count(),
            1,
            "a failure's total is not latency"
        );
        assert!(!a.phases.contains_key("tls"));
        assert!((a.reachability().unwrap() - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(Agg::default().reachability(), None);
    }

    #[test]
    fn known_phases_are_sorted_and_borrowed() {
        assert!(KNOWN_PHASES.len() < 255);
        assert!(matches!(phase_name("total"), Cow::Borrowed("total")));
        assert!(matches!(phase_name("x-custom"), Cow::Owned(ref s) if s == "x-custom"));
    }

    #[test]
    fn format_1_blobs_still_read() {
        let mut s = Sketch::new();
        s.add(1500.0);
        let sk = s.to_bytes();
        let mut v1 = vec![1u8, 2];
        for name in ["total", "x-custom"] {
            v1.push(name.len() as u8);
            v1.extend_from_slice(name.as_bytes());
            v1.push(sk.len() as u8);
            v1.extend_from_slice(&sk);
        }
        let phases = Agg::sketches_from_bytes(&v1, None).unwrap();
        assert_eq!(phases["total"], s);
        assert_eq!(phases["x-custom"], s);
        // Written back as format 2: a known phase is one byte, an unknown one spelled out.
        let a = Agg {
            phases,
            ..Default::default()
        };
        let v2 = a.sketches_to_bytes();
        assert_eq!(v2[0], 2);
        assert!(v2.len() < v1.len());
        assert_eq!(Agg::sketches_from_bytes(&v2, None), Some(a.phases.clone()));
        assert_eq!(
            Agg::sketches_from_bytes(&[2, 1, 200, 0], None),
            None,
            "unknown code"
        );
    }

    #[test]
    fn blob_round_trip_and_selective_decode() {
        let mut a = Agg::default();
        a.add(&result(
            pb::Outcome::Ok,
            "",
            &[("connect", 1000), ("total", 5000)],
        ));
        let b = a.sketches_to_bytes();
        assert_eq!(Agg::sketches_from_bytes(&b, None), Some(a.phases.clone()));
        let only = Agg::sketches_from_bytes(&b, Some("total")).unwrap();
        assert_eq!(only.keys().collect::<Vec<_>>(), vec!["total"]);
        for cut in 0..b.len() {
            assert_eq!(Agg::sketches_from_bytes(&b[..cut], None), None, "cut {cut}");
        }
    }

    /// Minute aggregates merged over a window equal one sketch of all raw values, and the merged
    /// quantiles are within the sketch's relative error of the exact ones.
    #[test]
    fn merged_minutes_equal_the_sketch_of_all_values() {
        let mut minutes: BTreeMap<i64, Agg> = BTreeMap::new();
        let mut all = Agg::default();
        let mut raw = Vec::new();
        let mut x: u64 = 7;
        for i in 0..6000i64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let us = 500 + (x >> 40) % 200_000;
            let r = result(pb::Outcome::Ok, "", &[("connect", us)]);
            let t = 1_700_000_000_000_000 + i * 1_500_000;
            minutes.entry(t.div_euclid(60_000_000)).or_default().add(&r);
            all.add(&r);
            raw.push(us as f64);
        }
        assert!(minutes.len() > 100);
        let mut merged = Agg::default();
        for m in minutes.values() {
            // Through the stored form, as queries read it.
            let mut back = m.clone();
            back.phases = Agg::sketches_from_bytes(&m.sketches_to_bytes(), None).unwrap();
            merged.merge(&back);
        }
        assert_eq!(merged, all);
        raw.sort_by(f64::total_cmp);
        for q in [0.5, 0.95, 0.99] {
            let want = raw[(q * (raw.len() - 1) as f64).floor() as usize];
            let got = merged.phases["connect"].quantile(q).unwrap();
            assert!((got - want).abs() <= ALPHA * want, "q={q} {got} vs {want}");
        }
    }

    #[test]
    fn plan_picks_levels_by_span() {
        let now = 1_700_000_000_000_000;
        let h = 3_600_000_000;
        assert_eq!(plan(now - h, now), None, "raw results");
        assert_eq!(plan(now - 3 * h, now), None);
        assert_eq!(plan(now - 24 * h, now).unwrap().0, Level::Hour);
        let (level, from) = plan(now - 7 * 24 * h, now).unwrap();
        assert_eq!(level, Level::Day);
        assert!(from <= now - 7 * 24 * h && from > now - 8 * 24 * h);
        assert_eq!(plan(now - 21 * 24 * h, now).unwrap().0, Level::Day);
        let (level, from) = plan(now - 30 * 24 * h, now).unwrap();
        assert_eq!(level, Level::Week);
        assert!(from <= now - 30 * 24 * h && from > now - 37 * 24 * h);
        assert_eq!(
            Level::Week.bucket(Level::Day.bucket(now)),
            Level::Week.bucket(now)
        );
        assert_eq!(Level::Hour.bucket(7_300_000_000), 7_200_000_000);
        assert_eq!(Level::Hour.bucket(-1), -3_600_000_000);
    }
}
