//! The async face of the spool: one thread owns the [`Spool`]; callers talk to it through a
//! channel via the cheap-to-clone [`SpoolHandle`], and appends arriving together share one fsync.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mxscope_proto::{pb, Observation};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

use super::{Spool, SpoolError, APPEND_LINGER};

/// Counters readable without a round trip to the spool thread.
#[derive(Debug, Default)]
pub struct SpoolStats {
    pub highest_seq: AtomicU64,
    pub acked_seq: AtomicU64,
    pub depth: AtomicU64,
    pub dropped_total: AtomicU64,
}

impl SpoolStats {
    fn update(&self, s: &Spool) {
        self.highest_seq.store(s.highest_seq(), Ordering::Relaxed);
        self.acked_seq.store(s.acked_seq(), Ordering::Relaxed);
        self.depth.store(s.depth(), Ordering::Relaxed);
        self.dropped_total
            .store(s.dropped_total(), Ordering::Relaxed);
    }
}

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

enum Command {
    Append {
        observations: Vec<Observation>,
        reply: Reply<Vec<u64>>,
    },
    ReadFrom {
        after: u64,
        max: usize,
        reply: Reply<Vec<pb::ProbeResult>>,
    },
    Ack {
        up_to: u64,
        reply: Reply<()>,
    },
    EnsureSeqAbove {
        n: u64,
        reply: Reply<()>,
    },
    Sync {
        reply: Reply<()>,
    },
}

/// Cheap-to-clone handle to the spool thread. The thread ends when the last handle drops.
#[derive(Clone)]
pub struct SpoolHandle {
    tx: mpsc::Sender<Command>,
    stats: Arc<SpoolStats>,
    committed: watch::Receiver<u64>,
}

impl std::fmt::Debug for SpoolHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolHandle").finish_non_exhaustive()
    }
}

impl SpoolHandle {
    /// Moves the spool onto its own thread; `agent_id` stamps every appended result.
    pub fn spawn(spool: Spool, agent_id: String) -> Result<SpoolHandle, SpoolError> {
        let (tx, rx) = mpsc::channel(1024);
        let stats = Arc::new(SpoolStats::default());
        stats.update(&spool);
        let (committed_tx, committed) = watch::channel(spool.highest_seq());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("mxscope-spool".into())
            .spawn(move || actor(spool, agent_id, rx, thread_stats, committed_tx))
            .map_err(|source| SpoolError::Io {
                path: PathBuf::from("<spool thread>"),
                source,
            })?;
        Ok(SpoolHandle {
            tx,
            stats,
            committed,
        })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Appends and fsyncs; returns the seqs given, in order.
    pub async fn append(&self, observations: Vec<Observation>) -> Result<Vec<u64>, SpoolError> {
        self.call(|reply| Command::Append {
            observations,
            reply,
        })
        .await
    }

    pub async fn read_from(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<pb::ProbeResult>, SpoolError> {
        self.call(|reply| Command::ReadFrom { after, max, reply })
            .await
    }

    pub async fn ack(&self, up_to: u64) -> Result<(), SpoolError> {
        self.call(|reply| Command::Ack { up_to, reply }).await
    }

    pub async fn ensure_seq_above(&self, n: u64) -> Result<(), SpoolError> {
        self.call(|reply| Command::EnsureSeqAbove { n, reply })
            .await
    }

    /// Makes the acked seq durable (clean shutdown: the next start resends nothing acked).
    pub async fn sync(&self) -> Result<(), SpoolError> {
        self.call(|reply| Command::Sync { reply }).await
    }

    pub fn stats(&self) -> &SpoolStats {
        &self.stats
    }

    pub fn highest_seq(&self) -> u64 {
        self.stats.highest_seq.load(Ordering::Relaxed)
    }

    pub fn acked_seq(&self) -> u64 {
        self.stats.acked_seq.load(Ordering::Relaxed)
    }

    pub fn depth(&self) -> u64 {
        self.stats.depth.load(Ordering::Relaxed)
    }

    pub fn dropped_total(&self) -> u64 {
        self.stats.dropped_total.load(Ordering::Relaxed)
    }

    /// Highest durable seq; changes after every append.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }
}

/// Appends queued together are committed together (at most this many callers per fsync).
const MAX_GROUP: usize = 256;

fn actor(
    mut spool: Spool,
    agent_id: String,
    mut rx: mpsc::Receiver<Command>,
    stats: Arc<SpoolStats>,
    committed: watch::Sender<u64>,
) {
    // A clock for the append linger and the lazy ack write; nothing else runs on it.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            warn!(error = %e, "spool thread has no timer: appends are not lingered, acks written at once");
            None
        }
    };
    // The next command, or `None` when every handle is gone. Waits until `deadline` at most
    // (`Err` = it passed).
    let next = |rx: &mut mpsc::Receiver<Command>, deadline: Option<Instant>| match (deadline, &rt) {
        (Some(at), Some(rt)) => rt.block_on(async {
            tokio::time::timeout_at(tokio::time::Instant::from_std(at), rx.recv())
                .await
                .map_err(|_| ())
        }),
        (Some(_), None) => rx.try_recv().map(Some).map_err(|_| ()),
        (None, _) => Ok(rx.blocking_recv()),
    };
    loop {
        let cmd = match next(&mut rx, spool.acked_hint_due()) {
            Ok(Some(cmd)) => cmd,
            Ok(None) => break,
            Err(()) => {
                spool.flush_acked_hint();
                continue;
            }
        };
        let (observations, reply) = match cmd {
            Command::Append {
                observations,
                reply,
            } => (observations, reply),
            other => {
                handle(&mut spool, other, &stats, &committed);
                continue;
            }
        };
        // Group commit: whatever is appended within the linger shares one write and one fsync;
        // other commands are served meanwhile (the lingering records have no seq yet).
        let mut groups = vec![observations];
        let mut replies = vec![reply];
        let linger_until = Instant::now() + APPEND_LINGER;
        let mut closed = false;
        while replies.len() < MAX_GROUP {
            match next(&mut rx, Some(linger_until)) {
                Ok(Some(Command::Append {
                    observations,
                    reply,
                })) => {
                    groups.push(observations);
                    replies.push(reply);
                }
                Ok(Some(other)) => handle(&mut spool, other, &stats, &committed),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(()) => break,
            }
        }
        let result = spool.append_group(&agent_id, groups);
        // Counters first, so a caller that got its reply never reads older ones.
        publish(&spool, &stats, &committed);
        match result {
            Ok(seqs) => {
                for (reply, seqs) in replies.into_iter().zip(seqs) {
                    let _ = reply.send(Ok(seqs));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let mut first = Some(e);
                for reply in replies {
                    let err = first.take().unwrap_or_else(|| SpoolError::Io {
                        path: spool.dir().to_path_buf(),
                        source: io::Error::other(msg.clone()),
                    });
                    let _ = reply.send(Err(err));
                }
            }
        }
        if closed {
            break;
        }
    }
    if let Err(e) = spool.sync() {
        warn!(error = %e, "spool state not written at close");
    }
}

/// Serves one command other than an append.
fn handle(spool: &mut Spool, cmd: Command, stats: &SpoolStats, committed: &watch::Sender<u64>) {
    let (result, reply) = match cmd {
        Command::ReadFrom { after, max, reply } => {
            let result = spool.read_from(after, max);
            publish(spool, stats, committed);
            let _ = reply.send(result);
            return;
        }
        Command::Ack { up_to, reply } => (spool.ack(up_to), reply),
        Command::EnsureSeqAbove { n, reply } => (spool.ensure_seq_above(n), reply),
        Command::Sync { reply } => (spool.sync(), reply),
        Command::Append { reply, .. } => {
            let _ = reply.send(Err(SpoolError::Closed));
            return;
        }
    };
    publish(spool, stats, committed);
    let _ = reply.send(result);
}

fn publish(spool: &Spool, stats: &SpoolStats, committed: &watch::Sender<u64>) {
    stats.update(spool);
    committed.send_replace(spool.highest_seq());
}
