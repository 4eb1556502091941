//! The stored form of a target definition: JSON in the `spec` column of `targets` (central) and
//! `agent_targets` (agent-local), spelled as on the wire, and read back through proto's validator.

use std::collections::BTreeMap;

use mxscope_proto::pb;
use mxscope_proto::target::{self, Source, Target, TargetError};
use serde::{Deserialize, Serialize};

use crate::store::StoreError;

/// The JSON of a `spec` column: [`pb::TargetSpec`] without its `source`, maps sorted. Missing
/// fields read as empty (rows of earlier versions leave some out).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct Spec {
    name: String,
    checks: Vec<String>,
    interval_ms: u64,
    timeout_ms: u64,
    regions: Vec<String>,
    labels: BTreeMap<String, String>,
    ports: BTreeMap<String, u32>,
    require_tls: bool,
    kind: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    spf_senders: Vec<String>,
}

/// The `spec` JSON of a validated target.
pub(crate) fn to_json(t: &Target) -> Result<String, StoreError> {
    let w = t.to_wire("");
    Ok(serde_json::to_string(&Spec {
        name: w.name,
        checks: w.checks,
        interval_ms: w.interval_ms,
        timeout_ms: w.timeout_ms,
        regions: w.regions,
        labels: w.labels.into_iter().collect(),
        ports: w.ports.into_iter().collect(),
        require_tls: w.require_tls,
        kind: w.kind,
        spf_senders: w.spf_senders,
    })?)
}

/// What a `spec` column holds.
pub(crate) enum Stored {
    Valid(Target),
    /// A definition this version refuses, with the name it was stored under.
    Refused {
        name: String,
        error: TargetError,
    },
}

/// Reads a `spec` column through [`target::validate_from`]. Checks this version does not know (a
/// newer collector or agent wrote them) are left out and logged, as an agent does with its
/// collector's targets ([`Source::Collector`]). Malformed JSON is an error.
pub(crate) fn from_json(json: &str) -> Result<Stored, StoreError> {
    let s: Spec = serde_json::from_str(json)?;
    let wire = pb::TargetSpec {
        name: s.name,
        checks: s.checks,
        interval_ms: s.interval_ms,
        timeout_ms: s.timeout_ms,
        regions: s.regions,
        labels: s.labels.into_iter().collect(),
        ports: s.ports.into_iter().collect(),
        source: String::new(),
        require_tls: s.require_tls,
        kind: s.kind,
        spf_senders: s.spf_senders,
    };
    Ok(match target::validate_from(&wire, Source::Collector) {
        Ok((t, unknown)) => {
            for u in unknown {
                tracing::warn!(target.name = %t.name, check = %u.given,
                    "stored target names a check this collector does not know; left out");
            }
            Stored::Valid(t)
        }
        Err(error) => Stored::Refused {
            name: wire.name,
            error,
        },
    })
}
