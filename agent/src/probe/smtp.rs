//! SMTP probes: `smtp` (25) and `submission` (587) with STARTTLS, `smtps` (465) with implicit TLS.
//! Greeting → EHLO → STARTTLS → TLS → EHLO → optional MAIL/RCPT (never DATA) → QUIT, each phase timed.

use mxscope_proto::{facts, CheckKind, ErrorClass, Observation, Outcome, Phase};
use tokio::time::Instant;

use super::dialogue::{
    starttls_missing, truncate, Bounds, Dialogue, DialogueError, Io, Reply, REPLY_TIMEOUT,
};
use super::{tcp, tls, Target, CONNECT_TIMEOUT};

/// The EHLO keywords a probe reports (RFC 5321 §4.1.1.1 and service extensions).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Extensions {
    /// Every keyword, upper case, in the server's order.
    pub keywords: Vec<String>,
    pub starttls: bool,
    /// SIZE limit in bytes when the server states one (0 = no fixed limit).
    pub size: Option<u64>,
    pub pipelining: bool,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    /// AUTH mechanisms, upper case.
    pub auth: Vec<String>,
}

/// Parses the lines of a 250 EHLO reply (the first line is the server's greeting, not a keyword).
pub(crate) fn parse_ehlo(lines: &[String]) -> Extensions {
    let mut ext = Extensions::default();
    for line in lines.iter().skip(1) {
        let mut words = line.split_ascii_whitespace();
        let Some(first) = words.next() else { continue };
        // Old servers announce `AUTH=LOGIN PLAIN`.
        let (keyword, inline) = match first.split_once('=') {
            Some((k, v)) => (k.to_ascii_uppercase(), Some(v)),
            None => (first.to_ascii_uppercase(), None),
        };
        if keyword.is_empty()
            || !keyword
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            continue;
        }
        let params: Vec<&str> = inline
            .into_iter()
            .filter(|v| !v.is_empty())
            .chain(words)
            .collect();
        match keyword.as_str() {
            "STARTTLS" => ext.starttls = true,
            "SIZE" => ext.size = Some(params.first().and_then(|v| v.parse().ok()).unwrap_or(0)),
            "PIPELINING" => ext.pipelining = true,
            "8BITMIME" => ext.eightbitmime = true,
            "SMTPUTF8" => ext.smtputf8 = true,
            "AUTH" => {
                for m in params {
                    let m = m.to_ascii_uppercase();
                    if !ext.auth.contains(&m) {
                        ext.auth.push(m);
                    }
                }
            }
            _ => {}
        }
        if !ext.keywords.contains(&keyword) {
            ext.keywords.push(keyword);
        }
    }
    ext
}

impl Extensions {
    fn record(&self, obs: &mut Observation, prefix: &str) {
        obs.fact(
            &facts::smtp::under(prefix, "extensions"),
            self.keywords.join(" "),
        );
        obs.fact(&facts::smtp::under(prefix, "starttls"), self.starttls);
        if let Some(size) = self.size {
            obs.fact(
                &facts::smtp::under(prefix, "size"),
                i64::try_from(size).unwrap_or(i64::MAX),
            );
        }
        obs.fact(&facts::smtp::under(prefix, "pipelining"), self.pipelining);
        obs.fact(&facts::smtp::under(prefix, "8bitmime"), self.eightbitmime);
        obs.fact(&facts::smtp::under(prefix, "smtputf8"), self.smtputf8);
        obs.fact(&facts::smtp::under(prefix, "auth"), self.auth.join(" "));
    }
}

/// An SMTP session ready for `MAIL FROM`: greeting read, EHLO answered, TLS up where offered.
pub(crate) struct Session {
    pub d: Dialogue,
    /// True when the session runs over TLS (implicit or after STARTTLS).
    pub tls: bool,
    /// The extensions of the last EHLO (the one after TLS when TLS is up).
    pub ext: Extensions,
}

/// Runs the SMTP dialogue against one address.
pub(crate) async fn probe(t: &Target<'_>, obs: &mut Observation) {
    let Some(Session { mut d, .. }) = open(t, obs).await else {
        return;
    };
    if let Some(rcpt) = t.spec.options.rcpt_to.as_deref() {
        let from = t.spec.options.mail_from.as_deref().unwrap_or("");
        let steps = [
            (
                Phase::Mail,
                format!("MAIL FROM:<{from}>"),
                facts::smtp::MAIL,
            ),
            (Phase::Rcpt, format!("RCPT TO:<{rcpt}>"), facts::smtp::RCPT),
        ];
        for (phase, cmd, key) in steps {
            let r = match d
                .command(obs, phase, &cmd, t.phase_deadline(REPLY_TIMEOUT))
                .await
            {
                Ok(r) => r,
                Err(e) => return e.record(obs, phase),
            };
            obs.fact(&facts::smtp::step(key, facts::smtp::field::CODE), r.code);
            if let Some(enhanced) = r.enhanced() {
                obs.fact(
                    &facts::smtp::step(key, facts::smtp::field::ENHANCED),
                    enhanced,
                );
            }
            obs.fact(
                &facts::smtp::step(key, facts::smtp::field::TEXT),
                truncate(&r.text(), 256),
            );
            if !r.expect(250, obs, phase) {
                return finish(d, t, obs, &r).await;
            }
        }
    }
    quit(d, t, obs).await;
}

/// Connect → (TLS) → greeting → EHLO → STARTTLS → TLS → EHLO, each phase timed and its facts
/// recorded on `obs`. `None` when the dialogue ended early (the reason is recorded on `obs`).
pub(crate) async fn open(t: &Target<'_>, obs: &mut Observation) -> Option<Session> {
    let stream = tcp::connect(obs, t.addr, t.phase_deadline(CONNECT_TIMEOUT)).await?;
    let implicit = t.spec.check == CheckKind::Smtps;
    obs.fact(facts::tls::IMPLICIT, implicit);
    let mut io: Box<dyn Io> = Box::new(stream);
    if implicit {
        io = tls::handshake(io, t, obs).await?;
    }
    let mut d = Dialogue::new(io, Bounds::default());

    // Never send a byte before the complete greeting (postscreen punishes early talkers).
    let started = Instant::now();
    let banner = d.read_reply(t.phase_deadline(REPLY_TIMEOUT)).await;
    obs.timing(Phase::Banner, started.elapsed());
    let banner = match banner {
        Ok(r) => r,
        Err(e) => {
            e.record(obs, Phase::Banner);
            return None;
        }
    };
    obs.fact(facts::smtp::BANNER, truncate(&banner.text(), 512));
    obs.fact(facts::smtp::BANNER_CODE, banner.code);
    if !banner.expect(220, obs, Phase::Banner) {
        finish(d, t, obs, &banner).await;
        return None;
    }

    let ehlo_cmd = format!("EHLO {}", t.ctx.helo_name);
    let ehlo = match d
        .command(obs, Phase::Ehlo, &ehlo_cmd, t.phase_deadline(REPLY_TIMEOUT))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            e.record(obs, Phase::Ehlo);
            return None;
        }
    };
    if !ehlo.expect(250, obs, Phase::Ehlo) {
        finish(d, t, obs, &ehlo).await;
        return None;
    }
    let ext = parse_ehlo(&ehlo.lines);
    ext.record(obs, facts::smtp::PREFIX);
    let submission = t.spec.check == CheckKind::Submission;

    if implicit {
        obs.fact(facts::smtp::AUTH_AFTER_TLS, !ext.auth.is_empty());
        return Some(Session { d, tls: true, ext });
    }
    if submission {
        let before = !ext.auth.is_empty();
        obs.fact(facts::smtp::AUTH_BEFORE_TLS, before);
        if before {
            obs.problem(
                Outcome::Warn,
                ErrorClass::Policy,
                Phase::Ehlo,
                "AUTH is offered before TLS: passwords may cross the network in clear",
            );
        }
    }
    if !ext.starttls {
        starttls_missing(obs, t, Phase::Ehlo, "STARTTLS");
        return Some(Session { d, tls: false, ext });
    }
    let r = match d
        .command(
            obs,
            Phase::Starttls,
            "STARTTLS",
            t.phase_deadline(REPLY_TIMEOUT),
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            e.record(obs, Phase::Starttls);
            return None;
        }
    };
    if !r.expect(220, obs, Phase::Starttls) {
        finish(d, t, obs, &r).await;
        return None;
    }
    let mut d = d.upgrade_tls(t, obs).await?;
    // EHLO again: the server forgets everything it learned before TLS (RFC 3207 §4.2).
    let started = Instant::now();
    let again = async {
        d.send(&ehlo_cmd, t.phase_deadline(REPLY_TIMEOUT)).await?;
        d.read_reply(t.phase_deadline(REPLY_TIMEOUT)).await
    }
    .await;
    obs.fact(
        &facts::smtp::under(facts::smtp::TLS_PREFIX, "ehlo_us"),
        super::fact_us(started.elapsed()),
    );
    let again = match again {
        Ok(r) => r,
        Err(e) => {
            e.record(obs, Phase::Ehlo);
            return None;
        }
    };
    if !again.expect(250, obs, Phase::Ehlo) {
        finish(d, t, obs, &again).await;
        return None;
    }
    let ext = parse_ehlo(&again.lines);
    obs.fact(facts::smtp::TLS_EXTENSIONS, ext.keywords.join(" "));
    obs.fact(
        &facts::smtp::under(facts::smtp::TLS_PREFIX, "auth"),
        ext.auth.join(" "),
    );
    if submission {
        obs.fact(facts::smtp::AUTH_AFTER_TLS, !ext.auth.is_empty());
    }
    Some(Session { d, tls: true, ext })
}

/// Ends after a negative reply: a `421` means the server is closing, so just close; else QUIT.
pub(crate) async fn finish(d: Dialogue, t: &Target<'_>, obs: &mut Observation, last: &Reply) {
    if last.code == 421 {
        d.close(t.phase_deadline(REPLY_TIMEOUT)).await;
    } else {
        quit(d, t, obs).await;
    }
}

/// Sends QUIT and reads the 221 (a server that just closes is fine too).
pub(crate) async fn quit(mut d: Dialogue, t: &Target<'_>, obs: &mut Observation) {
    match d
        .command(obs, Phase::Quit, "QUIT", t.phase_deadline(REPLY_TIMEOUT))
        .await
    {
        Ok(r) if r.code == 221 => {}
        Ok(r) => {
            obs.fact(facts::smtp::QUIT_CODE, r.code);
        }
        Err(DialogueError::Closed) => {}
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

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ehlo_extensions_parse() {
        let ext = parse_ehlo(&lines(&[
            "mx.example.test Hello",
            "PIPELINING",
            "SIZE 10240000",
            "starttls",
            "AUTH PLAIN LOGIN",
            "AUTH=LOGIN",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]));
        assert!(ext.starttls && ext.pipelining && ext.eightbitmime && ext.smtputf8);
        assert_eq!(ext.size, Some(10_240_000));
        assert_eq!(ext.auth, vec!["PLAIN", "LOGIN"]);
        assert_eq!(
            ext.keywords,
            vec![
                "PIPELINING",
                "SIZE",
                "STARTTLS",
                "AUTH",
                "8BITMIME",
                "SMTPUTF8",
                "ENHANCEDSTATUSCODES"
            ]
        );
        let bare = parse_ehlo(&lines(&["mx hello", "SIZE"]));
        assert_eq!(bare.size, Some(0));
        assert!(!bare.starttls);
        // The greeting line is never a keyword.
        assert!(parse_ehlo(&lines(&["STARTTLS"])).keywords.is_empty());
    }

    proptest! {
        #[test]
        fn ehlo_parser_never_panics(ls in prop::collection::vec(".{0,60}", 0..10)) {
            let ext = parse_ehlo(&ls);
            prop_assert!(ext.keywords.len() < ls.len().max(1));
        }

        #[test]
        fn ehlo_keywords_round_trip(kws in prop::collection::btree_set("[A-Z][A-Z0-9-]{0,10}", 0..8), mechs in prop::collection::vec("[A-Z0-9-]{1,10}", 0..4)) {
            let mut ls = vec!["mx.example.test hi".to_string()];
            ls.extend(kws.iter().cloned());
            if !mechs.is_empty() {
                ls.push(format!("AUTH {}", mechs.join(" ")));
            }
            let ext = parse_ehlo(&ls);
            for k in &kws {
                prop_assert!(ext.keywords.contains(k));
            }
            prop_assert_eq!(ext.starttls, kws.contains("STARTTLS"));
            for m in &mechs {
                prop_assert!(ext.auth.contains(m));
            }
        }
    }
}
