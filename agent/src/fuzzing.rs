//! Entry points of the `fuzz/` crate's targets (cargo feature `fuzzing`, never in a release build):
//! thin wrappers that hand arbitrary input to the agent's crate-private parsers, the real code, and
//! check what must hold of their answers. A panic is a finding.

use std::cell::RefCell;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mxscope_proto::{CheckKind, Endpoint, Observation, Phase};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::probe::fuzz_surface::{
    check_status, classify_answer, dane_matches, parse_capa, parse_capability_line, parse_ehlo,
    parse_reply, parse_reply_line, quoted, read_leaf, reverse_query_name, rfc3339, status_of,
    summarize, tagged, Bounds, Dialogue, DnsblAnswer,
};
use crate::probe::resolve::TlsaRecord;

fn observation(check: CheckKind) -> Observation {
    Observation::new(
        "fuzz.example.test",
        Endpoint::host("fuzz.example.test"),
        check,
        0,
    )
}

/// SMTP reply lines: each through `parse_reply_line`, all of them as one reply through
/// `parse_reply` (then what the probes derive from a reply), and as an EHLO answer.
pub fn smtp_reply(lines: &[&str]) {
    for line in lines {
        if let Ok((code, last, text)) = parse_reply_line(line) {
            assert!((200..=599).contains(&code), "{line:?}");
            assert!(line.ends_with(text), "{line:?}");
            assert_eq!(last, line.len() == 3 || line.as_bytes()[3] == b' ');
        }
    }
    if let Ok(reply) = parse_reply(lines.iter().copied()) {
        assert_eq!(reply.lines.len(), lines.len());
        let _ = (reply.text(), reply.enhanced(), reply.error_class());
        let mut obs = observation(CheckKind::Smtp);
        let _ = reply.expect(250, &mut obs, Phase::Ehlo);
        check_ehlo(&reply.lines);
    }
    let owned: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    check_ehlo(&owned);
}

fn check_ehlo(lines: &[String]) {
    let ext = parse_ehlo(lines);
    assert!(ext.keywords.iter().all(|k| !k.is_empty()));
    assert_eq!(ext.starttls, ext.keywords.iter().any(|k| k == "STARTTLS"));
}

/// IMAP response lines: capability lists (`* CAPABILITY`, `[CAPABILITY …]`), status words of
/// tagged and untagged lines as the probe judges them, and IMAP quoting of each line.
pub fn imap_response(lines: &[&str]) {
    let mut obs = observation(CheckKind::Imap);
    for line in lines {
        if let Some(caps) = parse_capability_line(line) {
            assert!(caps.atoms.iter().all(|a| !a.is_empty()));
            let _ = (caps.has("STARTTLS"), caps.auth());
        }
        for tag in ["*", "a1"] {
            let status = status_of(line, tag);
            check_status(&mut obs, Phase::Capability, line, status);
        }
        if let Some(q) = quoted(line) {
            assert!(q.len() >= 2 && q.starts_with('"') && q.ends_with('"'));
        }
    }
}

/// The lines of a POP3 `CAPA` answer.
pub fn pop3_capa(lines: &[&str]) {
    let owned: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let capa = parse_capa(&owned);
    assert!(capa.tags.iter().all(|t| !t.is_empty()));
    assert_eq!(capa.has("SASL"), capa.tags.iter().any(|t| t == "SASL"));
}

/// Which probe's reading [`dialogue`] runs over the server's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Smtp,
    Imap,
    Pop3,
}

/// The server's side of a fuzzed dialogue: `data` in reads of at most `chunk` bytes (0: as much as
/// asked), then end of stream; what the client writes is discarded.
struct Server {
    data: Vec<u8>,
    chunk: usize,
    consumed: Arc<AtomicUsize>,
}

impl AsyncRead for Server {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let at = this.consumed.load(Ordering::Relaxed);
        let rest = &this.data[at..];
        let mut n = rest.len().min(buf.remaining());
        if this.chunk > 0 {
            n = n.min(this.chunk);
        }
        buf.put_slice(&rest[..n]);
        this.consumed.store(at + n, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Server {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

fn block_on<F: std::future::Future>(work: F) -> F::Output {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("tokio runtime")
        });
        rt.block_on(work)
    })
}

/// The dialogue line reader over `stream` as a server sends it, in reads of at most `chunk` bytes
/// (0: as much as asked), under the given bounds: the greeting, then the replies `protocol`'s probe
/// reads (SMTP replies and EHLO keywords, IMAP tagged responses and capabilities, POP3 `CAPA`
/// lists) until the stream or a bound ends it, then the pre-TLS leftover check.
pub fn dialogue(
    protocol: Protocol,
    stream: &[u8],
    chunk: usize,
    max_line: usize,
    max_lines: usize,
    max_bytes: usize,
) {
    let consumed = Arc::new(AtomicUsize::new(0));
    let server = Server {
        data: stream.to_vec(),
        chunk,
        consumed: consumed.clone(),
    };
    let bounds = Bounds {
        max_line,
        max_lines,
        max_bytes,
    };
    let mut d = Dialogue::new(Box::new(server), bounds);
    block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut obs = observation(match protocol {
            Protocol::Smtp => CheckKind::Smtp,
            Protocol::Imap => CheckKind::Imap,
            Protocol::Pop3 => CheckKind::Pop3,
        });
        let check_lines = |lines: &[String]| {
            assert!(!lines.is_empty() && lines.len() <= max_lines);
            assert!(lines.iter().all(|l| !l.contains('\n')));
        };
        match protocol {
            Protocol::Smtp => {
                let mut phase = Phase::Greeting;
                while let Ok(reply) = d.read_reply(deadline).await {
                    assert!((200..=599).contains(&reply.code));
                    check_lines(&reply.lines);
                    let _ = reply.expect(250, &mut obs, phase);
                    check_ehlo(&reply.lines);
                    phase = Phase::Ehlo;
                    if d.send("EHLO probe.example.test", deadline).await.is_err() {
                        break;
                    }
                }
            }
            Protocol::Imap => {
                let Ok(greeting) = d.read_lines(deadline, |_| Ok(true)).await else {
                    return;
                };
                check_lines(&greeting);
                let status = status_of(&greeting[0], "*");
                check_status(&mut obs, Phase::Greeting, &greeting[0], status);
                let _ = parse_capability_line(&greeting[0]);
                for n in 1..=64 {
                    let tag = format!("a{n}");
                    let Ok((last, caps)) = tagged(
                        &mut d,
                        &mut obs,
                        Some(Phase::Capability),
                        &tag,
                        "CAPABILITY",
                        deadline,
                    )
                    .await
                    else {
                        break;
                    };
                    assert!(last.starts_with(&format!("{tag} ")));
                    check_status(&mut obs, Phase::Capability, &last, status_of(&last, &tag));
                    if let Some(caps) = caps {
                        let _ = (caps.has("STARTTLS"), caps.auth());
                    }
                }
            }
            Protocol::Pop3 => {
                let Ok(greeting) = d.read_lines(deadline, |_| Ok(true)).await else {
                    return;
                };
                check_lines(&greeting);
                loop {
                    let Ok(lines) = d
                        .exchange(
                            &mut obs,
                            Some(Phase::Capability),
                            Some("CAPA"),
                            deadline,
                            |l| Ok(l == "."),
                        )
                        .await
                    else {
                        break;
                    };
                    check_lines(&lines);
                    // between the status line and the closing `.`
                    if let [_, body @ .., _] = lines.as_slice() {
                        let _ = parse_capa(body);
                    }
                }
            }
        }
    });
    let _ = d.into_io();
    assert!(consumed.load(Ordering::Relaxed) <= max_bytes);
}

/// Certificate facts from arbitrary DER: the leaf as `read_leaf` reads it and its expiry date as
/// the probe reports it.
pub fn certificate(der: &[u8]) {
    if let Some(leaf) = read_leaf(der) {
        let date = rfc3339(leaf.not_after_unix);
        assert!(date.ends_with('Z'), "{date}");
    }
}

/// DANE: whether `cert` is what `record` names. Records holding the certificate itself, or its
/// SHA-256 or SHA-512, must match whatever the bytes are.
pub fn dane(record: &TlsaRecord, cert: &[u8]) -> bool {
    let matched = dane_matches(record, cert);
    let digest = |alg| ring::digest::digest(alg, cert).as_ref().to_vec();
    for (matching, data) in [
        (0, cert.to_vec()),
        (1, digest(&ring::digest::SHA256)),
        (2, digest(&ring::digest::SHA512)),
    ] {
        let own = TlsaRecord {
            usage: record.usage,
            selector: 0,
            matching,
            data,
        };
        assert!(dane_matches(&own, cert), "matching type {matching}");
    }
    matched
}

/// A DNS blocklist's A answers for one query, and the query names of those addresses in `zone`.
pub fn dnsbl(answers: &[IpAddr], zone: &str) {
    match classify_answer(answers) {
        DnsblAnswer::Listed { codes } => {
            assert!(!codes.is_empty());
            assert!(codes.windows(2).all(|w| w[0] < w[1]));
            assert!(codes.iter().all(|c| c.octets()[0] == 127));
            assert!(codes.iter().all(|c| answers.contains(&IpAddr::V4(*c))));
        }
        DnsblAnswer::NotListed => assert!(answers.is_empty()),
        DnsblAnswer::ListError { answer, .. } => assert!(answers.contains(&answer)),
    }
    for ip in answers {
        let name = reverse_query_name(*ip, zone);
        assert!(name.ends_with(zone.trim_matches('.')), "{name}");
    }
}

/// `postqueue -j` output as the `queue` check summarises it.
pub fn postqueue(output: &str, now_unix: u64) {
    let s = summarize(output, now_unix);
    let c = s.counts;
    assert_eq!(
        c.active + c.deferred + c.hold + c.incoming + c.maildrop + c.other,
        s.messages
    );
    assert_eq!(s.oldest_queue_id.is_some(), s.messages > 0);
    assert!(s.deferrals.windows(2).all(|w| w[0].count >= w[1].count));
    let lines = output.lines().count();
    assert!(s.bad_lines.iter().all(|b| (1..=lines).contains(&b.line)));
}
