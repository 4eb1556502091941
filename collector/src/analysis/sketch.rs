//! A mergeable latency sketch (DDSketch, Masson et al., VLDB 2019) with 1% relative accuracy.
//! Merging two sketches is adding bucket counts, so hourly rollups merge into any window exactly
//! as if all values had been added to one sketch; a quantile is within 1% of a true sample value.

/// Relative accuracy: every quantile estimate q̂ of a true value q satisfies |q̂ - q| <= ALPHA * q.
pub const ALPHA: f64 = 0.01;
/// Values below this (microseconds) are counted in the zero bucket.
const MIN_VALUE: f64 = 1.0;
/// Format 1: min and max as f64 (any value).
const MAGIC: u8 = 0xD1;
/// Format 2: min and max as varints, written when both are whole numbers below 2^53 (latencies
/// in microseconds always are); 14 bytes shorter per sketch.
const MAGIC_INT: u8 = 0xD2;
/// Largest integer an f64 holds exactly.
const MAX_EXACT: f64 = 9_007_199_254_740_992.0;

use smallvec::SmallVec;

/// A DDSketch over non-negative values (microseconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Sketch {
    /// (bin index, count), ascending by index: a rollup row holds a few bins, so a sorted vector
    /// (inline up to two bins: one result's sketch allocates nothing) beats a tree map.
    bins: SmallVec<[(i32, u64); 2]>,
    zero: u64,
    count: u64,
    min: f64,
    max: f64,
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch {
            bins: SmallVec::new(),
            zero: 0,
            count: 0,
            min: f64::INFINITY,
            max: 0.0,
        }
    }
}

fn gamma() -> f64 {
    (1.0 + ALPHA) / (1.0 - ALPHA)
}

/// `gamma().ln()`, spelled out because `ln` is not a `const fn` (checked by a test).
const LN_GAMMA: f64 = 0.020000666706669435;

fn index_of(v: f64) -> i32 {
    (v.ln() / LN_GAMMA).ceil() as i32
}

fn value_of(i: i32) -> f64 {
    let g = gamma();
    2.0 * g.powi(i) / (g + 1.0)
}

impl Sketch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds one value; negative and non-finite values are ignored.
    pub fn add(&mut self, v: f64) {
        if !v.is_finite() || v < 0.0 {
            return;
        }
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        if v < MIN_VALUE {
            self.zero += 1;
        } else {
            self.add_bin(index_of(v), 1);
        }
    }

    fn add_bin(&mut self, i: i32, c: u64) {
        match self.bins.binary_search_by_key(&i, |b| b.0) {
            Ok(at) => self.bins[at].1 += c,
            Err(at) => self.bins.insert(at, (i, c)),
        }
    }

    /// Adds every value of `other`: the result equals one sketch fed both value streams.
    pub fn merge(&mut self, other: &Sketch) {
        if self.bins.is_empty() {
            self.bins.clone_from(&other.bins);
        } else if other.bins.len() <= 4 {
            for &(i, c) in &other.bins {
                self.add_bin(i, c);
            }
        } else {
            let mut out = SmallVec::with_capacity(self.bins.len() + other.bins.len());
            let (x, y) = (&self.bins, &other.bins);
            let (mut i, mut j) = (0, 0);
            while i < x.len() && j < y.len() {
                match x[i].0.cmp(&y[j].0) {
                    std::cmp::Ordering::Less => {
                        out.push(x[i]);
                        i += 1;
                    }
                    std::cmp::Ordering::Greater => {
                        out.push(y[j]);
                        j += 1;
                    }
                    std::cmp::Ordering::Equal => {
                        out.push((x[i].0, x[i].1 + y[j].1));
                        i += 1;
                        j += 1;
                    }
                }
            }
            out.extend_from_slice(&x[i..]);
            out.extend_from_slice(&y[j..]);
            self.bins = out;
        }
        self.zero += other.zero;
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The q-quantile (0..=1), or `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        if q >= 1.0 {
            return Some(self.max);
        }
        // Rank of the wanted value, 0-based, as in the paper (lower quantile).
        let rank = (q * (self.count - 1) as f64).floor() as u64;
        if rank < self.zero {
            return Some(self.min.min(MIN_VALUE));
        }
        let mut seen = self.zero;
        for (i, c) in &self.bins {
            seen += *c;
            if seen > rank {
                // Clamping to the exact extremes keeps p0/p100 exact and never worsens the bound.
                return Some(value_of(*i).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// Compact bytes for a rollup row: magic, varint count fields, then (index delta, count) pairs.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.bins.len() * 3);
        self.write_to(&mut out);
        out
    }

    /// Appends [`Sketch::to_bytes`] to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let out = &mut *out;
        let min = if self.count == 0 { 0.0 } else { self.min };
        let whole = |v: f64| v.fract() == 0.0 && (0.0..MAX_EXACT).contains(&v);
        if whole(min) && whole(self.max) {
            out.push(MAGIC_INT);
            put_varint(out, self.zero);
            put_varint(out, min as u64);
            put_varint(out, self.max as u64);
        } else {
            out.push(MAGIC);
            put_varint(out, self.zero);
            out.extend_from_slice(&min.to_le_bytes());
            out.extend_from_slice(&self.max.to_le_bytes());
        }
        put_varint(out, self.bins.len() as u64);
        let mut prev = 0i64;
        for (i, c) in &self.bins {
            let i = i64::from(*i);
            put_varint(out, zigzag(i - prev));
            put_varint(out, *c);
            prev = i;
        }
    }

    /// Reads [`Sketch::to_bytes`]; `None` for anything malformed (never panics).
    pub fn from_bytes(mut b: &[u8]) -> Option<Sketch> {
        let (&magic, rest) = b.split_first()?;
        b = rest;
        let zero = get_varint(&mut b)?;
        let (min, max) = match magic {
            MAGIC => {
                let min = f64::from_le_bytes(b.get(..8)?.try_into().ok()?);
                let max = f64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
                b = &b[16..];
                (min, max)
            }
            MAGIC_INT => (get_varint(&mut b)? as f64, get_varint(&mut b)? as f64),
            _ => return None,
        };
        let n = get_varint(&mut b)?;
        let mut bins = SmallVec::with_capacity(usize::try_from(n.min(64)).ok()?);
        let mut count = zero;
        let mut prev = 0i64;
        for k in 0..n {
            let i = prev.checked_add(unzigzag(get_varint(&mut b)?))?;
            // Written ascending; anything else is not a sketch of ours.
            if k > 0 && i <= prev {
                return None;
            }
            let c = get_varint(&mut b)?;
            bins.push((i32::try_from(i).ok()?, c));
            count = count.checked_add(c)?;
            prev = i;
        }
        if !b.is_empty() {
            return None;
        }
        let min = if count == 0 { f64::INFINITY } else { min };
        Some(Sketch {
            bins,
            zero,
            count,
            min,
            max,
        })
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// LEB128 varint, shared with the rollup row encoding.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a [`put_varint`] value, advancing `b`; `None` when truncated or over 64 bits.
pub(crate) fn get_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(sorted: &[f64], q: f64) -> f64 {
        sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
    }

    fn values(n: usize, seed: u64) -> Vec<f64> {
        // A small deterministic generator spanning 5 orders of magnitude (10 µs .. 1 s).
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                10f64.powf(1.0 + 5.0 * ((x >> 11) as f64 / (1u64 << 53) as f64))
            })
            .collect()
    }

    #[test]
    fn quantiles_within_relative_error() {
        let v = values(20_000, 1);
        let mut s = Sketch::new();
        v.iter().for_each(|x| s.add(*x));
        let mut sorted = v.clone();
        sorted.sort_by(f64::total_cmp);
        for q in [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let (got, want) = (s.quantile(q).unwrap(), exact(&sorted, q));
            assert!(
                (got - want).abs() <= ALPHA * want + 1e-9,
                "q={q} got={got} want={want}"
            );
        }
    }

    #[test]
    fn merge_equals_concatenation() {
        let (a, b) = (values(5_000, 2), values(7_000, 3));
        let (mut sa, mut sb, mut all) = (Sketch::new(), Sketch::new(), Sketch::new());
        a.iter().for_each(|x| sa.add(*x));
        b.iter().for_each(|x| sb.add(*x));
        a.iter().chain(&b).for_each(|x| all.add(*x));
        sa.merge(&sb);
        assert_eq!(sa, all, "merging must be exactly adding both streams");
        let mut sorted: Vec<f64> = a.iter().chain(&b).copied().collect();
        sorted.sort_by(f64::total_cmp);
        for q in [0.5, 0.95, 0.99] {
            let (got, want) = (sa.quantile(q).unwrap(), exact(&sorted, q));
            assert!(
                (got - want).abs() <= ALPHA * want,
                "q={q} got={got} want={want}"
            );
        }
    }

    #[test]
    fn bytes_round_trip_and_garbage_is_rejected() {
        let mut s = Sketch::new();
        [0.5, 3.0, 1500.0, 1500.0, 2_000_000.0]
            .iter()
            .for_each(|x| s.add(*x));
        let b = s.to_bytes();
        assert_eq!(Sketch::from_bytes(&b), Some(s.clone()));
        assert_eq!(
            Sketch::from_bytes(&Sketch::new().to_bytes()),
            Some(Sketch::new())
        );
        for cut in 0..b.len() {
            assert_eq!(Sketch::from_bytes(&b[..cut]), None, "truncated at {cut}");
        }
        assert_eq!(Sketch::from_bytes(&[0xD1, 0xff, 0xff]), None);
        // Whole microseconds take the short form; both forms read back.
        let mut whole = Sketch::new();
        [3.0, 1500.0, 2_000_000.0]
            .iter()
            .for_each(|x| whole.add(*x));
        let short = whole.to_bytes();
        assert_eq!(short[0], MAGIC_INT);
        assert_eq!(Sketch::from_bytes(&short), Some(whole.clone()));
        for cut in 0..short.len() {
            assert_eq!(
                Sketch::from_bytes(&short[..cut]),
                None,
                "truncated at {cut}"
            );
        }
        assert_eq!(b[0], MAGIC, "0.5 is not whole");
    }

    #[test]
    fn ln_gamma_is_the_log_of_gamma() {
        assert!((LN_GAMMA - gamma().ln()).abs() < 1e-15);
    }

    #[test]
    fn empty_and_edge_values() {
        let mut s = Sketch::new();
        assert_eq!(s.quantile(0.5), None);
        s.add(f64::NAN);
        s.add(-1.0);
        assert!(s.is_empty());
        s.add(0.0);
        s.add(42.0);
        assert_eq!(s.count(), 2);
        assert_eq!(s.quantile(0.0), Some(0.0));
        assert_eq!(s.quantile(1.0), Some(42.0));
    }
}
