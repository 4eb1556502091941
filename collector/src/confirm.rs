//! Confirmation probes: when a (target, check) turns failing in some regions, the alert engine
//! asks the connected agents of the other regions to probe it at once, out of schedule, and
//! decides on their answers (which arrive as ordinary results).

/// Asks agents for an immediate probe. Bounded and rate-limited by the implementation.
pub trait Confirm: Send + Sync + std::fmt::Debug {
    /// Asks connected agents of regions not in `failing` to probe `check` of `target` now.
    /// Returns the (agent id, region) pairs asked; empty when nobody can be asked (no other
    /// region connected, or the request was rate-limited). Their results carry the fact
    /// `probe.requested` and arrive through the normal ingest path.
    fn request(&self, target: &str, check: &str, failing: &[String]) -> Vec<(String, String)>;
}
