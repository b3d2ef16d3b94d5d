//! The pool against a real SQLite queue and scripted backends that hold each task until the
//! test opens their gate. What the tests assert is read from the pool's own events and state,
//! never from how long something took.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use koubou_backend::{
    Backend, BackendError, CancellationToken, GenerateRequest, Generation, Health, Router, TokenSink, TypeRoute,
};
use koubou_queue::{Capabilities, Dispatch, SqliteConfig, SqliteQueue, TaskQueue, TaskStore};
use koubou_task::{
    Event, EventBus, EventKind, EventLog, NewTask, Subscription, TaskKind, TaskStatus, Usage, WorkerId, now_millis,
};
use koubou_worker::{Pool, PoolConfig};
use tokio::sync::watch;

/// Serves `capacity` at once; each generation waits until the gate opens (or is cancelled).
/// Counts generations running now and the most that ever ran together.
struct Gated {
    name: &'static str,
    capacity: usize,
    gate: watch::Receiver<bool>,
    running: AtomicUsize,
    peak: AtomicUsize,
}

impl Gated {
    fn new(name: &'static str, capacity: usize) -> (Arc<Gated>, watch::Sender<bool>) {
        let (open, gate) = watch::channel(false);
        (Arc::new(Gated { name, capacity, gate, running: AtomicUsize::new(0), peak: AtomicUsize::new(0) }), open)
    }

    fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Backend for Gated {
    fn name(&self) -> &str {
        self.name
    }
    fn kind(&self) -> &'static str {
        "exec"
    }
    fn default_model(&self) -> &str {
        "m"
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    async fn health(&self) -> Health {
        Health::up("ok", vec![])
    }
    async fn generate(
        &self,
        req: GenerateRequest,
        sink: &dyn TokenSink,
        cancel: CancellationToken,
    ) -> Result<Generation, BackendError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        sink.token("working ");
        let mut gate = self.gate.clone();
        let opened = tokio::select! {
            r = gate.wait_for(|open| *open) => r.is_ok(),
            _ = cancel.cancelled() => false,
        };
        self.running.fetch_sub(1, Ordering::SeqCst);
        if !opened {
            return Err(BackendError::Cancelled);
        }
        Ok(Generation {
            text: format!("done: {}", req.prompt),
            usage: Usage::default(),
            model: req.model,
            finish_reason: "stop".into(),
            warnings: vec![],
        })
    }
}

/// A queue on a temp file, and a router over `backends` with `types` (type → (backend, fallback)).
fn setup(
    backends: &[Arc<Gated>],
    types: &[(&str, &str, Option<&str>)],
) -> (tempfile::TempDir, Arc<dyn TaskQueue>, Arc<Router>, Arc<dyn EventLog>) {
    let dir = tempfile::tempdir().unwrap();
    let bus: Arc<dyn EventLog> = Arc::new(EventBus::default());
    let q = SqliteQueue::open(dir.path().join("q.db"), SqliteConfig::default(), bus.clone()).unwrap();
    let types = types
        .iter()
        .map(|(kind, backend, fallback)| {
            let route = TypeRoute {
                backend: (*backend).into(),
                fallback: fallback.map(str::to_owned).into_iter().collect(),
                ..TypeRoute::default()
            };
            (kind.to_string(), route)
        })
        .collect::<BTreeMap<_, _>>();
    let router = Router::new(backends.iter().map(|b| b.clone() as Arc<dyn Backend>), types).unwrap();
    (dir, Arc::new(q), Arc::new(router), bus)
}

/// One gated backend serving the `general` type, on a fresh queue.
struct Rig {
    backend: Arc<Gated>,
    open: watch::Sender<bool>,
    _dir: tempfile::TempDir,
    q: Arc<dyn TaskQueue>,
    router: Arc<Router>,
    bus: Arc<dyn EventLog>,
}

fn one_backend(capacity: usize) -> Rig {
    let (backend, open) = Gated::new("gated", capacity);
    let (_dir, q, router, bus) = setup(std::slice::from_ref(&backend), &[("general", "gated", None)]);
    Rig { backend, open, _dir, q, router, bus }
}

/// Waits for `f` with a generous deadline (a loaded machine only makes it slower, never wrong).
async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Submits `n` tasks of `kind` at once (concurrently, as a burst of clients would).
async fn submit_burst(q: &Arc<dyn TaskQueue>, kind: &str, n: usize) {
    let subs = (0..n).map(|i| q.submit(NewTask::new(TaskKind::parse(kind).unwrap(), format!("t{i}"))));
    for r in futures::future::join_all(subs).await {
        r.unwrap();
    }
}

/// Every event received so far.
fn drain(rx: &mut Subscription, into: &mut Vec<Arc<Event>>) {
    while let Some(Some(Ok(e))) = rx.next().now_or_never() {
        into.push(e);
    }
}

/// `(workers, previous)` of every scaling step, in order.
fn steps(events: &[Arc<Event>]) -> Vec<(usize, usize)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::WorkerScaled { workers, previous, .. } => Some((*workers, *previous)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grows_to_the_backlog_at_once() {
    let Rig { backend: b, open, _dir, q, router, bus } = one_backend(8);
    let mut rx = bus.subscribe(None);
    // An hour of cooldown and idle time: if growing waited for either, this test would hang.
    let cfg = PoolConfig {
        min_workers: 1,
        max_workers: 8,
        cooldown_ms: 3_600_000,
        idle_secs: 3_600,
        ..PoolConfig::default()
    };
    let pool = Pool::start(cfg, "t", q.clone(), router, bus);
    assert_eq!((pool.ceiling(), pool.workers().len()), (8, 1));
    submit_burst(&q, "general", 12).await;
    until("eight tasks generating at once", async || b.running() == 8).await;
    let ws = pool.workers();
    assert_eq!(ws.len(), 8);
    assert!(ws.iter().all(|w| w.state == "busy"), "{ws:?}");
    let mut events = Vec::new();
    drain(&mut rx, &mut events);
    let s = steps(&events);
    assert!(s.iter().all(|(after, before)| after > before && *after <= 8), "only growth, up to 8: {s:?}");
    assert_eq!(s.last().map(|s| s.0), Some(8), "{s:?}");

    open.send(true).unwrap();
    until("all twelve done", async || q.counts().await.unwrap().completed == 12).await;
    assert_eq!(b.peak.load(Ordering::SeqCst), 8, "never more than the backend's capacity");
    drain(&mut rx, &mut events);
    assert!(steps(&events).iter().all(|(after, before)| after > before), "no scale-down before the idle period");
    assert_eq!(pool.workers().len(), 8);
    pool.shutdown(Some(Duration::from_secs(1))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrinks_back_only_after_the_idle_period() {
    let Rig { backend: b, open, _dir, q, router, bus } = one_backend(4);
    let mut rx = bus.subscribe(None);
    const IDLE_SECS: u64 = 1;
    const COOLDOWN_MS: u64 = 50;
    let cfg = PoolConfig {
        min_workers: 1,
        max_workers: 4,
        cooldown_ms: COOLDOWN_MS,
        idle_secs: IDLE_SECS,
        ..PoolConfig::default()
    };
    let pool = Pool::start(cfg, "t", q.clone(), router, bus);
    submit_burst(&q, "general", 6).await;
    until("four generating", async || b.running() == 4).await;
    open.send(true).unwrap();
    until("all done", async || q.counts().await.unwrap().completed == 6).await;
    until("back to the minimum", async || pool.workers().len() == 1).await;

    let mut events = Vec::new();
    drain(&mut rx, &mut events);
    // Each worker let go had been idle for the whole idle period when it stopped.
    let mut idle_at: HashMap<WorkerId, i64> = HashMap::new();
    let mut stopped = 0;
    for e in &events {
        if let EventKind::WorkerState { worker_id, state, .. } = &e.kind {
            match state.as_str() {
                "idle" => {
                    idle_at.insert(worker_id.clone(), e.at);
                }
                "stopped" => {
                    stopped += 1;
                    let since = idle_at[worker_id];
                    assert!(
                        e.at - since >= (IDLE_SECS * 1000) as i64 - 2,
                        "{worker_id} stopped {} ms after it went idle",
                        e.at - since
                    );
                }
                _ => {}
            }
        }
    }
    assert_eq!(stopped, 3);
    // Down one step at a time, at least a cooldown apart.
    let downs: Vec<i64> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::WorkerScaled { workers, previous, .. } if workers + 1 == previous))
        .map(|e| e.at)
        .collect();
    assert_eq!(downs.len(), 3, "{:?}", steps(&events));
    assert!(downs.windows(2).all(|w| w[1] - w[0] >= COOLDOWN_MS as i64 - 2), "{downs:?}");
    pool.shutdown(Some(Duration::from_secs(1))).await;
}

#[test]
fn says_when_max_workers_exceeds_what_the_backends_serve() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (primary, _) = Gated::new("primary", 2);
        let (fallback, _) = Gated::new("fallback", 4);
        let (_dir, q, router, bus) = setup(&[primary, fallback], &[("general", "primary", Some("fallback"))]);
        let cfg = PoolConfig { max_workers: 8, ..PoolConfig::default() };
        let pool = Pool::start(cfg, "t", q.clone(), router.clone(), bus.clone());
        // The fallback runs under its primary's permit: it adds no concurrency.
        assert_eq!((pool.backend_capacity(), pool.ceiling()), (2, 2));
        let why = pool.capped().expect("capped");
        assert!(why.contains("max_workers = 8") && why.contains("primary 2") && why.contains("at most 2"), "{why}");
        assert_eq!(pool.warnings(), vec![why]);
        pool.shutdown(Some(Duration::from_secs(1))).await;

        let pool = Pool::start(PoolConfig { max_workers: 2, ..PoolConfig::default() }, "u", q, router, bus);
        assert_eq!(pool.capped(), None);
        pool.shutdown(Some(Duration::from_secs(1))).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_back_under_the_memory_floor_and_says_so() {
    let Rig { open: _open, _dir, q, router, bus, .. } = one_backend(4);
    // 16 TiB free is more than any test machine has.
    let cfg = PoolConfig { min_workers: 1, max_workers: 4, min_free_memory_mb: 16 << 20, ..PoolConfig::default() };
    let pool = Pool::start(cfg, "t", q.clone(), router, bus);
    submit_burst(&q, "general", 4).await;
    until("the pool saying why it does not grow", async || pool.held_back().is_some()).await;
    assert_eq!(pool.workers().len(), 1);
    let why = pool.held_back().unwrap();
    assert!(why.contains("min_free_memory_mb"), "{why}");
    assert!(pool.warnings().contains(&why));
    pool.shutdown(Some(Duration::from_millis(100))).await;
}

/// A worker waiting for its backend's permit renews its lease meanwhile: with a lease shorter
/// than the wait, the task keeps its first attempt instead of passing for abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waiting_for_its_backend_keeps_its_lease() {
    let (gated, open) = Gated::new("gated", 1);
    let (other, _) = Gated::new("other", 1);
    // Two backends of one slot each: two workers, both of whose `general` tasks need `gated`.
    let (_dir, q, router, bus) = setup(&[gated.clone(), other], &[("general", "gated", None), ("code", "other", None)]);
    let cfg = PoolConfig { min_workers: 2, max_workers: 2, lease_secs: 3, ..PoolConfig::default() };
    let pool = Pool::start(cfg, "t", q.clone(), router, bus);
    let first = q.submit(NewTask::new(TaskKind::general(), "first")).await.unwrap().task;
    until("the first task generating", async || gated.running() == 1).await;
    let second = q.submit(NewTask::new(TaskKind::general(), "second")).await.unwrap().task;
    until("the second task claimed", async || q.get(second.id).await.unwrap().unwrap().status == TaskStatus::Running)
        .await;
    let claimed_until = q.get(second.id).await.unwrap().unwrap().lease_until.unwrap();
    // Past the lease it was claimed with (and a second more): still waiting for the permit.
    until("the first lease to run out", async || now_millis() > claimed_until + 1_000).await;
    assert_eq!(gated.running(), 1, "the second task must still be waiting for the backend");
    let t = q.get(second.id).await.unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (TaskStatus::Running, 1), "{t:?}");
    assert!(t.lease_until.unwrap() > claimed_until, "the lease was renewed while waiting");
    let thief = q.claim(&WorkerId::new("thief", 1), &Capabilities::any(), Duration::from_secs(30)).await.unwrap();
    assert!(thief.is_none(), "a waiting task's lease ran out and it was claimed again");

    open.send(true).unwrap();
    until("both done", async || q.counts().await.unwrap().completed == 2).await;
    for id in [first.id, second.id] {
        let t = q.get(id).await.unwrap().unwrap();
        assert_eq!((t.status, t.attempts), (TaskStatus::Completed, 1), "{t:?}");
    }
    pool.shutdown(Some(Duration::from_secs(1))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_within_grace_or_hands_back() {
    let Rig { backend: b, open: _open, _dir, q, router, bus } = one_backend(2);
    let cfg = PoolConfig { min_workers: 1, max_workers: 1, ..PoolConfig::default() };
    let pool = Pool::start(cfg, "t", q.clone(), router, bus);
    let t = q.submit(NewTask::new(TaskKind::general(), "long")).await.unwrap().task;
    until("generating", async || b.running() == 1).await;
    pool.shutdown(Some(Duration::from_millis(200))).await;
    let after = q.get(t.id).await.unwrap().unwrap();
    assert_eq!(after.status, TaskStatus::Pending, "handed back to the queue");
    assert_eq!(after.attempts, 0, "the interrupted attempt does not count");
    // And no worker is left to claim it again (the scaler is stopped before the members are).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(q.get(t.id).await.unwrap().unwrap().status, TaskStatus::Pending, "claimed after the shutdown");
    assert_eq!(b.running(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_task_mid_generation() {
    let Rig { backend: b, open: _open, _dir, q, router, bus } = one_backend(1);
    let pool = Pool::start(PoolConfig::default(), "t", q.clone(), router, bus);
    let t = q.submit(NewTask::new(TaskKind::general(), "long")).await.unwrap().task;
    until("generating", async || b.running() == 1).await;
    q.cancel(t.id).await.unwrap();
    until("the backend told to stop", async || b.running() == 0).await;
    until("worker free again", async || pool.workers().iter().all(|w| w.state == "idle")).await;
    assert_eq!(q.get(t.id).await.unwrap().unwrap().status, TaskStatus::Cancelled);
    pool.shutdown(Some(Duration::from_millis(100))).await;
}

/// Workers claim only the kinds their router routes (a `code` task waits for a node that routes
/// `code`), and a task their router cannot route after all (it pins a backend this node lacks)
/// goes back to the queue for another node — retrying, its attempt not counted, the reason
/// kept — instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_claim_what_they_can_route_and_hand_back_what_they_cannot() {
    let Rig { backend: b, open, _dir, q, router, bus } = one_backend(2);
    let mut events = bus.subscribe(None);
    let pool = Pool::start(
        PoolConfig { min_workers: 1, max_workers: 1, ..PoolConfig::default() },
        "t",
        q.clone(),
        router,
        bus,
    );
    let code = q.submit(NewTask::new(TaskKind::parse("code").unwrap(), "not here")).await.unwrap().task;
    let pinned = NewTask { backend: Some("elsewhere".into()), ..NewTask::new(TaskKind::general(), "pinned") };
    let pinned = q.submit(pinned).await.unwrap().task;
    let general = q.submit(NewTask::new(TaskKind::general(), "here")).await.unwrap().task;
    // The pinned task is handed back (it was submitted first of the two this node routes).
    let reason = loop {
        let e = events.next().await.unwrap().unwrap();
        if let EventKind::TaskRequeued { task_id, reason } = &e.kind
            && *task_id == pinned.id
        {
            break reason.clone();
        }
    };
    assert!(reason.contains("elsewhere"), "{reason}");
    let t = q.get(pinned.id).await.unwrap().unwrap();
    assert_eq!((t.status, t.attempts), (TaskStatus::Retrying, 0), "{t:?}");
    assert!(t.error.unwrap().contains("not routable here"));
    assert!(t.available_at >= now_millis() + 20_000, "not claimable again at once");
    open.send(true).unwrap();
    until("the general task done", async || q.get(general.id).await.unwrap().unwrap().status == TaskStatus::Completed)
        .await;
    assert_eq!(q.get(code.id).await.unwrap().unwrap().status, TaskStatus::Pending, "no worker here routes code");
    assert_eq!(b.peak.load(Ordering::SeqCst), 1);
    pool.shutdown(Some(Duration::from_secs(1))).await;
}

/// A queue whose heartbeats stop answering once `cut` is set (the queue unreachable, as a
/// node cut off from it sees it); everything else is the SQLite queue's.
struct Unreachable {
    q: SqliteQueue,
    cut: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl TaskStore for Unreachable {
    async fn submit_bounded(
        &self,
        new: NewTask,
        max_queued: Option<u64>,
    ) -> Result<koubou_queue::Submitted, koubou_queue::QueueError> {
        self.q.submit_bounded(new, max_queued).await
    }
    async fn get(&self, id: koubou_task::TaskId) -> Result<Option<koubou_task::Task>, koubou_queue::QueueError> {
        self.q.get(id).await
    }
    async fn list(&self, query: koubou_queue::TaskQuery) -> Result<koubou_queue::TaskPage, koubou_queue::QueueError> {
        self.q.list(query).await
    }
    async fn counts(&self) -> Result<koubou_queue::StatusCounts, koubou_queue::QueueError> {
        self.q.counts().await
    }
    async fn position(
        &self,
        id: koubou_task::TaskId,
    ) -> Result<Option<koubou_queue::QueuePosition>, koubou_queue::QueueError> {
        self.q.position(id).await
    }
    async fn cancel(&self, id: koubou_task::TaskId) -> Result<koubou_task::Task, koubou_queue::QueueError> {
        self.q.cancel(id).await
    }
}

#[async_trait]
impl Dispatch for Unreachable {
    async fn claim(
        &self,
        worker: &WorkerId,
        caps: &Capabilities,
        lease: Duration,
    ) -> Result<Option<koubou_queue::Claimed>, koubou_queue::QueueError> {
        self.q.claim(worker, caps, lease).await
    }
    async fn claim_wait(
        &self,
        worker: &WorkerId,
        caps: &Capabilities,
        lease: Duration,
        stop: &CancellationToken,
    ) -> Result<Option<koubou_queue::Claimed>, koubou_queue::QueueError> {
        self.q.claim_wait(worker, caps, lease, stop).await
    }
    async fn heartbeat(
        &self,
        lease: &koubou_queue::Lease,
        ttl: Duration,
        progress: koubou_queue::Progress<'_>,
    ) -> Result<koubou_queue::LeaseStatus, koubou_queue::QueueError> {
        if self.cut.load(Ordering::SeqCst) {
            return std::future::pending().await;
        }
        self.q.heartbeat(lease, ttl, progress).await
    }
    async fn complete(
        &self,
        lease: &koubou_queue::Lease,
        done: koubou_queue::Completion,
    ) -> Result<koubou_task::Task, koubou_queue::QueueError> {
        self.q.complete(lease, done).await
    }
    async fn fail(
        &self,
        lease: &koubou_queue::Lease,
        failure: koubou_queue::Failure,
    ) -> Result<koubou_task::Task, koubou_queue::QueueError> {
        self.q.fail(lease, failure).await
    }
    async fn release(
        &self,
        lease: &koubou_queue::Lease,
        why: koubou_queue::Release,
    ) -> Result<(), koubou_queue::QueueError> {
        self.q.release(lease, why).await
    }
    async fn recover_node(&self, node: &str) -> Result<u64, koubou_queue::QueueError> {
        self.q.recover_node(node).await
    }
    async fn housekeep(&self) -> Result<(), koubou_queue::QueueError> {
        self.q.housekeep().await
    }
}

/// A worker that cannot renew its lease stops its attempt once the lease has run out by its own
/// count, so that it never runs beside the attempt of whichever worker claims the task next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_renew_its_lease_stops_its_attempt() {
    let (gated, _open) = Gated::new("gated", 1);
    let (dir, _, router, bus) = setup(std::slice::from_ref(&gated), &[("general", "gated", None)]);
    let sqlite = SqliteQueue::open(dir.path().join("cut.db"), SqliteConfig::default(), bus.clone()).unwrap();
    let q = Arc::new(Unreachable { q: sqlite, cut: false.into() });
    let cfg = PoolConfig { min_workers: 1, max_workers: 1, lease_secs: 2, ..PoolConfig::default() };
    let pool = Pool::start(cfg, "t", q.clone(), router, bus);
    let t = q.submit(NewTask::new(TaskKind::general(), "cut off")).await.unwrap().task;
    until("generating", async || gated.running() == 1).await;
    q.cut.store(true, Ordering::SeqCst);
    until("the attempt to stop", async || gated.running() == 0).await;
    // Stopped, so that its parked worker does not take the task again below.
    pool.shutdown(Some(Duration::from_millis(200))).await;
    // Still running in the queue, under the lease the worker could not renew: the queue hands it
    // to another worker once that lease has run out.
    let after = q.get(t.id).await.unwrap().unwrap();
    assert_eq!((after.status, after.attempts), (TaskStatus::Running, 1), "{after:?}");
    let lease_until = after.lease_until.unwrap();
    until("the lease to run out", async || now_millis() > lease_until).await;
    let next = q.claim(&WorkerId::new("other", 1), &Capabilities::any(), Duration::from_secs(30)).await.unwrap();
    assert_eq!(next.map(|c| (c.task.id, c.lease.attempt)), Some((t.id, 2)), "the next attempt is another worker's");
}
