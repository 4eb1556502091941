//! TCP connect with a deadline, and the one place that maps socket errors to `ErrorClass` (by
//! `io::ErrorKind` and raw OS error, never by message text).

use std::io;
use std::net::SocketAddr;

use mxscope_proto::{ErrorClass, Observation, Outcome, Phase};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Connects to `addr`, giving up at `deadline`; records the `connect` timing on `obs`. On failure the
/// observation is marked failed in phase `connect` and `None` is returned.
pub(crate) async fn connect(
    obs: &mut Observation,
    addr: SocketAddr,
    deadline: Instant,
) -> Option<TcpStream> {
    let started = Instant::now();
    let result = tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await;
    obs.timing(Phase::Connect, started.elapsed());
    match result {
        Ok(Ok(stream)) => {
            // Small request/response dialogues: do not wait to fill segments.
            let _ = stream.set_nodelay(true);
            Some(stream)
        }
        Ok(Err(e)) => {
            let class = classify_io(&e);
            obs.problem(
                Outcome::Fail,
                class,
                Phase::Connect,
                format!("connect to {addr}: {e}"),
            );
            None
        }
        Err(_) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::Timeout,
                Phase::Connect,
                format!(
                    "connect to {addr}: no answer within {:?}",
                    started.elapsed()
                ),
            );
            None
        }
    }
}

/// Classifies a socket error by its kind, falling back to the raw OS error number.
pub(crate) fn classify_io(err: &io::Error) -> ErrorClass {
    use io::ErrorKind as K;
    match err.kind() {
        K::ConnectionRefused => return ErrorClass::Refused,
        K::TimedOut | K::WouldBlock => return ErrorClass::Timeout,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
            return ErrorClass::Reset
        }
        K::HostUnreachable | K::NetworkUnreachable | K::NetworkDown | K::AddrNotAvailable => {
            return ErrorClass::Unreachable
        }
        K::PermissionDenied => return ErrorClass::NotPermitted,
        _ => {}
    }
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => ErrorClass::Refused,
        Some(libc::ETIMEDOUT) => ErrorClass::Timeout,
        Some(libc::ECONNRESET | libc::ECONNABORTED | libc::EPIPE) => ErrorClass::Reset,
        Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::ENETDOWN | libc::EHOSTDOWN) => {
            ErrorClass::Unreachable
        }
        Some(libc::EACCES | libc::EPERM) => ErrorClass::NotPermitted,
        _ => ErrorClass::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_classify_by_kind_and_errno() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(classify_io(&refused), ErrorClass::Refused);
        assert_eq!(
            classify_io(&io::Error::from_raw_os_error(libc::ECONNRESET)),
            ErrorClass::Reset
        );
        assert_eq!(
            classify_io(&io::Error::from_raw_os_error(libc::EHOSTUNREACH)),
            ErrorClass::Unreachable
        );
        assert_eq!(
            classify_io(&io::Error::from_raw_os_error(libc::ETIMEDOUT)),
            ErrorClass::Timeout
        );
        assert_eq!(classify_io(&io::Error::other("x")), ErrorClass::Io);
    }
}
