//! Fake mail servers for probe tests (tokio listeners on 127.0.0.1:0) and rcgen certificates.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::probe::dialogue::Io;

/// Lines the fake server received (and `<tls>` where it switched to TLS).
pub(crate) type Log = Arc<Mutex<Vec<String>>>;

pub(crate) fn log_lines(log: &Log) -> Vec<String> {
    log.lock().expect("log lock").clone()
}

/// Binds 127.0.0.1:0 and hands the first connection to `serve`; returns the port.
pub(crate) async fn serve<F, Fut>(serve: F) -> u16
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let port = listener.local_addr().expect("local addr").port();
    tokio::spawn(async move {
        if let Ok((stream, _)) = listener.accept().await {
            serve(stream).await;
        }
    });
    port
}

/// A test CA and leaf certificates it (or a stranger) signs.
pub(crate) struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A server certificate chain and key, ready for rustls.
pub(crate) struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Vec<u8>,
}

/// Seconds since the Unix epoch, `days` from now (negative = past).
fn unix_in_days(days: i64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(now.as_secs() as i64 + days * 86_400).expect("after 1970")
}

/// When a leaf is valid.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Validity {
    /// From a year ago for this many days from now (plus an hour, so the day count is exact).
    DaysLeft(i64),
    /// 2020-01-01 to 2021-01-01.
    Expired,
}

impl Pki {
    pub(crate) fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca_key = KeyPair::generate().expect("ca key");
        let ca = params.self_signed(&ca_key).expect("ca cert");
        Pki { ca, ca_key }
    }

    /// Roots that trust this CA.
    pub(crate) fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("add test ca");
        roots
    }

    /// A leaf for `name` signed by this CA.
    pub(crate) fn leaf(&self, name: &str, validity: Validity) -> Leaf {
        let mut params = CertificateParams::new(vec![name.to_string()]).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        match validity {
            Validity::DaysLeft(days) => {
                params.not_before = epoch + Duration::from_secs(unix_in_days(-365));
                params.not_after = epoch + Duration::from_secs(unix_in_days(days) + 3600);
            }
            Validity::Expired => {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign leaf");
        Leaf {
            chain: vec![cert.der().clone(), self.ca.der().clone()],
            key: key.serialize_der(),
        }
    }
}

impl Leaf {
    pub(crate) fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)
            .expect("server cert");
        Arc::new(config)
    }
}

/// The server side of a line dialogue, with a log of what the client sent.
pub(crate) struct Peer {
    io: BufReader<Box<dyn Io>>,
    log: Log,
}

impl Peer {
    pub(crate) fn new(io: Box<dyn Io>, log: Log) -> Self {
        Peer {
            io: BufReader::new(io),
            log,
        }
    }

    /// The next client line (without CRLF), logged; `None` at EOF or error.
    pub(crate) async fn line(&mut self) -> Option<String> {
        let mut buf = String::new();
        match self.io.read_line(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                let line = buf.trim_end_matches(['\r', '\n']).to_string();
                self.log.lock().expect("log lock").push(line.clone());
                Some(line)
            }
        }
    }

    pub(crate) async fn send(&mut self, text: &str) -> bool {
        let io = self.io.get_mut();
        io.write_all(text.as_bytes()).await.is_ok() && io.flush().await.is_ok()
    }

    /// Switches to TLS as the server.
    pub(crate) async fn accept_tls(self, config: Arc<rustls::ServerConfig>) -> Option<Peer> {
        let Peer { io, log } = self;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let tls = acceptor.accept(io.into_inner()).await.ok()?;
        log.lock().expect("log lock").push("<tls>".to_string());
        Some(Peer::new(Box::new(tls), log))
    }
}

/// What a fake SMTP server does.
#[derive(Clone, Default)]
pub(crate) struct SmtpScript {
    /// Raw greeting; default `220 fake ESMTP\r\n`.
    pub banner: Option<String>,
    /// EHLO keyword lines (STARTTLS is added when `tls` is set and the session is plain).
    pub extensions: Vec<String>,
    /// Certificate for STARTTLS (or implicit TLS).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS before the greeting (smtps).
    pub implicit: bool,
    /// Raw reply to EHLO instead of the normal one; a 421 closes the session.
    pub ehlo_reply: Option<String>,
    /// Raw reply to RCPT; default `250 2.1.5 Ok`.
    pub rcpt_reply: Option<String>,
    /// Accept AUTH (any credentials) and DATA, like a submission server; otherwise both are
    /// unknown commands.
    pub accept_mail: bool,
}

/// Starts a fake SMTP server; returns its port and the log of client lines.
pub(crate) async fn smtp_server(script: SmtpScript) -> (u16, Log) {
    let log = Log::default();
    let server_log = log.clone();
    let port = serve(move |stream| async move {
        let mut peer = Peer::new(Box::new(stream), server_log);
        if script.implicit {
            let Some(tls) = script.tls.clone() else {
                return;
            };
            let Some(p) = peer.accept_tls(tls).await else {
                return;
            };
            peer = p;
        }
        let mut in_tls = script.implicit;
        let banner = script
            .banner
            .clone()
            .unwrap_or_else(|| "220 fake ESMTP\r\n".to_string());
        if !peer.send(&banner).await {
            return;
        }
        while let Some(line) = peer.line().await {
            let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
            let reply = match verb.as_str() {
                "EHLO" => {
                    if let Some(r) = &script.ehlo_reply {
                        peer.send(r).await;
                        if r.starts_with("421") {
                            return;
                        }
                        continue;
                    }
                    let mut ext = script.extensions.clone();
                    if script.tls.is_some() && !in_tls {
                        ext.push("STARTTLS".to_string());
                    }
                    let mut reply = String::from(if ext.is_empty() { "250 " } else { "250-" });
                    reply.push_str("fake.example.test hello\r\n");
                    for (i, e) in ext.iter().enumerate() {
                        let sep = if i + 1 == ext.len() { ' ' } else { '-' };
                        reply.push_str(&format!("250{sep}{e}\r\n"));
                    }
                    reply
                }
                "STARTTLS" => {
                    let Some(tls) = script.tls.clone() else {
                        peer.send("502 5.5.1 not here\r\n").await;
                        continue;
                    };
                    peer.send("220 2.0.0 ready\r\n").await;
                    let Some(p) = peer.accept_tls(tls).await else {
                        return;
                    };
                    peer = p;
                    in_tls = true;
                    continue;
                }
                "AUTH" if script.accept_mail => "235 2.7.0 Authentication successful\r\n".into(),
                "DATA" if script.accept_mail => {
                    peer.send("354 End data with <CR><LF>.<CR><LF>\r\n").await;
                    while let Some(l) = peer.line().await {
                        if l == "." {
                            break;
                        }
                    }
                    "250 2.0.0 Ok: queued\r\n".to_string()
                }
                "MAIL" => "250 2.1.0 Ok\r\n".to_string(),
                "RCPT" => script
                    .rcpt_reply
                    .clone()
                    .unwrap_or_else(|| "250 2.1.5 Ok\r\n".to_string()),
                "QUIT" => {
                    peer.send("221 2.0.0 Bye\r\n").await;
                    return;
                }
                _ => "502 5.5.2 unknown command\r\n".to_string(),
            };
            if !peer.send(&reply).await {
                return;
            }
        }
    })
    .await;
    (port, log)
}

/// Starts a fake IMAP server (STARTTLS when `tls` is set; TLS first when `implicit`).
pub(crate) async fn imap_server(
    greeting: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
    implicit: bool,
) -> (u16, Log) {
    let log = Log::default();
    let server_log = log.clone();
    let greeting = greeting.to_string();
    let port = serve(move |stream| async move {
        let mut peer = Peer::new(Box::new(stream), server_log);
        if implicit {
            let Some(cfg) = tls.clone() else { return };
            let Some(p) = peer.accept_tls(cfg).await else {
                return;
            };
            peer = p;
        }
        let mut in_tls = implicit;
        if !peer.send(&greeting).await || greeting.starts_with("* BYE") {
            return;
        }
        while let Some(line) = peer.line().await {
            let mut words = line.split(' ');
            let tag = words.next().unwrap_or("").to_string();
            let cmd = words.next().unwrap_or("").to_ascii_uppercase();
            match cmd.as_str() {
                "CAPABILITY" => {
                    let caps = if in_tls {
                        "IMAP4rev1 IMAP4rev2 AUTH=PLAIN"
                    } else if tls.is_some() {
                        "IMAP4rev1 STARTTLS LOGINDISABLED"
                    } else {
                        "IMAP4rev1 AUTH=PLAIN"
                    };
                    peer.send(&format!("* CAPABILITY {caps}\r\n{tag} OK done\r\n"))
                        .await;
                }
                "STARTTLS" => {
                    let Some(cfg) = tls.clone() else { return };
                    peer.send(&format!("{tag} OK begin TLS\r\n")).await;
                    let Some(p) = peer.accept_tls(cfg).await else {
                        return;
                    };
                    peer = p;
                    in_tls = true;
                }
                "LOGOUT" => {
                    peer.send(&format!("* BYE logging out\r\n{tag} OK bye\r\n"))
                        .await;
                    return;
                }
                _ => {
                    peer.send(&format!("{tag} BAD unknown\r\n")).await;
                }
            }
        }
    })
    .await;
    (port, log)
}

/// Starts a fake POP3 server (STLS when `tls` is set; TLS first when `implicit`).
pub(crate) async fn pop3_server(
    greeting: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
    implicit: bool,
) -> (u16, Log) {
    let log = Log::default();
    let server_log = log.clone();
    let greeting = greeting.to_string();
    let port = serve(move |stream| async move {
        let mut peer = Peer::new(Box::new(stream), server_log);
        if implicit {
            let Some(cfg) = tls.clone() else { return };
            let Some(p) = peer.accept_tls(cfg).await else {
                return;
            };
            peer = p;
        }
        let mut in_tls = implicit;
        if !peer.send(&greeting).await || greeting.starts_with("-ERR") {
            return;
        }
        while let Some(line) = peer.line().await {
            match line.to_ascii_uppercase().as_str() {
                "CAPA" => {
                    let stls = if tls.is_some() && !in_tls {
                        "STLS\r\n"
                    } else {
                        ""
                    };
                    let user = if in_tls { "USER\r\nSASL PLAIN\r\n" } else { "" };
                    peer.send(&format!(
                        "+OK list\r\nTOP\r\n{stls}{user}PIPELINING\r\n.\r\n"
                    ))
                    .await;
                }
                "STLS" => {
                    let Some(cfg) = tls.clone() else { return };
                    peer.send("+OK begin TLS\r\n").await;
                    let Some(p) = peer.accept_tls(cfg).await else {
                        return;
                    };
                    peer = p;
                    in_tls = true;
                }
                "QUIT" => {
                    peer.send("+OK bye\r\n").await;
                    return;
                }
                _ => {
                    peer.send("-ERR unknown\r\n").await;
                }
            }
        }
    })
    .await;
    (port, log)
}
