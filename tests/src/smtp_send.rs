//! A minimal blocking SMTP client for test setup: sends one message over plain SMTP (no TLS, no
//! AUTH) and returns the final reply, so tests can put mail into a lab Postfix.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

fn reply(r: &mut impl BufRead) -> Result<String> {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).context("read smtp reply")? == 0 {
            bail!("server closed the connection after {all:?}");
        }
        all.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(all.trim_end().to_string());
        }
    }
}

/// Sends `body` (headers and text, LF line ends) from `from` to `to` through `addr`; returns the
/// reply to the end of DATA, failing on any non-2xx/3xx reply.
pub fn send(addr: SocketAddr, from: &str, to: &str, body: &str) -> Result<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let mut step = |cmd: Option<String>| -> Result<String> {
        if let Some(c) = cmd {
            w.write_all(c.as_bytes())?;
            w.write_all(b"\r\n")?;
        }
        let got = reply(&mut r)?;
        if !got.starts_with('2') && !got.starts_with('3') {
            bail!("smtp step failed: {got}");
        }
        Ok(got)
    };
    step(None)?;
    step(Some("EHLO setup.mxscope.test".into()))?;
    step(Some(format!("MAIL FROM:<{from}>")))?;
    step(Some(format!("RCPT TO:<{to}>")))?;
    step(Some("DATA".into()))?;
    let data: String = body
        .lines()
        .map(|l| {
            if l.starts_with('.') {
                format!(".{l}\r\n")
            } else {
                format!("{l}\r\n")
            }
        })
        .collect();
    step(Some(format!("{data}.")))?;
    let _ = step(Some("QUIT".into()));
    Ok(String::new())
}
