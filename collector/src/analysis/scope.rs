//! Cross-region scope of one (target, check): `up`, `partial` (naming the failing regions),
//! `down` (at least a quorum of regions agree) or `stale` (no fresh data anywhere).

pub use mxscope_proto::{RegionState, Scope};

/// How many failing regions make a target `down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quorum {
    /// More than half of the regions with fresh data.
    #[default]
    Majority,
    /// At least K regions (capped at the number of regions with fresh data).
    AtLeast(u32),
}

impl Quorum {
    fn needed(self, fresh: usize) -> usize {
        match self {
            Quorum::Majority => fresh / 2 + 1,
            Quorum::AtLeast(k) => (k as usize).clamp(1, fresh.max(1)),
        }
    }
}

/// A quorum that is neither `majority` nor a number of regions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("quorum '{0}': expected 'majority' or a number >= 1")]
pub struct BadQuorum(pub String);

impl std::str::FromStr for Quorum {
    type Err = BadQuorum;
    fn from_str(s: &str) -> Result<Self, BadQuorum> {
        match s {
            "majority" => Ok(Quorum::Majority),
            k => k
                .parse::<u32>()
                .ok()
                .filter(|k| *k >= 1)
                .map(Quorum::AtLeast)
                .ok_or_else(|| BadQuorum(s.to_string())),
        }
    }
}

/// A (target, check)'s [`Scope`] with the regions that fail (empty for `up` and `stale`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeView {
    pub scope: Scope,
    pub failing: Vec<String>,
}

impl ScopeView {
    fn new(scope: Scope) -> Self {
        ScopeView {
            scope,
            failing: Vec::new(),
        }
    }
}

/// Combines the regions' views (region name, state) into one scope.
pub fn scope(regions: &[(String, RegionState)], quorum: Quorum) -> ScopeView {
    let fresh: Vec<_> = regions
        .iter()
        .filter(|(_, s)| matches!(s, RegionState::Ok | RegionState::Failing))
        .collect();
    if fresh.is_empty() {
        return ScopeView::new(Scope::Stale);
    }
    let mut failing: Vec<String> = fresh
        .iter()
        .filter(|(_, s)| *s == RegionState::Failing)
        .map(|(r, _)| r.clone())
        .collect();
    failing.sort();
    failing.dedup();
    let scope = if failing.is_empty() {
        Scope::Up
    } else if failing.len() >= quorum.needed(fresh.len()) {
        Scope::Down
    } else {
        Scope::Partial
    };
    ScopeView { scope, failing }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RegionState::*;

    fn view(scope: Scope, failing: &[&str]) -> ScopeView {
        ScopeView {
            scope,
            failing: failing.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn regions(states: &[(&str, RegionState)]) -> Vec<(String, RegionState)> {
        states.iter().map(|(r, s)| (r.to_string(), *s)).collect()
    }

    #[test]
    fn majority_quorum() {
        let q = Quorum::Majority;
        assert_eq!(
            scope(&regions(&[("a", Ok), ("b", Ok), ("c", Ok)]), q),
            view(Scope::Up, &[])
        );
        assert_eq!(
            scope(&regions(&[("a", Ok), ("b", Ok), ("c", Failing)]), q),
            view(Scope::Partial, &["c"])
        );
        assert_eq!(
            scope(&regions(&[("a", Failing), ("b", Ok), ("c", Failing)]), q),
            view(Scope::Down, &["a", "c"])
        );
        assert_eq!(
            scope(&regions(&[("a", Stale), ("b", Stale)]), q),
            view(Scope::Stale, &[])
        );
        assert_eq!(scope(&[], q), view(Scope::Stale, &[]));
    }

    #[test]
    fn stale_and_agent_faults_do_not_count() {
        let q = Quorum::Majority;
        // One fresh failing region out of one fresh region is a majority.
        assert_eq!(
            scope(
                &regions(&[("a", Stale), ("b", Failing), ("c", AgentFault)]),
                q
            ),
            view(Scope::Down, &["b"])
        );
        assert_eq!(
            scope(&regions(&[("a", Ok), ("c", AgentFault)]), q),
            view(Scope::Up, &[])
        );
    }

    #[test]
    fn configured_quorum() {
        let all_but_one = regions(&[("a", Failing), ("b", Failing), ("c", Failing), ("d", Ok)]);
        assert_eq!(
            scope(&all_but_one, Quorum::AtLeast(4)).scope,
            Scope::Partial
        );
        assert_eq!(scope(&all_but_one, Quorum::AtLeast(3)).scope, Scope::Down);
        assert_eq!(
            scope(&regions(&[("a", Failing)]), Quorum::AtLeast(5)).scope,
            Scope::Down
        );
        assert_eq!(
            "majority".parse(),
            Result::<Quorum, BadQuorum>::Ok(Quorum::Majority)
        );
        assert_eq!(
            "2".parse(),
            Result::<Quorum, BadQuorum>::Ok(Quorum::AtLeast(2))
        );
        assert!("0".parse::<Quorum>().is_err() && "most".parse::<Quorum>().is_err());
    }
}
