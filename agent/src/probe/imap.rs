//! IMAP probes: `imap` (143: greeting → CAPABILITY → STARTTLS → TLS → CAPABILITY → LOGOUT) and
//! `imaps` (993: TLS first). Never logs in; reports capabilities before and after TLS.

use mxscope_proto::{facts, CheckKind, ErrorClass, Observation, Outcome, Phase};
use tokio::time::Instant;

use super::dialogue::{
    open_with_greeting, starttls_missing, truncate, Dialogue, DialogueError, REPLY_TIMEOUT,
};
use super::Target;

/// IMAP capabilities a probe reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Capabilities {
    /// Every capability atom, upper case, in the server's order.
    pub atoms: Vec<String>,
}

impl Capabilities {
    pub(crate) fn has(&self, atom: &str) -> bool {
        self.atoms.iter().any(|a| a == atom)
    }

    /// `AUTH=` mechanisms.
    pub(crate) fn auth(&self) -> Vec<&str> {
        self.atoms
            .iter()
            .filter_map(|a| a.strip_prefix("AUTH="))
            .collect()
    }

    fn record(&self, obs: &mut Observation, prefix: &str) {
        obs.fact(
            &facts::imap::under(prefix, "capabilities"),
            truncate(&self.atoms.join(" "), 1024),
        );
        obs.fact(
            &facts::imap::under(prefix, "imap4rev1"),
            self.has("IMAP4REV1"),
        );
        obs.fact(
            &facts::imap::under(prefix, "imap4rev2"),
            self.has("IMAP4REV2"),
        );
        obs.fact(
            &facts::imap::under(prefix, "starttls"),
            self.has("STARTTLS"),
        );
        obs.fact(
            &facts::imap::under(prefix, "logindisabled"),
            self.has("LOGINDISABLED"),
        );
        obs.fact(&facts::imap::under(prefix, "auth"), self.auth().join(" "));
    }
}

/// Parses the atoms after `CAPABILITY` in `* CAPABILITY ...` or a `[CAPABILITY ...]` response code;
/// `None` when the line carries no capability list.
pub(crate) fn parse_capability_line(line: &str) -> Option<Capabilities> {
    let rest = line.strip_prefix("* ")?;
    let list = if let Some(after) = strip_prefix_ci(rest, "CAPABILITY") {
        after
    } else {
        // `* OK [CAPABILITY IMAP4rev1 ...] ready`
        let open = rest.find('[')?;
        let code = &rest[open + 1..];
        let code = &code[..code.find(']')?];
        strip_prefix_ci(code, "CAPABILITY")?
    };
    if !(list.is_empty() || list.starts_with(' ')) {
        return None;
    }
    let mut atoms: Vec<String> = Vec::new();
    for atom in list.split_ascii_whitespace() {
        let atom = atom.to_ascii_uppercase();
        if !atoms.contains(&atom) {
            atoms.push(atom);
        }
    }
    Some(Capabilities { atoms })
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// The status word of a tagged or untagged response line (`OK`, `NO`, `BAD`, `BYE`, `PREAUTH`).
pub(crate) fn status_of<'a>(line: &'a str, tag: &str) -> Option<&'a str> {
    line.strip_prefix(tag)?
        .strip_prefix(' ')?
        .split_ascii_whitespace()
        .next()
}

/// Records a non-OK status as a failure in `phase`; returns true for OK.
pub(crate) fn check_status(
    obs: &mut Observation,
    phase: Phase,
    line: &str,
    status: Option<&str>,
) -> bool {
    let status = status.map(str::to_ascii_uppercase);
    let class = match status.as_deref() {
        Some("OK") => return true,
        Some("BYE") => ErrorClass::Reply4xx,
        Some("NO") => ErrorClass::Reply5xx,
        _ => ErrorClass::Protocol,
    };
    obs.problem(
        Outcome::Fail,
        class,
        phase,
        format!("{phase}: {}", truncate(line, 200)),
    );
    false
}

/// Sends a tagged command and returns every line up to and including its tagged completion.
pub(crate) async fn tagged_lines(
    d: &mut Dialogue,
    obs: &mut Observation,
    tag: &str,
    cmd: &str,
    deadline: Instant,
) -> Result<Vec<String>, DialogueError> {
    let prefix = format!("{tag} ");
    let line = format!("{tag} {cmd}");
    d.exchange(obs, None, Some(&line), deadline, |l| {
        Ok(l.starts_with(&prefix))
    })
    .await
}

/// Quotes `s` as an IMAP quoted string (RFC 3501 §4.3); `None` when it holds CR, LF or NUL,
/// which only a literal can carry.
pub(crate) fn quoted(s: &str) -> Option<String> {
    if s.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return None;
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Some(out)
}

/// Sends a tagged command and reads to its tagged completion; collects any capability lists.
pub(crate) async fn tagged(
    d: &mut Dialogue,
    obs: &mut Observation,
    phase: Option<Phase>,
    tag: &str,
    cmd: &str,
    deadline: Instant,
) -> Result<(String, Option<Capabilities>), DialogueError> {
    let prefix = format!("{tag} ");
    let line = format!("{tag} {cmd}");
    let lines = d
        .exchange(obs, phase, Some(&line), deadline, |l| {
            Ok(l.starts_with(&prefix))
        })
        .await?;
    let caps = lines.iter().find_map(|l| parse_capability_line(l));
    let last = lines.last().cloned().unwrap_or_default();
    Ok((last, caps))
}

/// Runs the IMAP dialogue against one address.
pub(crate) async fn probe(t: &Target<'_>, obs: &mut Observation) {
    let implicit = t.spec.check == CheckKind::Imaps;
    let Some((mut d, greeting)) = open_with_greeting(t, obs, implicit).await else {
        return;
    };
    obs.fact(facts::imap::GREETING, truncate(&greeting, 512));
    let status = status_of(&greeting, "*").map(str::to_ascii_uppercase);
    match status.as_deref() {
        Some("OK") => {}
        Some("PREAUTH") => {
            obs.fact(facts::imap::PREAUTH, true);
        }
        _ => {
            check_status(obs, Phase::Greeting, &greeting, status.as_deref());
            return d.close(t.phase_deadline(REPLY_TIMEOUT)).await;
        }
    }

    let caps = match tagged(
        &mut d,
        obs,
        Some(Phase::Capability),
        "a1",
        "CAPABILITY",
        t.phase_deadline(REPLY_TIMEOUT),
    )
    .await
    {
        Ok((last, caps)) => {
            if !check_status(obs, Phase::Capability, &last, status_of(&last, "a1")) {
                return logout(d, t, obs).await;
            }
            caps.unwrap_or_default()
        }
        Err(e) => return e.record(obs, Phase::Capability),
    };
    caps.record(obs, facts::imap::PREFIX);

    if !implicit {
        if !caps.has("STARTTLS") {
            starttls_missing(obs, t, Phase::Capability, "STARTTLS");
            return logout(d, t, obs).await;
        }
        match tagged(
            &mut d,
            obs,
            Some(Phase::Starttls),
            "a2",
            "STARTTLS",
            t.phase_deadline(REPLY_TIMEOUT),
        )
        .await
        {
            Ok((last, _)) => {
                if !check_status(obs, Phase::Starttls, &last, status_of(&last, "a2")) {
                    return logout(d, t, obs).await;
                }
            }
            Err(e) => return e.record(obs, Phase::Starttls),
        }
        d = match d.upgrade_tls(t, obs).await {
            Some(d) => d,
            None => return,
        };
        let started = Instant::now();
        let after = tagged(
            &mut d,
            obs,
            None,
            "a3",
            "CAPABILITY",
            t.phase_deadline(REPLY_TIMEOUT),
        )
        .await;
        obs.fact(
            &facts::imap::under(facts::imap::TLS_PREFIX, "capability_us"),
            super::fact_us(started.elapsed()),
        );
        match after {
            Ok((last, caps)) => {
                if !check_status(obs, Phase::Capability, &last, status_of(&last, "a3")) {
                    return logout(d, t, obs).await;
                }
                let caps = caps.unwrap_or_default();
                obs.fact(
                    &facts::imap::under(facts::imap::TLS_PREFIX, "capabilities"),
                    truncate(&caps.atoms.join(" "), 1024),
                );
                obs.fact(
                    &facts::imap::under(facts::imap::TLS_PREFIX, "auth"),
                    caps.auth().join(" "),
                );
                obs.fact(
                    &facts::imap::under(facts::imap::TLS_PREFIX, "logindisabled"),
                    caps.has("LOGINDISABLED"),
                );
            }
            Err(e) => return e.record(obs, Phase::Capability),
        }
    }
    logout(d, t, obs).await;
}

/// Sends LOGOUT and reads to its completion (a server that just closes is fine).
async fn logout(mut d: Dialogue, t: &Target<'_>, obs: &mut Observation) {
    match tagged(
        &mut d,
        obs,
        Some(Phase::Quit),
        "a9",
        "LOGOUT",
        t.phase_deadline(REPLY_TIMEOUT),
    )
    .await
    {
        Ok(_) | Err(DialogueError::Closed) => {}
        Err(e) => {
            obs.problem(
                Outcome::Warn,
                e.class(),
                Phase::Quit,
                format!("logout: {e}"),
            );
        }
    }
    d.close(t.phase_deadline(REPLY_TIMEOUT)).await;
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn capability_lines_parse() {
        let c = parse_capability_line("* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN")
            .unwrap();
        assert!(c.has("IMAP4REV1") && c.has("STARTTLS") && c.has("LOGINDISABLED"));
        assert_eq!(c.auth(), vec!["PLAIN"]);
        let c =
            parse_capability_line("* OK [CAPABILITY IMAP4rev2 SASL-IR] Dovecot ready.").unwrap();
        assert_eq!(c.atoms, vec!["IMAP4REV2", "SASL-IR"]);
        assert!(parse_capability_line("* OK Dovecot ready.").is_none());
        assert!(parse_capability_line("a1 OK done").is_none());
        assert!(parse_capability_line("* CAPABILITYX").is_none());
        assert_eq!(status_of("a1 OK done", "a1"), Some("OK"));
        assert_eq!(status_of("* BYE too many", "*"), Some("BYE"));
        assert_eq!(status_of("a10 OK", "a1"), None);
        assert_eq!(quoted(r#"pa"ss\w"#).as_deref(), Some(r#""pa\"ss\\w""#));
        assert_eq!(quoted("a\r\nb"), None);
    }

    proptest! {
        #[test]
        fn capability_parser_never_panics(line in ".{0,120}") {
            let _ = parse_capability_line(&line);
            let _ = status_of(&line, "a1");
        }

        #[test]
        fn capability_round_trips(atoms in prop::collection::btree_set("[A-Z][A-Z0-9=+-]{0,12}", 0..10)) {
            let line = format!("* CAPABILITY {}", atoms.iter().cloned().collect::<Vec<_>>().join(" "));
            let caps = parse_capability_line(&line).unwrap();
            prop_assert_eq!(caps.atoms.len(), atoms.len());
            for a in &atoms {
                prop_assert!(caps.has(a));
            }
        }
    }
}
