//! An SMTP relay that edits the server's replies the way a firewall's SMTP inspection does (the
//! Cisco ASA "ESMTP inspection" signature): the greeting's text masked with `*` (code and length
//! kept), the EHLO keyword `STARTTLS` replaced by `XXXXXXXA`. Client bytes pass through unchanged.
//!
//! Why a fake here, when LAB.md wants real servers: this stands for a middlebox on one region's
//! path, not for a mail server. No real MTA alters its own dialogue like this, and the firewalls
//! that do are not software we can install in the lab. The mail server behind it is the real
//! Postfix; only the path is imitated, byte for byte as such boxes are documented to rewrite.
//!
//! Usage: `mxscope-smtp-fixup --listen ADDR:PORT --upstream ADDR:PORT [--ready-file PATH]
//! [--max-seconds N]`. Bounded: at most [`MAX_SESSIONS`] sessions at once, each at most
//! [`SESSION_LIMIT`], reply lines of at most [`MAX_LINE`] bytes, and the whole process exits by
//! itself after `--max-seconds` (default 3600).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Sessions relayed at once; more wait for a free slot.
const MAX_SESSIONS: usize = 64;
/// A session is cut after this long, whatever it is doing.
const SESSION_LIMIT: Duration = Duration::from_secs(60);
/// Longest server reply line relayed (RFC 5321 allows 512; generous).
const MAX_LINE: u64 = 4096;
/// What the EHLO keyword `STARTTLS` becomes (same length, so the reply keeps its size).
const MASKED_STARTTLS: &[u8] = b"XXXXXXXA";

struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    ready_file: Option<String>,
    max_seconds: u64,
}

fn parse_args() -> Result<Args> {
    let mut listen = None;
    let mut upstream = None;
    let mut ready_file = None;
    let mut max_seconds = 3600;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().context("--listen ADDR:PORT")?),
            "--upstream" => upstream = Some(value.parse().context("--upstream ADDR:PORT")?),
            "--ready-file" => ready_file = Some(value),
            "--max-seconds" => max_seconds = value.parse().context("--max-seconds N")?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(Args {
        listen: listen.context("--listen is required")?,
        upstream: upstream.context("--upstream is required")?,
        ready_file,
        max_seconds,
    })
}

/// The greeting line with everything after `220 ` / `220-` masked (CRLF kept).
fn mask_banner(line: &mut [u8]) {
    let end = line
        .iter()
        .rposition(|b| *b != b'\r' && *b != b'\n')
        .map_or(0, |i| i + 1);
    if end > 4 {
        line[4..end].fill(b'*');
    }
}

/// `250-STARTTLS` / `250 STARTTLS` (any case) becomes `250-XXXXXXXA`; other lines stay.
fn mask_starttls(line: &mut [u8]) {
    let text = line.get(4..).unwrap_or_default();
    let word_len = text
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(text.len());
    if line.starts_with(b"250") && text[..word_len].eq_ignore_ascii_case(b"STARTTLS") {
        line[4..4 + word_len].copy_from_slice(MASKED_STARTTLS);
    }
}

/// True for the last line of a reply (`NNN ` rather than `NNN-`).
fn is_last_line(line: &[u8]) -> bool {
    line.get(3) != Some(&b'-')
}

/// Copies server replies to the client, editing the greeting and the EHLO keywords.
async fn server_to_client(
    server: impl AsyncRead + Unpin,
    mut client: impl AsyncWrite + Unpin,
) -> std::io::Result<()> {
    let mut server = BufReader::new(server);
    let mut in_greeting = true;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut server)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            break;
        }
        if in_greeting {
            mask_banner(&mut line);
            in_greeting = !is_last_line(&line);
        } else {
            mask_starttls(&mut line);
        }
        client.write_all(&line).await?;
    }
    client.shutdown().await
}

async fn relay(client: TcpStream, upstream: SocketAddr) -> Result<()> {
    let server = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("connect {upstream}"))?;
    let (mut client_rd, client_wr) = client.into_split();
    let (server_rd, mut server_wr) = server.into_split();
    let up = async {
        tokio::io::copy(&mut client_rd, &mut server_wr).await?;
        server_wr.shutdown().await
    };
    let down = server_to_client(server_rd, client_wr);
    let (a, b) = tokio::join!(up, down);
    a.and(b).context("relay")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    if let Some(path) = &args.ready_file {
        std::fs::write(path, "ready\n").with_context(|| format!("write {path}"))?;
    }
    eprintln!(
        "smtp-fixup: relaying {} -> {} (greeting masked, STARTTLS -> XXXXXXXA)",
        args.listen, args.upstream
    );
    let accept = serve(listener, args.upstream);
    match tokio::time::timeout(Duration::from_secs(args.max_seconds), accept).await {
        Ok(res) => res,
        Err(_) => {
            eprintln!("smtp-fixup: --max-seconds reached, exiting");
            Ok(())
        }
    }
}

/// Accepts sessions (at most [`MAX_SESSIONS`] at once) and relays each to `upstream`.
async fn serve(listener: TcpListener, upstream: SocketAddr) -> Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_SESSIONS));
    loop {
        let permit = slots.clone().acquire_owned().await?;
        let (client, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(SESSION_LIMIT, relay(client, upstream)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("smtp-fixup: session from {peer}: {e:#}"),
                Err(_) => eprintln!("smtp-fixup: session from {peer} cut after the limit"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_text_is_masked_code_and_length_kept() {
        let mut line = b"220 mx.lab.test ESMTP\r\n".to_vec();
        mask_banner(&mut line);
        assert_eq!(line, b"220 *****************\r\n");
    }

    #[test]
    fn starttls_keyword_is_replaced_and_others_pass() {
        let mut line = b"250-STARTTLS\r\n".to_vec();
        mask_starttls(&mut line);
        assert_eq!(line, b"250-XXXXXXXA\r\n");
        let mut last = b"250 starttls\r\n".to_vec();
        mask_starttls(&mut last);
        assert_eq!(last, b"250 XXXXXXXA\r\n");
        let mut other = b"250-PIPELINING\r\n".to_vec();
        mask_starttls(&mut other);
        assert_eq!(other, b"250-PIPELINING\r\n");
    }
}
