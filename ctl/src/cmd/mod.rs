//! The commands, one module each. Those here ask the collector over its Query API (each gets a
//! connected [`Client`](crate::client::Client)); those in [`offline`] work on local files only and
//! never connect.

pub(crate) mod agents;
pub(crate) mod diagnose;
pub(crate) mod latency;
pub(crate) mod matrix;
pub(crate) mod offline;
pub(crate) mod results;
pub(crate) mod revoke;
pub(crate) mod status;
pub(crate) mod target;
pub(crate) mod token;
pub(crate) mod watch;

/// Most pages `status` and `matrix` fetch of an answer the collector cuts (each under 3 MiB).
pub(crate) const MAX_PAGES: usize = 100;
