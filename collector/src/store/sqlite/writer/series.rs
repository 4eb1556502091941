//! The series directory: series identity to id, shared with the ingest tasks, and the writer's
//! in-memory state of each series (hysteresis, latest result).

use std::hash::Hasher;

use super::*;

/// Identity of a series: (target, endpoint, check, region).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SeriesKey {
    pub target: String,
    pub endpoint: String,
    pub check: String,
    pub region: String,
}

/// What a result names of its series, borrowed from the result: the batch's region, target,
/// check and the endpoint's host, ip and port. The directory's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Ident<'a> {
    pub(crate) region: &'a str,
    pub(crate) target: &'a str,
    pub(crate) check: &'a str,
    pub(crate) host: &'a str,
    pub(crate) ip: &'a str,
    pub(crate) port: u32,
}

/// An [`Ident`] the directory keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OwnedIdent {
    region: Box<str>,
    target: Box<str>,
    check: Box<str>,
    host: Box<str>,
    ip: Box<str>,
    port: u32,
}

impl Ident<'_> {
    pub(super) fn to_owned_ident(self) -> OwnedIdent {
        OwnedIdent {
            region: self.region.into(),
            target: self.target.into(),
            check: self.check.into(),
            host: self.host.into(),
            ip: self.ip.into(),
            port: self.port,
        }
    }

    /// The ident of a series the writer resolves by key.
    pub(super) fn of<'a>(key: &'a SeriesKey, parts: &'a EndpointParts) -> Ident<'a> {
        Ident {
            region: &key.region,
            target: &key.target,
            check: &key.check,
            host: &parts.host,
            ip: &parts.ip,
            port: u32::try_from(parts.port).unwrap_or(0),
        }
    }
}

impl OwnedIdent {
    pub(super) fn borrow(&self) -> Ident<'_> {
        Ident {
            region: &self.region,
            target: &self.target,
            check: &self.check,
            host: &self.host,
            ip: &self.ip,
            port: self.port,
        }
    }
}

/// Series ids by [`Ident`], shared by the writer, which adds the series of each commit, and the
/// ingest tasks, which look ids up (by borrowed names: no allocation) so that a batch of known
/// series carries no keys. Series rows are never deleted, so an id once here stays right; the
/// writer forgets the ids of series it evicts from memory.
#[derive(Default)]
pub(crate) struct SeriesDir {
    /// By hash of the ident; a bucket holds every ident of that hash.
    pub(super) map: FxMap<u64, Vec<(OwnedIdent, i64)>>,
}

impl SeriesDir {
    pub(super) fn hash(i: Ident<'_>) -> u64 {
        let mut h = FxHasher::default();
        for s in [i.region, i.target, i.check, i.host, i.ip] {
            h.write(s.as_bytes());
            h.write_u8(0xff);
        }
        h.write_u64(u64::from(i.port));
        h.finish()
    }

    pub(crate) fn get(&self, i: Ident<'_>) -> Option<i64> {
        self.map
            .get(&Self::hash(i))?
            .iter()
            .find_map(|(o, id)| (o.borrow() == i).then_some(*id))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Adds every ident of `other` this one does not hold.
    pub(super) fn absorb(&mut self, other: SeriesDir) {
        if self.is_empty() {
            *self = other;
            return;
        }
        for (ident, id) in other.map.into_values().flatten() {
            self.insert(ident, id);
        }
    }

    /// Forgets the series `ids` (evicted from the writer's memory; their rows stay, so a later
    /// lookup finds the same id again).
    pub(super) fn remove_ids(&mut self, ids: &FxSet<i64>) {
        self.map.retain(|_, bucket| {
            bucket.retain(|(_, id)| !ids.contains(id));
            !bucket.is_empty()
        });
    }

    pub(super) fn insert(&mut self, o: OwnedIdent, id: i64) {
        let i = o.borrow();
        if self.get(i).is_some() {
            return;
        }
        self.map.entry(Self::hash(i)).or_default().push((o, id));
    }
}

/// The writer's view of one `series` row: hysteresis plus the latest result's facts.
#[derive(Debug, Clone, Default)]
pub(super) struct SeriesMem {
    pub(super) hyst: Hysteresis,
    pub(super) state_since_us: i64,
    pub(super) last_outcome: i32,
    pub(super) last_seen_us: i64,
    pub(super) interval_ms: i64,
    /// Shared, so a request's copy of a series costs no string copies.
    pub(super) latest: Arc<Latest>,
}

impl SeriesMem {
    /// Feeds one stored result to the series, in store order: its hysteresis, and its latest
    /// result unless this one is older. Returns whether the state changed and the latest result
    /// it replaced.
    pub(super) fn observe(
        &mut self,
        start_us: i64,
        outcome: i32,
        interval_ms: i64,
        body: &Bytes,
        agent: &Arc<str>,
        policy: Policy,
    ) -> (bool, Option<Arc<Latest>>) {
        let ok = matches!(
            pb::Outcome::try_from(outcome),
            Ok(pb::Outcome::Ok | pb::Outcome::Warn)
        );
        let changed = self.hyst.observe(ok, policy);
        if changed {
            self.state_since_us = start_us;
        }
        // A late result (older than the latest) feeds the state but does not replace the facts.
        if start_us < self.last_seen_us {
            return (changed, None);
        }
        self.last_outcome = outcome;
        self.last_seen_us = start_us;
        self.interval_ms = interval_ms;
        let latest = Latest {
            agent_id: agent.clone(),
            body: body.clone(),
        };
        (
            changed,
            Some(std::mem::replace(&mut self.latest, Arc::new(latest))),
        )
    }
}

/// A series' latest result: its agent and its stored body (error class, phase, facts, message;
/// the row's own bytes, shared), read when the series row is written.
#[derive(Debug, Default)]
pub(super) struct Latest {
    pub(super) agent_id: Arc<str>,
    pub(super) body: Bytes,
}
