//! POP3 probes: `pop3` (110: greeting → CAPA → STLS → TLS → CAPA → QUIT) and `pop3s` (995: TLS
//! first). Never logs in; reports capabilities before and after TLS.

use mxscope_proto::{facts, CheckKind, ErrorClass, Observation, Outcome, Phase};
use tokio::time::Instant;

use super::dialogue::{
    open_with_greeting, starttls_missing, truncate, Dialogue, DialogueError, REPLY_TIMEOUT,
};
use super::Target;

/// POP3 capabilities (RFC 2449) a probe reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Capa {
    /// Capability tags, upper case, in the server's order.
    pub tags: Vec<String>,
    /// SASL mechanisms, upper case.
    pub sasl: Vec<String>,
}

impl Capa {
    pub(crate) fn has(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

/// Parses the lines of a CAPA answer between `+OK` and `.` (both excluded).
pub(crate) fn parse_capa(lines: &[String]) -> Capa {
    let mut capa = Capa::default();
    for line in lines {
        let mut words = line.split_ascii_whitespace();
        let Some(tag) = words.next() else { continue };
        let tag = tag.to_ascii_uppercase();
        if tag == "SASL" {
            capa.sasl.extend(words.map(str::to_ascii_uppercase));
        }
        if !capa.tags.contains(&tag) {
            capa.tags.push(tag);
        }
    }
    capa
}

/// True for a `+OK` status line.
fn is_ok(line: &str) -> bool {
    line.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("+OK"))
}

/// Records a non-`+OK` status line as a failure in `phase`; returns true for `+OK`.
fn check_ok(obs: &mut Observation, phase: Phase, line: &str) -> bool {
    if is_ok(line) {
        return true;
    }
    let is_err = line
        .get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case("-ERR"));
    let class = if is_err {
        ErrorClass::Reply5xx
    } else {
        ErrorClass::Protocol
    };
    obs.problem(
        Outcome::Fail,
        class,
        phase,
        format!("{phase}: {}", truncate(line, 200)),
    );
    false
}

/// Sends CAPA and reads the list; `None` when the server answers `-ERR` (no CAPA support).
async fn capa(
    d: &mut Dialogue,
    obs: &mut Observation,
    phase: Option<Phase>,
    deadline: Instant,
) -> Result<Option<Capa>, DialogueError> {
    let mut first = true;
    let mut ok = false;
    let lines = d
        .exchange(obs, phase, Some("CAPA"), deadline, |l| {
            if std::mem::take(&mut first) {
                ok = is_ok(l);
                return Ok(!ok);
            }
            Ok(l == ".")
        })
        .await?;
    if !ok {
        return Ok(None);
    }
    let body: Vec<String> = lines[1..lines.len().saturating_sub(1)].to_vec();
    Ok(Some(parse_capa(&body)))
}

/// Runs the POP3 dialogue against one address.
pub(crate) async fn probe(t: &Target<'_>, obs: &mut Observation) {
    let implicit = t.spec.check == CheckKind::Pop3s;
    let Some((mut d, greeting)) = open_with_greeting(t, obs, implicit).await else {
        return;
    };
    obs.fact(facts::pop3::GREETING, truncate(&greeting, 512));
    if !check_ok(obs, Phase::Greeting, &greeting) {
        return d.close(t.phase_deadline(REPLY_TIMEOUT)).await;
    }

    let caps = match capa(
        &mut d,
        obs,
        Some(Phase::Capability),
        t.phase_deadline(REPLY_TIMEOUT),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return e.record(obs, Phase::Capability),
    };
    obs.fact(facts::pop3::CAPA, caps.is_some());
    let caps = caps.unwrap_or_default();
    obs.fact(
        facts::pop3::CAPABILITIES,
        truncate(&caps.tags.join(" "), 1024),
    );
    obs.fact(facts::pop3::STLS, caps.has("STLS"));
    obs.fact(facts::pop3::USER, caps.has("USER"));
    obs.fact(facts::pop3::SASL, caps.sasl.join(" "));

    if !implicit {
        if !caps.has("STLS") {
            starttls_missing(obs, t, Phase::Capability, "STLS");
            return quit(d, t, obs).await;
        }
        let r = d
            .exchange(
                obs,
                Some(Phase::Starttls),
                Some("STLS"),
                t.phase_deadline(REPLY_TIMEOUT),
                |_| Ok(true),
            )
            .await;
        match r {
            Ok(lines) => {
                if !check_ok(
                    obs,
                    Phase::Starttls,
                    lines.first().map_or("", String::as_str),
                ) {
                    return quit(d, t, obs).await;
                }
            }
            Err(e) => return e.record(obs, Phase::Starttls),
        }
        d = match d.upgrade_tls(t, obs).await {
            Some(d) => d,
            None => return,
        };
        let started = Instant::now();
        let after = capa(&mut d, obs, None, t.phase_deadline(REPLY_TIMEOUT)).await;
        obs.fact(facts::pop3::TLS_CAPA_US, super::fact_us(started.elapsed()));
        match after {
            Ok(caps) => {
                let caps = caps.unwrap_or_default();
                obs.fact(
                    facts::pop3::TLS_CAPABILITIES,
                    truncate(&caps.tags.join(" "), 1024),
                );
                obs.fact(facts::pop3::TLS_SASL, caps.sasl.join(" "));
                obs.fact(facts::pop3::TLS_USER, caps.has("USER"));
            }
            Err(e) => return e.record(obs, Phase::Capability),
        }
    }
    quit(d, t, obs).await;
}

/// Sends QUIT and reads the `+OK` (a server that just closes is fine).
async fn quit(mut d: Dialogue, t: &Target<'_>, obs: &mut Observation) {
    match d
        .exchange(
            obs,
            Some(Phase::Quit),
            Some("QUIT"),
            t.phase_deadline(REPLY_TIMEOUT),
            |_| Ok(true),
        )
        .await
    {
        Ok(_) | Err(DialogueError::Closed) => {}
        Err(e) => {
            obs.problem(Outcome::Warn, e.class(), Phase::Quit, format!("quit: {e}"));
        }
    }
    d.close(t.phase_deadline(REPLY_TIMEOUT)).await;
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn capa_parses() {
        let lines: Vec<String> = ["TOP", "USER", "SASL PLAIN login", "STLS", "PIPELINING"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let c = parse_capa(&lines);
        assert!(c.has("STLS") && c.has("USER") && c.has("PIPELINING"));
        assert_eq!(c.sasl, vec!["PLAIN", "LOGIN"]);
        assert!(is_ok("+OK Dovecot ready.") && is_ok("+ok") && !is_ok("-ERR no") && !is_ok("+O"));
    }

    proptest! {
        #[test]
        fn capa_parser_never_panics(lines in prop::collection::vec(".{0,60}", 0..10)) {
            let c = parse_capa(&lines);
            prop_assert!(c.tags.len() <= lines.len());
            for l in &lines { let _ = is_ok(l); }
        }

        #[test]
        fn capa_round_trips(tags in prop::collection::btree_set("[A-Z][A-Z0-9-]{0,10}", 0..8)) {
            let lines: Vec<String> = tags.iter().cloned().collect();
            let c = parse_capa(&lines);
            prop_assert_eq!(c.tags.len(), tags.len());
            for t in &tags { prop_assert!(c.has(t)); }
        }
    }
}
