//! Per-series state with hysteresis: N consecutive failures to go `failing`, M consecutive
//! successes to come back, so one lost probe does not flap a series.

/// How many consecutive results it takes to change state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub fail_after: u32,
    pub recover_after: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            fail_after: 2,
            recover_after: 2,
        }
    }
}

/// The state machine of one (target, endpoint, check, region). A new series starts `ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hysteresis {
    pub failing: bool,
    /// Consecutive results against the current state.
    pub streak: u32,
}

impl Hysteresis {
    /// Feeds one result (`ok` = ok or warn); returns true when the state changed.
    pub fn observe(&mut self, ok: bool, policy: Policy) -> bool {
        if ok != self.failing {
            // The result agrees with the current state: any streak against it is broken.
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if self.failing {
            policy.recover_after
        } else {
            policy.fail_after
        };
        if self.streak >= needed.max(1) {
            self.failing = !self.failing;
            self.streak = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: Policy, seq: &str) -> String {
        let mut h = Hysteresis::default();
        seq.chars()
            .map(|c| {
                h.observe(c == '+', policy);
                if h.failing {
                    'F'
                } else {
                    'o'
                }
            })
            .collect()
    }

    #[test]
    fn one_lost_probe_does_not_flap() {
        let p = Policy::default();
        assert_eq!(run(p, "++-++-+"), "ooooooo");
        assert_eq!(
            run(p, "+--+--"),
            "ooFFFF",
            "a single success while failing does not recover"
        );
        assert_eq!(run(p, "--++"), "oFFo");
    }

    #[test]
    fn thresholds_are_configurable() {
        let p = Policy {
            fail_after: 3,
            recover_after: 1,
        };
        assert_eq!(run(p, "--+---+"), "oooooFo");
        let p = Policy {
            fail_after: 1,
            recover_after: 3,
        };
        assert_eq!(run(p, "-++-+++"), "FFFFFFo");
        // Zero is treated as one: a state always needs at least one result to change.
        let p = Policy {
            fail_after: 0,
            recover_after: 0,
        };
        assert_eq!(run(p, "-+"), "Fo");
    }
}
