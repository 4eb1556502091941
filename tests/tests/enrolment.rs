//! Token enrolment end to end on the lab: a real collector with `--ca-key` on the lab's root
//! address, agents in the region namespaces joining with `mxscope-agent --enroll TOKEN
//! --state-dir DIR`. Three agents enrol; reused, expired, wrong-region, revoked, other-CA and
//! outside-prefix tokens are refused and store nothing; certificates of one minute are renewed
//! in flight with every result stored exactly once; a revoked agent and a revoked admin
//! certificate are cut off live; a restart needs no token; attempts are rate-limited.
//! Then two collectors on one PostgreSQL database: a token made through B enrols an agent
//! through A and is used up at B, the agent's session works through B, and a revocation made
//! through A cuts it off at B.
//!
//! Needs root, `ip`, `nft` and `/dev/net/tun` (the lab); fails (never skips) without them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mxscope_proto::pb;
use mxscope_tests::binaries::{mxscope_binary, AGENT};
use mxscope_tests::lab::{path_str, write_file};
use mxscope_tests::mxscope::{agent_toml, TargetConfig};
use mxscope_tests::net::free_port;
use mxscope_tests::netlab::{pki_for, require_prerequisites, LabCollector, NetLab, Region};
use mxscope_tests::postgres::Postgres;
use mxscope_tests::process::{Proc, Spec};
use mxscope_tests::tls::{ctl_as, spawn_ctl_as, stored_seqs, ClientCert};
use mxscope_tests::wait::wait_until;
use mxscope_tests::Lab;
use serde_json::Value;

const LOCK_WAIT: Duration = Duration::from_secs(900);
const WAIT: Duration = Duration::from_secs(60);
/// A revocation bites within about a second; the deadline leaves room for a loaded machine.
const REVOKED_WITHIN: Duration = Duration::from_secs(3);

/// What the test holds: the collector, its admin, the closed port agents probe.
struct World {
    dir: PathBuf,
    collector: LabCollector,
    admin: ClientCert,
    closed: u16,
    collector_ip: Ipv4Addr,
}

impl World {
    fn ctl(&self, args: &[&str]) -> mxscope_tests::tls::CtlOutput {
        ctl_as(&self.collector.url(), Some(&self.admin), args).expect("run mxscopectl")
    }

    fn json(&self, args: &[&str]) -> Value {
        self.collector
            .ctl_json(&self.admin, args)
            .unwrap_or_else(|e| {
                panic!(
                    "{e:#}\ncollector log:\n{}",
                    self.collector.proc.log_tail(30)
                )
            })
    }

    /// `token create … --format json`: the token and its id.
    fn token(&self, args: &[&str]) -> (String, String) {
        let mut all = vec!["token", "create"];
        all.extend_from_slice(args);
        let v = self.json(&all);
        (
            v["token"].as_str().expect("token").to_string(),
            v["id"].as_str().expect("id").to_string(),
        )
    }

    /// The token `id` as `token list` shows it.
    fn token_row(&self, id: &str) -> Value {
        let v = self.json(&["token", "list"]);
        v.as_array()
            .and_then(|rows| rows.iter().find(|r| r["id"] == id).cloned())
            .unwrap_or_else(|| panic!("token {id} not listed: {v}"))
    }

    /// An agent in `region` with state in `<dir>/state-NAME`, probing a closed port of the
    /// collector's address every second; `args` are the flags beyond --collector, --state-dir,
    /// --config (e.g. --enroll TOKEN).
    fn agent(&self, name: &str, region: &Region, args: &[&str]) -> Proc {
        let config = self.dir.join(format!("{name}.toml"));
        write_file(
            &config,
            agent_toml(
                &[TargetConfig::new(&self.collector_ip.to_string(), &["smtp"])
                    .interval("1s")
                    .port("smtp", self.closed)],
            ),
        )
        .expect("targets file");
        let spec = Spec::new(name, mxscope_binary(AGENT).expect("agent binary"))
            .in_netns(region.ns.as_str())
            .args([
                "--collector".to_string(),
                self.collector.url(),
                "--state-dir".into(),
                path_str(&self.state(name)).expect("path"),
                "--config".into(),
                path_str(&config).expect("path"),
            ])
            .args(args.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        Proc::spawn(spec, &self.dir).expect("spawn agent")
    }

    fn state(&self, name: &str) -> PathBuf {
        self.dir.join(format!("state-{name}"))
    }

    /// An enrolment that must fail: the agent exits with 2 naming `expect`, and its state
    /// directory holds no key or certificate.
    fn refused(&self, name: &str, region: &Region, args: &[&str], expect: &str) {
        let mut p = self.agent(name, region, args);
        let status = p.wait_exit(Duration::from_secs(30)).unwrap_or_else(|e| {
            panic!(
                "{name}: {e:#} (it should have been refused)\n{}",
                p.log_tail(20)
            )
        });
        let log = p.log();
        assert_eq!(status.code(), Some(2), "{name} exits with 2:\n{log}");
        assert!(log.contains(expect), "{name} says '{expect}':\n{log}");
        for f in ["agent.pem", "agent.key"] {
            assert!(
                !self.state(name).join(f).exists(),
                "{name}: nothing is stored after a refusal, but {f} exists"
            );
        }
    }

    /// Ids of the agents the collector knows.
    fn agents(&self) -> Vec<String> {
        let v = self.json(&["agents"]);
        let mut ids: Vec<String> = v
            .as_array()
            .map(|rows| {
                rows.iter()
                    .filter_map(|r| r["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    fn stored(&self, id: &str) -> Vec<u64> {
        stored_seqs(&self.collector.url(), &self.admin, id).expect("results")
    }

    /// Waits until agent `id` has at least `n` results stored.
    fn wait_stored(&self, id: &str, n: usize) {
        wait_until(&format!("{n} results of {id} stored"), WAIT, || {
            self.stored(id).len() >= n
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\ncollector log:\n{}",
                self.collector.proc.log_tail(30)
            )
        });
    }
}

/// The agent id and serial of the certificate in a state directory, via mxscopectl's parser:
/// `revoke --list` of a scratch list prints "revoked agent ID in REGION (serial HEX, …".
fn cert_of_state(dir: &Path) -> (String, String) {
    let list = dir.join("scratch-revoked");
    let out = mxscope_tests::tls::ctl_output(&[
        "revoke",
        "--list",
        &path_str(&list).unwrap(),
        "--cert",
        &path_str(&dir.join("agent.pem")).unwrap(),
    ])
    .expect("mxscopectl");
    let _ = std::fs::remove_file(&list);
    let text = out.stdout;
    let after = |marker: &str, end: char| {
        let rest = text
            .split(marker)
            .nth(1)
            .unwrap_or_else(|| panic!("no '{marker}' in: {text}"));
        rest.split(end).next().unwrap_or_default().to_string()
    };
    (after("revoked agent ", ' '), after("(serial ", ','))
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// Stored seqs are 1..=n, each once.
fn assert_exactly_once(id: &str, seqs: &[u64]) {
    let n = seqs.len() as u64;
    assert!(n > 0, "{id} stored results");
    let expected: Vec<u64> = (1..=n).collect();
    assert_eq!(
        seqs,
        &expected[..],
        "{id}: every result stored exactly once, none lost (seqs 1..={n})"
    );
}

#[test]
fn agents_join_with_tokens_renew_in_flight_and_are_cut_off_when_revoked() {
    if let Err(e) = require_prerequisites() {
        panic!("the enrolment test cannot run here: {e:#}");
    }
    let lab = Lab::new("enrolment").expect("lab dir");
    let state = lab.subdir("lab-state").expect("state dir");
    let net = NetLab::up(
        &state,
        Path::new(env!("CARGO_BIN_EXE_mxscope-delayline")),
        LOCK_WAIT,
    )
    .expect("lab up");
    let regions = net.regions().to_vec();
    assert_eq!(regions.len(), 3, "three regions: {regions:?}");
    let (eu, us, ap) = (&regions[0], &regions[1], &regions[2]);
    let collector_ip = net.collector_ip().expect("collector ip");
    let dir = lab.subdir("run").expect("run dir");
    let pki = pki_for(&lab.subdir("ca").expect("ca dir"), collector_ip).expect("pki");
    let admin = pki.admin(&dir, "ops", false).expect("admin cert");
    let other_admin = pki.admin(&dir, "night-shift", false).expect("second admin");
    let ca_key = path_str(&pki.dir.join("ca.key")).unwrap();
    // One-minute certificates: renewed about every 20 s (two thirds of their life, counted
    // from a minute before issue).
    let collector = LabCollector::start(
        &dir,
        collector_ip,
        &pki,
        &["--ca-key", &ca_key, "--agent-cert-ttl", "1m"],
    )
    .expect("collector");
    let closed = free_port(collector_ip).expect("closed port");
    let mut w = World {
        dir: dir.clone(),
        collector,
        admin,
        closed,
        collector_ip,
    };

    // --- Three agents join, one command each.
    let (t_eu, _) = w.token(&["--region", &eu.name, "--id", "eu-1"]);
    let (t_us, _) = w.token(&["--region", &us.name, "--id-prefix", "us-", "--uses", "3"]);
    let (t_ap, _) = w.token(&["--region", &ap.name]);
    let mut a_eu = w.agent("a-eu", eu, &["--enroll", &t_eu]);
    let mut a_us = w.agent("a-us", us, &["--enroll", &t_us, "--id", "us-7"]);
    let mut a_ap = w.agent("a-ap", ap, &["--enroll", &t_ap]);
    for (id, p) in [("eu-1", &a_eu), ("us-7", &a_us)] {
        wait_until(&format!("{id} enrolled"), WAIT, || {
            p.log().contains("enrolled with the collector")
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", p.log_tail(20)));
    }
    wait_until("ap enrolled", WAIT, || {
        a_ap.log().contains("enrolled with the collector")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", a_ap.log_tail(20)));
    let (ap_id, _) = cert_of_state(&w.state("a-ap"));
    assert!(
        ap_id.starts_with(&format!("{}-", ap.name)) && ap_id.len() == ap.name.len() + 7,
        "a token without id or prefix gives REGION-<6 hex>: {ap_id}"
    );
    for id in ["eu-1", "us-7", ap_id.as_str()] {
        w.wait_stored(id, 3);
    }
    assert_eq!(w.agents(), {
        let mut v = vec!["eu-1".to_string(), "us-7".to_string(), ap_id.clone()];
        v.sort();
        v
    });
    // The key was made on the agent's host and only its owner may read it.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(w.state("a-eu").join("agent.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "agent.key is 0600");
    let collector_log = w.collector.proc.log();
    assert_eq!(
        count(&collector_log, "agent enrolled"),
        3,
        "one audit line per enrolment:\n{collector_log}"
    );

    // --- Refusals: nothing stored, no use spent.
    w.refused(
        "r-reuse",
        eu,
        &["--enroll", &t_eu],
        "is used up (1 of 1 uses)",
    );
    let (t_short, t_short_id) = w.token(&["--region", &eu.name, "--ttl", "1s"]);
    wait_until(
        "the one-second token expired",
        Duration::from_secs(10),
        || w.token_row(&t_short_id)["state"] == "expired",
    )
    .expect("expired");
    w.refused("r-expired", us, &["--enroll", &t_short], "expired at");
    let (t_region, t_region_id) = w.token(&["--region", &eu.name]);
    w.refused(
        "r-region",
        us,
        &["--enroll", &t_region, "--region", &us.name],
        &format!("is for region '{}'", eu.name),
    );
    assert_eq!(
        w.token_row(&t_region_id)["uses_left"],
        1,
        "a refused attempt spends no use"
    );
    let (t_revoked, t_revoked_id) = w.token(&["--region", &ap.name]);
    let out = w.ctl(&["token", "revoke", &t_revoked_id]);
    assert_eq!(out.code, 0, "token revoke: {}{}", out.stdout, out.stderr);
    w.refused("r-revoked", ap, &["--enroll", &t_revoked], "was revoked");
    w.refused(
        "r-prefix",
        eu,
        &["--enroll", &t_us, "--id", "eu-9"],
        "is outside enrolment token",
    );
    w.refused(
        "r-taken",
        ap,
        &["--enroll", &t_us, "--id", "us-7"],
        "already has a live certificate",
    );
    // A token for another CA: the agent stops before it sends anything.
    let forged = format!("{}{}", &t_region[..t_region.len() - 64], "00".repeat(32));
    let before = count(&w.collector.proc.log(), "enrolment refused");
    w.refused(
        "r-ca",
        us,
        &["--enroll", &forged],
        "does not present the CA of the token",
    );
    assert_eq!(
        count(&w.collector.proc.log(), "enrolment refused"),
        before,
        "a token for another CA is never sent"
    );
    assert_eq!(
        w.agents().len(),
        3,
        "no refused attempt registered an agent"
    );
    assert_eq!(w.token_row(&t_region_id)["state"], "active");
    assert!(
        count(&w.collector.proc.log(), "enrolment refused") >= 6,
        "every refusal is an audit line"
    );

    // --- Attempts are rate-limited per address: a burst from one host gets ResourceExhausted.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let exhausted = rt.block_on(async {
        let ca = std::fs::read(pki.ca_pem()).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca));
        let channel = tonic::transport::Endpoint::from_shared(w.collector.url())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("connect without a client certificate");
        let mut client = pb::enrollment_client::EnrollmentClient::new(channel);
        let mut exhausted = 0;
        for _ in 0..12 {
            let err = client
                .enroll(pb::EnrollRequest {
                    token: "mxs1.nonsense".into(),
                    ..Default::default()
                })
                .await
                .expect_err("a bad token is refused");
            if err.code() == tonic::Code::ResourceExhausted {
                assert!(
                    err.message().contains("too many enrolment attempts"),
                    "{err:?}"
                );
                exhausted += 1;
            } else {
                assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
            }
        }
        exhausted
    });
    assert!(
        exhausted >= 5,
        "a burst of 12 is cut after the first few: {exhausted} refused"
    );

    // --- Renewal in flight: one-minute certificates, renewed over the session.
    let renewed_before = count(&a_eu.log(), "certificate renewed;");
    wait_until(
        "two renewals of every agent",
        Duration::from_secs(90),
        || {
            [&a_eu, &a_us, &a_ap]
                .iter()
                .all(|p| count(&p.log(), "certificate renewed;") >= 2)
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n{}\n{}",
            a_eu.log_tail(20),
            w.collector.proc.log_tail(20)
        )
    });
    assert!(count(&a_eu.log(), "certificate renewed;") > renewed_before);
    let n = w.stored("eu-1").len();
    w.wait_stored("eu-1", n + 3);
    assert!(a_eu.is_running() && a_us.is_running() && a_ap.is_running());

    // --- Revocation, live: an agent by id, an agent by serial, an admin by certificate.
    let t0 = Instant::now();
    let out = w.ctl(&["revoke", "--agent", &ap_id, "--reason", "decommissioned"]);
    assert_eq!(out.code, 0, "revoke --agent: {}{}", out.stdout, out.stderr);
    wait_until("the revoked agent's session closed", REVOKED_WITHIN, || {
        a_ap.log().contains("was revoked")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", a_ap.log_tail(20)));
    eprintln!("agent cut off {:?} after revoke", t0.elapsed());
    // By serial: right after a renewal and the reconnect with the new certificate, so the
    // serial read is the one its open session uses.
    let renewals = count(&a_us.log(), "certificate renewed;");
    wait_until(
        "us-7 renews once more and reconnects",
        Duration::from_secs(60),
        || {
            let log = a_us.log();
            count(&log, "certificate renewed;") > renewals
                && log
                    .rsplit("certificate renewed;")
                    .next()
                    .is_some_and(|after| after.contains("connected to collector"))
        },
    )
    .expect("renewal");
    let (_, serial) = cert_of_state(&w.state("a-us"));
    let out = w.ctl(&["revoke", "--serial", &serial]);
    assert_eq!(out.code, 0, "revoke --serial: {}{}", out.stdout, out.stderr);
    wait_until("us-7's session closed", REVOKED_WITHIN, || {
        a_us.log()
            .contains(&format!("(serial {serial}) was revoked"))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", a_us.log_tail(20)));
    // It cannot renew its way out: its certificate is refused at the next session.
    let frozen_us = w.stored("us-7").len();
    let frozen_ap = w.stored(&ap_id).len();
    let n = w.stored("eu-1").len();
    w.wait_stored("eu-1", n + 3);
    assert_eq!(
        w.stored("us-7").len(),
        frozen_us,
        "nothing more from the revoked serial"
    );
    assert_eq!(
        w.stored(&ap_id).len(),
        frozen_ap,
        "nothing more from the revoked id"
    );
    // An admin's watch stream ends within a second of its certificate's revocation.
    let mut watch = spawn_ctl_as(
        &dir,
        "watch-night-shift",
        &w.collector.url(),
        Some(&other_admin),
        &["watch"],
    )
    .expect("watch");
    assert!(
        wait_until("watch exits", Duration::from_secs(1), || !watch
            .is_running())
        .is_err(),
        "watch runs: {}",
        watch.log()
    );
    let cert = path_str(&other_admin.cert).unwrap();
    let out = w.ctl(&["revoke", "--cert", &cert]);
    assert_eq!(out.code, 0, "revoke --cert: {}{}", out.stdout, out.stderr);
    let status = watch.wait_exit(REVOKED_WITHIN).expect("watch ended");
    assert!(!status.success(), "watch fails when cut off");
    assert!(watch.log().contains("was revoked"), "{}", watch.log());
    let out = ctl_as(&w.collector.url(), Some(&other_admin), &["agents"]).unwrap();
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("is revoked"), "{}", out.stderr);
    drop(watch);
    // Revocations live in the database: a restarted collector still refuses them.
    w.collector
        .proc
        .terminate(Duration::from_secs(20))
        .expect("stop collector");
    w.collector.proc.restart().expect("restart collector");
    let addr = w.collector.addr;
    w.collector
        .proc
        .wait_listening(addr, WAIT)
        .expect("collector back");
    let out = ctl_as(&w.collector.url(), Some(&other_admin), &["agents"]).unwrap();
    assert!(
        out.code != 0 && out.stderr.contains("is revoked"),
        "still revoked after a restart: {}",
        out.stderr
    );

    // --- A restart needs no token; then every result of eu-1 is stored exactly once.
    a_eu.terminate(Duration::from_secs(20)).expect("stop eu-1");
    let mut a_eu = w.agent("a-eu", eu, &[]);
    wait_until("eu-1 back without a token", WAIT, || {
        a_eu.log().contains("connected to collector")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", a_eu.log_tail(20)));
    let n = w.stored("eu-1").len();
    w.wait_stored("eu-1", n + 3);
    let status = a_eu.terminate(Duration::from_secs(20)).expect("stop eu-1");
    assert!(
        status.success(),
        "eu-1 stops cleanly: {}",
        a_eu.log_tail(20)
    );
    assert!(
        a_eu.log().contains("all results acked"),
        "{}",
        a_eu.log_tail(20)
    );
    assert_exactly_once("eu-1", &w.stored("eu-1"));
    drop(a_us);
    drop(a_ap);
}

#[test]
fn two_collectors_on_postgres_share_tokens_certificates_and_revocations() {
    if let Err(e) = require_prerequisites() {
        panic!("the enrolment test cannot run here: {e:#}");
    }
    let lab = Lab::new("enrolment-pg").expect("lab dir");
    let pg = Postgres::start().expect("private postgres cluster");
    let db = pg.create_database("enrol").expect("database");
    let state = lab.subdir("lab-state").expect("state dir");
    let net = NetLab::up(
        &state,
        Path::new(env!("CARGO_BIN_EXE_mxscope-delayline")),
        LOCK_WAIT,
    )
    .expect("lab up");
    let regions = net.regions().to_vec();
    let (eu, us) = (&regions[0], &regions[1]);
    let collector_ip = net.collector_ip().expect("collector ip");
    let dir = lab.subdir("run").expect("run dir");
    let pki = pki_for(&lab.subdir("ca").expect("ca dir"), collector_ip).expect("pki");
    let admin = pki.admin(&dir, "ops", false).expect("admin cert");
    let ca_key = path_str(&pki.dir.join("ca.key")).unwrap();
    let closed = free_port(collector_ip).expect("closed port");
    // Two Worlds on one run directory: an agent's state directory is the same through either.
    let world = |name: &str| World {
        dir: dir.clone(),
        collector: LabCollector::start_with_db(
            &lab.subdir(name).expect("collector dir"),
            collector_ip,
            &pki,
            &db,
            &["--ca-key", &ca_key],
        )
        .unwrap_or_else(|e| panic!("collector {name}: {e:#}")),
        admin: admin.clone(),
        closed,
        collector_ip,
    };
    let (a, b) = (world("collector-a"), world("collector-b"));

    // A token made through B enrols an agent through A; B then sees it used up.
    let (t_eu, t_eu_id) = b.token(&["--region", &eu.name, "--id", "eu-1"]);
    let mut a_eu = a.agent("a-eu", eu, &["--enroll", &t_eu]);
    wait_until("eu-1 enrolled through A", WAIT, || {
        a_eu.log().contains("enrolled with the collector")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", a_eu.log_tail(20)));
    a.wait_stored("eu-1", 3);
    assert_eq!(b.token_row(&t_eu_id)["state"], "used");
    b.refused(
        "r-reuse",
        us,
        &["--enroll", &t_eu],
        "is used up (1 of 1 uses)",
    );

    // The agent, restarted with only B to talk to, needs no token there.
    a_eu.terminate(Duration::from_secs(20)).expect("stop eu-1");
    let b_eu = b.agent("a-eu", eu, &[]);
    wait_until("eu-1 connected to B", WAIT, || {
        b_eu.log().contains("connected to collector")
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", b_eu.log_tail(20)));
    let n = b.stored("eu-1").len();
    b.wait_stored("eu-1", n + 3);

    // Revoked through A, cut off at B (LISTEN/NOTIFY), within the single collector's bound.
    let t0 = Instant::now();
    let out = a.ctl(&["revoke", "--agent", "eu-1", "--reason", "decommissioned"]);
    assert_eq!(out.code, 0, "revoke --agent: {}{}", out.stdout, out.stderr);
    wait_until("eu-1's session at B closed", REVOKED_WITHIN, || {
        b_eu.log().contains("was revoked")
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n{}\ncollector B:\n{}",
            b_eu.log_tail(20),
            b.collector.proc.log_tail(20)
        )
    });
    eprintln!("agent cut off at B {:?} after revoke at A", t0.elapsed());
    assert!(
        b.collector
            .proc
            .log()
            .contains("revocations made on another collector enforced"),
        "{}",
        b.collector.proc.log_tail(20)
    );
    drop(b_eu);
}
