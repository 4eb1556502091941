//! Alerting: the rules (`rules`, from `--alert-rules` or built in), the state machine of each
//! alert (`state`: pending, firing, resolved; dedupe, repeat, silences) and here the engine that
//! evaluates the mail-level verdicts (the matrix the Query API answers, `analysis::cross`) on a
//! tick, asks other regions to confirm a new failure (`confirm::Confirm`) and hands the notices
//! to `notify::Notify`.

pub mod rules;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use mxscope_proto::model::Metric;
use mxscope_proto::pb;
use tokio_util::sync::CancellationToken;

use crate::analysis::cross;
use crate::analysis::diagnosis::{agent_faults, SeriesView};
use crate::analysis::mail;
use crate::analysis::scope::{Quorum, RegionState};
use crate::analysis::series::SeriesRow;
use crate::analysis::status::StatusParams;
use crate::confirm::Confirm;
use crate::notify::{Notice, NoticeStatus, Notify};
use crate::store::{Filter, Store};
use rules::{Kind, Rule, Rules};
use state::{Alerts, Seen, Silence, Timing};

/// A notifier that only logs: what the engine uses when no notifier is configured.
#[derive(Debug, Default)]
pub struct LogNotify;

impl Notify for LogNotify {
    fn send(&self, notice: Notice) {
        tracing::info!(
            alert.key = %notice.key,
            alert.status = ?notice.status,
            alert.severity = %notice.severity,
            summary = %notice.summary,
            "alert"
        );
    }
}

/// The alerts per (rule, state) for `/metrics` (`mxscope_alerts`), as of the last evaluation.
/// Labels: the rule names of the loaded rules and the states `pending`, `firing`, `silenced`.
#[derive(Debug, Default)]
pub struct AlertCounts(std::sync::Mutex<BTreeMap<(String, &'static str), u64>>);

impl crate::http::MetricsSource for AlertCounts {
    fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        let family = Family::<Vec<(String, String)>, Gauge>::default();
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for ((rule, state), n) in counts.iter() {
            family
                .get_or_create(&vec![
                    ("rule".to_string(), rule.clone()),
                    ("state".to_string(), (*state).to_string()),
                ])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        registry.register(
            "mxscope_alerts",
            "Alerts by rule and state (pending, firing, silenced)",
            family,
        );
    }
}

/// A confirmation asked for a (target, check): when, and whom.
#[derive(Debug, Clone)]
struct Asked {
    at_us: i64,
    regions: BTreeSet<String>,
}

/// The engine's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub stale_after: Duration,
    pub quorum: Quorum,
    /// Base of the dashboard links (`generator_url`), e.g. `http://127.0.0.1:9090`.
    pub public_url: String,
}

/// The alert engine: rules, every alert's state, silences, the confirmations in flight.
#[derive(Debug)]
pub struct Engine {
    pub rules: Rules,
    pub alerts: Alerts,
    pub silences: Vec<Silence>,
    settings: Settings,
    confirm: Option<Arc<dyn Confirm>>,
    notify: Arc<dyn Notify>,
    asked: BTreeMap<(String, String), Asked>,
    counts: Arc<AlertCounts>,
}

fn us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// One condition found on an evaluation.
struct Found {
    key: String,
    seen: Seen,
    labels: BTreeMap<String, String>,
    summary: String,
    target: Option<String>,
}

impl Engine {
    pub fn new(
        rules: Rules,
        settings: Settings,
        confirm: Option<Arc<dyn Confirm>>,
        notify: Arc<dyn Notify>,
    ) -> Self {
        Engine {
            rules,
            alerts: Alerts::default(),
            silences: Vec::new(),
            settings,
            confirm,
            notify,
            asked: BTreeMap::new(),
            counts: Arc::default(),
        }
    }

    /// Where the engine publishes its counts for `/metrics`.
    pub fn with_counts(mut self, counts: Arc<AlertCounts>) -> Self {
        self.counts = counts;
        self
    }

    fn publish_counts(&self, now_us: i64) {
        let mut out: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
        for r in &self.rules.rules {
            for state in ["pending", "firing", "silenced"] {
                out.insert((r.name.clone(), state), 0);
            }
        }
        for a in self.alerts.by_key.values() {
            let state = match a.phase {
                state::Phase::Pending => "pending",
                state::Phase::Firing if self.silenced(&a.labels, now_us) => "silenced",
                state::Phase::Firing => "firing",
                state::Phase::Resolved => continue,
            };
            *out.entry((a.rule.clone(), state)).or_insert(0) += 1;
        }
        *self.counts.0.lock().unwrap_or_else(|e| e.into_inner()) = out;
    }

    /// Whether the asked regions answered for (target, check) since the request, or the wait is
    /// over, or nobody could be asked.
    fn confirmed(&self, series: &[SeriesRow], target: &str, check: &str, now_us: i64) -> bool {
        let Some(asked) = self.asked.get(&(target.to_string(), check.to_string())) else {
            return true;
        };
        if asked.regions.is_empty() || now_us - asked.at_us >= us(self.rules.confirm_wait) {
            return true;
        }
        asked.regions.iter().all(|region| {
            series.iter().any(|s| {
                s.target == target
                    && s.check == check
                    && &s.region == region
                    && s.last_seen_us >= asked.at_us
            })
        })
    }

    /// One evaluation over every series' latest state at `now_us`: returns the notices sent.
    pub fn evaluate(&mut self, series: &[SeriesRow], now_us: i64) -> Vec<Notice> {
        let params = StatusParams {
            now_us,
            stale_after_us: us(self.settings.stale_after),
        };
        let views = cross::views(series, &Default::default(), &params);
        let matrix = cross::matrix(
            &views,
            &BTreeMap::new(),
            Metric::Reachability,
            self.settings.quorum,
            "",
        );
        let mut found: Vec<(String, Found)> = Vec::new();
        for row in &matrix.rows {
            let id = (row.target.clone(), row.check.clone());
            if row.failing_regions.is_empty() {
                self.asked.remove(&id);
            } else if !self.asked.contains_key(&id) {
                let regions = match &self.confirm {
                    Some(c) => c
                        .request(&row.target, &row.check, &row.failing_regions)
                        .into_iter()
                        .map(|(_, region)| region)
                        .collect(),
                    None => BTreeSet::new(),
                };
                self.asked.insert(
                    id.clone(),
                    Asked {
                        at_us: now_us,
                        regions,
                    },
                );
            }
            let confirmed = self.confirmed(series, &row.target, &row.check, now_us);
            for rule in &self.rules.rules {
                let holds = match rule.kind {
                    Kind::Down => row.scope == "down",
                    Kind::Partial => row.scope == "partial",
                    _ => continue,
                };
                if !rule.applies(&row.target, &row.check) {
                    continue;
                }
                let seen = match (holds, confirmed) {
                    (false, _) => Seen::Clear,
                    (true, false) => Seen::Unconfirmed,
                    (true, true) => Seen::Confirmed,
                };
                let mut labels = BTreeMap::from([
                    ("target".to_string(), row.target.clone()),
                    ("check".to_string(), row.check.clone()),
                ]);
                if !row.failing_regions.is_empty() {
                    labels.insert("region".into(), row.failing_regions.join(","));
                }
                let summary = format!(
                    "{} {} is {} (failing in {})",
                    row.target,
                    row.check,
                    row.scope,
                    row.failing_regions.join(", ")
                );
                found.push((
                    rule.name.clone(),
                    Found {
                        key: format!("{}/{}/{}", rule.name, row.target, row.check),
                        seen,
                        labels,
                        summary,
                        target: Some(row.target.clone()),
                    },
                ));
            }
        }
        self.agents(&views, &mut found);
        self.redundancy(&views, &mut found);
        self.certificates(&views, &mut found);
        self.apply(found, &views, now_us)
    }

    /// `agent-down` (every series of the agent stale) and `agent-network` (its failures are its
    /// own network): the only alerts a stale or faulty agent raises.
    fn agents(&self, views: &[SeriesView], found: &mut Vec<(String, Found)>) {
        let mut by_agent: BTreeMap<&str, (bool, &str)> = BTreeMap::new();
        for v in views {
            let e = by_agent
                .entry(v.agent_id.as_str())
                .or_insert((true, v.region.as_str()));
            e.0 &= v.state == RegionState::Stale;
        }
        let faults = agent_faults(views);
        for rule in &self.rules.rules {
            match rule.kind {
                Kind::AgentDown => {
                    for (agent, (stale, region)) in &by_agent {
                        found.push((
                            rule.name.clone(),
                            agent_found(rule, agent, region, None, *stale),
                        ));
                    }
                }
                Kind::AgentNetwork => {
                    for (agent, (_, region)) in &by_agent {
                        let checks: BTreeSet<&str> = views
                            .iter()
                            .filter(|v| v.agent_id == *agent)
                            .map(|v| v.check.as_str())
                            .collect();
                        for check in checks {
                            let holds = faults.contains(&(agent.to_string(), check.to_string()));
                            found.push((
                                rule.name.clone(),
                                agent_found(rule, agent, region, Some(check), holds),
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// `redundancy`: an MX host of a domain fails from every fresh region that sees it while
    /// mail still flows through another host there (a one-region block of a backup does not).
    fn redundancy(&self, views: &[SeriesView], found: &mut Vec<(String, Found)>) {
        let rules: Vec<&Rule> = self
            .rules
            .rules
            .iter()
            .filter(|r| r.kind == Kind::Redundancy)
            .collect();
        if rules.is_empty() {
            return;
        }
        let faults = agent_faults(views);
        let mut groups: BTreeMap<(&str, &str), Vec<&SeriesView>> = BTreeMap::new();
        for v in views {
            groups
                .entry((v.target.as_str(), v.check.as_str()))
                .or_default()
                .push(v);
        }
        for ((target, check), rows) in groups {
            if !mail::is_mail_group(check, &rows) {
                continue;
            }
            // Per host: (regions seeing it fresh, regions where it fails while mail flows).
            let mut hosts: BTreeMap<String, (BTreeSet<&str>, BTreeSet<&str>)> = BTreeMap::new();
            for (region, verdict) in mail::by_region(&rows, &faults) {
                if verdict.state == RegionState::Stale || verdict.state == RegionState::AgentFault {
                    continue;
                }
                for h in &verdict.hosts {
                    hosts
                        .entry(h.name.to_string())
                        .or_default()
                        .0
                        .insert(region);
                }
                for h in verdict.failing_hosts() {
                    hosts
                        .entry(h.name.to_string())
                        .or_default()
                        .1
                        .insert(region);
                }
            }
            for rule in &rules {
                if !rule.applies(target, check) {
                    continue;
                }
                for (host, (seen, failing)) in &hosts {
                    let holds = !seen.is_empty() && seen == failing;
                    let labels = BTreeMap::from([
                        ("target".to_string(), target.to_string()),
                        ("check".to_string(), check.to_string()),
                        ("mx".to_string(), host.clone()),
                    ]);
                    found.push((
                        rule.name.clone(),
                        Found {
                            key: format!("{}/{target}/{check}/{host}", rule.name),
                            seen: if holds { Seen::Confirmed } else { Seen::Clear },
                            labels,
                            summary: format!(
                                "{target}: MX {host} fails {check} from {} while mail flows through another MX",
                                failing.iter().copied().collect::<Vec<_>>().join(", ")
                            ),
                            target: Some(target.to_string()),
                        },
                    ));
                }
            }
        }
    }

    /// `cert-expiry`: a certificate seen by any region on any MX and port expires within the
    /// rule's `days` (the probes' `cert.days_left` fact).
    fn certificates(&self, views: &[SeriesView], found: &mut Vec<(String, Found)>) {
        // (target, check, endpoint) -> (fewest days left, a region that saw it).
        let mut certs: BTreeMap<(&str, &str, &str), (i64, &str)> = BTreeMap::new();
        for v in views {
            if v.state == RegionState::Stale {
                continue;
            }
            let Some(days) = v
                .facts
                .get(mxscope_proto::facts::cert::DAYS_LEFT)
                .and_then(|d| d.parse::<i64>().ok())
            else {
                continue;
            };
            let e = certs
                .entry((v.target.as_str(), v.check.as_str(), v.endpoint.as_str()))
                .or_insert((days, v.region.as_str()));
            if days < e.0 {
                *e = (days, v.region.as_str());
            }
        }
        for rule in self
            .rules
            .rules
            .iter()
            .filter(|r| r.kind == Kind::CertExpiry)
        {
            for ((target, check, endpoint), (days, region)) in &certs {
                if !rule.applies(target, check) {
                    continue;
                }
                let holds = *days < i64::from(rule.days);
                let labels = BTreeMap::from([
                    ("target".to_string(), target.to_string()),
                    ("check".to_string(), check.to_string()),
                    ("endpoint".to_string(), endpoint.to_string()),
                    ("region".to_string(), region.to_string()),
                ]);
                found.push((
                    rule.name.clone(),
                    Found {
                        key: format!("{}/{target}/{check}/{endpoint}", rule.name),
                        seen: if holds { Seen::Confirmed } else { Seen::Clear },
                        labels,
                        summary: format!(
                            "{target}: the certificate of {endpoint} ({check}) expires in {days} days (seen from {region})"
                        ),
                        target: Some(target.to_string()),
                    },
                ));
            }
        }
    }

    fn apply(
        &mut self,
        found: Vec<(String, Found)>,
        views: &[SeriesView],
        now_us: i64,
    ) -> Vec<Notice> {
        let mut sent = Vec::new();
        let mut seen_keys = BTreeSet::new();
        let timing_of = |rules: &Rules, name: &str| {
            rules.get(name).map(|r| Timing {
                for_: r.for_,
                repeat: r.repeat,
            })
        };
        for (rule_name, f) in found {
            let Some(timing) = timing_of(&self.rules, &rule_name) else {
                continue;
            };
            seen_keys.insert(f.key.clone());
            let silenced = self.silenced(&f.labels, now_us);
            let step = self.alerts.observe(
                &f.key, &rule_name, timing, f.seen, silenced, &f.labels, &f.summary, now_us,
            );
            if let Some(status) = step.notice {
                let notice = self.notice(&f.key, status, f.target.as_deref(), views, now_us);
                self.notify.send(notice.clone());
                sent.push(notice);
            }
        }
        // Alerts whose condition is gone entirely (a removed target or rule) resolve.
        for key in self.alerts.unseen(&seen_keys) {
            let Some(a) = self.alerts.by_key.get(&key).cloned() else {
                continue;
            };
            let timing = timing_of(&self.rules, &a.rule).unwrap_or(Timing {
                for_: Duration::ZERO,
                repeat: Duration::ZERO,
            });
            let silenced = self.silenced(&a.labels, now_us);
            let step = self.alerts.observe(
                &key,
                &a.rule,
                timing,
                Seen::Clear,
                silenced,
                &a.labels,
                &a.summary,
                now_us,
            );
            if let Some(status) = step.notice {
                let target = a.labels.get("target").cloned();
                let notice = self.notice(&key, status, target.as_deref(), views, now_us);
                self.notify.send(notice.clone());
                sent.push(notice);
            }
        }
        // Resolved alerts have sent their notice: they leave the state (history is to come).
        self.alerts.take_resolved();
        self.publish_counts(now_us);
        sent
    }

    fn silenced(&self, labels: &BTreeMap<String, String>, now_us: i64) -> bool {
        self.silences.iter().any(|s| s.covers(labels, now_us))
    }

    /// The notice of `key` in its current state, with the target's diagnosis as evidence.
    fn notice(
        &self,
        key: &str,
        status: NoticeStatus,
        target: Option<&str>,
        views: &[SeriesView],
        now_us: i64,
    ) -> Notice {
        let a = &self.alerts.by_key[key];
        let rule = self.rules.get(&a.rule);
        let severity = rule.map_or("warning".to_string(), |r| r.severity.clone());
        let mut labels = a.labels.clone();
        if let Some(r) = rule {
            labels.extend(r.labels.clone());
        }
        labels.insert("alertname".into(), a.rule.clone());
        labels.insert("severity".into(), severity.clone());
        let evidence = match target {
            Some(t) => {
                let d: pb::DiagnoseResponse = cross::diagnosis(t, views);
                let mut lines = Vec::new();
                if !d.explanation.is_empty() {
                    lines.push(d.explanation.clone());
                }
                for f in d.findings {
                    lines.push(format!("{} ({}): {}", f.layer, f.check, f.summary));
                    lines.extend(f.evidence);
                }
                lines
            }
            None => Vec::new(),
        };
        let base = self.settings.public_url.trim_end_matches('/');
        let generator_url = match target {
            Some(t) => format!("{base}/#/target/{t}"),
            None => format!("{base}/#/agents"),
        };
        Notice {
            key: key.to_string(),
            rule: a.rule.clone(),
            status,
            severity,
            labels,
            summary: a.summary.clone(),
            evidence,
            before: None,
            after: None,
            starts_at_us: if a.fired_us > 0 {
                a.fired_us
            } else {
                a.since_us
            },
            ends_at_us: (status == NoticeStatus::Resolved).then_some(now_us),
            generator_url,
            test: false,
        }
    }

    /// Replaces the rules (SIGHUP); alerts of removed rules resolve on the next evaluation.
    pub fn set_rules(&mut self, rules: Rules) {
        self.rules = rules;
    }
}

fn agent_found(rule: &Rule, agent: &str, region: &str, check: Option<&str>, holds: bool) -> Found {
    let mut labels = BTreeMap::from([
        ("agent".to_string(), agent.to_string()),
        ("region".to_string(), region.to_string()),
    ]);
    let key = match check {
        Some(c) => {
            labels.insert("check".into(), c.to_string());
            format!("{}/{agent}/{c}", rule.name)
        }
        None => format!("{}/{agent}", rule.name),
    };
    let summary = match rule.kind {
        Kind::AgentDown => format!("agent {agent} ({region}) stopped reporting"),
        _ => format!(
            "agent {agent} ({region}) fails {} on most targets: its own network",
            check.unwrap_or("")
        ),
    };
    Found {
        key,
        seen: if holds { Seen::Confirmed } else { Seen::Clear },
        labels,
        summary,
        target: None,
    }
}

/// Runs the engine until `stop`: every `interval` and on the store's state changes, reads every
/// series and evaluates. On SIGHUP it re-reads `rules_file`; a bad file keeps the old rules and
/// logs the `file:line` error.
pub async fn run(
    store: Arc<dyn Store>,
    mut engine: Engine,
    interval: Duration,
    rules_file: Option<std::path::PathBuf>,
    stop: CancellationToken,
) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(err) => {
            tracing::warn!(error = %err, "alerts: no SIGHUP handler, rules are not reloaded");
            None
        }
    };
    let mut events = store.subscribe();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                match &rules_file {
                    Some(path) => match rules::load(path) {
                        Ok(rules) => {
                            tracing::info!(rules = rules.rules.len(), file = %path.display(), "alert rules reloaded");
                            engine.set_rules(rules);
                        }
                        Err(err) => tracing::error!(error = %err, "alert rules not reloaded, the old rules stay"),
                    },
                    None => tracing::info!("SIGHUP: no --alert-rules file, the built-in rules stay"),
                }
            }
            e = events.recv() => {
                if matches!(e, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    return;
                }
            }
        }
        let series = match store.series(Filter::default()).await {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(error = %err, "alerts: series not readable, evaluation skipped");
                continue;
            }
        };
        engine.evaluate(&series, mxscope_proto::time::now_us());
    }
}

#[cfg(test)]
mod tests;
