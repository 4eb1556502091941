//! Alerting: the rules (`rules`, from `--alert-rules` or built in) and the state machine of each
//! alert (`state`: pending, firing, resolved; dedupe, repeat, silences). The engine task that
//! evaluates the mail-level verdicts on a tick and hands notices to `notify::Notify` is not built
//! yet (issue #21).

pub mod rules;
pub mod state;
