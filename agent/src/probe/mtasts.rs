//! The `mta-sts` check (RFC 8461): the `_mta-sts` TXT record, the policy fetched over HTTPS from
//! `mta-sts.<domain>` (our resolver, probe TLS roots, HTTP 200 only, no redirects, 64 KiB at most)
//! and its `mx` patterns against the domain's MX set.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use mxscope_proto::{
    facts, CheckKind, Endpoint, ErrorClass, FactValue, Observation, Outcome, Phase,
};
use tokio::time::Instant;

use super::endpoints::bounded;
use super::policy::mtasts::{self as policy, Mode};
use super::records::txt_or_empty;
use super::{observe, tcp, tls, CheckSpec, ProbeContext, Target, CONNECT_TIMEOUT};

/// Largest policy body read (RFC 8461 §3.3 lets senders stop at 64 KiB).
pub(crate) const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Where the policy lives on the policy host.
pub(crate) const POLICY_PATH: &str = "/.well-known/mta-sts.txt";
/// A `max_age` below this is reported: senders would refetch the policy all the time.
const SHORT_MAX_AGE: u32 = 86_400;

/// Runs the `mta-sts` check; one observation.
pub(crate) async fn check(
    spec: &CheckSpec,
    ctx: &ProbeContext,
    start_us: i64,
    deadline: Instant,
) -> Observation {
    observe(spec, CheckKind::MtaSts, start_us, deadline, async |obs| {
        run(spec, ctx, deadline, obs).await
    })
    .await
}

async fn run(spec: &CheckSpec, ctx: &ProbeContext, deadline: Instant, obs: &mut Observation) {
    let resolver = ctx.resolver.as_ref();
    let domain = spec.target.trim_end_matches('.');
    let started = Instant::now();
    let name = format!("_mta-sts.{domain}");
    let txt = txt_or_empty(resolver, &name, deadline).await;
    let mx = bounded(domain, deadline, resolver.mx(domain)).await;
    obs.timing(Phase::Resolve, started.elapsed());
    let txt = match txt {
        Ok(t) => t,
        Err(e) => {
            obs.problem(
                Outcome::Fail,
                e.class,
                Phase::Resolve,
                format!("MTA-STS record lookup: {e}"),
            );
            return;
        }
    };
    let record = match policy::select_record(&txt) {
        Ok(r) => r,
        Err(e) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::Policy,
                Phase::Resolve,
                format!("{name}: {e}"),
            );
            return;
        }
    };
    obs.fact(facts::mta_sts::ID, record.id.as_str());
    let mx_hosts: Vec<String> = match mx {
        Ok(a) => a
            .records
            .into_iter()
            .map(|r| r.exchange)
            .filter(|h| !h.is_empty() && h != ".")
            .collect(),
        // RFC 5321 §5.1: without MX the domain itself receives mail.
        Err(e) if e.class == ErrorClass::DnsNodata => vec![domain.to_string()],
        Err(e) => {
            obs.problem(
                Outcome::Fail,
                e.class,
                Phase::Resolve,
                format!("MX lookup for {domain}: {e}"),
            );
            return;
        }
    };
    obs.fact(facts::mta_sts::MX_HOSTS, mx_hosts.join(","));

    let host = format!("mta-sts.{domain}");
    let Some(body) = fetch(spec, ctx, &host, deadline, obs).await else {
        return;
    };
    let parsed = match policy::parse_policy(&body) {
        Ok(p) => p,
        Err(e) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::Policy,
                Phase::Total,
                format!("MTA-STS policy of {domain} does not parse: {e}"),
            );
            return;
        }
    };
    let mode = match parsed.mode {
        Mode::Enforce => "enforce",
        Mode::Testing => "testing",
        Mode::None => "none",
    };
    obs.fact(facts::mta_sts::MODE, mode)
        .fact(facts::mta_sts::MAX_AGE, parsed.max_age)
        .fact(facts::mta_sts::MX, parsed.mx.join(","));
    let uncovered = policy::check_mx_set(&parsed, &mx_hosts);
    obs.fact(facts::mta_sts::MX_UNCOVERED, uncovered.join(","));
    if !uncovered.is_empty() && parsed.mode != Mode::None {
        let outcome = if parsed.mode == Mode::Enforce {
            Outcome::Fail
        } else {
            Outcome::Warn
        };
        obs.problem(
            outcome,
            ErrorClass::Policy,
            Phase::Total,
            format!(
                "MX host {} of {domain} not listed in its MTA-STS policy (mode {mode}): senders \
                 that enforce the policy will not deliver there",
                uncovered.join(", ")
            ),
        );
    }
    if parsed.max_age < SHORT_MAX_AGE {
        obs.problem(
            Outcome::Warn,
            ErrorClass::Policy,
            Phase::Total,
            format!(
                "MTA-STS max_age of {domain} is {}s, under a day",
                parsed.max_age
            ),
        );
    }
}

/// GETs the policy from `host` over HTTPS: address from our resolver, certificate checked strictly
/// against the probe roots, one request, HTTP 200 only. `None` when anything failed (recorded).
async fn fetch(
    spec: &CheckSpec,
    ctx: &ProbeContext,
    host: &str,
    deadline: Instant,
    obs: &mut Observation,
) -> Option<String> {
    let started = Instant::now();
    let ips = bounded(host, deadline, ctx.resolver.ips(host)).await;
    obs.fact(
        facts::mta_sts::POLICY_RESOLVE_US,
        super::fact_us(started.elapsed()),
    );
    let ip = match ips.map(|a| a.records.first().copied()) {
        Ok(Some(ip)) => ip,
        Ok(None) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::DnsNodata,
                Phase::Resolve,
                format!("policy host {host} has no address"),
            );
            return None;
        }
        Err(e) => {
            obs.problem(
                Outcome::Fail,
                e.class,
                Phase::Resolve,
                format!("policy host {host}: {e}"),
            );
            return None;
        }
    };
    let port = spec.options.mta_sts_port;
    let addr = SocketAddr::new(ip, port);
    obs.endpoint = Endpoint {
        host: host.to_string(),
        ip: Some(ip),
        port,
    };
    // The policy host's certificate must be valid (RFC 8461 §3.3): judged strictly.
    let https = CheckSpec {
        require_tls: true,
        port: Some(port),
        ..spec.clone()
    };
    let t = Target {
        spec: &https,
        ctx,
        host,
        addr,
        deadline,
        peer_chain: None,
    };
    let stream = tcp::connect(obs, addr, t.phase_deadline(CONNECT_TIMEOUT)).await?;
    let io = tls::handshake(Box::new(stream), &t, obs).await?;
    if obs.outcome == Outcome::Fail {
        // An untrusted, expired or misnamed certificate: the policy must not be used.
        return None;
    }
    let authority = if port == 443 {
        host.to_string()
    } else {
        format!("{host}:{port}")
    };
    match tokio::time::timeout_at(deadline, get(io, &authority)).await {
        Ok(Ok(response)) => accept(obs, host, response),
        Ok(Err(e)) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::Protocol,
                Phase::Total,
                e.to_string(),
            );
            None
        }
        Err(_) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::Timeout,
                Phase::Total,
                format!("no complete policy from {host} before the deadline"),
            );
            None
        }
    }
}

/// What the policy host answered.
#[derive(Debug)]
struct Response {
    status: u16,
    location: Option<String>,
    content_type: Option<String>,
    /// `Err` when the body was longer than [`MAX_POLICY_BYTES`] or broke off.
    body: Result<Bytes, BodyError>,
}

/// Why the GET of the policy got no response.
#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("http handshake: {0}")]
    Handshake(#[source] hyper::Error),
    /// The request could not be built (a bad `Host` value).
    #[error("http request: {0}")]
    Build(#[source] hyper::http::Error),
    #[error("http request: {0}")]
    Send(#[source] hyper::Error),
}

/// Why the policy body was not read in full.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("policy is larger than {} KiB", MAX_POLICY_BYTES / 1024)]
    TooLarge,
    #[error("policy body: {0}")]
    Broken(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One HTTP/1.1 GET of the policy path over `io` (hyper drives the connection).
async fn get(io: Box<dyn super::dialogue::Io>, authority: &str) -> Result<Response, HttpError> {
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(HttpError::Handshake)?;
    let driver = tokio::spawn(conn);
    let request = hyper::Request::get(POLICY_PATH)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "mxscope-agent")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(HttpError::Build)?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(HttpError::Send)?;
        let header = |name: hyper::header::HeaderName| {
            response
                .headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let status = response.status().as_u16();
        let location = header(hyper::header::LOCATION);
        let content_type = header(hyper::header::CONTENT_TYPE);
        let body = match Limited::new(response.into_body(), MAX_POLICY_BYTES)
            .collect()
            .await
        {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
            Err(e) => Err(BodyError::Broken(e)),
        };
        Ok(Response {
            status,
            location,
            content_type,
            body,
        })
    }
    .await;
    driver.abort();
    result
}

/// Judges the response: only a 200 with a small UTF-8 body is a policy.
fn accept(obs: &mut Observation, host: &str, r: Response) -> Option<String> {
    obs.fact(facts::mta_sts::HTTP_STATUS, r.status);
    if let Some(ct) = &r.content_type {
        obs.fact(facts::mta_sts::CONTENT_TYPE, ct.as_str());
    }
    if (300..400).contains(&r.status) {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Total,
            format!(
                "https://{host}{POLICY_PATH} answered HTTP {} (redirect to {}): RFC 8461 §3.3 \
                 forbids following redirects",
                r.status,
                r.location.as_deref().unwrap_or("nowhere")
            ),
        );
        return None;
    }
    if r.status != 200 {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Total,
            format!("https://{host}{POLICY_PATH} answered HTTP {}", r.status),
        );
        return None;
    }
    let body = match r.body {
        Ok(b) => b,
        Err(e) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::Policy,
                Phase::Total,
                format!("https://{host}{POLICY_PATH}: {e}"),
            );
            return None;
        }
    };
    obs.fact(facts::mta_sts::POLICY_BYTES, FactValue::from(body.len()));
    let Ok(text) = String::from_utf8(body.to_vec()) else {
        obs.problem(
            Outcome::Fail,
            ErrorClass::Policy,
            Phase::Total,
            format!("https://{host}{POLICY_PATH}: policy is not UTF-8 text"),
        );
        return None;
    };
    let plain = r.content_type.as_deref().is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/plain"))
    });
    if !plain {
        obs.problem(
            Outcome::Warn,
            ErrorClass::Policy,
            Phase::Total,
            format!(
                "https://{host}{POLICY_PATH} is served as {}, not text/plain",
                r.content_type.as_deref().unwrap_or("no content type")
            ),
        );
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const HOST: &str = "mta-sts.example.test";

    /// Answers one request on the far end of an in-memory pipe with `head` and then `body`.
    fn policy_host(head: String, body: String) -> Box<dyn super::super::dialogue::Io> {
        let (client, mut server) = tokio::io::duplex(16 * 1024);
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match server.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            // the client stops reading once the body is over the limit: write errors are expected
            let _ = server.write_all(head.as_bytes()).await;
            let _ = server.write_all(body.as_bytes()).await;
        });
        Box::new(client)
    }

    #[tokio::test]
    async fn an_oversized_policy_is_refused_with_the_limit_in_the_message() {
        let body = "x".repeat(MAX_POLICY_BYTES + 1);
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let response = get(policy_host(head, body), HOST)
            .await
            .expect("a response");
        assert_eq!(response.status, 200);
        assert!(
            matches!(response.body, Err(BodyError::TooLarge)),
            "{:?}",
            response.body
        );
        let mut obs = Observation::new(HOST, Endpoint::host(HOST), CheckKind::MtaSts, 0);
        assert!(accept(&mut obs, HOST, response).is_none());
        assert_eq!(obs.outcome, Outcome::Fail);
        assert_eq!(obs.error_class, Some(ErrorClass::Policy));
        assert_eq!(
            obs.message,
            "https://mta-sts.example.test/.well-known/mta-sts.txt: policy is larger than 64 KiB"
        );
    }

    #[tokio::test]
    async fn a_host_that_hangs_up_is_an_http_request_error() {
        let (client, server) = tokio::io::duplex(1024);
        drop(server);
        let e = get(Box::new(client), HOST).await.expect_err("no response");
        assert!(matches!(e, HttpError::Send(_)), "{e:?}");
        assert!(e.to_string().starts_with("http request: "), "{e}");
    }

    #[tokio::test]
    async fn a_small_policy_is_read_whole() {
        let body = "version: STSv1\r\nmode: enforce\r\nmx: mx.example.test\r\nmax_age: 86400\r\n";
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let response = get(policy_host(head, body.to_string()), HOST)
            .await
            .expect("a response");
        let mut obs = Observation::new(HOST, Endpoint::host(HOST), CheckKind::MtaSts, 0);
        assert_eq!(accept(&mut obs, HOST, response).as_deref(), Some(body));
        assert_eq!(obs.outcome, Outcome::Ok, "{}", obs.message);
    }
}
