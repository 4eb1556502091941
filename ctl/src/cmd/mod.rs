//! The commands, one module each. Those here ask the collector over its Query API (each gets a
//! connected [`Client`](crate::client::Client)); those in [`offline`] work on local files only and
//! never connect.

pub mod agents;
pub mod diagnose;
pub mod latency;
pub mod matrix;
pub mod offline;
pub mod results;
pub mod status;
pub mod target;
pub mod watch;
