//! The multi-region lab of `deploy/lab/lab` as a test fixture: one lab per machine at a time (an
//! flock on [`LOCK_PATH`]), `lab up` into a private state directory, `lab down` on drop, and the
//! mxscope processes placed in it: the collector on 198.19.0.1 with mTLS, one agent per region.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::binaries::{mxscope_binary, system_tool, AGENT, COLLECTOR};
use crate::lab::{path_str, write_file};
use crate::net::free_port;
use crate::process::{run, Proc, Spec};
use crate::tls::{ctl_as, ctl_output, ClientCert, Pki};
use crate::wait::wait_for;

/// Held (flock, exclusive) while a lab is up, by the lab tests and the benchmark alike.
pub const LOCK_PATH: &str = "/run/mxscope-lab.lock";

/// The lab script, from the source tree.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lab/lab")
}

/// Fails with what is missing when the lab cannot be built here: root, `ip`, `nft`, a TUN device.
#[allow(unsafe_code)] // geteuid: no safe wrapper in std
pub fn require_prerequisites() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the lab needs root (network namespaces, TUN devices, routes): run it as root (sudo)"
        );
    }
    system_tool("ip", "iproute2")?;
    system_tool("nft", "nftables")?;
    if !Path::new("/dev/net/tun").exists() {
        bail!("/dev/net/tun is missing: the lab's delay line needs TUN devices (modprobe tun)");
    }
    Ok(())
}

/// An exclusive flock on [`LOCK_PATH`], released when dropped (the file is closed).
#[derive(Debug)]
pub struct LabLock {
    _file: File,
}

impl LabLock {
    /// Waits up to `timeout` for the lock (another lab test or the benchmark may hold it).
    #[allow(unsafe_code)] // flock(2): no safe wrapper in std
    pub fn acquire(timeout: Duration) -> Result<LabLock> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(LOCK_PATH)
            .with_context(|| format!("open {LOCK_PATH}"))?;
        wait_for(
            &format!("the lab lock {LOCK_PATH} (another lab test or benchmark holds it)"),
            timeout,
            || {
                // SAFETY: flock on a file descriptor we own.
                let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                if rc == 0 {
                    return Ok(Some(()));
                }
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    Ok(None)
                } else {
                    Err(err).context("flock")
                }
            },
        )?;
        Ok(LabLock { _file: file })
    }
}

/// One region namespace of the lab.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// Injected round-trip time to the mail host, ms.
    pub rtt_ms: f64,
    /// TCP 25 from this region is dropped at the router.
    pub block25: bool,
}

/// A lab that is up; `lab down` when dropped (then the lock is released).
#[derive(Debug)]
pub struct NetLab {
    state: PathBuf,
    env: BTreeMap<String, String>,
    regions: Vec<Region>,
    _lock: LabLock,
}

impl NetLab {
    /// Takes the lab lock (waiting up to `lock_timeout`), then `lab up --state STATE
    /// --delayline DELAYLINE` with the default regions.
    pub fn up(state: &Path, delayline: &Path, lock_timeout: Duration) -> Result<NetLab> {
        NetLab::start(state, delayline, lock_timeout, None)
    }

    /// Like [`NetLab::up`] with `--regions REGIONS` (`"name:rtt_ms[:block25] ..."`, in the order
    /// the lab numbers them: the first is 198.18.1.2, the second 198.18.2.2, ...).
    pub fn up_with(
        state: &Path,
        delayline: &Path,
        lock_timeout: Duration,
        regions: &str,
    ) -> Result<NetLab> {
        NetLab::start(state, delayline, lock_timeout, Some(regions))
    }

    fn start(
        state: &Path,
        delayline: &Path,
        lock_timeout: Duration,
        regions: Option<&str>,
    ) -> Result<NetLab> {
        require_prerequisites()?;
        let lock = LabLock::acquire(lock_timeout)?;
        let mut cmd = std::process::Command::new(script());
        cmd.arg("up")
            .arg("--state")
            .arg(state)
            .arg("--delayline")
            .arg(delayline);
        // Own process group: a Ctrl-C in the terminal reaches the caller, which brings the lab
        // down, instead of killing `lab up` half-way.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        if let Some(regions) = regions {
            cmd.arg("--regions").arg(regions);
        }
        let out = cmd
            .stdin(std::process::Stdio::null())
            .output()
            .context("run deploy/lab/lab up")?;
        if !out.status.success() {
            bail!(
                "lab up failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // From here on, drop brings it down again.
        let mut lab = NetLab {
            state: state.to_path_buf(),
            env: BTreeMap::new(),
            regions: Vec::new(),
            _lock: lock,
        };
        let text = std::fs::read_to_string(state.join("lab.env")).context("read lab.env")?;
        lab.env = parse_env(&text);
        lab.regions = regions_of(&lab.env)?;
        Ok(lab)
    }

    pub fn state(&self) -> &Path {
        &self.state
    }

    /// A value of `lab.env`.
    pub fn env(&self, key: &str) -> Result<&str> {
        self.env
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("lab.env has no {key}"))
    }

    pub fn mail_ns(&self) -> Result<&str> {
        self.env("LAB_MAIL_NS")
    }

    pub fn mail_ip(&self) -> Result<Ipv4Addr> {
        self.env("LAB_MAIL_IP")?.parse().context("LAB_MAIL_IP")
    }

    /// The root namespace's address towards the regions (where the collector listens).
    pub fn collector_ip(&self) -> Result<Ipv4Addr> {
        self.env("LAB_COLLECTOR_IP")?
            .parse()
            .context("LAB_COLLECTOR_IP")
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The region called `name`.
    pub fn region(&self, name: &str) -> Result<&Region> {
        self.regions
            .iter()
            .find(|r| r.name == name)
            .with_context(|| format!("the lab has no region {name}"))
    }

    /// The router namespace (forwarding between the regions, the mail host and the collector).
    pub fn router_ns(&self) -> Result<&str> {
        self.env("LAB_ROUTER_NS")
    }

    /// The router's address on the mail host's link (198.18.0.1), where router-side fixtures
    /// such as [`crate::smtp_fixup`] listen.
    pub fn router_mail_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, 1)
    }

    /// Adds `ip`/24 to the mail host's interface, so servers can bind it and a closed port on it
    /// answers with a reset (connection refused) instead of silence.
    pub fn add_mail_addr(&self, ip: Ipv4Addr) -> Result<()> {
        let dev = format!("{}m0", self.env("LAB_PREFIX")?);
        let ns = self.mail_ns()?;
        run_checked(
            "ip",
            "iproute2",
            &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", &dev],
        )
    }

    /// Runs `nft ARGS...` in the router namespace.
    pub fn router_nft(&self, args: &[&str]) -> Result<()> {
        let nft = system_tool("nft", "nftables")?;
        let nft = path_str(&nft)?;
        let mut all = vec!["netns", "exec", self.router_ns()?, nft.as_str()];
        all.extend_from_slice(args);
        run_checked("ip", "iproute2", &all)
    }

    /// Drops TCP to `dport` from `from` to each of `to` in the router's forward chain (the
    /// `inet mxscope_lab` table the lab script makes; the port-25 block lives there too).
    pub fn drop_tcp(&self, from: Ipv4Addr, to: &[Ipv4Addr], dport: u16) -> Result<()> {
        for dst in to {
            let (from, dst, port) = (from.to_string(), dst.to_string(), dport.to_string());
            self.router_nft(&[
                "add",
                "rule",
                "inet",
                "mxscope_lab",
                "forward",
                "ip",
                "saddr",
                &from,
                "ip",
                "daddr",
                &dst,
                "tcp",
                "dport",
                &port,
                "drop",
            ])?;
        }
        Ok(())
    }

    /// Rewrites the destination of `proto` (`tcp` or `udp`) packets from `from` to `to:dport`
    /// into `new_dst` (`IP` or `IP:PORT`) in the router's prerouting NAT chain (table
    /// [`NAT_TABLE`], made on first use). Replies are translated back by conntrack, so the
    /// region sees answers from the address it asked. Add rules before the first packet of a
    /// flow: NAT is decided on a connection's first packet.
    pub fn dnat(&self, proto: &str, from: Ipv4Addr, to: SocketAddr, new_dst: &str) -> Result<()> {
        self.ensure_nat_table()?;
        let (from, ip, port) = (from.to_string(), to.ip().to_string(), to.port().to_string());
        self.router_nft(&[
            "add",
            "rule",
            "ip",
            NAT_TABLE,
            "prerouting",
            "ip",
            "saddr",
            &from,
            "ip",
            "daddr",
            &ip,
            proto,
            "dport",
            &port,
            "dnat",
            "to",
            new_dst,
        ])
    }

    fn ensure_nat_table(&self) -> Result<()> {
        // `add` is idempotent for tables and chains in nft.
        self.router_nft(&["add", "table", "ip", NAT_TABLE])?;
        self.router_nft(&[
            "add",
            "chain",
            "ip",
            NAT_TABLE,
            "prerouting",
            "{ type nat hook prerouting priority dstnat; policy accept; }",
        ])
    }
}

/// The router's NAT table for the scenario fixtures (DNATs by source region).
pub const NAT_TABLE: &str = "mxscope_lab_nat";

/// Runs a system tool; a non-zero exit is an error with its output.
fn run_checked(tool: &str, package: &str, args: &[&str]) -> Result<()> {
    run(&system_tool(tool, package)?, args).map(drop)
}

impl Drop for NetLab {
    fn drop(&mut self) {
        let mut cmd = std::process::Command::new(script());
        cmd.arg("down").arg("--state").arg(&self.state);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let out = cmd.stdin(std::process::Stdio::null()).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "lab down failed ({}): {}{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("lab down could not run: {e}"),
        }
    }
}

/// `KEY=value` / `KEY="a b"` lines of `lab.env`.
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// The regions `lab.env` lists, in its order.
pub fn regions_of(env: &BTreeMap<String, String>) -> Result<Vec<Region>> {
    let names = env
        .get("LAB_REGIONS")
        .context("lab.env has no LAB_REGIONS")?;
    let mut out = Vec::new();
    for name in names.split_whitespace() {
        let key = name.replace('-', "_");
        let get = |what: &str| {
            env.get(&format!("LAB_{what}_{key}"))
                .with_context(|| format!("lab.env has no LAB_{what}_{key}"))
        };
        out.push(Region {
            name: name.to_string(),
            ns: get("NS")?.clone(),
            ip: get("IP")?
                .parse()
                .with_context(|| format!("LAB_IP_{key}"))?,
            rtt_ms: get("RTT")?
                .parse()
                .with_context(|| format!("LAB_RTT_{key}"))?,
            block25: env
                .get(&format!("LAB_BLOCK25_{key}"))
                .is_some_and(|v| v == "yes"),
        });
    }
    if out.is_empty() {
        bail!("lab.env lists no regions");
    }
    Ok(out)
}

/// `mxscopectl ca init DIR --server-name NAME`: a CA whose collector certificate names `server`.
pub fn pki_for(dir: &Path, server: Ipv4Addr) -> Result<Pki> {
    let out = ctl_output(&[
        "ca",
        "init",
        &path_str(dir)?,
        "--server-name",
        &server.to_string(),
    ])?;
    if out.code != 0 {
        bail!(
            "mxscopectl ca init failed ({}): {}{}",
            out.code,
            out.stdout,
            out.stderr
        );
    }
    Ok(Pki {
        dir: dir.to_path_buf(),
    })
}

/// A collector on the lab's root-namespace address with mTLS.
#[derive(Debug)]
pub struct LabCollector {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl LabCollector {
    /// Starts `mxscope-collector --listen IP:<free port> --tls-cert … --client-ca … --http off`
    /// (unless `extra` names `--http`) with `extra` flags, its db and log in `dir`.
    pub fn start(dir: &Path, ip: Ipv4Addr, pki: &Pki, extra: &[&str]) -> Result<LabCollector> {
        LabCollector::start_with_db(dir, ip, pki, &path_str(&dir.join("mxscope.db"))?, extra)
    }

    /// [`start`](LabCollector::start) on the database `db` (a file or a `postgres://` URL).
    pub fn start_with_db(
        dir: &Path,
        ip: Ipv4Addr,
        pki: &Pki,
        db: &str,
        extra: &[&str],
    ) -> Result<LabCollector> {
        let addr = SocketAddr::from((ip, free_port(ip)?));
        let spec = Spec::new("collector", mxscope_binary(COLLECTOR)?)
            .args([
                "--listen".to_string(),
                addr.to_string(),
                "--db".to_string(),
                db.to_string(),
                "--tls-cert".to_string(),
                path_str(&pki.dir.join("collector.pem"))?,
                "--tls-key".to_string(),
                path_str(&pki.dir.join("collector.key"))?,
                "--client-ca".to_string(),
                path_str(&pki.ca_pem())?,
            ])
            // `--http off` unless the test serves it (`extra` has `--http ADDR`).
            .args(
                (!extra.contains(&"--http"))
                    .then_some(["--http", "off"])
                    .into_iter()
                    .flatten(),
            )
            .args(extra.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let mut proc = Proc::spawn(spec, dir)?;
        proc.wait_listening(addr, Duration::from_secs(30))?;
        Ok(LabCollector { proc, addr })
    }

    /// `https://IP:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Starts the stopped (or killed) collector again with the same flags, on the same address.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.restart()?;
        self.proc.wait_listening(self.addr, Duration::from_secs(30))
    }

    /// Runs `mxscopectl --collector URL <admin identity> ARGS… --format json` and parses stdout.
    pub fn ctl_json(&self, admin: &ClientCert, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["--format", "json"]);
        let out = ctl_as(&self.url(), Some(admin), &all)?;
        if out.code != 0 {
            bail!(
                "mxscopectl {} exited {}: {}{}",
                all.join(" "),
                out.code,
                out.stdout,
                out.stderr
            );
        }
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("parse JSON of mxscopectl {}: {}", all.join(" "), out.stdout))
    }
}

/// What a lab test queries (the collector, as an admin) and prints when a wait runs out (the
/// logs of the collector and of `procs`).
#[derive(Debug)]
pub struct LabQuery<'a> {
    pub collector: &'a LabCollector,
    pub admin: &'a ClientCert,
    pub procs: Vec<&'a Proc>,
    /// How long [`LabQuery::await_json`] waits.
    pub settle: Duration,
}

impl LabQuery<'_> {
    /// `mxscopectl ARGS… --format json`, parsed.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        self.collector.ctl_json(self.admin, args)
    }

    /// Polls `args` until `pick` returns `Some`; on timeout panics with the last answer and logs.
    pub fn await_json<T>(
        &self,
        what: &str,
        args: &[&str],
        mut pick: impl FnMut(&serde_json::Value) -> Option<T>,
    ) -> T {
        let mut last = String::from("(no answer yet)");
        let res = wait_for(what, self.settle, || {
            match self.json(args) {
                Ok(v) => {
                    if let Some(t) = pick(&v) {
                        return Ok(Some(t));
                    }
                    last = serde_json::to_string_pretty(&v).unwrap_or_default();
                }
                Err(e) => last = format!("{e:#}"),
            }
            Ok(None)
        });
        res.unwrap_or_else(|e| panic!("{e}\nlast answer of {args:?}:\n{last}\n{}", self.logs()))
    }

    /// The tails of the collector's and the other processes' logs.
    pub fn logs(&self) -> String {
        let mut s = format!("collector log:\n{}\n", self.collector.proc.log_tail(30));
        for p in &self.procs {
            s += &format!("{} log:\n{}\n", p.name(), p.log_tail(15));
        }
        s
    }
}

/// What an agent in a region runs.
#[derive(Debug, Clone)]
pub struct LabAgentOptions {
    pub id: String,
    pub region: Region,
    pub collector_url: String,
    pub cert: ClientCert,
    /// DNS server for all probes (the lab's nsd).
    pub resolver: SocketAddr,
    /// CA the probes trust for the mail servers' TLS.
    pub probe_ca: PathBuf,
    /// The agent's targets file (TOML).
    pub targets_toml: String,
    /// More flags (e.g. `--per-host 4`).
    pub extra: Vec<String>,
}

/// Starts `mxscope-agent` inside the region's namespace (`ip netns exec`), config, spool and
/// log in `dir`. Stopped by PID when the returned guard drops.
pub fn start_agent(dir: &Path, opts: &LabAgentOptions) -> Result<Proc> {
    let config = dir.join(format!("agent-{}.toml", opts.id));
    write_file(&config, &opts.targets_toml)?;
    let spec = Spec::new(format!("agent-{}", opts.id), mxscope_binary(AGENT)?)
        .in_netns(opts.region.ns.as_str())
        .args([
            "--collector".to_string(),
            opts.collector_url.clone(),
            "--tls-cert".into(),
            path_str(&opts.cert.cert)?,
            "--tls-key".into(),
            path_str(&opts.cert.key)?,
            "--collector-ca".into(),
            path_str(&opts.cert.ca)?,
            "--id".into(),
            opts.id.clone(),
            "--region".into(),
            opts.region.name.clone(),
            "--config".into(),
            path_str(&config)?,
            "--spool".into(),
            path_str(&dir.join(format!("spool-{}", opts.id)))?,
            "--resolver".into(),
            opts.resolver.to_string(),
            "--ca-file".into(),
            path_str(&opts.probe_ca)?,
        ])
        .args(opts.extra.iter().cloned())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    Proc::spawn(spec, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_come_from_lab_env_in_order() {
        let env = parse_env(
            "LAB_PREFIX=mxab12\nLAB_NS_eu_west=mxab12-r1\nLAB_IP_eu_west=198.18.1.2\n\
             LAB_RTT_eu_west=10\nLAB_BLOCK25_eu_west=\nLAB_NS_ap_south=mxab12-r2\n\
             LAB_IP_ap_south=198.18.2.2\nLAB_RTT_ap_south=150\nLAB_BLOCK25_ap_south=yes\n\
             LAB_REGIONS=\"eu-west ap-south\"\n",
        );
        let regions = regions_of(&env).expect("regions");
        assert_eq!(
            regions,
            vec![
                Region {
                    name: "eu-west".into(),
                    ns: "mxab12-r1".into(),
                    ip: Ipv4Addr::new(198, 18, 1, 2),
                    rtt_ms: 10.0,
                    block25: false,
                },
                Region {
                    name: "ap-south".into(),
                    ns: "mxab12-r2".into(),
                    ip: Ipv4Addr::new(198, 18, 2, 2),
                    rtt_ms: 150.0,
                    block25: true,
                },
            ]
        );
    }

    #[test]
    fn a_region_missing_its_rtt_is_an_error() {
        let env =
            parse_env("LAB_REGIONS=\"eu-west\"\nLAB_NS_eu_west=x\nLAB_IP_eu_west=198.18.1.2\n");
        let err = regions_of(&env).expect_err("no rtt");
        assert!(err.to_string().contains("LAB_RTT_eu_west"), "{err}");
    }
}
