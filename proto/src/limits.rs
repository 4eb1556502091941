//! Size limits of one result, shared by both ends: the collector refuses a result beyond them
//! (its defaults are these), and the agent clamps every observation to them before spooling, so
//! a hostile server cannot make its own results disappear by answering with too much.

use crate::{facts, FactValue, Observation};

/// Longest target and endpoint host name (a DNS name).
pub const MAX_NAME_LEN: usize = 253;
/// Longest result message.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Longest fact key (and timing phase name).
pub const MAX_FACT_KEY_LEN: usize = 128;
/// Longest text fact.
pub const MAX_FACT_TEXT_LEN: usize = 4096;
/// Most facts in one result.
pub const MAX_FACTS: usize = 128;
/// Most phase timings in one result.
pub const MAX_TIMINGS: usize = 64;
/// Longest short field: check, error class, phase, ip.
pub const MAX_SHORT_LEN: usize = 64;

/// What [`clamp`] cut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clamped {
    /// Strings shortened (message, host names, fact texts).
    pub strings: usize,
    /// Facts left out (too many, or a key too long to keep).
    pub facts: usize,
    /// Timings left out.
    pub timings: usize,
}

impl Clamped {
    pub fn any(&self) -> bool {
        self.strings + self.facts + self.timings > 0
    }
}

/// Shortens `s` to at most `max` bytes on a character boundary; true when it cut.
fn cut(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    true
}

/// Brings `obs` within the limits above: long strings are cut, facts beyond the count (keeping
/// the first ones, which probes write first because they matter most) and facts with overlong
/// keys are left out, and extra timings dropped. When anything was cut, the result carries
/// [`facts::result::TRUNCATED`] (room for it is kept) and its message says so.
pub fn clamp(obs: &mut Observation) -> Clamped {
    let mut c = Clamped::default();
    for s in [&mut obs.target, &mut obs.endpoint.host] {
        c.strings += usize::from(cut(s, MAX_NAME_LEN));
    }
    let before = obs.facts.len();
    obs.facts.retain(|(k, _)| k.len() <= MAX_FACT_KEY_LEN);
    c.facts += before - obs.facts.len();
    for (_, v) in &mut obs.facts {
        if let FactValue::Text(t) = v {
            c.strings += usize::from(cut(t, MAX_FACT_TEXT_LEN));
        }
    }
    if obs.facts.len() > MAX_FACTS - 1 {
        c.facts += obs.facts.len() - (MAX_FACTS - 1);
        obs.facts.truncate(MAX_FACTS - 1);
    }
    if obs.timings.len() > MAX_TIMINGS {
        c.timings += obs.timings.len() - MAX_TIMINGS;
        obs.timings.truncate(MAX_TIMINGS);
    }
    let note = " [truncated by the agent: the answer was larger than a result may be]";
    if cut(&mut obs.message, MAX_MESSAGE_LEN) {
        c.strings += 1;
    }
    if c.any() {
        obs.fact(facts::result::TRUNCATED, true);
        if obs.message.len() + note.len() > MAX_MESSAGE_LEN {
            cut(&mut obs.message, MAX_MESSAGE_LEN - note.len());
        }
        obs.message.push_str(note);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CheckKind, Endpoint};

    fn obs() -> Observation {
        Observation::new(
            "example.test",
            Endpoint::host("mx.example.test"),
            CheckKind::Smtp,
            1,
        )
    }

    #[test]
    fn a_result_within_the_limits_is_untouched() {
        let mut o = obs();
        o.fact("smtp.banner", "220 hi");
        o.message = "fine".into();
        let before = o.clone();
        assert_eq!(clamp(&mut o), Clamped::default());
        assert_eq!(o, before);
    }

    #[test]
    fn an_oversized_result_is_cut_to_the_limits_and_marked() {
        let mut o = obs();
        o.message = "é".repeat(5000);
        for i in 0..500 {
            o.fact(&format!("smtp.x{i}"), "y".repeat(10_000));
        }
        o.fact(&"k".repeat(200), 1i64);
        let c = clamp(&mut o);
        assert!(c.any());
        assert_eq!(c.facts, 501 - 127);
        assert_eq!(o.facts.len(), MAX_FACTS);
        assert!(o.facts.iter().all(|(k, v)| k.len() <= MAX_FACT_KEY_LEN
            && !matches!(v, FactValue::Text(t) if t.len() > MAX_FACT_TEXT_LEN)));
        assert_eq!(
            o.fact_of(facts::result::TRUNCATED),
            Some(&FactValue::Flag(true))
        );
        assert!(o.message.len() <= MAX_MESSAGE_LEN, "{}", o.message.len());
        assert!(o.message.ends_with("larger than a result may be]"));
        assert!(o.fact_of("smtp.x0").is_some(), "the first facts are kept");
    }
}
