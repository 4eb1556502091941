//! The `/metrics` server and its scrapes, over real TCP on 127.0.0.1.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::shared::HttpOptions;
use crate::store::sqlite::SqliteStore;
use crate::store::{AgentHello, Store, StoreOptions};
use mxscope_proto::model::CheckKind;
use mxscope_proto::pb;
use mxscope_proto::time::now_us;

/// How long a test waits for one expected thing.
const DEADLINE: Duration = Duration::from_secs(5);

/// Parses exposition text back: (name, labels, value) per sample line; panics on anything
/// that is not a comment, a sample, or the closing `# EOF`.
fn parse(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    assert!(text.trim_end().ends_with("# EOF"), "no EOF marker: {text}");
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (head, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let (name, labels) = match head.split_once('{') {
            None => (head.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let labels = body
                    .split(',')
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').expect("label k=v");
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .expect("quoted label value");
                        (k.to_string(), v.to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name {name}"
        );
        out.push((name, labels, value));
    }
    out
}

fn result(seq: u64, target: &str, ok: bool, total_us: u64) -> pb::ProbeResult {
    pb::ProbeResult {
        agent_id: "eu1".into(),
        seq,
        target: target.into(),
        endpoint: Some(pb::Endpoint {
            host: format!("mx.{target}"),
            ip: "127.0.0.1".into(),
            port: 25,
            family: pb::AddressFamily::Ipv4 as i32,
        }),
        check: "smtp".into(),
        start_us: now_us() - 1_000_000 + seq as i64,
        outcome: if ok {
            pb::Outcome::Ok
        } else {
            pb::Outcome::Fail
        } as i32,
        error_class: if ok { "" } else { "refused" }.into(),
        message: "connection refused by 127.0.0.1 (free text never becomes a label)".into(),
        timings: vec![pb::PhaseTiming {
            phase: "total".into(),
            micros: total_us,
        }],
        interval_ms: 60_000,
        ..Default::default()
    }
}

async fn fixture(dir: &TempDir) -> SqliteStore {
    let store = SqliteStore::open(&dir.path().join("m.db"), StoreOptions::default()).unwrap();
    store
        .register_agent(AgentHello {
            id: "eu1".into(),
            region: "eu-west".into(),
            version: "t".into(),
            at_us: now_us(),
            ..Default::default()
        })
        .await
        .unwrap();
    for name in ["ok.test", "bad.test"] {
        let def = mxscope_proto::target::validate(&pb::TargetSpec {
            name: name.into(),
            checks: vec!["smtp".into()],
            ..Default::default()
        })
        .unwrap();
        store.put_target(def, false, now_us()).await.unwrap();
    }
    let results = vec![
        result(1, "ok.test", true, 20_000),
        result(2, "ok.test", true, 40_000),
        result(3, "bad.test", false, 5_000),
        result(4, "bad.test", false, 5_000),
        // Not a configured target: must not become a label value.
        result(5, "unlisted.test", true, 1_000),
    ];
    store
        .store_results("eu1", "eu-west", results.clone(), now_us())
        .await
        .unwrap();
    // A resent batch counts as duplicates.
    store
        .store_results("eu1", "eu-west", results, now_us())
        .await
        .unwrap();
    store
}

#[tokio::test]
async fn exposition_parses_back_with_state_latency_agents_and_counters() {
    let dir = TempDir::new().unwrap();
    let store = fixture(&dir).await;
    let text = render(&MetricsState::new(
        Arc::new(store.clone()),
        Duration::from_secs(120),
    ))
    .await
    .unwrap();
    let samples = parse(&text);
    assert!(!samples.is_empty());
    let find = |name: &str, want: &[(&str, &str)]| -> Option<f64> {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.2)
    };
    let key = |t: &'static str| [("target", t), ("check", "smtp"), ("region", "eu-west")];
    assert_eq!(find("mxscope_probe_success", &key("ok.test")), Some(1.0));
    assert_eq!(find("mxscope_probe_success", &key("bad.test")), Some(0.0));
    let quantile = |q: &'static str| {
        let mut l = key("ok.test").to_vec();
        l.push(("quantile", q));
        find("mxscope_probe_duration_seconds", &l)
    };
    // Two values, 20 ms and 40 ms: the lower median is 20 ms (within the sketch's 1%).
    let p50 = quantile("0.5").expect("p50 gauge");
    assert!((p50 - 0.020).abs() <= 0.0002, "{p50}");
    assert!(quantile("0.95").is_some_and(|v| v >= p50 && v <= 0.0404));
    assert_eq!(
        find(
            "mxscope_agent_up",
            &[("agent", "eu1"), ("region", "eu-west")]
        ),
        Some(1.0)
    );
    assert!(find("mxscope_agent_last_seen_seconds", &[("agent", "eu1")]).unwrap() > 1.6e9);
    assert_eq!(find("mxscope_ingest_results_stored_total", &[]), Some(5.0));
    assert_eq!(find("mxscope_ingest_duplicates_total", &[]), Some(5.0));
    assert!(find("mxscope_store_batches_total", &[]).unwrap() >= 2.0);
    assert!(find("mxscope_store_commit_seconds_total", &[]).unwrap() > 0.0);
    assert!(
        !text.contains("unlisted.test"),
        "unconfigured target leaked"
    );
    assert!(!text.contains("refused by"), "free text leaked into labels");
    store.close().await.unwrap();
}

struct Extra;
impl MetricsSource for Extra {
    fn register(&self, registry: &mut Registry) {
        let c = Counter::<u64>::default();
        c.inc_by(3);
        registry.register("mxscope_ingest_rejected", "test hook", c);
    }
}

#[tokio::test]
async fn serves_metrics_over_http_with_hooks_and_stops() {
    let dir = TempDir::new().unwrap();
    let store = fixture(&dir).await;
    let state = MetricsState::new(Arc::new(store.clone()), Duration::from_secs(120))
        .with_source(Arc::new(Extra));
    let (addr, _, stop, server) = start(state, HttpOptions::default(), None).await;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut resp))
        .await
        .expect("answer in time")
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp
        .to_lowercase()
        .contains("content-type: application/openmetrics-text"));
    assert!(resp.contains("mxscope_ingest_rejected_total 3"), "{resp}");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
    store.close().await.unwrap();
}

// ---- the server: timeouts, connection cap, TLS ----

type Started = (
    SocketAddr,
    Arc<HttpCounters>,
    CancellationToken,
    JoinHandle<std::io::Result<()>>,
);

/// A server on 127.0.0.1:0 with `options` (and TLS when `tls` is given).
async fn start(state: MetricsState, options: HttpOptions, tls: Option<TlsAcceptor>) -> Started {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(state, &options, tls);
    let counters = server.counters();
    let stop = CancellationToken::new();
    let task = tokio::spawn(server.serve(listener, stop.clone()));
    (addr, counters, stop, task)
}

async fn stop_server(stop: CancellationToken, task: JoinHandle<std::io::Result<()>>) {
    stop.cancel();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
}

fn state_of(store: &SqliteStore) -> MetricsState {
    MetricsState::new(Arc::new(store.clone()), Duration::from_secs(120))
}

/// A keep-alive request.
const REQUEST: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
const REQUEST_CLOSE: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Reads one response (head and its Content-Length body) off a keep-alive connection.
async fn read_response(io: &mut (impl AsyncRead + Unpin)) -> String {
    let read = async {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let b = io.read_u8().await.expect("response head");
            head.push(b);
        }
        let head = String::from_utf8(head).expect("utf-8 head");
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .expect("content-length");
        let mut body = vec![0; len];
        io.read_exact(&mut body).await.expect("response body");
        head + &String::from_utf8(body).expect("utf-8 body")
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("response in time")
}

/// True when the peer closes the connection (EOF or reset) within `within`; what it sent
/// before is dropped.
async fn closed_within(io: &mut (impl AsyncRead + Unpin), within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let until_closed = async {
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    };
    tokio::time::timeout(within, until_closed).await.is_ok()
}

/// Polls `pred` until it holds; panics naming `what` after [`DEADLINE`].
async fn wait_until(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !pred() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_half_sent_request_line_and_an_idle_keep_alive_are_closed_within_the_header_timeout() {
    let dir = TempDir::new().unwrap();
    let store = fixture(&dir).await;
    let options = HttpOptions {
        header_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let (addr, counters, stop, server) = start(state_of(&store), options, None).await;

    // Slowloris: half a request line, then nothing.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metr").await.unwrap();
    let sent = std::time::Instant::now();
    assert!(
        closed_within(&mut slow, Duration::from_secs(3)).await,
        "a connection that never finishes its request line is still open"
    );
    assert!(
        sent.elapsed() >= Duration::from_millis(250),
        "closed too early"
    );
    assert_eq!(counters.timeouts.load(Ordering::Relaxed), 1);

    // A keep-alive connection is served, then closed once it sends no next request.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(REQUEST).await.unwrap();
    let resp = read_response(&mut idle).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        closed_within(&mut idle, Duration::from_secs(3)).await,
        "an idle keep-alive connection is still open"
    );
    stop_server(stop, server).await;
    store.close().await.unwrap();
}

/// A metric whose help text is this many bytes long: a scrape too large for the socket buffers.
struct Big(usize);
impl MetricsSource for Big {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "mxscope_test_big",
            "x".repeat(self.0),
            Counter::<u64>::default(),
        );
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answer_is_closed_after_the_idle_timeout() {
    const SIZE: usize = 16 << 20;
    let dir = TempDir::new().unwrap();
    let store = fixture(&dir).await;
    let options = HttpOptions {
        idle_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let state = state_of(&store).with_source(Arc::new(Big(SIZE)));
    let (addr, counters, stop, server) = start(state, options, None).await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    conn.write_all(REQUEST_CLOSE).await.unwrap();
    // The client reads nothing: once the buffers are full nothing moves, and the server gives up.
    wait_until("the stalled connection is closed as idle", || {
        counters.timeouts.load(Ordering::Relaxed) == 1
    })
    .await;
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 16];
    let drained = tokio::time::timeout(DEADLINE, async {
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got += n;
        }
    })
    .await;
    assert!(drained.is_ok(), "the connection stayed open");
    assert!(
        got > 0 && got < SIZE,
        "read {got} bytes of a {SIZE}-byte answer"
    );
    stop_server(stop, server).await;
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_connection_beyond_the_cap_is_closed_unanswered_and_counted() {
    let dir = TempDir::new().unwrap();
    let store = fixture(&dir).await;
    let options = HttpOptions {
        max_connections: 2,
        header_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let (addr, counters, stop, server) = start(state_of(&store), options, None).await;

    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(REQUEST).await.unwrap();
        let resp = read_response(&mut c).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        held.push(c);
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    // The server may have closed it already: a failed write is fine too.
    let _ = third.write_all(REQUEST).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, third.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection over the cap was kept open");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(counters.over_cap.load(Ordering::Relaxed), 1);
    // The held ones are still served.
    held[0].write_all(REQUEST).await.unwrap();
    assert!(read_response(&mut held[0])
        .await
        .starts_with("HTTP/1.1 200"));

    // Once one closes, a new connection is served again.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let _ = c.write_all(REQUEST_CLOSE).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, c.read_to_end(&mut answer)).await;
        if answer.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a freed slot is never reused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_server(stop, server).await;
    store.close().await.unwrap();
}

/// The TLS files of a test CA: server certificate for `localhost`, key, CA.
struct TlsSetup {
    ca: mxscope_pki::Ca,
    files: crate::shared::TlsFiles,
    _dir: TempDir,
}

fn tls_setup() -> TlsSetup {
    let dir = TempDir::new().unwrap();
    let ca = mxscope_pki::Ca::create("metrics test CA").unwrap();
    let server = ca
        .issue_server(&["localhost".into()], mxscope_pki::Validity::default())
        .unwrap();
    let files = crate::shared::TlsFiles {
        cert: dir.path().join("metrics.pem"),
        key: dir.path().join("metrics.key"),
        client_ca: dir.path().join("ca.pem"),
    };
    std::fs::write(&files.cert, &server.cert_pem).unwrap();
    mxscope_pki::write_private(&files.key, &server.key_pem).unwrap();
    std::fs::write(&files.client_ca, ca.cert_pem()).unwrap();
    TlsSetup {
        ca,
        files,
        _dir: dir,
    }
}

/// A TLS client trusting `ca_pem`, presenting `client` when given.
fn connector(ca_pem: &str, client: Option<&mxscope_pki::Issued>) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(issued) => {
            let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One scrape over TLS: the answer, or the error of the handshake or the read.
async fn tls_scrape(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> std::io::Result<String> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(REQUEST_CLOSE).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, tls.read_to_end(&mut answer))
        .await
        .map_err(|_| std::io::Error::other("no answer in time"))??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn over_tls_a_reader_certificate_scrapes_and_other_clients_are_refused() {
    let dir = TempDir::new().unwrap();
    let store = fixture(&dir).await;
    let setup = tls_setup();
    let acceptor = tls::acceptor(&setup.files).unwrap();
    let options = HttpOptions {
        header_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let (addr, counters, stop, server) = start(state_of(&store), options, Some(acceptor)).await;
    let ca_pem = setup.ca.cert_pem();
    let validity = mxscope_pki::Validity::default();

    let reader = setup
        .ca
        .issue(
            &mxscope_pki::Identity::Reader {
                name: "prometheus".into(),
            },
            validity,
        )
        .unwrap();
    let answer = tls_scrape(addr, &connector(&ca_pem, Some(&reader)))
        .await
        .expect("a reader certificate scrapes");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("mxscope_probe_success"), "{answer}");

    // No client certificate, and one from another CA: refused at the handshake.
    let stranger = mxscope_pki::Ca::create("another CA")
        .unwrap()
        .issue(
            &mxscope_pki::Identity::Reader {
                name: "prometheus".into(),
            },
            validity,
        )
        .unwrap();
    for (who, client) in [("no certificate", None), ("another CA", Some(&stranger))] {
        let got = tls_scrape(addr, &connector(&ca_pem, client)).await;
        assert!(
            !got.as_deref().is_ok_and(|a| a.contains("HTTP/1.1")),
            "{who}: answered {got:?}"
        );
    }
    wait_until("two refused handshakes counted", || {
        counters.tls_refused.load(Ordering::Relaxed) == 2
    })
    .await;

    // An agent's certificate chains to the CA but may not scrape.
    let agent = setup
        .ca
        .issue(
            &mxscope_pki::Identity::Agent {
                id: "eu1".into(),
                region: "eu-west".into(),
            },
            validity,
        )
        .unwrap();
    let answer = tls_scrape(addr, &connector(&ca_pem, Some(&agent)))
        .await
        .expect("an agent gets an answer");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(!answer.contains("mxscope_probe_success"), "{answer}");
    assert_eq!(counters.forbidden.load(Ordering::Relaxed), 1);

    // A TCP connection that never starts its handshake is dropped after the header timeout.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(3)).await,
        "a connection without a handshake is still open"
    );
    assert_eq!(counters.timeouts.load(Ordering::Relaxed), 1);
    stop_server(stop, server).await;
    store.close().await.unwrap();
}

#[test]
fn bad_tls_files_are_named_in_the_error() {
    let setup = tls_setup();
    let mut files = setup.files.clone();
    files.client_ca = files.key.clone();
    let err = tls::acceptor(&files).err().expect("refused").to_string();
    assert!(
        err.contains("ca.pem") || err.contains("metrics.key"),
        "{err}"
    );
    assert!(err.contains("CA certificate"), "{err}");
    let mut files = setup.files.clone();
    files.cert = setup.files.cert.with_extension("missing");
    let err = tls::acceptor(&files).err().expect("refused").to_string();
    assert!(
        err.contains("metrics.missing") && err.contains("certificate"),
        "{err}"
    );
    // A key others may read is refused.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&setup.files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = tls::acceptor(&setup.files)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn plain_metrics_off_loopback_are_flagged() {
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    assert!(exposed(addr("0.0.0.0:9464"), false));
    assert!(exposed(addr("192.0.2.7:9464"), false));
    assert!(exposed(addr("[::]:9464"), false));
    assert!(!exposed(addr("127.0.0.1:9464"), false));
    assert!(!exposed(addr("[::1]:9464"), false));
    assert!(!exposed(addr("0.0.0.0:9464"), true));
}

// ---- what one scrape reads and says ----

/// A store that counts the reads `render` makes.
#[derive(Debug)]
struct Counting {
    inner: SqliteStore,
    reads: AtomicU64,
}

impl Counting {
    fn read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }
}

impl Store for Counting {
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<pb::WatchEvent> {
        Store::subscribe(&self.inner)
    }
    fn register_agent(&self, hello: AgentHello) -> crate::store::Pending<u64> {
        Store::register_agent(&self.inner, hello)
    }
    fn put_batch(
        &self,
        agent_id: &str,
        region: &str,
        results: &[mxscope_proto::raw::ResultView<'_>],
        raw: Vec<bytes::Bytes>,
        rejected: Vec<u64>,
        at_us: i64,
    ) -> crate::store::Pending<u64> {
        Store::put_batch(&self.inner, agent_id, region, results, raw, rejected, at_us)
    }
    fn heartbeat(
        &self,
        agent_id: &str,
        spool_depth: u64,
        dropped_total: u64,
        at_us: i64,
    ) -> crate::store::Pending<()> {
        Store::heartbeat(&self.inner, agent_id, spool_depth, dropped_total, at_us)
    }
    fn put_target(
        &self,
        target: mxscope_proto::target::Target,
        update: bool,
        at_us: i64,
    ) -> crate::store::Pending<()> {
        Store::put_target(&self.inner, target, update, at_us)
    }
    fn remove_target(&self, name: &str) -> crate::store::Pending<()> {
        Store::remove_target(&self.inner, name)
    }
    fn target_changes(&self) -> tokio::sync::broadcast::Receiver<()> {
        Store::target_changes(&self.inner)
    }
    fn central_targets(&self) -> crate::store::Pending<Vec<mxscope_proto::target::Target>> {
        self.read();
        Store::central_targets(&self.inner)
    }
    fn local_targets(
        &self,
    ) -> crate::store::Pending<Vec<(String, String, mxscope_proto::target::Target)>> {
        self.read();
        Store::local_targets(&self.inner)
    }
    fn agents(&self) -> crate::store::Pending<Vec<crate::store::AgentRow>> {
        self.read();
        Store::agents(&self.inner)
    }
    fn results_per_agent(&self, since_us: i64) -> crate::store::Pending<BTreeMap<String, u64>> {
        self.read();
        Store::results_per_agent(&self.inner, since_us)
    }
    fn series(
        &self,
        filter: crate::store::Filter,
    ) -> crate::store::Pending<Vec<crate::store::SeriesRow>> {
        self.read();
        Store::series(&self.inner, filter)
    }
    fn rollups(
        &self,
        filter: crate::store::Filter,
        since_us: i64,
        now_us: i64,
        phase: Option<String>,
    ) -> crate::store::Pending<BTreeMap<crate::store::SeriesId, crate::analysis::aggregate::Agg>>
    {
        self.read();
        Store::rollups(&self.inner, filter, since_us, now_us, phase)
    }
    fn history(
        &self,
        filter: crate::store::Filter,
        since_us: i64,
        now_us: i64,
        phase: Option<String>,
    ) -> crate::store::Pending<Vec<(i64, crate::store::SeriesId, crate::analysis::aggregate::Agg)>>
    {
        self.read();
        Store::history(&self.inner, filter, since_us, now_us, phase)
    }
    fn changes(
        &self,
        target: &str,
        since_us: i64,
        limit: u32,
    ) -> crate::store::Pending<Vec<pb::WatchEvent>> {
        self.read();
        Store::changes(&self.inner, target, since_us, limit)
    }
    fn status_input(
        &self,
        filter: crate::store::Filter,
        since_us: i64,
    ) -> crate::store::Pending<(Vec<crate::store::SeriesRow>, Vec<crate::store::Sample>)> {
        self.read();
        Store::status_input(&self.inner, filter, since_us)
    }
    fn results(
        &self,
        filter: crate::store::Filter,
        since_us: i64,
        limit: u32,
    ) -> crate::store::Pending<Vec<pb::StoredResult>> {
        self.read();
        Store::results(&self.inner, filter, since_us, limit)
    }
    fn prune(&self, now_us: i64) -> crate::store::Pending<u64> {
        Store::prune(&self.inner, now_us)
    }
    fn prune_batch(&self) -> usize {
        Store::prune_batch(&self.inner)
    }
    fn stats(&self) -> &crate::store::WriterStats {
        Store::stats(&self.inner)
    }
    fn close(&self) -> crate::store::Pending<()> {
        Store::close(&self.inner)
    }
}

#[tokio::test(start_paused = true)]
async fn scrapes_within_the_cache_period_share_one_render() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(Counting {
        inner: fixture(&dir).await,
        reads: AtomicU64::new(0),
    });
    let state = MetricsState::new(store.clone(), Duration::from_secs(120))
        .with_cache_for(Duration::from_secs(5));
    let first = state.scrape().await.unwrap();
    let per_render = store.reads.load(Ordering::Relaxed);
    assert!(per_render > 0);
    // One after another, and side by side: all answered from the one render.
    for _ in 0..3 {
        assert_eq!(state.scrape().await.unwrap(), first);
    }
    let side_by_side = futures::future::join_all((0..4).map(|_| state.scrape())).await;
    assert!(side_by_side.iter().all(|s| s.as_ref().ok() == Some(&first)));
    assert_eq!(store.reads.load(Ordering::Relaxed), per_render);
    // Past the period, the next scrape renders again.
    tokio::time::advance(Duration::from_secs(6)).await;
    state.scrape().await.unwrap();
    assert_eq!(store.reads.load(Ordering::Relaxed), 2 * per_render);
    store.inner.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn concurrent_scrapes_of_an_expired_cache_share_one_render() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(Counting {
        inner: fixture(&dir).await,
        reads: AtomicU64::new(0),
    });
    let state = MetricsState::new(store.clone(), Duration::from_secs(120))
        .with_cache_for(Duration::from_secs(5));
    let answers = futures::future::join_all((0..8).map(|_| state.scrape())).await;
    assert!(answers.iter().all(Result::is_ok));
    let one = store.reads.load(Ordering::Relaxed);
    state.scrape().await.unwrap();
    assert_eq!(store.reads.load(Ordering::Relaxed), one);
    assert!((1..=5).contains(&one), "{one} reads for one render");
    store.inner.close().await.unwrap();
}

/// [`fixture`], plus: agent us1 in us-east with the local target `local.test`, results for it
/// from both regions, a made-up check and an unknown region on a central target.
async fn labels_fixture(dir: &TempDir) -> SqliteStore {
    let store = fixture(dir).await;
    let local = mxscope_proto::target::validate(&pb::TargetSpec {
        name: "local.test".into(),
        checks: vec!["smtp".into()],
        ..Default::default()
    })
    .unwrap();
    store
        .register_agent(AgentHello {
            id: "us1".into(),
            region: "us-east".into(),
            version: "t".into(),
            at_us: now_us(),
            local_targets: vec![local],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut us = result(1, "local.test", true, 1_000);
    us.agent_id = "us1".into();
    store
        .store_results("us1", "us-east", vec![us], now_us())
        .await
        .unwrap();
    let mut made_up = result(10, "ok.test", true, 1_000);
    made_up.check = "made-up-check".into();
    let from_eu = result(11, "local.test", true, 1_000);
    store
        .store_results("eu1", "eu-west", vec![made_up, from_eu], now_us())
        .await
        .unwrap();
    store
        .store_results(
            "eu1",
            "mars",
            vec![result(12, "ok.test", true, 1_000)],
            now_us(),
        )
        .await
        .unwrap();
    store
}

#[tokio::test]
async fn labels_take_only_known_checks_regions_of_agents_and_local_targets_of_their_region() {
    let dir = TempDir::new().unwrap();
    let store = labels_fixture(&dir).await;
    let text = render(&state_of(&store)).await.unwrap();
    let samples = parse(&text);
    let probes: Vec<_> = samples
        .iter()
        .filter(|(n, _, _)| n.starts_with("mxscope_probe_"))
        .collect();
    assert!(!probes.is_empty(), "{text}");
    for (name, l, _) in &probes {
        assert!(l["check"].parse::<CheckKind>().is_ok(), "{name} {l:?}");
        assert!(
            ["eu-west", "us-east"].contains(&l["region"].as_str()),
            "{name} {l:?}"
        );
    }
    assert!(!text.contains("made-up-check"), "{text}");
    assert!(!text.contains("mars"), "{text}");
    let has = |target: &str, region: &str| {
        probes.iter().any(|(n, l, _)| {
            n == "mxscope_probe_success" && l["target"] == target && l["region"] == region
        })
    };
    assert!(has("ok.test", "eu-west"));
    assert!(has("local.test", "us-east"), "{text}");
    assert!(
        !has("local.test", "eu-west"),
        "a local target leaked to another region"
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn the_series_cap_keeps_central_targets_first_and_counts_what_it_left_out() {
    let dir = TempDir::new().unwrap();
    let store = labels_fixture(&dir).await;
    let text = render(&state_of(&store).with_max_series(2)).await.unwrap();
    let samples = parse(&text);
    let targets: BTreeSet<&str> = samples
        .iter()
        .filter(|(n, _, _)| n.starts_with("mxscope_probe_"))
        .map(|(_, l, _)| l["target"].as_str())
        .collect();
    // bad.test < local.test < ok.test by name: the cap must not keep by name alone.
    assert_eq!(targets, BTreeSet::from(["bad.test", "ok.test"]), "{text}");
    let omitted = samples
        .iter()
        .find(|(n, _, _)| n == "mxscope_metrics_series_omitted")
        .map(|s| s.2);
    assert_eq!(omitted, Some(1.0), "{text}");
    store.close().await.unwrap();
}
