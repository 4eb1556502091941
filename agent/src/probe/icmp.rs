//! The `icmp` check: echo requests to each MX address over an unprivileged ICMP datagram socket
//! (no raw sockets, no setuid). Where the system forbids them the result says so: `not_permitted`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mxscope_proto::{facts, ErrorClass, Observation, Outcome, Phase};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::Target;

/// Echo requests per address.
const COUNT: u16 = 3;
/// Longest wait for one echo reply.
const REPLY_WAIT: Duration = Duration::from_secs(1);
const PAYLOAD: &[u8; 16] = b"mxscope-echo-req";

/// Opens an unprivileged ICMP socket for `ip`'s family (`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`).
fn open(ip: IpAddr) -> std::io::Result<UdpSocket> {
    let (domain, proto) = match ip {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(proto))?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(std::net::UdpSocket::from(socket))
}

/// An echo request; the kernel sets the identifier (and the ICMPv6 checksum).
pub(crate) fn echo_request(v6: bool, seq: u16) -> Vec<u8> {
    let mut pkt = vec![if v6 { 128 } else { 8 }, 0, 0, 0, 0, 0];
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(PAYLOAD);
    if !v6 {
        let sum = checksum(&pkt);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    pkt
}

/// The sequence number of an echo reply, `None` for anything else.
pub(crate) fn echo_reply_seq(v6: bool, pkt: &[u8]) -> Option<u16> {
    let reply_type = if v6 { 129 } else { 0 };
    if pkt.len() < 8 || pkt[0] != reply_type || pkt[1] != 0 {
        return None;
    }
    Some(u16::from_be_bytes([pkt[6], pkt[7]]))
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], chunk.get(1).copied().unwrap_or(0)]);
        sum = sum.wrapping_add(u32::from(word));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `COUNT` echoes to the address and records sent/received, loss and RTT min/avg/max.
pub(crate) async fn probe(t: &Target<'_>, obs: &mut Observation) {
    let ip = t.addr.ip();
    let v6 = ip.is_ipv6();
    let socket = match open(ip) {
        Ok(s) => s,
        Err(e) => {
            let class = super::tcp::classify_io(&e);
            let (class, why) = if class == ErrorClass::NotPermitted {
                (
                    ErrorClass::NotPermitted,
                    "unprivileged ICMP sockets are not permitted for this group \
                     (sysctl net.ipv4.ping_group_range)"
                        .to_string(),
                )
            } else {
                (class, format!("cannot open an ICMP socket: {e}"))
            };
            obs.fact(facts::icmp::PERMITTED, class != ErrorClass::NotPermitted);
            obs.problem(Outcome::Fail, class, Phase::Echo, why);
            return;
        }
    };
    obs.fact(facts::icmp::PERMITTED, true);
    let started = Instant::now();
    let dest = SocketAddr::new(ip, 0);
    let mut rtts = Vec::new();
    let mut sent = 0u32;
    for seq in 0..COUNT {
        if Instant::now() >= t.deadline {
            break;
        }
        let sent_at = Instant::now();
        if let Err(e) = socket.send_to(&echo_request(v6, seq), dest).await {
            obs.problem(
                Outcome::Fail,
                super::tcp::classify_io(&e),
                Phase::Echo,
                format!("echo send: {e}"),
            );
            break;
        }
        sent += 1;
        let deadline = t.phase_deadline(REPLY_WAIT);
        let mut buf = [0u8; 1500];
        loop {
            match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) if echo_reply_seq(v6, &buf[..n]) == Some(seq) => {
                    rtts.push(sent_at.elapsed());
                    break;
                }
                // Late replies to earlier requests and other ICMP: keep waiting.
                Ok(Ok(_)) => continue,
                Ok(Err(_)) | Err(_) => break,
            }
        }
    }
    obs.timing(Phase::Echo, started.elapsed());
    let received = u32::try_from(rtts.len()).unwrap_or(u32::MAX);
    obs.fact(facts::icmp::SENT, sent)
        .fact(facts::icmp::RECEIVED, received);
    let loss = if sent == 0 {
        1.0
    } else {
        1.0 - f64::from(received) / f64::from(sent)
    };
    obs.fact(facts::icmp::LOSS, loss);
    if let (Some(min), Some(max)) = (rtts.iter().min(), rtts.iter().max()) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let avg = rtts.iter().map(|d| ms(*d)).sum::<f64>() / rtts.len() as f64;
        obs.fact(facts::icmp::RTT_MIN_MS, ms(*min))
            .fact(facts::icmp::RTT_AVG_MS, avg)
            .fact(facts::icmp::RTT_MAX_MS, ms(*max));
    }
    if received == 0 {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Timeout,
            Phase::Echo,
            format!("no echo reply to {sent} requests"),
        );
    } else if received < sent {
        obs.problem(
            Outcome::Warn,
            ErrorClass::Timeout,
            Phase::Echo,
            format!("{} of {sent} echo requests lost", sent - received),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_packets() {
        let p = echo_request(false, 7);
        assert_eq!(p[0], 8);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        let mut reply = p.clone();
        reply[0] = 0;
        assert_eq!(echo_reply_seq(false, &reply), Some(7));
        assert_eq!(echo_reply_seq(false, &p), None);
        assert_eq!(echo_reply_seq(true, &[129, 0, 0, 0, 0, 0, 0, 9]), Some(9));
        assert_eq!(echo_reply_seq(true, &[129, 0]), None);
    }
}
