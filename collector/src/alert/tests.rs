//! The engine over series rows, with a fake clock, a recording notifier and a confirmation seam
//! that names whom it asked.

use std::sync::Mutex;

use super::*;

const S: i64 = 1_000_000;

#[derive(Debug, Default)]
struct Record(Mutex<Vec<Notice>>);

impl Notify for Record {
    fn send(&self, notice: Notice) {
        self.0.lock().unwrap().push(notice);
    }
}

#[derive(Debug, Default)]
struct Asks(
    Mutex<Vec<(String, String, Vec<String>)>>,
    Vec<(String, String)>,
);

impl Confirm for Asks {
    fn request(&self, target: &str, check: &str, failing: &[String]) -> Vec<(String, String)> {
        self.0
            .lock()
            .unwrap()
            .push((target.into(), check.into(), failing.to_vec()));
        self.1.clone()
    }
}

fn row(region: &str, failing: bool, seen_us: i64) -> SeriesRow {
    SeriesRow {
        target: "example.com".into(),
        endpoint: "mx1.example.com[198.18.0.2]:25".into(),
        check: "smtp".into(),
        region: region.into(),
        last_outcome: if failing {
            pb::Outcome::Fail
        } else {
            pb::Outcome::Ok
        } as i32,
        last_error: if failing {
            "timeout".into()
        } else {
            String::new()
        },
        last_message: String::new(),
        last_seen_us: seen_us,
        interval_ms: 60_000,
        failing,
        state_since_us: 0,
        agent_id: format!("agent-{region}"),
        agent_last_seen_us: Some(seen_us),
        last_phase: if failing {
            "connect".into()
        } else {
            String::new()
        },
        last_facts: BTreeMap::new(),
    }
}

fn engine(rules: &str, confirm: Option<Arc<dyn Confirm>>) -> (Engine, Arc<Record>) {
    let record = Arc::new(Record::default());
    let e = Engine::new(
        rules::parse("t.toml", rules).unwrap(),
        Settings {
            stale_after: Duration::from_secs(120),
            quorum: Quorum::Majority,
            public_url: "http://127.0.0.1:9090".into(),
        },
        confirm,
        record.clone(),
    );
    (e, record)
}

fn keys(n: &[Notice]) -> Vec<(String, NoticeStatus)> {
    n.iter().map(|n| (n.key.clone(), n.status)).collect()
}

#[test]
fn all_regions_down_fires_down_after_confirmation_then_resolves() {
    let asks = Arc::new(Asks(
        Mutex::default(),
        vec![
            ("agent-b".into(), "b".into()),
            ("agent-c".into(), "c".into()),
        ],
    ));
    let (mut e, record) = engine("", Some(asks.clone()));
    let t0 = 1_000 * S;
    // a fails first; b, c still fine: asked.
    let s = [row("a", true, t0), row("b", false, t0), row("c", false, t0)];
    assert!(e.evaluate(&s, t0).is_empty());
    assert_eq!(asks.0.lock().unwrap().len(), 1);
    assert_eq!(asks.0.lock().unwrap()[0].2, vec!["a".to_string()]);
    // All three fail, answers of b and c arrived after the request; `for` of down is 60 s.
    let s = [
        row("a", true, t0 + 10 * S),
        row("b", true, t0 + 10 * S),
        row("c", true, t0 + 10 * S),
    ];
    assert!(e.evaluate(&s, t0 + 10 * S).is_empty(), "for not over");
    let s2 = [
        row("a", true, t0 + 70 * S),
        row("b", true, t0 + 70 * S),
        row("c", true, t0 + 70 * S),
    ];
    let n = e.evaluate(&s2, t0 + 70 * S);
    assert_eq!(
        keys(&n),
        vec![("down/example.com/smtp".to_string(), NoticeStatus::Firing)]
    );
    assert_eq!(
        n[0].generator_url,
        "http://127.0.0.1:9090/#/target/example.com"
    );
    assert_eq!(n[0].labels["alertname"], "down");
    assert_eq!(n[0].labels["severity"], "critical");
    assert!(!n[0].evidence.is_empty(), "the diagnosis is the evidence");
    assert!(e.evaluate(&s2, t0 + 80 * S).is_empty(), "dedupe");
    let ok = [
        row("a", false, t0 + 90 * S),
        row("b", false, t0 + 90 * S),
        row("c", false, t0 + 90 * S),
    ];
    let n = e.evaluate(&ok, t0 + 90 * S);
    assert_eq!(
        keys(&n),
        vec![("down/example.com/smtp".to_string(), NoticeStatus::Resolved)]
    );
    assert!(n[0].ends_at_us.is_some());
    assert_eq!(record.0.lock().unwrap().len(), 2);
}

#[test]
fn one_region_blocked_waits_for_answers_then_is_partial_only_after_for() {
    let asks = Arc::new(Asks(Mutex::default(), vec![("agent-b".into(), "b".into())]));
    let rules = "[[rule]]\nname = \"partial\"\nkind = \"partial\"\nfor = \"5m\"\n";
    let (mut e, _) = engine(rules, Some(asks));
    let t0 = 1_000 * S;
    // b's last result is older than the request: not confirmed yet.
    let s = [
        row("a", true, t0),
        row("b", false, t0 - 30 * S),
        row("c", false, t0 - 30 * S),
    ];
    assert!(e.evaluate(&s, t0).is_empty());
    let s = [
        row("a", true, t0 + 400 * S),
        row("b", false, t0 + 390 * S),
        row("c", false, t0 + 390 * S),
    ];
    let n = e.evaluate(&s, t0 + 400 * S);
    assert_eq!(
        keys(&n),
        vec![("partial/example.com/smtp".to_string(), NoticeStatus::Firing)]
    );
    assert!(
        !e.alerts.by_key.keys().any(|k| k.starts_with("down/")),
        "a one-region block never makes down"
    );
}

#[test]
fn unconfirmed_failure_does_not_fire_until_the_wait_is_over() {
    let asks = Arc::new(Asks(Mutex::default(), vec![("agent-b".into(), "b".into())]));
    let rules = "[defaults]\nconfirm_wait = \"1m\"\n[[rule]]\nname = \"down\"\nkind = \"down\"\nfor = \"0s\"\n";
    let (mut e, _) = engine(rules, Some(asks));
    let t0 = 1_000 * S;
    // Both fail, b's result predates the request.
    let s = [row("a", true, t0), row("b", true, t0 - 10 * S)];
    assert!(e.evaluate(&s, t0).is_empty(), "waiting for b's answer");
    assert!(e.evaluate(&s, t0 + 30 * S).is_empty());
    let n = e.evaluate(&s, t0 + 61 * S);
    assert_eq!(
        keys(&n),
        vec![("down/example.com/smtp".to_string(), NoticeStatus::Firing)]
    );
}

#[test]
fn single_region_falls_back_to_for() {
    let (mut e, _) = engine("", None);
    let t0 = 1_000 * S;
    assert!(e.evaluate(&[row("a", true, t0)], t0).is_empty());
    let n = e.evaluate(&[row("a", true, t0 + 61 * S)], t0 + 61 * S);
    assert_eq!(
        keys(&n),
        vec![("down/example.com/smtp".to_string(), NoticeStatus::Firing)]
    );
}

#[test]
fn a_stale_agent_raises_only_agent_down() {
    let (mut e, _) = engine("", None);
    let t0 = 10_000 * S;
    let mut stale = row("c", true, t0 - 600 * S);
    stale.agent_last_seen_us = Some(t0 - 600 * S);
    let s = [row("a", false, t0), row("b", false, t0), stale.clone()];
    assert!(
        e.evaluate(&s, t0).is_empty(),
        "agent-down waits its for (2m)"
    );
    let later = t0 + 130 * S;
    let s = [row("a", false, later), row("b", false, later), stale];
    let n = e.evaluate(&s, later);
    assert_eq!(
        keys(&n),
        vec![("agent-down/agent-c".to_string(), NoticeStatus::Firing)]
    );
    assert_eq!(n[0].labels["region"], "c");
}

#[test]
fn silenced_target_sends_nothing_but_is_firing() {
    let (mut e, record) = engine("[[rule]]\nname = \"down\"\nkind = \"down\"\n", None);
    let t0 = 1_000 * S;
    e.silences.push(Silence {
        id: "s1".into(),
        target: "example.com".into(),
        until_us: t0 + 3600 * S,
        comment: "maintenance".into(),
        by: "admin".into(),
        created_us: t0,
    });
    assert!(e.evaluate(&[row("a", true, t0)], t0).is_empty());
    assert_eq!(
        e.alerts.by_key["down/example.com/smtp"].phase,
        state::Phase::Firing
    );
    assert!(record.0.lock().unwrap().is_empty());
}

fn mx(region: &str, host: &str, pref: u16, failing: bool, seen_us: i64) -> SeriesRow {
    let mut r = row(region, failing, seen_us);
    r.endpoint = format!("{host}[198.18.0.{pref}]:25");
    r.last_facts.insert(
        mxscope_proto::facts::mx::PREFERENCE.to_string(),
        pref.to_string(),
    );
    r
}

#[test]
fn a_stopped_backup_mx_raises_redundancy_not_down() {
    let (mut e, _) = engine("", None);
    let t0 = 1_000 * S;
    let at = |t| {
        vec![
            mx("a", "mx1.example.com", 10, false, t),
            mx("a", "mx2.example.com", 20, true, t),
            mx("b", "mx1.example.com", 10, false, t),
            mx("b", "mx2.example.com", 20, true, t),
        ]
    };
    assert!(
        e.evaluate(&at(t0), t0).is_empty(),
        "redundancy waits its for (5m)"
    );
    let n = e.evaluate(&at(t0 + 301 * S), t0 + 301 * S);
    assert_eq!(
        keys(&n),
        vec![(
            "redundancy/example.com/smtp/mx2.example.com".to_string(),
            NoticeStatus::Firing
        )]
    );
    assert_eq!(n[0].labels["mx"], "mx2.example.com");
    // Blocked from one region only: not a redundancy loss.
    let (mut e, _) = engine(
        "[[rule]]\nname = \"redundancy\"\nkind = \"redundancy\"\n",
        None,
    );
    let one = vec![
        mx("a", "mx1.example.com", 10, false, t0),
        mx("a", "mx2.example.com", 20, true, t0),
        mx("b", "mx1.example.com", 10, false, t0),
        mx("b", "mx2.example.com", 20, false, t0),
    ];
    assert!(e.evaluate(&one, t0).is_empty());
    assert!(e.alerts.by_key.is_empty());
}

#[test]
fn a_certificate_expiring_within_days_fires_from_any_region() {
    let (mut e, _) = engine(
        "[defaults]\nbuiltin = false\n[[rule]]\nname = \"certs\"\nkind = \"cert-expiry\"\ndays = 20\n",
        None,
    );
    let t0 = 1_000 * S;
    let mut soon = row("b", false, t0);
    soon.last_facts
        .insert(mxscope_proto::facts::cert::DAYS_LEFT.into(), "9".into());
    let mut later = row("a", false, t0);
    later
        .last_facts
        .insert(mxscope_proto::facts::cert::DAYS_LEFT.into(), "60".into());
    let n = e.evaluate(&[later.clone(), soon], t0);
    assert_eq!(n.len(), 1, "{n:?}");
    assert!(
        n[0].key.starts_with("certs/example.com/smtp/"),
        "{}",
        n[0].key
    );
    assert_eq!(n[0].labels["region"], "b");
    assert!(n[0].summary.contains("9 days"), "{}", n[0].summary);
    // Renewed: resolves.
    let n = e.evaluate(&[later], t0 + S);
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].status, NoticeStatus::Resolved);
}

#[test]
fn counts_for_metrics_by_rule_and_state() {
    use crate::http::MetricsSource;
    let counts = Arc::new(AlertCounts::default());
    let (e, _) = engine("", None);
    let mut e = e.with_counts(counts.clone());
    let t0 = 1_000 * S;
    e.evaluate(&[row("a", true, t0)], t0);
    let mut registry = prometheus_client::registry::Registry::default();
    counts.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("mxscope_alerts{rule=\"down\",state=\"pending\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("mxscope_alerts{rule=\"drift\",state=\"firing\"} 0"),
        "{text}"
    );
}
