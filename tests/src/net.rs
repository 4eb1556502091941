//! Loopback addresses and free ports for lab servers, plus a greeting reader for readiness checks.
//! Only 127.0.0.0/8 is ever used; each server can get its own 127.x.y.z address.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

static NEXT_ADDR: AtomicU32 = AtomicU32::new(0);

/// A loopback address not handed out before in this process. The second and third octets come
/// from the process id, so concurrent test binaries get different addresses too.
pub fn unique_loopback() -> Ipv4Addr {
    let n = NEXT_ADDR.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let b = 16 + (pid % 200) as u8;
    let c = ((pid / 200) % 250) as u8;
    let d = 2 + (n % 250) as u8;
    Ipv4Addr::new(127, b, c, d)
}

/// A port that is free on `ip` right now (the kernel picks it; the listener is closed again).
pub fn free_port(ip: Ipv4Addr) -> Result<u16> {
    Ok(free_ports::<1>(ip)?[0])
}

/// `N` distinct free ports on `ip`: each is held until all are picked (ports picked one by one
/// may repeat, and a server given the same port twice refuses to start).
pub fn free_ports<const N: usize>(ip: Ipv4Addr) -> Result<[u16; N]> {
    let mut held = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let listener = TcpListener::bind((ip, 0))
            .with_context(|| format!("bind {ip}:0 to pick a free port"))?;
        *port = listener.local_addr()?.port();
        held.push(listener);
    }
    Ok(ports)
}

/// Connects to `addr` and returns the first line the server sends (a greeting), if any arrives
/// within `timeout`.
pub fn read_greeting(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let stream =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(stream)
        .take(4096)
        .read_line(&mut line)
        .with_context(|| format!("read greeting from {addr}"))?;
    Ok(line.trim_end().to_string())
}

/// True when something accepts TCP connections on `addr`.
pub fn is_listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_loopback_and_distinct() {
        let a = unique_loopback();
        let b = unique_loopback();
        assert!(a.is_loopback() && b.is_loopback());
        assert_ne!(a, b);
    }

    #[test]
    fn free_port_is_bindable() {
        let ip = unique_loopback();
        let port = free_port(ip).expect("pick a port");
        assert_ne!(port, 0);
        TcpListener::bind((ip, port)).expect("port still free");
        let four = free_ports::<4>(ip).expect("pick four ports");
        let distinct: std::collections::BTreeSet<u16> = four.iter().copied().collect();
        assert_eq!(distinct.len(), 4, "{four:?}");
    }
}
