//! A userspace delay line for the lab: two TUN devices, each created in its own network namespace,
//! with IP packets copied between them after a fixed one-way delay (half the RTT each direction).
//! This kernel has no netem, so this is how the lab gives each region its own round-trip time.
//!
//! Usage: `mxscope-delayline --a NETNS:DEV --b NETNS:DEV --rtt-ms N [--ready-file PATH]`
//! The devices exist while the process runs; configure their addresses with `ip -n NETNS …`.

// TUN devices, setns and raw fd reads and writes are libc calls without a safe std wrapper; each
// block has its SAFETY note.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const MAX_PACKET: usize = 65_536;
/// Packets queued per direction before the line drops (a full queue means something is wrong).
const QUEUE: usize = 16_384;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

struct Side {
    netns: String,
    dev: String,
}

fn parse_side(s: &str) -> Result<Side, String> {
    let (netns, dev) = s
        .split_once(':')
        .ok_or_else(|| format!("expected NETNS:DEV, got '{s}'"))?;
    if dev.is_empty() || dev.len() >= libc::IFNAMSIZ {
        return Err(format!("device name '{dev}' must be 1..15 characters"));
    }
    Ok(Side {
        netns: netns.to_string(),
        dev: dev.to_string(),
    })
}

/// Enters `netns` (this thread) and creates the TUN device `dev` there.
fn open_tun_in(side: &Side) -> io::Result<OwnedFd> {
    let ns = File::open(format!("/var/run/netns/{}", side.netns))?;
    // SAFETY: setns with a valid namespace fd only changes this thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain open(2) of a device node; the fd is owned below.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..side.dev.len()].copy_from_slice(side.dev.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq-sized struct we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Copies packets from `from` to `to`, each leaving `delay` after it arrived, in arrival order.
fn pump(from: Arc<OwnedFd>, to: Arc<OwnedFd>, delay: Duration) {
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(QUEUE);
    thread::spawn(move || {
        for (due, pkt) in rx {
            let now = Instant::now();
            if due > now {
                // The delay line's job: hold each packet on its own thread until it is due.
                #[allow(clippy::disallowed_methods)]
                thread::sleep(due - now);
            }
            // SAFETY: writing an owned buffer to an fd we keep alive through the Arc.
            unsafe { libc::write(to.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
        }
    });
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        // SAFETY: reading into a buffer we own, of the length we pass.
        let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("mxscope-delayline: read failed: {err}");
            std::process::exit(1);
        }
        let pkt = buf[..n as usize].to_vec();
        // A full queue drops the packet, as a real congested link would.
        let _ = tx.try_send((Instant::now() + delay, pkt));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut a = None;
    let mut b = None;
    let mut rtt_ms: Option<f64> = None;
    let mut ready_file = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next();
        let r = match (flag.as_str(), value) {
            ("--a", Some(v)) => parse_side(v).map(|s| a = Some(s)),
            ("--b", Some(v)) => parse_side(v).map(|s| b = Some(s)),
            ("--rtt-ms", Some(v)) => v
                .parse::<f64>()
                .map_err(|e| format!("--rtt-ms '{v}': {e}"))
                .map(|x| rtt_ms = Some(x)),
            ("--ready-file", Some(v)) => {
                ready_file = Some(v.clone());
                Ok(())
            }
            _ => Err(format!("unexpected argument '{flag}'")),
        };
        if let Err(e) = r {
            eprintln!("mxscope-delayline: {e}\nusage: mxscope-delayline --a NETNS:DEV --b NETNS:DEV --rtt-ms N [--ready-file PATH]");
            std::process::exit(2);
        }
    }
    let (Some(a), Some(b), Some(rtt_ms)) = (a, b, rtt_ms) else {
        eprintln!("mxscope-delayline: --a, --b and --rtt-ms are required");
        std::process::exit(2);
    };
    let open = |side: Side| {
        // Each device is created from its own thread so the main thread's namespace never changes.
        thread::spawn(move || open_tun_in(&side).map_err(|e| (side.netns, side.dev, e)))
            .join()
            .unwrap_or_else(|_| Err((String::new(), String::new(), io::Error::other("thread"))))
    };
    let (fa, fb) = match (open(a), open(b)) {
        (Ok(fa), Ok(fb)) => (Arc::new(fa), Arc::new(fb)),
        (Err((ns, dev, e)), _) | (_, Err((ns, dev, e))) => {
            eprintln!("mxscope-delayline: cannot create TUN device {dev} in netns {ns}: {e}");
            std::process::exit(1);
        }
    };
    let one_way = Duration::from_secs_f64(rtt_ms.max(0.0) / 2000.0);
    if let Some(path) = ready_file {
        if let Err(e) = std::fs::write(&path, std::process::id().to_string()) {
            eprintln!("mxscope-delayline: cannot write ready file {path}: {e}");
            std::process::exit(1);
        }
    }
    let (fa2, fb2) = (fa.clone(), fb.clone());
    thread::spawn(move || pump(fb2, fa2, one_way));
    pump(fa, fb, one_way);
}
