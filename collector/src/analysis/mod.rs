//! Pure analysis over stored rows: latency sketches, per-series hysteresis, cross-region scope with
//! a quorum, agent-fault detection and the layer-by-layer diagnosis. No I/O here.

pub mod diagnosis;
pub mod hysteresis;
pub mod scope;
pub mod sketch;
