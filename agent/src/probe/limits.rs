//! Per-host politeness: at most N simultaneous connections from this agent to one mail server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Hands out connection permits per host (by IP or name); cheap to clone.
#[derive(Clone, Debug)]
pub struct HostLimits {
    per_host: usize,
    hosts: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl HostLimits {
    pub fn new(per_host: usize) -> Self {
        HostLimits {
            per_host: per_host.max(1),
            hosts: Arc::default(),
        }
    }

    /// Waits for a connection slot to `host`; the slot is freed when the permit drops.
    pub async fn acquire(&self, host: &str) -> OwnedSemaphorePermit {
        let sem = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            // Forget idle hosts now and then so the map stays bounded by the busy ones.
            if hosts.len() > 4096 {
                hosts.retain(|_, s| s.available_permits() < self.per_host);
            }
            hosts
                .entry(host.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_host)))
                .clone()
        };
        sem.acquire_owned()
            .await
            .expect("host semaphore is never closed")
    }

    /// Connections to `host` in use right now (for tests and metrics).
    pub fn in_use(&self, host: &str) -> usize {
        let hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts
            .get(host)
            .map_or(0, |s| self.per_host - s.available_permits())
    }
}
