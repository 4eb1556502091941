//! The agent's configuration: command-line flags (each also from `MXSCOPE_*`, flags win), the
//! validated agent settings, and targets (the TOML file, or central ones from the collector).
//! Errors name the file, the line and the key; nothing here touches the network.

mod agent;
mod flags;
mod targets;
#[cfg(test)]
mod tests;

pub use agent::{system_host_name, AgentConfig, DEFAULT_SPOOL_MAX};
pub use flags::{log_filter, parse_bytes, Flags, LogFormat};
pub use targets::{load_targets, parse_targets, Target};

pub use crate::error::ConfigError;
