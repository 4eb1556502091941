//! A DNS failure as every layer sees it: classified once into an [`ErrorClass`] by whoever talks
//! to the resolver (the agent's `Resolve`, ctl's SPF view), then carried typed, never as text.

use crate::ErrorClass;

/// A DNS failure, already classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class} for {name}: {detail}")]
pub struct DnsError {
    pub class: ErrorClass,
    pub name: String,
    pub detail: String,
}
