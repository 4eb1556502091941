//! Polling with a deadline: the only way tests wait for something to become true.
//! A short fixed poll interval, a clear error naming what was awaited when time runs out.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// How often [`wait_until`] re-evaluates its predicate.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Polls `probe` until it returns `Some(value)` or `timeout` passes; `what` names the awaited
/// condition in the error. `probe` returning `Err` aborts the wait at once.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        // The poller itself: a synchronous test thread waiting between checks.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `pred` until it is true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) -> Result<()> {
    wait_for(what, timeout, || Ok(pred().then_some(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_value_once_ready() {
        let mut calls = 0;
        let got = wait_for("third call", Duration::from_secs(5), || {
            calls += 1;
            Ok((calls == 3).then_some(calls))
        })
        .expect("ready on the third call");
        assert_eq!(got, 3);
    }

    #[test]
    fn times_out_with_the_condition_named() {
        let err =
            wait_until("never", Duration::from_millis(250), || false).expect_err("must time out");
        assert!(err.to_string().contains("never"), "{err}");
    }
}
