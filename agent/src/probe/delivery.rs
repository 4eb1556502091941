//! The `delivery` check: submits a uniquely tagged message (STARTTLS, AUTH with an agent-local
//! login), polls the mailbox over IMAPS until it arrives, reports the end-to-end time, deletes it.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use mxscope_proto::{
    facts, CheckKind, Endpoint, ErrorClass, FactValue, Observation, Outcome, Phase,
};
use tokio::time::Instant;

use super::dialogue::{truncate, Bounds, Dialogue, DialogueError, Reply, REPLY_TIMEOUT};
use super::endpoints::expand;
use super::imap::{check_status, quoted, status_of, tagged_lines};
use super::smtp::{self, Session};
use super::{observe, tcp, tls, CheckSpec, ProbeContext, Target, CONNECT_TIMEOUT};
use crate::credentials::Credential;

/// Pause between two mailbox searches.
const POLL: Duration = Duration::from_millis(500);
/// The most time kept back from the deadline for deleting the message and logging out.
const CLEANUP: Duration = Duration::from_secs(2);
/// The header carrying the probe's tag (searched for over IMAP).
pub(crate) const TAG_HEADER: &str = "X-Mxscope-Probe";

/// Runs the `delivery` check; one observation.
pub(crate) async fn check(
    spec: &CheckSpec,
    ctx: &ProbeContext,
    start_us: i64,
    deadline: Instant,
) -> Observation {
    observe(spec, CheckKind::Delivery, start_us, deadline, async |obs| {
        run(spec, ctx, start_us, deadline, obs).await
    })
    .await
}

async fn run(
    spec: &CheckSpec,
    ctx: &ProbeContext,
    start_us: i64,
    deadline: Instant,
    obs: &mut Observation,
) {
    let Some(name) = spec.options.credentials.as_deref() else {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Auth,
            "delivery needs a login: set credentials = \"name\" on the target and pass --credentials",
        );
        return;
    };
    let Some(login) = ctx.credentials.get(name) else {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Auth,
            format!("no login named '{name}' in the agent's credentials file"),
        );
        return;
    };
    obs.fact(facts::delivery::CREDENTIALS, name);
    let from = spec.options.mail_from.as_deref().unwrap_or(&login.user);
    let rcpt = spec.options.rcpt_to.as_deref().unwrap_or(&login.user);

    let expansion = expand(
        ctx.resolver.as_ref(),
        &spec.target,
        spec.kind,
        ctx.fanout,
        deadline,
    )
    .await;
    obs.timing(Phase::Resolve, expansion.took);
    let Some(server) = expansion.addrs.first() else {
        let (class, message) = expansion.failures.first().map_or_else(
            || {
                (
                    ErrorClass::DnsNodata,
                    format!("{} has no address", spec.target),
                )
            },
            |f| (f.class, f.message.clone()),
        );
        obs.problem(Outcome::Fail, class, Phase::Resolve, message);
        return;
    };

    let tag = new_tag(start_us);
    obs.fact(facts::delivery::TAG, tag.as_str());
    let message = compose(&tag, from, rcpt, &ctx.helo_name, start_us);

    let submission = spec.for_service(CheckKind::Submission);
    let submit_addr = SocketAddr::new(server.ip, spec.service_port(CheckKind::Submission));
    obs.endpoint = Endpoint {
        host: server.host.clone(),
        ip: Some(server.ip),
        port: submit_addr.port(),
    };
    let submit_target = Target {
        spec: &submission,
        ctx,
        host: &server.host,
        addr: submit_addr,
        deadline,
        peer_chain: None,
    };
    let sent_at = Instant::now();
    let mut last_reply = String::new();
    let accepted = {
        let Some(_permit) = permit(&submit_target, obs).await else {
            return;
        };
        submit(
            &submit_target,
            login,
            (from, rcpt),
            &message,
            obs,
            &mut last_reply,
        )
        .await
    };
    if !last_reply.is_empty() {
        obs.fact(facts::delivery::LAST_SMTP_REPLY, last_reply.as_str());
    }
    if !accepted {
        return;
    }

    let imaps = spec.for_service(CheckKind::Imaps);
    let imap_target = Target {
        spec: &imaps,
        ctx,
        host: &server.host,
        addr: SocketAddr::new(server.ip, spec.service_port(CheckKind::Imaps)),
        deadline,
        peer_chain: None,
    };
    obs.fact(facts::delivery::IMAPS_PORT, imap_target.addr.port());
    let cleanup = CLEANUP.min(spec.timeout / 5);
    let poll_until = deadline.checked_sub(cleanup).unwrap_or(deadline);
    let mut imap_obs = Observation::new(
        &spec.target,
        Endpoint::host(&spec.target),
        CheckKind::Imaps,
        start_us,
    );
    let found = {
        let Some(_permit) = permit(&imap_target, obs).await else {
            return;
        };
        mailbox(
            &imap_target,
            login,
            &tag,
            sent_at,
            poll_until,
            &mut imap_obs,
        )
        .await
    };
    merge_imap(obs, &imap_obs);
    match found {
        Found::Yes(took) => {
            obs.timing(Phase::Delivery, took);
        }
        Found::No(waited) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::Timeout,
                Phase::Delivery,
                format!(
                    "message {tag} did not arrive within {:.1}s; last SMTP reply: {}",
                    waited.as_secs_f64(),
                    if last_reply.is_empty() {
                        "none"
                    } else {
                        &last_reply
                    }
                ),
            );
        }
        Found::Unknown => {}
    }
}

/// Waits for a free connection slot to the server (the per-host limit).
async fn permit(
    t: &Target<'_>,
    obs: &mut Observation,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let key = t.addr.ip().to_string();
    match tokio::time::timeout_at(t.deadline, t.ctx.host_limits.acquire(&key)).await {
        Ok(p) => Some(p),
        Err(_) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::Timeout,
                Phase::Connect,
                "no free connection slot for this host before the deadline",
            );
            None
        }
    }
}

/// A tag no other probe run uses: the start time and 64 random bits.
fn new_tag(start_us: i64) -> String {
    format!("mxscope-{start_us:x}-{:016x}", rand::random::<u64>())
}

/// The test message, CRLF line ends, nothing to dot-stuff.
fn compose(tag: &str, from: &str, rcpt: &str, helo: &str, start_us: i64) -> String {
    let date = rfc5322_date(start_us.div_euclid(1_000_000));
    [
        format!("From: <{from}>"),
        format!("To: <{rcpt}>"),
        format!("Subject: mxscope delivery probe {tag}"),
        format!("Date: {date}"),
        format!("Message-ID: <{tag}@{helo}>"),
        format!("{TAG_HEADER}: {tag}"),
        "MIME-Version: 1.0".to_string(),
        "Content-Type: text/plain; charset=us-ascii".to_string(),
        String::new(),
        "Sent by the mxscope delivery probe; it deletes this message once it arrives.".to_string(),
    ]
    .join("\r\n")
}

/// `Thu, 01 Jan 1970 00:00:00 +0000` from Unix seconds.
fn rfc5322_date(unix: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // `YYYY-MM-DDTHH:MM:SSZ`
    let iso = tls::rfc3339(unix);
    let weekday = DAYS[usize::try_from(unix.div_euclid(86_400).rem_euclid(7)).unwrap_or(0)];
    let month = iso
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)))
        .copied()
        .unwrap_or("Jan");
    format!(
        "{weekday}, {} {month} {} {} +0000",
        iso.get(8..10).unwrap_or("01"),
        iso.get(0..4).unwrap_or("1970"),
        iso.get(11..19).unwrap_or("00:00:00")
    )
}

/// `250 2.0.0 Ok: queued as X`: the code and the first line, for messages and facts.
fn summary(r: &Reply) -> String {
    format!(
        "{} {}",
        r.code,
        truncate(r.lines.first().map_or("", String::as_str), 200)
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mechanism {
    Plain,
    Login,
}

/// Submission: the shared SMTP session (TLS required), AUTH, MAIL, RCPT, DATA, QUIT. True when
/// the server accepted the message; `last` holds the last reply seen either way.
async fn submit(
    t: &Target<'_>,
    login: &Credential,
    (from, rcpt): (&str, &str),
    message: &str,
    obs: &mut Observation,
    last: &mut String,
) -> bool {
    let Some(Session { mut d, tls, ext }) = smtp::open(t, obs).await else {
        return false;
    };
    if !tls {
        obs.problem(
            Outcome::Fail,
            ErrorClass::NoStarttls,
            Phase::Auth,
            "submission server offers no TLS: the probe never sends a password in clear",
        );
        smtp::quit(d, t, obs).await;
        return false;
    }
    if !tls::peer_authenticated(obs) {
        tls::withhold_credentials(obs, "submission");
        smtp::quit(d, t, obs).await;
        return false;
    }
    let mechanism = if ext.auth.iter().any(|m| m == "PLAIN") {
        Mechanism::Plain
    } else if ext.auth.iter().any(|m| m == "LOGIN") {
        Mechanism::Login
    } else {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Auth,
            format!(
                "submission server offers neither AUTH PLAIN nor LOGIN after TLS (offers: {})",
                if ext.auth.is_empty() {
                    "none".to_string()
                } else {
                    ext.auth.join(" ")
                }
            ),
        );
        smtp::quit(d, t, obs).await;
        return false;
    };
    obs.fact(
        facts::delivery::AUTH_MECHANISM,
        match mechanism {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        },
    );
    let started = Instant::now();
    let r = authenticate(&mut d, mechanism, login, t.phase_deadline(REPLY_TIMEOUT)).await;
    obs.timing(Phase::Auth, started.elapsed());
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            e.record(obs, Phase::Auth);
            return false;
        }
    };
    *last = summary(&r);
    if !r.expect(235, obs, Phase::Auth) {
        smtp::finish(d, t, obs, &r).await;
        return false;
    }

    let started = Instant::now();
    let steps = [
        (Phase::Mail, format!("MAIL FROM:<{from}>")),
        (Phase::Rcpt, format!("RCPT TO:<{rcpt}>")),
    ];
    for (phase, cmd) in steps {
        let r = match d
            .command(obs, phase, &cmd, t.phase_deadline(REPLY_TIMEOUT))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                e.record(obs, phase);
                return false;
            }
        };
        *last = summary(&r);
        if !r.expect(250, obs, phase) {
            smtp::finish(d, t, obs, &r).await;
            return false;
        }
    }
    // DATA and the message: a refusal here is the message not being delivered.
    for (line, expected) in [("DATA", 354), (&format!("{message}\r\n.")[..], 250)] {
        let r = async {
            d.send(line, t.phase_deadline(REPLY_TIMEOUT)).await?;
            d.read_reply(t.phase_deadline(REPLY_TIMEOUT)).await
        }
        .await;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                e.record(obs, Phase::Delivery);
                return false;
            }
        };
        *last = summary(&r);
        if !r.expect(expected, obs, Phase::Delivery) {
            smtp::finish(d, t, obs, &r).await;
            return false;
        }
    }
    obs.fact(
        facts::delivery::SUBMIT_US,
        super::fact_us(started.elapsed()),
    );
    smtp::quit(d, t, obs).await;
    true
}

/// AUTH PLAIN (RFC 4616) or LOGIN; returns the server's final reply. The password goes into the
/// command only, never into a message or fact.
async fn authenticate(
    d: &mut Dialogue,
    mechanism: Mechanism,
    login: &Credential,
    deadline: Instant,
) -> Result<Reply, DialogueError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    match mechanism {
        Mechanism::Plain => {
            let token = b64.encode(format!("\0{}\0{}", login.user, login.password.expose()));
            d.send(&format!("AUTH PLAIN {token}"), deadline).await?;
            d.read_reply(deadline).await
        }
        Mechanism::Login => {
            d.send("AUTH LOGIN", deadline).await?;
            let r = d.read_reply(deadline).await?;
            if r.code != 334 {
                return Ok(r);
            }
            d.send(&b64.encode(&login.user), deadline).await?;
            let r = d.read_reply(deadline).await?;
            if r.code != 334 {
                return Ok(r);
            }
            d.send(&b64.encode(login.password.expose()), deadline)
                .await?;
            d.read_reply(deadline).await
        }
    }
}

/// What the mailbox search found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// The message arrived this long after submission started.
    Yes(Duration),
    /// Not there when polling had to stop (after this long).
    No(Duration),
    /// The mailbox could not be searched (recorded on the IMAP observation).
    Unknown,
}

/// Bounds of the polling IMAP session: many small responses over one connection.
const IMAP_BOUNDS: Bounds = Bounds {
    max_line: 4096,
    max_lines: 1024,
    max_bytes: 4 * 1024 * 1024,
};

/// IMAPS: TLS, LOGIN, SELECT INBOX, then NOOP + UID SEARCH for the tag until it shows up or
/// `poll_until` passes; a found message is flagged `\Deleted` and expunged. Everything about the
/// IMAP connection is recorded on `obs` (a scratch observation merged by the caller).
async fn mailbox(
    t: &Target<'_>,
    login: &Credential,
    tag: &str,
    sent_at: Instant,
    poll_until: Instant,
    obs: &mut Observation,
) -> Found {
    let Some(stream) = tcp::connect(obs, t.addr, t.phase_deadline(CONNECT_TIMEOUT)).await else {
        return Found::Unknown;
    };
    let Some(io) = tls::handshake(Box::new(stream), t, obs).await else {
        return Found::Unknown;
    };
    let mut d = Dialogue::new(io, IMAP_BOUNDS);
    if !tls::peer_authenticated(obs) {
        tls::withhold_credentials(obs, "IMAPS");
        d.close(t.phase_deadline(REPLY_TIMEOUT)).await;
        return Found::Unknown;
    }
    let greeting = d
        .exchange(
            obs,
            Some(Phase::Greeting),
            None,
            t.phase_deadline(REPLY_TIMEOUT),
            |_| Ok(true),
        )
        .await;
    match greeting {
        Ok(lines) => {
            let line = lines.into_iter().next().unwrap_or_default();
            if !check_status(obs, Phase::Greeting, &line, status_of(&line, "*")) {
                d.close(t.phase_deadline(REPLY_TIMEOUT)).await;
                return Found::Unknown;
            }
        }
        Err(e) => {
            e.record(obs, Phase::Greeting);
            return Found::Unknown;
        }
    }
    let mut session = Imap { d, next: 0 };

    let (Some(user), Some(password)) = (quoted(&login.user), quoted(login.password.expose()))
    else {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Auth,
            "the login's user or password contains a line break, which IMAP LOGIN cannot carry",
        );
        session.logout(t, obs).await;
        return Found::Unknown;
    };
    let started = Instant::now();
    let ok = session
        .ok(t, obs, Phase::Auth, &format!("LOGIN {user} {password}"))
        .await;
    obs.fact("login_us", super::fact_us(started.elapsed()));
    if ok.is_none() {
        session.logout(t, obs).await;
        return Found::Unknown;
    }
    if session
        .ok(t, obs, Phase::Delivery, "SELECT INBOX")
        .await
        .is_none()
    {
        session.logout(t, obs).await;
        return Found::Unknown;
    }

    let search = format!(
        "UID SEARCH HEADER {TAG_HEADER} {}",
        quoted(tag).unwrap_or_default()
    );
    let mut polls = 0u32;
    let found = loop {
        polls += 1;
        // NOOP lets the server announce mail that arrived since the last command.
        if session.ok(t, obs, Phase::Delivery, "NOOP").await.is_none() {
            session.logout(t, obs).await;
            return Found::Unknown;
        }
        let Some(lines) = session.ok(t, obs, Phase::Delivery, &search).await else {
            session.logout(t, obs).await;
            return Found::Unknown;
        };
        let uids = search_results(&lines);
        if !uids.is_empty() {
            break Some((uids, sent_at.elapsed()));
        }
        let next = Instant::now() + POLL;
        if next >= poll_until {
            break None;
        }
        tokio::time::sleep_until(next).await;
    };
    obs.fact("polls", polls);
    let Some((uids, took)) = found else {
        session.logout(t, obs).await;
        return Found::No(sent_at.elapsed());
    };
    let set = uids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    obs.fact("uid", set.as_str());
    let deleted = session.delete(t, obs, &set, &search).await;
    obs.fact("deleted", deleted);
    session.logout(t, obs).await;
    Found::Yes(took)
}

/// One IMAP session with numbered tags.
struct Imap {
    d: Dialogue,
    next: u32,
}

impl Imap {
    /// Runs `cmd`; `Some(lines)` when it completed `OK`, else `None` with the problem on `obs`
    /// (the command text is never recorded: LOGIN carries the password).
    async fn ok(
        &mut self,
        t: &Target<'_>,
        obs: &mut Observation,
        phase: Phase,
        cmd: &str,
    ) -> Option<Vec<String>> {
        self.next += 1;
        let tag = format!("d{}", self.next);
        match tagged_lines(&mut self.d, obs, &tag, cmd, t.phase_deadline(REPLY_TIMEOUT)).await {
            Ok(lines) => {
                let last = lines.last().cloned().unwrap_or_default();
                check_status(obs, phase, &last, status_of(&last, &tag)).then_some(lines)
            }
            Err(e) => {
                e.record(obs, phase);
                None
            }
        }
    }

    /// Flags the messages `\Deleted`, expunges them (UID EXPUNGE, else EXPUNGE) and searches
    /// again; true when the message is gone.
    async fn delete(
        &mut self,
        t: &Target<'_>,
        obs: &mut Observation,
        set: &str,
        search: &str,
    ) -> bool {
        let store = format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)");
        if self.ok(t, obs, Phase::Delivery, &store).await.is_none() {
            return false;
        }
        let mut scratch = obs.clone();
        let expunged = self
            .ok(
                t,
                &mut scratch,
                Phase::Delivery,
                &format!("UID EXPUNGE {set}"),
            )
            .await
            .is_some();
        if !expunged && self.ok(t, obs, Phase::Delivery, "EXPUNGE").await.is_none() {
            return false;
        }
        self.ok(t, obs, Phase::Delivery, search)
            .await
            .is_some_and(|lines| search_results(&lines).is_empty())
    }

    /// LOGOUT and close; errors here do not change the result.
    async fn logout(mut self, t: &Target<'_>, obs: &mut Observation) {
        let mut scratch = obs.clone();
        let _ = self.ok(t, &mut scratch, Phase::Quit, "LOGOUT").await;
        self.d.close(t.phase_deadline(REPLY_TIMEOUT)).await;
    }
}

/// The numbers of `* SEARCH 3 7` responses.
fn search_results(lines: &[String]) -> Vec<u32> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("* ")?;
            let (word, numbers) = rest.split_once(' ').unwrap_or((rest, ""));
            word.eq_ignore_ascii_case("SEARCH").then_some(numbers)
        })
        .flat_map(|n| n.split_ascii_whitespace().filter_map(|x| x.parse().ok()))
        .collect()
}

/// Copies the IMAP side onto the delivery observation: facts under `imap.` (`login_us` becomes
/// [`facts::imap::LOGIN_US`], `polls`, `uid` and `deleted` likewise), connect and TLS
/// times as facts (the phases belong to submission), and its verdict with an `imaps:` prefix.
fn merge_imap(obs: &mut Observation, imap: &Observation) {
    for (key, value) in &imap.facts {
        obs.fact(&facts::imap::under(facts::imap::PREFIX, key), value.clone());
    }
    for (phase, took) in &imap.timings {
        if matches!(phase, Phase::Connect | Phase::Tls | Phase::Greeting) {
            obs.fact(
                &facts::imap::phase_us(*phase),
                FactValue::Int(super::fact_us(*took)),
            );
        }
    }
    if let (Some(class), Some(phase)) = (imap.error_class, imap.phase) {
        obs.problem(
            imap.outcome,
            class,
            phase,
            format!("imaps: {}", imap.message),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_tags() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        let (a, b) = (new_tag(1), new_tag(1));
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'));
    }

    #[test]
    fn message_carries_the_tag_and_no_bare_dot_lines() {
        let m = compose("mxscope-1-2", "a@x.test", "b@x.test", "probe.test", 0);
        assert!(m.contains("\r\nX-Mxscope-Probe: mxscope-1-2\r\n"), "{m}");
        assert!(m.contains("Subject: mxscope delivery probe mxscope-1-2"));
        assert!(!m.split("\r\n").any(|l| l.starts_with('.')));
        assert!(!m.replace("\r\n", "").contains('\n'));
    }

    #[test]
    fn search_responses_parse() {
        let lines = vec![
            "* 3 EXISTS".to_string(),
            "* SEARCH 4 9".to_string(),
            "* search".to_string(),
            "d3 OK Search completed".to_string(),
        ];
        assert_eq!(search_results(&lines), vec![4, 9]);
        assert!(search_results(&["* SEARCH".to_string()]).is_empty());
    }
}
