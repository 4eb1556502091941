//! Analysis: pure functions over stored rows (no I/O, no clock), so every rule is unit-tested
//! on hand-built rows. Cross-region scope, latency sketches and diagnosis join here later.

pub mod status;

pub use status::{percentile, status_rows, StatusParams};
