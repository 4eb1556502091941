//! Pure analysis, the bottom layer of the collector: the rows it reads ([`series`]), aggregates and
//! latency sketches, per-series hysteresis, the status view, cross-region scope with a quorum,
//! agent-fault detection and the layer-by-layer diagnosis. No I/O, and no import of `store`.

pub mod aggregate;
pub mod cross;
pub mod diagnosis;
pub mod hysteresis;
pub mod mail;
pub mod roots;
pub mod scope;
pub mod series;
pub mod sketch;
pub mod status;

#[cfg(test)]
mod verdict_tests;

pub use status::{percentile, status_rows, StatusParams};
