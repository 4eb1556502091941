//! Pure analysis over stored rows: the status view, latency sketches, per-series hysteresis,
//! cross-region scope with a quorum, agent-fault detection and the layer-by-layer diagnosis. No I/O here.

pub mod cross;
pub mod diagnosis;
pub mod hysteresis;
pub mod scope;
pub mod sketch;
pub mod status;

pub use status::{percentile, status_rows, StatusParams};
