//! Aggregates of results: per series and time bucket, counts by outcome and one DDSketch per
//! phase ([`Agg`]), with their blob encoding; merged per query window. Pure: the store's rollup
//! levels decide which buckets exist and where they are written.

use mxscope_proto::pb;
use mxscope_proto::raw::ResultView;

use super::sketch::{get_varint, put_varint, Sketch};

/// Phase names the probes report (`mxscope_proto::Phase` when this was written). A name's
/// position + 1 is its code in rollup blobs (format 2) and in [`Phases`], so this list is the
/// storage format's own and append-only: never reorder or remove a name.
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

/// Code of a known phase (0: not known, the name is spelled out).
fn phase_code(name: &str) -> u8 {
    KNOWN_PHASES
        .iter()
        .position(|p| *p == name)
        .map_or(0, |i| i as u8 + 1)
}

/// A phase in [`Phases`]: a known phase by code, any other by name. Known phases sort first,
/// in probe order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PhaseKey {
    Known(u8),
    Other(Box<str>),
}

impl PhaseKey {
    fn of(name: &str) -> PhaseKey {
        match phase_code(name) {
            0 => PhaseKey::Other(name.into()),
            c => PhaseKey::Known(c),
        }
    }

    fn is(&self, code: u8, name: &str) -> bool {
        match self {
            PhaseKey::Known(c) => *c == code,
            PhaseKey::Other(n) => code == 0 && **n == *name,
        }
    }

    fn name(&self) -> &str {
        match self {
            PhaseKey::Known(c) => KNOWN_PHASES[usize::from(*c) - 1],
            PhaseKey::Other(n) => n,
        }
    }
}

/// One latency sketch per phase, in a short vector sorted by phase (an aggregate holds a few
/// phases: a vector with one-byte keys merges and looks up faster than a map of names, and is
/// one allocation).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Phases(Vec<(PhaseKey, Sketch)>);

impl Phases {
    pub fn get(&self, name: &str) -> Option<&Sketch> {
        let code = phase_code(name);
        self.0
            .iter()
            .find(|(k, _)| k.is(code, name))
            .map(|(_, s)| s)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// (phase, sketch), known phases first in probe order, then the others by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Sketch)> {
        self.0.iter().map(|(k, s)| (k.name(), s))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.name())
    }

    /// The sketch of `name`, inserted empty when missing.
    fn sketch_mut(&mut self, name: &str) -> &mut Sketch {
        let code = phase_code(name);
        let at = match self.0.iter().position(|(k, _)| k.is(code, name)) {
            Some(at) => at,
            None => self.insert(PhaseKey::of(name), Sketch::new()),
        };
        &mut self.0[at].1
    }

    /// Inserts `key` at its sorted place; returns the index.
    fn insert(&mut self, key: PhaseKey, s: Sketch) -> usize {
        let at = self.0.partition_point(|(k, _)| *k < key);
        self.0.insert(at, (key, s));
        at
    }

    /// Adds `s` to the sketch of `key` (taken as it is when `key` is new).
    fn merge_one(&mut self, key: &PhaseKey, s: std::borrow::Cow<'_, Sketch>) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, have)) => have.merge(&s),
            None => {
                self.insert(key.clone(), s.into_owned());
            }
        }
    }
}

impl std::ops::Index<&str> for Phases {
    type Output = Sketch;

    fn index(&self, name: &str) -> &Sketch {
        match self.get(name) {
            Some(s) => s,
            None => panic!("no sketch for phase '{name}'"),
        }
    }
}

/// Counts and latency sketches of some results.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Agg {
    pub count: u64,
    pub ok: u64,
    pub warn: u64,
    pub fail: u64,
    /// Sketch of each phase's durations in microseconds.
    pub phases: Phases,
}

impl Agg {
    /// Adds one result. Every phase timing of an ok or warn result is latency; of a failed result
    /// only the phases that completed (not the failing phase, and not `total`, which then measures
    /// how long it took to fail, e.g. a timeout).
    pub fn add(&mut self, r: &pb::ProbeResult) {
        self.add_parts(
            r.outcome,
            &r.phase,
            r.timings.iter().map(|t| (t.phase.as_str(), t.micros)),
        );
    }

    /// [`Agg::add`] of a result read in place.
    pub fn add_view(&mut self, r: &ResultView<'_>) {
        self.add_parts(r.outcome, r.phase, r.timings.iter().copied());
    }

    fn add_parts<'a>(
        &mut self,
        outcome: i32,
        failed_phase: &str,
        timings: impl ExactSizeIterator<Item = (&'a str, u64)>,
    ) {
        self.count += 1;
        let failed = match pb::Outcome::try_from(outcome) {
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
        if self.phases.0.capacity() == 0 {
            // One allocation for the phases a probe reports (grown one by one it was four).
            self.phases.0.reserve_exact(timings.len());
        }
        for (phase, micros) in timings {
            if failed && (phase == failed_phase || phase == "total") {
                continue;
            }
            self.phases.sketch_mut(phase).add(micros as f64);
        }
    }

    /// Adds everything of `other` (exactly as if its results had been added here).
    pub fn merge(&mut self, other: &Agg) {
        self.count += other.count;
        self.ok += other.ok;
        self.warn += other.warn;
        self.fail += other.fail;
        if self.phases.is_empty() {
            self.phases.clone_from(&other.phases);
            return;
        }
        for (k, s) in &other.phases.0 {
            self.phases.merge_one(k, std::borrow::Cow::Borrowed(s));
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
        for (key, s) in &self.phases.0 {
            match key {
                PhaseKey::Known(code) => out.push(*code),
                PhaseKey::Other(name) => {
                    out.push(0);
                    put_varint(out, name.len() as u64);
                    out.extend_from_slice(name.as_bytes());
                }
            }
            sketch.clear();
            s.write_to(&mut sketch);
            put_varint(out, sketch.len() as u64);
            out.extend_from_slice(&sketch);
        }
    }

    /// Reads [`Agg::sketches_to_bytes`]; `wanted` limits which phases are decoded. `None` when
    /// the blob is malformed.
    pub fn sketches_from_bytes(mut b: &[u8], wanted: Option<&str>) -> Option<Phases> {
        let (&format, rest) = b.split_first()?;
        if format != 1 && format != 2 {
            return None;
        }
        b = rest;
        let n = get_varint(&mut b)?;
        let mut out = Phases::default();
        for _ in 0..n {
            let code = if format == 2 {
                let (&c, rest) = b.split_first()?;
                b = rest;
                c
            } else {
                0
            };
            let key = if code == 0 {
                let len = usize::try_from(get_varint(&mut b)?).ok()?;
                let name = std::str::from_utf8(b.get(..len)?).ok()?;
                b = &b[len..];
                PhaseKey::of(name)
            } else {
                KNOWN_PHASES.get(usize::from(code) - 1)?;
                PhaseKey::Known(code)
            };
            let len = usize::try_from(get_varint(&mut b)?).ok()?;
            let sk = b.get(..len)?;
            b = &b[len..];
            if wanted.is_none_or(|w| w == key.name()) {
                out.merge_one(&key, std::borrow::Cow::Owned(Sketch::from_bytes(sk)?));
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
    fn phase_codes_follow_the_known_list() {
        assert!(KNOWN_PHASES.len() < 255);
        for (i, name) in KNOWN_PHASES.iter().enumerate() {
            assert_eq!(usize::from(phase_code(name)), i + 1, "{name}");
        }
        assert_eq!(phase_code("x-custom"), 0);
        // Known phases first in probe order, then the others by name; lookups by name.
        let mut a = Agg::default();
        a.add(&result(
            pb::Outcome::Ok,
            "",
            &[("x-b", 1), ("total", 2), ("x-a", 3), ("connect", 4)],
        ));
        assert_eq!(
            a.phases.keys().collect::<Vec<_>>(),
            vec!["connect", "total", "x-a", "x-b"]
        );
        assert_eq!(a.phases["x-a"].count(), 1);
        assert!(a.phases.get("tls").is_none());
    }

    #[test]
    fn long_sketches_get_a_longer_length_prefix() {
        let mut a = Agg::default();
        for i in 0..200u64 {
            a.add(&result(pb::Outcome::Ok, "", &[("total", 1000 + i * 37)]));
        }
        let b = a.sketches_to_bytes();
        assert!(b.len() > 140, "a sketch of over 127 bytes: {}", b.len());
        assert_eq!(Agg::sketches_from_bytes(&b, None), Some(a.phases.clone()));
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
        assert_eq!(phases.len(), 2);
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
        let mut minutes: std::collections::BTreeMap<i64, Agg> = Default::default();
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
}
