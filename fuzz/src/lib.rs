//! Helpers shared by the fuzz targets: how a target turns the fuzzer's bytes into its input.

/// The input as text (invalid UTF-8 replaced, as the agent's line reader decodes it).
pub fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// The input's lines, CRLF or LF, without their endings (as the dialogue line reader returns them).
pub fn lines(text: &str) -> Vec<&str> {
    text.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect()
}

/// Runs a future that never waits (its I/O is in memory) to completion.
pub fn block_on<F: std::future::Future>(work: F) -> F::Output {
    let mut work = std::pin::pin!(work);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match work.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("an in-memory future waited"),
    }
}
