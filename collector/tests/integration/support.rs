//! A collector for integration tests: `run` on a loopback listener bound to port 0 in a temporary
//! directory, a Query client for it, and a shutdown that waits with a deadline.

use std::net::SocketAddr;
use std::time::Duration;

use mxscope_collector::{run, Config, RunError};
use mxscope_proto::pb::query_client::QueryClient;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Local targets `names`, each with every check: what a test agent announces in its hello so
/// that the collector accepts its results for them.
pub(crate) fn declaring(names: &[&str]) -> Vec<mxscope_proto::pb::TargetSpec> {
    names
        .iter()
        .map(|n| mxscope_proto::pb::TargetSpec {
            name: (*n).into(),
            checks: mxscope_proto::CheckKind::ALL
                .iter()
                .map(|c| c.name().to_string())
                .collect(),
            ..Default::default()
        })
        .collect()
}

/// Lifts the per-agent result and byte rates, for tests that send more than an agent would.
pub(crate) fn unlimited_rates(cfg: &mut Config) {
    cfg.limits.rate_per_sec = 1e9;
    cfg.limits.burst = 1e9;
    cfg.limits.bytes_per_sec = 1e12;
    cfg.limits.bytes_burst = 1e12;
}

/// How long a test waits for one expected thing.
pub(crate) const DEADLINE: Duration = Duration::from_secs(5);

pub(crate) struct Collector {
    pub addr: SocketAddr,
    /// The collector's refusal counters.
    pub counters: std::sync::Arc<mxscope_collector::limits::Counters>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunError>>,
    pub dir: TempDir,
}

impl Collector {
    pub(crate) async fn start(tune: impl FnOnce(&mut Config)) -> Collector {
        let dir = TempDir::new().expect("temp dir");
        let mut config = Config::new(dir.path().join("mxscope.db"));
        tune(&mut config);
        let counters = config.counters.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(config, listener, async move {
            let _ = stopped.await;
        }));
        Collector {
            addr,
            counters,
            stop: Some(stop),
            task,
            dir,
        }
    }

    pub(crate) async fn query(&self) -> QueryClient<Channel> {
        QueryClient::connect(format!("http://{}", self.addr))
            .await
            .expect("query client")
    }

    /// Triggers shutdown and waits (with a deadline) for `run` to return.
    pub(crate) async fn shutdown(mut self) -> (Result<(), RunError>, TempDir) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let res = tokio::time::timeout(DEADLINE * 2, self.task)
            .await
            .expect("run returns in time")
            .expect("run task");
        (res, self.dir)
    }
}
