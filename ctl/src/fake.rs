//! Test support: an in-process Query server on a loopback port with canned status, results and
//! agents and a real in-memory target list, so commands can be run end to end through gRPC.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use mxscope_proto::pb;
use mxscope_proto::pb::query_server::{Query, QueryServer};
use tonic::codegen::tokio_stream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

/// What the fake answers; targets change with put/remove.
#[derive(Default)]
pub(crate) struct State {
    pub status: Vec<pb::StatusRow>,
    pub results: Vec<pb::StoredResult>,
    pub agents: Vec<pb::AgentInfo>,
    pub targets: BTreeMap<String, pb::TargetSpec>,
    /// Requests seen, for assertions on what the client sent.
    pub last_status: Option<pb::StatusRequest>,
    pub last_results: Option<pb::ResultsRequest>,
    /// Rows per `status` answer (0: all in one).
    pub status_page: usize,
}

#[derive(Clone, Default)]
pub(crate) struct FakeQuery {
    pub state: Arc<Mutex<State>>,
}

impl FakeQuery {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, Status> {
        let mut guard = self
            .state
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        Ok(f(&mut guard))
    }

    /// Serves on 127.0.0.1 on a free port until the test's runtime ends; returns the URL.
    pub(crate) async fn serve(&self) -> String {
        let incoming =
            TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind loopback");
        let addr = incoming.local_addr().expect("local addr");
        let svc = QueryServer::new(self.clone());
        tokio::spawn(
            Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming),
        );
        format!("http://{addr}")
    }
}

fn unknown(name: &str) -> Status {
    Status::not_found(format!("unknown target '{name}'"))
}

#[tonic::codegen::async_trait]
impl Query for FakeQuery {
    async fn status(
        &self,
        r: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let req = r.into_inner();
        let (mut rows, page) = self.with(|s| {
            s.last_status = Some(req.clone());
            (s.status.clone(), s.status_page)
        })?;
        // Pages of `status_page` rows when set, as a collector cuts a large answer.
        let skip = (req.offset as usize).min(rows.len());
        rows.drain(..skip);
        let mut next_offset = 0;
        if page > 0 && rows.len() > page {
            rows.truncate(page);
            next_offset = (skip + page) as u32;
        }
        Ok(Response::new(pb::StatusResponse {
            rows,
            window_ms: 300_000,
            truncated: next_offset != 0,
            next_offset,
        }))
    }

    async fn results(
        &self,
        r: Request<pb::ResultsRequest>,
    ) -> Result<Response<pb::ResultsResponse>, Status> {
        let req = r.into_inner();
        let results = self.with(|s| {
            s.last_results = Some(req.clone());
            s.results.clone()
        })?;
        Ok(Response::new(pb::ResultsResponse {
            results,
            truncated: false,
        }))
    }

    async fn agents(
        &self,
        _: Request<pb::AgentsRequest>,
    ) -> Result<Response<pb::AgentsResponse>, Status> {
        let agents = self.with(|s| s.agents.clone())?;
        Ok(Response::new(pb::AgentsResponse { agents }))
    }

    async fn matrix(
        &self,
        _: Request<pb::MatrixRequest>,
    ) -> Result<Response<pb::MatrixResponse>, Status> {
        Err(Status::unimplemented("matrix"))
    }

    async fn latency(
        &self,
        _: Request<pb::LatencyRequest>,
    ) -> Result<Response<pb::LatencyResponse>, Status> {
        Err(Status::unimplemented("latency"))
    }

    async fn diagnose(
        &self,
        _: Request<pb::DiagnoseRequest>,
    ) -> Result<Response<pb::DiagnoseResponse>, Status> {
        Err(Status::unimplemented("diagnose"))
    }

    async fn list_targets(
        &self,
        _: Request<pb::ListTargetsRequest>,
    ) -> Result<Response<pb::ListTargetsResponse>, Status> {
        let targets = self.with(|s| s.targets.values().cloned().collect())?;
        Ok(Response::new(pb::ListTargetsResponse {
            targets,
            truncated: false,
        }))
    }

    async fn get_target(
        &self,
        r: Request<pb::GetTargetRequest>,
    ) -> Result<Response<pb::TargetSpec>, Status> {
        let name = r.into_inner().name;
        let found = self.with(|s| s.targets.get(&name).cloned())?;
        found.map(Response::new).ok_or_else(|| unknown(&name))
    }

    async fn put_target(
        &self,
        r: Request<pb::PutTargetRequest>,
    ) -> Result<Response<pb::TargetSpec>, Status> {
        let req = r.into_inner();
        let spec = req
            .target
            .ok_or_else(|| Status::invalid_argument("no target"))?;
        self.with(|s| {
            let exists = s.targets.contains_key(&spec.name);
            match (req.update, exists) {
                (false, true) => Err(Status::already_exists(format!(
                    "target '{}' exists",
                    spec.name
                ))),
                (true, false) => Err(unknown(&spec.name)),
                _ => {
                    s.targets.insert(spec.name.clone(), spec.clone());
                    Ok(Response::new(spec))
                }
            }
        })?
    }

    async fn remove_target(
        &self,
        r: Request<pb::RemoveTargetRequest>,
    ) -> Result<Response<pb::RemoveTargetResponse>, Status> {
        let name = r.into_inner().name;
        let removed = self.with(|s| s.targets.remove(&name))?;
        removed
            .map(|_| Response::new(pb::RemoveTargetResponse {}))
            .ok_or_else(|| unknown(&name))
    }

    // Enrolment lives in the real collector only (tests/tests/enrolment.rs runs it).
    async fn create_token(
        &self,
        _: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        Err(Status::unimplemented("the fake collector keeps no tokens"))
    }

    async fn list_tokens(
        &self,
        _: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        Err(Status::unimplemented("the fake collector keeps no tokens"))
    }

    async fn revoke_token(
        &self,
        _: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        Err(Status::unimplemented("the fake collector keeps no tokens"))
    }

    async fn revoke(
        &self,
        _: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        Err(Status::unimplemented(
            "the fake collector keeps no revocations",
        ))
    }

    type WatchStream = tokio_stream::Empty<Result<pb::WatchEvent, Status>>;

    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
}
