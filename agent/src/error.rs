//! The agent's configuration error: what is wrong with a flag, the targets file, the CA file or
//! the credentials file, worded for the operator. At the bottom of the crate so that `trust` and
//! `credentials` (below `probe`) and `config` (above it) share it.

use std::io;

/// A configuration problem; the message is meant for the operator as is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: io::Error,
    },
    /// A problem at a place in the targets file: `targets.toml:7: target[1].checks: ...`.
    #[error("{file}:{line}: {key}{sep}{message}", sep = if key.is_empty() { "" } else { ": " })]
    Target {
        file: String,
        line: usize,
        key: String,
        message: String,
    },
    #[error("--{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("{file}: {message}")]
    CaFile { file: String, message: String },
    #[error("{file}: {message}")]
    Credentials { file: String, message: String },
}

/// An error and its sources joined by ": " (tonic's bare "transport error" says nothing alone).
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = e.source();
    }
    out
}
