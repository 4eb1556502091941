//! The collector's integration tests in one binary (one link): the collector's `run` in-process
//! on loopback, driven through gRPC as agents and operators drive it.

mod analysis;
mod session;
mod support;
