//! Runs every (target, check) of the local targets plus the latest central schedule on its interval,
//! at a stable per-agent offset, under a global concurrency limit, and appends the results.
//! A run that outlives its interval is never started twice; a new central schedule replaces the old.
//! One timer walks a heap of next slots and spawns a task per run; an idle job is a reference to its
//! target and a heap entry, and its probe spec is built when it runs.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use mxscope_proto::time::now_us;
use mxscope_proto::{pb, CheckKind, Endpoint, ErrorClass, Observation, Outcome, Phase};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::Target;
use crate::probe::{self, CheckSpec, ProbeContext};
use crate::spool::{SpoolError, SpoolHandle};

/// Extra time a probe gets beyond its own timeout before the scheduler records it as timed out.
const PROBE_SAFETY_MARGIN: Duration = Duration::from_secs(5);

/// Runs one (target, check); the real one calls the probes, tests use fakes.
#[async_trait::async_trait]
pub trait Prober: Send + Sync + 'static {
    async fn probe(&self, spec: &CheckSpec) -> Vec<Observation>;
}

/// The real prober: [`probe::run_check`] with the agent's shared context.
pub struct LiveProber {
    pub ctx: ProbeContext,
}

impl std::fmt::Debug for LiveProber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveProber").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Prober for LiveProber {
    async fn probe(&self, spec: &CheckSpec) -> Vec<Observation> {
        probe::run_check(spec, &self.ctx).await
    }
}

/// Where finished probes' observations go (the spool; tests use memory).
#[async_trait::async_trait]
pub trait ResultSink: Send + Sync + 'static {
    async fn store(&self, observations: Vec<Observation>) -> Result<Vec<u64>, SpoolError>;
}

#[async_trait::async_trait]
impl ResultSink for SpoolHandle {
    async fn store(&self, observations: Vec<Observation>) -> Result<Vec<u64>, SpoolError> {
        self.append(observations).await
    }
}

/// Stable offset of a (target, check) within its interval for this agent: FNV-1a of the names,
/// finished with a splitmix64 mix so nearby names spread evenly.
pub fn stable_offset(
    agent_id: &str,
    target: &str,
    check: CheckKind,
    interval: Duration,
) -> Duration {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [
        agent_id.as_bytes(),
        b"\0",
        target.as_bytes(),
        b"\0",
        check.name().as_bytes(),
    ] {
        for &b in part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let micros = u64::try_from(interval.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_micros(h % micros)
}

/// One (target, check) to run: the target stays in the list it came from (the local targets or
/// one central schedule), shared by all its jobs; the probe spec is built when a run starts.
#[derive(Clone)]
pub struct JobDef {
    targets: Arc<[Target]>,
    index: usize,
    check: CheckKind,
}

impl JobDef {
    pub fn target(&self) -> &Target {
        &self.targets[self.index]
    }

    pub fn check(&self) -> CheckKind {
        self.check
    }

    /// The probe spec of this job, as [`Target::check_specs`] makes it.
    pub fn spec(&self) -> CheckSpec {
        self.target().check_spec(self.check)
    }
}

impl std::fmt::Debug for JobDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobDef")
            .field("target", &self.target().def.name)
            .field("check", &self.check)
            .finish_non_exhaustive()
    }
}

/// The (target, check) pairs to run: local targets win over central ones of the same name.
pub fn desired_jobs(
    local: &Arc<[Target]>,
    central: Option<&pb::Schedule>,
    region: &str,
) -> BTreeMap<(String, CheckKind), JobDef> {
    let mut jobs = BTreeMap::new();
    let mut add = |targets: &Arc<[Target]>| {
        for (index, target) in targets.iter().enumerate() {
            for &check in &target.def.checks {
                let def = JobDef {
                    targets: targets.clone(),
                    index,
                    check,
                };
                jobs.insert((target.def.name.clone(), check), def);
            }
        }
    };
    if let Some(schedule) = central {
        let mut targets = Vec::new();
        for spec in &schedule.targets {
            if !spec.regions.is_empty() && !spec.regions.iter().any(|r| r == region) {
                continue;
            }
            match Target::from_central(spec) {
                Ok((target, problems)) => {
                    for problem in problems {
                        warn!(target = %target.def.name, problem = %problem, "central target check skipped");
                    }
                    targets.push(target);
                }
                Err(problem) => {
                    warn!(target = %spec.name, problem = %problem, "central target skipped")
                }
            }
        }
        add(&targets.into());
    }
    add(local);
    jobs
}

/// What the scheduler needs; built once per agent.
pub struct Scheduler {
    pub agent_id: String,
    pub region: String,
    /// The local targets (shared with the uplink, which lists them in Hello).
    pub local: Arc<[Target]>,
    /// Latest central schedule (`None` until the collector sent one).
    pub central: watch::Receiver<Option<pb::Schedule>>,
    pub prober: Arc<dyn Prober>,
    pub sink: Arc<dyn ResultSink>,
    /// Global limit of simultaneous probes.
    pub concurrency: usize,
    /// How long in-flight probes may take after shutdown before they are abandoned.
    pub grace: Duration,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

type JobKey = (String, CheckKind);

/// One scheduled (target, check) and the next slot on its grid.
struct Job {
    def: JobDef,
    /// The slot this job's heap entry is for.
    next: Instant,
}

/// A run in flight (waiting for a permit, probing or storing) of the (target, check) it is keyed
/// by; a run of a stopped or changed job counts too, so no job of the same key starts beside it.
struct Busy {
    job: u64,
    cancel: CancellationToken,
    abort: AbortHandle,
}

/// The scheduler's jobs: one timer over a heap of next slots (no task per job while idle).
#[derive(Default)]
struct Jobs {
    by_id: HashMap<u64, Job>,
    by_key: BTreeMap<JobKey, u64>,
    /// (slot, job id), earliest first; entries of removed jobs are skipped when they come up.
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    busy: HashMap<JobKey, Busy>,
    next_id: u64,
}

impl Scheduler {
    /// Runs until `shutdown`; then starts nothing new and waits (up to `grace`) for running probes,
    /// whose results are stored before this returns.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let global = Arc::new(Semaphore::new(self.concurrency.max(1)));
        // The phase grid every job's offset is measured from, so restarted jobs keep their slot.
        let epoch = Instant::now();
        let mut jobs = Jobs::default();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(JobKey, u64)>();
        let mut central_open = true;
        let mut apply = true;
        loop {
            if apply {
                let schedule = self.central.borrow_and_update().clone();
                let desired = desired_jobs(&self.local, schedule.as_ref(), &self.region);
                self.apply(desired, &mut jobs, epoch);
                apply = false;
            }
            let next_due = jobs.due.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some((key, id)) = done_rx.recv() => {
                    if jobs.busy.get(&key).is_some_and(|b| b.job == id) {
                        jobs.busy.remove(&key);
                    }
                }
                changed = self.central.changed(), if central_open => {
                    if changed.is_err() {
                        central_open = false;
                    }
                    apply = true;
                }
                _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {
                    self.start_due(&mut jobs, &tracker, &global, &shutdown, &done_tx);
                }
            }
        }
        for busy in jobs.busy.values() {
            busy.cancel.cancel();
        }
        tracker.close();
        let running = tracker.len();
        if tokio::time::timeout(self.grace, tracker.wait())
            .await
            .is_err()
        {
            warn!(grace = ?self.grace, "probes still running at the shutdown deadline, abandoning them");
            for busy in jobs.busy.values() {
                busy.abort.abort();
            }
        } else {
            debug!(runs = running, "scheduler stopped");
        }
    }

    /// Starts a run of every job whose slot has come, unless a run of its (target, check) is still
    /// in flight (that slot is skipped: never two runs at once), and queues its next slot.
    fn start_due(
        &self,
        jobs: &mut Jobs,
        tracker: &TaskTracker,
        global: &Arc<Semaphore>,
        shutdown: &CancellationToken,
        done: &mpsc::UnboundedSender<(JobKey, u64)>,
    ) {
        let now = Instant::now();
        while let Some(&Reverse((at, id))) = jobs.due.peek() {
            if at > now {
                break;
            }
            jobs.due.pop();
            let Some(job) = jobs.by_id.get_mut(&id) else {
                continue; // removed
            };
            if job.next != at {
                continue;
            }
            let target = job.def.target();
            job.next = next_slot(at, target.def.interval, now);
            jobs.due.push(Reverse((job.next, id)));
            let key = (target.def.name.clone(), job.def.check);
            if jobs.busy.contains_key(&key) {
                continue;
            }
            let cancel = shutdown.child_token();
            let run = Run {
                spec: job.def.spec(),
                prober: self.prober.clone(),
                sink: self.sink.clone(),
                global: global.clone(),
                cancel: cancel.clone(),
            };
            let (busy_key, done) = (key.clone(), done.clone());
            let handle = tracker.spawn(async move {
                run.run().await;
                let _ = done.send((busy_key, id));
            });
            jobs.busy.insert(
                key,
                Busy {
                    job: id,
                    cancel,
                    abort: handle.abort_handle(),
                },
            );
        }
    }

    fn apply(&self, desired: BTreeMap<JobKey, JobDef>, jobs: &mut Jobs, epoch: Instant) {
        let mut stale: Vec<JobKey> = Vec::new();
        for (key, id) in &jobs.by_key {
            let Some(job) = jobs.by_id.get_mut(id) else {
                continue;
            };
            match desired.get(key) {
                // Same spec: keep the job (and its slot), pointing at the new target list so the
                // old one can go.
                Some(def) if def.spec() == job.def.spec() => job.def = def.clone(),
                _ => stale.push(key.clone()),
            }
        }
        let stopped = stale.len();
        for key in stale {
            if let Some(id) = jobs.by_key.remove(&key) {
                jobs.by_id.remove(&id);
                // A run waiting for its permit gives up; a probe already started finishes and is
                // stored, and the job's successor waits for it (the key stays busy until then).
                if let Some(busy) = jobs.busy.get(&key).filter(|b| b.job == id) {
                    busy.cancel.cancel();
                }
            }
        }
        let mut started = 0usize;
        for (key, def) in desired {
            if jobs.by_key.contains_key(&key) {
                continue;
            }
            let interval = def.target().def.interval;
            let offset = stable_offset(&self.agent_id, &key.0, key.1, interval);
            let next = first_slot(epoch, offset, interval, Instant::now());
            let id = jobs.next_id;
            jobs.next_id += 1;
            jobs.due.push(Reverse((next, id)));
            jobs.by_key.insert(key, id);
            jobs.by_id.insert(id, Job { def, next });
            started += 1;
        }
        // Drop the heap entries of removed jobs when they pile up (frequent schedule changes).
        if jobs.due.len() > 2 * jobs.by_id.len() + 64 {
            jobs.due = jobs
                .by_id
                .iter()
                .map(|(id, job)| Reverse((job.next, *id)))
                .collect();
        }
        if started > 0 || stopped > 0 {
            info!(
                jobs = jobs.by_id.len(),
                started, stopped, "schedule applied"
            );
        }
    }
}

/// The first slot at or after `now` on a job's grid (`epoch + offset + k * interval`).
fn first_slot(epoch: Instant, offset: Duration, interval: Duration, now: Instant) -> Instant {
    let base = epoch + offset;
    if now <= base {
        return base;
    }
    let interval = interval.as_nanos().max(1);
    let since = (now - base).as_nanos();
    let k = since.div_ceil(interval);
    let nanos = u64::try_from(k * interval).unwrap_or(u64::MAX);
    base + Duration::from_nanos(nanos)
}

/// The first slot after `slot` on its grid that is later than `now` (missed slots are skipped).
fn next_slot(slot: Instant, interval: Duration, now: Instant) -> Instant {
    let next = slot + interval.max(Duration::from_nanos(1));
    if next > now {
        return next;
    }
    let step = interval.as_nanos().max(1);
    let k = (now - slot).as_nanos() / step + 1;
    slot + Duration::from_nanos(u64::try_from(k * step).unwrap_or(u64::MAX))
}

/// One run of a job: wait for a global permit (unless cancelled), probe, store.
struct Run {
    spec: CheckSpec,
    prober: Arc<dyn Prober>,
    sink: Arc<dyn ResultSink>,
    global: Arc<Semaphore>,
    cancel: CancellationToken,
}

impl Run {
    async fn run(self) {
        let permit = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return,
            permit = self.global.clone().acquire_owned() => permit,
        };
        let Ok(_permit) = permit else { return };
        // Runs to the end even when cancelled: a started probe's result is kept.
        let observations = self.probe_once().await;
        drop(_permit);
        if observations.is_empty() {
            return;
        }
        if let Err(e) = self.sink.store(observations).await {
            warn!(target = %self.spec.target, check = %self.spec.check, error = %e,
                "results not stored");
        }
    }

    async fn probe_once(&self) -> Vec<Observation> {
        let start_us = now_us();
        let deadline = self.spec.timeout + PROBE_SAFETY_MARGIN;
        let mut observations = match tokio::time::timeout(deadline, self.prober.probe(&self.spec))
            .await
        {
            Ok(obs) => obs,
            Err(_) => {
                warn!(target = %self.spec.target, check = %self.spec.check, "probe overran its deadline");
                let mut o = Observation::new(
                    &self.spec.target,
                    Endpoint::host(self.spec.target.clone()),
                    self.spec.check,
                    start_us,
                );
                o.problem(
                    Outcome::Fail,
                    ErrorClass::Timeout,
                    Phase::Total,
                    "probe overran its deadline",
                );
                o.timing(Phase::Total, deadline);
                vec![o]
            }
        };
        for o in &mut observations {
            o.interval = self.spec.interval;
        }
        observations
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::probe::{CheckOptions, HostLimits, TargetKind};

    /// Records when each (target, check) started; sleeps per target when told to.
    #[derive(Default)]
    struct FakeProber {
        epoch: Mutex<Option<Instant>>,
        starts: Mutex<Vec<(String, CheckKind, Duration)>>,
        running: Mutex<HashMap<String, usize>>,
        max_running: Mutex<HashMap<String, usize>>,
        slow: HashMap<String, Duration>,
    }

    impl FakeProber {
        fn starts_of(&self, target: &str) -> Vec<Duration> {
            let starts = self.starts.lock().unwrap();
            starts
                .iter()
                .filter(|(t, _, _)| t == target)
                .map(|(_, _, at)| *at)
                .collect()
        }
    }

    #[async_trait::async_trait]
    impl Prober for FakeProber {
        async fn probe(&self, spec: &CheckSpec) -> Vec<Observation> {
            let at = {
                let epoch = *self.epoch.lock().unwrap().get_or_insert_with(Instant::now);
                Instant::now() - epoch
            };
            self.starts
                .lock()
                .unwrap()
                .push((spec.target.clone(), spec.check, at));
            {
                let mut running = self.running.lock().unwrap();
                let n = running.entry(spec.target.clone()).or_default();
                *n += 1;
                let mut max = self.max_running.lock().unwrap();
                let m = max.entry(spec.target.clone()).or_default();
                *m = (*m).max(*n);
            }
            if let Some(d) = self.slow.get(&spec.target) {
                tokio::time::sleep(*d).await;
            }
            *self.running.lock().unwrap().get_mut(&spec.target).unwrap() -= 1;
            vec![Observation::new(
                &spec.target,
                Endpoint::host(spec.target.clone()),
                spec.check,
                0,
            )]
        }
    }

    #[derive(Default)]
    struct MemorySink(Mutex<Vec<Observation>>);

    #[async_trait::async_trait]
    impl ResultSink for MemorySink {
        async fn store(&self, observations: Vec<Observation>) -> Result<Vec<u64>, SpoolError> {
            let mut all = self.0.lock().unwrap();
            all.extend(observations);
            Ok(vec![])
        }
    }

    fn target(name: &str, checks: &[CheckKind], interval: Duration) -> Target {
        Target {
            def: mxscope_proto::target::Target {
                name: name.to_string(),
                kind: TargetKind::Domain,
                checks: checks.to_vec(),
                interval,
                timeout: Duration::from_secs(5),
                ports: BTreeMap::new(),
                regions: Vec::new(),
                labels: BTreeMap::new(),
                require_tls: false,
                spf_senders: Vec::new(),
            },
            options: CheckOptions::default(),
        }
    }

    fn central(version: u64, targets: &[(&str, &[&str])]) -> pb::Schedule {
        pb::Schedule {
            version,
            targets: targets
                .iter()
                .map(|(name, checks)| pb::TargetSpec {
                    name: name.to_string(),
                    checks: checks.iter().map(|c| c.to_string()).collect(),
                    interval_ms: 10_000,
                    source: "central".into(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn scheduler(
        local: Vec<Target>,
        central: watch::Receiver<Option<pb::Schedule>>,
        prober: Arc<dyn Prober>,
        sink: Arc<MemorySink>,
    ) -> Scheduler {
        Scheduler {
            agent_id: "eu-1".into(),
            region: "eu-west".into(),
            local: local.into(),
            central,
            prober,
            sink,
            concurrency: 10_000,
            grace: Duration::from_secs(30),
        }
    }

    /// Connects the way real probes do: the target resolves to one of a few mail hosts, the
    /// connection waits for a [`HostLimits`] slot to that host and is held for `hold`. Records
    /// when each probe started and the most simultaneous connections seen per host.
    struct HostBoundProber {
        limits: HostLimits,
        hold: Duration,
        epoch: Instant,
        host_of: HashMap<String, String>,
        starts: Mutex<Vec<Duration>>,
        connected: Mutex<HashMap<String, usize>>,
        max_connected: Mutex<HashMap<String, usize>>,
        waited: Mutex<usize>,
    }

    #[async_trait::async_trait]
    impl Prober for HostBoundProber {
        async fn probe(&self, spec: &CheckSpec) -> Vec<Observation> {
            self.starts
                .lock()
                .unwrap()
                .push(Instant::now() - self.epoch);
            let host = &self.host_of[&spec.target];
            let asked = Instant::now();
            let _slot = self.limits.acquire(host).await;
            if Instant::now() > asked {
                *self.waited.lock().unwrap() += 1;
            }
            {
                let mut connected = self.connected.lock().unwrap();
                let n = connected.entry(host.clone()).or_default();
                *n += 1;
                let mut max = self.max_connected.lock().unwrap();
                let m = max.entry(host.clone()).or_default();
                *m = (*m).max(*n);
            }
            tokio::time::sleep(self.hold).await;
            *self.connected.lock().unwrap().get_mut(host).unwrap() -= 1;
            vec![Observation::new(
                &spec.target,
                Endpoint::host(host.clone()),
                spec.check,
                0,
            )]
        }
    }

    /// 1,000 targets at 60 s spread over the interval (no second above twice the mean)
    /// while 25 targets share each mail host and slow connections never exceed the per-host limit.
    #[tokio::test(start_paused = true)]
    async fn thousand_targets_spread_evenly_within_the_per_host_limit() {
        const TARGETS: usize = 1000;
        const HOSTS: usize = 40;
        const PER_HOST: usize = 2;
        let interval = Duration::from_secs(60);
        let local: Vec<Target> = (0..TARGETS)
            .map(|i| target(&format!("d{i}.example"), &[CheckKind::Smtp], interval))
            .collect();
        let prober = Arc::new(HostBoundProber {
            limits: HostLimits::new(PER_HOST),
            // 25 targets per host, 3 s each: more than two at once on a host happens often.
            hold: Duration::from_secs(3),
            epoch: Instant::now(),
            host_of: (0..TARGETS)
                .map(|i| (format!("d{i}.example"), format!("mx{}.example", i % HOSTS)))
                .collect(),
            starts: Mutex::default(),
            connected: Mutex::default(),
            max_connected: Mutex::default(),
            waited: Mutex::default(),
        });
        let sink = Arc::new(MemorySink::default());
        let (_tx, rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let task =
            tokio::spawn(scheduler(local, rx, prober.clone(), sink.clone()).run(stop.clone()));
        tokio::time::sleep(interval - Duration::from_millis(1)).await;
        stop.cancel();
        task.await.unwrap();

        // Spread: every target started exactly once in the first interval, evenly.
        let starts = prober.starts.lock().unwrap();
        assert_eq!(
            starts.len(),
            TARGETS,
            "each target exactly once in the first interval"
        );
        let mut slots = [0usize; 60];
        for at in starts.iter() {
            slots[at.as_secs() as usize] += 1;
        }
        let mean = TARGETS as f64 / 60.0;
        let max = *slots.iter().max().unwrap();
        assert!(
            (max as f64) <= 2.0 * mean,
            "busiest second has {max} probes (mean {mean:.1}): {slots:?}"
        );
        assert!(slots.iter().all(|&n| n > 0), "no empty second: {slots:?}");

        // Per-host limit: it was needed (probes queued for a host) and it held on every host.
        let waited = *prober.waited.lock().unwrap();
        assert!(
            waited > 0,
            "no probe ever waited for a host slot: the test does not load the limit"
        );
        let max_connected = prober.max_connected.lock().unwrap();
        assert_eq!(max_connected.len(), HOSTS, "every host was probed");
        for (host, n) in max_connected.iter() {
            assert!(
                *n <= PER_HOST,
                "{n} simultaneous connections to {host}, limit {PER_HOST}"
            );
        }
        assert!(
            max_connected.values().any(|n| *n == PER_HOST),
            "some host reached the limit: {max_connected:?}"
        );

        // Probes that queued for their host finished after the stop and were all stored.
        let stored = sink.0.lock().unwrap();
        assert_eq!(stored.len(), TARGETS);
        assert!(
            stored.iter().all(|o| o.interval == interval),
            "interval is set on every observation"
        );
    }

    /// The global limit: of 200 slow probes due within 10 s, never more than `concurrency` run at
    /// once.
    #[tokio::test(start_paused = true)]
    async fn global_concurrency_limit_holds() {
        const LIMIT: usize = 8;
        let interval = Duration::from_secs(10);
        let local: Vec<Target> = (0..200)
            .map(|i| target(&format!("g{i}.example"), &[CheckKind::Mx], interval))
            .collect();
        let prober = Arc::new(HostBoundProber {
            // One host each and a generous host limit: only the global limit can bind.
            limits: HostLimits::new(100),
            hold: Duration::from_secs(2),
            epoch: Instant::now(),
            host_of: (0..200)
                .map(|i| (format!("g{i}.example"), format!("mx{i}.example")))
                .collect(),
            starts: Mutex::default(),
            connected: Mutex::default(),
            max_connected: Mutex::default(),
            waited: Mutex::default(),
        });
        let sink = Arc::new(MemorySink::default());
        let (_tx, rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let mut sched = scheduler(local, rx, prober.clone(), sink.clone());
        sched.concurrency = LIMIT;
        let task = tokio::spawn(sched.run(stop.clone()));
        let mut peak = 0;
        let until = Instant::now() + interval;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let now: usize = prober.connected.lock().unwrap().values().sum();
            peak = peak.max(now);
        }
        stop.cancel();
        task.await.unwrap();

        assert_eq!(peak, LIMIT, "the limit is reached and never exceeded");
        // 200 runs of 2 s, 8 at a time, need 50 s: in 10 s about 40 start, the rest wait and
        // give up on the stop; every run that started is stored.
        let started = prober.starts.lock().unwrap().len();
        assert!(
            (LIMIT * 4..200).contains(&started),
            "{started} probes started"
        );
        assert_eq!(
            sink.0.lock().unwrap().len(),
            started,
            "every started run stored"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn offset_is_stable_and_within_interval() {
        let i = Duration::from_secs(60);
        let a = stable_offset("eu-1", "example.com", CheckKind::Smtp, i);
        assert_eq!(a, stable_offset("eu-1", "example.com", CheckKind::Smtp, i));
        assert_ne!(
            a,
            stable_offset("us-1", "example.com", CheckKind::Smtp, i),
            "per agent"
        );
        assert!(a < i);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_probe_is_not_started_twice() {
        let interval = Duration::from_secs(10);
        let prober = Arc::new(FakeProber {
            slow: [("slow.example".to_string(), Duration::from_secs(25))]
                .into_iter()
                .collect(),
            ..Default::default()
        });
        *prober.epoch.lock().unwrap() = Some(Instant::now());
        let mut slow_target = target("slow.example", &[CheckKind::Smtp], interval);
        slow_target.def.timeout = Duration::from_secs(60);
        let local = vec![
            slow_target,
            target("fast.example", &[CheckKind::Smtp], interval),
        ];
        let sink = Arc::new(MemorySink::default());
        let (_tx, rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let task =
            tokio::spawn(scheduler(local, rx, prober.clone(), sink.clone()).run(stop.clone()));
        tokio::time::sleep(Duration::from_secs(100)).await;
        stop.cancel();
        task.await.unwrap();

        let slow = prober.starts_of("slow.example");
        let fast = prober.starts_of("fast.example");
        assert_eq!(fast.len(), 10, "fast target runs every interval: {fast:?}");
        assert!(
            (3..=4).contains(&slow.len()),
            "slow target skips busy ticks: {slow:?}"
        );
        assert_eq!(
            prober.max_running.lock().unwrap()["slow.example"],
            1,
            "never two runs at once"
        );
        for pair in slow.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_secs(25), "{slow:?}");
        }
        // The run in flight at shutdown finished and was stored.
        let stored = sink
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.target == "slow.example")
            .count();
        assert_eq!(stored, slow.len());
    }

    /// A slow central check changed twice in a row, then removed and added again while its first
    /// run is still in flight: every later job waits for that run, so there is never a second.
    #[tokio::test(start_paused = true)]
    async fn slow_check_changed_removed_and_readded_never_runs_twice() {
        let prober = Arc::new(FakeProber {
            slow: [("slow.example".to_string(), Duration::from_secs(25))]
                .into_iter()
                .collect(),
            ..Default::default()
        });
        *prober.epoch.lock().unwrap() = Some(Instant::now());
        let slow = |version: u64, interval_ms: u64| {
            let mut s = central(version, &[("slow.example", &["mx"])]);
            s.targets[0].interval_ms = interval_ms;
            s.targets[0].timeout_ms = 60_000;
            s
        };
        let sink = Arc::new(MemorySink::default());
        let (tx, rx) = watch::channel(Some(slow(1, 10_000)));
        let stop = CancellationToken::new();
        let task =
            tokio::spawn(scheduler(vec![], rx, prober.clone(), sink.clone()).run(stop.clone()));
        // Let the first run start (its offset is within the 10 s interval).
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(prober.starts_of("slow.example").len(), 1);
        assert_eq!(prober.running.lock().unwrap()["slow.example"], 1);

        // Each step is applied before the next (the scheduler runs while this task sleeps).
        let step = Duration::from_millis(100);
        for schedule in [
            Some(slow(2, 11_000)),
            Some(slow(3, 12_000)),
            Some(central(4, &[])),
            Some(slow(5, 10_000)),
        ] {
            tx.send_replace(schedule);
            tokio::time::sleep(step).await;
        }
        tokio::time::sleep(Duration::from_secs(90)).await;
        stop.cancel();
        task.await.unwrap();

        let starts = prober.starts_of("slow.example");
        assert!(starts.len() >= 3, "the check keeps running: {starts:?}");
        assert_eq!(
            prober.max_running.lock().unwrap()["slow.example"],
            1,
            "never two runs at once: {starts:?}"
        );
        for pair in starts.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_secs(25), "{starts:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn central_schedule_replacement_stops_removed_targets() {
        let prober = Arc::new(FakeProber::default());
        *prober.epoch.lock().unwrap() = Some(Instant::now());
        let sink = Arc::new(MemorySink::default());
        let (tx, rx) = watch::channel(Some(central(
            1,
            &[("a.example", &["mx"]), ("b.example", &["mx"])],
        )));
        let local = vec![target(
            "local.example",
            &[CheckKind::Mx],
            Duration::from_secs(10),
        )];
        let stop = CancellationToken::new();
        let task =
            tokio::spawn(scheduler(local, rx, prober.clone(), sink.clone()).run(stop.clone()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(prober.starts_of("a.example").len() >= 2);
        assert!(prober.starts_of("b.example").len() >= 2);

        let changed_at = Duration::from_secs(30);
        tx.send_replace(Some(central(
            2,
            &[("b.example", &["smtp"]), ("c.example", &["mx"])],
        )));
        tokio::time::sleep(Duration::from_secs(30)).await;
        stop.cancel();
        task.await.unwrap();

        assert!(
            prober
                .starts_of("a.example")
                .iter()
                .all(|at| *at <= changed_at),
            "removed target stopped"
        );
        assert!(prober.starts_of("c.example").len() >= 2, "new target runs");
        assert!(
            prober.starts_of("local.example").len() >= 5,
            "local targets keep running"
        );
        let starts = prober.starts.lock().unwrap();
        let b_after: Vec<CheckKind> = starts
            .iter()
            .filter(|(t, _, at)| t == "b.example" && *at > changed_at)
            .map(|(_, c, _)| *c)
            .collect();
        assert!(!b_after.is_empty());
        assert!(
            b_after.iter().all(|c| *c == CheckKind::Smtp),
            "changed checks take effect: {b_after:?}"
        );
    }

    /// A new central schedule keeps the jobs whose spec did not change (same id, same slot) and
    /// moves them to the new target list, so the old list is freed.
    #[tokio::test(start_paused = true)]
    async fn unchanged_jobs_survive_a_new_schedule_and_drop_the_old_list() {
        let (_tx, rx) = watch::channel(None);
        let s = scheduler(
            vec![target(
                "local.example",
                &[CheckKind::Mx],
                Duration::from_secs(30),
            )],
            rx,
            Arc::new(FakeProber::default()),
            Arc::new(MemorySink::default()),
        );
        let epoch = Instant::now();
        let mut jobs = Jobs::default();
        let v1 = central(1, &[("a.example", &["mx", "smtp"]), ("b.example", &["mx"])]);
        s.apply(
            desired_jobs(&s.local, Some(&v1), &s.region),
            &mut jobs,
            epoch,
        );
        assert_eq!(jobs.by_id.len(), 4);
        let id_of = |jobs: &Jobs, name: &str, check| jobs.by_key[&(name.to_string(), check)];
        let a_mx = id_of(&jobs, "a.example", CheckKind::Mx);
        let b_mx = id_of(&jobs, "b.example", CheckKind::Mx);
        let old_list = jobs.by_id[&a_mx].def.targets.clone();

        // b.example gets a new interval; a.example is the same.
        let mut v2 = central(2, &[("a.example", &["mx", "smtp"]), ("b.example", &["mx"])]);
        v2.targets[1].interval_ms = 20_000;
        s.apply(
            desired_jobs(&s.local, Some(&v2), &s.region),
            &mut jobs,
            epoch,
        );
        assert_eq!(jobs.by_id.len(), 4);
        assert_eq!(
            id_of(&jobs, "a.example", CheckKind::Mx),
            a_mx,
            "unchanged job kept"
        );
        assert_ne!(
            id_of(&jobs, "b.example", CheckKind::Mx),
            b_mx,
            "changed job replaced"
        );
        let b = &jobs.by_id[&id_of(&jobs, "b.example", CheckKind::Mx)];
        assert_eq!(b.def.spec().interval, Duration::from_secs(20));
        let central_jobs: Vec<&Job> = jobs
            .by_id
            .values()
            .filter(|j| j.def.target().def.name != "local.example")
            .collect();
        assert_eq!(central_jobs.len(), 3);
        assert!(
            central_jobs
                .iter()
                .all(|j| !Arc::ptr_eq(&j.def.targets, &old_list)),
            "no job refers to the first schedule's targets"
        );
        assert_eq!(
            Arc::strong_count(&old_list),
            1,
            "the first list is only ours now"
        );
    }

    #[test]
    fn local_wins_and_regions_filter() {
        let mut schedule = central(1, &[("a.example", &["mx"]), ("b.example", &["mx"])]);
        schedule.targets[1].regions = vec!["us-east".into()];
        let local = vec![target(
            "a.example",
            &[CheckKind::Mx],
            Duration::from_secs(30),
        )];
        let jobs = desired_jobs(&local.into(), Some(&schedule), "eu-west");
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        let spec = jobs[&("a.example".to_string(), CheckKind::Mx)].spec();
        assert_eq!(
            spec.interval,
            Duration::from_secs(30),
            "local definition wins"
        );
    }
}
