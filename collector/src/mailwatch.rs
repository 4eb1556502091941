//! Mail-level state changes for `watch`: follows the store's endpoint changes of port 25 on
//! MX-expanded domains and, when whether mail flows from the region changes (at least one MX host
//! completing the dialogue, or none), publishes an event of level `mail` beside the endpoint ones.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mxscope_proto::pb;
use mxscope_proto::time::now_us;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::analysis::cross;
use crate::analysis::diagnosis::SeriesView;
use crate::analysis::mail;
use crate::analysis::scope::RegionState;
use crate::analysis::status::StatusParams;
use crate::store::{Filter, Store};

/// Known (target, check, region) verdicts kept at most; beyond it the map starts over (the next
/// change of a forgotten key is judged from its old endpoint state, as on the first one).
const MAX_KEYS: usize = 100_000;

/// Endpoint events become this level's events only when the verdict changes.
pub const LEVEL: &str = "mail";

/// Runs until `stop`: reads the store's events and sends the mail-level ones on `tx`.
pub async fn run(
    store: Arc<dyn Store>,
    stale_after: Duration,
    tx: broadcast::Sender<pb::WatchEvent>,
    stop: CancellationToken,
) {
    let mut rx = store.subscribe();
    let mut known: BTreeMap<(String, String, String), RegionState> = BTreeMap::new();
    let stale_after_us = i64::try_from(stale_after.as_micros()).unwrap_or(i64::MAX);
    loop {
        let e = tokio::select! {
            () = stop.cancelled() => return,
            e = rx.recv() => e,
        };
        let e = match e {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    skipped = n,
                    "mail watch behind the store's events, verdicts re-read"
                );
                known.clear();
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        // Only port 25 of MX-expanded domains: other events cost no read (and a read makes the
        // writer write its buffered rows first).
        if !e.via_mx || !mail::judged_as_mail(&e.check) || e.level == LEVEL {
            continue;
        }
        let filter = Filter {
            target: e.target.clone(),
            check: e.check.clone(),
            region: e.region.clone(),
            agent_id: String::new(),
        };
        let series = match store.series(filter).await {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(error = %err, "mail watch: series not readable, change skipped");
                continue;
            }
        };
        let params = StatusParams {
            now_us: now_us(),
            stale_after_us,
        };
        let views = cross::views(&series, &Default::default(), &params);
        let key = (e.target.clone(), e.check.clone(), e.region.clone());
        let Some(now) = verdict(&views, &e, None) else {
            continue;
        };
        let before = match known.get(&key) {
            Some(s) => Some(*s),
            None => verdict(&views, &e, Some(&e.old_state)),
        };
        if known.len() >= MAX_KEYS {
            known.clear();
        }
        known.insert(key, now);
        if let Some(before) = before.filter(|b| *b != now) {
            let event = pb::WatchEvent {
                target: e.target.clone(),
                endpoint: String::new(),
                check: e.check.clone(),
                region: e.region.clone(),
                old_state: before.name().to_string(),
                new_state: now.name().to_string(),
                at_us: e.at_us,
                error_class: if now == RegionState::Failing {
                    e.error_class.clone()
                } else {
                    String::new()
                },
                level: LEVEL.to_string(),
                via_mx: true,
            };
            // No subscriber is fine: nobody watches.
            let _ = tx.send(event);
        }
    }
}

/// Whether mail flows from the event's region (`Ok` or `Failing`; `None` when the series are not
/// a mail group or not judged), with the event's endpoint in state `endpoint_state` if given.
fn verdict(
    views: &[SeriesView],
    e: &pb::WatchEvent,
    endpoint_state: Option<&str>,
) -> Option<RegionState> {
    let mut views = views.to_vec();
    if let Some(state) = endpoint_state {
        let state = state.parse::<RegionState>().ok()?;
        for v in views.iter_mut().filter(|v| v.endpoint == e.endpoint) {
            v.state = state;
        }
    }
    let rows: Vec<&SeriesView> = views.iter().collect();
    if !mail::is_mail_group(&e.check, &rows) {
        return None;
    }
    let m = mail::region_mail(&e.region, &rows, &Default::default());
    matches!(m.state, RegionState::Ok | RegionState::Failing).then_some(m.state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mxscope_proto::facts;

    fn view(endpoint: &str, state: RegionState) -> SeriesView {
        SeriesView {
            target: "d.test".into(),
            endpoint: endpoint.into(),
            check: "smtp".into(),
            region: "eu".into(),
            agent_id: "a".into(),
            state,
            outcome: "ok".into(),
            error_class: None,
            phase: None,
            message: String::new(),
            facts: [(facts::address::VIA_MX.to_string(), "true".to_string())]
                .into_iter()
                .collect(),
            canary: false,
        }
    }

    fn event(endpoint: &str, old: &str, new: &str) -> pb::WatchEvent {
        pb::WatchEvent {
            target: "d.test".into(),
            endpoint: endpoint.into(),
            check: "smtp".into(),
            region: "eu".into(),
            old_state: old.into(),
            new_state: new.into(),
            at_us: 1,
            error_class: String::new(),
            level: "endpoint".into(),
            via_mx: true,
        }
    }

    #[test]
    fn the_verdict_before_a_change_is_judged_with_the_endpoints_old_state() {
        let mx1 = "mx1.d.test[198.18.0.2]:25";
        let mx2 = "mx2.d.test[198.18.0.3]:25";
        // The backup fails while the primary works: mail flows before and after.
        let views = [view(mx1, RegionState::Ok), view(mx2, RegionState::Failing)];
        let e = event(mx2, "ok", "failing");
        assert_eq!(verdict(&views, &e, None), Some(RegionState::Ok));
        assert_eq!(verdict(&views, &e, Some("ok")), Some(RegionState::Ok));
        // Then the primary fails too: mail stops flowing.
        let views = [
            view(mx1, RegionState::Failing),
            view(mx2, RegionState::Failing),
        ];
        let e = event(mx1, "ok", "failing");
        assert_eq!(verdict(&views, &e, None), Some(RegionState::Failing));
        assert_eq!(verdict(&views, &e, Some("ok")), Some(RegionState::Ok));
        // A host target's port 25 is no mail group.
        let mut host = view(mx1, RegionState::Failing);
        host.facts.clear();
        assert_eq!(verdict(&[host], &e, None), None);
    }
}
