//! The mxscope agent: runs mail probes on a schedule, appends every result to a durable spool and
//! streams the spool to the collector over one gRPC stream, removing results only once acked.

pub mod config;
pub mod probe;
pub mod schedule;
pub mod spool;
pub mod trust;
pub mod uplink;
