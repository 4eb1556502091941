//! The `queue` check, for an agent on the mail host: `postqueue -j` (optionally `-c DIR`) read and
//! summarised: counts per queue, the oldest message's age and top deferral reasons by domain.

pub(crate) mod parse;

use std::process::Stdio;
use std::time::Duration;

use mxscope_proto::{facts, CheckKind, Endpoint, ErrorClass, Observation, Outcome, Phase};
use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;

use self::parse::summarize;
use super::CheckSpec;

/// Most bytes of `postqueue -j` output read; a larger queue is summarised from this much.
const MAX_OUTPUT: u64 = 64 * 1024 * 1024;
/// Deferral groups reported as facts.
const TOP_GROUPS: usize = 5;

/// A count as a fact number.
fn num(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Runs `postqueue -j` and summarises it into one observation.
pub(crate) async fn check(spec: &CheckSpec, start_us: i64, deadline: Instant) -> Observation {
    let mut obs = Observation::new(
        &spec.target,
        Endpoint::host(&spec.target),
        CheckKind::Queue,
        start_us,
    );
    let started = Instant::now();
    let program = spec.options.postqueue.as_deref().unwrap_or("postqueue");
    let mut cmd = tokio::process::Command::new(program);
    if let Some(dir) = &spec.options.postfix_config_dir {
        cmd.arg("-c").arg(dir);
    }
    cmd.arg("-j")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::Io,
                Phase::Total,
                format!("cannot run {program}: {e}"),
            );
            return obs;
        }
    };
    let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        if let Some(s) = stdout.as_mut() {
            s.take(MAX_OUTPUT).read_to_end(&mut out).await?;
        }
        if let Some(s) = stderr.as_mut() {
            s.take(64 * 1024).read_to_end(&mut err).await?;
        }
        let status = child.wait().await?;
        Ok::<_, std::io::Error>((status, out, err))
    };
    let (status, out, err) = match tokio::time::timeout_at(deadline, run).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::Io,
                Phase::Total,
                format!("reading {program} -j: {e}"),
            );
            return obs;
        }
        Err(_) => {
            obs.problem(
                Outcome::Fail,
                ErrorClass::Timeout,
                Phase::Total,
                format!("{program} -j did not finish before the deadline"),
            );
            return obs;
        }
    };
    obs.timing(Phase::Total, started.elapsed());
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        obs.problem(
            Outcome::Fail,
            ErrorClass::Io,
            Phase::Total,
            format!("{program} -j failed ({status}): {}", err.trim()),
        );
        return obs;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let s = summarize(&String::from_utf8_lossy(&out), now);
    obs.fact(facts::queue::MESSAGES, num(s.messages))
        .fact(facts::queue::BYTES, num(s.bytes))
        .fact(facts::queue::ACTIVE, num(s.counts.active))
        .fact(facts::queue::DEFERRED, num(s.counts.deferred))
        .fact(facts::queue::HOLD, num(s.counts.hold))
        .fact(facts::queue::INCOMING, num(s.counts.incoming))
        .fact(facts::queue::MAILDROP, num(s.counts.maildrop))
        .fact(facts::queue::BAD_LINES, s.bad_lines.len());
    if let Some(age) = s.oldest_age {
        obs.fact(facts::queue::OLDEST_AGE_S, num(age.as_secs()));
    }
    if let Some(id) = &s.oldest_queue_id {
        obs.fact(facts::queue::OLDEST_ID, id.as_str());
    }
    obs.fact(facts::queue::DEFERRAL_DOMAINS, s.deferrals.len());
    for (i, g) in s.deferrals.iter().take(TOP_GROUPS).enumerate() {
        obs.fact(
            &facts::queue::deferral(i, facts::queue::field::DOMAIN),
            g.domain.as_str(),
        )
        .fact(
            &facts::queue::deferral(i, facts::queue::field::COUNT),
            num(g.count),
        )
        .fact(
            &facts::queue::deferral(i, facts::queue::field::REASON),
            super::dialogue::truncate(&g.sample_reason, 300),
        );
    }
    if s.counts.deferred > 0 {
        let top = s
            .deferrals
            .first()
            .map(|g| format!(" (most for {}: {})", g.domain, g.sample_reason))
            .unwrap_or_default();
        let old = s.oldest_age.is_some_and(|a| a > Duration::from_secs(3600));
        obs.problem(
            if old { Outcome::Fail } else { Outcome::Warn },
            ErrorClass::Policy,
            Phase::Total,
            format!(
                "{} deferred message(s) in the queue{top}",
                num(s.counts.deferred)
            ),
        );
    }
    obs
}
