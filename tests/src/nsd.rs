//! A private nsd instance (own config, zones dir, pid file, foreground `nsd -d -c FILE`) serving
//! test zones on 127.0.0.1:<free port>; ready once `dig` gets the zone's SOA back from it.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::binaries::system_tool;
use crate::lab::{path_str, read_tail, write_file, Lab};
use crate::net::free_port;
use crate::process::{Proc, Spec};
use crate::wait::wait_for;

/// An authoritative zone, given as zone-file text.
#[derive(Debug, Clone)]
pub struct Zone {
    /// The origin without trailing dot, e.g. `example.test`.
    pub name: String,
    /// Zone-file text; should start with `$ORIGIN` and contain an SOA.
    pub text: String,
}

impl Zone {
    /// The reverse zone of `ip`'s /24 with one PTR record to `host`, so forward-confirmed reverse
    /// DNS of a lab mail server holds.
    pub fn reverse_v4(ip: std::net::Ipv4Addr, host: &str) -> Zone {
        let [a, b, c, d] = ip.octets();
        let name = format!("{c}.{b}.{a}.in-addr.arpa");
        Zone {
            text: format!(
                "$ORIGIN {name}.\n$TTL 300\n\
                 @ IN SOA ns1.{host}. hostmaster.{host}. 1 3600 600 86400 300\n\
                 @ IN NS ns1.{host}.\n\
                 {d} IN PTR {host}.\n"
            ),
            name,
        }
    }
}

/// One MX host of a [`MailZone`].
#[derive(Debug, Clone)]
pub struct MxHost {
    pub preference: u16,
    /// Label inside the zone (`mx1` → `mx1.example.test`).
    pub label: String,
    /// A records of the host (loopback addresses only).
    pub addrs: Vec<Ipv4Addr>,
}

/// Builder for the common case: a mail domain with MX hosts and their A records.
#[derive(Debug, Clone)]
pub struct MailZone {
    name: String,
    mx: Vec<MxHost>,
    /// MX records naming hosts outside this zone: (preference, FQDN without trailing dot).
    external_mx: Vec<(u16, String)>,
    extra: Vec<String>,
    ttl: u32,
    serial: u32,
}

impl MailZone {
    pub fn new(name: &str) -> Self {
        MailZone {
            name: name.trim_end_matches('.').to_string(),
            mx: Vec::new(),
            external_mx: Vec::new(),
            extra: Vec::new(),
            ttl: 300,
            serial: 1,
        }
    }

    /// Adds `label.<zone>` as an MX with `preference`, resolving to `addrs`.
    pub fn mx(mut self, preference: u16, label: &str, addrs: &[Ipv4Addr]) -> Self {
        self.mx.push(MxHost {
            preference,
            label: label.to_string(),
            addrs: addrs.to_vec(),
        });
        self
    }

    /// Adds an MX with `preference` naming `host`, a name outside this zone (its A records live
    /// in the zone that holds it), e.g. the shared `mx.lab.test`.
    pub fn mx_host(mut self, preference: u16, host: &str) -> Self {
        self.external_mx
            .push((preference, host.trim_end_matches('.').to_string()));
        self
    }

    /// The SOA serial (default 1): two servers answering the same zone differently can be told
    /// apart by it.
    pub fn serial(mut self, serial: u32) -> Self {
        self.serial = serial;
        self
    }

    /// Adds a raw record line (relative to the origin), e.g. `@ IN TXT "v=spf1 -all"`.
    pub fn record(mut self, line: &str) -> Self {
        self.extra.push(line.to_string());
        self
    }

    pub fn build(self) -> Zone {
        let n = &self.name;
        let mut text = String::new();
        let _ = writeln!(text, "$ORIGIN {n}.");
        let _ = writeln!(text, "$TTL {}", self.ttl);
        let _ = writeln!(
            text,
            "@ IN SOA ns1.{n}. hostmaster.{n}. {} 3600 600 86400 {}",
            self.serial, self.ttl
        );
        let _ = writeln!(text, "@ IN NS ns1.{n}.");
        let _ = writeln!(text, "ns1 IN A 127.0.0.1");
        for mx in &self.mx {
            let _ = writeln!(text, "@ IN MX {} {}.{n}.", mx.preference, mx.label);
            for a in &mx.addrs {
                let _ = writeln!(text, "{} IN A {a}", mx.label);
            }
        }
        for (preference, host) in &self.external_mx {
            let _ = writeln!(text, "@ IN MX {preference} {host}.");
        }
        for line in &self.extra {
            let _ = writeln!(text, "{line}");
        }
        Zone {
            name: self.name,
            text,
        }
    }
}

/// A running private nsd. Stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Nsd {
    proc: Proc,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nsd {
    /// Starts nsd in `<lab>/nsd` serving `zones` on 127.0.0.1 and a free port, and waits until
    /// every zone answers its SOA.
    pub fn start(lab: &Lab, zones: &[Zone]) -> Result<Nsd> {
        let ip = Ipv4Addr::LOCALHOST;
        let addr = SocketAddr::from((ip, free_port(ip)?));
        Nsd::start_at(lab, zones, addr, None)
    }

    /// Starts nsd serving `zones` on `addr`, inside network namespace `netns` when given (the
    /// lab's mail host: `198.18.0.2:53`). Readiness is checked with `dig` run in the same
    /// namespace; [`Nsd::query`] runs here, so it needs `addr` routed to from this process.
    pub fn start_at(
        lab: &Lab,
        zones: &[Zone],
        addr: SocketAddr,
        netns: Option<&str>,
    ) -> Result<Nsd> {
        Nsd::start_named(lab, "nsd", zones, addr, netns)
    }

    /// Like [`Nsd::start_at`], in `<lab>/<name>`: for a second instance next to the first.
    pub fn start_named(
        lab: &Lab,
        name: &str,
        zones: &[Zone],
        addr: SocketAddr,
        netns: Option<&str>,
    ) -> Result<Nsd> {
        if zones.is_empty() {
            bail!("nsd needs at least one zone");
        }
        let nsd_bin = system_tool("nsd", "nsd")?;
        let dig = system_tool("dig", "bind9-dnsutils")?;
        let dir = lab.subdir(name)?;
        let conf = dir.join("nsd.conf");
        write_file(&conf, render_config(&dir, addr, zones))?;
        for z in zones {
            write_file(&dir.join(format!("{}.zone", z.name)), &z.text)?;
        }
        let mut spec = Spec::new(name, &nsd_bin).args(["-d", "-c", &path_str(&conf)?]);
        if let Some(ns) = netns {
            spec = spec.in_netns(ns);
        }
        let mut proc = Proc::spawn(spec, &dir)?;
        let mut nsd_ready = |zone: &str| -> Result<Option<()>> {
            if !proc.is_running() {
                bail!(
                    "nsd exited during startup ({:?}); log:\n{}\n{}",
                    proc.exit_status(),
                    proc.log_tail(30),
                    read_tail(&dir.join("nsd.log"))
                );
            }
            Ok(dig_short(&dig, addr, zone, "SOA", netns)
                .ok()
                .filter(|a| !a.trim().is_empty())
                .map(|_| ()))
        };
        for z in zones {
            wait_for(
                &format!("nsd at {addr} to answer SOA {}", z.name),
                Duration::from_secs(20),
                || nsd_ready(&z.name),
            )?;
        }
        Ok(Nsd { proc, addr, dir })
    }

    /// `127.0.0.1:<port>`, for the agent's `--resolver`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Queries this server with `dig +short` (for assertions in tests).
    pub fn query(&self, name: &str, rtype: &str) -> Result<String> {
        let dig = system_tool("dig", "bind9-dnsutils")?;
        dig_short(&dig, self.addr, name, rtype, None)
    }
}

fn render_config(dir: &Path, addr: SocketAddr, zones: &[Zone]) -> String {
    let d = dir.display();
    let mut conf = format!(
        "server:\n\
         \x20 ip-address: {ip}@{port}\n\
         \x20 port: {port}\n\
         \x20 do-ip6: no\n\
         \x20 username: \"\"\n\
         \x20 chroot: \"\"\n\
         \x20 zonesdir: \"{d}\"\n\
         \x20 database: \"\"\n\
         \x20 zonelistfile: \"{d}/zone.list\"\n\
         \x20 xfrdfile: \"{d}/xfrd.state\"\n\
         \x20 xfrdir: \"{d}\"\n\
         \x20 pidfile: \"{d}/nsd.pid\"\n\
         \x20 logfile: \"{d}/nsd.log\"\n\
         \x20 server-count: 1\n\
         \x20 verbosity: 1\n\
         remote-control:\n\
         \x20 control-enable: no\n",
        ip = addr.ip(),
        port = addr.port(),
    );
    for z in zones {
        let _ = write!(
            conf,
            "zone:\n  name: \"{0}\"\n  zonefile: \"{0}.zone\"\n",
            z.name
        );
    }
    conf
}

/// `dig +short`, run inside `netns` when given (the server's addresses need not be routed to
/// from here).
fn dig_short(
    dig: &Path,
    server: SocketAddr,
    name: &str,
    rtype: &str,
    netns: Option<&str>,
) -> Result<String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = std::process::Command::new(system_tool("ip", "iproute2")?);
            c.args(["netns", "exec", ns]).arg(dig);
            c
        }
        None => std::process::Command::new(dig),
    };
    let out = cmd
        .args([
            &format!("@{}", server.ip()),
            "-p",
            &server.port().to_string(),
            "+short",
            "+time=1",
            "+tries=1",
            name,
            rtype,
        ])
        .output()
        .context("run dig")?;
    if !out.status.success() {
        bail!(
            "dig {name} {rtype} failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
