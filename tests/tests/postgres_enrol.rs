//! The enrolment tables on PostgreSQL, shared by two collectors' stores on one database (a
//! private cluster of Debian's `postgresql`): a one-use token spent at once through both gives
//! exactly one certificate; tokens and revocations made through one are seen through the
//! other, and a revocation reaches the other's live list by LISTEN/NOTIFY within seconds.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mxscope_collector::auth::{RevocationState, Revoked};
use mxscope_collector::enrol::db::IdentityDb;
use mxscope_collector::enrol::{self, Enrolment, Signer, DEFAULT_CERT_LIFE};
use mxscope_collector::limits::Counters;
use mxscope_collector::store::postgres::PgStore;
use mxscope_collector::store::{Store, StoreOptions};
use mxscope_pki::{Ca, Identity};
use mxscope_proto::pb;
use mxscope_proto::pb::enrollment_server::Enrollment;
use mxscope_tests::postgres::Postgres;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How soon a revocation made through one collector is enforced by the other.
const REVOKED_WITHIN: Duration = Duration::from_secs(3);

async fn cluster() -> Result<Postgres> {
    tokio::task::spawn_blocking(Postgres::start)
        .await?
        .context("private postgres cluster")
}

fn psql(pg: &Postgres, db: &str, sql: &str) -> Result<String> {
    tokio::task::block_in_place(|| pg.psql(db, sql))
}

/// One collector's enrolment state on the database `url`, signing with the CA saved in `ca`,
/// following the revocations the other collectors make until `stop`.
struct Collector {
    store: PgStore,
    enrolment: Arc<Enrolment>,
    /// What its calls and sessions are checked against.
    revoked: watch::Receiver<Revoked>,
}

impl Collector {
    async fn start(url: &str, ca: &Path, stop: &CancellationToken) -> Result<Collector> {
        let store = PgStore::connect(url, StoreOptions::default()).await?;
        let db = IdentityDb::postgres(&store);
        let changes = db
            .revocation_changes()
            .context("postgres follows revocations")?;
        let (revocations, revoked) =
            RevocationState::new(Default::default(), db.revocations().await?);
        tokio::spawn(enrol::follow_revocations(
            db.clone(),
            changes,
            revocations.clone(),
            stop.clone(),
        ));
        let signer = Signer::new(Ca::load(ca)?, DEFAULT_CERT_LIFE);
        let enrolment = Arc::new(Enrolment::new(
            Some(signer),
            db,
            revocations,
            Arc::new(Counters::default()),
        ));
        Ok(Collector {
            store,
            enrolment,
            revoked,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_use_token_spent_through_two_collectors_at_once_gives_one_certificate() -> Result<()>
{
    let pg = cluster().await?;
    let url = tokio::task::block_in_place(|| pg.create_database("spend"))?;
    let ca_dir = tempfile::tempdir()?;
    Ca::create("test ca")?.save(ca_dir.path())?;
    let ca = ca_dir.path();
    let stop = CancellationToken::new();
    let (a, b) = tokio::try_join!(
        Collector::start(&url, ca, &stop),
        Collector::start(&url, ca, &stop)
    )?;
    let req = pb::CreateTokenRequest {
        region: "eu".into(),
        id_prefix: "eu-".into(),
        ..Default::default()
    };
    let token = enrol::create_token(&a.enrolment, "ops", req).await?.token;
    // Four attempts through each collector (within each one's burst of five), all at once.
    let services = [&a, &b].map(|c| enrol::EnrollmentService::new(c.enrolment.clone()));
    let attempts: Vec<_> = (0..8)
        .map(|i| {
            let (service, token) = (services[i % 2].clone(), token.clone());
            tokio::spawn(async move {
                let (csr_pem, _key) = mxscope_pki::new_csr().expect("csr");
                let req = pb::EnrollRequest {
                    token,
                    csr_pem,
                    agent_id: format!("eu-{i}"),
                    ..Default::default()
                };
                service.enroll(tonic::Request::new(req)).await
            })
        })
        .collect();
    let mut granted = Vec::new();
    let mut refused = Vec::new();
    for a in attempts {
        match a.await? {
            Ok(r) => granted.push(r.into_inner()),
            Err(status) => refused.push(status.message().to_string()),
        }
    }
    assert_eq!(granted.len(), 1, "one certificate: {refused:?}");
    assert_eq!(refused.len(), 7);
    assert!(refused.iter().all(|r| r.contains("used up")), "{refused:?}");
    assert_eq!(
        psql(
            &pg,
            "spend",
            "SELECT count(*) || ' ' || min(serial) FROM certificates"
        )?,
        format!("1 {}", granted[0].serial),
        "one certificate recorded, the one granted"
    );
    for c in [&a, &b] {
        let tokens = enrol::list_tokens(&c.enrolment).await?.tokens;
        assert_eq!(tokens.len(), 1, "{tokens:?}");
        assert_eq!((tokens[0].uses_left, tokens[0].state.as_str()), (0, "used"));
    }

    // A renewal through B is recorded beside the enrolment made through A.
    let who = Identity::Agent {
        id: granted[0].agent_id.clone(),
        region: "eu".into(),
    };
    let (csr_pem, _key) = mxscope_pki::new_csr()?;
    let renewed = enrol::renew(&b.enrolment, &who, csr_pem).await;
    ensure!(
        renewed.error.is_empty(),
        "renewal refused: {}",
        renewed.error
    );
    assert_eq!(
        psql(
            &pg,
            "spend",
            &format!(
                "SELECT string_agg(how, ',' ORDER BY how) FROM certificates WHERE agent_id = '{}'",
                granted[0].agent_id
            )
        )?,
        "enrol,renew"
    );
    stop.cancel();
    for c in [a, b] {
        c.store.close().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_and_revocations_made_through_one_collector_hold_at_the_other() -> Result<()> {
    let pg = cluster().await?;
    let url = tokio::task::block_in_place(|| pg.create_database("revoke"))?;
    let ca_dir = tempfile::tempdir()?;
    Ca::create("test ca")?.save(ca_dir.path())?;
    let ca = ca_dir.path();
    let stop = CancellationToken::new();
    let a = Collector::start(&url, ca, &stop).await?;
    let mut b = Collector::start(&url, ca, &stop).await?;
    assert!(b.revoked.borrow().is_empty());

    // A token created through A, revoked through B, refused through A.
    let req = pb::CreateTokenRequest {
        region: "eu".into(),
        agent_id: "eu-1".into(),
        ..Default::default()
    };
    let created = enrol::create_token(&a.enrolment, "ops", req).await?;
    let revoked = enrol::revoke_token(&b.enrolment, "ops", created.id.clone()).await?;
    assert_eq!(
        (revoked.id.as_str(), revoked.state.as_str()),
        (created.id.as_str(), "revoked")
    );
    let (csr_pem, _key) = mxscope_pki::new_csr()?;
    let service = enrol::EnrollmentService::new(a.enrolment.clone());
    let err = service
        .enroll(tonic::Request::new(pb::EnrollRequest {
            token: created.token,
            csr_pem,
            ..Default::default()
        }))
        .await
        .expect_err("a revoked token is refused");
    assert!(err.message().contains("was revoked"), "{err:?}");

    // Revocations through A: stored once, listed through B, enforced by B within seconds.
    let by_id = pb::RevokeRequest {
        agent_id: "eu-1".into(),
        reason: "decommissioned".into(),
        ..Default::default()
    };
    let by_serial = pb::RevokeRequest {
        serial: "0abc".into(),
        ..Default::default()
    };
    let first = enrol::revoke(&a.enrolment, "ops", by_id.clone()).await?;
    assert!(first.added, "{first:?}");
    assert!(
        !enrol::revoke(&a.enrolment, "ops", by_id).await?.added,
        "stored once"
    );
    enrol::revoke(&a.enrolment, "ops", by_serial).await?;
    let listed = b.enrolment.db.revocations().await?;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.revokes_agent("eu-1"));
    let started = tokio::time::Instant::now();
    let b_live = tokio::time::timeout(REVOKED_WITHIN, b.revoked.wait_for(|r| r.len() == 2))
        .await
        .with_context(|| format!("B enforces A's revocations within {REVOKED_WITHIN:?}"))??
        .clone();
    assert!(b_live.revokes_agent("eu-1"), "{b_live:?}");
    eprintln!("B enforced A's revocations after {:?}", started.elapsed());
    stop.cancel();
    for c in [a, b] {
        c.store.close().await?;
    }
    Ok(())
}
