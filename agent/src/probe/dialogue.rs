//! The shared line dialogue of SMTP, IMAP and POP3: a bounded line reader over any byte stream
//! (line length, line count, total bytes, phase deadline), the RFC 5321 reply parser and TLS upgrade.

use std::io;

use mxscope_proto::{facts, ErrorClass, Observation, Outcome, Phase, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Longest wait for one complete reply (greeting, EHLO answer, capability list, ...).
pub(crate) const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Any byte stream a dialogue runs over: plain TCP, TLS, or a test pipe.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What a dialogue accepts from a server before it gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// Longest line, without its line ending.
    pub max_line: usize,
    /// Most lines in one reply (multiline SMTP, IMAP untagged, POP3 CAPA).
    pub max_lines: usize,
    /// Most bytes read over the whole connection (plain or TLS part).
    pub max_bytes: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_line: 4096,
            max_lines: 256,
            max_bytes: 256 * 1024,
        }
    }
}

/// Why a dialogue step failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialogueError {
    #[error("no complete answer before the deadline")]
    Timeout,
    #[error("server closed the connection")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("reply longer than {0} lines")]
    TooManyLines(usize),
    #[error("server sent more than {0} bytes")]
    TooManyBytes(usize),
    #[error("malformed reply: {0}")]
    Malformed(#[from] ReplyError),
    /// The server sent bytes after its go-ahead, before the TLS handshake.
    #[error("malformed reply: {0} bytes sent before the TLS handshake")]
    DataBeforeTls(usize),
}

impl DialogueError {
    pub(crate) fn class(&self) -> ErrorClass {
        match self {
            DialogueError::Timeout => ErrorClass::Timeout,
            DialogueError::Closed => ErrorClass::Reset,
            DialogueError::Io(e) => super::tcp::classify_io(e),
            DialogueError::LineTooLong(_)
            | DialogueError::TooManyLines(_)
            | DialogueError::TooManyBytes(_)
            | DialogueError::Malformed(_)
            | DialogueError::DataBeforeTls(_) => ErrorClass::Protocol,
        }
    }

    /// Marks `obs` failed in `phase` with this error.
    pub(crate) fn record(&self, obs: &mut Observation, phase: Phase) {
        obs.problem(
            Outcome::Fail,
            self.class(),
            phase,
            format!("{phase}: {self}"),
        );
    }
}

/// A line dialogue over one stream.
pub(crate) struct Dialogue {
    io: Box<dyn Io>,
    /// Bytes read but not yet returned as lines.
    buf: Vec<u8>,
    read_total: usize,
    bounds: Bounds,
}

impl Dialogue {
    pub(crate) fn new(io: Box<dyn Io>, bounds: Bounds) -> Self {
        Dialogue {
            io,
            buf: Vec::new(),
            read_total: 0,
            bounds,
        }
    }

    /// Reads one line (CRLF or bare LF), lossily decoded, without its ending. Every read waits at
    /// most until `deadline`, so a server dribbling bytes still ends there.
    pub(crate) async fn read_line(&mut self, deadline: Instant) -> Result<String, DialogueError> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|b| *b == b'\n') {
                let end = scanned + pos;
                if end > self.bounds.max_line + 1 {
                    return Err(DialogueError::LineTooLong(self.bounds.max_line));
                }
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            scanned = self.buf.len();
            if self.buf.len() > self.bounds.max_line + 1 {
                return Err(DialogueError::LineTooLong(self.bounds.max_line));
            }
            let room = self.bounds.max_bytes.saturating_sub(self.read_total);
            if room == 0 {
                return Err(DialogueError::TooManyBytes(self.bounds.max_bytes));
            }
            let mut chunk = [0u8; 2048];
            let want = room.min(chunk.len());
            let n = match tokio::time::timeout_at(deadline, self.io.read(&mut chunk[..want])).await
            {
                Err(_) => return Err(DialogueError::Timeout),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(0)) => return Err(DialogueError::Closed),
                Ok(Ok(n)) => n,
            };
            self.read_total += n;
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads lines until `last` says a line ends the reply; at most `max_lines`.
    pub(crate) async fn read_lines(
        &mut self,
        deadline: Instant,
        mut last: impl FnMut(&str) -> Result<bool, DialogueError>,
    ) -> Result<Vec<String>, DialogueError> {
        let mut lines = Vec::new();
        loop {
            if lines.len() >= self.bounds.max_lines {
                return Err(DialogueError::TooManyLines(self.bounds.max_lines));
            }
            let line = self.read_line(deadline).await?;
            let done = last(&line)?;
            lines.push(line);
            if done {
                return Ok(lines);
            }
        }
    }

    /// Reads one complete SMTP reply (all lines of a multiline reply).
    pub(crate) async fn read_reply(&mut self, deadline: Instant) -> Result<Reply, DialogueError> {
        let lines = self
            .read_lines(deadline, |line| {
                let (_, last, _) = parse_reply_line(line)?;
                Ok(last)
            })
            .await?;
        Ok(parse_reply(lines.iter().map(String::as_str))?)
    }

    /// Sends one command line (CRLF appended).
    pub(crate) async fn send(
        &mut self,
        line: &str,
        deadline: Instant,
    ) -> Result<(), DialogueError> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        let write = async {
            self.io.write_all(&bytes).await?;
            self.io.flush().await
        };
        match tokio::time::timeout_at(deadline, write).await {
            Err(_) => Err(DialogueError::Timeout),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Sends `line` and reads the SMTP reply, recording the phase's timing.
    pub(crate) async fn command(
        &mut self,
        obs: &mut Observation,
        phase: Phase,
        line: &str,
        deadline: Instant,
    ) -> Result<Reply, DialogueError> {
        let started = Instant::now();
        let result = async {
            self.send(line, deadline).await?;
            self.read_reply(deadline).await
        }
        .await;
        obs.timing(phase, started.elapsed());
        result
    }

    /// Sends `cmd` (if any) and reads lines until `last`, recording the phase's timing when `phase`
    /// is given. The line-protocol counterpart of [`Dialogue::command`] for IMAP and POP3.
    pub(crate) async fn exchange(
        &mut self,
        obs: &mut Observation,
        phase: Option<Phase>,
        cmd: Option<&str>,
        deadline: Instant,
        last: impl FnMut(&str) -> Result<bool, DialogueError>,
    ) -> Result<Vec<String>, DialogueError> {
        let started = Instant::now();
        let result = async {
            if let Some(cmd) = cmd {
                self.send(cmd, deadline).await?;
            }
            self.read_lines(deadline, last).await
        }
        .await;
        if let Some(phase) = phase {
            obs.timing(phase, started.elapsed());
        }
        result
    }

    /// Hands the stream over for a TLS handshake. Bytes the server sent after its go-ahead but before
    /// the handshake would be a command-injection hole (CVE-2011-0411 style): a protocol error.
    pub(crate) fn into_io(self) -> Result<Box<dyn Io>, DialogueError> {
        if !self.buf.is_empty() {
            return Err(DialogueError::DataBeforeTls(self.buf.len()));
        }
        Ok(self.io)
    }

    /// Upgrades to TLS in phase `tls` (recording timing, TLS and certificate facts and verdict on
    /// `obs`); `None` when the handshake failed (already recorded).
    pub(crate) async fn upgrade_tls(
        self,
        target: &super::Target<'_>,
        obs: &mut Observation,
    ) -> Option<Dialogue> {
        let bounds = self.bounds;
        let io = match self.into_io() {
            Ok(io) => io,
            Err(e) => {
                e.record(obs, Phase::Tls);
                return None;
            }
        };
        let tls = super::tls::handshake(io, target, obs).await?;
        Some(Dialogue::new(tls, bounds))
    }

    /// Closes the write side politely; errors do not matter any more.
    pub(crate) async fn close(mut self, deadline: Instant) {
        let _ = tokio::time::timeout_at(deadline, self.io.shutdown()).await;
    }
}

/// One SMTP reply (RFC 5321 §4.2): a code and the text of each line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// The text of all lines joined by newlines.
    pub(crate) fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The RFC 3463 enhanced status code of the first line (`4.7.1`), when present and of the same
    /// class as the reply code.
    pub(crate) fn enhanced(&self) -> Option<String> {
        let first = self.lines.first()?;
        let code = StatusCode::leading(first)?;
        (u16::from(code.class) == self.code / 100).then(|| code.to_string())
    }

    /// Greylisting: `450`/`451` with `4.7.x` or `4.2.0`, or saying so in the text.
    pub(crate) fn is_greylisting(&self) -> bool {
        if !matches!(self.code, 450 | 451) {
            return false;
        }
        let by_code = StatusCode::leading(self.lines.first().map_or("", String::as_str))
            .is_some_and(|c| c.class == 4 && (c.subject == 7 || (c.subject == 2 && c.detail == 0)));
        by_code
            || self
                .lines
                .iter()
                .any(|l| l.to_ascii_lowercase().contains("greylist"))
    }

    /// The class of a negative reply, `None` for 2xx/3xx.
    pub(crate) fn error_class(&self) -> Option<ErrorClass> {
        match self.code {
            _ if self.is_greylisting() => Some(ErrorClass::Greylisted),
            400..=499 => Some(ErrorClass::Reply4xx),
            500..=599 => Some(ErrorClass::Reply5xx),
            _ => None,
        }
    }

    /// Records a reply other than `expected` (first digit) on `obs`: greylisting is a warning, a
    /// `421` (service closing, at any point) and other negative replies a failure, anything else a
    /// protocol error. Returns true when the reply was the expected kind.
    pub(crate) fn expect(&self, expected: u16, obs: &mut Observation, phase: Phase) -> bool {
        if self.code / 100 == expected / 100 {
            return true;
        }
        let summary = format!(
            "{phase}: {} {}",
            self.code,
            self.lines.first().map_or("", String::as_str)
        );
        match self.error_class() {
            Some(ErrorClass::Greylisted) => {
                obs.problem(Outcome::Warn, ErrorClass::Greylisted, phase, summary);
            }
            Some(class) => {
                obs.problem(Outcome::Fail, class, phase, summary);
            }
            None => {
                obs.problem(
                    Outcome::Fail,
                    ErrorClass::Protocol,
                    phase,
                    format!("unexpected {summary}"),
                );
            }
        }
        false
    }
}

/// Why lines are not one RFC 5321 reply; a line is quoted (at most 64 bytes of it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReplyError {
    #[error("not a reply line: {0:?}")]
    NotReplyLine(String),
    #[error("reply code {0} out of range")]
    CodeOutOfRange(u16),
    #[error("bad separator after reply code: {0:?}")]
    BadSeparator(String),
    #[error("lines after the last line of a reply")]
    LinesAfterLast,
    #[error("reply code changed within a reply ({first} then {then})")]
    CodeChanged { first: u16, then: u16 },
    #[error("empty reply")]
    Empty,
    #[error("reply without a last line")]
    NoLastLine,
}

/// Splits one reply line into (code, is last line, text). A bare `250` is a last line.
pub(crate) fn parse_reply_line(line: &str) -> Result<(u16, bool, &str), ReplyError> {
    let bytes = line.as_bytes();
    if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
        return Err(ReplyError::NotReplyLine(truncate(line, 64).to_string()));
    }
    let code = u16::from(bytes[0] - b'0') * 100
        + u16::from(bytes[1] - b'0') * 10
        + u16::from(bytes[2] - b'0');
    if !(200..=599).contains(&code) {
        return Err(ReplyError::CodeOutOfRange(code));
    }
    match bytes.get(3) {
        None => Ok((code, true, "")),
        Some(b' ') => Ok((code, true, &line[4..])),
        Some(b'-') => Ok((code, false, &line[4..])),
        Some(_) => Err(ReplyError::BadSeparator(truncate(line, 64).to_string())),
    }
}

/// Parses the lines of one reply; every line must carry the same code and only the last may be final.
pub(crate) fn parse_reply<'a>(
    lines: impl IntoIterator<Item = &'a str>,
) -> Result<Reply, ReplyError> {
    let mut code = None;
    let mut texts = Vec::new();
    let mut ended = false;
    for line in lines {
        if ended {
            return Err(ReplyError::LinesAfterLast);
        }
        let (c, last, text) = parse_reply_line(line)?;
        let first = *code.get_or_insert(c);
        if first != c {
            return Err(ReplyError::CodeChanged { first, then: c });
        }
        texts.push(text.to_string());
        ended = last;
    }
    match (code, ended) {
        (Some(code), true) => Ok(Reply { code, lines: texts }),
        (None, _) => Err(ReplyError::Empty),
        (Some(_), false) => Err(ReplyError::NoLastLine),
    }
}

/// The server does not offer the TLS upgrade `command` (`STARTTLS`, `STLS`): a failure where the
/// target requires TLS, a warning otherwise. The one rule for SMTP, IMAP and POP3.
pub(crate) fn starttls_missing(
    obs: &mut Observation,
    t: &super::Target<'_>,
    phase: Phase,
    command: &str,
) {
    let outcome = if t.spec.require_tls {
        Outcome::Fail
    } else {
        Outcome::Warn
    };
    obs.problem(
        outcome,
        ErrorClass::NoStarttls,
        phase,
        format!("server does not offer {command}"),
    );
}

/// At most `max` bytes of `s`, cut on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Connects to `t.addr`, does the TLS handshake first when `implicit` (imaps, pop3s) and reads the
/// one-line greeting: the opening IMAP and POP3 share. `None` when a phase failed (already recorded).
pub(crate) async fn open_with_greeting(
    t: &super::Target<'_>,
    obs: &mut Observation,
    implicit: bool,
) -> Option<(Dialogue, String)> {
    let stream = super::tcp::connect(obs, t.addr, t.phase_deadline(super::CONNECT_TIMEOUT)).await?;
    obs.fact(facts::tls::IMPLICIT, implicit);
    let mut io: Box<dyn Io> = Box::new(stream);
    if implicit {
        io = super::tls::handshake(io, t, obs).await?;
    }
    let mut d = Dialogue::new(io, Bounds::default());
    let deadline = t.phase_deadline(REPLY_TIMEOUT);
    match d
        .exchange(obs, Some(Phase::Greeting), None, deadline, |_| Ok(true))
        .await
    {
        Ok(lines) => Some((d, lines.into_iter().next().unwrap_or_default())),
        Err(e) => {
            e.record(obs, Phase::Greeting);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn multiline_reply_parses() {
        let r = parse_reply([
            "250-mx.example.test hello",
            "250-PIPELINING",
            "250 STARTTLS",
        ])
        .unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(
            r.lines,
            vec!["mx.example.test hello", "PIPELINING", "STARTTLS"]
        );
        assert!(parse_reply(["250-a", "251 b"]).is_err());
        assert!(parse_reply(["250-a"]).is_err());
        assert!(parse_reply(["250 a", "250 b"]).is_err());
        assert_eq!(parse_reply(["220"]).unwrap().code, 220);
        assert!(parse_reply_line("hello").is_err());
        assert!(parse_reply_line("999 x").is_err());
        assert!(parse_reply_line("250x").is_err());
    }

    #[test]
    fn enhanced_codes_and_greylisting() {
        let r = Reply {
            code: 450,
            lines: vec!["4.2.0 try again later".into()],
        };
        assert_eq!(r.enhanced().as_deref(), Some("4.2.0"));
        assert!(r.is_greylisting());
        assert_eq!(r.error_class(), Some(ErrorClass::Greylisted));
        let r = Reply {
            code: 451,
            lines: vec!["4.7.1 Service unavailable".into()],
        };
        assert!(r.is_greylisting());
        let r = Reply {
            code: 450,
            lines: vec!["Greylisted, see http://x".into()],
        };
        assert!(r.is_greylisting());
        let r = Reply {
            code: 450,
            lines: vec!["4.2.2 mailbox full".into()],
        };
        assert!(!r.is_greylisting());
        assert_eq!(r.error_class(), Some(ErrorClass::Reply4xx));
        let r = Reply {
            code: 550,
            lines: vec!["5.1.1 no such user".into()],
        };
        assert_eq!(r.error_class(), Some(ErrorClass::Reply5xx));
        assert_eq!(r.enhanced().as_deref(), Some("5.1.1"));
        // Class must match the reply code.
        let r = Reply {
            code: 250,
            lines: vec!["5.1.1 odd".into()],
        };
        assert_eq!(r.enhanced(), None);
        let leading = |t: &str| StatusCode::leading(t).map(|c| (c.class, c.subject, c.detail));
        assert_eq!(leading("4.7.1000 x"), None);
        assert_eq!(leading("3.1.1 x"), None);
        assert_eq!(leading("2.0.0"), Some((2, 0, 0)));
    }

    #[test]
    fn expect_classifies_421_and_greylisting() {
        let mut o = Observation::new(
            "t",
            mxscope_proto::Endpoint::host("h"),
            mxscope_proto::CheckKind::Smtp,
            0,
        );
        let r = Reply {
            code: 421,
            lines: vec!["4.3.2 closing".into()],
        };
        assert!(!r.expect(250, &mut o, Phase::Ehlo));
        assert_eq!(
            (o.outcome, o.error_class, o.phase),
            (Outcome::Fail, Some(ErrorClass::Reply4xx), Some(Phase::Ehlo))
        );
        let mut o = Observation::new(
            "t",
            mxscope_proto::Endpoint::host("h"),
            mxscope_proto::CheckKind::Smtp,
            0,
        );
        let r = Reply {
            code: 450,
            lines: vec!["4.7.1 greylisted".into()],
        };
        assert!(!r.expect(250, &mut o, Phase::Rcpt));
        assert_eq!(
            (o.outcome, o.error_class),
            (Outcome::Warn, Some(ErrorClass::Greylisted))
        );
    }

    #[tokio::test]
    async fn line_reader_enforces_bounds() {
        let far = Instant::now() + std::time::Duration::from_secs(5);
        let bounds = Bounds {
            max_line: 16,
            max_lines: 3,
            max_bytes: 64,
        };
        let (client, mut server) = tokio::io::duplex(1024);
        server.write_all(b"220 ok\r\nbare\n").await.unwrap();
        let mut d = Dialogue::new(Box::new(client), bounds);
        assert_eq!(d.read_line(far).await.unwrap(), "220 ok");
        assert_eq!(d.read_line(far).await.unwrap(), "bare");
        server.write_all(b"0123456789abcdefXYZ\r\n").await.unwrap();
        assert!(matches!(
            d.read_line(far).await,
            Err(DialogueError::LineTooLong(16))
        ));

        let (client, mut server) = tokio::io::duplex(1024);
        server
            .write_all(b"250-a\r\n250-b\r\n250-c\r\n250-d\r\n")
            .await
            .unwrap();
        let mut d = Dialogue::new(Box::new(client), bounds);
        assert!(matches!(
            d.read_reply(far).await,
            Err(DialogueError::TooManyLines(3))
        ));

        let (client, server) = tokio::io::duplex(1024);
        drop(server);
        let mut d = Dialogue::new(Box::new(client), bounds);
        assert!(matches!(d.read_line(far).await, Err(DialogueError::Closed)));
    }

    #[tokio::test]
    async fn data_before_tls_is_refused() {
        let far = Instant::now() + std::time::Duration::from_secs(5);
        let (client, mut server) = tokio::io::duplex(1024);
        server
            .write_all(b"220 go ahead\r\n250 injected\r\n")
            .await
            .unwrap();
        let mut d = Dialogue::new(Box::new(client), Bounds::default());
        assert_eq!(d.read_reply(far).await.unwrap().code, 220);
        let e = d
            .into_io()
            .map(|_| ())
            .expect_err("bytes before the handshake");
        assert_eq!(e.class(), ErrorClass::Protocol);
        assert_eq!(
            e.to_string(),
            "malformed reply: 14 bytes sent before the TLS handshake"
        );
    }

    #[test]
    fn reply_errors_say_what_is_wrong() {
        let cases: &[(&[&str], &str)] = &[
            (&["hello"], "not a reply line: \"hello\""),
            (&["999 x"], "reply code 999 out of range"),
            (&["250x"], "bad separator after reply code: \"250x\""),
            (&["250 a", "250 b"], "lines after the last line of a reply"),
            (
                &["250-a", "251 b"],
                "reply code changed within a reply (250 then 251)",
            ),
            (&[], "empty reply"),
            (&["250-a"], "reply without a last line"),
        ];
        assert!(!cases.is_empty());
        for (lines, message) in cases {
            let e = parse_reply(lines.iter().copied()).expect_err("malformed");
            assert_eq!(e.to_string(), *message, "{lines:?}");
        }
        let long = format!("x{}", "y".repeat(100));
        let e = parse_reply_line(&long).expect_err("not a reply");
        assert_eq!(
            e.to_string(),
            format!("not a reply line: {:?}", &long[..64])
        );
    }

    #[tokio::test]
    async fn a_malformed_reply_is_a_protocol_error() {
        let far = Instant::now() + std::time::Duration::from_secs(5);
        let (client, mut server) = tokio::io::duplex(1024);
        server.write_all(b"hello there\r\n").await.unwrap();
        let mut d = Dialogue::new(Box::new(client), Bounds::default());
        let e = d.read_reply(far).await.expect_err("malformed");
        assert_eq!(e.class(), ErrorClass::Protocol);
        assert_eq!(
            e.to_string(),
            "malformed reply: not a reply line: \"hello there\""
        );
    }

    fn reply_strategy() -> impl Strategy<Value = (u16, Vec<String>)> {
        (200u16..600, prop::collection::vec("[ -~]{0,40}", 1..8))
    }

    proptest! {
        #[test]
        fn reply_parser_never_panics(lines in prop::collection::vec(".{0,80}", 0..6)) {
            let _ = parse_reply(lines.iter().map(String::as_str));
            for l in &lines {
                let _ = parse_reply_line(l);
                let _ = StatusCode::leading(l);
            }
        }

        #[test]
        fn reply_round_trips((code, texts) in reply_strategy()) {
            let n = texts.len();
            let lines: Vec<String> = texts
                .iter()
                .enumerate()
                .map(|(i, t)| format!("{code}{}{t}", if i + 1 == n { ' ' } else { '-' }))
                .collect();
            let r = parse_reply(lines.iter().map(String::as_str)).unwrap();
            prop_assert_eq!(r.code, code);
            prop_assert_eq!(r.lines, texts);
        }

        #[test]
        fn enhanced_code_round_trips(class in prop::sample::select(vec![2u8, 4, 5]), s in 0u16..1000, d in 0u16..1000, rest in "[ -~]{0,20}") {
            let text = format!("{class}.{s}.{d} {rest}");
            let code = StatusCode::leading(&text).map(|c| (c.class, c.subject, c.detail));
            prop_assert_eq!(code, Some((class, s, d)));
        }
    }
}
