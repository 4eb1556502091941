//! The alert state machine, pure and clock-free (times are passed in, in µs): per alert key
//! ok → pending (failing, waiting for confirmation or the rule's `for`) → firing → resolved;
//! dedupe (one alert per key), the repeat interval, and silences. It says which notices to send;
//! the engine sends and stores them.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::notify::NoticeStatus;

/// What the engine found for one key on this evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The condition does not hold (or was refuted by the confirming regions).
    Clear,
    /// The condition holds, not yet confirmed (waiting for the asked regions).
    Unconfirmed,
    /// The condition holds and is confirmed (or nobody could be asked).
    Confirmed,
}

/// Where an alert is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Pending,
    Firing,
    Resolved,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Firing => "firing",
            Phase::Resolved => "resolved",
        }
    }
}

/// One alert's state, as stored (`Store::alert_put`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AlertState {
    pub key: String,
    pub rule: String,
    pub phase: Phase,
    /// When the condition was first seen (pending since).
    pub since_us: i64,
    /// When it fired (0 while pending).
    pub fired_us: i64,
    /// When the last firing notice was sent (`None`: none sent, e.g. silenced all along, or
    /// since the collector restarted: notifiers' queues do not survive it, so it is re-sent).
    pub sent_us: Option<i64>,
    pub resolved_us: i64,
    /// The labels the alert's notices carry (target, check, region, …).
    pub labels: BTreeMap<String, String>,
    pub summary: String,
}

/// A silence: alerts whose `target` label (or `agent` label) is `target` send nothing until
/// `until_us`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Silence {
    pub id: String,
    pub target: String,
    pub until_us: i64,
    pub comment: String,
    pub by: String,
    pub created_us: i64,
}

impl Silence {
    pub fn covers(&self, labels: &BTreeMap<String, String>, now_us: i64) -> bool {
        now_us < self.until_us
            && (labels.get("target") == Some(&self.target)
                || labels.get("agent") == Some(&self.target))
    }
}

/// What to tell the notifiers, and what changed in the stored state.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// A notice to send (`None`: nothing, e.g. silenced, pending, or within the repeat interval).
    pub notice: Option<NoticeStatus>,
    /// The state changed and must be stored (a key that went back to ok is no longer in
    /// [`Alerts::by_key`]: its row is removed).
    pub changed: bool,
}

/// The state of every key the engine knows.
#[derive(Debug, Default, Clone)]
pub struct Alerts {
    pub by_key: BTreeMap<String, AlertState>,
}

/// A rule's timing, as the state machine needs it.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub for_: Duration,
    pub repeat: Duration,
}

fn us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Alerts {
    pub fn from_stored(states: Vec<AlertState>) -> Self {
        Alerts {
            by_key: states
                .into_iter()
                .filter(|s| s.phase != Phase::Resolved)
                .map(|mut s| {
                    s.sent_us = None;
                    (s.key.clone(), s)
                })
                .collect(),
        }
    }

    /// One evaluation of `key`. `labels` and `summary` are the current ones (kept for the notice).
    #[allow(clippy::too_many_arguments)]
    pub fn observe(
        &mut self,
        key: &str,
        rule: &str,
        timing: Timing,
        seen: Seen,
        silenced: bool,
        labels: &BTreeMap<String, String>,
        summary: &str,
        now_us: i64,
    ) -> Step {
        let nothing = Step {
            notice: None,
            changed: false,
        };
        match (self.by_key.get_mut(key), seen) {
            (None, Seen::Clear) => nothing,
            (None, seen) => {
                self.by_key.insert(
                    key.to_string(),
                    AlertState {
                        key: key.to_string(),
                        rule: rule.to_string(),
                        phase: Phase::Pending,
                        since_us: now_us,
                        fired_us: 0,
                        sent_us: None,
                        resolved_us: 0,
                        labels: labels.clone(),
                        summary: summary.to_string(),
                    },
                );
                // A rule without `for` fires on its first confirmed sight.
                let step = self.observe(key, rule, timing, seen, silenced, labels, summary, now_us);
                Step {
                    changed: true,
                    ..step
                }
            }
            (Some(a), Seen::Clear) => match a.phase {
                Phase::Pending | Phase::Resolved => {
                    self.by_key.remove(key);
                    Step {
                        notice: None,
                        changed: true,
                    }
                }
                Phase::Firing => {
                    a.phase = Phase::Resolved;
                    a.resolved_us = now_us;
                    // A resolve follows only a firing that was sent.
                    let notice =
                        (a.sent_us.is_some() && !silenced).then_some(NoticeStatus::Resolved);
                    Step {
                        notice,
                        changed: true,
                    }
                }
            },
            (Some(a), Seen::Unconfirmed) => {
                if a.phase == Phase::Firing {
                    // Already confirmed once: a firing alert stays firing while it holds.
                    return Self::repeat(a, timing, silenced, labels, summary, now_us);
                }
                nothing
            }
            (Some(a), Seen::Confirmed) => match a.phase {
                Phase::Pending if now_us - a.since_us >= us(timing.for_) => {
                    a.phase = Phase::Firing;
                    a.fired_us = now_us;
                    a.labels = labels.clone();
                    a.summary = summary.to_string();
                    let notice = if silenced {
                        None
                    } else {
                        a.sent_us = Some(now_us);
                        Some(NoticeStatus::Firing)
                    };
                    Step {
                        notice,
                        changed: true,
                    }
                }
                Phase::Pending => nothing,
                Phase::Firing => Self::repeat(a, timing, silenced, labels, summary, now_us),
                Phase::Resolved => {
                    // Fails again after its resolve: a new episode.
                    self.by_key.remove(key);
                    self.observe(
                        key,
                        rule,
                        timing,
                        Seen::Confirmed,
                        silenced,
                        labels,
                        summary,
                        now_us,
                    )
                }
            },
        }
    }

    fn repeat(
        a: &mut AlertState,
        timing: Timing,
        silenced: bool,
        labels: &BTreeMap<String, String>,
        summary: &str,
        now_us: i64,
    ) -> Step {
        let due = match a.sent_us {
            // Never sent (silenced when it fired, or the collector restarted): send once.
            None => true,
            Some(sent) => !timing.repeat.is_zero() && now_us - sent >= us(timing.repeat),
        };
        if silenced || !due {
            return Step {
                notice: None,
                changed: false,
            };
        }
        a.sent_us = Some(now_us);
        a.labels = labels.clone();
        a.summary = summary.to_string();
        Step {
            notice: Some(NoticeStatus::Firing),
            changed: true,
        }
    }

    /// Takes the resolved alerts out (they go to history).
    pub fn take_resolved(&mut self) -> Vec<AlertState> {
        let keys: Vec<String> = self
            .by_key
            .iter()
            .filter(|(_, a)| a.phase == Phase::Resolved)
            .map(|(k, _)| k.clone())
            .collect();
        keys.into_iter()
            .filter_map(|k| self.by_key.remove(&k))
            .collect()
    }

    /// The keys the engine did not see on this evaluation (their condition is gone entirely,
    /// e.g. a removed target): they are observed as clear.
    pub fn unseen(&self, seen: &std::collections::BTreeSet<String>) -> Vec<String> {
        self.by_key
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect()
    }

    /// Counts per (rule, phase), for `/metrics`.
    pub fn counts(&self) -> BTreeMap<(String, Phase), u64> {
        let mut out = BTreeMap::new();
        for a in self.by_key.values() {
            *out.entry((a.rule.clone(), a.phase)).or_insert(0) += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn labels() -> BTreeMap<String, String> {
        [("target".to_string(), "example.com".to_string())].into()
    }

    struct Clock {
        alerts: Alerts,
        timing: Timing,
    }

    impl Clock {
        fn new(for_s: u64, repeat_s: u64) -> Self {
            Clock {
                alerts: Alerts::default(),
                timing: Timing {
                    for_: Duration::from_secs(for_s),
                    repeat: Duration::from_secs(repeat_s),
                },
            }
        }
        fn at(&mut self, t_s: i64, seen: Seen, silenced: bool) -> Option<NoticeStatus> {
            self.alerts
                .observe(
                    "down/example.com/smtp",
                    "down",
                    self.timing,
                    seen,
                    silenced,
                    &labels(),
                    "mail down",
                    t_s * S,
                )
                .notice
        }
        fn phase(&self) -> Option<Phase> {
            self.alerts
                .by_key
                .get("down/example.com/smtp")
                .map(|a| a.phase)
        }
    }

    #[test]
    fn pending_then_confirmed_then_for_then_firing_then_resolved() {
        let mut c = Clock::new(60, 3600);
        assert_eq!(c.at(0, Seen::Unconfirmed, false), None);
        assert_eq!(c.phase(), Some(Phase::Pending));
        assert_eq!(c.at(30, Seen::Confirmed, false), None, "for not over");
        assert_eq!(c.phase(), Some(Phase::Pending));
        assert_eq!(c.at(60, Seen::Confirmed, false), Some(NoticeStatus::Firing));
        assert_eq!(c.phase(), Some(Phase::Firing));
        assert_eq!(c.at(65, Seen::Confirmed, false), None, "dedupe: one notice");
        assert_eq!(c.at(70, Seen::Clear, false), Some(NoticeStatus::Resolved));
        assert_eq!(c.phase(), Some(Phase::Resolved));
        let resolved = c.alerts.take_resolved();
        assert_eq!(resolved.len(), 1);
        assert_eq!(resolved[0].fired_us, 60 * S);
        assert_eq!(resolved[0].resolved_us, 70 * S);
        assert_eq!(c.phase(), None);
    }

    #[test]
    fn unconfirmed_never_fires_and_clear_forgets_pending() {
        let mut c = Clock::new(0, 3600);
        for t in 0..10 {
            assert_eq!(c.at(t * 60, Seen::Unconfirmed, false), None);
        }
        assert_eq!(c.phase(), Some(Phase::Pending));
        assert_eq!(
            c.at(700, Seen::Clear, false),
            None,
            "no resolve for a pending alert"
        );
        assert_eq!(c.phase(), None);
    }

    #[test]
    fn zero_for_fires_on_first_confirmed_sight() {
        let mut c = Clock::new(0, 3600);
        assert_eq!(c.at(5, Seen::Confirmed, false), Some(NoticeStatus::Firing));
    }

    #[test]
    fn repeat_interval() {
        let mut c = Clock::new(0, 600);
        assert_eq!(c.at(0, Seen::Confirmed, false), Some(NoticeStatus::Firing));
        assert_eq!(c.at(599, Seen::Confirmed, false), None);
        assert_eq!(
            c.at(600, Seen::Confirmed, false),
            Some(NoticeStatus::Firing)
        );
        assert_eq!(
            c.at(900, Seen::Unconfirmed, false),
            None,
            "firing stays while it holds"
        );
        assert_eq!(c.phase(), Some(Phase::Firing));
        assert_eq!(
            c.at(1200, Seen::Unconfirmed, false),
            Some(NoticeStatus::Firing)
        );
        let mut never = Clock::new(0, 0);
        assert_eq!(
            never.at(0, Seen::Confirmed, false),
            Some(NoticeStatus::Firing)
        );
        assert_eq!(
            never.at(100_000, Seen::Confirmed, false),
            None,
            "repeat 0: never"
        );
    }

    #[test]
    fn silence_suppresses_then_sends_once_lifted() {
        let mut c = Clock::new(0, 3600);
        assert_eq!(c.at(0, Seen::Confirmed, true), None);
        assert_eq!(
            c.phase(),
            Some(Phase::Firing),
            "silenced alerts still fire (listed as silenced)"
        );
        assert_eq!(c.at(10, Seen::Confirmed, true), None);
        assert_eq!(
            c.at(20, Seen::Confirmed, false),
            Some(NoticeStatus::Firing),
            "silence over"
        );
        assert_eq!(
            c.at(30, Seen::Clear, true),
            None,
            "resolve inside a silence: quiet"
        );
        // Silenced all along: no resolve either.
        let mut q = Clock::new(0, 3600);
        q.at(0, Seen::Confirmed, true);
        assert_eq!(q.at(10, Seen::Clear, false), None);
    }

    #[test]
    fn fails_again_after_resolve_is_a_new_episode() {
        let mut c = Clock::new(0, 3600);
        c.at(0, Seen::Confirmed, false);
        c.at(10, Seen::Clear, false);
        assert_eq!(c.at(20, Seen::Confirmed, false), Some(NoticeStatus::Firing));
        assert_eq!(c.alerts.by_key["down/example.com/smtp"].since_us, 20 * S);
    }

    #[test]
    fn restart_keeps_firing_and_resends_once() {
        let mut c = Clock::new(0, 3600);
        c.at(0, Seen::Confirmed, false);
        let stored: Vec<AlertState> = c.alerts.by_key.values().cloned().collect();
        let mut after = Clock {
            alerts: Alerts::from_stored(stored),
            timing: c.timing,
        };
        assert_eq!(after.phase(), Some(Phase::Firing));
        assert_eq!(
            after.at(100, Seen::Confirmed, false),
            Some(NoticeStatus::Firing),
            "re-sent: the notifiers' queues died with the old process"
        );
        assert_eq!(after.at(101, Seen::Confirmed, false), None);
        assert_eq!(
            after.at(102, Seen::Clear, false),
            Some(NoticeStatus::Resolved)
        );
    }

    #[test]
    fn silence_matches_target_or_agent_until_its_end() {
        let s = Silence {
            id: "s1".into(),
            target: "example.com".into(),
            until_us: 100,
            comment: String::new(),
            by: "admin".into(),
            created_us: 0,
        };
        assert!(s.covers(&labels(), 99));
        assert!(!s.covers(&labels(), 100));
        let agent = [("agent".to_string(), "example.com".to_string())].into();
        assert!(s.covers(&agent, 0));
        assert!(!s.covers(&BTreeMap::new(), 0));
    }

    #[test]
    fn counts_by_rule_and_phase() {
        let mut c = Clock::new(60, 3600);
        c.at(0, Seen::Unconfirmed, false);
        let counts = c.alerts.counts();
        assert_eq!(counts[&("down".to_string(), Phase::Pending)], 1);
    }
}
