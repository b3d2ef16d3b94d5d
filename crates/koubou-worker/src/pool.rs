//! The pool: between `min_workers` and `max_workers` workers, scaled by queue depth.
//!
//! Up at once, down slowly. The scaler wakes on every task submitted or requeued and grows the
//! pool straight to the work there is — `running + pending` workers — capped by `max_workers`
//! and by what the backends serve at once, and not at all while free memory is under
//! `min_free_memory_mb`. A slow tick (at most one second) catches what no event announces (a
//! retry's backoff ending) and decides scale-downs: while nothing is pending, one worker that has
//! been idle for `idle_secs` is let go per `cooldown_ms`.
//!
//! What the backends serve at once is the sum of the capacities of the backends some task type
//! goes to first. A fallback runs under its primary's permit, so it adds no concurrency.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use futures::{FutureExt, StreamExt};
use koubou_backend::Router;
use koubou_queue::{TaskQueue, TaskStore};
use koubou_task::{EventKind, EventLog, WorkerId};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::{sync::Semaphore, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    memory,
    worker::{self, Shared, Snapshot, Stop, WorkerState},
};

/// `[pool]` in config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    pub min_workers: usize,
    pub max_workers: usize,
    /// Least time between two scale-down steps, in milliseconds (scaling up never waits).
    pub cooldown_ms: u64,
    /// How long a worker must have been idle, with nothing pending, before it is let go, in
    /// seconds.
    pub idle_secs: u64,
    /// No scaling up while `MemAvailable` is below this, in MiB.
    pub min_free_memory_mb: u64,
    /// Lease on a claimed task, in seconds; heartbeats renew it every third of it.
    pub lease_secs: u64,
    /// On shutdown, how long running tasks may take to finish before they are handed back.
    pub shutdown_grace_secs: u64,
    /// How long this node's registration lasts without renewal, in seconds (renewed every third
    /// of it). A node silent that long is taken for dead: another node requeues its running
    /// tasks.
    pub node_ttl_secs: u64,
    /// Tags this node's workers declare: when set, they claim only tasks whose every tag is
    /// among them (untagged tasks always); unset, tasks with any tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_workers: 1,
            max_workers: 8,
            cooldown_ms: 2_000,
            idle_secs: 30,
            min_free_memory_mb: 512,
            lease_secs: 30,
            shutdown_grace_secs: 30,
            node_ttl_secs: 30,
            tags: None,
        }
    }
}

/// One worker as the pool reports it.
pub type WorkerInfo = Snapshot;

struct Member {
    state: Arc<WorkerState>,
    stop: Stop,
    handle: JoinHandle<()>,
}

/// A running pool of workers.
pub struct Pool {
    cfg: PoolConfig,
    shared: Arc<Shared>,
    /// What the scaler counts (the workers only dispatch).
    store: Arc<dyn TaskStore>,
    node: String,
    members: Mutex<Vec<Member>>,
    /// Workers let go that may still be finishing a task they claimed as they were stopped.
    retiring: Mutex<Vec<Member>>,
    next_n: Mutex<usize>,
    /// The capacity of each backend that some task type goes to first.
    capacities: BTreeMap<String, usize>,
    capacity: usize,
    /// Why the pool is not growing although work is waiting, while that lasts.
    held_back: Mutex<Option<String>>,
    stop_scaler: CancellationToken,
    scaler: Mutex<Option<JoinHandle<()>>>,
}

impl Pool {
    /// Starts `min_workers` workers named `<node>/<n>` and the scaler.
    pub fn start(
        cfg: PoolConfig,
        node: &str,
        queue: Arc<dyn TaskQueue>,
        router: Arc<Router>,
        bus: Arc<dyn EventLog>,
    ) -> Arc<Pool> {
        let permits: HashMap<String, Arc<Semaphore>> =
            router.backends().map(|b| (b.name().to_owned(), Arc::new(Semaphore::new(b.capacity().max(1))))).collect();
        let capacities: BTreeMap<String, usize> = router
            .types()
            .values()
            .filter_map(|r| router.backend(&r.backend).ok())
            .map(|b| (b.name().to_owned(), b.capacity().max(1)))
            .collect();
        let capacity = capacities.values().sum::<usize>().max(1);
        let lease = Duration::from_secs(cfg.lease_secs.max(1));
        let caps = worker::capabilities(&router, cfg.tags.as_deref());
        let shared = Arc::new(Shared { queue: queue.clone(), router, bus, lease, permits, caps });
        let pool = Arc::new(Pool {
            cfg,
            shared,
            store: queue,
            node: node.to_owned(),
            members: Mutex::new(Vec::new()),
            retiring: Mutex::new(Vec::new()),
            next_n: Mutex::new(1),
            capacities,
            capacity,
            held_back: Mutex::new(None),
            stop_scaler: CancellationToken::new(),
            scaler: Mutex::new(None),
        });
        if let Some(why) = pool.capped() {
            tracing::warn!("{why}");
        }
        let min = pool.ceiling().min(pool.cfg.min_workers.max(1));
        pool.grow(min, "minimum");
        let p = pool.clone();
        *pool.scaler.lock() = Some(tokio::spawn(async move { p.scale_loop().await }));
        pool
    }

    /// The most workers this pool will run: `max_workers`, capped by backend capacity.
    pub fn ceiling(&self) -> usize {
        self.cfg.max_workers.max(1).min(self.capacity)
    }

    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// How many generations the backends serve at once (the cap on the pool).
    pub fn backend_capacity(&self) -> usize {
        self.capacity
    }

    /// When `max_workers` asks for more workers than the backends can keep busy, says so.
    pub fn capped(&self) -> Option<String> {
        if self.cfg.max_workers <= self.capacity {
            return None;
        }
        let each: Vec<String> = self.capacities.iter().map(|(name, n)| format!("{name} {n}")).collect();
        Some(format!(
            "max_workers = {} is more than the backends serve at once ({}: {}), so at most {} workers run; \
             raise a backend's `concurrency` (`parallel` for the embedded one) to run more",
            self.cfg.max_workers,
            self.capacity,
            each.join(", "),
            self.ceiling()
        ))
    }

    /// Why the pool is not growing right now although work is waiting (free memory short).
    pub fn held_back(&self) -> Option<String> {
        self.held_back.lock().clone()
    }

    /// What an operator should know about the pool's size: [`Pool::capped`], [`Pool::held_back`].
    pub fn warnings(&self) -> Vec<String> {
        self.capped().into_iter().chain(self.held_back()).collect()
    }

    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.members.lock().iter().map(|m| m.state.snapshot()).collect()
    }

    fn grow(&self, n: usize, reason: &str) {
        if n == 0 {
            return;
        }
        let mut members = self.members.lock();
        let before = members.len();
        for _ in 0..n {
            let id = {
                let mut next = self.next_n.lock();
                *next += 1;
                WorkerId::new(&self.node, *next - 1)
            };
            let state = Arc::new(WorkerState::new(id));
            let stop = Stop::default();
            let handle = tokio::spawn(worker::run(self.shared.clone(), state.clone(), stop.clone()));
            members.push(Member { state, stop, handle });
        }
        let after = members.len();
        drop(members);
        tracing::info!(workers = after, previous = before, reason, "pool scaled up");
        self.shared.bus.publish(EventKind::WorkerScaled { workers: after, previous: before, reason: reason.into() });
    }

    /// Stops the newest worker that has been idle for at least `idle`, if any.
    fn retire_idle(&self, idle: Duration, reason: &str) -> bool {
        let mut members = self.members.lock();
        if members.len() <= self.cfg.min_workers.max(1) {
            return false;
        }
        let Some(i) = members.iter().rposition(|m| m.state.snapshot().idle_for.is_some_and(|d| d >= idle)) else {
            return false;
        };
        let m = members.remove(i);
        m.stop.stop.cancel();
        let (before, after) = (members.len() + 1, members.len());
        drop(members);
        let mut retiring = self.retiring.lock();
        retiring.retain(|r| !r.handle.is_finished());
        retiring.push(m);
        drop(retiring);
        tracing::info!(workers = after, previous = before, reason, "pool scaled down");
        self.shared.bus.publish(EventKind::WorkerScaled { workers: after, previous: before, reason: reason.into() });
        true
    }

    async fn scale_loop(self: Arc<Self>) {
        let mut events = self.shared.bus.subscribe(None);
        let cooldown = Duration::from_millis(self.cfg.cooldown_ms);
        let mut last_down = Instant::now();
        let mut tick = tokio::time::interval(cooldown.clamp(Duration::from_millis(100), Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let may_shrink = tokio::select! {
                _ = self.stop_scaler.cancelled() => return,
                e = events.next() => match e {
                    Some(Ok(e)) if matches!(e.kind, EventKind::TaskCreated { .. } | EventKind::TaskRequeued { .. }) => false,
                    Some(Ok(_)) => continue,
                    Some(Err(_lagged)) => false,
                    None => return,
                },
                _ = tick.tick() => true,
            };
            if !may_shrink {
                // A burst of submissions is one decision: take every event already waiting.
                while let Some(Some(_)) = events.next().now_or_never() {}
                if self.members.lock().len() >= self.ceiling() {
                    continue;
                }
            }
            self.decide(may_shrink && last_down.elapsed() >= cooldown, &mut last_down).await;
        }
    }

    /// One scaling decision: grow to the work there is, or (when `may_shrink`) let one
    /// long-idle worker go.
    async fn decide(&self, may_shrink: bool, last_down: &mut Instant) {
        let counts = match self.store.counts().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "scaler could not read the queue");
                return;
            }
        };
        let (current, busy) = {
            let members = self.members.lock();
            (members.len(), members.iter().filter(|m| m.state.snapshot().state == "busy").count())
        };
        // `running` also counts tasks a worker has claimed but not yet marked itself busy for.
        let work = counts.pending + counts.running.max(busy as u64);
        let want = work.min(self.ceiling() as u64) as usize;
        if want > current {
            let floor = self.cfg.min_free_memory_mb.saturating_mul(1 << 20);
            if let Some(free) = memory::available_bytes().filter(|&free| free < floor) {
                let why = format!(
                    "not adding workers: available memory {} MiB is under min_free_memory_mb = {}",
                    free >> 20,
                    self.cfg.min_free_memory_mb
                );
                if self.held_back.lock().replace(why.clone()).as_deref() != Some(why.as_str()) {
                    tracing::warn!("{why}");
                }
                return;
            }
            *self.held_back.lock() = None;
            self.grow(want - current, &format!("{} tasks pending", counts.pending));
            return;
        }
        *self.held_back.lock() = None;
        if may_shrink && counts.pending == 0 && self.retire_idle(Duration::from_secs(self.cfg.idle_secs), "worker idle")
        {
            *last_down = Instant::now();
        }
    }

    /// Stops claiming, lets running tasks finish within the grace period, then cuts the rest
    /// short and hands them back to the queue.
    pub async fn shutdown(&self, grace: Option<Duration>) {
        self.stop_scaler.cancel();
        // The scaler is gone before the members are taken: running on another thread when
        // aborted, it could otherwise still grow the pool it then finds empty, and start a
        // worker nothing stops (seen once in CI: that worker claimed the task the stopping one
        // had just handed back).
        let scaler = self.scaler.lock().take();
        if let Some(h) = scaler {
            h.abort();
            let _ = h.await;
        }
        let mut members: Vec<Member> = std::mem::take(&mut *self.members.lock());
        members.append(&mut self.retiring.lock());
        for m in &members {
            m.stop.stop.cancel();
        }
        let grace = grace.unwrap_or(Duration::from_secs(self.cfg.shutdown_grace_secs));
        let deadline = Instant::now() + grace;
        for m in members {
            let mut handle = m.handle;
            tokio::select! {
                _ = &mut handle => {}
                _ = tokio::time::sleep_until(deadline) => {
                    m.stop.abort.cancel();
                    let _ = handle.await;
                }
            }
        }
    }
}
