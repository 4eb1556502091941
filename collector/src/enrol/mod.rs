//! Online certificate signing for agents: enrolment with a token (the `Enrollment` service, the
//! one call that needs no client certificate), renewal over an agent's authenticated session,
//! and the token and revocation operations of the Query API. The collector signs only when
//! started with the CA's key (`--ca-key`, a [`Signer`]); without it every such call is refused
//! and `mxscopectl enroll` (offline) stays the way to issue certificates. Every enrolment and
//! every refusal is one `audit` log line.

pub mod db;

use std::sync::Arc;
use std::time::Duration;

use mxscope_pki::{cert_info, Ca, Entry, Fingerprint, Identity, Token};
use mxscope_proto::names::{is_label, LABEL_RULE};
use mxscope_proto::pb;
use mxscope_proto::pb::enrollment_server::Enrollment;
use mxscope_proto::time::now_us;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::auth::{RevocationState, Revoked};
use crate::error::ServiceError;
use crate::limits::{Counters, RateLimiter};
use db::{Admitted, CertRow, Enrolling, IdentityDb, Spent, TokenRow};

/// Life of the certificates the collector signs unless `--agent-cert-ttl` says otherwise.
pub const DEFAULT_CERT_LIFE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Life of a token unless `token create --ttl` says otherwise, and the longest allowed.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most uses one token may have.
pub const MAX_TOKEN_USES: u32 = 10_000;
/// Enrolment attempts per source address: a second each, five at once.
const ATTEMPTS_PER_SEC: f64 = 1.0;
const ATTEMPTS_BURST: f64 = 5.0;
/// Longest id prefix, so that a made-up id (prefix + 6 hex digits) is still a label.
const MAX_PREFIX: usize = 56;

/// What refuses an enrolment when the collector does not sign.
pub const NOT_SIGNING: &str = "this collector signs no certificates (it was started without \
                               --ca-key): start it with --ca-key CA.KEY, or issue the agent's \
                               certificate offline with 'mxscopectl enroll'";

/// The CA key the collector signs with, and how long what it signs lives.
pub struct Signer {
    ca: Ca,
    pub life: Duration,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("ca", &self.ca.fingerprint().to_string())
            .field("life", &self.life)
            .finish()
    }
}

impl Signer {
    pub fn new(ca: Ca, life: Duration) -> Signer {
        Signer { ca, life }
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.ca.fingerprint()
    }

    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem()
    }

    /// Signs `csr_pem` for `who`; the stored row says how (`enrol`, `renew`) and with which token.
    fn sign(
        &self,
        csr_pem: &str,
        who: &Identity,
        how: &'static str,
        token_id: &str,
    ) -> Result<(String, CertRow), ServiceError> {
        let issued = self.ca.sign_csr_for(csr_pem, who, self.life).map_err(|e| {
            ServiceError::InvalidArgument(format!(
                "the certificate request cannot be signed: {e} (send a PKCS#10 CSR in PEM)"
            ))
        })?;
        let info = cert_info(&issued.cert_pem, "signed certificate")
            .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let Identity::Agent { id, region } = who else {
            return Err(ServiceError::InvalidArgument(
                "only agent certificates are signed online".into(),
            ));
        };
        let row = CertRow {
            serial: info.id.serial.to_string(),
            agent_id: id.clone(),
            region: region.clone(),
            not_after_us: info.not_after.unix_timestamp() * 1_000_000,
            issued_us: now_us(),
            how,
            token_id: token_id.to_string(),
        };
        Ok((issued.cert_pem, row))
    }
}

/// What the enrolment parts of the collector share: the signer, the tables, the revocations it
/// adds to and checks, and the counters it bumps.
#[derive(Debug)]
pub struct Enrolment {
    pub signer: Option<Signer>,
    pub db: IdentityDb,
    pub revocations: Arc<RevocationState>,
    pub counters: Arc<Counters>,
    attempts: RateLimiter,
}

impl Enrolment {
    pub fn new(
        signer: Option<Signer>,
        db: IdentityDb,
        revocations: Arc<RevocationState>,
        counters: Arc<Counters>,
    ) -> Enrolment {
        Enrolment {
            signer,
            db,
            revocations,
            counters,
            attempts: RateLimiter::new(ATTEMPTS_PER_SEC, ATTEMPTS_BURST),
        }
    }

    fn signer(&self) -> Result<&Signer, ServiceError> {
        self.signer
            .as_ref()
            .ok_or_else(|| ServiceError::FailedPrecondition(NOT_SIGNING.into()))
    }
}

/// A token's answer to an agent that asks for `agent_id` in `region` (either may be empty):
/// the identity it gets, or why not. A prefix token's answer holds only if the id has no live
/// certificate yet ([`Admitted::must_be_new`], checked with [`not_taken`]).
pub fn admit(
    token: &TokenRow,
    agent_id: &str,
    region: &str,
    now_us: i64,
    make_id: impl FnOnce(&str) -> String,
) -> Result<Admitted, ServiceError> {
    let id = &token.id;
    let refuse = |m: String| Err(ServiceError::PermissionDenied(m));
    match token.state(now_us) {
        "revoked" => {
            return refuse(format!(
                "enrolment token {id} was revoked; create a new one with 'mxscopectl token create'"
            ))
        }
        "used" => {
            return refuse(format!(
                "enrolment token {id} is used up ({} of {} uses); create a new one with 'mxscopectl token create'",
                token.uses, token.uses
            ))
        }
        "expired" => {
            return refuse(format!(
                "enrolment token {id} expired at {}; create a new one with 'mxscopectl token create'",
                when(token.expires_us)
            ))
        }
        _ => {}
    }
    if !region.is_empty() && region != token.region {
        return refuse(format!(
            "enrolment token {id} is for region '{}', but this agent says '{region}': start it \
             with --region {} (or without --region), or create a token for '{region}'",
            token.region, token.region
        ));
    }
    let exact = !token.agent_id.is_empty();
    let agent = if exact {
        if !agent_id.is_empty() && agent_id != token.agent_id {
            return refuse(format!(
                "enrolment token {id} is for agent id '{}', but this agent asks for '{agent_id}': \
                 start it with --id {} (or without --id)",
                token.agent_id, token.agent_id
            ));
        }
        token.agent_id.clone()
    } else {
        let prefix = &token.id_prefix;
        let agent = if agent_id.is_empty() {
            make_id(prefix)
        } else {
            agent_id.to_string()
        };
        if !agent.starts_with(prefix.as_str()) || !is_label(&agent) {
            return refuse(format!(
                "agent id '{agent}' is outside enrolment token {id}, which allows ids starting \
                 with '{prefix}' ({LABEL_RULE}): pick such an --id"
            ));
        }
        agent
    };
    Ok(Admitted {
        who: Identity::Agent {
            id: agent,
            region: token.region.clone(),
        },
        must_be_new: !exact,
    })
}

/// Refuses `admitted` when its id must be new and holds the `live` certificate: a prefix token
/// must not take over an agent that is enrolled already.
pub fn not_taken(admitted: &Admitted, live: Option<&str>) -> Result<(), ServiceError> {
    match (&admitted.who, live) {
        (Identity::Agent { id, .. }, Some(serial)) if admitted.must_be_new => {
            Err(ServiceError::PermissionDenied(format!(
                "agent id '{id}' already has a live certificate (serial {serial}): pick \
                 another --id, or revoke it first with 'mxscopectl revoke --serial {serial}'"
            )))
        }
        _ => Ok(()),
    }
}

/// A time in microseconds as RFC 3339 (UTC, seconds).
fn when(us: i64) -> String {
    let secs = u64::try_from(us / 1_000_000).unwrap_or(0);
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Six random hex digits after `prefix`.
fn made_up_id(prefix: &str) -> String {
    let n: u32 = rand::random::<u32>() & 0xff_ffff;
    format!("{prefix}{n:06x}")
}

/// One enrolment request, decided inside its token's transaction.
struct Asked {
    req: pb::EnrollRequest,
    /// What was revoked when the request came in.
    revoked: Revoked,
    shared: Arc<Enrolment>,
}

impl Enrolling for Asked {
    fn admit(&mut self, token: &TokenRow, now_us: i64) -> Result<Admitted, ServiceError> {
        let admitted = admit(
            token,
            &self.req.agent_id,
            &self.req.region,
            now_us,
            made_up_id,
        )?;
        if let Identity::Agent { id, .. } = &admitted.who {
            if self.revoked.revokes_agent(id) {
                return Err(ServiceError::PermissionDenied(format!(
                    "agent id '{id}' is revoked; enrol it with another id"
                )));
            }
        }
        Ok(admitted)
    }

    fn sign(
        &mut self,
        token: &TokenRow,
        admitted: &Admitted,
        live: Option<&str>,
    ) -> Result<(String, CertRow), ServiceError> {
        not_taken(admitted, live)?;
        self.shared
            .signer()?
            .sign(&self.req.csr_pem, &admitted.who, "enrol", &token.id)
    }
}

/// The `Enrollment` gRPC service.
#[derive(Clone)]
pub struct EnrollmentService {
    enrolment: Arc<Enrolment>,
}

impl std::fmt::Debug for EnrollmentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentService").finish_non_exhaustive()
    }
}

impl EnrollmentService {
    pub fn new(enrolment: Arc<Enrolment>) -> EnrollmentService {
        EnrollmentService { enrolment }
    }

    async fn enroll(
        &self,
        peer: &str,
        req: pb::EnrollRequest,
        token_id: &mut String,
    ) -> Result<pb::EnrollResponse, ServiceError> {
        let enrol = &*self.enrolment;
        let wait = enrol.attempts.reserve(peer, 1);
        if !wait.is_zero() {
            return Err(ServiceError::ResourceExhausted(format!(
                "too many enrolment attempts from {peer}; try again in {} s",
                wait.as_secs().max(1)
            )));
        }
        let signer = enrol.signer()?;
        let token: Token = req
            .token
            .parse()
            .map_err(|e: mxscope_pki::PkiError| ServiceError::PermissionDenied(e.to_string()))?;
        *token_id = token.id();
        if token.ca != signer.fingerprint() {
            return Err(ServiceError::PermissionDenied(format!(
                "enrolment token {} was made for another CA (fingerprint {}); this collector's is \
                 {}: create the token on this collector",
                token.id(),
                token.ca,
                signer.fingerprint()
            )));
        }
        if !req.agent_id.is_empty() && !is_label(&req.agent_id) {
            return Err(ServiceError::InvalidArgument(format!(
                "agent id '{}': {LABEL_RULE}",
                req.agent_id
            )));
        }
        let hash = token.hash();
        let ca_pem = signer.ca_pem();
        let asked = Asked {
            req,
            revoked: enrol.revocations.current(),
            shared: self.enrolment.clone(),
        };
        let (cert_pem, row) = match enrol.db.enrol(hash.clone(), asked).await? {
            Spent::Signed(pem, row) => (pem, row),
            Spent::Unknown => {
                return Err(ServiceError::PermissionDenied(format!(
                    "unknown enrolment token {} (never created on this collector, or \
                     mistyped): create one with 'mxscopectl token create'",
                    &hash[..12]
                )))
            }
            // Nothing of a refused attempt is stored: the use is not spent.
            Spent::Refused(err) => return Err(err),
        };
        Ok(pb::EnrollResponse {
            cert_pem,
            ca_pem,
            agent_id: row.agent_id,
            region: row.region,
            not_after_us: row.not_after_us,
            serial: row.serial,
        })
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.ip().to_string());
        let req = request.into_inner();
        let (asked_id, asked_region) = (req.agent_id.clone(), req.region.clone());
        let mut token_id = String::new();
        let counters = &self.enrolment.counters;
        match EnrollmentService::enroll(self, &peer, req, &mut token_id).await {
            Ok(answer) => {
                let n = Counters::bump(&counters.enrolled);
                info!(target: "audit", event = "enrolled", token = %token_id, agent.id = %answer.agent_id,
                    region = %answer.region, cert.serial = %answer.serial, peer = %peer,
                    not_after = %when(answer.not_after_us), enrolled_total = n,
                    "agent enrolled");
                Ok(Response::new(answer))
            }
            Err(err) => {
                let n = Counters::bump(&counters.enrol_refused);
                warn!(target: "audit", event = "enrol_refused", token = %token_id, agent.id = %asked_id,
                    region = %asked_region, peer = %peer, reason = %err, enrol_refused_total = n,
                    "enrolment refused");
                Err(err.into())
            }
        }
    }
}

/// Renews the certificate of an agent's session (`who`) for a CSR it sent; the answer carries
/// the certificate or the reason it was refused.
pub async fn renew(shared: &Enrolment, who: &Identity, csr_pem: String) -> pb::Renewed {
    let refused = |error: String| pb::Renewed {
        error,
        ..Default::default()
    };
    let Identity::Agent { id, .. } = who else {
        return refused("only agents renew their certificates".into());
    };
    if shared.revocations.current().revokes_agent(id) {
        return refused(format!("agent '{id}' is revoked; it cannot renew"));
    }
    let Some(signer) = shared.signer.as_ref() else {
        return refused(NOT_SIGNING.into());
    };
    let (cert_pem, row) = match signer.sign(&csr_pem, who, "renew", "") {
        Ok(s) => s,
        Err(e) => return refused(e.to_string()),
    };
    if let Err(err) = shared.db.insert_certificate(row.clone()).await {
        warn!(agent.id = %id, error = %crate::error::chain(&err), "recording a renewed certificate failed");
        return refused("the collector could not record the certificate; it retries later".into());
    }
    let n = Counters::bump(&shared.counters.renewed);
    info!(target: "audit", event = "renewed", agent.id = %id, region = %row.region, cert.serial = %row.serial,
        not_after = %when(row.not_after_us), renewed_total = n, "agent certificate renewed");
    pb::Renewed {
        cert_pem,
        not_after_us: row.not_after_us,
        serial: row.serial,
        error: String::new(),
    }
}

fn token_info(t: &TokenRow, now: i64) -> pb::TokenInfo {
    pb::TokenInfo {
        token: String::new(),
        id: t.id.clone(),
        region: t.region.clone(),
        agent_id: t.agent_id.clone(),
        id_prefix: t.id_prefix.clone(),
        created_us: t.created_us,
        expires_us: t.expires_us,
        uses: t.uses,
        uses_left: t.uses_left,
        revoked_us: t.revoked_us,
        ca_fingerprint: t.ca_fingerprint.clone(),
        state: t.state(now).to_string(),
    }
}

/// `CreateToken`: a new token for a region (and an id or id prefix); only its hash is kept.
pub async fn create_token(
    shared: &Enrolment,
    by: &str,
    req: pb::CreateTokenRequest,
) -> Result<pb::TokenInfo, ServiceError> {
    let signer = shared.signer()?;
    let bad = |m: String| Err(ServiceError::InvalidArgument(m));
    if !is_label(&req.region) {
        return bad(format!("region '{}': {LABEL_RULE}", req.region));
    }
    if !req.agent_id.is_empty() && !req.id_prefix.is_empty() {
        return bad("give an agent id or an id prefix, not both".into());
    }
    if !req.agent_id.is_empty() && !is_label(&req.agent_id) {
        return bad(format!("agent id '{}': {LABEL_RULE}", req.agent_id));
    }
    let prefix = if req.agent_id.is_empty() && req.id_prefix.is_empty() {
        format!("{}-", req.region)
    } else {
        req.id_prefix.clone()
    };
    if req.agent_id.is_empty()
        && (prefix.len() > MAX_PREFIX
            || prefix.starts_with('-')
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    {
        return bad(format!(
            "id prefix '{prefix}': up to {MAX_PREFIX} of a-z, 0-9 and '-', not starting with '-'"
        ));
    }
    let ttl = match req.ttl_ms {
        0 => DEFAULT_TOKEN_TTL,
        ms => Duration::from_millis(ms),
    };
    if ttl > MAX_TOKEN_TTL {
        return bad("a token lives at most 30 days (--ttl)".into());
    }
    let uses = match req.uses {
        0 => 1,
        n if n > MAX_TOKEN_USES => {
            return bad(format!(
                "a token has at most {MAX_TOKEN_USES} uses (--uses)"
            ))
        }
        n => n,
    };
    let token = Token::generate(signer.fingerprint())
        .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
    let now = now_us();
    let id_prefix = if req.agent_id.is_empty() {
        prefix
    } else {
        String::new()
    };
    let row = TokenRow {
        hash: token.hash(),
        id: token.id(),
        region: req.region,
        agent_id: req.agent_id,
        id_prefix,
        created_us: now,
        expires_us: now.saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX)),
        uses,
        uses_left: uses,
        revoked_us: 0,
        ca_fingerprint: token.ca.to_string(),
        created_by: by.to_string(),
    };
    shared.db.insert_token(row.clone()).await?;
    info!(target: "audit", event = "token_created", token = %row.id, region = %row.region,
        agent.id = %row.agent_id, id_prefix = %row.id_prefix, uses = row.uses,
        expires = %when(row.expires_us), by = %by, "enrolment token created");
    let mut info = token_info(&row, now);
    info.token = token.to_string();
    Ok(info)
}

/// `ListTokens`: every token, oldest first, with its state now.
pub async fn list_tokens(shared: &Enrolment) -> Result<pb::ListTokensResponse, ServiceError> {
    let rows = shared.db.tokens().await?;
    let now = now_us();
    Ok(pb::ListTokensResponse {
        tokens: rows.iter().map(|t| token_info(t, now)).collect(),
    })
}

/// `RevokeToken`: the token can no longer be used (certificates it gave stay valid).
pub async fn revoke_token(
    shared: &Enrolment,
    by: &str,
    id: String,
) -> Result<pb::TokenInfo, ServiceError> {
    let now = now_us();
    let row = shared
        .db
        .revoke_token(id.clone(), now)
        .await?
        .ok_or_else(|| {
            ServiceError::NotFound(format!(
                "no enrolment token '{id}' (see 'mxscopectl token list')"
            ))
        })?;
    info!(target: "audit", event = "token_revoked", token = %row.id, region = %row.region, by = %by,
        "enrolment token revoked");
    Ok(token_info(&row, now))
}

/// `Revoke`: a serial, fingerprint or agent id, kept in the database and enforced at once for
/// new calls and open sessions and streams.
pub async fn revoke(
    shared: &Enrolment,
    by: &str,
    req: pb::RevokeRequest,
) -> Result<pb::RevokeResponse, ServiceError> {
    let given = [&req.serial, &req.agent_id, &req.fingerprint]
        .iter()
        .filter(|s| !s.is_empty())
        .count();
    if given != 1 {
        return Err(ServiceError::InvalidArgument(
            "say what to revoke: exactly one of a serial, an agent id or a fingerprint".into(),
        ));
    }
    let entry = if !req.serial.is_empty() {
        format!("serial:{}", req.serial)
    } else if !req.fingerprint.is_empty() {
        format!("sha256:{}", req.fingerprint)
    } else {
        req.agent_id.clone()
    };
    let entry: Entry = entry
        .parse()
        .map_err(|e: mxscope_pki::PkiError| ServiceError::InvalidArgument(e.to_string()))?;
    if req.reason.chars().any(char::is_control) {
        return Err(ServiceError::InvalidArgument(
            "the reason must be one line of text without control characters".into(),
        ));
    }
    let added = shared
        .db
        .add_revocation(entry.clone(), req.reason.clone(), by.to_string(), now_us())
        .await?;
    shared.revocations.add_online(entry.clone());
    info!(target: "audit", event = "revoked", entry = %entry, added, reason = %req.reason, by = %by,
        "revocation stored");
    Ok(pb::RevokeResponse {
        entry: entry.to_string(),
        added,
    })
}

/// Keeps `state` in step with the revocations every collector on a shared database (PostgreSQL)
/// makes: each message on `changes` reloads them, until `stop`.
///
/// Why notifications rather than a periodic reload: a revocation notifies in its own
/// transaction, so every collector's LISTEN connection hears of it within milliseconds of the
/// commit, and an idle collector reads nothing. After that connection was lost and is back the
/// store sends a message too, so nothing missed meanwhile stays unenforced (a lagging receiver
/// reloads as well).
pub async fn follow_revocations(
    db: IdentityDb,
    mut changes: tokio::sync::broadcast::Receiver<()>,
    state: Arc<RevocationState>,
    stop: tokio_util::sync::CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            heard = changes.recv() => match heard {
                Ok(()) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            },
        }
        match db.revocations().await {
            Ok(list) => {
                let added = state.merge_online(list);
                if added > 0 {
                    info!(added, "revocations made on another collector enforced");
                }
            }
            // The next revocation (or reconnect) reloads again; until then the list in memory
            // (which still grows with this collector's own revocations) is enforced.
            Err(err) => {
                warn!(error = %crate::error::chain(&err), "reloading the revocations failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(agent_id: &str, prefix: &str) -> TokenRow {
        TokenRow {
            hash: "h".into(),
            id: "0123456789ab".into(),
            region: "eu".into(),
            agent_id: agent_id.into(),
            id_prefix: prefix.into(),
            created_us: 0,
            expires_us: 1_000,
            uses: 1,
            uses_left: 1,
            revoked_us: 0,
            ca_fingerprint: String::new(),
            created_by: "ops".into(),
        }
    }

    fn admit_now(
        t: &TokenRow,
        id: &str,
        region: &str,
        live: Option<&str>,
    ) -> Result<Identity, String> {
        let admitted =
            admit(t, id, region, 10, |p| format!("{p}abc123")).map_err(|e| e.to_string())?;
        not_taken(&admitted, live).map_err(|e| e.to_string())?;
        Ok(admitted.who)
    }

    fn agent(id: &str) -> Identity {
        Identity::Agent {
            id: id.into(),
            region: "eu".into(),
        }
    }

    #[test]
    fn a_token_gives_its_own_region_and_id_only() {
        let exact = token("eu-1", "");
        assert_eq!(admit_now(&exact, "", "", None), Ok(agent("eu-1")));
        assert_eq!(admit_now(&exact, "eu-1", "eu", None), Ok(agent("eu-1")));
        let e = admit_now(&exact, "eu-2", "", None).unwrap_err();
        assert!(e.contains("is for agent id 'eu-1'"), "{e}");
        let e = admit_now(&exact, "", "us", None).unwrap_err();
        assert!(
            e.contains("is for region 'eu'") && e.contains("--region eu"),
            "{e}"
        );

        let prefix = token("", "eu-");
        assert_eq!(admit_now(&prefix, "", "", None), Ok(agent("eu-abc123")));
        assert_eq!(admit_now(&prefix, "eu-7", "eu", None), Ok(agent("eu-7")));
        for outside in ["us-1", "eu", "xeu-1", "eu-"] {
            let e = admit_now(&prefix, outside, "", None).unwrap_err();
            assert!(e.contains("is outside enrolment token"), "{outside}: {e}");
        }
        let e = admit_now(&prefix, "eu-7", "", Some("ab01")).unwrap_err();
        assert!(
            e.contains("already has a live certificate (serial ab01)"),
            "{e}"
        );
        // An exact token is the admin's word for that id: it may re-enrol it.
        assert_eq!(admit_now(&exact, "", "", Some("ab01")), Ok(agent("eu-1")));
    }

    #[test]
    fn expired_used_and_revoked_tokens_say_so() {
        let mut t = token("eu-1", "");
        t.expires_us = 10;
        assert!(admit_now(&t, "", "", None)
            .unwrap_err()
            .contains("expired at"));
        let mut t = token("eu-1", "");
        t.uses_left = 0;
        assert!(admit_now(&t, "", "", None)
            .unwrap_err()
            .contains("used up (1 of 1 uses)"));
        let mut t = token("eu-1", "");
        t.revoked_us = 5;
        assert!(admit_now(&t, "", "", None)
            .unwrap_err()
            .contains("was revoked"));
    }

    /// A collector's enrolment state on a migrated database in `dir`, signing with a new CA.
    fn enrolment(dir: &std::path::Path) -> Arc<Enrolment> {
        let path = dir.join("e.db");
        let store = crate::store::sqlite::SqliteStore::open(&path, Default::default()).unwrap();
        drop(store);
        let (revocations, _) = RevocationState::new(Default::default(), Default::default());
        Arc::new(Enrolment::new(
            Some(Signer::new(
                Ca::create("test ca").unwrap(),
                DEFAULT_CERT_LIFE,
            )),
            IdentityDb::open(&path).unwrap(),
            revocations,
            Arc::new(Counters::default()),
        ))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_one_use_token_gives_one_certificate_however_many_ask_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = enrolment(dir.path());
        let req = pb::CreateTokenRequest {
            region: "eu".into(),
            id_prefix: "eu-".into(),
            ..Default::default()
        };
        let token = create_token(&e, "ops", req).await.unwrap().token;
        let service = EnrollmentService::new(e.clone());
        let attempts = (0..8).map(|i| {
            let (service, token) = (service.clone(), token.clone());
            tokio::spawn(async move {
                let (csr_pem, _key) = mxscope_pki::new_csr().unwrap();
                let req = pb::EnrollRequest {
                    token,
                    csr_pem,
                    agent_id: format!("eu-{i}"),
                    ..Default::default()
                };
                // Each from its own address, so the rate limit is not what refuses them.
                service
                    .enroll(&format!("198.18.0.{i}"), req, &mut String::new())
                    .await
            })
        });
        let mut granted = Vec::new();
        let mut refused = Vec::new();
        for a in attempts.collect::<Vec<_>>() {
            match a.await.unwrap() {
                Ok(r) => granted.push(r),
                Err(err) => refused.push(err.to_string()),
            }
        }
        assert_eq!(granted.len(), 1, "one certificate: {refused:?}");
        assert!(refused.iter().all(|r| r.contains("used up")), "{refused:?}");
        let info = cert_info(&granted[0].cert_pem, "granted").unwrap();
        assert_eq!(
            info.identity,
            Some(Identity::Agent {
                id: granted[0].agent_id.clone(),
                region: "eu".into()
            })
        );
        let rows = e.db.tokens().await.unwrap();
        assert_eq!(rows[0].uses_left, 0);
        assert!(
            !rows
                .iter()
                .any(|t| format!("{t:?}").contains(&token[5..40])),
            "only the hash is stored"
        );
    }

    #[tokio::test]
    async fn without_a_ca_key_nothing_is_signed() {
        let dir = tempfile::tempdir().unwrap();
        let signing = enrolment(dir.path());
        let e = Enrolment::new(
            None,
            signing.db.clone(),
            signing.revocations.clone(),
            Arc::new(Counters::default()),
        );
        let err = create_token(
            &e,
            "ops",
            pb::CreateTokenRequest {
                region: "eu".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--ca-key") && err.contains("mxscopectl enroll"),
            "{err}"
        );
        let renewed = renew(
            &e,
            &Identity::Agent {
                id: "eu-1".into(),
                region: "eu".into(),
            },
            String::new(),
        )
        .await;
        assert!(
            renewed.cert_pem.is_empty() && renewed.error.contains("--ca-key"),
            "{renewed:?}"
        );
    }
}
